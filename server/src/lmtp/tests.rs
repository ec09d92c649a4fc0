//! Conversation tests: raw LMTP in, raw replies out, through the sans-I/O core (input, session)
//! and over real sockets, on a real local store and a real users file.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::LmtpConfig;
use super::input::Input;
use super::session::{Context, Flow, Session};
use crate::mail::account::Accounts;
use crate::testing;
use crate::users::YamlDirectory;

struct Env {
    dir: tempfile::TempDir,
    accounts: Arc<Accounts>,
}

/// alice@example.org, bob@example.net (quota `bob_quota`), carol@example.org; the alias
/// team@example.org → alice, bob; example.net's catch-all is bob.
async fn env(bob_quota: Option<u64>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = testing::local_store(dir.path()).await.unwrap();
    let path = dir.path().join("users.yaml");
    let people = [
        ("alice", "alice@example.org", None),
        ("bob", "bob@example.net", bob_quota),
        ("carol", "carol@example.org", None),
    ]
    .into_iter()
    .map(|(name, address, quota)| testing::user(name, "secret", address, quota).unwrap())
    .collect();
    testing::users_file(&path, people).await.unwrap();
    let mut text = tokio::fs::read_to_string(&path).await.unwrap();
    text.push_str(
        "aliases:\n- address: Team@Example.org\n  to: [alice, bob]\ncatch_all:\n  example.net: bob\n",
    );
    tokio::fs::write(&path, text).await.unwrap();
    let users = YamlDirectory::open(&path).await.unwrap();
    Env {
        accounts: Accounts::new(store, Arc::new(users)),
        dir,
    }
}

fn config() -> LmtpConfig {
    LmtpConfig {
        hostname: "mx.test".into(),
        ..LmtpConfig::default()
    }
}

struct Client {
    session: Session,
    input: Input,
    out: Vec<u8>,
    closed: bool,
}

impl Client {
    fn new(ctx: &Arc<Context>) -> Client {
        let mut out = Vec::new();
        let session = Session::new(ctx.clone(), "192.0.2.1:2525");
        session.greeting(&mut out);
        Client {
            session,
            input: Input::new(ctx.config.max_line, ctx.config.max_message_size),
            out,
            closed: false,
        }
    }

    /// Sends raw bytes and returns everything the server answered.
    async fn raw(&mut self, bytes: &[u8]) -> String {
        assert!(!self.closed, "connection closed");
        self.input.push(bytes);
        while let Some(event) = self.input.next_event() {
            let flow = self.session.handle(event, &mut self.out).await;
            self.input.set_mode(self.session.input_mode());
            if flow == Flow::Close {
                self.closed = true;
                break;
            }
        }
        String::from_utf8(std::mem::take(&mut self.out)).unwrap()
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.raw(format!("{line}\r\n").as_bytes()).await
    }

    /// Sends a line and checks the reply starts with `expect`.
    async fn expect(&mut self, line: &str, expect: &str) -> String {
        let r = self.cmd(line).await;
        assert!(
            r.starts_with(expect),
            "{line:?} → {r:?}, expected {expect:?}"
        );
        r
    }

    async fn lhlo(ctx: &Arc<Context>) -> Client {
        let mut c = Client::new(ctx);
        c.out.clear();
        c.expect("LHLO client.test", "250-mx.test").await;
        c
    }
}

/// Reply codes of a block of replies, one per line, with the enhanced code when there is one
/// (`250 2.1.5`), or the first word of a continuation line (`250-SIZE`).
fn codes(replies: &str) -> Vec<String> {
    replies
        .lines()
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            let code = parts.next().unwrap_or("");
            match parts.next() {
                Some(status)
                    if status.contains('.')
                        && status.chars().next().is_some_and(|c| c.is_ascii_digit()) =>
                {
                    format!("{code} {status}")
                }
                _ => code.to_string(),
            }
        })
        .collect()
}

/// The bodies in a user's INBOX, in UID order (logs the user in, as a client would).
async fn inbox(env: &Env, user: &str) -> Vec<String> {
    let account = env.accounts.login(user, "secret").await.unwrap();
    let info = account.list.find("INBOX").await.unwrap().unwrap();
    let handle = account.mailbox(&info.id).await.unwrap();
    handle.sync().await.unwrap();
    let state = handle.state().await.unwrap();
    let mut out = Vec::new();
    for m in state.messages.values() {
        let record = account.summary(&m.id).await.unwrap();
        let body = account
            .messages
            .read_all(&m.id.0, &record.body_key)
            .await
            .unwrap();
        out.push(String::from_utf8(body.to_vec()).unwrap());
    }
    out
}

