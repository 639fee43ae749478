//! The model repository, in Triton's layout (DESIGN.md §3):
//! `models/<name>/config.toml` and `models/<name>/<version>/model.{json,txt,onnx}`.
//!
//! At load, every input a model names is checked against the feature schema: `view:feature`
//! (or `view:aggregation`) must exist and be numeric or boolean; `request:<name>` inputs are
//! supplied with each request. A model that does not fit is refused with an error naming the
//! input, and the rest of the repository still loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_core::schema::{FeatureIdx, Schema, ViewId};
use quiver_core::value::FeatureType;
use serde::Deserialize;

use crate::trees::Forest;
use crate::{Model, ModelError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub runtime: String,
    pub inputs: Vec<InputConfig>,
    #[serde(default)]
    pub outputs: Vec<OutputConfig>,
    #[serde(default)]
    pub version_policy: Option<toml::Value>,
    #[serde(default)]
    pub batching: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub feature: String,
    pub default: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub name: String,
}

/// Where one model input comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A column of a view (a feature or an aggregation).
    Feature {
        view: ViewId,
        column: FeatureIdx,
        name: String,
        default: f64,
    },
    /// A value sent with the request.
    Request { name: String, default: Option<f64> },
}

/// One loaded version of a model.
pub struct LoadedVersion {
    pub version: u64,
    pub model: Arc<dyn Model>,
}

pub struct LoadedModel {
    pub name: String,
    pub runtime: String,
    pub inputs: Vec<Input>,
    /// The feature inputs grouped by view, so a predict reads each entity row once:
    /// (view, columns to read, position of each in the input vector).
    pub reads: Vec<(ViewId, Vec<FeatureIdx>, Vec<usize>)>,
    pub output: String,
    /// Ascending; the default version is the last.
    pub versions: Vec<LoadedVersion>,
}

impl LoadedModel {
    pub fn version(&self, v: Option<u64>) -> Option<&LoadedVersion> {
        match v {
            None => self.versions.last(),
            Some(v) => self.versions.iter().find(|x| x.version == v),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("model {model}: {message}")]
pub struct RepositoryError {
    pub model: String,
    pub message: String,
}

/// Loads every model under `dir`. Returns the models that loaded and the errors of those
/// that did not (a missing repository directory is simply empty).
pub fn load(dir: &Path, schema: &Schema) -> (BTreeMap<String, LoadedModel>, Vec<RepositoryError>) {
    let mut models = BTreeMap::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (models, errors);
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.toml").is_file())
        .collect();
    dirs.sort();
    for path in dirs {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        match load_model(&path, &name, schema) {
            Ok(m) => {
                models.insert(name, m);
            }
            Err(message) => errors.push(RepositoryError {
                model: name,
                message,
            }),
        }
    }
    (models, errors)
}

fn load_model(dir: &Path, name: &str, schema: &Schema) -> Result<LoadedModel, String> {
    let text = std::fs::read_to_string(dir.join("config.toml"))
        .map_err(|e| format!("config.toml: {e}"))?;
    let config: ModelConfig = toml::from_str(&text).map_err(|e| format!("config.toml: {e}"))?;
    let inputs = resolve_inputs(&config, schema)?;
    let file = match config.runtime.as_str() {
        "xgboost" => "model.json",
        "lightgbm" => "model.txt",
        "onnx" => {
            return Err("runtime \"onnx\" is not supported yet (xgboost and lightgbm are)".into())
        }
        other => {
            return Err(format!(
                "runtime {other:?}: expected onnx, xgboost or lightgbm"
            ))
        }
    };
    let keep = latest_n(&config)?;
    let mut numbered: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u64>().ok()?, e.path())))
        .filter(|(_, p)| p.join(file).is_file())
        .collect();
    numbered.sort();
    let start = numbered.len().saturating_sub(keep);
    let mut versions = Vec::new();
    for (version, path) in &numbered[start..] {
        let text = std::fs::read_to_string(path.join(file))
            .map_err(|e| format!("version {version}: {e}"))?;
        let forest = match config.runtime.as_str() {
            "xgboost" => Forest::from_xgboost_json(&text),
            _ => Forest::from_lightgbm_text(&text),
        }
        .map_err(|e: ModelError| format!("version {version}: {e}"))?;
        if forest.inputs() != inputs.len() {
            return Err(format!(
                "version {version}: the model takes {} inputs, config.toml lists {}",
                forest.inputs(),
                inputs.len()
            ));
        }
        versions.push(LoadedVersion {
            version: *version,
            model: Arc::new(forest),
        });
    }
    if versions.is_empty() {
        return Err(format!("no version directory with a {file}"));
    }
    let output = config
        .outputs
        .first()
        .map(|o| o.name.clone())
        .unwrap_or_else(|| "score".into());
    tracing::info!(model = name, versions = versions.len(), "model loaded");
    let mut reads: Vec<(ViewId, Vec<FeatureIdx>, Vec<usize>)> = Vec::new();
    for (pos, input) in inputs.iter().enumerate() {
        if let Input::Feature { view, column, .. } = input {
            match reads.iter_mut().find(|r| r.0 == *view) {
                Some(r) => {
                    r.1.push(*column);
                    r.2.push(pos);
                }
                None => reads.push((*view, vec![*column], vec![pos])),
            }
        }
    }
    Ok(LoadedModel {
        name: name.to_string(),
        runtime: config.runtime,
        inputs,
        reads,
        output,
        versions,
    })
}

