//! TLS for the listeners: a certificate chain and key read from PEM files (as cert-manager and
//! Kubernetes Secrets write them), checked again periodically and swapped in when the files
//! change. A renewal never needs a restart; a broken renewal keeps the old certificate serving
//! and logs why.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: not a PEM certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the key does not fit the certificate, or is of an unsupported kind: {0}")]
    Mismatch(rustls::Error),
}

/// Where the certificate chain and its key are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first (`tls.crt` of a Kubernetes TLS Secret).
    pub cert: PathBuf,
    /// PEM private key (`tls.key`).
    pub key: PathBuf,
}

/// The current server TLS configuration, replaced when the files change.
pub struct TlsProvider {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    digest: Mutex<[u8; 32]>,
}

impl std::fmt::Debug for TlsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsProvider")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

async fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|error| TlsError::Read {
        path: path.clone(),
        error,
    })
}

fn digest(cert: &[u8], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update((cert.len() as u64).to_be_bytes());
    h.update(cert);
    h.update(key);
    h.finalize().into()
}

/// Builds a rustls server config from PEM bytes.
pub fn server_config(
    files: &TlsFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    // ring explicitly: the build also links aws-lc-rs (through the AWS SDK), and with two
    // providers rustls will not pick one by itself.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Mismatch)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Mismatch)
}

impl TlsProvider {
    /// Reads and checks the files now: a server does not start with a certificate it cannot use.
    pub async fn load(files: TlsFiles) -> Result<Arc<TlsProvider>, TlsError> {
        let cert = read(&files.cert).await?;
        let key = read(&files.key).await?;
        let config = server_config(&files, &cert, &key)?;
        Ok(Arc::new(TlsProvider {
            digest: Mutex::new(digest(&cert, &key)),
            current: RwLock::new(Arc::new(config)),
            files,
        }))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the certificate current at this moment.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        TlsAcceptor::from(config)
    }

    /// Reads the files again; swaps the configuration in when they changed and are usable.
    /// Returns whether it swapped. Comparing contents (not mtimes) sees Kubernetes' atomic
    /// symlink swaps and copies that keep the mtime alike.
    pub async fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let cert = read(&self.files.cert).await?;
        let key = read(&self.files.key).await?;
        let d = digest(&cert, &key);
        if self.digest.lock().map(|g| *g == d).unwrap_or(false) {
            return Ok(false);
        }
        let config = server_config(&self.files, &cert, &key)?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::new(config),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(config),
        }
        if let Ok(mut g) = self.digest.lock() {
            *g = d;
        }
        Ok(true)
    }

    /// Checks the files every `every` until the provider is dropped everywhere else.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(provider) = weak.upgrade() else {
                    return;
                };
                match provider.reload_if_changed().await {
                    Ok(true) => {
                        tracing::info!(cert = %provider.files.cert.display(), "TLS certificate reloaded")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays in use")
                    }
                }
            }
        })
    }
}
