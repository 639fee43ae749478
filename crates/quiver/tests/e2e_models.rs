//! Model versions and traffic with the real binary: hot-load of a new version under steady
//! load, rollback, a corrupt file that leaves the old version serving, a sticky canary split,
//! a shadow that never changes responses, traffic that survives a restart, the prediction
//! cache and its invalidation, an ONNX model through predict.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use quiver_model::trees::Forest;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/fixtures");

/// The XGBoost fixture with its base score changed, so each version answers differently.
fn xgb_version(base_score: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/xgb_binary.json"))
        .unwrap()
        .replace(
            "\"base_score\":\"[4.9075E-1]\"",
            &format!("\"base_score\":\"[{base_score}]\""),
        )
}

const SCORES: [&str; 4] = ["4.9075E-1", "2E-1", "7E-1", "5E-1"];

fn write_version(models: &Path, v: usize) {
    let dir = models.join(format!("m/{v}"));
    std::fs::create_dir_all(&dir).unwrap();
    // Written aside and renamed, as a deploy tool would, so a poll never sees half a file.
    let tmp = models.join(format!("m-{v}.tmp"));
    std::fs::write(&tmp, xgb_version(SCORES[v - 1])).unwrap();
    std::fs::rename(&tmp, dir.join("model.json")).unwrap();
}

