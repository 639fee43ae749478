//! Quiver's binary log record ↔ a Kafka record (DESIGN.md §3): key = the entity key (UTF-8),
//! value = the event as JSON `{"ts", "event_id", "values"}`, topic = `{topic_prefix}{view}`,
//! partition = `murmur2(key) % partitions` (Kafka's default partitioner). A dedup id that does
//! not follow from the `event_id` (one derived from an `Idempotency-Key`) travels in the
//! header `quiver-dedup` (16 bytes, little-endian), so a retried batch is still applied once.
//!
//! Reading back validates like ingest does: a record that is not a valid event of its topic's
//! view is a [`Rejection`] with a stable reason, never a panic and never a stopped partition.

use quiver_core::event::{self, EventLimits};
use quiver_core::partition::partition_for;
use quiver_core::record::{self, CodecError};
use quiver_core::schema::{Schema, ViewId};
use serde::Serialize;

pub const DEDUP_HEADER: &str = "quiver-dedup";

/// The Kafka form of one log record.
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub key: &'a str,
    pub dedup: Option<[u8; 16]>,
}

#[derive(Serialize)]
struct Value<'a> {
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    values: serde_json::Map<String, serde_json::Value>,
}

/// Writes the JSON value of the binary record `payload` into `value` and returns where it goes.
pub fn to_kafka<'a>(payload: &'a [u8], value: &mut Vec<u8>) -> Result<Outgoing<'a>, CodecError> {
    let rec = record::decode(payload)?;
    value.clear();
    let body = Value {
        ts: rec.ts_ms,
        event_id: rec.event_id,
        values: rec
            .values
            .iter()
            .map(|(name, v)| (name.to_string(), v.to_json()))
            .collect(),
    };
    serde_json::to_writer(&mut *value, &body).expect("writing JSON to a Vec cannot fail");
    // Only a dedup id the reader cannot derive from the event_id needs the header.
    let derived = match (rec.event_id, rec.dedup) {
        (Some(id), Some(d)) => record::dedup_from_event_id(rec.view, rec.key, id) == d,
        _ => false,
    };
    Ok(Outgoing {
        key: rec.key,
        dedup: rec.dedup.filter(|_| !derived).map(u128::to_le_bytes),
    })
}

/// Why a record read from Kafka is not an event of its topic's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable, for the `reason` label: the ingest reasons plus `wrong_partition`, `bad_header`.
    pub reason: &'static str,
    pub message: String,
}

/// A record read from Kafka, as the reader hands it over.
pub struct Incoming<'a> {
    pub view: ViewId,
    /// A view fed by somebody else's topic (field mapping) rather than Quiver's own.
    pub source: bool,
    pub partition: u32,
    pub partitions: u32,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub dedup_header: Option<&'a [u8]>,
    pub timestamp_ms: i64,
}

