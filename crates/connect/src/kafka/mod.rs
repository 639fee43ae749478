//! Kafka as Quiver's log: the second backend of `quiver_log::EventLog`.
//!
//! # Design constraints
//! - **Topics**: view `v` lives in `{topic_prefix}v`; a view with a `source` reads somebody
//!   else's topic instead. Each topic feeds one view. Every topic has `kafka.partitions`
//!   partitions (co-partitioned, as Kafka Streams requires of joined topics): a key is in the
//!   same partition of every topic, so one node can own "partition p" of everything. Missing
//!   topics are created at start; one with another partition count is a startup error.
//! - **Streams**: topics sorted by name are slots; stream `slot × P + p` is partition `p` of
//!   topic `slot`. A stream's log id is `kafka:<topic>` (rows and snapshot offsets are keyed
//!   on it), so a stream keeps its identity when views are added or reordered.
//! - **Records** are Quiver's binary records on both sides of the trait; `codec` turns them
//!   into Kafka's form (key = entity key, value = the event as JSON) and back, validating.
//! - **Producing** (`produce`): the idempotent producer, `acks=all`, each record sent to the
//!   partition Quiver computed (murmur2, equal to Kafka's default partitioner); `ack=written`
//!   is `durable` (Kafka acknowledges once, when every in-sync replica has the record) and
//!   offsets are known only with the acknowledgement.
//! - **Consuming** (`read`): manual assignment, one consumer per reader, from explicit
//!   offsets. Kafka's retention is Kafka's: consumers registered here protect nothing, and a
//!   range deleted under a reader comes back as `OffsetOutOfRange` (a gap), never a silent jump.

mod codec;
mod produce;
mod read;

use std::any::Any;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::event::EventLimits;
use quiver_core::schema::{Schema, ViewId};
use quiver_core::Config;
use quiver_log::consumers::Consumers;
use quiver_log::{
    Ack, Appended, Consumer, EventLog, LogError, ReadPurpose, RecordBatch, Result, Retention,
    StreamId, StreamInfo, StreamReader,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};

pub use codec::DEDUP_HEADER;

/// How long start-up waits for the brokers' metadata and topic creation.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a watermark query waits for a broker.
const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a low watermark is trusted (the history sink asks before every read).
const LOW_WATERMARK_TTL: Duration = Duration::from_secs(2);

/// One topic Quiver reads.
#[derive(Debug, Clone)]
pub(crate) struct Topic {
    pub name: String,
    pub view: ViewId,
    /// Somebody else's topic (a view's `source`): read with the field mapping, never written.
    pub source: bool,
}

pub struct KafkaLog {
    me: Weak<KafkaLog>,
    pub(crate) schema: Arc<Schema>,
    pub(crate) limits: EventLimits,
    pub(crate) partitions: u32,
    pub(crate) client_config: ClientConfig,
    pub(crate) fetch_wait_max: Duration,
    pub(crate) idle_fetch_backoff: Duration,
    pub(crate) dead_letter_topic: Option<String>,
    /// By slot (sorted by name).
    topics: Vec<Topic>,
    /// Slot of each view's topic, by view id.
    slot_of_view: Vec<u32>,
    pub(crate) streams: Vec<StreamInfo>,
    pub(crate) producer: produce::KafkaProducer,
    /// For watermarks: a consumer with nothing assigned.
    meta: BaseConsumer,
    low_cache: Mutex<HashMap<StreamId, (Instant, u64)>>,
    /// One shared consumer per long-lived purpose (materializers, history sink).
    fetchers: Mutex<HashMap<ReadPurpose, Arc<read::Fetcher>>>,
    consumers: Consumers,
    local_dir: PathBuf,
}

