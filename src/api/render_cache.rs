//! Rendered bodies of current states, reused while the state is the same
//! object: the store hands out one shared `Arc` per cached version, so
//! pointer equality means equal content. One body per connection (the
//! current state's), looked up by id; a state that is no longer current is
//! replaced the next time its connection is read.
//!
//! Every size is kept: a lookup costs a hash of the id, while rendering
//! even a 10-stream state costs a few thousand instructions and several
//! allocations (callgrind, bench/profile get10: 12% of a get).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;

use crate::state::wire::render_state;
use crate::state::{ConnectionId, StoredState};

/// Rendered `ConnectionState` bodies, one per connection.
pub struct RenderCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    bodies: HashMap<ConnectionId, (Arc<StoredState>, Bytes)>,
    /// Insertion order, oldest first, with the body's address so that an
    /// entry replaced since is skipped on eviction.
    order: VecDeque<(ConnectionId, usize)>,
    bytes: usize,
}

impl RenderCache {
    /// A cache of at most `budget` bytes of rendered bodies (0: none).
    pub fn new(budget: usize) -> Self {
        Self { budget, inner: Mutex::default() }
    }

    /// The body of `state`, rendered now or earlier.
    pub fn render(&self, id: ConnectionId, state: &Arc<StoredState>) -> Bytes {
        if let Ok(inner) = self.inner.lock() {
            if let Some((_, body)) = inner.bodies.get(&id).filter(|(held, _)| Arc::ptr_eq(held, state)) {
                return body.clone();
            }
        }
        let body = Bytes::from(render_state(id, state));
        if body.len() <= self.budget / 4 {
            if let Ok(mut inner) = self.inner.lock() {
                inner.keep(id, state.clone(), body.clone(), self.budget);
            }
        }
        body
    }
}

impl Inner {
    fn keep(&mut self, id: ConnectionId, state: Arc<StoredState>, body: Bytes, budget: usize) {
        self.bytes += body.len();
        self.order.push_back((id, body.as_ptr() as usize));
        if let Some((_, old)) = self.bodies.insert(id, (state, body)) {
            self.bytes -= old.len();
        }
        while self.bytes > budget {
            let Some((oldest, address)) = self.order.pop_front() else {
                break;
            };
            if self.bodies.get(&oldest).is_some_and(|(_, body)| body.as_ptr() as usize == address) {
                if let Some((_, body)) = self.bodies.remove(&oldest) {
                    self.bytes -= body.len();
                }
            }
        }
        // Keep the order queue from growing without bound under rewrites.
        if self.order.len() > 4 * self.bodies.len() + 64 {
            let Self { bodies, order, .. } = self;
            order.retain(|(id, address)| bodies.get(id).is_some_and(|(_, body)| body.as_ptr() as usize == *address));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Blob, EntryKey, StateType};

    fn legacy(size: usize) -> Arc<StoredState> {
        let blob = Blob::from_json(&format!("\"{}\"", "x".repeat(size)));
        Arc::new(StoredState {
            state_type: Some(StateType::Legacy),
            revision: 1,
            entries: vec![(EntryKey::Legacy, blob)],
        })
    }

    #[test]
    fn the_same_state_object_reuses_its_body_and_another_does_not() {
        let cache = RenderCache::new(8 << 20);
        let id = ConnectionId::random();
        for size in [10, 100_000] {
            let state = legacy(size);
            let first = cache.render(id, &state);
            let again = cache.render(id, &state);
            assert_eq!(first.as_ptr(), again.as_ptr());
            let other = legacy(size);
            assert_ne!(cache.render(id, &other).as_ptr(), first.as_ptr());
            assert_eq!(cache.render(id, &other), first);
        }
    }

    #[test]
    fn the_oldest_bodies_go_beyond_the_budget() {
        let cache = RenderCache::new(10_000);
        let ids: Vec<ConnectionId> = (0..20).map(|_| ConnectionId::random()).collect();
        let states: Vec<_> = ids.iter().map(|_| legacy(1000)).collect();
        let first: Vec<Bytes> = ids.iter().zip(&states).map(|(id, state)| cache.render(*id, state)).collect();
        let inner = cache.inner.lock().unwrap();
        assert!(inner.bytes <= 10_000);
        assert!(!inner.bodies.contains_key(&ids[0]));
        assert!(inner.bodies.contains_key(&ids[19]));
        assert_eq!(inner.bodies.values().map(|(_, b)| b.len()).sum::<usize>(), inner.bytes);
        drop(inner);
        assert_eq!(cache.render(ids[19], &states[19]).as_ptr(), first[19].as_ptr());
    }
}
