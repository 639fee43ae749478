//! `POST /v1/models/{model}/predict` and `GET /v1/models`: gather the entity's features from
//! the store (memory only), add request-time values, run the model in process.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_core::time::now_ms;
use quiver_core::value::Value;
use quiver_model::repository::{Input, LoadedModel};
use quiver_store::Status;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use crate::error::ApiError;
use crate::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Instance {
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
    instances: Option<Vec<Instance>>,
    #[serde(default)]
    version: Option<Json_>,
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Json_> = state
        .node
        .models
        .values()
        .map(|m| {
            json!({
                "name": m.name,
                "runtime": m.runtime,
                "default_version": m.versions.last().map(|v| v.version),
                "versions": m.versions.iter().map(|v| json!({"version": v.version, "status": "READY"})).collect::<Vec<_>>(),
                "inputs": m.inputs.iter().map(|i| match i { Input::Feature { name, .. } => name.clone(), Input::Request { name, .. } => format!("request:{name}") }).collect::<Vec<_>>(),
                "output": m.output,
            })
        })
        .collect();
    let errors: Vec<Json_> = state
        .node
        .model_errors
        .iter()
        .map(|e| json!({"model": e.model, "error": e.message}))
        .collect();
    Json(json!({"models": models, "errors": errors})).into_response()
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
    let Some(model) = state.node.models.get(name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_MODEL",
            format!("no model {name:?}"),
        )
        .with_details(json!({"model": name})));
    };
    let version = match &req.version {
        None => None,
        Some(Json_::Number(n)) => n.as_u64(),
        Some(Json_::String(s)) => s.parse().ok(),
        Some(_) => None,
    };
    if req.version.is_some() && version.is_none() {
        return Err(ApiError::bad_request(
            "BAD_REQUEST",
            "version must be a positive integer",
        ));
    }
    let Some(loaded) = model.version(version) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_VERSION",
            format!("model {name:?} has no version {version:?}"),
        ));
    };
    read_after_state(state, headers).await?;
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
    if instances.is_empty() || instances.len() > state.node.config.server.read_entities_max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "BAD_INSTANCES",
            format!(
                "1..={} instances per request",
                state.node.config.server.read_entities_max
            ),
        ));
    }
    let now = now_ms();
    let width = model.inputs.len();
    let mut rows = Vec::with_capacity(width * instances.len());
    let mut missing_per_row = Vec::with_capacity(instances.len());
    for (i, inst) in instances.iter().enumerate() {
        let missing = gather(state, model, inst, now, &mut rows).map_err(|e| {
            let mut e = e;
            if !single {
                e.message = format!("instance {i}: {}", e.message);
            }
            e
        })?;
        missing_per_row.push(missing);
    }
    let mut out = vec![0.0; instances.len()];
    loaded.model.predict(&rows, &mut out).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "MODEL_ERROR",
            e.to_string(),
        )
    })?;
    let outputs = |x: f64| {
        let mut m = Map::new();
        m.insert(
            model.output.clone(),
            serde_json::Number::from_f64(x)
                .map(Json_::Number)
                .unwrap_or(Json_::Null),
        );
        Json_::Object(m)
    };
    let body = if single {
        json!({"model": name, "version": loaded.version, "outputs": outputs(out[0]), "missing": missing_per_row[0], "cache": "miss"})
    } else {
        let predictions: Vec<Json_> = out
            .iter()
            .zip(&missing_per_row)
            .map(|(x, m)| json!({"outputs": outputs(*x), "missing": m}))
            .collect();
        json!({"model": name, "version": loaded.version, "predictions": predictions, "cache": "miss"})
    };
    Ok(Json(body).into_response())
}

async fn read_after_state(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    crate::features::read_after(state, headers).await
}

/// Appends one instance's input vector to `rows`; returns the features that were missing or
/// stale (their defaults were used). One store read per view the model uses.
fn gather(
    state: &AppState,
    model: &LoadedModel,
    inst: &Instance,
    now: i64,
    rows: &mut Vec<f64>,
) -> Result<Vec<Json_>, ApiError> {
    let schema = &state.node.schema;
    let mut missing = Vec::new();
    let start = rows.len();
    rows.resize(start + model.inputs.len(), f64::NAN);
    let mut read = Vec::new();
    for (view, columns, positions) in &model.reads {
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
        read.clear();
        state.node.store.read(*view, &key, columns, now, &mut read);
        for (r, &pos) in read.iter().zip(positions) {
            let x = match (&r.status, &r.value) {
                (Status::Present, Value::F64(x)) => Some(*x),
                (Status::Present, Value::I64(x)) => Some(*x as f64),
                (Status::Present, Value::Bool(b)) => Some(f64::from(u8::from(*b))),
                _ => None,
            };
            let Input::Feature { name, default, .. } = &model.inputs[pos] else {
                unreachable!("reads hold feature inputs")
            };
            rows[start + pos] = match x {
                Some(x) => x,
                None => {
                    missing.push(json!({"feature": name, "status": r.status.as_str()}));
                    *default
                }
            };
        }
    }
    for (pos, input) in model.inputs.iter().enumerate() {
        let Input::Request { name, default } = input else {
            continue;
        };
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
        // An omitted request value with a declared default is the config working as
        // intended; `missing` reports store features that were absent or stale.
        rows[start + pos] = match (x, default) {
            (Some(x), _) => x,
            (None, Some(d)) => *d,
            (None, None) => {
                return Err(ApiError::bad_request(
                    "MISSING_FEATURE",
                    format!("features.{name} is required (request-time value)"),
                )
                .with_details(json!({"feature": name})))
            }
        };
    }
    // Features in input order, as before the grouping.
    missing.sort_by_key(|m| {
        model
            .inputs
            .iter()
            .position(|i| matches!(i, Input::Feature { name, .. } if m["feature"] == *name))
    });
    Ok(missing)
}
