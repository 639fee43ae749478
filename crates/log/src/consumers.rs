//! The log's consumers, as retention sees them.
//!
//! Every reader whose progress matters (the materializer's snapshots, the history sink, later
//! ones) registers here under its name and publishes, per partition, the offset below which it
//! no longer needs the log (`commit`). Retention deletes a sealed segment only if every
//! *lossless* consumer has committed past it ([`Consumers::floor`]); a *lossy* consumer is
//! declared so explicitly and is not waited for — it must then count and report every range
//! retention took from under it (the history sink does: metric, error log, gaps table).
//!
//! The registry lives as long as the `Log` (one process): a consumer not configured in this
//! run protects nothing, so turning the history sink off does not pin the log forever. Offsets
//! are persisted by each consumer (`OffsetStore`), not here; at registration the consumer hands
//! in the offsets it recovered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

/// Whether retention waits for a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Retention keeps everything at or past this consumer's committed offsets.
    Protect,
    /// Retention ignores this consumer; whatever it loses, it must report.
    Lossy,
}

/// One registered consumer: its name, its retention class and its committed offsets.
#[derive(Debug)]
pub struct Consumer {
    name: String,
    retention: Retention,
    committed: Vec<AtomicU64>,
}

impl Consumer {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// The consumer no longer needs records of `partition` below `offset`. Offsets only move
    /// forward: a smaller one (a replay after a restart) keeps the larger.
    pub fn commit(&self, partition: u32, offset: u64) {
        self.committed[partition as usize].fetch_max(offset, Ordering::AcqRel);
    }

    pub fn committed(&self, partition: u32) -> u64 {
        self.committed[partition as usize].load(Ordering::Acquire)
    }
}

#[derive(Debug, Default)]
pub struct Consumers {
    all: RwLock<Vec<Arc<Consumer>>>,
}

impl Consumers {
    /// Registers `name` with its recovered offsets (`initial(partition)`), or returns the
    /// consumer already registered under that name (a sink restarted in the same process),
    /// its offsets moved to at least `initial`.
    pub fn register(
        &self,
        name: &str,
        retention: Retention,
        partitions: u32,
        initial: impl Fn(u32) -> u64,
    ) -> Arc<Consumer> {
        let mut all = self.all.write();
        if let Some(c) = all.iter().find(|c| c.name == name) {
            assert_eq!(
                c.retention, retention,
                "a consumer keeps its retention class for the life of the log"
            );
            for p in 0..partitions {
                c.commit(p, initial(p));
            }
            return c.clone();
        }
        let c = Arc::new(Consumer {
            name: name.to_string(),
            retention,
            committed: (0..partitions)
                .map(|p| AtomicU64::new(initial(p)))
                .collect(),
        });
        all.push(c.clone());
        c
    }

    /// The lowest offset of `partition` some lossless consumer still needs (`u64::MAX` if no
    /// consumer protects anything).
    pub fn floor(&self, partition: u32) -> u64 {
        self.all
            .read()
            .iter()
            .filter(|c| c.retention == Retention::Protect)
            .map(|c| c.committed(partition))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The lossless consumer furthest behind `ends` (records not yet committed, summed over
    /// partitions) — the one holding retention back when the disk bound is hit.
    pub fn laggard(&self, ends: &[u64]) -> Option<(String, u64)> {
        self.all
            .read()
            .iter()
            .filter(|c| c.retention == Retention::Protect)
            .map(|c| {
                let behind = ends
                    .iter()
                    .enumerate()
                    .map(|(p, &end)| end.saturating_sub(c.committed(p as u32)))
                    .sum::<u64>();
                (c.name.clone(), behind)
            })
            .max_by_key(|(_, behind)| *behind)
    }

    pub fn list(&self) -> Vec<Arc<Consumer>> {
        self.all.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_slowest_lossless_consumer() {
        let cs = Consumers::default();
        assert_eq!(cs.floor(0), u64::MAX, "no consumer protects nothing");
        let a = cs.register("a", Retention::Protect, 2, |_| 10);
        let b = cs.register("b", Retention::Protect, 2, |p| 5 + p as u64);
        let lossy = cs.register("c", Retention::Lossy, 2, |_| 0);
        assert_eq!((cs.floor(0), cs.floor(1)), (5, 6));
        b.commit(0, 20);
        assert_eq!(cs.floor(0), 10, "a is now the slowest");
        lossy.commit(0, 1);
        assert_eq!(cs.floor(0), 10, "a lossy consumer never holds retention");
        a.commit(0, 3);
        assert_eq!(a.committed(0), 10, "offsets never move back");
        assert_eq!(
            cs.laggard(&[30, 30]),
            Some(("a".into(), 20 + 20)),
            "b is 10 + 24 behind"
        );
    }

    #[test]
    fn registering_again_returns_the_same_consumer() {
        let cs = Consumers::default();
        let a = cs.register("a", Retention::Protect, 1, |_| 4);
        let again = cs.register("a", Retention::Protect, 1, |_| 7);
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(a.committed(0), 7);
        assert_eq!(cs.list().len(), 1);
    }
}
