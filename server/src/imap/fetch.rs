//! FETCH and UID FETCH. Metadata (FLAGS, UID, MODSEQ) comes from the mailbox state; INTERNALDATE,
//! RFC822.SIZE, ENVELOPE, BODYSTRUCTURE and headers from the message summary; only body
//! sections read the body blob, and only the chunks their byte range covers. A non-PEEK body
//! fetch sets \Seen (on a read-write mailbox) and reports the new FLAGS.

use std::collections::HashSet;
use std::num::{NonZeroU32, NonZeroU64};
use std::ops::Range;

use imap_codec::imap_types::IntoStatic;
use imap_codec::imap_types::command::FetchModifier;
use imap_codec::imap_types::core::{AString, NString, Vec1};
use imap_codec::imap_types::fetch::{
    MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Part, Section,
};
use imap_codec::imap_types::response::Data;
use imap_codec::imap_types::sequence::SequenceSet;

use super::flags;
use super::output::Out;
use super::selected::nz32;
use super::sequence::Ranges;
use super::session::{Failure, Reply, Session, bad, done};
use super::structure;
use crate::mail::account::Account;
use crate::mail::summary::{BodyPart, SummaryRecord};
use crate::mail::view::{FlagAction, MailOp, MessageState};

/// Where a section's bytes come from.
enum Source {
    /// A byte range of the raw message (read from the body blob).
    Raw(Range<u64>),
    /// Bytes computed from the summary (a header block, filtered header fields).
    Bytes(Vec<u8>),
    /// The section names nothing in this message.
    Nothing,
}

fn needs_summary(name: &MessageDataItemName<'_>) -> bool {
    !matches!(
        name,
        MessageDataItemName::Flags | MessageDataItemName::Uid | MessageDataItemName::ModSeq
    )
}

fn sets_seen(name: &MessageDataItemName<'_>) -> bool {
    matches!(
        name,
        MessageDataItemName::BodyExt { peek: false, .. }
            | MessageDataItemName::Rfc822
            | MessageDataItemName::Rfc822Text
    )
}

fn path(part: &Part) -> Vec<u32> {
    part.0.as_ref().iter().map(|n| n.get()).collect()
}

/// The header fields of `header` named (or, with `not`, not named) in `names`, in their
/// original order, followed by the empty line that ends a header (RFC 9051 §6.4.5).
pub(super) fn header_fields(header: &[u8], names: &[AString<'_>], not: bool) -> Vec<u8> {
    let wanted = |field: &[u8]| {
        let name = field
            .iter()
            .position(|&b| b == b':')
            .map(|i| field[..i].trim_ascii())
            .unwrap_or(b"");
        let listed = names.iter().any(|n| n.as_ref().eq_ignore_ascii_case(name));
        listed != not
    };
    let mut out = Vec::new();
    let mut field: Vec<u8> = Vec::new();
    for line in header.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            field.extend_from_slice(line);
            continue;
        }
        if !field.is_empty() && wanted(&field) {
            out.extend_from_slice(&field);
        }
        field.clear();
        if line.trim_ascii().is_empty() {
            break;
        }
        field.extend_from_slice(line);
    }
    if !field.is_empty() && wanted(&field) {
        out.extend_from_slice(&field);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The encapsulated message of a `message/rfc822` part, if its offsets are in the raw message.
fn encapsulated(part: &BodyPart) -> Option<&BodyPart> {
    part.message
        .as_ref()
        .filter(|e| e.in_place)
        .map(|e| &e.body)
}

fn locate(record: &SummaryRecord, section: Option<&Section<'_>>) -> Source {
    let s = &record.summary;
    let header_len = s.header.len() as u64;
    // The header block of the message a section is relative to: the top-level one, or that of
    // the message inside part `p`.
    let message_at = |p: &Option<Part>| -> Option<&BodyPart> {
        match p {
            None => Some(&s.body),
            Some(p) => s.section(&path(p)).and_then(encapsulated),
        }
    };
    match section {
        None => Source::Raw(0..s.size),
        Some(Section::Part(p)) => match s.section(&path(p)) {
            Some(part) => Source::Raw(part.offsets.body_range()),
            None => Source::Nothing,
        },
        Some(Section::Mime(p)) => match s.section(&path(p)) {
            Some(part) => Source::Raw(part.offsets.header_range()),
            None => Source::Nothing,
        },
        Some(Section::Header(None)) => Source::Bytes(s.header.clone()),
        Some(Section::Text(None)) => Source::Raw(header_len..s.size),
        Some(Section::Header(p)) => match message_at(p) {
            Some(m) => Source::Raw(m.offsets.header_range()),
            None => Source::Nothing,
        },
        Some(Section::Text(p)) => match message_at(p) {
            Some(m) => Source::Raw(m.offsets.body_range()),
            None => Source::Nothing,
        },
        Some(Section::HeaderFields(None, _) | Section::HeaderFieldsNot(None, _)) => {
            Source::Bytes(s.header.clone())
        }
        Some(Section::HeaderFields(p, _) | Section::HeaderFieldsNot(p, _)) => match message_at(p) {
            Some(m) => Source::Raw(m.offsets.header_range()),
            None => Source::Nothing,
        },
    }
}

async fn section_bytes(
    account: &Account,
    m: &MessageState,
    record: &SummaryRecord,
    section: Option<&Section<'_>>,
    partial: Option<(u32, NonZeroU32)>,
) -> Result<NString<'static>, Failure> {
    let filter = match section {
        Some(Section::HeaderFields(_, names)) => Some((names.as_ref(), false)),
        Some(Section::HeaderFieldsNot(_, names)) => Some((names.as_ref(), true)),
        _ => None,
    };
    let read = |range: Range<u64>| async move {
        let bytes = account
            .messages
            .read(&m.id.0, &record.body_key, range)
            .await?;
        Ok::<Vec<u8>, Failure>(bytes.to_vec())
    };
    let source = locate(record, section);
    // Header fields are filtered from the whole header block, then the partial applies.
    let data = match (source, filter) {
        (Source::Nothing, _) => return Ok(NString(None)),
        (Source::Raw(r), Some((names, not))) => header_fields(&read(r).await?, names, not),
        (Source::Bytes(b), Some((names, not))) => header_fields(&b, names, not),
        (Source::Bytes(b), None) => b,
        (Source::Raw(r), None) => {
            // Read only what the partial asks for.
            let r = match partial {
                Some((origin, len)) => {
                    let start = r.start.saturating_add(u64::from(origin)).min(r.end);
                    start..start.saturating_add(u64::from(len.get())).min(r.end)
                }
                None => r,
            };
            return Ok(structure::literal(&read(r).await?));
        }
    };
    let data = match partial {
        Some((origin, len)) => {
            let start = (origin as usize).min(data.len());
            let end = start.saturating_add(len.get() as usize).min(data.len());
            data[start..end].to_vec()
        }
        None => data,
    };
    Ok(structure::literal(&data))
}

