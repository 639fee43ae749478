//! Snapshots of one partition's rows and dedup window, with the offset they cover in each of
//! the partition's streams (one for the embedded log; one per topic with Kafka). Restart =
//! load each partition's snapshot, then replay every stream from its offset.
//!
//! # Design constraints
//! - Taken while the partition's materializer goes on applying (an *online* snapshot: the
//!   materializer stops only to copy its dedup window, not for the rows). The head names each
//!   stream's position when the snapshot began (S), the end its position once every row was
//!   copied (E). Each row is copied whole, at one version (under its seqlock, rings and words
//!   together), as it stood at some moment between the two: it holds exactly the records of
//!   its key below its version. Recovery replays every stream from S and leaves out of a row
//!   a record below E that the row's version says it already holds (`Store::apply_from`);
//!   the dedup window is the one at S, so the replay rebuilds it as the live run did. A record
//!   touches one row, so rows copied at different moments need nothing of each other.
//! - Atomic (`quiver_fsutil::AtomicFile`): a crash leaves the old snapshot or the new, never a
//!   torn one.
//! - Streamed both ways in frames of ~256 KiB: neither writing nor loading holds the file in
//!   memory (a partition of 10M rows is gigabytes).
//! - Compact: a row is stored as the store holds it ([`Row::words`]: 8 bytes per numeric
//!   feature, 16 for the row when its features share one event time), so a snapshot is about
//!   the size of the live rows and loads by copying words, not by rebuilding cells.
//! - Self-describing: each view's features are stored by name and type. A snapshot taken
//!   under another config still loads: rows of a view whose features changed are decoded
//!   with the stored layout and rebuilt under the current one (dropped or retyped features
//!   are left out).
//! - Checked: every frame carries a CRC32C, the last frame counts the frames and rows before
//!   it, and every row is validated against its layout; a snapshot that fails is ignored
//!   (with an error) and the partition replays from the start of the log.
//! - Sealed when `[storage] encryption_key_file` is set: each frame's body is one
//!   `quiver_fsutil::seal` blob bound to the partition and the frame's index (frames cannot
//!   be reordered or moved between partitions). Plain and sealed frames are told apart by the
//!   first byte (a plain body starts with its kind, never `0xE5`).
//!
//! Format (little-endian):
//! ```text
//! "QVSNAP05" | frames
//! frame = u32 len | u32 crc32c(body) | body (len bytes; sealed or plain)
//! plain = u8 kind | …
//!   0 head: u32 partition | u16 streams × (str16 log id, u64 offset) | u32 views × view
//!           view = str16 name | u64 rows | u16 features × (str16 name, str16 type)
//!                  | u16 aggregations × (str16 name, str16 spec "fn/window_ms/tile_ms")
//!   1 rows: u32 view (index in the head) | u32 n | n × row
//!           row = str16 key | u16 words | words × u64 | heap slots × value (record codec)
//!                 | rings (views with aggregations: u64 version | aggregations × (u32 n, n × f64))
//!   2 end:  u32 frames before | u64 rows | u16 streams × u64 end position (the head's order)
//!           | u64 dedup ids × u128 (oldest first)
//! ```
//! (The view row counts in the head are taken at S: hints to size the maps, not checks.)
//! A stream is named by its log id (`quiver_log::StreamInfo::log_id`): an offset is only
//! meaningful in the log that gave it. `QVSNAP02`/`QVSNAP03` snapshots (one buffer, a cell
//! per feature) still load ([`legacy`]), and so do `QVSNAP04` snapshots (taken offline,
//! between two records: no end positions, E = S).

mod legacy;

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quiver_core::record::{put_str16, put_value, CodecError, Reader};
use quiver_core::schema::{FeatureIdx, View};
use quiver_core::value::FeatureType;
use quiver_fsutil::seal::KeyRing;
use quiver_fsutil::AtomicFile;

use crate::error::{io, Result, StoreError};
use crate::row::{Cell, Layout, Row, RowRef};
use crate::{AggCell, AggLayout, DedupWindow, Store};

