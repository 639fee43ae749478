//! Placement of Kafka partitions on nodes: a consistent-hash ring with virtual nodes.
//!
//! # Design constraints
//! - A pure function of the membership (node ids), `vnodes` and `replication`: every node
//!   computes the same placement from the same config, with no coordination.
//! - Hash: XXH3-64 (`xxhash-rust`), seed 0. Node `n` has `vnodes` points at
//!   `xxh3("{n}#{i}")`, i in 0..vnodes; partition `p` sits at `xxh3("partition-{p}")`. Points
//!   are ordered by (hash, node id), so a collision still orders the same everywhere.
//! - Owners of a partition: walk clockwise from its position, taking each node the first time
//!   it is met, until `replication` nodes (fewer if the cluster is smaller). The first is the
//!   primary (it runs the partition's history sink), the rest are warm replicas.
//! - Minimal movement: a node joining takes a partition only from the owners that would come
//!   after it in the walk; a node leaving hands only its own partitions on. No partition ever
//!   moves between two nodes that stayed (property-tested below).

use xxhash_rust::xxh3::xxh3_64;

/// Largest cluster the ring places on (bounds the points: nodes × vnodes).
pub const NODES_MAX: usize = 1024;
/// Largest `vnodes` per node.
pub const VNODES_MAX: u32 = 4096;

