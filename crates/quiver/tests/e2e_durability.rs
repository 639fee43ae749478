//! Durability and backpressure with the real binary: `kill -9` in the middle of durable ingest
//! loses no acknowledged event and applies none twice; a full queue answers 503 with
//! `Retry-After` and memory stays bounded.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Online snapshots copy rows while ingest goes on; a `kill -9` in the middle of that, and the
/// state recovered from the snapshots and the log after them is the state of replaying the
/// whole log: no record applied twice (the counts), none lost (the latest values).
#[test]
fn kill9_amid_online_snapshots_recovers_the_state_of_a_whole_replay() {
    const KEYS: i64 = 4000;
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG
        .replace(
            "snapshot_interval = \"1s\"",
            "snapshot_interval = \"100ms\"\nsnapshot_change_ratio = 0.0",
        )
        .replace(
            "  { name = \"seq\", type = \"i64\" },\n]",
            "  { name = \"seq\", type = \"i64\" },\n]\nallowed_lateness = \"10m\"\naggregations = [\n  { name = \"n_1h\", of = \"amount\", fn = \"count\", window = \"1h\" },\n  { name = \"sum_1h\", of = \"amount\", fn = \"sum\", window = \"1h\" },\n]",
        );
    assert!(
        config.contains("n_1h") && config.contains("100ms"),
        "{config}"
    );
    let server = Server::start(dir.path(), &config);
    let url = server.url.clone();
    // Enough rows that copying a partition takes a while: records arrive during the copy.
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let now = quiver_core::time::now_ms();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (stop, url) = (stop.clone(), url.clone());
            std::thread::spawn(move || {
                let client = client();
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    // Keys come back again and again, some events out of order (late values).
                    let body: Vec<String> = (0..100)
                        .map(|i| {
                            n += 1;
                            let (key, ts) = ((n * 7 + w) % KEYS, now - (n * 13 % 600) * 1000);
                            format!(
                                r#"{{"view":"txn","key":"k{key}","ts":{ts},"values":{{"amount":{},"seq":{n},"merchant":"m{i}"}}}}"#,
                                n % 17
                            )
                        })
                        .collect();
                    let sent = client
                        .post(format!("{url}/v1/events?ack=durable"))
                        .body(format!("[{}]", body.join(",")))
                        .send();
                    if sent.is_err() {
                        return; // the server is gone
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    let applied = server.metric("quiver_events_applied_total");
    let taken = server.metric("quiver_snapshot_seconds_count");
    let dir = server.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        applied > 5_000.0,
        "ingest under load before the kill ({applied} applied)"
    );
    assert!(
        taken >= 4.0,
        "snapshots taken under load before the kill ({taken})"
    );
    let snaps = snapshot_files(&dir);
    assert!(!snaps.is_empty());
    for snap in &snaps {
        assert_eq!(&std::fs::read(snap).unwrap()[..8], b"QVSNAP05", "{snap:?}");
    }

    let server = Server::restart(&dir);
    let recovered = read_all(&server, "txn", &keys);
    server.stop();
    for snap in snapshot_files(&dir) {
        std::fs::remove_file(snap).unwrap();
    }
    let server = Server::restart(&dir);
    let replayed = read_all(&server, "txn", &keys);
    server.stop();
    let counted: f64 = replayed
        .iter()
        .map(|v| v["features"]["n_1h"]["value"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(counted > 5_000.0, "{counted} events counted");
    for (i, (a, b)) in recovered.iter().zip(&replayed).enumerate() {
        assert_eq!(a, b, "k{i}: recovered from snapshots vs replayed whole");
    }
}

#[test]
fn kill9_during_durable_ingest_loses_no_acked_event_and_applies_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let url = server.url.clone();
    // Writers send batches of unique keys with event ids; each records what was acknowledged.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, stop, url) = (acked.clone(), stop.clone(), url.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut batch_no = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let events: Vec<(String, i64)> = (0..50)
                        .map(|i| (format!("w{w}-b{batch_no}-{i}"), batch_no * 1000 + i))
                        .collect();
                    let body: Vec<String> = events
                        .iter()
                        .map(|(k, s)| event(k, *s, Some(&format!("id-{k}"))))
                        .collect();
                    let resp = client
                        .post(format!("{url}/v1/events?ack=durable"))
                        .body(format!("[{}]", body.join(",")))
                        .send();
                    match resp {
                        Ok(r) if r.status() == 200 => acked.lock().unwrap().extend(events),
                        Ok(_) => {}
                        Err(_) => return, // the server is gone
                    }
                    batch_no += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let dir = server.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 500,
        "the test must ingest under load before the kill ({} acked)",
        acked.len()
    );

    let (ok, stdout, _) = quiver(&["log", "verify", dir.join("data").to_str().unwrap()]);
    assert!(
        ok,
        "after kill -9 the log only has a torn tail at most: {stdout}"
    );

    let server = Server::restart(&dir);
    let keys: Vec<String> = acked.iter().map(|(k, _)| k.clone()).collect();
    let got = read_seqs(&server, &keys);
    let missing: Vec<&String> = keys
        .iter()
        .zip(&got)
        .filter(|(_, g)| g.is_none())
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for ((_, want), got) in acked.iter().zip(&got) {
        assert_eq!(Some(*want), *got);
    }

    // Producers retry what they think may be lost: the same event ids must change nothing.
    let versions_before: Vec<u64> = keys
        .iter()
        .take(50)
        .map(|k| {
            server.get(&format!("/v1/features/txn/{k}")).1["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let retry: Vec<String> = acked
        .iter()
        .take(50)
        .map(|(k, s)| event(k, *s, Some(&format!("id-{k}"))))
        .collect();
    let (status, reply) = server.post("/v1/events", &format!("[{}]", retry.join(",")));
    assert_eq!(status, 200);
    let token = reply["token"].as_str().unwrap();
    for (k, before) in keys.iter().take(50).zip(versions_before) {
        let (_, row) = server.get_with(
            &format!("/v1/features/txn/{k}"),
            &[("Quiver-Read-After", token)],
        );
        assert_eq!(
            row["version"].as_u64().unwrap(),
            before,
            "{k} applied twice"
        );
    }
    assert!(server.metric("quiver_events_duplicate_total") >= 50.0);
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_queue_config();
    let server = Server::start(dir.path(), &config);
    let url = server.url.clone();
    let rss_before = server.rss_bytes();
    /// (status, Retry-After, body) of every POST.
    type Outcome = (u16, Option<String>, String);
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let clients: Vec<_> = (0..16)
        .map(|c| {
            let (results, url) = (results.clone(), url.clone());
            std::thread::spawn(move || {
                let client = client();
                for b in 0..40 {
                    let body: Vec<String> = (0..100)
                        .map(|i| event(&format!("c{c}-{b}-{i}"), i, None))
                        .collect();
                    let r = client
                        .post(format!("{url}/v1/events"))
                        .body(format!("[{}]", body.join(",")))
                        .send()
                        .unwrap();
                    let status = r.status().as_u16();
                    let retry_after = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    let text = r.text().unwrap();
                    results.lock().unwrap().push((status, retry_after, text));
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let results = results.lock().unwrap();
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(ok > 0, "some batches are admitted");
    assert!(
        !full.is_empty(),
        "16 writers against a 200-event queue with fsync=always must overflow it"
    );
    assert_eq!(ok + full.len(), results.len(), "only 200 or 503");
    for (_, retry_after, body) in &full {
        assert!(retry_after
            .as_deref()
            .is_some_and(|s| s.parse::<u32>().unwrap() >= 1));
        assert!(body.contains("QUEUE_FULL"), "{body}");
    }
    assert_eq!(
        server.metric("quiver_events_ingested_total"),
        (ok * 100) as f64,
        "refused batches wrote nothing"
    );
    let rss_after = server.rss_bytes();
    assert!(
        rss_after < rss_before + 64 * 1024 * 1024,
        "memory grew from {rss_before} to {rss_after} bytes under overload"
    );
}

#[test]
fn push_retries_through_backpressure_and_lands_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_queue_config();
    let server = Server::start(dir.path(), &config);
    let lines: Vec<String> = (0..4000)
        .map(|i| event(&format!("p{i}"), i, Some(&format!("e{i}"))))
        .collect();
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (ok, stdout, stderr) = quiver(&[
        "push",
        file.to_str().unwrap(),
        "--url",
        &server.url,
        "--batch-size",
        "100",
        "--concurrency",
        "8",
        "--attempts-max",
        "50",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("pushed 4000 events in 40 batches"),
        "{stdout}"
    );
    assert_eq!(
        server.metric("quiver_events_ingested_total"),
        4000.0,
        "each batch appended exactly once"
    );
    let keys: Vec<String> = (0..4000).map(|i| format!("p{i}")).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read_seqs(&server, &keys).iter().any(Option::is_none) {
        assert!(
            std::time::Instant::now() < deadline,
            "pushed events never all became readable"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{stdout}");

    // A bad event stops the push with the server's structured error.
    let mut bad = lines[..300].to_vec();
    bad[150] = r#"{"view":"txn","key":"x","values":{"seq":"not a number"}}"#.into();
    std::fs::write(&file, bad.join("\n")).unwrap();
    let (ok, _, stderr) = quiver(&[
        "push",
        file.to_str().unwrap(),
        "--url",
        &server.url,
        "--batch-size",
        "100",
        "--concurrency",
        "1",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("INVALID_EVENT") && stderr.contains("values.seq"),
        "{stderr}"
    );
}

#[test]
fn history_sink_survives_kill9_mid_stream_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_kill_{}", std::process::id());
    let config = history_config(&table, "batch_rows_max = 200");
    let server = Server::start(dir.path(), &config);
    let url = server.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (stop, url) = (stop.clone(), url.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut b = 0;
                while !stop.load(Ordering::Relaxed) {
                    let body: Vec<String> = (0..50)
                        .map(|i| event(&format!("w{w}-{b}-{i}"), i, Some(&format!("w{w}-{b}-{i}"))))
                        .collect();
                    if client
                        .post(format!("{url}/v1/events"))
                        .body(format!("[{}]", body.join(",")))
                        .send()
                        .is_err()
                    {
                        return;
                    }
                    b += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(600));
    let dir = server.kill9();
    stop.store(true, Ordering::Relaxed);
    writers.into_iter().for_each(|w| w.join().unwrap());

    let server = Server::restart(&dir);
    let records = || -> f64 { server.metric("quiver_log_next_offset") };
    let total = records();
    assert!(
        total >= 300.0,
        "the stream ran before the kill ({total} records)"
    );
    let mut client = postgres::Client::connect(PG, postgres::NoTls).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while history_counts(&mut client, &table).0 < total as i64 {
        assert!(
            std::time::Instant::now() < deadline,
            "history stuck at {:?} of {total}",
            history_counts(&mut client, &table)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let counts = history_counts(&mut client, &table);
    drop_history(&mut client, &table);
    assert_eq!(
        counts,
        (total as i64, total as i64),
        "every log record once in PostgreSQL"
    );
}
