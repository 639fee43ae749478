//! The model repository, in Triton's layout (DESIGN.md §3):
//! `models/<name>/config.toml` and `models/<name>/<version>/model.{json,txt,onnx}`.
//!
//! At load, every input a model names is checked against the feature schema: `view:feature`
//! (or `view:aggregation`) must exist and be numeric or boolean; `request:<name>` inputs are
//! supplied with each request. A model that does not fit is refused with an error naming the
//! input, and the rest of the repository still loads. This module reads one model at a time;
//! [`crate::registry`] keeps the served set current as the repository changes.

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
    pub batching: Option<BatchingConfig>,
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// `manual` (default): a new version is a candidate until promoted. `auto`: the newest
    /// version takes over once ready (Triton's behaviour).
    #[serde(default)]
    pub promote: Promote,
    /// Automated canary analysis for new versions (needs `promote = "manual"`).
    #[serde(default)]
    pub rollout: Option<crate::rollout::RolloutConfig>,
}

/// Who makes a new version the stable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Promote {
    /// An operator (`POST /v1/models/{m}/promote`) or a finished rollout.
    #[default]
    Manual,
    /// The newest ready version, as soon as it is ready.
    Auto,
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
    /// ONNX: the graph output to use; trees: the name the score is returned under.
    pub name: String,
    /// Returns one column of a wider output row as a scalar (e.g. `1` for P(class 1) of a
    /// classifier's `probabilities`); without it the whole row is returned.
    #[serde(default)]
    pub column: Option<usize>,
}

/// Dynamic micro-batching (DESIGN.md §3): requests wait up to `queue_delay_us_max` for up to
/// `batch_max` rows, then run as one batch. `queue_max` bounds the rows waiting; beyond it a
/// predict is refused with 503 and `Retry-After`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    #[serde(default = "default_queue_delay_us_max")]
    pub queue_delay_us_max: u64,
    #[serde(default = "default_queue_max")]
    pub queue_max: usize,
}

fn default_batch_max() -> usize {
    64
}
fn default_queue_delay_us_max() -> u64 {
    200
}
fn default_queue_max() -> usize {
    1024
}

/// The prediction cache of one model: bounded in entries and age.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_cache_entries")]
    pub entries_max: usize,
    #[serde(
        default = "default_cache_ttl",
        with = "humantime_serde_ms",
        rename = "ttl"
    )]
    pub ttl_ms: u64,
}

fn yes() -> bool {
    true
}
fn default_cache_entries() -> usize {
    100_000
}
fn default_cache_ttl() -> u64 {
    60_000
}

/// `ttl = "60s"` in the file, milliseconds in memory.
mod humantime_serde_ms {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(|d| d.as_millis() as u64)
            .map_err(serde::de::Error::custom)
    }
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    Latest(usize),
    All,
    Specific(Vec<u64>),
}

