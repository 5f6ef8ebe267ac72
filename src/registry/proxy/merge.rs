//! `[[spack.merge]]`: a hosted Spack buildcache backed by pull-through caches (its
//! *fallbacks*), so that one mirror URL serves the site's own specs and upstream ones (see
//! `docs/proxy.md`, "Hosted buildcaches with fallbacks").
//!
//! - `index.spack` of the hosted repository is its own specs merged with every fallback's
//!   index (the fallback's merged index, or its upstream's when nothing is cached there), in
//!   priority order: the hosted repository's spec wins a DAG hash listed twice, then the
//!   first fallback's. It is built as a proxied repository's merged index is
//!   ([`Registry::build_merged_index`]) and rebuilt only when an input changed: the hosted
//!   spec generation or a fallback's index digest (the inputs are the manifest's annotation).
//!   A fallback with nothing to offer (no merged index, no cached upstream index, its upstream
//!   down or refusing) is left out, named `<fallback>@unavailable` in the inputs, so the
//!   index is rebuilt once it answers; it never turns the hosted index into a 502.
//!   A hosted repository with no spec of its own has no index state to record a build in: it
//!   serves its first fallback's index as it is.
//! - A manifest that is not found in the hosted repository (by tag or digest) is looked up in
//!   each fallback in order, exactly as a pull of the fallback would (fetched and cached
//!   there on first request). A blob not linked in the hosted repository is served from the
//!   first fallback that has it cached, else from the first whose upstream has it; a fallback
//!   whose upstream cannot answer counts as not having it (`BLOB_UNKNOWN`, never a 502), so
//!   that a push into the hosted repository (which `HEAD`s each blob first) works while an
//!   upstream is down.
//! - Pushes go to the hosted repository as ever; a manifest pushed there may reference blobs
//!   that a `HEAD` found in a fallback (Spack skips uploading those): they are linked into the
//!   hosted repository from the fallback before the manifest is stored. Fallbacks stay
//!   read-only.
//! - Authorisation is the hosted repository's: the HTTP layer checked pull (or push) on it
//!   before the service is called, and the fallbacks are reached from here, never by the
//!   client's name. Configuring a fallback exposes it to everyone who may pull the hosted
//!   repository. Upstream credentials stay in the upstream client.

use std::collections::HashMap;

use super::super::Registry;
use super::spack::{Source, index_tag, inputs_of};
use crate::catalog::ManifestRecord;
use crate::config::SpackMergeConfig;
use crate::error::{Error, Result};
use crate::oci::{Digest, Reference, RepoName, manifest};

/// Hosted repositories and their fallbacks, in priority order.
pub(crate) type Fallbacks = HashMap<String, Vec<RepoName>>;

/// The fallbacks of each `[[spack.merge]]` entry (validated by `config`).
pub(crate) fn fallbacks(entries: &[SpackMergeConfig]) -> Result<Fallbacks> {
    let mut out = HashMap::new();
    for e in entries {
        let list = e
            .fallbacks
            .iter()
            .map(|f| f.parse::<RepoName>())
            .collect::<Result<Vec<_>>>()?;
        out.insert(e.repository.clone(), list);
    }
    Ok(out)
}

impl Registry {
    /// The fallbacks of hosted `repo` (`[[spack.merge]]`), if any.
    pub fn spack_fallbacks(&self, repo: &RepoName) -> Option<Vec<RepoName>> {
        self.proxy.as_ref()?.spack_merge.get(repo.as_str()).cloned()
    }

