//! Block notices: a new block ends the blocked source's open sessions at
//! once instead of letting them linger (the kernel drops their packets
//! from then on).
//!
//! Each session subscribes with its client's address ([`BlockNotices::subscribe`]);
//! a block ([`BlockNotices::notify`]) marks and wakes the sessions it
//! covers, and only those. A broadcast to every session would wake all of
//! them for each block: with thousands of idle sessions open, an attacker
//! who can get addresses blocked (throwaway harvesters) would make every
//! block cost thousands of wake-ups.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use ipnet::IpNet;

use super::latch::Latch;

/// The open sessions, by client address.
#[derive(Default)]
pub struct BlockNotices {
    sessions: Mutex<HashMap<IpAddr, Vec<Arc<Listener>>>>,
}

/// What one session hears: set once a block covers its client.
pub type Listener = Latch;

/// A session's subscription; dropping it unsubscribes.
pub struct Subscription {
    notices: Arc<BlockNotices>,
    client: IpAddr,
    pub listener: Arc<Listener>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut sessions = self.notices.lock();
        if let Some(listeners) = sessions.get_mut(&self.client) {
            listeners.retain(|l| !Arc::ptr_eq(l, &self.listener));
            if listeners.is_empty() {
                sessions.remove(&self.client);
            }
        }
    }
}

impl BlockNotices {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Vec<Arc<Listener>>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes a session of `client` (IPv4-mapped addresses as IPv4).
    pub fn subscribe(self: &Arc<Self>, client: IpAddr) -> Subscription {
        let client = client.to_canonical();
        let listener = Arc::new(Latch::default());
        self.lock()
            .entry(client)
            .or_default()
            .push(listener.clone());
        Subscription {
            notices: self.clone(),
            client,
            listener,
        }
    }

    /// Tells the sessions of every client inside `net`: one lookup for a
    /// single address, a walk of the clients for a network (no wake-up for
    /// those outside it).
    pub fn notify(&self, net: IpNet) {
        let sessions = self.lock();
        if net.prefix_len() == net.max_prefix_len() {
            for listener in sessions.get(&net.addr()).into_iter().flatten() {
                listener.set();
            }
            return;
        }
        for (client, listeners) in sessions.iter() {
            if net.contains(client) {
                listeners.iter().for_each(|l| l.set());
            }
        }
    }

    /// Clients with a session subscribed.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_block_marks_the_sessions_it_covers_and_no_other() {
        let notices = Arc::new(BlockNotices::default());
        let a1 = notices.subscribe(ip("192.0.2.1"));
        let a2 = notices.subscribe(ip("192.0.2.1"));
        let b = notices.subscribe(ip("::ffff:192.0.2.2"));
        let c = notices.subscribe(ip("198.51.100.9"));
        let v6 = notices.subscribe(ip("2001:db8:1:2::9"));
        let v6_other = notices.subscribe(ip("2001:db8:1:3::9"));
        notices.notify(net("192.0.2.1/32"));
        assert!(a1.listener.is_set() && a2.listener.is_set());
        assert!(!b.listener.is_set() && !c.listener.is_set());
        // An IPv4-mapped client is its IPv4 address; a network covers it.
        notices.notify(net("192.0.2.0/24"));
        assert!(b.listener.is_set() && !c.listener.is_set());
        // An IPv6 source's /64.
        notices.notify(net("2001:db8:1:2::/64"));
        assert!(v6.listener.is_set() && !v6_other.listener.is_set());
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let notices = Arc::new(BlockNotices::default());
        let a = notices.subscribe(ip("192.0.2.1"));
        let b = notices.subscribe(ip("192.0.2.1"));
        assert_eq!(notices.clients(), 1);
        drop(a);
        assert_eq!(notices.clients(), 1);
        drop(b);
        assert_eq!(notices.clients(), 0);
        notices.notify(net("192.0.2.1/32"));
    }

    #[tokio::test]
    async fn a_waiting_session_wakes_for_its_block_and_after_it_at_once() {
        let notices = Arc::new(BlockNotices::default());
        let s = notices.subscribe(ip("192.0.2.1"));
        let listener = s.listener.clone();
        let waiter = tokio::spawn(async move { listener.wait().await });
        tokio::task::yield_now().await;
        notices.notify(net("192.0.2.0/30"));
        waiter.await.unwrap();
        // Already blocked: no wait.
        s.listener.wait().await;
    }
}
