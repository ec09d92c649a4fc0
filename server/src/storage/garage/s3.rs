//! [`BlobStore`] on Garage's S3 API through `aws-sdk-s3`.
//!
//! Bodies are streamed: a put reads the caller's stream one [`CHUNK_SIZE`] chunk at a time (one
//! PutObject when the body fits in a chunk, a multipart upload otherwise), and a get hands the
//! SDK's body stream back without collecting it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures::TryStreamExt;

use super::errors::{self, ErrCtx};
use super::k2v::escape;
use super::retry::retrying;
use crate::storage::blob::{
    BlobMeta, BlobPage, BlobRead, BlobStore, ByteStream, CHUNK_SIZE, clamp_range, rechunk,
};
use crate::storage::config::GarageConfig;
use crate::storage::error::{Result, StorageError};

/// The blob store on a Garage cluster. Cheap to clone: clones share one SDK client.
#[derive(Clone)]
pub struct GarageBlobs {
    inner: Arc<S3>,
}

impl std::fmt::Debug for GarageBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GarageBlobs")
            .field("endpoint", &self.inner.endpoint)
            .field("bucket", &self.inner.bucket)
            .finish_non_exhaustive()
    }
}

struct S3 {
    client: aws_sdk_s3::Client,
    endpoint: String,
    bucket: String,
    key_id: String,
    request_timeout: Duration,
    max_retries: u32,
}

/// The HTTP status of an SDK error that carries a response.
fn status_of<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

/// A 404 about the key (not about the bucket).
fn is_missing_key<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    status_of(err) == Some(404) && err.code() != Some("NoSuchBucket")
        || err.code() == Some("NoSuchKey")
}

/// `bytes a-b/total` → `total`.
fn total_from_content_range(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}

