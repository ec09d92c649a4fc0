//! A user's storage usage (bytes and number of stored messages), for quota checks by processes
//! that do not hold the user's key (LMTP delivers with the public recipient only).
//!
//! # Layout: partition `u/<user id>/usage`, plaintext values
//!
//! - `w/<writer>/<epoch>`: one PN-counter component: the cumulative `(added, removed)` bytes and
//!   messages recorded by one writer (a process) since that row was started. Only its writer
//!   writes it, by read-modify-write with the token of its read, serialised in the process; so
//!   concurrent processes (and regions) never write the same row and no increment is lost.
//!   Siblings (a retried write) merge by component-wise max, the join of monotone counters.
//! - `base`: what compaction folded: for each folded writer row, the counts it held when folded
//!   (`entries`), and `purged`, the sum of entries dropped once their row was gone for good.
//!
//! Reading (no key) sums `purged + Σ entries + Σ over live rows of (row − its entry)`: a row's
//! part already in the base is never counted twice, and what was added after the fold is counted.
//!
//! # Compaction, and why a concurrent increment is never lost
//!
//! `compact` (run by the sweep, under its lease, so one compactor at a time) first writes the
//! base, with every live row's counts recorded as its entry, then deletes each folded row **with
//! the causality token of the read that saw the folded value**. A delete supersedes exactly what
//! its token saw, so an increment written concurrently (its writer read the row before the
//! delete and wrote after it) survives as a sibling of the tombstone. That sibling is cumulative,
//! so `row − entry` is exactly the increments the fold missed; the next compaction folds them.
//! A writer whose read shows a tombstone knows its row was compacted and starts the next epoch's
//! row from zero, so it never adds to a folded value the base does not know about.
//!
//! Order: base first, deletes second. A crash in between leaves rows the base already records
//! (`row − entry` = 0): nothing counted twice, nothing lost.
//!
//! An entry is dropped (folded into `purged`) once its row has had no live value for a grace
//! period. That relies on the same bound as the message sweep: a writer writes within seconds of
//! its read, so no write based on a read from before the delete can arrive a grace later.
//!
//! # What it reveals
//!
//! Anyone who can read the row store learns, per user id, the total bytes and number of stored
//! messages, how each changed and when (per writer), and roughly how many processes wrote. Not
//! which mailbox, nor any single message's size beyond what consecutive changes show.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::storage::{CausalityToken, Item, KeyRange, ReadRange, RowStore, StorageError};
use crate::users::UserId;

const FORMAT_VERSION: u8 = 1;
const BASE_KEY: &str = "base";
/// Writers serialise their updates per user through one of these locks (by user hash).
const STRIPES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("usage counter storage error: {0}")]
    Storage(#[from] StorageError),
    #[error("usage counter row {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("usage counter row {key} has format version {found}, this build reads {supported}")]
    UnsupportedVersion {
        key: String,
        found: u8,
        supported: u8,
    },
}

/// Cumulative counts of one writer row (a PN-counter component: every field only grows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageCounts {
    pub added_bytes: u64,
    pub removed_bytes: u64,
    pub added_messages: u64,
    pub removed_messages: u64,
}

impl UsageCounts {
    /// One message of `bytes` stored.
    pub fn stored(bytes: u64) -> UsageCounts {
        UsageCounts {
            added_bytes: bytes,
            added_messages: 1,
            ..Default::default()
        }
    }

    /// One message of `bytes` removed.
    pub fn removed(bytes: u64) -> UsageCounts {
        UsageCounts {
            removed_bytes: bytes,
            removed_messages: 1,
            ..Default::default()
        }
    }

    fn zip(self, o: UsageCounts, f: impl Fn(u64, u64) -> u64) -> UsageCounts {
        UsageCounts {
            added_bytes: f(self.added_bytes, o.added_bytes),
            removed_bytes: f(self.removed_bytes, o.removed_bytes),
            added_messages: f(self.added_messages, o.added_messages),
            removed_messages: f(self.removed_messages, o.removed_messages),
        }
    }

