//! The PostgreSQL side of the sink: migrations, one batch (rows and gaps) per transaction, and
//! which errors are worth retrying (Vector's `RetryLogic::is_retriable_error`).

use std::collections::BTreeMap;
use std::time::Instant;

use quiver_core::telemetry as t;

use super::PgEndpoint;

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
    (
        3,
        // Ranges of the log that retention deleted before the sink wrote them: a loss is a row
        // here, never silence.
        r#"CREATE TABLE IF NOT EXISTS {table}_gaps (
        log_id text NOT NULL,
        partition integer NOT NULL,
        from_offset bigint NOT NULL,
        to_offset bigint NOT NULL,
        detected_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (log_id, partition, from_offset)
    );"#,
    ),
    (
        4,
        // The log record verbatim: point-in-time reads replay exactly the bytes the online
        // store applied, without parsing JSON back (rows from before it fall back to JSON).
        r#"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS payload bytea;"#,
    ),
    (
        5,
        // Where the sink stands in each stream, written in the transaction of the rows it
        // covers: the rows and the offset commit together (exactly once into PostgreSQL), and
        // whichever node runs a partition's sink next resumes from here.
        r#"CREATE TABLE IF NOT EXISTS {table}_offsets (
        log_id text NOT NULL,
        partition integer NOT NULL,
        next_offset bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (log_id, partition)
    );"#,
    ),
];

/// Columns of the rows of one batch, as the INSERT's `unnest` takes them.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub log_ids: Vec<String>,
    pub offsets: Vec<i64>,
    pub views: Vec<String>,
    pub keys: Vec<String>,
    pub ts: Vec<i64>,
    pub appended: Vec<i64>,
    pub event_ids: Vec<Option<String>>,
    pub dedup_ids: Vec<Option<String>>,
    pub values: Vec<String>,
    pub payloads: Vec<Vec<u8>>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }
}

/// What one transaction writes: rows, lost ranges, and where the batch ends in each stream.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub rows: Rows,
    /// (log id, `[from, to)`): ranges retention deleted before the sink read them.
    pub gaps: Vec<(String, u64, u64)>,
    /// Per stream (by log id): the offset after the last record the batch covers (written,
    /// undecodable, or lost). Committed with the batch.
    pub ends: BTreeMap<String, u64>,
}

impl Batch {
    pub fn needs_write(&self) -> bool {
        self.rows.len() > 0 || !self.gaps.is_empty()
    }

    /// Whether the batch covers any offset (a batch of undecodable records has no rows).
    pub fn covers(&self) -> bool {
        !self.ends.is_empty()
    }

    pub fn covered(&mut self, log_id: &str, end: u64) {
        let e = self.ends.entry(log_id.to_string()).or_default();
        *e = (*e).max(end);
    }

    pub fn clear(&mut self) {
        *self = Batch::default();
    }
}

/// One connection's worth of writing for one partition.
pub(crate) struct Service {
    pg: PgEndpoint,
    table: String,
    partition: i32,
    client: Option<postgres::Client>,
    insert_rows: String,
    insert_gaps: String,
    upsert_offset: String,
}

impl Service {
    pub fn new(pg: PgEndpoint, table: &str, partition: u32) -> Service {
        Service {
            pg,
            table: table.to_string(),
            partition: partition as i32,
            client: None,
            insert_rows: format!(
                "INSERT INTO {table} (log_id, partition, log_offset, view, entity_key, ts_ms, append_ms, event_id, dedup_id, \"values\", payload) \
                 SELECT l, $1, o, v, k, ts, a, e, d, j::jsonb, b \
                 FROM unnest($2::text[], $3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::bytea[]) AS u(l, o, v, k, ts, a, e, d, j, b) \
                 ON CONFLICT DO NOTHING"
            ),
            insert_gaps: format!(
                "INSERT INTO {table}_gaps (log_id, partition, from_offset, to_offset) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
            ),
            // Offsets only move forward, whoever wrote last (two owners of a partition may
            // overlap during a handover).
            upsert_offset: format!(
                "INSERT INTO {table}_offsets AS t (log_id, partition, next_offset) VALUES ($1, $2, $3) \
                 ON CONFLICT (log_id, partition) DO UPDATE SET next_offset = GREATEST(t.next_offset, excluded.next_offset), updated_at = now()"
            ),
        }
    }

