//! The served set of models, kept current as the repository changes, and the traffic state
//! that routes each predict to a version.
//!
//! Readers take an `Arc` of the current [`Snapshot`] (one short read lock) and never wait for
//! a load: [`Registry::poll`] loads and warms new versions off to the side, then swaps in a
//! new snapshot. A version whose file turns out broken never replaces what was serving: the
//! previous load of that version (or the previous versions) keeps serving, and the error is
//! reported in the version's status, the log and `quiver_model_load_errors_total`.
//!
//! Traffic per model: the *stable* version (what answers when nothing else decides), an
//! optional weighted split that is sticky per entity key, an optional shadow version, the
//! previous stable versions rollback returns to, and a running rollout, if any. It is
//! persisted (atomically) so a restart serves — and rolls out — the same way.
//!
//! # Stable and candidate
//! The first ready version a model ever has becomes its stable version; after that a new
//! version is a *candidate*: it loads, warms, passes its golden set and is ready, yet takes
//! only the traffic it is given (a pin, a split, a shadow, a rollout's canary steps) until it
//! is promoted — by an operator (`promote`), by a rollout that walked every step, or at once
//! with `promote = "auto"`. Rollback always returns to the stable version (a canary or split
//! is stopped) or, with none running, to the previous stable version. The stable version,
//! the last previous one and every version traffic names stay loaded whatever the version
//! policy selects.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use quiver_core::telemetry;
use quiver_core::Schema;
use serde::{Deserialize, Serialize};

use crate::batcher::Batcher;
use crate::repository::{self, LoadedVersion, ModelSpec, Promote};
use crate::rollout::{self, Decision, Outcomes, Phase, RolloutState, Verdict};

/// How many previous defaults rollback can walk back through.
const HISTORY_MAX: usize = 16;
/// Split weights are whole numbers summing to at most this (a percentage or per-mille split
/// fits; sticky buckets are `hash(key) % total`).
const WEIGHT_TOTAL_MAX: u32 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Ready,
    Failed,
}

/// Metric handles of one version, registered once at load so a predict records without
/// looking labels up.
#[derive(Clone)]
pub struct VersionMetrics {
    pub gather: metrics::Histogram,
    pub compute: metrics::Histogram,
    pub batch_size: metrics::Histogram,
    pub executions: metrics::Counter,
    pub inferences: metrics::Counter,
}

impl VersionMetrics {
    fn new(model: &str, version: u64) -> VersionMetrics {
        let labels = [
            ("model", model.to_string()),
            ("version", version.to_string()),
        ];
        VersionMetrics {
            gather: metrics::histogram!(telemetry::MODEL_GATHER_SECONDS, &labels),
            compute: metrics::histogram!(telemetry::MODEL_COMPUTE_SECONDS, &labels),
            batch_size: metrics::histogram!(telemetry::MODEL_BATCH_SIZE, &labels),
            executions: metrics::counter!(telemetry::MODEL_EXECUTIONS_TOTAL, &labels),
            inferences: metrics::counter!(telemetry::MODEL_INFERENCES_TOTAL, &labels),
        }
    }
}

/// One version as served: its model if it loaded, and the last error seen for it.
pub struct Version {
    pub version: u64,
    pub loaded: Option<Arc<LoadedVersion>>,
    pub batcher: Option<Arc<Batcher>>,
    pub metrics: VersionMetrics,
    /// The last load error of this version (a later good load clears it).
    pub error: Option<String>,
    /// What its predictions and shadow comparisons did (for rollouts).
    pub outcomes: Arc<Outcomes>,
    fingerprint: u64,
}

