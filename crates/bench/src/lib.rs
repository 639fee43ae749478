//! `quiver bench SCENARIO`: measurements for BENCHMARKS.md, each against a peer measured in
//! the same run on the same machine (machines here are small and noisy: ratios, not absolutes).
//!
//! - `ingest`: durable ingest over HTTP (`ack=durable`, group commit), events/s and batch
//!   latency, plus freshness: from the ack of a probe event to the moment the store serves it.
//! - `lookup`: single-entity lookups of a 32-feature row over HTTP vs Redis `HGETALL` of the
//!   same row, same keys (uniform and Zipf), same number of connections, closed loop.
//! - `memory`: resident bytes per entity for N entities × 32 f64 features vs the raw bytes.
//! - `predict`: predict (lookup + a 100-tree GBDT) against lookup alone and Redis `HGETALL`;
//!   the same predict as KServe V2 infer over HTTP (JSON) and over gRPC (`ModelInfer`).
//! - `decoupling`: Quiver against the database-as-queue design (`decoupling.rs`).
//! - `priority`: a gold tier's latency while bronze floods the node, with rate tiers and without
//!   (`priority.rs`).
//! - `encryption`: durable ingest with `[storage] encryption_key_file` against the same without.
//! - `cluster`: the ring's placement (computed) and, with `--kafka`, live nodes (`cluster.rs`).
//! - `restart`: kill -9 → ready from snapshots and from the log alone (`restart.rs`).
//!
//! Quiver runs in this process on its own 2-thread runtime and the load generator on another,
//! except where a server's CPU or a kill must be its own (`decoupling`, `cluster`, `restart`:
//! `quiver serve` children).
//! Every table printed also goes to `--markdown FILE`; `--json FILE` gets the figures with a
//! top-level `"ratios"` object (Quiver ÷ peer) a script can read the verdict from.
//!
//! One file per scenario; `harness.rs` (config, in-process and child servers, the HTTP client),
//! `load.rs` (the open/closed-loop generator) and `cpu.rs` (server CPU per operation) are what
//! they and `quiver demo` share. Errors here are only ever reported, never matched on, so this
//! tool crate uses `anyhow` as the binary does.

/// Prints a line of the report and keeps it for `--markdown`.
macro_rules! say {
    ($r:expr, $($t:tt)*) => {
        $r.say(format!($($t)*))
    };
}

mod aggregations;
mod cluster;
pub mod cpu;
mod decoupling;
mod encryption;
pub mod harness;
mod history;
mod ingest;
pub mod load;
mod lookup;
mod memory;
mod plot;
mod predict;
mod priority;
mod report;
mod restart;
mod runtimes;

use anyhow::Result;
use serde_json::{json, Value};