fn repository(dir: &Path, versions: usize, extra: &str) -> PathBuf {
    let models = dir.join("models");
    for v in 1..=versions {
        write_version(&models, v);
    }
    let mut inputs = vec![r#"{ feature = "txn:amount" }"#.to_string()];
    inputs.extend((1..32).map(|i| format!(r#"{{ feature = "request:r{i}", default = 0.0 }}"#)));
    std::fs::write(
        models.join("m/config.toml"),
        format!(
            "runtime = \"xgboost\"\ninputs = [{}]\noutputs = [{{ name = \"p\" }}]\nversion_policy = {{ all = true }}\n{extra}",
            inputs.join(", ")
        ),
    )
    .unwrap();
    models
}

fn config(models: &Path) -> String {
    CONFIG.replace(
        "[log]",
        &format!(
            "[models]\nrepository = \"{}\"\npoll_interval = \"100ms\"\n\n[log]",
            models.display()
        ),
    )
}

fn expected(v: usize, amount: f64) -> f64 {
    let f = Forest::from_xgboost_json(&xgb_version(SCORES[v - 1])).unwrap();
    let mut row = vec![0.0; 32];
    row[0] = amount;
    f.predict_row(&row)
}

fn predict(server: &Server, user: &str) -> (u16, Value) {
    server.post(
        "/v1/models/m/predict",
        &json!({"entities": {"user_id": user}}).to_string(),
    )
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn hot_load_rollback_and_corrupt_files_under_steady_load() {
    let dir = tempfile::tempdir().unwrap();
    // Triton's behaviour, opted into: the newest version takes over once ready.
    let models = repository(dir.path(), 1, "promote = \"auto\"\n");
    let server = Server::start(dir.path(), &config(&models));
    let (_, reply) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"amount":1.5}}]"#,
    );
    let token = reply["token"].as_str().unwrap().to_string();
    server.post_with(
        "/v1/features",
        &json!({"features": ["txn:amount"], "entities": {"user_id": ["u1"]}}).to_string(),
        &[("Quiver-Read-After", &token)],
    );
    let (status, v) = predict(&server, "u1");
    assert_eq!((status, v["version"].as_u64()), (200, Some(1)), "{v}");

    // Steady load from two clients for the whole test: every request must succeed and be
    // answered by some version with exactly that version's output.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    // The highest version the load has been answered by (so the test waits for the load, not
    // only its own request, to reach a version before moving on).
    let newest = Arc::new(AtomicU64::new(0));
    let url = format!("{}/v1/models/m/predict", server.url);
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, served, url) = (stop.clone(), served.clone(), url.clone());
            let newest = newest.clone();
            std::thread::spawn(move || {
                let c = client();
                let mut seen = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = c
                        .post(&url)
                        .body(json!({"entities": {"user_id": "u1"}}).to_string())
                        .send()
                        .unwrap();
                    let status = r.status().as_u16();
                    let v: Value = r.json().unwrap();
                    assert_eq!(status, 200, "a request failed during a model change: {v}");
                    let version = v["version"].as_u64().unwrap() as usize;
                    let p = v["outputs"]["p"].as_f64().unwrap();
                    assert!((p - expected(version, 1.5)).abs() < 1e-12, "{v}");
                    seen.insert(version);
                    newest.fetch_max(version as u64, Ordering::Relaxed);
                    served.fetch_add(1, Ordering::Relaxed);
                }
                seen
            })
        })
        .collect();

    // A new version directory is loaded, warmed and (promote = "auto") becomes stable without
    // a restart.
    write_version(&models, 2);
    wait_for("version 2", || predict(&server, "u1").1["version"] == 2);
    wait_for("the load on version 2", || {
        newest.load(Ordering::Relaxed) == 2
    });
    let (_, list) = server.get("/v1/models");
    let m = &list["models"][0];
    assert_eq!(m["versions"][1]["status"], "READY", "{m}");
    assert!(m["versions"][1]["warmup_ms"].as_f64().is_some(), "{m}");

    // Rollback: one call, back to version 1 — and version 2 is not taken up again.
    let (status, v) = server.post("/v1/models/m/rollback", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["traffic"]["default"].clone(), v["version"].clone()),
        (json!(1), json!(1)),
        "{v}"
    );
    assert_eq!(predict(&server, "u1").1["version"], 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        predict(&server, "u1").1["version"],
        1,
        "a rolled-back version stays out"
    );

    // A corrupt rewrite of version 1 leaves the loaded version 1 serving, reported as an error.
    let errors_before = server.metric("quiver_model_load_errors_total");
    std::fs::write(models.join("m/1/model.json"), "{ not a model").unwrap();
    wait_for("the load error", || {
        server.get("/v1/models").1["models"][0]["versions"][0]["error"].is_string()
    });
    let (_, list) = server.get("/v1/models");
    assert_eq!(
        list["models"][0]["versions"][0]["status"], "READY",
        "{list}"
    );
    assert!(server.metric("quiver_model_load_errors_total") > errors_before);
    let (status, v) = predict(&server, "u1");
    assert_eq!((status, v["version"].as_u64()), (200, Some(1)), "{v}");
    // A corrupt new version never becomes ready and never takes traffic.
    std::fs::create_dir_all(models.join("m/3")).unwrap();
    std::fs::write(models.join("m/3/model.json"), "garbage").unwrap();
    wait_for("version 3's failure", || {
        server.get("/v1/models").1["models"][0]["versions"][2]["status"] == "FAILED"
    });
    let (status, v) = server.post(
        "/v1/models/m/predict",
        &json!({"entities": {"user_id": "u1"}, "version": 3}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("MODEL_NOT_READY")),
        "{v}"
    );

    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::BTreeSet::new();
    for t in load {
        seen.extend(t.join().expect("no request failed"));
    }
    assert!(served.load(Ordering::Relaxed) > 20, "the load ran");
    assert!(seen.contains(&1) && seen.contains(&2), "{seen:?}");
    assert_eq!(server.get("/readyz").0, 200);
}

