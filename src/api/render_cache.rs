//! Rendered bodies of large states, reused while the state is the same
//! object: the store hands out one shared `Arc` per cached version, so
//! pointer equality means equal content. Small states are rendered every
//! time; it is cheaper than looking them up.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;

use crate::state::wire::render_state;
use crate::state::{ConnectionId, StoredState};

/// States whose rendering is at least this large are kept.
const LARGE: usize = 64 * 1024;

/// Rendered `ConnectionState` bodies of large states.
pub struct RenderCache {
    budget: usize,
    inner: Mutex<VecDeque<(ConnectionId, Arc<StoredState>, Bytes)>>,
}

impl RenderCache {
    /// A cache of at most `budget` bytes of rendered bodies.
    pub fn new(budget: usize) -> Self {
        Self { budget, inner: Mutex::default() }
    }

    /// The body of `state`, rendered now or earlier.
    pub fn render(&self, id: ConnectionId, state: &Arc<StoredState>) -> Bytes {
        let approximate: usize = state.entries.iter().map(|(_, blob)| blob.len()).sum();
        if approximate < LARGE / 2 || self.budget == 0 {
            return Bytes::from(render_state(id, state));
        }
        if let Ok(inner) = self.inner.lock() {
            if let Some((_, _, body)) = inner.iter().find(|(i, s, _)| *i == id && Arc::ptr_eq(s, state)) {
                return body.clone();
            }
        }
        let body = Bytes::from(render_state(id, state));
        if body.len() >= LARGE && body.len() <= self.budget / 4 {
            if let Ok(mut inner) = self.inner.lock() {
                inner.retain(|(i, _, _)| *i != id);
                inner.push_back((id, state.clone(), body.clone()));
                let mut total: usize = inner.iter().map(|(_, _, b)| b.len()).sum();
                while total > self.budget {
                    let Some((_, _, oldest)) = inner.pop_front() else { break };
                    total -= oldest.len();
                }
            }
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Blob, EntryKey, StateType};

    fn large() -> Arc<StoredState> {
        let blob = Blob::from_json(&format!("\"{}\"", "x".repeat(100_000)));
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
        let state = large();
        let first = cache.render(id, &state);
        let again = cache.render(id, &state);
        assert_eq!(first.as_ptr(), again.as_ptr());
        let other = large();
        assert_ne!(cache.render(id, &other).as_ptr(), first.as_ptr());
        assert_eq!(cache.render(id, &other), first);
    }
}
