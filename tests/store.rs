//! The store contract: what every backend must do, through the `Store`
//! trait alone, on the backend `HIGHWATER_TEST_BACKEND` names.

mod support;

use std::sync::Arc;

use highwater::state::ops::Refusal;
use highwater::state::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor};
use highwater::store::{Store, StoreError};
use support::TestDatabase;

struct Backend {
    store: Arc<dyn Store>,
    _database: TestDatabase,
}

async fn backend() -> Backend {
    let database = TestDatabase::new().await;
    Backend { store: database.open().await, _database: database }
}

fn stream(name: &str, blob: Option<&str>) -> EntryOp {
    EntryOp {
        key: EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: None }),
        blob: blob.map(Blob::from_json),
    }
}

fn write(state_type: StateType, ops: Vec<EntryOp>) -> StateWrite {
    StateWrite { state_type, ops }
}

#[tokio::test]
async fn revisions_count_changing_writes_without_gaps() {
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    assert_eq!(store.read(id).await.unwrap().revision, 0);

    let first = store.write(id, write(StateType::Stream, vec![stream("a", Some("1"))])).await.unwrap();
    assert_eq!(first.revision, 1);
    // The same blob again changes nothing and takes no revision.
    let same = store.write(id, write(StateType::Stream, vec![stream("a", Some("1"))])).await.unwrap();
    assert_eq!(same.revision, 1);
    // A refused write takes no revision either.
    let refused = store.write(id, write(StateType::Legacy, vec![])).await;
    assert!(matches!(refused, Err(StoreError::Refused(Refusal::TypeConflict(_)))));
    // Deleting an absent stream is no change.
    let absent = store.write(id, write(StateType::Stream, vec![stream("zz", None)])).await.unwrap();
    assert_eq!(absent.revision, 1);
    let second =
        store.write(id, write(StateType::Stream, vec![stream("a", None), stream("b", Some("2"))])).await.unwrap();
    assert_eq!(second.revision, 2);
    assert_eq!(second.entries.len(), 1);
    assert_eq!(store.read(id).await.unwrap(), second);
}

/// A state of more entries than SQLite's writer looks up in the cache (256)
/// is written like a small one: PostgreSQL's batches look its entries up in
/// the cache and go in one round trip, SQLite's writer reads them.
#[tokio::test]
async fn a_large_cached_state_is_written_like_a_small_one() {
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    let names = |state: &highwater::state::StoredState| -> Vec<(String, String)> {
        state
            .entries
            .iter()
            .map(|(key, blob)| match key {
                EntryKey::Stream(descriptor) => (descriptor.name.clone(), blob.as_str().to_owned()),
                other => panic!("not a stream: {other:?}"),
            })
            .collect()
    };
    let mut expected: Vec<(String, String)> = (0..300).map(|i| (format!("s{i:03}"), i.to_string())).collect();
    let all = expected.iter().map(|(name, blob)| stream(name, Some(blob))).collect();
    store.write(id, write(StateType::Stream, all)).await.unwrap();
    assert_eq!(names(&store.read(id).await.unwrap()), expected);

    // One stream set again, one deleted, one added, and one unchanged:
    // each answered with the whole state, as a later read gives it.
    let steps: [(Vec<EntryOp>, u64); 4] = [
        (vec![stream("s150", Some("\"x\""))], 2),
        (vec![stream("s010", None)], 3),
        (vec![stream("new", Some("{\"a\":1}")), stream("s299", Some("299"))], 4),
        (vec![stream("s000", Some("0"))], 4),
    ];
    for (ops, revision) in steps {
        for op in &ops {
            let EntryKey::Stream(descriptor) = &op.key else { unreachable!() };
            let at = expected.iter().position(|(name, _)| *name == descriptor.name);
            match (at, &op.blob) {
                (Some(at), Some(blob)) => expected[at].1 = blob.as_str().to_owned(),
                (Some(at), None) => drop(expected.remove(at)),
                (None, Some(blob)) => expected.push((descriptor.name.clone(), blob.as_str().to_owned())),
                (None, None) => {}
            }
        }
        let written = store.write(id, write(StateType::Stream, ops)).await.unwrap();
        assert_eq!(written.revision, revision);
        assert_eq!(names(&written), expected);
        assert_eq!(store.read(id).await.unwrap(), written);
    }
}

