//! One entity's row of one view: the latest value of each feature and its event time, laid
//! out compactly. Readers never see a half-applied event: an event that changes the row's
//! shape builds a new row that the store swaps in whole; an event that overwrites every
//! feature of a DENSE numeric row (the common case: a producer sending all of a view's
//! features) rewrites the words where they stand, under a seqlock in the header that readers
//! check (see [`Row::overwrite_in_place`], [`Row::read_begin`]). The words are `AtomicU64`s so
//! the racy copy needs no `unsafe`; relaxed loads and stores compile to plain moves.
//!
//! Layout of `words` (u64 each):
//! ```text
//! [0]                 header: bits 0..55 version (offset + 1 of the last record that changed
//!                     the row), bit 55 WRITING (an in-place write is under way), bits 56..63
//!                     S (distinct event times in use), bit 63 DENSE
//! [1 .. 1+S]          the distinct event times (epoch ms)
//! [1+S .. 1+S+N]      numeric slots (f64 bits, i64, bool) in feature order of numeric features
//! [.. + ceil(F/8)]    one byte per feature: 0xFF never set; else bit 7 = explicit null,
//!                     bits 0..6 = index of its event time. Left out when DENSE: every
//!                     feature set, none null, all at the one event time.
//! ```
//! Features of one event share an event time, so a 32-feature row written by whole events is
//! DENSE: 8 bytes per f64 feature plus 16 for the row, against 16 per feature for a value and
//! a timestamp each. Strings and vectors live in `heap`, absent for views that have none.
//!
//! LWW rule: a value replaces the stored one iff its event time is >= the stored time. Records
//! are applied in log order, so on a tie the later offset (the new record) wins — the
//! (event time, offset) order of DESIGN.md §2 without storing offsets per feature.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use quiver_core::schema::{FeatureIdx, View};

use crate::aggs::AggCell;
use quiver_core::time::EpochMs;
use quiver_core::value::{FeatureType, Value};

const ABSENT: u8 = 0xFF;
const NULL_BIT: u8 = 0x80;
/// At most this many distinct event times per row (bit 7 of the index byte is the null flag).
const STAMPS_MAX: usize = 127;

#[derive(Debug, Clone, Copy)]
enum Slot {
    Num(u16),
    Heap(u16),
}

/// Where each feature of a view lives in a [`Row`].
#[derive(Debug, Clone)]
pub struct Layout {
    slots: Vec<Slot>,
    types: Vec<FeatureType>,
    nums: usize,
    heaps: usize,
}

impl Layout {
    pub fn of(view: &View) -> Layout {
        Layout::from_types(view.features.iter().map(|f| f.ty).collect())
    }

    /// The layout of features of these types, in this order (a snapshot's stored view).
    pub fn from_types(types: Vec<FeatureType>) -> Layout {
        let (mut nums, mut heaps) = (0u16, 0u16);
        let mut slots = Vec::with_capacity(types.len());
        for ty in &types {
            slots.push(match ty {
                FeatureType::String | FeatureType::F32s(_) => {
                    heaps += 1;
                    Slot::Heap(heaps - 1)
                }
                _ => {
                    nums += 1;
                    Slot::Num(nums - 1)
                }
            });
        }
        Layout {
            slots,
            types,
            nums: usize::from(nums),
            heaps: usize::from(heaps),
        }
    }

    pub fn features(&self) -> usize {
        self.slots.len()
    }

    pub fn feature_type(&self, f: FeatureIdx) -> FeatureType {
        self.types[usize::from(f)]
    }

    /// Features kept outside the row's words (strings, vectors), in feature order.
    pub fn heap_slots(&self) -> usize {
        self.heaps
    }

    /// Words of a DENSE row of this layout (header, event time, values) when every feature
    /// is numeric; `None` when some row of it keeps strings or vectors outside its words.
    pub(crate) fn dense_words(&self) -> Option<usize> {
        (self.heaps == 0).then_some(2 + self.nums)
    }
}

/// What a row holds for one feature.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Absent,
    Null { ts_ms: EpochMs },
    Value { ts_ms: EpochMs, value: Value },
}

impl Cell {
    pub fn ts_ms(&self) -> Option<EpochMs> {
        match self {
            Cell::Absent => None,
            Cell::Null { ts_ms } | Cell::Value { ts_ms, .. } => Some(*ts_ms),
        }
    }
}

const VERSION_MASK: u64 = (1 << 55) - 1;
const WRITING_BIT: u64 = 1 << 55;
const STAMPS_SHIFT: u32 = 56;
const DENSE_BIT: u64 = 1 << 63;
/// The header of a map slot whose row has moved to the side map (`rowmap`): WRITING, so a read
/// under way fails its check and looks the key up again, with a version no row has (versions
/// are log offsets + 1, far below 2^55 − 1), and S and DENSE as a DENSE row has them, so a
/// read that met it mid-copy still finds one event time.
pub(crate) const MOVED: u64 = DENSE_BIT | (1 << STAMPS_SHIFT) | WRITING_BIT | VERSION_MASK;

