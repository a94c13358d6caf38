//! Two `highwater serve` processes on one fresh PostgreSQL database, started
//! together (so their migrations race), with concurrent writers spread over
//! both nodes and sharing three connections. Every acknowledged write must be
//! readable with its value, and each connection's revisions must be exactly
//! 1..=N, N being the number of writes acknowledged for it: no write lost, no
//! revision skipped or taken twice across nodes.
//!
//! PostgreSQL only: the database is created on the server at
//! `HIGHWATER_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`)
//! whatever `HIGHWATER_TEST_BACKEND` says, and dropped at the end.

#[path = "support/mod.rs"]
mod support;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use highwater::state::ConnectionId;
use serde_json::json;
use support::server::{read_streams, stream_write, Notable, Server};
use support::TestDatabase;

const NODES: usize = 2;
const CLIENTS: usize = 16;
const WRITES_PER_CLIENT: u64 = 40;
const CONNECTIONS: usize = 3;
/// Kept below the default so that parallel test runs fit in the server's
/// `max_connections`.
const POOL_SIZE: &str = "8";
/// Per request; nothing is down here, so this only turns a hang into a failure.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole test, start-up to verification.
const TEST_TIMEOUT: Duration = Duration::from_secs(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn concurrent_writers_through_two_nodes_lose_nothing_and_number_revisions_without_gaps() {
    let database = TestDatabase::postgres_always().await;
    match tokio::time::timeout(TEST_TIMEOUT, run(&database)).await {
        Ok(()) => {}
        Err(_) => panic!("the test did not finish within {TEST_TIMEOUT:?}"),
    }
}

async fn run(database: &TestDatabase) {
    // Both nodes start at once, so their migrations run concurrently.
    let url = database.url_text();
    let notable = Notable::default();
    let starting: Vec<_> = (0..NODES)
        .map(|_| {
            let (url, notable) = (url.clone(), notable.clone());
            thread::spawn(move || {
                let args = ["--listen", "127.0.0.1:0", "--database-url", &url, "--database-pool-size", POOL_SIZE];
                Server::start_noting(&args, &notable)
            })
        })
        .collect();
    let servers: Vec<Server> = starting.into_iter().map(|s| s.join().expect("a node failed to start")).collect();
    let bases: Arc<Vec<String>> = Arc::new(servers.iter().map(|s| s.base_url().to_owned()).collect());
    let connections: Arc<Vec<String>> =
        Arc::new((0..CONNECTIONS).map(|_| ConnectionId::random().to_string()).collect());

    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let bases = Arc::clone(&bases);
            let connections = Arc::clone(&connections);
            tokio::spawn(writer(client, bases, connections))
        })
        .collect();
    let mut acked: Vec<Ack> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for task in tasks {
        let (ok, failed) = task.await.expect("writer task");
        acked.extend(ok);
        failures.extend(failed);
    }
    let elapsed = started.elapsed();
    let writes = CLIENTS as u64 * WRITES_PER_CLIENT;
    println!(
        "multinode: {writes} writes by {CLIENTS} clients through {NODES} nodes to {CONNECTIONS} connections: \
         {} acknowledged, {} failed, in {:.2} s ({:.0} writes/s)",
        acked.len(),
        failures.len(),
        elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {writes} writes were not acknowledged with 200 (nothing was down); first ones:\n{}\nnotable log lines:\n{}",
        failures.len(),
        failures.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        notable.lines().join("\n")
    );

    // Every acknowledged stream is there with its value, read through each node.
    let http = reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build().expect("HTTP client");
    for (index, id) in connections.iter().enumerate() {
        let expected: Vec<&Ack> = acked.iter().filter(|a| a.connection == index).collect();
        for base in bases.iter() {
            let streams = read_streams(&http, base, id).await;
            let missing: Vec<String> = expected
                .iter()
                .filter(|a| streams.get(&a.stream) != Some(&json!({ "seq": a.seq })))
                .map(|a| format!("{} (read: {:?})", a.stream, streams.get(&a.stream)))
                .collect();
            assert!(
                missing.is_empty(),
                "connection {id} read through {base}: {} of {} acknowledged streams missing or wrong: {}",
                missing.len(),
                expected.len(),
                missing.iter().take(20).cloned().collect::<Vec<_>>().join(", ")
            );
            assert_eq!(
                streams.len(),
                expected.len(),
                "connection {id} read through {base}: more streams than acknowledged writes"
            );
        }
    }

    // Revisions: exactly 1..=N per connection, N = acknowledged writes to it.
    let db = support::connect(&url).await;
    for (index, id) in connections.iter().enumerate() {
        let n = acked.iter().filter(|a| a.connection == index).count() as i64;
        let revisions = support::postgres_revisions(&db, id).await;
        let expected: Vec<i64> = (1..=n).collect();
        if revisions != expected {
            panic!("connection {id}: {n} acknowledged writes but revisions are {}", describe_revisions(&revisions));
        }
        let (latest,): (i64,) = db
            .query_one("SELECT revision FROM connections WHERE connection_id = $1", &[id])
            .await
            .map(|row| (row.get(0),))
            .expect("query connections");
        assert_eq!(latest, n, "connection {id}: connections.revision disagrees with the revisions table");
        println!("multinode: connection {id}: {n} acknowledged writes, revisions 1..={n}");
    }

    for server in servers {
        server.kill();
    }
    let notable = notable.lines();
    if !notable.is_empty() {
        println!("multinode: warnings and errors the nodes logged:\n{}", notable.join("\n"));
    }
}

