//! The sweep: removes message blobs (`m/<user>/<id>`, `s/<user>/<id>`) that no mailbox refers
//! to: bodies left by a crash mid-APPEND (blob written, op never), and messages expunged from
//! every mailbox, deleted mailboxes included (a DELETE expunges its mailbox's messages). It
//! reads every mailbox's state, so it runs in a process that holds the user's identity.
//!
//! A message is referenced while it is live in any mailbox, **deleted mailboxes included**: a
//! message still live in a deleted mailbox was added concurrently with the DELETE's expunge and
//! waits to be rescued into another mailbox (`MailOp::ExpungeAll`); once rescued or expunged it
//! is collectable like any other.
//!
//! # Two passes, a grace period apart
//!
//! A blob listing has no modification time, and an APPEND writes its blob seconds before its op
//! (a COPY reads a live message seconds before writing its own op). So a pass never deletes what
//! it finds unreferenced: it records it as a candidate, with the time (the sweeper's clock) and a
//! fingerprint of every mailbox that ever added the message (which, the UID of its last instance
//! there, whether live there, whether the mailbox is deleted). A later pass deletes a candidate
//! only if it is still unreferenced,
//! its fingerprint is unchanged, and at least the grace period (default 24 h) has passed since
//! it was recorded. Why that is safe:
//! - an operation that will reference a blob started from it (wrote it, or read it live in some
//!   mailbox) and writes its op within seconds; the grace is hours;
//! - if the message was unreferenced when recorded, an operation that references it later must
//!   have started before that (the op then lands within the grace and the message is referenced
//!   at the second pass), or after the message was added again somewhere, which changes the
//!   fingerprint (an add gets a new UID, and UIDs are never reused), and a changed fingerprint
//!   starts the wait again;
//! - a pass deletes nothing unless it read the whole mailbox list and every mailbox log
//!   successfully: any error stops it before the first delete.
//!
//! Both passes use wall-clock time from the sweeper's clock (a crashed sweeper's successor must
//! honour what it recorded); a clock going backwards only delays, one jumping forward by more
//! than the grace would shorten it.
//!
//! # Order of deletion, and the usage counter
//!
//! Summary first, then the usage decrement, then the body. A body without its summary is
//! harmless and recognisably unfinished (`put_message` writes it the same way round); a summary
//! without its body would be a message whose headers show and whose body fails. The summary is
//! also the mark of a counted message (`put_message` counts before writing it), so the size is
//! subtracted only when a summary is removed, and a crash at any step leaves the counter at
//! worst one message too high and at most garbage for the next pass.
//!
//! # One sweeper at a time
//!
//! A lease row (`u/<user>/sweep`, key `lease`, encrypted) keeps two sweeps of one user apart, so
//! a removed message is subtracted once and the usage compaction has one writer: write the lease
//! with the token of the read that found it free or expired, read it back, go on only if it is
//! the one value there (two racing sweepers both see two values and both back off). Before every
//! delete, the holder checks on its clock that its lease has a quarter of its time left.
//!
//! Candidates are kept in the same partition under `candidates`, encrypted to the user: the
//! message ids are random, but nothing the sweep writes needs to be readable without the key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use age::x25519;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::mailbox::{Mailbox, MailboxError, MailboxKeys};
use super::mailbox_list::{ListError, MailboxId, MailboxList};
use super::message::{MessageError, MessageStore, body_plain_size};
use super::usage::{CompactStats, Usage, UsageCounts, UsageError, UsageWriter};
use crate::crypto::{self, CryptoError};
use crate::log::store::LogStore;
use crate::storage::{BlobStore, CausalityToken, RowStore, StorageError, Store};
use crate::users::UserId;

const FORMAT_VERSION: u8 = 1;
const LEASE_KEY: &str = "lease";
const CANDIDATES_KEY: &str = "candidates";

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("another sweep of this user holds the lease until {until_ms} ms")]
    Busy { until_ms: u64 },
    #[error("the sweep lease ran out before the pass finished; stopped before deleting more")]
    LeaseExpired,
    #[error("sweep storage error on {what}: {source}")]
    Storage {
        what: String,
        #[source]
        source: StorageError,
    },
    #[error("sweep cannot read the mailbox list: {0}")]
    List(#[from] ListError),
    #[error("sweep cannot read mailbox {mailbox}: {source}")]
    Mailbox {
        mailbox: String,
        #[source]
        source: MailboxError,
    },
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error(transparent)]
    Rescue(#[from] super::rescue::RescueError),
    #[error("cannot seal or open {key}: {source}")]
    Crypto {
        key: String,
        #[source]
        source: CryptoError,
    },
    #[error("sweep row {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("sweep row {key} has format version {found}, this build reads {supported}")]
    UnsupportedVersion {
        key: String,
        found: u8,
        supported: u8,
    },
}

