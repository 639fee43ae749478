//! The log record codec: one validated event ↔ the payload bytes of one log record.
//!
//! Records name their view and features by *name*, not by config index, so the log stays
//! readable after the config changes (a feature added, views reordered) and the history it
//! holds can be replayed into any later schema. The log frames each payload with its length
//! and CRC32C; this codec only checks structure.
//!
//! Payload layout, version 1 (all integers little-endian):
//! ```text
//! u8   version = 1
//! u8   flags          bit 0: event_id present, bit 1: dedup id present
//! i64  ts_ms          event time
//! u16  len, bytes     view name (UTF-8)
//! u16  len, bytes     entity key (UTF-8)
//! [u16 len, bytes]    event_id (UTF-8)            if flag bit 0
//! [u128]              dedup id                    if flag bit 1
//! u16  n              number of values
//! n × { u16 len, bytes feature name; u8 tag; payload }
//!      tag 0 null | 1 f64 (8) | 2 i64 (8) | 3 bool (1) | 4 string (u32 len, bytes) | 5 f32s (u32 n, 4n)
//! ```

use std::sync::Arc;

use crate::event::Event;
use crate::schema::Schema;
use crate::time::EpochMs;
use crate::value::Value;

pub const RECORD_VERSION: u8 = 1;
const FLAG_EVENT_ID: u8 = 1;
const FLAG_DEDUP: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_EVENT_ID | FLAG_DEDUP;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("record truncated")]
    Truncated,
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("unknown flags {0:#x}")]
    Flags(u8),
    #[error("unknown value tag {0}")]
    Tag(u8),
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("string longer than a record allows")]
    TooLong,
    /// A snapshot names a feature type this build does not know.
    #[error("unknown feature type {0:?}")]
    FeatureType(String),
    /// A snapshot of another partition than the file's name says.
    #[error("a snapshot of partition {0}")]
    Partition(u32),
}

/// A decoded record, borrowing names from the payload bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<'a> {
    pub ts_ms: EpochMs,
    pub view: &'a str,
    pub key: &'a str,
    pub event_id: Option<&'a str>,
    /// Identity for at-most-once apply: from `event_id`, or from `Idempotency-Key` + position.
    pub dedup: Option<u128>,
    pub values: Vec<(&'a str, Value)>,
}

/// Dedup identity of an event that carries an `event_id`: unique per (view, key, event_id).
pub fn dedup_from_event_id(view: &str, key: &str, event_id: &str) -> u128 {
    hash_parts(&[b"e", view.as_bytes(), key.as_bytes(), event_id.as_bytes()])
}

/// Dedup identity of the `index`-th event of a batch sent with `Idempotency-Key: idem`, so a
/// retried batch whose first attempt reached the log is still applied once.
pub fn dedup_from_idempotency(idem: &str, index: usize) -> u128 {
    hash_parts(&[b"i", idem.as_bytes(), &(index as u64).to_le_bytes()])
}

/// XXH3-128 over length-prefixed parts: stable across releases (it is persisted in the log and
/// in snapshots) and unambiguous (prefixes keep `("ab","c")` apart from `("a","bc")`).
fn hash_parts(parts: &[&[u8]]) -> u128 {
    let mut buf = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for p in parts {
        buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
        buf.extend_from_slice(p);
    }
    xxhash_rust::xxh3::xxh3_128(&buf)
}

/// Appends the payload of `event` to `out`.
pub fn encode(schema: &Schema, event: &Event, dedup: Option<u128>, out: &mut Vec<u8>) {
    let view = schema.view(event.view);
    let mut flags = 0;
    if event.event_id.is_some() {
        flags |= FLAG_EVENT_ID;
    }
    if dedup.is_some() {
        flags |= FLAG_DEDUP;
    }
    out.push(RECORD_VERSION);
    out.push(flags);
    out.extend_from_slice(&event.ts_ms.to_le_bytes());
    put_str16(out, &view.name);
    put_str16(out, &event.key);
    if let Some(id) = &event.event_id {
        put_str16(out, id);
    }
    if let Some(d) = dedup {
        out.extend_from_slice(&d.to_le_bytes());
    }
    let n =
        u16::try_from(event.values.len()).expect("views have at most VIEW_FEATURES_MAX features");
    out.extend_from_slice(&n.to_le_bytes());
    for (idx, value) in &event.values {
        put_str16(out, &view.feature(*idx).name);
        put_value(out, value);
    }
}

