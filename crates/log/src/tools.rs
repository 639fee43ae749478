//! Offline inspection of a log directory, for `quiver log inspect|verify`. Reads the files
//! directly and never writes, so it is safe on the data directory of a stopped server (and
//! harmless, if racy, on a running one).

use std::path::{Path, PathBuf};

use quiver_fsutil::seal::KeyRing;

use crate::error::{io, Result};
use crate::frame::{FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use crate::segment::{self, segment_name};

/// `(partition, directory)` for each `p-NNNN` directory, ascending.
pub fn partition_dirs(log_dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(log_dir).map_err(io(log_dir))? {
        let entry = entry.map_err(io(log_dir))?;
        let name = entry.file_name();
        if let Some(p) = name
            .to_str()
            .and_then(|n| n.strip_prefix("p-"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            out.push((p, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct SegmentReport {
    pub base_offset: u64,
    pub records: u64,
    pub bytes: u64,
    pub first_append_ms: Option<i64>,
    pub last_append_ms: Option<i64>,
    /// Damage that recovery would not repair on its own.
    pub error: Option<String>,
    /// A torn tail that recovery truncates (only ever in the last segment after a crash), or
    /// unsynced bytes a power loss damaged, which recovery cuts and writes back from the journal.
    pub torn_tail_bytes: u64,
    /// Records stored encrypted (`[storage] encryption_key_file`).
    pub sealed_records: u64,
}

#[derive(Debug, Clone)]
pub struct PartitionReport {
    pub partition: u32,
    pub segments: Vec<SegmentReport>,
}

impl PartitionReport {
    pub fn first_offset(&self) -> u64 {
        self.segments.first().map(|s| s.base_offset).unwrap_or(0)
    }
    pub fn next_offset(&self) -> u64 {
        self.segments
            .last()
            .map(|s| s.base_offset + s.records)
            .unwrap_or(0)
    }
    pub fn errors(&self) -> impl Iterator<Item = String> + '_ {
        self.segments.iter().filter_map(move |s| {
            s.error.as_ref().map(|e| {
                format!(
                    "partition {} segment {}: {e}",
                    self.partition,
                    segment_name(s.base_offset)
                )
            })
        })
    }
}

/// Accepts a data directory or its `log/` subdirectory.
pub fn resolve_log_dir(dir: &Path) -> PathBuf {
    let nested = dir.join("log");
    if nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// Reads and checks every frame of every segment; with `keys`, also opens every sealed record
/// (a record that does not open is damage: wrong key, or bytes changed and the CRC redone).
pub fn verify(log_dir: &Path, keys: Option<&KeyRing>) -> Result<Vec<PartitionReport>> {
    let mut reports = Vec::new();
    let partitions = partition_dirs(log_dir)?;
    // Damage at or past the oldest journal file's checkpoint is repaired at start.
    let journals = crate::journal::read_all(log_dir, partitions.len() as u32)?;
    let checkpoints = journals.first().map(|j| j.decoded.checkpoints.clone());
    for (partition, dir) in partitions {
        let checkpoint = checkpoints
            .as_ref()
            .and_then(|c| c.get(partition as usize).copied());
        let bases = segment::list_segments(&dir)?;
        let mut segments = Vec::new();
        for (i, base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let path = dir.join(segment_name(*base));
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let mut report = SegmentReport {
                base_offset: *base,
                records: 0,
                bytes: bytes.len() as u64,
                first_append_ms: None,
                last_append_ms: None,
                error: None,
                torn_tail_bytes: 0,
                sealed_records: 0,
            };
            match segment::scan(&bytes, *base) {
                Err(_) if last && bytes.len() < SEGMENT_HEADER_BYTES => {
                    report.torn_tail_bytes = bytes.len() as u64
                }
                Err(e) => report.error = Some(e.to_string()),
                Ok(scan) => {
                    report.records = scan.records;
                    report.first_append_ms = scan.first_append_ms;
                    report.last_append_ms = scan.last_append_ms;
                    let (sealed, unopened) = check_sealed(&bytes, partition, &scan, keys);
                    report.sealed_records = sealed;
                    report.error = unopened;
                    if let Some((at, problem)) = scan.stop {
                        let journaled = checkpoint.is_some_and(|c| scan.next_offset() >= c);
                        if last && (!scan.valid_after_stop || journaled) {
                            report.torn_tail_bytes = bytes.len() as u64 - scan.valid_len;
                        } else {
                            report.error = Some(format!("{problem:?} at byte {at}"));
                        }
                    }
                    if let Some(next_base) = bases.get(i + 1) {
                        if scan.next_offset() != *next_base && report.error.is_none() {
                            report.error = Some(format!(
                                "ends at offset {} but the next segment starts at {next_base}",
                                scan.next_offset()
                            ));
                        }
                    }
                }
            }
            segments.push(report);
        }
        reports.push(PartitionReport {
            partition,
            segments,
        });
    }
    Ok(reports)
}

/// Counts the sealed records among a scanned segment's valid frames and, with `keys`, opens
/// each: the first that does not open is reported.
fn check_sealed(
    bytes: &[u8],
    partition: u32,
    scan: &segment::Scan,
    keys: Option<&KeyRing>,
) -> (u64, Option<String>) {
    let (mut pos, mut sealed) = (SEGMENT_HEADER_BYTES, 0);
    for offset in scan.base_offset..scan.next_offset() {
        let Ok((h, total)) = crate::frame::check_frame(&bytes[pos..], offset) else {
            break;
        };
        let payload = &bytes[pos + FRAME_HEADER_BYTES..pos + total];
        if h.sealed {
            sealed += 1;
            let aad = crate::frame::seal_aad(partition, offset);
            if let Some(Err(e)) = keys.map(|k| k.open(&aad, payload)) {
                return (sealed, Some(format!("record {offset} does not open: {e}")));
            }
        }
        pos += total;
    }
    (sealed, None)
}

/// The last `limit` valid records of a partition as (offset, append_ms, payload), oldest first;
/// sealed records are opened with `keys` when given (else left sealed).
pub fn tail_records(
    log_dir: &Path,
    partition: u32,
    limit: usize,
    keys: Option<&KeyRing>,
) -> Result<Vec<(u64, i64, Vec<u8>)>> {
    let dir = segment::partition_dir(log_dir, partition);
    let mut out: std::collections::VecDeque<(u64, i64, Vec<u8>)> =
        std::collections::VecDeque::new();
    for base in segment::list_segments(&dir)? {
        let path = dir.join(segment_name(base));
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let mut pos = SEGMENT_HEADER_BYTES;
        let mut expected = base;
        while let Ok((h, total)) =
            crate::frame::check_frame(bytes.get(pos..).unwrap_or(&[]), expected)
        {
            let payload = &bytes[pos + FRAME_HEADER_BYTES..pos + total];
            let aad = crate::frame::seal_aad(partition, h.offset);
            let payload = match keys {
                Some(k) if h.sealed => k.open(&aad, payload).unwrap_or_else(|_| payload.to_vec()),
                _ => payload.to_vec(),
            };
            out.push_back((h.offset, h.append_ms, payload));
            if out.len() > limit {
                out.pop_front();
            }
            pos += total;
            expected += 1;
        }
    }
    Ok(out.into())
}
