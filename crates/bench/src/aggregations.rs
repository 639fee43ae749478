//! `aggregations`: ingest with 3 window aggregations against the same view without them, and the
//! memory one entity's 24 h window of 5-minute tiles takes.

use anyhow::Result;
use serde_json::{json, Value};

use crate::harness::*;
use crate::report::Report;
use crate::BenchArgs;

/// Ingest with 3 window aggregations per view against the same view without them, in one
/// run (interleaved rounds, medians), and the memory one entity's 24 h window of 5-minute tiles
/// takes.
pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let n = args.entities.max(1);
    let (per_entity, _) = crate::memory::probe_memory("day", n, 0)?;
    let dir = tempfile::tempdir()?;
    let schema = quiver_core::Schema::compile(&bench_config(dir.path())?)?;
    let view = schema.view_id("day").expect("bench view");
    let ring_bytes = (schema.view(view).aggregations[0].window.ring_len() * 8) as f64;
    let mut plain = Vec::new();
    let mut aggregated = Vec::new();
    for _ in 0..args.repeat.max(1) {
        plain.push(
            crate::ingest::run(report, args, "txn")?["events_per_s"]
                .as_f64()
                .unwrap_or(0.0),
        );
        aggregated.push(
            crate::ingest::run(report, args, "txn_agg")?["events_per_s"]
                .as_f64()
                .unwrap_or(0.0),
        );
    }
    let ratios: Vec<f64> = plain
        .iter()
        .zip(&aggregated)
        .map(|(p, a)| a / p.max(1e-9))
        .collect();
    let (plain, aggregated, ratio) = (median(plain), median(aggregated), median(ratios));

    say!(
        report,
        "\n## aggregations: ingest with 3 window aggregations vs none (median of {} round(s))\n",
        args.repeat.max(1)
    );
    say!(report, "| view | durable events/s |\n|---|---|");
    say!(report, "| `txn` (no aggregations) | {plain:.0} |");
    say!(
        report,
        "| `txn_agg` (sum 5m, count 1h, max 24h in 5m tiles) | {aggregated:.0} |"
    );
    say!(
        report,
        "\nwith aggregations / without: **{ratio:.2}×** (median of per-round ratios)\n"
    );
    say!(
        report,
        "| memory, {n} entities, one `sum` over 24 h in 5-minute tiles | bytes |\n|---|---|"
    );
    say!(report, "| resident per entity | {per_entity:.0} |");
    say!(
        report,
        "| of which the ring (289 tiles + 2 header slots, 8 bytes each) | {ring_bytes:.0} |"
    );
    Ok(json!({
        "ingest_events_per_s_plain": plain,
        "ingest_events_per_s_3_aggregations": aggregated,
        "ingest_ratio_3_aggregations_vs_none": ratio,
        "memory_entities": n,
        "memory_bytes_per_entity_24h_5m_sum": per_entity,
        "ring_bytes": ring_bytes,
    }))
}
