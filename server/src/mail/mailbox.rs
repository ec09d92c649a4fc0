//! One mailbox as a process holds it: its log in storage, the ops read so far, and the state
//! computed from them. One `Mailbox` per (process, mailbox) is shared by every session, so the
//! ops are read and decrypted once.
//!
//! Writing: hold a lease, sync (read what others wrote), then write one op that names what it
//! saw. A handle without the user's identity (LMTP) can still append: the plaintext headers give
//! it UIDNEXT and HIGHESTMODSEQ; it never sees flags or contents.
//!
//! Maintenance (a handle with the key): checkpoints, squashing the causally stable prefix into a
//! base state, collecting op rows and old checkpoints, expiring the leases of writers that went
//! away. See docs/causal-log.md ("Checkpoints", "Leases").

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use age::x25519;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use super::view::{self, LogOp, MailOp, MailboxState};
use crate::log::LogError;
use crate::log::clock::{Dot, VersionVector, WriterId};
use crate::log::codec::{self, BaseHead, CheckpointHead, Header, WriterKey};
use crate::log::store::{CheckpointRef, Lease, LogStore};
use crate::storage::{CausalityToken, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("corrupt op {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("this handle cannot read the mailbox (no key): {0}")]
    Locked(&'static str),
    #[error("the writer lease ran out before the op was sent; nothing was written, retry")]
    LeaseLost,
    #[error(
        "UIDNEXT {0} is within {reserve} of 2^32: the mailbox takes no new messages until it is renumbered under a new UIDVALIDITY",
        reserve = UID_RESERVE
    )]
    UidSpaceExhausted(u64),
    #[error("message {id} is already in this mailbox (UID {uid}); a copy needs a new message id")]
    AlreadyPresent { id: String, uid: u64 },
}

/// UIDs are 32-bit on the wire. New messages are refused once UIDNEXT comes this close to 2^32,
/// so that even a block of ~1,400 concurrent appends (which uses n(n-1)/2 extra UIDs) stays
/// below it.
pub const UID_RESERVE: u64 = 1 << 20;

/// The largest UIDNEXT at which a new message is still accepted.
pub const UID_LIMIT: u64 = (1 << 32) - UID_RESERVE;

/// The keys a handle holds: always the public recipient; the identity only when the user is
/// unlocked in this process.
#[derive(Clone)]
pub struct MailboxKeys {
    pub recipient: x25519::Recipient,
    pub identity: Option<Arc<x25519::Identity>>,
}

/// Writer leases. Only durations measured on one machine's monotonic clock are used: a writer
/// sends ops for at most `send_limit` after sending its last renewal, and a collector expires a
/// lease it has watched stay unchanged for `expire_after`. Safe while
/// `send_limit + (longest a write can take to land) < expire_after`.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    pub renew_after: Duration,
    pub send_limit: Duration,
    pub expire_after: Duration,
}

impl Default for LeasePolicy {
    fn default() -> LeasePolicy {
        LeasePolicy {
            renew_after: Duration::from_secs(60),
            send_limit: Duration::from_secs(120),
            // Storage requests time out within a minute or two; leave a wide margin.
            expire_after: Duration::from_secs(600),
        }
    }
}

/// When a handle with the key writes a checkpoint: `every_ops` ops not in any checkpoint, or
/// `every` elapsed with at least one.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointPolicy {
    pub every_ops: u64,
    pub every: Duration,
}

