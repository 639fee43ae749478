//! Kafka as the log, with the real binary and a Kafka-protocol test broker on loopback: the
//! documented record format and murmur2 placement against an independent librdkafka
//! producer and consumer, a source topic with field mapping and a dead-letter topic, a
//! partition-count mismatch refused at start, and no acknowledged event lost or applied twice
//! across `kill -9` of Quiver or a broker restart under load.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use quiver_core::partition::partition_for;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::{json, Value};

const VIEWS: &str = r#"
[log]
partitions = 4

[store]
snapshot_interval = "500ms"

[server]
read_after_wait_ms_max = 2000

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
aggregations = [{ name = "n_1h", of = "seq", fn = "count", window = "1h" }]
"#;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn client_config(broker: &KafkaBroker) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", broker.addr());
    c
}

/// An independent librdkafka producer, configured as the README tells other producers to be.
fn producer(broker: &KafkaBroker) -> BaseProducer {
    client_config(broker)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .create()
        .unwrap()
}

/// Sends (key, value, partition: `None` = the producer's partitioner) and flushes.
fn produce(p: &BaseProducer, topic: &str, records: &[(Option<&str>, String, Option<i32>)]) {
    for (key, value, partition) in records {
        let mut r: BaseRecord<'_, str, str> = BaseRecord::to(topic).payload(value.as_str());
        if let Some(k) = key {
            r = r.key(*k);
        }
        if let Some(part) = partition {
            r = r.partition(*part);
        }
        p.send(r).map_err(|(e, _)| e).unwrap();
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

/// One record as an independent consumer sees it.
#[derive(Debug)]
struct Consumed {
    partition: i32,
    key: Option<String>,
    value: String,
    headers: HashMap<String, String>,
}

/// What a writer thread returns: batches acknowledged, and every refusal (status, body).
type Written = (usize, Vec<(u16, String)>);

/// Every record of `topic` (4 partitions).
fn consume_all(broker: &KafkaBroker, topic: &str, want: usize) -> Vec<Consumed> {
    let c: BaseConsumer = client_config(broker)
        .set("group.id", "test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < want && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Consumed {
            partition: m.partition(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            value: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            headers,
        });
    }
    out
}

fn wait_for<T: std::fmt::Debug>(what: &str, mut probe: impl FnMut() -> (bool, T)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, seen) = probe();
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {seen:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every `step`-th key `{prefix}{i}` of `0..n` reads `txn.seq == i`.
fn wait_for_seqs(server: &Server, prefix: &str, n: i64, step: usize) {
    wait_for("records readable", || {
        let got: Vec<Option<i64>> = (0..n)
            .step_by(step)
            .map(|i| {
                let path = format!("/v1/features/txn/{prefix}{i}");
                server.get(&path).1["features"]["seq"]["value"].as_i64()
            })
            .collect();
        let want: Vec<Option<i64>> = (0..n).step_by(step).map(Some).collect();
        (got == want, got)
    });
}

fn start(dir: &std::path::Path, broker: &KafkaBroker, config: &str, prefix: &str) -> Server {
    let d = dir.join("quiver");
    std::fs::create_dir_all(&d).unwrap();
    Server::start(&d, &kafka_config(config, broker, prefix))
}

#[test]
fn an_independent_librdkafka_producer_lands_where_quiver_puts_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let server = start(dir.path(), &broker, VIEWS, "ext.");
    let ts = now_ms();
    let records: Vec<(String, String)> = (0..200)
        .map(|i| {
            (
                format!("u{i}"),
                json!({"ts": ts, "event_id": format!("x-{i}"), "values": {"seq": i}}).to_string(),
            )
        })
        .collect();
    let p = producer(&broker);
    let sends: Vec<(Option<&str>, String, Option<i32>)> = records
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.clone(), None))
        .collect();
    produce(&p, "ext.txn", &sends);
    // librdkafka's murmur2_random put every key where Quiver's murmur2 says it belongs.
    let landed = consume_all(&broker, "ext.txn", 200);
    assert_eq!(landed.len(), 200);
    for r in &landed {
        let key = r.key.as_deref().unwrap();
        assert_eq!(
            r.partition as u32,
            partition_for(key.as_bytes(), 4),
            "{key}"
        );
    }
    // And Quiver serves what it did not write itself.
    wait_for_seqs(&server, "u", 200, 17);
    // What Quiver writes is the documented format, readable by any Kafka consumer.
    let (status, v) = server.post(
        "/v1/events",
        &format!(
            r#"[{{"view":"txn","key":"q1","ts":{ts},"event_id":"q-1","values":{{"amount":2.5}}}}]"#
        ),
    );
    assert_eq!(status, 200, "{v}");
    let all = consume_all(&broker, "ext.txn", 201);
    let mine = all
        .iter()
        .find(|r| r.key.as_deref() == Some("q1"))
        .expect("Quiver's record");
    assert_eq!(mine.partition as u32, partition_for(b"q1", 4));
    let value: Value = serde_json::from_str(&mine.value).unwrap();
    assert_eq!(
        value,
        json!({"ts": ts, "event_id": "q-1", "values": {"amount": 2.5}})
    );
    assert_eq!(server.metric("quiver_kafka_records_rejected_total"), 0.0);
}

