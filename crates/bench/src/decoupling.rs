//! `quiver bench decoupling`: the design Quiver replaces, measured against Quiver in one run.
//!
//! The database-as-queue peer, built as such systems are: three upstream services (payments,
//! sessions, device risk) each own a table in PostgreSQL and UPSERT their feature rows into it
//! through a pool of connections, `--write-batch` rows per statement (keys sorted, so
//! concurrent batches lock rows in one order and never deadlock), autocommit with
//! `synchronous_commit = on`; the ML service answers a prediction by SELECTing the entity's
//! row (a join over the three tables, one round trip) and evaluating the same GBDT in process.
//! Quiver: the same services POST the same batches to `/v1/events?ack=durable`, predictions go
//! through `POST /v1/models/gbdt32_3v/predict` (same model file, same 32 features).
//!
//! Both designs see the same offered load, open loop: events at `--rate` per second split over
//! the three services, predictions at `--predict-rate` for uniformly random entities. Freshness
//! is measured per write batch, from when the upstream service produced it (its scheduled
//! time) to when a reader can see it: commit returned for PostgreSQL; for Quiver, a read with
//! `Quiver-Read-After: <the ack's token>` answered (one more round trip than the peer pays).
//! Then both are swept over `--levels` multiples of the offered load and, past the last level,
//! climbed by 1.5× steps (up to [`CLIMB_MAX`]) until they fail, to find the highest load each
//! sustains (every offered event and prediction served, predict p99 ≤ 10 ms): their quotient
//! is `capacity_vs_postgres`.
//!
//! Quiver runs as a `quiver serve` process of its own (or is the server at `--url`), so the
//! load generator's CPU is not its: each phase charges each design the server CPU it used in
//! the measured window, Quiver's from its `process_cpu_seconds_total`, PostgreSQL's summed
//! over its processes in `/proc` (postmaster, backends, WAL writer…).
//!
//! The peer is spared one cost Quiver pays: its "ML service" has no HTTP hop (it runs in the
//! load generator), while Quiver's predictions cross HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::cpu::{self, ServerCpu};
use crate::harness::{connect, request, token_of, visible, Sender, FEATURES};
use crate::load::{self, histogram, us, Window, Worker};
use crate::report::Report;
use crate::BenchArgs;
use quiver_core::token::Token;

/// The three upstream services: (name, first feature, one past the last).
const SERVICES: [(&str, usize, usize); 3] =
    [("pay", 0, 11), ("sess", 11, 22), ("dev", 22, FEATURES)];

/// Predict p99 above which a design no longer "sustains" a load.
const P99_LIMIT_US: f64 = 10_000.0;
/// Share of the offered events and predictions a design must serve to sustain a load (not 1:
/// an open-loop window cuts operations in flight at its edges).
const SERVED_MIN: f64 = 0.95;
/// Past `--levels`, a design still sustaining climbs by this factor…
const CLIMB_STEP: f64 = 1.5;
/// … up to this multiple of the offered load (then its capacity is a lower bound).
const CLIMB_MAX: f64 = 48.0;
/// How long a writer waits for its batch to become readable before counting it an error.
const VISIBLE_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Design {
    Quiver,
    Postgres,
}

impl Design {
    fn label(self) -> &'static str {
        match self {
            Design::Quiver => "quiver",
            Design::Postgres => "postgres",
        }
    }
}

