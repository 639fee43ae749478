//! One partition: its segments, its append queue and the writer thread that drains the queue
//! with group commit.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use quiver_fsutil::seal::KeyRing;
use tokio::sync::oneshot;

use crate::error::{io, LogError, Result};
use crate::frame::{self, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use crate::segment::{self, segment_name};
use crate::{Ack, FsyncPolicy, LogOptions, RecordBatch, Shared};

/// What the log knows of one segment without reading it.
#[derive(Debug, Clone)]
pub struct SegmentMeta {
    pub base_offset: u64,
    /// Offset after the last record (== the next segment's base once sealed).
    pub next_offset: u64,
    pub bytes: u64,
    /// Append time of the newest record, for retention by age.
    pub last_append_ms: i64,
}

pub(crate) struct Pending {
    pub first_offset: u64,
    pub batch: RecordBatch,
    pub ack: Ack,
    pub done: Option<oneshot::Sender<Result<u64>>>,
    pub enqueued: Instant,
}

pub(crate) struct Queue {
    /// Next offset to hand out: offsets are reserved at enqueue, in queue order.
    pub next_offset: u64,
    pub pending: VecDeque<Pending>,
    pub shutdown: bool,
}

pub struct PartitionShared {
    pub id: u32,
    pub dir: PathBuf,
    pub(crate) queue: Mutex<Queue>,
    pub(crate) wake_writer: Condvar,
    /// Every record below this offset has been written to the OS.
    pub(crate) written: AtomicU64,
    /// Every record below this offset is on disk (== `written` with `fsync = never`).
    pub(crate) durable: AtomicU64,
    pub(crate) progress_lock: Mutex<()>,
    pub(crate) progress: Condvar,
    pub(crate) segments: RwLock<Vec<SegmentMeta>>,
    /// Seals records as they are written and opens them as they are read (`[storage]`).
    pub(crate) sealer: Option<Arc<KeyRing>>,
}

impl PartitionShared {
    pub fn durable_offset(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    pub fn first_offset(&self) -> u64 {
        self.segments
            .read()
            .first()
            .map(|s| s.base_offset)
            .unwrap_or(0)
    }

    /// Waits until some record at or after `offset` is durable, or `timeout` passes;
    /// returns the durable offset.
    pub fn wait_durable_beyond(&self, offset: u64, timeout: Duration) -> u64 {
        let now = self.durable_offset();
        if now > offset {
            return now;
        }
        let deadline = Instant::now() + timeout;
        let mut guard = self.progress_lock.lock();
        loop {
            let now = self.durable_offset();
            if now > offset || self.queue.lock().shutdown {
                return now;
            }
            if self.progress.wait_until(&mut guard, deadline).timed_out() {
                return self.durable_offset();
            }
        }
    }

    fn publish(&self, written: u64, durable: u64) {
        self.written.store(written, Ordering::Release);
        self.durable.store(durable, Ordering::Release);
        let _guard = self.progress_lock.lock();
        self.progress.notify_all();
    }
}

pub(crate) struct ActiveSegment {
    file: File,
    path: PathBuf,
    len: u64,
}

/// Opens (recovering) or creates the partition in `dir`.
pub(crate) fn open(
    id: u32,
    dir: &Path,
    sealer: Option<Arc<KeyRing>>,
) -> Result<(Arc<PartitionShared>, ActiveSegment)> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut bases = segment::list_segments(dir)?;
    let mut metas = Vec::with_capacity(bases.len() + 1);

    // Sealed segments were fsynced when they were rolled: trust their extent here and let
    // readers (and `quiver log verify`) check every frame's checksum as they go.
    for pair in bases.windows(2) {
        let path = dir.join(segment_name(pair[0]));
        let md = std::fs::metadata(&path).map_err(io(&path))?;
        metas.push(SegmentMeta {
            base_offset: pair[0],
            next_offset: pair[1],
            bytes: md.len(),
            last_append_ms: mtime_ms(&md),
        });
    }

    let active = match bases.pop() {
        None => create_segment(dir, 0)?,
        Some(base) => recover_last(id, dir, base)?,
    };
    let next_offset = active.1.next_offset;
    metas.push(active.1);
    let shared = Arc::new(PartitionShared {
        id,
        dir: dir.to_path_buf(),
        queue: Mutex::new(Queue {
            next_offset,
            pending: VecDeque::new(),
            shutdown: false,
        }),
        wake_writer: Condvar::new(),
        written: AtomicU64::new(next_offset),
        durable: AtomicU64::new(next_offset),
        progress_lock: Mutex::new(()),
        progress: Condvar::new(),
        segments: RwLock::new(metas),
        sealer,
    });
    Ok((shared, active.0))
}

fn mtime_ms(md: &std::fs::Metadata) -> i64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn create_segment(dir: &Path, base: u64) -> Result<(ActiveSegment, SegmentMeta)> {
    let path = dir.join(segment_name(base));
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    file.write_all(&frame::segment_header(base))
        .map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    segment::sync_dir(dir)?;
    let meta = SegmentMeta {
        base_offset: base,
        next_offset: base,
        bytes: SEGMENT_HEADER_BYTES as u64,
        last_append_ms: crate::now_ms(),
    };
    Ok((
        ActiveSegment {
            file,
            path,
            len: SEGMENT_HEADER_BYTES as u64,
        },
        meta,
    ))
}

/// Recovery of the last segment: verify every frame, truncate a torn tail, refuse damage that
/// valid records follow (that would silently drop acknowledged data).
fn recover_last(id: u32, dir: &Path, base: u64) -> Result<(ActiveSegment, SegmentMeta)> {
    let path = dir.join(segment_name(base));
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    if bytes.len() < SEGMENT_HEADER_BYTES {
        // Created but its header never reached the disk: it holds nothing.
        tracing::warn!(partition = id, path = %path.display(), "removing a segment with a torn header");
        std::fs::remove_file(&path).map_err(io(&path))?;
        return create_segment(dir, base);
    }
    let scan = segment::scan(&bytes, base).map_err(|reason| LogError::Corrupt {
        partition: id,
        segment: path.display().to_string(),
        reason: reason.to_string(),
    })?;
    if let Some((at, problem)) = scan.stop {
        if scan.valid_after_stop {
            return Err(LogError::Corrupt {
                partition: id,
                segment: path.display().to_string(),
                reason: format!(
                    "{problem:?} at byte {at} with valid records after it; \
                     run `quiver log verify` and restore the segment"
                ),
            });
        }
        tracing::warn!(
            partition = id,
            path = %path.display(),
            at,
            dropped_bytes = bytes.len() as u64 - scan.valid_len,
            "truncating a torn tail"
        );
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.set_len(scan.valid_len).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
    }
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io(&path))?;
    let meta = SegmentMeta {
        base_offset: base,
        next_offset: scan.next_offset(),
        bytes: scan.valid_len,
        last_append_ms: scan.last_append_ms.unwrap_or_else(crate::now_ms),
    };
    Ok((
        ActiveSegment {
            file,
            path,
            len: scan.valid_len,
        },
        meta,
    ))
}

