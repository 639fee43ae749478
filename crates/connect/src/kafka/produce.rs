//! Appending to Kafka: the idempotent producer (`acks=all`), a bounded count of records
//! admitted and not yet acknowledged, per-append completions fired by delivery reports, and a
//! new producer when the current one hits a fatal error.
//!
//! # Design constraints
//! - **Bounded**: at most `limits.ingest_queue_events_max` records are admitted and not yet
//!   acknowledged; an append over the bound fails at once with `LogError::Full` (ingest:
//!   `503 QUEUE_FULL`). librdkafka's own queue is set larger, so it never refuses first.
//! - **Acknowledged means in Kafka**: an append completes only when every one of its records
//!   has a delivery report without error; any failed record fails the append (the client
//!   retries; dedup ids make the retry apply once).
//! - **A fatal producer error** (the idempotent producer's sequence desynchronized, as after a
//!   broker lost its producer state) fails everything in flight and the next append builds a
//!   new producer, with a new producer id. So does losing every broker (at most one new
//!   producer a second while they stay away): a broker back without the old session's state
//!   must never answer a retry with "duplicate" for a batch it did not keep. Nothing
//!   acknowledged is affected; what the old producer still held fails and is retried.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use quiver_log::{LogError, Result};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tokio::sync::oneshot;

/// What one delivery report completes.
pub(crate) enum Delivery {
    Append(Arc<AppendState>),
    /// A copy of a bad record to the dead-letter topic: counted, never waited for.
    DeadLetter,
}

/// The records one append sent to one stream, and who waits for them.
pub(crate) struct AppendState {
    remaining: AtomicU64,
    /// Offset after the highest record delivered.
    next: AtomicU64,
    error: Mutex<Option<String>>,
    done: Mutex<Option<oneshot::Sender<Result<u64>>>>,
}

impl AppendState {
    pub fn new(count: u64, done: Option<oneshot::Sender<Result<u64>>>) -> Arc<AppendState> {
        assert!(count > 0, "an append sends at least one record");
        Arc::new(AppendState {
            remaining: AtomicU64::new(count),
            next: AtomicU64::new(0),
            error: Mutex::new(None),
            done: Mutex::new(done),
        })
    }

    /// One record's outcome; the last one completes the append.
    fn settle(&self, outcome: std::result::Result<u64, String>) {
        match outcome {
            Ok(offset) => {
                self.next.fetch_max(offset + 1, Ordering::AcqRel);
            }
            Err(e) => {
                self.error.lock().get_or_insert(e);
            }
        }
        let before = self.remaining.fetch_sub(1, Ordering::AcqRel);
        assert!(before > 0, "every record settles once");
        if before == 1 {
            let result = match self.error.lock().take() {
                Some(e) => Err(LogError::Unavailable(format!(
                    "Kafka did not acknowledge: {e}"
                ))),
                None => Ok(self.next.load(Ordering::Acquire)),
            };
            if let Some(done) = self.done.lock().take() {
                let _ = done.send(result);
            }
        }
    }
}

/// State the producer's callbacks share with the log.
pub(crate) struct Shared {
    admitted: AtomicUsize,
    admitted_max: usize,
    /// Set by a fatal error: the next append builds a new producer.
    fatal: AtomicBool,
    /// Set when every broker was lost: an append builds a new producer (at most one a second).
    outage: AtomicBool,
    fatal_reason: Mutex<Option<String>>,
    pub dead_letters: AtomicU64,
}

impl Shared {
    fn admit(&self, n: usize) -> Result<()> {
        let mut cur = self.admitted.load(Ordering::Relaxed);
        loop {
            if cur + n > self.admitted_max {
                return Err(LogError::Full {
                    queued: cur,
                    max: self.admitted_max,
                });
            }
            match self.admitted.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    fn release(&self, n: usize) {
        let before = self.admitted.fetch_sub(n, Ordering::AcqRel);
        assert!(before >= n, "released more records than were admitted");
    }

    pub fn queued(&self) -> usize {
        self.admitted.load(Ordering::Relaxed)
    }
}

pub(crate) struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as Code;
        match error.rdkafka_error_code() {
            Some(Code::Fatal) => {
                tracing::error!(%error, reason, "Kafka producer hit a fatal error; the next append builds a new one");
                *self.shared.fatal_reason.lock() = Some(reason.to_string());
                self.shared.fatal.store(true, Ordering::Release);
            }
            // Every broker lost: the next append (at most one a second) starts a new producer
            // session. A broker that comes back without the old session's state (as some
            // test brokers do) could otherwise acknowledge a retried batch as a duplicate it
            // never wrote; what the old session still held fails, and clients retry it.
            Some(Code::AllBrokersDown) => {
                tracing::warn!(%error, reason, "Kafka producer lost every broker");
                *self.shared.fatal_reason.lock() = Some(reason.to_string());
                self.shared.outage.store(true, Ordering::Release);
            }
            _ => tracing::warn!(%error, reason, "Kafka producer"),
        }
    }
}

