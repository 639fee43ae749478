//! `/v1/models`: predict over HTTP (JSON in, JSON out, through `quiver_serving::predict`) and
//! the model admin routes (list, traffic, rollback).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use quiver_auth::Identity;
use quiver_model::registry::{Served, TrafficError, TrafficUpdate};
use quiver_model::repository::{Input, ModelSpec, Promote};
use quiver_serving::predict::{self, Answer, Given, Instance};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use crate::error::ApiError;
use crate::json_out::JsonBuf;
use crate::AppState;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct InstanceJson {
    #[serde(default)]
    entities: Map<String, Json_>,
    #[serde(default)]
    features: Map<String, Json_>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    #[serde(default)]
    entities: Option<Map<String, Json_>>,
    #[serde(default)]
    features: Option<Map<String, Json_>>,
    #[serde(default)]
    instances: Option<Vec<InstanceJson>>,
    #[serde(default)]
    version: Option<Json_>,
}

/// A JSON instance as the serving layer's: keys that are strings or integers, values that
/// are numbers or booleans (`null` is absent; anything else is refused if the model reads it).
fn instance(entities: &Map<String, Json_>, features: &Map<String, Json_>) -> Instance {
    Instance {
        entities: entities
            .iter()
            .filter_map(|(c, v)| Some((c.clone(), crate::features::entity_key(v)?)))
            .collect(),
        values: features
            .iter()
            .filter_map(|(n, v)| {
                let given = match v {
                    Json_::Null => return None,
                    Json_::Number(x) => x.as_f64().map_or(Given::NotNumeric, Given::Number),
                    Json_::Bool(b) => Given::Number(f64::from(u8::from(*b))),
                    _ => Given::NotNumeric,
                };
                Some((n.clone(), given))
            })
            .collect(),
    }
}

fn num(x: f64) -> Json_ {
    serde_json::Number::from_f64(x)
        .map(Json_::Number)
        .unwrap_or(Json_::Null)
}

/// `{name: value}` — a scalar for one-value rows or a picked column, else the row.
fn outputs_json(j: &mut JsonBuf, a: &Answer, output: &str) {
    j.raw("{").str(output).raw(":");
    match a.values() {
        [x] => j.f64(*x),
        row => {
            j.raw("[");
            for (i, &x) in row.iter().enumerate() {
                j.raw(if i == 0 { "" } else { "," }).f64(x);
            }
            j.raw("]")
        }
    };
    j.raw("}");
}

/// One prediction's fields after its opening brace, keys in serde_json's (sorted) order.
fn answer_json(j: &mut JsonBuf, a: &Answer, output: &str, model: Option<&str>) {
    j.raw("\"cache\":")
        .raw(cache(a.cache_hit))
        .raw(",\"missing\":[");
    for (i, m) in a.missing.iter().enumerate() {
        j.raw(if i == 0 { "{" } else { ",{" });
        j.raw("\"feature\":").str(&m.feature);
        j.raw(",\"status\":").str(m.status.as_str()).raw("}");
    }
    j.raw("]");
    if let Some(model) = model {
        j.raw(",\"model\":").str(model);
    }
    j.raw(",\"outputs\":");
    outputs_json(j, a, output);
    j.raw(",\"version\":").u64(a.version);
}

fn cache(hit: bool) -> &'static str {
    if hit {
        "\"hit\""
    } else {
        "\"miss\""
    }
}

fn model_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "MODEL_ERROR", message)
}

/// Lists the models the caller may call (every model when auth is off).
pub async fn list_models(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
) -> Response {
    let snap = state.node.models.snapshot();
    let visible = |name: &str| {
        identity
            .as_ref()
            .is_none_or(|Extension(i)| i.allows(quiver_auth::Role::Predictor, Some(name)))
    };
    let models: Vec<Json_> = snap
        .iter()
        .filter(|(name, _)| visible(name))
        .map(|(_, m)| model_json(m))
        .collect();
    Json(json!({"models": models})).into_response()
}

/// `GET /v1/models/{m}` — one model: versions and their roles, traffic, the rollout's state
/// and every decision it made.
pub async fn get_model(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    match state.node.models.get(&model) {
        Some(m) => Json(model_json(&m)).into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_MODEL",
            format!("no model {model:?}"),
        )
        .into_response(),
    }
}

