//! Conversation tests: raw IMAP in, raw IMAP out, through the sans-I/O core (input, session,
//! output) on a real local store. No socket; the network layer is tested end to end in
//! `tests/tests/imap_*.rs`.

use std::sync::Arc;
use std::time::Duration;

use super::ImapConfig;
use super::input::Input;
use super::output::Out;
use super::session::{Context, Flow, Session};
use crate::mail::account::Accounts;
use crate::storage::Store;
use crate::testing;
use crate::users::UserId;

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    accounts: Arc<Accounts>,
    user_id: UserId,
}

fn config() -> ImapConfig {
    ImapConfig {
        allow_plaintext: true,
        throttle: crate::net::throttle::ThrottleConfig {
            base_delay_ms: 0,
            ..Default::default()
        },
        max_literal: 100_000,
        max_line: 2_000,
        ..ImapConfig::default()
    }
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = testing::local_store(dir.path()).await.unwrap();
    let alice = testing::user("alice", "secret", "alice@localhost", None).unwrap();
    let user_id = alice.id.clone();
    let users = testing::users_file(&dir.path().join("users.yaml"), vec![alice])
        .await
        .unwrap();
    let accounts = Accounts::new(store.clone(), Arc::new(users));
    Env {
        _dir: dir,
        store,
        accounts,
        user_id,
    }
}

struct Client {
    session: Session,
    input: Input,
    out: Out,
    closed: bool,
}

impl Client {
    fn new(env: &Env, config: ImapConfig) -> Client {
        let input = Input::new(config.max_line, config.max_literal);
        let ctx = Arc::new(Context::new(config, env.accounts.clone(), None));
        let session = Session::new(ctx, "test");
        let mut out = Out::buffered();
        session.greeting(&mut out);
        Client {
            session,
            input,
            out,
            closed: false,
        }
    }

    /// Sends raw bytes and returns everything the server answered.
    async fn raw(&mut self, bytes: &[u8]) -> String {
        self.input.push(bytes);
        while let Some(event) = self.input.next_event() {
            let flow = self.session.handle(event, &mut self.out).await.unwrap();
            self.input.set_mode(self.session.input_mode());
            if flow == Flow::Close {
                self.closed = true;
                break;
            }
        }
        String::from_utf8_lossy(&self.out.take()).into_owned()
    }

    /// Sends one line (CRLF added).
    async fn cmd(&mut self, line: &str) -> String {
        self.raw(format!("{line}\r\n").as_bytes()).await
    }

    async fn ok(&mut self, line: &str) -> String {
        let tag = line.split(' ').next().unwrap().to_string();
        let r = self.cmd(line).await;
        assert!(r.contains(&format!("{tag} OK")), "{line} -> {r}");
        r
    }

    async fn login(env: &Env) -> Client {
        let mut c = Client::new(env, config());
        c.out.take();
        c.ok("l1 LOGIN alice secret").await;
        c
    }

    async fn append(&mut self, mailbox: &str, flags: &str, message: &str) -> String {
        let head = format!("ap APPEND {mailbox} {flags} {{{}+}}\r\n", message.len());
        let r = self.raw(format!("{head}{message}\r\n").as_bytes()).await;
        assert!(r.contains("ap OK"), "{r}");
        r
    }
}

fn message(subject: &str, body: &str) -> String {
    format!(
        "From: Bob <bob@example.org>\r\nTo: alice@localhost\r\nSubject: {subject}\r\n\
Date: Tue, 3 Mar 2026 10:00:00 +0100\r\nMessage-ID: <{subject}@example.org>\r\n\r\n{body}\r\n"
    )
}

