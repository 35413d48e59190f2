//! What waits for Redis: a bounded queue whose oldest entry is dropped (and
//! counted) when a new one finds it full, so that a storm of decisions or
//! of counted events cannot exhaust memory while Redis is slow or away.
//! The task that writes to Redis takes batches from its front.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, MutexGuard,
    },
};

/// Most entries waiting in one queue.
pub const CAPACITY: usize = 10_000;

pub(super) struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    ready: tokio::sync::Notify,
    /// Entries that never reached Redis: pushed out by newer ones, or
    /// dropped by the owner ([`Queue::count_dropped`]).
    dropped: AtomicU64,
}

impl<T> Queue<T> {
    pub(super) fn new() -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            ready: tokio::sync::Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item`; when full, the oldest entry is dropped first.
    pub(super) fn push(&self, item: T) {
        let mut items = self.lock();
        if items.len() >= CAPACITY {
            items.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        items.push_back(item);
        drop(items);
        self.ready.notify_one();
    }

    /// Up to `max` entries from the front, those `keep` refuses dropped
    /// (counted) on the way.
    pub(super) fn take(&self, max: usize, mut keep: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut items = self.lock();
        let mut batch = Vec::with_capacity(items.len().min(max));
        while batch.len() < max {
            let Some(item) = items.pop_front() else {
                break;
            };
            if keep(&item) {
                batch.push(item);
            } else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        batch
    }

    /// Puts a batch that could not be written back at the front, in its
    /// order, as far as room is left (the rest dropped, counted).
    pub(super) fn put_back(&self, batch: Vec<T>) {
        let mut items = self.lock();
        for item in batch.into_iter().rev() {
            if items.len() >= CAPACITY {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                items.push_front(item);
            }
        }
    }

    /// Drops everything queued, counted.
    pub(super) fn clear(&self) {
        let n = {
            let mut items = self.lock();
            let n = items.len();
            items.clear();
            n
        };
        self.count_dropped(n as u64);
    }

    /// Counts `n` entries the owner dropped without queueing them.
    pub(super) fn count_dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Waits until something is pushed (at once if a push came since the
    /// last wait).
    pub(super) async fn ready(&self) {
        self.ready.notified().await;
    }

    #[cfg(test)]
    pub(super) fn items(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_its_oldest_entry_and_counts_it() {
        let queue = Queue::new();
        for i in 0..CAPACITY + 5 {
            queue.push(i);
        }
        assert_eq!(queue.len(), CAPACITY);
        assert_eq!(queue.dropped(), 5);
        let items = queue.items();
        assert_eq!(items.first(), Some(&5));
        assert_eq!(items.last(), Some(&(CAPACITY + 4)));
    }

    #[test]
    fn batches_come_from_the_front_and_go_back_there() {
        let queue = Queue::new();
        for i in 0..10 {
            queue.push(i);
        }
        // Odd entries refused on the way: dropped and counted.
        let batch = queue.take(4, |i| i % 2 == 0);
        assert_eq!(batch, [0, 2, 4, 6]);
        assert_eq!(queue.dropped(), 3);
        queue.put_back(batch);
        assert_eq!(queue.items(), [0, 2, 4, 6, 7, 8, 9]);
        queue.clear();
        assert_eq!((queue.len(), queue.dropped()), (0, 10));
    }
}