fn model_json(m: &Served) -> Json_ {
    let spec = m.spec.as_ref();
    let stable = m.default_version();
    let role = |v: &quiver_model::registry::Version| {
        if v.loaded.is_none() {
            "failed"
        } else if Some(v.version) == stable {
            "stable"
        } else if m.traffic.rejected.contains(&v.version) {
            "rejected"
        } else if m.traffic.history.contains(&v.version) {
            "previous"
        } else {
            "candidate"
        }
    };
    json!({
        "name": m.name,
        "runtime": spec.map(|s| s.runtime.name()),
        "default_version": stable,
        "stable_version": stable,
        "promote": spec.map(|s| match s.promote { Promote::Manual => "manual", Promote::Auto => "auto" }),
        "error": m.error,
        "versions": m.versions.values().map(|v| json!({
            "version": v.version,
            "status": v.status(),
            "role": role(v),
            "engine": v.loaded.as_ref().map(|l| l.model.engine()),
            "warmup_ms": v.loaded.as_ref().map(|l| l.warmup.as_secs_f64() * 1e3),
            "error": v.error,
        })).collect::<Vec<_>>(),
        "traffic": traffic_json(&m.traffic),
        "rollout": rollout_json(m),
        "inputs": spec.map(|s| s.inputs.iter().map(|i| match i {
            Input::Feature { name, .. } => name.clone(),
            Input::Request { name, .. } => format!("request:{name}"),
        }).collect::<Vec<_>>()),
        "output": spec.map(|s| s.output_name()),
        "batching": spec.and_then(|s| s.batching.as_ref()).map(|b| json!({"batch_max": b.batch_max, "queue_delay_us_max": b.queue_delay_us_max, "queue_max": b.queue_max})),
        "cache": spec.and_then(|s| s.cache.as_ref()).map(|c| json!({"entries_max": c.entries_max, "ttl_ms": c.ttl_ms})),
    })
}

/// The rollout's state, its configured bounds, what its candidate did in the current step, and
/// its decisions.
fn rollout_json(m: &Served) -> Json_ {
    let Some(r) = &m.traffic.rollout else {
        return Json_::Null;
    };
    let cfg = m.spec.as_ref().and_then(|s| s.rollout.as_ref());
    let seen = m.versions.get(&r.candidate).map(|v| v.outcomes.summary());
    json!({
        "candidate": r.candidate,
        "stable": r.stable,
        "phase": r.phase,
        "step": r.step,
        "percent": cfg.map(|c| r.percent(c)),
        "steps": cfg.map(|c| c.steps.clone()),
        "step_started_ms": r.step_started_ms,
        "current_step": seen.map(|s| json!({
            "requests": s.requests, "errors": s.errors, "p99_us": s.p99_us,
            "compared": s.compared, "divergence_max": num(s.divergence_max),
        })),
        "history": r.history,
    })
}

fn traffic_json(t: &quiver_model::registry::Traffic) -> Json_ {
    let split: Map<String, Json_> = t
        .split
        .iter()
        .map(|(v, w)| (v.to_string(), json!(w)))
        .collect();
    json!({"default": t.default, "stable": t.default, "split": split, "shadow": t.shadow.map(|s| s.to_string()), "previous": t.history, "rejected": t.rejected})
}

fn parse_version(v: &Json_) -> Option<u64> {
    match v {
        Json_::Number(n) => n.as_u64(),
        Json_::String(s) => s.parse().ok(),
        _ => None,
    }
}

pub async fn predict(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    // The request itself, to borrow its URI and headers (the extractors clone them).
    req: axum::extract::Request,
) -> Response {
    predict_of(&state, &model, req).await
}