/// `batch` distinct entity indices, sorted (a fixed lock order for the peer's upserts).
fn batch_keys(rng: &mut impl Rng, entities: usize, batch: usize) -> Vec<usize> {
    let batch = batch.min(entities);
    let start = rng.random_range(0..entities);
    let stride = entities / batch;
    let mut keys: Vec<usize> = (0..batch)
        .map(|j| (start + j * stride) % entities)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

fn value(rng: &mut impl Rng) -> f64 {
    (rng.random_range(0..97u32) as f64) / 48.0 - 1.0
}

/// What a writer measured in one phase's window.
struct WriteStats {
    window: Window,
    events: u64,
    /// Produced (the batch left) → readable.
    fresh: Histogram<u64>,
    /// Durable ack → applied to the store: the part of freshness after the write. Only Quiver
    /// has it; for the database design commit = visible.
    ack_visible: Option<Histogram<u64>>,
}

impl WriteStats {
    fn new(with_ack: bool) -> WriteStats {
        WriteStats {
            window: Window::new(0.0, 0.0),
            events: 0,
            fresh: histogram(),
            ack_visible: with_ack.then(histogram),
        }
    }

    /// A batch of `count` events that left at `start` is readable now (acked at `acked`).
    fn record(&mut self, start: Instant, acked: Option<Instant>, count: u64) -> Result<()> {
        if self.window.measures(start) {
            self.fresh
                .record(start.elapsed().as_micros().max(1) as u64)?;
            if let (Some(h), Some(acked)) = (&mut self.ack_visible, acked) {
                h.record(acked.elapsed().as_micros().max(1) as u64)?;
            }
            self.events += count;
        }
        Ok(())
    }

    /// Starts a new phase, returning the last one's figures.
    fn reset(&mut self, window: &Window) -> WriteStats {
        let fresh = WriteStats::new(self.ack_visible.is_some());
        let old = std::mem::replace(self, fresh);
        self.window = window.clone();
        old
    }
}

/// One pre-built write batch of an upstream service.
struct Batch {
    ndjson: Bytes,
    events: u64,
    /// A read of one of its rows (`/v1/features/{view}/{key}`).
    probe: String,
}

/// An upstream service's connection to Quiver.
struct QuiverWriter {
    http: Sender,
    batches: Arc<Vec<Batch>>,
    stats: WriteStats,
}

impl Worker for QuiverWriter {
    async fn call(&mut self, seq: u64, start: Instant) -> Result<bool> {
        let batch = &self.batches[seq as usize % self.batches.len()];
        let (status, reply) = request(
            &mut self.http,
            "POST",
            "/v1/events?ack=durable",
            batch.ndjson.clone(),
        )
        .await?;
        let acked = Instant::now();
        if status != 200 {
            return Ok(false);
        }
        let token = token_of(&reply)?;
        if !visible(&mut self.http, &batch.probe, &token, VISIBLE_WAIT).await? {
            return Ok(false);
        }
        self.stats.record(start, Some(acked), batch.events)?;
        Ok(true)
    }
}

/// An upstream service's connection to PostgreSQL.
struct PgWriter {
    client: tokio_postgres::Client,
    upsert: tokio_postgres::Statement,
    columns: std::ops::Range<usize>,
    entities: usize,
    batch: usize,
    rng: rand::rngs::StdRng,
    stats: WriteStats,
}

impl Worker for PgWriter {
    async fn call(&mut self, _seq: u64, start: Instant) -> Result<bool> {
        let keys = batch_keys(&mut self.rng, self.entities, self.batch);
        let names: Vec<String> = keys.iter().map(|k| format!("e{k}")).collect();
        let columns: Vec<Vec<f64>> = self
            .columns
            .clone()
            .map(|_| keys.iter().map(|_| value(&mut self.rng)).collect())
            .collect();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&names];
        params.extend(
            columns
                .iter()
                .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)),
        );
        if let Err(e) = self.client.execute(&self.upsert, &params).await {
            // A refused statement is an error reply; a dropped connection ends the worker.
            anyhow::ensure!(!self.client.is_closed(), "PostgreSQL connection lost: {e}");
            return Ok(false);
        }
        self.stats.record(start, None, keys.len() as u64)?;
        Ok(true)
    }
}

/// The ML service's path against Quiver: one predict request per prediction.
struct QuiverPredictor {
    http: Sender,
    entities: usize,
    rng: rand::rngs::StdRng,
}