#[tokio::test]
async fn connections_are_independent() {
    let backend = backend().await;
    let store = &backend.store;
    let (a, b) = (ConnectionId::random(), ConnectionId::random());
    store.write(a, write(StateType::Stream, vec![stream("s", Some("1"))])).await.unwrap();
    let other = store.write(b, write(StateType::Legacy, vec![])).await.unwrap();
    assert_eq!(other.revision, 0);
    assert_eq!(other.state_type, None);
    assert_eq!(store.read(a).await.unwrap().state_type, Some(StateType::Stream));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_to_one_connection_get_distinct_consecutive_revisions() {
    let backend = backend().await;
    let store = backend.store.clone();
    let id = ConnectionId::random();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let name = format!("s{i}");
                store.write(id, write(StateType::Stream, vec![stream(&name, Some("1"))])).await
            })
        })
        .collect();
    let mut revisions = Vec::new();
    for task in tasks {
        let state = task.await.unwrap().unwrap();
        // Each write adds one stream, so the state it answers with holds as
        // many streams as its revision: every earlier write's, even those
        // committed in the same group.
        assert_eq!(state.entries.len() as u64, state.revision);
        revisions.push(state.revision);
    }
    revisions.sort_unstable();
    assert_eq!(revisions, (1..=64).collect::<Vec<u64>>());
    assert_eq!(store.read(id).await.unwrap().entries.len(), 64);
}

