//! Tern: a stateless IMAP + LMTP server whose state lives in Garage.
//!
//! Layers, each depending only on the ones below: `imap` (the protocol) → `mail` (the mailbox
//! model) → `log` (the causal log) → `storage` (rows and blobs); `crypto` (encryption at rest)
//! and `users` (the user directory) are used by all of them.

pub mod config;
pub mod crypto;
pub mod imap;
pub mod lmtp;
pub mod log;
pub mod mail;
pub mod net;
pub mod storage;
#[doc(hidden)]
pub mod testing;
pub mod users;