#[tokio::test]
async fn states_capabilities_and_login() {
    let env = env().await;
    let mut c = Client::new(&env, config());
    let greeting = String::from_utf8_lossy(&c.out.take()).into_owned();
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4REV1 AUTH=PLAIN AUTH=SCRAM-SHA-256 SASL-IR"),
        "{greeting}"
    );
    assert!(!greeting.contains("LOGINDISABLED"));

    let r = c.cmd("a1 SELECT INBOX").await;
    assert!(r.starts_with("a1 BAD"), "wrong state: {r}");
    let r = c.cmd("a2 FETCH 1 FLAGS").await;
    assert!(r.starts_with("a2 BAD"), "{r}");
    let r = c.cmd("a3 LOGIN alice wrong").await;
    assert!(r.starts_with("a3 NO [AUTHENTICATIONFAILED]"), "{r}");
    let r = c.cmd("a4 LOGIN nobody secret").await;
    assert!(r.starts_with("a4 NO [AUTHENTICATIONFAILED]"), "{r}");
    let r = c.cmd("a5 LOGIN alice secret").await;
    assert!(r.starts_with("a5 OK [CAPABILITY IMAP4REV1"), "{r}");
    for cap in [
        "IDLE",
        "UIDPLUS",
        "MOVE",
        "UNSELECT",
        "NAMESPACE",
        "CONDSTORE",
        "SPECIAL-USE",
        "ID",
        "ENABLE",
        "LITERAL+",
        "STATUS=SIZE",
        "APPENDLIMIT=100000",
    ] {
        assert!(r.contains(&format!(" {cap}")), "{cap} missing: {r}");
    }
    assert!(!r.contains("AUTH=PLAIN"), "no AUTH= after login: {r}");
    let r = c.cmd("a6 LOGIN alice secret").await;
    assert!(r.starts_with("a6 BAD"), "already authenticated: {r}");
    let r = c.cmd("a7 FETCH 1 FLAGS").await;
    assert!(
        r.starts_with("a7 BAD") && r.contains("no mailbox selected"),
        "{r}"
    );
    let r = c.cmd("a8 ID (\"name\" \"test\")").await;
    assert!(r.starts_with("* ID (\"name\" \"Tern\""), "{r}");
    let r = c.ok("a9 NAMESPACE").await;
    assert!(r.starts_with("* NAMESPACE ((\"\" \"/\")) NIL NIL"), "{r}");
    let r = c.ok("a10 ENABLE CONDSTORE").await;
    assert!(r.starts_with("* ENABLED CONDSTORE"), "{r}");
    let r = c.cmd("a11 FROBNICATE").await;
    assert!(r.starts_with("a11 BAD"), "{r}");
    let r = c.cmd("a12 LOGOUT").await;
    assert!(r.starts_with("* BYE") && r.contains("a12 OK"), "{r}");
    assert!(c.closed);

    // Without plaintext allowed (no TLS yet): LOGINDISABLED, and logins are refused.
    let mut c = Client::new(
        &env,
        ImapConfig {
            allow_plaintext: false,
            ..config()
        },
    );
    let greeting = String::from_utf8_lossy(&c.out.take()).into_owned();
    assert!(
        greeting.contains("LOGINDISABLED") && !greeting.contains("AUTH=PLAIN"),
        "{greeting}"
    );
    let r = c.cmd("b1 LOGIN alice secret").await;
    assert!(r.starts_with("b1 NO [PRIVACYREQUIRED]"), "{r}");
    let r = c.cmd("b2 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert!(r.starts_with("b2 NO [PRIVACYREQUIRED]"), "{r}");
}

#[tokio::test]
async fn authenticate_plain_with_and_without_initial_response() {
    let env = env().await;
    let mut c = Client::new(&env, config());
    // "\0alice\0secret"
    let r = c.cmd("p1 AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert!(r.contains("p1 OK"), "SASL-IR: {r}");

    let mut c = Client::new(&env, config());
    c.out.take();
    let r = c.cmd("p2 AUTHENTICATE PLAIN").await;
    assert_eq!(r, "+ \r\n");
    let r = c.cmd("*").await;
    assert!(r.starts_with("p2 BAD"), "cancelled: {r}");
    let r = c.cmd("p3 AUTHENTICATE PLAIN").await;
    assert_eq!(r, "+ \r\n");
    // authzid "alice" = authcid: accepted (FairEmail sends this).
    let r = c.cmd("YWxpY2UAYWxpY2UAc2VjcmV0").await;
    assert!(r.starts_with("p3 OK"), "{r}");

    let mut c = Client::new(&env, config());
    c.out.take();
    // "bob\0alice\0secret": acting as someone else.
    let r = c
        .cmd("p4 AUTHENTICATE PLAIN Ym9iAGFsaWNlAHNlY3JldA==")
        .await;
    assert!(r.starts_with("p4 NO [AUTHORIZATIONFAILED]"), "{r}");
    let r = c.cmd("p5 AUTHENTICATE PLAIN AGFsaWNlAHdyb25n").await;
    assert!(r.starts_with("p5 NO [AUTHENTICATIONFAILED]"), "{r}");
    let r = c.cmd("p6 AUTHENTICATE CRAM-MD5").await;
    assert!(r.starts_with("p6 NO"), "{r}");
    let r = c.cmd("p7 AUTHENTICATE PLAIN").await;
    assert_eq!(r, "+ \r\n");
    let r = c.cmd("not base64 !!").await;
    assert!(r.starts_with("p7 BAD"), "{r}");
    // The session is back to reading commands.
    let r = c.cmd("p8 NOOP").await;
    assert!(r.starts_with("p8 OK"), "{r}");
}

#[tokio::test]
async fn limits_have_clear_answers() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    // A synchronizing literal over APPENDLIMIT: NO [TOOBIG], no continuation, and the
    // connection goes on.
    let r = c.cmd("t1 APPEND INBOX {200000}").await;
    assert!(r.starts_with("t1 NO [TOOBIG]"), "{r}");
    let r = c.cmd("t2 NOOP").await;
    assert!(r.starts_with("t2 OK"), "{r}");
    // An acceptable one gets a continuation request.
    let r = c.cmd("t3 APPEND INBOX {5}").await;
    assert!(r.starts_with("+ "), "{r}");
    let r = c.cmd("hello").await;
    assert!(r.contains("t3 OK [APPENDUID"), "{r}");
    // A line longer than the limit: BYE, connection closed.
    let long = format!("t4 NOOP {}", "x".repeat(3_000));
    let r = c.cmd(&long).await;
    assert!(r.contains("* BYE"), "{r}");
    assert!(c.closed);

    let mut c = Client::login(&env).await;
    let r = c.cmd("t5 APPEND INBOX {200000+}").await;
    assert!(
        r.contains("* BYE"),
        "non-synchronizing literal over the limit: {r}"
    );
    assert!(c.closed);
}

