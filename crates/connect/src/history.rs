//! The history sink: every record of the log, written to PostgreSQL — the record of truth for
//! training and audits, demoted to a consumer (DESIGN.md §1).
//!
//! # Design constraints
//! - One thread per partition reads the log from the sink's own committed offset (consumer
//!   `history` in the log's `OffsetStore`), in log order, and writes batches of at most
//!   `batch_rows_max` rows, one transaction each. The offset is committed after the
//!   transaction, so a crash between the two replays the batch.
//! - Replays write no duplicates: rows are keyed on (log id, partition, offset), and rows with
//!   an `event_id` are also unique on (view, key, event_id); the INSERT does nothing on
//!   conflict. (So a duplicate `event_id` is kept once here however far apart it arrives;
//!   the store's dedup window is bounded, see `quiver_store::DedupWindow`.)
//! - PostgreSQL down or slow never touches ingest or serving: the sink's threads retry with
//!   exponential backoff (capped at `retry_delay_ms_max`), its lag grows
//!   (`quiver_history_lag_records`), and the log keeps what the sink has not committed
//!   (retention protects it), so it catches up without loss.
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
//! `ts_ms` is event time, `append_ms` the time the log appended the record (what a
//! point-in-time query needs to know what the online store could have seen). Migration 2 adds
//! `dedup_id` (hex), the record's dedup identity.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quiver_core::telemetry as t;
use quiver_log::{Log, OffsetStore, PartitionReader, ReadBatch};
use quiver_store::pit as quiver_store_pit;

/// The sink's name among the log's consumers.
pub const CONSUMER: &str = "history";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Log(#[from] quiver_log::LogError),
}

#[derive(Debug, Clone)]
pub struct HistoryOptions {
    pub postgres_url: String,
    pub table: String,
    pub batch_rows_max: usize,
    pub retry_delay_ms_max: u64,
}

impl HistoryOptions {
    pub fn from_config(c: &quiver_core::config::HistoryConfig) -> Option<HistoryOptions> {
        Some(HistoryOptions {
            postgres_url: c.postgres_url.clone()?,
            table: c.table.clone(),
            batch_rows_max: c.batch_rows_max,
            retry_delay_ms_max: c.retry_delay_ms_max,
        })
    }
}

/// The numbered migrations; `{table}` is replaced by the configured table name.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"CREATE TABLE IF NOT EXISTS {table} (
        log_id text NOT NULL,
        partition integer NOT NULL,
        log_offset bigint NOT NULL,
        view text NOT NULL,
        entity_key text NOT NULL,
        ts_ms bigint NOT NULL,
        append_ms bigint NOT NULL,
        event_id text,
        "values" jsonb NOT NULL,
        PRIMARY KEY (log_id, partition, log_offset)
    );
    CREATE UNIQUE INDEX IF NOT EXISTS {table}_event_id ON {table} (view, entity_key, event_id) WHERE event_id IS NOT NULL;
    CREATE INDEX IF NOT EXISTS {table}_entity_time ON {table} (view, entity_key, ts_ms);"#,
    ),
    (
        2,
        // The record's dedup identity (from event_id, or from Idempotency-Key + position), so that
        // point-in-time replay skips exactly the duplicates the online store skipped.
        r#"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS dedup_id text;"#,
    ),
];

pub struct HistorySink {
    stop: Arc<AtomicBool>,
    handles: Mutex<Vec<JoinHandle<()>>>,
    committed: Arc<Vec<AtomicU64>>,
}

impl HistorySink {
    /// Starts one thread per partition. Never waits for PostgreSQL.
    pub fn start(log: Arc<Log>, opts: HistoryOptions) -> Result<HistorySink, HistoryError> {
        let offsets = OffsetStore::open(&log.dir().join("offsets"))?;
        let stored = offsets.load(CONSUMER)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut start_at = Vec::new();
        for p in 0..log.partitions() {
            let first = log.first_offset(p);
            let from = stored.get(&p).copied().unwrap_or(first);
            if from < first {
                tracing::error!(
                    partition = p,
                    from,
                    first,
                    "retention deleted records the history sink never wrote"
                );
            }
            start_at.push(from.max(first));
        }
        let committed = Arc::new(
            start_at
                .iter()
                .map(|&o| AtomicU64::new(o))
                .collect::<Vec<_>>(),
        );
        let shared_offsets = Arc::new(Mutex::new(
            start_at
                .iter()
                .enumerate()
                .map(|(p, &o)| (p as u32, o))
                .collect::<BTreeMap<_, _>>(),
        ));
        let mut handles = Vec::new();
        for (p, &from) in start_at.iter().enumerate() {
            let w = Worker {
                partition: p as u32,
                reader: log.reader(p as u32, from)?,
                log_id: log.id().to_string(),
                opts: opts.clone(),
                stop: stop.clone(),
                committed: committed.clone(),
                offsets: offsets.clone(),
                shared_offsets: shared_offsets.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("history-{p}"))
                .spawn(move || w.run())
                .map_err(|e| quiver_log::LogError::Io {
                    path: log.dir().to_path_buf(),
                    source: e,
                })?;
            handles.push(handle);
        }
        Ok(HistorySink {
            stop,
            handles: Mutex::new(handles),
            committed,
        })
    }

