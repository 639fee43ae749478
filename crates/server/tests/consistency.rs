//! Training/serving consistency as a property: stream a random event sequence (out of order,
//! duplicate event ids, late events) through a real node, record what the online store serves
//! at instants between the phases of the stream, then ask point-in-time retrieval for the same
//! instants: every value, status and timestamp must be identical.

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use quiver_core::event::decode_batch;
use quiver_core::token::Token;
use quiver_core::{record, Config};
use quiver_log::{Ack, RecordBatch};
use quiver_server::Node;
use quiver_store::pit;

fn config(dir: &std::path::Path) -> Config {
    let text = format!(
        r#"
[server]
data_dir = "{}"
[log]
partitions = 3
fsync = "never"
[[entity]]
name = "card"
key = "card_id"
[[view]]
name = "txn"
entity = "card"
ttl = "10m"
allowed_lateness = "2m"
features = [{{ name = "amount", type = "f64" }}, {{ name = "merchant", type = "string" }}]
aggregations = [
  {{ name = "sum_5m", of = "amount", fn = "sum", window = "5m" }},
  {{ name = "count_1h", of = "amount", fn = "count", window = "1h", tile = "1m" }},
  {{ name = "last_10m", of = "amount", fn = "last", window = "10m" }},
  {{ name = "std_30m", of = "amount", fn = "stddev", window = "30m" }},
]
"#,
        dir.display()
    );
    Config::from_toml_with_env(&text, Vec::new()).unwrap()
}

/// (card, event time offset from now in seconds, amount, event id — reused ids are duplicates)
type Ev = (u8, i64, i32, Option<u8>);

fn append(node: &Node, events: &[Ev], now: i64) -> Token {
    let lines: Vec<String> = events
        .iter()
        .map(|(card, dt, amount, id)| {
            let id = id.map(|i| format!(r#","event_id":"e{i}""#)).unwrap_or_default();
            let merchant = if amount % 3 == 0 { "null".to_string() } else { format!("\"m{}\"", amount % 5) };
            format!(r#"{{"view":"txn","key":"c{card}","ts":{},"values":{{"amount":{amount},"merchant":{merchant}}}{id}}}"#, now + dt * 1000)
        })
        .collect();
    let schema = node.schema.clone();
    let events = decode_batch(lines.join("\n").as_bytes(), &schema, &node.limits, now).unwrap();
    let p = node.log.partitions();
    let mut per: Vec<RecordBatch> = (0..p).map(|_| RecordBatch::new()).collect();
    for e in &events {
        let dedup = e
            .event_id
            .as_deref()
            .map(|id| record::dedup_from_event_id("txn", &e.key, id));
        per[quiver_core::partition::partition_for(e.key.as_bytes(), p) as usize]
            .push_with(|b| record::encode(&schema, e, dedup, b));
    }
    let mut token = Token::new();
    for a in node
        .log
        .append(
            per.into_iter()
                .enumerate()
                .map(|(i, b)| (i as u32, b))
                .collect(),
            Ack::Durable,
        )
        .unwrap()
    {
        token.advance(a.stream, a.next_offset().unwrap());
        a.wait_blocking().unwrap();
    }
    token
}

fn arb_event() -> impl Strategy<Value = Ev> {
    // Times up to 10 minutes either side of now: late beyond the 2m allowance, future-dated,
    // and inside every window. Event ids from a small pool, so duplicates are common.
    (
        0u8..4,
        -600i64..600,
        -50i32..500,
        proptest::option::of(0u8..30),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn point_in_time_equals_what_was_served(phases in proptest::collection::vec(proptest::collection::vec(arb_event(), 1..25), 2..5)) {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::open(config(dir.path())).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let view = node.schema.view_id("txn").unwrap();
        let columns: Vec<u16> = (0..node.schema.view(view).columns() as u16).collect();
        let keys: Vec<String> = (0..4).map(|c| format!("c{c}")).collect();
        let mut served = Vec::new(); // (instant, key, reads)
        for events in &phases {
            let token = append(&node, events, quiver_core::time::now_ms());
            prop_assert!(rt.block_on(node.store.wait_applied(&token, Duration::from_secs(10))));
            // The instant lies strictly between this phase's appends and the next phase's.
            std::thread::sleep(Duration::from_millis(3));
            let t = quiver_core::time::now_ms();
            std::thread::sleep(Duration::from_millis(3));
            for k in &keys {
                let mut out = Vec::new();
                node.store.read(view, k, &columns, t, &mut out);
                served.push((t, k.clone(), out));
            }
        }
        let wanted: HashSet<String> = keys.iter().cloned().collect();
        let history = pit::collect_from_log(node.log.as_ref(), "txn", &wanted, &|_| 0).unwrap();
        for k in &keys {
            let instants: Vec<(usize, i64)> = served.iter().enumerate().filter(|(_, s)| &s.1 == k).map(|(i, s)| (i, s.0)).collect();
            let records = history.get(k).map(Vec::as_slice).unwrap_or(&[]);
            for (row, reads) in pit::replay_at(&node.schema, view, k, records, &instants, &columns, pit::Semantics::AsServed) {
                prop_assert_eq!(&reads, &served[row].2, "key {} at instant {}", k, served[row].0);
            }
        }
        prop_assert!(served.iter().any(|s| s.2.iter().any(|r| r.status == quiver_store::Status::Present)), "the test compares real values");
        node.shutdown();
    }
}
