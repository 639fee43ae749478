//! History you can train on, end to end with the real binary and the PostgreSQL on
//! 127.0.0.1:5432: no event lost in a PostgreSQL outage longer than retention; a lossy sink
//! that records every lost range; the disk bound answering 503 DISK_FULL and draining; a
//! Parquet backfill read back point-in-time by event time, equal to an oracle.

mod common;

#[path = "../../connect/tests/support/pg_proxy.rs"]
mod pg_proxy;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A port nothing listens on: PostgreSQL "down" for as long as the test likes.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn pg_at(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=postgres dbname=test connect_timeout=1")
}

/// `CONFIG` with a history sink at `url` into `table`, one-second retention checked every
/// 200 ms, and `extra` lines in `[log]` / `[history]`.
fn outage_config(url: &str, table: &str, log_extra: &str, history_extra: &str) -> String {
    CONFIG.replace(
        "[log]",
        &format!(
            "[history]\npostgres_url = \"{url}\"\ntable = \"{table}\"\nretry_delay_ms_max = 200\n{history_extra}\n\n\
             [log]\nretention = \"1s\"\nretention_check_interval = \"200ms\"\n{log_extra}"
        ),
    )
}

fn pg() -> postgres::Client {
    postgres::Client::connect(PG, postgres::NoTls).unwrap()
}

fn drop_all(table: &str) {
    drop_history(&mut pg(), table);
    pg().batch_execute(&format!("DROP TABLE IF EXISTS {table}_gaps"))
        .unwrap();
}

/// Posts `n` events (unique ids from `from`) in batches of `batch`, every one acknowledged.
fn ingest(server: &Server, from: usize, n: usize, batch: usize) {
    for start in (from..from + n).step_by(batch) {
        let events: Vec<String> = (start..(start + batch).min(from + n))
            .map(|i| event(&format!("k{}", i % 5000), i as i64, Some(&format!("e{i}"))))
            .collect();
        let (status, v) = server.post("/v1/events", &format!("[{}]", events.join(",")));
        assert_eq!(status, 200, "{v}");
    }
}