    /// The committed offsets of this partition's streams (by log id), connecting if needed.
    pub fn offsets(&mut self) -> Result<BTreeMap<String, u64>, postgres::Error> {
        let result = self.try_offsets();
        if result.is_err() {
            self.client = None;
        }
        result
    }

    fn try_offsets(&mut self) -> Result<BTreeMap<String, u64>, postgres::Error> {
        let query = format!(
            "SELECT log_id, next_offset FROM {}_offsets WHERE partition = $1",
            self.table
        );
        let partition = self.partition;
        let rows = self.connected()?.query(&query, &[&partition])?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect())
    }

    fn connected(&mut self) -> Result<&mut postgres::Client, postgres::Error> {
        connect_once(&mut self.client, &self.pg, &self.table)
    }

    /// Writes the batch in one transaction (connecting and migrating first if needed). On any
    /// error the connection is dropped: the next attempt starts from a clean session.
    pub fn write(&mut self, batch: &Batch) -> Result<(), postgres::Error> {
        let result = self.try_write(batch);
        if result.is_err() {
            self.client = None;
        }
        result
    }

    fn try_write(&mut self, batch: &Batch) -> Result<(), postgres::Error> {
        let partition = self.partition;
        let (insert_rows, insert_gaps) = (&self.insert_rows, &self.insert_gaps);
        let upsert_offset = &self.upsert_offset;
        let c = connect_once(&mut self.client, &self.pg, &self.table)?;
        let started = Instant::now();
        let mut tx = c.transaction()?;
        if batch.rows.len() > 0 {
            let r = &batch.rows;
            tx.execute(
                insert_rows.as_str(),
                &[
                    &partition,
                    &r.log_ids,
                    &r.offsets,
                    &r.views,
                    &r.keys,
                    &r.ts,
                    &r.appended,
                    &r.event_ids,
                    &r.dedup_ids,
                    &r.values,
                    &r.payloads,
                ],
            )?;
        }
        for (log_id, from, to) in &batch.gaps {
            tx.execute(
                insert_gaps.as_str(),
                &[log_id, &partition, &(*from as i64), &(*to as i64)],
            )?;
        }
        for (log_id, end) in &batch.ends {
            tx.execute(
                upsert_offset.as_str(),
                &[log_id, &partition, &(*end as i64)],
            )?;
        }
        tx.commit()?;
        metrics::histogram!(t::HISTORY_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// The connection, opened (and the table migrated) if there is none.
fn connect_once<'a>(
    client: &'a mut Option<postgres::Client>,
    pg: &PgEndpoint,
    table: &str,
) -> Result<&'a mut postgres::Client, postgres::Error> {
    if client.is_none() {
        let mut c = pg.connect()?;
        migrate(&mut c, table)?;
        *client = Some(c);
    }
    Ok(client.as_mut().expect("connected above"))
}

/// Whether trying the same batch again may succeed: the server was away or busy, or the
/// transaction lost a race. Everything else (a permission, a schema someone changed, data
/// PostgreSQL refuses) fails the same way every time, so the sink stops on it and says so.
pub(crate) fn is_retriable(e: &postgres::Error) -> bool {
    match e.code() {
        // No SQLSTATE: connecting failed, the connection closed, an IO error or a timeout.
        None => true,
        Some(code) => is_retriable_sqlstate(code.code()),
    }
}

pub(crate) fn is_retriable_sqlstate(code: &str) -> bool {
    // 08 connection exception, 40 transaction rollback (serialization, deadlock),
    // 53 insufficient resources, 57 operator intervention (shutdown, cannot connect now),
    // 58 system error; 55P03 lock not available.
    matches!(code.get(..2), Some("08" | "40" | "53" | "57" | "58")) || code == "55P03"
}

/// Applies the migrations this table has not had, under a lock so that concurrent sinks
/// (one per partition, or several nodes) do not race.
pub(crate) fn migrate(client: &mut postgres::Client, table: &str) -> Result<(), postgres::Error> {
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