impl Worker for QuiverPredictor {
    async fn call(&mut self, _seq: u64, _start: Instant) -> Result<bool> {
        let i = self.rng.random_range(0..self.entities);
        let body = Bytes::from(format!(r#"{{"entities":{{"user_id":"e{i}"}}}}"#));
        let (status, _) =
            request(&mut self.http, "POST", "/v1/models/gbdt32_3v/predict", body).await?;
        Ok(status == 200)
    }
}

/// The ML service's path against PostgreSQL: SELECT the row, then the same model in process.
struct PgPredictor {
    client: tokio_postgres::Client,
    select: tokio_postgres::Statement,
    model: Arc<dyn quiver_model::Model>,
    entities: usize,
    rng: rand::rngs::StdRng,
    row: Vec<f64>,
    out: Vec<f64>,
}

impl Worker for PgPredictor {
    async fn call(&mut self, _seq: u64, _start: Instant) -> Result<bool> {
        let key = format!("e{}", self.rng.random_range(0..self.entities));
        let Some(row) = self.client.query_opt(&self.select, &[&key]).await? else {
            return Ok(false);
        };
        for (c, slot) in self.row.iter_mut().enumerate() {
            *slot = row.get::<_, Option<f64>>(c).unwrap_or(f64::NAN);
        }
        self.model.predict(&self.row, &mut self.out)?;
        Ok(self.out[0].is_finite())
    }
}

/// One design at one offered load.
struct Phase {
    offered_events: f64,
    offered_predicts: f64,
    events_per_s: f64,
    event_errors: u64,
    fresh: Histogram<u64>,
    ack_visible: Option<Histogram<u64>>,
    /// The first connection a writer or predictor lost, if any.
    failure: Option<String>,
    predict: load::Outcome,
    /// Seconds of the measured window.
    secs: f64,
    /// CPU seconds the design's server spent in the measured window (`None`: not readable).
    server_cpu_s: Option<f64>,
}

impl Phase {
    fn sustained(&self) -> bool {
        self.events_per_s >= SERVED_MIN * self.offered_events
            && self.predict.ops_per_s() >= SERVED_MIN * self.offered_predicts
            && self.predict.p(0.99) <= P99_LIMIT_US
            && self.event_errors == 0
            && self.predict.errors == 0
    }

    /// Server CPU per event or prediction served, in µs.
    fn server_cpu_us_per_op(&self) -> Option<f64> {
        let ops = (self.events_per_s + self.predict.ops_per_s()) * self.secs;
        cpu::us_per_op(self.server_cpu_s, ops)
    }

    /// Cores the design's server kept busy.
    fn server_cores(&self) -> Option<f64> {
        self.server_cpu_s.map(|cpu| cpu / self.secs.max(1e-9))
    }

    fn to_json(&self) -> Value {
        json!({
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_us_per_op": self.server_cpu_us_per_op(),
            "server_cores": self.server_cores(),
            "offered_events_per_s": self.offered_events,
            "events_per_s": self.events_per_s,
            "event_errors": self.event_errors,
            "freshness_p50_us": us(&self.fresh, 0.5),
            "freshness_p99_us": us(&self.fresh, 0.99),
            "freshness_max_us": self.fresh.max() as f64,
            "freshness_samples": self.fresh.len(),
            "ack_to_visible_p50_us": self.ack_visible.as_ref().map(|h| us(h, 0.5)),
            "ack_to_visible_p99_us": self.ack_visible.as_ref().map(|h| us(h, 0.99)),
            "offered_predicts_per_s": self.offered_predicts,
            "predicts_per_s": self.predict.ops_per_s(),
            "predict_errors": self.predict.errors,
            "p50_us": self.predict.p(0.5),
            "p99_us": self.predict.p(0.99),
            "p999_us": self.predict.p(0.999),
            "sustained": self.sustained(),
            "failure": self.failure,
        })
    }
}

/// Both designs' connections, kept across the levels of the sweep.
struct Side<W: Worker, P: Worker> {
    writers: Vec<W>,
    predictors: Vec<P>,
    cpu: ServerCpu,
}

/// A writer's measurements, whichever design it writes to.
trait Writes {
    fn stats(&mut self) -> &mut WriteStats;
}

impl Writes for QuiverWriter {
    fn stats(&mut self) -> &mut WriteStats {
        &mut self.stats
    }
}

impl Writes for PgWriter {
    fn stats(&mut self) -> &mut WriteStats {
        &mut self.stats
    }
}

impl<W: Worker + Writes, P: Worker> Side<W, P> {
    /// Offers `events` events/s (in batches of `batch`) and `predicts` predictions/s together.
    async fn run(
        &mut self,
        events: f64,
        predicts: f64,
        batch: usize,
        args: &BenchArgs,
    ) -> Result<Phase> {
        let window = Window::new(args.warmup, args.duration);
        for w in &mut self.writers {
            w.stats().reset(&window);
        }
        let writers = std::mem::take(&mut self.writers);
        let predictors = std::mem::take(&mut self.predictors);
        let (w, p, server_cpu_s) = tokio::join!(
            load::drive(writers, Some(events / batch as f64), &window),
            load::drive(predictors, Some(predicts), &window),
            self.cpu.spent_in(&window),
        );
        let ((wout, mut writers), (predict, predictors)) = (w?, p?);
        let mut fresh = histogram();
        let mut ack_visible: Option<Histogram<u64>> = None;
        let mut count = 0;
        for w in &mut writers {
            let done = w.stats().reset(&window);
            count += done.events;
            fresh.add(done.fresh)?;
            if let Some(a) = done.ack_visible {
                ack_visible.get_or_insert_with(histogram).add(a)?;
            }
        }
        self.writers = writers;
        self.predictors = predictors;
        Ok(Phase {
            offered_events: events,
            offered_predicts: predicts,
            events_per_s: count as f64 / wout.secs.max(1e-9),
            event_errors: wout.errors,
            fresh,
            ack_visible,
            failure: wout.failure.or_else(|| predict.failure.clone()),
            predict,
            secs: wout.secs,
            server_cpu_s,
        })
    }
}

/// The offered loads, as multiples of `--rate` / `--predict-rate`: ascending, always with 1.
fn levels(spec: &str) -> Result<Vec<f64>> {
    let mut out = vec![1.0];
    for part in spec.split(',').filter(|s| !s.trim().is_empty()) {
        let f: f64 = part
            .trim()
            .parse()
            .with_context(|| format!("--levels: {part:?}"))?;
        anyhow::ensure!(
            f > 0.0 && f.is_finite(),
            "--levels: {f} is not a positive number"
        );
        out.push(f);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    out.dedup();
    Ok(out)
}

/// The next load to offer after factor `last`, if any design still climbs.
fn next_level(last: f64, quiver_going: bool, pg_going: bool) -> Option<f64> {
    // Two significant digits (1.5, 2.3, 3.4, 5.1, 7.6, 11, 17…): loads a reader can compare.
    let raw = last * CLIMB_STEP;
    let e = raw.log10().floor() as i32 - 1;
    let next = if e < 0 {
        // Divide by an exact power of ten, so 2.3 prints as 2.3.
        let k = 10f64.powi(-e);
        (raw * k).round() / k
    } else {
        let unit = 10f64.powi(e);
        (raw / unit).round() * unit
    };
    ((quiver_going || pg_going) && next <= CLIMB_MAX).then_some(next)
}

/// Where Quiver listens: `--url`, or a `quiver serve` child started here (kept alive by the
/// returned guard).
fn quiver_server(
    args: &BenchArgs,
) -> Result<(
    SocketAddr,
    Option<crate::harness::ServeChild>,
    tempfile::TempDir,
)> {
    let dir = tempfile::tempdir()?;
    if let Some(url) = &args.url {
        return Ok((parse_url(url)?, None, dir));
    }
    let config = crate::harness::bench_config_text(dir.path());
    let child =
        crate::harness::ServeChild::start(dir.path(), &config, crate::harness::free_port()?)?;
    Ok((child.addr, Some(child), dir))
}

/// `http://HOST:PORT[/]` as a socket address.
fn parse_url(url: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let host = url
        .strip_prefix("http://")
        .map(|h| h.trim_end_matches('/'))
        .filter(|h| !h.contains('/'))
        .with_context(|| format!("--url {url:?}: expected http://HOST:PORT"))?;
    host.to_socket_addrs()
        .with_context(|| format!("--url {url:?}"))?
        .next()
        .with_context(|| format!("--url {url:?}: resolves to no address"))
}

/// The benchmark GBDT, as the peer's ML service loads it.
fn peer_model() -> Result<Arc<dyn quiver_model::Model>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benchmarks/models/gbdt32_3v/1/model.txt"
    );
    let text = std::fs::read_to_string(path).with_context(|| path.to_string())?;
    Ok(Arc::new(quiver_model::trees::Forest::from_lightgbm_text(
        &text,
    )?))
}

/// One offered load's phases, per design (`None`: the design had already failed).
type Row = (f64, Option<Phase>, Option<Phase>);

pub fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let levels = levels(&args.levels)?;
    let (addr, _server, _dir) = quiver_server(args)?;
    let model = peer_model()?;
    let events = if args.rate > 0.0 { args.rate } else { 50_000.0 };
    let predicts = args.predict_rate;
    let (n, batch, writers, readers) = (
        args.entities.max(args.write_batch),
        args.write_batch.max(1),
        args.writers.max(1),
        args.connections.max(1),
    );
    let prefix = format!("quiver_dc_{}", std::process::id());
    let client_rt = cpu::client_runtime()?;
    let pg = args.postgres.clone();
    let rows = client_rt.block_on(async {
        let (admin, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(conn);
        let out = async {
            create_tables(&admin, &prefix).await?;
            preload(&admin, &prefix, addr, n).await?;
            let mut quiver = Side {
                writers: quiver_writers(addr, n, batch, writers).await?,
                predictors: quiver_predictors(addr, n, readers).await?,
                cpu: ServerCpu::Metrics(addr),
            };
            let mut postgres = Side {
                writers: pg_writers(&pg, &prefix, n, batch, writers).await?,
                predictors: pg_predictors(&pg, &prefix, &model, n, readers).await?,
                cpu: ServerCpu::Processes("postgres"),
            };
            sweep(
                &mut quiver,
                &mut postgres,
                levels,
                events,
                predicts,
                batch,
                args,
            )
            .await
        }
        .await;
        let dropped = admin
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {prefix}_pay, {prefix}_sess, {prefix}_dev"
            ))
            .await;
        let rows = out?;
        dropped?;
        anyhow::Ok(rows)
    })?;
    write_report(
        report, args, events, predicts, batch, writers, readers, n, &rows,
    )
}

