//! Zero trust with the real binary: every route × every role (the table the router is built
//! from), API keys made and revoked with `quiver keys`, JWTs (expired, not yet valid, another
//! audience, forged, unknown key), TLS and mTLS with certificates made here (and a certificate
//! replaced without a restart), gRPC over mTLS, the audit trail and `quiver audit verify`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../model/tests/fixtures");

/// `CONFIG` with a push source, model `m` (XGBoost fixture) and `[auth]` as given.
fn secured(dir: &Path, auth: &str) -> String {
    let models = dir.join("models");
    std::fs::create_dir_all(models.join("m/1")).unwrap();
    std::fs::copy(
        format!("{FIXTURES}/xgb_binary.json"),
        models.join("m/1/model.json"),
    )
    .unwrap();
    let mut inputs = vec![r#"{ feature = "txn:amount" }"#.to_string()];
    inputs.extend((1..32).map(|i| format!(r#"{{ feature = "request:r{i}", default = 0.0 }}"#)));
    std::fs::write(
        models.join("m/config.toml"),
        format!(
            "runtime = \"xgboost\"\ninputs = [{}]\noutputs = [{{ name = \"p\" }}]\n",
            inputs.join(", ")
        ),
    )
    .unwrap();
    CONFIG
        .replace(
            "[log]",
            &format!(
                "[models]\nrepository = \"{}\"\n\n{auth}\n\n[log]",
                models.display()
            ),
        )
        .replace(
            "  { name = \"seq\", type = \"i64\" },\n]",
            "  { name = \"seq\", type = \"i64\" },\n]\npush_source = \"txn_push\"",
        )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A request that reaches each route (the test fails on a route it has no request for, so a
/// new route cannot be added without deciding who may call it).
fn request_for(method: &str, path: &str) -> (String, Option<String>) {
    let body = |v: Value| Some(v.to_string());
    let features = json!({"features": ["txn:seq"], "entities": {"user_id": ["u1"]}});
    let (path, body) = match (method, path) {
        ("POST", "/v1/events") => (
            path.into(),
            body(json!([{"view": "txn", "key": "u1", "values": {"seq": 1}}])),
        ),
        ("GET", "/v1/features/{view}/{key}") => ("/v1/features/txn/u1".into(), None),
        ("POST", "/v1/features") | ("POST", "/get-online-features") => {
            (path.into(), body(features))
        }
        ("POST", "/v1/features/historical") => {
            let mut f = features;
            f["timestamps"] = json!([now_ms()]);
            (path.into(), body(f))
        }
        ("POST", "/write-to-online-store") => (
            path.into(),
            body(json!({"feature_view_name": "txn", "df": {"user_id": ["u1"], "seq": [2]}})),
        ),
        ("POST", "/push") => (
            path.into(),
            body(
                json!({"push_source_name": "txn_push", "df": {"user_id": ["u1"], "seq": [3]}, "to": "online"}),
            ),
        ),
        ("GET", p) if !p.contains('{') => (p.into(), None),
        ("GET", "/v1/models/{model}") => ("/v1/models/m".into(), None),
        ("POST", "/v1/models/{model}/predict") => (
            "/v1/models/m/predict".into(),
            body(json!({"entities": {"user_id": "u1"}})),
        ),
        ("PUT", "/v1/models/{model}/traffic") => {
            ("/v1/models/m/traffic".into(), body(json!({"shadow": null})))
        }
        ("POST", "/v1/models/{model}/rollback") => {
            ("/v1/models/m/rollback".into(), Some(String::new()))
        }
        ("POST", "/v1/models/{model}/promote") => {
            ("/v1/models/m/promote".into(), body(json!({"version": 1})))
        }
        ("GET", p) if p.starts_with("/v2/models/{model}") => {
            (p.replace("{model}", "m").replace("{version}", "1"), None)
        }
        ("POST", p) if p.starts_with("/v2/models/{model}") => (
            p.replace("{model}", "m").replace("{version}", "1"),
            body(
                json!({"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 32], "data": vec![0.0; 32]}]}),
            ),
        ),
        _ => panic!("no request for route {method} {path}: add one here, with who may call it"),
    };
    (path, body)
}

fn send(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, Value) {
    let url = format!("{}{path}", server.url);
    let mut req = match method {
        "GET" => server.http.get(url),
        "POST" => server.http.post(url),
        "PUT" => server.http.put(url),
        other => panic!("method {other}"),
    };
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// A key with `grants`, made and then revoked by the real CLI: what a revoked client sends.
fn revoked_key(data: &Path, grants: &[&str]) -> String {
    let token = key(data, "revoked", grants, None);
    let id = token.split('_').nth(1).unwrap().to_string();
    let keys_file = data.join("keys.toml");
    let args = [
        "keys",
        "revoke",
        &id,
        "--keys-file",
        keys_file.to_str().unwrap(),
    ];
    let (ok, _, e) = quiver(&args);
    assert!(ok, "{e}");
    token
}

#[test]
fn every_route_answers_every_role_as_its_access_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let roles = ["producer", "reader", "predictor", "admin", "ops"];
    let mut tokens: Vec<(&str, String)> = roles
        .iter()
        .map(|r| {
            let grant = match *r {
                "producer" | "reader" => format!("{r}:txn"),
                "predictor" => "predictor:m".into(),
                other => other.into(),
            };
            (*r, key(&data, r, &[&grant], None))
        })
        .collect();
    // Grants on another view: the right role, the wrong resource.
    let elsewhere = key(
        &data,
        "elsewhere",
        &["producer:profile", "reader:profile", "predictor:other"],
        None,
    );
    let revoked = revoked_key(
        &data,
        &["admin", "reader:*", "producer:*", "predictor:*", "ops"],
    );
    tokens.push(("elsewhere", elsewhere));
    let server = Server::start(
        dir.path(),
        &secured(dir.path(), "[auth]\nmode = \"api_key\""),
    );
    let table = quiver_server::route_table();
    assert!(
        table.len() >= 25,
        "the table is the router: {} routes",
        table.len()
    );
    // The default `auth.public` (health probes and the cluster's peer probe).
    let public = quiver_core::config::AuthConfig::default().public;
    assert!(public.iter().any(|p| p == "/v1/cluster/node"), "{public:?}");
    for route in &table {
        let (path, body) = request_for(route.method, route.path);
        let what = format!("{} {}", route.method, route.path);
        let needed = match route.access {
            quiver_server::Access::Role(r) => r.as_str(),
            quiver_server::Access::Health => "ops",
        };
        let open = public.iter().any(|p| p == route.path);
        for (who, token) in [("nobody", None), ("revoked", Some(revoked.as_str()))] {
            let (status, v) = send(&server, route.method, &path, body.as_deref(), token);
            if open {
                assert!(
                    status != 401 && status != 403,
                    "{what} is public, {who} got {status}: {v}"
                );
            } else {
                assert_eq!(status, 401, "{what} as {who}: {v}");
                assert_eq!(v["error"]["code"], "UNAUTHENTICATED", "{what}: {v}");
            }
        }
        for (who, token) in &tokens {
            let (status, v) = send(&server, route.method, &path, body.as_deref(), Some(token));
            // A grant on another view or model passes only routes that name none (the list
            // of models, which it then sees filtered to its own).
            let unnamed = matches!(route.path, "/v1/models" | "/v2");
            let allowed =
                open || *who == needed || (*who == "elsewhere" && needed == "predictor" && unnamed);
            if allowed {
                assert!(
                    status != 401 && status != 403,
                    "{what} as {who}: {status} {v}"
                );
            } else {
                assert_eq!(status, 403, "{what} as {who}: {v}");
                assert_eq!(v["error"]["code"], "FORBIDDEN", "{what}: {v}");
            }
        }
    }
    let elsewhere = &tokens.last().unwrap().1;
    let (_, v) = send(&server, "GET", "/v1/models", None, Some(elsewhere));
    assert_eq!(v["models"], json!([]), "only the models it may call");
    let (_, v) = send(&server, "GET", "/v1/models", None, Some(&tokens[2].1));
    assert_eq!(v["models"][0]["name"], "m");
    // The refusals are in the audit trail, and it verifies.
    let trail = std::fs::read_to_string(data.join("audit.log")).unwrap();
    assert!(trail.contains("\"action\":\"denied\"") && trail.contains("\"outcome\":\"403\""));
    let (ok, stdout, _) = quiver(&["audit", "verify", data.join("audit.log").to_str().unwrap()]);
    assert!(ok, "{stdout}");
}

/// Every gRPC method of the served `.proto` files (`service/Method` paths), read from the
/// files themselves so a new method cannot be left out of the matrix below.
fn grpc_methods() -> Vec<String> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../server/proto");
    let mut out = Vec::new();
    for (file, service) in [
        ("grpc_service.proto", "inference.GRPCInferenceService"),
        ("quiver/v1/ingest.proto", "quiver.v1.Ingest"),
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("rpc ") {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric()).collect();
                out.push(format!("/{service}/{name}"));
            }
        }
    }
    out
}

/// The role a gRPC method needs, as README's "Roles and grants" says (`None`: public).
fn grpc_role(path: &str) -> Option<&'static str> {
    match path.rsplit('/').next().unwrap() {
        "ServerLive" | "ServerReady" => None,
        "ServerMetadata" | "ModelReady" | "ModelMetadata" | "ModelInfer" | "ModelStreamInfer"
        | "RepositoryIndex" => Some("predictor"),
        "Push" => Some("producer"),
        _ => Some("admin"),
    }
}

/// The gRPC side of the endpoint × role matrix: every method of the `.proto` files, every role,
/// no credentials and a revoked key.
/// A plain single-entity GET or predict is answered beside the router
/// (`quiver_server::direct`); the same request with its view, key or model percent-escaped goes
/// through the router. Both must answer alike — reads, predictions, refusals and errors — for
/// every credential.
#[test]
fn reads_and_predicts_beside_the_router_answer_as_the_router_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let reader = key(&data, "reader", &["reader:txn"], None);
    let elsewhere = key(&data, "elsewhere", &["reader:profile"], None);
    let producer = key(&data, "producer", &["producer:txn"], None);
    let predictor = key(&data, "predictor", &["predictor:m"], None);
    let server = Server::start(
        dir.path(),
        &secured(dir.path(), "[auth]\nmode = \"api_key\""),
    );
    let (status, v) = send(
        &server,
        "POST",
        "/v1/events?ack=durable",
        Some(r#"[{"view":"txn","key":"u1","values":{"amount":12.5,"seq":7}}]"#),
        Some(&producer),
    );
    assert_eq!(status, 200, "{v}");
    let applied = std::time::Instant::now();
    while send(&server, "GET", "/v1/features/txn/u1", None, Some(&reader)).0 != 200 {
        assert!(
            applied.elapsed() < Duration::from_secs(10),
            "u1 never applied"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // `age_ms` moves between two reads; everything else must be equal.
    let without_ages = |mut v: Value| {
        if let Some(fs) = v.get_mut("features").and_then(Value::as_object_mut) {
            fs.values_mut().for_each(|f| {
                f.as_object_mut().map(|f| f.remove("age_ms"));
            });
        }
        v
    };
    let pairs = [
        ("/v1/features/txn/u1", "/v1/features/txn/%75%31"),
        ("/v1/features/txn/u1", "/v1/features/%74xn/u1"),
        ("/v1/features/txn/nobody", "/v1/features/txn/n%6Fbody"),
        (
            "/v1/features/nosuchview/u1",
            "/v1/features/nosuchview/%75%31",
        ),
    ];
    let body = r#"{"entities":{"user_id":"u1"},"features":{"r1":0.5}}"#;
    let predicts = [
        ("/v1/models/m/predict", "/v1/models/%6D/predict", body),
        (
            "/v1/models/m/predict",
            "/v1/models/%6D/predict",
            "{not json",
        ),
        (
            "/v1/models/nosuch/predict",
            "/v1/models/n%6Fsuch/predict",
            body,
        ),
    ];
    let tokens = [
        None,
        Some(&reader),
        Some(&elsewhere),
        Some(&producer),
        Some(&predictor),
    ];
    let mut predicted = 0;
    for (plain, escaped, body) in predicts {
        for token in tokens {
            let (s1, v1) = send(
                &server,
                "POST",
                plain,
                Some(body),
                token.map(String::as_str),
            );
            let (s2, v2) = send(
                &server,
                "POST",
                escaped,
                Some(body),
                token.map(String::as_str),
            );
            assert_eq!((s1, &v1), (s2, &v2), "{plain} and {escaped}: {body}");
            if s1 == 200 {
                assert!(v1["outputs"]["p"].is_number(), "{v1}");
                predicted += 1;
            }
        }
    }
    assert_eq!(
        predicted, 1,
        "the predictor predicted with m, nothing else did"
    );
    let mut read = 0;
    for (plain, escaped) in pairs {
        for token in tokens {
            let (s1, v1) = send(&server, "GET", plain, None, token.map(String::as_str));
            let (s2, v2) = send(&server, "GET", escaped, None, token.map(String::as_str));
            let who = token.map_or("nobody", |_| "a key");
            assert_eq!(s1, s2, "{plain} and {escaped} as {who}: {v1} / {v2}");
            assert_eq!(
                without_ages(v1.clone()),
                without_ages(v2),
                "{plain} as {who}"
            );
            if s1 == 200 {
                assert_eq!(v1["features"]["amount"]["value"], 12.5, "{v1}");
                read += 1;
            }
        }
    }
    assert_eq!(
        read, 2,
        "the reader read u1 both ways, and nothing else was read"
    );
}

#[test]
fn every_grpc_method_answers_every_role_as_its_role_says() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let roles = ["producer", "reader", "predictor", "admin", "ops"];
    let tokens: Vec<(&str, String)> = roles
        .iter()
        .map(|r| {
            let grant = match *r {
                "admin" | "ops" => r.to_string(),
                other => format!("{other}:*"),
            };
            (*r, key(&data, r, &[&grant], None))
        })
        .collect();
    let revoked = revoked_key(&data, &["admin", "predictor:*", "producer:*"]);
    let server = Server::start_args(
        dir.path(),
        &secured(dir.path(), "[auth]\nmode = \"api_key\""),
        &["--grpc-listen", "127.0.0.1:0"],
    );
    let grpc = server.grpc.clone().expect("gRPC listener announced");
    let methods = grpc_methods();
    assert!(methods.len() >= 20, "{methods:?}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        for path in &methods {
            let needed = grpc_role(path);
            for (who, token) in [("nobody", None), ("revoked", Some(revoked.as_str()))] {
                let code = grpc_call(channel.clone(), path, token, None).await;
                match needed {
                    None => assert!(
                        !matches!(
                            code,
                            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                        ),
                        "{path} is public, {who} got {code:?}"
                    ),
                    Some(_) => assert_eq!(code, tonic::Code::Unauthenticated, "{path} as {who}"),
                }
            }
            for (who, token) in &tokens {
                let code = grpc_call(channel.clone(), path, Some(token), None).await;
                if needed.is_none_or(|r| r == *who) {
                    assert!(
                        !matches!(
                            code,
                            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                        ),
                        "{path} as {who}: {code:?}"
                    );
                } else {
                    assert_eq!(code, tonic::Code::PermissionDenied, "{path} as {who}");
                }
            }
        }
    });
}

#[test]
fn a_revoked_key_stops_working_without_a_restart_and_the_audit_trail_catches_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let admin = key(&data, "ops-team", &["admin", "predictor:*"], None);
    let server = Server::start_logged(
        dir.path(),
        &secured(
            dir.path(),
            "[server]\ngrpc_listen = \"127.0.0.1:0\"\n\n[auth]\nmode = \"api_key\"",
        ),
        "warn,quiver_server=debug",
    );
    let (status, v) = send(
        &server,
        "PUT",
        "/v1/models/m/traffic",
        Some(r#"{"shadow": null}"#),
        Some(&admin),
    );
    assert_eq!(status, 200, "{v}");
    // `X-Api-Key` carries a key as well as `Authorization: Bearer`.
    let r = server
        .http
        .get(format!("{}/v1/models/m", server.url))
        .header("x-api-key", &admin)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // The identity is on the request's span, so on every line logged while serving it.
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("answered")
            && l.contains("identity=key:ops-team")
            && l.contains("path=/v1/models/{model}/traffic")
            && l.contains("status=200")),
        "{log}"
    );
    // A gRPC call is logged the same way, in a span naming its identity.
    let grpc = server.grpc.clone().expect("gRPC listener announced");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let method = "/inference.GRPCInferenceService/ModelReady";
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        grpc_call(channel, method, Some(&admin), None).await
    });
    drop(rt); // and with it the client's connection
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let logged = |l: &str| {
        l.contains("answered")
            && l.contains("identity=key:ops-team")
            && l.contains(&format!("path={method}"))
            && l.contains("grpc_status=")
    };
    while !server.log().lines().any(logged) {
        assert!(std::time::Instant::now() < deadline, "{}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let id = admin.split('_').nth(1).unwrap().to_string();
    let keys_file = data.join("keys.toml");
    let list = |file: &std::path::Path| {
        let (ok, stdout, e) = quiver(&["keys", "list", "--keys-file", file.to_str().unwrap()]);
        assert!(ok, "{e}");
        stdout
    };
    let listed = list(&keys_file);
    assert!(
        listed.contains(&id) && listed.contains("ops-team"),
        "{listed}"
    );
    assert!(
        !listed.contains(&admin),
        "the list never shows a key: {listed}"
    );
    let (ok, _, e) = quiver(&[
        "keys",
        "revoke",
        &id,
        "--keys-file",
        data.join("keys.toml").to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    assert!(list(&keys_file).contains("revoked"), "{}", list(&keys_file));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = send(&server, "GET", "/v1/models/m", None, Some(&admin));
        if status == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked key still works"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let audit = data.join("audit.log");
    let trail = std::fs::read_to_string(&audit).unwrap();
    for needle in [
        "\"action\":\"traffic\"",
        "\"actor\":\"key:ops-team\"",
        "\"action\":\"key_revoked\"",
        "\"action\":\"denied\"",
    ] {
        assert!(trail.contains(needle), "{needle} in {trail}");
    }
    server.stop();
    let (ok, stdout, _) = quiver(&["audit", "verify", audit.to_str().unwrap()]);
    assert!(ok && stdout.contains("intact"), "{stdout}");
    // An edited entry, then a deleted one: each is caught.
    std::fs::write(
        &audit,
        trail.replacen("\"outcome\":\"ok\"", "\"outcome\":\"no\"", 1),
    )
    .unwrap();
    let (ok, stdout, _) = quiver(&["audit", "verify", audit.to_str().unwrap()]);
    assert!(
        !ok && stdout.contains("TAMPERED") && stdout.contains("edited"),
        "{stdout}"
    );
    let lines: Vec<&str> = trail.lines().collect();
    let without_first: String = lines[1..].iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&audit, without_first).unwrap();
    let (ok, stdout, _) = quiver(&["audit", "verify", audit.to_str().unwrap()]);
    assert!(!ok && stdout.contains("TAMPERED"), "{stdout}");
}

/// A P-256 key: its signer and its public JWK.
fn jwk(kid: &str) -> (jsonwebtoken::EncodingKey, Value) {
    use base64::Engine;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..])});
    (
        jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
        jwk,
    )
}

