//! Checks of the Garage harness itself, through the admin API only (no S3 client involved).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tern_tests::garage::{DEFAULT_BUCKET, Garage, REGION};

#[tokio::test]
async fn single_node_is_healthy_with_key_and_bucket() -> Result<()> {
    let started = Instant::now();
    let garage = Garage::single().await?;
    let elapsed = started.elapsed();

    let health = garage.health().await?;
    ensure!(health.is_healthy(), "unexpected health {health:?}");
    ensure!(health.storage_nodes == 1 && health.storage_nodes_up == 1);

    // The unauthenticated health endpoint load balancers use agrees.
    let status = reqwest::get(format!("{}/health", garage.admin_endpoint))
        .await
        .context("GET /health")?
        .status();
    ensure!(status.is_success(), "/health answered {status}");

    ensure!(garage.region == REGION && garage.bucket == DEFAULT_BUCKET);
    ensure!(
        garage.access_key_id.starts_with("GK"),
        "{}",
        garage.access_key_id
    );
    ensure!(!garage.secret_access_key.is_empty());
    ensure!(garage.s3_endpoint.starts_with("http://127.0.0.1:"));
    ensure!(garage.k2v_endpoint.starts_with("http://127.0.0.1:"));

    let bucket = garage
        .admin_get(
            0,
            &format!("/v2/GetBucketInfo?globalAlias={DEFAULT_BUCKET}"),
        )
        .await?;
    let keys = bucket["keys"].as_array().context("bucket without keys")?;
    ensure!(
        keys.iter()
            .any(|k| k["accessKeyId"] == garage.access_key_id.as_str()
                && k["permissions"]["read"] == true
                && k["permissions"]["write"] == true
                && k["permissions"]["owner"] == true),
        "test key lacks permissions: {bucket}"
    );

    // Generous bound: the target is < 3 s (measured ~0.1-0.3 s), but CI shares 2 cores.
    ensure!(
        elapsed < Duration::from_secs(10),
        "single() took {elapsed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn create_bucket_allows_the_test_key() -> Result<()> {
    let garage = Garage::single().await?;
    garage.create_bucket("second").await?;
    let bucket = garage
        .admin_get(0, "/v2/GetBucketInfo?globalAlias=second")
        .await?;
    ensure!(
        bucket["keys"][0]["accessKeyId"] == garage.access_key_id.as_str(),
        "{bucket}"
    );
    Ok(())
}

#[tokio::test]
async fn processes_die_with_the_harness() -> Result<()> {
    let garage = Garage::single().await?;
    let pid = garage.node(0)?.pid().context("node 0 not running")?;
    let proc_dir = format!("/proc/{pid}");
    ensure!(std::path::Path::new(&proc_dir).exists());
    drop(garage);
    ensure!(
        !std::path::Path::new(&proc_dir).exists(),
        "garage pid {pid} survived drop"
    );
    Ok(())
}

#[tokio::test]
async fn three_nodes_survive_one_down_and_rejoin() -> Result<()> {
    let mut garage = Garage::three_node().await?;
    for index in 0..3 {
        let health = garage.node_health(index).await?;
        ensure!(
            health.is_healthy() && health.connected_nodes == 3 && health.storage_nodes_up == 3,
            "node {index}: {health:?}"
        );
    }

    garage.stop_node(2)?;
    ensure!(!garage.node(2)?.is_running());
    let stopped = Instant::now();
    garage.wait_node_down(2, Duration::from_secs(20)).await?;
    let health = garage
        .wait_for_health(Duration::from_secs(5), |h| h.is_degraded())
        .await?;
    ensure!(
        stopped.elapsed() < Duration::from_secs(10),
        "noticing the crash took {:?}",
        stopped.elapsed()
    );
    ensure!(health.storage_nodes_up == 2, "{health:?}");
    // Quorum (2 of 3) still holds for every partition.
    ensure!(health.partitions_quorum == health.partitions, "{health:?}");

    let restarted = Instant::now();
    garage.start_node(2).await?;
    garage.wait_healthy(Duration::from_secs(30)).await?;
    ensure!(
        restarted.elapsed() < Duration::from_secs(20),
        "rejoin took {:?}",
        restarted.elapsed()
    );
    Ok(())
}