/// Writes to many connections at once are committed together (SQLite's
/// group commit, PostgreSQL's batches), but each is still checked on its
/// own: a refused or unchanging write does not affect the others.
#[tokio::test]
async fn writes_committed_together_are_each_checked_on_their_own() {
    use highwater::state::ops::{Guard, Meta, Operation, WriteRequest};
    let backend = backend().await;
    let store = backend.store.clone();
    let ids: Vec<ConnectionId> = (0..48).map(|_| ConnectionId::random()).collect();
    for id in &ids {
        store.write(*id, write(StateType::Stream, vec![stream("a", Some("1"))])).await.unwrap();
    }
    // i % 3: 0 expects the right revision, 1 a wrong one, 2 writes what is there.
    let tasks: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (store, id) = (store.clone(), *id);
            tokio::spawn(async move {
                let value = if i % 3 == 2 { "1".to_owned() } else { format!("{}", i + 2) };
                let request = WriteRequest {
                    operation: Operation::Merge(write(StateType::Stream, vec![stream("a", Some(&value))])),
                    guard: Guard { expected_revision: Some(if i % 3 == 1 { 7 } else { 1 }), ..Guard::default() },
                    meta: Meta::default(),
                    return_state: i % 2 == 0,
                };
                store.apply(id, request).await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        let state = store.read(ids[i]).await.unwrap();
        match i % 3 {
            0 => {
                let applied = outcome.unwrap();
                assert_eq!((applied.revision, applied.changed), (2, true), "write {i}");
                assert_eq!(state.revision, 2);
                assert_eq!(state.entries[0].1.as_str(), (i + 2).to_string());
                if let Some(returned) = applied.state {
                    assert_eq!(*returned, *state);
                }
            }
            1 => {
                let refused = outcome.unwrap_err();
                assert!(
                    matches!(refused, StoreError::Refused(Refusal::RevisionMismatch { expected: 7, current: 1 })),
                    "write {i}: {refused:?}"
                );
                assert_eq!((state.revision, state.entries[0].1.as_str()), (1, "1"));
            }
            _ => {
                let applied = outcome.unwrap();
                assert_eq!((applied.revision, applied.changed), (1, false), "write {i}");
                assert_eq!(state.revision, 1);
            }
        }
    }
}

#[tokio::test]
async fn ping_answers_when_the_store_is_open() {
    let backend = backend().await;
    backend.store.ping().await.unwrap();
}

/// Twenty changing writes to `id` in which streams come and go, so that
/// old change rows matter for the revisions a prune keeps; each state as
/// written.
async fn twenty_revisions(store: &dyn Store, id: ConnectionId) -> Vec<Arc<highwater::state::StoredState>> {
    let mut seen = Vec::new();
    for i in 0..20 {
        let ops = match i % 3 {
            0 => vec![stream(&format!("s{}", i % 4), Some(&i.to_string())), stream("keep", Some("1"))],
            1 => vec![stream(&format!("s{}", (i + 1) % 4), None)],
            _ => vec![stream(&format!("s{}", i % 4), Some("[1]"))],
        };
        seen.push(store.write(id, write(StateType::Stream, ops)).await.unwrap());
    }
    seen
}

/// Every state in `seen` from revision `from` on reads back, at its
/// revision, as it was written.
async fn assert_reads_as_written(
    store: &dyn Store,
    id: ConnectionId,
    seen: &[Arc<highwater::state::StoredState>],
    from: u64,
) {
    for state in seen.iter().filter(|s| s.revision >= from) {
        assert_eq!(&store.read_at(id, Some(state.revision)).await.unwrap(), state);
    }
}

#[tokio::test]
async fn pruning_keeps_every_kept_revision_readable_and_refuses_older_ones() {
    use highwater::state::history::Retention;
    use highwater::state::ops::{Guard, Meta, Operation, WriteRequest};
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    let seen = twenty_revisions(store.as_ref(), id).await;
    let current = seen.last().unwrap().revision;
    let removed = store.prune(Retention { keep_revisions: Some(5), keep_for: None }).await.unwrap();
    assert!(removed > 0);
    let history = store.history(id, 100, None).await.unwrap();
    assert_eq!(history.oldest, Some(current - 4));
    assert_reads_as_written(store.as_ref(), id, &seen, current - 4).await;
    let pruned = store.read_at(id, Some(current - 5)).await;
    assert!(matches!(pruned, Err(StoreError::Refused(Refusal::RevisionPruned { .. }))), "{pruned:?}");
    // A kept revision can still be restored, and the record still exports.
    let restore = WriteRequest {
        operation: Operation::Restore { revision: current - 4 },
        guard: Guard::default(),
        meta: Meta::default(),
        return_state: true,
    };
    let restored = store.apply(id, restore).await.unwrap().state.unwrap();
    let target = seen.iter().find(|s| s.revision == current - 4).unwrap();
    assert_eq!(restored.entries, target.entries);
    let dump = store.dump(id).await.unwrap().unwrap();
    highwater::store::dump::ConnectionDump::from_line(&dump.to_line().unwrap()).unwrap();
}

#[tokio::test]
async fn pruning_goes_in_bounded_steps_each_leaving_a_readable_history() {
    use highwater::state::history::{Pruned, Retention};
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    let seen = twenty_revisions(store.as_ref(), id).await;
    let current = seen.last().unwrap().revision;
    let policy = Retention { keep_revisions: Some(5), keep_for: None };
    let mut steps = Vec::new();
    loop {
        let step = store.prune_connection(id, policy, 4).await.unwrap();
        steps.push(step);
        // Whatever a step leaves is a history every revision of which reads
        // as it was written.
        let oldest = store.history(id, 100, None).await.unwrap().oldest.unwrap();
        assert_reads_as_written(store.as_ref(), id, &seen, oldest).await;
        if !step.more {
            break;
        }
    }
    // current - 5 revisions go: 4, 4, 4 and the last 3.
    let removed: Vec<u64> = steps.iter().map(|step| step.removed).collect();
    assert_eq!(removed, [4, 4, 4, current - 5 - 12]);
    assert_eq!(store.history(id, 100, None).await.unwrap().oldest, Some(current - 4));
    assert_eq!(store.prune_connection(id, policy, 4).await.unwrap(), Pruned { removed: 0, more: false });
}

#[tokio::test]
async fn a_connection_within_its_limits_is_passed_over_and_pruned_again_once_past_them() {
    use highwater::state::history::{Pruned, Retention};
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    let policy = Retention { keep_revisions: Some(5), keep_for: None };
    let mut seen = twenty_revisions(store.as_ref(), id).await;
    store.prune(policy).await.unwrap();
    let before = store.dump(id).await.unwrap().unwrap().to_line().unwrap();
    // Within its limits: nothing removed, the record exactly as it was.
    assert_eq!(store.prune_connection(id, policy, 4).await.unwrap(), Pruned { removed: 0, more: false });
    assert_eq!(store.dump(id).await.unwrap().unwrap().to_line().unwrap(), before);
    // Past them again, by twenty revisions: those twenty go, and every
    // revision kept still reads as it was written.
    seen.extend(twenty_revisions(store.as_ref(), id).await);
    let current = seen.last().unwrap().revision;
    assert_eq!(store.prune(policy).await.unwrap(), 20);
    assert_eq!(store.history(id, 100, None).await.unwrap().oldest, Some(current - 4));
    assert_reads_as_written(store.as_ref(), id, &seen, current - 4).await;
}

#[tokio::test]
async fn the_connections_due_for_pruning_include_every_one_past_its_limits() {
    use highwater::state::history::{Retention, PRUNE_STEP};
    let backend = backend().await;
    let store = &backend.store;
    let (past, within, never) = (ConnectionId::random(), ConnectionId::random(), ConnectionId::random());
    let policy = Retention { keep_revisions: Some(5), keep_for: None };
    twenty_revisions(store.as_ref(), past).await;
    for i in 0..3 {
        store.write(within, write(StateType::Stream, vec![stream("a", Some(&i.to_string()))])).await.unwrap();
    }
    let mut ids = vec![past, within, never];
    ids.sort_unstable();
    let due = store.due_for_pruning(&ids, policy, PRUNE_STEP).await.unwrap();
    assert!(due.contains(&past), "{due:?}");
    // PostgreSQL tells in one query; SQLite passes them all on to
    // prune_connection, which passes over those within their limits.
    if support::backend() == "postgres" {
        assert_eq!(due, vec![past]);
    }
    assert!(store.prune(policy).await.unwrap() > 0);
    let after = store.due_for_pruning(&ids, policy, PRUNE_STEP).await.unwrap();
    if support::backend() == "postgres" {
        assert!(after.is_empty(), "{after:?}");
    }
}

#[tokio::test]
async fn writes_that_do_not_return_the_state_build_on_each_other_and_read_as_recorded() {
    use highwater::state::ops::{Guard, Meta, Operation, WriteRequest};
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    let set = |i: usize| WriteRequest {
        operation: Operation::Merge(write(
            StateType::Stream,
            vec![stream(&format!("s{}", i % 4), Some(&i.to_string()))],
        )),
        guard: Guard::default(),
        meta: Meta::default(),
        return_state: false,
    };
    let mut written = 0;
    for round in 0..8 {
        // The first write finds the connection not cached: on PostgreSQL
        // it is then read into the cache in the background, and the next
        // writes build on that. Later rounds find it cached by the read
        // that ends the round before.
        for i in 0..3 {
            written += 1;
            let applied = store.apply(id, set(round * 3 + i)).await.unwrap();
            assert_eq!(applied.revision, written);
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let current = store.read(id).await.unwrap();
        let recorded = store.read_at(id, Some(written)).await.unwrap();
        assert_eq!(current, recorded, "round {round}");
        assert_eq!(current.entries.len(), (round * 3 + 3).min(4));
    }
}

#[tokio::test]
async fn pruning_by_age_keeps_the_current_revision() {
    use highwater::state::history::Retention;
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    for i in 0..3 {
        store.write(id, write(StateType::Stream, vec![stream("a", Some(&i.to_string()))])).await.unwrap();
    }
    // Revisions made in the prune's own millisecond are not older than
    // zero: without the pause the release build sometimes kept them all.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let policy = Retention { keep_revisions: None, keep_for: Some(std::time::Duration::ZERO) };
    store.prune(policy).await.unwrap();
    let history = store.history(id, 10, None).await.unwrap();
    assert_eq!(history.oldest, Some(3));
    assert_eq!(store.read(id).await.unwrap().entries.len(), 1);
}

#[tokio::test]
async fn an_import_over_a_cached_connection_is_seen_by_the_next_read() {
    let backend = backend().await;
    let store = &backend.store;
    let (id, other) = (ConnectionId::random(), ConnectionId::random());
    // Two connections at the same revision with different content.
    store.write(id, write(StateType::Stream, vec![stream("mine", Some("1"))])).await.unwrap();
    store.write(other, write(StateType::Stream, vec![stream("theirs", Some("2"))])).await.unwrap();
    let cached = store.read(id).await.unwrap();
    let mut dump = store.dump(other).await.unwrap().unwrap();
    dump.id = id;
    let line = dump.to_line().unwrap();
    let replacement = highwater::store::dump::ConnectionDump::from_line(&line).unwrap();
    store.load(replacement, true).await.unwrap();
    let after = store.read(id).await.unwrap();
    assert_eq!(after.revision, cached.revision);
    assert_ne!(after.entries, cached.entries, "the read served the replaced state from the cache");
    // A write after the import builds on the imported state.
    let next = store.write(id, write(StateType::Stream, vec![stream("more", Some("3"))])).await.unwrap();
    assert_eq!(next.entries.len(), 2);
}

#[tokio::test]
async fn large_blobs_round_trip_through_every_read() {
    let backend = backend().await;
    let store = &backend.store;
    let id = ConnectionId::random();
    // Over a MiB (SQLite writes such blobs in place), with multi-byte text.
    let big = format!(r#"{{"note":"{}","tail":"é€😀"}}"#, "x€".repeat(800_000));
    let small = r#"{"cursor":1}"#;
    let first =
        store.write(id, write(StateType::Stream, vec![stream("big", Some(&big)), stream("small", Some(small))])).await;
    assert_eq!(first.unwrap().revision, 1);
    // The same blob again is no change: the stored one compares equal.
    let again = store.write(id, write(StateType::Stream, vec![stream("big", Some(&big))])).await.unwrap();
    assert_eq!(again.revision, 1);
    store.write(id, write(StateType::Stream, vec![stream("small", Some(r#"{"cursor":2}"#))])).await.unwrap();
    let descriptor = StreamDescriptor { name: "big".to_owned(), namespace: None };
    let (_, one) = store.read_stream(id, descriptor).await.unwrap();
    assert_eq!(one.unwrap().as_str(), big);
    // A past revision is read from the rows, not from any cache.
    let past = store.read_at(id, Some(1)).await.unwrap();
    assert_eq!(past.entries[0].1.as_str(), big);
    let dump = store.dump(id).await.unwrap().unwrap();
    assert!(dump.changes.iter().any(|c| c.blob.as_ref().is_some_and(|b| b.as_str() == big)));
    // Imported under another id, it reads back the same.
    let copy = ConnectionId::random();
    let mut moved = dump;
    moved.id = copy;
    store.load(moved, false).await.unwrap();
    assert_eq!(store.read_at(copy, Some(1)).await.unwrap().entries[0].1.as_str(), big);
}
