//! One IMAP session, sans I/O: events from [`Input`](super::input::Input) in, responses to an
//! [`Out`] out. States (RFC 9051 §3): not authenticated (`account` is `None`), authenticated,
//! selected (`selected` is `Some`), logout (the caller closes after [`Flow::Close`]).
//!
//! Each command handler (in the module named after it) returns `Ok(Reply)` or a [`Failure`];
//! this module turns them into the tagged response, after reporting what changed in the
//! selected mailbox.

use std::sync::Arc;

use imap_codec::imap_types::command::{Command, CommandBody};
use imap_codec::imap_types::core::{IString, NString, Tag};
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use imap_codec::imap_types::extensions::namespace::Namespace;
use imap_codec::imap_types::mailbox::Mailbox as ImapMailbox;
use imap_codec::imap_types::response::{Code, Data, StatusKind};
use imap_codec::imap_types::sequence::SequenceSet;

use super::ImapConfig;
use super::capability;
use super::input::{Event, Mode};
use super::output::{Out, code};
use super::selected::{Report, Selected};
use crate::mail::account::{AccountError, Accounts};
use crate::mail::mailbox::MailboxError;
use crate::mail::mailbox_list::ListError;
use crate::mail::message::MessageError;
use crate::net::{AuthThrottle, ConnectionLimits, TlsProvider};

/// What every session of a server shares.
pub struct Context {
    pub config: ImapConfig,
    pub accounts: Arc<Accounts>,
    /// The certificate for STARTTLS and implicit TLS; `None`: plaintext only.
    pub tls: Option<Arc<TlsProvider>>,
    pub limits: Arc<ConnectionLimits>,
    pub throttle: AuthThrottle,
}

impl Context {
    pub fn new(
        config: ImapConfig,
        accounts: Arc<Accounts>,
        tls: Option<Arc<TlsProvider>>,
    ) -> Context {
        Context {
            limits: ConnectionLimits::new(
                config.max_connections_per_address,
                config.max_connections_per_user,
            ),
            throttle: AuthThrottle::new(config.throttle),
            config,
            accounts,
            tls,
        }
    }
}

/// Whether the connection goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The tagged OK to STARTTLS is written: flush it, then start the TLS handshake.
    StartTls,
    Close,
}

/// A command's successful end.
pub(super) enum Reply {
    /// Tagged OK.
    Done {
        code: Option<Code<'static>>,
        text: String,
    },
    /// No tagged response yet (AUTHENTICATE waits for the client's response, IDLE for DONE).
    Pending,
    Logout,
    StartTls,
}

pub(super) fn done(text: impl Into<String>) -> Result<Reply, Failure> {
    Ok(Reply::Done {
        code: None,
        text: text.into(),
    })
}

pub(super) fn done_with(code: Code<'static>, text: impl Into<String>) -> Result<Reply, Failure> {
    Ok(Reply::Done {
        code: Some(code),
        text: text.into(),
    })
}

/// A command's failure: a tagged NO or BAD with a reason, or an I/O error that ends the
/// connection.
#[derive(Debug)]
pub(super) enum Failure {
    No {
        code: Option<Code<'static>>,
        text: String,
    },
    Bad(String),
    Io(std::io::Error),
}

pub(super) fn no(text: impl Into<String>) -> Failure {
    Failure::No {
        code: None,
        text: text.into(),
    }
}

pub(super) fn no_code(c: Code<'static>, text: impl Into<String>) -> Failure {
    Failure::No {
        code: Some(c),
        text: text.into(),
    }
}