/// An owned row: two words. The store keeps most DENSE numeric rows in slots of its own map
/// instead (`rowmap`: no `Row` around their words), and every other row as one of these in a
/// `papaya` map, whose entry holds a key (three words) and this, 40 bytes, which the allocator
/// serves from its 48-byte class (a three-word handle took the 64-byte one).
#[derive(Debug)]
pub struct Row(Body);

#[derive(Debug)]
enum Body {
    /// Views of numeric features without aggregations: the words alone.
    Plain(Box<[AtomicU64]>),
    /// Views with string/vector features or aggregations. (The enum is as small as the slice
    /// pointer: a null data pointer tells the variants apart.)
    Extra(Box<(Box<[AtomicU64]>, Extra)>),
}

const _: () = assert!(
    std::mem::size_of::<Row>() == 16,
    "a row handle is two words"
);

/// A row's words borrowed for a run of reads (see [`Row::w`]).
#[derive(Clone, Copy)]
struct Words<'a>(&'a [AtomicU64]);

impl Words<'_> {
    fn word(self, i: usize) -> u64 {
        self.0[i].load(Ordering::Relaxed)
    }

    fn header(self) -> u64 {
        self.word(0)
    }

    fn stamp_count(self) -> usize {
        // In-place writes never change S or DENSE: these bits are stable for the row's life.
        ((self.header() & !DENSE_BIT) >> STAMPS_SHIFT) as usize
    }

    fn is_dense(self) -> bool {
        self.header() & DENSE_BIT != 0
    }

    fn stamp(self, i: usize) -> u64 {
        assert!(i < self.stamp_count());
        self.word(1 + i)
    }

    fn num(self, layout: &Layout, n: usize) -> u64 {
        assert!(n < layout.nums);
        self.word(1 + self.stamp_count() + n)
    }

    fn idx_byte(self, layout: &Layout, f: usize) -> u8 {
        if self.is_dense() {
            return 0;
        }
        let start = 1 + self.stamp_count() + layout.nums;
        self.word(start + f / 8).to_le_bytes()[f % 8]
    }
}

impl Clone for Row {
    fn clone(&self) -> Row {
        self.r().to_row()
    }
}

/// A row borrowed where it stands — from a [`Row`] ([`Row::r`]) or from a slot of the store's
/// map, which holds a DENSE row's words with no `Row` around them (`rowmap`). Every read and
/// every in-place write goes through this.
#[derive(Debug, Clone, Copy)]
pub struct RowRef<'a> {
    words: &'a [AtomicU64],
    extra: Option<&'a Extra>,
}

#[derive(Debug, Clone, Default)]
struct Extra {
    heap: Box<[Value]>,
    /// Shared by every version of the row: updated in place (see `aggs`).
    aggs: Option<Arc<AggCell>>,
}

impl Row {
    /// A row in which no feature was ever set.
    pub fn empty(layout: &Layout) -> Row {
        Row::build(
            layout,
            0,
            &[],
            &vec![ABSENT; layout.features()],
            &vec![0; layout.nums],
            empty_extra(layout),
        )
    }

    /// This row with aggregation state attached.
    pub fn with_aggs(self, cell: Arc<AggCell>) -> Row {
        let (words, mut extra) = match self.0 {
            Body::Plain(words) => (words, Extra::default()),
            Body::Extra(both) => *both,
        };
        extra.aggs = Some(cell);
        Row(Body::Extra(Box::new((words, extra))))
    }

    fn from_atomics(words: Box<[AtomicU64]>, extra: Option<Box<Extra>>) -> Row {
        Row(match extra {
            None => Body::Plain(words),
            Some(extra) => Body::Extra(Box::new((words, *extra))),
        })
    }

