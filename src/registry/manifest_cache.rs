//! Manifest lookups remembered between requests: (repository, tag or digest) → the manifest's
//! digest, media type, size and bytes, so that a client pulling the same image again costs a
//! hash-map lookup instead of a trip to a catalog reader thread.
//!
//! Invariants:
//! - Every entry carries the catalog's content generation ([`Catalog::content_epoch`]) read
//!   *before* the lookup that filled it, and is used only while the generation is unchanged.
//!   Triggers move the generation in every transaction that adds, moves or removes a tag or
//!   adds, changes or removes a manifest (migration 11), and the catalog publishes a commit's
//!   generation before it answers the writer; so a lookup answered from here is one the
//!   catalog would have answered the same way at some moment after the request arrived. A
//!   change made by another process (the CLI's collector, another replica) is seen within the
//!   catalog's checkpoint interval (100 ms).
//! - Only manifests found are remembered (never "unknown"), and only up to [`MAX_BYTES`] each.
//! - Bounded: at most [`MAX_ENTRIES`] entries and [`MAX_TOTAL_BYTES`] of manifest bytes; a full
//!   cache is emptied (the next requests refill it with what is pulled now).
//!
//! The generation is global, not per repository: any push anywhere empties the cache for
//! practical purposes. It serves read-mostly traffic (CI jobs pulling the same images, HEADs
//! before a push); under a stream of pushes it costs a map lookup per miss and nothing else.
//!
//! [`Catalog::content_epoch`]: crate::catalog::Catalog::content_epoch

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::catalog::ManifestRecord;

/// Largest manifest remembered.
pub const MAX_BYTES: usize = 64 * 1024;
/// Most entries.
pub const MAX_ENTRIES: usize = 8192;
/// Most manifest bytes held in all.
pub const MAX_TOTAL_BYTES: usize = 32 * 1024 * 1024;

/// A remembered manifest (always with its bytes).
#[derive(Debug)]
pub struct Cached {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub content: Vec<u8>,
}

struct State {
    /// Key: `<repository>\n<reference>` (neither can hold a newline).
    entries: HashMap<String, (Arc<Cached>, u64)>,
    bytes: usize,
}

pub struct ManifestCache {
    state: Mutex<State>,
}

fn key(repo: &str, reference: &str) -> String {
    let mut k = String::with_capacity(repo.len() + reference.len() + 1);
    k.push_str(repo);
    k.push('\n');
    k.push_str(reference);
    k
}

impl ManifestCache {
    pub fn new() -> Self {
        ManifestCache {
            state: Mutex::new(State {
                entries: HashMap::new(),
                bytes: 0,
            }),
        }
    }

    /// The manifest `reference` names in `repo`, if remembered under generation `epoch`.
    pub fn get(&self, repo: &str, reference: &str, epoch: u64) -> Option<Arc<Cached>> {
        let mut state = self.state.lock().ok()?;
        let k = key(repo, reference);
        match state.entries.get(&k) {
            Some((m, e)) if *e == epoch => Some(Arc::clone(m)),
            Some(_) => {
                if let Some((m, _)) = state.entries.remove(&k) {
                    state.bytes = state.bytes.saturating_sub(m.content.len());
                }
                None
            }
            None => None,
        }
    }

    /// Remembers what a lookup under generation `epoch` found (a manifest with its bytes).
    pub fn insert(&self, repo: &str, reference: &str, record: &ManifestRecord, epoch: u64) {
        let Some(content) = record.content.as_ref().filter(|c| c.len() <= MAX_BYTES) else {
            return;
        };
        let Ok(mut state) = self.state.lock() else { return };
        if state.entries.len() >= MAX_ENTRIES || state.bytes + content.len() > MAX_TOTAL_BYTES {
            state.entries.clear();
            state.bytes = 0;
        }
        let cached = Arc::new(Cached {
            digest: record.digest.clone(),
            media_type: record.media_type.clone(),
            size: record.size,
            content: content.clone(),
        });
        state.bytes += content.len();
        if let Some((old, _)) = state.entries.insert(key(repo, reference), (cached, epoch)) {
            state.bytes = state.bytes.saturating_sub(old.content.len());
        }
    }
}

impl Default for ManifestCache {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(bytes: usize) -> ManifestRecord {
        ManifestRecord {
            digest: "sha256:00".into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: bytes as u64,
            content: Some(vec![b'x'; bytes]),
        }
    }

    #[test]
    fn an_entry_serves_only_its_own_generation() {
        let cache = ManifestCache::new();
        cache.insert("a/b", "v1", &record(10), 5);
        assert!(cache.get("a/b", "v1", 5).is_some());
        assert!(cache.get("a/b", "v2", 5).is_none());
        assert!(cache.get("a/b\nv1", "", 5).is_none());
        assert!(cache.get("a/b", "v1", 6).is_none(), "a newer generation");
        assert!(cache.get("a/b", "v1", 5).is_none(), "the stale entry is gone");
    }

    #[test]
    fn only_found_manifests_within_the_bounds_are_kept() {
        let cache = ManifestCache::new();
        let mut head = record(10);
        head.content = None;
        cache.insert("a/b", "v1", &head, 1);
        assert!(cache.get("a/b", "v1", 1).is_none(), "no bytes, nothing kept");
        cache.insert("a/b", "big", &record(MAX_BYTES + 1), 1);
        assert!(cache.get("a/b", "big", 1).is_none());
        for i in 0..(MAX_ENTRIES + 10) {
            cache.insert("a/b", &format!("t{i}"), &record(100), 1);
        }
        let state = cache.state.lock().unwrap();
        assert!(state.entries.len() <= MAX_ENTRIES);
        assert_eq!(state.bytes, state.entries.len() * 100);
    }
}