#[tokio::test]
async fn mailbox_management() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    let r = c.ok("m1 LIST \"\" \"*\"").await;
    for line in [
        "* LIST (\\HasNoChildren) \"/\" INBOX",
        "* LIST (\\HasNoChildren \\Sent) \"/\" Sent",
        "* LIST (\\HasNoChildren \\Trash) \"/\" Trash",
        "* LIST (\\HasNoChildren \\Drafts) \"/\" Drafts",
        "* LIST (\\HasNoChildren \\Junk) \"/\" Junk",
        "* LIST (\\HasNoChildren \\Archive) \"/\" Archive",
    ] {
        assert!(r.contains(line), "{line} missing: {r}");
    }
    let r = c.ok("m2 LIST \"\" \"\"").await;
    assert!(r.starts_with("* LIST (\\Noselect) \"/\" \"\""), "{r}");

    // CREATE makes the superior names too.
    c.ok("m3 CREATE Work/2026/Q1").await;
    let r = c.ok("m4 LIST \"\" \"Work/%\"").await;
    assert!(
        r.contains("* LIST (\\HasChildren) \"/\" Work/2026\r\n"),
        "{r}"
    );
    assert!(!r.contains("Q1"), "% stops at the delimiter: {r}");
    let r = c.cmd("m5 CREATE Work").await;
    assert!(r.starts_with("m5 NO [ALREADYEXISTS]"), "{r}");
    let r = c.cmd("m6 CREATE inbox").await;
    assert!(r.starts_with("m6 NO [ALREADYEXISTS]"), "{r}");
    c.ok("m7 RENAME Work Job").await;
    let r = c.ok("m8 LIST \"\" \"*\"").await;
    assert!(
        r.contains("\"/\" Job/2026/Q1") && !r.contains("Work"),
        "{r}"
    );
    let r = c.cmd("m9 RENAME Nope Other").await;
    assert!(r.starts_with("m9 NO [NONEXISTENT]"), "{r}");
    c.ok("m10 DELETE Job/2026/Q1").await;
    let r = c.cmd("m11 SELECT Job/2026/Q1").await;
    assert!(r.starts_with("m11 NO [NONEXISTENT]"), "{r}");
    let r = c.cmd("m12 DELETE INBOX").await;
    assert!(r.starts_with("m12 NO"), "{r}");
    let r = c.cmd("m13 DELETE Nope").await;
    assert!(r.starts_with("m13 NO [NONEXISTENT]"), "{r}");

    c.ok("m14 UNSUBSCRIBE Junk").await;
    let r = c.ok("m15 LSUB \"\" \"*\"").await;
    assert!(
        r.contains("* LSUB () \"/\" INBOX") && !r.contains("Junk"),
        "{r}"
    );
    c.ok("m16 SUBSCRIBE Junk").await;
    let r = c.ok("m17 LSUB \"\" \"J*\"").await;
    assert!(r.contains("* LSUB () \"/\" Junk"), "{r}");

    c.append("INBOX", "(\\Seen)", &message("one", "first"))
        .await;
    c.append("INBOX", "()", &message("two", "second")).await;
    let r = c
        .ok("m18 STATUS INBOX (MESSAGES UIDNEXT UIDVALIDITY UNSEEN SIZE HIGHESTMODSEQ RECENT DELETED)")
        .await;
    assert!(
        r.starts_with("* STATUS INBOX (MESSAGES 2 UIDNEXT 3 UIDVALIDITY "),
        "{r}"
    );
    assert!(
        r.contains(" UNSEEN 1 SIZE ") && r.contains(" HIGHESTMODSEQ 2 RECENT 0 DELETED 0)"),
        "{r}"
    );
    let r = c.cmd("m19 STATUS Nope (MESSAGES)").await;
    assert!(r.starts_with("m19 NO [NONEXISTENT]"), "{r}");

    // RENAME INBOX moves its messages and leaves INBOX empty.
    c.ok("m20 RENAME INBOX Old").await;
    let r = c.ok("m21 STATUS Old (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 2)"), "{r}");
    let r = c.ok("m22 STATUS INBOX (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 0)"), "{r}");
}

