//! The cluster over HTTP: probes of the peers (the failure detector's input), one-hop
//! forwarding over pooled keep-alive connections, `GET /v1/cluster` and the probe endpoint
//! `GET /v1/cluster/node`. Where a request goes is decided by the serving layer
//! (`Node::route`); this module only carries it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use quiver_cluster::{Route, HOP_HEADER, MAX_LAG_HEADER, SERVED_BY_HEADER};
use quiver_core::config::ClusterNode;
use quiver_serving::cluster::Placement;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::AppState;

/// Largest answer read from a peer (a batch read of `read_entities_max` rows fits).
const PEER_BODY_BYTES_MAX: usize = 64 << 20;
/// Idle pooled connections kept per peer.
const POOL_IDLE_PER_PEER: usize = 64;

/// Request headers a forwarded request carries on (credentials, consistency, deadline).
const FORWARDED_HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "content-type",
    "idempotency-key",
    crate::features::READ_AFTER,
    MAX_LAG_HEADER,
    "quiver-timeout-ms",
];

/// Pooled HTTP/1.1 keep-alive connections to the peers (HTTPS with mutual TLS when the
/// node has `[tls]`).
pub struct Peers {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: &'static str,
    timeout: Duration,
    /// Told at once about a peer found unreachable.
    cluster: Arc<quiver_cluster::Cluster>,
}

/// A peer's answer.
pub struct PeerReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Peers {
    pub fn new(cluster: Arc<quiver_cluster::Cluster>, tls: Option<rustls::ClientConfig>) -> Peers {
        let timeout = cluster.forward_timeout;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        connector.enforce_http(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Without TLS the connector is never asked for HTTPS (every URI is http://).
        let tls = tls.unwrap_or_else(|| {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        });
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(POOL_IDLE_PER_PEER)
            .build(connector);
        Peers {
            client,
            scheme,
            timeout,
            cluster,
        }
    }

    /// One request to `peer`, bounded by `timeout` from connect to the last body byte.
    pub async fn send(
        &self,
        peer: &ClusterNode,
        method: Method,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<PeerReply, String> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}://{}{path}", self.scheme, peer.http));
        for name in FORWARDED_HEADERS {
            if let Some(v) = headers.get(*name) {
                req = req.header(*name, v);
            }
        }
        let req = req
            .header(HOP_HEADER, "1")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{e:?}"))?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, PEER_BODY_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(PeerReply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }

    /// Sends to the first candidate that answers with anything but 503 (a peer that is
    /// unreachable is marked down at once; one that answers 503 — not serving the partition
    /// after all, lagging, shedding — is passed over for the next).
    pub async fn forward(
        &self,
        candidates: &[ClusterNode],
        method: Method,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<PeerReply, ApiError> {
        let mut tried = Vec::new();
        for peer in candidates {
            let sent = self
                .send(
                    peer,
                    method.clone(),
                    path,
                    headers,
                    body.clone(),
                    self.timeout,
                )
                .await;
            metrics::counter!(quiver_core::telemetry::CLUSTER_FORWARDED_TOTAL,
                "peer" => peer.id.clone(), "ok" => if sent.is_ok() { "true" } else { "false" })
            .increment(1);
            match sent {
                Ok(r) if r.status != StatusCode::SERVICE_UNAVAILABLE => return Ok(r),
                Ok(r) => tried.push(format!(
                    "{}: 503 {}",
                    peer.id,
                    String::from_utf8_lossy(&r.body)
                )),
                Err(e) => {
                    self.cluster.health.suspect(&peer.id, e.clone());
                    tried.push(format!("{}: {e}", peer.id));
                }
            }
        }
        Err(
            ApiError::unavailable("PEER_FAILED", "no owner of the partition answered")
                .detail("tried", tried),
        )
    }
}

impl PeerReply {
    /// The peer's answer as this node's (status, content type, the peer's name, body).
    pub fn into_response(self) -> Response {
        let mut out = Response::new(Body::from(self.body));
        *out.status_mut() = self.status;
        for name in ["content-type", "retry-after", SERVED_BY_HEADER] {
            if let Some(v) = self.headers.get(name) {
                out.headers_mut()
                    .insert(HeaderName::from_static(name), v.clone());
            }
        }
        out
    }
}

/// The caller's placement headers: `Quiver-Max-Lag` and `Quiver-Hop`.
pub fn placement(headers: &HeaderMap) -> Result<Placement, ApiError> {
    let num = |name: &str| -> Result<Option<u64>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "BAD_PARAMETER",
                            format!("{name} must be a non-negative integer"),
                        )
                    })
            })
            .transpose()
    };
    Ok(Placement {
        max_lag: num(MAX_LAG_HEADER)?,
        hops: num(HOP_HEADER)?.unwrap_or(0).min(u64::from(u32::MAX)) as u32,
    })
}

