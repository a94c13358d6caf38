//! A bounded cache of current states, shared by the backends, so a large
//! state is not read back row by row on every read and after every write.
//!
//! An entry is valid only for the exact version it was stored under: the
//! connection's revision and its epoch (which changes when an import
//! replaces the connection). Entries are stored only after the write that
//! produced them has committed. It is used in one of two ways:
//!
//! - checked: every use compares the version the database holds now, so the
//!   cache is correct with other writers on the same database (other nodes
//!   on PostgreSQL); it only saves reading the entries.
//! - authoritative: when this process is the database's only writer (the
//!   SQLite store holds a lock on its file), every commit reaches the cache
//!   in commit order through [`StateCache::committed`], so what it holds *is*
//!   the current state and a read needs no database access at all. A state
//!   read from the database is then kept only if no commit happened while it
//!   was read ([`StateCache::mark`], [`StateCache::put_unless_changed`]).
//!   A PostgreSQL node uses it so while it holds the sole-node lease
//!   (`postgres::sole`): it empties the cache when it takes the lease
//!   ([`StateCache::trust`]), and what a read or a write that began before
//!   is not kept; from then until it gives the lease up
//!   ([`StateCache::distrust`]) a state read is kept only if no commit
//!   happened while it was read, whatever the reader assumed when it
//!   began.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use crate::state::{advance, Blob, ConnectionId, Effect, EntryFinder, EntryKey, StateType, StoredState};

/// Which committed state an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub revision: u64,
    pub epoch: i64,
    /// The connection's next entry position. It follows from the two
    /// above (only a write or an import moves it); it is kept so that a
    /// writer can take the whole header from the cache.
    pub next_seq: i64,
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
        Version { revision: self.revision, epoch: self.epoch, next_seq: self.next_seq }
    }
}

/// A cached state with its entries' positions.
#[derive(Debug, Clone)]
pub struct Cached {
    pub state: Arc<StoredState>,
    pub positions: Arc<Vec<i64>>,
}

impl Cached {
    /// Of `keys`, those the state holds, with their blob and position.
    pub fn stored(&self, keys: &[&EntryKey]) -> StoredEntries {
        let entries = &self.state.entries;
        let finder = EntryFinder::new(entries, keys.len());
        let mut found = StoredEntries::with_capacity(keys.len());
        for key in keys {
            if let Some(at) = finder.find(key) {
                found.insert(key.encode(), (entries[at].1.clone(), self.positions[at]));
            }
        }
        found
    }
}

/// The cache.
pub struct StateCache {
    budget: usize,
    inner: Mutex<Inner>,
}

/// What a committed write does to the cache.
pub enum Update {
    /// The new state is known: keep it.
    Put(Version, Cached),
    /// Only the effects are known (the writer did not need the whole
    /// state): apply them when the state is next read, so a burst of
    /// one-stream writes to a large state costs one rebuild, not one each.
    Defer { from: Version, to: Version, effects: Vec<Effect>, state_type: Option<StateType> },
    /// The connection was replaced (an import): drop what is held.
    Forget,
}

/// The states the writes of the writer's unsettled group commits produced,
/// by connection: a later write to the same connection starts from the
/// state an earlier one produced instead of reading it back (the cache
/// learns of a commit only once it is durable, see `sqlite::sync`). Shared
/// by the writer, which notes and looks up, and the sync thread, which
/// forgets what it has made durable: a large state is not kept alive
/// after the cache has it, or has let it go.
#[derive(Default)]
pub struct GroupStates(Mutex<GroupInner>);

#[derive(Default)]
struct GroupInner {
    /// State, version and the group that produced it.
    states: HashMap<ConnectionId, (Version, Cached, u64)>,
    /// The group being applied.
    group: u64,
}

