//! Feature reads over HTTP: `GET /v1/features/{view}/{key}`, Feast's get-online-features shape
//! at `POST /v1/features` and `POST /get-online-features`, and `POST /v1/features/historical`.
//! Parsing and the JSON replies live here; the reads are `quiver_serving::features`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use quiver_auth::{Identity, Role};
use quiver_core::time::{now_ms, EpochMs};
use quiver_core::token::Token;
use quiver_serving::features::{self, AsOf, BatchReads, EntityColumn, FeatureRef};
use quiver_serving::remote::Prefetched;
use quiver_store::pit::Semantics;
use quiver_store::Status;
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use crate::error::ApiError;
use crate::json_out::{ColumnKeys, JsonBuf};
use crate::AppState;

pub const READ_AFTER: &str = "quiver-read-after";
/// Feast's timestamp for values it has none for.
pub(crate) const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Honours `Quiver-Read-After: <token>`: waits (bounded) until the materializer has applied
/// every position the token names (in a cluster: of the partitions served here). Returns the
/// token, for rows read on other nodes.
pub async fn read_after(state: &AppState, headers: &HeaderMap) -> Result<Option<Token>, ApiError> {
    let Some(raw) = headers.get(READ_AFTER) else {
        return Ok(None);
    };
    let token = raw
        .to_str()
        .ok()
        .and_then(|s| Token::parse(s).ok())
        .ok_or_else(|| {
            ApiError::bad_request(
                "BAD_TOKEN",
                "Quiver-Read-After is not a token from /v1/events",
            )
        })?;
    features::read_after(&state.node, &token).await?;
    Ok(Some(token))
}

pub async fn get_entity(
    State(state): State<Arc<AppState>>,
    Path((view, key)): Path<(String, String)>,
    // The request itself, to borrow its URI and headers (the `Uri` and `HeaderMap`
    // extractors clone them: an allocation per header on the hottest read).
    req: axum::extract::Request,
) -> Response {
    get_entity_of(&state, &view, &key, req.uri(), req.headers()).await
}

