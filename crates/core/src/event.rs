//! Ingest decoding: a request body (JSON array or NDJSON) → validated [`Event`]s.
//!
//! A batch is validated whole before anything is appended: the first bad event rejects the
//! batch with an [`EventError`] naming its index and field. Nothing here does IO; the HTTP
//! layer maps the error to a status code.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::schema::{FeatureIdx, Schema, ViewId};
use crate::time::{self, EpochMs};
use crate::value::{FeatureType, Value};

mod scan;

/// A validated event, ready to be encoded as a log record.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub view: ViewId,
    pub key: String,
    pub ts_ms: EpochMs,
    pub event_id: Option<String>,
    /// Sorted by feature index, no duplicates.
    pub values: Vec<(FeatureIdx, Value)>,
}

/// The per-event bounds ingest enforces (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct EventLimits {
    pub batch_events_max: usize,
    pub key_bytes_max: usize,
    pub event_id_bytes_max: usize,
    pub string_bytes_max: usize,
}

impl EventLimits {
    /// The `[limits]` a node decodes events with.
    pub fn from_config(config: &crate::Config) -> EventLimits {
        EventLimits {
            batch_events_max: config.limits.batch_events_max,
            key_bytes_max: config.limits.key_bytes_max,
            event_id_bytes_max: config.limits.event_id_bytes_max,
            string_bytes_max: config.limits.string_bytes_max,
        }
    }
}

/// Why an event was refused; `code()` is the stable metric label and error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MalformedJson,
    UnknownField,
    UnknownView,
    UnknownFeature,
    MissingField,
    WrongType,
    NonFinite,
    BadTimestamp,
    TooLong,
    BatchTooLarge,
    EmptyBatch,
    /// A Kafka record's `view` or `key` disagrees with its topic or record key.
    Mismatch,
    /// The view is fed by somebody else's Kafka topic; Quiver's ingest does not write it.
    SourceView,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::MalformedJson => "malformed_json",
            Reason::UnknownField => "unknown_field",
            Reason::UnknownView => "unknown_view",
            Reason::UnknownFeature => "unknown_feature",
            Reason::MissingField => "missing_field",
            Reason::WrongType => "wrong_type",
            Reason::NonFinite => "non_finite",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::TooLong => "too_long",
            Reason::BatchTooLarge => "batch_too_large",
            Reason::EmptyBatch => "empty_batch",
            Reason::Mismatch => "mismatch",
            Reason::SourceView => "source_view",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    pub reason: Reason,
    /// Position of the offending event in the batch (0-based); `None` for whole-batch errors.
    pub index: Option<usize>,
    /// Dotted path of the offending field, e.g. `values.amount`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(i) = self.index {
            write!(f, "event {i}: ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for EventError {}

fn err(
    reason: Reason,
    index: usize,
    field: impl Into<String>,
    message: impl Into<String>,
) -> EventError {
    EventError {
        reason,
        index: Some(index),
        field: field.into(),
        message: message.into(),
    }
}

/// Every field optional and raw, so that each problem is reported with its own field name
/// rather than serde's generic message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent<'a> {
    #[serde(borrow)]
    view: Option<&'a RawValue>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    values: Option<RawValues<'a>>,
}

/// An event's fields as JSON texts (each one whole JSON value; a JSON `null` is `None`), read
/// by the scanner ([`scan`]) or, for anything it does not take, by serde ([`RawEvent`]).
#[derive(Debug, Default, PartialEq)]
struct Fields<'a> {
    view: Option<&'a str>,
    key: Option<&'a str>,
    ts: Option<&'a str>,
    event_id: Option<&'a str>,
    values: Option<RawValues<'a>>,
}

impl<'a> Fields<'a> {
    fn of(ev: RawEvent<'a>) -> Fields<'a> {
        Fields {
            view: ev.view.map(RawValue::get),
            key: ev.key.map(RawValue::get),
            ts: ev.ts.map(RawValue::get),
            event_id: ev.event_id.map(RawValue::get),
            values: ev.values,
        }
    }
}

/// An event's fields: by the scanner when it takes the text, else by serde, whose error is
/// the one reported. Where the scanner takes a text, serde reads the same fields from it
/// (`the_scanner_reads_what_serde_reads`).
fn fields_of(text: &str, index: usize) -> Result<Fields<'_>, EventError> {
    match scan::event(text) {
        Some(fields) => Ok(fields),
        None => serde_json::from_str::<RawEvent<'_>>(text)
            .map(Fields::of)
            .map_err(|e| raw_event_error(&e, index)),
    }
}

