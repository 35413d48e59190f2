//! Shedding under pressure: which sessions may be closed to make room.
//!
//! Every session registers here ([`Sessions::register`]) until its first
//! MAIL FROM is accepted; while it waits for the client's next command (or
//! for its TLS handshake) it is *idle*. When `smtp.max_sessions` is reached, a new client does not get
//! `421` at once: the oldest idle session that never had a MAIL FROM
//! accepted is told to close ([`Sessions::shed_oldest_idle`]) and the
//! newcomer takes its place. Sessions that did earn a MAIL (and those busy
//! with a command) are not shed this way, except a session whose
//! transaction was *parked* (it kept its client waiting on a backend slot
//! others needed, and gave the slot back: [`Sessions::register_parked`]):
//! the oldest idle one of those goes when no idle session without a MAIL
//! is left.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use super::latch::Latch;

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
#[derive(Default)]
pub struct Entry {
    /// Waiting for the client's next command.
    idle: AtomicBool,
    /// Told to close.
    shed: Latch,
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

    /// Registers a new session (the youngest).
    pub fn register(self: &Arc<Self>) -> Registration {
        self.register_in(false)
    }

    /// Registers a session whose transaction was parked (the youngest of
    /// those): shed only when no idle session without a MAIL is left.
    pub fn register_parked(self: &Arc<Self>) -> Registration {
        self.register_in(true)
    }

    fn register_in(self: &Arc<Self>, parked: bool) -> Registration {
        let entry = Arc::new(Entry::default());
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

    /// Tells the oldest idle registered session to close (one with a
    /// parked transaction only if no other is idle), and unregisters it;
    /// whether there was one.
    pub fn shed_oldest_idle(&self) -> bool {
        let mut registry = self.lock();
        for parked in [false, true] {
            let list = registry.list(parked);
            let Some(id) = list
                .iter()
                .find(|(_, e)| e.idle.load(Ordering::Acquire) && !e.is_shed())
                .map(|(id, _)| *id)
            else {
                continue;
            };
            if let Some(entry) = list.remove(&id) {
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

    #[tokio::test]
    async fn the_oldest_idle_session_is_shed_first() {
        let sessions = Arc::new(Sessions::default());
        let old_busy = sessions.register();
        let old_idle = sessions.register();
        let young_idle = sessions.register();
        old_idle.entry.set_idle(true);
        young_idle.entry.set_idle(true);
        assert!(sessions.shed_oldest_idle());
        assert!(old_idle.entry.is_shed());
        old_idle.entry.shed().await;
        assert!(!young_idle.entry.is_shed() && !old_busy.entry.is_shed());
        assert!(sessions.shed_oldest_idle());
        assert!(young_idle.entry.is_shed());
        assert!(!sessions.shed_oldest_idle());
        drop(old_busy);
        assert!(sessions.is_empty());
    }

    #[tokio::test]
    async fn a_parked_session_is_shed_only_when_no_other_idle_one_is_left() {
        let sessions = Arc::new(Sessions::default());
        let parked = sessions.register_parked();
        let young_idle = sessions.register();
        let young_busy = sessions.register();
        parked.entry.set_idle(true);
        young_idle.entry.set_idle(true);
        assert_eq!(sessions.len(), 3);
        assert!(sessions.shed_oldest_idle());
        assert!(young_idle.entry.is_shed() && !parked.entry.is_shed());
        assert!(sessions.shed_oldest_idle());
        assert!(parked.entry.is_shed() && !young_busy.entry.is_shed());
        assert!(!sessions.shed_oldest_idle());
        drop((parked, young_idle, young_busy));
        assert!(sessions.is_empty());
    }
}
