//! Rows of the local store. Layout in redb:
//! - `items`: (partition key, sort key) → postcard(`Stored`): the item's DVVS and the sequence
//!   number of its last change;
//! - `changes`: (partition key, seq) → sort key, so PollRange reads only what changed;
//! - `partitions`: partition key → postcard(`Counts`), the ReadIndex counters, kept in the same
//!   transaction as the items they count;
//! - `meta`: "node" (this store's DVVS node id) and "seq" (the last sequence number).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{blocking, db_err};
use crate::storage::dvvs::{Context, Dvvs, NodeId};
use crate::storage::error::{Result, StorageError};
use crate::storage::row::{
    CausalityToken, DeleteRange, IndexEntry, IndexPage, InsertOp, Item, ItemPage, KeyRange,
    PollRange, RangeChanges, ReadRange, RowStore, key_in_range,
};

const ITEMS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("items");
const CHANGES: TableDefinition<(&str, u64), &str> = TableDefinition::new("changes");
const PARTITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("partitions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    seq: u64,
    dvvs: Dvvs,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Counts {
    entries: i64,
    conflicts: i64,
    values: i64,
    bytes: i64,
}

impl Counts {
    /// Garage's counting rule: an entry is an item with a live value; a conflict an item with
    /// several values; tombstones count neither as values nor bytes.
    fn of(d: &Dvvs) -> Counts {
        let values = d.values();
        let live: Vec<&Vec<u8>> = values.iter().flatten().collect();
        Counts {
            entries: i64::from(!live.is_empty()),
            conflicts: i64::from(values.len() > 1),
            values: live.len() as i64,
            bytes: live.iter().map(|v| v.len() as i64).sum(),
        }
    }

    fn add(&mut self, after: Counts, before: Counts) {
        self.entries += after.entries - before.entries;
        self.conflicts += after.conflicts - before.conflicts;
        self.values += after.values - before.values;
        self.bytes += after.bytes - before.bytes;
    }
}

/// One write to apply: partition key, sort key, the context it supersedes, value (`None`: delete).
type Write = (String, String, Option<Context>, Option<Vec<u8>>);

/// The local row store. Cheap to clone; all clones share the database and the wake-ups.
#[derive(Clone)]
pub struct LocalRows {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    node: NodeId,
    /// One channel per partition somebody polls; carries the last sequence number written there.
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
}

fn decode_stored(pk: &str, sk: &str, raw: &[u8]) -> Result<Stored> {
    postcard::from_bytes(raw).map_err(|e| StorageError::corrupt(format!("row {pk}/{sk}"), e))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|e| StorageError::Backend(format!("encoding a row: {e}")))
}

fn decode_token(token: &CausalityToken) -> Result<Context> {
    Context::decode(token)
        .ok_or_else(|| StorageError::Invalid(format!("malformed causality token {token:?}")))
}

fn to_item(sk: &str, d: &Dvvs) -> Item {
    Item {
        sort_key: sk.to_string(),
        token: d.context().encode(),
        values: d.values(),
    }
}

/// The smallest string greater than every string that starts with `p`... is not representable,
/// so partitions are bounded by `pk` and `pk + "\0"`, the next string after `pk`.
fn partition_end(pk: &str) -> String {
    format!("{pk}\0")
}