/// An event's `values` object: (name, value's JSON text) pairs in document order; of a name
/// given twice the last counts, as in a map. A vector rather than a map, and names borrowed
/// from the body where they hold no escapes: an ingest spent 7 % of its instructions comparing
/// and copying names into a `BTreeMap` (callgrind, `scripts/callgrind-ops.sh`).
#[derive(Debug, PartialEq)]
struct RawValues<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawValues<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Pairs<'a> {
            type Value = RawValues<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of feature values")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Self::Value, M::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(16).min(256));
                while let Some((Name(k), v)) = m.next_entry::<Name<'de>, &'de RawValue>()? {
                    out.push((k, v.get()));
                }
                Ok(RawValues(out))
            }
        }
        d.deserialize_map(Pairs(std::marker::PhantomData))
    }
}

/// A JSON string, borrowed when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Text<'a> {
            type Value = Name<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a feature name")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                s: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(Text(std::marker::PhantomData))
    }
}

/// One event's JSON text, with its line for NDJSON bodies (named in errors).
pub struct EventText<'a> {
    pub text: &'a str,
    pub line: Option<usize>,
}

/// Splits a body into events' texts: a JSON array (parsed once into raw values), or NDJSON
/// (one object per non-blank line; a line is parsed only by `decode_event`, not twice).
pub fn split_batch<'a>(
    body: &'a [u8],
    limits: &EventLimits,
) -> Result<Vec<EventText<'a>>, EventError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let events: Vec<EventText<'a>> = match first {
        None => Vec::new(),
        Some(b'[') => serde_json::from_slice::<Vec<&RawValue>>(body)
            .map_err(|e| EventError {
                reason: Reason::MalformedJson,
                index: None,
                field: String::new(),
                message: format!("body is not a JSON array of events: {e}"),
            })?
            .into_iter()
            .map(|raw| EventText {
                text: raw.get(),
                line: None,
            })
            .collect(),
        Some(_) => split_lines(body, limits)?,
    };
    if events.is_empty() {
        return Err(EventError {
            reason: Reason::EmptyBatch,
            index: None,
            field: String::new(),
            message: "the batch has no events".into(),
        });
    }
    if events.len() > limits.batch_events_max {
        return Err(batch_too_large(limits));
    }
    Ok(events)
}

/// An NDJSON body's non-blank lines. The body is checked as UTF-8 once, then split by `str`'s
/// newline search, which scans a word at a time (a byte-by-byte split was 4 % of an ingest's
/// instructions: `scripts/callgrind-ops.sh`).
fn split_lines<'a>(body: &'a [u8], limits: &EventLimits) -> Result<Vec<EventText<'a>>, EventError> {
    let text = std::str::from_utf8(body).map_err(|e| {
        // The bad line's number, and its event's index: the non-blank lines before it.
        let upto = &body[..e.valid_up_to()];
        let before = upto.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        let lines = upto[..before].split(|b| *b == b'\n');
        let index = lines.filter(|l| !l.trim_ascii().is_empty()).count();
        EventError {
            reason: Reason::MalformedJson,
            index: Some(index),
            field: String::new(),
            message: format!(
                "NDJSON line {}: not UTF-8: {e}",
                upto.iter().filter(|b| **b == b'\n').count() + 1
            ),
        }
    })?;
    let mut out = Vec::new();
    for (line_no, line) in text.split('\n').enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        let line = line.trim();
        if out.len() >= limits.batch_events_max {
            return Err(batch_too_large(limits));
        }
        out.push(EventText {
            text: line,
            line: Some(line_no + 1),
        });
    }
    Ok(out)
}

fn batch_too_large(limits: &EventLimits) -> EventError {
    EventError {
        reason: Reason::BatchTooLarge,
        index: None,
        field: String::new(),
        message: format!(
            "a batch holds at most {} events (limits.batch_events_max)",
            limits.batch_events_max
        ),
    }
}

/// Decodes and validates a whole batch; `now_ms` is the event time of events without `ts`.
pub fn decode_batch(
    body: &[u8],
    schema: &Schema,
    limits: &EventLimits,
    now_ms: EpochMs,
) -> Result<Vec<Event>, EventError> {
    let texts = split_batch(body, limits)?;
    let mut events = Vec::with_capacity(texts.len());
    for (index, t) in texts.into_iter().enumerate() {
        let event = decode_event_text(t.text, index, schema, limits, now_ms).map_err(|mut e| {
            if let (Reason::MalformedJson, Some(line)) = (e.reason, t.line) {
                e.message = format!("NDJSON line {line}: {}", e.message);
            }
            e
        })?;
        events.push(event);
    }
    Ok(events)
}

pub fn decode_event(
    raw: &RawValue,
    index: usize,
    schema: &Schema,
    limits: &EventLimits,
    now_ms: EpochMs,
) -> Result<Event, EventError> {
    decode_event_text(raw.get(), index, schema, limits, now_ms)
}