    fn build(
        layout: &Layout,
        version: u64,
        stamps: &[EpochMs],
        idx: &[u8],
        nums: &[u64],
        extra: Option<Box<Extra>>,
    ) -> Row {
        debug_assert_eq!(idx.len(), layout.features());
        debug_assert_eq!(nums.len(), layout.nums);
        assert!(
            version <= VERSION_MASK,
            "row versions are log offsets, far below 2^55"
        );
        assert!(stamps.len() <= STAMPS_MAX);
        let dense = stamps.len() == 1 && idx.iter().all(|&b| b == 0);
        let idx_words = if dense {
            0
        } else {
            layout.features().div_ceil(8)
        };
        let mut words = Vec::with_capacity(1 + stamps.len() + nums.len() + idx_words);
        let flag = if dense { DENSE_BIT } else { 0 };
        words.push(version | ((stamps.len() as u64) << STAMPS_SHIFT) | flag);
        words.extend(stamps.iter().map(|&t| t as u64));
        words.extend_from_slice(nums);
        if !dense {
            for chunk in idx.chunks(8) {
                let mut b = [ABSENT; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                words.push(u64::from_le_bytes(b));
            }
        }
        Row::from_words(words, extra)
    }

    fn from_words(words: Vec<u64>, extra: Option<Box<Extra>>) -> Row {
        // Same size and alignment: std collects a mapped `vec::IntoIter` in place.
        Row::from_atomics(words.into_iter().map(AtomicU64::new).collect(), extra)
    }

    /// The version a header from [`read_begin`](Self::read_begin) names.
    pub(crate) fn version_of(header: u64) -> u64 {
        header & VERSION_MASK
    }

    /// A row from [`words`](Self::words) (as little-endian bytes, 8 per word) and
    /// [`heap_values`](Self::heap_values) stored under the same layout (snapshot load),
    /// checked so that no input can make a read panic. The words are copied once, into the
    /// row, then checked there.
    pub fn from_parts(layout: &Layout, le: &[u8], heap: Vec<Value>) -> Option<Row> {
        if !le.len().is_multiple_of(8) {
            return None;
        }
        let atomics: Box<[AtomicU64]> = le
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        let words = atomics.len();
        let word = |i: usize| atomics[i].load(Ordering::Relaxed);
        let header = (words > 0).then(|| word(0))?;
        let stamps = ((header & !DENSE_BIT) >> STAMPS_SHIFT) as usize;
        let dense = header & DENSE_BIT != 0;
        if stamps > STAMPS_MAX || (dense && stamps != 1) || header & WRITING_BIT != 0 {
            return None;
        }
        let idx_words = if dense {
            0
        } else {
            layout.features().div_ceil(8)
        };
        if words != 1 + stamps + layout.nums + idx_words || heap.len() != layout.heaps {
            return None;
        }
        // Every index byte names a stored time, every value fits its type (a NaN in an f64
        // slot would fail serialization later, far from here). Checked on the plain words,
        // without building cells: this check was half of a snapshot load's instructions.
        let idx_byte = |f: usize| {
            let at = 1 + stamps + layout.nums + f / 8;
            if dense {
                0
            } else {
                word(at).to_le_bytes()[f % 8]
            }
        };
        let fits = (0..layout.features()).all(|f| {
            let b = idx_byte(f);
            if b == ABSENT || b & NULL_BIT != 0 {
                return b == ABSENT || usize::from(b & !NULL_BIT) < stamps;
            }
            let ty = layout.types[f];
            usize::from(b) < stamps
                && match layout.slots[f] {
                    Slot::Num(n) => num_fits(ty, word(1 + stamps + usize::from(n))),
                    Slot::Heap(h) => heap[usize::from(h)].fits(ty),
                }
        });
        let extra = empty_extra(layout).map(|mut e| {
            e.heap = heap.into_boxed_slice();
            e
        });
        fits.then(|| Row::from_atomics(atomics, extra))
    }

    /// Rebuilds a row from cells (snapshot load).
    pub fn from_cells(layout: &Layout, version: u64, cells: Vec<Cell>) -> Row {
        let mut row = Row::empty(layout);
        // Group cells by time and apply oldest first so ties cannot reorder anything.
        let mut by_time: Vec<(EpochMs, FeatureIdx, Value)> = cells
            .into_iter()
            .enumerate()
            .filter_map(|(f, c)| match c {
                Cell::Absent => None,
                Cell::Null { ts_ms } => Some((ts_ms, f as FeatureIdx, Value::Null)),
                Cell::Value { ts_ms, value } => Some((ts_ms, f as FeatureIdx, value)),
            })
            .collect();
        by_time.sort_by_key(|(t, f, _)| (*t, *f));
        // One `apply` per distinct time, not per cell: `apply` rebuilds the row, so cell by cell
        // a row of F features written together cost F rebuilds of F cells (a 32-feature row:
        // 150k instructions, 93 % of a snapshot load).
        let mut late = 0;
        let mut group: Vec<(FeatureIdx, Value)> = Vec::with_capacity(by_time.len());
        let mut cells = by_time.into_iter().peekable();
        while let Some((t, f, v)) = cells.next() {
            group.clear();
            group.push((f, v));
            while let Some((_, f, v)) = cells.next_if(|(next, _, _)| *next == t) {
                group.push((f, v));
            }
            if let Some(next) = row.r().apply(layout, t, 0, &group, &mut late) {
                row = next;
            }
        }
        assert!(version <= VERSION_MASK);
        let r = row.r();
        r.atomics()[0].store((r.header() & !VERSION_MASK) | version, Ordering::Relaxed);
        row
    }

    /// This row, borrowed (every read and in-place write is on [`RowRef`]).
    pub fn r(&self) -> RowRef<'_> {
        match &self.0 {
            Body::Plain(words) => RowRef { words, extra: None },
            Body::Extra(both) => RowRef {
                words: &both.0,
                extra: Some(&both.1),
            },
        }
    }
}