/// The message as the client sent it, without the trace lines Tern put above it.
fn without_trace(stored: &str) -> &str {
    assert!(stored.starts_with("Return-Path: <"), "{stored}");
    let at = stored.find("\r\nReceived: from ").expect("Received line");
    let rest = &stored[at + 2..];
    // The Received field is folded over three lines.
    let mut lines = 0;
    let mut end = 0;
    for (i, b) in rest.bytes().enumerate() {
        if b == b'\n' {
            lines += 1;
            if lines == 3 {
                end = i + 1;
                break;
            }
        }
    }
    &rest[end..]
}

#[tokio::test]
async fn lhlo_and_the_order_of_commands() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::new(&ctx);
    assert_eq!(c.raw(b"").await, "220 mx.test Tern LMTP ready\r\n");
    c.expect("MAIL FROM:<a@b.test>", "503 5.5.1").await;
    c.expect("EHLO client.test", "500 5.5.1").await;
    c.expect("HELO client.test", "500 5.5.1").await;
    let lhlo = c.cmd("LHLO client.test").await;
    assert_eq!(
        lhlo,
        format!(
            "250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n\
             250-SIZE {}\r\n250 CHUNKING\r\n",
            config().max_message_size
        )
    );
    c.expect("RCPT TO:<alice@example.org>", "503 5.5.1").await;
    c.expect("DATA", "503 5.5.1").await;
    c.expect("NOOP", "250 2.0.0").await;
    c.expect("VRFY alice", "252 2.5.0").await;
    c.expect("STARTTLS", "502 5.5.1").await;
    c.expect("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "502 5.5.1")
        .await;
    c.expect("FROB", "500 5.5.2").await;
    c.expect("MAIL FROM:<a@b.test> SMTPUTF8", "555 5.5.4").await;
    c.expect("MAIL FROM:<a@b.test> BODY=BINARYMIME", "555 5.5.4")
        .await;
    c.expect("MAIL FROM:<a@b.test> FROB=1", "555 5.5.4").await;
    c.expect("MAIL FROM:a@b.test", "501 5.5.4").await;
    // The null sender (bounces) is taken.
    c.expect("MAIL FROM:<>", "250 2.1.0").await;
    c.expect("MAIL FROM:<x@y.test>", "503 5.5.1").await;
    c.expect("RCPT TO:<nobody@example.org>", "550 5.1.1").await;
    c.expect("RCPT TO:<>", "550 5.1.1").await;
    c.expect("RCPT TO:<no-domain>", "501 5.1.3").await;
    // No recipient was accepted: DATA fails, and what follows is read as commands.
    c.expect("DATA", "503 5.5.1").await;
    c.expect("RSET", "250 2.0.0").await;
    c.expect("RCPT TO:<alice@example.org>", "503 5.5.1").await;
    c.expect("LHLO again.test", "250-mx.test").await;
    c.expect("QUIT", "221 2.0.0").await;
    assert!(c.closed);
    assert!(inbox(&env, "alice").await.is_empty());
}

#[tokio::test]
async fn one_reply_per_recipient_after_the_message() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    c.expect("MAIL FROM:<sender@example.com> BODY=8BITMIME", "250 2.1.0")
        .await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("RCPT TO:<nobody@example.org>", "550 5.1.1").await;
    c.expect("RCPT TO:<carol@example.org>", "250 2.1.5").await;
    c.expect("DATA", "354").await;
    let message = "Subject: caf\u{e9}\r\n\r\nline one\r\n..leading dot\r\n.\r\n";
    let r = c.raw(message.as_bytes()).await;
    assert_eq!(
        r,
        "250 2.0.0 <alice@example.org> delivered\r\n250 2.0.0 <carol@example.org> delivered\r\n"
    );
    for user in ["alice", "carol"] {
        let got = inbox(&env, user).await;
        assert_eq!(got.len(), 1, "{user}");
        assert!(got[0].starts_with("Return-Path: <sender@example.com>\r\nReceived: from client.test ([192.0.2.1])\r\n\tby mx.test (Tern) with LMTP;\r\n\t"), "{}", got[0]);
        assert_eq!(
            without_trace(&got[0]),
            "Subject: caf\u{e9}\r\n\r\nline one\r\n.leading dot\r\n"
        );
    }
    assert!(inbox(&env, "bob").await.is_empty());
    // The connection goes on: a second transaction.
    c.expect("MAIL FROM:<>", "250 2.1.0").await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("DATA", "354").await;
    let r = c.raw(b"Subject: bounce\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(codes(&r), ["250 2.0.0"]);
    let got = inbox(&env, "alice").await;
    assert_eq!(got.len(), 2);
    assert!(got[1].starts_with("Return-Path: <>\r\n"));
}

