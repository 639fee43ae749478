//! Quiver's online store: the freshest value of every feature of every entity, in memory, fed
//! by one materializer per log partition, snapshotted for fast restart.
//!
//! # Concurrency
//! Rows live in one map per (partition, view) (`rowmap`): DENSE rows of numeric views without
//! aggregations in slots of a map of Quiver's own, every other row in a `papaya` map beside
//! it. Reads of both are lock-free: a lookup never waits for a writer, a writer never waits
//! for readers, and a reader holding a row keeps it alive until it is done (papaya's epochs;
//! the slot map's tables are shared by reference count and its slots never change keys). Each
//! map has exactly one writer, the materializer of its partition, so there are no write-write
//! races to resolve. A reader sees a row before or after an event, never half of one: an event
//! that overwrites a dense numeric row whole (the common update) rewrites it in place under a
//! per-row seqlock that readers check and retry on; any other event builds a new row and
//! swaps it in whole. (Rejected: `RwLock` or `DashMap` shards, whose readers block behind a
//! writer holding the shard; left-right maps, which double memory; always copying on write,
//! which cost an allocation, a map insert and a reclamation per update.)

mod aggs;
mod dedup;
mod error;
pub mod materializer;
pub mod pit;
pub mod row;
mod rowmap;
mod seqlock;
pub mod snapshot;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quiver_core::partition::partition_for;
use quiver_core::record::Record;
use quiver_core::schema::{FeatureIdx, Schema, ViewId};
use quiver_core::time::EpochMs;
use quiver_core::token::Token;
use quiver_core::value::Value;

pub use aggs::{AggCell, AggLayout};
pub use dedup::DedupWindow;
pub use error::{Result, StoreError};
pub use row::{Cell, Layout, Row, RowRef};
use rowmap::RowMap;

/// Feast's per-value statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Present,
    NullValue,
    NotFound,
    OutsideMaxAge,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Present => "PRESENT",
            Status::NullValue => "NULL_VALUE",
            Status::NotFound => "NOT_FOUND",
            Status::OutsideMaxAge => "OUTSIDE_MAX_AGE",
        }
    }
}

/// One feature of one entity as a read sees it. `value` is `Null` unless `Present`: a value
/// past its TTL is never returned.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRead {
    pub status: Status,
    pub value: Value,
    pub ts_ms: Option<EpochMs>,
}

/// Re-reads of a row whose aggregations moved past it mid-read (see [`Store::read`]).
const READ_RETRIES_MAX: usize = 1000;

fn not_found() -> FeatureRead {
    FeatureRead {
        status: Status::NotFound,
        value: Value::Null,
        ts_ms: None,
    }
}

fn read_cell(cell: Cell, ttl_ms: Option<EpochMs>, now_ms: EpochMs) -> FeatureRead {
    let Some(ts) = cell.ts_ms() else {
        return FeatureRead {
            status: Status::NotFound,
            value: Value::Null,
            ts_ms: None,
        };
    };
    if ttl_ms.is_some_and(|ttl| now_ms.saturating_sub(ts) > ttl) {
        return FeatureRead {
            status: Status::OutsideMaxAge,
            value: Value::Null,
            ts_ms: Some(ts),
        };
    }
    match cell {
        Cell::Value { value, .. } => FeatureRead {
            status: Status::Present,
            value,
            ts_ms: Some(ts),
        },
        _ => FeatureRead {
            status: Status::NullValue,
            value: Value::Null,
            ts_ms: Some(ts),
        },
    }
}

/// Observations refused by the event-time rules while applying.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LateCounts {
    /// Feature values older than the stored value (LWW).
    pub values: u64,
    /// Aggregation observations beyond `allowed_lateness` or older than their ring.
    pub aggregations: u64,
}

/// One (partition, view)'s map, for inserting rows in bulk (snapshot load).
pub(crate) struct Inserter<'a>(&'a RowMap);

impl Inserter<'_> {
    pub(crate) fn insert(&self, key: &str, row: Row) {
        self.0.insert(key, row);
    }
}

