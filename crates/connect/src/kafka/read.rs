//! Reading Kafka. Each purpose (the materializers, the history sink) shares one consumer —
//! one connection per broker and one fetch loop, however many partitions — whose partitions
//! are assigned by hand (no consumer group, so no rebalance ever pauses a partition), each
//! from an explicit offset. A fetch thread routes every record to the reader of its
//! partition through a bounded channel; readers turn records into Quiver's binary records on
//! their own threads. A record that is not a valid event of its view is skipped — counted by
//! reason, logged with its offset and, for the materializer, copied to the dead-letter topic —
//! and never stops its partition. Point-in-time scans get a consumer of their own.
//!
//! # Design constraints
//! - A reader's channel holds at most `CHANNEL_RECORDS_MAX` records; a full one holds up the
//!   fetch thread (and so every partition of that purpose), never memory.
//! - A record below a reader's position (fetched again after a seek) is dropped.
//! - Only the fetch thread changes the consumer's assignment (`reconcile`): readers register
//!   and drop routes, and ask for a re-seek; librdkafka refuses to assign a partition twice.
//! - `kafka.idle_fetch_backoff` (0 by default): with a broker that answers fetches at once
//!   when there is nothing new, the fetch thread, finding nothing for `IDLE_LOOK` once the
//!   broker has said every assigned partition is at its end, takes its partitions away for that
//!   long, then assigns them again where they stood. (Not before the broker has answered: a
//!   broker slower than `IDLE_LOOK` to answer the first fetch after an assignment had its
//!   answers thrown away by the pause, again and again, and nothing was ever read.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::telemetry as t;
use quiver_log::{LogError, ReadBatch, ReadPurpose, Result, StreamId, StreamReader};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::codec::{self, Incoming, DEDUP_HEADER};
use super::KafkaLog;

/// Longest a broker may stay silent (µs since it last sent anything) and still count as
/// answering: a fetch comes back at least every `fetch_wait_max` (500 ms by default).
const BROKER_SILENCE_MAX_US: i64 = 2_000_000;
/// Records waiting in one reader's channel.
const CHANNEL_RECORDS_MAX: usize = 8192;
/// With `idle_fetch_backoff`: how long the fetch thread looks for records before it pauses.
const IDLE_LOOK: Duration = Duration::from_millis(5);
/// Bad records logged per reader per minute; beyond it they are only counted.
const BAD_RECORD_LOGS_PER_MINUTE: u32 = 20;

/// What the consumer's statistics (every 500 ms) say: broker health and partition ends.
/// (rust-rdkafka has no safe call for librdkafka's cached watermarks.)
#[derive(Default)]
pub(crate) struct Health {
    /// The last time statistics showed a broker up.
    up_at: Mutex<Option<Instant>>,
    /// High watermark per (topic, partition).
    ends: Mutex<HashMap<(String, u32), u64>>,
}

pub(crate) struct ReaderContext {
    health: Arc<Health>,
}

