//! Point-in-time retrieval: an entity's features as of an instant `T`, in one of two
//! [`Semantics`].
//!
//! **`EventTime`** (the default; Feast's point-in-time join): for row (key, `T`) each feature
//! is the winner — greatest (event time, log offset) — among the entity's events with event
//! time ≤ `T`, whenever they arrived, so history loaded today (a backfill) is visible at every
//! past `T`. TTL is relative to `T`; aggregations cover the window ending at `T`, built from
//! those events; lateness does not apply (offline there is no "too late"). Duplicates (same
//! dedup id) count once: the first in log order. It is computed by applying the events in
//! (event time, offset) order through the store's own `apply` — in that order no event is ever
//! late, and "new wins iff its time ≥ the stored time" picks the (time, offset) maximum — and
//! reading at `now = T`. Checked against a brute-force oracle in `tests/pit_event_time.rs`.
//!
//! **`AsServed`**: what the online store served at wall-clock instant `T`. Online, at `T`, the
//! store holds every record appended to the log up to `T` (a prefix of each partition), applied
//! in log order — dedup, event-time LWW, window lateness — and a read at `T` applies TTL and
//! windows relative to `T`. This replays exactly that: an entity's records in log order up to
//! the first one appended after `T`, through the store's own apply code, then reads at
//! `now = T`. So the offline value equals the online one by construction, late and duplicate
//! events included (property-tested in `crates/server/tests/consistency.rs`). One difference:
//! offline dedup remembers every `event_id` of the entity, online only the last
//! `store.dedup_window_events` of the partition.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use quiver_core::record;
use quiver_core::schema::{FeatureIdx, Schema, ViewId};
use quiver_core::time::EpochMs;
use quiver_log::{EventLog, ReadBatch, StreamId};

use crate::{DedupWindow, FeatureRead, LateCounts, Result, Store};

/// One log record kept for replay.
#[derive(Debug, Clone)]
pub struct HistoryRecord {
    pub offset: u64,
    pub append_ms: EpochMs,
    pub payload: Vec<u8>,
}

/// How a point-in-time read chooses the events that count at `T` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Semantics {
    #[default]
    EventTime,
    AsServed,
}

impl Semantics {
    pub const NAMES: &'static [&'static str] = &["event_time", "as_served"];

    pub fn parse(name: &str) -> Option<Semantics> {
        match name {
            "event_time" => Some(Semantics::EventTime),
            "as_served" => Some(Semantics::AsServed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Semantics::EventTime => "event_time",
            Semantics::AsServed => "as_served",
        }
    }
}

/// A replay of many entities at once: one private store for a whole request, since building
/// a `Store` per entity cost more than the replay itself. Entities never touch each other's
/// rows, and dedup ids are per entity, so sharing changes no result; each key is replayed at
/// most once per `Replay` (asserted).
pub struct Replay {
    store: Store,
    dedup: DedupWindow,
    late: LateCounts,
}

impl Replay {
    pub fn new(schema: &Arc<Schema>) -> Replay {
        Replay {
            store: Store::new(schema.clone(), 1),
            dedup: DedupWindow::new(usize::MAX),
            late: LateCounts::default(),
        }
    }

    /// Reads, at each of `instants` (row index, time), the `columns` of `key` in `view` from
    /// its `records` (in log order). Returns one entry per instant, in the order given.
    #[allow(clippy::too_many_arguments)]
    pub fn read(
        &mut self,
        view: ViewId,
        key: &str,
        records: &[HistoryRecord],
        instants: &[(usize, EpochMs)],
        columns: &[FeatureIdx],
        semantics: Semantics,
    ) -> Vec<(usize, Vec<FeatureRead>)> {
        assert!(
            self.store.row_version(view, key).is_none(),
            "a key is replayed at most once per Replay"
        );
        // (cut-off time, offset, record) in the order they are applied; decoded once.
        let ordered: Vec<(EpochMs, u64, record::Record<'_>)> = match semantics {
            Semantics::AsServed => records
                .iter()
                .filter_map(|r| Some((r.append_ms, r.offset, record::decode(&r.payload).ok()?)))
                .collect(),
            Semantics::EventTime => by_event_time(records),
        };
        let mut order: Vec<(usize, EpochMs)> = instants.to_vec();
        order.sort_by_key(|&(row, t)| (t, row));
        let mut next = 0;
        let mut out = Vec::with_capacity(order.len());
        for (row, t) in order {
            while let Some((cut, offset, rec)) = ordered.get(next) {
                if *cut > t {
                    break;
                }
                debug_assert_eq!(rec.key, key);
                self.store
                    .apply(0, *offset, rec, &mut self.dedup, &mut self.late);
                next += 1;
            }
            let mut reads = Vec::with_capacity(columns.len());
            self.store.read(view, key, columns, t, &mut reads);
            out.push((row, reads));
        }
        debug_assert_eq!(out.len(), instants.len());
        out
    }
}

