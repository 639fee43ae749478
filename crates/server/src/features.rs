//! Feature reads: `GET /v1/features/{view}/{key}` and Feast's get-online-features shape at
//! `POST /v1/features` and `POST /get-online-features`. Reads touch only memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use quiver_core::schema::{FeatureIdx, ViewId};
use quiver_core::telemetry as t;
use quiver_core::time::now_ms;
use quiver_core::token::Token;
use quiver_store::pit::Semantics;
use quiver_store::{FeatureRead, Status};
use serde::Deserialize;
use serde_json::{json, Map, Value as Json_};

use crate::error::ApiError;
use crate::json_out::JsonBuf;
use crate::AppState;

pub const READ_AFTER: &str = "quiver-read-after";
/// Feast's timestamp for values it has none for.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// Honours `Quiver-Read-After: <token>`: waits (bounded) until the materializer has applied
/// every position the token names.
pub async fn read_after(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(raw) = headers.get(READ_AFTER) else {
        return Ok(());
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
    if state.node.store.has_applied(&token) {
        return Ok(());
    }
    let wait = Duration::from_millis(state.node.config.server.read_after_wait_ms_max);
    let started = Instant::now();
    let ok = state.node.store.wait_applied(&token, wait).await;
    metrics::histogram!(t::READ_AFTER_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
    if ok {
        Ok(())
    } else {
        Err(ApiError::unavailable(
            "READ_AFTER_TIMEOUT",
            format!(
                "the token's writes were not applied within {} ms",
                wait.as_millis()
            ),
        )
        .with_details(json!({"token": token.to_string()})))
    }
}

pub async fn get_entity(
    State(state): State<Arc<AppState>>,
    Path((view, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let result = get_entity_inner(&state, &view, &key, &headers).await;
    metrics::histogram!(t::LOOKUP_SECONDS, "path" => "single")
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
    let schema = &state.node.schema;
    let Some(v) = schema.view_by_name(view) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "UNKNOWN_VIEW",
            format!("no view {view:?}"),
        )
        .with_details(json!({"view": view})));
    };
    // Every column: the view's features, then its aggregations.
    let features: Vec<FeatureIdx> = (0..v.columns() as FeatureIdx).collect();
    let now = now_ms();
    let mut reads = Vec::with_capacity(features.len());
    let Some(version) = state.node.store.read(v.id, key, &features, now, &mut reads) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ENTITY_NOT_FOUND",
            format!("view {view:?} has no entity {key:?}"),
        )
        .with_details(json!({"view": view, "key": key})));
    };
    let mut j = JsonBuf::with_capacity(64 + 96 * features.len());
    j.raw("{\"view\":").str(&v.name).raw(",\"key\":").str(key);
    j.raw(",\"version\":").u64(version).raw(",\"features\":{");
    for (i, (&f, r)) in features.iter().zip(&reads).enumerate() {
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
    Ok(([(header::CONTENT_TYPE, "application/json")], j.buf).into_response())
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
    refs: Vec<(ViewId, FeatureIdx, String)>,
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
        Some(name) => service_features(state, name)?.to_vec(),
    };
    let resolved = Arc::new(resolve_names(state, &names, req.full_feature_names)?);
    state.resolved.insert(key, resolved.clone());
    Ok(resolved)
}

fn service_features<'a>(state: &'a AppState, name: &str) -> Result<&'a [String], ApiError> {
    state
        .node
        .config
        .feature_services
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.features.as_slice())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "UNKNOWN_FEATURE_SERVICE",
                format!("no feature service {name:?}"),
            )
            .with_details(json!({"feature_service": name}))
        })
}

/// Every reference resolved first: an unknown one fails the request, as in Feast.
fn resolve_names(state: &AppState, names: &[String], full: bool) -> Result<Resolved, ApiError> {
    if names.is_empty() {
        return Err(ApiError::bad_request(
            "BAD_REQUEST",
            "features must name at least one view:feature",
        ));
    }
    let schema = &state.node.schema;
    let mut refs = Vec::with_capacity(names.len());
    for name in names {
        let resolved = name.split_once(':').and_then(|(view, feature)| {
            let v = schema.view_by_name(view)?;
            Some((v.id, v.column_index(feature)?))
        });
        let Some((view, f)) = resolved else {
            return Err(ApiError::bad_request(
                "UNKNOWN_FEATURE",
                format!("no feature {name:?} (expected view:feature)"),
            )
            .with_details(json!({"feature": name})));
        };
        let v = schema.view(view);
        let col = if full {
            format!("{}__{}", v.name, v.column_name(f))
        } else {
            v.column_name(f).to_string()
        };
        refs.push((view, f, col));
    }
    Ok(Resolved { refs })
}

/// How a batch read reads: the online store now (strict or Feast's lenient parsing), or
/// point-in-time per row.
enum Mode {
    Online,
    Feast,
    Historical,
}

