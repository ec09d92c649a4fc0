//! The LMTP server (RFC 2033): how mail reaches Tern from Postfix.
//!
//! Two layers, as in `imap/`, so that the protocol is tested without sockets:
//! - a sans-I/O core: [`input::Input`] turns bytes into events (command lines parsed by the
//!   `smtp-proto` crate, DATA dot-unstuffed and BDAT chunks read by its receivers, our limits on
//!   top) and [`session::Session`] turns events into replies ([`reply`]) in a byte buffer;
//! - [`server`]: the tokio listener and connection task, with timeouts.
//!
//! Delivery itself (dedup, quota, keyless INBOX handles) is the mail model's:
//! `mail::delivery`. Recipient addresses are resolved in [`address`]. docs/lmtp.md has the
//! reply table and the limits.

pub mod address;
pub mod input;
pub mod reply;
pub mod server;
pub mod session;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use server::LmtpServer;
pub use session::{Context, Session};

use crate::mail::message::DEFAULT_PARSE_LIMIT;

/// Room kept below the message store's limit for the trace headers Tern adds.
const TRACE_ROOM: u64 = 4096;

/// Limits of the LMTP service.
#[derive(Debug, Clone)]
pub struct LmtpConfig {
    /// Name in the greeting, the LHLO reply and the Received header.
    pub hostname: String,
    /// Largest message taken (advertised as SIZE); at most the message store's parse limit
    /// less room for the trace headers.
    pub max_message_size: u64,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Longest command line (CRLF included); longer gets `500 5.5.2`.
    pub max_line: usize,
    /// Time allowed for the next command (and for finishing a started one).
    pub command_timeout: Duration,
    /// Time allowed between two reads while a message (DATA or BDAT) is arriving.
    pub data_timeout: Duration,
    /// Time allowed for the store to acknowledge a delivery; past it, `451` (the delivery
    /// may still complete, and the sender's retry then finds it: no second copy).
    pub delivery_timeout: Duration,
    /// A retry of the same bytes to the same user within this window is not stored again.
    pub dedup_window: Duration,
    /// Bad commands tolerated per connection before `421` and close.
    pub max_errors: u32,
    /// Connections served at once; more are answered `421 4.3.2` and closed.
    pub max_connections: usize,
    /// Time allowed for the client to take our replies.
    pub write_timeout: Duration,
}

impl Default for LmtpConfig {
    fn default() -> Self {
        LmtpConfig {
            hostname: "localhost".into(),
            max_message_size: DEFAULT_PARSE_LIMIT - TRACE_ROOM,
            max_recipients: 100,
            max_line: 4096,
            // RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for a command.
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            // Postfix waits 600 s for the replies after the final dot.
            delivery_timeout: Duration::from_secs(120),
            dedup_window: Duration::from_secs(24 * 3600),
            max_errors: 20,
            max_connections: 500,
            write_timeout: Duration::from_secs(120),
        }
    }
}