pub struct Store {
    schema: Arc<Schema>,
    layouts: Vec<Layout>,
    /// Per view: the row of an entity never seen, read (never written) by the first event of
    /// each new entity of a view without aggregations instead of building one per insert.
    empty_rows: Vec<Row>,
    agg_layouts: Vec<Option<AggLayout>>,
    partitions: u32,
    /// `[partition][view]`
    maps: Vec<Vec<RowMap>>,
    /// Per log stream (`quiver_log::StreamId`): offset after the last record applied.
    applied: Vec<AtomicU64>,
    applied_changed: Vec<tokio::sync::Notify>,
    recovered: AtomicBool,
    /// Per partition: its materializer has caught up with the log as it was when it started
    /// (a cluster serves a partition only then).
    ready: Vec<AtomicBool>,
    /// Per partition: records between what is applied and the log's end as its reader last
    /// saw it (what `Quiver-Max-Lag` is checked against, without asking the log).
    lag: Vec<AtomicU64>,
}

/// What applying one record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Changed,
    /// Every value was older than the stored one.
    Late,
    Duplicate,
    /// The record names a view this config no longer has, or nothing of it still fits.
    Skipped,
    /// Replayed after an online snapshot whose row already holds it (see [`Store::apply_from`]).
    Covered,
}

impl Store {
    /// A store for a log with one stream per partition (the embedded log).
    pub fn new(schema: Arc<Schema>, partitions: u32) -> Store {
        Store::with_streams(schema, partitions, partitions)
    }

    /// A store for a log of `streams` streams over `partitions` partitions.
    pub fn with_streams(schema: Arc<Schema>, partitions: u32, streams: u32) -> Store {
        assert!(partitions > 0 && streams >= partitions);
        let layouts: Vec<Layout> = schema.views.iter().map(Layout::of).collect();
        let agg_layouts: Vec<_> = schema.views.iter().map(AggLayout::of).collect();
        // Rows of views without aggregations whose features are all numeric take slots.
        let slot_words: Vec<Option<usize>> = layouts
            .iter()
            .zip(&agg_layouts)
            .map(|(l, a)| l.dense_words().filter(|_| a.is_none()))
            .collect();
        let maps = (0..partitions)
            .map(|_| slot_words.iter().map(|&w| RowMap::new(w)).collect())
            .collect();
        Store {
            empty_rows: layouts.iter().map(Row::empty).collect(),
            agg_layouts,
            layouts,
            partitions,
            maps,
            applied: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            applied_changed: (0..streams).map(|_| tokio::sync::Notify::new()).collect(),
            recovered: AtomicBool::new(false),
            ready: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            lag: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            schema,
        }
    }

