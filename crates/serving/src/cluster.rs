//! The node's side of a cluster (DESIGN.md §6), on plain types: which partitions it serves,
//! where a request for a partition goes, make-before-break handovers after a membership
//! change, and which partitions' history sinks run here. The surface crate probes peers and
//! forwards requests; it calls [`Node::cluster_tick`] after every probe round.

use std::time::Instant;

use quiver_cluster::{Change, Route};
use quiver_core::config::ClusterConfig;
use quiver_core::token::Token;

use crate::error::{Code, Result, ServingError};
use crate::Node;

/// Whether a partition that is `ready` and `lag` records behind satisfies `max_lag`.
fn within(ready: bool, lag: u64, max_lag: Option<u64>) -> bool {
    ready && max_lag.is_none_or(|n| lag <= n)
}

/// The routing decision for one partition, given this node's state (`ready`, `lag`), the
/// caller's placement headers, and the cluster's choice of peers (`peers(local)`).
fn decide(
    partition: u32,
    ready: bool,
    lag: u64,
    at: Placement,
    peers: impl FnOnce(bool) -> Route,
) -> Result<Route> {
    let local = within(ready, lag, at.max_lag);
    if at.hops > 0 {
        return if local {
            Ok(Route::Local)
        } else {
            Err(ServingError::new(
                Code::ForwardLoop,
                format!(
                    "forwarded here for partition {partition}, which this node does not serve \
                     (within the lag bound); a request is forwarded at most once"
                ),
            )
            .detail("partition", u64::from(partition)))
        };
    }
    match peers(local) {
        Route::Unavailable if ready => Err(ServingError::new(
            Code::ReplicaLagging,
            format!(
                "partition {partition} is {lag} records behind here, more than Quiver-Max-Lag, \
                 and no other owner serves it"
            ),
        )
        .detail("partition", u64::from(partition))),
        Route::Unavailable => Err(ServingError::new(
            Code::PartitionUnavailable,
            format!("no node serving partition {partition} is reachable"),
        )
        .detail("partition", u64::from(partition))),
        r => Ok(r),
    }
}

/// A caller's staleness bound (`Quiver-Max-Lag`) and hops so far (`Quiver-Hop`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    pub max_lag: Option<u64>,
    pub hops: u32,
}

impl Node {
    /// Whether this node answers for `partition` now: materialized, caught up and, when
    /// the caller bounds it, at most `max_lag` records behind.
    pub fn serves(&self, partition: u32, max_lag: Option<u64>) -> bool {
        within(
            self.store.partition_ready(partition),
            self.store.partition_lag(partition),
            max_lag,
        )
    }

    /// Where a request for `partition` goes. A forwarded request (hops > 0) is answered here
    /// or refused: one hop, never a loop.
    pub fn route(&self, partition: u32, at: Placement) -> Result<Route> {
        let Some(cluster) = &self.cluster else {
            return Ok(Route::Local);
        };
        let ready = self.store.partition_ready(partition);
        let lag = self.store.partition_lag(partition);
        decide(partition, ready, lag, at, |local| {
            cluster.route(partition, local, Instant::now())
        })
    }

    /// `token` restricted to the partitions this node serves: in a cluster a node answers
    /// only for those (reads of other partitions are forwarded with the token).
    pub fn local_token(&self, token: &Token) -> Token {
        if self.cluster.is_none() {
            return token.clone();
        }
        let partitions = self.log.partitions();
        let mut out = Token::new();
        for &(stream, offset) in token.positions() {
            if self.store.partition_ready(stream % partitions) {
                out.advance(stream, offset);
            }
        }
        out
    }

    /// Partitions served here, ascending (what probes report).
    pub fn served_partitions(&self) -> Vec<u32> {
        (0..self.log.partitions())
            .filter(|&p| self.store.partition_ready(p))
            .collect()
    }

