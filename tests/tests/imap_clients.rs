//! Real IMAP clients from Debian against Tern's IMAP server, run in-process once on the local
//! store and once on a 1-node Garage:
//!
//! - `mbsync` (isync) and `offlineimap3` push a 520-message Maildir (500 in INBOX, 20 in a
//!   subfolder) to Tern, then sync changes made on both sides, then sync again with nothing
//!   changed: no mutating IMAP command may be sent, and every UID stays what it was.
//! - `neomutt`, driven by pushed keys under `script` (it needs a terminal), reads a message,
//!   flags another and saves the first to a new mailbox.
//!
//! Tern's side is read with Python's imaplib (`tests/clients/imap_tool.py`); both sides are
//! compared by Message-ID, flags and a hash of the message with LF line ends.
//!
//! Needs `mbsync`, `offlineimap`, `neomutt`, `script` and `python3` (`tests/run` installs them);
//! without one the test fails and says which package to install.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tern_server::crypto::{Argon2Params, UserSecrets};
use tern_server::imap::{ImapConfig, ImapServer};
use tern_server::mail::account::Accounts;
use tern_server::storage::{StorageConfig, Store};
use tern_server::users::{User, UserDirectory, UserId, YamlDirectory};
use tern_tests::garage::Garage;

const USER: &str = "alice";
const PASSWORD: &str = "correct horse";
/// The subfolder synced next to INBOX, to exercise CREATE and the hierarchy separator.
const SUBFOLDER: &str = "Lists/rust";
const INBOX_MESSAGES: usize = 500;
const SUBFOLDER_MESSAGES: usize = 20;
/// One run of a client; a hang fails the test instead of stalling CI.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

fn say(message: &str) {
    // Straight to the stderr handle: libtest does not capture it, so CI logs show it.
    let _ = writeln!(std::io::stderr().lock(), "[imap_clients] {message}");
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Local,
    Garage,
}

/// A temp dir, in RAM when /dev/shm has room: every APPEND makes the local store fsync a few
/// times, and on a VM disk that took 29 s instead of 8.5 s for offlineimap's 520 APPENDs.
/// Durability is not what these tests are about.
fn fast_tempdir() -> tempfile::TempDir {
    const NEEDED: u64 = 1 << 30;
    let shm = Path::new("/dev/shm");
    if let Ok(stat) = rustix::fs::statvfs(shm)
        && stat.f_bavail.saturating_mul(stat.f_frsize) >= NEEDED
        && let Ok(dir) = tempfile::tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().unwrap()
}

/// Tern's IMAP server, in this process, with one user.
struct Tern {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    // Dropped after the server: the store lives in them.
    _garage: Option<Garage>,
    _dir: tempfile::TempDir,
}

impl Tern {
    async fn start(backend: Backend) -> Tern {
        let dir = fast_tempdir();
        let (config, garage) = match backend {
            Backend::Local => (
                StorageConfig::Local {
                    path: dir.path().join("store"),
                },
                None,
            ),
            Backend::Garage => {
                let garage = Garage::single().await.expect("starting a 1-node Garage");
                (StorageConfig::Garage(garage.storage_config()), Some(garage))
            }
        };
        let store = Store::open(&config).await.unwrap();
        let users = YamlDirectory::open(dir.path().join("users.yaml"))
            .await
            .unwrap();
        // Cheap argon2id: the parameters are the user's, so this costs nothing in the server.
        let cheap = Argon2Params {
            memory_kib: 256,
            iterations: 1,
            parallelism: 1,
        };
        let (keys, _, _) = UserSecrets::create(PASSWORD, cheap, false).unwrap();
        users
            .put(
                User {
                    name: USER.into(),
                    id: UserId::generate(),
                    addresses: vec![format!("{USER}@localhost")],
                    quota_bytes: None,
                    keys,
                },
                false,
            )
            .await
            .unwrap();
        let accounts = Accounts::new(store, Arc::new(users));
        let server = ImapServer::new(
            ImapConfig {
                allow_plaintext: true,
                ..ImapConfig::default()
            },
            accounts,
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
        Tern {
            port,
            stop: Some(stop),
            serving: Some(serving),
            _garage: garage,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(serving) = self.serving.take() {
            serving.await.unwrap().unwrap();
        }
    }

    /// Runs `imap_tool.py` against this server.
    async fn tool(&self, args: &[&str], stdin: Option<String>) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/imap_tool.py");
        let mut command = tokio::process::Command::new("python3");
        command.arg(script).args([
            "--port",
            &self.port.to_string(),
            "--user",
            USER,
            "--password",
            PASSWORD,
        ]);
        command.args(args);
        let out = run(command, stdin, "imap_tool.py").await;
        String::from_utf8(out.stdout).unwrap()
    }

    /// What Tern holds in `mailboxes`. With an earlier read of a mailbox, only messages new
    /// since are downloaded: a UID names one message for good, so the others are known.
    async fn dump(&self, mailboxes: &[(&str, Option<&Remote>)]) -> BTreeMap<String, Remote> {
        let specs: Vec<String> = mailboxes
            .iter()
            .map(|(name, earlier)| match earlier {
                Some(earlier) => format!("{name}@{}", earlier.next_uid()),
                None => name.to_string(),
            })
            .collect();
        let mut args = vec!["dump"];
        args.extend(specs.iter().map(String::as_str));
        let json = self.tool(&args, None).await;
        let mut dumped: BTreeMap<String, Dumped> =
            serde_json::from_str(&json).expect("imap_tool.py dump output");
        mailboxes
            .iter()
            .map(|(name, earlier)| {
                let dumped = dumped.remove(*name).expect("a mailbox missing in the dump");
                (name.to_string(), Remote::new(name, dumped, *earlier))
            })
            .collect()
    }

    async fn change(&self, change: &serde_json::Value) {
        self.tool(&["change"], Some(change.to_string())).await;
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        if let Some(serving) = &self.serving {
            serving.abort();
        }
    }
}

/// Runs a command to its end with a timeout and fails the test with its output if it fails.
async fn run(mut command: tokio::process::Command, stdin: Option<String>, what: &str) -> Output {
    use tokio::io::AsyncWriteExt as _;
    command
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
        drop(pipe);
    }
    let out = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {CLIENT_TIMEOUT:?}"))
        .unwrap();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        tail(&out.stdout),
        tail(&out.stderr)
    );
    out
}

