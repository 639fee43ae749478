//! One materializer thread per partition: reads the partition's streams (one with the
//! embedded log, one per topic with Kafka) in order, applies their records to the store,
//! publishes each stream's applied offset (for `Quiver-Read-After`), and snapshots the
//! partition periodically and at shutdown.
//!
//! A periodic snapshot is taken online: the materializer copies its dedup window and hands
//! the rest to a thread of its own, which copies the rows while applying goes on, then asks
//! for the positions reached (the snapshot's end), and syncs and commits the file (see
//! [`snapshot`]). Only the final snapshot at shutdown is taken with the partition standing
//! still.
//!
//! Start-up recovery, per partition: load the snapshot, replay every stream from the
//! snapshot's start offset in it, leaving out of each row what it already holds (below the
//! snapshot's end). The store reports itself recovered once every partition has applied
//! everything its log held when the server started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::record;
use quiver_core::telemetry as t;
use quiver_log::threads::PartitionThreads;
use quiver_log::{
    Consumer, EventLog, OffsetStore, ReadBatch, ReadPurpose, Retention, StreamId, StreamReader,
};

use crate::snapshot::Loaded;
use crate::{snapshot, Applied, DedupWindow, Result, Store};

/// The materializer's name in the log's consumer offsets.
pub const CONSUMER: &str = "materializer";

/// How recently the log must have confirmed its end for a caught-up partition to count as
/// fresh (see the staleness gauge).
const FRESH_ENDS_AGE_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct MaterializerOptions {
    pub snapshot_dir: PathBuf,
    pub snapshot_interval: Duration,
    /// `[store] snapshot_change_ratio`: records applied since the last snapshot, as a
    /// fraction of its rows, before the next.
    pub snapshot_change_ratio: f64,
    pub dedup_window_events: usize,
    /// Records applied per read from the log (bounds the read buffer).
    pub poll_records_max: usize,
    /// Seals snapshots (`[storage] encryption_key_file`).
    pub sealer: Option<Arc<quiver_fsutil::seal::KeyRing>>,
}

pub struct Materializers {
    shared: Shared,
    /// One worker per partition materialized here.
    workers: PartitionThreads,
    errors: Arc<Mutex<Vec<String>>>,
}

/// What every worker, started now or later, is built from.
struct Shared {
    store: Arc<Store>,
    log: Arc<dyn EventLog>,
    opts: MaterializerOptions,
    offsets: OffsetStore,
    committed: Arc<Mutex<BTreeMap<u32, u64>>>,
    consumer: Arc<Consumer>,
    /// Partitions of the start-up set that have caught up, and how many there are.
    recovered: Arc<AtomicUsize>,
    initial: usize,
}

/// One stream of a partition as its worker tracks it.
struct Stream {
    id: StreamId,
    log_id: String,
    /// The log's end when the server started: recovery is done once this is applied.
    recovery_target: u64,
    /// The loaded snapshot's end in this stream: a record below it may be in its row already.
    covered_below: u64,
}

struct Worker {
    partition: u32,
    streams: Vec<Stream>,
    store: Arc<Store>,
    offsets: OffsetStore,
    committed: Arc<Mutex<BTreeMap<u32, u64>>>,
    consumer: Arc<Consumer>,
    reader: Box<dyn StreamReader>,
    dedup: DedupWindow,
    opts: MaterializerOptions,
    /// Counts towards the store's recovery (a partition of the start-up set).
    initial: Option<(Arc<AtomicUsize>, usize)>,
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
    /// The snapshot under way on a thread of its own.
    snapshotting: Option<SnapshotJob>,
}

/// A snapshot under way (see [`Worker::snapshot`]).
struct SnapshotJob {
    thread: JoinHandle<Result<()>>,
    /// Says when every row is copied: the worker answers on `ends` with its positions then.
    captured: mpsc::Receiver<()>,
    /// Taken once answered.
    ends: Option<mpsc::SyncSender<Vec<u64>>>,
}

impl Materializers {
    /// Loads snapshots and starts one thread per partition.
    pub fn start(
        store: Arc<Store>,
        log: Arc<dyn EventLog>,
        opts: MaterializerOptions,
    ) -> Result<Materializers> {
        let all: Vec<u32> = (0..log.partitions()).collect();
        Materializers::start_for(store, log, opts, &all)
    }

