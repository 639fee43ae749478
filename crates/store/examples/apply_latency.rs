//! Times each apply of ROWS events, each the first of a new entity (32 f64 features), into one
//! partition: the median, the tail and the longest apply. A map's growth happens inside one
//! of them, so the longest is what a growth costs the partition's materializer.
//!
//!   cargo run --release -p quiver-store --example apply_latency -- [ROWS=1600000]
mod common;

use std::time::{Duration, Instant};

use quiver_store::{Applied, DedupWindow, LateCounts};

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .map_or(1_600_000, |a| a.parse().expect("ROWS is a number"));
    let store = common::store_of_32_f64();
    let names = common::names();
    let mut dedup = DedupWindow::new(0);
    let mut took: Vec<Duration> = Vec::with_capacity(rows);
    let started = Instant::now();
    for i in 0..rows {
        let key = format!("e{i}");
        let rec = common::whole_row(&names, &key, i);
        let t = Instant::now();
        let applied = store.apply(0, i as u64, &rec, &mut dedup, &mut LateCounts::default());
        took.push(t.elapsed());
        assert_eq!(applied, Applied::Changed);
    }
    let total = started.elapsed();
    let longest_at = (0..rows).max_by_key(|&i| took[i]).unwrap_or(0);
    let longest = took.get(longest_at).copied().unwrap_or_default();
    took.sort_unstable();
    let q = |p: f64| took[((rows as f64 * p) as usize).min(rows - 1)].as_secs_f64() * 1e6;
    println!(
        "{rows} new entities: {:.0} ms in all; per apply p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs, longest {:.2} ms (the {longest_at}th)",
        total.as_secs_f64() * 1e3,
        q(0.5),
        q(0.99),
        q(0.999),
        longest.as_secs_f64() * 1e3,
    );
}
