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
//! and then stall cannot fill it for everyone.
//!
//! A full spool makes room: a copy that needs more evicts the slowest
//! spooled messages still arriving (first from its own network when the
//! network's share is what is full); their sessions end with `421 4.3.1`.
//! So tricklers that fill the spool cannot deny a copy, and with it the
//! giving back of a slot, to the next message: what they hold goes first.
//! A spooled message evicts only slower ones. A message that still finds
//! no room goes on without a copy (its client, if slow, keeps its slot
//! only at 500 bytes/s, else `421 4.4.2`), or, if spooled already, gets
//! `452 4.3.1` at its end.
//!
//! The session cap makes room the same way ([`SpoolBudget::evict_slowest`]):
//! when no idle session is left to shed, the slowest spooled message still
//! arriving goes, so that tricklers holding every session cannot lock
//! senders out.

use std::{
    cmp::Ordering as ByPace,
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use ipnet::IpNet;
use tokio::time::Instant;

use super::latch::Latch;

/// The share of the budget one source network may hold: 1/8.
const NETWORK_SHARE: u64 = 8;

/// The bytes all spool copies may hold together, and hold now.
#[derive(Default)]
pub struct SpoolBudget {
    /// `backend.spool_size`; 0: no copies, no spooling. Set again on reload.
    limit: AtomicU64,
    used: AtomicU64,
    copies: Mutex<Copies>,
    /// Messages whose clients gave their slot back mid-message.
    spooled: AtomicU64,
    /// Spooled messages evicted to make room for others.
    evicted: AtomicU64,
}

/// Every live copy, and the bytes each source network's copies hold
/// (networks holding none are not kept).
#[derive(Default)]
struct Copies {
    entries: HashMap<u64, Entry>,
    networks: HashMap<IpNet, u64>,
    next_id: u64,
}

struct Entry {
    network: IpNet,
    /// Bytes counted against the budget (0 once evicted).
    bytes: u64,
    /// Since when, and from how many bytes, its message is spooled (its
    /// client gave the backend slot back); `None` while it has the slot.
    spooled: Option<(Instant, u64)>,
    /// The whole message is in: it is not evicted any more.
    sealed: bool,
    evicted: Arc<Latch>,
    /// Why it was evicted, once it was.
    why: Option<Eviction>,
}

/// Why a spooled message was evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    /// For a faster message that needed room in the spool.
    SpoolFull,
    /// For a new client at `smtp.max_sessions`.
    SessionCap,
}

impl Entry {
    /// How fast its message came since it was spooled; `None` while it
    /// has its slot (faster than any spooled one).
    fn pace(&self, now: Instant) -> Option<Pace> {
        self.spooled.map(|(since, from)| Pace {
            bytes: self.bytes - from,
            time: now - since,
        })
    }

    fn evictable(&self) -> bool {
        self.spooled.is_some() && !self.sealed && !self.evicted.is_set()
    }
}

/// Bytes received in a time.
#[derive(Clone, Copy, Debug)]
struct Pace {
    bytes: u64,
    time: Duration,
}

/// A pace over less time than this is none yet: a message spooled a moment
/// ago, with nothing come since, is not the slowest.
const MIN_PACE_TIME: Duration = Duration::from_secs(1);

impl Pace {
    /// Slowest first; a pace over less than [`MIN_PACE_TIME`] counts as the
    /// fastest.
    fn compare(self, other: Pace) -> ByPace {
        let unknown = |p: Pace| p.time < MIN_PACE_TIME;
        match (unknown(self), unknown(other)) {
            (true, true) => ByPace::Equal,
            (true, false) => ByPace::Greater,
            (false, true) => ByPace::Less,
            (false, false) => (u128::from(self.bytes) * other.time.as_nanos())
                .cmp(&(u128::from(other.bytes) * self.time.as_nanos())),
        }
    }
}

/// A spooled message that may be evicted.
struct Candidate {
    id: u64,
    pace: Pace,
    network: IpNet,
    bytes: u64,
}

/// Whether `bytes` more fit for a network holding `held`, the spool
/// holding `used`.
#[derive(Clone, Copy)]
struct Room {
    held: u64,
    used: u64,
    bytes: u64,
    share: u64,
    limit: u64,
}

impl Room {
    fn share_full(&self) -> bool {
        self.held.saturating_add(self.bytes) > self.share
    }

    fn spool_full(&self) -> bool {
        self.used.saturating_add(self.bytes) > self.limit
    }

