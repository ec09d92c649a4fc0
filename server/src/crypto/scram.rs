//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), sans I/O: client-first in,
//! server-first out; client-final in, the recovered ClientKey and server-final out. The
//! ClientKey is what opens the user's sealed identity (`UserSecrets::unlock_with_scram`), so a
//! SCRAM login unlocks mail without the server ever seeing the password.
//!
//! Hand-written: the Rust SCRAM crates either want the salted password on the server (we keep
//! only StoredKey/ServerKey) or come with a whole SASL framework. Channel binding (`-PLUS`) is
//! not offered; a client asking for it (`p=`) is refused. User names are taken as sent
//! (SASLprep is not applied; Tern's user names are ASCII).

use base64::Engine;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::kdf::{ScramVerifier, constant_time_eq, hmac};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("authorization identity must be empty or the user itself")]
    Authzid,
    #[error("the nonce does not continue the exchange")]
    Nonce,
    #[error("invalid proof")]
    Proof,
}

/// What the client's first message says.
#[derive(Debug, Clone)]
pub struct ClientFirst {
    pub username: String,
    gs2_header: String,
    bare: String,
    client_nonce: String,
}

/// Waiting for the client's final message.
pub struct ServerFirst {
    first: ClientFirst,
    message: String,
    nonce: String,
    verifier: Option<ScramVerifier>,
}

/// A verified exchange.
pub struct Verified {
    pub client_key: Zeroizing<[u8; 32]>,
    /// `v=...`, to send before the tagged OK.
    pub server_final: String,
}

fn decode_name(s: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

impl ClientFirst {
    pub fn parse(message: &[u8]) -> Result<ClientFirst, ScramError> {
        let s = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut parts = s.splitn(3, ',');
        let (Some(cb), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ScramError::Malformed("client-first needs a GS2 header"));
        };
        match cb {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        let mut username = None;
        let mut nonce = None;
        for attr in bare.split(',') {
            if let Some(v) = attr.strip_prefix("n=") {
                username = Some(decode_name(v)?);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v.to_string());
            } else if attr.starts_with("m=") {
                return Err(ScramError::Malformed("mandatory extension not supported"));
            }
        }
        let (Some(username), Some(client_nonce)) = (username, nonce) else {
            return Err(ScramError::Malformed("client-first needs n= and r="));
        };
        if client_nonce.is_empty() || username.is_empty() {
            return Err(ScramError::Malformed("empty user name or nonce"));
        }
        if let Some(a) = authzid.strip_prefix("a=") {
            if decode_name(a)? != username {
                return Err(ScramError::Authzid);
            }
        } else if !authzid.is_empty() {
            return Err(ScramError::Malformed("bad authzid"));
        }
        Ok(ClientFirst {
            username,
            gs2_header: format!("{cb},{authzid},"),
            bare: bare.to_string(),
            client_nonce,
        })
    }

    /// The server's challenge. `verifier` is `None` for an unknown user: the exchange then runs
    /// with `decoy_salt` (stable per name) and fails at the proof, like a wrong password.
    pub fn challenge(self, verifier: Option<ScramVerifier>, decoy_salt: &[u8]) -> ServerFirst {
        let server_nonce: [u8; 18] = rand::random();
        let nonce = format!("{}{}", self.client_nonce, B64.encode(server_nonce));
        let (salt, iterations) = match &verifier {
            Some(v) => (v.salt.clone(), v.iterations),
            None => (B64.encode(decoy_salt), 4096),
        };
        let message = format!("r={nonce},s={salt},i={iterations}");
        ServerFirst {
            first: self,
            message,
            nonce,
            verifier,
        }
    }
}

impl ServerFirst {
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn username(&self) -> &str {
        &self.first.username
    }

