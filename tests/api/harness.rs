//! `TestApp`: a Highwater server on port 0 over a fresh SQLite file, and a
//! client that speaks to it as Airbyte's clients do.

use std::net::SocketAddr;

use std::sync::Arc;

use highwater::api::{AppState, Limits};
use highwater::auth::Authenticator;
use highwater::state::ConnectionId;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::support::TestDatabase;

pub const JSON: &str = "application/json";

pub fn default_limits() -> Limits {
    Limits::default()
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
        Self::spawn_full(limits, None).await
    }

    /// A server that checks these credentials.
    #[allow(dead_code)]
    pub async fn spawn_with_auth(authenticator: Authenticator) -> Self {
        Self::spawn_full(default_limits(), Some(Arc::new(authenticator))).await
    }

    async fn spawn_full(limits: Limits, authenticator: Option<Arc<Authenticator>>) -> Self {
        let database = TestDatabase::new().await;
        let (address, stop, server) = serve(&database, limits, authenticator).await;
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
        let (address, stop, server) = serve(&self.database, default_limits(), None).await;
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
    authenticator: Option<Arc<Authenticator>>,
) -> (SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let store = database.open().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let address = listener.local_addr().expect("address");
    let (stop, stopped) = oneshot::channel::<()>();
    let app = AppState::new(store, limits, authenticator);
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

/// A response as the revision tests need it: status, `ETag` and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub body: String,
}

impl Answer {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

impl TestApp {
    /// POSTs a JSON body with extra headers; returns status, `ETag` and body.
    pub async fn send(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = self.client.post(self.url(path)).header("content-type", JSON).body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let etag = response.headers().get("etag").map(|v| v.to_str().expect("ASCII ETag").to_owned());
        Answer { status, etag, body: response.text().await.expect("body") }
    }

    /// POSTs `{"connectionId":id, <members>}` to `/v1/state/<op>`; `members`
    /// is the rest of the object's text (may be empty).
    pub async fn op(&self, op: &str, id: &str, members: &str) -> Answer {
        self.op_with(op, id, members, &[]).await
    }

    /// [`TestApp::op`] with extra headers.
    pub async fn op_with(&self, op: &str, id: &str, members: &str, headers: &[(&str, &str)]) -> Answer {
        let comma = if members.is_empty() { "" } else { "," };
        let body = format!(r#"{{"connectionId":"{id}"{comma}{members}}}"#);
        self.send(&format!("/v1/state/{op}"), &body, headers).await
    }
}

/// The body of a `KnownExceptionInfo` with a masked id and `details`
/// (serialised as the server does).
pub fn known_error_with_details(message: &str, class: &str, details: &serde_json::Value) -> String {
    format!(
        r#"{{"message":{},"exceptionClassName":"{class}","errorId":"<errorId>","details":{details}}}"#,
        quoted(message)
    )
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970");
    since.as_millis() as i64
}

/// Parses an RFC 3339 UTC timestamp as Highwater writes it
/// (`YYYY-MM-DDTHH:MM:SS[.fff…]Z`) into Unix milliseconds; panics on
/// anything else.
pub fn rfc3339_ms(text: &str) -> i64 {
    fn fail(text: &str) -> ! {
        panic!("not an RFC 3339 UTC timestamp: {text:?}")
    }
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        fail(text);
    }
    let num = |range: std::ops::Range<usize>| -> i64 {
        let part = &text[range];
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            fail(text);
        }
        part.parse().unwrap_or_else(|_| fail(text))
    };
    let (year, month, day) = (num(0..4), num(5..7), num(8..10));
    let (hour, minute, second) = (num(11..13), num(14..16), num(17..19));
    let rest = text[19..].strip_suffix('Z').unwrap_or_else(|| fail(text));
    let millis = match rest.strip_prefix('.') {
        None if rest.is_empty() => 0,
        Some(frac) if !frac.is_empty() && frac.bytes().all(|c| c.is_ascii_digit()) => {
            format!("{frac:0<3}")[..3].parse::<i64>().unwrap_or_else(|_| fail(text))
        }
        _ => fail(text),
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        fail(text);
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis
}

/// A stream item of a `connectionState`: with its blob, or without (a delete).
pub fn item(name: &str, blob: Option<&str>) -> String {
    match blob {
        Some(blob) => format!(r#"{{"streamDescriptor":{{"name":"{name}"}},"streamState":{blob}}}"#),
        None => format!(r#"{{"streamDescriptor":{{"name":"{name}"}}}}"#),
    }
}

/// The `connectionState` member of a stream write of `(name, blob)` items.
pub fn streams(items: &[(&str, Option<&str>)]) -> String {
    let items: Vec<String> = items.iter().map(|(name, blob)| item(name, *blob)).collect();
    format!(r#""connectionState":{{"stateType":"stream","streamState":[{}]}}"#, items.join(","))
}

/// The `connectionState` member for a state's JSON text.
pub fn member(state: &str) -> String {
    format!(r#""connectionState":{state}"#)
}

/// What `state/get` answers for an empty connection.
pub fn not_set(id: &str) -> String {
    format!(r#"{{"stateType":"not_set","connectionId":"{id}"}}"#)
}

/// A 200 answer with this body at `revision`.
pub fn ok(body: &str, revision: u64) -> Answer {
    Answer { status: 200, etag: Some(format!("\"{revision}\"")), body: body.to_owned() }
}

/// The body of a restore or reset: `StateWriteResult`.
pub fn write_result(id: &str, revision: u64, state: &str) -> String {
    format!(r#"{{"connectionId":"{id}","revision":{revision},"connectionState":{state}}}"#)
}

/// xorshift64: a deterministic PRNG, so a failing random test replays
/// exactly from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A small blob in one of several shapes, with spellings a JSON
    /// re-encoder would change (`1.50`, `1e3`, duplicate keys, escapes).
    pub fn blob(&mut self) -> String {
        let n = self.below(100_000);
        match self.below(7) {
            0 => format!(r#"{{"cursor":{n}}}"#),
            1 => format!(r#"[{n},"s{n}",true]"#),
            2 => format!("{n}.50"),
            3 => "null".to_owned(),
            4 => format!(r#"{{"b":{n},"a":"dup","a":1e{}}}"#, n % 9),
            5 => format!(r#""caf\u00e9 {n}""#),
            _ => format!(r#"{{"nested":{{"lsn":{n},"l":[{{}},[]]}}}}"#),
        }
    }
}

/// Expected validation errors, as (propertyPath, invalidValue, message),
/// for [`invalid_input`].
pub type FieldErrors<'a> = &'a [(&'a str, Option<&'a str>, &'a str)];
