//! Feature rows served by other nodes of a cluster, fetched for one request: a predict whose
//! model reads entities living on different nodes, or a batch read naming several entity
//! columns, gathers the rows this node does not serve from their owners first, then runs as
//! on one node. The transport is the surface crate's ([`RemoteRows`]); this module decides
//! what to fetch from whom.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use quiver_cluster::Route;
use quiver_core::config::ClusterNode;
use quiver_core::schema::{FeatureIdx, ViewId};
use quiver_core::token::Token;
use quiver_store::FeatureRead;

use crate::cluster::Placement;
use crate::error::Result;
use crate::Node;

pub type RowsFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Vec<FeatureRead>>>> + Send + 'a>>;

/// Reads rows on other nodes (implemented over HTTP by the surface crate).
pub trait RemoteRows: Send + Sync {
    /// Every column of `view` (in column order) for each of `keys`, read now by the first of
    /// `candidates` that answers — once it has applied what `after` names, if given.
    fn fetch<'a>(
        &'a self,
        candidates: &'a [ClusterNode],
        view: ViewId,
        keys: &'a [String],
        after: Option<&'a Token>,
    ) -> RowsFuture<'a>;
}

/// Rows fetched from other nodes for one request: every column of each (view, key).
#[derive(Default)]
pub struct Prefetched {
    /// view → key → every column. Nested so that a lookup by `&str` allocates nothing (the
    /// store's read path asks on every read, and on a single node the map is empty).
    rows: HashMap<ViewId, HashMap<String, Vec<FeatureRead>>>,
}

impl Prefetched {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Appends `columns` of (`view`, `key`) to `out` if the row was fetched; false if not.
    pub fn read(
        &self,
        view: ViewId,
        key: &str,
        columns: &[FeatureIdx],
        out: &mut Vec<FeatureRead>,
    ) -> bool {
        let Some(row) = self.rows.get(&view).and_then(|keys| keys.get(key)) else {
            return false;
        };
        out.extend(columns.iter().map(|&c| row[usize::from(c)].clone()));
        true
    }

    pub fn contains(&self, view: ViewId, key: &str) -> bool {
        self.rows
            .get(&view)
            .is_some_and(|keys| keys.contains_key(key))
    }
}

impl Node {
    /// Installs the transport for rows served elsewhere (the surface crate does, at start).
    pub fn set_remote_rows(&self, remote: Arc<dyn RemoteRows>) {
        let _ = self.remote.set(remote);
    }

    /// Fetches from their owners the rows of `pairs` (view, key) whose partition this node
    /// does not serve: one request per (view, owner), all at once, each read after the
    /// caller's token (`Quiver-Read-After`). Empty on a single node.
    pub async fn prefetch<'k>(
        &self,
        pairs: impl IntoIterator<Item = (ViewId, &'k str)>,
        after: Option<&Token>,
    ) -> Result<Prefetched> {
        let (Some(_), Some(remote)) = (&self.cluster, self.remote.get()) else {
            return Ok(Prefetched::default());
        };
        // (view, first candidate) → (candidates, keys)
        let mut groups: HashMap<(ViewId, String), (Vec<ClusterNode>, Vec<String>)> = HashMap::new();
        let mut routes: HashMap<u32, Route> = HashMap::new();
        for (view, key) in pairs {
            let p = self.store.partition_of(key);
            if self.serves(p, None) {
                continue;
            }
            let route = match routes.get(&p) {
                Some(r) => r.clone(),
                None => {
                    let r = self.route(p, Placement::default())?;
                    routes.insert(p, r.clone());
                    r
                }
            };
            let Route::Forward(candidates) = route else {
                continue;
            };
            let g = groups
                .entry((view, candidates[0].id.clone()))
                .or_insert_with(|| (candidates, Vec::new()));
            if !g.1.iter().any(|k| k == key) {
                g.1.push(key.to_string());
            }
        }
        let calls = groups
            .iter()
            .map(|((view, _), (candidates, keys))| remote.fetch(candidates, *view, keys, after));
        let fetched = futures_util::future::join_all(calls).await;
        let mut out = Prefetched::default();
        for (((view, _), (_, keys)), rows) in groups.iter().zip(fetched) {
            let rows = rows?;
            assert_eq!(rows.len(), keys.len(), "one row per key");
            for (k, row) in keys.iter().zip(rows) {
                out.rows.entry(*view).or_default().insert(k.clone(), row);
            }
        }
        Ok(out)
    }
}