/// An acknowledged write: stream `stream` set to `{"seq": seq}` on connection
/// number `connection`.
struct Ack {
    connection: usize,
    stream: String,
    seq: u64,
}

/// One client: alternates nodes, cycles over the shared connections, one new
/// stream per write.
async fn writer(client: usize, bases: Arc<Vec<String>>, connections: Arc<Vec<String>>) -> (Vec<Ack>, Vec<String>) {
    let http = reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build().expect("HTTP client");
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    for seq in 0..WRITES_PER_CLIENT {
        let base = &bases[(client + seq as usize) % bases.len()];
        let connection = (client + seq as usize) % connections.len();
        let stream = format!("c{client}-{seq}");
        let body = stream_write(&connections[connection], &stream, &json!({ "seq": seq }));
        let sent = http.post(format!("{base}/api/v1/state/create_or_update")).json(&body).send().await;
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_else(|e| format!("<body unreadable: {e}>"));
                if status == 200 {
                    acked.push(Ack { connection, stream, seq });
                } else {
                    failed.push(format!("{stream} via {base}: {status} {text}"));
                }
            }
            Err(error) => failed.push(format!("{stream} via {base}: transport error {error}")),
        }
    }
    (acked, failed)
}

/// A short account of where a revision list departs from 1, 2, 3 …
fn describe_revisions(revisions: &[i64]) -> String {
    let mut gaps = Vec::new();
    let mut duplicates = Vec::new();
    let mut previous = 0;
    for &revision in revisions {
        if revision == previous {
            duplicates.push(revision);
        } else if revision != previous + 1 {
            gaps.push(format!("{}..{}", previous + 1, revision - 1));
        }
        previous = revision;
    }
    format!(
        "{} rows, max {:?}, gaps [{}], duplicates {:?}",
        revisions.len(),
        revisions.last(),
        gaps.join(", "),
        duplicates
    )
}

