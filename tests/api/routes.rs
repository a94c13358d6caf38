//! The route table: every route under both prefixes, health, and the
//! OpenAPI document matching what is served.

use std::collections::BTreeSet;

use crate::harness::{new_id, TestApp};

#[tokio::test]
async fn health_reports_available() {
    let app = TestApp::spawn().await;
    for prefix in ["/api/v1", "/v1"] {
        assert_eq!(app.get(&format!("{prefix}/health")).await, (200, r#"{"available":true}"#.to_owned()));
    }
}

#[tokio::test]
async fn every_route_is_served_under_both_prefixes() {
    let app = TestApp::spawn().await;
    let body = format!(r#"{{"connectionId":"{}"}}"#, new_id());
    for route in highwater::api::routes() {
        let (method, path) = (route.method, route.path);
        for prefix in ["/api/v1", "/v1"] {
            let url = format!("{prefix}{path}");
            let (status, answer) = if method == "GET" { app.get(&url).await } else { app.post(&url, &body).await };
            // A write with a body lacking connectionState is 422, not 404.
            assert!(status == 200 || status == 422, "{method} {url}: {status} {answer}");
        }
    }
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_served_routes() {
    let app = TestApp::spawn().await;
    let (status, body) = app.get("/api/v1/openapi").await;
    assert_eq!(status, 200);
    let document: serde_json::Value = serde_json::from_str(&body).expect("the document is JSON");
    assert!(document["openapi"].as_str().unwrap_or("").starts_with("3."));
    let documented: BTreeSet<String> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            let methods = item.as_object().expect("path item").keys();
            methods.map(move |m| format!("{} {path}", m.to_uppercase()))
        })
        .collect();
    let served: BTreeSet<String> =
        highwater::api::routes().into_iter().map(|r| format!("{} /v1{}", r.method, r.path)).collect();
    assert_eq!(documented, served);
}