    fn fits(&self) -> bool {
        !self.share_full() && !self.spool_full()
    }

    /// The candidates (slowest first) to evict to make the room, from
    /// `network`'s own first while its share is full; `None` if evicting
    /// them all would not make it (then none is evicted).
    fn made_by_evicting(mut self, candidates: &[Candidate], network: IpNet) -> Option<Vec<u64>> {
        let mut victims = Vec::new();
        for own_network in [true, false] {
            for candidate in candidates {
                let full = if own_network {
                    self.share_full()
                } else {
                    self.spool_full()
                };
                if !full {
                    break;
                }
                if (own_network && candidate.network != network) || victims.contains(&candidate.id)
                {
                    continue;
                }
                victims.push(candidate.id);
                self.used -= candidate.bytes;
                if candidate.network == network {
                    self.held -= candidate.bytes;
                }
            }
        }
        self.fits().then_some(victims)
    }
}

/// What became of the bytes a copy was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    Taken,
    /// No room, and nothing slower to evict: nothing appended.
    Full,
    /// The copy was evicted for another message: it takes nothing more.
    Evicted,
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

    /// Spooled messages evicted since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// A new, empty copy for a message from a client of `network`, or
    /// `None` when spooling is off.
    pub fn copy(self: &Arc<Self>, network: IpNet) -> Option<SpoolCopy> {
        if self.limit.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let evicted = Arc::new(Latch::default());
        let mut copies = self.copies();
        let id = copies.next_id;
        copies.next_id += 1;
        copies.entries.insert(
            id,
            Entry {
                network,
                bytes: 0,
                spooled: None,
                sealed: false,
                evicted: evicted.clone(),
                why: None,
            },
        );
        Some(SpoolCopy {
            budget: self.clone(),
            id,
            evicted,
            wire: Vec::new(),
        })
    }

    /// Counts a message whose client gave its slot back mid-message.
    pub fn count_spooled(&self) {
        self.spooled.fetch_add(1, Ordering::Relaxed);
    }

    fn copies(&self) -> MutexGuard<'_, Copies> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `bytes` for copy `id`, within both limits, evicting slower
    /// spooled messages if that makes room.
    fn reserve(&self, id: u64, bytes: u64) -> Push {
        let limit = self.limit.load(Ordering::Relaxed);
        let share = limit / NETWORK_SHARE;
        let now = Instant::now();
        let mut copies = self.copies();
        let Some(entry) = copies.entries.get(&id) else {
            return Push::Evicted;
        };
        if entry.evicted.is_set() {
            return Push::Evicted;
        }
        // Nothing to hold: no entry for the network either (an empty one
        // would never be removed).
        if bytes == 0 {
            return Push::Taken;
        }
        let (network, own_pace) = (entry.network, entry.pace(now));
        let room = Room {
            held: copies.networks.get(&network).copied().unwrap_or(0),
            used: self.used(),
            bytes,
            share,
            limit,
        };
        let victims = if room.fits() {
            Vec::new()
        } else {
            // Slowest first; a spooled message evicts only slower ones.
            let mut candidates: Vec<Candidate> = copies
                .evictable(now)
                .filter(|&(other, _, _)| other != id)
                .map(|(other, e, pace)| Candidate {
                    id: other,
                    pace,
                    network: e.network,
                    bytes: e.bytes,
                })
                .filter(|c| own_pace.is_none_or(|own| c.pace.compare(own) == ByPace::Less))
                .collect();
            candidates.sort_by(|a, b| a.pace.compare(b.pace));
            match room.made_by_evicting(&candidates, network) {
                Some(victims) => victims,
                None => return Push::Full,
            }
        };
        for victim in victims {
            copies.evict(victim, Eviction::SpoolFull, &self.used);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
        self.used.fetch_add(bytes, Ordering::Relaxed);
        *copies.networks.entry(network).or_default() += bytes;
        if let Some(entry) = copies.entries.get_mut(&id) {
            entry.bytes += bytes;
        }
        Push::Taken
    }

    /// Evicts the slowest spooled message still arriving, to make room at
    /// the session cap; whether there was one.
    pub fn evict_slowest(&self) -> bool {
        let now = Instant::now();
        let mut copies = self.copies();
        let slowest = copies
            .evictable(now)
            .min_by(|a, b| a.2.compare(b.2))
            .map(|(id, _, _)| id);
        let Some(id) = slowest else {
            return false;
        };
        copies.evict(id, Eviction::SessionCap, &self.used);
        self.evicted.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn evicted_for(&self, id: u64) -> Option<Eviction> {
        self.copies().entries.get(&id).and_then(|e| e.why)
    }

    fn mark_spooled(&self, id: u64) {
        if let Some(entry) = self.copies().entries.get_mut(&id) {
            entry.spooled = Some((Instant::now(), entry.bytes));
        }
    }

    /// `false` if the copy was evicted before it could be sealed.
    fn seal(&self, id: u64) -> bool {
        match self.copies().entries.get_mut(&id) {
            Some(entry) if !entry.evicted.is_set() => {
                entry.sealed = true;
                true
            }
            _ => false,
        }
    }

    fn remove(&self, id: u64) {
        let mut copies = self.copies();
        if let Some(entry) = copies.entries.remove(&id) {
            copies.release(entry.network, entry.bytes, &self.used);
        }
    }
}

impl Copies {
    /// The spooled messages that may be evicted, with their paces.
    fn evictable(&self, now: Instant) -> impl Iterator<Item = (u64, &Entry, Pace)> + '_ {
        self.entries
            .iter()
            .filter(|(_, e)| e.evictable())
            .filter_map(move |(&id, e)| Some((id, e, e.pace(now)?)))
    }

    /// Gives back what copy `id` holds and tells its session.
    fn evict(&mut self, id: u64, why: Eviction, used: &AtomicU64) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        entry.why = Some(why);
        entry.evicted.set();
        let (network, bytes) = (entry.network, std::mem::take(&mut entry.bytes));
        self.release(network, bytes, used);
    }

    fn release(&mut self, network: IpNet, bytes: u64, used: &AtomicU64) {
        if bytes == 0 {
            return;
        }
        used.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(held) = self.networks.get_mut(&network) {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                self.networks.remove(&network);
            }
        }
    }
}