impl<'a> RowRef<'a> {
    pub fn aggs(self) -> Option<&'a Arc<AggCell>> {
        self.extra().and_then(|e| e.aggs.as_ref())
    }

    /// A DENSE row's words where they stand outside any [`Row`] (a slot of the store's map).
    pub(crate) fn of_words(words: &'a [AtomicU64]) -> RowRef<'a> {
        RowRef { words, extra: None }
    }

    /// The row's words (see the layout above).
    fn atomics(self) -> &'a [AtomicU64] {
        self.words
    }

    fn extra(self) -> Option<&'a Extra> {
        self.extra
    }

    /// Whether this row can live in a map slot of `row_words` words: DENSE, and nothing
    /// outside its words (no strings, vectors or rings).
    pub(crate) fn fits_slot(self, row_words: usize) -> bool {
        self.extra.is_none() && self.w().is_dense() && self.words.len() == row_words
    }

    /// Where the words are (tests: an in-place write keeps it, a swap changes it).
    #[cfg(test)]
    pub(crate) fn address(self) -> usize {
        self.words.as_ptr() as usize
    }

    /// Whether this slot's row has moved to the side map (see [`MOVED`]). Acquire: a reader
    /// that meets the mark then finds the row the writer put in the side map before it.
    pub(crate) fn is_moved(self) -> bool {
        self.words[0].load(Ordering::Acquire) == MOVED
    }

    /// The version, unless this slot's row has moved (one load: what `is_moved` then
    /// `version` would race on).
    pub(crate) fn live_version(self) -> Option<u64> {
        let header = self.words[0].load(Ordering::Acquire);
        (header != MOVED).then_some(header & VERSION_MASK)
    }

    /// Copies `row` into words no reader can reach yet (a slot about to be published).
    pub(crate) fn fill(words: &[AtomicU64], row: RowRef<'_>) {
        assert_eq!(words.len(), row.words.len(), "a slot holds one row shape");
        for (to, from) in words.iter().zip(row.words) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Writes `next`, a row of this one's shape (see [`fits_slot`](Self::fits_slot)) at a
    /// newer version, over this one where it stands, under the seqlock that
    /// [`overwrite_in_place`](Self::overwrite_in_place) uses. `false`: not that case (nothing
    /// changed; the caller moves the row instead). Only the row's writer calls this.
    pub(crate) fn replace_in_place(self, next: RowRef<'_>) -> bool {
        let header = self.header();
        if !next.fits_slot(self.words.len()) || next.version() <= header & VERSION_MASK {
            return false;
        }
        debug_assert_eq!(header & WRITING_BIT, 0, "one writer");
        self.words[0].store(header | WRITING_BIT, Ordering::Relaxed);
        fence(Ordering::Release);
        for (to, from) in self.words[1..].iter().zip(&next.words[1..]) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.words[0].store(next.header(), Ordering::Release);
        true
    }

    /// Puts `next`, DENSE again, back in this slot its row had moved out of: the words first
    /// (no reader reads those of a moved slot), then the header, which makes it live; the
    /// caller then drops the side map's copy. A reader that read the words before the move
    /// fails its check: the header it saw is gone. Only the row's writer calls this.
    pub(crate) fn fill_moved(self, next: RowRef<'_>) {
        assert!(self.is_moved() && next.fits_slot(self.words.len()));
        for (to, from) in self.words[1..].iter().zip(&next.words[1..]) {
            to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        self.words[0].store(next.header(), Ordering::Release);
    }

    /// Marks this slot's row as moved to the side map, which already holds its successor.
    pub(crate) fn mark_moved(self) {
        debug_assert_eq!(self.header() & WRITING_BIT, 0, "one writer");
        self.words[0].store(MOVED, Ordering::Release);
    }

    /// An owned copy of this row (the words copied without the seqlock: see `words`).
    pub fn to_row(self) -> Row {
        let words = self
            .atomics()
            .iter()
            .map(|w| AtomicU64::new(w.load(Ordering::Relaxed)))
            .collect();
        Row::from_atomics(words, self.extra().cloned().map(Box::new))
    }

    /// The same row under a new version: an event changed only its aggregations.
    pub fn with_version(self, version: u64) -> Row {
        assert!(
            version <= VERSION_MASK && version > self.version(),
            "versions only grow"
        );
        let row = self.to_row();
        row.r().atomics()[0].store((self.header() & !VERSION_MASK) | version, Ordering::Relaxed);
        row
    }

    /// Sets the version of this row where it stands: an event changed only its aggregations.
    /// Only the row's writer (its partition's materializer) calls this.
    pub(crate) fn set_version(self, version: u64) {
        let header = self.header();
        assert!(
            version <= VERSION_MASK && version > header & VERSION_MASK,
            "versions only grow"
        );
        debug_assert_eq!(header & WRITING_BIT, 0, "one writer");
        // One store: a reader sees the old header or the new one, and retries on a change.
        self.atomics()[0].store((header & !VERSION_MASK) | version, Ordering::Release);
    }

    /// The words, for several reads in a row (one match on the handle, not one per read: a
    /// GET matched ~160 times, +1.5k instructions).
    fn w(self) -> Words<'a> {
        Words(self.atomics())
    }

    fn header(self) -> u64 {
        self.w().header()
    }

    pub fn version(self) -> u64 {
        self.header() & VERSION_MASK
    }

    /// Starts a consistent read: the header to hand to [`read_end`](Self::read_end), or `None`
    /// while an in-place write is under way (try again).
    pub(crate) fn read_begin(self) -> Option<u64> {
        let header = self.atomics()[0].load(Ordering::Acquire);
        (header & WRITING_BIT == 0).then_some(header)
    }

    /// Whether everything read since [`read_begin`](Self::read_begin) returned `seen` belongs
    /// to one version of the row. Every write in place makes the version grow (see
    /// [`overwrite_in_place`](Self::overwrite_in_place), [`set_version`](Self::set_version)),
    /// so an unchanged header means no write happened in between.
    pub(crate) fn read_end(self, seen: u64) -> bool {
        fence(Ordering::Acquire);
        self.atomics()[0].load(Ordering::Relaxed) == seen
    }

    fn stamp_count(self) -> usize {
        self.w().stamp_count()
    }

    #[cfg(test)]
    pub(crate) fn is_dense(self) -> bool {
        self.w().is_dense()
    }

    fn stamp(self, i: usize) -> u64 {
        self.w().stamp(i)
    }

    #[cfg(test)]
    pub(crate) fn stamps(self) -> Vec<u64> {
        (0..self.stamp_count()).map(|i| self.stamp(i)).collect()
    }

    fn num(self, layout: &Layout, n: usize) -> u64 {
        self.w().num(layout, n)
    }

    fn idx_byte(self, layout: &Layout, f: usize) -> u8 {
        self.w().idx_byte(layout, f)
    }

    pub fn get(self, layout: &Layout, f: FeatureIdx) -> Cell {
        let w = self.w();
        let fi = usize::from(f);
        let b = w.idx_byte(layout, fi);
        if b == ABSENT {
            return Cell::Absent;
        }
        let ts_ms = w.stamp(usize::from(b & !NULL_BIT)) as EpochMs;
        if b & NULL_BIT != 0 {
            return Cell::Null { ts_ms };
        }
        let value = match layout.slots[fi] {
            Slot::Num(n) => num_value(layout.types[fi], w.num(layout, usize::from(n))),
            Slot::Heap(h) => self
                .extra()
                .expect("views with heap features have a heap")
                .heap[usize::from(h)]
            .clone(),
        };
        Cell::Value { ts_ms, value }
    }

    /// Applies one event's values (sorted by feature, types already checked against the
    /// layout) with event time `ts_ms`, from the record at `offset`. Returns the new row, or
    /// `None` if every value was older than what the row holds (nothing changes, the version
    /// stays). `late` counts the values refused by the LWW rule.
    pub fn apply(
        &self,
        layout: &Layout,
        ts_ms: EpochMs,
        offset: u64,
        values: &[(FeatureIdx, Value)],
        late: &mut u64,
    ) -> Option<Row> {
        match self.overwrite_all(layout, ts_ms, offset, values) {
            Some(row) => Some(row),
            None => self.apply_general(layout, ts_ms, offset, values, late),
        }
    }

    /// [`apply`](Self::apply) for any event: every cell's time compared, the time table rebuilt.
    fn apply_general(
        &self,
        layout: &Layout,
        ts_ms: EpochMs,
        offset: u64,
        values: &[(FeatureIdx, Value)],
        late: &mut u64,
    ) -> Option<Row> {
        let f_count = layout.features();
        let mut idx: Vec<u8> = (0..f_count).map(|f| self.idx_byte(layout, f)).collect();
        let mut cell_ts: Vec<Option<EpochMs>> = idx
            .iter()
            .map(|&b| (b != ABSENT).then(|| self.stamp(usize::from(b & !NULL_BIT)) as EpochMs))
            .collect();
        let mut nums: Vec<u64> = (0..layout.nums).map(|n| self.num(layout, n)).collect();
        let mut extra = self.extra().cloned().map(Box::new);
        let mut changed = false;
        for (f, value) in values {
            let fi = usize::from(*f);
            debug_assert!(
                value.fits(layout.types[fi]),
                "apply gets type-checked values"
            );
            if cell_ts[fi].is_some_and(|old| ts_ms < old) {
                *late += 1;
                continue;
            }
            changed = true;
            cell_ts[fi] = Some(ts_ms);
            let null = matches!(value, Value::Null);
            idx[fi] = if null { NULL_BIT } else { 0 };
            if !null {
                match layout.slots[fi] {
                    Slot::Num(n) => nums[usize::from(n)] = slot_bits(value),
                    Slot::Heap(h) => {
                        extra.as_mut().expect("heap slot").heap[usize::from(h)] = value.clone()
                    }
                }
            }
        }
        if !changed {
            return None;
        }
        // Rebuild the stamp table from the times still referenced.
        let mut stamps: Vec<EpochMs> = Vec::with_capacity(f_count);
        stamps.extend(cell_ts.iter().flatten().copied());
        stamps.sort_unstable();
        stamps.dedup();
        if stamps.len() > STAMPS_MAX {
            // More distinct times than the index byte can name: collapse the oldest ones onto
            // the newest of them. Only reachable with > 127 features updated at distinct times.
            let cut = stamps.len() - STAMPS_MAX;
            let floor = stamps[cut];
            for t in cell_ts.iter_mut().flatten() {
                *t = (*t).max(floor);
            }
            stamps.drain(..cut);
        }
        for (fi, t) in cell_ts.iter().enumerate() {
            if let Some(t) = t {
                let s = stamps
                    .binary_search(t)
                    .expect("every referenced time is in the table") as u8;
                idx[fi] = (idx[fi] & NULL_BIT) | s;
            }
        }
        Some(Row::build(layout, offset + 1, &stamps, &idx, &nums, extra))
    }

    /// `apply`'s common case, built directly: the event sets every feature to a value at a
    /// time no older than any the row holds, so nothing of the old row survives but its heap
    /// slots' storage and the new row is DENSE at `ts_ms`. (Producers that own a view send
    /// all its features at once; the general path spends five allocations on index and time
    /// tables to find the same row.) `None`: not that case.
    fn overwrite_all(
        &self,
        layout: &Layout,
        ts_ms: EpochMs,
        offset: u64,
        values: &[(FeatureIdx, Value)],
    ) -> Option<Row> {
        let covers = sets_every_feature(layout, values);
        if !covers || (0..self.stamp_count()).any(|i| ts_ms < self.stamp(i) as EpochMs) {
            return None;
        }
        assert!(
            offset < VERSION_MASK,
            "row versions are log offsets, far below 2^55"
        );
        let mut words = Vec::with_capacity(2 + layout.nums);
        words.push((offset + 1) | (1 << STAMPS_SHIFT) | DENSE_BIT);
        words.push(ts_ms as u64);
        let mut extra = self.extra().cloned().map(Box::new);
        for (f, value) in values {
            debug_assert!(value.fits(layout.types[usize::from(*f)]));
            match layout.slots[usize::from(*f)] {
                // Numeric slots are numbered in feature order: pushed in order.
                Slot::Num(_) => words.push(slot_bits(value)),
                Slot::Heap(h) => {
                    extra.as_mut().expect("heap slot").heap[usize::from(h)] = value.clone()
                }
            }
        }
        debug_assert_eq!(words.len(), 2 + layout.nums);
        Some(Row::from_words(words, extra))
    }

    /// [`overwrite_all`](Self::overwrite_all) done to this row where it stands, when the new
    /// row would have this one's shape: this row is DENSE and the view keeps nothing outside
    /// the words (no strings or vectors). Saves the allocation of a new row, the map insert
    /// and the reclamation of the old row — the whole cost of an update but its reads. Returns
    /// whether it applied; `false` changes nothing. Only the row's writer (its partition's
    /// materializer) calls this: a seqlock orders one writer against readers, not writers.
    pub(crate) fn overwrite_in_place(
        &self,
        layout: &Layout,
        ts_ms: EpochMs,
        offset: u64,
        values: &[(FeatureIdx, Value)],
    ) -> bool {
        let covers = sets_every_feature(layout, values);
        let header = self.header();
        if layout.heaps > 0 || header & DENSE_BIT == 0 || !covers {
            return false;
        }
        // Only a growing version may be written in place: readers detect a write by the
        // header changing, which a version coming back to a value they saw would hide. (A
        // point-in-time replay applies records in event-time order, not offset order: it
        // copies.)
        if ts_ms < self.stamp(0) as EpochMs || offset < header & VERSION_MASK {
            return false;
        }
        assert!(
            offset < VERSION_MASK,
            "row versions are log offsets, far below 2^55"
        );
        let words = self.atomics();
        assert_eq!(words.len(), 2 + layout.nums, "a DENSE row's shape");
        debug_assert_eq!(header & WRITING_BIT, 0, "one writer");
        words[0].store(header | WRITING_BIT, Ordering::Relaxed);
        fence(Ordering::Release);
        words[1].store(ts_ms as u64, Ordering::Relaxed);
        // Every feature is numeric here, and numeric slots are numbered in feature order.
        for (slot, (_, value)) in words[2..].iter().zip(values) {
            slot.store(slot_bits(value), Ordering::Relaxed);
        }
        let next = (header & !VERSION_MASK) | (offset + 1);
        words[0].store(next, Ordering::Release);
        true
    }

    /// Bytes this row occupies on the heap (the words and heap slots, not the map entry).
    pub fn heap_bytes(self) -> usize {
        let side = std::mem::size_of::<(Box<[AtomicU64]>, Extra)>();
        self.atomics().len() * 8
            + self
                .extra()
                .map(|e| side + e.heap.len() * std::mem::size_of::<Value>())
                .unwrap_or(0)
    }

    /// The row's words as laid out above: what a snapshot stores. (Read without the seqlock:
    /// only the row's writer, which takes the snapshots, may call this on a live row.)
    pub fn words(self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.atomics().iter().map(|w| w.load(Ordering::Relaxed))
    }

    /// The string and vector slots, in feature order (`Null` where never set).
    pub fn heap_values(self) -> &'a [Value] {
        self.extra().map_or(&[], |e| &e.heap)
    }
}

