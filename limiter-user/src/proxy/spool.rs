//! The spool: a copy of each message as it goes to the backend, so that a
//! slow client can give its backend slot back in the middle of its message
//! and the proxy takes the rest in alone. At the end of the message the
//! transaction is replayed on a new backend connection (Postfix's
//! `smtpd_proxy_options = speed_adjust` does the same for its before-queue
//! filters). A zombie that trickles its message then holds memory of the
//! proxy's, bounded here, and no process of the mail server.
//!
//! One budget (`backend.spool_size`) bounds the bytes all copies hold
//! together; a message that does not fit goes on without one (and its
//! client, if slow, loses its slot as before: `421 4.4.2`).

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// The bytes all spool copies may hold together, and hold now.
#[derive(Debug, Default)]
pub struct SpoolBudget {
    /// `backend.spool_size`; 0: no copies, no spooling. Set again on reload.
    limit: AtomicU64,
    used: AtomicU64,
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

    /// A new, empty copy for a message, or `None` when spooling is off.
    pub fn copy(self: &Arc<Self>) -> Option<SpoolCopy> {
        (self.limit.load(Ordering::Relaxed) > 0).then(|| SpoolCopy {
            budget: self.clone(),
            wire: Vec::new(),
            spooled: false,
        })
    }

    fn reserve(&self, bytes: u64) -> bool {
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.limit.load(Ordering::Relaxed) {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// One message as on the wire (dot-stuffed, with its end marker once it
/// came), counted against the budget until dropped.
#[derive(Debug)]
pub struct SpoolCopy {
    budget: Arc<SpoolBudget>,
    wire: Vec<u8>,
    /// The client gave its slot back: the backend has no part of it.
    spooled: bool,
}

impl SpoolCopy {
    /// Appends `bytes`; `false` (nothing appended) past the budget.
    #[must_use]
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if !self.budget.reserve(bytes.len() as u64) {
            return false;
        }
        self.wire.extend_from_slice(bytes);
        true
    }

    /// From now on the copy is the message: counted once.
    pub fn mark_spooled(&mut self) {
        if !self.spooled {
            self.spooled = true;
            self.budget.spooled.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn is_spooled(&self) -> bool {
        self.spooled
    }

    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

impl Drop for SpoolCopy {
    fn drop(&mut self) {
        self.budget
            .used
            .fetch_sub(self.wire.len() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_share_one_budget_and_give_it_back_when_dropped() {
        let budget = Arc::new(SpoolBudget::new(10));
        let mut a = budget.copy().unwrap();
        let mut b = budget.copy().unwrap();
        assert!(a.push(b"123456"));
        assert!(!b.push(b"12345"), "11 bytes in a budget of 10");
        assert!(b.push(b"1234"));
        assert_eq!(budget.used(), 10);
        assert_eq!(b.wire(), b"1234");
        drop(a);
        assert_eq!(budget.used(), 4);
        assert!(b.push(b"56"));
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn no_copies_when_spooling_is_off_and_each_spooled_message_counts_once() {
        let budget = Arc::new(SpoolBudget::new(0));
        assert!(budget.copy().is_none());
        budget.set_limit(100);
        let mut copy = budget.copy().unwrap();
        assert!(!copy.is_spooled());
        copy.mark_spooled();
        copy.mark_spooled();
        assert!(copy.is_spooled());
        assert_eq!(budget.spooled(), 1);
    }
}
