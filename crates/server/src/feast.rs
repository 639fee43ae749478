//! Feast's write and health routes, so the Feast SDK (`online_store: type: remote`) and Feast
//! push clients work unchanged: `POST /write-to-online-store` (what the SDK's
//! `write_to_online_store` and `push` send), `POST /push` (Feast's push API, by the push source
//! views name in `push_source`), `GET /health`. (The read, `POST /get-online-features`, is in
//! `features`.) Both writes turn Feast's dataframe — `{column: [values]}` — into ordinary
//! events and append them through the ingest path: validated whole, logged, acknowledged only
//! once durable. Unknown request fields are ignored, as Feast's server does.
//!
//! Columns: the view's entity key (its join key), `event_timestamp` (ISO 8601; Feast sends
//! naive UTC such as `2024-01-01T12:00:00.123456`, read as UTC; or epoch ms), `created`
//! (ignored), and features. A `null` is an explicit null (`NULL_VALUE` on read).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use quiver_auth::Identity;
use quiver_core::schema::View;
use quiver_log::Ack;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::AppState;

/// Dataframe columns that are not features.
const TIMESTAMP_COLUMN: &str = "event_timestamp";
const CREATED_COLUMN: &str = "created";

#[derive(Deserialize)]
struct WriteRequest {
    feature_view_name: String,
    df: Map<String, Value>,
}

#[derive(Deserialize)]
struct PushRequest {
    push_source_name: String,
    df: Map<String, Value>,
    #[serde(default = "online")]
    to: String,
}

fn online() -> String {
    "online".into()
}

/// `POST /write-to-online-store`.
pub async fn write_to_online_store(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    body: Body,
) -> Response {
    let identity = identity.map(|Extension(i)| i);
    result(write_inner(&state, identity.as_ref(), body).await)
}

/// `POST /push`: every view whose `push_source` is the request's takes its columns.
pub async fn push(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    body: Body,
) -> Response {
    let identity = identity.map(|Extension(i)| i);
    result(push_inner(&state, identity.as_ref(), body).await)
}

/// `GET /health`: 200 once the node serves reads, else 503 with the reason.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.node.not_ready_reason() {
        None => (StatusCode::OK, "").into_response(),
        Some(reason) => ApiError::unavailable("NOT_READY", reason).into_response(),
    }
}

/// Feast's servers answer a write with `null`.
fn result(r: Result<(), ApiError>) -> Response {
    match r {
        Ok(()) => ([(header::CONTENT_TYPE, "application/json")], "null").into_response(),
        Err(e) => e.into_response(),
    }
}

async fn write_inner(
    state: &AppState,
    identity: Option<&Identity>,
    body: Body,
) -> Result<(), ApiError> {
    let req: WriteRequest = parse(state, body).await?;
    let schema = &state.node.schema;
    let view = schema.view_by_name(&req.feature_view_name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_VIEW",
            format!("no feature view {:?}", req.feature_view_name),
        )
        .with_details(json!({"view": req.feature_view_name}))
    })?;
    let frame = Frame::parse(&req.df)?;
    let mut events = Vec::with_capacity(frame.rows);
    frame.events(schema, view, false, &mut events)?;
    append(state, identity, events).await
}

async fn push_inner(
    state: &AppState,
    identity: Option<&Identity>,
    body: Body,
) -> Result<(), ApiError> {
    let req: PushRequest = parse(state, body).await?;
    if !["online", "offline", "online_and_offline"].contains(&req.to.as_str()) {
        return Err(ApiError::bad_request(
            "BAD_REQUEST",
            "to must be online, offline or online_and_offline",
        )
        .with_details(json!({"to": req.to})));
    }
    let schema = &state.node.schema;
    let views: Vec<&View> = state
        .node
        .config
        .views
        .iter()
        .filter(|v| v.push_source.as_deref() == Some(req.push_source_name.as_str()))
        .filter_map(|v| schema.view_by_name(&v.name))
        .collect();
    if views.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_PUSH_SOURCE",
            format!("no view has push_source {:?}", req.push_source_name),
        )
        .with_details(json!({"push_source_name": req.push_source_name})));
    }
    let frame = Frame::parse(&req.df)?;
    // A column no view of the source knows would be dropped silently: refuse it instead.
    if let Some(unknown) = frame.columns.iter().map(|(n, _)| *n).find(|n| {
        !is_reserved(n)
            && !views
                .iter()
                .any(|v| v.feature_index(n).is_some() || schema.entity_of(v).key == *n)
    }) {
        return Err(ApiError::bad_request(
            "INVALID_EVENT",
            format!("column {unknown:?} is a feature of no view fed by this push source"),
        )
        .with_details(json!({"field": unknown})));
    }
    let mut events = Vec::with_capacity(frame.rows * views.len());
    for view in views {
        frame.events(schema, view, true, &mut events)?;
    }
    // `offline` too goes to the log: the history sink (Quiver's offline store) consumes it,
    // and so does the online store — there is one write path.
    append(state, identity, events).await
}

