//! Quiver's surfaces: HTTP (axum) and gRPC (tonic) over the serving layer (`quiver-serving`).
//! The only crate that knows HTTP, gRPC, JSON shapes and status codes.

mod body;
pub mod cluster;
mod direct;
pub mod error;
mod feast;
pub mod features;
pub mod grpc;
mod grpc_guard;
mod grpc_ingest;
mod ingest;
mod json_out;
pub mod listen;
pub mod lower;
mod ops;
mod peer_rows;
mod predict;
pub mod security;
pub mod tls;
mod v2;
mod v2_binary;

use std::future::Future;
use std::sync::Arc;

use axum::routing::{get, post, put};
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub use quiver_serving::{Node, NodeError};
pub use security::{Access, Security};

pub struct AppState {
    pub node: Arc<Node>,
    pub metrics: Option<PrometheusHandle>,
    /// Feature lists of batch reads, resolved (see `features::Resolved`).
    pub resolved: features::ResolvedCache,
    /// Every view's column names as a single-entity reply writes them.
    pub(crate) column_keys: json_out::ColumnKeys,
    /// Authentication, grants, rate tiers, the audit trail.
    pub security: Security,
    /// Connections to the other nodes, in a cluster.
    pub peers: Option<Arc<cluster::Peers>>,
    /// Where handlers of tiers below the best priority run (only with two priorities or more).
    pub lower: Option<lower::LowerPool>,
    /// `quiver_lookup_seconds` for single-entity and batch reads, registered once: the macro
    /// looks a handle up by name and labels on every call (~490 instructions of a GET's ~42k,
    /// callgrind). Made in [`AppState::new`] (inside [`serve`]), so the recorder must be
    /// installed before, as [`serve`] says: handles made earlier record nowhere.
    pub(crate) lookup_seconds: LookupSeconds,
}

/// Handles of `quiver_lookup_seconds`, by path.
pub(crate) struct LookupSeconds {
    pub(crate) single: metrics::Histogram,
    pub(crate) batch: metrics::Histogram,
}

impl AppState {
    pub fn new(node: Arc<Node>, metrics: Option<PrometheusHandle>) -> Result<AppState, String> {
        let security = Security::from_config(&node.config, node.audit.clone())?;
        let lower = match security.limits.priorities() {
            1 => None,
            _ => Some(lower::LowerPool::new().map_err(|e| format!("lower-priority threads: {e}"))?),
        };
        use quiver_core::telemetry::LOOKUP_SECONDS;
        Ok(AppState {
            lower,
            metrics,
            lookup_seconds: LookupSeconds {
                single: metrics::histogram!(LOOKUP_SECONDS, "path" => "single"),
                batch: metrics::histogram!(LOOKUP_SECONDS, "path" => "batch"),
            },
            resolved: features::ResolvedCache::new(features::RESOLVED_CACHE_ENTRIES),
            column_keys: json_out::ColumnKeys::of(&node.schema),
            security,
            peers: match &node.cluster {
                None => None,
                Some(c) => {
                    let tls = tls::peer_client(&node.config).map_err(|e| e.to_string())?;
                    let peers = Arc::new(cluster::Peers::new(c.clone(), tls));
                    node.set_remote_rows(Arc::new(peer_rows::PeerRows {
                        peers: peers.clone(),
                        schema: node.schema.clone(),
                    }));
                    Some(peers)
                }
            },
            node,
        })
    }
}

/// One route: its method, path and who may call it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: &'static str,
    pub path: &'static str,
    pub access: Access,
}

type Handler = axum::routing::MethodRouter<Arc<AppState>>;

