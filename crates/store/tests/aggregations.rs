//! Window aggregations through the real log and materializers: values, lateness, and exact
//! agreement after restarts from a snapshot and from a pure log replay.

use std::sync::Arc;
use std::time::Duration;

use quiver_core::event::{decode_batch, EventLimits};
use quiver_core::partition::partition_for;
use quiver_core::record;
use quiver_core::token::Token;
use quiver_core::value::Value;
use quiver_core::{Config, Schema};
use quiver_log::{Ack, FsyncPolicy, Log, LogOptions, RecordBatch};
use quiver_store::materializer::{MaterializerOptions, Materializers};
use quiver_store::{FeatureRead, Status, Store};

const CONFIG: &str = r#"
[[entity]]
name = "card"
key = "card_id"
[[view]]
name = "txn"
entity = "card"
allowed_lateness = "2m"
features = [{ name = "amount", type = "f64" }, { name = "merchant", type = "string" }]
aggregations = [
  { name = "amount_sum_5m", of = "amount", fn = "sum", window = "5m" },
  { name = "amount_count_1h", of = "amount", fn = "count", window = "1h" },
  { name = "amount_mean_1h", of = "amount", fn = "mean", window = "1h" },
  { name = "amount_max_1h", of = "amount", fn = "max", window = "1h", tile = "5m" },
  { name = "amount_std_24h", of = "amount", fn = "stddev", window = "24h", tile = "5m" },
  { name = "merchant_count_10m", of = "merchant", fn = "count", window = "10m" },
]
"#;

const LIMITS: EventLimits = EventLimits {
    batch_events_max: 100_000,
    key_bytes_max: 64,
    event_id_bytes_max: 64,
    string_bytes_max: 64,
};
const P: u32 = 3;

struct Node {
    store: Arc<Store>,
    log: Arc<Log>,
    _mats: Materializers,
}

fn start(dir: &std::path::Path) -> Node {
    let schema = Arc::new(
        Schema::compile(&Config::from_toml_with_env(CONFIG, Vec::new()).unwrap()).unwrap(),
    );
    let opts = LogOptions {
        partitions: P,
        fsync: FsyncPolicy::Batch,
        segment_bytes: 1 << 20,
        queue_records_max: 1_000_000,
        group_commit_records_max: 10_000,
        retention_ms: i64::MAX,
        retention_bytes: None,
        disk_bytes_max: None,
        sealer: None,
    };
    let log = Arc::new(Log::open(&dir.join("log"), opts).unwrap());
    let store = Arc::new(Store::new(schema, P));
    let mats = Materializers::start(
        store.clone(),
        log.clone(),
        MaterializerOptions {
            snapshot_dir: dir.join("snapshots"),
            snapshot_interval: Duration::from_secs(3600),
            snapshot_change_ratio: 0.25,
            dedup_window_events: 1000,
            poll_records_max: 512,
            sealer: None,
        },
    )
    .unwrap();
    Node {
        store,
        log,
        _mats: mats,
    }
}