    pub fn schema(&self) -> &Arc<Schema> {
        &self.schema
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// How many log streams the applied offsets track.
    pub fn streams(&self) -> u32 {
        self.applied.len() as u32
    }

    /// Drops every row of `partition` (a snapshot that turned out not to belong to this log).
    pub(crate) fn clear_partition(&self, partition: u32) {
        for map in &self.maps[partition as usize] {
            map.clear();
        }
    }

    pub fn partition_of(&self, key: &str) -> u32 {
        partition_for(key.as_bytes(), self.partitions)
    }

    pub fn layout(&self, view: ViewId) -> &Layout {
        &self.layouts[usize::from(view)]
    }

    /// Reads columns `columns` of `key` in `view` as of `now_ms` into `out`, one entry per
    /// column in order. Columns are features, then aggregations (`View::column_index`).
    /// Returns the row's version, or `None` if the entity has no row.
    pub fn read(
        &self,
        view: ViewId,
        key: &str,
        columns: &[FeatureIdx],
        now_ms: EpochMs,
        out: &mut Vec<FeatureRead>,
    ) -> Option<u64> {
        let map = &self.maps[self.partition_of(key) as usize][usize::from(view)];
        let pinned = map.pin();
        let start = out.len();
        // Once, not by doubling as it fills (four growths a 32-column read: ~1.3k instructions).
        out.reserve(columns.len());
        let mut attempt = 0;
        let mut overlapped = 0;
        loop {
            out.truncate(start);
            let Some(row) = pinned.get(key) else {
                out.extend(columns.iter().map(|_| not_found()));
                return None;
            };
            // An in-place write under way, or one that overlapped the copy: read again.
            let read = row
                .read_begin()
                .map(|seen| (seen, self.read_columns(view, row, columns, now_ms, out)));
            let Some((seen, agg_version)) = read.filter(|(seen, _)| row.read_end(*seen)) else {
                if self.overlapped(&mut overlapped) {
                    continue;
                }
                out.truncate(start);
                out.extend(columns.iter().map(|_| not_found()));
                return None;
            };
            let version = Row::version_of(seen);
            // The materializer updates aggregations in place *before* it writes the row of
            // the same event: rings newer than the row mean that write is in flight, so read
            // again to see both at one version. (Bounded; only a writer updating this very
            // entity continuously for the whole time could exhaust it.)
            if agg_version <= version || attempt == READ_RETRIES_MAX {
                return Some(version);
            }
            attempt += 1;
            std::hint::spin_loop();
        }
    }

    /// Reads `columns` of `row` into `out` (not checked against concurrent writes: see
    /// [`Store::read`]). Returns the version of the aggregation state read (0 if none).
    fn read_columns(
        &self,
        view: ViewId,
        row: RowRef<'_>,
        columns: &[FeatureIdx],
        now_ms: EpochMs,
        out: &mut Vec<FeatureRead>,
    ) -> u64 {
        let v = self.schema.view(view);
        let layout = self.layout(view);
        let al = &self.agg_layouts[usize::from(view)];
        let mut agg_version = 0;
        for &c in columns {
            let read = match (v.aggregation_of_column(c), row.aggs(), al) {
                (None, _, _) => read_cell(row.get(layout, c), v.ttl_ms, now_ms),
                (Some(a), Some(cell), Some(al)) => {
                    let (value, newest, version) = cell.read(v, al, a, now_ms);
                    agg_version = agg_version.max(version);
                    let status = if value == Value::Null {
                        Status::NullValue
                    } else {
                        Status::Present
                    };
                    FeatureRead {
                        status,
                        value,
                        ts_ms: newest,
                    }
                }
                (Some(_), _, _) => not_found(),
            };
            out.push(read);
        }
        agg_version
    }

    /// Counts a read that an in-place write overlapped and waits before the next attempt.
    /// `false`: the row has been mid-write for all of [`seqlock::ATTEMPTS_MAX`] attempts,
    /// which only a materializer that died mid-write explains; the read reports no row
    /// rather than half of one.
    fn overlapped(&self, attempts: &mut usize) -> bool {
        *attempts += 1;
        if *attempts == seqlock::ATTEMPTS_MAX {
            tracing::error!("row stuck mid-write (did its materializer die?); reporting no row");
            return false;
        }
        seqlock::pause(*attempts);
        true
    }

    /// The version of a row (`None` if absent): what the prediction cache keys on.
    pub fn row_version(&self, view: ViewId, key: &str) -> Option<u64> {
        let map = &self.maps[self.partition_of(key) as usize][usize::from(view)];
        let pinned = map.pin();
        loop {
            // A row the writer moves to the side map between the look and the version is
            // looked up again (a moved slot's version means nothing).
            if let Some(version) = pinned.get(key)?.live_version() {
                return Some(version);
            }
        }
    }

    /// Applies one decoded record of `partition` at `offset`. Only that partition's
    /// materializer calls this, so each map has a single writer.
    pub fn apply(
        &self,
        partition: u32,
        offset: u64,
        rec: &Record<'_>,
        dedup: &mut DedupWindow,
        late: &mut LateCounts,
    ) -> Applied {
        self.apply_from(partition, offset, rec, dedup, late, 0)
    }

    /// [`Store::apply`] of a record replayed after an online snapshot loaded: below
    /// `covered_below` (the snapshot's end position in the record's stream) a row may already
    /// hold it — its version, the offset after its last change, says whether — and then the
    /// record only enters the dedup window, as it did when it was first applied.
    pub fn apply_from(
        &self,
        partition: u32,
        offset: u64,
        rec: &Record<'_>,
        dedup: &mut DedupWindow,
        late: &mut LateCounts,
        covered_below: u64,
    ) -> Applied {
        let Some(view_id) = self.schema.view_id(rec.view) else {
            return Applied::Skipped;
        };
        debug_assert_eq!(
            self.partition_of(rec.key),
            partition,
            "the log routes keys by murmur2"
        );
        let view = self.schema.view(view_id);
        let layout = self.layout(view_id);
        // Map names to this config's features; values that no longer fit (feature dropped or
        // retyped since the record was written) are left out.
        let mut values: Vec<(FeatureIdx, Value)> = Vec::with_capacity(rec.values.len());
        for (name, value) in &rec.values {
            let next = values.last().map_or(0, |(f, _)| usize::from(*f) + 1);
            if let Some(f) = view.feature_index_near(name, next) {
                if value.fits(layout.feature_type(f)) {
                    values.push((f, value.clone()));
                }
            }
        }
        if values.is_empty() {
            return Applied::Skipped;
        }
        // Records hold each feature once, usually in the view's order (the stable sort
        // allocates: check first).
        if !values.windows(2).all(|w| w[0].0 < w[1].0) {
            values.sort_by_key(|(f, _)| *f);
        }
        if let Some(id) = rec.dedup {
            if !dedup.insert(id) {
                return Applied::Duplicate;
            }
        }
        let map = &self.maps[partition as usize][usize::from(view_id)];
        let pinned = map.pin();
        pinned.help_copy();
        let stored = pinned.get(rec.key);
        if offset < covered_below && stored.is_some_and(|row| row.version() > offset) {
            return Applied::Covered;
        }
        let fresh;
        let base = match stored {
            Some(row) => row,
            None if self.agg_layouts[usize::from(view_id)].is_none() => {
                self.empty_rows[usize::from(view_id)].r()
            }
            None => {
                fresh = self.new_row(view_id);
                fresh.r()
            }
        };
        // Aggregations first, in place; then the row of the same version is written (the
        // order `Store::read` relies on to see both at one version).
        let aggs_changed = match (base.aggs(), &self.agg_layouts[usize::from(view_id)]) {
            (Some(cell), Some(al)) => {
                cell.apply(view, al, rec.ts_ms, offset, &values, &mut late.aggregations)
            }
            _ => false,
        };
        if stored.is_some() && base.overwrite_in_place(layout, rec.ts_ms, offset, &values) {
            return Applied::Changed;
        }
        let next = match base.apply(layout, rec.ts_ms, offset, &values, &mut late.values) {
            Some(row) => row,
            None if !aggs_changed => return Applied::Late,
            None if stored.is_some() => {
                base.set_version(offset + 1);
                return Applied::Changed;
            }
            None => base.with_version(offset + 1),
        };
        map.insert(rec.key, next);
        Applied::Changed
    }

    /// A row for an entity seen for the first time, with empty rings if the view aggregates.
    pub(crate) fn new_row(&self, view: ViewId) -> Row {
        let row = Row::empty(self.layout(view));
        match &self.agg_layouts[usize::from(view)] {
            Some(al) => row.with_aggs(Arc::new(AggCell::new(self.schema.view(view), al))),
            None => row,
        }
    }

    pub fn agg_layout(&self, view: ViewId) -> Option<&AggLayout> {
        self.agg_layouts[usize::from(view)].as_ref()
    }

    pub(crate) fn insert_row(&self, partition: u32, view: ViewId, key: &str, row: Row) {
        self.maps[partition as usize][usize::from(view)].insert(key, row);
    }

    /// Rows of every view in `partition`.
    pub fn rows_in(&self, partition: u32) -> usize {
        self.maps[partition as usize].iter().map(|m| m.len()).sum()
    }

    /// Rows of `view` in `partition`.
    pub(crate) fn partition_rows(&self, partition: u32, view: ViewId) -> usize {
        self.maps[partition as usize][usize::from(view)].len()
    }

    /// Makes room for `rows` more rows of `view` in `partition` (a snapshot about to load).
    pub(crate) fn reserve_rows(&self, partition: u32, view: ViewId, rows: usize) {
        self.maps[partition as usize][usize::from(view)].reserve(rows);
    }

    /// Inserts many rows of `view` in `partition` (snapshot load).
    pub(crate) fn inserter(&self, partition: u32, view: ViewId) -> Inserter<'_> {
        Inserter(&self.maps[partition as usize][usize::from(view)])
    }

