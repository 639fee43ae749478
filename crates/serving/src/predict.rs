//! Predict: route to a version, look in the prediction cache, gather the entity's features
//! from the store (memory only), add request-time values, run the model in process (inline,
//! or through the version's micro-batcher), copy to the shadow. `/v1/models/{m}/predict`,
//! V2 infer over HTTP and gRPC all come through [`run`] (feature join) or [`evaluate`] (raw
//! input rows).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use quiver_core::telemetry as t;
use quiver_core::time::{now_ms, EpochMs};
use quiver_core::token::Token;
use quiver_core::value::Value;
use quiver_model::registry::{RouteError, Served, Version};
use quiver_model::repository::{Input, ModelSpec};
use quiver_store::Status;

use crate::cache::{aggregate_valid_until, Entry, KeyBuilder, ModelCache};
use crate::error::{Code, Result, ServingError};
use crate::remote::Prefetched;
use crate::Node;

/// A request-time value as the request gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Given {
    Number(f64),
    /// Present but not a number or boolean: an error if the model reads it.
    NotNumeric,
}

/// One instance of a predict: entity keys by key column (`user_id` → `u1`) and request-time
/// values by name. Names the model does not read are ignored.
#[derive(Clone, Debug, Default)]
pub struct Instance {
    pub entities: Vec<(String, String)>,
    pub values: Vec<(String, Given)>,
}

impl Instance {
    pub fn entity(&self, column: &str) -> Option<&str> {
        self.entities
            .iter()
            .find(|(c, _)| c == column)
            .map(|(_, k)| k.as_str())
    }

