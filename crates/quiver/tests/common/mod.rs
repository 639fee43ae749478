//! Harness for end-to-end tests: the real `quiver` binary on a random loopback port.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_quiver");

pub const CONFIG: &str = r#"
[log]
partitions = 4
fsync = "batch"
segment_bytes = 65536

[store]
snapshot_interval = "1s"

[[entity]]
name = "user"
key = "user_id"

[[view]]
name = "txn"
entity = "user"
ttl = "1h"
features = [
  { name = "amount", type = "f64" },
  { name = "merchant", type = "string" },
  { name = "seq", type = "i64" },
]
"#;

/// `CONFIG` with a 200-event ingest queue, 100-event batches and an fsync per request, so a
/// few concurrent writers overflow the queue.
pub fn tiny_queue_config() -> String {
    CONFIG
        .replace("fsync = \"batch\"", "fsync = \"always\"")
        .replace(
            "[log]",
            "[limits]\ningest_queue_events_max = 200\nbatch_events_max = 100\n\n[log]",
        )
}

pub const PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";

/// `CONFIG` with the history sink writing to `table` in the test PostgreSQL.
pub fn history_config(table: &str, extra: &str) -> String {
    CONFIG.replace(
        "[log]",
        &format!("[history]\npostgres_url = \"{PG}\"\ntable = \"{table}\"\n{extra}\n[log]"),
    )
}

/// Rows and distinct log positions in a history table (0, 0 before it exists).
pub fn history_counts(client: &mut postgres::Client, table: &str) -> (i64, i64) {
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .unwrap()
        .get(0);
    if !exists {
        return (0, 0);
    }
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT (partition, log_offset)) FROM {table}"),
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

pub fn drop_history(client: &mut postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_migrations; \
             DROP TABLE IF EXISTS {table}_offsets; DROP TABLE IF EXISTS {table}_gaps;"
        ))
        .unwrap();
}

pub struct Server {
    pub child: Child,
    pub url: String,
    /// The client every helper sends with (a TLS test gives its own).
    pub http: reqwest::blocking::Client,
    /// `host:port` of the gRPC listener, when started with `--grpc-listen`.
    pub grpc: Option<String>,
    pub data_dir: PathBuf,
    config_path: PathBuf,
}

impl Server {
    /// Starts `quiver serve` with `config` (TOML) on a fresh port and waits until it is ready.
    pub fn start(dir: &Path, config: &str) -> Server {
        Server::start_args(dir, config, &[])
    }

    /// [`Server::start`] with extra `quiver serve` flags (e.g. `--grpc-listen 127.0.0.1:0`).
    pub fn start_args(dir: &Path, config: &str, args: &[&str]) -> Server {
        let config_path = dir.join("quiver.toml");
        std::fs::write(&config_path, config).unwrap();
        Server::start_with(dir, &config_path, args, client())
    }

    /// [`Server::start`] with the client the helpers send with (HTTPS, credentials…).
    pub fn start_client(dir: &Path, config: &str, http: reqwest::blocking::Client) -> Server {
        let config_path = dir.join("quiver.toml");
        std::fs::write(&config_path, config).unwrap();
        Server::start_with(dir, &config_path, &[], http)
    }

    /// [`Server::start_args`] with the client the helpers send with.
    pub fn start_args_client(
        dir: &Path,
        config: &str,
        args: &[&str],
        http: reqwest::blocking::Client,
    ) -> Server {
        let config_path = dir.join("quiver.toml");
        std::fs::write(&config_path, config).unwrap();
        Server::start_with(dir, &config_path, args, http)
    }