/// Every route, with its access: the router is built from this table and the endpoint ×
/// role test reads it, so a new route cannot go unguarded or untested.
fn routes() -> Vec<(RouteSpec, Handler)> {
    use quiver_auth::Role::{Admin, Predictor, Producer, Reader};
    let r = |method, path, access, h: Handler| {
        (
            RouteSpec {
                method,
                path,
                access,
            },
            h,
        )
    };
    let role = Access::Role;
    vec![
        r(
            "POST",
            "/v1/events",
            role(Producer),
            post(ingest::post_events),
        ),
        r(
            "GET",
            "/v1/features/{view}/{key}",
            role(Reader),
            get(features::get_entity),
        ),
        r(
            "POST",
            "/v1/features",
            role(Reader),
            post(features::post_features),
        ),
        r(
            "POST",
            "/v1/features/historical",
            role(Reader),
            post(features::post_historical),
        ),
        r(
            "POST",
            "/get-online-features",
            role(Reader),
            post(features::get_online_features),
        ),
        r(
            "POST",
            "/write-to-online-store",
            role(Producer),
            post(feast::write_to_online_store),
        ),
        r("POST", "/push", role(Producer), post(feast::push)),
        r("GET", "/health", Access::Health, get(feast::health)),
        r(
            "GET",
            "/v1/models",
            role(Predictor),
            get(predict::list_models),
        ),
        r(
            "GET",
            "/v1/models/{model}",
            role(Predictor),
            get(predict::get_model),
        ),
        r(
            "POST",
            "/v1/models/{model}/predict",
            role(Predictor),
            post(predict::predict),
        ),
        r(
            "PUT",
            "/v1/models/{model}/traffic",
            role(Admin),
            put(predict::put_traffic),
        ),
        r(
            "POST",
            "/v1/models/{model}/rollback",
            role(Admin),
            post(predict::rollback),
        ),
        r(
            "POST",
            "/v1/models/{model}/promote",
            role(Admin),
            post(predict::promote),
        ),
        r("GET", "/v2", role(Predictor), get(v2::server_metadata)),
        r("GET", "/v2/health/live", Access::Health, get(v2::live)),
        r("GET", "/v2/health/ready", Access::Health, get(v2::ready)),
        r(
            "GET",
            "/v2/models/{model}",
            role(Predictor),
            get(v2::model_metadata),
        ),
        r(
            "GET",
            "/v2/models/{model}/ready",
            role(Predictor),
            get(v2::model_ready),
        ),
        r(
            "POST",
            "/v2/models/{model}/infer",
            role(Predictor),
            post(v2::infer),
        ),
        r(
            "GET",
            "/v2/models/{model}/versions/{version}",
            role(Predictor),
            get(v2::version_metadata),
        ),
        r(
            "GET",
            "/v2/models/{model}/versions/{version}/ready",
            role(Predictor),
            get(v2::version_ready),
        ),
        r(
            "POST",
            "/v2/models/{model}/versions/{version}/infer",
            role(Predictor),
            post(v2::version_infer),
        ),
        r(
            "GET",
            "/v1/cluster",
            Access::Role(quiver_auth::Role::Ops),
            get(cluster::cluster_view),
        ),
        r(
            "GET",
            "/v1/cluster/node",
            Access::Health,
            get(cluster::node_status),
        ),
        r("GET", "/healthz", Access::Health, get(ops::healthz)),
        r("GET", "/readyz", Access::Health, get(ops::readyz)),
        r(
            "GET",
            "/metrics",
            Access::Role(quiver_auth::Role::Ops),
            get(ops::metrics),
        ),
    ]
}

/// The route table (method, path, access), for tests and documentation.
pub fn route_table() -> Vec<RouteSpec> {
    routes().into_iter().map(|(spec, _)| spec).collect()
}

/// The access of a matched route.
pub fn access_of(method: &axum::http::Method, path: &str) -> Option<Access> {
    static TABLE: std::sync::OnceLock<Vec<RouteSpec>> = std::sync::OnceLock::new();
    TABLE
        .get_or_init(route_table)
        .iter()
        .find(|r| r.path == path && r.method == method.as_str())
        .map(|r| r.access)
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    for (spec, handler) in routes() {
        router = router.route(spec.path, handler);
    }
    if state.node.cluster.is_some() {
        router = router.layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cluster::served_by,
        ));
    }
    router
        .fallback(|| async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such endpoint",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ))
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
    let state = Arc::new(AppState::new(node.clone(), metrics).map_err(std::io::Error::other)?);
    let tls = tls::acceptor(&node.config.tls).map_err(std::io::Error::other)?;
    let bounds = listen::Bounds::from_config(&node.config.server);
    if let Err(e) = node.start_sources() {
        tracing::error!(error = %e, "an upstream source did not start");
    }
    let housekeeping = {
        let (node, state) = (node.clone(), state.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(node.config.log.retention_check_interval.0);
            loop {
                tick.tick().await;
                state.security.limits.housekeeping();
                let node = node.clone();
                let _ = tokio::task::spawn_blocking(move || node.housekeeping()).await;
            }
        })
    };
    let probes = tokio::spawn(cluster::probe_loop(state.clone()));
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
        let incoming = listen::incoming(l, tls.clone(), bounds);
        let routes = grpc::service(state.clone());
        let serve = tonic::transport::Server::builder()
            .timeout(node.config.server.request_timeout_max.0)
            .layer(grpc_guard::GuardLayer::new(state.clone()))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
        let drained = stopped(stop_rx.clone());
        tokio::spawn(async move {
            // tonic's graceful shutdown waits for every connection to close, and a client that
            // keeps an idle one open (never answering the GOAWAY) would hold the shutdown
            // forever: bounded as HTTP's drain is, from the same signal.
            tokio::select! {
                served = serve => served,
                () = async { drained.await; tokio::time::sleep(listen::DRAIN_MAX).await } => {
                    tracing::warn!("gRPC connections still open after {:?} of shutdown; closing them", listen::DRAIN_MAX);
                    Ok(())
                }
            }
        })
    });
    let app = direct::Surface::new(state);
    let result = listen::serve_http(listener, tls, bounds, app, stopped(stop_rx)).await;
    if let Some(t) = grpc_task {
        match t.await {
            Ok(Err(e)) => tracing::error!(error = %e, "gRPC server failed"),
            Err(e) => tracing::error!(error = %e, "gRPC server task failed"),
            Ok(Ok(())) => {}
        }
    }
    housekeeping.abort();
    probes.abort();
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
