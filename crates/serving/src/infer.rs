//! The Open Inference Protocol (KServe V2) on decoded tensors, for both surfaces (HTTP JSON or
//! binary tensors, gRPC typed or raw contents): model metadata, readiness, infer.
//!
//! An infer takes either of two input sets:
//! - **Raw tensor** — the signature model metadata declares: one numeric input named `input`
//!   of shape `[n, model inputs]`, evaluated as given (no feature gathering, no cache). It is
//!   the model's own input vector, as a Triton model declares it, so a generic client (read
//!   metadata, fill every input) can call any model.
//! - **Feature join** (Quiver's extension `quiver_feature_join`): a BYTES input named after an
//!   entity key (`user_id`, shape `[n]`) plus one input per request-time value (`amount`,
//!   shape `[n]` or `[n, 1]`). The features of those entities are gathered from memory, as
//!   `/v1/models/{m}/predict` does: one V2 call is a full feature + predict request.

use std::sync::Arc;

use quiver_model::registry::Served;
use quiver_model::repository::{Input, ModelSpec};

use crate::error::{Code, Result, ServingError};
use crate::predict::{self, Given, Instance};
use crate::Node;

fn bad(message: impl Into<String>) -> ServingError {
    ServingError::bad_request(message)
}

fn parse_version(v: &str) -> Result<u64> {
    v.parse()
        .map_err(|_| ServingError::new(Code::UnknownVersion, format!("no version {v:?}")))
}

/// A model, its spec, and the version a versioned path names.
type Found = (Arc<Served>, Arc<ModelSpec>, Option<u64>);

/// The model and, for a versioned path, the version (which must exist).
fn lookup(node: &Node, name: &str, version: Option<&str>) -> Result<Found> {
    let (m, spec) = predict::served(node, name)?;
    let v = version.map(parse_version).transpose()?;
    if let Some(v) = v {
        if !m.versions.contains_key(&v) {
            return Err(ServingError::new(
                Code::UnknownVersion,
                format!("model {name:?} has no version {v}"),
            ));
        }
    }
    Ok((m, spec, v))
}

/// One tensor of a model's signature.
pub struct TensorMeta {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

/// Model metadata, for both surfaces.
pub struct ModelMeta {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    /// The one fillable signature: the raw input vector.
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
    /// The feature-join extension's inputs (entity keys, request values).
    pub join: Vec<TensorMeta>,
}

pub fn model_meta(node: &Node, name: &str, version: Option<&str>) -> Result<ModelMeta> {
    let (m, spec, v) = lookup(node, name, version)?;
    let schema = &node.schema;
    let mut join: Vec<TensorMeta> = Vec::new();
    for (view, _, _) in &spec.reads {
        let key = &schema.entity_of(schema.view(*view)).key;
        if !join.iter().any(|i| i.name == *key) {
            join.push(TensorMeta {
                name: key.clone(),
                datatype: "BYTES",
                shape: vec![-1],
            });
        }
    }
    for input in &spec.inputs {
        if let Input::Request { name, .. } = input {
            join.push(TensorMeta {
                name: name.clone(),
                datatype: "FP64",
                shape: vec![-1],
            });
        }
    }
    let width = v
        .or_else(|| m.default_version())
        .and_then(|v| m.versions.get(&v))
        .and_then(|x| x.loaded.as_ref())
        .map(|l| {
            if l.column.is_some() {
                1
            } else {
                l.model.outputs()
            }
        })
        .unwrap_or(1);
    let out_shape = if width == 1 {
        vec![-1]
    } else {
        vec![-1, width as i64]
    };
    Ok(ModelMeta {
        name: name.to_string(),
        versions: match v {
            Some(v) => vec![v.to_string()],
            None => m.versions.keys().map(|v| v.to_string()).collect(),
        },
        platform: spec.runtime.name().to_string(),
        inputs: vec![TensorMeta {
            name: "input".into(),
            datatype: "FP64",
            shape: vec![-1, spec.inputs.len() as i64],
        }],
        outputs: vec![TensorMeta {
            name: spec.output_name().to_string(),
            datatype: "FP64",
            shape: out_shape,
        }],
        join,
    })
}

/// Whether a model (or one version of it) is ready to serve.
pub fn is_ready(node: &Node, name: &str, version: Option<&str>) -> Result<bool> {
    let (m, _, v) = lookup(node, name, version)?;
    Ok(match v {
        Some(v) => m.versions[&v].loaded.is_some(),
        None => m.default_version().is_some(),
    })
}

/// A tensor's elements, flattened (data may be flat or nested), checked against its
/// datatype and shape.
#[derive(Debug)]
pub enum Elements {
    Numbers(Vec<f64>),
    Strings(Vec<String>),
}

/// One decoded input tensor: what both surfaces (HTTP with JSON or binary data, gRPC with
/// typed or raw contents) hand to [`infer_tensors`].
pub struct Tensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub elements: Elements,
}

/// An inference's answer: the version that served it and one row of outputs per instance.
pub struct Inferred {
    pub version: u64,
    pub output: String,
    pub rows: Vec<Vec<f64>>,
    pub cache_hits: Option<usize>,
}

