//! Feature reads on plain types: one entity's every column, a batch of entity rows × feature
//! references (Feast's get-online-features, online or point in time), read-your-writes
//! waits. Online reads touch only memory.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use quiver_core::schema::{FeatureIdx, View, ViewId};
use quiver_core::telemetry as t;
use quiver_core::time::now_ms;
use quiver_core::token::Token;
use quiver_store::pit::Semantics;
use quiver_store::{FeatureRead, Status};

use crate::error::{Code, Result, ServingError};
use crate::remote::Prefetched;
use crate::Node;

/// Waits (bounded by `server.read_after_wait_ms_max`) until the materializer has applied
/// every position `token` names.
pub async fn read_after(node: &Node, token: &Token) -> Result<()> {
    let local;
    let token = if node.cluster.is_some() {
        local = node.local_token(token);
        &local
    } else {
        token
    };
    if node.store.has_applied(token) {
        return Ok(());
    }
    let wait = Duration::from_millis(node.config.server.read_after_wait_ms_max);
    let started = Instant::now();
    let ok = node.store.wait_applied(token, wait).await;
    metrics::histogram!(t::READ_AFTER_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
    if ok {
        Ok(())
    } else {
        Err(ServingError::new(
            Code::ReadAfterTimeout,
            format!(
                "the token's writes were not applied within {} ms",
                wait.as_millis()
            ),
        )
        .detail("token", token.to_string()))
    }
}

/// One entity's every column (features, then aggregations), read now.
pub struct EntityRead<'a> {
    pub view: &'a View,
    pub version: u64,
    pub columns: Vec<FeatureIdx>,
    pub reads: Vec<FeatureRead>,
}

pub fn read_entity<'a>(node: &'a Node, view: &str, key: &str) -> Result<EntityRead<'a>> {
    let Some(v) = node.schema.view_by_name(view) else {
        return Err(
            ServingError::new(Code::UnknownView, format!("no view {view:?}")).detail("view", view),
        );
    };
    let columns: Vec<FeatureIdx> = (0..v.columns() as FeatureIdx).collect();
    let mut reads = Vec::with_capacity(columns.len());
    let Some(version) = node.store.read(v.id, key, &columns, now_ms(), &mut reads) else {
        return Err(ServingError::new(
            Code::EntityNotFound,
            format!("view {view:?} has no entity {key:?}"),
        )
        .detail("view", view)
        .detail("key", key));
    };
    Ok(EntityRead {
        view: v,
        version,
        columns,
        reads,
    })
}

/// A feature reference resolved: its view, column and the name the reply gives it.
#[derive(Clone, Debug)]
pub struct FeatureRef {
    pub view: ViewId,
    pub column: FeatureIdx,
    pub name: String,
}

/// The features of `[[feature_service]] name`.
pub fn service_features<'a>(node: &'a Node, name: &str) -> Result<&'a [String]> {
    node.config
        .feature_services
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.features.as_slice())
        .ok_or_else(|| {
            ServingError::new(
                Code::UnknownFeatureService,
                format!("no feature service {name:?}"),
            )
            .detail("feature_service", name)
        })
}

/// `view:feature` names → references, every one resolved first: an unknown one fails the
/// request, as in Feast. `full` names a column `view__feature` (Feast's full feature names).
pub fn resolve(node: &Node, names: &[String], full: bool) -> Result<Vec<FeatureRef>> {
    if names.is_empty() {
        return Err(ServingError::bad_request(
            "features must name at least one view:feature",
        ));
    }
    let schema = &node.schema;
    let mut refs = Vec::with_capacity(names.len());
    for name in names {
        let resolved = name.split_once(':').and_then(|(view, feature)| {
            let v = schema.view_by_name(view)?;
            Some((v.id, v.column_index(feature)?))
        });
        let Some((view, column)) = resolved else {
            return Err(ServingError::new(
                Code::UnknownFeature,
                format!("no feature {name:?} (expected view:feature)"),
            )
            .detail("feature", name.as_str()));
        };
        let v = schema.view(view);
        let name = if full {
            format!("{}__{}", v.name, v.column_name(column))
        } else {
            v.column_name(column).to_string()
        };
        refs.push(FeatureRef { view, column, name });
    }
    Ok(refs)
}

