//! The log as its consumers see it: one trait, two backends (the embedded log in this crate,
//! Kafka in `quiver-connect`). Materializers, the history sink, point-in-time reads and
//! read-your-writes use only this.
//!
//! # Streams
//! A log is a set of *streams*, each an ordered sequence of records with offsets that only
//! grow, and each belonging to one *partition* (`murmur2(key) % partitions`: every record of a
//! key lands in the streams of one partition). Stream ids are dense, `0..streams().len()`,
//! laid out `slot × partitions + partition`:
//! - embedded: one slot, so stream `p` is partition `p` (and tokens read as before);
//! - Kafka: one slot per topic (Quiver's own `{topic_prefix}{view}` and every source topic,
//!   sorted by name), so stream `slot × P + p` is partition `p` of that topic. Each topic
//!   feeds exactly one view.
//!
//! Records are Quiver's binary record (`quiver_core::record`) whatever the backend: a backend
//! that stores another format (Kafka: key + the event as JSON) transcodes on both sides, so
//! every consumer decodes alike.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::consumers::{Consumer, Retention};
use crate::{Ack, LogError, ReadBatch, RecordBatch, Result};

/// A stream's index among the log's streams (see the module doc).
pub type StreamId = u32;

/// What a consumer needs to know of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// Identity of the log the stream belongs to, stable across restarts: rows and offsets
    /// kept elsewhere (PostgreSQL, snapshots) are keyed on (`log_id`, `partition`, offset).
    /// Embedded: the log's random `ID`; Kafka: `kafka:<topic>`.
    pub log_id: String,
    pub partition: u32,
    /// For logs and metrics: `p-0003`, `quiver.txn/3`.
    pub name: String,
    /// The one view whose records the stream carries (Kafka topics); `None`: any view.
    pub view: Option<String>,
}

impl StreamInfo {
    pub fn carries(&self, view: &str) -> bool {
        self.view.as_deref().is_none_or(|v| v == view)
    }
}

/// The offsets one append took in one stream, and its completion.
#[derive(Debug)]
pub struct Appended {
    pub stream: StreamId,
    pub count: u64,
    /// Offset of the first record when the log hands offsets out at enqueue (embedded); a
    /// broker that assigns them (Kafka) tells them only with the acknowledgement.
    pub first_offset: Option<u64>,
    done: Option<Done>,
}

impl Appended {
    /// An append whose offsets are known now; `done` (with the offset after its last record)
    /// fires at the asked ack level.
    pub fn reserved(stream: StreamId, first: u64, count: u64, done: Option<Done>) -> Self {
        Appended {
            stream,
            count,
            first_offset: Some(first),
            done,
        }
    }

    /// An append whose offsets come with its acknowledgement (`None`: not waited for).
    pub fn pending(stream: StreamId, count: u64, done: Option<Done>) -> Self {
        Appended {
            stream,
            count,
            first_offset: None,
            done,
        }
    }

    /// Offset after the last record, when known before the acknowledgement.
    pub fn next_offset(&self) -> Option<u64> {
        self.first_offset.map(|f| f + self.count)
    }

    /// Waits for the asked acknowledgement; returns the offset after the append's last record
    /// when known (not for `Ack::None` on a log that assigns offsets at the broker).
    pub async fn wait(self) -> Result<Option<u64>> {
        let known = self.next_offset();
        match self.done {
            None => Ok(known),
            Some(rx) => rx.await.unwrap_or(Err(LogError::ShuttingDown)).map(Some),
        }
    }

    pub fn wait_blocking(self) -> Result<Option<u64>> {
        let known = self.next_offset();
        match self.done {
            None => Ok(known),
            Some(rx) => rx
                .blocking_recv()
                .unwrap_or(Err(LogError::ShuttingDown))
                .map(Some),
        }
    }
}

/// An append's acknowledgement: the offset after its last record, or why it failed.
pub type Done = oneshot::Receiver<Result<u64>>;

/// Who opens a reader: backends may treat them differently (only the materializer reports
/// records a Kafka backend cannot decode, so that each is counted once).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadPurpose {
    /// The materializers, applying records to the store.
    Materialize,
    /// The history sink.
    Archive,
    /// A bounded scan (point-in-time reads of the log's tail).
    Scan,
}

