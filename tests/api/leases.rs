//! Sync leases (STATE-API.md §5, §7): acquire, renew, release, list, and
//! how a live lease guards writes.

use std::time::Duration;

use serde_json::json;

use crate::harness::{
    invalid_input, known_error, known_error_with_details, masked, new_id, now_ms, ok, rfc3339_ms, streams, Answer,
    FieldErrors, TestApp,
};

const SYNC_RUNNING: &str = "State cannot be updated while a sync is running for this connection.";
const STALE: &str = "The lease token is expired, released or superseded; nothing was written.";

/// A lease as acquired: its token and `expiresAt`.
struct Lease {
    token: String,
    expires_at: String,
}

/// Acquires a lease, checking the exact answer and its expiry.
async fn acquire(app: &TestApp, id: &str, holder: &str, ttl_seconds: i64) -> Lease {
    let started = now_ms();
    let answer = app.op("lease/acquire", id, &format!(r#""holder":"{holder}","ttlSeconds":{ttl_seconds}"#)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let value = answer.json();
    let lease = Lease {
        token: value["token"].as_str().expect("token").to_owned(),
        expires_at: value["expiresAt"].as_str().expect("expiresAt").to_owned(),
    };
    assert!(!lease.token.is_empty());
    let expected = format!(
        r#"{{"connectionId":"{id}","holder":"{holder}","token":"{}","expiresAt":"{}"}}"#,
        lease.token, lease.expires_at
    );
    assert_eq!(answer.body, expected);
    let expires = rfc3339_ms(&lease.expires_at);
    let ttl_ms = ttl_seconds * 1000;
    assert!(expires >= started + ttl_ms - 2_000 && expires <= now_ms() + ttl_ms + 2_000, "{}", lease.expires_at);
    lease
}

fn sync_running(holder: &str, lease: &Lease) -> String {
    known_error_with_details(
        SYNC_RUNNING,
        "SyncInProgress",
        &json!({ "holder": holder, "expiresAt": lease.expires_at }),
    )
}

fn stale() -> String {
    known_error(STALE, "LeaseConflict")
}

fn refused(answer: &Answer) -> (u16, String) {
    (answer.status, masked(&answer.body))
}

/// Writes that a live lease refuses without its token, as (op, members).
fn guarded_writes() -> Vec<(&'static str, String)> {
    vec![
        ("create_or_update_safe", streams(&[("a", Some("2"))])),
        ("restore", r#""revision":0"#.to_owned()),
        ("reset", String::new()),
        ("reset", r#""streams":[{"name":"a"}]"#.to_owned()),
        ("stream/set", r#""streamDescriptor":{"name":"a"},"streamState":2"#.to_owned()),
        ("stream/delete", r#""streamDescriptor":{"name":"a"}"#.to_owned()),
    ]
}

fn with(members: &str, extra: &str) -> String {
    if members.is_empty() {
        extra.to_owned()
    } else {
        format!("{members},{extra}")
    }
}

#[tokio::test]
async fn a_lease_is_acquired_once_and_a_second_acquire_gets_423_naming_the_holder() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let lease = acquire(&app, &id, "sync-42", 600).await;
    let second = app.op("lease/acquire", &id, r#""holder":"other","ttlSeconds":60"#).await;
    let message = r#"A sync lease on this connection is already held by "sync-42"."#;
    let details = json!({ "holder": "sync-42", "expiresAt": lease.expires_at });
    assert_eq!(refused(&second), (423, known_error_with_details(message, "LeaseHeld", &details)));
    // Another connection is not affected.
    acquire(&app, &new_id(), "other", 60).await;
}

#[tokio::test]
async fn while_a_lease_is_held_guarded_writes_without_its_token_get_423_and_write_nothing() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let before = app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    let lease = acquire(&app, &id, "sync", 600).await;
    for (op, members) in guarded_writes() {
        let answer = app.op(op, &id, &members).await;
        assert_eq!(refused(&answer), (423, sync_running("sync", &lease)), "{op} {members}");
    }
    // Lease problems come before a revision mismatch: they say whom to wait for.
    let stale_revision = with(&streams(&[("a", Some("2"))]), r#""expectedRevision":0"#);
    let answer = app.op("create_or_update_safe", &id, &stale_revision).await;
    assert_eq!(refused(&answer), (423, sync_running("sync", &lease)));
    assert_eq!(app.op("get", &id, "").await, before);
    // The plain create_or_update writes regardless, as Airbyte's does.
    let plain = app.op("create_or_update", &id, &streams(&[("a", Some("3"))])).await;
    assert_eq!((plain.status, plain.etag.as_deref()), (200, Some("\"2\"")));
}

#[tokio::test]
async fn writes_carrying_the_live_token_in_body_or_header_succeed() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.op("create_or_update", &id, &streams(&[("a", Some("1"))])).await;
    let lease = acquire(&app, &id, "sync", 600).await;
    let in_body = format!(r#""leaseToken":"{}""#, lease.token);
    let header = [("highwater-lease-token", lease.token.as_str())];
    let plain = app.op("create_or_update", &id, &with(&streams(&[("a", Some("2"))]), &in_body)).await;
    assert_eq!((plain.status, plain.etag.as_deref()), (200, Some("\"2\"")));
    let safe = app.op_with("create_or_update_safe", &id, &streams(&[("b", Some("3"))]), &header).await;
    assert_eq!((safe.status, safe.etag.as_deref()), (200, Some("\"3\"")));
    for (n, (op, members)) in guarded_writes().into_iter().enumerate() {
        let answer = if n % 2 == 0 {
            app.op(op, &id, &with(&members, &in_body)).await
        } else {
            app.op_with(op, &id, &members, &header).await
        };
        assert_eq!(answer.status, 200, "{op} {members}: {}", answer.body);
    }
    // Body and header must agree.
    let both = app.op_with("reset", &id, r#""leaseToken":"x""#, &header).await;
    let message = "disagrees with the body's value x";
    let expected = invalid_input(
        &format!("Invalid input: highwater-lease-token: {message}."),
        &[("highwater-lease-token", Some(lease.token.as_str()), message)],
    );
    assert_eq!((both.status, both.body), (422, expected));
    // A wrong token is refused even by the plain create_or_update.
    let before = app.op("get", &id, "").await;
    let wrong = app.op("create_or_update", &id, &with(&streams(&[("z", Some("1"))]), r#""leaseToken":"nope""#)).await;
    assert_eq!(refused(&wrong), (409, stale()));
    assert_eq!(app.op("get", &id, "").await, before);
}

#[tokio::test]
async fn renew_extends_a_live_lease_and_refuses_another_token() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let lease = acquire(&app, &id, "sync", 60).await;
    let renewed = app.op("lease/renew", &id, &format!(r#""token":"{}","ttlSeconds":3600"#, lease.token)).await;
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    let expires_at = renewed.json()["expiresAt"].as_str().unwrap().to_owned();
    let expected =
        format!(r#"{{"connectionId":"{id}","holder":"sync","token":"{}","expiresAt":"{expires_at}"}}"#, lease.token);
    assert_eq!(renewed.body, expected);
    let extended = rfc3339_ms(&expires_at) - rfc3339_ms(&lease.expires_at);
    assert!((3_530_000..=3_550_000).contains(&extended), "extended by {extended} ms");
    let other = app.op("lease/renew", &id, r#""token":"not-the-token","ttlSeconds":60"#).await;
    assert_eq!(refused(&other), (409, stale()));
    let listed = app.op("lease/list", &id, "").await;
    assert!(listed.body.contains(&expires_at), "{}", listed.body);
}

#[tokio::test]
async fn after_release_safe_writes_succeed_and_the_old_token_is_refused() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let lease = acquire(&app, &id, "sync", 600).await;
    let release = format!(r#""token":"{}""#, lease.token);
    let released = app.op("lease/release", &id, &release).await;
    assert_eq!((released.status, released.body), (200, format!(r#"{{"connectionId":"{id}","released":true}}"#)));
    let safe = app.op("create_or_update_safe", &id, &streams(&[("a", Some("1"))])).await;
    assert_eq!((safe.status, safe.etag.as_deref()), (200, Some("\"1\"")));
    let old_token = format!(r#""leaseToken":"{}""#, lease.token);
    for route in ["create_or_update", "create_or_update_safe"] {
        let late = app.op(route, &id, &with(&streams(&[("a", Some("2"))]), &old_token)).await;
        assert_eq!(refused(&late), (409, stale()), "{route}");
    }
    let header = [("highwater-lease-token", lease.token.as_str())];
    let late = app.op_with("stream/set", &id, r#""streamDescriptor":{"name":"a"},"streamState":3"#, &header).await;
    assert_eq!(refused(&late), (409, stale()));
    assert_eq!(app.op("get", &id, "").await, safe);
    assert_eq!(refused(&app.op("lease/release", &id, &release).await), (409, stale()));
    let renew = format!(r#"{release},"ttlSeconds":60"#);
    assert_eq!(refused(&app.op("lease/renew", &id, &renew).await), (409, stale()));
    let next = acquire(&app, &id, "sync-2", 60).await;
    assert_ne!(next.token, lease.token);
}

#[tokio::test]
async fn an_expired_lease_stops_guarding_and_its_token_is_refused() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let lease = acquire(&app, &id, "short", 1).await;
    let list = format!(r#"{{"connectionId":"{id}"}}"#);
    let blocked = app.op("create_or_update_safe", &id, &streams(&[("a", Some("1"))])).await;
    assert_eq!(refused(&blocked), (423, sync_running("short", &lease)));
    // The one wait of this test: let the one-second lease run out.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(app.send("/v1/state/lease/list", &list, &[]).await.body, r#"{"leases":[]}"#);
    let safe = app.op("create_or_update_safe", &id, &streams(&[("a", Some("1"))])).await;
    assert_eq!((safe.status, safe.etag.as_deref()), (200, Some("\"1\"")));
    let late_set = format!(r#""streamDescriptor":{{"name":"a"}},"streamState":9,"leaseToken":"{}""#, lease.token);
    assert_eq!(refused(&app.op("stream/set", &id, &late_set).await), (409, stale()));
    let renew = format!(r#""token":"{}","ttlSeconds":60"#, lease.token);
    assert_eq!(refused(&app.op("lease/renew", &id, &renew).await), (409, stale()));
    assert_eq!(app.op("get", &id, "").await, safe);
    // Its holder may still release it, as nobody has taken the connection since.
    let released = app.op("lease/release", &id, &format!(r#""token":"{}""#, lease.token)).await;
    assert_eq!((released.status, released.body), (200, format!(r#"{{"connectionId":"{id}","released":true}}"#)));
    acquire(&app, &id, "next", 60).await;
}

#[tokio::test]
async fn a_sync_writes_under_its_lease_while_the_ui_waits_and_a_stale_token_is_refused() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let ui = |blob: &'static str| {
        let (app, id) = (&app, id.clone());
        async move { app.op("create_or_update_safe", &id, &streams(&[("ui", Some(blob))])).await }
    };
    let sync = acquire(&app, &id, "job-1", 600).await;
    let token = [("highwater-lease-token", sync.token.as_str())];
    for n in 1..=3 {
        let progress =
            app.op_with("create_or_update", &id, &streams(&[("orders", Some(&n.to_string()))]), &token).await;
        assert_eq!(progress.etag, Some(format!("\"{n}\"")));
        assert_eq!(refused(&ui("\"edit\"").await), (423, sync_running("job-1", &sync)));
    }
    app.op("lease/release", &id, &format!(r#""token":"{}""#, sync.token)).await;
    assert_eq!(ui("\"edit\"").await.etag.as_deref(), Some("\"4\""));

    // A second sync takes a short lease and never comes back.
    let crashed = acquire(&app, &id, "job-2", 1).await;
    let token = [("highwater-lease-token", crashed.token.as_str())];
    assert_eq!(app.op_with("create_or_update", &id, &streams(&[("orders", Some("4"))]), &token).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let edit = ui("\"again\"").await;
    assert_eq!(edit.etag.as_deref(), Some("\"6\""));
    let late = app.op_with("create_or_update", &id, &streams(&[("orders", Some("5"))]), &token).await;
    assert_eq!(refused(&late), (409, stale()));
    let expected = format!(
        r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{{"streamDescriptor":{{"name":"orders"}},"streamState":4}},{{"streamDescriptor":{{"name":"ui"}},"streamState":"again"}}]}}"#
    );
    assert_eq!(app.op("get", &id, "").await, ok(&expected, 6));
}

#[tokio::test]
async fn list_shows_live_leases_without_tokens_filtered_by_connection() {
    let app = TestApp::spawn().await;
    let mut ids = [new_id(), new_id()];
    ids.sort();
    let first = acquire(&app, &ids[0], "a", 600).await;
    let second = acquire(&app, &ids[1], "b", 300).await;
    let info = |id: &str, holder: &str, lease: &Lease| {
        format!(r#"{{"connectionId":"{id}","holder":"{holder}","expiresAt":"{}"}}"#, lease.expires_at)
    };
    let (one, two) = (info(&ids[0], "a", &first), info(&ids[1], "b", &second));
    let all = app.send("/v1/state/lease/list", "{}", &[]).await;
    assert_eq!((all.status, all.body), (200, format!(r#"{{"leases":[{one},{two}]}}"#)));
    assert_eq!(app.op("lease/list", &ids[1], "").await.body, format!(r#"{{"leases":[{two}]}}"#));
    assert_eq!(app.op("lease/list", &new_id(), "").await.body, r#"{"leases":[]}"#);
    app.op("lease/release", &ids[0], &format!(r#""token":"{}""#, first.token)).await;
    let all = app.send("/api/v1/state/lease/list", r#"{"connectionId":null}"#, &[]).await;
    assert_eq!(all.body, format!(r#"{{"leases":[{two}]}}"#));
    let bad = app.send("/v1/state/lease/list", r#"{"connectionId":"x"}"#, &[]).await;
    let message = "must be a UUID in its 36-character form";
    let expected =
        invalid_input(&format!("Invalid input: connectionId: {message}."), &[("connectionId", Some("x"), message)]);
    assert_eq!((bad.status, bad.body), (422, expected));
}

#[tokio::test]
async fn malformed_lease_requests_get_422() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let range = "must be an integer between 1 and 86400";
    let integer = "must be an integer between 1 and 86400";
    let cases: &[(&str, &str, FieldErrors<'_>)] = &[
        ("acquire", r#""holder":"h","ttlSeconds":0"#, &[("ttlSeconds", Some("0"), range)]),
        ("acquire", r#""holder":"h","ttlSeconds":"60""#, &[("ttlSeconds", Some("60"), integer)]),
        ("acquire", r#""holder":"h","ttlSeconds":1.5"#, &[("ttlSeconds", Some("1.5"), integer)]),
        ("acquire", r#""holder":"h""#, &[("ttlSeconds", None, "is required")]),
        ("acquire", r#""ttlSeconds":60"#, &[("holder", None, "is required")]),
        ("acquire", r#""holder":"","ttlSeconds":60"#, &[("holder", Some(""), "must be 1 to 200 characters")]),
        ("renew", r#""ttlSeconds":60"#, &[("token", None, "is required")]),
        ("renew", r#""token":"t","ttlSeconds":-1"#, &[("ttlSeconds", Some("-1"), integer)]),
        ("release", r#""token":5"#, &[("token", Some("5"), "must be a string")]),
    ];
    for (op, members, errors) in cases {
        let answer = app.op(&format!("lease/{op}"), &id, members).await;
        let (path, _, message) = errors[0];
        let expected = invalid_input(&format!("Invalid input: {path}: {message}."), errors);
        assert_eq!((answer.status, answer.body), (422, expected), "{op} {members}");
    }
    let over = app.op("lease/acquire", &id, r#""holder":"h","ttlSeconds":86401"#).await;
    let error = &over.json()["validationErrors"][0];
    assert_eq!(
        (over.status, &error["propertyPath"], &error["invalidValue"]),
        (422, &json!("ttlSeconds"), &json!("86401"))
    );
    assert_eq!(app.op("lease/list", &id, "").await.body, r#"{"leases":[]}"#);
}

#[tokio::test]

async fn an_out_of_range_ttl_or_limit_names_the_range_actually_accepted() {
    let app = TestApp::spawn().await;
    let id = new_id();
    for (op, members, range) in [
        ("lease/acquire", r#""holder":"h","ttlSeconds":86401"#, "1 and 86400"),
        ("history", r#""limit":1001"#, "1 and 1000"),
    ] {
        let answer = app.op(op, &id, members).await;
        let message = answer.json()["validationErrors"][0]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(range), "{op} {members}: {message}");
    }
}