/// The writer thread: drains the queue, frames and writes every pending record, fsyncs once
/// per round (group commit), then completes the round's waiters.
pub(crate) fn run_writer(
    part: Arc<PartitionShared>,
    mut active: ActiveSegment,
    opts: LogOptions,
    shared: Arc<Shared>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut round: Vec<Pending> = Vec::new();
    loop {
        {
            let mut q = part.queue.lock();
            while q.pending.is_empty() && !q.shutdown {
                part.wake_writer.wait(&mut q);
            }
            if q.pending.is_empty() && q.shutdown {
                break;
            }
            // `always`: one request per fsync. `batch`/`never`: everything queued, bounded.
            let mut records = 0;
            while let Some(p) = q.pending.front() {
                let n = p.batch.len();
                let take = round.is_empty()
                    || (opts.fsync != FsyncPolicy::Always
                        && records + n <= opts.group_commit_records_max);
                if !take {
                    break;
                }
                records += n;
                round.push(q.pending.pop_front().expect("front exists"));
            }
        }
        let result = match shared.poisoned() {
            Some(reason) => Err(LogError::Poisoned(reason)),
            None => write_round(&part, &mut active, &opts, &mut round, &mut buf, &shared),
        };
        let records: usize = round.iter().map(|p| p.batch.len()).sum();
        if let Err(e) = &result {
            shared.poison(&e.to_string());
        }
        // Release before completing, so a caller that saw its append finish never finds it
        // still counted against the queue bound.
        shared.release(records);
        for p in round.drain(..) {
            metrics::histogram!(quiver_core::telemetry::LOG_APPEND_SECONDS)
                .record(p.enqueued.elapsed().as_secs_f64());
            if let Some(done) = p.done {
                let next = p.first_offset + p.batch.len() as u64;
                let _ = done.send(match &result {
                    Ok(()) => Ok(next),
                    Err(LogError::Poisoned(r)) => Err(LogError::Poisoned(r.clone())),
                    Err(e) => Err(LogError::Poisoned(e.to_string())),
                });
            }
        }
    }
    if opts.fsync != FsyncPolicy::Never {
        let _ = active.file.sync_data();
    }
}

