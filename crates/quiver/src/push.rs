//! `quiver push FILE`: JSONL, CSV or Parquet → batched NDJSON POSTs to `/v1/events`, each
//! batch with its own `Idempotency-Key` (kept across its retries, so a retried batch is applied
//! once), retrying 429/503 and connection errors with exponential backoff, full jitter, and at
//! least the server's `Retry-After`. A progress bar shows how much of the file is sent.
//!
//! CSV and Parquet (backfills): columns `view`, `key`, `ts` (alias `event_timestamp`, Feast's
//! name), `event_id` are the event's fields (`view` may instead come from `--view`, the key
//! from `--key-column`), every other column is a feature value. CSV cells are read as JSON
//! where they parse as a number or `true`/`false`, else as strings; Parquet cells keep their
//! type (timestamps become epoch ms, see `tabular`). Empty CSV cells and Parquet nulls are left
//! out of the event.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde_json::{Map, Value};

#[derive(clap::Args, Clone)]
pub struct PushArgs {
    /// Events as JSONL (one event object per line), CSV (.csv) or Parquet (.parquet).
    pub file: PathBuf,
    #[arg(long, default_value = "http://127.0.0.1:7070", env = "QUIVER_URL")]
    pub url: String,
    /// Events per POST.
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// none | written | durable
    #[arg(long, default_value = "durable")]
    pub ack: String,
    /// The view of every CSV/Parquet row without a `view` column.
    #[arg(long)]
    pub view: Option<String>,
    /// The CSV/Parquet column holding the entity key, when it is not called `key` (e.g. a
    /// Feast table's `user_id`).
    #[arg(long)]
    pub key_column: Option<String>,
    /// Attempts per batch before giving up.
    #[arg(long, default_value_t = 10)]
    pub attempts_max: u32,
}

/// Backoff before attempt `attempt` (1-based): full jitter over `base · 2^attempt`, capped,
/// and never less than the server's `Retry-After`.
pub fn backoff(attempt: u32, retry_after: Option<Duration>, rng: &mut impl Rng) -> Duration {
    const BASE_MS: u64 = 50;
    const CAP_MS: u64 = 5_000;
    let ceiling = BASE_MS.saturating_mul(1 << attempt.min(16)).min(CAP_MS);
    let jittered = Duration::from_millis(rng.random_range(0..=ceiling));
    retry_after.map_or(jittered, |r| jittered.max(r))
}

pub fn run(args: PushArgs) -> Result<()> {
    let total_bytes = std::fs::metadata(&args.file)
        .with_context(|| format!("opening {}", args.file.display()))?
        .len();
    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} {msg}",
        )
        .expect("static template"),
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!(
        "{}/v1/events?ack={}",
        args.url.trim_end_matches('/'),
        args.ack
    );
    let concurrency = args.concurrency.max(1);
    // Batches wait here for a sender: bounded, so a large file is streamed, never loaded whole.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2 * concurrency);
    let rx = Mutex::new(rx);
    let sent = AtomicU64::new(0);
    let batches = AtomicU64::new(0);
    let retries = AtomicU64::new(0);
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let started = Instant::now();
    let read_result = std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| loop {
                let Ok(batch) = rx.lock().expect("lock").recv() else {
                    return;
                };
                match send_batch(&client, &url, &batch.body, args.attempts_max, &retries) {
                    Ok(()) => {
                        sent.fetch_add(batch.events, Ordering::Relaxed);
                        batches.fetch_add(1, Ordering::Relaxed);
                        bar.set_position(batch.read_to);
                        bar.set_message(format!("{} events", sent.load(Ordering::Relaxed)));
                    }
                    Err(e) => {
                        *failure.lock().expect("lock") =
                            Some(e.context(format!("batch {}", batch.index)));
                        return;
                    }
                }
            });
        }
        let mut builder = BatchBuilder {
            size: args.batch_size.max(1),
            index: 0,
            body: String::new(),
            events: 0,
        };
        let result = for_each_event(&args, |event, read_to| {
            if failure.lock().expect("lock").is_some() {
                return Ok(false);
            }
            if let Some(batch) = builder.push(&event, read_to) {
                if tx.send(batch).is_err() {
                    return Ok(false);
                }
            }
            Ok(true)
        });
        if let Some(batch) = builder.finish(total_bytes) {
            let _ = tx.send(batch);
        }
        drop(tx);
        result
    });
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "pushed {sent} events in {} batches in {elapsed:.2}s ({:.0} events/s), {} retries",
        batches.load(Ordering::Relaxed),
        sent as f64 / elapsed.max(1e-9),
        retries.load(Ordering::Relaxed)
    );
    read_result?;
    if let Some(e) = failure.into_inner().expect("lock") {
        return Err(e);
    }
    if sent == 0 {
        bail!("{} holds no events", args.file.display());
    }
    Ok(())
}

/// One POST's worth of NDJSON.
struct Batch {
    index: usize,
    body: String,
    events: u64,
    /// Bytes of the file read when the batch was complete (for the progress bar).
    read_to: u64,
}

struct BatchBuilder {
    size: usize,
    index: usize,
    body: String,
    events: u64,
}

impl BatchBuilder {
    fn push(&mut self, event: &str, read_to: u64) -> Option<Batch> {
        if !self.body.is_empty() {
            self.body.push('\n');
        }
        self.body.push_str(event);
        self.events += 1;
        (self.events as usize >= self.size).then(|| self.take(read_to))
    }

    fn finish(&mut self, read_to: u64) -> Option<Batch> {
        (self.events > 0).then(|| self.take(read_to))
    }

