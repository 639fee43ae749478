//! One entity's window aggregations for one view: every ring (see `quiver_core::window`) in a
//! single allocation of atomics, updated in place by the partition's materializer.
//!
//! Why in place rather than copied on write (as a [`crate::Row`] is when its shape changes):
//! a 24 h window of 5-minute tiles is 289 tiles; copying every ring of an entity on every
//! event would cost kilobytes of copying per event. Instead the single writer updates the numbers under a *seqlock*: it makes the
//! sequence odd, writes, makes it even again; a reader copies what it needs and retries if the
//! sequence moved. Readers never block and never wait for a lock; the writer never waits at all.
//! All slots are `AtomicU64`s (f64 bits), so no `unsafe` is needed for the racy copy.
//!
//! Layout: `[seq, version, ring 0 …, ring 1 …]`; `version` is offset + 1 of the last record
//! that changed any ring, so a reader can tell whether the row it read is as new as the rings.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use quiver_core::schema::{FeatureIdx, View};
use quiver_core::time::EpochMs;
use quiver_core::value::Value;
use quiver_core::window::{ring_fold, ring_init, ring_newest, ring_read, AggFn, Slots};

use crate::seqlock;

/// Where each aggregation's ring starts in an [`AggCell`].
#[derive(Debug, Clone)]
pub struct AggLayout {
    pub(crate) offsets: Vec<usize>,
    len: usize,
}

impl AggLayout {
    pub fn of(view: &View) -> Option<AggLayout> {
        if view.aggregations.is_empty() {
            return None;
        }
        let mut offsets = Vec::with_capacity(view.aggregations.len());
        let mut at = 2;
        for a in &view.aggregations {
            offsets.push(at);
            at += a.window.ring_len();
        }
        Some(AggLayout { offsets, len: at })
    }
}

/// A window of `words` seen as f64 slots.
struct Atomics<'a>(&'a [AtomicU64]);

