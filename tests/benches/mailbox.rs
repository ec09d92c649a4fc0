//! Mailbox core figures (issue #3), printed as Markdown tables for docs/benchmarks.md:
//!
//! ```text
//! cargo bench -p tern-tests --profile ci --bench mailbox -- [--sizes 1000,10000,100000]
//!     [--backend local|garage|both] [--deliveries 10000] [--samples 200] [--tail 100] [--quick]
//! ```
//! `--quick`: sizes 1k and 10k, 50 samples, 1,000 deliveries (flags given after it win).
//!
//! - replay: `view::compute` over N ops, the incremental `apply_next` path, and the floors a
//!   handle without the key computes from headers (CPU only);
//! - op frames (`codec::encode` / `open_body`), age, and message bodies through `MessageStore`;
//! - per store and mailbox size N: cold open from op rows, from a checkpoint, from a checkpoint
//!   plus a tail, each with its storage part timed alone; single-write latency with its two
//!   storage parts (sync, insert) timed apart; checkpoint time and size; syncs and writes across
//!   collected rows; a `maintain` pass and a cold open from its squashed checkpoint;
//! - a user who never logs in: a deliverer without the key appends D ops one by one, then the
//!   first login opens cold, writes a checkpoint, and the next login opens from it.
//!
//! Mailboxes of size N are filled with batched row inserts (`insert_batch` of 500 op rows,
//! encoded as `Mailbox::write` encodes them): single writes on Garage would take minutes at 100k.
//! Peak memory is the growth of the process's resident set (VmHWM after the step minus VmRSS
//! before it, with the high-water mark reset through /proc/self/clear_refs).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::x25519;
use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use tern_server::log::clock::{Dot, VersionVector, WriterId};
use tern_server::log::codec::{self, WriterKey};
use tern_server::log::store::{LogStore, op_key};
use tern_server::mail::mailbox::{Mailbox, MailboxKeys};
use tern_server::mail::message::MessageStore;
use tern_server::mail::view::{self, LogOp, MailOp, MessageId};
use tern_server::storage::{ByteStream, InsertOp, StorageConfig, Store};
use tern_tests::garage::Garage;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Local,
    Garage,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::Garage => "Garage (1 node)",
        }
    }
}

struct Args {
    sizes: Vec<u64>,
    backends: Vec<Backend>,
    /// Single writes timed per mailbox size.
    samples: usize,
    /// Deliveries before the first login.
    deliveries: u64,
    /// Ops written after a checkpoint, before the "checkpoint + tail" open.
    tail: u64,
    /// Fewer message-body rounds.
    quick: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        sizes: vec![1_000, 10_000, 100_000],
        backends: vec![Backend::Local, Backend::Garage],
        samples: 200,
        deliveries: 10_000,
        tail: 100,
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> anyhow::Result<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .with_context(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "--quick" => {
                args.sizes = vec![1_000, 10_000];
                args.samples = 50;
                args.deliveries = 1_000;
                args.quick = true;
            }
            "--sizes" => {
                args.sizes = value("--sizes")?
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse::<u64>())
                    .collect::<Result<_, _>>()
                    .context("--sizes takes numbers separated by commas")?;
                ensure!(args.sizes.iter().all(|&n| n > 0), "sizes must be positive");
            }
            "--backend" => {
                args.backends = match value("--backend")?.as_str() {
                    "local" => vec![Backend::Local],
                    "garage" => vec![Backend::Garage],
                    "both" => vec![Backend::Local, Backend::Garage],
                    other => bail!("--backend local|garage|both, not {other:?}"),
                }
            }
            "--samples" => args.samples = value("--samples")?.parse()?,
            "--deliveries" => args.deliveries = value("--deliveries")?.parse()?,
            "--tail" => args.tail = value("--tail")?.parse()?,
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(args.samples >= 2, "--samples must be at least 2");
    Ok(args)
}

/// Latency samples.
struct Lat(Vec<Duration>);

