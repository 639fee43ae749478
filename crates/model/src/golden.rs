//! Consistency validation before traffic: a version directory may carry a golden set,
//! `golden.json`, of input rows and the outputs the version must give for them:
//!
//! ```json
//! {"tolerance": 1e-5, "rows": [{"inputs": [0.5, null, 3], "outputs": [0.8123]}]}
//! ```
//!
//! `inputs` is the model's raw input vector in `config.toml`'s order (`null` = missing);
//! `outputs` is the model's whole output row. A version that misses any row by more than the
//! tolerance is refused at load: it takes no traffic and its status says which row and by how
//! much (`quiver_model_golden_failures_total` counts refusals).

use std::path::Path;

use serde::Deserialize;

use crate::Model;

/// The file a version directory may carry.
pub const FILE: &str = "golden.json";
/// Rows a golden set may hold.
const ROWS_MAX: usize = 100_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Golden {
    #[serde(default = "default_tolerance")]
    tolerance: f64,
    rows: Vec<Row>,
}

fn default_tolerance() -> f64 {
    1e-6
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Row {
    inputs: Vec<Option<f64>>,
    outputs: Vec<f64>,
}

/// Checks `model` against the golden set in `version_dir`, if it has one. `Ok(None)`: no
/// golden set; `Ok(Some(n))`: `n` rows matched.
pub fn check(version_dir: &Path, model: &dyn Model) -> Result<Option<usize>, String> {
    let path = version_dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{FILE}: {e}")),
    };
    let golden: Golden = serde_json::from_str(&text).map_err(|e| format!("{FILE}: {e}"))?;
    verify(&golden, model).map(Some)
}

fn verify(golden: &Golden, model: &dyn Model) -> Result<usize, String> {
    if golden.rows.is_empty() || golden.rows.len() > ROWS_MAX {
        return Err(format!("{FILE}: 1..={ROWS_MAX} rows"));
    }
    if golden.tolerance.is_nan() || golden.tolerance < 0.0 {
        return Err(format!("{FILE}: tolerance must be >= 0"));
    }
    let (width, k) = (model.inputs(), model.outputs());
    let mut rows = Vec::with_capacity(golden.rows.len() * width);
    for (i, r) in golden.rows.iter().enumerate() {
        if r.inputs.len() != width || r.outputs.len() != k {
            return Err(format!(
                "{FILE}: row {i} has {} inputs and {} outputs; the model takes {width} and gives {k}",
                r.inputs.len(),
                r.outputs.len()
            ));
        }
        rows.extend(r.inputs.iter().map(|x| x.unwrap_or(f64::NAN)));
    }
    let mut out = vec![0.0; golden.rows.len() * k];
    model
        .predict(&rows, &mut out)
        .map_err(|e| format!("{FILE}: the model failed on the golden rows: {e}"))?;
    for (i, (got, r)) in out.chunks_exact(k).zip(&golden.rows).enumerate() {
        for (j, (g, want)) in got.iter().zip(&r.outputs).enumerate() {
            let off = (g - want).abs();
            // NaN (a model answering NaN where a number is expected) fails too.
            if off.is_nan() || off > golden.tolerance {
                return Err(format!(
                    "{FILE}: row {i} output {j} is {g}, expected {want} ± {} (off by {off:.3e})",
                    golden.tolerance
                ));
            }
        }
    }
    Ok(golden.rows.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sums its inputs (missing counts 0).
    struct Sum;
    impl Model for Sum {
        fn inputs(&self) -> usize {
            2
        }
        fn engine(&self) -> &'static str {
            "test"
        }
        fn predict(&self, rows: &[f64], out: &mut [f64]) -> crate::Result<()> {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(2)) {
                *o = r.iter().map(|x| if x.is_nan() { 0.0 } else { *x }).sum();
            }
            Ok(())
        }
    }

    fn golden(text: &str) -> Golden {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn a_version_passes_within_tolerance_and_fails_naming_the_row() {
        let ok = golden(
            r#"{"tolerance": 1e-3, "rows": [{"inputs": [1, 2], "outputs": [3.0005]}, {"inputs": [null, 2], "outputs": [2]}]}"#,
        );
        assert_eq!(verify(&ok, &Sum), Ok(2));
        let bad = golden(
            r#"{"rows": [{"inputs": [1, 2], "outputs": [3]}, {"inputs": [1, 1], "outputs": [3]}]}"#,
        );
        let err = verify(&bad, &Sum).unwrap_err();
        assert!(err.contains("row 1 output 0 is 2, expected 3"), "{err}");
        let shape = golden(r#"{"rows": [{"inputs": [1], "outputs": [1]}]}"#);
        assert!(verify(&shape, &Sum)
            .unwrap_err()
            .contains("the model takes 2"));
    }

    #[test]
    fn no_file_is_no_check() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(check(dir.path(), &Sum), Ok(None));
        std::fs::write(
            dir.path().join(FILE),
            r#"{"rows": [{"inputs": [1, 1], "outputs": [2]}]}"#,
        )
        .unwrap();
        assert_eq!(check(dir.path(), &Sum), Ok(Some(1)));
        std::fs::write(dir.path().join(FILE), "not json").unwrap();
        assert!(check(dir.path(), &Sum).is_err());
    }
}