#[test]
fn canary_is_sticky_shadow_is_invisible_and_traffic_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let models = repository(dir.path(), 3, "");
    let server = Server::start(dir.path(), &config(&models));
    assert_eq!(predict(&server, "u1").1["version"], 3, "newest by default");

    // 80/20 split between 1 and 2, shadow on 3.
    let (status, v) = server.put(
        "/v1/models/m/traffic",
        &json!({"split": {"1": 80, "2": 20}, "shadow": "3"}).to_string(),
    );
    assert_eq!(status, 200, "{v}");
    let mut first = std::collections::HashMap::new();
    let mut on_two = 0;
    for i in 0..400 {
        let user = format!("user-{i}");
        let (status, v) = predict(&server, &user);
        assert_eq!(status, 200, "{v}");
        let version = v["version"].as_u64().unwrap();
        assert!(
            version == 1 || version == 2,
            "the shadow never answers: {v}"
        );
        // NaN amount (no row): the version's own output, untouched by the shadow.
        let p = v["outputs"]["p"].as_f64().unwrap();
        assert!((p - expected(version as usize, f64::NAN)).abs() < 1e-12);
        on_two += usize::from(version == 2);
        first.insert(user, version);
    }
    // 20% of 400 = 80, sd ≈ 8.
    assert!(
        (50..=110).contains(&on_two),
        "{on_two} of 400 on the 20% version"
    );
    for (user, version) in first.iter().take(50) {
        assert_eq!(
            predict(&server, user).1["version"],
            *version,
            "sticky per key"
        );
    }
    wait_for("shadow evaluations", || {
        server.metric("quiver_shadow_predictions_total") >= 400.0
    });

    // Bad traffic is refused with the reason.
    let (status, v) = server.put(
        "/v1/models/m/traffic",
        &json!({"split": {"9": 100}}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("BAD_TRAFFIC")),
        "{v}"
    );
    let (status, _) = server.put("/v1/models/nope/traffic", &json!({"split": {}}).to_string());
    assert_eq!(status, 404);

    // The traffic state persists across a restart.
    let path = server.stop();
    let server = Server::restart(&path);
    let (_, list) = server.get("/v1/models");
    assert_eq!(
        list["models"][0]["traffic"]["split"],
        json!({"1": 80, "2": 20}),
        "{list}"
    );
    assert_eq!(list["models"][0]["traffic"]["shadow"], "3");
    for (user, version) in first.iter().take(50) {
        assert_eq!(
            predict(&server, user).1["version"],
            *version,
            "sticky across restarts"
        );
    }
    // Rollback with a split active: everything back on the default.
    let (status, v) = server.post("/v1/models/m/rollback", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["traffic"]["split"], json!({}));
    assert_eq!(predict(&server, "user-1").1["version"], 3);
    let (status, v) = server.put("/v1/models/m/traffic", &json!({"shadow": null}).to_string());
    assert_eq!(
        (status, v["traffic"]["shadow"].clone()),
        (200, Value::Null),
        "{v}"
    );
}

#[test]
fn the_cache_serves_repeats_and_never_a_stale_answer() {
    let dir = tempfile::tempdir().unwrap();
    let models = repository(
        dir.path(),
        1,
        "[cache]\nentries_max = 1000\nttl = \"60s\"\n[batching]\nbatch_max = 8\nqueue_delay_us_max = 500\n",
    );
    let server = Server::start(dir.path(), &config(&models));
    let write = |amount: f64| {
        let (_, reply) = server.post(
            "/v1/events",
            &json!([{"view": "txn", "key": "u1", "values": {"amount": amount}}]).to_string(),
        );
        reply["token"].as_str().unwrap().to_string()
    };
    let ask = |token: &str, r1: f64| {
        let (status, v) = server.post_with(
            "/v1/models/m/predict",
            &json!({"entities": {"user_id": "u1"}, "features": {"r1": r1}}).to_string(),
            &[("Quiver-Read-After", token)],
        );
        assert_eq!(status, 200, "{v}");
        v
    };
    let token = write(1.0);
    let v = ask(&token, 0.0);
    assert_eq!(v["cache"], "miss");
    let v2 = ask(&token, 0.0);
    assert_eq!(v2["cache"], "hit", "an identical request hits");
    assert_eq!(v2["outputs"], v["outputs"]);
    assert_eq!(
        ask(&token, 0.25)["cache"],
        "miss",
        "other request values are another key"
    );
    // A feature update makes the old entry unreachable.
    let token = write(-3.0);
    let v3 = ask(&token, 0.0);
    assert_eq!(v3["cache"], "miss");
    assert!((v3["outputs"]["p"].as_f64().unwrap() - expected(1, -3.0)).abs() < 1e-12);
    assert_eq!(ask(&token, 0.0)["cache"], "hit");
    assert!(server.metric("quiver_prediction_cache_total") >= 5.0);
    // The batcher ran these (batch size histogram has samples).
    assert!(server.metric("quiver_model_batch_size_count") >= 3.0);
}

