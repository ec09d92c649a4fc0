//! Sequence sets as sorted, merged ranges: never expanded, so `UID SEARCH UID 1:4294967295` or
//! `FETCH 1:*` cost the number of messages that exist, not the size of the range.

use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

/// Inclusive ranges, sorted and non-overlapping.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// Resolves a sequence set; `*` stands for `largest` (the last sequence number or UID; 0 in
    /// an empty mailbox). `a:b` is the same as `b:a`.
    pub fn resolve(set: &SequenceSet, largest: u64) -> Ranges {
        let value = |v: &SeqOrUid| match v {
            SeqOrUid::Value(n) => u64::from(n.get()),
            SeqOrUid::Asterisk => largest,
        };
        let mut ranges: Vec<(u64, u64)> = set
            .0
            .as_ref()
            .iter()
            .map(|s| match s {
                Sequence::Single(v) => (value(v), value(v)),
                Sequence::Range(a, b) => {
                    let (a, b) = (value(a), value(b));
                    (a.min(b), a.max(b))
                }
            })
            .collect();
        Ranges::from_unsorted(&mut ranges)
    }

    fn from_unsorted(ranges: &mut [(u64, u64)]) -> Ranges {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(a, b) in ranges.iter() {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        Ranges(merged)
    }

    /// From inclusive ranges in any order, overlapping or not.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Ranges {
        let mut v: Vec<(u64, u64)> = ranges
            .into_iter()
            .map(|(a, b)| (a.min(b), a.max(b)))
            .collect();
        Ranges::from_unsorted(&mut v)
    }

    /// The numbers in both sets.
    pub fn intersect(&self, other: &Ranges) -> Ranges {
        let (mut i, mut j, mut out) = (0, 0, Vec::new());
        while let (Some(&(a, b)), Some(&(c, d))) = (self.0.get(i), other.0.get(j)) {
            let (lo, hi) = (a.max(c), b.min(d));
            if lo <= hi {
                out.push((lo, hi));
            }
            if b < d { i += 1 } else { j += 1 }
        }
        Ranges(out)
    }

    /// From sorted or unsorted single numbers (for response codes like COPYUID).
    pub fn from_numbers(numbers: impl IntoIterator<Item = u64>) -> Ranges {
        let mut ranges: Vec<(u64, u64)> = numbers.into_iter().map(|n| (n, n)).collect();
        Ranges::from_unsorted(&mut ranges)
    }

    pub fn contains(&self, x: u64) -> bool {
        let i = self.0.partition_point(|&(_, b)| b < x);
        self.0.get(i).is_some_and(|&(a, _)| a <= x)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The largest number in the set.
    pub fn max(&self) -> Option<u64> {
        self.0.last().map(|&(_, b)| b)
    }

    /// Indexes into `sorted` (ascending) of the values that are in the set: one binary search
    /// per range, never a walk over the range itself.
    pub fn select(&self, sorted: &[u64]) -> Vec<usize> {
        let mut out = Vec::new();
        for &(a, b) in &self.0 {
            let from = sorted.partition_point(|&v| v < a);
            let to = sorted.partition_point(|&v| v <= b);
            out.extend(from..to);
        }
        out
    }

    /// As an IMAP sequence set (`None` when empty).
    pub fn to_sequence_set(&self) -> Option<SequenceSet> {
        let to_value = |n: u64| {
            u32::try_from(n)
                .ok()
                .and_then(std::num::NonZeroU32::new)
                .map(SeqOrUid::Value)
        };
        let seqs: Vec<Sequence> = self
            .0
            .iter()
            .filter_map(|&(a, b)| {
                let (a, b) = (to_value(a)?, to_value(b)?);
                Some(if a == b {
                    Sequence::Single(a)
                } else {
                    Sequence::Range(a, b)
                })
            })
            .collect();
        SequenceSet::try_from(seqs).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> SequenceSet {
        SequenceSet::try_from(s).unwrap()
    }

    #[test]
    fn ranges_are_never_expanded() {
        let r = Ranges::resolve(&set("1:4294967295"), 10);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(1, 4294967295)]);
        let uids: Vec<u64> = (1..=100_000).map(|i| i * 3).collect();
        let t = std::time::Instant::now();
        assert_eq!(r.select(&uids).len(), 100_000);
        assert!(t.elapsed() < std::time::Duration::from_secs(1));

        // `*` is the largest value, whatever the order of the endpoints.
        let r = Ranges::resolve(&set("559:*"), 300);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(300, 559)]);
        assert!(r.contains(300) && !r.contains(299));

        let r = Ranges::resolve(&set("5,1:3,4,9:8,20"), 100);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(1, 5), (8, 9), (20, 20)]);
        assert_eq!(r.select(&[2, 6, 8, 20, 21]), vec![0, 2, 3]);
        assert_eq!(
            Ranges::from_numbers([7, 3, 4, 5])
                .to_sequence_set()
                .map(|s| s.0.as_ref().len()),
            Some(2)
        );
    }
}
