//! Which backend to open, and how. Deserialised from `tern.yaml` (#5) and built by tests.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum StorageConfig {
    /// The embedded single-node store: rows and blobs in a directory.
    Local { path: PathBuf },
    /// A Garage cluster through its K2V and S3 APIs.
    Garage(GarageConfig),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GarageConfig {
    /// e.g. `http://127.0.0.1:3900`
    pub s3_endpoint: String,
    /// e.g. `http://127.0.0.1:3904`
    pub k2v_endpoint: String,
    /// Garage's `s3_region` (SigV4 region for both APIs).
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// TCP connect timeout.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Whole-request timeout for calls that do not wait by design (polls add their own wait).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Retries of idempotent calls on transient errors (exponential backoff from 50 ms).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_region() -> String {
    "garage".into()
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}
fn default_request_timeout_ms() -> u64 {
    10_000
}
fn default_max_retries() -> u32 {
    3
}

impl GarageConfig {
    /// A config with default timeouts and retries.
    pub fn new(
        s3_endpoint: impl Into<String>,
        k2v_endpoint: impl Into<String>,
        bucket: impl Into<String>,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        GarageConfig {
            s3_endpoint: s3_endpoint.into(),
            k2v_endpoint: k2v_endpoint.into(),
            region: default_region(),
            bucket: bucket.into(),
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            connect_timeout_ms: default_connect_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            max_retries: default_max_retries(),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
