//! `quiver.v1.Ingest/Push` end to end: a tonic client streams batches into the real binary.
//! Everything streamed is acknowledged, counted and readable with the reply's token; a bad
//! message ends the stream with INVALID_ARGUMENT naming it, after the messages before it are
//! acknowledged (and only those are applied); a message retried with its idempotency key is
//! applied once.

mod common;

use common::*;
use quiver_server::ingest_proto::ingest_client::IngestClient;
use quiver_server::ingest_proto::PushRequest;

/// `CONFIG` with a count aggregation, which shows an event applied twice.
fn config() -> String {
    CONFIG.replace(
        "  { name = \"seq\", type = \"i64\" },\n]",
        "  { name = \"seq\", type = \"i64\" },\n]\nallowed_lateness = \"10m\"\naggregations = [\n  { name = \"amount_count_1h\", of = \"amount\", fn = \"count\", window = \"1h\" },\n]",
    )
}

/// One message of `n` events for keys `{prefix}0..n`, seq = `seq`.
fn message(prefix: &str, n: usize, seq: i64, key: &str) -> PushRequest {
    let lines: Vec<String> = (0..n)
        .map(|i| event(&format!("{prefix}{i}"), seq, None))
        .collect();
    PushRequest {
        events: lines.join("\n").into_bytes(),
        ack: String::new(),
        idempotency_key: key.to_string(),
    }
}

/// The binary with its gRPC listener, that listener's address, and a runtime for the client.
fn start() -> (tempfile::TempDir, Server, String, tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_args(dir.path(), &config(), &["--grpc-listen", "127.0.0.1:0"]);
    let grpc = server.grpc.clone().expect("gRPC listener announced");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (dir, server, grpc, rt)
}

async fn push(
    grpc: &str,
    msgs: Vec<PushRequest>,
) -> Result<quiver_server::ingest_proto::PushResponse, tonic::Status> {
    let mut client = IngestClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    client
        .push(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

fn count_of(server: &Server, key: &str, token: &str) -> serde_json::Value {
    let (status, v) = server.get_with(
        &format!("/v1/features/txn/{key}"),
        &[("Quiver-Read-After", token)],
    );
    assert_eq!(status, 200, "{v}");
    v["features"]["amount_count_1h"]["value"].clone()
}

#[test]
fn a_stream_of_batches_is_acknowledged_and_readable_with_its_token() {
    let (_dir, server, grpc, rt) = start();
    // 40 messages × 50 events over 50 keys, more than the in-flight bound: the stream is
    // admitted message by message while earlier acks are awaited.
    let msgs: Vec<PushRequest> = (0..40).map(|s| message("k", 50, s, "")).collect();
    let reply = rt.block_on(push(&grpc, msgs)).expect("the push succeeds");
    assert_eq!(reply.accepted, 2000);
    assert_eq!(reply.messages, 40);
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let (status, v) = server.post_with(
        "/v1/features",
        &serde_json::json!({"features": ["txn:seq", "txn:amount_count_1h"], "entities": {"user_id": keys}})
            .to_string(),
        &[("Quiver-Read-After", &reply.token)],
    );
    assert_eq!(status, 200, "{v}");
    for i in 0..50 {
        assert_eq!(
            v["results"][1]["values"][i], 39,
            "the last message wins: {v}"
        );
        assert_eq!(
            v["results"][2]["values"][i], 40,
            "each event applied once: {v}"
        );
    }
    assert_eq!(server.metric("quiver_events_ingested_total"), 2000.0);
}

#[test]
fn a_bad_message_ends_the_stream_after_acknowledging_the_ones_before_it() {
    let (_dir, server, grpc, rt) = start();
    let mut bad = message("b", 3, 7, "");
    bad.events = br#"{"view":"txn","key":"b9","values":{"amount":"lots"}}"#.to_vec();
    let msgs = vec![
        message("a", 5, 1, ""),
        message("a", 5, 2, ""),
        bad,
        message("c", 5, 3, ""),
    ];
    let err = rt
        .block_on(push(&grpc, msgs))
        .expect_err("message 2 is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("message 2: "), "{err:?}");
    assert!(err.message().contains("amount"), "names the field: {err:?}");
    let accepted = err
        .metadata()
        .get("quiver-accepted")
        .expect("accepted trailer");
    assert_eq!(accepted.to_str().unwrap(), "10");
    let token = err.metadata().get("quiver-token").expect("token trailer");
    let token = token.to_str().unwrap().to_string();
    assert_eq!(
        count_of(&server, "a0", &token),
        2,
        "both messages before it"
    );
    let (status, _) = server.get("/v1/features/txn/c0");
    assert_eq!(status, 404, "nothing after the refused message is read");
    let (status, _) = server.get("/v1/features/txn/b9");
    assert_eq!(status, 404, "the refused message is not applied");

    // A bad ack level is refused the same way, before anything is appended.
    let mut bad_ack = message("d", 1, 1, "");
    bad_ack.ack = "sometimes".into();
    let err = rt.block_on(push(&grpc, vec![bad_ack])).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("ack must be"), "{err:?}");
}

#[test]
fn a_message_retried_with_its_idempotency_key_is_applied_once() {
    let (_dir, server, grpc, rt) = start();
    let first = rt
        .block_on(push(&grpc, vec![message("r", 4, 1, "batch-1")]))
        .unwrap();
    // The producer did not see the reply and sends the message again, on a new stream.
    let again = rt
        .block_on(push(
            &grpc,
            vec![message("r", 4, 1, "batch-1"), message("r", 4, 2, "batch-2")],
        ))
        .unwrap();
    assert_eq!(first.accepted, 4);
    assert_eq!(
        again.accepted, 8,
        "acknowledged again, as the HTTP retry is"
    );
    assert_eq!(
        count_of(&server, "r0", &again.token),
        2,
        "batch-1 applied once, batch-2 once"
    );
}
