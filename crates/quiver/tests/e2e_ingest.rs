//! End to end with the real binary: push and read back, the bad-input matrix, idempotency
//! across a restart, read-your-writes tokens, log tools, config errors.

mod common;

use common::*;
use serde_json::json;

#[test]
fn push_file_and_read_back_every_entity() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    // 3000 events over 300 keys; the last event per key (in file order, same event time
    // order) must be what every read returns.
    let mut lines = Vec::new();
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..3000i64 {
        let key = format!("u{}", (i * 7) % 300);
        lines.push(format!(
            r#"{{"view":"txn","key":"{key}","ts":{},"values":{{"seq":{i},"merchant":"m{i}"}}}}"#,
            1_800_000_000_000i64 + i
        ));
        expected.insert(key, i);
    }
    let file = dir.path().join("events.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (ok, stdout, stderr) = quiver(&[
        "push",
        file.to_str().unwrap(),
        "--url",
        &server.url,
        "--batch-size",
        "250",
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("pushed 3000 events"), "{stdout}");

    // Pushed with ack=durable, so a read-after token is not needed for durability, but the
    // materializer may still be applying: wait for the ingested count to be applied.
    let keys: Vec<String> = expected.keys().cloned().collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = read_seqs(&server, &keys);
        let want: Vec<Option<i64>> = expected.values().map(|v| Some(*v)).collect();
        if got == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reads never converged to the pushed values"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (status, v) = server.get("/v1/features/txn/u7");
    assert_eq!(status, 200);
    assert_eq!(v["features"]["seq"]["status"], "PRESENT");
    assert_eq!(v["features"]["amount"]["status"], "NOT_FOUND", "never sent");
    assert!(v["version"].as_u64().unwrap() > 0);

    // CSV goes through the same path.
    let csv = dir.path().join("events.csv");
    std::fs::write(&csv, "key,seq,merchant\ncsv1,5,m1\ncsv2,6,\n").unwrap();
    let (ok, stdout, stderr) = quiver(&[
        "push",
        csv.to_str().unwrap(),
        "--url",
        &server.url,
        "--view",
        "txn",
    ]);
    assert!(ok, "{stdout}{stderr}");
    // Acknowledged is durable, not yet applied: poll (bounded) until the materializer has it.
    wait_seqs(
        &server,
        &["csv1".into(), "csv2".into()],
        &[Some(5), Some(6)],
    );
}

#[test]
fn feast_shape() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let (status, reply) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","ts":"2026-11-23T10:00:00Z","values":{"amount":12.5,"merchant":null}}]"#,
    );
    assert_eq!(status, 200, "{reply}");
    let token = reply["token"].as_str().unwrap().to_string();
    let body = json!({"features": ["txn:amount", "txn:merchant", "txn:seq"], "entities": {"user_id": ["u1", "u2"]}, "full_feature_names": true});
    let (status, v) = server.post_with(
        "/get-online-features",
        &body.to_string(),
        &[("Quiver-Read-After", &token)],
    );
    assert_eq!(status, 200, "{v}");
    // TTL is 1h and the event is from 10:00 today; compute what the server must say.
    let age_ok = quiver_core::time::now_ms()
        - quiver_core::time::parse_rfc3339_ms("2026-11-23T10:00:00Z").unwrap()
        <= 3_600_000;
    assert_eq!(
        v["metadata"]["feature_names"],
        json!(["user_id", "txn__amount", "txn__merchant", "txn__seq"])
    );
    assert_eq!(v["results"][0]["values"], json!(["u1", "u2"]));
    let amount = &v["results"][1];
    if age_ok {
        assert_eq!(amount["statuses"], json!(["PRESENT", "NOT_FOUND"]));
        assert_eq!(amount["values"], json!([12.5, null]));
        assert_eq!(
            v["results"][2]["statuses"],
            json!(["NULL_VALUE", "NOT_FOUND"])
        );
    } else {
        assert_eq!(amount["statuses"], json!(["OUTSIDE_MAX_AGE", "NOT_FOUND"]));
        assert_eq!(
            amount["values"],
            json!([null, null]),
            "a stale value is never served"
        );
    }
    assert_eq!(amount["event_timestamps"][0], "2026-11-23T10:00:00.000Z");
    assert_eq!(amount["event_timestamps"][1], "1970-01-01T00:00:00Z");
    assert_eq!(
        v["results"][3]["statuses"],
        json!(["NOT_FOUND", "NOT_FOUND"])
    );
}

