//! Revisions (STATE-API.md §7): the `ETag`, reading the past, compare-and-
//! swap by body or `If-Match`, history, diff, restore and reset.

use std::collections::BTreeMap;

use serde_json::json;

use crate::harness::{
    invalid_input, item, known_error, known_error_with_details, masked, member, new_id, not_set, now_ms, ok,
    rfc3339_ms, streams, write_result, Answer, FieldErrors, Rng, TestApp,
};

fn conflict(expected: u64, current: u64) -> String {
    known_error_with_details(
        &format!("The connection is at revision {current}, not the expected {expected}; nothing was written."),
        "RevisionConflict",
        &json!({ "expectedRevision": expected, "currentRevision": current }),
    )
}

#[tokio::test]
async fn every_state_response_carries_the_revision_as_its_etag_and_a_no_op_write_keeps_it() {
    let app = TestApp::spawn().await;
    let id = new_id();
    assert_eq!(app.op("get", &id, "").await, ok(&not_set(&id), 0));
    let first = app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    assert_eq!((first.status, first.etag.as_deref()), (200, Some("\"1\"")));
    let second = app.op("create_or_update_safe", &id, &streams(&[("b", Some("2"))])).await;
    assert_eq!((second.status, second.etag.as_deref()), (200, Some("\"2\"")));
    assert_eq!(app.op("get", &id, "").await, second);
    let via_airbyte_prefix = app.send("/api/v1/state/get", &format!(r#"{{"connectionId":"{id}"}}"#), &[]).await;
    assert_eq!(via_airbyte_prefix, second);
    for route in ["create_or_update", "create_or_update_safe"] {
        assert_eq!(app.op(route, &id, &streams(&[("a", Some("1")), ("b", Some("2"))])).await, second, "{route}");
    }
}

#[tokio::test]
async fn get_with_a_revision_returns_the_state_as_it_was_then() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let r1 = app.op("create_or_update", &id, &member(r#"{"stateType":"legacy","state":{"v":1.50}}"#)).await;
    let r2 = app.op("create_or_update", &id, &streams(&[("a", Some("1")), ("b", Some("2"))])).await;
    let r3 = app.op("create_or_update", &id, &streams(&[("a", None), ("b", Some("null"))])).await;
    let past = [(0, not_set(&id)), (1, r1.body), (2, r2.body), (3, r3.body.clone())];
    for (revision, body) in past {
        assert_eq!(app.op("get", &id, &format!(r#""revision":{revision}"#)).await, ok(&body, revision));
    }
    assert_eq!(app.op("get", &id, r#""revision":null"#).await, ok(&r3.body, 3));
}

#[tokio::test]
async fn a_revision_from_the_future_is_404_revision_not_found() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    app.op("create_or_update", &id, &streams(&[("a", Some("2"))])).await;
    let not_found = |revision: u64, current: u64| {
        let message = format!("Revision {revision} does not exist; the connection is at revision {current}.");
        known_error_with_details(
            &message,
            "RevisionNotFound",
            &json!({ "revision": revision, "currentRevision": current }),
        )
    };
    let cases = [
        ("get", id.clone(), r#""revision":3"#, not_found(3, 2)),
        ("get", new_id(), r#""revision":1"#, not_found(1, 0)),
        ("restore", id.clone(), r#""revision":7"#, not_found(7, 2)),
        ("diff", id.clone(), r#""fromRevision":1,"toRevision":3"#, not_found(3, 2)),
    ];
    for (op, id, members, expected) in cases {
        let answer = app.op(op, &id, members).await;
        assert_eq!((answer.status, masked(&answer.body)), (404, expected), "{op} {members}");
    }
    assert_eq!(app.op("get", &id, "").await.etag.as_deref(), Some("\"2\""));
}

#[tokio::test]
async fn a_write_expecting_the_current_revision_succeeds_and_a_stale_one_gets_409_writing_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let guarded =
        |blob: &str, expected: u64| format!(r#"{},"expectedRevision":{expected}"#, streams(&[("a", Some(blob))]));
    let r1 = app.op("create_or_update", &id, &guarded("1", 0)).await;
    assert_eq!(r1.etag.as_deref(), Some("\"1\""));
    let r2 = app.op("create_or_update", &id, &guarded("2", 1)).await;
    assert_eq!((r2.status, r2.etag.as_deref()), (200, Some("\"2\"")));
    let stale_writes = [
        ("create_or_update", streams(&[("a", Some("3"))])),
        ("create_or_update_safe", streams(&[("b", Some("3"))])),
        ("restore", r#""revision":1"#.to_owned()),
        ("reset", String::new()),
        ("stream/set", r#""streamDescriptor":{"name":"a"},"streamState":3"#.to_owned()),
        ("stream/delete", r#""streamDescriptor":{"name":"a"}"#.to_owned()),
    ];
    for (op, members) in stale_writes {
        let comma = if members.is_empty() { "" } else { "," };
        let answer = app.op(op, &id, &format!(r#"{members}{comma}"expectedRevision":1"#)).await;
        assert_eq!((answer.status, masked(&answer.body)), (409, conflict(1, 2)), "{op}");
    }
    assert_eq!(app.op("get", &id, "").await, r2);
}

#[tokio::test]
async fn if_match_guards_a_write_like_expected_revision() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let write = |blob: &'static str, if_match: &'static str| {
        let app = &app;
        let id = id.clone();
        async move { app.op_with("create_or_update", &id, &streams(&[("a", Some(blob))]), &[("if-match", if_match)]).await }
    };
    assert_eq!(write("1", "\"0\"").await.etag.as_deref(), Some("\"1\""));
    let current = write("2", "\"1\"").await;
    assert_eq!((current.status, current.etag.as_deref()), (200, Some("\"2\"")));
    let stale = write("3", "\"1\"").await;
    assert_eq!((stale.status, masked(&stale.body)), (409, conflict(1, 2)));
    assert_eq!(app.op("get", &id, "").await, current);
    // `*` sets no condition; a weak tag and a bare number are read too.
    assert_eq!(write("4", "*").await.etag.as_deref(), Some("\"3\""));
    assert_eq!(write("5", "W/\"3\"").await.etag.as_deref(), Some("\"4\""));
    assert_eq!(write("6", "4").await.etag.as_deref(), Some("\"5\""));
    let agreeing = app.op_with("reset", &id, r#""expectedRevision":5"#, &[("if-match", "\"5\"")]).await;
    assert_eq!((agreeing.status, agreeing.etag.as_deref()), (200, Some("\"6\"")));
}

#[tokio::test]
async fn an_if_match_that_is_malformed_or_contradicts_the_body_gets_422_writing_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let before = app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    let disagrees = "disagrees with the body's value 1";
    let malformed = r#"must be a revision number, e.g. "7""#;
    let cases = [
        (r#""expectedRevision":1"#, "\"2\"", "2", disagrees),
        ("", "\"abc\"", "\"abc\"", malformed),
        ("", "\"-1\"", "\"-1\"", malformed),
        ("", "", "", malformed),
    ];
    for (extra, header, shown, message) in cases {
        let members = format!("{}{}{extra}", streams(&[("a", Some("9"))]), if extra.is_empty() { "" } else { "," });
        let answer = app.op_with("create_or_update", &id, &members, &[("if-match", header)]).await;
        let expected =
            invalid_input(&format!("Invalid input: If-Match: {message}."), &[("If-Match", Some(shown), message)]);
        assert_eq!((answer.status, answer.body), (422, expected), "If-Match: {header}");
    }
    assert_eq!(app.op("get", &id, "").await, before);
}

/// The history body with each `createdAt` checked (RFC 3339, between
/// `since` and now, newest first) and replaced by `<t>`.
fn history_masked(answer: &Answer, since: i64) -> String {
    assert_eq!(answer.status, 200, "{}", answer.body);
    let mut body = answer.body.clone();
    let mut newer = i64::MAX;
    for revision in answer.json()["revisions"].as_array().unwrap() {
        let at = revision["createdAt"].as_str().unwrap();
        let ms = rfc3339_ms(at);
        assert!(ms >= since - 5_000 && ms <= now_ms() + 5_000 && ms <= newer, "createdAt {at}");
        newer = ms;
        body = body.replace(&format!(r#""createdAt":"{at}""#), r#""createdAt":"<t>""#);
    }
    body
}

#[tokio::test]
async fn history_lists_revisions_newest_first_with_actor_reason_and_changes() {
    let app = TestApp::spawn().await;
    let (id, since) = (new_id(), now_ms());
    let first = format!(
        r#"{},"actor":"alice","reason":"first sync""#,
        streams(&[("a", Some(r#"{"n":1}"#)), ("b", Some("[1,2]"))])
    );
    app.op("create_or_update", &id, &first).await;
    let second = format!(r#"{},"reason":"fix""#, streams(&[("a", None), ("b", Some(r#""é""#))]));
    app.op_with("create_or_update_safe", &id, &second, &[("highwater-actor", "bob")]).await;
    app.op("stream/set", &id, r#""streamDescriptor":{"name":"c","namespace":"n"},"streamState":null"#).await;
    app.op("create_or_update", &id, &streams(&[("a", None)])).await; // changes nothing
    let stream = |name: &str, op: &str, size: Option<u64>| {
        let size = size.map_or(String::new(), |s| format!(r#","size":{s}"#));
        format!(r#"{{"kind":"stream","streamDescriptor":{{"name":"{name}"}},"op":"{op}"{size}}}"#)
    };
    let expected = format!(
        r#"{{"connectionId":"{id}","revision":3,"oldestRevision":1,"revisions":[{{"revision":3,"createdAt":"<t>","stateType":"stream","changes":[{{"kind":"stream","streamDescriptor":{{"name":"c","namespace":"n"}},"op":"set","size":4}}]}},{{"revision":2,"createdAt":"<t>","stateType":"stream","actor":"bob","reason":"fix","changes":[{},{}]}},{{"revision":1,"createdAt":"<t>","stateType":"stream","actor":"alice","reason":"first sync","changes":[{},{}]}}]}}"#,
        stream("a", "delete", None),
        stream("b", "set", Some(4)),
        stream("a", "set", Some(7)),
        stream("b", "set", Some(5)),
    );
    assert_eq!(history_masked(&app.op("history", &id, "").await, since), expected);

    // Legacy and shared entries are kinds of their own; a reset leaves not_set.
    let other = new_id();
    app.op("create_or_update", &other, &member(r#"{"stateType":"legacy","state":{}}"#)).await;
    let global = r#"{"stateType":"global","globalState":{"shared_state":[0],"streamStates":[]}}"#;
    app.op("create_or_update", &other, &member(global)).await;
    app.op("reset", &other, r#""actor":"ui""#).await;
    let expected = format!(
        r#"{{"connectionId":"{other}","revision":3,"oldestRevision":1,"revisions":[{{"revision":3,"createdAt":"<t>","stateType":"not_set","actor":"ui","changes":[{{"kind":"shared","op":"delete"}}]}},{{"revision":2,"createdAt":"<t>","stateType":"global","changes":[{{"kind":"legacy","op":"delete"}},{{"kind":"shared","op":"set","size":3}}]}}],"nextBeforeRevision":2}}"#
    );
    assert_eq!(history_masked(&app.op("history", &other, r#""limit":2"#).await, since), expected);
}

#[tokio::test]
async fn history_pages_with_limit_and_next_before_revision() {
    let app = TestApp::spawn().await;
    let id = new_id();
    for n in 1..=5 {
        app.op("create_or_update", &id, &streams(&[("a", Some(&n.to_string()))])).await;
    }
    let page = |members: &'static str| {
        let (app, id) = (&app, id.clone());
        async move {
            let body = app.op("history", &id, members).await.json();
            let revisions: Vec<u64> =
                body["revisions"].as_array().unwrap().iter().map(|r| r["revision"].as_u64().unwrap()).collect();
            (revisions, body.get("nextBeforeRevision").map(|n| n.as_u64().unwrap()))
        }
    };
    assert_eq!(page("").await, (vec![5, 4, 3, 2, 1], None));
    assert_eq!(page(r#""limit":2"#).await, (vec![5, 4], Some(4)));
    assert_eq!(page(r#""limit":2,"beforeRevision":4"#).await, (vec![3, 2], Some(2)));
    assert_eq!(page(r#""limit":2,"beforeRevision":2"#).await, (vec![1], None));
    assert_eq!(page(r#""limit":2,"beforeRevision":3"#).await, (vec![2, 1], None));
    let unknown = new_id();
    let expected = format!(r#"{{"connectionId":"{unknown}","revision":0,"oldestRevision":null,"revisions":[]}}"#);
    assert_eq!(app.op("history", &unknown, "").await.body, expected);
}

#[tokio::test]
async fn diff_lists_added_removed_and_changed_entries_with_blobs_as_stored() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let (a1, b1) = (r#"{"z":1,"a":1.50,"a":"dup"}"#, "1e3");
    app.op("create_or_update", &id, &streams(&[("a", Some(a1)), ("b", Some(b1)), ("c", Some(r#""same""#))])).await;
    app.op("create_or_update", &id, &streams(&[("a", Some("[2]")), ("b", None), ("d", Some(r#""caf\u00e9""#))])).await;
    // One change: (stream, op, from blob, to blob).
    let change = |name: &str, op: &str, from: Option<&str>, to: Option<&str>| {
        let from = from.map_or(String::new(), |b| format!(r#","from":{b}"#));
        let to = to.map_or(String::new(), |b| format!(r#","to":{b}"#));
        format!(r#"{{"kind":"stream","streamDescriptor":{{"name":"{name}"}},"op":"{op}"{from}{to}}}"#)
    };
    let check = |from: u64, to: u64, from_type: &'static str, changes: Vec<String>| {
        let (app, id) = (&app, id.clone());
        async move {
            let answer = app.op("diff", &id, &format!(r#""fromRevision":{from},"toRevision":{to}"#)).await;
            let changes = changes.join(",");
            let expected = format!(
                r#"{{"connectionId":"{id}","fromRevision":{from},"toRevision":{to},"fromStateType":"{from_type}","toStateType":"stream","changes":[{changes}]}}"#
            );
            assert_eq!((answer.status, answer.body), (200, expected), "{from}->{to}");
        }
    };
    let (a2, d) = (Some("[2]"), Some(r#""caf\u00e9""#));
    let (a1, b1) = (Some(a1), Some(b1));
    let forward = [("a", "changed", a1, a2), ("b", "removed", b1, None), ("d", "added", None, d)];
    check(1, 2, "stream", forward.iter().map(|(n, op, f, t)| change(n, op, *f, *t)).collect()).await;
    let backward = [("a", "changed", a2, a1), ("d", "removed", d, None), ("b", "added", None, b1)];
    check(2, 1, "stream", backward.iter().map(|(n, op, f, t)| change(n, op, *f, *t)).collect()).await;
    let created = [("a", a1), ("b", b1), ("c", Some(r#""same""#))];
    check(0, 1, "not_set", created.iter().map(|(n, t)| change(n, "added", None, *t)).collect()).await;
    check(2, 2, "stream", Vec::new()).await;
}

#[tokio::test]
async fn restore_makes_a_new_revision_equal_to_an_old_one_without_rewriting_history() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let r1 = app.op("create_or_update", &id, &streams(&[("a", Some("1")), ("b", Some("2"))])).await;
    let r2 = app.op("create_or_update", &id, &streams(&[("a", Some("3")), ("c", Some("4"))])).await;
    app.op("create_or_update", &id, &streams(&[("b", None)])).await;
    let restored = app.op("restore", &id, r#""revision":1,"reason":"roll back""#).await;
    assert_eq!(restored, ok(&write_result(&id, 4, &r1.body), 4));
    assert_eq!(app.op("get", &id, "").await, ok(&r1.body, 4));
    assert_eq!(app.op("get", &id, r#""revision":2"#).await, ok(&r2.body, 2));
    let history = app.op("history", &id, "").await.json();
    assert_eq!(history["revisions"].as_array().unwrap().len(), 4);
    assert_eq!(history["revisions"][0]["reason"], "roll back");
    // Restoring what is already there changes nothing.
    assert_eq!(app.op("restore", &id, r#""revision":1"#).await, ok(&write_result(&id, 4, &r1.body), 4));
}

#[tokio::test]
async fn restore_crosses_state_types_and_revision_zero_empties_the_state() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let legacy = app.op("create_or_update", &id, &member(r#"{"stateType":"legacy","state":{"cursor":5}}"#)).await;
    let stream = app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    let global = new_id();
    let g1 = r#"{"stateType":"global","globalState":{"shared_state":{"lsn":1},"streamStates":[{"streamDescriptor":{"name":"a"},"streamState":1}]}}"#;
    let g1 = app.op("create_or_update", &global, &member(g1)).await;
    let g2 = r#"{"stateType":"global","globalState":{"shared_state":{"lsn":2},"streamStates":[{"streamDescriptor":{"name":"b"},"streamState":2}]}}"#;
    app.op("create_or_update", &global, &member(g2)).await;
    let cases = [
        (&id, 1, 3, legacy.body),
        (&id, 2, 4, stream.body),
        (&id, 0, 5, not_set(&id)),
        (&id, 1, 6, app.op("get", &id, r#""revision":1"#).await.body),
        (&global, 1, 3, g1.body),
    ];
    for (id, revision, new_revision, state) in cases {
        let restored = app.op("restore", id, &format!(r#""revision":{revision}"#)).await;
        assert_eq!(restored, ok(&write_result(id, new_revision, &state), new_revision), "restore {revision}");
        assert_eq!(app.op("get", id, "").await, ok(&state, new_revision));
    }
}

#[tokio::test]
async fn reset_clears_everything_or_listed_streams_and_the_shared_blob_only_when_asked() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.op("create_or_update", &id, &streams(&[("a", Some("1")), ("b", Some("2"))])).await;
    assert_eq!(app.op("reset", &id, "").await, ok(&write_result(&id, 2, &not_set(&id)), 2));
    let legacy = app.op("create_or_update", &id, &member(r#"{"stateType":"legacy","state":7}"#)).await;
    assert_eq!((legacy.status, legacy.etag.as_deref()), (200, Some("\"3\"")));

    let four = r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"a"},"streamState":1},{"streamDescriptor":{"name":"b"},"streamState":2},{"streamDescriptor":{"name":"a","namespace":"x"},"streamState":0},{"streamDescriptor":{"name":"c"},"streamState":3}]}"#;
    let id = new_id();
    app.op("create_or_update", &id, &member(four)).await;
    let answer = app.op("reset", &id, r#""streams":[{"name":"a","namespace":"x"},{"name":"c"},{"name":"zz"}]"#).await;
    let (a1, b2) = (item("a", Some("1")), item("b", Some("2")));
    let left = format!(r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{a1},{b2}]}}"#);
    assert_eq!(answer, ok(&write_result(&id, 2, &left), 2));

    let id = new_id();
    let global = |items: &str| format!(r#"{{"stateType":"global","connectionId":"{id}","globalState":{items}}}"#);
    let full = global(&format!(r#"{{"shared_state":{{"lsn":9}},"streamStates":[{a1},{b2}]}}"#));
    app.op("create_or_update", &id, &member(&full)).await;
    let kept_shared = global(&format!(r#"{{"shared_state":{{"lsn":9}},"streamStates":[{b2}]}}"#));
    assert_eq!(app.op("reset", &id, r#""streams":[{"name":"a"}]"#).await, ok(&write_result(&id, 2, &kept_shared), 2));
    let shared_too = app.op("reset", &id, r#""streams":[],"includeShared":true"#).await;
    let no_shared = global(&format!(r#"{{"streamStates":[{b2}]}}"#));
    assert_eq!(shared_too, ok(&write_result(&id, 3, &no_shared), 3));
}

#[tokio::test]
async fn a_reset_is_recorded_in_history_and_undone_by_restore() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let before =
        app.op("create_or_update", &id, &streams(&[("a", Some(r#"{"c":"2024-01-01"}"#)), ("b", Some("[]"))])).await;
    app.op("reset", &id, r#""reason":"full refresh","actor":"ops""#).await;
    let history = app.op("history", &id, r#""limit":1"#).await.json();
    let latest = &history["revisions"][0];
    assert_eq!((latest["revision"].as_u64(), latest["stateType"].as_str()), (Some(2), Some("not_set")));
    assert_eq!((latest["actor"].as_str(), latest["reason"].as_str()), (Some("ops"), Some("full refresh")));
    let ops: Vec<&str> = latest["changes"].as_array().unwrap().iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["delete", "delete"]);
    assert_eq!(app.op("restore", &id, r#""revision":1"#).await, ok(&write_result(&id, 3, &before.body), 3));
}

#[tokio::test]
async fn bad_revision_numbers_and_missing_fields_get_422_writing_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let before = app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    let non_negative = "must be a non-negative integer";
    let cases: &[(&str, &str, FieldErrors<'_>)] = &[
        ("get", r#""revision":-1"#, &[("revision", Some("-1"), non_negative)]),
        ("get", r#""revision":"1""#, &[("revision", Some("1"), non_negative)]),
        ("get", r#""revision":1.5"#, &[("revision", Some("1.5"), non_negative)]),
        ("restore", "", &[("revision", None, "is required")]),
        ("restore", r#""revision":true"#, &[("revision", Some("true"), non_negative)]),
        ("diff", r#""fromRevision":1"#, &[("toRevision", None, "is required")]),
        ("diff", "", &[("fromRevision", None, "is required"), ("toRevision", None, "is required")]),
        ("history", r#""limit":0"#, &[("limit", Some("0"), "must be an integer between 1 and 1000")]),
        ("history", r#""beforeRevision":-2"#, &[("beforeRevision", Some("-2"), "must be an integer of at least 1")]),
        ("history", r#""beforeRevision":0"#, &[("beforeRevision", Some("0"), "must be an integer of at least 1")]),
        ("reset", r#""expectedRevision":"x""#, &[("expectedRevision", Some("x"), non_negative)]),
        ("reset", r#""streams":"a""#, &[("streams", Some("a"), "must be an array")]),
        ("reset", r#""streams":[{"namespace":"x"}]"#, &[("streams[0].name", None, "is required")]),
        ("reset", r#""includeShared":"yes""#, &[("includeShared", Some("yes"), "must be a boolean")]),
        ("reset", r#""reason":7"#, &[("reason", Some("7"), "must be a string")]),
    ];
    for (op, members, errors) in cases {
        let answer = app.op(op, &id, members).await;
        let (path, _, message) = errors[0];
        let more = if errors.len() > 1 { format!(" (and {} more)", errors.len() - 1) } else { String::new() };
        let expected = invalid_input(&format!("Invalid input: {path}: {message}{more}."), errors);
        assert_eq!((answer.status, answer.body), (422, expected), "{op} {members}");
    }
    let long = format!(r#""reason":"{}""#, "r".repeat(1001));
    assert_eq!(app.op("reset", &id, &long).await.status, 422);
    assert_eq!(app.op("get", &id, "").await, before);
    let missing = app.send("/v1/state/history", "{}", &[]).await;
    assert_eq!(
        missing.body,
        invalid_input("Invalid input: connectionId: is required.", &[("connectionId", None, "is required")])
    );
    let not_json = app.send("/v1/state/reset", "[", &[]).await;
    let message = "The request body is not valid JSON: EOF while parsing a list at line 1 column 1.";
    assert_eq!((not_json.status, masked(&not_json.body)), (400, known_error(message, "InvalidJson")));
}

#[tokio::test]

async fn restoring_a_revision_whose_content_is_already_current_keeps_the_etag() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    app.op("create_or_update", &id, &streams(&[("a", None)])).await;
    let current = app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    // Revision 1 read exactly like revision 3: the restore changes nothing.
    assert_eq!(app.op("get", &id, r#""revision":1"#).await.body, current.body);
    assert_eq!(app.op("restore", &id, r#""revision":1"#).await, ok(&write_result(&id, 3, &current.body), 3));
}

fn revision_of(answer: &Answer) -> u64 {
    answer.etag.as_deref().and_then(|e| e.trim_matches('"').parse().ok()).expect("an ETag")
}

#[tokio::test]
async fn restoring_random_earlier_revisions_gives_back_exactly_what_get_returned_then() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    let mut seen: BTreeMap<u64, String> = BTreeMap::from([(0, not_set(&id))]);
    let mut revision = 0;
    while revision < 100 {
        let items: Vec<String> = (0..1 + rng.below(3))
            .map(|_| format!("s{}", rng.below(10)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|name| if rng.below(4) == 0 { item(&name, None) } else { item(&name, Some(&rng.blob())) })
            .collect();
        let state = format!(r#"{{"stateType":"stream","streamState":[{}]}}"#, items.join(","));
        let answer = app.op("create_or_update", &id, &member(&state)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        revision = revision_of(&answer);
        seen.insert(revision, answer.body);
    }
    for (revision, body) in &seen {
        assert_eq!(app.op("get", &id, &format!(r#""revision":{revision}"#)).await, ok(body, *revision));
    }
    let mut current = seen[&revision].clone();
    for _ in 0..10 {
        let target = rng.below(100);
        let expected = &seen[&target];
        let restored = app.op("restore", &id, &format!(r#""revision":{target}"#)).await;
        // A restore changing nothing visible takes no revision; either way
        // the content must be exactly what get returned then.
        let next = revision_of(&restored);
        assert!(next == revision + 1 || (next == revision && *expected == current), "restore {target}: {next}");
        revision = next;
        assert_eq!(restored, ok(&write_result(&id, revision, expected), revision), "restore {target}");
        assert_eq!(app.op("get", &id, "").await, ok(expected, revision), "after restoring {target}");
        current = expected.clone();
    }
}