#[tokio::test]
async fn pipelined_transactions() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::new(&ctx);
    c.out.clear();
    // As a PIPELINING client sends: everything up to DATA in one go.
    let r = c
        .raw(
            b"LHLO client.test\r\nMAIL FROM:<s@example.com> SIZE=60 BODY=8BITMIME\r\n\
              RCPT TO:<alice@example.org>\r\nRCPT TO:<nobody@example.org>\r\n\
              RCPT TO:<carol@example.org>\r\nDATA\r\n",
        )
        .await;
    assert_eq!(
        codes(&r),
        [
            "250-mx.test",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250-8BITMIME",
            "250-SIZE",
            "250",
            "250 2.1.0",
            "250 2.1.5",
            "550 5.1.1",
            "250 2.1.5",
            "354"
        ]
    );
    // The end of the message, the next transaction, and its message, all in one buffer.
    let r = c
        .raw(
            b"Subject: one\r\n\r\n1\r\n.\r\nMAIL FROM:<s@example.com>\r\n\
              RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: two\r\n\r\n2\r\n.\r\n\
              RSET\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<nobody@example.org>\r\nDATA\r\n\
              NOOP\r\nQUIT\r\n",
        )
        .await;
    assert_eq!(
        codes(&r),
        [
            "250 2.0.0",
            "250 2.0.0",
            "250 2.1.0",
            "250 2.1.5",
            "354",
            "250 2.0.0",
            "250 2.0.0",
            "250 2.1.0",
            "550 5.1.1",
            "503 5.5.1",
            "250 2.0.0",
            "221 2.0.0"
        ]
    );
    assert!(c.closed);
    let alice = inbox(&env, "alice").await;
    assert_eq!(alice.len(), 2);
    assert!(alice[0].ends_with("Subject: one\r\n\r\n1\r\n"));
    assert!(alice[1].ends_with("Subject: two\r\n\r\n2\r\n"));
    assert_eq!(inbox(&env, "carol").await.len(), 1);
}

#[tokio::test]
async fn addresses_are_normalised_and_resolved() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    c.expect("MAIL FROM:<s@example.com>", "250 2.1.0").await;
    for (rcpt, expect) in [
        ("<ALICE@Example.ORG.>", "250 2.1.5"),
        ("<alice+news@example.org>", "250 2.1.5"),
        ("<team@EXAMPLE.org>", "250 2.1.5"),
        ("<team+x@example.org>", "250 2.1.5"),
        ("<anything@example.net>", "250 2.1.5"),
        ("<anything@example.org>", "550 5.1.1"),
        ("<+carol@example.org>", "550 5.1.1"),
        ("<carol@other.test>", "550 5.1.1"),
    ] {
        c.expect(&format!("RCPT TO:{rcpt}"), expect).await;
    }
    c.expect("DATA", "354").await;
    let r = c.raw(b"Subject: many\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(codes(&r), ["250 2.0.0"; 5]);
    assert!(r.contains("<ALICE@Example.ORG.> delivered"), "{r}");
    // Every address that reached a user gave one copy.
    assert_eq!(inbox(&env, "alice").await.len(), 1);
    assert_eq!(inbox(&env, "bob").await.len(), 1);
    assert!(inbox(&env, "carol").await.is_empty());
}

