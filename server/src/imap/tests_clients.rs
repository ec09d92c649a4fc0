//! Regressions found by real clients (`tests/tests/imap_clients.rs`), replayed as raw IMAP.
//!
//! Bytes are pushed in the pieces a socket delivers them in: the bugs below only showed when a
//! literal arrived over several reads.

use std::sync::Arc;

use super::ImapConfig;
use super::input::{Event, Input};
use super::output::Out;
use super::session::{Context, Flow, Session};
use crate::mail::account::Accounts;
use crate::testing;

/// What the network layer reads at once (`server.rs`).
const READ: usize = 8 * 1024;

fn config() -> ImapConfig {
    ImapConfig {
        allow_plaintext: true,
        max_line: 2_000,
        max_literal: 1_000_000,
        ..ImapConfig::default()
    }
}

struct Client {
    session: Session,
    input: Input,
    out: Out,
    _dir: tempfile::TempDir,
}

impl Client {
    async fn logged_in() -> Client {
        let dir = tempfile::tempdir().unwrap();
        let store = testing::local_store(dir.path()).await.unwrap();
        let alice = testing::user("alice", "secret", "alice@localhost", None).unwrap();
        let users = testing::users_file(&dir.path().join("users.yaml"), vec![alice])
            .await
            .unwrap();
        let config = config();
        let input = Input::new(config.max_line, config.max_literal);
        let accounts = Accounts::new(store, Arc::new(users));
        let session = Session::new(Arc::new(Context::new(config, accounts, None)), "test");
        let mut out = Out::buffered();
        session.greeting(&mut out);
        let mut c = Client {
            session,
            input,
            out,
            _dir: dir,
        };
        let r = c.send(b"l1 LOGIN alice secret\r\n").await;
        assert!(r.contains("l1 OK"), "{r}");
        c
    }

    /// Sends `bytes` in socket-sized pieces, handling events after each, and returns all that
    /// the server answered.
    async fn send(&mut self, bytes: &[u8]) -> String {
        for piece in bytes.chunks(READ) {
            self.input.push(piece);
            while let Some(event) = self.input.next_event() {
                let fatal = matches!(event, Event::Fatal { .. });
                let flow = self.session.handle(event, &mut self.out).await.unwrap();
                self.input.set_mode(self.session.input_mode());
                assert!(
                    !fatal && flow != Flow::Close,
                    "connection closed: {}",
                    String::from_utf8_lossy(&self.out.take())
                );
            }
        }
        String::from_utf8_lossy(&self.out.take()).into_owned()
    }
}

/// A message far longer than `max_line`, in lines of 72 bytes.
fn big_message(id: &str, size: usize) -> Vec<u8> {
    let mut m = format!("Message-ID: <{id}>\r\nSubject: big\r\n\r\n").into_bytes();
    while m.len() < size {
        m.extend_from_slice(&[b'x'; 70]);
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// mbsync and offlineimap: a synchronizing literal over `max_line` arriving in several reads
/// was taken for an over-long line (`BAD line longer than ...`, then `BYE`), so every message
/// over 64 KiB broke the upload. mbsync pipelines the next APPEND with a LITERAL+ literal
/// right behind it.
#[tokio::test]
async fn a_literal_longer_than_a_line_arrives_over_several_reads() {
    let mut c = Client::logged_in().await;
    let big = big_message("big@x", 150_000);
    let r = c
        .send(format!("a1 APPEND INBOX (\\Seen) {{{}}}\r\n", big.len()).as_bytes())
        .await;
    assert!(r.starts_with("+ "), "no continuation: {r}");
    let small = big_message("small@x", 500);
    let mut rest = big.clone();
    rest.extend_from_slice(format!("\r\na2 APPEND INBOX {{{}+}}\r\n", small.len()).as_bytes());
    rest.extend_from_slice(&small);
    rest.extend_from_slice(b"\r\n");
    let r = c.send(&rest).await;
    assert!(r.contains("a1 OK"), "{r}");
    assert!(r.contains("a2 OK"), "{r}");

    let r = c.send(b"s1 SELECT INBOX\r\n").await;
    assert!(r.contains("* 2 EXISTS"), "{r}");
    let r = c.send(b"f1 FETCH 1 (RFC822.SIZE BODY.PEEK[])\r\n").await;
    assert!(
        r.contains(&format!("RFC822.SIZE {}", big.len())),
        "{}",
        &r[..r.len().min(300)]
    );
    assert!(
        r.contains(std::str::from_utf8(&big).unwrap()),
        "the big message did not come back whole"
    );
}

/// The same at the input layer: no event while the literal's bytes are still arriving.
#[test]
fn input_waits_for_a_long_literal_without_a_line_limit_error() {
    let mut input = Input::new(2_000, 1_000_000);
    input.push(b"a1 APPEND INBOX {20000}\r\n");
    assert!(matches!(input.next_event(), Some(Event::Continue)));
    for _ in 0..4 {
        input.push(&[b'x'; 4_000]);
        let event = input.next_event();
        assert!(event.is_none(), "{event:?} after part of the literal");
    }
    input.push(&[b'x'; 4_000]);
    input.push(b"\r\n");
    assert!(matches!(input.next_event(), Some(Event::Command(_))));
    // The line limit still holds for the line after the literal.
    input.push(b"a2 NOOP ");
    input.push(&[b'y'; 2_100]);
    assert!(matches!(input.next_event(), Some(Event::Fatal { .. })));
}
