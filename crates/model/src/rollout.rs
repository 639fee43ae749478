//! Safe rollouts: a new version is a *candidate* that takes only the traffic it is given; a
//! model's `[rollout]` walks a candidate through canary steps, advancing when it stayed within
//! bounds for a step and rolling back the moment it does not.
//!
//! # Design constraints
//! - The decision is a pure function ([`decide`]) of the config, the rollout's state, the
//!   clock and what the candidate and the stable version did during the current step
//!   ([`Summary`]), so every rule is unit-tested without a clock or a model.
//! - What a version did is gathered by [`Outcomes`]: live predictions (latency, errors) and
//!   shadow comparisons against the stable version on the same rows (divergence, errors),
//!   over the current step only (the controller resets it when a step starts). Latencies are
//!   a bounded ring of the most recent `LATENCIES_MAX`.
//! - A rollout's state is part of the model's persisted traffic, so a restart resumes it in
//!   the step it was in (the step's clock restarts: nothing was observed while down).

use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Latencies kept per version and step (the most recent ones).
const LATENCIES_MAX: usize = 4096;
/// Decisions kept in a rollout's history.
pub const HISTORY_MAX: usize = 64;

/// A model's `[rollout]` (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Percent of traffic on the candidate at each step, rising; reaching 100 promotes it.
    pub steps: Vec<u32>,
    #[serde(deserialize_with = "duration")]
    pub step_interval: Duration,
    /// Largest share of the candidate's predictions that may fail (live or shadow).
    #[serde(default = "default_error_rate_max")]
    pub error_rate_max: f64,
    /// Largest candidate p99 ÷ stable p99 (live predict latency).
    #[serde(default = "default_p99_ratio_max")]
    pub p99_ratio_max: f64,
    /// A p99 difference smaller than this never counts as slower, whatever the ratio: at
    /// tens of microseconds a ratio measures scheduling noise, not the model.
    #[serde(default = "default_p99_slack", deserialize_with = "duration")]
    pub p99_slack: Duration,
    /// Largest |candidate − stable| output on the same rows (shadow comparisons).
    #[serde(default = "default_divergence_max")]
    pub divergence_max: f64,
    /// Predictions a step must see on the candidate (live or shadow) before it may advance,
    /// and on each side before latencies are compared.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

fn default_error_rate_max() -> f64 {
    0.01
}
fn default_p99_ratio_max() -> f64 {
    1.5
}
fn default_p99_slack() -> Duration {
    Duration::from_millis(1)
}
fn default_divergence_max() -> f64 {
    f64::INFINITY
}
fn default_min_requests() -> u64 {
    20
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
}

impl RolloutConfig {
    pub fn validate(&self) -> Result<(), String> {
        let rising = self.steps.windows(2).all(|w| w[0] < w[1]);
        if self.steps.is_empty() || !rising || self.steps.iter().any(|&s| s == 0 || s > 100) {
            return Err("rollout.steps: rising percentages in 1..=100".into());
        }
        if self.step_interval < Duration::from_millis(100) {
            return Err("rollout.step_interval: at least 100ms".into());
        }
        if !(0.0..=1.0).contains(&self.error_rate_max) {
            return Err("rollout.error_rate_max: 0..=1".into());
        }
        if self.p99_ratio_max.is_nan()
            || self.p99_ratio_max <= 0.0
            || self.divergence_max.is_nan()
            || self.divergence_max < 0.0
        {
            return Err("rollout.p99_ratio_max must be > 0 and divergence_max >= 0".into());
        }
        Ok(())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    Promoted,
    RolledBack,
}

/// One decision, as `GET /v1/models/{m}` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: i64,
    /// `start`, `advance`, `promote`, `rollback`.
    pub action: String,
    pub version: u64,
    /// Percent of traffic on the candidate after the decision.
    pub percent: u32,
    pub reason: String,
}

/// A candidate's rollout: persisted with the model's traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutState {
    pub candidate: u64,
    pub stable: u64,
    pub phase: Phase,
    /// Index into `steps` of the current step.
    pub step: usize,
    pub step_started_ms: i64,
    #[serde(default)]
    pub history: Vec<Decision>,
}