fn jwt(k: &jsonwebtoken::EncodingKey, kid: &str, claims: Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims, k).unwrap()
}

#[test]
fn jwts_are_checked_for_time_audience_signature_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (signer, public) = jwk("k1");
    let (forger, _) = jwk("k1");
    let (stranger, _) = jwk("k2");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [public]}).to_string()).unwrap();
    let auth = format!(
        "[auth]\nmode = \"jwt\"\njwks_file = \"{}\"\njwt_audience = \"quiver-test\"",
        jwks.display()
    );
    let server = Server::start(dir.path(), &secured(dir.path(), &auth));
    let t = now_ms() / 1000;
    let claims =
        json!({"sub": "svc", "aud": "quiver-test", "exp": t + 300, "roles": ["reader:txn"]});
    let (status, v) = send(
        &server,
        "GET",
        "/v1/features/txn/u1",
        None,
        Some(&jwt(&signer, "k1", claims.clone())),
    );
    assert_eq!(
        status, 404,
        "a reader may read (the entity does not exist): {v}"
    );
    let (status, v) = send(
        &server,
        "POST",
        "/v1/events",
        Some("[]"),
        Some(&jwt(&signer, "k1", claims.clone())),
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
    let refused = |token: String| {
        let (status, v) = send(&server, "GET", "/v1/features/txn/u1", None, Some(&token));
        assert_eq!(status, 401, "{v}");
        v["error"]["message"].as_str().unwrap().to_string()
    };
    let with = |k: &str, val: Value| {
        let mut c = claims.clone();
        c[k] = val;
        c
    };
    assert_eq!(
        refused(jwt(&signer, "k1", with("exp", json!(t - 3600)))),
        "JWT expired"
    );
    assert_eq!(
        refused(jwt(&signer, "k1", with("nbf", json!(t + 3600)))),
        "JWT not valid yet (nbf)"
    );
    assert_eq!(
        refused(jwt(&signer, "k1", with("aud", json!("another-service")))),
        "JWT for another audience"
    );
    assert_eq!(
        refused(jwt(&forger, "k1", claims.clone())),
        "JWT signature does not verify"
    );
    assert_eq!(
        refused(jwt(&stranger, "k2", claims.clone())),
        "JWT signed by an unknown key"
    );
    assert!(refused("not.a.jwt".into()).contains("JWT"));
}

