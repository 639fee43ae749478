//! The audit trail: admin actions, key changes, rollout decisions and authorization failures,
//! appended to a tamper-evident log.
//!
//! # Design constraints
//! - One JSON line per entry: `seq`, `at`, `actor`, `action`, `target`, `outcome`, `detail`,
//!   `prev` (the previous entry's hash) and `hash` (SHA-256 of the entry's fields before it).
//!   An edited entry fails its own hash; a deleted one breaks the next entry's `prev`.
//! - The newest entry's `seq` and `hash` are also kept in `<file>.head` (replaced atomically
//!   after each append), so a deleted or truncated tail is caught too.
//! - Every append is written and fsynced before the action it records is answered.
//! - Bounded: authorization failures (which a hostile client controls) are recorded at most
//!   `FAILURES_PER_SECOND_MAX` a second; the rest are counted in
//!   `quiver_audit_suppressed_total` and summarized in the next entry of that kind.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const FAILURES_PER_SECOND_MAX: u32 = 20;
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One entry, in the order its fields are hashed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub seq: u64,
    pub at: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub detail: String,
    pub prev: String,
    #[serde(default)]
    pub hash: String,
}

impl Entry {
    fn digest(&self) -> String {
        let mut unhashed = self.clone();
        unhashed.hash = String::new();
        let bytes = serde_json::to_vec(&unhashed).expect("an entry serializes");
        Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Head {
    seq: u64,
    hash: String,
}

struct State {
    file: File,
    seq: u64,
    last: String,
    window: (Instant, u32),
    suppressed: u64,
}

pub struct AuditLog {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("audit log {path}: {problem}")]
    Tampered { path: PathBuf, problem: String },
}

fn head_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".head");
    PathBuf::from(p)
}

