//! The causal log: ops with a known causal past, and the order-theoretic tools that turn a set
//! of them into deterministic numbers.

pub mod clock;
pub mod series;