/// A CA, and certificates it signs.
struct Pki {
    ca: rcgen::Certificate,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.clone().self_signed(&ca_key).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki {
            ca,
            ca_params: params,
            ca_key,
            dir,
        }
    }

    /// A leaf for `sans` (DNS names, IPs or URIs): (cert PEM, key PEM).
    fn leaf(&self, sans: &[&str], client: bool) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        for s in sans {
            params.subject_alt_names.push(if let Ok(ip) = s.parse() {
                rcgen::SanType::IpAddress(ip)
            } else if s.contains("://") {
                rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*s).unwrap())
            } else {
                rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(*s).unwrap())
            });
        }
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A CA (with the server's certificate for localhost and 127.0.0.1 in its directory), a
/// rogue CA, and the data directory.
fn mtls_setup(dir: &Path) -> (Pki, Pki, PathBuf) {
    let pki = Pki::new(dir, "ca");
    let rogue = Pki::new(dir, "rogue");
    let (server_cert, server_key) = pki.leaf(&["localhost", "127.0.0.1"], false);
    std::fs::write(pki.dir.join("server.pem"), &server_cert).unwrap();
    std::fs::write(pki.dir.join("server.key"), &server_key).unwrap();
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    (pki, rogue, data)
}

/// [`mtls_setup`] with a keys file mapping `spiffe://quiver/reader` to `reader:txn`.
fn mtls_reader_setup(dir: &Path) -> (Pki, Pki, PathBuf) {
    let (pki, rogue, data) = mtls_setup(dir);
    std::fs::write(
        data.join("keys.toml"),
        "[[cert]]\nsan = \"spiffe://quiver/reader\"\nroles = [\"reader:txn\"]\n",
    )
    .unwrap();
    (pki, rogue, data)
}

/// `[auth]` in `mode` and `[tls]` with the CA's server certificate, clients of the CA only.
fn mtls_auth(pki: &Pki, mode: &str) -> String {
    format!(
        "[auth]\nmode = \"{mode}\"\n\n[tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nclient_ca = \"{0}/ca.pem\"",
        pki.dir.display()
    )
}

fn https_client(ca: &Pki, identity: Option<&(String, String)>) -> reqwest::blocking::Client {
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.ca.pem().as_bytes()).unwrap())
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

