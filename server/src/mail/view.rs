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
    /// DELETE of the mailbox: expunges every message whose add its writer had seen. A message
    /// added concurrently stays, and is rescued from the deleted mailbox (`mail::rescue`).
    ExpungeAll,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    pub id: MessageId,
    pub flags: BTreeSet<String>,
    pub modseq: u64,
}

/// UIDs that name nothing any more, with the MODSEQ at which they went (for QRESYNC VANISHED).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vanished {
    pub first: u64,
    pub last: u64,
    pub modseq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl Default for MailboxState {
    /// The state of the empty view.
    fn default() -> MailboxState {
        MailboxState {
            uid_next: 1,
            highest_modseq: 0,
            messages: BTreeMap::new(),
            vanished: Vec::new(),
            renumbered: 0,
            uids: BTreeMap::new(),
        }
    }
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

    fn expunge_uid(&mut self, uid: u64, modseq: u64) {
        self.messages.remove(&uid);
        let at = self
            .vanished
            .partition_point(|v| (v.first, v.last) < (uid, uid));
        self.vanished.insert(
            at,
            Vanished {
                first: uid,
                last: uid,
                modseq,
            },
        );
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
                // An id that is live here is a retried add: leave it to `compute`. One that
                // was expunged comes back as a new instance (moved away and back).
                if *uid_floor < self.uid_next || self.uid_of(msg).is_some() {
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
                    self.expunge_uid(uid, op.modseq_floor);
                }
            }
            MailOp::ExpungeAll => {
                let all: Vec<u64> = self.messages.keys().copied().collect();
                for uid in all {
                    self.expunge_uid(uid, op.modseq_floor);
                }
            }
        }
        self.highest_modseq = op.modseq_floor;
        true
    }
}

/// Computes the state of the view made of `ops` (a causally closed set, in any order).
pub fn compute(ops: &[LogOp]) -> MailboxState {
    compute_on(&MailboxState::default(), ops)
}

