//! The sink's options, from `[history]` (DESIGN.md §3).

use quiver_core::config::HistoryConfig;

#[derive(Debug, Clone)]
pub struct HistoryOptions {
    pub postgres_url: String,
    pub table: String,
    /// Rows per INSERT (one transaction).
    pub batch_rows_max: usize,
    /// Longest backoff between retries of a retriable error.
    pub retry_delay_ms_max: u64,
    /// Retention does not wait for a lossy sink; it reports every range it loses instead.
    pub lossy: bool,
    /// The CA PostgreSQL's certificate must lead to (unset: TLS unverified, as `sslmode`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl HistoryOptions {
    /// `None` when no `postgres_url` is configured (no sink).
    pub fn from_config(c: &HistoryConfig) -> Option<HistoryOptions> {
        Some(HistoryOptions {
            postgres_url: c.postgres_url.clone()?,
            table: c.table.clone(),
            batch_rows_max: c.batch_rows_max,
            retry_delay_ms_max: c.retry_delay_ms_max,
            lossy: c.lossy,
            ca_file: c.ca_file.clone(),
        })
    }
}
