//! `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_core::telemetry as t;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.node.not_ready_reason() {
        None => Json(json!({"status": "ready"})).into_response(),
        Some(reason) => ApiError::unavailable("NOT_READY", reason).into_response(),
    }
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    // Gauges that are cheaper to read at scrape time than to maintain on every event.
    let node = &state.node;
    metrics::gauge!(t::LOG_QUEUE_RECORDS).set(node.log.queued_records() as f64);
    metrics::gauge!(t::STORE_ROWS).set(node.store.rows() as f64);
    if let Some(log) = node.embedded_log() {
        for p in 0..log.partitions() {
            metrics::gauge!(t::LOG_NEXT_OFFSET, "partition" => p.to_string())
                .set(log.next_offset(p) as f64);
        }
    }
    let Some(handle) = &state.metrics else {
        return (StatusCode::OK, "").into_response();
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
