//! The Open Inference Protocol (KServe V2) over REST, so Triton and KServe clients work
//! unchanged: server and model metadata, health, readiness and `infer`, with the protocol's
//! own error shape `{"error": "…"}`.
//!
//! The calls themselves (raw input vector or feature join) are `quiver_serving::infer`;
//! this module decodes and encodes their HTTP form.
//!
//! Both speak Triton's **binary tensor data extension** (what tritonclient sends by default):
//! the body is the JSON header (`Inference-Header-Content-Length` bytes) followed by the raw
//! tensors of the inputs that carry `parameters.binary_data_size`, in input order
//! (little-endian; BOOL one byte; BYTES each a u32 length then the bytes). An output is sent
//! binary when its request says `parameters.binary_data: true`, or, for outputs not listed,
//! when the request's `parameters.binary_data_output` is true; the reply then carries the same
//! header and the raw FP64 values after the JSON.
//!
//! Status codes: 400 for a malformed request, a datatype or shape mismatch or an unknown
//! input/output; 404 for an unknown model or version; 503 (with `Retry-After`) when a model
//! is not ready or its batch queue is full; 500 for a model that fails to evaluate.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use quiver_serving::infer::{self, Elements, Inferred, Tensor, TensorMeta};
use quiver_serving::ServingError;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::error::ApiError;
use crate::AppState;

/// The V2 error: `{"error": "…"}` with the status (and `Retry-After`) of the `/v1` error.
pub(crate) struct V2Error(pub(crate) ApiError);

impl From<ApiError> for V2Error {
    fn from(e: ApiError) -> V2Error {
        V2Error(e)
    }
}

impl From<ServingError> for V2Error {
    fn from(e: ServingError) -> V2Error {
        V2Error(e.into())
    }
}

impl IntoResponse for V2Error {
    fn into_response(self) -> Response {
        let mut resp = (self.0.status, Json(json!({"error": self.0.message}))).into_response();
        if let Some(s) = self.0.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

fn bad(message: impl Into<String>) -> V2Error {
    V2Error(ApiError::bad_request("BAD_REQUEST", message))
}

pub async fn server_metadata() -> Response {
    Json(json!({
        "name": "quiver",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "quiver_feature_join"],
    }))
    .into_response()
}

pub async fn live() -> Response {
    StatusCode::OK.into_response()
}

/// 200 when ready; the protocol's "false" is a 4xx.
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.node.not_ready_reason() {
        None => StatusCode::OK.into_response(),
        Some(reason) => (StatusCode::BAD_REQUEST, Json(json!({"error": reason}))).into_response(),
    }
}

pub async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Response {
    metadata(&state, &name, None).unwrap_or_else(|e| e.into_response())
}

pub async fn version_metadata(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata(&state, &name, Some(&version)).unwrap_or_else(|e| e.into_response())
}

fn metadata(state: &AppState, name: &str, version: Option<&str>) -> Result<Response, V2Error> {
    let meta = infer::model_meta(&state.node, name, version)?;
    let tensors = |ts: &[TensorMeta]| -> Vec<Value> {
        ts.iter()
            .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
            .collect()
    };
    Ok(Json(json!({
        "name": meta.name,
        "versions": meta.versions,
        "platform": meta.platform,
        "inputs": tensors(&meta.inputs),
        "outputs": tensors(&meta.outputs),
        "quiver_feature_join": {"inputs": tensors(&meta.join)},
    }))
    .into_response())
}

pub async fn model_ready(State(state): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    readiness(&state, &name, None).unwrap_or_else(|e| e.into_response())
}

pub async fn version_ready(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    readiness(&state, &name, Some(&version)).unwrap_or_else(|e| e.into_response())
}

fn readiness(state: &AppState, name: &str, version: Option<&str>) -> Result<Response, V2Error> {
    Ok(if infer::is_ready(&state.node, name, version)? {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::BAD_REQUEST, Json(json!({"error": "not ready"}))).into_response()
    })
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<TensorIn>,
    #[serde(default)]
    outputs: Option<Vec<OutputRequest>>,
}