impl VersionPolicy {
    /// The versions to serve out of those on disk (ascending).
    pub fn select(&self, available: &[u64]) -> Vec<u64> {
        match self {
            VersionPolicy::Latest(n) => available[available.len().saturating_sub(*n)..].to_vec(),
            VersionPolicy::All => available.to_vec(),
            VersionPolicy::Specific(list) => available
                .iter()
                .copied()
                .filter(|v| list.contains(v))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Onnx,
    XGBoost,
    LightGBM,
}

impl Runtime {
    pub fn file(self) -> &'static str {
        match self {
            Runtime::Onnx => "model.onnx",
            Runtime::XGBoost => "model.json",
            Runtime::LightGBM => "model.txt",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Onnx => "onnx",
            Runtime::XGBoost => "xgboost",
            Runtime::LightGBM => "lightgbm",
        }
    }
}

/// A model's `config.toml`, resolved against the feature schema: what every version shares.
#[derive(Debug)]
pub struct ModelSpec {
    pub name: String,
    pub runtime: Runtime,
    pub inputs: Vec<Input>,
    /// The feature inputs grouped by view, so a predict reads each entity row once:
    /// (view, columns to read, position of each in the input vector).
    pub reads: Vec<(ViewId, Vec<FeatureIdx>, Vec<usize>)>,
    pub outputs: Vec<OutputConfig>,
    pub policy: VersionPolicy,
    pub batching: Option<BatchingConfig>,
    pub cache: Option<CacheConfig>,
    pub promote: Promote,
    pub rollout: Option<crate::rollout::RolloutConfig>,
    /// Hash of the config text: a changed config reloads every version.
    pub fingerprint: u64,
}

impl ModelSpec {
    /// The name predictions are returned under: the config's first output, else `score`.
    pub fn output_name(&self) -> &str {
        self.outputs
            .first()
            .map(|o| o.name.as_str())
            .unwrap_or("score")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("model {model}: {message}")]
pub struct RepositoryError {
    pub model: String,
    pub message: String,
}

/// The model directories under `dir` (those with a `config.toml`), sorted by name.
pub fn model_dirs(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut dirs: Vec<(String, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("config.toml").is_file())
        .filter_map(|p| Some((p.file_name()?.to_str()?.to_string(), p)))
        .collect();
    dirs.sort();
    dirs
}

/// Reads and resolves `dir/config.toml`.
pub fn load_spec(dir: &Path, name: &str, schema: &Schema) -> Result<ModelSpec, String> {
    let text = std::fs::read_to_string(dir.join("config.toml"))
        .map_err(|e| format!("config.toml: {e}"))?;
    let config: ModelConfig = toml::from_str(&text).map_err(|e| format!("config.toml: {e}"))?;
    let inputs = resolve_inputs(&config, schema)?;
    let runtime = match config.runtime.as_str() {
        "onnx" => Runtime::Onnx,
        "xgboost" => Runtime::XGBoost,
        "lightgbm" => Runtime::LightGBM,
        other => {
            return Err(format!(
                "runtime {other:?}: expected onnx, xgboost or lightgbm"
            ))
        }
    };
    let policy = version_policy(&config)?;
    if let Some(b) = &config.batching {
        if b.batch_max == 0 || b.queue_max < b.batch_max {
            return Err("batching: batch_max must be > 0 and queue_max >= batch_max".into());
        }
    }
    if let Some(c) = &config.cache {
        if c.enabled && (c.entries_max == 0 || c.ttl_ms == 0) {
            return Err("cache: entries_max and ttl must be > 0".into());
        }
    }
    if let Some(r) = &config.rollout {
        r.validate()?;
        if config.promote == Promote::Auto {
            return Err(
                "rollout needs promote = \"manual\" (auto promotes without a canary)".into(),
            );
        }
    }
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
    Ok(ModelSpec {
        name: name.to_string(),
        runtime,
        inputs,
        reads,
        outputs: config.outputs,
        policy,
        batching: config.batching,
        cache: config.cache.filter(|c| c.enabled),
        promote: config.promote,
        rollout: config.rollout,
        fingerprint: xxhash_rust::xxh3::xxh3_64(text.as_bytes()),
    })
}

/// The numbered version directories of a model that hold its runtime's file, ascending,
/// each with a fingerprint of that file (size and modification time) so a rewrite is seen.
pub fn version_dirs(dir: &Path, runtime: Runtime) -> Vec<(u64, PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf, u64)> = entries
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u64>().ok()?;
            let file = e.path().join(runtime.file());
            let meta = std::fs::metadata(&file).ok()?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64);
            Some((v, file, meta.len() ^ mtime.rotate_left(17)))
        })
        .collect();
    out.sort_by_key(|v| v.0);
    out
}

/// A loaded version: its model and the width of its output rows.
pub struct LoadedVersion {
    pub version: u64,
    pub model: Arc<dyn Model>,
    /// Column of the model's output row returned as the scalar output, if any.
    pub column: Option<usize>,
    /// Wall time of the warm-up.
    pub warmup: std::time::Duration,
}