/// Runs both designs at each of `levels` (× the offered load), then climbs while one still
/// sustains. A design that failed a load at or above the offered one is not run higher.
#[allow(clippy::too_many_arguments)]
async fn sweep(
    quiver: &mut Side<QuiverWriter, QuiverPredictor>,
    postgres: &mut Side<PgWriter, PgPredictor>,
    mut levels: Vec<f64>,
    events: f64,
    predicts: f64,
    batch: usize,
    args: &BenchArgs,
) -> Result<Vec<Row>> {
    let mut rows: Vec<Row> = Vec::new();
    let (mut quiver_going, mut pg_going) = (true, true);
    let mut i = 0;
    while let Some(&f) = levels.get(i) {
        let q = if quiver_going || f <= 1.0 {
            Some(quiver.run(events * f, predicts * f, batch, args).await?)
        } else {
            None
        };
        let p = if pg_going || f <= 1.0 {
            Some(postgres.run(events * f, predicts * f, batch, args).await?)
        } else {
            None
        };
        if f >= 1.0 {
            quiver_going &= q.as_ref().is_some_and(Phase::sustained);
            pg_going &= p.as_ref().is_some_and(Phase::sustained);
        }
        rows.push((f, q, p));
        i += 1;
        if i == levels.len() {
            levels.extend(next_level(f, quiver_going, pg_going));
        }
    }
    Ok(rows)
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    report: &mut Report,
    args: &BenchArgs,
    events: f64,
    predicts: f64,
    batch: usize,
    writers: usize,
    readers: usize,
    n: usize,
    rows: &[Row],
) -> Result<Value> {
    let at = |f: f64, d: Design| {
        rows.iter().find(|r| r.0 == f).and_then(|r| {
            if d == Design::Quiver {
                r.1.as_ref()
            } else {
                r.2.as_ref()
            }
        })
    };
    let (q, p) = (
        at(1.0, Design::Quiver).expect("level 1 always runs"),
        at(1.0, Design::Postgres).expect("level 1 always runs"),
    );
    say!(
            report,
        "\n## decoupling: {events:.0} events/s from 3 services ({writers} connections each, {batch} per write) + {predicts:.0} predicts/s ({readers} connections), {n} entities × {FEATURES} features, open loop\n"
    );
    say!(report, "| design | achieved events/s | freshness p50 / p99 / max (ms) | predicts/s | predict p50 / p99 / p99.9 (ms) | errors (events / predicts) | server CPU: µs per event or predict (cores) |");
    say!(report, "|---|---|---|---|---|---|---|");
    for (name, ph) in [
        ("Quiver (log → memory, predict in process)", q),
        ("PostgreSQL as the queue (UPSERT + SELECT)", p),
    ] {
        say!(
            report,
            "| {name} | {:.0} | {:.2} / {:.2} / {:.0} | {:.0} | {:.2} / {:.2} / {:.2} | {} / {} | {} |",
            ph.events_per_s,
            us(&ph.fresh, 0.5) / 1e3,
            us(&ph.fresh, 0.99) / 1e3,
            ph.fresh.max() as f64 / 1e3,
            ph.predict.ops_per_s(),
            ph.predict.p(0.5) / 1e3,
            ph.predict.p(0.99) / 1e3,
            ph.predict.p(0.999) / 1e3,
            ph.event_errors,
            ph.predict.errors,
            cpu_cell(ph),
        );
    }
    let ratio = |a: f64, b: f64| a / b.max(1e-9);
    let event_rate = ratio(q.events_per_s, p.events_per_s);
    let freshness = ratio(us(&q.fresh, 0.99), us(&p.fresh, 0.99));
    let throughput = ratio(q.predict.ops_per_s(), p.predict.ops_per_s());
    let p99 = ratio(q.predict.p(0.99), p.predict.p(0.99));
    if let Some(a) = &q.ack_visible {
        say!(
            report,
            "\nfreshness counts from when the service produced the batch (its due time) to readable; Quiver's share after its durable ack: p50 {:.3} ms, p99 {:.3} ms (PostgreSQL: commit = visible)",
            us(a, 0.5) / 1e3,
            us(a, 0.99) / 1e3
        );
    }
    say!(report, "\nQuiver ÷ PostgreSQL: events/s **{event_rate:.2}×**, freshness p99 **{freshness:.4}×**, predicts/s **{throughput:.2}×**, predict p99 **{p99:.3}×**\n");

    say!(report, "| offered load (× offered) | events/s + predicts/s offered | Quiver: events/s, predicts/s, p99 ms; server CPU µs/op (cores) | PostgreSQL: events/s, predicts/s, p99 ms; server CPU µs/op (cores) |");
    say!(report, "|---|---|---|---|");
    let cell = |ph: Option<&Phase>| match ph {
        Some(ph) => format!(
            "{:.0}, {:.0}, {:.2}{}; {}",
            ph.events_per_s,
            ph.predict.ops_per_s(),
            ph.predict.p(0.99) / 1e3,
            if ph.sustained() { "" } else { " ✗" },
            cpu_cell(ph)
        ),
        None => "— (failed a lower load)".into(),
    };
    for (f, qp, pp) in rows {
        say!(
            report,
            "| {f}× | {:.0} + {:.0} | {} | {} |",
            events * f,
            predicts * f,
            cell(qp.as_ref()),
            cell(pp.as_ref())
        );
    }
    let max_sustained = |d: Design| -> Value {
        rows.iter()
            .filter_map(|r| {
                let ph = if d == Design::Quiver { r.1.as_ref() } else { r.2.as_ref() };
                ph.filter(|ph| ph.sustained()).map(|ph| (r.0, ph))
            })
            .next_back()
            .map(|(f, ph)| json!({"factor": f, "events_per_s": ph.offered_events, "predicts_per_s": ph.offered_predicts, "total_per_s": ph.offered_events + ph.offered_predicts}))
            .unwrap_or(Value::Null)
    };
    let (mq, mp) = (
        max_sustained(Design::Quiver),
        max_sustained(Design::Postgres),
    );
    let show = |v: &Value| match v["total_per_s"].as_f64() {
        Some(t) => format!("{t:.0} events+predicts/s ({}×)", v["factor"]),
        None => "none of the levels measured".into(),
    };
    say!(
            report,
        "\nhighest load sustained (every event and prediction served, predict p99 ≤ 10 ms; ✗ = not): Quiver {}, PostgreSQL {}",
        show(&mq),
        show(&mp)
    );
    let capacity = capacity(&mq, &mp);
    match capacity {
        Some((ratio, lower_bound)) => say!(
            report,
            "capacity, Quiver ÷ PostgreSQL: **{ratio:.2}×**{}\n",
            if lower_bound {
                format!(" (a lower bound: Quiver still sustained {CLIMB_MAX}× the offered load, where the climb stops)")
            } else {
                String::new()
            }
        ),
        None => say!(
            report,
            "capacity, Quiver ÷ PostgreSQL: not measured (a design sustained none of the loads)\n"
        ),
    }
    if let Some(dir) = &args.plot {
        let series = |d: Design| -> Vec<crate::plot::Point> {
            rows.iter()
                .filter_map(|r| {
                    let ph = if d == Design::Quiver {
                        r.1.as_ref()
                    } else {
                        r.2.as_ref()
                    };
                    ph.map(|ph| crate::plot::Point {
                        offered: ph.offered_events + ph.offered_predicts,
                        p50_ms: ph.predict.p(0.5) / 1e3,
                        p99_ms: ph.predict.p(0.99) / 1e3,
                        p999_ms: ph.predict.p(0.999) / 1e3,
                        freshness_p99_ms: us(&ph.fresh, 0.99) / 1e3,
                    })
                })
                .collect()
        };
        let files = crate::plot::decoupling(
            dir,
            &[
                ("Quiver", series(Design::Quiver)),
                ("PostgreSQL as the queue", series(Design::Postgres)),
            ],
        )?;
        for f in files {
            say!(report, "chart: {}", f.display());
        }
    }
    let levels: Vec<Value> = rows
        .iter()
        .map(|(f, qp, pp)| {
            json!({
                "factor": f,
                "quiver": qp.as_ref().map(Phase::to_json),
                "postgres": pp.as_ref().map(Phase::to_json),
            })
        })
        .collect();
    Ok(json!({
        "offered_events_per_s": events,
        "offered_predicts_per_s": predicts,
        "write_batch": batch,
        "writers_per_service": writers,
        "predict_connections": readers,
        "entities": n,
        Design::Quiver.label(): q.to_json(),
        Design::Postgres.label(): p.to_json(),
        "levels": levels,
        "max_sustained": {"quiver": mq, "postgres": mp},
        "capacity_vs_postgres": capacity.map(|c| c.0),
        "capacity_is_lower_bound": capacity.map(|c| c.1),
        "event_rate_vs_postgres": event_rate,
        "freshness_p99_vs_postgres": freshness,
        "predict_throughput_vs_postgres": throughput,
        "p99_vs_postgres": p99,
    }))
}