fn peer_certificate(client: &reqwest::blocking::Client, url: &str) -> Vec<u8> {
    let r = client.get(format!("{url}/healthz")).send().unwrap();
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .unwrap()
        .peer_certificate()
        .unwrap()
        .to_vec()
}

/// Over TLS the handshake is bound by `header_read_timeout` too: connections that send nothing
/// or only a ClientHello's record header are closed within it, while HTTPS requests are served.
#[test]
fn a_stalled_tls_handshake_is_closed_within_the_header_timeout() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (pki, _rogue, _) = mtls_reader_setup(dir.path());
    let auth = format!(
        "[server]\nheader_read_timeout = \"1s\"\n\n{}",
        mtls_auth(&pki, "mtls")
    );
    let reader = pki.leaf(&["spiffe://quiver/reader"], true);
    let client = https_client(&pki, Some(&reader));
    let server = Server::start_client(dir.path(), &secured(dir.path(), &auth), client);
    let addr = server.url.trim_start_matches("https://").to_string();
    let opened = std::time::Instant::now();
    let mut stalled: Vec<std::net::TcpStream> = (0..50)
        .map(|i| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            if i % 2 == 1 {
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
            }
            s
        })
        .collect();
    assert_eq!(server.get("/v1/features/txn/u1").0, 404, "served meanwhile");
    // The header timeout (1 s) plus slack for a loaded machine.
    let deadline = opened + Duration::from_secs(5);
    for s in &mut stalled {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue, // an alert before the close
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("a stalled handshake is still open past the timeout: {e}"),
            }
        }
    }
    assert_eq!(server.get("/v1/features/txn/u1").0, 404, "and after");
}

