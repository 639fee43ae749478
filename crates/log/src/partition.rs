//! One partition: its segments, its append queue, and its recovery at open (the writer that
//! drains every partition's queue is `writer`).

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use quiver_fsutil::seal::KeyRing;
use tokio::sync::oneshot;

use crate::error::{io, LogError, Result};
use crate::frame::{self, SEGMENT_HEADER_BYTES};
use crate::segment::{self, segment_name};
use crate::writer::ActiveSegment;
use crate::{Ack, RecordBatch};

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

    pub(crate) fn publish(&self, written: u64, durable: u64) {
        self.written.store(written, Ordering::Release);
        self.durable.store(durable, Ordering::Release);
        let _guard = self.progress_lock.lock();
        self.progress.notify_all();
    }
}

/// What the commit journal holds for one partition (see `journal`).
pub(crate) struct Replay<'a> {
    /// The offset the partition's segments were synced to when the journal began: damage at
    /// or after it is writes the OS had not written back, which the journal restores.
    pub checkpoint: u64,
    /// `(offset, frame)`, offsets following one another.
    pub frames: Vec<(u64, &'a [u8])>,
}

/// Opens (recovering) or creates the partition in `dir`; `replay` is what the commit
/// journal holds for it (`None`: no journal, as with `fsync = never`).
pub(crate) fn open(
    id: u32,
    dir: &Path,
    sealer: Option<Arc<KeyRing>>,
    replay: Option<Replay<'_>>,
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

    let mut active = match bases.pop() {
        None => create_segment(dir, 0)?,
        Some(base) => recover_last(id, dir, base, replay.as_ref().map(|r| r.checkpoint))?,
    };
    if let Some(replay) = &replay {
        replay_journal(id, &mut active, replay)?;
    }
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

pub(crate) fn create_segment(dir: &Path, base: u64) -> Result<(ActiveSegment, SegmentMeta)> {
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
/// valid records follow (that would silently drop acknowledged data) — unless it lies at or
/// past the journal's `checkpoint`, where the journal holds every acknowledged record.
fn recover_last(
    id: u32,
    dir: &Path,
    base: u64,
    checkpoint: Option<u64>,
) -> Result<(ActiveSegment, SegmentMeta)> {
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
        let journaled = checkpoint.is_some_and(|c| scan.next_offset() >= c);
        if scan.valid_after_stop && !journaled {
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
            journaled,
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

/// Writes back the journal's frames the last segment lacks (a power loss took writes the OS
/// had not written back), then fsyncs them. The segment may pass `segment_bytes` by at most a
/// journal's worth (two journal files, each at most about 2 × `segment_bytes`).
fn replay_journal(
    id: u32,
    active: &mut (ActiveSegment, SegmentMeta),
    replay: &Replay<'_>,
) -> Result<()> {
    let (segment, meta) = active;
    let mut next = meta.next_offset;
    let corrupt = |reason: String| LogError::Corrupt {
        partition: id,
        segment: segment.path.display().to_string(),
        reason,
    };
    if replay.checkpoint > next {
        return Err(corrupt(format!(
            "the segments end at offset {next} but the journal says they were synced to {}",
            replay.checkpoint
        )));
    }
    let mut bytes = Vec::new();
    let end = next;
    for &(offset, frame) in replay.frames.iter().filter(|(o, _)| *o >= end) {
        if offset != next {
            return Err(corrupt(format!(
                "the segment ends at offset {next} and the journal resumes at {offset}"
            )));
        }
        bytes.extend_from_slice(frame);
        next += 1;
    }
    if bytes.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        partition = id,
        records = next - meta.next_offset,
        "restoring records from the journal"
    );
    segment.file.write_all(&bytes).map_err(io(&segment.path))?;
    segment.file.sync_data().map_err(io(&segment.path))?;
    segment.len += bytes.len() as u64;
    meta.next_offset = next;
    meta.bytes = segment.len;
    Ok(())
}
