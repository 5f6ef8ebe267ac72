//! Fault injection, **a test-only facility**: compiled in only with the cargo feature
//! `fault-injection` (off by default; a release build carries none of this module, its hooks or
//! its route). The fault tests (`tests/faults.rs`) run the real binary built with it and make
//! chosen storage operations fail, to prove that no failure ever publishes or serves a blob whose
//! bytes do not hash to its digest.
//!
//! A server built with the feature logs a warning at start, and answers on an
//! **unauthenticated** route:
//!
//! ```text
//! PUT    /_stowage/faults   {"rules":[{"op":"staging.write","after":2,"times":1,"error":"enospc"}]}
//!                           replaces the rule set (200, the new state as below)
//! GET    /_stowage/faults   {"rules":[{"op":"staging.write","after":2,"times":1,"error":"enospc",
//!                                      "path":null,"seen":3,"fired":1}]}
//! DELETE /_stowage/faults   clears every rule (204)
//! ```
//!
//! A rule names an operation ([`Op`]), lets the first `after` matching calls succeed, then fails
//! the next `times` of them (every later one when `times` is absent, until the rules are
//! cleared) with `error`: `io` (`EIO`) or `enospc` (`ENOSPC`, which the registry reports as
//! "storage full"). With `path`, a rule only matches operations on a key or file whose path
//! contains that text. `seen` counts the matching calls so far and `fired` the failures
//! injected, so a test can check that its fault really happened.
//!
//! Where the operations are intercepted:
//! - [`FaultyStore`] wraps the `object_store` backend (local disk and S3) and its multipart API.
//!   On an upload's staging key (`uploads/…`) a multipart part is `staging.write`, the
//!   multipart completion or the single PUT of a small upload is `staging.complete`; on any
//!   other key a PUT, multipart part or completion is `store.put` (a streamed publish copy).
//!   `copy` is `store.copy` (the publish), `get` is `store.get`, a HEAD (`get` with `head`) is
//!   `store.head`, each deleted key is `store.delete`.
//! - Hooks in `storage::staging` (the `fault_point!` macro) cover the local staging file:
//!   `staging.write` (a part's positioned write), `staging.sync` (the fdatasync at a checkpoint,
//!   on every backend: on S3 the point where a checkpoint is taken), `staging.complete` (the
//!   final fsync).
//!
//! The rule set is process-wide (one server per test); checking it takes one uncontended mutex,
//! and the calls are counted in the order the operations start.

use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, UploadPart,
};
use serde::{Deserialize, Serialize};

/// A storage operation a rule can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = "staging.write")]
    StagingWrite,
    #[serde(rename = "staging.sync")]
    StagingSync,
    #[serde(rename = "staging.complete")]
    StagingComplete,
    #[serde(rename = "store.copy")]
    StoreCopy,
    #[serde(rename = "store.put")]
    StorePut,
    #[serde(rename = "store.get")]
    StoreGet,
    #[serde(rename = "store.head")]
    StoreHead,
    #[serde(rename = "store.delete")]
    StoreDelete,
}

/// The error a rule injects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// `EIO`.
    #[default]
    Io,
    /// `ENOSPC`: the storage is full.
    Enospc,
}

impl Fault {
    fn error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(match self {
            Fault::Io => libc::EIO,
            Fault::Enospc => libc::ENOSPC,
        })
    }
}

/// One rule, as a test sends it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub op: Op,
    /// Matching calls that succeed before the first failure.
    #[serde(default)]
    pub after: u64,
    /// Failures to inject; `None`: every matching call from then on.
    #[serde(default)]
    pub times: Option<u64>,
    #[serde(default)]
    pub error: Fault,
    /// Only match operations on a path containing this.
    #[serde(default)]
    pub path: Option<String>,
}

/// A rule and what it did so far.
#[derive(Debug, Clone, Serialize)]
pub struct RuleState {
    #[serde(flatten)]
    pub rule: Rule,
    /// Matching calls so far.
    pub seen: u64,
    /// Failures injected so far.
    pub fired: u64,
}

/// The body of `PUT /_stowage/faults` and of the answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules<R> {
    pub rules: Vec<R>,
}

static RULES: Mutex<Vec<RuleState>> = Mutex::new(Vec::new());

fn rules() -> MutexGuard<'static, Vec<RuleState>> {
    // A panic while holding this lock cannot leave the counters inconsistent in a way that matters.
    RULES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Replaces the rule set; returns the new state.
pub fn set(new: Vec<Rule>) -> Vec<RuleState> {
    let mut rules = rules();
    *rules = new
        .into_iter()
        .map(|rule| RuleState {
            rule,
            seen: 0,
            fired: 0,
        })
        .collect();
    tracing::warn!(rules = rules.len(), "fault injection rules set");
    rules.clone()
}

/// Removes every rule.
pub fn clear() {
    rules().clear();
    tracing::warn!("fault injection rules cleared");
}

/// The rules and their counters.
pub fn state() -> Vec<RuleState> {
    rules().clone()
}

