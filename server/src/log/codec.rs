//! How one op is stored in a row: a format version, a plaintext causal header (numbers only: who
//! wrote it, what it had seen, the floors, whether it adds a message), and the body encrypted
//! with its writer's key. The header lets a writer without the user's key (LMTP) compute UIDNEXT
//! and HIGHESTMODSEQ; it reveals the shape of the history, never names, flags or content.
//!
//! Each writer (a process, for one mailbox) draws a random 32-byte key and stores it once, sealed
//! to the user's age recipient, in its registry row. Op bodies are XChaCha20-Poly1305 under that
//! key, bound to the op's row key, so a reader pays one X25519 operation per writer instead of
//! one per op (a first login after 10,000 deliveries decrypts one key, not 10,000).
//!
//! Op layout: `[version: u8][header length: u32 BE][header: postcard][nonce: 24][body: AEAD]`.
//! Writer row: `[version: u8][age(key)]`.

use serde::{Deserialize, Serialize};

use super::LogError;
use super::clock::{Dot, VersionVector};
use crate::crypto;

/// The newest format this build writes and reads. An older server meeting a newer op refuses it
/// with `UnsupportedVersion` (and loses nothing: the row stays untouched).
pub const FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Header {
    pub dot: Dot,
    pub lamport: u64,
    pub deps: VersionVector,
    pub modseq_floor: u64,
    /// Set on ops that add a message: the UIDNEXT of the writer's view.
    pub uid_floor: Option<u64>,
}

/// `[version][len: u32 BE][head][tail]`: the frame of both ops and checkpoints.
fn frame(head: &[u8], tail: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + head.len() + tail.iter().map(|t| t.len()).sum::<usize>());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(head);
    for t in tail {
        out.extend_from_slice(t);
    }
    out
}

/// Splits a frame into its head and tail, refusing other versions loudly.
fn unframe<'a>(key: &str, raw: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), LogError> {
    let corrupt = |detail: &str| LogError::Corrupt {
        key: key.to_string(),
        detail: detail.to_string(),
    };
    let (&version, rest) = raw.split_first().ok_or_else(|| corrupt("empty value"))?;
    if version != FORMAT_VERSION {
        return Err(LogError::UnsupportedVersion {
            key: key.to_string(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if rest.len() < 4 {
        return Err(corrupt("truncated header length"));
    }
    let (len, rest) = rest.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if rest.len() < len {
        return Err(corrupt("truncated header"));
    }
    Ok(rest.split_at(len))
}

/// A writer's symmetric key for op bodies.
#[derive(Clone)]
pub struct WriterKey(pub zeroize::Zeroizing<[u8; 32]>);

impl WriterKey {
    pub fn generate() -> WriterKey {
        WriterKey(zeroize::Zeroizing::new(rand::random()))
    }

    /// The registry row value: the key sealed to the user's recipient.
    pub fn seal(&self, recipient: &age::x25519::Recipient) -> Result<Vec<u8>, LogError> {
        let mut out = vec![FORMAT_VERSION];
        out.extend(crypto::encrypt_to(recipient, self.0.as_slice())?);
        Ok(out)
    }

    pub fn open(
        key: &str,
        raw: &[u8],
        identity: &age::x25519::Identity,
    ) -> Result<WriterKey, LogError> {
        match raw.split_first() {
            Some((&FORMAT_VERSION, sealed)) => {
                let plain = crypto::decrypt_with(identity, sealed, key)?;
                let arr: [u8; 32] = plain.as_slice().try_into().map_err(|_| LogError::Corrupt {
                    key: key.to_string(),
                    detail: format!("writer key of {} bytes", plain.len()),
                })?;
                Ok(WriterKey(zeroize::Zeroizing::new(arr)))
            }
            Some((&v, _)) => Err(LogError::UnsupportedVersion {
                key: key.to_string(),
                found: v,
                supported: FORMAT_VERSION,
            }),
            None => Err(LogError::Corrupt {
                key: key.to_string(),
                detail: "empty writer row".into(),
            }),
        }
    }
}

/// Encodes an op stored at row `key`, its body sealed with the writer's key.
pub fn encode(
    key: &str,
    header: &Header,
    body: &[u8],
    writer_key: &WriterKey,
) -> Result<Vec<u8>, LogError> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    let head = postcard::to_allocvec(header).map_err(|e| LogError::Encode(e.to_string()))?;
    let nonce: [u8; 24] = rand::random();
    let cipher = chacha20poly1305::XChaCha20Poly1305::new(writer_key.0.as_slice().into());
    let sealed = cipher
        .encrypt(
            chacha20poly1305::XNonce::from_slice(&nonce),
            Payload {
                msg: body,
                aad: key.as_bytes(),
            },
        )
        .map_err(|e| LogError::Encode(e.to_string()))?;
    Ok(frame(&head, &[&nonce, &sealed]))
}

/// Opens the body of the op at row `key` (as returned by `decode_header`).
pub fn open_body(key: &str, body: &[u8], writer_key: &WriterKey) -> Result<Vec<u8>, LogError> {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    if body.len() < 24 + 16 {
        return Err(LogError::Corrupt {
            key: key.to_string(),
            detail: "truncated body".into(),
        });
    }
    let (nonce, sealed) = body.split_at(24);
    let cipher = chacha20poly1305::XChaCha20Poly1305::new(writer_key.0.as_slice().into());
    cipher
        .decrypt(
            chacha20poly1305::XNonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: key.as_bytes(),
            },
        )
        .map_err(|_| LogError::Corrupt {
            key: key.to_string(),
            detail: "body does not authenticate under its writer's key".into(),
        })
}

/// The header and the still-encrypted body. `key` names the row in errors.
pub fn decode_header<'a>(key: &str, raw: &'a [u8]) -> Result<(Header, &'a [u8]), LogError> {
    let (head, body) = unframe(key, raw)?;
    let header: Header = postcard::from_bytes(head).map_err(|e| LogError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })?;
    Ok((header, body))
}

