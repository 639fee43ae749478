//! `quiver history`: training data from point-in-time retrieval. Reads entity rows (keys and
//! a timestamp each) from CSV or Parquet (Feast's entity dataframe with `event_timestamp`),
//! asks `POST /v1/features/historical` in chunks (several in flight), and writes one output
//! row per input row — the entity columns, the timestamp, then each feature as of that
//! instant by `--semantics` (empty/null where it had no value) — as CSV, or as Parquet when
//! the output file ends in `.parquet`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Entity rows: CSV with a header, or Parquet (`.parquet`, e.g. a Feast entity dataframe):
    /// entity key column(s) and a timestamp column (epoch ms, RFC 3339, or a Parquet timestamp).
    #[arg(long)]
    pub entities: PathBuf,
    /// Features to retrieve, `view:feature`, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub features: Vec<String>,
    /// Output file: `.parquet` writes Parquet, anything else CSV.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "QUIVER_URL")]
    pub url: String,
    /// Name of the timestamp column (default: the first of ts, timestamp, event_timestamp).
    #[arg(long)]
    pub timestamp_column: Option<String>,
    /// `event_time` (Feast's point-in-time join: events with event time ≤ T, whenever they
    /// arrived) or `as_served` (what the online store served at T).
    #[arg(long, default_value = "event_time")]
    pub semantics: String,
    /// Entity rows per request.
    #[arg(long, default_value_t = 10_000)]
    pub chunk_rows: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
}

/// Entity rows as read: column names and each row's cells as text.
struct EntityRows {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

fn read_entities(path: &std::path::Path) -> Result<EntityRows> {
    if crate::tabular::is_parquet(path) {
        let parquet = crate::tabular::ParquetRows::open(path)?;
        let headers = parquet.columns.clone();
        let mut rows = Vec::with_capacity(parquet.total_rows as usize);
        parquet.for_each(|cells, _| {
            rows.push(
                cells
                    .into_iter()
                    .map(|v| match v {
                        Value::Null => String::new(),
                        Value::String(s) => s,
                        other => other.to_string(),
                    })
                    .collect(),
            );
            Ok(true)
        })?;
        return Ok(EntityRows { headers, rows });
    }
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("opening {}", path.display()))?;
    let headers = reader.headers()?.iter().map(str::to_string).collect();
    let rows = reader
        .records()
        .map(|r| r.map(|r| r.iter().map(str::to_string).collect()))
        .collect::<Result<_, _>>()?;
    Ok(EntityRows { headers, rows })
}

/// One request's reply: the feature names and, per row, each feature's value.
type ChunkReply = (Vec<String>, Vec<Vec<Value>>);

