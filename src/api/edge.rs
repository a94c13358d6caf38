//! What every request passes through, in one layer (each layer costs a
//! boxed service clone per request): the load limits and the log line.
//!
//! Limits: a bounded number of requests in flight (more are turned away at
//! once with 503, rather than queued until clients time out) and a deadline
//! per request. Health checks are exempt so that an overloaded node still
//! answers its probes. Log: one line per request with method, route,
//! status and latency.

use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Applies the limits, then logs the answer.
pub async fn edge(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if !tracing::enabled!(tracing::Level::INFO) {
        return limit(&app, request, next).await;
    }
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.uri().path().to_owned();
    let response = limit(&app, request, next).await;
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        method = %method,
        route = %route,
        status = response.status().as_u16(),
        latency_ms = format_args!("{latency_ms:.3}"),
        "request"
    );
    response
}

async fn limit(app: &AppState, request: Request, next: Next) -> Response {
    if request.uri().path().ends_with("/health") {
        return next.run(request).await;
    }
    let Ok(_place) = app.in_flight.clone().try_acquire_owned() else {
        return ApiError::Overloaded(app.limits.max_concurrent_requests).into_response();
    };
    let timeout = app.limits.request_timeout;
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut(timeout).into_response(),
    }
}