    /// [`Materializers::start`] for `partitions` only (a cluster node's share); the store is
    /// recovered once they have all caught up.
    pub fn start_for(
        store: Arc<Store>,
        log: Arc<dyn EventLog>,
        opts: MaterializerOptions,
        partitions: &[u32],
    ) -> Result<Materializers> {
        assert_eq!(
            store.partitions(),
            log.partitions(),
            "store and log agree on partitions"
        );
        assert_eq!(store.streams() as usize, log.streams().len());
        let offsets = OffsetStore::open(&log.local_dir().join("offsets"))?;
        let committed = Arc::new(Mutex::new(offsets.load(CONSUMER)?));
        // Retention keeps everything after each partition's last snapshot: recovery replays it.
        let consumer = log.register_consumer(CONSUMER, Retention::Protect, &|_| 0);
        if partitions.is_empty() {
            store.set_recovered();
        }
        let m = Materializers {
            shared: Shared {
                store,
                log,
                opts,
                offsets,
                committed,
                consumer,
                recovered: Arc::new(AtomicUsize::new(0)),
                initial: partitions.len(),
            },
            workers: PartitionThreads::default(),
            errors: Arc::new(Mutex::new(Vec::new())),
        };
        for (p, recovered) in m.recover_all(partitions) {
            m.start_worker(p, true, recovered?)?;
        }
        Ok(m)
    }

    /// Loads the snapshots of `partitions` side by side, as many at once as there are cores:
    /// one after the other, a restart took the sum of the loads.
    fn recover_all(&self, partitions: &[u32]) -> Vec<(u32, Result<Recovered>)> {
        let sh = &self.shared;
        let at_once = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut out = Vec::with_capacity(partitions.len());
        for chunk in partitions.chunks(at_once) {
            std::thread::scope(|scope| {
                let loads: Vec<_> = chunk
                    .iter()
                    .map(|&p| {
                        let load = move || recover(&sh.store, sh.log.as_ref(), &sh.opts, p);
                        (p, scope.spawn(load))
                    })
                    .collect();
                for (p, load) in loads {
                    // A panic stays a panic, as when the load ran on the caller's thread.
                    let result = load
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    out.push((p, result));
                }
            });
        }
        out
    }

    /// Starts materializing partition `p` (no-op if it runs): snapshot, then the log. The
    /// store says the partition is ready once it has caught up (make-before-break).
    pub fn add(&self, p: u32) -> Result<()> {
        if self.workers.contains(p) {
            return Ok(());
        }
        self.spawn_worker(p, false)
    }

    /// Stops materializing partition `p` (after a final snapshot) and drops its rows.
    pub fn remove(&self, p: u32) {
        if !self.workers.contains(p) {
            return;
        }
        // Not ready first: new requests go elsewhere, while reads already past the check
        // finish during the final snapshot, before the rows go.
        self.shared.store.set_partition_ready(p, false);
        self.workers.stop(p);
        self.shared.store.clear_partition(p);
    }

    /// The partitions materialized here.
    pub fn partitions(&self) -> Vec<u32> {
        self.workers.partitions()
    }

    fn spawn_worker(&self, p: u32, initial: bool) -> Result<()> {
        let sh = &self.shared;
        let recovered = recover(&sh.store, sh.log.as_ref(), &sh.opts, p)?;
        self.start_worker(p, initial, recovered)
    }

    /// Starts partition `p`'s thread from what [`recover`] loaded.
    fn start_worker(&self, p: u32, initial: bool, recovered: Recovered) -> Result<()> {
        let sh = &self.shared;
        let (streams, from, dedup) = recovered;
        for (s, &o) in streams.iter().zip(&from) {
            // A partition handed back to this node resumes from its last snapshot, which
            // covers what it applied before: offsets never go back.
            if o > sh.store.applied_offset(s.id) {
                sh.store.set_applied(s.id, o);
            }
            sh.consumer.commit(s.id, o);
        }
        let start: Vec<(StreamId, u64)> = streams.iter().map(|s| s.id).zip(from).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            partition: p,
            reader: sh.log.open_reader(&start, ReadPurpose::Materialize)?,
            streams,
            store: sh.store.clone(),
            offsets: sh.offsets.clone(),
            committed: sh.committed.clone(),
            consumer: sh.consumer.clone(),
            dedup,
            opts: sh.opts.clone(),
            initial: initial.then(|| (sh.recovered.clone(), sh.initial)),
            stop: stop.clone(),
            errors: self.errors.clone(),
            snapshotting: None,
        };
        self.workers.insert(p, stop, spawn(worker));
        Ok(())
    }

    /// Problems that stopped a partition (a corrupt record, an unwritable snapshot).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().clone()
    }

    /// Stops every thread after a final snapshot.
    pub fn shutdown(&self) {
        self.workers.stop_all();
    }
}

