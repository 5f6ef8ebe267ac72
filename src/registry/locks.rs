//! [`KeyedLocks`]: one async mutex per key (a repository, a blob digest), created on first use
//! and dropped once nobody holds or waits for it; and [`SharedLocks`], the same locks made to
//! hold across every replica of a PostgreSQL catalog.
//!
//! A [`SharedLocks`] lock is the in-process lock of its key, then, when the catalog is
//! PostgreSQL, the database lock of that key (`catalog::locks`). The in-process lock comes
//! first because the replica's database locks all live in one session, and this replica's
//! tasks should queue on an async mutex (fairly, without polling) rather than on the database.
//! With SQLite there is no database lock: a lock is exactly one async mutex, as it always was.
//!
//! Deadlock freedom: a holder of one key takes its in-process lock, then its database lock. A
//! holder of several ([`SharedLocks::lock_all`]) takes every in-process lock in the order given,
//! then the database locks in ascending key order, each key once. A holder never waits for an
//! in-process lock while it holds a database lock, and database locks are always taken in one
//! order, so neither two keys sharing a database key nor two replicas can make a cycle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use crate::catalog::locks::{LockGuard, LockService};
use crate::error::Result;

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

/// Per-key locks that exclude across replicas when the catalog is PostgreSQL (see the module
/// doc).
pub struct SharedLocks {
    local: KeyedLocks,
    /// The database locks; `None` on SQLite.
    shared: Option<Database>,
}

/// The database side of [`SharedLocks`].
struct Database {
    service: LockService,
    /// The database key of a lock's name.
    key_of: fn(&str) -> i64,
}

impl SharedLocks {
    /// Locks named `key_of` names them in the database of `service`; with no service (SQLite),
    /// in-process locks only.
    pub fn new(service: Option<LockService>, key_of: fn(&str) -> i64) -> SharedLocks {
        SharedLocks {
            local: KeyedLocks::default(),
            shared: service.map(|service| Database { service, key_of }),
        }
    }

    /// Waits for and takes the lock of `name`. Fails only when the database lock cannot be
    /// taken (the lock connection is down; see `catalog::locks`).
    pub async fn lock(&self, name: &str) -> Result<SharedGuard> {
        let local = self.local.lock(name).await;
        let db = match &self.shared {
            None => None,
            Some(d) => Some(d.service.acquire((d.key_of)(name)).await?),
        };
        Ok(SharedGuard { db, _local: local })
    }

    /// Waits for and takes the locks of every name of `names`, in their order (callers that
    /// may hold several at once pass them sorted); see the module doc.
    pub async fn lock_all(&self, names: &[String]) -> Result<SharedGuards> {
        let mut local = Vec::with_capacity(names.len());
        for name in names {
            local.push(self.local.lock(name).await);
        }
        let mut db = Vec::new();
        if let Some(d) = &self.shared {
            let mut keys: Vec<i64> = names.iter().map(|n| (d.key_of)(n)).collect();
            keys.sort_unstable();
            keys.dedup();
            db.reserve(keys.len());
            for key in keys {
                db.push(d.service.acquire(key).await?);
            }
        }
        Ok(SharedGuards { db, _local: local })
    }
}

/// A [`SharedLocks`] lock, released when dropped (the database lock first).
pub struct SharedGuard {
    db: Option<LockGuard>,
    _local: OwnedMutexGuard<()>,
}

impl SharedGuard {
    /// Whether the database lock was lost (its connection broke) since it was taken: another
    /// replica may hold it now (see `catalog::locks`). Never on SQLite.
    pub fn is_lost(&self) -> bool {
        self.db.as_ref().is_some_and(LockGuard::is_lost)
    }
}

/// The locks of [`SharedLocks::lock_all`], released when dropped.
pub struct SharedGuards {
    db: Vec<LockGuard>,
    _local: Vec<OwnedMutexGuard<()>>,
}

impl SharedGuards {
    /// Whether any of the database locks was lost (see [`SharedGuard::is_lost`]).
    pub fn is_lost(&self) -> bool {
        self.db.iter().any(LockGuard::is_lost)
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

    /// On SQLite a shared lock is the in-process lock alone.
    #[tokio::test]
    async fn without_a_database_shared_locks_are_the_in_process_locks() {
        let locks = Arc::new(SharedLocks::new(None, crate::catalog::locks::blob_key));
        let held = locks.lock("d1").await.unwrap();
        assert!(!held.is_lost());
        let waiter = tokio::spawn({
            let locks = Arc::clone(&locks);
            async move {
                let _g = locks.lock("d1").await.unwrap();
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the same key waits");
        let names = ["d2".to_owned(), "d3".to_owned()];
        let all = tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock_all(&names))
            .await
            .expect("other keys are free")
            .unwrap();
        assert!(!all.is_lost());
        drop(held);
        waiter.await.expect("waiter gets the lock once it is released");
    }
}
