//! Manifest push, pull and delete.
//!
//! Writes that move or delete a tag carry the writer's [`Overwrite`] right: the catalog refuses
//! them inside its transaction when an `[[immutable_tags]]` rule protects the tag
//! (`auth::immutable`), and an immutable tag a writer was allowed to overwrite is logged here.
//! Every change is recorded in the audit trail for the request's [`Actor`] in the change's own
//! transaction; a refused immutable-tag change is queued there as a refusal.
//!
//! An image's config blob is read once at push time (at most [`PLATFORM_CONFIG_LIMIT`] bytes,
//! or Spack's limit for a spec tag, whose config carries the spec): the platform it names is
//! recorded with the manifest, so that pages listing images never read config blobs.

use bytes::Bytes;

use super::Registry;
use super::proxy::Fill;
use crate::auth::{Overwrite, Overwritten};
use crate::catalog::audit::{Action, Actor, Event};
use crate::catalog::{ManifestRecord, NewManifest};
use crate::error::{Error, Result};
use crate::oci::manifest::{self, Manifest};
use crate::oci::{Digest, Reference, RepoName, media};
use crate::spack::{self, SpecImage};

/// Bodies larger than this are hashed and parsed on the blocking pool.
const INLINE_LIMIT: usize = 64 * 1024;

/// Image configs larger than this are not read for their platform (a config is a few KiB; its
/// build history makes a large one rarely more than a few hundred).
const PLATFORM_CONFIG_LIMIT: u64 = 1024 * 1024;

/// What a successful manifest PUT reports back.
#[derive(Debug)]
pub struct PutOutcome {
    pub digest: Digest,
    /// The `subject` the manifest names, echoed as `OCI-Subject`.
    pub subject: Option<Digest>,
}

fn digest_and_parse(body: &[u8], by_digest: Option<&Digest>, content_type: Option<&str>) -> Result<(Digest, Manifest)> {
    let digest = match by_digest {
        Some(d) => {
            let actual = d.compute_like(body);
            if &actual != d {
                return Err(Error::DigestMismatch {
                    expected: d.clone(),
                    actual,
                });
            }
            actual
        }
        None => Digest::sha256_of(body),
    };
    Ok((digest, manifest::parse(body, content_type)?))
}

