//! Quiver's embedded partitioned durable log.
//!
//! # Design constraints
//! - **P partitions**, fixed for the life of a data directory (a key's partition is
//!   `murmur2(key) % P`, as Kafka's producer computes it, so changing P would move keys).
//! - **Every record is framed with its length and a CRC32C** that also covers its offset and
//!   append time; readers, recovery and `quiver log verify` check it on every read.
//! - **Group commit through one journal**: one writer thread drains every partition's queue,
//!   writes each partition's records to its segment in one `write`, writes the same frames to
//!   the commit journal (`journal`), then fsyncs the journal once per round (`fsync = batch`),
//!   once per request (`always`), or never (`never`: no journal). Waiters are completed after
//!   the writes (`ack=written`) or after the fsync (`ack=durable`). Segments are fsynced at
//!   checkpoints (a full journal, a segment roll, shutdown, recovery).
//! - **Bounded**: at most `queue_records_max` records are queued or in flight over all
//!   partitions; an append over the bound fails at once with [`LogError::Full`] (the HTTP layer
//!   answers 503 + `Retry-After`). Segments are at most `segment_bytes` (one oversized record
//!   gets a segment of its own).
//! - **A failed write or fsync poisons the log** ([`LogError::Poisoned`]): after fsyncgate, the
//!   page cache cannot be trusted to hold what failed, so every later append is refused until
//!   a restart recovers from what is actually on disk.
//! - **Readers see only durable records**: nothing the store serves can be taken back by a crash.
//! - **Recovery** verifies the last segment of each partition frame by frame, truncates a torn
//!   tail (an incomplete or bad frame with nothing valid after it), and refuses to start if
//!   valid frames follow a bad one before the journal's checkpoint: that is damage to synced
//!   data, not a torn write. Past the checkpoint the segment is cut at the damage and the
//!   journal's frames are written back.
//!
//! # On-disk format
//! ```text
//! <data_dir>/log/
//!   p-0000/                       one directory per partition
//!     00000000000000000000.seg    segments, named by the offset of their first record
//!     00000000000000812345.seg
//!   journal-00000000000000000007  the commit journal, by generation (see `journal`; one file,
//!                                 two while a checkpoint syncs; none with fsync = never)
//!   offsets/<consumer>.offsets    committed consumer offsets (see `offsets`)
//!
//! segment = header, frame*
//!   header = "QVRLOG01" (8 bytes) | base offset (u64 LE)
//!   frame  = len (u32 LE) | crc32c (u32 LE) | offset (u64 LE) | append_ms (i64 LE) | payload (len bytes)
//!            crc32c covers offset | append_ms | payload
//! ```
//! Offsets are dense per partition: a segment's frames carry `base, base+1, …`. The payload is
//! opaque here (`quiver_core::record` defines it).

pub mod api;
pub mod consumers;
mod embedded;
mod error;
pub mod frame;
pub mod journal;
pub mod offsets;
mod partition;
mod reader;
pub mod segment;
pub mod threads;
pub mod tools;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use quiver_fsutil::seal::KeyRing;
use tokio::sync::oneshot;

pub use api::{Appended, Done, EventLog, ReadPurpose, StreamId, StreamInfo, StreamReader};
pub use consumers::{Consumer, Retention};
pub use error::{LogError, Result};
pub use offsets::OffsetStore;
pub use partition::SegmentMeta;
pub use quiver_core::config::FsyncPolicy;
pub use reader::{LogRecord, PartitionReader, ReadBatch};

pub(crate) fn now_ms() -> i64 {
    quiver_core::time::now_ms()
}

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub partitions: u32,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub queue_records_max: usize,
    pub group_commit_records_max: usize,
    pub retention_ms: i64,
    pub retention_bytes: Option<u64>,
    /// Bound on the whole log's bytes on disk: an append that would pass it is refused with
    /// [`LogError::DiskFull`] (retention cannot free what a lossless consumer still needs).
    pub disk_bytes_max: Option<u64>,
    /// `[storage] encryption_key_file`: every record written is sealed with the ring's newest
    /// key; sealed records are opened as they are read (see `frame::seal_aad`).
    pub sealer: Option<Arc<KeyRing>>,
}

