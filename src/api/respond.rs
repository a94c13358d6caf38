//! What the handlers share: JSON responses with an `ETag`, and turning a
//! write's body fields and headers into its guard and history metadata.

use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::auth::Identity;
use crate::state::ops::{Guard, Meta, Operation, WriteRequest};
use crate::state::wire::highwater::WriteFields;
use crate::state::wire::FieldError;

/// Carries a lease token, like the body's `leaseToken`.
pub const LEASE_TOKEN_HEADER: &str = "highwater-lease-token";
/// Names who writes, like the body's `actor`.
pub const ACTOR_HEADER: &str = "highwater-actor";

/// A 200 JSON response.
pub fn json(body: impl Into<Bytes>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

/// A 200 JSON response describing the state at `revision`.
pub fn json_at(body: impl Into<Bytes>, revision: u64) -> Response {
    let mut response = json(body);
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{revision}\"")) {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

/// How a write came: its headers and who sent it (when authenticated).
pub struct Caller {
    pub headers: HeaderMap,
    pub identity: Option<Identity>,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self { headers: parts.headers.clone(), identity: parts.extensions.get::<Identity>().cloned() })
    }
}

/// Builds a write request from its operation, the body's write fields and
/// the caller (`If-Match`, `Highwater-Lease-Token`, `Highwater-Actor`; the
/// authenticated identity, when there is one, is the actor). A header that
/// contradicts the body's field is refused.
pub fn write_request(
    operation: Operation,
    fields: WriteFields,
    caller: &Caller,
    safe: bool,
    return_state: bool,
) -> Result<WriteRequest, ApiError> {
    let headers = &caller.headers;
    let expected_revision = merge("If-Match", fields.expected_revision, if_match(headers)?)?;
    let lease_token = merge(LEASE_TOKEN_HEADER, fields.lease_token, header_text(headers, LEASE_TOKEN_HEADER)?)?;
    let claimed = merge(ACTOR_HEADER, fields.meta.actor, header_text(headers, ACTOR_HEADER)?)?;
    let actor = caller.identity.as_ref().map(|identity| identity.name.clone()).or(claimed);
    let respect_lease = operation.respects_leases(safe);
    Ok(WriteRequest {
        operation,
        guard: Guard { expected_revision, lease_token, respect_lease },
        meta: Meta { actor, reason: fields.meta.reason },
        return_state,
    })
}

fn merge<T: PartialEq + std::fmt::Display>(
    name: &str,
    body: Option<T>,
    header: Option<T>,
) -> Result<Option<T>, ApiError> {
    match (body, header) {
        (Some(body), Some(header)) if body != header => {
            Err(invalid(name, Some(header.to_string()), &format!("disagrees with the body's value {body}")))
        }
        (body, header) => Ok(body.or(header)),
    }
}

/// `If-Match: "7"` (also `7`, `W/"7"`); `*` sets no condition.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(text) = header_text(headers, header::IF_MATCH.as_str())? else {
        return Ok(None);
    };
    let trimmed = text.trim();
    if trimmed == "*" {
        return Ok(None);
    }
    let bare = trimmed.strip_prefix("W/").unwrap_or(trimmed).trim_matches('"');
    bare.parse().map(Some).map_err(|_| invalid("If-Match", Some(text.clone()), "must be a revision number, e.g. \"7\""))
}

fn header_text(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    headers
        .get(name)
        .map(|value| value.to_str().map(str::to_owned).map_err(|_| invalid(name, None, "must be visible ASCII text")))
        .transpose()
}

fn invalid(path: &str, value: Option<String>, message: &str) -> ApiError {
    ApiError::Invalid(vec![FieldError {
        property_path: path.to_owned(),
        invalid_value: value,
        message: message.to_owned(),
    }])
}