impl SweepError {
    fn storage(what: impl Into<String>) -> impl FnOnce(StorageError) -> SweepError {
        let what = what.into();
        move |source| SweepError::Storage { what, source }
    }
}

/// Wall-clock milliseconds, as the sweeper sees them.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// Least time between recording a candidate and deleting it.
    pub grace: Duration,
    /// How long a pass may hold the lease.
    pub lease: Duration,
    /// Most candidates kept at once (bounds the candidates row); more are found next time.
    pub max_candidates: usize,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            grace: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(30 * 60),
            max_candidates: 10_000,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Mailbox logs read (live and deleted, INBOX always).
    pub mailboxes: usize,
    /// Messages added concurrently with a DELETE, moved to INBOX (`mail::rescue`).
    pub rescued: usize,
    /// Message ids found in the blob listing.
    pub scanned: usize,
    /// Of those, live in some mailbox.
    pub referenced: usize,
    /// Candidates recorded after this pass (waiting for their grace).
    pub candidates: usize,
    /// Messages deleted by this pass.
    pub deleted: usize,
    /// Stored bytes (bodies and summaries) deleted.
    pub bytes_freed: u64,
    pub usage: CompactStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    holder: u64,
    run: u64,
    until_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Candidate {
    first_seen_ms: u64,
    refs: [u8; 8],
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Candidates {
    entries: BTreeMap<String, Candidate>,
}

impl Candidates {
    /// Siblings (only if the lease failed): a record both agree on keeps the later time; one
    /// they disagree on is dropped, to be recorded afresh.
    fn merge(mut self, o: Candidates) -> Candidates {
        let mut conflicting = Vec::new();
        for (id, c) in o.entries {
            match self.entries.get_mut(&id) {
                Some(mine) if mine.refs == c.refs => {
                    mine.first_seen_ms = mine.first_seen_ms.max(c.first_seen_ms)
                }
                Some(_) => conflicting.push(id),
                None => {
                    self.entries.insert(id, c);
                }
            }
        }
        for id in conflicting {
            self.entries.remove(&id);
        }
        self
    }
}

/// What the listing shows of one message id: stored sizes of its blobs.
#[derive(Debug, Clone, Copy, Default)]
struct Listed {
    body: Option<u64>,
    summary: Option<u64>,
}

/// One mailbox that ever added a message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Ref {
    mailbox: MailboxId,
    uid: u64,
    live: bool,
    mailbox_deleted: bool,
}

