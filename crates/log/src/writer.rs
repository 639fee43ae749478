//! The log writer: one thread for every partition. Each round it drains what every
//! partition has queued, writes each partition's frames to its segment, writes the same frames
//! to the commit journal, fsyncs the journal once, then completes the round's waiters.
//!
//! Why one thread and one fsync per round (BENCHMARKS.md, "Thread model"): on the default
//! 8 partitions, a writer per partition paid a wake-up and an fsync per partition per round —
//! with 100-event requests, 8 of each per request — and those fsyncs were most of the
//! server's ingest CPU. Framing costs well under a microsecond per record, so one thread frames
//! far more than a partition log can take; what limits a round is its one fsync.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::error::{io, LogError, Result};
use crate::frame::{self, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use crate::journal::{self, Journal};
use crate::partition::{self, PartitionShared, Pending};
use crate::{Ack, FsyncPolicy, LogOptions, Shared};

/// An append's signal to the writer: set after a request is queued, cleared by the writer
/// before it looks at the queues, so a request queued while it looks is never missed (the
/// flag stays set and the next wait returns at once).
#[derive(Default)]
pub(crate) struct Wake {
    flag: Mutex<bool>,
    cond: Condvar,
}

impl Wake {
    pub fn notify(&self) {
        *self.flag.lock() = true;
        self.cond.notify_one();
    }

    fn wait(&self) {
        let mut flag = self.flag.lock();
        while !*flag {
            self.cond.wait(&mut flag);
        }
        *flag = false;
    }
}

/// The segment a partition appends to.
pub(crate) struct ActiveSegment {
    pub file: File,
    pub path: PathBuf,
    pub len: u64,
}

pub(crate) struct Writer {
    pub parts: Vec<Arc<PartitionShared>>,
    pub active: Vec<ActiveSegment>,
    /// `None` with `fsync = never`: nothing is synced, so nothing needs journaling.
    pub journal: Option<Journal>,
    pub log_dir: PathBuf,
    pub opts: LogOptions,
    pub shared: Arc<Shared>,
    pub wake: Arc<Wake>,
    checkpointer: Checkpointer,
    /// Partitions written since the last checkpoint: their segments are fsynced at the next.
    unsynced: Vec<bool>,
    /// Where the next round starts draining, so no partition is always last under the bound.
    start: usize,
    buf: Vec<u8>,
    entries: Vec<u8>,
}

/// What one pass over the queues took.
struct Collected {
    records: usize,
    /// Something is still queued (the round's bound was reached).
    more: bool,
    shutdown: bool,
}

impl Writer {
    pub fn new(
        parts: Vec<Arc<PartitionShared>>,
        active: Vec<ActiveSegment>,
        journal: Option<Journal>,
        log_dir: PathBuf,
        opts: LogOptions,
        shared: Arc<Shared>,
        wake: Arc<Wake>,
    ) -> std::io::Result<Writer> {
        assert_eq!(
            parts.len(),
            active.len(),
            "one active segment per partition"
        );
        assert_eq!(journal.is_none(), opts.fsync == FsyncPolicy::Never);
        let unsynced = vec![false; parts.len()];
        let checkpointer = Checkpointer::spawn(log_dir.clone(), shared.clone())?;
        Ok(Writer {
            parts,
            active,
            journal,
            log_dir,
            opts,
            shared,
            wake,
            checkpointer,
            unsynced,
            start: 0,
            buf: Vec::with_capacity(1 << 20),
            entries: Vec::with_capacity(1 << 20),
        })
    }

    /// The thread's body: rounds until shutdown has been asked and every queue is empty.
    pub fn run(mut self) {
        let mut rounds: Vec<Vec<Pending>> = self.parts.iter().map(|_| Vec::new()).collect();
        // A round starts only after an append's signal, and an append signals once its whole
        // request is queued: a request reaching every partition is one round, one fsync.
        let mut signalled = false;
        loop {
            if !signalled {
                self.wake.wait();
            }
            let c = self.collect(&mut rounds);
            // Drain on without waiting what the round's bound left, and everything at shutdown.
            signalled = c.more || c.shutdown;
            if c.records == 0 {
                if c.shutdown {
                    break;
                }
                continue;
            }
            let result = match self.shared.poisoned() {
                Some(reason) => Err(LogError::Poisoned(reason)),
                None => self.write_round(&mut rounds),
            };
            self.finish_round(&mut rounds, c.records, &result);
            if result.is_ok() {
                if let Err(e) = self.start_checkpoint() {
                    self.shared.poison(&e.to_string());
                }
            }
        }
        self.checkpointer.finish();
        if self.journal.is_some() && self.shared.poisoned().is_none() {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "log checkpoint at shutdown failed; the journal replays at start");
            }
        }
    }

    /// Moves queued requests into `rounds`: everything queued, up to
    /// `group_commit_records_max` records (at least one request), or one request (`always`).
    fn collect(&mut self, rounds: &mut [Vec<Pending>]) -> Collected {
        let n = self.parts.len();
        let mut c = Collected {
            records: 0,
            more: false,
            shutdown: false,
        };
        let mut requests = 0;
        for i in 0..n {
            let p = (self.start + i) % n;
            let mut q = self.parts[p].queue.lock();
            c.shutdown |= q.shutdown;
            while let Some(front) = q.pending.front() {
                let len = front.batch.len();
                let take = requests == 0
                    || (self.opts.fsync != FsyncPolicy::Always
                        && c.records + len <= self.opts.group_commit_records_max);
                if !take {
                    c.more = true;
                    break;
                }
                c.records += len;
                requests += 1;
                rounds[p].push(q.pending.pop_front().expect("front exists"));
            }
        }
        self.start = (self.start + 1) % n;
        c
    }

    /// Completes every waiter of the round with its result and releases its admission.
    fn finish_round(&self, rounds: &mut [Vec<Pending>], records: usize, result: &Result<()>) {
        if let Err(e) = result {
            self.shared.poison(&e.to_string());
        }
        // Release before completing, so a caller that saw its append finish never finds it
        // still counted against the queue bound.
        self.shared.release(records);
        for p in rounds.iter_mut().flat_map(|r| r.drain(..)) {
            metrics::histogram!(quiver_core::telemetry::LOG_APPEND_SECONDS)
                .record(p.enqueued.elapsed().as_secs_f64());
            if let Some(done) = p.done {
                let next = p.first_offset + p.batch.len() as u64;
                let _ = done.send(match result {
                    Ok(()) => Ok(next),
                    Err(LogError::Poisoned(r)) => Err(LogError::Poisoned(r.clone())),
                    Err(e) => Err(LogError::Poisoned(e.to_string())),
                });
            }
        }
    }

    /// Writes every partition's share of the round to its segment and to the journal, then
    /// makes the round durable with one fsync of the journal.
    fn write_round(&mut self, rounds: &mut [Vec<Pending>]) -> Result<()> {
        let now = crate::now_ms();
        self.entries.clear();
        for (p, round) in rounds.iter().enumerate() {
            if round.is_empty() {
                continue;
            }
            let next = self.write_partition(p, round, now)?;
            self.unsynced[p] = true;
            if self.journal.is_none() {
                self.parts[p].publish(next, next);
            } else {
                self.parts[p].written.store(next, Ordering::Release);
            }
        }
        let Some(journal) = self.journal.as_mut() else {
            return Ok(());
        };
        // Written waiters may go now; durable ones after the fsync.
        for p in rounds
            .iter_mut()
            .flatten()
            .filter(|p| p.ack == Ack::Written)
        {
            if let Some(done) = p.done.take() {
                let _ = done.send(Ok(p.first_offset + p.batch.len() as u64));
            }
        }
        journal.append(&self.entries)?;
        let started = Instant::now();
        #[cfg(feature = "failpoints")]
        if self.shared.fail_next_fsync.swap(false, Ordering::SeqCst) {
            return Err(io(journal.path())(std::io::Error::other(
                "injected fsync failure",
            )));
        }
        journal.sync()?;
        self.shared.durable_syncs.fetch_add(1, Ordering::AcqRel);
        metrics::histogram!(quiver_core::telemetry::LOG_FSYNC_SECONDS)
            .record(started.elapsed().as_secs_f64());
        for (p, round) in rounds.iter().enumerate() {
            if !round.is_empty() {
                let written = self.parts[p].written.load(Ordering::Acquire);
                self.parts[p].publish(written, written);
            }
        }
        Ok(())
    }

    /// Frames partition `p`'s requests into its segment (rolling where a segment fills) and
    /// into the journal's entries; returns the offset after the last record written.
    fn write_partition(&mut self, p: usize, round: &[Pending], now: i64) -> Result<u64> {
        let part = self.parts[p].clone();
        let mut next = part.written.load(Ordering::Acquire);
        let mut sealed = Vec::new();
        self.buf.clear();
        for pending in round {
            assert_eq!(
                pending.first_offset, next,
                "offsets are reserved and written in queue order"
            );
            for payload in pending.batch.iter() {
                let payload = match &part.sealer {
                    None => payload,
                    Some(ring) => {
                        sealed.clear();
                        ring.seal_into(&frame::seal_aad(part.id, next), payload, &mut sealed);
                        &sealed[..]
                    }
                };
                let frame_len = (FRAME_HEADER_BYTES + payload.len()) as u64;
                let used = self.active[p].len + self.buf.len() as u64;
                if used + frame_len > self.opts.segment_bytes && used > SEGMENT_HEADER_BYTES as u64
                {
                    self.flush(p, next, now)?;
                    self.roll(p, next)?;
                }
                let start = self.buf.len();
                frame::encode_frame(&mut self.buf, next, now, part.sealer.is_some(), payload);
                if self.journal.is_some() {
                    journal::encode_entry(&mut self.entries, part.id, &self.buf[start..]);
                }
                next += 1;
            }
        }
        self.flush(p, next, now)?;
        Ok(next)
    }

    /// Writes partition `p`'s framed bytes to its segment (to the OS; the journal makes them
    /// durable) and records the segment's new extent.
    fn flush(&mut self, p: usize, next: u64, now: i64) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let active = &mut self.active[p];
        active.file.write_all(&self.buf).map_err(io(&active.path))?;
        active.len += self.buf.len() as u64;
        self.shared
            .disk_bytes
            .fetch_add(self.buf.len() as u64, Ordering::AcqRel);
        self.buf.clear();
        let mut segs = self.parts[p].segments.write();
        let meta = segs
            .last_mut()
            .expect("a partition always has an active segment");
        meta.next_offset = next;
        meta.bytes = active.len;
        meta.last_append_ms = now;
        Ok(())
    }

    /// Seals partition `p`'s active segment (fsynced, unless `fsync = never`: a sealed segment
    /// is never journal-replayed) and starts a new one at `base`.
    fn roll(&mut self, p: usize, base: u64) -> Result<()> {
        let active = &mut self.active[p];
        if self.opts.fsync != FsyncPolicy::Never {
            active.file.sync_data().map_err(io(&active.path))?;
        }
        let part = &self.parts[p];
        let (new_active, meta) = partition::create_segment(&part.dir, base)?;
        self.shared
            .disk_bytes
            .fetch_add(meta.bytes, Ordering::AcqRel);
        *active = new_active;
        part.segments.write().push(meta);
        Ok(())
    }

    /// Once the journal passes its bound (and no checkpoint is running): starts the next
    /// journal file, naming the offsets written so far, and hands the segments written since
    /// the last checkpoint to the checkpointer, which syncs them and then deletes the older
    /// journal. The writer goes on at once.
    fn start_checkpoint(&mut self) -> Result<()> {
        let Some(journal) = &self.journal else {
            return Ok(());
        };
        if journal.bytes() <= self.opts.segment_bytes {
            return Ok(());
        }
        if self.checkpointer.busy() {
            // The journal's bound: past twice the threshold the writer waits for the sync.
            if journal.bytes() <= 2 * self.opts.segment_bytes {
                return Ok(());
            }
            while self.checkpointer.busy() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let mut files = Vec::new();
        for (p, unsynced) in self.unsynced.iter_mut().enumerate() {
            if std::mem::take(unsynced) {
                let active = &self.active[p];
                let file = active.file.try_clone().map_err(io(&active.path))?;
                files.push((file, active.path.clone()));
            }
        }
        let generation = journal.generation() + 1;
        self.journal = Some(Journal::create(&self.log_dir, generation, &self.written())?);
        self.checkpointer.start(files, generation);
        Ok(())
    }

    /// A checkpoint on the writer's thread (at shutdown): syncs every segment written since
    /// the last one, starts an empty journal file and deletes the older ones.
    fn checkpoint(&mut self) -> Result<()> {
        for (p, unsynced) in self.unsynced.iter_mut().enumerate() {
            if std::mem::take(unsynced) {
                let active = &self.active[p];
                active.file.sync_data().map_err(io(&active.path))?;
            }
        }
        let generation = self.journal.as_ref().map_or(0, |j| j.generation() + 1);
        self.journal = Some(Journal::create(&self.log_dir, generation, &self.written())?);
        journal::remove_before(&self.log_dir, generation)
    }

    fn written(&self) -> Vec<u64> {
        self.parts
            .iter()
            .map(|p| p.written.load(Ordering::Acquire))
            .collect()
    }
}

