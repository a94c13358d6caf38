//! Revisions: `state/history`, `state/diff`, `state/restore`, `state/reset`.

use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::extract::JsonBody;
use super::respond::{json, json_at, write_request, Caller};
use super::AppState;
use crate::state::history::diff as state_diff;
use crate::state::ops::Operation;
use crate::state::wire::{highwater, responses};

/// `POST /v1/state/history`: a page of revisions, newest first.
pub async fn history(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let request = highwater::decode_history(&body, app.limits.decode)?;
    let query = request.body;
    let history = app.store.history(request.id, query.limit, query.before).await?;
    Ok(json(responses::history(request.id, &history, query.limit)?))
}

/// `POST /v1/state/diff`: what changed between two revisions.
pub async fn diff(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let request = highwater::decode_diff(&body, app.limits.decode)?;
    let (from, to) = request.body;
    let before = app.store.read_at(request.id, Some(from)).await?;
    let after = app.store.read_at(request.id, Some(to)).await?;
    let changes = state_diff(&before, &after);
    Ok(json(responses::diff(request.id, (from, to), (before.state_type, after.state_type), &changes)?))
}

/// `POST /v1/state/restore`: a new revision equal to an earlier one.
pub async fn restore(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request = highwater::decode_restore(&body, app.limits.decode)?;
    let operation = Operation::Restore { revision: request.body };
    write(app, caller, request.id, operation, request.fields).await
}

/// `POST /v1/state/reset`: clear the state, or listed streams.
pub async fn reset(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request = highwater::decode_reset(&body, app.limits.decode)?;
    let query = request.body;
    let operation = Operation::Reset { streams: query.streams, include_shared: query.include_shared };
    write(app, caller, request.id, operation, request.fields).await
}

async fn write(
    app: AppState,
    caller: Caller,
    id: crate::state::ConnectionId,
    operation: Operation,
    fields: highwater::WriteFields,
) -> Result<Response, ApiError> {
    let write = write_request(operation, fields, &caller, true, true)?;
    let applied = app.store.apply(id, write).await?;
    let state = applied.state.unwrap_or_default();
    Ok(json_at(responses::write_result(id, applied.revision, &state)?, applied.revision))
}