pub fn run(args: HistoryArgs) -> Result<()> {
    anyhow::ensure!(
        ["event_time", "as_served"].contains(&args.semantics.as_str()),
        "--semantics is event_time or as_served"
    );
    let EntityRows { headers, rows } = read_entities(&args.entities)?;
    let ts_col = match &args.timestamp_column {
        Some(c) => headers.iter().position(|h| h == c).ok_or_else(|| anyhow!("no column {c:?} in {}", args.entities.display()))?,
        None => ["ts", "timestamp", "event_timestamp"]
            .iter()
            .find_map(|c| headers.iter().position(|h| h == c))
            .ok_or_else(|| anyhow!("no timestamp column (ts, timestamp or event_timestamp); pass --timestamp-column"))?,
    };
    let entity_cols: Vec<usize> = (0..headers.len()).filter(|&i| i != ts_col).collect();
    if entity_cols.is_empty() {
        bail!("{} has no entity key column", args.entities.display());
    }
    let out_ts: Vec<i64> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let t = &r[ts_col];
            t.parse::<i64>()
                .ok()
                .or_else(|| quiver_core::time::parse_rfc3339_ms(t))
                .ok_or_else(|| anyhow!("row {}: {t:?} is not epoch ms or RFC 3339", i + 1))
        })
        .collect::<Result<_>>()?;
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()?;
    let url = format!("{}/v1/features/historical", args.url.trim_end_matches('/'));
    // Rows of one entity go in one chunk, so each entity's history is read once however many
    // timestamps ask for it; the output keeps the input's order.
    let entity_of: Vec<Vec<&str>> = rows
        .iter()
        .map(|r| entity_cols.iter().map(|&c| r[c].as_str()).collect())
        .collect();
    let order = quiver_store::pit::grouped_by_key(&entity_of);
    let chunk_rows = args.chunk_rows.max(1);
    let chunks: Vec<&[usize]> = order.chunks(chunk_rows).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let replies: Vec<std::sync::Mutex<Option<Result<ChunkReply>>>> =
        chunks.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..args.concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&chunk) = chunks.get(i) else {
                    return;
                };
                let body = request_body(&args, &headers, &entity_cols, &rows, &out_ts, chunk);
                let reply = fetch_chunk(&client, &url, &body, entity_cols.len(), chunk.len());
                let failed = reply.is_err();
                *replies[i].lock().expect("lock") = Some(reply);
                if failed {
                    next.store(chunks.len(), std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    let mut feature_names: Vec<String> = Vec::new();
    let mut out_values: Vec<Vec<Value>> = vec![Vec::new(); rows.len()];
    for (chunk, reply) in chunks.iter().zip(replies) {
        let (names, values) = reply
            .into_inner()
            .expect("lock")
            .ok_or_else(|| anyhow!("a request was not sent after an earlier one failed"))??;
        feature_names = names;
        for (&row, v) in chunk.iter().zip(values) {
            out_values[row] = v;
        }
    }
    if crate::tabular::is_parquet(&args.out) {
        write_parquet(
            &args.out,
            &headers,
            &entity_cols,
            ts_col,
            &rows,
            &out_ts,
            &feature_names,
            &out_values,
        )?;
    } else {
        let mut w = csv::Writer::from_path(&args.out)?;
        let mut header: Vec<&str> = entity_cols.iter().map(|&c| headers[c].as_str()).collect();
        header.push(&headers[ts_col]);
        header.extend(feature_names.iter().map(String::as_str));
        w.write_record(&header)?;
        for (r, values) in rows.iter().zip(&out_values) {
            let mut rec: Vec<String> = entity_cols.iter().map(|&c| r[c].to_string()).collect();
            rec.push(r[ts_col].to_string());
            rec.extend(values.iter().map(|v| match v {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => other.to_string(),
            }));
            w.write_record(&rec)?;
        }
        w.flush()?;
    }
    println!(
        "wrote {} rows × {} features to {}",
        rows.len(),
        feature_names.len(),
        args.out.display()
    );
    Ok(())
}

fn request_body(
    args: &HistoryArgs,
    headers: &[String],
    entity_cols: &[usize],
    rows: &[Vec<String>],
    ts: &[i64],
    chunk: &[usize],
) -> Value {
    let mut entities = serde_json::Map::new();
    for &c in entity_cols {
        let keys = chunk
            .iter()
            .map(|&r| Value::String(rows[r][c].clone()))
            .collect();
        entities.insert(headers[c].clone(), Value::Array(keys));
    }
    let ts: Vec<i64> = chunk.iter().map(|&r| ts[r]).collect();
    json!({"features": args.features, "entities": entities, "timestamps": ts, "semantics": args.semantics})
}

/// POSTs one chunk; its feature names (entity columns skipped) and values per row.
fn fetch_chunk(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &Value,
    skip: usize,
    rows: usize,
) -> Result<ChunkReply> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let reply: Value = resp.json()?;
    if !status.is_success() {
        bail!("the server refused the request ({status}): {reply}");
    }
    let malformed = || anyhow!("malformed reply: {reply}");
    let names = reply["metadata"]["feature_names"]
        .as_array()
        .ok_or_else(malformed)?;
    let results = reply["results"].as_array().ok_or_else(malformed)?;
    let names = names
        .iter()
        .skip(skip)
        .map(|n| n.as_str().unwrap_or_default().to_string())
        .collect();
    let values = (0..rows)
        .map(|i| {
            results
                .iter()
                .skip(skip)
                .map(|col| col["values"][i].clone())
                .collect()
        })
        .collect();
    Ok((names, values))
}

