//! [`StagedWriter`]: streams an upload's bytes into a multipart upload in fixed-size parts,
//! hashing every part on the blocking pool before it is written.
//!
//! Memory per upload is bounded: one part being filled plus at most [`MAX_IN_FLIGHT`] parts
//! being written. Parts are written concurrently with receiving the next one, so disk (or S3)
//! write-back overlaps with the network. A writer that is dropped without
//! [`StagedWriter::finish`] or [`StagedWriter::abort`] leaves a staged object behind that the
//! owner must discard.

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
}

impl StagedWriter {
    pub(super) fn new(upload: Box<dyn MultipartUpload>, part_size: usize, hasher: Hasher) -> Self {
        StagedWriter {
            upload,
            part_size: part_size.max(1),
            buf: BytesMut::new(),
            hasher: Some(hasher),
            in_flight: JoinSet::new(),
            len: 0,
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
        self.buf.extend_from_slice(&data);
        while self.buf.len() >= self.part_size {
            let part = self.buf.split_to(self.part_size).freeze();
            self.write_part(part).await?;
        }
        if self.buf.is_empty() {
            // Release the previous part's allocation rather than keep it for the next one.
            self.buf = BytesMut::new();
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
        self.in_flight.spawn(self.upload.put_part(PutPayload::from(part)));
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
