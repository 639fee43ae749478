//! `quiver demo`: the decoupled design running, on this machine, in one command.
//!
//! An embedded Quiver on a temporary data dir with the bundled fraud example (`examples/fraud`,
//! compiled into the binary so the demo runs from anywhere), three simulated upstream services
//! (payments, sessions, device risk) POSTing events over the real HTTP API at `--rate`, and a
//! model service asking for `--predict-rate` predictions of random users; a live view once a
//! second and a summary at the end (or on Ctrl-C).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use quiver_bench::harness::{connect, post_durable_visible, request, Embedded, Sender};
use quiver_bench::load::{self, histogram, us, Window, Worker};

const CONFIG: &str = include_str!("../../../examples/fraud/quiver.toml");
const MODEL_CONFIG: &str = include_str!("../../../examples/fraud/models/fraud_gbdt/config.toml");
const MODEL: &str = include_str!("../../../examples/fraud/models/fraud_gbdt/1/model.txt");
const MODEL_NAME: &str = "fraud_gbdt";
/// Connections of the simulated model service (enough for the default predict rate to leave
/// on schedule; the rate, not this, sets the load).
const PREDICT_CONNECTIONS: u64 = 8;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Seconds to run (0: until Ctrl-C).
    #[arg(long, default_value_t = 0.0)]
    pub duration: f64,
    /// Events per second the three upstream services offer together (open loop).
    #[arg(long, default_value_t = 50_000.0)]
    pub rate: f64,
    /// Predictions per second for random users (open loop).
    #[arg(long, default_value_t = 1_000.0)]
    pub predict_rate: f64,
    /// Users the events and predictions spread over.
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Events per POST from each service.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Connections per upstream service.
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// PostgreSQL for the history sink (`host=127.0.0.1 user=postgres dbname=test`); off
    /// without it. The demo's table is dropped at the end.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Write the summary as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The upstream services: name, view, share of the event rate.
const SERVICES: [(&str, &str, f64); 3] = [
    ("payments", "payments", 0.5),
    ("user sessions", "sessions", 0.3),
    ("device risk", "device", 0.2),
];

/// Counters the workers bump and the live view reads; histograms are per second, merged into
/// the run's totals at each refresh.
#[derive(Default)]
struct Live {
    events: AtomicU64,
    event_errors: AtomicU64,
    predicts: AtomicU64,
    predict_errors: AtomicU64,
    latency: Mutex<Option<Histogram<u64>>>,
    freshness: Mutex<Option<Histogram<u64>>>,
}

impl Live {
    fn record(slot: &Mutex<Option<Histogram<u64>>>, started: Instant) {
        let v = started.elapsed().as_micros().max(1) as u64;
        let _ = slot.lock().get_or_insert_with(histogram).record(v);
    }
    fn take(slot: &Mutex<Option<Histogram<u64>>>) -> Histogram<u64> {
        slot.lock().take().unwrap_or_else(histogram)
    }
}