/// One message as on the wire (dot-stuffed, with its end marker once it
/// came), counted against the budget until dropped or evicted.
pub struct SpoolCopy {
    budget: Arc<SpoolBudget>,
    id: u64,
    evicted: Arc<Latch>,
    wire: Vec<u8>,
}

impl SpoolCopy {
    /// Appends `bytes`, unless the copy finds no room or was evicted.
    #[must_use]
    pub fn push(&mut self, bytes: &[u8]) -> Push {
        let push = self.budget.reserve(self.id, bytes.len() as u64);
        match push {
            Push::Taken => self.wire.extend_from_slice(bytes),
            Push::Evicted => self.wire = Vec::new(),
            Push::Full => {}
        }
        push
    }

    /// Its client gave the backend slot back: from now on its message may
    /// be evicted for a faster one.
    pub fn mark_spooled(&self) {
        self.budget.mark_spooled(self.id);
    }

    /// The whole message is in, and is kept to its replay; `false` if it
    /// was evicted first.
    #[must_use]
    pub fn seal(&self) -> bool {
        self.budget.seal(self.id)
    }

    /// Set when the copy is evicted.
    pub fn eviction(&self) -> Arc<Latch> {
        self.evicted.clone()
    }

    /// Why the copy was evicted, if it was.
    #[must_use]
    pub fn evicted_for(&self) -> Option<Eviction> {
        self.budget.evicted_for(self.id)
    }

    pub fn wire(&self) -> &[u8] {
        &self.wire
    }
}