/// The value a numeric slot of type `ty` holds as `bits`.
fn num_value(ty: FeatureType, bits: u64) -> Value {
    match ty {
        FeatureType::F64 => Value::F64(f64::from_bits(bits)),
        FeatureType::I64 => Value::I64(bits as i64),
        FeatureType::Bool => Value::Bool(bits != 0),
        other => unreachable!("{other} is not a numeric slot"),
    }
}

/// Whether an event's values (sorted by feature) set every feature of `layout` to a value.
fn sets_every_feature(layout: &Layout, values: &[(FeatureIdx, Value)]) -> bool {
    values.len() == layout.features()
        && values
            .iter()
            .enumerate()
            .all(|(i, (f, v))| usize::from(*f) == i && !matches!(v, Value::Null))
}

/// Whether `bits` are a value of numeric type `ty` ([`Value::fits`] of
/// [`num_value`], without building the value).
fn num_fits(ty: FeatureType, bits: u64) -> bool {
    match ty {
        FeatureType::F64 => f64::from_bits(bits).is_finite(),
        FeatureType::I64 | FeatureType::Bool => true,
        other => unreachable!("{other} is not a numeric slot"),
    }
}

/// A numeric value as its slot holds it (types were checked against the layout).
fn slot_bits(value: &Value) -> u64 {
    match value {
        Value::F64(v) => v.to_bits(),
        Value::I64(v) => *v as u64,
        Value::Bool(v) => u64::from(*v),
        other => unreachable!("{other:?} in a numeric slot"),
    }
}

