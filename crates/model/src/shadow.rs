//! Shadow evaluation: a copy of a predict's rows runs on the shadow version after the
//! primary has answered, on a thread of its own, so the shadow never adds latency or errors
//! to a response. The queue is bounded: when it is full the copy is dropped and counted.
//! Divergence (largest absolute difference per row) and the shadow's own errors go to
//! metrics labelled by model and shadow version.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;

use quiver_core::telemetry;

use crate::repository::LoadedVersion;
use crate::rollout::Outcomes;

struct Job {
    model: String,
    version: u64,
    shadow: Arc<LoadedVersion>,
    /// Where the shadow version's outcomes go (its divergence from the answering version,
    /// its failures): what a rollout judges a candidate by.
    outcomes: Option<Arc<Outcomes>>,
    rows: Vec<f64>,
    /// The primary's outputs for `rows` (full output rows).
    primary: Vec<f64>,
    primary_width: usize,
}

#[derive(Clone)]
pub struct ShadowQueue {
    tx: SyncSender<Job>,
    /// Shadow evaluations finished (compared or failed).
    evaluated: Arc<AtomicU64>,
}

impl ShadowQueue {
    pub fn start(queue_max: usize) -> ShadowQueue {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue_max);
        let evaluated = Arc::new(AtomicU64::new(0));
        let done = evaluated.clone();
        std::thread::Builder::new()
            .name("quiver-shadow".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    evaluate(job);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
            .expect("spawn shadow thread");
        ShadowQueue { tx, evaluated }
    }

    pub fn evaluated(&self) -> u64 {
        self.evaluated.load(Ordering::Relaxed)
    }

    /// Queues a shadow evaluation; never blocks.
    pub fn submit(
        &self,
        model: &str,
        shadow: Arc<LoadedVersion>,
        outcomes: Option<Arc<Outcomes>>,
        rows: Vec<f64>,
        primary: Vec<f64>,
        primary_width: usize,
    ) {
        let job = Job {
            model: model.to_string(),
            version: shadow.version,
            shadow,
            outcomes,
            rows,
            primary,
            primary_width,
        };
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            self.tx.try_send(job)
        {
            count(&job, "dropped");
        }
    }
}

fn count(job: &Job, result: &'static str) {
    metrics::counter!(telemetry::SHADOW_PREDICTIONS_TOTAL, "model" => job.model.clone(), "version" => job.version.to_string(), "result" => result)
        .increment(1);
}

/// What one shadow evaluation found.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Largest absolute difference from the primary over the rows.
    Compared(f64),
    Error,
}

fn evaluate(job: Job) -> Outcome {
    let model = &job.shadow.model;
    let k = model.outputs();
    let n = job.rows.len() / model.inputs().max(1);
    let mut out = vec![0.0; n * k];
    // A panicking shadow model must not take the shadow thread (and every later shadow
    // comparison) with it.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.predict(&job.rows, &mut out)
    }));
    if !matches!(ran, Ok(Ok(()))) || k != job.primary_width {
        count(&job, "error");
        if let Some(o) = &job.outcomes {
            o.record_shadow(None);
        }
        return Outcome::Error;
    }
    count(&job, "ok");
    let divergence = metrics::histogram!(telemetry::SHADOW_DIVERGENCE, "model" => job.model.clone(), "version" => job.version.to_string());
    let mut worst = 0.0f64;
    for (s, p) in out.chunks_exact(k).zip(job.primary.chunks_exact(k)) {
        let d = s
            .iter()
            .zip(p)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        divergence.record(d);
        worst = worst.max(d);
    }
    if let Some(o) = &job.outcomes {
        o.record_shadow(Some(worst));
    }
    Outcome::Compared(worst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Model, ModelError};

    struct Fixed(Result<f64, &'static str>);
    impl Model for Fixed {
        fn inputs(&self) -> usize {
            1
        }
        fn engine(&self) -> &'static str {
            "test"
        }
        fn predict(&self, _: &[f64], out: &mut [f64]) -> crate::Result<()> {
            match self.0 {
                Ok(x) => {
                    out.fill(x);
                    Ok(())
                }
                Err("panic") => panic!("a shadow model that panics"),
                Err(e) => Err(ModelError::Eval(e.into())),
            }
        }
    }

    fn job(model: Fixed) -> Job {
        Job {
            model: "m".into(),
            version: 2,
            shadow: Arc::new(LoadedVersion {
                version: 2,
                model: Arc::new(model),
                column: None,
                warmup: std::time::Duration::ZERO,
            }),
            outcomes: None,
            rows: vec![1.0, 2.0],
            primary: vec![0.25, 0.5],
            primary_width: 1,
        }
    }

    #[test]
    fn divergence_and_failures_are_measured_never_raised() {
        assert_eq!(evaluate(job(Fixed(Ok(0.5)))), Outcome::Compared(0.25));
        assert_eq!(evaluate(job(Fixed(Err("bad")))), Outcome::Error);
        assert_eq!(evaluate(job(Fixed(Err("panic")))), Outcome::Error);
        // The queue's thread survives a panicking shadow and keeps taking work.
        let q = ShadowQueue::start(4);
        for m in [Fixed(Err("panic")), Fixed(Ok(1.0)), Fixed(Err("bad"))] {
            let j = job(m);
            q.submit("m", j.shadow, None, j.rows, j.primary, 1);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.evaluated() < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "the shadow thread died"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