#[test]
fn mtls_admits_only_certificates_of_its_ca_and_a_new_certificate_needs_no_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, rogue, _) = mtls_reader_setup(dir.path());
    let auth = format!("{}\nreload_interval = \"200ms\"", mtls_auth(&pki, "mtls"));
    let reader = pki.leaf(&["spiffe://quiver/reader"], true);
    let stranger = pki.leaf(&["spiffe://quiver/nobody"], true);
    let good = https_client(&pki, Some(&reader));
    let server = Server::start_client(dir.path(), &secured(dir.path(), &auth), good.clone());
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let (status, v) = server.get("/v1/features/txn/u1");
    assert_eq!(status, 404, "a mapped certificate reads: {v}");
    let (status, v) = server.post(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"seq":1}}]"#,
    );
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{v}"
    );
    // A certificate of the CA that the keys file does not map: known to TLS, unknown to Quiver.
    let (status, _) = send_with(
        &https_client(&pki, Some(&stranger)),
        &server.url,
        "/v1/features/txn/u1",
    );
    assert_eq!(status, Some(401));
    // No certificate, or one of another CA: the handshake fails.
    assert_eq!(
        send_with(&https_client(&pki, None), &server.url, "/healthz").0,
        None
    );
    let rogue_id = rogue.leaf(&["spiffe://quiver/reader"], true);
    assert_eq!(
        send_with(
            &https_client(&pki, Some(&rogue_id)),
            &server.url,
            "/healthz"
        )
        .0,
        None
    );
    // Plain HTTP to the TLS port gets nothing it can read.
    let plain = client()
        .get(server.url.replace("https://", "http://") + "/healthz")
        .send();
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));

    // A new server certificate, written over the files: new connections get it.
    let before = peer_certificate(&good, &server.url);
    install_server_certificate(&pki.dir, pki.leaf(&["localhost", "127.0.0.1"], false));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = https_client(&pki, Some(&reader));
        if peer_certificate(&fresh, &server.url) != before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was not picked up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (status, body) of a GET, or `None` when the connection or handshake failed.