impl ClientContext for ReaderContext {
    fn stats(&self, stats: Statistics) {
        // A broker counts as answering if it is up and sent something lately (a frozen
        // broker keeps its connection "UP" but sends nothing).
        let answering = stats.brokers.values().any(|b| {
            b.nodeid >= 0 && b.state == "UP" && (0..=BROKER_SILENCE_MAX_US).contains(&b.rxidle)
        });
        if answering {
            *self.health.up_at.lock() = Some(Instant::now());
        }
        let mut ends = self.health.ends.lock();
        for (name, topic) in &stats.topics {
            for (&p, part) in &topic.partitions {
                if p >= 0 && part.hi_offset >= 0 {
                    ends.insert((name.clone(), p as u32), part.hi_offset as u64);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka consumer");
    }
}

impl ConsumerContext for ReaderContext {}

type KafkaConsumer = BaseConsumer<ReaderContext>;

/// A record as the fetch thread hands it to a reader.
struct Owned {
    offset: u64,
    timestamp_ms: Option<i64>,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    dedup: Option<Vec<u8>>,
}

enum Item {
    Record(usize, Owned),
    /// The consumer reached the end of a partition of this number: the stream's position as
    /// the consumer has it then (past records it does not hand out, such as transaction
    /// markers). Sent after every record routed before it.
    Eof(usize, u64),
    /// Some assigned offset is out of range (the error does not say which).
    OutOfRange,
}

/// Where the fetch thread sends a partition's records.
struct Route {
    tx: SyncSender<Item>,
    /// The reader's index of the stream.
    index: usize,
    /// Offset after the last record routed (where an idle pause resumes).
    next: u64,
    /// The reader moved it: assign it again at `next`.
    reseek: bool,
}

type Key = (String, u32);

/// End-of-partition reports since the fetch thread last assigned its partitions whole, by
/// partition number (librdkafka does not say of which topic): it calls them idle only once
/// every assigned one may have reported its end. Two topics' partitions of one number need two
/// reports. Reports are forgotten only when the whole assignment is rebuilt (after a pause),
/// where every partition reports again; a partition assigned alone meanwhile (a reader opened or
/// sought) adds one report to wait for, and those already at their end keep theirs (librdkafka
/// reports an end once per new end: forgetting theirs would keep the thread from ever pausing
/// again). Known limit: a partition that reports twice stands in for another of its number — a
/// busy partition on a fast broker can so pause the fetch before a slow broker's partition of
/// the same number has answered (only with several brokers).
#[derive(Debug, Default)]
struct Ends(HashMap<u32, usize>);

impl Ends {
    fn reported(&mut self, partition: u32) {
        *self.0.entry(partition).or_default() += 1;
    }

    /// The assignment changed: what was reported was about the old one.
    fn forget(&mut self) {
        self.0.clear();
    }

    fn all_reported<'a>(&self, assigned: impl Iterator<Item = &'a Key>) -> bool {
        let mut wanted: HashMap<u32, usize> = HashMap::new();
        for (_, p) in assigned {
            *wanted.entry(*p).or_default() += 1;
        }
        wanted
            .iter()
            .all(|(p, n)| self.0.get(p).is_some_and(|seen| seen >= n))
    }
}

/// The routes, and whether the consumer's assignment must catch up with them. Only the fetch
/// thread assigns (librdkafka refuses to assign a partition twice, and readers come and go
/// while the fetch thread pauses).
#[derive(Default)]
struct Routing {
    routes: HashMap<Key, Route>,
    dirty: bool,
}

/// One consumer and its fetch thread, shared by the readers of one purpose.
pub(crate) struct Fetcher {
    routing: Arc<Mutex<Routing>>,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Fetcher {
    pub fn start(log: &KafkaLog, purpose: ReadPurpose) -> Result<Arc<Fetcher>> {
        let health = Arc::new(Health::default());
        let consumer = Arc::new(consumer(log, purpose, &health)?);
        let routing: Arc<Mutex<Routing>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (consumer, routing, stop) = (consumer.clone(), routing.clone(), stop.clone());
            let backoff = log.idle_fetch_backoff;
            std::thread::Builder::new()
                .name(format!("kafka-{}", purpose.name()))
                .spawn(move || fetch_loop(&consumer, &routing, &stop, backoff))
                .map_err(|e| LogError::Setup(format!("cannot start a fetch thread: {e}")))?
        };
        Ok(Arc::new(Fetcher {
            routing,
            health,
            stop,
            thread: Mutex::new(Some(thread)),
        }))
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn consumer(log: &KafkaLog, purpose: ReadPurpose, health: &Arc<Health>) -> Result<KafkaConsumer> {
    let mut config = log.client_config.clone();
    config
        .set("group.id", format!("quiver-{}", purpose.name()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        // Out of range is an error the reader turns into a gap, never a silent jump.
        .set("auto.offset.reset", "error")
        .set(
            "fetch.wait.max.ms",
            log.fetch_wait_max.as_millis().max(1).to_string(),
        )
        .set("fetch.min.bytes", "1")
        .set("queued.max.messages.kbytes", "16384")
        .set("statistics.interval.ms", "500");
    config
        .create_with_context(ReaderContext {
            health: health.clone(),
        })
        .map_err(|e| LogError::Setup(format!("cannot create a Kafka consumer: {e}")))
}

fn tpl<'a>(entries: impl Iterator<Item = (&'a Key, Option<u64>)>) -> Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, p), offset) in entries {
        let offset = offset.map_or(Offset::Invalid, |o| Offset::Offset(o as i64));
        tpl.add_partition_offset(topic, *p as i32, offset)
            .map_err(|e| LogError::Setup(e.to_string()))?;
    }
    Ok(tpl)
}

/// Polls the consumer and routes what it gets, until `stop`.
fn fetch_loop(
    consumer: &KafkaConsumer,
    routing: &Mutex<Routing>,
    stop: &AtomicBool,
    backoff: Duration,
) {
    let poll_for = if backoff.is_zero() {
        Duration::from_millis(20)
    } else {
        IDLE_LOOK
    };
    let mut assigned: HashMap<Key, ()> = HashMap::new();
    let mut ends = Ends::default();
    while !stop.load(Ordering::Acquire) {
        reconcile(consumer, routing, &mut assigned);
        match consumer.poll(poll_for) {
            Some(Ok(m)) => {
                let key = (m.topic().to_string(), m.partition().max(0) as u32);
                let offset = m.offset().max(0) as u64;
                let Some((tx, index)) = routing.lock().routes.get_mut(&key).and_then(|r| {
                    // Fetched again after a seek or an idle pause: already routed.
                    (offset >= r.next).then(|| {
                        r.next = offset + 1;
                        (r.tx.clone(), r.index)
                    })
                }) else {
                    continue;
                };
                let dedup = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == DEDUP_HEADER)
                        .and_then(|h| h.value.map(<[u8]>::to_vec))
                });
                let owned = Owned {
                    offset,
                    timestamp_ms: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    dedup,
                };
                send(&tx, Item::Record(index, owned), stop);
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                ends.reported(p.max(0) as u32);
                at_end(consumer, routing, p.max(0) as u32)
            }
            Some(Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset,
            ))) => broadcast(routing, |_| true, || Item::OutOfRange),
            Some(Err(e)) => tracing::debug!(error = %e, "Kafka consumer error"),
            None if !backoff.is_zero()
                && !assigned.is_empty()
                && ends.all_reported(assigned.keys()) =>
            {
                // Nothing new: take every partition away for `backoff`; the next reconcile
                // assigns them again where they stand.
                let all: Vec<Key> = assigned.keys().cloned().collect();
                set_assignment(consumer, &mut assigned, &[], &all);
                ends.forget();
                routing.lock().dirty = true;
                let until = Instant::now() + backoff;
                while Instant::now() < until && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(2).min(until - Instant::now()));
                }
            }
            None => {}
        }
    }
}