#[derive(Debug, Clone)]
pub struct Ring {
    /// Node ids, sorted and distinct.
    nodes: Vec<String>,
    /// (position, index into `nodes`), ascending.
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// The ring of `nodes` (duplicates ignored) with `vnodes` points each.
    pub fn new(nodes: &[String], vnodes: u32) -> Ring {
        assert!(
            (1..=VNODES_MAX).contains(&vnodes),
            "vnodes in 1..={VNODES_MAX}"
        );
        let mut ids: Vec<String> = nodes.to_vec();
        ids.sort();
        ids.dedup();
        assert!(ids.len() <= NODES_MAX, "at most {NODES_MAX} nodes");
        let mut points = Vec::with_capacity(ids.len() * vnodes as usize);
        for (i, id) in ids.iter().enumerate() {
            for v in 0..vnodes {
                points.push((xxh3_64(format!("{id}#{v}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { nodes: ids, points }
    }

    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// The owners of `partition`, primary first: `replication` distinct nodes (all of them if
    /// the cluster is smaller; none if it is empty).
    pub fn owners(&self, partition: u32, replication: usize) -> Vec<&str> {
        let want = replication.min(self.nodes.len());
        let mut out: Vec<&str> = Vec::with_capacity(want);
        if want == 0 {
            return out;
        }
        let at = xxh3_64(format!("partition-{partition}").as_bytes());
        let start = self.points.partition_point(|&(h, _)| h < at);
        for k in 0..self.points.len() {
            let (_, node) = self.points[(start + k) % self.points.len()];
            let id = self.nodes[node as usize].as_str();
            if !out.contains(&id) {
                out.push(id);
                if out.len() == want {
                    break;
                }
            }
        }
        debug_assert_eq!(out.len(), want, "a full walk meets every node");
        out
    }

    /// Owners of every partition `0..partitions`.
    pub fn placement(&self, partitions: u32, replication: usize) -> Vec<Vec<String>> {
        (0..partitions)
            .map(|p| {
                self.owners(p, replication)
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    }
}

/// (max, mean) partitions per node of a placement, counting every owner (primary or replica).
pub fn balance(placement: &[Vec<String>], nodes: &[String]) -> (usize, f64) {
    if nodes.is_empty() {
        return (0, 0.0);
    }
    let count = |n: &String| placement.iter().filter(|o| o.contains(n)).count();
    let max = nodes.iter().map(count).max().unwrap_or(0);
    let total: usize = placement.iter().map(Vec::len).sum();
    (max, total as f64 / nodes.len() as f64)
}

/// Partitions whose owner set differs between two placements of the same partitions.
pub fn moved(before: &[Vec<String>], after: &[Vec<String>]) -> usize {
    assert_eq!(
        before.len(),
        after.len(),
        "placements of the same partitions"
    );
    before
        .iter()
        .zip(after)
        .filter(|(a, b)| {
            let mut a = (*a).clone();
            let mut b = (*b).clone();
            a.sort();
            b.sort();
            a != b
        })
        .count()
}

/// Owner slots (a partition's place on a node) that `after` gives to a node `before` did
/// not: what a membership change makes nodes bootstrap.
pub fn slots_moved(before: &[Vec<String>], after: &[Vec<String>]) -> usize {
    assert_eq!(
        before.len(),
        after.len(),
        "placements of the same partitions"
    );
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.iter().filter(|o| !b.contains(o)).count())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("n{i}")).collect()
    }

    #[test]
    fn owners_are_distinct_primary_first_and_stable() {
        let ring = Ring::new(&ids(3), 256);
        for p in 0..64 {
            let o = ring.owners(p, 2);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
            assert_eq!(o, Ring::new(&ids(3), 256).owners(p, 2), "a pure function");
        }
        assert_eq!(
            ring.owners(0, 5).len(),
            3,
            "replication capped at the cluster"
        );
        assert!(Ring::new(&[], 8).owners(0, 2).is_empty());
        let order = Ring::new(&["n2".into(), "n0".into(), "n1".into(), "n0".into()], 256);
        assert_eq!(
            order.placement(16, 2),
            ring.placement(16, 2),
            "order and duplicates ignored"
        );
    }

    /// Balance is a distribution, not a bound: with 256 points a node, one set of names in a
    /// few hundred puts half again the mean on some node (`wibjcx-0` … `wibjcx-12`: 123
    /// partition copies against a mean of 78.8 — a property test with random names found it,
    /// and so failed now and then). Checked instead over 300 fixed sets of names (2 to 15
    /// nodes, 512 partitions, replication 2): the typical set, the 99th percentile, and the
    /// worst of them, each with a margin over what this ring gives them (median 1.10×, 99th
    /// percentile 1.31×, worst 1.33×).
    #[test]
    fn with_256_vnodes_the_busiest_node_carries_little_more_than_the_mean() {
        let letter = |h: u64, i: u32| char::from(b'a' + ((h >> (5 * i)) % 26) as u8);
        let mut ratios: Vec<f64> = (0..300u64)
            .map(|k| {
                let h = xxh3_64(format!("names-{k}").as_bytes());
                let prefix: String = (0..1 + (h % 8) as u32).map(|i| letter(h, i + 1)).collect();
                let n = 2 + (h >> 60) as usize % 14;
                let nodes: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
                let (max, mean) = balance(&Ring::new(&nodes, 256).placement(512, 2), &nodes);
                max as f64 / mean
            })
            .collect();
        ratios.sort_by(f64::total_cmp);
        let (median, p99, worst) = (ratios[150], ratios[296], ratios[299]);
        assert!(median <= 1.2, "median {median}");
        assert!(p99 <= 1.45, "99th percentile {p99}");
        assert!(worst <= 1.6, "worst {worst}");
        let outlier: Vec<String> = (0..13).map(|i| format!("wibjcx-{i}")).collect();
        let (max, mean) = balance(&Ring::new(&outlier, 256).placement(512, 2), &outlier);
        assert_eq!(
            (max, (mean * 13.0).round()),
            (123, 1024.0),
            "the outlier found"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A join moves only partitions the new node takes: no partition changes hands
        /// between two nodes that stayed; a leave moves only the leaver's partitions.
        #[test]
        fn membership_changes_move_the_least(n in 1usize..12, vnodes in 1u32..300, r in 1usize..4, partitions in 1u32..200) {
            let before = Ring::new(&ids(n), vnodes);
            let mut grown = ids(n);
            grown.push("joiner".into());
            let after = Ring::new(&grown, vnodes);
            for p in 0..partitions {
                let old = before.owners(p, r);
                let new = after.owners(p, r);
                for o in &new {
                    prop_assert!(*o == "joiner" || old.contains(o), "p{p}: {old:?} -> {new:?}");
                }
                // Seen from the joiner leaving: only its partitions move, to nodes that
                // already were in line for them.
                for o in &old {
                    prop_assert!(new.contains(o) || new.contains(&"joiner"), "p{p}: {old:?} -> {new:?}");
                }
            }
        }

        #[test]
        fn every_partition_gets_min_of_replication_and_nodes_owners(n in 0usize..20, r in 1usize..5, p in any::<u32>()) {
            let ring = Ring::new(&ids(n), 16);
            let o = ring.owners(p, r);
            prop_assert_eq!(o.len(), r.min(n));
            let mut d = o.clone();
            d.sort();
            d.dedup();
            prop_assert_eq!(d.len(), o.len());
        }
    }

    #[test]
    fn a_join_moves_about_one_nth_of_the_partitions() {
        // 3 → 4 nodes, 256 partitions, replication 1: expect ≈ 1/4 to move.
        let before = Ring::new(&ids(3), 256).placement(256, 1);
        let after = Ring::new(&ids(4), 256).placement(256, 1);
        let moved = moved(&before, &after);
        assert!((32..=96).contains(&moved), "{moved} of 256 moved");
        let (max, mean) = balance(&after, &ids(4));
        assert!(max as f64 <= 1.5 * mean, "balance {max} vs mean {mean}");
    }
}