impl LogOptions {
    pub fn from_config(c: &quiver_core::Config) -> LogOptions {
        LogOptions {
            partitions: c.log.partitions,
            fsync: c.log.fsync,
            segment_bytes: c.log.segment_bytes,
            queue_records_max: c.limits.ingest_queue_events_max,
            group_commit_records_max: c.log.group_commit_records_max,
            retention_ms: c.log.retention.as_ms(),
            retention_bytes: c.log.retention_bytes,
            disk_bytes_max: c.log.disk_bytes_max,
            sealer: None,
        }
    }
}

/// When an append's completion fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Not at all: offsets are reserved, the caller does not wait.
    None,
    /// After the records were written to the OS.
    Written,
    /// After they were fsynced (`fsync = never`: after the write).
    Durable,
}

/// Payloads bound for one partition, packed into one buffer.
#[derive(Debug, Default, Clone)]
pub struct RecordBatch {
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl RecordBatch {
    pub fn new() -> RecordBatch {
        RecordBatch::default()
    }

    /// Appends one payload, written by `write` into the shared buffer.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        write(&mut self.buf);
        self.ends.push(self.buf.len());
    }

    pub fn push(&mut self, payload: &[u8]) {
        self.push_with(|b| b.extend_from_slice(payload));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let p = &self.buf[start..end];
            start = end;
            p
        })
    }
}

/// Opens a reader of one partition at an offset (kept by multi-stream readers to re-seek).
pub(crate) type ReaderOpener = Box<dyn Fn(u32, u64) -> Result<PartitionReader> + Send>;

/// State shared by every partition: the admission bound and the poison flag.
pub(crate) struct Shared {
    #[cfg(feature = "failpoints")]
    pub(crate) fail_next_fsync: std::sync::atomic::AtomicBool,
    queued: AtomicUsize,
    queue_max: usize,
    /// Bytes of every segment of every partition (headers included), as written.
    pub(crate) disk_bytes: AtomicU64,
    /// fsyncs that made records durable (the journal's, one per group-commit round).
    pub(crate) durable_syncs: AtomicU64,
    poison: Mutex<Option<String>>,
}

