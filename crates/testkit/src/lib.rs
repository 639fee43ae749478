//! Real peers for Quiver's tests (never a dependency of the product): the venv with the
//! pinned Python clients (`scripts/python-env.sh`) and a Kafka-protocol broker on loopback.

mod kafka;

pub use kafka::{broker_binary as kafka_broker_binary, KafkaBroker};

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's python with the real clients (Feast SDK, tritonclient, the test Kafka broker),
/// created on first use by `scripts/python-env.sh` from the pinned
/// `scripts/requirements-clients.txt` (CI creates it before the tests;
/// `QUIVER_TEST_PYTHON` names another interpreter that has them).
pub fn client_python() -> PathBuf {
    if let Ok(python) = std::env::var("QUIVER_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed (needs python3 with venv and the package index):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A free TCP port on 127.0.0.1 (bound, then released: good enough for a test's peer).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}
