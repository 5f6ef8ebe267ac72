//! Blob reads and deletes.

use std::ops::Range;

use super::Registry;
use crate::error::{Error, Internal, Result};
use crate::oci::{Digest, RepoName};
use crate::storage::{ByteStream, composite};

/// A byte range asked for by a client, before it is checked against the blob's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (b inclusive) or `bytes=a-` (b = None).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// The half-open range this selects in a blob of `size` bytes, if satisfiable.
    pub fn resolve(self, size: u64) -> Option<Range<u64>> {
        match self {
            ByteRange::From { start, end } => {
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                (start < size && start < end).then_some(start..end)
            }
            ByteRange::Suffix(n) => (n > 0 && size > 0).then(|| size.saturating_sub(n)..size),
        }
    }
}

/// A blob about to be served.
pub struct BlobBody {
    pub size: u64,
    /// The range served, when the client asked for one.
    pub range: Option<Range<u64>>,
    pub body: ByteStream,
}

impl Registry {
    /// Size of a blob the repository may read, or `BLOB_UNKNOWN`. For a blob of a proxied
    /// repository not stored yet, the upstream's `HEAD` answers; nothing is fetched (see
    /// `proxy`).
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        if let Some(size) = self.catalog.blob_size(repo, digest).await? {
            return Ok(size);
        }
        self.proxied_blob_size(repo, digest)
            .await?
            .ok_or_else(|| Error::BlobUnknown(Some(digest.clone())))
    }

    /// Where to send a client for the blob's bytes instead of streaming them, when downloads
    /// are redirected to the object store (a short-lived presigned URL); `None` otherwise, and
    /// for a blob not stored here (a proxied one is then streamed from its fetch).
    pub async fn blob_redirect(&self, repo: &RepoName, digest: &Digest) -> Result<Option<String>> {
        match self.catalog.blob_entry(repo, digest).await? {
            // A composite has no object of its own to sign a URL for: streamed.
            None | Some((_, true)) => return Ok(None),
            Some((_, false)) => {}
        }
        let url = self.store.download_url(digest).await?;
        if url.is_some() {
            self.record_proxy_blob_pull(repo, digest);
        }
        Ok(url)
    }

    /// Opens a blob (or a range of it) for streaming. A blob of a proxied repository not
    /// stored yet is streamed from the fetch that stores it (the tee, see `proxy`).
    pub async fn get_blob(&self, repo: &RepoName, digest: &Digest, range: Option<ByteRange>) -> Result<BlobBody> {
        let (size, pieces) = match self.catalog.blob_body_entry(repo, digest).await? {
            Some(entry) => {
                self.record_proxy_blob_pull(repo, digest);
                entry
            }
            None => {
                if let Some(teed) = self.proxied_blob(repo, digest, range).await? {
                    return Ok(counted(teed));
                }
                self.catalog
                    .blob_body_entry(repo, digest)
                    .await?
                    .ok_or_else(|| Error::BlobUnknown(Some(digest.clone())))?
            }
        };
        let range = match range {
            None => None,
            Some(r) => Some(r.resolve(size).ok_or(Error::RangeNotSatisfiable { size })?),
        };
        let body = match pieces {
            Some(pieces) => composite_body(&self.store, digest, size, &pieces, range.clone())?,
            None => self.store.get(digest, range.clone()).await?,
        };
        Ok(counted(BlobBody {
            size,
            range,
            body: Box::pin(body),
        }))
    }

    /// Removes a blob from a repository (audited for `actor`). Its bytes stay while other
    /// repositories link it.
    pub async fn delete_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        actor: &crate::catalog::audit::Actor,
    ) -> Result<()> {
        self.refuse_if_proxied(repo)?;
        if !self.settings.delete_enabled {
            return Err(Error::Unsupported("deletion is disabled on this registry"));
        }
        if self.catalog.unlink_blob(repo, digest, actor).await? {
            tracing::info!(repo = %repo, digest = %digest, "blob unlinked");
            Ok(())
        } else {
            Err(Error::BlobUnknown(Some(digest.clone())))
        }
    }
}

/// The bytes of composite blob `digest` (or a range of them), read through its `pieces`.
fn composite_body(
    store: &crate::storage::BlobStore,
    digest: &Digest,
    size: u64,
    pieces: &[composite::Piece],
    range: Option<Range<u64>>,
) -> Result<ByteStream> {
    if composite::size(pieces) != size {
        // Recorded together in one transaction and read in one snapshot: never expected. Serve
        // nothing rather than bytes that are not the blob's.
        tracing::error!(digest = %digest, size, "a composite blob's pieces do not add up to its size");
        return Err(Internal::Other("a composite blob's pieces do not add up to its size").into());
    }
    Ok(composite::stream(store, pieces, range))
}

/// Counts the bytes of `blob` as the client takes each piece: bytes sent, not bytes promised.
fn counted(blob: BlobBody) -> BlobBody {
    let body = Box::pin(futures_util::TryStreamExt::inspect_ok(blob.body, |piece| {
        crate::metrics::get().bytes_downloaded.inc_by(piece.len() as u64);
    }));
    BlobBody { body, ..blob }
}

#[cfg(test)]
mod tests {
    use super::ByteRange;

    #[test]
    fn resolves_ranges() {
        assert_eq!(
            ByteRange::From {
                start: 500,
                end: Some(1499)
            }
            .resolve(2048),
            Some(500..1500)
        );
        assert_eq!(
            ByteRange::From {
                start: 0,
                end: Some(5000)
            }
            .resolve(10),
            Some(0..10)
        );
        assert_eq!(ByteRange::From { start: 10, end: None }.resolve(10), None);
        assert_eq!(
            ByteRange::From {
                start: 500,
                end: Some(0)
            }
            .resolve(2048),
            None
        );
        assert_eq!(ByteRange::Suffix(4).resolve(10), Some(6..10));
        assert_eq!(ByteRange::Suffix(40).resolve(10), Some(0..10));
        assert_eq!(ByteRange::Suffix(0).resolve(10), None);
    }
}
