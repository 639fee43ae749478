//! Window aggregations over event time, kept as fixed tiles (DESIGN.md §2).
//!
//! # Semantics
//! An aggregation `fn(of) over W` with tile size `T` puts an event with event time `ts` into
//! tile `k = floor(ts / T)`. A read at `now` combines the tiles `k` with
//! `floor((now - W) / T) <= k <= floor(now / T)`:
//! - every event with `now - W <= ts <= now` is included (the window is never short);
//! - events up to one tile older than `now - W` may be included too: the window's old edge is
//!   rounded down to a tile boundary, so its span is between `W` and `W + T`;
//! - a future-dated event in `now`'s tile is included (`ts` up to the end of that tile).
//!
//! Each entity keeps a ring of `ceil(W / T) + 1` tiles ending at the newest tile seen, so its
//! memory is fixed: `(2 + tiles × width) × 8` bytes per aggregation. An event is dropped (and
//! counted as late) if its time is more than `allowed_lateness` behind the newest event time
//! the ring has seen, or if its tile has already left the ring.
//!
//! `stddev` is the population standard deviation, from count, sum and sum of squares.
//! `count` is an `i64`; every other function yields an `f64`. Over an empty window `count` is 0,
//! `sum` is 0.0, and the others have no value (null).

use crate::time::EpochMs;
use crate::value::{FeatureType, Value};

/// Most tiles one aggregation may keep per entity (e.g. 30 days of 5-minute tiles is 8641).
pub const WINDOW_TILES_MAX: usize = 10_000;
/// Longest window accepted.
pub const WINDOW_MS_MAX: EpochMs = 30 * 24 * 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFn {
    Count,
    Sum,
    Mean,
    Min,
    Max,
    Last,
    Stddev,
}

impl AggFn {
    pub const NAMES: &'static [&'static str] =
        &["count", "sum", "mean", "min", "max", "last", "stddev"];

    pub fn parse(name: &str) -> Option<AggFn> {
        Some(match name {
            "count" => AggFn::Count,
            "sum" => AggFn::Sum,
            "mean" => AggFn::Mean,
            "min" => AggFn::Min,
            "max" => AggFn::Max,
            "last" => AggFn::Last,
            "stddev" => AggFn::Stddev,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            AggFn::Count => "count",
            AggFn::Sum => "sum",
            AggFn::Mean => "mean",
            AggFn::Min => "min",
            AggFn::Max => "max",
            AggFn::Last => "last",
            AggFn::Stddev => "stddev",
        }
    }

    /// f64 slots per tile.
    pub fn width(self) -> usize {
        match self {
            AggFn::Count | AggFn::Sum | AggFn::Min | AggFn::Max => 1,
            AggFn::Mean | AggFn::Last => 2,
            AggFn::Stddev => 3,
        }
    }

    pub fn output_type(self) -> FeatureType {
        match self {
            AggFn::Count => FeatureType::I64,
            _ => FeatureType::F64,
        }
    }

    fn empty(self, slot: &mut [f64]) {
        match self {
            AggFn::Min => slot[0] = f64::INFINITY,
            AggFn::Max => slot[0] = f64::NEG_INFINITY,
            // Last: (time, value); no time yet.
            AggFn::Last => {
                slot[0] = f64::NEG_INFINITY;
                slot[1] = 0.0;
            }
            _ => slot.iter_mut().for_each(|s| *s = 0.0),
        }
    }

    /// Adds one observation `x` at time `ts` to a tile (or an accumulator).
    fn fold(self, slot: &mut [f64], x: f64, ts: EpochMs) {
        match self {
            AggFn::Count => slot[0] += 1.0,
            AggFn::Sum => slot[0] += x,
            AggFn::Mean => {
                slot[0] += x;
                slot[1] += 1.0;
            }
            AggFn::Min => slot[0] = slot[0].min(x),
            AggFn::Max => slot[0] = slot[0].max(x),
            // Ties on time: the later fold wins, as latest values do (log order).
            AggFn::Last => {
                if ts as f64 >= slot[0] {
                    slot[0] = ts as f64;
                    slot[1] = x;
                }
            }
            AggFn::Stddev => {
                slot[0] += 1.0;
                slot[1] += x;
                slot[2] += x * x;
            }
        }
    }

    /// Combines a tile into an accumulator.
    fn merge(self, acc: &mut [f64], tile: &[f64]) {
        match self {
            AggFn::Min => acc[0] = acc[0].min(tile[0]),
            AggFn::Max => acc[0] = acc[0].max(tile[0]),
            AggFn::Last => {
                if tile[0] >= acc[0] && tile[0] > f64::NEG_INFINITY {
                    acc[0] = tile[0];
                    acc[1] = tile[1];
                }
            }
            _ => acc.iter_mut().zip(tile).for_each(|(a, t)| *a += t),
        }
    }

    fn finish(self, acc: &[f64]) -> Value {
        let f = |x: f64| {
            if x.is_finite() {
                Value::F64(x)
            } else {
                Value::Null
            }
        };
        match self {
            AggFn::Count => Value::I64(acc[0] as i64),
            AggFn::Sum => Value::F64(acc[0]),
            AggFn::Mean if acc[1] > 0.0 => Value::F64(acc[0] / acc[1]),
            AggFn::Min | AggFn::Max => f(acc[0]),
            AggFn::Last if acc[0] > f64::NEG_INFINITY => Value::F64(acc[1]),
            AggFn::Stddev if acc[0] > 0.0 => {
                let mean = acc[1] / acc[0];
                Value::F64((acc[2] / acc[0] - mean * mean).max(0.0).sqrt())
            }
            _ => Value::Null,
        }
    }
}

