//! `POST /v1/events`: the HTTP surface of `quiver_serving::ingest` — `?ack=`, the
//! `Idempotency-Key` replay table, the body limit, and the JSON reply with the token.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use quiver_auth::{Identity, Role};
use quiver_core::telemetry as t;
use quiver_core::time::now_ms;
use quiver_log::Ack;
use quiver_serving::idempotency::{body_hash, Lookup};
use quiver_serving::ingest::{self, reject};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;
use bytes::Bytes;

#[derive(Deserialize)]
pub struct IngestQuery {
    ack: Option<String>,
}

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

pub async fn post_events(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    Query(q): Query<IngestQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let identity = identity.map(|Extension(i)| i);
    let result = ingest(&state, identity.as_ref(), q, &headers, body).await;
    metrics::histogram!(t::INGEST_SECONDS).record(started.elapsed().as_secs_f64());
    match result {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn ingest(
    state: &AppState,
    identity: Option<&Identity>,
    q: IngestQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let ack = ingest::parse_ack(q.ack.as_deref())?;
    let idem_key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => {
            let k = v.to_str().ok().filter(|k| {
                !k.is_empty() && k.len() <= state.node.config.limits.idempotency_key_bytes_max
            });
            Some(k.ok_or_else(|| {
                ApiError::bad_request(
                    "BAD_IDEMPOTENCY_KEY",
                    format!(
                        "Idempotency-Key must be 1..={} visible ASCII bytes",
                        state.node.config.limits.idempotency_key_bytes_max
                    ),
                )
            })?)
        }
    };
    let bytes = crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max)
        .await
        .inspect_err(|_| reject("body_too_large", 1))?;

    // Validated and checked against the caller's grants before anything else, a replay
    // included: a batch's views are what a producer grant must cover.
    let prepared = prepare(&state.node, &bytes, idem_key).await?;
    crate::security::require(identity, Role::Producer, &prepared.views)?;
    let Some(key) = idem_key else {
        return append_prepared(state, prepared, ack)
            .await
            .map(|reply| json_reply(reply, false));
    };
    let now = now_ms();
    match state.node.idempotency.begin(key, body_hash(&bytes), now) {
        Lookup::Done(reply) => {
            metrics::counter!(t::IDEMPOTENT_REPLAYS_TOTAL).increment(1);
            Ok(json_reply(reply, true))
        }
        Lookup::Mismatch => Err(ApiError::new(
            StatusCode::CONFLICT,
            "IDEMPOTENCY_KEY_REUSED",
            "this Idempotency-Key was used for a different body",
        )),
        Lookup::InFlight => Err(ApiError::new(
            StatusCode::CONFLICT,
            "IDEMPOTENCY_IN_PROGRESS",
            "a request with this Idempotency-Key is being processed",
        )
        .retry_after(1)),
        Lookup::New => match append_prepared(state, prepared, ack).await {
            Ok(reply) => {
                let durable = ack == Ack::Durable;
                if let Err(e) = state
                    .node
                    .idempotency
                    .complete(key, reply.clone(), now, durable)
                {
                    // The batch is in the log and its events carry key-derived dedup ids, so a
                    // retry is still applied once; only the reply replay is lost.
                    tracing::error!(error = %e, "idempotency journal write failed");
                }
                Ok(json_reply(reply, false))
            }
            Err(e) => {
                state.node.idempotency.abandon(key);
                Err(e)
            }
        },
    }
}

fn json_reply(body: Vec<u8>, replayed: bool) -> Response {
    let mut resp = (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

/// Bodies larger than this are validated and encoded on the blocking pool: a 1000-event batch
/// takes about a millisecond of CPU, which would stall every request sharing the async worker.
const INLINE_DECODE_BYTES_MAX: usize = 64 * 1024;

/// Validates and encodes a body of events: inline when small, else on the blocking pool.
pub(crate) async fn prepare(
    node: &Arc<quiver_serving::Node>,
    bytes: &Bytes,
    idem_key: Option<&str>,
) -> Result<ingest::Prepared, quiver_serving::ServingError> {
    if bytes.len() <= INLINE_DECODE_BYTES_MAX {
        return ingest::prepare_json(node, bytes, idem_key);
    }
    let (node, bytes, key) = (node.clone(), bytes.clone(), idem_key.map(str::to_string));
    tokio::task::spawn_blocking(move || ingest::prepare_json(&node, &bytes, key.as_deref()))
        .await
        .map_err(|e| {
            quiver_serving::ServingError::new(quiver_serving::Code::Internal, e.to_string())
        })?
}

/// Validates, checks the caller may write its views, appends and waits; returns the reply
/// body `{"accepted": N, "token": "…"}`.
pub(crate) async fn append(
    state: &AppState,
    identity: Option<&Identity>,
    bytes: &Bytes,
    idem_key: Option<&str>,
    ack: Ack,
) -> Result<Vec<u8>, ApiError> {
    let prepared = prepare(&state.node, bytes, idem_key).await?;
    crate::security::require(identity, Role::Producer, &prepared.views)?;
    append_prepared(state, prepared, ack).await
}

async fn append_prepared(
    state: &AppState,
    prepared: ingest::Prepared,
    ack: Ack,
) -> Result<Vec<u8>, ApiError> {
    let done = ingest::append(&state.node, prepared, ack).await?;
    Ok(
        serde_json::to_vec(&json!({"accepted": done.accepted, "token": done.token.to_string()}))
            .expect("serializable"),
    )
}