    fn plus(self, o: UsageCounts) -> UsageCounts {
        self.zip(o, u64::saturating_add)
    }

    /// The join of two states of one monotone counter.
    fn join(self, o: UsageCounts) -> UsageCounts {
        self.zip(o, u64::max)
    }

    /// What `self` holds beyond `o` (0 where it holds less).
    fn beyond(self, o: UsageCounts) -> UsageCounts {
        self.zip(o, u64::saturating_sub)
    }
}

/// What a quota check needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageFigures {
    pub bytes: u64,
    pub messages: u64,
}

impl From<UsageCounts> for UsageFigures {
    fn from(c: UsageCounts) -> UsageFigures {
        UsageFigures {
            bytes: c.added_bytes.saturating_sub(c.removed_bytes),
            messages: c.added_messages.saturating_sub(c.removed_messages),
        }
    }
}

/// A folded writer row in the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    counts: UsageCounts,
    /// When (compactor clock, ms) the row was deleted and not seen live since.
    gone_since: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Base {
    purged: UsageCounts,
    entries: std::collections::BTreeMap<String, Entry>,
}

impl Base {
    /// Siblings of the base exist only if two compactors raced (the sweep lease prevents it).
    /// Entries merge exactly (max of one monotone counter); `purged` by max, exact unless both
    /// purged different entries.
    fn merge(self, o: Base) -> Base {
        let mut entries = self.entries;
        for (k, e) in o.entries {
            entries
                .entry(k)
                .and_modify(|mine| {
                    mine.counts = mine.counts.join(e.counts);
                    mine.gone_since = match (mine.gone_since, e.gone_since) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                })
                .or_insert(e);
        }
        Base {
            purged: self.purged.join(o.purged),
            entries,
        }
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, UsageError> {
    let mut out = vec![FORMAT_VERSION];
    out.extend(
        postcard::to_allocvec(value).map_err(|e| UsageError::Corrupt {
            key: key.to_string(),
            detail: e.to_string(),
        })?,
    );
    Ok(out)
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T, UsageError> {
    match raw.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| UsageError::Corrupt {
                key: key.to_string(),
                detail: e.to_string(),
            })
        }
        Some((&v, _)) => Err(UsageError::UnsupportedVersion {
            key: key.to_string(),
            found: v,
            supported: FORMAT_VERSION,
        }),
        None => Err(UsageError::Corrupt {
            key: key.to_string(),
            detail: "empty value".into(),
        }),
    }
}

/// The join of an item's live values; `None` if it has none.
fn live_counts(item: &Item) -> Result<Option<UsageCounts>, UsageError> {
    let mut out: Option<UsageCounts> = None;
    for raw in item.live_values() {
        let c: UsageCounts = decode(&item.sort_key, raw)?;
        out = Some(out.map_or(c, |o| o.join(c)));
    }
    Ok(out)
}

fn partition(user: &UserId) -> String {
    format!("u/{}/usage", user.0)
}

fn row_key(writer: u64, epoch: u32) -> String {
    format!("w/{writer:016x}/{epoch:08x}")
}

fn parse_epoch(key: &str) -> Option<u32> {
    let (_, epoch) = key.rsplit_once('/')?;
    u32::from_str_radix(epoch, 16).ok()
}

async fn read_all(rows: &dyn RowStore, search: ReadRange) -> Result<Vec<Item>, UsageError> {
    let mut search = search;
    let mut out = Vec::new();
    loop {
        let page = rows.read_range(search.clone()).await?;
        out.extend(page.items);
        if !page.more {
            return Ok(out);
        }
        search.range.start = page.next_start;
    }
}

fn writer_rows(user: &UserId, tombstones: bool) -> ReadRange {
    ReadRange {
        partition_key: partition(user),
        range: KeyRange {
            prefix: Some("w/".into()),
            ..Default::default()
        },
        tombstones,
        ..Default::default()
    }
}

