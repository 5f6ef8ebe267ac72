//! Merging two Spack buildcache indexes (the `index.spack` blob, see the parent module doc)
//! into one: a union by DAG hash.
//!
//! Used for a proxied buildcache, whose index is the upstream's index merged with the specs
//! cached locally (`registry::proxy::spack`). The inputs are the *primary* index (the
//! upstream's, up to `max_spack_index_size`, held once in memory by the caller) and the
//! *secondary* one (built from the local catalog). The output is written in pieces as it is
//! produced, never held whole:
//!
//! ```json
//! {"database":{"installs":{
//!    "<hash>":{"spec":<the node, byte for byte>,"ref_count":<n>,"in_buildcache":<bool>},…},
//!  "version":"<v>"}}
//! ```
//!
//! - The primary's entries come first, in its order, then the secondary's entries whose hash
//!   the primary does not list, in theirs. A hash in both keeps the primary's spec, or with
//!   `prefer_secondary` the secondary's (a hosted repository's own spec over a fallback's).
//! - A hash listed twice in one index (malformed JSON for Spack, whose parser keeps the last)
//!   keeps its first entry here, written once.
//! - `in_buildcache` is true if either index says so (the spec has a spec tag on one side).
//! - `ref_count` counts the listed nodes that depend on the node: a primary entry's is its own
//!   plus the secondary-only nodes with an edge to it; a secondary-only entry's is the
//!   secondary's own (a node the primary lists pulls its whole DAG into the primary, so no
//!   primary node depends on a secondary-only one).
//! - `version` is the lower of the two (a database of version 7 means some spec has an old
//!   layout; Spack reads both). Key order in JSON objects carries no meaning to Spack, so
//!   `installs` is written before `version`, which is known only at the end.
//!
//! The primary is read twice, streaming, by a visitor that never builds a tree of the whole
//! document: once to find which secondary hashes it lists (and to reject a malformed index
//! before anything is written), once to write it. Each entry's `spec` is borrowed from the
//! input as raw JSON; only the secondary-only specs are read again, streaming, for the hashes of
//! their dependency edges (nothing else of them is built in memory).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::BuildHasher;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a merge failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The primary (upstream) index is not a Spack index.
    #[error("the upstream index.spack is not a valid Spack index: {0}")]
    Primary(String),
    /// The secondary (local) index could not be read: a bug here, not bad input.
    #[error("the local Spack index could not be read: {0}")]
    Secondary(String),
    /// The consumer of the output went away.
    #[error("writing the merged index failed: {0}")]
    Output(String),
}

/// What a merge wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeStats {
    /// Entries taken from the primary index.
    pub primary: usize,
    /// Entries only the secondary index listed.
    pub secondary_only: usize,
    /// Bytes written.
    pub bytes: u64,
}

/// One entry of `installs`, its spec borrowed from the input.
struct Entry<'a> {
    spec: &'a RawValue,
    ref_count: i64,
    in_buildcache: bool,
}

#[derive(Deserialize)]
struct RawEntry<'a> {
    #[serde(borrow)]
    spec: &'a RawValue,
    #[serde(default)]
    ref_count: i64,
    #[serde(default)]
    in_buildcache: bool,
}