/// The last 60 lines, for failure messages (a sync log can be megabytes).
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Fails, naming the Debian package, when a client is not installed.
fn require(binary: &str, version_arg: &str, package: &str) {
    let found = std::process::Command::new(binary)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{binary} not found: install the Debian package {package} (tests/run does)"
    );
}

// ---------------------------------------------------------------------------------------------
// The mail: generated messages, and the state both sides are compared in.

/// A message as both sides must agree on it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Message {
    flags: BTreeSet<String>,
    sha256: String,
}

/// A mailbox by Message-ID.
type Mailbox = BTreeMap<String, Message>;

/// A mailbox as `imap_tool.py dump` prints it.
#[derive(Debug, Deserialize)]
struct Dumped {
    uidvalidity: u32,
    messages: Vec<DumpedMessage>,
}

#[derive(Debug, Deserialize)]
struct DumpedMessage {
    uid: u32,
    flags: Vec<String>,
    /// The whole message, when it was downloaded.
    hex: Option<String>,
}

/// Tern's side of a mailbox.
#[derive(Debug)]
struct Remote {
    uidvalidity: u32,
    /// UID → Message-ID and message.
    by_uid: BTreeMap<u32, (String, Message)>,
}

impl Remote {
    fn new(name: &str, dumped: Dumped, earlier: Option<&Remote>) -> Remote {
        let mut by_uid = BTreeMap::new();
        for m in dumped.messages {
            let flags = m.flags.into_iter().collect();
            let (id, sha256) = match (m.hex, earlier) {
                (Some(hex), _) => {
                    let bytes = hex::decode(hex).unwrap();
                    let text = String::from_utf8_lossy(&bytes).replace("\r\n", "\n");
                    let id = header_message_id(&text)
                        .unwrap_or_else(|| panic!("{name}: UID {} has no Message-ID", m.uid));
                    (id, sha256_lf(&bytes))
                }
                (None, Some(earlier)) => {
                    let (id, known) = earlier.by_uid.get(&m.uid).unwrap_or_else(|| {
                        panic!(
                            "{name}: UID {} is new but below an earlier highest UID",
                            m.uid
                        )
                    });
                    (id.clone(), known.sha256.clone())
                }
                (None, None) => panic!("{name}: UID {} was not downloaded", m.uid),
            };
            by_uid.insert(m.uid, (id, Message { flags, sha256 }));
        }
        Remote {
            uidvalidity: dumped.uidvalidity,
            by_uid,
        }
    }

    fn mailbox(&self, name: &str) -> Mailbox {
        let mut out = Mailbox::new();
        for (id, message) in self.by_uid.values() {
            let old = out.insert(id.clone(), message.clone());
            assert!(old.is_none(), "{name}: {id} is in Tern twice");
        }
        out
    }

    fn uids(&self) -> BTreeMap<String, u32> {
        self.by_uid
            .iter()
            .map(|(uid, (id, _))| (id.clone(), *uid))
            .collect()
    }

    fn uid_of(&self, id: &str) -> u32 {
        self.uids()[id]
    }

    /// Above every UID seen: messages added later have UIDs from here on.
    fn next_uid(&self) -> u32 {
        self.by_uid.keys().next_back().map_or(1, |uid| uid + 1)
    }
}

