//! Load limits: a bounded number of requests in flight (more are turned
//! away at once with 503, rather than queued until clients time out) and a
//! deadline per request. Health checks are exempt so that an overloaded
//! node still answers its probes.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::error::ApiError;
use super::AppState;

/// Applies the concurrency limit and the request timeout.
pub async fn limit(State(app): State<AppState>, request: Request, next: Next) -> Result<Response, ApiError> {
    if request.uri().path().ends_with("/health") {
        return Ok(next.run(request).await);
    }
    let Ok(_place) = app.in_flight.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded(app.limits.max_concurrent_requests));
    };
    let timeout = app.limits.request_timeout;
    tokio::time::timeout(timeout, next.run(request)).await.map_err(|_| ApiError::TimedOut(timeout))
}
