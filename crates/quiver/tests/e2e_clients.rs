//! The ecosystems' own clients against the real binary: the Feast SDK (remote online store)
//! reads, writes, pushes and resolves a feature service (`tests/python/feast_client.py`);
//! tritonclient.http with its defaults (binary tensors) and as a generic "read metadata, fill
//! every input" client matches the reference libraries (`tests/python/triton_client.py`), and
//! so does tritonclient.grpc, ModelStreamInfer included (`tests/python/triton_grpc_client.py`).

mod common;

use common::*;

const FEAST_CONFIG: &str = r#"
[log]
partitions = 4

[[entity]]
name = "driver"
key = "driver_id"

[[view]]
name = "driver_stats"
entity = "driver"
ttl = "1h"
push_source = "driver_push"
features = [
  { name = "conv_rate", type = "f64" },
  { name = "trips", type = "i64" },
]

[[feature_service]]
name = "driver_svc"
features = ["driver_stats:conv_rate", "driver_stats:trips"]
"#;

#[test]
fn the_feast_sdk_reads_writes_and_pushes_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), FEAST_CONFIG);
    let now = quiver_core::time::now_ms();
    let events = format!(
        r#"[{{"view":"driver_stats","key":1001,"ts":{now},"values":{{"conv_rate":0.5,"trips":10}}}},
            {{"view":"driver_stats","key":1002,"ts":{},"values":{{"conv_rate":0.25,"trips":3}}}}]"#,
        now - 2 * 3_600_000
    );
    let (status, reply) = server.post("/v1/events", &events);
    assert_eq!(status, 200, "{reply}");
    let token = reply["token"].as_str().unwrap().to_string();
    let (status, _) = server.get_with(
        "/v1/features/driver_stats/1001",
        &[("Quiver-Read-After", &token)],
    );
    assert_eq!(status, 200);
    let repo = dir.path().join("feast_repo");
    std::fs::create_dir_all(&repo).unwrap();
    let out = run_client_script("feast_client.py", &[&server.url, repo.to_str().unwrap()]);
    assert!(out.contains("all checks passed"), "{out}");
}

/// A model repository of the conformance fixtures (XGBoost JSON, LightGBM text, an ONNX
/// regression), each taking its raw input vector; and the cases for `triton_client.py`:
/// inputs with the reference library's outputs.
fn triton_models(dir: &std::path::Path) -> (std::path::PathBuf, serde_json::Value) {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures");
    let read = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures.join(f)).unwrap()).unwrap()
    };
    let trees = read("reference.json");
    let onnx = &read("onnx_reference.json")["onnx_linreg"];
    let models = dir.join("models");
    let add = |name: &str, runtime: &str, file: &str, target: &str, width: usize, output: &str| {
        let v = models.join(name).join("1");
        std::fs::create_dir_all(&v).unwrap();
        std::fs::copy(fixtures.join(file), v.join(target)).unwrap();
        let inputs: Vec<String> = (0..width)
            .map(|i| format!(r#"{{ feature = "request:f{i}", default = 0.0 }}"#))
            .collect();
        std::fs::write(
            models.join(name).join("config.toml"),
            format!(
                "runtime = \"{runtime}\"\ninputs = [{}]\noutputs = [{{ name = \"{output}\" }}]\n",
                inputs.join(", ")
            ),
        )
        .unwrap();
    };
    add("xgb", "xgboost", "xgb_binary.json", "model.json", 32, "p");
    add("lgbm", "lightgbm", "lgbm_binary.txt", "model.txt", 32, "p");
    add(
        "linreg",
        "onnx",
        "onnx_linreg.onnx",
        "model.onnx",
        8,
        "variable",
    );
    let flat = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|x| x.as_array().cloned().unwrap_or_else(|| vec![x.clone()]))
            .collect()
    };
    let cases = serde_json::json!([
        {"model": "xgb", "output": "p", "inputs": trees["inputs"], "expected": trees["xgboost"]},
        {"model": "lgbm", "output": "p", "inputs": trees["inputs"], "expected": trees["lightgbm"]},
        {"model": "linreg", "output": "variable", "inputs": onnx["inputs"], "expected": flat(&onnx["outputs"])},
    ]);
    (models, cases)
}

#[test]
fn tritonclient_http_with_its_defaults_matches_the_reference_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let (models, cases) = triton_models(dir.path());
    let config = CONFIG.replace(
        "[log]",
        &format!("[models]\nrepository = \"{}\"\n\n[log]", models.display()),
    );
    let server = Server::start(dir.path(), &config);
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, cases.to_string()).unwrap();
    let host = server.url.trim_start_matches("http://").to_string();
    let out = run_client_script("triton_client.py", &[&host, cases_path.to_str().unwrap()]);
    assert!(out.contains("all checks passed"), "{out}");
}

#[test]
fn tritonclient_grpc_matches_the_reference_libraries() {
    let dir = tempfile::tempdir().unwrap();
    let (models, cases) = triton_models(dir.path());
    let config = CONFIG.replace(
        "[log]",
        &format!("[models]\nrepository = \"{}\"\n\n[log]", models.display()),
    );
    let server = Server::start_args(dir.path(), &config, &["--grpc-listen", "127.0.0.1:0"]);
    let grpc = server.grpc.clone().expect("the gRPC listener is announced");
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, cases.to_string()).unwrap();
    let out = run_client_script(
        "triton_grpc_client.py",
        &[&grpc, cases_path.to_str().unwrap()],
    );
    assert!(out.contains("all checks passed"), "{out}");
}
