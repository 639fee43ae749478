//! The history sink against the PostgreSQL on 127.0.0.1:5432 (database `test`): rows appear,
//! a replay writes no duplicates, and an outage (a proxy the test cuts) loses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/pg_proxy.rs"]
mod pg_proxy;

use pg_proxy::Proxy;
use quiver_connect::history::{HistoryOptions, HistorySink};
use quiver_core::event::{decode_batch, EventLimits};
use quiver_core::{record, Config, Schema};
use quiver_log::{Ack, FsyncPolicy, Log, LogOptions, RecordBatch};
use quiver_store::pit::{replay_at, Semantics};

const PG: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test";
const P: u32 = 2;

fn schema() -> Schema {
    let text = "[[entity]]\nname = \"u\"\nkey = \"id\"\n[[view]]\nname = \"txn\"\nentity = \"u\"\nfeatures = [{ name = \"amount\", type = \"f64\" }, { name = \"m\", type = \"string\" }]\n";
    Schema::compile(&Config::from_toml_with_env(text, Vec::new()).unwrap()).unwrap()
}

fn open_log(dir: &std::path::Path) -> Arc<Log> {
    open_log_with(dir, 1 << 20, i64::MAX)
}

fn open_log_with(dir: &std::path::Path, segment_bytes: u64, retention_ms: i64) -> Arc<Log> {
    let opts = LogOptions {
        partitions: P,
        fsync: FsyncPolicy::Batch,
        segment_bytes,
        queue_records_max: 100_000,
        group_commit_records_max: 10_000,
        retention_ms,
        retention_bytes: None,
        disk_bytes_max: None,
        sealer: None,
    };
    Arc::new(Log::open(dir, opts).unwrap())
}

