//! The mail model: what a mailbox looks like to a client, computed from its causal log.

pub mod account;
pub mod delivery;
pub mod invariants;
pub mod mailbox;
pub mod mailbox_list;
pub mod message;
#[cfg(test)]
mod model;
pub mod rescue;
#[cfg(test)]
mod sim;
pub mod summary;
pub mod sweep;
pub mod usage;
pub mod view;
