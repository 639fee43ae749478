//! Ingest: a validated batch of events becomes one record per event, grouped by partition
//! (murmur2(key) % P), appended to the log, and acknowledged at the asked level with a token
//! naming the positions written. Both surfaces (`POST /v1/events`, Feast's writes, gRPC
//! `quiver.v1.Ingest/Push`) come through here, so they validate and acknowledge alike.

use quiver_core::event::{decode_batch, Event, EventError, Reason};
use quiver_core::partition::partition_for;
use quiver_core::record;
use quiver_core::telemetry as t;
use quiver_core::time::now_ms;
use quiver_core::token::Token;
use quiver_log::{Ack, RecordBatch};

use crate::error::{Code, Result, ServingError};
use crate::Node;

/// Counts rejected events by reason (`quiver_events_rejected_total`).
pub fn reject(reason: &str, events: usize) {
    metrics::counter!(t::EVENTS_REJECTED_TOTAL, "reason" => reason.to_string())
        .increment(events.max(1) as u64);
}

/// The ack level named `none`, `written` or `durable` (absent: durable).
pub fn parse_ack(name: Option<&str>) -> Result<Ack> {
    match name {
        None | Some("durable") => Ok(Ack::Durable),
        Some("written") => Ok(Ack::Written),
        Some("none") => Ok(Ack::None),
        Some(other) => Err(ServingError::new(
            Code::BadParameter,
            format!("ack must be none, written or durable, not {other:?}"),
        )
        .detail("parameter", "ack")),
    }
}

/// A batch validated whole and encoded, ready to append.
pub struct Prepared {
    pub events: usize,
    batches: Vec<(u32, RecordBatch)>,
    /// The views the batch writes, each once (what a producer grant must cover).
    pub views: Vec<String>,
}

/// What an append acknowledged.
#[derive(Clone, Debug)]
pub struct Appended {
    pub accepted: usize,
    pub token: Token,
}

/// A decoder's rejection, as the serving error (index, field and reason in the details).
pub fn invalid_event(e: EventError) -> ServingError {
    reject(e.reason.code(), 1);
    let code = if e.reason == Reason::BatchTooLarge {
        Code::BatchTooLarge
    } else {
        Code::InvalidEvent
    };
    let message = e.to_string();
    ServingError::new(code, message)
        .detail("index", e.index)
        .detail("field", e.field)
        .detail("reason", e.reason.code())
}

/// Decodes and validates a JSON array or NDJSON body of events, then [`prepare`]s it.
pub fn prepare_json(node: &Node, bytes: &[u8], idem_key: Option<&str>) -> Result<Prepared> {
    let events =
        decode_batch(bytes, &node.schema, &node.limits, now_ms()).map_err(invalid_event)?;
    Ok(prepare(node, &events, idem_key))
}

/// Encodes one record per event into its partition's batch. `idem_key` derives dedup ids
/// for events without an `event_id`, so a retried batch is applied once.
pub fn prepare(node: &Node, events: &[Event], idem_key: Option<&str>) -> Prepared {
    let schema = &node.schema;
    let partitions = node.log.partitions();
    let mut batches: Vec<RecordBatch> = (0..partitions).map(|_| RecordBatch::new()).collect();
    let mut views: Vec<String> = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let view = &schema.view(e.view).name;
        if !views.contains(view) {
            views.push(view.clone());
        }
        let dedup = match (&e.event_id, idem_key) {
            (Some(id), _) => Some(record::dedup_from_event_id(view, &e.key, id)),
            (None, Some(k)) => Some(record::dedup_from_idempotency(k, i)),
            (None, None) => None,
        };
        let p = partition_for(e.key.as_bytes(), partitions);
        batches[p as usize].push_with(|buf| record::encode(schema, e, dedup, buf));
    }
    let batches = batches
        .into_iter()
        .enumerate()
        .filter(|(_, b)| !b.is_empty())
        .map(|(p, b)| (p as u32, b))
        .collect();
    Prepared {
        events: events.len(),
        batches,
        views,
    }
}

/// Appends a prepared batch, admitted whole or refused whole (bounded queue, disk bound).
/// [`Pending::wait`] then waits for the ack level and gives the token.
pub fn submit(node: &Node, prepared: Prepared, ack: Ack) -> Result<Pending> {
    let count = prepared.events;
    let appended = node.log.append(prepared.batches, ack).map_err(|e| {
        let (reason, retry_after_s) = match e {
            quiver_log::LogError::Full { .. } => ("queue_full", 1),
            // Nothing frees disk before retention runs again.
            quiver_log::LogError::DiskFull { .. } => (
                "disk_full",
                node.config
                    .log
                    .retention_check_interval
                    .0
                    .as_secs()
                    .clamp(1, 3600) as u32,
            ),
            _ => ("log_unavailable", 1),
        };
        reject(reason, count);
        ServingError::from(e).retry_after(retry_after_s)
    })?;
    Ok(Pending {
        accepted: count,
        appended,
    })
}

/// An admitted batch whose acknowledgement may still be on its way.
pub struct Pending {
    accepted: usize,
    appended: Vec<quiver_log::Appended>,
}

impl Pending {
    /// Waits for every stream's ack (written or durable, as asked). The token names the
    /// positions written: all of them, except with `ack=none` on a log whose broker assigns
    /// offsets (Kafka), where they are not known without waiting.
    pub async fn wait(self) -> Result<Appended> {
        let mut token = Token::new();
        for a in self.appended {
            let stream = a.stream;
            if let Some(next) = a.wait().await? {
                token.advance(stream, next);
            }
        }
        metrics::counter!(t::EVENTS_INGESTED_TOTAL).increment(self.accepted as u64);
        Ok(Appended {
            accepted: self.accepted,
            token,
        })
    }
}

/// [`submit`] and wait.
pub async fn append(node: &Node, prepared: Prepared, ack: Ack) -> Result<Appended> {
    submit(node, prepared, ack)?.wait().await
}
