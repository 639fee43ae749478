//! `quiver demo` runs the bundled fraud example end to end: events from three simulated
//! services are ingested, predictions answered, freshness measured; Ctrl-C stops it cleanly
//! with a summary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::quiver;

#[test]
fn demo_ingests_predicts_and_measures_freshness() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo.json");
    let (ok, stdout, stderr) = quiver(&[
        "demo",
        "--duration",
        "3",
        "--rate",
        "5000",
        "--predict-rate",
        "200",
        "--users",
        "1000",
        "--json",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    // Not a terminal: one line per second, then the summary.
    assert!(stdout.contains("t=1s events/s="), "{stdout}");
    assert!(stdout.contains("summary after"), "{stdout}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert!(s["events"].as_u64().unwrap() > 0, "{s}");
    assert!(s["predicts"].as_u64().unwrap() > 0, "{s}");
    assert!(s["freshness_samples"].as_u64().unwrap() > 0, "{s}");
    assert!(s["freshness_p99_us"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(s["event_errors"].as_u64(), Some(0), "{s}");
    assert_eq!(s["predict_errors"].as_u64(), Some(0), "{s}");
}

#[test]
fn ctrl_c_stops_the_demo_with_a_summary() {
    let mut child = Command::new(common::BIN)
        .args([
            "demo",
            "--rate",
            "2000",
            "--predict-rate",
            "100",
            "--users",
            "500",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    // Interrupt once the live view is up (the Ctrl-C handler is installed by then).
    for line in lines.by_ref() {
        let line = line.unwrap();
        let live = line.starts_with("t=");
        seen.push(line);
        if live {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.starts_with("t=")), "{seen:?}");
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let started = Instant::now();
    seen.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let stdout = seen.join("\n");
    assert!(status.success(), "{status:?}\n{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?} to stop",
        started.elapsed()
    );
    assert!(stdout.contains("summary after"), "{stdout}");
    let ingested = seen
        .iter()
        .find_map(|l| l.trim().strip_prefix("events ingested"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(ingested.is_some_and(|n| n > 0), "{stdout}");
}
