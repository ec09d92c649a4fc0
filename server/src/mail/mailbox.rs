//! One mailbox as a process holds it: its log in storage, the ops read so far, and the state
//! computed from them. One `Mailbox` per (process, mailbox) is shared by every session, so the
//! ops are read and decrypted once.
//!
//! Writing: sync first (read what others wrote), then write one op that names what it saw. A
//! handle without the user's identity (LMTP) can still append: the plaintext headers give it
//! UIDNEXT and HIGHESTMODSEQ; it never sees flags or contents.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use age::x25519;
use tokio::sync::{Mutex, watch};

use super::view::{self, LogOp, MailOp, MailboxState};
use crate::log::LogError;
use crate::log::clock::{Dot, VersionVector, WriterId};
use crate::log::codec::{self, Header, WriterKey};
use crate::log::store::{CheckpointRef, LogStore};

#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("corrupt op {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("this handle cannot read the mailbox (no key): {0}")]
    Locked(&'static str),
}

/// The keys a handle holds: always the public recipient; the identity only when the user is
/// unlocked in this process.
#[derive(Clone)]
pub struct MailboxKeys {
    pub recipient: x25519::Recipient,
    pub identity: Option<Arc<x25519::Identity>>,
}

struct Inner {
    /// Every op absorbed (rows and checkpoints may deliver them in any order).
    seen: HashSet<Dot>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// Body keys of the writers seen so far (opened with the identity).
    writer_keys: HashMap<WriterId, WriterKey>,
    writer: WriterId,
    writer_key: WriterKey,
    seq: u64,
    registered: bool,
    lamport: u64,
    vv: VersionVector,
    headers: Vec<Header>,
    ops: Vec<LogOp>,
    state: Option<MailboxState>,
}

pub struct Mailbox {
    log: LogStore,
    keys: MailboxKeys,
    inner: Mutex<Inner>,
    /// Bumped whenever the state changes; every local session watches it.
    changes: watch::Sender<u64>,
}

/// How long one storage long-poll of the watcher lasts before it is renewed.
const WATCH_POLL: Duration = Duration::from_secs(60);

fn fresh_writer() -> WriterId {
    WriterId(rand::random::<u64>() | 1)
}

impl Mailbox {
    /// Opens the mailbox and reads its whole log (checkpoints come with issue #3's next step).
    pub async fn open(log: LogStore, keys: MailboxKeys) -> Result<Mailbox, MailboxError> {
        let mailbox = Mailbox {
            log,
            keys,
            inner: Mutex::new(Inner {
                seen: HashSet::new(),
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
                writer_keys: HashMap::new(),
                writer: fresh_writer(),
                writer_key: WriterKey::generate(),
                seq: 0,
                registered: false,
                lamport: 0,
                vv: VersionVector::default(),
                headers: Vec::new(),
                ops: Vec::new(),
                state: None,
            }),
            changes: watch::channel(0).0,
        };
        mailbox.sync().await?;
        Ok(mailbox)
    }

    /// Reads the ops written since the last sync; returns whether anything was new.
    pub async fn sync(&self) -> Result<bool, MailboxError> {
        let mut inner = self.inner.lock().await;
        self.sync_locked(&mut inner).await
    }

    async fn sync_locked(&self, inner: &mut Inner) -> Result<bool, MailboxError> {
        // Rows first, checkpoints second: an op row collected after being checkpointed is then
        // found in the checkpoint, never lost between the two reads.
        let (raw, registry) = self.log.read_missing(&inner.vv).await?;
        let mut fresh = inner.state.is_none();
        let (vv_before, ops_before) = (inner.vv.clone(), inner.ops.len());
        if let Some(identity) = &self.keys.identity {
            for (w, key, sealed) in registry {
                if let std::collections::hash_map::Entry::Vacant(e) = inner.writer_keys.entry(w) {
                    e.insert(WriterKey::open(&key, &sealed, identity)?);
                }
            }
        }
        for op in raw {
            let body = match &self.keys.identity {
                Some(_) => {
                    let wk = inner
                        .writer_keys
                        .get(&op.header.dot.writer)
                        .ok_or_else(|| MailboxError::Corrupt {
                            key: op.key.clone(),
                            detail: "op from a writer with no registry row".into(),
                        })?;
                    Some(codec::open_body(&op.key, &op.body, wk)?)
                }
                None => None,
            };
            fresh |= self.absorb(inner, &op.key, op.header, body.as_deref())?;
        }
        for cp in self.log.checkpoints().await? {
            if !cp.covers.le(&inner.vv) {
                fresh |= self.absorb_checkpoint(inner, &cp).await?;
            }
        }
        if fresh && self.keys.identity.is_some() {
            inner.state = Self::advance(inner.state.take(), vv_before, &inner.ops, ops_before);
        }
        if fresh {
            self.changes.send_modify(|v| *v += 1);
        }
        Ok(fresh)
    }

