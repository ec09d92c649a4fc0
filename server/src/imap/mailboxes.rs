//! Commands on mailboxes as a whole: SELECT/EXAMINE, CREATE, DELETE, RENAME,
//! SUBSCRIBE/UNSUBSCRIBE, LIST/LSUB (with SPECIAL-USE and CHILDREN attributes) and STATUS.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::num::{NonZeroU32, NonZeroU64};

use imap_codec::imap_types::command::SelectParameter;
use imap_codec::imap_types::core::{Atom, QuotedChar, Vec1};
use imap_codec::imap_types::fetch::MessageDataItem;
use imap_codec::imap_types::flag::FlagNameAttribute;
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox as ImapMailbox};
use imap_codec::imap_types::response::{Code, Data, StatusKind};
use imap_codec::imap_types::status::{StatusDataItem, StatusDataItemName};

use super::flags;
use super::output::{Out, code};
use super::selected::Selected;
use super::selected::{nz32, vanished_since};
use super::sequence::Ranges;
use super::session::{Failure, Reply, Session, bad, done, done_with, mailbox_name, no_code};
use crate::mail::mailbox_list::{DELIMITER, MailboxInfo};
use crate::mail::view::MailOp;

/// `*` matches anything, `%` anything but the hierarchy delimiter (RFC 9051 §6.3.9). Dynamic
/// programming over the name, so a pattern of many wildcards cannot blow up.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    let mut row = vec![false; name.len() + 1];
    row[0] = true;
    for &p in pattern {
        let mut next = vec![false; name.len() + 1];
        match p {
            b'*' => {
                let mut any = false;
                for j in 0..=name.len() {
                    any |= row[j];
                    next[j] = any;
                }
            }
            b'%' => {
                for j in 0..=name.len() {
                    next[j] = row[j] || (j > 0 && next[j - 1] && name[j - 1] != DELIMITER as u8);
                }
            }
            c => {
                for j in 1..=name.len() {
                    next[j] = row[j - 1] && name[j - 1] == c;
                }
            }
        }
        row = next;
    }
    row[name.len()]
}

/// INBOX is case-insensitive, in patterns too.
fn name_matches(pattern: &str, name: &str) -> bool {
    if name == "INBOX" || name.starts_with("INBOX/") {
        let p = pattern.as_bytes();
        if p.len() >= 5 && p[..5].eq_ignore_ascii_case(b"INBOX") {
            let mut fixed = b"INBOX".to_vec();
            fixed.extend_from_slice(&p[5..]);
            return wildcard_match(&fixed, name.as_bytes());
        }
    }
    wildcard_match(pattern.as_bytes(), name.as_bytes())
}

fn attribute(name: &str) -> Option<FlagNameAttribute<'static>> {
    Atom::try_from(name.to_string())
        .ok()
        .map(FlagNameAttribute::from)
}

pub(super) fn imap_mailbox(name: &str) -> Result<ImapMailbox<'static>, Failure> {
    if name == "INBOX" {
        return Ok(ImapMailbox::Inbox);
    }
    ImapMailbox::try_from(name.to_string()).map_err(|_| {
        no_code(
            code("CANNOT"),
            format!("mailbox name {name:?} cannot be sent"),
        )
    })
}

fn list_pattern(list: &ListMailbox<'_>) -> Result<String, Failure> {
    let bytes = match list {
        ListMailbox::Token(t) => t.as_ref(),
        ListMailbox::String(s) => s.as_ref(),
    };
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| bad("mailbox patterns must be UTF-8"))
}

impl Session {
    /// The mailbox a client named, or NO [NONEXISTENT] / [TRYCREATE].
    pub(super) async fn find(
        &self,
        mailbox: &ImapMailbox<'_>,
        missing: &'static str,
    ) -> Result<MailboxInfo, Failure> {
        let name = mailbox_name(mailbox)?;
        self.account()?
            .list
            .find(&name)
            .await?
            .ok_or_else(|| no_code(code(missing), format!("mailbox {name:?} does not exist")))
    }