/// The hash both sides are compared by: of the message with LF line ends (as in a Maildir),
/// without mbsync's `X-TUID` header (it adds one to every message it uploads, to find it again
/// should the connection drop before APPENDUID arrives).
fn sha256_lf(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let head: Vec<&str> = head
        .lines()
        .filter(|line| !line.to_ascii_lowercase().starts_with("x-tuid:"))
        .collect();
    hex::encode(Sha256::digest(format!("{}\n\n{body}", head.join("\n"))))
}

/// A small deterministic generator (splitmix64), so that every run syncs the same mail.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "tern", "mail", "garage", "sync", "flag", "seen", "inbox", "folder", "causal", "log", "lease",
    "merge", "offline", "quote", "reply", "thread", "über", "naïve", "déjà", "vu",
];

fn text_lines(rng: &mut Rng, lines: usize) -> String {
    let mut out = String::new();
    for _ in 0..lines {
        let words = 3 + rng.below(10) as usize;
        let line: Vec<&str> = (0..words)
            .map(|_| WORDS[rng.below(WORDS.len() as u64) as usize])
            .collect();
        out.push_str(&line.join(" "));
        out.push('\n');
    }
    out
}

/// Base64-alphabet lines: a valid base64 body without a base64 crate.
fn base64_lines(rng: &mut Rng, lines: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for _ in 0..lines {
        for _ in 0..76 {
            out.push(ALPHABET[rng.below(64) as usize] as char);
        }
        out.push('\n');
    }
    out
}

/// Message `tag` number `i` (LF line ends, as in a Maildir): plain, quoted-printable,
/// multipart/alternative, multipart/mixed with an attachment, every 50th about 150 KB.
fn generate(tag: &str, i: usize) -> String {
    let mut rng = Rng(i as u64 * 7919 + tag.len() as u64);
    let id = format!("<{tag}-{i}@gen.example>");
    let subject = if i.is_multiple_of(4) {
        format!("=?UTF-8?Q?Gr=C3=BC=C3=9Fe_{i}?=")
    } else {
        format!("{tag} message {i}")
    };
    let mut head = format!(
        "From: Sender {i} <sender{i}@example.org>\n\
         To: {USER}@localhost\n\
         Subject: {subject}\n\
         Date: Tue, 3 Mar 2026 {:02}:{:02}:00 +0100\n\
         Message-ID: {id}\n\
         MIME-Version: 1.0\n",
        i / 60 % 24,
        i % 60
    );
    let token = format!("Body token {tag}-{i}-end.\n");
    let body = if i.is_multiple_of(50) {
        head.push_str("Content-Type: multipart/mixed; boundary=\"b1\"\n");
        format!(
            "\n--b1\nContent-Type: text/plain; charset=utf-8\n\n{token}{}\
             --b1\nContent-Type: application/octet-stream; name=\"big.bin\"\n\
             Content-Transfer-Encoding: base64\n\
             Content-Disposition: attachment; filename=\"big.bin\"\n\n{}--b1--\n",
            text_lines(&mut rng, 5),
            base64_lines(&mut rng, 2000)
        )
    } else if i.is_multiple_of(7) {
        head.push_str("Content-Type: multipart/mixed; boundary=\"b2\"\n");
        let lines = 20 + rng.below(60) as usize;
        format!(
            "\n--b2\nContent-Type: text/plain; charset=utf-8\n\n{token}{}\
             --b2\nContent-Type: image/png; name=\"x.png\"\n\
             Content-Transfer-Encoding: base64\n\n{}--b2--\n",
            text_lines(&mut rng, 10),
            base64_lines(&mut rng, lines)
        )
    } else if i.is_multiple_of(9) {
        head.push_str("Content-Type: multipart/alternative; boundary=\"b3\"\n");
        let text = text_lines(&mut rng, 8);
        format!(
            "\n--b3\nContent-Type: text/plain; charset=utf-8\n\n{token}{text}\
             --b3\nContent-Type: text/html; charset=utf-8\n\n<p>{token}{text}</p>\n--b3--\n"
        )
    } else if i % 5 == 1 {
        head.push_str(
            "Content-Type: text/plain; charset=iso-8859-1\n\
             Content-Transfer-Encoding: quoted-printable\n",
        );
        format!(
            "\n{token}Gr=FC=DFe aus Ber=\nlin.\n{}",
            text_lines(&mut rng, 3)
        )
    } else {
        head.push_str("Content-Type: text/plain; charset=utf-8\n");
        let lines = 1 + rng.below(120) as usize;
        format!("\n{token}{}", text_lines(&mut rng, lines))
    };
    head + &body
}

fn message_id(tag: &str, i: usize) -> String {
    format!("<{tag}-{i}@gen.example>")
}

/// The flags message `i` starts with, as Maildir letters (in the order Maildir wants).
fn initial_flags(i: usize) -> String {
    let mut letters = String::new();
    if i % 23 == 3 {
        letters.push('D');
    }
    if i.is_multiple_of(11) {
        letters.push('F');
    }
    if i.is_multiple_of(13) {
        letters.push('R');
    }
    if i.is_multiple_of(5) {
        letters.push('S');
    }
    letters
}