fn latest_n(config: &ModelConfig) -> Result<usize, String> {
    match &config.version_policy {
        None => Ok(1),
        Some(toml::Value::Table(t)) => match (t.get("latest"), t.get("all")) {
            (Some(toml::Value::Integer(n)), _) if *n > 0 => Ok(*n as usize),
            (None, Some(toml::Value::Boolean(true))) => Ok(usize::MAX),
            _ => Err("version_policy: expected { latest = N } or { all = true }".into()),
        },
        Some(_) => Err("version_policy must be a table".into()),
    }
}

/// Model–feature compatibility: every input resolves, and to a type a model can take.
pub fn resolve_inputs(config: &ModelConfig, schema: &Schema) -> Result<Vec<Input>, String> {
    let mut out = Vec::with_capacity(config.inputs.len());
    for (i, input) in config.inputs.iter().enumerate() {
        let Some((view, column)) = input.feature.split_once(':') else {
            return Err(format!(
                "inputs[{i}]: {:?} is not view:feature or request:name",
                input.feature
            ));
        };
        if view == "request" {
            out.push(Input::Request {
                name: column.to_string(),
                default: input.default,
            });
            continue;
        }
        let v = schema
            .view_by_name(view)
            .ok_or_else(|| format!("inputs[{i}]: no view {view:?}"))?;
        let idx = v
            .column_index(column)
            .ok_or_else(|| format!("inputs[{i}]: view {view:?} has no feature {column:?}"))?;
        let ty = match v.aggregation_of_column(idx) {
            Some(a) => v.aggregations[a].window.func.output_type(),
            None => v.feature(idx).ty,
        };
        if !matches!(ty, FeatureType::F64 | FeatureType::I64 | FeatureType::Bool) {
            return Err(format!(
                "inputs[{i}]: {} is {ty}; models take numeric or boolean features",
                input.feature
            ));
        }
        let default = input
            .default
            .unwrap_or_else(|| match v.aggregation_of_column(idx) {
                Some(_) => 0.0,
                None => match &v.feature(idx).default {
                    Some(quiver_core::value::Value::F64(x)) => *x,
                    Some(quiver_core::value::Value::I64(x)) => *x as f64,
                    Some(quiver_core::value::Value::Bool(b)) => f64::from(u8::from(*b)),
                    _ => f64::NAN,
                },
            });
        out.push(Input::Feature {
            view: v.id,
            column: idx,
            name: input.feature.clone(),
            default,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::Config;

    fn schema() -> Schema {
        let text = "[[entity]]\nname = \"u\"\nkey = \"id\"\n[[view]]\nname = \"txn\"\nentity = \"u\"\nfeatures = [{ name = \"amount\", type = \"f64\", default = 1.5 }, { name = \"m\", type = \"string\" }]\naggregations = [{ name = \"s\", of = \"amount\", fn = \"sum\", window = \"5m\" }]\n";
        Schema::compile(&Config::from_toml_with_env(text, Vec::new()).unwrap()).unwrap()
    }

    fn inputs(list: &str) -> Result<Vec<Input>, String> {
        let config: ModelConfig =
            toml::from_str(&format!("runtime = \"xgboost\"\ninputs = [{list}]")).unwrap();
        resolve_inputs(&config, &schema())
    }

    #[test]
    fn inputs_must_fit_the_schema() {
        let ok = inputs(r#"{ feature = "txn:amount" }, { feature = "txn:s" }, { feature = "request:x", default = 2.0 }"#).unwrap();
        assert!(
            matches!(&ok[0], Input::Feature { default, .. } if *default == 1.5),
            "the feature's own default"
        );
        assert!(
            matches!(&ok[1], Input::Feature { column: 2, .. }),
            "aggregations are inputs too"
        );
        assert_eq!(
            ok[2],
            Input::Request {
                name: "x".into(),
                default: Some(2.0)
            }
        );
        assert!(inputs(r#"{ feature = "txn:nope" }"#)
            .unwrap_err()
            .contains("no feature"));
        assert!(inputs(r#"{ feature = "nope:amount" }"#)
            .unwrap_err()
            .contains("no view"));
        assert!(inputs(r#"{ feature = "txn:m" }"#)
            .unwrap_err()
            .contains("numeric"));
        assert!(inputs(r#"{ feature = "amount" }"#)
            .unwrap_err()
            .contains("view:feature"));
    }
}