#[test]
fn a_source_topic_is_mapped_and_bad_records_are_counted_and_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let config = format!(
        "{VIEWS}\n[[view]]\nname = \"pay\"\nentity = \"user\"\nfeatures = [{{ name = \"amount\", type = \"f64\" }}]\n\
         source = {{ kafka_topic = \"payments\", key_field = \"user\", ts_field = \"at\", event_id_field = \"id\", fields = {{ amount = \"amt\" }} }}\n"
    )
    .replace("[log]", "[kafka]\ndead_letter_topic = \"quiver-dead\"\n\n[log]");
    // `kafka_config` adds its own [kafka] table: merge ours into it.
    let config = kafka_config(
        &config.replace("[kafka]\ndead_letter_topic = \"quiver-dead\"\n\n", ""),
        &broker,
        "src.",
    )
    .replace(
        "[kafka]\n",
        "[kafka]\ndead_letter_topic = \"quiver-dead\"\n",
    );
    let d = dir.path().join("quiver");
    std::fs::create_dir_all(&d).unwrap();
    let server = Server::start(&d, &config);
    let good = |user: &str, amt: f64, id: i64| {
        (Some(user.to_string()), json!({"user": user, "at": now_ms(), "id": id, "amt": amt, "note": "other fields are ignored"}).to_string(), None)
    };
    let mut batch: Vec<(Option<String>, String, Option<i32>)> =
        vec![good("a", 1.5, 1), good("b", 2.5, 2)];
    // Bad: not JSON, no key field, a string amount, keyed right but written to the wrong partition.
    batch.push((Some("c".into()), "not json".into(), None));
    batch.push((
        Some("c".into()),
        json!({"at": 1, "amt": 1.0}).to_string(),
        None,
    ));
    batch.push((
        Some("c".into()),
        json!({"user": "c", "at": 1, "amt": "lots"}).to_string(),
        None,
    ));
    let wrong = ((partition_for(b"d", 4) + 1) % 4) as i32;
    batch.push((
        Some("d".into()),
        json!({"user": "d", "at": 1, "amt": 1.0}).to_string(),
        Some(wrong),
    ));
    batch.push(good("e", 5.5, 5));
    let sends: Vec<(Option<&str>, String, Option<i32>)> = batch
        .iter()
        .map(|(k, v, p)| (k.as_deref(), v.clone(), *p))
        .collect();
    produce(&producer(&broker), "payments", &sends);
    wait_for("good source records readable, also after bad ones", || {
        let got: Vec<Option<f64>> = ["a", "b", "e"]
            .iter()
            .map(|k| {
                server.get(&format!("/v1/features/pay/{k}")).1["features"]["amount"]["value"]
                    .as_f64()
            })
            .collect();
        (got == [Some(1.5), Some(2.5), Some(5.5)], got)
    });
    wait_for("bad records counted by reason", || {
        let by = |r: &str| {
            server.metric_with(
                "quiver_kafka_records_rejected_total",
                &format!("reason=\"{r}\""),
            )
        };
        let seen = [
            by("malformed_json"),
            by("missing_field"),
            by("wrong_type"),
            by("wrong_partition"),
        ];
        (seen == [1.0, 1.0, 1.0, 1.0], seen)
    });
    let dead = consume_all(&broker, "quiver-dead", 4);
    assert_eq!(dead.len(), 4, "{dead:?}");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|r| r.headers["quiver-reason"].as_str())
        .collect();
    for r in [
        "malformed_json",
        "missing_field",
        "wrong_type",
        "wrong_partition",
    ] {
        assert!(reasons.contains(&r), "{reasons:?}");
    }
    assert!(dead
        .iter()
        .all(|r| r.headers["quiver-source-topic"] == "payments"
            && r.headers.contains_key("quiver-source-offset")));
    assert!(
        dead.iter().any(|r| r.value == "not json"),
        "the original value is kept"
    );
    // Quiver's own ingest refuses to write somebody else's topic.
    let (status, v) = server.post(
        "/v1/events",
        r#"[{"view":"pay","key":"a","values":{"amount":1}}]"#,
    );
    assert_eq!(
        (status, v["error"]["details"]["reason"].as_str()),
        (400, Some("source_view")),
        "{v}"
    );
}

