//! [`KeyedLocks`]: one async mutex per key (a repository, a blob digest), created on first use
//! and dropped once nobody holds or waits for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Waits for and takes the lock of `key`.
    pub async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        self.lock_for(key).lock_owned().await
    }

    /// The lock of `key`. Entries nobody holds are dropped on the way, so the map stays as small
    /// as the number of locks in use rather than growing with every key ever seen.
    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.retain(|k, lock| k == key || Arc::strong_count(lock) > 1);
        locks.entry(key.to_owned()).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_are_shared_while_held_and_dropped_once_free() {
        let locks = KeyedLocks::default();
        let a = locks.lock_for("a");
        assert!(Arc::ptr_eq(&a, &locks.lock_for("a")), "one lock per key");
        drop(locks.lock_for("b"));
        let _c = locks.lock_for("c");
        let keys: std::collections::BTreeSet<String> = locks
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["a", "c"].map(String::from).into(), "b is held by nobody");
        assert!(Arc::ptr_eq(&a, &locks.lock_for("a")), "a held lock survives pruning");
    }

    #[tokio::test]
    async fn a_held_key_excludes_others_and_other_keys_do_not_wait() {
        let locks = Arc::new(KeyedLocks::default());
        let held = locks.lock("d1").await;
        let other = tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock("d2")).await;
        assert!(other.is_ok(), "another key is free");
        let waiter = tokio::spawn({
            let locks = Arc::clone(&locks);
            async move {
                let _g = locks.lock("d1").await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the same key waits");
        drop(held);
        waiter.await.expect("waiter gets the lock once it is released");
    }
}
