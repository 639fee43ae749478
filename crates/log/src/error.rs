use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log io error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A write or fsync failed: what reached the disk is unknown, so the log refuses every
    /// further write until a restart recovers it from what is on disk.
    #[error("log is poisoned after a failed write or fsync ({0}); restart to recover")]
    Poisoned(String),
    #[error("log append queue is full ({queued} of {max} records)")]
    Full { queued: usize, max: usize },
    /// The log is at `log.disk_bytes_max` and retention may not free anything: a lossless
    /// consumer (`held_by`) has not consumed the oldest segments yet.
    #[error("log is at its disk bound ({used} of {max} bytes){}", held_by.as_ref().map(|c| format!("; retention waits for consumer {c:?}")).unwrap_or_default())]
    DiskFull {
        used: u64,
        max: u64,
        held_by: Option<String>,
    },
    /// The backend cannot take or hand out records right now (a Kafka broker away, a
    /// producer being rebuilt after a fatal error): retrying later may succeed.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// The backend refused to start (a topic with another partition count, a bad setting).
    #[error("log backend: {0}")]
    Setup(String),
    #[error("log is shutting down")]
    ShuttingDown,
    #[error("corrupt log: partition {partition} segment {segment}: {reason}")]
    Corrupt {
        partition: u32,
        segment: String,
        reason: String,
    },
    #[error("offset {offset} of partition {partition} is not in the log (range {first}..{next})")]
    OffsetOutOfRange {
        partition: u32,
        offset: u64,
        first: u64,
        next: u64,
    },
    #[error("log directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("no such partition {0}")]
    NoPartition(u32),
    #[error("record of {0} bytes is over FRAME_PAYLOAD_BYTES_MAX")]
    RecordTooLarge(usize),
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LogError {
    let path = path.into();
    move |source| LogError::Io { path, source }
}
