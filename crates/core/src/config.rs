//! `quiver.toml`: the shapes of DESIGN.md §3, their defaults, environment overrides and
//! validation. An invalid config fails at start with the path of the field that is wrong.
//!
//! Precedence, lowest first: built-in defaults, the TOML file, `QUIVER_<SECTION>_<KEY>`
//! environment variables (e.g. `QUIVER_LOG_PARTITIONS=16`), then CLI flags (applied by the binary).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: cannot parse TOML: {0}")]
    Toml(String),
    #[error("config: {path}: {message}")]
    Field { path: String, message: String },
}

impl ConfigError {
    pub fn field(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Field {
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A duration written as `"250ms"`, `"10m"`, `"24h"`, `"30d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }
}

impl HumanDuration {
    pub fn as_ms(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub ingest: IngestConfig,
    pub history: HistoryConfig,
    pub models: ModelsConfig,
    /// Used when `log.backend = "kafka"`.
    pub kafka: KafkaConfig,
    /// RabbitMQ queues whose messages are appended to the log as events.
    #[serde(rename = "rabbitmq_source")]
    pub rabbitmq_sources: Vec<RabbitMqSourceConfig>,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    /// Token buckets per credential, by tier; lower priority is shed first.
    #[serde(rename = "rate_tier")]
    pub rate_tiers: Vec<RateTierConfig>,
    pub storage: StorageConfig,
    /// Several nodes over one Kafka log (DESIGN.md §6); absent: a single node.
    pub cluster: Option<ClusterConfig>,
    #[serde(rename = "entity")]
    pub entities: Vec<EntityConfig>,
    #[serde(rename = "view")]
    pub views: Vec<ViewConfig>,
    /// Feast feature services: a named list of feature references (`view:feature`).
    #[serde(rename = "feature_service")]
    pub feature_services: Vec<FeatureServiceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureServiceConfig {
    pub name: String,
    pub features: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// KServe V2 over gRPC (Triton's GRPCInferenceService); unset: no gRPC listener.
    pub grpc_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Longest a read with `Quiver-Read-After` waits for the materializer before answering 503.
    pub read_after_wait_ms_max: u64,
    /// Largest number of entity rows one `POST /v1/features` may ask for.
    pub read_entities_max: usize,
    /// A connection must send a request's headers within this (slow clients are closed).
    pub header_read_timeout: HumanDuration,
    /// A keep-alive connection idle this long is closed.
    pub idle_timeout: HumanDuration,
    /// Connections held at once (HTTP and gRPC each); beyond it new ones are closed at once.
    pub connections_max: usize,
    /// Requests running at once; lower-priority tiers get a smaller share (see `[[rate_tier]]`).
    pub inflight_max: usize,
    /// Longest a request may run (a client's `Quiver-Timeout-Ms` or gRPC deadline may be
    /// shorter); past it the work is dropped and 503 `DEADLINE_EXCEEDED` answered.
    pub request_timeout_max: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7070".parse().expect("static address"),
            grpc_listen: None,
            data_dir: PathBuf::from("./data"),
            read_after_wait_ms_max: 100,
            read_entities_max: 10_000,
            header_read_timeout: HumanDuration(Duration::from_secs(5)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            connections_max: 4096,
            inflight_max: 1024,
            request_timeout_max: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync after every append request before acknowledging it.
    Always,
    /// Group commit: one fsync covers every append gathered while the previous one ran.
    Batch,
    /// Never fsync; the OS writes back when it likes. `ack=durable` then means "written".
    Never,
}

/// Which log carries events (DESIGN.md §3 `[log] backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogBackend {
    /// Quiver's own log in `<data_dir>/log`: nothing to install, one node.
    #[default]
    Embedded,
    /// Kafka topics (`[kafka]`): producers anywhere, several nodes.
    Kafka,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub backend: LogBackend,
    /// Partitions of the embedded log (with Kafka: `kafka.partitions`).
    pub partitions: u32,
    pub fsync: FsyncPolicy,
    /// Largest segment file; also how far the embedded log's commit journal grows before a
    /// checkpoint syncs the segments and starts the next one.
    pub segment_bytes: u64,
    /// Segments whose newest record is older than this are deleted.
    pub retention: HumanDuration,
    /// Per partition: oldest segments are deleted while the partition is larger than this.
    pub retention_bytes: Option<u64>,
    /// Largest number of records one group commit writes before it fsyncs.
    pub group_commit_records_max: usize,
    /// Bound on the whole log on disk. Retention never deletes what a lossless consumer (the
    /// store's snapshots, the history sink) still needs; at this bound ingest answers
    /// `503 DISK_FULL` instead. Unset: no bound.
    pub disk_bytes_max: Option<u64>,
    /// How often retention runs (and so how soon a drained consumer frees disk).
    pub retention_check_interval: HumanDuration,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            backend: LogBackend::Embedded,
            partitions: 8,
            fsync: FsyncPolicy::Batch,
            segment_bytes: 64 * 1024 * 1024,
            retention: HumanDuration(Duration::from_secs(24 * 3600)),
            retention_bytes: None,
            group_commit_records_max: 65_536,
            disk_bytes_max: None,
            retention_check_interval: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub request_body_bytes_max: usize,
    /// Events accepted by ingest but not yet written to the log, over all partitions.
    pub ingest_queue_events_max: usize,
    pub batch_events_max: usize,
    pub key_bytes_max: usize,
    pub event_id_bytes_max: usize,
    pub string_bytes_max: usize,
    pub idempotency_key_bytes_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            request_body_bytes_max: 4 * 1024 * 1024,
            ingest_queue_events_max: 65_536,
            batch_events_max: 10_000,
            key_bytes_max: 256,
            event_id_bytes_max: 128,
            string_bytes_max: 64 * 1024,
            idempotency_key_bytes_max: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The least time between two snapshots of a partition.
    pub snapshot_interval: HumanDuration,
    /// A partition is snapshotted again only once the records applied since its last
    /// snapshot reach this fraction of the rows that snapshot held: snapshot writes stay
    /// proportional to ingest (at most 1 / ratio rows written per record), and a restart
    /// replays fewer than ratio × rows records plus at most one interval's arrivals.
    /// 0 = every `snapshot_interval` if anything changed.
    pub snapshot_change_ratio: f64,
    /// Per partition: how many recent `event_id`s are remembered for at-most-once apply.
    pub dedup_window_events: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            snapshot_interval: HumanDuration(Duration::from_secs(60)),
            snapshot_change_ratio: 0.25,
            dedup_window_events: 100_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// How many `Idempotency-Key`s (and their replies) are remembered.
    pub idempotency_keys_max: usize,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_ttl: HumanDuration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            idempotency_keys_max: 100_000,
            idempotency_ttl: HumanDuration(Duration::from_secs(24 * 3600)),
        }
    }
}

/// The history sink: every event, written to PostgreSQL by a consumer of the log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// `host=127.0.0.1 user=postgres dbname=test` or `postgresql://…`. Unset: no sink; the
    /// history is the log itself, within its retention.
    pub postgres_url: Option<String>,
    /// Table for the history rows (`<table>_migrations` records the schema version).
    pub table: String,
    /// Rows per INSERT (one transaction).
    pub batch_rows_max: usize,
    /// Longest wait between retries while PostgreSQL is unreachable.
    pub retry_delay_ms_max: u64,
    /// `false` (default): retention keeps every record the sink has not written, however long
    /// PostgreSQL is away (bounded by `log.disk_bytes_max`). `true`: retention does not wait
    /// for the sink; every range it loses is counted, logged and recorded in `<table>_gaps`.
    pub lossy: bool,
    /// PEM CA(s) PostgreSQL's certificate must lead to, with its host name checked (libpq's
    /// `verify-full`). Unset: with `sslmode=require` (or `prefer`, the default, when the server
    /// offers TLS) the channel is encrypted but the server not authenticated.
    pub ca_file: Option<PathBuf>,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            postgres_url: None,
            table: "quiver_history".into(),
            batch_rows_max: 5_000,
            retry_delay_ms_max: 5_000,
            lossy: false,
            ca_file: None,
        }
    }
}