#[test]
fn an_onnx_model_predicts_through_tract() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("mlp/1")).unwrap();
    std::fs::copy(
        format!("{FIXTURES}/onnx_mlp.onnx"),
        models.join("mlp/1/model.onnx"),
    )
    .unwrap();
    let mut inputs = vec![r#"{ feature = "txn:amount", default = 0.0 }"#.to_string()];
    inputs.extend((1..8).map(|i| format!(r#"{{ feature = "request:x{i}", default = 0.0 }}"#)));
    std::fs::write(
        models.join("mlp/config.toml"),
        format!(
            "runtime = \"onnx\"\ninputs = [{}]\noutputs = [{{ name = \"probabilities\", column = 1 }}]\n",
            inputs.join(", ")
        ),
    )
    .unwrap();
    let server = Server::start(dir.path(), &config(&models));
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURES}/onnx_reference.json")).unwrap(),
    )
    .unwrap();
    let row = &reference["onnx_mlp"]["inputs"][0];
    let want = reference["onnx_mlp"]["outputs"][0][1].as_f64().unwrap();
    let (_, reply) = server.post(
        "/v1/events",
        &json!([{"view": "txn", "key": "u1", "values": {"amount": row[0]}}]).to_string(),
    );
    let token = reply["token"].as_str().unwrap();
    let features: serde_json::Map<String, Value> =
        (1..8).map(|i| (format!("x{i}"), row[i].clone())).collect();
    let (status, v) = server.post_with(
        "/v1/models/mlp/predict",
        &json!({"entities": {"user_id": "u1"}, "features": features}).to_string(),
        &[("Quiver-Read-After", token)],
    );
    assert_eq!(status, 200, "{v}");
    let got = v["outputs"]["probabilities"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-5, "{got} vs onnxruntime {want}");
    let (_, list) = server.get("/v1/models");
    assert_eq!(list["models"][0]["versions"][0]["engine"], "tract");
}

/// The Open Inference Protocol's shapes and status codes, the feature-join extension, and
/// `quiver predict`.
#[test]
fn open_inference_protocol_and_the_predict_command() {
    let dir = tempfile::tempdir().unwrap();
    let models = repository(dir.path(), 2, "");
    let server = Server::start(dir.path(), &config(&models));
    let (_, reply) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"amount":1.5}},{"view":"txn","key":"u2","values":{"amount":-0.5}}]"#,
    );
    let token = reply["token"].as_str().unwrap().to_string();
    server.post_with(
        "/v1/features",
        &json!({"features": ["txn:amount"], "entities": {"user_id": ["u1"]}}).to_string(),
        &[("Quiver-Read-After", &token)],
    );

    let (status, v) = server.get("/v2");
    assert_eq!((status, v["name"].as_str()), (200, Some("quiver")), "{v}");
    assert!(v["extensions"].is_array());
    assert_eq!(server.get("/v2/health/live").0, 200);
    assert_eq!(server.get("/v2/health/ready").0, 200);
    let (status, v) = server.get("/v2/models/m");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "m");
    assert_eq!(v["versions"], json!(["1", "2"]));
    assert_eq!(v["platform"], "xgboost");
    // One fillable signature: the raw input vector; the feature join is the extension's.
    assert_eq!(
        v["inputs"],
        json!([{"name": "input", "datatype": "FP64", "shape": [-1, 32]}]),
        "{v}"
    );
    assert!(
        v["quiver_feature_join"]["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == &json!({"name": "user_id", "datatype": "BYTES", "shape": [-1]})),
        "{v}"
    );
    assert_eq!(
        v["outputs"],
        json!([{"name": "p", "datatype": "FP64", "shape": [-1]}])
    );
    assert_eq!(
        server.get("/v2/models/m/versions/1").1["versions"],
        json!(["1"])
    );
    assert_eq!(server.get("/v2/models/m/ready").0, 200);
    assert_eq!(server.get("/v2/models/m/versions/2/ready").0, 200);

    // Feature join: entity keys as BYTES, a request value, nested data; id echoed.
    let (status, v) = server.post(
        "/v2/models/m/infer",
        &json!({"id": "req-7", "inputs": [
            {"name": "user_id", "datatype": "BYTES", "shape": [2], "data": ["u1", "u2"]},
            {"name": "r1", "datatype": "FP32", "shape": [2, 1], "data": [[0.0], [0.0]]},
        ], "outputs": [{"name": "p"}]})
        .to_string(),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["model_name"].as_str(),
            v["model_version"].as_str(),
            v["id"].as_str()
        ),
        (Some("m"), Some("2"), Some("req-7"))
    );
    let out = &v["outputs"][0];
    assert_eq!(
        (
            out["name"].as_str(),
            out["datatype"].as_str(),
            out["shape"].clone()
        ),
        (Some("p"), Some("FP64"), json!([2]))
    );
    assert!(
        (out["data"][0].as_f64().unwrap() - expected(2, 1.5)).abs() < 1e-12,
        "{v}"
    );
    assert!(
        (out["data"][1].as_f64().unwrap() - expected(2, -0.5)).abs() < 1e-12,
        "{v}"
    );
    // Raw tensor on a pinned version.
    let mut row = vec![0.0; 32];
    row[0] = 1.5;
    let (status, v) = server.post(
        "/v2/models/m/versions/1/infer",
        &json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 32], "data": row}]})
            .to_string(),
    );
    assert_eq!(
        (status, v["model_version"].as_str()),
        (200, Some("1")),
        "{v}"
    );
    assert!((v["outputs"][0]["data"][0].as_f64().unwrap() - expected(1, 1.5)).abs() < 1e-12);

    // Errors in the protocol's shape and status.
    let infer = |path: &str, body: Value| server.post(path, &body.to_string());
    let cases = [
        (
            "/v2/models/nope/infer",
            json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 32], "data": row}]}),
            404,
        ),
        (
            "/v2/models/m/versions/9/infer",
            json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 32], "data": row}]}),
            404,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 31], "data": row}]}),
            400,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [2, 32], "data": row}]}),
            400,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "user_id", "datatype": "INT64", "shape": [1], "data": ["u1"]}]}),
            400,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": [1]}]}),
            400,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "r1", "datatype": "INT32", "shape": [1], "data": [1.5]}]}),
            400,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "zzz", "datatype": "FP32", "shape": [1], "data": [1]}]}),
            400,
        ),
        (
            "/v2/models/m/infer",
            json!({"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["u1"]}], "outputs": [{"name": "nope"}]}),
            400,
        ),
        ("/v2/models/m/infer", json!({"inputs": "nope"}), 400),
    ];
    for (path, body, want) in cases {
        let (status, v) = infer(path, body.clone());
        assert_eq!(status, want, "{path} {body}: {v}");
        assert!(v["error"].is_string(), "the protocol's error shape: {v}");
    }
    assert_eq!(server.get("/v2/models/nope").0, 404);
    assert_eq!(server.get("/v2/models/m/versions/9/ready").0, 404);

    // The CLI.
    let (ok, stdout, stderr) = quiver(&[
        "predict",
        "m",
        "--entity",
        "user_id=u1",
        "--feature",
        "request:r1=0",
        "--url",
        &server.url,
    ]);
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        (v["outputs"]["p"].as_f64().unwrap() - expected(2, 1.5)).abs() < 1e-12,
        "{v}"
    );
    let (ok, _, stderr) = quiver(&[
        "predict",
        "nope",
        "--entity",
        "user_id=u1",
        "--url",
        &server.url,
    ]);
    assert!(!ok && stderr.contains("404"), "{stderr}");
}