fn flag_of_letter(letter: char) -> Option<&'static str> {
    match letter {
        'D' => Some("\\Draft"),
        'F' => Some("\\Flagged"),
        'R' => Some("\\Answered"),
        'S' => Some("\\Seen"),
        'T' => Some("\\Deleted"),
        _ => None,
    }
}

fn flags_of_letters(letters: &str) -> BTreeSet<String> {
    letters
        .chars()
        .filter_map(flag_of_letter)
        .map(String::from)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Maildir: the near side of both sync clients.

/// Writes a message into a Maildir folder, in `cur` with its flags.
fn maildir_put(folder: &Path, unique: &str, text: &str, letters: &str) {
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(folder.join(sub)).unwrap();
    }
    let name = format!("{unique}.gen:2,{letters}");
    std::fs::write(folder.join("cur").join(name), text).unwrap();
}

/// Every message file of a Maildir folder (`cur` and `new`), sorted.
fn maildir_files(folder: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["cur", "new"] {
        let Ok(entries) = std::fs::read_dir(folder.join(sub)) else {
            continue;
        };
        for entry in entries {
            files.push(entry.unwrap().path());
        }
    }
    files.sort();
    files
}

fn maildir_letters(path: &Path) -> String {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    match name.rsplit_once(":2,") {
        Some((_, letters)) => letters.to_string(),
        None => String::new(),
    }
}

fn header_message_id(text: &str) -> Option<String> {
    let head = text.split("\n\n").next()?;
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("message-id")
            .then(|| value.trim().to_string())
    })
}

/// Message-ID → file.
fn maildir_index(folder: &Path) -> BTreeMap<String, PathBuf> {
    maildir_files(folder)
        .into_iter()
        .filter_map(|path| {
            let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
            Some((header_message_id(&text)?, path))
        })
        .collect()
}

fn maildir_read(folder: &Path) -> Mailbox {
    let mut out = Mailbox::new();
    for path in maildir_files(folder) {
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let id = header_message_id(&text)
            .unwrap_or_else(|| panic!("{} has no Message-ID", path.display()));
        let message = Message {
            flags: flags_of_letters(&maildir_letters(&path)),
            sha256: sha256_lf(&bytes),
        };
        let old = out.insert(id.clone(), message);
        assert!(old.is_none(), "{}: {id} twice", folder.display());
    }
    out
}

/// Sets the flags of a Maildir message by renaming it, as a mail reader would.
fn maildir_set_letters(path: &Path, letters: &str) {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let base = name.rsplit_once(":2,").map_or(name.as_str(), |(b, _)| b);
    let mut sorted: Vec<char> = letters.chars().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let renamed = format!("{base}:2,{}", sorted.into_iter().collect::<String>());
    std::fs::rename(path, path.with_file_name(renamed)).unwrap();
}

/// The file names of a Maildir folder: any rename, upload or download changes them.
fn maildir_listing(folder: &Path) -> Vec<String> {
    maildir_files(folder)
        .iter()
        .map(|p| p.strip_prefix(folder).unwrap().display().to_string())
        .collect()
}

/// The mail both sides start with: `near` gets the Maildir folders, the result is the model.
fn seed_maildir(inbox: &Path, subfolder: &Path) -> BTreeMap<&'static str, Mailbox> {
    let mut model = BTreeMap::new();
    for (name, folder, tag, count) in [
        ("INBOX", inbox, "inbox", INBOX_MESSAGES),
        (SUBFOLDER, subfolder, "list", SUBFOLDER_MESSAGES),
    ] {
        let mut mailbox = Mailbox::new();
        for i in 0..count {
            let text = generate(tag, i);
            let letters = initial_flags(i);
            maildir_put(folder, &format!("1772000000.{tag}{i}"), &text, &letters);
            mailbox.insert(
                message_id(tag, i),
                Message {
                    flags: flags_of_letters(&letters),
                    sha256: sha256_lf(text.as_bytes()),
                },
            );
        }
        model.insert(name, mailbox);
    }
    model
}

/// Compares a side with the model, naming the first differences.
fn assert_same(side: &str, got: &Mailbox, want: &Mailbox) {
    if got == want {
        return;
    }
    let mut problems = Vec::new();
    for (id, w) in want {
        match got.get(id) {
            None => problems.push(format!("missing {id}")),
            Some(g) if g.sha256 != w.sha256 => problems.push(format!("{id}: content differs")),
            Some(g) if g.flags != w.flags => {
                problems.push(format!("{id}: flags {:?}, want {:?}", g.flags, w.flags))
            }
            Some(_) => {}
        }
    }
    for id in got.keys().filter(|id| !want.contains_key(*id)) {
        problems.push(format!("unexpected {id}"));
    }
    let shown = problems.len().min(15);
    panic!(
        "{side}: {} messages, want {}; {} differences, first: {:#?}",
        got.len(),
        want.len(),
        problems.len(),
        &problems[..shown]
    );
}