/// `GET /v1/features/{view}/{key}` once routed and admitted: by the router ([`get_entity`]) or
/// beside it (`crate::direct`).
pub(crate) async fn get_entity_of(
    state: &AppState,
    view: &str,
    key: &str,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
) -> Response {
    let started = Instant::now();
    if state.peers.is_some() {
        let p = state.node.store.partition_of(key);
        let path = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        let forwarded = crate::cluster::forward_if_remote(
            state,
            p,
            axum::http::Method::GET,
            path,
            headers,
            bytes::Bytes::new(),
        )
        .await;
        match forwarded {
            Ok(None) => {}
            Ok(Some(r)) => return r,
            Err(e) => return e.into_response(),
        }
    }
    let result = get_entity_inner(state, view, key, headers).await;
    state
        .lookup_seconds
        .single
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn get_entity_inner(
    state: &AppState,
    view: &str,
    key: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    read_after(state, headers).await?;
    let read = features::read_entity(&state.node, view, key)?;
    let body = entity_json(&state.column_keys, &read, key, now_ms());
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A single-entity GET's reply.
fn entity_json(
    keys: &ColumnKeys,
    read: &features::EntityRead<'_>,
    key: &str,
    now: EpochMs,
) -> Vec<u8> {
    let features::EntityRead {
        view: v,
        version,
        columns: features,
        reads,
    } = read;
    // A feature takes ~105–125 bytes (name, value, status, RFC 3339 time, age): sized so the
    // buffer is not grown and copied mid-response (callgrind: one realloc per GET at 96).
    let mut j = JsonBuf::with_capacity(64 + v.name.len() + key.len() + 128 * features.len());
    j.raw("{\"view\":").str(&v.name).raw(",\"key\":").str(key);
    j.raw(",\"version\":").u64(*version).raw(",\"features\":{");
    // What follows a value depends only on its status and time, which the features of one
    // event share: written once per run of equal ones and copied whole.
    let mut tail = JsonBuf::with_capacity(96);
    let mut tail_of = None;
    for (i, (&f, r)) in features.iter().zip(reads).enumerate() {
        j.bytes(keys.get(v.id, f, i == 0)).value(&r.value);
        if tail_of != Some((r.status, r.ts_ms)) {
            tail_of = Some((r.status, r.ts_ms));
            tail.buf.clear();
            tail.raw(",\"status\":\"").raw(r.status.as_str()).raw("\"");
            if let Some(ts) = r.ts_ms {
                tail.raw(",\"event_timestamp\":").timestamp(ts);
                tail.raw(",\"age_ms\":").i64(now.saturating_sub(ts).max(0));
            }
            tail.raw("}");
        }
        j.bytes(&tail.buf);
    }
    j.raw("}}");
    j.buf
}

/// Declares the batch read's body twice from one field list: `OnlineRequest` (Feast's route,
/// unknown fields ignored) and `StrictOnlineRequest` (the `/v1` routes, unknown fields
/// refused), so each route parses its body once.
macro_rules! online_request {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// The batch read's body: Feast's get-online-features request, plus `timestamps` and
        /// `semantics` for point in time. `/get-online-features` ignores unknown fields, as
        /// Feast's own server does (Feast's clients add fields from release to release).
        #[derive(Deserialize)]
        struct OnlineRequest {
            $(#[serde(default)] $field: $ty,)*
            entities: Map<String, Json_>,
        }

        /// [`OnlineRequest`] for `/v1/features` and `/v1/features/historical`: a field it does
        /// not know is a typo, and an error.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct StrictOnlineRequest {
            $(#[serde(default)] $field: $ty,)*
            entities: Map<String, Json_>,
            /// Feast's; Quiver reads nothing from it, but accepts it on every route.
            #[serde(default)]
            #[allow(dead_code)]
            include_feature_view_version_metadata: Option<serde::de::IgnoredAny>,
        }

        impl From<StrictOnlineRequest> for OnlineRequest {
            fn from(r: StrictOnlineRequest) -> OnlineRequest {
                OnlineRequest { $($field: r.$field,)* entities: r.entities }
            }
        }
    };
}

online_request! {
    // Kept raw: resolved once per distinct list (see [`Resolved`]), not parsed per request.
    features: Option<Box<serde_json::value::RawValue>>,
    // A `[[feature_service]]` name: its features, when `features` is absent.
    feature_service: Option<String>,
    full_feature_names: bool,
    // Only for `/v1/features/historical`: one instant per entity row (epoch ms or RFC 3339).
    timestamps: Option<Vec<Json_>>,
    // Only for `/v1/features/historical`: `event_time` (default) or `as_served`.
    semantics: Option<String>,
}

fn parse_online_request(bytes: &[u8], strict: bool) -> Result<OnlineRequest, ApiError> {
    let bad = |e: serde_json::Error| {
        ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}"))
    };
    if strict {
        serde_json::from_slice::<StrictOnlineRequest>(bytes)
            .map(OnlineRequest::from)
            .map_err(bad)
    } else {
        serde_json::from_slice(bytes).map_err(bad)
    }
}

/// A request's feature references, resolved: one `(view, column, reply name)` per feature,
/// in request order. Feast clients send the same list with every request, so resolutions are
/// cached by the list's text (and the naming flag): the hot path parses and looks up no
/// feature name.
pub struct Resolved {
    refs: Vec<FeatureRef>,
}

/// Distinct feature lists remembered (a bounded cache: an unbounded variety of lists only
/// costs a resolution each).
pub const RESOLVED_CACHE_ENTRIES: usize = 1024;

pub type ResolvedCache = quick_cache::sync::Cache<u128, Arc<Resolved>>;

/// The references a request names: its `features`, or its feature service's.
fn resolve(state: &AppState, req: &OnlineRequest) -> Result<Arc<Resolved>, ApiError> {
    let features = req
        .features
        .as_ref()
        .map(|r| r.get())
        .filter(|r| *r != "[]");
    let (tag, text) = match (&req.feature_service, features) {
        (None, None) => {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "features must name at least one view:feature (or feature_service a service)",
            ))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "give features or feature_service, not both",
            ))
        }
        (None, Some(raw)) => (b'f', raw),
        (Some(name), None) => (b's', name.as_str()),
    };
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&[tag, u8::from(req.full_feature_names)]);
    hasher.update(text.as_bytes());
    let key = hasher.digest128();
    if let Some(hit) = state.resolved.get(&key) {
        return Ok(hit);
    }
    let names: Vec<String> = match &req.feature_service {
        None => serde_json::from_str(text).map_err(|e| {
            ApiError::bad_request("BAD_REQUEST", format!("invalid request: features: {e}"))
        })?,
        Some(name) => features::service_features(&state.node, name)?.to_vec(),
    };
    let refs = features::resolve(&state.node, &names, req.full_feature_names)?;
    let resolved = Arc::new(Resolved { refs });
    state.resolved.insert(key, resolved.clone());
    Ok(resolved)
}