impl KafkaLog {
    /// Connects, creates missing topics, checks partition counts, and starts the producer.
    pub fn open(config: &Config, schema: Arc<Schema>) -> Result<Arc<KafkaLog>> {
        let k = &config.kafka;
        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &k.brokers)
            // librdkafka's default grows to 10 s between reconnects: a broker back from a
            // restart would wait that long for Quiver. (`kafka.client` may override it.)
            .set("reconnect.backoff.max.ms", "1000");
        for (name, value) in k.client_properties() {
            client_config.set(name, value);
        }
        let mut topics: Vec<Topic> = schema
            .views
            .iter()
            .map(|v| match &v.source {
                Some(src) => Topic {
                    name: src.topic.clone(),
                    view: v.id,
                    source: true,
                },
                None => Topic {
                    name: format!("{}{}", k.topic_prefix, v.name),
                    view: v.id,
                    source: false,
                },
            })
            .collect();
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        let partitions = k.partitions;
        ensure_topics(
            &client_config,
            &topics,
            partitions,
            k.replication_factor,
            k.dead_letter_topic.as_deref(),
        )?;
        let mut slot_of_view = vec![0; schema.views.len()];
        let mut streams = Vec::with_capacity(topics.len() * partitions as usize);
        for (slot, t) in topics.iter().enumerate() {
            slot_of_view[usize::from(t.view)] = slot as u32;
            for p in 0..partitions {
                streams.push(StreamInfo {
                    log_id: format!("kafka:{}", t.name),
                    partition: p,
                    name: format!("{}/{p}", t.name),
                    view: Some(schema.view(t.view).name.clone()),
                });
            }
        }
        let producer = produce::KafkaProducer::new(
            &client_config,
            config.limits.ingest_queue_events_max,
            k.linger.0,
            k.delivery_timeout.0,
        )?;
        let own: Vec<&str> = topics
            .iter()
            .filter(|t| !t.source)
            .map(|t| t.name.as_str())
            .collect();
        producer.warm_up(&own, SETUP_TIMEOUT);
        let meta: BaseConsumer = client_config
            .clone()
            .set("group.id", "quiver-meta")
            .create()
            .map_err(|e| LogError::Setup(format!("cannot create a Kafka client: {e}")))?;
        let local_dir = config.server.data_dir.join("kafka");
        std::fs::create_dir_all(&local_dir).map_err(|e| LogError::Io {
            path: local_dir.clone(),
            source: e,
        })?;
        tracing::info!(brokers = %k.brokers, topics = topics.len(), partitions, "Kafka log open");
        Ok(Arc::new_cyclic(|me| KafkaLog {
            me: me.clone(),
            limits: EventLimits::from_config(config),
            schema,
            partitions,
            client_config,
            fetch_wait_max: k.fetch_wait_max.0,
            idle_fetch_backoff: k.idle_fetch_backoff.0,
            dead_letter_topic: k.dead_letter_topic.clone(),
            topics,
            slot_of_view,
            streams,
            producer,
            meta,
            low_cache: Mutex::new(HashMap::new()),
            fetchers: Mutex::new(HashMap::new()),
            consumers: Consumers::default(),
            local_dir,
        }))
    }

    pub(crate) fn topic_of(&self, stream: StreamId) -> &Topic {
        &self.topics[(stream / self.partitions) as usize]
    }

    fn stream_of(&self, view: ViewId, partition: u32) -> StreamId {
        self.slot_of_view[usize::from(view)] * self.partitions + partition
    }

    fn watermarks(&self, stream: StreamId) -> Result<(u64, u64)> {
        let info = self
            .streams
            .get(stream as usize)
            .ok_or(LogError::NoPartition(stream))?;
        let topic = &self.topic_of(stream).name;
        let (low, high) = self
            .meta
            .fetch_watermarks(topic, info.partition as i32, WATERMARK_TIMEOUT)
            .map_err(|e| LogError::Unavailable(format!("watermarks of {}: {e}", info.name)))?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }

    pub(crate) fn low_watermark_now(&self, stream: StreamId) -> Result<u64> {
        let low = self.watermarks(stream)?.0;
        self.low_cache.lock().insert(stream, (Instant::now(), low));
        Ok(low)
    }

    pub(crate) fn high_watermark_now(&self, stream: StreamId) -> Result<u64> {
        Ok(self.watermarks(stream)?.1)
    }

    /// Records admitted and not yet acknowledged by Kafka.
    pub fn producer_queued(&self) -> usize {
        self.producer.shared.queued()
    }

    /// Bad records copied to the dead-letter topic so far.
    pub fn dead_letters(&self) -> u64 {
        self.producer
            .shared
            .dead_letters
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn send_batches(&self, batches: Vec<(u32, RecordBatch)>, ack: Ack) -> Result<Vec<Appended>> {
        // Where each record goes, checked whole before anything is sent.
        let mut plan: Vec<(StreamId, &[u8])> = Vec::new();
        for (p, batch) in &batches {
            if *p >= self.partitions {
                return Err(LogError::NoPartition(*p));
            }
            for payload in batch.iter() {
                let rec = quiver_core::record::decode(payload)
                    .map_err(|e| LogError::Setup(format!("an append carried a bad record: {e}")))?;
                let view = self
                    .schema
                    .view_id(rec.view)
                    .ok_or_else(|| LogError::Setup(format!("no view {:?}", rec.view)))?;
                if self.topics[self.slot_of_view[usize::from(view)] as usize].source {
                    return Err(LogError::Setup(format!(
                        "view {:?} is fed by a source topic",
                        rec.view
                    )));
                }
                plan.push((self.stream_of(view, *p), payload));
            }
        }
        let producer = self.producer.admit(plan.len())?;
        let mut counts: HashMap<StreamId, u64> = HashMap::new();
        for (s, _) in &plan {
            *counts.entry(*s).or_default() += 1;
        }
        let mut states = HashMap::new();
        let mut out = Vec::with_capacity(counts.len());
        let mut ids: Vec<StreamId> = counts.keys().copied().collect();
        ids.sort_unstable();
        for s in ids {
            let (tx, rx) = match ack {
                Ack::None => (None, None),
                _ => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    (Some(tx), Some(rx))
                }
            };
            states.insert(s, produce::AppendState::new(counts[&s], tx));
            out.push(Appended::pending(s, counts[&s], rx));
        }
        let mut value = Vec::new();
        for (s, payload) in plan {
            let state = &states[&s];
            let kafka = codec::to_kafka(payload, &mut value).expect("decoded above");
            let headers = kafka.dedup.map(|d| {
                OwnedHeaders::new().insert(Header {
                    key: DEDUP_HEADER,
                    value: Some(&d[..]),
                })
            });
            let send = produce::Out {
                topic: &self.topic_of(s).name,
                partition: self.streams[s as usize].partition,
                key: kafka.key.as_bytes(),
                value: &value,
                headers,
            };
            self.producer.send(&producer, send, state);
        }
        metrics::gauge!(quiver_core::telemetry::KAFKA_PRODUCER_QUEUED_RECORDS)
            .set(self.producer_queued() as f64);
        Ok(out)
    }
}