/// The IMAP commands a client sent, counted by name ("UID FETCH", "APPEND", ...), from its
/// protocol log. `command_of` pulls "TAG COMMAND ..." out of a line that shows a command sent
/// (None for other lines); `is_tag` tells the client's tags from the first word of the message
/// data it logs the same way.
fn commands_sent(
    log: &str,
    command_of: impl Fn(&str) -> Option<&str>,
    is_tag: impl Fn(&str) -> bool,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in log.lines() {
        let Some(sent) = command_of(line) else {
            continue;
        };
        let mut words = sent.split_whitespace();
        if !words.next().is_some_and(&is_tag) {
            continue;
        }
        let Some(mut command) = words.next().map(str::to_ascii_uppercase) else {
            continue;
        };
        if command == "UID"
            && let Some(sub) = words.next()
        {
            command = format!("UID {}", sub.to_ascii_uppercase());
        }
        *counts.entry(command).or_insert(0) += 1;
    }
    counts
}

const MUTATING: &[&str] = &[
    "APPEND",
    "STORE",
    "UID STORE",
    "EXPUNGE",
    "UID EXPUNGE",
    "COPY",
    "UID COPY",
    "MOVE",
    "UID MOVE",
    "CREATE",
    "DELETE",
    "RENAME",
];

fn assert_nothing_changed(client: &str, sent: &BTreeMap<String, usize>) {
    assert!(
        sent.contains_key("SELECT") || sent.contains_key("EXAMINE"),
        "{client}: no SELECT found in the protocol log (did its format change?): {sent:?}"
    );
    let mutating: Vec<_> = sent
        .iter()
        .filter(|(c, _)| MUTATING.contains(&c.as_str()))
        .collect();
    assert!(
        mutating.is_empty(),
        "{client}: a sync with nothing changed sent {mutating:?} (all commands: {sent:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// The two-way sync scenario, shared by mbsync and offlineimap.

/// A sync client with its Maildir.
trait SyncClient {
    const NAME: &'static str;
    /// The Maildir folder of a mailbox.
    fn folder(&self, mailbox: &str) -> PathBuf;
    /// Runs one full sync; returns the IMAP commands it sent.
    async fn sync(&self) -> BTreeMap<String, usize>;
}

struct Mbsync {
    home: PathBuf,
}

impl Mbsync {
    fn new(home: &Path, port: u16) -> Mbsync {
        let near = home.join("mail");
        let rc = format!(
            "IMAPAccount tern\n\
             Host 127.0.0.1\n\
             Port {port}\n\
             User {USER}\n\
             Pass \"{PASSWORD}\"\n\
             SSLType None\n\
             AuthMechs LOGIN\n\
             \n\
             IMAPStore far\n\
             Account tern\n\
             \n\
             MaildirStore near\n\
             Path {near}/\n\
             Inbox {near}/INBOX\n\
             SubFolders Verbatim\n\
             \n\
             Channel tern\n\
             Far :far:\n\
             Near :near:\n\
             Patterns *\n\
             Create Both\n\
             Expunge Both\n\
             Sync All\n\
             SyncState *\n",
            near = near.display()
        );
        std::fs::write(home.join("mbsyncrc"), rc).unwrap();
        Mbsync {
            home: home.to_path_buf(),
        }
    }
}

impl SyncClient for Mbsync {
    const NAME: &'static str = "mbsync";

    fn folder(&self, mailbox: &str) -> PathBuf {
        self.home.join("mail").join(mailbox)
    }

    async fn sync(&self) -> BTreeMap<String, usize> {
        let mut command = tokio::process::Command::new("mbsync");
        command
            .env("HOME", &self.home)
            .arg("-c")
            .arg(self.home.join("mbsyncrc"))
            // -Dn: the IMAP conversation, each command sent as ">>> TAG COMMAND ...", or as
            // "(N in progress) >>> TAG COMMAND ..." when pipelined.
            .args(["-Dn", "-a"]);
        let out = run(command, None, "mbsync").await;
        let complaints: Vec<_> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| !l.contains("Password is being sent in the clear"))
            .map(String::from)
            .collect();
        assert!(complaints.is_empty(), "mbsync complained: {complaints:#?}");
        let log = String::from_utf8_lossy(&out.stdout);
        commands_sent(
            &log,
            |line| {
                let (before, command) = line.split_once(">>> ")?;
                (before.is_empty() || before.ends_with(" in progress) ")).then_some(command)
            },
            // mbsync numbers its commands.
            |tag| tag.bytes().all(|b| b.is_ascii_digit()),
        )
    }
}

struct Offlineimap {
    home: PathBuf,
}

impl Offlineimap {
    fn new(home: &Path, port: u16) -> Offlineimap {
        let rc = format!(
            "[general]\n\
             accounts = tern\n\
             metadata = {home}/offlineimap\n\
             maxsyncaccounts = 1\n\
             \n\
             [Account tern]\n\
             localrepository = near\n\
             remoterepository = far\n\
             \n\
             [Repository near]\n\
             type = Maildir\n\
             localfolders = {home}/mail\n\
             \n\
             [Repository far]\n\
             type = IMAP\n\
             remotehost = 127.0.0.1\n\
             remoteport = {port}\n\
             remoteuser = {USER}\n\
             remotepass = {PASSWORD}\n\
             ssl = no\n\
             starttls = no\n",
            home = home.display()
        );
        std::fs::write(home.join("offlineimaprc"), rc).unwrap();
        // offlineimap creates the parents of a new remote folder ("Lists" for "Lists/rust"),
        // then fails the run when it finds no local folder for them: give it one.
        let (parent, _) = SUBFOLDER.split_once('/').unwrap();
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(home.join("mail").join(parent).join(sub)).unwrap();
        }
        Offlineimap {
            home: home.to_path_buf(),
        }
    }
}

