//! Metric names, from one place (Vector's instrumentation spec): counters end in `_total`,
//! durations are histograms in seconds, `reason` labels come from a small fixed set of codes.

pub const EVENTS_INGESTED_TOTAL: &str = "quiver_events_ingested_total";
/// Label `reason`: an [`crate::event::Reason`] code, `queue_full`, `disk_full`, `body_too_large`, `log_poisoned`.
pub const EVENTS_REJECTED_TOTAL: &str = "quiver_events_rejected_total";
pub const EVENTS_APPLIED_TOTAL: &str = "quiver_events_applied_total";
/// Events skipped at apply because their `event_id` was already applied.
pub const EVENTS_DUPLICATE_TOTAL: &str = "quiver_events_duplicate_total";
/// Events skipped at apply because a newer value was already stored (per feature).
pub const VALUES_LATE_TOTAL: &str = "quiver_values_late_total";
/// Aggregation observations dropped: beyond the view's `allowed_lateness`, or older than the
/// tiles an entity keeps.
pub const AGGREGATION_LATE_DROPPED_TOTAL: &str = "quiver_aggregation_late_dropped_total";

/// From enqueue to the log round that carried it completing (written, and fsynced if enabled).
pub const LOG_APPEND_SECONDS: &str = "quiver_log_append_seconds";
pub const LOG_FSYNC_SECONDS: &str = "quiver_log_fsync_seconds";
pub const LOG_QUEUE_RECORDS: &str = "quiver_log_queue_records";
pub const LOG_NEXT_OFFSET: &str = "quiver_log_next_offset";
pub const LOG_POISONED: &str = "quiver_log_poisoned";

/// Label `partition`: records durable in the log but not yet applied to the store.
pub const MATERIALIZER_LAG_RECORDS: &str = "quiver_materializer_lag_records";
pub const MATERIALIZER_APPLIED_OFFSET: &str = "quiver_materializer_applied_offset";
/// Seconds since the partition was last caught up with its log's end as the log confirmed it
/// (grows while a Kafka broker is away: reads are served from memory, this says how old).
/// Records of Kafka topics that are not valid events of their view, by topic and reason.
pub const KAFKA_RECORDS_REJECTED_TOTAL: &str = "quiver_kafka_records_rejected_total";
/// Producer state: records admitted and not yet acknowledged by Kafka.
pub const KAFKA_PRODUCER_QUEUED_RECORDS: &str = "quiver_kafka_producer_queued_records";
/// RabbitMQ source messages by queue and outcome (`appended`, `rejected`, `requeued`).
pub const RABBITMQ_MESSAGES_TOTAL: &str = "quiver_rabbitmq_messages_total";
/// Versions refused because they missed their golden set, by model and version.
pub const MODEL_GOLDEN_FAILURES_TOTAL: &str = "quiver_model_golden_failures_total";
/// Rollout decisions by model and action (`start`, `advance`, `promote`, `rollback`).
pub const ROLLOUT_DECISIONS_TOTAL: &str = "quiver_rollout_decisions_total";
/// Percent of a model's traffic on its rollout's candidate (0 when none runs).
pub const ROLLOUT_CANDIDATE_PERCENT: &str = "quiver_rollout_candidate_percent";
/// Authorization failures not written to the audit trail (over its per-second bound).
pub const AUDIT_SUPPRESSED_TOTAL: &str = "quiver_audit_suppressed_total";
/// Requests refused by the security layer before they ran, by `status` (401, 403, 429, 503).
pub const REQUESTS_REFUSED_TOTAL: &str = "quiver_requests_refused_total";
/// Requests whose handler ran on the lower-priority (`SCHED_IDLE`) threads: those of a rate
/// tier below the best priority in use.
pub const REQUESTS_LOWERED_TOTAL: &str = "quiver_requests_lowered_total";
/// Connections closed at once because a listener had `server.connections_max` of them.
pub const CONNECTIONS_REFUSED_TOTAL: &str = "quiver_connections_refused_total";
pub const MATERIALIZER_STALENESS_SECONDS: &str = "quiver_materializer_staleness_seconds";
/// A snapshot from its start until it is synced and in place (the sync runs beside the
/// materializer).
pub const SNAPSHOT_SECONDS: &str = "quiver_snapshot_seconds";
/// The part of a snapshot during which its partition applies nothing: serializing the rows.
pub const SNAPSHOT_PAUSE_SECONDS: &str = "quiver_snapshot_pause_seconds";
pub const STORE_ROWS: &str = "quiver_store_rows";

/// Label `path`: `single` (GET one entity) or `batch` (POST /v1/features).
pub const LOOKUP_SECONDS: &str = "quiver_lookup_seconds";
/// Label `route`, `status`.
pub const HTTP_REQUESTS_TOTAL: &str = "quiver_http_requests_total";
pub const INGEST_SECONDS: &str = "quiver_ingest_seconds";
pub const READ_AFTER_WAIT_SECONDS: &str = "quiver_read_after_wait_seconds";
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "quiver_idempotent_replays_total";

/// Label `partition`: records durable in the log and not yet committed to PostgreSQL.
pub const HISTORY_LAG_RECORDS: &str = "quiver_history_lag_records";
pub const HISTORY_ROWS_WRITTEN_TOTAL: &str = "quiver_history_rows_written_total";
pub const HISTORY_ERRORS_TOTAL: &str = "quiver_history_errors_total";
pub const HISTORY_WRITE_SECONDS: &str = "quiver_history_write_seconds";
/// Records retention deleted before the history sink wrote them (lossy sink, or a sink
/// configured after the fact); each range is also logged and recorded in `<table>_gaps`.
pub const HISTORY_LOST_RECORDS_TOTAL: &str = "quiver_history_lost_records_total";
/// 1 while a partition's sink has stopped on an error retrying cannot fix (see its log line).
pub const HISTORY_STOPPED: &str = "quiver_history_stopped";
/// Bytes of the log's segments on disk (bounded by `log.disk_bytes_max`).
pub const LOG_DISK_BYTES: &str = "quiver_log_disk_bytes";

