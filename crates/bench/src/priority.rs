//! `quiver bench priority`: does a gold tier keep its latency while bronze floods the node?
//!
//! API keys for gold and bronze; bronze sends expensive batch predicts (64 entities each), gold
//! single-entity predicts at a modest paced rate. Phases, each `--duration` seconds after
//! `--warmup`:
//! 1. bronze alone, closed loop: the node's capacity C for bronze's requests;
//! 2. gold alone, open loop: gold's unloaded latency;
//! 3. gold as in 2 while bronze offers 3 × C, open loop: gold's latency under the flood.
//!
//! Two nodes in the same run: the peer puts both keys in one tier (nothing tells gold from
//! bronze, so gold queues behind the flood); then two tiers (gold priority 0, bronze 1),
//! flooded at 3 × the peer's C. Gold runs on a runtime of its own (another client than the
//! flood). `inflight_max` = 2, the server runtime's worker threads: handlers are CPU-bound and
//! do not yield, so slots beyond the threads would only move the queue into the scheduler,
//! where admission is not seen (with two tiers, bronze's handlers run on the server's
//! idle-priority threads while gold is active, so the kernel too puts gold first). The load
//! generator shares the machine's 2 cores with the server: the figures include that
//! interference in both runs alike.

use std::path::Path;

use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::harness::*;
use crate::load::{self, Window, Worker};
use crate::report::Report;
use crate::BenchArgs;

/// Entities loaded (each batch predict reads 64 of them).
const ENTITIES: usize = 10_000;
const BATCH: usize = 64;
/// Requests the node runs at once (bronze's share with two tiers: half).
const INFLIGHT_MAX: usize = 2;
/// Connections measuring capacity (closed loop).
const CAPACITY_CONNECTIONS: usize = 8;
/// Gold's paced rate (requests/s) and connections.
const GOLD_RATE: f64 = 200.0;
const GOLD_CONNECTIONS: usize = 4;
/// Connections offering bronze's flood (enough for 3 × C with refusals answered at once).
const FLOOD_CONNECTIONS: usize = 48;

struct Predictor {
    sender: Sender,
    key: String,
    batch: usize,
}

impl Worker for Predictor {
    async fn call(&mut self, seq: u64, _start: Instant) -> Result<bool> {
        let instances: Vec<String> = (0..self.batch as u64)
            .map(|j| {
                let e = (seq * 7919 + j * 104_729) % ENTITIES as u64;
                format!(r#"{{"entities":{{"user_id":"e{e}"}}}}"#)
            })
            .collect();
        let body = Bytes::from(format!(r#"{{"instances":[{}]}}"#, instances.join(",")));
        let auth = [("authorization", self.key.as_str())];
        let (status, _) = request_with(
            &mut self.sender,
            "POST",
            "/v1/models/gbdt32/predict",
            body,
            &auth,
        )
        .await?;
        Ok(status == 200)
    }
}

async fn predictors(
    addr: std::net::SocketAddr,
    key: &str,
    batch: usize,
    n: usize,
) -> Result<Vec<Predictor>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Predictor {
            sender: connect(addr).await?,
            key: format!("Bearer {key}"),
            batch,
        });
    }
    Ok(out)
}

/// Keys for gold and bronze predictors and a producer, in `dir/keys.toml`.
fn make_keys(dir: &Path, tiered: bool) -> Result<[String; 3]> {
    let file = dir.join("keys.toml");
    let roles = |r: &str| vec![r.to_string()];
    let bronze_tier = if tiered { "bronze" } else { "gold" };
    Ok([
        quiver_auth::keys::create(&file, "gold", &roles("predictor"), Some("gold"))?.0,
        quiver_auth::keys::create(&file, "bronze", &roles("predictor"), Some(bronze_tier))?.0,
        quiver_auth::keys::create(&file, "loader", &roles("producer"), Some("gold"))?.0,
    ])
}

fn tier(name: &str, priority: u8) -> quiver_core::config::RateTierConfig {
    quiver_core::config::RateTierConfig {
        name: name.into(),
        priority,
        rate_per_s: 1_000_000,
        burst: 1_000_000,
    }
}

/// The figures of one node (tiered or the one-tier peer).
struct Run {
    capacity: f64,
    unloaded: load::Outcome,
    flooded: load::Outcome,
    bronze: load::Outcome,
}

