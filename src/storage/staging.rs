//! Where an upload's bytes are staged until the upload completes, in a form that survives a
//! restart of the process:
//!
//! - **Local disk** ([`Staging::File`]): one file, `uploads/<uuid>/data` under the store's root,
//!   each part written in place at its offset (`pwrite`). Resuming truncates the file to the
//!   recorded offset. Completing it is an fsync; publishing is then a hard link, so every byte
//!   is written once. Parts are written with direct I/O (`O_DIRECT`) where the file system
//!   allows it and the part is block-aligned (see [`FileStaging`]). (`object_store`'s own local multipart upload writes a hidden temporary
//!   file that nothing can reopen after a restart, hence this.)
//! - **Multipart stores** ([`Staging::Multipart`], S3): one multipart upload of
//!   `uploads/<uuid>/data`, created when the first part is written; its id and the ids of the
//!   parts written so far are what a restart needs. A blob smaller than one part never starts a
//!   multipart upload: it is written with a single PUT when the upload completes. Bytes past the
//!   last part (fewer than S3 takes as a part) live in memory while requests come in; a session
//!   left idle, or one open at a graceful stop, moves them to a small **tail object**, so an
//!   abandoned session holds no memory and a restart loses nothing. A tail object is named by
//!   where it starts, the number of parts before it ([`TailKey`]: `uploads/<uuid>/tail-<n>`;
//!   `uploads/<uuid>/tail` for sessions recorded before tails were named so), and the state
//!   records how many of its bytes count. Rewriting the tail at the same place only makes it
//!   longer (its bytes are a prefix of the new ones), so a recorded checkpoint never finds its
//!   tail changed under it: a spill after a part was written goes to a new name, and the
//!   superseded tail is deleted only once a checkpoint naming the new parts is recorded
//!   ([`crate::storage::StagedWriter::drop_stale_tails`]).
//!
//! [`StagingState`] is the serialisable part of each, kept by the catalog between checkpoints.
//!
//! The `fault_point!` lines are where tests built with the `fault-injection` feature fail a
//! part write, a checkpoint's sync or the completion (`crate::faults`); without the feature
//! they are nothing.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use super::aligned::direct_io_aligned;
use crate::error::{Internal, Result};

/// Smallest part S3 accepts, except for the last one.
pub const S3_MIN_PART: usize = 5 * 1024 * 1024;

/// What a restart needs to know about a staged upload, besides its offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StagingState {
    /// A file on local disk, at the upload's key under the store's root.
    File,
    /// A multipart upload (not yet created while `upload_id` is `None`) and its parts so far.
    Multipart {
        upload_id: Option<String>,
        parts: Vec<String>,
        /// Bytes after the last part that are kept in the tail object.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail: Option<u64>,
        /// Parts before the tail object, which names it (absent: the unnumbered tail object
        /// of older versions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tail_at: Option<usize>,
    },
}

/// Which object holds an upload's bytes past its last part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailKey {
    /// Parts before it.
    pub at: usize,
    /// The unnumbered name of older versions' tails.
    pub legacy: bool,
}

impl TailKey {
    /// The tail that follows `parts` parts.
    pub fn after(parts: usize) -> TailKey {
        TailKey {
            at: parts,
            legacy: false,
        }
    }
}

impl StagingState {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"kind\":\"file\"}"))
    }

    pub fn from_json(s: &str) -> Option<StagingState> {
        serde_json::from_str(s).ok()
    }
}

/// A staged upload being written.
pub enum Staging {
    File(FileStaging),
    Multipart(MultipartStaging),
}