const MAGIC: &[u8; 8] = b"QVSNAP05";
/// The format before online snapshots: no end positions.
const MAGIC_V4: &[u8; 8] = b"QVSNAP04";
const MAGIC_V3: &[u8; 8] = b"QVSNAP03";
/// The format before stream ids: one offset of the embedded log.
const MAGIC_V2: &[u8; 8] = b"QVSNAP02";

/// A rows frame is closed once its plain body reaches this.
const FRAME_TARGET_BYTES: usize = 256 << 10;
/// Bytes of the smallest row (key length, words count, one header word): bounds how many
/// rows a file of a given size can claim, before reserving room for them.
const ROW_BYTES_MIN: u64 = 12;

const KIND_HEAD: u8 = 0;
const KIND_ROWS: u8 = 1;
const KIND_END: u8 = 2;

/// Where a snapshot stands in each stream of its partition: (log id, offset).
pub type StreamOffsets = Vec<(String, u64)>;

/// A loaded snapshot's offsets and dedup window.
#[derive(Debug)]
pub struct Loaded {
    /// `None` for a `QVSNAP02` snapshot: one offset of the embedded log, whatever its id.
    pub offsets: Option<StreamOffsets>,
    pub legacy_offset: u64,
    /// Where each stream stood once every row was copied (E); `None` for formats taken
    /// offline, where E = S.
    pub ends: Option<StreamOffsets>,
    pub dedup: DedupWindow,
}

impl Loaded {
    /// The snapshot's offset in the stream of log `log_id`: `None` if it knows no such stream.
    pub fn offset_of(&self, log_id: &str) -> Option<u64> {
        match &self.offsets {
            None => Some(self.legacy_offset),
            Some(list) => list.iter().find(|(id, _)| id == log_id).map(|(_, o)| *o),
        }
    }

    /// Below this offset of the stream of log `log_id`, a replayed record may already be in
    /// the rows loaded (the snapshot's E; 0 when it was taken offline: nothing below S is
    /// replayed).
    pub fn covered_below(&self, log_id: &str) -> u64 {
        let ends = self.ends.iter().flatten();
        ends.filter(|(id, _)| id == log_id).map(|(_, o)| *o).sum()
    }
}

fn agg_spec(w: &quiver_core::window::Window) -> String {
    format!("{}/{}/{}", w.func.name(), w.window_ms, w.tile_ms)
}

pub fn snapshot_path(dir: &Path, partition: u32) -> PathBuf {
    dir.join(format!("p-{partition:04}.snap"))
}

/// What a sealed `QVSNAP03` snapshot was bound to: its partition.
fn legacy_seal_aad(partition: u32) -> [u8; 12] {
    let mut aad = *b"QVSNAP\0\0\0\0\0\0";
    aad[8..].copy_from_slice(&partition.to_le_bytes());
    aad
}

/// What a sealed frame is bound to: the format, its partition and its place in the file.
fn frame_aad(magic: &[u8; 8], partition: u32, frame: u32) -> [u8; 16] {
    let mut aad = [0u8; 16];
    aad[..8].copy_from_slice(magic);
    aad[8..12].copy_from_slice(&partition.to_le_bytes());
    aad[12..].copy_from_slice(&frame.to_le_bytes());
    aad
}

/// Frames onto the file being written.
struct FrameWriter {
    out: AtomicFile,
    magic: &'static [u8; 8],
    sealer: Option<Arc<KeyRing>>,
    partition: u32,
    frames: u32,
    bytes: u64,
    sealed: Vec<u8>,
}

impl FrameWriter {
    fn frame(&mut self, plain: &[u8]) -> std::io::Result<()> {
        debug_assert!(plain.first().is_some_and(|&k| k <= KIND_END));
        let body: &[u8] = match &self.sealer {
            Some(ring) => {
                self.sealed.clear();
                let aad = frame_aad(self.magic, self.partition, self.frames);
                ring.seal_into(&aad, plain, &mut self.sealed);
                &self.sealed
            }
            None => plain,
        };
        // A frame overshoots the target by at most one row; the end frame holds the whole
        // dedup window (16 bytes an id). Only a u32 length bounds them.
        let len = u32::try_from(body.len()).map_err(|_| {
            std::io::Error::other(format!("a snapshot frame of {} bytes", body.len()))
        })?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&crc32c::crc32c(body).to_le_bytes())?;
        self.out.write_all(body)?;
        self.frames += 1;
        self.bytes += 8 + body.len() as u64;
        Ok(())
    }
}

