//! The history sink: every record of the log, written to PostgreSQL — the record of truth for
//! training and audits, demoted to a consumer (DESIGN.md §1). Laid out as Vector lays out its
//! sinks: `config` (options), `service` (PostgreSQL: migrations, one transaction per batch,
//! which errors to retry), `sink` (the per-partition loop), `read` (bulk point-in-time reads).
//!
//! # Design constraints
//! - One thread per partition reads the partition's streams (one with the embedded log, one
//!   per topic with Kafka) in order and writes batches of at most `batch_rows_max` rows, one
//!   transaction each. **The transaction also writes where the batch ends in each stream**
//!   (`<table>_offsets`, migration 5), so rows and offsets commit together: exactly once
//!   into PostgreSQL, and whichever node runs the partition's sink next (a cluster) resumes
//!   there. A local copy (consumer `history` in the log's `OffsetStore`) is written after the
//!   transaction; it tells retention what the sink still needs before PostgreSQL answers.
//! - Replays write no duplicates: rows are keyed on (log id, partition, offset), and rows with
//!   an `event_id` are also unique on (view, key, event_id); the INSERT does nothing on
//!   conflict. (So a duplicate `event_id` is kept once here however far apart it arrives;
//!   the store's dedup window is bounded, see `quiver_store::DedupWindow`.)
//! - **Nothing is lost silently.** The sink registers with the log as a consumer
//!   (`Log::register_consumer`): by default retention keeps every record it has not committed,
//!   however long PostgreSQL is away, up to `log.disk_bytes_max` (then ingest answers
//!   `503 DISK_FULL`). With `history.lossy = true` retention does not wait; every range it
//!   deletes first is counted (`quiver_history_lost_records_total`), logged as an error and
//!   written to `<table>_gaps` in the transaction of the next batch.
//! - PostgreSQL down or slow never touches ingest or serving: retriable errors (no SQLSTATE:
//!   connection refused or lost; classes 08, 40, 53, 57, 58) are retried with exponential
//!   backoff capped at `retry_delay_ms_max`, and the lag grows (`quiver_history_lag_records`).
//!   Any other error fails the same way every time: that partition's sink stops, says why
//!   (`quiver_history_stopped`, an error log line) and keeps its offset.
//! - The schema is Quiver's: numbered migrations, applied under an advisory lock on first
//!   connection, recorded in `<table>_migrations`. Quiver starts without PostgreSQL.
//!
//! Table (migration 1):
//! ```sql
//! <table> (log_id text, partition integer, log_offset bigint, view text, entity_key text,
//!          ts_ms bigint, append_ms bigint, event_id text NULL, "values" jsonb,
//!          PRIMARY KEY (log_id, partition, log_offset))
//! unique (view, entity_key, event_id) where event_id is not null; index (view, entity_key, ts_ms)
//! ```
//! `ts_ms` is event time, `append_ms` the time the log appended the record (what an
//! `as_served` point-in-time query needs to know what the online store could have seen).
//! Migration 2 adds `dedup_id` (hex), the record's dedup identity; migration 3 the
//! `<table>_gaps (log_id, partition, from_offset, to_offset, detected_at)` table.

mod config;
mod pg;
mod read;
mod service;
mod sink;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use parking_lot::Mutex;
use quiver_log::threads::PartitionThreads;
use quiver_log::{Consumer, EventLog, OffsetStore, Retention};

pub use config::HistoryOptions;
pub use pg::PgEndpoint;
pub use read::{collect_from_postgres, HistoryReader};

/// The sink's name among the log's consumers.
pub const CONSUMER: &str = "history";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Log(#[from] quiver_log::LogError),
    #[error("history: {0}")]
    Setup(String),
}

pub struct HistorySink {
    shared: Shared,
    /// One sink per partition whose history is written from here (a cluster moves them).
    workers: PartitionThreads,
    consumer: Arc<Consumer>,
    stopped: Arc<Mutex<Vec<(u32, String)>>>,
}

/// What every partition's sink, started now or later, is built from.
struct Shared {
    log: Arc<dyn EventLog>,
    opts: HistoryOptions,
    endpoint: PgEndpoint,
    offsets: OffsetStore,
    shared_offsets: Arc<Mutex<BTreeMap<u32, u64>>>,
    start_at: Vec<u64>,
}

