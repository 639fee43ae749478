//! Reading a request body under `limits.request_body_bytes_max`, answering 413 in our own
//! error shape (axum's default limit answers in plain text).

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};

use crate::error::ApiError;

/// The 413 of a body over `max` bytes (also answered before reading, from Content-Length).
pub fn too_large(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "BODY_TOO_LARGE",
        format!("request body over {max} bytes (limits.request_body_bytes_max)"),
    )
    .with_details(serde_json::json!({"limit_bytes": max}))
}

pub async fn read_limited(body: Body, max: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(max)),
        Err(e) => Err(ApiError::bad_request(
            "BAD_BODY",
            format!("could not read the request body: {e}"),
        )),
    }
}
