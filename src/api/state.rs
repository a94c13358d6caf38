//! The Airbyte state endpoints: `state/get`, `state/create_or_update`,
//! `state/create_or_update_safe` and `web_backend/state/get_type`.
//! Bodies are exactly Airbyte's; Highwater adds the `ETag` header and
//! accepts its write fields.

use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::extract::JsonBody;
use super::respond::{json, json_at, write_request, Caller};
use super::AppState;
use crate::state::ops::Operation;
use crate::state::wire::{self, highwater};

/// `POST /v1/state/get`, optionally `revision` to read the past.
pub async fn get(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let request = highwater::decode_get(&body, app.limits.decode)?;
    let state = app.store.read_at(request.id, request.body).await?;
    // Only current states are worth keeping rendered; a past one would push
    // the current one out.
    let body = match request.body {
        None => app.rendered.render(request.id, &state),
        Some(_) => wire::render_state(request.id, &state).into(),
    };
    Ok(json_at(body, state.revision))
}

/// `POST /v1/state/create_or_update`: merge a write into the state. A live
/// sync lease does not stop it (Airbyte's behaviour) unless it carries a
/// stale token.
pub async fn create_or_update(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    merge(app, caller, body, false).await
}

/// `POST /v1/state/create_or_update_safe`: the same, refused with 423 while
/// a sync holds the connection.
pub async fn create_or_update_safe(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    merge(app, caller, body, true).await
}

async fn merge(app: AppState, caller: Caller, body: axum::body::Bytes, safe: bool) -> Result<Response, ApiError> {
    let request = highwater::decode_write(&body, app.limits.decode)?;
    // The blobs are copied out; a large body need not stay in memory too.
    drop(body);
    let id = request.id;
    let write = write_request(Operation::Merge(request.body), request.fields, &caller, safe, true)?;
    let applied = app.store.apply(id, write).await?;
    let state = applied.state.unwrap_or_default();
    Ok(json_at(app.rendered.render(id, &state), applied.revision))
}

/// `POST /v1/web_backend/state/get_type`: the type as a bare JSON string.
pub async fn get_type(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let id = wire::decode_connection_id_request(&body, app.limits.decode)?;
    let state = app.store.read(id).await?;
    Ok(json(wire::render_type(state.state_type)))
}
