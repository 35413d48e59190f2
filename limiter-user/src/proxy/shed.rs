//! Shedding under pressure: which sessions may be closed to make room.
//!
//! Every session registers here ([`Sessions::register`]) until its first
//! MAIL FROM is accepted; while it waits for the client's next command (or
//! for its TLS handshake) it is *idle*. When `smtp.max_sessions` is reached, a new client does not get
//! `421` at once: an idle session is told to close
//! ([`Sessions::shed_oldest_idle`]) and the newcomer takes its place. Sessions
//! that did earn a MAIL (and those busy with a command) are not shed this
//! way, except a session whose transaction was *parked* (it kept its client
//! waiting on a backend slot others needed, and gave the slot back:
//! [`Sessions::register_parked`]). The one that goes is, in this order:
//!
//! 1. the oldest idle session without a MAIL that is past its first
//!    [`SHED_GRACE`], else the oldest idle parked one
//!    ([`Sessions::shed_oldest_idle`]);
//! 2. the slowest message taken into the spool (the proxy's
//!    `spool::SpoolBudget::evict_slowest`);
//! 3. the oldest idle session still in its first [`SHED_GRACE`], one
//!    without a MAIL before a parked one ([`Sessions::shed_oldest_new`],
//!    [`Entry::shed_new`]).
//!
//! A sender is idle between its own commands, for a round trip each: when
//! every zombie has a MAIL (keepers queue for backend slots, parked ones
//! NOOP, tricklers send their messages at a crawl), the senders in their
//! first round trips would otherwise be the only sessions without one, and
//! each newcomer would push one out. A session shed in its grace showed
//! nothing yet: its network is not held back for it (see the session's
//! `shed`).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use tokio::time::{Duration, Instant};

use super::latch::Latch;

/// How long a new session is shed only when nothing else makes room: long
/// enough for a client far away to get from the greeting past STARTTLS and
/// EHLO to its MAIL (a handful of round trips), short against the seconds
/// a zombie idles.
pub const SHED_GRACE: Duration = Duration::from_secs(3);

/// The sessions that could be shed, oldest first.
#[derive(Default)]
pub struct Sessions {
    entries: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    by_age: BTreeMap<u64, Arc<Entry>>,
    /// Sessions with a parked transaction, shed only after `by_age`'s.
    parked: BTreeMap<u64, Arc<Entry>>,
}

impl Registry {
    fn list(&mut self, parked: bool) -> &mut BTreeMap<u64, Arc<Entry>> {
        if parked {
            &mut self.parked
        } else {
            &mut self.by_age
        }
    }
}

/// One registered session.
pub struct Entry {
    /// When the session began.
    since: Instant,
    /// Waiting for the client's next command.
    idle: AtomicBool,
    /// Told to close.
    shed: Latch,
    /// Told to close within its first [`SHED_GRACE`].
    shed_new: AtomicBool,
}

impl Entry {
    /// Marks the session idle (reading the next command) or busy.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::Release);
    }

    /// Whether the session was told to close.
    #[must_use]
    pub fn is_shed(&self) -> bool {
        self.shed.is_set()
    }

    /// Whether it was told to close within its first [`SHED_GRACE`], for
    /// want of an older idle session.
    #[must_use]
    pub fn shed_new(&self) -> bool {
        self.shed_new.load(Ordering::Acquire)
    }

    fn in_grace(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < SHED_GRACE
    }

    /// Resolves once the session is told to close.
    pub async fn shed(&self) {
        self.shed.wait().await;
    }
}