impl Slots for Atomics<'_> {
    fn get(&self, i: usize) -> f64 {
        f64::from_bits(self.0[i].load(Ordering::Relaxed))
    }
    fn set(&mut self, i: usize, v: f64) {
        self.0[i].store(v.to_bits(), Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct AggCell {
    words: Box<[AtomicU64]>,
}

impl AggCell {
    pub fn new(view: &View, layout: &AggLayout) -> AggCell {
        let cell = AggCell {
            words: (0..layout.len).map(|_| AtomicU64::new(0)).collect(),
        };
        for (a, &off) in view.aggregations.iter().zip(&layout.offsets) {
            ring_init(&mut Atomics(&cell.words[off..off + a.window.ring_len()]));
        }
        cell
    }

    pub fn version(&self) -> u64 {
        self.words[1].load(Ordering::Acquire)
    }

    /// Folds one event (values sorted by feature) into every aggregation over a feature it
    /// carries. Only the partition's materializer calls this. Returns whether anything
    /// changed; `late` counts observations dropped by the lateness rule.
    pub fn apply(
        &self,
        view: &View,
        layout: &AggLayout,
        ts: EpochMs,
        offset: u64,
        values: &[(FeatureIdx, Value)],
        late: &mut u64,
    ) -> bool {
        let seq = self.words[0].load(Ordering::Relaxed);
        debug_assert!(
            seq.is_multiple_of(2),
            "one writer: never entered while writing"
        );
        self.words[0].store(seq + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let mut changed = false;
        for (a, &off) in view.aggregations.iter().zip(&layout.offsets) {
            let Ok(i) = values.binary_search_by_key(&a.of, |(f, _)| *f) else {
                continue;
            };
            let x = match &values[i].1 {
                Value::Null => continue,
                Value::F64(v) => *v,
                Value::I64(v) => *v as f64,
                // Only `count` may aggregate a non-numeric feature (checked at config load).
                _ => {
                    debug_assert_eq!(a.window.func, AggFn::Count);
                    1.0
                }
            };
            let mut ring = Atomics(&self.words[off..off + a.window.ring_len()]);
            if ring_fold(&a.window, view.allowed_lateness_ms, &mut ring, ts, x) {
                changed = true;
            } else {
                *late += 1;
            }
        }
        if changed {
            self.words[1].store(offset + 1, Ordering::Relaxed);
        }
        self.words[0].store(seq + 2, Ordering::Release);
        changed
    }

    /// Reads aggregation `agg` of `view` at `now`, consistently: returns the value, the newest
    /// event time folded, and the cell's version at the time of the read.
    pub fn read(
        &self,
        view: &View,
        layout: &AggLayout,
        agg: usize,
        now: EpochMs,
    ) -> (Value, Option<EpochMs>, u64) {
        let a = &view.aggregations[agg];
        let off = layout.offsets[agg];
        let mut attempt = 0;
        loop {
            let s1 = self.words[0].load(Ordering::Acquire);
            if s1.is_multiple_of(2) {
                let ring = Atomics(&self.words[off..off + a.window.ring_len()]);
                let value = ring_read(&a.window, &ring, now);
                let newest = ring_newest(&ring);
                let version = self.words[1].load(Ordering::Relaxed);
                fence(Ordering::Acquire);
                if self.words[0].load(Ordering::Relaxed) == s1 {
                    return (value, newest, version);
                }
            }
            attempt += 1;
            if attempt == seqlock::ATTEMPTS_MAX {
                tracing::error!("aggregation state stuck mid-write (did its materializer die?); reporting no value");
                return (Value::Null, None, 0);
            }
            seqlock::pause(attempt);
        }
    }

    /// Copies every word of the cell into `out` (rings at the layout's offsets), at one
    /// version: the version, or `None` if a write overlapped the copy (try again). A snapshot
    /// copies rings so while the materializer goes on applying.
    pub(crate) fn copy_words(&self, out: &mut Vec<u64>) -> Option<u64> {
        let s1 = self.words[0].load(Ordering::Acquire);
        if !s1.is_multiple_of(2) {
            return None;
        }
        out.clear();
        out.extend(self.words.iter().map(|w| w.load(Ordering::Relaxed)));
        fence(Ordering::Acquire);
        (self.words[0].load(Ordering::Relaxed) == s1).then_some(out[1])
    }

    /// Every slot of one ring (tests; only the writer may call it on a live cell).
    pub fn ring_values(&self, view: &View, layout: &AggLayout, agg: usize) -> Vec<f64> {
        let off = layout.offsets[agg];
        let len = view.aggregations[agg].window.ring_len();
        let ring = Atomics(&self.words[off..off + len]);
        (0..len).map(|i| ring.get(i)).collect()
    }

    /// Restores a ring from a snapshot (before any reader can see the cell).
    pub fn restore(
        &self,
        view: &View,
        layout: &AggLayout,
        agg: usize,
        values: &[f64],
        version: u64,
    ) {
        let off = layout.offsets[agg];
        let len = view.aggregations[agg].window.ring_len();
        assert_eq!(values.len(), len, "restored rings have the layout's length");
        let mut ring = Atomics(&self.words[off..off + len]);
        for (i, v) in values.iter().enumerate() {
            ring.set(i, *v);
        }
        self.words[1].store(version, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::{Config, Schema};
    use std::sync::Arc;

    fn view() -> View {
        let text = r#"
[[entity]]
name = "u"
key = "id"
[[view]]
name = "v"
entity = "u"
allowed_lateness = "1m"
features = [{ name = "x", type = "f64" }, { name = "s", type = "string" }]
aggregations = [
  { name = "x_sum", of = "x", fn = "sum", window = "10m" },
  { name = "x_count", of = "x", fn = "count", window = "1h" },
  { name = "s_count", of = "s", fn = "count", window = "1h" },
]
"#;
        Schema::compile(&Config::from_toml_with_env(text, Vec::new()).unwrap())
            .unwrap()
            .views
            .remove(0)
    }

    #[test]
    fn folds_the_features_each_aggregation_reads() {
        let v = view();
        let layout = AggLayout::of(&v).unwrap();
        let cell = AggCell::new(&v, &layout);
        let mut late = 0;
        assert!(cell.apply(
            &v,
            &layout,
            1_000_000,
            0,
            &[(0, Value::F64(2.0))],
            &mut late
        ));
        assert!(cell.apply(
            &v,
            &layout,
            1_000_001,
            1,
            &[(0, Value::F64(3.0)), (1, Value::Str("a".into()))],
            &mut late
        ));
        assert!(
            !cell.apply(&v, &layout, 1_000_002, 2, &[(0, Value::Null)], &mut late),
            "null is not an observation"
        );
        assert!(
            !cell.apply(&v, &layout, 900_000, 3, &[(0, Value::F64(9.0))], &mut late),
            "100 s late, 60 s allowed"
        );
        assert_eq!(late, 2, "one per aggregation over x");
        assert_eq!(cell.version(), 2);
        let now = 1_000_500;
        assert_eq!(cell.read(&v, &layout, 0, now).0, Value::F64(5.0));
        assert_eq!(cell.read(&v, &layout, 1, now).0, Value::I64(2));
        assert_eq!(
            cell.read(&v, &layout, 2, now),
            (Value::I64(1), Some(1_000_001), 2)
        );
    }

    /// Readers racing the writer always see a state some prefix of the writes produced:
    /// sum = count × 1.0 in every read, never a torn mixture.
    #[test]
    fn readers_never_see_a_torn_update() {
        let text = r#"
[[entity]]
name = "u"
key = "id"
[[view]]
name = "v"
entity = "u"
features = [{ name = "x", type = "f64" }]
aggregations = [{ name = "n", of = "x", fn = "count", window = "1h" }, { name = "s", of = "x", fn = "sum", window = "1h" }]
"#;
        let v = Arc::new(
            Schema::compile(&Config::from_toml_with_env(text, Vec::new()).unwrap())
                .unwrap()
                .views
                .remove(0),
        );
        let layout = Arc::new(AggLayout::of(&v).unwrap());
        let cell = Arc::new(AggCell::new(&v, &layout));
        let writer = {
            let (v, layout, cell) = (v.clone(), layout.clone(), cell.clone());
            std::thread::spawn(move || {
                let mut late = 0;
                for i in 0..20_000u64 {
                    cell.apply(
                        &v,
                        &layout,
                        1_000_000,
                        i,
                        &[(0, Value::F64(1.0))],
                        &mut late,
                    );
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() || reads == 0 {
            // Both rings are read under one cell version: they must agree.
            let (n, _, v1) = cell.read(&v, &layout, 0, 1_000_000);
            let (s, _, v2) = cell.read(&v, &layout, 1, 1_000_000);
            if v1 == v2 {
                let Value::I64(n) = n else { panic!() };
                assert_eq!(
                    s,
                    Value::F64(n as f64),
                    "sum and count of one version agree"
                );
            }
            reads += 1;
        }
        writer.join().unwrap();
        assert_eq!(cell.read(&v, &layout, 0, 1_000_000).0, Value::I64(20_000));
    }
}