impl Registry {
    /// Validates and stores a manifest under a tag or its digest. Moving an immutable tag needs
    /// `overwrite`. Refused in a proxied (pull-through) repository.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: Reference,
        content_type: Option<String>,
        body: Bytes,
        overwrite: Overwrite,
        actor: &Actor,
    ) -> Result<PutOutcome> {
        self.refuse_if_proxied(repo)?;
        self.store_manifest(repo, reference, content_type, body, overwrite, actor)
            .await
    }

    /// [`Registry::put_manifest`] into any repository: the pull-through cache stores what it
    /// fetched through here.
    pub(super) async fn store_manifest(
        &self,
        repo: &RepoName,
        reference: Reference,
        content_type: Option<String>,
        body: Bytes,
        overwrite: Overwrite,
        actor: &Actor,
    ) -> Result<PutOutcome> {
        if body.len() > self.settings.max_manifest_size {
            return Err(Error::ManifestTooLarge {
                limit: self.settings.max_manifest_size,
            });
        }
        let (tag, by_digest) = match reference {
            Reference::Tag(t) => (Some(t), None),
            Reference::Digest(d) => (None, Some(d)),
        };
        let (digest, parsed) = if body.len() <= INLINE_LIMIT {
            digest_and_parse(&body, by_digest.as_ref(), content_type.as_deref())?
        } else {
            let body = body.clone();
            crate::metrics::spawn_blocking(move || digest_and_parse(&body, by_digest.as_ref(), content_type.as_deref()))
                .await??
        };
        let subject = parsed.subject.as_ref().map(|s| s.digest.clone());
        let tag_name = tag.as_ref().map(|t| t.to_string());
        let is_spec = tag.as_ref().is_some_and(|t| spack::is_spec_tag(t.as_str()));
        let (spack, platform) = self.read_config(repo, &parsed, is_spec).await?;
        let new = NewManifest {
            digest: digest.clone(),
            content: body.to_vec(),
            parsed,
            tag,
            spack,
            platform,
            spack_index_generation: None,
        };
        let locks = self.settings.immutable_tags.for_repo(repo.as_str(), overwrite);
        let overwritten = self
            .catalog
            .put_manifest(repo, new, locks, Some(actor))
            .await
            .inspect_err(|e| self.audit_immutable_refusal(e, Action::DeniedImmutable, actor))?;
        tracing::info!(repo = %repo, digest = %digest, tag = tag_name, "manifest stored");
        log_overwritten(repo, overwritten.as_slice(), "moved");
        Ok(PutOutcome { digest, subject })
    }

    /// What an image's config tells: the Spack spec it carries (read for a spec tag only) and
    /// the platform it names (an OCI or Docker image config). A config that is not in the
    /// repository is left to the catalog's check, which rejects the manifest.
    async fn read_config(
        &self,
        repo: &RepoName,
        parsed: &Manifest,
        is_spec: bool,
    ) -> Result<(Option<SpecImage>, Option<String>)> {
        let Some(config) = parsed.config.as_ref() else {
            return Ok((None, None));
        };
        let image_config = matches!(
            config.media_type.as_str(),
            media::OCI_IMAGE_CONFIG | media::DOCKER_IMAGE_CONFIG
        );
        let limit = if is_spec {
            spack::MAX_CONFIG_SIZE
        } else if image_config {
            PLATFORM_CONFIG_LIMIT
        } else {
            return Ok((None, None));
        };
        // Only a config the repository holds at the size the manifest declares is read; a
        // composite blob (a Spack index this registry built) is neither a spec nor a platform.
        if config.size > limit || self.catalog.blob_entry(repo, &config.digest).await? != Some((config.size, false)) {
            return Ok((None, None));
        }
        let bytes = match self.store.read_small(&config.digest, limit).await {
            Ok(bytes) => bytes,
            // A Spack spec's config is what the index is made of: its failure fails the push.
            Err(e) if is_spec => return Err(e),
            // An image's platform is only shown in the UI: a config that cannot be read now
            // does not fail the push (the catalog's own checks of the manifest still apply).
            Err(e) => {
                tracing::warn!(digest = %config.digest, error = %e, "reading an image config for its platform failed");
                return Ok((None, None));
            }
        };
        Ok(crate::metrics::spawn_blocking(move || {
            let spec = if is_spec { spack::parse_config(&bytes) } else { None };
            let platform = if image_config {
                manifest::config_platform(&bytes)
            } else {
                None
            };
            (spec, platform)
        })
        .await?)
    }

    /// Looks a manifest up; `with_content` false for HEAD. In a proxied repository the local
    /// copy is first brought up to date from the upstream (see `proxy`).
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        with_content: bool,
    ) -> Result<ManifestRecord> {
        let mut retried = false;
        loop {
            let fill = self.fill_proxied_manifest(repo, reference).await?;
            // Read before the lookup: see the invariants of `manifest_cache`.
            let epoch = self.catalog.content_epoch();
            let reference_key = reference.to_string();
            if let Some(m) = self.manifests.get(repo.as_str(), &reference_key, epoch) {
                self.record_pull(repo, &m.digest);
                if fill.served_cached(&m.digest) {
                    self.record_proxy_manifest_pull(repo, &m.digest);
                }
                return Ok(ManifestRecord {
                    digest: m.digest.clone(),
                    media_type: m.media_type.clone(),
                    size: m.size,
                    content: with_content.then(|| m.content.clone()),
                });
            }
            let Some(m) = self.catalog.manifest(repo, reference, with_content).await? else {
                // A proxied copy the fill found (or a tag it had marked fresh) can be evicted
                // by the collector before this lookup: forget the tag's mark and fill once more,
                // rather than answer 404 until the mark expires.
                if fill != Fill::Hosted && !retried {
                    retried = true;
                    self.forget_proxied_tag(repo, reference);
                    continue;
                }
                return Err(Error::ManifestUnknown);
            };
            self.manifests.insert(repo.as_str(), &reference_key, &m, epoch);
            self.record_pull(repo, &m.digest);
            if fill.served_cached(&m.digest) {
                self.record_proxy_manifest_pull(repo, &m.digest);
            }
            return Ok(m);
        }
    }

    /// Deletes a tag, or a manifest (with every tag naming it) by digest. Deleting an immutable
    /// tag, or a manifest one names, needs `overwrite`.
    pub async fn delete_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        overwrite: Overwrite,
        actor: &Actor,
    ) -> Result<()> {
        self.refuse_if_proxied(repo)?;
        if !self.settings.delete_enabled {
            return Err(Error::Unsupported("deletion is disabled on this registry"));
        }
        let locks = self.settings.immutable_tags.for_repo(repo.as_str(), overwrite);
        let deleted = match reference {
            Reference::Tag(t) => self.catalog.delete_tag(repo, t, locks, actor).await,
            Reference::Digest(d) => self.catalog.delete_manifest(repo, d, locks, actor).await,
        }
        .inspect_err(|e| self.audit_immutable_refusal(e, Action::DeniedImmutable, actor))?;
        if !deleted.existed {
            return Err(Error::ManifestUnknown);
        }
        tracing::info!(repo = %repo, reference = %reference, "manifest deleted");
        log_overwritten(repo, &deleted.overwritten, "deleted");
        Ok(())
    }
}

impl Registry {
    /// Queues a refused immutable-tag change for the audit trail, if `e` is one.
    fn audit_immutable_refusal(&self, e: &Error, action: Action, actor: &Actor) {
        if let Error::TagImmutable(r) = e {
            let event = Event::new(action)
                .repo(r.repo.as_str())
                .tag(Some(r.tag.as_str()))
                .detail(serde_json::json!({ "rule": r.rule, "message": r.to_string() }));
            self.catalog.audit_refusal(actor, event);
        }
    }
}

/// Logs immutable tags a writer with the `overwrite` action moved or deleted.
fn log_overwritten(repo: &RepoName, overwritten: &[Overwritten], what: &str) {
    for o in overwritten {
        tracing::info!(
            repo = %repo, tag = %o.tag, rule = %o.rule, user = %o.by,
            "immutable tag {what} with the overwrite action"
        );
    }
}
