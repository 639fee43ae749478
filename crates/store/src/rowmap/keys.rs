//! Keys in a row map's slots. A key of up to 15 bytes sits in the slot's two key words (a
//! length byte, then the bytes); a longer one, up to [`LONG_KEY_MAX`] bytes — a UUID, a
//! prefixed id — in the map's key arena, its slot keeping a mark with 56 bits of the key's
//! hash and where its bytes are. Arena words, like slots, are written before the index entry
//! that names their slot is published, and never move or change while their tables live.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::zeroed;

/// Words of a slot that hold its key.
pub(super) const KEY_WORDS: usize = 2;
/// Keys up to this many bytes sit in the slot itself.
const INLINE_MAX: usize = 15;
/// Longer keys stay in the side map (a key's place keeps its length in 16 bits).
pub(super) const LONG_KEY_MAX: usize = 4096;
/// The first byte of a slot holding a long key (an inline key's first byte, its length,
/// is at most 15).
const LONG_MARK: u64 = 0xFF;
/// Words of the arena's first segment; each next one is twice as long.
const ARENA_FIRST: usize = 64;
const ARENA_SEGMENTS: usize = 40;

/// A key being looked up or stored.
#[derive(Clone, Copy)]
pub(super) struct Key<'a> {
    /// The first key word as its slot holds it, and the second for an inline key.
    words: [u64; KEY_WORDS],
    pub(super) hash: u64,
    /// A long key's bytes (the arena holds them, the second word says where).
    long: Option<&'a [u8]>,
}

