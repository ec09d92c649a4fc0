//! Connection limits: per client address (taken at accept, after the PROXY header) and per user
//! (taken at login). A slot is held for the life of the connection and given back on drop.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("too many connections from {0} (limit {1})")]
    Address(IpAddr, u32),
    #[error("too many connections for user {0} (limit {1})")]
    User(String, u32),
}

struct Counter<K> {
    limit: u32,
    counts: Mutex<HashMap<K, u32>>,
}

impl<K: Hash + Eq + Clone> Counter<K> {
    fn new(limit: u32) -> Self {
        Counter {
            limit,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn take(&self, key: &K) -> bool {
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            return false;
        }
        *n += 1;
        true
    }

    fn give(&self, key: &K) {
        let mut counts = match self.counts.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = counts.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(key);
            }
        }
    }

    fn current(&self, key: &K) -> u32 {
        self.counts
            .lock()
            .map(|c| c.get(key).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

pub struct ConnectionLimits {
    addresses: Counter<IpAddr>,
    users: Counter<String>,
}

/// A held connection slot.
pub struct Slot {
    limits: Arc<ConnectionLimits>,
    key: SlotKey,
}

enum SlotKey {
    Address(IpAddr),
    User(String),
}

impl Drop for Slot {
    fn drop(&mut self) {
        match &self.key {
            SlotKey::Address(ip) => self.limits.addresses.give(ip),
            SlotKey::User(u) => self.limits.users.give(u),
        }
    }
}

impl ConnectionLimits {
    pub fn new(per_address: u32, per_user: u32) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            addresses: Counter::new(per_address),
            users: Counter::new(per_user),
        })
    }

    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, LimitExceeded> {
        if !self.addresses.take(&ip) {
            return Err(LimitExceeded::Address(ip, self.addresses.limit));
        }
        Ok(Slot {
            limits: self.clone(),
            key: SlotKey::Address(ip),
        })
    }

    pub fn login(self: &Arc<Self>, user: &str) -> Result<Slot, LimitExceeded> {
        let key = user.to_lowercase();
        if !self.users.take(&key) {
            return Err(LimitExceeded::User(key, self.users.limit));
        }
        Ok(Slot {
            limits: self.clone(),
            key: SlotKey::User(key),
        })
    }

    /// Open connections counted for a user (for tests and metrics).
    pub fn user_connections(&self, user: &str) -> u32 {
        self.users.current(&user.to_lowercase())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_key_and_given_back_on_drop() {
        let limits = ConnectionLimits::new(2, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = limits.connect(ip).unwrap();
        let _b = limits.connect(ip).unwrap();
        assert_eq!(
            limits.connect(ip).err(),
            Some(LimitExceeded::Address(ip, 2))
        );
        assert!(limits.connect("192.0.2.2".parse().unwrap()).is_ok());
        drop(a);
        assert!(limits.connect(ip).is_ok());

        let u = limits.login("Alice").unwrap();
        assert!(
            limits.login("alice").is_err(),
            "names compare case-insensitively"
        );
        assert_eq!(limits.user_connections("ALICE"), 1);
        drop(u);
        assert_eq!(limits.user_connections("alice"), 0);
        assert!(limits.login("alice").is_ok());
    }
}
