//! A cluster of real `quiver` processes over the test Kafka broker (DESIGN.md §6): any node
//! answers any key (one hop to an owner, loops refused), many-key reads and predicts split
//! by owner and merged in order, read-your-writes across nodes, a node killed under load
//! costs no request past one client retry and no event, a restarted node rejoins, and a
//! fourth node joins by SIGHUP with about 1/N of the partitions moving and no read missing.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use quiver_core::partition::partition_for;
use quiver_testkit::free_port;
use serde_json::{json, Value};

const PARTITIONS: u32 = 12;

const VIEWS: &str = r#"
[store]
snapshot_interval = "500ms"

[server]
read_after_wait_ms_max = 3000

[[entity]]
name = "user"
key = "user_id"

[[view]]
name = "txn"
entity = "user"
ttl = "1h"
allowed_lateness = "1h"
features = [
  { name = "amount", type = "f64" },
  { name = "seq", type = "i64" },
]

[[entity]]
name = "device"
key = "device_id"

[[view]]
name = "dev"
entity = "device"
features = [{ name = "risk", type = "f64" }, { name = "os", type = "string" }]
aggregations = [{ name = "risk_n", of = "risk", fn = "count", window = "1h" }]
"#;

/// A model over `txn:amount` and `txn:seq` (the XGBoost fixture, 32 inputs).
fn repository(dir: &Path) -> PathBuf {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/xgb_binary.json"
    );
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("fraud/1")).unwrap();
    std::fs::copy(fixture, models.join("fraud/1/model.json")).unwrap();
    let mut inputs = vec![
        r#"{ feature = "txn:amount", default = -7.0 }"#.to_string(),
        r#"{ feature = "txn:seq", default = -1.0 }"#.to_string(),
    ];
    inputs.extend((2..32).map(|i| format!(r#"{{ feature = "request:r{i}", default = 0.0 }}"#)));
    let config = format!(
        "runtime = \"xgboost\"\ninputs = [{}]\noutputs = [{{ name = \"probability\" }}]\n",
        inputs.join(", ")
    );
    std::fs::write(models.join("fraud/config.toml"), config).unwrap();
    // A model over two entities: the user's amount and the device's risk.
    std::fs::create_dir_all(models.join("two/1")).unwrap();
    std::fs::copy(fixture, models.join("two/1/model.json")).unwrap();
    let mut inputs = vec![
        r#"{ feature = "txn:amount", default = -7.0 }"#.to_string(),
        r#"{ feature = "dev:risk", default = -9.0 }"#.to_string(),
    ];
    inputs.extend((2..32).map(|i| format!(r#"{{ feature = "request:r{i}", default = 0.0 }}"#)));
    let config = format!(
        "runtime = \"xgboost\"\ninputs = [{}]\noutputs = [{{ name = \"probability\" }}]\n",
        inputs.join(", ")
    );
    std::fs::write(models.join("two/config.toml"), config).unwrap();
    models
}

/// The members of a test cluster: ids and fixed loopback ports.
struct Members {
    ids: Vec<String>,
    ports: Vec<u16>,
    /// More config for every node (e.g. `[history]`).
    extra: String,
}

impl Members {
    fn new(n: usize) -> Members {
        Members {
            ids: (1..=n).map(|i| format!("n{i}")).collect(),
            ports: (0..n).map(|_| free_port()).collect(),
            extra: String::new(),
        }
    }

    fn add(&mut self) {
        self.ids.push(format!("n{}", self.ids.len() + 1));
        self.ports.push(free_port());
    }

    /// Node `i`'s config: Kafka as the log, `[cluster]` with every member.
    fn config(&self, i: usize, broker: &KafkaBroker, models: &Path) -> String {
        let nodes: Vec<String> = self
            .ids
            .iter()
            .zip(&self.ports)
            .map(|(id, port)| format!("  {{ id = \"{id}\", http = \"127.0.0.1:{port}\" }},"))
            .collect();
        format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"cl.\"\npartitions = {PARTITIONS}\n\
             idle_fetch_backoff = \"20ms\"\n\n[log]\nbackend = \"kafka\"\n\n\
             [models]\nrepository = \"{}\"\n\n\
             [cluster]\nself = \"{}\"\nreplication = 2\nvnodes = 64\n\
             probe_interval = \"100ms\"\ndown_after = \"600ms\"\nforward_timeout = \"1s\"\n\
             nodes = [\n{}\n]\n{}\n{VIEWS}",
            broker.addr(),
            models.display(),
            self.ids[i],
            nodes.join("\n"),
            self.extra,
        )
    }

    fn listen(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }
}

/// A test's directory, its Kafka broker, and the model repository in it.
fn setup() -> (tempfile::TempDir, KafkaBroker, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let models = repository(dir.path());
    (dir, broker, models)
}

/// Starts member `i` in `root/<id>`.
fn start(root: &Path, m: &Members, i: usize, broker: &KafkaBroker, models: &Path) -> Server {
    let dir = root.join(&m.ids[i]);
    std::fs::create_dir_all(&dir).unwrap();
    let listen = m.listen(i);
    Server::start_args(&dir, &m.config(i, broker, models), &["--listen", &listen])
}

/// Waits until every node sees every other as up and every partition served by its owners.
fn wait_converged(nodes: &[&Server], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let views: Vec<Value> = nodes.iter().map(|n| n.get("/v1/cluster").1).collect();
        let converged = views.iter().all(|v| {
            let serving: HashMap<&str, Vec<u64>> = v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let s = n["serving"]
                        .as_array()
                        .map_or(vec![], |a| a.iter().filter_map(Value::as_u64).collect());
                    (n["id"].as_str().unwrap(), s)
                })
                .collect();
            v["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|n| n["up"] == true)
                && v["draining"] == json!([])
                && v["partitions"].as_array().unwrap().iter().all(|p| {
                    let part = p["partition"].as_u64().unwrap();
                    p["owners"].as_array().unwrap().iter().all(|o| {
                        serving
                            .get(o.as_str().unwrap())
                            .is_some_and(|s| s.contains(&part))
                    })
                })
        });
        if converged {
            return views.into_iter().next().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the cluster did not converge: {views:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn owners_of(view: &Value, partition: u32) -> Vec<String> {
    view["partitions"][partition as usize]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect()
}

fn ingest(server: &Server, events: &[(String, i64)]) -> String {
    let body: Vec<String> = events.iter().map(|(k, s)| event(k, *s, None)).collect();
    let (status, reply) = server.post("/v1/events", &body.join("\n"));
    assert_eq!(status, 200, "{reply}");
    reply["token"].as_str().unwrap().to_string()
}

#[test]
fn any_node_answers_any_key_one_hop_reads_your_writes_and_refuses_loops() {
    let (dir, broker, models) = setup();
    let m = Members::new(3);
    let nodes: Vec<Server> = (0..3)
        .map(|i| start(dir.path(), &m, i, &broker, &models))
        .collect();
    let refs: Vec<&Server> = nodes.iter().collect();
    let view = wait_converged(&refs, Duration::from_secs(30));
    for p in 0..PARTITIONS {
        let owners = owners_of(&view, p);
        assert_eq!(owners.len(), 2, "replication 2");
        assert_ne!(owners[0], owners[1]);
    }

    // Each node ingests a third; every node then reads every key after the writer's token.
    let keys: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
    let mut tokens = Vec::new();
    for (i, chunk) in keys.chunks(20).enumerate() {
        let events: Vec<(String, i64)> = chunk.iter().map(|k| (k.clone(), 10 + i as i64)).collect();
        tokens.push(ingest(&nodes[i], &events));
    }
    let mut forwarded = 0;
    for (i, node) in nodes.iter().enumerate() {
        for (j, k) in keys.iter().enumerate() {
            let token = &tokens[j / 20];
            let r = node
                .http
                .get(format!("{}/v1/features/txn/{k}", node.url))
                .header("Quiver-Read-After", token)
                .send()
                .unwrap();
            let by = r.headers()["quiver-served-by"]
                .to_str()
                .unwrap()
                .to_string();
            assert_eq!(r.status(), 200, "{k} on n{}", i + 1);
            let v: Value = r.json().unwrap();
            assert_eq!(
                v["features"]["seq"]["value"],
                json!(10 + (j / 20) as i64),
                "{v}"
            );
            let p = partition_for(k.as_bytes(), PARTITIONS);
            let owners = owners_of(&view, p);
            assert!(
                owners.contains(&by),
                "{k} (partition {p}) answered by {by}, owners {owners:?}"
            );
            if by != m.ids[i] {
                forwarded += 1;
            }
        }
    }
    assert!(forwarded > 0, "some reads were forwarded");

    // A batch read from one node: split by owner, merged in request order.
    let mut batch_keys: Vec<Value> = keys.iter().map(|k| json!(k)).collect();
    batch_keys.insert(7, json!("nobody"));
    let body = json!({"features": ["txn:seq"], "entities": {"user_id": batch_keys}});
    let (status, v) = nodes[1].post("/v1/features", &body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["results"][0]["values"], json!(batch_keys));
    let seqs = v["results"][1]["values"].as_array().unwrap();
    let statuses = v["results"][1]["statuses"].as_array().unwrap();
    for (row, k) in batch_keys.iter().enumerate() {
        match keys.iter().position(|x| x == k) {
            Some(j) => {
                assert_eq!(seqs[row], json!(10 + (j / 20) as i64), "row {row}");
                assert_eq!(statuses[row], "PRESENT");
            }
            None => assert_eq!(statuses[row], "NOT_FOUND"),
        }
    }
    // Feast's route splits alike.
    let (status, f) = nodes[2].post("/get-online-features", &body.to_string());
    assert_eq!(status, 200, "{f}");
    assert_eq!(f["results"], v["results"]);

    // Predicts: one instance goes whole to an owner; a list is split and merged in order.
    for k in keys.iter().take(12) {
        let body = json!({"entities": {"user_id": k}}).to_string();
        let (status, p) = nodes[0].post("/v1/models/fraud/predict", &body);
        assert_eq!(status, 200, "{p}");
        assert_eq!(p["missing"], json!([]), "features found on the owner: {p}");
    }
    let instances: Vec<Value> = keys
        .iter()
        .take(24)
        .map(|k| json!({"entities": {"user_id": k}}))
        .collect();
    let (status, batch) = nodes[0].post(
        "/v1/models/fraud/predict",
        &json!({"instances": instances}).to_string(),
    );
    assert_eq!(status, 200, "{batch}");
    let predictions = batch["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 24);
    for (k, p) in keys.iter().zip(predictions) {
        let body = json!({"entities": {"user_id": k}}).to_string();
        let (_, one) = nodes[2].post("/v1/models/fraud/predict", &body);
        assert_eq!(
            p["outputs"], one["outputs"],
            "{k}: same answer split or whole"
        );
        assert_eq!(p["missing"], json!([]));
    }

    // A forwarded request is answered or refused, never forwarded again.
    let p_not_on_n1 = (0..PARTITIONS)
        .find(|&p| !owners_of(&view, p).contains(&"n1".to_string()))
        .expect("n1 does not own every partition");
    let k = keys
        .iter()
        .find(|k| partition_for(k.as_bytes(), PARTITIONS) == p_not_on_n1)
        .expect("a key in that partition");
    let (status, e) = nodes[0].get_with(&format!("/v1/features/txn/{k}"), &[("Quiver-Hop", "1")]);
    assert_eq!(status, 503, "{e}");
    assert_eq!(e["error"]["code"], "FORWARD_LOOP");
    let (status, _) = nodes[0].get(&format!("/v1/features/txn/{k}"));
    assert_eq!(status, 200, "without the hop header it is forwarded");
    let (status, v) =
        nodes[1].get_with(&format!("/v1/features/txn/{k}"), &[("Quiver-Max-Lag", "0")]);
    assert_eq!(status, 200, "caught-up owners are within any bound: {v}");
    let (status, e) =
        nodes[0].get_with(&format!("/v1/features/txn/{k}"), &[("Quiver-Max-Lag", "x")]);
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("BAD_PARAMETER"))
    );
    for n in nodes {
        n.stop();
    }
}

/// `quiver_cluster_forwarded_total{ok="true"}` of a node, over its peers.
fn forwarded_total(n: &Server) -> f64 {
    let text = n
        .http
        .get(format!("{}/metrics", n.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("quiver_cluster_forwarded_total{") && l.contains("ok=\"true\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads `key` from node `first`, retrying once on the next node (what a client does).
fn read_with_one_retry(
    http: &reqwest::blocking::Client,
    urls: &[String],
    first: usize,
    key: &str,
) -> Result<Value, String> {
    let mut last = String::new();
    for attempt in 0..2 {
        let url = &urls[(first + attempt) % urls.len()];
        match http
            .get(format!("{url}/v1/features/txn/{key}"))
            .timeout(Duration::from_secs(3))
            .send()
        {
            Ok(r) if r.status() == 200 => return Ok(r.json().unwrap()),
            Ok(r) if r.status() == 404 => return Ok(Value::Null),
            Ok(r) => last = format!("{} {}", r.status(), r.text().unwrap_or_default()),
            Err(e) => last = format!("{e}"),
        }
    }
    Err(last)
}

#[test]
fn killing_one_of_three_nodes_under_load_fails_nothing_past_one_retry_and_loses_nothing() {
    let (dir, broker, models) = setup();
    let m = Members::new(3);
    let mut nodes: Vec<Option<Server>> = (0..3)
        .map(|i| Some(start(dir.path(), &m, i, &broker, &models)))
        .collect();
    let view = {
        let refs: Vec<&Server> = nodes.iter().flatten().collect();
        wait_converged(&refs, Duration::from_secs(30))
    };
    let urls: Vec<String> = nodes.iter().flatten().map(|n| n.url.clone()).collect();
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    // The last acknowledged seq per key; writers go round the nodes, retrying once.
    let acked: Arc<Mutex<BTreeMap<String, i64>>> = Arc::default();
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let reads = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, acked, failures, urls, keys) = (
            stop.clone(),
            acked.clone(),
            failures.clone(),
            urls.clone(),
            keys.clone(),
        );
        std::thread::spawn(move || {
            let http = client();
            let mut seq = 0i64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let k = &keys[seq as usize % keys.len()];
                let body = event(k, seq, Some(&format!("e{seq}")));
                let mut ok = false;
                for attempt in 0..2 {
                    let url = &urls[(seq as usize + attempt) % urls.len()];
                    let sent = http
                        .post(format!("{url}/v1/events"))
                        .body(body.clone())
                        .timeout(Duration::from_secs(5))
                        .send();
                    if sent.is_ok_and(|r| r.status() == 200) {
                        ok = true;
                        break;
                    }
                }
                if ok {
                    acked.lock().unwrap().insert(k.clone(), seq);
                } else {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("write {k} seq {seq}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let reader = {
        let (stop, failures, urls, keys, reads) = (
            stop.clone(),
            failures.clone(),
            urls.clone(),
            keys.clone(),
            reads.clone(),
        );
        std::thread::spawn(move || {
            let http = client();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = &keys[i % keys.len()];
                if let Err(e) = read_with_one_retry(&http, &urls, i, k) {
                    failures.lock().unwrap().push(format!("read {k}: {e}"));
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    // n3 dies; a key whose primary was n3 must be served by its replica within 2 s.
    let p3 = (0..PARTITIONS)
        .find(|&p| owners_of(&view, p)[0] == "n3")
        .expect("n3 is the primary of some partition");
    let k3 = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|k| partition_for(k.as_bytes(), PARTITIONS) == p3)
        .unwrap();
    let token = ingest(nodes[0].as_ref().unwrap(), &[(k3.clone(), 1)]);
    let victim = nodes[2].take().unwrap();
    let killed = Instant::now();
    victim.kill9();
    let survivor = nodes[0].as_ref().unwrap();
    let watcher = {
        let url = survivor.url.clone();
        std::thread::spawn(move || {
            let http = client();
            loop {
                let v: Value = http
                    .get(format!("{url}/v1/cluster"))
                    .send()
                    .unwrap()
                    .json()
                    .unwrap();
                if v["nodes"][2]["up"] == false {
                    return killed.elapsed();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let failover = loop {
        let (status, _) = survivor.get_with(
            &format!("/v1/features/txn/{k3}"),
            &[("Quiver-Read-After", &token)],
        );
        if status == 200 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no failover: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        failover <= Duration::from_secs(2),
        "failover took {failover:?}"
    );
    let detected = watcher.join().unwrap();
    // down_after 600 ms + probe_interval 100 ms, with room for a loaded 2-core machine.
    assert!(
        detected <= Duration::from_secs(2),
        "marked down after {detected:?}"
    );
    std::thread::sleep(Duration::from_secs(2));

    // n3 restarts on its data (snapshot + Kafka) and rejoins.
    let dir3 = dir.path().join("n3");
    let listen = m.listen(2);
    nodes[2] = Some(Server::restart_args(&dir3, &["--listen", &listen]));
    {
        let refs: Vec<&Server> = nodes.iter().flatten().collect();
        wait_converged(&refs, Duration::from_secs(30));
    }
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    reader.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed past one retry: {failures:?}",
        failures.len()
    );
    assert!(reads.load(Ordering::Relaxed) > 100, "the readers read");

    // Nothing acknowledged is lost: every node has every key's last acknowledged seq.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() == keys.len(), "every key was written");
    for n in nodes.iter().flatten() {
        for (k, seq) in &acked {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (status, v) = n.get(&format!("/v1/features/txn/{k}"));
                if status == 200 && v["features"]["seq"]["value"] == json!(seq) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{k}: want seq {seq}, got {status} {v}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    eprintln!(
        "failover (kill -9 → first replica read): {failover:?}; marked down after {detected:?}"
    );
    assert!(
        forwarded_total(nodes[0].as_ref().unwrap()) > 0.0,
        "quiver_cluster_forwarded_total counts the hops"
    );
    for n in nodes.into_iter().flatten() {
        n.stop();
    }
}

#[test]
fn a_fourth_node_joins_by_sighup_moving_about_a_quarter_with_no_read_missing() {
    let (dir, broker, models) = setup();
    let mut m = Members::new(3);
    let mut nodes: Vec<Server> = (0..3)
        .map(|i| start(dir.path(), &m, i, &broker, &models))
        .collect();
    let before = {
        let refs: Vec<&Server> = nodes.iter().collect();
        wait_converged(&refs, Duration::from_secs(30))
    };
    let keys: Vec<String> = (0..48).map(|i| format!("j{i}")).collect();
    let events: Vec<(String, i64)> = keys.iter().map(|k| (k.clone(), 5)).collect();
    let token = ingest(&nodes[0], &events);
    for k in &keys {
        let (status, _) = nodes[1].get_with(
            &format!("/v1/features/txn/{k}"),
            &[("Quiver-Read-After", &token)],
        );
        assert_eq!(status, 200);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let misses: Arc<Mutex<Vec<String>>> = Arc::default();
    let reader = {
        let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
        let (stop, misses, keys) = (stop.clone(), misses.clone(), keys.clone());
        std::thread::spawn(move || {
            let http = client();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let k = &keys[i % keys.len()];
                match read_with_one_retry(&http, &urls, i, k) {
                    Ok(v) if v["features"]["seq"]["value"] == json!(5) => {}
                    other => misses.lock().unwrap().push(format!("{k}: {other:?}")),
                }
            }
        })
    };
    m.add();
    nodes.push(start(dir.path(), &m, 3, &broker, &models));
    for (i, n) in nodes.iter().enumerate().take(3) {
        std::fs::write(
            dir.path().join(&m.ids[i]).join("quiver.toml"),
            m.config(i, &broker, &models),
        )
        .unwrap();
        n.hup();
    }
    let after = {
        let refs: Vec<&Server> = nodes.iter().collect();
        wait_converged(&refs, Duration::from_secs(60))
    };
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let misses = misses.lock().unwrap().clone();
    assert!(
        misses.is_empty(),
        "reads missed during the move: {misses:?}"
    );
    // About 1/N of the owner slots moved, all of them to the new node.
    let mut moved = 0;
    for p in 0..PARTITIONS {
        let (b, a) = (owners_of(&before, p), owners_of(&after, p));
        for o in &a {
            if !b.contains(o) {
                assert_eq!(o, "n4", "partition {p}: only the joiner gains");
                moved += 1;
            }
        }
    }
    let slots = (PARTITIONS * 2) as f64;
    let share = moved as f64 / slots;
    assert!(
        (0.1..=0.45).contains(&share),
        "{moved} of {slots} owner slots moved ({share:.2}; ideal 0.25)"
    );
    for k in &keys {
        let (status, v) = nodes[3].get(&format!("/v1/features/txn/{k}"));
        assert_eq!(
            (status, &v["features"]["seq"]["value"]),
            (200, &json!(5)),
            "{k}"
        );
    }
    for n in nodes {
        n.stop();
    }
}

/// Which node runs each partition's history sink, from every node's cluster view.
fn sink_places(nodes: &[&Server]) -> BTreeMap<u64, Vec<String>> {
    let mut places: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for n in nodes {
        let (_, v) = n.get("/v1/cluster");
        for p in v["history_sink"].as_array().cloned().unwrap_or_default() {
            places
                .entry(p.as_u64().unwrap())
                .or_default()
                .push(v["self"].as_str().unwrap().to_string());
        }
    }
    places
}

/// Waits until every partition's sink runs on exactly one node: `want(p)`.
fn wait_sinks(nodes: &[&Server], want: impl Fn(u32) -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let places = sink_places(nodes);
        let ok = (0..PARTITIONS).all(|p| places.get(&u64::from(p)) == Some(&vec![want(p)]));
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "sinks are at {places:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_history(pg: &mut postgres::Client, table: &str, events: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = history_counts(pg, table);
        if counts == (events, events) {
            return;
        }
        assert!(counts.0 <= events, "more rows than events: {counts:?}");
        assert!(
            Instant::now() < deadline,
            "history holds {counts:?}, want {events}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn each_partitions_history_sink_runs_on_one_owner_and_hands_over_exactly_once() {
    let (dir, broker, models) = setup();
    let table = format!("qv_cluster_hist_{}", std::process::id());
    let mut pg = postgres::Client::connect(PG, postgres::NoTls).unwrap();
    drop_history(&mut pg, &table);
    let mut m = Members::new(3);
    m.extra = format!("[history]\npostgres_url = \"{PG}\"\ntable = \"{table}\"\n");
    let mut nodes: Vec<Option<Server>> = (0..3)
        .map(|i| Some(start(dir.path(), &m, i, &broker, &models)))
        .collect();
    let view = {
        let refs: Vec<&Server> = nodes.iter().flatten().collect();
        let view = wait_converged(&refs, Duration::from_secs(30));
        wait_sinks(&refs, |p| owners_of(&view, p)[0].clone());
        view
    };
    let batch = |from: i64, n: i64| -> Vec<(String, i64)> {
        (from..from + n).map(|i| (format!("h{i}"), i)).collect()
    };
    ingest(nodes[1].as_ref().unwrap(), &batch(0, 300));
    wait_history(&mut pg, &table, 300);

    // The primary of some partitions dies: their replicas take the sinks over from where
    // PostgreSQL says they stand.
    nodes[2].take().unwrap().kill9();
    {
        let refs: Vec<&Server> = nodes.iter().flatten().collect();
        wait_sinks(&refs, |p| {
            let owners = owners_of(&view, p);
            if owners[0] == "n3" {
                owners[1].clone()
            } else {
                owners[0].clone()
            }
        });
    }
    ingest(nodes[0].as_ref().unwrap(), &batch(300, 300));
    wait_history(&mut pg, &table, 600);

    // Back again: the sinks return to it, still once per row.
    let listen = m.listen(2);
    nodes[2] = Some(Server::restart_args(
        &dir.path().join("n3"),
        &["--listen", &listen],
    ));
    {
        let refs: Vec<&Server> = nodes.iter().flatten().collect();
        wait_converged(&refs, Duration::from_secs(30));
        wait_sinks(&refs, |p| owners_of(&view, p)[0].clone());
    }
    ingest(nodes[2].as_ref().unwrap(), &batch(600, 100));
    wait_history(&mut pg, &table, 700);
    for n in nodes.into_iter().flatten() {
        n.stop();
    }
    drop_history(&mut pg, &table);
}

/// A CA and one certificate for every node (SAN 127.0.0.1, usable as server and client),
/// one for a client, and a rogue CA: PEM files in `dir`.
fn cluster_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let ca_of = |name: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.clone().self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        (params, key)
    };
    let (ca, ca_key) = ca_of("ca");
    ca_of("rogue");
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    for (name, san) in [
        ("node", "spiffe://quiver/node"),
        ("client", "spiffe://quiver/client"),
    ] {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![
            rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
            rcgen::SanType::URI(rcgen::string::Ia5String::try_from(san).unwrap()),
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

fn https_client(pki: &Path) -> reqwest::blocking::Client {
    let read = |f: &str| std::fs::read(pki.join(f)).unwrap();
    let identity = [read("client.pem"), read("client.key")].concat();
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&read("ca.pem")).unwrap())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[test]
fn nodes_reach_each_other_over_mutual_tls_and_a_peer_of_another_ca_is_refused() {
    let (dir, broker, models) = setup();
    let pki = dir.path().join("pki");
    cluster_pki(&pki);
    let keys_dir = dir.path().join("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    let reader = key(&keys_dir, "reader", &["reader"], None);
    let producer = key(&keys_dir, "producer", &["producer"], None);
    let ops = key(&keys_dir, "ops", &["ops"], None);
    let predictor = key(&keys_dir, "predictor", &["predictor:two"], None);
    let predictor_reader = key(&keys_dir, "both", &["predictor:two", "reader:dev"], None);
    let mut m = Members::new(3);
    m.extra = format!(
        "[auth]\nmode = \"api_key\"\nkeys_file = \"{}\"\n\n[tls]\ncert = \"{p}/node.pem\"\n\
         key = \"{p}/node.key\"\nclient_ca = \"{p}/ca.pem\"\n",
        keys_dir.join("keys.toml").display(),
        p = pki.display()
    );
    let http = https_client(&pki);
    let start_tls = |i: usize, config: &str| {
        let home = dir.path().join(&m.ids[i]);
        std::fs::create_dir_all(&home).unwrap();
        let listen = m.listen(i);
        Server::start_args_client(&home, config, &["--listen", &listen], http.clone())
    };
    let mut nodes: Vec<Server> = (0..3)
        .map(|i| start_tls(i, &m.config(i, &broker, &models)))
        .collect();
    assert!(nodes[0].url.starts_with("https://"));
    // Converging means every probe between the nodes went over mutual TLS.
    let ops_view = |n: &Server| {
        let r = n
            .http
            .get(format!("{}/v1/cluster", n.url))
            .bearer_auth(&ops)
            .send()
            .unwrap();
        r.json::<Value>().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| {
        let (_, v) = n.get("/v1/cluster/node");
        v["serving"].as_array().is_some_and(|s| !s.is_empty())
    }) {
        assert!(Instant::now() < deadline, "nodes did not serve");
        std::thread::sleep(Duration::from_millis(100));
    }
    let keys: Vec<String> = (0..30).map(|i| format!("tls-{i}")).collect();
    let body: Vec<String> = keys.iter().map(|k| event(k, 3, None)).collect();
    let r = http
        .post(format!("{}/v1/events", nodes[0].url))
        .bearer_auth(&producer)
        .body(body.join("\n"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut by = std::collections::HashSet::new();
        let mut ok = 0;
        for k in &keys {
            let r = http
                .get(format!("{}/v1/features/txn/{k}", nodes[0].url))
                .bearer_auth(&reader)
                .header("Quiver-Read-After", &token)
                .send()
                .unwrap();
            if r.status() == 200 {
                ok += 1;
                by.insert(
                    r.headers()["quiver-served-by"]
                        .to_str()
                        .unwrap()
                        .to_string(),
                );
            }
        }
        if ok == keys.len() && by.len() > 1 {
            break; // some reads went to a peer over mutual TLS, with the caller's key
        }
        assert!(
            Instant::now() < deadline,
            "{ok} of {} read, served by {by:?}",
            keys.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = http
        .get(format!("{}/v1/features/txn/tls-1", nodes[1].url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "no key, no read, forwarded or not");

    // A predict over two entities on different nodes: the device's row is read from its
    // owner with the caller's key, which must therefore also read that view.
    let view = ops_view(&nodes[0]);
    let (u, d, n) = (0..200)
        .find_map(|i| {
            let (u, d) = (format!("tu{i}"), format!("td{i}"));
            owner_of_one(&view, &m, &u, &d).map(|n| (u, d, n))
        })
        .unwrap();
    let events = [
        json!({"view": "txn", "key": u, "values": {"amount": 3.0}}).to_string(),
        json!({"view": "dev", "key": d, "values": {"risk": 0.7}}).to_string(),
    ];
    let r = http
        .post(format!("{}/v1/events", nodes[0].url))
        .bearer_auth(&producer)
        .body(events.join("\n"))
        .send()
        .unwrap();
    let token = r.json::<Value>().unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    let predict = |key: &str| {
        let r = http
            .post(format!("{}/v1/models/two/predict", nodes[n].url))
            .bearer_auth(key)
            .header("Quiver-Read-After", &token)
            .body(json!({"entities": {"user_id": u, "device_id": d}}).to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, p) = predict(&predictor_reader);
    assert_eq!((status, &p["missing"]), (200, &json!([])), "{p}");
    let (status, p) = predict(&predictor);
    assert_eq!(
        (status, p["error"]["code"].as_str()),
        (503, Some("PEER_FAILED")),
        "{p}"
    );
    let r = http
        .get(format!("{}/v1/features/txn/tls-1", nodes[1].url))
        .header("Quiver-Hop", "1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "a hop header bypasses nothing");

    // A node told to trust another CA cannot verify its peers: they stay down to it.
    let third = nodes.pop().unwrap();
    third.stop();
    let rogue = m.config(2, &broker, &models).replace(
        "[cluster]\n",
        &format!("[cluster]\nca = \"{}/rogue.pem\"\n", pki.display()),
    );
    let third = start_tls(2, &rogue);
    std::thread::sleep(Duration::from_secs(1));
    let v = ops_view(&third);
    let peers: Vec<&Value> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["self"] != true)
        .collect();
    assert_eq!(peers.len(), 2);
    for p in peers {
        assert_eq!(p["up"], false, "{p}");
        let e = p["last_error"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            e.contains("certificate") || e.contains("unknownissuer"),
            "{e}"
        );
    }
    third.stop();
    for n in nodes {
        n.stop();
    }
}

/// The README's cluster example: one file for every node, `QUIVER_CLUSTER_SELF` picking the
/// member, each member's address the `--listen` the README gives it.
#[test]
fn the_example_cluster_config_serves_each_member_where_the_readme_says() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/cluster/quiver.toml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(
        readme.contains("--listen 127.0.0.1:70${n}0"),
        "the README starts the members so"
    );
    for n in 1..=3 {
        let env = [("QUIVER_CLUSTER_SELF".to_string(), format!("n{n}"))];
        let config = quiver_core::Config::from_toml_with_env(&text, env).unwrap();
        let c = config.cluster.as_ref().unwrap();
        assert_eq!(c.self_id, format!("n{n}"));
        let me = c.nodes.iter().find(|m| m.id == c.self_id).unwrap();
        assert_eq!(me.http, format!("127.0.0.1:70{n}0"));
    }
}

/// A node that owns `a`'s partition but not `b`'s.
fn owner_of_one(view: &Value, m: &Members, a: &str, b: &str) -> Option<usize> {
    let pa = partition_for(a.as_bytes(), PARTITIONS);
    let pb = partition_for(b.as_bytes(), PARTITIONS);
    let (oa, ob) = (owners_of(view, pa), owners_of(view, pb));
    m.ids
        .iter()
        .position(|id| oa.contains(id) && !ob.contains(id))
}

#[test]
fn a_request_over_entities_on_different_nodes_gathers_their_rows_from_the_owners() {
    let (dir, broker, models) = setup();
    let m = Members::new(3);
    let nodes: Vec<Server> = (0..3)
        .map(|i| start(dir.path(), &m, i, &broker, &models))
        .collect();
    let view = {
        let refs: Vec<&Server> = nodes.iter().collect();
        wait_converged(&refs, Duration::from_secs(30))
    };
    // Pairs (user, device) where some node owns the user's partition but not the device's.
    let pairs: Vec<(String, String, usize)> = (0..200)
        .filter_map(|i| {
            let (u, d) = (format!("mu{i}"), format!("md{i}"));
            owner_of_one(&view, &m, &u, &d).map(|n| (u, d, n))
        })
        .take(6)
        .collect();
    assert_eq!(
        pairs.len(),
        6,
        "such pairs exist with 3 nodes and replication 2"
    );
    let mut lines = Vec::new();
    for (i, (u, d, _)) in pairs.iter().enumerate() {
        let amount = 10.0 + i as f64;
        let risk = 0.5 + i as f64;
        lines.push(json!({"view": "txn", "key": u, "values": {"amount": amount}}).to_string());
        lines.push(
            json!({"view": "dev", "key": d, "values": {"risk": risk, "os": "ios"}}).to_string(),
        );
    }
    let (status, r) = nodes[0].post("/v1/events", &lines.join("\n"));
    assert_eq!(status, 200, "{r}");
    let token = r["token"].as_str().unwrap().to_string();
    let after = [("Quiver-Read-After", token.as_str())];
    for (i, (u, d, n)) in pairs.iter().enumerate() {
        // Sent to the user's owner, which must fetch the device's row from another node.
        let body = json!({"entities": {"user_id": u, "device_id": d}}).to_string();
        let (status, p) = nodes[*n].post_with("/v1/models/two/predict", &body, &after);
        assert_eq!(status, 200, "{p}");
        assert_eq!(
            p["missing"],
            json!([]),
            "both entities' features found: {p}"
        );
        // KServe V2 with a feature join: the same rows gathered, the same answer.
        let infer = json!({"inputs": [
            {"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [u]},
            {"name": "device_id", "datatype": "BYTES", "shape": [1], "data": [d]},
        ]});
        let (status, v2) = nodes[*n].post("/v2/models/two/infer", &infer.to_string());
        assert_eq!(status, 200, "{v2}");
        assert_eq!(
            v2["outputs"][0]["data"][0], p["outputs"]["probability"],
            "{v2} vs {p}"
        );
        let body = json!({"features": ["txn:amount", "dev:risk", "dev:os", "dev:risk_n"],
                          "entities": {"user_id": [u], "device_id": [d]}});
        let (status, f) = nodes[*n].post_with("/v1/features", &body.to_string(), &after);
        assert_eq!(status, 200, "{f}");
        assert_eq!(f["results"][2]["values"], json!([10.0 + i as f64]), "{f}");
        assert_eq!(f["results"][3]["values"], json!([0.5 + i as f64]), "{f}");
        assert_eq!(f["results"][3]["statuses"], json!(["PRESENT"]), "{f}");
        assert_eq!(f["results"][4]["values"], json!(["ios"]), "{f}");
        assert_eq!(
            f["results"][5]["values"],
            json!([1]),
            "an aggregation keeps its type: {f}"
        );
    }
    for n in nodes {
        n.stop();
    }
}