fn empty_extra(layout: &Layout) -> Option<Box<Extra>> {
    (layout.heaps > 0).then(|| {
        Box::new(Extra {
            heap: vec![Value::Null; layout.heaps].into_boxed_slice(),
            aggs: None,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_core::{Config, Schema};

    fn layout() -> Layout {
        let text = r#"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "v"
entity = "user"
features = [
  { name = "a", type = "f64" }, { name = "b", type = "i64" }, { name = "c", type = "bool" },
  { name = "s", type = "string" }, { name = "e", type = "f32[2]" },
  { name = "f5", type = "f64" }, { name = "f6", type = "f64" }, { name = "f7", type = "f64" }, { name = "f8", type = "f64" },
]
"#;
        let schema =
            Schema::compile(&Config::from_toml_with_env(text, Vec::new()).unwrap()).unwrap();
        Layout::of(&schema.views[0])
    }

    fn value_for(f: u16, seed: i64) -> Value {
        match f {
            1 => Value::I64(seed),
            2 => Value::Bool(seed % 2 == 0),
            3 => Value::Str(format!("s{seed}").into()),
            4 => Value::F32s(vec![seed as f32, 1.0].into()),
            _ => Value::F64(seed as f64 * 0.5),
        }
    }

    proptest! {
        /// The row agrees with a brute-force model of the LWW rule over any event order.
        #[test]
        fn lww_matches_a_model(events in prop::collection::vec((0i64..20, prop::collection::btree_set(0u16..9, 1..4), any::<bool>()), 1..40)) {
            let layout = layout();
            let mut row = Row::empty(&layout);
            let mut model: Vec<Cell> = vec![Cell::Absent; 9];
            let mut version = 0;
            for (offset, (ts, features, null)) in events.iter().enumerate() {
                let values: Vec<(u16, Value)> = features.iter().map(|&f| (f, if *null { Value::Null } else { value_for(f, offset as i64) })).collect();
                let mut late = 0;
                let mut changed = false;
                let mut expected_late = 0;
                for (f, v) in &values {
                    let m = &mut model[usize::from(*f)];
                    if m.ts_ms().is_some_and(|old| *ts < old) {
                        expected_late += 1;
                    } else {
                        *m = if matches!(v, Value::Null) { Cell::Null { ts_ms: *ts } } else { Cell::Value { ts_ms: *ts, value: v.clone() } };
                        changed = true;
                    }
                }
                if let Some(next) = row.r().apply(&layout, *ts, offset as u64, &values, &mut late) {
                    row = next;
                    version = offset as u64 + 1;
                }
                prop_assert_eq!(changed, row.r().version() == offset as u64 + 1);
                prop_assert_eq!(late, expected_late);
            }
            prop_assert_eq!(row.r().version(), version);
            for f in 0..9u16 {
                prop_assert_eq!(row.r().get(&layout, f), model[usize::from(f)].clone(), "feature {}", f);
            }
            let cells: Vec<Cell> = (0..9u16).map(|f| row.r().get(&layout, f)).collect();
            let rebuilt = Row::from_cells(&layout, row.r().version(), cells);
            for f in 0..9u16 {
                prop_assert_eq!(rebuilt.r().get(&layout, f), row.r().get(&layout, f));
            }
        }
    }

    proptest! {
        /// The fast path of an event that sets every feature builds the row the general path
        /// builds, whatever the row held before (times older, equal or newer, nulls, heap).
        #[test]
        fn overwriting_every_feature_takes_the_fast_path_to_the_same_row(
            history in prop::collection::vec((0i64..20, prop::collection::btree_set(0u16..9, 1..9), any::<bool>()), 0..6),
            ts in 0i64..20,
        ) {
            let layout = layout();
            let mut row = Row::empty(&layout);
            let mut late = 0;
            for (offset, (t, features, null)) in history.iter().enumerate() {
                let values: Vec<(u16, Value)> = features.iter().map(|&f| (f, if *null { Value::Null } else { value_for(f, offset as i64) })).collect();
                if let Some(next) = row.r().apply(&layout, *t, offset as u64, &values, &mut late) {
                    row = next;
                }
            }
            let all: Vec<(u16, Value)> = (0..9).map(|f| (f, value_for(f, 99))).collect();
            let fast = row.r().overwrite_all(&layout, ts, 100, &all);
            let newest = row.r().stamps().iter().map(|&t| t as i64).max();
            prop_assert_eq!(fast.is_some(), newest.is_none_or(|t| ts >= t));
            let (mut late_general, mut late_apply) = (0, 0);
            let general = row.r().apply_general(&layout, ts, 100, &all, &mut late_general);
            let applied = row.r().apply(&layout, ts, 100, &all, &mut late_apply);
            prop_assert_eq!(late_apply, late_general);
            match (applied, general) {
                (Some(a), Some(g)) => {
                    prop_assert_eq!(a.r().words().collect::<Vec<_>>(), g.r().words().collect::<Vec<_>>());
                    prop_assert_eq!(a.r().heap_values(), g.r().heap_values());
                }
                (a, g) => prop_assert!(a.is_none() && g.is_none()),
            }
        }
    }

    #[test]
    fn a_late_event_never_overwrites() {
        let layout = layout();
        let mut late = 0;
        let r1 = Row::empty(&layout)
            .r()
            .apply(&layout, 100, 0, &[(0, Value::F64(1.0))], &mut late)
            .unwrap();
        assert!(r1
            .r()
            .apply(&layout, 99, 1, &[(0, Value::F64(2.0))], &mut late)
            .is_none());
        assert_eq!(late, 1);
        let r2 = r1
            .r()
            .apply(&layout, 100, 2, &[(0, Value::F64(3.0))], &mut late)
            .unwrap();
        assert_eq!(
            r2.r().get(&layout, 0),
            Cell::Value {
                ts_ms: 100,
                value: Value::F64(3.0)
            },
            "tie: the later offset wins"
        );
        assert_eq!(r2.r().version(), 3);
    }

    #[test]
    fn shared_times_are_stored_once() {
        let layout = layout();
        let values: Vec<(u16, Value)> = (0..9).map(|f| (f, value_for(f, 1))).collect();
        let mut late = 0;
        let r = Row::empty(&layout)
            .r()
            .apply(&layout, 5, 0, &values, &mut late)
            .unwrap();
        assert_eq!(r.r().stamps().len(), 1);
        let r = r.r().apply(&layout, 6, 1, &values[..1], &mut late).unwrap();
        assert_eq!(r.r().stamps().len(), 2);
        let r = r.r().apply(&layout, 6, 2, &values, &mut late).unwrap();
        assert_eq!(r.r().stamps().len(), 1, "unreferenced times are dropped");
        assert!(
            r.r().is_dense(),
            "every feature at one time: no index bytes"
        );
        assert_eq!(
            r.r().atomics().len(),
            1 + 1 + 7,
            "header, one time, seven numeric slots"
        );
        let r = r
            .r()
            .apply(&layout, 7, 3, &[(0, Value::Null)], &mut late)
            .unwrap();
        assert!(!r.r().is_dense());
        assert_eq!(r.r().get(&layout, 0), Cell::Null { ts_ms: 7 });
        assert_eq!(r.r().version(), 4);
        assert_eq!(std::mem::size_of::<Row>(), 16);
    }
}