/// One aggregation's tiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub func: AggFn,
    pub window_ms: EpochMs,
    pub tile_ms: EpochMs,
    /// Tiles kept per entity: `ceil(window / tile) + 1`.
    pub tiles: usize,
}

/// `ceil(a / b)` for positive `a`, `b` (`i64::div_ceil` is not stable).
fn ceil_div(a: i64, b: i64) -> i64 {
    debug_assert!(a > 0 && b > 0);
    (a + b - 1) / b
}

/// Tile sizes chosen by default, smallest first.
const TILE_LADDER_MS: &[EpochMs] = &[
    1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 600_000, 900_000, 1_800_000, 3_600_000,
    10_800_000, 21_600_000, 43_200_000, 86_400_000,
];

impl Window {
    /// `tile_ms: None` picks the smallest ladder size giving at most 60 tiles per window
    /// (so a read merges at most ~61 tiles), but never a tile longer than the window.
    pub fn new(
        func: AggFn,
        window_ms: EpochMs,
        tile_ms: Option<EpochMs>,
    ) -> Result<Window, String> {
        if window_ms <= 0 || window_ms > WINDOW_MS_MAX {
            return Err(format!(
                "window must be > 0 and at most 30 days, got {window_ms} ms"
            ));
        }
        let tile_ms = match tile_ms {
            Some(t) if t <= 0 || t > window_ms => {
                return Err(format!(
                    "tile must be > 0 and at most the window, got {t} ms"
                ))
            }
            Some(t) => t,
            None => TILE_LADDER_MS
                .iter()
                .copied()
                .find(|&t| ceil_div(window_ms, t) <= 60)
                .unwrap_or(86_400_000)
                .min(window_ms),
        };
        let tiles = usize::try_from(ceil_div(window_ms, tile_ms))
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        if tiles > WINDOW_TILES_MAX {
            return Err(format!("{tiles} tiles per entity is over WINDOW_TILES_MAX ({WINDOW_TILES_MAX}): use a larger tile"));
        }
        Ok(Window {
            func,
            window_ms,
            tile_ms,
            tiles,
        })
    }

