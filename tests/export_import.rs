//! `highwater export` / `highwater import`: byte-for-byte round trips
//! between backends, and the refusal to overwrite.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use highwater::state::wire::render_state;
use highwater::state::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor};
use highwater::store::{self, DatabaseUrl, Store};
use support::TestDatabase;

fn highwater(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args(args)
        .env("HIGHWATER_LOG_LEVEL", "warn")
        .output()
        .expect("run highwater")
}

fn succeed(args: &[&str]) {
    let output = highwater(args);
    assert!(output.status.success(), "highwater {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn op(key: EntryKey, blob: Option<&str>) -> EntryOp {
    EntryOp { key, blob: blob.map(Blob::from_json) }
}

fn stream(name: &str, namespace: Option<&str>) -> EntryKey {
    EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: namespace.map(str::to_owned) })
}

/// Writes states of every kind, with history, deletions, re-additions and
/// blobs that only survive if nothing re-encodes them.
async fn populate(store: &dyn Store) -> Vec<ConnectionId> {
    let ids: Vec<ConnectionId> = (0..5).map(|_| ConnectionId::random()).collect();
    let write = |t, ops| StateWrite { state_type: t, ops };
    let fancy = r#"{"z":1e3,"a":1.50,"a":123456789012345678901234567890,"s":"caf\u00e9 \"q\" \/"}"#;
    store.write(ids[0], write(StateType::Legacy, vec![op(EntryKey::Legacy, Some(fancy))])).await.unwrap();
    store.write(ids[0], write(StateType::Legacy, vec![op(EntryKey::Legacy, Some("null"))])).await.unwrap();
    let streams = vec![op(stream("b", Some("ns")), Some("1")), op(stream("a", None), Some(fancy))];
    store.write(ids[1], write(StateType::Stream, streams)).await.unwrap();
    store.write(ids[1], write(StateType::Stream, vec![op(stream("b", Some("ns")), None)])).await.unwrap();
    store.write(ids[1], write(StateType::Stream, vec![op(stream("b", Some("ns")), Some("[2]"))])).await.unwrap();
    let global = vec![op(EntryKey::Shared, Some(r#"{"lsn":42}"#)), op(stream("t", Some("")), Some("{}"))];
    store.write(ids[2], write(StateType::Global, global)).await.unwrap();
    // A connection emptied back to not_set keeps its history.
    store.write(ids[3], write(StateType::Stream, vec![op(stream("x", None), Some("1"))])).await.unwrap();
    store.write(ids[3], write(StateType::Stream, vec![op(stream("x", None), None)])).await.unwrap();
    // Legacy replaced by stream.
    store.write(ids[4], write(StateType::Legacy, vec![op(EntryKey::Legacy, Some("{}"))])).await.unwrap();
    store.write(ids[4], write(StateType::Stream, vec![op(stream("y", None), Some("true"))])).await.unwrap();
    ids
}

async fn rendered(store: &dyn Store, ids: &[ConnectionId]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for &id in ids {
        let state = store.read(id).await.unwrap();
        out.push((state.revision, render_state(id, &state)));
    }
    out
}

fn url_text(url: &DatabaseUrl) -> String {
    match url {
        DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
        DatabaseUrl::Postgres(url) => url.clone(),
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read export")
}

#[tokio::test]
async fn an_export_imported_into_a_new_sqlite_file_reproduces_every_state_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let source = store::open(&DatabaseUrl::Sqlite(a.clone()), &Default::default()).await.unwrap();
    let ids = populate(source.as_ref()).await;
    let expected = rendered(source.as_ref(), &ids).await;
    drop(source);
    let (first, second) = (dir.path().join("1.ndjson"), dir.path().join("2.ndjson"));
    let (a, b) = (format!("sqlite://{}", a.display()), format!("sqlite://{}", b.display()));
    succeed(&["export", "--database-url", &a, "--output", first.to_str().unwrap()]);
    succeed(&["import", "--database-url", &b, "--input", first.to_str().unwrap()]);
    succeed(&["export", "--database-url", &b, "--output", second.to_str().unwrap()]);
    assert_eq!(read(&first), read(&second));
    assert_eq!(String::from_utf8(read(&first)).unwrap().lines().count(), ids.len());
    let copy = store::open(&b.parse().unwrap(), &Default::default()).await.unwrap();
    assert_eq!(rendered(copy.as_ref(), &ids).await, expected);
}

#[tokio::test]
async fn import_refuses_existing_connections_unless_told_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.db");
    let url = format!("sqlite://{}", path.display());
    let store = store::open(&DatabaseUrl::Sqlite(path.clone()), &Default::default()).await.unwrap();
    let ids = populate(store.as_ref()).await;
    drop(store);
    let export = dir.path().join("a.ndjson");
    succeed(&["export", "--database-url", &url, "--output", export.to_str().unwrap()]);
    // Change one connection after the export.
    let store = store::open(&DatabaseUrl::Sqlite(path.clone()), &Default::default()).await.unwrap();
    let later = StateWrite { state_type: StateType::Legacy, ops: vec![op(EntryKey::Legacy, Some("7"))] };
    let changed = store.write(ids[0], later).await.unwrap();
    drop(store);

    let refused = highwater(&["import", "--database-url", &url, "--input", export.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--overwrite"));
    let store = store::open(&DatabaseUrl::Sqlite(path.clone()), &Default::default()).await.unwrap();
    assert_eq!(store.read(ids[0]).await.unwrap(), changed);
    drop(store);

    succeed(&["import", "--overwrite", "--database-url", &url, "--input", export.to_str().unwrap()]);
    let store = store::open(&DatabaseUrl::Sqlite(path), &Default::default()).await.unwrap();
    assert_eq!(store.read(ids[0]).await.unwrap().revision, changed.revision - 1);
}

#[tokio::test]
#[ignore = "needs PostgreSQL: run with HIGHWATER_TEST_BACKEND=postgres and --include-ignored (as .ci/run does)"]
async fn sqlite_to_postgres_to_sqlite_reproduces_every_state_byte_for_byte() {
    assert_eq!(support::backend(), "postgres", "run this with HIGHWATER_TEST_BACKEND=postgres");
    let dir = tempfile::tempdir().unwrap();
    let a = DatabaseUrl::Sqlite(dir.path().join("a.db"));
    let source = store::open(&a, &Default::default()).await.unwrap();
    let ids = populate(source.as_ref()).await;
    let expected = rendered(source.as_ref(), &ids).await;
    drop(source);
    let postgres = TestDatabase::new().await;
    let c = DatabaseUrl::Sqlite(dir.path().join("c.db"));
    let files: Vec<String> = ["1", "2", "3"]
        .iter()
        .map(|n| dir.path().join(format!("{n}.ndjson")))
        .map(|p| p.display().to_string())
        .collect();
    let (a, pg, c) = (url_text(&a), postgres.url_text(), url_text(&c));
    succeed(&["export", "--database-url", &a, "-o", &files[0]]);
    succeed(&["import", "--database-url", &pg, "-i", &files[0]]);
    succeed(&["export", "--database-url", &pg, "-o", &files[1]]);
    succeed(&["import", "--database-url", &c, "-i", &files[1]]);
    succeed(&["export", "--database-url", &c, "-o", &files[2]]);
    let first = read(Path::new(&files[0]));
    assert_eq!(first, read(Path::new(&files[1])), "SQLite and PostgreSQL exports differ");
    assert_eq!(first, read(Path::new(&files[2])), "the round trip changed the export");
    let on_postgres = postgres.open().await;
    assert_eq!(rendered(on_postgres.as_ref(), &ids).await, expected);
    let back = store::open(&c.parse().unwrap(), &Default::default()).await.unwrap();
    assert_eq!(rendered(back.as_ref(), &ids).await, expected);
}

#[test]
fn an_import_of_a_missing_file_creates_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("new.db");
    let url = format!("sqlite://{}", db.display());
    let missing = dir.path().join("missing.ndjson");
    let output = highwater(&["import", "--database-url", &url, "--input", missing.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot open"));
    assert!(!db.exists(), "a mistyped input created {}", db.display());
}