/// `[auth]`: who may do what (README "Security").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `none`, or any of `api_key`, `jwt`, `mtls`, comma-separated.
    pub mode: String,
    /// Written by `quiver keys create`: hashes and grants, never keys (relative: to data_dir).
    pub keys_file: PathBuf,
    /// The JWKS JWTs are verified against (mode `jwt`).
    pub jwks_file: Option<PathBuf>,
    /// A JWT's `aud` must contain this.
    pub jwt_audience: String,
    /// A JWT's `iss` must be this, if set.
    pub jwt_issuer: Option<String>,
    /// The JWT claim holding grants (`role:resource` strings).
    pub roles_claim: String,
    /// The JWT claim naming the rate tier.
    pub tier_claim: String,
    /// Routes that need no credentials.
    pub public: Vec<String>,
    /// The tamper-evident audit trail (relative: to data_dir).
    pub audit_file: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: "none".into(),
            keys_file: PathBuf::from("keys.toml"),
            jwks_file: None,
            jwt_audience: "quiver".into(),
            jwt_issuer: None,
            roles_claim: "roles".into(),
            tier_claim: "tier".into(),
            public: [
                "/healthz",
                "/readyz",
                "/health",
                "/v2/health/live",
                "/v2/health/ready",
                "/v1/cluster/node",
            ]
            .map(String::from)
            .to_vec(),
            audit_file: PathBuf::from("audit.log"),
        }
    }
}

