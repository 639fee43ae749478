//! The store fed by the real log through the materializers: reads, TTL, dedup, and restart
//! (snapshot + replay) giving the same state.

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
name = "user"
key = "user_id"
[[view]]
name = "txn"
entity = "user"
ttl = "1h"
features = [{ name = "amount", type = "f64" }, { name = "merchant", type = "string" }]
"#;

const LIMITS: EventLimits = EventLimits {
    batch_events_max: 10_000,
    key_bytes_max: 64,
    event_id_bytes_max: 64,
    string_bytes_max: 64,
};

struct Node {
    store: Arc<Store>,
    log: Arc<Log>,
    mats: Materializers,
}

fn start(dir: &std::path::Path, snapshot_interval: Duration) -> Node {
    start_with(dir, snapshot_interval, 0.25)
}

fn start_with(dir: &std::path::Path, snapshot_interval: Duration, ratio: f64) -> Node {
    try_start_with(dir, snapshot_interval, ratio).unwrap()
}

fn try_start_with(
    dir: &std::path::Path,
    snapshot_interval: Duration,
    ratio: f64,
) -> quiver_store::Result<Node> {
    let schema = Arc::new(
        Schema::compile(&Config::from_toml_with_env(CONFIG, Vec::new()).unwrap()).unwrap(),
    );
    let opts = LogOptions {
        partitions: 4,
        fsync: FsyncPolicy::Batch,
        segment_bytes: 4096,
        queue_records_max: 100_000,
        group_commit_records_max: 1000,
        retention_ms: i64::MAX,
        retention_bytes: None,
        disk_bytes_max: None,
        sealer: None,
    };
    let log = Arc::new(Log::open(&dir.join("log"), opts).unwrap());
    let store = Arc::new(Store::new(schema, 4));
    let mats = Materializers::start(
        store.clone(),
        log.clone(),
        MaterializerOptions {
            snapshot_dir: dir.join("snapshots"),
            snapshot_interval,
            snapshot_change_ratio: ratio,
            dedup_window_events: 1000,
            poll_records_max: 256,
            sealer: None,
        },
    )?;
    Ok(Node { store, log, mats })
}

/// Appends events (JSON) the way ingest does, returns the token.
fn push(node: &Node, body: &str) -> Token {
    let schema = node.store.schema().clone();
    let events = decode_batch(body.as_bytes(), &schema, &LIMITS, 0).unwrap();
    let mut per: Vec<RecordBatch> = (0..4).map(|_| RecordBatch::new()).collect();
    for e in &events {
        let p = partition_for(e.key.as_bytes(), 4);
        let dedup = e
            .event_id
            .as_deref()
            .map(|id| record::dedup_from_event_id(&schema.view(e.view).name, &e.key, id));
        per[p as usize].push_with(|b| record::encode(&schema, e, dedup, b));
    }
    let batches = per
        .into_iter()
        .enumerate()
        .map(|(p, b)| (p as u32, b))
        .collect();
    let mut token = Token::new();
    for a in node.log.append(batches, Ack::Durable).unwrap() {
        token.advance(a.stream, a.next_offset().unwrap());
        a.wait_blocking().unwrap();
    }
    token
}

fn wait(node: &Node, token: &Token) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    assert!(
        rt.block_on(node.store.wait_applied(token, Duration::from_secs(10))),
        "materializer applied the token"
    );
}

fn read(node: &Node, key: &str, now: i64) -> Vec<FeatureRead> {
    let mut out = Vec::new();
    node.store.read(0, key, &[0, 1], now, &mut out);
    out
}

const HOUR: i64 = 3_600_000;

