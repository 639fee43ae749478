//! A Kafka-protocol broker for tests: `noida-db` (pinned in `scripts/requirements-clients.txt`),
//! one binary that speaks Kafka's protocol, started on a free loopback port with a data
//! directory of its own. librdkafka 2.x works against it (admin, idempotent produce, manual
//! assignment, watermarks, headers). It keeps its data across a graceful stop (SIGTERM) but not
//! across `kill -9`, and it forgets idempotent producers' state on restart (a real Kafka
//! keeps it): Quiver's producer rebuilds itself after the fatal error that causes.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct KafkaBroker {
    child: Option<Child>,
    bin: PathBuf,
    data_dir: PathBuf,
    pub port: u16,
}

impl KafkaBroker {
    /// Starts a broker with its data in `dir` and waits until it accepts connections.
    pub fn start(dir: &Path) -> KafkaBroker {
        let mut b = KafkaBroker {
            child: None,
            bin: broker_binary(),
            data_dir: dir.to_path_buf(),
            port: crate::free_port(),
        };
        b.launch();
        b
    }

    /// `host:port`, for `kafka.brokers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        std::fs::create_dir_all(&self.data_dir).unwrap();
        let log = std::fs::File::create(self.data_dir.join("broker.log")).unwrap();
        let child = Command::new(&self.bin)
            .args(["start", "--only", "kafka", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--kafka-port", &self.port.to_string()])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the test Kafka broker (noida-db)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the test Kafka broker did not listen on {} (see {}/broker.log)",
                self.port,
                self.data_dir.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the broker gracefully (SIGTERM: it saves its data) and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Starts it again after [`stop`](Self::stop).
    pub fn start_again(&mut self) {
        self.launch();
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The broker binary inside the pinned venv's `noida_db` package (run directly, not through
/// its Python wrapper, so that signals reach it). `QUIVER_TEST_KAFKA_BROKER` names it instead.
pub fn broker_binary() -> PathBuf {
    if let Ok(bin) = std::env::var("QUIVER_TEST_KAFKA_BROKER") {
        return PathBuf::from(bin);
    }
    let python = crate::client_python();
    let out = Command::new(&python)
        .args([
            "-c",
            "import noida_db, os; print(os.path.join(os.path.dirname(noida_db.__file__), 'noida-db'))",
        ])
        .output()
        .expect("ask the venv where noida-db is");
    assert!(
        out.status.success(),
        "noida-db is not in the test venv ({}): {}",
        python.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