impl EventLog for KafkaLog {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn streams(&self) -> &[StreamInfo] {
        &self.streams
    }

    fn append(&self, batches: Vec<(u32, RecordBatch)>, ack: Ack) -> Result<Vec<Appended>> {
        self.send_batches(batches, ack)
    }

    fn open_reader(
        &self,
        from: &[(StreamId, u64)],
        purpose: ReadPurpose,
    ) -> Result<Box<dyn StreamReader>> {
        let me = self.me.upgrade().ok_or(LogError::ShuttingDown)?;
        // A scan is short and reads to a known end: a consumer of its own, gone with it.
        let (fetcher, owned) = if purpose == ReadPurpose::Scan {
            (read::Fetcher::start(self, purpose)?, true)
        } else {
            let mut fetchers = self.fetchers.lock();
            let f = match fetchers.get(&purpose) {
                Some(f) => f.clone(),
                None => {
                    let f = read::Fetcher::start(self, purpose)?;
                    fetchers.insert(purpose, f.clone());
                    f
                }
            };
            (f, false)
        };
        Ok(Box::new(read::KafkaReader::open(
            me, fetcher, owned, from, purpose,
        )?))
    }

    fn low_watermark(&self, stream: StreamId) -> Result<u64> {
        if let Some(&(at, low)) = self.low_cache.lock().get(&stream) {
            if at.elapsed() < LOW_WATERMARK_TTL {
                return Ok(low);
            }
        }
        self.low_watermark_now(stream)
    }

