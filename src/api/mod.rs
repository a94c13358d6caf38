//! HTTP: the router, its middleware, and one file per endpoint family.
//!
//! Handlers decode with [`crate::state::wire`], call the store once and
//! encode; failures become [`error::ApiError`]. Nothing here knows SQL.
//! Every route is served under both `/api/v1/…` and `/v1/…` (STATE-API.md §1).

pub mod error;
mod extract;
mod history;
mod lease;
mod log;
mod meta;
mod respond;
mod state;
mod stream;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Method;
use axum::routing::{get, post, MethodRouter};
use axum::Router;

use crate::state::wire::DecodeLimits;
use crate::store::Store;
use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub limits: Limits,
}

/// Request limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Limits applied while decoding JSON.
    pub decode: DecodeLimits,
}

/// The OpenAPI document served at `GET /v1/openapi`.
pub const OPENAPI_DOCUMENT: &str = include_str!("openapi.json");

/// Every route, relative to a version prefix: the single list the router
/// is built from and the OpenAPI document is checked against.
pub fn routes() -> Vec<(Method, &'static str, MethodRouter<AppState>)> {
    vec![
        (Method::POST, "/state/get", post(state::get)),
        (Method::POST, "/state/create_or_update", post(state::create_or_update)),
        (Method::POST, "/state/create_or_update_safe", post(state::create_or_update_safe)),
        (Method::POST, "/web_backend/state/get_type", post(state::get_type)),
        (Method::POST, "/state/history", post(history::history)),
        (Method::POST, "/state/diff", post(history::diff)),
        (Method::POST, "/state/restore", post(history::restore)),
        (Method::POST, "/state/reset", post(history::reset)),
        (Method::POST, "/state/stream/get", post(stream::get)),
        (Method::POST, "/state/stream/set", post(stream::set)),
        (Method::POST, "/state/stream/delete", post(stream::delete)),
        (Method::POST, "/state/lease/acquire", post(lease::acquire)),
        (Method::POST, "/state/lease/renew", post(lease::renew)),
        (Method::POST, "/state/lease/release", post(lease::release)),
        (Method::POST, "/state/lease/list", post(lease::list)),
        (Method::GET, "/health", get(meta::health)),
        (Method::GET, "/openapi", get(meta::openapi)),
    ]
}

/// Builds the service: every route under both prefixes, JSON errors for
/// unknown routes and methods, one log line per request.
pub fn router(app: AppState) -> Router {
    let max_body = app.limits.max_body_bytes;
    let v1 = routes().into_iter().fold(Router::new(), |router, (_, path, handler)| router.route(path, handler));
    Router::new()
        .nest("/api/v1", v1.clone())
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(log::log_request))
        .with_state(app)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("{} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} {}", request.method(), request.uri().path()))
}