/// A shadow version whose model fails at run time (an ONNX `Gather` past the end of its table
/// for inputs ≥ 4, yet fine through warm-up; tract panics there) changes no response and stops
/// nothing: every answer is the primary's, the failures show in the shadow metrics, the node
/// stays ready. As the primary, the same model answers those inputs with a 500.
#[test]
fn a_failing_shadow_changes_no_response() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    for (v, file) in [(1, "onnx_half.onnx"), (2, "onnx_lookup4.onnx")] {
        std::fs::create_dir_all(models.join(format!("sh/{v}"))).unwrap();
        std::fs::copy(
            format!("{FIXTURES}/{file}"),
            models.join(format!("sh/{v}/model.onnx")),
        )
        .unwrap();
    }
    std::fs::write(
        models.join("sh/config.toml"),
        "runtime = \"onnx\"\ninputs = [{ feature = \"request:x\", default = 0.0 }]\noutputs = [{ name = \"y\" }]\nversion_policy = { all = true }\n",
    )
    .unwrap();
    let server = Server::start(dir.path(), &config(&models));
    wait_for("both versions ready", || {
        let (_, list) = server.get("/v1/models");
        list["models"][0]["versions"]
            .as_array()
            .is_some_and(|v| v.len() == 2 && v.iter().all(|v| v["status"] == "READY"))
    });
    let (status, v) = server.put(
        "/v1/models/sh/traffic",
        &json!({"default": "1", "shadow": "2"}).to_string(),
    );
    assert_eq!(status, 200, "{v}");

    let xs = [0.0, 1.0, 3.0, 4.0, 7.5, 100.0, 250.0];
    let failing = xs.iter().filter(|&&x| x >= 4.0).count() * 20;
    for round in 0..20 {
        for x in xs {
            let (status, v) = server.post(
                "/v1/models/sh/predict",
                &json!({"features": {"x": x}}).to_string(),
            );
            assert_eq!(status, 200, "round {round}, x {x}: {v}");
            assert_eq!(v["version"], 1, "{v}");
            let y = v["outputs"]["y"].as_f64().unwrap();
            assert!((y - 0.5 * x).abs() < 1e-6, "x {x}: {v}");
        }
    }
    let shadow = |result: &str| -> f64 {
        let text = common::client()
            .get(format!("{}/metrics", server.url))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("quiver_shadow_predictions_total{"))
            .filter(|l| l.contains(&format!("result=\"{result}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Shadow copies run after the responses, on their own thread.
    wait_for("the shadow's failures in its metrics", || {
        shadow("error") + shadow("dropped") >= failing as f64
    });
    assert!(shadow("error") > 0.0);
    assert!(shadow("ok") > 0.0, "inputs < 4 evaluate in the shadow too");
    // A raw-tensor V2 infer takes the same path: the primary answers, the shadow gets a copy.
    let before = shadow("error") + shadow("dropped");
    let (status, v) = server.post(
        "/v2/models/sh/infer",
        &json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [2, 1], "data": [1.0, 100.0]}]}).to_string(),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["outputs"][0]["data"], json!([0.5, 50.0]), "{v}");
    wait_for("the raw infer's shadow copy", || {
        shadow("error") + shadow("dropped") > before
    });
    let (status, _) = server.get("/readyz");
    assert_eq!(status, 200, "a failing shadow leaves the node ready");

    // The same model as the primary: the request that breaks it gets a 500, not a dropped
    // connection, and the next request is served.
    let (status, v) = server.put(
        "/v1/models/sh/traffic",
        &json!({"default": "2", "shadow": null}).to_string(),
    );
    assert_eq!(status, 200, "{v}");
    let (status, v) = server.post("/v1/models/sh/predict", r#"{"features": {"x": 100}}"#);
    assert_eq!(status, 500, "{v}");
    assert_eq!(v["error"]["code"], "MODEL_ERROR", "{v}");
    let (status, v) = server.post("/v1/models/sh/predict", r#"{"features": {"x": 3}}"#);
    assert_eq!(status, 200, "{v}");
    assert!(
        (v["outputs"]["y"].as_f64().unwrap() - 0.4).abs() < 1e-6,
        "{v}"
    );
}