    /// The state after `ops[from..]` were added: op by op while each one had seen everything
    /// before it (the sequential case, O(log n) per op), else one full recomputation.
    fn advance(
        state: Option<MailboxState>,
        mut seen: VersionVector,
        ops: &[LogOp],
        from: usize,
    ) -> Option<MailboxState> {
        let mut new: Vec<&LogOp> = ops[from..].iter().collect();
        new.sort_by_key(|o| o.id());
        let mut state = state;
        for op in new {
            state = state.filter(|_| op.deps == seen);
            if let Some(s) = state.as_mut()
                && !s.apply_next(op)
            {
                state = None;
            }
            seen.include(op.dot);
        }
        Some(state.unwrap_or_else(|| view::compute(ops)))
    }

    /// Folds one op in (once); `body` is its decrypted body when this handle has the key.
    fn absorb(
        &self,
        inner: &mut Inner,
        key: &str,
        header: Header,
        body: Option<&[u8]>,
    ) -> Result<bool, MailboxError> {
        if !inner.seen.insert(header.dot) {
            return Ok(false);
        }
        inner.lamport = inner.lamport.max(header.lamport);
        inner.vv.include(header.dot);
        if let Some(body) = body {
            let mail_op: MailOp =
                postcard::from_bytes(body).map_err(|e| MailboxError::Corrupt {
                    key: key.to_string(),
                    detail: e.to_string(),
                })?;
            let full = LogOp::from_parts(header.clone(), mail_op).ok_or_else(|| {
                MailboxError::Corrupt {
                    key: key.to_string(),
                    detail: "body disagrees with its header".into(),
                }
            })?;
            inner.ops.push(full);
        }
        inner.headers.push(header);
        Ok(true)
    }

    async fn absorb_checkpoint(
        &self,
        inner: &mut Inner,
        cp: &CheckpointRef,
    ) -> Result<bool, MailboxError> {
        let raw = self.log.load_checkpoint(cp).await?;
        let (headers, sealed) = codec::decode_checkpoint(&cp.blob, &raw)?;
        let bodies: Option<Vec<Vec<u8>>> = match &self.keys.identity {
            Some(identity) => {
                let plain = codec::decrypt_body(&cp.blob, sealed, identity)?;
                let bodies: Vec<Vec<u8>> =
                    postcard::from_bytes(&plain).map_err(|e| MailboxError::Corrupt {
                        key: cp.blob.clone(),
                        detail: e.to_string(),
                    })?;
                if bodies.len() != headers.len() {
                    return Err(MailboxError::Corrupt {
                        key: cp.blob.clone(),
                        detail: "headers and bodies differ in number".into(),
                    });
                }
                Some(bodies)
            }
            None => None,
        };
        let mut fresh = false;
        for (i, header) in headers.into_iter().enumerate() {
            let body = bodies.as_ref().map(|b| b[i].as_slice());
            fresh |= self.absorb(inner, &cp.blob, header, body)?;
        }
        Ok(fresh)
    }

