//! Rate limits by priority.
//!
//! # Design constraints
//! - **Per credential, by tier**: each `[[rate_tier]]` (name, priority — 0 first —,
//!   `rate_per_s`, `burst`) is a token bucket per credential (GCRA, `governor`). Over it, a
//!   request is refused at once with 429, `Retry-After` and `RateLimit-*` headers. An identity
//!   without a tier gets the lowest-priority tier.
//! - **Shed lower priorities first**: at most `inflight_max` requests run at once, and a
//!   priority may fill only its share of them: with R priorities in use, the r-th best may
//!   start a request while fewer than `share(r) = inflight_max × (R − r) / R` run. A flood of
//!   the lowest priority can take at most `1/R` of the node; the best priority always finds
//!   room unless the node is full of its own requests.
//! - **Queue by priority, briefly**: a request that may not start yet waits in its priority's
//!   queue (FIFO), bounded by `QUEUE_PER_SLOT × share(r)` and by the request's deadline; a
//!   freed slot goes to the best priority waiting. A request finding its queue full gets 503 +
//!   `Retry-After` at once, before any work. Why queues at all: handlers are CPU-bound and
//!   do not yield, so on a small runtime the requests past the limit would otherwise wait in
//!   the scheduler's queue — unseen, unordered — instead of here, where gold goes first.
//! - **Yield while someone better is active**: a permit is `lowered` when a better priority
//!   started a request within [`LOWER_WHILE_BETTER_WITHIN`]; the surface then runs the handler
//!   on idle-priority threads (`quiver-server`'s `lower`), so the kernel puts the better
//!   request first too. Not lowered otherwise: a tier alone on the node keeps normal priority.
//! - In a cluster each node enforces its own buckets (a credential may get up to N × its rate
//!   over N nodes); the two-tier design — local buckets topped up from a shared Redis budget —
//!   is the way to a global limit and is not built.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Buckets keyed by credential, telling how many tokens remain after each check.
type Buckets =
    RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock, StateInformationMiddleware>;

/// `[[rate_tier]]` as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    pub name: String,
    pub priority: u8,
    pub rate_per_s: u32,
    pub burst: u32,
}

struct Tier {
    config: TierConfig,
    /// Rank among the distinct priorities in use, 0 = best.
    rank: usize,
    buckets: Buckets,
}

/// What a rate check says when it lets a request through (for `RateLimit-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    pub limit: u32,
    pub remaining: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The credential's bucket is empty (429).
    RateLimited {
        tier: String,
        limit: u32,
        retry_after: Duration,
    },
    /// The node is at this priority's share of in-flight requests and its queue is full (503).
    Saturated {
        tier: String,
        inflight: usize,
        share: usize,
    },
}

pub struct Limits {
    tiers: Vec<Tier>,
    slots: Arc<Slots>,
    clock: DefaultClock,
}

/// Requests a priority may have waiting, per running slot of its share.
const QUEUE_PER_SLOT: usize = 4;

/// A request is [lowered](Permit::lowered) while a better priority started one this recently.
pub const LOWER_WHILE_BETTER_WITHIN: Duration = Duration::from_secs(1);

/// The running requests and the queues of those waiting, by rank.
struct Slots {
    inflight_max: usize,
    ranks: usize,
    lower_window: Duration,
    state: Mutex<SlotState>,
}

struct SlotState {
    running: usize,
    /// Per rank, FIFO: each waiter is told, when given a slot, whether it is lowered.
    queues: Vec<VecDeque<oneshot::Sender<bool>>>,
    /// Per rank, when it last started a request.
    started: Vec<Option<Instant>>,
}

impl Slots {
    fn share(&self, rank: usize) -> usize {
        (self.inflight_max * (self.ranks - rank))
            .div_ceil(self.ranks)
            .max(1)
    }

