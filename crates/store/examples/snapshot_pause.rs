//! Times (or, under callgrind, counts) copying one partition's rows into a snapshot. It once
//! paused the partition's materializer; snapshots are taken online now (on a thread of their
//! own while records apply), so this is CPU the snapshot thread shares the cores with.
//!
//!   cargo run --release -p quiver-store --example snapshot_pause -- [ROWS=200000]
use std::sync::Arc;
use std::time::Instant;

use quiver_core::record::Record;
use quiver_core::value::Value;
use quiver_core::{Config, Schema};
use quiver_store::{snapshot, DedupWindow, LateCounts, Store};

fn main() {
    let rows: usize = std::env::args()
        .nth(1)
        .map_or(200_000, |a| a.parse().unwrap());
    let features: Vec<String> = (0..32)
        .map(|i| format!("{{ name = \"f{i}\", type = \"f64\" }}"))
        .collect();
    let config = format!(
        "[[entity]]\nname = \"user\"\nkey = \"user_id\"\n[[view]]\nname = \"v\"\nentity = \"user\"\nfeatures = [{}]\n",
        features.join(", ")
    );
    let config = Config::from_toml_with_env(&config, Vec::new()).unwrap();
    let store = Store::new(Arc::new(Schema::compile(&config).unwrap()), 1);
    let names: Vec<String> = (0..32).map(|i| format!("f{i}")).collect();
    let mut dedup = DedupWindow::new(0);
    for i in 0..rows {
        let key = format!("user-{i}");
        let values = names
            .iter()
            .enumerate()
            .map(|(f, n)| (n.as_str(), Value::F64((i * 32 + f) as f64)))
            .collect();
        let rec = Record {
            ts_ms: 1_700_000_000_000,
            view: "v",
            key: &key,
            event_id: None,
            dedup: None,
            values,
        };
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
