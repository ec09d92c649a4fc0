//! DELETE racing an APPEND. A mailbox is deleted by writing `ExpungeAll` to its log (it
//! expunges what the deleter had seen) and then marking its list entry deleted. A message added
//! concurrently — in another region, or by a process that had not yet seen the delete — is not
//! covered by the `ExpungeAll` and stays live in the deleted mailbox's log. `rescue_deleted`
//! moves every such message to INBOX (same message id, so same OBJECTID and body, same flags),
//! then expunges it from the deleted log. It is idempotent: a message already in INBOX is only
//! expunged from the deleted log. The sweep runs it before computing references, so a rescued
//! body is never collected.

use std::sync::Arc;

use age::x25519;

use super::mailbox::{Mailbox, MailboxError, MailboxKeys};
use super::mailbox_list::{ListError, MailboxId, MailboxList};
use super::view::MailOp;
use crate::log::store::LogStore;
use crate::storage::{BlobStore, RowStore};
use crate::users::UserId;

#[derive(Debug, thiserror::Error)]
pub enum RescueError {
    #[error("rescue cannot read the mailbox list: {0}")]
    List(#[from] ListError),
    #[error("rescue from mailbox {mailbox}: {source}")]
    Mailbox {
        mailbox: String,
        #[source]
        source: MailboxError,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RescueStats {
    /// Deleted mailboxes read.
    pub deleted_mailboxes: usize,
    /// Messages moved to INBOX.
    pub rescued: usize,
}

/// Moves the messages still live in deleted mailboxes to INBOX.
pub async fn rescue_deleted(
    rows: Arc<dyn RowStore>,
    blobs: Arc<dyn BlobStore>,
    user: &UserId,
    identity: Arc<x25519::Identity>,
) -> Result<RescueStats, RescueError> {
    let keys = MailboxKeys {
        recipient: identity.to_public(),
        identity: Some(identity.clone()),
    };
    let list = MailboxList::new(rows.clone(), user.clone(), identity.to_public(), identity);
    let open = |id: &MailboxId| {
        let log = LogStore::new(rows.clone(), blobs.clone(), id.log_partition());
        let keys = keys.clone();
        let name = id.0.clone();
        async move {
            Mailbox::open(log, keys)
                .await
                .map_err(|source| RescueError::Mailbox {
                    mailbox: name,
                    source,
                })
        }
    };
    let mut stats = RescueStats::default();
    let mut inbox: Option<Mailbox> = None;
    for listed in list.all_ids().await?.into_iter().filter(|l| l.deleted) {
        stats.deleted_mailboxes += 1;
        let err = |source| RescueError::Mailbox {
            mailbox: listed.id.0.clone(),
            source,
        };
        let deleted = open(&listed.id).await?;
        let state = deleted.state().await.map_err(err)?;
        for m in state.messages.values() {
            if inbox.is_none() {
                inbox = Some(open(&MailboxId::inbox(user)).await?);
            }
            let Some(target) = inbox.as_ref() else {
                continue;
            };
            let added = target
                .write(|uid_floor| MailOp::Add {
                    msg: m.id.clone(),
                    flags: m.flags.clone(),
                    uid_floor,
                })
                .await;
            match added {
                Ok(_) => stats.rescued += 1,
                Err(MailboxError::AlreadyPresent { .. }) => {}
                Err(source) => {
                    return Err(RescueError::Mailbox {
                        mailbox: "INBOX".into(),
                        source,
                    });
                }
            }
            tracing::info!(user = %user.0, mailbox = listed.id.0, message = m.id.0, "message added concurrently with DELETE moved to INBOX");
            deleted
                .write(|_| MailOp::Expunge { msg: m.id.clone() })
                .await
                .map_err(err)?;
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::log::clock::{Dot, VersionVector, WriterId};
    use crate::log::codec::{self, WriterKey};
    use crate::mail::view::{LogOp, MessageId};
    use crate::storage::{StorageConfig, Store};

    #[tokio::test]
    async fn an_append_racing_a_delete_lands_in_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().into(),
        })
        .await
        .unwrap();
        let identity = Arc::new(x25519::Identity::generate());
        let user = UserId("u1".into());
        let list = MailboxList::new(
            store.rows.clone(),
            user.clone(),
            identity.to_public(),
            identity.clone(),
        );
        list.ensure_defaults().await.unwrap();
        let work = list.create("Work", None).await.unwrap();
        let keys = MailboxKeys {
            recipient: identity.to_public(),
            identity: Some(identity.clone()),
        };
        let log = LogStore::new(
            store.rows.clone(),
            store.blobs.clone(),
            work.id.log_partition(),
        );
        let here = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        here.write(|uid_floor| MailOp::Add {
            msg: MessageId("seen".into()),
            flags: BTreeSet::new(),
            uid_floor,
        })
        .await
        .unwrap();

        // Another region appends without having seen the delete (deps: nothing).
        let w = WriterId(99);
        let wk = WriterKey::generate();
        log.register(w, wk.seal(&identity.to_public()).unwrap())
            .await
            .unwrap();
        let racing = LogOp {
            dot: Dot { writer: w, seq: 1 },
            lamport: 1,
            deps: VersionVector::default(),
            modseq_floor: 1,
            op: MailOp::Add {
                msg: MessageId("racing".into()),
                flags: BTreeSet::from(["\\Flagged".to_string()]),
                uid_floor: 1,
            },
        };
        // DELETE here: ExpungeAll of what this process saw, then the list entry.
        here.write(|_| MailOp::ExpungeAll).await.unwrap();
        let body = postcard::to_allocvec(&racing.op).unwrap();
        let key = crate::log::store::op_key(racing.dot);
        log.append(
            racing.dot,
            codec::encode(&key, &racing.header(), &body, &wk).unwrap(),
        )
        .await
        .unwrap();
        list.delete("Work").await.unwrap();

        let stats = rescue_deleted(
            store.rows.clone(),
            store.blobs.clone(),
            &user,
            identity.clone(),
        )
        .await
        .unwrap();
        assert_eq!(stats.rescued, 1, "{stats:?}");
        let inbox = Mailbox::open(
            LogStore::new(
                store.rows.clone(),
                store.blobs.clone(),
                MailboxId::inbox(&user).log_partition(),
            ),
            keys.clone(),
        )
        .await
        .unwrap();
        let s = inbox.state().await.unwrap();
        let uid = s.uid_of(&MessageId("racing".into())).expect("rescued");
        assert!(s.messages[&uid].flags.contains("\\Flagged"));
        assert!(s.uid_of(&MessageId("seen".into())).is_none(), "deleted");
        // Nothing left to rescue, and a second run changes nothing.
        let again = rescue_deleted(store.rows.clone(), store.blobs.clone(), &user, identity)
            .await
            .unwrap();
        assert_eq!(again.rescued, 0);
        here.sync().await.unwrap();
        assert!(here.state().await.unwrap().messages.is_empty());
    }
}
