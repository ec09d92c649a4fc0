//! LOGIN, AUTHENTICATE PLAIN and AUTHENTICATE SCRAM-SHA-256 (all with SASL-IR, RFC 4959).
//! LOGIN and PLAIN carry the password, which is what unlocks the user's mail (docs:
//! auth-and-keys): they are refused on a connection without TLS unless the configuration allows
//! plaintext (dev mode). SCRAM never sends the password; the ClientKey it proves unlocks the
//! mail instead, so it is offered on every connection. Failures of all three go through the
//! same throttle.

use imap_codec::imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_codec::imap_types::response::Code;

use super::output::{Out, code};
use crate::crypto::scram::{ClientFirst, ScramError, ServerFirst};
use crate::mail::account::Account;
use crate::users::User;

/// Where an AUTHENTICATE exchange stands.
pub(crate) enum Sasl {
    Plain,
    /// Waiting for SCRAM's client-first message.
    ScramFirst,
    /// Server-first sent; waiting for client-final.
    ScramFinal(Box<(ServerFirst, Option<std::sync::Arc<User>>)>),
    /// Verified, server-final sent; waiting for the client's empty response.
    ScramDone(std::sync::Arc<Account>),
}
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
        let sasl = match mechanism {
            AuthMechanism::Plain => {
                if !self.plaintext_ok() {
                    return Err(no_code(
                        code("PRIVACYREQUIRED"),
                        "authentication without TLS is disabled on this server",
                    ));
                }
                Sasl::Plain
            }
            AuthMechanism::ScramSha256 => Sasl::ScramFirst,
            other => {
                return Err(no_code(
                    code("CANNOT"),
                    format!("mechanism {other} is not supported (PLAIN and SCRAM-SHA-256 are)"),
                ));
            }
        };
        match initial {
            Some(response) => {
                self.sasl = Some(sasl);
                self.authenticate_step(response, out).await
            }
            None => {
                self.sasl = Some(sasl);
                out.continue_empty();
                Ok(Reply::Pending)
            }
        }
    }

    pub(super) async fn authenticate_data(
        &mut self,
        data: AuthenticateData<'_>,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        match data {
            AuthenticateData::Continue(response) => {
                self.authenticate_step(response.declassify().to_vec(), out)
                    .await
            }
            AuthenticateData::Cancel => {
                self.sasl = None;
                Err(bad("AUTHENTICATE cancelled"))
            }
        }
    }

    /// One client response of the exchange under way.
    async fn authenticate_step(
        &mut self,
        response: Vec<u8>,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        let response = zeroize::Zeroizing::new(response);
        match self.sasl.take() {
            None => Err(bad("no authentication under way")),
            Some(Sasl::Plain) => self.plain(response.to_vec()).await,
            Some(Sasl::ScramFirst) => {
                let first = ClientFirst::parse(&response).map_err(|e| bad(e.to_string()))?;
                if let Err(wait) = self.ctx.throttle.check(self.client_ip, &first.username) {
                    return Err(no_code(
                        code("UNAVAILABLE"),
                        format!(
                            "too many failed logins; try again in {} s",
                            wait.as_secs().max(1)
                        ),
                    ));
                }
                let user = self
                    .ctx
                    .accounts
                    .directory()
                    .user(&first.username)
                    .await
                    .map_err(|e| {
                        tracing::warn!(error = %e, "user directory");
                        no_code(code("UNAVAILABLE"), "the user directory cannot be read")
                    })?;
                let verifier = user.as_ref().map(|u| u.keys.scram.clone());
                let decoy = self.ctx.accounts.decoy_salt(&first.username);
                let server_first = first.challenge(verifier, &decoy);
                out.continue_base64(server_first.message().as_bytes());
                self.sasl = Some(Sasl::ScramFinal(Box::new((server_first, user))));
                Ok(Reply::Pending)
            }
            Some(Sasl::ScramFinal(pending)) => {
                let (server_first, user) = *pending;
                let name = server_first.username().to_string();
                let verified = match server_first.finish(&response) {
                    Ok(v) => v,
                    Err(ScramError::Proof) => return self.rejected(&name).await,
                    Err(e) => return Err(bad(e.to_string())),
                };
                let Some(user) = user else {
                    return self.rejected(&name).await;
                };
                let account = self
                    .ctx
                    .accounts
                    .login_scram(user, &verified.client_key)
                    .await
                    .map_err(Failure::from)?;
                out.continue_base64(verified.server_final.as_bytes());
                self.sasl = Some(Sasl::ScramDone(account));
                Ok(Reply::Pending)
            }
            Some(Sasl::ScramDone(account)) => {
                if !response.is_empty() {
                    return Err(bad("SCRAM is complete: an empty response was expected"));
                }
                self.logged_in(account)
            }
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