    pub(super) async fn select(
        &mut self,
        mailbox: &ImapMailbox<'_>,
        read_only: bool,
        parameters: &[SelectParameter],
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        // A SELECT that fails leaves no mailbox selected (RFC 9051 §6.3.2).
        self.selected = None;
        let mut qresync = None;
        for p in parameters {
            match p {
                SelectParameter::CondStore => self.enabled.condstore = true,
                SelectParameter::QResync {
                    uid_validity,
                    mod_sequence_value,
                    known_uids,
                    ..
                } => {
                    if !self.enabled.qresync {
                        return Err(bad("the QRESYNC parameter needs ENABLE QRESYNC first"));
                    }
                    qresync = Some((
                        uid_validity.get(),
                        mod_sequence_value.get(),
                        known_uids.clone(),
                    ));
                }
            }
        }
        let account = self.account()?;
        let info = self.find(mailbox, "NONEXISTENT").await?;
        let handle = account.mailbox(&info.id).await?;
        let mut changes = handle.subscribe();
        changes.borrow_and_update();
        handle.sync().await?;
        let state = handle.state().await?;
        let selected = Selected::new(
            info,
            handle,
            read_only,
            std::sync::Arc::unwrap_or_clone(state),
            changes,
        );
        let state = selected.known();

        out.data(Data::Flags(flags::mailbox_flags(selected.keywords())));
        out.data(Data::Exists(selected.exists() as u32));
        out.data(Data::Recent(0));
        if let Some(seq) = selected
            .uids()
            .iter()
            .position(|u| {
                state
                    .messages
                    .get(u)
                    .is_some_and(|m| !m.flags.contains(flags::SEEN))
            })
            .and_then(|i| NonZeroU32::new(i as u32 + 1))
        {
            out.untagged(StatusKind::Ok, Some(Code::Unseen(seq)), "first unseen");
        }
        let permanent = if read_only {
            Vec::new()
        } else {
            flags::permanent_flags(selected.keywords())
        };
        out.untagged(
            StatusKind::Ok,
            Some(Code::PermanentFlags(permanent)),
            "flags permitted",
        );
        if let Some(v) = NonZeroU32::new(selected.info.uid_validity) {
            out.untagged(StatusKind::Ok, Some(Code::UidValidity(v)), "UIDs valid");
        }
        if let Some(n) = u32::try_from(state.uid_next).ok().and_then(NonZeroU32::new) {
            out.untagged(StatusKind::Ok, Some(Code::UidNext(n)), "predicted next UID");
        }
        match NonZeroU64::new(state.highest_modseq) {
            Some(m) => out.untagged(StatusKind::Ok, Some(Code::HighestModSeq(m)), "highest"),
            // No change ever: a MODSEQ of 1 would hide the first change (it gets MODSEQ 1).
            None => out.untagged(StatusKind::Ok, Some(Code::NoModSeq), "no changes yet"),
        }
        // QRESYNC (RFC 7162 §3.2.5): what changed since the client's MODSEQ, when its
        // UIDVALIDITY still holds: UIDs gone (expunged, or retired by the log's renumbering of
        // concurrent appends; docs/causal-log.md) as VANISHED (EARLIER), then the flags of
        // messages changed since.
        if let Some((validity, since, known)) = qresync
            && validity == selected.info.uid_validity
        {
            let within = known.map(|k| Ranges::resolve(&k, state.uid_next.saturating_sub(1)));
            let gone = vanished_since(state, since, within.as_ref());
            if let Some(known_uids) = gone.to_sequence_set() {
                out.data(Data::Vanished {
                    earlier: true,
                    known_uids,
                });
            }
            for (i, uid) in selected.uids().iter().enumerate() {
                let Some(m) = state.messages.get(uid).filter(|m| m.modseq > since) else {
                    continue;
                };
                let mut items = vec![
                    MessageDataItem::Uid(nz32(*uid)),
                    MessageDataItem::Flags(flags::fetch_list(&m.flags)),
                ];
                items.extend(NonZeroU64::new(m.modseq).map(MessageDataItem::ModSeq));
                if let (Some(seq), Ok(items)) =
                    (NonZeroU32::new(i as u32 + 1), Vec1::try_from(items))
                {
                    out.data(Data::Fetch { seq, items });
                }
            }
        }
        self.selected = Some(Box::new(selected));
        if read_only {
            done_with(Code::ReadOnly, "EXAMINE completed")
        } else {
            done_with(Code::ReadWrite, "SELECT completed")
        }
    }

