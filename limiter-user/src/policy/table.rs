//! Bounded building blocks of the policy state: a least-recently-seen table,
//! a sliding window of event times, and a bucket that empties at a rate.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A map holding at most `capacity` entries: inserting a new key into a full
/// table first evicts the entry seen least recently. "Seen" means inserted or
/// touched through [`Lru::touch`]; merely reading an entry does not count.
///
/// Each entry carries a stamp from a counter (not a clock: the decisions'
/// `now` may repeat or arrive slightly out of order across threads), and a
/// `BTreeMap` from stamp to key orders them, so every operation is
/// O(log n).
#[derive(Debug)]
pub(super) struct Lru<K, V> {
    entries: HashMap<K, Slot<V>>,
    order: BTreeMap<u64, K>,
    next_stamp: u64,
    capacity: usize,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    stamp: u64,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// An empty table that holds at most `capacity` entries (at least one).
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
            capacity: capacity.max(1),
        }
    }

    /// The entry for `key`, created with `default` if absent (evicting the
    /// least recently seen entry when full), and marked as seen now.
    pub(super) fn touch(&mut self, key: &K, default: impl FnOnce() -> V) -> &mut V {
        if !self.entries.contains_key(key) {
            while self.entries.len() >= self.capacity {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.entries.remove(&oldest);
            }
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        match self.entries.entry(key.clone()) {
            Entry::Occupied(entry) => {
                let slot = entry.into_mut();
                self.order.remove(&slot.stamp);
                slot.stamp = stamp;
                self.order.insert(stamp, key.clone());
                &mut slot.value
            }
            Entry::Vacant(entry) => {
                self.order.insert(stamp, key.clone());
                &mut entry
                    .insert(Slot {
                        value: default(),
                        stamp,
                    })
                    .value
            }
        }
    }

    /// The entry for `key`, without marking it seen.
    #[cfg(test)]
    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|slot| &slot.value)
    }

    /// The value under `key`, without making it the most recent.
    pub(super) fn peek_mut(&mut self, key: &K) -> Option<&mut V> {
        self.entries.get_mut(key).map(|slot| &mut slot.value)
    }

    /// Removes `key`; whether it was there.
    pub(super) fn remove(&mut self, key: &K) -> bool {
        match self.entries.remove(key) {
            Some(slot) => {
                self.order.remove(&slot.stamp);
                true
            }
            None => false,
        }
    }

    /// Keeps only the entries for which `keep` is true; how many went.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) -> usize {
        let before = self.entries.len();
        let order = &mut self.order;
        self.entries.retain(|key, slot| {
            let kept = keep(key, &mut slot.value);
            if !kept {
                order.remove(&slot.stamp);
            }
            kept
        });
        before - self.entries.len()
    }

    /// How many entries the table holds.
    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Times of recent events, for "how many in the last `span`" counts.
///
/// Holds at most `keep` times (the oldest go first): callers only ask
/// whether a count went past a threshold, so `threshold + 1` times are
/// enough, and memory per key stays bounded whatever a client sends.
#[derive(Debug, Default)]
pub(super) struct Window {
    times: VecDeque<Instant>,
}

impl Window {
    /// Records an event at `now` and returns how many events fall in the
    /// window `(now - span, now]`, this one included (at most `keep`).
    pub(super) fn record(&mut self, now: Instant, span: Duration, keep: usize) -> u32 {
        self.expire(now, span);
        self.times.push_back(now);
        while self.times.len() > keep.max(1) {
            self.times.pop_front();
        }
        self.count()
    }