fn wait_rows(table: &str, rows: i64, within: Duration) {
    let deadline = Instant::now() + within;
    let mut client = pg();
    while history_counts(&mut client, table).0 < rows {
        assert!(
            Instant::now() < deadline,
            "history has {:?} of {rows} rows",
            history_counts(&mut client, table)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether every partition still has its first segment (offset 0).
fn first_segments_kept(data: &Path) -> bool {
    (0..4).all(|p| data.join(format!("log/p-{p:04}/{:020}.seg", 0)).exists())
}

#[test]
fn a_postgres_outage_longer_than_retention_loses_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_outage_{}", std::process::id());
    drop_all(&table);
    let down = outage_config(&pg_at(closed_port()), &table, "", "");
    let server = Server::start(dir.path(), &down);
    ingest(&server, 0, 40_000, 1000);
    // Several snapshots and a dozen retention passes with everything past its retention.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        server.metric("quiver_history_lag_records") >= 40_000.0,
        "the sink could write nothing"
    );
    assert!(
        first_segments_kept(&server.data_dir),
        "retention kept what the history sink has not written"
    );
    let data = server.data_dir.clone();
    server.stop();

    // PostgreSQL is back (the right URL): every acknowledged event lands, once.
    std::fs::write(
        dir.path().join("quiver.toml"),
        outage_config(PG, &table, "", ""),
    )
    .unwrap();
    let server = Server::restart(dir.path());
    wait_rows(&table, 40_000, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(history_counts(&mut pg(), &table), (40_000, 40_000));
    // Now that the sink has it all, retention does delete.
    let deadline = Instant::now() + Duration::from_secs(15);
    while first_segments_kept(&data) {
        assert!(
            Instant::now() < deadline,
            "retention never ran once the sink caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(server.metric("quiver_history_lost_records_total"), 0.0);
    drop_all(&table);
}

#[test]
fn a_lossy_sink_counts_logs_and_records_every_lost_range() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_lossy_{}", std::process::id());
    drop_all(&table);
    let down = outage_config(&pg_at(closed_port()), &table, "", "lossy = true");
    let server = Server::start(dir.path(), &down);
    ingest(&server, 0, 20_000, 1000);
    let deadline = Instant::now() + Duration::from_secs(15);
    while first_segments_kept(&server.data_dir) {
        assert!(
            Instant::now() < deadline,
            "retention never deleted for a lossy sink"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
    std::fs::write(
        dir.path().join("quiver.toml"),
        outage_config(PG, &table, "", "lossy = true"),
    )
    .unwrap();
    let server = Server::restart(dir.path());
    let lost_in_pg = || -> i64 {
        pg().query_one(
            &format!("SELECT coalesce(sum(to_offset - from_offset), 0)::bigint FROM {table}_gaps"),
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while history_counts(&mut pg(), &table).0 + lost_in_pg() < 20_000 {
        assert!(
            Instant::now() < deadline,
            "the sink never accounted for every event"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let lost = lost_in_pg();
    assert!(lost > 0, "retention took records from under the lossy sink");
    assert_eq!(
        history_counts(&mut pg(), &table).0 + lost,
        20_000,
        "each event is written or in a gap, never both, never neither"
    );
    assert_eq!(
        server.metric("quiver_history_lost_records_total"),
        lost as f64,
        "the loss is counted"
    );
    drop_all(&table);
}

#[test]
fn at_the_disk_bound_ingest_answers_503_then_drains_when_postgres_returns() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_disk_{}", std::process::id());
    drop_all(&table);
    let proxy = pg_proxy::Proxy::start();
    proxy.cut();
    let config = outage_config(
        &pg_at(proxy.addr.port()),
        &table,
        "disk_bytes_max = 262144",
        "",
    )
    .replace("segment_bytes = 65536", "segment_bytes = 16384");
    let server = Server::start(dir.path(), &config);
    let client = client();
    let post = |from: usize| {
        let events: Vec<String> = (from..from + 100)
            .map(|i| event(&format!("k{}", i % 500), i as i64, Some(&format!("e{i}"))))
            .collect();
        client
            .post(format!("{}/v1/events", server.url))
            .body(format!("[{}]", events.join(",")))
            .send()
            .unwrap()
    };
    let mut acked = 0;
    let full = loop {
        let resp = post(acked);
        if resp.status() != 200 {
            break resp;
        }
        acked += 100;
        assert!(acked < 100_000, "the disk bound never bit");
    };
    assert_eq!(full.status(), 503);
    assert!(full.headers().get("retry-after").is_some(), "Retry-After");
    let body: serde_json::Value = full.json().unwrap();
    assert_eq!(body["error"]["code"], "DISK_FULL", "{body}");
    assert_eq!(body["error"]["details"]["held_by"], "history", "{body}");
    assert!(
        acked >= 1000,
        "the bound leaves room for real work ({acked})"
    );

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resp = post(acked);
        if resp.status() == 200 {
            acked += 100;
            break;
        }
        assert_eq!(resp.status(), 503);
        assert!(
            Instant::now() < deadline,
            "ingest never resumed after the sink drained"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_rows(&table, acked as i64, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        history_counts(&mut pg(), &table),
        (acked as i64, acked as i64),
        "every acknowledged event is in history, once"
    );
    drop(server);
    drop_all(&table);
}

#[test]
fn event_time_sees_what_happened_by_t_whenever_it_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let now = quiver_core::time::now_ms();
    let hour_ago = now - 3_600_000;
    // Ingested now, with event times over the last hour, newest first (out of order).
    let events: Vec<String> = (0..60)
        .rev()
        .map(|i| {
            format!(
                r#"{{"view":"txn","key":"u1","ts":{},"values":{{"seq":{i}}}}}"#,
                hour_ago + i * 60_000
            )
        })
        .collect();
    assert_eq!(
        server
            .post("/v1/events", &format!("[{}]", events.join(",")))
            .0,
        200
    );
    let half_hour_ago = hour_ago + 30 * 60_000;
    let ask = |semantics: Option<&str>| {
        let mut body = json!({"features": ["txn:seq"], "entities": {"user_id": ["u1", "u1"]},
                              "timestamps": [half_hour_ago, half_hour_ago - 1]});
        if let Some(s) = semantics {
            body["semantics"] = json!(s);
        }
        let (status, v) = server.post("/v1/features/historical", &body.to_string());
        assert_eq!(status, 200, "{v}");
        v["results"][1].clone()
    };
    let default = ask(None);
    assert_eq!(default["values"], json!([30, 29]), "the event at T counts");
    assert_eq!(default["statuses"], json!(["PRESENT", "PRESENT"]));
    assert_eq!(ask(Some("event_time")), default);
    let served = ask(Some("as_served"));
    assert_eq!(
        served["statuses"],
        json!(["NOT_FOUND", "NOT_FOUND"]),
        "nothing had been served half an hour ago"
    );
    let bad = json!({"features": ["txn:seq"], "entities": {"user_id": ["u1"]},
                     "timestamps": [now], "semantics": "wall_clock"});
    let (status, v) = server.post("/v1/features/historical", &bad.to_string());
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST"))
    );
}

/// A deterministic stream of (key, event time, seq, amount) over the past year, event times
/// unique per key, in the file's order.
fn backfill_events(now: i64) -> Vec<(String, i64, i64, Option<f64>)> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..3000)
        .map(|i| {
            let key = format!("b{}", next() % 40);
            // Unique per key: the index breaks every tie.
            let ts = now - 365 * 86_400_000 + (next() % (364 * 86_400)) as i64 * 1000 + i;
            let amount = (next() % 10 != 0).then(|| (next() % 10_000) as f64 / 8.0);
            (key, ts, i, amount)
        })
        .collect()
}

fn write_events_parquet(path: &Path, events: &[(String, i64, i64, Option<f64>)]) {
    use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use std::sync::Arc;
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "user_id",
            Arc::new(StringArray::from_iter_values(
                events.iter().map(|e| e.0.as_str()),
            )),
        ),
        (
            "event_timestamp",
            Arc::new(
                TimestampMillisecondArray::from_iter_values(events.iter().map(|e| e.1))
                    .with_timezone("UTC"),
            ),
        ),
        (
            "seq",
            Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.2))),
        ),
        (
            "amount",
            Arc::new(Float64Array::from_iter(events.iter().map(|e| e.3))),
        ),
    ];
    write_parquet(path, columns);
}

