//! Predict: route to a version, look in the prediction cache, gather the entity's features
//! from the store (memory only), add request-time values, run the model in process (inline,
//! or through the version's micro-batcher), copy to the shadow. The `/v1` handlers here and
//! the Open Inference Protocol handlers in `v2` share [`run`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_core::telemetry as t;
use quiver_core::time::{now_ms, EpochMs};
use quiver_core::value::Value;
use quiver_model::registry::{RouteError, Served, TrafficError, TrafficUpdate, Version};
use quiver_model::repository::{Input, ModelSpec};
use quiver_store::Status;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use crate::cache::{aggregate_valid_until, Entry, KeyBuilder, ModelCache};
use crate::error::ApiError;
use crate::AppState;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Instance {
    #[serde(default)]
    pub entities: Map<String, Json_>,
    #[serde(default)]
    pub features: Map<String, Json_>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    #[serde(default)]
    entities: Option<Map<String, Json_>>,
    #[serde(default)]
    features: Option<Map<String, Json_>>,
    #[serde(default)]
    instances: Option<Vec<Instance>>,
    #[serde(default)]
    version: Option<Json_>,
}

/// One instance's answer.
pub(crate) struct Answer {
    pub version: u64,
    /// The model's full output row.
    pub outputs: Arc<[f64]>,
    /// The column returned as the scalar output, if the config picks one.
    pub column: Option<usize>,
    pub missing: Json_,
    pub cache_hit: bool,
}

impl Answer {
    /// `{name: value}` — a scalar for one-value rows or a picked column, else the row.
    pub fn outputs_json(&self, spec: &ModelSpec) -> Json_ {
        let num = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(Json_::Number)
                .unwrap_or(Json_::Null)
        };
        let v = match (self.column, self.outputs.len()) {
            (Some(c), _) => num(self.outputs[c]),
            (None, 1) => num(self.outputs[0]),
            (None, _) => Json_::Array(self.outputs.iter().map(|&x| num(x)).collect()),
        };
        let mut m = Map::new();
        m.insert(spec.output_name().to_string(), v);
        Json_::Object(m)
    }
}

pub(crate) fn route_error(e: RouteError) -> ApiError {
    match e {
        RouteError::UnknownModel(_) => {
            ApiError::new(StatusCode::NOT_FOUND, "UNKNOWN_MODEL", e.to_string())
        }
        RouteError::UnknownVersion(..) => {
            ApiError::new(StatusCode::NOT_FOUND, "UNKNOWN_VERSION", e.to_string())
        }
        RouteError::VersionNotReady(..) | RouteError::NotReady(_) => {
            ApiError::unavailable("MODEL_NOT_READY", e.to_string())
        }
    }
}

/// The served model `name` with a loaded config, or 404.
pub(crate) fn served(
    state: &AppState,
    name: &str,
) -> Result<(Arc<Served>, Arc<ModelSpec>), ApiError> {
    let m = state.node.models.get(name);
    match m.as_ref().and_then(|m| m.spec.clone()) {
        Some(spec) => Ok((m.expect("spec implies model"), spec)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_MODEL",
            match m.and_then(|m| m.error.clone()) {
                Some(e) => format!("model {name:?} did not load: {e}"),
                None => format!("no model {name:?}"),
            },
        )
        .with_details(json!({"model": name}))),
    }
}

