//! `history`: the PostgreSQL history sink (drain rate, lag under load) and bulk point-in-time
//! retrieval as `quiver history` asks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::harness::*;
use crate::report::Report;
use crate::{cpu, BenchArgs};

/// The history sink into PostgreSQL: how fast it drains a backlog (rows/s), and how far it
/// lags while `--rate` events/s (default 50k) are offered.
pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let table = format!("quiver_bench_history_{}", std::process::id());
    let pg = args.postgres.clone();
    let q = start_embedded_with(|c| {
        c.history.postgres_url = Some(pg.clone());
        c.history.table = table.clone();
    })?;
    let node = q.node.clone();
    let streams = node.log.streams().len() as u32;
    let lag = move |node: &quiver_server::Node| -> u64 {
        let h = node.history.as_ref().expect("history configured");
        (0..streams)
            .map(|s| {
                node.log
                    .high_watermark(s)
                    .unwrap_or(0)
                    .saturating_sub(h.committed_offset(s))
            })
            .sum()
    };
    let backlog = args.entities.max(1000);
    let rate = if args.rate > 0.0 { args.rate } else { 50_000.0 };
    let (conns, duration) = (args.connections, args.duration);
    let addr = q.addr;
    let client_rt = cpu::client_runtime()?;
    let pit_rows = args.pit_rows.max(1);
    let (drain_rows_per_s, lag_samples, offered_rate, catch_up_ms, pit_rows_per_s, bulk) = client_rt.block_on(async move {
        let body = |start: usize, n: usize| {
            let lines: Vec<String> = (start..start + n)
                .map(|i| format!(r#"{{"view":"txn","key":"u{}","values":{{"amount":{i}.25,"merchant":"m{}","count":{i},"foreign":false}}}}"#, i % 100_000, i % 97))
                .collect();
            Bytes::from(lines.join("\n"))
        };
        // Phase 1: a backlog as fast as ingest takes it, then time until the sink has it all.
        let started = Instant::now();
        let mut sender = connect(addr).await?;
        for b in (0..backlog).step_by(1000) {
            let (status, reply) = request(&mut sender, "POST", "/v1/events?ack=written", body(b, 1000.min(backlog - b))).await?;
            anyhow::ensure!(status == 200, "ingest failed: {}", String::from_utf8_lossy(&reply));
        }
        while lag(&node) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = backlog as f64 / started.elapsed().as_secs_f64();

        // Phase 2: `rate` events/s offered open-loop in batches of 100; sample the lag.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (stop, sent) = (stop.clone(), sent.clone());
            let period = Duration::from_secs_f64(100.0 * conns as f64 / rate);
            let bodies: Vec<Bytes> = (0..16).map(|i| body((c * 16 + i) * 100, 100)).collect();
            tasks.push(tokio::spawn(async move {
                let mut sender = connect(addr).await?;
                let mut due = Instant::now() + period.mul_f64(c as f64 / conns as f64);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep_until(due.into()).await;
                    due += period;
                    let (status, _) = request(&mut sender, "POST", "/v1/events?ack=durable", bodies[i % bodies.len()].clone()).await?;
                    i += 1;
                    if status == 200 {
                        sent.fetch_add(100, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            }));
        }
        let mut samples = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < duration {
            tokio::time::sleep(Duration::from_millis(50)).await;
            samples.push(lag(&node) as f64);
        }
        stop.store(true, Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        for t in tasks {
            t.await??;
        }
        let caught = Instant::now();
        while lag(&node) > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let catch_up = caught.elapsed().as_secs_f64() * 1000.0;

        // Phase 3: point-in-time retrieval, 10,000 rows (2,000 entities × 5 instants) per
        // request, from PostgreSQL plus the log tail.
        let now = quiver_core::time::now_ms();
        let keys: Vec<String> = (0..10_000).map(|i| format!("u{}", (i / 5) * 37 % 100_000)).collect();
        let ts: Vec<i64> = (0..10_000).map(|i| now - (i % 5) * 2_000).collect();
        let body = Bytes::from(json!({"features": ["txn:amount", "txn:merchant", "txn:count"], "entities": {"user_id": keys}, "timestamps": ts}).to_string());
        let mut pit = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let (status, reply) = request(&mut sender, "POST", "/v1/features/historical", body.clone()).await?;
            anyhow::ensure!(status == 200, "historical read failed: {}", String::from_utf8_lossy(&reply));
            pit.push(10_000.0 / t.elapsed().as_secs_f64());
        }
        // Phase 4: bulk point-in-time retrieval of `pit_rows` entity rows, per semantics.
        let mut bulk = Vec::new();
        for semantics in ["event_time", "as_served"] {
            bulk.push(bulk_point_in_time(addr, pit_rows, now, semantics).await?);
        }
        anyhow::Ok((drain, samples, sent.load(Ordering::Relaxed) as f64 / elapsed, catch_up, median(pit), bulk))
    })?;
    q.node.shutdown();
    let mut client = postgres_client(&args.postgres)?;
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])?
        .get(0);
    client.batch_execute(&format!(
        "DROP TABLE IF EXISTS {table}; DROP TABLE IF EXISTS {table}_migrations;"
    ))?;
    let mut sorted = lag_samples.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |q: f64| {
        sorted
            .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    say!(report, "\n## history sink into PostgreSQL\n");
    say!(report, "| metric | value |\n|---|---|");
    say!(
        report,
        "| drain throughput ({backlog} events backlog) | {drain_rows_per_s:.0} rows/s |"
    );
    say!(report, "| offered / achieved ingest during the lag phase | {rate:.0} / {offered_rate:.0} events/s |");
    say!(
        report,
        "| sink lag p50 / p99 / max (records, sampled every 50 ms) | {:.0} / {:.0} / {:.0} |",
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    say!(
        report,
        "| sink lag p99 in time at that rate | {:.1} ms |",
        pct(0.99) / rate.max(1.0) * 1000.0
    );
    say!(
        report,
        "| catch-up after the load stops | {catch_up_ms:.0} ms |"
    );
    say!(report, "| rows in PostgreSQL | {rows} |");
    say!(report, "| point-in-time retrieval (10,000 rows per request, median of 3) | {pit_rows_per_s:.0} rows/s |");
    for (semantics, rate) in ["event_time", "as_served"].iter().zip(&bulk) {
        say!(report, "| bulk point-in-time, {pit_rows} entity rows, `{semantics}` (10,000 per request, 2 in flight) | {rate:.0} rows/s |");
    }
    Ok(json!({
        "point_in_time_bulk_rows": pit_rows,
        "point_in_time_bulk_event_time_rows_per_s": bulk[0],
        "point_in_time_bulk_as_served_rows_per_s": bulk[1],
        "drain_rows_per_s": drain_rows_per_s,
        "offered_events_per_s": rate,
        "achieved_events_per_s": offered_rate,
        "lag_records_p50": pct(0.5), "lag_records_p99": pct(0.99), "lag_records_max": pct(1.0),
        "catch_up_ms": catch_up_ms,
        "rows": rows,
        "point_in_time_rows_per_s": pit_rows_per_s,
    }))
}

/// `rows` entity rows over 100k entities retrieved point-in-time the way `quiver history` asks
/// (grouped by entity, chunks of 10,000, two requests in flight, each on its own connection);
/// rows/s over the whole retrieval.
pub(crate) async fn bulk_point_in_time(
    addr: std::net::SocketAddr,
    rows: usize,
    now: i64,
    semantics: &'static str,
) -> Result<f64> {
    const CHUNK: usize = 10_000;
    // A training set: `rows` (entity, timestamp) pairs over 100k entities in no particular
    // order, chunked as `quiver history` chunks them (an entity's rows together).
    let keys: Vec<u64> = (0..rows as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % 100_000)
        .collect();
    let order = Arc::new(quiver_store::pit::grouped_by_key(&keys));
    let keys = Arc::new(keys);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let (next, order, keys) = (next.clone(), order.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await?;
            loop {
                let start = next.fetch_add(CHUNK as u64, Ordering::Relaxed) as usize;
                if start >= rows {
                    return anyhow::Ok(());
                }
                let chunk = &order[start..(start + CHUNK).min(rows)];
                let ts: Vec<i64> = chunk.iter().map(|&i| now - (i as i64 % 5) * 2_000).collect();
                let keys: Vec<String> = chunk.iter().map(|&i| format!("u{}", keys[i])).collect();
                let body = json!({"features": ["txn:amount", "txn:merchant", "txn:count"], "entities": {"user_id": keys}, "timestamps": ts, "semantics": semantics});
                let (status, reply) = request(&mut sender, "POST", "/v1/features/historical", Bytes::from(body.to_string())).await?;
                anyhow::ensure!(status == 200, "historical read failed: {}", String::from_utf8_lossy(&reply));
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn postgres_client(url: &str) -> Result<postgres::Client> {
    Ok(postgres::Client::connect(url, postgres::NoTls)?)
}