fn write_parquet(path: &Path, columns: Vec<(&str, arrow_array::ArrayRef)>) {
    let batch = arrow_array::RecordBatch::try_from_iter(columns).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The definition of an event-time read of `seq` and `amount` (view TTL 1h), as CSV cells.
fn oracle(events: &[(String, i64, i64, Option<f64>)], key: &str, t: i64) -> (String, String) {
    let latest = |with_amount: bool| {
        events
            .iter()
            .filter(|e| e.0 == key && e.1 <= t && (!with_amount || e.3.is_some()))
            .max_by_key(|e| e.1)
            .filter(|e| t - e.1 <= 3_600_000)
    };
    let seq = latest(false).map(|e| e.2.to_string()).unwrap_or_default();
    let amount = latest(true)
        .and_then(|e| e.3)
        .map(|a| serde_json::Value::from(a).to_string())
        .unwrap_or_default();
    (seq, amount)
}

#[test]
fn a_parquet_backfill_reads_back_point_in_time_by_event_time() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_backfill_{}", std::process::id());
    drop_all(&table);
    let server = Server::start(dir.path(), &history_config(&table, ""));
    let now = quiver_core::time::now_ms();
    let events = backfill_events(now);
    let file = dir.path().join("backfill.parquet");
    write_events_parquet(&file, &events);
    let (ok, stdout, stderr) = quiver(&[
        "push",
        file.to_str().unwrap(),
        "--url",
        &server.url,
        "--view",
        "txn",
        "--key-column",
        "user_id",
        "--batch-size",
        "500",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("pushed 3000 events"), "{stdout}");
    wait_rows(&table, 3000, Duration::from_secs(30));

    // Entity rows: instants near events (inside and outside the 1 h TTL) and far from any.
    let rows: Vec<(String, i64)> = events
        .iter()
        .step_by(7)
        .enumerate()
        .map(|(i, e)| {
            (
                e.0.clone(),
                e.1 + [0, 1, 59 * 60_000, 61 * 60_000, -1][i % 5],
            )
        })
        .collect();
    let entities = dir.path().join("rows.parquet");
    write_parquet(
        &entities,
        vec![
            (
                "user_id",
                std::sync::Arc::new(arrow_array::StringArray::from_iter_values(
                    rows.iter().map(|r| r.0.as_str()),
                )),
            ),
            (
                "event_timestamp",
                std::sync::Arc::new(
                    arrow_array::TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| r.1),
                    )
                    .with_timezone("UTC"),
                ),
            ),
        ],
    );
    let read = |semantics: &str| -> Vec<Vec<String>> {
        let out = dir.path().join(format!("train_{semantics}.csv"));
        let (ok, stdout, stderr) = quiver(&[
            "history",
            "--entities",
            entities.to_str().unwrap(),
            "--features",
            "txn:seq,txn:amount",
            "--out",
            out.to_str().unwrap(),
            "--url",
            &server.url,
            "--semantics",
            semantics,
            "--chunk-rows",
            "100",
        ]);
        assert!(ok, "{stdout}{stderr}");
        let mut r = csv::Reader::from_path(&out).unwrap();
        assert_eq!(
            r.headers().unwrap(),
            vec!["user_id", "event_timestamp", "seq", "amount"]
        );
        r.records()
            .map(|rec| rec.unwrap().iter().map(str::to_string).collect())
            .collect()
    };
    let got = read("event_time");
    assert_eq!(got.len(), rows.len());
    let mut present = 0;
    for ((key, t), row) in rows.iter().zip(&got) {
        assert_eq!((&row[0], row[1].parse::<i64>().unwrap()), (key, *t));
        let (seq, amount) = oracle(&events, key, *t);
        assert_eq!((&row[2], &row[3]), (&seq, &amount), "{key} at {t}");
        present += usize::from(!seq.is_empty());
    }
    assert!(
        present > rows.len() / 3,
        "the comparison sees real values ({present})"
    );
    // As served, the past saw nothing of a backfill loaded today.
    assert!(read("as_served")
        .iter()
        .all(|r| r[2].is_empty() && r[3].is_empty()));
    drop(server);
    drop_all(&table);
}

