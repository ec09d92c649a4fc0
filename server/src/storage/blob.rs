//! The blob store: S3 objects (message bodies, checkpoints). Bodies move as streams of bounded
//! chunks, so a 20 MiB message is never held whole in memory by the store layer.

use std::ops::Range;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, TryStreamExt};

use super::error::{Result, StorageError};

/// Chunk size used when a backend cuts a body into pieces (and the S3 multipart part size).
pub const CHUNK_SIZE: usize = 8 * 1024 * 1024;

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send + 'static>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    pub key: String,
    pub size: u64,
}

/// An object being read: its full size, and the requested bytes as a stream.
pub struct BlobRead {
    pub size: u64,
    pub body: ByteStream,
}

impl BlobRead {
    /// Collects the stream; for callers that know the object (or range) is small.
    pub async fn bytes(self) -> Result<Bytes> {
        let mut buf = BytesMut::new();
        let mut body = self.body;
        while let Some(chunk) = body.next().await {
            buf.extend_from_slice(&chunk?);
        }
        Ok(buf.freeze())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlobPage {
    pub blobs: Vec<BlobMeta>,
    /// Pass back to `list` to get the next page.
    pub continuation: Option<String>,
}

/// A stream over an in-memory buffer, for callers that already hold the bytes.
pub fn stream_of(data: Bytes) -> ByteStream {
    Box::pin(futures::stream::once(async move { Ok(data) }))
}

/// Re-cuts a stream into chunks of exactly `size` bytes (the last may be shorter), holding at most
/// one chunk plus one incoming piece in memory.
pub fn rechunk(body: ByteStream, size: usize) -> ByteStream {
    let state = (body, BytesMut::new(), false);
    Box::pin(futures::stream::try_unfold(
        state,
        move |(mut body, mut buf, mut done)| async move {
            while !done && buf.len() < size {
                match body.try_next().await? {
                    Some(piece) => buf.extend_from_slice(&piece),
                    None => done = true,
                }
            }
            if buf.is_empty() {
                return Ok(None);
            }
            let take = buf.len().min(size);
            let chunk = buf.split_to(take).freeze();
            Ok(Some((chunk, (body, buf, done))))
        },
    ))
}

/// Validates a byte range against an object size; returns the clamped range.
pub fn clamp_range(key: &str, range: Range<u64>, size: u64) -> Result<Range<u64>> {
    if range.start > range.end || (range.start >= size && !(range.start == 0 && size == 0)) {
        return Err(StorageError::Invalid(format!(
            "range {}..{} outside object {key:?} of {size} bytes",
            range.start, range.end
        )));
    }
    Ok(range.start..range.end.min(size))
}

/// Garage's S3 API as a trait.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Stores a body read from `body`, replacing any object at `key`. Atomic: readers see the old
    /// object or the whole new one.
    async fn put(&self, key: &str, body: ByteStream) -> Result<BlobMeta>;

    /// Reads the object, or the bytes `range` (end exclusive, clamped to the size) of it.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead>;

    /// Size of the object, `None` if absent.
    async fn head(&self, key: &str) -> Result<Option<BlobMeta>>;

    /// Removes the object; removing an absent object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Server-side copy.
    async fn copy(&self, from: &str, to: &str) -> Result<()>;

    /// Objects whose key starts with `prefix`, in key order, a page at a time.
    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<BlobPage>;

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<BlobMeta> {
        self.put(key, stream_of(data)).await
    }

    async fn get_bytes(&self, key: &str) -> Result<Bytes> {
        self.get(key, None).await?.bytes().await
    }
}