impl GroupStates {
    /// The state `id` had at `version`, if a write of an unsettled group
    /// produced that state.
    pub fn get(&self, id: ConnectionId, version: Version) -> Option<Cached> {
        let inner = self.0.lock().ok()?;
        inner.states.get(&id).filter(|(at, _, _)| *at == version).map(|(_, cached, _)| cached.clone())
    }

    /// Starts group `group`: what the writer notes from now on is its.
    pub fn begin(&self, group: u64) {
        if let Ok(mut inner) = self.0.lock() {
            inner.group = group;
        }
    }

    /// Forgets what the groups up to `settled` produced: the cache has
    /// been told of those.
    pub fn settle(&self, settled: u64) {
        if let Ok(mut inner) = self.0.lock() {
            inner.states.retain(|_, (_, _, by)| *by > settled);
        }
    }

    /// Forgets everything: the group being applied was rolled back.
    pub fn clear(&self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.states.clear();
        }
    }

    /// Records what a write of the group did.
    pub fn note(&self, id: ConnectionId, update: &Update) {
        let Ok(mut inner) = self.0.lock() else {
            return;
        };
        match update {
            Update::Put(version, cached) => {
                let group = inner.group;
                inner.states.insert(id, (*version, cached.clone(), group));
            }
            Update::Defer { .. } | Update::Forget => {
                inner.states.remove(&id);
            }
        }
    }
}

/// Stored entries by encoded key: blob and position.
pub type StoredEntries = HashMap<String, (Blob, i64)>;

/// Effects waiting to be applied to a cached state, and the type after them.
type Pending = (Vec<Effect>, Option<StateType>);

#[derive(Default)]
struct Inner {
    entries: HashMap<ConnectionId, (Version, Cached, usize)>,
    pending: HashMap<ConnectionId, Pending>,
    /// Insertion order, oldest first; stale ids are skipped on eviction.
    order: VecDeque<(ConnectionId, Version)>,
    bytes: usize,
    /// Commits reported through [`StateCache::committed`].
    commits: u64,
    /// Times the cache was emptied ([`StateCache::trust`]).
    resets: u64,
    /// Set by [`StateCache::trust`]: every read is kept as if strict.
    trusted: bool,
}

/// When a read or a write began, as the cache counts: see
/// [`StateCache::mark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    commits: u64,
    resets: u64,
}

impl StateCache {
    /// A cache holding states of at most `budget` bytes in all (0: none).
    pub fn new(budget: usize) -> Self {
        Self { budget, inner: Mutex::default() }
    }

    /// The cached state of `id` if it is at `version`, with any deferred
    /// effects applied first.
    pub fn get(&self, id: ConnectionId, version: Version) -> Option<Cached> {
        let mut inner = self.inner.lock().ok()?;
        let (at, _, _) = inner.entries.get(&id)?;
        if *at != version {
            return None;
        }
        inner.take(id)
    }

    /// What is held for `id`, at whatever version: the current state when
    /// the cache is authoritative (see the module's documentation).
    pub fn current(&self, id: ConnectionId) -> Option<Cached> {
        self.inner.lock().ok()?.take(id)
    }