/// Every read is timed in `quiver_lookup_seconds` under its path (README "Metrics"), through
/// handles the server registers once at start, after the recorder is installed.
#[test]
fn reads_are_timed_in_lookup_seconds_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let (status, reply) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"amount":12.5}}]"#,
    );
    assert_eq!(status, 200, "{reply}");
    let token = reply["token"].as_str().unwrap().to_string();
    let body = json!({"features": ["txn:amount"], "entities": {"user_id": ["u1"]}});
    for _ in 0..2 {
        let (status, v) = server.post_with(
            "/get-online-features",
            &body.to_string(),
            &[("Quiver-Read-After", &token)],
        );
        assert_eq!(status, 200, "{v}");
    }
    for _ in 0..3 {
        assert_eq!(server.get("/v1/features/txn/u1").0, 200);
    }
    let count =
        |path: &str| server.metric_with("quiver_lookup_seconds_count", &format!("path=\"{path}\""));
    assert_eq!((count("single"), count("batch")), (3.0, 2.0));
}

#[test]
fn bad_input_is_rejected_whole_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "[log]",
        "[limits]\nrequest_body_bytes_max = 20000\nbatch_events_max = 50\n\n[log]",
    );
    let server = Server::start(dir.path(), &config);
    let good = event("victim", 1, None);
    let big_string = "x".repeat(30_000);
    let too_many: Vec<String> = (0..51).map(|i| event("victim", i, None)).collect();
    let cases: Vec<(String, u16, &str, serde_json::Value)> = vec![
        (format!(r#"[{good},{{"view":"nope","key":"victim","values":{{"seq":1}}}}]"#), 400, "INVALID_EVENT", json!({"index": 1, "field": "view", "reason": "unknown_view"})),
        (format!(r#"[{good},{{"view":"txn","key":"victim","values":{{"nope":1}}}}]"#), 400, "INVALID_EVENT", json!({"index": 1, "field": "values.nope", "reason": "unknown_feature"})),
        (format!(r#"[{good},{{"view":"txn","key":"victim","values":{{"seq":"one"}}}}]"#), 400, "INVALID_EVENT", json!({"index": 1, "field": "values.seq", "reason": "wrong_type"})),
        (format!(r#"[{good},{{"view":"txn","values":{{"seq":1}}}}]"#), 400, "INVALID_EVENT", json!({"index": 1, "field": "key", "reason": "missing_field"})),
        (format!(r#"[{good},{{"view":"txn","key":"victim","ts":"tomorrow","values":{{"seq":1}}}}]"#), 400, "INVALID_EVENT", json!({"index": 1, "field": "ts", "reason": "bad_timestamp"})),
        (format!(r#"[{good},{{"view":"txn","key":"victim","values":{{"amount":NaN}}}}]"#), 400, "INVALID_EVENT", json!({"reason": "malformed_json"})),
        (format!("{good}\n{{\"view\":\"txn\",\"key\":\"victim\",\"values\":{{\"amount\":\"NaN\"}}}}"), 400, "INVALID_EVENT", json!({"index": 1, "field": "values.amount", "reason": "wrong_type"})),
        (format!("[{good},{{\"view\":\"txn\",\"key\":\"victim\",\"values\":{{\"merchant\":\"{big_string}\"}}}}]"), 413, "BODY_TOO_LARGE", json!({"limit_bytes": 20000})),
        (format!("[{}]", too_many.join(",")), 413, "INVALID_EVENT", json!({"reason": "batch_too_large"})),
        ("[]".into(), 400, "INVALID_EVENT", json!({"reason": "empty_batch"})),
        ("not json".into(), 400, "INVALID_EVENT", json!({"index": 0, "reason": "malformed_json"})),
    ];
    for (body, status, code, details) in &cases {
        let (got, v) = server.post("/v1/events", body);
        assert_eq!(got, *status, "{v}");
        assert_eq!(v["error"]["code"], *code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        for (k, want) in details.as_object().unwrap() {
            assert_eq!(&v["error"]["details"][k], want, "detail {k} of {v}");
        }
    }
    let (got, v) = server.post("/v1/events?ack=maybe", &format!("[{good}]"));
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (400, Some("BAD_PARAMETER"))
    );
    let (got, v) = server.get_with(
        "/v1/features/txn/victim",
        &[("Quiver-Read-After", "garbage")],
    );
    assert_eq!((got, v["error"]["code"].as_str()), (400, Some("BAD_TOKEN")));
    let (got, v) = server.get("/v1/features/nope/victim");
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (404, Some("UNKNOWN_VIEW"))
    );
    let (got, v) = server.post(
        "/v1/features",
        r#"{"features":["txn:nope"],"entities":{"user_id":["a"]}}"#,
    );
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (400, Some("UNKNOWN_FEATURE"))
    );
    let (got, v) = server.post(
        "/v1/features",
        r#"{"features":["txn:seq"],"entities":{"account":["a"]}}"#,
    );
    assert_eq!(
        (got, v["error"]["code"].as_str()),
        (400, Some("MISSING_ENTITY"))
    );
    let (got, v) = server.get("/v2/nothing");
    assert_eq!((got, v["error"]["code"].as_str()), (404, Some("NOT_FOUND")));

    // Nothing reached the log or the store.
    assert_eq!(server.metric("quiver_events_ingested_total"), 0.0);
    assert!(server.metric("quiver_events_rejected_total") >= cases.len() as f64);
    // The standard process metrics, as Prometheus' client libraries name them.
    let text = server.metrics_text();
    for line in [
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(text.contains(line), "{text}");
    }
    assert!(server.metric("process_resident_memory_bytes") > 1e6);
    let (got, _) = server.get("/v1/features/txn/victim");
    assert_eq!(got, 404);
    let dir = server.stop();
    let (ok, stdout, _) = quiver(&["log", "inspect", dir.join("data").to_str().unwrap()]);
    assert!(ok);
    assert!(stdout.contains("total: 0 records"), "{stdout}");
}

#[test]
fn idempotency_key_replays_the_first_reply_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let body = format!("[{},{}]", event("a", 1, None), event("b", 2, None));
    let key = [("Idempotency-Key", "batch-0001")];
    let (status, first) = server.post_with("/v1/events", &body, &key);
    assert_eq!(status, 200, "{first}");
    let token = first["token"].as_str().unwrap().to_string();
    let (_, row) = server.get_with("/v1/features/txn/a", &[("Quiver-Read-After", &token)]);
    let version = row["version"].as_u64().unwrap();

    let (status, again) = server.post_with("/v1/events", &body, &key);
    assert_eq!(
        (status, &again),
        (200, &first),
        "a retry gets the first reply"
    );
    let (status, v) = server.post_with("/v1/events", &format!("[{}]", event("c", 3, None)), &key);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("IDEMPOTENCY_KEY_REUSED"))
    );

    let dir = server.kill9();
    let server = Server::restart(&dir);
    let (status, after) = server.post_with("/v1/events", &body, &key);
    assert_eq!(
        (status, &after),
        (200, &first),
        "the first reply survives kill -9"
    );
    assert_eq!(
        server.metric("quiver_events_ingested_total"),
        0.0,
        "nothing appended again"
    );
    let (_, row) = server.get("/v1/features/txn/a");
    assert_eq!(row["version"].as_u64().unwrap(), version, "applied once");
}

#[test]
fn read_after_token_sees_own_writes_or_503s() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    for i in 0..20 {
        let (status, reply) = server.post(
            "/v1/events?ack=none",
            &format!("[{}]", event("rw", i, None)),
        );
        assert_eq!(status, 200);
        let token = reply["token"].as_str().unwrap();
        let (status, v) = server.get_with("/v1/features/txn/rw", &[("Quiver-Read-After", token)]);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["features"]["seq"]["value"], i, "read-your-writes");
    }
    let (status, v) = server.get_with(
        "/v1/features/txn/rw",
        &[("Quiver-Read-After", "0:999999999")],
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("READ_AFTER_TIMEOUT"))
    );
}

#[test]
fn invalid_config_fails_at_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[log]\npartitions = \"eight\"\n").unwrap();
    let (ok, _, stderr) = quiver(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(stderr.contains("log.partitions"), "{stderr}");
    std::fs::write(&path, CONFIG.replace("ttl = \"1h\"", "ttl = \"soon\"")).unwrap();
    let (ok, _, stderr) = quiver(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(!ok);
    assert!(stderr.contains("view[0].ttl"), "{stderr}");
}

#[test]
fn log_verify_finds_damage() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let events: Vec<String> = (0..200).map(|i| event(&format!("k{i}"), i, None)).collect();
    assert_eq!(
        server
            .post("/v1/events", &format!("[{}]", events.join(",")))
            .0,
        200
    );
    let dir = server.stop();
    let data = dir.join("data");
    let (ok, stdout, _) = quiver(&["log", "verify", data.to_str().unwrap()]);
    assert!(ok, "{stdout}");
    assert!(stdout.contains("total: 200 records"), "{stdout}");
    let seg = data.join("log/p-0000/00000000000000000000.seg");
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&seg, bytes).unwrap();
    let (ok, stdout, _) = quiver(&["log", "verify", data.to_str().unwrap()]);
    assert!(!ok);
    assert!(stdout.contains("ERROR partition 0"), "{stdout}");
}

#[test]
fn aggregations_are_served_on_every_read_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "  { name = \"seq\", type = \"i64\" },\n]",
        "  { name = \"seq\", type = \"i64\" },\n]\nallowed_lateness = \"10m\"\naggregations = [\n  { name = \"amount_sum_1h\", of = \"amount\", fn = \"sum\", window = \"1h\" },\n  { name = \"amount_count_1h\", of = \"amount\", fn = \"count\", window = \"1h\", tile = \"1m\" },\n]",
    );
    assert!(config.contains("amount_sum_1h"));
    let server = Server::start(dir.path(), &config);
    let now = quiver_core::time::now_ms();
    let events: Vec<String> = [
        (now - 50 * 60_000, 1.0),
        (now - 20 * 60_000, 2.0),
        (now - 60_000, 4.0),
        (now - 2 * 3_600_000, 100.0),
    ]
    .iter()
    .map(|(ts, a)| format!(r#"{{"view":"txn","key":"card","ts":{ts},"values":{{"amount":{a}}}}}"#))
    .collect();
    let (status, reply) = server.post("/v1/events", &events.join("\n"));
    assert_eq!(status, 200, "{reply}");
    let token = reply["token"].as_str().unwrap().to_string();
    let (status, v) = server.get_with("/v1/features/txn/card", &[("Quiver-Read-After", &token)]);
    assert_eq!(status, 200, "{v}");
    // The 2-hours-old event is 110 minutes behind the newest: beyond allowed_lateness (10m).
    assert_eq!(v["features"]["amount_sum_1h"]["value"], 7.0, "{v}");
    assert_eq!(v["features"]["amount_count_1h"]["value"], 3, "{v}");
    assert_eq!(v["features"]["amount_sum_1h"]["status"], "PRESENT");
    let body = json!({"features": ["txn:amount", "txn:amount_sum_1h"], "entities": {"user_id": ["card", "nobody"]}});
    let (status, v) = server.post("/get-online-features", &body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["metadata"]["feature_names"],
        json!(["user_id", "amount", "amount_sum_1h"])
    );
    assert_eq!(v["results"][2]["values"], json!([7.0, null]));
    assert_eq!(v["results"][2]["statuses"], json!(["PRESENT", "NOT_FOUND"]));
    assert!(
        server.metric("quiver_aggregation_late_dropped_total") >= 2.0,
        "one per aggregation for the very late event"
    );
    // Aggregates are read-only: events cannot write them.
    let (status, v) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"card","values":{"amount_sum_1h":1}}]"#,
    );
    assert_eq!(
        (status, v["error"]["details"]["reason"].as_str()),
        (400, Some("unknown_feature"))
    );
}