/// The Open Inference Protocol's infer on decoded tensors: a raw input vector, or the
/// feature join (see the module docs). `outputs` are the names asked for (none: all).
pub async fn infer_tensors(
    node: &Node,
    name: &str,
    version: Option<&str>,
    inputs: Vec<Tensor>,
    outputs: &[&str],
) -> Result<Inferred> {
    let (m, spec, pin) = lookup(node, name, version)?;
    if let Some(o) = outputs.iter().find(|o| **o != spec.output_name()) {
        return Err(bad(format!(
            "unknown output {o:?} (the model's output is {:?})",
            spec.output_name()
        )));
    }
    if inputs.is_empty() {
        return Err(bad("no inputs"));
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = inputs.iter().find(|t| !seen.insert(t.name.as_str())) {
        return Err(bad(format!("input {:?} given twice", dup.name)));
    }
    let output = spec.output_name().to_string();
    if inputs.len() == 1 && inputs[0].name == "input" {
        let raw = inputs.into_iter().next().expect("one input");
        let (version, rows) = infer_raw(node, &m, &spec, pin, raw).await?;
        return Ok(Inferred {
            version,
            output,
            rows,
            cache_hits: None,
        });
    }
    let instances = join_instances(node, &spec, inputs)?;
    let answers = predict::run(node, &m, &spec, pin, &instances, None).await?;
    let rows: Vec<Vec<f64>> = answers.iter().map(|a| a.values().to_vec()).collect();
    let hits = answers.iter().filter(|a| a.cache_hit).count();
    Ok(Inferred {
        version: answers[0].version,
        output,
        rows,
        cache_hits: Some(hits),
    })
}

/// The raw input vector `[n, model inputs]`, evaluated as given.
async fn infer_raw(
    node: &Node,
    m: &Served,
    spec: &ModelSpec,
    pin: Option<u64>,
    raw: Tensor,
) -> Result<(u64, Vec<Vec<f64>>)> {
    let width = spec.inputs.len();
    if raw.shape.len() != 2 || raw.shape[1] != width as i64 {
        return Err(bad(format!(
            "input \"input\": shape must be [n, {width}], got {:?}",
            raw.shape
        )));
    }
    let Elements::Numbers(values) = raw.elements else {
        return Err(bad("input \"input\" must be numeric"));
    };
    let max = node.config.server.read_entities_max;
    let n = raw.shape[0] as usize;
    if n == 0 || n > max {
        return Err(bad(format!("1..={max} rows per request")));
    }
    let version = m.route(pin, "").map_err(predict::route_error)?;
    let loaded = version.loaded.as_ref().expect("routed versions are loaded");
    let k = loaded.model.outputs();
    // Same path as a feature-join infer: micro-batcher, metrics, shadow copy.
    let out = predict::evaluate(node, m, spec, version, values, n).await?;
    assert_eq!(out.len(), n * k, "one row of outputs per input row");
    let rows = out
        .chunks_exact(k)
        .map(|r| match loaded.column {
            Some(c) => vec![r[c]],
            None => r.to_vec(),
        })
        .collect();
    Ok((version.version, rows))
}

/// Feature join: entity keys and request values, one element per instance.
fn join_instances(node: &Node, spec: &ModelSpec, inputs: Vec<Tensor>) -> Result<Vec<Instance>> {
    let schema = &node.schema;
    let max = node.config.server.read_entities_max;
    let mut n: Option<usize> = None;
    let mut instances: Vec<Instance> = Vec::new();
    let key_names: Vec<&str> = spec
        .reads
        .iter()
        .map(|(view, _, _)| schema.entity_of(schema.view(*view)).key.as_str())
        .collect();
    for t in inputs {
        let is_key = key_names.contains(&t.name.as_str());
        let is_request = spec
            .inputs
            .iter()
            .any(|i| matches!(i, Input::Request { name, .. } if *name == t.name));
        if !is_key && !is_request {
            return Err(bad(format!(
                "unknown input {:?} (expected entity keys {key_names:?}, request values or \"input\")",
                t.name
            )));
        }
        let rows = match t.shape.as_slice() {
            [n] => *n,
            [n, 1] => *n,
            _ => {
                return Err(bad(format!(
                    "input {:?}: shape must be [n] or [n, 1], got {:?}",
                    t.name, t.shape
                )))
            }
        } as usize;
        if rows == 0 || rows > max {
            return Err(bad(format!("1..={max} rows per request")));
        }
        match n {
            None => {
                n = Some(rows);
                instances = (0..rows).map(|_| Instance::default()).collect();
            }
            Some(k) if k != rows => {
                return Err(bad(format!(
                    "input {:?} has {rows} rows, others {k}",
                    t.name
                )))
            }
            Some(_) => {}
        }
        match (t.elements, is_key) {
            (Elements::Strings(keys), true) => {
                for (inst, key) in instances.iter_mut().zip(keys) {
                    inst.entities.push((t.name.clone(), key));
                }
            }
            (Elements::Numbers(values), false) => {
                for (inst, x) in instances.iter_mut().zip(values) {
                    inst.values.push((t.name.clone(), Given::Number(x)));
                }
            }
            (_, true) => return Err(bad(format!("input {:?}: entity keys are BYTES", t.name))),
            (_, false) => {
                return Err(bad(format!(
                    "input {:?}: request values are numeric",
                    t.name
                )))
            }
        }
    }
    Ok(instances)
}
