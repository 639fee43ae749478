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
//!
//! Quiver runs in this process on its own 2-thread runtime; the load generator on another.
//! Every table printed also goes to `--markdown FILE`; `--json FILE` gets the figures with a
//! top-level `"ratios"` object (Quiver ÷ peer) a script can read the verdict from.

/// Prints a line of the report and keeps it for `--markdown`.
macro_rules! say {
    ($($t:tt)*) => {{
        let line = format!($($t)*);
        println!("{line}");
        let mut report = $crate::bench::REPORT.lock();
        report.push_str(&line);
        report.push('\n');
    }};
}

mod cluster;
mod decoupling;
pub(crate) mod load;
mod plot;
mod priority;

/// Everything `say!` printed in this run.
pub(crate) static REPORT: parking_lot::Mutex<String> = parking_lot::Mutex::new(String::new());

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// ingest | lookup | memory | aggregations | history | predict | runtimes | decoupling |
    /// priority | encryption | cluster | all, or several, comma-separated (`lookup,predict,decoupling`)
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
    #[arg(long)]
    pub kafka: Option<String>,
    /// `ingest` with `--kafka`: `kafka.idle_fetch_backoff` (a test broker that answers empty
    /// fetches at once needs ~20ms; a Kafka does not).
    #[arg(long, default_value = "0ms")]
    pub kafka_idle_fetch_backoff: String,
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

const FEATURES: usize = 32;

fn bench_config(dir: &std::path::Path) -> Result<quiver_core::Config> {
    Ok(quiver_core::Config::from_toml_with_env(
        &bench_config_text(dir),
        Vec::<(String, String)>::new(),
    )?)
}

