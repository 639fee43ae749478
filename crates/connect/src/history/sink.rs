//! One partition's sink: read the log from the committed offset, write batches through the
//! [`Service`], commit the offset after each transaction, back off on retriable errors, stop
//! (loudly) on the others, and turn every range retention took from under it into a gap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::telemetry as t;
use quiver_log::{Consumer, Log, LogError, OffsetStore, PartitionReader, ReadBatch};

use super::service::{is_retriable, Batch, Service};
use super::{HistoryOptions, CONSUMER};

/// While PostgreSQL stays away, how often the sink says so again.
const WARN_EVERY: Duration = Duration::from_secs(30);

pub(crate) struct Worker {
    pub partition: u32,
    pub log: Arc<Log>,
    pub reader: PartitionReader,
    pub service: Service,
    pub opts: HistoryOptions,
    pub stop: Arc<AtomicBool>,
    pub consumer: Arc<Consumer>,
    pub offsets: OffsetStore,
    pub shared_offsets: Arc<Mutex<BTreeMap<u32, u64>>>,
    /// A gap found at start (the committed offset is older than the log's first record).
    pub initial_gap: Option<(u64, u64)>,
    /// Where a worker that stops on a non-retriable error says why (`HistorySink::stopped`).
    pub stopped: Arc<Mutex<Vec<(u32, String)>>>,
}

/// Why a worker ended.
enum Exit {
    Stopped,
    Failed(String),
}

impl Worker {
    pub fn run(mut self) {
        let p = self.partition;
        let stopped = metrics::gauge!(t::HISTORY_STOPPED, "partition" => p.to_string());
        stopped.set(0.0);
        match self.work() {
            Exit::Stopped => {}
            Exit::Failed(reason) => {
                stopped.set(1.0);
                self.stopped.lock().push((p, reason.clone()));
                tracing::error!(
                    partition = p,
                    committed = self.consumer.committed(p),
                    %reason,
                    "history sink stopped on an error retrying cannot fix; retention keeps its \
                     records (unless lossy) until it is fixed and Quiver restarted"
                );
            }
        }
    }

    fn work(&mut self) -> Exit {
        let p = self.partition;
        let lag = metrics::gauge!(t::HISTORY_LAG_RECORDS, "partition" => p.to_string());
        let written = metrics::counter!(t::HISTORY_ROWS_WRITTEN_TOTAL);
        let errors = metrics::counter!(t::HISTORY_ERRORS_TOTAL);
        let mut read = ReadBatch::default();
        let mut batch = Batch {
            end: self.reader.position(),
            ..Batch::default()
        };
        if let Some(gap) = self.initial_gap.take() {
            self.lost(gap, &mut batch);
        }
        let mut delay_ms = 0u64;
        let mut last_warn: Option<Instant> = None;
        while !self.stop.load(Ordering::Acquire) {
            let committed = self.consumer.committed(p);
            lag.set(self.reader.durable_offset().saturating_sub(committed) as f64);
            if !batch.needs_write() {
                if let Err(e) = self.fill(&mut read, &mut batch) {
                    return Exit::Failed(format!("cannot read the log: {e}"));
                }
                if !batch.needs_write() {
                    if batch.covers {
                        self.commit(batch.end);
                        batch.clear();
                    }
                    continue;
                }
            }
            if delay_ms > 0 {
                self.sleep(Duration::from_millis(delay_ms));
                if self.stop.load(Ordering::Acquire) {
                    break;
                }
            }
            match self.service.write(&batch) {
                Ok(()) => {
                    if last_warn.take().is_some() {
                        tracing::info!(partition = p, "history writes resumed");
                    }
                    written.increment(batch.rows.len() as u64);
                    self.commit(batch.end);
                    batch.clear();
                    delay_ms = 0;
                }
                Err(e) if is_retriable(&e) => {
                    errors.increment(1);
                    delay_ms = (delay_ms * 2).clamp(100, self.opts.retry_delay_ms_max.max(100));
                    // One line per outage and one every WARN_EVERY while it lasts, not one per retry.
                    if last_warn.is_none_or(|t: Instant| t.elapsed() >= WARN_EVERY) {
                        last_warn = Some(Instant::now());
                        tracing::warn!(partition = p, error = %e, retry_in_ms = delay_ms, lag = self.reader.durable_offset().saturating_sub(committed), "history write failed; retrying");
                    }
                }
                Err(e) => {
                    errors.increment(1);
                    return Exit::Failed(format!("PostgreSQL refused a batch: {e}"));
                }
            }
        }
        Exit::Stopped
    }