    /// Records that a request of `rank` starts; whether it is to be lowered: a better rank
    /// started one within the window (lowering is for when there is someone to yield to —
    /// otherwise a lower tier's own refused retries, served at normal priority, would starve
    /// its running requests).
    fn start(&self, st: &mut SlotState, rank: usize) -> bool {
        let now = Instant::now();
        st.started[rank] = Some(now);
        st.started[..rank]
            .iter()
            .flatten()
            .any(|t| now.duration_since(*t) < self.lower_window)
    }

    /// A slot came free: hand it to the best waiting priority that may run, else keep it.
    fn release(&self) {
        let mut st = self.state.lock();
        assert!(st.running > 0, "a slot is released once");
        st.running -= 1;
        for rank in 0..self.ranks {
            while st.running < self.share(rank) {
                let Some(waiter) = st.queues[rank].pop_front() else {
                    break;
                };
                let lowered = self.start(&mut st, rank);
                if waiter.send(lowered).is_ok() {
                    st.running += 1; // handed over: the waiter's Permit releases it
                    return;
                }
            }
        }
    }
}

/// A running request's slot; released on drop (to the best waiting priority).
pub struct Permit {
    slots: Arc<Slots>,
    rank: usize,
    lowered: bool,
}

impl Permit {
    /// The request's rank among the priorities in use: 0 is the best.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether the request should run below normal OS priority: a better priority started a
    /// request within [`LOWER_WHILE_BETTER_WITHIN`] of this one.
    pub fn lowered(&self) -> bool {
        self.lowered
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.slots.release();
    }
}

/// A queued request: if it is dropped (its deadline passed) after a slot was handed to it
/// but before it saw it, the slot is released instead of lost.
struct Waiter {
    rx: Option<oneshot::Receiver<bool>>,
    slots: Arc<Slots>,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if rx.try_recv().is_ok() {
                self.slots.release();
            }
        }
    }
}

impl Limits {
    pub fn new(tiers: &[TierConfig], inflight_max: usize) -> Result<Limits, String> {
        assert!(inflight_max > 0, "at least one request may run");
        let mut priorities: Vec<u8> = tiers.iter().map(|t| t.priority).collect();
        priorities.sort_unstable();
        priorities.dedup();
        let mut out = Vec::with_capacity(tiers.len());
        for t in tiers {
            let rate = NonZeroU32::new(t.rate_per_s)
                .ok_or(format!("rate_tier {:?}: rate_per_s must be > 0", t.name))?;
            let burst = NonZeroU32::new(t.burst.max(1)).expect("max(1)");
            if tiers.iter().filter(|o| o.name == t.name).count() > 1 {
                return Err(format!("rate_tier {:?} is defined twice", t.name));
            }
            out.push(Tier {
                rank: priorities
                    .iter()
                    .position(|&p| p == t.priority)
                    .expect("collected above"),
                buckets: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
                    .with_middleware::<StateInformationMiddleware>(),
                config: t.clone(),
            });
        }
        let ranks = priorities.len().max(1);
        Ok(Limits {
            tiers: out,
            slots: Arc::new(Slots {
                inflight_max,
                ranks,
                lower_window: LOWER_WHILE_BETTER_WITHIN,
                state: Mutex::new(SlotState {
                    running: 0,
                    queues: (0..ranks).map(|_| VecDeque::new()).collect(),
                    started: vec![None; ranks],
                }),
            }),
            clock: DefaultClock::default(),
        })
    }

    /// The tier of `name` (unknown or absent: the lowest priority), if any tier exists.
    fn tier(&self, name: Option<&str>) -> Option<&Tier> {
        name.and_then(|n| self.tiers.iter().find(|t| t.config.name == n))
            .or_else(|| {
                self.tiers
                    .iter()
                    .max_by_key(|t| (t.config.priority, t.config.rate_per_s))
            })
    }

