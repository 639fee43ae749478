//! `quiver log inspect DIR` and `quiver log verify DIR`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use quiver_core::time::format_rfc3339_ms;
use quiver_fsutil::seal::KeyRing;
use quiver_log::tools::{self, PartitionReport};

#[derive(Subcommand)]
pub enum LogCommand {
    /// Summarize each partition: segments, offsets, records, bytes, time range.
    Inspect {
        /// A data directory or its `log/` subdirectory.
        dir: PathBuf,
        /// Also print the last N records of each partition, decoded.
        #[arg(long, default_value_t = 0)]
        records: usize,
        /// `[storage] encryption_key_file`, to decode encrypted records.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Check every frame's checksum and offset (and, with `--key-file`, that every encrypted
    /// record opens); exit 1 on damage recovery would not repair.
    Verify {
        dir: PathBuf,
        /// `[storage] encryption_key_file`: also open every encrypted record.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

fn key_ring(path: Option<&std::path::Path>) -> Result<Option<KeyRing>> {
    Ok(path.map(KeyRing::load).transpose()?)
}

pub fn run(cmd: LogCommand) -> Result<()> {
    match cmd {
        LogCommand::Inspect {
            dir,
            records,
            key_file,
        } => {
            let log_dir = tools::resolve_log_dir(&dir);
            let keys = key_ring(key_file.as_deref())?;
            let reports = tools::verify(&log_dir, keys.as_ref())?;
            print_summary(&reports);
            if records > 0 {
                for r in &reports {
                    println!("\npartition {} — last {records} records:", r.partition);
                    for (offset, append_ms, payload) in
                        tools::tail_records(&log_dir, r.partition, records, keys.as_ref())?
                    {
                        let text = match quiver_core::record::decode(&payload) {
                            Ok(rec) => format!(
                                "view={} key={} ts={} event_id={} values={:?}",
                                rec.view,
                                rec.key,
                                format_rfc3339_ms(rec.ts_ms),
                                rec.event_id.unwrap_or("-"),
                                rec.values
                            ),
                            Err(_) if quiver_fsutil::seal::is_sealed(&payload) => {
                                "encrypted (give --key-file to decode)".to_string()
                            }
                            Err(e) => format!("undecodable payload ({e})"),
                        };
                        println!(
                            "  @{offset} appended {}  {text}",
                            format_rfc3339_ms(append_ms)
                        );
                    }
                }
            }
            Ok(())
        }
        LogCommand::Verify { dir, key_file } => {
            let log_dir = tools::resolve_log_dir(&dir);
            let keys = key_ring(key_file.as_deref())?;
            let reports = tools::verify(&log_dir, keys.as_ref())?;
            print_summary(&reports);
            let sealed: u64 = reports
                .iter()
                .flat_map(|r| &r.segments)
                .map(|s| s.sealed_records)
                .sum();
            if sealed > 0 {
                let how = if keys.is_some() {
                    "each opened with the key file"
                } else {
                    "not opened: give --key-file to check them too"
                };
                println!("encrypted: {sealed} records ({how})");
            }
            let errors: Vec<String> = reports.iter().flat_map(PartitionReport::errors).collect();
            let torn: u64 = reports
                .iter()
                .flat_map(|r| &r.segments)
                .map(|s| s.torn_tail_bytes)
                .sum();
            if torn > 0 {
                println!("torn tail: {torn} bytes after the last valid record (recovery truncates them; not an error)");
            }
            if !errors.is_empty() {
                for e in &errors {
                    println!("ERROR {e}");
                }
                bail!(
                    "{} damaged segment(s) in {}",
                    errors.len(),
                    log_dir.display()
                );
            }
            println!("OK: every record's checksum and offset verified");
            Ok(())
        }
    }
}

fn print_summary(reports: &[PartitionReport]) {
    if reports.is_empty() {
        println!("no partitions found");
        return;
    }
    println!(
        "{:<9} {:>8} {:>14} {:>14} {:>12} {:>14}  appended",
        "partition", "segments", "first offset", "next offset", "records", "bytes"
    );
    let (mut total_records, mut total_bytes) = (0u64, 0u64);
    for r in reports {
        let records: u64 = r.segments.iter().map(|s| s.records).sum();
        let bytes: u64 = r.segments.iter().map(|s| s.bytes).sum();
        total_records += records;
        total_bytes += bytes;
        let first = r.segments.iter().find_map(|s| s.first_append_ms);
        let last = r.segments.iter().rev().find_map(|s| s.last_append_ms);
        let range = match (first, last) {
            (Some(a), Some(b)) => format!("{} .. {}", format_rfc3339_ms(a), format_rfc3339_ms(b)),
            _ => "-".into(),
        };
        println!(
            "{:<9} {:>8} {:>14} {:>14} {:>12} {:>14}  {}",
            r.partition,
            r.segments.len(),
            r.first_offset(),
            r.next_offset(),
            records,
            bytes,
            range
        );
    }
    println!(
        "total: {total_records} records, {total_bytes} bytes in {} partitions",
        reports.len()
    );
}