    fn high_watermark(&self, stream: StreamId) -> Result<u64> {
        self.high_watermark_now(stream)
    }

    /// Kafka keeps what its retention says: a consumer registered here protects nothing, but
    /// its offsets are kept (the history sink reports them).
    fn register_consumer(
        &self,
        name: &str,
        retention: Retention,
        initial: &dyn Fn(StreamId) -> u64,
    ) -> Arc<Consumer> {
        self.consumers
            .register(name, retention, self.streams.len() as u32, initial)
    }

    fn local_dir(&self) -> &Path {
        &self.local_dir
    }

    fn queued_records(&self) -> usize {
        self.producer_queued()
    }

    fn unavailable(&self) -> Option<String> {
        self.producer
            .fatal()
            .map(|r| format!("Kafka producer failed fatally ({r}); rebuilding"))
    }

    fn housekeeping(&self, _now_ms: i64) -> Option<u64> {
        metrics::gauge!(quiver_core::telemetry::KAFKA_PRODUCER_QUEUED_RECORDS)
            .set(self.producer_queued() as f64);
        None
    }

    fn shutdown(&self) {
        self.producer.flush(Duration::from_secs(5));
        for (_, f) in self.fetchers.lock().drain() {
            f.shutdown();
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Creates missing topics and checks every topic's partition count.
fn ensure_topics(
    config: &ClientConfig,
    topics: &[Topic],
    partitions: u32,
    replication: i32,
    dead_letter: Option<&str>,
) -> Result<()> {
    let meta: BaseConsumer = config
        .clone()
        .set("group.id", "quiver-meta")
        .create()
        .map_err(|e| LogError::Setup(format!("cannot create a Kafka client: {e}")))?;
    let existing = topic_partitions(&meta)?;
    let mut wanted: Vec<&str> = topics.iter().map(|t| t.name.as_str()).collect();
    wanted.extend(dead_letter);
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|t| !existing.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        create_topics(config, &missing, partitions, replication)?;
    }
    let existing = topic_partitions(&meta)?;
    for t in topics {
        match existing.get(&t.name) {
            Some(&n) if n == partitions => {}
            Some(&n) => {
                return Err(LogError::Setup(format!(
                    "Kafka topic {:?} has {n} partitions but kafka.partitions = {partitions}: every topic \
                     Quiver reads must have the same count (a key must be in the same partition of each); \
                     set kafka.partitions = {n} or repartition the topic",
                    t.name
                )))
            }
            None => return Err(LogError::Setup(format!("Kafka topic {:?} does not exist and could not be created", t.name))),
        }
    }
    Ok(())
}

fn topic_partitions(meta: &BaseConsumer) -> Result<HashMap<String, u32>> {
    let md = meta
        .fetch_metadata(None, SETUP_TIMEOUT)
        .map_err(|e| LogError::Setup(format!("cannot reach Kafka for metadata: {e}")))?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as u32))
        .collect())
}

fn create_topics(
    config: &ClientConfig,
    names: &[&str],
    partitions: u32,
    replication: i32,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = config
        .create()
        .map_err(|e| LogError::Setup(format!("cannot create a Kafka admin client: {e}")))?;
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions as i32, TopicReplication::Fixed(replication)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(SETUP_TIMEOUT));
    // The admin API is async; start-up may run inside a runtime, so block on a thread of its own.
    let results = std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok::<_, std::io::Error>(rt.block_on(admin.create_topics(&new, &opts)))
        })
        .join()
        .expect("the topic-creation thread does not panic")
    })
    .map_err(|e| LogError::Setup(format!("cannot run topic creation: {e}")))?
    .map_err(|e| LogError::Setup(format!("cannot create Kafka topics: {e}")))?;
    for r in results {
        match r {
            Ok(name) => tracing::info!(topic = name, partitions, "created Kafka topic"),
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = name, "topic created meanwhile by another node")
            }
            Err((name, code)) => {
                return Err(LogError::Setup(format!(
                    "cannot create Kafka topic {name:?}: {code}"
                )))
            }
        }
    }
    Ok(())
}
