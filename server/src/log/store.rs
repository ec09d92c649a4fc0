//! A log in the row store: two partitions per log. In `<partition>`, only ops:
//! - `o/<writer>/<seq>`: the op `(writer, seq)`, in the format of `codec`.
//!
//! In `<partition>/meta`:
//! - `w/<writer>`: the writers that ever wrote here (written before their first op), so a reader
//!   can ask each writer for what it has not seen yet; the value is the writer's body key sealed
//!   to the user (`codec::WriterKey`);
//! - `c/<writer>/<seq>`: a checkpoint: the version vector it covers (plaintext) and the key of
//!   the blob `ck/<partition>/<writer>/<seq>` holding the encrypted op set;
//! - `l/<writer>`: the writer's lease: `Live { seen }` (renewed while it writes, naming what it
//!   has seen) or `Expired` (written by a collector that watched it stay unchanged for the
//!   expiry time). Written before the writer's first op. See `docs/causal-log.md`, "Leases".
//!
//! Keys are fixed-width hex, so a range per writer returns its ops in sequence order. Reading
//! "everything not in this version vector" is one batch of per-writer ranges, so an op that
//! arrives late (behind what a reader already folded in) is found like any other: nothing is
//! ever skipped because of its position in time.

use std::sync::Arc;
use std::time::Duration;

use super::LogError;
use super::clock::{Dot, VersionVector, WriterId};
use super::codec::{self, Header};
use crate::storage::{
    BlobStore, CausalityToken, DeleteRange, Item, KeyRange, PollRange, ReadRange, RowStore,
    StorageError,
};

/// An op as read: its row key, its header, and its still-encrypted body.
#[derive(Debug, Clone)]
pub struct RawOp {
    pub key: String,
    pub header: Header,
    pub body: Vec<u8>,
}

#[derive(Clone)]
pub struct LogStore {
    rows: Arc<dyn RowStore>,
    blobs: Arc<dyn BlobStore>,
    /// Op rows only.
    partition: String,
    /// `<partition>/meta`: writers, leases and checkpoint refs. Kept apart from the ops so that
    /// listing them never walks over the tombstones of collected op rows (Garage's range reads
    /// skip tombstones one by one until its table GC drops them, a day later).
    meta: String,
}

/// A checkpoint as listed: what it covers and where its body is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRef {
    pub covers: VersionVector,
    pub blob: String,
}

fn writer_key(w: WriterId) -> String {
    format!("w/{:016x}", w.0)
}

fn op_prefix(w: WriterId) -> String {
    format!("o/{:016x}/", w.0)
}

pub fn op_key(dot: Dot) -> String {
    format!("o/{:016x}/{:016x}", dot.writer.0, dot.seq)
}

fn lease_key(w: WriterId) -> String {
    format!("l/{:016x}", w.0)
}

fn parse_writer(key: &str) -> Option<WriterId> {
    let hex = key.strip_prefix("w/").or_else(|| key.strip_prefix("l/"))?;
    u64::from_str_radix(hex, 16).ok().map(WriterId)
}

/// A writer's lease, in the clear: it reveals only the causal structure, as op headers do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Lease {
    /// The writer may write; it had seen `seen` when it last renewed.
    Live { seen: VersionVector },
    /// A collector declared the writer gone; it never writes under this id again.
    Expired,
}

/// A lease row as read: every sibling (`None`: a tombstone) and the token covering them.
#[derive(Debug, Clone)]
pub struct LeaseRow {
    pub writer: WriterId,
    pub values: Vec<Option<Lease>>,
    pub token: CausalityToken,
}

impl LeaseRow {
    /// The writer counts as live unless a collector's `Expired` (or a deletion) is the only
    /// thing left: a renewal racing an expiry keeps it live (the collector backs off).
    pub fn live_seen(&self) -> Option<VersionVector> {
        let mut seen: Option<VersionVector> = None;
        for v in self.values.iter().flatten() {
            if let Lease::Live { seen: s } = v {
                // Siblings: count only what every one of them had seen.
                seen = Some(match seen {
                    None => s.clone(),
                    Some(prev) => {
                        VersionVector(prev.0.iter().map(|(&w, &n)| (w, n.min(s.get(w)))).collect())
                    }
                });
            }
        }
        seen
    }

    /// Only `Live` values: nobody has tried to expire the writer.
    pub fn undisputed(&self) -> bool {
        self.values
            .iter()
            .all(|v| matches!(v, Some(Lease::Live { .. })))
    }
}

fn encode_lease(lease: &Lease) -> Result<Vec<u8>, LogError> {
    let mut out = vec![codec::FORMAT_VERSION];
    out.extend(postcard::to_allocvec(lease).map_err(|e| LogError::Encode(e.to_string()))?);
    Ok(out)
}

fn decode_lease(key: &str, raw: &[u8]) -> Result<Lease, LogError> {
    match raw.split_first() {
        Some((&codec::FORMAT_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| LogError::Corrupt {
                key: key.to_string(),
                detail: e.to_string(),
            })
        }
        Some((&v, _)) => Err(LogError::UnsupportedVersion {
            key: key.to_string(),
            found: v,
            supported: codec::FORMAT_VERSION,
        }),
        None => Err(LogError::Corrupt {
            key: key.to_string(),
            detail: "empty lease".into(),
        }),
    }
}

