//! Real Postfix (Debian's package) delivering to Tern over LMTP, end to end: SMTP in with
//! Python's `smtplib`, Postfix hands the mail to Tern's LMTP server, the test reads the INBOX
//! back with Python's `imaplib` (`tests/postfix/mail.py`).
//!
//! Each test runs its own Postfix instance from a temp dir (config, spool, data and log there;
//! `tests/postfix/main.cf` and `master.cf` are the templates) and Tern in-process on the local
//! store, on a runtime of its own so that "stopping Tern" drops every task and socket at once,
//! as the end of a process would.
//!
//! Needs `postfix` and `python3` (`tests/run` installs both) and root (Postfix's master starts
//! as root); without them the tests fail and say why.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tern_server::crypto::{Argon2Params, UserSecrets};
use tern_server::imap::{ImapConfig, ImapServer};
use tern_server::lmtp::{LmtpConfig, LmtpServer};
use tern_server::mail::account::Accounts;
use tern_server::storage::{StorageConfig, Store};
use tern_server::users::{User, UserDirectory, UserId, YamlDirectory};

/// The domain Postfix hands to Tern; every Tern user has an address there.
const DOMAIN: &str = "example.org";
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const PASSWORD: &str = "pw";
/// How long Postfix gets for anything the tests wait for (its retries run every second).
const WAIT: Duration = Duration::from_secs(30);

fn say(message: &str) {
    // Straight to the stderr handle: libtest does not capture it, so CI logs show it.
    let _ = writeln!(std::io::stderr().lock(), "[postfix_lmtp] {message}");
}