use report::Report;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// ingest | lookup | memory | aggregations | history | predict | runtimes | decoupling |
    /// priority | encryption | cluster | restart | all, or several, comma-separated (`lookup,predict,decoupling`);
    /// `config` prints the benchmarks' server config (for `decoupling --url`)
    pub scenario: String,
    /// Seconds each measured phase runs (after warm-up).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of warm-up excluded from the figures.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Concurrent connections of the load generator.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Entities loaded for `lookup` and `memory`.
    #[arg(long, default_value_t = 100_000)]
    pub entities: usize,
    /// Entity rows of `history`'s bulk point-in-time retrieval (as `quiver history` asks:
    /// 10,000 rows per request, two in flight).
    #[arg(long, default_value_t = 1_000_000)]
    pub pit_rows: usize,
    /// Events per POST for `ingest`.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// `ingest`: offered events/s over all connections, paced open-loop (0: as fast as the
    /// server acknowledges, closed loop).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// `lookup`: rounds, each measuring every system once (interleaved, so drift in the
    /// machine's speed hits both); figures are medians over the rounds.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// PostgreSQL for `history` (a table `quiver_bench_history_<pid>` is created and dropped).
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    )]
    pub postgres: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// The view `memory-probe` fills (internal: the memory scenarios run it as a child).
    #[arg(long, default_value = "row", hide = true)]
    pub probe_view: String,
    /// `memory`: each entity key this many bytes long (`e`, zeros, the entity's number; 36 is a
    /// UUID's length); 0: `e` and the number.
    #[arg(long, default_value_t = 0)]
    pub key_bytes: usize,
    /// `decoupling`: offered predictions/s (open loop; events/s is `--rate`, default 50,000).
    #[arg(long, default_value_t = 10_000.0)]
    pub predict_rate: f64,
    /// `decoupling`: events per POST to Quiver, rows per UPSERT into PostgreSQL.
    #[arg(long, default_value_t = 100)]
    pub write_batch: usize,
    /// `decoupling`: connections per upstream service (3 services), for both designs.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// `decoupling`: offered loads swept, as multiples of `--rate` and `--predict-rate`
    /// (1 is always run); each design stops climbing after the first load it fails.
    #[arg(long, default_value = "0.25,0.5,0.75,1,1.5,2,3")]
    pub levels: String,
    /// `ingest`: also measure with Kafka as the log, on these brokers (topics
    /// `quiver-bench-<pid>.*` are created), next to the embedded log in the same run.
    /// `cluster`: the brokers of the live cluster (without: only the computed part).
    /// `restart`: Kafka carries the log (restarts replay from Kafka instead of the embedded
    /// log).
    #[arg(long)]
    pub kafka: Option<String>,
    /// `ingest` with `--kafka`: `kafka.idle_fetch_backoff` (a test broker that answers empty
    /// fetches at once needs ~20ms; a Kafka does not).
    #[arg(long, default_value = "0ms")]
    pub kafka_idle_fetch_backoff: String,
    /// `decoupling`: drive the Quiver at this address (`http://HOST:PORT`, serving the config
    /// `quiver bench config` prints) instead of starting a `quiver serve` process of its own.
    #[arg(long)]
    pub url: Option<String>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Write the report's Markdown tables here.
    #[arg(long)]
    pub markdown: Option<std::path::PathBuf>,
    /// Write PNG charts into this directory (`decoupling`: latency and freshness vs load).
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "memory-probe" => return memory::memory_probe(&args),
        "config" => {
            // The server `decoupling --url` drives: `quiver serve --config` this.
            print!(
                "{}",
                harness::bench_config_text(std::path::Path::new("quiver-bench-data"))
            );
            return Ok(());
        }
        "all" => ALL.to_vec(),
        list => {
            // One scenario or several, comma-separated, in ALL's order.
            let asked: Vec<&str> = list.split(',').map(str::trim).collect();
            if let Some(other) = asked.iter().find(|s| !ALL.contains(s)) {
                anyhow::bail!(
                    "unknown scenario {other:?}: {} | all (or a comma-separated list)",
                    ALL.join(" | ")
                );
            }
            ALL.iter().copied().filter(|s| asked.contains(s)).collect()
        }
    };
    let mut results = serde_json::Map::new();
    let report = &mut Report::default();
    for s in scenarios {
        let result = match s {
            "ingest" => ingest::run(report, &args, "txn")?,
            "lookup" => lookup::run(report, &args)?,
            "memory" => memory::run(report, &args)?,
            "aggregations" => aggregations::run(report, &args)?,
            "history" => history::run(report, &args)?,
            "runtimes" => runtimes::run(report, args.duration)?,
            "decoupling" => decoupling::run(report, &args)?,
            "priority" => priority::run(report, &args)?,
            "encryption" => encryption::run(report, &args)?,
            "cluster" => cluster::run(report, &args)?,
            "restart" => restart::run(report, &args)?,
            _ => predict::run(report, &args)?,
        };
        results.insert(s.to_string(), result);
    }
    let results = Value::Object(results);
    let ratios = ratios(&results);
    if !ratios.is_empty() {
        say!(
            report,
            "\n## verdict: Quiver ÷ peer, this run\n\n| ratio | value |\n|---|---|"
        );
        for (name, v) in &ratios {
            say!(
                report,
                "| `{name}` | {:.3} |",
                v.as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    let out = json!({
        "machine": machine(),
        "args": {"duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections, "entities": args.entities, "batch": args.batch, "rate": args.rate, "predict_rate": args.predict_rate, "write_batch": args.write_batch, "writers": args.writers, "levels": args.levels},
        "results": results,
        "ratios": ratios,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
        println!("\nresults written to {}", path.display());
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.text())?;
        println!("tables written to {}", path.display());
    }
    Ok(())
}

/// Every scenario, in the order `all` runs them.
pub(crate) const ALL: [&str; 12] = [
    "ingest",
    "lookup",
    "memory",
    "aggregations",
    "history",
    "predict",
    "runtimes",
    "decoupling",
    "priority",
    "encryption",
    "cluster",
    "restart",
];

/// The verdict a script reads: Quiver ÷ peer for each headline figure the run measured.
pub(crate) fn ratios(results: &Value) -> serde_json::Map<String, Value> {
    let pick = [
        (
            "lookup_throughput_vs_redis",
            "/lookup/uniform_throughput_vs_redis",
        ),
        ("lookup_p99_vs_redis", "/lookup/uniform_p99_vs_redis"),
        (
            "lookup_server_cpu_vs_redis",
            "/lookup/uniform_server_cpu_vs_redis",
        ),
        (
            "lookup_zipf_throughput_vs_redis",
            "/lookup/zipf_throughput_vs_redis",
        ),
        ("lookup_zipf_p99_vs_redis", "/lookup/zipf_p99_vs_redis"),
        (
            "predict_throughput_vs_redis_lookup",
            "/predict/predict_throughput_vs_redis_lookup",
        ),
        (
            "predict_throughput_vs_lookup",
            "/predict/predict_throughput_vs_lookup",
        ),
        (
            "grpc_infer_throughput_vs_http_infer",
            "/predict/grpc_infer_throughput_vs_http_infer",
        ),
        (
            "decoupling_event_rate_vs_postgres",
            "/decoupling/event_rate_vs_postgres",
        ),
        (
            "decoupling_freshness_p99_vs_postgres",
            "/decoupling/freshness_p99_vs_postgres",
        ),
        (
            "decoupling_predict_throughput_vs_postgres",
            "/decoupling/predict_throughput_vs_postgres",
        ),
        ("decoupling_p99_vs_postgres", "/decoupling/p99_vs_postgres"),
        (
            "decoupling_capacity_vs_postgres",
            "/decoupling/capacity_vs_postgres",
        ),
        (
            "priority_gold_p99_flooded_vs_unloaded",
            "/priority/tiered/gold_p99_flooded_vs_unloaded",
        ),
        (
            "priority_gold_p99_flooded_vs_unloaded_one_tier",
            "/priority/one_tier/gold_p99_flooded_vs_unloaded",
        ),
    ];
    pick.iter()
        .filter_map(|(name, at)| {
            let v = results.pointer(at).filter(|v| !v.is_null())?;
            Some((name.to_string(), v.clone()))
        })
        .collect()
}

/// What the figures were measured on.
pub(crate) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0);
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_gib": mem_gib,
        "os": std::env::consts::OS,
    })
}
