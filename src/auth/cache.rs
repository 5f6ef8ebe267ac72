//! What authentication remembers between requests, so that a client presenting the same
//! credentials again costs a hash-map lookup instead of a signature verification and a catalog
//! read:
//! - verified registry tokens: SHA-256 of the token → its claims (the signature, issuer,
//!   audience and use checked once; times are checked on every use, as [`jwt::verify`] would);
//! - identities: a user by name, an API token by id or by its secret's hash → what the catalog
//!   said of it.
//!
//! Invariants:
//! - Only what the catalog or the signature accepted is kept, never a refusal: a revoked token,
//!   a removed user or a wrong password is looked up again every time, so nothing refused can
//!   become accepted through the cache, and nothing accepted stays accepted after a change.
//! - Every identity entry carries the credentials generation ([`Catalog::auth_epoch`]) read
//!   *before* the catalog was: a change committed after that read moves the generation, and an
//!   entry tagged older than the current generation is never used. In this process the
//!   generation moves before the request that made the change is answered; a change by the CLI
//!   or another process is seen within the catalog's checkpoint interval (100 ms), and the CLI
//!   waits that long before it returns.
//! - Verified tokens need no generation: what they stand for is looked up in the identity
//!   cache, under the generation, on every use.
//! - Bounded: at most [`MAX_ENTRIES`] entries per map (and tokens of at most
//!   [`MAX_TOKEN_BYTES`]); a full map first drops what has expired,
//!   then everything (the next requests repopulate it). Each entry also has its own deadline,
//!   so no identity outlives [`IDENTITY_TTL_SECS`] even if no generation moves.
//!
//! [`Catalog::auth_epoch`]: crate::catalog::Catalog::auth_epoch
//! [`jwt::verify`]: super::jwt::verify

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::Claims;
use super::scope::Grant;

/// Largest number of entries in each map.
pub const MAX_ENTRIES: usize = 20_000;
/// Largest registry token remembered (a token for a push's few repositories is under 1 KiB),
/// so that the verified-token map holds at most `MAX_ENTRIES` × this much of claims.
pub const MAX_TOKEN_BYTES: usize = 4096;
/// Longest an identity is trusted without reading the catalog again.
pub const IDENTITY_TTL_SECS: u64 = 60;

/// A user as the catalog described them.
#[derive(Debug, Clone)]
pub struct CachedUser {
    pub name: String,
    pub admin: bool,
    pub credentials_epoch: i64,
    /// The argon2 PHC string (compared with what a remembered password verified against).
    pub password_hash: String,
}

/// An API token as the catalog described it (live when it was read).
#[derive(Debug, Clone)]
pub struct CachedToken {
    pub id: i64,
    pub user: String,
    pub name: String,
    pub user_admin: bool,
    pub expires_at: Option<i64>,
    pub scopes: Vec<Grant>,
}

struct Entry<V> {
    value: V,
    epoch: u64,
    /// Unix seconds after which the entry is not used.
    until: u64,
}

/// One bounded map of entries tagged with a generation and a deadline.
struct Map<K, V> {
    entries: Mutex<HashMap<K, Entry<V>>>,
}