pub async fn post_features(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    online_read(state, headers, body, Mode::Online).await
}

/// `POST /get-online-features`: Feast's route, which ignores fields it does not know.
pub async fn get_online_features(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    online_read(state, headers, body, Mode::Feast).await
}

async fn online_read(state: Arc<AppState>, headers: HeaderMap, body: Body, mode: Mode) -> Response {
    let started = Instant::now();
    let result = post_features_inner(&state, &headers, body, mode).await;
    metrics::histogram!(t::LOOKUP_SECONDS, "path" => "batch")
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
    headers: HeaderMap,
    body: Body,
) -> Response {
    match post_features_inner(&state, &headers, body, Mode::Historical).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn post_features_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<Response, ApiError> {
    let bytes =
        crate::body::read_limited(body, state.node.config.limits.request_body_bytes_max).await?;
    let req = parse_online_request(&bytes, !matches!(mode, Mode::Feast))?;
    read_after(state, headers).await?;
    let schema = &state.node.schema;
    let resolved = resolve(state, &req)?;
    let refs = &resolved.refs;
    // Entity columns: each must be an array, all of one length.
    let mut rows = None;
    // (column name, keys as strings — None where not a string or integer, raw values)
    type EntityColumn<'a> = (&'a String, Vec<Option<String>>, &'a Vec<Json_>);
    let mut columns: Vec<EntityColumn<'_>> = Vec::new();
    for (name, values) in &req.entities {
        let Json_::Array(values) = values else {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                format!("entities.{name} must be an array"),
            ));
        };
        if *rows.get_or_insert(values.len()) != values.len() {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "every entity column must have the same length",
            ));
        }
        let keys = values
            .iter()
            .map(|v| match v {
                Json_::String(s) => Some(s.clone()),
                Json_::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
                _ => None,
            })
            .collect();
        columns.push((name, keys, values));
    }
    let rows = rows.unwrap_or(0);
    if rows > state.node.config.server.read_entities_max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "TOO_MANY_ENTITIES",
            format!(
                "at most {} entity rows per request (server.read_entities_max)",
                state.node.config.server.read_entities_max
            ),
        ));
    }
    let online = !matches!(mode, Mode::Historical);
    let semantics = match (online, req.semantics.as_deref()) {
        (_, None) => Semantics::default(),
        (false, Some(name)) => Semantics::parse(name).ok_or_else(|| {
            ApiError::bad_request(
                "BAD_REQUEST",
                format!("semantics must be one of {:?}", Semantics::NAMES),
            )
            .with_details(json!({"semantics": name}))
        })?,
        (true, Some(_)) => {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "semantics belongs to POST /v1/features/historical",
            ))
        }
    };
    let instants: Option<Vec<i64>> = match (online, &req.timestamps) {
        (true, None) => None,
        (true, Some(_)) => {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "timestamps belong to POST /v1/features/historical",
            ))
        }
        (false, None) => {
            return Err(ApiError::bad_request(
                "BAD_REQUEST",
                "timestamps (one per entity row) are required",
            ))
        }
        (false, Some(ts)) => {
            if ts.len() != rows {
                return Err(ApiError::bad_request(
                    "BAD_REQUEST",
                    format!("{} timestamps for {rows} entity rows", ts.len()),
                ));
            }
            let mut out = Vec::with_capacity(rows);
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
                out.push(ms);
            }
            Some(out)
        }
    };
    // Which entity column keys each requested view.
    let mut key_col_of_view: Vec<Option<usize>> = vec![None; schema.views.len()];
    for (view, _, _) in refs {
        let key = &schema.entity_of(schema.view(*view)).key;
        let Some(i) = columns.iter().position(|(n, _, _)| *n == key) else {
            return Err(ApiError::bad_request(
                "MISSING_ENTITY",
                format!(
                    "entities must include {key:?} for view {:?}",
                    schema.view(*view).name
                ),
            )
            .with_details(json!({"entity_key": key})));
        };
        key_col_of_view[usize::from(*view)] = Some(i);
    }

    let now = now_ms();
    // One store read per (view, row), shared by that view's features.
    let mut per_feature: Vec<Vec<FeatureRead>> = vec![Vec::with_capacity(rows); refs.len()];
    let mut scratch = Vec::new();
    for view in 0..schema.views.len() {
        let wanted: Vec<(usize, FeatureIdx)> = refs
            .iter()
            .enumerate()
            .filter(|(_, (v, _, _))| usize::from(*v) == view)
            .map(|(i, (_, f, _))| (i, *f))
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let features: Vec<FeatureIdx> = wanted.iter().map(|(_, f)| *f).collect();
        let keys = &columns[key_col_of_view[view].expect("resolved above")].1;
        // Point-in-time reads the log (and maybe PostgreSQL) synchronously: `block_in_place`
        // moves this worker's other tasks away meanwhile (the server runs a multi-thread runtime).
        let mut historical = match &instants {
            Some(ts) => Some(tokio::task::block_in_place(|| {
                read_historical(state, view as ViewId, &features, keys, ts, semantics)
            })?),
            None => None,
        };
        for (row, key) in keys.iter().enumerate() {
            scratch.clear();
            match (key, &mut historical) {
                (Some(_), Some(h)) => scratch.append(&mut h[row]),
                (Some(k), None) => {
                    state
                        .node
                        .store
                        .read(view as ViewId, k, &features, now, &mut scratch);
                }
                (None, _) => scratch.extend(features.iter().map(|_| FeatureRead {
                    status: Status::NotFound,
                    value: quiver_core::value::Value::Null,
                    ts_ms: None,
                })),
            }
            for ((i, _), r) in wanted.iter().zip(scratch.drain(..)) {
                per_feature[*i].push(r);
            }
        }
    }
    let entity_columns: Vec<(&str, &[Json_])> = columns
        .iter()
        .map(|(n, _, raw)| (n.as_str(), raw.as_slice()))
        .collect();
    let reply = feast_reply(&entity_columns, refs, &per_feature, rows);
    Ok(([(header::CONTENT_TYPE, "application/json")], reply).into_response())
}