    /// Applies what a committed write did.
    pub fn update(&self, id: ConnectionId, update: Update) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.update(id, update, self.budget);
        }
    }

    /// How many commits have been reported (the sync thread's tests count
    /// them).
    #[cfg(test)]
    pub fn commits(&self) -> u64 {
        self.inner.lock().map_or(0, |inner| inner.commits)
    }

    /// Reports one commit and what it did, in the order the writes were
    /// applied, atomically with respect to every other use of the cache.
    pub fn committed(&self, updates: impl IntoIterator<Item = (ConnectionId, Update)>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.commits += 1;
        for (id, update) in updates {
            inner.update(id, update, self.budget);
        }
    }

    /// Where the cache stands, read before a read or a write begins and
    /// passed to [`Self::put_unless_changed`] or [`Self::committed_since`].
    pub fn mark(&self) -> Mark {
        self.inner
            .lock()
            .map_or(Mark { commits: 0, resets: 0 }, |inner| Mark { commits: inner.commits, resets: inner.resets })
    }

    /// [`Self::put`], unless the cache was reset after `mark` was taken
    /// (what was read may predate what the reset was for), or, when
    /// `strict` or the cache is trusted ([`Self::trust`]), a commit was
    /// reported since (what was read may be older than what the cache was
    /// told).
    pub fn put_unless_changed(&self, id: ConnectionId, version: Version, cached: Cached, mark: Mark, strict: bool) {
        if let Ok(mut inner) = self.inner.lock() {
            let strict = strict || inner.trusted;
            if inner.resets == mark.resets && (!strict || inner.commits == mark.commits) {
                inner.put(id, version, cached, self.budget);
            }
        }
    }

    /// Whether the cache keeps anything (a budget of 0 keeps nothing).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Whether the cache would keep `cached` ([`keeps`]).
    pub fn fits(&self, cached: &Cached) -> bool {
        keeps(weight(&cached.state), self.budget)
    }

    /// [`Self::put`], unless the cache was reset after `mark` was taken.
    /// Only for a reader that held the connection's write lock from before
    /// `mark` until now: no write of it was made or reported meanwhile, so
    /// what it read is current even where [`Self::put_unless_changed`]
    /// must assume a commit reported since could be of it.
    pub fn put_locked(&self, id: ConnectionId, version: Version, cached: Cached, mark: Mark) {
        if let Ok(mut inner) = self.inner.lock() {
            if inner.resets == mark.resets {
                inner.put(id, version, cached, self.budget);
            }
        }
    }

    /// [`Self::committed`] for writes that began at `mark`: after a reset
    /// since, their connections are forgotten instead, because the state
    /// they started from may not have been the current one.
    pub fn committed_since(&self, mark: Mark, updates: impl IntoIterator<Item = (ConnectionId, Update)>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.commits += 1;
        let reset = inner.resets != mark.resets;
        for (id, update) in updates {
            let update = if reset { Update::Forget } else { update };
            inner.update(id, update, self.budget);
        }
    }

    /// Forgets everything held, and counts as a commit: other writers may
    /// have written any of it. Then trusted or not ([`Self::trust`]).
    fn reset(&self, trusted: bool) {
        if let Ok(mut inner) = self.inner.lock() {
            let resets = inner.resets + 1;
            let commits = inner.commits + 1;
            *inner = Inner { commits, resets, trusted, ..Inner::default() };
        }
    }

    /// Empties the cache before it is answered from as the current state:
    /// until [`Self::distrust`], a state read is kept only if no commit was
    /// reported while it was read, even from a reader that began when the
    /// cache was not trusted (and would have kept it, the version being
    /// checked at every use then) but read after this.
    pub fn trust(&self) {
        self.reset(true);
    }

    /// Ends [`Self::trust`]: every use checks the version again.
    pub fn distrust(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.trusted = false;
        }
    }

    /// Whether anything is cached for `id`, at whatever version.
    pub fn holds(&self, id: ConnectionId) -> bool {
        self.inner.lock().is_ok_and(|inner| inner.entries.contains_key(&id))
    }

    /// The header held for `id` and, of `keys` (encoded), those present
    /// there with their blob and position: what a writer would otherwise
    /// read for them. Deferred effects are looked through, not folded in,
    /// so a run of one-stream writes to a large state stays cheap. `None`
    /// for a state of more than `most_entries` entries, where finding a
    /// key costs the caller more than asking its database (each backend
    /// sets its limit). The entries are scanned after the cache's lock is
    /// let go.
    pub fn stored(&self, id: ConnectionId, keys: &[&EntryKey], most_entries: usize) -> Option<(Header, StoredEntries)> {
        let (header, mut found, rest, cached) = {
            let inner = self.inner.lock().ok()?;
            let (version, cached, _) = inner.entries.get(&id)?;
            if cached.state.entries.len() > most_entries {
                return None;
            }
            let (pending, state_type) = match inner.pending.get(&id) {
                Some((effects, state_type)) => (effects.as_slice(), *state_type),
                None => (&[][..], cached.state.state_type),
            };
            let mut found = StoredEntries::with_capacity(keys.len());
            let mut rest = Vec::with_capacity(keys.len());
            for key in keys {
                match pending.iter().rev().find(|(changed, _)| changed == *key) {
                    Some((_, Some(value))) => drop(found.insert(key.encode(), value.clone())),
                    Some((_, None)) => {}
                    None => rest.push(*key),
                }
            }
            let Version { revision, epoch, next_seq } = *version;
            let cached = (!rest.is_empty()).then(|| cached.clone());
            (Header { state_type, revision, next_seq, epoch }, found, rest, cached)
        };
        if let Some(cached) = cached {
            found.extend(cached.stored(&rest));
        }
        Some((header, found))
    }

    /// Remembers the committed state of `id` at `version`, evicting the
    /// oldest entries beyond the budget. A state larger than a quarter of
    /// the budget is not kept.
    pub fn put(&self, id: ConnectionId, version: Version, cached: Cached) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.put(id, version, cached, self.budget);
        }
    }

    /// Drops what is cached for `id`.
    pub fn forget(&self, id: ConnectionId) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.forget(id);
        }
    }
}