    fn value(&self, name: &str) -> Option<Given> {
        self.values.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// A store feature that was absent or stale (its default was used).
#[derive(Clone, Debug, PartialEq)]
pub struct Missing {
    pub feature: String,
    pub status: Status,
}

/// One instance's answer.
pub struct Answer {
    pub version: u64,
    /// The model's full output row.
    pub outputs: Arc<[f64]>,
    /// The column returned as the scalar output, if the config picks one.
    pub column: Option<usize>,
    pub missing: Arc<[Missing]>,
    pub cache_hit: bool,
}

impl Answer {
    /// The returned values: the picked column, or the whole row.
    pub fn values(&self) -> &[f64] {
        match self.column {
            Some(c) => &self.outputs[c..=c],
            None => &self.outputs,
        }
    }
}

pub fn route_error(e: RouteError) -> ServingError {
    let code = match e {
        RouteError::UnknownModel(_) => Code::UnknownModel,
        RouteError::UnknownVersion(..) => Code::UnknownVersion,
        RouteError::VersionNotReady(..) | RouteError::NotReady(_) => Code::ModelNotReady,
    };
    ServingError::new(code, e.to_string())
}

/// The served model `name` with a loaded config, or 404.
pub fn served(node: &Node, name: &str) -> Result<(Arc<Served>, Arc<ModelSpec>)> {
    let m = node.models.get(name);
    match m.as_ref().and_then(|m| m.spec.clone()) {
        Some(spec) => Ok((m.expect("spec implies model"), spec)),
        None => Err(ServingError::new(
            Code::UnknownModel,
            match m.and_then(|m| m.error.clone()) {
                Some(e) => format!("model {name:?} did not load: {e}"),
                None => format!("no model {name:?}"),
            },
        )
        .detail("model", name)),
    }
}

/// Runs `instances` through model `m`: each is routed (pin, sticky split, default), answered
/// from the cache or gathered and evaluated (grouped per version into one execution).
pub async fn run(
    node: &Node,
    m: &Served,
    spec: &Arc<ModelSpec>,
    pin: Option<u64>,
    instances: &[Instance],
    after: Option<&Token>,
) -> Result<Vec<Answer>> {
    let now = now_ms();
    let cache = model_cache(node, spec);
    let pre = prefetch(node, spec, instances, after).await?;
    let mut answers: Vec<Option<Answer>> = (0..instances.len()).map(|_| None).collect();
    // Misses, per version: (version, instance indexes, their rows, their cache keys/deadlines).
    let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
    let mut keys = Vec::new();
    for (i, inst) in instances.iter().enumerate() {
        keys.clear();
        entity_keys(node, spec, inst, &mut keys).map_err(|e| e.at_instance(i, instances.len()))?;
        let sticky = sticky_key(&keys, inst);
        let version = m.route(pin, &sticky).map_err(route_error)?;
        let loaded = version.loaded.as_ref().expect("routed versions are loaded");
        // Rows read on other nodes carry no version here: such an answer is not cached.
        let remote = keys.iter().any(|(v, k)| pre.contains(*v, k));
        let probe = cache.as_ref().filter(|_| !remote);
        if let Some(cache) = probe {
            let key = probe_key(node, spec, version.version, &keys, inst)
                .map_err(|e| e.at_instance(i, instances.len()))?;
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
            node,
            spec,
            version.version,
            &keys,
            inst,
            now,
            &mut g.rows,
            probe.map(|c| &**c),
            &pre,
            &version.metrics.gather,
        )
        .map_err(|e| e.at_instance(i, instances.len()))?;
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
        let out = evaluate(node, m, spec, g.version, g.rows, n).await?;
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
pub async fn evaluate(
    node: &Node,
    m: &Served,
    spec: &ModelSpec,
    version: &Version,
    rows: Vec<f64>,
    n: usize,
) -> Result<Vec<f64>> {
    let loaded = version.loaded.as_ref().expect("routed versions are loaded");
    let k = loaded.model.outputs();
    let shadow = m
        .shadow(version.version)
        .and_then(|s| Some((s.loaded.clone()?, s.outcomes.clone())));
    let started = Instant::now();
    let result = run_version(version, spec, loaded, rows, n, shadow.is_some()).await;
    // What a rollout judges versions by: every live prediction's latency and outcome.
    version.outcomes.record(started.elapsed(), result.is_ok());
    let (out, rows) = result?;
    if let (Some((s, outcomes)), Some(rows)) = (shadow, rows) {
        node.shadow
            .submit(&spec.name, s, Some(outcomes), rows, out.clone(), k);
    }
    Ok(out)
}

/// Runs the rows on the version (batcher or inline); the rows come back when a shadow needs
/// a copy.
async fn run_version(
    version: &Version,
    spec: &ModelSpec,
    loaded: &quiver_model::repository::LoadedVersion,
    rows: Vec<f64>,
    n: usize,
    shadow: bool,
) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    let k = loaded.model.outputs();
    let (out, rows) = match &version.batcher {
        Some(b) => {
            // The batcher takes the rows; only a shadow needs a copy of them.
            let copy = shadow.then(|| rows.clone());
            let rx = b.submit(rows).map_err(|e| {
                metrics::counter!(t::MODEL_QUEUE_REJECTED_TOTAL, "model" => spec.name.clone())
                    .increment(1);
                ServingError::new(Code::QueueFull, e.to_string())
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
            (out, shadow.then_some(rows))
        }
    };
    Ok((out, rows))
}

struct Group<'a> {
    version: &'a Version,
    members: Vec<(usize, Gathered)>,
    rows: Vec<f64>,
}

struct Gathered {
    missing: Arc<[Missing]>,
    /// (cache key, valid until) when the model caches.
    cache: Option<(u128, EpochMs)>,
}

fn model_error(message: impl Into<String>) -> ServingError {
    ServingError::new(Code::ModelError, message)
}

fn model_cache(node: &Node, spec: &ModelSpec) -> Option<Arc<ModelCache>> {
    let c = spec.cache.as_ref()?;
    if let Some(existing) = node.caches.read().get(&spec.name) {
        if existing.entries_max == c.entries_max && existing.ttl_ms == c.ttl_ms {
            return Some(existing.clone());
        }
    }
    let fresh = Arc::new(ModelCache::new(c.entries_max, c.ttl_ms));
    node.caches.write().insert(spec.name.clone(), fresh.clone());
    Some(fresh)
}

/// In a cluster: the rows `instances` need from partitions this node does not serve,
/// fetched from their owners (none on a single node, or when every row is served here).
async fn prefetch(
    node: &Node,
    spec: &ModelSpec,
    instances: &[Instance],
    after: Option<&Token>,
) -> Result<Prefetched> {
    if node.cluster.is_none() {
        return Ok(Prefetched::default());
    }
    let mut pairs: Vec<(u16, String)> = Vec::new();
    for inst in instances {
        // A missing entity is reported by the gather that follows.
        let _ = entity_keys(node, spec, inst, &mut pairs);
    }
    node.prefetch(pairs.iter().map(|(v, k)| (*v, k.as_str())), after)
        .await
}

/// The entity key of each view the model reads: (view, key), in `spec.reads` order.
fn entity_keys(
    node: &Node,
    spec: &ModelSpec,
    inst: &Instance,
    out: &mut Vec<(u16, String)>,
) -> Result<()> {
    let schema = &node.schema;
    for (view, _, _) in &spec.reads {
        let v = schema.view(*view);
        let key_col = &schema.entity_of(v).key;
        let Some(key) = inst.entity(key_col) else {
            return Err(ServingError::new(
                Code::MissingEntity,
                format!("entities must give {key_col:?} (for view {:?})", v.name),
            )
            .detail("entity_key", key_col.as_str()));
        };
        out.push((*view, key.to_string()));
    }
    Ok(())
}

/// What a split keeps a request on one version by: its first entity key; for a model that
/// reads no entity, an entity the request names anyway, else its request values (the same
/// inputs always go to the same version).
fn sticky_key(keys: &[(u16, String)], inst: &Instance) -> String {
    if let Some(k) = keys.first() {
        return k.1.clone();
    }
    if let Some((_, k)) = inst.entities.first() {
        return k.clone();
    }
    format!("{:?}", inst.values)
}

/// Request-time value `name` of an instance: `Some(x)`, or `None` if absent and defaulted.
fn request_value(inst: &Instance, name: &str, default: Option<f64>) -> Result<f64> {
    let x = match inst.value(name) {
        Some(Given::Number(x)) => Some(x),
        None => None,
        Some(Given::NotNumeric) => {
            return Err(ServingError::new(
                Code::BadFeature,
                format!("features.{name} must be a number or boolean"),
            )
            .detail("feature", name))
        }
    };
    // An omitted request value with a declared default is the config working as intended;
    // `missing` reports store features that were absent or stale.
    match (x, default) {
        (Some(x), _) => Ok(x),
        (None, Some(d)) => Ok(d),
        (None, None) => Err(ServingError::new(
            Code::MissingFeature,
            format!("features.{name} is required (request-time value)"),
        )
        .detail("feature", name)),
    }
}

/// The cache key from the rows' current versions, read without reading the rows.
fn probe_key(
    node: &Node,
    spec: &ModelSpec,
    version: u64,
    keys: &[(u16, String)],
    inst: &Instance,
) -> Result<u128> {
    let mut k = KeyBuilder::new(&spec.name, version);
    for (view, key) in keys {
        k.row(*view, key, node.store.row_version(*view, key));
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
    node: &Node,
    spec: &ModelSpec,
    version: u64,
    keys: &[(u16, String)],
    inst: &Instance,
    now: EpochMs,
    rows: &mut Vec<f64>,
    cache: Option<&ModelCache>,
    pre: &Prefetched,
    gather_seconds: &metrics::Histogram,
) -> Result<Gathered> {
    let started = Instant::now();
    let schema = &node.schema;
    let mut missing = Vec::new();
    let start = rows.len();
    rows.resize(start + spec.inputs.len(), f64::NAN);
    let mut key = cache.map(|_| KeyBuilder::new(&spec.name, version));
    let mut valid_until = cache.map_or(EpochMs::MAX, |c| now.saturating_add(c.ttl_ms as EpochMs));
    let mut read = Vec::new();
    for ((view, columns, positions), (_, entity)) in spec.reads.iter().zip(keys) {
        let v = schema.view(*view);
        read.clear();
        if !pre.read(*view, entity, columns, &mut read) {
            let row_version = node.store.read(*view, entity, columns, now, &mut read);
            if let Some(k) = &mut key {
                k.row(*view, entity, row_version);
            }
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
                    missing.push((
                        pos,
                        Missing {
                            feature: name.clone(),
                            status: r.status,
                        },
                    ));
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
        missing: missing.into_iter().map(|m| m.1).collect(),
        cache: key.map(|k| (k.finish(), valid_until)),
    })
}