#[tokio::test]
async fn limits_have_clear_replies() {
    let env = env(None).await;
    let cfg = LmtpConfig {
        max_line: 100,
        max_message_size: 1000,
        max_recipients: 2,
        max_errors: 6,
        ..config()
    };
    let ctx = Context::new(cfg, env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    let lhlo = c.cmd("LHLO client.test").await;
    assert!(lhlo.contains("250-SIZE 1000\r\n"), "{lhlo}");
    c.expect(&format!("NOOP {}", "x".repeat(200)), "500 5.5.2")
        .await;
    c.expect("NOOP", "250 2.0.0").await;
    c.expect("MAIL FROM:<s@example.com> SIZE=1001", "552 5.3.4")
        .await;
    c.expect("MAIL FROM:<s@example.com> SIZE=1000", "250 2.1.0")
        .await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("RCPT TO:<carol@example.org>", "250 2.1.5").await;
    c.expect("RCPT TO:<bob@example.net>", "452 4.5.3").await;
    c.expect("DATA", "354").await;
    // Too large: every recipient is told, the rest of the message is read and dropped, and
    // the conversation stays in step.
    let big = format!("Subject: big\r\n\r\n{}\r\n.\r\nNOOP\r\n", "y".repeat(1500));
    let r = c.raw(big.as_bytes()).await;
    assert_eq!(codes(&r), ["552 5.3.4", "552 5.3.4", "250 2.0.0"]);
    // Just under the limit is taken (the size counts the message as sent, without trace).
    c.expect("MAIL FROM:<s@example.com>", "250 2.1.0").await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("DATA", "354").await;
    let body = format!("Subject: fits\r\n\r\n{}\r\n", "z".repeat(1000 - 19));
    assert_eq!(body.len(), 1000);
    let r = c.raw(format!("{body}.\r\n").as_bytes()).await;
    assert_eq!(codes(&r), ["250 2.0.0"]);
    assert!(inbox(&env, "carol").await.is_empty());
    assert_eq!(inbox(&env, "alice").await.len(), 1);
    // Bad commands (the long line was the first): the sixth ends the connection.
    for _ in 0..4 {
        c.expect("FROB", "500 5.5.2").await;
    }
    let r = c.cmd("FROB").await;
    assert_eq!(codes(&r), ["500 5.5.2", "421 4.7.0"]);
    assert!(c.closed);
}

#[tokio::test]
async fn quota_is_checked_at_rcpt_and_after_the_message() {
    let env = env(Some(400)).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    // A declared size that cannot fit is refused at RCPT.
    c.expect("MAIL FROM:<s@example.com> SIZE=500", "250 2.1.0")
        .await;
    c.expect("RCPT TO:<bob@example.net>", "552 5.2.2").await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("RSET", "250 2.0.0").await;
    // Without SIZE, the real size is checked after the message: bob is refused, alice not.
    c.expect("MAIL FROM:<s@example.com>", "250 2.1.0").await;
    c.expect("RCPT TO:<bob@example.net>", "250 2.1.5").await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("DATA", "354").await;
    let big = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "q".repeat(450));
    let r = c.raw(big.as_bytes()).await;
    assert_eq!(codes(&r), ["552 5.2.2", "250 2.0.0"]);
    assert!(
        r.starts_with("552 5.2.2 <bob@example.net>: mailbox full"),
        "{r}"
    );
    // A small message still fits.
    c.expect("MAIL FROM:<s@example.com>", "250 2.1.0").await;
    c.expect("RCPT TO:<bob@example.net>", "250 2.1.5").await;
    c.expect("DATA", "354").await;
    let r = c.raw(b"Subject: small\r\n\r\nok\r\n.\r\n").await;
    assert_eq!(codes(&r), ["250 2.0.0"]);
    assert_eq!(inbox(&env, "bob").await.len(), 1);
    assert_eq!(inbox(&env, "alice").await.len(), 1);
}