impl ReadPurpose {
    pub fn name(self) -> &'static str {
        match self {
            ReadPurpose::Materialize => "materialize",
            ReadPurpose::Archive => "archive",
            ReadPurpose::Scan => "scan",
        }
    }
}

/// One partition's records as a backend hands them out.
pub trait EventLog: Send + Sync + 'static {
    /// `embedded` or `kafka`.
    fn kind(&self) -> &'static str;

    fn partitions(&self) -> u32;

    /// Every stream, indexed by [`StreamId`].
    fn streams(&self) -> &[StreamInfo];

    /// Appends per-partition batches of records (each carrying its view) as one admission:
    /// all are queued or none is. One [`Appended`] per stream written.
    fn append(&self, batches: Vec<(u32, RecordBatch)>, ack: Ack) -> Result<Vec<Appended>>;

    /// A reader of the given streams, each from its offset, in order within each stream.
    fn open_reader(
        &self,
        from: &[(StreamId, u64)],
        purpose: ReadPurpose,
    ) -> Result<Box<dyn StreamReader>>;

    /// Offset of the oldest record still kept in `stream`.
    fn low_watermark(&self, stream: StreamId) -> Result<u64>;

    /// Offset after the newest record a reader can get from `stream` (embedded: the durable
    /// offset; Kafka: the high watermark).
    fn high_watermark(&self, stream: StreamId) -> Result<u64>;

    /// Registers a consumer whose progress retention must respect, where the backend's
    /// retention is Quiver's to decide (embedded); `initial(stream)` is what it recovered.
    fn register_consumer(
        &self,
        name: &str,
        retention: Retention,
        initial: &dyn Fn(StreamId) -> u64,
    ) -> Arc<Consumer>;

    /// Where consumers of this log keep local state (offset files).
    fn local_dir(&self) -> &Path;

    /// Records admitted and not yet acknowledged, over all streams.
    fn queued_records(&self) -> usize;

    /// Why appends are refused right now (a poisoned log), if they are.
    fn unavailable(&self) -> Option<String>;

    /// Periodic upkeep (retention); returns the log's bytes on disk when it keeps them.
    fn housekeeping(&self, now_ms: i64) -> Option<u64>;

    /// Completes or fails what is queued, then refuses appends.
    fn shutdown(&self);

    fn as_any(&self) -> &dyn Any;

    /// Streams of `partition`, ascending.
    fn partition_streams(&self, partition: u32) -> Vec<StreamId> {
        stream_ids(self.streams(), |s| s.partition == partition)
    }

    /// Streams that may carry records of `view`.
    fn view_streams(&self, view: &str) -> Vec<StreamId> {
        stream_ids(self.streams(), |s| s.carries(view))
    }
}

fn stream_ids(streams: &[StreamInfo], keep: impl Fn(&StreamInfo) -> bool) -> Vec<StreamId> {
    streams
        .iter()
        .enumerate()
        .filter(|(_, s)| keep(s))
        .map(|(i, _)| i as StreamId)
        .collect()
}

/// Reads several streams, each in order; records of different streams interleave freely.
pub trait StreamReader: Send {
    /// Reads up to `records_max` records, waiting up to `wait` for the first.
    fn poll(&mut self, records_max: usize, wait: Duration, out: &mut ReadBatch) -> Result<()>;

    /// Offset of the next record this reader returns from `stream`.
    fn position(&self, stream: StreamId) -> u64;

    /// The end of `stream` as last seen (for lag): what a reader can reach.
    fn end(&self, stream: StreamId) -> u64;

    /// When the backend last confirmed the ends this reader reports (embedded: always now;
    /// Kafka: the last time a broker answered). A reader caught up to ends confirmed long ago
    /// is not fresh: the staleness gauge counts from here.
    fn ends_confirmed_at(&self) -> std::time::Instant {
        std::time::Instant::now()
    }

    /// Moves `stream` to `offset` (after records were found deleted under the reader).
    fn seek(&mut self, stream: StreamId, offset: u64) -> Result<()>;

    /// The streams this reader reads.
    fn streams(&self) -> Vec<StreamId>;
}
