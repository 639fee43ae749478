//! Point-in-time source: the history rows of a set of entity keys, read in bulk.
//!
//! One request's keys go to PostgreSQL in a binary `COPY ... FROM STDIN` into a temporary
//! table, and their rows come back in one binary `COPY (SELECT ... LATERAL) TO STDOUT`: a few
//! round trips per request whatever its size, no per-row query, no text escaping. Rows carry
//! the log record verbatim (`payload`, migration 4), so `quiver_store::pit` replays exactly
//! the bytes the online store applied; older rows are re-encoded from their JSON.

use std::collections::HashMap;

use postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutIter};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use quiver_core::schema::View;
use quiver_core::value::{FeatureType, Value};
use quiver_store::pit::HistoryRecord;

use super::PgEndpoint;

/// Connections kept open between point-in-time requests (each request takes one).
const IDLE_CONNECTIONS_MAX: usize = 4;

/// Point-in-time reads of one history table, over a small pool of connections: a training
/// set is retrieved in many chunks, and a new connection per chunk (a PostgreSQL backend
/// forked, catalogs warmed) cost more than the chunk's rows.
pub struct HistoryReader {
    pg: PgEndpoint,
    table: String,
    idle: parking_lot::Mutex<Vec<postgres::Client>>,
}

impl HistoryReader {
    pub fn new(pg: PgEndpoint, table: &str) -> HistoryReader {
        HistoryReader {
            pg,
            table: table.to_string(),
            idle: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// The rows of `keys` in `view` that the log `log_id` wrote, per key, in log order.
    /// Features the current schema no longer has (or whose type changed) are left out, as a
    /// replay of the log would.
    pub fn collect(
        &self,
        log_id: &str,
        schema: &quiver_core::Schema,
        view: &str,
        keys: &[String],
    ) -> Result<HashMap<String, Vec<HistoryRecord>>, postgres::Error> {
        let Some(v) = schema.view_by_name(view) else {
            return Ok(HashMap::new());
        };
        let pooled = self.idle.lock().pop().filter(|c| !c.is_closed());
        let mut client = match pooled {
            Some(c) => c,
            None => {
                let mut c = self.pg.connect()?;
                // Lives as long as the connection; emptied by every commit.
                c.batch_execute(
                    "CREATE TEMPORARY TABLE quiver_pit_keys (k text PRIMARY KEY) ON COMMIT DELETE ROWS",
                )?;
                c
            }
        };
        let out = collect_with(&mut client, &self.table, log_id, schema, v, keys)?;
        let mut idle = self.idle.lock();
        if idle.len() < IDLE_CONNECTIONS_MAX {
            idle.push(client);
        }
        Ok(out)
    }
}

impl Drop for HistoryReader {
    /// Closes the pooled connections on a thread of their own: a synchronous `postgres`
    /// client blocks as it closes, which would panic on an async runtime's thread (where the
    /// last reference to a node may well be dropped).
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *self.idle.lock());
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("history-reader-close".into())
                .spawn(move || drop(idle));
        }
    }
}

/// [`HistoryReader::collect`] on a connection of its own (tools and tests).
pub fn collect_from_postgres(
    url: &str,
    table: &str,
    log_id: &str,
    schema: &quiver_core::Schema,
    view: &str,
    keys: &[String],
) -> Result<HashMap<String, Vec<HistoryRecord>>, postgres::Error> {
    let pg = PgEndpoint::new(url, None).expect("TLS without a CA file always builds");
    HistoryReader::new(pg, table).collect(log_id, schema, view, keys)
}