/// [`decode_event`] of an event's JSON text (checked here: it need not have been parsed).
pub fn decode_event_text(
    text: &str,
    index: usize,
    schema: &Schema,
    limits: &EventLimits,
    now_ms: EpochMs,
) -> Result<Event, EventError> {
    let ev = fields_of(text, index)?;
    let view_name: Cow<'_, str> = match ev.view {
        None => return Err(err(Reason::MissingField, index, "view", "missing")),
        Some(v) => {
            string_of(v).ok_or_else(|| err(Reason::WrongType, index, "view", "must be a string"))?
        }
    };
    let Some(view_id) = schema.view_id(&view_name) else {
        return Err(err(
            Reason::UnknownView,
            index,
            "view",
            format!("unknown view {view_name:?}"),
        ));
    };
    if let Some(src) = &schema.view(view_id).source {
        return Err(err(
            Reason::SourceView,
            index,
            "view",
            format!(
                "view {view_name:?} is fed by Kafka topic {:?}; produce to that topic instead",
                src.topic
            ),
        ));
    }
    let key = match ev.key {
        None => return Err(err(Reason::MissingField, index, "key", "missing")),
        Some(k) => parse_key(k).ok_or_else(|| bad_key(index))?,
    };
    let parts = Parts {
        key,
        ts: ev.ts,
        event_id: ev.event_id,
        numeric_id: false,
        lenient: false,
    };
    finish(view_id, parts, ev.values, index, schema, limits, now_ms)
}

fn raw_event_error(e: &serde_json::Error, index: usize) -> EventError {
    let msg = e.to_string();
    // serde names the field in its message for unknown fields: surface it as the path.
    let field = msg
        .strip_prefix("unknown field `")
        .and_then(|s| s.split('`').next())
        .unwrap_or("")
        .to_string();
    let reason = if field.is_empty() {
        Reason::MalformedJson
    } else {
        Reason::UnknownField
    };
    err(reason, index, field, msg)
}

fn bad_key(index: usize) -> EventError {
    err(
        Reason::WrongType,
        index,
        "key",
        "must be a non-empty string or an integer",
    )
}

/// An event's parts other than its view and values, as found in whatever shape carried it.
struct Parts<'a> {
    key: String,
    ts: Option<&'a str>,
    event_id: Option<&'a str>,
    /// Accept an integer `event_id` (other producers' records), kept as its decimal string.
    numeric_id: bool,
    /// Leave out values of features the view no longer has (or of another type) instead of
    /// refusing the event: replaying a log written under an older config, as the store does.
    lenient: bool,
}

/// Validates an event of a known view: key, time, id and values against the schema.
fn finish(
    view_id: ViewId,
    parts: Parts<'_>,
    raw_values: Option<RawValues<'_>>,
    index: usize,
    schema: &Schema,
    limits: &EventLimits,
    now_ms: EpochMs,
) -> Result<Event, EventError> {
    let view = schema.view(view_id);
    let key = parts.key;
    if key.len() > limits.key_bytes_max {
        return Err(err(
            Reason::TooLong,
            index,
            "key",
            format!(
                "longer than {} bytes (limits.key_bytes_max)",
                limits.key_bytes_max
            ),
        ));
    }
    let ts_ms = match parts.ts {
        None => now_ms,
        Some(t) => parse_ts(t).ok_or_else(|| {
            err(
                Reason::BadTimestamp,
                index,
                "ts",
                "must be epoch milliseconds (integer) or an RFC 3339 string, years 1970..=9999",
            )
        })?,
    };
    let event_id = match parts.event_id {
        None => None,
        Some(id) => Some(parse_event_id(id, parts.numeric_id, index, limits)?),
    };
    let Some(RawValues(raw_values)) = raw_values else {
        return Err(err(Reason::MissingField, index, "values", "missing"));
    };
    if raw_values.is_empty() {
        return Err(err(
            Reason::MissingField,
            index,
            "values",
            "must name at least one feature",
        ));
    }
    let mut values: Vec<(FeatureIdx, Value)> = Vec::with_capacity(raw_values.len());
    for (name, raw) in raw_values {
        let field = || format!("values.{name}");
        let next = values.last().map_or(0, |(i, _)| usize::from(*i) + 1);
        if parts.lenient {
            let idx = view.feature_index_near(&name, next);
            if let Some((i, v)) =
                idx.and_then(|i| Some((i, parse_value(raw, view.feature(i).ty, limits).ok()?)))
            {
                values.push((i, v));
            }
            continue;
        }
        let Some(idx) = view.feature_index_near(&name, next) else {
            return Err(err(
                Reason::UnknownFeature,
                index,
                field(),
                format!("view {:?} has no feature {name:?}", view.name),
            ));
        };
        let ty = view.feature(idx).ty;
        let value =
            parse_value(raw, ty, limits).map_err(|(reason, m)| err(reason, index, field(), m))?;
        values.push((idx, value));
    }
    if values.is_empty() {
        return Err(err(
            Reason::MissingField,
            index,
            "values",
            format!("no value of a feature view {:?} has", view.name),
        ));
    }
    // By index for the row layout; of a feature named twice the last value counts (a stable
    // sort keeps document order among equal indices). Values usually come in the view's
    // order already, and the stable sort allocates: check first.
    if !values.windows(2).all(|w| w[0].0 < w[1].0) {
        values.sort_by_key(|(i, _)| *i);
        values.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                std::mem::swap(later, earlier);
            }
            same
        });
    }
    debug_assert!(values.windows(2).all(|w| w[0].0 < w[1].0));

    Ok(Event {
        view: view_id,
        key,
        ts_ms,
        event_id,
        values,
    })
}

