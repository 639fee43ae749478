//! `lookup`: single-entity lookups of a 32-feature row over HTTP vs Redis `HGETALL` of the same
//! row, same keys (uniform and Zipf), same connections, closed loop; Feast-shaped reads beside
//! the GET. `closed_loop` also drives `predict`'s paths.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::harness::*;
use crate::load::{histogram, us};
use crate::report::Report;
use crate::{cpu, BenchArgs};

/// Zipf(s = 1) over `n` ranks by inverse CDF.
pub(crate) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Zipf {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / k as f64;
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// One measured phase of `lookup`: (round, key distribution, system, ops/s, latencies, errors).
pub(crate) type Phase = (
    usize,
    &'static str,
    Peer,
    f64,
    Histogram<u64>,
    u64,
    Option<f64>,
);

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Quiver = 0,
    Redis = 1,
    /// Quiver predict: the same lookup plus the 100-tree GBDT.
    Predict = 2,
    /// The same predict through the model's micro-batcher (`gbdt32_batched`).
    PredictBatched = 3,
    /// Feast's shape: `POST /get-online-features`, all 32 features of one entity.
    Feast1 = 4,
    /// The same for 10 entities per request (ops counted per request).
    Feast10 = 5,
    /// The predict as KServe V2 over HTTP: `POST /v2/models/gbdt32/infer`, feature join (the
    /// entity key as a BYTES input), JSON tensors.
    V2Http = 6,
    /// The same over gRPC: `ModelInfer`, the key as typed BYTES contents, raw FP64 output.
    V2Grpc = 7,
}

pub(crate) type InferClient =
    quiver_server::inference_proto::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >;

pub(crate) async fn grpc_client(addr: std::net::SocketAddr) -> Result<InferClient> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(InferClient::new(channel))
}

