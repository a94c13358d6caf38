//! Compare-and-swap and leases under concurrency: optimistic clients lose
//! no update, a 409 is only ever a real conflict, one acquirer wins a lease.

use std::sync::Arc;

use crate::harness::{new_id, streams, TestApp};

const CLIENTS: u64 = 8;
const INCREMENTS: u64 = 25;

/// The counter in stream `counter` of a `state/get` body (0 when unset).
fn counter(state: &serde_json::Value) -> u64 {
    let Some(items) = state["streamState"].as_array() else {
        assert_eq!(state["stateType"], "not_set", "{state}");
        return 0;
    };
    assert_eq!(items.len(), 1, "{state}");
    assert_eq!(items[0]["streamDescriptor"]["name"], "counter");
    items[0]["streamState"]["n"].as_u64().expect("a counter")
}

fn revision_of(etag: Option<&str>) -> u64 {
    let etag = etag.expect("an ETag");
    etag.strip_prefix('"').and_then(|e| e.strip_suffix('"')).and_then(|e| e.parse().ok()).expect(etag)
}

/// One client: read, increment, write back guarded by the revision read
/// (in the body or as `If-Match`), retrying on 409. Returns the increments
/// acknowledged and the conflicts seen.
async fn increment(app: Arc<TestApp>, id: String, use_if_match: bool) -> (u64, u64) {
    let (mut acknowledged, mut conflicts) = (0, 0);
    while acknowledged < INCREMENTS {
        let read = app.op("get", &id, "").await;
        assert_eq!(read.status, 200, "{}", read.body);
        let revision = revision_of(read.etag.as_deref());
        let next = streams(&[("counter", Some(&format!(r#"{{"n":{}}}"#, counter(&read.json()) + 1)))]);
        let answer = if use_if_match {
            app.op_with("create_or_update", &id, &next, &[("if-match", &format!("\"{revision}\""))]).await
        } else {
            app.op("create_or_update", &id, &format!(r#"{next},"expectedRevision":{revision}"#)).await
        };
        match answer.status {
            200 => {
                assert_eq!(revision_of(answer.etag.as_deref()), revision + 1, "{}", answer.body);
                acknowledged += 1;
            }
            409 => {
                let error = answer.json();
                assert_eq!(error["exceptionClassName"], "RevisionConflict", "{}", answer.body);
                let details = &error["details"];
                assert_eq!(details["expectedRevision"].as_u64(), Some(revision), "{}", answer.body);
                let current = details["currentRevision"].as_u64().expect("currentRevision");
                // Real: someone else wrote since this client read.
                assert!(current > revision, "a 409 at the revision that was read: {}", answer.body);
                conflicts += 1;
            }
            status => panic!("unexpected {status}: {}", answer.body),
        }
    }
    (acknowledged, conflicts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_read_modify_write_clients_lose_no_increment_and_every_409_is_real() {
    let app = Arc::new(TestApp::spawn().await);
    let id = new_id();
    let clients: Vec<_> = (0..CLIENTS).map(|c| tokio::spawn(increment(app.clone(), id.clone(), c % 2 == 1))).collect();
    let (mut acknowledged, mut conflicts) = (0, 0);
    for client in clients {
        let (a, c) = client.await.expect("client task");
        acknowledged += a;
        conflicts += c;
    }
    assert_eq!(acknowledged, CLIENTS * INCREMENTS);
    let last = app.op("get", &id, "").await;
    assert_eq!(counter(&last.json()), acknowledged, "{conflicts} conflicts seen");
    // Each acknowledged increment is exactly one revision.
    assert_eq!(revision_of(last.etag.as_deref()), acknowledged);
    let history = app.op("history", &id, r#""limit":1000"#).await.json();
    assert_eq!(history["revisions"].as_array().map(Vec::len), Some(acknowledged as usize));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_acquirers_exactly_one_gets_the_lease() {
    let app = Arc::new(TestApp::spawn().await);
    let id = new_id();
    let acquirers: Vec<_> = (0..8)
        .map(|n| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move {
                let members = format!(r#""holder":"sync-{n}","ttlSeconds":600"#);
                let answer = app.op("lease/acquire", &id, &members).await;
                (answer.status, answer.json())
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut holders_named = Vec::new();
    for acquirer in acquirers {
        match acquirer.await.expect("acquirer task") {
            (200, lease) => winners.push(lease["holder"].clone()),
            (423, error) => holders_named.push(error["details"]["holder"].clone()),
            (status, body) => panic!("unexpected {status}: {body}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(holders_named.len(), 7);
    assert!(holders_named.iter().all(|holder| *holder == winners[0]), "{holders_named:?} vs {winners:?}");
}
