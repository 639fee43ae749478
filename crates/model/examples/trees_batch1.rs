//! One row at a time through the benchmark GBDT (`benchmarks/models/gbdt32`: LightGBM, 100
//! trees, depth ≤ 6, 32 features) — the shape of a predict request — without the server or
//! the model registry around it, so that a change to the tree walk can be timed or counted in
//! seconds:
//!
//! ```sh
//! cargo run --release -p quiver-model --example trees_batch1            # µs per row, medians
//! valgrind --tool=callgrind target/release/examples/trees_batch1 100000 # instructions per row
//! ```
//!
//! With a count, it walks exactly that many rows (cycling through the 256 committed rows) and
//! prints their sum; without, it prints the median µs per row of timed blocks for 5 seconds.

use std::time::Instant;

use quiver_model::trees::Forest;

fn main() {
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benchmarks/models/gbdt32"
    );
    let text = std::fs::read_to_string(format!("{root}/1/model.txt")).expect("model file");
    let forest = Forest::from_lightgbm_text(&text).expect("a valid forest");
    let rows: Vec<Vec<Option<f64>>> =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/rows.json")).unwrap())
            .expect("rows.json is a list of rows");
    let rows: Vec<Vec<f64>> = rows
        .into_iter()
        .map(|r| r.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
        .collect();
    if let Some(count) = std::env::args().nth(1) {
        let count: usize = count.parse().expect("a row count");
        let sum: f64 = (0..count)
            .map(|k| forest.predict_row(&rows[k % rows.len()]))
            .sum();
        println!("{count} rows, sum {sum}");
        return;
    }
    let mut blocks = Vec::new();
    let started = Instant::now();
    let mut k = 0;
    while started.elapsed().as_secs_f64() < 5.0 {
        let t = Instant::now();
        for _ in 0..2000 {
            std::hint::black_box(forest.predict_row(&rows[k % rows.len()]));
            k += 1;
        }
        blocks.push(t.elapsed().as_secs_f64() * 1e6 / 2000.0);
    }
    blocks.sort_by(f64::total_cmp);
    println!(
        "batch 1: {:.3} µs per row (median of {} blocks of 2000 rows; min {:.3})",
        blocks[blocks.len() / 2],
        blocks.len(),
        blocks[0]
    );
}
