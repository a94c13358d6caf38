//! One stream at a time (STATE-API.md §7): `state/stream/get`, `set` and
//! `delete` on stream and global states, with revisions and guards.

use serde_json::json;

use crate::harness::{
    invalid_input, item, known_error, known_error_with_details, masked, member, new_id, not_set, ok, Answer,
    FieldErrors, TestApp,
};

/// The `streamDescriptor` member for a name and optional namespace.
fn descriptor(name: &str, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!(r#""streamDescriptor":{{"name":"{name}","namespace":"{ns}"}}"#),
        None => format!(r#""streamDescriptor":{{"name":"{name}"}}"#),
    }
}

/// `StreamStateResult`: the stream's blob, absent when it has none.
fn result(id: &str, revision: u64, descriptor: &str, blob: Option<&str>) -> String {
    let blob = blob.map_or(String::new(), |b| format!(r#","streamState":{b}"#));
    format!(r#"{{"connectionId":"{id}","revision":{revision},{descriptor}{blob}}}"#)
}

async fn set(app: &TestApp, id: &str, descriptor: &str, blob: &str) -> Answer {
    app.op("stream/set", id, &format!(r#"{descriptor},"streamState":{blob}"#)).await
}

async fn state_type(app: &TestApp, id: &str) -> String {
    app.post("/v1/web_backend/state/get_type", &format!(r#"{{"connectionId":"{id}"}}"#)).await.1
}

#[tokio::test]
async fn set_get_and_delete_single_streams_of_a_stream_state() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let (a, b) = (descriptor("a", None), descriptor("b", Some("ns")));
    // An unknown connection becomes a stream state.
    assert_eq!(set(&app, &id, &a, r#"{"c":1.50}"#).await, ok(&result(&id, 1, &a, Some(r#"{"c":1.50}"#)), 1));
    assert_eq!(state_type(&app, &id).await, r#""stream""#);
    assert_eq!(set(&app, &id, &b, "[1e3]").await, ok(&result(&id, 2, &b, Some("[1e3]")), 2));
    assert_eq!(app.op("stream/get", &id, &a).await, ok(&result(&id, 2, &a, Some(r#"{"c":1.50}"#)), 2));
    // An update keeps the stream's place; the same blob again changes nothing.
    assert_eq!(set(&app, &id, &a, r#"{"c":2}"#).await, ok(&result(&id, 3, &a, Some(r#"{"c":2}"#)), 3));
    assert_eq!(set(&app, &id, &a, r#"{"c":2}"#).await, ok(&result(&id, 3, &a, Some(r#"{"c":2}"#)), 3));
    let whole = format!(
        r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{},{{"streamDescriptor":{{"name":"b","namespace":"ns"}},"streamState":[1e3]}}]}}"#,
        item("a", Some(r#"{"c":2}"#))
    );
    assert_eq!(app.op("get", &id, "").await, ok(&whole, 3));
    assert_eq!(app.op("stream/delete", &id, &b).await, ok(&result(&id, 4, &b, None), 4));
    assert_eq!(app.op("stream/get", &id, &b).await, ok(&result(&id, 4, &b, None), 4));
    // Deleting the last stream leaves not_set; deleting again changes nothing.
    assert_eq!(app.op("stream/delete", &id, &a).await, ok(&result(&id, 5, &a, None), 5));
    assert_eq!(app.op("get", &id, "").await, ok(&not_set(&id), 5));
    assert_eq!(state_type(&app, &id).await, r#""not_set""#);
    assert_eq!(app.op("stream/delete", &id, &a).await, ok(&result(&id, 5, &a, None), 5));
}

#[tokio::test]
async fn streams_inside_a_global_state_change_without_touching_the_shared_blob() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let shared = r#"{"lsn":"0/16B3748","n":1.0}"#;
    let first = format!(
        r#"{{"stateType":"global","globalState":{{"shared_state":{shared},"streamStates":[{}]}}}}"#,
        item("a", Some("1"))
    );
    app.op("create_or_update", &id, &member(&first)).await;
    let (a, b) = (descriptor("a", None), descriptor("b", None));
    assert_eq!(set(&app, &id, &b, r#""two""#).await, ok(&result(&id, 2, &b, Some(r#""two""#)), 2));
    assert_eq!(set(&app, &id, &a, "3").await.status, 200);
    assert_eq!(app.op("stream/get", &id, &a).await, ok(&result(&id, 3, &a, Some("3")), 3));
    let global = |items: &str| {
        format!(
            r#"{{"stateType":"global","connectionId":"{id}","globalState":{{"shared_state":{shared},"streamStates":[{items}]}}}}"#
        )
    };
    let both = format!("{},{}", item("a", Some("3")), item("b", Some(r#""two""#)));
    assert_eq!(app.op("get", &id, "").await, ok(&global(&both), 3));
    assert_eq!(app.op("stream/delete", &id, &a).await.status, 200);
    assert_eq!(app.op("stream/delete", &id, &b).await, ok(&result(&id, 5, &b, None), 5));
    // With no stream left the shared blob still makes it a global state.
    assert_eq!(app.op("get", &id, "").await, ok(&global(""), 5));
    assert_eq!(state_type(&app, &id).await, r#""global""#);
}

#[tokio::test]
async fn a_stream_without_an_entry_reads_as_200_without_stream_state() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let missing = descriptor("x", Some("n"));
    assert_eq!(app.op("stream/get", &id, &missing).await, ok(&result(&id, 0, &missing, None), 0));
    set(&app, &id, &descriptor("x", None), "1").await;
    set(&app, &id, &descriptor("x", Some("other")), "2").await;
    assert_eq!(app.op("stream/get", &id, &missing).await, ok(&result(&id, 2, &missing, None), 2));
}

#[tokio::test]
async fn a_literal_null_blob_is_stored_and_read_back_as_null() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let a = descriptor("a", None);
    assert_eq!(set(&app, &id, &a, "null").await, ok(&result(&id, 1, &a, Some("null")), 1));
    assert_eq!(app.op("stream/get", &id, &a).await, ok(&result(&id, 1, &a, Some("null")), 1));
    let whole =
        format!(r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{}]}}"#, item("a", Some("null")));
    assert_eq!(app.op("get", &id, "").await, ok(&whole, 1));
    // A null blob is a value: replacing it with null again changes nothing.
    assert_eq!(set(&app, &id, &a, "null").await.etag.as_deref(), Some("\"1\""));
}

#[tokio::test]
async fn malformed_stream_requests_get_422_writing_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    set(&app, &id, &descriptor("a", None), "1").await;
    let required = "is required (send null to store a literal null)";
    let cases: &[(&str, &str, FieldErrors<'_>)] = &[
        ("stream/set", r#""streamDescriptor":{"name":"a"}"#, &[("streamState", None, required)]),
        ("stream/set", r#""streamState":2"#, &[("streamDescriptor", None, "is required")]),
        ("stream/delete", r#""streamDescriptor":"a""#, &[("streamDescriptor", Some("a"), "must be an object")]),
        ("stream/get", r#""streamDescriptor":{"name":5}"#, &[("streamDescriptor.name", Some("5"), "must be a string")]),
        (
            "stream/set",
            r#""streamDescriptor":{"name":"a","namespace":1},"streamState":2"#,
            &[("streamDescriptor.namespace", Some("1"), "must be a string")],
        ),
    ];
    for (op, members, errors) in cases {
        let answer = app.op(op, &id, members).await;
        let (path, _, message) = errors[0];
        let expected = invalid_input(&format!("Invalid input: {path}: {message}."), errors);
        assert_eq!((answer.status, answer.body), (422, expected), "{op} {members}");
    }
    let whole = format!(r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{}]}}"#, item("a", Some("1")));
    assert_eq!(app.op("get", &id, "").await, ok(&whole, 1));
}

#[tokio::test]
async fn setting_a_stream_on_a_legacy_state_is_a_409_type_conflict() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let legacy = app.op("create_or_update", &id, &member(r#"{"stateType":"legacy","state":{"cursor":1}}"#)).await;
    let answer = set(&app, &id, &descriptor("a", None), "1").await;
    let message = "Cannot write a stream state: the connection holds a legacy state. A connection's state type can \
                   only change after its state is reset: delete its entries with a legacy write, then write the \
                   stream state.";
    assert_eq!((answer.status, masked(&answer.body)), (409, known_error(message, "StateTypeConflict")));
    // Deleting a stream a legacy state does not have changes nothing.
    let a = descriptor("a", None);
    assert_eq!(app.op("stream/delete", &id, &a).await, ok(&result(&id, 1, &a, None), 1));
    assert_eq!(app.op("get", &id, "").await, legacy);
}

#[tokio::test]
async fn stream_writes_honour_expected_revision_and_if_match() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let a = descriptor("a", None);
    let guarded = |blob: &str, expected: u64| format!(r#"{a},"streamState":{blob},"expectedRevision":{expected}"#);
    assert_eq!(app.op("stream/set", &id, &guarded("1", 0)).await, ok(&result(&id, 1, &a, Some("1")), 1));
    let stale = app.op("stream/set", &id, &guarded("2", 0)).await;
    let conflict = known_error_with_details(
        "The connection is at revision 1, not the expected 0; nothing was written.",
        "RevisionConflict",
        &json!({ "expectedRevision": 0, "currentRevision": 1 }),
    );
    assert_eq!((stale.status, masked(&stale.body)), (409, conflict));
    let stale = app.op_with("stream/delete", &id, &a, &[("if-match", "\"0\"")]).await;
    assert_eq!(stale.status, 409);
    assert_eq!(app.op("stream/get", &id, &a).await, ok(&result(&id, 1, &a, Some("1")), 1));
    let current = app.op_with("stream/delete", &id, &a, &[("if-match", "\"1\"")]).await;
    assert_eq!(current, ok(&result(&id, 2, &a, None), 2));
}

#[tokio::test]
async fn stream_writes_appear_in_history_with_their_actor_and_reason() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let a = descriptor("a", None);
    app.op_with(
        "stream/set",
        &id,
        &format!(r#"{a},"streamState":[1,2,3],"reason":"seed""#),
        &[("highwater-actor", "cli")],
    )
    .await;
    app.op("stream/delete", &id, &format!(r#"{a},"actor":"ui","reason":"drop""#)).await;
    let history = app.op("history", &id, "").await.json();
    let summary: Vec<_> = history["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["revision"].clone(),
                r["stateType"].clone(),
                r["actor"].clone(),
                r["reason"].clone(),
                r["changes"].clone(),
            )
        })
        .collect();
    let change = |op: &str, size: Option<u64>| match size {
        Some(size) => json!([{ "kind": "stream", "streamDescriptor": { "name": "a" }, "op": op, "size": size }]),
        None => json!([{ "kind": "stream", "streamDescriptor": { "name": "a" }, "op": op }]),
    };
    let both = app.op_with("stream/delete", &id, &format!(r#"{a},"actor":"ui""#), &[("highwater-actor", "cli")]).await;
    let message = "disagrees with the body's value ui";
    let expected = invalid_input(
        &format!("Invalid input: highwater-actor: {message}."),
        &[("highwater-actor", Some("cli"), message)],
    );
    assert_eq!((both.status, both.body), (422, expected));
    assert_eq!(
        summary,
        [
            (json!(2), json!("not_set"), json!("ui"), json!("drop"), change("delete", None)),
            (json!(1), json!("stream"), json!("cli"), json!("seed"), change("set", Some(7))),
        ]
    );
}
