//! Point-in-time retrieval: what the online store served for an entity at an instant `t`.
//!
//! Online, at wall-clock time `t`, the store holds every record appended to the log up to
//! `t` (a prefix of each partition), applied in log order — dedup, event-time LWW, window
//! lateness — and a read at `t` applies TTL and windows relative to `t`. Point-in-time
//! retrieval replays exactly that: an entity's records in log order up to the first one
//! appended after `t`, through the store's own apply code, then reads at `now = t`. So the
//! offline value equals the online one by construction, late and duplicate events included
//! (property-tested in `crates/server/tests/consistency.rs`). One difference: offline dedup
//! remembers every `event_id` of the entity, online only the last `store.dedup_window_events`
//! of the partition.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use quiver_core::record;
use quiver_core::schema::{FeatureIdx, Schema, ViewId};
use quiver_core::time::EpochMs;
use quiver_log::{Log, ReadBatch};

use crate::{DedupWindow, FeatureRead, LateCounts, Result, Store};

/// One log record kept for replay.
#[derive(Debug, Clone)]
pub struct HistoryRecord {
    pub offset: u64,
    pub append_ms: EpochMs,
    pub payload: Vec<u8>,
}

/// Reads, at each of `instants` (row index, time), the `columns` of `key` in `view` from its
/// `records` (in log order). Returns one entry per instant, in the order given.
pub fn replay_at(
    schema: &Arc<Schema>,
    view: ViewId,
    key: &str,
    records: &[HistoryRecord],
    instants: &[(usize, EpochMs)],
    columns: &[FeatureIdx],
) -> Vec<(usize, Vec<FeatureRead>)> {
    let store = Store::new(schema.clone(), 1);
    let mut dedup = DedupWindow::new(records.len().max(1));
    let mut late = LateCounts::default();
    let mut order: Vec<(usize, EpochMs)> = instants.to_vec();
    order.sort_by_key(|&(row, t)| (t, row));
    let mut next = 0;
    let mut out = Vec::with_capacity(order.len());
    for (row, t) in order {
        while let Some(r) = records.get(next) {
            if r.append_ms > t {
                break;
            }
            if let Ok(rec) = record::decode(&r.payload) {
                debug_assert_eq!(rec.key, key);
                store.apply(0, r.offset, &rec, &mut dedup, &mut late);
            }
            next += 1;
        }
        let mut reads = Vec::with_capacity(columns.len());
        store.read(view, key, columns, t, &mut reads);
        out.push((row, reads));
    }
    out
}

/// Every record of the given (view, key)s in the embedded log from offset `from(partition)`
/// on (at least the oldest kept), grouped per key, in log order. Reads that part of the log
/// once (what the embedded default keeps is bounded by its retention).
pub fn collect_from_log(
    log: &Log,
    view: &str,
    keys: &HashSet<String>,
    from: &dyn Fn(u32) -> u64,
) -> Result<HashMap<String, Vec<HistoryRecord>>> {
    let mut out: HashMap<String, Vec<HistoryRecord>> = HashMap::new();
    let mut batch = ReadBatch::default();
    for p in 0..log.partitions() {
        let end = log.durable_offset(p);
        let start = from(p).clamp(log.first_offset(p), end);
        let mut reader = log.reader(p, start)?;
        while reader.position() < end {
            reader.poll(4096, Duration::from_millis(10), &mut batch)?;
            for r in batch.iter() {
                if r.offset >= end {
                    break;
                }
                let Ok(rec) = record::decode(r.payload) else {
                    continue;
                };
                if rec.view == view && keys.contains(rec.key) {
                    out.entry(rec.key.to_string())
                        .or_default()
                        .push(HistoryRecord {
                            offset: r.offset,
                            append_ms: r.append_ms,
                            payload: r.payload.to_vec(),
                        });
                }
            }
        }
    }
    Ok(out)
}