impl Session {
    pub(super) async fn fetch(
        &mut self,
        set: &SequenceSet,
        items: MacroOrMessageDataItemNames<'_>,
        uid: bool,
        modifiers: &[FetchModifier],
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        let mut names: Vec<MessageDataItemName<'static>> = match items {
            MacroOrMessageDataItemNames::Macro(m) => m
                .expand()
                .into_iter()
                .map(IntoStatic::into_static)
                .collect(),
            MacroOrMessageDataItemNames::MessageDataItemNames(v) => {
                v.into_iter().map(IntoStatic::into_static).collect()
            }
        };
        let mut changed_since = None;
        let mut vanished = false;
        for m in modifiers {
            match m {
                FetchModifier::ChangedSince(v) => changed_since = Some(v.get()),
                FetchModifier::Vanished => vanished = true,
            }
        }
        if vanished {
            // RFC 7162 §3.2.6: UID FETCH only, with CHANGEDSINCE, after ENABLE QRESYNC.
            let Some(since) = changed_since.filter(|_| uid && self.enabled.qresync) else {
                return Err(bad(
                    "VANISHED needs UID FETCH, CHANGEDSINCE and ENABLE QRESYNC",
                ));
            };
            let selected = self.selected_mut()?;
            let known = selected.known();
            let within = Ranges::resolve(set, known.uid_next.saturating_sub(1));
            let gone = super::selected::vanished_since(known, since, Some(&within));
            if let Some(known_uids) = gone.to_sequence_set() {
                out.data(Data::Vanished {
                    earlier: true,
                    known_uids,
                });
            }
        }
        if names.iter().any(|n| {
            matches!(
                n,
                MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. }
            )
        }) {
            return Err(bad("BINARY is not supported yet"));
        }
        if changed_since.is_some() || names.contains(&MessageDataItemName::ModSeq) {
            self.enabled.condstore = true;
            if !names.contains(&MessageDataItemName::ModSeq) {
                names.push(MessageDataItemName::ModSeq);
            }
        }
        if uid && !names.contains(&MessageDataItemName::Uid) {
            names.insert(0, MessageDataItemName::Uid);
        }
        let targets = self.targets(set, uid)?;
        let account = self.account()?;
        let selected = self.selected_mut()?;

        // \Seen first, so that the responses show it.
        let mut seen_now: HashSet<u64> = HashSet::new();
        if names.iter().any(sets_seen) && !selected.read_only {
            let current = selected.mailbox.state().await?;
            for (_, u) in &targets {
                if let Some(m) = current.messages.get(u)
                    && !m.flags.contains(flags::SEEN)
                {
                    let msg = m.id.clone();
                    selected
                        .mailbox
                        .write(|_| MailOp::Flags {
                            msg,
                            action: FlagAction::Add,
                            flags: [flags::SEEN.to_string()].into(),
                        })
                        .await?;
                    seen_now.insert(*u);
                }
            }
            if !seen_now.is_empty() {
                let after = selected.mailbox.state().await?;
                for u in &seen_now {
                    if let Some(m) = after.messages.get(u) {
                        selected.note_own(*u, m.clone());
                    }
                }
            }
        }

        let need_summary = names.iter().any(needs_summary);
        for (seq, u) in targets {
            let Some(m) = selected.message(u).cloned() else {
                continue;
            };
            if changed_since.is_some_and(|cs| m.modseq <= cs) {
                continue;
            }
            let record = if need_summary {
                Some(account.summary(&m.id).await?)
            } else {
                None
            };
            let mut items = Vec::with_capacity(names.len() + 1);
            for name in &names {
                let summary = record.as_ref().map(|r| &r.summary);
                let item = match (name, summary) {
                    (MessageDataItemName::Flags, _) => {
                        MessageDataItem::Flags(flags::fetch_list(&m.flags))
                    }
                    (MessageDataItemName::Uid, _) => MessageDataItem::Uid(nz32(u)),
                    (MessageDataItemName::ModSeq, _) => MessageDataItem::ModSeq(
                        NonZeroU64::new(m.modseq).unwrap_or(NonZeroU64::MIN),
                    ),
                    (MessageDataItemName::InternalDate, Some(s)) => {
                        match structure::internal_date(&s.internal_date) {
                            Some(d) => MessageDataItem::InternalDate(d),
                            None => continue,
                        }
                    }
                    (MessageDataItemName::Rfc822Size, Some(s)) => {
                        MessageDataItem::Rfc822Size(u32::try_from(s.size).unwrap_or(u32::MAX))
                    }
                    (MessageDataItemName::Envelope, Some(s)) => {
                        MessageDataItem::Envelope(structure::envelope(&s.envelope))
                    }
                    (MessageDataItemName::BodyStructure, Some(s)) => {
                        MessageDataItem::BodyStructure(structure::body_structure(&s.body, true))
                    }
                    (MessageDataItemName::Body, Some(s)) => {
                        MessageDataItem::Body(structure::body_structure(&s.body, false))
                    }
                    (MessageDataItemName::Rfc822Header, Some(s)) => {
                        MessageDataItem::Rfc822Header(structure::literal(&s.header))
                    }
                    (MessageDataItemName::Rfc822, Some(_))
                    | (MessageDataItemName::Rfc822Text, Some(_)) => {
                        let Some(r) = record.as_deref() else { continue };
                        let text = matches!(name, MessageDataItemName::Rfc822Text);
                        let section = text.then_some(Section::Text(None));
                        let data = section_bytes(&account, &m, r, section.as_ref(), None).await?;
                        if text {
                            MessageDataItem::Rfc822Text(data)
                        } else {
                            MessageDataItem::Rfc822(data)
                        }
                    }
                    (
                        MessageDataItemName::BodyExt {
                            section, partial, ..
                        },
                        Some(_),
                    ) => {
                        let Some(r) = record.as_deref() else { continue };
                        let data =
                            section_bytes(&account, &m, r, section.as_ref(), *partial).await?;
                        MessageDataItem::BodyExt {
                            section: section.clone(),
                            origin: partial.map(|(o, _)| o),
                            data,
                        }
                    }
                    _ => continue,
                };
                items.push(item);
            }
            if seen_now.contains(&u) && !names.contains(&MessageDataItemName::Flags) {
                items.push(MessageDataItem::Flags(flags::fetch_list(&m.flags)));
            }
            if let (Some(seq), Ok(items)) = (NonZeroU32::new(seq as u32), Vec1::try_from(items)) {
                out.data(Data::Fetch { seq, items });
            }
            out.maybe_flush().await?;
        }
        done("FETCH completed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_keep_folding_and_end_with_a_blank_line() {
        let h = b"From: a@b\r\nSubject: one\r\n two\r\nTo: c@d\r\n\r\n";
        let names = [AString::try_from("subject").unwrap()];
        assert_eq!(
            header_fields(h, &names, false),
            b"Subject: one\r\n two\r\n\r\n"
        );
        assert_eq!(
            header_fields(h, &names, true),
            b"From: a@b\r\nTo: c@d\r\n\r\n"
        );
        let none = [AString::try_from("X-Nope").unwrap()];
        assert_eq!(header_fields(h, &none, false), b"\r\n");
    }
}
