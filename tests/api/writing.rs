//! Writing (STATE-API.md §2, §4.2, §5): per-key merge, nulls, the global
//! shared blob, ignored fields, atomicity under concurrency.

use crate::harness::{new_id, TestApp};

fn item(name: &str, blob: Option<&str>) -> String {
    match blob {
        Some(blob) => format!(r#"{{"streamDescriptor":{{"name":"{name}"}},"streamState":{blob}}}"#),
        None => format!(r#"{{"streamDescriptor":{{"name":"{name}"}}}}"#),
    }
}

fn stream_write(items: &[String]) -> String {
    format!(r#"{{"stateType":"stream","streamState":[{}]}}"#, items.join(","))
}

#[tokio::test]
async fn a_stream_write_upserts_present_deletes_absent_and_leaves_the_rest() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.write(&id, &stream_write(&[item("a", Some("1")), item("b", Some("1")), item("c", Some("1"))])).await;
    let (status, body) =
        app.write(&id, &stream_write(&[item("a", Some("null")), item("b", None), item("d", Some("4"))])).await;
    assert_eq!(status, 200);
    let expected = format!(
        r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{},{},{}]}}"#,
        item("a", Some("null")),
        item("c", Some("1")),
        item("d", Some("4"))
    );
    assert_eq!(body, expected);
    assert_eq!(app.read(&id).await, expected);
}

#[tokio::test]
async fn namespaces_distinguish_streams_and_null_means_absent() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let state = r#"{"stateType":"stream","streamState":[
        {"streamDescriptor":{"name":"s","namespace":"a"},"streamState":1},
        {"streamDescriptor":{"name":"s","namespace":""},"streamState":2},
        {"streamDescriptor":{"name":"s","namespace":null},"streamState":3}]}"#;
    let (status, body) = app.write(&id, state).await;
    assert_eq!(status, 200);
    let expected = format!(
        r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{{"streamDescriptor":{{"name":"s","namespace":"a"}},"streamState":1}},{{"streamDescriptor":{{"name":"s","namespace":""}},"streamState":2}},{{"streamDescriptor":{{"name":"s"}},"streamState":3}}]}}"#
    );
    assert_eq!(body, expected);
}

#[tokio::test]
async fn a_legacy_write_replaces_the_blob_and_without_state_clears_it() {
    let app = TestApp::spawn().await;
    let id = new_id();
    app.write(&id, r#"{"stateType":"legacy","state":{"a":1}}"#).await;
    let (_, body) = app.write(&id, r#"{"stateType":"legacy","state":[2]}"#).await;
    assert_eq!(body, format!(r#"{{"stateType":"legacy","connectionId":"{id}","state":[2]}}"#));
    let (status, body) = app.write(&id, r#"{"stateType":"legacy"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!(r#"{{"stateType":"not_set","connectionId":"{id}"}}"#));
}

#[tokio::test]
async fn a_literal_null_legacy_state_is_stored() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let (_, body) = app.write(&id, r#"{"stateType":"legacy","state":null}"#).await;
    assert_eq!(body, format!(r#"{{"stateType":"legacy","connectionId":"{id}","state":null}}"#));
}

#[tokio::test]
async fn a_global_write_without_shared_state_deletes_it_and_keeps_streams() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let first = format!(
        r#"{{"stateType":"global","globalState":{{"shared_state":{{"lsn":7}},"streamStates":[{}]}}}}"#,
        item("a", Some("1"))
    );
    let (_, body) = app.write(&id, &first).await;
    assert_eq!(
        body,
        format!(
            r#"{{"stateType":"global","connectionId":"{id}","globalState":{{"shared_state":{{"lsn":7}},"streamStates":[{}]}}}}"#,
            item("a", Some("1"))
        )
    );
    // No shared_state and no streamStates: the shared blob goes, streams stay.
    let (status, body) = app.write(&id, r#"{"stateType":"global","globalState":{}}"#).await;
    assert_eq!(status, 200);
    let expected = format!(
        r#"{{"stateType":"global","connectionId":"{id}","globalState":{{"streamStates":[{}]}}}}"#,
        item("a", Some("1"))
    );
    assert_eq!(body, expected);
}

#[tokio::test]
async fn a_global_state_accepts_the_shared_state_alias_and_always_lists_streams() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let (status, body) =
        app.write(&id, r#"{"stateType":"global","globalState":{"sharedState":{"x":1},"streamStates":null}}"#).await;
    assert_eq!(status, 200);
    let expected = format!(
        r#"{{"stateType":"global","connectionId":"{id}","globalState":{{"shared_state":{{"x":1}},"streamStates":[]}}}}"#
    );
    assert_eq!(body, expected);
}

#[tokio::test]
async fn the_inner_connection_id_and_other_types_fields_are_ignored() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let state = r#"{"stateType":"legacy","connectionId":"not-a-uuid","state":{"a":1},
        "streamState":"junk","globalState":42,"unknown":{"x":[1]}}"#;
    let (status, body) = app.write(&id, state).await;
    assert_eq!(status, 200);
    assert_eq!(body, format!(r#"{{"stateType":"legacy","connectionId":"{id}","state":{{"a":1}}}}"#));
}

#[tokio::test]
async fn unknown_properties_are_ignored_at_every_level() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let body = format!(
        r#"{{"connectionId":"{id}","extra":true,"connectionState":{{"stateType":"stream","x":1,
           "streamState":[{{"streamDescriptor":{{"name":"a","y":2}},"streamState":1,"z":3}}]}}}}"#
    );
    let (status, _) = app.post("/v1/state/create_or_update", &body).await;
    assert_eq!(status, 200);
    assert_eq!(
        app.read(&id).await,
        format!(r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{}]}}"#, item("a", Some("1")))
    );
}

