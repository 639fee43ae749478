//! Hostile clients against the real binary: slowloris (thousands of half-sent headers and
//! silent connections), a connection flood over the cap, an oversized body announced by its
//! Content-Length, requests past their deadline, and load shed by priority (a bronze flood is
//! refused while gold is served). No timing is asserted beyond "closed within the timeout plus
//! slack"; latency under a flood is measured by `quiver bench priority` (BENCHMARKS.md).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// `CONFIG` with `[server]` bounds as given (and whatever else `extra` holds).
fn bounded(server: &str, extra: &str) -> String {
    format!("[server]\n{server}\n\n{extra}\n{CONFIG}")
}

fn addr(server: &Server) -> String {
    server.url.trim_start_matches("http://").to_string()
}

/// Whether the server has closed `s` (EOF or reset), reading without blocking. Bytes the server
/// sent before closing (an error response) are drained.
fn closed(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Waits until every stream in `open` is closed by the server or `limit` passes; returns how
/// many are still open.
fn wait_all_closed(open: &mut Vec<TcpStream>, limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        open.retain_mut(|s| !closed(s));
        if open.is_empty() || Instant::now() >= deadline {
            return open.len();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn connect(server: &Server) -> TcpStream {
    let s = TcpStream::connect(addr(server)).unwrap();
    s.set_nonblocking(true).unwrap();
    s
}

#[test]
fn slowloris_connections_are_closed_within_the_header_timeout_while_requests_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &bounded("header_read_timeout = \"1s\"\nidle_timeout = \"2s\"", ""),
    );
    // The review's attack: 3,000 connections that each send half a request header, plus
    // connections that send nothing at all.
    let started = Instant::now();
    let mut half: Vec<TcpStream> = (0..3000)
        .map(|_| {
            let mut s = connect(&server);
            s.write_all(b"GET /v1/features/txn/u1 HTTP/1.1\r\nHost: quiver\r\nX-Slow: ")
                .unwrap();
            s
        })
        .collect();
    let mut silent: Vec<TcpStream> = (0..200).map(|_| connect(&server)).collect();
    let opened = started.elapsed();

    // Normal requests are served all the while.
    for _ in 0..20 {
        let (status, _) = server.get("/healthz");
        assert_eq!(status, 200);
        let (status, body) = server.post(
            "/v1/events",
            r#"[{"view":"txn","key":"u1","values":{"amount":1.0}}]"#,
        );
        assert_eq!(status, 200, "{body}");
    }

    // header_read_timeout (1 s): a half head from its first byte, a silent connection (its
    // first head never comes) from the accept.
    let slack = Duration::from_secs(4);
    let still_half = wait_all_closed(&mut half, opened + Duration::from_secs(1) + slack);
    assert_eq!(still_half, 0, "half-header connections still open");
    let still_silent = wait_all_closed(&mut silent, Duration::from_secs(1) + slack);
    assert_eq!(still_silent, 0, "silent connections still open");
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200, "the server serves after the attack");
}

/// A keep-alive connection waiting for its next request is bound by `idle_timeout`, not by
/// `header_read_timeout` (hyper's own timer would close it after the header timeout: every
/// pooled client connection idle for 5 s, where the config says 60).
#[test]
fn keep_alive_connections_live_until_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &bounded("header_read_timeout = \"1s\"\nidle_timeout = \"4s\"", ""),
    );
    let mut s = TcpStream::connect(addr(&server)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let ask = |s: &mut TcpStream| -> String {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: quiver\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(ask(&mut s).starts_with("HTTP/1.1 200"));
    // Idle for twice the header timeout, well within the idle timeout: still served.
    std::thread::sleep(Duration::from_millis(2_200));
    let again = ask(&mut s);
    assert!(again.starts_with("HTTP/1.1 200"), "{again:?}");
    // Idle past the idle timeout: closed by the server (a read sees the end of the stream).
    std::thread::sleep(Duration::from_secs(6));
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed after idle_timeout");
}

#[test]
fn connections_over_the_cap_are_closed_at_once_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &bounded("connections_max = 40\nidle_timeout = \"30s\"", ""),
    );
    // Keep-alive connections from the test's own client may hold slots: hold the rest.
    let mut held: Vec<TcpStream> = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..60 {
        let s = connect(&server);
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    for s in held.iter_mut() {
        if closed(s) {
            refused.push(());
        }
    }
    assert!(
        refused.len() >= 20,
        "at least the 20 connections over the cap are closed at once, {} were",
        refused.len()
    );
    assert!(refused.len() < 60, "connections under the cap stay open");
    drop(held);
    // Slots come back once connections close; the count of refusals is a metric.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused_metric = loop {
        if let Ok(r) = server
            .http
            .get(format!("{}/metrics", server.url))
            .send()
            .and_then(|r| r.text())
        {
            break r;
        }
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(100));
    };
    let counted = refused_metric
        .lines()
        .find(|l| l.starts_with("quiver_connections_refused_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(counted >= 20.0, "refusals counted: {counted}");
}

#[test]
fn an_oversized_body_is_refused_by_its_content_length_before_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    let mut s = TcpStream::connect(addr(&server)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // A gigabyte is announced and not one byte of it sent: the answer cannot wait for it.
    s.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: quiver\r\nContent-Type: application/json\r\n\
          Content-Length: 1073741824\r\n\r\n",
    )
    .unwrap();
    let mut head = [0u8; 512];
    let n = s.read(&mut head).expect("an answer before the body");
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("BODY_TOO_LARGE"), "{text}");
}

