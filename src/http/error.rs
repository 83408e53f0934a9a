//! The one error type of the HTTP API: every refusal is a status code and a
//! JSON body `{"error": "<code>", "message": "<human text>"}` (docs/protocol.md).

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

/// A refused HTTP call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    /// An item of a batch is refused: the batch is, whole.
    #[error("notifications[{index}]: {message}")]
    BadItem { index: usize, message: String },
    /// `bearer`: answer with `WWW-Authenticate: Bearer` (`/authorize`).
    #[error("{message}")]
    Unauthorized { message: String, bearer: bool },
    #[error("body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("{0}")]
    Unavailable(String),
    /// A rate limit (see [`crate::limits`]); answered with `Retry-After`.
    #[error("too many requests ({limit}); retry in {retry_after_secs} s")]
    TooManyRequests {
        limit: &'static str,
        retry_after_secs: u64,
    },
    #[error("no such endpoint")]
    NotFound,
    /// A repeat of an `Idempotency-Key` whose first call is in progress.
    #[error("a call with this Idempotency-Key is in progress; retry once it is done")]
    Conflict,
    /// An `Idempotency-Key` repeated with another body.
    #[error("this Idempotency-Key was used with another body")]
    IdempotencyKeyReused,
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) | ApiError::BadItem { .. } => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            ApiError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::UnsupportedMediaType => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict => (StatusCode::CONFLICT, "conflict"),
            ApiError::IdempotencyKeyReused => {
                (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let mut body = json!({"error": code, "message": self.to_string()});
        if let ApiError::BadItem { index, .. } = &self {
            body["index"] = (*index).into();
        }
        let mut response = (status, Json(body)).into_response();
        match self {
            ApiError::Unauthorized { bearer: true, .. } => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManyRequests {
                retry_after_secs, ..
            } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            _ => {}
        }
        response
    }
}

impl From<crate::limits::Refused> for ApiError {
    fn from(refused: crate::limits::Refused) -> Self {
        // Whole seconds, rounded up: `Retry-After: 0` would invite a retry storm.
        let secs = refused.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        ApiError::TooManyRequests {
            limit: refused.limit.label(),
            retry_after_secs: secs,
        }
    }
}
