use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store io error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot {path} is corrupt: {reason}")]
    CorruptSnapshot { path: PathBuf, reason: String },
    /// A snapshot given up without harm (the partition goes on; the next one is taken when
    /// due): a row stayed mid-write through every retry of its copy.
    #[error("snapshot abandoned: {0}")]
    SnapshotAbandoned(String),
    #[error(transparent)]
    Log(#[from] quiver_log::LogError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, source }
}