    /// Finishes any resize under way of `partition`'s maps (a walk would help finish it; a
    /// snapshot does this before its thread lowers its priority).
    pub(crate) fn finish_resizes(&self, partition: u32) {
        for map in &self.maps[partition as usize] {
            map.finish_resizes();
        }
    }

    /// Calls `copy` with every row of `view` in `partition` as it stands now, while its
    /// materializer may be applying: `copy` returns false if a write overlapped it, and is
    /// called again with the key's current row (see [`RowMap::for_each_live`]). False if a
    /// row stayed mid-write for [`seqlock::ATTEMPTS_MAX`] attempts.
    pub(crate) fn for_each_live_row(
        &self,
        partition: u32,
        view: ViewId,
        copy: impl FnMut(&str, RowRef<'_>) -> bool,
    ) -> bool {
        self.maps[partition as usize][usize::from(view)]
            .for_each_live(copy, |attempts| self.overlapped(attempts))
    }

    #[cfg(test)]
    pub(crate) fn for_each_row(
        &self,
        partition: u32,
        view: ViewId,
        mut f: impl FnMut(&str, RowRef<'_>),
    ) {
        let map = &self.maps[partition as usize][usize::from(view)];
        map.for_each_live(
            |k, r| {
                f(k, r);
                true
            },
            |_| false,
        );
    }

    pub fn rows(&self) -> usize {
        self.maps.iter().flatten().map(|m| m.len()).sum()
    }

    /// Offset after the last record of `stream` applied.
    pub fn applied_offset(&self, stream: u32) -> u64 {
        self.applied[stream as usize].load(Ordering::Acquire)
    }

    pub(crate) fn set_applied(&self, stream: u32, offset: u64) {
        let prev = self.applied[stream as usize].swap(offset, Ordering::AcqRel);
        debug_assert!(prev <= offset, "applied offsets only move forward");
        self.applied_changed[stream as usize].notify_waiters();
    }

    /// Whether every partition has replayed the log as it was at start.
    pub fn is_recovered(&self) -> bool {
        self.recovered.load(Ordering::Acquire)
    }

    pub(crate) fn set_recovered(&self) {
        self.recovered.store(true, Ordering::Release);
    }

    /// Whether `partition` is materialized here and caught up.
    pub fn partition_ready(&self, partition: u32) -> bool {
        self.ready[partition as usize].load(Ordering::Acquire)
    }

    /// Records `partition`'s materializer is behind the log's end (as last seen).
    pub fn partition_lag(&self, partition: u32) -> u64 {
        self.lag[partition as usize].load(Ordering::Acquire)
    }

    pub(crate) fn set_partition_lag(&self, partition: u32, records: u64) {
        self.lag[partition as usize].store(records, Ordering::Release);
    }

    pub(crate) fn set_partition_ready(&self, partition: u32, ready: bool) {
        self.ready[partition as usize].store(ready, Ordering::Release);
    }

    /// Whether everything `token` names has been applied.
    pub fn has_applied(&self, token: &Token) -> bool {
        token
            .positions()
            .iter()
            .all(|&(s, o)| s < self.streams() && self.applied_offset(s) >= o)
    }

    /// Waits until everything `token` names is applied, at most `timeout`; false on timeout.
    /// A token naming a stream this store does not have is never satisfied.
    pub async fn wait_applied(&self, token: &Token, timeout: Duration) -> bool {
        if token.positions().iter().any(|&(s, _)| s >= self.streams()) {
            return false;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for &(p, o) in token.positions() {
            loop {
                let notified = self.applied_changed[p as usize].notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.applied_offset(p) >= o {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return self.applied_offset(p) >= o && self.has_applied(token);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use quiver_core::Config;

    fn store(ttl: Option<&str>) -> Store {
        let ttl = ttl.map(|t| format!("ttl = \"{t}\"\n")).unwrap_or_default();
        let text = format!(
            "[[entity]]\nname = \"u\"\nkey = \"id\"\n[[view]]\nname = \"v\"\nentity = \"u\"\n{ttl}features = [{{ name = \"x\", type = \"f64\" }}, {{ name = \"n\", type = \"i64\" }}]\n"
        );
        let schema =
            Schema::compile(&Config::from_toml_with_env(&text, Vec::new()).unwrap()).unwrap();
        Store::new(Arc::new(schema), 3)
    }

    fn put(s: &Store, key: &str, ts: i64, x: Option<f64>, offset: u64) {
        let rec = Record {
            ts_ms: ts,
            view: "v",
            key,
            event_id: None,
            dedup: None,
            values: vec![("x", x.map(Value::F64).unwrap_or(Value::Null))],
        };
        let mut dedup = DedupWindow::new(0);
        let mut late = LateCounts::default();
        s.apply(s.partition_of(key), offset, &rec, &mut dedup, &mut late);
    }

    fn record<'a>(key: &'a str, ts: i64, values: Vec<(&'a str, Value)>) -> Record<'a> {
        Record {
            ts_ms: ts,
            view: "v",
            key,
            event_id: None,
            dedup: None,
            values,
        }
    }

    /// The address of `key`'s row: unchanged by an in-place write, new after a swap.
    fn row_address(s: &Store, key: &str) -> Option<usize> {
        let map = &s.maps[s.partition_of(key) as usize][0];
        map.pin().get(key).map(RowRef::address)
    }

    /// A reader racing the writer of one row always sees one whole event: both features and
    /// the event time from the same record, and that record's version.
    #[test]
    fn a_reader_never_sees_half_of_an_in_place_overwrite() {
        const EVENTS: u64 = 300_000;
        let s = Arc::new(store(None));
        let key = "k";
        let p = s.partition_of(key);
        let event = |i: u64| {
            record(
                key,
                i as i64,
                vec![("x", Value::F64(i as f64)), ("n", Value::I64(i as i64))],
            )
        };
        let (mut dedup, mut late) = (DedupWindow::new(0), LateCounts::default());
        assert_eq!(
            s.apply(p, 0, &event(0), &mut dedup, &mut late),
            Applied::Changed
        );
        let first = row_address(&s, key);
        let writer = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let (mut dedup, mut late) = (DedupWindow::new(0), LateCounts::default());
                for i in 1..EVENTS {
                    assert_eq!(
                        s.apply(p, i, &event(i), &mut dedup, &mut late),
                        Applied::Changed
                    );
                }
            })
        };
        let mut versions = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        while !writer.is_finished() {
            out.clear();
            let version = s
                .read(0, key, &[0, 1], i64::MAX, &mut out)
                .expect("the row exists");
            let i = version - 1;
            assert_eq!(out[0].value, Value::F64(i as f64), "version {version}");
            assert_eq!(out[1].value, Value::I64(i as i64), "version {version}");
            assert_eq!(
                (out[0].ts_ms, out[1].ts_ms),
                (Some(i as i64), Some(i as i64))
            );
            versions.insert(version);
        }
        writer.join().unwrap();
        assert!(
            versions.len() > 10,
            "the reads raced the writer ({} versions seen)",
            versions.len()
        );
        assert_eq!(
            row_address(&s, key),
            first,
            "every update was written in place"
        );
        out.clear();
        assert_eq!(s.read(0, key, &[0, 1], i64::MAX, &mut out), Some(EVENTS));
    }

    proptest! {
        /// Whatever mix of whole, partial, null and late events arrives, the store (writing in
        /// place where it can) reads back exactly what copying every event into a new row
        /// gives, with the same version and late count; and a whole, timely event on a dense
        /// row never moves the row.
        #[test]
        fn in_place_writes_equal_copying(events in prop::collection::vec((0i64..20, 1u8..4, any::<bool>()), 1..40)) {
            let s = store(None);
            let layout = s.layout(0).clone();
            let (mut dedup, mut late) = (DedupWindow::new(0), LateCounts::default());
            let mut model = Row::empty(&layout);
            let mut model_late = 0;
            for (offset, &(ts, mask, null)) in events.iter().enumerate() {
                let offset = offset as u64;
                let x = if null { Value::Null } else { Value::F64(offset as f64) };
                let mut values = Vec::new();
                let mut model_values = Vec::new();
                if mask & 1 != 0 {
                    values.push(("x", x.clone()));
                    model_values.push((0, x));
                }
                if mask & 2 != 0 {
                    values.push(("n", Value::I64(offset as i64)));
                    model_values.push((1, Value::I64(offset as i64)));
                }
                let before = row_address(&s, "k");
                let whole = mask == 3 && !null;
                let dense_and_timely = before.is_some() && model.r().is_dense() && model.r().stamps()[0] as i64 <= ts;
                s.apply(s.partition_of("k"), offset, &record("k", ts, values), &mut dedup, &mut late);
                if let Some(next) = model.r().apply(&layout, ts, offset, &model_values, &mut model_late) {
                    model = next;
                }
                if whole && dense_and_timely {
                    prop_assert_eq!(row_address(&s, "k"), before, "written in place");
                }
                let mut out = Vec::new();
                let version = s.read(0, "k", &[0, 1], i64::MAX, &mut out);
                prop_assert_eq!(version, Some(model.r().version()));
                let expected: Vec<FeatureRead> = (0..2).map(|f| read_cell(model.r().get(&layout, f), None, i64::MAX)).collect();
                prop_assert_eq!(out, expected);
                prop_assert_eq!(late.values, model_late);
            }
        }

        /// TTL: a value is PRESENT iff `now - ts <= ttl`; past it the read is OUTSIDE_MAX_AGE
        /// with no value, whatever the value was (explicit nulls included); never-set features
        /// are NOT_FOUND; a view without a TTL never expires.
        #[test]
        fn ttl_rule(ts in 0i64..10_000_000, age in -1_000i64..10_000_000, ttl_s in 1i64..5_000, x in proptest::option::of(-1e9f64..1e9)) {
            let now = ts + age;
            let s = store(Some(&format!("{ttl_s}s")));
            put(&s, "k", ts, x, 0);
            let mut out = Vec::new();
            let version = s.read(0, "k", &[0, 1], now, &mut out);
            prop_assert_eq!(version, Some(1));
            let fresh = now - ts <= ttl_s * 1000;
            let expected = match (fresh, x) {
                (false, _) => FeatureRead { status: Status::OutsideMaxAge, value: Value::Null, ts_ms: Some(ts) },
                (true, Some(x)) => FeatureRead { status: Status::Present, value: Value::F64(x), ts_ms: Some(ts) },
                (true, None) => FeatureRead { status: Status::NullValue, value: Value::Null, ts_ms: Some(ts) },
            };
            prop_assert_eq!(&out[0], &expected);
            prop_assert_eq!(out[1].status, Status::NotFound);

            let forever = store(None);
            put(&forever, "k", ts, Some(1.0), 0);
            out.clear();
            forever.read(0, "k", &[0], now, &mut out);
            prop_assert_eq!(out[0].status, Status::Present);
        }
    }
}