impl Lat {
    fn new() -> Lat {
        Lat(Vec::new())
    }
    fn time<T>(&mut self, started: Instant, value: T) -> T {
        self.0.push(started.elapsed());
        value
    }
    fn mean(&self) -> Duration {
        self.0.iter().sum::<Duration>() / self.0.len().max(1) as u32
    }
    fn pct(&self, p: f64) -> Duration {
        let mut s = self.0.clone();
        s.sort();
        s.get(((s.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or_default()
    }
}

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.0}")
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn mb_per_s(bytes: usize, d: Duration) -> String {
    format!("{:.0}", bytes as f64 / d.as_secs_f64().max(1e-9) / 1e6)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A window for peak memory: hands freed heap back to the kernel and resets the high-water mark
/// to the current resident set, so that VmHWM read later is the peak since now.
struct MemWindow(Option<u64>);

impl MemWindow {
    fn start() -> MemWindow {
        // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
        unsafe {
            libc::malloc_trim(0);
        }
        let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        MemWindow(status_kib("VmRSS:").filter(|_| reset))
    }
    /// Growth of the resident set at its peak, MiB ("?" where /proc does not allow the reset).
    fn peak_mib(&self) -> String {
        match (self.0, status_kib("VmHWM:")) {
            (Some(base), Some(hwm)) => format!("{:.0}", hwm.saturating_sub(base) as f64 / 1024.0),
            _ => "?".into(),
        }
    }
}

/// CPU time used so far by process `pid`, in clock ticks (utime + stime of /proc/<pid>/stat).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Waits until the Garage process is idle (under 5 % of a core for one second), at most two
/// minutes, and returns the time waited. After rows are written in bulk Garage keeps a core
/// busy for seconds (its Merkle trees and counters catch up), which would otherwise weigh on
/// the figures taken next on this 2-core machine. The local store has no background work.
async fn settle(garage_pid: Option<u32>) -> Duration {
    let started = Instant::now();
    let Some(pid) = garage_pid else {
        return Duration::ZERO;
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    while started.elapsed() < Duration::from_secs(120) {
        let Some(before) = cpu_ticks(pid) else {
            break;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(after) = cpu_ticks(pid) else {
            break;
        };
        if (after - before) * 20 < hz {
            break;
        }
    }
    started.elapsed()
}

/// A 32-hex-digit message id, as the message store names messages.
fn msg_id(writer: u64, i: u64) -> MessageId {
    MessageId(format!("{writer:016x}{i:016x}"))
}

/// N sequential adds by one writer, each having seen all before it (as N deliveries are).
fn sequential_adds(n: u64, writer: u64) -> Vec<LogOp> {
    let w = WriterId(writer);
    (1..=n)
        .map(|i| LogOp {
            dot: Dot { writer: w, seq: i },
            lamport: i,
            deps: VersionVector([(w, i - 1)].into_iter().filter(|(_, s)| *s > 0).collect()),
            modseq_floor: i,
            op: MailOp::Add {
                msg: msg_id(writer, i),
                flags: BTreeSet::new(),
                uid_floor: i,
            },
        })
        .collect()
}

/// N appends by writer 1; every 100th, writer 2 appends concurrently (having seen all but
/// writer 1's latest op), and writer 1 then syncs: a block of two concurrent appends per event.
fn with_concurrency(n: u64) -> Vec<LogOp> {
    let (w1, w2) = (WriterId(1), WriterId(2));
    let mut ops = Vec::new();
    let mut seq2 = 0;
    let mut seen2 = 0; // how many of w2's ops writer 1 has seen
    for i in 1..=n {
        let mut deps = VersionVector::default();
        if i > 1 {
            deps.include(Dot {
                writer: w1,
                seq: i - 1,
            });
        }
        if seen2 > 0 {
            deps.include(Dot {
                writer: w2,
                seq: seen2,
            });
        }
        let floor = i + 4 * seq2;
        ops.push(LogOp {
            dot: Dot { writer: w1, seq: i },
            lamport: i + seq2,
            deps: deps.clone(),
            modseq_floor: floor,
            op: MailOp::Add {
                msg: msg_id(1, i),
                flags: BTreeSet::new(),
                uid_floor: floor,
            },
        });
        seen2 = seq2;
        if i % 100 == 0 {
            seq2 += 1;
            ops.push(LogOp {
                dot: Dot {
                    writer: w2,
                    seq: seq2,
                },
                lamport: i + seq2,
                deps,
                modseq_floor: floor,
                op: MailOp::Add {
                    msg: msg_id(2, seq2),
                    flags: BTreeSet::new(),
                    uid_floor: floor,
                },
            });
        }
    }
    ops
}

/// The stored row value of `op`, exactly as `Mailbox::write` builds it.
fn encode_op(op: &LogOp, wk: &WriterKey) -> anyhow::Result<(String, Vec<u8>)> {
    let body = postcard::to_allocvec(&op.op)?;
    let row = op_key(op.dot);
    let value = codec::encode(&row, &op.header(), &body, wk)?;
    Ok((row, value))
}

/// Registers the ops' writer and stores the ops as rows, 500 per `insert_batch`.
async fn populate(
    store: &Store,
    log: &LogStore,
    ops: &[LogOp],
    recipient: &x25519::Recipient,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let wk = WriterKey::generate();
    let writers: BTreeSet<WriterId> = ops.iter().map(|o| o.dot.writer).collect();
    for w in writers {
        log.register(w, wk.seal(recipient)?).await?;
    }
    for chunk in ops.chunks(500) {
        let batch = chunk
            .iter()
            .map(|op| {
                let (row, value) = encode_op(op, &wk)?;
                Ok(InsertOp {
                    partition_key: log.partition().to_string(),
                    sort_key: row,
                    token: None,
                    value: Some(value),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store.rows.insert_batch(batch).await?;
    }
    Ok(started.elapsed())
}

fn add(msg: MessageId) -> impl FnOnce(u64) -> MailOp {
    move |uid_floor| MailOp::Add {
        msg,
        flags: BTreeSet::new(),
        uid_floor,
    }
}

struct Tables {
    replay: Vec<String>,
    frames: Vec<String>,
    age: Vec<String>,
    bodies: Vec<String>,
    open: Vec<String>,
    append: Vec<String>,
    checkpoint: Vec<String>,
    squash: Vec<String>,
    tombstones: Vec<String>,
    deliveries: Vec<String>,
}

fn replay(tables: &mut Tables, sizes: &[u64]) -> anyhow::Result<()> {
    for &n in sizes {
        for (label, ops) in [
            ("sequential appends", sequential_adds(n, 1)),
            ("1 % concurrent appends", with_concurrency(n)),
        ] {
            let mem = MemWindow::start();
            let t = Instant::now();
            let full = view::compute(&ops);
            let compute = t.elapsed();
            let peak = mem.peak_mib();
            ensure!(full.messages.len() as u64 >= n);

            // The incremental path a live handle takes: one `apply_next` per op, each op
            // having seen all before it. It refuses concurrent ops (the handle recomputes).
            let t = Instant::now();
            let mut state = view::compute(&[]);
            let mut refused = false;
            for op in &ops {
                if !state.apply_next(op) {
                    refused = true;
                    break;
                }
            }
            let incremental = t.elapsed();
            let apply = if refused {
                "refused (concurrent op): full recomputation".to_string()
            } else {
                ensure!(state == full, "apply_next and compute disagree");
                format!(
                    "{} ms ({:.2} µs/op)",
                    ms(incremental),
                    incremental.as_secs_f64() * 1e6 / ops.len() as f64
                )
            };
            // What a handle without the key computes before each write: the floors from the
            // plaintext headers.
            let headers: Vec<_> = ops.iter().map(LogOp::header).collect();
            let t = Instant::now();
            let floors = view::next_floors(&headers);
            let next_floors = t.elapsed();
            ensure!(floors == full.floors(), "next_floors and compute disagree");
            tables.replay.push(format!(
                "| {label} | {} | {} | {peak} | {apply} | {} |",
                thousands(ops.len() as u64),
                ms(compute),
                ms(next_floors)
            ));
        }
    }
    Ok(())
}

fn op_frames(tables: &mut Tables) -> anyhow::Result<()> {
    let wk = WriterKey::generate();
    let ops = sequential_adds(100_000, 7);
    let t = Instant::now();
    let encoded: Vec<(String, Vec<u8>)> = ops
        .iter()
        .map(|op| encode_op(op, &wk))
        .collect::<anyhow::Result<_>>()?;
    let enc = t.elapsed();
    let bytes: usize = encoded.iter().map(|(_, v)| v.len()).sum();
    let t = Instant::now();
    for (row, value) in &encoded {
        let (header, body) = codec::decode_header(row, value)?;
        let plain = codec::open_body(row, body, &wk)?;
        let op: MailOp = postcard::from_bytes(&plain)?;
        ensure!(LogOp::from_parts(header, op).is_some());
    }
    let dec = t.elapsed();
    let per = |d: Duration| d.as_secs_f64() * 1e6 / ops.len() as f64;
    tables.frames.push(format!(
        "| encode (postcard + XChaCha20-Poly1305) | {} | {:.2} | {:.0} | {} |",
        bytes / ops.len(),
        per(enc),
        ops.len() as f64 / enc.as_secs_f64() / 1e3,
        mb_per_s(bytes, enc)
    ));
    tables.frames.push(format!(
        "| decode header + open body + postcard | {} | {:.2} | {:.0} | {} |",
        bytes / ops.len(),
        per(dec),
        ops.len() as f64 / dec.as_secs_f64() / 1e3,
        mb_per_s(bytes, dec)
    ));
    Ok(())
}

fn age_throughput(tables: &mut Tables) -> anyhow::Result<()> {
    let id = x25519::Identity::generate();
    for size in [1024usize, 1024 * 1024, 8 * 1024 * 1024] {
        let data = vec![5u8; size];
        let rounds: u32 = match size {
            1024 => 2000,
            s if s <= 1024 * 1024 => 20,
            _ => 5,
        };
        let t = Instant::now();
        let mut ct = Vec::new();
        for _ in 0..rounds {
            ct = age::encrypt(&id.to_public(), &data)?;
        }
        let enc = t.elapsed() / rounds;
        let t = Instant::now();
        for _ in 0..rounds {
            age::decrypt(&id, &ct)?;
        }
        let dec = t.elapsed() / rounds;
        tables.age.push(format!(
            "| {} | {:.3} | {} | {:.3} | {} |",
            if size >= 1024 * 1024 {
                format!("{} MiB", size >> 20)
            } else {
                format!("{} KiB", size >> 10)
            },
            enc.as_secs_f64() * 1e3,
            mb_per_s(size, enc),
            dec.as_secs_f64() * 1e3,
            mb_per_s(size, dec)
        ));
    }
    Ok(())
}

/// A body handed over in 64 KiB pieces, as `put_message` hands it to `put`.
fn pieces(data: &Bytes) -> ByteStream {
    let data = data.clone();
    let parts: Vec<_> = (0..data.len())
        .step_by(64 * 1024)
        .map(|at| Ok(data.slice(at..(at + 64 * 1024).min(data.len()))))
        .collect();
    Box::pin(futures::stream::iter(parts))
}

/// Message bodies through `MessageStore` (encrypted, chunked) against the same bytes put and
/// got as raw blobs, so the cost of the encryption shows apart from the store's.
async fn message_bodies(
    tables: &mut Tables,
    backend: Backend,
    store: &Store,
    quick: bool,
) -> anyhow::Result<()> {
    let messages = MessageStore::from_store(store, "00be7c")?;
    let blobs = store.blobs.clone();
    for (size, rounds) in [(1usize << 20, 20u32), (20 << 20, 5)] {
        let rounds = if quick {
            rounds.div_ceil(4).max(2)
        } else {
            rounds
        };
        let data = Bytes::from(
            (0..size)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0])
                .collect::<Vec<u8>>(),
        );
        let (mut put, mut get, mut raw_put, mut raw_get) =
            (Lat::new(), Lat::new(), Lat::new(), Lat::new());
        let mut keys = Vec::new();
        for r in 0..rounds {
            let id = format!("{size:x}{r:04x}");
            let t = Instant::now();
            keys.push(put.time(t, messages.put(&id, pieces(&data)).await?).key);
            let raw_key = format!("bench-raw/{size}/{r}");
            let t = Instant::now();
            raw_put.time(t, blobs.put(&raw_key, pieces(&data)).await?);
        }
        for (r, key) in keys.iter().enumerate() {
            let id = format!("{size:x}{r:04x}");
            let t = Instant::now();
            let got = get.time(t, messages.read_all(&id, key).await?);
            ensure!(got == data, "message read back differs");
            let t = Instant::now();
            raw_get.time(t, blobs.get_bytes(&format!("bench-raw/{size}/{r}")).await?);
        }
        let label = format!("{} MiB", size >> 20);
        for (op, enc, raw) in [("put", &put, &raw_put), ("read", &get, &raw_get)] {
            tables.bodies.push(format!(
                "| {} | {op} {label} | {} / {} | {} | {} / {} | {} |",
                backend.label(),
                ms(enc.pct(0.0)),
                ms(enc.pct(0.5)),
                mb_per_s(size, enc.pct(0.5)),
                ms(raw.pct(0.0)),
                ms(raw.pct(0.5)),
                mb_per_s(size, raw.pct(0.5)),
            ));
        }
        if size == 20 << 20 {
            // 4 KiB from the middle of the message: one ranged GET, one or two chunks opened.
            let id = format!("{size:x}{:04x}", 0);
            let (mut ranged, mut raw_ranged) = (Lat::new(), Lat::new());
            for i in 0..50u64 {
                let at = (size as u64 / 2) + i * 4096;
                let t = Instant::now();
                let got = ranged.time(t, messages.read(&id, &keys[0], at..at + 4096).await?);
                ensure!(got[..] == data[at as usize..at as usize + 4096]);
                let t = Instant::now();
                raw_ranged.time(
                    t,
                    blobs
                        .get(&format!("bench-raw/{size}/0"), Some(at..at + 4096))
                        .await?
                        .bytes()
                        .await?,
                );
            }
            tables.bodies.push(format!(
                "| {} | ranged read 4 KiB of 20 MiB | {} / {} | – | {} / {} | – |",
                backend.label(),
                ms(ranged.pct(0.0)),
                ms(ranged.pct(0.5)),
                ms(raw_ranged.pct(0.0)),
                ms(raw_ranged.pct(0.5)),
            ));
        }
    }
    Ok(())
}

fn keys_of(identity: &Arc<x25519::Identity>, with_identity: bool) -> MailboxKeys {
    MailboxKeys {
        recipient: identity.to_public(),
        identity: with_identity.then(|| identity.clone()),
    }
}

async fn blob_size(store: &Store, key: &str) -> anyhow::Result<u64> {
    Ok(store
        .blobs
        .head(key)
        .await?
        .with_context(|| format!("checkpoint blob {key} missing"))?
        .size)
}

/// Every figure of one mailbox of `n` messages on one store.
async fn mailbox_figures(
    tables: &mut Tables,
    backend: Backend,
    garage_pid: Option<u32>,
    store: &Store,
    n: u64,
    args: &Args,
) -> anyhow::Result<()> {
    let name = backend.label();
    let identity = Arc::new(x25519::Identity::generate());
    let (keys, no_key) = (keys_of(&identity, true), keys_of(&identity, false));
    let log = LogStore::new(
        store.rows.clone(),
        store.blobs.clone(),
        format!("bench-{n}"),
    );
    eprintln!("[{name}] {n}: populating");
    let fill = populate(store, &log, &sequential_adds(n, 1), &keys.recipient).await?;
    let settled = settle(garage_pid).await;

    eprintln!("[{name}] {n}: cold opens");
    // The storage part of a cold open from rows: reading every op row (no decryption).
    let t = Instant::now();
    let (raw, _) = log.read_missing(&VersionVector::default()).await?;
    let read_rows = t.elapsed();
    ensure!(raw.len() as u64 == n);
    drop(raw);
    let mem = MemWindow::start();
    let t = Instant::now();
    let mb = Mailbox::open(log.clone(), keys.clone()).await?;
    let open_rows = t.elapsed();
    let open_rows_mem = mem.peak_mib();
    let t = Instant::now();
    let lmtp = Mailbox::open(log.clone(), no_key.clone()).await?;
    let open_rows_no_key = t.elapsed();
    let mut clone = Lat::new();
    for _ in 0..5 {
        let t = Instant::now();
        let s = clone.time(t, mb.state().await?);
        ensure!(s.messages.len() as u64 == n);
    }

    eprintln!("[{name}] {n}: appends");
    // The two storage parts of a write, timed apart: the sync it starts with (nothing new to
    // read here) and the insert of one op row (into another partition, so the mailbox does
    // not grow).
    let (mut sync, mut insert) = (Lat::new(), Lat::new());
    let scratch = LogStore::new(
        store.rows.clone(),
        store.blobs.clone(),
        format!("bench-scratch-{n}"),
    );
    let wk = WriterKey::generate();
    for op in sequential_adds(args.samples as u64, 3) {
        let t = Instant::now();
        sync.time(t, mb.sync().await?);
        let (_, value) = encode_op(&op, &wk)?;
        let t = Instant::now();
        insert.time(t, scratch.append(op.dot, value).await?);
    }
    let mut write = Lat::new();
    for i in 0..args.samples as u64 {
        let t = Instant::now();
        write.time(t, mb.write(add(msg_id(4, i))).await?);
    }
    let mut keyless = Lat::new();
    for i in 0..args.samples as u64 {
        let t = Instant::now();
        keyless.time(t, lmtp.write(add(msg_id(5, i))).await?);
    }

    // An op concurrent with the handle's last writes, as a racing process would leave: it has
    // seen the N first ops only. Absorbing it takes the slow path, a full recomputation.
    let ghost = LogOp {
        dot: Dot {
            writer: WriterId(9),
            seq: 1,
        },
        lamport: n + 1,
        deps: VersionVector([(WriterId(1), n)].into_iter().collect()),
        modseq_floor: n + 1,
        op: add(msg_id(9, 1))(n + 1),
    };
    let wk9 = WriterKey::generate();
    log.register(WriterId(9), wk9.seal(&keys.recipient)?)
        .await?;
    let (_, value) = encode_op(&ghost, &wk9)?;
    log.append(ghost.dot, value).await?;
    let t = Instant::now();
    ensure!(mb.sync().await?, "the concurrent op was not read");
    let concurrent_sync = t.elapsed();
    let total = n + 2 * args.samples as u64 + 1;
    let state = mb.state().await?;
    ensure!(state.messages.len() as u64 == total);
    ensure!(state.renumbered > 0, "the concurrent op renumbered nothing");

    eprintln!("[{name}] {n}: checkpoint");
    let t = Instant::now();
    let cp = mb.checkpoint().await?;
    let cp_write = t.elapsed();
    let cp_size = blob_size(store, &cp.blob).await?;
    let (mut sync_before, mut listing_before) = (Lat::new(), Lat::new());
    for _ in 0..20 {
        let t = Instant::now();
        sync_before.time(t, mb.sync().await?);
        let t = Instant::now();
        listing_before.time(t, log.checkpoints().await?);
    }
    let t = Instant::now();
    let collected = mb.collect(&cp).await?;
    let collect = t.elapsed();
    let settled_collect = settle(garage_pid).await;
    // Collected rows leave tombstones in the partition (Garage keeps them until its GC): time
    // the same no-op sync, and its checkpoint listing alone, across them.
    let (mut sync_after, mut listing) = (Lat::new(), Lat::new());
    for _ in 0..20 {
        let t = Instant::now();
        sync_after.time(t, mb.sync().await?);
        let t = Instant::now();
        listing.time(t, log.checkpoints().await?);
    }
    // The storage part of a cold open from the checkpoint: listing and fetching it.
    let t = Instant::now();
    for c in log.checkpoints().await? {
        log.load_checkpoint(&c).await?;
    }
    let fetch_cp = t.elapsed();

    let mem = MemWindow::start();
    let t = Instant::now();
    let from_cp = Mailbox::open(log.clone(), keys.clone()).await?;
    let open_cp = t.elapsed();
    let open_cp_mem = mem.peak_mib();
    ensure!(from_cp.state().await?.messages.len() as u64 == total);

    drop(from_cp);

    // The tail comes from the same writer as ops the checkpoint holds (a long-lived process).
    let mut write_after = Lat::new();
    for i in 0..args.tail {
        let t = Instant::now();
        write_after.time(t, mb.write(add(msg_id(6, i))).await?);
    }
    let t = Instant::now();
    let from_cp_tail = Mailbox::open(log.clone(), keys.clone()).await?;
    let open_cp_tail = t.elapsed();
    ensure!(from_cp_tail.state().await?.messages.len() as u64 == total + args.tail);
    let t = Instant::now();
    let lmtp2 = Mailbox::open(log.clone(), no_key).await?;
    let open_cp_tail_no_key = t.elapsed();
    ensure!(lmtp2.floors().await == mb.floors().await);

    // A maintenance pass: the causally stable prefix squashed into a base state, rows and
    // older checkpoints collected.
    eprintln!("[{name}] {n}: maintain");
    let t = Instant::now();
    let m = mb.maintain().await?;
    let maintain = t.elapsed();
    let squashed_cp = m.checkpoint.context("maintain wrote no checkpoint")?;
    let squashed_size = blob_size(store, &squashed_cp.blob).await?;
    let mem = MemWindow::start();
    let t = Instant::now();
    let squashed = Mailbox::open(log.clone(), keys.clone()).await?;
    let open_squashed = t.elapsed();
    let open_squashed_mem = mem.peak_mib();
    ensure!(squashed.state().await?.messages.len() as u64 == total + args.tail);
    ensure!(squashed.state().await? == mb.state().await?);
    let t = Instant::now();
    Mailbox::open(log.clone(), keys_of(&identity, false)).await?;
    let open_squashed_no_key = t.elapsed();

    let size = thousands(n);
    tables.open.push(format!(
        "| {name} | {size} | {} | {} | {} | {} | {open_rows_mem} | {} | {} | {} | {open_cp_mem} | {} | {} | {} |",
        secs(fill),
        secs(settled),
        ms(read_rows),
        ms(open_rows),
        ms(open_rows_no_key),
        ms(fetch_cp),
        ms(open_cp),
        ms(open_cp_tail),
        ms(open_cp_tail_no_key),
        ms(clone.pct(0.5)),
    ));
    tables.append.push(format!(
        "| {name} | {size} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        ms(write.mean()),
        ms(write.pct(0.5)),
        ms(write.pct(0.99)),
        ms(sync.pct(0.5)),
        ms(insert.pct(0.5)),
        ms(keyless.mean()),
        ms(keyless.pct(0.5)),
        ms(keyless.pct(0.99)),
        ms(concurrent_sync),
    ));
    tables.checkpoint.push(format!(
        "| {name} | {size} | {} | {} | {} | {:.0} | {} ({} rows) | {} |",
        thousands(total),
        ms(cp_write),
        thousands(cp_size),
        cp_size as f64 / total as f64,
        ms(collect),
        thousands(collected),
        secs(settled_collect),
    ));
    tables.tombstones.push(format!(
        "| {name} | {size} | {} | {} | {} | {} | {} | {} |",
        ms(sync_before.pct(0.5)),
        ms(listing_before.pct(0.5)),
        ms(write.pct(0.5)),
        ms(sync_after.pct(0.5)),
        ms(listing.pct(0.5)),
        ms(write_after.pct(0.5)),
    ));
    tables.squash.push(format!(
        "| {name} | {size} | {} | {} | {} | {} | {} | {open_squashed_mem} | {} |",
        ms(maintain),
        thousands(m.squashed),
        thousands(squashed_size),
        thousands(m.rows_collected),
        ms(open_squashed),
        ms(open_squashed_no_key),
    ));
    Ok(())
}

/// A user who never logs in: D deliveries by a handle without the key, one write each; then
/// the first login (cold, rows only), its checkpoint, more deliveries, and the next login.
async fn deliveries(
    tables: &mut Tables,
    backend: Backend,
    store: &Store,
    args: &Args,
) -> anyhow::Result<()> {
    let name = backend.label();
    let d = args.deliveries;
    let identity = Arc::new(x25519::Identity::generate());
    let (keys, no_key) = (keys_of(&identity, true), keys_of(&identity, false));
    let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "bench-deliveries");
    let lmtp = Mailbox::open(log.clone(), no_key).await?;
    let mut lat = Lat::new();
    let started = Instant::now();
    for i in 0..d {
        let t = Instant::now();
        let (_, uid) = lat.time(t, lmtp.write(add(msg_id(0xd, i))).await?);
        ensure!(uid == Some(i + 1));
        if i + 1 == 1000.min(d) {
            eprintln!(
                "[{name}] first {} single deliveries: {} s",
                i + 1,
                secs(started.elapsed())
            );
        }
    }
    let total = started.elapsed();
    let k = (d as usize / 10).clamp(1, 1000);
    let first = Lat(lat.0[..k].to_vec());
    let last = Lat(lat.0[lat.0.len() - k..].to_vec());

    let mem = MemWindow::start();
    let t = Instant::now();
    let login = Mailbox::open(log.clone(), keys.clone()).await?;
    let open_rows = t.elapsed();
    let open_mem = mem.peak_mib();
    ensure!(login.state().await?.messages.len() as u64 == d);

    let t = Instant::now();
    let cp = login.checkpoint().await?;
    let cp_write = t.elapsed();
    let cp_size = blob_size(store, &cp.blob).await?;
    login.collect(&cp).await?;
    for i in 0..args.tail {
        lmtp.write(add(msg_id(0xe, i))).await?;
    }
    let mem = MemWindow::start();
    let t = Instant::now();
    let next = Mailbox::open(log, keys).await?;
    let open_cp = t.elapsed();
    let open_cp_mem = mem.peak_mib();
    ensure!(next.state().await?.messages.len() as u64 == d + args.tail);

    tables.deliveries.push(format!(
        "| {name} | {} | {} | {} / {} | {} / {} | {} | {open_mem} | {} | {} | {} | {open_cp_mem} |",
        thousands(d),
        secs(total),
        ms(first.pct(0.5)),
        ms(first.pct(0.99)),
        ms(last.pct(0.5)),
        ms(last.pct(0.99)),
        ms(open_rows),
        ms(cp_write),
        thousands(cp_size),
        ms(open_cp),
    ));
    Ok(())
}

fn print_table(title: &str, header: &[&str], rows: &[String]) {
    if rows.is_empty() {
        return;
    }
    println!("\n### {title}\n");
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    for r in rows {
        println!("{r}");
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let run = Instant::now();
    let mut tables = Tables {
        replay: Vec::new(),
        frames: Vec::new(),
        age: Vec::new(),
        bodies: Vec::new(),
        open: Vec::new(),
        append: Vec::new(),
        checkpoint: Vec::new(),
        squash: Vec::new(),
        tombstones: Vec::new(),
        deliveries: Vec::new(),
    };

    eprintln!("replay, op frames, age");
    replay(&mut tables, &args.sizes)?;
    op_frames(&mut tables)?;
    age_throughput(&mut tables)?;

    for &backend in &args.backends {
        let started = Instant::now();
        let dir = tempfile::tempdir()?;
        // Declared before the store that uses it, so it outlives it.
        let garage;
        let mut garage_pid = None;
        let store = match backend {
            Backend::Local => {
                Store::open(&StorageConfig::Local {
                    path: dir.path().to_path_buf(),
                })
                .await?
            }
            Backend::Garage => {
                garage = Garage::single().await?;
                garage_pid = garage.node(0)?.pid();
                Store::open(&StorageConfig::Garage(garage.storage_config())).await?
            }
        };
        eprintln!("[{}] message bodies", backend.label());
        message_bodies(&mut tables, backend, &store, args.quick).await?;
        eprintln!("[{}] {} deliveries", backend.label(), args.deliveries);
        deliveries(&mut tables, backend, &store, &args).await?;
        for &n in &args.sizes {
            mailbox_figures(&mut tables, backend, garage_pid, &store, n, &args).await?;
        }
        eprintln!(
            "[{}] done in {} s",
            backend.label(),
            secs(started.elapsed())
        );
    }

    print_table(
        "Replay (CPU only)",
        &[
            "history",
            "ops",
            "view::compute ms",
            "peak +MiB",
            "apply_next, op by op",
            "view::next_floors (headers) ms",
        ],
        &tables.replay,
    );
    print_table(
        "Op frames (100,000 Add ops)",
        &["step", "bytes/op", "µs/op", "k ops/s", "MB/s"],
        &tables.frames,
    );
    print_table(
        "age (X25519), one value",
        &["size", "encrypt ms", "MB/s", "decrypt ms", "MB/s"],
        &tables.age,
    );
    print_table(
        "Message bodies: MessageStore (encrypted) vs the same bytes as a raw blob",
        &[
            "store",
            "operation",
            "MessageStore min / p50 ms",
            "MB/s at p50",
            "raw blob min / p50 ms",
            "MB/s at p50",
        ],
        &tables.bodies,
    );
    print_table(
        &format!(
            "First login after {} deliveries (single writes by a handle without the key)",
            thousands(args.deliveries)
        ),
        &[
            "store",
            "deliveries",
            "total s",
            "delivery p50/p99 ms, first 10 %",
            "p50/p99 ms, last 10 %",
            "login: cold open from rows ms",
            "peak +MiB",
            "checkpoint ms",
            "checkpoint bytes",
            &format!("next login: checkpoint + {} ops ms", args.tail),
            "peak +MiB",
        ],
        &tables.deliveries,
    );
    print_table(
        "Cold open at N messages",
        &[
            "store",
            "N",
            "populate (batched) s",
            "Garage settling s",
            "reading the rows alone ms",
            "from rows ms",
            "peak +MiB",
            "from rows, no key ms",
            "fetching the checkpoint alone ms",
            "from checkpoint ms",
            "peak +MiB",
            &format!("checkpoint + {} ops ms", args.tail),
            &format!("checkpoint + {} ops, no key ms", args.tail),
            "state() clone ms",
        ],
        &tables.open,
    );
    print_table(
        &format!("Append at N messages ({} single writes each)", args.samples),
        &[
            "store",
            "N",
            "write mean ms",
            "p50",
            "p99",
            "its sync alone p50",
            "its insert alone p50",
            "write, no key mean",
            "p50",
            "p99",
            "sync absorbing 1 concurrent op ms",
        ],
        &tables.append,
    );
    print_table(
        "Checkpoint",
        &[
            "store",
            "N",
            "ops covered",
            "write ms",
            "bytes",
            "bytes/op",
            "collect ms (rows reported)",
            "Garage settling s",
        ],
        &tables.checkpoint,
    );
    print_table(
        "Before and after collecting the rows the checkpoint holds (sync with nothing new: p50 of 20; writes after: the tail)",
        &[
            "store",
            "N",
            "sync before collect ms",
            "its checkpoint listing alone ms",
            "write p50 before (as above) ms",
            "sync after collect ms",
            "its checkpoint listing alone ms",
            "write p50 after collect ms",
        ],
        &tables.tombstones,
    );
    print_table(
        &format!(
            "Maintenance pass (`maintain`: stable prefix squashed into a base state), after the \
             checkpoint and the {} ops of tail",
            args.tail
        ),
        &[
            "store",
            "N",
            "maintain ms",
            "ops squashed",
            "checkpoint bytes",
            "rows collected",
            "cold open from it ms",
            "peak +MiB",
            "no key ms",
        ],
        &tables.squash,
    );
    println!("\nwhole run: {} s", secs(run.elapsed()));
    Ok(())
}