    /// Writes a checkpoint of everything this handle has read (needs the key). Concurrent
    /// checkpoints are all kept: a reader takes the union, which is again a valid op set.
    pub async fn checkpoint(&self) -> Result<CheckpointRef, MailboxError> {
        let mut inner = self.inner.lock().await;
        self.sync_locked(&mut inner).await?;
        if self.keys.identity.is_none() {
            return Err(MailboxError::Locked("writing a checkpoint"));
        }
        let headers: Vec<Header> = inner.ops.iter().map(LogOp::header).collect();
        let bodies: Vec<Vec<u8>> = inner
            .ops
            .iter()
            .map(|o| postcard::to_allocvec(&o.op))
            .collect::<Result<_, _>>()
            .map_err(|e| LogError::Encode(e.to_string()))?;
        let bodies = postcard::to_allocvec(&bodies).map_err(|e| LogError::Encode(e.to_string()))?;
        let value = codec::encode_checkpoint(&headers, &bodies, &self.keys.recipient)?;
        let id = Dot {
            writer: inner.writer,
            seq: rand::random(),
        };
        let r = self.log.put_checkpoint(id, &inner.vv, value).await?;
        inner.since_checkpoint = 0;
        inner.last_checkpoint = Instant::now();
        Ok(r)
    }

    /// Is a checkpoint due: `every_ops` ops written here since the last one, or `every` elapsed
    /// with at least one op?
    pub async fn checkpoint_due(&self, every_ops: u64, every: Duration) -> bool {
        let inner = self.inner.lock().await;
        inner.since_checkpoint >= every_ops
            || (inner.since_checkpoint > 0 && inner.last_checkpoint.elapsed() >= every)
    }

    /// Deletes the op rows a stored checkpoint covers.
    pub async fn collect(&self, cp: &CheckpointRef) -> Result<u64, MailboxError> {
        Ok(self.log.collect(&cp.covers).await?)
    }

    /// The current state (needs the identity).
    pub async fn state(&self) -> Result<MailboxState, MailboxError> {
        let inner = self.inner.lock().await;
        inner
            .state
            .clone()
            .ok_or(MailboxError::Locked("reading the state"))
    }

    /// (UIDNEXT, HIGHESTMODSEQ + 1) as this handle knows them.
    pub async fn floors(&self) -> (u64, u64) {
        let inner = self.inner.lock().await;
        match &inner.state {
            Some(s) => s.floors(),
            None => view::next_floors(&inner.headers),
        }
    }

    /// Syncs, then writes one op built from the floors of the synced view. Returns the op's dot
    /// and, for an add, the UID its writer announced (APPENDUID).
    pub async fn write(
        &self,
        build: impl FnOnce(u64) -> MailOp,
    ) -> Result<(Dot, Option<u64>), MailboxError> {
        let mut inner = self.inner.lock().await;
        self.sync_locked(&mut inner).await?;
        let (uid_next, modseq_floor) = match &inner.state {
            Some(s) => s.floors(),
            None => view::next_floors(&inner.headers),
        };
        let op = LogOp {
            dot: Dot {
                writer: inner.writer,
                seq: inner.seq + 1,
            },
            lamport: inner.lamport + 1,
            deps: inner.vv.clone(),
            modseq_floor,
            op: build(uid_next),
        };
        let header = op.header();
        let body = postcard::to_allocvec(&op.op).map_err(|e| LogError::Encode(e.to_string()))?;
        let row = crate::log::store::op_key(op.dot);
        let value = codec::encode(&row, &header, &body, &inner.writer_key)?;
        let stored = async {
            if !inner.registered {
                let sealed = inner.writer_key.seal(&self.keys.recipient)?;
                self.log.register(inner.writer, sealed).await?;
                inner.registered = true;
                let (w, k) = (inner.writer, inner.writer_key.clone());
                inner.writer_keys.insert(w, k);
            }
            self.log.append(op.dot, value).await
        }
        .await;
        if let Err(e) = stored {
            // The op may or may not be stored: never reuse its dot for another op. Later writes
            // go out under a fresh writer id; a stored orphan is read back like any other op.
            inner.writer = fresh_writer();
            inner.writer_key = WriterKey::generate();
            inner.seq = 0;
            inner.registered = false;
            return Err(e.into());
        }
        inner.seq += 1;
        inner.lamport += 1;
        inner.vv.include(op.dot);
        inner.seen.insert(op.dot);
        inner.since_checkpoint += 1;
        inner.headers.push(header);
        let uid = match &op.op {
            MailOp::Add { uid_floor, .. } => Some(*uid_floor),
            _ => None,
        };
        let dot = op.dot;
        if self.keys.identity.is_some() {
            let vv_before = op.deps.clone();
            inner.ops.push(op);
            let from = inner.ops.len() - 1;
            inner.state = Self::advance(inner.state.take(), vv_before, &inner.ops, from);
        }
        self.changes.send_modify(|v| *v += 1);
        Ok((dot, uid))
    }