/// Whether a cache of `budget` bytes keeps a state of `size`: nothing
/// larger than a quarter of the budget, so that one state cannot push
/// out all the others.
fn keeps(size: usize, budget: usize) -> bool {
    size <= budget / 4
}

impl Inner {
    /// The entry of `id` with any deferred effects applied first.
    fn take(&mut self, id: ConnectionId) -> Option<Cached> {
        let (version, cached, _) = self.entries.get(&id)?;
        let (revision, cached) = (version.revision, cached.clone());
        let Some((effects, state_type)) = self.pending.remove(&id) else {
            return Some(cached);
        };
        let (state, positions) = advance(&cached.state, &cached.positions, &effects, revision, state_type);
        let rebuilt = Cached { state: Arc::new(state), positions: Arc::new(positions) };
        if let Some(slot) = self.entries.get_mut(&id) {
            slot.1 = rebuilt.clone();
        }
        Some(rebuilt)
    }

    fn update(&mut self, id: ConnectionId, update: Update, budget: usize) {
        match update {
            Update::Put(version, cached) => self.put(id, version, cached, budget),
            Update::Defer { from, to, effects, state_type } => {
                let Some(slot) = self.entries.get_mut(&id) else {
                    return;
                };
                if slot.0 != from {
                    // Held at another version than the write started from:
                    // whatever it is, it is not the state after the write.
                    self.forget(id);
                    return;
                }
                slot.0 = to;
                let held = slot.1.state.entries.len();
                let pending = self.pending.entry(id).or_insert_with(|| (Vec::new(), state_type));
                pending.0.extend(effects);
                pending.1 = state_type;
                // Writes with no read between them must not pile up effects
                // without bound: fold them in once they are an eighth of the
                // state, which keeps the cost per write constant.
                if pending.0.len() > (held / 8).max(64) {
                    self.take(id);
                }
            }
            Update::Forget => self.forget(id),
        }
    }