/// One entity column of a batch read: its name (`user_id`) and a key per row (`None` where
/// the request's value cannot be a key: that row reads as `NOT_FOUND`).
pub struct EntityColumn {
    pub name: String,
    pub keys: Vec<Option<String>>,
}

/// A point-in-time batch read: one instant (epoch ms) per row, and the semantics.
pub struct AsOf {
    pub instants: Vec<i64>,
    pub semantics: Semantics,
}

/// A batch read's answer: one read per (reference, row), in one buffer (a request reads
/// hundreds of cells; a vector per reference cost an allocation each on the hot path).
pub struct BatchReads {
    pub rows: usize,
    /// Grouped by view, then row, then the view's references in request order.
    cells: Vec<FeatureRead>,
    /// Per reference: (its view's first cell, the view's references per row, its place).
    at: Vec<(usize, usize, usize)>,
}

impl BatchReads {
    /// The read of reference `i` for entity row `row`.
    pub fn get(&self, i: usize, row: usize) -> &FeatureRead {
        debug_assert!(row < self.rows);
        let (base, width, k) = self.at[i];
        &self.cells[base + row * width + k]
    }

    pub fn references(&self) -> usize {
        self.at.len()
    }
}

/// Reads `refs` for every row of `entities` (all columns of one length): now from the store,
/// or as of each row's instant.
pub fn read_batch(
    node: &Node,
    refs: &[FeatureRef],
    entities: &[EntityColumn],
    as_of: Option<&AsOf>,
    pre: &Prefetched,
) -> Result<BatchReads> {
    let schema = &node.schema;
    let rows = entities.first().map_or(0, |c| c.keys.len());
    assert!(
        entities.iter().all(|c| c.keys.len() == rows),
        "entity columns of one length"
    );
    let max = node.config.server.read_entities_max;
    if rows > max {
        return Err(ServingError::new(
            Code::TooManyEntities,
            format!("at most {max} entity rows per request (server.read_entities_max)"),
        ));
    }
    if let Some(a) = as_of {
        if a.instants.len() != rows {
            return Err(ServingError::bad_request(format!(
                "{} timestamps for {rows} entity rows",
                a.instants.len()
            )));
        }
    }
    let key_col_of_view = key_columns(node, refs, entities)?;
    let now = now_ms();
    let mut out = BatchReads {
        rows,
        cells: Vec::with_capacity(refs.len() * rows),
        at: vec![(0, 0, 0); refs.len()],
    };
    let mut features: Vec<FeatureIdx> = Vec::with_capacity(refs.len());
    for view in 0..schema.views.len() {
        // One store read per (view, row), shared by that view's references.
        features.clear();
        let base = out.cells.len();
        for (i, r) in refs.iter().enumerate() {
            if usize::from(r.view) == view {
                out.at[i] = (base, 0, features.len());
                features.push(r.column);
            }
        }
        if features.is_empty() {
            continue;
        }
        for (i, r) in refs.iter().enumerate() {
            if usize::from(r.view) == view {
                out.at[i].1 = features.len();
            }
        }
        let keys = &entities[key_col_of_view[view].expect("resolved above")].keys;
        let mut historical = match as_of {
            Some(a) => Some(read_historical(
                node,
                view as ViewId,
                &features,
                keys,
                &a.instants,
                a.semantics,
            )?),
            None => None,
        };
        for (row, key) in keys.iter().enumerate() {
            match (key, &mut historical) {
                (Some(_), Some(h)) => out.cells.append(&mut h[row]),
                (Some(k), None) => {
                    if !pre.read(view as ViewId, k, &features, &mut out.cells) {
                        node.store
                            .read(view as ViewId, k, &features, now, &mut out.cells);
                    }
                }
                (None, _) => out.cells.extend(features.iter().map(|_| FeatureRead {
                    status: Status::NotFound,
                    value: quiver_core::value::Value::Null,
                    ts_ms: None,
                })),
            }
            assert_eq!(
                out.cells.len(),
                base + (row + 1) * features.len(),
                "one read per feature and row"
            );
        }
    }
    Ok(out)
}