/// Runs `instances` through model `m`: each is routed (pin, sticky split, default), answered
/// from the cache or gathered and evaluated (grouped per version into one execution).
pub(crate) async fn run(
    state: &AppState,
    m: &Served,
    spec: &Arc<ModelSpec>,
    pin: Option<u64>,
    instances: &[Instance],
) -> Result<Vec<Answer>, ApiError> {
    let now = now_ms();
    let cache = model_cache(state, spec);
    let mut answers: Vec<Option<Answer>> = (0..instances.len()).map(|_| None).collect();
    // Misses, per version: (version, instance indexes, their rows, their cache keys/deadlines).
    let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
    let mut keys = Vec::new();
    for (i, inst) in instances.iter().enumerate() {
        keys.clear();
        entity_keys(state, spec, inst, &mut keys).map_err(|e| at(e, i, instances.len()))?;
        let sticky = keys.first().map_or("", |k| k.1.as_str());
        let version = m.route(pin, sticky).map_err(route_error)?;
        let loaded = version.loaded.as_ref().expect("routed versions are loaded");
        if let Some(cache) = &cache {
            let key = probe_key(state, spec, version.version, &keys, inst)
                .map_err(|e| at(e, i, instances.len()))?;
            if let Some(hit) = cache.get(key, now) {
                metrics::counter!(t::PREDICTION_CACHE_TOTAL, "model" => spec.name.clone(), "result" => "hit").increment(1);
                answers[i] = Some(Answer {
                    version: version.version,
                    outputs: hit.outputs.clone(),
                    column: loaded.column,
                    missing: hit.missing.clone(),
                    cache_hit: true,
                });
                continue;
            }
            metrics::counter!(t::PREDICTION_CACHE_TOTAL, "model" => spec.name.clone(), "result" => "miss").increment(1);
        }
        let g = groups.entry(version.version).or_insert_with(|| Group {
            version,
            members: Vec::new(),
            rows: Vec::with_capacity(spec.inputs.len()),
        });
        let gathered = gather(
            state,
            spec,
            version.version,
            &keys,
            inst,
            now,
            &mut g.rows,
            cache.as_deref(),
            &version.metrics.gather,
        )
        .map_err(|e| at(e, i, instances.len()))?;
        g.members.push((i, gathered));
    }
    for (_, g) in groups {
        let loaded = g
            .version
            .loaded
            .as_ref()
            .expect("routed versions are loaded");
        let k = loaded.model.outputs();
        let n = g.members.len();
        let out = evaluate(state, m, spec, g.version, g.rows, n).await?;
        for ((i, gathered), row) in g.members.into_iter().zip(out.chunks_exact(k)) {
            let outputs: Arc<[f64]> = Arc::from(row);
            if let (Some(cache), Some((key, valid_until))) = (&cache, gathered.cache) {
                cache.insert(
                    key,
                    Entry {
                        outputs: outputs.clone(),
                        missing: gathered.missing.clone(),
                        valid_until_ms: valid_until,
                    },
                );
            }
            answers[i] = Some(Answer {
                version: g.version.version,
                outputs,
                column: loaded.column,
                missing: gathered.missing,
                cache_hit: false,
            });
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| a.expect("every instance answered"))
        .collect())
}

/// Evaluates `n` rows on `version`: through its micro-batcher when it has one, else inline
/// (recording the compute metrics); a shadow version then gets a copy of rows and outputs.
/// Returns `n × outputs()` values.
pub(crate) async fn evaluate(
    state: &AppState,
    m: &Served,
    spec: &ModelSpec,
    version: &Version,
    rows: Vec<f64>,
    n: usize,
) -> Result<Vec<f64>, ApiError> {
    let loaded = version.loaded.as_ref().expect("routed versions are loaded");
    let k = loaded.model.outputs();
    let shadow = m.shadow(version.version).and_then(|s| s.loaded.clone());
    let (out, rows) = match &version.batcher {
        Some(b) => {
            // The batcher takes the rows; only a shadow needs a copy of them.
            let copy = shadow.as_ref().map(|_| rows.clone());
            let rx = b.submit(rows).map_err(|e| {
                metrics::counter!(t::MODEL_QUEUE_REJECTED_TOTAL, "model" => spec.name.clone())
                    .increment(1);
                ApiError::unavailable("QUEUE_FULL", e.to_string())
            })?;
            let out = rx
                .await
                .map_err(|_| model_error("the batcher stopped"))?
                .map_err(|e| model_error(e.to_string()))?;
            (out, copy)
        }
        None => {
            let started = Instant::now();
            let mut out = vec![0.0; n * k];
            loaded
                .model
                .predict(&rows, &mut out)
                .map_err(|e| model_error(e.to_string()))?;
            let vm = &version.metrics;
            vm.compute.record(started.elapsed().as_secs_f64());
            vm.batch_size.record(n as f64);
            vm.executions.increment(1);
            vm.inferences.increment(n as u64);
            (out, Some(rows))
        }
    };
    if let (Some(s), Some(rows)) = (shadow, rows) {
        state
            .node
            .shadow
            .submit(&spec.name, s, rows, out.clone(), k);
    }
    Ok(out)
}