impl Drop for Materializers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn spawn(w: Worker) -> JoinHandle<()> {
    let name = format!("materializer-{}", w.partition);
    let (p, errors) = (w.partition, w.errors.clone());
    // A bug that panics must not leave a dead partition behind a ready server.
    let run = move || {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run())).is_err() {
            errors
                .lock()
                .push(format!("partition {p}: materializer panicked"));
        }
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(run)
        .expect("spawn a thread")
}

/// A partition's streams, the offset each resumes from, and its dedup window.
type Recovered = (Vec<Stream>, Vec<u64>, DedupWindow);

/// Loads partition `p`'s snapshot and decides where each of its streams resumes.
fn recover(
    store: &Store,
    log: &dyn EventLog,
    opts: &MaterializerOptions,
    p: u32,
) -> Result<Recovered> {
    let ids = log.partition_streams(p);
    let info = log.streams();
    // A snapshot the last run was killed in the middle of writing: its temporary (up to the
    // partition's size) would otherwise stay until the next snapshot overwrites it.
    match quiver_fsutil::remove_abandoned(&snapshot::snapshot_path(&opts.snapshot_dir, p)) {
        Ok(true) => tracing::info!(partition = p, "removed a snapshot abandoned mid-write"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(partition = p, error = %e, "could not remove an abandoned snapshot")
        }
    }
    let loaded = match snapshot::load(
        &opts.snapshot_dir,
        store,
        p,
        opts.dedup_window_events,
        opts.sealer.as_deref(),
    ) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(partition = p, error = %e, "ignoring a bad snapshot; replaying the whole log");
            store.clear_partition(p);
            None
        }
    };
    let loaded = loaded.filter(|l| {
        let known = ids
            .iter()
            .any(|&s| l.offset_of(&info[s as usize].log_id).is_some());
        if !known {
            // Offsets of another log (the log was recreated, or the backend changed) mean
            // nothing here: the rows cannot be placed in this log's history.
            tracing::warn!(
                partition = p,
                "snapshot belongs to another log; replaying the log instead"
            );
            store.clear_partition(p);
        }
        known
    });
    let mut streams = Vec::with_capacity(ids.len());
    let mut from = Vec::with_capacity(ids.len());
    for &s in &ids {
        let log_id = info[s as usize].log_id.clone();
        let covered_below = loaded.as_ref().map_or(0, |l| l.covered_below(&log_id));
        let start = start_offset(
            log,
            s,
            loaded.as_ref().and_then(|l| l.offset_of(&log_id)),
            covered_below,
            opts,
            p,
        )?;
        streams.push(Stream {
            id: s,
            log_id,
            recovery_target: log.high_watermark(s)?,
            covered_below,
        });
        from.push(start);
    }
    let dedup = loaded.map_or_else(
        || DedupWindow::new(opts.dedup_window_events),
        |l: Loaded| l.dedup,
    );
    Ok((streams, from, dedup))
}

/// Where stream `s` resumes: the snapshot's offset in it, moved up to the oldest record kept.
/// `covered_below` is the snapshot's end in it: its rows may hold records up to there.
fn start_offset(
    log: &dyn EventLog,
    s: StreamId,
    snapshot: Option<u64>,
    covered_below: u64,
    opts: &MaterializerOptions,
    p: u32,
) -> Result<u64> {
    let (first, end) = (log.low_watermark(s)?, log.high_watermark(s)?);
    let from = snapshot.unwrap_or(0);
    if from.max(covered_below) > end {
        // Only possible with `fsync = never` (or a Kafka topic recreated): the snapshot saw
        // records the log no longer has. Offsets will be reused (and, below the snapshot's
        // end, new records taken for ones its rows hold), so it cannot be trusted.
        let from = from.max(covered_below);
        tracing::error!(
            partition = p,
            stream = s,
            snapshot = from,
            log_end = end,
            "snapshot is ahead of the log"
        );
        return Err(crate::StoreError::CorruptSnapshot {
            path: snapshot::snapshot_path(&opts.snapshot_dir, p),
            reason: format!(
                "covers offset {from} of stream {} but the log ends at {end} (records lost with \
                 fsync = never, or a topic recreated?); remove the snapshot to rebuild from the log",
                log.streams()[s as usize].name
            ),
        });
    }
    if from < first {
        if snapshot.is_some() || first > 0 {
            tracing::error!(
                partition = p,
                stream = s,
                from,
                first,
                "retention deleted records no snapshot covers; they are lost"
            );
        }
        return Ok(first);
    }
    Ok(from)
}

