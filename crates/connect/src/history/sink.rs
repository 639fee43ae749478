//! One partition's sink: find where PostgreSQL says it stands, read the partition's streams
//! from there, write batches (rows + offsets in one transaction) through the [`Service`],
//! back off on retriable errors, stop (loudly) on the others, and turn every range retention
//! took from under it into a gap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::telemetry as t;
use quiver_log::{Consumer, EventLog, LogError, OffsetStore, ReadBatch, StreamId, StreamReader};

use super::service::{is_retriable, Batch, Service};
use super::{HistoryOptions, CONSUMER};

/// While PostgreSQL stays away, how often the sink says so again.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// One stream of the partition.
pub(crate) struct Stream {
    pub id: StreamId,
    pub log_id: String,
    /// Where the local offset file says the sink stands (PostgreSQL's word wins).
    pub local: u64,
}

pub(crate) struct Worker {
    pub partition: u32,
    pub log: Arc<dyn EventLog>,
    pub streams: Vec<Stream>,
    /// Opened once PostgreSQL has said where the sink stands.
    pub reader: Option<Box<dyn StreamReader>>,
    pub service: Service,
    pub opts: HistoryOptions,
    pub stop: Arc<AtomicBool>,
    pub consumer: Arc<Consumer>,
    pub offsets: OffsetStore,
    pub shared_offsets: Arc<Mutex<BTreeMap<u32, u64>>>,
    /// Where a worker that stops on a non-retriable error says why (`HistorySink::stopped`).
    pub stopped: Arc<Mutex<Vec<(u32, String)>>>,
}

/// Why a worker ended.
enum Exit {
    Stopped,
    Failed(String),
}

/// Retries with exponential backoff, and says so once per outage and every `WARN_EVERY`.
struct Backoff {
    delay_ms: u64,
    max_ms: u64,
    last_warn: Option<Instant>,
}

