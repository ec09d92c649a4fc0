//! The user directory: who can log in, which addresses reach them, their quota and their sealed
//! keys; aliases (an address delivering to one or more users) and a catch-all user per domain.
//! Behind a trait so another source (LDAP) can be added; the one source today is a YAML file,
//! reloaded when it changes.

mod yaml_file;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::crypto::UserSecrets;

pub use yaml_file::YamlDirectory;

/// An opaque, random, stable user id: storage keys are derived from it, never from the name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserId(pub String);

impl UserId {
    pub fn generate() -> UserId {
        UserId(hex::encode(rand::random::<[u8; 16]>()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    pub id: UserId,
    /// Addresses delivered to this user (lower-case `local@domain`).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Quota on stored bytes; none means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_bytes: Option<u64>,
    pub keys: UserSecrets,
}

/// An address that delivers to other users (a list, or a role address such as `postmaster@`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alias {
    /// `local@domain`, matched case-insensitively.
    pub address: String,
    /// Login names of the users it delivers to.
    pub to: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("users file {path}: {detail}")]
    File { path: String, detail: String },
    #[error("user {0:?} already exists")]
    Exists(String),
    #[error("no user {0:?}")]
    NoSuchUser(String),
    #[error("address {address:?} already belongs to {owner:?}")]
    AddressTaken { address: String, owner: String },
    #[error("this directory is read-only")]
    ReadOnly,
}

#[async_trait]
pub trait UserDirectory: Send + Sync + 'static {
    /// By login name (case-sensitive, as typed by the client).
    async fn user(&self, name: &str) -> Result<Option<Arc<User>>, DirectoryError>;
    /// By delivery address (already normalised by the caller: lower case, no `+tag`).
    async fn by_address(&self, address: &str) -> Result<Option<Arc<User>>, DirectoryError>;
    /// Everyone an address delivers to: the user who has it, or the members of an alias; empty
    /// when nobody has it. Same normalisation as `by_address`.
    async fn recipients(&self, address: &str) -> Result<Vec<Arc<User>>, DirectoryError> {
        Ok(self.by_address(address).await?.into_iter().collect())
    }
    /// The user who gets mail for the addresses of `domain` (lower case, no trailing dot) that
    /// nobody has, if the domain has a catch-all.
    async fn catch_all(&self, domain: &str) -> Result<Option<Arc<User>>, DirectoryError> {
        let _ = domain;
        Ok(None)
    }
    async fn list(&self) -> Result<Vec<Arc<User>>, DirectoryError>;
    /// Adds a user, or replaces the one with the same name when `replace` (password change).
    async fn put(&self, user: User, replace: bool) -> Result<(), DirectoryError>;
    async fn remove(&self, name: &str) -> Result<(), DirectoryError>;
}
