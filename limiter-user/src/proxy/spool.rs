//! The spool: a copy of each message as it goes to the backend, so that a
//! slow client can give its backend slot back in the middle of its message
//! and the proxy takes the rest in alone. At the end of the message the
//! transaction is replayed on a new backend connection (Postfix's
//! `smtpd_proxy_options = speed_adjust` does the same for its before-queue
//! filters). A zombie that trickles its message then holds memory of the
//! proxy's, bounded here, and no process of the mail server.
//!
//! One budget (`backend.spool_size`) bounds the bytes all copies hold
//! together, and an eighth of it those of one source network (grouped as
//! for the backend slots), so that a few clients that send large messages
//! and then stall cannot fill it for everyone. A message that does not fit
//! goes on without a copy (its client, if slow, keeps its slot only at
//! 500 bytes/s, else `421 4.4.2`).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use ipnet::IpNet;

/// The share of the budget one source network may hold: 1/8.
const NETWORK_SHARE: u64 = 8;

/// The bytes all spool copies may hold together, and hold now.
#[derive(Debug, Default)]
pub struct SpoolBudget {
    /// `backend.spool_size`; 0: no copies, no spooling. Set again on reload.
    limit: AtomicU64,
    used: AtomicU64,
    /// Bytes held by each source network's copies (networks holding none
    /// are not kept).
    networks: Mutex<HashMap<IpNet, u64>>,
    /// Messages whose clients gave their slot back mid-message.
    spooled: AtomicU64,
}

impl SpoolBudget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit: AtomicU64::new(limit),
            ..Self::default()
        }
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held now by every copy.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Messages spooled since start.
    pub fn spooled(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }

    /// A new, empty copy for a message from a client of `network`, or
    /// `None` when spooling is off.
    pub fn copy(self: &Arc<Self>, network: IpNet) -> Option<SpoolCopy> {
        (self.limit.load(Ordering::Relaxed) > 0).then(|| SpoolCopy {
            budget: self.clone(),
            network,
            wire: Vec::new(),
        })
    }

    /// Counts a message whose client gave its slot back mid-message.
    pub fn count_spooled(&self) {
        self.spooled.fetch_add(1, Ordering::Relaxed);
    }

    fn networks(&self) -> std::sync::MutexGuard<'_, HashMap<IpNet, u64>> {
        self.networks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `bytes` for `network`, within both limits.
    fn reserve(&self, network: IpNet, bytes: u64) -> bool {
        // Nothing to hold: no entry for the network either (an empty one
        // would never be removed).
        if bytes == 0 {
            return true;
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let mut networks = self.networks();
        let held = networks.get(&network).copied().unwrap_or(0);
        if held.saturating_add(bytes) > limit / NETWORK_SHARE {
            return false;
        }
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > limit {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        networks.insert(network, held + bytes);
        true
    }

    fn release(&self, network: IpNet, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        let mut networks = self.networks();
        if let Some(held) = networks.get_mut(&network) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                networks.remove(&network);
            }
        }
    }
}

/// One message as on the wire (dot-stuffed, with its end marker once it
/// came), counted against the budget until dropped.
#[derive(Debug)]
pub struct SpoolCopy {
    budget: Arc<SpoolBudget>,
    /// The client's network, whose share it counts against.
    network: IpNet,
    wire: Vec<u8>,
}

impl SpoolCopy {
    /// Appends `bytes`; `false` (nothing appended) past the budget.
    #[must_use]
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if !self.budget.reserve(self.network, bytes.len() as u64) {
            return false;
        }
        self.wire.extend_from_slice(bytes);
        true
    }

    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

impl Drop for SpoolCopy {
    fn drop(&mut self) {
        self.budget.release(self.network, self.wire.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn copies_share_one_budget_and_give_it_back_when_dropped() {
        let budget = Arc::new(SpoolBudget::new(80));
        // Eight networks, each within its share of 10.
        let mut copies: Vec<SpoolCopy> = (1..=8)
            .map(|i| budget.copy(net(&format!("192.0.{i}.0/24"))).unwrap())
            .collect();
        for copy in &mut copies {
            assert!(copy.push(b"123456789"));
        }
        assert_eq!(budget.used(), 72);
        let mut empty = budget.copy(net("203.0.113.0/24")).unwrap();
        assert!(empty.push(b""));
        drop(empty);
        let mut ninth = budget.copy(net("198.51.100.0/24")).unwrap();
        assert!(!ninth.push(b"123456789"), "81 bytes in a budget of 80");
        assert!(ninth.push(b"12345678"));
        assert_eq!(ninth.wire(), b"12345678");
        copies.truncate(1);
        assert_eq!(budget.used(), 17);
        drop(ninth);
        drop(copies);
        assert_eq!(budget.used(), 0);
        assert!(budget.networks().is_empty());
    }

    #[test]
    fn one_network_holds_at_most_an_eighth() {
        let budget = Arc::new(SpoolBudget::new(80));
        let mut a = budget.copy(net("192.0.2.0/24")).unwrap();
        let mut b = budget.copy(net("192.0.2.0/24")).unwrap();
        assert!(a.push(b"123456"));
        assert!(
            !b.push(b"12345"),
            "11 bytes for one network, its share is 10"
        );
        assert!(b.push(b"1234"));
        // Another network has its own share.
        let mut other = budget.copy(net("198.51.100.0/24")).unwrap();
        assert!(other.push(b"1234567890"));
        drop(a);
        assert!(b.push(b"123456"));
        assert_eq!(budget.used(), 20);
    }

    #[test]
    fn no_copies_while_spooling_is_off() {
        let budget = Arc::new(SpoolBudget::new(0));
        assert!(budget.copy(net("192.0.2.0/24")).is_none());
        budget.set_limit(100);
        let mut copy = budget.copy(net("192.0.2.0/24")).unwrap();
        assert!(copy.push(b"1"));
    }
}
