//! The failure detector: what the last probes of each peer said.
//!
//! Each node probes every peer's `GET /v1/cluster/node` every `probe_interval` (with a
//! timeout of one interval). A probe succeeds when the peer answers 200 with the partitions
//! it serves (materialized and caught up). A peer is *up* while its last success is at most
//! `down_after` old; so a dead peer is marked down at most `down_after + probe_interval`
//! after its last answer (defaults 1 s + 0.2 s; DESIGN.md's target is ≤ 2 s). Why probes
//! rather than gossip or a phi-accrual detector: the membership is static config, the
//! clusters are small (every node probes every other: n² probes of a few hundred bytes every
//! 200 ms is nothing for n ≤ 32), and a fixed timeout gives a bound that can be documented
//! and tested. A peer never heard from is down (forwarding to it could only fail).
//!
//! This module holds only the state; the surface crate sends the probes (it knows HTTP).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

#[derive(Debug, Clone, Default)]
struct Peer {
    last_ok: Option<Instant>,
    /// Partitions it said it serves, at `last_ok`.
    serving: Vec<u32>,
    /// Probes failed since the last success.
    failures: u32,
    last_error: Option<String>,
}

/// One peer as [`Health::view`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub id: String,
    pub up: bool,
    pub serving: Vec<u32>,
    /// Milliseconds since its last successful probe.
    pub last_ok_ms_ago: Option<u64>,
    pub failures: u32,
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct Health {
    down_after: Duration,
    peers: RwLock<HashMap<String, Peer>>,
}

impl Health {
    pub fn new(down_after: Duration) -> Health {
        assert!(!down_after.is_zero());
        Health {
            down_after,
            peers: RwLock::new(HashMap::new()),
        }
    }

    pub fn down_after(&self) -> Duration {
        self.down_after
    }

    /// Records a successful probe of `id`, which serves `serving`.
    pub fn ok(&self, id: &str, serving: Vec<u32>, now: Instant) {
        let mut peers = self.peers.write();
        let p = peers.entry(id.to_string()).or_default();
        p.last_ok = Some(now);
        p.serving = serving;
        p.failures = 0;
        p.last_error = None;
    }

    /// Records a failed probe (no answer in time, refused, not 200).
    pub fn failed(&self, id: &str, error: String) {
        let mut peers = self.peers.write();
        let p = peers.entry(id.to_string()).or_default();
        p.failures = p.failures.saturating_add(1);
        p.last_error = Some(error);
    }

    /// Marks `id` down now (a forwarded request found it unreachable): no need to wait for
    /// the probes to notice.
    pub fn suspect(&self, id: &str, error: String) {
        let mut peers = self.peers.write();
        let p = peers.entry(id.to_string()).or_default();
        p.last_ok = None;
        p.failures = p.failures.saturating_add(1);
        p.last_error = Some(error);
    }

    pub fn is_up(&self, id: &str, now: Instant) -> bool {
        self.peers
            .read()
            .get(id)
            .and_then(|p| p.last_ok)
            .is_some_and(|t| now.saturating_duration_since(t) <= self.down_after)
    }

    /// Whether `id` is up and said it serves `partition`.
    pub fn serves(&self, id: &str, partition: u32, now: Instant) -> bool {
        self.is_up(id, now)
            && self
                .peers
                .read()
                .get(id)
                .is_some_and(|p| p.serving.binary_search(&partition).is_ok())
    }

    /// Forgets peers that are no longer members.
    pub fn retain(&self, members: &[String]) {
        self.peers.write().retain(|id, _| members.contains(id));
    }

    pub fn view(&self, id: &str, now: Instant) -> PeerView {
        let peers = self.peers.read();
        let p = peers.get(id).cloned().unwrap_or_default();
        PeerView {
            id: id.to_string(),
            up: p
                .last_ok
                .is_some_and(|t| now.saturating_duration_since(t) <= self.down_after),
            serving: p.serving,
            last_ok_ms_ago: p
                .last_ok
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            failures: p.failures,
            last_error: p.last_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_up_only_within_down_after_of_its_last_success() {
        let h = Health::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(!h.is_up("n2", t0), "never heard from: down");
        h.ok("n2", vec![1, 3], t0);
        assert!(h.is_up("n2", t0 + Duration::from_millis(999)));
        assert!(h.serves("n2", 3, t0) && !h.serves("n2", 2, t0));
        h.failed("n2", "timeout".into());
        assert!(
            h.is_up("n2", t0 + Duration::from_millis(500)),
            "one lost probe is not a death"
        );
        assert!(!h.is_up("n2", t0 + Duration::from_millis(1001)));
        assert!(
            !h.serves("n2", 3, t0 + Duration::from_millis(1001)),
            "down serves nothing"
        );
        h.ok("n2", vec![1], t0 + Duration::from_secs(2));
        assert!(h.is_up("n2", t0 + Duration::from_secs(2)));
        h.suspect("n2", "connection refused".into());
        assert!(
            !h.is_up("n2", t0 + Duration::from_secs(2)),
            "a failed forward marks it down"
        );
        let v = h.view("n2", t0 + Duration::from_secs(2));
        assert_eq!(v.failures, 1);
        assert_eq!(v.last_error.as_deref(), Some("connection refused"));
    }
}