#[test]
fn reads_ttl_dedup_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000i64;
    let node = start(dir.path(), Duration::from_secs(3600));
    let token = push(
        &node,
        &format!(
            r#"[{{"view":"txn","key":"u1","ts":{t0},"event_id":"a","values":{{"amount":1.5,"merchant":"m1"}}}},
            {{"view":"txn","key":"u1","ts":{},"values":{{"amount":9.0}}}},
            {{"view":"txn","key":"u1","ts":{},"event_id":"a","values":{{"amount":7.0}}}},
            {{"view":"txn","key":"u2","ts":{t0},"values":{{"merchant":null}}}}]"#,
            t0 - 10,
            t0 + 10
        ),
    );
    wait(&node, &token);
    let r = read(&node, "u1", t0);
    assert_eq!(
        r[0],
        FeatureRead {
            status: Status::Present,
            value: Value::F64(1.5),
            ts_ms: Some(t0)
        },
        "late event lost, duplicate skipped"
    );
    assert_eq!(r[1].value, Value::Str("m1".into()));
    let r = read(&node, "u2", t0);
    assert_eq!(
        (r[0].status, r[1].status),
        (Status::NotFound, Status::NullValue)
    );
    let r = read(&node, "u1", t0 + HOUR + 1);
    assert_eq!(
        r[0],
        FeatureRead {
            status: Status::OutsideMaxAge,
            value: Value::Null,
            ts_ms: Some(t0)
        },
        "never a stale value as PRESENT"
    );
    assert_eq!(read(&node, "nobody", t0)[0].status, Status::NotFound);
    let version = node.store.row_version(0, "u1").unwrap();

    // More events, some applied only via replay (no snapshot since).
    let many: Vec<String> = (0..300).map(|i| format!(r#"{{"view":"txn","key":"k{i}","ts":{t0},"event_id":"e{i}","values":{{"amount":{i}}}}}"#)).collect();
    let token = push(&node, &format!("[{}]", many.join(",")));
    wait(&node, &token);
    let before: Vec<Vec<FeatureRead>> = (0..300)
        .map(|i| read(&node, &format!("k{i}"), t0))
        .collect();
    node.mats.shutdown(); // takes a final snapshot
    drop(node);

    let node = start(dir.path(), Duration::from_secs(3600));
    let token = push(
        &node,
        &format!(
            r#"[{{"view":"txn","key":"k5","ts":{t0},"event_id":"e5","values":{{"amount":-1}}}}]"#
        ),
    );
    wait(&node, &token);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.store.is_recovered() {
        assert!(
            std::time::Instant::now() < deadline,
            "recovery never completed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for (i, b) in before.iter().enumerate() {
        assert_eq!(
            &read(&node, &format!("k{i}"), t0),
            b,
            "row k{i} survives restart"
        );
    }
    assert_eq!(
        node.store.row_version(0, "u1"),
        Some(version),
        "versions survive restart"
    );
}

#[test]
fn replay_without_snapshot_rebuilds_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000i64;
    let node = start(dir.path(), Duration::from_secs(3600));
    let events: Vec<String> = (0..500)
        .map(|i| {
            format!(
                r#"{{"view":"txn","key":"k{}","ts":{},"values":{{"amount":{i}}}}}"#,
                i % 37,
                t0 + (i * 7919) % 1000
            )
        })
        .collect();
    let token = push(&node, &format!("[{}]", events.join(",")));
    wait(&node, &token);
    let before: Vec<Vec<FeatureRead>> =
        (0..37).map(|i| read(&node, &format!("k{i}"), t0)).collect();
    drop(node);
    // As if the process had died before any snapshot: the restart must replay the whole log.
    std::fs::remove_dir_all(dir.path().join("snapshots")).unwrap();

    let node = start(dir.path(), Duration::from_secs(3600));
    let token: Token = Token::parse(
        &(0..4)
            .map(|p| format!("{p}:{}", node.log.durable_offset(p)))
            .collect::<Vec<_>>()
            .join(","),
    )
    .unwrap();
    wait(&node, &token);
    for (i, b) in before.iter().enumerate() {
        assert_eq!(&read(&node, &format!("k{i}"), t0), b);
    }
}

/// Each partition's snapshot offset (`None`: no snapshot yet).
fn snapshot_offsets(dir: &std::path::Path) -> Vec<Option<u64>> {
    let schema = Arc::new(
        Schema::compile(&Config::from_toml_with_env(CONFIG, Vec::new()).unwrap()).unwrap(),
    );
    let scratch = Store::new(schema, 4);
    (0..4)
        .map(|p| {
            let loaded =
                quiver_store::snapshot::load(&dir.join("snapshots"), &scratch, p, 1000, None);
            loaded.unwrap().map(|l| l.offsets.unwrap()[0].1)
        })
        .collect()
}

fn updates(t0: i64, keys: usize, round: usize) -> String {
    let events: Vec<String> = (0..keys)
        .map(|i| {
            format!(
                r#"{{"view":"txn","key":"k{i}","ts":{},"values":{{"amount":{round}}}}}"#,
                t0 + round as i64
            )
        })
        .collect();
    format!("[{}]", events.join(","))
}

#[test]
fn snapshots_follow_the_log_volume_not_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000i64;
    let node = start(dir.path(), Duration::from_secs(3600));
    let token = push(&node, &updates(t0, 400, 0));
    wait(&node, &token);
    node.mats.shutdown(); // a snapshot of all 400 rows, about 100 per partition
    drop(node);
    let first = snapshot_offsets(dir.path());
    assert!(first.iter().all(|o| o.is_some_and(|o| o > 0)), "{first:?}");

    // Ratio 1: a tenth of the rows changed is not worth rewriting them, whatever the clock.
    let node = start_with(dir.path(), Duration::from_millis(100), 1.0);
    let token = push(&node, &updates(t0, 40, 1));
    wait(&node, &token);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        snapshot_offsets(dir.path()),
        first,
        "8 intervals, 10% changed: no snapshot"
    );
    // More records than rows: every partition is rewritten.
    let token = push(&node, &updates(t0, 400, 2));
    wait(&node, &token);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = snapshot_offsets(dir.path());
        if now.iter().zip(&first).all(|(n, f)| n > f) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now:?} after {first:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    node.mats.shutdown();
    drop(node);

    // Ratio 0: the clock alone decides.
    let before = snapshot_offsets(dir.path());
    let node = start_with(dir.path(), Duration::from_millis(100), 0.0);
    let token = push(&node, &updates(t0, 40, 3));
    wait(&node, &token);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let touched: Vec<u32> = (0..40)
        .map(|i| partition_for(format!("k{i}").as_bytes(), 4))
        .collect();
    loop {
        let now = snapshot_offsets(dir.path());
        if (0..4).all(|p| !touched.contains(&p) || now[p as usize] > before[p as usize]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{now:?} after {before:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node in `dir` that applied 40 rows, snapshotted them at shutdown and stopped: the token
/// of its records and its store.
fn forty_rows_snapshotted(dir: &std::path::Path) -> (Token, Arc<Store>) {
    let node = start(dir, Duration::from_secs(3600));
    let token = push(&node, &updates(1_700_000_000_000, 40, 0));
    wait(&node, &token);
    node.mats.shutdown();
    (token, node.store.clone())
}

/// A snapshot's temporary left by a process killed mid-write is removed when the partition
/// recovers, and the snapshot it was replacing still loads.
#[test]
fn recovery_removes_a_snapshot_abandoned_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let (token, _) = forty_rows_snapshotted(dir.path());
    let snapshots = dir.path().join("snapshots");
    let path = quiver_store::snapshot::snapshot_path(&snapshots, 0);
    let mut half = quiver_fsutil::AtomicFile::create(&path).unwrap();
    std::io::Write::write_all(&mut half, b"the first bytes of a newer snapshot").unwrap();
    std::io::Write::flush(&mut half).unwrap();
    std::mem::forget(half); // kill -9: no drop
    let names = |d: &std::path::Path| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&snapshots).len(),
        5,
        "four snapshots and the abandoned temporary"
    );
    let node = start(dir.path(), Duration::from_secs(3600));
    wait(&node, &token);
    assert_eq!(
        names(&snapshots),
        (0..4).map(|p| format!("p-{p:04}.snap")).collect::<Vec<_>>()
    );
    assert_eq!(node.store.rows(), 40, "the snapshots still load");
    node.mats.shutdown();
}

/// An online snapshot's rows may hold records up to its end E: if the log ends before E
/// (records lost with `fsync = never`, a topic recreated), new records would reuse offsets the
/// rows claim to hold and be left out as already applied. Such a snapshot refuses to start,
/// as one whose start is past the log's end does.
#[test]
fn a_snapshot_ending_past_the_log_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (token, store) = forty_rows_snapshotted(dir.path());
    let snapshots = dir.path().join("snapshots");
    let p = partition_for(b"k0", 4);
    let loaded = quiver_store::snapshot::load(&snapshots, &store, p, 1000, None)
        .unwrap()
        .unwrap();
    let offsets = loaded.offsets.unwrap();
    let end = offsets[0].1;
    assert!(end > 0);
    let write = |ends: &[u64]| {
        let mut snap =
            quiver_store::snapshot::Snapshot::begin(&snapshots, &store, p, &offsets, None).unwrap();
        snap.capture(&store, || {}).unwrap();
        snap.finish(ends, std::iter::empty())
            .unwrap()
            .commit()
            .unwrap();
    };
    write(&[end + 3]);
    let err = try_start_with(dir.path(), Duration::from_secs(3600), 0.25)
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("ahead of the log") || err.to_string().contains("ends at"),
        "{err}"
    );
    // The same rows ending where the log ends load.
    write(&[end]);
    let node = start(dir.path(), Duration::from_secs(3600));
    wait(&node, &token);
    assert_eq!(node.store.rows(), 40);
    node.mats.shutdown();
}
