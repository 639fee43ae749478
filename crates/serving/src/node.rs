//! A running Quiver node without its HTTP surface: log, store, materializers, idempotency
//! table and housekeeping, opened from a config. The binary serves it over HTTP; benchmarks
//! and tests may drive it directly.

use std::sync::Arc;

use parking_lot::Mutex;

use quiver_core::config::FsyncPolicy;
use quiver_core::event::EventLimits;
use quiver_core::{Config, Schema};
use quiver_fsutil::seal::KeyRing;
use quiver_log::{EventLog, Log, LogOptions};
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
    #[error("storage.encryption_key_file: {0}")]
    Seal(#[from] quiver_fsutil::seal::SealError),
}

pub struct Node {
    pub config: Config,
    /// The served models of `models.repository`, kept current by a poller thread.
    pub models: Arc<quiver_model::registry::Registry>,
    /// Copies of predictions for shadow versions (bounded; never delays a response).
    pub shadow: quiver_model::shadow::ShadowQueue,
    /// Prediction caches, per model (created on first use when the model's config asks).
    pub caches:
        parking_lot::RwLock<std::collections::HashMap<String, Arc<crate::cache::ModelCache>>>,
    model_poller: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Steps every running rollout (`ROLLOUT_TICK`).
    rollouts: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// The PostgreSQL history sink, when `history.postgres_url` is set.
    pub history: Option<quiver_connect::history::HistorySink>,
    /// Point-in-time reads of the history table (pooled connections), with the sink.
    pub history_reader: Option<quiver_connect::history::HistoryReader>,
    pub schema: Arc<Schema>,
    /// The log, embedded or Kafka (`log.backend`): everything below reads it through the trait.
    pub log: Arc<dyn EventLog>,
    pub store: Arc<Store>,
    pub materializers: Materializers,
    pub idempotency: IdempotencyStore,
    pub limits: EventLimits,
    /// The tamper-evident audit trail (`auth.audit_file`): admin actions, key changes,
    /// rollout decisions, refused credentials and grants.
    pub audit: Arc<quiver_auth::audit::AuditLog>,
    /// Membership, placement and peer health when `[cluster]` is set.
    pub cluster: Option<Arc<quiver_cluster::Cluster>>,
    /// How rows served by other nodes are read (set by the surface crate).
    pub(crate) remote: std::sync::OnceLock<Arc<dyn crate::remote::RemoteRows>>,
    /// When the node was opened (the failure detector settles after it).
    pub(crate) started: std::time::Instant,
    /// Running upstream sources (`[[rabbitmq_source]]`), started by [`Node::start_sources`].
    sources: Mutex<Vec<quiver_connect::rabbitmq::RabbitSource>>,
}

/// How often running rollouts are judged (a rollback lands at most this long after the
/// canary crossed a bound).
const ROLLOUT_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Opens the configured log backend: the embedded log in `<data_dir>/log`, or Kafka.
fn open_log(
    config: &Config,
    schema: &Arc<Schema>,
    sealer: Option<Arc<KeyRing>>,
) -> Result<Arc<dyn EventLog>, NodeError> {
    match config.log.backend {
        quiver_core::config::LogBackend::Embedded => Ok(Arc::new(Log::open(
            &config.server.data_dir.join("log"),
            LogOptions {
                sealer,
                ..LogOptions::from_config(config)
            },
        )?)),
        quiver_core::config::LogBackend::Kafka => Ok(quiver_connect::kafka::KafkaLog::open(
            config,
            schema.clone(),
        )?),
    }
}

/// Marks a data directory whose files are sealed: a node started on it without the key
/// refuses to start rather than replay nothing.
const SEALED_MARKER: &str = "ENCRYPTED";

/// The keys that seal data at rest (`[storage] encryption_key_file`; relative: to data_dir).
fn key_ring(config: &Config) -> Result<Option<Arc<KeyRing>>, NodeError> {
    let data = &config.server.data_dir;
    let marker = data.join(SEALED_MARKER);
    let Some(path) = &config.storage.encryption_key_file else {
        if marker.exists() {
            return Err(NodeError::Io(
                data.display().to_string(),
                std::io::Error::other(
                    "its data is encrypted at rest: set [storage] encryption_key_file",
                ),
            ));
        }
        return Ok(None);
    };
    let path = data.join(path); // an absolute path stays as it is
    let ring = KeyRing::load(&path)?;
    let note = b"Files here are sealed with [storage] encryption_key_file (README).\n";
    quiver_fsutil::write_atomic(&marker, note)
        .map_err(|e| NodeError::Io(marker.display().to_string(), e))?;
    tracing::info!(key = ring.sealing_id(), "data at rest is encrypted");
    Ok(Some(Arc::new(ring)))
}

