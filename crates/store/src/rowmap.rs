//! One (partition, view)'s rows. Most rows are DENSE rows of views whose features are all
//! numeric and that keep no aggregations — a producer sending a view's features together —
//! and those live in a map of Quiver's own: key and words side by side in one array of
//! slots, found through an index of one word per entry. Every other row (strings, vectors,
//! rings, rows whose features were written at different times, keys over
//! [`keys::LONG_KEY_MAX`] bytes) lives in a `papaya` map beside it, the side map. A slotted row
//! that stops being DENSE moves to the side map and comes back to its slot when an event makes
//! it DENSE again; a key whose first row was not DENSE stays in the side map.
//!
//! Why a map of our own: papaya allocates each entry apart from the row it points to, so an
//! entity took two allocations, each with the allocator's header and rounding: 366 bytes for
//! an entity of 32 f64 (264 raw), against issue #15's ≤ 1.2×. Here an entity takes its slot
//! (16 bytes of key — a key over 15 bytes has its bytes in a key arena beside the slots —,
//! then the row's words) and 1⅓–2⅔ words of index (3/8 to 3/4 full).
//! (Rejected: hashbrown under a lock, whose readers wait for a writer's resize.)
//!
//! Concurrency — one writer, the partition's materializer; readers never wait for it:
//! - A slot is written whole before the index entry naming it is published (release; readers
//!   acquire), and no other key ever takes it while its tables live.
//! - A row rewritten where it stands takes its seqlock (`RowRef::overwrite_in_place`,
//!   `RowRef::replace_in_place`), which readers check, as for rows of the side map.
//! - A row that stops fitting its slot goes into the side map first; then its slot is marked
//!   moved (`row::MOVED`, release), which fails any read under way; a reader that meets the
//!   mark (acquire) finds it in the side map. Back in its slot, the words are written, then
//!   the header, and only then is the side map's copy dropped: a reader that met the mark and
//!   then misses the side map looks at the slot again.
//! - Growing publishes new tables (`arc_swap`): a larger index, empty, beside the old one,
//!   and one more segment of slots. The old index's entries are copied over a few per write
//!   (a find that misses the new index looks in the old one until the copy ends). Readers
//!   holding the old tables read on — segments are shared, so they see the same rows — and
//!   free them when done. A row inserted after a reader loaded its tables is not in them:
//!   that reader started first.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use compact_str::CompactString;

use crate::row::{Row, RowRef};

mod keys;

use keys::{Key, KeyArena, KEY_WORDS};
/// Entries of the first index; each growth at least doubles it.
const INDEX_MIN: usize = 16;
/// Slots per map: an index of 2^32 entries at most, 3/4 full (positions are 32 bits of hash).
const SLOTS_MAX: usize = 3 << 30;
/// Positions of the previous index copied over per write after a growth: the copy ends long
/// before the index fills again (after 1/32 of the previous index's length in new keys; a
/// growth leaves room for 3/8 of the new length). Tests copy one at a time, so that copies
/// stay under way across many operations.
const COPY_STEP: usize = if cfg!(test) { 1 } else { 32 };

type Side = papaya::HashMap<CompactString, Row>;

pub(crate) struct RowMap {
    slots: Option<Slots>,
    side: Side,
}

struct Slots {
    /// Words of a row in a slot (`2 + numeric features`: header, event time, values); the
    /// slot is [`KEY_WORDS`] more.
    row_words: usize,
    tables: ArcSwap<Tables>,
    hasher: foldhash::fast::RandomState,
    /// Clears so far: a reader whose tables are from before the last one knows that a moved
    /// row missing from the side map was cleared, not moved again (see [`Pinned::get`]).
    clears: AtomicU64,
}