/// Feast's get-online-features reply, written straight into a buffer (a `serde_json::Value`
/// tree costs several allocations per cell): entity columns first, then one column per
/// feature, each with values, statuses and event timestamps.
fn feast_reply(
    entities: &[(&str, &[Json_])],
    refs: &[(ViewId, FeatureIdx, String)],
    per_feature: &[Vec<FeatureRead>],
    rows: usize,
) -> Vec<u8> {
    assert_eq!(refs.len(), per_feature.len(), "one read column per feature");
    let mut j = JsonBuf::with_capacity(64 + rows * (entities.len() * 48 + refs.len() * 64));
    j.raw("{\"metadata\":{\"feature_names\":[");
    let names = entities
        .iter()
        .map(|(n, _)| *n)
        .chain(refs.iter().map(|r| r.2.as_str()));
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
    for reads in per_feature {
        debug_assert_eq!(reads.len(), rows);
        if !entities.is_empty() {
            j.raw(",");
        }
        j.raw("{\"values\":[");
        list(&mut j, rows, |j, i| {
            j.value(&reads[i].value);
        });
        j.raw("],\"statuses\":[");
        list(&mut j, rows, |j, i| {
            j.raw("\"").raw(reads[i].status.as_str()).raw("\"");
        });
        j.raw("],\"event_timestamps\":[");
        list(&mut j, rows, |j, i| {
            match (reads[i].status, reads[i].ts_ms) {
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

/// Point-in-time reads for every row of one view, from the log (the embedded history).
fn read_historical(
    state: &AppState,
    view: ViewId,
    features: &[FeatureIdx],
    keys: &[Option<String>],
    instants: &[i64],
    semantics: Semantics,
) -> Result<Vec<Vec<FeatureRead>>, ApiError> {
    let node = &state.node;
    let started = Instant::now();
    let wanted: std::collections::HashSet<String> = keys.iter().flatten().cloned().collect();
    let view_name = &node.schema.view(view).name;
    let unavailable = |e: String| ApiError::unavailable("HISTORY_UNAVAILABLE", e);
    let history = match (&node.history, &node.history_reader) {
        (Some(sink), Some(reader)) => {
            // PostgreSQL holds every record below the sink's committed offsets (read first);
            // the log supplies the rest. Records present in both are merged by offset.
            let committed: Vec<u64> = (0..node.log.partitions())
                .map(|p| sink.committed_offset(p))
                .collect();
            let keys_vec: Vec<String> = wanted.iter().cloned().collect();
            let pg = reader
                .collect(node.log.id(), &node.schema, view_name, &keys_vec)
                .map_err(|e| unavailable(format!("PostgreSQL history: {e}")))?;
            let mut merged =
                quiver_store::pit::collect_from_log(&node.log, view_name, &wanted, &|p| {
                    committed[p as usize]
                })
                .map_err(|e| unavailable(e.to_string()))?;
            if merged.is_empty() {
                pg
            } else {
                for (key, rows) in pg {
                    let records = merged.entry(key).or_default();
                    records.extend(rows);
                    records.sort_by_key(|r| r.offset);
                    records.dedup_by_key(|r| r.offset);
                }
                merged
            }
        }
        _ => quiver_store::pit::collect_from_log(&node.log, view_name, &wanted, &|_| 0)
            .map_err(|e| unavailable(e.to_string()))?,
    };
    let mut out: Vec<Vec<FeatureRead>> = vec![Vec::new(); keys.len()];
    let mut rows_of: std::collections::HashMap<&str, Vec<(usize, i64)>> =
        std::collections::HashMap::new();
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
