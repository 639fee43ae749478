//! `quiver bench` in a tiny configuration: the report has its structure and both sides did
//! real work. Timing thresholds live in BENCHMARKS.md, never here. `lookup` needs the Redis on
//! 127.0.0.1:6379, `history` and `decoupling` the PostgreSQL on 127.0.0.1:5432.

mod common;

use common::{quiver, Server};

#[test]
fn bench_scenarios_report_real_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let md = dir.path().join("bench.md");
    let charts = dir.path().join("charts");
    let (ok, stdout, stderr) = quiver(&[
        "bench",
        "all",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--connections",
        "2",
        "--entities",
        "2000",
        "--pit-rows",
        "20000",
        "--batch",
        "50",
        "--rate",
        "3000",
        "--predict-rate",
        "200",
        "--writers",
        "1",
        "--levels",
        "1,2",
        "--json",
        out.to_str().unwrap(),
        "--markdown",
        md.to_str().unwrap(),
        "--plot",
        charts.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let r = &report["results"];
    assert!(r["ingest"]["events_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["ingest"]["freshness_probes"].as_u64().unwrap() > 0, "{r}");
    for side in [
        "uniform_quiver",
        "uniform_redis",
        "zipf_quiver",
        "zipf_redis",
    ] {
        assert!(
            r["lookup"][side]["ops_per_s"].as_f64().unwrap() > 0.0,
            "{side}: {r}"
        );
        assert_eq!(r["lookup"][side]["errors"].as_u64(), Some(0), "{side}: {r}");
    }
    assert!(r["lookup"]["uniform_throughput_vs_redis"].as_f64().unwrap() > 0.0);
    assert_eq!(r["memory"]["entities"].as_u64(), Some(2000));
    assert!(r["memory"]["raw_bytes_per_entity"].as_f64().unwrap() > 256.0);
    assert!(stdout.contains("| Redis HGETALL |"), "{stdout}");
    let a = &r["aggregations"];
    assert!(
        a["ingest_events_per_s_3_aggregations"].as_f64().unwrap() > 0.0,
        "{a}"
    );
    assert!(
        a["ingest_ratio_3_aggregations_vs_none"].as_f64().unwrap() > 0.0,
        "{a}"
    );
    assert!(
        a["memory_bytes_per_entity_24h_5m_sum"].as_f64().unwrap() > 0.0,
        "{a}"
    );
    assert_eq!(a["ring_bytes"].as_f64(), Some(2328.0));
    let p = &r["predict"];
    assert!(p["predict_ops_per_s"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["model_us_per_row_batch1"].as_f64().unwrap() > 0.0, "{p}");
    assert!(p["redis_ops_per_s"].as_f64().unwrap() > 0.0, "{p}");
    // Server CPU per operation, read from /proc: this process less the generator's threads
    // for Quiver, redis-server's processes for Redis.
    for cpu in [
        &r["ingest"]["server_cpu_us_per_event"],
        &r["lookup"]["uniform_quiver"]["server_cpu_us_per_op"],
        &r["lookup"]["uniform_redis"]["server_cpu_us_per_op"],
        &p["lookup_server_cpu_us_per_op"],
        &p["predict_server_cpu_us_per_op"],
    ] {
        assert!(cpu.as_f64().is_some_and(|c| c >= 0.0), "{r}");
    }

    // decoupling: both designs took writes and answered predictions, without errors.
    let d = &r["decoupling"];
    for design in ["quiver", "postgres"] {
        let side = &d[design];
        assert!(
            side["events_per_s"].as_f64().unwrap() > 0.0,
            "{design}: {side}"
        );
        assert!(
            side["freshness_samples"].as_u64().unwrap() > 0,
            "{design}: {side}"
        );
        assert!(
            side["predicts_per_s"].as_f64().unwrap() > 0.0,
            "{design}: {side}"
        );
        assert_eq!(side["event_errors"].as_u64(), Some(0), "{design}: {side}");
        assert_eq!(side["predict_errors"].as_u64(), Some(0), "{design}: {side}");
        assert!(side["p99_us"].as_f64().unwrap() > 0.0, "{design}: {side}");
    }
    // Each design is charged its own server's CPU: Quiver's `quiver serve` process (from its
    // /metrics), PostgreSQL's processes (from /proc).
    for design in ["quiver", "postgres"] {
        let cpu = d[design]["server_cpu_s"].as_f64();
        assert!(cpu.is_some_and(|c| c >= 0.0), "{design}: {d}");
    }
    // The sweep ran 1× and 2×, then climbed only while a design still sustained.
    let levels = d["levels"].as_array().unwrap();
    assert!(levels.len() >= 2, "{d}");
    let sustained = |l: &serde_json::Value, design: &str| l[design]["sustained"] == true;
    for pair in levels.windows(2).skip(1) {
        assert!(
            sustained(&pair[0], "quiver") || sustained(&pair[0], "postgres"),
            "climbed past a load both failed: {d}"
        );
    }
    // The capacity ratio is the quotient of the highest sustained loads, when both have one.
    let top = |design: &str| d["max_sustained"][design]["total_per_s"].as_f64();
    match (top("quiver"), top("postgres")) {
        (Some(q), Some(p)) => {
            let ratio = report["ratios"]["decoupling_capacity_vs_postgres"]
                .as_f64()
                .unwrap();
            assert!((ratio - q / p).abs() < 1e-9, "{d}");
        }
        _ => assert!(d["capacity_vs_postgres"].is_null(), "{d}"),
    }
    assert!(
        stdout.contains("| PostgreSQL as the queue (UPSERT + SELECT) |"),
        "{stdout}"
    );

    // cluster without --kafka: the computed placement only.
    let c = &r["cluster"];
    let ring = c["ring"].as_array().unwrap();
    assert_eq!(ring.len(), 7, "{c}");
    for row in ring {
        assert!(row["max_over_mean"].as_f64().unwrap() >= 1.0, "{row}");
        assert!(row["join_moved"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(c["live"].is_null(), "{c}");

    // The verdict a script reads, Quiver ÷ peer.
    for name in [
        "lookup_throughput_vs_redis",
        "lookup_p99_vs_redis",
        "predict_throughput_vs_redis_lookup",
        "decoupling_event_rate_vs_postgres",
        "decoupling_freshness_p99_vs_postgres",
        "decoupling_predict_throughput_vs_postgres",
        "decoupling_p99_vs_postgres",
    ] {
        let v = report["ratios"][name].as_f64();
        assert!(
            v.is_some_and(|v| v.is_finite() && v > 0.0),
            "{name}: {}",
            report["ratios"]
        );
    }
    let tables = std::fs::read_to_string(&md).unwrap();
    assert!(
        tables.contains("## decoupling") && tables.contains("## verdict"),
        "{tables}"
    );
    for chart in ["decoupling_latency.png", "decoupling_freshness.png"] {
        let png = std::fs::read(charts.join(chart)).unwrap();
        assert_eq!(&png[1..4], b"PNG", "{chart}");
    }

    // priority: both nodes measured capacity and gold unloaded; with tiers the flood was
    // refused in part while gold was served and never refused (its share is every slot,
    // bronze's half). (The one-tier peer may serve no gold at all in a window this short.)
    for run in ["tiered", "one_tier"] {
        let q = &r["priority"][run];
        assert!(
            q["bronze_capacity_per_s"].as_f64().unwrap() > 0.0,
            "{run}: {q}"
        );
        assert!(
            q["gold_p99_us_unloaded"].as_f64().unwrap() > 0.0,
            "{run}: {q}"
        );
    }
    let t = &r["priority"]["tiered"];
    assert!(t["gold_served_flooded"].as_u64().unwrap() > 0, "{t}");
    assert!(t["bronze_refused"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(t["gold_refused"], 0, "{t}");

    let e = &r["encryption"];
    for side in ["plain", "encrypted"] {
        assert!(
            e[side]["events_per_s"].as_f64().unwrap() > 0.0,
            "{side}: {e}"
        );
    }
    assert!(
        e["events_per_s_encrypted_vs_plain"].as_f64().unwrap() > 0.0,
        "{e}"
    );

    // restart: every way came back ready; only the snapshotting node wrote snapshots, and
    // the server reported how long one took.
    let rs = &r["restart"];
    for way in ["from_snapshot", "from_snapshot_and_tail", "from_log"] {
        assert!(rs[way]["kill9_to_ready_s"].as_f64().unwrap() > 0.0, "{rs}");
    }
    assert!(
        rs["from_snapshot"]["snapshot_bytes"].as_u64().unwrap() > 0,
        "{rs}"
    );
    assert!(
        rs["from_snapshot"]["snapshot_write_s"].as_f64().unwrap() > 0.0,
        "{rs}"
    );
    assert_eq!(rs["from_log"]["snapshot_bytes"], 0, "{rs}");

    let h = &r["history"];
    assert!(h["drain_rows_per_s"].as_f64().unwrap() > 0.0, "{h}");
    assert!(
        h["rows"].as_i64().unwrap() >= 2000,
        "the backlog reached PostgreSQL: {h}"
    );
    assert_eq!(h["point_in_time_bulk_rows"], 20000, "{h}");
    for semantics in ["event_time", "as_served"] {
        let rate = &h[format!("point_in_time_bulk_{semantics}_rows_per_s")];
        assert!(rate.as_f64().unwrap() > 0.0, "{h}");
    }
}

#[test]
fn bench_ingest_measures_kafka_next_to_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::KafkaBroker::start(&dir.path().join("broker"));
    let out = dir.path().join("bench.json");
    let (ok, stdout, stderr) = quiver(&[
        "bench",
        "ingest",
        "--duration",
        "0.5",
        "--warmup",
        "1",
        "--connections",
        "2",
        "--batch",
        "50",
        "--rate",
        "2000",
        "--kafka",
        &broker.addr(),
        "--kafka-idle-fetch-backoff",
        "20ms",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for backend in ["embedded", "kafka"] {
        let r = &report["results"]["ingest"][backend];
        assert!(r["events_per_s"].as_f64().unwrap() > 0.0, "{backend}: {r}");
        assert!(
            r["freshness_probes"].as_u64().unwrap() > 0,
            "{backend}: {r}"
        );
        assert_eq!(r["rejected_posts"], 0, "{backend}: {r}");
    }
    assert!(stdout.contains("Kafka ÷ embedded"), "{stdout}");
}

/// `quiver bench restart --kafka`: the three restarts with Kafka carrying the log — each came
/// back ready, and the snapshotting node wrote snapshots that name Kafka's streams.
#[test]
fn bench_restart_replays_from_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::KafkaBroker::start(&dir.path().join("broker"));
    let out = dir.path().join("restart.json");
    let (ok, stdout, stderr) = quiver(&[
        "bench",
        "restart",
        "--entities",
        "2000",
        "--kafka",
        &broker.addr(),
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let r = &report["results"]["restart"];
    assert_eq!(r["log"], "kafka", "{r}");
    for way in ["from_snapshot", "from_snapshot_and_tail", "from_log"] {
        assert!(r[way]["kill9_to_ready_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(
        r["from_snapshot"]["snapshot_bytes"].as_u64().unwrap() > 0,
        "{r}"
    );
    assert_eq!(r["from_log"]["snapshot_bytes"], 0, "{r}");
}

/// `quiver bench cluster --kafka`: real `quiver serve` processes over the test broker; every
/// call it reports succeeded, and the failover was observed.
#[test]
fn bench_cluster_runs_real_nodes_over_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::KafkaBroker::start(&dir.path().join("broker"));
    let out = dir.path().join("cluster.json");
    let (ok, stdout, stderr) = quiver(&[
        "bench",
        "cluster",
        "--kafka",
        &broker.addr(),
        "--duration",
        "0.3",
        "--warmup",
        "0.1",
        "--connections",
        "2",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let live = &report["results"]["cluster"]["live"];
    let calls = live["calls"].as_array().unwrap();
    assert_eq!(
        calls.len(),
        2 + 4 + 4,
        "1 node: local only; 2 and 3: local and forwarded: {live}"
    );
    for c in calls {
        assert!(c["ops_per_s"].as_f64().unwrap() > 0.0, "{c}");
        assert_eq!(c["errors"].as_u64(), Some(0), "{c}");
    }
    assert!(
        live["failover"]["first_replica_read_ms"].as_f64().is_some(),
        "{live}"
    );
}

/// `quiver bench decoupling --url`: the load generator drives a server started apart from it,
/// with the config `quiver bench config` prints, and charges it the CPU its `/metrics` reports.
#[test]
fn bench_decoupling_drives_a_server_started_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, config, stderr) = quiver(&["bench", "config"]);
    assert!(ok && config.contains("[[view]]"), "{config}\n{stderr}");
    let server = Server::start(dir.path(), &config);
    let out = dir.path().join("decoupling.json");
    let (ok, stdout, stderr) = quiver(&[
        "bench",
        "decoupling",
        "--url",
        &server.url,
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--connections",
        "2",
        "--entities",
        "2000",
        "--rate",
        "3000",
        "--predict-rate",
        "200",
        "--writers",
        "1",
        "--levels",
        "0.5",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let q = &report["results"]["decoupling"]["quiver"];
    assert!(q["events_per_s"].as_f64().unwrap() > 0.0, "{q}");
    assert!(q["server_cpu_s"].as_f64().unwrap() > 0.0, "{q}");
    assert!(q["server_cpu_us_per_op"].as_f64().unwrap() > 0.0, "{q}");
    // The preload (2,000 entities × 3 services) and the measured writes reached this server.
    assert!(server.metric("quiver_events_ingested_total") > 6000.0);
}