#[tokio::test]
async fn bdat_chunks_pipelined_and_not() {
    let env = env(None).await;
    let cfg = LmtpConfig {
        max_message_size: 100,
        ..config()
    };
    let ctx = Context::new(cfg, env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    // A chunk without a transaction is read (not taken for commands) and refused.
    let r = c.raw(b"BDAT 6 LAST\r\nNOOP\r\nNOOP\r\n").await;
    assert_eq!(codes(&r), ["503 5.5.1", "250 2.0.0"]);
    c.expect("MAIL FROM:<s@example.com>", "250 2.1.0").await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    c.expect("RCPT TO:<carol@example.org>", "250 2.1.5").await;
    let r = c.raw(b"BDAT 17\r\nSubject: chunks\r\n").await;
    assert_eq!(r, "250 2.0.0 17 octets received\r\n");
    c.expect("DATA", "503 5.5.1").await;
    c.expect("RCPT TO:<bob@example.net>", "503 5.5.1").await;
    // Binary-safe: a dot line is data in a chunk.
    let r = c.raw(b"BDAT 8 LAST\r\n\r\n.\r\nx\r\n").await;
    assert_eq!(codes(&r), ["250 2.0.0", "250 2.0.0"]);
    let alice = inbox(&env, "alice").await;
    assert_eq!(
        without_trace(&alice[0]),
        "Subject: chunks\r\n\r\n.\r\nx\r\n"
    );
    // Pipelined, with a chunk that takes the message over the limit.
    let r = c
        .raw(
            b"MAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nBDAT 60\r\n\
              012345678901234567890123456789012345678901234567890123456789BDAT 60\r\n\
              012345678901234567890123456789012345678901234567890123456789BDAT 0 LAST\r\n\
              NOOP\r\n",
        )
        .await;
    assert_eq!(
        codes(&r),
        [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0",
            "552 5.3.4",
            "552 5.3.4",
            "250 2.0.0"
        ]
    );
    // A single chunk over the limit is discarded unread by the session.
    c.expect("MAIL FROM:<s@example.com>", "250 2.1.0").await;
    c.expect("RCPT TO:<alice@example.org>", "250 2.1.5").await;
    let over = format!("BDAT 101 LAST\r\n{}NOOP\r\n", "w".repeat(101));
    let r = c.raw(over.as_bytes()).await;
    assert_eq!(codes(&r), ["552 5.3.4", "250 2.0.0"]);
    assert_eq!(inbox(&env, "alice").await.len(), 1);
    assert_eq!(inbox(&env, "carol").await.len(), 1);
}

/// Same bytes twice (two transactions, or a retry after a lost reply) → one copy; other bytes
/// → another copy.
#[tokio::test]
async fn a_retry_with_the_same_bytes_leaves_one_copy() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    let send = |body: &'static str| {
        format!(
            "MAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nRCPT TO:<team@example.org>\r\nDATA\r\n{body}.\r\n"
        )
    };
    let once = "Subject: once\r\nMessage-ID: <1@example.com>\r\n\r\nbody\r\n";
    for _ in 0..3 {
        let r = c.raw(send(once).as_bytes()).await;
        assert_eq!(
            codes(&r),
            [
                "250 2.1.0",
                "250 2.1.5",
                "250 2.1.5",
                "354",
                "250 2.0.0",
                "250 2.0.0"
            ]
        );
    }
    // A new connection, as after a restart of the sender.
    let mut c2 = Client::lhlo(&ctx).await;
    let r = c2.raw(send(once).as_bytes()).await;
    assert!(
        r.ends_with(
            "250 2.0.0 <alice@example.org> delivered\r\n250 2.0.0 <team@example.org> delivered\r\n"
        ),
        "{r}"
    );
    let r = c2
        .raw(send("Subject: once\r\nMessage-ID: <1@example.com>\r\n\r\nbody!\r\n").as_bytes())
        .await;
    assert!(r.ends_with("delivered\r\n"), "{r}");
    assert_eq!(inbox(&env, "alice").await.len(), 2);
    assert_eq!(inbox(&env, "bob").await.len(), 2);
}

/// The blob store fails (its directory replaced by a file): the delivery answers 451 and
/// stores nothing readable; the sender's retry, once the store is back, stores one copy.
#[tokio::test]
async fn storage_failure_is_451_and_the_retry_stores_one_copy() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    let tx = b"MAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: retry\r\n\r\nx\r\n.\r\n";
    let blobs = env.dir.path().join("store/blobs");
    let aside = env.dir.path().join("store/blobs.aside");
    std::fs::rename(&blobs, &aside).unwrap();
    std::fs::write(&blobs, b"not a directory").unwrap();
    let r = c.raw(tx).await;
    assert_eq!(codes(&r), ["250 2.1.0", "250 2.1.5", "354", "451 4.3.0"]);
    std::fs::remove_file(&blobs).unwrap();
    std::fs::rename(&aside, &blobs).unwrap();
    let r = c.raw(tx).await;
    assert_eq!(codes(&r), ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]);
    let r = c.raw(tx).await;
    assert_eq!(codes(&r), ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]);
    assert_eq!(inbox(&env, "alice").await.len(), 1);
}