async fn parse<T: serde::de::DeserializeOwned>(
    state: &AppState,
    body: Body,
) -> Result<T, ApiError> {
    let bytes =
        crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))
}

async fn append(
    state: &AppState,
    identity: Option<&Identity>,
    events: Vec<Value>,
) -> Result<(), ApiError> {
    if events.is_empty() {
        return Ok(());
    }
    let bytes = bytes::Bytes::from(serde_json::to_vec(&events).expect("JSON values serialize"));
    crate::ingest::append(state, identity, &bytes, None, Ack::Durable).await?;
    Ok(())
}

fn is_reserved(column: &str) -> bool {
    column == TIMESTAMP_COLUMN || column == CREATED_COLUMN
}

/// A dataframe as Feast sends it: named columns of equal length.
struct Frame<'a> {
    columns: Vec<(&'a str, &'a [Value])>,
    rows: usize,
}

impl<'a> Frame<'a> {
    fn parse(df: &'a Map<String, Value>) -> Result<Frame<'a>, ApiError> {
        let mut columns = Vec::with_capacity(df.len());
        let mut rows = None;
        for (name, values) in df {
            let Value::Array(values) = values else {
                return Err(ApiError::bad_request(
                    "BAD_REQUEST",
                    format!("df.{name} must be an array"),
                ));
            };
            if *rows.get_or_insert(values.len()) != values.len() {
                return Err(ApiError::bad_request(
                    "BAD_REQUEST",
                    "every df column must have the same length",
                ));
            }
            columns.push((name.as_str(), values.as_slice()));
        }
        Ok(Frame {
            columns,
            rows: rows.unwrap_or(0),
        })
    }

    fn column(&self, name: &str) -> Option<&'a [Value]> {
        self.columns
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// One event per row for `view`. `only_known`: columns that are not features of the view
    /// are left out (a push source may feed several views); otherwise they are kept, and the
    /// ingest path refuses them with the field's name.
    fn events(
        &self,
        schema: &quiver_core::Schema,
        view: &View,
        only_known: bool,
        out: &mut Vec<Value>,
    ) -> Result<(), ApiError> {
        let key_name = &schema.entity_of(view).key;
        let keys = self.column(key_name).ok_or_else(|| {
            ApiError::bad_request(
                "MISSING_ENTITY",
                format!(
                    "df must include the join key {key_name:?} of view {:?}",
                    view.name
                ),
            )
            .with_details(json!({"entity_key": key_name}))
        })?;
        let stamps = self.column(TIMESTAMP_COLUMN);
        let features: Vec<(&str, &[Value])> = self
            .columns
            .iter()
            .filter(|(n, _)| *n != key_name.as_str() && !is_reserved(n))
            .filter(|(n, _)| !only_known || view.feature_index(n).is_some())
            .copied()
            .collect();
        for row in 0..self.rows {
            let mut event = Map::new();
            event.insert("view".into(), Value::from(view.name.as_str()));
            event.insert("key".into(), keys[row].clone());
            if let Some(ts) = stamps.map(|s| &s[row]) {
                event.insert("ts".into(), timestamp(ts, row)?);
            }
            let values: Map<String, Value> = features
                .iter()
                .map(|(n, col)| (n.to_string(), col[row].clone()))
                .collect();
            event.insert("values".into(), Value::Object(values));
            out.push(Value::Object(event));
        }
        Ok(())
    }
}

/// Feast's `event_timestamp`: naive ISO 8601 (UTC), RFC 3339, or epoch ms.
fn timestamp(v: &Value, row: usize) -> Result<Value, ApiError> {
    let ms = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => quiver_core::time::parse_rfc3339_ms(s)
            .or_else(|| quiver_core::time::parse_rfc3339_ms(&format!("{s}Z"))),
        _ => None,
    };
    ms.map(Value::from).ok_or_else(|| {
        ApiError::bad_request(
            "BAD_TIMESTAMP",
            "event_timestamp must be ISO 8601 (naive means UTC) or epoch ms",
        )
        .with_details(json!({"index": row, "field": TIMESTAMP_COLUMN}))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feast_timestamps_are_read_as_utc() {
        let ms = |s: &str| timestamp(&Value::from(s), 0).unwrap().as_i64().unwrap();
        assert_eq!(ms("2024-01-01T12:00:00"), 1_704_110_400_000);
        assert_eq!(ms("2024-01-01T12:00:00.123456"), 1_704_110_400_123);
        assert_eq!(ms("2024-01-01T12:00:00Z"), 1_704_110_400_000);
        assert_eq!(ms("2024-01-01T13:00:00+01:00"), 1_704_110_400_000);
        assert!(timestamp(&Value::from("yesterday"), 3).is_err());
        assert_eq!(timestamp(&Value::from(5), 0).unwrap(), Value::from(5));
    }
}