impl<K: Eq + Hash, V: Clone> Map<K, V> {
    fn new() -> Self {
        Map {
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The value under `key`, if it was stored under generation `epoch` and `now` is before its
    /// deadline. A stale entry is removed.
    fn get(&self, key: &K, epoch: u64, now: u64) -> Option<V> {
        let mut entries = self.entries.lock().ok()?;
        match entries.get(key) {
            Some(e) if e.epoch == epoch && now <= e.until => Some(e.value.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: K, value: V, epoch: u64, until: u64, now: u64) {
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            entries.retain(|_, e| now <= e.until);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, Entry { value, epoch, until });
    }

    fn remove(&self, key: &K) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }
}

/// The caches of one [`super::Auth`].
pub struct AuthCache {
    /// SHA-256 of a registry token → its verified claims (generation unused: 0).
    tokens: Map<[u8; 32], Arc<Claims>>,
    users: Map<String, CachedUser>,
    /// API token id → the token.
    api_tokens: Map<i64, CachedToken>,
    /// SHA-256 (hex) of an API token secret → the token.
    secrets: Map<String, CachedToken>,
}

impl AuthCache {
    pub fn new() -> Self {
        AuthCache {
            tokens: Map::new(),
            users: Map::new(),
            api_tokens: Map::new(),
            secrets: Map::new(),
        }
    }

    pub fn token(&self, key: &[u8; 32], now: u64) -> Option<Arc<Claims>> {
        self.tokens.get(key, 0, now)
    }

    /// Remembers a token whose signature verified, until `until` (its expiry plus whatever
    /// grace could still accept it; times are checked again on every use).
    pub fn remember_token(&self, key: [u8; 32], claims: Arc<Claims>, until: u64, now: u64) {
        self.tokens.insert(key, claims, 0, until, now);
    }

    pub fn user(&self, name: &str, epoch: u64, now: u64) -> Option<CachedUser> {
        self.users.get(&name.to_owned(), epoch, now)
    }

    pub fn remember_user(&self, user: CachedUser, epoch: u64, now: u64) {
        self.users.insert(
            user.name.clone(),
            user,
            epoch,
            now.saturating_add(IDENTITY_TTL_SECS),
            now,
        );
    }

    pub fn api_token(&self, id: i64, epoch: u64, now: u64) -> Option<CachedToken> {
        self.api_tokens.get(&id, epoch, now)
    }

    pub fn secret(&self, secret_hash: &str, epoch: u64, now: u64) -> Option<CachedToken> {
        self.secrets.get(&secret_hash.to_owned(), epoch, now)
    }

    /// Remembers a live API token by id and, when given, by its secret's hash.
    pub fn remember_api_token(&self, token: CachedToken, secret_hash: Option<String>, epoch: u64, now: u64) {
        let until = now.saturating_add(IDENTITY_TTL_SECS);
        if let Some(hash) = secret_hash {
            self.secrets.insert(hash, token.clone(), epoch, until, now);
        }
        self.api_tokens.insert(token.id, token, epoch, until, now);
    }

    /// Forgets an API token found unusable (expired) by id and secret hash.
    pub fn forget_api_token(&self, id: i64, secret_hash: Option<&str>) {
        self.api_tokens.remove(&id);
        if let Some(hash) = secret_hash {
            self.secrets.remove(&hash.to_owned());
        }
    }
}

impl Default for AuthCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> CachedUser {
        CachedUser {
            name: name.into(),
            admin: false,
            credentials_epoch: 7,
            password_hash: String::new(),
        }
    }

    #[test]
    fn an_entry_from_an_older_generation_or_past_its_deadline_is_not_used() {
        let cache = AuthCache::new();
        cache.remember_user(user("alice"), 3, 1_000);
        assert!(cache.user("alice", 3, 1_000).is_some());
        assert!(cache.user("alice", 3, 1_000 + IDENTITY_TTL_SECS).is_some());
        assert!(
            cache.user("alice", 3, 1_001 + IDENTITY_TTL_SECS).is_none(),
            "past its deadline"
        );
        cache.remember_user(user("alice"), 3, 1_000);
        assert!(cache.user("alice", 4, 1_000).is_none(), "a newer generation");
        assert!(cache.user("alice", 3, 1_000).is_none(), "the stale entry was dropped");
    }

    #[test]
    fn a_full_map_drops_expired_entries_then_everything() {
        let map: Map<u64, u64> = Map::new();
        for i in 0..MAX_ENTRIES as u64 {
            // Half of them already expired at time 100.
            map.insert(i, i, 0, if i % 2 == 0 { 50 } else { 500 }, 10);
        }
        map.insert(u64::MAX, 1, 0, 500, 100);
        assert_eq!(map.len(), MAX_ENTRIES / 2 + 1, "the expired half went");
        for i in 0..MAX_ENTRIES as u64 {
            map.insert(i + 1_000_000, i, 0, 500, 100);
        }
        assert!(map.len() <= MAX_ENTRIES, "never above the bound");
    }
}