fn push(node: &Node, body: &str) {
    let schema = node.store.schema().clone();
    let events = decode_batch(body.as_bytes(), &schema, &LIMITS, 0).unwrap();
    let mut per: Vec<RecordBatch> = (0..P).map(|_| RecordBatch::new()).collect();
    for e in &events {
        per[partition_for(e.key.as_bytes(), P) as usize]
            .push_with(|b| record::encode(&schema, e, None, b));
    }
    let mut token = Token::new();
    for a in node
        .log
        .append(
            per.into_iter()
                .enumerate()
                .map(|(p, b)| (p as u32, b))
                .collect(),
            Ack::Durable,
        )
        .unwrap()
    {
        token.advance(a.stream, a.next_offset().unwrap());
        a.wait_blocking().unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    assert!(rt.block_on(node.store.wait_applied(&token, Duration::from_secs(10))));
}

fn wait_recovered(node: &Node) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node.store.is_recovered() {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_all(node: &Node, key: &str, now: i64) -> Vec<FeatureRead> {
    let v = node.store.schema().view(0);
    let cols: Vec<u16> = (0..v.columns() as u16).collect();
    let mut out = Vec::new();
    node.store.read(0, key, &cols, now, &mut out);
    out
}

const T0: i64 = 1_800_000_000_000;
const MIN: i64 = 60_000;

#[test]
fn aggregates_are_read_as_columns_and_respect_lateness() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path());
    let ev = |ts: i64, amount: f64| {
        format!(
            r#"{{"view":"txn","key":"c1","ts":{ts},"values":{{"amount":{amount},"merchant":"m"}}}}"#
        )
    };
    let body = [
        ev(T0, 10.0),
        ev(T0 + MIN, 20.0),
        ev(T0 + 4 * MIN, 30.0),
        ev(T0 + 3 * MIN, 5.0),
        ev(T0 - 10 * MIN, 1000.0),
    ]
    .join("\n");
    push(&node, &body);
    let r = read_all(&node, "c1", T0 + 4 * MIN);
    // columns: amount, merchant, sum_5m, count_1h, mean_1h, max_1h, std_24h, merchant_count_10m
    assert_eq!(r[0].value, Value::F64(30.0), "latest value");
    assert_eq!(
        r[2].value,
        Value::F64(65.0),
        "sum over 5m: 10+20+30+5 (1 min late, allowed); the 10-minutes-late event is dropped"
    );
    assert_eq!(r[3].value, Value::I64(4));
    assert_eq!(r[4].value, Value::F64(65.0 / 4.0));
    assert_eq!(r[5].value, Value::F64(30.0));
    assert_eq!(r[7].value, Value::I64(4));
    assert_eq!(
        (r[2].status, r[2].ts_ms),
        (Status::Present, Some(T0 + 4 * MIN))
    );
    // Ten minutes on, the 5-minute sum has slid past everything; the hour has not.
    let r = read_all(&node, "c1", T0 + 15 * MIN);
    assert_eq!(r[2].value, Value::F64(0.0));
    assert_eq!(r[3].value, Value::I64(4));
    // Two hours on: empty windows.
    let r = read_all(&node, "c1", T0 + 120 * MIN);
    assert_eq!(
        (r[3].value.clone(), r[4].status),
        (Value::I64(0), Status::NullValue)
    );
    // A late event within the allowed lateness (2m) still bumps the row version.
    let before = node.store.row_version(0, "c1").unwrap();
    push(
        &node,
        &format!(
            r#"{{"view":"txn","key":"c1","ts":{},"values":{{"amount":1}}}}"#,
            T0 + 3 * MIN
        ),
    );
    let after = node.store.row_version(0, "c1").unwrap();
    assert!(
        after > before,
        "a change to an aggregate is a change to the row"
    );
    assert_eq!(
        read_all(&node, "c1", T0 + 4 * MIN)[0].value,
        Value::F64(30.0),
        "LWW keeps the newer latest value"
    );
    assert_eq!(
        read_all(&node, "c1", T0 + 4 * MIN)[2].value,
        Value::F64(66.0)
    );
}

/// Snapshot + replay and pure replay both rebuild every aggregate exactly.
#[test]
fn restart_keeps_aggregates_exact() {
    let dir = tempfile::tempdir().unwrap();
    // A seeded stream: 40 cards, times jittered backwards (late and very late events).
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let events: Vec<String> = (0..4000)
        .map(|i| {
            let jitter = (next() % (6 * MIN as u64)) as i64;
            let ts = T0 + i * 1000 - jitter;
            format!(r#"{{"view":"txn","key":"c{}","ts":{ts},"values":{{"amount":{}.5,"merchant":"m{}"}}}}"#, next() % 40, next() % 1000, i % 7)
        })
        .collect();
    let keys: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    let instants = [T0 + 3600 * 1000, T0 + 3000 * 1000, T0 + 4000 * 1000];
    let snapshot_of = |node: &Node| -> Vec<Vec<FeatureRead>> {
        keys.iter()
            .flat_map(|k| instants.iter().map(move |&t| (k, t)))
            .map(|(k, t)| read_all(node, k, t))
            .collect()
    };

    let node = start(dir.path());
    push(&node, &events[..2500].join("\n"));
    drop(node); // clean stop: final snapshots at 2500 events
    let node = start(dir.path());
    wait_recovered(&node);
    push(&node, &events[2500..].join("\n"));
    let live = snapshot_of(&node);
    drop(node); // snapshot again

    let node = start(dir.path());
    wait_recovered(&node);
    assert_eq!(snapshot_of(&node), live, "from snapshot");
    drop(node);

    std::fs::remove_dir_all(dir.path().join("snapshots")).unwrap();
    let node = start(dir.path());
    wait_recovered(&node);
    assert_eq!(snapshot_of(&node), live, "from a full replay of the log");
    assert!(
        live.iter()
            .flatten()
            .any(|r| matches!(r.value, Value::F64(x) if x > 0.0)),
        "the test reads real aggregates"
    );
}