#[tokio::test]
async fn select_append_and_fetch() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    let r = c
        .append(
            "INBOX",
            "(\\Flagged $Work) \"07-Feb-1994 21:52:25 -0800\"",
            &message("Hello", "hi"),
        )
        .await;
    assert!(r.contains("ap OK [APPENDUID "), "{r}");
    assert!(r.contains(" 1] "), "{r}");
    let r = c.cmd("x APPEND Nope {3+}\r\nabc").await;
    assert!(r.starts_with("x NO [TRYCREATE]"), "{r}");

    let r = c.ok("s1 SELECT INBOX").await;
    assert!(
        r.contains("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work)"),
        "{r}"
    );
    assert!(r.contains("* 1 EXISTS\r\n* 0 RECENT\r\n"), "{r}");
    assert!(r.contains("* OK [UNSEEN 1]"), "{r}");
    assert!(
        r.contains(
            "* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft $Work \\*)]"
        ),
        "{r}"
    );
    assert!(
        r.contains("* OK [UIDVALIDITY ") && r.contains("* OK [UIDNEXT 2]"),
        "{r}"
    );
    assert!(r.contains("* OK [HIGHESTMODSEQ 1]"), "{r}");
    assert!(r.contains("s1 OK [READ-WRITE]"), "{r}");

    let r = c
        .ok("f1 FETCH 1 (FLAGS UID INTERNALDATE RFC822.SIZE ENVELOPE BODYSTRUCTURE)")
        .await;
    let size = message("Hello", "hi").len();
    assert!(
        r.starts_with(
            "* 1 FETCH (FLAGS (\\Flagged $Work) UID 1 INTERNALDATE \"07-Feb-1994 21:52:25 -0800\""
        ),
        "{r}"
    );
    assert!(r.contains(&format!("RFC822.SIZE {size} ")), "{r}");
    assert!(r.contains("ENVELOPE (\"Tue, 3 Mar 2026 10:00:00 +0100\" \"Hello\" ((\"Bob\" NIL \"bob\" \"example.org\"))"), "{r}");
    assert!(r.contains("BODYSTRUCTURE (\"TEXT\" \"PLAIN\""), "{r}");

    // A PEEK leaves \Seen alone; header fields are filtered, partials cut.
    let r = c
        .ok("f2 FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT]<0.1>)")
        .await;
    assert!(
        r.contains("BODY[HEADER.FIELDS (SUBJECT)] {18}\r\nSubject: Hello\r\n\r\n"),
        "{r}"
    );
    assert!(r.contains("BODY[TEXT]<0> {1}\r\nh"), "{r}");
    assert!(!r.contains("\\Seen"), "{r}");
    let r = c.ok("f3 FETCH 1 (BODY[1] RFC822.HEADER)").await;
    assert!(
        r.contains("BODY[1] {4}\r\nhi\r\n"),
        "BODY[1] of a single-part message: {r}"
    );
    assert!(
        r.contains("FLAGS (\\Flagged \\Seen $Work)"),
        "\\Seen set and reported: {r}"
    );
    let r = c.ok("f4 FETCH 1 (BODY[])").await;
    assert!(
        r.contains(&format!("BODY[] {{{size}}}\r\nFrom: Bob")),
        "{r}"
    );
    assert!(
        !r.contains("FLAGS"),
        "already \\Seen: nothing to report: {r}"
    );

    // UID FETCH always returns the UID; a UID that does not exist is not an error.
    let r = c.ok("f5 UID FETCH 1:* (FLAGS)").await;
    assert!(r.starts_with("* 1 FETCH (UID 1 FLAGS"), "{r}");
    let r = c.ok("f6 UID FETCH 7 (FLAGS)").await;
    assert!(r.starts_with("f6 OK"), "{r}");
    // Sequence numbers must exist.
    let r = c.cmd("f7 FETCH 2 (FLAGS)").await;
    assert!(
        r.starts_with("f7 BAD") && r.contains("invalid sequence number 2"),
        "{r}"
    );
    let r = c.cmd("f8 FETCH 0 (FLAGS)").await;
    assert!(r.starts_with("f8 BAD"), "{r}");
    let r = c.cmd("f9 FETCH 1 (BINARY[1])").await;
    assert!(r.starts_with("f9 BAD"), "{r}");
    let r = c.ok("f10 FETCH 1 (MODSEQ)").await;
    assert!(r.starts_with("* 1 FETCH (MODSEQ (2))"), "{r}");
    let r = c.ok("f11 FETCH 1 (FLAGS) (CHANGEDSINCE 2)").await;
    assert!(!r.contains("* 1 FETCH"), "nothing changed since 2: {r}");

    // EXAMINE is read-only: no \Seen, no STORE.
    let r = c.ok("e1 EXAMINE INBOX").await;
    assert!(
        r.contains("[PERMANENTFLAGS ()]") && r.contains("e1 OK [READ-ONLY]"),
        "{r}"
    );
    let r = c.cmd("e2 STORE 1 +FLAGS (\\Deleted)").await;
    assert!(r.starts_with("e2 NO"), "{r}");

    // A multipart message: sections by part number, MIME headers.
    c.ok("s2 SELECT INBOX").await;
    let multipart = "From: a@b\r\nSubject: parts\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n\
part one\r\n--B\r\nContent-Type: text/html\r\n\r\n<p>two</p>\r\n--B--\r\n";
    let r = c.append("INBOX", "()", multipart).await;
    assert!(
        r.contains("* 2 EXISTS"),
        "APPEND to the selected mailbox reports it: {r}"
    );
    let r = c
        .ok("f12 FETCH 2 (BODY.PEEK[2] BODY.PEEK[2.MIME] BODY.PEEK[3])")
        .await;
    assert!(r.contains("BODY[2] {10}\r\n<p>two</p>"), "{r}");
    assert!(
        r.contains("BODY[2.MIME] {27}\r\nContent-Type: text/html\r\n\r\n"),
        "{r}"
    );
    assert!(r.contains("BODY[3] NIL"), "{r}");
}

