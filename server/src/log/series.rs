//! Deterministic numbering of a causally closed set of ops: the tool behind UIDs and MODSEQs.
//!
//! The ops of a view, ordered by causality, split into *blocks*: the connected components of
//! "is concurrent with". Blocks are totally ordered (every op of one block precedes every op of
//! the next), so a view is a chain of blocks, and a smaller view is the same chain cut inside
//! one block. Each op carries a *floor*: the number its writer would have handed out next
//! (UIDNEXT, or HIGHESTMODSEQ + 1, of the writer's view). Numbering:
//! - a block of one op gets its floor;
//! - a block of n ≥ 2 concurrent ops gets `base + rank` (rank in `OpId` order) with
//!   `base = max floor + n(n-1)/2`, which lies above every number any smaller view could have
//!   given to any part of the block (see docs/causal-log.md for the proof).
//!
//! Only ops that are really concurrent are ever renumbered; a sequential history numbers every
//! op with its floor, and costs O(1) per op.

use super::clock::{Dot, OpId, VersionVector};

/// What the numbering needs to know of an op.
pub trait Causal {
    fn id(&self) -> OpId;
    fn dot(&self) -> Dot;
    /// The ops its writer had seen (excluding itself).
    fn deps(&self) -> &VersionVector;
}

/// One block: indices into the numbered slice, and the numbers it occupies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub members: Vec<usize>,
    /// Lowest floor of the members: numbers in `min_floor..base` are free in this view but may
    /// have named members of the block in smaller views (they are "retired").
    pub min_floor: u64,
    pub base: u64,
}

impl Block {
    pub fn end(&self) -> u64 {
        self.base + self.members.len() as u64
    }

    pub fn is_concurrent(&self) -> bool {
        self.members.len() > 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Numbering {
    /// `numbers[i]` is the number of `items[i]`.
    pub numbers: Vec<u64>,
    pub blocks: Vec<Block>,
    /// One past the highest number given (at least `start`).
    pub next: u64,
}

/// Extra room a block of `n` concurrent ops leaves above its highest floor.
pub fn gap(n: usize) -> u64 {
    let n = n as u64;
    n * n.saturating_sub(1) / 2
}

/// Numbers `items`, which must be sorted by `OpId` (a linear extension of causality) and form,
/// together with the ops they depend on, a causally closed set. `floor(i)` is item i's floor.
pub fn number<T: Causal>(items: &[T], floor: impl Fn(&T) -> u64, start: u64) -> Numbering {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (x, item) in items.iter().enumerate() {
        let deps = item.deps();
        // Blocks entirely in x's past stay; the trailing blocks holding an op concurrent with x
        // merge with x. (An op before x in OpId order is never after x.)
        let mut keep = groups.len();
        while keep > 0
            && !groups[keep - 1]
                .iter()
                .all(|&y| deps.covers(items[y].dot()))
        {
            keep -= 1;
        }
        if keep == groups.len() {
            groups.push(vec![x]);
        } else {
            let mut merged: Vec<usize> = groups.drain(keep..).flatten().collect();
            merged.push(x);
            groups.push(merged);
        }
    }

    let mut numbers = vec![0; items.len()];
    let mut blocks = Vec::with_capacity(groups.len());
    let mut next = start;
    for mut members in groups {
        members.sort_by_key(|&i| items[i].id());
        let floors = members.iter().map(|&i| floor(&items[i]));
        let (min_floor, max_floor) =
            floors.fold((u64::MAX, 0), |(lo, hi), f| (lo.min(f), hi.max(f)));
        let base = if members.len() == 1 {
            max_floor
        } else {
            max_floor + gap(members.len())
        };
        // Honest floors already start at or above the previous block's end (Fact 2 of
        // docs/causal-log.md), so this changes nothing for them; a writer that recorded a wrong
        // floor must not make two ops share a number (which would hide a message).
        let base = base.max(next);
        for (rank, &i) in members.iter().enumerate() {
            numbers[i] = base + rank as u64;
        }
        let block = Block {
            members,
            min_floor,
            base,
        };
        next = next.max(block.end());
        blocks.push(block);
    }
    Numbering {
        numbers,
        blocks,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::clock::WriterId;

    struct T {
        id: OpId,
        dot: Dot,
        deps: VersionVector,
        floor: u64,
    }

    impl Causal for T {
        fn id(&self) -> OpId {
            self.id
        }
        fn dot(&self) -> Dot {
            self.dot
        }
        fn deps(&self) -> &VersionVector {
            &self.deps
        }
    }

    fn op(writer: u64, seq: u64, lamport: u64, deps: &[(u64, u64)], floor: u64) -> T {
        T {
            id: OpId {
                lamport,
                writer: WriterId(writer),
            },
            dot: Dot {
                writer: WriterId(writer),
                seq,
            },
            deps: VersionVector(deps.iter().map(|&(w, s)| (WriterId(w), s)).collect()),
            floor,
        }
    }

    #[test]
    fn a_sequence_keeps_its_floors() {
        let items = vec![
            op(1, 1, 1, &[], 1),
            op(1, 2, 2, &[(1, 1)], 2),
            op(2, 1, 3, &[(1, 2)], 3),
        ];
        let n = number(&items, |t| t.floor, 1);
        assert_eq!(n.numbers, vec![1, 2, 3]);
        assert_eq!(n.next, 4);
        assert!(n.blocks.iter().all(|b| !b.is_concurrent()));
    }

    #[test]
    fn two_concurrent_ops_move_above_both_floors() {
        // Both writers saw op 1 and handed out 2.
        let items = vec![
            op(1, 1, 1, &[], 1),
            op(1, 2, 2, &[(1, 1)], 2),
            op(2, 1, 2, &[(1, 1)], 2),
            op(1, 3, 3, &[(1, 2), (2, 1)], 5),
        ];
        let n = number(&items, |t| t.floor, 1);
        // Block {2 from w1, 2 from w2}: base = 2 + 1 = 3 → 3, 4; then 5.
        assert_eq!(n.numbers, vec![1, 3, 4, 5]);
        assert_eq!(n.next, 6);
        assert_eq!(n.blocks[1].min_floor, 2);
        assert_eq!(n.blocks[1].base, 3);
    }

    #[test]
    fn wrong_floors_never_make_two_ops_share_a_number() {
        let items = vec![
            op(1, 1, 1, &[], 5),
            op(1, 2, 2, &[(1, 1)], 1),
            op(1, 3, 3, &[(1, 2)], 2),
        ];
        let n = number(&items, |t| t.floor, 1);
        assert_eq!(n.numbers, vec![5, 6, 7]);
        assert_eq!(n.next, 8);
    }

    #[test]
    fn a_late_concurrent_op_merges_every_block_it_overlaps() {
        // w1 writes three ops in sequence; w2 wrote one op having seen none of them.
        let items = vec![
            op(1, 1, 1, &[], 1),
            op(2, 1, 1, &[], 1),
            op(1, 2, 2, &[(1, 1)], 2),
            op(1, 3, 3, &[(1, 2)], 3),
        ];
        let n = number(&items, |t| t.floor, 1);
        assert_eq!(n.blocks.len(), 1);
        // base = 3 + gap(4) = 9
        let mut got = n.numbers.clone();
        got.sort();
        assert_eq!(got, vec![9, 10, 11, 12]);
        assert_eq!(n.next, 13);
    }
}