    /// Drops the events that are `span` old or older at `now`. Times are
    /// pushed in (nearly) increasing order, so expiry stops at the first
    /// recent one; a time slightly after `now` (another thread's `now`)
    /// counts as recent.
    pub(super) fn expire(&mut self, now: Instant, span: Duration) {
        while let Some(&oldest) = self.times.front() {
            if now.saturating_duration_since(oldest) >= span {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }

    /// Events held.
    pub(super) fn count(&self) -> u32 {
        u32::try_from(self.times.len()).unwrap_or(u32::MAX)
    }

    /// Whether no event is held.
    pub(super) fn is_empty(&self) -> bool {
        self.times.is_empty()
    }
}

/// A bucket that holds up to a rate's count and empties at the rate
/// (`per / count` per event), kept as the time it is empty again: one
/// `Instant` per key, whatever the count (GCRA).
#[derive(Clone, Copy, Debug)]
pub(super) struct Bucket {
    empty_at: Instant,
}

impl Bucket {
    /// An empty bucket as of `now`.
    pub(super) fn new(now: Instant) -> Self {
        Self { empty_at: now }
    }

    /// Adds one event at `now` to a bucket emptying at `count` per `per`
    /// (a count of 0 as 1: callers treat 0 as off before they get here);
    /// how many it then holds, this one included.
    pub(super) fn add(&mut self, now: Instant, count: u32, per: Duration) -> u32 {
        let each = (per / count.max(1)).max(Duration::from_nanos(1));
        self.empty_at = self.empty_at.max(now) + each;
        let held = self.empty_at.saturating_duration_since(now).as_nanos();
        u32::try_from(held.div_ceil(each.as_nanos())).unwrap_or(u32::MAX)
    }

    /// Whether it is empty at `now`.
    pub(super) fn is_empty(&self, now: Instant) -> bool {
        self.empty_at <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_its_count_and_empties_at_the_rate() {
        let t0 = Instant::now();
        let per = Duration::from_secs(60);
        let mut bucket = Bucket::new(t0);
        let held: Vec<u32> = (0..4).map(|_| bucket.add(t0, 3, per)).collect();
        assert_eq!(held, [1, 2, 3, 4]);
        // 20 s an event: after 40 s, two of the four have run out.
        assert_eq!(bucket.add(t0 + Duration::from_secs(40), 3, per), 3);
        assert!(!bucket.is_empty(t0 + Duration::from_secs(99)));
        assert!(bucket.is_empty(t0 + Duration::from_secs(100)));
        // A count of 0 does not divide by zero.
        assert_eq!(Bucket::new(t0).add(t0, 0, per), 1);
    }

    #[test]
    fn lru_evicts_the_least_recently_seen() {
        let mut lru = Lru::new(2);
        *lru.touch(&"a", || 0) += 1;
        *lru.touch(&"b", || 0) += 1;
        *lru.touch(&"a", || 0) += 1; // a is now the most recent
        *lru.touch(&"c", || 0) += 1; // evicts b
        assert_eq!(lru.len(), 2);
        assert_eq!(lru.get(&"a"), Some(&2));
        assert_eq!(lru.get(&"b"), None);
        assert_eq!(lru.get(&"c"), Some(&1));
        assert!(lru.remove(&"a"));
        assert!(!lru.remove(&"a"));
        assert_eq!(lru.retain(|_, v| *v > 1), 1);
        assert_eq!(lru.len(), 0);
        // The order index follows removals: refilling evicts nothing wrong.
        lru.touch(&"x", || 7);
        lru.touch(&"y", || 8);
        lru.touch(&"z", || 9);
        assert_eq!(lru.get(&"x"), None);
        assert_eq!(lru.order.len(), lru.entries.len());
    }

    #[test]
    fn window_counts_the_last_span_and_keeps_a_bounded_tail() {
        let t0 = Instant::now();
        let span = Duration::from_secs(60);
        let mut window = Window::default();
        assert_eq!(window.record(t0, span, 10), 1);
        assert_eq!(window.record(t0 + Duration::from_secs(30), span, 10), 2);
        // At exactly `span`, the first event has left the window.
        assert_eq!(window.record(t0 + Duration::from_secs(60), span, 10), 2);
        assert_eq!(window.record(t0 + Duration::from_secs(200), span, 10), 1);
        for _ in 0..100 {
            window.record(t0 + Duration::from_secs(200), span, 3);
        }
        assert_eq!(window.count(), 3);
        window.expire(t0 + Duration::from_secs(1000), span);
        assert!(window.is_empty());
    }
}
