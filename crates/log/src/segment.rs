//! Segment files: naming, listing and scanning (used by recovery and by `quiver log verify`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{io, Result};
use crate::frame::{self, FrameProblem, SEGMENT_HEADER_BYTES};

pub const SEGMENT_SUFFIX: &str = ".seg";

pub fn segment_name(base_offset: u64) -> String {
    format!("{base_offset:020}{SEGMENT_SUFFIX}")
}

pub fn partition_dir(log_dir: &Path, partition: u32) -> PathBuf {
    log_dir.join(format!("p-{partition:04}"))
}

/// Base offsets of the segments in `dir`, ascending.
pub fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = name
            .strip_suffix(SEGMENT_SUFFIX)
            .and_then(|b| b.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// What a scan of one segment's bytes found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub base_offset: u64,
    pub records: u64,
    /// Bytes from the start of the file through the last valid frame.
    pub valid_len: u64,
    pub first_append_ms: Option<i64>,
    pub last_append_ms: Option<i64>,
    /// Why the scan stopped before the end of the bytes, and where.
    pub stop: Option<(u64, FrameProblem)>,
    /// A valid frame with the next expected offset exists *after* the stop: the damage is
    /// in the middle of acknowledged data, not a torn tail.
    pub valid_after_stop: bool,
}

impl Scan {
    pub fn next_offset(&self) -> u64 {
        self.base_offset + self.records
    }
}

/// Scans a whole segment (header included), verifying every frame's checksum and offset.
pub fn scan(bytes: &[u8], expected_base: u64) -> std::result::Result<Scan, &'static str> {
    let base = frame::parse_segment_header(bytes).ok_or("bad segment header")?;
    if base != expected_base {
        return Err("segment header names another base offset than its file name");
    }
    let mut scan = Scan {
        base_offset: base,
        records: 0,
        valid_len: SEGMENT_HEADER_BYTES as u64,
        first_append_ms: None,
        last_append_ms: None,
        stop: None,
        valid_after_stop: false,
    };
    let mut pos = SEGMENT_HEADER_BYTES;
    while pos < bytes.len() {
        let expected = base + scan.records;
        match frame::check_frame(&bytes[pos..], expected) {
            Ok((header, total)) => {
                scan.records += 1;
                scan.first_append_ms.get_or_insert(header.append_ms);
                scan.last_append_ms = Some(header.append_ms);
                pos += total;
                scan.valid_len = pos as u64;
            }
            Err(problem) => {
                scan.stop = Some((pos as u64, problem));
                scan.valid_after_stop = find_frame(&bytes[pos + 1..], expected);
                break;
            }
        }
    }
    Ok(scan)
}

/// Whether a valid frame carrying `offset` or a later one starts anywhere in `bytes`. Only
/// run after a bad frame, to tell a torn tail (nothing valid follows) from damage inside
/// data that was already synced (valid records follow the bad one).
fn find_frame(bytes: &[u8], offset: u64) -> bool {
    /// Offsets further ahead than this are taken for garbage without computing a checksum.
    const AHEAD_MAX: u64 = 1 << 32;
    (0..bytes.len().saturating_sub(frame::FRAME_HEADER_BYTES - 1)).any(|i| {
        let candidate = u64::from_le_bytes(bytes[i + 8..i + 16].try_into().expect("8 bytes"));
        candidate >= offset
            && candidate - offset < AHEAD_MAX
            && frame::check_frame(&bytes[i..], candidate).is_ok()
    })
}

/// fsync a directory so that a create, rename or unlink inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, segment_header};

    fn segment(base: u64, n: u64) -> Vec<u8> {
        let mut b = segment_header(base).to_vec();
        for i in 0..n {
            encode_frame(
                &mut b,
                base + i,
                1000 + i as i64,
                false,
                format!("record {i}").as_bytes(),
            );
        }
        b
    }

    #[test]
    fn scans_clean_segment() {
        let s = scan(&segment(10, 5), 10).unwrap();
        assert_eq!((s.records, s.next_offset(), s.stop), (5, 15, None));
        assert_eq!(
            (s.first_append_ms, s.last_append_ms),
            (Some(1000), Some(1004))
        );
    }

    #[test]
    fn torn_tail_is_told_from_damage_in_the_middle() {
        let full = segment(0, 5);
        let torn = &full[..full.len() - 3];
        let s = scan(torn, 0).unwrap();
        assert_eq!(s.records, 4);
        assert!(matches!(s.stop, Some((_, FrameProblem::Incomplete))));
        assert!(!s.valid_after_stop);

        let mut damaged = full.clone();
        damaged[SEGMENT_HEADER_BYTES + 30] ^= 0xff; // inside record 0's payload
        let s = scan(&damaged, 0).unwrap();
        assert_eq!(s.records, 0);
        assert!(matches!(s.stop, Some((_, FrameProblem::Corrupt(_)))));
        assert!(s.valid_after_stop, "records 1..5 follow intact");

        let mut zeroed = full.clone();
        let len = zeroed.len();
        zeroed.extend(std::iter::repeat_n(0u8, 100));
        let s = scan(&zeroed, 0).unwrap();
        assert_eq!(s.records, 5);
        assert_eq!(s.valid_len, len as u64);
    }

    #[test]
    fn header_is_checked() {
        assert!(scan(b"garbage", 0).is_err());
        assert!(scan(&segment(3, 1), 4).is_err());
    }
}
