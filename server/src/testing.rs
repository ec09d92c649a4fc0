//! Set-up shared by the tests and benchmarks of every package: users whose keys are sealed
//! with cheap argon2id parameters (a login costs microseconds, not 50 ms), a local store and a
//! users file in a directory. Not for production: the parameters are weak on purpose.

use std::path::Path;

use crate::crypto::{Argon2Params, CryptoError, UserSecrets};
use crate::storage::{StorageConfig, StorageError, Store};
use crate::users::{DirectoryError, User, UserDirectory, UserId, YamlDirectory};

/// Argon2id at its cheapest.
pub const CHEAP_ARGON2: Argon2Params = Argon2Params {
    memory_kib: 64,
    iterations: 1,
    parallelism: 1,
};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A user with a fresh id, one address, an optional quota, keys sealed under `password`.
pub fn user(
    name: &str,
    password: &str,
    address: &str,
    quota_bytes: Option<u64>,
) -> Result<User, CryptoError> {
    let (keys, _, _) = UserSecrets::create(password, CHEAP_ARGON2, false)?;
    Ok(User {
        name: name.into(),
        id: UserId::generate(),
        addresses: vec![address.into()],
        quota_bytes,
        keys,
    })
}

/// The local store in `dir/store`.
pub async fn local_store(dir: &Path) -> Result<Store, StorageError> {
    Store::open(&StorageConfig::Local {
        path: dir.join("store"),
    })
    .await
}

/// The users file `path` with `users` added.
pub async fn users_file(path: &Path, users: Vec<User>) -> Result<YamlDirectory, SetupError> {
    let directory = YamlDirectory::open(path).await?;
    for u in users {
        directory.put(u, false).await?;
    }
    Ok(directory)
}
