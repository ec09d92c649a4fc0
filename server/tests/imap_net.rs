//! IMAP transport over real sockets: STARTTLS and implicit TLS (Python's imaplib with
//! certificate and host name checks, and a rustls client), certificate reload, the STARTTLS
//! injection rule, PROXY protocol v2, connection limits and the failed-login throttle.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tern_server::imap::{ImapConfig, ImapServer, Listen};
use tern_server::mail::account::Accounts;
use tern_server::net::throttle::ThrottleConfig;
use tern_server::net::{ProxyPolicy, TlsFiles, TlsProvider};
use tern_server::testing;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn say(message: &str) {
    let _ = writeln!(std::io::stderr().lock(), "[imap_net] {message}");
}

struct Env {
    dir: tempfile::TempDir,
    accounts: Arc<Accounts>,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = testing::local_store(dir.path()).await.unwrap();
    let people = ["bob", "carol"]
        .map(|name| testing::user(name, "pw", &format!("{name}@localhost"), None).unwrap());
    let users = testing::users_file(&dir.path().join("users.yaml"), people.into())
        .await
        .unwrap();
    Env {
        accounts: Accounts::new(store, Arc::new(users)),
        dir,
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files.
fn certificate(dir: &Path, name: &str) -> (TlsFiles, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = ck.cert.pem();
    let files = TlsFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, &cert_pem).unwrap();
    std::fs::write(&files.key, ck.signing_key.serialize_pem()).unwrap();
    (files, cert_pem)
}

struct Running {
    plain: SocketAddr,
    implicit: Option<SocketAddr>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for s in self.stop.drain(..) {
            let _ = s.send(());
        }
    }
}

async fn start(env: &Env, config: ImapConfig, tls: Option<Arc<TlsProvider>>) -> Running {
    let server = Arc::new(ImapServer::with_tls(
        config,
        env.accounts.clone(),
        tls.clone(),
    ));
    let mut listens = vec![Listen::Plain];
    if tls.is_some() {
        listens.push(Listen::ImplicitTls);
    }
    let mut addrs = Vec::new();
    let mut stop = Vec::new();
    for listen in listens {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        stop.push(tx);
        let server = server.clone();
        tokio::spawn(async move {
            server
                .serve_on(listener, listen, async {
                    let _ = rx.await;
                })
                .await
        });
    }
    Running {
        plain: addrs[0],
        implicit: addrs.get(1).copied(),
        stop,
    }
}

fn quick() -> ImapConfig {
    ImapConfig {
        throttle: ThrottleConfig {
            base_delay_ms: 0,
            ..ThrottleConfig::default()
        },
        ..ImapConfig::default()
    }
}

/// Reads lines until one starts with `tag ` (or the untagged greeting with `*`).
async fn until<S: AsyncRead + Unpin>(r: &mut BufReader<S>, tag: &str) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("server answered in time")
            .unwrap();
        assert!(n > 0, "connection closed; got so far:\n{all}");
        all.push_str(&line);
        if line.starts_with(&format!("{tag} ")) {
            return all;
        }
    }
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(r: &mut BufReader<S>, line: &str) {
    r.get_mut().write_all(line.as_bytes()).await.unwrap();
}

fn client_config(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

use rustls_pki_types::pem::PemObject;

async fn tls_connect(
    addr: SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(ca_pem));
    connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
}

