//! What a client sees of a mailbox: UIDs, UIDNEXT, flags, MODSEQs, HIGHESTMODSEQ and the UIDs
//! that vanished, as a deterministic function of the set of ops a server has read.
//!
//! Two servers that read the same ops show the same state, whatever order they read them in.
//! For any two causally closed sets O ⊆ O' the state satisfies V1–V5 (docs/causal-log.md), and
//! UIDVALIDITY never changes: concurrent appends are re-announced under fresh UIDs instead (an
//! expunge plus a new message to the client, same OBJECTID).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::log::clock::{Dot, OpId, VersionVector};
use crate::log::series::{self, Causal};

/// OBJECTID of a message (RFC 8474 EMAILID): stable across renumbering.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlagAction {
    Add,
    Remove,
    Set,
}

/// A change to one mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MailOp {
    /// A message appears (APPEND, delivery, the target side of COPY/MOVE). `uid_floor` is the
    /// UIDNEXT of the writer's view: the UID the writer announced (APPENDUID).
    Add {
        msg: MessageId,
        flags: BTreeSet<String>,
        uid_floor: u64,
    },
    Flags {
        msg: MessageId,
        action: FlagAction,
        flags: BTreeSet<String>,
    },
    /// EXPUNGE, or the source side of MOVE.
    Expunge { msg: MessageId },
}

/// One entry of a mailbox's log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogOp {
    pub dot: Dot,
    pub lamport: u64,
    /// Everything the writer had seen of this mailbox when it wrote the op.
    pub deps: VersionVector,
    /// HIGHESTMODSEQ + 1 of the writer's view.
    pub modseq_floor: u64,
    pub op: MailOp,
}

impl LogOp {
    pub fn id(&self) -> OpId {
        OpId {
            lamport: self.lamport,
            writer: self.dot.writer,
        }
    }
}