impl<'a> Key<'a> {
    /// `None`: longer than [`LONG_KEY_MAX`] (its row goes to the side map).
    pub(super) fn new(key: &'a str, hasher: &impl BuildHasher) -> Option<Key<'a>> {
        let bytes = key.as_bytes();
        if bytes.len() <= INLINE_MAX {
            let mut b = [0u8; KEY_WORDS * 8];
            b[0] = bytes.len() as u8;
            b[1..=bytes.len()].copy_from_slice(bytes);
            let words = [0, 1].map(|i| u64::from_le_bytes(word_bytes(&b, i)));
            let hash = hasher.hash_one(words);
            return Some(Key {
                words,
                hash,
                long: None,
            });
        }
        (bytes.len() <= LONG_KEY_MAX).then(|| {
            let hash = hasher.hash_one(bytes);
            Key {
                words: [LONG_MARK | hash << 8, 0],
                hash,
                long: Some(bytes),
            }
        })
    }

    /// Whether a slot's key words (`slot`) hold this key.
    pub(super) fn held_by(&self, slot: &[AtomicU64], arena: &KeyArena) -> bool {
        if slot[0].load(Ordering::Relaxed) != self.words[0] {
            return false;
        }
        let second = slot[1].load(Ordering::Relaxed);
        match self.long {
            None => second == self.words[1],
            Some(bytes) => arena.bytes_at(second).is_some_and(|(words, len)| {
                len == bytes.len()
                    && words
                        .iter()
                        .zip(bytes.chunks(8))
                        .all(|(w, chunk)| w.load(Ordering::Relaxed) == padded(chunk))
            }),
        }
    }

    /// The key words a slot stores for this key, a long key's bytes appended to `arena`
    /// first (`None`: the arena is full). Only the map's writer calls this.
    pub(super) fn store(&self, arena: &KeyArena) -> Option<[u64; KEY_WORDS]> {
        match self.long {
            None => Some(self.words),
            Some(bytes) => Some([self.words[0], arena.append(bytes)?]),
        }
    }
}

/// A key as its slot holds it ([`Key::new`] undone), in `buf`.
pub(super) fn decode<'b>(slot: &[AtomicU64], arena: &KeyArena, buf: &'b mut Vec<u8>) -> &'b str {
    buf.clear();
    let first = slot[0].load(Ordering::Relaxed);
    if first & 0xFF == LONG_MARK {
        let (words, len) = arena
            .bytes_at(slot[1].load(Ordering::Relaxed))
            .expect("a long key's bytes are stored before its slot");
        for w in words {
            buf.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        buf.truncate(len);
    } else {
        for w in &slot[..KEY_WORDS] {
            buf.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let len = usize::from(buf[0]).min(INLINE_MAX);
        buf.truncate(1 + len);
        buf.remove(0);
    }
    std::str::from_utf8(buf).expect("a slot's key was a str when stored")
}

/// Long keys' bytes, appended in segments that never move (zeroed pages from the allocator,
/// resident as far as written). Shared by a map's tables as they grow from one another; a
/// clear starts a new one.
pub(super) struct KeyArena {
    segments: [OnceLock<Box<[AtomicU64]>>; ARENA_SEGMENTS],
    /// Words handed out (the writer's).
    used: AtomicUsize,
}

impl KeyArena {
    pub(super) fn new() -> KeyArena {
        KeyArena {
            segments: std::array::from_fn(|_| OnceLock::new()),
            used: AtomicUsize::new(0),
        }
    }

    /// Appends `bytes` (whole in one segment); returns where: `word << 16 | length`.
    fn append(&self, bytes: &[u8]) -> Option<u64> {
        assert!(bytes.len() <= LONG_KEY_MAX);
        let n = bytes.len().div_ceil(8);
        let mut at = self.used.load(Ordering::Relaxed);
        let (segment, offset) = loop {
            let (segment, offset) = segment_of(at);
            if segment >= ARENA_SEGMENTS {
                return None;
            }
            if offset + n <= ARENA_FIRST << segment {
                break (segment, offset);
            }
            at = segment_start(segment + 1);
        };
        let words = self.segments[segment].get_or_init(|| zeroed(ARENA_FIRST << segment));
        for (w, chunk) in words[offset..offset + n].iter().zip(bytes.chunks(8)) {
            w.store(padded(chunk), Ordering::Relaxed);
        }
        self.used.store(at + n, Ordering::Relaxed);
        Some((at as u64) << 16 | bytes.len() as u64)
    }

    /// The words and length of the bytes stored at `place` (see [`append`](Self::append)).
    fn bytes_at(&self, place: u64) -> Option<(&[AtomicU64], usize)> {
        let (at, len) = ((place >> 16) as usize, (place & 0xFFFF) as usize);
        let (segment, offset) = segment_of(at);
        let words = self.segments.get(segment)?.get()?;
        Some((words.get(offset..offset + len.div_ceil(8))?, len))
    }
}

/// The segment holding arena word `at`, and the word's offset in it.
fn segment_of(at: usize) -> (usize, usize) {
    let segment = (at / ARENA_FIRST + 1).ilog2() as usize;
    (segment, at - segment_start(segment))
}

fn segment_start(segment: usize) -> usize {
    ARENA_FIRST * ((1 << segment) - 1)
}

fn word_bytes(b: &[u8; KEY_WORDS * 8], i: usize) -> [u8; 8] {
    b[i * 8..i * 8 + 8].try_into().expect("8 bytes")
}

/// Up to 8 bytes as a little-endian word, zero-padded.
fn padded(chunk: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..chunk.len()].copy_from_slice(chunk);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_a_slot_and_the_arena() {
        let hasher = foldhash::fast::RandomState::default();
        let arena = KeyArena::new();
        let long = "x".repeat(LONG_KEY_MAX);
        let keys = [
            "",
            "a",
            "e1234567",
            "fifteen-bytes!!",
            "ü-and-ß",
            "sixteen-bytes!!!",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            long.as_str(),
        ];
        let mut stored = Vec::new();
        for k in keys {
            let key = Key::new(k, &hasher).expect("fits");
            let words = key.store(&arena).expect("room").map(AtomicU64::new);
            stored.push(words);
        }
        let mut buf = Vec::new();
        for (k, words) in keys.iter().zip(&stored) {
            assert_eq!(decode(words, &arena, &mut buf), *k);
            for (other, other_words) in keys.iter().zip(&stored) {
                let key = Key::new(other, &hasher).expect("fits");
                assert!(key.held_by(other_words, &arena));
                assert_eq!(
                    key.held_by(words, &arena),
                    other == k,
                    "{other:?} in {k:?}'s slot"
                );
            }
        }
        assert!(Key::new(&"x".repeat(LONG_KEY_MAX + 1), &hasher).is_none());
    }

    /// A hash under which every key collides: only the stored bytes tell long keys apart.
    #[derive(Default)]
    struct Collide;

    impl std::hash::Hasher for Collide {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn long_keys_with_one_hash_are_told_apart_by_their_bytes() {
        let hasher = std::hash::BuildHasherDefault::<Collide>::default();
        let arena = KeyArena::new();
        let keys = [
            "a-key-of-sixteen",
            "a-key-of-sixteeN",
            "a-key-of-sixteen-and-more",
        ];
        let stored: Vec<_> = keys
            .iter()
            .map(|k| {
                Key::new(k, &hasher)
                    .unwrap()
                    .store(&arena)
                    .unwrap()
                    .map(AtomicU64::new)
            })
            .collect();
        for (k, words) in keys.iter().zip(&stored) {
            for (other, other_words) in keys.iter().zip(&stored) {
                let key = Key::new(other, &hasher).unwrap();
                assert_eq!(
                    key.held_by(words, &arena),
                    other == k,
                    "{other:?} in {k:?}'s slot"
                );
                assert!(key.held_by(other_words, &arena));
            }
        }
    }

    #[test]
    fn arena_segments_tile_the_words_and_no_key_straddles_two() {
        for at in [0, 63, 64, 191, 192, 1_000_000] {
            let (segment, offset) = segment_of(at);
            assert!(offset < ARENA_FIRST << segment);
            assert_eq!(segment_start(segment) + offset, at);
        }
        let arena = KeyArena::new();
        for i in 0..2_000 {
            let key = format!("{i:0>40}");
            let place = arena.append(key.as_bytes()).expect("room");
            let (words, len) = arena.bytes_at(place).expect("stored");
            assert_eq!(len, 40);
            assert_eq!(words.len(), 5, "one segment holds it whole");
        }
    }
}