impl SyncClient for Offlineimap {
    const NAME: &'static str = "offlineimap";

    /// Folders are flat, the hierarchy in the name with "." (offlineimap's default `sep`).
    fn folder(&self, mailbox: &str) -> PathBuf {
        self.home.join("mail").join(mailbox.replace('/', "."))
    }

    async fn sync(&self) -> BTreeMap<String, usize> {
        let mut command = tokio::process::Command::new("offlineimap");
        command
            .env("HOME", &self.home)
            .arg("-c")
            .arg(self.home.join("offlineimaprc"))
            // -d imap: imaplib2's log, each command sent as "writer > b'TAG COMMAND ...".
            .args(["-u", "basic", "-d", "imap"]);
        let out = run(command, None, "offlineimap").await;
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // offlineimap reports some failures (a message it could not save, ...) only in its log.
        let complaints: Vec<_> = log
            .lines()
            .filter(|l| l.starts_with("ERROR") || l.starts_with("WARNING"))
            .collect();
        assert!(
            complaints.is_empty(),
            "offlineimap complained: {complaints:#?}"
        );
        commands_sent(
            &log,
            |line| {
                // A Python bytes repr: b'...\r\n' (b"..." when the data holds a quote).
                let (_, sent) = line.split_once("writer > b")?;
                let sent = sent.get(1..)?;
                Some(sent.split("\\r\\n").next().unwrap_or(sent))
            },
            // imaplib2's tags: four capitals and a number ("DKMH31").
            |tag| {
                tag.len() > 4
                    && tag[..4].bytes().all(|b| b.is_ascii_uppercase())
                    && tag[4..].bytes().all(|b| b.is_ascii_digit())
            },
        )
    }
}

