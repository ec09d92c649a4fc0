//! Failed logins: each failure is answered after a delay that doubles with the failures counted
//! for the client address or the user name (whichever has more), and once either reaches its
//! limit within the window, further attempts are refused without checking the password until
//! the window has passed. Failures are forgotten a window after the first one; a successful
//! login clears the user's count (not the address's, or an attacker with one account could
//! reset it between guesses). Unknown user names count like known ones: the answer must not
//! tell them apart.
//!
//! Hand-written rather than `governor`: that crate limits a rate of events, while this needs
//! "refuse once N failures happened" without consuming anything on a check.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Keys kept per table at most; beyond that expired entries are pruned, and if none expired
/// new keys are not tracked (memory stays bounded under an address-spraying attack).
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ThrottleConfig {
    /// Failures from one client address before its attempts are refused.
    pub max_failures_per_address: u32,
    /// Failures for one user name before attempts for it are refused.
    pub max_failures_per_user: u32,
    /// How long failures are remembered (from the first one), in seconds.
    pub window_secs: u64,
    /// Delay before answering the first failure, in milliseconds; doubles with each one.
    pub base_delay_ms: u64,
    /// Longest delay before a failure is answered, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            max_failures_per_address: 20,
            max_failures_per_user: 10,
            window_secs: 15 * 60,
            base_delay_ms: 1_000,
            max_delay_ms: 15_000,
        }
    }
}

#[derive(Clone, Copy)]
struct Entry {
    failures: u32,
    first: Instant,
}

struct Table<K> {
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Table {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Entry>> {
        match self.entries.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn get(&self, key: &K, window: Duration, now: Instant) -> Option<Entry> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some(e) if now.duration_since(e.first) < window => Some(*e),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn fail(&self, key: &K, window: Duration, now: Instant) -> u32 {
        let mut entries = self.lock();
        if entries.len() >= MAX_KEYS && !entries.contains_key(key) {
            entries.retain(|_, e| now.duration_since(e.first) < window);
            if entries.len() >= MAX_KEYS {
                return 1;
            }
        }
        let e = entries.entry(key.clone()).or_insert(Entry {
            failures: 0,
            first: now,
        });
        if now.duration_since(e.first) >= window {
            *e = Entry {
                failures: 0,
                first: now,
            };
        }
        e.failures += 1;
        e.failures
    }

    fn clear(&self, key: &K) {
        self.lock().remove(key);
    }
}

pub struct AuthThrottle {
    config: ThrottleConfig,
    addresses: Table<IpAddr>,
    users: Table<String>,
}

impl AuthThrottle {
    pub fn new(config: ThrottleConfig) -> AuthThrottle {
        AuthThrottle {
            config,
            addresses: Table::new(),
            users: Table::new(),
        }
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_secs)
    }

    /// `Err(wait)` when attempts from this address or for this user are refused for now.
    pub fn check(&self, ip: Option<IpAddr>, user: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let window = self.window();
        let mut wait = Duration::ZERO;
        let user_entry = self.users.get(&user.to_lowercase(), window, now);
        if let Some(e) = user_entry.filter(|e| e.failures >= self.config.max_failures_per_user) {
            wait = wait.max(window.saturating_sub(now.duration_since(e.first)));
        }
        if let Some(ip) = ip
            && let Some(e) = self
                .addresses
                .get(&ip, window, now)
                .filter(|e| e.failures >= self.config.max_failures_per_address)
        {
            wait = wait.max(window.saturating_sub(now.duration_since(e.first)));
        }
        if wait.is_zero() { Ok(()) } else { Err(wait) }
    }

    /// Records a failure; returns how long to wait before answering it.
    pub fn failed(&self, ip: Option<IpAddr>, user: &str) -> Duration {
        let now = Instant::now();
        let window = self.window();
        let by_user = self.users.fail(&user.to_lowercase(), window, now);
        let by_ip = ip.map_or(0, |ip| self.addresses.fail(&ip, window, now));
        let n = by_user.max(by_ip).clamp(1, 31);
        let delay = self.config.base_delay_ms.saturating_mul(1 << (n - 1));
        Duration::from_millis(delay.min(self.config.max_delay_ms))
    }

    pub fn succeeded(&self, user: &str) {
        self.users.clear(&user.to_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> AuthThrottle {
        AuthThrottle::new(ThrottleConfig {
            max_failures_per_address: 4,
            max_failures_per_user: 3,
            window_secs: 60,
            base_delay_ms: 100,
            max_delay_ms: 250,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn delays_double_and_limits_refuse_until_the_window_passes() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(t.failed(Some(ip), "alice"), Duration::from_millis(100));
        assert_eq!(t.failed(Some(ip), "Alice"), Duration::from_millis(200));
        assert!(t.check(Some(ip), "alice").is_ok());
        assert_eq!(
            t.failed(Some(ip), "alice"),
            Duration::from_millis(250),
            "capped"
        );
        let wait = t.check(Some(ip), "ALICE").unwrap_err();
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        // Same user from elsewhere: refused (per user); other user from here: allowed until
        // the address's own limit.
        assert!(
            t.check(Some("192.0.2.2".parse().unwrap()), "alice")
                .is_err()
        );
        assert!(t.check(Some(ip), "bob").is_ok());
        t.failed(Some(ip), "bob");
        assert!(t.check(Some(ip), "bob").is_err(), "address limit reached");
        assert!(t.check(Some("192.0.2.3".parse().unwrap()), "bob").is_ok());

        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(t.check(Some(ip), "alice").is_ok(), "the window has passed");
        assert_eq!(t.failed(Some(ip), "alice"), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn success_clears_the_user_but_not_the_address() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..2 {
            t.failed(Some(ip), "alice");
        }
        t.succeeded("alice");
        assert_eq!(t.failed(None, "alice"), Duration::from_millis(100));
        t.failed(Some(ip), "carol");
        t.failed(Some(ip), "dave");
        assert!(
            t.check(Some(ip), "erin").is_err(),
            "4 failures from the address"
        );
    }
}
