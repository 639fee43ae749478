//! Writing JSON replies straight into a byte buffer, for the read hot path. Building a
//! `serde_json::Value` tree for a 32-feature row costs over a hundred allocations per request;
//! this writes the same JSON with none beyond the buffer (measured in BENCHMARKS.md, `lookup`).
//! Escaping and float formatting are serde_json's, integers itoa's (as in serde_json).

use quiver_core::schema::{FeatureIdx, Schema, ViewId};
use quiver_core::time::{format_rfc3339_ms, EpochMs};
use quiver_core::value::Value;

/// Every view's columns as a single-entity reply opens them, `,"name":{"value":`, escaped
/// once at start: a GET copies one piece per column instead of checking its name for escapes
/// and copying three (callgrind: small `memcpy` calls were 11 % of a GET's instructions).
pub struct ColumnKeys(Vec<Vec<Box<[u8]>>>);

impl ColumnKeys {
    pub fn of(schema: &Schema) -> ColumnKeys {
        let views = schema.views.iter().map(|v| {
            let columns = (0..v.columns()).map(|c| {
                let c = FeatureIdx::try_from(c).expect("a view's columns fit a FeatureIdx");
                let mut j = JsonBuf::with_capacity(32);
                j.raw(",").str(v.column_name(c)).raw(":{\"value\":");
                j.buf.into_boxed_slice()
            });
            columns.collect()
        });
        ColumnKeys(views.collect())
    }

    /// The opening of `column` of `view`, with its leading comma when `first` is false.
    pub fn get(&self, view: ViewId, column: FeatureIdx, first: bool) -> &[u8] {
        let key = &self.0[usize::from(view)][usize::from(column)];
        &key[usize::from(first)..]
    }
}

/// Timestamps remembered per reply, direct-mapped by time: features of one event share a
/// time, and a batch reply is written column by column, visiting each row's time once per
/// feature — so each distinct time is formatted once while the rows fit.
const TS_SLOTS: usize = 16;

pub struct JsonBuf {
    pub buf: Vec<u8>,
    ts: [Option<(EpochMs, String)>; TS_SLOTS],
}

impl JsonBuf {
    pub fn with_capacity(n: usize) -> JsonBuf {
        JsonBuf {
            buf: Vec::with_capacity(n),
            ts: Default::default(),
        }
    }

    // Inlined: most pieces are short constants, which then become a few stores instead of a
    // call to `memcpy` (callgrind: ~10k instructions of a GET once this stopped being inlined).
    #[inline(always)]
    pub fn raw(&mut self, s: &str) -> &mut Self {
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        // Feature names, keys and views rarely need escaping: copy those as they are.
        if s.bytes()
            .all(|b| (0x20..0x7F).contains(&b) && b != b'"' && b != b'\\')
        {
            self.buf.reserve(s.len() + 2);
            self.buf.push(b'"');
            self.buf.extend_from_slice(s.as_bytes());
            self.buf.push(b'"');
            return self;
        }
        serde_json::to_writer(&mut self.buf, s).expect("writing to a Vec cannot fail");
        self
    }

    /// A float as serde_json writes it; `null` if it is not finite (JSON has no NaN or ∞).
    pub fn f64(&mut self, x: f64) -> &mut Self {
        if x.is_finite() {
            serde_json::to_writer(&mut self.buf, &x).expect("writing to a Vec cannot fail");
            self
        } else {
            self.raw("null")
        }
    }

    // Integers by itoa (what serde_json uses inside), without its writer's machinery.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(itoa::Buffer::new().format(v))
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.raw(itoa::Buffer::new().format(v))
    }

    pub fn value(&mut self, v: &Value) -> &mut Self {
        match v {
            Value::Null => self.raw("null"),
            // Stored values are finite (validated at ingest); null is the safe fallback.
            Value::F64(x) => self.f64(*x),
            Value::I64(x) => self.i64(*x),
            Value::Bool(b) => self.raw(if *b { "true" } else { "false" }),
            Value::Str(s) => self.str(s),
            Value::F32s(xs) => {
                self.raw("[");
                for (i, x) in xs.iter().enumerate() {
                    if i > 0 {
                        self.raw(",");
                    }
                    serde_json::to_writer(&mut self.buf, x).expect("vec");
                }
                self.raw("]")
            }
        }
    }

    pub fn timestamp(&mut self, ts: EpochMs) -> &mut Self {
        // Fibonacci hashing: times a millisecond apart land in different slots.
        let slot = ((ts as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize;
        debug_assert!(slot < TS_SLOTS);
        let text = match &self.ts[slot] {
            Some((t, text)) if *t == ts => text,
            _ => &self.ts[slot].insert((ts, format_rfc3339_ms(ts))).1,
        };
        self.buf.push(b'"');
        self.buf.extend_from_slice(text.as_bytes());
        self.buf.push(b'"');
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any string (the copied fast path or serde's escaping) reads back as itself.
        #[test]
        fn any_string_round_trips(s in ".*|[ -~]*|[\\x00-\\x7f]*") {
            let mut j = JsonBuf::with_capacity(8);
            j.str(&s);
            let back: String = serde_json::from_slice(&j.buf).unwrap();
            proptest::prop_assert_eq!(back, s);
        }

        /// Integers are written as serde_json writes them.
        #[test]
        fn integers_are_written_as_serde_json_writes_them(i in proptest::num::i64::ANY, u in proptest::num::u64::ANY) {
            let mut j = JsonBuf::with_capacity(8);
            j.i64(i).raw(",").u64(u).raw(",").i64(i64::MIN).raw(",").u64(u64::MAX);
            let expected = serde_json::to_string(&(i, u, i64::MIN, u64::MAX)).unwrap();
            proptest::prop_assert_eq!(format!("[{}]", String::from_utf8(j.buf).unwrap()), expected);
        }
    }

    #[test]
    fn writes_valid_json() {
        let mut j = JsonBuf::with_capacity(64);
        j.raw("{")
            .str("a\"b")
            .raw(":[")
            .value(&Value::F64(1.5))
            .raw(",")
            .value(&Value::F32s(vec![1.0, 2.5].into()));
        j.raw(",")
            .value(&Value::Str("x\ny".into()))
            .raw(",")
            .timestamp(0)
            .raw(",")
            .timestamp(1)
            .raw(",")
            .timestamp(0)
            .raw(",")
            .str("plain")
            .raw(",")
            .str("t\tab\\ é \u{7f}")
            .raw("]}");
        let v: serde_json::Value = serde_json::from_slice(&j.buf).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a\"b": [1.5, [1.0, 2.5], "x\ny", "1970-01-01T00:00:00.000Z", "1970-01-01T00:00:00.001Z", "1970-01-01T00:00:00.000Z", "plain", "t\tab\\ é \u{7f}"]})
        );
    }
}