#[tokio::test]
async fn store_flags_and_keywords() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    for i in 0..3 {
        c.append("INBOX", "()", &message(&format!("m{i}"), "x"))
            .await;
    }
    c.ok("s SELECT INBOX").await;
    let r = c.ok("a STORE 1:2 +FLAGS (\\Seen)").await;
    assert!(
        r.contains("* 1 FETCH (FLAGS (\\Seen))") && r.contains("* 2 FETCH (FLAGS (\\Seen))"),
        "{r}"
    );
    let r = c.ok("b STORE 2 -FLAGS.SILENT (\\Seen)").await;
    assert!(!r.contains("FETCH"), "silent: {r}");
    // A new keyword is announced in FLAGS before any FETCH shows it.
    let r = c.ok("c UID STORE 3 FLAGS ($Todo \\Flagged)").await;
    let flags_at = r.find("* FLAGS (").expect("FLAGS announced");
    let fetch_at = r
        .find("* 3 FETCH (FLAGS (\\Flagged $Todo) UID 3)")
        .expect(&r);
    assert!(flags_at < fetch_at, "{r}");
    let r = c.ok("d FETCH 1:3 (FLAGS)").await;
    assert!(r.contains("* 1 FETCH (FLAGS (\\Seen))\r\n* 2 FETCH (FLAGS ())\r\n* 3 FETCH (FLAGS (\\Flagged $Todo))"), "{r}");
    // \Recent cannot be stored.
    c.ok("e STORE 2 +FLAGS (\\Recent)").await;
    let r = c.ok("f FETCH 2 (FLAGS)").await;
    assert!(r.contains("* 2 FETCH (FLAGS ())"), "{r}");

    // CONDSTORE: UNCHANGEDSINCE refuses messages modified since.
    let r = c.ok("g FETCH 1:3 (MODSEQ)").await;
    assert!(r.contains("* 1 FETCH (MODSEQ (4))"), "{r}");
    let r = c
        .ok("h STORE 1,3 (UNCHANGEDSINCE 4) +FLAGS (\\Answered)")
        .await;
    assert!(r.contains("h OK [MODIFIED 3]"), "{r}");
    assert!(
        r.contains("* 1 FETCH (FLAGS (\\Answered \\Seen) UID 1 MODSEQ ("),
        "{r}"
    );
    let r = c.cmd("i STORE 9 +FLAGS (\\Seen)").await;
    assert!(r.starts_with("i BAD"), "{r}");
}

#[tokio::test]
async fn search_keys() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    c.append(
        "INBOX",
        "(\\Seen) \"01-Jan-2020 10:00:00 +0000\"",
        &message("Quarterly report", "numbers inside"),
    )
    .await;
    let encoded = "From: =?utf-8?q?J=C3=B6rg?= <jorg@example.org>\r\nSubject: =?utf-8?b?w4ljb2xl?=\r\n\
Date: Sun, 1 Mar 2026 23:30:00 -0500\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\r\nCaf=C3=A9 cr=C3=A8me\r\n";
    c.append(
        "INBOX",
        "(\\Flagged) \"15-Jun-2026 12:00:00 +0200\"",
        encoded,
    )
    .await;
    c.append("INBOX", "()", &message("third", &"long body ".repeat(200)))
        .await;
    c.ok("s SELECT INBOX").await;
    let cases = [
        ("ALL", "* SEARCH 1 2 3"),
        ("UNSEEN", "* SEARCH 2 3"),
        ("FLAGGED", "* SEARCH 2"),
        ("NOT FLAGGED SEEN", "* SEARCH 1"),
        ("OR SEEN FLAGGED", "* SEARCH 1 2"),
        ("SUBJECT REPORT", "* SEARCH 1"),
        ("SUBJECT {6+}\r\nécole", "* SEARCH 2"),
        ("SUBJECT \"\"", "* SEARCH 1 2 3"),
        ("FROM {5+}\r\njörg", "* SEARCH 2"),
        ("FROM BOB", "* SEARCH 1 3"),
        ("HEADER Message-ID third@", "* SEARCH 3"),
        ("BODY {6+}\r\nCRÈME", "* SEARCH 2"),
        ("TEXT quarterly", "* SEARCH 1"),
        ("TEXT numbers", "* SEARCH 1"),
        ("LARGER 1000", "* SEARCH 3"),
        ("SMALLER 1000", "* SEARCH 1 2"),
        ("BEFORE 2-Jan-2020", "* SEARCH 1"),
        ("ON 15-Jun-2026", "* SEARCH 2"),
        ("SENTON 1-Mar-2026", "* SEARCH 2"),
        ("SENTSINCE 3-Mar-2026", "* SEARCH 1 3"),
        ("2:*", "* SEARCH 2 3"),
        ("UID 1:4294967295 UNSEEN", "* SEARCH 2 3"),
        ("NEW", "* SEARCH"),
        ("OLD", "* SEARCH 1 2 3"),
        ("CHARSET UTF-8 SUBJECT {6+}\r\nécole", "* SEARCH 2"),
    ];
    for (i, (criteria, expected)) in cases.iter().enumerate() {
        let r = c.ok(&format!("q{i} SEARCH {criteria}")).await;
        assert!(
            r.starts_with(&format!("{expected}\r\n")),
            "SEARCH {criteria} -> {r}"
        );
    }
    let r = c.ok("u UID SEARCH UID 2:3").await;
    assert!(r.starts_with("* SEARCH 2 3\r\n"), "{r}");
    let r = c.ok("m SEARCH MODSEQ 2").await;
    assert!(r.starts_with("* SEARCH 2 3 (MODSEQ 3)\r\n"), "{r}");
    let r = c.cmd("b SEARCH CHARSET KOI8-R SUBJECT x").await;
    assert!(r.starts_with("b NO [BADCHARSET (UTF-8 US-ASCII)]"), "{r}");
    let r = c.cmd("b2 SEARCH 7").await;
    assert!(r.contains("b2 OK") || r.contains("b2 BAD"), "{r}");

    // Metadata searches read no body: with every body blob gone, they still work, and a body
    // search is what fails.
    let prefix = format!("m/{}/", env.user_id.0);
    let page = env.store.blobs.list(&prefix, None).await.unwrap();
    assert_eq!(page.blobs.len(), 3);
    for blob in page.blobs {
        env.store.blobs.delete(&blob.key).await.unwrap();
    }
    let r = c.ok("x1 UID SEARCH UID 1:4294967295").await;
    assert!(r.starts_with("* SEARCH 1 2 3\r\n"), "{r}");
    let r = c.ok("x2 SEARCH UNSEEN SUBJECT third LARGER 10").await;
    assert!(r.starts_with("* SEARCH 3\r\n"), "{r}");
    let r = c.cmd("x3 SEARCH BODY anything").await;
    assert!(r.starts_with("x3 NO"), "{r}");
}