    fn put(&mut self, id: ConnectionId, version: Version, cached: Cached, budget: usize) {
        // A later revision of the same connection (the epoch unchanged) is
        // never replaced by an earlier one: two of a node's write batches
        // can report their commits out of order (postgres::batch).
        if self
            .entries
            .get(&id)
            .is_some_and(|(held, _, _)| held.epoch == version.epoch && held.revision > version.revision)
        {
            return;
        }
        let size = weight(&cached.state);
        if !keeps(size, budget) {
            self.forget(id);
            return;
        }
        self.pending.remove(&id);
        if let Some((_, _, old)) = self.entries.insert(id, (version, cached, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        self.order.push_back((id, version));
        while self.bytes > budget {
            let Some((oldest, at)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&oldest).is_some_and(|(v, _, _)| *v == at) {
                self.forget(oldest);
            }
        }
        // Keep the order queue from growing without bound under rewrites.
        if self.order.len() > 4 * self.entries.len() + 64 {
            let Self { entries, order, .. } = self;
            order.retain(|(id, v)| entries.get(id).is_some_and(|(current, _, _)| current == v));
        }
    }

    fn forget(&mut self, id: ConnectionId) {
        if let Some((_, _, size)) = self.entries.remove(&id) {
            self.bytes -= size;
        }
        self.pending.remove(&id);
    }
}

/// Roughly the memory a state takes.
fn weight(state: &StoredState) -> usize {
    state.entries.weight() + 64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Blob, EntryKey, StateType};

    fn state(size: usize) -> Cached {
        let blob = Blob::from_json(&format!("\"{}\"", "x".repeat(size)));
        let state = StoredState {
            state_type: Some(StateType::Legacy),
            revision: 1,
            entries: vec![(EntryKey::Legacy, blob)].into(),
        };
        Cached { state: Arc::new(state), positions: Arc::new(vec![0]) }
    }

    const V1: Version = Version { revision: 1, epoch: 0, next_seq: 0 };

    #[test]
    fn an_entry_is_found_only_at_its_version() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        cache.put(id, V1, state(10));
        assert!(cache.get(id, V1).is_some());
        assert!(cache.get(id, Version { revision: 2, epoch: 0, next_seq: 0 }).is_none());
        assert!(cache.get(id, Version { revision: 1, epoch: 9, next_seq: 0 }).is_none());
    }

    #[test]
    fn stored_entries_are_looked_up_through_deferred_effects_without_folding_them() {
        // The largest state the caller has a key looked up in.
        const LIMIT: usize = 256;
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        let stream =
            |name: &str| EntryKey::stream(crate::state::StreamDescriptor { name: name.to_owned(), namespace: None });
        let keys: Vec<EntryKey> = (0..20).map(|i| stream(&format!("s{i}"))).collect();
        let entries = keys.iter().map(|key| (key.clone(), Blob::from_json("1"))).collect();
        let state = StoredState { state_type: Some(StateType::Stream), revision: 1, entries };
        cache.put(id, V1, Cached { state: Arc::new(state), positions: Arc::new((0..20).collect()) });
        let v2 = Version { revision: 2, epoch: 0, next_seq: 0 };
        let effects = vec![(keys[3].clone(), Some((Blob::from_json("2"), 3))), (keys[4].clone(), None)];
        cache.update(id, Update::Defer { from: V1, to: v2, effects, state_type: Some(StateType::Stream) });

        let missing = stream("none");
        for wanted in [vec![&keys[3], &keys[4], &keys[5], &missing], keys.iter().chain([&missing]).collect()] {
            let (header, found) = cache.stored(id, &wanted, LIMIT).unwrap();
            assert_eq!(header.version(), v2);
            assert_eq!(header.state_type, Some(StateType::Stream));
            assert_eq!(found.get(&keys[3].encode()).map(|(b, s)| (b.as_str(), *s)), Some(("2", 3)));
            assert_eq!(found.get(&keys[5].encode()).map(|(b, s)| (b.as_str(), *s)), Some(("1", 5)));
            assert!(!found.contains_key(&keys[4].encode()) && !found.contains_key(&missing.encode()));
            assert_eq!(found.len(), wanted.len() - 2);
        }
        // Still deferred: nothing was folded in.
        assert_eq!(cache.inner.lock().unwrap().pending[&id].0.len(), 2);
        assert!(cache.stored(ConnectionId::random(), &[&keys[0]], LIMIT).is_none());

        // A state larger than the caller's limit is left to its database.
        let big = ConnectionId::random();
        let entries = (0..=LIMIT).map(|i| (stream(&format!("s{i}")), Blob::from_json("1"))).collect();
        let state = StoredState { state_type: Some(StateType::Stream), revision: 1, entries };
        let positions = Arc::new((0..=LIMIT as i64).collect());
        cache.put(big, V1, Cached { state: Arc::new(state), positions });
        assert!(cache.stored(big, &[&keys[0]], LIMIT).is_none());
        let (_, found) = cache.stored(big, &[&keys[0], &missing], LIMIT + 1).unwrap();
        assert_eq!(found.get(&keys[0].encode()).map(|(b, s)| (b.as_str(), *s)), Some(("1", 0)));
        assert_eq!(found.len(), 1);
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
    fn deferred_effects_are_applied_at_the_next_read_of_the_new_version() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        cache.put(id, V1, state(10));
        let v2 = Version { revision: 2, epoch: 0, next_seq: 0 };
        let effects = vec![(EntryKey::Shared, Some((Blob::from_json("7"), 5)))];
        cache.update(id, Update::Defer { from: V1, to: v2, effects, state_type: Some(StateType::Global) });
        assert!(cache.get(id, V1).is_none());
        let read = cache.get(id, v2).unwrap();
        assert_eq!(read.state.revision, 2);
        assert_eq!(read.state.entries.len(), 2);
        assert_eq!(*read.positions, [0, 5]);
        // A deferral from a version the cache does not hold drops the entry.
        let v9 = Version { revision: 9, epoch: 0, next_seq: 0 };
        cache.update(id, Update::Defer { from: V1, to: v9, effects: Vec::new(), state_type: None });
        assert!(cache.get(id, v9).is_none());
    }