impl Backoff {
    fn failed(&mut self, partition: u32, what: &str, error: &dyn std::fmt::Display, lag: u64) {
        self.delay_ms = (self.delay_ms * 2).clamp(100, self.max_ms.max(100));
        if self.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            self.last_warn = Some(Instant::now());
            tracing::warn!(partition, %error, retry_in_ms = self.delay_ms, lag, "{what} failed; retrying");
        }
    }

    fn succeeded(&mut self, partition: u32) {
        if self.last_warn.take().is_some() {
            tracing::info!(partition, "history writes resumed");
        }
        self.delay_ms = 0;
    }
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
        let mut batch = Batch::default();
        let mut backoff = Backoff {
            delay_ms: 0,
            max_ms: self.opts.retry_delay_ms_max,
            last_warn: None,
        };
        while !self.stop.load(Ordering::Acquire) {
            if backoff.delay_ms > 0 {
                self.sleep(Duration::from_millis(backoff.delay_ms));
                if self.stop.load(Ordering::Acquire) {
                    break;
                }
            }
            if self.reader.is_none() {
                match self.open(&mut batch) {
                    Ok(()) => backoff.succeeded(p),
                    Err(e) if is_retriable(&e) => {
                        errors.increment(1);
                        lag.set(self.lag() as f64);
                        backoff.failed(p, "reading the history sink's offsets", &e, self.lag());
                        continue;
                    }
                    Err(e) => {
                        return Exit::Failed(format!("PostgreSQL refused the offsets query: {e}"))
                    }
                }
            }
            lag.set(self.lag() as f64);
            if !batch.needs_write() {
                if let Err(e) = self.fill(&mut read, &mut batch) {
                    return Exit::Failed(format!("cannot read the log: {e}"));
                }
                if !batch.needs_write() {
                    if batch.covers() {
                        self.commit(&batch);
                        batch.clear();
                    }
                    continue;
                }
            }
            match self.service.write(&batch) {
                Ok(()) => {
                    backoff.succeeded(p);
                    written.increment(batch.rows.len() as u64);
                    self.commit(&batch);
                    batch.clear();
                }
                Err(e) if is_retriable(&e) => {
                    errors.increment(1);
                    backoff.failed(p, "history write", &e, self.lag());
                }
                Err(e) => {
                    errors.increment(1);
                    return Exit::Failed(format!("PostgreSQL refused a batch: {e}"));
                }
            }
        }
        Exit::Stopped
    }

    /// Asks PostgreSQL where the sink stands in each stream (falling back to the local file
    /// for streams it has no row of) and opens the reader there; a range the log no longer
    /// has becomes a gap of the first batch.
    fn open(&mut self, batch: &mut Batch) -> Result<(), postgres::Error> {
        let stored = self.service.offsets()?;
        let mut from = Vec::with_capacity(self.streams.len());
        for s in &self.streams {
            let at = stored.get(&s.log_id).copied().unwrap_or(s.local);
            from.push((s.id, at));
        }
        match self.open_reader(&from, batch) {
            Ok(()) => Ok(()),
            Err(e) => {
                // The log itself failed (a broker away): try again like a lost connection.
                tracing::warn!(partition = self.partition, error = %e, "history sink cannot open the log yet");
                self.reader = None;
                Ok(())
            }
        }
    }

    fn open_reader(&mut self, from: &[(StreamId, u64)], batch: &mut Batch) -> Result<(), LogError> {
        let mut start = Vec::with_capacity(from.len());
        for &(s, at) in from {
            let first = self.log.low_watermark(s)?;
            if at < first {
                self.lost(s, (at, first), batch);
            }
            self.consumer.commit(s, at);
            start.push((s, at.max(first)));
        }
        self.reader = Some(
            self.log
                .open_reader(&start, quiver_log::ReadPurpose::Archive)?,
        );
        Ok(())
    }

    /// Records in the log the sink has not committed yet, over the partition's streams.
    fn lag(&self) -> u64 {
        self.streams
            .iter()
            .map(|s| {
                let end = match &self.reader {
                    Some(reader) => reader.end(s.id),
                    // Not reading yet (PostgreSQL has not answered): ask the log.
                    None => self.log.high_watermark(s.id).unwrap_or(0),
                };
                end.saturating_sub(self.consumer.committed(s.id))
            })
            .sum()
    }

    /// Reads the next records into `batch`, first turning any range retention deleted under
    /// the reader into a gap.
    fn fill(&mut self, read: &mut ReadBatch, batch: &mut Batch) -> Result<(), LogError> {
        let reader = self.reader.as_mut().expect("opened before filling");
        let mut deleted = Vec::new();
        for s in &self.streams {
            let first = self.log.low_watermark(s.id)?;
            if reader.position(s.id) < first {
                deleted.push((s.id, reader.position(s.id), first));
            }
        }
        if !deleted.is_empty() {
            for (s, from, to) in deleted {
                self.lost(s, (from, to), batch);
                self.reader.as_mut().expect("open").seek(s, to)?;
            }
            return Ok(());
        }
        match reader.poll(self.opts.batch_rows_max, Duration::from_millis(100), read) {
            // Deleted between the check and the read: the next call records the gap.
            Err(LogError::OffsetOutOfRange { .. }) => return Ok(()),
            Err(e) => return Err(e),
            Ok(()) => {}
        }
        for rec in read.iter() {
            let log_id = &self.log.streams()[rec.stream as usize].log_id;
            match quiver_core::record::decode(rec.payload) {
                Ok(r) => push_row(batch, log_id, rec.offset, rec.append_ms, &r, rec.payload),
                Err(e) => {
                    tracing::error!(partition = self.partition, stream = rec.stream, offset = rec.offset, error = %e, "undecodable record not written to history")
                }
            }
        }
        if !read.is_empty() {
            for s in &self.streams {
                let at = reader.position(s.id);
                if at > self.consumer.committed(s.id) {
                    batch.covered(&s.log_id, at);
                }
            }
        }
        Ok(())
    }

    /// Records `[from, to)` of `stream` as lost: counted, logged as an error, written to the
    /// gaps table with the next batch.
    fn lost(&self, stream: StreamId, (from, to): (u64, u64), batch: &mut Batch) {
        assert!(from < to, "a gap covers at least one record");
        metrics::counter!(t::HISTORY_LOST_RECORDS_TOTAL).increment(to - from);
        let log_id = &self.log.streams()[stream as usize].log_id;
        tracing::error!(
            partition = self.partition,
            stream,
            from,
            to,
            lossy = self.opts.lossy,
            "retention deleted records the history sink never wrote; recorded in {}_gaps",
            self.opts.table
        );
        batch.gaps.push((log_id.clone(), from, to));
        batch.covered(log_id, to);
    }

    /// After a transaction: tells retention, then the local offset file.
    fn commit(&self, batch: &Batch) {
        let mut all = self.shared_offsets.lock();
        for s in &self.streams {
            if let Some(&end) = batch.ends.get(&s.log_id) {
                self.consumer.commit(s.id, end);
                all.insert(s.id, self.consumer.committed(s.id));
            }
        }
        if let Err(e) = self.offsets.commit(CONSUMER, &all) {
            // PostgreSQL has the rows and the offsets; the local copy only guides retention.
            tracing::error!(error = %e, "could not commit the history sink's local offsets");
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
    log_id: &str,
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
    rows.log_ids.push(log_id.to_string());
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