/// One node's phases; the flood offers 3 × `flood_capacity` (or its own capacity if `None`).
fn run_node(args: &BenchArgs, tiered: bool, flood_capacity: Option<f64>) -> Result<Run> {
    let keys_dir = tempfile::tempdir()?;
    let [gold, bronze, loader] = make_keys(keys_dir.path(), tiered)?;
    let q = start_embedded_with(|c| {
        c.auth.mode = "api_key".into();
        c.auth.keys_file = keys_dir.path().join("keys.toml");
        c.rate_tiers = vec![tier("gold", 0), tier("bronze", 1)];
        c.server.inflight_max = INFLIGHT_MAX;
    })?;
    let client_rt = crate::cpu::client_runtime()?;
    // Gold is another client than the flood: its own runtime, so its requests do not queue
    // behind the flood's in the generator (they still share the machine's cores).
    let gold_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (addr, node) = (q.addr, q.node.clone());
    let gold_handle = gold_rt.handle().clone();
    let gold_phase = move |window: Window| {
        let key = gold.clone();
        gold_handle.spawn(async move {
            let workers = predictors(addr, &key, 1, GOLD_CONNECTIONS).await?;
            load::drive(workers, Some(GOLD_RATE), &window).await
        })
    };
    let (warmup, duration) = (args.warmup, args.duration);
    let run = client_rt.block_on(async move {
        load_keyed_rows(addr, &node, &loader).await?;
        let bronze_workers = predictors(addr, &bronze, BATCH, CAPACITY_CONNECTIONS).await?;
        let (capacity, _) =
            load::drive(bronze_workers, None, &Window::new(warmup, duration)).await?;
        let capacity = capacity.ops_per_s();
        let flood_rate = 3.0 * flood_capacity.unwrap_or(capacity).max(1.0);
        let (unloaded, _) = gold_phase(Window::new(warmup, duration)).await??;
        let window = Window::new(warmup, duration);
        let flood = predictors(addr, &bronze, BATCH, FLOOD_CONNECTIONS).await?;
        let flood = tokio::spawn({
            let window = window.clone();
            async move { load::drive(flood, Some(flood_rate), &window).await }
        });
        let (flooded, _) = gold_phase(window).await??;
        let (bronze, _) = flood.await??;
        anyhow::Ok(Run {
            capacity,
            unloaded,
            flooded,
            bronze,
        })
    })?;
    q.node.shutdown();
    drop(gold_rt);
    Ok(run)
}

/// [`ENTITIES`] rows of the `row` view, ingested with the loader's key.
async fn load_keyed_rows(
    addr: std::net::SocketAddr,
    node: &quiver_server::Node,
    key: &str,
) -> Result<()> {
    let mut sender = connect(addr).await?;
    let auth = format!("Bearer {key}");
    for chunk in (0..ENTITIES).collect::<Vec<_>>().chunks(1000) {
        let lines: Vec<String> = chunk
            .iter()
            .map(|i| {
                let values: Vec<String> = (0..FEATURES)
                    .map(|f| format!("\"f{f}\":{}", ((i * 31 + f) % 97) as f64 / 48.0 - 1.0))
                    .collect();
                format!(
                    r#"{{"view":"row","key":"e{i}","values":{{{}}}}}"#,
                    values.join(",")
                )
            })
            .collect();
        let body = Bytes::from(lines.join("\n"));
        let (status, reply) = request_with(
            &mut sender,
            "POST",
            "/v1/events",
            body,
            &[("authorization", &auth)],
        )
        .await?;
        anyhow::ensure!(
            status == 200,
            "ingest failed: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    wait_all_applied(node).await;
    Ok(())
}

pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let flat = run_node(args, false, None)?;
    let tiered = run_node(args, true, Some(flat.capacity))?;
    say!(report, "\n## priority: gold single predicts at {GOLD_RATE}/s while bronze floods batch predicts ({BATCH} entities) at 3 × the node's capacity (the peer's); inflight_max = {INFLIGHT_MAX}\n");
    say!(report, "| node | bronze capacity req/s | gold p50 µs unloaded | gold p99 µs unloaded | gold p50 µs flooded | gold p99 µs flooded | gold served flooded | gold refused | gold p99 flooded ÷ unloaded | bronze served/s | bronze refused/s |\n|---|---|---|---|---|---|---|---|---|---|---|");
    let mut out = serde_json::Map::new();
    for (name, r) in [
        ("two tiers (gold 0, bronze 1)", &tiered),
        ("one tier (peer)", &flat),
    ] {
        // No gold request finished in the window: its latency is past the window, not 0.
        let ratio = (r.flooded.ok > 0).then(|| r.flooded.p(0.99) / r.unloaded.p(0.99).max(1.0));
        let shown = ratio.map_or("none finished".to_string(), |x| format!("**{x:.2}×**"));
        say!(
            report,
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {shown} | {:.0} | {:.0} |",
            r.capacity,
            r.unloaded.p(0.5),
            r.unloaded.p(0.99),
            r.flooded.p(0.5),
            r.flooded.p(0.99),
            r.flooded.ok,
            r.flooded.errors,
            r.bronze.ops_per_s(),
            r.bronze.errors as f64 / r.bronze.secs.max(1e-9),
        );
        let key = if std::ptr::eq(r, &tiered) {
            "tiered"
        } else {
            "one_tier"
        };
        out.insert(
            key.into(),
            json!({
                "bronze_capacity_per_s": r.capacity,
                "gold_p99_us_unloaded": r.unloaded.p(0.99),
                "gold_p99_us_flooded": r.flooded.p(0.99),
                "gold_served_flooded": r.flooded.ok,
                "gold_refused": r.flooded.errors,
                "gold_p99_flooded_vs_unloaded": ratio,
                "bronze_served_per_s": r.bronze.ops_per_s(),
                "bronze_refused": r.bronze.errors,
            }),
        );
    }
    Ok(Value::Object(out))
}