    /// Offset after the last record of `partition` written and committed to PostgreSQL.
    pub fn committed_offset(&self, partition: u32) -> u64 {
        self.committed[partition as usize].load(Ordering::Acquire)
    }

    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        for h in self.handles.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for HistorySink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    partition: u32,
    reader: PartitionReader,
    log_id: String,
    opts: HistoryOptions,
    stop: Arc<AtomicBool>,
    committed: Arc<Vec<AtomicU64>>,
    offsets: OffsetStore,
    shared_offsets: Arc<Mutex<BTreeMap<u32, u64>>>,
}

/// Columns of the rows of one batch, as the INSERT's `unnest` takes them.
#[derive(Default)]
struct Rows {
    offsets: Vec<i64>,
    views: Vec<String>,
    keys: Vec<String>,
    ts: Vec<i64>,
    appended: Vec<i64>,
    event_ids: Vec<Option<String>>,
    dedup_ids: Vec<Option<String>>,
    values: Vec<String>,
}

impl Rows {
    fn len(&self) -> usize {
        self.offsets.len()
    }

    fn clear(&mut self) {
        *self = Rows::default();
    }
}

impl Worker {
    fn run(mut self) {
        let p = self.partition;
        let label = p.to_string();
        let lag = metrics::gauge!(t::HISTORY_LAG_RECORDS, "partition" => label);
        let written = metrics::counter!(t::HISTORY_ROWS_WRITTEN_TOTAL);
        let errors = metrics::counter!(t::HISTORY_ERRORS_TOTAL);
        let mut batch = ReadBatch::default();
        let mut rows = Rows::default();
        let mut rows_end = self.reader.position();
        let mut client: Option<postgres::Client> = None;
        let mut delay_ms = 0u64;
        let insert_sql = format!(
            "INSERT INTO {t} (log_id, partition, log_offset, view, entity_key, ts_ms, append_ms, event_id, dedup_id, \"values\") \
             SELECT $1, $2, o, v, k, ts, a, e, d, j::jsonb \
             FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[]) AS u(o, v, k, ts, a, e, d, j) \
             ON CONFLICT DO NOTHING",
            t = self.opts.table
        );
        while !self.stop.load(Ordering::Acquire) {
            lag.set(
                self.reader
                    .durable_offset()
                    .saturating_sub(self.committed[p as usize].load(Ordering::Relaxed))
                    as f64,
            );
            if rows.len() == 0 {
                if let Err(e) = self.reader.poll(
                    self.opts.batch_rows_max,
                    Duration::from_millis(100),
                    &mut batch,
                ) {
                    tracing::error!(partition = p, error = %e, "history sink stopped: cannot read the log");
                    return;
                }
                for rec in batch.iter() {
                    match quiver_core::record::decode(rec.payload) {
                        Ok(r) => {
                            let values: serde_json::Map<String, serde_json::Value> = r
                                .values
                                .iter()
                                .map(|(n, v)| (n.to_string(), v.to_json()))
                                .collect();
                            rows.offsets.push(rec.offset as i64);
                            rows.views.push(r.view.to_string());
                            rows.keys.push(r.key.to_string());
                            rows.ts.push(r.ts_ms);
                            rows.appended.push(rec.append_ms);
                            rows.event_ids.push(r.event_id.map(str::to_string));
                            rows.dedup_ids.push(r.dedup.map(|d| format!("{d:032x}")));
                            rows.values
                                .push(serde_json::Value::Object(values).to_string());
                        }
                        Err(e) => {
                            tracing::error!(partition = p, offset = rec.offset, error = %e, "undecodable record not written to history")
                        }
                    }
                }
                rows_end = self.reader.position();
                if rows.len() == 0 {
                    if !batch.is_empty() {
                        self.commit(rows_end);
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
            let result = (|| -> Result<u64, postgres::Error> {
                if client.is_none() {
                    let mut c =
                        postgres::Client::connect(&self.opts.postgres_url, postgres::NoTls)?;
                    migrate(&mut c, &self.opts.table)?;
                    client = Some(c);
                }
                let c = client.as_mut().expect("connected above");
                let started = Instant::now();
                let n = c.execute(
                    insert_sql.as_str(),
                    &[
                        &self.log_id,
                        &(p as i32),
                        &rows.offsets,
                        &rows.views,
                        &rows.keys,
                        &rows.ts,
                        &rows.appended,
                        &rows.event_ids,
                        &rows.dedup_ids,
                        &rows.values,
                    ],
                )?;
                metrics::histogram!(t::HISTORY_WRITE_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                Ok(n)
            })();
            match result {
                Ok(_) => {
                    written.increment(rows.len() as u64);
                    rows.clear();
                    self.commit(rows_end);
                    delay_ms = 0;
                }
                Err(e) => {
                    errors.increment(1);
                    client = None;
                    delay_ms = (delay_ms * 2).clamp(100, self.opts.retry_delay_ms_max.max(100));
                    tracing::warn!(partition = p, error = %e, retry_in_ms = delay_ms, "history write failed; will retry");
                }
            }
        }
    }

    fn commit(&self, offset: u64) {
        self.committed[self.partition as usize].store(offset, Ordering::Release);
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

/// Applies the migrations this table has not had, under a lock so that concurrent sinks
/// (one per partition, or several nodes) do not race.
fn migrate(client: &mut postgres::Client, table: &str) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1)::bigint)",
        &[&table],
    )?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {table}_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    ))?;
    let applied: Vec<i32> = tx
        .query(&format!("SELECT version FROM {table}_migrations"), &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for (version, sql) in MIGRATIONS {
        if !applied.contains(version) {
            tx.batch_execute(&sql.replace("{table}", table))?;
            tx.execute(
                &format!("INSERT INTO {table}_migrations (version) VALUES ($1)"),
                &[version],
            )?;
            tracing::info!(table, version, "history migration applied");
        }
    }
    tx.commit()
}

/// Point-in-time source: the rows of `keys` in `view` that this log (`log_id`) wrote, per key,
/// in log order, re-encoded as log payloads for `quiver_store::pit::replay_at`. Features the
/// current schema no longer has (or types it changed) are left out, as replay of the log would.
pub fn collect_from_postgres(
    url: &str,
    table: &str,
    log_id: &str,
    schema: &quiver_core::Schema,
    view: &str,
    keys: &[String],
) -> Result<
    std::collections::HashMap<String, Vec<(u32, quiver_store_pit::HistoryRecord)>>,
    postgres::Error,
> {
    use quiver_core::value::{FeatureType, Value};
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let Some(v) = schema.view_by_name(view) else {
        return Ok(Default::default());
    };
    let sql = format!(
        "SELECT entity_key, partition, log_offset, ts_ms, append_ms, event_id, dedup_id, \"values\"::text FROM {table} \
         WHERE log_id = $1 AND view = $2 AND entity_key = ANY($3) ORDER BY partition, log_offset"
    );
    let mut out: std::collections::HashMap<String, Vec<(u32, quiver_store_pit::HistoryRecord)>> =
        Default::default();
    for row in client.query(&sql, &[&log_id, &view, &keys])? {
        let key: String = row.get(0);
        let partition: i32 = row.get(1);
        let offset: i64 = row.get(2);
        let values: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(row.get::<_, &str>(7)).unwrap_or_default();
        let mut typed: Vec<(u16, Value)> = values
            .iter()
            .filter_map(|(name, j)| {
                let f = v.feature_index(name)?;
                let value = match (v.feature(f).ty, j) {
                    (_, serde_json::Value::Null) => Value::Null,
                    (FeatureType::F64, j) => Value::F64(j.as_f64()?),
                    (FeatureType::I64, j) => Value::I64(j.as_i64()?),
                    (FeatureType::Bool, j) => Value::Bool(j.as_bool()?),
                    (FeatureType::String, j) => Value::Str(j.as_str()?.into()),
                    (FeatureType::F32s(_), serde_json::Value::Array(xs)) => Value::F32s(
                        xs.iter()
                            .map(|x| x.as_f64().map(|x| x as f32))
                            .collect::<Option<Vec<f32>>>()?
                            .into(),
                    ),
                    _ => return None,
                };
                value.fits(v.feature(f).ty).then_some((f, value))
            })
            .collect();
        if typed.is_empty() {
            continue;
        }
        typed.sort_by_key(|(f, _)| *f);
        let event = quiver_core::event::Event {
            view: v.id,
            key: key.clone(),
            ts_ms: row.get(3),
            event_id: row.get(5),
            values: typed,
        };
        let dedup = row
            .get::<_, Option<&str>>(6)
            .and_then(|h| u128::from_str_radix(h, 16).ok());
        let mut payload = Vec::new();
        quiver_core::record::encode(schema, &event, dedup, &mut payload);
        out.entry(key).or_default().push((
            partition as u32,
            quiver_store_pit::HistoryRecord {
                offset: offset as u64,
                append_ms: row.get(4),
                payload,
            },
        ));
    }
    Ok(out)
}