fn append(log: &Log, from: usize, n: usize, with_ids: bool) {
    let schema = schema();
    let lines: Vec<String> = (from..from + n)
        .map(|i| {
            let id = if with_ids {
                format!(r#","event_id":"e{i}""#)
            } else {
                String::new()
            };
            format!(
                r#"{{"view":"txn","key":"k{}","ts":{},"values":{{"amount":{i}.5,"m":"x"}}{id}}}"#,
                i % 50,
                1_800_000_000_000i64 + i as i64
            )
        })
        .collect();
    let limits = EventLimits {
        batch_events_max: 100_000,
        key_bytes_max: 64,
        event_id_bytes_max: 64,
        string_bytes_max: 64,
    };
    let events = decode_batch(lines.join("\n").as_bytes(), &schema, &limits, 0).unwrap();
    let mut per: Vec<RecordBatch> = (0..P).map(|_| RecordBatch::new()).collect();
    for e in &events {
        let p = quiver_core::partition::partition_for(e.key.as_bytes(), P);
        per[p as usize].push_with(|b| record::encode(&schema, e, None, b));
    }
    for a in log
        .append(
            per.into_iter()
                .enumerate()
                .map(|(p, b)| (p as u32, b))
                .collect(),
            Ack::Durable,
        )
        .unwrap()
    {
        a.wait_blocking().unwrap();
    }
}

/// A fresh table per test (tests run in parallel), dropped at the end.
struct Table {
    name: String,
}

impl Table {
    fn new(tag: &str) -> Table {
        let name = format!("qh_{}_{tag}", std::process::id());
        let t = Table { name };
        t.drop_all();
        t
    }
    fn drop_all(&self) {
        let mut c = postgres::Client::connect(PG, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "DROP TABLE IF EXISTS {0}; DROP TABLE IF EXISTS {0}_migrations; DROP TABLE IF EXISTS {0}_gaps;",
            self.name
        ))
        .unwrap();
    }
    /// Records the gaps table says were lost, and its number of ranges.
    fn lost(&self) -> (i64, i64) {
        let mut c = postgres::Client::connect(PG, postgres::NoTls).unwrap();
        let row = c
            .query_one(
                &format!(
                    "SELECT coalesce(sum(to_offset - from_offset), 0)::bigint, count(*) FROM {}_gaps",
                    self.name
                ),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    }
    fn count(&self) -> (i64, i64) {
        let mut c = postgres::Client::connect(PG, postgres::NoTls).unwrap();
        let exists: bool = c
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.name])
            .unwrap()
            .get(0);
        if !exists {
            return (0, 0);
        }
        let row = c
            .query_one(
                &format!(
                    "SELECT count(*), count(DISTINCT (partition, log_offset)) FROM {}",
                    self.name
                ),
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    }
    fn wait_for(&self, rows: i64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count().0 < rows {
            assert!(
                Instant::now() < deadline,
                "history never reached {rows} rows (has {:?})",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        self.drop_all();
    }
}

/// Retention runs while the sink cannot reach PostgreSQL: a lossless sink keeps every segment
/// (and then writes everything), a lossy one lets them go and records each lost range.
fn outage_with_retention(lossy: bool) -> (Table, i64, i64) {
    let dir = tempfile::tempdir().unwrap();
    let table = Table::new(if lossy { "lossy" } else { "lossless" });
    let proxy = Proxy::start();
    proxy.cut();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test connect_timeout=2",
        proxy.addr.port()
    );
    let log = open_log_with(dir.path(), 4096, 0);
    let sink = HistorySink::start(
        log.clone(),
        HistoryOptions {
            lossy,
            ..opts(&url, &table)
        },
    )
    .unwrap();
    append(&log, 0, 3000, false);
    std::thread::sleep(Duration::from_millis(5));
    let deleted = log.enforce_retention(quiver_core::time::now_ms()).unwrap();
    let total: i64 = (0..P).map(|p| log.durable_offset(p) as i64).sum();
    if lossy {
        assert!(
            deleted > 0,
            "nothing protects the records from a lossy sink"
        );
    } else {
        assert_eq!(deleted, 0, "retention waits for the lossless sink");
        assert!((0..P).all(|p| log.first_offset(p) == 0));
    }
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..P).any(|p| sink.committed_offset(p) < log.durable_offset(p)) {
        assert!(Instant::now() < deadline, "the sink never caught up");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(sink);
    if !lossy {
        // Caught up: now retention frees the segments of a lossless sink too.
        assert!(log.enforce_retention(quiver_core::time::now_ms()).unwrap() > 0);
    }
    (table, total, deleted as i64)
}

#[test]
fn a_lossless_sink_holds_retention_through_an_outage() {
    let (table, total, _) = outage_with_retention(false);
    assert_eq!(table.count(), (total, total), "every record once");
    assert_eq!(table.lost(), (0, 0));
}

#[test]
fn a_lossy_sink_records_every_range_it_lost() {
    let (table, total, _) = outage_with_retention(true);
    let (rows, _) = table.count();
    let (lost, ranges) = table.lost();
    assert!(lost > 0 && ranges > 0, "the loss is on record");
    assert_eq!(
        rows + lost,
        total,
        "every record is either written or in a gap"
    );
}

#[test]
fn an_error_retrying_cannot_fix_stops_the_sink_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let table = Table::new("refused");
    // A table someone else made, with a column of another type, and migrations that say it is
    // Quiver's: every INSERT fails the same way (SQLSTATE 42804), so retrying is pointless.
    let mut c = postgres::Client::connect(PG, postgres::NoTls).unwrap();
    c.batch_execute(&format!(
        "CREATE TABLE {0} (log_id text, partition integer, log_offset bigint, view text, entity_key text, \
         ts_ms bigint, append_ms bigint, event_id text, \"values\" jsonb, dedup_id text, payload integer);
         CREATE TABLE {0}_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO {0}_migrations (version) VALUES (1), (2), (3), (4);
         CREATE TABLE {0}_gaps (log_id text, partition integer, from_offset bigint, to_offset bigint, detected_at timestamptz DEFAULT now());",
        table.name
    ))
    .unwrap();
    let log = open_log(dir.path());
    let sink = HistorySink::start(log.clone(), opts(PG, &table)).unwrap();
    append(&log, 0, 200, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.stopped().len() < P as usize {
        assert!(
            Instant::now() < deadline,
            "the sink kept retrying: {:?}",
            sink.stopped()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        sink.stopped()
            .iter()
            .all(|(_, why)| why.contains("refused")),
        "{:?}",
        sink.stopped()
    );
    assert!(
        (0..P).all(|p| sink.committed_offset(p) == 0),
        "nothing committed"
    );
    drop(sink);
    // Fixed (the foreign table removed) and restarted: every record lands.
    table.drop_all();
    let sink = HistorySink::start(log.clone(), opts(PG, &table)).unwrap();
    table.wait_for(200);
    assert_eq!(table.count(), (200, 200));
    assert!(sink.stopped().is_empty());
}

fn opts(url: &str, table: &Table) -> HistoryOptions {
    HistoryOptions {
        postgres_url: url.to_string(),
        table: table.name.clone(),
        batch_rows_max: 300,
        retry_delay_ms_max: 300,
        lossy: false,
        ca_file: None,
    }
}

#[test]
fn every_record_lands_once_and_replays_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let table = Table::new("once");
    let log = open_log(dir.path());
    append(&log, 0, 1000, true);
    let sink = HistorySink::start(log.clone(), opts(PG, &table)).unwrap();
    table.wait_for(1000);
    drop(sink);
    // Replay from the start (offsets forgotten): no new rows.
    std::fs::remove_file(dir.path().join("offsets/history.offsets")).unwrap();
    let sink = HistorySink::start(log.clone(), opts(PG, &table)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (0..P).any(|p| sink.committed_offset(p) < log.durable_offset(p)) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(table.count(), (1000, 1000));
    // The same event ids appended again (a producer retry) are written once.
    append(&log, 0, 100, true);
    append(&log, 1000, 10, true);
    table.wait_for(1010);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(table.count().0, 1010);
    // Point-in-time from PostgreSQL equals point-in-time from the log, at every instant.
    let schema = Arc::new(schema());
    let keys: Vec<String> = (0..50).map(|k| format!("k{k}")).collect();
    let from_pg = quiver_connect::history::collect_from_postgres(
        PG,
        &table.name,
        log.id(),
        &schema,
        "txn",
        &keys,
    )
    .unwrap();
    let wanted = keys.iter().cloned().collect();
    let from_log =
        quiver_store::pit::collect_from_log(log.as_ref(), "txn", &wanted, &|_| 0).unwrap();
    let now = quiver_core::time::now_ms();
    let instants: Vec<(usize, i64)> = vec![(0, now), (1, now - 1000), (2, 0)];
    for k in &keys {
        let pg = from_pg[k].clone();
        // PostgreSQL kept one row per event id; the log also holds the 100 re-sent ones.
        assert_eq!(
            pg.len(),
            from_log[k].len()
                - from_log[k]
                    .iter()
                    .filter(|r| quiver_core::record::decode(&r.payload)
                        .unwrap()
                        .event_id
                        .is_some_and(
                            |id| id.starts_with('e') && id[1..].parse::<usize>().unwrap() < 100
                        ))
                    .count()
                    / 2,
            "{k}"
        );
        for semantics in [Semantics::AsServed, Semantics::EventTime] {
            let a = replay_at(&schema, 0, k, &pg, &instants, &[0, 1], semantics);
            let b = replay_at(&schema, 0, k, &from_log[k], &instants, &[0, 1], semantics);
            assert_eq!(a, b, "{k} {semantics:?}");
        }
    }
    let mut c = postgres::Client::connect(PG, postgres::NoTls).unwrap();
    let row = c.query_one(&format!("SELECT view, entity_key, ts_ms, \"values\"->>'amount' FROM {} WHERE event_id = 'e7'", table.name), &[]).unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, i64>(2),
            row.get::<_, String>(3)
        ),
        ("txn".into(), "k7".into(), 1_800_000_000_007, "7.5".into())
    );
}

#[test]
fn an_outage_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let table = Table::new("outage");
    let proxy = Proxy::start();
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=test connect_timeout=2",
        proxy.addr.port()
    );
    let log = open_log(dir.path());
    let sink = HistorySink::start(log.clone(), opts(&url, &table)).unwrap();
    append(&log, 0, 600, false);
    table.wait_for(600);

    proxy.cut();
    append(&log, 600, 900, false);
    std::thread::sleep(Duration::from_millis(500));
    let during = table.count().0;
    assert!(
        during < 1500,
        "nothing can be written while PostgreSQL is unreachable ({during})"
    );
    assert!(
        (0..P).any(|p| sink.committed_offset(p) < log.durable_offset(p)),
        "the sink lags"
    );

    // Restart the sink mid-outage too: its offsets must carry it.
    drop(sink);
    let sink = HistorySink::start(log.clone(), opts(&url, &table)).unwrap();
    proxy.restore();
    table.wait_for(1500);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(table.count(), (1500, 1500), "every record once");
    drop(sink);
}