#[test]
fn history_sink_writes_every_event_to_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let table = format!("qh_e2e_{}", std::process::id());
    let server = Server::start(dir.path(), &history_config(&table, ""));
    let events: Vec<String> = (0..300)
        .map(|i| event(&format!("h{i}"), i, Some(&format!("id{i}"))))
        .collect();
    assert_eq!(
        server
            .post("/v1/events", &format!("[{}]", events.join(",")))
            .0,
        200
    );
    // A producer retry of the same event ids adds nothing to history.
    assert_eq!(
        server
            .post("/v1/events", &format!("[{}]", events[..50].join(",")))
            .0,
        200
    );
    let mut client = postgres::Client::connect(PG, postgres::NoTls).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while history_counts(&mut client, &table).0 < 300 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let rows = history_counts(&mut client, &table).0;
    drop_history(&mut client, &table);
    assert_eq!(rows, 300, "300 distinct events, the 50 re-sent ones once");
    assert_eq!(
        server.metric("quiver_history_rows_written_total"),
        350.0,
        "350 log records, 300 distinct events"
    );
}

#[test]
fn historical_reads_return_what_was_served_at_each_instant() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let (status, _) = server.post(
        "/v1/events",
        &format!("[{},{}]", event("a", 1, None), event("b", 10, None)),
    );
    assert_eq!(status, 200);
    std::thread::sleep(std::time::Duration::from_millis(5));
    let t1 = quiver_core::time::now_ms();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let (status, reply) = server.post("/v1/events", &format!("[{}]", event("a", 2, None)));
    assert_eq!(status, 200);
    let token = reply["token"].as_str().unwrap().to_string();
    let online = server
        .get_with("/v1/features/txn/a", &[("Quiver-Read-After", &token)])
        .1;
    assert_eq!(online["features"]["seq"]["value"], 2);
    let t2 = quiver_core::time::now_ms();

    let body = json!({
        "features": ["txn:seq", "txn:amount"],
        "entities": {"user_id": ["a", "a", "b", "nobody"]},
        "timestamps": [t1, t2, quiver_core::time::format_rfc3339_ms(t1), t2],
    });
    let (status, v) = server.post("/v1/features/historical", &body.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["metadata"]["feature_names"],
        json!(["user_id", "seq", "amount"])
    );
    assert_eq!(v["results"][1]["values"], json!([1, 2, 10, null]));
    assert_eq!(
        v["results"][1]["statuses"],
        json!(["PRESENT", "PRESENT", "PRESENT", "NOT_FOUND"])
    );
    assert_eq!(v["results"][2]["values"], json!([1.5, 2.5, 10.5, null]));

    // Before anything was ingested: nothing.
    let body = json!({"features": ["txn:seq"], "entities": {"user_id": ["a"]}, "timestamps": [t1 - 60_000]});
    let (_, v) = server.post("/v1/features/historical", &body.to_string());
    assert_eq!(v["results"][1]["statuses"], json!(["NOT_FOUND"]));
    // Bad requests.
    let body =
        json!({"features": ["txn:seq"], "entities": {"user_id": ["a", "b"]}, "timestamps": [t1]});
    assert_eq!(
        server.post("/v1/features/historical", &body.to_string()).0,
        400
    );
    let body = json!({"features": ["txn:seq"], "entities": {"user_id": ["a"]}, "timestamps": ["yesterday"]});
    let (status, v) = server.post("/v1/features/historical", &body.to_string());
    assert_eq!(
        (
            status,
            v["error"]["code"].as_str(),
            v["error"]["details"]["index"].as_u64()
        ),
        (400, Some("BAD_TIMESTAMP"), Some(0))
    );
    let body = json!({"features": ["txn:seq"], "entities": {"user_id": ["a"]}, "timestamps": [t1]});
    assert_eq!(
        server.post("/v1/features", &body.to_string()).0,
        400,
        "online reads take no timestamps"
    );
}