    /// Reads the next records into `batch`, first turning any range retention deleted under
    /// the reader into a gap.
    fn fill(&mut self, read: &mut ReadBatch, batch: &mut Batch) -> Result<(), LogError> {
        let p = self.partition;
        let first = self.log.first_offset(p);
        if self.reader.position() < first {
            self.lost((self.reader.position(), first), batch);
            self.reader = self.log.reader(p, first)?;
            return Ok(());
        }
        match self
            .reader
            .poll(self.opts.batch_rows_max, Duration::from_millis(100), read)
        {
            // Deleted between the check and the read: the next call records the gap.
            Err(LogError::OffsetOutOfRange { .. }) => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        for rec in read.iter() {
            match quiver_core::record::decode(rec.payload) {
                Ok(r) => push_row(batch, rec.offset, rec.append_ms, &r, rec.payload),
                Err(e) => {
                    tracing::error!(partition = p, offset = rec.offset, error = %e, "undecodable record not written to history")
                }
            }
        }
        if !read.is_empty() {
            batch.covers = true;
            batch.end = self.reader.position();
        }
        Ok(())
    }

    /// Records `[from, to)` as lost: counted, logged as an error, written to the gaps table
    /// with the next batch.
    fn lost(&self, (from, to): (u64, u64), batch: &mut Batch) {
        assert!(from < to, "a gap covers at least one record");
        metrics::counter!(t::HISTORY_LOST_RECORDS_TOTAL).increment(to - from);
        tracing::error!(
            partition = self.partition,
            from,
            to,
            lossy = self.opts.lossy,
            "retention deleted records the history sink never wrote; recorded in {}_gaps",
            self.opts.table
        );
        batch.gaps.push((from, to));
        batch.covers = true;
        batch.end = batch.end.max(to);
    }

    fn commit(&self, offset: u64) {
        self.consumer.commit(self.partition, offset);
        let mut all = self.shared_offsets.lock();
        all.insert(self.partition, offset);
        if let Err(e) = self.offsets.commit(CONSUMER, &all) {
            // PostgreSQL has the rows; a lost offset only means a replay that writes nothing.
            tracing::error!(error = %e, "could not commit the history sink's offset");
        }
    }

    /// Sleeps in short steps so that shutdown is never held up by a long backoff.
    fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20).min(until - Instant::now()));
        }
    }
}

/// One log record as a history row.
pub(crate) fn push_row(
    batch: &mut Batch,
    offset: u64,
    append_ms: i64,
    r: &quiver_core::record::Record<'_>,
    payload: &[u8],
) {
    let values: serde_json::Map<String, serde_json::Value> = r
        .values
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_json()))
        .collect();
    let rows = &mut batch.rows;
    rows.offsets.push(offset as i64);
    rows.views.push(r.view.to_string());
    rows.keys.push(r.key.to_string());
    rows.ts.push(r.ts_ms);
    rows.appended.push(append_ms);
    rows.event_ids.push(r.event_id.map(str::to_string));
    rows.dedup_ids.push(r.dedup.map(|d| format!("{d:032x}")));
    rows.values
        .push(serde_json::Value::Object(values).to_string());
    rows.payloads.push(payload.to_vec());
}