/// A snapshot written to its temporary but not yet synced or in place: what is left of the
/// write is waiting on the disk, which needs nothing of the store (see [`Written::commit`]).
pub struct Written {
    file: AtomicFile,
    path: PathBuf,
    pub bytes: u64,
}

impl Written {
    /// fsyncs the snapshot and renames it over the partition's previous one.
    pub fn commit(self) -> Result<u64> {
        self.file.commit().map_err(io(&self.path))?;
        Ok(self.bytes)
    }
}

/// Writes the snapshot of `partition` as of `offsets` (one per stream of the partition) and
/// puts it in place, the partition standing still meanwhile. Returns the bytes written.
/// (Tests' shorthand; the materializer drives [`Snapshot`] itself, online.)
#[cfg(test)]
pub(crate) fn write(
    dir: &Path,
    store: &Store,
    partition: u32,
    offsets: &[(String, u64)],
    dedup: &DedupWindow,
    sealer: Option<&Arc<KeyRing>>,
) -> Result<u64> {
    let mut snap = Snapshot::begin(dir, store, partition, offsets, sealer.cloned())?;
    snap.capture(store, || {})?;
    let ends: Vec<u64> = offsets.iter().map(|(_, o)| *o).collect();
    snap.finish(&ends, dedup.iter())?.commit()
}

/// A snapshot being taken: begun at the streams' positions S, its rows copied while the
/// materializer may go on applying ([`Snapshot::capture`]), finished with the positions E
/// reached by then ([`Snapshot::finish`]).
pub struct Snapshot {
    w: FrameWriter,
    path: PathBuf,
    buf: Vec<u8>,
    streams: usize,
    rows: u64,
}

impl Snapshot {
    /// Creates the temporary and writes the head: `offsets` are S, one per stream.
    pub fn begin(
        dir: &Path,
        store: &Store,
        partition: u32,
        offsets: &[(String, u64)],
        sealer: Option<Arc<KeyRing>>,
    ) -> Result<Snapshot> {
        Snapshot::begin_as(MAGIC, dir, store, partition, offsets, sealer)
    }

    /// [`begin`](Self::begin) in format `magic` (tests write the previous one).
    fn begin_as(
        magic: &'static [u8; 8],
        dir: &Path,
        store: &Store,
        partition: u32,
        offsets: &[(String, u64)],
        sealer: Option<Arc<KeyRing>>,
    ) -> Result<Snapshot> {
        assert!(
            !offsets.is_empty() && offsets.len() <= usize::from(u16::MAX),
            "a partition has 1..=65535 streams"
        );
        let path = snapshot_path(dir, partition);
        let mut snap = Snapshot {
            w: FrameWriter {
                out: AtomicFile::create(&path).map_err(io(&path))?,
                magic,
                sealer,
                partition,
                frames: 0,
                bytes: magic.len() as u64,
                sealed: Vec::new(),
            },
            path,
            buf: Vec::with_capacity(FRAME_TARGET_BYTES + (64 << 10)),
            streams: offsets.len(),
            rows: 0,
        };
        snap.w.out.write_all(snap.w.magic).map_err(io(&snap.path))?;
        put_head(&mut snap.buf, store, partition, offsets);
        snap.w.frame(&snap.buf).map_err(io(&snap.path))?;
        Ok(snap)
    }

    /// Copies every row of the partition, each whole at one version, while its materializer
    /// may apply records; `between_rows` runs after each row is copied (tests apply records
    /// there, at chosen points of the walk).
    pub fn capture(&mut self, store: &Store, mut between_rows: impl FnMut()) -> Result<()> {
        for (index, view) in store.schema().views.iter().enumerate() {
            let rows = write_rows(self, store, view, index as u32, &mut between_rows);
            match rows.map_err(io(&self.path))? {
                Some(rows) => self.rows += rows,
                None => {
                    return Err(StoreError::SnapshotAbandoned(format!(
                        "a row of view {} stayed mid-write for the whole of its retries",
                        view.name
                    )))
                }
            }
        }
        Ok(())
    }

