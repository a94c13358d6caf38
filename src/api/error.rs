//! Wire errors: what a client sees when a request fails.
//!
//! Policy: every failure answers in one of Airbyte's two error shapes.
//! Schema problems (422) use `InvalidInputExceptionInfo` with one
//! `validationErrors` item per bad field; everything else uses
//! `KnownExceptionInfo` with a stable `exceptionClassName` and a fresh
//! `errorId`. The same `errorId` goes to the log together with the cause.
//! Causes (SQL, file paths, driver text) are logged, never sent: a 5xx body
//! holds a fixed sentence and the id to look up.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Role;
use crate::config::{
    MAX_BLOB_SETTING, MAX_BODY_SETTING, MAX_CONCURRENT_SETTING, MAX_DEPTH_SETTING, MAX_NAME_SETTING,
    MAX_STREAMS_SETTING, REQUEST_TIMEOUT_SETTING,
};
use crate::state::ops::{Refusal, SYNC_RUNNING};
use crate::state::wire::responses::{timestamp, RenderError};
use crate::state::wire::{DecodeError, FieldError};
use crate::store::StoreError;

/// A failed request, by what the client can do about it.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the body is not JSON.
    BadJson(String),
    /// 422: the body breaks the schema or a decoding limit.
    Invalid(Vec<FieldError>),
    /// 409 / 423 / 404: the rules refuse the request (type change, revision
    /// mismatch, leases, unknown revision).
    Refused(Refusal),
    /// 413: the body is larger than the configured limit (bytes).
    TooLarge { limit: usize },
    /// 415: the Content-Type is present and not JSON.
    UnsupportedMediaType(String),
    /// 401: no or wrong credentials (the reason is logged, not sent).
    Unauthorized(&'static str),
    /// 403: authenticated, but the role does not allow the route.
    Forbidden { role: Role, needs: Role },
    /// 404: no such route.
    NotFound(String),
    /// 405: the route exists for another method.
    MethodNotAllowed(String),
    /// 503: too many requests in flight (the limit).
    Overloaded(usize),
    /// 503: the request took longer than the timeout.
    TimedOut(std::time::Duration),
    /// 503: storage cannot be reached now; retrying may work.
    Unavailable(String),
    /// 507: storage is full; nothing was written.
    StorageFull(String),
    /// 500: a bug or damaged data; the cause is logged only.
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadJson(_) => StatusCode::BAD_REQUEST,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Refused(refusal) => match refusal {
                Refusal::TypeConflict(_) | Refusal::RevisionMismatch { .. } | Refusal::StaleLease => {
                    StatusCode::CONFLICT
                }
                Refusal::Locked { .. } | Refusal::LeaseHeld { .. } => StatusCode::LOCKED,
                Refusal::RevisionNotFound { .. } | Refusal::RevisionPruned { .. } => StatusCode::NOT_FOUND,
            },
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) | Self::Overloaded(_) | Self::TimedOut(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::StorageFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable short name clients may match on.
    fn class_name(&self) -> &'static str {
        match self {
            Self::BadJson(_) => "InvalidJson",
            Self::Invalid(_) => "InvalidInput",
            Self::Refused(refusal) => match refusal {
                Refusal::TypeConflict(_) => "StateTypeConflict",
                Refusal::RevisionMismatch { .. } => "RevisionConflict",
                Refusal::StaleLease => "LeaseConflict",
                Refusal::Locked { .. } => "SyncInProgress",
                Refusal::LeaseHeld { .. } => "LeaseHeld",
                Refusal::RevisionNotFound { .. } | Refusal::RevisionPruned { .. } => "RevisionNotFound",
            },
            Self::TooLarge { .. } => "PayloadTooLarge",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::Unauthorized(_) => "Unauthorized",
            Self::Forbidden { .. } => "Forbidden",
            Self::NotFound(_) => "NotFound",
            Self::MethodNotAllowed(_) => "MethodNotAllowed",
            Self::Unavailable(_) => "StorageUnavailable",
            Self::Overloaded(_) => "Overloaded",
            Self::TimedOut(_) => "RequestTimeout",
            Self::StorageFull(_) => "StorageFull",
            Self::Internal(_) => "InternalError",
        }
    }

    /// The sentence sent to the client: safe to show, never a cause.
    fn public_message(&self) -> String {
        match self {
            Self::BadJson(detail) => format!("The request body is not valid JSON: {detail}."),
            Self::Invalid(errors) => match errors.as_slice() {
                [only] => format!("Invalid input: {only}."),
                [first, rest @ ..] => format!("Invalid input: {first} (and {} more).", rest.len()),
                [] => "Invalid input.".to_owned(),
            },
            Self::Refused(Refusal::Locked { .. }) => SYNC_RUNNING.to_owned(),
            Self::Refused(refusal) => {
                let mut text = refusal.to_string();
                text[..1].make_ascii_uppercase();
                text + "."
            }
            Self::TooLarge { limit } => {
                format!("The request body is larger than the limit of {limit} bytes (set by {MAX_BODY_SETTING}).")
            }
            Self::UnsupportedMediaType(found) => {
                format!("Content-Type {found:?} is not supported; send application/json.")
            }
            Self::Unauthorized(_) => {
                "Authentication required: send Basic credentials or a Bearer token that Highwater knows.".to_owned()
            }
            Self::Forbidden { role, needs } => {
                format!("The {} role may not do this; it needs the {} role.", role.as_str(), needs.as_str())
            }
            Self::NotFound(route) => format!("No such route: {route}."),
            Self::MethodNotAllowed(route) => format!("Method not allowed: {route}."),
            Self::Unavailable(_) => "The state store is unavailable; nothing was written. Retry later.".to_owned(),
            Self::Overloaded(limit) => format!(
                "Too many requests in flight (the limit is {limit}, set by {MAX_CONCURRENT_SETTING}); retry shortly."
            ),
            Self::TimedOut(timeout) => format!(
                "The request took longer than {}s (set by {REQUEST_TIMEOUT_SETTING}); a write may or may not have \
                 been applied: read the state, or retry with expectedRevision.",
                timeout.as_secs_f64()
            ),
            Self::StorageFull(_) => "The state store is out of space; nothing was written.".to_owned(),
            Self::Internal(_) => "Internal error; the server log has the details under this errorId.".to_owned(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct KnownExceptionInfo {
    message: String,
    exception_class_name: &'static str,
    error_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<serde_json::Value>,
}

impl ApiError {
    /// Machine-readable facts about a refusal, for clients that act on it.
    fn details(&self) -> Option<serde_json::Value> {
        use serde_json::json;
        let Self::Refused(refusal) = self else {
            return None;
        };
        match refusal {
            Refusal::RevisionMismatch { expected, current } => {
                Some(json!({ "expectedRevision": expected, "currentRevision": current }))
            }
            Refusal::Locked { holder, expires_at_ms } | Refusal::LeaseHeld { holder, expires_at_ms } => {
                Some(json!({ "holder": holder, "expiresAt": timestamp(*expires_at_ms) }))
            }
            Refusal::RevisionNotFound { revision, current } => {
                Some(json!({ "revision": revision, "currentRevision": current }))
            }
            Refusal::RevisionPruned { revision, oldest } => {
                Some(json!({ "revision": revision, "oldestRevision": oldest }))
            }
            Refusal::TypeConflict(_) | Refusal::StaleLease => None,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InvalidInputExceptionInfo<'a> {
    message: String,
    validation_errors: Vec<InvalidInputProperty<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InvalidInputProperty<'a> {
    property_path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid_value: Option<&'a str>,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.public_message();
        let body = if let Self::Invalid(errors) = &self {
            tracing::info!(status = status.as_u16(), %message, "request refused");
            serde_json::to_vec(&InvalidInputExceptionInfo {
                message,
                validation_errors: errors
                    .iter()
                    .map(|e| InvalidInputProperty {
                        property_path: &e.property_path,
                        invalid_value: e.invalid_value.as_deref(),
                        message: &e.message,
                    })
                    .collect(),
            })
        } else {
            let error_id = Uuid::new_v4();
            match &self {
                Self::Unavailable(cause) | Self::StorageFull(cause) | Self::Internal(cause) => {
                    tracing::error!(%error_id, status = status.as_u16(), %cause, "request failed");
                }
                _ => {
                    tracing::info!(%error_id, status = status.as_u16(), %message, "request refused")
                }
            }
            serde_json::to_vec(&KnownExceptionInfo {
                message,
                exception_class_name: self.class_name(),
                error_id,
                details: self.details(),
            })
        };
        // Serialising these plain structs cannot fail; an empty body would
        // still carry the status.
        let mut response = (status, body.unwrap_or_default()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if status == StatusCode::UNAUTHORIZED {
            let challenge = HeaderValue::from_static("Basic realm=\"highwater\", Bearer realm=\"highwater\"");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

impl From<DecodeError> for ApiError {
    fn from(error: DecodeError) -> Self {
        let limit = |message: String| {
            Self::Invalid(vec![FieldError { property_path: String::new(), invalid_value: None, message }])
        };
        match error {
            DecodeError::Syntax(detail) => Self::BadJson(detail),
            DecodeError::Invalid(errors) => Self::Invalid(errors),
            DecodeError::TooDeep { limit: max } => {
                limit(format!("JSON nests deeper than {max} levels (the limit set by {MAX_DEPTH_SETTING})"))
            }
            DecodeError::TooManyStreams { count, limit: max } => {
                limit(format!("{count} streams in one request; the limit is {max} (set by {MAX_STREAMS_SETTING})"))
            }
            DecodeError::BlobTooLarge { path, size, limit: max } => Self::Invalid(vec![FieldError {
                property_path: path,
                invalid_value: None,
                message: format!("is {size} bytes, more than the limit of {max} (set by {MAX_BLOB_SETTING})"),
            }]),
            DecodeError::NameTooLong { path, limit: max } => Self::Invalid(vec![FieldError {
                property_path: path,
                invalid_value: None,
                message: format!("is longer than {max} characters (the limit set by {MAX_NAME_SETTING})"),
            }]),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Refused(refusal) => Self::Refused(refusal),
            StoreError::Unavailable(cause) => Self::Unavailable(cause),
            StoreError::Full(cause) => Self::StorageFull(cause),
            StoreError::Internal(cause) => Self::Internal(cause),
        }
    }
}

impl From<RenderError> for ApiError {
    fn from(error: RenderError) -> Self {
        Self::Internal(error.to_string())
    }
}