/// The feature-join `ModelInfer` of entity `e{i}` on `gbdt32`.
pub(crate) fn grpc_request(i: usize) -> quiver_server::inference_proto::ModelInferRequest {
    use quiver_server::inference_proto as pb;
    pb::ModelInferRequest {
        model_name: "gbdt32".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "user_id".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            contents: Some(pb::InferTensorContents {
                bytes_contents: vec![format!("e{i}").into_bytes()],
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A `/get-online-features` body for `keys`, asking for all 32 features of `row`, as the
/// Feast SDK sends it. Built by concatenation: the load generator shares the server's cores,
/// so its own cost per request is kept near the GET's (a formatted path).
pub(crate) fn feast_body(features: &str, keys: &[String]) -> Bytes {
    let mut b = String::with_capacity(features.len() + 96 + 12 * keys.len());
    b.push_str("{\"features\":");
    b.push_str(features);
    b.push_str(",\"entities\":{\"user_id\":[");
    for (i, k) in keys.iter().enumerate() {
        if i > 0 {
            b.push(',');
        }
        b.push('"');
        b.push_str(k);
        b.push('"');
    }
    b.push_str("]},\"full_feature_names\":false,\"include_feature_view_version_metadata\":false}");
    Bytes::from(b)
}

pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let q = start_embedded()?;
    let client_rt = cpu::client_runtime()?;
    let n = args.entities;
    let redis = redis::Client::open(args.redis.as_str()).context("redis url")?;
    let addr = q.addr;
    let node = q.node.clone();
    let (warmup, duration, conns, repeat) =
        (args.warmup, args.duration, args.connections, args.repeat);
    let rows = client_rt.block_on(async move {
        let prefix = format!("quiverbench:{}:", std::process::id());
        let mut con = load_rows(addr, &node, &redis, &prefix, n, |i, f| {
            (i * 31 + f) as f64 * 0.5
        })
        .await?;
        let mut rows = Vec::new();
        for round in 0..repeat.max(1) {
            for dist in ["uniform", "zipf"] {
                for peer in [Peer::Quiver, Peer::Redis, Peer::Feast1, Peer::Feast10] {
                    let (ops, h, errors, cpu_us) = closed_loop(
                        peer, dist, addr, None, &redis, &prefix, n, conns, warmup, duration,
                    )
                    .await?;
                    rows.push((round, dist, peer, ops, h, errors, cpu_us));
                }
            }
        }
        clear_rows(&mut con, &prefix, n).await?;
        anyhow::Ok(rows)
    })?;
    say!(report, "\n## lookup: one entity × {FEATURES} f64 features, {} entities, {} connections, closed loop\n", n, args.connections);
    say!(report, "median of {} round(s)\n", args.repeat.max(1));
    say!(report, "| keys | system | ops/s | p50 µs | p99 µs | errors | server CPU µs/op |\n|---|---|---|---|---|---|---|");
    let mut out = serde_json::Map::new();
    for dist in ["uniform", "zipf"] {
        for (peer, name, label) in [
            (0, "Quiver GET /v1/features", "quiver"),
            (1, "Redis HGETALL", "redis"),
            (4, "Quiver POST /get-online-features, 1 entity", "feast_1"),
            (
                5,
                "Quiver POST /get-online-features, 10 entities (ops = requests)",
                "feast_10",
            ),
        ] {
            let mine: Vec<_> = rows
                .iter()
                .filter(|r| r.1 == dist && (r.2 as usize) == peer)
                .collect();
            let ops = median(mine.iter().map(|r| r.3).collect());
            let p50 = median(mine.iter().map(|r| us(&r.4, 0.5)).collect());
            let p99 = median(mine.iter().map(|r| us(&r.4, 0.99)).collect());
            let errors: u64 = mine.iter().map(|r| r.5).sum();
            let cpu: Vec<f64> = mine.iter().filter_map(|r| r.6).collect();
            let cpu = (!cpu.is_empty()).then(|| median(cpu));
            say!(
                report,
                "| {dist} | {name} | {ops:.0} | {p50:.0} | {p99:.0} | {errors} | {} |",
                cpu_text(cpu)
            );
            out.insert(
                format!("{dist}_{label}"),
                json!({"ops_per_s": ops, "p50_us": p50, "p99_us": p99, "errors": errors, "server_cpu_us_per_op": cpu}),
            );
        }
    }
    for dist in ["uniform", "zipf"] {
        // Ratios per round (both systems measured back to back), then the median.
        let rounds = args.repeat.max(1);
        let per_round = |num: usize, den: usize, f: &dyn Fn(&Phase) -> f64| -> f64 {
            median(
                (0..rounds)
                    .map(|round| {
                        let pick = |peer: usize| {
                            rows.iter()
                                .find(|r| r.0 == round && r.1 == dist && (r.2 as usize) == peer)
                                .map(f)
                                .unwrap_or(0.0)
                        };
                        pick(num) / pick(den).max(1e-9)
                    })
                    .collect(),
            )
        };
        let ops = |r: &Phase| r.3;
        let ratio_ops = per_round(0, 1, &ops);
        let ratio_p99 = per_round(0, 1, &|r| us(&r.4, 0.99));
        say!(report, "\n{dist}: Quiver/Redis throughput {ratio_ops:.2}×, p99 {ratio_p99:.2}× (median of per-round ratios)");
        let cpu = |label: &str| out[&format!("{dist}_{label}")]["server_cpu_us_per_op"].as_f64();
        if let (Some(q), Some(r)) = (cpu("quiver"), cpu("redis")) {
            say!(
                report,
                "{dist}: server CPU per lookup, Quiver ÷ Redis: {:.2}× ({q:.1} µs vs {r:.1} µs)",
                q / r
            );
            out.insert(format!("{dist}_server_cpu_vs_redis"), json!(q / r));
        }
        out.insert(format!("{dist}_throughput_vs_redis"), json!(ratio_ops));
        out.insert(format!("{dist}_p99_vs_redis"), json!(ratio_p99));
        // Feast's shape against the plain GET: requests/s at 1 entity, entities/s at 10.
        let feast_1 = per_round(4, 0, &ops);
        let feast_10 = per_round(5, 0, &ops) * 10.0;
        say!(report, "{dist}: /get-online-features ÷ GET: 1 entity {feast_1:.2}× requests/s, 10 entities {feast_10:.2}× entities/s");
        out.insert(format!("{dist}_feast_1_vs_get"), json!(feast_1));
        out.insert(format!("{dist}_feast_10_entities_vs_get"), json!(feast_10));
    }
    q.node.shutdown();
    Ok(Value::Object(out))
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn closed_loop(
    peer: Peer,
    dist: &str,
    addr: std::net::SocketAddr,
    grpc: Option<std::net::SocketAddr>,
    redis: &redis::Client,
    prefix: &str,
    n: usize,
    conns: usize,
    warmup: f64,
    duration: f64,
) -> Result<(f64, Histogram<u64>, u64, Option<f64>)> {
    let zipf = Arc::new(Zipf::new(n));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (zipf, measuring, stop, ops, errors) = (
            zipf.clone(),
            measuring.clone(),
            stop.clone(),
            ops.clone(),
            errors.clone(),
        );
        let uniform = dist == "uniform";
        let feature_list = json!((0..FEATURES)
            .map(|f| format!("row:f{f}"))
            .collect::<Vec<_>>())
        .to_string();
        let prefix = prefix.to_string();
        let redis = redis.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64);
            let mut h = histogram();
            let mut http = match peer {
                Peer::Redis | Peer::V2Grpc => None,
                _ => Some(connect(addr).await?),
            };
            // One HTTP/2 connection per worker, as the HTTP peers have one each.
            let mut infer = match (peer, grpc) {
                (Peer::V2Grpc, Some(g)) => Some(grpc_client(g).await?),
                (Peer::V2Grpc, None) => anyhow::bail!("the gRPC peer needs the gRPC listener"),
                _ => None,
            };
            // One connection per worker, as HTTP keep-alive: not a shared multiplexed one.
            let mut con = match peer {
                Peer::Redis => Some(redis.get_multiplexed_async_connection().await?),
                _ => None,
            };
            while !stop.load(Ordering::Relaxed) {
                let i = if uniform {
                    rng.random_range(0..n)
                } else {
                    zipf.sample(&mut rng)
                };
                let t = Instant::now();
                let ok = match peer {
                    Peer::Predict | Peer::PredictBatched => {
                        let body = Bytes::from(format!(r#"{{"entities":{{"user_id":"e{i}"}}}}"#));
                        let path = if peer == Peer::Predict {
                            "/v1/models/gbdt32/predict"
                        } else {
                            "/v1/models/gbdt32_batched/predict"
                        };
                        let (status, _) =
                            request(http.as_mut().expect("http"), "POST", path, body).await?;
                        status == 200
                    }
                    Peer::V2Http => {
                        let body = Bytes::from(format!(
                            r#"{{"inputs":[{{"name":"user_id","datatype":"BYTES","shape":[1],"data":["e{i}"]}}]}}"#
                        ));
                        let path = "/v2/models/gbdt32/infer";
                        let (status, _) =
                            request(http.as_mut().expect("http"), "POST", path, body).await?;
                        status == 200
                    }
                    Peer::V2Grpc => {
                        let client = infer.as_mut().expect("grpc");
                        let reply = client.model_infer(grpc_request(i)).await;
                        reply.is_ok_and(|r| r.get_ref().raw_output_contents.len() == 1)
                    }
                    Peer::Feast1 | Peer::Feast10 => {
                        let count = if peer == Peer::Feast1 { 1 } else { 10 };
                        let keys: Vec<String> = (0..count)
                            .map(|k| format!("e{}", (i + k * 7919) % n))
                            .collect();
                        let body = feast_body(&feature_list, &keys);
                        let (status, reply) = request(
                            http.as_mut().expect("http"),
                            "POST",
                            "/get-online-features",
                            body,
                        )
                        .await?;
                        // Every entity was loaded: any other status is a wrong answer.
                        status == 200 && memchr::memmem::find(&reply, b"NOT_FOUND").is_none()
                    }
                    Peer::Quiver => {
                        let uri = format!("/v1/features/row/e{i}");
                        let (status, _) =
                            request(http.as_mut().expect("http"), "GET", &uri, Bytes::new())
                                .await?;
                        status == 200
                    }
                    Peer::Redis => {
                        let v: redis::Value = redis::cmd("HGETALL")
                            .arg(format!("{prefix}e{i}"))
                            .query_async(con.as_mut().expect("redis"))
                            .await?;
                        matches!(v, redis::Value::Map(ref m) if m.len() == FEATURES)
                            || matches!(v, redis::Value::Array(ref a) if a.len() == 2 * FEATURES)
                    }
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        ops.fetch_add(1, Ordering::Relaxed);
                        h.record(t.elapsed().as_micros().max(1) as u64)?;
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            anyhow::Ok(h)
        }));
    }
    let server = match peer {
        Peer::Redis => cpu::ServerCpu::Processes("redis-server"),
        _ => cpu::ServerCpu::InProcess,
    };
    let (elapsed, cpu_s) = measure_window((warmup, duration), &measuring, &stop, &server).await;
    let mut h = histogram();
    for t in tasks {
        h.add(t.await??)?;
    }
    let ops = ops.load(Ordering::Relaxed) as f64;
    Ok((
        ops / elapsed,
        h,
        errors.load(Ordering::Relaxed),
        cpu::us_per_op(cpu_s, ops),
    ))
}
