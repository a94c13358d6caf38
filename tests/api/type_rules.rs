//! The type rules of STATE-API.md §4.1: legacy gives way, global and stream
//! refuse other types with 409 and write nothing, an emptied state takes
//! any type.

use crate::harness::{known_error, masked, new_id, TestApp};

const LEGACY: &str = r#"{"stateType":"legacy","state":{"l":1}}"#;
const GLOBAL: &str = r#"{"stateType":"global","globalState":{"shared_state":{"g":1},"streamStates":[{"streamDescriptor":{"name":"s"},"streamState":1}]}}"#;
const STREAM: &str = r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"s"},"streamState":1}]}"#;

#[tokio::test]
async fn a_legacy_state_is_replaced_by_a_global_or_stream_write() {
    let app = TestApp::spawn().await;
    for (name, next) in [("global", GLOBAL), ("stream", STREAM)] {
        let id = new_id();
        app.write(&id, LEGACY).await;
        let (status, body) = app.write(&id, next).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(&format!(r#"{{"stateType":"{name}""#)), "{body}");
        assert!(!body.contains(r#""l":1"#), "legacy blob still there: {body}");
    }
}

#[tokio::test]
async fn an_empty_stream_write_over_legacy_leaves_not_set() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.write(&id, LEGACY).await;
    let (status, body) = app.write(&id, r#"{"stateType":"stream","streamState":[]}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!(r#"{{"stateType":"not_set","connectionId":"{id}"}}"#));
}

#[tokio::test]
async fn global_and_stream_states_refuse_other_types_with_409_and_write_nothing() {
    let app = TestApp::spawn().await;
    let cases = [
        ("global", GLOBAL, "legacy", LEGACY),
        ("global", GLOBAL, "stream", STREAM),
        ("stream", STREAM, "legacy", LEGACY),
        ("stream", STREAM, "global", GLOBAL),
    ];
    for (stored, first, incoming, second) in cases {
        let id = new_id();
        let (_, before) = app.write(&id, first).await;
        for route in ["/api/v1/state/create_or_update", "/v1/state/create_or_update_safe"] {
            let body = format!(r#"{{"connectionId":"{id}","connectionState":{second}}}"#);
            let (status, answer) = app.post(route, &body).await;
            assert_eq!(status, 409, "{stored} -> {incoming}");
            let message = format!(
                "Cannot write a {incoming} state: the connection holds a {stored} state. A connection's state \
                 type can only change after its state is reset: delete its entries with a {stored} write, \
                 then write the {incoming} state."
            );
            assert_eq!(masked(&answer), known_error(&message, "StateTypeConflict"));
            assert_eq!(app.read(&id).await, before);
        }
    }
}

#[tokio::test]
async fn once_every_entry_is_deleted_any_type_may_follow() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.write(&id, STREAM).await;
    let (_, body) = app.write(&id, r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"s"}}]}"#).await;
    assert_eq!(body, format!(r#"{{"stateType":"not_set","connectionId":"{id}"}}"#));
    let (status, _) = app.write(&id, LEGACY).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_global_write_deleting_everything_leaves_not_set() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.write(&id, GLOBAL).await;
    let (_, body) = app
        .write(&id, r#"{"stateType":"global","globalState":{"streamStates":[{"streamDescriptor":{"name":"s"}}]}}"#)
        .await;
    assert_eq!(body, format!(r#"{{"stateType":"not_set","connectionId":"{id}"}}"#));
}
