//! One materializer thread per log partition: reads durable records in log order, applies
//! them to the store, publishes the applied offset (for `Quiver-Read-After`), and snapshots
//! the partition periodically and at shutdown.
//!
//! Start-up recovery, per partition: load the snapshot, replay the log from the snapshot's
//! offset. The store reports itself recovered once every partition has applied everything
//! that was durable when the server started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::record;
use quiver_core::telemetry as t;
use quiver_log::{Consumer, Log, OffsetStore, PartitionReader, ReadBatch, Retention};

use crate::{snapshot, Applied, DedupWindow, Result, Store};

/// The materializer's name in the log's consumer offsets.
pub const CONSUMER: &str = "materializer";

#[derive(Debug, Clone)]
pub struct MaterializerOptions {
    pub snapshot_dir: PathBuf,
    pub snapshot_interval: Duration,
    pub dedup_window_events: usize,
    /// Records applied per read from the log (bounds the read buffer).
    pub poll_records_max: usize,
}

pub struct Materializers {
    stop: Arc<AtomicBool>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    errors: Arc<Mutex<Vec<String>>>,
}

struct Worker {
    partition: u32,
    store: Arc<Store>,
    log: Arc<Log>,
    offsets: OffsetStore,
    committed: Arc<Mutex<BTreeMap<u32, u64>>>,
    consumer: Arc<Consumer>,
    reader: PartitionReader,
    dedup: DedupWindow,
    opts: MaterializerOptions,
    recovery_target: u64,
    recovered: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Materializers {
    /// Loads snapshots and starts one thread per partition.
    pub fn start(
        store: Arc<Store>,
        log: Arc<Log>,
        opts: MaterializerOptions,
    ) -> Result<Materializers> {
        assert_eq!(
            store.partitions(),
            log.partitions(),
            "store and log agree on partitions"
        );
        let offsets = OffsetStore::open(&log.dir().join("offsets"))?;
        let committed = Arc::new(Mutex::new(offsets.load(CONSUMER)?));
        // Retention keeps everything after each partition's last snapshot: recovery replays it.
        let consumer = log.register_consumer(CONSUMER, Retention::Protect, |_| 0);
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let recovered = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for p in 0..log.partitions() {
            let (mut from, dedup) = match snapshot::load(
                &opts.snapshot_dir,
                &store,
                p,
                opts.dedup_window_events,
            ) {
                Ok(Some((offset, dedup))) => (offset, dedup),
                Ok(None) => (0, DedupWindow::new(opts.dedup_window_events)),
                Err(e) => {
                    tracing::error!(partition = p, error = %e, "ignoring a bad snapshot; replaying the whole log");
                    (0, DedupWindow::new(opts.dedup_window_events))
                }
            };
            let (first, next) = (log.first_offset(p), log.next_offset(p));
            if from > next {
                // Only possible with `fsync = never`: the snapshot saw records the crash took
                // from the log. Offsets will be reused, so the snapshot cannot be trusted.
                tracing::error!(
                    partition = p,
                    snapshot = from,
                    log_end = next,
                    "snapshot is ahead of the log; discarding it"
                );
                return Err(crate::StoreError::CorruptSnapshot {
                    path: snapshot::snapshot_path(&opts.snapshot_dir, p),
                    reason: format!(
                        "covers offset {from} but the log ends at {next} (records lost with fsync = never?); \
                         remove the snapshot to rebuild from the log"
                    ),
                });
            }
            if from < first {
                tracing::error!(
                    partition = p,
                    from,
                    first,
                    "retention deleted records no snapshot covers; they are lost"
                );
                from = first;
            }
            store.set_applied(p, from);
            consumer.commit(p, from);
            let reader = log.reader(p, from)?;
            workers.push(Worker {
                partition: p,
                store: store.clone(),
                log: log.clone(),
                offsets: offsets.clone(),
                committed: committed.clone(),
                consumer: consumer.clone(),
                reader,
                dedup,
                opts: opts.clone(),
                recovery_target: log.durable_offset(p),
                recovered: recovered.clone(),
                stop: stop.clone(),
                errors: errors.clone(),
            });
        }
        let mut handles = Vec::new();
        for w in workers {
            let name = format!("materializer-{}", w.partition);
            let (p, errors) = (w.partition, w.errors.clone());
            // A bug that panics must not leave a dead partition behind a ready server.
            let run = move || {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.run())).is_err() {
                    errors
                        .lock()
                        .push(format!("partition {p}: materializer panicked"));
                }
            };
            handles.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(run)
                    .expect("spawn a thread"),
            );
        }
        Ok(Materializers {
            stop,
            handles: Mutex::new(handles),
            errors,
        })
    }

    /// Problems that stopped a partition (a corrupt record, an unwritable snapshot).
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().clone()
    }

    /// Stops every thread after a final snapshot.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for h in self.handles.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Materializers {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Worker {
    fn run(mut self) {
        let p = self.partition;
        let label = p.to_string();
        let lag = metrics::gauge!(t::MATERIALIZER_LAG_RECORDS, "partition" => label.clone());
        let applied_gauge = metrics::gauge!(t::MATERIALIZER_APPLIED_OFFSET, "partition" => label);
        let applied_total = metrics::counter!(t::EVENTS_APPLIED_TOTAL);
        let dup_total = metrics::counter!(t::EVENTS_DUPLICATE_TOTAL);
        let late_total = metrics::counter!(t::VALUES_LATE_TOTAL);
        let late_aggs_total = metrics::counter!(t::AGGREGATION_LATE_DROPPED_TOTAL);
        let mut batch = ReadBatch::default();
        let mut last_snapshot = Instant::now();
        let mut snapshotted = self.reader.position();
        let mut recovered = false;
        loop {
            if !recovered && self.reader.position() >= self.recovery_target {
                recovered = true;
                if self.recovered.fetch_add(1, Ordering::AcqRel) + 1
                    == self.log.partitions() as usize
                {
                    self.store.set_recovered();
                    tracing::info!(rows = self.store.rows(), "store recovered");
                }
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if let Err(e) = self.reader.poll(
                self.opts.poll_records_max,
                Duration::from_millis(50),
                &mut batch,
            ) {
                self.fail(format!("partition {p}: {e}"));
                return;
            }
            let mut late = crate::LateCounts::default();
            for rec in batch.iter() {
                match record::decode(rec.payload) {
                    Ok(decoded) => {
                        match self
                            .store
                            .apply(p, rec.offset, &decoded, &mut self.dedup, &mut late)
                        {
                            Applied::Changed | Applied::Late => applied_total.increment(1),
                            Applied::Duplicate => dup_total.increment(1),
                            Applied::Skipped => {}
                        }
                    }
                    // The frame checksum passed, so these bytes are what was written: a record
                    // this version cannot decode. Skip it loudly rather than stop the partition.
                    Err(e) => {
                        tracing::error!(partition = p, offset = rec.offset, error = %e, "undecodable record skipped")
                    }
                }
            }
            late_total.increment(late.values);
            late_aggs_total.increment(late.aggregations);
            let position = self.reader.position();
            if !batch.is_empty() {
                self.store.set_applied(p, position);
            }
            applied_gauge.set(position as f64);
            lag.set(self.reader.durable_offset().saturating_sub(position) as f64);
            if position > snapshotted && last_snapshot.elapsed() >= self.opts.snapshot_interval {
                if let Err(e) = self.snapshot(position) {
                    self.fail(format!("partition {p}: snapshot failed: {e}"));
                    return;
                }
                snapshotted = position;
                last_snapshot = Instant::now();
            }
        }
        let position = self.reader.position();
        if position > snapshotted {
            if let Err(e) = self.snapshot(position) {
                tracing::error!(partition = p, error = %e, "final snapshot failed");
            }
        }
    }

    fn snapshot(&mut self, offset: u64) -> Result<()> {
        let started = Instant::now();
        let bytes = snapshot::write(
            &self.opts.snapshot_dir,
            &self.store,
            self.partition,
            offset,
            &self.dedup,
        )?;
        let mut committed = self.committed.lock();
        committed.insert(self.partition, offset);
        self.offsets.commit(CONSUMER, &committed)?;
        drop(committed);
        // Only once the snapshot and its offset are durable may retention pass it.
        self.consumer.commit(self.partition, offset);
        metrics::histogram!(t::SNAPSHOT_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::debug!(
            partition = self.partition,
            offset,
            bytes,
            "snapshot written"
        );
        Ok(())
    }

    fn fail(&self, message: String) {
        tracing::error!(%message, "materializer stopped");
        self.errors.lock().push(message);
    }
}