/// Syncs `count` messages to Tern, changes both sides, syncs, and syncs again with no change.
async fn two_way_sync<C: SyncClient>(backend: Backend, make: impl FnOnce(&Path, u16) -> C) {
    let started = Instant::now();
    let name = C::NAME;
    let tern = Tern::start(backend).await;
    let home = fast_tempdir();
    let client = make(home.path(), tern.port);
    let mailboxes = ["INBOX", SUBFOLDER];
    let mut model = seed_maildir(&client.folder("INBOX"), &client.folder(SUBFOLDER));
    let setup = started.elapsed();
    // Time spent reading Tern's side back.
    let mut reads = Duration::ZERO;
    let check = |when: &str, remote: &BTreeMap<String, Remote>, model: &BTreeMap<_, _>| {
        for mailbox in mailboxes {
            assert_same(
                &format!("{name} {backend:?}, {when}, Tern's {mailbox}"),
                &remote[mailbox].mailbox(mailbox),
                &model[mailbox],
            );
            assert_same(
                &format!("{name} {backend:?}, {when}, the Maildir's {mailbox}"),
                &maildir_read(&client.folder(mailbox)),
                &model[mailbox],
            );
        }
    };

    // 1. The Maildir goes up.
    let t = Instant::now();
    let sent = client.sync().await;
    let first_sync = t.elapsed();
    assert_eq!(
        sent.get("APPEND").copied().unwrap_or(0),
        INBOX_MESSAGES + SUBFOLDER_MESSAGES,
        "{name}: APPENDs of the first sync ({sent:?})"
    );
    let t = Instant::now();
    let first = tern.dump(&[("INBOX", None), (SUBFOLDER, None)]).await;
    reads += t.elapsed();
    check("after the upload", &first, &model);

    // 2. Changes on both sides, on distinct messages. In Tern: flag 10, unflag 2, expunge 10,
    // append 5.
    let inbox = model.get_mut("INBOX").unwrap();
    let uid = |i: usize| first["INBOX"].uid_of(&message_id("inbox", i));
    let mut appended = Vec::new();
    for i in 0..5 {
        let text = generate("tern", i);
        let flags: BTreeSet<String> = if i.is_multiple_of(2) {
            BTreeSet::from(["\\Seen".to_string()])
        } else {
            BTreeSet::new()
        };
        inbox.insert(
            message_id("tern", i),
            Message {
                flags: flags.clone(),
                sha256: sha256_lf(text.as_bytes()),
            },
        );
        appended.push(serde_json::json!({ "flags": flags, "message": text }));
    }
    tern.change(&serde_json::json!({
        "mailbox": "INBOX",
        "add_flags": (100..110).map(|i| (uid(i), "\\Flagged")).collect::<Vec<_>>(),
        "remove_flags": [(uid(100), "\\Seen"), (uid(105), "\\Seen")],
        "expunge": (120..130).map(uid).collect::<Vec<_>>(),
        "append": appended,
    }))
    .await;
    for i in 100..110 {
        let flags = &mut inbox.get_mut(&message_id("inbox", i)).unwrap().flags;
        flags.insert("\\Flagged".into());
        if i == 100 || i == 105 {
            flags.remove("\\Seen");
        }
    }
    for i in 120..130 {
        inbox.remove(&message_id("inbox", i));
    }

    // In the Maildir: mark 10 seen, unflag 2, delete 10, add 5.
    let folder = client.folder("INBOX");
    let files = maildir_index(&folder);
    for i in 200..210 {
        let id = message_id("inbox", i);
        maildir_set_letters(&files[&id], &(maildir_letters(&files[&id]) + "S"));
        inbox.get_mut(&id).unwrap().flags.insert("\\Seen".into());
    }
    for i in [220, 231] {
        let id = message_id("inbox", i);
        maildir_set_letters(&files[&id], &maildir_letters(&files[&id]).replace('F', ""));
        inbox.get_mut(&id).unwrap().flags.remove("\\Flagged");
    }
    for i in 240..250 {
        let id = message_id("inbox", i);
        std::fs::remove_file(&files[&id]).unwrap();
        inbox.remove(&id);
    }
    for i in 0..5 {
        let text = generate("near", i);
        let letters = if i.is_multiple_of(2) { "F" } else { "" };
        maildir_put(&folder, &format!("1772100000.near{i}"), &text, letters);
        inbox.insert(
            message_id("near", i),
            Message {
                flags: flags_of_letters(letters),
                sha256: sha256_lf(text.as_bytes()),
            },
        );
    }

    let t = Instant::now();
    let second_sent = client.sync().await;
    let second_sync = t.elapsed();
    // Also proof that the protocol log is read right, which step 3 relies on.
    assert_eq!(
        second_sent.get("APPEND"),
        Some(&5),
        "{name}: APPENDs of the two-way sync ({second_sent:?})"
    );
    assert!(
        second_sent.contains_key("UID STORE"),
        "{name}: the two-way sync sent no UID STORE ({second_sent:?})"
    );
    let t = Instant::now();
    let second = tern
        .dump(&[
            ("INBOX", Some(&first["INBOX"])),
            (SUBFOLDER, Some(&first[SUBFOLDER])),
        ])
        .await;
    reads += t.elapsed();
    check("after the two-way sync", &second, &model);
    for mailbox in mailboxes {
        assert_eq!(
            second[mailbox].uidvalidity, first[mailbox].uidvalidity,
            "{name}: UIDVALIDITY of {mailbox} changed"
        );
        // A message uploaded again would have a new UID.
        let before = first[mailbox].uids();
        for (id, uid) in second[mailbox].uids() {
            if let Some(old) = before.get(&id) {
                assert_eq!(uid, *old, "{name}: {id} in {mailbox} changed UID");
            }
        }
    }

    // 3. Nothing changed: nothing may be sent that changes the server, nothing may move.
    let listing: Vec<_> = mailboxes
        .iter()
        .map(|m| maildir_listing(&client.folder(m)))
        .collect();
    let t = Instant::now();
    let sent = client.sync().await;
    let third_sync = t.elapsed();
    assert_nothing_changed(name, &sent);
    let t = Instant::now();
    let third = tern
        .dump(&[
            ("INBOX", Some(&second["INBOX"])),
            (SUBFOLDER, Some(&second[SUBFOLDER])),
        ])
        .await;
    reads += t.elapsed();
    check("after the no-change sync", &third, &model);
    for (k, mailbox) in mailboxes.iter().enumerate() {
        assert_eq!(
            third[*mailbox].uids(),
            second[*mailbox].uids(),
            "{name}: UIDs in Tern's {mailbox} changed in a sync with nothing to do"
        );
        assert_eq!(
            maildir_listing(&client.folder(mailbox)),
            listing[k],
            "{name}: the Maildir's {mailbox} changed in a sync with nothing to do"
        );
    }
    tern.stop().await;
    say(&format!(
        "{name} on {backend:?}: {} messages; setup {setup:.1?}, upload {first_sync:.1?}, \
         two-way {second_sync:.1?}, no-change {third_sync:.1?}, reading Tern {reads:.1?}, \
         total {:.1?}; the two-way sync sent {second_sent:?}",
        INBOX_MESSAGES + SUBFOLDER_MESSAGES,
        started.elapsed()
    ));
}

