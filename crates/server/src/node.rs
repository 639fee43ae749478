//! A running Quiver node without its HTTP surface: log, store, materializers, idempotency
//! table and housekeeping, opened from a config. The binary serves it over HTTP; benchmarks
//! and tests may drive it directly.

use std::sync::Arc;
use std::time::Duration;

use quiver_core::config::FsyncPolicy;
use quiver_core::event::EventLimits;
use quiver_core::{Config, Schema};
use quiver_log::{Log, LogOptions};
use quiver_store::materializer::{MaterializerOptions, Materializers};
use quiver_store::Store;

use crate::idempotency::IdempotencyStore;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] quiver_core::config::ConfigError),
    #[error(transparent)]
    Log(#[from] quiver_log::LogError),
    #[error(transparent)]
    Store(#[from] quiver_store::StoreError),
    #[error(transparent)]
    History(#[from] quiver_connect::history::HistoryError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

pub struct Node {
    pub config: Config,
    /// Models from `models.repository`, loaded at start.
    pub models: std::collections::BTreeMap<String, quiver_model::repository::LoadedModel>,
    /// Models the repository holds but that did not load (bad config, file or inputs).
    pub model_errors: Vec<quiver_model::repository::RepositoryError>,
    /// The PostgreSQL history sink, when `history.postgres_url` is set.
    pub history: Option<quiver_connect::history::HistorySink>,
    pub schema: Arc<Schema>,
    pub log: Arc<Log>,
    pub store: Arc<Store>,
    pub materializers: Materializers,
    pub idempotency: IdempotencyStore,
    pub limits: EventLimits,
}

impl Node {
    pub fn open(config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        let schema = Arc::new(Schema::compile(&config)?);
        let data = &config.server.data_dir;
        std::fs::create_dir_all(data).map_err(|e| NodeError::Io(data.display().to_string(), e))?;
        let log = Arc::new(Log::open(
            &data.join("log"),
            LogOptions::from_config(&config),
        )?);
        let store = Arc::new(Store::new(schema.clone(), config.log.partitions));
        let materializers = Materializers::start(
            store.clone(),
            log.clone(),
            MaterializerOptions {
                snapshot_dir: data.join("snapshots"),
                snapshot_interval: config.store.snapshot_interval.0,
                dedup_window_events: config.store.dedup_window_events,
                poll_records_max: 4096,
            },
        )?;
        let journal = data.join("idempotency.journal");
        let idempotency = IdempotencyStore::open(
            Some(&journal),
            config.ingest.idempotency_keys_max,
            config.ingest.idempotency_ttl.as_ms(),
            config.log.fsync != FsyncPolicy::Never,
            quiver_core::time::now_ms(),
        )
        .map_err(|e| NodeError::Io(journal.display().to_string(), e))?;
        let limits = EventLimits {
            batch_events_max: config.limits.batch_events_max,
            key_bytes_max: config.limits.key_bytes_max,
            event_id_bytes_max: config.limits.event_id_bytes_max,
            string_bytes_max: config.limits.string_bytes_max,
        };
        let history = match quiver_connect::history::HistoryOptions::from_config(&config.history) {
            Some(opts) => Some(quiver_connect::history::HistorySink::start(
                log.clone(),
                opts,
            )?),
            None => None,
        };
        let (models, model_errors) =
            quiver_model::repository::load(&config.models.repository, &schema);
        for e in &model_errors {
            tracing::error!(error = %e, "model not loaded");
        }
        Ok(Node {
            config,
            models,
            model_errors,
            history,
            schema,
            log,
            store,
            materializers,
            idempotency,
            limits,
        })
    }

    /// Why the node cannot serve reads yet (or any more), if it cannot.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(p) = self.log.poisoned() {
            return Some(format!("log poisoned: {p}"));
        }
        let errors = self.materializers.errors();
        if !errors.is_empty() {
            return Some(format!("materializer stopped: {}", errors.join("; ")));
        }
        if !self.store.is_recovered() {
            return Some("recovering: replaying the log into the store".into());
        }
        None
    }

    /// Deletes log segments past retention that the store no longer needs. Run periodically.
    pub fn housekeeping(&self) {
        let store = self.store.clone();
        if let Err(e) = self
            .log
            .enforce_retention(quiver_core::time::now_ms(), |p| store.snapshot_offset(p))
        {
            tracing::error!(error = %e, "retention failed");
        }
    }

    /// Stops the consumers (history sink, materializers with their final snapshots), then
    /// the log writers.
    pub fn shutdown(&self) {
        if let Some(h) = &self.history {
            h.shutdown();
        }
        self.materializers.shutdown();
        self.log.shutdown();
    }
}

pub const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);