/// Brings the consumer's assignment in line with the routes: new and re-sought partitions
/// assigned at their offsets, gone ones unassigned.
fn reconcile(consumer: &KafkaConsumer, routing: &Mutex<Routing>, assigned: &mut HashMap<Key, ()>) {
    let mut r = routing.lock();
    if !r.dirty {
        return;
    }
    r.dirty = false;
    let mut remove: Vec<Key> = assigned
        .keys()
        .filter(|k| !r.routes.contains_key(*k))
        .cloned()
        .collect();
    let mut add = Vec::new();
    for (k, route) in r.routes.iter_mut() {
        if route.reseek && assigned.contains_key(k) {
            remove.push(k.clone());
        }
        if route.reseek || !assigned.contains_key(k) {
            add.push((k.clone(), route.next));
        }
        route.reseek = false;
    }
    drop(r);
    set_assignment(consumer, assigned, &add, &remove);
}

fn set_assignment(
    consumer: &KafkaConsumer,
    assigned: &mut HashMap<Key, ()>,
    add: &[(Key, u64)],
    remove: &[Key],
) {
    if !remove.is_empty() {
        match tpl(remove.iter().map(|k| (k, None))).map(|t| consumer.incremental_unassign(&t)) {
            Ok(Ok(())) => remove.iter().for_each(|k| {
                assigned.remove(k);
            }),
            Ok(Err(e)) => tracing::warn!(error = %e, "Kafka unassign failed"),
            Err(e) => tracing::warn!(error = %e, "Kafka unassign failed"),
        }
    }
    if !add.is_empty() {
        match tpl(add.iter().map(|(k, o)| (k, Some(*o)))).map(|t| consumer.incremental_assign(&t)) {
            Ok(Ok(())) => add.iter().for_each(|(k, _)| {
                assigned.insert(k.clone(), ());
            }),
            Ok(Err(e)) => tracing::warn!(error = %e, "Kafka assign failed"),
            Err(e) => tracing::warn!(error = %e, "Kafka assign failed"),
        }
    }
}

