//! Point-in-time source: the history rows of a set of entity keys, read in bulk.
//!
//! One request's keys go to PostgreSQL in a binary `COPY ... FROM STDIN` into a temporary
//! table, and their rows come back in one binary `COPY (SELECT ... JOIN) TO STDOUT`: three
//! round trips per request whatever its size, no per-row query, no text escaping. Rows are
//! re-encoded as log payloads so that `quiver_store::pit` replays both sources alike.

use std::collections::HashMap;

use postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutIter};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::Type;
use quiver_core::schema::View;
use quiver_core::value::{FeatureType, Value};
use quiver_store::pit::HistoryRecord;

/// The rows of `keys` in `view` that the log `log_id` wrote, per key, in log order. Features
/// the current schema no longer has (or whose type changed) are left out, as a replay of the
/// log would.
pub fn collect_from_postgres(
    url: &str,
    table: &str,
    log_id: &str,
    schema: &quiver_core::Schema,
    view: &str,
    keys: &[String],
) -> Result<HashMap<String, Vec<HistoryRecord>>, postgres::Error> {
    let mut out: HashMap<String, Vec<HistoryRecord>> = HashMap::new();
    let Some(v) = schema.view_by_name(view) else {
        return Ok(out);
    };
    let mut client = postgres::Client::connect(url, postgres::NoTls)?;
    let mut tx = client.transaction()?;
    tx.batch_execute(
        "CREATE TEMPORARY TABLE quiver_pit_keys (k text PRIMARY KEY) ON COMMIT DROP",
    )?;
    let mut w = BinaryCopyInWriter::new(
        tx.copy_in("COPY quiver_pit_keys (k) FROM STDIN (FORMAT binary)")?,
        &[Type::TEXT],
    );
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    for k in keys.iter().filter(|k| seen.insert(k.as_str())) {
        w.write(&[k])?;
    }
    w.finish()?;
    // Statistics on the keys, so the planner joins through the (view, entity_key) index
    // instead of scanning the whole history.
    tx.batch_execute("ANALYZE quiver_pit_keys")?;
    let copy = format!(
        "COPY (SELECT h.entity_key, h.log_offset, h.ts_ms, h.append_ms, h.event_id, h.dedup_id, h.\"values\"::text \
         FROM {table} h JOIN quiver_pit_keys k ON h.entity_key = k.k \
         WHERE h.log_id = {} AND h.view = {}) TO STDOUT (FORMAT binary)",
        literal(log_id),
        literal(view)
    );
    let types = [
        Type::TEXT,
        Type::INT8,
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
    ];
    let mut rows = BinaryCopyOutIter::new(tx.copy_out(copy.as_str())?, &types);
    let mut payload = Vec::new();
    while let Some(row) = rows.next()? {
        let key: &str = row.get(0);
        let values: &str = row.get(6);
        let Some(typed) = typed_values(v, values) else {
            continue;
        };
        let event = quiver_core::event::Event {
            view: v.id,
            key: key.to_string(),
            ts_ms: row.get(2),
            event_id: row.get::<Option<&str>>(4).map(str::to_string),
            values: typed,
        };
        let dedup = row
            .get::<Option<&str>>(5)
            .and_then(|h| u128::from_str_radix(h, 16).ok());
        payload.clear();
        quiver_core::record::encode(schema, &event, dedup, &mut payload);
        out.entry(event.key).or_default().push(HistoryRecord {
            offset: row.get::<i64>(1) as u64,
            append_ms: row.get(3),
            payload: payload.clone(),
        });
    }
    drop(rows);
    tx.commit()?;
    // A key lives in one partition, so its offsets are its log order.
    for records in out.values_mut() {
        records.sort_unstable_by_key(|r| r.offset);
    }
    Ok(out)
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
