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
