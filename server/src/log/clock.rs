//! Causal bookkeeping of the operation log: who wrote an op (a writer id, leased per process),
//! its place in the writer's sequence (a dot), its Lamport time, and the version vector of
//! everything its writer had seen. No wall clock is trusted anywhere here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A writer: one server process holding a lease on the id (see the log's writer leases).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WriterId(pub u64);

/// The `seq`-th op of `writer` (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub writer: WriterId,
    pub seq: u64,
}

/// The total order of ops: Lamport time, then writer. It extends causality, because an op's
/// Lamport time exceeds that of everything its writer had seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId {
    pub lamport: u64,
    pub writer: WriterId,
}

/// For each writer, how many of its ops are included: a causally closed set of ops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(pub BTreeMap<WriterId, u64>);

impl VersionVector {
    pub fn get(&self, w: WriterId) -> u64 {
        self.0.get(&w).copied().unwrap_or(0)
    }

    /// Is the op `dot` inside this set?
    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.writer) >= dot.seq
    }

    /// Adds one op (its writer's sequence must be contiguous for the set to stay closed).
    pub fn include(&mut self, dot: Dot) {
        let e = self.0.entry(dot.writer).or_insert(0);
        *e = (*e).max(dot.seq);
    }

    pub fn merge(&mut self, other: &VersionVector) {
        for (&w, &s) in &other.0 {
            let e = self.0.entry(w).or_insert(0);
            *e = (*e).max(s);
        }
    }

    /// Is every op of `self` also in `other`?
    pub fn le(&self, other: &VersionVector) -> bool {
        self.0.iter().all(|(&w, &s)| other.get(w) >= s)
    }
}