/// A staging file on local disk.
///
/// Whole parts go through a second descriptor opened with `O_DIRECT`: the disk DMAs them
/// straight from the part buffer. Through the page cache, copying each byte into a freshly
/// allocated cache page cost ~1.6 s of CPU per GiB here (and as much again in reclaim), more
/// than hashing and receiving together; direct writes cost ~0.1 s and leave the page cache to
/// the blobs being read. Durability is unchanged: `O_DIRECT` alone promises nothing about the
/// drive's cache or the file's size, so checkpoints and completion still `fdatasync`/`fsync`
/// (which cover the inode, whichever descriptor wrote). Parts that are not block-aligned in
/// address, length or offset (the tail, or after a client's odd-sized chunk), and file
/// systems without `O_DIRECT` (tmpfs), use the ordinary descriptor.
pub struct FileStaging {
    pub(super) file: Arc<std::fs::File>,
    /// The same file opened for direct I/O, if the file system supports it.
    direct: Option<Arc<std::fs::File>>,
    pub(super) path: PathBuf,
    /// Whether the file's directory entries were fsynced (once, at the first checkpoint).
    dirs_synced: bool,
}

pub struct MultipartStaging {
    store: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    path: Path,
    /// The unnumbered tail object's name; numbered ones add `-<parts>` ([`TailKey`]).
    tail_path: Path,
    upload_id: Option<String>,
}

/// A part write, run as its own task.
pub type PartWrite = std::pin::Pin<Box<dyn Future<Output = object_store::Result<Option<PartId>>> + Send>>;

impl FileStaging {
    /// Creates (or empties) the staging file at `path`; `direct`: write whole parts with direct
    /// I/O where possible (uploads), else through the page cache (data read again at once).
    /// Blocking.
    pub fn create(path: PathBuf, direct: bool) -> std::io::Result<FileStaging> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(FileStaging {
            file: Arc::new(file),
            direct: if direct { open_direct(&path) } else { None },
            path,
            dirs_synced: false,
        })
    }

    /// Reopens a staging file and cuts it back to `offset` bytes; `None` if it is missing or
    /// shorter than that. Blocking.
    pub fn reopen(path: PathBuf, offset: u64) -> std::io::Result<Option<FileStaging>> {
        let file = match std::fs::OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < offset {
            return Ok(None);
        }
        file.set_len(offset)?;
        Ok(Some(FileStaging {
            file: Arc::new(file),
            direct: open_direct(&path),
            path,
            dirs_synced: true,
        }))
    }
}

impl MultipartStaging {
    fn tail(&self, key: TailKey) -> Path {
        if key.legacy {
            return self.tail_path.clone();
        }
        Path::from(format!("{}-{}", self.tail_path, key.at))
    }

    pub fn new(
        store: Arc<dyn ObjectStore>,
        multipart: Arc<dyn MultipartStore>,
        path: Path,
        tail_path: Path,
        upload_id: Option<String>,
    ) -> Self {
        MultipartStaging {
            store,
            multipart,
            path,
            tail_path,
            upload_id,
        }
    }
}

impl Staging {
    /// Smallest size of a part that is not the last one.
    pub fn min_part(&self) -> usize {
        match self {
            Staging::File(_) => 1,
            Staging::Multipart(_) => S3_MIN_PART,
        }
    }

    /// The serialisable state, given the ids of the parts durably written so far and the
    /// bytes kept in a tail object, and which.
    pub fn state(&self, parts: &[PartId], tail: Option<(u64, TailKey)>) -> StagingState {
        match self {
            Staging::File(_) => StagingState::File,
            Staging::Multipart(m) => StagingState::Multipart {
                upload_id: m.upload_id.clone(),
                parts: parts.iter().map(|p| p.content_id.clone()).collect(),
                tail: tail.map(|(len, _)| len),
                tail_at: tail.and_then(|(_, key)| (!key.legacy).then_some(key.at)),
            },
        }
    }

    /// Whether bytes past the last part can be kept in a tail object (multipart stores; on
    /// local disk every byte is written to the file at the end of a request anyway).
    pub fn keeps_tails(&self) -> bool {
        matches!(self, Staging::Multipart(_))
    }

    /// Stores `data`, the bytes after the last part, as tail object `key` (durable on return).
    pub async fn put_tail(&self, data: Bytes, key: TailKey) -> Result<()> {
        match self {
            Staging::Multipart(m) => {
                m.store.put(&m.tail(key), PutPayload::from(data)).await?;
                Ok(())
            }
            Staging::File(_) => Err(Internal::Other("local staging keeps no tail object").into()),
        }
    }

