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
/// in its extensions: taken by the body extractor, released when the last
/// clone goes.
#[derive(Clone, Default)]
pub struct HeldMemory(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl HeldMemory {
    /// Holds the memory a body of `size` bytes is counted as, waiting until
    /// it is free if it must. A request may grow what it holds: it asks for
    /// the difference, or, when that is not free at once, gives back what
    /// it holds and waits for all of it, so that no request waits while
    /// holding part of the memory (two could then wait for each other).
    /// The semaphore is never closed: its error cannot come.
    pub async fn hold(&self, memory: &Arc<Semaphore>, size: usize) {
        let wanted = kib(size.saturating_mul(MEMORY_PER_BODY_BYTE));
        let held = self.0.lock().ok().and_then(|mut held| held.take());
        let held_now = held.as_ref().map_or(0, |held| held.num_permits());
        let permit = match held {
            _ if wanted as usize <= held_now => held,
            Some(mut held) => match memory.clone().try_acquire_many_owned(wanted - held_now as u32) {
                Ok(more) => {
                    held.merge(more);
                    Some(held)
                }
                Err(_) => {
                    drop(held);
                    wait_for(memory, wanted).await
                }
            },
            None => match memory.clone().try_acquire_many_owned(wanted) {
                Ok(permit) => Some(permit),
                Err(_) => wait_for(memory, wanted).await,
            },
        };
        if let Ok(mut held) = self.0.lock() {
            *held = permit;
        }
    }
}

/// Waits for `kib` of the requests' memory, saying so: requests slowed or
/// timed out by it are otherwise hard to tell from a slow store.
async fn wait_for(memory: &Arc<Semaphore>, kib: u32) -> Option<OwnedSemaphorePermit> {
    let started = Instant::now();
    tracing::info!(
        wanted_kib = kib,
        free_kib = memory.available_permits(),
        "a request waits for memory held by others (--request-memory-mb / HIGHWATER_REQUEST_MEMORY_MB)"
    );
    let permit = memory.clone().acquire_many_owned(kib).await.ok();
    tracing::info!(waited_ms = started.elapsed().as_millis() as u64, "a request got the memory it waited for");
    permit
}

/// The memory a request is counted as, per byte of its body: the body,
/// then the blobs decoded from it, then the answer (a write answers with
/// the whole state). A 100 MiB legacy blob written and read back peaks at
/// 2.1-2.2x (bench/).
pub const MEMORY_PER_BODY_BYTE: usize = 2;

/// What a body sent without a length is counted as at first, and the step
/// it is counted up by as it arrives (see `extract`).
pub const UNKNOWN_BODY_FIRST_BYTES: usize = 64 * 1024;

/// The size a request's body declares: `Some(0)` for none, `None` when it
/// is sent in chunks without a length. A length over the limit counts as
/// the limit: such a body is refused while it is read (413).
pub fn declared_size(request: &Request, max_body_bytes: usize) -> Option<usize> {
    let headers = request.headers();
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let length = length.to_str().ok().and_then(|text| text.parse::<usize>().ok());
        return Some(length.map_or(max_body_bytes, |length| length.min(max_body_bytes)));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return None;
    }
    Some(0)
}

/// Bytes in the KiB the body-memory semaphore counts, rounded up.
pub fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}