#[test]
fn a_topic_with_another_partition_count_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let admin: AdminClient<DefaultClientContext> = client_config(&broker).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let created = rt
        .block_on(admin.create_topics(
            &[NewTopic::new("odd.txn", 3, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        ))
        .unwrap();
    assert!(created[0].is_ok(), "{created:?}");
    let config_path = dir.path().join("quiver.toml");
    std::fs::write(&config_path, kafka_config(VIEWS, &broker, "odd.")).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config_path)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("\"odd.txn\" has 3 partitions but kafka.partitions = 4"),
        "the error names the topic and both counts: {stderr}"
    );
}

/// Writers that send batches of events with ids, each batch again and again until it is
/// acknowledged (as a producer that must not lose data does), to whichever URL the server
/// has now. Every key's count at the end must equal the events sent for it.
struct Load {
    url: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    /// While set, writers start no new batch.
    hold: Arc<AtomicBool>,
    writers: Vec<std::thread::JoinHandle<Written>>,
}

const WRITERS: usize = 3;
const KEYS_PER_WRITER: usize = 10;
const BATCH: usize = 20;

impl Load {
    fn start(url: &str) -> Load {
        let url = Arc::new(Mutex::new(url.to_string()));
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let writers = (0..WRITERS)
            .map(|w| {
                let (url, stop, hold) = (url.clone(), stop.clone(), hold.clone());
                std::thread::spawn(move || write_until_stopped(w, &url, &stop, &hold))
            })
            .collect();
        Load {
            url,
            stop,
            hold,
            writers,
        }
    }

