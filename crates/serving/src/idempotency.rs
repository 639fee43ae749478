//! `Idempotency-Key`: a retried ingest batch gets the first reply and is applied once, also
//! after a restart.
//!
//! Two mechanisms, because a crash can fall between them:
//! 1. This table: key → (hash of the body, the reply), bounded (`ingest.idempotency_keys_max`,
//!    oldest evicted) and expiring (`ingest.idempotency_ttl`), journaled to
//!    `<data_dir>/idempotency.journal` once the batch is acknowledged, and reloaded at start.
//! 2. Every event of a keyed batch carries a dedup id derived from (key, position in batch)
//!    (`quiver_core::record::dedup_from_idempotency`). If the server dies after the log write
//!    but before the journal write, the client's retry is appended again and the materializer
//!    skips every event it already applied.
//!
//! Journal entries: `u32 len | u32 crc32c | payload`, payload = `i64 created_ms | u128 body
//! hash | str16 key | u32 len, reply bytes` — sealed (`quiver_fsutil::seal`) when `[storage]
//! encryption_key_file` is set. A torn tail is ignored at load; the file is rewritten (at
//! start, so a journal written plain is sealed from then on, and when it holds more than twice
//! as many entries as live ones) with only live entries.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use quiver_core::record::{put_str16, Reader};
use quiver_fsutil::seal::{self, KeyRing};

/// What a sealed journal entry is bound to.
const SEAL_AAD: &[u8] = b"QVIDEMPOTENCY";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Never seen (or expired): the caller owns the key until it calls `complete` or `abandon`.
    New,
    /// Seen with the same body: replay this reply.
    Done(Vec<u8>),
    /// Seen with another body.
    Mismatch,
    /// Another request with this key is being processed right now.
    InFlight,
}

enum Entry {
    InFlight {
        body_hash: u128,
    },
    Done {
        body_hash: u128,
        reply: Vec<u8>,
        created_ms: i64,
    },
}

struct Inner {
    entries: HashMap<String, Entry>,
    /// Completed keys oldest first, for eviction and expiry.
    order: VecDeque<(String, i64)>,
    journal: Option<File>,
    journal_entries: usize,
}

pub struct IdempotencyStore {
    inner: Mutex<Inner>,
    path: Option<PathBuf>,
    keys_max: usize,
    ttl_ms: i64,
    sealer: Option<Arc<KeyRing>>,
    sync: bool,
}

pub fn body_hash(body: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(body)
}

impl IdempotencyStore {
    /// Opens (and replays) the journal at `path`; `sync` fsyncs each entry.
    pub fn open(
        path: Option<&Path>,
        keys_max: usize,
        ttl_ms: i64,
        sync: bool,
        now_ms: i64,
        sealer: Option<Arc<KeyRing>>,
    ) -> std::io::Result<IdempotencyStore> {
        let mut inner = Inner {
            entries: HashMap::new(),
            order: VecDeque::new(),
            journal: None,
            journal_entries: 0,
        };
        if let Some(path) = path {
            if let Ok(bytes) = std::fs::read(path) {
                for (created_ms, hash, key, reply) in decode_journal(&bytes, sealer.as_deref()) {
                    inner.journal_entries += 1;
                    if now_ms - created_ms <= ttl_ms {
                        inner.entries.insert(
                            key.clone(),
                            Entry::Done {
                                body_hash: hash,
                                reply,
                                created_ms,
                            },
                        );
                        inner.order.push_back((key, created_ms));
                    }
                }
            }
        }
        let store = IdempotencyStore {
            inner: Mutex::new(inner),
            path: path.map(Path::to_path_buf),
            keys_max,
            ttl_ms,
            sync,
            sealer,
        };
        {
            let mut inner = store.inner.lock();
            store.evict(&mut inner, now_ms);
            store.rewrite(&mut inner)?;
        }
        Ok(store)
    }

    pub fn begin(&self, key: &str, body_hash: u128, now_ms: i64) -> Lookup {
        let mut inner = self.inner.lock();
        self.evict(&mut inner, now_ms);
        match inner.entries.get(key) {
            Some(Entry::InFlight { .. }) => Lookup::InFlight,
            Some(Entry::Done {
                body_hash: h,
                reply,
                ..
            }) => {
                if *h == body_hash {
                    Lookup::Done(reply.clone())
                } else {
                    Lookup::Mismatch
                }
            }
            None => {
                inner
                    .entries
                    .insert(key.to_string(), Entry::InFlight { body_hash });
                Lookup::New
            }
        }
    }

    /// The batch failed before it was acknowledged: forget the key so a retry runs again.
    pub fn abandon(&self, key: &str) {
        let mut inner = self.inner.lock();
        if matches!(inner.entries.get(key), Some(Entry::InFlight { .. })) {
            inner.entries.remove(key);
        }
    }