#[tokio::test]
async fn imaplib_logs_in_over_starttls_and_implicit_tls_with_checked_certificates() {
    let found = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "python3 not found: tests/run installs it");
    let env = env().await;
    let (files, _) = certificate(env.dir.path(), "server");
    let tls = TlsProvider::load(files.clone()).await.unwrap();
    let running = start(&env, quick(), Some(tls)).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/imap_tls.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--plain-port", &running.plain.port().to_string()])
        .args(["--tls-port", &running.implicit.unwrap().port().to_string()])
        .arg("--ca")
        .arg(&files.cert)
        .args(["--user", "bob", "--password", "pw"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "imap_tls.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    say(stdout.trim());
}

#[tokio::test]
async fn commands_pipelined_after_starttls_are_discarded() {
    let env = env().await;
    let (files, ca) = certificate(env.dir.path(), "server");
    let tls = TlsProvider::load(files).await.unwrap();
    let running = start(&env, quick(), Some(tls)).await;
    let mut r = BufReader::new(TcpStream::connect(running.plain).await.unwrap());
    let greeting = until(&mut r, "*").await;
    assert!(
        greeting.contains("STARTTLS") && greeting.contains("LOGINDISABLED"),
        "{greeting}"
    );
    send(&mut r, "a LOGIN bob pw\r\n").await;
    let login = until(&mut r, "a").await;
    assert!(login.starts_with("a NO [PRIVACYREQUIRED]"), "{login}");
    // An attacker in the middle appends a command to the plaintext STARTTLS.
    send(&mut r, "b STARTTLS\r\nevil LOGOUT\r\n").await;
    let ok = until(&mut r, "b").await;
    assert!(ok.starts_with("b OK"), "{ok}");
    let tcp = r.into_inner();
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca));
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut r = BufReader::new(tls);
    send(&mut r, "c CAPABILITY\r\n").await;
    let caps = until(&mut r, "c").await;
    assert!(!caps.contains("evil"), "the injected command ran: {caps}");
    assert!(
        caps.contains("AUTH=PLAIN")
            && !caps.contains("STARTTLS")
            && !caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    send(&mut r, "d STARTTLS\r\n").await;
    assert!(until(&mut r, "d").await.starts_with("d BAD"));
    send(&mut r, "e LOGIN bob pw\r\n").await;
    let login = until(&mut r, "e").await;
    assert!(login.starts_with("e OK"), "{login}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let env = env().await;
    let (files, ca_a) = certificate(env.dir.path(), "live");
    let tls = TlsProvider::load(files.clone()).await.unwrap();
    let running = start(&env, quick(), Some(tls.clone())).await;
    let addr = running.implicit.unwrap();
    let conn = tls_connect(addr, &ca_a).await.unwrap();
    drop(conn);
    assert!(
        !tls.reload_if_changed().await.unwrap(),
        "nothing changed yet"
    );

    // A broken renewal (key of another certificate) keeps the old one serving.
    let (other, ca_b) = certificate(env.dir.path(), "next");
    std::fs::copy(&other.key, &files.key).unwrap();
    let err = tls.reload_if_changed().await.unwrap_err();
    say(&format!("broken renewal refused: {err}"));
    tls_connect(addr, &ca_a).await.unwrap();

    // The whole renewal lands: new connections get the new certificate.
    std::fs::copy(&other.cert, &files.cert).unwrap();
    assert!(tls.reload_if_changed().await.unwrap());
    assert!(
        tls_connect(addr, &ca_a).await.is_err(),
        "the old certificate is still served"
    );
    let mut r = BufReader::new(tls_connect(addr, &ca_b).await.unwrap());
    assert!(until(&mut r, "*").await.contains("OK"));
}

/// A PROXY v2 header naming `source` as the client.
fn proxy_header(source: &str) -> Vec<u8> {
    let source: SocketAddr = source.parse().unwrap();
    let dest: SocketAddr = "127.0.0.1:1143".parse().unwrap();
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // v2, PROXY
    h.push(0x11); // TCP over IPv4
    h.extend_from_slice(&12u16.to_be_bytes());
    match (source.ip(), dest.ip()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
        }
        _ => unreachable!(),
    }
    h.extend_from_slice(&source.port().to_be_bytes());
    h.extend_from_slice(&dest.port().to_be_bytes());
    h
}

async fn via_proxy(addr: SocketAddr, source: &str) -> BufReader<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&proxy_header(source)).await.unwrap();
    let mut r = BufReader::new(tcp);
    until(&mut r, "*").await;
    r
}

#[tokio::test]
async fn failed_logins_are_throttled_per_real_client_address_and_per_user() {
    let env = env().await;
    let config = ImapConfig {
        allow_plaintext: true,
        proxy: ProxyPolicy {
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
        },
        throttle: ThrottleConfig {
            max_failures_per_address: 3,
            max_failures_per_user: 4,
            window_secs: 600,
            base_delay_ms: 0,
            max_delay_ms: 0,
        },
        ..ImapConfig::default()
    };
    let running = start(&env, config, None).await;
    // A trusted peer that sends no header is dropped.
    let mut bare = BufReader::new(TcpStream::connect(running.plain).await.unwrap());
    bare.get_mut().write_all(b"a CAPABILITY\r\n").await.unwrap();
    let mut line = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), bare.read_line(&mut line))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "no header from a trusted proxy: closed, got {line:?}");

    // Three failures from one client (through the proxy) block that client...
    let mut c = via_proxy(running.plain, "203.0.113.9:40000").await;
    for (i, user) in ["bob", "carol", "mallory"].iter().enumerate() {
        send(&mut c, &format!("f{i} LOGIN {user} wrong\r\n")).await;
        let r = until(&mut c, &format!("f{i}")).await;
        assert!(r.contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    }
    send(&mut c, "g LOGIN bob pw\r\n").await;
    let r = until(&mut c, "g").await;
    assert!(r.starts_with("g NO [UNAVAILABLE]"), "{r}");
    let mut again = via_proxy(running.plain, "203.0.113.9:40001").await;
    send(&mut again, "h LOGIN carol pw\r\n").await;
    assert!(
        until(&mut again, "h")
            .await
            .starts_with("h NO [UNAVAILABLE]")
    );

    // ... but not another client behind the same proxy.
    let mut other = via_proxy(running.plain, "198.51.100.4:40000").await;
    send(&mut other, "i LOGIN carol pw\r\n").await;
    assert!(until(&mut other, "i").await.starts_with("i OK"));

    // Four failures for bob from different clients lock bob, not carol.
    for i in 0..3 {
        let mut c = via_proxy(running.plain, &format!("192.0.2.{}:1", 10 + i)).await;
        send(&mut c, "j LOGIN bob wrong\r\n").await;
        assert!(until(&mut c, "j").await.contains("AUTHENTICATIONFAILED"));
    }
    let mut c = via_proxy(running.plain, "192.0.2.50:1").await;
    send(&mut c, "k LOGIN bob pw\r\n").await;
    let r = until(&mut c, "k").await;
    assert!(r.starts_with("k NO [UNAVAILABLE]"), "bob is locked: {r}");
    send(&mut c, "l LOGIN carol pw\r\n").await;
    assert!(until(&mut c, "l").await.starts_with("l OK"));
}

