//! QUOTA (RFC 9208): one quota root per user, `""`, with the STORAGE resource. Usage is the
//! user's usage counter (`mail/usage.rs`, readable without the key), the limit
//! `User::quota_bytes` from the user directory; a user without a limit has no quota root. Limits
//! are set by the administrator (`tern user`), so SETQUOTA is refused. APPEND over the limit is
//! `NO [OVERQUOTA]`, as LMTP's 552 5.2.2.

use imap_codec::imap_types::core::{AString, Vec1};
use imap_codec::imap_types::extensions::quota::{QuotaGet, Resource};
use imap_codec::imap_types::mailbox::Mailbox as ImapMailbox;
use imap_codec::imap_types::response::{Code, Data};

use super::output::{Out, code};
use super::session::{Failure, Reply, Session, done, no_code};
use crate::mail::usage::Usage;

/// The only quota root.
const ROOT: &str = "";

impl Session {
    /// Bytes used by the logged-in user.
    pub(super) async fn used_bytes(&self) -> Result<u64, Failure> {
        let account = self.account()?;
        let store = self.ctx.accounts.store();
        Usage::read(store.rows.as_ref(), &account.user.id)
            .await
            .map(|u| u.bytes)
            .map_err(|e| {
                tracing::warn!(error = %e, "usage counter");
                no_code(code("UNAVAILABLE"), "the usage counter cannot be read")
            })
    }

    /// The user's current limit: read from the directory each time, so that a limit the
    /// administrator changes applies to sessions already open.
    async fn quota_limit(&self) -> Result<Option<u64>, Failure> {
        let account = self.account()?;
        match self.ctx.accounts.directory().user(&account.user.name).await {
            Ok(Some(user)) => Ok(user.quota_bytes),
            Ok(None) => Ok(account.user.quota_bytes),
            Err(e) => {
                tracing::warn!(error = %e, "user directory");
                Err(no_code(
                    code("UNAVAILABLE"),
                    "the user directory cannot be read",
                ))
            }
        }
    }

    fn quota_data(&self, used: u64, limit: u64) -> Option<Data<'static>> {
        // RFC 9208 counts STORAGE in units of 1024 octets.
        let kib = |b: u64| b.div_ceil(1024);
        Some(Data::Quota {
            root: AString::try_from(ROOT).ok()?,
            quotas: Vec1::from(QuotaGet::new(Resource::Storage, kib(used), kib(limit))),
        })
    }

    pub(super) async fn get_quota_root(
        &mut self,
        mailbox: &ImapMailbox<'_>,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        self.find(mailbox, "NONEXISTENT").await?;
        let limit = self.quota_limit().await?;
        let roots = match limit {
            Some(_) => vec![AString::try_from(ROOT).map_err(|_| no_code(code("CANNOT"), "root"))?],
            None => Vec::new(),
        };
        out.data(Data::QuotaRoot {
            mailbox: imap_codec::imap_types::IntoStatic::into_static(mailbox.clone()),
            roots,
        });
        if let Some(limit) = limit {
            let used = self.used_bytes().await?;
            out.data_opt(self.quota_data(used, limit));
        }
        done("GETQUOTAROOT completed")
    }

    pub(super) async fn get_quota(
        &mut self,
        root: &AString<'_>,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        match (root.as_ref() == ROOT.as_bytes(), self.quota_limit().await?) {
            (true, Some(limit)) => {
                let used = self.used_bytes().await?;
                out.data_opt(self.quota_data(used, limit));
                done("GETQUOTA completed")
            }
            _ => Err(no_code(
                code("NONEXISTENT"),
                "no such quota root (a user with a limit has the root \"\")",
            )),
        }
    }

    /// `NO [OVERQUOTA]` when `size` more bytes would take the user past the limit.
    pub(super) async fn check_quota(&self, size: u64) -> Result<(), Failure> {
        let Some(limit) = self.quota_limit().await? else {
            return Ok(());
        };
        let used = self.used_bytes().await?;
        if used.saturating_add(size) > limit {
            return Err(no_code(
                Code::OverQuota,
                format!("over quota: {used} of {limit} bytes used, the message has {size}"),
            ));
        }
        Ok(())
    }
}
