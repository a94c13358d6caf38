//! Refused requests (STATE-API.md §4.3, §4.4, §6): exact status and body
//! for each case, and nothing written.

use crate::harness::{default_limits, invalid_input, known_error, masked, new_id, TestApp, JSON};

type Case = (&'static str, &'static str, Option<&'static str>, &'static str);

/// (connectionState JSON, propertyPath, invalidValue, message) for writes
/// that break the schema.
const INVALID_STATES: &[Case] = &[
    ("[]", "connectionState", Some("[]"), "must be an object"),
    (r#"{}"#, "connectionState.stateType", None, "is required"),
    (
        r#"{"stateType":"STREAM"}"#,
        "connectionState.stateType",
        Some("STREAM"),
        "must be one of legacy, global, stream, not_set",
    ),
    (r#"{"stateType":7}"#, "connectionState.stateType", Some("7"), "must be one of legacy, global, stream, not_set"),
    (
        r#"{"stateType":"not_set"}"#,
        "connectionState.stateType",
        Some("not_set"),
        "not_set cannot be written; to clear a state, delete its entries with a write of its own type",
    ),
    (r#"{"stateType":"global"}"#, "connectionState.globalState", None, "is required for a global state"),
    (r#"{"stateType":"global","globalState":null}"#, "connectionState.globalState", Some("null"), "must be an object"),
    (r#"{"stateType":"global","globalState":[1]}"#, "connectionState.globalState", Some("[1]"), "must be an object"),
    (
        r#"{"stateType":"global","globalState":{"streamStates":{}}}"#,
        "connectionState.globalState.streamStates",
        Some("{}"),
        "must be an array",
    ),
    (
        r#"{"stateType":"global","globalState":{"shared_state":1,"sharedState":2}}"#,
        "connectionState.globalState.sharedState",
        Some("2"),
        "must not be sent together with shared_state",
    ),
    (r#"{"stateType":"stream","streamState":"x"}"#, "connectionState.streamState", Some("x"), "must be an array"),
    (r#"{"stateType":"stream","streamState":[5]}"#, "connectionState.streamState[0]", Some("5"), "must be an object"),
    (
        r#"{"stateType":"stream","streamState":[{"streamState":1}]}"#,
        "connectionState.streamState[0].streamDescriptor",
        None,
        "is required",
    ),
    (
        r#"{"stateType":"stream","streamState":[{"streamDescriptor":{}}]}"#,
        "connectionState.streamState[0].streamDescriptor.name",
        None,
        "is required",
    ),
    (
        r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":null}}]}"#,
        "connectionState.streamState[0].streamDescriptor.name",
        Some("null"),
        "must be a string",
    ),
    (
        r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"a","namespace":1}}]}"#,
        "connectionState.streamState[0].streamDescriptor.namespace",
        Some("1"),
        "must be a string",
    ),
    (
        r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"a"},"streamState":1},{"streamDescriptor":{"name":"a"}}]}"#,
        "connectionState.streamState[1].streamDescriptor",
        Some(r#"{"name":"a"}"#),
        "names the same stream as connectionState.streamState[0].streamDescriptor",
    ),
    (
        r#"{"stateType":"global","globalState":{"streamStates":[{"streamDescriptor":{"name":"a","namespace":"n"}},{"streamDescriptor":{"namespace":"n","name":"a"}}]}}"#,
        "connectionState.globalState.streamStates[1].streamDescriptor",
        Some(r#"{"namespace":"n","name":"a"}"#),
        "names the same stream as connectionState.globalState.streamStates[0].streamDescriptor",
    ),
];

#[tokio::test]
async fn each_schema_violation_gets_422_naming_the_field_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let (_, before) = app
        .write(&id, r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"a"},"streamState":0}]}"#)
        .await;
    for (state, path, value, message) in INVALID_STATES {
        let (status, body) = app.write(&id, state).await;
        assert_eq!(status, 422, "{state}: {body}");
        let expected = invalid_input(&format!("Invalid input: {path}: {message}."), &[(path, *value, message)]);
        assert_eq!(body, expected, "{state}");
    }
    assert_eq!(app.read(&id).await, before);
}

