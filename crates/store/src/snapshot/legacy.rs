//! The snapshot formats before `QVSNAP04`, still loaded so that an upgrade restarts from the
//! snapshots it finds (the next snapshot is written in the current format). One buffer of
//! the whole file, a CRC32C at its end, every cell with its own time and type tag:
//! ```text
//! "QVSNAP03" | u32 partition | u16 streams | streams × (str16 log id, u64 offset) | u32 views
//! per view:  str16 name | u16 features | features × (str16 name, str16 type)
//!            u16 aggregations | aggregations × (str16 name, str16 spec "fn/window_ms/tile_ms")
//!            u64 rows | rows × (str16 key | u64 version | features × cell | rings)
//!            cell = u8 0 absent | u8 1, i64 ts (null) | u8 2, i64 ts, value (record codec)
//!            rings (views with aggregations) = u64 cell version | aggregations × (u32 n, n × f64)
//! u64 dedup ids | ids × u128 (oldest first)
//! u32 crc32c of everything before
//! ```
//! `QVSNAP02` has one offset (the embedded log's) and no log id in place of the streams.
//! Sealed, the whole file was one `quiver_fsutil::seal` blob bound to the partition.

use std::path::Path;

use quiver_core::record::Reader;
use quiver_core::schema::FeatureIdx;
use quiver_fsutil::seal::KeyRing;

use super::{Loaded, MAGIC_V2, MAGIC_V3};
use crate::error::{Result, StoreError};
use crate::row::{Cell, Row};
use crate::{AggCell, DedupWindow, Store};

