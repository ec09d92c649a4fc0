//! COPY and MOVE (RFC 6851), with COPYUID (UIDPLUS).
//!
//! A copy into another mailbox adds the same message id to the target's log: the encrypted
//! body and summary are shared, nothing is re-uploaded. A mailbox keeps the first add of an id
//! (a retried write is the same message), so when the target has ever held that id (a copy
//! into the same mailbox, or back into a mailbox the message was moved out of) the message is
//! stored again under a fresh id instead.

use std::num::NonZeroU32;

use bytes::Bytes;
use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::extensions::uidplus::{UidElement, UidSet};
use imap_codec::imap_types::mailbox::Mailbox as ImapMailbox;
use imap_codec::imap_types::response::{Code, StatusKind};
use imap_codec::imap_types::sequence::SequenceSet;

use super::output::Out;
use super::selected::nz32;
use super::session::{Failure, Reply, Session, done, done_with, no};
use crate::mail::account::new_message_id;
use crate::mail::view::{MailOp, MessageId};

/// A UID set in the order given (COPYUID pairs source and destination UIDs by position, so
/// the two lists must not be sorted independently).
fn uid_set(uids: &[u64]) -> Option<UidSet> {
    let mut elements: Vec<UidElement> = Vec::new();
    for &u in uids {
        let u = nz32(u);
        match elements.last_mut() {
            Some(UidElement::Single(a)) if a.checked_add(1) == Some(u) => {
                *elements.last_mut()? = UidElement::Range(*a, u);
            }
            Some(UidElement::Range(_, b)) if b.checked_add(1) == Some(u) => *b = u,
            _ => elements.push(UidElement::Single(u)),
        }
    }
    Vec1::try_from(elements).ok().map(UidSet)
}

impl Session {
    pub(super) async fn copy(
        &mut self,
        set: &SequenceSet,
        mailbox: &ImapMailbox<'_>,
        uid: bool,
        moving: bool,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        let account = self.account()?;
        let targets = self.targets(set, uid)?;
        let info = self.find(mailbox, "TRYCREATE").await?;
        let selected = self.selected_mut()?;
        if moving && selected.read_only {
            return Err(no("the mailbox is read-only (EXAMINE)"));
        }
        let same = info.id == selected.info.id;
        let dest = account.mailbox(&info.id).await?;
        dest.sync().await?;
        let dest_state = dest.state().await?;
        let source = selected.mailbox.clone();
        let mut from_uids = Vec::new();
        let mut to_uids = Vec::new();
        let mut moved: Vec<MessageId> = Vec::new();
        for (_, src_uid) in &targets {
            let Some(m) = selected.message(*src_uid).cloned() else {
                continue;
            };
            let msg = if same || dest_state.uids.contains_key(&m.id) {
                // Stored again under a fresh id (the body is sealed to its id).
                let record = account.summary(&m.id).await?;
                let raw = account.messages.read_all(&m.id.0, &record.body_key).await?;
                let id = new_message_id();
                let body: crate::storage::ByteStream =
                    Box::pin(futures::stream::once(async move { Ok::<Bytes, _>(raw) }));
                account
                    .messages
                    .put_message(
                        &id.0,
                        record.summary.internal_date,
                        body,
                        account.recipient(),
                    )
                    .await?;
                id
            } else {
                m.id.clone()
            };
            let flags = m.flags.clone();
            let (_, new_uid) = dest
                .write(|uid_floor| MailOp::Add {
                    msg,
                    flags,
                    uid_floor,
                })
                .await?;
            if let Some(new_uid) = new_uid {
                from_uids.push(*src_uid);
                to_uids.push(new_uid);
            }
            moved.push(m.id);
        }
        let copyuid = match (
            NonZeroU32::new(info.uid_validity),
            uid_set(&from_uids),
            uid_set(&to_uids),
        ) {
            (Some(uid_validity), Some(source), Some(destination)) => Some(Code::CopyUid {
                uid_validity,
                source,
                destination,
            }),
            _ => None,
        };
        if !moving {
            return match copyuid {
                Some(c) => done_with(c, "COPY completed"),
                None => done("COPY completed"),
            };
        }
        for msg in moved {
            source.write(|_| MailOp::Expunge { msg }).await?;
        }
        // RFC 6851: COPYUID in an untagged OK before the EXPUNGEs, which the end-of-command
        // report sends (MOVE may expunge, even without UID).
        if let Some(c) = copyuid {
            out.untagged(StatusKind::Ok, Some(c), "moved");
        }
        done("MOVE completed")
    }
}
