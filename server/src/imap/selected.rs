//! The selected mailbox as one session sees it: the sequence numbers it has told the client
//! (a sorted list of UIDs), the state it last reported, and the untagged updates that bring
//! the client up to date with the shared mailbox handle.
//!
//! RFC 9051 §7.5.1 / RFC 3501 §7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH (their
//! sequence numbers would shift under the client). Expunges seen then are deferred: the
//! message keeps its sequence number (and is still fetchable from the reported state) until a
//! command that may report it. New messages (EXISTS) and flag changes are reported at any
//! command's end.
//!
//! The diff is cheap: every change to a mailbox carries a MODSEQ above the reported
//! HIGHESTMODSEQ (V4 in docs/causal-log.md), and new messages get UIDs above every UID shown
//! (V2), so an update looks only at messages with a newer MODSEQ and UIDs past the last one.

use std::collections::BTreeSet;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;

use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::response::Data;
use imap_codec::imap_types::sequence::SequenceSet;
use tokio::sync::watch;

use super::flags;
use super::output::Out;
use super::sequence::Ranges;
use crate::mail::account::OpenMailbox;
use crate::mail::mailbox_list::MailboxInfo;
use crate::mail::view::{MailboxState, MessageState};

/// How an update may be reported at this point.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    /// EXPUNGE responses allowed (not during FETCH, STORE or SEARCH).
    pub expunge: bool,
    /// CONDSTORE is on: flag updates carry MODSEQ.
    pub condstore: bool,
    /// QRESYNC is on: expunges are reported as `VANISHED` UIDs, not sequence numbers.
    pub qresync: bool,
}

pub struct Selected {
    pub info: MailboxInfo,
    pub mailbox: Arc<OpenMailbox>,
    pub read_only: bool,
    /// UID of every sequence number the client knows (index = seq - 1).
    uids: Vec<u64>,
    /// The state last reported, plus the messages whose expunge is deferred.
    known: MailboxState,
    /// Keywords announced in FLAGS.
    keywords: BTreeSet<String>,
    /// Some expunge could not be reported yet.
    deferred: bool,
    /// `changed` returned since the last report.
    woken: bool,
    changes: watch::Receiver<u64>,
}

pub fn keywords_of<'a>(messages: impl Iterator<Item = &'a MessageState>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for m in messages {
        for f in &m.flags {
            if flags::is_keyword(f) && !out.contains(f) {
                out.insert(f.clone());
            }
        }
    }
    out
}

impl Selected {
    /// `changes` must have been subscribed (and marked seen) before `state` was read, so that
    /// no change slips between the two.
    pub fn new(
        info: MailboxInfo,
        mailbox: Arc<OpenMailbox>,
        read_only: bool,
        state: MailboxState,
        changes: watch::Receiver<u64>,
    ) -> Selected {
        Selected {
            info,
            read_only,
            uids: state.messages.keys().copied().collect(),
            keywords: keywords_of(state.messages.values()),
            known: state,
            deferred: false,
            woken: false,
            changes,
            mailbox,
        }
    }

    pub fn exists(&self) -> usize {
        self.uids.len()
    }

    pub fn uids(&self) -> &[u64] {
        &self.uids
    }

    pub fn known(&self) -> &MailboxState {
        &self.known
    }

    pub fn keywords(&self) -> &BTreeSet<String> {
        &self.keywords
    }

    /// The message as last reported (also while its expunge is deferred).
    pub fn message(&self, uid: u64) -> Option<&MessageState> {
        self.known.messages.get(&uid)
    }

    /// 1-based sequence number of a UID the client knows.
    pub fn seq_of(&self, uid: u64) -> Option<usize> {
        self.uids.binary_search(&uid).ok().map(|i| i + 1)
    }

    /// The (sequence number, UID) pairs a command's set names, in ascending order. A sequence
    /// number past the end is an error (RFC 9051 §9: BAD); UIDs that do not exist are ignored.
    pub fn resolve(&self, set: &SequenceSet, uid: bool) -> Result<Vec<(usize, u64)>, String> {
        if uid {
            let largest = self.uids.last().copied().unwrap_or(0);
            let ranges = Ranges::resolve(set, largest);
            return Ok(ranges
                .select(&self.uids)
                .into_iter()
                .map(|i| (i + 1, self.uids[i]))
                .collect());
        }
        let exists = self.uids.len() as u64;
        let ranges = Ranges::resolve(set, exists);
        if let Some(max) = ranges.max()
            && max > exists
        {
            return Err(if exists == 0 {
                "the mailbox is empty: no sequence number is valid".to_string()
            } else {
                format!("invalid sequence number {max}: the mailbox has {exists} messages")
            });
        }
        let mut out = Vec::new();
        for (a, b) in ranges.iter() {
            for seq in a.max(1)..=b {
                let i = (seq - 1) as usize;
                out.push((seq as usize, self.uids[i]));
            }
        }
        Ok(out)
    }

    /// Records a change this session made and reported itself (STORE, FETCH setting \Seen), so
    /// that the next update does not report it again.
    /// Call `announce` with its flags first.
    pub fn note_own(&mut self, uid: u64, state: MessageState) {
        if let Some(m) = self.known.messages.get_mut(&uid) {
            *m = state;
        }
    }