/// A squashed stable prefix (docs/causal-log.md): the ops it covers are replaced by the state
/// they produce. The floors and the Lamport time are in the clear, so a writer without the key
/// still computes its floors; the state itself is in the encrypted part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseHead {
    pub covers: VersionVector,
    /// (UIDNEXT, HIGHESTMODSEQ + 1) of the prefix.
    pub floors: (u64, u64),
    /// The largest Lamport time in the prefix.
    pub lamport: u64,
}

/// The plaintext part of a checkpoint: its base, if squashed, and the headers of the ops after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointHead {
    pub base: Option<BaseHead>,
    pub headers: Vec<Header>,
}

/// A checkpoint body: a base and the ops after it, heads in plaintext, the rest (`sealed`: the
/// base state and the op bodies, encoded by the mail layer) encrypted together.
/// Layout: `[version: u8][head length: u32 BE][head: postcard][age(sealed)]`.
pub fn encode_checkpoint(
    head: &CheckpointHead,
    sealed: &[u8],
    recipient: &age::x25519::Recipient,
) -> Result<Vec<u8>, LogError> {
    let head = postcard::to_allocvec(head).map_err(|e| LogError::Encode(e.to_string()))?;
    let sealed = crypto::encrypt_to(recipient, sealed)?;
    Ok(frame(&head, &[&sealed]))
}

/// The head of a checkpoint and its still-encrypted rest.
pub fn decode_checkpoint<'a>(
    key: &str,
    raw: &'a [u8],
) -> Result<(CheckpointHead, &'a [u8]), LogError> {
    let (head, rest) = unframe(key, raw)?;
    let head = postcard::from_bytes(head).map_err(|e| LogError::Corrupt {
        key: key.to_string(),
        detail: e.to_string(),
    })?;
    Ok((head, rest))
}

pub fn decrypt_body(
    key: &str,
    body: &[u8],
    identity: &age::x25519::Identity,
) -> Result<Vec<u8>, LogError> {
    Ok(crypto::decrypt_with(identity, body, key)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::clock::WriterId;

    #[test]
    fn round_trip_and_loud_refusals() {
        let id = age::x25519::Identity::generate();
        let header = Header {
            dot: Dot {
                writer: WriterId(9),
                seq: 3,
            },
            lamport: 12,
            deps: VersionVector::default(),
            modseq_floor: 5,
            uid_floor: Some(4),
        };
        let wk = WriterKey::generate();
        let sealed_key = wk.seal(&id.to_public()).unwrap();
        let wk2 = WriterKey::open("w", &sealed_key, &id).unwrap();
        let raw = encode("k", &header, b"body", &wk).unwrap();
        let (h, body) = decode_header("k", &raw).unwrap();
        assert_eq!(h, header);
        assert_eq!(open_body("k", body, &wk2).unwrap(), b"body");
        // Bound to its row: the same bytes under another key do not open.
        assert!(open_body("k2", body, &wk2).is_err());
        assert!(
            !raw.windows(4).any(|w| w == b"body"),
            "the body is not in the clear"
        );

        let mut newer = raw.clone();
        newer[0] = FORMAT_VERSION + 1;
        assert!(matches!(
            decode_header("k", &newer),
            Err(LogError::UnsupportedVersion { found, .. }) if found == FORMAT_VERSION + 1
        ));
        let err = decode_header("log/x/op/1", &raw[..3]).unwrap_err();
        assert!(err.to_string().contains("log/x/op/1"), "{err}");
        let other = age::x25519::Identity::generate();
        assert!(WriterKey::open("w", &sealed_key, &other).is_err());
        assert!(open_body("k", body, &WriterKey::generate()).is_err());
    }
}
