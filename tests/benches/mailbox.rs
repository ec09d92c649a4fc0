//! Mailbox core figures, local store and single-node Garage in the same run:
//! `cargo bench -p tern-tests --bench mailbox` (`-- --quick` for 10k instead of 100k ops).
//!
//! - replay: `view::compute` over N ops (pure CPU), sequential and with concurrent appends;
//! - cold open of an N-message mailbox from op rows only (what a first login after N
//!   deliveries costs), and from a checkpoint;
//! - append latency (`Mailbox::write`) at 1k / 10k / N messages (must stay flat);
//! - age encrypt/decrypt throughput.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::x25519;
use tern_server::log::clock::{Dot, VersionVector, WriterId};
use tern_server::log::codec;
use tern_server::log::store::LogStore;
use tern_server::mail::mailbox::{Mailbox, MailboxKeys};
use tern_server::mail::view::{self, LogOp, MailOp, MessageId};
use tern_server::storage::{InsertOp, StorageConfig, Store};
use tern_tests::garage::Garage;

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
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
                msg: MessageId(format!("{writer:x}-{i:08}")),
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
                msg: MessageId(format!("a-{i}")),
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
                    msg: MessageId(format!("c-{seq2}")),
                    flags: BTreeSet::new(),
                    uid_floor: floor,
                },
            });
        }
    }
    ops
}

async fn load_rows(store: &Store, partition: &str, ops: &[LogOp], recipient: &x25519::Recipient) {
    let log = LogStore::new(store.rows.clone(), store.blobs.clone(), partition);
    let wk = codec::WriterKey::generate();
    log.register(WriterId(1), wk.seal(recipient).unwrap())
        .await
        .unwrap();
    let mut batch = Vec::new();
    for op in ops {
        let body = postcard::to_allocvec(&op.op).unwrap();
        let row = tern_server::log::store::op_key(op.dot);
        batch.push(InsertOp {
            partition_key: partition.to_string(),
            value: Some(codec::encode(&row, &op.header(), &body, &wk).unwrap()),
            sort_key: row,
            token: None,
        });
        if batch.len() == 500 {
            store
                .rows
                .insert_batch(std::mem::take(&mut batch))
                .await
                .unwrap();
        }
    }
    if !batch.is_empty() {
        store.rows.insert_batch(batch).await.unwrap();
    }
}

async fn store_figures(name: &str, store: &Store, n: u64) {
    let identity = Arc::new(x25519::Identity::generate());
    let keys = MailboxKeys {
        recipient: identity.to_public(),
        identity: Some(identity.clone()),
    };
    let mut sizes = vec![1_000, 10_000, n];
    sizes.dedup();
    for size in sizes {
        let partition = format!("log/bench-{size}");
        let ops = sequential_adds(size, 1);
        load_rows(store, &partition, &ops, &keys.recipient).await;
        let log = LogStore::new(store.rows.clone(), store.blobs.clone(), &partition);

        let t = Instant::now();
        let mb = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
        let cold_rows = t.elapsed();
        assert_eq!(mb.state().await.unwrap().messages.len() as u64, size);

        let mut appends = Vec::new();
        for i in 0..50 {
            let t = Instant::now();
            mb.write(|uid_floor| MailOp::Add {
                msg: MessageId(format!("new-{i}")),
                flags: BTreeSet::new(),
                uid_floor,
            })
            .await
            .unwrap();
            appends.push(t.elapsed());
        }
        appends.sort();

        let t = Instant::now();
        let cp = mb.checkpoint().await.unwrap();
        let write_cp = t.elapsed();
        mb.collect(&cp).await.unwrap();
        let t = Instant::now();
        let reopened = Mailbox::open(log, keys.clone()).await.unwrap();
        let cold_cp = t.elapsed();
        assert_eq!(
            reopened.state().await.unwrap().messages.len() as u64,
            size + 50
        );

        println!(
            "| {name} | {size} | {} | {} | {} | {} | {} |",
            ms(cold_rows),
            ms(write_cp),
            ms(cold_cp),
            ms(appends[appends.len() / 2]),
            ms(appends[appends.len() * 99 / 100])
        );
    }
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n: u64 = if quick { 10_000 } else { 100_000 };

    println!("## replay (view::compute, CPU only)\n");
    println!("| history | ops | time ms |");
    println!("|---|---|---|");
    for (label, ops) in [
        ("sequential appends", sequential_adds(n, 1)),
        ("1% concurrent appends", with_concurrency(n)),
    ] {
        let t = Instant::now();
        let s = view::compute(&ops);
        let d = t.elapsed();
        println!("| {label} | {} | {} |", ops.len(), ms(d));
        assert!(s.messages.len() as u64 >= n);
    }

    println!("\n## age throughput\n");
    let id = x25519::Identity::generate();
    for size in [1024usize, 1024 * 1024] {
        let data = vec![5u8; size];
        let rounds = if size > 4096 { 20 } else { 2000 };
        let t = Instant::now();
        let mut ct = Vec::new();
        for _ in 0..rounds {
            ct = age::encrypt(&id.to_public(), &data).unwrap();
        }
        let enc = t.elapsed() / rounds;
        let t = Instant::now();
        for _ in 0..rounds {
            age::decrypt(&id, &ct).unwrap();
        }
        let dec = t.elapsed() / rounds;
        println!(
            "| {size} B | encrypt {:.3} ms ({:.0} MB/s) | decrypt {:.3} ms ({:.0} MB/s) |",
            enc.as_secs_f64() * 1e3,
            size as f64 / enc.as_secs_f64() / 1e6,
            dec.as_secs_f64() * 1e3,
            size as f64 / dec.as_secs_f64() / 1e6
        );
    }

    println!("\n## cold open and append\n");
    println!(
        "| store | messages | cold open from rows ms | write checkpoint ms | cold open from checkpoint ms | append p50 ms | append p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let dir = tempfile::tempdir().unwrap();
    let local = Store::open(&StorageConfig::Local {
        path: dir.path().to_path_buf(),
    })
    .await
    .unwrap();
    store_figures("local", &local, n).await;

    let garage = Garage::single().await.unwrap();
    let cfg = garage.storage_config();
    let remote = Store::open(&StorageConfig::Garage(cfg)).await.unwrap();
    store_figures("garage (1 node)", &remote, n).await;
}
