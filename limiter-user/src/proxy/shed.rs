//! Shedding under pressure: which sessions may be closed to make room.
//!
//! Every session registers here ([`Sessions::register`]) until its first
//! MAIL FROM is accepted; while it waits for the client's next command (or
//! for its TLS handshake) it is *idle*. When `smtp.max_sessions` is reached, a new client does not get
//! `421` at once: the oldest idle session that never had a MAIL FROM
//! accepted is told to close ([`Sessions::shed_oldest_idle`]) and the
//! newcomer takes its place. Sessions that did earn a MAIL (and those busy
//! with a command) are never shed this way.

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
    pub entry: Arc<Entry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.sessions.lock().by_age.remove(&self.id);
    }
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session (the youngest).
    pub fn register(self: &Arc<Self>) -> Registration {
        let entry = Arc::new(Entry::default());
        let mut registry = self.lock();
        let id = registry.next_id;
        registry.next_id = registry.next_id.wrapping_add(1);
        registry.by_age.insert(id, entry.clone());
        Registration {
            sessions: self.clone(),
            id,
            entry,
        }
    }

    /// Tells the oldest idle registered session to close, and unregisters
    /// it; whether there was one.
    pub fn shed_oldest_idle(&self) -> bool {
        let mut registry = self.lock();
        let Some(id) = registry
            .by_age
            .iter()
            .find(|(_, e)| e.idle.load(Ordering::Acquire) && !e.is_shed())
            .map(|(id, _)| *id)
        else {
            return false;
        };
        if let Some(entry) = registry.by_age.remove(&id) {
            entry.shed.set();
        }
        true
    }

    /// Sessions registered now.
    #[must_use]
    pub fn len(&self) -> usize {
        self.lock().by_age.len()
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
}