impl HistorySink {
    /// Registers with the log (before anything can be deleted) and starts one thread per
    /// partition. Never waits for PostgreSQL.
    pub fn start(
        log: Arc<dyn EventLog>,
        opts: HistoryOptions,
    ) -> Result<HistorySink, HistoryError> {
        let all: Vec<u32> = (0..log.partitions()).collect();
        HistorySink::start_for(log, opts, &all)
    }

    /// [`HistorySink::start`] for `partitions` only (in a cluster, those this node is the
    /// acting primary of; [`HistorySink::add`] and [`HistorySink::remove`] move them).
    pub fn start_for(
        log: Arc<dyn EventLog>,
        opts: HistoryOptions,
        partitions: &[u32],
    ) -> Result<HistorySink, HistoryError> {
        let offsets = OffsetStore::open(&log.local_dir().join("offsets"))?;
        let stored = offsets.load(CONSUMER)?;
        // A sink new to this log starts at its oldest record: what was deleted before the sink
        // existed was never its to write.
        let start_at: Vec<u64> = (0..log.streams().len() as u32)
            .map(|s| match stored.get(&s) {
                Some(&o) => Ok(o),
                None => log.low_watermark(s),
            })
            .collect::<Result<_, _>>()?;
        let retention = if opts.lossy {
            Retention::Lossy
        } else {
            Retention::Protect
        };
        let consumer = log.register_consumer(CONSUMER, retention, &|s| start_at[s as usize]);
        let shared_offsets = Arc::new(Mutex::new(
            start_at
                .iter()
                .enumerate()
                .map(|(p, &o)| (p as u32, o))
                .collect::<BTreeMap<_, _>>(),
        ));
        if stored.len() != start_at.len() {
            // Record where this sink's history begins, before anything can be deleted: after
            // a restart, a range retention took meanwhile must show up as a gap, not be taken
            // for "before the sink existed".
            offsets.commit(CONSUMER, &shared_offsets.lock())?;
        }
        let endpoint = PgEndpoint::new(&opts.postgres_url, opts.ca_file.as_deref())
            .map_err(HistoryError::Setup)?;
        let sink = HistorySink {
            shared: Shared {
                log,
                opts,
                endpoint,
                offsets,
                shared_offsets,
                start_at,
            },
            workers: PartitionThreads::default(),
            consumer,
            stopped: Arc::new(Mutex::new(Vec::new())),
        };
        for &p in partitions {
            sink.add(p)?;
        }
        Ok(sink)
    }

    /// Starts partition `p`'s sink (no-op if it runs). It resumes where PostgreSQL says the
    /// partition stands, so a sink moved between nodes writes every row once.
    pub fn add(&self, p: u32) -> Result<(), HistoryError> {
        if self.workers.contains(p) {
            return Ok(());
        }
        let sh = &self.shared;
        let log = &sh.log;
        let streams: Vec<sink::Stream> = log
            .partition_streams(p)
            .into_iter()
            .map(|s| sink::Stream {
                id: s,
                log_id: log.streams()[s as usize].log_id.clone(),
                local: sh.start_at[s as usize],
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let w = sink::Worker {
            partition: p,
            log: log.clone(),
            streams,
            reader: None,
            service: service::Service::new(sh.endpoint.clone(), &sh.opts.table, p),
            opts: sh.opts.clone(),
            stop: stop.clone(),
            consumer: self.consumer.clone(),
            offsets: sh.offsets.clone(),
            shared_offsets: sh.shared_offsets.clone(),
            stopped: self.stopped.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("history-{p}"))
            .spawn(move || w.run())
            .map_err(|e| quiver_log::LogError::Io {
                path: log.local_dir().to_path_buf(),
                source: e,
            })?;
        self.workers.insert(p, stop, handle);
        Ok(())
    }

    /// Stops partition `p`'s sink (its last batch committed or rolled back).
    pub fn remove(&self, p: u32) {
        self.workers.stop(p);
    }

    /// The partitions whose sink runs here.
    pub fn partitions(&self) -> Vec<u32> {
        self.workers.partitions()
    }

    /// Partitions whose sink stopped on an error retrying cannot fix, and why.
    pub fn stopped(&self) -> Vec<(u32, String)> {
        self.stopped.lock().clone()
    }

    /// Offset after the last record of `stream` written and committed to PostgreSQL.
    pub fn committed_offset(&self, stream: u32) -> u64 {
        self.consumer.committed(stream)
    }

    pub fn shutdown(&self) {
        self.workers.stop_all();
    }
}

impl Drop for HistorySink {
    fn drop(&mut self) {
        self.shutdown();
    }
}
