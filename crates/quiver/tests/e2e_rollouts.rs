//! Safe rollouts with the real binary: a new version takes no traffic until told; rollback
//! after a split (or with a shadow) returns to the stable version, never to the newest; a
//! canary that fails at run time, or is slow, is rolled back within one interval while the
//! stable version keeps answering; a good canary walks every step and becomes stable, also
//! across a restart mid-rollout; a version that misses its golden set is refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/fixtures");

/// The XGBoost fixture with another base score (each version answers differently), its trees
/// repeated `copies` times (a slower version).
fn xgb(base_score: &str, copies: usize) -> String {
    let text = std::fs::read_to_string(format!("{FIXTURES}/xgb_binary.json"))
        .unwrap()
        .replace(
            "\"base_score\":\"[4.9075E-1]\"",
            &format!("\"base_score\":\"[{base_score}]\""),
        );
    if copies <= 1 {
        return text;
    }
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let trees = v["learner"]["gradient_booster"]["model"]["trees"]
        .as_array()
        .unwrap()
        .clone();
    let many: Vec<Value> = (0..copies).flat_map(|_| trees.clone()).collect();
    v["learner"]["gradient_booster"]["model"]["trees"] = Value::Array(many);
    v.to_string()
}

/// Writes `models/m/<v>/model.json` aside and renames it in, as a deploy tool would.
fn write_xgb(models: &Path, v: u64, model: &str) {
    let dir = models.join(format!("m/{v}"));
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = models.join(format!("m-{v}.tmp"));
    std::fs::write(&tmp, model).unwrap();
    std::fs::rename(&tmp, dir.join("model.json")).unwrap();
}

