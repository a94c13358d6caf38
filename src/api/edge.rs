//! What every request passes through, in one layer (each layer costs a
//! boxed service clone per request): the load limits and the log line.
//!
//! Limits: a bounded number of requests in flight (more are turned away at
//! once with 503, rather than queued until clients time out) and a deadline
//! per request. Health checks are exempt so that an overloaded node still
//! answers its probes. Log: one line per request with method, route,
//! status and latency.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

async fn limit(app: &AppState, mut request: Request, next: Next) -> Response {
    if request.uri().path().ends_with("/health") {
        return next.run(request).await;
    }
    let Ok(_place) = app.in_flight.clone().try_acquire_owned() else {
        return ApiError::Overloaded(app.limits.max_concurrent_requests).into_response();
    };
    let timeout = app.limits.request_timeout;
    // What the request's body holds of the requests' memory, taken when
    // the body is about to be read (`extract`), only once the route and its
    // credentials have let the request through, and held until the answer
    // is made: the body, then what is decoded from it and the answer, are
    // in memory until then.
    let held = HeldMemory::default();
    request.extensions_mut().insert(held.clone());
    let served = async move {
        let response = next.run(request).await;
        drop(held);
        response
    };
    match tokio::time::timeout(timeout, served).await {
        Ok(response) => response,
        Err(_) => ApiError::TimedOut(timeout).into_response(),
    }
}

/// A request's share of the requests' memory (`Limits::request_memory_bytes`),
/// in its extensions: filled by [`HeldMemory::take`], released when the
/// last clone goes.
#[derive(Clone, Default)]
pub struct HeldMemory(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl HeldMemory {
    /// Waits until the memory a body of `size` bytes is counted as is free,
    /// and holds it. The semaphore is never closed: `ok()` drops an error
    /// that cannot come.
    pub async fn take(&self, memory: &Arc<Semaphore>, size: usize) {
        if size == 0 {
            return;
        }
        let permit = memory.clone().acquire_many_owned(kib(size.saturating_mul(MEMORY_PER_BODY_BYTE))).await.ok();
        if let Ok(mut held) = self.0.lock() {
            *held = permit;
        }
    }
}

/// The memory a request is counted as, per byte of its body: the body,
/// then the blobs decoded from it, then the answer (a write answers with
/// the whole state). A 100 MiB legacy blob written and read back peaks at
/// 2.1-2.2x (bench/).
pub const MEMORY_PER_BODY_BYTE: usize = 2;

/// The size a request's body is counted as: its declared length, or the
/// largest accepted when it is sent without one (in chunks), since it
/// cannot be known before it is read. Counting as it arrives instead would
/// let bodies that each hold part of the memory wait for each other.
/// Larger than the limit, it is refused while being read (413), having
/// been counted as the limit.
pub fn body_size(request: &Request, max_body_bytes: usize) -> usize {
    let headers = request.headers();
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length = length.to_str().ok().and_then(|text| text.parse::<usize>().ok());
        return length.map_or(max_body_bytes, |length| length.min(max_body_bytes));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return max_body_bytes;
    }
    0
}

/// Bytes in the KiB the body-memory semaphore counts, rounded up.
pub fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}