fn non_negative(n: Option<i64>) -> u64 {
    n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

impl GarageBlobs {
    pub(crate) fn new(cfg: &GarageConfig, endpoint: String) -> GarageBlobs {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(cfg.connect_timeout())
            .operation_attempt_timeout(cfg.request_timeout())
            .build();
        let creds = Credentials::new(
            &cfg.access_key_id,
            &cfg.secret_access_key,
            None,
            None,
            "tern-config",
        );
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(cfg.region.clone()))
            .endpoint_url(endpoint.clone())
            .credentials_provider(creds)
            .force_path_style(true)
            .timeout_config(timeouts)
            // Retries are ours (retry.rs): one policy, one log line, for both APIs.
            .retry_config(RetryConfig::disabled())
            // Garage's support for the newer flexible checksums varies by version; MD5-free
            // plain bodies work everywhere.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Body stalls are caught by our own per-chunk timeout (see `sdk_body`), which does not
            // count time the consumer spends not reading.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .build();
        GarageBlobs {
            inner: Arc::new(S3 {
                client: aws_sdk_s3::Client::from_conf(conf),
                endpoint,
                bucket: cfg.bucket.clone(),
                key_id: cfg.access_key_id.clone(),
                request_timeout: cfg.request_timeout(),
                max_retries: cfg.max_retries,
            }),
        }
    }

    /// HeadBucket: the S3 endpoint answers, with this key, for this bucket.
    pub(crate) async fn check(&self) -> Result<()> {
        let s = &self.inner;
        let r = s
            .timed("HeadBucket", &s.bucket, || {
                s.client.head_bucket().bucket(&s.bucket).send()
            })
            .await;
        let err = match r {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        match status_of(&err) {
            // HEAD answers have no body, so a missing bucket is a bare 404.
            Some(404) => Err(StorageError::NoSuchBucket(s.bucket.clone())),
            // A bare 400/403 does not say whether the key, the secret, the region, the grant or
            // the endpoint is wrong; the same question as a GET gets an answer with a reason.
            Some(400 | 403) => {
                let why = s
                    .call("ListObjectsV2", &s.bucket, false, || {
                        s.client
                            .list_objects_v2()
                            .bucket(&s.bucket)
                            .max_keys(1)
                            .send()
                    })
                    .await;
                match why {
                    Err(e) => Err(e),
                    Ok(_) => Err(s.sdk_error(err)),
                }
            }
            _ => Err(s.sdk_error(err)),
        }
    }
}

impl S3 {
    fn ctx(&self) -> ErrCtx<'_> {
        ErrCtx {
            endpoint: &self.endpoint,
            bucket: &self.bucket,
            key_id: &self.key_id,
        }
    }

    /// One SDK call, logged with its latency.
    async fn timed<T, E, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        call: F,
    ) -> Result<T, SdkError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata,
    {
        let started = Instant::now();
        let r = call().await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &r {
            Ok(_) => tracing::debug!(op, key, latency_ms, "s3"),
            Err(e) => tracing::debug!(
                op,
                key,
                status = status_of(e),
                code = e.code(),
                latency_ms,
                "s3 failed"
            ),
        }
        r
    }

    fn sdk_error<E>(&self, err: SdkError<E>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let detail = || errors::chain(&err);
        match &err {
            SdkError::TimeoutError(_) => StorageError::Timeout(self.request_timeout),
            SdkError::DispatchFailure(f) if f.is_user() => StorageError::Invalid(detail()),
            // No answer at all: refused, reset, DNS, connect timeout.
            SdkError::DispatchFailure(_) => StorageError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: detail(),
            },
            // The server hung up mid-answer (or is not speaking S3).
            SdkError::ResponseError(_) => StorageError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: detail(),
            },
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                if err.code().is_none() {
                    // Not S3's XML (K2V's JSON when the endpoints are swapped, a proxy's page):
                    // read the reason from the body ourselves.
                    let body = ctx.raw().body().bytes().unwrap_or_default();
                    let (code, message) = errors::parse_error_body(body);
                    return errors::from_status(&self.ctx(), status, code.as_deref(), &message);
                }
                errors::from_status(
                    &self.ctx(),
                    status,
                    err.code(),
                    err.message().unwrap_or_default(),
                )
            }
            SdkError::ConstructionFailure(_) => StorageError::Invalid(detail()),
            _ => StorageError::Backend(detail()),
        }
    }

    /// Retries `call` on transient errors, mapping SDK errors to ours. `key` names the object in
    /// errors and logs.
    async fn call<T, E, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        retry: bool,
        call: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let retries = if retry { self.max_retries } else { 0 };
        retrying(retries, op, || async {
            self.timed(op, key, &call).await.map_err(|e| {
                if is_missing_key(&e) {
                    StorageError::NotFound(key.to_string())
                } else if status_of(&e) == Some(416) {
                    StorageError::Invalid(format!("range not satisfiable for {key:?}"))
                } else {
                    self.sdk_error(e)
                }
            })
        })
        .await
    }

    async fn put_object(&self, key: &str, body: Bytes) -> Result<()> {
        let len = body.len() as i64;
        self.call("PutObject", key, true, || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(len)
                .body(SdkByteStream::from(body.clone()))
                .send()
        })
        .await
        .map(|_| ())
    }

    /// Multipart upload of `first` and the rest of `chunks`; one chunk in memory at a time.
    async fn put_multipart(&self, key: &str, first: Bytes, mut chunks: ByteStream) -> Result<u64> {
        let created = self
            .call("CreateMultipartUpload", key, true, || {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
            })
            .await?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| StorageError::Backend(format!("no UploadId for {key:?}")))?
            .to_string();
        let mut guard = AbortGuard {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id: Some(upload_id.clone()),
        };

        let result = async {
            let mut parts = Vec::new();
            let mut size = 0u64;
            let mut next = Some(first);
            while let Some(chunk) = next {
                let part_number = i32::try_from(parts.len() + 1)
                    .map_err(|_| StorageError::Invalid(format!("too many parts for {key:?}")))?;
                let len = chunk.len() as i64;
                let out = self
                    .call("UploadPart", key, true, || {
                        self.client
                            .upload_part()
                            .bucket(&self.bucket)
                            .key(key)
                            .upload_id(&upload_id)
                            .part_number(part_number)
                            .content_length(len)
                            .body(SdkByteStream::from(chunk.clone()))
                            .send()
                    })
                    .await?;
                let etag = out.e_tag().ok_or_else(|| {
                    StorageError::Backend(format!("no ETag for part {part_number} of {key:?}"))
                })?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(part_number)
                        .e_tag(etag)
                        .build(),
                );
                size += chunk.len() as u64;
                drop(chunk);
                next = chunks.try_next().await?;
            }
            let upload = CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build();
            self.call("CompleteMultipartUpload", key, false, || {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .multipart_upload(upload.clone())
                    .send()
            })
            .await?;
            Ok(size)
        }
        .await;

        match result {
            Ok(size) => {
                guard.upload_id = None;
                Ok(size)
            }
            Err(e) => {
                if let Some(id) = guard.upload_id.take() {
                    let aborted = self
                        .call("AbortMultipartUpload", key, true, || {
                            self.client
                                .abort_multipart_upload()
                                .bucket(&self.bucket)
                                .key(key)
                                .upload_id(&id)
                                .send()
                        })
                        .await;
                    if let Err(abort_err) = aborted {
                        tracing::warn!(key, error = %abort_err, "could not abort multipart upload");
                    }
                }
                Err(e)
            }
        }
    }

    async fn head(&self, key: &str) -> Result<Option<BlobMeta>> {
        let r = self
            .call("HeadObject", key, true, || {
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
            })
            .await;
        match r {
            Ok(out) => Ok(Some(BlobMeta {
                key: key.to_string(),
                size: non_negative(out.content_length()),
            })),
            Err(StorageError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Aborts a multipart upload left behind when a put is dropped mid-way (its caller went away),
/// so Garage does not keep the uploaded parts.
struct AbortGuard {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let req = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(upload_id);
        let key = self.key.clone();
        rt.spawn(async move {
            if let Err(e) = req.send().await {
                tracing::warn!(key, error = %errors::chain(&e), "could not abort multipart upload");
            }
        });
    }
}

/// The SDK's body as our stream. Each chunk must arrive within `idle`, so a node that dies
/// mid-body produces an error instead of a reader that waits forever.
fn sdk_body(body: SdkByteStream, key: String, endpoint: String, idle: Duration) -> ByteStream {
    Box::pin(futures::stream::try_unfold(body, move |mut body| {
        let key = key.clone();
        let endpoint = endpoint.clone();
        async move {
            match tokio::time::timeout(idle, body.next()).await {
                Err(_) => Err(StorageError::Timeout(idle)),
                Ok(None) => Ok(None),
                Ok(Some(Ok(bytes))) => Ok(Some((bytes, body))),
                Ok(Some(Err(e))) => Err(StorageError::Unreachable {
                    endpoint,
                    detail: format!("reading object {key:?}: {}", errors::chain(&e)),
                }),
            }
        }
    }))
}

#[async_trait]
impl BlobStore for GarageBlobs {
    async fn put(&self, key: &str, body: ByteStream) -> Result<BlobMeta> {
        let s = &self.inner;
        let mut chunks = rechunk(body, CHUNK_SIZE);
        let first = chunks.try_next().await?.unwrap_or_default();
        // A short first chunk is the whole body. A full one may have followers: go multipart
        // right away rather than read ahead, so only one chunk is ever held.
        let size = if first.len() < CHUNK_SIZE {
            let size = first.len() as u64;
            s.put_object(key, first).await?;
            size
        } else {
            s.put_multipart(key, first, chunks).await?
        };
        Ok(BlobMeta {
            key: key.to_string(),
            size,
        })
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead> {
        let s = &self.inner;
        if let Some(r) = &range {
            // S3 has no empty range: check it against the size, and answer with no bytes.
            if r.start >= r.end {
                let meta = s
                    .head(key)
                    .await?
                    .ok_or_else(|| StorageError::NotFound(key.to_string()))?;
                clamp_range(key, r.clone(), meta.size)?;
                return Ok(BlobRead {
                    size: meta.size,
                    body: Box::pin(futures::stream::empty()),
                });
            }
        }
        let header = range
            .as_ref()
            .map(|r| format!("bytes={}-{}", r.start, r.end - 1));
        let r = s
            .call("GetObject", key, true, || {
                s.client
                    .get_object()
                    .bucket(&s.bucket)
                    .key(key)
                    .set_range(header.clone())
                    .send()
            })
            .await;
        let out = match (r, &range) {
            (Ok(out), _) => out,
            // 416: the range starts at or past the end. Judge it like every backend does: an
            // error, except any range of an empty object, which reads as nothing.
            (Err(StorageError::Invalid(m)), Some(r)) => {
                let meta = s
                    .head(key)
                    .await?
                    .ok_or_else(|| StorageError::NotFound(key.to_string()))?;
                if clamp_range(key, r.clone(), meta.size)?.is_empty() {
                    return Ok(BlobRead {
                        size: meta.size,
                        body: Box::pin(futures::stream::empty()),
                    });
                }
                return Err(StorageError::Invalid(m));
            }
            (Err(e), _) => return Err(e),
        };
        let size = match (&range, out.content_range()) {
            (None, _) => non_negative(out.content_length()),
            (Some(_), Some(cr)) => total_from_content_range(cr).ok_or_else(|| {
                StorageError::corrupt(key, format!("unexpected Content-Range {cr:?}"))
            })?,
            (Some(_), None) => {
                return Err(StorageError::Backend(format!(
                    "GetObject of {key:?} ignored the Range header"
                )));
            }
        };
        Ok(BlobRead {
            size,
            body: sdk_body(
                out.body,
                key.to_string(),
                s.endpoint.clone(),
                s.request_timeout,
            ),
        })
    }

    async fn head(&self, key: &str) -> Result<Option<BlobMeta>> {
        self.inner.head(key).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let s = &self.inner;
        let r = s
            .call("DeleteObject", key, true, || {
                s.client.delete_object().bucket(&s.bucket).key(key).send()
            })
            .await;
        match r {
            Ok(_) | Err(StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<()> {
        let s = &self.inner;
        let source = format!("{}/{}", escape(&s.bucket), escape(from));
        s.call("CopyObject", from, true, || {
            s.client
                .copy_object()
                .bucket(&s.bucket)
                .key(to)
                .copy_source(&source)
                .send()
        })
        .await
        .map(|_| ())
    }

    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<BlobPage> {
        let s = &self.inner;
        let out = s
            .call("ListObjectsV2", prefix, true, || {
                s.client
                    .list_objects_v2()
                    .bucket(&s.bucket)
                    .prefix(prefix)
                    .set_continuation_token(continuation.map(str::to_string))
                    .send()
            })
            .await?;
        let blobs = out
            .contents()
            .iter()
            .filter_map(|o| {
                o.key().map(|k| BlobMeta {
                    key: k.to_string(),
                    size: non_negative(o.size()),
                })
            })
            .collect();
        let continuation = match out.is_truncated() {
            Some(true) => out.next_continuation_token().map(str::to_string),
            _ => None,
        };
        Ok(BlobPage {
            blobs,
            continuation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range_totals() {
        assert_eq!(total_from_content_range("bytes 0-9/100"), Some(100));
        assert_eq!(total_from_content_range("bytes 5-5/6"), Some(6));
        assert_eq!(total_from_content_range("bytes */100"), Some(100));
        assert_eq!(total_from_content_range("bytes 0-9/*"), None);
        assert_eq!(total_from_content_range("garbage"), None);
    }

    #[test]
    fn negative_sizes_do_not_wrap() {
        assert_eq!(non_negative(Some(-1)), 0);
        assert_eq!(non_negative(None), 0);
        assert_eq!(non_negative(Some(42)), 42);
    }

    #[tokio::test]
    async fn sdk_bodies_stream_through() {
        let body = SdkByteStream::from(Bytes::from_static(b"hello world"));
        let stream = sdk_body(body, "k".into(), "e".into(), Duration::from_secs(1));
        let read = BlobRead {
            size: 11,
            body: stream,
        };
        assert_eq!(&read.bytes().await.unwrap()[..], b"hello world");
    }
}