    fn take(&mut self, read_to: u64) -> Batch {
        let batch = Batch {
            index: self.index,
            body: std::mem::take(&mut self.body),
            events: self.events,
            read_to,
        };
        self.index += 1;
        self.events = 0;
        batch
    }
}

fn send_batch(
    client: &reqwest::blocking::Client,
    url: &str,
    body: &str,
    attempts_max: u32,
    retries: &AtomicU64,
) -> Result<()> {
    let key = uuid::Uuid::new_v4().to_string();
    let mut rng = rand::rng();
    for attempt in 1..=attempts_max {
        let result = client
            .post(url)
            .header("content-type", "application/x-ndjson")
            .header("idempotency-key", &key)
            .body(body.to_string())
            .send();
        let retry_after = match result {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp)
                if resp.status().as_u16() == 429
                    || resp.status().as_u16() == 503
                    || resp.status().as_u16() == 409 =>
            {
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().unwrap_or_default();
                return Err(anyhow!("server refused the batch ({status}): {text}"));
            }
            Err(e) if e.is_connect() || e.is_timeout() || e.is_request() => None,
            Err(e) => return Err(e.into()),
        };
        if attempt == attempts_max {
            break;
        }
        retries.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(backoff(attempt, retry_after, &mut rng));
    }
    bail!("gave up after {attempts_max} attempts")
}

/// Calls `f` with each event as one line of JSON and the bytes of the file read so far, until
/// the file ends or `f` returns false. JSONL lines are checked to be JSON here, so a typo is
/// reported with its line number before anything is sent from that batch.
fn for_each_event(args: &PushArgs, mut f: impl FnMut(String, u64) -> Result<bool>) -> Result<()> {
    let is_csv = args
        .file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let file = std::fs::File::open(&args.file)
        .with_context(|| format!("opening {}", args.file.display()))?;
    if !is_csv && !crate::tabular::is_parquet(&args.file) {
        let mut read_to = 0u64;
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line = line?;
            read_to += line.len() as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            serde_json::from_str::<serde::de::IgnoredAny>(&line)
                .with_context(|| format!("{}:{}: not JSON", args.file.display(), i + 1))?;
            if !f(line, read_to)? {
                break;
            }
        }
        return Ok(());
    }
    if crate::tabular::is_parquet(&args.file) {
        let rows = crate::tabular::ParquetRows::open(&args.file)?;
        let (columns, total) = (rows.columns.clone(), rows.total_rows.max(1));
        let bytes = std::fs::metadata(&args.file)?.len();
        return rows.for_each(|cells, done| {
            let fields = columns.iter().map(String::as_str).zip(cells);
            let event = event_from(args, fields, || format!("row {done}"))?;
            f(event, bytes * done / total)
        });
    }
    let mut reader = csv::Reader::from_reader(file);
    let headers = reader.headers()?.clone();
    let mut row = csv::StringRecord::new();
    let mut line = 1;
    while reader.read_record(&mut row)? {
        line += 1;
        let fields = headers.iter().zip(row.iter()).map(|(h, cell)| {
            let value = match h {
                _ if cell.is_empty() => Value::Null,
                "view" | "key" | "event_id" => Value::String(cell.into()),
                _ if Some(h) == args.key_column.as_deref() => Value::String(cell.into()),
                "ts" | "event_timestamp" => cell
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or_else(|_| Value::String(cell.into())),
                _ => csv_cell(cell),
            };
            (h, value)
        });
        let event = event_from(args, fields, || format!("line {line}"))?;
        if !f(event, reader.position().byte())? {
            break;
        }
    }
    Ok(())
}

/// One CSV or Parquet row as an event (one line of JSON): the event's own fields by column
/// name, every other non-null column a feature value.
fn event_from<'a>(
    args: &PushArgs,
    fields: impl Iterator<Item = (&'a str, Value)>,
    at: impl Fn() -> String,
) -> Result<String> {
    let mut event = Map::new();
    let mut values = Map::new();
    for (name, value) in fields {
        if value.is_null() {
            continue;
        }
        let field = match name {
            _ if Some(name) == args.key_column.as_deref() => "key",
            "event_timestamp" => "ts",
            other => other,
        };
        match field {
            "view" | "key" | "event_id" | "ts" => {
                event.insert(field.into(), value);
            }
            feature => {
                values.insert(feature.into(), value);
            }
        }
    }
    if !event.contains_key("view") {
        let view = args.view.clone().ok_or_else(|| {
            anyhow!(
                "{} {}: no view column; pass --view",
                args.file.display(),
                at()
            )
        })?;
        event.insert("view".into(), Value::String(view));
    }
    event.insert("values".into(), Value::Object(values));
    Ok(Value::Object(event).to_string())
}

fn csv_cell(cell: &str) -> Value {
    match cell {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => {
            if let Ok(i) = cell.parse::<i64>() {
                Value::from(i)
            } else if let Some(f) = cell.parse::<f64>().ok().filter(|f| f.is_finite()) {
                Value::from(f)
            } else {
                Value::String(cell.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_honours_retry_after() {
        let mut rng = rand::rng();
        for attempt in 1..30 {
            let d = backoff(attempt, None, &mut rng);
            assert!(d <= Duration::from_millis(5_000));
            let d = backoff(attempt, Some(Duration::from_secs(2)), &mut rng);
            assert!(d >= Duration::from_secs(2));
        }
    }

    #[test]
    fn csv_cells_are_typed() {
        assert_eq!(csv_cell("12"), Value::from(12));
        assert_eq!(csv_cell("1.5"), Value::from(1.5));
        assert_eq!(csv_cell("true"), Value::Bool(true));
        assert_eq!(csv_cell("m7"), Value::String("m7".into()));
        assert_eq!(csv_cell("NaN"), Value::String("NaN".into()));
    }
}
