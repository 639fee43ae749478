//! How readers wait out a seqlock writer (aggregation rings, rows overwritten in place).
//!
//! Each map has one writer, its partition's materializer; it never waits for readers. A reader
//! copies what it needs and retries if a write overlapped the copy. A retry means the writer
//! updated this very entity during the read; on two cores the writer can be descheduled
//! mid-write, and then spinning only delays it, so readers yield after a few spins.

/// Attempts a reader makes before it yields the CPU between attempts.
const SPINS_MAX: usize = 64;
/// Attempts after which a reader gives up instead of waiting forever: only reachable if the
/// writer died in the middle of a write.
pub(crate) const ATTEMPTS_MAX: usize = 100_000;

/// Waits before attempt `attempt` (1-based) of a read that a write overlapped.
pub(crate) fn pause(attempt: usize) {
    debug_assert!(attempt > 0 && attempt <= ATTEMPTS_MAX);
    if attempt < SPINS_MAX {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}