impl Causal for &LogOp {
    fn id(&self) -> OpId {
        LogOp::id(self)
    }
    fn dot(&self) -> Dot {
        self.dot
    }
    fn deps(&self) -> &VersionVector {
        &self.deps
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageState {
    pub id: MessageId,
    pub flags: BTreeSet<String>,
    pub modseq: u64,
}

/// UIDs that name nothing any more, with the MODSEQ at which they went (for QRESYNC VANISHED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vanished {
    pub first: u64,
    pub last: u64,
    pub modseq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxState {
    pub uid_next: u64,
    pub highest_modseq: u64,
    /// Live messages by UID.
    pub messages: BTreeMap<u64, MessageState>,
    /// Expunged UIDs and UIDs retired by renumbering.
    pub vanished: Vec<Vanished>,
    /// Messages re-announced under a new UID in this view (concurrent appends).
    pub renumbered: usize,
    /// UID of every message ever added (live or expunged), by id.
    pub uids: BTreeMap<MessageId, u64>,
}

impl MailboxState {
    /// The floors a writer records in its next op.
    pub fn floors(&self) -> (u64, u64) {
        (self.uid_next, self.highest_modseq + 1)
    }

    /// UID of a live message.
    pub fn uid_of(&self, msg: &MessageId) -> Option<u64> {
        self.uids
            .get(msg)
            .copied()
            .filter(|u| self.messages.get(u).is_some_and(|m| &m.id == msg))
    }

    /// Folds in an op that follows everything in this state (its writer had seen every op of
    /// it), as a sequential history does: the op is a block of its own, so it keeps its floors
    /// and nothing else moves. O(log n). Returns false, changing nothing, when the op does not
    /// fit that case (the caller then recomputes with `compute`).
    pub fn apply_next(&mut self, op: &LogOp) -> bool {
        if op.modseq_floor <= self.highest_modseq {
            return false;
        }
        match &op.op {
            MailOp::Add {
                msg,
                flags,
                uid_floor,
            } => {
                if *uid_floor < self.uid_next || self.uids.contains_key(msg) {
                    return false;
                }
                self.uids.insert(msg.clone(), *uid_floor);
                self.messages.insert(
                    *uid_floor,
                    MessageState {
                        id: msg.clone(),
                        flags: flags.clone(),
                        modseq: op.modseq_floor,
                    },
                );
                self.uid_next = uid_floor + 1;
            }
            MailOp::Flags { msg, action, flags } => {
                if let Some(uid) = self.uid_of(msg)
                    && let Some(m) = self.messages.get_mut(&uid)
                {
                    match action {
                        FlagAction::Add => m.flags.extend(flags.iter().cloned()),
                        FlagAction::Remove => m.flags.retain(|f| !flags.contains(f)),
                        FlagAction::Set => m.flags = flags.clone(),
                    }
                    m.modseq = op.modseq_floor;
                }
            }
            MailOp::Expunge { msg } => {
                if let Some(uid) = self.uid_of(msg) {
                    self.messages.remove(&uid);
                    let at = self
                        .vanished
                        .partition_point(|v| (v.first, v.last) < (uid, uid));
                    self.vanished.insert(
                        at,
                        Vanished {
                            first: uid,
                            last: uid,
                            modseq: op.modseq_floor,
                        },
                    );
                }
            }
        }
        self.highest_modseq = op.modseq_floor;
        true
    }
}

/// Computes the state of the view made of `ops` (a causally closed set, in any order).
pub fn compute(ops: &[LogOp]) -> MailboxState {
    let mut sorted: Vec<&LogOp> = ops.iter().collect();
    sorted.sort_by_key(|o| o.id());

    let modseqs = series::number(&sorted, |o| o.modseq_floor, 1);
    let adds: Vec<&LogOp> = sorted
        .iter()
        .copied()
        .filter(|o| matches!(o.op, MailOp::Add { .. }))
        .collect();
    let uid_floor = |o: &&LogOp| match &o.op {
        MailOp::Add { uid_floor, .. } => *uid_floor,
        _ => 0,
    };
    let uids = series::number(&adds, uid_floor, 1);
    let modseq_of: BTreeMap<OpId, u64> = sorted
        .iter()
        .zip(&modseqs.numbers)
        .map(|(o, &m)| (o.id(), m))
        .collect();

    struct Live {
        uid: u64,
        flags: BTreeSet<String>,
        modseq: u64,
        expunged: Option<u64>,
    }
    let mut by_msg: BTreeMap<&MessageId, Live> = BTreeMap::new();
    let mut renumbered = 0;
    for (o, &uid) in adds.iter().zip(&uids.numbers) {
        if let MailOp::Add {
            msg,
            flags,
            uid_floor,
        } = &o.op
        {
            renumbered += usize::from(uid != *uid_floor);
            // A second add of the same id (a retried write) is the same message: keep the first.
            by_msg.entry(msg).or_insert(Live {
                uid,
                flags: flags.clone(),
                modseq: modseq_of[&o.id()],
                expunged: None,
            });
        }
    }
    for o in &sorted {
        let ms = modseq_of[&o.id()];
        match &o.op {
            MailOp::Add { .. } => {}
            MailOp::Flags { msg, action, flags } => {
                if let Some(m) = by_msg.get_mut(msg) {
                    match action {
                        FlagAction::Add => m.flags.extend(flags.iter().cloned()),
                        FlagAction::Remove => m.flags.retain(|f| !flags.contains(f)),
                        FlagAction::Set => m.flags = flags.clone(),
                    }
                    m.modseq = m.modseq.max(ms);
                }
            }
            MailOp::Expunge { msg } => {
                if let Some(m) = by_msg.get_mut(msg) {
                    m.expunged = Some(m.expunged.map_or(ms, |e| e.max(ms)));
                }
            }
        }
    }

    let mut messages = BTreeMap::new();
    let mut vanished = Vec::new();
    let uids_by_id: BTreeMap<MessageId, u64> = by_msg
        .iter()
        .map(|(id, m)| ((*id).clone(), m.uid))
        .collect();
    for (id, m) in by_msg {
        match m.expunged {
            None => {
                messages.insert(
                    m.uid,
                    MessageState {
                        id: id.clone(),
                        flags: m.flags,
                        modseq: m.modseq,
                    },
                );
            }
            Some(ms) => vanished.push(Vanished {
                first: m.uid,
                last: m.uid,
                modseq: ms,
            }),
        }
    }
    // Every UID a smaller view may have given to a member of a concurrent block lies in
    // `min_floor..base`, which nothing holds here.
    for block in uids.blocks.iter().filter(|b| b.is_concurrent()) {
        let modseq = block
            .members
            .iter()
            .map(|&i| modseq_of[&adds[i].id()])
            .min()
            .unwrap_or(0);
        if block.min_floor < block.base {
            vanished.push(Vanished {
                first: block.min_floor,
                last: block.base - 1,
                modseq,
            });
        }
    }
    vanished.sort_by_key(|v| (v.first, v.last));

    MailboxState {
        uid_next: uids.next,
        highest_modseq: modseqs.next - 1,
        messages,
        vanished,
        renumbered,
        uids: uids_by_id,
    }
}

impl LogOp {
    /// The plaintext causal header stored beside the encrypted body.
    pub fn header(&self) -> crate::log::codec::Header {
        crate::log::codec::Header {
            dot: self.dot,
            lamport: self.lamport,
            deps: self.deps.clone(),
            modseq_floor: self.modseq_floor,
            uid_floor: match &self.op {
                MailOp::Add { uid_floor, .. } => Some(*uid_floor),
                _ => None,
            },
        }
    }

    /// Rebuilds an op from its header and decrypted body; the header is authoritative for the
    /// causal fields (a body that disagrees is corrupt).
    pub fn from_parts(header: crate::log::codec::Header, op: MailOp) -> Option<LogOp> {
        let consistent = match (&op, header.uid_floor) {
            (MailOp::Add { uid_floor, .. }, Some(h)) => *uid_floor == h,
            (MailOp::Add { .. }, None) => false,
            (_, h) => h.is_none(),
        };
        consistent.then_some(LogOp {
            dot: header.dot,
            lamport: header.lamport,
            deps: header.deps,
            modseq_floor: header.modseq_floor,
            op,
        })
    }
}

impl Causal for &crate::log::codec::Header {
    fn id(&self) -> OpId {
        OpId {
            lamport: self.lamport,
            writer: self.dot.writer,
        }
    }
    fn dot(&self) -> Dot {
        self.dot
    }
    fn deps(&self) -> &VersionVector {
        &self.deps
    }
}

/// The floors a writer records in its next op — (UIDNEXT, HIGHESTMODSEQ + 1) — from the
/// plaintext headers alone, for writers that cannot decrypt the mailbox (LMTP). Equal to
/// `compute(ops).floors()` for the same ops.
pub fn next_floors(headers: &[crate::log::codec::Header]) -> (u64, u64) {
    let mut sorted: Vec<&crate::log::codec::Header> = headers.iter().collect();
    sorted.sort_by_key(|h| (h.lamport, h.dot.writer));
    let modseqs = series::number(&sorted, |h| h.modseq_floor, 1);
    let adds: Vec<&crate::log::codec::Header> = sorted
        .iter()
        .copied()
        .filter(|h| h.uid_floor.is_some())
        .collect();
    let uids = series::number(&adds, |h| h.uid_floor.unwrap_or(0), 1);
    (uids.next, modseqs.next)
}