/// Loads one version's file, checks it against the spec and warms it up with `warmup_rows`
/// synthetic rows (each input's default, then zeros, then missing values), so the first real
/// request pays no lazy initialisation and a model that cannot evaluate never serves.
pub fn load_version(
    spec: &ModelSpec,
    version: u64,
    file: &Path,
    warmup_rows: usize,
) -> Result<LoadedVersion, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let text = || String::from_utf8(bytes.clone()).map_err(|e| ModelError::Parse(e.to_string()));
    let model: Arc<dyn Model> = match spec.runtime {
        Runtime::XGBoost => Arc::new(
            text()
                .and_then(|t| Forest::from_xgboost_json(&t))
                .map_err(|e| e.to_string())?,
        ),
        Runtime::LightGBM => Arc::new(
            text()
                .and_then(|t| Forest::from_lightgbm_text(&t))
                .map_err(|e| e.to_string())?,
        ),
        Runtime::Onnx => crate::onnx::load(&bytes, spec.outputs.first().map(|o| o.name.as_str()))
            .map_err(|e| e.to_string())?,
    };
    if model.inputs() != spec.inputs.len() {
        return Err(format!(
            "the model takes {} inputs, config.toml lists {}",
            model.inputs(),
            spec.inputs.len()
        ));
    }
    let column = spec.outputs.first().and_then(|o| o.column);
    if let Some(c) = column {
        if c >= model.outputs() {
            return Err(format!(
                "outputs[0].column = {c}, but the model's output rows hold {} values",
                model.outputs()
            ));
        }
    }
    let started = std::time::Instant::now();
    warm_up(spec, model.as_ref(), warmup_rows)?;
    let dir = file.parent().unwrap_or(Path::new("."));
    if let Err(reason) = crate::golden::check(dir, model.as_ref()) {
        metrics::counter!(quiver_core::telemetry::MODEL_GOLDEN_FAILURES_TOTAL, "model" => spec.name.clone(), "version" => version.to_string())
            .increment(1);
        return Err(format!("golden set failed: {reason}"));
    }
    tracing::info!(
        model = spec.name,
        version,
        engine = model.engine(),
        "version loaded"
    );
    Ok(LoadedVersion {
        version,
        model,
        column,
        warmup: started.elapsed(),
    })
}

fn warm_up(spec: &ModelSpec, model: &dyn Model, rows: usize) -> Result<(), String> {
    if rows == 0 {
        return Ok(());
    }
    let width = spec.inputs.len();
    let mut batch = Vec::with_capacity(rows * width);
    for r in 0..rows {
        for input in &spec.inputs {
            batch.push(match (r % 3, input) {
                (0, Input::Feature { default, .. }) => *default,
                (0, Input::Request { default, .. }) => default.unwrap_or(0.0),
                (1, _) => 0.0,
                _ => f64::NAN,
            });
        }
    }
    let mut out = vec![0.0; rows * model.outputs()];
    model
        .predict(&batch, &mut out)
        .map_err(|e| format!("warm-up: {e}"))?;
    // And one row alone, the shape most requests have.
    let mut one = vec![0.0; model.outputs()];
    model
        .predict(&batch[..width], &mut one)
        .map_err(|e| format!("warm-up: {e}"))
}

fn version_policy(config: &ModelConfig) -> Result<VersionPolicy, String> {
    const EXPECTED: &str =
        "version_policy: expected { latest = N }, { all = true } or { specific = [..] }";
    let Some(v) = &config.version_policy else {
        return Ok(VersionPolicy::Latest(1));
    };
    let toml::Value::Table(t) = v else {
        return Err(EXPECTED.into());
    };
    if t.len() != 1 {
        return Err(EXPECTED.into());
    }
    match (t.get("latest"), t.get("all"), t.get("specific")) {
        (Some(toml::Value::Integer(n)), _, _) if *n > 0 => Ok(VersionPolicy::Latest(*n as usize)),
        (_, Some(toml::Value::Boolean(true)), _) => Ok(VersionPolicy::All),
        (_, _, Some(toml::Value::Array(list))) if !list.is_empty() => list
            .iter()
            .map(|x| match x {
                toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
                _ => Err(EXPECTED.to_string()),
            })
            .collect::<Result<Vec<u64>, String>>()
            .map(VersionPolicy::Specific),
        _ => Err(EXPECTED.into()),
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
