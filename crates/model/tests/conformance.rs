//! Every committed model against its reference library's predictions on committed rows
//! (NaNs and all-zero rows included), within 1e-5. Regenerate with `scripts/make_models.py`.

use quiver_model::trees::Forest;
use quiver_model::Model;

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn reference() -> (Vec<Vec<f64>>, serde_json::Value) {
    let v: serde_json::Value = serde_json::from_str(&fixture("reference.json")).unwrap();
    let rows = v["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    (rows, v)
}

fn check(forest: &Forest, library: &str) {
    let (rows, v) = reference();
    let expected: Vec<f64> = v[library]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(rows.len(), expected.len());
    let flat: Vec<f64> = rows.iter().flatten().copied().collect();
    let mut out = vec![0.0; rows.len()];
    forest.predict(&flat, &mut out).unwrap();
    let mut worst = 0.0f64;
    for (i, (got, want)) in out.iter().zip(&expected).enumerate() {
        let err = (got - want).abs();
        worst = worst.max(err);
        assert!(err <= 1e-5, "{library} row {i}: {got} vs {want}");
    }
    eprintln!("{library}: {} rows, worst error {worst:e}", rows.len());
}

#[test]
fn xgboost_json_matches_xgboost() {
    let f = Forest::from_xgboost_json(&fixture("xgb_binary.json")).unwrap();
    assert_eq!((f.inputs(), f.trees()), (32, 30));
    check(&f, "xgboost");
}

#[test]
fn lightgbm_text_matches_lightgbm() {
    let f = Forest::from_lightgbm_text(&fixture("lgbm_binary.txt")).unwrap();
    assert_eq!((f.inputs(), f.trees()), (32, 30));
    check(&f, "lightgbm");
}

#[test]
fn wrong_shapes_are_errors() {
    let f = Forest::from_lightgbm_text(&fixture("lgbm_binary.txt")).unwrap();
    let mut out = vec![0.0; 2];
    assert!(f.predict(&[0.0; 63], &mut out).is_err());
}

/// Every ONNX fixture against onnxruntime's outputs (`onnx_reference.json`), through the
/// runtime Quiver picks for it: tree ensembles natively, the rest in tract.
#[test]
fn onnx_models_match_onnxruntime() {
    let reference: serde_json::Value =
        serde_json::from_str(&fixture("onnx_reference.json")).unwrap();
    let expect_engine = [
        ("onnx_logreg", "tract"),
        ("onnx_linreg", "tract"),
        ("onnx_mlp", "tract"),
        ("onnx_skgb", "native-trees"),
        ("onnx_rf", "native-trees"),
        ("onnx_lgbm", "native-trees"),
    ];
    for (name, engine) in expect_engine {
        let r = &reference[name];
        let bytes = std::fs::read(format!(
            "{}/tests/fixtures/{name}.onnx",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let model =
            quiver_model::onnx::load(&bytes, None).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(model.engine(), engine, "{name}");
        let rows: Vec<f64> = r["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap_or(f64::NAN))
            .collect();
        let expected: Vec<f64> = r["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter())
            .map(|x| x.as_f64().unwrap())
            .collect();
        let n = r["inputs"].as_array().unwrap().len();
        assert_eq!(expected.len(), n * model.outputs(), "{name}: output width");
        let mut out = vec![0.0; expected.len()];
        // Batch and one row at a time must agree (tract plans for a symbolic batch).
        model.predict(&rows, &mut out).unwrap();
        let width = model.inputs();
        let k = model.outputs();
        for i in 0..n {
            let mut one = vec![0.0; k];
            model
                .predict(&rows[i * width..(i + 1) * width], &mut one)
                .unwrap();
            for (a, b) in one.iter().zip(&out[i * k..(i + 1) * k]) {
                // Kernels may differ by batch size in the last float bit.
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{name} row {i}: batch {b} vs single {a}"
                );
            }
        }
        let worst = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-5, "{name}: worst error {worst:e}");
        eprintln!("{name} ({engine}): {n} rows, worst error {worst:e}");
    }
}

#[test]
fn onnx_garbage_is_an_error() {
    assert!(quiver_model::onnx::load(b"not a model", None).is_err());
    assert!(quiver_model::onnx::load(&[], None).is_err());
}

#[test]
fn a_graph_that_breaks_at_run_time_is_an_error_not_a_panic() {
    // table[int(x)] over a table of 4: tract panics past the end; Quiver reports an error.
    let path = format!(
        "{}/tests/fixtures/onnx_lookup4.onnx",
        env!("CARGO_MANIFEST_DIR")
    );
    let m = quiver_model::onnx::load(&std::fs::read(path).unwrap(), None).unwrap();
    let mut out = [0.0; 2];
    m.predict(&[0.0, 3.0], &mut out).unwrap();
    assert!(
        (out[0] - 0.1).abs() < 1e-6 && (out[1] - 0.4).abs() < 1e-6,
        "{out:?}"
    );
    let err = m.predict(&[1.0, 100.0], &mut out).unwrap_err();
    assert!(err.to_string().contains("index"), "{err}");
    // And the model still evaluates afterwards.
    m.predict(&[2.0, 1.0], &mut out).unwrap();
    assert!((out[0] - 0.3).abs() < 1e-6, "{out:?}");
}
