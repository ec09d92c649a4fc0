//! Dotted version vector sets, the causality scheme of Garage's K2V (and Riak), for backends that
//! keep rows themselves (the local store, and the simulated store of the mailbox-core tests).
//!
//! Each node that accepts writes keeps `(discard, [(t, value)])`: values it stamped with a time,
//! and the time up to which its values are known to be superseded. A causality token is the
//! vector `node -> max time seen`. A write with a token discards every value the token covers and
//! adds the new value with a fresh time, so concurrent writes stay as siblings.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use super::row::CausalityToken;

pub type NodeId = u64;

/// A causal context (version vector). Encoded like Garage's: a u64 checksum (XOR of all fields)
/// followed by (node, time) pairs, big-endian, then base64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context(pub BTreeMap<NodeId, u64>);

impl Context {
    pub fn encode(&self) -> CausalityToken {
        let mut checksum = 0u64;
        let mut out = Vec::with_capacity(8 + 16 * self.0.len());
        out.extend_from_slice(&[0; 8]);
        for (node, t) in &self.0 {
            checksum ^= node ^ t;
            out.extend_from_slice(&node.to_be_bytes());
            out.extend_from_slice(&t.to_be_bytes());
        }
        out[..8].copy_from_slice(&checksum.to_be_bytes());
        CausalityToken(B64.encode(out))
    }

    pub fn decode(token: &CausalityToken) -> Option<Context> {
        let raw = B64.decode(token.as_str()).ok()?;
        if raw.len() < 8 || (raw.len() - 8) % 16 != 0 {
            return None;
        }
        let word = |i: usize| u64::from_be_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
        let mut checksum = word(0);
        let mut map = BTreeMap::new();
        for i in (8..raw.len()).step_by(16) {
            let (node, t) = (word(i), word(i + 8));
            checksum ^= node ^ t;
            map.insert(node, t);
        }
        (checksum == 0).then_some(Context(map))
    }

    /// Has `self` seen the value stamped (node, t)?
    pub fn covers(&self, node: NodeId, t: u64) -> bool {
        self.0.get(&node).is_some_and(|&seen| seen >= t)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NodeValues {
    discard: u64,
    values: Vec<(u64, Option<Vec<u8>>)>,
}

/// All concurrent values of one item.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dvvs {
    nodes: BTreeMap<NodeId, NodeValues>,
}

impl Dvvs {
    /// The context a reader gets: every value currently present is covered.
    pub fn context(&self) -> Context {
        Context(
            self.nodes
                .iter()
                .map(|(&n, e)| {
                    let max_t = e.values.iter().map(|(t, _)| *t).max().unwrap_or(0);
                    (n, max_t.max(e.discard))
                })
                .collect(),
        )
    }

    /// Applies a write received by `node`: discard what `ctx` saw, then add `value` (`None` is a
    /// tombstone) with a time later than anything `node` stamped.
    pub fn write(&mut self, node: NodeId, ctx: Option<&Context>, value: Option<Vec<u8>>) {
        if let Some(ctx) = ctx {
            for (&n, &t) in &ctx.0 {
                let entry = self.nodes.entry(n).or_default();
                entry.discard = entry.discard.max(t);
                let discard = entry.discard;
                entry.values.retain(|(vt, _)| *vt > discard);
            }
        }
        let entry = self.nodes.entry(node).or_default();
        let t = entry
            .values
            .iter()
            .map(|(t, _)| *t)
            .max()
            .unwrap_or(0)
            .max(entry.discard)
            + 1;
        entry.values.push((t, value));
    }

    /// Merges a replica's state (used by simulated multi-node stores).
    pub fn merge(&mut self, other: &Dvvs) {
        for (&n, theirs) in &other.nodes {
            let mine = self.nodes.entry(n).or_default();
            mine.discard = mine.discard.max(theirs.discard);
            for v in &theirs.values {
                if !mine.values.iter().any(|(t, _)| *t == v.0) {
                    mine.values.push(v.clone());
                }
            }
            let discard = mine.discard;
            mine.values.retain(|(t, _)| *t > discard);
            mine.values.sort_by_key(|(t, _)| *t);
        }
    }

    /// Concurrent values, equal ones collapsed (as Garage does), in a stable order.
    pub fn values(&self) -> Vec<Option<Vec<u8>>> {
        let mut out: Vec<Option<Vec<u8>>> = Vec::new();
        for e in self.nodes.values() {
            for (_, v) in &e.values {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            }
        }
        out
    }

    /// Does this item hold a value that `ctx` has not seen?
    pub fn has_news_for(&self, ctx: &Context) -> bool {
        self.nodes
            .iter()
            .any(|(&n, e)| e.values.iter().any(|(t, _)| !ctx.covers(n, *t)))
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.values().all(|e| e.values.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let mut d = Dvvs::default();
        d.write(7, None, v("a"));
        d.write(9, None, v("b"));
        let ctx = d.context();
        assert_eq!(Context::decode(&ctx.encode()), Some(ctx));
        assert_eq!(Context::decode(&CausalityToken("not base64!".into())), None);
        assert_eq!(
            Context::decode(&CausalityToken(B64.encode([1u8; 24]))),
            None
        );
    }

    #[test]
    fn blind_writes_are_siblings_and_a_token_supersedes_what_it_saw() {
        let mut d = Dvvs::default();
        d.write(1, None, v("a"));
        d.write(1, None, v("b"));
        assert_eq!(d.values(), vec![v("a"), v("b")]);
        let seen = d.context();
        d.write(2, None, v("c")); // not seen by `seen`
        d.write(1, Some(&seen), v("d"));
        assert_eq!(d.values(), vec![v("d"), v("c")]);
    }

    #[test]
    fn two_writes_with_one_token_stay_siblings() {
        let mut d = Dvvs::default();
        d.write(1, None, v("a"));
        let t = d.context();
        d.write(1, Some(&t), v("x"));
        d.write(1, Some(&t), v("y"));
        assert_eq!(d.values(), vec![v("x"), v("y")]);
        assert!(d.has_news_for(&t));
        assert!(!d.has_news_for(&d.context()));
    }

    #[test]
    fn merge_is_commutative_and_respects_discards() {
        let mut base = Dvvs::default();
        base.write(1, None, v("a"));
        let ctx = base.context();
        let mut r1 = base.clone();
        let mut r2 = base.clone();
        r1.write(1, Some(&ctx), v("b"));
        r2.write(2, Some(&ctx), None);
        let mut m1 = r1.clone();
        m1.merge(&r2);
        let mut m2 = r2.clone();
        m2.merge(&r1);
        assert_eq!(m1.values().len(), 2);
        assert_eq!(m1.context(), m2.context());
        assert!(m1.values().contains(&None) && m1.values().contains(&v("b")));
    }
}