impl RolloutState {
    pub fn percent(&self, config: &RolloutConfig) -> u32 {
        match self.phase {
            Phase::Running => config.steps.get(self.step).copied().unwrap_or(100),
            Phase::Promoted => 100,
            Phase::RolledBack => 0,
        }
    }

    pub fn record(&mut self, d: Decision) {
        self.history.push(d);
        if self.history.len() > HISTORY_MAX {
            self.history.remove(0);
        }
    }
}

/// What one version did during the current step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    /// p99 of live predict latency (µs); `None` without samples.
    pub p99_us: Option<f64>,
    pub latency_samples: u64,
    /// Shadow comparisons against the stable version on the same rows.
    pub compared: u64,
    pub divergence_max: f64,
}

/// What the controller should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within bounds, the step not over (or too little seen yet).
    Stay,
    /// Move to the next step (or promote, past the last).
    Advance,
    Rollback(String),
}

/// The canary analysis: out of bounds → roll back at once; the step's interval over with
/// enough seen and everything within bounds → advance.
pub fn decide(
    config: &RolloutConfig,
    state: &RolloutState,
    now_ms: i64,
    candidate: &Summary,
    stable: &Summary,
) -> Verdict {
    debug_assert_eq!(state.phase, Phase::Running);
    if candidate.requests > 0 {
        let rate = candidate.errors as f64 / candidate.requests as f64;
        if candidate.errors > 0 && rate > config.error_rate_max {
            return Verdict::Rollback(format!(
                "error rate {rate:.4} ({} of {}) over rollout.error_rate_max {}",
                candidate.errors, candidate.requests, config.error_rate_max
            ));
        }
    }
    if candidate.compared > 0 && candidate.divergence_max > config.divergence_max {
        return Verdict::Rollback(format!(
            "output divergence {:.6} from stable over rollout.divergence_max {}",
            candidate.divergence_max, config.divergence_max
        ));
    }
    let enough = |s: &Summary| s.latency_samples >= config.min_requests;
    if let (true, true, Some(c), Some(s)) = (
        enough(candidate),
        enough(stable),
        candidate.p99_us,
        stable.p99_us,
    ) {
        let ratio = c / s.max(1.0);
        let slack_us = config.p99_slack.as_micros() as f64;
        if ratio > config.p99_ratio_max && c - s > slack_us {
            return Verdict::Rollback(format!(
                "p99 {c:.0} µs is {ratio:.2}× stable's {s:.0} µs, over rollout.p99_ratio_max {}",
                config.p99_ratio_max
            ));
        }
    }
    let over = now_ms - state.step_started_ms >= config.step_interval.as_millis() as i64;
    if over && candidate.requests >= config.min_requests {
        Verdict::Advance
    } else {
        Verdict::Stay
    }
}

/// Live and shadow outcomes of one version over the current step.
#[derive(Default)]
pub struct Outcomes {
    inner: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    requests: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    /// Next slot of the latency ring once it is full.
    next: usize,
    compared: u64,
    divergence_max: f64,
}

impl Outcomes {
    /// One live prediction (a batch of rows counts once) and how long it took.
    pub fn record(&self, latency: Duration, ok: bool) {
        let us = latency.as_micros().min(u128::from(u32::MAX)) as u32;
        let mut w = self.inner.lock();
        w.requests += 1;
        if !ok {
            w.errors += 1;
            return;
        }
        if w.latencies_us.len() < LATENCIES_MAX {
            w.latencies_us.push(us);
        } else {
            let i = w.next;
            w.latencies_us[i] = us;
            w.next = (i + 1) % LATENCIES_MAX;
        }
    }

    /// One shadow evaluation of this version: its largest divergence from the version that
    /// answered, or `None` if it failed.
    pub fn record_shadow(&self, divergence: Option<f64>) {
        let mut w = self.inner.lock();
        w.requests += 1;
        match divergence {
            Some(d) => {
                w.compared += 1;
                w.divergence_max = w.divergence_max.max(d);
            }
            None => w.errors += 1,
        }
    }

    pub fn summary(&self) -> Summary {
        let w = self.inner.lock();
        let mut lat = w.latencies_us.clone();
        drop(w);
        let p99_us = (!lat.is_empty()).then(|| {
            lat.sort_unstable();
            f64::from(lat[((lat.len() - 1) as f64 * 0.99).round() as usize])
        });
        let w = self.inner.lock();
        Summary {
            requests: w.requests,
            errors: w.errors,
            p99_us,
            latency_samples: lat.len() as u64,
            compared: w.compared,
            divergence_max: w.divergence_max,
        }
    }

