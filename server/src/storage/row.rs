//! The row store: Garage K2V's data model and operations, as a trait every backend implements.
//!
//! An item is addressed by (partition key, sort key) and holds the set of values written concurrently
//! (siblings) plus an opaque causality token. A write that carries the token of a read supersedes every
//! value that read saw; writes that do not see each other stay side by side. `None` in `values` is a
//! tombstone (a delete that is kept so it can be ordered against concurrent inserts).

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::error::Result;

/// Opaque causality token, as returned by a read and handed back on a write.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CausalityToken(pub String);

impl CausalityToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CausalityToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One item with all of its concurrent values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub sort_key: String,
    pub token: CausalityToken,
    /// Concurrent values, deduplicated; `None` is a tombstone.
    pub values: Vec<Option<Vec<u8>>>,
}

impl Item {
    /// True when every value is a tombstone: the item is deleted.
    pub fn is_tombstone(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }

    /// The live (non-tombstone) values.
    pub fn live_values(&self) -> impl Iterator<Item = &[u8]> {
        self.values.iter().filter_map(|v| v.as_deref())
    }
}

/// A lexicographic range over keys, with K2V's semantics: `start` inclusive, `end` exclusive; with
/// `reverse`, `start` is the highest key returned and `end` (excluded) lies below it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub limit: Option<u64>,
    pub reverse: bool,
}

/// One search of a ReadBatch: a range within one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadRange {
    pub partition_key: String,
    pub range: KeyRange,
    /// Only the item whose sort key is `range.start`.
    pub single_item: bool,
    /// Only items with several concurrent values.
    pub conflicts_only: bool,
    /// Also return items that only hold tombstones.
    pub tombstones: bool,
}

impl ReadRange {
    pub fn partition(partition_key: impl Into<String>) -> Self {
        ReadRange {
            partition_key: partition_key.into(),
            ..Default::default()
        }
    }
}

/// A page of items; `next_start` is where to continue when `more` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ItemPage {
    pub items: Vec<Item>,
    pub more: bool,
    pub next_start: Option<String>,
}

/// One write of an InsertBatch; `value: None` writes a tombstone (a delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertOp {
    pub partition_key: String,
    pub sort_key: String,
    pub token: Option<CausalityToken>,
    pub value: Option<Vec<u8>>,
}

/// One range of a DeleteBatch (K2V supports only these fields there).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteRange {
    pub partition_key: String,
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
    pub single_item: bool,
}

/// Per-partition counters of ReadIndex (eventually consistent on Garage).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub partition_key: String,
    pub entries: u64,
    pub conflicts: u64,
    pub values: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexPage {
    pub partitions: Vec<IndexEntry>,
    pub more: bool,
    pub next_start: Option<String>,
}

/// The range a PollRange watches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollRange {
    pub prefix: Option<String>,
    pub start: Option<String>,
    pub end: Option<String>,
}

/// Items that changed since the given seen marker, and the marker to pass next time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeChanges {
    pub seen_marker: String,
    pub items: Vec<Item>,
}

/// Garage's K2V API as a trait. Every method is one K2V call on the Garage backend.
#[async_trait]
pub trait RowStore: Send + Sync + 'static {
    /// ReadItem: all concurrent values and the token, `None` if the item never existed (or was
    /// collected). A deleted item may come back as an item that only holds tombstones.
    async fn read_item(&self, partition_key: &str, sort_key: &str) -> Result<Option<Item>>;

    /// InsertItem. With `token`, supersedes the values the read that produced it saw.
    async fn insert_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: Option<&CausalityToken>,
        value: Vec<u8>,
    ) -> Result<()>;

    /// DeleteItem: writes a tombstone superseding what `token` saw.
    async fn delete_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: &CausalityToken,
    ) -> Result<()>;

    /// InsertBatch. Not a transaction: on error, some writes may have happened.
    async fn insert_batch(&self, ops: Vec<InsertOp>) -> Result<()>;

    /// ReadBatch: one page per search, in order.
    async fn read_batch(&self, searches: Vec<ReadRange>) -> Result<Vec<ItemPage>>;

    /// DeleteBatch: number of items deleted per range, in order.
    async fn delete_batch(&self, ranges: Vec<DeleteRange>) -> Result<Vec<u64>>;

    /// ReadIndex: partition keys with their counters.
    async fn read_index(&self, range: KeyRange) -> Result<IndexPage>;

    /// PollItem: waits until the item holds a value `token` has not seen, up to `timeout`.
    /// `None` on timeout.
    async fn poll_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: &CausalityToken,
        timeout: Duration,
    ) -> Result<Option<Item>>;

    /// PollRange: without a marker, returns the current items of the range at once; with one,
    /// waits until some item in the range changed since that marker, up to `timeout` (`None`).
    async fn poll_range(
        &self,
        partition_key: &str,
        range: &PollRange,
        seen_marker: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<RangeChanges>>;

    /// One range of one partition (a ReadBatch of one search).
    async fn read_range(&self, search: ReadRange) -> Result<ItemPage> {
        let mut pages = self.read_batch(vec![search]).await?;
        pages
            .pop()
            .ok_or_else(|| super::StorageError::Backend("ReadBatch returned no result".into()))
    }
}

/// Does `key` fall in `range` (ignoring `limit`)? Shared by backends that filter themselves.
pub fn key_in_range(
    key: &str,
    prefix: Option<&str>,
    start: Option<&str>,
    end: Option<&str>,
    reverse: bool,
) -> bool {
    if prefix.is_some_and(|p| !key.starts_with(p)) {
        return false;
    }
    if reverse {
        start.is_none_or(|s| key <= s) && end.is_none_or(|e| key > e)
    } else {
        start.is_none_or(|s| key >= s) && end.is_none_or(|e| key < e)
    }
}
