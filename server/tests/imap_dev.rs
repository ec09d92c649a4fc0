//! IMAP end to end with a real client library: Python's `imaplib` (tests/python/imap_client.py)
//! against the real `tern dev` binary (restart included; an LMTP delivery with `smtplib.LMTP`
//! before the restart is still there, once, after it) and against the IMAP server run
//! in-process on the local store.
//!
//! Needs `python3` (`tests/run` installs it); without it the tests fail and say why.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_server::imap::{ImapConfig, ImapServer};
use tern_server::mail::account::Accounts;
use tern_server::testing;

fn say(message: &str) {
    // Straight to the stderr handle: libtest does not capture it, so CI logs show it.
    let _ = writeln!(std::io::stderr().lock(), "[imap_dev] {message}");
}

fn require_python() {
    let found = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "python3 not found: install it (tests/run does) to run the imaplib end-to-end tests"
    );
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/imap_client.py")
}

/// Runs one scenario of the Python client and fails the test with its output if it fails.
async fn scenario(port: u16, user: &str, password: &str, name: &str, extra: &[&str]) {
    let out = tokio::process::Command::new("python3")
        .arg(script())
        .args([
            "--port",
            &port.to_string(),
            "--user",
            user,
            "--password",
            password,
        ])
        .args(extra)
        .arg(name)
        .output()
        .await
        .expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scenario {name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    say(stdout.trim());
}

/// The `tern` binary cargo built for this test run (same profile and features).
fn tern_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

/// A running `tern dev`.
struct Dev {
    child: Child,
    port: u16,
    lmtp_port: u16,
    log: PathBuf,
}

impl Dev {
    fn start(bin: &Path, data: &Path, log: &Path) -> Dev {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let mut child = Command::new(bin)
            .args([
                "dev",
                "--imap",
                "127.0.0.1:0",
                "--lmtp",
                "127.0.0.1:0",
                "--user",
                "alice",
                "--password",
                "pw",
            ])
            .arg("--data")
            .arg(data)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting tern dev");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port_after = |line: &str, prefix: &str| {
            line.split(prefix).nth(1).map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u16>().expect("port")
            })
        };
        let (mut port, mut lmtp_port) = (None, None);
        let (port, lmtp_port) = loop {
            if let (Some(p), Some(l)) = (port, lmtp_port) {
                break (p, l);
            }
            match lines.next() {
                Some(Ok(line)) => {
                    say(&line);
                    port = port.or(port_after(&line, "IMAP listening on 127.0.0.1:"));
                    lmtp_port = lmtp_port.or(port_after(&line, "LMTP listening on 127.0.0.1:"));
                }
                _ => panic!(
                    "tern dev exited before listening; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                ),
            }
        };
        // Keep reading stdout so that the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Dev {
            child,
            port,
            lmtp_port,
            log: log.to_path_buf(),
        }
    }

    /// SIGTERM, as a service manager would, then wait for the exit.
    fn stop(mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "tern dev exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tern dev did not stop on SIGTERM; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_against_the_tern_dev_binary_and_a_restart() {
    require_python();
    let bin = tokio::task::spawn_blocking(tern_binary).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("tern-data");
    let log = dir.path().join("tern.log");

    let dev = Dev::start(&bin, &data, &log);
    say(&format!(
        "tern dev (pid {}) on port {}",
        dev.child.id(),
        dev.port
    ));
    scenario(dev.port, "alice", "pw", "basic", &[]).await;
    scenario(dev.port, "alice", "pw", "idle", &[]).await;
    scenario(dev.port, "alice", "pw", "two-sessions", &[]).await;
    let lmtp = dev.lmtp_port.to_string();
    scenario(dev.port, "alice", "pw", "lmtp", &["--lmtp-port", &lmtp]).await;
    let wrong = tokio::process::Command::new("python3")
        .arg(script())
        .args([
            "--port",
            &dev.port.to_string(),
            "--user",
            "alice",
            "--password",
            "nope",
            "kept",
        ])
        .output()
        .await
        .unwrap();
    assert!(!wrong.status.success(), "a wrong password must be refused");
    dev.stop();

    // Same data directory, new process: everything is still there.
    let dev = Dev::start(&bin, &data, &log);
    scenario(dev.port, "alice", "pw", "kept", &["--expect", "50"]).await;
    scenario(dev.port, "alice", "pw", "lmtp-kept", &[]).await;
    dev.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_against_the_in_process_server_on_the_local_store() {
    require_python();
    let dir = tempfile::tempdir().unwrap();
    let store = testing::local_store(dir.path()).await.unwrap();
    let bob = testing::user("bob", "pw", "bob@localhost", None).unwrap();
    let users = testing::users_file(&dir.path().join("users.yaml"), vec![bob])
        .await
        .unwrap();
    let accounts = Accounts::new(store, Arc::new(users));
    let server = ImapServer::new(
        ImapConfig {
            allow_plaintext: true,
            ..ImapConfig::default()
        },
        accounts.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        server
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    scenario(port, "bob", "pw", "basic", &[]).await;
    scenario(port, "bob", "pw", "two-sessions", &[]).await;
    scenario(port, "bob", "pw", "idle", &[]).await;
    // Every session has logged out: the account and its mailbox handles are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while accounts.live_accounts() > 0 {
        assert!(
            Instant::now() < deadline,
            "the account outlived its sessions"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    serving.await.unwrap().unwrap();
}