    /// Writes the end — `ends` (E, each stream's position once [`capture`](Self::capture)
    /// was done, in the head's order), the rows' count and the dedup window as of S — and
    /// hands the bytes to the OS: the commit's fsync is all that is left.
    pub fn finish(
        mut self,
        ends: &[u64],
        dedup: impl ExactSizeIterator<Item = u128>,
    ) -> Result<Written> {
        assert_eq!(ends.len(), self.streams, "an end position per stream");
        let buf = &mut self.buf;
        buf.clear();
        buf.push(KIND_END);
        buf.extend_from_slice(&self.w.frames.to_le_bytes());
        buf.extend_from_slice(&self.rows.to_le_bytes());
        if self.w.magic == MAGIC {
            buf.extend_from_slice(&(ends.len() as u16).to_le_bytes());
            for end in ends {
                buf.extend_from_slice(&end.to_le_bytes());
            }
        }
        buf.extend_from_slice(&(dedup.len() as u64).to_le_bytes());
        for id in dedup {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        self.w.frame(&self.buf).map_err(io(&self.path))?;
        self.w.out.flush().map_err(io(&self.path))?;
        Ok(Written {
            bytes: self.w.bytes,
            file: self.w.out,
            path: self.path,
        })
    }
}

fn put_head(buf: &mut Vec<u8>, store: &Store, partition: u32, offsets: &[(String, u64)]) {
    buf.clear();
    buf.push(KIND_HEAD);
    buf.extend_from_slice(&partition.to_le_bytes());
    buf.extend_from_slice(&(offsets.len() as u16).to_le_bytes());
    for (log_id, offset) in offsets {
        put_str16(buf, log_id);
        buf.extend_from_slice(&offset.to_le_bytes());
    }
    let schema = store.schema();
    buf.extend_from_slice(&(schema.views.len() as u32).to_le_bytes());
    for view in &schema.views {
        put_str16(buf, &view.name);
        let rows = store.partition_rows(partition, view.id) as u64;
        buf.extend_from_slice(&rows.to_le_bytes());
        buf.extend_from_slice(&(view.features.len() as u16).to_le_bytes());
        for f in &view.features {
            put_str16(buf, &f.name);
            put_str16(buf, &f.ty.to_string());
        }
        buf.extend_from_slice(&(view.aggregations.len() as u16).to_le_bytes());
        for a in &view.aggregations {
            put_str16(buf, &a.name);
            put_str16(buf, &agg_spec(&a.window));
        }
    }
}

/// Writes the rows of `view` in frames; returns how many, or `None` if a row could not be
/// copied whole (see [`Store::for_each_live_row`]).
fn write_rows(
    snap: &mut Snapshot,
    store: &Store,
    view: &View,
    index: u32,
    between_rows: &mut impl FnMut(),
) -> std::io::Result<Option<u64>> {
    const COUNT_AT: usize = 1 + 4;
    let begin = |buf: &mut Vec<u8>| {
        buf.clear();
        buf.push(KIND_ROWS);
        buf.extend_from_slice(&index.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
    };
    let agg_layout = store.agg_layout(view.id);
    let (mut total, mut in_frame) = (0u64, 0u32);
    let mut failed = None;
    let (w, buf) = (&mut snap.w, &mut snap.buf);
    let mut rings = Vec::new();
    begin(buf);
    let whole = store.for_each_live_row(w.partition, view.id, |key, row| {
        if failed.is_some() {
            return true;
        }
        let start = buf.len();
        if !put_row(buf, view, agg_layout, key, row, &mut rings) {
            buf.truncate(start);
            return false;
        }
        total += 1;
        in_frame += 1;
        if buf.len() >= FRAME_TARGET_BYTES {
            buf[COUNT_AT..COUNT_AT + 4].copy_from_slice(&in_frame.to_le_bytes());
            failed = w.frame(buf).err();
            begin(buf);
            in_frame = 0;
        }
        between_rows();
        true
    });
    if let Some(e) = failed {
        return Err(e);
    }
    if !whole {
        return Ok(None);
    }
    if in_frame > 0 {
        buf[COUNT_AT..COUNT_AT + 4].copy_from_slice(&in_frame.to_le_bytes());
        w.frame(buf)?;
    }
    Ok(Some(total))
}

/// Appends `row` as of one version; false, with the buffer to be cut back, if a write
/// overlapped the copy (the words changed, or the rings moved past the words: the writer is
/// between the two halves of an event).
fn put_row(
    buf: &mut Vec<u8>,
    view: &View,
    agg_layout: Option<&AggLayout>,
    key: &str,
    row: RowRef<'_>,
    rings: &mut Vec<u64>,
) -> bool {
    let Some(header) = row.read_begin() else {
        return false;
    };
    put_str16(buf, key);
    let words = row.words();
    let n = u16::try_from(words.len()).expect("a row of at most 65535 words");
    buf.extend_from_slice(&n.to_le_bytes());
    // Grown once and filled in place: a push per word checked the capacity 32 times a row
    // (a third of a snapshot's instructions).
    let start = buf.len();
    buf.resize(start + 8 * words.len(), 0);
    for (out, word) in buf[start..].chunks_exact_mut(8).zip(words) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    // Heap slots are never written in place: a row holding them is replaced whole.
    for value in row.heap_values() {
        put_value(buf, value);
    }
    let rings_version = match agg_layout {
        None => 0,
        Some(al) => {
            let cell = row
                .aggs()
                .expect("rows of aggregating views carry their rings");
            let Some(version) = cell.copy_words(rings) else {
                return false;
            };
            put_rings(buf, view, al, version, rings);
            version
        }
    };
    // Rings are written before the row of the same event: rings past the row's version
    // belong to an event the row does not show yet.
    row.read_end(header) && rings_version <= Row::version_of(header)
}

/// A row's rings from the cell's words: `u64 version | aggregations × (u32 n, n × f64)`
/// (every format so far).
fn put_rings(buf: &mut Vec<u8>, view: &View, al: &AggLayout, version: u64, words: &[u64]) {
    buf.extend_from_slice(&version.to_le_bytes());
    for (a, agg) in view.aggregations.iter().enumerate() {
        let ring = &words[al.offsets[a]..al.offsets[a] + agg.window.ring_len()];
        buf.extend_from_slice(&(ring.len() as u32).to_le_bytes());
        for x in ring {
            buf.extend_from_slice(&x.to_le_bytes());
        }
    }
}

/// Loads the snapshot of `partition` into `store`; returns its offsets and dedup window, or
/// `None` if there is none.
pub fn load(
    dir: &Path,
    store: &Store,
    partition: u32,
    dedup_capacity: usize,
    sealer: Option<&KeyRing>,
) -> Result<Option<Loaded>> {
    let path = snapshot_path(dir, partition);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let size = file.metadata().map_err(io(&path))?.len();
    let mut input = BufReader::with_capacity(1 << 20, file);
    let mut bytes = Vec::with_capacity(8);
    (&mut input)
        .take(8)
        .read_to_end(&mut bytes)
        .map_err(io(&path))?;
    let magic = match bytes.as_slice() {
        m if m == MAGIC => MAGIC,
        m if m == MAGIC_V4 => MAGIC_V4,
        _ => {
            // An older format (or a sealed `QVSNAP03`): one buffer of the whole file.
            input.read_to_end(&mut bytes).map_err(io(&path))?;
            return legacy::load(&path, bytes, store, partition, dedup_capacity, sealer).map(Some);
        }
    };
    let mut frames = FrameReader {
        input,
        path: &path,
        magic,
        sealer,
        partition,
        frames: 0,
        left: size.saturating_sub(magic.len() as u64),
        plain: Vec::new(),
    };
    let mut loader = Loader::new(&path, store, partition, size);
    let (_, head) = frames.next()?.ok_or_else(|| loader.corrupt("empty"))?;
    let (offsets, views) = loader.head(head)?;
    let streams = (magic == MAGIC).then_some(offsets.len());
    let (ends, dedup) = loop {
        let frame = frames.next()?;
        let (index, frame) = frame.ok_or_else(|| loader.corrupt("no end frame"))?;
        match frame.first() {
            Some(&KIND_ROWS) => loader.rows(&views, frame)?,
            Some(&KIND_END) => break loader.end(frame, index, streams, dedup_capacity)?,
            _ => return Err(loader.corrupt("unknown frame kind")),
        }
    };
    if frames.next()?.is_some() {
        return Err(loader.corrupt("frames after the end"));
    }
    if let Some(ends) = &ends {
        if ends
            .iter()
            .zip(&offsets)
            .any(|(end, (_, start))| end < start)
        {
            return Err(loader.corrupt("a stream ends before it starts"));
        }
    }
    let ends = ends.map(|ends| {
        let ids = offsets.iter().map(|(id, _)| id.clone());
        ids.zip(ends).collect()
    });
    Ok(Some(Loaded {
        offsets: Some(offsets),
        legacy_offset: 0,
        ends,
        dedup,
    }))
}

/// Frames off the file being loaded, checked and opened.
struct FrameReader<'a> {
    input: BufReader<File>,
    path: &'a Path,
    magic: &'static [u8; 8],
    sealer: Option<&'a KeyRing>,
    partition: u32,
    frames: u32,
    /// Bytes of the file not read yet: no length word may claim more (a damaged one would
    /// otherwise allocate up to 4 GiB).
    left: u64,
    plain: Vec<u8>,
}

impl FrameReader<'_> {
    /// The next frame's index and plain body, `None` at the end of the file.
    fn next(&mut self) -> Result<Option<(u32, &[u8])>> {
        let corrupt = |reason: String| StoreError::CorruptSnapshot {
            path: self.path.to_path_buf(),
            reason,
        };
        let mut header = [0u8; 8];
        match self.input.read(&mut header[..1]).map_err(io(self.path))? {
            0 => return Ok(None),
            _ => self.input.read_exact(&mut header[1..]),
        }
        .map_err(|_| corrupt(format!("frame {} truncated", self.frames)))?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        self.left = self.left.saturating_sub(8);
        if u64::from(len) > self.left {
            let left = self.left;
            return Err(corrupt(format!(
                "frame {} claims {len} bytes, {left} are left",
                self.frames
            )));
        }
        self.left -= u64::from(len);
        self.plain.resize(len as usize, 0);
        self.input
            .read_exact(&mut self.plain)
            .map_err(|_| corrupt(format!("frame {} truncated", self.frames)))?;
        if crc32c::crc32c(&self.plain) != u32::from_le_bytes(header[4..].try_into().expect("4")) {
            return Err(corrupt(format!("frame {}: checksum mismatch", self.frames)));
        }
        if quiver_fsutil::seal::is_sealed(&self.plain) {
            let ring = self.sealer.ok_or_else(|| {
                corrupt("encrypted, and [storage] encryption_key_file is not set".into())
            })?;
            let aad = frame_aad(self.magic, self.partition, self.frames);
            self.plain = ring
                .open(&aad, &self.plain)
                .map_err(|e| corrupt(format!("frame {}: {e}", self.frames)))?;
        }
        self.frames += 1;
        Ok(Some((self.frames - 1, &self.plain)))
    }
}