async fn read_base(
    rows: &dyn RowStore,
    user: &UserId,
) -> Result<(Base, Option<CausalityToken>), UsageError> {
    let Some(item) = rows.read_item(&partition(user), BASE_KEY).await? else {
        return Ok((Base::default(), None));
    };
    let mut base = Base::default();
    for raw in item.live_values() {
        base = base.merge(decode(BASE_KEY, raw)?);
    }
    Ok((base, Some(item.token)))
}

/// A process's identity as a usage writer, shared by every user it writes for. Its id names
/// its rows; the locks serialise its own read-modify-writes of one user's row.
pub struct UsageWriter {
    id: u64,
    stripes: [tokio::sync::Mutex<()>; STRIPES],
}

impl UsageWriter {
    pub fn new() -> Arc<UsageWriter> {
        Arc::new(UsageWriter {
            id: rand::random::<u64>() | 1,
            stripes: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
        })
    }

    /// The one writer of this process.
    pub fn process() -> Arc<UsageWriter> {
        static PROCESS: OnceLock<Arc<UsageWriter>> = OnceLock::new();
        PROCESS.get_or_init(UsageWriter::new).clone()
    }

    fn stripe(&self, user: &UserId) -> &tokio::sync::Mutex<()> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(&user.0);
        &self.stripes[(h % STRIPES as u64) as usize]
    }
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Writer rows whose counts went into the base (and were deleted).
    pub rows_folded: usize,
    /// Base entries dropped into `purged` (their rows gone for a grace period).
    pub entries_purged: usize,
}

/// One user's usage counter, as written by one writer.
#[derive(Clone)]
pub struct Usage {
    rows: Arc<dyn RowStore>,
    user: UserId,
    writer: Arc<UsageWriter>,
}

impl Usage {
    pub fn new(rows: Arc<dyn RowStore>, user: UserId, writer: Arc<UsageWriter>) -> Usage {
        Usage { rows, user, writer }
    }

    /// With the process's writer.
    pub fn for_process(rows: Arc<dyn RowStore>, user: UserId) -> Usage {
        Usage::new(rows, user, UsageWriter::process())
    }

    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Adds `delta` to this writer's row: one read and one write, with the read's token.
    pub async fn add(&self, delta: UsageCounts) -> Result<(), UsageError> {
        let _serial = self.writer.stripe(&self.user).lock().await;
        let part = partition(&self.user);
        // The newest epoch of this writer's rows, tombstoned ones included.
        let prefix = format!("w/{:016x}/", self.writer.id);
        let page = self
            .rows
            .read_range(ReadRange {
                partition_key: part.clone(),
                range: KeyRange {
                    prefix: Some(prefix),
                    limit: Some(1),
                    reverse: true,
                    ..Default::default()
                },
                tombstones: true,
                ..Default::default()
            })
            .await?;
        let found = match page.items.first() {
            None => None,
            Some(item) => {
                let epoch = parse_epoch(&item.sort_key).ok_or_else(|| UsageError::Corrupt {
                    key: item.sort_key.clone(),
                    detail: "not a writer row key".into(),
                })?;
                Some((epoch, item))
            }
        };
        let (epoch, current, token) = match found {
            Some((epoch, item)) if !item.values.iter().any(Option::is_none) => (
                epoch,
                live_counts(item)?.unwrap_or_default(),
                Some(item.token.clone()),
            ),
            // No row, or a compacted one (its value is in the base): start a fresh row.
            found => (
                self.fresh_epoch(found.map(|(e, _)| e)).await?,
                UsageCounts::default(),
                None,
            ),
        };
        let key = row_key(self.writer.id, epoch);
        let value = encode(&key, &current.plus(delta))?;
        self.rows
            .insert_item(&part, &key, token.as_ref(), value)
            .await?;
        Ok(())
    }