    /// Stops after each writer's batch in hand is acknowledged; batches sent per writer, and
    /// every refusal seen (status, body).
    fn finish(self) -> (Vec<usize>, Vec<(u16, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut sent = Vec::new();
        let mut refusals = Vec::new();
        for w in self.writers {
            let (n, r) = w.join().unwrap();
            sent.push(n);
            refusals.extend(r);
        }
        (sent, refusals)
    }
}

fn write_until_stopped(
    w: usize,
    url: &Mutex<String>,
    stop: &AtomicBool,
    hold: &AtomicBool,
) -> Written {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut refusals = Vec::new();
    let mut batch_no = 0usize;
    let ts = now_ms();
    while !stop.load(Ordering::Relaxed) {
        while hold.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let events: Vec<String> = (0..BATCH)
            .map(|i| {
                let key = format!("w{w}-k{}", i % KEYS_PER_WRITER);
                format!(r#"{{"view":"txn","key":"{key}","ts":{ts},"event_id":"w{w}-b{batch_no}-{i}","values":{{"seq":{batch_no}}}}}"#)
            })
            .collect();
        let body = format!("[{}]", events.join(","));
        loop {
            let target = format!("{}/v1/events?ack=durable", url.lock().unwrap());
            match client.post(target).body(body.clone()).send() {
                Ok(r) if r.status() == 200 => break,
                Ok(r) => {
                    let status = r.status().as_u16();
                    let retry = r.headers().get("retry-after").is_some();
                    let body = r.text().unwrap_or_default();
                    refusals.push((status, format!("{body} retry-after:{retry}")));
                }
                Err(_) => {} // the server is down or restarting
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        batch_no += 1;
    }
    (batch_no, refusals)
}

/// Each writer's keys must count exactly the events sent for them: none lost (the count
/// reaches it), none twice (it never passes it).
fn assert_counts(server: &Server, sent: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for (w, &batches) in sent.iter().enumerate() {
        let per_key = (batches * BATCH / KEYS_PER_WRITER) as i64;
        for k in 0..KEYS_PER_WRITER {
            let key = format!("w{w}-k{k}");
            loop {
                let (status, v) = server.get(&format!("/v1/features/txn/{key}"));
                assert_eq!(status, 200, "{v}");
                let n = v["features"]["n_1h"]["value"].as_i64().unwrap();
                assert!(
                    n <= per_key,
                    "{key}: {n} events counted, {per_key} sent: applied twice ({v})"
                );
                if n == per_key {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{key}: {n} of {per_key} events: lost ({v})"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn kill9_during_durable_ingest_through_kafka_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let server = start(dir.path(), &broker, VIEWS, "kill.");
    let load = Load::start(&server.url);
    std::thread::sleep(Duration::from_millis(1500));
    let dir_q = server.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let server = Server::restart(&dir_q);
    *load.url.lock().unwrap() = server.url.clone();
    std::thread::sleep(Duration::from_millis(1000));
    let (sent, _) = load.finish();
    assert!(
        sent.iter().sum::<usize>() >= 10,
        "under load before and after the kill: {sent:?}"
    );
    assert_counts(&server, &sent);
}

#[test]
fn a_broker_restart_under_load_loses_and_doubles_nothing_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = KafkaBroker::start(&dir.path().join("broker"));
    let config = VIEWS.replace(
        "[log]",
        "[limits]\ningest_queue_events_max = 200\nbatch_events_max = 100\n\n[log]",
    );
    let config = kafka_config(&config, &broker, "bounce.")
        .replace("[kafka]\n", "[kafka]\ndelivery_timeout = \"2s\"\n");
    let d = dir.path().join("quiver");
    std::fs::create_dir_all(&d).unwrap();
    let server = Server::start(&d, &config);
    let (status, v) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"steady","values":{"seq":42}}]"#,
    );
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    server.get_with("/v1/features/txn/steady", &[("Quiver-Read-After", &token)]);
    let load = Load::start(&server.url);
    std::thread::sleep(Duration::from_millis(1000));
    // The test broker acknowledges writes that reach it while it shuts down and then does
    // not keep them (a Kafka broker stops taking writes before it stops): the writers hold
    // their next batch for the instant of the stop, then write through the outage.
    load.hold.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    broker.stop();
    load.hold.store(false, Ordering::Relaxed);
    // The broker is away: reads are served from memory, and the staleness gauge says how old.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        let (status, v) = server.get("/v1/features/txn/steady");
        assert_eq!(
            (status, &v["features"]["seq"]["value"]),
            (200, &json!(42)),
            "reads go on: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stale = server.metric("quiver_materializer_staleness_seconds");
    assert!(
        stale >= 4.0,
        "staleness grows while the broker is away (sum over partitions: {stale})"
    );
    broker.start_again();
    std::thread::sleep(Duration::from_millis(3000));
    let (sent, refusals) = load.finish();
    assert!(
        refusals
            .iter()
            .any(|(s, b)| *s == 503 && (b.contains("QUEUE_FULL") || b.contains("LOG_UNAVAILABLE"))),
        "ingest answered 503 while the broker was away: {:?}",
        &refusals[..refusals.len().min(3)]
    );
    assert!(
        refusals
            .iter()
            .all(|(s, b)| *s != 503 || b.ends_with("retry-after:true")),
        "every 503 says when to retry: {:?}",
        &refusals[..refusals.len().min(3)]
    );
    assert_counts(&server, &sent);
    wait_for("staleness back to fresh", || {
        let s = server.metric("quiver_materializer_staleness_seconds");
        (s < 4.0, s)
    });
}

#[test]
fn records_kafka_deletes_before_they_are_read_are_history_gaps_never_silence() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let table = format!("qh_kgap_{}", std::process::id());
    let mut pg = postgres::Client::connect(PG, postgres::NoTls).unwrap();
    drop_history(&mut pg, &table);
    pg.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}_gaps; DROP TABLE IF EXISTS {table}_offsets;"
    ))
    .unwrap();
    let config = VIEWS.replace(
        "[store]",
        &format!("[history]\npostgres_url = \"{PG}\"\ntable = \"{table}\"\n\n[store]"),
    );
    let server = start(dir.path(), &broker, &config, "gap.");
    let ts = now_ms();
    let batch = |from: usize, n: usize| {
        let events: Vec<String> = (from..from + n)
            .map(|i| format!(r#"{{"view":"txn","key":"g{i}","ts":{ts},"event_id":"e{i}","values":{{"seq":{i}}}}}"#))
            .collect();
        format!("[{}]", events.join(","))
    };
    let (status, v) = server.post("/v1/events", &batch(0, 40));
    assert_eq!(status, 200, "{v}");
    let rows = |pg: &mut postgres::Client| history_counts(pg, &table).0;
    wait_for("the sink wrote the first 40", || {
        (rows(&mut pg) == 40, rows(&mut pg))
    });
    let dir_q = server.stop();
    // While Quiver is away, other producers write 60 events and Kafka's retention deletes
    // everything written so far.
    let records: Vec<(String, String)> = (40..100)
        .map(|i| {
            (
                format!("g{i}"),
                json!({"ts": ts, "event_id": format!("e{i}"), "values": {"seq": i}}).to_string(),
            )
        })
        .collect();
    let sends: Vec<(Option<&str>, String, Option<i32>)> = records
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.clone(), None))
        .collect();
    produce(&producer(&broker), "gap.txn", &sends);
    let meta: BaseConsumer = client_config(&broker)
        .set("group.id", "t")
        .create()
        .unwrap();
    let mut upto = TopicPartitionList::new();
    for p in 0..4 {
        let (_, high) = meta
            .fetch_watermarks("gap.txn", p, Duration::from_secs(5))
            .unwrap();
        upto.add_partition_offset("gap.txn", p, Offset::Offset(high))
            .unwrap();
    }
    let admin: AdminClient<DefaultClientContext> = client_config(&broker).create().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(admin.delete_records(&upto, &AdminOptions::new()))
        .unwrap();
    // Back: the 60 records nobody read are a gap of 60 offsets, counted; what follows is written.
    let server = Server::restart(&dir_q);
    let (status, v) = server.post("/v1/events", &batch(100, 20));
    assert_eq!(status, 200, "{v}");
    wait_for("the sink wrote what came after the gap", || {
        (rows(&mut pg) == 60, rows(&mut pg))
    });
    let lost: i64 = pg
        .query_one(
            &format!("SELECT coalesce(sum(to_offset - from_offset), 0)::bigint FROM {table}_gaps"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(lost, 60, "every deleted, unread record is in {table}_gaps");
    assert_eq!(server.metric("quiver_history_lost_records_total"), 60.0);
    server.stop();
    drop_history(&mut pg, &table);
}

/// A second view, so that each partition has two streams (a topic each).
const CLICKS: &str = r#"
[[view]]
name = "clicks"
entity = "user"
allowed_lateness = "1h"
features = [{ name = "page", type = "string" }, { name = "n", type = "i64" }]
aggregations = [{ name = "clicks_1h", of = "n", fn = "count", window = "1h" }]
"#;

/// Online snapshots with Kafka, where a partition has a stream per topic and a snapshot an
/// end position in each: `kill -9` while snapshots are taken under load on two views, and
/// the state recovered from the snapshots and the topics' tails equals a replay of both
/// topics whole (counts, latest values, row versions).
#[test]
fn kill9_amid_online_snapshots_of_two_topics_recovers_the_state_of_a_whole_replay() {
    const KEYS: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let config = VIEWS.replace(
        "snapshot_interval = \"500ms\"",
        "snapshot_interval = \"100ms\"\nsnapshot_change_ratio = 0.0",
    ) + CLICKS;
    assert!(config.contains("100ms"));
    let server = start(dir.path(), &broker, &config, "online.");
    let (url, stop) = (server.url.clone(), Arc::new(AtomicBool::new(false)));
    let ts = now_ms();
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (url, stop) = (url.clone(), stop.clone());
            std::thread::spawn(move || {
                let client = client();
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let events: Vec<String> = (0..100)
                        .map(|i| {
                            n += 1;
                            let key = (n * 7 + w) % KEYS;
                            match i % 2 {
                                0 => format!(r#"{{"view":"txn","key":"k{key}","ts":{ts},"values":{{"amount":{i},"seq":{n}}}}}"#),
                                _ => format!(r#"{{"view":"clicks","key":"k{key}","ts":{ts},"values":{{"page":"p{i}","n":{n}}}}}"#),
                            }
                        })
                        .collect();
                    let sent = client
                        .post(format!("{url}/v1/events?ack=durable"))
                        .body(format!("[{}]", events.join(",")))
                        .send();
                    if sent.is_err() {
                        return; // the server is gone
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    let taken = server.metric("quiver_snapshot_seconds_count");
    let dir_q = server.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        taken >= 4.0,
        "snapshots taken under load before the kill ({taken})"
    );
    let keys: Vec<String> = (0..KEYS).map(|i| format!("k{i}")).collect();
    let read = |server: &Server| {
        (
            read_all(server, "txn", &keys),
            read_all(server, "clicks", &keys),
        )
    };
    let server = Server::restart(&dir_q);
    let recovered = read(&server);
    server.stop();
    let snaps = snapshot_files(&dir_q);
    assert!(!snaps.is_empty());
    for snap in snaps {
        std::fs::remove_file(snap).unwrap();
    }
    let server = Server::restart(&dir_q);
    let replayed = read(&server);
    server.stop();
    let counted: i64 = (replayed.0.iter().chain(&replayed.1))
        .map(|v| {
            let f = &v["features"];
            f["n_1h"]["value"]
                .as_i64()
                .or(f["clicks_1h"]["value"].as_i64())
                .unwrap_or(0)
        })
        .sum();
    assert!(counted > 1_000, "{counted} events counted");
    for (i, (a, b)) in recovered.0.iter().zip(&replayed.0).enumerate() {
        assert_eq!(a, b, "txn k{i}: recovered from snapshots vs replayed whole");
    }
    for (i, (a, b)) in recovered.1.iter().zip(&replayed.1).enumerate() {
        assert_eq!(
            a, b,
            "clicks k{i}: recovered from snapshots vs replayed whole"
        );
    }
}

/// Runs the test `name` of this binary again, alone, in a network namespace of its own (and a
/// user namespace, so that no privilege is needed where the kernel allows them), and asserts
/// it passed. Returns false there, where the test's body runs — after checking that it is not
/// the namespace the test started in, whose loopback it must never shape. The broker and the
/// Python venv are found before, as nothing can be installed inside (no network but loopback).
fn rerun_in_own_netns(name: &str) -> bool {
    const OUTSIDE: &str = "QUIVER_TEST_OUTER_NETNS";
    let here = std::fs::read_link("/proc/self/ns/net").expect("this process's network namespace");
    if let Some(outer) = std::env::var_os(OUTSIDE) {
        assert_ne!(
            here.as_os_str(),
            outer.as_os_str(),
            "still in the namespace the test started in"
        );
        return false;
    }
    let out = std::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--net", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(OUTSIDE, &here)
        .env(
            "QUIVER_TEST_KAFKA_BROKER",
            quiver_testkit::kafka_broker_binary(),
        )
        .env("QUIVER_TEST_PYTHON", client_python())
        .output()
        .expect("run unshare (util-linux)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} in its own network namespace:\n{text}"
    );
    assert!(
        text.contains("1 passed"),
        "{name} did not run inside:\n{text}"
    );
    true
}

/// Runs `cmd`, panicking with its output on failure.
fn sh(cmd: &[&str]) {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker slower to answer a fetch than the reader's idle look (5 ms) — here a loopback
/// shaped to 4 Mbit/s, so a fetch of 300 records (~30 kB) takes ~60 ms to arrive — is still read with
/// `idle_fetch_backoff` on. (The reader used to call its partitions idle 5 ms after assigning
/// them, whatever the broker had said, take them away and throw the answer on its way out:
/// against such a broker nothing was ever read. Found with Tansu, an Apache-Kafka-compatible
/// broker, where `bench restart --kafka` waited forever.)
#[test]
fn a_broker_slower_than_the_idle_look_is_still_read_with_idle_backoff() {
    if rerun_in_own_netns("a_broker_slower_than_the_idle_look_is_still_read_with_idle_backoff") {
        return;
    }
    sh(&["ip", "link", "set", "lo", "up"]);
    // tbf drops packets larger than its burst: loopback's 64 KiB MTU must come down first.
    sh(&["ip", "link", "set", "lo", "mtu", "1500"]);
    sh(&[
        "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "4mbit", "burst", "4kb",
        "latency", "2000ms",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(&dir.path().join("broker"));
    let server = start(dir.path(), &broker, VIEWS, "slow.");
    let ts = now_ms();
    // One request: its records reach the reader as fetches of many kilobytes each.
    let events: Vec<Value> = (0..300)
        .map(|i| json!({"view": "txn", "key": format!("s{i}"), "ts": ts, "event_id": format!("s-{i}"), "values": {"seq": i, "amount": 1.5}}))
        .collect();
    let (status, v) = server.post("/v1/events", &Value::from(events).to_string());
    assert_eq!(status, 200, "{v}");
    wait_for_seqs(&server, "s", 300, 23);
}
