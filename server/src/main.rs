//! The `tern` binary: `tern serve` runs a production server from `tern.yaml`; `tern dev` runs a
//! complete single-node server for trying Tern out; `tern check-config` and
//! `tern check-storage` check files before they are used.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use tern_server::config::{Config, ListenTls};
use tern_server::crypto::{Argon2Params, UserSecrets};
use tern_server::imap::{ImapConfig, ImapServer, Listen};
use tern_server::lmtp::{LmtpConfig, LmtpServer};
use tern_server::mail::account::Accounts;
use tern_server::net::TlsProvider;
use tern_server::storage::{StorageConfig, Store};
use tern_server::users::{User, UserDirectory, UserId, YamlDirectory};
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
    /// Run the server from a configuration file (Garage backend, TLS): see docs/config.md.
    ///
    /// Listens for IMAP (STARTTLS on 1143 and implicit TLS on 1993 by default). The file is
    /// checked first; a certificate or storage that cannot be used stops the start with the
    /// reason. The certificate files are re-read periodically, so a renewal needs no restart.
    /// SIGTERM or Ctrl-C stops accepting connections and exits.
    Serve {
        /// Path of tern.yaml.
        #[arg(long, short, value_name = "FILE", default_value = "tern.yaml")]
        config: PathBuf,
    },
    /// Check a tern.yaml without starting anything that listens: syntax, values, the
    /// certificate and key. Says what is wrong and where (line, or field path).
    CheckConfig {
        /// Path of tern.yaml.
        #[arg(value_name = "FILE", default_value = "tern.yaml")]
        config: PathBuf,
    },
    /// Run Tern on this machine to try it out: embedded store, IMAP on 127.0.0.1:1143, LMTP on
    /// 127.0.0.1:2424.
    ///
    /// Mail and users are kept in the data directory (`./tern-data` by default): the users in
    /// `users.yaml`, the encrypted mailboxes in `store/`. A restart keeps all mail. When the
    /// directory has no user yet, a demo user is created (`--user`, `--password`, address
    /// NAME@DOMAIN) and its credentials are printed. Plaintext logins are allowed (there is no
    /// TLS in dev mode), so keep the listening address on loopback.
    Dev(DevArgs),
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

#[derive(Args)]
struct DevArgs {
    /// Directory holding the users file and the mail store (created if missing).
    #[arg(long, value_name = "DIR", default_value = "tern-data")]
    data: PathBuf,
    /// Address the IMAP server listens on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1143")]
    imap: SocketAddr,
    /// Address the LMTP server listens on (port 0 picks a free port). Deliveries to
    /// NAME@DOMAIN land in that user's INBOX.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:2424")]
    lmtp: SocketAddr,
    /// Login name of the demo user, created if it does not exist yet [default: demo, when the
    /// directory has no user].
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Password of a user created now (a random one is generated and printed if not given).
    #[arg(
        long,
        value_name = "PASS",
        env = "TERN_DEV_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// Mail domain of a user created now: its address is NAME@DOMAIN.
    #[arg(long, value_name = "DOMAIN", default_value = "localhost")]
    domain: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::Dev(args) => dev(args).await,
        Command::Serve { config } => serve(&config).await,
        Command::CheckConfig { config } => check_config(&config).await,
        Command::CheckStorage { config } => check_storage(&config).await,
    }
}

fn generated_password() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..16)
        .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
        .collect()
}

