//! The LMTP state machine: LHLO, then transactions (MAIL, RCPT…, DATA or BDAT…), with one reply
//! per accepted recipient after the message (RFC 2033 §4.2). Sans-I/O: events in, reply bytes
//! out; the only waits are on the directory and the store.
//!
//! A recipient's reply after the message is 250 only once its copy and the log op adding it to
//! INBOX are acknowledged by the store (`Deliverer::deliver`). An address that reaches several
//! users (an alias) gets the worst of their outcomes: a temporary failure of any of them makes
//! the sender retry the address, and the users who already have the message are not given a
//! second copy (the delivery records).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use smtp_proto::{MAIL_BODY_BINARYMIME, MAIL_SMTPUTF8, MailFrom, RcptTo, Request};

use super::LmtpConfig;
use super::TRACE_ROOM;
use super::address::{self, AddressError};
use super::input::{Event, Mode};
use super::reply::{self, Reply};
use crate::mail::account::Accounts;
use crate::mail::delivery::{Delivered, Deliverer, DeliveryError, DeliveryPolicy, Incoming};
use crate::mail::message::DEFAULT_PARSE_LIMIT;
use crate::users::{User, UserId};

/// What every session of one server shares.
pub struct Context {
    pub config: LmtpConfig,
    pub deliverer: Arc<Deliverer>,
}