fn parse_event_id(
    text: &str,
    numeric: bool,
    index: usize,
    limits: &EventLimits,
) -> Result<String, EventError> {
    let id = if numeric {
        parse_key(text)
    } else {
        string_of(text).map(Cow::into_owned)
    };
    let id = id.ok_or_else(|| err(Reason::WrongType, index, "event_id", "must be a string"))?;
    if id.is_empty() || id.len() > limits.event_id_bytes_max {
        return Err(err(
            Reason::TooLong,
            index,
            "event_id",
            format!(
                "must be 1..={} bytes (limits.event_id_bytes_max)",
                limits.event_id_bytes_max
            ),
        ));
    }
    Ok(id)
}

/// A record of Quiver's own Kafka topic of `view`: the Kafka key is the entity key and the
/// value is `{"ts", "event_id", "values"}`; `"view"` and `"key"`, when present, must agree
/// with the topic and the Kafka key. `record_ts_ms` is the event time of a value without `ts`.
/// Values of features the view does not have (any more) are left out, as the store does when
/// it replays an older log; an event left with none is refused.
pub fn decode_topic_event(
    view: ViewId,
    record_key: Option<&[u8]>,
    value: &[u8],
    schema: &Schema,
    limits: &EventLimits,
    record_ts_ms: EpochMs,
) -> Result<Event, EventError> {
    let text = std::str::from_utf8(value)
        .map_err(|_| err(Reason::MalformedJson, 0, "", "value is not UTF-8"))?;
    let ev = fields_of(text, 0)?;
    if let Some(v) = ev.view {
        let name =
            string_of(v).ok_or_else(|| err(Reason::WrongType, 0, "view", "must be a string"))?;
        if name != schema.view(view).name {
            return Err(err(
                Reason::Mismatch,
                0,
                "view",
                format!("names view {name:?}, not the topic's"),
            ));
        }
    }
    let from_record = record_key.map(|k| std::str::from_utf8(k).ok().filter(|k| !k.is_empty()));
    let key = match (ev.key.map(parse_key), from_record) {
        (Some(None), _) | (None, Some(None)) => return Err(bad_key(0)),
        (Some(Some(k)), Some(Some(rk))) if k != rk => {
            return Err(err(
                Reason::Mismatch,
                0,
                "key",
                "differs from the record's Kafka key",
            ))
        }
        (Some(Some(k)), _) => k,
        (None, Some(Some(rk))) => rk.to_string(),
        (None, None) => {
            return Err(err(
                Reason::MissingField,
                0,
                "key",
                "no Kafka key and no \"key\"",
            ))
        }
    };
    let parts = Parts {
        key,
        ts: ev.ts,
        event_id: ev.event_id,
        numeric_id: false,
        lenient: true,
    };
    finish(view, parts, ev.values, 0, schema, limits, record_ts_ms)
}