fn lease_row(item: &Item) -> Result<Option<LeaseRow>, LogError> {
    let Some(writer) = parse_writer(&item.sort_key) else {
        return Ok(None);
    };
    let values = item
        .values
        .iter()
        .map(|v| {
            v.as_deref()
                .map(|v| decode_lease(&item.sort_key, v))
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    Ok(Some(LeaseRow {
        writer,
        values,
        token: item.token.clone(),
    }))
}

impl LogStore {
    pub fn new(
        rows: Arc<dyn RowStore>,
        blobs: Arc<dyn BlobStore>,
        partition: impl Into<String>,
    ) -> LogStore {
        let partition = partition.into();
        LogStore {
            rows,
            blobs,
            meta: format!("{partition}/meta"),
            partition,
        }
    }

    /// Stores a checkpoint body (already encrypted) covering `covers`, written by `dot`'s
    /// writer. The body goes first, then the row that points at it, so a listed checkpoint
    /// always has its body.
    pub async fn put_checkpoint(
        &self,
        id: Dot,
        covers: &VersionVector,
        body: Vec<u8>,
    ) -> Result<CheckpointRef, LogError> {
        let suffix = format!("{:016x}/{:016x}", id.writer.0, id.seq);
        let blob = format!("ck/{}/{suffix}", self.partition);
        self.blobs.put_bytes(&blob, body.into()).await?;
        let r = CheckpointRef {
            covers: covers.clone(),
            blob,
        };
        let value = postcard::to_allocvec(&r).map_err(|e| LogError::Encode(e.to_string()))?;
        self.rows
            .insert_item(&self.meta, &format!("c/{suffix}"), None, value)
            .await?;
        Ok(r)
    }

    /// Every checkpoint of this log.
    pub async fn checkpoints(&self) -> Result<Vec<CheckpointRef>, LogError> {
        let mut out = Vec::new();
        for item in self.list_meta("c/").await? {
            for raw in item.live_values() {
                out.push(postcard::from_bytes(raw).map_err(|e| LogError::Corrupt {
                    key: item.sort_key.clone(),
                    detail: e.to_string(),
                })?);
            }
        }
        Ok(out)
    }

    /// Every row of the meta partition under `prefix`, all pages.
    async fn list_meta(&self, prefix: &str) -> Result<Vec<Item>, LogError> {
        let mut out = Vec::new();
        let mut search = ReadRange {
            partition_key: self.meta.clone(),
            range: KeyRange {
                prefix: Some(prefix.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        loop {
            let page = self.rows.read_range(search.clone()).await?;
            out.extend(page.items);
            if !page.more {
                return Ok(out);
            }
            search.range.start = page.next_start;
        }
    }

    pub async fn load_checkpoint(&self, r: &CheckpointRef) -> Result<Vec<u8>, LogError> {
        Ok(self.blobs.get_bytes(&r.blob).await?.to_vec())
    }

    /// Deletes the op rows covered by `covered` (which a stored checkpoint holds). Readers sync
    /// rows first and checkpoints second, so one that misses a deleted row finds the checkpoint.
    pub async fn collect(&self, covered: &VersionVector) -> Result<u64, LogError> {
        self.collect_since(&VersionVector::default(), covered).await
    }

    /// `collect`, skipping the rows of `done` (already collected).
    pub async fn collect_since(
        &self,
        done: &VersionVector,
        covered: &VersionVector,
    ) -> Result<u64, LogError> {
        // Bounded requests: one delete of 100k rows nears Garage's request timeout.
        const CHUNK: u64 = 10_000;
        let mut total = 0;
        for (&w, &seq) in covered.0.iter().filter(|(_, seq)| **seq > 0) {
            let mut from = done.get(w) + 1;
            while from <= seq {
                let to = (from + CHUNK - 1).min(seq);
                let range = DeleteRange {
                    partition_key: self.partition.clone(),
                    prefix: Some(op_prefix(w)),
                    start: Some(op_key(Dot {
                        writer: w,
                        seq: from,
                    })),
                    end: Some(op_key(Dot {
                        writer: w,
                        seq: to + 1,
                    })),
                    single_item: false,
                };
                total += self
                    .rows
                    .delete_batch(vec![range])
                    .await?
                    .iter()
                    .sum::<u64>();
                from = to + 1;
            }
        }
        Ok(total)
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }

    fn single(&self, key: String) -> DeleteRange {
        DeleteRange {
            partition_key: self.meta.clone(),
            prefix: None,
            start: Some(key),
            end: None,
            single_item: true,
        }
    }

    /// Deletes a checkpoint another one supersedes: the row first, so a reader never lists a
    /// checkpoint whose body is gone for good (one that listed it just before reads again).
    pub async fn delete_checkpoint(&self, r: &CheckpointRef) -> Result<(), LogError> {
        let prefix = format!("ck/{}/", self.partition);
        let suffix = r
            .blob
            .strip_prefix(&prefix)
            .ok_or_else(|| LogError::Corrupt {
                key: r.blob.clone(),
                detail: "checkpoint blob outside its log".into(),
            })?;
        self.rows
            .delete_batch(vec![self.single(format!("c/{suffix}"))])
            .await?;
        match self.blobs.delete(&r.blob).await {
            Ok(()) | Err(StorageError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes a lease value; `token` (from the last read) supersedes what that read saw.
    pub async fn put_lease(
        &self,
        writer: WriterId,
        lease: &Lease,
        token: Option<&CausalityToken>,
    ) -> Result<(), LogError> {
        self.rows
            .insert_item(&self.meta, &lease_key(writer), token, encode_lease(lease)?)
            .await?;
        Ok(())
    }

    pub async fn read_lease(&self, writer: WriterId) -> Result<Option<LeaseRow>, LogError> {
        match self.rows.read_item(&self.meta, &lease_key(writer)).await? {
            Some(item) => lease_row(&item),
            None => Ok(None),
        }
    }

    /// Every lease row of the log.
    pub async fn leases(&self) -> Result<Vec<LeaseRow>, LogError> {
        let mut out = Vec::new();
        for item in self.list_meta("l/").await? {
            out.extend(lease_row(&item)?);
        }
        Ok(out)
    }

    /// Forgets a writer that is gone and whose every op a checkpoint holds: its registry row
    /// first (readers stop looking for its ops), then its lease.
    pub async fn forget_writer(&self, writer: WriterId) -> Result<(), LogError> {
        self.rows
            .delete_batch(vec![self.single(writer_key(writer))])
            .await?;
        self.rows
            .delete_batch(vec![self.single(lease_key(writer))])
            .await?;
        Ok(())
    }

    /// Records `writer` (and its sealed body key) before its first op, so readers look for its
    /// ops and can open them.
    pub async fn register(&self, writer: WriterId, sealed_key: Vec<u8>) -> Result<(), LogError> {
        self.rows
            .insert_item(&self.meta, &writer_key(writer), None, sealed_key)
            .await?;
        Ok(())
    }

    /// Stores one encoded op; acknowledged means durable (quorum on Garage).
    pub async fn append(&self, dot: Dot, value: Vec<u8>) -> Result<(), LogError> {
        self.rows
            .insert_item(&self.partition, &op_key(dot), None, value)
            .await?;
        Ok(())
    }

    /// Every op not covered by `have`, decoded up to the header, and every writer's row
    /// `(writer, row key, sealed body key)`.
    pub async fn read_missing(
        &self,
        have: &VersionVector,
    ) -> Result<(Vec<RawOp>, Vec<(WriterId, String, Vec<u8>)>), LogError> {
        let registry = self.writers().await?;
        let writers: Vec<WriterId> = registry.iter().map(|(w, _, _)| *w).collect();
        let mut out = Vec::new();
        let mut searches: Vec<ReadRange> = writers
            .iter()
            .map(|&w| ReadRange {
                partition_key: self.partition.clone(),
                range: KeyRange {
                    prefix: Some(op_prefix(w)),
                    start: Some(op_key(Dot {
                        writer: w,
                        seq: have.get(w) + 1,
                    })),
                    ..Default::default()
                },
                ..Default::default()
            })
            .collect();
        while !searches.is_empty() {
            let pages = self.rows.read_batch(searches.clone()).await?;
            let mut next = Vec::new();
            for (search, page) in searches.into_iter().zip(pages) {
                for item in page.items {
                    // Several values for one op key are retries of the same write (a writer
                    // never reuses a dot for another op): any one of them is the op.
                    let Some(value) = item.live_values().next() else {
                        continue;
                    };
                    let (header, body) = codec::decode_header(&item.sort_key, value)?;
                    out.push(RawOp {
                        key: item.sort_key.clone(),
                        header,
                        body: body.to_vec(),
                    });
                }
                if page.more {
                    let mut s = search;
                    s.range.start = page.next_start;
                    next.push(s);
                }
            }
            searches = next;
        }
        Ok((out, registry))
    }

    async fn writers(&self) -> Result<Vec<(WriterId, String, Vec<u8>)>, LogError> {
        Ok(self
            .list_meta("w/")
            .await?
            .into_iter()
            .filter_map(|item| {
                let w = parse_writer(&item.sort_key)?;
                let v = item.live_values().next()?.to_vec();
                Some((w, item.sort_key, v))
            })
            .collect())
    }

    /// Waits until some op is written after `marker` (`None`: returns a marker at once). Returns
    /// the next marker, or `None` on timeout. The caller then reads with `read_missing`.
    pub async fn wait(
        &self,
        marker: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<String>, LogError> {
        let range = PollRange {
            prefix: Some("o/".into()),
            ..Default::default()
        };
        let changes = self
            .rows
            .poll_range(&self.partition, &range, marker, timeout)
            .await?;
        Ok(changes.map(|c| c.seen_marker))
    }
}