impl Context {
    pub fn new(config: LmtpConfig, accounts: Arc<Accounts>) -> Arc<Context> {
        let policy = DeliveryPolicy {
            max_message_size: config
                .max_message_size
                .saturating_add(TRACE_ROOM)
                .min(DEFAULT_PARSE_LIMIT),
            dedup_window: config.dedup_window,
        };
        Arc::new(Context {
            deliverer: Deliverer::new(accounts, policy),
            config,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Close,
}

/// An accepted RCPT.
struct Recipient {
    /// As the client wrote it (for the replies).
    given: String,
    users: Vec<Arc<User>>,
}

struct Transaction {
    sender: String,
    /// SIZE= of MAIL FROM (0 when not given).
    declared_size: u64,
    recipients: Vec<Recipient>,
    /// BDAT chunks received so far.
    chunks: Vec<u8>,
    chunked: bool,
    /// A chunk went past the size limit: the rest is read and refused.
    too_large: bool,
}

pub struct Session {
    ctx: Arc<Context>,
    peer: String,
    /// The name given in LHLO.
    client: Option<String>,
    tx: Option<Transaction>,
    mode: Mode,
    errors: u32,
}

fn say(out: &mut Vec<u8>, code: u16, status: [u8; 3], text: impl Into<String>) {
    Reply::new(code, status, text).write(out);
}

impl Session {
    pub fn new(ctx: Arc<Context>, peer: impl Into<String>) -> Session {
        Session {
            ctx,
            peer: peer.into(),
            client: None,
            tx: None,
            mode: Mode::Command,
            errors: 0,
        }
    }

    pub fn greeting(&self, out: &mut Vec<u8>) {
        reply::greeting(out, &self.ctx.config.hostname);
    }

    pub fn input_mode(&self) -> Mode {
        self.mode
    }

    /// A reply to a command the client should not have sent; too many of them end the
    /// connection.
    fn bad(&mut self, out: &mut Vec<u8>, code: u16, status: [u8; 3], text: &str) -> Flow {
        say(out, code, status, text);
        self.errors += 1;
        if self.errors >= self.ctx.config.max_errors {
            say(
                out,
                421,
                [4, 7, 0],
                format!(
                    "{} Too many errors, closing connection",
                    self.ctx.config.hostname
                ),
            );
            return Flow::Close;
        }
        Flow::Continue
    }

    pub async fn handle(&mut self, event: Event, out: &mut Vec<u8>) -> Flow {
        match event {
            Event::Command(request) => self.command(request, out).await,
            Event::Invalid(e) => {
                let (code, status, text) = match e {
                    smtp_proto::Error::UnknownCommand => {
                        (500, [5, 5, 2], "Command unrecognized".to_string())
                    }
                    smtp_proto::Error::InvalidSenderAddress => {
                        (501, [5, 1, 7], "Bad sender address syntax".to_string())
                    }
                    smtp_proto::Error::InvalidRecipientAddress => {
                        (501, [5, 1, 3], "Bad recipient address syntax".to_string())
                    }
                    smtp_proto::Error::SyntaxError { syntax } => {
                        (501, [5, 5, 4], format!("Syntax: {syntax}"))
                    }
                    smtp_proto::Error::InvalidParameter { param } => {
                        (501, [5, 5, 4], format!("Invalid {param} parameter"))
                    }
                    smtp_proto::Error::UnsupportedParameter { param } => {
                        (555, [5, 5, 4], format!("Unsupported parameter {param}"))
                    }
                    other => (500, [5, 5, 2], format!("Syntax error ({other:?})")),
                };
                self.bad(out, code, status, &text)
            }
            Event::LineTooLong => self.bad(out, 500, [5, 5, 2], "Line too long"),
            Event::Message(body) => {
                self.mode = Mode::Command;
                if let Some(tx) = self.tx.take() {
                    self.deliver(tx, body, out).await;
                }
                Flow::Continue
            }
            Event::MessageTooLarge => {
                self.mode = Mode::Command;
                if let Some(tx) = self.tx.take() {
                    self.refuse_too_large(&tx, out);
                }
                Flow::Continue
            }
            Event::Chunk { data, last } => self.chunk(Some(data), last, out).await,
            Event::ChunkTooLarge { last } => self.chunk(None, last, out).await,
        }
    }

    async fn command(&mut self, request: Request<String>, out: &mut Vec<u8>) -> Flow {
        match request {
            Request::Lhlo { host } => {
                // Like EHLO, LHLO starts afresh.
                self.client = Some(host);
                self.tx = None;
                reply::lhlo(
                    out,
                    &self.ctx.config.hostname,
                    self.ctx.config.max_message_size,
                );
                Flow::Continue
            }
            Request::Ehlo { .. } | Request::Helo { .. } => {
                self.bad(out, 500, [5, 5, 1], "This is LMTP: use LHLO")
            }
            Request::Mail { from } => self.mail(from, out),
            Request::Rcpt { to } => self.rcpt(to, out).await,
            Request::Data => self.data(out),
            Request::Rset => {
                self.tx = None;
                say(out, 250, [2, 0, 0], "OK");
                Flow::Continue
            }
            Request::Noop { .. } => {
                say(out, 250, [2, 0, 0], "OK");
                Flow::Continue
            }
            Request::Vrfy { .. } => {
                // Answering would let anyone list the users.
                say(
                    out,
                    252,
                    [2, 5, 0],
                    "Cannot VRFY user, but will accept message and attempt delivery",
                );
                Flow::Continue
            }
            Request::Quit => {
                say(
                    out,
                    221,
                    [2, 0, 0],
                    format!("{} closing connection", self.ctx.config.hostname),
                );
                Flow::Close
            }
            other => {
                let text = format!("{} not implemented", other.name());
                self.bad(out, 502, [5, 5, 1], &text)
            }
        }
    }

    fn mail(&mut self, from: MailFrom<String>, out: &mut Vec<u8>) -> Flow {
        if self.client.is_none() {
            return self.bad(out, 503, [5, 5, 1], "Send LHLO first");
        }
        if self.tx.is_some() {
            return self.bad(out, 503, [5, 5, 1], "Nested MAIL command");
        }
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return self.bad(out, 555, [5, 5, 4], "BODY=BINARYMIME is not supported");
        }
        if from.flags & MAIL_SMTPUTF8 != 0 {
            return self.bad(out, 555, [5, 5, 4], "SMTPUTF8 is not supported");
        }
        let max = self.ctx.config.max_message_size;
        if from.size as u64 > max {
            say(
                out,
                552,
                [5, 3, 4],
                format!("Message size exceeds fixed maximum message size ({max} bytes)"),
            );
            return Flow::Continue;
        }
        self.tx = Some(Transaction {
            sender: from.address,
            declared_size: from.size as u64,
            recipients: Vec::new(),
            chunks: Vec::new(),
            chunked: false,
            too_large: false,
        });
        say(out, 250, [2, 1, 0], "Sender OK");
        Flow::Continue
    }

    async fn rcpt(&mut self, to: RcptTo<String>, out: &mut Vec<u8>) -> Flow {
        let max = self.ctx.config.max_recipients;
        let Some(tx) = self.tx.as_ref() else {
            return self.bad(out, 503, [5, 5, 1], "Send MAIL first");
        };
        if tx.chunked {
            return self.bad(out, 503, [5, 5, 1], "RCPT after BDAT");
        }
        if tx.recipients.len() >= max {
            say(
                out,
                452,
                [4, 5, 3],
                format!("Too many recipients (at most {max})"),
            );
            return Flow::Continue;
        }
        let declared = tx.declared_size;
        let given = to.address;
        let normalised = match address::normalise(&given) {
            Ok(n) => n,
            Err(AddressError::Empty) => {
                // `<>`, and smtp-proto's reading of a bare `<postmaster>`.
                say(
                    out,
                    550,
                    [5, 1, 1],
                    "<>: no such user here (an address needs a domain)",
                );
                return Flow::Continue;
            }
            Err(e) => return self.bad(out, 501, [5, 1, 3], &format!("<{given}>: {e}")),
        };
        let directory = self.ctx.deliverer.accounts().directory().clone();
        let resolved = match address::resolve(directory.as_ref(), &normalised).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                say(out, 550, [5, 1, 1], format!("<{given}>: no such user here"));
                return Flow::Continue;
            }
            Err(e) => {
                tracing::warn!(peer = self.peer, rcpt = given, error = %e, "user directory unavailable");
                say(
                    out,
                    451,
                    [4, 4, 3],
                    format!("<{given}>: user directory unavailable, try again later"),
                );
                return Flow::Continue;
            }
        };
        // Refuse early what cannot fit; checked again, with the real size, after the message.
        if let [user] = resolved.users.as_slice() {
            match self.ctx.deliverer.check_quota(user, declared).await {
                Err(DeliveryError::OverQuota { .. }) => {
                    say(out, 552, [5, 2, 2], format!("<{given}>: mailbox full"));
                    return Flow::Continue;
                }
                Err(e) => {
                    tracing::warn!(user = user.name, error = %e, "quota check at RCPT failed; checked again after DATA");
                }
                Ok(()) => {}
            }
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.recipients.push(Recipient {
                given: given.clone(),
                users: resolved.users,
            });
        }
        say(out, 250, [2, 1, 5], format!("<{given}> OK"));
        Flow::Continue
    }

