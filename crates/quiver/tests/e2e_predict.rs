//! Predict with the real binary: features from the store plus request-time values through a
//! real XGBoost model file; the output equals the runtime applied to that vector.

mod common;

use common::*;
use quiver_model::trees::Forest;
use serde_json::json;

fn repository(dir: &std::path::Path) -> std::path::PathBuf {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/xgb_binary.json"
    );
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("fraud/1")).unwrap();
    std::fs::create_dir_all(models.join("fraud/2")).unwrap();
    std::fs::copy(fixture, models.join("fraud/1/model.json")).unwrap();
    std::fs::copy(fixture, models.join("fraud/2/model.json")).unwrap();
    let mut inputs = vec![
        r#"{ feature = "txn:amount" }"#.to_string(),
        r#"{ feature = "txn:seq", default = -1.0 }"#.to_string(),
    ];
    inputs.push(r#"{ feature = "request:r2" }"#.into());
    inputs.extend((3..32).map(|i| format!(r#"{{ feature = "request:r{i}", default = 0.0 }}"#)));
    let config = format!("runtime = \"xgboost\"\ninputs = [{}]\noutputs = [{{ name = \"probability\" }}]\nversion_policy = {{ latest = 2 }}\n", inputs.join(", "));
    std::fs::write(models.join("fraud/config.toml"), config).unwrap();
    // A model whose inputs do not fit the schema is refused, the rest still load.
    std::fs::create_dir_all(models.join("broken/1")).unwrap();
    std::fs::copy(fixture, models.join("broken/1/model.json")).unwrap();
    std::fs::write(
        models.join("broken/config.toml"),
        "runtime = \"xgboost\"\ninputs = [{ feature = \"txn:merchant\" }]\n",
    )
    .unwrap();
    models
}

#[test]
fn predict_joins_features_and_runs_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let models = repository(dir.path());
    let config = CONFIG.replace(
        "[log]",
        &format!("[models]\nrepository = \"{}\"\n\n[log]", models.display()),
    );
    let server = Server::start(dir.path(), &config);
    let forest = Forest::from_xgboost_json(
        &std::fs::read_to_string(models.join("fraud/1/model.json")).unwrap(),
    )
    .unwrap();
    let expected = |amount: f64, seq: f64, r2: f64| {
        let mut row = vec![0.0; 32];
        row[0] = amount;
        row[1] = seq;
        row[2] = r2;
        forest.predict_row(&row)
    };

    let (_, reply) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"amount":2.5,"seq":3}}]"#,
    );
    let token = reply["token"].as_str().unwrap().to_string();
    let body = json!({"entities": {"user_id": "u1"}, "features": {"r2": 0.5}}).to_string();
    let (status, v) = server.post_with(
        "/v1/models/fraud/predict",
        &body,
        &[("Quiver-Read-After", &token)],
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["model"].as_str(), v["version"].as_u64()),
        (Some("fraud"), Some(2)),
        "the default is the latest version"
    );
    let p = v["outputs"]["probability"].as_f64().unwrap();
    assert!((p - expected(2.5, 3.0, 0.5)).abs() < 1e-12, "{p}");
    assert_eq!(v["missing"], json!([]));
    assert_eq!(v["cache"], "miss");

    // A feature update changes the prediction.
    let (_, reply) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"amount":-2.0}}]"#,
    );
    let token = reply["token"].as_str().unwrap().to_string();
    let (_, v) = server.post_with(
        "/v1/models/fraud/predict",
        &body,
        &[("Quiver-Read-After", &token)],
    );
    let p2 = v["outputs"]["probability"].as_f64().unwrap();
    assert!((p2 - expected(-2.0, 3.0, 0.5)).abs() < 1e-12);
    assert_ne!(p, p2, "feature 0 matters to this model");

    // Unknown entity: defaults, and the response says which features were missing.
    let (status, v) = server.post(
        "/v1/models/fraud/predict",
        &json!({"entities": {"user_id": "ghost"}, "features": {"r2": 0.5}, "version": 1})
            .to_string(),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], 1, "pinned");
    assert_eq!(
        v["missing"],
        json!([{"feature": "txn:amount", "status": "NOT_FOUND"}, {"feature": "txn:seq", "status": "NOT_FOUND"}])
    );
    let p3 = v["outputs"]["probability"].as_f64().unwrap();
    assert!(
        (p3 - expected(f64::NAN, -1.0, 0.5)).abs() < 1e-12,
        "no default for amount: NaN, the model's missing value"
    );

    // Batches.
    let batch = json!({"instances": [{"entities": {"user_id": "u1"}, "features": {"r2": 0.5}}, {"entities": {"user_id": "ghost"}, "features": {"r2": 0.5}}]});
    let (status, v) = server.post("/v1/models/fraud/predict", &batch.to_string());
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["predictions"][0]["outputs"]["probability"]
            .as_f64()
            .unwrap(),
        p2
    );
    assert_eq!(
        v["predictions"][1]["outputs"]["probability"]
            .as_f64()
            .unwrap(),
        p3
    );

    // Errors.
    let (status, v) = server.post("/v1/models/nope/predict", &body);
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("UNKNOWN_MODEL"))
    );
    let (status, v) = server.post(
        "/v1/models/fraud/predict",
        &json!({"entities": {"user_id": "u1"}, "version": 9}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("UNKNOWN_VERSION"))
    );
    let (status, v) = server.post(
        "/v1/models/fraud/predict",
        &json!({"entities": {"user_id": "u1"}}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("MISSING_FEATURE"))
    );
    let (status, v) = server.post(
        "/v1/models/fraud/predict",
        &json!({"features": {"r2": 1}}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("MISSING_ENTITY"))
    );
    let (_, v) = server.get("/v1/models");
    let model = |name: &str| {
        v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(model("fraud")["versions"].as_array().unwrap().len(), 2);
    assert_eq!(model("fraud")["versions"][1]["status"], "READY");
    assert_eq!(model("fraud")["default_version"], 2);
    assert!(
        model("broken")["error"]
            .as_str()
            .unwrap()
            .contains("numeric"),
        "{v}"
    );
    // A model that does not load is reported, and does not hold readiness hostage.
    assert_eq!(server.get("/readyz").0, 200);
}