/// Whether the backends of `app` are over TLS: (connections, all of them TLS).
fn tls_of(app: &str) -> (i64, bool) {
    let row = pg()
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn the_history_sink_speaks_tls_to_postgresql_and_checks_the_ca_it_is_given() {
    let ssl: String = pg().query_one("SHOW ssl", &[]).unwrap().get(0);
    assert_eq!(
        ssl, "on",
        "the test PostgreSQL serves TLS (CI's and this machine's do)"
    );
    for (mode, tls) in [("disable", false), ("require", true)] {
        let table = format!("qv_tls_{mode}_{}", std::process::id());
        drop_all(&table);
        let app = format!("quiver-tls-{mode}-{}", std::process::id());
        let url = format!("{PG} sslmode={mode} application_name={app}");
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path(), &outage_config(&url, &table, "", ""));
        ingest(&server, 0, 200, 100);
        wait_rows(&table, 200, Duration::from_secs(20));
        let (connections, all_tls) = tls_of(&app);
        assert!(connections > 0, "{mode}: the sink's connections are seen");
        assert_eq!(all_tls, tls, "sslmode={mode}");
        server.stop();
        drop_all(&table);
    }

    // A CA that did not sign PostgreSQL's certificate: the sink refuses the server (and
    // says so), nothing is written, and ingest goes on.
    let table = format!("qv_tls_ca_{}", std::process::id());
    drop_all(&table);
    let dir = tempfile::tempdir().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let app = format!("quiver-tls-ca-{}", std::process::id());
    let url = format!("{PG} sslmode=require application_name={app}");
    let extra = format!("ca_file = \"{}\"", ca_file.display());
    let server = Server::start(dir.path(), &outage_config(&url, &table, "", &extra));
    ingest(&server, 0, 50, 50);
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.metric("quiver_history_errors_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the refused certificate is an error"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(tls_of(&app).0, 0, "no session was opened");
    assert_eq!(history_counts(&mut pg(), &table), (0, 0));
    server.stop();
    drop_all(&table);
}
