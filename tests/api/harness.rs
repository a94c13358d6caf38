//! `TestApp`: a Highwater server on port 0 over a fresh SQLite file, and a
//! client that speaks to it as Airbyte's clients do.

use std::net::SocketAddr;

use highwater::api::{AppState, Limits};
use highwater::state::wire::DecodeLimits;
use highwater::state::ConnectionId;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::TestDatabase;

pub const JSON: &str = "application/json";

pub fn default_limits() -> Limits {
    Limits { max_body_bytes: 128 * 1024 * 1024, decode: DecodeLimits { max_depth: 128, max_streams: 100_000 } }
}

pub struct TestApp {
    pub address: SocketAddr,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    // Declared last: dropped after the server has been told to stop.
    pub database: TestDatabase,
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(default_limits()).await
    }

    pub async fn spawn_with(limits: Limits) -> Self {
        let database = TestDatabase::new().await;
        let (address, stop, server) = serve(&database, limits).await;
        Self { address, client: reqwest::Client::new(), stop: Some(stop), server: Some(server), database }
    }

    /// Stops the server (finishing what is in flight) and starts a new one
    /// on the same database.
    pub async fn restart(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.expect("server task");
        }
        let (address, stop, server) = serve(&self.database, default_limits()).await;
        self.address = address;
        self.stop = Some(stop);
        self.server = Some(server);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// POSTs a JSON body; returns status and body text.
    pub async fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.post_bytes(path, body.as_bytes().to_vec(), Some(JSON)).await
    }

    pub async fn post_bytes(&self, path: &str, body: Vec<u8>, content_type: Option<&str>) -> (u16, String) {
        let mut request = self.client.post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// `create_or_update` of `state` (the `connectionState` JSON) for `id`.
    pub async fn write(&self, id: &str, state: &str) -> (u16, String) {
        let body = format!(r#"{{"connectionId":"{id}","connectionState":{state}}}"#);
        self.post("/api/v1/state/create_or_update", &body).await
    }

    /// `state/get` for `id`, which must succeed.
    pub async fn read(&self, id: &str) -> String {
        let (status, body) = self.post("/api/v1/state/get", &format!(r#"{{"connectionId":"{id}"}}"#)).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn serve(
    database: &TestDatabase,
    limits: Limits,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let store = database.open().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let app = AppState { store, limits };
    let server = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        highwater::startup::run(listener, app, shutdown).await.expect("serve");
    });
    (address, stop, server)
}

/// A fresh connection id, so no two tests share state.
pub fn new_id() -> String {
    ConnectionId::random().to_string()
}

/// Replaces the random `errorId` of a `KnownExceptionInfo` body with
/// `<errorId>` after checking it is a UUID, so bodies compare exactly.
pub fn masked(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).expect("error body is JSON");
    let id = value["errorId"].as_str().expect("errorId present");
    assert!(ConnectionId::parse(id).is_some(), "errorId {id} is not a UUID");
    body.replace(id, "<errorId>")
}

/// The body of a `KnownExceptionInfo` with a masked id.
pub fn known_error(message: &str, class: &str) -> String {
    format!(r#"{{"message":{},"exceptionClassName":"{class}","errorId":"<errorId>"}}"#, quoted(message))
}

/// The body of an `InvalidInputExceptionInfo`: the message, then each
/// error as (propertyPath, invalidValue, message).
pub fn invalid_input(message: &str, errors: &[(&str, Option<&str>, &str)]) -> String {
    let items: Vec<String> = errors
        .iter()
        .map(|(path, value, message)| {
            let value = value.map_or(String::new(), |v| format!(r#","invalidValue":{}"#, quoted(v)));
            format!(r#"{{"propertyPath":{}{value},"message":{}}}"#, quoted(path), quoted(message))
        })
        .collect();
    format!(r#"{{"message":{},"validationErrors":[{}]}}"#, quoted(message), items.join(","))
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}
