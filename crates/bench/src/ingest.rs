//! `ingest`: durable ingest over HTTP (`ack=durable`, group commit), events/s, batch latency and
//! freshness (a probe event's ack → served), on the embedded log and, with `--kafka`, on Kafka.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::harness::*;
use crate::load::{histogram, us};
use crate::report::Report;
use crate::{cpu, BenchArgs};

/// Durable ingest throughput and freshness, into `view` (`txn`, or `txn_agg`: the same
/// features with 3 window aggregations).
/// `ingest` on the embedded log and, with `--kafka`, on Kafka, in the same run.
pub(crate) fn run(report: &mut Report, args: &BenchArgs, view: &'static str) -> Result<Value> {
    let embedded = ingest_on(report, args, view, "embedded", start_embedded()?)?;
    let Some(brokers) = &args.kafka else {
        return Ok(embedded);
    };
    let backoff = humantime::parse_duration(&args.kafka_idle_fetch_backoff)?;
    let kafka = ingest_on(
        report,
        args,
        view,
        "kafka",
        start_embedded_with(|c| {
            c.log.backend = quiver_core::config::LogBackend::Kafka;
            c.kafka.brokers = brokers.clone();
            c.kafka.topic_prefix = format!("quiver-bench-{}.", std::process::id());
            c.kafka.partitions = c.log.partitions;
            c.kafka.idle_fetch_backoff = quiver_core::config::HumanDuration(backoff);
        })?,
    )?;
    say_ratios(report, "ingest: Kafka ÷ embedded", &embedded, &kafka);
    Ok(json!({"embedded": embedded, "kafka": kafka, "kafka_brokers": brokers}))
}

/// `other[k] ÷ base[k]`.
pub(crate) fn ratio(base: &Value, other: &Value, k: &str) -> f64 {
    other[k].as_f64().unwrap_or(f64::NAN) / base[k].as_f64().unwrap_or(f64::NAN)
}

/// Prints the headline ingest figures of `other` ÷ `base` (same load, same run).
pub(crate) fn say_ratios(report: &mut Report, title: &str, base: &Value, other: &Value) {
    let column = title.split(": ").last().unwrap_or(title);
    say!(report, "\n### {title} (same load, same run)\n");
    say!(report, "| metric | {column} |\n|---|---|");
    for (name, k) in [
        ("durable events/s", "events_per_s"),
        ("POST p99", "post_p99_us"),
        ("freshness ack→readable p99", "freshness_p99_us"),
    ] {
        say!(report, "| {name} | {:.2}× |", ratio(base, other, k));
    }
}

pub(crate) fn ingest_on(
    report: &mut Report,
    args: &BenchArgs,
    view: &'static str,
    backend: &str,
    q: Embedded,
) -> Result<Value> {
    let client_rt = cpu::client_runtime()?;
    let addr = q.addr;
    let node = q.node.clone();
    let (warmup, duration, conns, batch, rate) = (
        args.warmup,
        args.duration,
        args.connections,
        args.batch,
        args.rate,
    );
    let out = client_rt.block_on(async move {
        // Pre-built NDJSON bodies: the generator should spend its CPU sending, not formatting.
        let bodies: Arc<Vec<Bytes>> = Arc::new(
            (0..64)
                .map(|b| {
                    let lines: Vec<String> = (0..batch)
                        .map(|i| {
                            format!(
                                r#"{{"view":"{view}","key":"u{}","values":{{"amount":{}.25,"merchant":"m{}","count":{},"foreign":{}}}}}"#,
                                (b * batch + i) % 1_000_000,
                                i,
                                i % 97,
                                i,
                                i % 2 == 0
                            )
                        })
                        .collect();
                    Bytes::from(lines.join("\n"))
                })
                .collect(),
        );
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let rejected = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (bodies, measuring, stop, events, rejected) = (bodies.clone(), measuring.clone(), stop.clone(), events.clone(), rejected.clone());
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                let mut h = histogram();
                let mut i = c;
                // Open loop: POSTs leave on a fixed schedule whatever the replies do; a POST
                // that is late counts its latency from when it was due (no coordinated omission).
                let period = (rate > 0.0).then(|| Duration::from_secs_f64(batch as f64 * conns as f64 / rate));
                let mut due = Instant::now() + period.map(|p| p.mul_f64(c as f64 / conns as f64)).unwrap_or_default();
                while !stop.load(Ordering::Relaxed) {
                    if period.is_some() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t = if period.is_some() { due } else { Instant::now() };
                    if let Some(p) = period {
                        due += p;
                    }
                    let body = bodies[i % bodies.len()].clone();
                    i += conns;
                    let (status, _) = request(&mut sender, "POST", "/v1/events?ack=durable", body).await?;
                    if !measuring.load(Ordering::Relaxed) {
                        continue;
                    }
                    if status == 200 {
                        events.fetch_add(batch as u64, Ordering::Relaxed);
                        h.record(t.elapsed().as_micros().max(1) as u64)?;
                    } else {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(h)
            }));
        }
        // Freshness probes: one event, ack=durable, then wait until the store has applied it.
        let probe = {
            let (measuring, stop, node) = (measuring.clone(), stop.clone(), node.clone());
            tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                let mut h = histogram();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let body = Bytes::from(format!(r#"{{"view":"txn","key":"probe{}","values":{{"count":{i}}}}}"#, i % 64));
                    // Refused (503 while the load saturates ingest): that probe is skipped.
                    let Some(acked) = post_durable_visible(&mut sender, &node, body, Duration::from_secs(5)).await? else {
                        continue;
                    };
                    if measuring.load(Ordering::Relaxed) {
                        h.record(acked.elapsed().as_micros().max(1) as u64)?;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                anyhow::Ok(h)
            })
        };
        let (elapsed, cpu_s) = measure_window((warmup, duration), &measuring, &stop, &cpu::ServerCpu::InProcess).await;
        let mut lat = histogram();
        for t in tasks {
            lat.add(t.await??)?;
        }
        let fresh = probe.await??;
        let events = events.load(Ordering::Relaxed) as f64;
        anyhow::Ok((events / elapsed, rejected.load(Ordering::Relaxed), lat, fresh, cpu::us_per_op(cpu_s, events)))
    })?;
    let (rate, rejected, lat, fresh, cpu_us) = out;
    say!(
            report,
        "\n## ingest into `{view}`, {backend} log (ack=durable, {} connections × {} events per POST)\n",
        args.connections, args.batch
    );
    say!(report, "| metric | value |\n|---|---|");
    say!(report, "| durable events/s | {rate:.0} |");
    say!(
        report,
        "| POST latency p50 / p99 (ms) | {:.2} / {:.2} |",
        us(&lat, 0.5) / 1e3,
        us(&lat, 0.99) / 1e3
    );
    say!(
        report,
        "| freshness ack→readable p50 / p99 (µs) | {:.0} / {:.0} ({} probes) |",
        us(&fresh, 0.5),
        us(&fresh, 0.99),
        fresh.len()
    );
    say!(report, "| rejected POSTs (503) | {rejected} |");
    say!(
        report,
        "| server CPU per event (µs) | {} |",
        cpu_text(cpu_us)
    );
    q.node.shutdown();
    Ok(json!({
        "offered_events_per_s": args.rate,
        "events_per_s": rate,
        "server_cpu_us_per_event": cpu_us,
        "post_p50_us": us(&lat, 0.5), "post_p99_us": us(&lat, 0.99),
        "freshness_p50_us": us(&fresh, 0.5), "freshness_p99_us": us(&fresh, 0.99), "freshness_probes": fresh.len(),
        "rejected_posts": rejected,
    }))
}