struct Tables {
    /// Open addressing, linear probing, at most 3/4 full, a power of two long (or empty):
    /// 0 is a free entry, else `h << 32 | (slot + 1)` with `h` the key hash's high half.
    index: Box<[AtomicU64]>,
    /// After a growth, until every entry is copied over: the tables before it, whose index
    /// holds the entries not copied yet (a find that misses here looks there). Copying a
    /// few per new key, not all at once, keeps a growth from stopping the writer: placing
    /// 1.6M entries at once took 36 ms.
    previous: ArcSwapOption<Tables>,
    /// Whether `previous` may be set: false once the copy is over (release, after the last
    /// entry is placed), so a find need not load `previous` (an `arc_swap` load is a few
    /// locked instructions).
    copying: AtomicBool,
    /// Positions of `previous`'s index copied so far (the writer's).
    copied: AtomicUsize,
    /// The slots in order: segment `i` holds slots `starts[i]..starts[i + 1]`.
    segments: Vec<Arc<Segment>>,
    starts: Vec<usize>,
    /// Long keys' bytes (shared by successive tables; a clear starts a new arena).
    keys: Arc<KeyArena>,
    /// [`Slots::clears`] when these tables' first ancestor was made.
    clears: u64,
    /// Slots handed out (written before `used` counts them), and how many of those moved.
    used: AtomicUsize,
    moved: AtomicUsize,
}

struct Segment(Box<[AtomicU64]>);

type SideRef<'m> =
    papaya::HashMapRef<'m, CompactString, Row, std::hash::RandomState, papaya::LocalGuard<'m>>;

/// A map pinned for a series of reads: the tables as they were, and the side map's epoch
/// once a read needs it (most reads end in a slot: entering an epoch is not free).
pub(crate) struct Pinned<'m> {
    slots: Option<(&'m Slots, arc_swap::Guard<Arc<Tables>>)>,
    side_map: &'m Side,
    side: std::cell::OnceCell<SideRef<'m>>,
}

impl RowMap {
    /// A map whose DENSE rows of `slot_row_words` words take slots (`None`: every row goes
    /// to the side map — views with strings, vectors or aggregations).
    pub(crate) fn new(slot_row_words: Option<usize>) -> RowMap {
        RowMap {
            slots: slot_row_words.map(|row_words| {
                assert!(row_words >= 2, "a row has a header and an event time");
                Slots {
                    row_words,
                    tables: ArcSwap::from_pointee(Tables::empty(0)),
                    hasher: foldhash::fast::RandomState::default(),
                    clears: AtomicU64::new(0),
                }
            }),
            side: Side::new(),
        }
    }

    pub(crate) fn pin(&self) -> Pinned<'_> {
        Pinned {
            slots: self.slots.as_ref().map(|s| (s, s.tables.load())),
            side_map: &self.side,
            side: std::cell::OnceCell::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        let slotted = self.slots.as_ref().map_or(0, |s| {
            let t = s.tables.load();
            // `moved` first: it never exceeds `used`, which only grows.
            let moved = t.moved.load(Ordering::Acquire);
            t.used.load(Ordering::Acquire) - moved
        });
        slotted + self.side.len()
    }

    /// Drops every row. Readers holding the old tables read on until they let them go.
    pub(crate) fn clear(&self) {
        if let Some(s) = &self.slots {
            // Counted first: a reader of the old tables that then misses the side map knows.
            let clears = s.clears.fetch_add(1, Ordering::AcqRel) + 1;
            s.tables.store(Arc::new(Tables::empty(clears)));
        }
        self.side.pin().clear();
    }

    /// Makes room for `rows` more rows (a snapshot about to load): slots, for a view whose
    /// rows take them (the side map of such a view grows as it needs; reserving both would
    /// hold twice the memory while most rows are DENSE).
    pub(crate) fn reserve(&self, rows: usize) {
        match &self.slots {
            Some(s) => {
                let t = s.tables.load_full();
                let want = t.used.load(Ordering::Relaxed).saturating_add(rows);
                if want > t.capacity() && want <= SLOTS_MAX {
                    let grown = s.grow(&t, want);
                    // A load is about to follow: copy everything now, not a few per row.
                    s.copy_over(&grown, usize::MAX);
                }
            }
            None => self.side.pin().reserve(rows),
        }
    }

    /// Finishes a resize of the side map under way (a walk of it helps finish one).
    pub(crate) fn finish_resizes(&self) {
        let _ = self.side.pin().iter();
    }

