//! The message store: one encrypted body blob and one encrypted summary blob per message.
//!
//! Keys are `m/<user_id>/<message_id>` (body) and `s/<user_id>/<message_id>` (summary), both ids
//! opaque hex chosen by the caller, so a key reveals neither a mailbox name nor a header.
//!
//! # Body blob, format version 1
//!
//! ```text
//! offset 0   u8      format version (1)
//! offset 1   u32 BE  plaintext chunk size C (65536)
//! offset 5   chunk 0, chunk 1, ... chunk n-1
//! ```
//! Chunk i is the XChaCha20-Poly1305 encryption of plaintext bytes `i*C .. min((i+1)*C, len)`
//! under the per-message key: exactly `C + 16` bytes, except the last (`len - (n-1)*C + 16`).
//! There are `n = max(1, ceil(len / C))` chunks: an empty message is one empty final chunk (a
//! bare tag), so even it is authenticated.
//! - nonce (24 bytes): chunk index as u64 BE, then 1 for the final chunk and 0 otherwise, then
//!   zeros. The key is random per message, so (index, final) never repeats under one key.
//! - AAD: the 5 header bytes, then the message id. Editing the header, reordering chunks,
//!   dropping the tail (the new last chunk was not sealed as final), or moving the blob to
//!   another message id all fail authentication.
//!
//! The plaintext length is not in the header: a streamed upload does not know it when it writes
//! the header, and S3 reports the object size on every GET (ranged ones too), from which
//! `len = size - 5 - 16*n` follows. A read of plaintext `a..b` is therefore one ranged GET of
//! chunks `a/C ..= (b-1)/C` only, and decrypts only those.
//!
//! The per-message key is not in the blob: `put` returns it and the caller keeps it sealed in
//! the summary record (`summary.rs`), encrypted to the user's age recipient.
//!
//! # Lifecycle
//!
//! `put_message` writes the body, counts it in the user's usage counter (`usage.rs`), then
//! writes the summary; the caller then adds the message to a mailbox (a log op). Blobs left
//! without an op and blobs no mailbox refers to any more are removed by the sweep (`sweep.rs`),
//! which takes the summary as the mark of a counted message: it subtracts a message's size only
//! when it removes a summary. Each crash window therefore leaves the counter too high by one
//! message, never too low (a crash never lets a user past a quota).

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use age::x25519;
use bytes::{Bytes, BytesMut};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::stream::Fuse;
use futures::{Stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::summary::{InternalDate, RecordError, Summary, SummaryRecord};
use super::usage::{Usage, UsageCounts, UsageError};
use crate::crypto::{self, CryptoError};
use crate::storage::blob::rechunk;
use crate::storage::{BlobStore, ByteStream, StorageError, Store};
use crate::users::UserId;

/// Version byte of the body blob format described in the module comment.
pub const BODY_FORMAT_VERSION: u8 = 1;
/// Plaintext bytes per chunk: small enough that a FETCH of a few bytes decrypts little, large
/// enough that the 16-byte tags cost 0.02 %.
pub const BODY_CHUNK: u64 = 64 * 1024;
const TAG: u64 = 16;
/// Ciphertext bytes of a full chunk.
const SEALED_CHUNK: u64 = BODY_CHUNK + TAG;
/// Length of the fixed header.
pub const BODY_HEADER_LEN: u64 = 5;
/// Largest message `put_message` parses from memory (see there).
pub const DEFAULT_PARSE_LIMIT: u64 = 50 * 1024 * 1024;

const ID_MAX_LEN: usize = 128;

/// The random key of one message body. Zeroized on drop; never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageKey([u8; 32]);

impl MessageKey {
    pub fn random() -> MessageKey {
        MessageKey(rand::random())
    }
    pub fn from_bytes(bytes: [u8; 32]) -> MessageKey {
        MessageKey(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for MessageKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for MessageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MessageKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("invalid {what} {id:?}: ids are 1 to 128 hex digits")]
    InvalidId { what: &'static str, id: String },
    #[error("no message blob at {key}")]
    NotFound { key: String },
    #[error("message blob {key}: chunk {chunk} does not authenticate (corrupt or tampered)")]
    Tampered { key: String, chunk: u64 },
    #[error("message blob {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("message blob {key} has format version {version}, this build reads {supported}")]
    UnsupportedVersion {
        key: String,
        version: u32,
        supported: u32,
    },
    #[error("message for {key} is larger than the {limit}-byte limit for summarising")]
    TooLarge { key: String, limit: u64 },
    #[error("storage error on {key}: {source}")]
    Storage {
        key: String,
        #[source]
        source: StorageError,
    },
    #[error("cannot seal or open {key}: {source}")]
    Crypto {
        key: String,
        #[source]
        source: CryptoError,
    },
    #[error("cannot count {key} in the usage counter: {source}")]
    Usage {
        key: String,
        #[source]
        source: UsageError,
    },
}

impl MessageError {
    fn storage(key: &str, source: StorageError) -> MessageError {
        match source {
            StorageError::NotFound(_) => MessageError::NotFound {
                key: key.to_string(),
            },
            source => MessageError::Storage {
                key: key.to_string(),
                source,
            },
        }
    }

    fn corrupt(key: &str, detail: impl std::fmt::Display) -> MessageError {
        MessageError::Corrupt {
            key: key.to_string(),
            detail: detail.to_string(),
        }
    }

    fn record(key: &str, e: RecordError) -> MessageError {
        match e {
            RecordError::UnsupportedVersion(v) => MessageError::UnsupportedVersion {
                key: key.to_string(),
                version: v.into(),
                supported: super::summary::SUMMARY_FORMAT_VERSION.into(),
            },
            RecordError::Malformed(detail) => MessageError::corrupt(key, detail),
        }
    }
}

pub type Result<T, E = MessageError> = std::result::Result<T, E>;

/// A body just written: its plaintext size and the key that opens it.
#[derive(Debug)]
pub struct StoredBody {
    pub size: u64,
    pub key: MessageKey,
}

/// Decrypted bytes, as a stream of pieces of at most one chunk.
pub type PlainStream = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send + 'static>>;

/// A body (or a range of it) being read.
pub struct PlainRead {
    /// The whole message's plaintext length.
    pub size: u64,
    /// The range actually returned: the requested one clamped to `size`.
    pub range: Range<u64>,
    pub body: PlainStream,
}

impl PlainRead {
    pub async fn bytes(self) -> Result<Bytes> {
        let mut out = BytesMut::with_capacity((self.range.end - self.range.start) as usize);
        let mut body = self.body;
        while let Some(piece) = body.try_next().await? {
            out.extend_from_slice(&piece);
        }
        Ok(out.freeze())
    }
}

fn header_bytes() -> [u8; BODY_HEADER_LEN as usize] {
    let c = (BODY_CHUNK as u32).to_be_bytes();
    [BODY_FORMAT_VERSION, c[0], c[1], c[2], c[3]]
}

/// The shape of a version-1 blob of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    chunks: u64,
    plain_len: u64,
    /// Ciphertext length of the last chunk.
    last_sealed: u64,
}

impl Layout {
    fn of(blob_size: u64) -> Option<Layout> {
        let sealed = blob_size.checked_sub(BODY_HEADER_LEN)?;
        if sealed < TAG {
            return None;
        }
        let chunks = sealed.div_ceil(SEALED_CHUNK);
        let last_sealed = sealed - (chunks - 1) * SEALED_CHUNK;
        // Only an empty message has an empty final chunk: a writer never ends a non-empty
        // message with one, nor leaves a remainder shorter than a tag.
        if last_sealed < TAG || (chunks > 1 && last_sealed == TAG) {
            return None;
        }
        Some(Layout {
            chunks,
            plain_len: sealed - chunks * TAG,
            last_sealed,
        })
    }

    fn sealed_len(&self, chunk: u64) -> u64 {
        if chunk + 1 == self.chunks {
            self.last_sealed
        } else {
            SEALED_CHUNK
        }
    }
}

/// Blob size of a message of `len` plaintext bytes.
pub fn body_blob_size(len: u64) -> u64 {
    let chunks = len.div_ceil(BODY_CHUNK).max(1);
    BODY_HEADER_LEN + len + chunks * TAG
}

/// Plaintext size of the message in a body blob of `blob_size` bytes (no key needed), or `None`
/// if no writer produces a blob of that size.
pub fn body_plain_size(blob_size: u64) -> Option<u64> {
    Layout::of(blob_size).map(|l| l.plain_len)
}

/// Seals and opens the chunks of one message.
struct ChunkCipher {
    cipher: XChaCha20Poly1305,
    aad: Vec<u8>,
}

impl ChunkCipher {
    fn new(key: &MessageKey, message_id: &str) -> ChunkCipher {
        let mut aad = header_bytes().to_vec();
        aad.extend_from_slice(message_id.as_bytes());
        ChunkCipher {
            cipher: XChaCha20Poly1305::new(key.as_bytes().into()),
            aad,
        }
    }

    fn nonce(index: u64, last: bool) -> XNonce {
        let mut n = [0u8; 24];
        n[..8].copy_from_slice(&index.to_be_bytes());
        n[8] = u8::from(last);
        XNonce::from(n)
    }

    fn seal(&self, index: u64, last: bool, plain: &[u8]) -> Option<Vec<u8>> {
        let payload = Payload {
            msg: plain,
            aad: &self.aad,
        };
        self.cipher.encrypt(&Self::nonce(index, last), payload).ok()
    }

    fn open(&self, index: u64, last: bool, sealed: &[u8]) -> Option<Vec<u8>> {
        let payload = Payload {
            msg: sealed,
            aad: &self.aad,
        };
        self.cipher.decrypt(&Self::nonce(index, last), payload).ok()
    }
}

/// The blob body: header, then each chunk of `body` sealed as it arrives. Holds one chunk of
/// lookahead (to know which chunk is the last) and nothing else.
fn sealing_stream(cipher: ChunkCipher, body: ByteStream, counter: Arc<AtomicU64>) -> ByteStream {
    struct St {
        chunks: Fuse<ByteStream>,
        cipher: ChunkCipher,
        counter: Arc<AtomicU64>,
        pending: Option<Bytes>,
        index: u64,
        header_sent: bool,
        finished: bool,
    }
    let st = St {
        chunks: rechunk(body, BODY_CHUNK as usize).fuse(),
        cipher,
        counter,
        pending: None,
        index: 0,
        header_sent: false,
        finished: false,
    };
    Box::pin(futures::stream::try_unfold(st, |mut st| async move {
        if !st.header_sent {
            st.header_sent = true;
            return Ok(Some((Bytes::copy_from_slice(&header_bytes()), st)));
        }
        if st.finished {
            return Ok(None);
        }
        let current = match st.pending.take() {
            Some(c) => c,
            // First chunk; an empty message still gets its (empty) final chunk.
            None => st.chunks.try_next().await?.unwrap_or_default(),
        };
        let next = st.chunks.try_next().await?;
        let last = next.is_none();
        let sealed = st
            .cipher
            .seal(st.index, last, &current)
            .ok_or_else(|| StorageError::Invalid("message chunk cannot be encrypted".into()))?;
        st.counter
            .fetch_add(current.len() as u64, Ordering::Relaxed);
        st.index += 1;
        st.pending = next;
        st.finished = last;
        Ok(Some((Bytes::from(sealed), st)))
    }))
}

/// Reads exact-size pieces off a blob stream.
struct ExactReader {
    body: Fuse<ByteStream>,
    buf: BytesMut,
}

impl ExactReader {
    /// Up to `n` bytes; fewer only at the end of the stream.
    async fn take(&mut self, n: usize) -> Result<Bytes, StorageError> {
        while self.buf.len() < n {
            match self.body.try_next().await? {
                Some(piece) => self.buf.extend_from_slice(&piece),
                None => break,
            }
        }
        let n = n.min(self.buf.len());
        Ok(self.buf.split_to(n).freeze())
    }
}

fn check_id(what: &'static str, id: &str) -> Result<()> {
    if id.is_empty() || id.len() > ID_MAX_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(MessageError::InvalidId {
            what,
            id: id.chars().take(ID_MAX_LEN).collect(),
        });
    }
    Ok(())
}

/// Explains a chunk that does not authenticate: a blob written by another format version is
/// reported as such, anything else as tampering. Costs one small GET, only on failure.
async fn diagnose(blobs: &dyn BlobStore, key: &str, chunk: u64) -> MessageError {
    let header = match blobs.get(key, Some(0..BODY_HEADER_LEN)).await {
        Ok(read) => read.bytes().await.ok(),
        Err(_) => None,
    };
    match header.as_deref() {
        Some([version, ..]) if *version != BODY_FORMAT_VERSION => {
            MessageError::UnsupportedVersion {
                key: key.to_string(),
                version: (*version).into(),
                supported: BODY_FORMAT_VERSION.into(),
            }
        }
        _ => MessageError::Tampered {
            key: key.to_string(),
            chunk,
        },
    }
}

/// One user's messages.
#[derive(Clone)]
pub struct MessageStore {
    blobs: Arc<dyn BlobStore>,
    user_id: String,
    parse_limit: u64,
    /// Counts what `put_message` stores; `None` counts nothing (a bare blob store).
    usage: Option<Usage>,
}

impl MessageStore {
    /// `user_id`: the user's opaque hex id.
    pub fn new(blobs: Arc<dyn BlobStore>, user_id: &str) -> Result<MessageStore> {
        check_id("user id", user_id)?;
        Ok(MessageStore {
            blobs,
            user_id: user_id.to_string(),
            parse_limit: DEFAULT_PARSE_LIMIT,
            usage: None,
        })
    }

    /// The user's messages, counted in their usage counter by this process's writer.
    pub fn from_store(store: &Store, user_id: &str) -> Result<MessageStore> {
        let usage = Usage::for_process(store.rows.clone(), UserId(user_id.to_string()));
        Ok(MessageStore::new(store.blobs.clone(), user_id)?.with_usage(usage))
    }

    /// Counts every message `put_message` stores in `usage` (which must be this user's).
    pub fn with_usage(mut self, usage: Usage) -> MessageStore {
        self.usage = Some(usage);
        self
    }

    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    /// Changes the largest message `put_message` accepts.
    pub fn with_parse_limit(mut self, limit: u64) -> MessageStore {
        self.parse_limit = limit;
        self
    }

    pub fn body_key(&self, message_id: &str) -> Result<String> {
        check_id("message id", message_id)?;
        Ok(format!("m/{}/{message_id}", self.user_id))
    }

    pub fn summary_key(&self, message_id: &str) -> Result<String> {
        check_id("message id", message_id)?;
        Ok(format!("s/{}/{message_id}", self.user_id))
    }

    /// Encrypts `body` chunk by chunk into the body blob, streaming (at most one 64 KiB chunk of
    /// lookahead is held), and returns the plaintext size and the fresh key. Replaces any body
    /// at that id; ids are meant to be fresh.
    pub async fn put(&self, message_id: &str, body: ByteStream) -> Result<StoredBody> {
        let key = self.body_key(message_id)?;
        let message_key = MessageKey::random();
        let counter = Arc::new(AtomicU64::new(0));
        let sealed = sealing_stream(
            ChunkCipher::new(&message_key, message_id),
            body,
            counter.clone(),
        );
        let meta = self
            .blobs
            .put(&key, sealed)
            .await
            .map_err(|e| MessageError::storage(&key, e))?;
        let size = counter.load(Ordering::Relaxed);
        if meta.size != body_blob_size(size) {
            return Err(MessageError::corrupt(
                &key,
                format!(
                    "store kept {} bytes, expected {} for {size} bytes of message",
                    meta.size,
                    body_blob_size(size)
                ),
            ));
        }
        Ok(StoredBody {
            size,
            key: message_key,
        })
    }

    /// Streams the plaintext bytes `range` (clamped to the message: a range past the end reads
    /// as empty, like an IMAP partial FETCH). One ranged GET of only the chunks covering the
    /// range; only those are decrypted.
    pub async fn read_stream(
        &self,
        message_id: &str,
        key: &MessageKey,
        range: Range<u64>,
    ) -> Result<PlainRead> {
        let blob_key = self.body_key(message_id)?;
        if range.start >= range.end {
            // Nothing to decrypt; only the size is needed.
            let meta = self
                .blobs
                .head(&blob_key)
                .await
                .map_err(|e| MessageError::storage(&blob_key, e))?
                .ok_or_else(|| MessageError::NotFound {
                    key: blob_key.clone(),
                })?;
            let layout = self.layout(&blob_key, meta.size).await?;
            let at = range.start.min(layout.plain_len);
            return Ok(empty_read(layout.plain_len, at));
        }

        let first = range.start / BODY_CHUNK;
        let last = (range.end - 1) / BODY_CHUNK;
        // From chunk 0, read the header too (5 bytes more) to check the version up front.
        let get_start = if first == 0 {
            0
        } else {
            BODY_HEADER_LEN + first * SEALED_CHUNK
        };
        let get_range = (last + 1)
            .checked_mul(SEALED_CHUNK)
            .and_then(|n| n.checked_add(BODY_HEADER_LEN))
            .map(|get_end| get_start..get_end);
        let read = match self.blobs.get(&blob_key, get_range).await {
            Ok(read) => read,
            // The range starts past the blob: the request starts past the message. Confirm
            // with the size (a HEAD) rather than trust the kind of error.
            Err(StorageError::Invalid(detail)) if first > 0 => {
                let meta = self
                    .blobs
                    .head(&blob_key)
                    .await
                    .map_err(|e| MessageError::storage(&blob_key, e))?
                    .ok_or_else(|| MessageError::NotFound {
                        key: blob_key.clone(),
                    })?;
                let layout = self.layout(&blob_key, meta.size).await?;
                if range.start >= layout.plain_len {
                    return Ok(empty_read(layout.plain_len, layout.plain_len));
                }
                return Err(MessageError::storage(
                    &blob_key,
                    StorageError::Invalid(detail),
                ));
            }
            Err(e) => return Err(MessageError::storage(&blob_key, e)),
        };

        let mut reader = ExactReader {
            body: read.body.fuse(),
            buf: BytesMut::new(),
        };
        if first == 0 {
            let header = reader
                .take(BODY_HEADER_LEN as usize)
                .await
                .map_err(|e| MessageError::storage(&blob_key, e))?;
            check_header(&blob_key, &header)?;
        }
        let layout = self.layout(&blob_key, read.size).await?;
        let end = range.end.min(layout.plain_len);
        let start = range.start.min(end);
        if start == end {
            return Ok(empty_read(layout.plain_len, start));
        }
        let last = (end - 1) / BODY_CHUNK;

        struct St {
            reader: ExactReader,
            cipher: ChunkCipher,
            blobs: Arc<dyn BlobStore>,
            key: String,
            layout: Layout,
            next: u64,
            last: u64,
            range: Range<u64>,
        }
        let st = St {
            reader,
            cipher: ChunkCipher::new(key, message_id),
            blobs: self.blobs.clone(),
            key: blob_key,
            layout,
            next: first,
            last,
            range: start..end,
        };
        let body = futures::stream::try_unfold(st, |mut st| async move {
            if st.next > st.last {
                return Ok(None);
            }
            let i = st.next;
            let want = st.layout.sealed_len(i);
            let sealed = st
                .reader
                .take(want as usize)
                .await
                .map_err(|e| MessageError::storage(&st.key, e))?;
            if sealed.len() as u64 != want {
                return Err(MessageError::corrupt(
                    &st.key,
                    format!("chunk {i}: read {} of {want} bytes", sealed.len()),
                ));
            }
            let is_last = i + 1 == st.layout.chunks;
            let Some(plain) = st.cipher.open(i, is_last, &sealed) else {
                return Err(diagnose(st.blobs.as_ref(), &st.key, i).await);
            };
            // The part of the requested range inside this chunk. The layout guarantees it is
            // within `plain`; checked anyway, since `slice` would panic otherwise.
            let chunk_start = i * BODY_CHUNK;
            let from = st.range.start.saturating_sub(chunk_start);
            let to = st.range.end.min(chunk_start + plain.len() as u64) - chunk_start;
            if from > to || to > plain.len() as u64 {
                return Err(MessageError::corrupt(
                    &st.key,
                    format!("chunk {i} holds {} bytes, not the layout's", plain.len()),
                ));
            }
            let piece = Bytes::from(plain).slice(from as usize..to as usize);
            st.next += 1;
            Ok(Some((piece, st)))
        });
        Ok(PlainRead {
            size: layout.plain_len,
            range: start..end,
            body: Box::pin(body),
        })
    }

    /// The plaintext bytes `range` (clamped to the message), decrypting only the chunks that
    /// cover it.
    pub async fn read(
        &self,
        message_id: &str,
        key: &MessageKey,
        range: Range<u64>,
    ) -> Result<Bytes> {
        if range.start >= range.end {
            self.body_key(message_id)?;
            return Ok(Bytes::new());
        }
        self.read_stream(message_id, key, range)
            .await?
            .bytes()
            .await
    }

    /// The whole body, authenticated chunk by chunk.
    pub async fn read_all(&self, message_id: &str, key: &MessageKey) -> Result<Bytes> {
        self.read_stream(message_id, key, 0..u64::MAX)
            .await?
            .bytes()
            .await
    }

    /// Parses `body` into a summary, stores the body blob (chunk-streamed), then the summary
    /// record (summary + body key) encrypted to `recipient`. Needs no secret: LMTP delivers
    /// with the recipient alone.
    ///
    /// Trade-off: the summary needs the whole header block and MIME structure, and mail-parser
    /// parses from a slice, so the message is collected in memory first, up to the parse limit
    /// (`DEFAULT_PARSE_LIMIT`, 50 MiB; larger is `TooLarge` and nothing is written). The blob
    /// write itself still goes through the chunked sealing stream. A streaming MIME parser
    /// would lift the limit but is not worth writing ourselves.
    ///
    /// The body is written before the summary: a summary always has its body. A crash between
    /// the two leaves an orphan body blob (no summary refers to it) for a later sweep. The usage
    /// counter is raised between the two (see the module comment for why there).
    pub async fn put_message(
        &self,
        message_id: &str,
        internal_date: InternalDate,
        body: ByteStream,
        recipient: &x25519::Recipient,
    ) -> Result<Summary> {
        let summary_key = self.summary_key(message_id)?;
        let body_key = self.body_key(message_id)?;
        let raw = collect_limited(body, self.parse_limit)
            .await
            .map_err(|e| match e {
                Collect::TooLarge => MessageError::TooLarge {
                    key: body_key.clone(),
                    limit: self.parse_limit,
                },
                Collect::Storage(e) => MessageError::storage(&body_key, e),
            })?;
        let summary = Summary::parse(&raw, internal_date);
        // Hand the body over in chunk-sized zero-copy slices, so the sealing stream never copies
        // more than a chunk at a time.
        let pieces = (0..raw.len())
            .step_by(BODY_CHUNK as usize)
            .map(move |at| Ok(raw.slice(at..(at + BODY_CHUNK as usize).min(raw.len()))))
            .collect::<Vec<_>>();
        let stored = self
            .put(message_id, Box::pin(futures::stream::iter(pieces)))
            .await?;
        if let Some(usage) = &self.usage {
            usage
                .add(UsageCounts::stored(stored.size))
                .await
                .map_err(|source| MessageError::Usage {
                    key: body_key.clone(),
                    source,
                })?;
        }
        let record = SummaryRecord::new(summary, stored.key);
        let plain = record
            .encode()
            .map_err(|e| MessageError::record(&summary_key, e))?;
        let sealed =
            crypto::encrypt_to(recipient, &plain).map_err(|source| MessageError::Crypto {
                key: summary_key.clone(),
                source,
            })?;
        self.blobs
            .put_bytes(&summary_key, Bytes::from(sealed))
            .await
            .map_err(|e| MessageError::storage(&summary_key, e))?;
        let SummaryRecord { summary, .. } = record;
        Ok(summary)
    }

    /// The summary record of a message: its summary and the key of its body.
    pub async fn load_summary(
        &self,
        message_id: &str,
        identity: &x25519::Identity,
    ) -> Result<SummaryRecord> {
        let key = self.summary_key(message_id)?;
        let sealed = self
            .blobs
            .get_bytes(&key)
            .await
            .map_err(|e| MessageError::storage(&key, e))?;
        let plain = crypto::decrypt_with(identity, &sealed, &key)
            .map(zeroize::Zeroizing::new)
            .map_err(|source| MessageError::Crypto {
                key: key.clone(),
                source,
            })?;
        SummaryRecord::decode(&plain).map_err(|e| MessageError::record(&key, e))
    }

    /// Removes the summary, then the body (so a crash in between leaves an orphan body, never a
    /// summary without its body). Idempotent. The caller makes sure no mailbox still refers to
    /// the message, and keeps the usage counter (the sweep does both).
    pub async fn delete(&self, message_id: &str) -> Result<()> {
        let summary_key = self.summary_key(message_id)?;
        let body_key = self.body_key(message_id)?;
        self.blobs
            .delete(&summary_key)
            .await
            .map_err(|e| MessageError::storage(&summary_key, e))?;
        self.blobs
            .delete(&body_key)
            .await
            .map_err(|e| MessageError::storage(&body_key, e))
    }

    /// The layout of a blob of `size` bytes, or why it cannot be one of ours.
    async fn layout(&self, key: &str, size: u64) -> Result<Layout> {
        match Layout::of(size) {
            Some(layout) => Ok(layout),
            None => match diagnose(self.blobs.as_ref(), key, 0).await {
                e @ MessageError::UnsupportedVersion { .. } => Err(e),
                _ => Err(MessageError::corrupt(
                    key,
                    format!("{size} bytes is not a valid body blob size"),
                )),
            },
        }
    }
}

fn check_header(key: &str, header: &[u8]) -> Result<()> {
    match header {
        [version, ..] if *version != BODY_FORMAT_VERSION => Err(MessageError::UnsupportedVersion {
            key: key.to_string(),
            version: (*version).into(),
            supported: BODY_FORMAT_VERSION.into(),
        }),
        h if h == header_bytes() => Ok(()),
        _ => Err(MessageError::corrupt(
            key,
            "bad header (chunk size or truncated)",
        )),
    }
}

fn empty_read(size: u64, at: u64) -> PlainRead {
    PlainRead {
        size,
        range: at..at,
        body: Box::pin(futures::stream::empty()),
    }
}

enum Collect {
    TooLarge,
    Storage(StorageError),
}

async fn collect_limited(mut body: ByteStream, limit: u64) -> Result<Bytes, Collect> {
    let mut buf = BytesMut::new();
    while let Some(piece) = body.try_next().await.map_err(Collect::Storage)? {
        if buf.len() as u64 + piece.len() as u64 > limit {
            return Err(Collect::TooLarge);
        }
        buf.extend_from_slice(&piece);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::storage::blob::{BlobMeta, BlobPage, BlobRead, stream_of};
    use crate::storage::{StorageConfig, Store};

    const USER: &str = "00ab";

    type Gets = Vec<(String, Option<Range<u64>>)>;

    /// Records every GET (key, range) and how many bytes it streamed back.
    struct Counting {
        inner: Arc<dyn BlobStore>,
        gets: Mutex<Gets>,
        bytes_read: Arc<AtomicU64>,
    }

    #[async_trait]
    impl BlobStore for Counting {
        async fn put(&self, key: &str, body: ByteStream) -> crate::storage::Result<BlobMeta> {
            self.inner.put(key, body).await
        }
        async fn get(
            &self,
            key: &str,
            range: Option<Range<u64>>,
        ) -> crate::storage::Result<BlobRead> {
            self.gets
                .lock()
                .unwrap()
                .push((key.to_string(), range.clone()));
            let read = self.inner.get(key, range).await?;
            let counter = self.bytes_read.clone();
            let body = read.body.inspect_ok(move |b| {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
            });
            Ok(BlobRead {
                size: read.size,
                body: Box::pin(body),
            })
        }
        async fn head(&self, key: &str) -> crate::storage::Result<Option<BlobMeta>> {
            self.inner.head(key).await
        }
        async fn delete(&self, key: &str) -> crate::storage::Result<()> {
            self.inner.delete(key).await
        }
        async fn copy(&self, from: &str, to: &str) -> crate::storage::Result<()> {
            self.inner.copy(from, to).await
        }
        async fn list(
            &self,
            prefix: &str,
            continuation: Option<&str>,
        ) -> crate::storage::Result<BlobPage> {
            self.inner.list(prefix, continuation).await
        }
    }

    impl Counting {
        fn take(&self) -> (Gets, u64) {
            let gets = std::mem::take(&mut *self.gets.lock().unwrap());
            (gets, self.bytes_read.swap(0, Ordering::Relaxed))
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        raw: Arc<dyn BlobStore>,
        counting: Arc<Counting>,
        messages: MessageStore,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().to_path_buf(),
        })
        .await
        .unwrap();
        let counting = Arc::new(Counting {
            inner: store.blobs.clone(),
            gets: Mutex::new(Vec::new()),
            bytes_read: Arc::new(AtomicU64::new(0)),
        });
        let messages = MessageStore::new(counting.clone(), USER).unwrap();
        Fixture {
            _dir: dir,
            raw: store.blobs,
            counting,
            messages,
        }
    }

    /// Deterministic non-repeating bytes.
    fn body_of(len: usize, seed: u64) -> Vec<u8> {
        use rand::{RngCore, SeedableRng};
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// A stream in uneven pieces, produced lazily, so chunking does not depend on the caller.
    fn uneven(data: Vec<u8>) -> ByteStream {
        let data = Bytes::from(data);
        let mut cuts = Vec::new();
        let (mut at, mut step) = (0usize, 1usize);
        while at < data.len() {
            let end = (at + step).min(data.len());
            cuts.push(at..end);
            at = end;
            step = step * 7 % 100_003 + 1;
        }
        Box::pin(futures::stream::iter(cuts).map(move |r| Ok(data.slice(r))))
    }

    #[tokio::test]
    async fn round_trips_at_chunk_edges() {
        let f = fixture().await;
        let c = BODY_CHUNK as usize;
        for (i, len) in [0, 1, c - 1, c, c + 1, 2 * c, 3 * c + 17]
            .into_iter()
            .enumerate()
        {
            let id = format!("{i:02x}");
            let body = body_of(len, i as u64);
            let stored = f.messages.put(&id, uneven(body.clone())).await.unwrap();
            assert_eq!(stored.size, len as u64);
            let key = f.messages.body_key(&id).unwrap();
            let meta = f.raw.head(&key).await.unwrap().unwrap();
            assert_eq!(meta.size, body_blob_size(len as u64), "len {len}");
            let expected_chunks = len.div_ceil(c).max(1) as u64;
            assert_eq!(
                meta.size,
                BODY_HEADER_LEN + len as u64 + 16 * expected_chunks
            );
            let back = f.messages.read_all(&id, &stored.key).await.unwrap();
            assert_eq!(back.as_ref(), body.as_slice(), "len {len}");
        }
    }

    #[tokio::test]
    async fn twenty_mib_round_trip_and_ranged_reads_fetch_only_needed_chunks() {
        let f = fixture().await;
        let len = 20 * 1024 * 1024;
        let body = body_of(len, 20);
        let stored = f.messages.put("20", uneven(body.clone())).await.unwrap();
        assert_eq!(stored.size, len as u64);
        let key = f.messages.body_key("20").unwrap();

        let back = f.messages.read_all("20", &stored.key).await.unwrap();
        assert!(back.as_ref() == body.as_slice());
        f.counting.take();

        // Inside one chunk: one GET of exactly that chunk.
        let (a, b) = (5_000_000u64, 5_000_100u64);
        let got = f.messages.read("20", &stored.key, a..b).await.unwrap();
        assert_eq!(got.as_ref(), &body[a as usize..b as usize]);
        let chunk = a / BODY_CHUNK;
        let (gets, bytes) = f.counting.take();
        let expected =
            BODY_HEADER_LEN + chunk * SEALED_CHUNK..BODY_HEADER_LEN + (chunk + 1) * SEALED_CHUNK;
        assert_eq!(gets, vec![(key.clone(), Some(expected))]);
        assert_eq!(bytes, SEALED_CHUNK);

        // Across a chunk boundary: one GET of the two chunks.
        let a = 7 * BODY_CHUNK - 10;
        let got = f.messages.read("20", &stored.key, a..a + 20).await.unwrap();
        assert_eq!(got.as_ref(), &body[a as usize..a as usize + 20]);
        let (gets, bytes) = f.counting.take();
        assert_eq!(gets.len(), 1);
        assert_eq!(bytes, 2 * SEALED_CHUNK);

        // The tail: the last (short) chunk only, and a range past the end is clamped.
        let a = len as u64 - 3;
        let got = f
            .messages
            .read("20", &stored.key, a..a + 100)
            .await
            .unwrap();
        assert_eq!(got.as_ref(), &body[len - 3..]);
        let (gets, bytes) = f.counting.take();
        assert_eq!(gets.len(), 1);
        assert_eq!(bytes, SEALED_CHUNK, "20 MiB is a whole number of chunks");

        // Streaming read: pieces of at most one chunk.
        let read = f
            .messages
            .read_stream("20", &stored.key, 100..3_000_000)
            .await
            .unwrap();
        assert_eq!(
            (read.size, read.range.clone()),
            (len as u64, 100..3_000_000)
        );
        let pieces: Vec<Bytes> = read.body.try_collect().await.unwrap();
        assert!(pieces.iter().all(|p| p.len() as u64 <= BODY_CHUNK));
        assert_eq!(pieces.concat(), &body[100..3_000_000]);
    }

    #[tokio::test]
    async fn every_range_of_a_small_message() {
        let f = fixture().await;
        let body = b"From: a@b\r\nSubject: ranges\r\n\r\nsmall body\r\n".to_vec();
        let stored = f
            .messages
            .put("aa", stream_of(Bytes::from(body.clone())))
            .await
            .unwrap();
        let n = body.len() as u64;
        for a in 0..=n + 2 {
            for b in a..=n + 2 {
                let got = f.messages.read("aa", &stored.key, a..b).await.unwrap();
                let (x, y) = (a.min(n) as usize, b.min(n) as usize);
                assert_eq!(got.as_ref(), &body[x..y], "{a}..{b}");
            }
        }
        // Ranges across chunk edges of a multi-chunk message.
        let c = BODY_CHUNK;
        let body = body_of(3 * c as usize + 5, 3);
        let stored = f
            .messages
            .put("ab", stream_of(Bytes::from(body.clone())))
            .await
            .unwrap();
        let n = body.len() as u64;
        let edges = [
            0,
            1,
            c - 1,
            c,
            c + 1,
            2 * c,
            3 * c - 1,
            3 * c,
            n - 1,
            n,
            n + 1,
            n + c + 10,
        ];
        for &a in &edges {
            for &b in &edges {
                if a > b {
                    continue;
                }
                let got = f.messages.read("ab", &stored.key, a..b).await.unwrap();
                let (x, y) = (a.min(n) as usize, b.min(n) as usize);
                assert_eq!(got.as_ref(), &body[x..y], "{a}..{b}");
            }
        }
        let read = f
            .messages
            .read_stream("ab", &stored.key, n + 5..n + c + 10)
            .await
            .unwrap();
        assert_eq!((read.size, read.range), (n, n..n));
    }

    async fn raw_blob(f: &Fixture, id: &str) -> (String, Vec<u8>) {
        let key = f.messages.body_key(id).unwrap();
        (key.clone(), f.raw.get_bytes(&key).await.unwrap().to_vec())
    }

    #[tokio::test]
    async fn tampering_is_a_typed_error_naming_the_key() {
        let f = fixture().await;
        let c = BODY_CHUNK as usize;
        let body = body_of(3 * c + 100, 5);
        let stored = f
            .messages
            .put("0f", stream_of(Bytes::from(body.clone())))
            .await
            .unwrap();
        let (key, blob) = raw_blob(&f, "0f").await;

        // One flipped byte in chunk 1: reads touching chunk 1 fail, others still work.
        let mut bad = blob.clone();
        bad[BODY_HEADER_LEN as usize + SEALED_CHUNK as usize + 10] ^= 1;
        f.raw.put_bytes(&key, Bytes::from(bad)).await.unwrap();
        let err = f.messages.read("0f", &stored.key, 0..10).await;
        assert_eq!(err.unwrap().as_ref(), &body[..10]);
        let err = f
            .messages
            .read("0f", &stored.key, BODY_CHUNK + 5..BODY_CHUNK + 6)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, MessageError::Tampered { key: k, chunk: 1 } if *k == key),
            "{err}"
        );
        assert!(err.to_string().contains(&key), "{err}");
        let err = f.messages.read_all("0f", &stored.key).await.unwrap_err();
        assert!(
            matches!(err, MessageError::Tampered { chunk: 1, .. }),
            "{err}"
        );

        // Truncation after a whole chunk: the new last chunk was not sealed as final.
        let cut = blob[..BODY_HEADER_LEN as usize + 2 * SEALED_CHUNK as usize].to_vec();
        f.raw.put_bytes(&key, Bytes::from(cut)).await.unwrap();
        let err = f.messages.read_all("0f", &stored.key).await.unwrap_err();
        assert!(
            matches!(err, MessageError::Tampered { chunk: 1, .. }),
            "{err}"
        );

        // Truncation inside a chunk.
        let cut = blob[..blob.len() - 50].to_vec();
        f.raw.put_bytes(&key, Bytes::from(cut)).await.unwrap();
        let err = f.messages.read_all("0f", &stored.key).await.unwrap_err();
        assert!(
            matches!(err, MessageError::Tampered { chunk: 3, .. }),
            "{err}"
        );

        // Two chunks swapped.
        let (h, s) = (BODY_HEADER_LEN as usize, SEALED_CHUNK as usize);
        let mut swapped = blob[..h].to_vec();
        swapped.extend_from_slice(&blob[h + s..h + 2 * s]);
        swapped.extend_from_slice(&blob[h..h + s]);
        swapped.extend_from_slice(&blob[h + 2 * s..]);
        f.raw.put_bytes(&key, Bytes::from(swapped)).await.unwrap();
        let err = f.messages.read("0f", &stored.key, 0..1).await.unwrap_err();
        assert!(
            matches!(err, MessageError::Tampered { chunk: 0, .. }),
            "{err}"
        );

        // Another version: reported as such, for full and for ranged reads.
        let mut v2 = blob.clone();
        v2[0] = 2;
        f.raw.put_bytes(&key, Bytes::from(v2)).await.unwrap();
        let err = f.messages.read_all("0f", &stored.key).await.unwrap_err();
        assert!(
            matches!(err, MessageError::UnsupportedVersion { version: 2, .. }),
            "{err}"
        );
        // A ranged read that does not cover the header trusts the layout it knows: chunks that
        // authenticate under this message's key are genuine whatever the header says. Only
        // when a chunk fails does it look at the header, to tell another format from tampering.
        let got = f
            .messages
            .read("0f", &stored.key, BODY_CHUNK * 2..BODY_CHUNK * 2 + 1)
            .await;
        assert_eq!(got.unwrap().as_ref(), &body[2 * c..2 * c + 1]);
        let mut v2 = blob.clone();
        v2[0] = 2;
        v2[h + 2 * s + 3] ^= 0x40;
        f.raw.put_bytes(&key, Bytes::from(v2)).await.unwrap();
        let err = f
            .messages
            .read("0f", &stored.key, BODY_CHUNK * 2..BODY_CHUNK * 2 + 1)
            .await
            .unwrap_err();
        assert!(
            matches!(err, MessageError::UnsupportedVersion { version: 2, .. }),
            "{err}"
        );

        // The blob under another message id (AAD binds the id).
        f.raw
            .put_bytes(&key, Bytes::from(blob.clone()))
            .await
            .unwrap();
        let other = f.messages.body_key("10").unwrap();
        f.raw
            .put_bytes(&other, Bytes::from(blob.clone()))
            .await
            .unwrap();
        let err = f.messages.read_all("10", &stored.key).await.unwrap_err();
        assert!(
            matches!(err, MessageError::Tampered { chunk: 0, .. }),
            "{err}"
        );

        // The wrong key.
        let err = f
            .messages
            .read_all("0f", &MessageKey::random())
            .await
            .unwrap_err();
        assert!(matches!(err, MessageError::Tampered { .. }), "{err}");

        // A size no writer produces.
        f.raw
            .put_bytes(&key, Bytes::from(blob[..10].to_vec()))
            .await
            .unwrap();
        let err = f.messages.read_all("0f", &stored.key).await.unwrap_err();
        assert!(
            matches!(&err, MessageError::Corrupt { key: k, .. } if *k == key),
            "{err}"
        );

        // Missing.
        let err = f.messages.read_all("0e", &stored.key).await.unwrap_err();
        assert!(
            matches!(&err, MessageError::NotFound { key } if key == "m/00ab/0e"),
            "{err}"
        );
        let err = f
            .messages
            .read("0e", &stored.key, 5 * BODY_CHUNK..5 * BODY_CHUNK + 1)
            .await
            .unwrap_err();
        assert!(matches!(err, MessageError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn ids_must_be_opaque_hex() {
        let f = fixture().await;
        for bad in ["", "INBOX", "a/b", "../x", "g0", &"a".repeat(129)] {
            let err = f
                .messages
                .put(bad, stream_of(Bytes::new()))
                .await
                .unwrap_err();
            assert!(matches!(err, MessageError::InvalidId { .. }), "{bad:?}");
        }
        assert!(matches!(
            MessageStore::new(f.raw.clone(), "alice"),
            Err(MessageError::InvalidId { .. })
        ));
    }

    const MAIL: &str = "From: Zelda Secret <zelda@hyrule.example>\r\nTo: link@hyrule.example\r\nSubject: The triforce password\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n--zz\r\nContent-Type: text/plain\r\n\r\nThe password is swordfish-4711.\r\n--zz\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--zz--\r\n";

    fn date() -> InternalDate {
        InternalDate {
            unix_seconds: 1_750_000_000,
            offset_minutes: 0,
        }
    }

    #[tokio::test]
    async fn put_message_stores_body_and_sealed_summary() {
        let f = fixture().await;
        let id = age::x25519::Identity::generate();
        let summary = f
            .messages
            .put_message(
                "c0ffee",
                date(),
                uneven(MAIL.as_bytes().to_vec()),
                &id.to_public(),
            )
            .await
            .unwrap();
        assert_eq!(summary.size, MAIL.len() as u64);
        assert_eq!(
            summary.envelope.subject.as_deref(),
            Some(&b"The triforce password"[..])
        );

        let record = f.messages.load_summary("c0ffee", &id).await.unwrap();
        assert_eq!(
            record.version,
            super::super::summary::SUMMARY_FORMAT_VERSION
        );
        assert_eq!(record.summary, summary);
        let body = f
            .messages
            .read_all("c0ffee", &record.body_key)
            .await
            .unwrap();
        assert_eq!(body.as_ref(), MAIL.as_bytes());

        // A part served by one range read through the summary's offsets.
        let part = summary.section(&[1]).unwrap();
        let text = f
            .messages
            .read("c0ffee", &record.body_key, part.offsets.body_range())
            .await
            .unwrap();
        assert_eq!(text.as_ref(), b"The password is swordfish-4711.");
        let header = f
            .messages
            .read(
                "c0ffee",
                &record.body_key,
                summary.body.offsets.header_range(),
            )
            .await
            .unwrap();
        assert_eq!(header.as_ref(), summary.header.as_slice());

        // Nothing readable in storage: keys are opaque, contents sealed.
        let page = f.raw.list("", None).await.unwrap();
        let keys: Vec<&str> = page.blobs.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(keys, vec!["m/00ab/c0ffee", "s/00ab/c0ffee"]);
        for key in keys {
            let stored = f.raw.get_bytes(key).await.unwrap();
            for secret in [
                "Zelda",
                "zelda@hyrule",
                "hyrule.example",
                "triforce",
                "swordfish",
                "AAECAwQFBgcICQ",
                "multipart",
                "Subject",
            ] {
                assert!(
                    !stored.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret:?} in clear in {key}"
                );
            }
            // Nor the body key in the clear.
            assert!(!stored.windows(32).any(|w| w == record.body_key.as_bytes()));
        }

        // Another identity cannot open the summary.
        let other = age::x25519::Identity::generate();
        let err = f.messages.load_summary("c0ffee", &other).await.unwrap_err();
        assert!(
            matches!(&err, MessageError::Crypto { key, .. } if key == "s/00ab/c0ffee"),
            "{err}"
        );

        // Delete removes both; twice is fine.
        f.messages.delete("c0ffee").await.unwrap();
        f.messages.delete("c0ffee").await.unwrap();
        assert!(f.raw.list("", None).await.unwrap().blobs.is_empty());
        let err = f.messages.load_summary("c0ffee", &id).await.unwrap_err();
        assert!(matches!(err, MessageError::NotFound { .. }), "{err}");
    }

    #[tokio::test]
    async fn put_message_of_twenty_mib_and_over_the_limit() {
        let f = fixture().await;
        let id = age::x25519::Identity::generate();
        let mut mail = b"Subject: big\r\nContent-Type: application/octet-stream\r\n\r\n".to_vec();
        let header_len = mail.len() as u64;
        mail.extend(body_of(20 * 1024 * 1024, 9));
        let summary = f
            .messages
            .put_message("b16", date(), uneven(mail.clone()), &id.to_public())
            .await
            .unwrap();
        assert_eq!(summary.size, mail.len() as u64);
        assert_eq!(summary.body.offsets.body, header_len);
        let record = f.messages.load_summary("b16", &id).await.unwrap();
        let tail = f
            .messages
            .read("b16", &record.body_key, summary.size - 10..summary.size)
            .await
            .unwrap();
        assert_eq!(tail.as_ref(), &mail[mail.len() - 10..]);

        let small = f.messages.clone().with_parse_limit(1000);
        let err = small
            .put_message("b17", date(), uneven(vec![b'x'; 1001]), &id.to_public())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, MessageError::TooLarge { key, limit: 1000 } if key == "m/00ab/b17"),
            "{err}"
        );
        assert!(f.raw.head("m/00ab/b17").await.unwrap().is_none());
        assert!(f.raw.head("s/00ab/b17").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn put_message_counts_the_message_before_its_summary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().to_path_buf(),
        })
        .await
        .unwrap();
        let user = crate::users::UserId("00cd".into());
        let messages = MessageStore::from_store(&store, "00cd").unwrap();
        let id = age::x25519::Identity::generate();
        let summary = messages
            .put_message(
                "aa",
                date(),
                uneven(MAIL.as_bytes().to_vec()),
                &id.to_public(),
            )
            .await
            .unwrap();
        let usage = Usage::read(store.rows.as_ref(), &user).await.unwrap();
        assert_eq!((usage.bytes, usage.messages), (summary.size, 1));
        // The size is readable from the body blob's size alone.
        let meta = store.blobs.head("m/00cd/aa").await.unwrap().unwrap();
        assert_eq!(body_plain_size(meta.size), Some(summary.size));
        for len in [
            0,
            1,
            BODY_CHUNK - 1,
            BODY_CHUNK,
            BODY_CHUNK + 1,
            5 * BODY_CHUNK,
        ] {
            assert_eq!(body_plain_size(body_blob_size(len)), Some(len), "{len}");
        }
        assert_eq!(body_plain_size(3), None);

        // Too large: nothing stored, nothing counted.
        let small = messages.clone().with_parse_limit(10);
        assert!(
            small
                .put_message("ab", date(), uneven(vec![b'x'; 11]), &id.to_public())
                .await
                .is_err()
        );
        let usage = Usage::read(store.rows.as_ref(), &user).await.unwrap();
        assert_eq!(usage.messages, 1);
        // A bare store counts nothing.
        let bare = MessageStore::new(store.blobs.clone(), "00cd").unwrap();
        bare.put_message("ac", date(), uneven(b"x".to_vec()), &id.to_public())
            .await
            .unwrap();
        assert_eq!(
            Usage::read(store.rows.as_ref(), &user)
                .await
                .unwrap()
                .messages,
            1
        );
    }

    #[tokio::test]
    async fn summary_of_another_version_is_refused() {
        let f = fixture().await;
        let id = age::x25519::Identity::generate();
        let summary = Summary::parse(MAIL.as_bytes(), date());
        let mut record = SummaryRecord::new(summary, MessageKey::random());
        record.version = 9;
        let sealed = crypto::encrypt_to(&id.to_public(), &record.encode().unwrap()).unwrap();
        f.raw
            .put_bytes("s/00ab/99", Bytes::from(sealed))
            .await
            .unwrap();
        let err = f.messages.load_summary("99", &id).await.unwrap_err();
        assert!(
            matches!(err, MessageError::UnsupportedVersion { version: 9, .. }),
            "{err}"
        );
    }
}