/// A checkpoint's work: the segments to sync, then the journal generation from which files
/// are kept.
type Job = (Vec<(File, PathBuf)>, u64);

/// Syncs a checkpoint's segments off the writer's thread, then deletes the journal files the
/// checkpoint made redundant. One checkpoint at a time.
pub(crate) struct Checkpointer {
    jobs: Option<mpsc::Sender<Job>>,
    busy: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    pub fn spawn(log_dir: PathBuf, shared: Arc<Shared>) -> std::io::Result<Checkpointer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let busy = Arc::new(AtomicBool::new(false));
        let done = busy.clone();
        let thread = std::thread::Builder::new()
            .name("log-checkpoint".into())
            .spawn(move || {
                for (files, keep_from) in rx {
                    let synced = files
                        .iter()
                        .try_for_each(|(file, path)| file.sync_data().map_err(io(path)));
                    let result = synced.and_then(|()| journal::remove_before(&log_dir, keep_from));
                    if let Err(e) = result {
                        shared.poison(&e.to_string());
                    }
                    done.store(false, Ordering::Release);
                }
            })?;
        Ok(Checkpointer {
            jobs: Some(tx),
            busy,
            thread: Some(thread),
        })
    }

    fn busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    fn start(&self, files: Vec<(File, PathBuf)>, keep_from: u64) {
        assert!(!self.busy(), "one checkpoint at a time");
        self.busy.store(true, Ordering::Release);
        let jobs = self
            .jobs
            .as_ref()
            .expect("the checkpointer runs until finish");
        jobs.send((files, keep_from))
            .expect("the checkpointer outlives the writer");
    }

    /// Waits for a running checkpoint and stops the thread.
    fn finish(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
