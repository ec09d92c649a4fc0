//! The conformance suite on the embedded local store, plus what only the local store promises:
//! data survives a reopen and a `kill -9` of the writing process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tern_server::storage::{ReadRange, StorageConfig, Store};
use tern_tests::conformance::Fixture;

async fn local() -> anyhow::Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&StorageConfig::Local {
        path: dir.path().join("store"),
    })
    .await?;
    // The local store's "missing bucket": a path that cannot be a directory.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory")?;
    Ok(Fixture {
        store,
        missing_bucket: StorageConfig::Local {
            path: file.join("store"),
        },
        name: "local",
        _guard: Box::new(dir),
    })
}

tern_tests::conformance_suite!(local);

#[tokio::test]
async fn data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig::Local {
        path: dir.path().to_path_buf(),
    };
    {
        let store = Store::open(&cfg).await.unwrap();
        store
            .rows
            .insert_item("p", "k", None, b"kept".to_vec())
            .await
            .unwrap();
        store
            .blobs
            .put_bytes("blob", bytes::Bytes::from_static(b"body"))
            .await
            .unwrap();
    }
    let store = Store::open(&cfg).await.unwrap();
    let item = store.rows.read_item("p", "k").await.unwrap().unwrap();
    assert_eq!(item.values, vec![Some(b"kept".to_vec())]);
    // A write after reopening still supersedes with the old token: the node id persisted.
    store
        .rows
        .insert_item("p", "k", Some(&item.token), b"next".to_vec())
        .await
        .unwrap();
    let item = store.rows.read_item("p", "k").await.unwrap().unwrap();
    assert_eq!(item.values, vec![Some(b"next".to_vec())]);
    assert_eq!(
        store.blobs.get_bytes("blob").await.unwrap().as_ref(),
        b"body"
    );
}

const CHILD_ENV: &str = "TERN_CRASH_WRITER_DIR";

/// Not a test on its own: the child process of `acknowledged_writes_survive_kill_9`. It writes
/// rows and blobs forever, printing a line after each acknowledged write.
#[tokio::test]
async fn crash_writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round = std::env::var("TERN_CRASH_ROUND").unwrap_or_default();
    let store = Store::open(&StorageConfig::Local { path: dir.into() })
        .await
        .unwrap();
    for i in 0u64.. {
        let value = format!("value {i} ").repeat(50).into_bytes();
        store
            .rows
            .insert_item("crash", &format!("{round}/{i:08}"), None, value)
            .await
            .unwrap();
        let body = bytes::Bytes::from(vec![(i % 251) as u8; 100_000]);
        store
            .blobs
            .put_bytes(&format!("crash/{round}/{i:08}"), body)
            .await
            .unwrap();
        println!("acked {i}");
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut rounds = Vec::new();
    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("TERN_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked = None;
        let target = 30 + round * 17;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("acked ") {
                let n: u64 = n.trim().parse().unwrap();
                acked = Some(n);
                if n >= target {
                    break;
                }
            }
        }
        // SIGKILL mid-write: the child is busy with its next row or blob.
        child.kill().unwrap();
        child.wait().unwrap();
        rounds.push(acked.expect("the child acknowledged some writes"));

        let store = Store::open(&StorageConfig::Local {
            path: dir.path().to_path_buf(),
        })
        .await
        .expect("the store reopens cleanly after kill -9");
        for (r, &acked) in rounds.iter().enumerate() {
            for i in 0..=acked {
                let item = store
                    .rows
                    .read_item("crash", &format!("{r}/{i:08}"))
                    .await
                    .unwrap();
                let want = format!("value {i} ").repeat(50).into_bytes();
                assert_eq!(
                    item.map(|it| it.values),
                    Some(vec![Some(want)]),
                    "row {r}/{i}"
                );
                let body = store
                    .blobs
                    .get_bytes(&format!("crash/{r}/{i:08}"))
                    .await
                    .unwrap();
                assert!(
                    body.len() == 100_000 && body.iter().all(|&b| b == (i % 251) as u8),
                    "blob {r}/{i}"
                );
            }
        }
        // Whatever was in flight is either absent or whole, never torn.
        let page = store
            .rows
            .read_range(ReadRange::partition("crash"))
            .await
            .unwrap();
        for item in &page.items {
            let i: u64 = item.sort_key.split('/').nth(1).unwrap().parse().unwrap();
            assert_eq!(
                item.values,
                vec![Some(format!("value {i} ").repeat(50).into_bytes())]
            );
        }
        drop(store);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
