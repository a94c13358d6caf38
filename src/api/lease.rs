//! Sync leases: `state/lease/acquire`, `renew`, `release` and `list`.

use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::extract::JsonBody;
use super::respond::json;
use super::AppState;
use crate::state::wire::highwater::{self, LeaseKind};
use crate::state::wire::responses;

/// `POST /v1/state/lease/acquire`: take the connection for a sync.
pub async fn acquire(app: State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    change(app, body, LeaseKind::Acquire).await
}

/// `POST /v1/state/lease/renew`: extend a live lease.
pub async fn renew(app: State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    change(app, body, LeaseKind::Renew).await
}

/// `POST /v1/state/lease/release`: give the connection back.
pub async fn release(app: State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    change(app, body, LeaseKind::Release).await
}

async fn change(State(app): State<AppState>, JsonBody(body): JsonBody, kind: LeaseKind) -> Result<Response, ApiError> {
    let request = highwater::decode_lease(&body, app.limits.decode, kind)?;
    let lease = app.store.lease(request.id, request.body).await?;
    Ok(json(match lease {
        Some(lease) => responses::lease(request.id, &lease)?,
        None => responses::released(request.id)?,
    }))
}

/// `POST /v1/state/lease/list`: live leases, without their tokens.
pub async fn list(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let id = highwater::decode_lease_list(&body, app.limits.decode)?;
    let leases = app.store.leases(id).await?;
    Ok(json(responses::lease_list(&leases)?))
}
