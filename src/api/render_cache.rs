//! Rendered bodies of current states, reused while the state is the same
//! object: the store hands out one shared `Arc` per cached version, so
//! pointer equality means equal content. One body per connection (the
//! current state's), looked up by id; a state that is no longer current is
//! replaced the next time its connection is read.
//!
//! Every size is kept: a lookup costs a hash of the id, while rendering
//! even a 10-stream state costs a few thousand instructions and several
//! allocations (callgrind, bench/profile get10: 12% of a get).
//!
//! A large state's body is kept with its layout, so that the next state
//! of the connection, which a write of a few streams makes, is rendered by
//! copying the body and writing only the blobs that changed
//! ([`render_state_from`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;

use crate::state::wire::{render_state, render_state_from, render_state_laid_out, Layout};
use crate::state::{ConnectionId, StoredState};

/// States of fewer entries are rendered whole: their layout would cost
/// more to keep and to walk than rendering them does.
const LAID_OUT_FROM: usize = 64;

/// Rendered `ConnectionState` bodies, one per connection.
pub struct RenderCache {
    budget: usize,
    inner: Mutex<Inner>,
}

/// A state's body, and for a large state where its blobs lie in it.
#[derive(Clone)]
struct Rendered {
    state: Arc<StoredState>,
    body: Bytes,
    layout: Option<Arc<Layout>>,
}

impl Rendered {
    /// What it counts against the budget.
    fn size(&self) -> usize {
        self.body.len() + self.layout.as_ref().map_or(0, |layout| layout.size())
    }
}

#[derive(Default)]
struct Inner {
    bodies: HashMap<ConnectionId, Rendered>,
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
        let previous = match self.inner.lock() {
            Ok(inner) => match inner.bodies.get(&id) {
                Some(held) if Arc::ptr_eq(&held.state, state) => return held.body.clone(),
                Some(held) => held.layout.is_some().then(|| held.clone()),
                None => None,
            },
            Err(_) => None,
        };
        let (body, layout) = match previous.as_ref().and_then(|held| {
            let layout = held.layout.as_deref()?;
            render_state_from(&held.state, &held.body, layout, state)
        }) {
            Some((body, layout)) => (body, Some(layout)),
            None if state.entries.len() >= LAID_OUT_FROM => render_state_laid_out(id, state),
            None => (render_state(id, state), None),
        };
        // The state this one was made from is let go outside the lock.
        drop(previous);
        let rendered = Rendered { state: state.clone(), body: Bytes::from(body), layout: layout.map(Arc::new) };
        let body = rendered.body.clone();
        if rendered.size() <= self.budget / 4 {
            let replaced = self.inner.lock().ok().and_then(|mut inner| inner.keep(id, rendered, self.budget));
            // Often the last hold on a large state: freed outside the lock.
            drop(replaced);
        }
        body
    }
}

impl Inner {
    /// Keeps `rendered` as its connection's body; returns the one it replaces.
    fn keep(&mut self, id: ConnectionId, rendered: Rendered, budget: usize) -> Option<Rendered> {
        self.bytes += rendered.size();
        self.order.push_back((id, rendered.body.as_ptr() as usize));
        let replaced = self.bodies.insert(id, rendered);
        if let Some(old) = &replaced {
            self.bytes -= old.size();
        }
        while self.bytes > budget {
            let Some((oldest, address)) = self.order.pop_front() else {
                break;
            };
            if self.bodies.get(&oldest).is_some_and(|held| held.body.as_ptr() as usize == address) {
                if let Some(held) = self.bodies.remove(&oldest) {
                    self.bytes -= held.size();
                }
            }
        }
        // Keep the order queue from growing without bound under rewrites.
        if self.order.len() > 4 * self.bodies.len() + 64 {
            let Self { bodies, order, .. } = self;
            order.retain(|(id, address)| bodies.get(id).is_some_and(|held| held.body.as_ptr() as usize == *address));
        }
        replaced
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
            entries: vec![(EntryKey::Legacy, blob)].into(),
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
        assert_eq!(inner.bodies.values().map(Rendered::size).sum::<usize>(), inner.bytes);
        drop(inner);
        assert_eq!(cache.render(ids[19], &states[19]).as_ptr(), first[19].as_ptr());
    }

    #[test]
    fn a_large_state_written_again_is_made_from_its_last_body() {
        use crate::state::StreamDescriptor;
        let cache = RenderCache::new(8 << 20);
        let id = ConnectionId::random();
        let entries: Vec<(EntryKey, Blob)> = (0..LAID_OUT_FROM)
            .map(|i| {
                let stream = StreamDescriptor { name: format!("table_{i}"), namespace: None };
                (EntryKey::stream(stream), Blob::from_json(&i.to_string()))
            })
            .collect();
        let first = Arc::new(StoredState { state_type: Some(StateType::Stream), revision: 1, entries: entries.into() });
        cache.render(id, &first);
        assert!(cache.inner.lock().unwrap().bodies[&id].layout.is_some(), "a large state keeps its layout");
        let mut next = (*first).clone();
        next.revision = 2;
        next.entries = next.entries.with(&[(3, &Blob::from_json(r#"{"cursor":"2024-06-02"}"#))], []);
        let next = Arc::new(next);
        assert_eq!(cache.render(id, &next), render_state(id, &next));
        let inner = cache.inner.lock().unwrap();
        assert!(Arc::ptr_eq(&inner.bodies[&id].state, &next));
        assert_eq!(inner.bytes, inner.bodies[&id].size());
    }
}
