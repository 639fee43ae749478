//! A Quiver cluster over one Kafka log (DESIGN.md §6): who owns which partitions
//! ([`ring`], [`membership`]), which peers are alive and what they serve ([`health`]), and
//! where a request for a partition goes ([`Cluster::route`]). Plain types only: the surface
//! crate sends the probes and forwards the requests (it is the one that knows HTTP).

pub mod health;
pub mod membership;
pub mod ring;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use quiver_core::config::{ClusterConfig, ClusterNode};

pub use health::{Health, PeerView};
pub use membership::Membership;

/// The header a forwarded request carries (its value: hops so far). A request that arrives
/// with it is answered here or refused, never forwarded again: one hop, no loops.
pub const HOP_HEADER: &str = "quiver-hop";
/// A caller's bound on a replica's staleness, in records behind the log's end.
pub const MAX_LAG_HEADER: &str = "quiver-max-lag";
/// Which node answered (set on every answer of a clustered node).
pub const SERVED_BY_HEADER: &str = "quiver-served-by";

/// Where a request for one partition goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// This node serves the partition.
    Local,
    /// Peers to try, in order: owners that serve it (primary first), other nodes still
    /// serving it during a handover, then owners that are up but not known to serve it yet.
    Forward(Vec<ClusterNode>),
    /// No node is known to be able to answer.
    Unavailable,
}

pub struct Cluster {
    membership: RwLock<Arc<Membership>>,
    pub health: Health,
    pub probe_interval: Duration,
    pub forward_timeout: Duration,
    /// Partitions this node lost in a membership change but still serves until every new
    /// owner serves them (make-before-break).
    draining: Mutex<BTreeSet<u32>>,
}

/// What a membership change means for this node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Partitions to start materializing (served once caught up).
    pub gained: Vec<u32>,
    /// Partitions to stop serving once their new owners serve them.
    pub lost: Vec<u32>,
    /// How many partitions changed owners anywhere in the cluster.
    pub moved: usize,
}

impl Cluster {
    pub fn new(config: &ClusterConfig, partitions: u32) -> Cluster {
        Cluster {
            membership: RwLock::new(Arc::new(Membership::new(config, partitions))),
            health: Health::new(config.down_after.0),
            probe_interval: config.probe_interval.0,
            forward_timeout: config.forward_timeout.0,
            draining: Mutex::new(BTreeSet::new()),
        }
    }

    /// How long after start the failure detector has heard from every live peer.
    pub fn health_settle(&self) -> Duration {
        self.health.down_after() + self.probe_interval
    }

    pub fn membership(&self) -> Arc<Membership> {
        self.membership.read().clone()
    }

    pub fn self_id(&self) -> String {
        self.membership.read().self_id.clone()
    }

    /// Where a request for `partition` goes; `local_ready` says whether this node serves it
    /// now (materialized, caught up, and within the caller's lag bound).
    pub fn route(&self, partition: u32, local_ready: bool, now: Instant) -> Route {
        if local_ready {
            return Route::Local;
        }
        let m = self.membership();
        let mut out: Vec<ClusterNode> = Vec::new();
        let push = |id: &str, out: &mut Vec<ClusterNode>| {
            if id != m.self_id && !out.iter().any(|n| n.id == id) {
                if let Some(n) = m.member(id) {
                    out.push(n.clone());
                }
            }
        };
        for id in m.owners(partition) {
            if self.health.serves(id, partition, now) {
                push(id, &mut out);
            }
        }
        for n in &m.members {
            if self.health.serves(&n.id, partition, now) {
                push(&n.id, &mut out);
            }
        }
        for id in m.owners(partition) {
            if self.health.is_up(id, now) {
                push(id, &mut out);
            }
        }
        if out.is_empty() {
            Route::Unavailable
        } else {
            Route::Forward(out)
        }
    }

    /// Applies a new membership (a config reload): what this node must start and stop.
    /// Partitions it lost stay served here until [`Cluster::handed_over`] says otherwise.
    pub fn reload(&self, config: &ClusterConfig) -> Change {
        let old = self.membership();
        let new = Arc::new(Membership::new(config, old.partitions()));
        let before: BTreeSet<u32> = old.owned().into_iter().collect();
        let after: BTreeSet<u32> = new.owned().into_iter().collect();
        let change = Change {
            gained: after.difference(&before).copied().collect(),
            lost: before.difference(&after).copied().collect(),
            moved: ring::moved(old.placement(), new.placement()),
        };
        let ids: Vec<String> = new.members.iter().map(|n| n.id.clone()).collect();
        self.health.retain(&ids);
        {
            let mut draining = self.draining.lock();
            draining.extend(change.lost.iter().copied());
            // A partition regained before its handover finished is simply kept.
            draining.retain(|p| !after.contains(p));
        }
        *self.membership.write() = new;
        change
    }

    /// Lost partitions whose every new owner now serves them: this node may drop them.
    pub fn handed_over(&self, now: Instant) -> Vec<u32> {
        let m = self.membership();
        let mut draining = self.draining.lock();
        let done: Vec<u32> = draining
            .iter()
            .copied()
            .filter(|&p| m.owners(p).iter().all(|id| self.health.serves(id, p, now)))
            .collect();
        for p in &done {
            draining.remove(p);
        }
        done
    }

    /// Partitions lost in a membership change and not yet handed over.
    pub fn draining(&self) -> Vec<u32> {
        self.draining.lock().iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(self_id: &str, ids: &[&str]) -> ClusterConfig {
        membership::test_config(self_id, ids, 2)
    }

    #[test]
    fn routes_go_to_serving_owners_primary_first_then_to_up_owners() {
        let c = Cluster::new(&config("n1", &["n1", "n2", "n3"]), 32);
        let m = c.membership();
        let p = (0..32)
            .find(|&p| !m.owns(p))
            .expect("n1 does not own everything");
        let owners = m.owners(p).to_vec();
        let now = Instant::now();
        assert_eq!(
            c.route(p, false, now),
            Route::Unavailable,
            "nobody heard from yet"
        );
        c.health.ok(&owners[1], vec![], now);
        let ids = |r: Route| match r {
            Route::Forward(v) => v.into_iter().map(|n| n.id).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ids(c.route(p, false, now)), vec![owners[1].clone()]);
        c.health.ok(&owners[0], vec![p], now);
        c.health.ok(&owners[1], vec![p], now);
        assert_eq!(ids(c.route(p, false, now)), owners, "primary first");
        assert_eq!(c.route(p, true, now), Route::Local);
        c.health.suspect(&owners[0], "refused".into());
        assert_eq!(ids(c.route(p, false, now)), vec![owners[1].clone()]);
    }

    #[test]
    fn a_lost_partition_is_kept_until_its_new_owners_serve_it() {
        let c = Cluster::new(&config("n1", &["n1", "n2"]), 16);
        assert_eq!(
            c.membership().owned().len(),
            16,
            "two nodes, two replicas: all"
        );
        let change = c.reload(&config("n1", &["n1", "n2", "n3", "n4"]));
        assert!(change.gained.is_empty());
        assert!(!change.lost.is_empty() && change.moved > 0);
        let now = Instant::now();
        assert!(c.handed_over(now).is_empty(), "no new owner serves yet");
        let m = c.membership();
        for n in ["n2", "n3", "n4"] {
            let serving: Vec<u32> = (0..16)
                .filter(|&p| m.owners(p).iter().any(|o| o == n))
                .collect();
            c.health.ok(n, serving, now);
        }
        let mut done = c.handed_over(now);
        done.sort_unstable();
        assert_eq!(done, change.lost);
        assert!(c.draining().is_empty());
    }
}
