//! Sealing data at rest (`[storage] encryption_key_file`): log records, snapshots and the
//! idempotency journal are encrypted and authenticated with XChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`).
//!
//! # Design constraints
//! - A sealed blob names its key and carries its own nonce:
//!   `0xE5 | u32 key id | 24-byte nonce | ciphertext | 16-byte tag` (45 bytes over the plain
//!   text). XChaCha's 192-bit nonces are drawn at random: no counter to persist, and the chance
//!   of a repeat is negligible for any number of records one key will ever seal.
//! - Associated data binds a blob to its place (a log record to its partition and offset, a
//!   snapshot to its partition), so a sealed record moved elsewhere does not open.
//! - The first byte `0xE5` marks a sealed blob; where a plain format could start with any byte
//!   (a log record's payload is the log's caller's), the container says what is sealed (a log
//!   frame's flag), so data written plain before a key was set still reads.
//! - Key rotation: the key file lists every key that may still be needed to read; the last one
//!   seals. Adding a key (`quiver storage keygen`) and restarting seals new data with it; old
//!   data opens while its key is listed.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;

/// First byte of every sealed blob.
pub const SEALED_TAG: u8 = 0xE5;
const NONCE_BYTES: usize = 24;
const HEADER_BYTES: usize = 1 + 4 + NONCE_BYTES;
/// Bytes a sealed blob adds to its plain text.
pub const OVERHEAD_BYTES: usize = HEADER_BYTES + 16;
/// Keys one file may hold (rotation keeps a few, not hundreds).
const KEYS_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("sealed with key {0}, which the key file does not hold")]
    UnknownKey(u32),
    #[error("does not open: wrong key, damaged, or moved from another place")]
    Forged,
    #[error("not a sealed blob")]
    NotSealed,
}

/// The keys of `[storage] encryption_key_file`: every one opens, the last one seals.
pub struct KeyRing {
    keys: Vec<(u32, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u32> = self.keys.iter().map(|k| k.0).collect();
        write!(f, "KeyRing {{ ids: {ids:?} }}") // never the keys
    }
}

impl KeyRing {
    /// Reads a key file: lines `<id> <64 hex digits>`; `#` comments and blank lines skipped.
    pub fn load(path: &Path) -> Result<KeyRing, SealError> {
        let fail = |reason: String| SealError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex) = parse_line(line).ok_or_else(|| {
                fail(format!(
                    "line {}: expected `<id> <64 hex digits>` (quiver storage keygen writes it)",
                    n + 1
                ))
            })?;
            if keys.iter().any(|(k, _)| *k == id) {
                return Err(fail(format!("line {}: key id {id} appears twice", n + 1)));
            }
            keys.push((id, XChaCha20Poly1305::new(&hex.into())));
        }
        if keys.is_empty() || keys.len() > KEYS_MAX {
            return Err(fail(format!(
                "holds {} keys; 1 to {KEYS_MAX} expected",
                keys.len()
            )));
        }
        Ok(KeyRing { keys })
    }

    /// The id of the key that seals.
    pub fn sealing_id(&self) -> u32 {
        self.keys.last().expect("at least one key").0
    }

    /// Appends `plain`, sealed under the last key with `aad`, to `out`.
    pub fn seal_into(&self, aad: &[u8], plain: &[u8], out: &mut Vec<u8>) {
        let (id, cipher) = self.keys.last().expect("at least one key");
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
            .expect("XChaCha20-Poly1305 seals any length Quiver writes");
        out.reserve(HEADER_BYTES + sealed.len());
        out.push(SEALED_TAG);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        debug_assert_eq!(sealed.len(), plain.len() + 16);
    }

    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD_BYTES);
        self.seal_into(aad, plain, &mut out);
        out
    }

    /// Opens a blob [`seal`](Self::seal) made with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let (id, nonce, body) = split(sealed)?;
        let cipher = self
            .keys
            .iter()
            .find(|(k, _)| *k == id)
            .map(|(_, c)| c)
            .ok_or(SealError::UnknownKey(id))?;
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
            .map_err(|_| SealError::Forged)
    }
}

/// Whether `bytes` is a sealed blob (by its first byte; [`KeyRing::open`] decides the rest).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.first() == Some(&SEALED_TAG)
}

/// The key id a sealed blob names.
pub fn key_id(sealed: &[u8]) -> Result<u32, SealError> {
    split(sealed).map(|(id, _, _)| id)
}