impl AuditLog {
    /// Opens (or creates) the trail, checking it first: Quiver refuses to extend a trail that
    /// has been tampered with.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |e| AuditError::Io(path.to_path_buf(), e);
        let (seq, last) = match verify(path) {
            Ok(r) => (r.entries, r.last_hash),
            Err(VerifyError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                (0, GENESIS.to_string())
            }
            Err(VerifyError::Io(e)) => return Err(io(e)),
            Err(VerifyError::Tampered(problem)) => {
                return Err(AuditError::Tampered {
                    path: path.into(),
                    problem,
                })
            }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                file,
                seq,
                last,
                window: (Instant::now(), 0),
                suppressed: 0,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry (written and fsynced, head replaced). Failures to write are logged:
    /// the action itself has happened.
    pub fn record(&self, actor: &str, action: &str, target: &str, outcome: &str, detail: &str) {
        let mut st = self.state.lock();
        let mut detail = detail.to_string();
        if action == "denied" {
            if st.window.0.elapsed().as_secs() >= 1 {
                st.window = (Instant::now(), 0);
            }
            if st.window.1 >= FAILURES_PER_SECOND_MAX {
                st.suppressed += 1;
                metrics::counter!(quiver_core::telemetry::AUDIT_SUPPRESSED_TOTAL).increment(1);
                return;
            }
            st.window.1 += 1;
            if st.suppressed > 0 {
                detail = format!(
                    "{detail} (and {} denials not recorded before this one)",
                    st.suppressed
                );
                st.suppressed = 0;
            }
        }
        let mut entry = Entry {
            seq: st.seq + 1,
            at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            outcome: outcome.to_string(),
            detail,
            prev: st.last.clone(),
            hash: String::new(),
        };
        entry.hash = entry.digest();
        let mut line = serde_json::to_vec(&entry).expect("an entry serializes");
        line.push(b'\n');
        let written = st.file.write_all(&line).and_then(|()| st.file.sync_data());
        let head = serde_json::to_vec(&Head {
            seq: entry.seq,
            hash: entry.hash.clone(),
        })
        .expect("head serializes");
        match written.and_then(|()| quiver_fsutil::write_atomic(&head_path(&self.path), &head)) {
            Ok(()) => {
                st.seq = entry.seq;
                st.last = entry.hash;
            }
            Err(e) => tracing::error!(error = %e, action, "audit entry not written"),
        }
    }
}

/// What `quiver audit verify` found.
#[derive(Debug)]
pub struct Report {
    pub entries: u64,
    pub last_hash: String,
}

#[derive(Debug)]
pub enum VerifyError {
    Io(std::io::Error),
    Tampered(String),
}

/// Checks every entry's hash and link, and the head: the first problem found, if any.
pub fn verify(path: &Path) -> Result<Report, VerifyError> {
    let file = File::open(path).map_err(VerifyError::Io)?;
    let mut prev = GENESIS.to_string();
    let mut seq = 0;
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(VerifyError::Io)?;
        let bad = |what: &str| VerifyError::Tampered(format!("line {}: {what}", i + 1));
        let e: Entry = serde_json::from_str(&line).map_err(|_| bad("not an audit entry"))?;
        if e.seq != seq + 1 {
            return Err(bad(&format!(
                "entry {} follows entry {seq}: an entry is missing",
                e.seq
            )));
        }
        if e.prev != prev {
            return Err(bad(
                "does not link to the entry before it (one was edited or deleted)",
            ));
        }
        if e.digest() != e.hash {
            return Err(bad("its contents do not match its hash (it was edited)"));
        }
        seq = e.seq;
        prev = e.hash;
    }
    match std::fs::read(head_path(path)) {
        Ok(bytes) => {
            let head: Head = serde_json::from_slice(&bytes)
                .map_err(|_| VerifyError::Tampered("the head file is unreadable".into()))?;
            if head.seq != seq || head.hash != prev {
                return Err(VerifyError::Tampered(format!(
                    "the trail ends at entry {seq} but its head says {}: entries were removed from the end",
                    head.seq
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && seq == 0 => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VerifyError::Tampered("the head file is missing".into()))
        }
        Err(e) => return Err(VerifyError::Io(e)),
    }
    Ok(Report {
        entries: seq,
        last_hash: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trail(dir: &Path) -> PathBuf {
        let path = dir.join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record("key:ops", "traffic", "model:fraud", "ok", "split 90/10");
        log.record("key:ops", "rollback", "model:fraud", "ok", "to 1");
        log.record(
            "anonymous",
            "denied",
            "POST /v1/events",
            "401",
            "no credentials",
        );
        path
    }

    #[test]
    fn denials_past_the_bound_are_counted_and_summarized_but_admin_actions_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        let deny = |n: u32| log.record("anonymous", "denied", "GET /x", "401", &format!("try {n}"));
        deny(0);
        // This second's bound is reached (set, not raced: a slow disk must not reset it).
        log.state.lock().window = (Instant::now(), FAILURES_PER_SECOND_MAX);
        (1..=5).for_each(deny);
        log.record("key:ops", "rollback", "model:m", "ok", "to 1");
        assert_eq!(log.state.lock().suppressed, 5);
        let trail = std::fs::read_to_string(&path).unwrap();
        assert!(
            !trail.contains("try 1") && !trail.contains("try 5"),
            "{trail}"
        );
        assert!(
            trail.contains("\"rollback\""),
            "admin actions are never throttled"
        );
        // The next second: the next denial is written, carrying the count of those dropped.
        log.state.lock().window.0 = Instant::now() - std::time::Duration::from_secs(2);
        deny(6);
        let trail = std::fs::read_to_string(&path).unwrap();
        let last = trail.lines().last().unwrap();
        assert!(
            last.contains("try 6 (and 5 denials not recorded before this one)"),
            "{last}"
        );
        assert_eq!(log.state.lock().suppressed, 0);
        assert_eq!(verify(&path).unwrap().entries, 3, "the chain is whole");
    }

    #[test]
    fn an_untouched_trail_verifies_and_reopens_where_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let path = trail(dir.path());
        assert_eq!(verify(&path).unwrap().entries, 3);
        AuditLog::open(&path)
            .unwrap()
            .record("key:ops", "promote", "model:fraud", "ok", "2");
        assert_eq!(verify(&path).unwrap().entries, 4);
    }

    #[test]
    fn an_edited_deleted_or_truncated_entry_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = trail(dir.path());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let problem = |content: String| {
            std::fs::write(&path, content).unwrap();
            match verify(&path) {
                Err(VerifyError::Tampered(p)) => p,
                other => panic!("not caught: {other:?}"),
            }
        };
        let edited = text.replace("split 90/10", "split 10/90");
        assert!(problem(edited).contains("edited"));
        let deleted = format!("{}\n{}\n", lines[0], lines[2]);
        assert!(problem(deleted).contains("missing"));
        let truncated = format!("{}\n{}\n", lines[0], lines[1]);
        assert!(problem(truncated).contains("removed from the end"));
        assert!(
            AuditLog::open(&path).is_err(),
            "Quiver refuses to extend a tampered trail"
        );
    }
}
