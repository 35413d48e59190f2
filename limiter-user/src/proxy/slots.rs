//! Backend slots shared fairly between sources (`backend.max_connections`).
//!
//! A slot is taken when a session opens its backend connection and given
//! back when that connection closes ([`SlotGuard`] is dropped). When every
//! slot is in use, a session that needs one waits ([`BackendSlots::acquire`])
//! in a queue grouped by source network (IPv4 /`fair_share_prefix_v4`, IPv6
//! /`fair_share_prefix_v6`). A freed slot goes round-robin to the waiting
//! networks, skipping any that already holds its fair share (the slots
//! divided by the networks waiting, at least one): a network with many
//! sessions cannot starve another one's mail. A network whose sessions
//! were shed lately (for holding a slot, idling, trickling, or parked or
//! spooled: see
//! [`BackendSlots::mark_shed`]) waits behind those whose were not: zombies
//! from a thousand networks that come back after each cut would otherwise
//! take their turns before a sender who came after them. A waiter whose
//! source delivered a message through the proxy within the hour (a recent
//! sender, [`super::early::RecentSenders`]) is served first among the
//! networks under their share and not shed lately: a returning sender
//! does not wait behind a flood's turns, and a first-time one waits its
//! turn as before. The networks shed lately hold at most half the slots
//! together ([`BackendSlots::shed_cap`]): keepers cut once and back for
//! more cannot take every slot in turn, so that a sender who comes between
//! their turns finds one free instead of waiting for a zombie's time to run
//! out. Otherwise no slot is left idle while someone waits (when every
//! waiting network is over its share, the next in turn is served anyway).
//! The queue is bounded by the sessions
//! (`smtp.max_sessions`), each waiting at most once and at most
//! `backend.slot_wait`.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};

use ipnet::IpNet;
use tokio::{
    sync::{futures::Notified, oneshot, Notify},
    time::Instant,
};

/// The most networks remembered as shed (beyond it, new ones are not until
/// old ones are forgotten).
const MAX_SHED_NETWORKS: usize = 65_536;

/// The longest a session of a network shed lately waits for a slot to
/// start a transaction, or with `"on-connect"` its session
/// (`backend.slot_wait` for the others, and for a transaction under way: a
/// parked one taken up, a spooled message). A session waiting for a slot
/// is busy, so it cannot be shed at `smtp.max_sessions`: a flood's
/// networks waiting for their half of the slots
/// ([`BackendSlots::shed_cap`]) for the whole `slot_wait` would fill the
/// sessions, and a sender would find none to displace at its greeting.
pub const SHED_SLOT_WAIT: Duration = Duration::from_secs(1);

/// The slots and their queue.
pub struct BackendSlots {
    capacity: usize,
    prefix_v4: u8,
    prefix_v6: u8,
    /// How long a network is remembered as shed
    /// (`limits.shed_sessions_window`).
    shed_memory: Duration,
    state: Mutex<SlotState>,
    /// Sessions that had to wait for a slot.
    pub waits: AtomicU64,
    /// Sessions whose wait ended without a slot (`421 4.3.2`).
    pub timeouts: AtomicU64,
    /// How long each of the sessions that had to wait waited, with a slot
    /// or without.
    pub wait_time: super::LatencyHistogram,
    /// Told each time a session starts waiting: idle holders look again
    /// (one in a transaction at its time with its client, one between
    /// transactions gives its slot back; [`Self::contended`]).
    contention: Notify,
}

#[derive(Default)]
struct SlotState {
    in_use: usize,
    /// Slots held per source network.
    held: HashMap<IpNet, usize>,
    /// Networks with waiters, in turn order.
    turns: VecDeque<IpNet>,
    /// Waiters per network, oldest first.
    waiting: HashMap<IpNet, VecDeque<Waiter>>,
    next_id: u64,
    /// Networks whose sessions were shed, and when last.
    shed: HashMap<IpNet, Instant>,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<SlotGuard>,
    /// A recent sender's: served before the others' turns.
    preferred: bool,
}

/// One backend slot, held by the backend connection it was taken for.
pub struct SlotGuard {
    slots: Arc<BackendSlots>,
    group: IpNet,
}

impl std::fmt::Debug for SlotGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotGuard")
            .field("group", &self.group)
            .finish()
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots.release(self.group);
    }
}

