//! Encryption at rest. Every user has an age X25519 identity: anything Tern stores for the user is
//! encrypted to its public recipient (so LMTP can deliver without the password) and read back
//! with the identity, which is never stored in the clear. The identity is *sealed* (XChaCha20-
//! Poly1305) under keys only the user can produce:
//! - the password, through argon2id (one run per login also yields the login verifier);
//! - the SCRAM-SHA-256 ClientKey, which the server learns during a successful SCRAM exchange;
//! - an optional recovery key, printed once at user creation, for an admin reset.
//!
//! Changing the password re-seals the identity; mail is never re-encrypted.

mod kdf;
pub mod scram;
mod seal;
mod user_keys;

pub use kdf::{
    Argon2Params, PasswordSecrets, ScramVerifier, recovery_seal_key, scram_client_key,
    scram_seal_key,
};
pub use seal::Sealed;
pub use user_keys::{RecoveryKey, UnlockedUser, UserSecrets};

use age::x25519;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("wrong password or key")]
    WrongKey,
    #[error("invalid key derivation parameters: {0}")]
    Params(String),
    #[error("cannot encrypt: {0}")]
    Encrypt(String),
    #[error("cannot decrypt {what}: {detail}")]
    Decrypt { what: String, detail: String },
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

/// Encrypts `plaintext` to a user's public recipient (no secret needed).
pub fn encrypt_to(recipient: &x25519::Recipient, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
    age::encrypt(recipient, plaintext).map_err(|e| CryptoError::Encrypt(e.to_string()))
}

/// Decrypts a value written by `encrypt_to`; `what` names the value in the error (a key, never
/// its content).
pub fn decrypt_with(
    identity: &x25519::Identity,
    ciphertext: &[u8],
    what: &str,
) -> Result<Vec<u8>, CryptoError> {
    age::decrypt(identity, ciphertext).map_err(|e| CryptoError::Decrypt {
        what: what.to_string(),
        detail: e.to_string(),
    })
}
