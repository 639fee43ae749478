//! Unit tests of the sink's pure parts; the PostgreSQL scenarios are in `crates/connect/tests`.

use super::service::{is_retriable_sqlstate, Batch};

#[test]
fn only_transient_sqlstates_are_retried() {
    for code in [
        "08006", "08001", "40001", "40P01", "53300", "57P01", "57P03", "58030", "55P03",
    ] {
        assert!(is_retriable_sqlstate(code), "{code} is transient");
    }
    // permission denied, undefined column, invalid text, unique violation, disk full is 53100 (retried)
    for code in ["42501", "42703", "22P02", "23505", "42P01", ""] {
        assert!(
            !is_retriable_sqlstate(code),
            "{code} fails the same way every time"
        );
    }
    assert!(is_retriable_sqlstate("53100"));
}

#[test]
fn a_batch_covers_the_furthest_offset_of_each_stream() {
    let mut b = Batch {
        gaps: vec![("log".into(), 10, 20)],
        ..Batch::default()
    };
    assert!(b.needs_write(), "a gap alone is written");
    assert!(!b.covers(), "nothing covered yet");
    b.covered("log", 20);
    b.covered("log", 15);
    b.covered("kafka:t", 3);
    assert_eq!(b.ends["log"], 20, "ends only move forward");
    assert_eq!(b.ends["kafka:t"], 3);
    b.clear();
    assert!(!b.needs_write() && !b.covers() && b.gaps.is_empty());
}