struct Group<'a> {
    version: &'a Version,
    members: Vec<(usize, Gathered)>,
    rows: Vec<f64>,
}

struct Gathered {
    missing: Json_,
    /// (cache key, valid until) when the model caches.
    cache: Option<(u128, EpochMs)>,
}

fn model_error(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "MODEL_ERROR", message)
}

/// Prefixes an instance's error with its index (batches only).
fn at(mut e: ApiError, i: usize, n: usize) -> ApiError {
    if n > 1 {
        e.message = format!("instance {i}: {}", e.message);
    }
    e
}

fn model_cache(state: &AppState, spec: &ModelSpec) -> Option<Arc<ModelCache>> {
    let c = spec.cache.as_ref()?;
    if let Some(existing) = state.node.caches.read().get(&spec.name) {
        if existing.entries_max == c.entries_max && existing.ttl_ms == c.ttl_ms {
            return Some(existing.clone());
        }
    }
    let fresh = Arc::new(ModelCache::new(c.entries_max, c.ttl_ms));
    state
        .node
        .caches
        .write()
        .insert(spec.name.clone(), fresh.clone());
    Some(fresh)
}

/// The entity key of each view the model reads: (view, key), in `spec.reads` order.
fn entity_keys(
    state: &AppState,
    spec: &ModelSpec,
    inst: &Instance,
    out: &mut Vec<(u16, String)>,
) -> Result<(), ApiError> {
    let schema = &state.node.schema;
    for (view, _, _) in &spec.reads {
        let v = schema.view(*view);
        let key_col = &schema.entity_of(v).key;
        let key = match inst.entities.get(key_col) {
            Some(Json_::String(s)) => s.clone(),
            Some(Json_::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            _ => {
                return Err(ApiError::bad_request(
                    "MISSING_ENTITY",
                    format!("entities must give {key_col:?} (for view {:?})", v.name),
                )
                .with_details(json!({"entity_key": key_col})))
            }
        };
        out.push((*view, key));
    }
    Ok(())
}

/// Request-time value `name` of an instance: `Some(x)`, or `None` if absent and defaulted.
fn request_value(inst: &Instance, name: &str, default: Option<f64>) -> Result<f64, ApiError> {
    let x = match inst.features.get(name) {
        Some(Json_::Number(n)) => n.as_f64(),
        Some(Json_::Bool(b)) => Some(f64::from(u8::from(*b))),
        None | Some(Json_::Null) => None,
        Some(_) => {
            return Err(ApiError::bad_request(
                "BAD_FEATURE",
                format!("features.{name} must be a number or boolean"),
            )
            .with_details(json!({"feature": name})))
        }
    };
    // An omitted request value with a declared default is the config working as intended;
    // `missing` reports store features that were absent or stale.
    match (x, default) {
        (Some(x), _) => Ok(x),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(ApiError::bad_request(
            "MISSING_FEATURE",
            format!("features.{name} is required (request-time value)"),
        )
        .with_details(json!({"feature": name}))),
    }
}

/// The cache key from the rows' current versions, read without reading the rows.
fn probe_key(
    state: &AppState,
    spec: &ModelSpec,
    version: u64,
    keys: &[(u16, String)],
    inst: &Instance,
) -> Result<u128, ApiError> {
    let mut k = KeyBuilder::new(&spec.name, version);
    for (view, key) in keys {
        k.row(*view, key, state.node.store.row_version(*view, key));
    }
    for input in &spec.inputs {
        if let Input::Request { name, default } = input {
            k.value(request_value(inst, name, *default)?);
        }
    }
    Ok(k.finish())
}

/// Appends one instance's input vector to `rows`, one store read per view the model uses.
/// Returns the features that were missing or stale (their defaults were used) and, when the
/// model caches, the key of the versions actually read and how long the answer stays valid.
#[allow(clippy::too_many_arguments)]
fn gather(
    state: &AppState,
    spec: &ModelSpec,
    version: u64,
    keys: &[(u16, String)],
    inst: &Instance,
    now: EpochMs,
    rows: &mut Vec<f64>,
    cache: Option<&ModelCache>,
    gather_seconds: &metrics::Histogram,
) -> Result<Gathered, ApiError> {
    let started = Instant::now();
    let schema = &state.node.schema;
    let mut missing = Vec::new();
    let start = rows.len();
    rows.resize(start + spec.inputs.len(), f64::NAN);
    let mut key = cache.map(|_| KeyBuilder::new(&spec.name, version));
    let mut valid_until = cache.map_or(EpochMs::MAX, |c| now.saturating_add(c.ttl_ms as EpochMs));
    let mut read = Vec::new();
    for ((view, columns, positions), (_, entity)) in spec.reads.iter().zip(keys) {
        let v = schema.view(*view);
        read.clear();
        let row_version = state
            .node
            .store
            .read(*view, entity, columns, now, &mut read);
        if let Some(k) = &mut key {
            k.row(*view, entity, row_version);
        }
        for ((r, &pos), &column) in read.iter().zip(positions).zip(columns) {
            let x = match (&r.status, &r.value) {
                (Status::Present, Value::F64(x)) => Some(*x),
                (Status::Present, Value::I64(x)) => Some(*x as f64),
                (Status::Present, Value::Bool(b)) => Some(f64::from(u8::from(*b))),
                _ => None,
            };
            if cache.is_some() {
                match v.aggregation_of_column(column) {
                    Some(a) => {
                        let w = &v.aggregations[a].window;
                        valid_until =
                            valid_until.min(aggregate_valid_until(now, w.window_ms, w.tile_ms));
                    }
                    None => {
                        if let (Status::Present, Some(ts), Some(ttl)) =
                            (r.status, r.ts_ms, v.ttl_ms)
                        {
                            valid_until = valid_until.min(ts.saturating_add(ttl));
                        }
                    }
                }
            }
            let Input::Feature { name, default, .. } = &spec.inputs[pos] else {
                unreachable!("reads hold feature inputs")
            };
            rows[start + pos] = match x {
                Some(x) => x,
                None => {
                    missing.push((pos, json!({"feature": name, "status": r.status.as_str()})));
                    *default
                }
            };
        }
    }
    for (pos, input) in spec.inputs.iter().enumerate() {
        let Input::Request { name, default } = input else {
            continue;
        };
        let x = request_value(inst, name, *default)?;
        if let Some(k) = &mut key {
            k.value(x);
        }
        rows[start + pos] = x;
    }
    // Features in input order, as the config lists them.
    missing.sort_by_key(|m| m.0);
    gather_seconds.record(started.elapsed().as_secs_f64());
    Ok(Gathered {
        missing: Json_::Array(missing.into_iter().map(|m| m.1).collect()),
        cache: key.map(|k| (k.finish(), valid_until)),
    })
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let snap = state.node.models.snapshot();
    let models: Vec<Json_> = snap
        .values()
        .map(|m| {
            let spec = m.spec.as_ref();
            json!({
                "name": m.name,
                "runtime": spec.map(|s| s.runtime.name()),
                "default_version": m.default_version(),
                "error": m.error,
                "versions": m.versions.values().map(|v| json!({
                    "version": v.version,
                    "status": v.status(),
                    "engine": v.loaded.as_ref().map(|l| l.model.engine()),
                    "warmup_ms": v.loaded.as_ref().map(|l| l.warmup.as_secs_f64() * 1e3),
                    "error": v.error,
                })).collect::<Vec<_>>(),
                "traffic": traffic_json(&m.traffic),
                "inputs": spec.map(|s| s.inputs.iter().map(|i| match i {
                    Input::Feature { name, .. } => name.clone(),
                    Input::Request { name, .. } => format!("request:{name}"),
                }).collect::<Vec<_>>()),
                "output": spec.map(|s| s.output_name()),
                "batching": spec.and_then(|s| s.batching.as_ref()).map(|b| json!({"batch_max": b.batch_max, "queue_delay_us_max": b.queue_delay_us_max, "queue_max": b.queue_max})),
                "cache": spec.and_then(|s| s.cache.as_ref()).map(|c| json!({"entries_max": c.entries_max, "ttl_ms": c.ttl_ms})),
            })
        })
        .collect();
    Json(json!({"models": models})).into_response()
}

fn traffic_json(t: &quiver_model::registry::Traffic) -> Json_ {
    let split: Map<String, Json_> = t
        .split
        .iter()
        .map(|(v, w)| (v.to_string(), json!(w)))
        .collect();
    json!({"default": t.default, "split": split, "shadow": t.shadow.map(|s| s.to_string()), "previous": t.history})
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
    headers: HeaderMap,
    body: Body,
) -> Response {
    match predict_inner(&state, &model, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn predict_inner(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes =
        crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max).await?;
    let req: PredictRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))?;
    let (m, spec) = served(state, name)?;
    let pin = match &req.version {
        None => None,
        Some(v) => Some(parse_version(v).ok_or_else(|| {
            ApiError::bad_request("BAD_REQUEST", "version must be a positive integer")
        })?),
    };
    crate::features::read_after(state, headers).await?;
    let (instances, single) = match (req.instances, req.entities, req.features) {
        (Some(list), None, None) => (list, false),
        (None, entities, features) => (
            vec![Instance {
                entities: entities.unwrap_or_default(),
                features: features.unwrap_or_default(),
            }],
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
    let answers = run(state, &m, &spec, pin, &instances).await?;
    let cache = |hit: bool| if hit { "hit" } else { "miss" };
    let body = if single {
        let a = &answers[0];
        json!({"model": name, "version": a.version, "outputs": a.outputs_json(&spec), "missing": a.missing, "cache": cache(a.cache_hit)})
    } else {
        let predictions: Vec<Json_> = answers
            .iter()
            .map(|a| json!({"version": a.version, "outputs": a.outputs_json(&spec), "missing": a.missing, "cache": cache(a.cache_hit)}))
            .collect();
        json!({"model": name, "version": answers[0].version, "predictions": predictions, "cache": cache(answers.iter().all(|a| a.cache_hit))})
    };
    Ok(Json(body).into_response())
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
    Path(model): Path<String>,
    body: Body,
) -> Response {
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
        let t = tokio::task::spawn_blocking(move || registry.set_traffic(&name, update))
            .await
            .map_err(|e| model_error(e.to_string()))?
            .map_err(traffic_error)?;
        Ok::<_, ApiError>(
            Json(json!({"model": model, "traffic": traffic_json(&t)})).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e| e.into_response())
}

/// `POST /v1/models/{m}/rollback` — drop an active split, else return to the previous default.
pub async fn rollback(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    let registry = state.node.models.clone();
    let name = model.clone();
    match tokio::task::spawn_blocking(move || registry.rollback(&name)).await {
        Ok(Ok(t)) => Json(json!({"model": model, "traffic": traffic_json(&t)})).into_response(),
        Ok(Err(e)) => traffic_error(e).into_response(),
        Err(e) => model_error(e.to_string()).into_response(),
    }
}
