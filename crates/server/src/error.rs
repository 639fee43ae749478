//! The one error shape of every `/v1` endpoint:
//! `{"error": {"code": "INVALID_EVENT", "message": "…", "details": {…}}}`, with the status that
//! fits and `Retry-After` on 429/503.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use quiver_serving::{Class, Detail, ServingError};
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

    /// Adds one detail.
    pub fn detail(mut self, name: &str, value: impl Into<Value>) -> ApiError {
        match &mut self.details {
            Value::Object(m) => {
                m.insert(name.to_string(), value.into());
            }
            other => *other = json!({ name: value.into() }),
        }
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

/// The HTTP status of a serving error's class.
pub fn status_of(class: Class) -> StatusCode {
    match class {
        Class::Invalid => StatusCode::BAD_REQUEST,
        Class::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Class::NotFound => StatusCode::NOT_FOUND,
        Class::Conflict => StatusCode::CONFLICT,
        Class::Forbidden => StatusCode::FORBIDDEN,
        Class::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Class::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn detail_json(d: Detail) -> Value {
    match d {
        Detail::Str(s) => Value::String(s),
        Detail::U64(n) => Value::from(n),
        Detail::Null => Value::Null,
    }
}

impl From<ServingError> for ApiError {
    fn from(e: ServingError) -> ApiError {
        let details: serde_json::Map<String, Value> = e
            .details
            .into_iter()
            .map(|(k, v)| (k.to_string(), detail_json(v)))
            .collect();
        ApiError {
            status: status_of(e.code.class()),
            code: e.code.as_str(),
            message: e.message,
            details: Value::Object(details),
            retry_after_s: e.retry_after_s,
        }
    }
}

impl From<quiver_log::LogError> for ApiError {
    fn from(e: quiver_log::LogError) -> ApiError {
        ServingError::from(e).into()
    }
}