impl Shared {
    fn admit(&self, n: usize) -> Result<()> {
        let mut cur = self.queued.load(Ordering::Relaxed);
        loop {
            if cur + n > self.queue_max {
                return Err(LogError::Full {
                    queued: cur,
                    max: self.queue_max,
                });
            }
            match self.queued.compare_exchange_weak(
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

    pub(crate) fn release(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        assert!(before >= n, "released more records than were admitted");
    }

    pub(crate) fn poisoned(&self) -> Option<String> {
        self.poison.lock().clone()
    }

    pub(crate) fn poison(&self, reason: &str) {
        let mut p = self.poison.lock();
        if p.is_none() {
            tracing::error!(reason, "log poisoned: refusing writes until restart");
            metrics::gauge!(quiver_core::telemetry::LOG_POISONED).set(1.0);
            *p = Some(reason.to_string());
        }
    }
}

pub struct Log {
    /// Held for the life of the log: a second process on the same directory fails to open.
    _lock: std::fs::File,
    /// Random identity created with the log (`ID` file): consumers that key what they write
    /// on offsets (the history sink) add it, so a log created anew never collides with an old one.
    id: String,
    dir: PathBuf,
    opts: LogOptions,
    parts: Vec<Arc<partition::PartitionShared>>,
    /// One stream per partition (see [`api`]).
    streams: Vec<StreamInfo>,
    shared: Arc<Shared>,
    consumers: consumers::Consumers,
    wake: Arc<writer::Wake>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Log {
    /// Opens the log in `dir` (`<data_dir>/log`), recovering every partition.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Log> {
        assert!(opts.partitions > 0 && opts.queue_records_max > 0);
        std::fs::create_dir_all(dir).map_err(error::io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(error::io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LogError::Locked(dir.to_path_buf()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(error::io(&lock_path)(e)),
        }
        let existing = tools::partition_dirs(dir)?;
        let id = log_id(dir, existing.is_empty())?;
        if !existing.is_empty() && existing.len() != opts.partitions as usize {
            return Err(LogError::Corrupt {
                partition: 0,
                segment: dir.display().to_string(),
                reason: format!(
                    "the log has {} partitions but log.partitions = {}: changing it would move keys \
                     to other partitions; use a new data_dir",
                    existing.len(),
                    opts.partitions
                ),
            });
        }
        let shared = Arc::new(Shared {
            #[cfg(feature = "failpoints")]
            fail_next_fsync: std::sync::atomic::AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            queue_max: opts.queue_records_max,
            disk_bytes: AtomicU64::new(0),
            durable_syncs: AtomicU64::new(0),
            poison: Mutex::new(None),
        });
        metrics::gauge!(quiver_core::telemetry::LOG_POISONED).set(0.0);
        let (parts, active, journal) = recover(dir, &opts)?;
        for part in &parts {
            let bytes: u64 = part.segments.read().iter().map(|s| s.bytes).sum();
            shared.disk_bytes.fetch_add(bytes, Ordering::AcqRel);
        }
        let wake = Arc::new(writer::Wake::default());
        let w = writer::Writer::new(
            parts.clone(),
            active,
            journal,
            dir.to_path_buf(),
            opts.clone(),
            shared.clone(),
            wake.clone(),
        )
        .map_err(error::io(dir))?;
        let handle = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || w.run())
            .map_err(error::io(dir))?;
        let streams = (0..opts.partitions)
            .map(|p| StreamInfo {
                log_id: id.clone(),
                partition: p,
                name: format!("p-{p:04}"),
                view: None,
            })
            .collect();
        Ok(Log {
            _lock: lock,
            streams,
            id,
            dir: dir.to_path_buf(),
            opts,
            parts,
            shared,
            consumers: consumers::Consumers::default(),
            wake,
            writer: Mutex::new(Some(handle)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn options(&self) -> &LogOptions {
        &self.opts
    }

    pub fn partitions(&self) -> u32 {
        self.opts.partitions
    }

    /// Appends batches to their partitions as one admission: all are queued or none is.
    /// Offsets are reserved now, so the result carries them even for `Ack::None`.
    pub fn append(&self, batches: Vec<(u32, RecordBatch)>, ack: Ack) -> Result<Vec<Appended>> {
        if let Some(reason) = self.shared.poisoned() {
            return Err(LogError::Poisoned(reason));
        }
        for (p, b) in &batches {
            if *p >= self.opts.partitions {
                return Err(LogError::NoPartition(*p));
            }
            if let Some(big) = b
                .iter()
                .map(<[u8]>::len)
                .find(|&l| l > frame::RECORD_BYTES_MAX)
            {
                return Err(LogError::RecordTooLarge(big));
            }
        }
        self.check_disk(
            batches
                .iter()
                .map(|(_, b)| (b.bytes() + b.len() * frame::FRAME_HEADER_BYTES) as u64)
                .sum(),
        )?;
        let total: usize = batches.iter().map(|(_, b)| b.len()).sum();
        self.shared.admit(total)?;
        let mut out = Vec::with_capacity(batches.len());
        let result = self.enqueue(batches, ack, &mut out);
        if !out.is_empty() {
            self.wake.notify();
        }
        result.map(|()| out)
    }

    /// Queues each batch on its partition, reserving its offsets; stops at shutdown.
    fn enqueue(
        &self,
        batches: Vec<(u32, RecordBatch)>,
        ack: Ack,
        out: &mut Vec<Appended>,
    ) -> Result<()> {
        let mut batches = batches.into_iter();
        while let Some((p, batch)) = batches.next() {
            if batch.is_empty() {
                continue;
            }
            let part = &self.parts[p as usize];
            let (tx, rx) = match ack {
                Ack::None => (None, None),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                }
            };
            let count = batch.len() as u64;
            let mut q = part.queue.lock();
            if q.shutdown {
                drop(q);
                // Nothing of this batch or the ones after it will be written.
                let left: usize = batches.map(|(_, b)| b.len()).sum();
                self.shared.release(batch.len() + left);
                return Err(LogError::ShuttingDown);
            }
            let first_offset = q.next_offset;
            q.next_offset += count;
            q.pending.push_back(partition::Pending {
                first_offset,
                batch,
                ack,
                done: tx,
                enqueued: Instant::now(),
            });
            drop(q);
            out.push(Appended::reserved(p, first_offset, count, rx));
        }
        Ok(())
    }

    pub fn reader(&self, partition: u32, from: u64) -> Result<PartitionReader> {
        let part = self
            .parts
            .get(partition as usize)
            .ok_or(LogError::NoPartition(partition))?;
        PartitionReader::new(part.clone(), from)
    }

    pub(crate) fn reader_opener(&self) -> ReaderOpener {
        let parts = self.parts.clone();
        Box::new(move |p, from| {
            let part = parts.get(p as usize).ok_or(LogError::NoPartition(p))?;
            PartitionReader::new(part.clone(), from)
        })
    }

    /// Offset after the last durable record of `partition`.
    pub fn durable_offset(&self, partition: u32) -> u64 {
        self.parts[partition as usize].durable_offset()
    }

    /// Offset the next append to `partition` will get.
    pub fn next_offset(&self, partition: u32) -> u64 {
        self.parts[partition as usize].queue.lock().next_offset
    }

    /// Offset of the oldest record still kept in `partition`.
    pub fn first_offset(&self, partition: u32) -> u64 {
        self.parts[partition as usize].first_offset()
    }

    pub fn segments(&self, partition: u32) -> Vec<SegmentMeta> {
        self.parts[partition as usize].segments.read().clone()
    }

    /// fsyncs that made records durable so far: one per group-commit round, however many
    /// partitions the round wrote (checkpoints and rolls not counted).
    pub fn durable_syncs(&self) -> u64 {
        self.shared.durable_syncs.load(Ordering::Acquire)
    }

    /// Records queued or being written, over all partitions.
    pub fn queued_records(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub fn poisoned(&self) -> Option<String> {
        self.shared.poisoned()
    }

    /// Registers a consumer whose progress retention must respect (see [`consumers`]);
    /// `initial(partition)` is the offset it recovered from its own store.
    pub fn register_consumer(
        &self,
        name: &str,
        retention: Retention,
        initial: impl Fn(u32) -> u64,
    ) -> Arc<Consumer> {
        self.consumers
            .register(name, retention, self.opts.partitions, initial)
    }

    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.consumers.list()
    }

    /// Bytes of all segments on disk, as written so far.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.disk_bytes.load(Ordering::Acquire)
    }

    /// Refuses an append of `bytes` (framed) that would take the log past `disk_bytes_max`.
    /// What is written is counted, what is queued is not: the bound can be passed by the
    /// appends in flight and by the header of a segment a roll opens.
    fn check_disk(&self, bytes: u64) -> Result<()> {
        let Some(max) = self.opts.disk_bytes_max else {
            return Ok(());
        };
        let used = self.disk_bytes();
        if used + bytes <= max {
            return Ok(());
        }
        let ends: Vec<u64> = (0..self.opts.partitions)
            .map(|p| self.durable_offset(p))
            .collect();
        Err(LogError::DiskFull {
            used,
            max,
            held_by: self.consumers.laggard(&ends).map(|(name, _)| name),
        })
    }

    /// Deletes sealed segments older than `retention` or beyond `retention_bytes`, except any
    /// holding offsets some lossless consumer has not committed past (the materializer's
    /// snapshot, the history sink: see [`consumers`]). Returns the number of segments deleted.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<usize> {
        let mut deleted = 0;
        for part in &self.parts {
            let keep_from = self.consumers.floor(part.id);
            loop {
                let victim = {
                    let segs = part.segments.read();
                    let total: u64 = segs.iter().map(|s| s.bytes).sum();
                    let Some(oldest) = segs.first() else { break };
                    let sealed = segs.len() > 1;
                    let too_old = now_ms - oldest.last_append_ms > self.opts.retention_ms;
                    let too_big = self.opts.retention_bytes.is_some_and(|max| total > max);
                    (sealed && oldest.next_offset <= keep_from && (too_old || too_big))
                        .then_some((oldest.base_offset, oldest.bytes))
                };
                let Some((base, bytes)) = victim else { break };
                let path = part.dir.join(segment::segment_name(base));
                // Forget it before unlinking: a reader opening it now gets OffsetOutOfRange.
                part.segments.write().retain(|s| s.base_offset != base);
                std::fs::remove_file(&path).map_err(error::io(&path))?;
                let before = self.shared.disk_bytes.fetch_sub(bytes, Ordering::AcqRel);
                assert!(before >= bytes, "disk bytes count every segment once");
                tracing::info!(partition = part.id, segment = %path.display(), "retention deleted a segment");
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Test hook: the next fsync of any partition fails as if the disk had refused it.
    #[cfg(feature = "failpoints")]
    pub fn inject_fsync_failure(&self) {
        self.shared.fail_next_fsync.store(true, Ordering::SeqCst);
    }

    /// Stops the writers after they drain what is queued; appends after this fail.
    pub fn shutdown(&self) {
        for part in &self.parts {
            part.queue.lock().shutdown = true;
            let _g = part.progress_lock.lock();
            part.progress.notify_all();
        }
        self.wake.notify();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

/// Opens every partition, writing back what the commit journal holds that the segments lost,
/// then fsyncs the segments and starts an empty journal (none with `fsync = never`): from
/// here on, what the journal held is in synced segments.
#[allow(clippy::type_complexity)]
fn recover(
    dir: &Path,
    opts: &LogOptions,
) -> Result<(
    Vec<Arc<partition::PartitionShared>>,
    Vec<writer::ActiveSegment>,
    Option<journal::Journal>,
)> {
    let journals = journal::read_all(dir, opts.partitions)?;
    let mut parts = Vec::new();
    let mut active = Vec::new();
    for p in 0..opts.partitions {
        // The oldest file's checkpoint is synced; the files, in order, hold what came after.
        let replay = journals.first().map(|oldest| partition::Replay {
            checkpoint: oldest.decoded.checkpoints[p as usize],
            frames: journals
                .iter()
                .flat_map(|j| {
                    let entries = j.decoded.entries.iter().filter(move |e| e.partition == p);
                    entries.map(|e| (e.offset, &j.bytes[e.frame.clone()]))
                })
                .collect(),
        });
        let pdir = segment::partition_dir(dir, p);
        let (part, segment) = partition::open(p, &pdir, opts.sealer.clone(), replay)?;
        parts.push(part);
        active.push(segment);
    }
    if opts.fsync == FsyncPolicy::Never {
        journal::remove_before(dir, u64::MAX)?;
        return Ok((parts, active, None));
    }
    for segment in &active {
        segment.file.sync_data().map_err(error::io(&segment.path))?;
    }
    let synced: Vec<u64> = parts.iter().map(|p| p.durable_offset()).collect();
    let generation = journals.last().map_or(0, |j| j.generation + 1);
    let journal = journal::Journal::create(dir, generation, &synced)?;
    journal::remove_before(dir, generation)?;
    Ok((parts, active, Some(journal)))
}

/// Reads the log's identity, creating it (atomically) for a new log.
fn log_id(dir: &Path, new: bool) -> Result<String> {
    let path = dir.join("ID");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error::io(&path)(e)),
    }
    if !new {
        // A log from before identities existed: give it one now.
        tracing::info!(dir = %dir.display(), "assigning an identity to an existing log");
    }
    let seed = format!(
        "{:?}{}{}",
        std::time::SystemTime::now(),
        std::process::id(),
        dir.display()
    );
    let id = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(seed.as_bytes()));
    quiver_fsutil::write_atomic(&path, id.as_bytes()).map_err(error::io(&path))?;
    Ok(id)
}

impl Drop for Log {
    fn drop(&mut self) {
        self.shutdown();
    }
}