impl Version {
    pub fn status(&self) -> Status {
        if self.loaded.is_some() {
            Status::Ready
        } else {
            Status::Failed
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// The stable version. `None` until the model first has a ready version.
    #[serde(default)]
    pub default: Option<u64>,
    /// (version, weight), sticky per entity key. Empty: everything to the stable version.
    #[serde(default)]
    pub split: Vec<(u64, u32)>,
    #[serde(default)]
    pub shadow: Option<u64>,
    /// Previous stable versions, most recent last.
    #[serde(default)]
    pub history: Vec<u64>,
    /// The current or last rollout.
    #[serde(default)]
    pub rollout: Option<RolloutState>,
    /// Candidates rolled back: neither a rollout nor `promote = "auto"` takes them up again.
    #[serde(default)]
    pub rejected: Vec<u64>,
}

impl Traffic {
    /// Versions this traffic needs loaded.
    fn named(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .default
            .into_iter()
            .chain(self.history.last().copied())
            .collect();
        v.extend(self.split.iter().map(|s| s.0));
        v.extend(self.shadow);
        v.extend(
            self.rollout
                .as_ref()
                .filter(|r| r.phase == Phase::Running)
                .map(|r| r.candidate),
        );
        v
    }

    fn make_stable(&mut self, v: u64) {
        if let Some(old) = self.default.filter(|&old| old != v) {
            push_history(&mut self.history, old);
        }
        self.default = Some(v);
    }
}

/// What a rollback did: the version now answering, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    pub version: u64,
    pub reason: String,
}

/// One model as served.
pub struct Served {
    pub name: String,
    /// `None` if the config never loaded.
    pub spec: Option<Arc<ModelSpec>>,
    pub versions: BTreeMap<u64, Version>,
    pub traffic: Traffic,
    /// A config error (the previous spec, if any, keeps serving).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no model {0:?}")]
    UnknownModel(String),
    #[error("model {0:?} has no version {1}")]
    UnknownVersion(String, u64),
    #[error("model {0:?} version {1} is not ready: {2}")]
    VersionNotReady(String, u64, String),
    #[error("model {0:?} has no ready version")]
    NotReady(String),
}

impl Served {
    fn ready(&self, v: u64) -> Option<&Version> {
        self.versions.get(&v).filter(|x| x.loaded.is_some())
    }

    /// The version that answers when nothing else decides: the stable version if it is
    /// ready; else the latest earlier stable version that is; else the newest ready version
    /// older than the stable one. Never a version newer than the stable one: an untested
    /// candidate does not take over because the stable version failed. (No stable version
    /// yet: the newest ready.)
    pub fn default_version(&self) -> Option<u64> {
        let newest_ready = |below: u64| {
            self.versions
                .range(..below)
                .rev()
                .find(|(_, v)| v.loaded.is_some())
                .map(|(v, _)| *v)
        };
        let Some(stable) = self.traffic.default else {
            return newest_ready(u64::MAX);
        };
        if self.ready(stable).is_some() {
            return Some(stable);
        }
        self.traffic
            .history
            .iter()
            .rev()
            .find(|v| self.ready(**v).is_some())
            .copied()
            .or_else(|| newest_ready(stable))
    }

    /// The same model in a new snapshot (versions shared, traffic copied).
    fn copy(&self) -> Served {
        Served {
            name: self.name.clone(),
            spec: self.spec.clone(),
            versions: self.versions.iter().map(|(v, x)| (*v, x.share())).collect(),
            traffic: self.traffic.clone(),
            error: self.error.clone(),
        }
    }

    /// Whether `v` is a ready version other than the stable one.
    pub fn is_candidate(&self, v: u64) -> bool {
        self.ready(v).is_some() && self.default_version() != Some(v)
    }

    /// The version that answers a request: `pin` if given; else the split's pick for
    /// `sticky_key` (the same key always lands on the same version while the split stands);
    /// else the default.
    pub fn route(&self, pin: Option<u64>, sticky_key: &str) -> Result<&Version, RouteError> {
        if let Some(v) = pin {
            return match self.versions.get(&v) {
                None => Err(RouteError::UnknownVersion(self.name.clone(), v)),
                Some(x) if x.loaded.is_none() => Err(RouteError::VersionNotReady(
                    self.name.clone(),
                    v,
                    x.error.clone().unwrap_or_default(),
                )),
                Some(x) => Ok(x),
            };
        }
        if let Some(v) = split_pick(&self.traffic.split, sticky_key) {
            if let Some(x) = self.ready(v) {
                return Ok(x);
            }
        }
        self.default_version()
            .and_then(|v| self.ready(v))
            .ok_or_else(|| RouteError::NotReady(self.name.clone()))
    }