    /// The first `len` bytes of tail object `key`.
    pub async fn get_tail(&self, len: u64, key: TailKey) -> Result<Bytes> {
        match self {
            Staging::Multipart(m) => {
                let data = m.store.get(&m.tail(key)).await?.bytes().await?;
                if (data.len() as u64) < len {
                    return Err(Internal::Other("an upload's tail object is shorter than recorded").into());
                }
                Ok(data.slice(..len as usize))
            }
            Staging::File(_) => Err(Internal::Other("local staging keeps no tail object").into()),
        }
    }

    /// Deletes tail object `key`, if there is one.
    pub async fn delete_tail(&self, key: TailKey) -> Result<()> {
        if let Staging::Multipart(m) = self {
            match m.store.delete(&m.tail(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The `driver` label of this staging's metrics.
    fn driver(&self) -> &'static str {
        match self {
            Staging::File(_) => "filesystem",
            Staging::Multipart(_) => "s3",
        }
    }

    /// Starts writing part number `index` (0-based) holding the bytes at `offset`.
    pub async fn put_part(&mut self, index: usize, offset: u64, data: Bytes) -> Result<PartWrite> {
        let timer = super::Timer::start(self.driver(), "write_part");
        match self {
            Staging::File(f) => {
                let file = Arc::clone(&f.file);
                let direct = f.direct.clone().filter(|_| direct_io_aligned(&data, offset));
                #[cfg(feature = "fault-injection")]
                let path = f.path.to_string_lossy().into_owned();
                Ok(Box::pin(async move {
                    let _timer = timer;
                    crate::metrics::spawn_blocking(move || {
                        fault_point!(StagingWrite, &path);
                        write_part_at(&file, direct.as_deref(), &data, offset)
                    })
                    .await
                    .map_err(|e| object_store::Error::Generic {
                        store: "staging",
                        source: Box::new(e),
                    })?
                    .map_err(|e| object_store::Error::Generic {
                        store: "staging",
                        source: Box::new(e),
                    })?;
                    Ok(None)
                }))
            }
            Staging::Multipart(m) => {
                let id = match &m.upload_id {
                    Some(id) => id.clone(),
                    None => {
                        let id = m.multipart.create_multipart(&m.path).await?;
                        m.upload_id = Some(id.clone());
                        id
                    }
                };
                let (multipart, path) = (Arc::clone(&m.multipart), m.path.clone());
                Ok(Box::pin(async move {
                    let _timer = timer;
                    let part = multipart.put_part(&path, &id, index, PutPayload::from(data)).await?;
                    Ok(Some(part))
                }))
            }
        }
    }

    /// Makes every part written so far durable (local disk: fdatasync; S3: already is).
    pub async fn sync(&mut self) -> Result<()> {
        fault_point!(StagingSync, &self.label());
        let _timer = super::Timer::start(self.driver(), "sync");
        if let Staging::File(f) = self {
            let file = Arc::clone(&f.file);
            let dirs = (!f.dirs_synced).then(|| f.path.clone());
            crate::metrics::spawn_blocking(move || -> std::io::Result<()> {
                file.sync_data()?;
                if let Some(path) = dirs {
                    sync_parent_dirs(&path)?;
                }
                Ok(())
            })
            .await??;
            f.dirs_synced = true;
        }
        Ok(())
    }

    /// Completes the staged object from the parts written (`tail`: bytes never sent as a part,
    /// only possible when no part was written), and checks that it holds exactly `len` bytes.
    pub async fn complete(&mut self, parts: Vec<PartId>, tail: Option<Bytes>, len: u64) -> Result<()> {
        let _timer = super::Timer::start(self.driver(), "complete_upload");
        let stored = match self {
            Staging::File(f) => {
                fault_point!(StagingComplete, &f.path.to_string_lossy());
                let file = Arc::clone(&f.file);
                crate::metrics::spawn_blocking(move || {
                    file.sync_all()?;
                    Ok::<_, std::io::Error>(file.metadata()?.len())
                })
                .await??
            }
            Staging::Multipart(m) => {
                match &m.upload_id {
                    Some(id) => {
                        m.multipart.complete_multipart(&m.path, id, parts).await?;
                    }
                    None => {
                        let payload = PutPayload::from(tail.unwrap_or_default());
                        m.store.put(&m.path, payload).await?;
                    }
                }
                m.store.head(&m.path).await?.size
            }
        };
        if stored != len {
            tracing::error!(
                stored,
                hashed = len,
                "a staged upload does not hold the bytes that were hashed"
            );
            return Err(Internal::Other("the staged upload does not hold the bytes that were hashed").into());
        }
        Ok(())
    }

    /// The staged file or key, for fault-injection rules.
    #[cfg(feature = "fault-injection")]
    fn label(&self) -> String {
        match self {
            Staging::File(f) => f.path.to_string_lossy().into_owned(),
            Staging::Multipart(m) => m.path.to_string(),
        }
    }

    /// Deletes what was staged.
    pub async fn abort(&mut self) -> Result<()> {
        match self {
            Staging::File(f) => {
                let path = f.path.clone();
                crate::metrics::spawn_blocking(move || remove_staging_file(&path)).await??;
                Ok(())
            }
            Staging::Multipart(m) => {
                if let Some(id) = m.upload_id.take() {
                    m.multipart.abort_multipart(&m.path, &id).await?;
                }
                Ok(())
            }
        }
    }
}

/// Opens `path` again for direct I/O; `None` where the platform or file system has none.
fn open_direct(path: &std::path::Path) -> Option<Arc<std::fs::File>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                tracing::debug!(error = %e, path = %path.display(), "no direct I/O for staging");
                None
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}

/// Writes `data` at `offset`, through `direct` when given. A direct write the kernel refuses
/// (`EINVAL`: the device needs a larger alignment) is redone through the page cache; the
/// range is simply written again, so a partial direct write leaves nothing behind.
fn write_part_at(
    file: &std::fs::File,
    direct: Option<&std::fs::File>,
    data: &[u8],
    offset: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if let Some(direct) = direct {
        match direct.write_all_at(data, offset) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "direct write refused; writing through the page cache");
            }
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(data, offset)
}

/// Removes a staging file and its (then empty) directory; a missing file is not an error.
pub fn remove_staging_file(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

/// fsyncs the directory holding `path` and its parent, so a new file's name is durable.
fn sync_parent_dirs(path: &std::path::Path) -> std::io::Result<()> {
    let mut dir = path.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        std::fs::File::open(d)?.sync_all()?;
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::aligned::{ALIGN, PartBuf};

    fn part(fill: u8, len: usize) -> Bytes {
        let mut b = PartBuf::with_capacity(len, crate::storage::memory::Reservation::none());
        b.fill(&vec![fill; len]);
        b.freeze()
    }

    /// Aligned parts (direct I/O where the file system has it), an odd-sized part and a part
    /// at the odd offset after it (page cache) land at their offsets, and a resume cuts back.
    #[test]
    fn parts_land_at_their_offsets_through_either_descriptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uploads/u/data");
        let staging = FileStaging::create(path.clone(), true).unwrap();
        let writes = [
            (part(1, 2 * ALIGN), 0u64),
            (part(2, ALIGN), 2 * ALIGN as u64),
            (part(3, 100), 3 * ALIGN as u64),
            (part(4, ALIGN), 3 * ALIGN as u64 + 100),
        ];
        for (data, offset) in &writes {
            let direct = staging.direct.clone().filter(|_| direct_io_aligned(data, *offset));
            write_part_at(&staging.file, direct.as_deref(), data, *offset).unwrap();
        }
        staging.file.sync_all().unwrap();
        let mut want = Vec::new();
        for (data, _) in &writes {
            want.extend_from_slice(data);
        }
        assert_eq!(std::fs::read(&path).unwrap(), want);

        let reopened = FileStaging::reopen(path.clone(), 2 * ALIGN as u64).unwrap().unwrap();
        write_part_at(
            &reopened.file,
            reopened.direct.as_deref(),
            &part(5, ALIGN),
            2 * ALIGN as u64,
        )
        .unwrap();
        want.truncate(2 * ALIGN);
        want.extend_from_slice(&[5; ALIGN]);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
