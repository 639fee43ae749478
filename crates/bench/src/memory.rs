//! `memory`: resident bytes per entity for N entities × 32 f64 features vs the raw bytes, each
//! measured in a child process of its own.

use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::harness::*;
use crate::report::Report;
use crate::BenchArgs;

/// The view a memory probe fills: `row` (32 f64 features) or `day` (one f64 feeding a 24 h
/// `sum` in 5-minute tiles).
pub(crate) const PROBE_VIEWS: [&str; 2] = ["row", "day"];

/// `quiver bench memory-probe --probe-view V --entities N` (hidden): fills a store with one
/// event per entity into `V` and prints `<resident bytes per entity> <raw bytes per entity>`.
/// It runs as its own process because in a process that already ran other scenarios the
/// allocator reuses what those freed without growing RSS, and the delta can read 0.
pub(crate) fn memory_probe(args: &BenchArgs) -> Result<()> {
    let view_name = args.probe_view.as_str();
    anyhow::ensure!(
        PROBE_VIEWS.contains(&view_name),
        "--probe-view must be one of {PROBE_VIEWS:?}"
    );
    let dir = tempfile::tempdir()?;
    let config = bench_config(dir.path())?;
    let schema = Arc::new(quiver_core::Schema::compile(&config)?);
    let store = quiver_store::Store::new(schema.clone(), config.log.partitions);
    let view = schema.view_id(view_name).expect("bench view");
    let width = schema.view(view).features.len();
    let n = args.entities.max(1);
    let mut dedup = quiver_store::DedupWindow::new(0);
    let mut buf = Vec::new();
    let mut raw = 0u64;
    let before = rss_bytes();
    for i in 0..n {
        let key = match args.key_bytes {
            0 => format!("e{i}"),
            n => format!("e{i:0>w$}", w = n.saturating_sub(1)),
        };
        raw += (key.len() + width * 8) as u64;
        let event = quiver_core::event::Event {
            view,
            key,
            ts_ms: 1_800_000_000_000,
            event_id: None,
            values: (0..width as u16)
                .map(|f| (f, quiver_core::value::Value::F64(i as f64 + f64::from(f))))
                .collect(),
        };
        buf.clear();
        quiver_core::record::encode(&schema, &event, None, &mut buf);
        let rec = quiver_core::record::decode(&buf)?;
        let mut late = quiver_store::LateCounts::default();
        store.apply(
            store.partition_of(&event.key),
            i as u64,
            &rec,
            &mut dedup,
            &mut late,
        );
    }
    let per_entity = rss_bytes().saturating_sub(before) as f64 / n as f64;
    assert_eq!(store.rows(), n);
    // The parent reads this line (`probe_memory`).
    println!("{per_entity} {}", raw as f64 / n as f64);
    Ok(())
}

/// Runs [`memory_probe`] in a child process: (resident, raw) bytes per entity.
pub(crate) fn probe_memory(view: &str, entities: usize, key_bytes: usize) -> Result<(f64, f64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "memory-probe", "--probe-view", view])
        .args(["--entities", &entities.to_string()])
        .args(["--key-bytes", &key_bytes.to_string()])
        .output()
        .context("starting the memory probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "memory probe failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut figures = stdout.split_whitespace().map(str::parse::<f64>);
    match (figures.next(), figures.next()) {
        (Some(Ok(resident)), Some(Ok(raw))) => Ok((resident, raw)),
        _ => anyhow::bail!("memory probe printed {stdout:?}"),
    }
}

/// Memory per entity: rows applied straight to a store (no HTTP, no log), RSS before/after.
pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let n = args.entities.max(1);
    let (per_entity, raw_per) = probe_memory("row", n, args.key_bytes)?;
    say!(
        report,
        "\n## memory: {n} entities × {FEATURES} f64 features\n"
    );
    say!(report, "| metric | value |\n|---|---|");
    say!(report, "| resident bytes per entity | {per_entity:.0} |");
    say!(
        report,
        "| raw bytes per entity (key + 8 per value) | {raw_per:.0} |"
    );
    say!(report, "| ratio | {:.2}× |", per_entity / raw_per);
    Ok(
        json!({"entities": n, "key_bytes": args.key_bytes, "rss_bytes_per_entity": per_entity, "raw_bytes_per_entity": raw_per, "ratio": per_entity / raw_per}),
    )
}
