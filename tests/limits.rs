//! The configurable limits (STATE-API.md §6 and beyond): each answers with
//! a clear error that names its setting, and nothing is written.

#[allow(dead_code)]
#[path = "api/harness.rs"]
mod harness;
#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use harness::{default_limits, invalid_input, known_error, masked, new_id, TestApp};

#[tokio::test]
async fn a_blob_over_the_blob_limit_gets_422_naming_the_setting() {
    let mut limits = default_limits();
    limits.decode.max_blob_bytes = 10;
    let app = TestApp::spawn_with(limits).await;
    let id = new_id();
    let state =
        r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"a"},"streamState":"0123456789abc"}]}"#;
    let (status, body) = app.write(&id, state).await;
    assert_eq!(status, 422);
    let path = "connectionState.streamState[0].streamState";
    let message = "is 15 bytes, more than the limit of 10 (set by --max-blob-bytes / HIGHWATER_MAX_BLOB_BYTES)";
    assert_eq!(body, invalid_input(&format!("Invalid input: {path}: {message}."), &[(path, None, message)]));
    assert!(app.read(&id).await.contains("not_set"));
}

#[tokio::test]
async fn a_stream_name_over_the_name_limit_gets_422_naming_the_setting() {
    let mut limits = default_limits();
    limits.decode.max_name_chars = 4;
    let app = TestApp::spawn_with(limits).await;
    let state = r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"users","namespace":"ok"},"streamState":1}]}"#;
    let (status, body) = app.write(&new_id(), state).await;
    assert_eq!(status, 422);
    let path = "connectionState.streamState[0].streamDescriptor.name";
    let message = "is longer than 4 characters (the limit set by --max-name-chars / HIGHWATER_MAX_NAME_CHARS)";
    assert_eq!(body, invalid_input(&format!("Invalid input: {path}: {message}."), &[(path, None, message)]));
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_get_503_but_health_still_answers() {
    let mut limits = default_limits();
    limits.max_concurrent_requests = 0;
    let app = TestApp::spawn_with(limits).await;
    let (status, body) = app.post("/api/v1/state/get", &format!(r#"{{"connectionId":"{}"}}"#, new_id())).await;
    assert_eq!(status, 503);
    let message = "Too many requests in flight (the limit is 0, set by --max-concurrent-requests / \
                   HIGHWATER_MAX_CONCURRENT_REQUESTS); retry shortly.";
    assert_eq!(masked(&body), known_error(message, "Overloaded"));
    assert_eq!(app.get("/api/v1/health").await.0, 200);
}

#[tokio::test]
async fn a_request_over_the_timeout_gets_503_saying_a_write_may_have_landed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut limits = default_limits();
    limits.request_timeout = Duration::from_millis(300);
    let app = TestApp::spawn_with(limits).await;
    // A client that announces a body and then stalls, as a slow or
    // malicious one would.
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let head = "POST /api/v1/state/get HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\nConnection: close\r\n\r\n{\"connectionId\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer)).await;
    assert!(read.is_ok(), "no answer within 10 s");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let message =
        "The request took longer than 0.3s (set by --request-timeout-secs / HIGHWATER_REQUEST_TIMEOUT_SECS); \
                   a write may or may not have been applied: read the state, or retry with expectedRevision.";
    assert_eq!(masked(body), known_error(message, "RequestTimeout"));
}

#[tokio::test]
async fn a_connection_that_does_not_finish_its_headers_or_stays_idle_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut limits = default_limits();
    limits.header_read_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_with(limits).await;
    let closed_within = |mut stream: tokio::net::TcpStream| async move {
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection is still open after 10 s");
        started.elapsed()
    };

    // Headers sent a part at a time, never finished: a connection and its
    // file descriptor held for ever, were it not closed.
    let mut slow = tokio::net::TcpStream::connect(app.address).await.unwrap();
    slow.write_all(b"POST /api/v1/state/get HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let waited = closed_within(slow).await;
    assert!(waited >= Duration::from_millis(400), "closed after {waited:?}, before its time");

    // A kept-alive connection is answered, then closed once idle as long.
    let mut idle = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let body = format!(r#"{{"connectionId":"{}"}}"#, new_id());
    let request = format!(
        "POST /api/v1/state/get HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    idle.write_all(request.as_bytes()).await.unwrap();
    let mut answer = [0; 15];
    idle.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200 OK");
    closed_within(idle).await;

    // A client that keeps to the time is served as before.
    assert_eq!(app.get("/api/v1/health").await.0, 200);
}

/// A server accepting bodies of up to 1 MiB, with `mib` MiB for the
/// requests being served.
async fn app_with_request_memory(mib: usize) -> TestApp {
    let mut limits = default_limits();
    limits.max_body_bytes = 1024 * 1024;
    limits.request_memory_bytes = mib * 1024 * 1024;
    TestApp::spawn_with(limits).await
}

/// A write whose head ends with `framing` (its length or chunking, and the
/// first bytes of its body), then nothing more: it holds what its body is
/// counted as until the returned connection is dropped.
async fn stalled_upload(address: std::net::SocketAddr, framing: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /api/v1/state/create_or_update HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream
}

#[tokio::test]
async fn a_request_that_would_go_beyond_the_request_memory_waits_for_others_to_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Room for one request with the largest body: counted twice its body.
    let app = app_with_request_memory(2).await;

    // A client that announces the largest body and sends a part of it.
    let large =
        stalled_upload(app.address, &format!("Content-Length: {}\r\n\r\n{{\"connectionId\":", 1024 * 1024)).await;

    // Another write waits while the first holds the memory ...
    let id = new_id();
    let state = r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"a"},"streamState":1}]}"#;
    let mut small = std::pin::pin!(app.write(&id, state));
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut small).await;
    assert!(waited.is_err(), "answered while the memory was taken: {waited:?}");

    // A request refused before its body is read takes none of it.
    let mut refused = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/state/nowhere HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        1024 * 1024
    );
    refused.write_all(head.as_bytes()).await.unwrap();
    let mut status = [0; 12];
    let read = tokio::time::timeout(Duration::from_secs(5), refused.read_exact(&mut status)).await;
    assert!(read.is_ok(), "a request for no route waited for the memory");
    assert_eq!(&status, b"HTTP/1.1 404");

    // ... and goes on once that client is gone.
    drop(large);
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), small).await.expect("still waiting");
    assert_eq!(status, 200);
    assert!(app.read(&id).await.contains("\"a\""));
}

