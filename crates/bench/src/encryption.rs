//! `encryption`: durable ingest with `[storage] encryption_key_file` against the same without,
//! in one run: what encryption at rest costs.

use anyhow::Result;
use serde_json::{json, Value};

use crate::harness::*;
use crate::ingest::{ingest_on, ratio, say_ratios};
use crate::report::Report;
use crate::BenchArgs;

/// `encryption`: the same durable ingest on the embedded log plain and sealed
/// (`[storage] encryption_key_file`), in one run: what encryption at rest costs.
pub(crate) fn run(report: &mut Report, args: &BenchArgs) -> Result<Value> {
    let keys = tempfile::tempdir()?;
    let key_file = keys.path().join("storage.keys");
    quiver_fsutil::seal::add_key(&key_file)?;
    let plain = ingest_on(report, args, "txn", "embedded", start_embedded()?)?;
    let sealed = ingest_on(
        report,
        args,
        "txn",
        "embedded, encrypted",
        start_embedded_with(|c| c.storage.encryption_key_file = Some(key_file.clone()))?,
    )?;
    say_ratios(
        report,
        "encryption at rest: encrypted ÷ plain",
        &plain,
        &sealed,
    );
    Ok(json!({
        "plain": plain,
        "encrypted": sealed,
        "events_per_s_encrypted_vs_plain": ratio(&plain, &sealed, "events_per_s"),
        "freshness_p99_encrypted_vs_plain": ratio(&plain, &sealed, "freshness_p99_us"),
    }))
}