/// `µs/op (cores)` of a phase's server CPU, or `—` when it could not be read.
fn cpu_cell(ph: &Phase) -> String {
    match (ph.server_cpu_us_per_op(), ph.server_cores()) {
        (Some(us), Some(cores)) => format!("{us:.1} ({cores:.2})"),
        _ => "—".into(),
    }
}

/// Quiver's highest sustained load ÷ PostgreSQL's, and whether it is only a lower bound (Quiver
/// was still sustaining where the climb stops).
fn capacity(quiver: &Value, postgres: &Value) -> Option<(f64, bool)> {
    let (q, p) = (
        quiver["total_per_s"].as_f64()?,
        postgres["total_per_s"].as_f64()?,
    );
    let lower_bound = quiver["factor"].as_f64()? * CLIMB_STEP > CLIMB_MAX;
    Some((q / p, lower_bound))
}

async fn create_tables(admin: &tokio_postgres::Client, prefix: &str) -> Result<()> {
    for (svc, lo, hi) in SERVICES {
        let cols: Vec<String> = (lo..hi).map(|i| format!("f{i} double precision")).collect();
        admin
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS {prefix}_{svc}; CREATE TABLE {prefix}_{svc} (user_id text PRIMARY KEY, {})",
                cols.join(", ")
            ))
            .await?;
    }
    Ok(())
}