/// Answers a request for `partition` elsewhere when this node does not serve it: `None`
/// means "answer here".
pub async fn forward_if_remote(
    state: &AppState,
    partition: u32,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Option<Response>, ApiError> {
    let Some(peers) = &state.peers else {
        return Ok(None);
    };
    match state.node.route(partition, placement(headers)?)? {
        Route::Local => Ok(None),
        Route::Forward(candidates) => {
            let reply = peers
                .forward(&candidates, method, path, headers, body)
                .await?;
            Ok(Some(reply.into_response()))
        }
        Route::Unavailable => unreachable!("the serving layer turns it into an error"),
    }
}

/// Probes every peer once per `probe_interval` and lets the node act on what changed.
pub async fn probe_loop(state: Arc<AppState>) {
    let (Some(cluster), Some(_)) = (state.node.cluster.clone(), state.peers.as_ref()) else {
        return;
    };
    let mut tick = tokio::time::interval(cluster.probe_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let m = cluster.membership();
        let mut probes = tokio::task::JoinSet::new();
        for peer in m.peers() {
            let (state, peer, every) = (state.clone(), peer.clone(), cluster.probe_interval);
            probes.spawn(async move {
                let peers = state.peers.as_ref().expect("checked above");
                let r = peers
                    .send(
                        &peer,
                        Method::GET,
                        "/v1/cluster/node",
                        &HeaderMap::new(),
                        Bytes::new(),
                        every,
                    )
                    .await;
                (peer.id, r)
            });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((id, result)) = done else { continue };
            match result.and_then(|r| parse_probe(&r)) {
                Ok(serving) => cluster.health.ok(&id, serving, Instant::now()),
                Err(e) => cluster.health.failed(&id, e),
            }
        }
        let node = state.node.clone();
        let _ = tokio::task::spawn_blocking(move || node.cluster_tick()).await;
    }
}

fn parse_probe(r: &PeerReply) -> Result<Vec<u32>, String> {
    if r.status != StatusCode::OK {
        return Err(format!("probe answered {}", r.status));
    }
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
    let mut serving: Vec<u32> = v["serving"]
        .as_array()
        .ok_or("probe answer without serving")?
        .iter()
        .filter_map(|p| p.as_u64().map(|p| p as u32))
        .collect();
    serving.sort_unstable();
    Ok(serving)
}

/// `GET /v1/cluster/node`: what this node serves (the peers' probe).
pub async fn node_status(State(state): State<Arc<AppState>>) -> Response {
    let node = &state.node;
    Json(json!({
        "id": node.cluster.as_ref().map(|c| c.self_id()),
        "ready": node.not_ready_reason().is_none(),
        "serving": node.served_partitions(),
    }))
    .into_response()
}

/// `GET /v1/cluster`: members and their health, the ring and each partition's owners, so a
/// client may go straight to an owner.
pub async fn cluster_view(State(state): State<Arc<AppState>>) -> Response {
    let node = &state.node;
    let Some(cluster) = &node.cluster else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "this node is not in a cluster",
        )
        .into_response();
    };
    let m = cluster.membership();
    let now = Instant::now();
    let nodes: Vec<Value> = m
        .members
        .iter()
        .map(|n| {
            let mut j = json!({"id": n.id, "http": n.http, "grpc": n.grpc});
            if n.id == m.self_id {
                j["self"] = json!(true);
                j["up"] = json!(node.not_ready_reason().is_none());
                j["serving"] = json!(node.served_partitions());
            } else {
                let v = cluster.health.view(&n.id, now);
                j["up"] = json!(v.up);
                j["serving"] = json!(v.serving);
                j["last_ok_ms_ago"] = json!(v.last_ok_ms_ago);
                j["failures"] = json!(v.failures);
                j["last_error"] = json!(v.last_error);
            }
            j
        })
        .collect();
    let partitions: Vec<Value> = (0..m.partitions())
        .map(|p| json!({"partition": p, "owners": m.owners(p)}))
        .collect();
    Json(json!({
        "self": m.self_id,
        "replication": m.replication,
        "vnodes": m.vnodes,
        "ring": {"hash": "xxh3-64", "node_point": "{node}#{i}", "partition_point": "partition-{p}"},
        "nodes": nodes,
        "partitions": partitions,
        "draining": cluster.draining(),
        "history_sink": node.history.as_ref().map(|h| h.partitions()),
    }))
    .into_response()
}

