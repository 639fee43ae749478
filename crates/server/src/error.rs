//! The one error shape of every `/v1` endpoint:
//! `{"error": {"code": "INVALID_EVENT", "message": "…", "details": {…}}}`, with the status that
//! fits and `Retry-After` on 429/503.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: json!({}),
            retry_after_s: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after_s = Some(seconds);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).retry_after(1)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

impl From<quiver_log::LogError> for ApiError {
    fn from(e: quiver_log::LogError) -> ApiError {
        use quiver_log::LogError as L;
        match e {
            L::Full { .. } => ApiError::unavailable("QUEUE_FULL", e.to_string()),
            L::Poisoned(_) => ApiError::unavailable("LOG_POISONED", e.to_string()).retry_after(30),
            L::ShuttingDown => ApiError::unavailable("SHUTTING_DOWN", e.to_string()),
            L::DiskFull {
                used,
                max,
                ref held_by,
            } => ApiError::unavailable("DISK_FULL", e.to_string()).with_details(
                json!({"disk_bytes": used, "disk_bytes_max": max, "held_by": held_by}),
            ),
            _ => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "LOG_ERROR",
                e.to_string(),
            ),
        }
    }
}