/// `POST /v1/models/{model}/predict` once routed and admitted: by the router ([`predict`]) or
/// beside it (`crate::direct`).
pub(crate) async fn predict_of<B>(
    state: &AppState,
    model: &str,
    req: axum::http::Request<B>,
) -> Response
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let (parts, body) = req.into_parts();
    match predict_inner(
        state,
        model,
        parts.uri.path(),
        &parts.headers,
        Body::new(body),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn predict_inner(
    state: &AppState,
    name: &str,
    path: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes =
        crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max).await?;
    let req: PredictRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))?;
    let (m, spec) = predict::served(&state.node, name)?;
    let pin = match &req.version {
        None => None,
        Some(v) => Some(parse_version(v).ok_or_else(|| {
            ApiError::bad_request("BAD_REQUEST", "version must be a positive integer")
        })?),
    };
    let (instances, single) = match (req.instances, req.entities, req.features) {
        (Some(list), None, None) => (
            list.iter()
                .map(|i| instance(&i.entities, &i.features))
                .collect::<Vec<_>>(),
            false,
        ),
        (None, entities, features) => (
            vec![instance(
                &entities.unwrap_or_default(),
                &features.unwrap_or_default(),
            )],
            true,
        ),
        _ => {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "send either instances or entities/features, not both",
            ))
        }
    };
    let max = state.node.config.server.read_entities_max;
    if instances.is_empty() || instances.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BAD_INSTANCES",
            format!("1..={max} instances per request"),
        ));
    }
    if state.peers.is_some() {
        let routed = Routed {
            state,
            spec: &spec,
            path,
            headers,
            bytes: &bytes,
        };
        if let Some(answer) = routed.forward(&instances, single).await? {
            return Ok(answer);
        }
    }
    let after = crate::features::read_after(state, headers).await?;
    let answers = predict::run(&state.node, &m, &spec, pin, &instances, after.as_ref()).await?;
    let body = answers_json(name, spec.output_name(), &answers, single);
    Ok(answers_reply(body))
}

/// A predict in a cluster: instances are placed by the key of the model's first entity; a
/// request whose instances are all served elsewhere goes there whole, one spread over
/// several nodes is split and its predictions merged in request order.
struct Routed<'a> {
    state: &'a AppState,
    spec: &'a ModelSpec,
    path: &'a str,
    headers: &'a HeaderMap,
    bytes: &'a [u8],
}

impl Routed<'_> {
    /// The answer when (part of) the request is answered elsewhere; `None`: all here.
    async fn forward(
        &self,
        instances: &[Instance],
        single: bool,
    ) -> Result<Option<Response>, ApiError> {
        let node = &self.state.node;
        let Some((view, _, _)) = self.spec.reads.first() else {
            return Ok(None); // reads no feature: any node answers
        };
        let key_col = &node.schema.entity_of(node.schema.view(*view)).key;
        let keys = instances.iter().map(|i| i.entity(key_col));
        let at = crate::cluster::placement(self.headers)?;
        let plan = crate::cluster::plan_rows(self.state, keys, at)?;
        if plan.remote.is_empty() {
            return Ok(None);
        }
        if plan.local.is_empty() && plan.remote.len() == 1 {
            let (candidates, _) = &plan.remote[0];
            let peers = self.state.peers.as_ref().expect("a cluster has peers");
            let body = bytes::Bytes::copy_from_slice(self.bytes);
            let reply = peers
                .forward(
                    candidates,
                    axum::http::Method::POST,
                    self.path,
                    self.headers,
                    body,
                )
                .await?;
            return Ok(Some(reply.into_response()));
        }
        debug_assert!(!single, "one instance has one place");
        self.split(instances, plan).await.map(Some)
    }

    async fn split(
        &self,
        instances: &[Instance],
        plan: crate::cluster::Plan,
    ) -> Result<Response, ApiError> {
        let body: Json_ = serde_json::from_slice(self.bytes)
            .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))?;
        let subset = |rows: &[usize]| {
            let mut b = body.clone();
            if let Some(Json_::Array(list)) = b.get_mut("instances") {
                *list = rows.iter().map(|&r| list[r].take()).collect();
            }
            bytes::Bytes::from(b.to_string())
        };
        let fetched =
            crate::cluster::fetch_groups(self.state, plan.remote, self.path, self.headers, subset)
                .await;
        let mut parts = match fetched {
            Ok(p) => p,
            Err(answer) => return Ok(answer),
        };
        if !plan.local.is_empty() {
            let local: Vec<Instance> = plan.local.iter().map(|&i| instances[i].clone()).collect();
            let (m, spec) = predict::served(&self.state.node, &self.spec.name)?;
            let after = crate::features::read_after(self.state, self.headers).await?;
            let pin = body.get("version").and_then(parse_version);
            let node = &self.state.node;
            let answers = predict::run(node, &m, &spec, pin, &local, after.as_ref()).await?;
            let local = answers_json(&spec.name, spec.output_name(), &answers, false);
            let local = serde_json::from_slice(&local).expect("answers_json writes JSON");
            parts.insert(0, (plan.local, local));
        }
        Ok(Json(crate::cluster::merge_predictions(instances.len(), parts)).into_response())
    }
}