/// `[tls]`: HTTPS and gRPC over TLS (rustls); mTLS when `client_ca` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for a new certificate (no restart needed).
    pub reload_interval: HumanDuration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: None,
            key: None,
            client_ca: None,
            reload_interval: HumanDuration(Duration::from_secs(10)),
        }
    }
}

/// `[[rate_tier]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateTierConfig {
    pub name: String,
    /// 0 is served first; higher numbers are shed first.
    pub priority: u8,
    pub rate_per_s: u32,
    pub burst: u32,
}

/// `[cluster]`: the members of a cluster over one Kafka log and how partitions are placed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id (one of `nodes`).
    #[serde(rename = "self")]
    pub self_id: String,
    pub nodes: Vec<ClusterNode>,
    /// Nodes that consume and serve each partition (capped at the number of nodes).
    #[serde(default = "default_replication")]
    pub replication: usize,
    /// Ring positions per node.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// How often each peer is probed.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: HumanDuration,
    /// A peer with no successful probe for this long is down (its partitions go to replicas).
    #[serde(default = "default_down_after")]
    pub down_after: HumanDuration,
    /// Bound on one forwarded request (connect + answer).
    #[serde(default = "default_forward_timeout")]
    pub forward_timeout: HumanDuration,
    /// With `[tls]`: the CA that signed the peers' certificates (default `tls.client_ca`).
    /// Nodes then reach each other over mutual TLS, each presenting its `[tls]` certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_replication() -> usize {
    2
}
fn default_vnodes() -> u32 {
    256
}
fn default_probe_interval() -> HumanDuration {
    HumanDuration(Duration::from_millis(200))
}
fn default_down_after() -> HumanDuration {
    HumanDuration(Duration::from_millis(1000))
}
fn default_forward_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

/// One member of `[cluster] nodes`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub id: String,
    /// `host:port` of its HTTP listener (peers forward and probe there).
    pub http: String,
    /// `host:port` of its gRPC listener, if it has one.
    #[serde(default)]
    pub grpc: Option<String>,
}

/// `[storage]`: data at rest.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Encrypts log segments, snapshots and the idempotency journal (README "Encryption at rest").
    pub encryption_key_file: Option<PathBuf>,
}

