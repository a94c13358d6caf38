//! Reading (STATE-API.md §1, §3): not_set for unknown connections, id
//! casing, get_type, stream order and blob fidelity.

use crate::harness::{new_id, TestApp};

#[tokio::test]
async fn an_unknown_connection_reads_as_not_set() {
    let app = TestApp::spawn().await;
    let id = new_id();
    assert_eq!(app.read(&id).await, format!(r#"{{"stateType":"not_set","connectionId":"{id}"}}"#));
}

#[tokio::test]
async fn connection_ids_are_accepted_in_upper_case_and_echoed_in_lower_case() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let (status, _) = app.write(&id.to_uppercase(), r#"{"stateType":"legacy","state":{"a":1}}"#).await;
    assert_eq!(status, 200);
    let expected = format!(r#"{{"stateType":"legacy","connectionId":"{id}","state":{{"a":1}}}}"#);
    assert_eq!(app.read(&id.to_uppercase()).await, expected);
}

#[tokio::test]
async fn get_type_answers_a_bare_json_string_for_every_type() {
    let app = TestApp::spawn().await;
    let get_type = |id: String| {
        let app = &app;
        async move {
            let body = format!(r#"{{"connectionId":"{id}"}}"#);
            app.post("/api/v1/web_backend/state/get_type", &body).await
        }
    };
    assert_eq!(get_type(new_id()).await, (200, r#""not_set""#.to_owned()));
    let writes = [
        ("legacy", r#"{"stateType":"legacy","state":{}}"#),
        ("global", r#"{"stateType":"global","globalState":{"shared_state":{}}}"#),
        ("stream", r#"{"stateType":"stream","streamState":[{"streamDescriptor":{"name":"s"},"streamState":{}}]}"#),
    ];
    for (name, state) in writes {
        let id = new_id();
        assert_eq!(app.write(&id, state).await.0, 200);
        assert_eq!(get_type(id).await, (200, format!("\"{name}\"")));
    }
}

#[tokio::test]
async fn clients_sending_accept_any_get_json() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let response = app
        .client
        .post(app.url("/api/v1/state/get"))
        .header("accept", "*/*")
        .header("content-type", "application/json")
        .body(format!(r#"{{"connectionId":"{id}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
}

#[tokio::test]
async fn a_request_without_content_type_is_read_as_json() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let body = format!(r#"{{"connectionId":"{id}"}}"#).into_bytes();
    let (status, _) = app.post_bytes("/v1/state/get", body, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn streams_keep_first_insertion_order_and_readded_streams_go_last() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let stream = |name: &str, value: Option<u32>| match value {
        Some(v) => format!(r#"{{"streamDescriptor":{{"name":"{name}"}},"streamState":{v}}}"#),
        None => format!(r#"{{"streamDescriptor":{{"name":"{name}"}}}}"#),
    };
    let write = |items: Vec<String>| format!(r#"{{"stateType":"stream","streamState":[{}]}}"#, items.join(","));
    app.write(&id, &write(vec![stream("c", Some(1)), stream("a", Some(1)), stream("b", Some(1))])).await;
    // Updating keeps the place; deleting then re-adding moves to the end.
    app.write(&id, &write(vec![stream("a", Some(2)), stream("c", None)])).await;
    let (_, body) = app.write(&id, &write(vec![stream("c", Some(3))])).await;
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&body).unwrap()["streamState"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}={}", s["streamDescriptor"]["name"].as_str().unwrap(), s["streamState"]))
        .collect();
    assert_eq!(names, ["a=2", "b=1", "c=3"]);
    assert_eq!(app.read(&id).await, body);
}

#[tokio::test]
async fn blobs_come_back_exactly_as_sent_but_for_whitespace() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let sent = r#"{ "z" : 1e3, "a": 1.50, "a": 123456789012345678901234567890,
        "s": "caf\u00e9 \"q\" \/ \n", "n": null, "l": [ true , false ], "e": {} }"#;
    let kept = r#"{"z":1e3,"a":1.50,"a":123456789012345678901234567890,"s":"caf\u00e9 \"q\" \/ \n","n":null,"l":[true,false],"e":{}}"#;
    let (status, body) = app.write(&id, &format!(r#"{{"stateType":"legacy","state":{sent}}}"#)).await;
    assert_eq!(status, 200);
    let expected = format!(r#"{{"stateType":"legacy","connectionId":"{id}","state":{kept}}}"#);
    assert_eq!(body, expected);
    assert_eq!(app.read(&id).await, expected);
}

#[tokio::test]
async fn state_survives_a_restart() {
    let mut app = TestApp::spawn().await;
    let id = new_id();
    let (_, written) = app.write(&id, r#"{"stateType":"legacy","state":{"cursor":"2024-01-01"}}"#).await;
    app.restart().await;
    assert_eq!(app.read(&id).await, written);
}