fn upsert_sql(prefix: &str, svc: &str, lo: usize, hi: usize) -> String {
    let cols: Vec<String> = (lo..hi).map(|i| format!("f{i}")).collect();
    let arrays: Vec<String> = (1..=hi - lo)
        .map(|k| format!("${}::float8[]", k + 1))
        .collect();
    let sets: Vec<String> = cols.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect();
    format!(
        "INSERT INTO {prefix}_{svc} (user_id, {}) SELECT * FROM unnest($1::text[], {}) \
         ON CONFLICT (user_id) DO UPDATE SET {}",
        cols.join(", "),
        arrays.join(", "),
        sets.join(", ")
    )
}

/// Every entity gets a row in both designs before anything is measured.
async fn preload(
    admin: &tokio_postgres::Client,
    prefix: &str,
    addr: SocketAddr,
    n: usize,
) -> Result<()> {
    let mut http = connect(addr).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut written = Token::new();
    for (svc, lo, hi) in SERVICES {
        let upsert = admin.prepare(&upsert_sql(prefix, svc, lo, hi)).await?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let names: Vec<String> = chunk.iter().map(|k| format!("e{k}")).collect();
            let columns: Vec<Vec<f64>> = (lo..hi)
                .map(|_| chunk.iter().map(|_| value(&mut rng)).collect())
                .collect();
            let mut lines = Vec::with_capacity(chunk.len());
            for (j, name) in names.iter().enumerate() {
                let values: Vec<String> = (lo..hi)
                    .map(|c| format!("\"f{c}\":{}", columns[c - lo][j]))
                    .collect();
                lines.push(format!(
                    r#"{{"view":"{svc}","key":"{name}","values":{{{}}}}}"#,
                    values.join(",")
                ));
            }
            let body = Bytes::from(lines.join("\n"));
            let (status, reply) = request(&mut http, "POST", "/v1/events", body).await?;
            anyhow::ensure!(
                status == 200,
                "preload: {}",
                String::from_utf8_lossy(&reply)
            );
            for &(p, next) in token_of(&reply)?.positions() {
                written.advance(p, next);
            }
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&names];
            params.extend(
                columns
                    .iter()
                    .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync)),
            );
            admin.execute(&upsert, &params).await?;
        }
    }
    let wait = Duration::from_secs(120);
    anyhow::ensure!(
        visible(&mut http, "/v1/features/pay/e0", &written, wait).await?,
        "the preloaded rows were not readable within {wait:?}"
    );
    admin
        .batch_execute(&format!(
            "ANALYZE {prefix}_pay, {prefix}_sess, {prefix}_dev"
        ))
        .await?;
    Ok(())
}