impl ProducerContext for Context {
    type DeliveryOpaque = Box<Delivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Box<Delivery>) {
        match *opaque {
            Delivery::Append(state) => {
                self.shared.release(1);
                state.settle(match result {
                    Ok(m) => Ok(m.offset().max(0) as u64),
                    Err((e, _)) => Err(e.to_string()),
                });
            }
            Delivery::DeadLetter => {
                if let Err((e, m)) = result {
                    tracing::error!(error = %e, topic = m.topic(), "a bad record could not be copied to the dead-letter topic");
                } else {
                    self.shared.dead_letters.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

type Inner = ThreadedProducer<Context>;

/// While every broker stays lost, how often an append may start a new producer session.
const REBUILD_AFTER_OUTAGE_EVERY: Duration = Duration::from_secs(1);

/// The current producer and how to build the next.
pub(crate) struct KafkaProducer {
    config: ClientConfig,
    current: RwLock<Arc<Inner>>,
    built_at: Mutex<std::time::Instant>,
    pub shared: Arc<Shared>,
}

/// One record to send.
pub(crate) struct Out<'a> {
    pub topic: &'a str,
    pub partition: u32,
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub headers: Option<OwnedHeaders>,
}

impl KafkaProducer {
    pub fn new(
        base: &ClientConfig,
        admitted_max: usize,
        linger: Duration,
        delivery_timeout: Duration,
    ) -> Result<KafkaProducer> {
        let mut config = base.clone();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Kafka's default partitioner (the Java client's): what Quiver computes too. Quiver
            // names the partition of each record; this covers records it does not.
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger.as_millis().to_string())
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .set(
                "queue.buffering.max.messages",
                (admitted_max * 2 + 10_000).min(10_000_000).to_string(),
            )
            .set("queue.buffering.max.kbytes", "1048576");
        let shared = Arc::new(Shared {
            admitted: AtomicUsize::new(0),
            admitted_max,
            fatal: AtomicBool::new(false),
            outage: AtomicBool::new(false),
            fatal_reason: Mutex::new(None),
            dead_letters: AtomicU64::new(0),
        });
        let first = build(&config, &shared)?;
        Ok(KafkaProducer {
            config,
            current: RwLock::new(Arc::new(first)),
            built_at: Mutex::new(std::time::Instant::now()),
            shared,
        })
    }

    /// Admits `count` records (all or none), then the caller sends them.
    pub fn admit(&self, count: usize) -> Result<Arc<Inner>> {
        let outage = self.shared.outage.load(Ordering::Acquire)
            && self.built_at.lock().elapsed() >= REBUILD_AFTER_OUTAGE_EVERY;
        if self.shared.fatal.load(Ordering::Acquire) || outage {
            self.rebuild()?;
        }
        self.shared.admit(count)?;
        Ok(self.current.read().clone())
    }

    /// Sends one admitted record for `state`; a refusal settles it as failed.
    pub fn send(&self, producer: &Inner, out: Out<'_>, state: &Arc<AppendState>) {
        let mut rec =
            BaseRecord::with_opaque_to(out.topic, Box::new(Delivery::Append(state.clone())))
                .partition(out.partition as i32)
                .key(out.key)
                .payload(out.value);
        if let Some(h) = out.headers {
            rec = rec.headers(h);
        }
        if let Err((e, _)) = producer.send(rec) {
            self.shared.release(1);
            state.settle(Err(e.to_string()));
        }
    }

    /// Copies a record to the dead-letter topic, without waiting.
    pub fn dead_letter(&self, out: Out<'_>) {
        let producer = self.current.read().clone();
        let mut rec = BaseRecord::with_opaque_to(out.topic, Box::new(Delivery::DeadLetter))
            .key(out.key)
            .payload(out.value);
        if let Some(h) = out.headers {
            rec = rec.headers(h);
        }
        if let Err((e, _)) = producer.send(rec) {
            tracing::error!(error = %e, "a bad record could not be copied to the dead-letter topic");
        }
    }

    fn rebuild(&self) -> Result<()> {
        let mut current = self.current.write();
        let fatal = self.shared.fatal.swap(false, Ordering::AcqRel);
        let outage = self.shared.outage.swap(false, Ordering::AcqRel);
        if !fatal && !outage {
            return Ok(()); // another append rebuilt it meanwhile
        }
        let reason = self.shared.fatal_reason.lock().take().unwrap_or_default();
        let next = Arc::new(build(&self.config, &self.shared)?);
        let old = std::mem::replace(&mut *current, next);
        *self.built_at.lock() = std::time::Instant::now();
        tracing::warn!(reason, fatal, "built a new Kafka producer");
        // Dropping a producer purges and flushes (up to 500 ms): its pending appends fail.
        std::thread::spawn(move || drop(old));
        Ok(())
    }

    /// Why appends fail right now, if a fatal error is waiting for the next append's rebuild.
    pub fn fatal(&self) -> Option<String> {
        self.shared
            .fatal
            .load(Ordering::Acquire)
            .then(|| self.shared.fatal_reason.lock().clone().unwrap_or_default())
    }

    /// Fetches the producer's metadata for `topics`, so that the first append does not wait
    /// for it (about a second on a broker just started).
    pub fn warm_up(&self, topics: &[&str], timeout: Duration) {
        let p = self.current.read().clone();
        for t in topics {
            if let Err(e) = p.client().fetch_metadata(Some(t), timeout) {
                tracing::warn!(topic = t, error = %e, "Kafka producer metadata not ready yet");
            }
        }
    }

    /// Waits up to `timeout` for everything in flight (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let p = self.current.read().clone();
        if let Err(e) = p.flush(timeout) {
            tracing::warn!(error = %e, "Kafka producer did not flush everything before shutdown");
        }
    }
}

fn build(config: &ClientConfig, shared: &Arc<Shared>) -> Result<Inner> {
    config
        .create_with_context(Context {
            shared: shared.clone(),
        })
        .map_err(|e| LogError::Setup(format!("cannot create a Kafka producer: {e}")))
}