/// The benchmarks' config as TOML (`cluster` writes it for its child processes).
fn bench_config_text(dir: &std::path::Path) -> String {
    let features = |range: std::ops::Range<usize>| -> String {
        range
            .map(|i| format!("{{ name = \"f{i}\", type = \"f64\" }}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{}"
[log]
partitions = 8
fsync = "batch"
[limits]
ingest_queue_events_max = 262144
[store]
snapshot_interval = "1h"
[models]
repository = "{models}"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "row"
entity = "user"
features = [{row}]
# `decoupling`: the same 32 features, owned by three upstream services.
[[view]]
name = "pay"
entity = "user"
features = [{pay}]
[[view]]
name = "sess"
entity = "user"
features = [{sess}]
[[view]]
name = "dev"
entity = "user"
features = [{dev}]
[[view]]
name = "txn"
entity = "user"
features = [{{ name = "amount", type = "f64" }}, {{ name = "merchant", type = "string" }}, {{ name = "count", type = "i64" }}, {{ name = "foreign", type = "bool" }}]
[[view]]
name = "txn_agg"
entity = "user"
allowed_lateness = "10m"
features = [{{ name = "amount", type = "f64" }}, {{ name = "merchant", type = "string" }}, {{ name = "count", type = "i64" }}, {{ name = "foreign", type = "bool" }}]
aggregations = [
  {{ name = "amount_sum_5m", of = "amount", fn = "sum", window = "5m" }},
  {{ name = "amount_count_1h", of = "amount", fn = "count", window = "1h" }},
  {{ name = "amount_max_24h", of = "amount", fn = "max", window = "24h", tile = "5m" }},
]
[[view]]
name = "day"
entity = "user"
features = [{{ name = "amount", type = "f64" }}]
aggregations = [{{ name = "amount_sum_24h", of = "amount", fn = "sum", window = "24h", tile = "5m" }}]
"#,
        dir.display(),
        row = features(0..FEATURES),
        pay = features(0..11),
        sess = features(11..22),
        dev = features(22..FEATURES),
        models = concat!(env!("CARGO_MANIFEST_DIR"), "/../../benchmarks/models"),
    )
}

/// A Quiver node serving HTTP on its own runtime, in this process.
pub(crate) struct Embedded {
    pub node: Arc<quiver_server::Node>,
    pub addr: std::net::SocketAddr,
    /// KServe V2 over gRPC (and `quiver.v1.Ingest`).
    pub grpc: std::net::SocketAddr,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Embedded {
    /// Opens `config` (whose data lives in `dir`, removed on drop) and serves it on a free
    /// loopback port, once the store has recovered.
    pub fn start(config: quiver_core::Config, dir: tempfile::TempDir) -> Result<Embedded> {
        let metrics = quiver_server::install_metrics();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("quiver-server")
            .build()?;
        let node = Arc::new(quiver_server::Node::open(config)?);
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let grpc_listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let grpc = grpc_listener.local_addr()?;
        let n = node.clone();
        runtime.spawn(async move {
            let forever = std::future::pending();
            quiver_server::serve_with(n, listener, Some(grpc_listener), metrics, forever).await
        });
        while !node.store.is_recovered() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Embedded {
            node,
            addr,
            grpc,
            _runtime: runtime,
            _dir: dir,
        })
    }
}

fn start_embedded() -> Result<Embedded> {
    start_embedded_with(|_| {})
}

/// An embedded node whose config `adjust` may change first (e.g. to add a history sink).
fn start_embedded_with(adjust: impl FnOnce(&mut quiver_core::Config)) -> Result<Embedded> {
    let dir = tempfile::tempdir()?;
    let mut config = bench_config(dir.path())?;
    adjust(&mut config);
    Embedded::start(config, dir)
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub(crate) async fn connect(addr: std::net::SocketAddr) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

pub(crate) async fn request(
    sender: &mut Sender,
    method: &str,
    uri: &str,
    body: Bytes,
) -> Result<(u16, Bytes)> {
    request_with(sender, method, uri, body, &[]).await
}

/// [`request`] with extra headers (credentials…).
pub(crate) async fn request_with(
    sender: &mut Sender,
    method: &str,
    uri: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Result<(u16, Bytes)> {
    sender.ready().await?;
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "quiver");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(Full::new(body))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Lets the workers warm up, opens the measured window for `duration` seconds, then tells them
/// to stop. Returns the measured window's length in seconds.
async fn measure_window(
    warmup: f64,
    duration: f64,
    measuring: &AtomicBool,
    stop: &AtomicBool,
) -> f64 {
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    elapsed
}

/// POSTs NDJSON lines to `/v1/events`, failing on anything but 200.
async fn post_events(sender: &mut Sender, lines: &[String]) -> Result<()> {
    let (status, body) =
        request(sender, "POST", "/v1/events", Bytes::from(lines.join("\n"))).await?;
    anyhow::ensure!(
        status == 200,
        "ingest failed: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(())
}

/// Loads the same `n` rows into Quiver's `row` view (key `e{i}`) and into Redis hashes
/// `{prefix}e{i}`: 32 f64 features `f{f}` = `value(i, f)`. Returns once Quiver has applied them.
async fn load_rows(
    addr: std::net::SocketAddr,
    node: &quiver_server::Node,
    redis: &redis::Client,
    prefix: &str,
    n: usize,
    value: impl Fn(usize, usize) -> f64,
) -> Result<redis::aio::MultiplexedConnection> {
    let mut sender = connect(addr).await?;
    let mut con = redis.get_multiplexed_async_connection().await?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut lines = Vec::with_capacity(chunk.len());
        let mut pipe = redis::pipe();
        for &i in chunk {
            let values: Vec<String> = (0..FEATURES)
                .map(|f| format!("\"f{f}\":{}", value(i, f)))
                .collect();
            lines.push(format!(
                r#"{{"view":"row","key":"e{i}","values":{{{}}}}}"#,
                values.join(",")
            ));
            let mut cmd = redis::cmd("HSET");
            cmd.arg(format!("{prefix}e{i}"));
            for f in 0..FEATURES {
                cmd.arg(format!("f{f}")).arg(value(i, f));
            }
            pipe.add_command(cmd).ignore();
        }
        post_events(&mut sender, &lines).await?;
        pipe.query_async::<()>(&mut con).await?;
    }
    wait_all_applied(node).await;
    Ok(con)
}

/// Leaves Redis as [`load_rows`] found it.
async fn clear_rows(
    con: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    n: usize,
) -> Result<()> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}e{i}")).collect();
    for chunk in keys.chunks(1000) {
        redis::cmd("DEL").arg(chunk).query_async::<()>(con).await?;
    }
    Ok(())
}

/// POSTs `body` with `ack=durable`, then waits (woken by the materializer's publish, not by
/// polling) until the store has applied it. Returns when the ack arrived, or `None` if the POST
/// was refused or not applied within `timeout`.
pub(crate) async fn post_durable_visible(
    http: &mut Sender,
    node: &quiver_server::Node,
    body: Bytes,
    timeout: Duration,
) -> Result<Option<Instant>> {
    let (status, reply) = request(http, "POST", "/v1/events?ack=durable", body).await?;
    let acked = Instant::now();
    if status != 200 {
        return Ok(None);
    }
    let reply: Value = serde_json::from_slice(&reply)?;
    let token = quiver_core::token::Token::parse(reply["token"].as_str().unwrap_or_default())?;
    Ok(node
        .store
        .wait_applied(&token, timeout)
        .await
        .then_some(acked))
}

/// Waits until the store has applied everything durable in the log.
async fn wait_all_applied(node: &quiver_server::Node) {
    let streams = node.log.streams().len() as u32;
    while (0..streams)
        .any(|s| node.store.applied_offset(s) < node.log.high_watermark(s).unwrap_or(0))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

pub fn run(args: BenchArgs) -> Result<()> {
    let scenarios: Vec<&str> = match args.scenario.as_str() {
        "memory-probe" => return memory_probe(&args),
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
    for s in scenarios {
        let r = match s {
            "ingest" => bench_ingest(&args, "txn")?,
            "lookup" => bench_lookup(&args)?,
            "memory" => bench_memory(&args)?,
            "aggregations" => bench_aggregations(&args)?,
            "history" => bench_history(&args)?,
            "runtimes" => crate::bench_runtimes::run(args.duration)?,
            "decoupling" => decoupling::run(&args)?,
            "priority" => priority::run(&args)?,
            "encryption" => bench_encryption(&args)?,
            "cluster" => cluster::run(&args)?,
            _ => bench_predict(&args)?,
        };
        results.insert(s.to_string(), r);
    }
    let results = Value::Object(results);
    let ratios = ratios(&results);
    if !ratios.is_empty() {
        say!("\n## verdict: Quiver ÷ peer, this run\n\n| ratio | value |\n|---|---|");
        for (name, v) in &ratios {
            say!("| `{name}` | {:.3} |", v.as_f64().unwrap_or(f64::NAN));
        }
    }
    let report = json!({
        "machine": machine(),
        "args": {"duration_s": args.duration, "warmup_s": args.warmup, "connections": args.connections, "entities": args.entities, "batch": args.batch, "rate": args.rate, "predict_rate": args.predict_rate, "write_batch": args.write_batch, "writers": args.writers, "levels": args.levels},
        "results": results,
        "ratios": ratios,
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
        println!("\nresults written to {}", path.display());
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, REPORT.lock().as_str())?;
        println!("tables written to {}", path.display());
    }
    Ok(())
}

/// Every scenario, in the order `all` runs them.
const ALL: [&str; 11] = [
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
];

/// The verdict a script reads: Quiver ÷ peer for each headline figure the run measured.
fn ratios(results: &Value) -> serde_json::Map<String, Value> {
    let pick = [
        (
            "lookup_throughput_vs_redis",
            "/lookup/uniform_throughput_vs_redis",
        ),
        ("lookup_p99_vs_redis", "/lookup/uniform_p99_vs_redis"),
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
            "priority_gold_p99_flooded_vs_unloaded",
            "/priority/tiered/gold_p99_flooded_vs_unloaded",
        ),
        (
            "priority_gold_p99_flooded_vs_unloaded_one_tier",
            "/priority/one_tier/gold_p99_flooded_vs_unloaded",
        ),
    ];
    pick.iter()
        .filter_map(|(name, at)| results.pointer(at).map(|v| (name.to_string(), v.clone())))
        .collect()
}

/// What the figures were measured on.
fn machine() -> Value {
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

/// The default version of a served model, as loaded (for peers that run the same model).
fn served_model(node: &quiver_server::Node, name: &str) -> Result<Arc<dyn quiver_model::Model>> {
    let served = node.models.get(name);
    served
        .as_ref()
        .and_then(|m| m.default_version().and_then(|v| m.versions.get(&v)))
        .and_then(|v| v.loaded.as_ref())
        .map(|l| l.model.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "benchmarks/models/{name} did not load: {:?}",
                served.and_then(|m| m.error.clone())
            )
        })
}

/// Durable ingest throughput and freshness, into `view` (`txn`, or `txn_agg`: the same
/// features with 3 window aggregations).
/// `ingest` on the embedded log and, with `--kafka`, on Kafka, in the same run.
fn bench_ingest(args: &BenchArgs, view: &'static str) -> Result<Value> {
    let embedded = ingest_on(args, view, "embedded", start_embedded()?)?;
    let Some(brokers) = &args.kafka else {
        return Ok(embedded);
    };
    let backoff = humantime::parse_duration(&args.kafka_idle_fetch_backoff)?;
    let kafka = ingest_on(
        args,
        view,
        "kafka",
        start_embedded_with(|c| {
            c.log.backend = quiver_core::config::LogBackend::Kafka;
            c.kafka.brokers = brokers.clone();
            c.kafka.topic_prefix = format!("quiver-bench-{}.", std::process::id());
            c.kafka.partitions = c.log.partitions;
            c.kafka.idle_fetch_backoff = quiver_core::config::HumanDuration(backoff);
        })?,
    )?;
    let ratio =
        |k: &str| kafka[k].as_f64().unwrap_or(f64::NAN) / embedded[k].as_f64().unwrap_or(f64::NAN);
    say!("\n### ingest: Kafka ÷ embedded (same load, same run)\n");
    say!("| metric | Kafka ÷ embedded |\n|---|---|");
    say!("| durable events/s | {:.2}× |", ratio("events_per_s"));
    say!("| POST p99 | {:.2}× |", ratio("post_p99_us"));
    say!(
        "| freshness ack→readable p99 | {:.2}× |",
        ratio("freshness_p99_us")
    );
    Ok(json!({"embedded": embedded, "kafka": kafka, "kafka_brokers": brokers}))
}

/// `encryption`: the same durable ingest on the embedded log plain and sealed
/// (`[storage] encryption_key_file`), in one run: what encryption at rest costs.
fn bench_encryption(args: &BenchArgs) -> Result<Value> {
    let keys = tempfile::tempdir()?;
    let key_file = keys.path().join("storage.keys");
    quiver_fsutil::seal::add_key(&key_file)?;
    let plain = ingest_on(args, "txn", "embedded", start_embedded()?)?;
    let sealed = ingest_on(
        args,
        "txn",
        "embedded, encrypted",
        start_embedded_with(|c| c.storage.encryption_key_file = Some(key_file.clone()))?,
    )?;
    let ratio =
        |k: &str| sealed[k].as_f64().unwrap_or(f64::NAN) / plain[k].as_f64().unwrap_or(f64::NAN);
    say!("\n### encryption at rest: encrypted ÷ plain (same load, same run)\n");
    say!("| metric | encrypted ÷ plain |\n|---|---|");
    say!("| durable events/s | {:.2}× |", ratio("events_per_s"));
    say!("| POST p99 | {:.2}× |", ratio("post_p99_us"));
    say!(
        "| freshness ack→readable p99 | {:.2}× |",
        ratio("freshness_p99_us")
    );
    Ok(json!({
        "plain": plain,
        "encrypted": sealed,
        "events_per_s_encrypted_vs_plain": ratio("events_per_s"),
        "freshness_p99_encrypted_vs_plain": ratio("freshness_p99_us"),
    }))
}

fn ingest_on(args: &BenchArgs, view: &'static str, backend: &str, q: Embedded) -> Result<Value> {
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let addr = q.addr;
    let node = q.node.clone();
    let (warmup, duration, conns, batch, rate) = (
        args.warmup,
        args.duration,
        args.connections,
        args.batch,
        args.rate,
    );
    let out = client_rt.block_on(async move {
        // Pre-built NDJSON bodies: the generator should spend its CPU sending, not formatting.
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            (0..64)
                .map(|b| {
                    let lines: Vec<String> = (0..batch)
                        .map(|i| {
                            format!(
                                r#"{{"view":"{view}","key":"u{}","values":{{"amount":{}.25,"merchant":"m{}","count":{},"foreign":{}}}}}"#,
                                (b * batch + i) % 1_000_000,
                                i,
                                i % 97,
                                i,
                                i % 2 == 0
                            )
                        })
                        .collect();
                    Bytes::from(lines.join("\n"))
                })
                .collect(),
        );
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let rejected = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (bodies, measuring, stop, events, rejected) = (bodies.clone(), measuring.clone(), stop.clone(), events.clone(), rejected.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                let mut h = histogram();
                let mut i = c;
                // Open loop: POSTs leave on a fixed schedule whatever the replies do; a POST
                // that is late counts its latency from when it was due (no coordinated omission).
                let period = (rate > 0.0).then(|| Duration::from_secs_f64(batch as f64 * conns as f64 / rate));
                let mut due = Instant::now() + period.map(|p| p.mul_f64(c as f64 / conns as f64)).unwrap_or_default();
                while !stop.load(Ordering::Relaxed) {
                    if period.is_some() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t = if period.is_some() { due } else { Instant::now() };
                    if let Some(p) = period {
                        due += p;
                    }
                    let body = bodies[i % bodies.len()].clone();
                    i += conns;
                    let (status, _) = request(&mut sender, "POST", "/v1/events?ack=durable", body).await?;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    if status == 200 {
                        events.fetch_add(batch as u64, Ordering::Relaxed);
                        h.record(t.elapsed().as_micros().max(1) as u64)?;
                    } else {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(h)
            }));
        }
        // Freshness probes: one event, ack=durable, then wait until the store has applied it.
        let probe = {
            let (measuring, stop, node) = (measuring.clone(), stop.clone(), node.clone());
            tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                let mut h = histogram();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body = Bytes::from(format!(r#"{{"view":"txn","key":"probe{}","values":{{"count":{i}}}}}"#, i % 64));
                    // Refused (503 while the load saturates ingest): that probe is skipped.
                    let Some(acked) = post_durable_visible(&mut sender, &node, body, Duration::from_secs(5)).await? else {
                        continue;
                    };
                    if measuring.load(Ordering::Relaxed) {
                        h.record(acked.elapsed().as_micros().max(1) as u64)?;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                anyhow::Ok(h)
            })
        };
        let elapsed = measure_window(warmup, duration, &measuring, &stop).await;
        let mut lat = histogram();
        for t in tasks {
            lat.add(t.await??)?;
        }
        let fresh = probe.await??;
        anyhow::Ok((events.load(Ordering::Relaxed) as f64 / elapsed, rejected.load(Ordering::Relaxed), lat, fresh))
    })?;
    let (rate, rejected, lat, fresh) = out;
    say!(
        "\n## ingest into `{view}`, {backend} log (ack=durable, {} connections × {} events per POST)\n",
        args.connections, args.batch
    );
    say!("| metric | value |\n|---|---|");
    say!("| durable events/s | {rate:.0} |");
    say!(
        "| POST latency p50 / p99 (ms) | {:.2} / {:.2} |",
        us(&lat, 0.5) / 1e3,
        us(&lat, 0.99) / 1e3
    );
    say!(
        "| freshness ack→readable p50 / p99 (µs) | {:.0} / {:.0} ({} probes) |",
        us(&fresh, 0.5),
        us(&fresh, 0.99),
        fresh.len()
    );
    say!("| rejected POSTs (503) | {rejected} |");
    q.node.shutdown();
    Ok(json!({
        "offered_events_per_s": args.rate,
        "events_per_s": rate,
        "post_p50_us": us(&lat, 0.5), "post_p99_us": us(&lat, 0.99),
        "freshness_p50_us": us(&fresh, 0.5), "freshness_p99_us": us(&fresh, 0.99), "freshness_probes": fresh.len(),
        "rejected_posts": rejected,
    }))
}

/// Zipf(s = 1) over `n` ranks by inverse CDF.
struct Zipf {
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
type Phase = (usize, &'static str, Peer, f64, Histogram<u64>, u64);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
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

type InferClient =
    quiver_server::inference_proto::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >;

async fn grpc_client(addr: std::net::SocketAddr) -> Result<InferClient> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(InferClient::new(channel))
}

/// The feature-join `ModelInfer` of entity `e{i}` on `gbdt32`.
fn grpc_request(i: usize) -> quiver_server::inference_proto::ModelInferRequest {
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
fn feast_body(features: &str, keys: &[String]) -> Bytes {
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

pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

fn bench_lookup(args: &BenchArgs) -> Result<Value> {
    let q = start_embedded()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
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
                    let (ops, h, errors) = closed_loop(
                        peer, dist, addr, None, &redis, &prefix, n, conns, warmup, duration,
                    )
                    .await?;
                    rows.push((round, dist, peer, ops, h, errors));
                }
            }
        }
        clear_rows(&mut con, &prefix, n).await?;
        anyhow::Ok(rows)
    })?;
    say!("\n## lookup: one entity × {FEATURES} f64 features, {} entities, {} connections, closed loop\n", n, args.connections);
    say!("median of {} round(s)\n", args.repeat.max(1));
    say!("| keys | system | ops/s | p50 µs | p99 µs | errors |\n|---|---|---|---|---|---|");
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
            say!("| {dist} | {name} | {ops:.0} | {p50:.0} | {p99:.0} | {errors} |");
            out.insert(
                format!("{dist}_{label}"),
                json!({"ops_per_s": ops, "p50_us": p50, "p99_us": p99, "errors": errors}),
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
        say!("\n{dist}: Quiver/Redis throughput {ratio_ops:.2}×, p99 {ratio_p99:.2}× (median of per-round ratios)");
        out.insert(format!("{dist}_throughput_vs_redis"), json!(ratio_ops));
        out.insert(format!("{dist}_p99_vs_redis"), json!(ratio_p99));
        // Feast's shape against the plain GET: requests/s at 1 entity, entities/s at 10.
        let feast_1 = per_round(4, 0, &ops);
        let feast_10 = per_round(5, 0, &ops) * 10.0;
        say!("{dist}: /get-online-features ÷ GET: 1 entity {feast_1:.2}× requests/s, 10 entities {feast_10:.2}× entities/s");
        out.insert(format!("{dist}_feast_1_vs_get"), json!(feast_1));
        out.insert(format!("{dist}_feast_10_entities_vs_get"), json!(feast_10));
    }
    q.node.shutdown();
    Ok(Value::Object(out))
}

