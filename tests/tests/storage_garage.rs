//! The conformance suite against a real Garage 2.5.0 (started per test by the harness), plus what
//! only a remote cluster can do wrong: bad credentials, a dead or partial cluster.

use std::time::{Duration, Instant};

use tern_server::storage::{GarageConfig, StorageConfig, StorageError, Store};
use tern_tests::conformance::Fixture;
use tern_tests::garage::Garage;

fn config_for(g: &Garage) -> GarageConfig {
    g.storage_config()
}

async fn garage() -> anyhow::Result<Fixture> {
    let g = Garage::single().await?;
    let cfg = config_for(&g);
    let store = Store::open(&StorageConfig::Garage(cfg.clone())).await?;
    Ok(Fixture {
        store,
        missing_bucket: StorageConfig::Garage(GarageConfig {
            bucket: "no-such-bucket".into(),
            ..cfg
        }),
        name: "garage",
        _guard: Box::new(g),
    })
}

tern_tests::conformance_suite!(garage);

#[tokio::test]
async fn bad_credentials_fail_at_start() {
    let g = Garage::single().await.unwrap();
    let wrong_secret = GarageConfig {
        secret_access_key: "0".repeat(64),
        ..config_for(&g)
    };
    match Store::open(&StorageConfig::Garage(wrong_secret)).await {
        Err(StorageError::BadCredentials { key_id, .. }) => assert_eq!(key_id, g.access_key_id),
        Err(e) => panic!("wrong secret: expected BadCredentials, got {e}"),
        Ok(_) => panic!("wrong secret accepted"),
    }
    let unknown_key = GarageConfig {
        access_key_id: "GK00000000000000000000000".into(),
        ..config_for(&g)
    };
    let err = Store::open(&StorageConfig::Garage(unknown_key)).await.err();
    assert!(
        matches!(err, Some(StorageError::BadCredentials { .. })),
        "unknown key: {err:?}"
    );
}

#[tokio::test]
async fn nothing_listening_is_unreachable_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cfg = GarageConfig {
        max_retries: 1,
        ..GarageConfig::new(&endpoint, &endpoint, "b", "GK0", "secret")
    };
    let started = Instant::now();
    let err = Store::open(&StorageConfig::Garage(cfg)).await.err();
    assert!(
        matches!(err, Some(StorageError::Unreachable { .. })),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn garage_stopped_mid_test_gives_a_typed_error_within_the_timeout() {
    let mut g = Garage::single().await.unwrap();
    let cfg = GarageConfig {
        connect_timeout_ms: 500,
        request_timeout_ms: 2_000,
        max_retries: 1,
        ..config_for(&g)
    };
    let store = Store::open(&StorageConfig::Garage(cfg)).await.unwrap();
    store
        .rows
        .insert_item("p", "k", None, b"v".to_vec())
        .await
        .unwrap();
    store
        .blobs
        .put_bytes("k", bytes::Bytes::from_static(b"v"))
        .await
        .unwrap();
    g.stop_node(0).unwrap();

    // Bound: (connect or request timeout) per attempt, two attempts, plus backoff.
    let bound = Duration::from_secs(6);
    let started = Instant::now();
    let err = store.rows.read_item("p", "k").await.err();
    assert!(
        started.elapsed() < bound,
        "row read took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            Some(StorageError::Unreachable { .. } | StorageError::Timeout(_))
        ),
        "row read: {err:?}"
    );
    let started = Instant::now();
    let err = store.blobs.get_bytes("k").await.err();
    assert!(
        started.elapsed() < bound,
        "blob read took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            Some(StorageError::Unreachable { .. } | StorageError::Timeout(_))
        ),
        "blob read: {err:?}"
    );
    let started = Instant::now();
    let err = store
        .rows
        .insert_item("p", "k2", None, b"v".to_vec())
        .await
        .err();
    assert!(
        started.elapsed() < bound,
        "row write took {:?}",
        started.elapsed()
    );
    assert!(
        err.is_some_and(|e| e.is_transient()),
        "a write to a dead cluster is a transient error"
    );
}

#[tokio::test]
async fn three_nodes_survive_one_down_and_report_quorum_loss() {
    let mut g = Garage::three_node().await.unwrap();
    let cfg = GarageConfig {
        request_timeout_ms: 5_000,
        max_retries: 0,
        ..config_for(&g)
    };
    let store = Store::open(&StorageConfig::Garage(cfg)).await.unwrap();
    store
        .rows
        .insert_item("q", "a", None, b"1".to_vec())
        .await
        .unwrap();

    g.stop_node(2).unwrap();
    store
        .rows
        .insert_item("q", "b", None, b"2".to_vec())
        .await
        .unwrap();
    let item = store.rows.read_item("q", "a").await.unwrap().unwrap();
    assert_eq!(item.values, vec![Some(b"1".to_vec())]);
    store
        .blobs
        .put_bytes("q/blob", bytes::Bytes::from_static(b"two of three"))
        .await
        .unwrap();

    g.stop_node(1).unwrap();
    g.wait_node_down(1, Duration::from_secs(30)).await.unwrap();
    let err = store
        .rows
        .insert_item("q", "c", None, b"3".to_vec())
        .await
        .err();
    assert!(
        matches!(
            err,
            Some(StorageError::Quorum(_) | StorageError::Timeout(_))
        ),
        "one node of three cannot make a quorum: {err:?}"
    );

    g.start_node(1).await.unwrap();
    g.start_node(2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.rows.read_item("q", "b").await {
            Ok(Some(item)) => {
                assert_eq!(item.values, vec![Some(b"2".to_vec())]);
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "cluster never recovered: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        store.blobs.get_bytes("q/blob").await.unwrap().as_ref(),
        b"two of three"
    );
}
