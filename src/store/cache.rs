//! A bounded cache of current states, shared by the backends, so a large
//! state is not read back row by row on every read and after every write.
//!
//! An entry is valid only for the exact version it was stored under: the
//! connection's revision and its epoch (which changes when an import
//! replaces the connection). Every use checks the version the database
//! holds now, so the cache is correct with other writers on the same
//! database (other nodes, `highwater import`); it only saves work. Entries
//! are stored only after the write that produced them has committed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::state::{ConnectionId, StateType, StoredState};

/// Which committed state an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub revision: u64,
    pub epoch: i64,
}

/// A connection's row, as both backends read it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Header {
    pub state_type: Option<StateType>,
    pub revision: u64,
    /// The next entry's position.
    pub next_seq: i64,
    pub epoch: i64,
}

impl Header {
    /// The version a cached state must have to be this connection's.
    pub fn version(&self) -> Version {
        Version { revision: self.revision, epoch: self.epoch }
    }
}

/// A cached state with its entries' positions.
#[derive(Debug, Clone)]
pub struct Cached {
    pub state: Arc<StoredState>,
    pub positions: Arc<Vec<i64>>,
}

/// The cache.
pub struct StateCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<ConnectionId, (Version, Cached, usize)>,
    /// Insertion order, oldest first; stale ids are skipped on eviction.
    order: VecDeque<(ConnectionId, Version)>,
    bytes: usize,
}

impl StateCache {
    /// A cache holding states of at most `budget` bytes in all (0: none).
    pub fn new(budget: usize) -> Self {
        Self { budget, inner: Mutex::default() }
    }

    /// The cached state of `id` if it is at `version`.
    pub fn get(&self, id: ConnectionId, version: Version) -> Option<Cached> {
        let inner = self.inner.lock().ok()?;
        inner.entries.get(&id).filter(|(v, _, _)| *v == version).map(|(_, cached, _)| cached.clone())
    }

    /// Whether anything is cached for `id`, at whatever version.
    pub fn holds(&self, id: ConnectionId) -> bool {
        self.inner.lock().is_ok_and(|inner| inner.entries.contains_key(&id))
    }

    /// Remembers the committed state of `id` at `version`, evicting the
    /// oldest entries beyond the budget. A state larger than a quarter of
    /// the budget is not kept.
    pub fn put(&self, id: ConnectionId, version: Version, cached: Cached) {
        let size = weight(&cached.state);
        if size > self.budget / 4 {
            self.forget(id);
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if let Some((_, _, old)) = inner.entries.insert(id, (version, cached, size)) {
            inner.bytes -= old;
        }
        inner.bytes += size;
        inner.order.push_back((id, version));
        while inner.bytes > self.budget {
            let Some((oldest, at)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&oldest).is_some_and(|(v, _, _)| *v == at) {
                if let Some((_, _, size)) = inner.entries.remove(&oldest) {
                    inner.bytes -= size;
                }
            }
        }
        // Keep the order queue from growing without bound under rewrites.
        if inner.order.len() > 4 * inner.entries.len() + 64 {
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(id, v)| entries.get(id).is_some_and(|(current, _, _)| current == v));
        }
    }

    /// Drops what is cached for `id`.
    pub fn forget(&self, id: ConnectionId) {
        if let Ok(mut inner) = self.inner.lock() {
            if let Some((_, _, size)) = inner.entries.remove(&id) {
                inner.bytes -= size;
            }
        }
    }
}

/// Roughly the memory a state takes.
fn weight(state: &StoredState) -> usize {
    state
        .entries
        .iter()
        .map(|(key, blob)| {
            let key = match key {
                crate::state::EntryKey::Stream(d) => d.name.len() + d.namespace.as_ref().map_or(0, String::len),
                _ => 0,
            };
            blob.len() + key + 96
        })
        .sum::<usize>()
        + 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Blob, EntryKey, StateType};

    fn state(size: usize) -> Cached {
        let blob = Blob::from_json(&format!("\"{}\"", "x".repeat(size)));
        let state =
            StoredState { state_type: Some(StateType::Legacy), revision: 1, entries: vec![(EntryKey::Legacy, blob)] };
        Cached { state: Arc::new(state), positions: Arc::new(vec![0]) }
    }

    const V1: Version = Version { revision: 1, epoch: 0 };

    #[test]
    fn an_entry_is_found_only_at_its_version() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        cache.put(id, V1, state(10));
        assert!(cache.get(id, V1).is_some());
        assert!(cache.get(id, Version { revision: 2, epoch: 0 }).is_none());
        assert!(cache.get(id, Version { revision: 1, epoch: 9 }).is_none());
    }

    #[test]
    fn the_oldest_entries_go_when_the_budget_is_exceeded() {
        let cache = StateCache::new(4000);
        let ids: Vec<ConnectionId> = (0..10).map(|_| ConnectionId::random()).collect();
        for id in &ids {
            cache.put(*id, V1, state(500));
        }
        assert!(cache.get(ids[0], V1).is_none());
        assert!(cache.get(ids[9], V1).is_some());
        assert!(cache.inner.lock().unwrap().bytes <= 4000);
    }

    #[test]
    fn a_state_too_large_for_the_budget_is_not_kept() {
        let cache = StateCache::new(1000);
        let id = ConnectionId::random();
        cache.put(id, V1, state(5000));
        assert!(cache.get(id, V1).is_none());
    }
}