#[test]
fn history_cli_writes_training_data_as_csv_and_parquet() {
    use arrow_array::{Array, Float64Array, Int64Array, StringArray};
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    assert_eq!(
        server
            .post(
                "/v1/events",
                &format!("[{},{}]", event("a", 1, None), event("b", 7, None))
            )
            .0,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let t1 = quiver_core::time::now_ms();
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(
        server
            .post("/v1/events", &format!("[{}]", event("a", 2, None)))
            .0,
        200
    );
    std::thread::sleep(std::time::Duration::from_millis(5));
    let t2 = quiver_core::time::now_ms();
    let rows = dir.path().join("rows.csv");
    std::fs::write(
        &rows,
        format!(
            "user_id,ts\na,{t1}\na,{t2}\nb,{}\nnobody,{t2}\n",
            quiver_core::time::format_rfc3339_ms(t2)
        ),
    )
    .unwrap();

    let csv_out = dir.path().join("train.csv");
    let (ok, stdout, stderr) = quiver(&[
        "history",
        "--entities",
        rows.to_str().unwrap(),
        "--features",
        "txn:seq,txn:amount,txn:merchant",
        "--out",
        csv_out.to_str().unwrap(),
        "--url",
        &server.url,
    ]);
    assert!(ok, "{stdout}{stderr}");
    let text = std::fs::read_to_string(&csv_out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "user_id,ts,seq,amount,merchant");
    assert_eq!(lines[1], format!("a,{t1},1,1.5,"));
    assert_eq!(lines[2], format!("a,{t2},2,2.5,"));
    assert!(
        lines[3].starts_with("b,") && lines[3].ends_with(",7,7.5,"),
        "{}",
        lines[3]
    );
    assert_eq!(lines[4], format!("nobody,{t2},,,"));

    let pq = dir.path().join("train.parquet");
    let (ok, stdout, stderr) = quiver(&[
        "history",
        "--entities",
        rows.to_str().unwrap(),
        "--features",
        "txn:seq,txn:amount",
        "--out",
        pq.to_str().unwrap(),
        "--url",
        &server.url,
    ]);
    assert!(ok, "{stdout}{stderr}");
    let file = std::fs::File::open(&pq).unwrap();
    let mut reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batch = reader.next().unwrap().unwrap();
    assert_eq!(batch.num_rows(), 4);
    let names: Vec<String> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["user_id", "ts", "seq", "amount"]);
    let keys = batch
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    assert_eq!(keys.value(3), "nobody");
    let seq = batch
        .column(2)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert_eq!(
        (seq.value(0), seq.value(1), seq.value(2), seq.is_null(3)),
        (1, 2, 7, true)
    );
    let amount = batch
        .column(3)
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    assert_eq!(amount.value(1), 2.5);
}

