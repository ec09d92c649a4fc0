//! The mailbox log on a real Garage: two processes' handles writing one mailbox, writer leases
//! (renewal, expiry, a writer coming back after its rows were forgotten), squashed checkpoints
//! and cold opens — the K2V causality these rely on (siblings, tokens, tombstones) is Garage's
//! own here, not the local backend's.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use age::x25519;
use tern_server::log::store::LogStore;
use tern_server::mail::mailbox::{
    CheckpointPolicy, LeasePolicy, Mailbox, MailboxKeys, MailboxPolicy,
};
use tern_server::mail::view::{FlagAction, MailOp, MessageId};
use tern_server::storage::{StorageConfig, Store};
use tern_tests::garage::Garage;

fn policy() -> MailboxPolicy {
    MailboxPolicy {
        lease: LeasePolicy {
            renew_after: Duration::from_millis(200),
            send_limit: Duration::from_millis(400),
            expire_after: Duration::from_secs(2),
        },
        checkpoint: CheckpointPolicy {
            every_ops: 10,
            every: Duration::from_secs(3600),
        },
    }
}

fn add(id: &str) -> impl FnOnce(u64) -> MailOp + '_ {
    move |uid_floor| MailOp::Add {
        msg: MessageId(id.into()),
        flags: BTreeSet::new(),
        uid_floor,
    }
}

#[tokio::test]
async fn leases_squashes_and_cold_opens_on_garage() {
    let g = Garage::single().await.unwrap();
    let store = Store::open(&StorageConfig::Garage(g.storage_config()))
        .await
        .unwrap();
    let identity = Arc::new(x25519::Identity::generate());
    let keys = MailboxKeys {
        recipient: identity.to_public(),
        identity: Some(identity.clone()),
    };
    let log = LogStore::new(store.rows.clone(), store.blobs.clone(), "log/garage-mbx");
    let a = Mailbox::open_with(log.clone(), keys.clone(), policy())
        .await
        .unwrap();
    let b = Mailbox::open_with(log.clone(), keys.clone(), policy())
        .await
        .unwrap();
    for i in 0..15 {
        a.write(add(&format!("a{i}"))).await.unwrap();
    }
    b.write(add("b0")).await.unwrap();
    // b renews (its lease then names everything so far) with a flag change.
    tokio::time::sleep(Duration::from_millis(250)).await;
    b.write(|_| MailOp::Flags {
        msg: MessageId("a0".into()),
        action: FlagAction::Add,
        flags: BTreeSet::from(["\\Seen".to_string()]),
    })
    .await
    .unwrap();
    let first = a.maintain().await.unwrap();
    assert_eq!(first.squashed, 16, "{first:?}");
    assert!(first.rows_collected >= 16, "{first:?}");

    // b goes quiet past the expiry: the next passes expire it and forget its rows.
    let _ = a.maintain().await.unwrap(); // starts watching b's lease token
    tokio::time::sleep(Duration::from_millis(2200)).await;
    a.write(add("a15")).await.unwrap();
    let second = a.maintain().await.unwrap();
    assert_eq!(second.writers_expired, 1, "{second:?}");
    assert_eq!(second.writers_forgotten, 1, "{second:?}");

    // A cold open (another process) agrees, with and without the key.
    let cold = Mailbox::open(log.clone(), keys.clone()).await.unwrap();
    assert_eq!(cold.state().await.unwrap(), a.state().await.unwrap());
    let lmtp = Mailbox::open(
        log.clone(),
        MailboxKeys {
            recipient: identity.to_public(),
            identity: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(lmtp.floors().await, a.floors().await);

    // b comes back: Garage shows its deleted lease as a tombstone beside b's renewal, so b
    // takes a fresh id; its message lands after everything, nothing renumbered.
    let (_, uid) = b.write(add("b1")).await.unwrap();
    a.sync().await.unwrap();
    let s = a.state().await.unwrap();
    assert_eq!(s.uid_of(&MessageId("b1".into())), uid);
    assert_eq!(s.messages.len(), 18);
    assert_eq!(s.renumbered, 0);
    assert!(s.messages[&1].flags.contains("\\Seen"));
}