    /// An epoch above every row of this writer still listed and every one the base remembers.
    /// The store may collect a tombstoned row while the base still holds its entry; a new row
    /// under that key would have its first increments taken for the folded ones.
    async fn fresh_epoch(&self, last_listed: Option<u32>) -> Result<u32, UsageError> {
        let (base, _) = read_base(self.rows.as_ref(), &self.user).await?;
        let prefix = format!("w/{:016x}/", self.writer.id);
        let in_base = base
            .entries
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .filter_map(|k| parse_epoch(k))
            .max();
        match last_listed.max(in_base) {
            None => Ok(0),
            Some(e) => e.checked_add(1).ok_or_else(|| UsageError::Corrupt {
                key: row_key(self.writer.id, e),
                detail: "epoch overflow".into(),
            }),
        }
    }

    /// The user's usage, without any key.
    pub async fn read(rows: &dyn RowStore, user: &UserId) -> Result<UsageFigures, UsageError> {
        // Rows before the base: a row folded and deleted between the two reads is then in the
        // base; read the other way round, it could be in neither.
        let items = read_all(rows, writer_rows(user, false)).await?;
        let (base, _) = read_base(rows, user).await?;
        let mut total = base.purged;
        for e in base.entries.values() {
            total = total.plus(e.counts);
        }
        for item in &items {
            if let Some(c) = live_counts(item)? {
                let folded = base
                    .entries
                    .get(&item.sort_key)
                    .map(|e| e.counts)
                    .unwrap_or_default();
                total = total.plus(c.beyond(folded));
            }
        }
        Ok(total.into())
    }

