//! Committed consumer offsets (the materializer's, later the history sink's), one small file
//! per consumer, replaced atomically: write a temporary file, fsync it, rename it over the old
//! one, fsync the directory. A reader sees the old offsets or the new, never a mix.
//!
//! File format: `QVOFF001`, u32 count, count × (u32 partition, u64 offset), u32 CRC32C of all
//! the bytes before it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{io, LogError, Result};

const MAGIC: &[u8; 8] = b"QVOFF001";

#[derive(Debug, Clone)]
pub struct OffsetStore {
    dir: PathBuf,
}

impl OffsetStore {
    pub fn open(dir: &Path) -> Result<OffsetStore> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        Ok(OffsetStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, consumer: &str) -> PathBuf {
        assert!(
            !consumer.is_empty()
                && consumer
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "consumer names are simple identifiers"
        );
        self.dir.join(format!("{consumer}.offsets"))
    }

    pub fn commit(&self, consumer: &str, offsets: &BTreeMap<u32, u64>) -> Result<()> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&(offsets.len() as u32).to_le_bytes());
        for (p, o) in offsets {
            bytes.extend_from_slice(&p.to_le_bytes());
            bytes.extend_from_slice(&o.to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let path = self.path(consumer);
        quiver_fsutil::write_atomic(&path, &bytes).map_err(io(&path))
    }

    /// The committed offsets, or an empty map if the consumer never committed.
    pub fn load(&self, consumer: &str) -> Result<BTreeMap<u32, u64>> {
        let path = self.path(consumer);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(io(&path)(e)),
        };
        decode(&bytes).ok_or_else(|| LogError::Corrupt {
            partition: 0,
            segment: path.display().to_string(),
            reason: "offsets file fails its checksum".into(),
        })
    }
}

fn decode(bytes: &[u8]) -> Option<BTreeMap<u32, u64>> {
    let (body, crc) = bytes.split_at_checked(bytes.len().checked_sub(4)?)?;
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) || body.get(..8)? != MAGIC {
        return None;
    }
    let n = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?) as usize;
    let entries = body.get(12..)?;
    if entries.len() != n.checked_mul(12)? {
        return None;
    }
    Some(
        entries
            .chunks_exact(12)
            .map(|c| {
                (
                    u32::from_le_bytes(c[..4].try_into().expect("4")),
                    u64::from_le_bytes(c[4..].try_into().expect("8")),
                )
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = OffsetStore::open(dir.path()).unwrap();
        assert!(store.load("materializer").unwrap().is_empty());
        let offsets: BTreeMap<u32, u64> = [(0, 10), (3, 99)].into();
        store.commit("materializer", &offsets).unwrap();
        assert_eq!(store.load("materializer").unwrap(), offsets);
        let path = dir.path().join("materializer.offsets");
        let mut bytes = fs::read(&path).unwrap();
        bytes[13] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(store.load("materializer").is_err());
    }
}