impl Drop for SpoolCopy {
    fn drop(&mut self) {
        self.budget.remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn copy_from(budget: &Arc<SpoolBudget>, network: &str) -> SpoolCopy {
        budget.copy(net(network)).unwrap()
    }

    #[test]
    fn copies_share_one_budget_and_give_it_back_when_dropped() {
        let budget = Arc::new(SpoolBudget::new(80));
        // Eight networks, each within its share of 10.
        let mut copies: Vec<SpoolCopy> = (1..=8)
            .map(|i| copy_from(&budget, &format!("192.0.{i}.0/24")))
            .collect();
        for copy in &mut copies {
            assert_eq!(copy.push(b"123456789"), Push::Taken);
        }
        assert_eq!(budget.used(), 72);
        let mut empty = copy_from(&budget, "203.0.113.0/24");
        assert_eq!(empty.push(b""), Push::Taken);
        drop(empty);
        let mut ninth = copy_from(&budget, "198.51.100.0/24");
        assert_eq!(
            ninth.push(b"123456789"),
            Push::Full,
            "81 bytes in a budget of 80, nothing spooled to evict"
        );
        assert_eq!(ninth.push(b"12345678"), Push::Taken);
        assert_eq!(ninth.wire(), b"12345678");
        copies.truncate(1);
        assert_eq!(budget.used(), 17);
        drop(ninth);
        drop(copies);
        assert_eq!(budget.used(), 0);
        let copies = budget.copies();
        assert!(copies.networks.is_empty() && copies.entries.is_empty());
    }

    #[test]
    fn one_network_holds_at_most_an_eighth() {
        let budget = Arc::new(SpoolBudget::new(80));
        let mut a = copy_from(&budget, "192.0.2.0/24");
        let mut b = copy_from(&budget, "192.0.2.0/24");
        assert_eq!(a.push(b"123456"), Push::Taken);
        assert_eq!(
            b.push(b"12345"),
            Push::Full,
            "11 bytes for one network, its share is 10"
        );
        assert_eq!(b.push(b"1234"), Push::Taken);
        // Another network has its own share.
        let mut other = copy_from(&budget, "198.51.100.0/24");
        assert_eq!(other.push(b"1234567890"), Push::Taken);
        drop(a);
        assert_eq!(b.push(b"123456"), Push::Taken);
        assert_eq!(budget.used(), 20);
    }

    #[test]
    fn no_copies_while_spooling_is_off() {
        let budget = Arc::new(SpoolBudget::new(0));
        assert!(budget.copy(net("192.0.2.0/24")).is_none());
        budget.set_limit(100);
        let mut copy = copy_from(&budget, "192.0.2.0/24");
        assert_eq!(copy.push(b"1"), Push::Taken);
    }

    /// Eight networks' spooled copies fill a budget of 80, each network
    /// its share of 10: copy `i` (from 0) released at second `i` with its
    /// 10 bytes. At second 8 the first is the slowest, the last the fastest.
    async fn a_full_spool_of_tricklers(budget: &Arc<SpoolBudget>) -> Vec<SpoolCopy> {
        let mut copies = Vec::new();
        for i in 1..=8 {
            let mut copy = copy_from(budget, &format!("192.0.{i}.0/24"));
            copy.mark_spooled();
            assert_eq!(copy.push(&[b'x'; 10]), Push::Taken);
            copies.push(copy);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(budget.used(), 80);
        copies
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_spool_evicts_its_slowest_spooled_messages_for_a_new_one() {
        let budget = Arc::new(SpoolBudget::new(80));
        let mut tricklers = a_full_spool_of_tricklers(&budget).await;
        // New messages (on their slots) need 9 and 6 bytes: the slowest
        // two go, one for each.
        let mut sender = copy_from(&budget, "203.0.113.0/24");
        assert_eq!(sender.push(&[b'm'; 9]), Push::Taken);
        assert!(tricklers[0].eviction().is_set());
        assert!(!tricklers[1].eviction().is_set());
        let mut another = copy_from(&budget, "198.51.100.0/24");
        assert_eq!(another.push(&[b'm'; 6]), Push::Taken);
        assert!(tricklers[1].eviction().is_set());
        assert!(tricklers[2..].iter().all(|c| !c.eviction().is_set()));
        assert_eq!(budget.evicted(), 2);
        assert_eq!(budget.used(), 75);
        // An evicted copy takes nothing more and holds nothing.
        assert_eq!(tricklers[0].push(b"more"), Push::Evicted);
        assert!(tricklers[0].wire().is_empty());
        assert!(!tricklers[0].seal());
        drop(tricklers.remove(0));
        assert_eq!(budget.used(), 75);
        drop((sender, another, tricklers));
        assert_eq!(budget.used(), 0);
        assert!(budget.copies().entries.is_empty());
    }

    /// At the session cap the slowest spooled message still arriving
    /// makes room; a message on its slot, or one whole, never does.
    #[tokio::test(start_paused = true)]
    async fn the_session_cap_evicts_the_slowest_spooled_message() {
        let budget = Arc::new(SpoolBudget::new(160));
        let mut tricklers = a_full_spool_of_tricklers(&budget).await;
        assert!(tricklers[0].seal());
        let mut sender = copy_from(&budget, "203.0.113.0/24");
        assert_eq!(sender.push(b"on its slot"), Push::Taken);
        // Spooled a moment ago, nothing since: no pace yet, not the slowest.
        let just_spooled = copy_from(&budget, "198.51.100.0/24");
        just_spooled.mark_spooled();
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(budget.evict_slowest());
        assert!(!just_spooled.eviction().is_set());
        assert!(!tricklers[0].eviction().is_set());
        assert!(tricklers[1].eviction().is_set());
        assert_eq!(tricklers[1].evicted_for(), Some(Eviction::SessionCap));
        assert_eq!(tricklers[1].push(b"more"), Push::Evicted);
        assert_eq!(tricklers[2].evicted_for(), None);
        // Only whole or unspooled messages left: nothing to evict.
        for t in tricklers[2..].iter().chain([&just_spooled]) {
            assert!(t.seal());
        }
        assert!(!budget.evict_slowest());
        assert!(!sender.eviction().is_set());
        assert_eq!(budget.evicted(), 1);
        // An eviction for a faster message says so.
        let budget = Arc::new(SpoolBudget::new(80));
        let tricklers = a_full_spool_of_tricklers(&budget).await;
        let mut sender = copy_from(&budget, "203.0.113.0/24");
        assert_eq!(sender.push(&[b'm'; 9]), Push::Taken);
        assert_eq!(tricklers[0].evicted_for(), Some(Eviction::SpoolFull));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sealed_message_waits_for_its_replay_and_is_not_evicted() {
        let budget = Arc::new(SpoolBudget::new(80));
        let tricklers = a_full_spool_of_tricklers(&budget).await;
        assert!(tricklers[0].seal());
        let mut sender = copy_from(&budget, "203.0.113.0/24");
        assert_eq!(sender.push(&[b'm'; 9]), Push::Taken);
        assert!(!tricklers[0].eviction().is_set());
        assert!(tricklers[1].eviction().is_set());
    }

    #[tokio::test(start_paused = true)]
    async fn a_spooled_message_evicts_only_slower_ones() {
        let budget = Arc::new(SpoolBudget::new(800));
        let mut a = copy_from(&budget, "192.0.2.0/24");
        let mut b = copy_from(&budget, "198.51.100.0/24");
        a.mark_spooled();
        b.mark_spooled();
        assert_eq!(a.push(&[b'a'; 90]), Push::Taken);
        assert_eq!(b.push(&[b'b'; 50]), Push::Taken);
        // Messages on their slots fill the rest.
        let fillers: Vec<SpoolCopy> = (1..=7)
            .map(|i| {
                let mut copy = copy_from(&budget, &format!("203.0.{i}.0/24"));
                let size = if i == 7 { 60 } else { 100 };
                assert_eq!(copy.push(&vec![b'f'; size]), Push::Taken);
                copy
            })
            .collect();
        assert_eq!(budget.used(), 800);
        tokio::time::advance(Duration::from_secs(10)).await;
        // b (5 bytes a second) finds only faster ones: no room.
        assert_eq!(b.push(b"1"), Push::Full);
        assert!(!a.eviction().is_set());
        // a (9 bytes a second) evicts b.
        assert_eq!(a.push(b"1"), Push::Taken);
        assert!(b.eviction().is_set());
        assert_eq!(budget.used(), 751);
        drop(fillers);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_share_evicts_within_its_own_network_first() {
        let budget = Arc::new(SpoolBudget::new(800));
        // Network A: a slower spooled copy and a faster one, its share
        // (100) full; network B: a copy slower than both.
        let mut slow = copy_from(&budget, "192.0.2.0/24");
        let mut fast = copy_from(&budget, "192.0.2.0/24");
        let mut slowest = copy_from(&budget, "198.51.100.0/24");
        for copy in [&slow, &fast, &slowest] {
            copy.mark_spooled();
        }
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(slowest.push(&[b's'; 10]), Push::Taken);
        assert_eq!(slow.push(&[b'a'; 40]), Push::Taken);
        assert_eq!(fast.push(&[b'b'; 60]), Push::Taken);
        // A new message from A evicts A's slowest, not B's.
        let mut new = copy_from(&budget, "192.0.2.0/24");
        assert_eq!(new.push(&[b'n'; 40]), Push::Taken);
        assert!(slow.eviction().is_set());
        assert!(!fast.eviction().is_set());
        assert!(!slowest.eviction().is_set());
        assert_eq!(budget.used(), 110);
        // More than evicting could free in A: nothing is evicted for it.
        assert_eq!(new.push(&[b'n'; 70]), Push::Full);
        assert!(!fast.eviction().is_set());
        assert_eq!(budget.evicted(), 1);
    }
}