/// Sends, waiting while the reader's channel is full (unless stopping or the reader is gone).
fn send(tx: &SyncSender<Item>, mut item: Item, stop: &AtomicBool) {
    loop {
        match tx.try_send(item) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(back)) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                item = back;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// Tells the readers of partition number `p` (of any topic: the event does not say which)
/// where the consumer stands in it.
fn at_end(consumer: &KafkaConsumer, routing: &Mutex<Routing>, p: u32) {
    let Ok(positions) = consumer.position() else {
        return;
    };
    let routing = routing.lock();
    for e in positions.elements() {
        let key = (e.topic().to_string(), e.partition().max(0) as u32);
        if let (true, Offset::Offset(o), Some(r)) =
            (key.1 == p, e.offset(), routing.routes.get(&key))
        {
            let _ = r.tx.try_send(Item::Eof(r.index, o.max(0) as u64));
        }
    }
}

/// A signal to every reader of the matching partitions; a full channel already has work.
fn broadcast(routing: &Mutex<Routing>, matches: impl Fn(&Key) -> bool, item: impl Fn() -> Item) {
    for (k, r) in routing.lock().routes.iter() {
        if matches(k) {
            let _ = r.tx.try_send(item());
        }
    }
}

/// One topic-partition the reader reads.
struct Stream {
    id: StreamId,
    key: Key,
    view: quiver_core::schema::ViewId,
    source: bool,
    /// Offset of the next record to hand out.
    position: u64,
}

pub(crate) struct KafkaReader {
    log: Arc<KafkaLog>,
    fetcher: Arc<Fetcher>,
    /// A scan's own fetcher is stopped with the reader.
    owns_fetcher: bool,
    rx: Receiver<Item>,
    streams: Vec<Stream>,
    purpose: ReadPurpose,
    started: Instant,
    /// Bad records logged in the current minute (the rest are counted only).
    logged: (Instant, u32),
}

impl KafkaReader {
    pub fn open(
        log: Arc<KafkaLog>,
        fetcher: Arc<Fetcher>,
        owns_fetcher: bool,
        from: &[(StreamId, u64)],
        purpose: ReadPurpose,
    ) -> Result<KafkaReader> {
        let (tx, rx) = std::sync::mpsc::sync_channel(CHANNEL_RECORDS_MAX);
        let mut streams = Vec::with_capacity(from.len());
        {
            let mut routing = fetcher.routing.lock();
            for &(id, _) in from {
                let key = (
                    log.topic_of(id).name.clone(),
                    log.streams[id as usize].partition,
                );
                if routing.routes.contains_key(&key) {
                    return Err(LogError::Setup(format!(
                        "{}/{} already has a {} reader",
                        key.0,
                        key.1,
                        purpose.name()
                    )));
                }
            }
            for (index, &(id, offset)) in from.iter().enumerate() {
                let topic = log.topic_of(id);
                let key = (topic.name.clone(), log.streams[id as usize].partition);
                routing.routes.insert(
                    key.clone(),
                    Route {
                        tx: tx.clone(),
                        index,
                        next: offset,
                        reseek: false,
                    },
                );
                streams.push(Stream {
                    id,
                    key,
                    view: topic.view,
                    source: topic.source,
                    position: offset,
                });
            }
            routing.dirty = true;
        }
        Ok(KafkaReader {
            log,
            fetcher,
            owns_fetcher,
            rx,
            streams,
            purpose,
            started: Instant::now(),
            logged: (Instant::now(), 0),
        })
    }

    fn index(&self, id: StreamId) -> usize {
        self.streams
            .iter()
            .position(|s| s.id == id)
            .unwrap_or_else(|| panic!("stream {id} is not read by this reader"))
    }

    /// Hands one record over as a binary record, or skips it as bad.
    fn take(&mut self, i: usize, m: Owned, out: &mut ReadBatch) {
        let s = &self.streams[i];
        if m.offset < s.position {
            return; // routed before a seek moved past it
        }
        let ts = m.timestamp_ms.unwrap_or_else(quiver_core::time::now_ms);
        let incoming = Incoming {
            view: s.view,
            source: s.source,
            partition: s.key.1,
            partitions: self.log.partitions,
            key: m.key.as_deref(),
            value: m.value.as_deref(),
            dedup_header: m.dedup.as_deref(),
            timestamp_ms: ts,
        };
        let log = &self.log;
        let mut rejected = None;
        out.push_with(s.id, m.offset, ts, |buf| {
            match codec::from_kafka(&incoming, &log.schema, &log.limits, buf) {
                Ok(()) => true,
                Err(r) => {
                    rejected = Some(r);
                    false
                }
            }
        });
        self.streams[i].position = m.offset + 1;
        if let Some(r) = rejected {
            self.reject(i, &m, r);
        }
    }

    fn reject(&mut self, i: usize, m: &Owned, r: codec::Rejection) {
        if self.purpose != ReadPurpose::Materialize {
            return; // the materializer reports bad records; other readers just skip them
        }
        let (topic, partition) = &self.streams[i].key;
        metrics::counter!(t::KAFKA_RECORDS_REJECTED_TOTAL, "topic" => topic.clone(), "reason" => r.reason).increment(1);
        if self.logged.0.elapsed() >= Duration::from_secs(60) {
            self.logged = (Instant::now(), 0);
        }
        if self.logged.1 < BAD_RECORD_LOGS_PER_MINUTE {
            self.logged.1 += 1;
            tracing::warn!(topic = %topic, partition, offset = m.offset, reason = r.reason, error = %r.message, "bad Kafka record skipped");
        }
        if let Some(dlq) = &self.log.dead_letter_topic {
            let (p, o) = (partition.to_string(), m.offset.to_string());
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "quiver-source-topic",
                    value: Some(topic.as_bytes()),
                })
                .insert(Header {
                    key: "quiver-source-partition",
                    value: Some(p.as_bytes()),
                })
                .insert(Header {
                    key: "quiver-source-offset",
                    value: Some(o.as_bytes()),
                })
                .insert(Header {
                    key: "quiver-reason",
                    value: Some(r.reason.as_bytes()),
                })
                .insert(Header {
                    key: "quiver-error",
                    value: Some(r.message.as_bytes()),
                });
            self.log.producer.dead_letter(super::produce::Out {
                topic: dlq,
                partition: 0,
                key: m.key.as_deref().unwrap_or_default(),
                value: m.value.as_deref().unwrap_or_default(),
                headers: Some(headers),
            });
        }
    }

    /// After the broker said some offset is out of range: the first of this reader's streams
    /// whose position is below what its topic still keeps, as the error its caller turns
    /// into a gap.
    fn out_of_range(&self) -> Result<()> {
        for s in &self.streams {
            let first = self.log.low_watermark_now(s.id)?;
            if s.position < first {
                return Err(LogError::OffsetOutOfRange {
                    partition: s.id,
                    offset: s.position,
                    first,
                    next: self.log.high_watermark_now(s.id)?,
                });
            }
        }
        Ok(())
    }

    fn handle(&mut self, item: Item, out: &mut ReadBatch) -> Result<()> {
        match item {
            Item::Record(i, m) => self.take(i, m, out),
            Item::Eof(i, at) => {
                let s = &mut self.streams[i];
                s.position = s.position.max(at);
            }
            Item::OutOfRange => self.out_of_range()?,
        }
        Ok(())
    }
}

