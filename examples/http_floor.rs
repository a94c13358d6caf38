//! The HTTP floor of the benchmark suite (`bench/run`): the least an axum
//! server can do to answer `state/get`. It parses the same request body
//! (`{"connectionId": ...}`) with serde_json and answers a fixed 10-stream
//! `ConnectionState` (STATE-API.md §2) kept in memory, with no store, no
//! middleware and no logging. Highwater's `get` is measured against it.
//!
//! ```text
//! cargo run --release --example http_floor -- 127.0.0.1:18081 [CONNECTION_ID [STATE_FILE]]
//! ```
//!
//! The state is byte for byte what Highwater answers for the 10-stream
//! connection `bench/run` seeds (same connection id, names and blobs), so
//! both send responses of the same size. `GET /api/v1/health` answers
//! `{"available":true}`, for readiness polling.
//!
//! Given a `STATE_FILE`, it answers that file's bytes instead, and also
//! `state/create_or_update`, whose request it parses whole (serde_json,
//! skipping the state's contents). `bench/run` gives it Highwater's answer
//! for the 10,000-stream connection: what a one-stream `create_or_update`
//! of that connection costs with nothing stored, since Airbyte's contract
//! answers every write with the whole state after it.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde::Deserialize;

/// The connection `bench/run` seeds with 10 streams.
const DEFAULT_CONNECTION: &str = "00000000-0000-4000-8000-000000000010";

/// How many streams the fixed state carries.
const STREAMS: usize = 10;

/// The request body of `state/get`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionIdRequestBody {
    connection_id: uuid::Uuid,
}

/// The request body of `state/create_or_update`, its state checked to be
/// JSON and skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionStateCreateOrUpdate {
    connection_id: uuid::Uuid,
    #[serde(rename = "connectionState")]
    _connection_state: serde::de::IgnoredAny,
}

/// Answers `body` to a request that parses as `R`, 400 otherwise.
fn answer<R: serde::de::DeserializeOwned>(request: &[u8], body: Bytes, id: impl Fn(&R) -> uuid::Uuid) -> Response {
    match serde_json::from_slice::<R>(request) {
        Ok(parsed) => {
            std::hint::black_box(id(&parsed));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    }
}

/// The state the floor serves; `bench/run` writes the same one to Highwater
/// (see `ten_stream_write` there).
fn fixed_state(connection_id: &str) -> String {
    let streams: Vec<String> = (0..STREAMS)
        .map(|i| {
            format!(
                r#"{{"streamDescriptor":{{"name":"stream_{i:02}","namespace":"public"}},"streamState":{{"cursor":"2024-06-01T00:00:00Z","offset":{}}}}}"#,
                1_000_000 + i
            )
        })
        .collect();
    format!(r#"{{"stateType":"stream","connectionId":"{connection_id}","streamState":[{}]}}"#, streams.join(","))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args.next().unwrap_or_else(|| "127.0.0.1:18081".to_owned()).parse()?;
    let connection = args.next().unwrap_or_else(|| DEFAULT_CONNECTION.to_owned());
    let state_file = args.next();
    let body = match &state_file {
        Some(path) => Bytes::from(std::fs::read(path).map_err(|error| anyhow::anyhow!("{path}: {error}"))?),
        None => Bytes::from(fixed_state(&connection)),
    };

    let get_body = body.clone();
    let state_get = move |request: Bytes| {
        let body = get_body.clone();
        async move { answer(&request, body, |r: &ConnectionIdRequestBody| r.connection_id) }
    };
    let state_write = move |request: Bytes| {
        let body = body.clone();
        async move { answer(&request, body, |r: &ConnectionStateCreateOrUpdate| r.connection_id) }
    };
    let health = || async { ([(header::CONTENT_TYPE, "application/json")], r#"{"available":true}"#) };
    let mut app: Router = Router::new().route("/api/v1/state/get", post(state_get));
    if state_file.is_some() {
        app = app.route("/api/v1/state/create_or_update", post(state_write));
    }
    let app = app.route("/api/v1/health", get(health)).fallback(|| async { StatusCode::NOT_FOUND });

    // TCP_NODELAY, as Highwater sets it (src/startup.rs).
    let listener = tokio::net::TcpListener::bind(listen).await?.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    eprintln!("http_floor listening on {listen}");
    axum::serve(listener, app).await?;
    Ok(())
}