/// The backend slots at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCounts {
    /// `backend.max_connections`.
    pub capacity: usize,
    /// Slots held by open backend connections.
    pub in_use: usize,
    /// Of those, held by networks shed lately (at most
    /// [`BackendSlots::shed_cap`], but for sheds after the slot was taken).
    pub shed_in_use: usize,
    /// Sessions waiting for a slot now.
    pub waiting: usize,
    /// Sessions that had to wait for a slot, since the start.
    pub waits: u64,
    /// Waits that ended without a slot (`421 4.3.2`), since the start.
    pub timeouts: u64,
}

/// Why no slot was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// Every slot stayed in use for the whole `backend.slot_wait`.
    Timeout,
}

/// Removes a waiter that gave up (timed out, or its session ended) from
/// the queue.
struct WaitEntry<'a> {
    slots: &'a BackendSlots,
    group: IpNet,
    id: u64,
}

impl Drop for WaitEntry<'_> {
    fn drop(&mut self) {
        let mut state = self.slots.lock();
        if let Some(queue) = state.waiting.get_mut(&self.group) {
            queue.retain(|w| w.id != self.id);
            if queue.is_empty() {
                state.waiting.remove(&self.group);
                state.turns.retain(|g| *g != self.group);
            }
        }
    }
}

impl BackendSlots {
    /// `capacity` slots (at least one); sources grouped by the prefixes; a
    /// network waits behind others for `shed_memory` after a shed.
    #[must_use]
    pub fn new(capacity: usize, prefix_v4: u8, prefix_v6: u8, shed_memory: Duration) -> Self {
        Self {
            capacity: capacity.max(1),
            prefix_v4: prefix_v4.clamp(1, 32),
            prefix_v6: prefix_v6.clamp(1, 128),
            shed_memory,
            state: Mutex::new(SlotState::default()),
            waits: AtomicU64::new(0),
            contention: Notify::new(),
            timeouts: AtomicU64::new(0),
            wait_time: super::LatencyHistogram::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The network `source` shares slots with.
    #[must_use]
    pub fn group(&self, source: IpAddr) -> IpNet {
        let source = source.to_canonical();
        let prefix = if source.is_ipv4() {
            self.prefix_v4
        } else {
            self.prefix_v6
        };
        IpNet::new(source, prefix)
            .map(|net| net.trunc())
            .unwrap_or_else(|_| IpNet::from(source))
    }

    /// The number of slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots in use now.
    #[must_use]
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }

    /// Sessions waiting for a slot now.
    #[must_use]
    pub fn waiting(&self) -> usize {
        self.lock().waiting.values().map(VecDeque::len).sum()
    }

    /// The slots and their counters at one moment (for `stats` and the
    /// metrics).
    #[must_use]
    pub fn counts(&self) -> SlotCounts {
        let (in_use, shed_in_use, waiting) = {
            let state = self.lock();
            (
                state.in_use,
                self.shed_held(&state, Instant::now()),
                state.waiting.values().map(VecDeque::len).sum(),
            )
        };
        SlotCounts {
            capacity: self.capacity,
            in_use,
            shed_in_use,
            waiting,
            waits: self.waits.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Resolves when a session next starts waiting for a slot (from the
    /// moment this is called, polled or not).
    pub fn contended(&self) -> Notified<'_> {
        self.contention.notified()
    }

    /// Whether slots are scarce: half or more in use (sessions wait only
    /// when all are). Early connections stop ([`super::early`]) and slow
    /// messages give theirs back sooner (the session's `MessagePace`).
    #[must_use]
    pub fn scarce(&self) -> bool {
        self.lock().in_use >= self.capacity / 2
    }

    /// Whether every slot is in use.
    #[must_use]
    pub fn full(&self) -> bool {
        self.lock().in_use >= self.capacity
    }

    /// A slot at once, if one is free and nobody waits (the probe session).
    #[must_use]
    pub fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Option<SlotGuard> {
        let group = self.group(source);
        let mut state = self.lock();
        if self.free_for(&state, &group, Instant::now()) {
            state.in_use += 1;
            *state.held.entry(group).or_default() += 1;
            return Some(SlotGuard {
                slots: self.clone(),
                group,
            });
        }
        None
    }

    /// A slot for a session of `source`: at once if one is free, else after
    /// waiting its turn for at most `wait`.
    ///
    /// # Errors
    /// [`SlotError::Timeout`]: no slot within `wait`.
    pub async fn acquire(
        self: &Arc<Self>,
        source: IpAddr,
        wait: Duration,
        preferred: bool,
    ) -> Result<SlotGuard, SlotError> {
        let group = self.group(source);
        let (id, mut rx) = {
            let mut state = self.lock();
            if self.free_for(&state, &group, Instant::now()) {
                state.in_use += 1;
                *state.held.entry(group).or_default() += 1;
                return Ok(SlotGuard {
                    slots: self.clone(),
                    group,
                });
            }
            let id = state.next_id;
            state.next_id = state.next_id.wrapping_add(1);
            let (tx, rx) = oneshot::channel();
            if state.waiting.get(&group).is_none_or(VecDeque::is_empty) {
                state.turns.push_back(group);
            }
            state
                .waiting
                .entry(group)
                .or_default()
                .push_back(Waiter { id, tx, preferred });
            (id, rx)
        };
        self.waits.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        self.contention.notify_waiters();
        let entry = WaitEntry {
            slots: self,
            group,
            id,
        };
        let result = match tokio::time::timeout(wait, &mut rx).await {
            Ok(Ok(guard)) => Ok(guard),
            // Our sender went without a slot (cannot happen while we are
            // queued), or the wait is over: a slot handed over at the last
            // moment is still ours.
            Ok(Err(_)) | Err(_) => {
                rx.close();
                rx.try_recv().map_err(|_| SlotError::Timeout)
            }
        };
        drop(entry);
        self.wait_time.record(started.elapsed());
        if result.is_err() {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Remembers that a session of `source` was shed: for
    /// `limits.shed_sessions_window` its network waits behind the networks
    /// whose sessions were not.
    pub fn mark_shed(&self, source: IpAddr) {
        let group = self.group(source);
        let now = Instant::now();
        let mut state = self.lock();
        if state.shed.len() >= MAX_SHED_NETWORKS && !state.shed.contains_key(&group) {
            let memory = self.shed_memory;
            state.shed.retain(|_, at| now.duration_since(*at) < memory);
            if state.shed.len() >= MAX_SHED_NETWORKS {
                return;
            }
        }
        state.shed.insert(group, now);
    }

    /// Whether a session of `source`'s network was shed within
    /// `limits.shed_sessions_window`.
    #[must_use]
    pub fn shed_lately(&self, source: IpAddr) -> bool {
        let group = self.group(source);
        self.is_shed(&self.lock(), &group, Instant::now())
    }

    /// Whether a session of `holder`'s network, giving its slot back,
    /// would let a waiter have it: any waiter when the holder's network
    /// was shed lately, else one of a network not shed lately, or any
    /// while the networks shed lately hold less than [`Self::shed_cap`].
    #[must_use]
    pub fn others_wait(&self, holder: IpAddr) -> bool {
        let holder = self.group(holder);
        let now = Instant::now();
        let state = self.lock();
        if state.turns.is_empty() {
            return false;
        }
        self.is_shed(&state, &holder, now)
            || self.shed_held(&state, now) < self.shed_cap()
            || state.turns.iter().any(|g| !self.is_shed(&state, g, now))
    }

    /// The most slots the networks shed lately hold together: half of
    /// them (at least one).
    #[must_use]
    pub fn shed_cap(&self) -> usize {
        (self.capacity / 2).max(1)
    }

    fn is_shed(&self, state: &SlotState, group: &IpNet, now: Instant) -> bool {
        state
            .shed
            .get(group)
            .is_some_and(|at| now.duration_since(*at) < self.shed_memory)
    }

    /// Slots held by networks shed lately.
    fn shed_held(&self, state: &SlotState, now: Instant) -> usize {
        state
            .held
            .iter()
            .filter(|(g, _)| self.is_shed(state, g, now))
            .map(|(_, n)| *n)
            .sum()
    }

    /// Whether `group` may take a free slot without queueing: one is free
    /// and, for a network shed lately, nobody waits and the networks shed
    /// lately hold less than their cap. Waiters with a slot free are of
    /// networks shed lately at their cap, so a network not shed lately
    /// goes past them. (Or of a network whose shed was forgotten while it
    /// waited: it is served at the next slot given back.)
    fn free_for(&self, state: &SlotState, group: &IpNet, now: Instant) -> bool {
        state.in_use < self.capacity
            && (!self.is_shed(state, group, now)
                || (state.turns.is_empty() && self.shed_held(state, now) < self.shed_cap()))
    }

    /// Gives `group`'s slot back: to the next waiter in turn, or to the pool.
    fn release(self: &Arc<Self>, group: IpNet) {
        let handover = {
            let mut state = self.lock();
            if let Some(held) = state.held.get_mut(&group) {
                *held = held.saturating_sub(1);
                if *held == 0 {
                    state.held.remove(&group);
                }
            }
            state.in_use = state.in_use.saturating_sub(1);
            self.next_waiter(&mut state).map(|(next, tx)| {
                state.in_use += 1;
                *state.held.entry(next).or_default() += 1;
                (next, tx)
            })
        };
        if let Some((next, tx)) = handover {
            // A waiter that gave up meanwhile drops the guard it is sent,
            // which gives the slot on again.
            let _ = tx.send(SlotGuard {
                slots: self.clone(),
                group: next,
            });
        }
    }

    /// The waiter to serve next: round-robin over the waiting networks,
    /// skipping those at or over their fair share, and those shed lately
    /// while any other is under its share; the first in turn when all are.
    /// A network whose next waiter is preferred goes first among those
    /// under their share and not shed lately. Networks shed lately are
    /// not served at all while they hold [`Self::shed_cap`] slots.
    fn next_waiter(&self, state: &mut SlotState) -> Option<(IpNet, oneshot::Sender<SlotGuard>)> {
        let now = Instant::now();
        loop {
            if state.turns.is_empty() {
                return None;
            }
            let share = (self.capacity / state.turns.len()).max(1);
            let under_share = |g: &IpNet| state.held.get(g).copied().unwrap_or(0) < share;
            let shed_lately = |g: &IpNet| self.is_shed(state, g, now);
            let shed_at_cap = self.shed_held(state, now) >= self.shed_cap();
            let preferred = |g: &IpNet| {
                state
                    .waiting
                    .get(g)
                    .and_then(VecDeque::front)
                    .is_some_and(|w| w.preferred)
            };
            // The first in turn of the best rank; preference counts only
            // among the networks under their share and not shed lately.
            let rank = |g: &IpNet| match (under_share(g), shed_lately(g)) {
                (true, false) if preferred(g) => 0,
                (true, false) => 1,
                (true, true) => 2,
                (false, _) => 3,
            };
            let position = (0..state.turns.len())
                .filter(|&i| !(shed_at_cap && shed_lately(&state.turns[i])))
                .min_by_key(|&i| rank(&state.turns[i]))?;
            let group = state.turns.remove(position)?;
            let Some(queue) = state.waiting.get_mut(&group) else {
                continue;
            };
            let waiter = queue.pop_front();
            if queue.is_empty() {
                state.waiting.remove(&group);
            } else {
                state.turns.push_back(group);
            }
            match waiter {
                Some(waiter) if !waiter.tx.is_closed() => return Some((group, waiter.tx)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn free_slots_are_taken_at_once_and_given_back() {
        let slots = Arc::new(BackendSlots::new(2, 24, 64, Duration::from_secs(600)));
        let a = slots
            .acquire(ip("192.0.2.1"), Duration::from_millis(100), false)
            .await;
        let b = slots
            .acquire(ip("192.0.2.2"), Duration::from_millis(100), false)
            .await;
        assert!(a.is_ok() && b.is_ok());
        assert!(slots.full());
        let c = slots
            .acquire(ip("198.51.100.1"), Duration::from_millis(100), false)
            .await;
        assert_eq!(c.unwrap_err(), SlotError::Timeout);
        assert_eq!(slots.timeouts.load(Ordering::Relaxed), 1);
        assert_eq!(slots.waiting(), 0);
        assert_eq!(
            slots.counts(),
            SlotCounts {
                capacity: 2,
                in_use: 2,
                shed_in_use: 0,
                waiting: 0,
                waits: 1,
                timeouts: 1,
            }
        );
        drop(a);
        assert_eq!(slots.in_use(), 1);
        drop(b);
        assert_eq!(slots.in_use(), 0);
    }

    #[tokio::test]
    async fn slots_are_scarce_from_half_in_use() {
        let slots = Arc::new(BackendSlots::new(4, 24, 64, Duration::from_secs(600)));
        let wait = Duration::from_secs(1);
        let a = slots.acquire(ip("192.0.2.1"), wait, false).await.unwrap();
        assert!(!slots.scarce(), "1 of 4");
        let b = slots.acquire(ip("192.0.2.2"), wait, false).await.unwrap();
        assert!(slots.scarce(), "2 of 4");
        drop(a);
        assert!(!slots.scarce());
        drop(b);
    }

    #[tokio::test]
    async fn a_network_over_its_share_waits_for_the_others() {
        let slots = Arc::new(BackendSlots::new(4, 24, 64, Duration::from_secs(600)));
        // The flooder's network holds every slot and queues more.
        let mut held = Vec::new();
        for i in 1..=4 {
            held.push(
                slots
                    .acquire(
                        ip(&format!("203.0.113.{i}")),
                        Duration::from_millis(100),
                        false,
                    )
                    .await
                    .unwrap(),
            );
        }
        let flood = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .acquire(ip("203.0.113.50"), Duration::from_secs(10), false)
                    .await
                    .map(|_guard| "flood")
            })
        };
        tokio::task::yield_now().await;
        let legit = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .acquire(ip("198.51.100.7"), Duration::from_secs(10), false)
                    .await
                    .map(|g| {
                        std::mem::forget(g);
                        "legit"
                    })
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(slots.waiting(), 2);
        let counts = slots.counts();
        assert_eq!((counts.in_use, counts.waiting, counts.waits), (4, 2, 2));
        // One slot frees: the flooder was first in line, but holds 3 of 4
        // with 2 networks waiting (share 2): the other network is served.
        held.pop();
        assert_eq!(legit.await.unwrap(), Ok("legit"));
        assert_eq!(slots.waiting(), 1);
        held.pop();
        assert_eq!(flood.await.unwrap(), Ok("flood"));
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_passes_the_slot_on() {
        let slots = Arc::new(BackendSlots::new(1, 24, 64, Duration::from_secs(600)));
        let held = slots
            .acquire(ip("192.0.2.1"), Duration::from_millis(100), false)
            .await
            .unwrap();
        let quitter = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .acquire(ip("198.51.100.1"), Duration::from_millis(100), false)
                    .await
                    .map(|_| ())
            })
        };
        let patient = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .acquire(ip("203.0.113.1"), Duration::from_secs(10), false)
                    .await
                    .map(std::mem::forget)
            })
        };
        assert_eq!(quitter.await.unwrap(), Err(SlotError::Timeout));
        drop(held);
        assert_eq!(patient.await.unwrap(), Ok(()));
        assert_eq!(slots.in_use(), 1);
        assert_eq!(slots.waiting(), 0);
        // Both waits are in the histogram: the quitter's 100 ms at least.
        let (counts, sum) = slots.wait_time.snapshot();
        assert_eq!(counts.last(), Some(&2));
        assert!(sum >= 0.1, "{sum}");
    }

    #[tokio::test]
    async fn networks_shed_lately_wait_behind_the_others() {
        let slots = Arc::new(BackendSlots::new(1, 24, 64, Duration::from_secs(600)));
        let held = slots.try_acquire(ip("192.0.2.1")).unwrap();
        // Zombies of three networks, each cut once already, queue first;
        // a sender comes after them.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for source in ["203.0.113.1", "203.0.114.1", "203.0.115.1", "198.51.100.7"] {
            if source.starts_with("203.") {
                slots.mark_shed(ip(source));
            }
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let guard = slots
                    .acquire(ip(source), Duration::from_secs(10), false)
                    .await;
                tx.send(source).unwrap();
                // Each holds its slot a moment, then the next is served.
                tokio::task::yield_now().await;
                drop(guard);
            });
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.waiting(), 4);
        drop(held);
        assert_eq!(rx.recv().await, Some("198.51.100.7"), "the sender first");
        // Then the zombies, in their turns.
        for zombie in ["203.0.113.1", "203.0.114.1", "203.0.115.1"] {
            assert_eq!(rx.recv().await, Some(zombie));
        }
    }

    #[tokio::test]
    async fn networks_shed_lately_hold_at_most_half_the_slots() {
        let slots = Arc::new(BackendSlots::new(4, 24, 64, Duration::from_secs(600)));
        assert_eq!(slots.shed_cap(), 2);
        let keepers = ["203.0.113.1", "203.0.114.1", "203.0.115.1"];
        for keeper in keepers {
            slots.mark_shed(ip(keeper));
        }
        let wait = Duration::from_secs(10);
        let first = slots.acquire(ip(keepers[0]), wait, false).await.unwrap();
        let _second = slots.acquire(ip(keepers[1]), wait, false).await.unwrap();
        // The third keeper waits although two slots are free...
        assert!(slots.try_acquire(ip(keepers[2])).is_none());
        let third = {
            let slots = slots.clone();
            tokio::spawn(async move {
                slots
                    .acquire(ip(keepers[2]), wait, false)
                    .await
                    .map(std::mem::forget)
            })
        };
        tokio::task::yield_now().await;
        assert_eq!((slots.in_use(), slots.waiting()), (2, 1));
        // ...and a sender takes one at once, past it.
        let sender = slots
            .acquire(ip("198.51.100.7"), wait, false)
            .await
            .unwrap();
        assert_eq!(slots.in_use(), 3);
        // Only a keeper's slot given back would serve the waiting keeper:
        // the sender need not give its own back for it.
        assert!(!slots.others_wait(ip("198.51.100.7")));
        assert!(slots.others_wait(ip(keepers[0])));
        drop(sender);
        assert_eq!((slots.in_use(), slots.waiting()), (2, 1), "to the pool");
        drop(first);
        assert_eq!(third.await.unwrap(), Ok(()));
        assert_eq!((slots.in_use(), slots.waiting()), (2, 0));
    }

    #[tokio::test]
    async fn a_recent_sender_is_served_before_the_turns_of_the_others() {
        let slots = Arc::new(BackendSlots::new(1, 24, 64, Duration::from_secs(600)));
        let held = slots.try_acquire(ip("192.0.2.1")).unwrap();
        // Sessions of three networks that never delivered queue first (none
        // shed yet: the first seconds of a flood); a recent sender comes
        // after them, then a first-time sender.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (source, recent) in [
            ("203.0.113.1", false),
            ("203.0.114.1", false),
            ("203.0.115.1", false),
            ("198.51.100.7", true),
            ("198.51.101.7", false),
        ] {
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let guard = slots
                    .acquire(ip(source), Duration::from_secs(10), recent)
                    .await;
                tx.send(source).unwrap();
                tokio::task::yield_now().await;
                drop(guard);
            });
            tokio::task::yield_now().await;
        }
        assert_eq!(slots.waiting(), 5);
        drop(held);
        assert_eq!(
            rx.recv().await,
            Some("198.51.100.7"),
            "the recent sender first"
        );
        // Then everyone else in turn, the first-time sender in its place.
        for source in ["203.0.113.1", "203.0.114.1", "203.0.115.1", "198.51.101.7"] {
            assert_eq!(rx.recv().await, Some(source));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shed_is_forgotten_after_the_window() {
        let slots = Arc::new(BackendSlots::new(1, 24, 64, Duration::from_secs(600)));
        slots.mark_shed(ip("203.0.113.1"));
        tokio::time::advance(Duration::from_secs(601)).await;
        let held = slots.try_acquire(ip("192.0.2.1")).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for source in ["203.0.113.1", "198.51.100.7"] {
            let (slots, tx) = (slots.clone(), tx.clone());
            tokio::spawn(async move {
                let guard = slots
                    .acquire(ip(source), Duration::from_secs(10), false)
                    .await;
                tx.send(source).unwrap();
                drop(guard);
            });
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(rx.recv().await, Some("203.0.113.1"), "first in turn");
    }

    #[test]
    fn sources_are_grouped_by_prefix() {
        let slots = BackendSlots::new(1, 24, 48, Duration::from_secs(600));
        assert_eq!(slots.group(ip("192.0.2.77")).to_string(), "192.0.2.0/24");
        assert_eq!(
            slots.group(ip("::ffff:192.0.2.77")).to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            slots.group(ip("2001:db8:1:2::5")).to_string(),
            "2001:db8:1::/48"
        );
    }
}
