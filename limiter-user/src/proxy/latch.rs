//! A flag set once that a task can wait for: how a session hears that it
//! is to close (shedding) or that its client was blocked.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Default)]
pub struct Latch {
    set: AtomicBool,
    notify: Notify,
}

impl Latch {
    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether the flag is set.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set (at once if it is).
    pub async fn wait(&self) {
        loop {
            // Registered before the check, so a `set` in between wakes it.
            let notified = self.notify.notified();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_set_and_later_waits_end_at_once() {
        let latch = Arc::new(Latch::default());
        let waiter = tokio::spawn({
            let latch = latch.clone();
            async move { latch.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!latch.is_set());
        latch.set();
        waiter.await.unwrap();
        latch.wait().await;
        assert!(latch.is_set());
    }
}