impl Default for CheckpointPolicy {
    fn default() -> CheckpointPolicy {
        CheckpointPolicy {
            every_ops: 1000,
            every: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct MailboxPolicy {
    pub lease: LeasePolicy,
    pub checkpoint: CheckpointPolicy,
}

/// The encrypted part of a checkpoint: the base state (if squashed) and the op bodies, in the
/// order of the plaintext headers.
#[derive(Serialize, Deserialize)]
struct CheckpointPayload {
    base: Option<MailboxState>,
    bodies: Vec<Vec<u8>>,
}

/// A squashed stable prefix: its plaintext head, and its state when the handle has the key.
#[derive(Clone)]
struct Base {
    head: BaseHead,
    state: Option<MailboxState>,
}

/// The lease this handle holds on its writer id.
struct HeldLease {
    token: CausalityToken,
    /// When the renewal now in force was sent.
    renewed: Instant,
}

/// What one `maintain` pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    pub checkpoint: Option<CheckpointRef>,
    /// Ops folded into the base state by this pass.
    pub squashed: u64,
    pub rows_collected: u64,
    pub checkpoints_deleted: usize,
    pub writers_expired: usize,
    pub writers_forgotten: usize,
}

struct Inner {
    /// Ops absorbed after the base (rows and checkpoints may deliver them in any order).
    seen: HashSet<Dot>,
    base: Option<Base>,
    /// Everything some checkpoint read or written here holds.
    checkpointed: VersionVector,
    /// The op rows this handle has deleted (behind its own checkpoints).
    collected: VersionVector,
    last_checkpoint: Instant,
    /// Body keys of the writers seen so far (opened with the identity).
    writer_keys: HashMap<WriterId, WriterKey>,
    writer: WriterId,
    writer_key: WriterKey,
    seq: u64,
    lease: Option<HeldLease>,
    /// Lease tokens of other writers as first seen unchanged, for expiry.
    observed: HashMap<WriterId, (String, Instant)>,
    lamport: u64,
    vv: VersionVector,
    /// Headers and ops after the base.
    headers: Vec<Header>,
    /// (UIDNEXT, HIGHESTMODSEQ + 1) from the headers, while known without a recount.
    header_floors: Option<(u64, u64)>,
    ops: Vec<LogOp>,
    /// Shared with the sessions that read it: a change copies it only while one holds it.
    state: Option<Arc<MailboxState>>,
}

impl Inner {
    fn base_covers(&self, dot: Dot) -> bool {
        self.base
            .as_ref()
            .is_some_and(|b| b.head.covers.covers(dot))
    }

    fn base_state(&self) -> MailboxState {
        self.base
            .as_ref()
            .and_then(|b| b.state.clone())
            .unwrap_or_default()
    }

    fn floors(&mut self) -> (u64, u64) {
        if let Some(s) = &self.state {
            return s.floors();
        }
        if let Some(f) = self.header_floors {
            return f;
        }
        let f = view::next_floors_on(
            self.base.as_ref().map_or((1, 1), |b| b.head.floors),
            &self.headers,
        );
        self.header_floors = Some(f);
        f
    }

    /// Records one header (after the base) and keeps the keyless floors up to date: a header
    /// whose writer had seen everything before it is a block of its own and moves the floors
    /// to just past its own, as `MailboxState::apply_next` does; anything else means a full
    /// recount at the next `floors`.
    fn push_header(&mut self, header: Header, seen_before: &VersionVector) {
        self.header_floors = match self.header_floors {
            Some((uid_next, modseq_next))
                if header.deps == *seen_before
                    && header.modseq_floor >= modseq_next
                    && header.uid_floor.is_none_or(|u| u >= uid_next) =>
            {
                Some((
                    header.uid_floor.map_or(uid_next, |u| u + 1),
                    header.modseq_floor + 1,
                ))
            }
            _ => None,
        };
        self.headers.push(header);
    }

    fn checkpoint_due(&self, every_ops: u64, every: Duration) -> bool {
        let pending = self
            .headers
            .iter()
            .filter(|h| !self.checkpointed.covers(h.dot))
            .count() as u64;
        pending >= every_ops || (pending > 0 && self.last_checkpoint.elapsed() >= every)
    }

    /// A fresh writer id after a failed or abandoned one: never reuse a dot that may be stored.
    fn new_writer(&mut self) {
        self.writer = fresh_writer();
        self.writer_key = WriterKey::generate();
        self.seq = 0;
        self.lease = None;
    }
}

pub struct Mailbox {
    log: LogStore,
    keys: MailboxKeys,
    policy: MailboxPolicy,
    inner: Mutex<Inner>,
    /// Bumped whenever the state changes; every local session watches it.
    changes: watch::Sender<u64>,
}

/// How long one storage long-poll of the watcher lasts before it is renewed.
const WATCH_POLL: Duration = Duration::from_secs(60);

fn fresh_writer() -> WriterId {
    WriterId(rand::random::<u64>() | 1)
}

fn corrupt(key: &str, detail: impl ToString) -> MailboxError {
    MailboxError::Corrupt {
        key: key.to_string(),
        detail: detail.to_string(),
    }
}

fn meet(a: &VersionVector, b: &VersionVector) -> VersionVector {
    VersionVector(
        a.0.iter()
            .map(|(&w, &n)| (w, n.min(b.get(w))))
            .filter(|&(_, n)| n > 0)
            .collect(),
    )
}

fn count(vv: &VersionVector) -> u64 {
    vv.0.values().sum()
}

impl Mailbox {
    /// Opens the mailbox with the default policy: newest checkpoints plus the ops after them.
    pub async fn open(log: LogStore, keys: MailboxKeys) -> Result<Mailbox, MailboxError> {
        Mailbox::open_with(log, keys, MailboxPolicy::default()).await
    }

    pub async fn open_with(
        log: LogStore,
        keys: MailboxKeys,
        policy: MailboxPolicy,
    ) -> Result<Mailbox, MailboxError> {
        let mailbox = Mailbox {
            log,
            keys,
            policy,
            inner: Mutex::new(Inner {
                seen: HashSet::new(),
                base: None,
                checkpointed: VersionVector::default(),
                collected: VersionVector::default(),
                last_checkpoint: Instant::now(),
                writer_keys: HashMap::new(),
                writer: fresh_writer(),
                writer_key: WriterKey::generate(),
                seq: 0,
                lease: None,
                observed: HashMap::new(),
                lamport: 0,
                vv: VersionVector::default(),
                headers: Vec::new(),
                header_floors: None,
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
        let mut pending = Vec::with_capacity(raw.len());
        for op in raw {
            let body = match &self.keys.identity {
                Some(_) => {
                    let wk = inner
                        .writer_keys
                        .get(&op.header.dot.writer)
                        .ok_or_else(|| corrupt(&op.key, "op from a writer with no registry row"))?;
                    Some(codec::open_body(&op.key, &op.body, wk)?)
                }
                None => None,
            };
            pending.push((op.key, op.header, body));
        }
        fresh |= self.absorb_ready(inner, &mut pending)?;
        let mut rebased = false;
        // A checkpoint listed here may be deleted by a collector before we load it, once a
        // newer one holds everything it held: list again.
        let mut attempts = 0;
        'listing: loop {
            attempts += 1;
            for cp in self.log.checkpoints().await? {
                if cp.covers.le(&inner.checkpointed) && cp.covers.le(&inner.vv) {
                    continue;
                }
                match self.absorb_checkpoint(inner, &cp).await {
                    Ok((f, r)) => {
                        fresh |= f;
                        rebased |= r;
                    }
                    Err(MailboxError::Log(LogError::Storage(StorageError::NotFound(_))))
                        if attempts < 5 =>
                    {
                        continue 'listing;
                    }
                    Err(e) => return Err(e),
                }
            }
            break;
        }
        // A checkpoint may have brought the causal past of ops held back above.
        fresh |= self.absorb_ready(inner, &mut pending)?;
        if !pending.is_empty() {
            tracing::debug!(
                partition = self.log.partition(),
                held = pending.len(),
                "ops held back until their causal past is readable"
            );
        }
        if fresh && self.keys.identity.is_some() {
            let advanced = match rebased {
                false => Self::advance(inner.state.take(), vv_before, &inner.ops, ops_before),
                true => None,
            };
            inner.state =
                Some(advanced.unwrap_or_else(|| {
                    Arc::new(view::compute_on(&inner.base_state(), &inner.ops))
                }));
        }
        if fresh {
            self.changes.send_modify(|v| *v += 1);
        }
        Ok(fresh)
    }

    /// The state after `ops[from..]` were added, op by op while each one had seen everything
    /// before it (the sequential case, O(log n) per op); `None` when a full recomputation is
    /// needed.
    fn advance(
        state: Option<Arc<MailboxState>>,
        mut seen: VersionVector,
        ops: &[LogOp],
        from: usize,
    ) -> Option<Arc<MailboxState>> {
        let mut new: Vec<&LogOp> = ops[from..].iter().collect();
        new.sort_by_key(|o| o.id());
        let mut state = state;
        for op in new {
            state = state.filter(|_| op.deps == seen);
            if let Some(s) = state.as_mut()
                && !Arc::make_mut(s).apply_next(op)
            {
                state = None;
            }
            seen.include(op.dot);
        }
        state
    }

    /// Folds in the ops whose causal past is held (the writer's previous op and everything the
    /// op had seen), in rounds until none is ready; the rest stay in `pending`. A quorum read
    /// can return an op before one it depends on has reached the nodes that answered: folding
    /// it in then would show a view that is not causally closed (a later view could fill a UID
    /// below UIDNEXT, V1) and would name a gap in the next op's deps. Not folded in, an op is
    /// outside the version vector and is read again at the next sync.
    fn absorb_ready(
        &self,
        inner: &mut Inner,
        pending: &mut Vec<(String, Header, Option<Vec<u8>>)>,
    ) -> Result<bool, MailboxError> {
        let mut fresh = false;
        loop {
            let mut progress = false;
            let mut rest = Vec::with_capacity(pending.len());
            for (key, header, body) in pending.drain(..) {
                let held = inner.base_covers(header.dot) || inner.seen.contains(&header.dot);
                let ready = inner.vv.get(header.dot.writer) + 1 >= header.dot.seq
                    && header.deps.le(&inner.vv);
                if held || ready {
                    fresh |= self.absorb(inner, &key, header, body.as_deref())?;
                    progress = true;
                } else {
                    rest.push((key, header, body));
                }
            }
            *pending = rest;
            if !progress || pending.is_empty() {
                return Ok(fresh);
            }
        }
    }

    /// Folds one op in (once); `body` is its decrypted body when this handle has the key.
    fn absorb(
        &self,
        inner: &mut Inner,
        key: &str,
        header: Header,
        body: Option<&[u8]>,
    ) -> Result<bool, MailboxError> {
        if inner.base_covers(header.dot) || !inner.seen.insert(header.dot) {
            return Ok(false);
        }
        let before = inner.vv.clone();
        inner.lamport = inner.lamport.max(header.lamport);
        inner.vv.include(header.dot);
        if let Some(body) = body {
            let mail_op: MailOp = postcard::from_bytes(body).map_err(|e| corrupt(key, e))?;
            let full = LogOp::from_parts(header.clone(), mail_op)
                .ok_or_else(|| corrupt(key, "body disagrees with its header"))?;
            inner.ops.push(full);
        }
        inner.push_header(header, &before);
        Ok(true)
    }

    /// Adopts a checkpoint's base if it is newer than ours, then its ops. Returns (anything new,
    /// base changed).
    async fn absorb_checkpoint(
        &self,
        inner: &mut Inner,
        cp: &CheckpointRef,
    ) -> Result<(bool, bool), MailboxError> {
        let raw = self.log.load_checkpoint(cp).await?;
        let (head, sealed) = codec::decode_checkpoint(&cp.blob, &raw)?;
        let payload: Option<CheckpointPayload> = match &self.keys.identity {
            Some(identity) => {
                let plain = codec::decrypt_body(&cp.blob, sealed, identity)?;
                let payload: CheckpointPayload =
                    postcard::from_bytes(&plain).map_err(|e| corrupt(&cp.blob, e))?;
                if payload.bodies.len() != head.headers.len()
                    || payload.base.is_some() != head.base.is_some()
                {
                    return Err(corrupt(&cp.blob, "plaintext and sealed parts disagree"));
                }
                Some(payload)
            }
            None => None,
        };
        let mut fresh = false;
        let mut rebased = false;
        if let Some(head_base) = head.base {
            let current = inner.base.as_ref().map(|b| &b.head.covers);
            let newer = match current {
                None => true,
                Some(c) if head_base.covers.le(c) => false,
                Some(c) if c.le(&head_base.covers) => true,
                Some(c) => {
                    // Stable prefixes are nested; two that are not mean a writer broke its
                    // lease. Keep the larger; the other one's ops are still read as ops.
                    tracing::error!(
                        partition = self.log.partition(),
                        checkpoint = cp.blob,
                        "two squashed checkpoints with incomparable bases"
                    );
                    count(&head_base.covers) > count(c)
                }
            };
            if newer {
                let covers = head_base.covers.clone();
                inner.lamport = inner.lamport.max(head_base.lamport);
                inner.vv.merge(&covers);
                inner.seen.retain(|d| !covers.covers(*d));
                inner.ops.retain(|o| !covers.covers(o.dot));
                inner.headers.retain(|h| !covers.covers(h.dot));
                inner.header_floors = None;
                inner.base = Some(Base {
                    head: head_base,
                    state: payload.as_ref().and_then(|p| p.base.clone()),
                });
                fresh = true;
                rebased = true;
            }
        }
        for (i, header) in head.headers.into_iter().enumerate() {
            let body = payload.as_ref().map(|p| p.bodies[i].as_slice());
            fresh |= self.absorb(inner, &cp.blob, header, body)?;
        }
        inner.checkpointed.merge(&cp.covers);
        Ok((fresh, rebased))
    }

    /// Writes a checkpoint of everything this handle has read (needs the key). Concurrent
    /// checkpoints are all kept until a newer one holds them: a reader takes the union, which
    /// is again a valid op set.
    pub async fn checkpoint(&self) -> Result<CheckpointRef, MailboxError> {
        let mut inner = self.inner.lock().await;
        self.sync_locked(&mut inner).await?;
        self.write_checkpoint(&mut inner, None).await
    }

    /// Writes a checkpoint: the base (the new one `squash` names, a stable prefix, or the
    /// current one) and every op after it.
    async fn write_checkpoint(
        &self,
        inner: &mut Inner,
        squash: Option<VersionVector>,
    ) -> Result<CheckpointRef, MailboxError> {
        if self.keys.identity.is_none() {
            return Err(MailboxError::Locked("writing a checkpoint"));
        }
        let encode = |e: postcard::Error| MailboxError::Log(LogError::Encode(e.to_string()));
        let mut base = inner.base.clone();
        if let Some(covers) = squash {
            let (inside, _): (Vec<LogOp>, Vec<LogOp>) = inner
                .ops
                .iter()
                .cloned()
                .partition(|o| covers.covers(o.dot));
            let state = view::compute_on(&inner.base_state(), &inside);
            let lamport = inside
                .iter()
                .map(|o| o.lamport)
                .chain(base.as_ref().map(|b| b.head.lamport))
                .max()
                .unwrap_or(0);
            base = Some(Base {
                head: BaseHead {
                    covers,
                    floors: state.floors(),
                    lamport,
                },
                state: Some(state),
            });
        }
        let after: Vec<&LogOp> = inner
            .ops
            .iter()
            .filter(|o| !base.as_ref().is_some_and(|b| b.head.covers.covers(o.dot)))
            .collect();
        let head = CheckpointHead {
            base: base.as_ref().map(|b| b.head.clone()),
            headers: after.iter().map(|o| o.header()).collect(),
        };
        let payload = CheckpointPayload {
            base: base.as_ref().map(|b| b.state.clone().unwrap_or_default()),
            bodies: after
                .iter()
                .map(|o| postcard::to_allocvec(&o.op))
                .collect::<Result<_, _>>()
                .map_err(encode)?,
        };
        let sealed = zeroize::Zeroizing::new(postcard::to_allocvec(&payload).map_err(encode)?);
        let value = codec::encode_checkpoint(&head, &sealed, &self.keys.recipient)?;
        let id = Dot {
            writer: inner.writer,
            seq: rand::random(),
        };
        let r = self.log.put_checkpoint(id, &inner.vv, value).await?;
        if let Some(b) = base {
            let covers = b.head.covers.clone();
            inner.seen.retain(|d| !covers.covers(*d));
            inner.ops.retain(|o| !covers.covers(o.dot));
            inner.headers.retain(|h| !covers.covers(h.dot));
            inner.header_floors = None;
            inner.base = Some(b);
        }
        inner.checkpointed.merge(&r.covers);
        inner.last_checkpoint = Instant::now();
        Ok(r)
    }

    /// Is a checkpoint due by the policy: enough ops in no checkpoint, or enough time with one?
    pub async fn maintenance_due(&self) -> bool {
        let inner = self.inner.lock().await;
        self.due(&inner)
    }

    fn due(&self, inner: &Inner) -> bool {
        let policy = self.policy.checkpoint;
        inner.checkpoint_due(policy.every_ops, policy.every)
    }

    /// Is a checkpoint due: `every_ops` ops in no checkpoint, or `every` elapsed with at least
    /// one? (The policy's figures, given explicitly.)
    pub async fn checkpoint_due(&self, every_ops: u64, every: Duration) -> bool {
        self.inner.lock().await.checkpoint_due(every_ops, every)
    }

    /// Deletes the op rows a stored checkpoint covers.
    pub async fn collect(&self, cp: &CheckpointRef) -> Result<u64, MailboxError> {
        Ok(self.log.collect(&cp.covers).await?)
    }

    /// One maintenance pass (needs the key): expire the leases of writers that went away, find
    /// the causally stable prefix, write a checkpoint with it squashed into a base state,
    /// then collect the op rows and checkpoints that checkpoint makes redundant and forget
    /// writers that are gone with all their ops in the base.
    pub async fn maintain(&self) -> Result<Maintenance, MailboxError> {
        if self.keys.identity.is_none() {
            return Err(MailboxError::Locked("maintaining the log"));
        }
        let mut inner = self.inner.lock().await;
        let mut report = Maintenance::default();
        // Only ops stored before the leases were read can be in the prefix (a writer that
        // registers after the read syncs after registering, so it sees them all).
        self.sync_locked(&mut inner).await?;
        let before = inner.vv.clone();
        let leases = self.log.leases().await?;
        self.sync_locked(&mut inner).await?;
        let old_checkpoints = self.log.checkpoints().await?;

        let now = Instant::now();
        let mut stable = before;
        let mut gone: Vec<WriterId> = Vec::new();
        for row in &leases {
            if row.writer == inner.writer && inner.lease.is_some() {
                continue; // our own lease: our next op follows everything we hold
            }
            let Some(seen) = row.live_seen() else {
                gone.push(row.writer);
                continue;
            };
            let token = row.token.as_str().to_string();
            let since = match inner.observed.get(&row.writer) {
                Some((t, at)) if *t == token => *at,
                _ => {
                    inner.observed.insert(row.writer, (token, now));
                    now
                }
            };
            if now.duration_since(since) >= self.policy.lease.expire_after
                && self.expire(row.writer, &row.token).await?
            {
                inner.observed.remove(&row.writer);
                report.writers_expired += 1;
                gone.push(row.writer);
                continue;
            }
            stable = meet(&stable, &seen);
        }
        // Shrink to a prefix every other op had fully seen.
        loop {
            let mut changed = false;
            for o in &inner.ops {
                if stable.covers(o.dot) {
                    continue;
                }
                let m = meet(&stable, &o.deps);
                if m != stable {
                    stable = m;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let base_covers = inner
            .base
            .as_ref()
            .map(|b| b.head.covers.clone())
            .unwrap_or_default();
        let grows = base_covers.le(&stable) && count(&stable) > count(&base_covers);
        if !(grows || self.due(&inner)) {
            return Ok(report);
        }
        let squash = grows.then(|| stable.clone());
        report.squashed = if grows {
            count(&stable) - count(&base_covers)
        } else {
            0
        };
        let cp = self.write_checkpoint(&mut inner, squash).await?;
        report.rows_collected = self.log.collect_since(&inner.collected, &cp.covers).await?;
        inner.collected.merge(&cp.covers);
        for old in old_checkpoints
            .iter()
            .filter(|o| o.blob != cp.blob && o.covers.le(&cp.covers))
        {
            self.log.delete_checkpoint(old).await?;
            report.checkpoints_deleted += 1;
        }
        let base_covers = inner
            .base
            .as_ref()
            .map(|b| b.head.covers.clone())
            .unwrap_or_default();
        for w in gone {
            // Gone writers send nothing more; once the base holds all their ops, their rows
            // are no longer needed to read anything.
            if base_covers.get(w) == inner.vv.get(w) {
                self.log.forget_writer(w).await?;
                inner.writer_keys.remove(&w);
                report.writers_forgotten += 1;
            }
        }
        report.checkpoint = Some(cp);
        Ok(report)
    }

    /// Declares `writer` gone: writes `Expired` over the value seen (`token`), then reads back.
    /// A renewal that raced it leaves a live sibling: then the writer stays (and it will see
    /// our value on its read-back and abandon the id).
    async fn expire(&self, writer: WriterId, token: &CausalityToken) -> Result<bool, LogError> {
        self.log
            .put_lease(writer, &Lease::Expired, Some(token))
            .await?;
        Ok(match self.log.read_lease(writer).await? {
            Some(row) => row.live_seen().is_none(),
            None => true,
        })
    }

    /// Makes sure this handle holds a lease it may write under: registers a new writer (lease
    /// first, then its key) or renews one, verifying by reading back that no collector expired
    /// it; abandons the id for a fresh one if one did.
    async fn ensure_lease(&self, inner: &mut Inner) -> Result<(), MailboxError> {
        for _ in 0..3 {
            let renewing = match &inner.lease {
                Some(l) if l.renewed.elapsed() < self.policy.lease.renew_after => return Ok(()),
                Some(l) => Some(l.token.clone()),
                None => None,
            };
            let sent = Instant::now();
            let mine = Lease::Live {
                seen: inner.vv.clone(),
            };
            self.log
                .put_lease(inner.writer, &mine, renewing.as_ref())
                .await?;
            let row = self.log.read_lease(inner.writer).await?;
            match row {
                Some(row) if row.undisputed() && row.values.contains(&Some(mine)) => {
                    if renewing.is_none() {
                        let sealed = inner.writer_key.seal(&self.keys.recipient)?;
                        self.log.register(inner.writer, sealed).await?;
                        let (w, k) = (inner.writer, inner.writer_key.clone());
                        inner.writer_keys.insert(w, k);
                    }
                    inner.lease = Some(HeldLease {
                        token: row.token,
                        renewed: sent,
                    });
                    return Ok(());
                }
                _ => {
                    tracing::info!(
                        partition = self.log.partition(),
                        writer = inner.writer.0,
                        "writer lease expired by a collector; taking a fresh writer id"
                    );
                    inner.new_writer();
                }
            }
        }
        Err(MailboxError::Log(LogError::Corrupt {
            key: self.log.partition().to_string(),
            detail: "could not obtain a writer lease".into(),
        }))
    }

    /// The current state (needs the identity); cheap: a shared snapshot.
    pub async fn state(&self) -> Result<Arc<MailboxState>, MailboxError> {
        let inner = self.inner.lock().await;
        inner
            .state
            .clone()
            .ok_or(MailboxError::Locked("reading the state"))
    }

    /// (UIDNEXT, HIGHESTMODSEQ + 1) as this handle knows them.
    pub async fn floors(&self) -> (u64, u64) {
        self.inner.lock().await.floors()
    }

    /// Takes the lease, syncs, then writes one op built from the floors of the synced view.
    /// Returns the op's dot and, for an add, the UID its writer announced (APPENDUID).
    pub async fn write(
        &self,
        build: impl FnOnce(u64) -> MailOp,
    ) -> Result<(Dot, Option<u64>), MailboxError> {
        let mut inner = self.inner.lock().await;
        let stored = async {
            // Lease before sync: a collector that did not count this writer only squashed
            // ops stored before it read the leases, which this sync then sees.
            self.ensure_lease(&mut inner).await?;
            self.sync_locked(&mut inner).await?;
            let (uid_next, modseq_floor) = inner.floors();
            let op = build(uid_next);
            if let MailOp::Add { msg, .. } = &op {
                if uid_next > UID_LIMIT {
                    return Err(MailboxError::UidSpaceExhausted(uid_next));
                }
                // The log's rule assumes a writer never adds an id live in its view.
                if let Some(uid) = inner.state.as_ref().and_then(|s| s.uid_of(msg)) {
                    return Err(MailboxError::AlreadyPresent {
                        id: msg.0.clone(),
                        uid,
                    });
                }
            }
            let op = LogOp {
                dot: Dot {
                    writer: inner.writer,
                    seq: inner.seq + 1,
                },
                lamport: inner.lamport + 1,
                deps: inner.vv.clone(),
                modseq_floor,
                op,
            };
            let header = op.header();
            let body =
                postcard::to_allocvec(&op.op).map_err(|e| LogError::Encode(e.to_string()))?;
            let row = crate::log::store::op_key(op.dot);
            let value = codec::encode(&row, &header, &body, &inner.writer_key)?;
            if inner
                .lease
                .as_ref()
                .is_none_or(|l| l.renewed.elapsed() >= self.policy.lease.send_limit)
            {
                // The sync outlasted the lease: do not send under it.
                return Err(MailboxError::LeaseLost);
            }
            self.log.append(op.dot, value).await?;
            Ok::<_, MailboxError>((op, header))
        }
        .await;
        let (op, header) = match stored {
            Ok(x) => x,
            Err(
                e @ (MailboxError::LeaseLost
                | MailboxError::UidSpaceExhausted(_)
                | MailboxError::AlreadyPresent { .. }),
            ) => {
                return Err(e); // nothing was sent
            }
            Err(e) => {
                // The op may or may not be stored: never reuse its dot for another op. Later
                // writes go out under a fresh writer id; a stored orphan is read back like any
                // other op.
                inner.new_writer();
                return Err(e);
            }
        };
        inner.seq += 1;
        inner.lamport += 1;
        inner.vv.include(op.dot);
        inner.seen.insert(op.dot);
        inner.push_header(header, &op.deps);
        let uid = match &op.op {
            MailOp::Add { uid_floor, .. } => Some(*uid_floor),
            _ => None,
        };
        let dot = op.dot;
        if self.keys.identity.is_some() {
            let vv_before = op.deps.clone();
            inner.ops.push(op);
            let from = inner.ops.len() - 1;
            let state = Self::advance(inner.state.take(), vv_before, &inner.ops, from);
            inner.state =
                Some(state.unwrap_or_else(|| {
                    Arc::new(view::compute_on(&inner.base_state(), &inner.ops))
                }));
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
    /// syncs on every change and so wakes every subscribed session, and runs `maintain` when
    /// the checkpoint policy says so (handles with the key). It ends when the mailbox is
    /// dropped.
    pub fn spawn_watcher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Mailbox> = Arc::downgrade(self);
        let log = self.log.clone();
        tokio::spawn(async move {
            let mut marker: Option<String> = None;
            let mut backoff = Duration::from_millis(100);
            loop {
                let polled = log.wait(marker.as_deref(), WATCH_POLL).await;
                let Some(mailbox) = weak.upgrade() else {
                    return;
                };
                match polled {
                    Ok(Some(next)) => {
                        let first = marker.is_none();
                        marker = Some(next);
                        if !first && let Err(e) = mailbox.sync().await {
                            tracing::warn!(partition = log.partition(), error = %e, "mailbox sync failed");
                        }
                        backoff = Duration::from_millis(100);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(partition = log.partition(), error = %e, "mailbox watch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
                if mailbox.keys.identity.is_some() && mailbox.maintenance_due().await {
                    match mailbox.maintain().await {
                        Ok(m) => tracing::debug!(partition = log.partition(), ?m, "log maintained"),
                        Err(e) => {
                            tracing::warn!(partition = log.partition(), error = %e, "log maintenance failed")
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

    fn quick_policy() -> MailboxPolicy {
        MailboxPolicy {
            lease: LeasePolicy {
                renew_after: Duration::from_millis(30),
                send_limit: Duration::from_millis(60),
                expire_after: Duration::from_millis(300),
            },
            checkpoint: CheckpointPolicy {
                every_ops: 10,
                every: Duration::from_secs(3600),
            },
        }
    }

    #[tokio::test]
    async fn the_stable_prefix_is_squashed_and_gone_writers_are_forgotten() {
        let (_dir, store, identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/sq");
        let a = Mailbox::open_with(log.clone(), keys.clone(), quick_policy())
            .await
            .unwrap();
        let b = Mailbox::open_with(log.clone(), keys.clone(), quick_policy())
            .await
            .unwrap();
        for i in 0..20 {
            a.write(add(&format!("a{i}"))).await.unwrap();
        }
        b.write(add("b0")).await.unwrap();
        // b's next write renews its lease, naming all it has seen (a0..a19, b0).
        tokio::time::sleep(Duration::from_millis(40)).await;
        b.write(|_| MailOp::Flags {
            msg: MessageId("b0".into()),
            action: FlagAction::Add,
            flags: BTreeSet::from(["\\Seen".to_string()]),
        })
        .await
        .unwrap();
        a.write(add("a20")).await.unwrap();

        // b's lease names what b had seen: the prefix stops there.
        let first = a.maintain().await.unwrap();
        assert!(first.checkpoint.is_some(), "{first:?}");
        assert_eq!(first.squashed, 21, "a0..a19 and b0: {first:?}");
        assert_eq!(first.writers_expired, 0);

        // b goes quiet; once its lease has been watched unchanged for the expiry time, it is
        // expired, everything is stable, and b's rows are forgotten.
        tokio::time::sleep(Duration::from_millis(350)).await;
        a.write(add("a21")).await.unwrap();
        let second = a.maintain().await.unwrap();
        assert_eq!(second.writers_expired, 1, "{second:?}");
        assert_eq!(second.writers_forgotten, 1, "{second:?}");
        let all = count(&a.inner.lock().await.vv);
        assert_eq!(
            count(&a.inner.lock().await.base.as_ref().unwrap().head.covers),
            all
        );
        assert!(second.checkpoints_deleted >= 1, "{second:?}");

        // A cold open reads the base alone and agrees; so do the floors without the key.
        let fresh = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        assert_eq!(fresh.state().await.unwrap(), a.state().await.unwrap());
        assert!(fresh.inner.lock().await.ops.is_empty());
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

        // b comes back: its lease is gone, so it takes a fresh id, and its op lands after all.
        let old = b.inner.lock().await.writer;
        let (_, uid) = b.write(add("b1")).await.unwrap();
        assert_ne!(b.inner.lock().await.writer, old);
        a.sync().await.unwrap();
        let s = a.state().await.unwrap();
        assert_eq!(uid, Some(24));
        assert_eq!(s.uid_of(&MessageId("b1".into())), Some(24));
        assert_eq!(s.messages.len(), 24);
        assert_eq!(s.renumbered, 0);
    }

    #[tokio::test]
    async fn nested_squashes_from_two_processes_and_a_late_op_converge() {
        let (_dir, store, identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/sq2");
        let a = Mailbox::open_with(log.clone(), keys.clone(), quick_policy())
            .await
            .unwrap();
        let c = Mailbox::open_with(log.clone(), keys.clone(), quick_policy())
            .await
            .unwrap();
        for i in 0..12 {
            a.write(add(&format!("a{i}"))).await.unwrap();
            c.write(|_| MailOp::Flags {
                msg: MessageId(format!("a{i}")),
                action: FlagAction::Add,
                flags: BTreeSet::from(["\\Seen".to_string()]),
            })
            .await
            .unwrap();
        }
        // c renews (its lease now names all 24 ops), then a squashes them.
        tokio::time::sleep(Duration::from_millis(40)).await;
        c.write(|_| MailOp::Flags {
            msg: MessageId("a0".into()),
            action: FlagAction::Add,
            flags: BTreeSet::from(["\\Flagged".to_string()]),
        })
        .await
        .unwrap();
        let ra = a.maintain().await.unwrap();
        assert_eq!(ra.squashed, 24, "{ra:?}");
        // a renews in turn; c squashes a little further on top of a's base.
        tokio::time::sleep(Duration::from_millis(40)).await;
        a.write(add("a12")).await.unwrap();
        c.write(|_| MailOp::Expunge {
            msg: MessageId("a3".into()),
        })
        .await
        .unwrap();
        let rc = c.maintain().await.unwrap();
        assert!(ra.squashed > 0 && rc.squashed > 0, "{ra:?} {rc:?}");
        a.sync().await.unwrap();
        let reference = a.state().await.unwrap();
        assert_eq!(c.state().await.unwrap(), reference);
        assert_eq!(reference.messages.len(), 12);
        assert_eq!(
            reference
                .messages
                .values()
                .filter(|m| m.flags.contains("\\Seen"))
                .count(),
            11
        );

        // An op from a writer that never saw anything lands behind both squashes: it is read
        // as following the base, never dropped.
        let w = WriterId(7);
        let ghost = LogOp {
            dot: Dot { writer: w, seq: 1 },
            lamport: 1,
            deps: VersionVector::default(),
            modseq_floor: 1,
            op: add("ghost")(1),
        };
        let wk = WriterKey::generate();
        log.register(w, wk.seal(&identity.to_public()).unwrap())
            .await
            .unwrap();
        let row = crate::log::store::op_key(ghost.dot);
        let body = postcard::to_allocvec(&ghost.op).unwrap();
        log.append(
            ghost.dot,
            codec::encode(&row, &ghost.header(), &body, &wk).unwrap(),
        )
        .await
        .unwrap();
        for m in [&a, &c] {
            m.sync().await.unwrap();
            let s = m.state().await.unwrap();
            assert!(s.uid_of(&MessageId("ghost".into())).unwrap() >= reference.uid_next);
            crate::mail::invariants::check_pair(&reference, &s, &[]).unwrap();
        }
        let fresh = Mailbox::open(log, keys).await.unwrap();
        assert_eq!(fresh.state().await.unwrap(), a.state().await.unwrap());
    }

    #[tokio::test]
    async fn no_uid_at_or_above_the_limit_is_ever_announced() {
        let (_dir, store, _identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/u32");
        let a = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        // A writer whose view is just below the limit (as after a history of wide blocks).
        let (_, uid) = a
            .write(|_| MailOp::Add {
                msg: MessageId("near".into()),
                flags: BTreeSet::new(),
                uid_floor: UID_LIMIT,
            })
            .await
            .unwrap();
        assert_eq!(uid, Some(UID_LIMIT));
        let err = a.write(add("over")).await.unwrap_err();
        assert!(matches!(err, MailboxError::UidSpaceExhausted(n) if n == UID_LIMIT + 1));
        assert!(err.to_string().contains("UIDVALIDITY"), "{err}");
        // Flags and expunges still work; the refused message left nothing behind.
        a.write(|_| MailOp::Expunge {
            msg: MessageId("near".into()),
        })
        .await
        .unwrap();
        let s = a.state().await.unwrap();
        assert!(s.uids.keys().all(|m| m.0 != "over"));
    }

    #[tokio::test]
    async fn an_op_is_held_back_until_its_causal_past_is_readable() {
        let (_dir, store, identity, keys) = local_env().await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/held");
        let reader = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        let w = WriterId(5);
        let wk = WriterKey::generate();
        log.register(w, wk.seal(&identity.to_public()).unwrap())
            .await
            .unwrap();
        let first = LogOp {
            dot: Dot { writer: w, seq: 1 },
            lamport: 1,
            deps: VersionVector::default(),
            modseq_floor: 1,
            op: add("m1")(1),
        };
        let mut deps = VersionVector::default();
        deps.include(first.dot);
        let second = LogOp {
            dot: Dot { writer: w, seq: 2 },
            lamport: 2,
            deps,
            modseq_floor: 2,
            op: add("m2")(2),
        };
        let put = |op: LogOp| {
            let log = log.clone();
            let wk = wk.clone();
            async move {
                let body = postcard::to_allocvec(&op.op).unwrap();
                let key = crate::log::store::op_key(op.dot);
                log.append(
                    op.dot,
                    codec::encode(&key, &op.header(), &body, &wk).unwrap(),
                )
                .await
                .unwrap();
            }
        };
        // The second op is readable before the first (it reached the nodes that answered).
        put(second).await;
        reader.sync().await.unwrap();
        let s = reader.state().await.unwrap();
        assert!(
            s.messages.is_empty(),
            "m2 without m1 is not a closed view: {s:?}"
        );
        assert_eq!(reader.floors().await, (1, 1));
        put(first).await;
        reader.sync().await.unwrap();
        let s = reader.state().await.unwrap();
        assert_eq!(s.uid_of(&MessageId("m1".into())), Some(1));
        assert_eq!(s.uid_of(&MessageId("m2".into())), Some(2));
    }
}
