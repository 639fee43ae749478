//! Quiver's surfaces: HTTP (axum) and gRPC (tonic) over the serving layer (`quiver-serving`).
//! The only crate that knows HTTP, gRPC, JSON shapes and status codes.

mod body;
pub mod error;
mod feast;
pub mod features;
pub mod grpc;
mod grpc_ingest;
mod ingest;
mod json_out;
mod ops;
mod predict;
mod v2;
mod v2_binary;

use std::future::Future;
use std::sync::Arc;

use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use quiver_serving::{Node, NodeError};

pub struct AppState {
    pub node: Arc<Node>,
    pub metrics: Option<PrometheusHandle>,
    /// Feature lists of batch reads, resolved (see `features::Resolved`).
    pub resolved: features::ResolvedCache,
}

impl AppState {
    pub fn new(node: Arc<Node>, metrics: Option<PrometheusHandle>) -> AppState {
        AppState {
            node,
            metrics,
            resolved: features::ResolvedCache::new(features::RESOLVED_CACHE_ENTRIES),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/events", post(ingest::post_events))
        .route("/v1/features/{view}/{key}", get(features::get_entity))
        .route("/v1/features", post(features::post_features))
        .route("/v1/features/historical", post(features::post_historical))
        .route("/get-online-features", post(features::get_online_features))
        .route("/write-to-online-store", post(feast::write_to_online_store))
        .route("/push", post(feast::push))
        .route("/health", get(feast::health))
        .route("/v1/models", get(predict::list_models))
        .route("/v1/models/{model}/predict", post(predict::predict))
        .route("/v1/models/{model}/traffic", put(predict::put_traffic))
        .route("/v1/models/{model}", get(predict::get_model))
        .route("/v1/models/{model}/rollback", post(predict::rollback))
        .route("/v1/models/{model}/promote", post(predict::promote))
        .route("/v2", get(v2::server_metadata))
        .route("/v2/health/live", get(v2::live))
        .route("/v2/health/ready", get(v2::ready))
        .route("/v2/models/{model}", get(v2::model_metadata))
        .route("/v2/models/{model}/ready", get(v2::model_ready))
        .route("/v2/models/{model}/infer", post(v2::infer))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(v2::version_metadata),
        )
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(v2::version_ready),
        )
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(v2::version_infer),
        )
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such endpoint",
            )
        })
        .with_state(state)
}

/// Installs the process-wide Prometheus recorder (once; later calls return `None`).
pub fn install_metrics() -> Option<PrometheusHandle> {
    const LATENCY_BUCKETS: &[f64] = &[
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
        0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];
    const DIVERGENCE_BUCKETS: &[f64] =
        &[0.0, 1e-9, 1e-6, 1e-4, 1e-3, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0];
    use metrics_exporter_prometheus::Matcher;
    let recorder = PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full(quiver_core::telemetry::MODEL_BATCH_SIZE.into()),
            BATCH_BUCKETS,
        )
        .ok()?
        .set_buckets_for_metric(
            Matcher::Full(quiver_core::telemetry::SHADOW_DIVERGENCE.into()),
            DIVERGENCE_BUCKETS,
        )
        .ok()?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).ok()?;
    Some(handle)
}

/// Serves `node` on `listener` until `shutdown` resolves, then stops the node cleanly
/// (in-flight requests finish, materializers snapshot, log writers drain). `metrics` comes
/// from [`install_metrics`], called before [`Node::open`] so that the node's threads register
/// their metrics with the real recorder.
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(node, listener, None, metrics, shutdown).await
}

/// [`serve`], plus KServe V2 over gRPC on `grpc` (`server.grpc_listen`) when given: both
/// surfaces share the node and stop together.
pub async fn serve_with(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    grpc: Option<tokio::net::TcpListener>,
    metrics: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(AppState::new(node.clone(), metrics));
    if let Err(e) = node.start_sources() {
        tracing::error!(error = %e, "an upstream source did not start");
    }
    let housekeeping = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(node.config.log.retention_check_interval.0);
            loop {
                tick.tick().await;
                let node = node.clone();
                let _ = tokio::task::spawn_blocking(move || node.housekeeping()).await;
            }
        })
    };
    // One shutdown for both surfaces.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_task = grpc.map(|l| {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        let routes = grpc::service(state.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone())),
        )
    });
    let app = router(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(stopped(stop_rx))
        .await;
    if let Some(t) = grpc_task {
        match t.await {
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC server failed"),
            Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
            Ok(Ok(())) => {}
        }
    }
    housekeeping.abort();
    tokio::task::spawn_blocking(move || node.shutdown())
        .await
        .ok();
    result
}

/// Generated from `proto/grpc_service.proto` (see `build.rs`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod inference_proto {
    tonic::include_proto!("inference");
}

/// Generated from `proto/quiver/v1/ingest.proto` (see `build.rs`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod ingest_proto {
    tonic::include_proto!("quiver.v1");
}