fn event_line(rng: &mut impl Rng, view: &str, users: usize) -> String {
    let user = rng.random_range(0..users);
    let values = match view {
        "payments" => format!(
            r#""amount":{:.2},"merchant_risk":{:.3},"foreign":{}"#,
            rng.random_range(1.0..400.0f64),
            rng.random_range(0.0..1.0f64).powi(3),
            rng.random_bool(0.1)
        ),
        "sessions" => format!(
            r#""session_seconds":{:.1},"pages":{},"login_failures":{}"#,
            rng.random_range(5.0..900.0f64),
            rng.random_range(1..40),
            u8::from(rng.random_bool(0.05))
        ),
        _ => format!(
            r#""device_score":{:.3},"emulator":{},"new_device":{}"#,
            rng.random_range(0.0..1.0f64).powi(2),
            rng.random_bool(0.03),
            rng.random_bool(0.15)
        ),
    };
    format!(r#"{{"view":"{view}","key":"u{user}","values":{{{values}}}}}"#)
}

/// One upstream service connection: POSTs a batch, waits for the durable ack, then for the
/// batch to be readable: that gap is the freshness shown.
struct Producer {
    http: Sender,
    node: Arc<quiver_server::Node>,
    bodies: Arc<Vec<(Bytes, u64)>>,
    live: Arc<Live>,
}

impl Worker for Producer {
    async fn call(&mut self, seq: u64, _due: Instant) -> Result<bool> {
        let (body, count) = &self.bodies[seq as usize % self.bodies.len()];
        let applied = post_durable_visible(
            &mut self.http,
            &self.node,
            body.clone(),
            Duration::from_secs(10),
        )
        .await?;
        let Some(acked) = applied else {
            self.live.event_errors.fetch_add(*count, Ordering::Relaxed);
            return Ok(false);
        };
        self.live.events.fetch_add(*count, Ordering::Relaxed);
        Live::record(&self.live.freshness, acked);
        Ok(true)
    }
}

struct Predictor {
    http: Sender,
    users: usize,
    rng: rand::rngs::StdRng,
    live: Arc<Live>,
}

impl Worker for Predictor {
    async fn call(&mut self, _seq: u64, start: Instant) -> Result<bool> {
        let body = Bytes::from(format!(
            r#"{{"entities":{{"user_id":"u{}"}},"features":{{"amount":{:.2}}}}}"#,
            self.rng.random_range(0..self.users),
            self.rng.random_range(1.0..400.0f64)
        ));
        let (status, _) = request(
            &mut self.http,
            "POST",
            "/v1/models/fraud_gbdt/predict",
            body,
        )
        .await?;
        if status == 200 {
            self.live.predicts.fetch_add(1, Ordering::Relaxed);
            // From when it was due if the server made it late: a stall is charged in full.
            Live::record(&self.live.latency, start);
            Ok(true)
        } else {
            self.live.predict_errors.fetch_add(1, Ordering::Relaxed);
            Ok(false)
        }
    }
}

/// The bundled example written into `dir`: its config with the data dir and repository there.
fn example(dir: &std::path::Path, postgres: Option<&str>) -> Result<quiver_core::Config> {
    let version = dir.join("models").join(MODEL_NAME).join("1");
    std::fs::create_dir_all(&version)?;
    std::fs::write(
        dir.join("models").join(MODEL_NAME).join("config.toml"),
        MODEL_CONFIG,
    )?;
    std::fs::write(version.join("model.txt"), MODEL)?;
    let mut config =
        quiver_core::Config::from_toml_with_env(CONFIG, Vec::<(String, String)>::new())?;
    config.server.data_dir = dir.join("data");
    config.models.repository = dir.join("models");
    if let Some(url) = postgres {
        config.history.postgres_url = Some(url.to_string());
        config.history.table = format!("quiver_demo_{}", std::process::id());
    }
    Ok(config)
}

/// Records of the log not yet applied to the store, and not yet in the history sink.
fn lags(node: &quiver_server::Node) -> (u64, Option<u64>) {
    let streams = 0..node.log.streams().len() as u32;
    let end = |s| node.log.high_watermark(s).unwrap_or(0);
    let materializer = streams
        .clone()
        .map(|s| end(s).saturating_sub(node.store.applied_offset(s)))
        .sum();
    let history = node.history.as_ref().map(|h| {
        streams
            .map(|s| end(s).saturating_sub(h.committed_offset(s)))
            .sum()
    });
    (materializer, history)
}

fn ms(h: &Histogram<u64>, q: f64) -> String {
    if h.is_empty() {
        "—".into()
    } else {
        format!("{:.2} ms", us(h, q) / 1e3)
    }
}

pub fn run(args: DemoArgs) -> Result<()> {
    anyhow::ensure!(args.users > 0, "--users must be at least 1");
    anyhow::ensure!(
        args.rate >= 0.0 && args.predict_rate >= 0.0,
        "rates are events (or predictions) per second, ≥ 0"
    );
    let dir = tempfile::tempdir()?;
    let config = example(dir.path(), args.postgres.as_deref())?;
    let history_table = config.history.table.clone();
    let q = Embedded::start(config, dir).context("starting the embedded Quiver")?;
    if let Some(reason) = q.node.not_ready_reason() {
        anyhow::bail!("the demo's node is not ready: {reason}");
    }
    let client_rt = quiver_bench::cpu::client_runtime()?;
    let live = Arc::new(Live::default());
    let duration = if args.duration > 0.0 {
        args.duration
    } else {
        1e9
    };
    let window = Window::new(0.0, duration);
    let tty = std::io::stdout().is_terminal();
    println!(
        "Quiver demo: fraud detection (examples/fraud) on http://{}; a temporary data dir; Ctrl-C stops",
        q.addr
    );
    println!(
        "three upstream services POST /v1/events?ack=durable, {:.0} events/s offered in all; {:.0} predictions/s of model {MODEL_NAME} for random users among {}\n",
        args.rate, args.predict_rate, args.users
    );
    let (addr, node) = (q.addr, q.node.clone());
    let started = Instant::now();
    let summary = client_rt.block_on(async {
        let mut loads = Vec::new();
        for (s, (_, view, share)) in SERVICES.into_iter().enumerate() {
            let rate = args.rate * share;
            if rate <= 0.0 {
                continue;
            }
            // Pre-built bodies: the generator should spend its CPU sending, not formatting.
            let mut rng = rand::rngs::StdRng::seed_from_u64(s as u64);
            let bodies: Arc<Vec<(Bytes, u64)>> = Arc::new(
                (0..256)
                    .map(|_| {
                        let lines: Vec<String> = (0..args.batch.max(1))
                            .map(|_| event_line(&mut rng, view, args.users))
                            .collect();
                        (Bytes::from(lines.join("\n")), lines.len() as u64)
                    })
                    .collect(),
            );
            let mut producers = Vec::new();
            for _ in 0..args.connections.max(1) {
                producers.push(Producer {
                    http: connect(addr).await?,
                    node: node.clone(),
                    bodies: bodies.clone(),
                    live: live.clone(),
                });
            }
            let window = window.clone();
            let per_post = rate / args.batch.max(1) as f64;
            loads.push(tokio::spawn(async move {
                load::drive(producers, Some(per_post), &window).await.map(|(o, _)| o)
            }));
        }
        if args.predict_rate > 0.0 {
            let mut predictors = Vec::new();
            for c in 0..PREDICT_CONNECTIONS {
                predictors.push(Predictor {
                    http: connect(addr).await?,
                    users: args.users,
                    rng: rand::rngs::StdRng::seed_from_u64(1000 + c),
                    live: live.clone(),
                });
            }
            let (window, rate) = (window.clone(), args.predict_rate);
            loads.push(tokio::spawn(async move {
                load::drive(predictors, Some(rate), &window).await.map(|(o, _)| o)
            }));
        }
        let stop = window.stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                stop.store(true, Ordering::Relaxed);
            }
        });

        let mut total_latency = histogram();
        let mut total_fresh = histogram();
        let (mut last_events, mut last_predicts) = (0, 0);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut max_lag = 0;
        loop {
            let done = tokio::select! {
                _ = tick.tick() => false,
                _ = wait_stop(&window) => true,
            };
            let secs = started.elapsed().as_secs_f64();
            let (events, predicts) = (
                live.events.load(Ordering::Relaxed),
                live.predicts.load(Ordering::Relaxed),
            );
            let errors = live.event_errors.load(Ordering::Relaxed)
                + live.predict_errors.load(Ordering::Relaxed);
            let latency = Live::take(&live.latency);
            let fresh = Live::take(&live.freshness);
            total_latency.add(&latency)?;
            total_fresh.add(&fresh)?;
            let (mat_lag, hist_lag) = lags(&node);
            max_lag = max_lag.max(mat_lag);
            if !done {
                let view = [
                    format!("Quiver demo · {secs:.0} s · Ctrl-C stops"),
                    format!("  events ingested     {:>9} /s   (total {events})", events - last_events),
                    format!("  predicts            {:>9} /s   p50 {}   p99 {}", predicts - last_predicts, ms(&latency, 0.5), ms(&latency, 0.99)),
                    format!("  freshness           ack → visible   p50 {}   p99 {}", ms(&fresh, 0.5), ms(&fresh, 0.99)),
                    format!("  materializer lag    {mat_lag} records"),
                    format!("  history sink lag    {}", hist_lag.map_or("off (--postgres URL turns it on)".to_string(), |l| format!("{l} records"))),
                    format!("  errors              {errors}"),
                ];
                let mut out = std::io::stdout().lock();
                if tty {
                    // Redraw in place: cursor home, clear below.
                    write!(out, "\x1b[H\x1b[J")?;
                    writeln!(out, "{}", view.join("\n"))?;
                } else {
                    writeln!(
                        out,
                        "t={secs:.0}s events/s={} predicts/s={} p50={} p99={} freshness_p99={} materializer_lag={mat_lag} history_lag={} errors={errors}",
                        events - last_events,
                        predicts - last_predicts,
                        ms(&latency, 0.5),
                        ms(&latency, 0.99),
                        ms(&fresh, 0.99),
                        hist_lag.map_or("off".to_string(), |l| l.to_string()),
                    )?;
                }
                out.flush()?;
            }
            (last_events, last_predicts) = (events, predicts);
            if done {
                break;
            }
        }
        window.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for l in loads {
            if let Some(f) = l.await??.failure {
                failures.push(f);
            }
        }
        let secs = started.elapsed().as_secs_f64();
        anyhow::Ok(json!({
            "seconds": secs,
            "offered_events_per_s": args.rate,
            "offered_predicts_per_s": args.predict_rate,
            "events": live.events.load(Ordering::Relaxed),
            "events_per_s": live.events.load(Ordering::Relaxed) as f64 / secs,
            "event_errors": live.event_errors.load(Ordering::Relaxed),
            "predicts": live.predicts.load(Ordering::Relaxed),
            "predicts_per_s": live.predicts.load(Ordering::Relaxed) as f64 / secs,
            "predict_errors": live.predict_errors.load(Ordering::Relaxed),
            "predict_p50_us": us(&total_latency, 0.5),
            "predict_p99_us": us(&total_latency, 0.99),
            "predict_p999_us": us(&total_latency, 0.999),
            "freshness_p50_us": us(&total_fresh, 0.5),
            "freshness_p99_us": us(&total_fresh, 0.99),
            "freshness_samples": total_fresh.len(),
            "materializer_lag_max_records": max_lag,
            "connection_failures": failures,
        }))
    })?;
    q.node.shutdown();
    if let Some(url) = &args.postgres {
        // The demo's history is as temporary as its data dir.
        let mut pg = postgres::Client::connect(url, postgres::NoTls)?;
        pg.batch_execute(&format!(
            "DROP TABLE IF EXISTS {history_table}; DROP TABLE IF EXISTS {history_table}_migrations;"
        ))?;
    }
    print_summary(&summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(())
}