    /// Starts a new window (a step began).
    pub fn reset(&self) {
        *self.inner.lock() = Window::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RolloutConfig {
        RolloutConfig {
            steps: vec![5, 25, 50, 100],
            step_interval: Duration::from_secs(10),
            error_rate_max: 0.01,
            p99_ratio_max: 1.5,
            p99_slack: Duration::from_micros(200),
            divergence_max: 0.05,
            min_requests: 20,
        }
    }

    fn state() -> RolloutState {
        RolloutState {
            candidate: 2,
            stable: 1,
            phase: Phase::Running,
            step: 0,
            step_started_ms: 1_000,
            history: Vec::new(),
        }
    }

    fn seen(requests: u64, errors: u64, p99: f64) -> Summary {
        Summary {
            requests,
            errors,
            p99_us: Some(p99),
            latency_samples: requests - errors,
            compared: requests,
            divergence_max: 0.0,
        }
    }

    #[test]
    fn a_quiet_step_advances_only_when_its_interval_is_over_and_enough_was_seen() {
        let (c, s) = (config(), state());
        let good = seen(100, 0, 900.0);
        assert_eq!(
            decide(&c, &s, 5_000, &good, &good),
            Verdict::Stay,
            "mid-step"
        );
        assert_eq!(decide(&c, &s, 11_000, &good, &good), Verdict::Advance);
        assert_eq!(
            decide(&c, &s, 11_000, &seen(5, 0, 900.0), &good),
            Verdict::Stay,
            "too few predictions to judge"
        );
    }

    #[test]
    fn any_bound_crossed_rolls_back_at_once_with_the_reason() {
        let (c, s) = (config(), state());
        let stable = seen(100, 0, 1_000.0);
        let Verdict::Rollback(why) = decide(&c, &s, 1_001, &seen(50, 1, 900.0), &stable) else {
            panic!("2% errors is over 1%");
        };
        assert!(why.contains("error rate"), "{why}");
        assert_eq!(
            decide(&c, &s, 1_001, &seen(200, 1, 900.0), &stable),
            Verdict::Stay,
            "0.5% is within 1%"
        );
        let Verdict::Rollback(why) = decide(&c, &s, 1_001, &seen(100, 0, 1_600.0), &stable) else {
            panic!("1.6× stable's p99 is over 1.5×");
        };
        assert!(why.contains("p99"), "{why}");
        let mut diverging = seen(100, 0, 900.0);
        diverging.divergence_max = 0.2;
        let Verdict::Rollback(why) = decide(&c, &s, 1_001, &diverging, &stable) else {
            panic!("0.2 is over 0.05");
        };
        assert!(why.contains("divergence"), "{why}");
        let Verdict::Stay = decide(&c, &s, 1_001, &seen(100, 0, 60.0), &seen(100, 0, 20.0)) else {
            panic!("3× at tens of µs is within the slack");
        };
        // Latency needs samples on both sides before it judges.
        assert_eq!(
            decide(&c, &s, 1_001, &seen(100, 0, 5_000.0), &seen(3, 0, 10.0)),
            Verdict::Stay
        );
    }

    #[test]
    fn outcomes_summarize_a_window_and_reset() {
        let o = Outcomes::default();
        for i in 1..=100u64 {
            o.record(Duration::from_micros(i * 10), true);
        }
        o.record(Duration::from_micros(5), false);
        o.record_shadow(Some(0.01));
        o.record_shadow(Some(0.03));
        o.record_shadow(None);
        let s = o.summary();
        assert_eq!((s.requests, s.errors, s.compared), (104, 2, 2));
        assert_eq!(s.latency_samples, 100);
        assert_eq!(s.p99_us, Some(990.0));
        assert_eq!(s.divergence_max, 0.03);
        o.reset();
        assert_eq!(o.summary(), Summary::default());
    }

    #[test]
    fn configs_are_checked() {
        let mut c = config();
        assert!(c.validate().is_ok());
        c.steps = vec![50, 25];
        assert!(c.validate().is_err());
        c.steps = vec![5, 101];
        assert!(c.validate().is_err());
    }
}