/// Read-modify-write through both nodes: each client reads a counter (and
/// the revision from the ETag), writes counter + 1 with `expectedRevision`,
/// and retries on 409. The final count must equal the acknowledged
/// increments, and every 409 must have been a real conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn compare_and_swap_increments_through_two_nodes_count_exactly() {
    const INCREMENTS_PER_CLIENT: u64 = 15;
    const COUNTERS: usize = 8;
    let database = TestDatabase::postgres_always().await;
    let url = database.url_text();
    let servers: Vec<Server> = (0..NODES)
        .map(|_| Server::start(&["--listen", "127.0.0.1:0", "--database-url", &url, "--database-pool-size", POOL_SIZE]))
        .collect();
    let bases: Arc<Vec<String>> = Arc::new(servers.iter().map(|s| s.base_url().to_owned()).collect());
    let id = ConnectionId::random().to_string();
    let http = reqwest::Client::builder().timeout(CLIENT_TIMEOUT).build().expect("client");
    let tasks: Vec<_> = (0..COUNTERS)
        .map(|client| {
            let (bases, id, http) = (Arc::clone(&bases), id.clone(), http.clone());
            tokio::spawn(async move {
                let (mut acked, mut conflicts) = (0u64, 0u64);
                let mut attempt = 0usize;
                while acked < INCREMENTS_PER_CLIENT {
                    attempt += 1;
                    let base = &bases[(client + attempt) % bases.len()];
                    let read = http
                        .post(format!("{base}/api/v1/state/get"))
                        .header("content-type", "application/json")
                        .body(json!({ "connectionId": id }).to_string())
                        .send()
                        .await
                        .expect("get");
                    let etag = read.headers()["etag"].to_str().expect("etag").trim_matches('"').to_owned();
                    let revision: u64 = etag.parse().expect("numeric etag");
                    let state: serde_json::Value = read.json().await.expect("state");
                    let count = state["streamState"][0]["streamState"]["count"].as_u64().unwrap_or(0);
                    let write = json!({
                        "connectionId": id,
                        "expectedRevision": revision,
                        "connectionState": {"stateType": "stream", "streamState": [
                            {"streamDescriptor": {"name": "counter"}, "streamState": {"count": count + 1}}]}
                    });
                    let answer = http
                        .post(format!("{base}/api/v1/state/create_or_update"))
                        .header("content-type", "application/json")
                        .body(write.to_string())
                        .send()
                        .await
                        .expect("write");
                    match answer.status().as_u16() {
                        200 => acked += 1,
                        409 => {
                            let body: serde_json::Value = answer.json().await.expect("409 body");
                            let current = body["details"]["currentRevision"].as_u64().expect("currentRevision");
                            assert_ne!(current, revision, "a 409 that was not a conflict: {body}");
                            conflicts += 1;
                        }
                        other => panic!("unexpected status {other}"),
                    }
                }
                (acked, conflicts)
            })
        })
        .collect();
    let (mut acked, mut conflicts) = (0, 0);
    for task in tasks {
        let (a, c) = task.await.expect("client");
        acked += a;
        conflicts += c;
    }
    let state = read_streams(&http, &bases[0], &id).await;
    assert_eq!(state["counter"]["count"], json!(acked), "lost or doubled increments");
    let db = support::connect(&url).await;
    let revisions = support::postgres_revisions(&db, &id).await;
    assert_eq!(revisions, (1..=acked as i64).collect::<Vec<_>>(), "revisions are not 1..={acked}");
    drop(servers);
    eprintln!("{acked} increments through {NODES} nodes, {conflicts} real conflicts retried");
}

/// Two stores on one database, as two nodes are: each caches what it wrote
/// and applies its next write to that connection on the cached head in one
/// round trip, so that cached head, and the lease it assumes, must be
/// checked against what the other node did since. Every answer must be the
/// one a node reading the database first would give.
#[tokio::test]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn a_node_writing_on_its_cached_head_sees_what_another_node_did() {
    use highwater::state::ops::{Guard, LeaseOp, Refusal};
    use highwater::state::Blob;
    use highwater::store::StoreError;

    let database = TestDatabase::postgres_always().await;
    let (a, b) = (database.open().await, database.open().await);
    let set = |name: &str, value: u64, guard: Guard| set_stream(name, value, guard, true);
    let expecting = |revision| Guard { expected_revision: Some(revision), ..Guard::default() };
    let respecting = Guard { respect_lease: true, ..Guard::default() };
    let names = |state: &highwater::state::StoredState| -> Vec<String> {
        state.entries.iter().map(|(key, _)| format!("{key:?}")).collect()
    };

    // Revisions: A's cached head is 1 when B makes it 2.
    let id = ConnectionId::random();
    a.apply(id, set("a", 1, Guard::default())).await.unwrap();
    b.apply(id, set("b", 1, Guard::default())).await.unwrap();
    let applied = a.apply(id, set("a", 2, expecting(2))).await.expect("a write expecting B's revision");
    assert_eq!(applied.revision, 3);
    assert_eq!(names(&applied.state.unwrap()).len(), 2, "A's write lost B's stream");
    b.apply(id, set("b", 2, Guard::default())).await.unwrap();
    match a.apply(id, set("a", 3, expecting(3))).await {
        Err(StoreError::Refused(Refusal::RevisionMismatch { expected: 3, current: 4 })) => {}
        other => panic!("expected a revision mismatch at 4, got {other:?}"),
    }
    assert_eq!(a.apply(id, set("a", 3, expecting(4))).await.unwrap().revision, 5);
    assert_eq!(b.read(id).await.unwrap().revision, 5);

    // Leases: A's cached head is current, but B took a lease since.
    let other = ConnectionId::random();
    a.apply(other, set("s", 1, Guard::default())).await.unwrap();
    let lease = b
        .lease(other, LeaseOp::Acquire { holder: "sync-on-b".to_owned(), ttl_ms: 60_000 })
        .await
        .unwrap()
        .expect("a lease");
    match a.apply(other, set("s", 2, respecting.clone())).await {
        Err(StoreError::Refused(Refusal::Locked { holder, .. })) => assert_eq!(holder, "sync-on-b"),
        other => panic!("expected the write refused by B's lease, got {other:?}"),
    }
    let with_token = Guard { lease_token: Some(lease.token.clone()), ..respecting.clone() };
    assert_eq!(a.apply(other, set("s", 3, with_token.clone())).await.unwrap().revision, 2);
    // The cached head is current and the write names the lease: B releasing
    // it is all that changed.
    b.lease(other, LeaseOp::Release { token: lease.token.clone() }).await.unwrap();
    match a.apply(other, set("s", 4, with_token)).await {
        Err(StoreError::Refused(Refusal::StaleLease)) => {}
        other => panic!("expected a stale lease, got {other:?}"),
    }
    assert_eq!(a.apply(other, set("s", 5, respecting)).await.unwrap().revision, 3);
    let state = b.read(other).await.unwrap();
    assert_eq!(state.revision, 3);
    assert_eq!(state.entries[0].1, Blob::from_json("5"));
}

