//! What the scenarios and `quiver demo` share: the benchmarks' config, a node served in this
//! process ([`Embedded`]) or as a `quiver serve` child ([`ServeChild`]), a minimal HTTP/1 client
//! and the waits that turn an ack into "readable".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::cpu;

pub const FEATURES: usize = 32;

pub fn bench_config(dir: &std::path::Path) -> Result<quiver_core::Config> {
    Ok(quiver_core::Config::from_toml_with_env(
        &bench_config_text(dir),
        Vec::<(String, String)>::new(),
    )?)
}

/// The benchmarks' config as TOML (`cluster` writes it for its child processes).
pub fn bench_config_text(dir: &std::path::Path) -> String {
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
# Snapshots run as in production (when a quarter of the rows changed), checked every second:
# their amortized cost is part of every figure.
snapshot_interval = "1s"
snapshot_change_ratio = 0.25
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
pub struct Embedded {
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

/// A `quiver serve` process of this binary, killed (`kill -9`) when dropped: a server whose
/// CPU is its own, apart from the load generator's.
pub struct ServeChild {
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
}

impl ServeChild {
    /// Writes `config` to `dir/quiver.toml`, starts `quiver serve` on `port` (stderr to
    /// `dir/stderr.log`) and returns once it listens.
    pub fn start(dir: &std::path::Path, config: &str, port: u16) -> Result<ServeChild> {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let path = dir.join("quiver.toml");
        std::fs::write(&path, config)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.join("stderr.log"))?))
            .spawn()?;
        // Killed on every early return from here on.
        let mut server = ServeChild {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        };
        let stdout = server.child.stdout.take().context("child stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        loop {
            let line = lines.next().with_context(|| {
                // The caller's temporary directory, log included, goes with the error: quote it.
                let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!("quiver exited before listening:\n{tail}")
            })??;
            if line.starts_with("quiver listening on ") {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(server)
    }
}

impl ServeChild {
    /// The process's CPU and memory now (`None` once it is gone).
    pub fn stat(&self) -> Option<quiver_core::telemetry::ProcessStat> {
        quiver_core::telemetry::ProcessStat::of(self.child.id())
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now (a child binds it a moment later).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn start_embedded() -> Result<Embedded> {
    start_embedded_with(|_| {})
}

/// An embedded node whose config `adjust` may change first (e.g. to add a history sink).
pub fn start_embedded_with(adjust: impl FnOnce(&mut quiver_core::Config)) -> Result<Embedded> {
    let dir = tempfile::tempdir()?;
    let mut config = bench_config(dir.path())?;
    adjust(&mut config);
    Embedded::start(config, dir)
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn connect(addr: std::net::SocketAddr) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

pub async fn request(
    sender: &mut Sender,
    method: &str,
    uri: &str,
    body: Bytes,
) -> Result<(u16, Bytes)> {
    request_with(sender, method, uri, body, &[]).await
}

/// [`request`] with extra headers (credentials…).
pub async fn request_with(
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
/// to stop. Returns the measured window's length in seconds and the CPU seconds `server`
/// spent in it.
pub async fn measure_window(
    (warmup, duration): (f64, f64),
    measuring: &AtomicBool,
    stop: &AtomicBool,
    server: &cpu::ServerCpu,
) -> (f64, Option<f64>) {
    tokio::time::sleep(Duration::from_secs_f64(warmup)).await;
    let cpu_before = server.seconds().await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = server.seconds().await;
    stop.store(true, Ordering::Relaxed);
    (elapsed, cpu_after.zip(cpu_before).map(|(a, b)| a - b))
}

/// POSTs NDJSON lines to `/v1/events`, failing on anything but 200.
pub async fn post_events(sender: &mut Sender, lines: &[String]) -> Result<()> {
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
pub async fn load_rows(
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
pub async fn clear_rows(
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
pub async fn post_durable_visible(
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
pub async fn wait_all_applied(node: &quiver_server::Node) {
    let streams = node.log.streams().len() as u32;
    while (0..streams)
        .any(|s| node.store.applied_offset(s) < node.log.high_watermark(s).unwrap_or(0))
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The default version of a served model, as loaded (for peers that run the same model).
pub fn served_model(
    node: &quiver_server::Node,
    name: &str,
) -> Result<Arc<dyn quiver_model::Model>> {
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

pub fn median(mut xs: Vec<f64>) -> f64 {
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

/// A server-CPU figure for a table: µs, or `—` when it could not be read.
pub fn cpu_text(us: Option<f64>) -> String {
    us.map_or("—".into(), |us| format!("{us:.1}"))
}

pub fn rss_bytes() -> u64 {
    quiver_core::telemetry::ProcessStat::own().map_or(0, |s| s.resident_bytes)
}

/// The read-your-writes token of an ingest reply.
pub fn token_of(reply: &[u8]) -> Result<quiver_core::token::Token> {
    let reply: Value = serde_json::from_slice(reply)?;
    Ok(quiver_core::token::Token::parse(
        reply["token"].as_str().unwrap_or_default(),
    )?)
}

/// Reads `path` with `Quiver-Read-After: token` until it answers 200 (`true`) or `wait`
/// passes (the server bounds each wait and answers 503 after it: asked again).
pub async fn visible(
    http: &mut Sender,
    path: &str,
    token: &quiver_core::token::Token,
    wait: Duration,
) -> Result<bool> {
    let (token, deadline) = (token.to_string(), Instant::now() + wait);
    loop {
        let headers = [(quiver_server::features::READ_AFTER, token.as_str())];
        match request_with(http, "GET", path, Bytes::new(), &headers)
            .await?
            .0
        {
            200 => return Ok(true),
            503 if Instant::now() < deadline => continue,
            _ => return Ok(false),
        }
    }
}
