//! A user's key material as the directory stores it, and as a process holds it once unlocked.

use std::str::FromStr;

use age::secrecy::ExposeSecret;
use age::x25519;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::CryptoError;
use super::kdf::{self, Argon2Params, PasswordSecrets, ScramVerifier};
use super::seal::Sealed;

/// SCRAM iteration count for new verifiers (RFC 7677's minimum is 4096).
const SCRAM_ITERATIONS: u32 = 4096;

/// What the user directory stores: public recipient, login verifiers, and the identity sealed
/// three ways. Nothing here decrypts mail without a secret only the user (or the holder of the
/// recovery key) has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSecrets {
    /// age X25519 recipient (`age1...`): LMTP encrypts deliveries to it.
    pub recipient: String,
    pub argon2: Argon2Params,
    /// base64 salt of the argon2id run.
    pub password_salt: String,
    /// hex SHA-256 of the first half of the argon2id output.
    pub password_verifier: String,
    pub scram: ScramVerifier,
    pub sealed_by_password: Sealed,
    pub sealed_by_scram: Sealed,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_by_recovery: Option<Sealed>,
}

/// A recovery key: 32 random bytes, shown once as hex groups.
pub struct RecoveryKey(pub Zeroizing<[u8; 32]>);

impl RecoveryKey {
    pub fn generate() -> RecoveryKey {
        RecoveryKey(Zeroizing::new(rand::random()))
    }

    pub fn display(&self) -> String {
        hex::encode(self.0.as_slice())
            .as_bytes()
            .chunks(8)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("-")
    }