/// Validates `rec` as an event of its view and appends its binary record to `out`.
pub fn from_kafka(
    rec: &Incoming<'_>,
    schema: &Schema,
    limits: &EventLimits,
    out: &mut Vec<u8>,
) -> Result<(), Rejection> {
    let value = rec.value.unwrap_or_default();
    let decoded = if rec.source {
        event::decode_source_record(rec.view, rec.key, value, schema, limits, rec.timestamp_ms)
    } else {
        event::decode_topic_event(rec.view, rec.key, value, schema, limits, rec.timestamp_ms)
    };
    let ev = decoded.map_err(|e| Rejection {
        reason: e.reason.code(),
        message: e.to_string(),
    })?;
    let home = partition_for(ev.key.as_bytes(), rec.partitions);
    if home != rec.partition {
        return Err(Rejection {
            reason: "wrong_partition",
            message: format!(
                "key {:?} belongs in partition {home} (murmur2), not {}: the producer must key \
                 records by the entity key with Kafka's default partitioner (librdkafka: \
                 partitioner=murmur2_random)",
                ev.key, rec.partition
            ),
        });
    }
    let view = &schema.view(rec.view).name;
    let dedup = match rec.dedup_header {
        Some(h) => Some(u128::from_le_bytes(h.try_into().map_err(|_| {
            Rejection {
                reason: "bad_header",
                message: format!("{DEDUP_HEADER} must be 16 bytes, not {}", h.len()),
            }
        })?)),
        None => ev
            .event_id
            .as_deref()
            .map(|id| record::dedup_from_event_id(view, &ev.key, id)),
    };
    record::encode(schema, &ev, dedup, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::Config;

    const CONFIG: &str = r#"
[log]
backend = "kafka"
[kafka]
partitions = 4
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "txn"
entity = "user"
features = [{ name = "amount", type = "f64" }, { name = "n", type = "i64" }, { name = "tag", type = "string" }]
[[view]]
name = "pay"
entity = "user"
features = [{ name = "amount", type = "f64" }]
source = { kafka_topic = "payments", key_field = "user", ts_field = "at", event_id_field = "id", fields = { amount = "amt" } }
"#;

    fn setup() -> (Schema, EventLimits) {
        let config = Config::from_toml_with_env(CONFIG, Vec::new()).unwrap();
        (
            Schema::compile(&config).unwrap(),
            EventLimits::from_config(&config),
        )
    }

    fn incoming<'a>(view: ViewId, source: bool, key: &'a str, value: &'a [u8]) -> Incoming<'a> {
        Incoming {
            view,
            source,
            partition: partition_for(key.as_bytes(), 4),
            partitions: 4,
            key: Some(key.as_bytes()),
            value: Some(value),
            dedup_header: None,
            timestamp_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_record_survives_the_round_trip_through_kafka() {
        let (schema, limits) = setup();
        let body = br#"[{"view":"txn","key":"u1","ts":1700000000123,"event_id":"e1","values":{"amount":2.5,"n":-3,"tag":"x"}},
                        {"view":"txn","key":"u2","ts":1700000000124,"values":{"tag":null}}]"#;
        let events = event::decode_batch(body, &schema, &limits, 0).unwrap();
        for (i, e) in events.iter().enumerate() {
            let dedup = Some(record::dedup_from_idempotency("k", i));
            let mut payload = Vec::new();
            record::encode(&schema, e, dedup, &mut payload);
            let mut value = Vec::new();
            let out = to_kafka(&payload, &mut value).unwrap();
            assert_eq!(out.key, e.key.as_str());
            let mut inc = incoming(0, false, out.key, &value);
            let header = out.dedup;
            inc.dedup_header = header.as_ref().map(|h| &h[..]);
            let mut back = Vec::new();
            from_kafka(&inc, &schema, &limits, &mut back).unwrap();
            assert_eq!(back, payload, "the binary record comes back byte for byte");
        }
    }

    #[test]
    fn a_dedup_id_from_the_event_id_needs_no_header() {
        let (schema, limits) = setup();
        let body = br#"{"view":"txn","key":"u1","ts":1,"event_id":"e1","values":{"n":1}}"#;
        let e = &event::decode_batch(body, &schema, &limits, 0).unwrap()[0];
        let mut payload = Vec::new();
        record::encode(
            &schema,
            e,
            Some(record::dedup_from_event_id("txn", "u1", "e1")),
            &mut payload,
        );
        let mut value = Vec::new();
        assert_eq!(to_kafka(&payload, &mut value).unwrap().dedup, None);
        let mut back = Vec::new();
        from_kafka(
            &incoming(0, false, "u1", &value),
            &schema,
            &limits,
            &mut back,
        )
        .unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn source_records_are_mapped_and_other_fields_ignored() {
        let (schema, limits) = setup();
        let value =
            br#"{"user": 42, "at": "2026-11-23T12:00:00Z", "id": 7, "amt": 9.5, "other": [1]}"#;
        let mut inc = incoming(1, true, "ignored", value);
        inc.partition = partition_for(b"42", 4);
        let mut out = Vec::new();
        from_kafka(&inc, &schema, &limits, &mut out).unwrap();
        let rec = record::decode(&out).unwrap();
        assert_eq!((rec.view, rec.key, rec.event_id), ("pay", "42", Some("7")));
        assert_eq!(rec.ts_ms, 1_795_435_200_000);
        assert_eq!(
            rec.values,
            vec![("amount", quiver_core::value::Value::F64(9.5))]
        );
        assert_eq!(
            rec.dedup,
            Some(record::dedup_from_event_id("pay", "42", "7"))
        );
    }

    #[test]
    fn bad_records_are_rejected_with_a_reason() {
        let (schema, limits) = setup();
        let cases: &[(ViewId, bool, &str, &[u8], &str)] = &[
            (0, false, "u1", b"not json", "malformed_json"),
            (
                0,
                false,
                "u1",
                br#"{"values":{"amount":"x"}}"#,
                "missing_field",
            ),
            (
                0,
                false,
                "u1",
                br#"{"values":{"amount":1},"extra":1}"#,
                "unknown_field",
            ),
            (0, false, "u1", br#"{"values":{"nope":1}}"#, "missing_field"),
            (
                0,
                false,
                "u1",
                br#"{"view":"pay","values":{"amount":1}}"#,
                "mismatch",
            ),
            (
                0,
                false,
                "u1",
                br#"{"key":"u2","values":{"amount":1}}"#,
                "mismatch",
            ),
            (
                0,
                false,
                "u1",
                br#"{"ts":"yesterday","values":{"amount":1}}"#,
                "bad_timestamp",
            ),
            (1, true, "k", br#"{"at":1,"amt":1}"#, "missing_field"),
            (1, true, "k", br#"{"user":"u1","amt":1}"#, "missing_field"),
            (1, true, "k", br#"[1,2]"#, "malformed_json"),
        ];
        for &(view, source, key, value, reason) in cases {
            let mut inc = incoming(view, source, key, value);
            if source {
                inc.partition = partition_for(b"u1", 4);
            }
            let got = from_kafka(&inc, &schema, &limits, &mut Vec::new()).unwrap_err();
            assert_eq!(got.reason, reason, "{}", String::from_utf8_lossy(value));
        }
        let mut inc = incoming(0, false, "u1", br#"{"values":{"amount":1}}"#);
        inc.partition = (inc.partition + 1) % 4;
        let got = from_kafka(&inc, &schema, &limits, &mut Vec::new()).unwrap_err();
        assert_eq!(got.reason, "wrong_partition");
    }
}