/// A session's place in the registry; leaving it (drop) unregisters.
pub struct Registration {
    sessions: Arc<Sessions>,
    id: u64,
    parked: bool,
    pub entry: Arc<Entry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.lock().list(self.parked).remove(&self.id);
    }
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session (the youngest), begun now.
    pub fn register(self: &Arc<Self>) -> Registration {
        self.register_in(false, Instant::now())
    }

    /// Registers a session begun `since` whose transaction was parked (the
    /// youngest of those).
    pub fn register_parked(self: &Arc<Self>, since: Instant) -> Registration {
        self.register_in(true, since)
    }

    fn register_in(self: &Arc<Self>, parked: bool, since: Instant) -> Registration {
        let entry = Arc::new(Entry {
            since,
            idle: AtomicBool::new(false),
            shed: Latch::default(),
            shed_new: AtomicBool::new(false),
        });
        let mut registry = self.lock();
        let id = registry.next_id;
        registry.next_id = registry.next_id.wrapping_add(1);
        registry.list(parked).insert(id, entry.clone());
        Registration {
            sessions: self.clone(),
            id,
            parked,
            entry,
        }
    }

    /// Tells the oldest idle session past its grace to close (one with a
    /// parked transaction only if no other is idle), and unregisters it;
    /// whether there was one.
    pub fn shed_oldest_idle(&self) -> bool {
        self.shed_first_of(false)
    }

    /// Tells the oldest idle session still in its grace to close (one with
    /// a parked transaction only if no other is), and unregisters it;
    /// whether there was one. For when nothing else makes room.
    pub fn shed_oldest_new(&self) -> bool {
        self.shed_first_of(true)
    }

    fn shed_first_of(&self, new: bool) -> bool {
        let now = Instant::now();
        let mut registry = self.lock();
        for parked in [false, true] {
            let list = registry.list(parked);
            let Some(id) = list
                .iter()
                .find(|(_, e)| {
                    e.idle.load(Ordering::Acquire) && !e.is_shed() && e.in_grace(now) == new
                })
                .map(|(id, _)| *id)
            else {
                continue;
            };
            if let Some(entry) = list.remove(&id) {
                entry.shed_new.store(new, Ordering::Release);
                entry.shed.set();
            }
            return true;
        }
        false
    }

    /// Sessions registered now.
    #[must_use]
    pub fn len(&self) -> usize {
        let registry = self.lock();
        registry.by_age.len() + registry.parked.len()
    }

    /// Whether none is registered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the grace of every session registered so far.
    async fn later() {
        tokio::time::advance(SHED_GRACE).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_idle_session_is_shed_first() {
        let sessions = Arc::new(Sessions::default());
        let old_busy = sessions.register();
        let old_idle = sessions.register();
        let young_idle = sessions.register();
        old_idle.entry.set_idle(true);
        young_idle.entry.set_idle(true);
        later().await;
        assert!(sessions.shed_oldest_idle());
        assert!(old_idle.entry.is_shed() && !old_idle.entry.shed_new());
        old_idle.entry.shed().await;
        assert!(!young_idle.entry.is_shed() && !old_busy.entry.is_shed());
        assert!(sessions.shed_oldest_idle());
        assert!(young_idle.entry.is_shed());
        assert!(!sessions.shed_oldest_idle());
        drop(old_busy);
        assert!(sessions.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_session_is_shed_only_when_no_other_idle_one_is_left() {
        let sessions = Arc::new(Sessions::default());
        let parked = sessions.register_parked(Instant::now());
        let young_idle = sessions.register();
        let young_busy = sessions.register();
        parked.entry.set_idle(true);
        young_idle.entry.set_idle(true);
        later().await;
        assert_eq!(sessions.len(), 3);
        assert!(sessions.shed_oldest_idle());
        assert!(young_idle.entry.is_shed() && !parked.entry.is_shed());
        assert!(sessions.shed_oldest_idle());
        assert!(parked.entry.is_shed() && !young_busy.entry.is_shed());
        assert!(!sessions.shed_oldest_idle());
        drop((parked, young_idle, young_busy));
        assert!(sessions.is_empty());
    }

    /// Every zombie holds a MAIL (parked, or busy waiting for a slot) and a
    /// sender is between two of its first commands: the newcomer pushes out
    /// a parked zombie, not the sender; with none left, the oldest new
    /// session, marked as such.
    #[tokio::test(start_paused = true)]
    async fn a_session_in_its_first_seconds_goes_after_the_parked_ones() {
        let sessions = Arc::new(Sessions::default());
        let started = Instant::now();
        later().await;
        let sender = sessions.register();
        let parked = sessions.register_parked(started);
        let newer = sessions.register();
        for s in [&sender, &parked, &newer] {
            s.entry.set_idle(true);
        }
        assert!(sessions.shed_oldest_idle());
        assert!(parked.entry.is_shed() && !parked.entry.shed_new());
        assert!(!sender.entry.is_shed() && !newer.entry.is_shed());
        // No other is idle: the older of the new ones goes, when asked.
        assert!(!sessions.shed_oldest_idle());
        assert!(sessions.shed_oldest_new());
        assert!(sender.entry.is_shed() && sender.entry.shed_new());
        assert!(!newer.entry.is_shed());
        // Past its grace, an idle session is shed before a parked one, as
        // before.
        let parked = sessions.register_parked(started);
        parked.entry.set_idle(true);
        tokio::time::advance(SHED_GRACE).await;
        assert!(sessions.shed_oldest_idle());
        assert!(newer.entry.is_shed() && !newer.entry.shed_new());
        assert!(!parked.entry.is_shed());
    }

    /// A parked session's grace runs from the session's start, not from
    /// its parking.
    #[tokio::test(start_paused = true)]
    async fn a_parked_session_new_itself_is_shed_last() {
        let sessions = Arc::new(Sessions::default());
        let old_sender = sessions.register();
        old_sender.entry.set_idle(true);
        tokio::time::advance(SHED_GRACE / 2).await;
        let parked = sessions.register_parked(Instant::now());
        parked.entry.set_idle(true);
        tokio::time::advance(SHED_GRACE / 2).await;
        // The older session is past its grace, the parked one not yet.
        assert!(sessions.shed_oldest_idle());
        assert!(old_sender.entry.is_shed() && !old_sender.entry.shed_new());
        assert!(!sessions.shed_oldest_idle());
        assert!(sessions.shed_oldest_new());
        assert!(parked.entry.is_shed() && parked.entry.shed_new());
    }
}