    /// Folds the live writer rows into the base and deletes them; drops base entries whose row
    /// has been gone for `grace`. `now_ms` is the caller's clock. Run by one process at a time
    /// (the sweep, under its lease); writers may run concurrently.
    pub async fn compact(
        rows: &dyn RowStore,
        user: &UserId,
        now_ms: u64,
        grace: Duration,
    ) -> Result<CompactStats, UsageError> {
        let items = read_all(rows, writer_rows(user, false)).await?;
        let (mut base, base_token) = read_base(rows, user).await?;
        let mut stats = CompactStats::default();
        let mut to_delete: Vec<(String, CausalityToken)> = Vec::new();
        let mut live_keys = std::collections::BTreeSet::new();
        for item in &items {
            if let Some(c) = live_counts(item)? {
                let entry = base.entries.entry(item.sort_key.clone()).or_insert(Entry {
                    counts: UsageCounts::default(),
                    gone_since: None,
                });
                entry.counts = entry.counts.join(c);
                entry.gone_since = Some(now_ms);
                live_keys.insert(item.sort_key.clone());
                to_delete.push((item.sort_key.clone(), item.token.clone()));
            }
        }
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let mut purged = base.purged;
        base.entries.retain(|key, e| {
            let gone = e.gone_since.get_or_insert(now_ms);
            let expired = !live_keys.contains(key) && now_ms.saturating_sub(*gone) >= grace_ms;
            if expired {
                purged = purged.plus(e.counts);
                stats.entries_purged += 1;
            }
            !expired
        });
        base.purged = purged;
        if to_delete.is_empty() && stats.entries_purged == 0 {
            return Ok(stats);
        }
        let part = partition(user);
        rows.insert_item(
            &part,
            BASE_KEY,
            base_token.as_ref(),
            encode(BASE_KEY, &base)?,
        )
        .await?;
        for (key, token) in to_delete {
            rows.delete_item(&part, &key, &token).await?;
            stats.rows_folded += 1;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StorageConfig, Store};

    async fn local() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().into(),
        })
        .await
        .unwrap();
        (dir, store)
    }

    fn user() -> UserId {
        UserId("00c0ffee".into())
    }

    #[tokio::test]
    async fn concurrent_writers_add_up_and_reading_needs_no_key() {
        let (_d, store) = local().await;
        // Two processes (two writers), each with many concurrent deliveries.
        let a = Usage::new(store.rows.clone(), user(), UsageWriter::new());
        let b = Usage::new(store.rows.clone(), user(), UsageWriter::new());
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let u = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                u.add(UsageCounts::stored(1000 + i)).await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        a.add(UsageCounts::removed(1000)).await.unwrap();
        let expected: u64 = (0..40).map(|i| 1000 + i).sum::<u64>() - 1000;
        // Only the row store: no identity anywhere in this test.
        let got = Usage::read(store.rows.as_ref(), &user()).await.unwrap();
        assert_eq!(
            got,
            UsageFigures {
                bytes: expected,
                messages: 39
            }
        );
        // One row per writer, values in the clear (documented).
        let items = read_all(store.rows.as_ref(), writer_rows(&user(), false))
            .await
            .unwrap();
        assert_eq!(items.len(), 2);
        assert!(
            items.iter().all(|i| i.values.len() == 1),
            "no siblings: {items:?}"
        );
        // Another user is not affected.
        let other = Usage::read(store.rows.as_ref(), &UserId("00ff".into()))
            .await
            .unwrap();
        assert_eq!(other, UsageFigures::default());
    }

    #[tokio::test]
    async fn compaction_folds_rows_and_loses_nothing_under_concurrent_updates() {
        let (_d, store) = local().await;
        let rows = store.rows.clone();
        let writers: Vec<Usage> = (0..3)
            .map(|_| Usage::new(rows.clone(), user(), UsageWriter::new()))
            .collect();
        let mut expected = 0u64;
        for (i, w) in writers.iter().enumerate() {
            w.add(UsageCounts::stored(100 * (i as u64 + 1)))
                .await
                .unwrap();
            expected += 100 * (i as u64 + 1);
        }
        // Compactions run while the writers keep adding.
        let mut tasks = Vec::new();
        for (i, w) in writers.iter().enumerate() {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                for j in 0..25u64 {
                    w.add(UsageCounts::stored(i as u64 * 1000 + j))
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            }));
            expected += (0..25u64).map(|j| i as u64 * 1000 + j).sum::<u64>();
        }
        let compactor = {
            let rows = rows.clone();
            tokio::spawn(async move {
                let mut folded = 0;
                for t in 0..30u64 {
                    // A grace far longer than the run: no entry is purged while writers write.
                    let s = Usage::compact(rows.as_ref(), &user(), t, Duration::from_secs(3600))
                        .await
                        .unwrap();
                    folded += s.rows_folded;
                    // Readers during compaction never see more than was added.
                    let r = Usage::read(rows.as_ref(), &user()).await.unwrap();
                    assert!(r.messages <= 78, "{r:?}");
                    tokio::task::yield_now().await;
                }
                folded
            })
        };
        for t in tasks {
            t.await.unwrap();
        }
        let folded = compactor.await.unwrap();
        assert!(folded > 0, "compaction folded something");
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!(
            got,
            UsageFigures {
                bytes: expected,
                messages: 78
            }
        );
        // Final compactions: everything is in the base, entries purged after the grace.
        let hour = Duration::from_secs(3600);
        let s1 = Usage::compact(rows.as_ref(), &user(), 10_000_000, hour)
            .await
            .unwrap();
        let s2 = Usage::compact(rows.as_ref(), &user(), 20_000_000, hour)
            .await
            .unwrap();
        assert!(s1.entries_purged + s2.entries_purged > 0, "{s1:?} {s2:?}");
        let live = read_all(rows.as_ref(), writer_rows(&user(), false))
            .await
            .unwrap();
        assert!(live.is_empty(), "{live:?}");
        let (base, _) = read_base(rows.as_ref(), &user()).await.unwrap();
        assert!(base.entries.is_empty(), "{base:?}");
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!(got.bytes, expected);
        // Writers continue after compaction in new epochs, and are counted.
        writers[0].add(UsageCounts::removed(100)).await.unwrap();
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (expected - 100, 77));
    }

    /// The exact race: the writer reads its row, the compactor folds and deletes it, the
    /// writer writes (with its older token). The increment survives beside the tombstone.
    #[tokio::test]
    async fn an_increment_racing_the_delete_survives_beside_the_tombstone() {
        let (_d, store) = local().await;
        let rows = store.rows.clone();
        let w = Usage::new(rows.clone(), user(), UsageWriter::new());
        w.add(UsageCounts::stored(10)).await.unwrap();
        let key = row_key(w.writer.id, 0);
        let part = partition(&user());
        // The writer's read...
        let seen = rows.read_item(&part, &key).await.unwrap().unwrap();
        let before = live_counts(&seen).unwrap().unwrap();
        // ...the compaction...
        let s = Usage::compact(rows.as_ref(), &user(), 1, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(s.rows_folded, 1);
        // ...and the writer's write with the token of its read.
        rows.insert_item(
            &part,
            &key,
            Some(&seen.token),
            encode(&key, &before.plus(UsageCounts::stored(5))).unwrap(),
        )
        .await
        .unwrap();
        let item = rows.read_item(&part, &key).await.unwrap().unwrap();
        assert!(item.values.contains(&None) && item.live_values().count() == 1);
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (15, 2));
        // The live sibling keeps its entry from being purged, even with no grace.
        Usage::compact(rows.as_ref(), &user(), 2, Duration::ZERO)
            .await
            .unwrap();
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (15, 2));
        // The writer's next add sees the tombstone and moves to epoch 1.
        w.add(UsageCounts::stored(1)).await.unwrap();
        assert!(
            rows.read_item(&part, &row_key(w.writer.id, 1))
                .await
                .unwrap()
                .is_some()
        );
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (16, 3));
    }

    #[tokio::test]
    async fn a_crash_between_base_and_deletes_counts_nothing_twice() {
        let (_d, store) = local().await;
        let rows = store.rows.clone();
        let w = Usage::new(rows.clone(), user(), UsageWriter::new());
        w.add(UsageCounts::stored(42)).await.unwrap();
        // The base as compaction writes it, without the deletes that follow.
        let part = partition(&user());
        let key = row_key(w.writer.id, 0);
        let mut base = Base::default();
        base.entries.insert(
            key,
            Entry {
                counts: UsageCounts::stored(42),
                gone_since: Some(0),
            },
        );
        rows.insert_item(&part, BASE_KEY, None, encode(BASE_KEY, &base).unwrap())
            .await
            .unwrap();
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (42, 1));
        w.add(UsageCounts::stored(8)).await.unwrap();
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (50, 2));
    }

    /// The store collected a compacted row's tombstone while the base still remembers it: a
    /// restarted row must not reuse that key.
    #[tokio::test]
    async fn a_row_collected_by_the_store_is_not_reused() {
        let (_d, store) = local().await;
        let rows = store.rows.clone();
        let w = Usage::new(rows.clone(), user(), UsageWriter::new());
        let mut base = Base::default();
        base.entries.insert(
            row_key(w.writer.id, 0),
            Entry {
                counts: UsageCounts::stored(42),
                gone_since: Some(0),
            },
        );
        rows.insert_item(
            &partition(&user()),
            BASE_KEY,
            None,
            encode(BASE_KEY, &base).unwrap(),
        )
        .await
        .unwrap();
        w.add(UsageCounts::stored(8)).await.unwrap();
        let got = Usage::read(rows.as_ref(), &user()).await.unwrap();
        assert_eq!((got.bytes, got.messages), (50, 2));
        let live = read_all(rows.as_ref(), writer_rows(&user(), false))
            .await
            .unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].sort_key, row_key(w.writer.id, 1));
    }

    #[tokio::test]
    async fn a_newer_format_is_refused() {
        let (_d, store) = local().await;
        store
            .rows
            .insert_item(&partition(&user()), BASE_KEY, None, vec![9, 1, 2])
            .await
            .unwrap();
        let err = Usage::read(store.rows.as_ref(), &user()).await.unwrap_err();
        assert!(
            matches!(err, UsageError::UnsupportedVersion { found: 9, .. }),
            "{err}"
        );
    }
}
