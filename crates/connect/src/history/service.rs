//! The PostgreSQL side of the sink: migrations, one batch (rows and gaps) per transaction, and
//! which errors are worth retrying (Vector's `RetryLogic::is_retriable_error`).

use std::time::Instant;

use quiver_core::telemetry as t;

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
];

/// Columns of the rows of one batch, as the INSERT's `unnest` takes them.
#[derive(Debug, Default)]
pub(crate) struct Rows {
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

/// What one transaction writes: rows, lost ranges, and the offset the batch ends at.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub rows: Rows,
    /// `[from, to)` offset ranges retention deleted before the sink read them.
    pub gaps: Vec<(u64, u64)>,
    /// Offset after the last record the batch covers (written, undecodable, or lost).
    pub end: u64,
    /// Whether the batch covers any offset (a batch of undecodable records has no rows).
    pub covers: bool,
}

impl Batch {
    pub fn needs_write(&self) -> bool {
        self.rows.len() > 0 || !self.gaps.is_empty()
    }

    pub fn clear(&mut self) {
        let end = self.end;
        *self = Batch::default();
        self.end = end;
    }
}

/// One connection's worth of writing for one partition.
pub(crate) struct Service {
    url: String,
    table: String,
    log_id: String,
    partition: i32,
    client: Option<postgres::Client>,
    insert_rows: String,
    insert_gaps: String,
}

impl Service {
    pub fn new(url: &str, table: &str, log_id: &str, partition: u32) -> Service {
        Service {
            url: url.to_string(),
            table: table.to_string(),
            log_id: log_id.to_string(),
            partition: partition as i32,
            client: None,
            insert_rows: format!(
                "INSERT INTO {table} (log_id, partition, log_offset, view, entity_key, ts_ms, append_ms, event_id, dedup_id, \"values\", payload) \
                 SELECT $1, $2, o, v, k, ts, a, e, d, j::jsonb, b \
                 FROM unnest($3::bigint[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], $11::bytea[]) AS u(o, v, k, ts, a, e, d, j, b) \
                 ON CONFLICT DO NOTHING"
            ),
            insert_gaps: format!(
                "INSERT INTO {table}_gaps (log_id, partition, from_offset, to_offset) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
            ),
        }
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
        if self.client.is_none() {
            let mut c = postgres::Client::connect(&self.url, postgres::NoTls)?;
            migrate(&mut c, &self.table)?;
            self.client = Some(c);
        }
        let c = self.client.as_mut().expect("connected above");
        let started = Instant::now();
        let mut tx = c.transaction()?;
        if batch.rows.len() > 0 {
            let r = &batch.rows;
            tx.execute(
                self.insert_rows.as_str(),
                &[
                    &self.log_id,
                    &self.partition,
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
        for &(from, to) in &batch.gaps {
            tx.execute(
                self.insert_gaps.as_str(),
                &[&self.log_id, &self.partition, &(from as i64), &(to as i64)],
            )?;
        }
        tx.commit()?;
        metrics::histogram!(t::HISTORY_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(())
    }
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