pub(super) fn bad(text: impl Into<String>) -> Failure {
    Failure::Bad(text.into())
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

impl From<MailboxError> for Failure {
    fn from(e: MailboxError) -> Failure {
        tracing::warn!(error = %e, "mailbox error");
        no_code(code("UNAVAILABLE"), format!("mailbox storage: {e}"))
    }
}

impl From<ListError> for Failure {
    fn from(e: ListError) -> Failure {
        match e {
            ListError::NotFound(name) => no_code(
                code("NONEXISTENT"),
                format!("mailbox {name:?} does not exist"),
            ),
            ListError::AlreadyExists(name) => no_code(
                code("ALREADYEXISTS"),
                format!("mailbox {name:?} already exists"),
            ),
            ListError::Invalid(reason) => no_code(code("CANNOT"), reason),
            other => {
                tracing::warn!(error = %other, "mailbox list error");
                no_code(code("UNAVAILABLE"), format!("mailbox list: {other}"))
            }
        }
    }
}

impl From<MessageError> for Failure {
    fn from(e: MessageError) -> Failure {
        match e {
            MessageError::TooLarge { limit, .. } => no_code(
                Code::TooBig,
                format!("message larger than the {limit}-byte limit"),
            ),
            other => {
                tracing::warn!(error = %other, "message store error");
                no_code(code("UNAVAILABLE"), format!("message storage: {other}"))
            }
        }
    }
}

impl From<AccountError> for Failure {
    fn from(e: AccountError) -> Failure {
        match e {
            AccountError::Rejected => no_code(code("AUTHENTICATIONFAILED"), "invalid credentials"),
            AccountError::List(e) => e.into(),
            AccountError::Message(e) => e.into(),
            other => {
                tracing::error!(error = %other, "account error");
                no_code(code("UNAVAILABLE"), format!("account: {other}"))
            }
        }
    }
}

/// Extensions the client turned on with ENABLE (or SELECT ... (CONDSTORE)).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Enabled {
    pub condstore: bool,
    /// QRESYNC (RFC 7162): implies CONDSTORE; expunges are sent as VANISHED.
    pub qresync: bool,
}