    /// Puts `row` under `key`, replacing what was there. Only the map's writer calls this.
    pub(crate) fn insert(&self, key: &str, row: Row) {
        let side = self.side.pin();
        let slotted = self
            .slots
            .as_ref()
            .and_then(|s| Some((s, Key::new(key, &s.hasher)?)));
        let Some((slots, k)) = slotted else {
            side.insert(CompactString::from(key), row);
            return;
        };
        let tables = slots.tables.load_full();
        match tables.find(&k, slots.row_words) {
            Some(old) if old.is_moved() && row.r().fits_slot(slots.row_words) => {
                // Back in its slot: the header makes it live, then the side copy goes.
                old.fill_moved(row.r());
                side.remove(key);
                tables.moved.fetch_sub(1, Ordering::Release);
            }
            Some(old) if old.is_moved() => {
                side.insert(CompactString::from(key), row);
            }
            Some(old) => {
                if old.replace_in_place(row.r()) {
                    return;
                }
                // The side map first, then the mark: a reader that meets the mark finds it.
                side.insert(CompactString::from(key), row);
                old.mark_moved();
                tables.moved.fetch_add(1, Ordering::Release);
            }
            None if row.r().fits_slot(slots.row_words) && side.get(key).is_none() => {
                if let Err(row) = slots.push(tables, &k, row) {
                    side.insert(CompactString::from(key), row);
                }
            }
            None => {
                side.insert(CompactString::from(key), row);
            }
        }
    }

    /// Calls `copy` with every row as it stands while the writer may be applying: slots
    /// first (a moved row copied from the side map), then the side map's rows of keys
    /// without a slot. A key that gets its slot after the walk began is left out (the
    /// records that made it come after the walk's start, which a snapshot replays).
    /// `copy` returns false if a write overlapped it; it is called again with the key's
    /// current row after `wait(&mut attempts)`, and if that returns false the walk stops
    /// and returns false.
    pub(crate) fn for_each_live(
        &self,
        mut copy: impl FnMut(&str, RowRef<'_>) -> bool,
        mut wait: impl FnMut(&mut usize) -> bool,
    ) -> bool {
        // One guard for the whole walk: rows replaced meanwhile are reclaimed after it.
        let guard = self.side.guard();
        let walked = self.slots.as_ref().map(|s| (s, s.tables.load_full()));
        if let Some((s, tables)) = &walked {
            if !self.walk_slots(s, tables, &guard, &mut copy, &mut wait) {
                return false;
            }
        }
        for (key, met) in self.side.iter(&guard) {
            let slotted = walked.as_ref().is_some_and(|(s, tables)| {
                Key::new(key, &s.hasher).is_some_and(|k| tables.find(&k, s.row_words).is_some())
            });
            if slotted {
                continue; // copied with the slots
            }
            let mut attempts = 0;
            loop {
                // A resize begun after the walk started leaves it on the old table: look the
                // key up again. (A row the side map let go meanwhile went back to a slot the
                // walk's tables do not have yet: copied as met, a state from after the walk
                // began, which is all a snapshot needs.)
                let row = self.side.get(key, &guard).unwrap_or(met);
                if copy(key, row.r()) {
                    break;
                }
                if !wait(&mut attempts) {
                    return false;
                }
            }
        }
        true
    }

    /// [`for_each_live`](Self::for_each_live)'s walk of the slots of `tables`.
    fn walk_slots(
        &self,
        s: &Slots,
        tables: &Tables,
        guard: &impl papaya::Guard,
        copy: &mut impl FnMut(&str, RowRef<'_>) -> bool,
        wait: &mut impl FnMut(&mut usize) -> bool,
    ) -> bool {
        let mut buf = Vec::new();
        for at in 0..tables.used.load(Ordering::Acquire) {
            let slot = tables.slot(at, s.row_words);
            let key = keys::decode(&slot[..KEY_WORDS], &tables.keys, &mut buf);
            let row = RowRef::of_words(&slot[KEY_WORDS..]);
            let mut attempts = 0;
            loop {
                // A moved row is copied from the side map here, not only by the walk of it:
                // it may come back to its slot, and leave the side map, before that walk
                // gets to it.
                let copied = if !row.is_moved() {
                    copy(key, row)
                } else if let Some(moved) = self.side.get(key, guard) {
                    copy(key, moved.r())
                } else if s.cleared_since(tables) {
                    break;
                } else {
                    continue; // back in its slot, or moved again, meanwhile
                };
                if copied {
                    break;
                }
                if !wait(&mut attempts) {
                    return false;
                }
            }
        }
        true
    }
}

impl Pinned<'_> {
    /// The row of `key`, if any.
    pub(crate) fn get(&self, key: &str) -> Option<RowRef<'_>> {
        let Some((slots, tables)) = &self.slots else {
            return self.side_get(key);
        };
        let Some(row) = Key::new(key, &slots.hasher).and_then(|k| tables.find(&k, slots.row_words))
        else {
            return self.side_get(key);
        };
        // Each turn ends unless the writer moved the row between two looks.
        loop {
            if !row.is_moved() {
                return Some(row);
            }
            if let Some(moved) = self.side_get(key) {
                return Some(moved);
            }
            if slots.cleared_since(tables) {
                return None;
            }
            // Marked, then not in the side map: back in its slot meanwhile (the side map drops
            // it after), and maybe moved out again since. Look again.
        }
    }