impl StreamReader for KafkaReader {
    fn poll(&mut self, records_max: usize, wait: Duration, out: &mut ReadBatch) -> Result<()> {
        out.clear();
        match self.rx.recv_timeout(wait) {
            Ok(item) => self.handle(item, out)?,
            Err(RecvTimeoutError::Timeout) => return Ok(()),
            Err(RecvTimeoutError::Disconnected) => return Err(LogError::ShuttingDown),
        }
        while out.len() < records_max {
            match self.rx.try_recv() {
                Ok(item) => self.handle(item, out)?,
                Err(_) => break,
            }
        }
        Ok(())
    }

    fn position(&self, stream: StreamId) -> u64 {
        self.streams[self.index(stream)].position
    }

    fn end(&self, stream: StreamId) -> u64 {
        let s = &self.streams[self.index(stream)];
        let seen = self.fetcher.health.ends.lock().get(&s.key).copied();
        seen.unwrap_or(0).max(s.position)
    }

    fn ends_confirmed_at(&self) -> Instant {
        self.fetcher.health.up_at.lock().unwrap_or(self.started)
    }

    fn seek(&mut self, stream: StreamId, offset: u64) -> Result<()> {
        let i = self.index(stream);
        self.streams[i].position = offset;
        let mut routing = self.fetcher.routing.lock();
        if let Some(r) = routing.routes.get_mut(&self.streams[i].key) {
            r.next = offset;
            r.reseek = true;
        }
        routing.dirty = true;
        Ok(())
    }