    /// The shadow version, if one is set, ready, and not the version that answered.
    pub fn shadow(&self, primary: u64) -> Option<&Version> {
        self.traffic
            .shadow
            .filter(|&s| s != primary)
            .and_then(|s| self.ready(s))
    }
}

/// The split's version for `key`: `hash(key) mod total weight` walks the cumulative weights,
/// so a key's bucket never changes and each version gets its weight's share of keys.
pub fn split_pick(split: &[(u64, u32)], key: &str) -> Option<u64> {
    let total: u64 = split.iter().map(|s| u64::from(s.1)).sum();
    if total == 0 {
        return None;
    }
    let mut bucket = xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), 0x5155_4956) % total;
    for &(v, w) in split {
        if bucket < u64::from(w) {
            return Some(v);
        }
        bucket -= u64::from(w);
    }
    unreachable!("bucket < total weight")
}

pub type Snapshot = BTreeMap<String, Arc<Served>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrafficError {
    #[error("no model {0:?}")]
    UnknownModel(String),
    #[error("{0}")]
    Invalid(String),
    #[error("nothing to roll back to: {0}")]
    NoRollback(String),
    #[error("cannot persist the traffic state: {0}")]
    Persist(String),
}

/// A change to one model's traffic (`PUT /v1/models/{m}/traffic`); absent fields keep their
/// value, `clear_shadow` removes the shadow.
#[derive(Debug, Clone, Default)]
pub struct TrafficUpdate {
    pub default: Option<u64>,
    pub split: Option<Vec<(u64, u32)>>,
    pub shadow: Option<u64>,
    pub clear_shadow: bool,
}

/// Told of every rollout decision once it is in effect (the audit trail listens).
pub type Observer = Arc<dyn Fn(&str, &Decision) + Send + Sync>;

pub struct Registry {
    observer: RwLock<Option<Observer>>,
    dir: PathBuf,
    schema: Arc<Schema>,
    warmup_rows: usize,
    /// Where traffic state persists (`None`: in memory only).
    traffic_path: Option<PathBuf>,
    current: RwLock<Arc<Snapshot>>,
    /// Serializes writers (the poller and the admin endpoints); readers never take it.
    write: Mutex<()>,
}