async fn mbsync(backend: Backend) {
    require("mbsync", "--version", "isync");
    require("python3", "--version", "python3");
    two_way_sync(backend, Mbsync::new).await;
}

async fn offlineimap(backend: Backend) {
    require("offlineimap", "--version", "offlineimap3");
    require("python3", "--version", "python3");
    two_way_sync(backend, Offlineimap::new).await;
}

// ---------------------------------------------------------------------------------------------
// neomutt: read, flag and move, with keys pushed at its index.

async fn neomutt(backend: Backend) {
    require("neomutt", "-v", "neomutt");
    require("script", "--version", "util-linux");
    require("python3", "--version", "python3");
    let started = Instant::now();
    let tern = Tern::start(backend).await;
    let count = 30;
    let mut model = Mailbox::new();
    let mut append = Vec::new();
    for i in 0..count {
        let text = generate("mutt", i);
        let letters = initial_flags(i);
        model.insert(
            message_id("mutt", i),
            Message {
                flags: flags_of_letters(&letters),
                sha256: sha256_lf(text.as_bytes()),
            },
        );
        let flags: Vec<_> = flags_of_letters(&letters).into_iter().collect();
        append.push(serde_json::json!({ "flags": flags, "message": text }));
    }
    tern.change(&serde_json::json!({ "mailbox": "INBOX", "append": append }))
        .await;

    let home = fast_tempdir();
    let muttrc = home.path().join("muttrc");
    std::fs::write(
        &muttrc,
        format!(
            "set folder = \"imap://{USER}@127.0.0.1:{port}/\"\n\
             set imap_pass = \"{PASSWORD}\"\n\
             set spoolfile = \"+INBOX\"\n\
             set ssl_starttls = no\n\
             set ssl_force_tls = no\n\
             set header_cache = \"\"\n\
             set message_cachedir = \"\"\n\
             set confirmcreate = no\n\
             set confirmappend = no\n\
             set wait_key = no\n\
             set mark_old = no\n\
             set move = no\n\
             set delete = yes\n",
            port = tern.port
        ),
    )
    .unwrap();
    // Read mutt-7 in the pager and pipe it to a file (the screen cannot show it: curses skips
    // drawing while pushed keys are pending), flag mutt-8, save mutt-7 to a new mailbox (the
    // save marks it deleted), then sync (expunge) and quit.
    let piped = home.path().join("read.txt");
    let keys = format!(
        "<limit>~i mutt-7@<enter><display-message><exit>\
         <pipe-message>cat > {}<enter>\
         <save-message>=Read<enter>\
         <limit>~i mutt-8@<enter><flag-message>\
         <sync-mailbox><quit>",
        piped.display()
    );
    let neomutt = format!(
        "neomutt -n -F {} -f imap://{USER}@127.0.0.1:{}/INBOX -e 'push \"{keys}\"'",
        muttrc.display(),
        tern.port
    );
    let mut command = tokio::process::Command::new("script");
    // neomutt draws with curses and needs a terminal: `script` gives it a pseudo-terminal.
    command
        .env("HOME", home.path())
        .env("TERM", "vt100")
        .args(["-qec", &neomutt, "/dev/null"]);
    let t = Instant::now();
    run(command, None, "neomutt (under script)").await;
    let ran = t.elapsed();
    let read = std::fs::read_to_string(&piped).unwrap_or_default();
    assert!(
        read.contains("Body token mutt-7-end."),
        "neomutt did not pipe mutt-7 with its body; got:\n{read}"
    );

    let moved = message_id("mutt", 7);
    let mut read = model.remove(&moved).unwrap();
    read.flags.insert("\\Seen".into());
    model
        .get_mut(&message_id("mutt", 8))
        .unwrap()
        .flags
        .insert("\\Flagged".into());
    let after = tern.dump(&[("INBOX", None), ("Read", None)]).await;
    assert_same(
        &format!("neomutt {backend:?}: INBOX"),
        &after["INBOX"].mailbox("INBOX"),
        &model,
    );
    assert_same(
        &format!("neomutt {backend:?}: Read"),
        &after["Read"].mailbox("Read"),
        &Mailbox::from([(moved, read)]),
    );
    tern.stop().await;
    say(&format!(
        "neomutt on {backend:?}: read, flag, move in {ran:.1?}, total {:.1?}",
        started.elapsed()
    ));
}

/// One test per scenario and backend: `mbsync::local`, `mbsync::garage`, ...
macro_rules! on_both_backends {
    ($($scenario:ident),*) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn local() {
                super::$scenario(super::Backend::Local).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn garage() {
                super::$scenario(super::Backend::Garage).await;
            }
        }
    )*};
}

on_both_backends!(mbsync, offlineimap, neomutt);
