//! An async mutex per key, created on first use and forgotten when no one
//! holds or waits for it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// Locks by key; keys that nobody holds take no memory.
pub struct KeyedLock<K> {
    locks: Arc<Mutex<HashMap<K, Arc<AsyncMutex<()>>>>>,
}

/// Another handle on the same locks.
impl<K> Clone for KeyedLock<K> {
    fn clone(&self) -> Self {
        Self { locks: self.locks.clone() }
    }
}

impl<K> Default for KeyedLock<K> {
    fn default() -> Self {
        Self { locks: Arc::default() }
    }
}

/// Held while the key is locked.
pub struct KeyedGuard<K: Eq + Hash> {
    // Declared first so it is released before `_cleanup` looks at the count.
    _held: OwnedMutexGuard<()>,
    _cleanup: Cleanup<K>,
}

/// Forgets the key's mutex once nobody holds or waits for it; runs when a
/// guard is released and also when a waiter gives up (its future dropped).
struct Cleanup<K: Eq + Hash> {
    key: K,
    locks: Arc<Mutex<HashMap<K, Arc<AsyncMutex<()>>>>>,
}

impl<K: Eq + Hash> Drop for Cleanup<K> {
    fn drop(&mut self) {
        let mut locks = self.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // The map's reference is the last one: nobody holds or waits.
        if locks.get(&self.key).is_some_and(|m| Arc::strong_count(m) == 1) {
            locks.remove(&self.key);
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedLock<K> {
    /// Waits for and takes the lock of `key`.
    pub async fn lock(&self, key: K) -> KeyedGuard<K> {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            locks.entry(key.clone()).or_default().clone()
        };
        let cleanup = Cleanup { key, locks: self.locks.clone() };
        let held = mutex.lock_owned().await;
        KeyedGuard { _held: held, _cleanup: cleanup }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_is_forgotten_once_released() {
        let locks = KeyedLock::default();
        let guard = locks.lock(1).await;
        assert_eq!(locks.locks.lock().unwrap().len(), 1);
        drop(guard);
        assert!(locks.locks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let locks = KeyedLock::default();
        let guard = locks.lock(7).await;
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(1), locks.lock(7)).await;
        assert!(gave_up.is_err());
        drop(guard);
        assert!(locks.locks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn one_key_is_held_by_one_task_at_a_time() {
        let locks = Arc::new(KeyedLock::default());
        let guard = locks.lock("a").await;
        let other = locks.clone();
        let waiter = tokio::spawn(async move {
            let _guard = other.lock("a").await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        // A different key is not blocked.
        drop(locks.lock("b").await);
        drop(guard);
        waiter.await.unwrap();
        assert!(locks.locks.lock().unwrap().is_empty());
    }
}