impl Worker {
    fn run(mut self) {
        let p = self.partition;
        let label = p.to_string();
        let lag = metrics::gauge!(t::MATERIALIZER_LAG_RECORDS, "partition" => label.clone());
        let staleness =
            metrics::gauge!(t::MATERIALIZER_STALENESS_SECONDS, "partition" => label.clone());
        let applied_gauge = metrics::gauge!(t::MATERIALIZER_APPLIED_OFFSET, "partition" => label);
        let mut batch = ReadBatch::default();
        let mut last_snapshot = Instant::now();
        let mut snapshotted = self.positions();
        let mut snapshot_rows = self.store.rows_in(p);
        let mut recovered = false;
        let mut fresh_at = Instant::now();
        loop {
            if !recovered && self.caught_up_with_start() {
                recovered = true;
                self.store.set_partition_ready(p, true);
                if let Some((count, of)) = &self.initial {
                    if count.fetch_add(1, Ordering::AcqRel) + 1 == *of {
                        self.store.set_recovered();
                        tracing::info!(rows = self.store.rows(), "store recovered");
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            // Here, not after applying, so that a snapshot waiting for its end is answered on
            // every path through the loop (a broker away included). One that failed stops the
            // partition now, as a failed write did when it ran on this thread.
            if let Err(e) = self.tend_snapshot() {
                self.fail(format!("partition {p}: snapshot failed: {e}"));
                return;
            }
            let polled = self.reader.poll(
                self.opts.poll_records_max,
                Duration::from_millis(50),
                &mut batch,
            );
            match polled {
                Ok(()) => {}
                // Only Kafka's retention can take records from under the materializer (the
                // embedded log's keeps what the snapshots need): say what is lost, go on.
                Err(quiver_log::LogError::OffsetOutOfRange {
                    partition: stream,
                    offset,
                    first,
                    ..
                }) => {
                    tracing::error!(
                        partition = p,
                        stream,
                        from = offset,
                        to = first,
                        "the log deleted records before they were applied; they are lost"
                    );
                    if let Err(e) = self.reader.seek(stream, first) {
                        self.fail(format!("partition {p}: {e}"));
                        return;
                    }
                    continue;
                }
                // A broker away: the reader reconnects by itself; the staleness gauge grows.
                Err(quiver_log::LogError::Unavailable(reason)) => {
                    tracing::debug!(partition = p, reason, "log unavailable; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => {
                    self.fail(format!("partition {p}: {e}"));
                    return;
                }
            }
            self.apply(&batch);
            let positions = self.positions();
            let behind: u64 = self
                .streams
                .iter()
                .zip(&positions)
                .map(|(s, &o)| self.reader.end(s.id).saturating_sub(o))
                .sum();
            if behind == 0 && self.reader.ends_confirmed_at().elapsed() <= FRESH_ENDS_AGE_MAX {
                fresh_at = Instant::now();
            }
            applied_gauge.set(positions.iter().sum::<u64>() as f64);
            lag.set(behind as f64);
            self.store.set_partition_lag(p, behind);
            staleness.set(fresh_at.elapsed().as_secs_f64());
            if self.snapshot_due(&positions, &snapshotted, snapshot_rows, last_snapshot) {
                match self.snapshot(&positions, false) {
                    Ok(false) => {} // the previous one is still syncing: due again next round
                    Ok(true) => {
                        snapshotted = positions;
                        snapshot_rows = self.store.rows_in(p);
                        last_snapshot = Instant::now();
                    }
                    Err(e) => {
                        self.fail(format!("partition {p}: snapshot failed: {e}"));
                        return;
                    }
                }
            }
        }
        let positions = self.positions();
        let last = self.wait_snapshot();
        let last = last.and_then(|()| match positions != snapshotted {
            true => self.snapshot(&positions, true).map(drop),
            false => Ok(()),
        });
        if let Err(e) = last {
            tracing::error!(partition = p, error = %e, "final snapshot failed");
        }
    }

    /// Applies one read's records and publishes the streams' applied offsets.
    fn apply(&mut self, batch: &ReadBatch) {
        let p = self.partition;
        let mut late = crate::LateCounts::default();
        let (mut applied, mut duplicates) = (0, 0);
        for rec in batch.iter() {
            let covered_below = self
                .streams
                .iter()
                .find(|s| s.id == rec.stream)
                .map_or(0, |s| s.covered_below);
            match record::decode(rec.payload) {
                Ok(decoded) => {
                    let dedup = &mut self.dedup;
                    let offset = rec.offset;
                    match (self.store).apply_from(
                        p,
                        offset,
                        &decoded,
                        dedup,
                        &mut late,
                        covered_below,
                    ) {
                        Applied::Changed | Applied::Late => applied += 1,
                        Applied::Duplicate => duplicates += 1,
                        // Counted when it was first applied, before the snapshot.
                        Applied::Skipped | Applied::Covered => {}
                    }
                }
                // The log checked these bytes (frame checksum, or the Kafka backend's
                // transcoding): a record this version cannot decode. Skip it loudly rather
                // than stop the partition.
                Err(e) => {
                    tracing::error!(partition = p, stream = rec.stream, offset = rec.offset, error = %e, "undecodable record skipped")
                }
            }
        }
        metrics::counter!(t::EVENTS_APPLIED_TOTAL).increment(applied);
        metrics::counter!(t::EVENTS_DUPLICATE_TOTAL).increment(duplicates);
        metrics::counter!(t::VALUES_LATE_TOTAL).increment(late.values);
        metrics::counter!(t::AGGREGATION_LATE_DROPPED_TOTAL).increment(late.aggregations);
        for s in &self.streams {
            let position = self.reader.position(s.id);
            if position > self.store.applied_offset(s.id) {
                self.store.set_applied(s.id, position);
            }
        }
    }

    fn positions(&self) -> Vec<u64> {
        self.streams
            .iter()
            .map(|s| self.reader.position(s.id))
            .collect()
    }

    fn caught_up_with_start(&self) -> bool {
        self.streams
            .iter()
            .all(|s| self.reader.position(s.id) >= s.recovery_target)
    }

    /// Whether to snapshot now: something changed, `snapshot_interval` has passed, and the
    /// records since the last snapshot (`rows` rows) reach `snapshot_change_ratio` of it. A
    /// full rewrite then costs at most 1 / ratio rows per record applied, not a partition
    /// per interval however little changed.
    fn snapshot_due(&self, positions: &[u64], last: &[u64], rows: usize, at: Instant) -> bool {
        let applied: u64 = positions
            .iter()
            .zip(last)
            .map(|(now, then)| now.saturating_sub(*then))
            .sum();
        applied > 0
            && at.elapsed() >= self.opts.snapshot_interval
            && applied as f64 >= self.opts.snapshot_change_ratio * rows as f64
    }

    /// Starts a snapshot as of `positions` (S): the dedup window is copied here, the rest —
    /// rows copied while applying goes on, the end positions asked for
    /// ([`tend_snapshot`](Self::tend_snapshot)), fsync, rename, offsets committed, retention
    /// released — runs on a thread of its own; all of it on this thread with `wait` (at
    /// shutdown, the partition standing still: the end is S). False, and nothing done, while
    /// the previous snapshot is still under way.
    fn snapshot(&mut self, positions: &[u64], wait: bool) -> Result<bool> {
        if self
            .snapshotting
            .as_ref()
            .is_some_and(|job| !job.thread.is_finished())
        {
            return Ok(false);
        }
        self.wait_snapshot()?;
        let started = Instant::now();
        let work = SnapshotWork {
            store: self.store.clone(),
            dir: self.opts.snapshot_dir.clone(),
            sealer: self.opts.sealer.clone(),
            offsets: (self.streams.iter())
                .zip(positions)
                .map(|(s, &o)| (s.log_id.clone(), o))
                .collect(),
            dedup: self.dedup.iter().collect(),
            commit: SnapshotCommit {
                partition: self.partition,
                positions: (self.streams.iter().map(|s| s.id))
                    .zip(positions.iter().copied())
                    .collect(),
                offsets: self.offsets.clone(),
                committed: self.committed.clone(),
                consumer: self.consumer.clone(),
                started,
            },
        };
        let (captured_tx, captured) = mpsc::sync_channel(1);
        let (ends, ends_rx) = mpsc::sync_channel(1);
        if wait {
            ends.send(positions.to_vec()).expect("the receiver is here");
            let done = work.run(self.partition, &captured_tx, &ends_rx);
            // Standing still, the whole snapshot is the pause.
            metrics::histogram!(t::SNAPSHOT_PAUSE_SECONDS).record(started.elapsed().as_secs_f64());
            return done.map(|()| true);
        }
        let p = self.partition;
        let thread = std::thread::Builder::new()
            .name(format!("snapshot-{p}"))
            .spawn(move || {
                // A resize under way is finished first, at normal priority: the walk would
                // help finish it, and the materializer waits for an entry being moved.
                work.store.finish_resizes(p);
                yield_to_serving();
                work.run(p, &captured_tx, &ends_rx)
            })
            .map_err(crate::error::io(&self.opts.snapshot_dir))?;
        metrics::histogram!(t::SNAPSHOT_PAUSE_SECONDS).record(started.elapsed().as_secs_f64());
        self.snapshotting = Some(SnapshotJob {
            thread,
            captured,
            ends: Some(ends),
        });
        Ok(true)
    }

    /// Answers a snapshot whose rows are all copied with the positions reached — everything
    /// a copied row can hold was applied below them — and collects a finished one's outcome.
    fn tend_snapshot(&mut self) -> Result<()> {
        let Some(job) = &self.snapshotting else {
            return Ok(());
        };
        if job.ends.is_some() && job.captured.try_recv().is_ok() {
            let ends = self.positions();
            let job = self.snapshotting.as_mut().expect("checked above");
            // A thread that ended meanwhile says why through its join.
            let _ = job.ends.take().expect("checked above").send(ends);
        }
        match self.snapshotting.as_ref() {
            Some(job) if job.thread.is_finished() => self.wait_snapshot(),
            _ => Ok(()),
        }
    }

    /// Waits for the snapshot under way, if any (answering it if it waits for its end), and
    /// returns its outcome; an abandoned one is no failure (the next is taken when due).
    fn wait_snapshot(&mut self) -> Result<()> {
        let Some(mut job) = self.snapshotting.take() else {
            return Ok(());
        };
        if let Some(ends) = job.ends.take() {
            // An error instead means the thread ended early; its join says why.
            if job.captured.recv().is_ok() {
                let _ = ends.send(self.positions());
            }
        }
        match job.thread.join() {
            Ok(result) => forgive_abandoned(self.partition, result),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    fn fail(&mut self, message: String) {
        // A snapshot under way finishes (or fails) first: its file and offsets stay whole.
        if let Err(e) = self.wait_snapshot() {
            self.errors.lock().push(format!(
                "partition {}: snapshot failed: {e}",
                self.partition
            ));
        }
        tracing::error!(%message, "materializer stopped");
        self.errors.lock().push(message);
    }
}

/// A snapshot's outcome as the partition takes it: an abandoned snapshot is logged and
/// forgiven (the partition goes on; the next is taken when due), any other error stops it.
fn forgive_abandoned(partition: u32, outcome: Result<()>) -> Result<()> {
    match outcome {
        Err(crate::StoreError::SnapshotAbandoned(reason)) => {
            tracing::warn!(
                partition,
                reason,
                "snapshot abandoned; the next is taken when due"
            );
            Ok(())
        }
        other => other,
    }
}

/// Lowers the calling thread (a snapshot's) below the materializers and request handlers:
/// `SCHED_BATCH`, so a waking normal thread preempts it at once, at nice 10, so when both
/// want a core it gets about a tenth of a normal thread's share — slowed down under full
/// load, never starved (`SCHED_IDLE` could starve it, and retention waits for snapshots).
/// Measured in BENCHMARKS.md ("Online snapshots"). Refused: a warning, normal priority.
fn yield_to_serving() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::unix::{
            set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
            ThreadSchedulePolicy,
        };
        use thread_priority::{ThreadPriority, ThreadPriorityValue};
        let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        // The crate maps 0..=99 onto nice 19..=-20 (no way to name a nice value on Linux):
        // 22 is nice 10, as the test below checks.
        let nice_10 = ThreadPriorityValue::try_from(22u8).expect("within 0..=99");
        let set = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Crossplatform(nice_10),
            batch,
        );
        if let Err(e) = set {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!(error = ?e, "snapshot threads run at normal priority: SCHED_BATCH refused");
            });
        }
    }
}

/// A snapshot taken beside the materializer: what it needs of the worker, copied.
struct SnapshotWork {
    store: Arc<Store>,
    dir: PathBuf,
    sealer: Option<Arc<quiver_fsutil::seal::KeyRing>>,
    /// S: each stream's position when the snapshot began.
    offsets: Vec<(String, u64)>,
    /// The dedup window at S.
    dedup: Vec<u128>,
    commit: SnapshotCommit,
}

impl SnapshotWork {
    /// Copies the rows, says so on `captured`, waits for the end positions on `ends`, then
    /// finishes and commits the file.
    fn run(
        self,
        p: u32,
        captured: &mpsc::SyncSender<()>,
        ends: &mpsc::Receiver<Vec<u64>>,
    ) -> Result<()> {
        let store = &self.store;
        let mut snap = snapshot::Snapshot::begin(&self.dir, store, p, &self.offsets, self.sealer)?;
        snap.capture(store, || {})?;
        // At shutdown nobody listens: the end is already waiting.
        let _ = captured.send(());
        let ends = ends.recv().map_err(|_| {
            let stopped =
                std::io::Error::other("the materializer stopped before the snapshot ended");
            crate::error::io(&self.dir)(stopped)
        })?;
        let written = snap.finish(&ends, self.dedup.into_iter())?;
        self.commit.run(written)
    }
}

/// What is left of a snapshot once its rows are written: it needs the disk, not the store.
struct SnapshotCommit {
    partition: u32,
    positions: Vec<(StreamId, u64)>,
    offsets: OffsetStore,
    committed: Arc<Mutex<BTreeMap<u32, u64>>>,
    consumer: Arc<Consumer>,
    started: Instant,
}

impl SnapshotCommit {
    fn run(self, written: snapshot::Written) -> Result<()> {
        let bytes = written.commit()?;
        let mut committed = self.committed.lock();
        for &(stream, offset) in &self.positions {
            committed.insert(stream, offset);
        }
        self.offsets.commit(CONSUMER, &committed)?;
        drop(committed);
        // Only once the snapshot and its offsets are durable may retention pass them.
        for &(stream, offset) in &self.positions {
            self.consumer.commit(stream, offset);
        }
        metrics::histogram!(t::SNAPSHOT_SECONDS).record(self.started.elapsed().as_secs_f64());
        tracing::debug!(
            partition = self.partition,
            positions = ?self.positions,
            bytes,
            "snapshot written"
        );
        Ok(())
    }
}

#[cfg(test)]
mod outcome_tests {
    use crate::StoreError;

