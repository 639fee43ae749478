//! `predict`: predict (lookup + a 100-tree GBDT) against lookup alone and Redis `HGETALL`; the
//! same predict as KServe V2 infer over HTTP (JSON) and over gRPC (`ModelInfer`).

use anyhow::Result;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::harness::*;
use crate::load::us;
use crate::lookup::{closed_loop, Peer};
use crate::report::Report;
use crate::{cpu, BenchArgs};

/// One measured phase of `predict`: (round, path, ops/s, latencies, errors).
pub(crate) type PredictPhase = (usize, usize, f64, Histogram<u64>, u64, Option<f64>);

/// Predict (lookup + a 100-tree depth-6 GBDT on the entity's 32 features) against the same
/// lookup alone, same keys and connections, interleaved rounds; plus the model's own per-row
/// time at batch 1 and 256, in process.
pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let q = start_embedded()?;
    let model = served_model(&q.node, "gbdt32")?;
    let client_rt = cpu::client_runtime()?;
    let (n, conns, warmup, duration, repeat) = (
        args.entities,
        args.connections,
        args.warmup,
        args.duration,
        args.repeat.max(1),
    );
    let (addr, grpc) = (q.addr, q.grpc);
    let node = q.node.clone();
    let redis = redis::Client::open(args.redis.as_str())?;
    let rows = client_rt.block_on(async move {
        // The same rows in Quiver and in Redis (for the lookup-alone peer).
        let prefix = format!("quiverbench:{}:", std::process::id());
        let value = |i: usize, f: usize| ((i * 31 + f) % 97) as f64 / 48.0 - 1.0;
        let mut con = load_rows(addr, &node, &redis, &prefix, n, value).await?;
        let mut rows = Vec::new();
        for round in 0..repeat {
            for peer in [
                Peer::Quiver,
                Peer::Redis,
                Peer::Predict,
                Peer::PredictBatched,
                Peer::V2Http,
                Peer::V2Grpc,
            ] {
                let (ops, h, errors, cpu_us) = closed_loop(
                    peer,
                    "uniform",
                    addr,
                    Some(grpc),
                    &redis,
                    &prefix,
                    n,
                    conns,
                    warmup,
                    duration,
                )
                .await?;
                rows.push((round, peer as usize, ops, h, errors, cpu_us));
            }
        }
        clear_rows(&mut con, &prefix, n).await?;
        anyhow::Ok(rows)
    })?;
    // The model alone, in process, and onnxruntime on its ONNX export, on the same rows.
    let (b1, b256, ort) = crate::runtimes::gbdt_per_row(model.as_ref(), duration)?;
    let ort1 = ort.as_ref().and_then(|o| o["batch_1_us_per_row"].as_f64());
    let ort256 = ort
        .as_ref()
        .and_then(|o| o["batch_256_us_per_row"].as_f64());
    let pick = |peer: usize, f: &dyn Fn(&PredictPhase) -> f64| {
        median(rows.iter().filter(|r| r.1 == peer).map(f).collect())
    };
    // Per-round ratios (both sides measured back to back), then the median.
    let per_round = |num: usize, den: usize| {
        median(
            (0..repeat)
                .map(|round| {
                    let get = |peer| {
                        rows.iter()
                            .find(|r| r.0 == round && r.1 == peer)
                            .map(|r| r.2)
                            .unwrap_or(0.0)
                    };
                    get(num) / get(den).max(1e-9)
                })
                .collect(),
        )
    };
    let ratio = per_round(Peer::Predict as usize, Peer::Quiver as usize);
    let vs_redis = per_round(Peer::Predict as usize, Peer::Redis as usize);
    say!(report, "\n## predict vs lookup: {n} entities × {FEATURES} features, {conns} connections, median of {repeat} round(s)\n");
    say!(
        report,
        "| path | ops/s | p50 µs | p99 µs | errors | server CPU µs/op |\n|---|---|---|---|---|---|"
    );
    for (peer, name) in [
        (0, "lookup GET /v1/features/row/{key}"),
        (1, "Redis HGETALL of the same row (lookup alone)"),
        (2, "predict POST /v1/models/gbdt32/predict"),
        (3, "predict, micro-batched (32 rows / 200 µs)"),
        (
            6,
            "predict as KServe V2 over HTTP (POST /v2/models/gbdt32/infer, JSON)",
        ),
        (7, "predict as KServe V2 over gRPC (ModelInfer)"),
    ] {
        let cpu: Vec<f64> = rows
            .iter()
            .filter(|r| r.1 == peer)
            .filter_map(|r| r.5)
            .collect();
        say!(
            report,
            "| {name} | {:.0} | {:.0} | {:.0} | {} | {} |",
            pick(peer, &|r| r.2),
            pick(peer, &|r| us(&r.3, 0.5)),
            pick(peer, &|r| us(&r.3, 0.99)),
            rows.iter()
                .filter(|r| r.1 == peer)
                .map(|r| r.4)
                .sum::<u64>(),
            cpu_text((!cpu.is_empty()).then(|| median(cpu)))
        );
    }
    let grpc_vs_http = per_round(Peer::V2Grpc as usize, Peer::V2Http as usize);
    let cpu_of = |peer: Peer| {
        let cpu: Vec<f64> = rows
            .iter()
            .filter(|r| r.1 == peer as usize)
            .filter_map(|r| r.5)
            .collect();
        (!cpu.is_empty()).then(|| median(cpu))
    };
    let (lookup_cpu, predict_cpu) = (cpu_of(Peer::Quiver), cpu_of(Peer::Predict));
    let predict_cpu_vs_lookup = lookup_cpu.zip(predict_cpu).map(|(l, p)| p / l);
    if let Some(r) = predict_cpu_vs_lookup {
        say!(report, "\nserver CPU per predict ÷ per lookup: **{r:.2}×**");
    }
    say!(report, "\npredict / lookup throughput: **{ratio:.2}×**; predict / Redis HGETALL: **{vs_redis:.2}×**; V2 gRPC / V2 HTTP infer: **{grpc_vs_http:.2}×**\n");
    let fmt = |x: Option<f64>| {
        x.map_or("— (pip install onnxruntime)".to_string(), |x| {
            format!("{x:.2}")
        })
    };
    say!(report, "| model alone (100 trees, depth 6, 32 features), same 256 rows | Quiver µs per row | onnxruntime µs per row |\n|---|---|---|");
    say!(
        report,
        "| batch 1 | {b1:.2} | {} |\n| batch 256 | {b256:.2} | {} |",
        fmt(ort1),
        fmt(ort256)
    );
    q.node.shutdown();
    Ok(json!({
        "lookup_ops_per_s": pick(0, &|r| r.2),
        "predict_ops_per_s": pick(2, &|r| r.2),
        "predict_p99_us": pick(2, &|r| us(&r.3, 0.99)),
        "batched_predict_ops_per_s": pick(3, &|r| r.2),
        "batched_predict_p99_us": pick(3, &|r| us(&r.3, 0.99)),
        "redis_ops_per_s": pick(1, &|r| r.2),
        "predict_throughput_vs_lookup": ratio,
        "lookup_server_cpu_us_per_op": lookup_cpu,
        "predict_server_cpu_us_per_op": predict_cpu,
        "redis_server_cpu_us_per_op": cpu_of(Peer::Redis),
        "predict_cpu_vs_lookup": predict_cpu_vs_lookup,
        "v2_http_infer_ops_per_s": pick(6, &|r| r.2),
        "v2_http_infer_p99_us": pick(6, &|r| us(&r.3, 0.99)),
        "grpc_infer_ops_per_s": pick(7, &|r| r.2),
        "grpc_infer_p99_us": pick(7, &|r| us(&r.3, 0.99)),
        "grpc_infer_throughput_vs_http_infer": grpc_vs_http,
        "predict_throughput_vs_redis_lookup": vs_redis,
        "model_us_per_row_batch1": b1,
        "model_us_per_row_batch256": b256,
        "onnxruntime_us_per_row_batch1": ort1,
        "onnxruntime_us_per_row_batch256": ort256,
    }))
}