#[tokio::test]
async fn connection_id_problems_get_422() {
    let app = TestApp::spawn().await;
    let uuid_message = "must be a UUID in its 36-character form";
    let cases: [(String, Option<&str>, &str); 5] = [
        ("{}".to_owned(), None, "is required"),
        (r#"{"connectionId":"abc"}"#.to_owned(), Some("abc"), uuid_message),
        (r#"{"connectionId":42}"#.to_owned(), Some("42"), uuid_message),
        (
            r#"{"connectionId":"5b9a7c1e0f6a4e1d9c113f0b8d2a4e77"}"#.to_owned(),
            Some("5b9a7c1e0f6a4e1d9c113f0b8d2a4e77"),
            uuid_message,
        ),
        (format!(r#"{{"connectionId":"{0}","connectionId":"{0}"}}"#, new_id()), None, "appears more than once"),
    ];
    for route in ["/api/v1/state/get", "/v1/web_backend/state/get_type"] {
        for (body, value, message) in &cases {
            let (status, answer) = app.post(route, body).await;
            assert_eq!(status, 422, "{body}");
            let expected = invalid_input(
                &format!("Invalid input: connectionId: {message}."),
                &[("connectionId", *value, message)],
            );
            assert_eq!(answer, expected, "{route} {body}");
        }
    }
}

#[tokio::test]
async fn several_problems_are_all_listed() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post("/api/v1/state/create_or_update", "{}").await;
    assert_eq!(status, 422);
    let expected = invalid_input(
        "Invalid input: connectionId: is required (and 1 more).",
        &[("connectionId", None, "is required"), ("connectionState", None, "is required")],
    );
    assert_eq!(body, expected);
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_400() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post("/api/v1/state/get", r#"{"connectionId":"#).await;
    assert_eq!(status, 400);
    let message = "The request body is not valid JSON: EOF while parsing a value at line 1 column 16.";
    assert_eq!(masked(&body), known_error(message, "InvalidJson"));

    let (status, body) = app.post_bytes("/v1/state/get", b"{\"connectionId\":\"\xff\"}".to_vec(), Some(JSON)).await;
    assert_eq!(status, 400);
    let message = "The request body is not valid JSON: invalid UTF-8 at byte 17.";
    assert_eq!(masked(&body), known_error(message, "InvalidJson"));
}

#[tokio::test]
async fn a_non_json_content_type_gets_415_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let body = format!(r#"{{"connectionId":"{id}","connectionState":{{"stateType":"legacy","state":{{}}}}}}"#);
    let (status, answer) =
        app.post_bytes("/api/v1/state/create_or_update", body.into_bytes(), Some("text/plain")).await;
    assert_eq!(status, 415);
    let message = r#"Content-Type "text/plain" is not supported; send application/json."#;
    assert_eq!(masked(&answer), known_error(message, "UnsupportedMediaType"));
    assert!(app.read(&id).await.contains("not_set"));
}

#[tokio::test]
async fn a_body_over_the_size_limit_gets_413_naming_the_setting() {
    let mut limits = default_limits();
    limits.max_body_bytes = 1024;
    let app = TestApp::spawn_with(limits).await;
    let id = new_id();
    let blob = format!(r#""{}""#, "x".repeat(2000));
    let (status, body) = app.write(&id, &format!(r#"{{"stateType":"legacy","state":{blob}}}"#)).await;
    assert_eq!(status, 413);
    let message =
        "The request body is larger than the limit of 1024 bytes (set by --max-body-bytes / HIGHWATER_MAX_BODY_BYTES).";
    assert_eq!(masked(&body), known_error(message, "PayloadTooLarge"));
    assert!(app.read(&id).await.contains("not_set"));
}

#[tokio::test]
async fn nesting_deeper_than_the_limit_gets_422_naming_the_setting() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (status, body) = app.write(&id, &format!(r#"{{"stateType":"legacy","state":{deep}}}"#)).await;
    assert_eq!(status, 422);
    let message = "JSON nests deeper than 128 levels (the limit set by --max-json-depth / HIGHWATER_MAX_JSON_DEPTH)";
    assert_eq!(body, invalid_input(&format!("Invalid input: {message}."), &[("", None, message)]));
    assert!(app.read(&id).await.contains("not_set"));
}

#[tokio::test]
async fn more_streams_than_the_limit_get_422_naming_the_setting() {
    let mut limits = default_limits();
    limits.decode.max_streams = 2;
    let app = TestApp::spawn_with(limits).await;
    let items: Vec<String> =
        (0..3).map(|i| format!(r#"{{"streamDescriptor":{{"name":"s{i}"}},"streamState":1}}"#)).collect();
    let state = format!(r#"{{"stateType":"stream","streamState":[{}]}}"#, items.join(","));
    let (status, body) = app.write(&new_id(), &state).await;
    assert_eq!(status, 422);
    let message =
        "3 streams in one request; the limit is 2 (set by --max-streams-per-request / HIGHWATER_MAX_STREAMS_PER_REQUEST)";
    assert_eq!(body, invalid_input(&format!("Invalid input: {message}."), &[("", None, message)]));
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_format() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/api/v1/state/get").await;
    assert_eq!(status, 405);
    assert_eq!(masked(&body), known_error("Method not allowed: GET /api/v1/state/get.", "MethodNotAllowed"));
    let (status, body) = app.post("/api/v1/connections/list", "{}").await;
    assert_eq!(status, 404);
    assert_eq!(masked(&body), known_error("No such route: POST /api/v1/connections/list.", "NotFound"));
}