    pub(super) async fn create(&mut self, mailbox: &ImapMailbox<'_>) -> Result<Reply, Failure> {
        let account = self.account()?;
        let name = mailbox_name(mailbox)?;
        // A trailing delimiter only says the client means to create children (RFC 9051 §6.3.4).
        let name = name.trim_end_matches(DELIMITER).to_string();
        if name.eq_ignore_ascii_case("INBOX") {
            return Err(no_code(code("ALREADYEXISTS"), "INBOX always exists"));
        }
        let existing: BTreeSet<String> = account
            .list
            .list()
            .await?
            .into_iter()
            .map(|m| m.name)
            .collect();
        if existing.contains(&name) {
            return Err(no_code(
                code("ALREADYEXISTS"),
                format!("mailbox {name:?} already exists"),
            ));
        }
        // Superior names are created too (RFC 3501 §6.3.3 SHOULD).
        for (i, c) in name.char_indices() {
            if c == DELIMITER {
                let parent = &name[..i];
                if !parent.is_empty() && !existing.contains(parent) {
                    match account.list.create(parent, None).await {
                        Ok(_) | Err(crate::mail::mailbox_list::ListError::AlreadyExists(_)) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        account.list.create(&name, None).await?;
        done("CREATE completed")
    }

    pub(super) async fn delete(&mut self, mailbox: &ImapMailbox<'_>) -> Result<Reply, Failure> {
        let account = self.account()?;
        let name = mailbox_name(mailbox)?;
        if name == "INBOX" {
            return Err(no_code(code("CANNOT"), "INBOX cannot be deleted"));
        }
        // Expunge what this server has seen first: a message appended concurrently elsewhere
        // survives the delete and is moved to INBOX by the sweep's rescue (`mail::rescue`).
        if let Some(info) = account.list.find(&name).await? {
            let mailbox = account.mailbox(&info.id).await?;
            mailbox.write(|_| MailOp::ExpungeAll).await?;
        }
        let id = account.list.delete(&name).await?;
        if self.selected.as_ref().is_some_and(|s| s.info.id == id) {
            self.selected = None;
        }
        done("DELETE completed")
    }

    pub(super) async fn rename(
        &mut self,
        from: &ImapMailbox<'_>,
        to: &ImapMailbox<'_>,
    ) -> Result<Reply, Failure> {
        let account = self.account()?;
        let (from_name, to_name) = (mailbox_name(from)?, mailbox_name(to)?);
        if to_name.eq_ignore_ascii_case("INBOX") {
            return Err(no_code(code("ALREADYEXISTS"), "INBOX always exists"));
        }
        if from_name != "INBOX" {
            account.list.rename(&from_name, &to_name).await?;
            return done("RENAME completed");
        }
        // Renaming INBOX moves its messages to a new mailbox and leaves INBOX empty
        // (RFC 9051 §6.3.6); its children stay where they are.
        let target = account.list.create(&to_name, None).await?;
        let inbox = self.find(from, "NONEXISTENT").await?;
        let source = account.mailbox(&inbox.id).await?;
        let dest = account.mailbox(&target.id).await?;
        source.sync().await?;
        let state = source.state().await?;
        for m in state.messages.values() {
            let (msg, flags) = (m.id.clone(), m.flags.clone());
            dest.write(|uid_floor| MailOp::Add {
                msg,
                flags,
                uid_floor,
            })
            .await?;
            let msg = m.id.clone();
            source.write(|_| MailOp::Expunge { msg }).await?;
        }
        done("RENAME completed")
    }

    pub(super) async fn subscribe(
        &mut self,
        mailbox: &ImapMailbox<'_>,
        subscribed: bool,
    ) -> Result<Reply, Failure> {
        let account = self.account()?;
        let name = mailbox_name(mailbox)?;
        account.list.set_subscribed(&name, subscribed).await?;
        done(if subscribed {
            "SUBSCRIBE completed"
        } else {
            "UNSUBSCRIBE completed"
        })
    }

    pub(super) async fn list(
        &mut self,
        reference: &ImapMailbox<'_>,
        pattern: &ListMailbox<'_>,
        lsub: bool,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        let account = self.account()?;
        let reference = match reference {
            ImapMailbox::Inbox => "INBOX".to_string(),
            other => mailbox_name(other)?,
        };
        let pattern = list_pattern(pattern)?;
        let delimiter = QuotedChar::try_from(DELIMITER).ok();
        let command = if lsub { "LSUB" } else { "LIST" };
        if pattern.is_empty() {
            // The hierarchy delimiter and root (RFC 9051 §6.3.9).
            let root = ImapMailbox::try_from("").map_err(|_| bad("empty name"))?;
            let items = vec![FlagNameAttribute::Noselect];
            out.data(if lsub {
                Data::Lsub {
                    items,
                    delimiter,
                    mailbox: root,
                }
            } else {
                Data::List {
                    items,
                    delimiter,
                    mailbox: root,
                }
            });
            return done(format!("{command} completed"));
        }
        let pattern = format!("{reference}{pattern}");
        let all = account.list.list().await?;
        let shown: Vec<&MailboxInfo> = all.iter().filter(|m| !lsub || m.subscribed).collect();

        // Every name shown, and the parents it implies (shown as \Noselect when they do not
        // exist themselves).
        let mut entries: BTreeMap<String, Option<&MailboxInfo>> = BTreeMap::new();
        for m in &shown {
            entries.insert(m.name.clone(), Some(m));
        }
        for m in &shown {
            for (i, c) in m.name.char_indices() {
                if c == DELIMITER && i > 0 {
                    entries.entry(m.name[..i].to_string()).or_insert(None);
                }
            }
        }
        let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
        for (name, info) in &entries {
            if !name_matches(&pattern, name) {
                continue;
            }
            let prefix = format!("{name}{DELIMITER}");
            let has_children = names.iter().any(|n| n.starts_with(&prefix));
            let mut items = Vec::new();
            if info.is_none() {
                items.push(FlagNameAttribute::Noselect);
            }
            if !lsub {
                items.extend(attribute(if has_children {
                    "HasChildren"
                } else {
                    "HasNoChildren"
                }));
                if let Some(special) = info.and_then(|i| i.special_use) {
                    items.extend(attribute(special.attribute().trim_start_matches('\\')));
                }
            }
            let mailbox = imap_mailbox(name)?;
            out.data(if lsub {
                Data::Lsub {
                    items,
                    delimiter,
                    mailbox,
                }
            } else {
                Data::List {
                    items,
                    delimiter,
                    mailbox,
                }
            });
        }
        done(format!("{command} completed"))
    }

    pub(super) async fn status(
        &mut self,
        mailbox: &ImapMailbox<'_>,
        names: &[StatusDataItemName],
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        let account = self.account()?;
        let info = self.find(mailbox, "NONEXISTENT").await?;
        let handle = account.mailbox(&info.id).await?;
        handle.sync().await?;
        let state = handle.state().await?;
        let count = |flag: Option<&str>, want: bool| {
            state
                .messages
                .values()
                .filter(|m| flag.is_none_or(|f| m.flags.contains(f) == want))
                .count() as u32
        };
        let mut items = Vec::new();
        for name in names {
            items.push(match name {
                StatusDataItemName::Messages => StatusDataItem::Messages(count(None, true)),
                StatusDataItemName::Recent => StatusDataItem::Recent(0),
                StatusDataItemName::UidNext => StatusDataItem::UidNext(
                    u32::try_from(state.uid_next)
                        .ok()
                        .and_then(NonZeroU32::new)
                        .unwrap_or(NonZeroU32::MAX),
                ),
                StatusDataItemName::UidValidity => StatusDataItem::UidValidity(
                    NonZeroU32::new(info.uid_validity).unwrap_or(NonZeroU32::MIN),
                ),
                StatusDataItemName::Unseen => {
                    StatusDataItem::Unseen(count(Some(flags::SEEN), false))
                }
                StatusDataItemName::Deleted => {
                    StatusDataItem::Deleted(count(Some(flags::DELETED), true))
                }
                StatusDataItemName::Size | StatusDataItemName::DeletedStorage => {
                    let deleted_only = matches!(name, StatusDataItemName::DeletedStorage);
                    let mut total = 0u64;
                    for m in state.messages.values() {
                        if !deleted_only || m.flags.contains(flags::DELETED) {
                            total += account.summary(&m.id).await?.summary.size;
                        }
                    }
                    if deleted_only {
                        StatusDataItem::DeletedStorage(total)
                    } else {
                        StatusDataItem::Size(total)
                    }
                }
                StatusDataItemName::HighestModSeq => {
                    StatusDataItem::HighestModSeq(state.highest_modseq)
                }
            });
        }
        out.data(Data::Status {
            mailbox: imap_mailbox(&info.name)?,
            items: Cow::Owned(items),
        });
        done("STATUS completed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(wildcard_match(b"*", b"a/b/c"));
        assert!(wildcard_match(b"%", b"abc"));
        assert!(!wildcard_match(b"%", b"a/b"));
        assert!(wildcard_match(b"a/%", b"a/b"));
        assert!(!wildcard_match(b"a/%", b"a/b/c"));
        assert!(wildcard_match(b"a*c", b"a/b/c"));
        assert!(wildcard_match(b"", b""));
        assert!(!wildcard_match(b"abc", b"ab"));
        assert!(name_matches("inbox", "INBOX"));
        assert!(name_matches("Inbox/%", "INBOX/x"));
        // Many wildcards stay polynomial.
        let p = "%*".repeat(200);
        assert!(!wildcard_match(format!("{p}x").as_bytes(), &[b'a'; 300]));
    }
}