#[derive(Deserialize)]
struct TensorIn {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    /// Absent when the tensor travels in the binary section (`binary_data_size`).
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct OutputRequest {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// The header that splits a binary-extension body into its JSON and its tensors.
const HEADER_LENGTH: &str = "inference-header-content-length";

impl InferRequest {
    /// Whether the (single) output goes back in the binary section.
    fn binary_output(&self, name: &str) -> bool {
        let flag = |p: &Map<String, Value>, k: &str| p.get(k).and_then(Value::as_bool);
        let listed = self
            .outputs
            .iter()
            .flatten()
            .find(|o| o.name == name)
            .and_then(|o| flag(&o.parameters, "binary_data"));
        listed
            .or_else(|| flag(&self.parameters, "binary_data_output"))
            .unwrap_or(false)
    }
}

pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_inner(&state, &name, None, &headers, body)
        .await
        .unwrap_or_else(|e| e.into_response())
}

pub async fn version_infer(
    State(state): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    infer_inner(&state, &name, Some(&version), &headers, body)
        .await
        .unwrap_or_else(|e| e.into_response())
}

/// A tensor's elements from its JSON `data` or, with `binary_data_size`, from `binary`
/// (consumed from the front: tensors follow each other in input order).
fn elements(t: &TensorIn, binary: &mut &[u8]) -> Result<Elements, V2Error> {
    if t.shape.iter().any(|&d| d < 0) {
        return Err(bad(format!(
            "input {:?}: negative dimension in shape",
            t.name
        )));
    }
    let count = t
        .shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .ok_or_else(|| bad(format!("input {:?}: shape too large", t.name)))?;
    match (t.parameters.get("binary_data_size"), &t.data) {
        (Some(size), _) => {
            let size = size.as_u64().ok_or_else(|| {
                bad(format!(
                    "input {:?}: binary_data_size must be a count",
                    t.name
                ))
            })? as usize;
            if size > binary.len() {
                return Err(bad(format!(
                    "input {:?}: binary_data_size {size} exceeds the {} bytes left in the body",
                    t.name,
                    binary.len()
                )));
            }
            let (raw, rest) = binary.split_at(size);
            *binary = rest;
            crate::v2_binary::decode(&t.name, &t.datatype, raw, count).map_err(bad)
        }
        (None, Some(data)) => json_elements(t, data, count),
        (None, None) => Err(bad(format!(
            "input {:?} has neither data nor binary_data_size",
            t.name
        ))),
    }
}

fn json_elements(t: &TensorIn, data: &Value, count: usize) -> Result<Elements, V2Error> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    if flat.len() != count {
        return Err(bad(format!(
            "input {:?}: shape {:?} holds {count} elements, data has {}",
            t.name,
            t.shape,
            flat.len()
        )));
    }
    let mismatch = |i: usize| {
        bad(format!(
            "input {:?}: element {i} does not match datatype {}",
            t.name, t.datatype
        ))
    };
    match t.datatype.as_str() {
        "BYTES" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_str().map(str::to_string).ok_or_else(|| mismatch(i)))
            .collect::<Result<_, _>>()
            .map(Elements::Strings),
        "BOOL" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_bool()
                    .map(|b| f64::from(u8::from(b)))
                    .ok_or_else(|| mismatch(i))
            })
            .collect::<Result<_, _>>()
            .map(Elements::Numbers),
        "INT8" | "INT16" | "INT32" | "INT64" | "UINT8" | "UINT16" | "UINT32" | "UINT64" => {
            let (lo, hi): (i128, i128) = match t.datatype.as_str() {
                "INT8" => (i8::MIN.into(), i8::MAX.into()),
                "INT16" => (i16::MIN.into(), i16::MAX.into()),
                "INT32" => (i32::MIN.into(), i32::MAX.into()),
                "INT64" => (i64::MIN.into(), i64::MAX.into()),
                "UINT8" => (0, u8::MAX.into()),
                "UINT16" => (0, u16::MAX.into()),
                "UINT32" => (0, u32::MAX.into()),
                _ => (0, u64::MAX.into()),
            };
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    let n = v
                        .as_i64()
                        .map(i128::from)
                        .or_else(|| v.as_u64().map(i128::from))
                        .filter(|n| (lo..=hi).contains(n))
                        .ok_or_else(|| mismatch(i))?;
                    Ok(n as f64)
                })
                .collect::<Result<_, _>>()
                .map(Elements::Numbers)
        }
        "FP16" | "FP32" | "FP64" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| v.as_f64().ok_or_else(|| mismatch(i)))
            .collect::<Result<_, _>>()
            .map(Elements::Numbers),
        other => Err(bad(format!(
            "input {:?}: unknown datatype {other:?}",
            t.name
        ))),
    }
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