    fn data(&mut self, out: &mut Vec<u8>) -> Flow {
        let Some(tx) = self.tx.as_ref() else {
            return self.bad(out, 503, [5, 5, 1], "Send MAIL first");
        };
        if tx.chunked {
            return self.bad(out, 503, [5, 5, 1], "DATA after BDAT");
        }
        if tx.recipients.is_empty() {
            // RFC 2033 §4.2: no accepted recipient, DATA fails with 503.
            return self.bad(out, 503, [5, 5, 1], "No valid recipients");
        }
        self.mode = Mode::Data;
        // No enhanced code on 3xx (RFC 2034 §3).
        out.extend_from_slice(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n");
        Flow::Continue
    }

    /// A BDAT chunk (`None`: it went past the size limit and was discarded).
    async fn chunk(&mut self, data: Option<Vec<u8>>, last: bool, out: &mut Vec<u8>) -> Flow {
        let max = self.ctx.config.max_message_size;
        let Some(tx) = self.tx.as_mut() else {
            return self.bad(out, 503, [5, 5, 1], "Send MAIL first");
        };
        if tx.recipients.is_empty() {
            return self.bad(out, 503, [5, 5, 1], "No valid recipients");
        }
        tx.chunked = true;
        let size = data.as_ref().map_or(0, Vec::len);
        match data {
            Some(data) if !tx.too_large && (tx.chunks.len() + data.len()) as u64 <= max => {
                tx.chunks.extend_from_slice(&data);
            }
            _ => {
                tx.too_large = true;
                tx.chunks = Vec::new();
            }
        }
        if !last {
            if tx.too_large {
                say(out, 552, [5, 3, 4], "Message too big");
            } else {
                say(out, 250, [2, 0, 0], format!("{size} octets received"));
            }
            return Flow::Continue;
        }
        if let Some(mut tx) = self.tx.take() {
            if tx.too_large {
                self.refuse_too_large(&tx, out);
            } else {
                let body = std::mem::take(&mut tx.chunks);
                self.deliver(tx, body, out).await;
            }
        }
        Flow::Continue
    }

    fn refuse_too_large(&self, tx: &Transaction, out: &mut Vec<u8>) {
        let max = self.ctx.config.max_message_size;
        for r in &tx.recipients {
            say(
                out,
                552,
                [5, 3, 4],
                format!(
                    "<{}>: message exceeds the maximum size ({max} bytes)",
                    r.given
                ),
            );
        }
    }

    /// The Return-Path and Received lines stored above the message (RFC 5321 §4.4).
    fn trace(&self, sender: &str) -> Bytes {
        let date = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| chrono::DateTime::from_timestamp(d.as_secs() as i64, 0))
            .map(|d| d.to_rfc2822())
            .unwrap_or_default();
        let client = self.client.as_deref().unwrap_or("unknown");
        // A TCP peer as `[ip]`, anything else (a Unix socket) as given.
        let peer = match self.peer.parse::<std::net::SocketAddr>() {
            Ok(addr) => format!("[{}]", addr.ip()),
            Err(_) => self.peer.clone(),
        };
        Bytes::from(format!(
            "Return-Path: <{}>\r\nReceived: from {} ({})\r\n\tby {} (Tern) with LMTP;\r\n\t{date}\r\n",
            reply::clean(sender),
            reply::clean(client),
            reply::clean(&peer),
            reply::clean(&self.ctx.config.hostname),
        ))
    }