/// Marks every answer of a clustered node with who answered (a forwarded answer keeps the
/// peer's mark).
pub async fn served_by(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut resp = next.run(req).await;
    if let Some(c) = &state.node.cluster {
        if !resp.headers().contains_key(SERVED_BY_HEADER) {
            if let Ok(v) = HeaderValue::from_str(&c.self_id()) {
                resp.headers_mut().insert(SERVED_BY_HEADER, v);
            }
        }
    }
    resp
}

/// The rows of a many-key request grouped by where they are answered.
#[derive(Debug, Default)]
pub struct Plan {
    pub local: Vec<usize>,
    /// Per peer group: candidates (first is where it goes), rows in request order.
    pub remote: Vec<(Vec<ClusterNode>, Vec<usize>)>,
}

/// Groups rows by the partition of their key: served here, or by which peer. A row without
/// a key is answered here (it reads as NOT_FOUND anyway).
pub fn plan_rows<'a>(
    state: &AppState,
    keys: impl Iterator<Item = Option<&'a str>>,
    at: Placement,
) -> Result<Plan, ApiError> {
    let mut plan = Plan::default();
    let mut routes: std::collections::HashMap<u32, Route> = std::collections::HashMap::new();
    for (row, key) in keys.enumerate() {
        let Some(key) = key else {
            plan.local.push(row);
            continue;
        };
        let p = state.node.store.partition_of(key);
        let route = match routes.get(&p) {
            Some(r) => r.clone(),
            None => {
                let r = state.node.route(p, at)?;
                routes.insert(p, r.clone());
                r
            }
        };
        match route {
            Route::Local | Route::Unavailable => plan.local.push(row),
            Route::Forward(c) => match plan.remote.iter_mut().find(|(g, _)| g[0].id == c[0].id) {
                Some((_, rows)) => rows.push(row),
                None => plan.remote.push((c, vec![row])),
            },
        }
    }
    Ok(plan)
}

/// Sends each remote group (body made by `body_of` from its rows) to its peer, all at once.
/// Returns each group's rows with its parsed answer; a peer's answer other than 200 is
/// returned as the whole request's answer.
pub async fn fetch_groups(
    state: &AppState,
    groups: Vec<(Vec<ClusterNode>, Vec<usize>)>,
    path: &str,
    headers: &HeaderMap,
    body_of: impl Fn(&[usize]) -> Bytes,
) -> Result<Vec<(Vec<usize>, Value)>, Response> {
    let peers = state.peers.as_ref().expect("a cluster has peers");
    let calls = groups.iter().map(|(candidates, rows)| {
        peers.forward(candidates, Method::POST, path, headers, body_of(rows))
    });
    let replies = futures_util::future::join_all(calls).await;
    let mut out = Vec::with_capacity(groups.len());
    for ((_, rows), reply) in groups.into_iter().zip(replies) {
        let reply = reply.map_err(IntoResponse::into_response)?;
        if reply.status != StatusCode::OK {
            return Err(reply.into_response());
        }
        let v: Value = serde_json::from_slice(&reply.body).map_err(|e| {
            ApiError::unavailable("PEER_FAILED", format!("a peer's answer is not JSON: {e}"))
                .into_response()
        })?;
        out.push((rows, v));
    }
    Ok(out)
}

/// `body` with every `entities` column cut to `rows` (a many-key request's share for a peer).
pub fn entities_subset(body: &Value, field: &str, rows: &[usize]) -> Bytes {
    let mut v = body.clone();
    if let Some(Value::Object(cols)) = v.get_mut(field) {
        for col in cols.values_mut() {
            if let Value::Array(values) = col {
                *col = Value::Array(rows.iter().map(|&r| values[r].take()).collect());
            }
        }
    }
    Bytes::from(serde_json::to_vec(&v).expect("a JSON value serializes"))
}

