//! The commit journal: one file that every partition's records pass through, so that a
//! group-commit round costs one fsync however many partitions it touched.
//!
//! Why: with a file per partition, a round that reaches P partitions paid P fsyncs — with
//! 100-event requests spread over 8 partitions, 8 fsyncs per request, most of the log's CPU
//! (BENCHMARKS.md, "Thread model"). Now the writer writes each partition's frames to its
//! segment (to the OS, not synced), writes the same frames to the journal, and fsyncs only the
//! journal: a record is durable once it is in the journal. Segments are fsynced at a
//! *checkpoint*; a sealed segment when it rolls.
//!
//! A checkpoint does not stop the writer: when the journal passes `log.segment_bytes` (64 MiB
//! by default) the writer starts the next journal file, whose header names the offset each
//! partition has been written to, and a checkpointer thread fsyncs the segments up to there,
//! then deletes the older journal. So the *oldest* journal file's header always names offsets
//! the segments are synced to, and the journal files together hold every durable record past
//! them. Bounded: one checkpoint runs at a time, and past twice the threshold the writer waits
//! for it, so the journal files hold at most about 4 × `segment_bytes` (disk, and replay at
//! start).
//!
//! Recovery reads the journal files first: in a partition's last segment, damage at or past
//! the oldest file's checkpoint is bytes the OS had not written back yet (a power loss); the
//! segment is cut there and the journal's frames from that offset on are written back. Damage
//! before the checkpoint is damage to synced data and refuses to open, as before.
//!
//! ```text
//! <log>/journal-<generation, 20 digits>
//!   header = "QVJRNL01" | u32 partitions | u32 crc32c(partitions, checkpoints) | u64 checkpoint × P
//!   entry  = u32 partition | u32 crc32c(partition, frame) | frame (exactly as in the segment)
//! ```
//! A journal file is created whole (`write_atomic`: header only). Entries are appended and
//! fsynced in rounds; a round is never split between files, so only the newest file's last
//! round can be torn, and decoding stops at the first entry that does not check.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::{io, LogError, Result};
use crate::frame::{self, FrameHeader, FRAME_HEADER_BYTES};

const JOURNAL_PREFIX: &str = "journal-";
const MAGIC: &[u8; 8] = b"QVJRNL01";
const HEADER_FIXED_BYTES: usize = 16;
const ENTRY_HEADER_BYTES: usize = 8;

pub struct Journal {
    file: File,
    path: PathBuf,
    generation: u64,
    len: u64,
}

pub fn journal_path(log_dir: &Path, generation: u64) -> PathBuf {
    log_dir.join(format!("{JOURNAL_PREFIX}{generation:020}"))
}

