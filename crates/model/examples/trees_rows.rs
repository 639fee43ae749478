//! Rows through the benchmark GBDT (`benchmarks/models/gbdt32`: LightGBM, 100 trees, depth
//! ≤ 6, 32 features) in batches — batch 1 is the shape of a predict request — without the
//! server or the model registry around it, so that a change to the tree walk can be timed or
//! counted in seconds:
//!
//! ```sh
//! cargo run --release -p quiver-model --example trees_rows -- 1        # µs per row, medians
//! cargo run --release -p quiver-model --example trees_rows -- 256
//! valgrind --tool=callgrind target/release/examples/trees_rows 1 40000 # instructions: minus
//! valgrind --tool=callgrind target/release/examples/trees_rows 1 20000 # this, ÷ 20000
//! ```
//!
//! With a count, it predicts exactly that many rows (whole batches, stepping through the 256
//! committed rows) and prints their sum; without, the median µs per row of timed blocks of
//! about 2000 rows for 5 seconds.

use std::time::Instant;

use quiver_model::trees::Forest;
use quiver_model::Model;

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
    let flat: Vec<f64> = rows
        .iter()
        .flatten()
        .map(|x| x.unwrap_or(f64::NAN))
        .collect();
    let args: Vec<String> = std::env::args().collect();
    let batch: usize = args.get(1).map_or(1, |b| b.parse().expect("a batch size"));
    assert!(
        (1..=rows.len()).contains(&batch),
        "batch 1..={}",
        rows.len()
    );
    let width = forest.inputs();
    let mut out = vec![0.0; batch * forest.outputs()];
    let starts = rows.len() - batch + 1;
    let mut call = |k: usize| {
        let s = (k * batch % starts) * width;
        forest
            .predict(&flat[s..s + batch * width], &mut out)
            .expect("shapes match");
        out[0]
    };
    if let Some(count) = args.get(2) {
        let count: usize = count.parse().expect("a row count");
        let sum: f64 = (0..count / batch).map(&mut call).sum();
        println!("{count} rows in batches of {batch}, sum {sum}");
        return;
    }
    let mut blocks = Vec::new();
    let (started, calls) = (Instant::now(), (2000 / batch).max(1));
    let mut k = 0;
    while started.elapsed().as_secs_f64() < 5.0 {
        let t = Instant::now();
        for _ in 0..calls {
            std::hint::black_box(call(k));
            k += 1;
        }
        blocks.push(t.elapsed().as_secs_f64() * 1e6 / (calls * batch) as f64);
    }
    blocks.sort_by(f64::total_cmp);
    println!(
        "batch {batch}: {:.3} µs per row (median of {} blocks; min {:.3})",
        blocks[blocks.len() / 2],
        blocks.len(),
        blocks[0]
    );
}