/// In a cluster: the rows a batch read needs from partitions this node does not serve,
/// fetched from their owners (none on a single node).
pub async fn prefetch_batch(
    node: &Node,
    refs: &[FeatureRef],
    entities: &[EntityColumn],
    after: Option<&Token>,
) -> Result<Prefetched> {
    if node.cluster.is_none() {
        return Ok(Prefetched::default());
    }
    let key_col_of_view = key_columns(node, refs, entities)?;
    // Collected before the await: the future holds no iterator closures (it must be Send).
    let mut pairs: Vec<(ViewId, &str)> = Vec::new();
    for (view, col) in key_col_of_view.iter().enumerate() {
        let Some(col) = col else { continue };
        for key in entities[*col].keys.iter().flatten() {
            pairs.push((view as ViewId, key.as_str()));
        }
    }
    node.prefetch(pairs, after).await
}

/// Which entity column keys each requested view (indexed by view id).
fn key_columns(
    node: &Node,
    refs: &[FeatureRef],
    entities: &[EntityColumn],
) -> Result<Vec<Option<usize>>> {
    let schema = &node.schema;
    let mut out: Vec<Option<usize>> = vec![None; schema.views.len()];
    for r in refs {
        let v = schema.view(r.view);
        let key = &schema.entity_of(v).key;
        let Some(i) = entities.iter().position(|c| c.name == *key) else {
            return Err(ServingError::new(
                Code::MissingEntity,
                format!("entities must include {key:?} for view {:?}", v.name),
            )
            .detail("entity_key", key.as_str()));
        };
        out[usize::from(r.view)] = Some(i);
    }
    Ok(out)
}

/// Point-in-time reads for every row of one view: records from PostgreSQL below the history
/// sink's committed offsets and from the log above them (or the log alone), replayed per
/// entity. Blocking (disk and PostgreSQL): call it off the async workers.
fn read_historical(
    node: &Node,
    view: ViewId,
    features: &[FeatureIdx],
    keys: &[Option<String>],
    instants: &[i64],
    semantics: Semantics,
) -> Result<Vec<Vec<FeatureRead>>> {
    let started = Instant::now();
    let wanted: HashSet<String> = keys.iter().flatten().cloned().collect();
    let history = collect_history(node, &node.schema.view(view).name, &wanted)?;
    let mut out: Vec<Vec<FeatureRead>> = vec![Vec::new(); keys.len()];
    let mut rows_of: HashMap<&str, Vec<(usize, i64)>> = HashMap::new();
    for (row, key) in keys.iter().enumerate() {
        if let Some(k) = key {
            rows_of
                .entry(k.as_str())
                .or_default()
                .push((row, instants[row]));
        }
    }
    let collected = started.elapsed();
    let mut replay = quiver_store::pit::Replay::new(&node.schema);
    for (key, rows) in rows_of {
        let records = history.get(key).map(Vec::as_slice).unwrap_or(&[]);
        for (row, reads) in replay.read(view, key, records, &rows, features, semantics) {
            out[row] = reads;
        }
    }
    tracing::debug!(
        rows = keys.len(),
        records = history.values().map(Vec::len).sum::<usize>(),
        collect_ms = collected.as_secs_f64() * 1e3,
        replay_ms = (started.elapsed() - collected).as_secs_f64() * 1e3,
        "point-in-time read"
    );
    Ok(out)
}

type History = HashMap<String, Vec<quiver_store::pit::HistoryRecord>>;