    fn streams(&self) -> Vec<StreamId> {
        self.streams.iter().map(|s| s.id).collect()
    }
}

impl Drop for KafkaReader {
    fn drop(&mut self) {
        {
            let mut routing = self.fetcher.routing.lock();
            for s in &self.streams {
                routing.routes.remove(&s.key);
            }
            routing.dirty = true;
        }
        if self.owns_fetcher {
            self.fetcher.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[(&str, u32)]) -> Vec<Key> {
        list.iter().map(|(t, p)| (t.to_string(), *p)).collect()
    }

    #[test]
    fn partitions_are_idle_only_once_the_broker_reported_each_at_its_end() {
        let assigned = keys(&[("a", 0), ("a", 1), ("b", 0)]);
        let mut ends = Ends::default();
        // Just assigned, no answer yet (a broker slower than `IDLE_LOOK`): not idle.
        assert!(!ends.all_reported(assigned.iter()));
        ends.reported(0);
        ends.reported(1);
        assert!(
            !ends.all_reported(assigned.iter()),
            "partition 0 of two topics needs two reports"
        );
        ends.reported(0);
        assert!(ends.all_reported(assigned.iter()));
        // A partition assigned alone (a reader opened): one more report to wait for; the
        // others keep theirs.
        let more = keys(&[("a", 0), ("a", 1), ("b", 0), ("c", 1)]);
        assert!(!ends.all_reported(more.iter()));
        ends.reported(1);
        assert!(ends.all_reported(more.iter()));
        ends.forget();
        assert!(!ends.all_reported(assigned.iter()), "assigned whole again");
        assert!(
            Ends::default().all_reported(std::iter::empty()),
            "nothing assigned"
        );
    }
}
