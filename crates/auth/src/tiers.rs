//! Rate limits by priority.
//!
//! # Design constraints
//! - **Per credential, by tier**: each `[[rate_tier]]` (name, priority — 0 first —,
//!   `rate_per_s`, `burst`) is a token bucket per credential (GCRA, `governor`). Over it, a
//!   request is refused at once with 429, `Retry-After` and `RateLimit-*` headers. An identity
//!   without a tier gets the lowest-priority tier.
//! - **Shed lower priorities first**: at most `inflight_max` requests run at once, and a
//!   priority may fill only its share of them: with R priorities in use, the r-th best may
//!   start a request while fewer than `inflight_max × (R − r) / R` run. A flood of the lowest
//!   priority can take at most `1/R` of the node; the best priority always finds room unless
//!   the node is full of its own requests. A request over its share gets 503 + `Retry-After`
//!   at once, before any work.
//! - In a cluster each node enforces its own buckets (a credential may get up to N × its rate
//!   over N nodes); the two-tier design — local buckets topped up from a shared Redis budget —
//!   is the way to a global limit and is not built.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// The node is at this priority's share of in-flight requests (503).
    Saturated {
        tier: String,
        inflight: usize,
        share: usize,
    },
}

pub struct Limits {
    tiers: Vec<Tier>,
    ranks: usize,
    inflight: Arc<AtomicUsize>,
    inflight_max: usize,
    clock: DefaultClock,
}

/// A running request's slot; released on drop.
pub struct Permit {
    inflight: Arc<AtomicUsize>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
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
        Ok(Limits {
            ranks: priorities.len().max(1),
            tiers: out,
            inflight: Arc::new(AtomicUsize::new(0)),
            inflight_max,
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

    /// Admits a request of `tier`'s priority if the node has room for it.
    pub fn admit(&self, tier: Option<&str>) -> Result<Permit, Refused> {
        let (rank, name) = self
            .tier(tier)
            .map_or((0, "-".to_string()), |t| (t.rank, t.config.name.clone()));
        let share = (self.inflight_max * (self.ranks - rank))
            .div_ceil(self.ranks)
            .max(1);
        let mut cur = self.inflight.load(Ordering::Relaxed);
        loop {
            if cur >= share {
                return Err(Refused::Saturated {
                    tier: name,
                    inflight: cur,
                    share,
                });
            }
            match self.inflight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Ok(Permit {
                        inflight: self.inflight.clone(),
                    })
                }
                Err(actual) => cur = actual,
            }
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
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

    #[test]
    fn lower_priorities_get_a_smaller_share_of_the_node() {
        let l = Limits::new(&tiers(), 10).unwrap();
        let bronze: Vec<Permit> = (0..5).map(|_| l.admit(Some("bronze")).unwrap()).collect();
        assert!(
            matches!(
                l.admit(Some("bronze")),
                Err(Refused::Saturated { share: 5, .. })
            ),
            "bronze may fill half"
        );
        let gold: Vec<Permit> = (0..5).map(|_| l.admit(Some("gold")).unwrap()).collect();
        assert!(l.admit(Some("gold")).is_err(), "the node is full");
        drop(bronze);
        assert_eq!(l.inflight(), 5);
        assert!(l.admit(Some("gold")).is_ok());
        drop(gold);
    }

    #[test]
    fn without_tiers_nothing_is_limited_but_the_bound() {
        let l = Limits::new(&[], 2).unwrap();
        assert_eq!(l.check_rate("a", None), Ok(None));
        let _a = l.admit(None).unwrap();
        let _b = l.admit(None).unwrap();
        assert!(l.admit(None).is_err());
    }
}