    /// Stores the message for every user once (concurrently), then answers each recipient.
    async fn deliver(&mut self, tx: Transaction, body: Vec<u8>, out: &mut Vec<u8>) {
        let incoming = Incoming {
            trace: self.trace(&tx.sender),
            sender: tx.sender,
            body: Bytes::from(body),
        };
        let mut users: Vec<Arc<User>> = Vec::new();
        for user in tx.recipients.iter().flat_map(|r| &r.users) {
            if !users.iter().any(|u| u.id == user.id) {
                users.push(user.clone());
            }
        }
        let deliverer = &self.ctx.deliverer;
        let timeout = self.ctx.config.delivery_timeout;
        let results = futures::future::join_all(
            users
                .iter()
                .map(|u| deliverer.deliver_within(u.clone(), incoming.clone(), timeout)),
        )
        .await;
        let mut outcome: HashMap<UserId, Result<Delivered, DeliveryError>> = HashMap::new();
        for (user, result) in users.iter().zip(results) {
            match &result {
                Ok(d) => tracing::info!(
                    peer = self.peer,
                    user = user.name,
                    message = d.message.0,
                    uid = d.uid,
                    size = incoming.size(),
                    duplicate = d.duplicate,
                    "delivered"
                ),
                Err(e) => tracing::warn!(
                    peer = self.peer,
                    user = user.name,
                    size = incoming.size(),
                    error = %e,
                    "delivery failed"
                ),
            }
            outcome.insert(user.id.clone(), result);
        }
        for r in &tx.recipients {
            let worst = r
                .users
                .iter()
                .filter_map(|u| outcome.get(&u.id)?.as_ref().err())
                .max_by_key(|e| !e.is_permanent());
            outcome_reply(&r.given, worst).write(out);
        }
    }
}

/// A recipient's reply after the message.
fn outcome_reply(rcpt: &str, error: Option<&DeliveryError>) -> Reply {
    match error {
        None => Reply::new(250, [2, 0, 0], format!("<{rcpt}> delivered")),
        Some(DeliveryError::OverQuota { .. }) => {
            Reply::new(552, [5, 2, 2], format!("<{rcpt}>: mailbox full"))
        }
        Some(DeliveryError::TooLarge { limit, .. }) => Reply::new(
            552,
            [5, 3, 4],
            format!("<{rcpt}>: message exceeds the maximum size ({limit} bytes)"),
        ),
        Some(DeliveryError::TimedOut(_)) => Reply::new(
            451,
            [4, 4, 1],
            format!("<{rcpt}>: storage did not answer in time, try again later"),
        ),
        Some(DeliveryError::Keys { .. }) => Reply::new(
            451,
            [4, 3, 5],
            format!("<{rcpt}>: the user's keys are misconfigured, try again later"),
        ),
        Some(_) => Reply::new(
            451,
            [4, 3, 0],
            format!("<{rcpt}>: temporary storage failure, try again later"),
        ),
    }
}