enum Pending {
    None,
    Authenticate(Tag<'static>),
    Idle(Tag<'static>),
}

pub struct Session {
    pub(super) ctx: Arc<Context>,
    pub(super) account: Option<Arc<crate::mail::account::Account>>,
    pub(super) selected: Option<Box<Selected>>,
    pub(super) enabled: Enabled,
    pending: Pending,
    /// Who is on the other end, for logs.
    pub peer: String,
    /// The client's address (after a PROXY header), for the login throttle.
    pub(super) client_ip: Option<std::net::IpAddr>,
    /// Whether the connection is encrypted (implicit TLS or after STARTTLS).
    pub(super) tls: bool,
    /// This user's connection slot, held while logged in.
    pub(super) user_slot: Option<crate::net::limits::Slot>,
    /// The SASL exchange under way (AUTHENTICATE waiting for the client's next response).
    pub(super) sasl: Option<super::auth::Sasl>,
}

/// The mailbox name a client gave, as the mailbox list stores it.
pub(super) fn mailbox_name(m: &ImapMailbox<'_>) -> Result<String, Failure> {
    match m {
        ImapMailbox::Inbox => Ok("INBOX".to_string()),
        ImapMailbox::Other(other) => std::str::from_utf8(other.as_ref())
            .map(str::to_string)
            .map_err(|_| bad("mailbox names must be UTF-8 (modified UTF-7 is ASCII)")),
    }
}

impl Session {
    pub fn new(ctx: Arc<Context>, peer: impl Into<String>) -> Session {
        Session {
            ctx,
            account: None,
            selected: None,
            enabled: Enabled::default(),
            pending: Pending::None,
            peer: peer.into(),
            client_ip: None,
            tls: false,
            user_slot: None,
            sasl: None,
        }
    }

    pub fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The client's real address, for the login throttle.
    pub fn set_client_ip(&mut self, ip: std::net::IpAddr) {
        self.client_ip = Some(ip);
    }

    /// The connection is now encrypted.
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    /// Whether LOGIN / AUTHENTICATE PLAIN may carry a password on this connection.
    pub(super) fn plaintext_ok(&self) -> bool {
        self.tls || self.ctx.config.allow_plaintext
    }

    pub fn greeting(&self, out: &mut Out) {
        out.untagged(
            StatusKind::Ok,
            Some(Code::Capability(self.capabilities())),
            "Tern IMAP ready",
        );
    }

    pub(super) fn capabilities(
        &self,
    ) -> imap_codec::imap_types::core::Vec1<imap_codec::imap_types::response::Capability<'static>>
    {
        capability::capabilities(capability::Offer {
            authenticated: self.account.is_some(),
            password_ok: self.plaintext_ok(),
            starttls: !self.tls && self.ctx.tls.is_some(),
            max_literal: self.ctx.config.max_literal,
        })
    }

    /// How the input should decode the next message.
    pub fn input_mode(&self) -> Mode {
        match self.pending {
            Pending::None => Mode::Command,
            Pending::Authenticate(_) => Mode::AuthenticateData,
            Pending::Idle(_) => Mode::IdleDone,
        }
    }

    pub fn authenticated(&self) -> bool {
        self.account.is_some()
    }

    pub fn idling(&self) -> bool {
        matches!(self.pending, Pending::Idle(_))
    }

    /// Resolves when the selected mailbox changes (never without one).
    pub async fn changed(&mut self) {
        match self.selected.as_mut() {
            Some(s) => s.changed().await,
            None => std::future::pending().await,
        }
    }

    pub(super) fn account(&self) -> Result<Arc<crate::mail::account::Account>, Failure> {
        self.account.clone().ok_or_else(|| bad("log in first"))
    }

    pub(super) fn selected_mut(&mut self) -> Result<&mut Selected, Failure> {
        self.selected
            .as_deref_mut()
            .ok_or_else(|| bad("no mailbox selected"))
    }

    /// Reports the changes of the selected mailbox since the last report.
    pub(super) async fn report(&mut self, expunge: bool, out: &mut Out) -> Result<(), Failure> {
        let condstore = self.enabled.condstore;
        let qresync = self.enabled.qresync;
        let Some(selected) = self.selected.as_deref_mut() else {
            return Ok(());
        };
        if !selected.dirty() {
            return Ok(());
        }
        selected.mark_seen();
        let state = selected.mailbox.state().await?;
        selected.update(
            Arc::unwrap_or_clone(state),
            Report {
                expunge,
                condstore,
                qresync,
            },
            out,
        );
        Ok(())
    }

    pub async fn handle(&mut self, event: Event, out: &mut Out) -> std::io::Result<Flow> {
        match event {
            Event::Command(command) => self.command(command, out).await,
            Event::AuthenticateData(data) => {
                let tag = match std::mem::replace(&mut self.pending, Pending::None) {
                    Pending::Authenticate(tag) => tag,
                    _ => return Ok(Flow::Continue),
                };
                let result = self.authenticate_data(data, out).await;
                if let Ok(Reply::Pending) = result {
                    self.pending = Pending::Authenticate(tag);
                    return Ok(Flow::Continue);
                }
                self.finish(tag, "AUTHENTICATE", result, out)
            }
            Event::IdleDone => {
                let tag = match std::mem::replace(&mut self.pending, Pending::None) {
                    Pending::Idle(tag) => tag,
                    _ => return Ok(Flow::Continue),
                };
                let result = self.report(true, out).await.and_then(|_| done("IDLE done"));
                self.finish(tag, "IDLE", result, out)
            }
            Event::Continue => {
                out.continue_text("go ahead");
                Ok(Flow::Continue)
            }
            Event::Reject {
                tag,
                too_big,
                reason,
            } => {
                // A bad line while AUTHENTICATE or IDLE waits ends that command.
                self.sasl = None;
                let tag = match std::mem::replace(&mut self.pending, Pending::None) {
                    Pending::Authenticate(t) | Pending::Idle(t) => Some(t),
                    Pending::None => tag,
                };
                let (kind, c) = if too_big {
                    (StatusKind::No, Some(Code::TooBig))
                } else {
                    (StatusKind::Bad, None)
                };
                match tag {
                    Some(tag) => out.tagged(tag, kind, c, &reason),
                    None => out.untagged(kind, c, &reason),
                }
                Ok(Flow::Continue)
            }
            Event::Fatal { tag, reason } => {
                if let Some(tag) = tag {
                    out.tagged(tag, StatusKind::Bad, None, &reason);
                }
                out.bye(None, &reason);
                Ok(Flow::Close)
            }
        }
    }

    /// Sends the IDLE updates for a change of the selected mailbox.
    pub async fn idle_update(&mut self, out: &mut Out) -> std::io::Result<()> {
        match self.report(true, out).await {
            Err(Failure::Io(e)) => Err(e),
            Err(_) => {
                out.untagged(StatusKind::No, None, "cannot read the mailbox just now");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    fn finish(
        &mut self,
        tag: Tag<'static>,
        name: &str,
        result: Result<Reply, Failure>,
        out: &mut Out,
    ) -> std::io::Result<Flow> {
        match result {
            Ok(Reply::Done { code, text }) => {
                tracing::debug!(peer = %self.peer, command = name, "OK");
                out.tagged(tag, StatusKind::Ok, code, &text);
            }
            Ok(Reply::Pending) => {}
            Ok(Reply::StartTls) => {
                tracing::debug!(peer = %self.peer, "STARTTLS");
                out.tagged(tag, StatusKind::Ok, None, "begin TLS negotiation now");
                return Ok(Flow::StartTls);
            }
            Ok(Reply::Logout) => {
                out.bye(None, "logging out");
                out.tagged(tag, StatusKind::Ok, None, "LOGOUT completed");
                return Ok(Flow::Close);
            }
            Err(Failure::No { code, text }) => {
                tracing::debug!(peer = %self.peer, command = name, reason = %text, "NO");
                out.tagged(tag, StatusKind::No, code, &text);
            }
            Err(Failure::Bad(text)) => {
                tracing::debug!(peer = %self.peer, command = name, reason = %text, "BAD");
                out.tagged(tag, StatusKind::Bad, None, &text);
            }
            Err(Failure::Io(e)) => return Err(e),
        }
        Ok(Flow::Continue)
    }

    async fn command(&mut self, command: Command<'static>, out: &mut Out) -> std::io::Result<Flow> {
        let Command { tag, body } = command;
        let name = body.name();
        // Untagged EXPUNGE must not interrupt FETCH, STORE or SEARCH (RFC 9051 §7.5.1).
        let expunge_ok = !matches!(
            body,
            CommandBody::Fetch { uid: false, .. }
                | CommandBody::Store { uid: false, .. }
                | CommandBody::Search { uid: false, .. }
        );
        let mut result = self.dispatch(&tag, body, out).await;
        if let Ok(Reply::Done { .. }) = result
            && let Err(e) = self.report(expunge_ok, out).await
        {
            result = Err(e);
        }
        self.finish(tag, name, result, out)
    }

    async fn dispatch(
        &mut self,
        tag: &Tag<'static>,
        body: CommandBody<'static>,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        use CommandBody as C;
        match body {
            C::Capability => {
                out.data(Data::Capability(self.capabilities()));
                done("CAPABILITY completed")
            }
            C::Noop | C::Check => {
                if let Some(s) = self.selected.as_deref() {
                    s.mailbox.sync().await?;
                }
                done("NOOP completed")
            }
            C::Logout => Ok(Reply::Logout),
            C::Id { .. } => {
                let field = |s: &str| IString::try_from(s.to_string()).ok();
                let params = [("name", "Tern"), ("version", env!("CARGO_PKG_VERSION"))]
                    .into_iter()
                    .filter_map(|(k, v)| Some((field(k)?, NString(field(v)))))
                    .collect();
                out.data(Data::Id {
                    parameters: Some(params),
                });
                done("ID completed")
            }
            C::StartTLS => {
                if self.tls {
                    Err(bad("TLS is already active"))
                } else if self.account.is_some() {
                    Err(bad("STARTTLS is only allowed before logging in"))
                } else if self.ctx.tls.is_none() {
                    Err(bad(
                        "STARTTLS is not available: this server has no certificate",
                    ))
                } else {
                    Ok(Reply::StartTls)
                }
            }
            C::Login { username, password } => {
                if self.account.is_some() {
                    return Err(bad("already authenticated"));
                }
                self.login(
                    username.as_ref().to_vec(),
                    password.declassify().as_ref().to_vec(),
                )
                .await
            }
            C::Authenticate {
                mechanism,
                initial_response,
            } => {
                if self.account.is_some() {
                    return Err(bad("already authenticated"));
                }
                let initial = initial_response.map(|r| r.declassify().to_vec());
                let reply = self.authenticate(&mechanism, initial, out).await?;
                if let Reply::Pending = reply {
                    self.pending = Pending::Authenticate(tag.clone());
                }
                Ok(reply)
            }
            _ if self.account.is_none() => Err(bad("log in first")),
            C::Enable { capabilities } => {
                let mut enabled = Vec::new();
                for c in capabilities.as_ref() {
                    if let CapabilityEnable::CondStore = c {
                        if !self.enabled.condstore {
                            enabled.push(CapabilityEnable::CondStore);
                        }
                        self.enabled.condstore = true;
                    } else if c.to_string().eq_ignore_ascii_case("QRESYNC") {
                        if !self.enabled.qresync {
                            enabled
                                .push(imap_codec::imap_types::IntoStatic::into_static(c.clone()));
                        }
                        self.enabled.qresync = true;
                        self.enabled.condstore = true;
                    }
                }
                out.data(Data::Enabled {
                    capabilities: enabled,
                });
                done("ENABLE completed")
            }
            C::GetQuotaRoot { mailbox } => self.get_quota_root(&mailbox, out).await,
            C::GetQuota { root } => self.get_quota(&root, out).await,
            C::SetQuota { .. } => Err(no_code(
                code("NOPERM"),
                "quotas are set by the administrator",
            )),
            C::Namespace => {
                let personal = vec![Namespace::new(
                    IString::try_from("").map_err(|_| no("namespace"))?,
                    imap_codec::imap_types::core::QuotedChar::try_from(
                        crate::mail::mailbox_list::DELIMITER,
                    )
                    .ok(),
                )];
                out.data(Data::Namespace {
                    personal,
                    other: Vec::new(),
                    shared: Vec::new(),
                });
                done("NAMESPACE completed")
            }
            C::Select {
                mailbox,
                parameters,
            } => self.select(&mailbox, false, &parameters, out).await,
            C::Examine {
                mailbox,
                parameters,
            } => self.select(&mailbox, true, &parameters, out).await,
            C::Create { mailbox } => self.create(&mailbox).await,
            C::Delete { mailbox } => self.delete(&mailbox).await,
            C::Rename { from, to } => self.rename(&from, &to).await,
            C::Subscribe { mailbox } => self.subscribe(&mailbox, true).await,
            C::Unsubscribe { mailbox } => self.subscribe(&mailbox, false).await,
            C::List {
                reference,
                mailbox_wildcard,
            } => self.list(&reference, &mailbox_wildcard, false, out).await,
            C::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(&reference, &mailbox_wildcard, true, out).await,
            C::Status {
                mailbox,
                item_names,
            } => self.status(&mailbox, &item_names, out).await,
            C::Append {
                mailbox,
                flags,
                date,
                message,
            } => self.append(&mailbox, &flags, date.as_ref(), message).await,
            C::Idle => {
                self.report(true, out).await?;
                out.continue_text("idling");
                self.pending = Pending::Idle(tag.clone());
                Ok(Reply::Pending)
            }
            _ if self.selected.is_none() => Err(bad("no mailbox selected")),
            C::Unselect => {
                self.selected = None;
                done("UNSELECT completed")
            }
            C::Close => self.close().await,
            C::Expunge => self.expunge(None).await,
            C::ExpungeUid { sequence_set } => self.expunge(Some(&sequence_set)).await,
            C::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                self.fetch(&sequence_set, macro_or_item_names, uid, &modifiers, out)
                    .await
            }
            C::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                self.store(
                    &sequence_set,
                    &kind,
                    &response,
                    &flags,
                    uid,
                    &modifiers,
                    out,
                )
                .await
            }
            C::Search {
                charset,
                criteria,
                uid,
            } => self.search(charset.as_ref(), &criteria, uid, out).await,
            C::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&sequence_set, &mailbox, uid, false, out).await,
            C::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&sequence_set, &mailbox, uid, true, out).await,
            other => Err(bad(format!("{} is not supported", other.name()))),
        }
    }

    /// Resolves a command's sequence set against the selected mailbox.
    pub(super) fn targets(
        &self,
        set: &SequenceSet,
        uid: bool,
    ) -> Result<Vec<(usize, u64)>, Failure> {
        let s = self
            .selected
            .as_deref()
            .ok_or_else(|| bad("no mailbox selected"))?;
        s.resolve(set, uid).map_err(bad)
    }
}
