//! Point in time by event time (Feast's join) against a brute-force oracle: random streams of
//! events for a few keys — out of order, duplicated by `event_id`, arriving long after their
//! event time — and random instants; every feature, status, timestamp and aggregate read at
//! each instant equals what the definition says (DESIGN.md §4).

use std::collections::HashSet;
use std::sync::Arc;

use proptest::prelude::*;
use quiver_core::event::Event;
use quiver_core::record;
use quiver_core::value::Value;
use quiver_core::{Config, Schema};
use quiver_store::pit::{replay_at, HistoryRecord, Semantics};
use quiver_store::{FeatureRead, Status};

const CONFIG: &str = r#"
[[entity]]
name = "card"
key = "card_id"
[[view]]
name = "txn"
entity = "card"
ttl = "30m"
allowed_lateness = "1m"
features = [{ name = "amount", type = "f64" }, { name = "seq", type = "i64" }]
aggregations = [
  { name = "amount_sum_10m", of = "amount", fn = "sum", window = "10m", tile = "1m" },
  { name = "amount_count_10m", of = "amount", fn = "count", window = "10m", tile = "1m" },
]
"#;

const MIN: i64 = 60_000;
const TTL: i64 = 30 * MIN;
const WINDOW: i64 = 10 * MIN;
const BASE: i64 = 1_800_000_000_000;

#[derive(Debug, Clone)]
struct Ev {
    key: usize,
    ts: i64,
    event_id: Option<u8>,
    amount: Option<Option<f64>>, // None: not in the event; Some(None): explicit null
    seq: Option<i64>,
}

fn arb_event() -> impl Strategy<Value = Ev> {
    (
        0..3usize,
        0..(3 * 60 * MIN),
        proptest::option::weighted(0.4, 0..12u8),
        proptest::option::weighted(0.8, proptest::option::weighted(0.9, -1000i32..1000)),
        proptest::option::weighted(0.6, 0..1000i64),
    )
        .prop_filter("an event carries a value", |(_, _, _, a, s)| {
            a.is_some() || s.is_some()
        })
        .prop_map(|(key, ts, event_id, amount, seq)| Ev {
            key,
            ts: BASE + ts,
            event_id,
            amount: amount.map(|a| a.map(|x| f64::from(x) / 4.0)),
            seq,
        })
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::compile(&Config::from_toml_with_env(CONFIG, Vec::new()).unwrap()).unwrap())
}

/// The stream as one key's log records, in arrival (log) order.
fn records(schema: &Schema, events: &[Ev], key: usize) -> Vec<HistoryRecord> {
    let view = schema.view_by_name("txn").unwrap();
    let mut out = Vec::new();
    for (offset, e) in events.iter().enumerate().filter(|(_, e)| e.key == key) {
        let mut values = Vec::new();
        if let Some(a) = e.amount {
            values.push((0, a.map(Value::F64).unwrap_or(Value::Null)));
        }
        if let Some(s) = e.seq {
            values.push((1, Value::I64(s)));
        }
        let event_id = e.event_id.map(|i| format!("id{i}"));
        let k = format!("k{key}");
        let dedup = event_id
            .as_deref()
            .map(|id| record::dedup_from_event_id("txn", &k, id));
        let event = Event {
            view: view.id,
            key: k,
            ts_ms: e.ts,
            event_id,
            values,
        };
        let mut payload = Vec::new();
        record::encode(schema, &event, dedup, &mut payload);
        out.push(HistoryRecord {
            offset: offset as u64,
            append_ms: BASE + 10 * 60 * MIN + offset as i64, // all arrive after every instant
            payload,
        });
    }
    out
}