    pub fn parse(s: &str) -> Result<RecoveryKey, CryptoError> {
        let clean: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        let bytes = hex::decode(&clean).map_err(|e| CryptoError::Malformed {
            what: "recovery key",
            detail: e.to_string(),
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::Malformed {
            what: "recovery key",
            detail: "expected 64 hex digits".into(),
        })?;
        Ok(RecoveryKey(Zeroizing::new(arr)))
    }
}

/// A user whose identity is open in this process: can read everything of theirs.
pub struct UnlockedUser {
    pub identity: x25519::Identity,
}

impl UnlockedUser {
    pub fn recipient(&self) -> x25519::Recipient {
        self.identity.to_public()
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn open_identity(sealed: &Sealed, key: &[u8; 32]) -> Result<UnlockedUser, CryptoError> {
    let raw = sealed.open(key)?;
    let text = std::str::from_utf8(&raw).map_err(|e| CryptoError::Malformed {
        what: "sealed identity",
        detail: e.to_string(),
    })?;
    let identity = x25519::Identity::from_str(text).map_err(|e| CryptoError::Malformed {
        what: "sealed identity",
        detail: e.to_string(),
    })?;
    Ok(UnlockedUser { identity })
}

impl UserSecrets {
    /// New key material for a new user; returns the recovery key to show once, if asked for.
    pub fn create(
        password: &str,
        argon2: Argon2Params,
        with_recovery: bool,
    ) -> Result<(UserSecrets, UnlockedUser, Option<RecoveryKey>), CryptoError> {
        let identity = x25519::Identity::generate();
        let recovery = with_recovery.then(RecoveryKey::generate);
        let secrets = Self::seal(&identity, password, argon2, recovery.as_ref())?;
        Ok((secrets, UnlockedUser { identity }, recovery))
    }

    fn seal(
        identity: &x25519::Identity,
        password: &str,
        argon2: Argon2Params,
        recovery: Option<&RecoveryKey>,
    ) -> Result<UserSecrets, CryptoError> {
        use base64::Engine;
        let id_text = identity.to_string();
        let id_bytes = id_text.expose_secret().as_bytes();
        let password_salt: [u8; 16] = rand::random();
        let pw = PasswordSecrets::derive(password.as_bytes(), &password_salt, argon2)?;
        let scram_salt: [u8; 16] = rand::random();
        let scram =
            ScramVerifier::from_password(password.as_bytes(), &scram_salt, SCRAM_ITERATIONS);
        let client_key = kdf::scram_client_key(password.as_bytes(), &scram_salt, SCRAM_ITERATIONS);
        let sealed_by_recovery = recovery
            .map(|r| Sealed::seal(&kdf::recovery_seal_key(&r.0), id_bytes))
            .transpose()?;
        Ok(UserSecrets {
            recipient: identity.to_public().to_string(),
            argon2,
            password_salt: b64().encode(password_salt),
            password_verifier: hex::encode(pw.verifier),
            scram,
            sealed_by_password: Sealed::seal(&pw.seal_key, id_bytes)?,
            sealed_by_scram: Sealed::seal(&kdf::scram_seal_key(&client_key), id_bytes)?,
            sealed_by_recovery,
        })
    }

    pub fn recipient(&self) -> Result<x25519::Recipient, CryptoError> {
        x25519::Recipient::from_str(&self.recipient).map_err(|e| CryptoError::Malformed {
            what: "recipient",
            detail: e.to_string(),
        })
    }

    /// LOGIN / PLAIN: one argon2id run checks the password and opens the identity.
    pub fn unlock_with_password(&self, password: &str) -> Result<UnlockedUser, CryptoError> {
        use base64::Engine;
        let salt = b64()
            .decode(&self.password_salt)
            .map_err(|e| CryptoError::Malformed {
                what: "password salt",
                detail: e.to_string(),
            })?;
        let pw = PasswordSecrets::derive(password.as_bytes(), &salt, self.argon2)?;
        let stored = hex::decode(&self.password_verifier).unwrap_or_default();
        if !kdf::constant_time_eq(&stored, &pw.verifier) {
            return Err(CryptoError::WrongKey);
        }
        open_identity(&self.sealed_by_password, &pw.seal_key)
    }

    /// SCRAM-SHA-256: the ClientKey recovered from a verified proof opens the identity.
    pub fn unlock_with_scram(&self, client_key: &[u8; 32]) -> Result<UnlockedUser, CryptoError> {
        if !self.scram.accepts(client_key) {
            return Err(CryptoError::WrongKey);
        }
        open_identity(&self.sealed_by_scram, &kdf::scram_seal_key(client_key))
    }

    pub fn unlock_with_recovery(&self, key: &RecoveryKey) -> Result<UnlockedUser, CryptoError> {
        let sealed = self
            .sealed_by_recovery
            .as_ref()
            .ok_or(CryptoError::WrongKey)?;
        open_identity(sealed, &kdf::recovery_seal_key(&key.0))
    }

    /// New password (after `passwd`, or a `reset` with the recovery key): re-seals the same
    /// identity, so stored mail stays readable. The recovery seal is kept as it was.
    pub fn reseal(
        &self,
        user: &UnlockedUser,
        new_password: &str,
    ) -> Result<UserSecrets, CryptoError> {
        let mut next = Self::seal(&user.identity, new_password, self.argon2, None)?;
        next.sealed_by_recovery = self.sealed_by_recovery.clone();
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> Argon2Params {
        Argon2Params {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn every_way_in_opens_the_same_identity() {
        let (secrets, user, recovery) = UserSecrets::create("hunter2", cheap(), true).unwrap();
        let mail = super::super::encrypt_to(&secrets.recipient().unwrap(), b"a message").unwrap();

        let by_pw = secrets.unlock_with_password("hunter2").unwrap();
        assert_eq!(
            super::super::decrypt_with(&by_pw.identity, &mail, "m").unwrap(),
            b"a message"
        );
        assert!(matches!(
            secrets.unlock_with_password("hunter3"),
            Err(CryptoError::WrongKey)
        ));

        let scram_salt = b64_decode(&secrets.scram.salt);
        let ck = kdf::scram_client_key(b"hunter2", &scram_salt, secrets.scram.iterations);
        let by_scram = secrets.unlock_with_scram(&ck).unwrap();
        assert_eq!(
            by_scram.recipient().to_string(),
            user.recipient().to_string()
        );

        let recovery = recovery.unwrap();
        let parsed = RecoveryKey::parse(&recovery.display()).unwrap();
        let by_rec = secrets.unlock_with_recovery(&parsed).unwrap();
        assert_eq!(by_rec.recipient().to_string(), secrets.recipient);
        assert!(
            secrets
                .unlock_with_recovery(&RecoveryKey::generate())
                .is_err()
        );
    }

    #[test]
    fn password_change_keeps_mail_readable() {
        let (secrets, user, recovery) = UserSecrets::create("old", cheap(), true).unwrap();
        let mail = super::super::encrypt_to(&secrets.recipient().unwrap(), b"kept").unwrap();
        let next = secrets.reseal(&user, "new").unwrap();
        assert!(next.unlock_with_password("old").is_err());
        let u = next.unlock_with_password("new").unwrap();
        assert_eq!(
            super::super::decrypt_with(&u.identity, &mail, "m").unwrap(),
            b"kept"
        );
        assert!(next.unlock_with_recovery(&recovery.unwrap()).is_ok());
        assert_eq!(next.recipient, secrets.recipient);
        // Serialises to YAML for the users file and back.
        let yaml = serde_yaml::to_string(&next).unwrap();
        let back: UserSecrets = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(back, next);
        assert!(!yaml.contains("AGE-SECRET-KEY"), "no identity in the clear");
    }

    fn b64_decode(s: &str) -> Vec<u8> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap()
    }
}