#[test]
fn a_request_past_its_deadline_is_dropped_with_503() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &bounded(
            "read_after_wait_ms_max = 20000\nrequest_timeout_max = \"2s\"",
            "",
        ),
    );
    // A token far past the log's end makes the read wait; the deadline ends the wait.
    let far = [("quiver-read-after", "0:1000000000")];
    for (timeout, bound) in [
        (Some("300"), Duration::from_secs(2)),
        (None, Duration::from_secs(5)),
    ] {
        let mut headers = far.to_vec();
        if let Some(t) = timeout {
            headers.push(("quiver-timeout-ms", t));
        }
        let started = Instant::now();
        let (status, body) = server.get_with("/v1/features/txn/u1", &headers);
        let took = started.elapsed();
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "DEADLINE_EXCEEDED", "{body}");
        assert!(
            took < bound,
            "answered after {took:?} (timeout {timeout:?})"
        );
    }
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200);
}

/// A gRPC call's deadline (`grpc-timeout`) bounds its wait for an in-flight slot as well as its
/// work: with the node's one slot held, a call with a 300 ms deadline is answered
/// DEADLINE_EXCEEDED long before the slot comes free, and the node serves on.
#[test]
fn a_grpc_call_past_its_deadline_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let config = bounded(
        "inflight_max = 1\nread_after_wait_ms_max = 20000\nrequest_timeout_max = \"3s\"",
        "",
    );
    let server = Server::start_args(dir.path(), &config, &["--grpc-listen", "127.0.0.1:0"]);
    let grpc = server.grpc.clone().expect("gRPC listener announced");
    let url = server.url.clone();
    // Holds the one slot for 3 s: a read waiting for a token far past the log's end.
    let hold = std::thread::spawn(move || {
        client()
            .get(format!("{url}/v1/features/txn/u1"))
            .header("quiver-read-after", "0:1000000000")
            .send()
            .unwrap()
            .status()
            .as_u16()
    });
    std::thread::sleep(Duration::from_millis(300));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (code, took) = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let path = "/inference.GRPCInferenceService/ServerMetadata";
        let started = Instant::now();
        let code = grpc_call(channel, path, None, Some(Duration::from_millis(300))).await;
        (code, started.elapsed())
    });
    assert!(
        matches!(code, tonic::Code::DeadlineExceeded | tonic::Code::Cancelled),
        "{code:?}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}"
    );
    assert_eq!(
        hold.join().unwrap(),
        503,
        "the hold ended by its own deadline"
    );
    let (status, _) = server.get("/healthz");
    assert_eq!(status, 200);
}

/// A gRPC client that keeps its connection open and never answers the server's GOAWAY (here:
/// one whose runtime is no longer driven) cannot hold a SIGTERM past the drain bound (10 s):
/// the server closes the connection and exits cleanly.
#[test]
fn a_grpc_client_holding_its_connection_cannot_hold_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_args(
        dir.path(),
        &bounded("", ""),
        &["--grpc-listen", "127.0.0.1:0"],
    );
    let grpc = server.grpc.clone().expect("gRPC listener announced");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let path = "/inference.GRPCInferenceService/ServerLive";
        assert_eq!(
            grpc_call(channel.clone(), path, None, None).await,
            tonic::Code::Ok
        );
        channel
    });
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "a held gRPC connection holds the shutdown"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "{exit:?}");
    drop((channel, rt));
}

