//! The sole-node lease on PostgreSQL (src/store/postgres/sole.rs): a node
//! alone on the database answers reads from memory, and yet every read,
//! through any node, still sees every write acknowledged before it began:
//! when a second node starts, when it stops again, and when the holder's
//! lease session is cut. Runs on PostgreSQL whatever
//! `HIGHWATER_TEST_BACKEND` says; `.ci/run` includes it.

mod support;

use std::time::{Duration, Instant};

use highwater::state::{Blob, ConnectionId, EntryKey, StateType, StateWrite, StreamDescriptor};
use highwater::store::{self, OpenOptions, Store};
use support::TestDatabase;

/// Longer than a lease (2 s) and its renewals, with room for a slow host.
const WITHIN: Duration = Duration::from_secs(10);

fn set(stream: &str, value: u64) -> StateWrite {
    StateWrite {
        state_type: StateType::Stream,
        ops: vec![highwater::state::EntryOp {
            key: EntryKey::stream(StreamDescriptor { name: stream.to_owned(), namespace: None }),
            blob: Some(Blob::from_json(&value.to_string())),
        }],
    }
}

async fn value(store: &dyn Store, id: ConnectionId, stream: &str) -> Option<String> {
    let state = store.read(id).await.expect("read");
    let key = EntryKey::stream(StreamDescriptor { name: stream.to_owned(), namespace: None });
    state.entries.iter().find(|(k, _)| *k == key).map(|(_, blob)| blob.as_str().to_owned())
}

/// The node holding a live lease, if any.
async fn holder(db: &tokio_postgres::Client) -> Option<String> {
    db.query_one("SELECT node FROM highwater_sole WHERE lease_until > clock_timestamp()", &[])
        .await
        .ok()
        .and_then(|row| row.get(0))
}

