//! APPEND: the message is summarised and stored (encrypted) first, then added to the mailbox's
//! log with the client's flags and date; APPENDUID (UIDPLUS) names the UID it got.

use std::collections::BTreeSet;
use std::num::NonZeroU32;

use bytes::Bytes;
use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::flag::Flag;
use imap_codec::imap_types::mailbox::Mailbox as ImapMailbox;
use imap_codec::imap_types::response::Code;

use super::flags;
use super::selected::nz32;
use super::session::{Failure, Reply, Session, done, done_with};
use super::structure;
use crate::mail::account::new_message_id;
use crate::mail::summary::InternalDate;
use crate::mail::view::MailOp;

pub(super) fn now() -> InternalDate {
    let unix_seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    InternalDate {
        unix_seconds,
        offset_minutes: 0,
    }
}

/// Flags a client may set: `\Recent` is the server's to give.
pub(super) fn settable(list: &[Flag<'_>]) -> BTreeSet<String> {
    list.iter()
        .map(flags::stored)
        .filter(|f| !f.eq_ignore_ascii_case("\\Recent"))
        .collect()
}

impl Session {
    pub(super) async fn append(
        &mut self,
        mailbox: &ImapMailbox<'_>,
        flag_list: &[Flag<'_>],
        date: Option<&DateTime>,
        message: LiteralOrLiteral8<'_>,
    ) -> Result<Reply, Failure> {
        let account = self.account()?;
        let info = self.find(mailbox, "TRYCREATE").await?;
        let data = match message {
            LiteralOrLiteral8::Literal(l) => l.into_inner(),
            LiteralOrLiteral8::Literal8(l) => l.data,
        };
        let internal_date = date.map(structure::from_imap_date).unwrap_or_else(now);
        let id = new_message_id();
        self.check_quota(data.len() as u64).await?;
        let data = Bytes::from(data.into_owned());
        let body: crate::storage::ByteStream =
            Box::pin(futures::stream::once(async move { Ok(data) }));
        account
            .messages
            .put_message(&id.0, internal_date, body, account.recipient())
            .await?;
        let handle = account.mailbox(&info.id).await?;
        let flags = settable(flag_list);
        let (_, uid) = handle
            .write(|uid_floor| MailOp::Add {
                msg: id,
                flags,
                uid_floor,
            })
            .await?;
        match (uid, NonZeroU32::new(info.uid_validity)) {
            (Some(uid), Some(uid_validity)) => done_with(
                Code::AppendUid {
                    uid_validity,
                    uid: nz32(uid),
                },
                "APPEND completed",
            ),
            _ => done("APPEND completed"),
        }
    }
}