/// Creates the user `name` unless it exists; returns the password to print when it was
/// generated here.
async fn ensure_user(
    users: &YamlDirectory,
    name: &str,
    password: Option<String>,
    domain: &str,
) -> anyhow::Result<()> {
    if users.user(name).await?.is_some() {
        println!("tern dev: user {name} exists (log in with the password it was created with)");
        return Ok(());
    }
    let generated = password.is_none();
    let password = password.unwrap_or_else(generated_password);
    let pw = password.clone();
    let (keys, _, _) = tokio::task::spawn_blocking(move || {
        UserSecrets::create(&pw, Argon2Params::default(), false)
    })
    .await
    .context("creating the user's keys")??;
    let address = format!("{name}@{domain}").to_lowercase();
    users
        .put(
            User {
                name: name.to_string(),
                id: UserId::generate(),
                addresses: vec![address.clone()],
                quota_bytes: None,
                keys,
            },
            false,
        )
        .await
        .with_context(|| format!("adding user {name}"))?;
    println!("tern dev: created user {name} <{address}>");
    if generated {
        println!("tern dev: password for {name}: {password}");
    }
    Ok(())
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(&args.data)
        .await
        .with_context(|| format!("creating {}", args.data.display()))?;
    let users = YamlDirectory::open(args.data.join("users.yaml"))
        .await
        .context("opening the users file")?;
    let existing = users.list().await?;
    match (&args.user, existing.is_empty()) {
        (Some(name), _) => ensure_user(&users, name, args.password, &args.domain).await?,
        (None, true) => ensure_user(&users, "demo", args.password, &args.domain).await?,
        (None, false) => {
            let names: Vec<&str> = existing.iter().map(|u| u.name.as_str()).collect();
            println!("tern dev: users: {}", names.join(", "));
        }
    }
    let store = Store::open(&StorageConfig::Local {
        path: args.data.join("store"),
    })
    .await
    .context("opening the local store")?;
    let accounts = Accounts::new(store, Arc::new(users));
    let config = ImapConfig {
        allow_plaintext: true,
        ..ImapConfig::default()
    };
    let listener = tokio::net::TcpListener::bind(args.imap)
        .await
        .with_context(|| format!("listening on {}", args.imap))?;
    let addr = listener.local_addr()?;
    let lmtp_listener = tokio::net::TcpListener::bind(args.lmtp)
        .await
        .with_context(|| format!("listening on {}", args.lmtp))?;
    let lmtp_addr = lmtp_listener.local_addr()?;
    println!("tern dev: data in {}", display_dir(&args.data));
    println!("tern dev: IMAP listening on {addr} (plaintext logins allowed: dev mode)");
    println!(
        "tern dev: LMTP listening on {lmtp_addr} (deliver to NAME@{})",
        args.domain
    );
    tracing::info!(%addr, %lmtp_addr, "IMAP and LMTP servers started");
    let imap = ImapServer::new(config, accounts.clone());
    let lmtp = LmtpServer::new(
        LmtpConfig {
            hostname: "localhost".into(),
            ..LmtpConfig::default()
        },
        accounts,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let both = async {
        tokio::try_join!(
            imap.serve(listener, stopped(stop_rx.clone())),
            lmtp.serve(lmtp_listener, stopped(stop_rx.clone())),
        )
    };
    tokio::pin!(both);
    tokio::select! {
        _ = shutdown_signal() => {
            let _ = stop_tx.send(true);
            both.await?;
        }
        r = &mut both => { r?; }
    }
    println!("tern dev: stopped");
    Ok(())
}

/// Reads and checks the file: syntax with its line, then every unusable value with its path.
async fn load_config(path: &Path) -> anyhow::Result<Config> {
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("reading {}", path.display()))?;
    Config::parse_and_check(&text).with_context(|| format!("{} is not usable", path.display()))
}

async fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path).await?;
    if let Some(tls) = &config.tls {
        TlsProvider::load(tls.files.clone())
            .await
            .context("tls: the certificate cannot be used")?;
    }
    let listeners = config.imap.listeners(config.tls.is_some());
    println!("{}: OK", path.display());
    for l in listeners {
        println!("  imap {} ({:?})", l.addr, l.tls);
    }
    Ok(())
}

async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path).await?;
    let tls = match &config.tls {
        Some(t) => {
            let provider = TlsProvider::load(t.files.clone())
                .await
                .context("tls: the certificate cannot be used")?;
            provider.spawn_reloader(std::time::Duration::from_secs(t.reload_secs));
            Some(provider)
        }
        None => None,
    };
    let store = Store::open(&config.storage)
        .await
        .context("opening the store")?;
    let users = YamlDirectory::open(&config.users.file)
        .await
        .with_context(|| format!("opening the users file {}", config.users.file.display()))?;
    let accounts = Accounts::new(store, Arc::new(users));
    let server = Arc::new(ImapServer::with_tls(
        config.imap.runtime(),
        accounts.clone(),
        tls.clone(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for l in config.imap.listeners(tls.is_some()) {
        let listener = tokio::net::TcpListener::bind(l.addr)
            .await
            .with_context(|| format!("imap: listening on {}", l.addr))?;
        let listen = match l.tls {
            ListenTls::Starttls => Listen::Plain,
            ListenTls::Implicit => Listen::ImplicitTls,
        };
        tracing::info!(addr = %listener.local_addr()?, tls = ?l.tls, "IMAP listening");
        let server = server.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            server.serve_on(listener, listen, stopped).await
        });
    }
    if config.lmtp.enabled {
        let listener = tokio::net::TcpListener::bind(config.lmtp.listen)
            .await
            .with_context(|| format!("lmtp: listening on {}", config.lmtp.listen))?;
        tracing::info!(addr = %listener.local_addr()?, "LMTP listening");
        let lmtp = LmtpServer::new(config.lmtp.runtime(), accounts.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            lmtp.serve(listener, stopped).await
        });
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        Some(done) = tasks.join_next() => {
            // A listener ended on its own: that is an error worth stopping for.
            done.context("listener task")?.context("listener")?;
        }
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    tracing::info!("stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            None
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

fn display_dir(dir: &Path) -> String {
    std::fs::canonicalize(dir)
        .unwrap_or_else(|_| dir.to_path_buf())
        .display()
        .to_string()
}

async fn check_storage(config: &Path) -> anyhow::Result<()> {
    let text = tokio::fs::read_to_string(config)
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