    /// Sends FLAGS again if `flags` has a keyword the client was not told about yet (a FETCH
    /// must never show an unannounced keyword).
    pub fn announce(&mut self, flags: &BTreeSet<String>, out: &mut Out) {
        let fresh: Vec<String> = flags
            .iter()
            .filter(|f| flags::is_keyword(f) && !self.keywords.contains(*f))
            .cloned()
            .collect();
        if !fresh.is_empty() {
            self.keywords.extend(fresh);
            out.data(Data::Flags(flags::mailbox_flags(&self.keywords)));
        }
    }

    /// Whether an update may have something to report: the handle changed since the last one,
    /// or an expunge is deferred. Saves copying the state when nothing happened.
    pub fn dirty(&self) -> bool {
        self.deferred || self.woken || self.changes.has_changed().unwrap_or(true)
    }

    /// Marks the handle's changes as seen; call before reading the state to report, so that a
    /// change landing after the read is seen by the next `dirty`.
    pub fn mark_seen(&mut self) {
        self.woken = false;
        self.changes.borrow_and_update();
    }

    /// Waits until the shared mailbox handle changes (IDLE).
    pub async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.woken = true;
    }

    /// Reports what changed between the reported state and `new`.
    pub fn update(&mut self, mut new: MailboxState, report: Report, out: &mut Out) {
        let changed_since = self.known.highest_modseq;
        let moved = new.highest_modseq != changed_since;
        if !moved && !self.deferred && new.uid_next == self.known.uid_next {
            return;
        }

        // Keywords first: a client must not see a flag FLAGS did not announce.
        let fresh = keywords_of(
            new.messages
                .values()
                .filter(|m| m.modseq > changed_since)
                .filter(|m| m.flags.iter().any(|f| !self.keywords.contains(f))),
        );
        let fresh: Vec<String> = fresh
            .into_iter()
            .filter(|k| !self.keywords.contains(k))
            .collect();
        if !fresh.is_empty() {
            self.keywords.extend(fresh);
            out.data(Data::Flags(flags::mailbox_flags(&self.keywords)));
        }

        // Expunges, highest sequence number first so that each number is valid when sent.
        let gone: Vec<usize> = if moved || self.deferred {
            self.uids
                .iter()
                .enumerate()
                .filter(|(_, u)| !new.messages.contains_key(u))
                .map(|(i, _)| i)
                .collect()
        } else {
            Vec::new()
        };
        if report.expunge && report.qresync {
            let uids = Ranges::from_numbers(gone.iter().map(|&i| self.uids[i]));
            if let Some(known_uids) = uids.to_sequence_set() {
                out.data(Data::Vanished {
                    earlier: false,
                    known_uids,
                });
            }
            for &i in gone.iter().rev() {
                self.uids.remove(i);
            }
            self.deferred = false;
        } else if report.expunge {
            for &i in gone.iter().rev() {
                if let Some(seq) = NonZeroU32::new(i as u32 + 1) {
                    out.data(Data::Expunge(seq));
                }
                self.uids.remove(i);
            }
            self.deferred = false;
        } else if !gone.is_empty() {
            self.deferred = true;
            // Keep what the client may still fetch.
            for &i in &gone {
                let uid = self.uids[i];
                if let Some(m) = self.known.messages.get(&uid) {
                    new.messages.insert(uid, m.clone());
                }
            }
        }

        // Flag changes of messages the client already knows.
        let last_known = self.uids.last().copied().unwrap_or(0);
        if moved {
            for (uid, m) in new.messages.range(..=last_known) {
                if m.modseq <= changed_since {
                    continue;
                }
                let Some(seq) = self.seq_of(*uid) else {
                    continue;
                };
                if self
                    .known
                    .messages
                    .get(uid)
                    .is_some_and(|old| old.flags == m.flags)
                {
                    continue;
                }
                let mut items = vec![
                    MessageDataItem::Flags(flags::fetch_list(&m.flags)),
                    MessageDataItem::Uid(nz32(*uid)),
                ];
                if report.condstore
                    && let Some(ms) = NonZeroU64::new(m.modseq)
                {
                    items.push(MessageDataItem::ModSeq(ms));
                }
                if let (Some(seq), Ok(items)) = (NonZeroU32::new(seq as u32), Vec1::try_from(items))
                {
                    out.data(Data::Fetch { seq, items });
                }
            }
        }

        // New messages: UIDs past every UID shown (V2).
        let before = self.uids.len();
        self.uids
            .extend(new.messages.range(last_known + 1..).map(|(u, _)| *u));
        if self.uids.len() != before {
            out.data(Data::Exists(self.uids.len() as u32));
        }
        self.known = new;
    }
}

/// A UID as IMAP sends it (UIDs stay far below 2^32; see docs/causal-log.md "Near 2^32").
pub fn nz32(n: u64) -> NonZeroU32 {
    u32::try_from(n)
        .ok()
        .and_then(NonZeroU32::new)
        .unwrap_or(NonZeroU32::MAX)
}

/// UIDs that vanished (expunged, or retired by the log's renumbering) at a MODSEQ above
/// `modseq`, limited to `within` (QRESYNC's `VANISHED (EARLIER)`).
pub fn vanished_since(state: &MailboxState, modseq: u64, within: Option<&Ranges>) -> Ranges {
    let all = Ranges::from_ranges(
        state
            .vanished
            .iter()
            .filter(|v| v.modseq > modseq)
            .map(|v| (v.first, v.last)),
    );
    match within {
        Some(w) => all.intersect(w),
        None => all,
    }
}