/// `[kafka]`: Kafka as the log (`log.backend = "kafka"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// View `txn` lives in topic `{topic_prefix}txn`.
    pub topic_prefix: String,
    /// Partitions of every topic Quiver reads (created with this count if missing; an
    /// existing topic's count must match, so that a key is in the same partition everywhere).
    pub partitions: u32,
    /// Replication factor of the topics Quiver creates.
    pub replication_factor: i32,
    /// Extra librdkafka properties (`security.protocol`, `sasl.*`, `ssl.*`, …), passed to
    /// every Kafka client Quiver makes.
    pub client: BTreeMap<String, toml::Value>,
    /// Where records of source topics that cannot be decoded are copied (with headers naming
    /// the topic, partition, offset and reason). Unset: counted and logged only.
    pub dead_letter_topic: Option<String>,
    /// Longest an append waits for Kafka before it fails (librdkafka `message.timeout.ms`).
    pub delivery_timeout: HumanDuration,
    /// How long the producer gathers records into a batch (librdkafka `linger.ms`).
    pub linger: HumanDuration,
    /// Longest a broker holds a fetch while there is nothing new (`fetch.wait.max.ms`). A broker
    /// answers as soon as records arrive, so this costs no freshness; lower only wakes every
    /// idle consumer more often.
    pub fetch_wait_max: HumanDuration,
    /// For brokers that answer a fetch at once even when there is nothing new (some
    /// Kafka-protocol test brokers; Kafka itself holds it `fetch_wait_max`): a reader that
    /// finds nothing pauses fetching this long, so idle partitions do not spin. Reads then
    /// lag by up to this much. `0ms` (default): never pause.
    pub idle_fetch_backoff: HumanDuration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: "quiver.".into(),
            partitions: 8,
            replication_factor: 1,
            client: BTreeMap::new(),
            dead_letter_topic: None,
            delivery_timeout: HumanDuration(Duration::from_secs(30)),
            linger: HumanDuration(Duration::from_millis(1)),
            fetch_wait_max: HumanDuration(Duration::from_millis(500)),
            idle_fetch_backoff: HumanDuration(Duration::ZERO),
        }
    }
}

impl KafkaConfig {
    /// `client` as librdkafka property strings (TOML numbers and booleans written out).
    pub fn client_properties(&self) -> Vec<(String, String)> {
        self.client
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}

/// A view fed by somebody else's Kafka topic (DESIGN.md §3, a view's `source`): each record's
/// value is a JSON object; `key_field`, `ts_field` and `event_id_field` name where the entity
/// key, event time and dedup id are, and each feature is read from the field of its name (or
/// the one `fields` maps it to). Other fields are ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewSourceConfig {
    pub kafka_topic: String,
    /// Unset: the record's Kafka key is the entity key.
    pub key_field: Option<String>,
    /// Unset: the record's Kafka timestamp is the event time.
    pub ts_field: Option<String>,
    pub event_id_field: Option<String>,
    #[serde(default = "default_format")]
    pub format: String,
    /// Feature name → JSON field, for features whose field is named otherwise.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
}

fn default_format() -> String {
    "json".into()
}

