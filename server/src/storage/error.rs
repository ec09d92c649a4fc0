//! Typed storage errors: each variant says what is wrong in words an operator can act on.

use std::time::Duration;

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage rejected the credentials (access key {key_id:?}): {detail}")]
    BadCredentials { key_id: String, detail: String },

    #[error("bucket {0:?} does not exist or the key has no access to it")]
    NoSuchBucket(String),

    #[error("storage cluster unreachable at {endpoint}: {detail}")]
    Unreachable { endpoint: String, detail: String },

    #[error("storage could not reach a quorum of nodes: {0}")]
    Quorum(String),

    #[error("storage did not answer within {0:?}")]
    Timeout(Duration),

    #[error("no object at {0:?}")]
    NotFound(String),

    #[error("corrupt or unexpected value at {key}: {detail}")]
    Corrupt { key: String, detail: String },

    #[error("invalid storage request: {0}")]
    Invalid(String),

    #[error("storage backend error: {0}")]
    Backend(String),

    #[error("local store i/o error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    /// Errors worth retrying for an idempotent call: the next attempt may see a healthy cluster.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Unreachable { .. } | StorageError::Quorum(_) | StorageError::Timeout(_)
        )
    }

    pub fn io(path: impl std::fmt::Display, source: std::io::Error) -> Self {
        StorageError::Io {
            path: path.to_string(),
            source,
        }
    }

    pub fn corrupt(key: impl std::fmt::Display, detail: impl std::fmt::Display) -> Self {
        StorageError::Corrupt {
            key: key.to_string(),
            detail: detail.to_string(),
        }
    }
}
