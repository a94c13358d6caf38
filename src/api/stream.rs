//! One stream at a time: `state/stream/get`, `set` and `delete`, without
//! sending or receiving the rest of the state.

use axum::extract::State;
use axum::response::Response;

use super::error::ApiError;
use super::extract::JsonBody;
use super::respond::{json_at, write_request, Caller};
use super::AppState;
use crate::state::ops::Operation;
use crate::state::wire::{highwater, responses};

/// `POST /v1/state/stream/get`.
pub async fn get(State(app): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let request = highwater::decode_stream_get(&body, app.limits.decode)?;
    let (revision, blob) = app.store.read_stream(request.id, request.body.clone()).await?;
    Ok(json_at(responses::stream_result(request.id, revision, &request.body, blob.as_ref())?, revision))
}

/// `POST /v1/state/stream/set`.
pub async fn set(State(app): State<AppState>, caller: Caller, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let request = highwater::decode_stream_set(&body, app.limits.decode)?;
    let (stream, blob) = request.body;
    let operation = Operation::StreamSet { stream: stream.clone(), blob: blob.clone() };
    let write = write_request(operation, request.fields, &caller, true, false)?;
    let applied = app.store.apply(request.id, write).await?;
    Ok(json_at(responses::stream_result(request.id, applied.revision, &stream, Some(&blob))?, applied.revision))
}

/// `POST /v1/state/stream/delete`.
pub async fn delete(
    State(app): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request = highwater::decode_stream_delete(&body, app.limits.decode)?;
    let stream = request.body;
    let write =
        write_request(Operation::StreamDelete { stream: stream.clone() }, request.fields, &caller, true, false)?;
    let applied = app.store.apply(request.id, write).await?;
    Ok(json_at(responses::stream_result(request.id, applied.revision, &stream, None)?, applied.revision))
}