/// Keys: `gold` and `bronze` readers, a `tin` reader with a 2/s bucket, a gold producer.
fn tiered(dir: &Path) -> (String, [String; 4]) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let keys = [
        key(&data, "gold-reader", &["reader"], Some("gold")),
        key(&data, "bronze-reader", &["reader"], Some("bronze")),
        key(&data, "tin-reader", &["reader"], Some("tin")),
        key(&data, "producer", &["producer"], Some("gold")),
    ];
    let config = bounded(
        "inflight_max = 4\nread_after_wait_ms_max = 1500",
        "[auth]\nmode = \"api_key\"\npublic = [\"/healthz\", \"/readyz\", \"/metrics\"]\n\n\
         [[rate_tier]]\nname = \"gold\"\npriority = 0\nrate_per_s = 100000\nburst = 100000\n\n\
         [[rate_tier]]\nname = \"bronze\"\npriority = 1\nrate_per_s = 100000\nburst = 100000\n\n\
         [[rate_tier]]\nname = \"tin\"\npriority = 1\nrate_per_s = 2\nburst = 2\n",
    );
    (config, keys)
}

/// Ingests `txn/u1` with `amount` 1.0 as `producer`; the reply's token.
fn ingest_u1(server: &Server, producer: &str) -> String {
    let (status, body) = server.post_with(
        "/v1/events",
        r#"[{"view":"txn","key":"u1","values":{"amount":1.0}}]"#,
        &[("authorization", &format!("Bearer {producer}"))],
    );
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_string()
}

/// The scheduling policy of each of `pid`'s threads whose name starts with `prefix`, from
/// `/proc` (0 = `SCHED_OTHER`, 5 = `SCHED_IDLE`).
fn thread_policies(pid: u32, prefix: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let sched = std::fs::read_to_string(task.join("sched")).unwrap();
        let policy = sched
            .lines()
            .find(|l| l.starts_with("policy"))
            .and_then(|l| l.rsplit(' ').next()?.trim().parse().ok())
            .expect("a policy line");
        out.push(policy);
    }
    out
}

/// A gRPC `Push` of one event for `key` with `bearer`'s credentials.
fn grpc_push(grpc: &str, bearer: &str, key: &str) -> Result<(), tonic::Status> {
    use quiver_server::ingest_proto::{ingest_client::IngestClient, PushRequest};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client = IngestClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let msg = PushRequest {
            events: format!(r#"{{"view":"txn","key":"{key}","values":{{"amount":2.0}}}}"#)
                .into_bytes(),
            ack: String::new(),
            idempotency_key: String::new(),
        };
        let mut req = tonic::Request::new(tokio_stream::iter(vec![msg]));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {bearer}").parse().unwrap());
        client.push(req).await.map(|_| ())
    })
}

/// While a better tier is active, requests of a lower tier run on threads the kernel
/// schedules at idle priority (a gold request's thread preempts them at once), over HTTP and
/// gRPC alike; the best tier's never move, and with nothing better active nothing is lowered.
#[test]
fn lower_tiers_run_on_idle_priority_threads_while_a_better_tier_is_active() {
    let dir = tempfile::tempdir().unwrap();
    let (config, [gold, bronze, _tin, producer]) = tiered(dir.path());
    let data = dir.path().join("data");
    let bronze_producer = key(&data, "bronze-producer", &["producer"], Some("bronze"));
    let server = Server::start_args(dir.path(), &config, &["--grpc-listen", "127.0.0.1:0"]);
    let grpc = server.grpc.clone().expect("gRPC listener announced");
    let pid = server.child.id();
    let lower = thread_policies(pid, "quiver-lower");
    assert!(!lower.is_empty(), "the lower-priority pool exists");
    assert!(lower.iter().all(|&p| p == 5), "SCHED_IDLE: {lower:?}");
    let main = thread_policies(pid, "tokio-");
    assert!(!main.is_empty() && main.iter().all(|&p| p == 0), "{main:?}");

    let auth = |k: &str| format!("Bearer {k}");
    let token = ingest_u1(&server, &producer);
    let read = |k: &str| {
        let headers = [
            ("authorization", auth(k)),
            ("quiver-read-after", token.clone()),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(h, v)| (*h, v.as_str())).collect();
        let (status, body) = server.get_with("/v1/features/txn/u1", &headers);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["features"]["amount"]["value"], 1.0, "{body}");
    };
    let lowered = || server.metric("quiver_requests_lowered_total");
    read(&gold);
    assert_eq!(lowered(), 0.0, "gold is never lowered");
    // Nothing better started a request in the last second: bronze runs as before.
    std::thread::sleep(Duration::from_millis(1200));
    read(&bronze);
    assert_eq!(lowered(), 0.0, "nothing better to yield to");
    for n in 1..=3 {
        read(&gold);
        read(&bronze);
        assert_eq!(lowered(), n as f64, "bronze right after gold is lowered");
    }
    grpc_push(&grpc, &producer, "g1").unwrap();
    assert_eq!(lowered(), 3.0, "gold stays");
    grpc_push(&grpc, &bronze_producer, "b1").unwrap();
    assert_eq!(lowered(), 4.0, "a gRPC call is lowered as HTTP is");
}

