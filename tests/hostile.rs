//! Hostile request bodies over real HTTP: every case of `tests/hostile/`
//! (listed in `tests/hostile/cases.tsv`) against one server, each on a fresh
//! connection that holds a known state first. A refused request must answer
//! in one of the two error shapes and leave the known state byte for byte as
//! it was; an accepted one must leave exactly the state its case expects.
//! The 100 MB body is generated here rather than checked in.

#[allow(dead_code)] // The API suite uses the rest of the harness.
#[path = "api/harness.rs"]
mod harness;
#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use harness::{default_limits, new_id, TestApp, JSON};
use serde_json::Value;

const KNOWN_STATE: &str = r#"{"stateType":"legacy","state":{"known":[1,2.50,"x"]}}"#;
const WRITE_ROUTES: &[&str] = &["/state/create_or_update", "/state/create_or_update_safe"];

/// One line of `cases.tsv`.
struct Case {
    file: String,
    route: String,
    content_type: Option<String>,
    status: u16,
    /// The file holding the expected `state/get` body afterwards; `None`
    /// when the known state must be unchanged.
    after: Option<String>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

fn load_cases() -> Vec<Case> {
    let listing = std::fs::read_to_string(corpus_dir().join("cases.tsv")).expect("tests/hostile/cases.tsv");
    let optional = |field: &str| (field != "-").then(|| field.to_owned());
    listing
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [file, route, content_type, status, after] = fields[..] else {
                panic!("cases.tsv: expected 5 tab-separated fields in {line:?}");
            };
            let status = status.parse().unwrap_or_else(|_| panic!("cases.tsv: bad status in {line:?}"));
            Case {
                file: file.to_owned(),
                route: route.to_owned(),
                content_type: optional(content_type),
                status,
                after: optional(after),
            }
        })
        .collect()
}

/// Replaces every occurrence of `from` in `bytes`, leaving all other bytes
/// (invalid UTF-8 included) untouched.
fn replace_bytes(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let from = from.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.starts_with(from) {
            out.extend_from_slice(to.as_bytes());
            rest = &rest[from.len()..];
        } else {
            out.push(rest[0]);
            rest = &rest[1..];
        }
    }
    out
}

/// The placeholders of `cases.tsv` filled in for connection `id`.
fn substitute(bytes: &[u8], id: &str) -> Vec<u8> {
    let escaped: String = id.chars().map(|c| format!("\\u{:04x}", u32::from(c))).collect();
    let bytes = replace_bytes(bytes, "{{ID_UPPER}}", &id.to_uppercase());
    let bytes = replace_bytes(&bytes, "{{ID_ESCAPED}}", &escaped);
    replace_bytes(&bytes, "{{ID}}", id)
}

/// Checks a 4xx body is one of Airbyte's two error shapes, and the one the
/// status calls for (STATE-API.md §4.4): 422 is `InvalidInputExceptionInfo`,
/// everything else `KnownExceptionInfo`.
fn error_shape_problem(status: u16, body: &str) -> Option<String> {
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(body) else {
        return Some(format!("error body is not a JSON object: {body}"));
    };
    // `details` is an optional object of Airbyte's KnownExceptionInfo.
    let details_ok = fields.get("details").is_none_or(Value::is_object);
    let mut names: Vec<&str> = fields.keys().map(String::as_str).filter(|name| *name != "details").collect();
    names.sort_unstable();
    let message_ok = fields.get("message").and_then(Value::as_str).is_some_and(|m| !m.is_empty());
    if status == 422 {
        let items = fields.get("validationErrors").and_then(Value::as_array);
        let items_ok = items.is_some_and(|items| {
            !items.is_empty()
                && items.iter().all(|item| {
                    item.get("propertyPath").is_some_and(Value::is_string)
                        && item.get("message").is_some_and(Value::is_string)
                        && item.get("invalidValue").is_none_or(Value::is_string)
                })
        });
        if names == ["message", "validationErrors"] && message_ok && items_ok {
            return None;
        }
        return Some(format!("422 body is not an InvalidInputExceptionInfo naming a field: {body}"));
    }
    let id_ok = fields
        .get("errorId")
        .and_then(Value::as_str)
        .is_some_and(|id| highwater::state::ConnectionId::parse(id).is_some());
    let class_ok = fields.get("exceptionClassName").and_then(Value::as_str).is_some_and(|c| !c.is_empty());
    if names == ["errorId", "exceptionClassName", "message"] && message_ok && id_ok && class_ok && details_ok {
        return None;
    }
    Some(format!("{status} body is not a KnownExceptionInfo: {body}"))
}

