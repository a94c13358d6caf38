//! Revisions as users see them: history pages, differences between two
//! revisions, and the retention policy that bounds how much is kept.

use std::collections::HashMap;
use std::time::Duration;

use super::{Blob, EntryKey, StateType, StoredState};

/// One revision in a connection's history.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionInfo {
    pub revision: u64,
    pub created_at_ms: i64,
    /// The state's type after this revision (`None`: not_set).
    pub state_type: Option<StateType>,
    pub actor: Option<String>,
    pub reason: Option<String>,
    /// Each changed entry: its key and the new blob's size in bytes, or
    /// `None` when the entry was deleted.
    pub changes: Vec<(EntryKey, Option<u64>)>,
}

/// A page of history, newest first.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    /// The connection's current revision.
    pub revision: u64,
    /// The oldest revision still kept, if any.
    pub oldest: Option<u64>,
    pub revisions: Vec<RevisionInfo>,
}

/// How one entry differs between two states.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryDiff {
    Added { key: EntryKey, to: Blob },
    Removed { key: EntryKey, from: Blob },
    Changed { key: EntryKey, from: Blob, to: Blob },
}

/// The entries that differ between two states: those of `from` in their
/// order, then those only in `to`.
pub fn diff(from: &StoredState, to: &StoredState) -> Vec<EntryDiff> {
    let after: HashMap<&EntryKey, &Blob> = to.entries.iter().map(|(k, b)| (k, b)).collect();
    let before: HashMap<&EntryKey, &Blob> = from.entries.iter().map(|(k, b)| (k, b)).collect();
    let mut out = Vec::new();
    for (key, old) in &from.entries {
        match after.get(key) {
            None => out.push(EntryDiff::Removed { key: key.clone(), from: old.clone() }),
            Some(new) if *new != old => {
                out.push(EntryDiff::Changed { key: key.clone(), from: old.clone(), to: (*new).clone() })
            }
            Some(_) => {}
        }
    }
    for (key, new) in &to.entries {
        if !before.contains_key(key) {
            out.push(EntryDiff::Added { key: key.clone(), to: new.clone() });
        }
    }
    out
}

/// How much history to keep per connection. A revision goes once it is
/// outside the newest `keep_revisions` or older than `keep_for`; the
/// current revision always stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub keep_revisions: Option<u64>,
    pub keep_for: Option<Duration>,
}

/// Most revisions one pruning step removes. Each step is a write of its
/// own (a transaction on PostgreSQL, a job of SQLite's writer), so a
/// connection far past what the policy keeps is pruned in short steps
/// that writes queue behind, not in one long one. Measured on
/// SQLite after bench/'s large-state loads (20 s each), with 4 clients
/// writing other connections during the prune: ~545k revisions of the
/// 10,000-stream connection in one step took 1.7 s, the writes' p99 was
/// 913 ms (max 1.36 s) and the process stayed 12 MiB larger; in steps of
/// 5,000, 3.6 s in all, p99 25 ms (max 43 ms), 1 MiB larger.
pub const PRUNE_STEP: u64 = 5_000;

/// What one pruning step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Revisions removed.
    pub removed: u64,
    /// Whether revisions the policy no longer keeps remain for a next step.
    pub more: bool,
}

impl Retention {
    /// The oldest revision to keep for a connection at `current`, given the
    /// first revision created at or after the age cutoff (`None` when every
    /// revision is older).
    pub fn oldest_kept(&self, current: u64, first_recent: Option<u64>) -> u64 {
        let by_count = self.keep_revisions.map_or(1, |n| current.saturating_sub(n.max(1)) + 1);
        let by_age = match self.keep_for {
            Some(_) => first_recent.unwrap_or(current),
            None => 1,
        };
        by_count.max(by_age).min(current).max(1)
    }
}

/// The revision below which one pruning step removes history: `keep_from`
/// (the policy's [`Retention::oldest_kept`]), but no more than `most`
/// revisions past the `oldest` one still recorded. Pruning below it is
/// pruning under a policy that keeps more, so every step leaves a valid
/// history.
///
/// `None` when no recorded revision is older than `keep_from`: then there
/// is nothing to remove, since a step leaves below its horizon only each
/// key's change still visible there, and a connection under its limits
/// (the common case) is passed over without a write. With no revision
/// recorded (`oldest` is `None`), the step goes to `keep_from`.
pub fn step_horizon(keep_from: u64, oldest: Option<u64>, most: u64) -> Option<u64> {
    match oldest {
        Some(oldest) if oldest >= keep_from => None,
        Some(oldest) => Some(keep_from.min(oldest.saturating_add(most.max(1)))),
        None => Some(keep_from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StreamDescriptor;

    fn key(name: &str) -> EntryKey {
        EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: None })
    }

    fn state(entries: &[(&str, &str)]) -> StoredState {
        StoredState {
            state_type: Some(StateType::Stream),
            revision: 0,
            entries: entries.iter().map(|(k, b)| (key(k), Blob::from_json(b))).collect(),
        }
    }

    #[test]
    fn a_diff_lists_removed_changed_and_added_entries() {
        let from = state(&[("a", "1"), ("b", "1"), ("c", "1")]);
        let to = state(&[("b", "2"), ("c", "1"), ("d", "1")]);
        let found = diff(&from, &to);
        assert_eq!(
            found,
            [
                EntryDiff::Removed { key: key("a"), from: Blob::from_json("1") },
                EntryDiff::Changed { key: key("b"), from: Blob::from_json("1"), to: Blob::from_json("2") },
                EntryDiff::Added { key: key("d"), to: Blob::from_json("1") },
            ]
        );
    }

    #[test]
    fn retention_by_count_keeps_the_newest_revisions() {
        let keep = Retention { keep_revisions: Some(10), keep_for: None };
        assert_eq!(keep.oldest_kept(100, None), 91);
        assert_eq!(keep.oldest_kept(5, None), 1);
    }

    #[test]
    fn retention_by_age_keeps_recent_revisions_and_always_the_current_one() {
        let keep = Retention { keep_revisions: None, keep_for: Some(Duration::from_secs(60)) };
        assert_eq!(keep.oldest_kept(100, Some(40)), 40);
        assert_eq!(keep.oldest_kept(100, None), 100);
    }

    #[test]
    fn both_limits_apply() {
        let keep = Retention { keep_revisions: Some(10), keep_for: Some(Duration::from_secs(60)) };
        assert_eq!(keep.oldest_kept(100, Some(40)), 91);
        assert_eq!(keep.oldest_kept(100, Some(95)), 95);
    }

    #[test]
    fn no_limits_keep_everything() {
        let keep = Retention { keep_revisions: None, keep_for: None };
        assert_eq!(keep.oldest_kept(100, None), 1);
    }

    #[test]
    fn a_pruning_step_goes_at_most_its_size_past_the_oldest_revision() {
        assert_eq!(step_horizon(9_000, Some(1), 5_000), Some(5_001));
        assert_eq!(step_horizon(9_000, Some(5_001), 5_000), Some(9_000), "the last step stops at the policy's");
        assert_eq!(step_horizon(9_000, Some(8_999), 5_000), Some(9_000));
        assert_eq!(step_horizon(9_000, Some(9_000), 5_000), None, "nothing older to remove");
        assert_eq!(step_horizon(9_000, Some(9_500), 5_000), None);
        assert_eq!(step_horizon(9_000, None, 5_000), Some(9_000));
        assert_eq!(step_horizon(9_000, Some(1), 0), Some(2), "a step removes at least one revision");
    }
}
