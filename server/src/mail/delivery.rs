//! Delivery: a message into a user's INBOX, with the user's public recipient only (no password,
//! no identity), whether or not the user is logged in anywhere. LMTP uses it; so can an import.
//!
//! # What a success means
//!
//! [`Deliverer::deliver`] returns `Ok` only once the message's blobs and its log op (an `Add`
//! in INBOX) are acknowledged by the store, so a 250 never covers a message a crash can lose.
//!
//! # Through which handle
//!
//! When a session of this process holds the user's INBOX (`Accounts::held_mailbox`), the
//! delivery writes through that very handle: every IMAP session on it, IDLE included, is woken
//! at once, with no storage round trip. Otherwise it writes through a keyless handle
//! (`MailboxKeys { identity: None }`), kept for a few minutes per user so that a burst of
//! deliveries registers one writer, not one per message.
//!
//! # Duplicates: a retry after a crash or a lost acknowledgement
//!
//! A delivery that was stored but not acknowledged (the process died, or the store answered
//! too late) is retried by the sender with the same bytes. It must not leave two copies. Each
//! delivery is recorded in a row, partition `u/<user id>/delivered`, sort key
//! `<bucket>/<fingerprint>`:
//! - fingerprint: SHA-256 over the user id, the user's public recipient, the envelope sender
//!   and the message bytes as received (before the trace headers added here, which carry the
//!   arrival time), first 16 bytes in hex. The recipient is not in the store, so an observer of
//!   the store alone cannot test a guessed message against the rows;
//! - bucket: wall-clock time divided by the window (default 24 h), 16 hex digits;
//! - value (plaintext, version byte + postcard): the message id chosen, when, and whether the
//!   log op was acknowledged (`done`).
//!
//! Order, and why it survives a crash at any point:
//! 1. Look the fingerprint up in the current and the previous bucket (so a retry is recognised
//!    for at least one window and at most two). `done` → answer success, write nothing.
//! 2. Otherwise write the row, `done: false`, with a fresh message id — **before** anything
//!    else, and wait for it to be acknowledged. A failure here stores nothing. From then on,
//!    anything stored implies an acknowledged row that a retry reads (quorum reads on Garage).
//! 3. Store the blobs (`put_message`), then the `Add` op.
//! 4. Write the row again with `done: true` (a sibling of the first value, no token needed:
//!    readers take `done` if any sibling has it). Its failure is only logged: the op is stored.
//!
//! A retry that finds `done: false` resumes with the recorded message id: it stores the blobs
//! again only if the summary blob is missing (the summary is written last, so present means
//! complete), and writes the `Add` again. A second `Add` of an id that is live is a retried
//! write to the log (`view.rs`): it shows once. Through a handle with the key, an id the
//! mailbox ever had (even expunged since) is not added again. One gap remains, documented in
//! docs/lmtp.md: a keyless retry after a crash between steps 3 and 4, of a message the user
//! expunged in the meantime, brings it back once.
//!
//! Rows older than the previous bucket are deleted in one range delete, at most once per user
//! and bucket per process, after a delivery.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use age::x25519;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::account::{Accounts, OpenMailbox, new_message_id};
use super::mailbox::{Mailbox, MailboxError, MailboxKeys};
use super::mailbox_list::MailboxId;
use super::message::{DEFAULT_PARSE_LIMIT, MessageError, MessageStore};
use super::summary::InternalDate;
use super::usage::{Usage, UsageError};
use super::view::{MailOp, MessageId};
use crate::crypto::CryptoError;
use crate::log::store::LogStore;
use crate::storage::{DeleteRange, KeyRange, ReadRange, StorageError};
use crate::users::{User, UserId};

const DEDUP_FORMAT_VERSION: u8 = 1;
/// Keyless INBOX handles kept at most, and how long an unused one is kept.
const KEYLESS_HANDLES: usize = 256;
const KEYLESS_IDLE: Duration = Duration::from_secs(300);

