//! Blob storage over `object_store`: content-addressed, deduplicated, streamed.
//!
//! The object layout, built only through [`Key`]:
//!
//! ```text
//! blobs/<algorithm>/<first two hex digits>/<hex>     one object per digest, shared by all repos
//! uploads/<uuid>/data                                 an upload being staged, never served
//! ```
//!
//! Blob life cycle: an upload streams into `uploads/<uuid>/data` through a multipart upload
//! ([`StagedWriter`]), hashing every byte on the way; once the client names the digest and it
//! matches, [`BlobStore::publish`] copies the staged object to its `blobs/…` key (skipped when
//! that digest is already stored) and deletes the staged one. Nothing is ever written to a
//! `blobs/…` key except by that copy, so a blob object is always complete and verified.
//!
//! Durability: the local backend runs with `object_store`'s fsync mode, so a completed staged
//! object, the hard link that publishes it, and the directories holding both are on disk before
//! `publish` returns; the catalog commit that makes the blob visible comes after.
//!
//! This module knows nothing about repositories or HTTP; access control lives in the catalog.

mod writer;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, GetResultPayload, ObjectStore, ObjectStoreExt};
use uuid::Uuid;

pub use writer::StagedWriter;
use writer::Writeback;

use crate::error::{Error, Result};
use crate::oci::{Algorithm, Digest, Hasher};

/// Read size when streaming a blob from local disk.
const READ_CHUNK: usize = 256 * 1024;

/// Every object the registry stores, and the only place object paths are built.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    /// A published, verified blob.
    Blob(&'a Digest),
    /// The data of an upload in progress.
    Upload(Uuid),
}

impl Key<'_> {
    pub fn path(&self) -> Path {
        match self {
            Key::Blob(d) => {
                let hex = d.hex();
                Path::from(format!("blobs/{}/{}/{}", d.algorithm().as_str(), &hex[..2], hex))
            }
            Key::Upload(id) => Path::from(format!("uploads/{}/data", id.simple())),
        }
    }
}

/// A stream of blob bytes, ready to become an HTTP body.
pub type ByteStream = std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// The registry's blob store.
#[derive(Clone, Debug)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    part_size: usize,
    /// Root directory when the store is local disk (enables write-back control of uploads).
    local_root: Option<PathBuf>,
}

impl BlobStore {
    /// A store on local disk under `root` (created if missing), with fsync on every write.
    pub fn local(root: PathBuf, part_size: usize) -> Result<Self> {
        std::fs::create_dir_all(&root)?;
        let fs = LocalFileSystem::new_with_prefix(&root)?
            .with_fsync(true)
            .with_automatic_cleanup(true);
        Ok(BlobStore {
            store: Arc::new(fs),
            part_size,
            local_root: Some(root),
        })
    }

    /// A store on any `object_store` backend.
    pub fn new(store: Arc<dyn ObjectStore>, part_size: usize) -> Self {
        BlobStore {
            store,
            part_size,
            local_root: None,
        }
    }

    /// Size of a stored blob, or `None` if no object holds that digest.
    pub async fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.store.head(&Key::Blob(digest).path()).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams a blob, or the byte `range` of it.
    pub async fn get(&self, digest: &Digest, range: Option<Range<u64>>) -> Result<ByteStream> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let result = match self.store.get_opts(&Key::Blob(digest).path(), options).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::BlobUnknown(Some(digest.clone()))),
            Err(e) => return Err(e.into()),
        };
        let range = result.range.clone();
        Ok(match result.payload {
            GetResultPayload::File(file, _) => read_file_range(file, range),
            GetResultPayload::Stream(s) => s.map_err(std::io::Error::other).boxed(),
        })
    }

    /// Reads a small blob whole (a config). Fails with `SizeInvalid` past `limit` bytes.
    pub async fn read_small(&self, digest: &Digest, limit: u64) -> Result<Bytes> {
        let mut stream = self.get(digest, None).await?;
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if (buf.len() + chunk.len()) as u64 > limit {
                return Err(Error::SizeInvalid);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    }

    /// Starts staging a new upload's data, hashed with `algorithm`.
    pub async fn start_upload(&self, id: Uuid, algorithm: Algorithm) -> Result<StagedWriter> {
        let upload = self.store.put_multipart(&Key::Upload(id).path()).await?;
        let writeback = match &self.local_root {
            Some(root) => {
                let dir = root.join(format!("uploads/{}", id.simple()));
                tokio::task::spawn_blocking(move || staging_file(&dir)).await?
            }
            None => None,
        };
        Ok(StagedWriter::new(
            upload,
            self.part_size,
            Hasher::new(algorithm),
            writeback,
        ))
    }

    /// Hashes a completed staged upload again with another algorithm (a client that streamed
    /// its data and then names a sha512 digest).
    pub async fn rehash_upload(&self, id: Uuid, algorithm: Algorithm) -> Result<Digest> {
        let mut stream = self.store.get(&Key::Upload(id).path()).await?.into_stream();
        let mut hasher = Hasher::new(algorithm);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher = tokio::task::spawn_blocking(move || {
                hasher.update(&chunk);
                hasher
            })
            .await?;
        }
        Ok(hasher.finish())
    }

    /// Makes a completed, verified staged upload the blob `digest`, then removes the staging copy.
    pub async fn publish(&self, id: Uuid, digest: &Digest) -> Result<()> {
        let staged = Key::Upload(id).path();
        if self.size(digest).await?.is_none() {
            self.store.copy(&staged, &Key::Blob(digest).path()).await?;
        }
        self.discard(id).await
    }

    /// Removes whatever an upload staged (idempotent).
    pub async fn discard(&self, id: Uuid) -> Result<()> {
        match self.store.delete(&Key::Upload(id).path()).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes every staged upload (sessions do not survive a restart yet).
    pub async fn discard_all_uploads(&self) -> Result<usize> {
        let prefix = Path::from("uploads");
        let paths: Vec<_> = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        let n = paths.len();
        for p in paths {
            match self.store.delete(&p).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(n)
    }
}

/// Opens the one file the local backend is staging in an upload's own directory, for write-back
/// control. `None` (no optimisation, same durability) if that is not what the directory holds.
fn staging_file(dir: &std::path::Path) -> Option<Writeback> {
    let mut entries = std::fs::read_dir(dir).ok()?;
    let only = entries.next()?.ok()?;
    if entries.next().is_some() {
        return None;
    }
    std::fs::File::open(only.path()).ok().map(Writeback::new)
}

/// Streams `range` of a local file in [`READ_CHUNK`] reads, each on the blocking pool.
fn read_file_range(file: std::fs::File, range: Range<u64>) -> ByteStream {
    use std::io::{Read, Seek, SeekFrom};
    let state = (file, range.start, range.end, false);
    futures_util::stream::try_unfold(state, |(mut file, pos, end, seeked)| async move {
        if pos >= end {
            return Ok(None);
        }
        let want = usize::try_from((end - pos).min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
        let (file, buf) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            if !seeked {
                file.seek(SeekFrom::Start(pos))?;
            }
            let mut buf = vec![0u8; want];
            file.read_exact(&mut buf)?;
            Ok((file, buf))
        })
        .await
        .map_err(std::io::Error::other)??;
        let n = buf.len() as u64;
        Ok(Some((Bytes::from(buf), (file, pos + n, end, true))))
    })
    .boxed()
}