/// A record of somebody else's topic feeding `view` (a view's `source`): a flat JSON object
/// whose fields the source maps to key, time, id and features; other fields are ignored.
pub fn decode_source_record(
    view: ViewId,
    record_key: Option<&[u8]>,
    value: &[u8],
    schema: &Schema,
    limits: &EventLimits,
    record_ts_ms: EpochMs,
) -> Result<Event, EventError> {
    let v = schema.view(view);
    let source = v
        .source
        .as_ref()
        .expect("decode_source_record is for source views");
    let text = std::str::from_utf8(value)
        .map_err(|_| err(Reason::MalformedJson, 0, "", "value is not UTF-8"))?;
    let fields: std::collections::HashMap<Cow<'_, str>, &RawValue> = serde_json::from_str(text)
        .map_err(|e| {
            err(
                Reason::MalformedJson,
                0,
                "",
                format!("value is not a JSON object: {e}"),
            )
        })?;
    let key = match &source.key_field {
        Some(name) => match fields.get(name.as_str()) {
            None => {
                return Err(err(
                    Reason::MissingField,
                    0,
                    name.clone(),
                    "missing (the source's key_field)",
                ))
            }
            Some(raw) => parse_key(raw.get()).ok_or_else(|| {
                err(
                    Reason::WrongType,
                    0,
                    name.clone(),
                    "must be a non-empty string or an integer",
                )
            })?,
        },
        None => match record_key.map(std::str::from_utf8) {
            Some(Ok(k)) if !k.is_empty() => k.to_string(),
            _ => {
                return Err(err(
                    Reason::MissingField,
                    0,
                    "key",
                    "the record has no UTF-8 Kafka key",
                ))
            }
        },
    };
    let lookup = |name: &Option<String>| {
        let raw = name.as_deref().and_then(|n| fields.get(n).copied());
        raw.map(RawValue::get)
    };
    if let Some(name) = &source.ts_field {
        if !fields.contains_key(name.as_str()) {
            return Err(err(
                Reason::MissingField,
                0,
                name.clone(),
                "missing (the source's ts_field)",
            ));
        }
    }
    let parts = Parts {
        key,
        ts: lookup(&source.ts_field),
        event_id: lookup(&source.event_id_field),
        numeric_id: true,
        lenient: false,
    };
    let values: Vec<(Cow<'_, str>, &str)> = source
        .fields
        .iter()
        .filter_map(|(f, field)| {
            let raw = fields.get(field.as_str())?;
            Some((Cow::Borrowed(v.feature(*f).name.as_str()), raw.get()))
        })
        .collect();
    finish(
        view,
        parts,
        Some(RawValues(values)),
        0,
        schema,
        limits,
        record_ts_ms,
    )
}

/// The contents of a JSON string's text that holds no escape, borrowed; `None` for any other
/// text. Only for texts that are one whole JSON value (as every field text here is): such a
/// text that starts with a quote is a string, and without a backslash it has no escape.
fn plain_string(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('\\')).then_some(inner)
}

/// A JSON string's value from its text (one whole JSON value); `None` if it is not a string.
fn string_of(text: &str) -> Option<Cow<'_, str>> {
    match plain_string(text) {
        Some(s) => Some(Cow::Borrowed(s)),
        None => serde_json::from_str(text).ok(),
    }
}

fn parse_key(text: &str) -> Option<String> {
    if text.starts_with('"') {
        let s = string_of(text)?;
        (!s.is_empty()).then(|| s.into_owned())
    } else {
        // Numbers are kept as their decimal string; only integers make sense as keys.
        let n: i64 = serde_json::from_str(text).ok().or_else(|| {
            serde_json::from_str::<u64>(text)
                .ok()
                .and_then(|u| i64::try_from(u).ok())
        })?;
        Some(n.to_string())
    }
}

fn parse_ts(text: &str) -> Option<EpochMs> {
    let ms = if text.starts_with('"') {
        let s = string_of(text)?;
        time::parse_rfc3339_ms(&s)?
    } else {
        serde_json::from_str::<i64>(text).ok()?
    };
    time::is_valid_event_time(ms).then_some(ms)
}

fn parse_value(
    text: &str,
    ty: FeatureType,
    limits: &EventLimits,
) -> Result<Value, (Reason, String)> {
    if text == "null" {
        return Ok(Value::Null);
    }
    let wrong = || {
        (
            Reason::WrongType,
            format!("expected {ty}, got {}", preview(text)),
        )
    };
    // `text` is one valid JSON value (serde or the scanner checked it): a JSON number is also valid for
    // Rust's own number parsers, which cost a fraction of a second JSON parse. Rust reads a
    // number too large for f64 as infinite where serde_json refuses it: both are refused.
    let value = match ty {
        FeatureType::F64 => {
            let v: f64 = text.parse().map_err(|_| wrong())?;
            if !v.is_finite() {
                return Err(wrong());
            }
            Value::F64(v)
        }
        FeatureType::I64 => Value::I64(text.parse().map_err(|_| wrong())?),
        FeatureType::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(wrong()),
        },
        FeatureType::String => {
            let s = string_of(text).ok_or_else(wrong)?;
            if s.len() > limits.string_bytes_max {
                return Err((
                    Reason::TooLong,
                    format!(
                        "longer than {} bytes (limits.string_bytes_max)",
                        limits.string_bytes_max
                    ),
                ));
            }
            Value::Str(s.as_ref().into())
        }
        FeatureType::F32s(dims) => {
            let v: Vec<f64> = serde_json::from_str(text).map_err(|_| wrong())?;
            if v.len() != dims as usize {
                return Err((
                    Reason::WrongType,
                    format!("expected {dims} numbers, got {}", v.len()),
                ));
            }
            if v.iter()
                .any(|x| !x.is_finite() || x.abs() > f64::from(f32::MAX))
            {
                return Err((
                    Reason::NonFinite,
                    "every element must be a finite f32".into(),
                ));
            }
            Value::F32s(v.iter().map(|x| *x as f32).collect())
        }
    };
    Ok(value)
}