fn collect_with(
    client: &mut postgres::Client,
    table: &str,
    log_id: &str,
    schema: &quiver_core::Schema,
    v: &View,
    keys: &[String],
) -> Result<HashMap<String, Vec<HistoryRecord>>, postgres::Error> {
    let mut out: HashMap<String, Vec<HistoryRecord>> = HashMap::with_capacity(keys.len());
    let mut tx = client.transaction()?;
    let mut w = BinaryCopyInWriter::new(
        tx.copy_in("COPY quiver_pit_keys (k) FROM STDIN (FORMAT binary)")?,
        &[Type::TEXT],
    );
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    for k in keys.iter().filter(|k| seen.insert(k.as_str())) {
        w.write(&[k])?;
    }
    w.finish()?;
    // One index lookup per key, whatever the table's statistics say (a table the autovacuum
    // has not analyzed yet looks empty to the planner, which then scans all of it): the
    // LATERAL subquery, fenced by OFFSET 0, runs once per key through (view, entity_key, ts).
    // JIT only adds compile time to this short query.
    tx.batch_execute("SET LOCAL jit = off")?;
    let copy = format!(
        "COPY (SELECT x.* FROM quiver_pit_keys k CROSS JOIN LATERAL (\
         SELECT h.entity_key, h.log_offset, h.append_ms, h.payload, \
         CASE WHEN h.payload IS NULL THEN h.ts_ms END, CASE WHEN h.payload IS NULL THEN h.event_id END, \
         CASE WHEN h.payload IS NULL THEN h.dedup_id END, CASE WHEN h.payload IS NULL THEN h.\"values\"::text END \
         FROM {table} h WHERE h.view = {} AND h.entity_key = k.k AND h.log_id = {} OFFSET 0) x) TO STDOUT (FORMAT binary)",
        literal(&v.name),
        literal(log_id)
    );
    let types = [
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::BYTEA,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
    ];
    let mut rows = BinaryCopyOutIter::new(tx.copy_out(copy.as_str())?, &types);
    while let Some(row) = rows.next()? {
        let key: &str = row.get(0);
        let payload = match row.get::<Option<&[u8]>>(3) {
            Some(p) => p.to_vec(),
            // A row written before migration 4: rebuild the record from its JSON.
            None => match legacy_payload(schema, v, key, &row) {
                Some(p) => p,
                None => continue,
            },
        };
        let record = HistoryRecord {
            offset: row.get::<i64>(1) as u64,
            append_ms: row.get(2),
            payload,
        };
        match out.get_mut(key) {
            Some(records) => records.push(record),
            None => {
                out.insert(key.to_string(), vec![record]);
            }
        }
    }
    drop(rows);
    tx.commit()?;
    // A key lives in one partition, so its offsets are its log order.
    for records in out.values_mut() {
        records.sort_unstable_by_key(|r| r.offset);
    }
    Ok(out)
}

/// The log payload of a row that has none stored: its JSON values typed by the view's current
/// features (`None`: none left), encoded as the log would have.
fn legacy_payload(
    schema: &quiver_core::Schema,
    v: &View,
    key: &str,
    row: &postgres::binary_copy::BinaryCopyOutRow,
) -> Option<Vec<u8>> {
    let typed = typed_values(v, row.get::<Option<&str>>(7)?)?;
    let event = quiver_core::event::Event {
        view: v.id,
        key: key.to_string(),
        ts_ms: row.get::<Option<i64>>(4)?,
        event_id: row.get::<Option<&str>>(5).map(str::to_string),
        values: typed,
    };
    let dedup = row
        .get::<Option<&str>>(6)
        .and_then(|h| u128::from_str_radix(h, 16).ok());
    let mut payload = Vec::new();
    quiver_core::record::encode(schema, &event, dedup, &mut payload);
    Some(payload)
}

/// A history row's JSON values typed by the view's current features (`None`: none left).
fn typed_values(v: &View, json: &str) -> Option<Vec<(u16, Value)>> {
    let values: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json).ok()?;
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
        return None;
    }
    typed.sort_by_key(|(f, _)| *f);
    Some(typed)
}

/// A string as an SQL literal (standard_conforming_strings: only `'` is special). COPY takes
/// no parameters; these two values come from the log and the config, never from a request.
fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn literals_double_their_quotes() {
        assert_eq!(super::literal("txn"), "'txn'");
        assert_eq!(super::literal("o'neil"), "'o''neil'");
    }
}