/// The predict answer: one prediction's fields, or `predictions` for a list of instances —
/// written straight into a buffer (a `serde_json::Value` tree was ~15 % of a predict's
/// instructions); the keys in the order serde_json's maps write them.
/// `output`: the name predictions are returned under (`ModelSpec::output_name`).
fn answers_json(name: &str, output: &str, answers: &[Answer], single: bool) -> Vec<u8> {
    let mut j = JsonBuf::with_capacity(128 + 128 * answers.len());
    if single {
        j.raw("{");
        answer_json(&mut j, &answers[0], output, Some(name));
        j.raw("}");
        return j.buf;
    }
    let all_hit = answers.iter().all(|a| a.cache_hit);
    j.raw("{\"cache\":").raw(cache(all_hit));
    j.raw(",\"model\":").str(name).raw(",\"predictions\":[");
    for (i, a) in answers.iter().enumerate() {
        j.raw(if i == 0 { "{" } else { ",{" });
        answer_json(&mut j, a, output, None);
        j.raw("}");
    }
    j.raw("],\"version\":").u64(answers[0].version).raw("}");
    j.buf
}

/// The JSON reply of [`answers_json`].
fn answers_reply(body: Vec<u8>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficRequest {
    #[serde(default)]
    split: Option<BTreeMap<String, u32>>,
    /// A version, or `null` to stop shadowing.
    #[serde(default, deserialize_with = "present")]
    shadow: Option<Json_>,
    #[serde(default)]
    default: Option<Json_>,
}

/// Tells an explicit `null` (Some(Null)) from an absent field (None).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Json_>, D::Error> {
    Ok(Some(Json_::deserialize(d)?))
}

fn traffic_error(e: TrafficError) -> ApiError {
    match e {
        TrafficError::UnknownModel(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "UNKNOWN_MODEL", e.to_string())
        }
        TrafficError::Invalid(_) => ApiError::bad_request("BAD_TRAFFIC", e.to_string()),
        TrafficError::NoRollback(_) => {
            ApiError::new(StatusCode::CONFLICT, "NO_ROLLBACK", e.to_string())
        }
        TrafficError::Persist(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "PERSIST_FAILED",
            e.to_string(),
        ),
    }
}

/// `PUT /v1/models/{m}/traffic` — `{"split": {"3": 90, "4": 10}, "shadow": "5", "default": 3}`.
pub async fn put_traffic(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    Path(model): Path<String>,
    body: Body,
) -> Response {
    let actor = actor(&identity);
    let result = async {
        let bytes = crate::body::read_limited(body, 64 * 1024).await?;
        let req: TrafficRequest = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))?;
        let version = |v: &Json_, what: &str| {
            parse_version(v).ok_or_else(|| {
                ApiError::bad_request("BAD_TRAFFIC", format!("{what}: {v} is not a version"))
            })
        };
        let mut update = TrafficUpdate::default();
        if let Some(split) = &req.split {
            let mut list = Vec::new();
            for (v, w) in split {
                list.push((version(&Json_::String(v.clone()), "split")?, *w));
            }
            update.split = Some(list);
        }
        match &req.shadow {
            None => {}
            Some(Json_::Null) => update.clear_shadow = true,
            Some(v) => update.shadow = Some(version(v, "shadow")?),
        }
        if let Some(d) = &req.default {
            update.default = Some(version(d, "default")?);
        }
        let registry = state.node.models.clone();
        let name = model.clone();
        let asked = format!("{update:?}");
        let t = tokio::task::spawn_blocking(move || registry.set_traffic(&name, update))
            .await
            .map_err(|e| model_error(e.to_string()))?
            .map_err(|e| {
                audit(&state, &actor, "traffic", &model, "refused", &e.to_string());
                traffic_error(e)
            })?;
        audit(&state, &actor, "traffic", &model, "ok", &asked);
        Ok::<_, ApiError>(
            Json(json!({"model": model, "traffic": traffic_json(&t)})).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e| e.into_response())
}

/// The name an admin action is recorded under.
fn actor(identity: &Option<Extension<Identity>>) -> String {
    identity
        .as_ref()
        .map_or_else(|| "anonymous".into(), |Extension(i)| i.name.clone())
}

