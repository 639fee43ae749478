//! Rows of other nodes for one request (`quiver_serving::remote::RemoteRows` over HTTP):
//! `POST /v1/features` of every column of a view for a list of keys, with the caller's
//! credentials and `Quiver-Read-After`, the Feast-shaped answer turned back into reads.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use quiver_core::config::ClusterNode;
use serde_json::{json, Value};

use crate::cluster::Peers;

tokio::task_local! {
    /// The credentials of the request being served (set by `security::guard` in a cluster):
    /// rows this request needs from other nodes are read with them.
    pub static CALLER: HeaderMap;
}

/// The headers that carry a caller's credentials.
const CREDENTIAL_HEADERS: &[&str] = &["authorization", "x-api-key"];

/// A copy of `headers`' credentials.
pub fn caller_credentials(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in CREDENTIAL_HEADERS {
        if let Some(v) = headers.get(*name) {
            out.insert(*name, v.clone());
        }
    }
    out
}

/// Rows of other nodes, read over HTTP: `POST /v1/features` of every column of a view for
/// a list of keys, the Feast-shaped answer turned back into reads. Sent with the caller's
/// credentials (`CALLER`), so the peer checks that the caller may read the view.
pub struct PeerRows {
    pub peers: Arc<Peers>,
    pub schema: Arc<quiver_core::Schema>,
}

impl quiver_serving::remote::RemoteRows for PeerRows {
    fn fetch<'a>(
        &'a self,
        candidates: &'a [ClusterNode],
        view: quiver_core::schema::ViewId,
        keys: &'a [String],
        after: Option<&'a quiver_core::token::Token>,
    ) -> quiver_serving::remote::RowsFuture<'a> {
        Box::pin(async move {
            let v = self.schema.view(view);
            let columns: Vec<String> = (0..v.columns())
                .map(|c| {
                    let c = quiver_core::schema::FeatureIdx::try_from(c).expect("few columns");
                    format!("{}:{}", v.name, v.column_name(c))
                })
                .collect();
            let key_col = &self.schema.entity_of(v).key;
            let body = json!({"features": columns, "entities": {key_col.as_str(): keys}});
            let failed = |e: String| {
                quiver_serving::ServingError::new(quiver_serving::Code::PeerFailed, e)
                    .detail("view", v.name.as_str())
            };
            let mut headers = CALLER.try_with(HeaderMap::clone).unwrap_or_default();
            if let Some(t) = after.and_then(|t| HeaderValue::from_str(&t.to_string()).ok()) {
                headers.insert(crate::features::READ_AFTER, t);
            }
            let body = Bytes::from(body.to_string());
            let reply = self
                .peers
                .forward(candidates, Method::POST, "/v1/features", &headers, body)
                .await
                .map_err(|e| failed(e.message))?;
            if reply.status != StatusCode::OK {
                let text = String::from_utf8_lossy(&reply.body).into_owned();
                return Err(failed(format!("a peer answered {}: {text}", reply.status)));
            }
            let answer: Value =
                serde_json::from_slice(&reply.body).map_err(|e| failed(e.to_string()))?;
            rows_of_answer(v, &answer, keys.len()).map_err(failed)
        })
    }
}

/// A Feast-shaped answer (entity column, then every column of `view`) as rows of reads.
fn rows_of_answer(
    view: &quiver_core::schema::View,
    answer: &Value,
    rows: usize,
) -> Result<Vec<Vec<quiver_store::FeatureRead>>, String> {
    use quiver_store::{FeatureRead, Status};
    let results = answer["results"]
        .as_array()
        .ok_or("an answer without results")?;
    if results.len() != 1 + view.columns() {
        return Err(format!(
            "{} result columns for a view of {}",
            results.len(),
            view.columns()
        ));
    }
    let mut out: Vec<Vec<FeatureRead>> = (0..rows)
        .map(|_| Vec::with_capacity(view.columns()))
        .collect();
    for (c, column) in results[1..].iter().enumerate() {
        let ty = view.features.get(c).map(|f| f.ty);
        for (r, row) in out.iter_mut().enumerate() {
            let status = match column["statuses"][r].as_str() {
                Some("PRESENT") => Status::Present,
                Some("NULL_VALUE") => Status::NullValue,
                Some("OUTSIDE_MAX_AGE") => Status::OutsideMaxAge,
                Some("NOT_FOUND") => Status::NotFound,
                other => return Err(format!("status {other:?} in a peer's answer")),
            };
            let ts_ms = match column["event_timestamps"][r].as_str() {
                Some(crate::features::EPOCH) | None => None,
                Some(t) => quiver_core::time::parse_rfc3339_ms(t),
            };
            row.push(FeatureRead {
                status,
                value: value_of(&column["values"][r], ty),
                ts_ms,
            });
        }
    }
    Ok(out)
}

/// A JSON value as a stored value of type `ty` (aggregations: by the JSON number's form —
/// serde writes an f64 with a fraction or exponent, an i64 without).
fn value_of(v: &Value, ty: Option<quiver_core::value::FeatureType>) -> quiver_core::value::Value {
    use quiver_core::value::{FeatureType, Value as V};
    match v {
        Value::Bool(b) => V::Bool(*b),
        Value::String(s) => V::Str(s.as_str().into()),
        Value::Number(n) => match (ty, n.as_i64()) {
            (Some(FeatureType::F64), _) | (_, None) => n.as_f64().map_or(V::Null, V::F64),
            (_, Some(i)) => V::I64(i),
        },
        Value::Array(xs) => V::F32s(
            xs.iter()
                .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                .collect(),
        ),
        _ => V::Null,
    }
}