    #[test]
    fn an_abandoned_snapshot_is_forgiven_and_a_failed_one_is_not() {
        let abandoned = Err(StoreError::SnapshotAbandoned("a row never settled".into()));
        assert!(super::forgive_abandoned(0, abandoned).is_ok());
        let failed = Err(StoreError::Io {
            path: "snap".into(),
            source: std::io::Error::other("disk full"),
        });
        assert!(super::forgive_abandoned(0, failed).is_err());
        assert!(super::forgive_abandoned(0, Ok(())).is_ok());
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// `policy` and nice of the calling thread, from `/proc`.
    fn schedule() -> (u32, i32) {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").unwrap();
        let policy = sched
            .lines()
            .find_map(|l| {
                l.strip_prefix("policy")?
                    .split(':')
                    .nth(1)?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap();
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the name (which may hold spaces); nice is field 19.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let nice = after.split(' ').nth(16).unwrap().parse().unwrap();
        (policy, nice)
    }

    #[test]
    fn snapshot_threads_run_as_batch_work_at_nice_10() {
        let (policy, nice) = std::thread::spawn(schedule).join().unwrap();
        assert_eq!(policy, 0, "SCHED_OTHER before");
        let lowered = std::thread::spawn(|| {
            super::yield_to_serving();
            schedule()
        })
        .join()
        .unwrap();
        // Under a `nice` above 10 (tests run niced) the thread keeps it: raising priority
        // back needs a capability.
        assert_eq!(lowered, (3, nice.max(10)), "SCHED_BATCH (3) at nice 10");
    }
}
