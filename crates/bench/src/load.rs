//! The load generator of `quiver bench` and `quiver demo`.
//!
//! Open loop (as wrk2 does): each worker owns a connection and a fixed schedule of `rate /
//! workers` operations per second. An operation that leaves late because the previous reply
//! was slow counts its latency from when it was *due*, so a stalled server is charged for every
//! request it kept waiting (no coordinated omission). One that leaves late only because the
//! timer woke late (tokio's timer has 1 ms granularity) counts from when it actually left: that
//! delay is the generator's, not the server's. Closed loop: each worker sends its next
//! operation as soon as the previous reply arrives, for the most the server sustains.
//!
//! Latencies go to one HdrHistogram per worker (µs, 3 significant digits), merged at the end;
//! operations due during warm-up are run but not recorded.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;

/// Latency histogram bounds: 1 µs to 60 s.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// The quantile `q` of `h` in µs.
pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

/// One measured run's timeline: warm-up, then the measured window; `stop` ends it early
/// (Ctrl-C in `quiver demo`).
#[derive(Clone)]
pub struct Window {
    pub start: Instant,
    pub warm_end: Instant,
    pub end: Instant,
    pub stop: Arc<AtomicBool>,
}

impl Window {
    pub fn new(warmup: f64, duration: f64) -> Window {
        let start = Instant::now();
        let warm_end = start + Duration::from_secs_f64(warmup.max(0.0));
        Window {
            start,
            warm_end,
            end: warm_end + Duration::from_secs_f64(duration.max(0.0)),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether an operation due at `t` is in the measured window.
    pub fn measures(&self, t: Instant) -> bool {
        t >= self.warm_end && t < self.end
    }

    pub fn measured_secs(&self) -> f64 {
        (self.end - self.warm_end).as_secs_f64()
    }

    fn over(&self, now: Instant) -> bool {
        now >= self.end || self.stop.load(Ordering::Relaxed)
    }
}

/// One connection's worth of load.
pub trait Worker: Send + 'static {
    /// Runs operation `seq`. `start` is when it counts from (what a worker measuring its own
    /// latencies should use): its due time if a slow reply made it late, else when it left.
    /// `Ok(true)`: success; `Ok(false)`: the peer answered with an error; `Err`: the
    /// connection is unusable and this worker stops.
    fn call(&mut self, seq: u64, start: Instant) -> impl Future<Output = Result<bool>> + Send;
}

/// What a set of workers did in the measured window.
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    /// Success latencies in µs (open loop: from when each operation was due).
    pub latency: Histogram<u64>,
    pub secs: f64,
    /// The first transport error, if any worker stopped on one.
    pub failure: Option<String>,
}

impl Outcome {
    pub fn ops_per_s(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }
    pub fn p(&self, q: f64) -> f64 {
        us(&self.latency, q)
    }
}

/// Runs `workers` over `window`: open loop at `rate` operations/s in all when given, else
/// closed loop. Returns the outcome and the workers (which may carry their own measurements).
pub async fn drive<W: Worker>(
    workers: Vec<W>,
    rate: Option<f64>,
    window: &Window,
) -> Result<(Outcome, Vec<W>)> {
    assert!(!workers.is_empty(), "a load needs at least one worker");
    let n = workers.len();
    let period = rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(n as f64 / r));
    let mut tasks = Vec::with_capacity(n);
    for (i, mut w) in workers.into_iter().enumerate() {
        let window = window.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut ok, mut errors, mut failure) = (0u64, 0u64, None);
            // Staggered so the workers' schedules interleave instead of firing together.
            let mut due = window.start
                + period
                    .map(|p| p.mul_f64(i as f64 / n as f64))
                    .unwrap_or_default();
            let mut seq = i as u64;
            let mut last_done = window.start;
            loop {
                let now = Instant::now();
                if window.over(now) || (period.is_some() && due >= window.end) {
                    break;
                }
                let t0 = match period {
                    Some(_) if last_done > due => due,
                    Some(_) => {
                        tokio::time::sleep_until(due.into()).await;
                        Instant::now()
                    }
                    None => now,
                };
                let scheduled = if period.is_some() { due } else { t0 };
                let measured = window.measures(scheduled);
                let result = w.call(seq, t0).await;
                last_done = Instant::now();
                match result {
                    Ok(true) if measured => {
                        ok += 1;
                        h.record((last_done - t0).as_micros().max(1) as u64)?;
                    }
                    Ok(false) if measured => errors += 1,
                    Ok(_) => {}
                    Err(e) => {
                        errors += 1;
                        failure = Some(format!("{e:#}"));
                        break;
                    }
                }
                seq += n as u64;
                if let Some(p) = period {
                    due += p;
                }
            }
            anyhow::Ok((w, h, ok, errors, failure))
        }));
    }
    let mut out = Outcome {
        ok: 0,
        errors: 0,
        latency: histogram(),
        secs: window.measured_secs(),
        failure: None,
    };
    let mut workers = Vec::with_capacity(n);
    for t in tasks {
        let (w, h, ok, errors, failure) = t.await??;
        out.latency.add(h)?;
        out.ok += ok;
        out.errors += errors;
        out.failure = out.failure.or(failure);
        workers.push(w);
    }
    // Stopped early (Ctrl-C): the window was shorter than planned.
    let now = Instant::now();
    if now < window.end {
        out.secs = now.saturating_duration_since(window.warm_end).as_secs_f64();
    }
    Ok((out, workers))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replies after `delay`, counting calls.
    struct Sleeper {
        delay: Duration,
        calls: u64,
    }

    impl Worker for Sleeper {
        async fn call(&mut self, _seq: u64, _due: Instant) -> Result<bool> {
            self.calls += 1;
            tokio::time::sleep(self.delay).await;
            Ok(true)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_keeps_its_schedule() {
        let window = Window::new(0.1, 0.5);
        let workers = (0..4)
            .map(|_| Sleeper {
                delay: Duration::from_micros(100),
                calls: 0,
            })
            .collect();
        let (out, _) = drive(workers, Some(400.0), &window).await.unwrap();
        // 400/s over 0.5 s: 200 due in the window (timing slack on a busy machine).
        assert!((100..=204).contains(&out.ok), "{}", out.ok);
        assert_eq!(out.errors, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_server_is_charged_for_the_requests_it_delayed() {
        // One worker, 1000/s offered, each reply takes 20 ms: from the schedule's view the
        // backlog grows all window long, so the late requests must show latencies far above
        // the 20 ms service time (a closed-loop measurement would report ~20 ms throughout).
        let window = Window::new(0.0, 0.4);
        let (out, _) = drive(
            vec![Sleeper {
                delay: Duration::from_millis(20),
                calls: 0,
            }],
            Some(1000.0),
            &window,
        )
        .await
        .unwrap();
        assert!(out.ok > 5, "{}", out.ok);
        assert!(out.p(0.99) > 100_000.0, "p99 {} µs", out.p(0.99));
        let (closed, workers) = drive(
            vec![Sleeper {
                delay: Duration::from_millis(20),
                calls: 0,
            }],
            None,
            &Window::new(0.0, 0.2),
        )
        .await
        .unwrap();
        assert!(closed.p(0.99) < 100_000.0, "p99 {} µs", closed.p(0.99));
        assert!(workers[0].calls >= closed.ok);
    }
}
