//! Service endpoints: health and the OpenAPI document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{AppState, OPENAPI_DOCUMENT};

/// `GET /v1/health`: `{"available": true}`, or false with 503 when the
/// storage does not answer.
pub async fn health(State(app): State<AppState>) -> Response {
    match app.store.ping().await {
        Ok(()) => Json(json!({ "available": true })).into_response(),
        Err(error) => {
            tracing::warn!(%error, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "available": false }))).into_response()
        }
    }
}

/// `GET /v1/openapi`: the service's own OpenAPI document.
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_DOCUMENT).into_response()
}