    /// Copies a few more entries of an index the map outgrew (see [`Tables::previous`]): the
    /// writer calls this on every record it applies, so a map that stops getting new keys
    /// still lets its previous index go. Only the map's writer calls this.
    pub(crate) fn help_copy(&self) {
        if let Some((slots, tables)) = &self.slots {
            slots.copy_over(tables, COPY_STEP);
        }
    }

    fn side_get(&self, key: &str) -> Option<RowRef<'_>> {
        let side = self.side.get_or_init(|| self.side_map.pin());
        side.get(key).map(Row::r)
    }
}

impl Slots {
    /// Whether the map was cleared after `tables` (or their first ancestor) were made.
    fn cleared_since(&self, tables: &Tables) -> bool {
        self.clears.load(Ordering::Acquire) != tables.clears
    }

    /// Puts a new key's row in the next slot, growing first if the slots are all taken;
    /// gives the row back if the map holds [`SLOTS_MAX`] slots already.
    /// (Also gives it back if a long key finds the key arena full.)
    fn push(&self, tables: Arc<Tables>, k: &Key<'_>, row: Row) -> Result<(), Row> {
        let at = tables.used.load(Ordering::Relaxed);
        let tables = if at < tables.capacity() {
            tables
        } else if at < SLOTS_MAX {
            self.grow(&tables, at + 1)
        } else {
            return Err(row);
        };
        let Some(key_words) = k.store(&tables.keys) else {
            return Err(row);
        };
        let slot = tables.slot(at, self.row_words);
        for (w, value) in slot.iter().zip(key_words) {
            w.store(value, Ordering::Relaxed);
        }
        RowRef::fill(&slot[KEY_WORDS..], row.r());
        tables.place(k.hash, at, Ordering::Release);
        tables.used.store(at + 1, Ordering::Release);
        self.copy_over(&tables, COPY_STEP);
        Ok(())
    }

    /// Copies up to `steps` more entries of the previous index into `tables`' own; when all
    /// are, lets the previous tables go.
    fn copy_over(&self, tables: &Tables, steps: usize) {
        if !tables.copying.load(Ordering::Relaxed) {
            return;
        }
        let Some(previous) = tables.previous.load_full() else {
            return;
        };
        let from = tables.copied.load(Ordering::Relaxed);
        let to = from.saturating_add(steps).min(previous.index.len());
        for entry in &previous.index[from..to] {
            let e = entry.load(Ordering::Relaxed);
            if e != 0 {
                // Release: a reader that finds it here sees the slot it names.
                tables.place(e, (e as u32 - 1) as usize, Ordering::Release);
            }
        }
        tables.copied.store(to, Ordering::Relaxed);
        if to == previous.index.len() {
            tables.copying.store(false, Ordering::Release);
            tables.previous.store(None);
        }
    }