/// Every record of `wanted`'s entities in `view`, by key, in offset order.
fn collect_history(node: &Node, view_name: &str, wanted: &HashSet<String>) -> Result<History> {
    let unavailable = |e: String| ServingError::new(Code::HistoryUnavailable, e);
    let log = node.log.as_ref();
    let (Some(sink), Some(reader)) = (&node.history, &node.history_reader) else {
        return quiver_store::pit::collect_from_log(log, view_name, wanted, &|_| 0)
            .map_err(|e| unavailable(e.to_string()));
    };
    // PostgreSQL holds every record below the sink's committed offsets (read first); the log
    // supplies the rest. Records present in both are merged by offset. A view's records all
    // come from streams of one log id (the embedded log, or the view's Kafka topic).
    let streams = log.view_streams(view_name);
    let Some(&first) = streams.first() else {
        return Ok(History::new());
    };
    let log_id = log.streams()[first as usize].log_id.clone();
    let keys: Vec<String> = wanted.iter().cloned().collect();
    let pg = reader
        .collect(&log_id, &node.schema, view_name, &keys)
        .map_err(|e| unavailable(format!("PostgreSQL history: {e}")))?;
    let mut merged =
        quiver_store::pit::collect_from_log(log, view_name, wanted, &|s| sink.committed_offset(s))
            .map_err(|e| unavailable(e.to_string()))?;
    if merged.is_empty() {
        return Ok(pg);
    }
    for (key, rows) in pg {
        let records = merged.entry(key).or_default();
        records.extend(rows);
        records.sort_by_key(|r| r.offset);
        records.dedup_by_key(|r| r.offset);
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[server]
data_dir = "DIR"
[log]
partitions = 2
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "a"
entity = "user"
features = [{ name = "x", type = "f64" }, { name = "z", type = "i64" }]
[[view]]
name = "b"
entity = "user"
features = [{ name = "y", type = "string" }]
"#;

    fn node(dir: &std::path::Path) -> Node {
        let text = CONFIG.replace("DIR", &dir.display().to_string());
        let config =
            quiver_core::Config::from_toml_with_env(&text, Vec::<(String, String)>::new()).unwrap();
        Node::open(config).unwrap()
    }

    #[test]
    fn batch_reads_put_every_reference_of_interleaved_views_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let body = br#"[{"view":"a","key":"u1","values":{"x":1.5,"z":7}},
                        {"view":"b","key":"u1","values":{"y":"one"}},
                        {"view":"a","key":"u2","values":{"x":2.5,"z":8}}]"#;
        let prepared = crate::ingest::prepare_json(&node, body, None).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let done = rt.block_on(async {
            let done = crate::ingest::append(&node, prepared, quiver_log::Ack::Durable).await;
            let done = done.unwrap();
            read_after(&node, &done.token).await.unwrap();
            done
        });
        assert_eq!(done.accepted, 3);
        let names: Vec<String> = ["a:z", "b:y", "a:x"].map(String::from).to_vec();
        let refs = resolve(&node, &names, false).unwrap();
        let entities = [EntityColumn {
            name: "user_id".into(),
            keys: vec![Some("u2".into()), None, Some("u1".into())],
        }];
        let none = Prefetched::default();
        let reads = read_batch(&node, &refs, &entities, None, &none).unwrap();
        let cell = |i, row| {
            let r = reads.get(i, row);
            (r.status, r.value.clone())
        };
        use quiver_core::value::Value as V;
        assert_eq!(cell(0, 0), (Status::Present, V::I64(8)));
        assert_eq!(cell(1, 0), (Status::NotFound, V::Null), "u2 has no b row");
        assert_eq!(cell(2, 0), (Status::Present, V::F64(2.5)));
        for i in 0..3 {
            assert_eq!(cell(i, 1), (Status::NotFound, V::Null), "no key, no read");
        }
        assert_eq!(cell(0, 2), (Status::Present, V::I64(7)));
        assert_eq!(cell(1, 2), (Status::Present, V::Str("one".into())));
        assert_eq!(cell(2, 2), (Status::Present, V::F64(1.5)));
        node.shutdown();
    }
}