/// Merges Feast-shaped answers of row groups into one in request order: metadata from the
/// first; each result's arrays (`values`, `statuses`, `event_timestamps`) put back row by row.
pub fn merge_feast(rows: usize, parts: Vec<(Vec<usize>, Value)>) -> Value {
    let Some((_, first)) = parts.first() else {
        return json!({"metadata": {"feature_names": []}, "results": []});
    };
    let mut out = first.clone();
    let Some(results) = out.get_mut("results").and_then(Value::as_array_mut) else {
        return out;
    };
    for (i, result) in results.iter_mut().enumerate() {
        let Some(fields) = result.as_object_mut() else {
            continue;
        };
        for (name, column) in fields.iter_mut() {
            let mut merged = vec![Value::Null; rows];
            for (idx, part) in &parts {
                if let Some(values) = part["results"][i][name.as_str()].as_array() {
                    for (&row, v) in idx.iter().zip(values) {
                        merged[row] = v.clone();
                    }
                }
            }
            *column = Value::Array(merged);
        }
    }
    out
}

/// Merges `predictions` of instance groups into one answer in request order.
pub fn merge_predictions(rows: usize, parts: Vec<(Vec<usize>, Value)>) -> Value {
    let Some((_, first)) = parts.first() else {
        return json!({"predictions": []});
    };
    let mut out = first.clone();
    let mut merged = vec![Value::Null; rows];
    let mut all_hit = true;
    for (idx, part) in &parts {
        all_hit &= part["cache"] == "hit";
        if let Some(values) = part["predictions"].as_array() {
            for (&row, v) in idx.iter().zip(values) {
                merged[row] = v.clone();
            }
        }
    }
    out["predictions"] = Value::Array(merged);
    out["cache"] = json!(if all_hit { "hit" } else { "miss" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feast_answers_of_row_groups_merge_back_in_request_order() {
        let a = json!({"metadata": {"feature_names": ["user_id", "x"]}, "results": [
            {"values": ["u0", "u2"]},
            {"values": [1.0, 3.0], "statuses": ["PRESENT", "PRESENT"], "event_timestamps": ["t0", "t2"]}]});
        let b = json!({"metadata": {"feature_names": ["user_id", "x"]}, "results": [
            {"values": ["u1"]},
            {"values": [null], "statuses": ["NOT_FOUND"], "event_timestamps": ["e"]}]});
        let m = merge_feast(3, vec![(vec![0, 2], a), (vec![1], b)]);
        assert_eq!(m["results"][0]["values"], json!(["u0", "u1", "u2"]));
        assert_eq!(m["results"][1]["values"], json!([1.0, null, 3.0]));
        assert_eq!(
            m["results"][1]["statuses"],
            json!(["PRESENT", "NOT_FOUND", "PRESENT"])
        );
        assert_eq!(
            m["results"][1]["event_timestamps"],
            json!(["t0", "e", "t2"])
        );
        assert_eq!(m["metadata"]["feature_names"], json!(["user_id", "x"]));
    }

    #[test]
    fn predictions_of_instance_groups_merge_back_in_request_order() {
        let a = json!({"model": "m", "version": 1, "cache": "hit", "predictions": [{"p": 0}, {"p": 2}]});
        let b = json!({"model": "m", "version": 1, "cache": "miss", "predictions": [{"p": 1}]});
        let m = merge_predictions(3, vec![(vec![0, 2], a), (vec![1], b)]);
        assert_eq!(m["predictions"], json!([{"p": 0}, {"p": 1}, {"p": 2}]));
        assert_eq!(m["cache"], "miss");
    }

    #[test]
    fn a_peer_share_keeps_only_its_rows_of_every_entity_column() {
        let body =
            json!({"features": ["v:x"], "entities": {"user_id": ["a", "b", "c"], "d": [1, 2, 3]}});
        let sub: Value =
            serde_json::from_slice(&entities_subset(&body, "entities", &[2, 0])).unwrap();
        assert_eq!(sub["entities"]["user_id"], json!(["c", "a"]));
        assert_eq!(sub["entities"]["d"], json!([3, 1]));
        assert_eq!(sub["features"], json!(["v:x"]));
    }
}