fn split(sealed: &[u8]) -> Result<(u32, &[u8], &[u8]), SealError> {
    if sealed.len() < OVERHEAD_BYTES || sealed[0] != SEALED_TAG {
        return Err(SealError::NotSealed);
    }
    let id = u32::from_le_bytes(sealed[1..5].try_into().expect("4 bytes"));
    Ok((id, &sealed[5..HEADER_BYTES], &sealed[HEADER_BYTES..]))
}

fn parse_line(line: &str) -> Option<(u32, [u8; 32])> {
    let mut parts = line.split_whitespace();
    let id = parts.next()?.parse::<u32>().ok()?;
    let hex = parts.next()?;
    if parts.next().is_some() || hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((id, key))
}

/// Appends a new random key to the key file at `path` (created with mode 0600 if missing),
/// with the next id; returns the id. The new key seals from the next start on.
pub fn add_key(path: &Path) -> Result<u32, SealError> {
    let fail = |reason: String| SealError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "# Quiver's keys for data at rest: `<id> <key, hex>`. Every key listed opens; the last\n\
             # seals. Keep old keys while data sealed with them may remain (see README).\n"
                .to_string()
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    let next = if existing.lines().any(|l| parse_line(l.trim()).is_some()) {
        KeyRing::load(path)?
            .keys
            .iter()
            .map(|k| k.0)
            .max()
            .unwrap_or(0)
            + 1
    } else {
        1
    };
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let text = format!("{existing}{next} {hex}\n");
    crate::write_atomic(path, text.as_bytes()).map_err(|e| fail(e.to_string()))?;
    restrict(path).map_err(|e| fail(e.to_string()))?;
    Ok(next)
}

#[cfg(unix)]
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(not(unix))]
fn restrict(_: &Path) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(dir: &Path, n: usize) -> (PathBuf, KeyRing) {
        let path = dir.join("keys");
        for _ in 0..n {
            add_key(&path).unwrap();
        }
        let ring = KeyRing::load(&path).unwrap();
        (path, ring)
    }

    proptest! {
        #[test]
        fn sealed_blobs_open_only_with_their_key_and_place(plain in proptest::collection::vec(any::<u8>(), 0..400), flip in any::<proptest::sample::Index>()) {
            let dir = tempfile::tempdir().unwrap();
            let (_, ring) = ring(dir.path(), 1);
            let sealed = ring.seal(b"p1/7", &plain);
            prop_assert_eq!(sealed.len(), plain.len() + OVERHEAD_BYTES);
            prop_assert!(is_sealed(&sealed));
            prop_assert_eq!(ring.open(b"p1/7", &sealed).unwrap(), plain.clone());
            prop_assert!(matches!(ring.open(b"p1/8", &sealed), Err(SealError::Forged)));
            let mut damaged = sealed.clone();
            let bit = flip.index(damaged.len() * 8);
            damaged[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(ring.open(b"p1/7", &damaged).is_err());
        }
    }

    #[test]
    fn rotation_keeps_old_data_readable_and_seals_with_the_newest_key() {
        let dir = tempfile::tempdir().unwrap();
        let (path, first) = ring(dir.path(), 1);
        let old = first.seal(b"x", b"old record");
        assert_eq!(add_key(&path).unwrap(), 2);
        let rotated = KeyRing::load(&path).unwrap();
        assert_eq!(rotated.sealing_id(), 2);
        assert_eq!(rotated.open(b"x", &old).unwrap(), b"old record");
        let new = rotated.seal(b"x", b"new record");
        assert_eq!(key_id(&new).unwrap(), 2);
        assert!(matches!(
            first.open(b"x", &new),
            Err(SealError::UnknownKey(2))
        ));
        let other = ring(&dir.path().join("other"), 1).1;
        assert!(matches!(other.open(b"x", &old), Err(SealError::Forged)));
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        for bad in [
            "",
            "# only a comment\n",
            "1 abc\n",
            "x 00\n",
            &format!("1 {0}\n1 {0}\n", "00".repeat(32)),
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(KeyRing::load(&p).is_err(), "{bad:?}");
        }
        std::fs::write(&p, format!("7 {}\n", "ab".repeat(32))).unwrap();
        assert_eq!(KeyRing::load(&p).unwrap().sealing_id(), 7);
        assert!(!format!("{:?}", KeyRing::load(&p).unwrap()).contains("abab"));
    }
}