/// The state of the view `B ∪ ops`, where `base` is the state of a *stable prefix* B: a
/// causally closed set every op of `ops` follows (its writer had seen all of B). Equal to
/// `compute` of all the ops of B and `ops` (docs/causal-log.md, "Squashed checkpoints"), without
/// B's ops. An op that had not seen all of B (a writer that broke its lease) is read as if it
/// had: it is numbered after B, never dropped.
pub fn compute_on(base: &MailboxState, ops: &[LogOp]) -> MailboxState {
    let mut sorted: Vec<&LogOp> = ops.iter().collect();
    sorted.sort_by_key(|o| o.id());

    let modseqs = series::number(&sorted, |o| o.modseq_floor, base.highest_modseq + 1);
    let adds: Vec<&LogOp> = sorted
        .iter()
        .copied()
        .filter(|o| matches!(o.op, MailOp::Add { .. }))
        .collect();
    let uid_floor = |o: &&LogOp| match &o.op {
        MailOp::Add { uid_floor, .. } => *uid_floor,
        _ => 0,
    };
    let uids = series::number(&adds, uid_floor, base.uid_next);
    let modseq_of: BTreeMap<OpId, u64> = sorted
        .iter()
        .zip(&modseqs.numbers)
        .map(|(o, &m)| (o.id(), m))
        .collect();

    // A message id is live while one of its adds is not *covered*: no Expunge of the id, or
    // ExpungeAll, had seen it (an observed-remove set). It shows at the UID of its first add
    // in the total order. Writers never add an id that is live in their view, so two
    // uncovered adds of one id are concurrent duplicates of one message (a retried write):
    // an expunge that had seen the shown one removes them all. An add after that is the
    // message coming back (moved away and back): a new instance with its own UID.
    struct AddRec {
        /// `None`: a live message of the base, which every later op has seen.
        dot: Option<Dot>,
        uid: u64,
        flags: BTreeSet<String>,
        modseq: u64,
        covered: bool,
    }
    #[derive(Default)]
    struct Msg {
        adds: Vec<AddRec>,
        /// Index of the add it shows at, while live.
        shown: Option<usize>,
    }
    impl Msg {
        /// Marks the adds `deps` had seen as covered; returns the UID that stops naming the
        /// message, if the shown add was one of them.
        fn cover(&mut self, deps: &VersionVector) -> Option<u64> {
            for a in &mut self.adds {
                a.covered |= a.dot.is_none_or(|d| deps.covers(d));
            }
            let gone = self.shown.filter(|&i| self.adds[i].covered)?;
            // The other uncovered adds are concurrent duplicates of the same message: they go
            // with it (showing one at its own UID would reuse a UID smaller views left free).
            for a in &mut self.adds {
                a.covered = true;
            }
            self.shown = None;
            Some(self.adds[gone].uid)
        }
    }
    let add_uid: BTreeMap<OpId, u64> = adds
        .iter()
        .zip(&uids.numbers)
        .map(|(o, &u)| (o.id(), u))
        .collect();
    let mut by_msg: BTreeMap<&MessageId, Msg> = BTreeMap::new();
    for m in base.messages.values() {
        by_msg.insert(
            &m.id,
            Msg {
                adds: vec![AddRec {
                    dot: None,
                    uid: base.uids.get(&m.id).copied().unwrap_or(0),
                    flags: m.flags.clone(),
                    modseq: m.modseq,
                    covered: false,
                }],
                shown: Some(0),
            },
        );
    }
    let mut vanished = base.vanished.clone();
    let mut flag_ops: Vec<(&LogOp, u64)> = Vec::new();
    let mut renumbered = base.renumbered;
    for o in &sorted {
        let ms = modseq_of[&o.id()];
        match &o.op {
            MailOp::Add {
                msg,
                flags,
                uid_floor,
            } => {
                let uid = add_uid[&o.id()];
                renumbered += usize::from(uid != *uid_floor);
                let m = by_msg.entry(msg).or_default();
                m.adds.push(AddRec {
                    dot: Some(o.dot),
                    uid,
                    flags: flags.clone(),
                    modseq: ms,
                    covered: false,
                });
                if m.shown.is_none() {
                    m.shown = Some(m.adds.len() - 1);
                }
            }
            MailOp::Flags { .. } => flag_ops.push((o, ms)),
            MailOp::Expunge { msg } => {
                if let Some(uid) = by_msg.get_mut(msg).and_then(|m| m.cover(&o.deps)) {
                    vanished.push(Vanished {
                        first: uid,
                        last: uid,
                        modseq: ms,
                    });
                }
            }
            MailOp::ExpungeAll => {
                for m in by_msg.values_mut() {
                    if let Some(uid) = m.cover(&o.deps) {
                        vanished.push(Vanished {
                            first: uid,
                            last: uid,
                            modseq: ms,
                        });
                    }
                }
            }
        }
    }

    let mut messages: BTreeMap<u64, MessageState> = BTreeMap::new();
    let mut uids_by_id: BTreeMap<MessageId, u64> = base.uids.clone();
    let mut live_of: BTreeMap<&MessageId, u64> = BTreeMap::new();
    for (id, m) in &by_msg {
        if let Some(a) = m.shown.map(|i| &m.adds[i]) {
            messages.insert(
                a.uid,
                MessageState {
                    id: (*id).clone(),
                    flags: a.flags.clone(),
                    modseq: a.modseq,
                },
            );
            live_of.insert(id, a.uid);
        }
        if let Some(a) = m.shown.map(|i| &m.adds[i]).or(m.adds.last()) {
            uids_by_id.insert((*id).clone(), a.uid);
        }
    }
    // Flag changes in the total order, on a message whose writer had seen a live add of it.
    for (o, ms) in flag_ops {
        let MailOp::Flags { msg, action, flags } = &o.op else {
            continue;
        };
        let Some(uid) = live_of.get(msg) else {
            continue;
        };
        let seen = by_msg[msg]
            .adds
            .iter()
            .any(|a| !a.covered && a.dot.is_none_or(|d| o.deps.covers(d)));
        if let (true, Some(m)) = (seen, messages.get_mut(uid)) {
            match action {
                FlagAction::Add => m.flags.extend(flags.iter().cloned()),
                FlagAction::Remove => m.flags.retain(|f| !flags.contains(f)),
                FlagAction::Set => m.flags = flags.clone(),
            }
            m.modseq = m.modseq.max(ms);
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
    next_floors_on((1, 1), headers)
}

/// `next_floors` of `headers` on top of a stable prefix whose floors are `base`.
pub fn next_floors_on(base: (u64, u64), headers: &[crate::log::codec::Header]) -> (u64, u64) {
    let mut sorted: Vec<&crate::log::codec::Header> = headers.iter().collect();
    sorted.sort_by_key(|h| (h.lamport, h.dot.writer));
    let modseqs = series::number(&sorted, |h| h.modseq_floor, base.1);
    let adds: Vec<&crate::log::codec::Header> = sorted
        .iter()
        .copied()
        .filter(|h| h.uid_floor.is_some())
        .collect();
    let uids = series::number(&adds, |h| h.uid_floor.unwrap_or(0), base.0);
    (uids.next, modseqs.next)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::log::clock::WriterId;

    /// A random history of `replicas` writers with random merges: adds, flag changes, expunges
    /// (including an expunge of an already expunged message, as a stale client sends).
    fn history(seed: u64, replicas: usize, steps: usize) -> Vec<LogOp> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut held: Vec<Vec<LogOp>> = vec![Vec::new(); replicas];
        let mut all: Vec<LogOp> = Vec::new();
        let mut next = 0;
        for _ in 0..steps {
            let r = rng.random_range(0..replicas);
            if rng.random_bool(0.3) {
                let from = rng.random_range(0..replicas);
                let mine: Vec<Dot> = held[r].iter().map(|o| o.dot).collect();
                let new: Vec<LogOp> = held[from]
                    .iter()
                    .filter(|o| !mine.contains(&o.dot))
                    .cloned()
                    .collect();
                held[r].extend(new);
                continue;
            }
            let state = compute(&held[r]);
            let mut vv = VersionVector::default();
            for o in &held[r] {
                vv.include(o.dot);
            }
            let writer = WriterId(r as u64 + 1);
            let seq = vv.get(writer) + 1;
            let lamport = held[r].iter().map(|o| o.lamport).max().unwrap_or(0) + 1;
            let ids: Vec<MessageId> = state.uids.keys().cloned().collect();
            let op = match rng.random_range(0..10) {
                0..5 => {
                    next += 1;
                    MailOp::Add {
                        msg: MessageId(format!("m{next}")),
                        flags: BTreeSet::new(),
                        uid_floor: state.uid_next,
                    }
                }
                _ if ids.is_empty() => continue,
                5..8 => MailOp::Flags {
                    msg: ids[rng.random_range(0..ids.len())].clone(),
                    action: FlagAction::Add,
                    flags: BTreeSet::from([format!("f{}", rng.random_range(0..3))]),
                },
                _ => MailOp::Expunge {
                    msg: ids[rng.random_range(0..ids.len())].clone(),
                },
            };
            let op = LogOp {
                dot: Dot { writer, seq },
                lamport,
                deps: vv,
                modseq_floor: state.highest_modseq + 1,
                op,
            };
            held[r].push(op.clone());
            all.push(op);
        }
        all
    }

    /// The largest stable prefix inside `cut`: every op outside it had seen all of it.
    fn stable_within(ops: &[LogOp], mut cut: VersionVector) -> VersionVector {
        loop {
            let mut changed = false;
            let outside: Vec<&LogOp> = ops.iter().filter(|o| !cut.covers(o.dot)).collect();
            for o in outside {
                for (w, s) in cut.0.iter_mut() {
                    let seen = o.deps.get(*w);
                    if *s > seen {
                        *s = seen;
                        changed = true;
                    }
                }
            }
            if !changed {
                return cut;
            }
        }
    }

    #[test]
    fn a_squashed_stable_prefix_gives_the_same_state() {
        let mut squashed = 0;
        for seed in 0..3000u64 {
            let ops = history(seed, 2 + (seed % 3) as usize, 30);
            let mut top = VersionVector::default();
            for o in &ops {
                top.include(o.dot);
            }
            let mut rng = StdRng::seed_from_u64(seed ^ 0xbeef);
            for _ in 0..3 {
                let cut = VersionVector(
                    top.0
                        .iter()
                        .map(|(&w, &s)| (w, rng.random_range(s / 2..=s)))
                        .collect(),
                );
                let base_vv = stable_within(&ops, cut);
                let (inside, outside): (Vec<LogOp>, Vec<LogOp>) =
                    ops.iter().cloned().partition(|o| base_vv.covers(o.dot));
                // A non-trivial squash: something on both sides.
                squashed += usize::from(!inside.is_empty() && !outside.is_empty());
                let base = compute(&inside);
                assert_eq!(
                    compute_on(&base, &outside),
                    compute(&ops),
                    "seed {seed}, base {base_vv:?}"
                );
                let headers: Vec<_> = outside.iter().map(LogOp::header).collect();
                assert_eq!(
                    next_floors_on(base.floors(), &headers),
                    compute(&ops).floors(),
                    "seed {seed}"
                );
            }
        }
        assert!(squashed > 1000, "the test squashed too rarely: {squashed}");
    }

    #[test]
    fn a_second_expunge_changes_nothing_on_either_path() {
        let add = LogOp {
            dot: Dot {
                writer: WriterId(1),
                seq: 1,
            },
            lamport: 1,
            deps: VersionVector::default(),
            modseq_floor: 1,
            op: MailOp::Add {
                msg: MessageId("m".into()),
                flags: BTreeSet::new(),
                uid_floor: 1,
            },
        };
        let mut ops = vec![add];
        for seq in 2..=3 {
            let mut deps = VersionVector::default();
            deps.include(Dot {
                writer: WriterId(1),
                seq: seq - 1,
            });
            ops.push(LogOp {
                dot: Dot {
                    writer: WriterId(1),
                    seq,
                },
                lamport: seq,
                deps,
                modseq_floor: seq,
                op: MailOp::Expunge {
                    msg: MessageId("m".into()),
                },
            });
        }
        let mut fast = compute(&ops[..1]);
        assert!(fast.apply_next(&ops[1]));
        assert!(fast.apply_next(&ops[2]));
        let full = compute(&ops);
        assert_eq!(fast, full);
        assert_eq!(full.vanished[0].modseq, 2);
    }

    #[test]
    fn a_message_moved_away_and_back_is_a_new_instance_and_delete_takes_all() {
        let w = WriterId(1);
        let mut ops: Vec<LogOp> = Vec::new();
        let push = |op: MailOp, ops: &mut Vec<LogOp>| {
            let seq = ops.len() as u64 + 1;
            let state = compute(ops);
            let mut deps = VersionVector::default();
            if seq > 1 {
                deps.include(Dot {
                    writer: w,
                    seq: seq - 1,
                });
            }
            let op = match op {
                MailOp::Add { msg, flags, .. } => MailOp::Add {
                    msg,
                    flags,
                    uid_floor: state.uid_next,
                },
                other => other,
            };
            ops.push(LogOp {
                dot: Dot { writer: w, seq },
                lamport: seq,
                deps,
                modseq_floor: state.highest_modseq + 1,
                op,
            });
        };
        let m = || MessageId("m".into());
        let add = |msg: MessageId| MailOp::Add {
            msg,
            flags: BTreeSet::new(),
            uid_floor: 0,
        };
        push(add(m()), &mut ops);
        push(MailOp::Expunge { msg: m() }, &mut ops);
        push(add(m()), &mut ops);
        push(add(MessageId("n".into())), &mut ops);
        let mut fast = compute(&ops[..1]);
        for o in &ops[1..] {
            assert!(fast.apply_next(o), "{o:?}");
        }
        let full = compute(&ops);
        assert_eq!(fast, full);
        assert_eq!(full.uid_of(&m()), Some(2), "back under a new UID");
        assert_eq!(full.vanished.len(), 1);
        push(MailOp::ExpungeAll, &mut ops);
        assert!(fast.apply_next(ops.last().unwrap()));
        let full = compute(&ops);
        assert_eq!(fast, full);
        assert!(full.messages.is_empty());
        assert_eq!(full.vanished.len(), 3);
    }
}