fn write_round(
    part: &PartitionShared,
    active: &mut ActiveSegment,
    opts: &LogOptions,
    round: &mut [Pending],
    buf: &mut Vec<u8>,
    shared: &Shared,
) -> Result<()> {
    let now = crate::now_ms();
    buf.clear();
    let mut next = part.written.load(Ordering::Acquire);
    let mut sealed = Vec::new();
    for p in round.iter() {
        assert_eq!(
            p.first_offset, next,
            "offsets are reserved and written in queue order"
        );
        for payload in p.batch.iter() {
            let payload = match &part.sealer {
                None => payload,
                Some(ring) => {
                    sealed.clear();
                    ring.seal_into(&frame::seal_aad(part.id, next), payload, &mut sealed);
                    &sealed[..]
                }
            };
            let frame_len = (FRAME_HEADER_BYTES + payload.len()) as u64;
            let used = active.len + buf.len() as u64;
            if used + frame_len > opts.segment_bytes && used > SEGMENT_HEADER_BYTES as u64 {
                flush(part, active, buf, next, now, shared)?;
                roll(part, active, opts, next, shared)?;
            }
            frame::encode_frame(buf, next, now, part.sealer.is_some(), payload);
            next += 1;
        }
    }
    flush(part, active, buf, next, now, shared)?;
    let written = next;
    // Written waiters may go now; durable ones after the fsync.
    if opts.fsync == FsyncPolicy::Never {
        part.publish(written, written);
        return Ok(());
    }
    part.written.store(written, Ordering::Release);
    for p in round.iter_mut().filter(|p| p.ack == Ack::Written) {
        if let Some(done) = p.done.take() {
            let _ = done.send(Ok(p.first_offset + p.batch.len() as u64));
        }
    }
    let started = Instant::now();
    #[cfg(feature = "failpoints")]
    if shared.fail_next_fsync.swap(false, Ordering::SeqCst) {
        return Err(io(&active.path)(std::io::Error::other(
            "injected fsync failure",
        )));
    }
    active.file.sync_data().map_err(io(&active.path))?;
    metrics::histogram!(quiver_core::telemetry::LOG_FSYNC_SECONDS)
        .record(started.elapsed().as_secs_f64());
    part.publish(written, written);
    Ok(())
}

fn flush(
    part: &PartitionShared,
    active: &mut ActiveSegment,
    buf: &mut Vec<u8>,
    next: u64,
    now: i64,
    shared: &Shared,
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    active.file.write_all(buf).map_err(io(&active.path))?;
    active.len += buf.len() as u64;
    shared
        .disk_bytes
        .fetch_add(buf.len() as u64, Ordering::AcqRel);
    buf.clear();
    let mut segs = part.segments.write();
    let meta = segs
        .last_mut()
        .expect("a partition always has an active segment");
    meta.next_offset = next;
    meta.bytes = active.len;
    meta.last_append_ms = now;
    Ok(())
}

/// Seals the active segment (fsynced, unless `fsync = never`) and starts a new one at `base`.
fn roll(
    part: &PartitionShared,
    active: &mut ActiveSegment,
    opts: &LogOptions,
    base: u64,
    shared: &Shared,
) -> Result<()> {
    if opts.fsync != FsyncPolicy::Never {
        active.file.sync_data().map_err(io(&active.path))?;
    }
    let (new_active, meta) = create_segment(&part.dir, base)?;
    shared.disk_bytes.fetch_add(meta.bytes, Ordering::AcqRel);
    *active = new_active;
    part.segments.write().push(meta);
    Ok(())
}
