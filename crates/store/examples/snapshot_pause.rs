//! Times (or, under callgrind, counts) copying one partition's rows into a snapshot. It once
//! paused the partition's materializer; snapshots are taken online now (on a thread of their
//! own while records apply), so this is CPU the snapshot thread shares the cores with.
//!
//!   cargo run --release -p quiver-store --example snapshot_pause -- [ROWS=200000]
mod common;

use std::time::Instant;

use quiver_store::{snapshot, DedupWindow, LateCounts};

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().unwrap());
    let store = common::store_of_32_f64();
    let mut dedup = DedupWindow::new(0);
    let names = common::names();
    for i in 0..rows {
        let key = format!("user-{i}");
        let rec = common::whole_row(&names, &key, i);
        store.apply(0, i as u64, &rec, &mut dedup, &mut LateCounts::default());
    }
    let dir = tempfile::tempdir().unwrap();
    let offsets = vec![("log".to_string(), rows as u64)];
    let started = Instant::now();
    let mut snap = snapshot::Snapshot::begin(dir.path(), &store, 0, &offsets, None).unwrap();
    snap.capture(&store, || {}).unwrap();
    let written = snap.finish(&[rows as u64], dedup.iter()).unwrap();
    let pause = started.elapsed();
    println!(
        "{rows} rows: copied {} bytes in {:.1} ms ({:.0} ns per row)",
        written.bytes,
        pause.as_secs_f64() * 1e3,
        pause.as_nanos() as f64 / rows as f64
    );
    written.commit().unwrap();
}
