//! The Garage backend: rows in K2V (signed HTTP, `k2v.rs`), blobs in S3 (`aws-sdk-s3`, `s3.rs`).
//!
//! [`connect`] builds one K2V HTTP client and one S3 client for the whole process and checks, at
//! start, that both APIs answer for the configured key and bucket — so a wrong secret, bucket or
//! endpoint stops the server with an error naming it, not the first mail delivery.
//!
//! Every call has a deadline (`request_timeout_ms`; polls add their own wait), transient failures
//! of calls that are safe to repeat are retried (`retry.rs`), and every answer becomes a typed
//! [`StorageError`](crate::storage::StorageError) (`errors.rs`).

mod errors;
mod k2v;
mod retry;
mod s3;
mod sign;

pub use k2v::GarageRows;
pub use s3::GarageBlobs;

use crate::storage::config::GarageConfig;
use crate::storage::error::{Result, StorageError};

/// `scheme://host[:port]` of an endpoint, or why it is not one Garage can be reached at.
fn origin(what: &str, endpoint: &str) -> Result<String> {
    let url = reqwest::Url::parse(endpoint.trim())
        .map_err(|e| StorageError::Invalid(format!("{what} endpoint {endpoint:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(StorageError::Invalid(format!(
            "{what} endpoint {endpoint:?}: scheme must be http or https"
        )));
    }
    // Garage reads the bucket from the first path segment: a path prefix (a proxy mount) would
    // be taken for the bucket.
    if url.path() != "/" || url.query().is_some() {
        return Err(StorageError::Invalid(format!(
            "{what} endpoint {endpoint:?}: must not have a path or query"
        )));
    }
    if url.host_str().is_none() {
        return Err(StorageError::Invalid(format!(
            "{what} endpoint {endpoint:?}: no host"
        )));
    }
    Ok(url.origin().ascii_serialization())
}

/// Opens the Garage backend and checks that the K2V and S3 APIs accept the key for the bucket.
///
/// Errors: [`StorageError::BadCredentials`] for an unknown key or wrong secret,
/// [`StorageError::NoSuchBucket`] for a missing bucket or one the key may not use,
/// [`StorageError::Unreachable`] / [`StorageError::Timeout`] when an endpoint does not answer,
/// [`StorageError::Quorum`] when Garage answers but lacks nodes.
pub async fn connect(cfg: &GarageConfig) -> Result<(GarageRows, GarageBlobs)> {
    if cfg.bucket.is_empty() {
        return Err(StorageError::Invalid("no bucket configured".into()));
    }
    if cfg.access_key_id.is_empty() || cfg.secret_access_key.is_empty() {
        return Err(StorageError::BadCredentials {
            key_id: cfg.access_key_id.clone(),
            detail: "access key id or secret key is empty".into(),
        });
    }
    let k2v_endpoint = origin("K2V", &cfg.k2v_endpoint)?;
    let s3_endpoint = origin("S3", &cfg.s3_endpoint)?;
    let rows = GarageRows::new(cfg, k2v_endpoint.clone())?;
    let blobs = GarageBlobs::new(cfg, s3_endpoint.clone());
    rows.check().await?;
    blobs.check().await?;
    tracing::info!(
        k2v = %k2v_endpoint,
        s3 = %s3_endpoint,
        bucket = %cfg.bucket,
        key = %cfg.access_key_id,
        "connected to Garage"
    );
    Ok((rows, blobs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_reduced_to_their_origin() {
        assert_eq!(
            origin("K2V", "http://127.0.0.1:3904").unwrap(),
            "http://127.0.0.1:3904"
        );
        assert_eq!(
            origin("K2V", "http://127.0.0.1:3904/").unwrap(),
            "http://127.0.0.1:3904"
        );
        assert_eq!(
            origin("S3", "https://garage.example.org").unwrap(),
            "https://garage.example.org"
        );
        assert_eq!(
            origin("S3", "http://[::1]:3900").unwrap(),
            "http://[::1]:3900"
        );
        for bad in [
            "127.0.0.1:3900",
            "ftp://h",
            "http://h/prefix",
            "http://h/?x",
            "",
        ] {
            assert!(
                matches!(origin("S3", bad), Err(StorageError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn connect_rejects_bad_config_before_any_network_call() {
        let mut cfg = GarageConfig::new("http://127.0.0.1:1", "http://127.0.0.1:1", "", "k", "s");
        assert!(matches!(connect(&cfg).await, Err(StorageError::Invalid(_))));
        cfg.bucket = "b".into();
        cfg.secret_access_key = String::new();
        assert!(matches!(
            connect(&cfg).await,
            Err(StorageError::BadCredentials { .. })
        ));
    }

    #[tokio::test]
    async fn connect_to_a_closed_port_is_unreachable_quickly() {
        // Port 1 on loopback: nothing listens there, the kernel refuses at once.
        let mut cfg = GarageConfig::new("http://127.0.0.1:1", "http://127.0.0.1:1", "b", "k", "s");
        cfg.max_retries = 1;
        let started = std::time::Instant::now();
        let r = connect(&cfg).await;
        assert!(
            matches!(&r, Err(StorageError::Unreachable { endpoint, .. }) if endpoint == "http://127.0.0.1:1"),
            "{:?}",
            r.err()
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