    /// Takes a token from `credential`'s bucket in its tier.
    pub fn check_rate(
        &self,
        credential: &str,
        tier: Option<&str>,
    ) -> Result<Option<Allowance>, Refused> {
        let Some(t) = self.tier(tier) else {
            return Ok(None);
        };
        let limit = t.config.rate_per_s;
        match t.buckets.check_key(&credential.to_string()) {
            Ok(snapshot) => Ok(Some(Allowance {
                limit,
                remaining: snapshot.remaining_burst_capacity(),
            })),
            Err(not_until) => Err(Refused::RateLimited {
                tier: t.config.name.clone(),
                limit,
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }

    /// Admits a request of `tier`'s priority: at once if its share has room and none of its
    /// priority waits, else after waiting in its queue (refused if the queue is full). The
    /// caller bounds the wait (the request's deadline).
    pub async fn admit(&self, tier: Option<&str>) -> Result<Permit, Refused> {
        let (rank, name) = self
            .tier(tier)
            .map_or((0, "-"), |t| (t.rank, t.config.name.as_str()));
        let slots = &self.slots;
        let share = slots.share(rank);
        let rx = {
            let mut st = slots.state.lock();
            let queue = &mut st.queues[rank];
            queue.retain(|w| !w.is_closed()); // waiters whose deadline passed
            if st.running < share && st.queues[rank].is_empty() {
                st.running += 1;
                let lowered = slots.start(&mut st, rank);
                return Ok(Permit {
                    slots: slots.clone(),
                    rank,
                    lowered,
                });
            }
            if st.queues[rank].len() >= QUEUE_PER_SLOT * share {
                return Err(Refused::Saturated {
                    tier: name.to_string(),
                    inflight: st.running,
                    share,
                });
            }
            let (tx, rx) = oneshot::channel();
            st.queues[rank].push_back(tx);
            rx
        };
        let mut waiter = Waiter {
            rx: Some(rx),
            slots: slots.clone(),
        };
        let given = waiter.rx.as_mut().expect("set above").await;
        waiter.rx = None; // seen: the Permit owns the slot now
        match given {
            Ok(lowered) => Ok(Permit {
                slots: slots.clone(),
                rank,
                lowered,
            }),
            // Only when the limits themselves go away (shutdown).
            Err(_) => Err(Refused::Saturated {
                tier: name.to_string(),
                inflight: 0,
                share,
            }),
        }
    }

    /// Distinct priorities in use (1 without tiers).
    pub fn priorities(&self) -> usize {
        self.slots.ranks
    }

    /// Requests running now.
    pub fn inflight(&self) -> usize {
        self.slots.state.lock().running
    }

    /// Forgets buckets of credentials not seen lately (bounds memory).
    pub fn housekeeping(&self) {
        for t in &self.tiers {
            t.buckets.retain_recent();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers() -> Vec<TierConfig> {
        vec![
            TierConfig {
                name: "gold".into(),
                priority: 0,
                rate_per_s: 1000,
                burst: 1000,
            },
            TierConfig {
                name: "bronze".into(),
                priority: 2,
                rate_per_s: 5,
                burst: 5,
            },
        ]
    }

    #[test]
    fn a_bucket_runs_dry_per_credential() {
        let l = Limits::new(&tiers(), 100).unwrap();
        for _ in 0..5 {
            l.check_rate("b1", Some("bronze")).unwrap();
        }
        let Err(Refused::RateLimited { retry_after, .. }) = l.check_rate("b1", Some("bronze"))
        else {
            panic!("the sixth request within the burst is refused");
        };
        assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_millis(200));
        assert!(
            l.check_rate("b2", Some("bronze")).is_ok(),
            "another credential has its own bucket"
        );
        for _ in 0..4 {
            let _ = l.check_rate("nobody", None);
        }
        assert!(
            l.check_rate("nobody", None).is_ok(),
            "no tier: the lowest priority's bucket (5)"
        );
        assert!(l.check_rate("nobody", None).is_err());
    }

    /// Admits at once, or fails the test (a wait here would hang).
    fn now(l: &Limits, tier: Option<&str>) -> Result<Permit, Refused> {
        use std::future::Future;
        let mut fut = std::pin::pin!(l.admit(tier));
        let waker = std::task::Waker::noop();
        match fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(waker))
        {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => panic!("admission waited"),
        }
    }

    #[test]
    fn lower_priorities_get_a_smaller_share_of_the_node() {
        let l = Limits::new(&tiers(), 10).unwrap();
        let bronze: Vec<Permit> = (0..5).map(|_| now(&l, Some("bronze")).unwrap()).collect();
        let gold: Vec<Permit> = (0..5).map(|_| now(&l, Some("gold")).unwrap()).collect();
        assert_eq!(l.inflight(), 10, "bronze filled its half, gold the rest");
        assert_eq!(l.priorities(), 2);
        assert_eq!(
            (gold[0].rank(), bronze[0].rank()),
            (0, 1),
            "a permit knows its rank"
        );
        drop(bronze);
        assert_eq!(l.inflight(), 5);
        assert!(now(&l, Some("gold")).is_ok());
        drop(gold);
    }

    #[test]
    fn lower_priorities_are_lowered_only_while_a_better_one_is_active() {
        let mut l = Limits::new(&tiers(), 10).unwrap();
        Arc::get_mut(&mut l.slots).unwrap().lower_window = Duration::from_millis(50);
        let bronze = now(&l, Some("bronze")).unwrap();
        assert!(!bronze.lowered(), "nothing better to yield to");
        let gold = now(&l, Some("gold")).unwrap();
        assert!(!gold.lowered(), "the best priority never is");
        let bronze2 = now(&l, Some("bronze")).unwrap();
        assert!(bronze2.lowered(), "gold started just now");
        drop((bronze, gold, bronze2));
        std::thread::sleep(Duration::from_millis(60));
        let bronze3 = now(&l, Some("bronze")).unwrap();
        assert!(!bronze3.lowered(), "gold's start is past the window");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiters_are_served_best_priority_first_and_queues_are_bounded() {
        let l = Arc::new(Limits::new(&tiers(), 2).unwrap());
        // Bronze's share is 1 slot, its queue 4 requests; gold's share 2, its queue 8.
        let running = now(&l, Some("bronze")).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (l, order) = (l.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let p = l.admit(Some("bronze")).await.unwrap();
                order.lock().push(format!("bronze{i}"));
                p
            }));
        }
        tokio::task::yield_now().await;
        assert!(
            matches!(
                now(&l, Some("bronze")),
                Err(Refused::Saturated { share: 1, .. })
            ),
            "bronze's queue is full: the fifth waits no more, it is refused"
        );
        let gold_running = now(&l, Some("gold")).unwrap(); // gold's share still has room
        let gold = {
            let (l, order) = (l.clone(), order.clone());
            tokio::spawn(async move {
                let p = l.admit(Some("gold")).await.unwrap();
                order.lock().push("gold".to_string());
                p
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(l.inflight(), 2);
        drop(running); // the freed slot goes to gold, queued after the bronzes
        let gold = gold.await.unwrap();
        assert_eq!(order.lock().clone(), vec!["gold"]);
        drop(gold_running);
        drop(gold);
        for w in waiting {
            let p = w.await.unwrap(); // one at a time: bronze's share is 1
            assert!(
                p.lowered(),
                "gold started within the window: a waiter is lowered too"
            );
        }
        assert_eq!(l.inflight(), 0, "every slot came back");
        assert_eq!(order.lock().len(), 5);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_waiter_dropped_by_its_deadline_loses_no_slot() {
        let l = Arc::new(Limits::new(&[], 1).unwrap());
        let running = now(&l, None).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(20), l.admit(None)).await;
        assert!(waited.is_err(), "no slot within the deadline");
        drop(running);
        assert_eq!(l.inflight(), 0);
        assert!(
            now(&l, None).is_ok(),
            "the slot was not lost to the dropped waiter"
        );
    }

    #[test]
    fn without_tiers_nothing_is_limited_but_the_bound() {
        let l = Limits::new(&[], 2).unwrap();
        assert_eq!(l.check_rate("a", None), Ok(None));
        let _a = now(&l, None).unwrap();
        let _b = now(&l, None).unwrap();
        assert_eq!(l.inflight(), 2);
    }
}
