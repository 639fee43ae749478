//! `quiver bench cluster`: what a cluster costs and how it places partitions.
//!
//! Computed (always): the ring's balance (max ÷ mean owner slots per node) for 3…100 nodes at
//! 256 vnodes, and the owner slots a join or a leave moves against the ideal 1/N.
//!
//! Live (with `--kafka BROKERS`): 1, 2 and 3 `quiver serve` processes of this binary on
//! loopback over one Kafka, replication 1 (so that node 1 owns some keys and forwards the
//! rest): closed-loop throughput and p50/p99 of single-entity reads and predicts for keys
//! node 1 owns (local) and keys it forwards one hop. All processes share this machine's
//! cores with the load generator: this measures the hop's overhead, not scaling. Then three
//! nodes with replication 2: one is killed (`kill -9`) and the time to the first successful
//! read of a key it was primary of, through a survivor, is measured, with the time until
//! the failure detector marks it down.

use std::net::SocketAddr;
use std::path::Path;

use quiver_cluster::ring::{self, Ring};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::harness::*;
use crate::load::{self, Window, Worker};
use crate::report::Report;
use crate::BenchArgs;

/// Partitions of the live cluster's topics.
const PARTITIONS: u32 = 12;
/// Entities loaded into the live cluster.
const ENTITIES: usize = 20_000;

pub fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let ring = ring_figures(report);
    let live = match &args.kafka {
        Some(brokers) => live(report, args, brokers)?,
        None => {
            say!(
                report,
                "\n(no `--kafka BROKERS`: the live cluster part is skipped)"
            );
            Value::Null
        }
    };
    Ok(json!({"ring": ring, "live": live}))
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

/// Balance and movement of the ring, computed: 1024 partitions, replication 2, 256 vnodes.
fn ring_figures(report: &mut Report) -> Value {
    const P: u32 = 1024;
    const R: usize = 2;
    const V: u32 = 256;
    say!(report, "\n## cluster: placement on the ring (computed: {P} partitions, replication {R}, {V} vnodes)\n");
    say!(report, "| nodes | max ÷ mean owner slots per node | slots moved by a join (ideal 1/(N+1)) | slots moved by a leave (ideal 1/N) |");
    say!(report, "|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for n in [3usize, 4, 5, 10, 20, 50, 100] {
        let nodes = ids(n);
        let place = Ring::new(&nodes, V).placement(P, R);
        let (max, mean) = ring::balance(&place, &nodes);
        let joined = Ring::new(&ids(n + 1), V).placement(P, R);
        let left = Ring::new(&ids(n - 1), V).placement(P, R);
        let slots = (P as usize * R) as f64;
        let join = ring::slots_moved(&place, &joined) as f64 / slots;
        let leave = ring::slots_moved(&place, &left) as f64 / slots;
        say!(
            report,
            "| {n} | {:.3} | {:.3} ({:.3}) | {:.3} ({:.3}) |",
            max as f64 / mean,
            join,
            1.0 / (n + 1) as f64,
            leave,
            1.0 / n as f64
        );
        rows.push(json!({"nodes": n, "max_over_mean": max as f64 / mean, "join_moved": join, "leave_moved": leave}));
    }
    Value::Array(rows)
}

/// One node of the live cluster.
struct Member {
    id: String,
    addr: SocketAddr,
    /// Killed (`kill -9`) when the member is dropped.
    _server: ServeChild,
}

/// Starts `n` nodes (replication `r`) over topics `{prefix}*` and waits until every node sees
/// every partition served by its owners.
fn start_cluster(
    dir: &Path,
    brokers: &str,
    prefix: &str,
    n: usize,
    r: usize,
) -> Result<Vec<Member>> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
    let nodes: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{{ id = \"n{}\", http = \"127.0.0.1:{p}\" }}", i + 1))
        .collect();
    let mut members = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let data = dir.join(format!("{prefix}{id}"));
        std::fs::create_dir_all(&data)?;
        let base = bench_config_text(&data);
        let text = format!(
            "[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{prefix}\"\npartitions = {PARTITIONS}\n\
             idle_fetch_backoff = \"20ms\"\n\n[cluster]\nself = \"{id}\"\nreplication = {r}\n\
             probe_interval = \"100ms\"\ndown_after = \"600ms\"\nnodes = [{}]\n{}",
            nodes.join(", "),
            base.replace("[log]\n", "[log]\nbackend = \"kafka\"\n")
        );
        let server = ServeChild::start(&data, &text, *port)?;
        members.push(Member {
            id,
            addr: server.addr,
            _server: server,
        });
    }
    Ok(members)
}

