//! Storage latency, local store vs a real single-node Garage, in the same run:
//! `cargo bench -p tern-tests --bench storage` (add `-- --quick` for fewer samples).
//! Prints a Markdown table for docs/benchmarks.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use tern_server::storage::{StorageConfig, Store};
use tern_tests::garage::Garage;

struct Stats {
    samples: Vec<Duration>,
}

impl Stats {
    fn pct(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        s[((s.len() as f64 - 1.0) * p).round() as usize]
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

async fn time_n<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Stats>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await?;
        samples.push(t.elapsed());
    }
    Ok(Stats { samples })
}

async fn measure(store: &Store, quick: bool) -> anyhow::Result<Vec<(&'static str, Stats)>> {
    let n = if quick { 50 } else { 300 };
    let value = vec![7u8; 1024];
    let rows = store.rows.clone();
    let mut out = Vec::new();

    let v = value.clone();
    out.push((
        "K2V insert 1 KiB",
        time_n(n, |i| {
            let (rows, v) = (rows.clone(), v.clone());
            async move {
                Ok(rows
                    .insert_item("bench", &format!("{i:06}"), None, v)
                    .await?)
            }
        })
        .await?,
    ));
    out.push((
        "K2V read 1 KiB",
        time_n(n, |i| {
            let rows = rows.clone();
            async move {
                rows.read_item("bench", &format!("{i:06}"))
                    .await?
                    .context("missing")?;
                Ok(())
            }
        })
        .await?,
    ));

    // Poll wake-up: from the start of the write to the poller returning.
    let mut wake = Vec::new();
    for i in 0..(n / 6).max(10) {
        let sk = format!("poll{i}");
        rows.insert_item("bench-poll", &sk, None, value.clone())
            .await?;
        let token = rows
            .read_item("bench-poll", &sk)
            .await?
            .context("missing")?
            .token;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let poller = {
            let (rows, sk, token) = (rows.clone(), sk.clone(), token.clone());
            tokio::spawn(async move {
                let r = rows
                    .poll_item("bench-poll", &sk, &token, Duration::from_secs(30))
                    .await;
                let _ = tx.send(Instant::now());
                r
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        rows.insert_item("bench-poll", &sk, Some(&token), value.clone())
            .await?;
        let woke = rx.await?;
        poller.await??.context("poll timed out")?;
        wake.push(woke.saturating_duration_since(started));
    }
    out.push(("K2V poll wake-up", Stats { samples: wake }));

    let blobs = store.blobs.clone();
    for (name_put, name_get, size, count) in [
        (
            "S3 put 64 KiB",
            "S3 get 64 KiB",
            64 * 1024,
            if quick { 30 } else { 100 },
        ),
        (
            "S3 put 10 MiB",
            "S3 get 10 MiB",
            10 * 1024 * 1024,
            if quick { 4 } else { 12 },
        ),
    ] {
        let body = Bytes::from(vec![3u8; size]);
        out.push((
            name_put,
            time_n(count, |i| {
                let (blobs, body) = (blobs.clone(), body.clone());
                async move {
                    blobs.put_bytes(&format!("bench/{size}/{i}"), body).await?;
                    Ok(())
                }
            })
            .await?,
        ));
        out.push((
            name_get,
            time_n(count, |i| {
                let blobs = blobs.clone();
                async move {
                    let got = blobs.get_bytes(&format!("bench/{size}/{i}")).await?;
                    anyhow::ensure!(got.len() == size);
                    Ok(())
                }
            })
            .await?,
        ));
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = tempfile::tempdir()?;
    let local = Store::open(&StorageConfig::Local {
        path: dir.path().to_path_buf(),
    })
    .await?;
    let garage = Garage::single().await?;
    let cfg = garage.storage_config();
    let remote = Store::open(&StorageConfig::Garage(cfg)).await?;

    let local_stats = measure(&local, quick).await?;
    let garage_stats = measure(&remote, quick).await?;
    let _keep = Arc::new(garage);

    println!(
        "| operation | local p50 ms | local p99 ms | Garage p50 ms | Garage p99 ms | Garage/local p50 |"
    );
    println!("|---|---|---|---|---|---|");
    for ((name, l), (_, g)) in local_stats.iter().zip(garage_stats.iter()) {
        let ratio = g.pct(0.5).as_secs_f64() / l.pct(0.5).as_secs_f64().max(1e-9);
        println!(
            "| {name} | {} | {} | {} | {} | {ratio:.1}× |",
            ms(l.pct(0.5)),
            ms(l.pct(0.99)),
            ms(g.pct(0.5)),
            ms(g.pct(0.99))
        );
    }
    Ok(())
}