/// Sends `body` to `path` in chunks of `chunk` bytes without a length, and
/// returns the answer's status line, read while the body is still being
/// sent (an answer may come before the end of the body: 413).
async fn post_chunked(address: std::net::SocketAddr, path: &str, body: &[u8], chunk: usize) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (read, mut write) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    );
    let body = body.to_vec();
    let sender = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        for piece in body.chunks(chunk) {
            write.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).await?;
            write.write_all(piece).await?;
            write.write_all(b"\r\n").await?;
        }
        write.write_all(b"0\r\n\r\n").await?;
        std::io::Result::Ok(write)
    });
    let mut status = String::new();
    tokio::io::BufReader::new(read).read_line(&mut status).await.unwrap();
    sender.abort();
    status.trim_end().to_owned()
}

#[tokio::test]
async fn a_body_sent_without_a_length_is_counted_as_it_arrives() {
    // Room for one request with the largest body and a little more.
    let app = app_with_request_memory(3).await;

    // A body sent without a length, stalled after its first chunk: it
    // holds what its first bytes count as (128 kB), not the largest body's
    // share (2 MiB), which would leave too little for the next.
    let stalled = stalled_upload(app.address, "Transfer-Encoding: chunked\r\n\r\n10\r\n{\"connectionId\":\r\n").await;

    // Another, of 700 kB in chunks of 64 kB, is counted up as it arrives
    // and answered beside it.
    let id = new_id();
    let blob = format!(r#"{{"pad":"{}"}}"#, "x".repeat(700 * 1024));
    let body = format!(
        r#"{{"connectionId":"{id}","connectionState":{{"stateType":"stream","streamState":[{{"streamDescriptor":{{"name":"a"}},"streamState":{blob}}}]}}}}"#
    );
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        post_chunked(app.address, "/api/v1/state/create_or_update", body.as_bytes(), 64 * 1024),
    )
    .await
    .expect("a body sent without a length waited beside a stalled one");
    assert_eq!(answered, "HTTP/1.1 200 OK");
    assert!(app.read(&id).await.contains(&"x".repeat(1000)));

    // Over the limit, it is refused as one with a length would be.
    let too_large = format!(r#"{{"connectionId":"{id}","pad":"{}"}}"#, "x".repeat(1024 * 1024));
    let refused = post_chunked(app.address, "/api/v1/state/create_or_update", too_large.as_bytes(), 64 * 1024).await;
    assert_eq!(refused, "HTTP/1.1 413 Payload Too Large");
    drop(stalled);
}