/// Every write reaches the database while its transaction holds its
/// connection's advisory lock, including the first a pooled session makes,
/// when its statements are not yet prepared. A trigger the test adds to
/// `history` records, for each statement writing it, how many connection
/// locks (`pg_advisory_xact_lock(bigint)`, objsubid 1) its session holds.
#[tokio::test]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn every_write_is_made_under_its_connections_lock() {
    use highwater::state::ops::Guard;

    let database = TestDatabase::postgres_always().await;
    let store = database.open().await;
    let db = support::connect(&database.url_text()).await;
    db.batch_execute(
        "CREATE TABLE lock_audit (held bigint NOT NULL);
         CREATE FUNCTION lock_audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO lock_audit SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND objsubid = 1 AND granted AND pid = pg_backend_pid();
             RETURN NULL;
         END $$;
         CREATE TRIGGER lock_audit AFTER INSERT ON history FOR EACH STATEMENT EXECUTE FUNCTION lock_audit();",
    )
    .await
    .expect("the audit trigger");
    // Nothing to read back: the changes and the COMMIT go together.
    let set = |value: u64| set_stream("s", value, Guard::default(), false);
    // New connections are not cached: each write reads its head under the
    // lock first, on whichever pooled session is free.
    let writes: Vec<_> = (0..16)
        .map(|value| {
            let store = store.clone();
            tokio::spawn(async move { store.apply(ConnectionId::random(), set(value)).await })
        })
        .collect();
    for write in writes {
        write.await.expect("writer").expect("write");
    }
    let held: Vec<i64> =
        db.query("SELECT held FROM lock_audit", &[]).await.unwrap().iter().map(|row| row.get(0)).collect();
    assert!(!held.is_empty(), "the trigger saw no write");
    assert!(held.iter().all(|&locks| locks > 0), "writes made without their connection's lock: {held:?}");
}

/// A merge setting stream `name` (no namespace) to `value`.
fn set_stream(
    name: &str,
    value: u64,
    guard: highwater::state::ops::Guard,
    return_state: bool,
) -> highwater::state::ops::WriteRequest {
    use highwater::state::ops::{Meta, Operation, WriteRequest};
    use highwater::state::{Blob, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor};
    WriteRequest {
        operation: Operation::Merge(StateWrite {
            state_type: StateType::Stream,
            ops: vec![EntryOp {
                key: EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: None }),
                blob: Some(Blob::from_json(&value.to_string())),
            }],
        }),
        guard,
        meta: Meta::default(),
        return_state,
    }
}