/// Runs one case on a fresh connection; returns what went wrong.
async fn run_case(app: &TestApp, case: &Case) -> Vec<String> {
    let id = new_id();
    let (status, body) = app.write(&id, KNOWN_STATE).await;
    assert_eq!(status, 200, "writing the known state: {body}");
    let known = app.read(&id).await;

    let raw = std::fs::read(corpus_dir().join(&case.file)).unwrap_or_else(|e| panic!("{}: {e}", case.file));
    let request = substitute(&raw, &id);
    let (status, answer) = app.post_bytes(&case.route, request, case.content_type.as_deref()).await;
    let mut problems = Vec::new();
    if status != case.status {
        problems.push(format!("status {status}, expected {}; body: {}", case.status, shorten(&answer)));
    }
    if (400..500).contains(&status) {
        problems.extend(error_shape_problem(status, &answer));
    }

    let after = app.read(&id).await;
    let expected = match &case.after {
        None => known,
        Some(file) => {
            let text = std::fs::read(corpus_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            String::from_utf8(substitute(&text, &id)).expect("expected-state files are UTF-8")
        }
    };
    if after != expected {
        problems.push(format!("state afterwards is {}, expected {}", shorten(&after), shorten(&expected)));
    }
    let is_write = WRITE_ROUTES.iter().any(|route| case.route.ends_with(route));
    if status == 200 && is_write && answer != after {
        problems.push(format!("write answered {}, but state/get then reads {}", shorten(&answer), shorten(&after)));
    }
    problems.into_iter().map(|p| format!("{} ({} {}): {p}", case.file, case.route, case.status)).collect()
}

fn shorten(text: &str) -> String {
    const MAX: usize = 300;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()),
        None => text.to_owned(),
    }
}

#[tokio::test]
async fn every_hostile_case_gets_its_status_and_leaves_exactly_the_expected_state() {
    let cases = load_cases();
    assert!(cases.len() >= 100, "cases.tsv lists only {} cases", cases.len());
    let app = TestApp::spawn().await;
    let mut problems = Vec::new();
    for case in &cases {
        problems.extend(run_case(&app, case).await);
    }
    assert!(problems.is_empty(), "{} of {} cases failed:\n{}", problems.len(), cases.len(), problems.join("\n"));
}

#[test]
fn every_corpus_file_is_listed_in_cases_tsv() {
    let cases = load_cases();
    let mut listed: Vec<&str> = cases.iter().map(|c| c.file.as_str()).collect();
    listed.extend(cases.iter().filter_map(|c| c.after.as_deref()));
    listed.push("cases.tsv");
    for entry in std::fs::read_dir(corpus_dir()).expect("tests/hostile") {
        let name = entry.expect("directory entry").file_name().into_string().expect("UTF-8 file name");
        assert!(listed.contains(&name.as_str()), "tests/hostile/{name} is not listed in cases.tsv");
    }
}

#[tokio::test]
async fn a_hundred_megabyte_body_over_an_eight_megabyte_limit_gets_413_and_writes_nothing() {
    const EIGHT_MIB: usize = 8 * 1024 * 1024;
    const HUNDRED_MB: usize = 100 * 1000 * 1000;
    let mut limits = default_limits();
    limits.max_body_bytes = EIGHT_MIB;
    let app = TestApp::spawn_with(limits).await;
    let id = new_id();
    let (status, body) = app.write(&id, KNOWN_STATE).await;
    assert_eq!(status, 200, "{body}");
    let known = app.read(&id).await;

    let head = format!(r#"{{"connectionId":"{id}","connectionState":{{"stateType":"legacy","state":""#);
    let tail = r#""}}"#;
    let mut request = Vec::with_capacity(HUNDRED_MB);
    request.extend_from_slice(head.as_bytes());
    request.resize(HUNDRED_MB - tail.len(), b'x');
    request.extend_from_slice(tail.as_bytes());
    assert_eq!(request.len(), HUNDRED_MB);

    for route in ["/api/v1/state/create_or_update", "/v1/state/create_or_update_safe"] {
        let (status, answer) = app.post_bytes(route, request.clone(), Some(JSON)).await;
        assert_eq!(status, 413, "{route}: {}", shorten(&answer));
        assert_eq!(error_shape_problem(status, &answer), None);
        assert!(answer.contains("PayloadTooLarge"), "{answer}");
        assert_eq!(app.read(&id).await, known, "{route} changed the state");
    }
}

#[tokio::test]
async fn a_hundred_megabyte_chunked_body_without_a_length_gets_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CHUNK: usize = 64 * 1024;
    let mut limits = default_limits();
    limits.max_body_bytes = 8 * 1024 * 1024;
    let app = TestApp::spawn_with(limits).await;
    let stream = tokio::net::TcpStream::connect(app.address).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let sender = tokio::spawn(async move {
        let head = "POST /api/v1/state/create_or_update HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                    transfer-encoding: chunked\r\n\r\n";
        writer.write_all(head.as_bytes()).await?;
        let chunk = [format!("{CHUNK:x}\r\n").into_bytes(), vec![b' '; CHUNK], b"\r\n".to_vec()].concat();
        let mut sent = 0;
        while sent < 100_000_000 {
            writer.write_all(&chunk).await?;
            sent += CHUNK;
        }
        writer.write_all(b"0\r\n\r\n").await?;
        Ok::<usize, std::io::Error>(sent)
    });
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = reader.read(&mut buffer).await.expect("read the response");
        assert!(read > 0, "connection closed before a response: {:?}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&buffer[..read]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // The server may stop reading at the limit: the sender then fails to
    // write the rest, which is what it should do.
    sender.abort();
}