/// How a batch read reads: the online store now (strict or Feast's lenient parsing), or
/// point-in-time per row.
pub(crate) enum Mode {
    Online,
    Feast,
    Historical,
}

/// `POST /v1/features`: the strict batch read. Takes the request itself, to borrow its
/// headers and identity (the extractors clone them).
pub async fn post_features(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
) -> Response {
    online_read_of(&state, req, Mode::Online).await
}

/// `POST /get-online-features`: Feast's route, which ignores fields it does not know.
pub async fn get_online_features(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
) -> Response {
    online_read_of(&state, req, Mode::Feast).await
}

/// `POST /v1/features` and `/get-online-features` once routed and admitted: by the router or
/// beside it (`crate::direct`).
pub(crate) async fn online_read_of<B>(
    state: &AppState,
    req: axum::http::Request<B>,
    mode: Mode,
) -> Response
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let identity = parts.extensions.get::<Identity>();
    let result = post_features_inner(state, identity, &parts.headers, Body::new(body), mode).await;
    state
        .lookup_seconds
        .batch
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/features/historical`: the Feast request plus `timestamps`, one per entity row,
/// and `semantics`: each value as of that instant by event time (Feast's point-in-time join,
/// the default) or as the online store served it then (`as_served`; see `quiver_store::pit`).
pub async fn post_historical(
    State(state): State<Arc<AppState>>,
    identity: Option<Extension<Identity>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = identity.map(|Extension(i)| i);
    match post_features_inner(&state, identity.as_ref(), &headers, body, Mode::Historical).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn post_features_inner(
    state: &AppState,
    identity: Option<&Identity>,
    headers: &HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<Response, ApiError> {
    let bytes =
        crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max).await?;
    let req = parse_online_request(&bytes, !matches!(mode, Mode::Feast))?;
    let resolved = resolve(state, &req)?;
    if identity.is_some() {
        let schema = &state.node.schema;
        let views = resolved
            .refs
            .iter()
            .map(|r| schema.view(r.view).name.as_str());
        crate::security::require(identity, Role::Reader, views)?;
    }
    let after = read_after(state, headers).await?;
    let (columns, raw) = entity_columns(&req.entities)?;
    let rows = columns.first().map_or(0, |c| c.keys.len());
    if let (Some(_), Some(first), false) = (
        &state.peers,
        columns.first(),
        matches!(mode, Mode::Historical),
    ) {
        // Rows are placed by their first entity column's key.
        let at = crate::cluster::placement(headers)?;
        let plan = crate::cluster::plan_rows(state, first.keys.iter().map(|k| k.as_deref()), at)?;
        if !plan.remote.is_empty() {
            let split = SplitRead {
                refs: &resolved.refs,
                columns: &columns,
                raw: &raw,
                mode,
                after: after.as_ref(),
            };
            return split.run(state, &bytes, headers, plan).await;
        }
    }
    let as_of = as_of(&req, matches!(mode, Mode::Historical), rows)?;
    let reads = match &as_of {
        // Point in time reads the log (and maybe PostgreSQL) synchronously: `block_in_place`
        // moves this worker's other tasks away meanwhile (the server runs a multi-thread
        // runtime).
        Some(a) => tokio::task::block_in_place(|| {
            let none = Prefetched::default();
            features::read_batch(&state.node, &resolved.refs, &columns, Some(a), &none)
        })?,
        None => {
            let refs = &resolved.refs;
            let pre = features::prefetch_batch(&state.node, refs, &columns, after.as_ref()).await?;
            features::read_batch(&state.node, &resolved.refs, &columns, None, &pre)?
        }
    };
    let entity_columns: Vec<(&str, &[Json_])> = columns
        .iter()
        .zip(&raw)
        .map(|(c, raw)| (c.name.as_str(), raw.as_slice()))
        .collect();
    let reply = feast_reply(&entity_columns, &resolved.refs, &reads);
    Ok(([(header::CONTENT_TYPE, "application/json")], reply).into_response())
}

/// A batch read whose rows are served by several nodes: the peers' shares are fetched at
/// once, this node's share read here, and the answers merged in request order.
struct SplitRead<'a> {
    refs: &'a [FeatureRef],
    columns: &'a [EntityColumn],
    raw: &'a [&'a Vec<Json_>],
    mode: Mode,
    after: Option<&'a Token>,
}

impl SplitRead<'_> {
    async fn run(
        self,
        state: &AppState,
        bytes: &[u8],
        headers: &HeaderMap,
        plan: crate::cluster::Plan,
    ) -> Result<Response, ApiError> {
        let rows = self.columns.first().map_or(0, |c| c.keys.len());
        let body: Json_ = serde_json::from_slice(bytes)
            .map_err(|e| ApiError::bad_request("BAD_REQUEST", format!("invalid request: {e}")))?;
        let path = match self.mode {
            Mode::Feast => "/get-online-features",
            _ => "/v1/features",
        };
        let fetched = crate::cluster::fetch_groups(state, plan.remote, path, headers, |rows| {
            crate::cluster::entities_subset(&body, "entities", rows)
        })
        .await;
        let mut parts = match fetched {
            Ok(parts) => parts,
            Err(answer) => return Ok(answer),
        };
        if !plan.local.is_empty() {
            let columns: Vec<EntityColumn> = self
                .columns
                .iter()
                .map(|c| EntityColumn {
                    name: c.name.clone(),
                    keys: plan.local.iter().map(|&r| c.keys[r].clone()).collect(),
                })
                .collect();
            let raw: Vec<Vec<Json_>> = self
                .raw
                .iter()
                .map(|r| plan.local.iter().map(|&i| r[i].clone()).collect())
                .collect();
            let pre =
                features::prefetch_batch(&state.node, self.refs, &columns, self.after).await?;
            let reads = features::read_batch(&state.node, self.refs, &columns, None, &pre)?;
            let entities: Vec<(&str, &[Json_])> = columns
                .iter()
                .zip(&raw)
                .map(|(c, r)| (c.name.as_str(), r.as_slice()))
                .collect();
            let reply = feast_reply(&entities, self.refs, &reads);
            let reply: Json_ = serde_json::from_slice(&reply).expect("our own reply is JSON");
            parts.insert(0, (plan.local, reply));
        }
        let merged = crate::cluster::merge_feast(rows, parts);
        Ok((
            [(header::CONTENT_TYPE, "application/json")],
            merged.to_string(),
        )
            .into_response())
    }
}

/// The request's entity columns: each an array, all of one length; a value that is not a
/// string or integer is no key (its row reads as NOT_FOUND). Also returns the raw values,
/// echoed in the reply.
fn entity_columns(
    entities: &Map<String, Json_>,
) -> Result<(Vec<EntityColumn>, Vec<&Vec<Json_>>), ApiError> {
    let mut columns = Vec::with_capacity(entities.len());
    let mut raw = Vec::with_capacity(entities.len());
    for (name, values) in entities {
        let Json_::Array(values) = values else {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                format!("entities.{name} must be an array"),
            ));
        };
        if raw
            .first()
            .is_some_and(|r: &&Vec<Json_>| r.len() != values.len())
        {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "every entity column must have the same length",
            ));
        }
        let keys = values.iter().map(entity_key).collect();
        columns.push(EntityColumn {
            name: name.clone(),
            keys,
        });
        raw.push(values);
    }
    Ok((columns, raw))
}

/// A JSON value as an entity key: a string, or an integer's decimal text.
pub(crate) fn entity_key(v: &Json_) -> Option<String> {
    match v {
        Json_::String(s) => Some(s.clone()),
        Json_::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// `timestamps` and `semantics`: required and allowed only on the historical route.
fn as_of(req: &OnlineRequest, historical: bool, rows: usize) -> Result<Option<AsOf>, ApiError> {
    if !historical {
        let misplaced = match (&req.timestamps, &req.semantics) {
            (Some(_), _) => Some("timestamps belong to POST /v1/features/historical"),
            (None, Some(_)) => Some("semantics belongs to POST /v1/features/historical"),
            (None, None) => None,
        };
        return match misplaced {
            Some(m) => Err(ApiError::bad_request("BAD_REQUEST", m)),
            None => Ok(None),
        };
    }
    let semantics = match req.semantics.as_deref() {
        None => Semantics::default(),
        Some(name) => Semantics::parse(name).ok_or_else(|| {
            ApiError::bad_request(
                "BAD_REQUEST",
                format!("semantics must be one of {:?}", Semantics::NAMES),
            )
            .with_details(json!({"semantics": name}))
        })?,
    };
    let Some(ts) = &req.timestamps else {
        return Err(ApiError::bad_request(
            "BAD_REQUEST",
            "timestamps (one per entity row) are required",
        ));
    };
    if ts.len() != rows {
        return Err(ApiError::bad_request(
            "BAD_REQUEST",
            format!("{} timestamps for {rows} entity rows", ts.len()),
        ));
    }
    let mut instants = Vec::with_capacity(rows);
    for (i, t) in ts.iter().enumerate() {
        let ms = match t {
            Json_::Number(n) => n.as_i64(),
            Json_::String(s) => quiver_core::time::parse_rfc3339_ms(s),
            _ => None,
        };
        let Some(ms) = ms.filter(|m| quiver_core::time::is_valid_event_time(*m)) else {
            return Err(ApiError::bad_request(
                "BAD_TIMESTAMP",
                "timestamps are epoch ms or RFC 3339",
            )
            .with_details(json!({"index": i})));
        };
        instants.push(ms);
    }
    Ok(Some(AsOf {
        instants,
        semantics,
    }))
}

/// Feast's get-online-features reply, written straight into a buffer (a `serde_json::Value`
/// tree costs several allocations per cell): entity columns first, then one column per
/// feature, each with values, statuses and event timestamps.
fn feast_reply(entities: &[(&str, &[Json_])], refs: &[FeatureRef], reads: &BatchReads) -> Vec<u8> {
    assert_eq!(
        refs.len(),
        reads.references(),
        "one read column per feature"
    );
    let rows = reads.rows;
    let mut j = JsonBuf::with_capacity(64 + rows * (entities.len() * 48 + refs.len() * 64));
    j.raw("{\"metadata\":{\"feature_names\":[");
    let names = entities
        .iter()
        .map(|(n, _)| *n)
        .chain(refs.iter().map(|r| r.name.as_str()));
    for (i, name) in names.enumerate() {
        if i > 0 {
            j.raw(",");
        }
        j.str(name);
    }
    j.raw("]},\"results\":[");
    for (c, (_, raw)) in entities.iter().enumerate() {
        if c > 0 {
            j.raw(",");
        }
        j.raw("{\"values\":");
        serde_json::to_writer(&mut j.buf, raw).expect("writing to a Vec cannot fail");
        j.raw(",\"statuses\":[");
        list(&mut j, rows, |j, _| {
            j.raw("\"PRESENT\"");
        });
        j.raw("],\"event_timestamps\":[");
        list(&mut j, rows, |j, _| {
            j.str(EPOCH);
        });
        j.raw("]}");
    }
    for f in 0..refs.len() {
        if !entities.is_empty() || f > 0 {
            j.raw(",");
        }
        j.raw("{\"values\":[");
        list(&mut j, rows, |j, i| {
            j.value(&reads.get(f, i).value);
        });
        j.raw("],\"statuses\":[");
        list(&mut j, rows, |j, i| {
            j.raw("\"").raw(reads.get(f, i).status.as_str()).raw("\"");
        });
        j.raw("],\"event_timestamps\":[");
        list(&mut j, rows, |j, i| {
            let r = reads.get(f, i);
            match (r.status, r.ts_ms) {
                (Status::NotFound, _) | (_, None) => {
                    j.str(EPOCH);
                }
                (_, Some(ts)) => {
                    j.timestamp(ts);
                }
            }
        });
        j.raw("]}");
    }
    j.raw("]}");
    j.buf
}

/// Writes `n` comma-separated items.
fn list(j: &mut JsonBuf, n: usize, mut item: impl FnMut(&mut JsonBuf, usize)) {
    for i in 0..n {
        if i > 0 {
            j.raw(",");
        }
        item(j, i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::config::Config;
    use quiver_core::schema::Schema;
    use quiver_core::value::Value;
    use quiver_store::FeatureRead;

    /// The reply as written piece by piece, feature by feature (the writer before the column
    /// keys and the shared tails).
    fn plainly(read: &features::EntityRead<'_>, key: &str, now: EpochMs) -> Vec<u8> {
        let v = read.view;
        let mut j = JsonBuf::with_capacity(64);
        j.raw("{\"view\":").str(&v.name).raw(",\"key\":").str(key);
        j.raw(",\"version\":")
            .u64(read.version)
            .raw(",\"features\":{");
        for (i, (&f, r)) in read.columns.iter().zip(&read.reads).enumerate() {
            if i > 0 {
                j.raw(",");
            }
            j.str(v.column_name(f)).raw(":{\"value\":").value(&r.value);
            j.raw(",\"status\":\"").raw(r.status.as_str()).raw("\"");
            if let Some(ts) = r.ts_ms {
                j.raw(",\"event_timestamp\":").timestamp(ts);
                j.raw(",\"age_ms\":").i64(now.saturating_sub(ts).max(0));
            }
            j.raw("}");
        }
        j.raw("}}");
        j.buf
    }

    #[test]
    fn a_reply_equals_the_one_written_feature_by_feature() {
        let config = Config::from_toml_with_env(
            r#"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "v"
entity = "user"
features = [
  { name = "a", type = "f64" },
  { name = "b\"q\u00e9", type = "string" },
  { name = "c", type = "i64" },
  { name = "d", type = "f64" },
]
aggregations = [{ name = "n", of = "a", fn = "count", window = "1h" }]
"#,
            Vec::new(),
        )
        .unwrap();
        let schema = Schema::compile(&config).unwrap();
        let keys = ColumnKeys::of(&schema);
        let read = |status, value, ts_ms| FeatureRead {
            status,
            value,
            ts_ms,
        };
        // Runs of shared tails, a change of status at the same time, a time without status
        // change, a missing time, an escaped name and key.
        let reads = vec![
            read(Status::Present, Value::F64(1.5), Some(1_000)),
            read(Status::Present, Value::Str("x\"y".into()), Some(1_000)),
            read(Status::NullValue, Value::Null, Some(1_000)),
            read(Status::Present, Value::I64(-3), Some(2_000)),
            read(Status::NotFound, Value::Null, None),
            read(Status::OutsideMaxAge, Value::F64(0.25), Some(2_000)),
        ];
        let view = schema.view_by_name("v").unwrap();
        for columns in [vec![0, 1, 2, 3, 4, 0], vec![3, 0, 4, 2, 1, 3]] {
            let read = features::EntityRead {
                view,
                version: 7,
                columns,
                reads: reads.clone(),
            };
            let key = "k\\1";
            let got = entity_json(&keys, &read, key, 1_500);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(plainly(&read, key, 1_500)).unwrap()
            );
        }
    }
}
