//! One integration scenario, run against both log backends with the real binary: the
//! embedded log, and Kafka (a Kafka-protocol test broker on loopback). Ingest, read back with
//! read-your-writes tokens, `event_id` and `Idempotency-Key` dedup, window aggregations, the
//! PostgreSQL history sink (rows and offsets), point-in-time reads, and a `kill -9` restart
//! that keeps all of it.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SCENARIO: &str = r#"
[log]
partitions = 4

[store]
snapshot_interval = "500ms"

[[entity]]
name = "user"
key = "user_id"

[[view]]
name = "txn"
entity = "user"
ttl = "1h"
allowed_lateness = "10m"
features = [
  { name = "amount", type = "f64" },
  { name = "seq", type = "i64" },
]
aggregations = [
  { name = "amount_sum_1h", of = "amount", fn = "sum", window = "1h" },
  { name = "seq_count_1h", of = "seq", fn = "count", window = "1h" },
]
"#;

const KEYS: usize = 20;

fn with_history(config: &str, table: &str) -> String {
    config.replace(
        "[store]",
        &format!("[history]\npostgres_url = \"{PG}\"\ntable = \"{table}\"\n\n[store]"),
    )
}

fn pg() -> postgres::Client {
    postgres::Client::connect(PG, postgres::NoTls).unwrap()
}

fn drop_tables(table: &str) {
    let mut c = pg();
    drop_history(&mut c, table);
    c.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}_gaps; DROP TABLE IF EXISTS {table}_offsets;"
    ))
    .unwrap();
}

/// A batch of one event per key at `seq`, with event ids (or without, for `Idempotency-Key`).
fn batch(seq: i64, ids: bool, now: i64) -> String {
    let events: Vec<String> = (0..KEYS)
        .map(|k| {
            let id = if ids {
                format!(r#","event_id":"k{k}-s{seq}""#)
            } else {
                String::new()
            };
            format!(
                r#"{{"view":"txn","key":"k{k}","ts":{},"values":{{"amount":{}.5,"seq":{seq}}}{id}}}"#,
                now + seq,
                seq
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

fn features(server: &Server, key: &str, token: Option<&str>) -> Value {
    let headers: Vec<(&str, &str)> = token
        .map(|t| ("Quiver-Read-After", t))
        .into_iter()
        .collect();
    let (status, v) = server.get_with(&format!("/v1/features/txn/{key}"), &headers);
    assert_eq!(status, 200, "{v}");
    v["features"].clone()
}

/// What every key must read after the scenario's writes: seq `last`, `count` events whose
/// amounts are `seq + 0.5` for each seq written.
fn expect(server: &Server, last: i64, seqs: &[i64]) {
    let sum: f64 = seqs.iter().map(|s| *s as f64 + 0.5).sum();
    for k in 0..KEYS {
        let f = features(server, &format!("k{k}"), None);
        assert_eq!(f["seq"]["value"], last, "k{k}: {f}");
        assert_eq!(
            f["seq_count_1h"]["value"],
            seqs.len() as i64,
            "k{k} counts each event once: {f}"
        );
        assert_eq!(f["amount_sum_1h"]["value"], sum, "k{k}: {f}");
    }
}

fn wait_history(table: &str, rows: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = pg();
    loop {
        let (n, distinct) = history_counts(&mut c, table);
        if n == rows {
            assert_eq!(n, distinct, "one row per log position");
            return;
        }
        assert!(
            n < rows,
            "history has {n} rows, more than the {rows} events"
        );
        assert!(Instant::now() < deadline, "history has {n} of {rows} rows");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn scenario(dir: &std::path::Path, config: &str, table: &str) {
    drop_tables(table);
    let now = quiver_now();
    let server = Server::start(dir, config);

    // Read-your-writes: each acknowledged batch is visible to a read that names its token.
    let mut seqs = Vec::new();
    for seq in 1..=5 {
        let (status, v) = server.post("/v1/events?ack=durable", &batch(seq, true, now));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["accepted"], KEYS);
        let token = v["token"].as_str().unwrap().to_string();
        assert!(!token.is_empty(), "a durable ack names its positions");
        let f = features(&server, "k7", Some(&token));
        assert_eq!(f["seq"]["value"], seq, "read after {token}: {f}");
        seqs.push(seq);
    }
    // The same event ids again: acknowledged, applied never.
    let (status, v) = server.post("/v1/events", &batch(3, true, now));
    assert_eq!(status, 200, "{v}");
    // Idempotency-Key: a retried batch is replayed, applied once.
    let idem = [("Idempotency-Key", "scenario-batch-6")];
    let (status, first) = server.post_with("/v1/events", &batch(6, false, now), &idem);
    assert_eq!(status, 200, "{first}");
    let (status, again) = server.post_with("/v1/events", &batch(6, false, now), &idem);
    assert_eq!(
        (status, &again),
        (200, &first),
        "the retry gets the first reply"
    );
    seqs.push(6);
    let token = first["token"].as_str().unwrap().to_string();
    features(&server, "k0", Some(&token));
    expect(&server, 6, &seqs);

    // History: one row per distinct event, and the sink's offsets in PostgreSQL.
    let events = (seqs.len() * KEYS) as i64;
    wait_history(table, events);
    let offsets: i64 = pg()
        .query_one(
            &format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM {table}_offsets"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        offsets >= events,
        "the sink's offsets cover what it wrote ({offsets} < {events})"
    );

    // Point in time: k3 as of just after seq 2 was its newest event.
    let body = json!({"features": ["txn:seq", "txn:seq_count_1h"], "entities": {"user_id": ["k3"]},
                      "timestamps": [now + 2]});
    let (status, v) = server.post("/v1/features/historical", &body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["results"][1]["values"], json!([2]), "{v}");
    assert_eq!(v["results"][2]["values"], json!([2]), "{v}");

    // kill -9 and restart: snapshot + the log's tail give the same state.
    let dir = server.kill9();
    let server = Server::restart(&dir);
    expect(&server, 6, &seqs);
    let (status, v) = server.post("/v1/events", &batch(7, true, now));
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    features(&server, "k1", Some(&token));
    seqs.push(7);
    expect(&server, 7, &seqs);
    wait_history(table, events + KEYS as i64);
    server.stop();
    drop_tables(table);
}

fn quiver_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 60_000
}

#[test]
fn the_scenario_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_scen_emb_{}", std::process::id());
    scenario(dir.path(), &with_history(SCENARIO, &table), &table);
}

#[test]
fn the_scenario_on_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let table = format!("qh_scen_kafka_{}", std::process::id());
    let config = kafka_config(&with_history(SCENARIO, &table), &broker, "scen.");
    let quiver = dir.path().join("quiver");
    std::fs::create_dir_all(&quiver).unwrap();
    scenario(&quiver, &config, &table);
}
