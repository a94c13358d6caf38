//! HTTP: the router, its middleware, and one file per endpoint family.
//!
//! Handlers decode with [`crate::state::wire`], call the store once and
//! encode; failures become [`error::ApiError`]. Nothing here knows SQL.
//! Every route is served under both `/api/v1/…` and `/v1/…` (STATE-API.md §1).

mod auth;
mod edge;
pub mod error;
mod extract;
mod history;
mod lease;
mod meta;
mod render_cache;
mod respond;
mod state;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Method;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use tokio::sync::Semaphore;

use crate::auth::{Authenticator, Role};
use crate::state::wire::DecodeLimits;
use crate::store::Store;
use error::ApiError;

/// What every handler shares. Cloned for every request by each layer, so
/// it is one reference count.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The contents of [`AppState`].
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub limits: Limits,
    /// Credentials to check; `None` when authentication is off.
    pub authenticator: Option<Arc<Authenticator>>,
    /// Places for requests being served at once (see `Limits`).
    pub in_flight: Arc<Semaphore>,
    /// Memory for the requests being served, in KiB (see
    /// `Limits::request_memory_bytes` and `edge`).
    pub body_memory: Arc<Semaphore>,
    /// Rendered bodies of large states.
    pub rendered: render_cache::RenderCache,
}

impl AppState {
    /// Shared state for serving `store` under `limits`.
    pub fn new(store: Arc<dyn Store>, limits: Limits, authenticator: Option<Arc<Authenticator>>) -> Self {
        let in_flight = Arc::new(Semaphore::new(limits.max_concurrent_requests));
        let body_memory = Arc::new(Semaphore::new(edge::kib(limits.request_memory_bytes()) as usize));
        let rendered = render_cache::RenderCache::new(32 * 1024 * 1024);
        Self(Arc::new(Shared { store, limits, authenticator, in_flight, body_memory, rendered }))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Request limits, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Limits applied while decoding JSON.
    pub decode: DecodeLimits,
    /// Longest a request may take before it is answered 503.
    pub request_timeout: Duration,
    /// Most requests served at once; more are answered 503 at once.
    pub max_concurrent_requests: usize,
    /// Longest a client may take over a request's headers, counted from
    /// when the server starts waiting for them; also how long an idle
    /// kept-alive connection stays open (`startup`).
    pub header_read_timeout: Duration,
    /// Memory for the requests being served at once, each counted as
    /// [`edge::MEMORY_PER_BODY_BYTE`] times its body (see
    /// [`Limits::request_memory_bytes`]).
    pub request_memory_bytes: usize,
}

impl Limits {
    /// The memory for requests: as configured, but room for at least one
    /// with a body of the largest size accepted.
    pub fn request_memory_bytes(&self) -> usize {
        self.request_memory_bytes.max(self.max_body_bytes.saturating_mul(edge::MEMORY_PER_BODY_BYTE))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 128 * 1024 * 1024,
            decode: DecodeLimits::default(),
            request_timeout: Duration::from_secs(60),
            max_concurrent_requests: 1024,
            header_read_timeout: Duration::from_secs(60),
            request_memory_bytes: 512 * 1024 * 1024,
        }
    }
}

/// One route: method, path below a version prefix, handler, and the role it
/// needs (`None`: open to anyone, even with authentication on).
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub handler: MethodRouter<AppState>,
    pub role: Option<Role>,
}

/// The OpenAPI document served at `GET /v1/openapi`.
pub const OPENAPI_DOCUMENT: &str = include_str!("openapi.json");

/// Every route, relative to a version prefix: the single list the router
/// is built from, the OpenAPI document is checked against, and that says
/// which role each route needs.
pub fn routes() -> Vec<Route> {
    use Role::{Admin, Editor, Reader};
    let route = |method, path, handler, role| Route { method, path, handler, role };
    vec![
        route(Method::POST, "/state/get", post(state::get), Some(Reader)),
        route(Method::POST, "/state/create_or_update", post(state::create_or_update), Some(Admin)),
        route(Method::POST, "/state/create_or_update_safe", post(state::create_or_update_safe), Some(Editor)),
        route(Method::POST, "/web_backend/state/get_type", post(state::get_type), Some(Reader)),
        route(Method::POST, "/state/history", post(history::history), Some(Reader)),
        route(Method::POST, "/state/diff", post(history::diff), Some(Reader)),
        route(Method::POST, "/state/restore", post(history::restore), Some(Editor)),
        route(Method::POST, "/state/reset", post(history::reset), Some(Editor)),
        route(Method::POST, "/state/stream/get", post(stream::get), Some(Reader)),
        route(Method::POST, "/state/stream/set", post(stream::set), Some(Editor)),
        route(Method::POST, "/state/stream/delete", post(stream::delete), Some(Editor)),
        route(Method::POST, "/state/lease/acquire", post(lease::acquire), Some(Admin)),
        route(Method::POST, "/state/lease/renew", post(lease::renew), Some(Admin)),
        route(Method::POST, "/state/lease/release", post(lease::release), Some(Admin)),
        route(Method::POST, "/state/lease/list", post(lease::list), Some(Admin)),
        route(Method::GET, "/health", get(meta::health), None),
        route(Method::GET, "/openapi", get(meta::openapi), None),
    ]
}

/// Builds the service: every route under both prefixes behind its role,
/// the request limits, JSON errors for unknown routes and methods, one log
/// line per request.
pub fn router(app: AppState) -> Router {
    let max_body = app.limits.max_body_bytes;
    // Each route is registered under both prefixes rather than nested: a
    // nested router routes every request twice and rewrites its URI.
    let router = routes().into_iter().fold(Router::new(), |router, route| {
        let handler = match (route.role, &app.authenticator) {
            (None, _) | (_, None) => route.handler,
            (Some(needs), Some(_)) => {
                let gate = auth::Gate { authenticator: app.authenticator.clone(), needs };
                route.handler.layer(axum::middleware::from_fn_with_state(gate, auth::require))
            }
        };
        ["/api/v1", "/v1"]
            .into_iter()
            .fold(router, |router, prefix| router.route(&format!("{prefix}{}", route.path), handler.clone()))
    });
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(app.clone(), edge::edge))
        .with_state(app)
}

async fn not_found(request: Request) -> ApiError {
    ApiError::NotFound(format!("{} {}", request.method(), request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!("{} {}", request.method(), request.uri().path()))
}