async fn quiver_writers(
    addr: SocketAddr,
    n: usize,
    batch: usize,
    per_service: usize,
) -> Result<Vec<QuiverWriter>> {
    let mut out = Vec::new();
    for (s, (svc, lo, hi)) in SERVICES.into_iter().enumerate() {
        // Pre-built bodies: the generator should spend its CPU sending, not formatting.
        let mut rng = rand::rngs::StdRng::seed_from_u64(10 + s as u64);
        let batches: Arc<Vec<Batch>> = Arc::new(
            (0..64)
                .map(|_| {
                    let keys = batch_keys(&mut rng, n, batch);
                    let lines: Vec<String> = keys
                        .iter()
                        .map(|k| {
                            let values: Vec<String> = (lo..hi)
                                .map(|c| format!("\"f{c}\":{}", value(&mut rng)))
                                .collect();
                            format!(
                                r#"{{"view":"{svc}","key":"e{k}","values":{{{}}}}}"#,
                                values.join(",")
                            )
                        })
                        .collect();
                    Batch {
                        ndjson: Bytes::from(lines.join("\n")),
                        events: keys.len() as u64,
                        probe: format!("/v1/features/{svc}/e{}", keys[0]),
                    }
                })
                .collect(),
        );
        for _ in 0..per_service {
            out.push(QuiverWriter {
                http: connect(addr).await?,
                batches: batches.clone(),
                stats: WriteStats::new(true),
            });
        }
    }
    Ok(out)
}

async fn quiver_predictors(
    addr: SocketAddr,
    n: usize,
    count: usize,
) -> Result<Vec<QuiverPredictor>> {
    let mut out = Vec::new();
    for c in 0..count {
        out.push(QuiverPredictor {
            http: connect(addr).await?,
            entities: n,
            rng: rand::rngs::StdRng::seed_from_u64(100 + c as u64),
        });
    }
    Ok(out)
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // The default, stated: every acknowledged write is on disk, as Quiver's ack=durable.
    client.batch_execute("SET synchronous_commit = on").await?;
    Ok(client)
}

