//! RabbitMQ as an upstream: a source that consumes one queue and appends each message's
//! events to Quiver's log (through an [`Appender`] the serving layer provides), acknowledging a
//! message to RabbitMQ only once its events are durable.
//!
//! # Design constraints
//! - **At least once + dedup = effectively once.** A message is acked after its append is
//!   durable; a crash before the ack makes RabbitMQ redeliver it, and its events are applied
//!   once: by their `event_id`, else by dedup ids derived from the AMQP `message_id` (as from
//!   an `Idempotency-Key`). Messages with neither may be applied twice after a crash.
//! - **Bounded**: at most `prefetch` messages are delivered and not yet acked (AMQP
//!   `basic.qos`); their appends are admitted in delivery order (so log order within a
//!   partition is delivery order) and acked as each becomes durable.
//! - **Bad input loses nothing silently**: a message that is not a valid `/v1/events` body is
//!   rejected without requeue (RabbitMQ dead-letters it if the queue has a dead-letter
//!   exchange), counted and logged. A log that refuses for now (queue full, broker away)
//!   makes the source wait and try the same message again; an append that fails after
//!   admission is requeued.
//! - The source runs on a thread of its own with a small runtime, reconnects with backoff, and
//!   never touches the serving path.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use quiver_core::config::RabbitMqSourceConfig;
use quiver_core::telemetry as t;

/// Why the log did not take a message's events.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// Not a valid batch of events: retrying the same bytes cannot help.
    Invalid(String),
    /// The log cannot take it now (queue full, broker away): try again later.
    Unavailable(String),
}

/// Resolves once an admitted append is durable.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send>>;

/// What the source needs from the node: validate a body and admit its events now (so the
/// order of calls is the order in the log), then wait for durability.
pub trait Appender: Send + Sync + 'static {
    fn submit(&self, body: &[u8], dedup_key: Option<&str>) -> Result<Durable, Refusal>;
}

/// Longest wait between reconnects (and between tries of a refused message).
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A running source; stopped on drop.
pub struct RabbitSource {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RabbitSource {
    pub fn start(
        config: RabbitMqSourceConfig,
        appender: Arc<dyn Appender>,
    ) -> std::io::Result<RabbitSource> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name(format!("rabbitmq-{}", config.queue))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                rt.block_on(run(config, appender, stopped));
            })?;
        Ok(RabbitSource {
            stop,
            thread: Some(thread),
        })
    }

    pub fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RabbitSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn run(
    config: RabbitMqSourceConfig,
    appender: Arc<dyn Appender>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    while !*stop.borrow() {
        match consume(&config, appender.as_ref(), &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(queue = %config.queue, error = %e, retry_in_ms = backoff.as_millis() as u64, "RabbitMQ source lost its connection; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// A delivery whose events are admitted, waiting to become durable.
struct InFlight {
    delivery: Delivery,
    durable: tokio::task::JoinHandle<Result<(), Refusal>>,
}

/// Consumes until stopped (`Ok`) or the connection fails (`Err`).
async fn consume(
    config: &RabbitMqSourceConfig,
    appender: &dyn Appender,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), lapin::Error> {
    let conn = Connection::connect(&config.url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let queue = config.queue.as_str();
    if config.declare {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    }
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            format!("quiver-{queue}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(
        queue,
        prefetch = config.prefetch,
        "RabbitMQ source consuming"
    );
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let room = usize::from(config.prefetch.max(1));
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => {
                // Unacked deliveries go back to the queue when the channel closes.
                let _ = conn.close(200, "quiver stopping".into()).await;
                return Ok(());
            }
            done = async { (&mut inflight.front_mut().expect("guarded").durable).await }, if !inflight.is_empty() => {
                let f = inflight.pop_front().expect("guarded");
                settle(queue, f.delivery, done.unwrap_or_else(|e| Err(Refusal::Unavailable(e.to_string())))).await?;
            }
            next = consumer.next(), if inflight.len() < room => {
                let delivery = match next {
                    Some(d) => d?,
                    None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidChannelState(lapin::ChannelState::Closed, "the consumer was cancelled"))),
                };
                if let Some(f) = admit(queue, appender, delivery, stop).await? {
                    inflight.push_back(f);
                }
            }
        }
    }
}

/// Admits one delivery's events (waiting while the log refuses for now); a bad message is
/// rejected at once.
async fn admit(
    queue: &str,
    appender: &dyn Appender,
    delivery: Delivery,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<InFlight>, lapin::Error> {
    let dedup_key = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.to_string());
    let mut wait = Duration::from_millis(50);
    loop {
        match appender.submit(&delivery.data, dedup_key.as_deref()) {
            Ok(durable) => {
                return Ok(Some(InFlight {
                    delivery,
                    durable: tokio::spawn(durable),
                }))
            }
            Err(Refusal::Invalid(reason)) => {
                count(queue, "rejected");
                tracing::warn!(
                    queue,
                    reason,
                    "RabbitMQ message is not a valid batch of events; rejected"
                );
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                return Ok(None);
            }
            Err(Refusal::Unavailable(reason)) => {
                if *stop.borrow() {
                    return Ok(None); // unacked: RabbitMQ redelivers it
                }
                tracing::debug!(
                    queue,
                    reason,
                    "the log refuses for now; trying the message again"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Acks a durable delivery; requeues one whose append failed after admission.
async fn settle(
    queue: &str,
    delivery: Delivery,
    done: Result<(), Refusal>,
) -> Result<(), lapin::Error> {
    match done {
        Ok(()) => {
            count(queue, "appended");
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Err(r) => {
            count(queue, "requeued");
            tracing::warn!(queue, refusal = ?r, "an admitted append failed; the message goes back to the queue");
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?;
        }
    }
    Ok(())
}

fn count(queue: &str, outcome: &'static str) {
    metrics::counter!(t::RABBITMQ_MESSAGES_TOTAL, "queue" => queue.to_string(), "outcome" => outcome).increment(1);
}