async fn wait_stop(window: &Window) {
    while Instant::now() < window.end && !window.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_summary(s: &Value) {
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    println!("\nsummary after {:.1} s", f("seconds"));
    println!(
        "  events ingested     {} ({:.0}/s of {:.0}/s offered), {} rejected",
        s["events"],
        f("events_per_s"),
        f("offered_events_per_s"),
        s["event_errors"]
    );
    println!(
        "  predicts            {} ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} errors",
        s["predicts"],
        f("predicts_per_s"),
        f("predict_p50_us") / 1e3,
        f("predict_p99_us") / 1e3,
        f("predict_p999_us") / 1e3,
        s["predict_errors"]
    );
    println!(
        "  freshness           ack → visible p50 {:.2} ms, p99 {:.2} ms ({} batches)",
        f("freshness_p50_us") / 1e3,
        f("freshness_p99_us") / 1e3,
        s["freshness_samples"]
    );
    println!(
        "  materializer lag    at most {} records",
        s["materializer_lag_max_records"]
    );
    if let Some(failures) = s["connection_failures"]
        .as_array()
        .filter(|f| !f.is_empty())
    {
        println!("  connection failures {failures:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_example_loads_and_its_events_parse() {
        let dir = tempfile::tempdir().unwrap();
        let config = example(dir.path(), None).unwrap();
        let schema = quiver_core::Schema::compile(&config).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (_, view, _) in SERVICES {
            let line = event_line(&mut rng, view, 10);
            let limits = quiver_core::event::EventLimits::from_config(&config);
            let parsed = quiver_core::event::decode_batch(line.as_bytes(), &schema, &limits, 1);
            assert!(parsed.is_ok(), "{line}: {:?}", parsed.err());
        }
    }
}