    /// [`Server::start`] logging at `rust_log` into `dir/quiver.log` (read it with
    /// [`Server::log`]) instead of the test's stderr.
    pub fn start_logged(dir: &Path, config: &str, rust_log: &str) -> Server {
        let config_path = dir.join("quiver.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("quiver.log")).unwrap();
        Server::spawn(
            dir,
            &config_path,
            &[],
            client(),
            (rust_log, Stdio::from(log)),
        )
    }

    /// What a [`Server::start_logged`] server has logged so far.
    pub fn log(&self) -> String {
        let dir = self.config_path.parent().unwrap();
        std::fs::read_to_string(dir.join("quiver.log")).unwrap()
    }

    fn start_with(
        dir: &Path,
        config_path: &Path,
        args: &[&str],
        http: reqwest::blocking::Client,
    ) -> Server {
        Server::spawn(dir, config_path, args, http, ("warn", Stdio::inherit()))
    }

    fn spawn(
        dir: &Path,
        config_path: &Path,
        args: &[&str],
        http: reqwest::blocking::Client,
        (rust_log, stderr): (&str, Stdio),
    ) -> Server {
        let data_dir = dir.join("data");
        // A test that names its address (a cluster member) gives `--listen` itself.
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(listen)
            .args(args)
            .arg("--config")
            .arg(config_path)
            .arg("--data-dir")
            .arg(&data_dir)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn quiver");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut grpc = None;
        let url = loop {
            let line = lines
                .next()
                .expect("quiver exited before listening")
                .unwrap();
            if let Some(addr) = line.strip_prefix("quiver grpc listening on ") {
                grpc = Some(addr.to_string());
            }
            if let Some(url) = line.strip_prefix("quiver listening on ") {
                break url.to_string();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let server = Server {
            child,
            url,
            http,
            grpc,
            data_dir,
            config_path: config_path.to_path_buf(),
        };
        server.wait_ready(Duration::from_secs(30));
        server
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.http.get(format!("{}/readyz", self.url)).send() {
                Ok(r) if r.status() == 200 => return,
                Ok(r) => last = format!("{} {}", r.status(), r.text().unwrap_or_default()),
                Err(e) => last = format!("{e:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server not ready after {timeout:?}: {last}");
    }

    /// `kill -9`: no shutdown, no final snapshot, no flush.
    pub fn kill9(mut self) -> PathBuf {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.config_path.parent().unwrap().to_path_buf()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> PathBuf {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "clean shutdown exits 0, got {exit}");
        self.config_path.parent().unwrap().to_path_buf()
    }

    /// Restarts on the same data directory and config (new port).
    pub fn restart(dir: &Path) -> Server {
        Server::start_with(dir, &dir.join("quiver.toml"), &[], client())
    }

    /// Restarts on the same data directory and config with `args` (e.g. the same `--listen`).
    pub fn restart_args(dir: &Path, args: &[&str]) -> Server {
        Server::start_with(dir, &dir.join("quiver.toml"), args, client())
    }

    /// Sends SIGHUP (the config is reread).
    pub fn hup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.post_with(path, body, &[])
    }

    pub fn post_with(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        send(
            self.http
                .post(format!("{}{path}", self.url))
                .body(body.to_string()),
            headers,
        )
    }

    pub fn put(&self, path: &str, body: &str) -> (u16, Value) {
        send(
            self.http
                .put(format!("{}{path}", self.url))
                .body(body.to_string()),
            &[],
        )
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.get_with(path, &[])
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        send(self.http.get(format!("{}{path}", self.url)), headers)
    }

    /// `/metrics` as Prometheus text.
    pub fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let text = self.metrics_text();
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The sum of a metric's series whose labels contain `label` (e.g. `reason="mismatch"`).
    pub fn metric_with(&self, name: &str, label: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| {
                l.starts_with(name) && l[name.len()..].starts_with('{') && l.contains(label)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Resident memory of the server process, from /proc.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        kb * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends with `headers`; the reply as JSON (or as a JSON string if it is not JSON).
fn send(mut req: reqwest::blocking::RequestBuilder, headers: &[(&str, &str)]) -> (u16, Value) {
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Runs the binary with `args`, returning (success, stdout, stderr).
pub fn quiver(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

pub fn event(key: &str, seq: i64, event_id: Option<&str>) -> String {
    let id = event_id
        .map(|id| format!(r#","event_id":"{id}""#))
        .unwrap_or_default();
    format!(
        r#"{{"view":"txn","key":"{key}","values":{{"amount":{}.5,"seq":{seq}}}{id}}}"#,
        seq
    )
}

/// Reads `seq` of each key through the Feast-shaped endpoint; `None` where not PRESENT.
pub fn read_seqs(server: &Server, keys: &[String]) -> Vec<Option<i64>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(1000) {
        let body = serde_json::json!({"features": ["txn:seq"], "entities": {"user_id": chunk}});
        let (status, v) = server.post("/v1/features", &body.to_string());
        assert_eq!(status, 200, "{v}");
        let col = &v["results"][1];
        for (i, val) in col["values"].as_array().unwrap().iter().enumerate() {
            out.push((col["statuses"][i] == "PRESENT").then(|| val.as_i64().unwrap()));
        }
    }
    out
}

/// Waits (at most 10 s) until `read_seqs` of `keys` equals `want`.
pub fn wait_seqs(server: &Server, keys: &[String], want: &[Option<i64>]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = read_seqs(server, keys);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reads stayed at {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub use quiver_testkit::{client_python, KafkaBroker};

/// `config` with Kafka as the log: `broker`, 4 partitions, topics prefixed `prefix`. The test
/// broker answers fetches at once when idle (no long poll), so readers pause 20 ms when they
/// find nothing (`kafka.idle_fetch_backoff`) instead of spinning.
pub fn kafka_config(config: &str, broker: &KafkaBroker, prefix: &str) -> String {
    config.replace(
        "[log]",
        &format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\npartitions = 4\nidle_fetch_backoff = \"20ms\"\n\n[log]\nbackend = \"kafka\"",
            broker.addr()
        ),
    )
}

/// Runs a client script from `tests/python/` with `args`; panics with its output on failure.
pub fn run_client_script(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = Command::new(client_python())
        .arg(&path)
        .args(args)
        .output()
        .expect("run the client script");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed:\n{text}");
    text
}

/// A key made by the real CLI; the key is printed once, on stdout.
pub fn key(data: &Path, name: &str, roles: &[&str], tier: Option<&str>) -> String {
    let keys = data.join("keys.toml");
    let mut args = vec![
        "keys",
        "create",
        "--keys-file",
        keys.to_str().unwrap(),
        "--name",
        name,
    ];
    for r in roles {
        args.extend(["--role", r]);
    }
    if let Some(t) = tier {
        args.extend(["--tier", t]);
    }
    let (ok, stdout, stderr) = quiver(&args);
    assert!(ok, "{stderr}");
    stdout.trim().to_string()
}

/// `quiver serve` with `config` (written to `dir/quiver.toml`, data in `dir/data`), expected
/// to refuse to start: its stderr.
pub fn serve_refused(dir: &Path, config: &str) -> String {
    std::fs::write(dir.join("quiver.toml"), config).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(dir.join("quiver.toml"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "the server started: {text}");
    text
}

/// Calls gRPC method `path` with one empty message (unary, client-, server- or bidi-streaming
/// alike: the security layer answers before a message is read), with `bearer`'s credentials
/// and a `grpc-timeout`, and returns the status code (`Ok` if the call was answered).
pub async fn grpc_call(
    channel: tonic::transport::Channel,
    path: &str,
    bearer: Option<&str>,
    timeout: Option<Duration>,
) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path.to_string()).unwrap();
    let mut req = tonic::Request::new(tokio_stream::iter(vec![()]));
    if let Some(t) = bearer {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    match grpc.streaming(req, path, codec).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every `*.snap` file under `dir`.
pub fn snapshot_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(snapshot_files(&path));
        } else if path.extension().is_some_and(|e| e == "snap") {
            out.push(path);
        }
    }
    out
}

/// Every feature of `keys` as the server serves them (values, statuses, event times,
/// versions; not the ages, which depend on when they are read).
pub fn read_all(server: &Server, view: &str, keys: &[String]) -> Vec<serde_json::Value> {
    keys.iter()
        .map(|k| {
            let (status, mut v) = server.get(&format!("/v1/features/{view}/{k}"));
            assert_eq!(status, 200, "{v}");
            for feature in v["features"].as_object_mut().unwrap().values_mut() {
                assert!(feature.as_object_mut().unwrap().remove("age_ms").is_some());
            }
            v
        })
        .collect()
}