/// The store takes longer than the delivery timeout: 451, the delivery finishes on its own,
/// and the retry finds it (stored but not acknowledged → no second copy).
#[tokio::test]
async fn a_delivery_past_its_timeout_is_451_and_its_retry_finds_it() {
    let env = env(None).await;
    let slow = Context::new(
        LmtpConfig {
            delivery_timeout: Duration::ZERO,
            ..config()
        },
        env.accounts.clone(),
    );
    let tx = b"MAIL FROM:<s@example.com>\r\nRCPT TO:<carol@example.org>\r\nDATA\r\nSubject: late\r\n\r\nx\r\n.\r\n";
    let mut c = Client::lhlo(&slow).await;
    let r = c.raw(tx).await;
    assert_eq!(codes(&r), ["250 2.1.0", "250 2.1.5", "354", "451 4.4.1"]);
    // The delivery goes on in the background and lands.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while inbox(&env, "carol").await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    let r = c.raw(tx).await;
    assert_eq!(codes(&r), ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]);
    assert_eq!(inbox(&env, "carol").await.len(), 1);
}

/// bob never logged in: delivery needs no password, opens no account, and his first login
/// shows the message.
#[tokio::test]
async fn keyless_delivery_to_a_user_never_logged_in() {
    let env = env(None).await;
    let ctx = Context::new(config(), env.accounts.clone());
    let mut c = Client::lhlo(&ctx).await;
    let r = c
        .raw(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\nSubject: first\r\n\r\nhello bob\r\n.\r\n")
        .await;
    assert!(
        r.ends_with("250 2.0.0 <bob@example.net> delivered\r\n"),
        "{r}"
    );
    assert_eq!(env.accounts.live_accounts(), 0, "no account was unlocked");
    assert_eq!(ctx.deliverer.keyless_handles(), 1);
    let got = inbox(&env, "bob").await;
    assert_eq!(got.len(), 1);
    assert_eq!(
        without_trace(&got[0]),
        "Subject: first\r\n\r\nhello bob\r\n"
    );
}

// --- over real sockets ---

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Arc<super::LmtpServer>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(env: &Env, cfg: LmtpConfig) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Arc::new(super::LmtpServer::new(cfg, env.accounts.clone()));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    tokio::spawn(async move {
        s.serve(listener, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Running {
        addr,
        stop: Some(stop),
        server,
    }
}

struct Wire {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl Wire {
    async fn connect(addr: std::net::SocketAddr) -> Wire {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Wire {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    /// One line; `""` at end of stream.
    async fn line(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
            .await
            .expect("a line in time")
            .unwrap();
        line
    }

    /// IMAP: lines up to the tagged one.
    async fn until_tagged(&mut self, tag: &str) -> String {
        let mut all = String::new();
        loop {
            let line = self.line().await;
            assert!(!line.is_empty(), "closed: {all}");
            all.push_str(&line);
            if line.starts_with(&format!("{tag} ")) {
                return all;
            }
        }
    }

    /// Reads one reply (all its lines); `""` at end of stream.
    async fn reply(&mut self) -> String {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
                .await
                .expect("a reply in time")
                .unwrap();
            reply.push_str(&line);
            if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                return reply;
            }
        }
    }

    async fn replies(&mut self, n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.extend(codes(&self.reply().await));
        }
        v
    }
}

#[tokio::test]
async fn over_a_socket_pipelined_and_not() {
    let env = env(None).await;
    let running = start(&env, config()).await;
    let mut w = Wire::connect(running.addr).await;
    assert!(w.reply().await.starts_with("220 mx.test"));
    // Not pipelined: one command, one reply.
    w.send(b"LHLO client.test\r\n").await;
    assert!(w.reply().await.ends_with("250 CHUNKING\r\n"));
    for (line, code) in [
        ("MAIL FROM:<s@example.com>", "250 2.1.0"),
        ("RCPT TO:<alice@example.org>", "250 2.1.5"),
        ("RCPT TO:<team@example.org>", "250 2.1.5"),
        ("DATA", "354"),
    ] {
        w.send(format!("{line}\r\n").as_bytes()).await;
        assert_eq!(codes(&w.reply().await), [code], "{line}");
    }
    w.send(b"Subject: socket\r\n\r\none\r\n.\r\n").await;
    assert_eq!(w.replies(2).await, ["250 2.0.0", "250 2.0.0"]);
    // Pipelined: a whole transaction in one write, then the message.
    w.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<carol@example.org>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n")
        .await;
    assert_eq!(
        w.replies(4).await,
        ["250 2.1.0", "250 2.1.5", "550 5.1.1", "354"]
    );
    w.send(b"Subject: socket\r\n\r\ntwo\r\n.\r\nQUIT\r\n").await;
    assert_eq!(w.replies(2).await, ["250 2.0.0", "221 2.0.0"]);
    assert_eq!(w.reply().await, "", "closed after QUIT");
    assert_eq!(inbox(&env, "alice").await.len(), 1);
    assert_eq!(inbox(&env, "bob").await.len(), 1);
    assert_eq!(inbox(&env, "carol").await.len(), 1);
}

#[tokio::test]
async fn over_a_socket_timeouts_and_connection_limit() {
    let env = env(None).await;
    let running = start(
        &env,
        LmtpConfig {
            command_timeout: Duration::from_millis(300),
            data_timeout: Duration::from_millis(300),
            max_connections: 2,
            ..config()
        },
    )
    .await;
    // Idle after the greeting.
    let mut idle = Wire::connect(running.addr).await;
    assert!(idle.reply().await.starts_with("220 "));
    // Stalled in the middle of a message.
    let mut stalled = Wire::connect(running.addr).await;
    stalled.reply().await;
    stalled
        .send(b"LHLO c\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\nSubject: half")
        .await;
    // Both slots taken: a third connection is turned away.
    let mut third = Wire::connect(running.addr).await;
    assert_eq!(codes(&third.reply().await), ["421 4.3.2"]);
    assert_eq!(third.reply().await, "");
    assert!(
        idle.reply()
            .await
            .starts_with("421 4.4.2 mx.test Timeout waiting for a command")
    );
    assert_eq!(idle.reply().await, "");
    assert_eq!(
        stalled.replies(4).await[6..],
        ["250 2.1.0", "250 2.1.5", "354"]
    );
    assert!(
        stalled
            .reply()
            .await
            .starts_with("421 4.4.2 mx.test Timeout waiting for message data")
    );
    assert_eq!(stalled.reply().await, "");
    // A slot is free again.
    let mut again = Wire::connect(running.addr).await;
    assert!(again.reply().await.starts_with("220 "));
    assert!(inbox(&env, "alice").await.is_empty());
    drop(running);
}

/// An IMAP session IDLE on INBOX sees an LMTP delivery at once: the delivery writes through
/// the sessions' own INBOX handle (no keyless handle is opened).
#[tokio::test]
async fn an_imap_session_idling_on_inbox_sees_a_delivery() {
    let env = env(None).await;
    let running = start(&env, config()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let imap_addr = listener.local_addr().unwrap();
    let imap = crate::imap::ImapServer::new(
        crate::imap::ImapConfig {
            allow_plaintext: true,
            ..Default::default()
        },
        env.accounts.clone(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        imap.serve(listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut i = Wire::connect(imap_addr).await;
    assert!(i.line().await.starts_with("* OK"));
    i.send(b"a LOGIN alice secret\r\n").await;
    assert!(i.until_tagged("a").await.contains("a OK"));
    i.send(b"b SELECT INBOX\r\n").await;
    let selected = i.until_tagged("b").await;
    assert!(selected.contains("* 0 EXISTS"), "{selected}");
    i.send(b"c IDLE\r\n").await;
    assert!(i.line().await.starts_with("+ "));

    let mut w = Wire::connect(running.addr).await;
    w.reply().await;
    w.send(b"LHLO c\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        .await;
    w.replies(4).await;
    let sent = std::time::Instant::now();
    w.send(b"Subject: idle\r\n\r\nwake up\r\n.\r\n").await;
    assert_eq!(w.replies(1).await, ["250 2.0.0"]);
    let exists = i.line().await;
    let waited = sent.elapsed();
    assert_eq!(exists, "* 1 EXISTS\r\n");
    eprintln!("IDLE saw the LMTP delivery {waited:?} after the final dot");
    assert_eq!(
        running.server.deliverer().keyless_handles(),
        0,
        "delivered through the session's handle"
    );
    i.send(b"DONE\r\n").await;
    assert!(i.until_tagged("c").await.contains("c OK"));
    i.send(b"d FETCH 1 BODY.PEEK[TEXT]\r\n").await;
    assert!(i.until_tagged("d").await.contains("wake up"));
    let _ = stop.send(());
}