    /// A receiver that sees a new value whenever the state changes (a local write, or the
    /// watcher syncing a remote one).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Starts the one storage watcher of this (process, mailbox): a long-poll on the log that
    /// syncs on every change and so wakes every subscribed session. It ends when the mailbox is
    /// dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Mailbox> = Arc::downgrade(self);
        let log = self.log.clone();
        tokio::spawn(async move {
            let mut marker: Option<String> = None;
            let mut backoff = Duration::from_millis(100);
            loop {
                match log.wait(marker.as_deref(), WATCH_POLL).await {
                    Ok(Some(next)) => {
                        let first = marker.is_none();
                        marker = Some(next);
                        let Some(mailbox) = weak.upgrade() else {
                            return;
                        };
                        if !first && let Err(e) = mailbox.sync().await {
                            tracing::warn!(partition = log.partition(), error = %e, "mailbox sync failed");
                        }
                        backoff = Duration::from_millis(100);
                    }
                    Ok(None) => {
                        if weak.strong_count() == 0 {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(partition = log.partition(), error = %e, "mailbox watch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        if weak.strong_count() == 0 {
                            return;
                        }
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::mail::view::{FlagAction, MessageId};
    use crate::storage::{StorageConfig, Store};

    fn add(id: &str) -> impl FnOnce(u64) -> MailOp + '_ {
        move |uid_floor| MailOp::Add {
            msg: MessageId(id.into()),
            flags: BTreeSet::new(),
            uid_floor,
        }
    }

    /// A local store in a temp dir, a user identity and keys that can read.
    async fn local_env() -> (tempfile::TempDir, Store, Arc<x25519::Identity>, MailboxKeys) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().into(),
        })
        .await
        .unwrap();
        let identity = Arc::new(x25519::Identity::generate());
        let keys = MailboxKeys {
            recipient: identity.to_public(),
            identity: Some(identity.clone()),
        };
        (dir, store, identity, keys)
    }

    #[tokio::test]
    async fn processes_converge_and_a_deliverer_without_the_key_can_append() {
        let (_dir, store, identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/inbox-test");
        let a = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        let b = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        let lmtp = Mailbox::open(
            log.clone(),
            MailboxKeys {
                recipient: identity.to_public(),
                identity: None,
            },
        )
        .await
        .unwrap();

        let (_, uid) = a.write(add("message-one-id")).await.unwrap();
        assert_eq!(uid, Some(1));
        // The deliverer reads only headers and still announces the next UID.
        let (_, uid) = lmtp.write(add("m2")).await.unwrap();
        assert_eq!(uid, Some(2));
        assert!(lmtp.state().await.is_err(), "no key, no state");

        b.sync().await.unwrap();
        let s = b.state().await.unwrap();
        assert_eq!(s.uid_of(&MessageId("message-one-id".into())), Some(1));
        assert_eq!(s.uid_of(&MessageId("m2".into())), Some(2));
        b.write(|_| MailOp::Flags {
            msg: MessageId("message-one-id".into()),
            action: FlagAction::Add,
            flags: BTreeSet::from(["\\Seen".to_string()]),
        })
        .await
        .unwrap();

        // A reopened handle (a restarted process) sees the same state.
        a.sync().await.unwrap();
        let again = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        assert_eq!(again.state().await.unwrap(), a.state().await.unwrap());
        assert!(
            a.state().await.unwrap().messages[&1]
                .flags
                .contains("\\Seen")
        );

        // The stored rows never show the message ids or flags.
        let page = store
            .rows
            .read_range(crate::storage::ReadRange::partition("log/inbox-test"))
            .await
            .unwrap();
        for item in page.items {
            for v in item.live_values() {
                assert!(
                    !v.windows(14).any(|w| w == b"message-one-id"),
                    "{}",
                    item.sort_key
                );
                assert!(!v.windows(5).any(|w| w == b"\\Seen"), "{}", item.sort_key);
            }
        }
    }

    #[tokio::test]
    async fn the_watcher_wakes_sessions_on_a_write_from_another_process() {
        let (_dir, store, _identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/w");
        let here = Arc::new(Mailbox::open(log.clone(), keys.clone()).await.unwrap());
        let watcher = here.spawn_watcher();
        let mut session = here.subscribe();
        session.borrow_and_update();
        // Let the watcher take its first marker before the remote write.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let there = Mailbox::open(log, keys).await.unwrap();
        there.write(add("remote")).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), session.changed())
            .await
            .expect("woken by the watcher")
            .unwrap();
        let s = here.state().await.unwrap();
        assert_eq!(s.uid_of(&MessageId("remote".into())), Some(1));
        drop(session);
        drop(here);
        // The watcher notices the mailbox is gone at its next wake-up; don't wait a minute.
        watcher.abort();
    }

    #[tokio::test]
    async fn checkpoints_collect_rows_and_never_drop_a_late_op() {
        let (_dir, store, identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/cp");
        let a = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        // A stale writer: opened now, will write later without syncing in between... except
        // that `write` always syncs. Make it stale by giving it a view from before the others.
        let stale = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        for i in 0..30 {
            a.write(add(&format!("m{i}"))).await.unwrap();
        }
        assert!(a.checkpoint_due(30, Duration::from_secs(3600)).await);
        let cp = a.checkpoint().await.unwrap();
        assert!(!a.checkpoint_due(30, Duration::from_secs(3600)).await);
        assert_eq!(a.collect(&cp).await.unwrap(), 30);

        // A fresh process opens from the checkpoint alone and agrees.
        let b = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        assert_eq!(b.state().await.unwrap(), a.state().await.unwrap());
        // A deliverer without the key reads the checkpoint's headers and agrees on the floors.
        let lmtp = Mailbox::open(
            log.clone(),
            MailboxKeys {
                recipient: identity.to_public(),
                identity: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(lmtp.floors().await, a.floors().await);

        // The stale handle syncs (rows first: all collected; then the checkpoint) and its
        // write lands after everything: nothing dropped, nothing renumbered.
        let (_, uid) = stale.write(add("late")).await.unwrap();
        assert_eq!(uid, Some(31));
        b.sync().await.unwrap();
        let s = b.state().await.unwrap();
        assert_eq!(s.messages.len(), 31);
        assert_eq!(s.uid_of(&MessageId("late".into())), Some(31));
        assert_eq!(s.renumbered, 0);

        // A truly late op: written by a writer that saw nothing, landing after the checkpoint
        // and the collection. It is read, and the state moves on by the rule (V1-V5 hold).
        let w = WriterId(42);
        let ghost = LogOp {
            dot: Dot { writer: w, seq: 1 },
            lamport: 1,
            deps: VersionVector::default(),
            modseq_floor: 1,
            op: add("ghost")(1),
        };
        let body = postcard::to_allocvec(&ghost.op).unwrap();
        let wk = WriterKey::generate();
        log.register(w, wk.seal(&identity.to_public()).unwrap())
            .await
            .unwrap();
        let row = crate::log::store::op_key(ghost.dot);
        log.append(
            ghost.dot,
            codec::encode(&row, &ghost.header(), &body, &wk).unwrap(),
        )
        .await
        .unwrap();
        let before = b.state().await.unwrap();
        b.sync().await.unwrap();
        let after = b.state().await.unwrap();
        assert!(after.uid_of(&MessageId("ghost".into())).is_some());
        assert_eq!(after.messages.len(), 32);
        let ops = b.inner.lock().await.ops.clone();
        crate::mail::invariants::check_pair(&before, &after, &ops).unwrap();
    }

    #[tokio::test]
    async fn an_op_from_a_newer_server_is_refused_loudly() {
        let (_dir, store, _identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/v");
        let a = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        let (dot, _) = a.write(add("m1")).await.unwrap();
        let key = crate::log::store::op_key(dot);
        let item = store.rows.read_item("log/v", &key).await.unwrap().unwrap();
        let mut newer = item.values[0].clone().unwrap();
        newer[0] = codec::FORMAT_VERSION + 1;
        store
            .rows
            .insert_item("log/v", &key, Some(&item.token), newer)
            .await
            .unwrap();
        match Mailbox::open(log, keys).await {
            Err(MailboxError::Log(LogError::UnsupportedVersion { key: k, .. })) => {
                assert_eq!(k, key)
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer op must not be skipped silently"),
        }
    }
}
