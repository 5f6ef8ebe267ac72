//! [`StagedWriter`]: streams an upload's bytes into a multipart upload in fixed-size parts,
//! hashing every part on the blocking pool before it is written.
//!
//! Memory per upload is bounded: one part being filled plus at most [`MAX_IN_FLIGHT`] parts
//! being written. Parts are written concurrently with receiving the next one. On local disk the
//! writer also asks the kernel to start writing each part back as soon as it is written
//! ([`Writeback`]), so the final fsync finds little left to do: durable uploads then run at the
//! disk's sequential write speed instead of "receive everything, then wait for one long fsync". A writer that is dropped without
//! [`StagedWriter::finish`] or [`StagedWriter::abort`] leaves a staged object behind that the
//! owner must discard.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use object_store::{MultipartUpload, PutPayload};
use tokio::task::JoinSet;

use crate::error::{Error, Internal, Result};
use crate::oci::{Digest, Hasher};

/// Parts written concurrently with receiving the next one.
const MAX_IN_FLIGHT: usize = 2;

pub struct StagedWriter {
    upload: Box<dyn MultipartUpload>,
    part_size: usize,
    buf: BytesMut,
    hasher: Option<Hasher>,
    in_flight: JoinSet<object_store::Result<()>>,
    /// Bytes accepted so far (written or buffered).
    len: u64,
    /// Bytes handed to the store so far.
    flushed: u64,
    writeback: Option<Arc<Writeback>>,
}

/// Write-back control of a staged file on local disk.
///
/// `object_store`'s local backend writes parts with plain `write` calls and fsyncs once at the
/// end. Holding a second descriptor of the staging file lets the writer start write-back of each
/// part right after it is written, and wait for parts older than the ones in flight, which keeps
/// dirty memory bounded and the disk busy during the whole upload. Purely an optimisation: the
/// durability guarantee still comes from the fsync in `complete`.
pub struct Writeback {
    file: std::fs::File,
}

impl Writeback {
    pub fn new(file: std::fs::File) -> Self {
        Writeback { file }
    }

    /// Starts write-back of `range` and waits for the write-back of everything before `wait_to`.
    #[cfg(target_os = "linux")]
    fn advance(&self, start: u64, len: u64, wait_to: u64) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: plain syscalls on a descriptor this struct owns; no memory is passed.
        unsafe {
            libc::sync_file_range(fd, start as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
            if wait_to > 0 {
                libc::sync_file_range(
                    fd,
                    0,
                    wait_to as i64,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn advance(&self, _start: u64, _len: u64, _wait_to: u64) {}
}

impl StagedWriter {
    pub(super) fn new(
        upload: Box<dyn MultipartUpload>,
        part_size: usize,
        hasher: Hasher,
        writeback: Option<Writeback>,
    ) -> Self {
        StagedWriter {
            upload,
            part_size: part_size.max(1),
            buf: BytesMut::new(),
            hasher: Some(hasher),
            in_flight: JoinSet::new(),
            len: 0,
            flushed: 0,
            writeback: writeback.map(Arc::new),
        }
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data`; full parts are hashed and handed to the store.
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        self.len += data.len() as u64;
        if self.buf.is_empty() && data.len() >= self.part_size && data.len() % self.part_size == 0 {
            // Whole parts arrived in one piece: no copy.
            return self.write_part(data).await;
        }
        // Fill parts allocated at exactly the part size, so a part in flight never drags a larger
        // allocation along (this is what bounds memory per upload).
        let mut rest = &data[..];
        while !rest.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf = BytesMut::with_capacity(self.part_size);
            }
            let take = rest.len().min(self.part_size - self.buf.len());
            self.buf.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.buf.len() == self.part_size {
                let part = std::mem::take(&mut self.buf).freeze();
                self.write_part(part).await?;
            }
        }
        Ok(())
    }

    async fn hash(&mut self, part: Bytes) -> Result<Bytes> {
        let mut hasher = self.hasher.take().ok_or(Internal::Other("hasher used after finish"))?;
        let (hasher, part) = tokio::task::spawn_blocking(move || {
            hasher.update(&part);
            (hasher, part)
        })
        .await?;
        self.hasher = Some(hasher);
        Ok(part)
    }

    async fn write_part(&mut self, part: Bytes) -> Result<()> {
        let part = self.hash(part).await?;
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.join_one().await?;
        }
        let start = self.flushed;
        let len = part.len() as u64;
        self.flushed += len;
        let write = self.upload.put_part(PutPayload::from(part));
        match self.writeback.clone() {
            None => {
                self.in_flight.spawn(write);
            }
            Some(wb) => {
                // Wait for the parts older than those that may still be in flight.
                let wait_to = start.saturating_sub(len * MAX_IN_FLIGHT as u64);
                self.in_flight.spawn(async move {
                    write.await?;
                    let _ = tokio::task::spawn_blocking(move || wb.advance(start, len, wait_to)).await;
                    Ok(())
                });
            }
        }
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        match self.in_flight.join_next().await {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(e.into()),
            Some(Err(e)) => Err(e.into()),
        }
    }

    /// Writes the buffered tail, completes the staged object and returns its digest and size.
    pub async fn finish(mut self) -> Result<(Digest, u64)> {
        let result = self.finish_inner().await;
        if result.is_err() {
            self.in_flight.abort_all();
            let _ = self.upload.abort().await;
        }
        result
    }

    async fn finish_inner(&mut self) -> Result<(Digest, u64)> {
        if !self.buf.is_empty() {
            let tail = std::mem::take(&mut self.buf).freeze();
            self.write_part(tail).await?;
        }
        while !self.in_flight.is_empty() {
            self.join_one().await?;
        }
        self.upload.complete().await?;
        let hasher = self
            .hasher
            .take()
            .ok_or(Error::Internal(Internal::Other("hasher used after finish")))?;
        Ok((hasher.finish(), self.len))
    }

    /// Abandons the upload, deleting what the store staged.
    pub async fn abort(mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        if let Err(e) = self.upload.abort().await {
            tracing::warn!(error = %e, "aborting a staged upload failed");
        }
    }
}