impl Node {
    pub fn open(config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        let schema = Arc::new(Schema::compile(&config)?);
        let data = &config.server.data_dir;
        std::fs::create_dir_all(data).map_err(|e| NodeError::Io(data.display().to_string(), e))?;
        let sealer = key_ring(&config)?;
        let log = open_log(&config, &schema, sealer.clone())?;
        let store = Arc::new(Store::with_streams(
            schema.clone(),
            log.partitions(),
            log.streams().len() as u32,
        ));
        let cluster = config
            .cluster
            .as_ref()
            .map(|c| Arc::new(quiver_cluster::Cluster::new(c, log.partitions())));
        // A cluster node materializes only the partitions it owns; a single node, all.
        let owned: Vec<u32> = match &cluster {
            Some(c) => c.membership().owned(),
            None => (0..log.partitions()).collect(),
        };
        let materializers = Materializers::start_for(
            store.clone(),
            log.clone(),
            MaterializerOptions {
                snapshot_dir: data.join("snapshots"),
                snapshot_interval: config.store.snapshot_interval.0,
                snapshot_change_ratio: config.store.snapshot_change_ratio,
                dedup_window_events: config.store.dedup_window_events,
                poll_records_max: 4096,
                sealer: sealer.clone(),
            },
            &owned,
        )?;
        let journal = data.join("idempotency.journal");
        let idempotency = IdempotencyStore::open(
            Some(&journal),
            config.ingest.idempotency_keys_max,
            config.ingest.idempotency_ttl.as_ms(),
            config.log.fsync != FsyncPolicy::Never,
            quiver_core::time::now_ms(),
            sealer,
        )
        .map_err(|e| NodeError::Io(journal.display().to_string(), e))?;
        let limits = EventLimits::from_config(&config);
        let history = match quiver_connect::history::HistoryOptions::from_config(&config.history) {
            // In a cluster the sinks start once the peers are known (`cluster_tick`).
            Some(opts) => Some(quiver_connect::history::HistorySink::start_for(
                log.clone(),
                opts,
                if cluster.is_some() { &[] } else { &owned },
            )?),
            None => None,
        };
        let audit_path = match &config.auth.audit_file {
            p if p.is_absolute() => p.clone(),
            p => data.join(p),
        };
        let audit = Arc::new(
            quiver_auth::audit::AuditLog::open(&audit_path)
                .map_err(|e| NodeError::Io(e.to_string(), std::io::Error::other("audit trail")))?,
        );
        let models = Arc::new(quiver_model::registry::Registry::open(
            &config.models.repository,
            schema.clone(),
            config.models.warmup_rows,
            Some(data.join("model_traffic.json")),
        ));
        {
            let audit = audit.clone();
            models.set_observer(Arc::new(move |model, d| {
                let detail = format!("version {} at {}%: {}", d.version, d.percent, d.reason);
                audit.record(
                    "rollout",
                    &format!("rollout_{}", d.action),
                    &format!("model:{model}"),
                    "ok",
                    &detail,
                );
            }));
        }
        let rollouts = {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let registry = models.clone();
            let handle = std::thread::Builder::new()
                .name("quiver-rollouts".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(ROLLOUT_TICK)
                    {
                        registry.rollout_tick(quiver_core::time::now_ms());
                    }
                })
                .map_err(|e| NodeError::Io("rollout controller".into(), e))?;
            Mutex::new(Some((stop, handle)))
        };
        let model_poller = {
            let (stop, stopped) = std::sync::mpsc::channel::<()>();
            let registry = models.clone();
            let every = config.models.poll_interval.0;
            let handle = std::thread::Builder::new()
                .name("quiver-models".into())
                .spawn(move || {
                    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                        stopped.recv_timeout(every)
                    {
                        registry.poll();
                    }
                })
                .map_err(|e| NodeError::Io("model poller".into(), e))?;
            Mutex::new(Some((stop, handle)))
        };
        let history_reader = match history.as_ref().and(config.history.postgres_url.as_ref()) {
            None => None,
            Some(url) => {
                let pg = quiver_connect::history::PgEndpoint::new(
                    url,
                    config.history.ca_file.as_deref(),
                )
                .map_err(quiver_connect::history::HistoryError::Setup)?;
                Some(quiver_connect::history::HistoryReader::new(
                    pg,
                    &config.history.table,
                ))
            }
        };
        Ok(Node {
            history_reader,
            shadow: quiver_model::shadow::ShadowQueue::start(config.models.shadow_queue_max),
            caches: Default::default(),
            model_poller,
            rollouts,
            config,
            models,
            history,
            schema,
            log,
            store,
            materializers,
            idempotency,
            limits,
            sources: Mutex::new(Vec::new()),
            audit,
            cluster,
            started: std::time::Instant::now(),
            remote: std::sync::OnceLock::new(),
        })
    }

    /// Starts the configured upstream sources (once the node is shared: they append to it).
    pub fn start_sources(self: &Arc<Self>) -> Result<(), NodeError> {
        let started = crate::sources::start(self)?;
        self.sources.lock().extend(started);
        Ok(())
    }

    /// The embedded log, when that is the backend (offline tools, tests, `log` metrics).
    pub fn embedded_log(&self) -> Option<&Log> {
        self.log.as_any().downcast_ref::<Log>()
    }

    /// Why the node cannot serve reads yet (or any more), if it cannot.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(p) = self.embedded_log().and_then(Log::poisoned) {
            return Some(format!("log poisoned: {p}"));
        }
        let errors = self.materializers.errors();
        if !errors.is_empty() {
            return Some(format!("materializer stopped: {}", errors.join("; ")));
        }
        if !self.store.is_recovered() {
            return Some("recovering: replaying the log into the store".into());
        }
        self.models.not_ready_reason()
    }

    /// Deletes log segments past retention that no lossless consumer (snapshots, history
    /// sink) still needs. Run every `log.retention_check_interval`.
    pub fn housekeeping(&self) {
        if let Some(bytes) = self.log.housekeeping(quiver_core::time::now_ms()) {
            metrics::gauge!(quiver_core::telemetry::LOG_DISK_BYTES).set(bytes as f64);
        }
    }

    /// Stops the consumers (history sink, materializers with their final snapshots), then
    /// the log writers.
    pub fn shutdown(&self) {
        // Upstream first: nothing new is appended while the consumers drain.
        for mut s in self.sources.lock().drain(..) {
            s.shutdown();
        }
        for thread in [&self.model_poller, &self.rollouts] {
            if let Some((stop, handle)) = thread.lock().take() {
                drop(stop);
                let _ = handle.join();
            }
        }
        if let Some(h) = &self.history {
            h.shutdown();
        }
        self.materializers.shutdown();
        self.log.shutdown();
    }
}
