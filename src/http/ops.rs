//! Operations endpoints: liveness, readiness and Prometheus metrics.

use std::sync::Arc;

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use serde_json::json;

use super::AppState;

/// `GET /healthz`: the process is alive and serving HTTP.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 while notifications can be published, 503 otherwise
/// (Redis unreachable, or shutting down).
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.bus.is_ready() && !state.shutting_down.is_cancelled() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable"})),
        )
    }
}

/// `GET /openapi.json`: the OpenAPI 3 document of this API, kept true by
/// `tests/openapi.rs` (schemathesis against a live node).
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}
