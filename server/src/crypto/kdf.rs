//! Key derivation: argon2id from the password, SCRAM-SHA-256 (RFC 5802/7677) keys, HKDF.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::CryptoError;

/// argon2id cost, OWASP's recommendation by default (19 MiB, 2 passes, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Params {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Params {
    fn default() -> Self {
        Argon2Params {
            memory_kib: argon2::Params::DEFAULT_M_COST,
            iterations: argon2::Params::DEFAULT_T_COST,
            parallelism: argon2::Params::DEFAULT_P_COST,
        }
    }
}

/// What one argon2id run over the password yields: a login verifier (safe to store) and the key
/// that seals the user's identity (never stored). One run per login serves both.
pub struct PasswordSecrets {
    pub verifier: [u8; 32],
    pub seal_key: Zeroizing<[u8; 32]>,
}

impl PasswordSecrets {
    pub fn derive(password: &[u8], salt: &[u8], params: Argon2Params) -> Result<Self, CryptoError> {
        let p = argon2::Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            Some(64),
        )
        .map_err(|e| CryptoError::Params(e.to_string()))?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, p);
        let mut out = Zeroizing::new([0u8; 64]);
        argon
            .hash_password_into(password, salt, out.as_mut())
            .map_err(|e| CryptoError::Params(e.to_string()))?;
        let verifier: [u8; 32] = Sha256::digest(&out[..32]).into();
        let mut seal_key = Zeroizing::new([0u8; 32]);
        seal_key.copy_from_slice(&out[32..]);
        Ok(PasswordSecrets { verifier, seal_key })
    }
}

type HmacSha256 = Hmac<Sha256>;

pub(crate) fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// The SCRAM-SHA-256 ClientKey of a password (what a client computes; the server sees it only
/// inside a successful exchange).
pub fn scram_client_key(password: &[u8], salt: &[u8], iterations: u32) -> Zeroizing<[u8; 32]> {
    let mut salted = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, salted.as_mut());
    Zeroizing::new(hmac(salted.as_ref(), b"Client Key"))
}

/// What the directory stores for SCRAM-SHA-256: enough to verify a client, not to impersonate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScramVerifier {
    pub salt: String,
    pub iterations: u32,
    pub stored_key: String,
    pub server_key: String,
}

impl ScramVerifier {
    pub fn from_password(password: &[u8], salt: &[u8], iterations: u32) -> ScramVerifier {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut salted = Zeroizing::new([0u8; 32]);
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, salted.as_mut());
        let client_key = hmac(salted.as_ref(), b"Client Key");
        let server_key = hmac(salted.as_ref(), b"Server Key");
        ScramVerifier {
            salt: b64.encode(salt),
            iterations,
            stored_key: b64.encode(Sha256::digest(client_key)),
            server_key: b64.encode(server_key),
        }
    }

    /// Does `client_key` belong to this verifier (H(ClientKey) = StoredKey)?
    pub fn accepts(&self, client_key: &[u8; 32]) -> bool {
        use base64::Engine;
        let stored = base64::engine::general_purpose::STANDARD.decode(&self.stored_key);
        stored.is_ok_and(|s| constant_time_eq(&s, &Sha256::digest(client_key)))
    }
}

/// The key that seals the identity for SCRAM logins: HKDF over the ClientKey, which already has
/// full entropy from PBKDF2.
pub fn scram_seal_key(client_key: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<Sha256>::new(None, client_key);
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit of 8160: `expand` cannot fail.
    hk.expand(b"tern/scram-seal/v1", out.as_mut())
        .unwrap_or_else(|_| unreachable!());
    out
}

/// The key that seals the identity under a recovery key.
pub fn recovery_seal_key(recovery: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let hk = hkdf::Hkdf::<Sha256>::new(None, recovery);
    let mut out = Zeroizing::new([0u8; 32]);
    hk.expand(b"tern/recovery-seal/v1", out.as_mut())
        .unwrap_or_else(|_| unreachable!());
    out
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_matches_rfc7677_test_vector() {
        // RFC 7677 §3: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, i=4096.
        use base64::Engine;
        let salt = base64::engine::general_purpose::STANDARD
            .decode("W22ZaJ0SNY7soEsUEjb6gQ==")
            .unwrap();
        let v = ScramVerifier::from_password(b"pencil", &salt, 4096);
        // ServerSignature in the RFC is HMAC(ServerKey, AuthMessage); check ServerKey through it.
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let server_key = base64::engine::general_purpose::STANDARD
            .decode(&v.server_key)
            .unwrap();
        let sig = hmac(&server_key, auth_message.as_bytes());
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let ck = scram_client_key(b"pencil", &salt, 4096);
        assert!(v.accepts(&ck));
        assert!(!v.accepts(&scram_client_key(b"pencils", &salt, 4096)));
    }

    #[test]
    fn argon2_yields_distinct_verifier_and_key() {
        let cheap = Argon2Params {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        let a = PasswordSecrets::derive(b"pw", b"saltsaltsalt", cheap).unwrap();
        let b = PasswordSecrets::derive(b"pw", b"saltsaltsalt", cheap).unwrap();
        let c = PasswordSecrets::derive(b"pw2", b"saltsaltsalt", cheap).unwrap();
        assert_eq!(a.verifier, b.verifier);
        assert_eq!(*a.seal_key, *b.seal_key);
        assert_ne!(a.verifier, c.verifier);
        assert_ne!(a.verifier.as_slice(), a.seal_key.as_slice());
        let bad = Argon2Params {
            memory_kib: 1,
            ..cheap
        };
        assert!(matches!(
            PasswordSecrets::derive(b"pw", b"saltsaltsalt", bad),
            Err(CryptoError::Params(_))
        ));
    }
}