#[tokio::test]
async fn a_write_that_changes_nothing_is_answered_normally() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let state = stream_write(&[item("a", Some("1"))]);
    let (_, first) = app.write(&id, &state).await;
    let (status, second) = app.write(&id, &state).await;
    assert_eq!((status, second), (200, first));
    let (status, body) = app.write(&new_id(), &stream_write(&[])).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#""stateType":"not_set""#), "{body}");
}

#[tokio::test]
async fn the_safe_write_behaves_like_the_plain_one_without_a_sync() {
    let app = TestApp::spawn().await;
    let id = new_id();
    let body = format!(r#"{{"connectionId":"{id}","connectionState":{}}}"#, stream_write(&[item("a", Some("1"))]));
    let (status, answer) = app.post("/api/v1/state/create_or_update_safe", &body).await;
    assert_eq!(status, 200);
    assert_eq!(answer, app.read(&id).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_all_land_and_readers_never_see_half_a_write() {
    let app = std::sync::Arc::new(TestApp::spawn().await);
    let id = new_id();
    let writers = (0..8).map(|w| {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move {
            for i in 0..20 {
                // Each write sets a pair of streams that must appear together.
                let items = [item(&format!("{w}-{i}-a"), Some("1")), item(&format!("{w}-{i}-b"), Some("1"))];
                assert_eq!(app.write(&id, &stream_write(&items)).await.0, 200);
            }
        })
    });
    let writers: Vec<_> = writers.collect();
    let reader = {
        let (app, id) = (app.clone(), id.clone());
        tokio::spawn(async move {
            for _ in 0..50 {
                let body = app.read(&id).await;
                let state: serde_json::Value = serde_json::from_str(&body).unwrap();
                let names: std::collections::HashSet<String> = state["streamState"]
                    .as_array()
                    .map(|items| {
                        items.iter().map(|s| s["streamDescriptor"]["name"].as_str().unwrap().to_owned()).collect()
                    })
                    .unwrap_or_default();
                for name in names.iter().filter(|n| n.ends_with("-a")) {
                    let pair = format!("{}-b", name.trim_end_matches("-a"));
                    assert!(names.contains(&pair), "{name} visible without {pair}");
                }
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    reader.await.unwrap();
    let state: serde_json::Value = serde_json::from_str(&app.read(&id).await).unwrap();
    assert_eq!(state["streamState"].as_array().unwrap().len(), 8 * 20 * 2);
}

/// A state large enough that its entries span several shared chunks and
/// its rendering is made from the one before (64 entries and more):
/// every write's answer and every read is the state a plain model of §4
/// gives, through updates, additions, deletes, re-additions, writes that
/// change nothing, and a restart that empties every cache.
#[tokio::test]
async fn a_large_state_answers_every_write_with_the_whole_state_as_it_is() {
    let mut app = TestApp::spawn().await;
    let id = new_id();
    let mut rng = crate::harness::Rng::new(0x5eed_1a7e);
    // The model: (name, blob) in first-insertion order.
    let mut model: Vec<(String, String)> = (0..150).map(|i| (format!("t{i:03}"), i.to_string())).collect();
    let initial: Vec<String> = model.iter().map(|(name, blob)| item(name, Some(blob))).collect();
    app.write(&id, &stream_write(&initial)).await;
    let expected = |model: &[(String, String)]| {
        let items: Vec<String> = model.iter().map(|(name, blob)| item(name, Some(blob))).collect();
        format!(r#"{{"stateType":"stream","connectionId":"{id}","streamState":[{}]}}"#, items.join(","))
    };
    for step in 0..80 {
        if step == 40 {
            app.restart().await;
        }
        let mut items = Vec::new();
        for _ in 0..=rng.below(3) {
            let name = format!("t{:03}", rng.below(170));
            if items.iter().any(|item: &String| item.contains(&format!("\"{name}\""))) {
                continue;
            }
            let at = model.iter().position(|(held, _)| *held == name);
            match (rng.below(5), at) {
                // A delete (of a stream held or not).
                (0, _) => {
                    if let Some(at) = at {
                        model.remove(at);
                    }
                    items.push(item(&name, None));
                }
                // The blob the stream already has: nothing changes.
                (1, Some(at)) => items.push(item(&name, Some(&model[at].1))),
                // A new blob: in place, or last for a stream not held.
                (_, at) => {
                    let blob = rng.blob();
                    match at {
                        Some(at) => model[at].1 = blob.clone(),
                        None => model.push((name.clone(), blob.clone())),
                    }
                    items.push(item(&name, Some(&blob)));
                }
            }
        }
        let (status, body) = app.write(&id, &stream_write(&items)).await;
        assert_eq!(status, 200, "step {step}: {body}");
        let expected = expected(&model);
        assert_eq!(body, expected, "step {step}: the answer to {items:?}");
        assert_eq!(app.read(&id).await, expected, "step {step}: a read after {items:?}");
    }
}