/// Model `m`: the XGBoost fixture on 32 request inputs, `extra` appended to its config.
fn xgb_repository(dir: &Path, extra: &str) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("m")).unwrap();
    let inputs: Vec<String> = (0..32)
        .map(|i| format!(r#"{{ feature = "request:r{i}", default = 0.0 }}"#))
        .collect();
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

/// The request value each test model reads: `r0` (XGBoost `m`) or `x` (ONNX `sh`).
fn body(model: &str, user: &str, x: f64) -> String {
    let input = if model == "sh" { "x" } else { "r0" };
    json!({"entities": {"user_id": user}, "features": {input: x}}).to_string()
}

fn predict(server: &Server, model: &str, user: &str, x: f64) -> (u16, Value) {
    server.post(
        &format!("/v1/models/{model}/predict"),
        &body(model, user, x),
    )
}

fn wait_for(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn model(server: &Server, name: &str) -> Value {
    let (status, v) = server.get(&format!("/v1/models/{name}"));
    assert_eq!(status, 200, "{v}");
    v
}

fn ready(server: &Server, name: &str, version: u64) -> bool {
    model(server, name)["versions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["version"] == version && v["status"] == "READY")
}

/// Versions answering `n` requests from distinct users.
fn versions_of(server: &Server, name: &str, n: usize) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let (status, v) = predict(server, name, &format!("user-{i}"), 1.0);
            assert_eq!(status, 200, "{v}");
            v["version"].as_u64().unwrap()
        })
        .collect()
}

#[test]
fn a_new_version_waits_for_traffic_and_rollback_returns_to_stable() {
    let dir = tempfile::tempdir().unwrap();
    let models = xgb_repository(dir.path(), "");
    write_xgb(&models, 1, &xgb("4.9075E-1", 1));
    let server = Server::start(dir.path(), &config(&models));
    assert!(versions_of(&server, "m", 20).iter().all(|&v| v == 1));

    // Version 2 arrives, loads and is ready — and takes nothing until told.
    write_xgb(&models, 2, &xgb("2E-1", 1));
    wait_for("version 2 ready", Duration::from_secs(20), || {
        ready(&server, "m", 2)
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        versions_of(&server, "m", 100).iter().all(|&v| v == 1),
        "an untold candidate takes no traffic"
    );
    let m = model(&server, "m");
    assert_eq!(
        (
            m["stable_version"].clone(),
            m["versions"][1]["role"].clone()
        ),
        (json!(1), json!("candidate")),
        "{m}"
    );

    // A 50/50 split, then rollback: every request back on the stable version 1, not on 2.
    let (status, v) = server.put(
        "/v1/models/m/traffic",
        &json!({"split": {"1": 50, "2": 50}}).to_string(),
    );
    assert_eq!(status, 200, "{v}");
    let mixed = versions_of(&server, "m", 200);
    assert!(mixed.contains(&1) && mixed.contains(&2), "{mixed:?}");
    let (status, v) = server.post("/v1/models/m/rollback", "");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["version"], 1, "rollback says which version answers: {v}");
    assert!(
        v["reason"].as_str().unwrap().contains("stable version 1"),
        "{v}"
    );
    assert!(versions_of(&server, "m", 200).iter().all(|&x| x == 1));

    // A shadow never becomes the default, and rollback with one set still leaves version 1.
    let (status, v) = server.put("/v1/models/m/traffic", &json!({"shadow": "2"}).to_string());
    assert_eq!(status, 200, "{v}");
    assert!(versions_of(&server, "m", 50).iter().all(|&x| x == 1));

    // Promote: version 2 becomes stable; rollback returns to the last stable version, 1.
    let (status, v) = server.post("/v1/models/m/promote", r#"{"version": 2}"#);
    assert_eq!(status, 200, "{v}");
    assert!(versions_of(&server, "m", 50).iter().all(|&x| x == 2));
    let (status, v) = server.post("/v1/models/m/rollback", "");
    assert_eq!((status, v["version"].clone()), (200, json!(1)), "{v}");
    assert!(versions_of(&server, "m", 50).iter().all(|&x| x == 1));

    // A version that misses its golden set is refused: no traffic, and its status says why.
    let golden = dir.path().join("golden.json");
    std::fs::write(
        &golden,
        json!({"tolerance": 1e-9, "rows": [{"inputs": vec![0.0; 32], "outputs": [0.123]}]})
            .to_string(),
    )
    .unwrap();
    std::fs::create_dir_all(models.join("m/3")).unwrap();
    std::fs::copy(&golden, models.join("m/3/golden.json")).unwrap();
    write_xgb(&models, 3, &xgb("7E-1", 1));
    wait_for("version 3 refused", Duration::from_secs(20), || {
        model(&server, "m")["versions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["version"] == 3 && v["status"] == "FAILED")
    });
    let m = model(&server, "m");
    let v3 = m["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["version"] == 3)
        .unwrap()
        .clone();
    assert!(
        v3["error"]
            .as_str()
            .unwrap()
            .contains("golden set failed: golden.json: row 0 output 0"),
        "{v3}"
    );
    assert!(server.metric("quiver_model_golden_failures_total") >= 1.0);
    let (status, v) = server.put(
        "/v1/models/m/traffic",
        &json!({"split": {"1": 50, "3": 50}}).to_string(),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("BAD_TRAFFIC")),
        "{v}"
    );
    // The same version with a golden set it meets is accepted.
    let mut row = vec![0.0; 32];
    row[0] = 0.0;
    let want = quiver_model::trees::Forest::from_xgboost_json(&xgb("5E-1", 1))
        .unwrap()
        .predict_row(&row);
    std::fs::create_dir_all(models.join("m/4")).unwrap();
    std::fs::write(
        models.join("m/4/golden.json"),
        json!({"tolerance": 1e-9, "rows": [{"inputs": row, "outputs": [want]}]}).to_string(),
    )
    .unwrap();
    write_xgb(&models, 4, &xgb("5E-1", 1));
    wait_for("version 4 ready", Duration::from_secs(20), || {
        ready(&server, "m", 4)
    });
}

/// `onnx_half` answers 0.5·x; `onnx_lookup4` fails at run time for x ≥ 4 (tract panics on a
/// Gather past its table; warm-up passes).
fn onnx_repository(dir: &Path, rollout: &str) -> PathBuf {
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("sh/1")).unwrap();
    std::fs::copy(
        format!("{FIXTURES}/onnx_half.onnx"),
        models.join("sh/1/model.onnx"),
    )
    .unwrap();
    std::fs::write(
        models.join("sh/config.toml"),
        format!("runtime = \"onnx\"\ninputs = [{{ feature = \"request:x\", default = 0.0 }}]\noutputs = [{{ name = \"y\" }}]\nversion_policy = {{ all = true }}\n{rollout}"),
    )
    .unwrap();
    models
}

/// A load client: the (version, status) of each of its predictions.
type Client = std::thread::JoinHandle<Vec<(u64, u16)>>;

/// Steady predictions from two clients until stopped; (version, status) of each.
fn steady_load(server: &Server, model: &'static str, x: f64) -> (Arc<AtomicBool>, Vec<Client>) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = (0..2)
        .map(|t| {
            let (stop, url) = (stop.clone(), server.url.clone());
            std::thread::spawn(move || {
                let c = client();
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let b = body(model, &format!("u{t}-{i}"), x);
                    let r = c
                        .post(format!("{url}/v1/models/{model}/predict"))
                        .body(b)
                        .send()
                        .unwrap();
                    let status = r.status().as_u16();
                    let v: Value = r.json().unwrap();
                    seen.push((v["version"].as_u64().unwrap_or(0), status));
                    std::thread::sleep(Duration::from_millis(2));
                }
                seen
            })
        })
        .collect();
    (stop, handles)
}

fn stop_load(stop: Arc<AtomicBool>, handles: Vec<Client>) -> Vec<(u64, u16)> {
    stop.store(true, Ordering::Relaxed);
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

fn rollout_of(server: &Server, name: &str) -> Value {
    model(server, name)["rollout"].clone()
}

#[test]
fn a_canary_that_fails_at_run_time_is_rolled_back_within_one_interval() {
    let dir = tempfile::tempdir().unwrap();
    let models = onnx_repository(
        dir.path(),
        "[rollout]\nsteps = [50, 100]\nstep_interval = \"3s\"\nerror_rate_max = 0.01\nmin_requests = 5\n",
    );
    let server = Server::start(dir.path(), &config(&models));
    let (stop, load) = steady_load(&server, "sh", 100.0);
    std::thread::sleep(Duration::from_millis(300));
    std::fs::create_dir_all(models.join("sh/2")).unwrap();
    std::fs::copy(
        format!("{FIXTURES}/onnx_lookup4.onnx"),
        models.join("sh/2/model.onnx"),
    )
    .unwrap();
    // Started, and (perhaps already) rolled back: the decisions carry their times.
    wait_for("the rollback", Duration::from_secs(20), || {
        rollout_of(&server, "sh")["phase"] == "rolled_back"
    });
    let history = rollout_of(&server, "sh")["history"].clone();
    let at = |action: &str| {
        let d = history
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["action"] == action);
        d.unwrap()["at_ms"].as_i64().unwrap()
    };
    let took = at("rollback") - at("start");
    assert!(
        (0..3_000).contains(&took),
        "rolled back within one step interval: {took} ms"
    );
    std::thread::sleep(Duration::from_millis(500));
    let seen = stop_load(stop, load);
    let r = rollout_of(&server, "sh");
    let last = r["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["action"], "rollback", "{r}");
    assert!(
        last["reason"].as_str().unwrap().contains("error rate"),
        "{r}"
    );
    // The stable version answered throughout; only the canary's share failed, and only until
    // the rollback.
    assert!(seen.iter().filter(|s| s.0 == 1).all(|s| s.1 == 200));
    assert!(
        seen.iter().any(|s| s.1 == 500),
        "the canary's failures were seen"
    );
    assert!(versions_of(&server, "sh", 50).iter().all(|&v| v == 1));
    assert_eq!(model(&server, "sh")["traffic"]["rejected"], json!([2]));
    assert!(server.metric_with("quiver_rollout_decisions_total", "action=\"rollback\"") >= 1.0);
    // Every decision is also in the tamper-evident audit trail, which verifies.
    let trail = server.data_dir.join("audit.log");
    let text = std::fs::read_to_string(&trail).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("\"rollout_rollback\"") && l.contains("model:sh")),
        "{text}"
    );
    let (ok, stdout, _) = quiver(&["audit", "verify", trail.to_str().unwrap()]);
    assert!(ok, "{stdout}");
}