// Models. Labels `model` and (where it applies) `version`. The split of a predict's time
// follows Triton's: queue (waiting for a batch), gather (features from the store), compute.
pub const MODEL_QUEUE_SECONDS: &str = "quiver_model_queue_seconds";
pub const MODEL_GATHER_SECONDS: &str = "quiver_model_gather_seconds";
pub const MODEL_COMPUTE_SECONDS: &str = "quiver_model_compute_seconds";
/// Rows per model execution (1 without batching).
pub const MODEL_BATCH_SIZE: &str = "quiver_model_batch_size";
/// Rows evaluated (Triton's inference count) and model executions (its exec count).
pub const MODEL_INFERENCES_TOTAL: &str = "quiver_model_inferences_total";
pub const MODEL_EXECUTIONS_TOTAL: &str = "quiver_model_executions_total";
/// Predicts refused because a model's batch queue was full.
pub const MODEL_QUEUE_REJECTED_TOTAL: &str = "quiver_model_queue_rejected_total";
/// Versions that failed to load or warm up (label `model`).
pub const MODEL_LOAD_ERRORS_TOTAL: &str = "quiver_model_load_errors_total";
pub const MODEL_VERSIONS_READY: &str = "quiver_model_versions_ready";
/// Label `result`: `hit` or `miss`.
pub const PREDICTION_CACHE_TOTAL: &str = "quiver_prediction_cache_total";
/// Label `result`: `ok`, `error`, `dropped` (queue full).
pub const SHADOW_PREDICTIONS_TOTAL: &str = "quiver_shadow_predictions_total";
/// Largest absolute difference between shadow and primary outputs, per row.
pub const SHADOW_DIVERGENCE: &str = "quiver_shadow_divergence";
/// Requests forwarded to a peer in a cluster (labels `peer`, `ok`).
pub const CLUSTER_FORWARDED_TOTAL: &str = "quiver_cluster_forwarded_total";

/// A process's CPU time and resident memory, as `/proc/<pid>/stat` counts them (Linux only;
/// `None` elsewhere or when the process is gone). Read by `/metrics` for the standard
/// `process_cpu_seconds_total` / `process_resident_memory_bytes`, and by the benchmarks to
/// charge each side of a comparison its own CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStat {
    /// User + system CPU seconds of all the process's threads (exited ones included).
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    /// The command name (`comm`, at most 15 bytes).
    pub comm: [u8; 16],
}

/// `USER_HZ`: what `/proc` counts CPU time in. Fixed at 100 by the kernel's user ABI on every
/// architecture Linux supports (unlike `HZ`), so no `sysconf` call is needed.
const USER_HZ: f64 = 100.0;
/// Page size for `rss` (pages): 4 KiB on the x86-64 and arm64 kernels Quiver runs on.
const PAGE_BYTES: u64 = 4096;

impl ProcessStat {
    /// This process.
    pub fn own() -> Option<ProcessStat> {
        Self::parse(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }

    /// Process `pid`.
    pub fn of(pid: u32) -> Option<ProcessStat> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Thread `tid` of this process (its own CPU only).
    pub fn thread(tid: u32) -> Option<ProcessStat> {
        Self::parse(&std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?)
    }

    /// Whether the command name is `name` (names longer than 15 bytes compare by their first 15,
    /// as the kernel keeps them).
    pub fn named(&self, name: &str) -> bool {
        let n = name.len().min(15);
        self.comm[..n] == name.as_bytes()[..n] && self.comm[n] == 0
    }

    /// Parses a `stat` line: `pid (comm) state ppid …`; the name may hold spaces and parens,
    /// so the fields are counted from the last `)`.
    fn parse(line: &str) -> Option<ProcessStat> {
        let open = line.find('(')?;
        let close = line.rfind(')')?;
        let name = line.get(open + 1..close)?.as_bytes();
        let mut comm = [0u8; 16];
        let n = name.len().min(15);
        comm[..n].copy_from_slice(&name[..n]);
        // Fields after `)`: 0 = state (field 3), so field k is at k - 3.
        let fields: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
        let num = |k: usize| fields.get(k - 3)?.parse::<u64>().ok();
        Some(ProcessStat {
            cpu_seconds: (num(14)? + num(15)?) as f64 / USER_HZ,
            resident_bytes: num(24)? * PAGE_BYTES,
            comm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name_holds() {
        let line = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 4 0 123 1000000 300 18446744073709551615";
        let s = ProcessStat::parse(line).unwrap();
        assert_eq!(
            s.cpu_seconds, 3.0,
            "utime 250 + stime 50 ticks; children not counted"
        );
        assert_eq!(s.resident_bytes, 300 * 4096);
        assert!(s.named("my (odd) name") && !s.named("my"));
        assert!(ProcessStat::parse("4242 (x) S 1 2").is_none());
        assert!(ProcessStat::parse("garbage").is_none());
    }

    #[test]
    fn this_process_is_readable_and_long_names_compare_by_15_bytes() {
        let me = ProcessStat::own().expect("Linux /proc");
        assert!(me.resident_bytes > 0);
        let long =
            ProcessStat::parse("1 (postgres-walwri) S 0 0 0 0 0 0 0 0 0 0 1 1 0 0 0 0 0 0 0 0 5")
                .unwrap();
        assert!(long.named("postgres-walwriter") && !long.named("postgres"));
    }
}