    /// Records the reply of an acknowledged batch. With `durable` (the batch was acknowledged
    /// after fsync) the reply is journaled before this returns; otherwise it is kept in memory
    /// only, because a journaled reply must never outlive events a crash can still take: after
    /// a crash the retry is appended again and its key-derived dedup ids keep it applied once.
    pub fn complete(
        &self,
        key: &str,
        reply: Vec<u8>,
        now_ms: i64,
        durable: bool,
    ) -> std::io::Result<()> {
        let mut inner = self.inner.lock();
        let Some(Entry::InFlight { body_hash }) = inner.entries.get(key) else {
            return Ok(());
        };
        let body_hash = *body_hash;
        if durable && inner.journal.is_some() {
            let mut frame = Vec::with_capacity(128 + key.len() + reply.len());
            self.encode_entry(&mut frame, now_ms, body_hash, key, &reply);
            let journal = inner.journal.as_mut().expect("checked");
            journal.write_all(&frame)?;
            if self.sync {
                journal.sync_data()?;
            }
            inner.journal_entries += 1;
        }
        inner.entries.insert(
            key.to_string(),
            Entry::Done {
                body_hash,
                reply,
                created_ms: now_ms,
            },
        );
        inner.order.push_back((key.to_string(), now_ms));
        self.evict(&mut inner, now_ms);
        if inner.journal_entries > 2 * inner.order.len() + 1024 {
            self.rewrite(&mut inner)?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn evict(&self, inner: &mut Inner, now_ms: i64) {
        while let Some((key, created)) = inner.order.front() {
            if inner.order.len() <= self.keys_max && now_ms - created <= self.ttl_ms {
                break;
            }
            let key = key.clone();
            inner.order.pop_front();
            if matches!(inner.entries.get(&key), Some(Entry::Done { .. })) {
                inner.entries.remove(&key);
            }
        }
    }

    /// Appends one journal entry (`u32 len | u32 crc32c | payload`) to `out`.
    fn encode_entry(
        &self,
        out: &mut Vec<u8>,
        created_ms: i64,
        hash: u128,
        key: &str,
        reply: &[u8],
    ) {
        let mut payload = Vec::with_capacity(64 + key.len() + reply.len());
        payload.extend_from_slice(&created_ms.to_le_bytes());
        payload.extend_from_slice(&hash.to_le_bytes());
        put_str16(&mut payload, key);
        payload.extend_from_slice(&(reply.len() as u32).to_le_bytes());
        payload.extend_from_slice(reply);
        if let Some(ring) = &self.sealer {
            payload = ring.seal(SEAL_AAD, &payload);
        }
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
    }

    /// Rewrites the journal with the live entries only (atomically).
    fn rewrite(&self, inner: &mut Inner) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut out = Vec::new();
        for (key, _) in &inner.order {
            if let Some(Entry::Done {
                body_hash,
                reply,
                created_ms,
            }) = inner.entries.get(key)
            {
                self.encode_entry(&mut out, *created_ms, *body_hash, key, reply);
            }
        }
        quiver_fsutil::write_atomic(path, &out)?;
        inner.journal = Some(OpenOptions::new().append(true).open(path)?);
        inner.journal_entries = inner.order.len();
        Ok(())
    }
}

fn decode_journal(bytes: &[u8], sealer: Option<&KeyRing>) -> Vec<(i64, u128, String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(head) = bytes.get(pos..pos + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
        let Some(payload) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32c::crc32c(payload) != crc {
            break;
        }
        // A plain entry (written before the key was set) may start with the sealed tag by
        // chance: what does not open is read as plain.
        let opened = match sealer {
            Some(ring) if seal::is_sealed(payload) => ring.open(SEAL_AAD, payload).ok(),
            _ => None,
        };
        if opened.is_none() && sealer.is_none() && seal::is_sealed(payload) {
            tracing::warn!("the idempotency journal looks encrypted and [storage] encryption_key_file is not set");
        }
        let payload = opened.as_deref().unwrap_or(payload);
        let mut r = Reader::new(payload);
        let parsed = (|| {
            let created = i64::from_le_bytes(r.array().ok()?);
            let hash = u128::from_le_bytes(r.array().ok()?);
            let key = r.str16("key").ok()?.to_string();
            let n = r.u32().ok()? as usize;
            let reply = r.take(n).ok()?.to_vec();
            Some((created, hash, key, reply))
        })();
        match parsed {
            Some(e) => out.push(e),
            None => break,
        }
        pos += 8 + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_mismatches_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency.journal");
        let s = IdempotencyStore::open(Some(&path), 10, 1000, true, 0, None).unwrap();
        assert_eq!(s.begin("k", 1, 0), Lookup::New);
        assert_eq!(s.begin("k", 1, 0), Lookup::InFlight);
        s.complete("k", b"reply".to_vec(), 0, true).unwrap();
        assert_eq!(s.begin("soft", 1, 0), Lookup::New);
        s.complete("soft", b"not durable".to_vec(), 0, false)
            .unwrap();
        assert_eq!(s.begin("soft", 1, 0), Lookup::Done(b"not durable".to_vec()));
        assert_eq!(s.begin("k", 1, 1), Lookup::Done(b"reply".to_vec()));
        assert_eq!(s.begin("k", 2, 1), Lookup::Mismatch);
        assert_eq!(s.begin("gone", 1, 1), Lookup::New);
        s.abandon("gone");
        assert_eq!(s.begin("gone", 1, 1), Lookup::New);
        drop(s);
        // A torn tail after the good entry is ignored.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1]).unwrap();
        let s = IdempotencyStore::open(Some(&path), 10, 1000, true, 500, None).unwrap();
        assert_eq!(s.begin("k", 1, 500), Lookup::Done(b"reply".to_vec()));
        assert_eq!(
            s.begin("soft", 1, 500),
            Lookup::New,
            "a reply to a non-durable ack is not journaled"
        );
        assert_eq!(s.begin("k", 1, 2000), Lookup::New, "expired after the ttl");
    }

    #[test]
    fn bounded() {
        let s = IdempotencyStore::open(None, 3, i64::MAX, false, 0, None).unwrap();
        for i in 0..10 {
            let k = format!("k{i}");
            assert_eq!(s.begin(&k, 0, 0), Lookup::New);
            s.complete(&k, vec![], 0, true).unwrap();
        }
        assert_eq!(s.len(), 3);
        assert_eq!(s.begin("k0", 0, 0), Lookup::New);
    }
}
