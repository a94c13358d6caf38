use super::*;

fn lease(token: &str, expires_at_ms: i64) -> Lease {
    Lease { holder: "sync-1".to_owned(), token: token.to_owned(), expires_at_ms }
}

fn stream(name: &str) -> StreamDescriptor {
    StreamDescriptor { name: name.to_owned(), namespace: None }
}

#[test]
fn a_write_without_guards_passes() {
    assert_eq!(check_guard(&Guard::default(), 3, None), Ok(()));
}

#[test]
fn an_expected_revision_must_match() {
    let guard = Guard { expected_revision: Some(2), ..Guard::default() };
    assert_eq!(check_guard(&guard, 3, None), Err(Refusal::RevisionMismatch { expected: 2, current: 3 }));
    assert_eq!(check_guard(&guard, 2, None), Ok(()));
}

#[test]
fn a_live_lease_locks_safe_writes_without_its_token() {
    let guard = Guard { respect_lease: true, ..Guard::default() };
    let live = lease("t", 100);
    assert!(matches!(check_guard(&guard, 0, Some(&live)), Err(Refusal::Locked { .. })));
}

#[test]
fn a_plain_write_without_a_token_ignores_the_lease() {
    assert_eq!(check_guard(&Guard::default(), 0, Some(&lease("t", 100))), Ok(()));
}

#[test]
fn the_live_token_unlocks_and_any_other_token_is_stale() {
    let live = lease("t", 100);
    let with = |token: &str| Guard { lease_token: Some(token.to_owned()), respect_lease: true, ..Guard::default() };
    assert_eq!(check_guard(&with("t"), 0, Some(&live)), Ok(()));
    assert_eq!(check_guard(&with("old"), 0, Some(&live)), Err(Refusal::StaleLease));
    assert_eq!(check_guard(&with("t"), 0, None), Err(Refusal::StaleLease));
}

#[test]
fn acquiring_a_held_connection_is_refused_until_the_lease_expires() {
    let op = LeaseOp::Acquire { holder: "ui".to_owned(), ttl_ms: 1000 };
    let held = lease("t", 100);
    assert!(matches!(lease_transition(&op, Some(&held), 50, || "n".to_owned()), Err(Refusal::LeaseHeld { .. })));
    let taken = lease_transition(&op, Some(&held), 100, || "n".to_owned()).unwrap().unwrap();
    assert_eq!((taken.holder.as_str(), taken.token.as_str(), taken.expires_at_ms), ("ui", "n", 1100));
}

#[test]
fn renewing_needs_the_live_token() {
    let renew = LeaseOp::Renew { token: "t".to_owned(), ttl_ms: 500 };
    let renewed = lease_transition(&renew, Some(&lease("t", 100)), 50, String::new).unwrap().unwrap();
    assert_eq!(renewed.expires_at_ms, 550);
    assert_eq!(lease_transition(&renew, Some(&lease("t", 100)), 100, String::new), Err(Refusal::StaleLease));
}

#[test]
fn releasing_an_expired_own_lease_works_but_not_someone_elses() {
    let release = LeaseOp::Release { token: "t".to_owned() };
    assert_eq!(lease_transition(&release, Some(&lease("t", 10)), 50, String::new), Ok(None));
    assert_eq!(lease_transition(&release, Some(&lease("u", 100)), 50, String::new), Err(Refusal::StaleLease));
    assert_eq!(lease_transition(&release, None, 50, String::new), Err(Refusal::StaleLease));
}

#[test]
fn a_stream_set_on_a_legacy_state_is_a_type_conflict() {
    let op = Operation::StreamSet { stream: stream("a"), blob: Blob::from_json("1") };
    assert!(matches!(plan(&op, Some(StateType::Legacy), &Context::default()), Err(Refusal::TypeConflict(_))));
}

#[test]
fn a_stream_set_keeps_a_global_type_and_starts_a_stream_state() {
    let op = Operation::StreamSet { stream: stream("a"), blob: Blob::from_json("1") };
    assert_eq!(plan(&op, Some(StateType::Global), &Context::default()).unwrap().state_type, Some(StateType::Global));
    assert_eq!(plan(&op, None, &Context::default()).unwrap().state_type, Some(StateType::Stream));
}

#[test]
fn a_full_reset_deletes_every_current_key() {
    let context = Context { current_keys: vec![EntryKey::Shared, EntryKey::stream(stream("a"))], target: None };
    let op = Operation::Reset { streams: None, include_shared: false };
    let planned = plan(&op, Some(StateType::Global), &context).unwrap();
    assert_eq!(planned.ops.iter().filter(|o| o.blob.is_none()).count(), 2);
}

#[test]
fn a_stream_reset_keeps_the_shared_blob_unless_asked() {
    let op = |include_shared| Operation::Reset { streams: Some(vec![stream("a")]), include_shared };
    let keys = |p: Plan| p.ops.into_iter().map(|o| o.key).collect::<Vec<_>>();
    let kept = plan(&op(false), Some(StateType::Global), &Context::default()).unwrap();
    assert_eq!(keys(kept), [EntryKey::stream(stream("a"))]);
    let dropped = plan(&op(true), Some(StateType::Global), &Context::default()).unwrap();
    assert_eq!(keys(dropped), [EntryKey::stream(stream("a")), EntryKey::Shared]);
}

#[test]
fn a_restore_sets_the_target_entries_at_their_old_places_and_deletes_the_rest() {
    let target = vec![(EntryKey::stream(stream("a")), 4, Blob::from_json("1"))];
    let context = Context {
        current_keys: vec![EntryKey::stream(stream("b")), EntryKey::stream(stream("a"))],
        target: Some((Some(StateType::Stream), target)),
    };
    // Type rules do not block a restore: the stored type is legacy here.
    let planned = plan(&Operation::Restore { revision: 3 }, Some(StateType::Legacy), &context).unwrap();
    assert_eq!(planned.state_type, Some(StateType::Stream));
    assert_eq!(planned.pinned_seqs.get(&EntryKey::stream(stream("a")).encode()), Some(&4));
    let deleted: Vec<_> = planned.ops.iter().filter(|o| o.blob.is_none()).map(|o| o.key.clone()).collect();
    assert_eq!(deleted, [EntryKey::stream(stream("b"))]);
}

#[test]
fn only_writes_other_than_the_plain_merge_respect_leases() {
    let merge = Operation::Merge(StateWrite { state_type: StateType::Stream, ops: vec![] });
    assert!(!merge.respects_leases(false));
    assert!(merge.respects_leases(true));
    assert!(Operation::StreamDelete { stream: stream("a") }.respects_leases(false));
}
