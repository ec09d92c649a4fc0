//! EXPUNGE, UID EXPUNGE (UIDPLUS) and CLOSE. The expunge ops are written here; the EXPUNGE
//! responses come from the end-of-command report, like those of any other session's expunge.

use imap_codec::imap_types::sequence::SequenceSet;

use super::flags;
use super::sequence::Ranges;
use super::session::{Failure, Reply, Session, done, no};
use crate::mail::view::MailOp;

impl Session {
    /// Expunges the messages flagged \Deleted (only those in `only`, for UID EXPUNGE).
    async fn expunge_deleted(&mut self, only: Option<&SequenceSet>) -> Result<usize, Failure> {
        let selected = self.selected_mut()?;
        if selected.read_only {
            return Err(no("the mailbox is read-only (EXAMINE)"));
        }
        let largest = selected.uids().last().copied().unwrap_or(0);
        let only = only.map(|s| Ranges::resolve(s, largest));
        // The current state, not the reported one: a \Deleted set by another session since the
        // last report counts too, and its expunge will be reported.
        let state = selected.mailbox.state().await?;
        let doomed: Vec<_> = state
            .messages
            .iter()
            .filter(|(uid, m)| {
                m.flags.contains(flags::DELETED)
                    && only.as_ref().is_none_or(|r| r.contains(**uid))
                    && selected.seq_of(**uid).is_some()
            })
            .map(|(_, m)| m.id.clone())
            .collect();
        for msg in &doomed {
            let msg = msg.clone();
            selected.mailbox.write(|_| MailOp::Expunge { msg }).await?;
        }
        Ok(doomed.len())
    }

    pub(super) async fn expunge(&mut self, only: Option<&SequenceSet>) -> Result<Reply, Failure> {
        self.expunge_deleted(only).await?;
        done("EXPUNGE completed")
    }

    /// CLOSE: expunge silently (on a read-write mailbox), then leave the selected state.
    pub(super) async fn close(&mut self) -> Result<Reply, Failure> {
        let read_only = self.selected_mut()?.read_only;
        if !read_only {
            self.expunge_deleted(None).await?;
        }
        self.selected = None;
        done("CLOSE completed")
    }
}