async fn pg_writers(
    url: &str,
    prefix: &str,
    n: usize,
    batch: usize,
    per_service: usize,
) -> Result<Vec<PgWriter>> {
    let mut out = Vec::new();
    for (s, (svc, lo, hi)) in SERVICES.into_iter().enumerate() {
        for c in 0..per_service {
            let client = pg_connect(url).await?;
            let upsert = client.prepare(&upsert_sql(prefix, svc, lo, hi)).await?;
            out.push(PgWriter {
                client,
                upsert,
                columns: lo..hi,
                entities: n,
                batch,
                rng: rand::rngs::StdRng::seed_from_u64((s * 1000 + c) as u64),
                stats: WriteStats::new(false),
            });
        }
    }
    Ok(out)
}

async fn pg_predictors(
    url: &str,
    prefix: &str,
    model: &Arc<dyn quiver_model::Model>,
    n: usize,
    count: usize,
) -> Result<Vec<PgPredictor>> {
    let cols: Vec<String> = (0..FEATURES).map(|i| format!("f{i}")).collect();
    let sql = format!(
        "SELECT {} FROM {prefix}_pay JOIN {prefix}_sess USING (user_id) JOIN {prefix}_dev USING (user_id) WHERE user_id = $1",
        cols.join(", ")
    );
    let mut out = Vec::new();
    for c in 0..count {
        let client = pg_connect(url).await?;
        let select = client.prepare(&sql).await?;
        out.push(PgPredictor {
            client,
            select,
            model: model.clone(),
            entities: n,
            rng: rand::rngs::StdRng::seed_from_u64(100 + c as u64),
            row: vec![0.0; FEATURES],
            out: vec![0.0; model.outputs()],
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_keys_are_distinct_sorted_and_in_range() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (entities, batch) in [(1000, 100), (100, 100), (7, 100), (1, 1), (1001, 3)] {
            let keys = batch_keys(&mut rng, entities, batch);
            assert_eq!(keys.len(), batch.min(entities));
            assert!(keys.windows(2).all(|w| w[0] < w[1]), "{keys:?}");
            assert!(keys.iter().all(|&k| k < entities));
        }
    }

    #[test]
    fn the_sweep_climbs_while_a_design_sustains_and_stops_at_the_cap() {
        assert_eq!(next_level(3.0, true, false), Some(4.5));
        assert_eq!(next_level(3.0, false, true), Some(4.5));
        assert_eq!(next_level(7.6, true, true), Some(11.0));
        assert_eq!(next_level(2.25, true, true), Some(3.4));
        assert_eq!(next_level(3.0, false, false), None);
        let mut f = 1.0;
        let mut steps = 0;
        while let Some(next) = next_level(f, true, true) {
            assert!(next > f && next <= CLIMB_MAX);
            (f, steps) = (next, steps + 1);
        }
        assert!(
            f * CLIMB_STEP > CLIMB_MAX && steps < 20,
            "{f} after {steps} steps"
        );
    }

    #[test]
    fn capacity_is_the_quotient_of_the_highest_sustained_loads() {
        let at = |factor: f64, total: f64| json!({"factor": factor, "total_per_s": total});
        assert_eq!(
            capacity(&at(3.0, 300.0), &at(1.0, 100.0)),
            Some((3.0, false))
        );
        let (_, lower) = capacity(&at(CLIMB_MAX, 4800.0), &at(1.0, 100.0)).unwrap();
        assert!(lower, "Quiver still sustained at the top of the climb");
        assert_eq!(capacity(&at(1.0, 100.0), &Value::Null), None);
    }

    #[test]
    fn urls_name_a_host_and_port() {
        assert_eq!(parse_url("http://127.0.0.1:7070/").unwrap().port(), 7070);
        assert!(parse_url("127.0.0.1:7070").is_err());
        assert!(parse_url("http://127.0.0.1:7070/v1").is_err());
    }

    #[test]
    fn levels_always_hold_the_offered_load() {
        assert_eq!(levels("").unwrap(), vec![1.0]);
        assert_eq!(levels("2, 0.5,1").unwrap(), vec![0.5, 1.0, 2.0]);
        assert!(levels("0").is_err());
        assert!(levels("fast").is_err());
    }

    #[test]
    fn the_upsert_names_every_column_once() {
        let sql = upsert_sql("t", "pay", 0, 3);
        assert!(sql.contains("(user_id, f0, f1, f2)"), "{sql}");
        assert!(sql.contains("$4::float8[]") && !sql.contains("$5"), "{sql}");
        assert!(sql.ends_with("f2 = EXCLUDED.f2"), "{sql}");
    }
}