impl Registry {
    /// Loads the repository (first poll) and the persisted traffic state.
    pub fn open(
        dir: &Path,
        schema: Arc<Schema>,
        warmup_rows: usize,
        traffic_path: Option<PathBuf>,
    ) -> Registry {
        let persisted: HashMap<String, Traffic> = traffic_path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| match serde_json::from_slice(&b) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::error!(error = %e, "traffic state unreadable; starting from defaults");
                    None
                }
            })
            .unwrap_or_default();
        let initial: Snapshot = persisted
            .into_iter()
            .map(|(name, mut traffic): (String, Traffic)| {
                // Nothing was observed while Quiver was down: a running step starts again.
                if let Some(r) = traffic
                    .rollout
                    .as_mut()
                    .filter(|r| r.phase == Phase::Running)
                {
                    r.step_started_ms = quiver_core::time::now_ms();
                }
                let served = Served {
                    name: name.clone(),
                    spec: None,
                    versions: BTreeMap::new(),
                    traffic,
                    error: None,
                };
                (name, Arc::new(served))
            })
            .collect();
        let registry = Registry {
            observer: RwLock::new(None),
            dir: dir.to_path_buf(),
            schema,
            warmup_rows,
            traffic_path,
            current: RwLock::new(Arc::new(initial)),
            write: Mutex::new(()),
        };
        registry.poll();
        registry
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.read().clone()
    }

    pub fn set_observer(&self, observer: Observer) {
        *self.observer.write() = Some(observer);
    }

    /// Swaps in `next` and tells the observer of every rollout decision it carries that `old`
    /// did not.
    fn swap(&self, old: &Snapshot, next: Snapshot) {
        let news: Vec<(String, Decision)> = next
            .iter()
            .filter_map(|(name, m)| Some((name, m.traffic.rollout.as_ref()?)))
            .flat_map(|(name, r)| {
                let before = old.get(name).and_then(|o| o.traffic.rollout.as_ref());
                r.history
                    .iter()
                    .filter(move |d| before.is_none_or(|b| !b.history.contains(d)))
                    .map(move |d| (name.clone(), d.clone()))
            })
            .collect();
        *self.current.write() = Arc::new(next);
        if let Some(o) = self.observer.read().as_ref() {
            for (name, d) in &news {
                o(name, d);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Served>> {
        self.current.read().get(name).cloned()
    }

    /// Why the registry cannot serve yet: a model whose config loaded has no ready default.
    pub fn not_ready_reason(&self) -> Option<String> {
        let snap = self.snapshot();
        snap.values()
            .find(|m| m.spec.is_some() && m.default_version().is_none())
            .map(|m| format!("model {:?} has no ready version", m.name))
    }

    /// Scans the repository once: loads new and changed versions (warm-up included), drops
    /// versions the policy no longer selects, and swaps in the result.
    pub fn poll(&self) {
        let _w = self.write.lock();
        let old = self.snapshot();
        let mut next: Snapshot = BTreeMap::new();
        for (name, dir) in repository::model_dirs(&self.dir) {
            let prev = old.get(&name);
            let served = self.poll_model(&name, &dir, prev.map(|p| p.as_ref()));
            next.insert(name, Arc::new(served));
        }
        // Traffic of models that vanished is kept (they may come back, e.g. mid-deploy).
        for (name, m) in old.iter() {
            if !next.contains_key(name) && m.traffic != Traffic::default() {
                next.insert(
                    name.clone(),
                    Arc::new(Served {
                        name: name.clone(),
                        spec: None,
                        versions: BTreeMap::new(),
                        traffic: m.traffic.clone(),
                        error: None,
                    }),
                );
            }
        }
        for m in next.values() {
            let ready = m.versions.values().filter(|v| v.loaded.is_some()).count();
            metrics::gauge!(telemetry::MODEL_VERSIONS_READY, "model" => m.name.clone())
                .set(ready as f64);
        }
        let changed_traffic = next
            .iter()
            .any(|(n, m)| old.get(n).is_none_or(|o| o.traffic != m.traffic));
        self.swap(&old, next);
        if changed_traffic {
            if let Err(e) = self.persist() {
                tracing::error!(error = %e, "traffic state not persisted");
            }
        }
    }

    fn poll_model(&self, name: &str, dir: &Path, prev: Option<&Served>) -> Served {
        let traffic = prev.map(|p| p.traffic.clone()).unwrap_or_default();
        let spec = match repository::load_spec(dir, name, &self.schema) {
            Ok(spec) => match prev.and_then(|p| p.spec.as_ref()) {
                Some(old) if old.fingerprint == spec.fingerprint => old.clone(),
                _ => Arc::new(spec),
            },
            Err(message) => {
                load_error(name, None, &message);
                // The previous spec and versions keep serving.
                return match prev {
                    Some(p) if p.spec.is_some() => Served {
                        name: name.to_string(),
                        spec: p.spec.clone(),
                        versions: p.versions.iter().map(|(v, x)| (*v, x.share())).collect(),
                        traffic,
                        error: Some(message),
                    },
                    _ => Served {
                        name: name.to_string(),
                        spec: None,
                        versions: BTreeMap::new(),
                        traffic,
                        error: Some(message),
                    },
                };
            }
        };
        let same_spec = prev
            .and_then(|p| p.spec.as_ref())
            .is_some_and(|s| Arc::ptr_eq(s, &spec));
        let on_disk = repository::version_dirs(dir, spec.runtime);
        let available: Vec<u64> = on_disk.iter().map(|v| v.0).collect();
        let mut selected = spec.policy.select(&available);
        // Whatever the policy says, what traffic names stays loaded (the stable version, the
        // one rollback returns to, a canary, a shadow).
        selected.extend(
            traffic
                .named()
                .into_iter()
                .filter(|v| available.contains(v)),
        );
        let mut versions = BTreeMap::new();
        for (v, file, fingerprint) in on_disk.iter().filter(|v| selected.contains(&v.0)) {
            let before = prev.and_then(|p| p.versions.get(v));
            if let Some(b) = before {
                if same_spec && b.fingerprint == *fingerprint {
                    versions.insert(*v, b.share());
                    continue;
                }
            }
            let version = match repository::load_version(&spec, *v, file, self.warmup_rows) {
                Ok(loaded) => {
                    let batcher = spec
                        .batching
                        .as_ref()
                        .map(|b| Arc::new(Batcher::start(name, *v, loaded.model.clone(), b)));
                    Version {
                        version: *v,
                        loaded: Some(Arc::new(loaded)),
                        batcher,
                        metrics: VersionMetrics::new(name, *v),
                        error: None,
                        outcomes: Arc::default(),
                        fingerprint: *fingerprint,
                    }
                }
                Err(message) => {
                    load_error(name, Some(*v), &message);
                    // A broken rewrite of a serving version leaves the old load serving (only
                    // when the inputs have not changed under it).
                    let keep = before.filter(|_| same_spec).and_then(|b| b.loaded.clone());
                    Version {
                        version: *v,
                        batcher: before
                            .filter(|_| keep.is_some())
                            .and_then(|b| b.batcher.clone()),
                        metrics: VersionMetrics::new(name, *v),
                        outcomes: before.map_or_else(Arc::default, |b| b.outcomes.clone()),
                        loaded: keep,
                        error: Some(message),
                        fingerprint: *fingerprint,
                    }
                }
            };
            versions.insert(*v, version);
        }
        let mut served = Served {
            name: name.to_string(),
            spec: Some(spec),
            versions,
            traffic,
            error: None,
        };
        settle(&mut served, quiver_core::time::now_ms());
        served
    }

    /// Applies a traffic change after checking every version it names is ready.
    pub fn set_traffic(&self, name: &str, update: TrafficUpdate) -> Result<Traffic, TrafficError> {
        self.change_traffic(name, |m| {
            let ready = |v: u64, what: &str| {
                if m.ready(v).is_some() {
                    Ok(())
                } else {
                    Err(TrafficError::Invalid(format!(
                        "{what}: version {v} of {name:?} is not ready"
                    )))
                }
            };
            let mut t = m.traffic.clone();
            if let Some(d) = update.default {
                ready(d, "default")?;
                t.make_stable(d);
            }
            if let Some(split) = update.split {
                let total: u64 = split.iter().map(|s| u64::from(s.1)).sum();
                if !split.is_empty() && (total == 0 || total > u64::from(WEIGHT_TOTAL_MAX)) {
                    return Err(TrafficError::Invalid(format!(
                        "split weights must sum to 1..={WEIGHT_TOTAL_MAX}"
                    )));
                }
                for &(v, w) in &split {
                    if w > 0 {
                        ready(v, "split")?;
                    }
                }
                t.split = split.into_iter().filter(|s| s.1 > 0).collect();
            }
            if update.clear_shadow {
                t.shadow = None;
            }
            if let Some(s) = update.shadow {
                ready(s, "shadow")?;
                t.shadow = Some(s);
            }
            Ok(t)
        })
    }

    /// One-call rollback to the stable version: a running rollout or split is stopped (the
    /// stable version takes all traffic again); with neither, the stable version itself
    /// returns to the previous stable version. Says which version answers now, and why.
    pub fn rollback(&self, name: &str) -> Result<(Traffic, RolledBack), TrafficError> {
        let mut outcome = None;
        let traffic = self.change_served(name, |m| {
            let now = quiver_core::time::now_ms();
            let running = m.traffic.rollout.as_ref().is_some_and(|r| r.phase == Phase::Running);
            let stable = m.default_version();
            if running || !m.traffic.split.is_empty() {
                let canary = m.traffic.split.iter().map(|s| s.0).filter(|&v| Some(v) != stable).collect::<Vec<_>>();
                if running {
                    end_rollout(m, Phase::RolledBack, "rolled back by an operator", now);
                }
                m.traffic.split.clear();
                let stable = stable.ok_or_else(|| TrafficError::NoRollback(format!("{name:?} has no ready stable version")))?;
                outcome = Some(RolledBack {
                    version: stable,
                    reason: format!("stopped the canary of {canary:?}: every request goes to stable version {stable}"),
                });
                return Ok(());
            }
            let current = stable;
            let previous = loop {
                match m.traffic.history.pop() {
                    Some(v) if Some(v) != current && m.ready(v).is_some() => break v,
                    Some(_) => continue,
                    None => return Err(TrafficError::NoRollback(format!("{name:?} has no earlier ready stable version"))),
                }
            };
            if let Some(c) = current {
                if !m.traffic.rejected.contains(&c) {
                    m.traffic.rejected.push(c);
                }
            }
            m.traffic.default = Some(previous);
            outcome = Some(RolledBack {
                version: previous,
                reason: format!("stable version {} rolled back to the previous stable version {previous}", current.map_or("-".into(), |c| c.to_string())),
            });
            decided(name, "rollback", previous, 0, "rolled back by an operator");
            Ok(())
        })?;
        Ok((traffic, outcome.expect("set on success")))
    }

    /// Makes `version` (ready) the stable version; a rollout of it ends promoted, any other
    /// running rollout or split ends (the new stable version takes all traffic).
    pub fn promote(&self, name: &str, version: u64) -> Result<Traffic, TrafficError> {
        self.change_served(name, |m| {
            if m.ready(version).is_none() {
                return Err(TrafficError::Invalid(format!(
                    "version {version} of {name:?} is not ready"
                )));
            }
            let now = quiver_core::time::now_ms();
            match m
                .traffic
                .rollout
                .as_ref()
                .filter(|r| r.phase == Phase::Running)
            {
                Some(r) if r.candidate == version => {
                    end_rollout(m, Phase::Promoted, "promoted by an operator", now)
                }
                Some(_) => end_rollout(
                    m,
                    Phase::RolledBack,
                    &format!("superseded: version {version} promoted by an operator"),
                    now,
                ),
                None => decided(name, "promote", version, 100, "promoted by an operator"),
            }
            m.traffic.make_stable(version);
            m.traffic.rejected.retain(|&v| v != version);
            m.traffic.split.clear();
            if m.traffic.shadow == Some(version) {
                m.traffic.shadow = None;
            }
            Ok(())
        })
    }

    /// Advances, promotes or rolls back every running rollout as its canary analysis says.
    /// Called every `ROLLOUT_TICK` by the node; swaps and persists only when a rollout moved.
    pub fn rollout_tick(&self, now_ms: i64) {
        let _w = self.write.lock();
        let snap = self.snapshot();
        let mut next: Option<Snapshot> = None;
        for (name, m) in snap.iter() {
            if !m
                .traffic
                .rollout
                .as_ref()
                .is_some_and(|r| r.phase == Phase::Running)
            {
                continue;
            }
            let mut copy = m.copy();
            if tick(&mut copy, now_ms) {
                next.get_or_insert_with(|| (*snap).clone())
                    .insert(name.clone(), Arc::new(copy));
            }
        }
        if let Some(next) = next {
            self.swap(&snap, next);
            if let Err(e) = self.persist() {
                tracing::error!(error = %e, "traffic state not persisted after a rollout step");
            }
        }
    }

    /// [`change_traffic`](Self::change_traffic) for changes that need the whole served model.
    fn change_served(
        &self,
        name: &str,
        change: impl FnOnce(&mut Served) -> Result<(), TrafficError>,
    ) -> Result<Traffic, TrafficError> {
        self.change_traffic(name, |m| {
            let mut copy = m.copy();
            change(&mut copy)?;
            Ok(copy.traffic)
        })
    }

    /// Under the writer lock: computes a model's new traffic from its current state, swaps
    /// in a snapshot carrying it, and persists.
    fn change_traffic(
        &self,
        name: &str,
        change: impl FnOnce(&Served) -> Result<Traffic, TrafficError>,
    ) -> Result<Traffic, TrafficError> {
        let _w = self.write.lock();
        let snap = self.snapshot();
        let m = snap
            .get(name)
            .filter(|m| m.spec.is_some())
            .ok_or_else(|| TrafficError::UnknownModel(name.to_string()))?;
        let traffic = change(m)?;
        let updated = Served {
            name: m.name.clone(),
            spec: m.spec.clone(),
            versions: m.versions.iter().map(|(v, x)| (*v, x.share())).collect(),
            traffic: traffic.clone(),
            error: m.error.clone(),
        };
        let mut next = (*snap).clone();
        next.insert(name.to_string(), Arc::new(updated));
        self.swap(&snap, next);
        self.persist()?;
        Ok(traffic)
    }

    /// Writes every model's traffic to `traffic_path` (temp file, fsync, rename, fsync dir).
    fn persist(&self) -> Result<(), TrafficError> {
        let Some(path) = &self.traffic_path else {
            return Ok(());
        };
        let all: BTreeMap<String, Traffic> = self
            .snapshot()
            .iter()
            .filter(|(_, m)| m.traffic != Traffic::default())
            .map(|(n, m)| (n.clone(), m.traffic.clone()))
            .collect();
        let fail = |e: std::io::Error| TrafficError::Persist(e.to_string());
        let bytes = serde_json::to_vec_pretty(&all).expect("traffic serializes");
        quiver_fsutil::write_atomic(path, &bytes).map_err(fail)
    }
}

impl Version {
    /// The same version in a new snapshot (models and batchers are shared, not reloaded).
    fn share(&self) -> Version {
        Version {
            version: self.version,
            loaded: self.loaded.clone(),
            batcher: self.batcher.clone(),
            metrics: self.metrics.clone(),
            error: self.error.clone(),
            outcomes: self.outcomes.clone(),
            fingerprint: self.fingerprint,
        }
    }
}

/// What a poll decides about who serves: the first stable version, `promote = "auto"`, a
/// rollout starting for a new candidate or ending because its candidate is gone.
fn settle(m: &mut Served, now_ms: i64) {
    let Some(spec) = m.spec.clone() else { return };
    let newest = m
        .versions
        .values()
        .rev()
        .find(|v| v.loaded.is_some() && !m.traffic.rejected.contains(&v.version))
        .map(|v| v.version);
    let Some(newest) = newest else { return };
    let Some(stable) = m.traffic.default else {
        tracing::info!(
            model = m.name,
            version = newest,
            "first ready version is stable"
        );
        m.traffic.default = Some(newest);
        return;
    };
    let running = m
        .traffic
        .rollout
        .as_ref()
        .filter(|r| r.phase == Phase::Running)
        .cloned();
    if let Some(r) = &running {
        if m.ready(r.candidate).is_none() {
            let reason = format!("candidate {} is no longer ready", r.candidate);
            end_rollout(m, Phase::RolledBack, &reason, now_ms);
        }
        return;
    }
    if newest <= stable || m.ready(stable).is_none() {
        return;
    }
    match (spec.promote, &spec.rollout) {
        (Promote::Auto, _) => {
            tracing::info!(
                model = m.name,
                version = newest,
                previous = stable,
                "promote = auto: newest ready version is stable"
            );
            m.traffic.make_stable(newest);
        }
        (Promote::Manual, Some(cfg)) => {
            let done = m
                .traffic
                .rollout
                .as_ref()
                .is_some_and(|r| r.candidate == newest);
            if !done {
                start_rollout(m, cfg, newest, stable, now_ms);
            }
        }
        (Promote::Manual, None) => {}
    }
}

fn start_rollout(
    m: &mut Served,
    cfg: &rollout::RolloutConfig,
    candidate: u64,
    stable: u64,
    now_ms: i64,
) {
    let mut state = RolloutState {
        candidate,
        stable,
        phase: Phase::Running,
        step: 0,
        step_started_ms: now_ms,
        history: m
            .traffic
            .rollout
            .take()
            .map(|r| r.history)
            .unwrap_or_default(),
    };
    let percent = state.percent(cfg);
    state.record(Decision {
        at_ms: now_ms,
        action: "start".into(),
        version: candidate,
        percent,
        reason: format!("version {candidate} is ready; canary of stable {stable}"),
    });
    m.traffic.split = canary_split(stable, candidate, percent);
    m.traffic.shadow = Some(candidate);
    m.traffic.rollout = Some(state);
    reset_outcomes(m, &[stable, candidate]);
    decided(
        &m.name,
        "start",
        candidate,
        percent,
        "a new candidate is ready",
    );
}

fn canary_split(stable: u64, candidate: u64, percent: u32) -> Vec<(u64, u32)> {
    vec![
        (stable, 100 - percent.min(100)),
        (candidate, percent.min(100)),
    ]
    .into_iter()
    .filter(|s| s.1 > 0)
    .collect()
}

fn reset_outcomes(m: &Served, versions: &[u64]) {
    for v in versions {
        if let Some(x) = m.versions.get(v) {
            x.outcomes.reset();
        }
    }
}

/// Ends the running rollout: promoted (the candidate becomes stable) or rolled back (the
/// stable version takes all traffic again, the candidate is never started again).
fn end_rollout(m: &mut Served, phase: Phase, reason: &str, now_ms: i64) {
    let Some(mut r) = m.traffic.rollout.take() else {
        return;
    };
    let candidate = r.candidate;
    r.phase = phase;
    let action = match phase {
        Phase::Promoted => {
            m.traffic.make_stable(candidate);
            "promote"
        }
        _ => {
            if !m.traffic.rejected.contains(&candidate) {
                m.traffic.rejected.push(candidate);
            }
            "rollback"
        }
    };
    m.traffic.split.clear();
    if m.traffic.shadow == Some(candidate) {
        m.traffic.shadow = None;
    }
    let percent = if phase == Phase::Promoted { 100 } else { 0 };
    r.record(Decision {
        at_ms: now_ms,
        action: action.into(),
        version: candidate,
        percent,
        reason: reason.to_string(),
    });
    m.traffic.rollout = Some(r);
    decided(&m.name, action, candidate, percent, reason);
}

/// Every decision is a metric and a log line.
fn decided(model: &str, action: &'static str, version: u64, percent: u32, reason: &str) {
    metrics::counter!(telemetry::ROLLOUT_DECISIONS_TOTAL, "model" => model.to_string(), "action" => action)
        .increment(1);
    metrics::gauge!(telemetry::ROLLOUT_CANDIDATE_PERCENT, "model" => model.to_string()).set(
        if action == "promote" || action == "rollback" {
            0.0
        } else {
            f64::from(percent)
        },
    );
    if action == "rollback" {
        tracing::warn!(model, version, percent, reason, "rollout {action}");
    } else {
        tracing::info!(model, version, percent, reason, "rollout {action}");
    }
}

/// One controller step of a running rollout (see `rollout::decide`).
fn tick(m: &mut Served, now_ms: i64) -> bool {
    let (Some(spec), Some(r)) = (m.spec.clone(), m.traffic.rollout.clone()) else {
        return false;
    };
    let Some(cfg) = spec.rollout.as_ref().filter(|_| r.phase == Phase::Running) else {
        return false;
    };
    let (Some(c), Some(s)) = (m.versions.get(&r.candidate), m.versions.get(&r.stable)) else {
        return false;
    };
    match rollout::decide(
        cfg,
        &r,
        now_ms,
        &c.outcomes.summary(),
        &s.outcomes.summary(),
    ) {
        Verdict::Stay => false,
        Verdict::Rollback(reason) => {
            end_rollout(m, Phase::RolledBack, &reason, now_ms);
            true
        }
        Verdict::Advance => {
            let next = r.step + 1;
            match cfg.steps.get(next).copied().filter(|&p| p < 100) {
                None => end_rollout(
                    m,
                    Phase::Promoted,
                    "walked every step within bounds",
                    now_ms,
                ),
                Some(percent) => {
                    let state = m.traffic.rollout.as_mut().expect("running");
                    state.step = next;
                    state.step_started_ms = now_ms;
                    state.record(Decision {
                        at_ms: now_ms,
                        action: "advance".into(),
                        version: r.candidate,
                        percent,
                        reason: "the last step stayed within bounds".into(),
                    });
                    m.traffic.split = canary_split(r.stable, r.candidate, percent);
                    reset_outcomes(m, &[r.stable, r.candidate]);
                    decided(
                        &m.name,
                        "advance",
                        r.candidate,
                        percent,
                        "the last step stayed within bounds",
                    );
                }
            }
            true
        }
    }
}

fn push_history(history: &mut Vec<u64>, v: u64) {
    history.push(v);
    if history.len() > HISTORY_MAX {
        history.remove(0);
    }
}

fn load_error(model: &str, version: Option<u64>, message: &str) {
    tracing::error!(model, version, error = message, "model not loaded");
    metrics::counter!(telemetry::MODEL_LOAD_ERRORS_TOTAL, "model" => model.to_string())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_sticky_and_proportional() {
        let split = [(1, 90), (2, 10)];
        let mut twos = 0;
        for i in 0..20_000 {
            let key = format!("user-{i}");
            let v = split_pick(&split, &key).unwrap();
            assert_eq!(split_pick(&split, &key), Some(v), "same key, same version");
            twos += usize::from(v == 2);
        }
        // 10% of 20k = 2000; binomial sd ≈ 42.
        assert!(
            (1800..2200).contains(&twos),
            "{twos} of 20000 on the 10% version"
        );
        assert_eq!(split_pick(&[], "k"), None);
        assert_eq!(split_pick(&[(3, 0)], "k"), None);
        assert_eq!(split_pick(&[(3, 0), (4, 1)], "k"), Some(4));
    }
}
