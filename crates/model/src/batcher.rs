//! Dynamic micro-batching for one model version (Triton's dynamic batcher): requests wait
//! until `batch_max` rows are queued or the first has waited `queue_delay_us_max`, whichever
//! comes first, then run as one model execution; each caller gets back its own rows.
//!
//! The queue is a bounded channel of `queue_max` requests: when it is full, [`Batcher::submit`]
//! refuses at once (the server answers 503 with `Retry-After`) rather than queueing without
//! limit. One thread per batched version executes the batches, so a batch of a slow model
//! never occupies an async worker.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_core::telemetry;

use crate::repository::BatchingConfig;
use crate::{Model, ModelError};

pub type Reply = Result<Vec<f64>, ModelError>;

struct Job {
    rows: Vec<f64>,
    n: usize,
    enqueued: Instant,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

pub struct Batcher {
    tx: SyncSender<Job>,
    inputs: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("the batch queue of this model is full")]
pub struct QueueFull;

impl Batcher {
    pub fn start(
        model_name: &str,
        version: u64,
        model: Arc<dyn Model>,
        c: &BatchingConfig,
    ) -> Batcher {
        let (tx, rx) = mpsc::sync_channel::<Job>(c.queue_max);
        let inputs = model.inputs();
        let batch_max = c.batch_max;
        let delay = Duration::from_micros(c.queue_delay_us_max);
        let labels = [
            ("model", model_name.to_string()),
            ("version", version.to_string()),
        ];
        std::thread::Builder::new()
            .name(format!("quiver-batch-{model_name}-{version}"))
            .spawn(move || run(rx, model, batch_max, delay, &labels))
            .expect("spawn batcher thread");
        Batcher { tx, inputs }
    }

    /// Queues `rows` (whole rows of the model's inputs) for the next batch. The receiver
    /// yields the rows' outputs, in order.
    pub fn submit(
        &self,
        rows: Vec<f64>,
    ) -> Result<tokio::sync::oneshot::Receiver<Reply>, QueueFull> {
        assert!(
            self.inputs > 0 && rows.len().is_multiple_of(self.inputs) && !rows.is_empty(),
            "whole rows only"
        );
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job = Job {
            n: rows.len() / self.inputs,
            rows,
            enqueued: Instant::now(),
            reply,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(QueueFull),
        }
    }
}

fn run(
    rx: mpsc::Receiver<Job>,
    model: Arc<dyn Model>,
    batch_max: usize,
    delay: Duration,
    labels: &[(&'static str, String); 2],
) {
    let k = model.outputs();
    let width = model.inputs();
    let queue = metrics::histogram!(telemetry::MODEL_QUEUE_SECONDS, labels);
    let compute = metrics::histogram!(telemetry::MODEL_COMPUTE_SECONDS, labels);
    let size = metrics::histogram!(telemetry::MODEL_BATCH_SIZE, labels);
    let inferences = metrics::counter!(telemetry::MODEL_INFERENCES_TOTAL, labels);
    let executions = metrics::counter!(telemetry::MODEL_EXECUTIONS_TOTAL, labels);
    let mut jobs: Vec<Job> = Vec::with_capacity(batch_max);
    let mut rows: Vec<f64> = Vec::with_capacity(batch_max * width);
    let mut out: Vec<f64> = Vec::with_capacity(batch_max * k);
    // Ends when the last `Batcher` handle (its version unloaded) is dropped.
    while let Ok(first) = rx.recv() {
        let deadline = first.enqueued + delay;
        let mut n = first.n;
        jobs.push(first);
        while n < batch_max {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(job) => {
                    n += job.n;
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let started = Instant::now();
        rows.clear();
        for j in &jobs {
            queue.record(started.duration_since(j.enqueued).as_secs_f64());
            rows.extend_from_slice(&j.rows);
        }
        out.clear();
        out.resize(n * k, 0.0);
        let result = model.predict(&rows, &mut out);
        compute.record(started.elapsed().as_secs_f64());
        size.record(n as f64);
        executions.increment(1);
        inferences.increment(n as u64);
        let mut at = 0;
        for j in jobs.drain(..) {
            let reply = match &result {
                Ok(()) => Ok(out[at * k..(at + j.n) * k].to_vec()),
                Err(e) => Err(ModelError::Eval(e.to_string())),
            };
            at += j.n;
            // A caller that gave up (timeout, disconnect) simply drops its receiver.
            let _ = j.reply.send(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trees::Forest;
    use proptest::prelude::*;

    fn forest() -> Arc<dyn Model> {
        Arc::new(
            Forest::from_lightgbm_text(include_str!("../tests/fixtures/lgbm_binary.txt")).unwrap(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Whatever the batching, each caller gets exactly its own rows' answers, bit for bit
        /// what unbatched evaluation gives.
        #[test]
        fn each_caller_gets_its_own_answer(
            requests in prop::collection::vec((1usize..4, any::<u64>()), 1..40),
            batch_max in 1usize..16,
            delay_us in 0u64..2000,
        ) {
            let model = forest();
            let width = model.inputs();
            let config = BatchingConfig { batch_max, queue_delay_us_max: delay_us, queue_max: 64 };
            let batcher = Arc::new(Batcher::start("t", 1, model.clone(), &config));
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let inputs: Vec<Vec<f64>> = requests
                .iter()
                .map(|&(n, seed)| {
                    let mut x = seed;
                    (0..n * width)
                        .map(|_| {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                            if x >> 60 == 0 { f64::NAN } else { ((x >> 11) as f64 / (1u64 << 53) as f64) * 6.0 - 3.0 }
                        })
                        .collect()
                })
                .collect();
            let answers: Vec<Vec<f64>> = rt.block_on(async {
                let receivers: Vec<_> = inputs.iter().map(|rows| batcher.submit(rows.clone()).unwrap()).collect();
                let mut out = Vec::new();
                for r in receivers {
                    out.push(r.await.unwrap().unwrap());
                }
                out
            });
            for (rows, got) in inputs.iter().zip(&answers) {
                let mut want = vec![0.0; rows.len() / width * model.outputs()];
                model.predict(rows, &mut want).unwrap();
                prop_assert_eq!(got, &want);
            }
        }
    }

    #[test]
    fn a_full_queue_refuses() {
        /// A model that blocks until released, so the queue fills behind it.
        struct Gate(std::sync::Mutex<()>);
        impl Model for Gate {
            fn inputs(&self) -> usize {
                1
            }
            fn engine(&self) -> &'static str {
                "test"
            }
            fn predict(&self, _: &[f64], out: &mut [f64]) -> crate::Result<()> {
                let _held = self.0.lock().unwrap();
                out.fill(1.0);
                Ok(())
            }
        }
        let gate = Arc::new(Gate(std::sync::Mutex::new(())));
        let held = gate.0.lock().unwrap();
        let config = BatchingConfig {
            batch_max: 1,
            queue_delay_us_max: 0,
            queue_max: 2,
        };
        let b = Batcher::start("t", 1, gate.clone(), &config);
        let mut accepted = Vec::new();
        let mut refused = 0;
        for _ in 0..10 {
            match b.submit(vec![0.0]) {
                Ok(rx) => accepted.push(rx),
                Err(QueueFull) => refused += 1,
            }
        }
        // One executing (blocked) + one pulled... at most queue_max + 2 in flight.
        assert!(refused >= 10 - 4, "{refused} refused");
        drop(held);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for rx in accepted {
            assert_eq!(rt.block_on(rx).unwrap().unwrap(), vec![1.0]);
        }
    }
}
