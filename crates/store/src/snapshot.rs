//! Snapshots of one partition's rows and dedup window, with the offset they cover in each of
//! the partition's streams (one for the embedded log; one per topic with Kafka). Restart =
//! load each partition's snapshot, then replay every stream from its offset.
//!
//! # Design constraints
//! - Written by the partition's materializer between two records, so a snapshot is exactly
//!   the state after applying everything below its offset.
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
//! "QVSNAP04" | frames
//! frame = u32 len | u32 crc32c(body) | body (len bytes; sealed or plain)
//! plain = u8 kind | …
//!   0 head: u32 partition | u16 streams × (str16 log id, u64 offset) | u32 views × view
//!           view = str16 name | u64 rows | u16 features × (str16 name, str16 type)
//!                  | u16 aggregations × (str16 name, str16 spec "fn/window_ms/tile_ms")
//!   1 rows: u32 view (index in the head) | u32 n | n × row
//!           row = str16 key | u16 words | words × u64 | heap slots × value (record codec)
//!                 | rings (views with aggregations: u64 version | aggregations × (u32 n, n × f64))
//!   2 end:  u32 frames before | u64 rows | u64 dedup ids × u128 (oldest first)
//! ```
//! A stream is named by its log id (`quiver_log::StreamInfo::log_id`): an offset is only
//! meaningful in the log that gave it. `QVSNAP02`/`QVSNAP03` snapshots (one buffer, a cell
//! per feature) still load ([`legacy`]).

mod legacy;

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use quiver_core::record::{put_str16, put_value, CodecError, Reader};
use quiver_core::schema::{FeatureIdx, View};
use quiver_core::value::FeatureType;
use quiver_fsutil::seal::KeyRing;
use quiver_fsutil::AtomicFile;

use crate::error::{io, Result, StoreError};
use crate::row::{Cell, Layout, Row};
use crate::{AggCell, AggLayout, DedupWindow, Store};

const MAGIC: &[u8; 8] = b"QVSNAP04";
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
fn frame_aad(partition: u32, frame: u32) -> [u8; 16] {
    let mut aad = [0u8; 16];
    aad[..8].copy_from_slice(MAGIC);
    aad[8..12].copy_from_slice(&partition.to_le_bytes());
    aad[12..].copy_from_slice(&frame.to_le_bytes());
    aad
}

/// Frames onto the file being written.
struct FrameWriter<'a> {
    out: AtomicFile,
    sealer: Option<&'a KeyRing>,
    partition: u32,
    frames: u32,
    bytes: u64,
    sealed: Vec<u8>,
}