/// Loads a `QVSNAP02`/`QVSNAP03` snapshot (`bytes`, the whole file at `path`) into `store`.
pub(super) fn load(
    path: &Path,
    mut bytes: Vec<u8>,
    store: &Store,
    partition: u32,
    dedup_capacity: usize,
    sealer: Option<&KeyRing>,
) -> Result<Loaded> {
    let path = path.to_path_buf();
    let corrupt = |reason: String| StoreError::CorruptSnapshot {
        path: path.clone(),
        reason,
    };
    if quiver_fsutil::seal::is_sealed(&bytes) {
        let ring = sealer.ok_or_else(|| {
            corrupt("encrypted, and [storage] encryption_key_file is not set".into())
        })?;
        bytes = ring
            .open(&super::legacy_seal_aad(partition), &bytes)
            .map_err(|e| corrupt(e.to_string()))?;
    }
    if bytes.len() < MAGIC_V3.len() + 4 {
        return Err(corrupt("too short".into()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(corrupt("checksum mismatch".into()));
    }
    let mut r = Reader::new(body);
    let parse =
        |r: &mut Reader<'_>| -> std::result::Result<Loaded, quiver_core::record::CodecError> {
            let magic = r.take(8)?;
            if magic != MAGIC_V3 && magic != MAGIC_V2 {
                return Err(quiver_core::record::CodecError::Version(0));
            }
            let stored = r.u32()?;
            if stored != partition {
                // A plain snapshot renamed to another partition's file.
                return Err(quiver_core::record::CodecError::Partition(stored));
            }
            let (offsets, legacy_offset) = if magic == MAGIC_V2 {
                (None, u64::from_le_bytes(r.array()?))
            } else {
                let n = r.u16()?;
                let mut list = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    let id = r.str16("log id")?.to_string();
                    list.push((id, u64::from_le_bytes(r.array()?)));
                }
                (Some(list), 0)
            };
            let views = r.u32()?;
            for _ in 0..views {
                let name = r.str16("view")?;
                let nf = usize::from(r.u16()?);
                let schema = store.schema().clone();
                let current = schema.view_by_name(name);
                // For each stored feature: where it goes in the current view, if anywhere.
                let mut map: Vec<Option<FeatureIdx>> = Vec::with_capacity(nf);
                for _ in 0..nf {
                    let fname = r.str16("feature")?;
                    let ftype = r.str16("type")?;
                    map.push(current.and_then(|v| {
                        let idx = v.feature_index(fname)?;
                        (v.feature(idx).ty.to_string() == ftype).then_some(idx)
                    }));
                }
                // For each stored aggregation: the current one with the same name and tiling.
                // Another tiling cannot be converted; that aggregation starts empty.
                let na = usize::from(r.u16()?);
                let mut agg_map: Vec<Option<usize>> = Vec::with_capacity(na);
                for _ in 0..na {
                    let aname = r.str16("aggregation")?;
                    let spec = r.str16("spec")?;
                    agg_map.push(current.and_then(|v| {
                        v.aggregations
                            .iter()
                            .position(|a| a.name == aname && super::agg_spec(&a.window) == spec)
                    }));
                }
                let rows = u64::from_le_bytes(r.array()?);
                for _ in 0..rows {
                    let key = r.str16("key")?;
                    let version = u64::from_le_bytes(r.array()?);
                    let mut cells = current.map(|v| vec![Cell::Absent; v.features.len()]);
                    for target in &map {
                        let cell = match r.u8()? {
                            0 => Cell::Absent,
                            1 => Cell::Null {
                                ts_ms: i64::from_le_bytes(r.array()?),
                            },
                            2 => {
                                let ts_ms = i64::from_le_bytes(r.array()?);
                                Cell::Value {
                                    ts_ms,
                                    value: r.value()?,
                                }
                            }
                            t => return Err(quiver_core::record::CodecError::Tag(t)),
                        };
                        if let (Some(cells), Some(i)) = (cells.as_mut(), target) {
                            cells[usize::from(*i)] = cell;
                        }
                    }
                    // Rings: present when the view aggregated at snapshot time.
                    let mut rings: Vec<(usize, Vec<f64>)> = Vec::new();
                    let mut ring_version = 0;
                    if na > 0 {
                        ring_version = u64::from_le_bytes(r.array()?);
                        for target in &agg_map {
                            let n = r.u32()? as usize;
                            let bytes = r.take(
                                n.checked_mul(8)
                                    .ok_or(quiver_core::record::CodecError::TooLong)?,
                            )?;
                            let values = bytes
                                .chunks_exact(8)
                                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                                .collect();
                            if let Some(a) = target {
                                rings.push((*a, values));
                            }
                        }
                    }
                    if let (Some(v), Some(cells)) = (current, cells) {
                        let layout = store.layout(v.id);
                        // Types were matched by name above; check the values too, so that no
                        // snapshot can put a value of the wrong type in a slot.
                        let fits = cells.iter().enumerate().all(|(i, c)| match c {
                            Cell::Value { value, .. } => {
                                value.fits(layout.feature_type(i as FeatureIdx))
                            }
                            _ => true,
                        });
                        if fits {
                            let mut row = Row::from_cells(layout, version, cells);
                            if let Some(al) = store.agg_layout(v.id) {
                                let cell = AggCell::new(v, al);
                                for (a, values) in rings {
                                    // A ring of another length belongs to another tiling: skip it.
                                    if values.len() == v.aggregations[a].window.ring_len() {
                                        cell.restore(v, al, a, &values, ring_version);
                                    }
                                }
                                row = row.with_aggs(std::sync::Arc::new(cell));
                            }
                            store.insert_row(partition, v.id, key, row);
                        }
                    }
                }
            }
            let n = u64::from_le_bytes(r.array()?);
            let mut dedup = DedupWindow::new(dedup_capacity);
            for _ in 0..n {
                dedup.insert(u128::from_le_bytes(r.array()?));
            }
            if r.remaining() != 0 {
                return Err(quiver_core::record::CodecError::Trailing(r.remaining()));
            }
            Ok(Loaded {
                offsets,
                legacy_offset,
                ends: None,
                dedup,
            })
        };
    parse(&mut r).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
/// Writes a `QVSNAP03` snapshot, as Quiver did before `QVSNAP04` (tests of the upgrade).
pub(super) fn write_v3(
    dir: &Path,
    store: &Store,
    partition: u32,
    offsets: &[(String, u64)],
    dedup: &DedupWindow,
    sealer: Option<&KeyRing>,
) -> Result<u64> {
    assert!(
        !offsets.is_empty() && offsets.len() <= usize::from(u16::MAX),
        "a partition has 1..=65535 streams"
    );
    std::fs::create_dir_all(dir).map_err(crate::error::io(dir))?;
    let schema = store.schema().clone();
    let mut buf = Vec::with_capacity(1 << 20);
    buf.extend_from_slice(MAGIC_V3);
    buf.extend_from_slice(&partition.to_le_bytes());
    buf.extend_from_slice(&(offsets.len() as u16).to_le_bytes());
    for (log_id, offset) in offsets {
        quiver_core::record::put_str16(&mut buf, log_id);
        buf.extend_from_slice(&offset.to_le_bytes());
    }
    buf.extend_from_slice(&(schema.views.len() as u32).to_le_bytes());
    for view in &schema.views {
        quiver_core::record::put_str16(&mut buf, &view.name);
        buf.extend_from_slice(&(view.features.len() as u16).to_le_bytes());
        for f in &view.features {
            quiver_core::record::put_str16(&mut buf, &f.name);
            quiver_core::record::put_str16(&mut buf, &f.ty.to_string());
        }
        buf.extend_from_slice(&(view.aggregations.len() as u16).to_le_bytes());
        for a in &view.aggregations {
            quiver_core::record::put_str16(&mut buf, &a.name);
            quiver_core::record::put_str16(&mut buf, &super::agg_spec(&a.window));
        }
        let agg_layout = store.agg_layout(view.id);
        let count_at = buf.len();
        buf.extend_from_slice(&0u64.to_le_bytes());
        let mut rows = 0u64;
        let layout = store.layout(view.id);
        store.for_each_row(partition, view.id, |key, row| {
            rows += 1;
            quiver_core::record::put_str16(&mut buf, key);
            buf.extend_from_slice(&row.version().to_le_bytes());
            for f in 0..view.features.len() {
                match row.get(layout, f as FeatureIdx) {
                    Cell::Absent => buf.push(0),
                    Cell::Null { ts_ms } => {
                        buf.push(1);
                        buf.extend_from_slice(&ts_ms.to_le_bytes());
                    }
                    Cell::Value { ts_ms, value } => {
                        buf.push(2);
                        buf.extend_from_slice(&ts_ms.to_le_bytes());
                        quiver_core::record::put_value(&mut buf, &value);
                    }
                }
            }
            if let Some(al) = agg_layout {
                let cell = row.aggs().expect("rows of aggregating views carry rings");
                let mut words = Vec::new();
                let version = cell.copy_words(&mut words).expect("one writer: this one");
                super::put_rings(&mut buf, view, al, version, &words);
            }
        });
        buf[count_at..count_at + 8].copy_from_slice(&rows.to_le_bytes());
    }
    buf.extend_from_slice(&(dedup.len() as u64).to_le_bytes());
    for id in dedup.iter() {
        buf.extend_from_slice(&id.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());

    let path = super::snapshot_path(dir, partition);
    if let Some(ring) = sealer {
        buf = ring.seal(&super::legacy_seal_aad(partition), &buf);
    }
    quiver_fsutil::write_atomic(&path, &buf).map_err(crate::error::io(&path))?;
    Ok(buf.len() as u64)
}
