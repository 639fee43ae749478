//! `quiver bench runtimes`: per-row model time of each of Quiver's runtimes at batch 1 and
//! 256, against onnxruntime on the same model files and rows, in the same run
//! (`scripts/ort_bench.py`, single-threaded session, as Quiver evaluates on one core).
//! Timing: median of repeated timed blocks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use crate::report::Report;
use anyhow::{Context, Result};
use quiver_model::Model;
use serde_json::{json, Value};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Median µs per row over timed blocks of about 2000 rows, for `seconds`. Batches step
/// through the 256 rows (batch 1 takes a different row each call), so branch predictors
/// cannot learn one row's path.
fn per_row_us(model: &dyn Model, rows: &[f64], batch: usize, seconds: f64) -> f64 {
    let width = model.inputs();
    let mut out = vec![0.0; batch * model.outputs()];
    let count = rows.len() / width;
    let starts: Vec<usize> = (0..count)
        .step_by(batch)
        .filter(|s| s + batch <= count)
        .collect();
    let call = |k: usize, out: &mut [f64]| {
        let s = starts[k % starts.len()] * width;
        model
            .predict(&rows[s..s + batch * width], out)
            .expect("shapes match");
    };
    for k in 0..50 {
        call(k, &mut out);
    }
    let mut blocks = Vec::new();
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds || blocks.len() < 5 {
        let n = (2000 / batch).max(1);
        let t = Instant::now();
        for k in 0..n {
            call(k, &mut out);
            std::hint::black_box(&out);
        }
        blocks.push(t.elapsed().as_secs_f64() * 1e6 / (n * batch) as f64);
    }
    crate::harness::median(blocks)
}

fn onnxruntime(model: &Path, rows: &Path, seconds: f64) -> Option<Value> {
    let out = Command::new("python3")
        .arg(repo().join("scripts/ort_bench.py"))
        .arg(model)
        .arg(rows)
        .args(["--seconds", &seconds.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "onnxruntime harness failed (pip install onnxruntime numpy?): {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The benchmark GBDT (`benchmarks/models/gbdt32`) as `model` evaluates it: µs per row at
/// batch 1 and 256 on the committed rows, and onnxruntime's figures for its ONNX export on the
/// same rows (`None` without the Python harness).
pub fn gbdt_per_row(model: &dyn Model, duration: f64) -> Result<(f64, f64, Option<Value>)> {
    let root = repo();
    let rows_path = root.join("benchmarks/models/gbdt32/rows.json");
    let raw: Vec<Vec<Option<f64>>> = serde_json::from_slice(
        &std::fs::read(&rows_path).with_context(|| rows_path.display().to_string())?,
    )?;
    let rows: Vec<f64> = raw
        .iter()
        .flat_map(|r| r.iter().map(|x| x.unwrap_or(f64::NAN)))
        .collect();
    let seconds = (duration / 4.0).clamp(0.2, 5.0);
    let b1 = per_row_us(model, &rows, 1, seconds);
    let b256 = per_row_us(model, &rows, 256, seconds);
    let ort = onnxruntime(
        &root.join("benchmarks/models/gbdt32_onnx/1/model.onnx"),
        &rows_path,
        seconds,
    );
    Ok((b1, b256, ort))
}

pub fn run(report: &mut Report, duration: f64) -> Result<Value> {
    let root = repo();
    let rows_path = root.join("benchmarks/models/gbdt32/rows.json");
    let raw: Vec<Vec<Option<f64>>> = serde_json::from_slice(
        &std::fs::read(&rows_path).with_context(|| rows_path.display().to_string())?,
    )?;
    let seconds = (duration / 4.0).clamp(0.2, 5.0);
    let fixtures = root.join("crates/model/tests/fixtures");
    let lgbm = std::fs::read_to_string(root.join("benchmarks/models/gbdt32/1/model.txt"))?;
    let gbdt_onnx = root.join("benchmarks/models/gbdt32_onnx/1/model.onnx");
    let load_onnx = |p: &Path| -> Result<Arc<dyn Model>> {
        Ok(quiver_model::onnx::load(&std::fs::read(p)?, None)?)
    };
    let cases: Vec<(&str, Arc<dyn Model>, Option<PathBuf>)> = vec![
        (
            "GBDT 100 trees depth 6, 32 features — LightGBM text",
            Arc::new(quiver_model::trees::Forest::from_lightgbm_text(&lgbm)?),
            Some(gbdt_onnx.clone()),
        ),
        (
            "same GBDT as ONNX (onnxmltools TreeEnsembleClassifier)",
            load_onnx(&gbdt_onnx)?,
            Some(gbdt_onnx.clone()),
        ),
        (
            "logistic regression, 8 features — ONNX",
            load_onnx(&fixtures.join("onnx_logreg.onnx"))?,
            Some(fixtures.join("onnx_logreg.onnx")),
        ),
        (
            "MLP 8→16→8→2 — ONNX",
            load_onnx(&fixtures.join("onnx_mlp.onnx"))?,
            Some(fixtures.join("onnx_mlp.onnx")),
        ),
    ];
    say!(
        report,
        "\n## model runtimes: µs per row (median of timed blocks), same rows, same run\n"
    );
    say!(report, "| model | Quiver engine | batch 1 | batch 256 | onnxruntime batch 1 | onnxruntime batch 256 | Quiver ÷ ORT (b1 / b256) |");
    say!(report, "|---|---|---|---|---|---|---|");
    let mut results = Vec::new();
    for (name, model, ort_model) in cases {
        let width = model.inputs();
        let mut rows: Vec<f64> = Vec::with_capacity(256 * width);
        for r in raw.iter().cycle().take(256) {
            rows.extend(r[..width].iter().map(|x| x.unwrap_or(f64::NAN)));
        }
        let b1 = per_row_us(model.as_ref(), &rows, 1, seconds);
        let b256 = per_row_us(model.as_ref(), &rows, 256, seconds);
        let ort = ort_model.and_then(|p| onnxruntime(&p, &rows_path, seconds));
        let o1 = ort.as_ref().and_then(|o| o["batch_1_us_per_row"].as_f64());
        let o256 = ort
            .as_ref()
            .and_then(|o| o["batch_256_us_per_row"].as_f64());
        let fmt = |x: Option<f64>| x.map_or("—".to_string(), |x| format!("{x:.2}"));
        let ratio = |q: f64, o: Option<f64>| o.map(|o| q / o);
        say!(
            report,
            "| {name} | {} | {b1:.2} | {b256:.2} | {} | {} | {} / {} |",
            model.engine(),
            fmt(o1),
            fmt(o256),
            fmt(ratio(b1, o1)),
            fmt(ratio(b256, o256)),
        );
        results.push(json!({
            "model": name, "engine": model.engine(),
            "us_per_row_batch1": b1, "us_per_row_batch256": b256,
            "onnxruntime_us_per_row_batch1": o1, "onnxruntime_us_per_row_batch256": o256,
            "ratio_vs_onnxruntime_batch1": ratio(b1, o1), "ratio_vs_onnxruntime_batch256": ratio(b256, o256),
            "onnxruntime_version": ort.as_ref().map(|o| o["onnxruntime"].clone()),
        }));
    }
    Ok(json!({"runtimes": results}))
}