/// Counts `op` on `path` against every matching rule; fails it when one says so.
pub fn check(op: Op, path: &str) -> std::io::Result<()> {
    let mut rules = rules();
    let mut fault = None;
    for r in rules.iter_mut() {
        if r.rule.op != op || r.rule.path.as_deref().is_some_and(|p| !path.contains(p)) {
            continue;
        }
        r.seen += 1;
        let due = r.seen > r.rule.after && r.rule.times.is_none_or(|t| r.fired < t);
        if due && fault.is_none() {
            r.fired += 1;
            fault = Some(r.rule.error);
        }
    }
    drop(rules);
    match fault {
        None => Ok(()),
        Some(f) => {
            tracing::warn!(?op, path, error = ?f, "injecting a fault");
            Err(f.error())
        }
    }
}

/// [`check`] for the object store: the fault as an `object_store` error.
fn check_store(op: Op, path: &Path) -> object_store::Result<()> {
    check(op, path.as_ref()).map_err(|e| object_store::Error::Generic {
        store: "fault-injection",
        source: Box::new(e),
    })
}

/// Whether `path` is an upload's staging key (`[prefix/]uploads/<uuid>/data`).
fn is_staging(path: &Path) -> bool {
    path.parts().any(|p| p.as_ref() == "uploads")
}

/// An `object_store` backend with the rules applied (see the module doc for which call is
/// which operation).
#[derive(Debug)]
pub struct FaultyStore<T> {
    inner: T,
}

impl<T> FaultyStore<T> {
    pub fn new(inner: T) -> Self {
        FaultyStore { inner }
    }
}

impl<T: std::fmt::Display> std::fmt::Display for FaultyStore<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultInjection({})", self.inner)
    }
}

/// The operation a write of `path` is: staging or a blob's own.
fn write_op(path: &Path, staging: Op) -> Op {
    if is_staging(path) { staging } else { Op::StorePut }
}

#[async_trait]
impl<T: ObjectStore> ObjectStore for FaultyStore<T> {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        check_store(write_op(location, Op::StagingComplete), location)?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            path: location.clone(),
        }))
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        check_store(if options.head { Op::StoreHead } else { Op::StoreGet }, location)?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let checked = locations
            .map(|location| {
                let location = location?;
                check_store(Op::StoreDelete, &location)?;
                Ok(location)
            })
            .boxed();
        self.inner.delete_stream(checked)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        check_store(Op::StoreCopy, to)?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> object_store::Result<()> {
        check_store(Op::StoreCopy, to)?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[async_trait]
impl<T: MultipartStore> MultipartStore for FaultyStore<T> {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.inner.create_multipart(path).await
    }

    async fn create_multipart_opts(&self, path: &Path, opts: PutMultipartOptions) -> object_store::Result<MultipartId> {
        self.inner.create_multipart_opts(path, opts).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        check_store(write_op(path, Op::StagingWrite), path)?;
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        check_store(write_op(path, Op::StagingComplete), path)?;
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.inner.abort_multipart(path, id).await
    }
}

/// A multipart upload through [`ObjectStore::put_multipart_opts`] (a streamed publish copy).
#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    path: Path,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        match check_store(write_op(&self.path, Op::StagingWrite), &self.path) {
            Ok(()) => self.inner.put_part(data),
            Err(e) => futures_util::future::ready(Err(e)).boxed(),
        }
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        check_store(write_op(&self.path, Op::StagingComplete), &self.path)?;
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialises the tests of this module: the rule set is process-wide.
    static LOCK: Mutex<()> = Mutex::new(());

    #[test]
    fn a_rule_fails_the_calls_after_its_count_then_stops() {
        let _l = LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let rules: Rules<Rule> = serde_json::from_str(
            r#"{"rules":[{"op":"staging.write","after":2,"times":2,"error":"enospc","path":"uploads/"}]}"#,
        )
        .unwrap();
        set(rules.rules);
        let results: Vec<bool> = (0..6)
            .map(|_| check(Op::StagingWrite, "x/uploads/u/data").is_ok())
            .collect();
        assert_eq!(results, [true, true, false, false, true, true]);
        assert!(check(Op::StagingWrite, "blobs/sha256/ab/abc").is_ok(), "path filter");
        assert!(check(Op::StagingSync, "x/uploads/u/data").is_ok(), "other op");
        let err = {
            set(vec![Rule {
                op: Op::StoreCopy,
                after: 0,
                times: None,
                error: Fault::Enospc,
                path: None,
            }]);
            check(Op::StoreCopy, "blobs/x").unwrap_err()
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert!(
            check(Op::StoreCopy, "blobs/x").is_err(),
            "no `times`: fails until cleared"
        );
        let state = state();
        assert_eq!((state[0].seen, state[0].fired), (2, 2));
        clear();
        assert!(check(Op::StoreCopy, "blobs/x").is_ok());
    }

    #[test]
    fn unknown_operations_and_fields_are_refused() {
        assert!(serde_json::from_str::<Rules<Rule>>(r#"{"rules":[{"op":"store.nope"}]}"#).is_err());
        assert!(serde_json::from_str::<Rules<Rule>>(r#"{"rules":[{"op":"store.get","aftr":1}]}"#).is_err());
        assert!(serde_json::from_str::<Rules<Rule>>(r#"{"rules":[{"op":"store.get"}]}"#).is_ok());
    }
}
