//! STORE and UID STORE: +FLAGS, -FLAGS, FLAGS, their .SILENT forms, and UNCHANGEDSINCE
//! (CONDSTORE, RFC 7162 §3.1.3). One flag op per message that actually changes; a message
//! whose flags already are what the client asked for costs nothing.

use std::collections::BTreeSet;
use std::num::{NonZeroU32, NonZeroU64};

use imap_codec::imap_types::command::StoreModifier;
use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_codec::imap_types::response::{Code, Data};
use imap_codec::imap_types::sequence::SequenceSet;

use super::append::settable;
use super::flags;
use super::output::Out;
use super::selected::nz32;
use super::sequence::Ranges;
use super::session::{Failure, Reply, Session, done, done_with, no};
use crate::mail::view::{FlagAction, MailOp};

fn apply(
    action: FlagAction,
    current: &BTreeSet<String>,
    given: &BTreeSet<String>,
) -> BTreeSet<String> {
    match action {
        FlagAction::Set => given.clone(),
        FlagAction::Add => current.union(given).cloned().collect(),
        FlagAction::Remove => current.difference(given).cloned().collect(),
    }
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store(
        &mut self,
        set: &SequenceSet,
        kind: &StoreType,
        response: &StoreResponse,
        flag_list: &[Flag<'_>],
        uid: bool,
        modifiers: &[StoreModifier],
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        let targets = self.targets(set, uid)?;
        let unchanged_since = modifiers
            .iter()
            .map(|StoreModifier::UnchangedSince(v)| *v)
            .next();
        if unchanged_since.is_some() {
            // A CONDSTORE-aware command turns CONDSTORE on (RFC 7162 §3.1).
            self.enabled.condstore = true;
        }
        let condstore = self.enabled.condstore;
        let selected = self.selected_mut()?;
        if selected.read_only {
            return Err(no("the mailbox is read-only (EXAMINE)"));
        }
        let given = settable(flag_list);
        let action = match kind {
            StoreType::Replace => FlagAction::Set,
            StoreType::Add => FlagAction::Add,
            StoreType::Remove => FlagAction::Remove,
        };
        let current = selected.mailbox.state().await?;
        let mut failed = Vec::new();
        let mut touched = Vec::new();
        for (seq, u) in targets {
            // Expunged meanwhile (its expunge not reported yet): nothing to change.
            let Some(m) = current.messages.get(&u) else {
                continue;
            };
            if unchanged_since.is_some_and(|since| m.modseq > since) {
                failed.push(if uid { u } else { seq as u64 });
                continue;
            }
            if apply(action, &m.flags, &given) != m.flags {
                let (msg, flags) = (m.id.clone(), given.clone());
                selected
                    .mailbox
                    .write(|_| MailOp::Flags { msg, action, flags })
                    .await?;
            }
            touched.push((seq, u));
        }
        let after = selected.mailbox.state().await?;
        let silent = matches!(response, StoreResponse::Silent);
        for (_, u) in &touched {
            if let Some(m) = after.messages.get(u) {
                selected.announce(&m.flags, out);
            }
        }
        for (seq, u) in touched {
            let Some(m) = after.messages.get(&u) else {
                continue;
            };
            let mut items = Vec::new();
            if !silent {
                items.push(MessageDataItem::Flags(flags::fetch_list(&m.flags)));
            }
            if uid || condstore {
                items.push(MessageDataItem::Uid(nz32(u)));
            }
            if condstore && let Some(ms) = NonZeroU64::new(m.modseq) {
                items.push(MessageDataItem::ModSeq(ms));
            }
            if (!silent || condstore)
                && let (Some(seq), Ok(items)) = (NonZeroU32::new(seq as u32), Vec1::try_from(items))
            {
                out.data(Data::Fetch { seq, items });
            }
            selected.note_own(u, m.clone());
        }
        match Ranges::from_numbers(failed).to_sequence_set() {
            Some(modified) => done_with(Code::Modified(modified), "conditional STORE failed"),
            None => done("STORE completed"),
        }
    }
}