fn send_with(client: &reqwest::blocking::Client, url: &str, path: &str) -> (Option<u16>, String) {
    match client.get(format!("{url}{path}")).send() {
        Ok(r) => (Some(r.status().as_u16()), r.text().unwrap_or_default()),
        Err(e) => (None, e.to_string()),
    }
}

/// Writes a leaf's PEMs as `<name>.pem` and `<name>.key` in the CA's directory.
/// Writes a new server certificate and key over `dir/server.{pem,key}` (each renamed into
/// place whole, the key first), as a certificate renewal would.
fn install_server_certificate(dir: &Path, (cert, key): (String, String)) {
    std::fs::write(dir.join("server.key.tmp"), key).unwrap();
    std::fs::write(dir.join("server.pem.tmp"), cert).unwrap();
    std::fs::rename(dir.join("server.key.tmp"), dir.join("server.key")).unwrap();
    std::fs::rename(dir.join("server.pem.tmp"), dir.join("server.pem")).unwrap();
}

fn leaf_files(pki: &Pki, issuer: &Pki, name: &str, sans: &[&str]) -> (String, String) {
    let (cert, key) = issuer.leaf(sans, true);
    let (c, k) = (
        pki.dir.join(format!("{name}.pem")),
        pki.dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c.display().to_string(), k.display().to_string())
}

