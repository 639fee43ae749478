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
    let mut text = handle.render();
    process_metrics(&mut text);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        text,
    )
        .into_response()
}

/// The process metrics every Prometheus client library exports (as their process collectors
/// name them), read from `/proc` at scrape time: dashboards and `quiver bench decoupling
/// --url` charge the server its own CPU from these.
fn process_metrics(text: &mut String) {
    use std::fmt::Write;
    let Some(stat) = t::ProcessStat::own() else {
        return;
    };
    let _ = write!(
        text,
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
         # TYPE process_cpu_seconds_total counter\n\
         process_cpu_seconds_total {}\n\
         # HELP process_resident_memory_bytes Resident memory size in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\n\
         process_resident_memory_bytes {}\n",
        stat.cpu_seconds, stat.resident_bytes
    );
}