fn preview(text: &str) -> String {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if end < text.len() {
        format!("{}…", &text[..end])
    } else {
        text.to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;

    pub(crate) fn schema() -> Schema {
        let text = r#"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "txn"
entity = "user"
features = [
  { name = "amount", type = "f64" },
  { name = "count", type = "i64" },
  { name = "flag", type = "bool" },
  { name = "merchant", type = "string" },
  { name = "emb", type = "f32[2]" },
]
"#;
        Schema::compile(&Config::from_toml_with_env(text, Vec::new()).unwrap()).unwrap()
    }

    const LIMITS: EventLimits = EventLimits {
        batch_events_max: 3,
        key_bytes_max: 8,
        event_id_bytes_max: 8,
        string_bytes_max: 8,
    };

    fn decode(body: &str) -> Result<Vec<Event>, EventError> {
        decode_batch(body.as_bytes(), &schema(), &LIMITS, 42)
    }

    #[test]
    fn values_keep_json_semantics_on_the_fast_path() {
        // A name given twice: the last counts; an escaped name is read like any other.
        let e = decode(r#"[{"view":"txn","key":"u","values":{"amount":1.5,"count":2,"amount":-0.25,"fl\u0061g":true}}]"#)
            .unwrap();
        assert_eq!(
            e[0].values,
            vec![
                (0, Value::F64(-0.25)),
                (1, Value::I64(2)),
                (2, Value::Bool(true))
            ]
        );
        let one = |v: &str| decode(&format!(r#"[{{"view":"txn","key":"u","values":{{{v}}}}}]"#));
        assert_eq!(
            one(r#""amount": 1E+2 "#).unwrap()[0].values,
            vec![(0, Value::F64(100.0))]
        );
        assert_eq!(
            one(r#""count":-9223372036854775808"#).unwrap()[0].values,
            vec![(1, Value::I64(i64::MIN))]
        );
        for bad in [
            r#""amount":1e400"#,
            r#""amount":"1.5""#,
            r#""count":1.0"#,
            r#""count":9223372036854775808"#,
            r#""flag":1"#,
            r#""flag":"true""#,
        ] {
            let e = one(bad).unwrap_err();
            assert_eq!(e.reason, Reason::WrongType, "{bad}: {e}");
        }

        // An NDJSON line is parsed once, by the event's decoder, which still names the line.
        let good = r#"{"view":"txn","key":"u","values":{"count":1}}"#;
        for bad in [
            r#"{"view":"txn","#,
            r#"{"view":"txn","key":"u","values":{"count":1}} x"#,
        ] {
            let e = decode(&format!("{good}\n\n{bad}\n")).unwrap_err();
            assert_eq!((e.reason, e.index), (Reason::MalformedJson, Some(1)), "{e}");
            assert!(e.message.starts_with("NDJSON line 3: "), "{e}");
        }
        // A line that is not UTF-8 is named, and so is its event, blank lines not counted.
        let mut body = format!("{good}\n\n{good}\n").into_bytes();
        body.extend_from_slice(b"{\"view\":\"t\xff\"}\n");
        let e = decode_batch(&body, &schema(), &LIMITS, 0).unwrap_err();
        assert_eq!((e.reason, e.index), (Reason::MalformedJson, Some(2)), "{e}");
        assert!(e.message.starts_with("NDJSON line 4: not UTF-8"), "{e}");
    }

    #[test]
    fn decodes_array_and_ndjson_alike() {
        let one = r#"{"view":"txn","key":"u1","ts":1000,"values":{"amount":1.5,"merchant":"m7","emb":[1,2]}}"#;
        let a = decode(&format!("[{one},{one}]")).unwrap();
        let b = decode(&format!("{one}\n\n{one}\n")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].key, "u1");
        assert_eq!(a[0].ts_ms, 1000);
        assert_eq!(a[0].values[0], (0, Value::F64(1.5)));
    }

    #[test]
    fn defaults_and_forms() {
        let e =
            decode(r#"[{"view":"txn","key":42,"values":{"count":3,"flag":true,"amount":null}}]"#)
                .unwrap();
        assert_eq!(e[0].key, "42");
        assert_eq!(e[0].ts_ms, 42, "missing ts is arrival time");
        assert_eq!(e[0].values[0], (0, Value::Null));
        let e = decode(r#"[{"view":"txn","key":"k","ts":"2024-11-23T08:20:00.123Z","event_id":"e1","values":{"amount":2}}]"#).unwrap();
        assert_eq!(e[0].ts_ms, 1_732_350_000_123);
        assert_eq!(e[0].event_id.as_deref(), Some("e1"));
    }

    #[test]
    fn bad_input_names_index_and_field() {
        let ok = r#"{"view":"txn","key":"u","values":{"amount":1}}"#;
        let cases: &[(&str, Reason, &str)] = &[
            (
                r#"{"view":"nope","key":"u","values":{"amount":1}}"#,
                Reason::UnknownView,
                "view",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"nope":1}}"#,
                Reason::UnknownFeature,
                "values.nope",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"amount":"x"}}"#,
                Reason::WrongType,
                "values.amount",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"count":1.5}}"#,
                Reason::WrongType,
                "values.count",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"emb":[1]}}"#,
                Reason::WrongType,
                "values.emb",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"emb":[1,1e300]}}"#,
                Reason::NonFinite,
                "values.emb",
            ),
            (
                r#"{"view":"txn","values":{"amount":1}}"#,
                Reason::MissingField,
                "key",
            ),
            (
                r#"{"view":"txn","key":"","values":{"amount":1}}"#,
                Reason::WrongType,
                "key",
            ),
            (
                r#"{"view":"txn","key":"123456789","values":{"amount":1}}"#,
                Reason::TooLong,
                "key",
            ),
            (
                r#"{"view":"txn","key":"u","ts":"soon","values":{"amount":1}}"#,
                Reason::BadTimestamp,
                "ts",
            ),
            (
                r#"{"view":"txn","key":"u","ts":-5,"values":{"amount":1}}"#,
                Reason::BadTimestamp,
                "ts",
            ),
            (
                r#"{"view":"txn","key":"u","values":{}}"#,
                Reason::MissingField,
                "values",
            ),
            (
                r#"{"view":"txn","key":"u","valuez":{}}"#,
                Reason::UnknownField,
                "valuez",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"merchant":"123456789"}}"#,
                Reason::TooLong,
                "values.merchant",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"amount":1e999}}"#,
                Reason::WrongType,
                "values.amount",
            ),
            (
                r#"{"view":"txn","key":"u","values":{"amount":NaN}}"#,
                Reason::MalformedJson,
                "",
            ),
        ];
        for (bad, reason, field) in cases {
            let body = format!("[{ok},{bad}]");
            let e = decode(&body).unwrap_err();
            assert_eq!(
                (e.reason, e.field.as_str()),
                (*reason, *field),
                "{bad}: {e}"
            );
            if *reason != Reason::MalformedJson {
                assert_eq!(e.index, Some(1), "{bad}");
            }
        }
    }

    #[test]
    fn batch_bounds() {
        let ok = r#"{"view":"txn","key":"u","values":{"amount":1}}"#;
        assert_eq!(decode("").unwrap_err().reason, Reason::EmptyBatch);
        assert_eq!(decode("[]").unwrap_err().reason, Reason::EmptyBatch);
        let four = format!("[{ok},{ok},{ok},{ok}]");
        assert_eq!(decode(&four).unwrap_err().reason, Reason::BatchTooLarge);
        let four = format!("{ok}\n{ok}\n{ok}\n{ok}");
        assert_eq!(decode(&four).unwrap_err().reason, Reason::BatchTooLarge);
    }

    /// Whitespace between tokens, or none.
    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", " ", "\n", "\t ", " \r\n"])
    }

    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>()
                .prop_filter("finite", |x| x.is_finite())
                .prop_map(|x| x.to_string()),
            any::<i64>().prop_map(|x| x.to_string()),
            "-?(0|[1-9][0-9]{0,4})(\\.[0-9]{1,4})?([eE][+-]?[0-9]{1,3})?",
        ]
    }

    /// A string without escapes, a number, `true`, `false` or `null`.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            number(),
            "[a-z0-9 é_]{0,6}".prop_map(|s| format!("\"{s}\"")),
            Just("true".to_string()),
            Just("false".to_string()),
            Just("null".to_string()),
        ]
    }

    /// An event in the common shape: known fields at most once each, in any order, a
    /// `values` object of scalars and arrays of numbers, whitespace anywhere between tokens.
    fn clean_event() -> impl Strategy<Value = String> {
        let fields = ["view", "key", "ts", "event_id", "values"];
        let names = prop::sample::subsequence(fields.to_vec(), 0..=5).prop_shuffle();
        let array = prop::collection::vec((number(), ws()), 0..3).prop_map(|xs| {
            let xs: Vec<String> = xs.into_iter().map(|(x, w)| format!("{w}{x}{w}")).collect();
            format!("[{}]", xs.join(","))
        });
        let value = prop_oneof![3 => scalar(), 1 => array];
        let values = prop::collection::vec(("[a-z]{1,3}", value, ws(), ws()), 0..5);
        let scalars = prop::collection::vec((scalar(), ws(), ws()), 5);
        (names, scalars, values, ws()).prop_map(|(names, scalars, values, w)| {
            let pairs: Vec<String> = values
                .iter()
                .map(|(n, v, a, b)| format!("{a}\"{n}\"{b}:{a}{v}{b}"))
                .collect();
            let object = format!("{{{}{w}}}", pairs.join(","));
            let fields: Vec<String> = names
                .iter()
                .zip(&scalars)
                .map(|(name, (v, a, b))| {
                    let v = if *name == "values" { &object } else { v };
                    format!("{a}\"{name}\"{b}:{a}{v}{b}")
                })
                .collect();
            format!("{w}{{{}{w}}}{w}", fields.join(","))
        })
    }

    /// A common-shape event with a few edits: what the scanner must leave to serde (escapes,
    /// repeated or unknown fields, nesting, malformed numbers, control characters, stray
    /// bytes) and what it must still read as serde does.
    fn edited_event() -> impl Strategy<Value = String> {
        let inserts = vec![
            "",
            "\\",
            "\"",
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "0",
            "-",
            ".",
            "e",
            "+",
            "x",
            "\u{1}",
            " ",
            "\u{a0}",
            ",\"view\":\"v\"",
            ",\"values\":{}",
            ",\"other\":1",
            "\\u0041",
            "null",
            "1e999",
            "é",
            "[1]",
            "{\"a\":1}",
        ];
        let edit = (any::<prop::sample::Index>(), prop::sample::select(inserts));
        (clean_event(), prop::collection::vec(edit, 1..3)).prop_map(|(mut text, edits)| {
            for (at, insert) in edits {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                match text[i..].chars().next() {
                    // The empty insert deletes the character where it lands.
                    Some(c) if insert.is_empty() => text.replace_range(i..i + c.len_utf8(), ""),
                    _ => text.insert_str(i, insert),
                }
            }
            text
        })
    }

    #[test]
    fn the_scanner_leaves_what_json_refuses_to_serde() {
        let malformed = [
            "01",
            "-01",
            "1.",
            "1.e5",
            ".5",
            "-",
            "-.5",
            "+1",
            "1e",
            "1e+",
            "1E-",
            "0x1",
            "1_0",
            "NaN",
            "Infinity",
            "-Infinity",
            "tru",
            "nul",
            "True",
            "'a'",
            "\"a\u{1}\"",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[\"a\"]",
            "[[1]]",
            "{}",
        ];
        for bad in malformed {
            for text in [
                format!(r#"{{"view":"v","key":"k","values":{{"a":{bad}}}}}"#),
                format!(r#"{{"view":"v","key":{bad},"values":{{"a":1}}}}"#),
            ] {
                assert_eq!(scan::event(&text), None, "{text}");
            }
        }
        let good = r#"{"view":"v","key":"k","values":{"a":1}}"#;
        assert!(scan::event(good).is_some());
        for bad in [
            format!("{good},"),
            format!("{good}{{}}"),
            good.replace("\"view\"", "\"vi\\u0065w\""),
            good.replace("\"a\"", "\"\\u0061\""),
            good.replace(r#""k""#, r#""k","key":"k""#),
            good.replace(r#""k""#, r#""k","other":1"#),
            good.replace(':', " :: "),
        ] {
            assert_eq!(scan::event(&bad), None, "{bad}");
        }
    }

    fn serde_fields(text: &str) -> Option<Fields<'_>> {
        serde_json::from_str::<RawEvent<'_>>(text)
            .ok()
            .map(Fields::of)
    }

    proptest::proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The scanner takes every event of the common shape, and reads it as serde does.
        #[test]
        fn the_scanner_takes_the_common_shape(text in clean_event()) {
            let fast = scan::event(&text);
            prop_assert!(fast.is_some(), "not taken: {}", text);
            prop_assert_eq!(fast, serde_fields(&text), "{}", text);
        }

        /// Whatever the scanner takes, serde takes too and reads the same fields from.
        #[test]
        fn the_scanner_reads_what_serde_reads(text in edited_event()) {
            if let Some(fast) = scan::event(&text) {
                prop_assert_eq!(Some(fast), serde_fields(&text), "{}", text);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_bodies(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_batch(&body, &schema(), &LIMITS, 0);
        }
    }
}