#[test]
fn feast_route_ignores_unknown_fields_and_v1_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let (_, reply) = server.post("/v1/events", &format!("[{}]", event("a", 1, None)));
    let token = reply["token"].as_str().unwrap().to_string();
    let body = |extra: &str| {
        format!(
            r#"{{"features": ["txn:seq"], "entities": {{"user_id": ["a"]}}, "include_feature_view_version_metadata": false{extra}}}"#
        )
    };
    let read = |path: &str, extra: &str| {
        server.post_with(path, &body(extra), &[("Quiver-Read-After", &token)])
    };
    // Feast's own field is accepted on both routes.
    assert_eq!(read("/v1/features", "").0, 200);
    let (status, v) = read("/get-online-features", "");
    assert_eq!(
        (status, &v["results"][1]["values"]),
        (200, &json!([1])),
        "{v}"
    );
    // A field from a newer Feast: ignored by Feast's route, a typo on Quiver's own.
    let (status, v) = read(
        "/get-online-features",
        r#", "from_a_newer_feast": {"x": 1}"#,
    );
    assert_eq!(
        (status, &v["results"][1]["values"]),
        (200, &json!([1])),
        "{v}"
    );
    let (status, v) = read("/v1/features", r#", "featurs": []"#);
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("featurs"),
        "{v}"
    );
}