/// [`Replay::read`] for one entity.
pub fn replay_at(
    schema: &Arc<Schema>,
    view: ViewId,
    key: &str,
    records: &[HistoryRecord],
    instants: &[(usize, EpochMs)],
    columns: &[FeatureIdx],
    semantics: Semantics,
) -> Vec<(usize, Vec<FeatureRead>)> {
    Replay::new(schema).read(view, key, records, instants, columns, semantics)
}

/// The records that count offline, by (event time, offset): undecodable ones and repeats of a
/// dedup id already seen in log order are left out.
fn by_event_time(records: &[HistoryRecord]) -> Vec<(EpochMs, u64, record::Record<'_>)> {
    let mut seen = HashSet::new();
    let mut out: Vec<(EpochMs, u64, record::Record<'_>)> = records
        .iter()
        .filter_map(|r| {
            let rec = record::decode(&r.payload).ok()?;
            if let Some(id) = rec.dedup {
                if !seen.insert(id) {
                    return None;
                }
            }
            Some((rec.ts_ms, r.offset, rec))
        })
        .collect();
    out.sort_unstable_by_key(|(ts, offset, _)| (*ts, *offset));
    out
}

/// Every record of the given (view, key)s in the log from offset `from(stream)` on (at least
/// the oldest kept) to the end as of the call, grouped per key, in log order. Reads only the
/// streams that can hold them: those carrying `view`, of the partitions of `keys` (what a log
/// keeps is bounded by its retention).
pub fn collect_from_log(
    log: &dyn EventLog,
    view: &str,
    keys: &HashSet<String>,
    from: &dyn Fn(StreamId) -> u64,
) -> Result<HashMap<String, Vec<HistoryRecord>>> {
    let partitions: HashSet<u32> = keys
        .iter()
        .map(|k| quiver_core::partition::partition_for(k.as_bytes(), log.partitions()))
        .collect();
    let mut start = Vec::new();
    let mut ends = HashMap::new();
    for s in log.view_streams(view) {
        if !partitions.contains(&log.streams()[s as usize].partition) {
            continue;
        }
        let end = log.high_watermark(s)?;
        let first = from(s).clamp(log.low_watermark(s)?, end);
        if first < end {
            start.push((s, first));
            ends.insert(s, end);
        }
    }
    let mut out: HashMap<String, Vec<HistoryRecord>> = HashMap::new();
    if start.is_empty() {
        return Ok(out);
    }
    let mut reader = log.open_reader(&start, quiver_log::ReadPurpose::Scan)?;
    let mut batch = ReadBatch::default();
    let deadline = std::time::Instant::now() + LOG_SCAN_TIME_MAX;
    while ends.iter().any(|(&s, &end)| reader.position(s) < end) {
        if std::time::Instant::now() > deadline {
            return Err(crate::StoreError::Log(quiver_log::LogError::Unavailable(
                format!("reading the log tail for point in time took over {LOG_SCAN_TIME_MAX:?}"),
            )));
        }
        reader.poll(4096, Duration::from_millis(10), &mut batch)?;
        for r in batch.iter() {
            if r.offset >= ends[&r.stream] {
                continue;
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
    Ok(out)
}

/// Longest a point-in-time read may spend reading the log's tail (a broker that stops
/// answering must not hold the request forever).
const LOG_SCAN_TIME_MAX: Duration = Duration::from_secs(30);

/// Row indices ordered so that equal keys are adjacent (stable: a key's rows keep their order):
/// how a client (`quiver history`, the `history` benchmark) chunks an entity dataframe, so the
/// rows of one entity reach the server in one request.
pub fn grouped_by_key<K: Ord>(keys: &[K]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].cmp(&keys[b]));
    order
}