fn here(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Postfix's commands live in /usr/sbin, which a non-login PATH may lack.
fn sbin(name: &str) -> PathBuf {
    let path = Path::new("/usr/sbin").join(name);
    if path.exists() {
        path
    } else {
        PathBuf::from(name)
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn require_tools() {
    let postconf = Command::new(sbin("postconf"))
        .args(["-d", "-h", "mail_version"])
        .output();
    match postconf {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "Postfix not found (no working postconf): install Debian's postfix package \
             (tests/run does: it is in DEBIAN_PACKAGES) to run the Postfix end-to-end tests"
        ),
    }
    let python = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(python, "python3 not found: install it (tests/run does)");
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "Postfix's master daemon starts only as root: run the Postfix end-to-end tests as root"
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` until it returns something, or fails the test with `what` and `context()`.
fn wait_for<T>(
    what: &str,
    context: impl Fn() -> String,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Postfix instance of its own: `postfix -c DIR start`, stopped on drop.
struct Postfix {
    config: PathBuf,
    log: PathBuf,
    smtp_port: u16,
    /// Aborts the instance if this test process dies without dropping it (see `start`).
    watchdog: Child,
    /// Last field: removed after the instance has stopped.
    dir: tempfile::TempDir,
}

#[derive(Debug, Deserialize)]
struct QueueEntry {
    queue_name: String,
    queue_id: String,
    recipients: Vec<QueueRecipient>,
}

#[derive(Debug, Deserialize)]
struct QueueRecipient {
    address: String,
    delay_reason: Option<String>,
}

impl Postfix {
    /// Starts an instance that listens for SMTP on a free port of 127.0.0.1 and hands every
    /// address of [`DOMAIN`] to `lmtp:inet:127.0.0.1:<lmtp_port>`.
    fn start(lmtp_port: u16) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("tern-postfix-")
            .tempdir()
            .unwrap();
        // Postfix's daemons drop to the postfix user: they must be able to reach the spool.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("etc");
        let queue = dir.path().join("spool");
        std::fs::create_dir(&config).unwrap();
        // Postfix creates its queue subdirectories, but not the queue directory itself; it
        // creates data_directory (owned by postfix) when missing.
        std::fs::create_dir(&queue).unwrap();
        let log = dir.path().join("maillog");
        let smtp_port = free_port();
        let fill = |name: &str| {
            let template = std::fs::read_to_string(here(&format!("postfix/{name}")))
                .unwrap_or_else(|e| panic!("reading tests/postfix/{name}: {e}"));
            let filled = template
                .replace("@SMTPD_PORT@", &smtp_port.to_string())
                .replace("@CONFIG_DIR@", &config.display().to_string())
                .replace("@QUEUE_DIR@", &queue.display().to_string())
                .replace("@DATA_DIR@", &dir.path().join("data").display().to_string())
                .replace("@LOG_FILE@", &log.display().to_string())
                .replace("@LOG_PREFIX@", &dir.path().display().to_string())
                .replace("@DOMAIN@", DOMAIN)
                .replace("@LMTP_PORT@", &lmtp_port.to_string());
            let unfilled = filled.split('@').any(|part| {
                !part.is_empty() && part.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            });
            assert!(!unfilled, "unfilled placeholder in tests/postfix/{name}");
            std::fs::write(config.join(name), filled).unwrap();
        };
        fill("main.cf");
        fill("master.cf");

        let postfix = |action: &str| {
            run(Command::new(sbin("postfix"))
                .arg("-c")
                .arg(&config)
                .arg(action))
        };
        let check = postfix("check");
        assert!(
            check.status.success(),
            "postfix check failed:\n{}\n{}",
            text(&check),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // Started before Postfix: if this process dies without running Drop (SIGKILL, abort),
        // the end of its stdin makes the watchdog abort the instance and remove its directory.
        // It ignores SIGINT so that a Ctrl-C of `cargo test` still reaches the `read`.
        let watchdog = Command::new("sh")
            .args([
                "-c",
                "trap '' INT; read _; \"$0\" -c \"$1\" abort; rm -rf \"$2\"",
            ])
            .arg(sbin("postfix"))
            .arg(&config)
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting the watchdog shell");
        let started = Instant::now();
        let start = postfix("start");
        let instance = Postfix {
            config,
            log,
            smtp_port,
            watchdog,
            dir,
        };
        assert!(
            start.status.success(),
            "postfix start failed:\n{}\n{}",
            text(&start),
            instance.log()
        );
        wait_for(
            "Postfix's smtpd",
            || instance.log(),
            || std::net::TcpStream::connect(("127.0.0.1", smtp_port)).ok(),
        );
        say(&format!(
            "postfix started in {:?}: smtpd on 127.0.0.1:{smtp_port}, LMTP to 127.0.0.1:{lmtp_port}, config {}",
            started.elapsed(),
            instance.config.display()
        ));
        instance
    }

    fn log(&self) -> String {
        format!(
            "--- Postfix log ({}) ---\n{}",
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// The log lines about one queue id.
    fn lines_of(&self, queue_id: &str) -> Vec<String> {
        let needle = format!(": {queue_id}: ");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the log line saying what became of `queue_id`'s mail to `rcpt` with `status`
    /// (`sent`, `deferred`, `bounced`) and returns it.
    fn wait_status(&self, queue_id: &str, rcpt: &str, status: &str) -> String {
        let to = format!("to=<{rcpt}>");
        let status = format!("status={status} ");
        wait_for(
            &format!("{queue_id}: {to} … {status}in the Postfix log"),
            || self.context(),
            || {
                self.lines_of(queue_id)
                    .into_iter()
                    .find(|l| l.contains(&to) && l.contains(&status))
            },
        )
    }

    /// Waits until the queue manager has finished with `queue_id` (every recipient done).
    fn wait_removed(&self, queue_id: &str) {
        wait_for(
            &format!("{queue_id} to leave the queue"),
            || self.context(),
            || {
                self.lines_of(queue_id)
                    .iter()
                    .any(|l| l.ends_with(&format!("{queue_id}: removed")))
                    .then_some(())
            },
        );
    }

    /// Fails the test if Postfix logged a timeout or a problem of its own: a conversation
    /// with Tern that hangs shows here (main.cf keeps the LMTP timeouts short).
    fn assert_no_trouble(&self) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let trouble: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["timed out", "warning:", "error:", "fatal:", "panic:"]
                    .iter()
                    .any(|t| l.contains(t))
            })
            .collect();
        assert!(
            trouble.is_empty(),
            "Postfix reported:\n{}\n{}",
            trouble.join("\n"),
            self.log()
        );
    }

    /// For a failure: the log, what the queue holds and Postfix's processes (tells a stuck
    /// delivery agent from a log line that never came).
    fn context(&self) -> String {
        let queue = Command::new(sbin("postqueue"))
            .arg("-c")
            .arg(&self.config)
            .arg("-j")
            .output()
            .map(|o| text(&o))
            .unwrap_or_else(|e| e.to_string());
        let processes = Command::new("ps")
            .args(["-eo", "pid,ppid,stat,etimes,wchan:24,args"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter(|l| l.contains(" -u") || l.contains("master"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| e.to_string());
        format!(
            "{}\n--- postqueue -j ---\n{queue}\n--- Postfix processes (all instances) ---\n{processes}",
            self.log()
        )
    }

    /// `postqueue -j`: what the queue holds now.
    fn queue(&self) -> Vec<QueueEntry> {
        let out = run(Command::new(sbin("postqueue"))
            .arg("-c")
            .arg(&self.config)
            .arg("-j"));
        assert!(out.status.success(), "postqueue -j failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("postqueue -j line {l}: {e}"))
            })
            .collect()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let postfix = |action: &str| {
            Command::new(sbin("postfix"))
                .arg("-c")
                .arg(&self.config)
                .arg(action)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        let _ = postfix("stop");
        // `status` fails once the master's lock is released, i.e. the master has exited.
        let deadline = Instant::now() + Duration::from_secs(10);
        while postfix("status").is_ok_and(|s| s.success()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if postfix("status").is_ok_and(|s| s.success()) {
            let _ = postfix("abort");
        }
        // Our own child, by its pid: the instance is down, the watchdog has nothing to do.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        if std::env::var_os("TERN_KEEP_POSTFIX").is_some() {
            self.dir.disable_cleanup(true);
            say(&format!("kept {}", self.dir.path().display()));
        }
    }
}

/// Tern in-process on the local store under `dir`: IMAP on a free port, LMTP on a given one.
/// It runs on a runtime of its own; [`Tern::stop`] shuts that runtime down, which drops every
/// task (listeners, connections, deliveries) and closes the store, as the end of the process
/// would.
struct Tern {
    runtime: Option<tokio::runtime::Runtime>,
    imap_port: u16,
    lmtp_port: u16,
}

impl Tern {
    /// Opens (or the first time, creates with [`USERS`]) the store and `users.yaml` under
    /// `dir`. `lmtp_port` 0 picks a free port.
    fn start(dir: &Path, lmtp_port: u16) -> Tern {
        Tern::start_with(dir, lmtp_port, LmtpServer::new)
    }

    /// As [`Tern::start`], with `lmtp` building the LMTP server from the default config.
    fn start_with(
        dir: &Path,
        lmtp_port: u16,
        lmtp: impl FnOnce(LmtpConfig, Arc<Accounts>) -> LmtpServer,
    ) -> Tern {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tern")
            .enable_all()
            .build()
            .unwrap();
        let (imap_port, lmtp_port) = runtime.block_on(async {
            let store = Store::open(&StorageConfig::Local {
                path: dir.join("store"),
            })
            .await
            .expect("opening the local store");
            let users = YamlDirectory::open(dir.join("users.yaml")).await.unwrap();
            if users.list().await.unwrap().is_empty() {
                let cheap = Argon2Params {
                    memory_kib: 256,
                    iterations: 1,
                    parallelism: 1,
                };
                for name in USERS {
                    let (keys, _, _) = UserSecrets::create(PASSWORD, cheap, false).unwrap();
                    let user = User {
                        name: name.into(),
                        id: UserId::generate(),
                        addresses: vec![format!("{name}@{DOMAIN}")],
                        quota_bytes: None,
                        keys,
                    };
                    users.put(user, false).await.unwrap();
                }
            }
            let accounts = Accounts::new(store, Arc::new(users));
            let imap = ImapServer::new(
                ImapConfig {
                    allow_plaintext: true,
                    ..ImapConfig::default()
                },
                accounts.clone(),
            );
            let lmtp = lmtp(
                LmtpConfig {
                    hostname: "tern.test".into(),
                    ..LmtpConfig::default()
                },
                accounts,
            );
            let imap_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            // tokio sets SO_REUSEADDR: the restart rebinds the port its predecessor used.
            let lmtp_listener = tokio::net::TcpListener::bind(("127.0.0.1", lmtp_port))
                .await
                .unwrap_or_else(|e| panic!("binding LMTP on 127.0.0.1:{lmtp_port}: {e}"));
            let ports = (
                imap_listener.local_addr().unwrap().port(),
                lmtp_listener.local_addr().unwrap().port(),
            );
            tokio::spawn(async move {
                imap.serve(imap_listener, std::future::pending())
                    .await
                    .expect("IMAP server")
            });
            tokio::spawn(async move {
                lmtp.serve(lmtp_listener, std::future::pending())
                    .await
                    .expect("LMTP server")
            });
            ports
        });
        say(&format!(
            "tern started: IMAP on 127.0.0.1:{imap_port}, LMTP on 127.0.0.1:{lmtp_port}"
        ));
        Tern {
            runtime: Some(runtime),
            imap_port,
            lmtp_port,
        }
    }

    fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(10));
        }
    }

    /// INBOX of `user`, read over IMAP.
    fn inbox(&self, user: &str) -> Vec<Fetched> {
        let out = python(&[
            "fetch",
            "--port",
            &self.imap_port.to_string(),
            "--user",
            user,
            "--password",
            PASSWORD,
        ]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("fetch output {out}: {e}"))
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Debug, Deserialize)]
struct Fetched {
    uid: u32,
    message: String,
}

impl Fetched {
    fn header_block(&self) -> &str {
        self.message
            .split_once("\r\n\r\n")
            .map_or(self.message.as_str(), |(h, _)| h)
    }

    fn body(&self) -> &str {
        self.message.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    fn has_header(&self, line: &str) -> bool {
        self.header_block()
            .split("\r\n")
            .any(|l| l.eq_ignore_ascii_case(line))
    }
}

#[derive(Debug, Deserialize)]
struct Sent {
    rcpt: std::collections::BTreeMap<String, (u16, String)>,
    data: Option<(u16, String)>,
    queue_id: Option<String>,
}

/// Runs `tests/postfix/mail.py` and returns its stdout; fails the test with its output if it
/// fails.
fn python(args: &[&str]) -> String {
    let out = run(Command::new("python3")
        .arg(here("postfix/mail.py"))
        .args(args));
    assert!(
        out.status.success(),
        "mail.py {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One SMTP transaction into Postfix; returns the queue id Postfix gave the message.
fn send(postfix: &Postfix, sender: &str, rcpts: &[&str], subject: &str, body: &str) -> String {
    let port = postfix.smtp_port.to_string();
    let mut args = vec!["send", "--port", &port, "--sender", sender];
    for r in rcpts {
        args.extend(["--rcpt", r]);
    }
    args.extend(["--subject", subject, "--body", body]);
    let out = python(&args);
    let sent: Sent =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("send output {out}: {e}"));
    for (rcpt, (code, reply)) in &sent.rcpt {
        assert_eq!(*code, 250, "Postfix refused RCPT {rcpt}: {reply}");
    }
    let queue_id = sent.queue_id.unwrap_or_else(|| {
        panic!(
            "no queue id in Postfix's reply to DATA: {:?}\n{}",
            sent.data,
            postfix.log()
        )
    });
    say(&format!("queued {queue_id}: {sender} -> {rcpts:?}"));
    queue_id
}

fn addr(user: &str) -> String {
    format!("{user}@{DOMAIN}")
}

/// The messages of `inbox` with `subject`.
fn with_subject<'a>(inbox: &'a [Fetched], subject: &str) -> Vec<&'a Fetched> {
    let header = format!("Subject: {subject}");
    inbox.iter().filter(|m| m.has_header(&header)).collect()
}

#[test]
fn a_message_through_postfix_reaches_the_inbox() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let tern = Tern::start(dir.path(), 0);
    let postfix = Postfix::start(tern.lmtp_port);

    let body = "Hello Alice,\r\nthis came through Postfix and LMTP.\r\n.leading dot kept\r\n";
    let qid = send(
        &postfix,
        &addr("carol"),
        &[&addr("alice")],
        "one message",
        body,
    );
    let line = postfix.wait_status(&qid, &addr("alice"), "sent");
    assert!(
        line.contains("250 2.0.0"),
        "Postfix logged another reply than Tern's 250 2.0.0: {line}"
    );
    postfix.wait_removed(&qid);

    let inbox = tern.inbox("alice");
    assert_eq!(inbox.len(), 1, "alice's INBOX: {inbox:#?}");
    let m = &inbox[0];
    assert!(m.has_header("Subject: one message"), "{m:#?}");
    assert_eq!(m.body(), format!("{body}\r\n"), "body as fetched over IMAP");
    // Tern's trace lines on top, the envelope sender Postfix gave over LMTP.
    assert!(
        m.message
            .starts_with("Return-Path: <carol@example.org>\r\nReceived: from postfix.test"),
        "trace lines: {}",
        m.header_block()
    );
    // Postfix's own Received line, with its queue id, is below Tern's.
    assert!(
        m.header_block().contains(&format!("with ESMTP id {qid}")),
        "Postfix's Received line: {}",
        m.header_block()
    );
    assert!(tern.inbox("bob").is_empty());
    assert!(postfix.queue().is_empty(), "{:?}", postfix.queue());
    postfix.assert_no_trouble();
}

#[test]
fn several_recipients_in_one_transaction_each_get_one_copy() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let tern = Tern::start(dir.path(), 0);
    let postfix = Postfix::start(tern.lmtp_port);

    let body = "To both of you.\r\n";
    let qid = send(
        &postfix,
        &addr("carol"),
        &[&addr("alice"), &addr("bob")],
        "two recipients",
        body,
    );
    let alice = postfix.wait_status(&qid, &addr("alice"), "sent");
    let bob = postfix.wait_status(&qid, &addr("bob"), "sent");
    postfix.wait_removed(&qid);
    // Postfix hands the recipients of one destination to one delivery agent, which sends them
    // in one LMTP transaction (one RCPT each, one reply each after the message).
    let process = |l: &str| {
        l.split(": ")
            .next()
            .map(|p| p.rsplit(' ').next().map(str::to_owned))
    };
    assert_eq!(process(&alice), process(&bob), "\n{alice}\n{bob}");

    for user in ["alice", "bob"] {
        let inbox = tern.inbox(user);
        assert_eq!(inbox.len(), 1, "{user}'s INBOX: {inbox:#?}");
        assert!(inbox[0].has_header("Subject: two recipients"));
        assert_eq!(inbox[0].body(), format!("{body}\r\n"));
    }
    assert!(tern.inbox("carol").is_empty(), "no bounce expected");
    postfix.assert_no_trouble();
}

#[test]
fn an_unknown_recipient_is_bounced_to_the_sender() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let tern = Tern::start(dir.path(), 0);
    let postfix = Postfix::start(tern.lmtp_port);

    // Without virtual_mailbox_maps, Postfix takes any address of the domain at RCPT; Tern
    // refuses the unknown one at LMTP RCPT, and Postfix bounces it to the sender.
    let nobody = addr("nobody");
    let qid = send(
        &postfix,
        &addr("carol"),
        &[&addr("alice"), &nobody],
        "partly unknown",
        "Hello?\r\n",
    );
    postfix.wait_status(&qid, &addr("alice"), "sent");
    let bounced = postfix.wait_status(&qid, &nobody, "bounced");
    assert!(
        bounced.contains("dsn=5.1.1") && bounced.contains("said: 550 5.1.1"),
        "Postfix should log Tern's 550 5.1.1: {bounced}"
    );
    assert!(bounced.contains("in reply to RCPT TO command"), "{bounced}");
    let notice = wait_for(
        "the bounce's queue id",
        || postfix.context(),
        || {
            postfix.lines_of(&qid).iter().find_map(|l| {
                l.split_once("sender non-delivery notification: ")
                    .map(|(_, id)| id.trim().to_owned())
            })
        },
    );
    postfix.wait_status(&notice, &addr("carol"), "sent");
    postfix.wait_removed(&qid);
    postfix.wait_removed(&notice);

    assert_eq!(
        with_subject(&tern.inbox("alice"), "partly unknown").len(),
        1
    );
    let carol = tern.inbox("carol");
    assert_eq!(
        carol.len(),
        1,
        "carol's INBOX should hold the bounce: {carol:#?}"
    );
    let bounce = &carol[0];
    assert!(
        bounce.has_header("Return-Path: <>"),
        "{}",
        bounce.header_block()
    );
    assert!(
        bounce.has_header("From: Mail Delivery System <MAILER-DAEMON@postfix.test>"),
        "{}",
        bounce.header_block()
    );
    assert!(
        bounce.message.contains(&format!(
            "<{nobody}>: host 127.0.0.1[127.0.0.1] said: 550 5.1.1"
        )),
        "the bounce should name the address and Tern's reply:\n{}",
        bounce.message
    );
    assert!(
        bounce.message.contains("Subject: partly unknown"),
        "the bounce should carry the original headers:\n{}",
        bounce.message
    );
    postfix.assert_no_trouble();
}

#[test]
fn tern_down_postfix_defers_then_delivers_once_after_the_restart() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    let mut tern = Tern::start(dir.path(), 0);
    let lmtp_port = tern.lmtp_port;
    let postfix = Postfix::start(lmtp_port);

    // The path works, and Postfix has talked to this Tern before it goes away.
    let before = send(
        &postfix,
        &addr("carol"),
        &[&addr("alice")],
        "before",
        "1\r\n",
    );
    postfix.wait_status(&before, &addr("alice"), "sent");
    postfix.wait_removed(&before);

    tern.stop();
    let body = "Sent while Tern was down.\r\n";
    let qid = send(
        &postfix,
        &addr("carol"),
        &[&addr("alice")],
        "while down",
        body,
    );
    let deferred = postfix.wait_status(&qid, &addr("alice"), "deferred");
    assert!(deferred.contains("dsn=4."), "{deferred}");
    // Postfix retries (every second here) and defers again: the message waits in its queue.
    wait_for(
        &format!("a second deferral of {qid}"),
        || postfix.context(),
        || {
            let deferrals = postfix
                .lines_of(&qid)
                .iter()
                .filter(|l| {
                    l.contains(&format!("to=<{}>", addr("alice"))) && l.contains("status=deferred")
                })
                .count();
            (deferrals >= 2).then_some(())
        },
    );
    let queue = postfix.queue();
    let entry = queue
        .iter()
        .find(|e| e.queue_id == qid)
        .unwrap_or_else(|| panic!("{qid} should be queued: {queue:?}\n{}", postfix.log()));
    assert!(
        ["deferred", "active"].contains(&entry.queue_name.as_str()),
        "{entry:?}"
    );
    assert_eq!(entry.recipients.len(), 1, "{entry:?}");
    assert_eq!(entry.recipients[0].address, addr("alice"));
    let reason = entry.recipients[0].delay_reason.as_deref().unwrap_or("");
    assert!(
        reason.contains(&format!("127.0.0.1[127.0.0.1]:{lmtp_port}")),
        "delay reason: {reason:?}"
    );
    let retries = postfix
        .lines_of(&qid)
        .iter()
        .filter(|l| l.contains("status=deferred"))
        .count();
    say(&format!(
        "{qid} deferred {retries} times while Tern was down"
    ));

    // Same store, same port.
    let tern = Tern::start(dir.path(), lmtp_port);
    postfix.wait_status(&qid, &addr("alice"), "sent");
    postfix.wait_removed(&qid);
    assert!(postfix.queue().is_empty(), "{:?}", postfix.queue());
    let sent = postfix
        .lines_of(&qid)
        .iter()
        .filter(|l| l.contains("status=sent"))
        .count();
    assert_eq!(sent, 1, "{}", postfix.log());

    let inbox = tern.inbox("alice");
    let arrived = with_subject(&inbox, "while down");
    assert_eq!(arrived.len(), 1, "exactly one copy: {inbox:#?}");
    assert_eq!(arrived[0].body(), format!("{body}\r\n"));
    assert_eq!(with_subject(&inbox, "before").len(), 1, "{inbox:#?}");
    assert_eq!(inbox.len(), 2, "{inbox:#?}");
    assert!(arrived[0].uid > with_subject(&inbox, "before")[0].uid);
    postfix.assert_no_trouble();
}

#[test]
fn a_delivery_stored_but_not_acknowledged_is_retried_by_postfix_and_kept_once() {
    require_tools();
    let dir = tempfile::tempdir().unwrap();
    // No time at all for the store: Tern answers 451 4.4.1 after the message, while the
    // delivery goes on and stores it (docs/lmtp.md, "Delivery"): the crash-before-the-250 case.
    let mut tern = Tern::start_with(dir.path(), 0, |config, accounts| {
        LmtpServer::new(
            LmtpConfig {
                delivery_timeout: Duration::ZERO,
                ..config
            },
            accounts,
        )
    });
    let lmtp_port = tern.lmtp_port;
    let postfix = Postfix::start(lmtp_port);

    let body = "Stored, but Postfix was told to try again.\r\n";
    let qid = send(
        &postfix,
        &addr("carol"),
        &[&addr("alice")],
        "unacknowledged",
        body,
    );
    let deferred = postfix.wait_status(&qid, &addr("alice"), "deferred");
    assert!(
        deferred.contains("said: 451 4.4.1") && deferred.contains("in reply to end of DATA"),
        "Tern should answer 451 4.4.1 after the message: {deferred}"
    );
    // Stored all the same, before any 250.
    let stored = wait_for(
        "the unacknowledged copy in alice's INBOX",
        || postfix.context(),
        || {
            let inbox = tern.inbox("alice");
            (!inbox.is_empty()).then_some(inbox)
        },
    );
    assert_eq!(stored.len(), 1, "{stored:#?}");

    // Tern again with time for the store, on the same store and port. Postfix's retry (same
    // bytes, every second) finds the delivery record and gets its 250 without a second copy;
    // a retry that reached the first Tern in the meantime got a 451 again or, when the
    // record was read within no time at all, already that 250.
    tern.stop();
    let tern = Tern::start(dir.path(), lmtp_port);
    postfix.wait_status(&qid, &addr("alice"), "sent");
    postfix.wait_removed(&qid);
    let sent = postfix
        .lines_of(&qid)
        .iter()
        .filter(|l| l.contains("status=sent"))
        .count();
    assert_eq!(sent, 1, "{}", postfix.log());
    postfix.assert_no_trouble();
    let inbox = tern.inbox("alice");
    assert_eq!(inbox.len(), 1, "exactly one copy: {inbox:#?}");
    assert_eq!(
        inbox[0].uid, stored[0].uid,
        "the copy stored first, not a new one"
    );
    assert_eq!(inbox[0].body(), format!("{body}\r\n"));
}