/// The cluster view of `addr` once every node is up and serves what it owns.
async fn converged(members: &[Member]) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut views = Vec::new();
        for m in members {
            if let Ok(mut s) = connect(m.addr).await {
                if let Ok((200, body)) = request(&mut s, "GET", "/v1/cluster", Bytes::new()).await {
                    views.push(serde_json::from_slice::<Value>(&body)?);
                }
            }
        }
        let done = views.len() == members.len()
            && views.iter().all(|v| {
                let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
                let serves = |id: &str, p: u64| {
                    nodes.iter().any(|n| {
                        n["id"] == id
                            && n["up"] == true
                            && n["serving"]
                                .as_array()
                                .is_some_and(|s| s.contains(&json!(p)))
                    })
                };
                v["partitions"].as_array().is_some_and(|ps| {
                    ps.iter().all(|p| {
                        let part = p["partition"].as_u64().unwrap_or(0);
                        p["owners"].as_array().is_some_and(|o| {
                            o.iter().all(|id| serves(id.as_str().unwrap_or(""), part))
                        })
                    })
                })
            });
        if done {
            return Ok(views.swap_remove(0));
        }
        anyhow::ensure!(Instant::now() < deadline, "the cluster did not converge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn owners(view: &Value, p: u32) -> Vec<String> {
    view["partitions"][p as usize]["owners"]
        .as_array()
        .map(|o| {
            o.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Loads `ENTITIES` rows (view `row`, key `e{i}`) through node 1 and waits until node 1 can
/// read the last of every partition's writes (`Quiver-Read-After`).
async fn load(members: &[Member]) -> Result<()> {
    let mut s = connect(members[0].addr).await?;
    let mut token = String::new();
    for chunk in (0..ENTITIES).collect::<Vec<_>>().chunks(1000) {
        let lines: Vec<String> = chunk
            .iter()
            .map(|i| {
                let v: Vec<String> = (0..FEATURES)
                    .map(|f| format!("\"f{f}\":{}.5", i + f))
                    .collect();
                format!(
                    r#"{{"view":"row","key":"e{i}","values":{{{}}}}}"#,
                    v.join(",")
                )
            })
            .collect();
        let (status, body) =
            request(&mut s, "POST", "/v1/events", Bytes::from(lines.join("\n"))).await?;
        anyhow::ensure!(status == 200, "ingest: {}", String::from_utf8_lossy(&body));
        token = serde_json::from_slice::<Value>(&body)?["token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
    }
    // The token bounds each wait (`request_timeout_max`); on a machine this loaded (the
    // nodes, the broker and the generator share its cores) one wait may not be enough.
    let deadline = Instant::now() + Duration::from_secs(60);
    for m in members {
        let mut s = connect(m.addr).await?;
        for i in [0, ENTITIES - 1] {
            loop {
                let (status, body) = request_with(
                    &mut s,
                    "GET",
                    &format!("/v1/features/row/e{i}"),
                    Bytes::new(),
                    &[("quiver-read-after", &token)],
                )
                .await?;
                if status == 200 {
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "entity e{i} not readable on {}: {status} {}",
                    m.id,
                    String::from_utf8_lossy(&body)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

/// Reads or predicts keys from a list, one connection each.
struct Caller {
    sender: Sender,
    keys: Arc<Vec<String>>,
    predict: bool,
}

impl Worker for Caller {
    async fn call(&mut self, seq: u64, _start: Instant) -> Result<bool> {
        let key = &self.keys[(seq as usize * 7919) % self.keys.len()];
        let (status, _) = if self.predict {
            let body = Bytes::from(format!(r#"{{"entities":{{"user_id":"{key}"}}}}"#));
            request(&mut self.sender, "POST", "/v1/models/gbdt32/predict", body).await?
        } else {
            request(
                &mut self.sender,
                "GET",
                &format!("/v1/features/row/{key}"),
                Bytes::new(),
            )
            .await?
        };
        Ok(status == 200)
    }
}

async fn measure(
    args: &BenchArgs,
    addr: SocketAddr,
    keys: &Arc<Vec<String>>,
    predict: bool,
) -> Result<load::Outcome> {
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        workers.push(Caller {
            sender: connect(addr).await?,
            keys: keys.clone(),
            predict,
        });
    }
    let window = Window::new(args.warmup, args.duration);
    Ok(load::drive(workers, None, &window).await?.0)
}

fn live(report: &mut Report, args: &BenchArgs, brokers: &str) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let runtime = crate::cpu::client_runtime()?;
    say!(report, "\n## cluster: local vs forwarded reads and predicts (replication 1, {} connections, closed loop; every node and the load generator share this machine)\n", args.connections);
    say!(report, "| nodes | call | keys | ops/s | p50 µs | p99 µs |");
    say!(report, "|---:|---|---|---:|---:|---:|");
    let mut rows = Vec::new();
    let run_id = std::process::id();
    for n in 1..=3usize {
        let prefix = format!("qbc{run_id}n{n}.");
        let members = start_cluster(dir.path(), brokers, &prefix, n, 1)?;
        runtime.block_on(async {
            let view = converged(&members).await?;
            load(&members).await?;
            let (mut local, mut remote) = (Vec::new(), Vec::new());
            for i in 0..ENTITIES {
                let k = format!("e{i}");
                let p = quiver_core::partition::partition_for(k.as_bytes(), PARTITIONS);
                if owners(&view, p).first().map(String::as_str) == Some("n1") {
                    local.push(k);
                } else {
                    remote.push(k);
                }
            }
            for (what, keys) in [("local", local), ("forwarded", remote)] {
                if keys.is_empty() {
                    continue;
                }
                let keys = Arc::new(keys);
                for predict in [false, true] {
                    let o = measure(args, members[0].addr, &keys, predict).await?;
                    let call = if predict { "predict" } else { "read" };
                    say!(report, "| {n} | {call} | {what} | {:.0} | {:.0} | {:.0} |", o.ops_per_s(), o.p(0.5), o.p(0.99));
                    rows.push(json!({"nodes": n, "call": call, "keys": what, "ops_per_s": o.ops_per_s(), "p50_us": o.p(0.5), "p99_us": o.p(0.99), "errors": o.errors}));
                }
            }
            anyhow::Ok(())
        })?;
    }
    let failover = runtime.block_on(failover(
        report,
        dir.path(),
        brokers,
        &format!("qbc{run_id}f."),
    ))?;
    Ok(json!({"calls": rows, "failover": failover}))
}

/// Three nodes, replication 2: kill -9 one; how soon a survivor serves its keys, and how
/// soon the detector calls it down.
async fn failover(report: &mut Report, dir: &Path, brokers: &str, prefix: &str) -> Result<Value> {
    let mut members = start_cluster(dir, brokers, prefix, 3, 2)?;
    let view = converged(&members).await?;
    load(&members).await?;
    let p = (0..PARTITIONS)
        .find(|&p| owners(&view, p).first().map(String::as_str) == Some("n3"))
        .context("n3 is primary of no partition")?;
    let key = (0..ENTITIES)
        .map(|i| format!("e{i}"))
        .find(|k| quiver_core::partition::partition_for(k.as_bytes(), PARTITIONS) == p)
        .context("no key in the partition")?;
    let victim = members.pop().context("three members")?;
    let killed = Instant::now();
    drop(victim); // kill -9
    let mut first_read = None;
    let mut down = None;
    while (first_read.is_none() || down.is_none()) && killed.elapsed() < Duration::from_secs(30) {
        let mut s = connect(members[0].addr).await?;
        if first_read.is_none() {
            if let Ok((200, _)) = request(
                &mut s,
                "GET",
                &format!("/v1/features/row/{key}"),
                Bytes::new(),
            )
            .await
            {
                first_read = Some(killed.elapsed());
            }
        }
        if down.is_none() {
            let (_, body) = request(&mut s, "GET", "/v1/cluster", Bytes::new()).await?;
            let v: Value = serde_json::from_slice(&body)?;
            let n3_up = v["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["id"] == "n3"))
                .map(|n| n["up"] == true);
            if n3_up == Some(false) {
                down = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    say!(
        report,
        "\n## cluster: one of three nodes killed (replication 2)\n"
    );
    say!(report, "| kill -9 → first successful read of its key via a survivor | kill -9 → marked down by the detector |");
    say!(report, "|---:|---:|");
    say!(
        report,
        "| {:.0} ms | {:.0} ms |",
        ms(first_read).unwrap_or(f64::NAN),
        ms(down).unwrap_or(f64::NAN)
    );
    Ok(json!({"first_replica_read_ms": ms(first_read), "marked_down_ms": ms(down)}))
}