    #[test]
    fn a_state_read_while_a_commit_was_reported_is_not_kept() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        let since = cache.mark();
        cache.committed([(id, Update::Put(Version { revision: 2, epoch: 0, next_seq: 0 }, state(10)))]);
        cache.put_unless_changed(id, V1, state(10), since, true);
        assert_eq!(cache.current(id).unwrap().state.revision, 1, "the committed state stays");
        let other = ConnectionId::random();
        cache.put_unless_changed(other, V1, state(10), since, true);
        assert!(cache.current(other).is_none());
        cache.put_unless_changed(other, V1, state(10), cache.mark(), true);
        assert!(cache.current(other).is_some());
    }

    #[test]
    fn what_began_before_a_reset_is_not_kept_after_it() {
        let cache = StateCache::new(1 << 20);
        let (read, written) = (ConnectionId::random(), ConnectionId::random());
        cache.put(written, V1, state(10));
        let before = cache.mark();
        cache.reset(false);
        assert!(cache.current(written).is_none(), "a reset keeps nothing");
        cache.put_unless_changed(read, V1, state(10), before, false);
        assert!(cache.current(read).is_none(), "a read begun before the reset was kept");
        cache.committed_since(before, [(written, Update::Put(V1, state(10)))]);
        assert!(cache.current(written).is_none(), "a write begun before the reset was kept");
        let after = cache.mark();
        cache.committed_since(after, [(written, Update::Put(V1, state(10)))]);
        assert!(cache.current(written).is_some());
        cache.put_unless_changed(read, V1, state(10), after, true);
        assert!(cache.current(read).is_none(), "a strict read kept across a commit");
        cache.put_unless_changed(read, V1, state(10), after, false);
        assert!(cache.current(read).is_some());
    }

    #[test]
    fn a_read_under_the_connections_lock_is_kept_across_other_commits_but_not_a_reset() {
        let cache = StateCache::new(1 << 20);
        let (id, other) = (ConnectionId::random(), ConnectionId::random());
        cache.trust();
        // Other connections' commits while it read: kept, where a reader
        // without the lock is not.
        let read_from = cache.mark();
        cache.committed([(other, Update::Forget)]);
        cache.put_locked(id, V1, state(10), read_from);
        assert!(cache.current(id).is_some());
        // A reset while it read (trust taken again): not kept.
        cache.forget(id);
        let read_from = cache.mark();
        cache.trust();
        cache.put_locked(id, V1, state(10), read_from);
        assert!(cache.current(id).is_none(), "a read from before a reset was kept");
        assert!(cache.enabled() && cache.fits(&state(10)) && !cache.fits(&state(1 << 19)));
        assert!(!StateCache::new(0).enabled());
    }

    #[test]
    fn once_trusted_a_read_is_kept_only_if_no_commit_came_while_it_read() {
        let cache = StateCache::new(1 << 20);
        let (id, other) = (ConnectionId::random(), ConnectionId::random());
        cache.trust();
        // A reader that began when the cache was not trusted (not strict),
        // but marked after the cache was emptied for trust.
        let read_from = cache.mark();
        cache.committed([(other, Update::Forget)]);
        cache.put_unless_changed(id, V1, state(10), read_from, false);
        assert!(cache.current(id).is_none(), "a read across a commit was kept in a trusted cache");
        cache.put_unless_changed(id, V1, state(10), cache.mark(), false);
        assert!(cache.current(id).is_some());
        cache.distrust();
        let read_from = cache.mark();
        cache.committed([(other, Update::Forget)]);
        cache.put_unless_changed(other, V1, state(10), read_from, false);
        assert!(cache.current(other).is_some(), "once distrusted, every use checks the version again");
    }

    #[test]
    fn an_earlier_revision_never_replaces_a_later_one() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        let v2 = Version { revision: 2, epoch: 0, next_seq: 0 };
        // Two batches' commits reported out of order.
        cache.committed([(id, Update::Put(v2, state(20)))]);
        cache.committed([(id, Update::Put(V1, state(10)))]);
        assert!(cache.get(id, v2).is_some(), "revision 1 replaced revision 2");
        // An import starts a new epoch: its revision 1 replaces whatever was held.
        let imported = Version { revision: 1, epoch: 7, next_seq: 0 };
        cache.committed([(id, Update::Put(imported, state(10)))]);
        assert!(cache.get(id, imported).is_some());
    }

    #[test]
    fn a_deferral_from_another_version_drops_the_entry() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        cache.put(id, V1, state(10));
        let (v2, v3) = (Version { revision: 2, epoch: 0, next_seq: 0 }, Version { revision: 3, epoch: 0, next_seq: 0 });
        cache.committed([(id, Update::Defer { from: v2, to: v3, effects: Vec::new(), state_type: None })]);
        assert!(cache.current(id).is_none());
        cache.put(id, V1, state(10));
        cache.committed([(id, Update::Forget)]);
        assert!(cache.current(id).is_none());
    }

    #[test]
    fn effects_of_many_writes_without_a_read_are_folded_in() {
        let cache = StateCache::new(1 << 20);
        let id = ConnectionId::random();
        cache.put(id, V1, state(10));
        for revision in 1..=1000u64 {
            let (from, to) = (
                Version { revision, epoch: 0, next_seq: 0 },
                Version { revision: revision + 1, epoch: 0, next_seq: 0 },
            );
            let effects = vec![(EntryKey::Shared, Some((Blob::from_json(&revision.to_string()), 5)))];
            cache.update(id, Update::Defer { from, to, effects, state_type: Some(StateType::Global) });
        }
        assert!(cache.inner.lock().unwrap().pending.get(&id).map_or(0, |p| p.0.len()) <= 64);
        let read = cache.current(id).unwrap();
        assert_eq!(read.state.revision, 1001);
        assert_eq!(read.state.entries[1].1.as_str(), "1000");
    }

    #[test]
    fn a_state_too_large_for_the_budget_is_not_kept() {
        let cache = StateCache::new(1000);
        let id = ConnectionId::random();
        cache.put(id, V1, state(5000));
        assert!(cache.get(id, V1).is_none());
    }
}