    pub fn finish(self, client_final: &[u8]) -> Result<Verified, ScramError> {
        let s =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = s
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client-final needs p="))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                channel = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        let expected_c = B64.encode(self.first.gs2_header.as_bytes());
        if channel != Some(expected_c.as_str()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        let Some(verifier) = self.verifier else {
            return Err(ScramError::Proof);
        };
        let stored_key = B64
            .decode(&verifier.stored_key)
            .map_err(|_| ScramError::Proof)?;
        let server_key = B64
            .decode(&verifier.server_key)
            .map_err(|_| ScramError::Proof)?;
        if proof.len() != 32 {
            return Err(ScramError::Proof);
        }
        let auth_message = format!("{},{},{}", self.first.bare, self.message, without_proof);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut client_key = Zeroizing::new([0u8; 32]);
        for (i, k) in client_key.iter_mut().enumerate() {
            *k = proof[i] ^ signature[i];
        }
        if !constant_time_eq(&Sha256::digest(&client_key[..]), &stored_key) {
            return Err(ScramError::Proof);
        }
        let server_signature = hmac(&server_key, auth_message.as_bytes());
        Ok(Verified {
            client_key,
            server_final: format!("v={}", B64.encode(server_signature)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client, from RFC 5802 §3 (the reference computations, done independently here).
    fn client_final(
        password: &str,
        client_first_bare: &str,
        server_first: &str,
        gs2: &str,
    ) -> (String, String) {
        let attrs: Vec<&str> = server_first.split(',').collect();
        let nonce = attrs[0].strip_prefix("r=").unwrap();
        let salt = B64.decode(attrs[1].strip_prefix("s=").unwrap()).unwrap();
        let iterations: u32 = attrs[2].strip_prefix("i=").unwrap().parse().unwrap();
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let without_proof = format!("c={},r={nonce}", B64.encode(gs2));
        let auth = format!("{client_first_bare},{server_first},{without_proof}");
        let sig = hmac(&stored_key, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        let server_sig = hmac(&hmac(&salted, b"Server Key"), auth.as_bytes());
        (
            format!("{without_proof},p={}", B64.encode(proof)),
            format!("v={}", B64.encode(server_sig)),
        )
    }

    fn verifier(password: &str) -> ScramVerifier {
        ScramVerifier::from_password(password.as_bytes(), b"0123456789abcdef", 4096)
    }

    #[test]
    fn rfc7677_example_verifies_and_gives_the_client_key() {
        // RFC 7677 §3's exchange, with its salt and nonces, checked end to end.
        let v = ScramVerifier {
            salt: "W22ZaJ0SNY7soEsUEjb6gQ==".into(),
            iterations: 4096,
            ..ScramVerifier::from_password(
                b"pencil",
                &B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
                4096,
            )
        };
        let first = ClientFirst::parse(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO").unwrap();
        let mut sf = first.challenge(Some(v), b"");
        // Pin the server nonce to the RFC's.
        sf.nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into();
        sf.message = format!("r={},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", sf.nonce);
        let v = sf
            .finish(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(
            v.server_final,
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
        let expected = super::super::kdf::scram_client_key(
            b"pencil",
            &B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            4096,
        );
        assert_eq!(&v.client_key[..], &expected[..]);
    }

    #[test]
    fn right_password_passes_wrong_password_and_unknown_user_fail_alike() {
        for (password, known, ok) in [
            ("pw", true, true),
            ("nope", true, false),
            ("pw", false, false),
        ] {
            let bare = "n=bob,r=abcdefgh";
            let first = ClientFirst::parse(format!("n,,{bare}").as_bytes()).unwrap();
            assert_eq!(first.username, "bob");
            let sf = first.challenge(known.then(|| verifier("pw")), b"decoy-salt-bytes");
            assert!(sf.message().starts_with("r=abcdefgh") && sf.message().contains(",i=4096"));
            let (fin, expected_v) = client_final(password, bare, sf.message(), "n,,");
            let r = sf.finish(fin.as_bytes());
            match ok {
                true => assert_eq!(r.unwrap().server_final, expected_v),
                false => assert_eq!(r.err(), Some(ScramError::Proof)),
            }
        }
    }

    #[test]
    fn malformed_and_hostile_messages_are_refused() {
        assert_eq!(
            ClientFirst::parse(b"p=tls-unique,,n=bob,r=x").err(),
            Some(ScramError::ChannelBinding)
        );
        assert_eq!(
            ClientFirst::parse(b"n,a=alice,n=bob,r=x").err(),
            Some(ScramError::Authzid)
        );
        assert!(ClientFirst::parse(b"n,,r=x").is_err());
        assert!(ClientFirst::parse(b"n=bob,r=x").is_err());
        assert!(ClientFirst::parse(b"n,,n=b=ZZob,r=x").is_err());
        assert_eq!(
            ClientFirst::parse(b"n,,n=a=2Cb=3Dc,r=x").unwrap().username,
            "a,b=c"
        );
        // A replayed or altered nonce.
        let bare = "n=bob,r=abc";
        let sf = ClientFirst::parse(b"n,,n=bob,r=abc")
            .unwrap()
            .challenge(Some(verifier("pw")), b"");
        let (fin, _) = client_final("pw", bare, sf.message(), "n,,");
        let tampered = fin.replacen("r=abc", "r=abd", 1);
        assert_eq!(
            sf.finish(tampered.as_bytes()).err(),
            Some(ScramError::Nonce)
        );
        let sf = ClientFirst::parse(b"n,,n=bob,r=abc")
            .unwrap()
            .challenge(Some(verifier("pw")), b"");
        assert!(sf.finish(b"c=biws,r=abc").is_err());
    }
}