/// The Arrow type a JSON column maps to: integers → Int64, other numbers → Float64, booleans,
/// strings, arrays of numbers → List<Float64>; a column mixing kinds is written as JSON text.
fn column_type(values: impl Iterator<Item = Value>) -> DataType {
    let mut kind: Option<DataType> = None;
    for v in values {
        let k = match v {
            Value::Null => continue,
            Value::Bool(_) => DataType::Boolean,
            Value::Number(n) if n.is_i64() => DataType::Int64,
            Value::Number(_) => DataType::Float64,
            Value::String(_) => DataType::Utf8,
            Value::Array(_) => {
                DataType::List(Arc::new(Field::new("item", DataType::Float64, true)))
            }
            Value::Object(_) => DataType::Utf8,
        };
        kind = Some(match (kind, k) {
            (None, k) => k,
            (Some(a), b) if a == b => a,
            (Some(DataType::Int64), DataType::Float64)
            | (Some(DataType::Float64), DataType::Int64) => DataType::Float64,
            _ => return DataType::Utf8,
        });
    }
    kind.unwrap_or(DataType::Utf8)
}

#[allow(clippy::too_many_arguments)]
fn write_parquet(
    path: &std::path::Path,
    headers: &[String],
    entity_cols: &[usize],
    ts_col: usize,
    rows: &[Vec<String>],
    ts: &[i64],
    feature_names: &[String],
    values: &[Vec<Value>],
) -> Result<()> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for &c in entity_cols {
        fields.push(Field::new(&headers[c], DataType::Utf8, false));
        let mut b = StringBuilder::new();
        rows.iter().for_each(|r| b.append_value(&r[c]));
        columns.push(Arc::new(b.finish()));
    }
    fields.push(Field::new(
        &headers[ts_col],
        DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        false,
    ));
    let mut b = TimestampMillisecondBuilder::new().with_timezone("UTC");
    ts.iter().for_each(|t| b.append_value(*t));
    columns.push(Arc::new(b.finish()));
    for (j, name) in feature_names.iter().enumerate() {
        let col = || values.iter().map(move |row| row[j].clone());
        let ty = column_type(col());
        let array: ArrayRef = match &ty {
            DataType::Boolean => {
                let mut b = BooleanBuilder::new();
                col().for_each(|v| b.append_option(v.as_bool()));
                Arc::new(b.finish())
            }
            DataType::Int64 => {
                let mut b = Int64Builder::new();
                col().for_each(|v| b.append_option(v.as_i64()));
                Arc::new(b.finish())
            }
            DataType::Float64 => {
                let mut b = Float64Builder::new();
                col().for_each(|v| b.append_option(v.as_f64()));
                Arc::new(b.finish())
            }
            DataType::List(_) => {
                let mut b = ListBuilder::new(Float64Builder::new());
                for v in col() {
                    match v.as_array() {
                        Some(xs) => {
                            xs.iter().for_each(|x| b.values().append_option(x.as_f64()));
                            b.append(true);
                        }
                        None => b.append(false),
                    }
                }
                Arc::new(b.finish())
            }
            _ => {
                let mut b = StringBuilder::new();
                col().for_each(|v| match v {
                    Value::Null => b.append_null(),
                    Value::String(s) => b.append_value(s),
                    other => b.append_value(other.to_string()),
                });
                Arc::new(b.finish())
            }
        };
        fields.push(Field::new(name, ty, true));
        columns.push(array);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}