fn fingerprint(refs: Option<&Vec<Ref>>) -> [u8; 8] {
    let mut h = Sha256::new();
    let mut sorted: Vec<&Ref> = refs.map(|r| r.iter().collect()).unwrap_or_default();
    sorted.sort();
    for r in sorted {
        h.update(r.mailbox.0.as_bytes());
        h.update([0]);
        h.update(r.uid.to_be_bytes());
        h.update([u8::from(r.live), u8::from(r.mailbox_deleted)]);
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Sweeps one user's messages.
pub struct Sweeper {
    rows: Arc<dyn RowStore>,
    blobs: Arc<dyn BlobStore>,
    user: UserId,
    identity: Arc<x25519::Identity>,
    messages: MessageStore,
    usage: Usage,
    config: SweepConfig,
    clock: Arc<dyn Clock>,
    holder: u64,
    /// One pass at a time per sweeper.
    serial: tokio::sync::Mutex<()>,
}

impl Sweeper {
    pub fn new(
        store: &Store,
        user: UserId,
        identity: Arc<x25519::Identity>,
    ) -> Result<Sweeper, SweepError> {
        Ok(Sweeper {
            rows: store.rows.clone(),
            blobs: store.blobs.clone(),
            messages: MessageStore::new(store.blobs.clone(), &user.0)?,
            usage: Usage::for_process(store.rows.clone(), user.clone()),
            user,
            identity,
            config: SweepConfig::default(),
            clock: Arc::new(SystemClock),
            holder: rand::random(),
            serial: tokio::sync::Mutex::new(()),
        })
    }

    pub fn with_config(mut self, config: SweepConfig) -> Sweeper {
        self.config = config;
        self
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Sweeper {
        self.clock = clock;
        self
    }

    /// The writer that records what the sweep removes (the process's by default).
    pub fn with_usage_writer(mut self, writer: Arc<UsageWriter>) -> Sweeper {
        self.usage = Usage::new(self.rows.clone(), self.user.clone(), writer);
        self
    }

    fn partition(&self) -> String {
        format!("u/{}/sweep", self.user.0)
    }

    fn seal<T: Serialize>(&self, key: &str, value: &T) -> Result<Vec<u8>, SweepError> {
        let plain = postcard::to_allocvec(value).map_err(|e| SweepError::Corrupt {
            key: key.to_string(),
            detail: e.to_string(),
        })?;
        let mut out = vec![FORMAT_VERSION];
        out.extend(
            crypto::encrypt_to(&self.identity.to_public(), &plain).map_err(|source| {
                SweepError::Crypto {
                    key: key.to_string(),
                    source,
                }
            })?,
        );
        Ok(out)
    }

    fn open<T: for<'de> Deserialize<'de>>(&self, key: &str, raw: &[u8]) -> Result<T, SweepError> {
        match raw.split_first() {
            Some((&FORMAT_VERSION, sealed)) => {
                let plain =
                    crypto::decrypt_with(&self.identity, sealed, key).map_err(|source| {
                        SweepError::Crypto {
                            key: key.to_string(),
                            source,
                        }
                    })?;
                postcard::from_bytes(&plain).map_err(|e| SweepError::Corrupt {
                    key: key.to_string(),
                    detail: e.to_string(),
                })
            }
            Some((&v, _)) => Err(SweepError::UnsupportedVersion {
                key: key.to_string(),
                found: v,
                supported: FORMAT_VERSION,
            }),
            None => Err(SweepError::Corrupt {
                key: key.to_string(),
                detail: "empty value".into(),
            }),
        }
    }

    /// One pass: see the module comment. Fails with `Busy` when another sweep of the user runs.
    pub async fn run_once(&self) -> Result<SweepStats, SweepError> {
        let _serial = self.serial.lock().await;
        let (lease, token) = self.acquire().await?;
        let result = self.pass(&lease).await;
        if let Err(e) = self
            .rows
            .delete_item(&self.partition(), LEASE_KEY, &token)
            .await
        {
            // It expires by itself.
            tracing::warn!(user = %self.user.0, error = %e, "cannot release the sweep lease");
        }
        result
    }

    async fn acquire(&self) -> Result<(Lease, CausalityToken), SweepError> {
        let part = self.partition();
        let now = self.clock.now_ms();
        let read = self
            .rows
            .read_item(&part, LEASE_KEY)
            .await
            .map_err(SweepError::storage("the sweep lease"))?;
        if let Some(item) = &read {
            for raw in item.live_values() {
                let l: Lease = self.open(LEASE_KEY, raw)?;
                if l.until_ms > now && l.holder != self.holder {
                    return Err(SweepError::Busy {
                        until_ms: l.until_ms,
                    });
                }
            }
        }
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let mine = Lease {
            holder: self.holder,
            run: rand::random(),
            until_ms: now.saturating_add(lease_ms),
        };
        self.rows
            .insert_item(
                &part,
                LEASE_KEY,
                read.as_ref().map(|i| &i.token),
                self.seal(LEASE_KEY, &mine)?,
            )
            .await
            .map_err(SweepError::storage("the sweep lease"))?;
        let after = self
            .rows
            .read_item(&part, LEASE_KEY)
            .await
            .map_err(SweepError::storage("the sweep lease"))?;
        let Some(after) = after else {
            return Err(SweepError::Busy { until_ms: now });
        };
        let values: Vec<Lease> = after
            .live_values()
            .map(|raw| self.open(LEASE_KEY, raw))
            .collect::<Result<_, _>>()?;
        if values.len() == 1 && values[0] == mine && !after.values.contains(&None) {
            Ok((mine, after.token))
        } else {
            let until_ms = values.iter().map(|l| l.until_ms).max().unwrap_or(now);
            Err(SweepError::Busy { until_ms })
        }
    }

    /// Refuses to go on when less than a quarter of the lease is left.
    fn check_lease(&self, lease: &Lease) -> Result<(), SweepError> {
        let margin = u64::try_from(self.config.lease.as_millis() / 4).unwrap_or(u64::MAX);
        if self.clock.now_ms().saturating_add(margin) >= lease.until_ms {
            return Err(SweepError::LeaseExpired);
        }
        Ok(())
    }

    async fn load_candidates(&self) -> Result<(Candidates, Option<CausalityToken>), SweepError> {
        let item = self
            .rows
            .read_item(&self.partition(), CANDIDATES_KEY)
            .await
            .map_err(SweepError::storage("the sweep candidates"))?;
        let Some(item) = item else {
            return Ok((Candidates::default(), None));
        };
        let mut out: Option<Candidates> = None;
        for raw in item.live_values() {
            let c: Candidates = self.open(CANDIDATES_KEY, raw)?;
            out = Some(match out {
                None => c,
                Some(o) => o.merge(c),
            });
        }
        Ok((out.unwrap_or_default(), Some(item.token)))
    }

    /// Every message id with a body or a summary blob.
    async fn list_messages(&self) -> Result<BTreeMap<String, Listed>, SweepError> {
        let mut out: BTreeMap<String, Listed> = BTreeMap::new();
        for (kind, is_body) in [("m", true), ("s", false)] {
            let prefix = format!("{kind}/{}/", self.user.0);
            let mut continuation: Option<String> = None;
            loop {
                let page = self
                    .blobs
                    .list(&prefix, continuation.as_deref())
                    .await
                    .map_err(SweepError::storage(format!("the listing of {prefix}")))?;
                for b in page.blobs {
                    let Some(id) = b.key.strip_prefix(&prefix) else {
                        continue;
                    };
                    // Only what `MessageStore` would have written; anything else is left alone.
                    if self.messages.body_key(id).is_err() {
                        tracing::warn!(key = %b.key, "sweep skips a blob that is not a message");
                        continue;
                    }
                    let e = out.entry(id.to_string()).or_default();
                    if is_body {
                        e.body = Some(b.size);
                    } else {
                        e.summary = Some(b.size);
                    }
                }
                match page.continuation {
                    Some(c) => continuation = Some(c),
                    None => break,
                }
            }
        }
        Ok(out)
    }

    /// For every message any mailbox ever added: where, and whether live there. Reads every
    /// mailbox of the list (deleted ones included) and INBOX (which LMTP fills before the list
    /// exists). Fails as a whole if any of them cannot be read.
    async fn references(&self) -> Result<(usize, BTreeMap<String, Vec<Ref>>), SweepError> {
        let list = MailboxList::new(
            self.rows.clone(),
            self.user.clone(),
            self.identity.to_public(),
            self.identity.clone(),
        );
        let mut ids: BTreeMap<MailboxId, bool> = list
            .all_ids()
            .await?
            .into_iter()
            .map(|l| (l.id, l.deleted))
            .collect();
        ids.entry(MailboxId::inbox(&self.user)).or_insert(false);
        let keys = MailboxKeys {
            recipient: self.identity.to_public(),
            identity: Some(self.identity.clone()),
        };
        let mut refs: BTreeMap<String, Vec<Ref>> = BTreeMap::new();
        for (id, deleted) in &ids {
            let err = |source| SweepError::Mailbox {
                mailbox: id.0.clone(),
                source,
            };
            let log = LogStore::new(self.rows.clone(), self.blobs.clone(), id.log_partition());
            let mailbox = Mailbox::open(log, keys.clone()).await.map_err(err)?;
            let state = mailbox.state().await.map_err(err)?;
            for (msg, uid) in &state.uids {
                let live = state.messages.get(uid).is_some_and(|m| &m.id == msg);
                refs.entry(msg.0.clone()).or_default().push(Ref {
                    mailbox: id.clone(),
                    uid: *uid,
                    live,
                    mailbox_deleted: *deleted,
                });
            }
        }
        Ok((ids.len(), refs))
    }

    async fn pass(&self, lease: &Lease) -> Result<SweepStats, SweepError> {
        // Messages added concurrently with a DELETE move to INBOX first, so they are referenced.
        let rescue = super::rescue::rescue_deleted(
            self.rows.clone(),
            self.blobs.clone(),
            &self.user,
            self.identity.clone(),
        )
        .await?;
        let (previous, token) = self.load_candidates().await?;
        // Listing before the states: a blob written after the listing waits for the next pass;
        // one listed here whose op lands before the states are read is seen referenced.
        let listing = self.list_messages().await?;
        let (mailboxes, refs) = self.references().await?;
        let now = self.clock.now_ms();
        let grace_ms = u64::try_from(self.config.grace.as_millis()).unwrap_or(u64::MAX);
        let mut stats = SweepStats {
            mailboxes,
            rescued: rescue.rescued,
            ..Default::default()
        };

        let mut next = Candidates::default();
        let mut fresh = Vec::new();
        let mut due = Vec::new();
        for (id, listed) in &listing {
            stats.scanned += 1;
            let r = refs.get(id);
            if r.is_some_and(|r| r.iter().any(|r| r.live)) {
                stats.referenced += 1;
                continue;
            }
            let fp = fingerprint(r);
            match previous.entries.get(id) {
                Some(c) if c.refs == fp && now.saturating_sub(c.first_seen_ms) >= grace_ms => {
                    due.push((id.clone(), *listed))
                }
                Some(c) if c.refs == fp => {
                    next.entries.insert(id.clone(), *c);
                }
                _ => fresh.push((
                    id.clone(),
                    Candidate {
                        first_seen_ms: now,
                        refs: fp,
                    },
                )),
            }
        }
        for (id, c) in fresh {
            if next.entries.len() >= self.config.max_candidates {
                break;
            }
            next.entries.insert(id, c);
        }

        for (id, listed) in due {
            self.check_lease(lease)?;
            self.delete_message(&id, listed).await?;
            stats.deleted += 1;
            stats.bytes_freed += listed.body.unwrap_or(0) + listed.summary.unwrap_or(0);
        }

        stats.candidates = next.entries.len();
        if token.is_some() || !next.entries.is_empty() {
            let value = self.seal(CANDIDATES_KEY, &next)?;
            self.rows
                .insert_item(&self.partition(), CANDIDATES_KEY, token.as_ref(), value)
                .await
                .map_err(SweepError::storage("the sweep candidates"))?;
        }

        self.check_lease(lease)?;
        stats.usage =
            Usage::compact(self.rows.as_ref(), &self.user, now, self.config.grace).await?;
        Ok(stats)
    }

    /// Summary, usage, body: see the module comment.
    async fn delete_message(&self, id: &str, listed: Listed) -> Result<(), SweepError> {
        let summary_key = self.messages.summary_key(id)?;
        let body_key = self.messages.body_key(id)?;
        if listed.summary.is_some() {
            let size = match listed.body.and_then(body_plain_size) {
                Some(size) => size,
                // No usable body: the summary knows the size.
                None => self
                    .messages
                    .load_summary(id, &self.identity)
                    .await
                    .map(|r| r.summary.size)
                    .unwrap_or(0),
            };
            self.blobs
                .delete(&summary_key)
                .await
                .map_err(SweepError::storage(summary_key.clone()))?;
            self.usage.add(UsageCounts::removed(size)).await?;
        }
        if listed.body.is_some() {
            self.blobs
                .delete(&body_key)
                .await
                .map_err(SweepError::storage(body_key.clone()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet as Set;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::mail::summary::InternalDate;
    use crate::mail::usage::UsageFigures;
    use crate::mail::view::{MailOp, MessageId};
    use crate::storage::StorageConfig;
    use crate::storage::blob::stream_of;

    const USER: &str = "00ab12";

    struct ManualClock(AtomicU64);

    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    struct Env {
        _dir: tempfile::TempDir,
        store: Store,
        identity: Arc<x25519::Identity>,
        clock: Arc<ManualClock>,
        messages: MessageStore,
        list: MailboxList,
    }

    impl Env {
        async fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&StorageConfig::Local {
                path: dir.path().into(),
            })
            .await
            .unwrap();
            let identity = Arc::new(x25519::Identity::generate());
            let messages = MessageStore::new(store.blobs.clone(), USER)
                .unwrap()
                .with_usage(Usage::new(store.rows.clone(), user(), UsageWriter::new()));
            let list = MailboxList::new(
                store.rows.clone(),
                user(),
                identity.to_public(),
                identity.clone(),
            );
            list.ensure_defaults().await.unwrap();
            Env {
                _dir: dir,
                store,
                identity,
                clock: Arc::new(ManualClock(AtomicU64::new(1_000_000))),
                messages,
                list,
            }
        }

        fn sweeper(&self) -> Sweeper {
            Sweeper::new(&self.store, user(), self.identity.clone())
                .unwrap()
                .with_clock(self.clock.clone())
                .with_usage_writer(UsageWriter::new())
        }

        fn advance(&self, ms: u64) {
            self.clock.0.fetch_add(ms, Ordering::SeqCst);
        }

        /// Stores a message (body, count, summary) without adding it anywhere.
        async fn store(&self, id: &str, size: usize) -> u64 {
            let mut body = b"Subject: s\r\n\r\n".to_vec();
            body.resize(size, b'x');
            let s = self
                .messages
                .put_message(
                    id,
                    InternalDate {
                        unix_seconds: 1_750_000_000,
                        offset_minutes: 0,
                    },
                    stream_of(Bytes::from(body)),
                    &self.identity.to_public(),
                )
                .await
                .unwrap();
            s.size
        }

        async fn mailbox(&self, id: &MailboxId) -> Mailbox {
            let log = LogStore::new(
                self.store.rows.clone(),
                self.store.blobs.clone(),
                id.log_partition(),
            );
            Mailbox::open(
                log,
                MailboxKeys {
                    recipient: self.identity.to_public(),
                    identity: Some(self.identity.clone()),
                },
            )
            .await
            .unwrap()
        }

        async fn add(&self, mailbox: &MailboxId, msg: &str) {
            let m = self.mailbox(mailbox).await;
            m.write(|uid_floor| MailOp::Add {
                msg: MessageId(msg.into()),
                flags: Set::new(),
                uid_floor,
            })
            .await
            .unwrap();
        }

        async fn expunge(&self, mailbox: &MailboxId, msg: &str) {
            let m = self.mailbox(mailbox).await;
            m.write(|_| MailOp::Expunge {
                msg: MessageId(msg.into()),
            })
            .await
            .unwrap();
        }

        async fn exists(&self, id: &str) -> (bool, bool) {
            let b = self.store.blobs.as_ref();
            (
                b.head(&format!("m/{USER}/{id}")).await.unwrap().is_some(),
                b.head(&format!("s/{USER}/{id}")).await.unwrap().is_some(),
            )
        }

        async fn usage(&self) -> UsageFigures {
            Usage::read(self.store.rows.as_ref(), &user())
                .await
                .unwrap()
        }

        fn inbox(&self) -> MailboxId {
            MailboxId::inbox(&user())
        }
    }

    fn user() -> UserId {
        UserId(USER.into())
    }

    fn grace() -> u64 {
        SweepConfig::default().grace.as_millis() as u64
    }

    #[tokio::test]
    async fn an_orphan_goes_only_on_a_second_pass_after_the_grace() {
        let env = Env::new().await;
        let kept = env.store("0a", 500).await;
        env.add(&env.inbox(), "0a").await;
        let orphan = env.store("0b", 700).await;
        assert_eq!(
            env.usage().await,
            UsageFigures {
                bytes: kept + orphan,
                messages: 2
            }
        );
        let sweeper = env.sweeper();

        let s = sweeper.run_once().await.unwrap();
        assert_eq!(
            (s.scanned, s.referenced, s.candidates, s.deleted),
            (2, 1, 1, 0)
        );
        assert_eq!(env.exists("0b").await, (true, true));

        // Just short of the grace: still there.
        env.advance(grace() - 1);
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.candidates, s.deleted), (1, 0));
        assert_eq!(env.exists("0b").await, (true, true));

        env.advance(1);
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.candidates, s.deleted), (0, 1));
        let freed = crate::mail::message::body_blob_size(orphan);
        assert!(s.bytes_freed > freed, "body and summary: {}", s.bytes_freed);
        assert_eq!(env.exists("0b").await, (false, false));
        assert_eq!(env.exists("0a").await, (true, true));
        assert_eq!(
            env.usage().await,
            UsageFigures {
                bytes: kept,
                messages: 1
            }
        );
        // The sweep compacted the counter rows, and the figure held.
        assert!(s.usage.rows_folded > 0, "{:?}", s.usage);
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.scanned, s.candidates, s.deleted), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_zero_grace_still_takes_two_passes() {
        let env = Env::new().await;
        env.store("0c", 100).await;
        let sweeper = env.sweeper().with_config(SweepConfig {
            grace: Duration::ZERO,
            ..Default::default()
        });
        assert_eq!(sweeper.run_once().await.unwrap().deleted, 0);
        assert_eq!(sweeper.run_once().await.unwrap().deleted, 1);
        assert_eq!(env.exists("0c").await, (false, false));
        assert_eq!(env.usage().await, UsageFigures::default());
    }

    #[tokio::test]
    async fn an_expunged_message_is_collected() {
        let env = Env::new().await;
        let size = env.store("1a", 300).await;
        env.add(&env.inbox(), "1a").await;
        let sweeper = env.sweeper();
        assert_eq!(sweeper.run_once().await.unwrap().candidates, 0);
        env.expunge(&env.inbox(), "1a").await;
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.candidates, s.deleted), (1, 0), "recorded, not deleted");
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!(s.deleted, 1);
        assert_eq!(env.exists("1a").await, (false, false));
        assert_eq!(env.usage().await, UsageFigures::default());
        assert!(size > 0);
    }

    #[tokio::test]
    async fn a_copy_in_another_mailbox_keeps_the_message() {
        let env = Env::new().await;
        let size = env.store("2a", 400).await;
        let work = env.list.create("Work", None).await.unwrap().id;
        env.add(&env.inbox(), "2a").await;
        env.add(&work, "2a").await; // COPY
        env.expunge(&env.inbox(), "2a").await;
        let sweeper = env.sweeper();
        for _ in 0..3 {
            let s = sweeper.run_once().await.unwrap();
            assert_eq!((s.referenced, s.candidates, s.deleted), (1, 0, 0));
            env.advance(grace());
        }
        assert_eq!(env.exists("2a").await, (true, true));
        assert_eq!(
            env.usage().await,
            UsageFigures {
                bytes: size,
                messages: 1
            }
        );
        // Gone from the last mailbox too: collected.
        env.expunge(&work, "2a").await;
        assert_eq!(sweeper.run_once().await.unwrap().deleted, 0);
        env.advance(grace());
        assert_eq!(sweeper.run_once().await.unwrap().deleted, 1);
        assert_eq!(env.exists("2a").await, (false, false));
    }

    #[tokio::test]
    async fn messages_of_a_deleted_mailbox_go_unless_another_mailbox_holds_them() {
        let env = Env::new().await;
        let old = env.list.create("Old", None).await.unwrap().id;
        env.store("3a", 100).await;
        let shared = env.store("3b", 200).await;
        env.add(&old, "3a").await;
        env.add(&old, "3b").await;
        env.add(&env.inbox(), "3b").await;
        let sweeper = env.sweeper();
        assert_eq!(sweeper.run_once().await.unwrap().candidates, 0);
        // DELETE: the entry is marked deleted and the mailbox's messages expunged (one
        // `ExpungeAll` op in the IMAP layer; the same state as these expunges).
        assert_eq!(env.list.delete("Old").await.unwrap(), old);
        env.expunge(&old, "3a").await;
        env.expunge(&old, "3b").await;
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.mailboxes, s.referenced, s.candidates), (7, 1, 1));
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!(s.deleted, 1);
        assert_eq!(env.exists("3a").await, (false, false));
        assert_eq!(env.exists("3b").await, (true, true));
        assert_eq!(
            env.usage().await,
            UsageFigures {
                bytes: shared,
                messages: 1
            }
        );
    }

    /// A message added to a mailbox concurrently with its DELETE stays live there, waiting to
    /// be rescued: the sweep keeps it.
    #[tokio::test]
    async fn a_message_still_live_in_a_deleted_mailbox_is_kept() {
        let env = Env::new().await;
        let old = env.list.create("Old", None).await.unwrap().id;
        env.store("3c", 100).await;
        env.list.delete("Old").await.unwrap();
        env.add(&old, "3c").await;
        let sweeper = env.sweeper();
        for _ in 0..3 {
            let s = sweeper.run_once().await.unwrap();
            assert_eq!((s.referenced, s.candidates, s.deleted), (1, 0, 0));
            env.advance(grace());
        }
        assert_eq!(env.exists("3c").await, (true, true));
    }

    /// Moved away and back between two passes (a new instance under the same id, so the
    /// mailbox's entry for it looks the same but for its UID): the wait restarts.
    #[tokio::test]
    async fn a_new_instance_in_the_same_mailbox_restarts_the_wait() {
        let env = Env::new().await;
        env.store("3d", 100).await;
        env.add(&env.inbox(), "3d").await;
        env.expunge(&env.inbox(), "3d").await;
        let sweeper = env.sweeper();
        assert_eq!(sweeper.run_once().await.unwrap().candidates, 1);
        let before = env.mailbox(&env.inbox()).await.state().await.unwrap();
        env.add(&env.inbox(), "3d").await;
        env.expunge(&env.inbox(), "3d").await;
        let after = env.mailbox(&env.inbox()).await.state().await.unwrap();
        let id = MessageId("3d".into());
        assert_ne!(after.uids.get(&id), before.uids.get(&id), "a new instance");
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.candidates, s.deleted), (1, 0));
        env.advance(grace());
        assert_eq!(sweeper.run_once().await.unwrap().deleted, 1);
    }

    #[tokio::test]
    async fn a_new_sweeper_finishes_what_a_crashed_one_recorded() {
        let env = Env::new().await;
        env.store("4a", 100).await;
        let first = env.sweeper();
        assert_eq!(first.run_once().await.unwrap().candidates, 1);
        drop(first);
        env.advance(grace());
        let second = env.sweeper();
        assert_eq!(second.run_once().await.unwrap().deleted, 1);
        assert_eq!(env.exists("4a").await, (false, false));

        // A sweeper that died holding the lease: others wait for it to expire.
        env.store("4b", 100).await;
        let dead = env.sweeper();
        let (_lease, _token) = dead.acquire().await.unwrap();
        let other = env.sweeper();
        assert!(matches!(
            other.run_once().await,
            Err(SweepError::Busy { .. })
        ));
        env.advance(SweepConfig::default().lease.as_millis() as u64);
        assert_eq!(other.run_once().await.unwrap().candidates, 1);
    }

    #[tokio::test]
    async fn a_crash_after_deleting_the_summary_leaves_garbage_for_the_next_pass() {
        let env = Env::new().await;
        env.store("5a", 100).await;
        let sweeper = env.sweeper();
        sweeper.run_once().await.unwrap();
        // A previous pass removed the summary and died before the body.
        env.store
            .blobs
            .delete(&format!("s/{USER}/5a"))
            .await
            .unwrap();
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!(s.deleted, 1);
        assert_eq!(env.exists("5a").await, (false, false));
        // Not counted out: the crash left the counter one message high (the safe side).
        assert_eq!(env.usage().await.messages, 1);
    }

    #[tokio::test]
    async fn an_append_that_lands_within_the_grace_is_kept() {
        let env = Env::new().await;
        env.store("6a", 100).await;
        let sweeper = env.sweeper();
        assert_eq!(sweeper.run_once().await.unwrap().candidates, 1);
        // The op of the APPEND lands after the first pass.
        env.add(&env.inbox(), "6a").await;
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.referenced, s.candidates, s.deleted), (1, 0, 0));
        assert_eq!(env.exists("6a").await, (true, true));
    }

    /// A candidate that was copied somewhere and expunged there between two passes: an
    /// operation started from that short life may still be in flight, so the wait restarts.
    #[tokio::test]
    async fn a_reference_that_came_and_went_restarts_the_wait() {
        let env = Env::new().await;
        env.store("7a", 100).await;
        env.add(&env.inbox(), "7a").await;
        env.expunge(&env.inbox(), "7a").await;
        let sweeper = env.sweeper();
        assert_eq!(sweeper.run_once().await.unwrap().candidates, 1);
        let junk = env.list.find("Junk").await.unwrap().unwrap().id;
        env.add(&junk, "7a").await;
        env.expunge(&junk, "7a").await;
        env.advance(grace());
        let s = sweeper.run_once().await.unwrap();
        assert_eq!((s.candidates, s.deleted), (1, 0));
        env.advance(grace());
        assert_eq!(sweeper.run_once().await.unwrap().deleted, 1);
    }

    #[tokio::test]
    async fn the_candidates_row_is_sealed_and_errors_delete_nothing() {
        let env = Env::new().await;
        env.store("8abcdef0", 100).await;
        let sweeper = env.sweeper();
        sweeper.run_once().await.unwrap();
        let item = env
            .store
            .rows
            .read_item(&format!("u/{USER}/sweep"), CANDIDATES_KEY)
            .await
            .unwrap()
            .unwrap();
        for v in item.live_values() {
            assert!(!v.windows(8).any(|w| w == b"8abcdef0"));
        }
        // An unreadable mailbox list: the pass fails before deleting anything.
        env.store
            .rows
            .insert_item(&format!("u/{USER}/mailboxes"), "ffff", None, vec![1, 2, 3])
            .await
            .unwrap();
        env.advance(grace());
        let unreadable = |e: &SweepError| {
            matches!(
                e,
                SweepError::List(_)
                    | SweepError::Rescue(super::super::rescue::RescueError::List(_))
            )
        };
        let err = sweeper.run_once().await.unwrap_err();
        assert!(unreadable(&err), "{err}");
        assert_eq!(env.exists("8abcdef0").await, (true, true));
        // The lease was released: another sweeper is not kept waiting.
        let err = env.sweeper().run_once().await.unwrap_err();
        assert!(unreadable(&err), "{err}");
    }

    #[tokio::test]
    async fn two_sweepers_racing_for_the_lease_do_not_both_run() {
        let env = Env::new().await;
        let (a, b) = (env.sweeper(), env.sweeper());
        let (ra, rb) = tokio::join!(a.acquire(), b.acquire());
        assert!(
            ra.is_err() || rb.is_err(),
            "at most one holds the lease: {:?} {:?}",
            ra.as_ref().map(|r| r.0),
            rb.as_ref().map(|r| r.0)
        );
    }
}