/// Waits until some node holds the lease, or none does.
async fn until_held(db: &tokio_postgres::Client, held: bool) -> Option<String> {
    let deadline = Instant::now() + WITHIN;
    loop {
        let now = holder(db).await;
        if now.is_some() == held {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the lease was not {} within {WITHIN:?}",
            if held { "taken" } else { "given up" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A fresh database, and a session on it for looking at the lease.
async fn database() -> (TestDatabase, tokio_postgres::Client) {
    let database = TestDatabase::postgres_always().await;
    let db = support::connect(&database.url_text()).await;
    (database, db)
}

async fn open(database: &TestDatabase, sole_node: bool) -> std::sync::Arc<dyn Store> {
    let options = OpenOptions { sole_node, ..OpenOptions::default() };
    store::open(&database.url, &options).await.expect("open the store")
}

/// A node that holds the lease, and a connection it wrote and read.
async fn holder_of_one_connection(
    database: &TestDatabase,
    db: &tokio_postgres::Client,
) -> (std::sync::Arc<dyn Store>, ConnectionId) {
    let id = ConnectionId::random();
    let a = open(database, true).await;
    a.write(id, set("s", 1)).await.unwrap();
    until_held(db, true).await;
    assert_eq!(value(&*a, id, "s").await.as_deref(), Some("1"));
    (a, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn a_node_alone_answers_from_memory_and_every_read_still_sees_the_other_nodes_writes() {
    let (database, db) = database().await;
    let (id, other) = (ConnectionId::random(), ConnectionId::random());

    let a = open(&database, true).await;
    a.write(id, set("s", 1)).await.unwrap();
    until_held(&db, true).await;
    // The holder empties its cache and trusts it just after the lease commits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(value(&*a, id, "s").await.as_deref(), Some("1"));
    // From memory: a change made with the tables' triggers off (as a
    // restore with `session_replication_role = replica` would) is not seen
    // while the lease is held.
    let revision = |to: i64| format!("UPDATE connections SET revision = {to} WHERE connection_id = '{id}'");
    let quiet = support::connect(&database.url_text()).await;
    quiet.batch_execute(&format!("SET session_replication_role = replica; {}", revision(99))).await.unwrap();
    assert_eq!(a.read(id).await.unwrap().revision, 1, "a read of the lease holder asked the database");
    quiet.batch_execute(&revision(1)).await.unwrap();
    drop(quiet);

    // Any other write to the tables (psql, a node of an older version) makes
    // the holder give the lease up first, and is then seen; its session
    // counts as a node while it lasts.
    let outsider = support::connect(&database.url_text()).await;
    outsider.batch_execute(&revision(99)).await.unwrap();
    assert_eq!(holder(&db).await, None, "a lease is held while another session writes");
    assert_eq!(a.read(id).await.unwrap().revision, 99, "A answered from memory after another session wrote");
    outsider.batch_execute(&revision(1)).await.unwrap();
    drop(outsider);
    until_held(&db, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.read(id).await.unwrap().revision, 1);

    // A second node starts: A gives the lease up, and B's write, which
    // waits until then, is seen by A's next read.
    let b = open(&database, true).await;
    let started = Instant::now();
    b.write(id, set("s", 2)).await.unwrap();
    assert!(started.elapsed() < WITHIN);
    assert_eq!(holder(&db).await, None, "a lease is held with two nodes running");
    assert_eq!(value(&*a, id, "s").await.as_deref(), Some("2"), "A answered from memory after B wrote");
    a.write(other, set("t", 1)).await.unwrap();
    assert_eq!(value(&*b, other, "t").await.as_deref(), Some("1"));

    // B writes again and stops; A, alone again, takes the lease with an
    // emptied cache: it sees what B wrote last.
    b.write(id, set("s", 3)).await.unwrap();
    b.write(other, set("t", 2)).await.unwrap();
    drop(b);
    until_held(&db, true).await;
    assert_eq!(value(&*a, id, "s").await.as_deref(), Some("3"));
    assert_eq!(value(&*a, other, "t").await.as_deref(), Some("2"));
    // Its own writes keep its cache current.
    a.write(id, set("s", 4)).await.unwrap();
    assert_eq!(value(&*a, id, "s").await.as_deref(), Some("4"));
    assert_eq!(a.read(id).await.unwrap().revision, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn a_holder_cut_off_stops_answering_from_memory_before_another_node_can_write() {
    let (database, db) = database().await;
    let (a, id) = holder_of_one_connection(&database, &db).await;

    // A's lease session is cut: its lease stays live in the database until
    // it runs out. A node that never takes the lease writes meanwhile: its
    // write waits for the lease to end, and A's next read asks the database.
    let cut = db
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = 1213661184 AND objid = 2 AND mode = 'ExclusiveLock' AND granted \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(cut.len(), 1, "no session held the members' key exclusively");
    let b = open(&database, false).await;
    b.write(id, set("s", 2)).await.unwrap();
    assert_eq!(value(&*a, id, "s").await.as_deref(), Some("2"), "A answered from memory after B wrote");
}

#[tokio::test]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn a_write_waits_while_another_node_holds_a_live_lease() {
    let (database, db) = database().await;
    let store = open(&database, false).await;
    let id = ConnectionId::random();
    store.write(id, set("s", 1)).await.unwrap();
    db.execute(
        "UPDATE highwater_sole SET node = 'elsewhere', lease_until = clock_timestamp() + interval '1 second'",
        &[],
    )
    .await
    .unwrap();
    let started = Instant::now();
    store.write(id, set("s", 2)).await.unwrap();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(700), "the write went ahead of a live lease after {waited:?}");
    assert!(waited < WITHIN);
    assert_eq!(value(&*store, id, "s").await.as_deref(), Some("2"));
}

#[tokio::test]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn a_node_that_stops_cleanly_gives_the_lease_up_at_once() {
    let (database, db) = database().await;
    let a = open(&database, true).await;
    until_held(&db, true).await;
    a.close().await;
    assert_eq!(holder(&db).await, None, "the lease outlived a clean stop");
    // So the next node's writes do not wait for it to run out.
    let b = open(&database, false).await;
    let started = Instant::now();
    b.write(ConnectionId::random(), set("s", 1)).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(700), "a write waited {:?}", started.elapsed());
}

/// A renewal that ran while the lease was live but committed after it
/// ended (here every commit touching the lease takes 1.3 s, as a slow flush
/// or a synchronous standby might): a writer that judged the lease by what
/// was committed may have written in between, so the holder must not go on
/// answering from memory. B is such a writer: a Highwater write from a
/// session that has not joined the nodes (a node starting, or whose lease
/// session is reconnecting). Every read through A must show every revision
/// B committed before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn a_renewal_committed_after_the_lease_ended_is_not_trusted() {
    let (database, db) = database().await;
    let (a, id) = holder_of_one_connection(&database, &db).await;
    db.batch_execute(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(1.3); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON highwater_sole DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION slow_commit();",
    )
    .await
    .unwrap();
    let mut b = support::connect(&database.url_text()).await;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut writes = 0;
    while Instant::now() < deadline {
        let tx = b.transaction().await.unwrap();
        tx.execute("SELECT highwater_lock('{}', 'B')", &[]).await.unwrap();
        let committed: i64 = tx
            .query_one(
                "UPDATE connections SET revision = revision + 1 WHERE connection_id = $1 RETURNING revision",
                &[&id.to_string()],
            )
            .await
            .unwrap()
            .get(0);
        tx.commit().await.unwrap();
        writes += 1;
        // B got in when the lease ended, 0.6 s before the renewal running
        // then committed (renewals follow each other every 1.3 s now), and
        // A's trust had run out 0.2 s before the lease. A read before that
        // renewal's answer would ask the database and so bring A's cache up
        // to date; one 0.8 s after B's commit comes once A has the answer.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let answered = a.read(id).await.unwrap().revision;
        assert!(
            answered as i64 >= committed,
            "A answered revision {answered} after B committed {committed} (B's write {writes})"
        );
    }
    assert!(writes > 1, "B wrote {writes} times");
}
