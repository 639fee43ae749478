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
fn a_cleared_batch_keeps_its_end() {
    let mut b = Batch {
        end: 40,
        covers: true,
        gaps: vec![(10, 20)],
        ..Batch::default()
    };
    assert!(b.needs_write(), "a gap alone is written");
    b.clear();
    assert!(!b.needs_write() && !b.covers && b.gaps.is_empty());
    assert_eq!(b.end, 40, "the next batch starts where this one ended");
}