    /// `index.spack` of a hosted repository with fallbacks: its own specs merged with the
    /// fallbacks' indexes (see the module doc).
    pub(in crate::registry) async fn hosted_merged_index(
        &self,
        repo: &RepoName,
        fallbacks: &[RepoName],
        with_content: bool,
    ) -> Result<Option<ManifestRecord>> {
        let prefix = fallbacks
            .first()
            .and_then(|f| self.route(f))
            .map(|r| r.upstream.prefix().to_owned())
            .unwrap_or_default();
        let mut sources = Vec::new();
        for fallback in fallbacks {
            let Some(route) = self.route(fallback) else { continue };
            let found = match self.proxied_spack_index(fallback, false).await {
                Ok(Some(m)) => Ok(Some(m)),
                Ok(None) => match self.get_manifest(fallback, &index_tag(), false).await {
                    Ok(m) => Ok(Some(m)),
                    Err(Error::ManifestUnknown) => Ok(None),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match found {
                Ok(Some(m)) => sources.push(Source {
                    repo: fallback.clone(),
                    digest: m.digest,
                    // A fallback's merged index is its upstream's plus what is cached there.
                    max: route.upstream.max_spack_index_size().saturating_mul(2),
                    upstream: route.upstream.url().to_owned(),
                }),
                Ok(None) => {}
                Err(e) => {
                    // It has nothing to offer (no merged index, no cached upstream index): the
                    // index is built without it, and rebuilt once it answers (its inputs
                    // then differ).
                    tracing::warn!(
                        repo = %repo, fallback = %fallback, error = %e,
                        "a fallback's Spack index is unavailable: the merged index leaves it out"
                    );
                    crate::metrics::get()
                        .proxy_stale_serves
                        .get_or_create(&crate::metrics::UpstreamOnlyLabels {
                            upstream: route.upstream.prefix().to_owned(),
                        })
                        .inc();
                    sources.push(Source {
                        repo: fallback.clone(),
                        digest: String::new(),
                        max: 0,
                        upstream: route.upstream.url().to_owned(),
                    });
                }
            }
        }
        // Unavailable fallbacks (no digest) are named in the inputs, and left out of a build.
        let inputs = inputs_of(&sources, true);
        if self.catalog.spack_index_state(repo).await?.is_none() {
            // No spec of its own: nothing to record a build in; the first fallback's index.
            return match sources.iter().find(|s| !s.digest.is_empty()) {
                Some(s) => self.merged_manifest(&s.repo, &s.digest, with_content).await,
                None => Ok(None),
            };
        }
        if let Some(m) = self.current_merged_index(repo, &inputs, with_content).await? {
            return Ok(Some(m));
        }
        if self.is_read_only() {
            return self
                .stale_merged_index(repo, &prefix, with_content, Error::ReadOnly)
                .await;
        }
        match self.build_merged_once(repo, sources, true, inputs).await {
            Ok(Some(digest)) => self.merged_manifest(repo, &digest, with_content).await,
            Ok(None) => Ok(None),
            Err(e @ Error::Upstream(_)) => self.stale_merged_index(repo, &prefix, with_content, e).await,
            Err(e) => Err(e),
        }
    }

    /// A manifest hosted `repo` does not hold, looked up in its fallbacks in order (a pull of
    /// the fallback: fetched and cached there on first request). `MANIFEST_UNKNOWN` when no
    /// fallback has it; the first fallback's error when one failed and none had it.
    pub async fn fallback_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        with_content: bool,
    ) -> Result<ManifestRecord> {
        let mut failed = None;
        for fallback in self.spack_fallbacks(repo).unwrap_or_default() {
            match self.get_manifest(&fallback, reference, with_content).await {
                Ok(m) => {
                    tracing::debug!(repo = %repo, fallback = %fallback, digest = %m.digest, "manifest served from a fallback");
                    return Ok(m);
                }
                Err(Error::ManifestUnknown) => {}
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        Err(failed.unwrap_or(Error::ManifestUnknown))
    }

    /// The repository a blob `GET`/`HEAD` of `repo` is served from: `repo` itself unless it
    /// has fallbacks and does not link the blob; then the first fallback that has it cached,
    /// else the first whose upstream has it (asked with a `HEAD`), else `repo` (which answers
    /// `BLOB_UNKNOWN`).
    ///
    /// A fallback that cannot answer (its upstream down or rate-limiting, or this instance
    /// read-only) counts as not having the blob: logged, never an error. A push into the hosted
    /// repository `HEAD`s every blob before uploading it and must not depend on an upstream
    /// it needs nothing from.
    pub async fn blob_source(&self, repo: &RepoName, digest: &Digest) -> Result<RepoName> {
        let Some(fallbacks) = self.spack_fallbacks(repo) else {
            return Ok(repo.clone());
        };
        if self.catalog.blob_size(repo, digest).await?.is_some() {
            return Ok(repo.clone());
        }
        for fallback in &fallbacks {
            if self.catalog.blob_size(fallback, digest).await?.is_some() {
                return Ok(fallback.clone());
            }
        }
        for fallback in fallbacks {
            match self.proxied_blob_size(&fallback, digest).await {
                Ok(Some(_)) => return Ok(fallback),
                Ok(None) | Err(Error::BlobUnknown(_)) => {}
                Err(e) => {
                    tracing::warn!(
                        repo = %repo, fallback = %fallback, digest = %digest, error = %e,
                        "a fallback could not be asked for a blob: taken as not there"
                    );
                }
            }
        }
        Ok(repo.clone())
    }

    /// Before a manifest is pushed to hosted `repo`: links into it the blobs the manifest
    /// references that it does not hold but a fallback does (a client that found them with a
    /// `HEAD` did not upload them), fetching them into the fallback first if needed. Nothing
    /// for a repository without fallbacks, or a body that is not a manifest (the push reports
    /// that).
    pub async fn link_fallback_blobs(&self, repo: &RepoName, body: &[u8], content_type: Option<&str>) -> Result<()> {
        if self.spack_fallbacks(repo).is_none() {
            return Ok(());
        }
        let Ok(parsed) = manifest::parse(body, content_type) else {
            return Ok(());
        };
        for d in parsed.required_blobs() {
            if self.catalog.blob_size(repo, &d.digest).await?.is_some() {
                continue;
            }
            let source = self.blob_source(repo, &d.digest).await?;
            if &source == repo {
                continue;
            }
            if self.catalog.blob_size(&source, &d.digest).await?.is_none() {
                self.fill_proxied_blob(&source, &d.digest).await?;
            }
            self.catalog.mount_blob(repo, &d.digest, Some(&source)).await?;
            tracing::info!(repo = %repo, fallback = %source, digest = %d.digest, "blob linked from a fallback for a push");
        }
        Ok(())
    }
}
