//! The IMAP server (RFC 9051 / RFC 3501) over the mail model.
//!
//! Two layers, so that the protocol can be tested without sockets:
//! - a sans-I/O core: [`input::Input`] turns bytes into commands (imap-codec's fragmentizer for
//!   lines and literals, its command decoder for the rest, our limits on top) and
//!   [`session::Session`] turns commands into responses (imap-codec's encoder) written to an
//!   [`output::Out`];
//! - [`server`]: the tokio listener and connection task that moves bytes between a socket and
//!   that core, with timeouts and keepalives.
//!
//! One file per concept: `capability` (what is advertised), `sequence` (sequence sets as
//! ranges), `selected` (the selected mailbox: sequence numbers and pending untagged updates),
//! `mailboxes` (LIST, CREATE, STATUS, ...), `fetch`, `structure` (ENVELOPE, BODYSTRUCTURE),
//! `search`, `store`, `append`, `copy` (COPY and MOVE), `expunge`, `flags`, `auth`.
//! `docs/imap.md` lists what is implemented and what is not.

mod append;
mod auth;
pub mod capability;
mod copy;
mod expunge;
mod fetch;
mod flags;
pub mod input;
mod mailboxes;
pub mod output;
mod quota;
mod search;
mod selected;
pub mod sequence;
pub mod server;
pub mod session;
mod store;
mod structure;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_clients;

use std::time::Duration;

use crate::net::ProxyPolicy;
use crate::net::throttle::ThrottleConfig;

pub use server::{ImapServer, Listen};
pub use session::{Context, Session};

/// Limits and switches of the IMAP service.
#[derive(Debug, Clone)]
pub struct ImapConfig {
    /// Accept LOGIN and AUTHENTICATE PLAIN on a connection without TLS (dev mode). Without
    /// it, a plaintext connection advertises STARTTLS and LOGINDISABLED.
    pub allow_plaintext: bool,
    /// Longest command line (without its literals).
    pub max_line: usize,
    /// Largest literal, and so the largest message APPEND takes (advertised as APPENDLIMIT).
    pub max_literal: u32,
    /// Time allowed to log in after connecting.
    pub login_timeout: Duration,
    /// Time allowed to finish sending a command once it has started.
    pub command_timeout: Duration,
    /// An authenticated connection that sends nothing for this long is closed (RFC 9051
    /// requires at least 30 minutes); IDLE counts as activity only until this elapses too.
    pub idle_timeout: Duration,
    /// Interval of the `* OK` keepalives sent during IDLE.
    pub keepalive: Duration,
    /// Delays and limits on failed logins (per client address and per user).
    pub throttle: ThrottleConfig,
    /// Open connections allowed from one client address.
    pub max_connections_per_address: u32,
    /// Open (logged-in) connections allowed for one user.
    pub max_connections_per_user: u32,
    /// Load balancers whose PROXY v2 header names the real client.
    pub proxy: ProxyPolicy,
    /// Output is flushed to the socket when this many bytes are buffered.
    pub flush_threshold: usize,
    /// Time allowed for the client to take a chunk of output.
    pub write_timeout: Duration,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            allow_plaintext: false,
            max_line: 64 * 1024,
            max_literal: crate::mail::message::DEFAULT_PARSE_LIMIT as u32,
            login_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(31 * 60),
            keepalive: Duration::from_secs(120),
            throttle: ThrottleConfig::default(),
            max_connections_per_address: 100,
            max_connections_per_user: 50,
            proxy: ProxyPolicy::default(),
            flush_threshold: 64 * 1024,
            write_timeout: Duration::from_secs(120),
        }
    }
}