pub fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Ingest limits (key_bytes_max, event_id_bytes_max ≤ 65535) and config names guarantee this.
    let len = u16::try_from(s.len()).expect("validated strings fit a u16 length");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub fn put_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.push(0),
        Value::F64(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::I64(v) => {
            out.push(2);
            out.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            out.push(3);
            out.push(u8::from(*v));
        }
        Value::Str(s) => {
            out.push(4);
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::F32s(v) => {
            out.push(5);
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            for x in v.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// A bounds-checked cursor over bytes, shared with the store's snapshot codec.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn str16(&mut self, what: &'static str) -> Result<&'a str, CodecError> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| CodecError::Utf8(what))
    }
}

/// Decodes one payload. Never panics, whatever the bytes (fuzzed: `fuzz/fuzz_targets/record.rs`).
pub fn decode(payload: &[u8]) -> Result<Record<'_>, CodecError> {
    let mut r = Reader { buf: payload };
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(CodecError::Version(version));
    }
    let flags = r.u8()?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(CodecError::Flags(flags));
    }
    let ts_ms = i64::from_le_bytes(r.array()?);
    let view = r.str16("view")?;
    let key = r.str16("key")?;
    let event_id = if flags & FLAG_EVENT_ID != 0 {
        Some(r.str16("event_id")?)
    } else {
        None
    };
    let dedup = if flags & FLAG_DEDUP != 0 {
        Some(u128::from_le_bytes(r.array()?))
    } else {
        None
    };
    let n = usize::from(r.u16()?);
    // Each value takes at least 3 bytes, so `n` cannot make us allocate beyond the payload.
    let mut values = Vec::with_capacity(n.min(r.buf.len() / 3));
    for _ in 0..n {
        let name = r.str16("feature name")?;
        let value = r.value()?;
        values.push((name, value));
    }
    if !r.buf.is_empty() {
        return Err(CodecError::Trailing(r.buf.len()));
    }
    Ok(Record {
        ts_ms,
        view,
        key,
        event_id,
        dedup,
        values,
    })
}

impl Reader<'_> {
    /// Reads one value written by [`put_value`].
    pub fn value(&mut self) -> Result<Value, CodecError> {
        let r = self;
        let value = match r.u8()? {
            0 => Value::Null,
            1 => Value::F64(f64::from_le_bytes(r.array()?)),
            2 => Value::I64(i64::from_le_bytes(r.array()?)),
            3 => Value::Bool(r.u8()? != 0),
            4 => {
                let len = r.u32()? as usize;
                let s =
                    std::str::from_utf8(r.take(len)?).map_err(|_| CodecError::Utf8("string"))?;
                Value::Str(Arc::from(s))
            }
            5 => {
                let count = r.u32()? as usize;
                let bytes = r.take(count.checked_mul(4).ok_or(CodecError::TooLong)?)?;
                Value::F32s(
                    bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect(),
                )
            }
            tag => return Err(CodecError::Tag(tag)),
        };
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::schema;
    use proptest::prelude::*;

    fn arb_value(feature: u16) -> BoxedStrategy<Value> {
        match feature {
            0 => prop_oneof![Just(Value::Null), (-1e12f64..1e12).prop_map(Value::F64)].boxed(),
            1 => any::<i64>().prop_map(Value::I64).boxed(),
            2 => any::<bool>().prop_map(Value::Bool).boxed(),
            3 => ".{0,20}".prop_map(|s| Value::Str(s.into())).boxed(),
            _ => proptest::collection::vec(-1e6f32..1e6, 2)
                .prop_map(|v| Value::F32s(v.into()))
                .boxed(),
        }
    }

    fn arb_event() -> impl Strategy<Value = (Event, Option<u128>)> {
        let values =
            proptest::sample::subsequence(vec![0u16, 1, 2, 3, 4], 1..=5).prop_flat_map(|idx| {
                idx.into_iter()
                    .map(|i| arb_value(i).prop_map(move |v| (i, v)))
                    .collect::<Vec<_>>()
            });
        (
            ".{1,12}",
            any::<i64>(),
            proptest::option::of("[a-z0-9]{1,8}"),
            values,
            any::<Option<u128>>(),
        )
            .prop_map(|(key, ts_ms, event_id, values, dedup)| {
                (
                    Event {
                        view: 0,
                        key,
                        ts_ms,
                        event_id,
                        values,
                    },
                    dedup,
                )
            })
    }

    proptest! {
        #[test]
        fn round_trips((event, dedup) in arb_event()) {
            let s = schema();
            let mut buf = Vec::new();
            encode(&s, &event, dedup, &mut buf);
            let rec = decode(&buf).unwrap();
            prop_assert_eq!(rec.view, "txn");
            prop_assert_eq!(rec.key, event.key.as_str());
            prop_assert_eq!(rec.ts_ms, event.ts_ms);
            prop_assert_eq!(rec.event_id, event.event_id.as_deref());
            prop_assert_eq!(rec.dedup, dedup);
            let view = s.view(0);
            let expected: Vec<(&str, Value)> = event.values.iter().map(|(i, v)| (view.feature(*i).name.as_str(), v.clone())).collect();
            prop_assert_eq!(rec.values, expected);
        }

        #[test]
        fn truncation_is_an_error_never_a_panic((event, dedup) in arb_event(), cut in any::<proptest::sample::Index>()) {
            let mut buf = Vec::new();
            encode(&schema(), &event, dedup, &mut buf);
            let at = cut.index(buf.len());
            prop_assert!(decode(&buf[..at]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn dedup_ids_are_stable_and_distinct() {
        // Persisted in logs and snapshots: this value must never change between releases.
        assert_eq!(
            dedup_from_event_id("txn", "u1", "e1"),
            dedup_from_event_id("txn", "u1", "e1")
        );
        assert_ne!(
            dedup_from_event_id("txn", "u1", "e1"),
            dedup_from_event_id("txn", "u", "1e1")
        );
        assert_ne!(
            dedup_from_idempotency("k", 0),
            dedup_from_idempotency("k", 1)
        );
    }
}
