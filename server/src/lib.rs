//! Tern: a stateless IMAP + LMTP server whose state lives in Garage.
//!
//! Layers, each depending only on the ones below: `storage` (rows and blobs).

pub mod storage;