impl LocalRows {
    pub(super) fn open(db: Arc<Database>) -> Result<LocalRows> {
        let txn = db.begin_write().map_err(db_err)?;
        let node = {
            txn.open_table(ITEMS).map_err(db_err)?;
            txn.open_table(CHANGES).map_err(db_err)?;
            txn.open_table(PARTITIONS).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            let existing = meta.get("node").map_err(db_err)?.map(|g| g.value());
            match existing {
                Some(n) => n,
                None => {
                    let n = rand::random::<u64>() | 1;
                    meta.insert("node", n).map_err(db_err)?;
                    n
                }
            }
        };
        txn.commit().map_err(db_err)?;
        Ok(LocalRows {
            inner: Arc::new(Inner {
                db,
                node,
                watchers: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Applies writes in one durable transaction, then wakes pollers of the touched partitions.
    async fn write(&self, ops: Vec<Write>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let inner = self.inner.clone();
        let touched = blocking(move || {
            let txn = inner.db.begin_write().map_err(db_err)?;
            let mut touched: BTreeMap<String, u64> = BTreeMap::new();
            {
                let mut items = txn.open_table(ITEMS).map_err(db_err)?;
                let mut changes = txn.open_table(CHANGES).map_err(db_err)?;
                let mut parts = txn.open_table(PARTITIONS).map_err(db_err)?;
                let mut meta = txn.open_table(META).map_err(db_err)?;
                let mut seq = meta
                    .get("seq")
                    .map_err(db_err)?
                    .map(|g| g.value())
                    .unwrap_or(0);
                for (pk, sk, ctx, value) in ops {
                    let mut stored = match items.get((pk.as_str(), sk.as_str())).map_err(db_err)? {
                        Some(raw) => decode_stored(&pk, &sk, raw.value())?,
                        None => Stored::default(),
                    };
                    let before = Counts::of(&stored.dvvs);
                    if stored.seq > 0 {
                        changes.remove((pk.as_str(), stored.seq)).map_err(db_err)?;
                    }
                    stored.dvvs.write(inner.node, ctx.as_ref(), value);
                    seq += 1;
                    stored.seq = seq;
                    let after = Counts::of(&stored.dvvs);
                    items
                        .insert((pk.as_str(), sk.as_str()), encode(&stored)?.as_slice())
                        .map_err(db_err)?;
                    changes
                        .insert((pk.as_str(), seq), sk.as_str())
                        .map_err(db_err)?;
                    if before != after {
                        let mut counts = match parts.get(pk.as_str()).map_err(db_err)? {
                            Some(raw) => postcard::from_bytes(raw.value()).map_err(|e| {
                                StorageError::corrupt(format!("partition counters of {pk}"), e)
                            })?,
                            None => Counts::default(),
                        };
                        counts.add(after, before);
                        parts
                            .insert(pk.as_str(), encode(&counts)?.as_slice())
                            .map_err(db_err)?;
                    }
                    touched.insert(pk, seq);
                }
                meta.insert("seq", seq).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)?;
            Ok(touched)
        })
        .await?;
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (pk, seq) in touched {
            if let Some(tx) = watchers.get(&pk) {
                if tx.receiver_count() == 0 {
                    watchers.remove(&pk);
                } else {
                    tx.send_replace(seq);
                }
            }
        }
        Ok(())
    }

    fn subscribe(&self, pk: &str) -> watch::Receiver<u64> {
        let mut watchers = self
            .inner
            .watchers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        watchers
            .entry(pk.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Dvvs>> {
        let (inner, pk, sk) = (self.inner.clone(), pk.to_string(), sk.to_string());
        blocking(move || {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let items = txn.open_table(ITEMS).map_err(db_err)?;
            match items.get((pk.as_str(), sk.as_str())).map_err(db_err)? {
                Some(raw) => Ok(Some(decode_stored(&pk, &sk, raw.value())?.dvvs)),
                None => Ok(None),
            }
        })
        .await
    }

    /// Items of `pk` matching `pred`, in range order, up to `limit`; `more`/`next_start` per K2V.
    fn scan(
        items: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
        pk: &str,
        range: &KeyRange,
        mut pred: impl FnMut(&Dvvs) -> bool,
    ) -> Result<ItemPage> {
        let end_pk = partition_end(pk);
        let lower: (&str, &str) = if range.reverse {
            (pk, "")
        } else {
            let from = match (range.start.as_deref(), range.prefix.as_deref()) {
                (Some(s), Some(p)) => s.max(p),
                (Some(s), None) => s,
                (None, Some(p)) => p,
                (None, None) => "",
            };
            (pk, from)
        };
        let upper: Bound<(&str, &str)> = match (range.reverse, range.start.as_deref()) {
            (true, Some(s)) => Bound::Included((pk, s)),
            _ => Bound::Excluded((end_pk.as_str(), "")),
        };
        let iter = items
            .range::<(&str, &str)>((Bound::Included(lower), upper))
            .map_err(db_err)?;
        let iter: Box<dyn Iterator<Item = _>> = if range.reverse {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        let limit = range.limit.map(|l| l as usize).unwrap_or(usize::MAX);
        let mut page = ItemPage::default();
        for entry in iter {
            let (key, raw) = entry.map_err(db_err)?;
            let (_, sk) = key.value();
            let in_range = key_in_range(
                sk,
                range.prefix.as_deref(),
                range.start.as_deref(),
                range.end.as_deref(),
                range.reverse,
            );
            if !in_range {
                // Past the end (or the prefix) in iteration order: nothing further can match.
                let past_end = match (range.reverse, range.end.as_deref()) {
                    (false, Some(e)) => sk >= e,
                    (true, Some(e)) => sk <= e,
                    _ => false,
                };
                let past_prefix = range.prefix.as_deref().is_some_and(|p| {
                    if range.reverse {
                        sk < p
                    } else {
                        sk > p && !sk.starts_with(p)
                    }
                });
                if past_end || past_prefix {
                    break;
                }
                continue;
            }
            let stored = decode_stored(pk, sk, raw.value())?;
            if !pred(&stored.dvvs) {
                continue;
            }
            if page.items.len() == limit {
                page.more = true;
                page.next_start = Some(sk.to_string());
                break;
            }
            page.items.push(to_item(sk, &stored.dvvs));
        }
        Ok(page)
    }
}

#[async_trait]
impl RowStore for LocalRows {
    async fn read_item(&self, partition_key: &str, sort_key: &str) -> Result<Option<Item>> {
        Ok(self
            .get(partition_key, sort_key)
            .await?
            .map(|d| to_item(sort_key, &d)))
    }

    async fn insert_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: Option<&CausalityToken>,
        value: Vec<u8>,
    ) -> Result<()> {
        let ctx = token.map(decode_token).transpose()?;
        self.write(vec![(
            partition_key.into(),
            sort_key.into(),
            ctx,
            Some(value),
        )])
        .await
    }

    async fn delete_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: &CausalityToken,
    ) -> Result<()> {
        let ctx = decode_token(token)?;
        self.write(vec![(
            partition_key.into(),
            sort_key.into(),
            Some(ctx),
            None,
        )])
        .await
    }

    async fn insert_batch(&self, ops: Vec<InsertOp>) -> Result<()> {
        let mut writes = Vec::with_capacity(ops.len());
        for op in ops {
            let ctx = op.token.as_ref().map(decode_token).transpose()?;
            writes.push((op.partition_key, op.sort_key, ctx, op.value));
        }
        self.write(writes).await
    }

    async fn read_batch(&self, searches: Vec<ReadRange>) -> Result<Vec<ItemPage>> {
        let inner = self.inner.clone();
        blocking(move || {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let items = txn.open_table(ITEMS).map_err(db_err)?;
            let mut pages = Vec::with_capacity(searches.len());
            for s in searches {
                let keep = |d: &Dvvs| {
                    let values = d.values();
                    (s.tombstones || values.iter().any(Option::is_some))
                        && (!s.conflicts_only || values.len() > 1)
                };
                if s.single_item {
                    let sk = s.range.start.clone().ok_or_else(|| {
                        StorageError::Invalid("single_item search needs a start key".into())
                    })?;
                    let mut page = ItemPage::default();
                    if let Some(raw) = items
                        .get((s.partition_key.as_str(), sk.as_str()))
                        .map_err(db_err)?
                    {
                        let d = decode_stored(&s.partition_key, &sk, raw.value())?.dvvs;
                        if keep(&d) {
                            page.items.push(to_item(&sk, &d));
                        }
                    }
                    pages.push(page);
                } else {
                    pages.push(Self::scan(&items, &s.partition_key, &s.range, keep)?);
                }
            }
            Ok(pages)
        })
        .await
    }

    async fn delete_batch(&self, ranges: Vec<DeleteRange>) -> Result<Vec<u64>> {
        let mut counts = Vec::with_capacity(ranges.len());
        for r in ranges {
            let search = ReadRange {
                partition_key: r.partition_key.clone(),
                range: KeyRange {
                    prefix: r.prefix,
                    start: r.start,
                    end: r.end,
                    limit: None,
                    reverse: false,
                },
                single_item: r.single_item,
                conflicts_only: false,
                tombstones: false,
            };
            let page = self.read_range(search).await?;
            counts.push(page.items.len() as u64);
            let writes = page
                .items
                .into_iter()
                .map(|item| {
                    let ctx = decode_token(&item.token)?;
                    Ok((r.partition_key.clone(), item.sort_key, Some(ctx), None))
                })
                .collect::<Result<Vec<_>>>()?;
            self.write(writes).await?;
        }
        Ok(counts)
    }

    async fn read_index(&self, range: KeyRange) -> Result<IndexPage> {
        let inner = self.inner.clone();
        blocking(move || {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let parts = txn.open_table(PARTITIONS).map_err(db_err)?;
            let iter = parts.iter().map_err(db_err)?;
            let iter: Box<dyn Iterator<Item = _>> = if range.reverse {
                Box::new(iter.rev())
            } else {
                Box::new(iter)
            };
            let limit = range.limit.map(|l| l as usize).unwrap_or(usize::MAX);
            let mut page = IndexPage::default();
            for entry in iter {
                let (key, raw) = entry.map_err(db_err)?;
                let pk = key.value();
                if !key_in_range(
                    pk,
                    range.prefix.as_deref(),
                    range.start.as_deref(),
                    range.end.as_deref(),
                    range.reverse,
                ) {
                    continue;
                }
                let c: Counts = postcard::from_bytes(raw.value())
                    .map_err(|e| StorageError::corrupt(format!("partition counters of {pk}"), e))?;
                if c.entries <= 0 {
                    continue;
                }
                if page.partitions.len() == limit {
                    page.more = true;
                    page.next_start = Some(pk.to_string());
                    break;
                }
                page.partitions.push(IndexEntry {
                    partition_key: pk.to_string(),
                    entries: c.entries as u64,
                    conflicts: c.conflicts.max(0) as u64,
                    values: c.values.max(0) as u64,
                    bytes: c.bytes.max(0) as u64,
                });
            }
            Ok(page)
        })
        .await
    }

    async fn poll_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: &CausalityToken,
        timeout: Duration,
    ) -> Result<Option<Item>> {
        let ctx = decode_token(token)?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.subscribe(partition_key);
        loop {
            // Mark the current version seen before reading, so a write landing after the read
            // still wakes us.
            rx.borrow_and_update();
            if let Some(d) = self.get(partition_key, sort_key).await?
                && d.has_news_for(&ctx)
            {
                return Ok(Some(to_item(sort_key, &d)));
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }

    async fn poll_range(
        &self,
        partition_key: &str,
        range: &PollRange,
        seen_marker: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<RangeChanges>> {
        let since = match seen_marker {
            Some(m) => Some(m.parse::<u64>().map_err(|_| {
                StorageError::Invalid(format!("malformed seen marker {m:?} for the local store"))
            })?),
            None => None,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.subscribe(partition_key);
        loop {
            rx.borrow_and_update();
            let (inner, pk, range) = (self.inner.clone(), partition_key.to_string(), range.clone());
            let found = blocking(move || changes_since(&inner.db, &pk, &range, since)).await?;
            if let Some(changes) = found {
                return Ok(Some(changes));
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
            }
        }
    }
}

/// The items of `range` changed after sequence `since` (all items, tombstones included, when
/// `since` is `None`), with the marker for the next call; `None` when nothing changed.
fn changes_since(
    db: &Database,
    pk: &str,
    range: &PollRange,
    since: Option<u64>,
) -> Result<Option<RangeChanges>> {
    let txn = db.begin_read().map_err(db_err)?;
    let meta = txn.open_table(META).map_err(db_err)?;
    let seq = meta
        .get("seq")
        .map_err(db_err)?
        .map(|g| g.value())
        .unwrap_or(0);
    let items = txn.open_table(ITEMS).map_err(db_err)?;
    let in_range = |sk: &str| {
        key_in_range(
            sk,
            range.prefix.as_deref(),
            range.start.as_deref(),
            range.end.as_deref(),
            false,
        )
    };
    let mut out = Vec::new();
    match since {
        None => {
            let key_range = KeyRange {
                prefix: range.prefix.clone(),
                start: range.start.clone(),
                end: range.end.clone(),
                limit: None,
                reverse: false,
            };
            // Tombstones included, as Garage does: a poller learns of deletes too.
            let page = LocalRows::scan(&items, pk, &key_range, |_| true)?;
            return Ok(Some(RangeChanges {
                seen_marker: seq.to_string(),
                items: page.items,
            }));
        }
        Some(since) => {
            let changes = txn.open_table(CHANGES).map_err(db_err)?;
            let lower = (pk, since.saturating_add(1));
            let upper = (pk, u64::MAX);
            for entry in changes
                .range::<(&str, u64)>(lower..=upper)
                .map_err(db_err)?
            {
                let (_, sk) = entry.map_err(db_err)?;
                let sk = sk.value();
                if !in_range(sk) {
                    continue;
                }
                if let Some(raw) = items.get((pk, sk)).map_err(db_err)? {
                    let d = decode_stored(pk, sk, raw.value())?.dvvs;
                    out.push(to_item(sk, &d));
                }
            }
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    out.sort_by(|a, b| a.sort_key.cmp(&b.sort_key));
    Ok(Some(RangeChanges {
        seen_marker: seq.to_string(),
        items: out,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_corrupt_row_is_an_error_naming_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("rows.redb")).unwrap());
        let rows = LocalRows::open(db.clone()).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(ITEMS)
            .unwrap()
            .insert(("mbox", "op-7"), &[0xff_u8, 0xff, 0xff][..])
            .unwrap();
        txn.commit().unwrap();
        let err = rows.read_item("mbox", "op-7").await.unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("mbox/op-7"), "{err}");
        let err = rows
            .read_range(ReadRange::partition("mbox"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("mbox/op-7"), "{err}");
    }
}
