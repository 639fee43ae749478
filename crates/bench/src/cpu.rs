//! Server CPU per operation: each side of a comparison is charged its own server's CPU, read
//! from `/proc` (Linux; elsewhere the figures are absent), never the load generator's.

use std::net::SocketAddr;

use anyhow::Result;
use bytes::Bytes;
use quiver_core::telemetry::ProcessStat;

use crate::harness::{connect, request};
use crate::load::Window;

/// The name of the load generator's runtime threads, which [`ServerCpu::InProcess`] leaves out.
const CLIENT_THREADS: &str = "bench-client";

/// The load generator's runtime (2 workers, threads named so their CPU is not the server's).
pub fn client_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name(CLIENT_THREADS)
        .build()?)
}

/// Whose CPU a side of a comparison is charged.
pub enum ServerCpu {
    /// A Quiver server in another process, by its `process_cpu_seconds_total`.
    Metrics(SocketAddr),
    /// Every process of this command name (PostgreSQL: postmaster, backends, WAL writer…;
    /// CPU of a process that exits inside the window, such as an autovacuum worker, is lost).
    Processes(&'static str),
    /// The Quiver node in this process: the process's CPU less the load generator's threads
    /// ([`client_runtime`]'s and the main thread, which drives it). Exact for a window in which
    /// no generator thread exits.
    InProcess,
}

impl ServerCpu {
    /// CPU seconds so far, if readable.
    pub async fn seconds(&self) -> Option<f64> {
        match self {
            ServerCpu::Metrics(addr) => {
                let mut http = connect(*addr).await.ok()?;
                let (status, body) = request(&mut http, "GET", "/metrics", Bytes::new())
                    .await
                    .ok()?;
                let text = std::str::from_utf8(&body).ok().filter(|_| status == 200)?;
                prometheus_value(text, "process_cpu_seconds_total")
            }
            ServerCpu::Processes(name) => {
                let stats = numbered("/proc", |pid| {
                    ProcessStat::of(pid).filter(|s| s.named(name))
                });
                (!stats.is_empty()).then(|| stats.iter().sum())
            }
            ServerCpu::InProcess => {
                let total = ProcessStat::own()?.cpu_seconds;
                let main = std::process::id();
                let client = numbered("/proc/self/task", |tid| {
                    ProcessStat::thread(tid).filter(|s| tid == main || s.named(CLIENT_THREADS))
                });
                Some(total - client.iter().sum::<f64>())
            }
        }
    }

    /// The CPU seconds spent in `window`'s measured part.
    pub async fn spent_in(&self, window: &Window) -> Option<f64> {
        tokio::time::sleep_until(window.warm_end.into()).await;
        let before = self.seconds().await;
        tokio::time::sleep_until(window.end.into()).await;
        Some(self.seconds().await? - before?)
    }
}

/// CPU seconds of the numbered entries of `dir` (pids or tids) that `stat` picks.
fn numbered(dir: &str, stat: impl Fn(u32) -> Option<ProcessStat>) -> Vec<f64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .map(|s| s.cpu_seconds)
        .collect()
}

/// The value of an unlabelled series in Prometheus text.
pub fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// µs of server CPU per operation, when both are known.
pub fn us_per_op(cpu_s: Option<f64>, ops: f64) -> Option<f64> {
    cpu_s.filter(|_| ops > 0.0).map(|cpu| cpu * 1e6 / ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cpu_comes_from_prometheus_text_and_proc() {
        let text = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\nprocess_cpu_seconds_total_x 1\n";
        assert_eq!(
            prometheus_value(text, "process_cpu_seconds_total"),
            Some(12.5)
        );
        assert_eq!(prometheus_value(text, "absent"), None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let me = std::fs::read_to_string("/proc/self/comm").unwrap();
        let name: &'static str = Box::leak(me.trim().to_string().into_boxed_str());
        assert!(rt.block_on(ServerCpu::Processes(name).seconds()).is_some());
        let absent = ServerCpu::Processes("no-such-process");
        assert!(rt.block_on(absent.seconds()).is_none());
        assert_eq!(us_per_op(Some(0.5), 1e5), Some(5.0));
        assert_eq!(us_per_op(Some(0.5), 0.0), None);
    }

    /// Work on the generator's threads is not charged to the in-process server; work on any
    /// other thread is.
    #[test]
    fn in_process_cpu_leaves_the_generator_out() {
        let spin = |ms: u64| {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < std::time::Duration::from_millis(ms) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let client = client_runtime().unwrap();
        let before = rt.block_on(ServerCpu::InProcess.seconds()).unwrap();
        client
            .block_on(client.spawn(async move { spin(300) }))
            .unwrap();
        let after_client = rt.block_on(ServerCpu::InProcess.seconds()).unwrap();
        std::thread::Builder::new()
            .name("server-like".into())
            .spawn(move || spin(300))
            .unwrap()
            .join()
            .unwrap();
        let after_server = rt.block_on(ServerCpu::InProcess.seconds()).unwrap();
        // Loose bounds: tests running beside this one in the process are charged too.
        assert!(after_client - before < 0.15, "{before} → {after_client}");
        assert!(
            after_server - after_client > 0.15,
            "{after_client} → {after_server}"
        );
    }
}
