//! The Airbyte state endpoints: `state/get`, `state/create_or_update`,
//! `state/create_or_update_safe` and `web_backend/state/get_type`.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::JsonBody;
use super::AppState;
use crate::state::wire;

/// `POST /v1/state/get`.
pub async fn get(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let id = wire::decode_connection_id_request(&body, app.limits.decode)?;
    let state = app.store.read(id).await?;
    Ok(json(wire::render_state(id, &state)))
}

/// `POST /v1/state/create_or_update`: merge a write into the state.
pub async fn create_or_update(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let (id, write) = wire::decode_create_or_update(&body, app.limits.decode)?;
    let state = app.store.write(id, write).await?;
    Ok(json(wire::render_state(id, &state)))
}

/// `POST /v1/state/create_or_update_safe`: the same as
/// [`create_or_update`] while no sync lease exists to refuse it.
pub async fn create_or_update_safe(state: State<AppState>, body: JsonBody) -> Result<Response, ApiError> {
    create_or_update(state, body).await
}

/// `POST /v1/web_backend/state/get_type`: the type as a bare JSON string.
pub async fn get_type(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let id = wire::decode_connection_id_request(&body, app.limits.decode)?;
    let state = app.store.read(id).await?;
    Ok(json(wire::render_type(state.state_type)))
}

fn json(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
