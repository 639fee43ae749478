//! The prediction cache (DESIGN.md §2). An entry is keyed on (model, version, the row
//! version of every entity read, the request-time values): a feature update bumps a row
//! version, so entries computed from the old row become unreachable and are never served.
//! Two things change an answer without a row version moving, and each entry carries the
//! instant it stops being valid: a feature passing its view's TTL, and a window aggregate
//! moving to its next tile. Bounded per model in entries (`quick_cache`, S3-FIFO eviction)
//! and in age (`cache.ttl`).

use std::sync::Arc;

use quiver_core::time::EpochMs;

pub struct Entry {
    /// The model's full output row.
    pub outputs: Arc<[f64]>,
    pub missing: Arc<[crate::predict::Missing]>,
    /// First instant at which the entry no longer answers (TTL, tile edge or cache age).
    pub valid_until_ms: EpochMs,
}

pub struct ModelCache {
    map: quick_cache::sync::Cache<u128, Arc<Entry>>,
    pub entries_max: usize,
    pub ttl_ms: u64,
}

impl ModelCache {
    pub fn new(entries_max: usize, ttl_ms: u64) -> ModelCache {
        ModelCache {
            map: quick_cache::sync::Cache::new(entries_max),
            entries_max,
            ttl_ms,
        }
    }

    pub fn get(&self, key: u128, now: EpochMs) -> Option<Arc<Entry>> {
        let e = self.map.get(&key)?;
        if now < e.valid_until_ms {
            Some(e)
        } else {
            self.map.remove(&key);
            None
        }
    }

    pub fn insert(&self, key: u128, entry: Entry) {
        self.map.insert(key, Arc::new(entry));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Builds a cache key: feed every part in a fixed order, then `finish`.
pub struct KeyBuilder(xxhash_rust::xxh3::Xxh3);

impl KeyBuilder {
    pub fn new(model: &str, version: u64) -> KeyBuilder {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&(model.len() as u64).to_le_bytes());
        h.update(model.as_bytes());
        h.update(&version.to_le_bytes());
        KeyBuilder(h)
    }

    /// One entity read: the view, its key and the row version (`None`: no row).
    pub fn row(&mut self, view: u16, key: &str, row_version: Option<u64>) {
        self.0.update(&view.to_le_bytes());
        self.0.update(&(key.len() as u64).to_le_bytes());
        self.0.update(key.as_bytes());
        self.0
            .update(&row_version.map_or(u64::MAX, |v| v).to_le_bytes());
    }

    /// One request-time input (NaN if absent, so absent and present never collide).
    pub fn value(&mut self, x: f64) {
        self.0.update(&x.to_bits().to_le_bytes());
    }

    pub fn finish(self) -> u128 {
        self.0.digest128()
    }
}

/// The first instant after `now` at which a windowed aggregate read at `now` may change:
/// the window's ends cross a tile edge.
pub fn aggregate_valid_until(now: EpochMs, window_ms: EpochMs, tile_ms: EpochMs) -> EpochMs {
    debug_assert!(tile_ms > 0);
    let next_edge = |t: EpochMs| (t.div_euclid(tile_ms) + 1) * tile_ms;
    next_edge(now).min(next_edge(now - window_ms) + window_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_what_they_must() {
        let key = |model: &str, v: u64, rows: &[(u16, &str, Option<u64>)], vals: &[f64]| {
            let mut k = KeyBuilder::new(model, v);
            for r in rows {
                k.row(r.0, r.1, r.2);
            }
            for x in vals {
                k.value(*x);
            }
            k.finish()
        };
        let base = key("m", 1, &[(0, "u1", Some(5))], &[1.0]);
        assert_eq!(base, key("m", 1, &[(0, "u1", Some(5))], &[1.0]));
        assert_ne!(base, key("m", 2, &[(0, "u1", Some(5))], &[1.0]), "version");
        assert_ne!(
            base,
            key("m", 1, &[(0, "u1", Some(6))], &[1.0]),
            "row version"
        );
        assert_ne!(base, key("m", 1, &[(0, "u1", None)], &[1.0]), "absent row");
        assert_ne!(base, key("m", 1, &[(0, "u2", Some(5))], &[1.0]), "entity");
        assert_ne!(base, key("m", 1, &[(1, "u1", Some(5))], &[1.0]), "view");
        assert_ne!(
            base,
            key("m", 1, &[(0, "u1", Some(5))], &[2.0]),
            "request value"
        );
        assert_ne!(base, key("n", 1, &[(0, "u1", Some(5))], &[1.0]), "model");
    }

    #[test]
    fn aggregates_expire_at_tile_edges() {
        // 5-minute window in 1-minute tiles: valid until the next minute.
        assert_eq!(aggregate_valid_until(90_000, 300_000, 60_000), 120_000);
        // A window that is not a whole number of tiles moves at its start's edges too.
        assert_eq!(aggregate_valid_until(100_000, 90_000, 60_000), 120_000);
        assert_eq!(aggregate_valid_until(61_000, 90_000, 60_000), 90_000);
    }

    #[test]
    fn stale_entries_are_not_served() {
        let c = ModelCache::new(10, 1000);
        c.insert(
            1,
            Entry {
                outputs: Arc::from(vec![0.5]),
                missing: Arc::from([]),
                valid_until_ms: 100,
            },
        );
        assert!(c.get(1, 99).is_some());
        assert!(c.get(1, 100).is_none());
        assert!(c.get(1, 99).is_none(), "removed once expired");
    }
}