#[test]
fn a_bronze_flood_is_shed_while_gold_is_served_and_buckets_answer_429() {
    let dir = tempfile::tempdir().unwrap();
    let (config, [gold, bronze, tin, producer]) = tiered(dir.path());
    let server = Server::start(dir.path(), &config);
    let auth = |k: &str| format!("Bearer {k}");
    let token = ingest_u1(&server, &producer);
    let token = token.as_str();
    let (status, body) = server.get_with(
        "/v1/features/txn/u1",
        &[
            ("authorization", &auth(&gold)),
            ("quiver-read-after", token),
        ],
    );
    assert_eq!(status, 200, "{body}");

    // Bronze: 20 clients whose reads each hold an in-flight slot for 1.5 s (a token past the
    // log's end). Bronze's share of the 4 slots is 2 and its queue 8: the rest are refused at
    // once.
    let stop = Arc::new(AtomicBool::new(false));
    let (waited, shed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let flood: Vec<_> = (0..20)
        .map(|_| {
            let (url, key, stop) = (server.url.clone(), auth(&bronze), stop.clone());
            let (waited, shed) = (waited.clone(), shed.clone());
            std::thread::spawn(move || {
                let http = client();
                while !stop.load(Ordering::Relaxed) {
                    let r = http
                        .get(format!("{url}/v1/features/txn/u1"))
                        .header("authorization", &key)
                        .header("quiver-read-after", "0:1000000000")
                        .send()
                        .unwrap();
                    let body: serde_json::Value = r.json().unwrap();
                    match body["error"]["code"].as_str() {
                        Some("SATURATED") => shed.fetch_add(1, Ordering::Relaxed),
                        Some("READ_AFTER_TIMEOUT") => waited.fetch_add(1, Ordering::Relaxed),
                        other => panic!("bronze got {other:?}: {body}"),
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // Gold is served every time during the flood: its share is all 4 slots.
    let gold_reads = 200;
    for _ in 0..gold_reads {
        let (status, body) =
            server.get_with("/v1/features/txn/u1", &[("authorization", &auth(&gold))]);
        assert_eq!(status, 200, "gold refused during a bronze flood: {body}");
    }
    std::thread::sleep(Duration::from_millis(1600));
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.join().unwrap();
    }
    let (waited, shed) = (waited.load(Ordering::Relaxed), shed.load(Ordering::Relaxed));
    assert!(shed > 0, "bronze was shed");
    assert!(waited >= 2, "bronze's share ran ({waited} waits)");
    assert!(
        server.metric_with("quiver_requests_refused_total", "status=\"503\"") >= shed as f64,
        "each shed request is counted"
    );

    // A bucket: 2 requests/s with a burst of 2 → the third at once is 429, with its headers.
    let mut limited = None;
    for _ in 0..5 {
        let r = server
            .http
            .get(format!("{}/v1/features/txn/u1", server.url))
            .header("authorization", auth(&tin))
            .send()
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
        // An answer that passes says what is left of the bucket.
        assert_eq!(r.headers().get("ratelimit-limit").unwrap(), "2");
        assert!(r.headers().get("ratelimit-remaining").is_some());
    }
    let r = limited.expect("the tin tier's bucket ran out");
    let h = r.headers();
    assert!(h.get("retry-after").is_some());
    assert_eq!(h.get("ratelimit-limit").unwrap(), "2");
    assert_eq!(h.get("ratelimit-remaining").unwrap(), "0");
    assert!(h.get("ratelimit-reset").is_some());
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["code"], "RATE_LIMITED");
}