/// The journal files in `log_dir`, oldest first.
pub fn list(log_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(log_dir).map_err(io(log_dir))? {
        let entry = entry.map_err(io(log_dir))?;
        let name = entry.file_name();
        let generation = name
            .to_str()
            .and_then(|n| n.strip_prefix(JOURNAL_PREFIX))
            .and_then(|g| g.parse::<u64>().ok());
        if let Some(g) = generation {
            out.push((g, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

impl Journal {
    /// Creates journal file `generation` in `log_dir`, empty, its header recording
    /// `checkpoints` (per partition, the offset its segments are or are being synced to).
    pub fn create(log_dir: &Path, generation: u64, checkpoints: &[u64]) -> Result<Journal> {
        let path = journal_path(log_dir, generation);
        let header = encode_header(checkpoints);
        quiver_fsutil::write_atomic(&path, &header).map_err(io(&path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Journal {
            file,
            path,
            generation,
            len: header.len() as u64,
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Appends entries built by [`encode_entry`] (written to the OS, not synced).
    pub fn append(&mut self, entries: &[u8]) -> Result<()> {
        self.file.write_all(entries).map_err(io(&self.path))?;
        self.len += entries.len() as u64;
        Ok(())
    }

    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Bytes in the file, its header included.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Removes the journal files older than `generation` (all of them with `u64::MAX`).
pub fn remove_before(log_dir: &Path, generation: u64) -> Result<()> {
    let old: Vec<_> = list(log_dir)?
        .into_iter()
        .filter(|(g, _)| *g < generation)
        .collect();
    for (_, path) in &old {
        std::fs::remove_file(path).map_err(io(path))?;
    }
    if !old.is_empty() {
        crate::segment::sync_dir(log_dir)?;
    }
    Ok(())
}

fn encode_header(checkpoints: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_FIXED_BYTES + 8 * checkpoints.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(checkpoints.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    for c in checkpoints {
        out.extend_from_slice(&c.to_le_bytes());
    }
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[8..12]), &out[HEADER_FIXED_BYTES..]);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Appends one entry: `frame` (one whole segment frame) bound for `partition`.
pub fn encode_entry(out: &mut Vec<u8>, partition: u32, frame: &[u8]) {
    let p = partition.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&p), frame);
    out.extend_from_slice(&p);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(frame);
}

/// One entry of a decoded journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub partition: u32,
    pub offset: u64,
    /// Where its frame lies in the journal's bytes.
    pub frame: Range<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub checkpoints: Vec<u64>,
    /// In journal order; per partition the offsets follow one another.
    pub entries: Vec<Entry>,
    /// Bytes through the last entry that checked; anything after is a torn round.
    pub valid_len: usize,
}

/// Decodes a journal of a log of `partitions` partitions. Stops at the first entry that does
/// not check (a torn last round); fails on a bad header or on entries of one partition whose
/// offsets do not follow one another (no writer produces that). Never panics.
pub fn decode(bytes: &[u8], partitions: u32) -> std::result::Result<Decoded, &'static str> {
    let checkpoints = decode_header(bytes, partitions)?;
    let mut next: Vec<Option<u64>> = vec![None; partitions as usize];
    let mut entries = Vec::new();
    let mut pos = HEADER_FIXED_BYTES + 8 * partitions as usize;
    while let Some(entry) = entry_at(bytes, pos, partitions) {
        let expected = next[entry.partition as usize].get_or_insert(entry.offset);
        if *expected != entry.offset {
            return Err("a partition's journal entries skip or repeat an offset");
        }
        if entry.offset < checkpoints[entry.partition as usize] {
            return Err("a journal entry is older than its checkpoint");
        }
        *expected += 1;
        pos = entry.frame.end;
        entries.push(entry);
    }
    Ok(Decoded {
        checkpoints,
        entries,
        valid_len: pos,
    })
}

fn decode_header(bytes: &[u8], partitions: u32) -> std::result::Result<Vec<u64>, &'static str> {
    let end = HEADER_FIXED_BYTES + 8 * partitions as usize;
    if bytes.len() < end || &bytes[..8] != MAGIC {
        return Err("bad journal header");
    }
    if bytes[8..12] != partitions.to_le_bytes() {
        return Err("the journal names another partition count than the log");
    }
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[8..12]),
        &bytes[HEADER_FIXED_BYTES..end],
    );
    if bytes[12..16] != crc.to_le_bytes() {
        return Err("journal header checksum mismatch");
    }
    Ok(bytes[HEADER_FIXED_BYTES..end]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// The entry at `pos`, if a whole one that checks is there.
fn entry_at(bytes: &[u8], pos: usize, partitions: u32) -> Option<Entry> {
    let head = bytes.get(pos..pos + ENTRY_HEADER_BYTES)?;
    let partition = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
    if partition >= partitions {
        return None;
    }
    let start = pos + ENTRY_HEADER_BYTES;
    let frame_head = bytes.get(start..start + FRAME_HEADER_BYTES)?;
    let header = FrameHeader::parse(frame_head.try_into().expect("header bytes"));
    let frame = bytes.get(start..start.checked_add(FRAME_HEADER_BYTES + header.len)?)?;
    if crc32c::crc32c_append(crc32c::crc32c(&head[..4]), frame) != crc {
        return None;
    }
    frame::check_frame(frame, header.offset).ok()?;
    Some(Entry {
        partition,
        offset: header.offset,
        frame: start..start + frame.len(),
    })
}

/// A journal file read back at recovery.
pub struct ReadBack {
    pub generation: u64,
    pub bytes: Vec<u8>,
    pub decoded: Decoded,
}

/// Reads and decodes every journal file in `log_dir`, oldest first; empty if there is none (a
/// log that never ran with a journal, or with `fsync = never`).
pub fn read_all(log_dir: &Path, partitions: u32) -> Result<Vec<ReadBack>> {
    list(log_dir)?
        .into_iter()
        .map(|(generation, path)| {
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let decoded = read_one(&path, &bytes, partitions)?;
            Ok(ReadBack {
                generation,
                bytes,
                decoded,
            })
        })
        .collect()
}

fn read_one(path: &Path, bytes: &[u8], partitions: u32) -> Result<Decoded> {
    let decoded = decode(bytes, partitions).map_err(|reason| LogError::Corrupt {
        partition: 0,
        segment: path.display().to_string(),
        reason: reason.to_string(),
    })?;
    if decoded.valid_len < bytes.len() {
        tracing::warn!(
            path = %path.display(),
            dropped_bytes = bytes.len() - decoded.valid_len,
            "ignoring a torn journal round"
        );
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn journal(checkpoints: &[u64], records: &[(u32, u64, &[u8])]) -> Vec<u8> {
        let mut out = encode_header(checkpoints);
        let mut f = Vec::new();
        for &(p, offset, payload) in records {
            f.clear();
            frame::encode_frame(&mut f, offset, 7, false, payload);
            encode_entry(&mut out, p, &f);
        }
        out
    }

    #[test]
    fn entries_round_trip_and_a_torn_round_is_dropped() {
        let bytes = journal(&[3, 0], &[(0, 3, b"a"), (1, 0, b"bb"), (0, 4, b"")]);
        let d = decode(&bytes, 2).unwrap();
        assert_eq!(d.checkpoints, vec![3, 0]);
        let got: Vec<_> = d.entries.iter().map(|e| (e.partition, e.offset)).collect();
        assert_eq!(got, vec![(0, 3), (1, 0), (0, 4)]);
        assert_eq!(d.valid_len, bytes.len());
        for cut in d.entries[2].frame.start - ENTRY_HEADER_BYTES..bytes.len() {
            let d = decode(&bytes[..cut], 2).unwrap();
            assert_eq!(d.entries.len(), 2, "cut at {cut}");
        }
    }

    #[test]
    fn a_gap_an_old_entry_or_another_partition_count_is_refused() {
        assert!(decode(&journal(&[0], &[(0, 0, b"a"), (0, 2, b"b")]), 1).is_err());
        assert!(decode(&journal(&[5], &[(0, 4, b"a")]), 1).is_err());
        assert!(decode(&journal(&[0, 0], &[]), 3).is_err());
        let mut bad = journal(&[1, 2], &[]);
        bad[HEADER_FIXED_BYTES] ^= 1;
        assert!(decode(&bad, 2).is_err(), "the checkpoints are checksummed");
    }

    proptest! {
        #[test]
        fn decoding_any_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), partitions in 0u32..4) {
            let _ = decode(&bytes, partitions);
            let mut framed = encode_header(&vec![0; partitions as usize]);
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed, partitions);
        }

        #[test]
        fn any_flipped_bit_in_an_entry_ends_the_journal_there(payload in prop::collection::vec(any::<u8>(), 1..40), bit in any::<prop::sample::Index>()) {
            let mut bytes = journal(&[0], &[(0, 0, &payload)]);
            let start = HEADER_FIXED_BYTES + 8;
            let bit = start * 8 + bit.index((bytes.len() - start) * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let d = decode(&bytes, 1).unwrap();
            prop_assert!(d.entries.is_empty());
        }
    }
}
