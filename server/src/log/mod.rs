//! The causal log: ops with a known causal past, stored one row each and encrypted, and the
//! order-theoretic tools that turn a set of them into deterministic numbers.

pub mod clock;
pub mod codec;
pub mod series;
pub mod store;

use crate::crypto::CryptoError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(
        "op {key} has format version {found}; this server reads up to {supported}: upgrade it (the op is left untouched)"
    )]
    UnsupportedVersion {
        key: String,
        found: u8,
        supported: u8,
    },
    #[error("corrupt op {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("cannot encode an op: {0}")]
    Encode(String),
}