    pub fn tile_of(&self, ts: EpochMs) -> i64 {
        ts.div_euclid(self.tile_ms)
    }

    /// f64 slots one entity's ring takes: `[newest tile, newest time seen, tiles × width]`.
    pub fn ring_len(&self) -> usize {
        2 + self.tiles * self.func.width()
    }
}

/// Where a ring's numbers live: a plain slice in tests and offline tools, atomics in the store.
pub trait Slots {
    fn get(&self, i: usize) -> f64;
    fn set(&mut self, i: usize, v: f64);
}

impl Slots for [f64] {
    fn get(&self, i: usize) -> f64 {
        self[i]
    }
    fn set(&mut self, i: usize, v: f64) {
        self[i] = v;
    }
}

/// The newest tile index in a ring that has never seen an event.
const NO_TILE: f64 = f64::NEG_INFINITY;

/// Initializes an empty ring.
pub fn ring_init<S: Slots + ?Sized>(s: &mut S) {
    s.set(0, NO_TILE);
    s.set(1, NO_TILE);
}

fn slot_base(w: &Window, k: i64) -> usize {
    2 + (k.rem_euclid(w.tiles as i64) as usize) * w.func.width()
}

fn load<S: Slots + ?Sized>(s: &S, base: usize, out: &mut [f64]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = s.get(base + i);
    }
}

fn store<S: Slots + ?Sized>(s: &mut S, base: usize, from: &[f64]) {
    for (i, v) in from.iter().enumerate() {
        s.set(base + i, *v);
    }
}

/// Adds observation `x` at time `ts`. Returns false if the event is too late (more than
/// `allowed_lateness_ms` behind the newest time seen, or its tile has left the ring).
pub fn ring_fold<S: Slots + ?Sized>(
    w: &Window,
    allowed_lateness_ms: EpochMs,
    s: &mut S,
    ts: EpochMs,
    x: f64,
) -> bool {
    let width = w.func.width();
    let mut tile = [0.0f64; 3];
    let tile = &mut tile[..width];
    let newest_seen = s.get(1);
    if newest_seen > NO_TILE && (ts as f64) < newest_seen - allowed_lateness_ms as f64 {
        return false;
    }
    let k = w.tile_of(ts);
    let k_max = s.get(0);
    if k_max == NO_TILE || k as f64 > k_max {
        // Advance: clear the tiles the ring moves over (all of them after a long gap).
        let from = if k_max == NO_TILE {
            k - w.tiles as i64 + 1
        } else {
            (k_max as i64 + 1).max(k - w.tiles as i64 + 1)
        };
        w.func.empty(tile);
        for j in from..=k {
            store(s, slot_base(w, j), tile);
        }
        s.set(0, k as f64);
    } else if (k as f64) <= k_max - w.tiles as f64 {
        return false;
    }
    let base = slot_base(w, k);
    load(s, base, tile);
    w.func.fold(tile, x, ts);
    store(s, base, tile);
    if ts as f64 > newest_seen {
        s.set(1, ts as f64);
    }
    true
}

/// The aggregate at `now`.
pub fn ring_read<S: Slots + ?Sized>(w: &Window, s: &S, now: EpochMs) -> Value {
    let width = w.func.width();
    let mut acc = [0.0f64; 3];
    let acc = &mut acc[..width];
    let mut tile = [0.0f64; 3];
    let tile = &mut tile[..width];
    w.func.empty(acc);
    let k_max = s.get(0);
    if k_max > NO_TILE {
        let k_max = k_max as i64;
        let lo = w
            .tile_of(now.saturating_sub(w.window_ms))
            .max(k_max - w.tiles as i64 + 1);
        let hi = w.tile_of(now).min(k_max);
        for k in lo..=hi {
            load(s, slot_base(w, k), tile);
            w.func.merge(acc, tile);
        }
    }
    w.func.finish(acc)
}