/// The definition, computed directly: one key's reads at `t` (amount, seq, sum, count).
fn oracle(events: &[Ev], key: usize, t: i64) -> Vec<FeatureRead> {
    let mut seen = HashSet::new();
    let counted: Vec<(usize, &Ev)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.key == key)
        .filter(|(_, e)| e.event_id.is_none_or(|id| seen.insert(id)))
        .filter(|(_, e)| e.ts <= t)
        .collect();
    if counted.is_empty() {
        return (0..4).map(|_| missing(Status::NotFound, None)).collect();
    }
    let latest = |has: &dyn Fn(&Ev) -> Option<Value>| -> FeatureRead {
        let winner = counted
            .iter()
            .filter_map(|(o, e)| Some(((e.ts, *o), has(e)?)))
            .max_by_key(|(order, _)| *order);
        match winner {
            None => missing(Status::NotFound, None),
            Some(((ts, _), _)) if t - ts > TTL => missing(Status::OutsideMaxAge, Some(ts)),
            Some(((ts, _), Value::Null)) => missing(Status::NullValue, Some(ts)),
            Some(((ts, _), value)) => FeatureRead {
                status: Status::Present,
                value,
                ts_ms: Some(ts),
            },
        }
    };
    let amount = latest(&|e| e.amount.map(|a| a.map(Value::F64).unwrap_or(Value::Null)));
    let seq = latest(&|e| e.seq.map(Value::I64));
    // Tiles of one minute: the window's old edge is rounded down to a tile boundary.
    let oldest_tile = (t - WINDOW).div_euclid(MIN);
    let in_window: Vec<f64> = counted
        .iter()
        .filter(|(_, e)| e.ts.div_euclid(MIN) >= oldest_tile)
        .filter_map(|(_, e)| e.amount.flatten())
        .collect();
    let sum = Value::F64(in_window.iter().sum());
    let count = Value::I64(in_window.len() as i64);
    vec![amount, seq, aggregate(sum), aggregate(count)]
}

fn missing(status: Status, ts_ms: Option<i64>) -> FeatureRead {
    FeatureRead {
        status,
        value: Value::Null,
        ts_ms,
    }
}

fn aggregate(value: Value) -> FeatureRead {
    FeatureRead {
        status: Status::Present,
        value,
        ts_ms: None,
    }
}

fn same(got: &FeatureRead, want: &FeatureRead, aggregate: bool) -> bool {
    let value = match (&got.value, &want.value) {
        (Value::F64(a), Value::F64(b)) => (a - b).abs() <= 1e-9 * (1.0 + b.abs()),
        (a, b) => a == b,
    };
    // An aggregate's timestamp is the newest event it folded: not part of the definition.
    value && got.status == want.status && (aggregate || got.ts_ms == want.ts_ms)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn event_time_equals_the_definition(
        events in proptest::collection::vec(arb_event(), 1..60),
        instants in proptest::collection::vec(0..(4 * 60 * MIN), 1..12),
    ) {
        let schema = schema();
        for key in 0..3 {
            let recs = records(&schema, &events, key);
            let rows: Vec<(usize, i64)> = instants.iter().enumerate().map(|(i, &t)| (i, BASE - MIN + t)).collect();
            let k = format!("k{key}");
            let got = replay_at(&schema, 0, &k, &recs, &rows, &[0, 1, 2, 3], Semantics::EventTime);
            prop_assert_eq!(got.len(), rows.len());
            for (row, reads) in got {
                let t = rows[row].1;
                let want = oracle(&events, key, t);
                for (c, (g, w)) in reads.iter().zip(&want).enumerate() {
                    prop_assert!(same(g, w, c >= 2), "key {} at {} column {}: got {:?}, want {:?}", k, t - BASE, c, g, w);
                }
            }
        }
    }
}

#[test]
fn as_served_sees_only_what_had_arrived_and_event_time_sees_a_backfill() {
    let schema = schema();
    // Two events with event times an hour apart, both appended "now" (a backfill).
    let events = vec![
        Ev {
            key: 0,
            ts: BASE,
            event_id: None,
            amount: Some(Some(1.0)),
            seq: Some(1),
        },
        Ev {
            key: 0,
            ts: BASE + 60 * MIN,
            event_id: None,
            amount: Some(Some(2.0)),
            seq: Some(2),
        },
    ];
    let recs = records(&schema, &events, 0);
    let half_way = [(0, BASE + 30 * MIN)];
    let [(_, et)] = replay_at(
        &schema,
        0,
        "k0",
        &recs,
        &half_way,
        &[1],
        Semantics::EventTime,
    )
    .try_into()
    .unwrap();
    assert_eq!(
        et[0].value,
        Value::I64(1),
        "event time: the event before T counts"
    );
    let [(_, served)] = replay_at(
        &schema,
        0,
        "k0",
        &recs,
        &half_way,
        &[1],
        Semantics::AsServed,
    )
    .try_into()
    .unwrap();
    assert_eq!(
        served[0].status,
        Status::NotFound,
        "as served: nothing had arrived at T"
    );
}