    /// After a probe round: drops partitions whose new owners serve them, and moves history
    /// sinks so each partition's runs on its first owner that is up.
    pub fn cluster_tick(&self) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        let now = Instant::now();
        for p in cluster.handed_over(now) {
            tracing::info!(partition = p, "handed over; no longer served here");
            self.materializers.remove(p);
        }
        let Some(sink) = &self.history else {
            return;
        };
        // Until the peers have had time to answer, every peer looks down: wait, or every
        // node would start every sink at once.
        if self.started.elapsed() < cluster.health_settle() {
            return;
        }
        let m = cluster.membership();
        let me = m.self_id.as_str();
        for p in 0..m.partitions() {
            let acting = m
                .owners(p)
                .iter()
                .find(|id| *id == me || cluster.health.is_up(id, now));
            if acting.is_some_and(|id| id == me) {
                if let Err(e) = sink.add(p) {
                    tracing::error!(partition = p, error = %e, "history sink did not start");
                }
            } else {
                sink.remove(p);
            }
        }
    }

    /// Applies a new `[cluster]` (config reload): starts the partitions gained (served once
    /// caught up); the ones lost are served until their new owners serve them.
    pub fn reload_cluster(&self, config: &ClusterConfig) -> Result<Change> {
        let Some(cluster) = &self.cluster else {
            return Err(ServingError::bad_request(
                "this node was not started with [cluster]",
            ));
        };
        if config.self_id != cluster.self_id() {
            return Err(ServingError::bad_request(
                "cluster.self cannot change without a restart",
            ));
        }
        let change = cluster.reload(config);
        for &p in &change.gained {
            self.materializers
                .add(p)
                .map_err(|e| ServingError::new(Code::Internal, e.to_string()))?;
        }
        tracing::info!(
            gained = ?change.gained,
            lost = ?change.lost,
            moved = change.moved,
            "cluster membership changed"
        );
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::config::ClusterNode;

    fn peer() -> Route {
        Route::Forward(vec![ClusterNode {
            id: "n2".into(),
            http: "127.0.0.1:1".into(),
            grpc: None,
        }])
    }

    fn code(r: Result<Route>) -> Code {
        r.expect_err("refused").code
    }

    #[test]
    fn a_replica_beyond_the_callers_lag_bound_passes_the_request_on_or_says_it_lags() {
        let bound = |n| Placement {
            max_lag: Some(n),
            hops: 0,
        };
        // Caught up enough: answered here (the peers are not even asked).
        let r = decide(3, true, 5, bound(5), |local| {
            assert!(local);
            Route::Local
        });
        assert!(matches!(r, Ok(Route::Local)));
        // Too far behind: another owner that serves it takes the request…
        let r = decide(3, true, 6, bound(5), |local| {
            assert!(!local, "beyond the bound is not local");
            peer()
        });
        assert!(matches!(r, Ok(Route::Forward(_))));
        // …or, with none, the caller hears why.
        assert_eq!(
            code(decide(3, true, 6, bound(5), |_| Route::Unavailable)),
            Code::ReplicaLagging
        );
        assert_eq!(
            code(decide(3, false, 0, Placement::default(), |_| {
                Route::Unavailable
            })),
            Code::PartitionUnavailable
        );
    }

    #[test]
    fn a_forwarded_request_is_answered_here_or_refused_never_sent_on() {
        let hop = Placement {
            max_lag: None,
            hops: 1,
        };
        let r = decide(1, true, 100, hop, |_| unreachable!("never routed again"));
        assert!(matches!(r, Ok(Route::Local)));
        let refused = decide(1, false, 0, hop, |_| unreachable!("never routed again"));
        assert_eq!(code(refused), Code::ForwardLoop);
        let lagging = Placement {
            max_lag: Some(0),
            hops: 1,
        };
        assert_eq!(
            code(decide(1, true, 1, lagging, |_| peer())),
            Code::ForwardLoop
        );
    }
}
