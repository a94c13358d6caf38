//! Authentication and roles: every route × {no credentials, wrong
//! credentials, each role} gets the expected status, with Basic (Airbyte
//! OSS clients) and Bearer (PyAirbyte) credentials.

#[allow(dead_code)]
#[path = "api/harness.rs"]
mod harness;
#[path = "support/mod.rs"]
mod support;

use base64::Engine;
use harness::{known_error, masked, new_id, TestApp};
use highwater::auth::{hash_password, hash_token, Authenticator, Role};

const ADMIN_PASSWORD: &str = "airbyte-password";
const EDITOR_TOKEN: &str = "editor-token-0123456789";
const READER_PASSWORD: &str = "reader-password";

fn authenticator() -> Authenticator {
    let json = format!(
        r#"{{"credentials":[
            {{"name":"airbyte","role":"admin","secretHash":"{}"}},
            {{"name":"ui","role":"editor","secretHash":"{}"}},
            {{"name":"dashboard","role":"reader","secretHash":"{}"}}]}}"#,
        hash_password(ADMIN_PASSWORD).unwrap(),
        hash_token(EDITOR_TOKEN),
        hash_token(READER_PASSWORD),
    );
    Authenticator::from_json(&json).unwrap()
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

/// Who calls: a name for messages, the Authorization header, and the role
/// it proves (`None`: not authenticated).
fn callers() -> Vec<(&'static str, Option<String>, Option<Role>)> {
    vec![
        ("no credentials", None, None),
        ("wrong password", Some(basic("airbyte", "nope")), None),
        ("unknown user", Some(basic("mallory", ADMIN_PASSWORD)), None),
        ("unknown token", Some("Bearer not-a-token".to_owned()), None),
        ("other scheme", Some("Digest username=airbyte".to_owned()), None),
        ("reader (Basic)", Some(basic("dashboard", READER_PASSWORD)), Some(Role::Reader)),
        ("editor (Bearer)", Some(format!("Bearer {EDITOR_TOKEN}")), Some(Role::Editor)),
        ("admin (Basic, Argon2)", Some(basic("airbyte", ADMIN_PASSWORD)), Some(Role::Admin)),
    ]
}

#[tokio::test]
async fn every_route_answers_each_caller_as_its_role_allows() {
    let app = TestApp::spawn_with_auth(authenticator()).await;
    let body = format!(r#"{{"connectionId":"{}"}}"#, new_id());
    for route in highwater::api::routes() {
        for prefix in ["/api/v1", "/v1"] {
            let url = app.url(&format!("{prefix}{}", route.path));
            for (who, header, role) in callers() {
                let mut request = if route.method == "GET" {
                    app.client.get(&url)
                } else {
                    app.client.post(&url).header("content-type", "application/json").body(body.clone())
                };
                if let Some(header) = &header {
                    request = request.header("authorization", header);
                }
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let expected = match (route.role, role) {
                    (None, _) => "open",
                    (Some(_), None) => "401",
                    (Some(needs), Some(has)) if has < needs => "403",
                    _ => "allowed",
                };
                let ok = match expected {
                    "401" => status == 401,
                    "403" => status == 403,
                    // Allowed: the request reaches the handler (a bare id is
                    // a valid read, and an incomplete write is a 422).
                    _ => status != 401 && status != 403,
                };
                assert!(ok, "{} {prefix}{} as {who}: {status}, expected {expected}", route.method, route.path);
            }
        }
    }
}

#[tokio::test]
async fn refusals_explain_themselves_in_the_error_format() {
    let app = TestApp::spawn_with_auth(authenticator()).await;
    let url = app.url("/api/v1/state/create_or_update");
    let body = format!(r#"{{"connectionId":"{}"}}"#, new_id());
    let response =
        app.client.post(&url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], r#"Basic realm="highwater", Bearer realm="highwater""#);
    let message = "Authentication required: send Basic credentials or a Bearer token that Highwater knows.";
    assert_eq!(masked(&response.text().await.unwrap()), known_error(message, "Unauthorized"));

    let response = app
        .client
        .post(&url)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {EDITOR_TOKEN}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let message = "The editor role may not do this; it needs the admin role.";
    assert_eq!(masked(&response.text().await.unwrap()), known_error(message, "Forbidden"));
}

#[tokio::test]
async fn the_authenticated_identity_is_the_actor_in_the_history() {
    let app = TestApp::spawn_with_auth(authenticator()).await;
    let id = new_id();
    let write = format!(
        r#"{{"connectionId":"{id}","actor":"claimed","connectionState":{{"stateType":"legacy","state":{{}}}}}}"#
    );
    let response = app
        .client
        .post(app.url("/api/v1/state/create_or_update"))
        .header("content-type", "application/json")
        .header("authorization", basic("airbyte", ADMIN_PASSWORD))
        .body(write)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let history = app
        .client
        .post(app.url("/api/v1/state/history"))
        .header("content-type", "application/json")
        .header("authorization", basic("dashboard", READER_PASSWORD))
        .body(format!(r#"{{"connectionId":"{id}"}}"#))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let history: serde_json::Value = serde_json::from_str(&history).unwrap();
    assert_eq!(history["revisions"][0]["actor"], "airbyte");
}