#[tokio::test]
async fn copy_move_expunge() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    for i in 0..4 {
        c.append("INBOX", "()", &message(&format!("m{i}"), "x"))
            .await;
    }
    c.ok("s SELECT INBOX").await;
    let r = c.ok("c1 COPY 1:2 Archive").await;
    assert!(r.contains("c1 OK [COPYUID "), "{r}");
    assert!(r.contains(" 1:2 1:2]"), "{r}");
    let r = c.cmd("c2 COPY 1 Nope").await;
    assert!(r.starts_with("c2 NO [TRYCREATE]"), "{r}");
    // Into the same mailbox: a new message.
    let r = c.ok("c3 UID COPY 4 INBOX").await;
    assert!(r.contains(" 4 5]") && r.contains("* 5 EXISTS"), "{r}");
    let r = c
        .ok("c4 FETCH 5 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        .await;
    assert!(r.contains("Subject: m3"), "{r}");

    // MOVE: COPYUID, then EXPUNGE responses, highest first when several.
    let r = c.ok("v1 MOVE 2:3 Trash").await;
    let copyuid = r.find("* OK [COPYUID ").expect(&r);
    let expunge = r.find("* 3 EXPUNGE\r\n* 2 EXPUNGE\r\n").expect(&r);
    assert!(copyuid < expunge, "{r}");
    let r = c.ok("v2 STATUS Trash (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 2)"), "{r}");
    // Back into the mailbox it was moved out of: it shows up again (a fresh message).
    c.ok("v3 SELECT Trash").await;
    c.ok("v4 MOVE 1 INBOX").await;
    let r = c.ok("v5 STATUS INBOX (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 4)"), "{r}");

    c.ok("s2 SELECT INBOX").await;
    c.ok("d1 STORE 1,2 +FLAGS.SILENT (\\Deleted)").await;
    let r = c.ok("d2 UID EXPUNGE 1").await;
    assert!(
        r.contains("* 1 EXPUNGE") && !r.contains("* 2 EXPUNGE"),
        "{r}"
    );
    let r = c.ok("d3 EXPUNGE").await;
    assert!(r.contains("* 1 EXPUNGE"), "{r}");
    let r = c.ok("d4 STATUS INBOX (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 2)"), "{r}");
    c.ok("d5 STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let r = c.ok("d6 UNSELECT").await;
    assert!(!r.contains("EXPUNGE"), "{r}");
    c.ok("d7 SELECT INBOX").await;
    let r = c.ok("d8 CLOSE").await;
    assert!(!r.contains("EXPUNGE"), "CLOSE expunges silently: {r}");
    let r = c.ok("d9 STATUS INBOX (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 1)"), "{r}");
    let r = c.cmd("d10 EXPUNGE").await;
    assert!(r.starts_with("d10 BAD"), "not selected: {r}");
}