#[test]
fn tritonclient_grpc_over_mtls_is_admitted_by_certificate_and_grant() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, rogue, data) = mtls_setup(dir.path());
    std::fs::write(
        data.join("keys.toml"),
        "[[cert]]\nsan = \"spiffe://quiver/scorer\"\nroles = [\"predictor:m\"]\n\n\
         [[cert]]\nsan = \"spiffe://quiver/reader\"\nroles = [\"reader:txn\"]\n",
    )
    .unwrap();
    let auth = format!(
        "{}\nreload_interval = \"200ms\"",
        mtls_auth(&pki, "mtls,api_key")
    );
    let token = key(&data, "scorer-key", &["predictor:m"], None);
    let scorer = leaf_files(&pki, &pki, "scorer", &["spiffe://quiver/scorer"]);
    let reader = leaf_files(&pki, &pki, "reader", &["spiffe://quiver/reader"]);
    let stranger = leaf_files(&pki, &pki, "stranger", &["spiffe://quiver/nobody"]);
    let forged = leaf_files(&pki, &rogue, "forged", &["spiffe://quiver/scorer"]);
    let config = format!(
        "[server]\ngrpc_listen = \"127.0.0.1:0\"\n{}",
        secured(dir.path(), &auth)
    );
    // The HTTP helper's client has no certificate, so readiness is probed by certificate.
    let server = Server::start_client(
        dir.path(),
        &config,
        https_client(&pki, Some(&pki.leaf(&["spiffe://quiver/reader"], true))),
    );
    let grpc = server.grpc.clone().expect("gRPC listener");
    let ca = pki.dir.join("ca.pem").display().to_string();
    let call = |case: &str, cert: Option<&(String, String)>, bearer: Option<&str>| {
        let mut args = vec![grpc.as_str(), ca.as_str(), "m", "32", case];
        if let Some((c, k)) = cert {
            args.extend([c.as_str(), k.as_str()]);
        }
        if let Some(b) = bearer {
            args.push(b);
        }
        run_client_script("triton_grpc_secure.py", &args)
    };
    call("ok", Some(&scorer), None);
    call("denied", Some(&reader), None);
    call("unauth", Some(&stranger), None);
    // A certificate the CA did not sign, or none: the handshake is refused.
    call("handshake", Some(&forged), None);
    call("handshake", None, None);
    // Modes combine: a certificate of the CA that maps to nothing, plus an API key.
    call("ok", Some(&stranger), Some(&token));

    // A renewed server certificate, from another CA to tell them apart, written over the
    // files: the gRPC listener serves it without a restart (a client trusting only the new CA
    // is refused before and admitted after).
    let ca2 = Pki::new(dir.path(), "ca2");
    let ca2_pem = ca2.dir.join("ca.pem").display().to_string();
    let with_ca2 = |case: &str| {
        let args = [grpc.as_str(), ca2_pem.as_str(), "m", "32", case];
        run_client_script(
            "triton_grpc_secure.py",
            &[&args[..], &[&scorer.0, &scorer.1]].concat(),
        )
    };
    with_ca2("handshake");
    install_server_certificate(&pki.dir, ca2.leaf(&["localhost", "127.0.0.1"], false));
    std::thread::sleep(Duration::from_millis(1500)); // reload_interval = 200ms
    with_ca2("ok");
}