/// Limits of delivery.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryPolicy {
    /// Largest message stored (trace headers included). At most the message store's parse
    /// limit, which refuses anything larger.
    pub max_message_size: u64,
    /// A retry with the same bytes within this window (at least; at most twice it) finds the
    /// first delivery and stores nothing.
    pub dedup_window: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> DeliveryPolicy {
        DeliveryPolicy {
            max_message_size: DEFAULT_PARSE_LIMIT,
            dedup_window: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("message of {size} bytes exceeds the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
    #[error("over quota: {used} of {quota} bytes used, the message has {size}")]
    OverQuota { used: u64, quota: u64, size: u64 },
    #[error("user {user}: the public key cannot be used: {source}")]
    Keys {
        user: String,
        #[source]
        source: CryptoError,
    },
    #[error("reading the usage counter: {0}")]
    Usage(#[from] UsageError),
    #[error("delivery record {key}: {source}")]
    Record {
        key: String,
        #[source]
        source: StorageError,
    },
    #[error("delivery record {key} is corrupt: {detail}")]
    CorruptRecord { key: String, detail: String },
    #[error(transparent)]
    Message(MessageError),
    #[error(transparent)]
    Mailbox(#[from] MailboxError),
    #[error("the store did not acknowledge the delivery within {0:?}")]
    TimedOut(Duration),
    #[error("delivery task failed: {0}")]
    Task(String),
}

impl From<MessageError> for DeliveryError {
    fn from(e: MessageError) -> DeliveryError {
        match e {
            MessageError::TooLarge { limit, .. } => DeliveryError::TooLarge {
                size: limit.saturating_add(1),
                limit,
            },
            other => DeliveryError::Message(other),
        }
    }
}

impl DeliveryError {
    /// Retrying later cannot help (the sender should bounce).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            DeliveryError::TooLarge { .. } | DeliveryError::OverQuota { .. }
        )
    }
}

/// A message to deliver, as the envelope and the client gave it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Envelope sender (`MAIL FROM`), empty for the null sender of bounces.
    pub sender: String,
    /// Trace header lines stored before the message (Return-Path, Received). Not part of the
    /// duplicate fingerprint: they carry the time of arrival.
    pub trace: Bytes,
    /// The message bytes as received.
    pub body: Bytes,
}

impl Incoming {
    pub fn size(&self) -> u64 {
        (self.trace.len() + self.body.len()) as u64
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub message: MessageId,
    /// The UID its writer announced; `None` for a duplicate found in the records.
    pub uid: Option<u64>,
    /// The same bytes had already been delivered (within the window): nothing new stored.
    pub duplicate: bool,
}

/// The value of a delivery record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    message: String,
    at_ms: u64,
    done: bool,
}

fn encode_record(r: &Record) -> Vec<u8> {
    let mut v = vec![DEDUP_FORMAT_VERSION];
    // Serialising three plain fields into a Vec cannot fail.
    v.extend(postcard::to_allocvec(r).unwrap_or_default());
    v
}

fn decode_record(key: &str, raw: &[u8]) -> Result<Record, DeliveryError> {
    let corrupt = |detail: String| DeliveryError::CorruptRecord {
        key: key.to_string(),
        detail,
    };
    match raw.split_first() {
        Some((&DEDUP_FORMAT_VERSION, body)) => {
            postcard::from_bytes(body).map_err(|e| corrupt(e.to_string()))
        }
        Some((v, _)) => Err(corrupt(format!("format version {v}"))),
        None => Err(corrupt("empty value".into())),
    }
}

/// The delivery records of a user.
fn record_partition(user: &UserId) -> String {
    format!("u/{}/delivered", user.0)
}

fn bucket_prefix(bucket: u64) -> String {
    format!("{bucket:016x}/")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The duplicate fingerprint (see the module comment).
fn fingerprint(user: &User, recipient: &str, sender: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"tern/delivery/v1\0");
    for part in [
        user.id.0.as_bytes(),
        recipient.as_bytes(),
        sender.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(body);
    hex::encode(&h.finalize()[..16])
}

/// The INBOX handle a delivery writes through.
enum Inbox {
    /// The one this process's sessions hold (with the key): they see the message at once.
    Held(Arc<OpenMailbox>),
    Keyless(Arc<Mailbox>),
}

impl Deref for Inbox {
    type Target = Mailbox;
    fn deref(&self) -> &Mailbox {
        match self {
            Inbox::Held(m) => m,
            Inbox::Keyless(m) => m,
        }
    }
}

struct KeylessEntry {
    cell: Arc<tokio::sync::OnceCell<Arc<Mailbox>>>,
    used: Instant,
}

/// Delivers messages into INBOXes; one per process, shared by every LMTP session.
pub struct Deliverer {
    accounts: Arc<Accounts>,
    policy: DeliveryPolicy,
    keyless: Mutex<HashMap<UserId, KeylessEntry>>,
    /// Per user, the bucket whose older records were last deleted by this process.
    expired: Mutex<HashMap<UserId, u64>>,
}

impl Deliverer {
    pub fn new(accounts: Arc<Accounts>, policy: DeliveryPolicy) -> Arc<Deliverer> {
        Arc::new(Deliverer {
            accounts,
            policy,
            keyless: Mutex::new(HashMap::new()),
            expired: Mutex::new(HashMap::new()),
        })
    }

    pub fn accounts(&self) -> &Arc<Accounts> {
        &self.accounts
    }

    pub fn policy(&self) -> &DeliveryPolicy {
        &self.policy
    }

    fn window_ms(&self) -> u64 {
        (self.policy.dedup_window.as_millis() as u64).max(1)
    }

    /// Would `size` more bytes take the user over quota? `Ok` when the user has no quota.
    pub async fn check_quota(&self, user: &User, size: u64) -> Result<(), DeliveryError> {
        let Some(quota) = user.quota_bytes else {
            return Ok(());
        };
        let used = Usage::read(self.accounts.store().rows.as_ref(), &user.id)
            .await?
            .bytes;
        if used.saturating_add(size) > quota {
            return Err(DeliveryError::OverQuota { used, quota, size });
        }
        Ok(())
    }

    /// Delivers on a task of its own and waits at most `timeout` for it. The task is never
    /// cancelled half-way (a log write dropped mid-flight could reuse its writer's next op
    /// number); past the timeout it finishes on its own, and a retry finds its record.
    pub async fn deliver_within(
        self: &Arc<Self>,
        user: Arc<User>,
        incoming: Incoming,
        timeout: Duration,
    ) -> Result<Delivered, DeliveryError> {
        let this = self.clone();
        let task = tokio::spawn(async move { this.deliver(&user, &incoming).await });
        match tokio::time::timeout(timeout, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(DeliveryError::Task(e.to_string())),
            Err(_) => Err(DeliveryError::TimedOut(timeout)),
        }
    }

    /// Delivers one message into `user`'s INBOX; see the module comment for the order of
    /// writes and what a retry finds.
    pub async fn deliver(
        &self,
        user: &Arc<User>,
        incoming: &Incoming,
    ) -> Result<Delivered, DeliveryError> {
        let size = incoming.size();
        let limit = self.policy.max_message_size.min(DEFAULT_PARSE_LIMIT);
        if size > limit {
            return Err(DeliveryError::TooLarge { size, limit });
        }
        let recipient = user
            .keys
            .recipient()
            .map_err(|source| DeliveryError::Keys {
                user: user.name.clone(),
                source,
            })?;
        let rows = self.accounts.store().rows.clone();
        let partition = record_partition(&user.id);
        let print = fingerprint(user, &user.keys.recipient, &incoming.sender, &incoming.body);
        let now = now_ms();
        let bucket = now / self.window_ms();

        // 1. A delivery of these bytes already recorded?
        let keys: Vec<String> = [bucket, bucket.saturating_sub(1)]
            .iter()
            .map(|b| format!("{}{print}", bucket_prefix(*b)))
            .collect();
        let pages = rows
            .read_batch(
                keys.iter()
                    .map(|k| ReadRange {
                        partition_key: partition.clone(),
                        range: KeyRange {
                            start: Some(k.clone()),
                            ..Default::default()
                        },
                        single_item: true,
                        ..Default::default()
                    })
                    .collect(),
            )
            .await
            .map_err(|source| DeliveryError::Record {
                key: keys[0].clone(),
                source,
            })?;
        let mut found: Option<(String, Record)> = None;
        for item in pages.iter().flat_map(|p| &p.items) {
            for raw in item.live_values() {
                let r = decode_record(&item.sort_key, raw)?;
                // Siblings (a retry racing its original): `done` wins, then the smallest id,
                // so that every reader resumes the same message.
                let better = match &found {
                    None => true,
                    Some((_, f)) => (!r.done, &r.message) < (!f.done, &f.message),
                };
                if better {
                    found = Some((item.sort_key.clone(), r));
                }
            }
        }
        if let Some((_, r)) = &found
            && r.done
        {
            tracing::info!(user = %user.name, message = %r.message, "duplicate delivery: already stored");
            return Ok(Delivered {
                message: MessageId(r.message.clone()),
                uid: None,
                duplicate: true,
            });
        }
        // Quota after the lookup: a retry of a stored message must not be refused for the
        // space its first copy takes.
        if found.is_none() {
            self.check_quota(user, size).await?;
        }

        // 2. The record first: anything stored from here on is found by a retry.
        let (row_key, record, resumed) = match found {
            Some((key, r)) => (key, r, true),
            None => {
                let r = Record {
                    message: new_message_id().0,
                    at_ms: now,
                    done: false,
                };
                let key = keys[0].clone();
                rows.insert_item(&partition, &key, None, encode_record(&r))
                    .await
                    .map_err(|source| DeliveryError::Record {
                        key: key.clone(),
                        source,
                    })?;
                (key, r, false)
            }
        };
        let id = MessageId(record.message.clone());

        // 3. Blobs, then the op.
        let messages = MessageStore::from_store(self.accounts.store(), &user.id.0)?;
        let stored = resumed
            && self
                .accounts
                .store()
                .blobs
                .head(&messages.summary_key(&id.0)?)
                .await
                .map_err(|source| DeliveryError::Record {
                    key: messages.summary_key(&id.0).unwrap_or_default(),
                    source,
                })?
                .is_some();
        if !stored {
            let body: crate::storage::ByteStream = Box::pin(futures::stream::iter([
                Ok(incoming.trace.clone()),
                Ok(incoming.body.clone()),
            ]));
            messages
                .put_message(&id.0, internal_date(now), body, &recipient)
                .await?;
        }
        let inbox = self.inbox(user, &recipient).await?;
        let uid = match self.add(&inbox, &id, resumed).await? {
            Some(uid) => Some(uid),
            None => {
                tracing::info!(user = %user.name, message = %id.0, "retried delivery: already in INBOX");
                None
            }
        };

        // 4. Mark it done; the op is stored whatever happens here.
        let done = Record {
            done: true,
            ..record
        };
        if let Err(e) = rows
            .insert_item(&partition, &row_key, None, encode_record(&done))
            .await
        {
            tracing::warn!(user = %user.name, key = row_key, error = %e, "delivery stored, but its record could not be marked done");
        }
        self.expire_records(&user.id, bucket);
        Ok(Delivered {
            message: id,
            uid,
            duplicate: uid.is_none(),
        })
    }

    /// Adds the message to INBOX; `None` when the log already had it (a resumed delivery).
    async fn add(
        &self,
        inbox: &Inbox,
        id: &MessageId,
        resumed: bool,
    ) -> Result<Option<u64>, DeliveryError> {
        if resumed && let Inbox::Held(held) = inbox {
            held.sync().await?;
            // With the key, an id the mailbox ever had (expunged since, too) is not re-added.
            if held.state().await?.uids.contains_key(id) {
                return Ok(None);
            }
        }
        let written = inbox
            .write(|uid_floor| MailOp::Add {
                msg: id.clone(),
                flags: Default::default(),
                uid_floor,
            })
            .await;
        match written {
            Ok((_, uid)) => Ok(uid),
            Err(MailboxError::AlreadyPresent { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The handle to write through: the sessions' own when one is held in this process,
    /// otherwise a cached keyless one.
    async fn inbox(
        &self,
        user: &User,
        recipient: &x25519::Recipient,
    ) -> Result<Inbox, DeliveryError> {
        let inbox_id = MailboxId::inbox(&user.id);
        if let Some(held) = self.accounts.held_mailbox(&user.id, &inbox_id).await {
            return Ok(Inbox::Held(held));
        }
        let cell = {
            let mut map = self.keyless.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // An entry still being opened is held by its opener: kept whatever its age.
            map.retain(|_, e| Arc::strong_count(&e.cell) > 1 || now - e.used < KEYLESS_IDLE);
            if map.len() >= KEYLESS_HANDLES && !map.contains_key(&user.id) {
                let oldest = map
                    .iter()
                    .filter(|(_, e)| e.cell.get().is_some())
                    .min_by_key(|(_, e)| e.used)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    map.remove(&k);
                }
            }
            let entry = map.entry(user.id.clone()).or_insert_with(|| KeylessEntry {
                cell: Arc::new(tokio::sync::OnceCell::new()),
                used: now,
            });
            entry.used = now;
            entry.cell.clone()
        };
        let mailbox = cell
            .get_or_try_init(|| async {
                let store = self.accounts.store();
                let log = LogStore::new(
                    store.rows.clone(),
                    store.blobs.clone(),
                    inbox_id.log_partition(),
                );
                let keys = MailboxKeys {
                    recipient: recipient.clone(),
                    identity: None,
                };
                Mailbox::open(log, keys).await.map(Arc::new)
            })
            .await?;
        Ok(Inbox::Keyless(mailbox.clone()))
    }

    /// How many keyless INBOX handles are cached (for tests and metrics).
    pub fn keyless_handles(&self) -> usize {
        self.keyless
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.cell.get().is_some())
            .count()
    }

    /// Deletes the user's records older than the previous bucket, in the background, at most
    /// once per bucket per process.
    fn expire_records(&self, user: &UserId, bucket: u64) {
        let Some(keep_from) = bucket.checked_sub(1).filter(|b| *b > 0) else {
            return;
        };
        {
            let mut map = self.expired.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(user).is_some_and(|b| *b >= bucket) {
                return;
            }
            map.insert(user.clone(), bucket);
        }
        let rows = self.accounts.store().rows.clone();
        let partition = record_partition(user);
        tokio::spawn(async move {
            let range = DeleteRange {
                partition_key: partition.clone(),
                end: Some(bucket_prefix(keep_from)),
                ..Default::default()
            };
            match rows.delete_batch(vec![range]).await {
                Ok(n) => tracing::debug!(
                    partition,
                    deleted = n.first().copied().unwrap_or(0),
                    "old delivery records deleted"
                ),
                Err(e) => {
                    tracing::warn!(partition, error = %e, "deleting old delivery records failed")
                }
            }
        });
    }

    /// Writes a record as a delivery would have (tests of expiry and of resuming).
    #[cfg(test)]
    async fn put_record(&self, user: &UserId, key: &str, r: &Record) {
        self.accounts
            .store()
            .rows
            .insert_item(&record_partition(user), key, None, encode_record(r))
            .await
            .unwrap();
    }
}

fn internal_date(now_ms: u64) -> InternalDate {
    InternalDate {
        unix_seconds: (now_ms / 1000) as i64,
        offset_minutes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use crate::users::UserDirectory;

    struct Env {
        _dir: tempfile::TempDir,
        accounts: Arc<Accounts>,
        alice: Arc<User>,
    }

    async fn env(quota: Option<u64>) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = testing::local_store(dir.path()).await.unwrap();
        let alice = testing::user("alice", "secret", "alice@example.org", quota).unwrap();
        let users = testing::users_file(&dir.path().join("users.yaml"), vec![alice])
            .await
            .unwrap();
        let alice = users.user("alice").await.unwrap().unwrap();
        Env {
            _dir: dir,
            accounts: Accounts::new(store, Arc::new(users)),
            alice,
        }
    }

    fn incoming(body: &str) -> Incoming {
        Incoming {
            sender: "bob@example.net".into(),
            trace: Bytes::from_static(b"Return-Path: <bob@example.net>\r\n"),
            body: Bytes::from(body.to_string()),
        }
    }

    /// INBOX as the user sees it after logging in: (uid, body) pairs.
    async fn inbox_of(env: &Env) -> Vec<(u64, String)> {
        let account = env.accounts.login("alice", "secret").await.unwrap();
        let inbox = account.list.find("INBOX").await.unwrap().unwrap();
        let handle = account.mailbox(&inbox.id).await.unwrap();
        handle.sync().await.unwrap();
        let state = handle.state().await.unwrap();
        let mut out = Vec::new();
        for (uid, m) in &state.messages {
            let record = account.summary(&m.id).await.unwrap();
            let body = account
                .messages
                .read_all(&m.id.0, &record.body_key)
                .await
                .unwrap();
            out.push((*uid, String::from_utf8_lossy(&body).into_owned()));
        }
        out
    }

    const MSG: &str = "Subject: hi\r\n\r\nhello\r\n";

    #[tokio::test]
    async fn keyless_delivery_to_a_user_never_logged_in() {
        let env = env(None).await;
        let d = Deliverer::new(env.accounts.clone(), DeliveryPolicy::default());
        let got = d.deliver(&env.alice, &incoming(MSG)).await.unwrap();
        assert_eq!(got.uid, Some(1));
        assert!(!got.duplicate);
        assert_eq!(env.accounts.live_accounts(), 0, "no login was needed");
        assert_eq!(d.keyless_handles(), 1);
        let inbox = inbox_of(&env).await;
        assert_eq!(
            inbox,
            vec![(1, format!("Return-Path: <bob@example.net>\r\n{MSG}"))]
        );
    }

    #[tokio::test]
    async fn same_bytes_twice_is_one_copy_different_bytes_two() {
        let env = env(None).await;
        let d = Deliverer::new(env.accounts.clone(), DeliveryPolicy::default());
        let first = d.deliver(&env.alice, &incoming(MSG)).await.unwrap();
        let again = d.deliver(&env.alice, &incoming(MSG)).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.message, first.message);
        // Another sender with the same bytes is another message.
        let mut other_sender = incoming(MSG);
        other_sender.sender = "carol@example.net".into();
        let third = d.deliver(&env.alice, &other_sender).await.unwrap();
        assert!(!third.duplicate);
        let fourth = d
            .deliver(&env.alice, &incoming("Subject: other\r\n\r\nx\r\n"))
            .await
            .unwrap();
        assert!(!fourth.duplicate);
        let inbox = inbox_of(&env).await;
        assert_eq!(inbox.len(), 3, "{inbox:?}");
        // A fresh process (no memory of the first delivery) still finds the record.
        let d2 = Deliverer::new(env.accounts.clone(), DeliveryPolicy::default());
        assert!(
            d2.deliver(&env.alice, &incoming(MSG))
                .await
                .unwrap()
                .duplicate
        );
        assert_eq!(inbox_of(&env).await.len(), 3);
    }

    /// Removes a delivery's record and leaves a pending one in its place, as a crash after
    /// the op and before the record was marked done would.
    async fn make_pending(d: &Deliverer, env: &Env, msg: &Incoming, bucket: u64, id: &MessageId) {
        let print = fingerprint(
            &env.alice,
            &env.alice.keys.recipient,
            &msg.sender,
            &msg.body,
        );
        env.accounts
            .store()
            .rows
            .delete_batch(vec![DeleteRange {
                partition_key: record_partition(&env.alice.id),
                ..Default::default()
            }])
            .await
            .unwrap();
        let key = format!("{}{print}", bucket_prefix(bucket));
        let pending = Record {
            message: id.0.clone(),
            at_ms: now_ms(),
            done: false,
        };
        d.put_record(&env.alice.id, &key, &pending).await;
    }

    /// Crashes at each step of a delivery; the retry completes it, once.
    #[tokio::test]
    async fn a_retry_resumes_an_unacknowledged_delivery_without_a_second_copy() {
        let env = env(None).await;
        let d = Deliverer::new(env.accounts.clone(), DeliveryPolicy::default());
        let bucket = now_ms() / d.window_ms();

        // Crash after the record, before anything was stored: the retry stores the message
        // under the recorded id.
        let a = incoming(MSG);
        let recorded = new_message_id();
        make_pending(&d, &env, &a, bucket, &recorded).await;
        let got = d.deliver(&env.alice, &a).await.unwrap();
        assert_eq!(got.message, recorded);
        assert_eq!(got.uid, Some(1));
        assert!(!got.duplicate);
        assert_eq!(inbox_of(&env).await.len(), 1);

        // Crash after the op, before `done`, and the retry comes one window later (the record
        // is in the previous bucket). Keyless: the retry writes the Add again; it shows once.
        let b = incoming("Subject: two\r\n\r\n2\r\n");
        let first = d.deliver(&env.alice, &b).await.unwrap();
        make_pending(&d, &env, &b, bucket - 1, &first.message).await;
        let retry = d.deliver(&env.alice, &b).await.unwrap();
        assert_eq!(retry.message, first.message);
        let inbox = inbox_of(&env).await;
        assert_eq!(inbox.len(), 2, "one copy of each: {inbox:?}");
        // Now the record is done: a further retry writes nothing at all.
        assert!(d.deliver(&env.alice, &b).await.unwrap().duplicate);

        // With the user's INBOX held in this process, a retry of a message the user expunged
        // meanwhile does not bring it back.
        let account = env.accounts.login("alice", "secret").await.unwrap();
        let held = account
            .mailbox(&MailboxId::inbox(&env.alice.id))
            .await
            .unwrap();
        let c = incoming("Subject: three\r\n\r\n3\r\n");
        let third = d.deliver(&env.alice, &c).await.unwrap();
        assert!(third.uid.is_some());
        held.write(|_| MailOp::Expunge {
            msg: third.message.clone(),
        })
        .await
        .unwrap();
        make_pending(&d, &env, &c, bucket, &third.message).await;
        let before = held.floors().await;
        let retry = d.deliver(&env.alice, &c).await.unwrap();
        assert!(retry.duplicate);
        assert_eq!(held.floors().await, before, "no op written");
        assert_eq!(held.state().await.unwrap().messages.len(), 2);
    }

    #[tokio::test]
    async fn quota_and_size_limits() {
        let env = env(Some(120)).await;
        let d = Deliverer::new(
            env.accounts.clone(),
            DeliveryPolicy {
                max_message_size: 80,
                ..Default::default()
            },
        );
        let big = "x".repeat(90);
        assert!(matches!(
            d.deliver(&env.alice, &incoming(&big)).await,
            Err(DeliveryError::TooLarge { limit: 80, .. })
        ));
        let small = incoming("Subject: a\r\n\r\n0123456789\r\n");
        d.deliver(&env.alice, &small).await.unwrap();
        d.deliver(&env.alice, &incoming("Subject: b\r\n\r\n0123456789\r\n"))
            .await
            .unwrap();
        let err = d
            .deliver(&env.alice, &incoming("Subject: c\r\n\r\n0123456789\r\n"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, DeliveryError::OverQuota { quota: 120, .. }),
            "{err}"
        );
        assert!(err.is_permanent());
        // A retry of a stored message is not refused for the space its first copy takes.
        assert!(d.deliver(&env.alice, &small).await.unwrap().duplicate);
    }

    #[tokio::test]
    async fn old_records_expire() {
        let env = env(None).await;
        let d = Deliverer::new(
            env.accounts.clone(),
            DeliveryPolicy {
                dedup_window: Duration::from_secs(60),
                ..Default::default()
            },
        );
        let bucket = now_ms() / d.window_ms();
        let old = Record {
            message: new_message_id().0,
            at_ms: 0,
            done: true,
        };
        let stale_key = format!("{}{}", bucket_prefix(bucket - 2), "00".repeat(16));
        let kept_key = format!("{}{}", bucket_prefix(bucket - 1), "11".repeat(16));
        d.put_record(&env.alice.id, &stale_key, &old).await;
        d.put_record(&env.alice.id, &kept_key, &old).await;
        d.deliver(&env.alice, &incoming(MSG)).await.unwrap();
        let rows = env.accounts.store().rows.clone();
        let partition = record_partition(&env.alice.id);
        let keys = || async {
            rows.read_range(ReadRange::partition(partition.clone()))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|i| i.sort_key)
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while keys().await.contains(&stale_key) {
            assert!(Instant::now() < deadline, "stale record not deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = keys().await;
        assert!(left.contains(&kept_key), "{left:?}");
        assert_eq!(left.len(), 2, "{left:?}");
    }
}
