//! The `tern` binary. `tern dev` and `tern serve` arrive with the IMAP and LMTP layers; today it
//! can check that a storage configuration opens.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tern_server::storage::{StorageConfig, Store};
use tracing_subscriber::EnvFilter;

/// Tern: a mail server (IMAP + LMTP) whose state lives in Garage, built to survive a lost region.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open a storage backend and check it answers: credentials, bucket, a row and a blob round trip.
    ///
    /// The file is YAML, either `backend: local` with `path: DIR`, or `backend: garage` with
    /// `s3_endpoint`, `k2v_endpoint`, `bucket`, `access_key_id`, `secret_access_key` (and
    /// optionally `region`, `connect_timeout_ms`, `request_timeout_ms`, `max_retries`).
    CheckStorage {
        /// Path of the storage YAML file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckStorage { config } => {
            let text = tokio::fs::read_to_string(&config)
                .await
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg: StorageConfig = serde_yaml::from_str(&text)
                .with_context(|| format!("{} is not a valid storage config", config.display()))?;
            let store = Store::open(&cfg).await.context("opening the store")?;
            let probe = format!("check-storage/{:016x}", rand::random::<u64>());
            store
                .rows
                .insert_item("tern-check", &probe, None, b"ok".to_vec())
                .await?;
            let item = store
                .rows
                .read_item("tern-check", &probe)
                .await?
                .context("a row just written cannot be read back")?;
            store
                .rows
                .delete_item("tern-check", &probe, &item.token)
                .await?;
            store
                .blobs
                .put_bytes(&probe, bytes::Bytes::from_static(b"ok"))
                .await?;
            let back = store.blobs.get_bytes(&probe).await?;
            store.blobs.delete(&probe).await?;
            anyhow::ensure!(
                back.as_ref() == b"ok",
                "a blob just written reads back differently"
            );
            println!("storage OK: rows and blobs round-trip");
            Ok(())
        }
    }
}
