//! A small secret sealed under a 32-byte key with XChaCha20-Poly1305 (random 24-byte nonce).

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

use super::CryptoError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// base64 of nonce (24 bytes) ‖ ciphertext+tag.
    pub data: String,
}

impl Sealed {
    pub fn seal(key: &[u8; 32], secret: &[u8]) -> Result<Sealed, CryptoError> {
        use base64::Engine;
        let nonce: [u8; 24] = rand::random();
        let cipher = XChaCha20Poly1305::new(key.into());
        let ct = cipher
            .encrypt(XNonce::from_slice(&nonce), secret)
            .map_err(|e| CryptoError::Encrypt(e.to_string()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        Ok(Sealed {
            data: base64::engine::general_purpose::STANDARD.encode(out),
        })
    }

    /// The secret, or `WrongKey` when the key does not open it (the tag does not verify).
    pub fn open(&self, key: &[u8; 32]) -> Result<zeroize::Zeroizing<Vec<u8>>, CryptoError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| CryptoError::Malformed {
                what: "sealed secret",
                detail: e.to_string(),
            })?;
        if raw.len() < 24 + 16 {
            return Err(CryptoError::Malformed {
                what: "sealed secret",
                detail: format!("{} bytes is too short", raw.len()),
            });
        }
        let (nonce, ct) = raw.split_at(24);
        let cipher = XChaCha20Poly1305::new(key.into());
        cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map(zeroize::Zeroizing::new)
            .map_err(|_| CryptoError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_refuses_the_wrong_key() {
        let key = [7u8; 32];
        let s = Sealed::seal(&key, b"secret").unwrap();
        assert_eq!(s.open(&key).unwrap().as_slice(), b"secret");
        assert!(matches!(s.open(&[8u8; 32]), Err(CryptoError::WrongKey)));
        let garbage = Sealed {
            data: "AAAA".into(),
        };
        assert!(matches!(
            garbage.open(&key),
            Err(CryptoError::Malformed { .. })
        ));
    }
}
