//! SigV4 signing of K2V requests with `aws-sigv4`.
//!
//! Garage checks K2V signatures like AWS checks non-S3 services: the canonical URI is the request
//! path percent-encoded a second time and never normalised (Garage keeps `.`-segments as part of
//! partition keys), and the scope's service name is `k2v` with the S3 region.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    PercentEncodingMode, SignableBody, SignableRequest, SigningSettings, UriPathNormalizationMode,
    sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use sha2::{Digest, Sha256};

use crate::storage::error::{Result, StorageError};

pub(crate) const CONTENT_SHA256: &str = "x-amz-content-sha256";

/// Signs K2V requests for one access key.
pub(crate) struct Signer {
    identity: Identity,
    region: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The identity holds the secret key: never print it.
        f.debug_struct("Signer")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

pub(crate) fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

impl Signer {
    pub(crate) fn new(access_key_id: &str, secret_access_key: &str, region: &str) -> Signer {
        let creds = Credentials::new(access_key_id, secret_access_key, None, None, "tern-config");
        Signer {
            identity: creds.into(),
            region: region.to_string(),
        }
    }

    /// The headers to add to a request so Garage accepts it: `x-amz-date` and `authorization`.
    ///
    /// `url` must be exactly what goes on the wire (already percent-encoded); `headers` are the
    /// headers that get signed and must include `x-amz-content-sha256` = `body_sha256`.
    pub(crate) fn sign_at(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body_sha256: &str,
        time: SystemTime,
    ) -> Result<Vec<(String, String)>> {
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Double;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = v4::SigningParams::builder()
            .identity(&self.identity)
            .region(&self.region)
            .name("k2v")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| StorageError::Invalid(format!("K2V signing parameters: {e}")))?;
        let signable = SignableRequest::new(
            method,
            url,
            headers.iter().copied(),
            SignableBody::Precomputed(body_sha256.to_string()),
        )
        .map_err(|e| StorageError::Invalid(format!("cannot sign K2V request {url}: {e}")))?;
        let (instructions, _signature) = sign(signable, &params.into())
            .map_err(|e| StorageError::Invalid(format!("cannot sign K2V request {url}: {e}")))?
            .into_parts();
        Ok(instructions
            .headers()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect())
    }

    pub(crate) fn sign(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body_sha256: &str,
    ) -> Result<Vec<(String, String)>> {
        self.sign_at(method, url, headers, body_sha256, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn signs_with_k2v_scope_and_content_hash() {
        let signer = Signer::new("GKexample", "secret", "garage");
        let hash = sha256_hex(b"");
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = signer
            .sign_at(
                "GET",
                "http://127.0.0.1:3904/bucket/a%2Fb?sort_key=x%20y",
                &[(CONTENT_SHA256, &hash)],
                &hash,
                time,
            )
            .unwrap();
        let auth = headers
            .iter()
            .find(|(n, _)| n == "authorization")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=GKexample/20231114/garage/k2v/aws4_request"
            ),
            "{auth}"
        );
        assert!(
            auth.contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date"),
            "{auth}"
        );
        assert!(
            headers
                .iter()
                .any(|(n, v)| n == "x-amz-date" && v == "20231114T221320Z")
        );
        assert!(!format!("{signer:?}").contains("secret"));
    }
}
