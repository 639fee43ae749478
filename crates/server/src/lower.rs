//! Lower-priority execution: while a better rate tier is active, the handlers of a lower
//! tier's requests run on threads the OS schedules at idle priority, so the better tier's
//! request preempts them at once.
//!
//! # Why
//! The tiers' admission ([`quiver_auth::tiers`]) decides which requests may *start*; it cannot
//! make a running one step aside. Handlers are CPU-bound and do not yield, so with a bronze
//! batch predict on one core and the node's other threads (connections, refusals, the
//! materializers) on the other, a gold request's thread waited for the kernel's time slices —
//! milliseconds — behind work the admission had already ranked below it (BENCHMARKS.md,
//! "Priority under a 3× flood"). Priority has to reach the scheduler that hands out the cores.
//!
//! # Design constraints
//! - Linux `SCHED_IDLE` for the pool's threads: a normal thread waking up preempts an idle one
//!   at once, and idle threads get what the normal ones leave. Any thread may lower its own
//!   policy; raising it back needs privileges, so the pool's threads are idle for life and a
//!   request is *moved* to them (spawned, its result awaited) instead of a thread changing
//!   policy around it.
//! - Only the handler moves. The admission permit, the deadline and the response's headers stay
//!   with the caller on the main runtime, so nothing a better tier waits for (the slot queue's
//!   lock, the permit's release) is ever held by an idle-priority thread.
//! - Only while there is someone to yield to: a request is lowered if a better priority started
//!   one within the last second ([`quiver_auth::tiers::Permit::lowered`]). Otherwise a lower
//!   tier alone on the node would compete at idle priority with its own refused retries
//!   (served at normal priority, since the tier is known only once they are parsed) and
//!   starve: measured, bronze alone with retrying clients fell from ~1,600 to ~270 requests/s.
//! - The best priority pays nothing: its requests run where they always did, and without two
//!   priorities in use the pool does not exist.
//! - If the policy cannot be set (a sandbox forbidding it), the threads run at normal priority
//!   and the failure is logged once: tiers still shed by admission, as before.

use std::future::Future;

use tokio::runtime::Runtime;

/// Threads the OS runs only when nothing of normal priority is runnable.
pub struct LowerPool {
    /// `Some` until dropped; a runtime cannot be dropped inside another runtime's context, so
    /// `Drop` shuts it down in the background instead.
    runtime: Option<Runtime>,
}

impl LowerPool {
    /// A pool of one thread per core.
    pub fn new() -> std::io::Result<LowerPool> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("quiver-lower")
            .on_thread_start(lower_current_thread)
            .enable_all()
            .build()?;
        Ok(LowerPool {
            runtime: Some(runtime),
        })
    }

    /// Runs `work` on the pool and returns its output. Dropping the returned future (the
    /// request's deadline passed, the client went away) aborts `work` at its next await; a
    /// panic in `work` resumes in the caller, as if it had run there.
    pub async fn run<F>(&self, work: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let runtime = self.runtime.as_ref().expect("taken only on drop");
        metrics::counter!(quiver_core::telemetry::REQUESTS_LOWERED_TOTAL).increment(1);
        let mut task = AbortOnDrop(runtime.spawn(work));
        match (&mut task.0).await {
            Ok(out) => out,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: only by the pool's shutdown, i.e. the server is going away.
            Err(e) => panic!("lower-priority work cancelled: {e}"),
        }
    }
}

impl Drop for LowerPool {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Aborts its task when dropped before the task finished.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort(); // no effect on a finished task
    }
}

/// Puts the calling thread under `SCHED_IDLE` (logged once if refused).
fn lower_current_thread() {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    let set = set_thread_priority_and_policy(
        thread_native_id(),
        thread_priority::ThreadPriority::Min,
        idle,
    );
    if let Err(e) = set {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!(error = ?e, "lower-priority threads run at normal priority: SCHED_IDLE refused");
        });
    }
}

/// The calling thread's scheduling policy is `SCHED_IDLE`.
#[cfg(test)]
fn current_thread_is_idle() -> bool {
    use thread_priority::unix::{
        thread_schedule_policy, NormalThreadSchedulePolicy, ThreadSchedulePolicy,
    };
    matches!(
        thread_schedule_policy(),
        Ok(ThreadSchedulePolicy::Normal(
            NormalThreadSchedulePolicy::Idle
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn work_runs_on_idle_threads_and_its_caller_stays_normal() {
        let pool = LowerPool::new().unwrap();
        assert!(pool.run(async { current_thread_is_idle() }).await);
        assert!(
            !current_thread_is_idle(),
            "the caller's thread is untouched"
        );
        drop(pool); // inside a runtime: must not panic
    }

    #[tokio::test]
    async fn dropping_the_caller_aborts_the_work() {
        let pool = LowerPool::new().unwrap();
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let work = pool.run(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            f.store(true, Ordering::SeqCst);
        });
        let timed_out = tokio::time::timeout(Duration::from_millis(20), work).await;
        assert!(timed_out.is_err());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!finished.load(Ordering::SeqCst), "aborted, not finished");
    }

    #[tokio::test]
    async fn a_panic_in_the_work_resumes_in_the_caller() {
        let pool = Arc::new(LowerPool::new().unwrap());
        let p = pool.clone();
        let caller = tokio::spawn(async move { p.run(async { panic!("boom") }).await });
        let err = caller.await.unwrap_err();
        assert!(err.is_panic());
        // The pool survives a panicking request.
        assert_eq!(pool.run(async { 7 }).await, 7);
    }
}