/// `[kafka] client` reaches librdkafka as given: that is how Kafka's TLS and SASL are set.
/// (The test broker speaks neither, so what is checked is that the properties are librdkafka's
/// own: a misspelt one stops the server at start, named.)
#[test]
fn kafka_client_properties_reach_librdkafka() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "[log]",
        "[kafka]\nbrokers = \"127.0.0.1:1\"\npartitions = 4\n\n\
         [kafka.client]\n\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanisms\" = \"SCRAM-SHA-512\"\n\
         \"ssl.ca.locatoin\" = \"ca.pem\"\n\n[log]\nbackend = \"kafka\"",
    );
    let text = serve_refused(dir.path(), &config);
    assert!(
        text.contains("ssl.ca.locatoin"),
        "the misspelt property is named: {text}"
    );
}

/// `quiver keys … --config`: the keys file is the config's `auth.keys_file` under its data_dir.
#[test]
fn the_keys_cli_finds_the_keys_file_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("quiver.toml");
    std::fs::write(
        &config,
        format!("[server]\ndata_dir = \"{}\"\n{CONFIG}", data.display()),
    )
    .unwrap();
    let (ok, stdout, e) = quiver(&[
        "keys",
        "create",
        "--config",
        config.to_str().unwrap(),
        "--name",
        "payments",
        "--role",
        "producer:txn",
    ]);
    assert!(ok, "{e}");
    let written = std::fs::read_to_string(data.join("keys.toml")).unwrap();
    assert!(written.contains("payments"), "{written}");
    assert!(!written.contains(stdout.trim()), "only the hash is stored");
}