#[allow(clippy::too_many_arguments)]
async fn closed_loop(
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
) -> Result<(f64, Histogram<u64>, u64)> {
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
    let elapsed = measure_window(warmup, duration, &measuring, &stop).await;
    let mut h = histogram();
    for t in tasks {
        h.add(t.await??)?;
    }
    Ok((
        ops.load(Ordering::Relaxed) as f64 / elapsed,
        h,
        errors.load(Ordering::Relaxed),
    ))
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The view a memory probe fills: `row` (32 f64 features) or `day` (one f64 feeding a 24 h
/// `sum` in 5-minute tiles).
const PROBE_VIEWS: [&str; 2] = ["row", "day"];

/// `quiver bench memory-probe --probe-view V --entities N` (hidden): fills a store with one
/// event per entity into `V` and prints `<resident bytes per entity> <raw bytes per entity>`.
/// It runs as its own process because in a process that already ran other scenarios the
/// allocator reuses what those freed without growing RSS, and the delta can read 0.
fn memory_probe(args: &BenchArgs) -> Result<()> {
    let view_name = args.probe_view.as_str();
    anyhow::ensure!(
        PROBE_VIEWS.contains(&view_name),
        "--probe-view must be one of {PROBE_VIEWS:?}"
    );
    let dir = tempfile::tempdir()?;
    let config = bench_config(dir.path())?;
    let schema = Arc::new(quiver_core::Schema::compile(&config)?);
    let store = quiver_store::Store::new(schema.clone(), config.log.partitions);
    let view = schema.view_id(view_name).expect("bench view");
    let width = schema.view(view).features.len();
    let n = args.entities.max(1);
    let mut dedup = quiver_store::DedupWindow::new(0);
    let mut buf = Vec::new();
    let mut raw = 0u64;
    let before = rss_bytes();
    for i in 0..n {
        let key = format!("e{i}");
        raw += (key.len() + width * 8) as u64;
        let event = quiver_core::event::Event {
            view,
            key,
            ts_ms: 1_800_000_000_000,
            event_id: None,
            values: (0..width as u16)
                .map(|f| (f, quiver_core::value::Value::F64(i as f64 + f64::from(f))))
                .collect(),
        };
        buf.clear();
        quiver_core::record::encode(&schema, &event, None, &mut buf);
        let rec = quiver_core::record::decode(&buf)?;
        let mut late = quiver_store::LateCounts::default();
        store.apply(
            store.partition_of(&event.key),
            i as u64,
            &rec,
            &mut dedup,
            &mut late,
        );
    }
    let per_entity = rss_bytes().saturating_sub(before) as f64 / n as f64;
    assert_eq!(store.rows(), n);
    say!("{per_entity} {}", raw as f64 / n as f64);
    Ok(())
}

/// Runs [`memory_probe`] in a child process: (resident, raw) bytes per entity.
fn probe_memory(view: &str, entities: usize) -> Result<(f64, f64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "memory-probe", "--probe-view", view])
        .args(["--entities", &entities.to_string()])
        .output()
        .context("starting the memory probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "memory probe failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut figures = stdout.split_whitespace().map(str::parse::<f64>);
    match (figures.next(), figures.next()) {
        (Some(Ok(resident)), Some(Ok(raw))) => Ok((resident, raw)),
        _ => anyhow::bail!("memory probe printed {stdout:?}"),
    }
}

/// Memory per entity: rows applied straight to a store (no HTTP, no log), RSS before/after.
fn bench_memory(args: &BenchArgs) -> Result<Value> {
    let n = args.entities.max(1);
    let (per_entity, raw_per) = probe_memory("row", n)?;
    say!("\n## memory: {n} entities × {FEATURES} f64 features\n");
    say!("| metric | value |\n|---|---|");
    say!("| resident bytes per entity | {per_entity:.0} |");
    say!("| raw bytes per entity (key + 8 per value) | {raw_per:.0} |");
    say!("| ratio | {:.2}× |", per_entity / raw_per);
    Ok(
        json!({"entities": n, "rss_bytes_per_entity": per_entity, "raw_bytes_per_entity": raw_per, "ratio": per_entity / raw_per}),
    )
}

/// Ingest with 3 window aggregations per view against the same view without them, in one
/// run (interleaved rounds, medians), and the memory one entity's 24 h window of 5-minute tiles
/// takes.
fn bench_aggregations(args: &BenchArgs) -> Result<Value> {
    let n = args.entities.max(1);
    let (per_entity, _) = probe_memory("day", n)?;
    let dir = tempfile::tempdir()?;
    let schema = quiver_core::Schema::compile(&bench_config(dir.path())?)?;
    let view = schema.view_id("day").expect("bench view");
    let ring_bytes = (schema.view(view).aggregations[0].window.ring_len() * 8) as f64;
    let mut plain = Vec::new();
    let mut aggregated = Vec::new();
    for _ in 0..args.repeat.max(1) {
        plain.push(
            bench_ingest(args, "txn")?["events_per_s"]
                .as_f64()
                .unwrap_or(0.0),
        );
        aggregated.push(
            bench_ingest(args, "txn_agg")?["events_per_s"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    let ratios: Vec<f64> = plain
        .iter()
        .zip(&aggregated)
        .map(|(p, a)| a / p.max(1e-9))
        .collect();
    let (plain, aggregated, ratio) = (median(plain), median(aggregated), median(ratios));

    say!(
        "\n## aggregations: ingest with 3 window aggregations vs none (median of {} round(s))\n",
        args.repeat.max(1)
    );
    say!("| view | durable events/s |\n|---|---|");
    say!("| `txn` (no aggregations) | {plain:.0} |");
    say!("| `txn_agg` (sum 5m, count 1h, max 24h in 5m tiles) | {aggregated:.0} |");
    say!("\nwith aggregations / without: **{ratio:.2}×** (median of per-round ratios)\n");
    say!("| memory, {n} entities, one `sum` over 24 h in 5-minute tiles | bytes |\n|---|---|");
    say!("| resident per entity | {per_entity:.0} |");
    say!("| of which the ring (289 tiles + 2 header slots, 8 bytes each) | {ring_bytes:.0} |");
    Ok(json!({
        "ingest_events_per_s_plain": plain,
        "ingest_events_per_s_3_aggregations": aggregated,
        "ingest_ratio_3_aggregations_vs_none": ratio,
        "memory_entities": n,
        "memory_bytes_per_entity_24h_5m_sum": per_entity,
        "ring_bytes": ring_bytes,
    }))
}

/// The history sink into PostgreSQL: how fast it drains a backlog (rows/s), and how far it
/// lags while `--rate` events/s (default 50k) are offered.
fn bench_history(args: &BenchArgs) -> Result<Value> {
    let table = format!("quiver_bench_history_{}", std::process::id());
    let pg = args.postgres.clone();
    let q = start_embedded_with(|c| {
        c.history.postgres_url = Some(pg.clone());
        c.history.table = table.clone();
    })?;
    let node = q.node.clone();
    let streams = node.log.streams().len() as u32;
    let lag = move |node: &quiver_server::Node| -> u64 {
        let h = node.history.as_ref().expect("history configured");
        (0..streams)
            .map(|s| {
                node.log
                    .high_watermark(s)
                    .unwrap_or(0)
                    .saturating_sub(h.committed_offset(s))
            })
            .sum()
    };
    let backlog = args.entities.max(1000);
    let rate = if args.rate > 0.0 { args.rate } else { 50_000.0 };
    let (conns, duration) = (args.connections, args.duration);
    let addr = q.addr;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pit_rows = args.pit_rows.max(1);
    let (drain_rows_per_s, lag_samples, offered_rate, catch_up_ms, pit_rows_per_s, bulk) = client_rt.block_on(async move {
        let body = |start: usize, n: usize| {
            let lines: Vec<String> = (start..start + n)
                .map(|i| format!(r#"{{"view":"txn","key":"u{}","values":{{"amount":{i}.25,"merchant":"m{}","count":{i},"foreign":false}}}}"#, i % 100_000, i % 97))
                .collect();
            Bytes::from(lines.join("\n"))
        };
        // Phase 1: a backlog as fast as ingest takes it, then time until the sink has it all.
        let started = Instant::now();
        let mut sender = connect(addr).await?;
        for b in (0..backlog).step_by(1000) {
            let (status, reply) = request(&mut sender, "POST", "/v1/events?ack=written", body(b, 1000.min(backlog - b))).await?;
            anyhow::ensure!(status == 200, "ingest failed: {}", String::from_utf8_lossy(&reply));
        }
        while lag(&node) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = backlog as f64 / started.elapsed().as_secs_f64();

        // Phase 2: `rate` events/s offered open-loop in batches of 100; sample the lag.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (stop, sent) = (stop.clone(), sent.clone());
            let period = Duration::from_secs_f64(100.0 * conns as f64 / rate);
            let bodies: Vec<Bytes> = (0..16).map(|i| body((c * 16 + i) * 100, 100)).collect();
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                let mut due = Instant::now() + period.mul_f64(c as f64 / conns as f64);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(due.into()).await;
                    due += period;
                    let (status, _) = request(&mut sender, "POST", "/v1/events?ack=durable", bodies[i % bodies.len()].clone()).await?;
                    i += 1;
                    if status == 200 {
                        sent.fetch_add(100, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            }));
        }
        let mut samples = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < duration {
            tokio::time::sleep(Duration::from_millis(50)).await;
            samples.push(lag(&node) as f64);
        }
        stop.store(true, Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        for t in tasks {
            t.await??;
        }
        let caught = Instant::now();
        while lag(&node) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let catch_up = caught.elapsed().as_secs_f64() * 1000.0;

        // Phase 3: point-in-time retrieval, 10,000 rows (2,000 entities × 5 instants) per
        // request, from PostgreSQL plus the log tail.
        let now = quiver_core::time::now_ms();
        let keys: Vec<String> = (0..10_000).map(|i| format!("u{}", (i / 5) * 37 % 100_000)).collect();
        let ts: Vec<i64> = (0..10_000).map(|i| now - (i % 5) * 2_000).collect();
        let body = Bytes::from(json!({"features": ["txn:amount", "txn:merchant", "txn:count"], "entities": {"user_id": keys}, "timestamps": ts}).to_string());
        let mut pit = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let (status, reply) = request(&mut sender, "POST", "/v1/features/historical", body.clone()).await?;
            anyhow::ensure!(status == 200, "historical read failed: {}", String::from_utf8_lossy(&reply));
            pit.push(10_000.0 / t.elapsed().as_secs_f64());
        }
        // Phase 4: bulk point-in-time retrieval of `pit_rows` entity rows, per semantics.
        let mut bulk = Vec::new();
        for semantics in ["event_time", "as_served"] {
            bulk.push(bulk_point_in_time(addr, pit_rows, now, semantics).await?);
        }
        anyhow::Ok((drain, samples, sent.load(Ordering::Relaxed) as f64 / elapsed, catch_up, median(pit), bulk))
    })?;
    q.node.shutdown();
    let mut client = postgres_client(&args.postgres)?;
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])?
        .get(0);
    client.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_migrations;"
    ))?;
    let mut sorted = lag_samples.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    say!("\n## history sink into PostgreSQL\n");
    say!("| metric | value |\n|---|---|");
    say!("| drain throughput ({backlog} events backlog) | {drain_rows_per_s:.0} rows/s |");
    say!("| offered / achieved ingest during the lag phase | {rate:.0} / {offered_rate:.0} events/s |");
    say!(
        "| sink lag p50 / p99 / max (records, sampled every 50 ms) | {:.0} / {:.0} / {:.0} |",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    say!(
        "| sink lag p99 in time at that rate | {:.1} ms |",
        pct(0.99) / rate.max(1.0) * 1000.0
    );
    say!("| catch-up after the load stops | {catch_up_ms:.0} ms |");
    say!("| rows in PostgreSQL | {rows} |");
    say!("| point-in-time retrieval (10,000 rows per request, median of 3) | {pit_rows_per_s:.0} rows/s |");
    for (semantics, rate) in ["event_time", "as_served"].iter().zip(&bulk) {
        say!("| bulk point-in-time, {pit_rows} entity rows, `{semantics}` (10,000 per request, 2 in flight) | {rate:.0} rows/s |");
    }
    Ok(json!({
        "point_in_time_bulk_rows": pit_rows,
        "point_in_time_bulk_event_time_rows_per_s": bulk[0],
        "point_in_time_bulk_as_served_rows_per_s": bulk[1],
        "drain_rows_per_s": drain_rows_per_s,
        "offered_events_per_s": rate,
        "achieved_events_per_s": offered_rate,
        "lag_records_p50": pct(0.5), "lag_records_p99": pct(0.99), "lag_records_max": pct(1.0),
        "catch_up_ms": catch_up_ms,
        "rows": rows,
        "point_in_time_rows_per_s": pit_rows_per_s,
    }))
}

/// `rows` entity rows over 100k entities retrieved point-in-time the way `quiver history` asks
/// (grouped by entity, chunks of 10,000, two requests in flight, each on its own connection);
/// rows/s over the whole retrieval.
async fn bulk_point_in_time(
    addr: std::net::SocketAddr,
    rows: usize,
    now: i64,
    semantics: &'static str,
) -> Result<f64> {
    const CHUNK: usize = 10_000;
    // A training set: `rows` (entity, timestamp) pairs over 100k entities in no particular
    // order, chunked as `quiver history` chunks them (an entity's rows together).
    let keys: Vec<u64> = (0..rows as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 100_000)
        .collect();
    let order = Arc::new(crate::history::grouped_by_key(&keys));
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (next, order, keys) = (next.clone(), order.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            loop {
                let start = next.fetch_add(CHUNK as u64, Ordering::Relaxed) as usize;
                if start >= rows {
                    return anyhow::Ok(());
                }
                let chunk = &order[start..(start + CHUNK).min(rows)];
                let ts: Vec<i64> = chunk.iter().map(|&i| now - (i as i64 % 5) * 2_000).collect();
                let keys: Vec<String> = chunk.iter().map(|&i| format!("u{}", keys[i])).collect();
                let body = json!({"features": ["txn:amount", "txn:merchant", "txn:count"], "entities": {"user_id": keys}, "timestamps": ts, "semantics": semantics});
                let (status, reply) = request(&mut sender, "POST", "/v1/features/historical", Bytes::from(body.to_string())).await?;
                anyhow::ensure!(status == 200, "historical read failed: {}", String::from_utf8_lossy(&reply));
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

fn postgres_client(url: &str) -> Result<postgres::Client> {
    Ok(postgres::Client::connect(url, postgres::NoTls)?)
}

/// One measured phase of `predict`: (round, path, ops/s, latencies, errors).
type PredictPhase = (usize, usize, f64, Histogram<u64>, u64);

/// Predict (lookup + a 100-tree depth-6 GBDT on the entity's 32 features) against the same
/// lookup alone, same keys and connections, interleaved rounds; plus the model's own per-row
/// time at batch 1 and 256, in process.
fn bench_predict(args: &BenchArgs) -> Result<Value> {
    let q = start_embedded()?;
    let model = served_model(&q.node, "gbdt32")?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
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
                let (ops, h, errors) = closed_loop(
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
                rows.push((round, peer as usize, ops, h, errors));
            }
        }
        clear_rows(&mut con, &prefix, n).await?;
        anyhow::Ok(rows)
    })?;
    // The model alone, in process, and onnxruntime on its ONNX export, on the same rows.
    let (b1, b256, ort) = crate::bench_runtimes::gbdt_per_row(model.as_ref(), duration)?;
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
    say!("\n## predict vs lookup: {n} entities × {FEATURES} features, {conns} connections, median of {repeat} round(s)\n");
    say!("| path | ops/s | p50 µs | p99 µs | errors |\n|---|---|---|---|---|");
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
        say!(
            "| {name} | {:.0} | {:.0} | {:.0} | {} |",
            pick(peer, &|r| r.2),
            pick(peer, &|r| us(&r.3, 0.5)),
            pick(peer, &|r| us(&r.3, 0.99)),
            rows.iter()
                .filter(|r| r.1 == peer)
                .map(|r| r.4)
                .sum::<u64>()
        );
    }
    let grpc_vs_http = per_round(Peer::V2Grpc as usize, Peer::V2Http as usize);
    say!("\npredict / lookup throughput: **{ratio:.2}×**; predict / Redis HGETALL: **{vs_redis:.2}×**; V2 gRPC / V2 HTTP infer: **{grpc_vs_http:.2}×**\n");
    let fmt = |x: Option<f64>| {
        x.map_or("— (pip install onnxruntime)".to_string(), |x| {
            format!("{x:.2}")
        })
    };
    say!("| model alone (100 trees, depth 6, 32 features), same 256 rows | Quiver µs per row | onnxruntime µs per row |\n|---|---|---|");
    say!(
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