async fn infer_inner(
    state: &AppState,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, V2Error> {
    let bytes =
        crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max).await?;
    let (header, mut binary) = split_body(headers, &bytes)?;
    let req: InferRequest =
        serde_json::from_slice(header).map_err(|e| bad(format!("invalid request: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for t in &req.inputs {
        let elements = elements(t, &mut binary)?;
        inputs.push(Tensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            elements,
        });
    }
    let outputs: Vec<&str> = req
        .outputs
        .iter()
        .flatten()
        .map(|o| o.name.as_str())
        .collect();
    let done = infer::infer_tensors(&state.node, name, version, inputs, &outputs).await?;
    Ok(respond(&req, name, &done))
}

/// The body's JSON and, with `Inference-Header-Content-Length`, the binary tensors after it.
fn split_body<'a>(headers: &HeaderMap, bytes: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), V2Error> {
    let Some(raw) = headers.get(HEADER_LENGTH) else {
        return Ok((bytes, &[]));
    };
    let n = raw
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .ok_or_else(|| bad("Inference-Header-Content-Length must be a byte count"))?;
    if n > bytes.len() {
        return Err(bad(format!(
            "Inference-Header-Content-Length {n} exceeds the body's {} bytes",
            bytes.len()
        )));
    }
    Ok(bytes.split_at(n))
}

fn respond(req: &InferRequest, name: &str, done: &Inferred) -> Response {
    let rows = &done.rows;
    let k = rows.first().map_or(1, Vec::len);
    let shape = if k == 1 {
        json!([rows.len()])
    } else {
        json!([rows.len(), k])
    };
    let binary = req.binary_output(&done.output);
    let mut output = json!({"name": done.output, "datatype": "FP64", "shape": shape});
    let mut tensor = Vec::new();
    if binary {
        tensor = rows
            .iter()
            .flatten()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        output["parameters"] = json!({"binary_data_size": tensor.len()});
    } else {
        let data: Vec<Value> = rows
            .iter()
            .flatten()
            .map(|&x| serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number))
            .collect();
        output["data"] = Value::Array(data);
    }
    let mut body = Map::new();
    body.insert("model_name".into(), json!(name));
    body.insert("model_version".into(), json!(done.version.to_string()));
    if let Some(id) = &req.id {
        body.insert("id".into(), json!(id));
    }
    if let Some(h) = done.cache_hits {
        body.insert("parameters".into(), json!({"cache_hits": h}));
    }
    body.insert("outputs".into(), json!([output]));
    let mut out = serde_json::to_vec(&Value::Object(body)).expect("JSON values serialize");
    if !binary {
        return ([(header::CONTENT_TYPE, "application/json")], out).into_response();
    }
    let header_len = out.len();
    out.extend_from_slice(&tensor);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(header_len),
            ),
        ],
        out,
    )
        .into_response()
}