fn audit(state: &AppState, actor: &str, action: &str, model: &str, outcome: &str, detail: &str) {
    state
        .node
        .audit
        .record(actor, action, &format!("model:{model}"), outcome, detail);
}

/// `POST /v1/models/{m}/rollback` — back to the stable version (a canary or split stops), or
/// with none running, to the previous stable version. Says which version answers now and why.
pub async fn rollback(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    Path(model): Path<String>,
) -> Response {
    let actor = actor(&identity);
    let registry = state.node.models.clone();
    let name = model.clone();
    match tokio::task::spawn_blocking(move || registry.rollback(&name)).await {
        Ok(Ok((t, done))) => {
            audit(
                &state,
                &actor,
                "rollback",
                &model,
                "ok",
                &format!("to version {}: {}", done.version, done.reason),
            );
            Json(json!({
                "model": model, "version": done.version, "reason": done.reason, "traffic": traffic_json(&t),
            }))
            .into_response()
        }
        Ok(Err(e)) => {
            audit(
                &state,
                &actor,
                "rollback",
                &model,
                "refused",
                &e.to_string(),
            );
            traffic_error(e).into_response()
        }
        Err(e) => model_error(e.to_string()).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    version: Json_,
}

/// `POST /v1/models/{m}/promote` — `{"version": 4}`: a ready candidate becomes stable.
pub async fn promote(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    Path(model): Path<String>,
    body: Body,
) -> Response {
    let actor = actor(&identity);
    let result = async {
        let bytes = crate::body::read_limited(body, 64 * 1024).await?;
        let req: PromoteRequest = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))?;
        let version = parse_version(&req.version).ok_or_else(|| {
            ApiError::bad_request("BAD_TRAFFIC", format!("{} is not a version", req.version))
        })?;
        let registry = state.node.models.clone();
        let name = model.clone();
        let t = tokio::task::spawn_blocking(move || registry.promote(&name, version))
            .await
            .map_err(|e| model_error(e.to_string()))?
            .map_err(|e| {
                audit(&state, &actor, "promote", &model, "refused", &e.to_string());
                traffic_error(e)
            })?;
        audit(
            &state,
            &actor,
            "promote",
            &model,
            "ok",
            &format!("version {version}"),
        );
        Ok::<_, ApiError>(
            Json(json!({"model": model, "version": version, "traffic": traffic_json(&t)}))
                .into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e| e.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_serving::predict::Missing;

    fn answer(version: u64, outputs: &[f64], column: Option<usize>, missing: &[&str]) -> Answer {
        Answer {
            version,
            outputs: outputs.into(),
            column,
            missing: missing
                .iter()
                .map(|f| Missing {
                    feature: f.to_string(),
                    status: quiver_store::Status::NotFound,
                })
                .collect(),
            cache_hit: version.is_multiple_of(2),
        }
    }

    /// The reply is the JSON the `serde_json::Value` tree it replaced wrote: the same fields,
    /// values and (sorted) key order, for one instance and many, scalar and row outputs,
    /// missing features, names that need escaping and outputs JSON cannot hold.
    #[test]
    fn answers_are_written_as_the_value_tree_wrote_them() {
        let one = [answer(3, &[0.25, 0.75], Some(1), &["txn:amount", "a\"b"])];
        let written = answers_json("m\\1", "p", &one, true);
        let expected = json!({"model": "m\\1", "version": 3, "outputs": {"p": 0.75},
            "missing": [{"feature": "txn:amount", "status": "NOT_FOUND"}, {"feature": "a\"b", "status": "NOT_FOUND"}],
            "cache": "miss"});
        assert_eq!(std::str::from_utf8(&written).unwrap(), expected.to_string());
        let many = [
            answer(2, &[1.5, f64::NAN], None, &[]),
            answer(4, &[-0.0], None, &[]),
        ];
        let written = answers_json("m", "score", &many, false);
        let predictions = json!([
            {"version": 2, "outputs": {"score": [1.5, null]}, "missing": [], "cache": "hit"},
            {"version": 4, "outputs": {"score": -0.0}, "missing": [], "cache": "hit"},
        ]);
        let expected =
            json!({"model": "m", "version": 2, "predictions": predictions, "cache": "hit"});
        assert_eq!(std::str::from_utf8(&written).unwrap(), expected.to_string());
    }
}