/// A view as the snapshot stored it, and how its rows become rows of the current config.
struct StoredView<'s> {
    /// The view of the same name in the current config.
    current: Option<&'s View>,
    layout: Layout,
    /// Same features, types and order as the current view: rows load as stored.
    same_layout: bool,
    /// Per stored feature: its index in the current view, if it is still there with its type.
    features: Vec<Option<FeatureIdx>>,
    /// Per stored aggregation: the current one of the same name and tiling (another tiling
    /// cannot be converted; that aggregation starts empty).
    aggregations: Vec<Option<usize>>,
}

struct Loader<'s> {
    path: &'s Path,
    store: &'s Store,
    partition: u32,
    /// The file's size: no count read from it may claim more rows than it can hold.
    size: u64,
    rows: u64,
}

impl<'s> Loader<'s> {
    fn new(path: &'s Path, store: &'s Store, partition: u32, size: u64) -> Loader<'s> {
        Loader {
            path,
            store,
            partition,
            size,
            rows: 0,
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> StoreError {
        StoreError::CorruptSnapshot {
            path: self.path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn codec(&self, e: CodecError) -> StoreError {
        self.corrupt(e.to_string())
    }

    fn head(&self, frame: &[u8]) -> Result<(StreamOffsets, Vec<StoredView<'s>>)> {
        self.parse_head(frame).map_err(|e| self.codec(e))
    }

    fn parse_head(
        &self,
        frame: &[u8],
    ) -> std::result::Result<(StreamOffsets, Vec<StoredView<'s>>), CodecError> {
        let mut r = Reader::new(frame);
        if r.u8()? != KIND_HEAD {
            return Err(CodecError::Version(KIND_HEAD));
        }
        let partition = r.u32()?;
        if partition != self.partition {
            // A plain snapshot renamed to another partition's file: its keys belong elsewhere.
            return Err(CodecError::Partition(partition));
        }
        let streams = r.u16()?;
        let mut offsets = Vec::with_capacity(usize::from(streams));
        for _ in 0..streams {
            let id = r.str16("log id")?.to_string();
            offsets.push((id, u64::from_le_bytes(r.array()?)));
        }
        let count = r.u32()?;
        let mut views = Vec::new();
        for _ in 0..count {
            views.push(self.parse_view(&mut r)?);
        }
        if r.remaining() != 0 {
            return Err(CodecError::Trailing(r.remaining()));
        }
        Ok((offsets, views))
    }

    fn parse_view(&self, r: &mut Reader<'_>) -> std::result::Result<StoredView<'s>, CodecError> {
        let current = self.store.schema().view_by_name(r.str16("view")?);
        let rows = u64::from_le_bytes(r.array()?);
        let count = usize::from(r.u16()?);
        let (mut types, mut features) = (Vec::with_capacity(count), Vec::with_capacity(count));
        let mut same_layout = current.is_some_and(|v| v.features.len() == count);
        for i in 0..count {
            let name = r.str16("feature")?;
            let text = r.str16("type")?;
            let ty = FeatureType::parse(text, None)
                .map_err(|_| CodecError::FeatureType(text.to_string()))?;
            let target = current.and_then(|v| {
                let idx = v.feature_index(name)?;
                (v.feature(idx).ty == ty).then_some(idx)
            });
            same_layout &= target == Some(i as FeatureIdx);
            types.push(ty);
            features.push(target);
        }
        let count = usize::from(r.u16()?);
        let mut aggregations = Vec::with_capacity(count);
        for _ in 0..count {
            let (name, spec) = (r.str16("aggregation")?, r.str16("spec")?);
            aggregations.push(current.and_then(|v| {
                v.aggregations
                    .iter()
                    .position(|a| a.name == name && agg_spec(&a.window) == spec)
            }));
        }
        if let Some(v) = current {
            // Room for the rows up front (a resize moves every entry); bounded by what a file
            // of this size can hold, whatever the count says.
            let room = rows.min(self.size / ROW_BYTES_MIN) as usize;
            self.store.reserve_rows(self.partition, v.id, room);
        }
        Ok(StoredView {
            current,
            layout: Layout::from_types(types),
            same_layout,
            features,
            aggregations,
        })
    }

    fn rows(&mut self, views: &[StoredView<'s>], frame: &[u8]) -> Result<()> {
        let mut r = Reader::new(&frame[1..]);
        let head = (|| Ok::<_, CodecError>((r.u32()?, r.u32()?)))().map_err(|e| self.codec(e))?;
        let view = views
            .get(head.0 as usize)
            .ok_or_else(|| self.corrupt("rows of an unknown view"))?;
        let inserter = view
            .current
            .map(|v| self.store.inserter(self.partition, v.id));
        for _ in 0..head.1 {
            let (key, row) = self.row(view, &mut r)?;
            if let (Some(ins), Some(row)) = (&inserter, row) {
                ins.insert(key, row);
            }
        }
        if r.remaining() != 0 {
            return Err(self.codec(CodecError::Trailing(r.remaining())));
        }
        self.rows += u64::from(head.1);
        Ok(())
    }

    /// One row, as the current config holds it (`None`: its view is gone).
    fn row<'f>(&self, view: &StoredView<'s>, r: &mut Reader<'f>) -> Result<(&'f str, Option<Row>)> {
        let (key, words, heap) = (|| {
            let key = r.str16("key")?;
            let n = usize::from(r.u16()?);
            let words = r.take(n * 8)?;
            let heap = (0..view.layout.heap_slots())
                .map(|_| r.value())
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok((key, words, heap))
        })()
        .map_err(|e| self.codec(e))?;
        let rings = self.rings(view, r).map_err(|e| self.codec(e))?;
        let stored = Row::from_parts(&view.layout, words, heap)
            .ok_or_else(|| self.corrupt(format!("row {key:?} does not fit its layout")))?;
        let Some(current) = view.current else {
            return Ok((key, None));
        };
        let layout = self.store.layout(current.id);
        let mut row = if view.same_layout {
            stored
        } else {
            let mut cells = vec![Cell::Absent; current.features.len()];
            for (i, target) in view.features.iter().enumerate() {
                if let Some(t) = target {
                    cells[usize::from(*t)] = stored.r().get(&view.layout, i as FeatureIdx);
                }
            }
            Row::from_cells(layout, stored.r().version(), cells)
        };
        if let Some(al) = self.store.agg_layout(current.id) {
            let cell = AggCell::new(current, al);
            if let Some((version, rings)) = rings {
                for (a, values) in rings {
                    // A ring of another length belongs to another tiling: skip it.
                    if values.len() == current.aggregations[a].window.ring_len() {
                        cell.restore(current, al, a, &values, version);
                    }
                }
            }
            row = row.with_aggs(std::sync::Arc::new(cell));
        }
        Ok((key, Some(row)))
    }

    /// A row's rings, those of aggregations the current view still has.
    #[allow(clippy::type_complexity)]
    fn rings(
        &self,
        view: &StoredView<'s>,
        r: &mut Reader<'_>,
    ) -> std::result::Result<Option<(u64, Vec<(usize, Vec<f64>)>)>, CodecError> {
        if view.aggregations.is_empty() {
            return Ok(None);
        }
        let version = u64::from_le_bytes(r.array()?);
        let mut rings = Vec::new();
        for target in &view.aggregations {
            let n = r.u32()? as usize;
            let bytes = r.take(n.checked_mul(8).ok_or(CodecError::TooLong)?)?;
            if let Some(a) = target {
                let values = bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                rings.push((*a, values));
            }
        }
        Ok(Some((version, rings)))
    }

    /// The end frame: its end positions (`streams` of them, if the format has them) and the
    /// dedup window, once its counts are checked against what the file held.
    #[allow(clippy::type_complexity)]
    fn end(
        &self,
        frame: &[u8],
        frames_before: u32,
        streams: Option<usize>,
        dedup_capacity: usize,
    ) -> Result<(Option<Vec<u64>>, DedupWindow)> {
        let parse =
            || -> std::result::Result<(u32, u64, Option<Vec<u64>>, DedupWindow), CodecError> {
                let mut r = Reader::new(&frame[1..]);
                let (frames, rows) = (r.u32()?, u64::from_le_bytes(r.array()?));
                let ends = match streams {
                    None => None,
                    Some(_) => {
                        let count = usize::from(r.u16()?);
                        let ends = (0..count).map(|_| Ok(u64::from_le_bytes(r.array()?)));
                        Some(ends.collect::<std::result::Result<Vec<u64>, CodecError>>()?)
                    }
                };
                let n = u64::from_le_bytes(r.array()?);
                let mut dedup = DedupWindow::new(dedup_capacity);
                // Sized once (the window's growth by rehashing was a tenth of a load); a length
                // claiming more ids than the frame holds reserves no more than it holds.
                dedup.reserve(n.min(r.remaining() as u64 / 16) as usize);
                for _ in 0..n {
                    dedup.insert(u128::from_le_bytes(r.array()?));
                }
                if r.remaining() != 0 {
                    return Err(CodecError::Trailing(r.remaining()));
                }
                Ok((frames, rows, ends, dedup))
            };
        let (frames, rows, ends, dedup) = parse().map_err(|e| self.codec(e))?;
        if ends.as_ref().is_some_and(|e| Some(e.len()) != streams) {
            return Err(self.corrupt("end positions do not match the head's streams"));
        }
        if frames != frames_before || rows != self.rows {
            return Err(self.corrupt(format!(
                "the end counts {frames} frames and {rows} rows, the file held {frames_before} \
                 and {}",
                self.rows
            )));
        }
        Ok((ends, dedup))
    }
}

#[cfg(test)]
mod tests;