    /// Publishes tables with room for `rows` slots: an index at least twice as long, which
    /// the entries of `old`'s are copied into a few at a time (see [`Tables::previous`]), and
    /// one more segment for the new slots.
    fn grow(&self, old: &Arc<Tables>, rows: usize) -> Arc<Tables> {
        assert!(rows > old.capacity() && rows <= SLOTS_MAX);
        // One previous index at a time (the copy's pace makes this a no-op but after a
        // reservation far past the current size).
        self.copy_over(old, usize::MAX);
        let len = (rows * 4).div_ceil(3).next_power_of_two();
        let len = len.max(INDEX_MIN).max(old.index.len() * 2);
        let mut segments = old.segments.clone();
        let mut starts = old.starts.clone();
        let first = old.capacity();
        let capacity = len / 4 * 3;
        segments.push(Arc::new(Segment(zeroed(
            (capacity - first) * (KEY_WORDS + self.row_words),
        ))));
        starts.push(first);
        let tables = Arc::new(Tables {
            index: zeroed(len),
            previous: ArcSwapOption::new((!old.index.is_empty()).then(|| old.clone())),
            copying: AtomicBool::new(!old.index.is_empty()),
            copied: AtomicUsize::new(0),
            keys: old.keys.clone(),
            clears: old.clears,
            segments,
            starts,
            used: AtomicUsize::new(old.used.load(Ordering::Relaxed)),
            moved: AtomicUsize::new(old.moved.load(Ordering::Relaxed)),
        });
        assert_eq!(tables.capacity(), capacity);
        // Release: a reader that loads these tables sees what they hold.
        self.tables.store(tables.clone());
        tables
    }
}

impl Tables {
    fn empty(clears: u64) -> Tables {
        Tables {
            index: Box::new([]),
            previous: ArcSwapOption::empty(),
            copying: AtomicBool::new(false),
            copied: AtomicUsize::new(0),
            keys: Arc::new(KeyArena::new()),
            clears,
            segments: Vec::new(),
            starts: Vec::new(),
            used: AtomicUsize::new(0),
            moved: AtomicUsize::new(0),
        }
    }

    /// Slots these tables have room for.
    fn capacity(&self) -> usize {
        self.index.len() / 4 * 3
    }

    /// Slot `at`'s words: the key's, then the row's.
    fn slot(&self, at: usize, row_words: usize) -> &[AtomicU64] {
        let seg = self.starts.partition_point(|&s| s <= at) - 1;
        let width = KEY_WORDS + row_words;
        let from = (at - self.starts[seg]) * width;
        &self.segments[seg].0[from..from + width]
    }

