//! The mail model: what a mailbox looks like to a client, computed from its causal log.

pub mod invariants;
pub mod mailbox;
#[cfg(test)]
mod sim;
pub mod view;