impl FrameWriter<'_> {
    fn frame(&mut self, plain: &[u8]) -> std::io::Result<()> {
        debug_assert!(plain.first().is_some_and(|&k| k <= KIND_END));
        let body: &[u8] = match self.sealer {
            Some(ring) => {
                self.sealed.clear();
                let aad = frame_aad(self.partition, self.frames);
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
/// puts it in place. Returns the bytes written.
pub fn write(
    dir: &Path,
    store: &Store,
    partition: u32,
    offsets: &[(String, u64)],
    dedup: &DedupWindow,
    sealer: Option<&KeyRing>,
) -> Result<u64> {
    write_unsynced(dir, store, partition, offsets, dedup, sealer)?.commit()
}

/// Serializes the snapshot of `partition` into its temporary; [`Written::commit`] finishes it.
/// Only this half needs the partition to stand still.
pub fn write_unsynced(
    dir: &Path,
    store: &Store,
    partition: u32,
    offsets: &[(String, u64)],
    dedup: &DedupWindow,
    sealer: Option<&KeyRing>,
) -> Result<Written> {
    assert!(
        !offsets.is_empty() && offsets.len() <= usize::from(u16::MAX),
        "a partition has 1..=65535 streams"
    );
    let path = snapshot_path(dir, partition);
    let mut w = FrameWriter {
        out: AtomicFile::create(&path).map_err(io(&path))?,
        sealer,
        partition,
        frames: 0,
        bytes: MAGIC.len() as u64,
        sealed: Vec::new(),
    };
    w.out.write_all(MAGIC).map_err(io(&path))?;
    let mut buf = Vec::with_capacity(FRAME_TARGET_BYTES + (64 << 10));
    put_head(&mut buf, store, partition, offsets);
    w.frame(&buf).map_err(io(&path))?;
    let mut rows = 0u64;
    for (index, view) in store.schema().views.iter().enumerate() {
        rows += write_rows(&mut w, &mut buf, store, view, index as u32).map_err(io(&path))?;
    }
    buf.clear();
    buf.push(KIND_END);
    buf.extend_from_slice(&w.frames.to_le_bytes());
    buf.extend_from_slice(&rows.to_le_bytes());
    buf.extend_from_slice(&(dedup.len() as u64).to_le_bytes());
    for id in dedup.iter() {
        buf.extend_from_slice(&id.to_le_bytes());
    }
    w.frame(&buf).map_err(io(&path))?;
    // Hand the bytes to the OS now, so the commit's fsync is all that is left.
    w.out.flush().map_err(io(&path))?;
    Ok(Written {
        bytes: w.bytes,
        file: w.out,
        path,
    })
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

/// Writes the rows of `view` in frames; returns how many.
fn write_rows(
    w: &mut FrameWriter<'_>,
    buf: &mut Vec<u8>,
    store: &Store,
    view: &View,
    index: u32,
) -> std::io::Result<u64> {
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
    begin(buf);
    store.for_each_row(w.partition, view.id, |key, row| {
        if failed.is_some() {
            return;
        }
        put_row(buf, view, agg_layout, key, row);
        total += 1;
        in_frame += 1;
        if buf.len() >= FRAME_TARGET_BYTES {
            buf[COUNT_AT..COUNT_AT + 4].copy_from_slice(&in_frame.to_le_bytes());
            failed = w.frame(buf).err();
            begin(buf);
            in_frame = 0;
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    if in_frame > 0 {
        buf[COUNT_AT..COUNT_AT + 4].copy_from_slice(&in_frame.to_le_bytes());
        w.frame(buf)?;
    }
    Ok(total)
}

fn put_row(buf: &mut Vec<u8>, view: &View, agg_layout: Option<&AggLayout>, key: &str, row: &Row) {
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
    for value in row.heap_values() {
        put_value(buf, value);
    }
    if let Some(al) = agg_layout {
        put_rings(buf, view, al, row);
    }
}

/// A row's rings: `u64 version | aggregations × (u32 n, n × f64)` (every format so far).
fn put_rings(buf: &mut Vec<u8>, view: &View, al: &AggLayout, row: &Row) {
    let cell = row
        .aggs()
        .expect("rows of aggregating views carry their rings");
    buf.extend_from_slice(&cell.version().to_le_bytes());
    for a in 0..view.aggregations.len() {
        let ring = cell.ring_values(view, al, a);
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
    let mut magic = Vec::with_capacity(8);
    (&mut input)
        .take(8)
        .read_to_end(&mut magic)
        .map_err(io(&path))?;
    if magic != MAGIC {
        // An older format (or a sealed `QVSNAP03`): one buffer of the whole file.
        input.read_to_end(&mut magic).map_err(io(&path))?;
        return legacy::load(&path, magic, store, partition, dedup_capacity, sealer).map(Some);
    }
    let mut frames = FrameReader {
        input,
        path: &path,
        sealer,
        partition,
        frames: 0,
        left: size.saturating_sub(MAGIC.len() as u64),
        plain: Vec::new(),
    };
    let mut loader = Loader::new(&path, store, partition, size);
    let (_, head) = frames.next()?.ok_or_else(|| loader.corrupt("empty"))?;
    let (offsets, views) = loader.head(head)?;
    let dedup = loop {
        let frame = frames.next()?;
        let (index, frame) = frame.ok_or_else(|| loader.corrupt("no end frame"))?;
        match frame.first() {
            Some(&KIND_ROWS) => loader.rows(&views, frame)?,
            Some(&KIND_END) => break loader.end(frame, index, dedup_capacity)?,
            _ => return Err(loader.corrupt("unknown frame kind")),
        }
    };
    if frames.next()?.is_some() {
        return Err(loader.corrupt("frames after the end"));
    }
    Ok(Some(Loaded {
        offsets: Some(offsets),
        legacy_offset: 0,
        dedup,
    }))
}

/// Frames off the file being loaded, checked and opened.
struct FrameReader<'a> {
    input: BufReader<File>,
    path: &'a Path,
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
            let aad = frame_aad(self.partition, self.frames);
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
                    cells[usize::from(*t)] = stored.get(&view.layout, i as FeatureIdx);
                }
            }
            Row::from_cells(layout, stored.version(), cells)
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

    fn end(&self, frame: &[u8], frames_before: u32, dedup_capacity: usize) -> Result<DedupWindow> {
        let parse = || -> std::result::Result<(u32, u64, DedupWindow), CodecError> {
            let mut r = Reader::new(&frame[1..]);
            let (frames, rows) = (r.u32()?, u64::from_le_bytes(r.array()?));
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
            Ok((frames, rows, dedup))
        };
        let (frames, rows, dedup) = parse().map_err(|e| self.codec(e))?;
        if frames != frames_before || rows != self.rows {
            return Err(self.corrupt(format!(
                "the end counts {frames} frames and {rows} rows, the file held {frames_before} \
                 and {}",
                self.rows
            )));
        }
        Ok(dedup)
    }
}

#[cfg(test)]
mod tests;
