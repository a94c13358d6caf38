//! PostgreSQL's storage layout: a database written in an older layout
//! reads the same after a newer Highwater migrates it, and a write still
//! stores its entry when the row changed behind a node's cache. Runs on PostgreSQL whatever
//! `HIGHWATER_TEST_BACKEND` says; `.ci/run` includes it.

mod support;

use highwater::state::ops::Refusal;
use highwater::state::{Blob, ConnectionId, EntryKey, StateType, StateWrite, StoredState, StreamDescriptor};
use highwater::store::dump::ConnectionDump;
use highwater::store::StoreError;
use support::TestDatabase;

/// The migrations before schema 4, as a Highwater of schema 3 applied them.
const SCHEMA_3: [&str; 3] = [
    include_str!("../migrations/postgres/0001_init.sql"),
    include_str!("../migrations/postgres/0002_fewer_write_indexes.sql"),
    include_str!("../migrations/postgres/0003_expect.sql"),
];

fn key(name: &str) -> EntryKey {
    EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: None })
}

fn entries(state: &StoredState) -> Vec<(String, String)> {
    state.entries.iter().map(|(k, b)| (k.encode(), b.as_str().to_owned())).collect()
}

fn pair(name: &str, blob: &str) -> (String, String) {
    (key(name).encode(), blob.to_owned())
}

#[tokio::test]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn schema_3_reads_the_same_after_the_upgrade_to_revision_metadata_on_changes() {
    let database = TestDatabase::postgres_always().await;
    let db = support::connect(&database.url_text()).await;
    db.batch_execute(
        "CREATE TABLE highwater_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .unwrap();
    for (index, sql) in SCHEMA_3.iter().enumerate() {
        db.batch_execute(sql).await.unwrap();
        db.execute("INSERT INTO highwater_migrations (version) VALUES ($1)", &[&(index as i32 + 1)]).await.unwrap();
    }

    // Connection `kept`: revision 1 pruned, but its change of "a" still
    // holds a's current blob; revisions 2 and 3 kept, 3 with two changes.
    // Connection `bare`: imported with one revision that has no change.
    let (kept, bare) = (ConnectionId::random(), ConnectionId::random());
    let (kept_text, bare_text) = (kept.to_string(), bare.to_string());
    let (a, b, c) = (key("a").encode(), key("b").encode(), key("c").encode());
    db.execute(
        "INSERT INTO connections (connection_id, state_type, revision, next_seq) VALUES ($1, 'stream', 3, 3), ($2, NULL, 1, 0)",
        &[&kept_text, &bare_text],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO revisions (connection_id, revision, created_at_ms, state_type, actor, reason) VALUES \
         ($1, 2, 2000, 'stream', 'actor-2', 'reason-2'), ($1, 3, 3000, 'stream', NULL, NULL), \
         ($2, 1, 4000, NULL, 'importer', NULL)",
        &[&kept_text, &bare_text],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO changes (connection_id, revision, entry_key, blob, seq) VALUES \
         ($1, 1, $2, '{\"a\":1}', 0), ($1, 2, $3, '{\"b\":2}', 1), \
         ($1, 3, $3, '{\"b\":3}', 1), ($1, 3, $4, '{\"c\":3}', 2)",
        &[&kept_text, &a, &b, &c],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO entries (connection_id, entry_key, seq, revision) VALUES ($1, $2, 0, 1), ($1, $3, 1, 3), ($1, $4, 2, 3)",
        &[&kept_text, &a, &b, &c],
    )
    .await
    .unwrap();

    let store = database.open().await;

    let current = store.read(kept).await.unwrap();
    assert_eq!(current.revision, 3);
    assert_eq!(entries(&current), [pair("a", r#"{"a":1}"#), pair("b", r#"{"b":3}"#), pair("c", r#"{"c":3}"#)]);
    let at_2 = store.read_at(kept, Some(2)).await.unwrap();
    assert_eq!(entries(&at_2), [pair("a", r#"{"a":1}"#), pair("b", r#"{"b":2}"#)]);
    let pruned = store.read_at(kept, Some(1)).await;
    assert!(matches!(pruned, Err(StoreError::Refused(Refusal::RevisionPruned { .. }))), "{pruned:?}");

    let history = store.history(kept, 10, None).await.unwrap();
    assert_eq!(history.oldest, Some(2));
    let listed: Vec<_> = history
        .revisions
        .iter()
        .map(|r| (r.revision, r.created_at_ms, r.actor.as_deref(), r.reason.as_deref(), r.changes.len()))
        .collect();
    assert_eq!(listed, [(3, 3000, None, None, 2), (2, 2000, Some("actor-2"), Some("reason-2"), 1)]);

    let empty = store.read(bare).await.unwrap();
    assert_eq!((empty.revision, empty.entries.len()), (1, 0));
    let history = store.history(bare, 10, None).await.unwrap();
    let listed: Vec<_> = history.revisions.iter().map(|r| (r.revision, r.actor.as_deref())).collect();
    assert_eq!(listed, [(1, Some("importer"))]);

    // Each revision is one dated row: on its first change, or under ''.
    let dated: Vec<(String, i64, String)> = db
        .query(
            "SELECT connection_id, revision, entry_key FROM history WHERE created_at_ms IS NOT NULL ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let mut expected =
        vec![(kept_text.clone(), 2, b.clone()), (kept_text.clone(), 3, b.clone()), (bare_text, 1, String::new())];
    expected.sort();
    assert_eq!(dated, expected);

    // A write after the upgrade, and the record still exports and imports.
    let write = StateWrite {
        state_type: StateType::Stream,
        ops: vec![highwater::state::EntryOp { key: key("a"), blob: Some(Blob::from_json(r#"{"a":4}"#)) }],
    };
    assert_eq!(store.write(kept, write).await.unwrap().revision, 4);
    let history = store.history(kept, 1, None).await.unwrap();
    assert_eq!(history.revisions[0].revision, 4);
    let dump = store.dump(kept).await.unwrap().unwrap();
    let line = dump.to_line().unwrap();
    let mut copy = ConnectionDump::from_line(&line).unwrap();
    let other = ConnectionId::random();
    copy.id = other;
    store.load(copy, false).await.unwrap();
    assert_eq!(entries(&store.read(other).await.unwrap()), entries(&store.read(kept).await.unwrap()));
    assert_eq!(store.history(other, 10, None).await.unwrap().revisions.len(), 3);
}

#[tokio::test]
#[ignore = "needs PostgreSQL; .ci/run runs it with --include-ignored"]
async fn an_entry_gone_behind_the_cache_is_written_again_not_lost() {
    let database = TestDatabase::postgres_always().await;
    let db = support::connect(&database.url_text()).await;
    let store = database.open().await;
    let id = ConnectionId::random();
    let set = |blob: &str| StateWrite {
        state_type: StateType::Stream,
        ops: vec![highwater::state::EntryOp { key: key("a"), blob: Some(Blob::from_json(blob)) }],
    };
    store.write(id, set("1")).await.unwrap();
    // The cache still holds the entry; its row is gone and the
    // connection's row unchanged, which the batch's check of the
    // connection cannot see: the write must still leave the entry stored.
    db.execute("DELETE FROM entries WHERE connection_id = $1", &[&id.to_string()]).await.unwrap();

    assert_eq!(store.write(id, set("2")).await.unwrap().revision, 2);
    let fresh = database.open().await;
    assert_eq!(entries(&fresh.read(id).await.unwrap()), [pair("a", "2")]);
}
