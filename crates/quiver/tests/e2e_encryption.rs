//! Encryption at rest with the real binary: with `[storage] encryption_key_file`, no byte of an
//! event's values is readable in the log, the snapshots or the idempotency journal (the same
//! run without a key shows them, so the search can fail); recovery after `kill -9` and a key
//! rotation read everything back; `quiver log verify --key-file` opens every record and
//! refuses another key.

mod common;

use std::path::Path;

use common::*;

const MARK: &str = "merchant-7f3a9c-secret";
/// The idempotency key: the journal holds keys and replies (not values).
const IDEM: &str = "idem-5d2e-key";

fn keygen(file: &Path) {
    let (ok, stdout, stderr) = quiver(&["storage", "keygen", file.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("added"), "{stdout}");
}

/// A key file made by `quiver storage keygen` in `dir`, and `CONFIG` sealing with it.
fn encrypted(dir: &Path) -> (std::path::PathBuf, String) {
    let keys = dir.join("storage.keys");
    keygen(&keys);
    let config = format!(
        "[storage]\nencryption_key_file = \"{}\"\n{CONFIG}",
        keys.display()
    );
    (keys, config)
}

/// Ingests 200 events carrying [`MARK`], one batch under an `Idempotency-Key`; waits until a
/// snapshot covers them.
fn fill(server: &Server) -> String {
    let events: Vec<String> = (0..200)
        .map(|i| {
            format!(r#"{{"view":"txn","key":"u{i}","values":{{"merchant":"{MARK}","seq":{i}}}}}"#)
        })
        .collect();
    let (status, body) = server.post("/v1/events", &format!("[{}]", events.join(",")));
    assert_eq!(status, 200, "{body}");
    let keyed = format!(r#"[{{"view":"txn","key":"k","values":{{"merchant":"{MARK}"}}}}]"#);
    let (status, reply) = server.post_with("/v1/events", &keyed, &[("idempotency-key", IDEM)]);
    assert_eq!(status, 200, "{reply}");
    let keys: Vec<String> = (0..200).map(|i| format!("u{i}")).collect();
    wait_seqs(server, &keys, &(0..200).map(Some).collect::<Vec<_>>());
    std::thread::sleep(std::time::Duration::from_millis(2500)); // snapshot_interval = 1s
    assert!(
        std::fs::read_dir(server.data_dir.join("snapshots"))
            .unwrap()
            .count()
            > 0,
        "snapshots were written"
    );
    keyed
}

/// Files under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn nothing_readable_at_rest_and_everything_recovers_across_a_rotation() {
    // The control: without a key, the values are on disk in the clear.
    let plain = tempfile::tempdir().unwrap();
    let server = Server::start(plain.path(), CONFIG);
    fill(&server);
    let data = server.kill9().join("data");
    let seen = files_containing(&data, MARK.as_bytes());
    assert!(seen.iter().any(|f| f.contains("/log/")), "{seen:?}");
    assert!(seen.iter().any(|f| f.contains("snapshots")), "{seen:?}");
    let journal = files_containing(&data, IDEM.as_bytes());
    assert!(
        journal.iter().any(|f| f.ends_with("idempotency.journal")),
        "{journal:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (keys, config) = encrypted(dir.path());
    let server = Server::start(dir.path(), &config);
    let keyed = fill(&server);
    let (_, first_reply) = server.post_with("/v1/events", &keyed, &[("idempotency-key", IDEM)]);
    let dir_path = server.kill9();
    let data = dir_path.join("data");
    assert_eq!(
        files_containing(&data, MARK.as_bytes()),
        Vec::<String>::new()
    );
    assert_eq!(
        files_containing(&data, IDEM.as_bytes()),
        Vec::<String>::new()
    );
    assert!(data.join("idempotency.journal").metadata().unwrap().len() > 0);

    // Recovery from sealed snapshots, log and journal.
    let server = Server::restart(dir.path());
    let (_, row) = server.get("/v1/features/txn/u7");
    assert_eq!(row["features"]["merchant"]["value"], MARK, "{row}");
    let (status, replay) = server.post_with("/v1/events", &keyed, &[("idempotency-key", IDEM)]);
    assert_eq!(
        (status, &replay),
        (200, &first_reply),
        "the journal's reply"
    );

    // Rotation: a second key seals what comes next; the first still opens the rest.
    keygen(&keys);
    server.stop();
    let server = Server::restart(dir.path());
    let (status, body) = server.post(
        "/v1/events",
        &format!(r#"[{{"view":"txn","key":"after","values":{{"merchant":"{MARK}","seq":1}}}}]"#),
    );
    assert_eq!(status, 200, "{body}");
    wait_seqs(&server, &["after".to_string()], &[Some(1)]);
    server.kill9();
    let server = Server::restart(dir.path());
    for key in ["u0", "u199", "after"] {
        let (_, row) = server.get(&format!("/v1/features/txn/{key}"));
        assert_eq!(row["features"]["merchant"]["value"], MARK, "{key}: {row}");
    }
    server.stop();
    assert_eq!(
        files_containing(&data, MARK.as_bytes()),
        Vec::<String>::new()
    );

    // Offline: every record opens with the key file; another key is refused.
    let log = data.join("log");
    let (ok, stdout, stderr) = quiver(&[
        "log",
        "verify",
        log.to_str().unwrap(),
        "--key-file",
        keys.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("encrypted: 202 records (each opened"),
        "{stdout}"
    );
    let other = dir.path().join("other.keys");
    keygen(&other);
    let (ok, stdout, _) = quiver(&[
        "log",
        "verify",
        log.to_str().unwrap(),
        "--key-file",
        other.to_str().unwrap(),
    ]);
    assert!(!ok, "another key must not open the records: {stdout}");
    assert!(stdout.contains("does not open"), "{stdout}");
}

#[test]
fn a_node_without_the_key_refuses_sealed_data_instead_of_serving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = encrypted(dir.path());
    let server = Server::start(dir.path(), &config);
    fill(&server);
    server.stop();
    // The same data directory, the key file forgotten in the config.
    let text = serve_refused(dir.path(), CONFIG);
    assert!(text.contains("encryption_key_file"), "{text}");
}

/// Ingests one event for `key` carrying [`MARK`] and waits until it is applied.
fn one(server: &Server, key: &str) {
    let body =
        format!(r#"[{{"view":"txn","key":"{key}","values":{{"merchant":"{MARK}","seq":1}}}}]"#);
    let (status, reply) = server.post("/v1/events", &body);
    assert_eq!(status, 200, "{reply}");
    wait_seqs(server, &[key.to_string()], &[Some(1)]);
}

/// `quiver log verify <log> --key-file <keys>`: whether it passed, and what it printed.
fn verify_with(log: &Path, keys: &Path) -> (bool, String) {
    let args = [
        "log",
        "verify",
        log.to_str().unwrap(),
        "--key-file",
        keys.to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = quiver(&args);
    (ok, format!("{stdout}{stderr}"))
}

/// README's "Rotation" paragraph: a data directory that was plain is sealed from the first
/// start with a key on (its plain records stay readable); after a rotation, `quiver log verify`
/// with only the new key tells that records still need the old one, and with every key all open.
#[test]
fn a_plain_directory_is_sealed_from_its_first_keyed_start_and_verify_names_old_key_needs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), CONFIG);
    one(&server, "k-plain-91c");
    server.stop();
    let (keys, config) = encrypted(dir.path());
    let server = Server::start(dir.path(), &config);
    one(&server, "k-sealed-37d");
    server.stop();
    let log = dir.path().join("data").join("log");
    assert!(
        !files_containing(&log, b"k-plain-91c").is_empty(),
        "the plain record stays"
    );
    assert!(
        files_containing(&log, b"k-sealed-37d").is_empty(),
        "the new one is sealed"
    );

    keygen(&keys); // rotation: the second key seals from the next start
    let server = Server::restart(dir.path());
    one(&server, "k-rotated-52e");
    for key in ["k-plain-91c", "k-sealed-37d", "k-rotated-52e"] {
        let (_, row) = server.get(&format!("/v1/features/txn/{key}"));
        assert_eq!(row["features"]["merchant"]["value"], MARK, "{key}: {row}");
    }
    server.stop();

    let (ok, out) = verify_with(&log, &keys);
    assert!(ok, "every key: everything opens: {out}");
    let newest = dir.path().join("newest.keys");
    let text = std::fs::read_to_string(&keys).unwrap();
    std::fs::write(&newest, format!("{}\n", text.lines().last().unwrap())).unwrap();
    let (ok, out) = verify_with(&log, &newest);
    assert!(
        !ok && out.contains("does not open"),
        "a record still needs the old key: {out}"
    );
}
