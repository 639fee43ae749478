//! `POST /v1/events`: validate the whole batch, encode one record per event, append to the
//! log partitions by murmur2(key), wait for the requested ack, reply with a token.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use quiver_core::event::{decode_batch, Reason};
use quiver_core::partition::partition_for;
use quiver_core::record;
use quiver_core::telemetry as t;
use quiver_core::time::now_ms;
use quiver_core::token::Token;
use quiver_log::{Ack, RecordBatch};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::idempotency::{body_hash, Lookup};
use crate::{AppState, Node};
use bytes::Bytes;

#[derive(Deserialize)]
pub struct IngestQuery {
    ack: Option<String>,
}

pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn reject(reason: &str, events: usize) {
    metrics::counter!(t::EVENTS_REJECTED_TOTAL, "reason" => reason.to_string())
        .increment(events.max(1) as u64);
}

pub async fn post_events(
    State(state): State<Arc<AppState>>,
    Query(q): Query<IngestQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = ingest(&state, q, &headers, body).await;
    metrics::histogram!(t::INGEST_SECONDS).record(started.elapsed().as_secs_f64());
    match result {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn ingest(
    state: &AppState,
    q: IngestQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let ack = match q.ack.as_deref() {
        None | Some("durable") => Ack::Durable,
        Some("written") => Ack::Written,
        Some("none") => Ack::None,
        Some(other) => {
            return Err(ApiError::bad_request(
                "BAD_PARAMETER",
                format!("ack must be none, written or durable, not {other:?}"),
            )
            .with_details(json!({"parameter": "ack"})))
        }
    };
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

    let Some(key) = idem_key else {
        return append(state, &bytes, None, ack)
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
        Lookup::New => match append(state, &bytes, Some(key), ack).await {
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

/// Validates the whole batch and encodes one record per event, grouped by partition.
/// Returns the number of events and the non-empty per-partition batches.
fn encode_batch(
    node: &Node,
    bytes: &[u8],
    idem_key: Option<&str>,
) -> Result<(usize, Vec<(u32, RecordBatch)>), ApiError> {
    let schema = &node.schema;
    let events = decode_batch(bytes, schema, &node.limits, now_ms()).map_err(|e| {
        reject(e.reason.code(), 1);
        let status = if e.reason == Reason::BatchTooLarge {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, "INVALID_EVENT", e.to_string())
            .with_details(json!({"index": e.index, "field": e.field, "reason": e.reason.code()}))
    })?;
    let partitions = node.log.partitions();
    let mut batches: Vec<RecordBatch> = (0..partitions).map(|_| RecordBatch::new()).collect();
    for (i, e) in events.iter().enumerate() {
        let view = &schema.view(e.view).name;
        let dedup = match (&e.event_id, idem_key) {
            (Some(id), _) => Some(record::dedup_from_event_id(view, &e.key, id)),
            (None, Some(k)) => Some(record::dedup_from_idempotency(k, i)),
            (None, None) => None,
        };
        let p = partition_for(e.key.as_bytes(), partitions);
        batches[p as usize].push_with(|buf| record::encode(schema, e, dedup, buf));
    }
    let batches = batches
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(p, b)| (p as u32, b))
        .collect();
    Ok((events.len(), batches))
}

/// Validates, appends and waits; returns the reply body.
pub(crate) async fn append(
    state: &AppState,
    bytes: &Bytes,
    idem_key: Option<&str>,
    ack: Ack,
) -> Result<Vec<u8>, ApiError> {
    let node = &state.node;
    let (count, batches) = if bytes.len() <= INLINE_DECODE_BYTES_MAX {
        encode_batch(node, bytes, idem_key)?
    } else {
        let (node, bytes, key) = (node.clone(), bytes.clone(), idem_key.map(str::to_string));
        tokio::task::spawn_blocking(move || encode_batch(&node, &bytes, key.as_deref()))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", e.to_string())
            })??
    };
    let appended = node.log.append(batches, ack).map_err(|e| {
        let (reason, retry_after_s) = match e {
            quiver_log::LogError::Full { .. } => ("queue_full", 1),
            // Nothing frees disk before retention runs again.
            quiver_log::LogError::DiskFull { .. } => (
                "disk_full",
                node.config
                    .log
                    .retention_check_interval
                    .0
                    .as_secs()
                    .clamp(1, 3600) as u32,
            ),
            _ => ("log_unavailable", 1),
        };
        reject(reason, count);
        ApiError::from(e).retry_after(retry_after_s)
    })?;
    let mut token = Token::new();
    for a in &appended {
        token.advance(a.partition, a.next_offset());
    }
    for a in appended {
        a.wait().await.map_err(ApiError::from)?;
    }
    metrics::counter!(t::EVENTS_INGESTED_TOTAL).increment(count as u64);
    Ok(
        serde_json::to_vec(&json!({"accepted": count, "token": token.to_string()}))
            .expect("serializable"),
    )
}