/// `[[rabbitmq_source]]`: a RabbitMQ queue whose messages (each a `/v1/events` body: one event,
/// a JSON array or NDJSON) are appended to the log, acknowledged to RabbitMQ only once durable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitMqSourceConfig {
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`
    pub url: String,
    pub queue: String,
    /// Messages delivered and not yet acknowledged (AMQP `basic.qos` prefetch count).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Declare the queue (durable) if it does not exist.
    #[serde(default = "default_true")]
    pub declare: bool,
}

fn default_prefetch() -> u16 {
    256
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    pub repository: PathBuf,
    /// How often the repository is scanned for new, changed or removed versions (Triton's
    /// poll mode: a scan is cheap, and it needs no inotify, which network mounts lack).
    pub poll_interval: HumanDuration,
    /// Synthetic rows each newly loaded version evaluates before it is marked ready.
    pub warmup_rows: usize,
    /// Bound on predictions waiting to be copied to shadow versions; beyond it copies are
    /// dropped (and counted), never the primary's response.
    pub shadow_queue_max: usize,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            repository: PathBuf::from("./models"),
            poll_interval: HumanDuration(Duration::from_secs(2)),
            warmup_rows: 16,
            shadow_queue_max: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    pub name: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: String,
    pub entity: String,
    pub ttl: Option<HumanDuration>,
    pub allowed_lateness: Option<HumanDuration>,
    pub features: Vec<FeatureConfig>,
    #[serde(default)]
    pub aggregations: Vec<AggregationConfig>,
    /// The Feast push source whose `POST /push` writes into this view.
    #[serde(default)]
    pub push_source: Option<String>,
    /// Somebody else's Kafka topic feeds this view (needs `log.backend = "kafka"`).
    #[serde(default)]
    pub source: Option<ViewSourceConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    /// Length of an `f32[]` embedding, when not written in the type as `f32[16]`.
    pub dims: Option<u32>,
    pub default: Option<toml::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregationConfig {
    pub name: String,
    pub of: String,
    #[serde(rename = "fn")]
    pub func: String,
    pub window: HumanDuration,
    /// Tile size; by default chosen from the window (see `quiver_core::window`).
    pub tile: Option<HumanDuration>,
}

/// Sections whose keys `QUIVER_<SECTION>_<KEY>` may override.
const ENV_SECTIONS: &[&str] = &[
    "server", "log", "limits", "store", "ingest", "history", "models", "kafka", "auth", "tls",
    "storage", "cluster",
];

impl Config {
    /// Parses TOML text, applies `env` overrides (pairs of `QUIVER_*` names and values), and
    /// validates the result.
    pub fn from_toml_with_env<I>(text: &str, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut root: toml::Table =
            toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        apply_env(&mut root, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|e| ConfigError::field(e.path().to_string(), e.inner().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, path: &str, msg: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::field(path, msg))
            }
        };
        check(
            (1..=1024).contains(&self.log.partitions),
            "log.partitions",
            "must be 1..=1024",
        )?;
        self.validate_kafka()?;
        self.validate_cluster()?;
        self.validate_security()?;
        check(
            self.log.segment_bytes >= 4096,
            "log.segment_bytes",
            "must be at least 4096",
        )?;
        check(
            self.log.disk_bytes_max.is_none_or(|max| {
                max >= 2 * u64::from(self.log.partitions) * self.log.segment_bytes
            }),
            "log.disk_bytes_max",
            "must be at least 2 × log.partitions × log.segment_bytes: retention frees only sealed \
             segments, and every partition keeps one active segment",
        )?;
        check(
            !self.log.retention_check_interval.0.is_zero(),
            "log.retention_check_interval",
            "must be > 0",
        )?;
        check(
            self.log.group_commit_records_max > 0,
            "log.group_commit_records_max",
            "must be > 0",
        )?;
        check(
            self.limits.request_body_bytes_max > 0,
            "limits.request_body_bytes_max",
            "must be > 0",
        )?;
        check(
            self.limits.batch_events_max > 0,
            "limits.batch_events_max",
            "must be > 0",
        )?;
        check(
            self.limits.ingest_queue_events_max >= self.limits.batch_events_max,
            "limits.ingest_queue_events_max",
            "must be at least limits.batch_events_max, or a full batch could never be admitted",
        )?;
        check(
            (1..=u16::MAX as usize).contains(&self.limits.key_bytes_max),
            "limits.key_bytes_max",
            "must be 1..=65535",
        )?;
        check(
            self.limits.event_id_bytes_max <= u16::MAX as usize,
            "limits.event_id_bytes_max",
            "must be at most 65535",
        )?;
        check(
            self.server.read_entities_max > 0,
            "server.read_entities_max",
            "must be > 0",
        )?;
        check(
            self.store.snapshot_interval.0 >= Duration::from_millis(100),
            "store.snapshot_interval",
            "must be at least 100ms",
        )?;
        check(
            (0.0..=100.0).contains(&self.store.snapshot_change_ratio),
            "store.snapshot_change_ratio",
            "must be between 0 and 100",
        )?;
        check(
            self.models.poll_interval.0 >= Duration::from_millis(50),
            "models.poll_interval",
            "must be at least 50ms",
        )?;
        check(
            self.models.shadow_queue_max > 0,
            "models.shadow_queue_max",
            "must be > 0",
        )?;
        let t = &self.history.table;
        check(
            !t.is_empty()
                && t.len() <= 48
                && t.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "history.table",
            "must be a lowercase SQL identifier of at most 48 characters",
        )?;
        check(
            self.history.batch_rows_max > 0,
            "history.batch_rows_max",
            "must be > 0",
        )?;
        // The schema is validated by compiling it.
        let schema = crate::schema::Schema::compile(self)?;
        self.validate_feature_services(&schema)
    }

    fn validate_security(&self) -> Result<(), ConfigError> {
        let field = |p: &str, m: &str| Err(ConfigError::field(p, m));
        let s = &self.server;
        if s.connections_max == 0 || s.inflight_max == 0 {
            return field("server", "connections_max and inflight_max must be > 0");
        }
        if s.header_read_timeout.0.is_zero() || s.request_timeout_max.0.is_zero() {
            return field(
                "server",
                "header_read_timeout and request_timeout_max must be > 0",
            );
        }
        let modes = &self.auth.mode;
        for m in modes.split(',').map(str::trim) {
            if !matches!(m, "none" | "api_key" | "jwt" | "mtls")
                || (m == "none" && modes.trim() != "none")
            {
                return field(
                    "auth.mode",
                    "none, or any of api_key, jwt, mtls (comma-separated)",
                );
            }
        }
        if modes.contains("jwt") && self.auth.jwks_file.is_none() {
            return field("auth.jwks_file", "mode jwt needs a JWKS file");
        }
        if modes.contains("mtls") && self.tls.client_ca.is_none() {
            return field("tls.client_ca", "mode mtls needs a client CA");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return field("tls", "cert and key go together");
        }
        if self.tls.client_ca.is_some() && self.tls.cert.is_none() {
            return field("tls.client_ca", "needs tls.cert and tls.key");
        }
        for (i, t) in self.rate_tiers.iter().enumerate() {
            if t.name.is_empty()
                || t.rate_per_s == 0
                || self.rate_tiers[..i].iter().any(|o| o.name == t.name)
            {
                return field(
                    &format!("rate_tier[{i}]"),
                    "a unique name and rate_per_s > 0",
                );
            }
        }
        Ok(())
    }

    /// Partitions of the log in use: `log.partitions` (embedded) or `kafka.partitions`.
    pub fn partitions(&self) -> u32 {
        match self.log.backend {
            LogBackend::Embedded => self.log.partitions,
            LogBackend::Kafka => self.kafka.partitions,
        }
    }

    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let err = |path: &str, msg: String| Err(ConfigError::field(format!("cluster.{path}"), msg));
        if self.log.backend != LogBackend::Kafka {
            return err(
                "self",
                "a cluster needs log.backend = \"kafka\" (the embedded log is single-node)".into(),
            );
        }
        if c.nodes.is_empty() || c.nodes.len() > 1024 {
            return err("nodes", "must list 1..=1024 nodes".into());
        }
        let mut seen = std::collections::HashSet::new();
        for (i, n) in c.nodes.iter().enumerate() {
            if n.id.is_empty() || !seen.insert(n.id.as_str()) {
                return err(
                    &format!("nodes[{i}].id"),
                    "must be non-empty and unique".into(),
                );
            }
            if n.http.parse::<SocketAddr>().is_err() && !n.http.contains(':') {
                return err(&format!("nodes[{i}].http"), "must be host:port".into());
            }
        }
        if !seen.contains(c.self_id.as_str()) {
            return err(
                "self",
                format!("{:?} is not one of cluster.nodes", c.self_id),
            );
        }
        if c.replication == 0 {
            return err("replication", "must be at least 1".into());
        }
        if !(1..=4096).contains(&c.vnodes) {
            return err("vnodes", "must be 1..=4096".into());
        }
        if self.auth.mode != "none" && !self.auth.public.iter().any(|p| p == "/v1/cluster/node") {
            return Err(ConfigError::field(
                "auth.public",
                "must keep \"/v1/cluster/node\" in a cluster: peers probe it without credentials",
            ));
        }
        if self.tls.cert.is_some() && c.ca.is_none() && self.tls.client_ca.is_none() {
            return err(
                "ca",
                "with [tls], nodes reach each other over mutual TLS: set cluster.ca (or \
                 tls.client_ca) to the CA of the nodes' certificates"
                    .into(),
            );
        }
        if c.probe_interval.0.is_zero() || c.down_after.0 < c.probe_interval.0 * 2 {
            return err(
                "down_after",
                "must be at least twice cluster.probe_interval (one lost probe is not a death)"
                    .into(),
            );
        }
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let kafka = self.log.backend == LogBackend::Kafka;
        for (i, v) in self.views.iter().enumerate() {
            let Some(src) = &v.source else { continue };
            let path = format!("view[{i}].source");
            if !kafka {
                return Err(ConfigError::field(
                    path,
                    "a Kafka topic source needs log.backend = \"kafka\"",
                ));
            }
            if src.kafka_topic.is_empty() {
                return Err(ConfigError::field(
                    format!("{path}.kafka_topic"),
                    "must be non-empty",
                ));
            }
            if src.format != "json" {
                return Err(ConfigError::field(
                    format!("{path}.format"),
                    "only \"json\" is supported",
                ));
            }
            if src.kafka_topic.starts_with(&self.kafka.topic_prefix)
                && self
                    .views
                    .iter()
                    .any(|o| src.kafka_topic == format!("{}{}", self.kafka.topic_prefix, o.name))
            {
                return Err(ConfigError::field(
                    format!("{path}.kafka_topic"),
                    "is the topic of a view Quiver writes",
                ));
            }
            if self.views[..i].iter().any(|o| {
                o.source
                    .as_ref()
                    .is_some_and(|s| s.kafka_topic == src.kafka_topic)
            }) {
                return Err(ConfigError::field(
                    format!("{path}.kafka_topic"),
                    "feeds another view already",
                ));
            }
        }
        if !kafka {
            return Ok(());
        }
        let k = &self.kafka;
        let check = |ok: bool, path: &str, msg: &str| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::field(path, msg))
            }
        };
        for (i, v) in self.views.iter().enumerate() {
            let topic = match &v.source {
                Some(src) => src.kafka_topic.clone(),
                None => format!("{}{}", k.topic_prefix, v.name),
            };
            check(
                topic.len() <= 249 && topic.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                &format!("view[{i}]"),
                "its Kafka topic name may hold only ASCII letters, digits, '.', '_' and '-' (at most 249)",
            )?;
        }
        check(
            (1..=1024).contains(&k.partitions),
            "kafka.partitions",
            "must be 1..=1024",
        )?;
        check(
            !k.brokers.trim().is_empty(),
            "kafka.brokers",
            "must name at least one broker",
        )?;
        check(
            k.replication_factor >= 1,
            "kafka.replication_factor",
            "must be at least 1",
        )?;
        check(
            k.topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "kafka.topic_prefix",
            "may hold only ASCII letters, digits, '.', '_' and '-' (Kafka's topic names)",
        )?;
        check(
            k.delivery_timeout.0 >= Duration::from_millis(100),
            "kafka.delivery_timeout",
            "must be at least 100ms",
        )
    }

    /// Every feature service has a unique name and names only columns that exist.
    fn validate_feature_services(&self, schema: &crate::Schema) -> Result<(), ConfigError> {
        for (i, svc) in self.feature_services.iter().enumerate() {
            let path = format!("feature_service[{i}]");
            if svc.name.is_empty()
                || self.feature_services[..i]
                    .iter()
                    .any(|s| s.name == svc.name)
            {
                return Err(ConfigError::field(path, "needs a unique, non-empty name"));
            }
            if svc.features.is_empty() {
                return Err(ConfigError::field(path, "names no features"));
            }
            for f in &svc.features {
                let known = f.split_once(':').is_some_and(|(view, feature)| {
                    schema
                        .view_by_name(view)
                        .is_some_and(|v| v.column_index(feature).is_some())
                });
                if !known {
                    return Err(ConfigError::field(
                        format!("{path}.features"),
                        format!("{f:?} is not a view:feature of this config"),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn apply_env<I>(root: &mut toml::Table, env: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut overrides: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("QUIVER_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = rest.split_once('_') else {
            continue;
        };
        if ENV_SECTIONS.contains(&section) && !key.is_empty() {
            overrides.insert(format!("{section}.{key}"), value);
        }
    }
    for (path, raw) in overrides {
        let (section, key) = path.split_once('.').expect("built with a dot");
        let table = root
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(table) = table.as_table_mut() else {
            return Err(ConfigError::field(section, "must be a table"));
        };
        table.insert(key.to_string(), parse_env_value(&raw));
    }
    Ok(())
}

/// An environment value is read as a TOML literal when it is one (`16`, `true`, `"x"`),
/// else as a bare string (`batch`, `127.0.0.1:7070`).
fn parse_env_value(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Probe {
        v: toml::Value,
    }
    match toml::from_str::<Probe>(&format!("v = {raw}")) {
        Ok(p) => p.v,
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DESIGN_EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:7070"
data_dir = "./data"

[log]
partitions = 8
fsync = "batch"
segment_bytes = 67108864
retention = "24h"

[limits]
request_body_bytes_max = 4194304
ingest_queue_events_max = 65536
batch_events_max = 10000

[[entity]]
name = "user"
key = "user_id"

[[view]]
name = "txn"
entity = "user"
ttl = "1h"
allowed_lateness = "10m"
features = [
  { name = "amount", type = "f64", default = 0.0 },
  { name = "merchant", type = "string" },
]
aggregations = [
  { name = "amount_sum_5m", of = "amount", fn = "sum", window = "5m" },
]

[models]
repository = "./models"
"#;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn parses_the_design_example() {
        let c = Config::from_toml_with_env(DESIGN_EXAMPLE, no_env()).unwrap();
        assert_eq!(c.log.partitions, 8);
        assert_eq!(c.log.fsync, FsyncPolicy::Batch);
        assert_eq!(
            c.views[0].ttl,
            Some(HumanDuration(Duration::from_secs(3600)))
        );
        assert_eq!(c.views[0].aggregations[0].func, "sum");
        let schema = crate::Schema::compile(&c).unwrap();
        let v = schema.view_by_name("txn").unwrap();
        assert_eq!(v.column_index("amount_sum_5m"), Some(2));
        assert_eq!(v.column_name(2), "amount_sum_5m");
        assert_eq!(
            v.feature_index("amount_sum_5m"),
            None,
            "events cannot write an aggregate"
        );
        let bad = DESIGN_EXAMPLE.replace("window = \"5m\"", "window = \"5m\", tile = \"10m\"");
        let e = Config::from_toml_with_env(&bad, no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("view[0].aggregations[0].tile"), "{e}");
        let bad = DESIGN_EXAMPLE.replace("fn = \"sum\"", "fn = \"median\"");
        let e = Config::from_toml_with_env(&bad, no_env())
            .unwrap_err()
            .to_string();
        assert!(e.contains("view[0].aggregations[0].fn"), "{e}");
    }

    #[test]
    fn empty_config_has_defaults() {
        let c = Config::from_toml_with_env("", no_env()).unwrap();
        assert_eq!(c.server.listen.port(), 7070);
        assert_eq!(c.limits.batch_events_max, 10_000);
    }

    #[test]
    fn env_overrides_file() {
        let env = vec![
            ("QUIVER_LOG_PARTITIONS".to_string(), "3".to_string()),
            ("QUIVER_LOG_FSYNC".to_string(), "always".to_string()),
            (
                "QUIVER_SERVER_LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            ("QUIVER_CONFIG".to_string(), "ignored.toml".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let c = Config::from_toml_with_env(DESIGN_EXAMPLE, env).unwrap();
        assert_eq!(c.log.partitions, 3);
        assert_eq!(c.log.fsync, FsyncPolicy::Always);
        assert_eq!(c.server.listen.port(), 9999);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |text: &str| {
            Config::from_toml_with_env(text, no_env())
                .unwrap_err()
                .to_string()
        };
        assert!(err("[log]\npartitions = \"many\"").contains("log.partitions"));
        assert!(err("[log]\nfsync = \"sometimes\"").contains("log.fsync"));
        assert!(err("[log]\npartitions = 0").contains("log.partitions"));
        assert!(err("[log]\nretention = \"forever\"").contains("log.retention"));
        // A bound below one sealed segment per partition could never be freed by retention.
        assert!(err("[log]\ndisk_bytes_max = 1000").contains("log.disk_bytes_max"));
        assert!(
            err("[log]\nretention_check_interval = \"0s\"").contains("retention_check_interval")
        );
        assert!(err("[server]\nlisten = \"nowhere\"").contains("server.listen"));
        for ratio in ["-0.5", "101.0", "nan"] {
            let text = format!("[store]\nsnapshot_change_ratio = {ratio}");
            assert!(
                err(&text).contains("store.snapshot_change_ratio"),
                "{ratio}"
            );
        }
        assert!(err("[limits]\nbogus = 1").contains("bogus"));
        let env = vec![("QUIVER_LOG_PARTITIONS".to_string(), "x".to_string())];
        let e = Config::from_toml_with_env("", env).unwrap_err().to_string();
        assert!(e.contains("log.partitions"), "{e}");
    }
}
