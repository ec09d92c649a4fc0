//! The properties V1–V5 between two views O ⊆ O' of one mailbox, as executable checks. Used by
//! the unit tests, the seeded simulation and the model checker.

use std::collections::BTreeSet;

use super::view::{LogOp, MailOp, MailboxState, MessageId};

/// Checks V1–V5 for `small` ⊆ `big`; `big_ops` are the ops of the bigger view (for V5).
pub fn check_pair(
    small: &MailboxState,
    big: &MailboxState,
    big_ops: &[LogOp],
) -> Result<(), String> {
    // V1: a UID that named m names m or nothing; a free UID below UIDNEXT stays free.
    for (uid, m) in &small.messages {
        if let Some(other) = big.messages.get(uid)
            && other.id != m.id
        {
            return Err(format!(
                "V1: UID {uid} named {:?}, now {:?}",
                m.id, other.id
            ));
        }
    }
    for (uid, m) in big.messages.range(..small.uid_next) {
        if !small.messages.contains_key(uid) {
            return Err(format!(
                "V1: UID {uid} was free below UIDNEXT {} and now names {:?}",
                small.uid_next, m.id
            ));
        }
    }
    // V2: new or renumbered messages sit at or above the old UIDNEXT.
    for (uid, m) in &big.messages {
        let before = small.uid_of(&m.id);
        if before != Some(*uid) && *uid < small.uid_next {
            return Err(format!(
                "V2: {:?} is new or moved (was {before:?}) to UID {uid} < old UIDNEXT {}",
                m.id, small.uid_next
            ));
        }
    }
    // V3: nothing goes backwards.
    if big.uid_next < small.uid_next || big.highest_modseq < small.highest_modseq {
        return Err(format!(
            "V3: UIDNEXT {} → {}, HIGHESTMODSEQ {} → {}",
            small.uid_next, big.uid_next, small.highest_modseq, big.highest_modseq
        ));
    }
    // V4: every change is reported above the old HIGHESTMODSEQ.
    for (uid, m) in &big.messages {
        let changed = match small.messages.get(uid) {
            Some(old) => old.id != m.id || old.flags != m.flags,
            None => true,
        };
        if changed && m.modseq <= small.highest_modseq {
            return Err(format!(
                "V4: UID {uid} ({:?}) changed but its MODSEQ {} ≤ old HIGHESTMODSEQ {}",
                m.id, m.modseq, small.highest_modseq
            ));
        }
    }
    for (uid, m) in &small.messages {
        if big.messages.get(uid).is_none_or(|n| n.id != m.id) {
            let reported = big
                .vanished
                .iter()
                .any(|v| v.first <= *uid && *uid <= v.last && v.modseq > small.highest_modseq);
            if !reported {
                return Err(format!(
                    "V4: UID {uid} ({:?}) vanished without a VANISHED above MODSEQ {}",
                    m.id, small.highest_modseq
                ));
            }
        }
    }
    // V5: every message added and not expunged is there. An add is expunged by an Expunge of
    // its id, or an ExpungeAll, whose writer had seen it or a concurrent add of the same id
    // (a duplicate of the same message: writers never add an id live in their view).
    let live: BTreeSet<&MessageId> = big.messages.values().map(|m| &m.id).collect();
    let add_of = |o: &LogOp| match &o.op {
        MailOp::Add { msg, .. } => Some(msg.clone()),
        _ => None,
    };
    for o in big_ops {
        let Some(msg) = add_of(o) else {
            continue;
        };
        let same: Vec<&LogOp> = big_ops
            .iter()
            .filter(|a| {
                a.dot == o.dot
                    || (add_of(a).as_ref() == Some(&msg)
                        && !a.deps.covers(o.dot)
                        && !o.deps.covers(a.dot))
            })
            .collect();
        let expunged = big_ops.iter().any(|e| {
            same.iter().any(|a| e.deps.covers(a.dot))
                && match &e.op {
                    MailOp::Expunge { msg: m } => *m == msg,
                    MailOp::ExpungeAll => true,
                    _ => false,
                }
        });
        if !expunged && !live.contains(&msg) {
            return Err(format!(
                "V5: {msg:?} was added, never expunged, and is missing"
            ));
        }
    }
    Ok(())
}
