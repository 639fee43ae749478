//! RabbitMQ as an upstream, with the real binary and the RabbitMQ on 127.0.0.1:5672: messages
//! published by the lapin client are appended and acked only once durable; `kill -9` of
//! Quiver mid-stream loses and doubles nothing (messages delivered again — redelivered after
//! the kill, or published twice — are deduplicated by their events' ids, or by ids derived
//! from the AMQP `message_id`); a bad message is rejected, counted and not redelivered.

mod common;

use std::time::{Duration, Instant};

use common::*;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const KEYS: usize = 10;
const MESSAGES: usize = 400;

fn config(queue: &str) -> String {
    format!(
        r#"
[log]
partitions = 4

[store]
snapshot_interval = "500ms"

[[rabbitmq_source]]
url = "{AMQP}"
queue = "{queue}"
prefetch = 32

[[entity]]
name = "user"
key = "user_id"

[[view]]
name = "txn"
entity = "user"
allowed_lateness = "1h"
features = [{{ name = "seq", type = "i64" }}]
aggregations = [{{ name = "n_1h", of = "seq", fn = "count", window = "1h" }}]
"#
    )
}

/// Message `m`: one event per key. Even messages carry event ids; odd ones carry none and are
/// deduplicated by their AMQP `message_id`.
fn message(m: usize, ts: i64) -> (String, Option<String>) {
    let events: Vec<String> = (0..KEYS)
        .map(|k| {
            let id = if m.is_multiple_of(2) {
                format!(r#","event_id":"m{m}-k{k}""#)
            } else {
                String::new()
            };
            format!(r#"{{"view":"txn","key":"k{k}","ts":{ts},"values":{{"seq":{m}}}{id}}}"#)
        })
        .collect();
    let message_id = (!m.is_multiple_of(2)).then(|| format!("msg-{m}"));
    (format!("[{}]", events.join(",")), message_id)
}

struct Rabbit {
    rt: tokio::runtime::Runtime,
    channel: lapin::Channel,
    queue: String,
}

impl Rabbit {
    fn connect(queue: &str) -> Rabbit {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt.block_on(async {
            let conn = Connection::connect(AMQP, ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.queue_delete(queue.into(), QueueDeleteOptions::default())
                .await
                .unwrap();
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            ch.queue_declare(queue.into(), durable, FieldTable::default())
                .await
                .unwrap();
            ch
        });
        Rabbit {
            rt,
            channel,
            queue: queue.to_string(),
        }
    }

    fn publish(&self, body: &str, message_id: Option<String>) {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.as_str().into());
        }
        self.rt.block_on(async {
            self.channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
        });
    }

    /// Messages ready in the queue (not counting delivered, unacked ones).
    fn ready(&self) -> u32 {
        self.rt.block_on(async {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            self.channel
                .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap()
                .message_count()
        })
    }

    fn delete(&self) {
        self.rt.block_on(async {
            let _ = self
                .channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        });
    }
}

fn counts(server: &Server) -> Vec<i64> {
    (0..KEYS)
        .map(|k| {
            let (status, v) = server.get(&format!("/v1/features/txn/k{k}"));
            if status == 404 {
                return 0;
            }
            assert_eq!(status, 200, "{v}");
            v["features"]["n_1h"]["value"].as_i64().unwrap()
        })
        .collect()
}

#[test]
fn kill9_mid_stream_loses_and_doubles_no_rabbitmq_message() {
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("quiver-test-{}", std::process::id());
    let rabbit = Rabbit::connect(&queue);
    let server = Server::start(dir.path(), &config(&queue));
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // A bad message among them: rejected once, never redelivered.
    rabbit.publish("not a batch of events", Some("bad-1".into()));
    for m in 0..MESSAGES / 2 {
        let (body, id) = message(m, ts);
        rabbit.publish(&body, id);
    }
    // A publisher's own retries (the same bodies and message ids) count once too, as a
    // redelivery after the kill must.
    for m in 0..10 {
        let (body, id) = message(m, ts);
        rabbit.publish(&body, id);
    }
    // Kill while the source is mid-stream: some appended and acked, some appended and not.
    let deadline = Instant::now() + Duration::from_secs(20);
    while counts(&server).iter().sum::<i64>() < (KEYS * 20) as i64 {
        assert!(Instant::now() < deadline, "the source consumes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let dir_q = server.kill9();
    for m in MESSAGES / 2..MESSAGES {
        let (body, id) = message(m, ts);
        rabbit.publish(&body, id);
    }
    let server = Server::restart(&dir_q);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = counts(&server);
        assert!(
            c.iter().all(|&n| n <= MESSAGES as i64),
            "a message applied twice: {c:?}"
        );
        if c.iter().all(|&n| n == MESSAGES as i64) && rabbit.ready() == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every message once: {c:?}, {} ready",
            rabbit.ready()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        server.metric_with("quiver_rabbitmq_messages_total", "outcome=\"rejected\""),
        0.0,
        "rejected before the kill"
    );
    server.stop();
    rabbit.delete();
}

#[test]
fn a_bad_message_is_rejected_and_counted_and_the_queue_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let queue = format!("quiver-test-bad-{}", std::process::id());
    let rabbit = Rabbit::connect(&queue);
    let server = Server::start(dir.path(), &config(&queue));
    rabbit.publish("not a batch of events", None);
    rabbit.publish(r#"[{"view":"nope","key":"k0","values":{"seq":1}}]"#, None);
    let (good, _) = message(0, 1_700_000_000_000);
    rabbit.publish(&good, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric_with("quiver_rabbitmq_messages_total", "outcome=\"appended\"") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the good message after the bad ones is appended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.metric_with("quiver_rabbitmq_messages_total", "outcome=\"rejected\""),
        2.0
    );
    assert_eq!(rabbit.ready(), 0, "rejected messages are not requeued");
    assert_eq!(
        server.get("/v1/features/txn/k3").1["features"]["seq"]["value"],
        0
    );
    rabbit.delete();
}
