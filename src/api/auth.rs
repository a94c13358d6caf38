//! Authentication and roles at the HTTP edge: `Authorization: Basic …`
//! (Airbyte OSS clients) or `Bearer …` (PyAirbyte), checked by
//! [`crate::auth::Authenticator`], then the route's role. The identity goes
//! into the request for the history's `actor`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;

use super::error::ApiError;
use crate::auth::{Authenticator, Credentials, Role};

/// What the middleware of one route knows.
#[derive(Clone)]
pub struct Gate {
    pub authenticator: Option<Arc<Authenticator>>,
    pub needs: Role,
}

/// Lets the request through when its credentials hold the route's role.
pub async fn require(State(gate): State<Gate>, mut request: Request, next: Next) -> Result<Response, ApiError> {
    let Some(authenticator) = gate.authenticator else {
        // Not reached: without credentials the router adds no gate.
        return Ok(next.run(request).await);
    };
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_default();
    let route = request.uri().path().to_owned();
    let header = request.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or("").to_owned());
    let Some(header) = header else {
        tracing::info!(%peer, %route, "request without credentials");
        return Err(ApiError::Unauthorized("no credentials"));
    };
    let decoded;
    let credentials = if let Some(token) = strip_scheme(&header, "Bearer") {
        Credentials::Bearer(token)
    } else if let Some(encoded) = strip_scheme(&header, "Basic") {
        decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or(ApiError::Unauthorized("malformed Basic credentials"))?;
        let (user, password) = decoded.split_once(':').ok_or(ApiError::Unauthorized("malformed Basic credentials"))?;
        Credentials::Basic { user, password }
    } else {
        tracing::warn!(%peer, %route, "unsupported authorization scheme");
        return Err(ApiError::Unauthorized("unsupported authorization scheme"));
    };
    let identity = match authenticator.authenticate(&credentials) {
        Ok(identity) => identity,
        Err(error) => {
            // The error names the user, never the secret.
            tracing::warn!(%peer, %route, reason = %error, "failed login");
            return Err(ApiError::Unauthorized("invalid credentials"));
        }
    };
    if identity.role < gate.needs {
        tracing::warn!(%peer, %route, user = %identity.name, role = identity.role.as_str(), "forbidden");
        return Err(ApiError::Forbidden { role: identity.role, needs: gate.needs });
    }
    request.extensions_mut().insert(identity);
    Ok(next.run(request).await)
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = header.trim().split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}
