//! Two `tern serve` processes over one Garage: what one writes, an IDLE session on the other
//! sees (APPEND, STORE, EXPUNGE) within one watcher round. Each process has its own writer ids,
//! watchers and caches; only Garage connects them.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_server::config::{Config, ImapSection, ListenTls, Listener, LmtpSection, UsersConfig};
use tern_server::storage::StorageConfig;
use tern_server::testing;
use tern_tests::garage::Garage;

fn say(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "[imap_two_processes] {message}");
}

struct Server {
    child: Child,
    imap: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(config: &Path, name: &str) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tern serve");
    // Owned by the guard from here on: killed and reaped on every path.
    let mut server = Server {
        child,
        imap: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let stderr = server.child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let name = name.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            say(&format!("{name}: {line}"));
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("tern serve logs its IMAP listener");
        if line.contains("IMAP listening")
            && let Some(addr) = line
                .split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
        {
            server.imap = addr.parse().expect("listener address");
            return server;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_on_one_server_sees_writes_made_through_another() {
    let garage = Garage::single().await.expect("garage");
    let dir = tempfile::tempdir().unwrap();
    let users_file = dir.path().join("users.yaml");
    let bob = testing::user("bob", "pw", "bob@example.org", None).unwrap();
    testing::users_file(&users_file, vec![bob]).await.unwrap();

    // The file is written from the server's own config types.
    let config = Config {
        storage: StorageConfig::Garage(garage.storage_config()),
        users: UsersConfig { file: users_file },
        tls: None,
        imap: ImapSection {
            listen: vec![Listener {
                addr: "127.0.0.1:0".parse().unwrap(),
                tls: ListenTls::Starttls,
            }],
            allow_plaintext: true,
            ..ImapSection::default()
        },
        lmtp: LmtpSection {
            enabled: false,
            ..LmtpSection::default()
        },
    };
    let path = dir.path().join("tern.yaml");
    std::fs::write(&path, config.to_yaml().unwrap()).unwrap();
    let a = serve(&path, "A");
    let b = serve(&path, "B");

    let script: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/imap_two_servers.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args(["--port-a", &a.imap.port().to_string()])
        .args(["--port-b", &b.imap.port().to_string()])
        .args(["--user", "bob", "--password", "pw"])
        .output()
        .await
        .expect("python3 (tests/run installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "two servers over one Garage:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    say(stdout.trim());
}