#[tokio::test]
async fn two_sessions_see_each_others_changes() {
    let env = env().await;
    let mut a = Client::login(&env).await;
    let mut b = Client::login(&env).await;
    for i in 0..3 {
        a.append("INBOX", "()", &message(&format!("m{i}"), "x"))
            .await;
    }
    a.ok("a1 SELECT INBOX").await;
    b.ok("b1 SELECT INBOX").await;

    a.append("INBOX", "()", &message("new", "x")).await;
    let r = b.ok("b2 NOOP").await;
    assert!(r.contains("* 4 EXISTS"), "{r}");
    a.ok("a2 STORE 2 +FLAGS (\\Flagged $Later)").await;
    let r = b.ok("b3 NOOP").await;
    assert!(r.contains("* FLAGS ("), "new keyword announced first: {r}");
    assert!(
        r.contains("* 2 FETCH (FLAGS (\\Flagged $Later) UID 2)"),
        "{r}"
    );

    // An expunge by A is not reported to B during FETCH (sequence numbers must not move), but
    // the message can still be fetched; the next NOOP reports it.
    a.ok("a3 STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    a.ok("a4 EXPUNGE").await;
    let r = b.ok("b4 FETCH 1:4 (UID)").await;
    assert!(!r.contains("EXPUNGE"), "{r}");
    assert!(
        r.contains("* 1 FETCH (UID 1)") && r.contains("* 4 FETCH (UID 4)"),
        "{r}"
    );
    let r = b.ok("b5 SEARCH ALL").await;
    assert!(!r.contains("EXPUNGE"), "{r}");
    let r = b.ok("b6 NOOP").await;
    assert!(r.contains("* 1 EXPUNGE"), "{r}");
    let r = b.ok("b7 FETCH 1 (UID)").await;
    assert!(r.contains("* 1 FETCH (UID 2)"), "{r}");
    // UID FETCH may report it at once.
    a.ok("a5 STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    a.ok("a6 EXPUNGE").await;
    let r = b.ok("b8 UID FETCH 1:* (FLAGS)").await;
    assert!(r.contains("* 1 EXPUNGE"), "{r}");
}

#[tokio::test]
async fn idle_is_woken_by_another_session() {
    let env = env().await;
    let mut a = Client::login(&env).await;
    let mut b = Client::login(&env).await;
    b.ok("b1 SELECT INBOX").await;
    let r = b.cmd("b2 IDLE").await;
    assert_eq!(r, "+ idling\r\n");
    assert!(b.session.idling());

    a.append("INBOX", "()", &message("ping", "x")).await;
    tokio::time::timeout(Duration::from_secs(5), b.session.changed())
        .await
        .expect("the mailbox watcher wakes the idle session");
    b.session.idle_update(&mut b.out).await.unwrap();
    let r = String::from_utf8_lossy(&b.out.take()).into_owned();
    assert_eq!(r, "* 1 EXISTS\r\n");
    let r = b.cmd("DONE").await;
    assert!(r.starts_with("b2 OK"), "{r}");
    assert!(!b.session.idling());

    // Anything but DONE ends IDLE with BAD.
    b.cmd("b3 IDLE").await;
    let r = b.cmd("b4 NOOP").await;
    assert!(r.starts_with("b3 BAD"), "{r}");
    let r = b.cmd("b5 NOOP").await;
    assert!(r.starts_with("b5 OK"), "{r}");
}

#[tokio::test]
async fn many_messages_and_big_sets_stay_cheap() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    for i in 0..50 {
        c.append("INBOX", "()", &message(&format!("n{i}"), "x"))
            .await;
    }
    let r = c.ok("s SELECT INBOX").await;
    assert!(r.contains("* 50 EXISTS"), "{r}");
    let t = std::time::Instant::now();
    let r = c.ok("u UID SEARCH UID 1:4294967295").await;
    assert!(r.starts_with("* SEARCH 1 2 3"), "{r}");
    let r = c.ok("f UID FETCH 1:4294967295 (FLAGS)").await;
    assert_eq!(r.matches(" FETCH (").count(), 50);
    let r = c.ok("g UID FETCH 45:* (UID)").await;
    assert_eq!(r.matches(" FETCH (").count(), 6, "{r}");
    let r = c.ok("h UID FETCH 100:* (UID)").await;
    assert!(
        r.starts_with("* 50 FETCH (UID 50)"),
        "n:* includes the last UID: {r}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

fn code_value(r: &str, name: &str) -> u64 {
    let at = r.find(&format!("[{name} ")).expect(name) + name.len() + 2;
    r[at..].split(']').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn qresync_reports_vanished_uids_and_changed_flags() {
    let env = env().await;
    let mut a = Client::login(&env).await;
    for i in 0..6 {
        a.append("INBOX", "()", &message(&format!("q{i}"), "x"))
            .await;
    }
    let r = a.ok("a1 SELECT INBOX").await;
    let (v, m) = (
        code_value(&r, "UIDVALIDITY"),
        code_value(&r, "HIGHESTMODSEQ"),
    );
    a.ok("a2 STORE 2 +FLAGS (\\Flagged)").await;
    a.ok("a3 STORE 3,5 +FLAGS.SILENT (\\Deleted)").await;
    a.ok("a4 EXPUNGE").await;

    let mut b = Client::login(&env).await;
    let r = b.cmd(&format!("b0 SELECT INBOX (QRESYNC ({v} {m}))")).await;
    assert!(r.starts_with("b0 BAD"), "needs ENABLE first: {r}");
    let r = b.ok("b1 ENABLE QRESYNC").await;
    assert!(r.contains("* ENABLED QRESYNC"), "{r}");
    let r = b.ok(&format!("b2 SELECT INBOX (QRESYNC ({v} {m}))")).await;
    assert!(r.contains("* VANISHED (EARLIER) 3,5\r\n"), "{r}");
    assert!(
        r.contains("* 2 FETCH (UID 2 FLAGS (\\Flagged) MODSEQ ("),
        "{r}"
    );
    assert!(!r.contains("UID 1 FLAGS") && !r.contains("EXPUNGE"), "{r}");
    // Known UIDs bound the VANISHED set.
    let r = b
        .ok(&format!("b3 SELECT INBOX (QRESYNC ({v} {m} 1:4))"))
        .await;
    assert!(r.contains("* VANISHED (EARLIER) 3\r\n"), "{r}");
    // Another UIDVALIDITY: the client's cache is void, nothing incremental is sent.
    let r = b
        .ok(&format!("b4 SELECT INBOX (QRESYNC ({} {m}))", v + 1))
        .await;
    assert!(!r.contains("VANISHED") && !r.contains("FETCH"), "{r}");

    // Live expunges reach a QRESYNC client as UIDs.
    a.ok("a5 STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    a.ok("a6 EXPUNGE").await;
    let r = b.ok("b5 NOOP").await;
    assert!(
        r.contains("* VANISHED 1\r\n") && !r.contains("EXPUNGE"),
        "{r}"
    );
    let r = b
        .ok(&format!(
            "b6 UID FETCH 1:* (FLAGS) (CHANGEDSINCE {m} VANISHED)"
        ))
        .await;
    assert!(r.contains("* VANISHED (EARLIER) 1,3,5\r\n"), "{r}");
    assert!(r.contains("FETCH (UID 2 FLAGS (\\Flagged) MODSEQ"), "{r}");
    let r = b.cmd("b7 UID FETCH 1:* (FLAGS) (VANISHED)").await;
    assert!(
        r.starts_with("b7 BAD"),
        "VANISHED without CHANGEDSINCE: {r}"
    );
    let r = b.ok("b8 CAPABILITY").await;
    assert!(r.contains("QRESYNC"), "{r}");
}

#[tokio::test]
async fn quota_roots_usage_and_over_quota_appends() {
    let env = env().await;
    let mut c = Client::login(&env).await;
    let r = c.ok("q1 GETQUOTAROOT INBOX").await;
    assert!(
        r.starts_with("* QUOTAROOT INBOX\r\n"),
        "no limit, no root: {r}"
    );
    let r = c.cmd("q2 GETQUOTA \"\"").await;
    assert!(r.starts_with("q2 NO [NONEXISTENT]"), "{r}");
    c.ok("q3 LOGOUT").await;

    // The administrator sets a 6 KiB limit.
    let mut user = (*env
        .accounts
        .directory()
        .user("alice")
        .await
        .unwrap()
        .unwrap())
    .clone();
    user.quota_bytes = Some(6 * 1024);
    env.accounts.directory().put(user, true).await.unwrap();
    let mut c = Client::login(&env).await;
    let r = c.ok("q4 CAPABILITY").await;
    assert!(
        r.contains(" QUOTA ") && r.contains("QUOTA=RES-STORAGE"),
        "{r}"
    );
    c.append("INBOX", "()", &message("small", &"x".repeat(1000)))
        .await;
    let r = c.ok("q5 GETQUOTAROOT INBOX").await;
    assert!(r.contains("* QUOTAROOT INBOX \"\"\r\n"), "{r}");
    assert!(r.contains("* QUOTA \"\" (STORAGE 2 6)"), "{r}");
    let r = c.ok("q6 GETQUOTA \"\"").await;
    assert!(r.contains("* QUOTA \"\" (STORAGE 2 6)"), "{r}");
    let big = message("big", &"y".repeat(5000));
    let r = c
        .raw(format!("q7 APPEND INBOX {{{}+}}\r\n{big}\r\n", big.len()).as_bytes())
        .await;
    assert!(r.starts_with("q7 NO [OVERQUOTA]"), "{r}");
    let r = c.cmd("q8 SETQUOTA \"\" (STORAGE 100)").await;
    assert!(r.starts_with("q8 NO [NOPERM]"), "{r}");
    let r = c.cmd("q9 GETQUOTAROOT Nope").await;
    assert!(r.starts_with("q9 NO [NONEXISTENT]"), "{r}");
}

#[tokio::test]
async fn the_server_sweeps_the_bodies_of_a_deleted_mailbox() {
    let env = env().await;
    env.accounts.set_sweep(Some((
        Duration::from_millis(50),
        crate::mail::sweep::SweepConfig {
            grace: Duration::ZERO,
            ..Default::default()
        },
    )));
    let bodies = format!("m/{}/", env.user_id.0);
    let count = || async {
        env.store
            .blobs
            .list(&bodies, None)
            .await
            .unwrap()
            .blobs
            .len()
    };
    let mut c = Client::login(&env).await;
    c.ok("s1 CREATE Doomed").await;
    c.append("Doomed", "()", &message("doomed", "bye")).await;
    c.append("INBOX", "()", &message("kept", "stay")).await;
    assert_eq!(count().await, 2);
    c.ok("s2 DELETE Doomed").await;
    // Two passes, no grace: the body only the deleted mailbox referenced goes; INBOX's stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count().await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deleted mailbox's body is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.ok("s3 SELECT INBOX").await;
    let r = c.ok("s4 FETCH 1 BODY[TEXT]").await;
    assert!(r.contains("stay"), "{r}");
}
