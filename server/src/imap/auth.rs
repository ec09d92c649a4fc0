//! LOGIN and AUTHENTICATE PLAIN (with SASL-IR, RFC 4959). Both carry the password, which is
//! what unlocks the user's mail (docs: auth-and-keys): they are refused on a connection without
//! TLS unless the configuration allows plaintext (dev mode). SCRAM-SHA-256 comes with TLS.

use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::response::Code;

use super::output::{Out, code};
use super::session::{Failure, Reply, Session, bad, no_code};

impl Session {
    pub(super) async fn login(
        &mut self,
        username: Vec<u8>,
        password: Vec<u8>,
    ) -> Result<Reply, Failure> {
        if !self.plaintext_ok() {
            return Err(no_code(
                code("PRIVACYREQUIRED"),
                "login without TLS is disabled on this server",
            ));
        }
        let password = zeroize::Zeroizing::new(password);
        let name = String::from_utf8_lossy(&username).into_owned();
        if let Err(wait) = self.ctx.throttle.check(self.client_ip, &name) {
            tracing::warn!(peer = %self.peer, user = %name, "login refused: too many failures");
            return Err(no_code(
                code("UNAVAILABLE"),
                format!(
                    "too many failed logins; try again in {} s",
                    wait.as_secs().max(1)
                ),
            ));
        }
        let (Ok(user), Ok(pass)) = (
            std::str::from_utf8(&username),
            std::str::from_utf8(&password),
        ) else {
            return self.rejected(&name).await;
        };
        match self.ctx.accounts.login(user, pass).await {
            Ok(account) => self.logged_in(account),
            Err(crate::mail::account::AccountError::Rejected) => self.rejected(user).await,
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the user's connection slot and enters the authenticated state.
    pub(super) fn logged_in(
        &mut self,
        account: std::sync::Arc<crate::mail::account::Account>,
    ) -> Result<Reply, Failure> {
        let slot = match self.ctx.limits.login(&account.user.name) {
            Ok(slot) => slot,
            Err(e) => {
                tracing::warn!(peer = %self.peer, user = %account.user.name, "login refused: {e}");
                return Err(no_code(code("LIMIT"), e.to_string()));
            }
        };
        self.ctx.throttle.succeeded(&account.user.name);
        tracing::info!(peer = %self.peer, user = %account.user.name, tls = self.tls, "logged in");
        self.user_slot = Some(slot);
        self.account = Some(account);
        Ok(Reply::Done {
            code: Some(Code::Capability(self.capabilities())),
            text: "logged in".into(),
        })
    }

    pub(super) async fn rejected(&self, user: &str) -> Result<Reply, Failure> {
        tracing::info!(peer = %self.peer, user = %user, "login failed");
        let delay = self.ctx.throttle.failed(self.client_ip, user);
        tokio::time::sleep(delay).await;
        Err(no_code(code("AUTHENTICATIONFAILED"), "invalid credentials"))
    }

    pub(super) async fn authenticate(
        &mut self,
        mechanism: &AuthMechanism<'_>,
        initial: Option<Vec<u8>>,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        if !matches!(mechanism, AuthMechanism::Plain) {
            return Err(no_code(
                code("CANNOT"),
                format!("mechanism {mechanism} is not supported (PLAIN is)"),
            ));
        }
        if !self.plaintext_ok() {
            return Err(no_code(
                code("PRIVACYREQUIRED"),
                "authentication without TLS is disabled on this server",
            ));
        }
        match initial {
            Some(response) => self.plain(response).await,
            None => {
                out.continue_empty();
                Ok(Reply::Pending)
            }
        }
    }

    pub(super) async fn authenticate_data(
        &mut self,
        data: AuthenticateData<'_>,
    ) -> Result<Reply, Failure> {
        match data {
            AuthenticateData::Continue(response) => {
                self.plain(response.declassify().to_vec()).await
            }
            AuthenticateData::Cancel => Err(bad("AUTHENTICATE cancelled")),
        }
    }

    /// RFC 4616: `authzid NUL authcid NUL passwd`; an authzid must name the same user.
    async fn plain(&mut self, response: Vec<u8>) -> Result<Reply, Failure> {
        let response = zeroize::Zeroizing::new(response);
        let mut parts = response.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("malformed PLAIN response"));
        };
        if !authz.is_empty() && authz != authc {
            return Err(no_code(
                code("AUTHORIZATIONFAILED"),
                "cannot act as another user",
            ));
        }
        self.login(authc.to_vec(), password.to_vec()).await
    }
}