#[tokio::test]
async fn connection_limits_answer_with_a_reason() {
    let env = env().await;
    let config = ImapConfig {
        allow_plaintext: true,
        max_connections_per_address: 2,
        max_connections_per_user: 1,
        ..quick()
    };
    let running = start(&env, config, None).await;
    let mut a = BufReader::new(TcpStream::connect(running.plain).await.unwrap());
    until(&mut a, "*").await;
    let mut b = BufReader::new(TcpStream::connect(running.plain).await.unwrap());
    until(&mut b, "*").await;
    let mut c = BufReader::new(TcpStream::connect(running.plain).await.unwrap());
    let bye = until(&mut c, "*").await;
    assert!(
        bye.starts_with("* BYE [LIMIT]") && bye.contains("too many connections from 127.0.0.1"),
        "{bye}"
    );

    send(&mut a, "a LOGIN bob pw\r\n").await;
    assert!(until(&mut a, "a").await.contains("a OK"));
    send(&mut b, "b LOGIN bob pw\r\n").await;
    let r = until(&mut b, "b").await;
    assert!(
        r.starts_with("b NO [LIMIT]") && r.contains("user bob"),
        "{r}"
    );
    send(&mut b, "c LOGIN carol pw\r\n").await;
    assert!(until(&mut b, "c").await.contains("c OK"));

    // A closed connection gives its slots back.
    send(&mut a, "z LOGOUT\r\n").await;
    until(&mut a, "z").await;
    drop(a);
    let mut d = None;
    for _ in 0..50 {
        let mut s = BufReader::new(TcpStream::connect(running.plain).await.unwrap());
        let g = until(&mut s, "*").await;
        if g.starts_with("* OK") {
            d = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut d = d.expect("the address slot came back");
    send(&mut d, "e LOGIN bob pw\r\n").await;
    assert!(until(&mut d, "e").await.contains("e OK"));
}

/// `tern check-config` and `tern serve --config` as an operator runs them: the binary, a
/// tern.yaml with TLS on the local store, imaplib over STARTTLS, implicit TLS and SCRAM, and
/// SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_serve_runs_from_a_config_file() {
    use std::io::BufRead;
    let env = env().await;
    let (files, _) = certificate(env.dir.path(), "server");
    let config = env.dir.path().join("tern.yaml");
    let yaml = format!(
        "storage: {{backend: local, path: '{store}'}}\n\
         users: {{file: '{users}'}}\n\
         tls: {{cert: '{cert}', key: '{key}'}}\n\
         imap:\n  listen:\n    - {{addr: '127.0.0.1:0', tls: starttls}}\n    - {{addr: '127.0.0.1:0', tls: implicit}}\n\
         lmtp: {{listen: '127.0.0.1:0'}}\n",
        store = env.dir.path().join("store2").display(),
        users = env.dir.path().join("users.yaml").display(),
        cert = files.cert.display(),
        key = files.key.display(),
    );
    std::fs::write(&config, yaml).unwrap();
    let bin = env!("CARGO_BIN_EXE_tern");

    let check = std::process::Command::new(bin)
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && said.contains(": OK"),
        "{said}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let broken = env.dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "storage: {backend: local, path: /x}\nusers: {file: /u}\nimap:\n  listen:\n    - {addr: '127.0.0.1:0', tls: implicit}\n",
    )
    .unwrap();
    let check = std::process::Command::new(bin)
        .arg("check-config")
        .arg(&broken)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success() && said.contains("imap.listen[0].tls: implicit TLS needs"),
        "{said}"
    );

    let mut child = std::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let (mut plain, mut implicit) = (None, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while plain.is_none() || implicit.is_none() {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("tern serve logged its listeners");
        say(&line);
        if line.contains("IMAP listening") {
            let addr: SocketAddr = line
                .split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap();
            if line.contains("Implicit") {
                implicit = Some(addr);
            } else {
                plain = Some(addr);
            }
        }
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/python/imap_tls.py");
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["--plain-port", &plain.unwrap().port().to_string()])
        .args(["--tls-port", &implicit.unwrap().port().to_string()])
        .arg("--ca")
        .arg(&files.cert)
        .args(["--user", "bob", "--password", "pw"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "imap_tls.py against tern serve failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "tern serve exited with {status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