/// Checks that `data` is a Spack index (`{"database":{"installs":{hash:{"spec":{…},…}}}}`),
/// without building it in memory. Returns how many entries it lists.
pub fn validate(data: &[u8]) -> Result<usize, String> {
    let mut n = 0usize;
    walk(data, |_, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// Merges `primary` and `secondary` (see the module doc), handing the output to `out` in
/// pieces.
pub fn merge(
    primary: &[u8],
    secondary: &[u8],
    prefer_secondary: bool,
    out: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<MergeStats, MergeError> {
    // The secondary, whole (it is built from the local catalog: the specs cached here).
    let mut local: Vec<(String, Entry<'_>)> = Vec::new();
    let local_version = walk(secondary, |hash, e| {
        local.push((hash, e));
        Ok(())
    })
    .map_err(MergeError::Secondary)?;
    // A hash listed twice keeps its first entry (on either side).
    let mut by_hash: HashMap<&str, usize> = HashMap::with_capacity(local.len());
    let mut repeated = vec![false; local.len()];
    for (i, (h, _)) in local.iter().enumerate() {
        match by_hash.entry(h.as_str()) {
            std::collections::hash_map::Entry::Occupied(_) => repeated[i] = true,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
            }
        }
    }

    // Pass 1 over the primary: which local hashes it lists (and whether it is valid at all),
    // and which of its hashes may be listed twice (a 64-bit fingerprint per entry; the few
    // whose fingerprint was seen before are kept by name and checked exactly in pass 2).
    let mut in_primary = vec![false; local.len()];
    let fingerprint = std::collections::hash_map::RandomState::new();
    let mut fingerprints: HashSet<u64> = HashSet::new();
    let mut maybe_repeated: HashSet<String> = HashSet::new();
    let primary_version = walk(primary, |hash, _| {
        if let Some(&i) = by_hash.get(hash.as_str()) {
            in_primary[i] = true;
        }
        if !fingerprints.insert(fingerprint.hash_one(hash.as_str())) {
            maybe_repeated.insert(hash);
        }
        Ok(())
    })
    .map_err(MergeError::Primary)?;
    drop(fingerprints);

    // Edges from local-only nodes to primary nodes raise the latter's ref_count.
    let mut extra_refs: HashMap<String, i64> = HashMap::new();
    for (((_, e), listed), again) in local.iter().zip(&in_primary).zip(&repeated) {
        if !*listed && !*again {
            for_each_dependency(e.spec, &mut |dep| match extra_refs.get_mut(dep) {
                Some(n) => *n = n.saturating_add(1),
                None => {
                    extra_refs.insert(dep.to_owned(), 1);
                }
            });
        }
    }

    let mut sink = Sink { out, written: 0 };
    sink.write(br#"{"database":{"installs":{"#)?;
    let mut first = true;
    let mut primary_entries = 0usize;
    let mut failed: Option<MergeError> = None;
    let mut emitted_repeats: HashSet<String> = HashSet::new();
    let walked = walk(primary, |hash, e| {
        if maybe_repeated.contains(&hash) && !emitted_repeats.insert(hash.clone()) {
            // Listed before: the first entry was written.
            return Ok(());
        }
        let local_entry = by_hash.get(hash.as_str()).map(|&i| &local[i].1);
        let ref_count = e.ref_count.saturating_add(extra_refs.get(&hash).copied().unwrap_or(0));
        let in_buildcache = e.in_buildcache || local_entry.is_some_and(|l| l.in_buildcache);
        primary_entries += 1;
        let spec = match local_entry {
            Some(l) if prefer_secondary => l.spec,
            _ => e.spec,
        };
        sink.entry(&mut first, &hash, spec, ref_count, in_buildcache)
            .map_err(|err| {
                let text = err.to_string();
                failed = Some(err);
                text
            })
    });
    if let Some(err) = failed {
        return Err(err);
    }
    walked.map_err(MergeError::Primary)?;
    let mut secondary_only = 0usize;
    for (((hash, e), listed), again) in local.iter().zip(&in_primary).zip(&repeated) {
        if !*listed && !*again {
            secondary_only += 1;
            sink.entry(&mut first, hash, e.spec, e.ref_count, e.in_buildcache)?;
        }
    }
    let version = lower_version(primary_version, local_version);
    let version = serde_json::Value::String(version).to_string();
    sink.write(format!("}},\"version\":{version}}}}}").as_bytes())?;
    Ok(MergeStats {
        primary: primary_entries,
        secondary_only,
        bytes: sink.written,
    })
}

/// Writes the output and counts it.
struct Sink<'o> {
    out: &'o mut dyn FnMut(&[u8]) -> Result<(), String>,
    written: u64,
}

impl Sink<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), MergeError> {
        self.written += data.len() as u64;
        (self.out)(data).map_err(MergeError::Output)
    }

    /// One `installs` entry, written straight to the output (the spec is never copied into
    /// a buffer of its own).
    fn entry(
        &mut self,
        first: &mut bool,
        hash: &str,
        spec: &RawValue,
        ref_count: i64,
        in_buildcache: bool,
    ) -> Result<(), MergeError> {
        if !std::mem::take(first) {
            self.write(b",")?;
        }
        let key = serde_json::Value::String(hash.to_owned()).to_string();
        self.write(key.as_bytes())?;
        self.write(br#":{"spec":"#)?;
        self.write(spec.get().as_bytes())?;
        self.write(format!(",\"ref_count\":{ref_count},\"in_buildcache\":{in_buildcache}}}").as_bytes())
    }
}

/// The lower of two database versions ("7" and "8": "7"); a version that is not a number
/// loses to one that is; none at all gives "8".
fn lower_version(a: Option<String>, b: Option<String>) -> String {
    let number = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<u64>().ok());
    match (number(&a), number(&b)) {
        (Some(x), Some(y)) => x.min(y).to_string(),
        (Some(x), None) => x.to_string(),
        (None, Some(y)) => y.to_string(),
        (None, None) => a.or(b).unwrap_or_else(|| "8".to_owned()),
    }
}

/// `text` cut to at most 64 bytes (at a character boundary), for messages and logs: a key
/// from an upstream index can be any length.
fn shortened(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Longest DAG hash counted as a dependency (Spack's are 32 characters); longer ones are
/// ignored, so that the edge counts stay bounded by the number of nodes, not by their text.
const MAX_HASH_LEN: usize = 128;

/// Calls `each` with every DAG hash node `spec` depends on: `dependencies` as a list of
/// `{"hash":…}` (spec format 2 and later) or an object of them by name (older formats);
/// anything else, or an element without a string `hash`, names none. Streaming: nothing but
/// the hash strings is kept (the rest of `dependencies`, however large, is skipped), and
/// nothing is allocated per element.
fn for_each_dependency(spec: &RawValue, each: &mut dyn FnMut(&str)) {
    let mut de = serde_json::Deserializer::from_str(spec.get());
    // A malformed spec names the dependencies read before the fault (the primary's specs are
    // only checked to be objects; a bad one miscounts, never fails the merge).
    let _ = de.deserialize_map(SpecDeps { each });
}

/// A spec object: only its `dependencies` are looked at.
struct SpecDeps<'f> {
    each: &'f mut dyn FnMut(&str),
}

impl<'de> Visitor<'de> for SpecDeps<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a spec object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(deps) = map.next_key_seed(KeyIs("dependencies"))? {
            if deps {
                map.next_value_seed(DepList { each: &mut *self.each })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Whether a map key is the given name, read without allocating (unless escaped).
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// `dependencies`: a list or an object of dependency nodes; anything else is skipped.
struct DepList<'f> {
    each: &'f mut dyn FnMut(&str),
}

impl<'de> DeserializeSeed<'de> for DepList<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DepList<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list or an object of dependencies")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(DepNode { each: &mut *self.each })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(DepNode { each: &mut *self.each })?;
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

/// One dependency node: its string `hash` is handed on, the rest skipped. A node that is not
/// an object names nothing.
struct DepNode<'f> {
    each: &'f mut dyn FnMut(&str),
}

impl<'de> DeserializeSeed<'de> for DepNode<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DepNode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a dependency")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = false;
        while let Some(hash) = map.next_key_seed(KeyIs("hash"))? {
            if hash && !seen {
                seen = true;
                let text = map.next_value::<HashText<'de>>()?;
                if let Some(h) = text.0.filter(|h| !h.is_empty() && h.len() <= MAX_HASH_LEN) {
                    (self.each)(&h);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

/// A `hash` value: its text if it is a string (borrowed when it has no escapes), else
/// nothing (skipped without being built).
struct HashText<'de>(Option<std::borrow::Cow<'de, str>>);

impl<'de> Deserialize<'de> for HashText<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = HashText<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a DAG hash")
            }

            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(HashText(Some(std::borrow::Cow::Borrowed(v))))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(HashText(
                    (v.len() <= MAX_HASH_LEN).then(|| std::borrow::Cow::Owned(v.to_owned())),
                ))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(HashText(None))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(HashText(None))
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(HashText(None))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(HashText(None))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(HashText(None))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(HashText(None))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(HashText(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Walks the entries of an index in document order, calling `each` with every hash and entry;
/// returns the database's `version`. Never builds the document in memory.
fn walk<'a, F>(data: &'a [u8], mut each: F) -> Result<Option<String>, String>
where
    F: FnMut(String, Entry<'a>) -> Result<(), String>,
{
    let mut de = serde_json::Deserializer::from_slice(data);
    let version = de.deserialize_map(Top { each: &mut each }).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(version)
}

struct Top<'f, F> {
    each: &'f mut F,
}

impl<'de, F> Visitor<'de> for Top<'_, F>
where
    F: FnMut(String, Entry<'de>) -> Result<(), String>,
{
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with a \"database\" object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut version = None;
        let mut seen = false;
        while let Some(key) = map.next_key::<String>()? {
            if key == "database" && !seen {
                seen = true;
                version = map.next_value_seed(Database { each: &mut *self.each })?;
            } else if key == "database" {
                return Err(de::Error::custom("two \"database\" objects"));
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        if !seen {
            return Err(de::Error::custom("no \"database\" object"));
        }
        Ok(version)
    }
}

struct Database<'f, F> {
    each: &'f mut F,
}

impl<'de, F> DeserializeSeed<'de> for Database<'_, F>
where
    F: FnMut(String, Entry<'de>) -> Result<(), String>,
{
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F> Visitor<'de> for Database<'_, F>
where
    F: FnMut(String, Entry<'de>) -> Result<(), String>,
{
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a \"database\" object with \"installs\"")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut version = None;
        let mut installs = false;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "version" => {
                    version = match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(s) => Some(s),
                        serde_json::Value::Number(n) => Some(n.to_string()),
                        _ => return Err(de::Error::custom("\"version\" is neither a string nor a number")),
                    }
                }
                "installs" if !installs => {
                    installs = true;
                    map.next_value_seed(Installs { each: &mut *self.each })?;
                }
                "installs" => return Err(de::Error::custom("two \"installs\" objects")),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        if !installs {
            return Err(de::Error::custom("no \"installs\" object"));
        }
        Ok(version)
    }
}

struct Installs<'f, F> {
    each: &'f mut F,
}

impl<'de, F> DeserializeSeed<'de> for Installs<'_, F>
where
    F: FnMut(String, Entry<'de>) -> Result<(), String>,
{
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F> Visitor<'de> for Installs<'_, F>
where
    F: FnMut(String, Entry<'de>) -> Result<(), String>,
{
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an \"installs\" object of entries by DAG hash")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(hash) = map.next_key::<String>()? {
            if hash.is_empty() {
                return Err(de::Error::custom("an entry with an empty hash"));
            }
            let e: RawEntry<'de> = map.next_value()?;
            if !e.spec.get().starts_with('{') {
                return Err(de::Error::custom(format!(
                    "the spec of {} is not an object",
                    shortened(&hash)
                )));
            }
            let entry = Entry {
                spec: e.spec,
                ref_count: e.ref_count,
                in_buildcache: e.in_buildcache,
            };
            (self.each)(hash, entry).map_err(de::Error::custom)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn run(primary: &Value, secondary: &Value) -> Value {
        let (p, s) = (primary.to_string(), secondary.to_string());
        let mut out = Vec::new();
        let stats = merge(p.as_bytes(), s.as_bytes(), false, &mut |d| {
            out.extend_from_slice(d);
            Ok(())
        })
        .expect("merges");
        assert_eq!(stats.bytes, out.len() as u64);
        serde_json::from_slice(&out).expect("output is JSON")
    }

    fn node(name: &str, hash: &str, deps: &[&str]) -> Value {
        let deps: Vec<Value> = deps
            .iter()
            .map(|d| json!({"name": "x", "hash": d, "parameters": {"deptypes": ["link"]}}))
            .collect();
        json!({"name": name, "version": "1", "hash": hash, "dependencies": deps})
    }

    #[test]
    fn a_union_by_hash_keeps_the_primary_spec_and_recounts_references() {
        let primary = json!({"database": {"version": "8", "installs": {
            "aaa": {"spec": node("a", "aaa", &["ccc"]), "ref_count": 0, "in_buildcache": true},
            "ccc": {"spec": node("c", "ccc", &[]), "ref_count": 1, "in_buildcache": false},
            "shared": {"spec": node("primary-wins", "shared", &[]), "ref_count": 0, "in_buildcache": false}
        }}});
        let secondary = json!({"database": {"version": "7", "installs": {
            "bbb": {"spec": node("b", "bbb", &["ccc", "ddd"]), "ref_count": 0, "in_buildcache": true},
            "ddd": {"spec": node("d", "ddd", &[]), "ref_count": 1, "in_buildcache": true},
            "shared": {"spec": node("secondary", "shared", &[]), "ref_count": 0, "in_buildcache": true}
        }}});
        let merged = run(&primary, &secondary);
        let installs = merged["database"]["installs"].as_object().expect("installs");
        let mut keys: Vec<&str> = installs.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["aaa", "bbb", "ccc", "ddd", "shared"]);
        assert_eq!(merged["database"]["version"], "7");
        assert_eq!(installs["ccc"]["ref_count"], 2, "a's edge and the local-only b's");
        assert_eq!(installs["ddd"]["ref_count"], 1);
        assert_eq!(installs["shared"]["spec"]["name"], "primary-wins");
        assert_eq!(
            installs["shared"]["in_buildcache"], true,
            "either side's spec tag counts"
        );
        assert_eq!(installs["ccc"]["in_buildcache"], false);
        assert_eq!(installs["bbb"]["spec"], node("b", "bbb", &["ccc", "ddd"]));
    }

    #[test]
    fn with_prefer_secondary_a_hash_in_both_keeps_the_secondary_spec() {
        let primary = json!({"database": {"installs": {
            "s": {"spec": node("fallback", "s", &[]), "ref_count": 0, "in_buildcache": true}
        }}});
        let secondary = json!({"database": {"installs": {
            "s": {"spec": node("hosted", "s", &[]), "ref_count": 0, "in_buildcache": true}
        }}});
        let (p, s) = (primary.to_string(), secondary.to_string());
        let mut out = Vec::new();
        merge(p.as_bytes(), s.as_bytes(), true, &mut |d| {
            out.extend_from_slice(d);
            Ok(())
        })
        .expect("merges");
        let merged: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(merged["database"]["installs"]["s"]["spec"]["name"], "hosted");
    }

    #[test]
    fn an_empty_secondary_gives_the_primary_back() {
        let primary = json!({"database": {"version": "8", "installs": {
            "aaa": {"spec": node("a", "aaa", &[]), "ref_count": 0, "in_buildcache": true}
        }}});
        let secondary = json!({"database": {"version": "8", "installs": {}}});
        assert_eq!(run(&primary, &secondary), primary);
    }

    #[test]
    fn malformed_primaries_are_refused_before_anything_is_written() {
        let secondary = json!({"database": {"version": "8", "installs": {}}}).to_string();
        for bad in [
            "",
            "not json",
            "[]",
            "{}",
            r#"{"database":{}}"#,
            r#"{"database":{"installs":[]}}"#,
            r#"{"database":{"installs":{"a":{"spec":1}}}}"#,
            r#"{"database":{"installs":{"a":{"ref_count":1}}}}"#,
            r#"{"database":{"installs":{"a":{"spec":{}}}}} trailing"#,
            r#"{"database":{"installs":{"a":{"spec":{}}"#,
        ] {
            let mut wrote = false;
            let got = merge(bad.as_bytes(), secondary.as_bytes(), false, &mut |_| {
                wrote = true;
                Ok(())
            });
            assert!(matches!(got, Err(MergeError::Primary(_))), "{bad:?}: {got:?}");
            assert!(!wrote, "{bad:?}");
            assert!(validate(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(
            validate(br#"{"database":{"version":8,"installs":{"a":{"spec":{}}}}}"#),
            Ok(1)
        );
    }

    #[test]
    fn a_consumer_that_goes_away_ends_the_merge() {
        let primary = json!({"database": {"installs": {"a": {"spec": {}}}}}).to_string();
        let got = merge(primary.as_bytes(), primary.as_bytes(), false, &mut |_| {
            Err("gone".into())
        });
        assert!(matches!(got, Err(MergeError::Output(_))), "{got:?}");
    }

    fn merged_text(primary: &str, secondary: &str) -> Value {
        let mut out = Vec::new();
        merge(primary.as_bytes(), secondary.as_bytes(), false, &mut |d| {
            out.extend_from_slice(d);
            Ok(())
        })
        .expect("merges");
        serde_json::from_slice(&out).expect("output is JSON")
    }

    #[test]
    fn dependency_edges_are_read_from_either_form_and_junk_is_skipped() {
        let primary = json!({"database": {"installs": {
            "p1": {"spec": node("p1", "p1", &[]), "ref_count": 0},
            "p2": {"spec": node("p2", "p2", &[]), "ref_count": 5},
            "p3": {"spec": node("p3", "p3", &[]), "ref_count": 0}
        }}})
        .to_string();
        // List form with extra fields and junk elements; object form (old specs); a
        // `dependencies` that is neither; a spec with a hash that is not a string.
        let secondary = json!({"database": {"installs": {
            "s1": {"spec": {"name": "s1", "dependencies": [
                {"name": "a", "hash": "p1", "parameters": {"deptypes": ["build", "link"], "virtuals": []}},
                "junk", 7, null, [1, 2], {"no-hash": true}, {"hash": 12}, {"hash": {"deep": ["p2"]}},
                {"hash": "p2", "hash2": "p3"}
            ]}},
            "s2": {"spec": {"name": "s2", "dependencies": {"a": {"hash": "p1"}, "b": {"hash": "p3", "type": ["link"]}}}},
            "s3": {"spec": {"name": "s3", "dependencies": "p1"}},
            "s4": {"spec": {"name": "s4", "dependencies": [{"hash": "x".repeat(MAX_HASH_LEN + 1)}]}}
        }}})
        .to_string();
        let merged = merged_text(&primary, &secondary);
        let installs = &merged["database"]["installs"];
        assert_eq!(installs["p1"]["ref_count"], 2, "s1 (list) and s2 (object)");
        assert_eq!(installs["p2"]["ref_count"], 6, "its own 5 and s1's");
        assert_eq!(installs["p3"]["ref_count"], 1, "s2 only: hash2 is no edge");
        assert_eq!(
            installs["s1"]["spec"]["dependencies"].as_array().map(Vec::len),
            Some(9),
            "specs are copied whole"
        );
    }

    #[test]
    fn a_huge_dependency_list_is_counted_without_being_built() {
        // 200,000 dependency nodes with padding: read streaming, counted exactly.
        let mut deps = String::from("[");
        for i in 0..200_000 {
            if i > 0 {
                deps.push(',');
            }
            deps.push_str(r#"{"name":"pad","hash":"p1","parameters":{"deptypes":["build","link","run"],"virtuals":["mpi","blas"]}}"#);
        }
        deps.push(']');
        let primary = r#"{"database":{"installs":{"p1":{"spec":{"name":"p1"},"ref_count":0}}}}"#;
        let secondary =
            format!(r#"{{"database":{{"installs":{{"big":{{"spec":{{"name":"big","dependencies":{deps}}}}}}}}}}}"#);
        let merged = merged_text(primary, &secondary);
        assert_eq!(merged["database"]["installs"]["p1"]["ref_count"], 200_000);
    }

    #[test]
    fn ref_counts_saturate_and_repeated_hashes_are_written_once() {
        let primary = format!(
            r#"{{"database":{{"installs":{{"p1":{{"spec":{{"name":"first"}},"ref_count":{}}},"p2":{{"spec":{{}}}},"p1":{{"spec":{{"name":"second"}},"ref_count":0}}}}}}}}"#,
            i64::MAX
        );
        let secondary = r#"{"database":{"installs":{
            "s1":{"spec":{"name":"s1-first","dependencies":[{"hash":"p1"}]},"in_buildcache":true},
            "s1":{"spec":{"name":"s1-second","dependencies":[{"hash":"p1"}]}}}}}"#;
        let mut out = Vec::new();
        merge(primary.as_bytes(), secondary.as_bytes(), false, &mut |d| {
            out.extend_from_slice(d);
            Ok(())
        })
        .expect("merges");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.matches(r#""p1":"#).count(), 1, "{text}");
        assert_eq!(text.matches(r#""s1":"#).count(), 1, "{text}");
        let merged: Value = serde_json::from_str(&text).expect("JSON");
        let installs = &merged["database"]["installs"];
        assert_eq!(installs["p1"]["spec"]["name"], "first");
        assert_eq!(installs["p1"]["ref_count"], i64::MAX, "saturated, not overflowed");
        assert_eq!(installs["s1"]["spec"]["name"], "s1-first");
    }

    #[test]
    fn a_long_key_is_shortened_in_the_error() {
        let key = "k".repeat(100_000);
        let bad = format!(r#"{{"database":{{"installs":{{"{key}":{{"spec":1}}}}}}}}"#);
        let err = validate(bad.as_bytes()).expect_err("refused");
        assert!(err.len() < 300, "{} bytes: {}", err.len(), &err[..200]);
    }
}