    /// The row of the key encoded as `k` (moved or not).
    fn find(&self, k: &Key<'_>, row_words: usize) -> Option<RowRef<'_>> {
        // Loaded before this index is probed: the writer drops it only once every entry is
        // copied here, so one of the two holds the key. (`copying` false: every entry is.)
        let previous = self
            .copying
            .load(Ordering::Acquire)
            .then(|| self.previous.load());
        let at = self.probe(&self.index, k, row_words).or_else(|| {
            let previous = previous.as_ref()?.as_ref()?;
            // Its slots are among these tables' (same segments, fewer of them).
            self.probe(&previous.index, k, row_words)
        })?;
        Some(RowRef::of_words(&self.slot(at, row_words)[KEY_WORDS..]))
    }

    /// The slot `index` names for key `k`.
    fn probe(&self, index: &[AtomicU64], k: &Key<'_>, row_words: usize) -> Option<usize> {
        if index.is_empty() {
            return None;
        }
        let high = k.hash >> 32;
        let mask = index.len() - 1;
        let mut i = high as usize & mask;
        // Bounded: an index is at most 3/4 full, so a free entry ends every probe.
        loop {
            let e = index[i].load(Ordering::Acquire);
            if e == 0 {
                return None;
            }
            if e >> 32 == high {
                let at = (e as u32 - 1) as usize;
                if k.held_by(&self.slot(at, row_words)[..KEY_WORDS], &self.keys) {
                    return Some(at);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Enters slot `at` under `hash` (its high half is all the index keeps).
    fn place(&self, hash: u64, at: usize, order: Ordering) {
        assert!(at < self.capacity());
        let high = hash >> 32;
        let mask = self.index.len() - 1;
        let mut i = high as usize & mask;
        while self.index[i].load(Ordering::Relaxed) != 0 {
            i = (i + 1) & mask;
        }
        self.index[i].store(high << 32 | (at as u64 + 1), order);
    }
}

/// `n` zeroed words, from the allocator's zeroed memory: a large segment or index is mapped
/// fresh and its pages are resident only once written.
pub(super) fn zeroed(n: usize) -> Box<[AtomicU64]> {
    bytemuck::zeroed_slice_box(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{Cell, Layout};
    use proptest::prelude::*;
    use quiver_core::value::{FeatureType, Value};
    use std::collections::BTreeMap;

    fn layout() -> Layout {
        Layout::from_types(vec![FeatureType::F64; 3])
    }

    /// A DENSE row (every feature `x` at one time) at `version`: a slot can hold it.
    fn dense(layout: &Layout, version: u64, x: f64) -> Row {
        let values: Vec<_> = (0..3u16).map(|f| (f, Value::F64(x))).collect();
        let row = Row::empty(layout)
            .r()
            .apply(layout, 1, version - 1, &values, &mut 0);
        let row = row.expect("a first event applies");
        assert!(row.r().fits_slot(5));
        row
    }

    /// A row with one feature set (`x`) at `version`: no slot holds it.
    fn sparse(layout: &Layout, version: u64, x: f64) -> Row {
        let values = [(0u16, Value::F64(x))];
        let row = Row::empty(layout)
            .r()
            .apply(layout, 1, version - 1, &values, &mut 0);
        let row = row.expect("a first event applies");
        assert!(!row.r().fits_slot(5));
        row
    }

    fn first_value(layout: &Layout, row: RowRef<'_>) -> f64 {
        match row.get(layout, 0) {
            Cell::Value {
                value: Value::F64(x),
                ..
            } => x,
            other => panic!("feature 0 holds {other:?}"),
        }
    }

    /// Keys around the slot's limits: empty, short, exactly 15 bytes (inline), 16 to 4096
    /// (the key arena), over 4096 (the side map).
    fn key(i: usize) -> String {
        match i % 5 {
            0 => format!("{}", i / 5).repeat(i % 3),
            1 => format!("k{i}"),
            2 => format!("{i:0>15}"),
            3 => format!("{i:0>16}-long"),
            _ => format!("{i:0>4097}"),
        }
    }

    proptest! {
        /// The map against a `BTreeMap`: rows put in slots, replaced in place, moved to the side
        /// map, in the side map from the first, across growths and clears.
        #[test]
        fn holds_what_a_model_holds(ops in prop::collection::vec((0usize..48, 0u8..20), 1..300)) {
            let layout = layout();
            let map = RowMap::new(layout.dense_words());
            let mut model: BTreeMap<String, (u64, f64)> = BTreeMap::new();
            for (version, (k, kind)) in (1u64..).zip(ops) {
                let (key, x) = (key(k), version as f64);
                match kind {
                    0 => {
                        map.clear();
                        model.clear();
                    }
                    19 => map.reserve(k),
                    1..=4 => {
                        map.insert(&key, sparse(&layout, version, x));
                        model.insert(key, (version, x));
                    }
                    _ => {
                        map.insert(&key, dense(&layout, version, x));
                        model.insert(key, (version, x));
                    }
                }
                prop_assert_eq!(map.len(), model.len());
            }
            let pinned = map.pin();
            for (key, (version, x)) in &model {
                let row = pinned.get(key).expect("a key put is found");
                prop_assert_eq!(row.version(), *version);
                prop_assert_eq!(first_value(&layout, row), *x);
            }
            prop_assert!(pinned.get("never put").is_none());
            let mut seen = BTreeMap::new();
            let whole = map.for_each_live(
                |key, row| seen.insert(key.to_string(), row.version()).is_none(),
                |_| false,
            );
            prop_assert!(whole, "a walk with no writer meets every key once");
            let expected: BTreeMap<String, u64> =
                model.iter().map(|(k, (v, _))| (k.clone(), *v)).collect();
            prop_assert_eq!(seen, expected);
        }
    }

    /// Keys for the race below: every other one long (its bytes in the key arena).
    fn racing_key(i: usize) -> String {
        if i.is_multiple_of(2) {
            format!("k{i}")
        } else {
            format!("an-entity-key-longer-than-a-slot-holds-{i}")
        }
    }

    /// Readers racing one writer that adds keys (growing the tables many times), moves every
    /// seventh row to the side map and every other of those back: a key once added is always
    /// found, whole.
    #[test]
    fn readers_find_every_added_key_while_the_writer_grows_and_moves() {
        const KEYS: usize = 20_000;
        let layout = Arc::new(layout());
        let map = Arc::new(RowMap::new(layout.dense_words()));
        let added = Arc::new(AtomicUsize::new(0));
        let reader = {
            let (map, added, layout) = (map.clone(), added.clone(), layout.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut i = 0usize;
                loop {
                    let n = added.load(Ordering::Acquire);
                    if n == KEYS {
                        return reads;
                    }
                    if n == 0 {
                        std::hint::spin_loop();
                        continue;
                    }
                    i = (i + 7919) % n;
                    let x = read_whole(&map, &layout, &racing_key(i));
                    let i = i as f64;
                    assert!([i, i + 0.5, i + 0.25].contains(&x), "key k{i} read {x}");
                    reads += 1;
                }
            })
        };
        let mut version = 0;
        for i in 0..KEYS {
            version += 1;
            map.insert(&racing_key(i), dense(&layout, version, i as f64));
            if i % 7 == 3 {
                let j = i - 3;
                version += 1;
                map.insert(&racing_key(j), sparse(&layout, version, j as f64 + 0.5));
            }
            if i % 14 == 5 {
                let j = i - 5;
                version += 1;
                map.insert(&racing_key(j), dense(&layout, version, j as f64 + 0.25));
            }
            added.store(i + 1, Ordering::Release);
        }
        let reads = reader
            .join()
            .expect("the reader never saw a missing or torn row");
        assert!(reads > 0, "the reader ran alongside the writer");
        assert_eq!(map.len(), KEYS);
    }

    /// One row moved out of its slot and back, over and over, while a reader reads it: it is
    /// always found — also by a reader that met the mark just before the row came back and
    /// the side map let it go.
    #[test]
    fn a_row_moving_out_of_its_slot_and_back_is_always_found() {
        const MOVES: u64 = 300_000;
        let layout = Arc::new(layout());
        let map = Arc::new(RowMap::new(layout.dense_words()));
        map.insert("k", dense(&layout, 1, 0.0));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (map, done, layout) = (map.clone(), done.clone(), layout.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) {
                    let x = read_whole(&map, &layout, "k");
                    assert!(x >= 0.0, "read {x}");
                    reads += 1;
                }
                reads
            })
        };
        for v in 2..MOVES {
            let row = if v % 2 == 0 { sparse } else { dense };
            map.insert("k", row(&layout, v, v as f64));
        }
        done.store(true, Ordering::Release);
        let reads = reader.join().expect("the row was always found, whole");
        assert!(reads > 0, "the reader ran alongside the writer");
        assert_eq!(map.len(), 1);
    }

    /// An outgrown index is let go once its entries are copied over, by the writer's records
    /// even when no new key comes (updates alone), and every key stays found meanwhile.
    #[test]
    fn a_map_without_new_keys_still_lets_its_outgrown_index_go() {
        let layout = layout();
        let map = RowMap::new(layout.dense_words());
        let copying = |map: &RowMap| {
            let tables = map.slots.as_ref().expect("slots").tables.load();
            (
                tables.copying.load(Ordering::Acquire),
                tables.previous.load().is_some(),
            )
        };
        // The first index holds 12 slots: the 13th key grows it.
        for i in 0..13 {
            map.insert(&format!("k{i}"), dense(&layout, i + 1, i as f64));
        }
        assert_eq!(
            copying(&map),
            (true, true),
            "a growth leaves a copy under way"
        );
        for _ in 0..16 {
            let pinned = map.pin();
            pinned.help_copy();
            for i in 0..13 {
                let row = pinned.get(&format!("k{i}")).expect("found during the copy");
                assert_eq!(first_value(&layout, row), i as f64);
            }
        }
        assert_eq!(
            copying(&map),
            (false, false),
            "the previous index is let go"
        );
    }

    /// Feature 0 of `key`, read under the row's seqlock (retried while a write overlaps).
    fn read_whole(map: &RowMap, layout: &Layout, key: &str) -> f64 {
        loop {
            let pinned = map.pin();
            let row = pinned.get(key).expect("an added key is found");
            let Some(seen) = row.read_begin() else {
                continue;
            };
            let x = first_value(layout, row);
            if row.read_end(seen) {
                return x;
            }
        }
    }
}