/// The newest event time a ring has folded, if any.
pub fn ring_newest<S: Slots + ?Sized>(s: &S) -> Option<EpochMs> {
    let t = s.get(1);
    (t > NO_TILE).then_some(t as EpochMs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: decide lateness in arrival order exactly as the ring must, then
    /// recompute the aggregate from the raw events the read's tile range covers.
    fn brute(w: &Window, lateness: i64, events: &[(i64, f64)], now: i64) -> Value {
        let mut kept: Vec<(i64, f64)> = Vec::new();
        let (mut newest, mut k_max): (Option<i64>, Option<i64>) = (None, None);
        for &(ts, x) in events {
            if newest.is_some_and(|n| ts < n - lateness) {
                continue;
            }
            let k = w.tile_of(ts);
            if k_max.is_some_and(|m| k <= m - w.tiles as i64) {
                continue;
            }
            k_max = Some(k_max.map_or(k, |m| m.max(k)));
            newest = Some(newest.map_or(ts, |n| n.max(ts)));
            kept.push((ts, x));
        }
        let Some(k_max) = k_max else {
            return match w.func {
                AggFn::Count => Value::I64(0),
                AggFn::Sum => Value::F64(0.0),
                _ => Value::Null,
            };
        };
        let lo = w.tile_of(now - w.window_ms).max(k_max - w.tiles as i64 + 1);
        let hi = w.tile_of(now).min(k_max);
        let xs: Vec<(i64, f64)> = kept
            .into_iter()
            .filter(|(ts, _)| (lo..=hi).contains(&w.tile_of(*ts)))
            .collect();
        let n = xs.len() as f64;
        let sum: f64 = xs.iter().map(|x| x.1).sum();
        match w.func {
            AggFn::Count => Value::I64(xs.len() as i64),
            AggFn::Sum => Value::F64(sum),
            _ if xs.is_empty() => Value::Null,
            AggFn::Mean => Value::F64(sum / n),
            AggFn::Min => Value::F64(xs.iter().map(|x| x.1).fold(f64::INFINITY, f64::min)),
            AggFn::Max => Value::F64(xs.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max)),
            // Greatest time; among equal times, the one folded last.
            AggFn::Last => Value::F64(
                xs.iter()
                    .fold(
                        (i64::MIN, 0.0),
                        |acc, x| if x.0 >= acc.0 { *x } else { acc },
                    )
                    .1,
            ),
            AggFn::Stddev => {
                let mean = sum / n;
                Value::F64(
                    (xs.iter().map(|x| x.1 * x.1).sum::<f64>() / n - mean * mean)
                        .max(0.0)
                        .sqrt(),
                )
            }
        }
    }

    fn close(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::F64(x), Value::F64(y)) => (x - y).abs() <= 1e-6 * (1.0 + x.abs().max(y.abs())),
            _ => a == b,
        }
    }

    fn arb_fn() -> impl Strategy<Value = AggFn> {
        proptest::sample::select(vec![
            AggFn::Count,
            AggFn::Sum,
            AggFn::Mean,
            AggFn::Min,
            AggFn::Max,
            AggFn::Last,
            AggFn::Stddev,
        ])
    }

    proptest! {
        /// Every function against brute force, under random arrival order (times shuffled
        /// around a moving clock), duplicates, and lateness both inside and beyond the bound.
        #[test]
        fn matches_brute_force(
            func in arb_fn(),
            window_s in 1i64..600,
            tile_s in proptest::option::of(1i64..120),
            lateness_s in 0i64..300,
            events in proptest::collection::vec((0i64..2_000_000, -1000.0f64..1000.0, any::<bool>()), 0..80),
            reads in proptest::collection::vec(0i64..2_400_000, 1..8),
        ) {
            let tile_ms = tile_s.map(|t| (t * 1000).min(window_s * 1000));
            let w = Window::new(func, window_s * 1000, tile_ms).unwrap();
            let lateness = lateness_s * 1000;
            // Duplicates: some events arrive twice (at-least-once delivery without event ids).
            let mut stream: Vec<(i64, f64)> = Vec::new();
            for (ts, x, dup) in &events {
                stream.push((*ts, (x * 100.0).round() / 100.0));
                if *dup {
                    stream.push((*ts, (x * 100.0).round() / 100.0));
                }
            }
            let mut ring = vec![0.0; w.ring_len()];
            ring_init(ring.as_mut_slice());
            for &(ts, x) in &stream {
                ring_fold(&w, lateness, ring.as_mut_slice(), ts, x);
            }
            for now in reads {
                let got = ring_read(&w, ring.as_slice(), now);
                let want = brute(&w, lateness, &stream, now);
                prop_assert!(close(&got, &want), "{:?} at {}: ring {:?} vs brute {:?}", w, now, got, want);
            }
        }

        /// The window covers [now - W, now] whole: an event in it is always counted when no
        /// lateness rule intervenes (single event).
        #[test]
        fn window_bounds(window_s in 1i64..3600, tile_s in proptest::option::of(1i64..600), ts in 0i64..10_000_000, delta in 0i64..7_200_000) {
            let w = Window::new(AggFn::Count, window_s * 1000, tile_s.map(|t| (t * 1000).min(window_s * 1000))).unwrap();
            let mut ring = vec![0.0; w.ring_len()];
            ring_init(ring.as_mut_slice());
            prop_assert!(ring_fold(&w, 0, ring.as_mut_slice(), ts, 1.0));
            let now = ts + delta;
            let counted = ring_read(&w, ring.as_slice(), now) == Value::I64(1);
            if delta <= w.window_ms {
                prop_assert!(counted, "inside [now-W, now]");
            }
            if delta > w.window_ms + w.tile_ms {
                prop_assert!(!counted, "more than one tile past the window");
            }
        }
    }

    #[test]
    fn default_tiles() {
        let w = Window::new(AggFn::Sum, 300_000, None).unwrap();
        assert_eq!((w.tile_ms, w.tiles), (5_000, 61));
        let w = Window::new(AggFn::Sum, 86_400_000, None).unwrap();
        assert_eq!((w.tile_ms, w.tiles), (1_800_000, 49));
        let w = Window::new(AggFn::Sum, 86_400_000, Some(300_000)).unwrap();
        assert_eq!(w.tiles, 289);
        assert!(Window::new(AggFn::Sum, 31 * 86_400_000, None).is_err());
        assert!(
            Window::new(AggFn::Sum, 30 * 86_400_000, Some(60_000)).is_err(),
            "43201 tiles is over the bound"
        );
        let w = Window::new(AggFn::Sum, 2_000, None).unwrap();
        assert_eq!((w.tile_ms, w.tiles), (1_000, 3));
    }

    #[test]
    fn empty_windows() {
        let w = Window::new(AggFn::Mean, 10_000, None).unwrap();
        let mut ring = vec![0.0; w.ring_len()];
        ring_init(ring.as_mut_slice());
        assert_eq!(ring_read(&w, ring.as_slice(), 5), Value::Null);
        let c = Window::new(AggFn::Count, 10_000, None).unwrap();
        let mut ring = vec![0.0; c.ring_len()];
        ring_init(ring.as_mut_slice());
        assert_eq!(ring_read(&c, ring.as_slice(), 5), Value::I64(0));
        assert!(ring_fold(&c, 0, ring.as_mut_slice(), 100_000, 1.0));
        assert!(
            !ring_fold(&c, 1_000, ring.as_mut_slice(), 98_000, 1.0),
            "2 s behind with 1 s lateness"
        );
        assert_eq!(ring_read(&c, ring.as_slice(), 100_000), Value::I64(1));
        assert_eq!(
            ring_read(&c, ring.as_slice(), 500_000),
            Value::I64(0),
            "the window slid past it"
        );
    }
}