#[test]
fn a_slow_canary_is_rolled_back_on_latency() {
    let dir = tempfile::tempdir().unwrap();
    let models = xgb_repository(
        dir.path(),
        "[rollout]\nsteps = [50, 100]\nstep_interval = \"20s\"\np99_ratio_max = 3.0\nmin_requests = 20\n",
    );
    write_xgb(&models, 1, &xgb("4.9075E-1", 1));
    let server = Server::start(dir.path(), &config(&models));
    let (stop, load) = steady_load(&server, "m", 1.0);
    // Version 2: the same trees 400 times over — the same kind of answer, far slower.
    write_xgb(&models, 2, &xgb("4.9075E-1", 400));
    wait_for("the rollout to start", Duration::from_secs(20), || {
        rollout_of(&server, "m")["phase"] == "running"
    });
    wait_for("the rollback on latency", Duration::from_secs(20), || {
        rollout_of(&server, "m")["phase"] == "rolled_back"
    });
    stop_load(stop, load);
    let r = rollout_of(&server, "m");
    let last = r["history"].as_array().unwrap().last().unwrap().clone();
    assert!(last["reason"].as_str().unwrap().contains("p99"), "{r}");
    assert!(versions_of(&server, "m", 20).iter().all(|&v| v == 1));
}

#[test]
fn a_good_canary_walks_every_step_across_a_restart_and_becomes_stable() {
    let dir = tempfile::tempdir().unwrap();
    let models = xgb_repository(
        dir.path(),
        "[rollout]\nsteps = [20, 50, 100]\nstep_interval = \"2s\"\nmin_requests = 5\np99_slack = \"50ms\"\n",
    );
    write_xgb(&models, 1, &xgb("4.9075E-1", 1));
    let server = Server::start(dir.path(), &config(&models));
    let (stop, load) = steady_load(&server, "m", 1.0);
    write_xgb(&models, 2, &xgb("2E-1", 1));
    wait_for("step 2 (50%)", Duration::from_secs(20), || {
        rollout_of(&server, "m")["step"] == 1
    });
    let r = rollout_of(&server, "m");
    assert_eq!(
        (r["phase"].clone(), r["percent"].clone()),
        (json!("running"), json!(50)),
        "{r}"
    );
    stop_load(stop, load);

    // A restart mid-rollout resumes it in the step it was in.
    let path = server.stop();
    let server = Server::restart(&path);
    let r = rollout_of(&server, "m");
    assert_eq!(
        (r["phase"].clone(), r["step"].clone()),
        (json!("running"), json!(1)),
        "{r}"
    );
    let split = model(&server, "m")["traffic"]["split"].clone();
    assert_eq!(
        split,
        json!({"1": 50, "2": 50}),
        "the canary's share survives the restart"
    );

    let (stop, load) = steady_load(&server, "m", 1.0);
    wait_for("the promotion", Duration::from_secs(30), || {
        rollout_of(&server, "m")["phase"] == "promoted"
    });
    stop_load(stop, load);
    let m = model(&server, "m");
    assert_eq!(m["stable_version"], 2, "{m}");
    let actions: Vec<&str> = m["rollout"]["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["start", "advance", "promote"], "{m}");
    assert!(versions_of(&server, "m", 50).iter().all(|&v| v == 2));
}
