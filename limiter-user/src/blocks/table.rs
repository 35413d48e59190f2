//! The agent's table of active blocks: every block it ordered or was given
//! (policy, CLI, import, state restored at start), whatever the kernel layer
//! does. The proxy refuses these sources at accept even when the kernel
//! layer is off, or when a SYN slipped through before the block reached the
//! kernel; `block list`, `block check`, the metrics and the state store read
//! it instead of walking the kernel's maps. Bounded (`state.max_blocks`).
//!
//! Everything an operation needs is indexed, so that nothing walks the
//! whole table under its lock (accepts wait for it): finding the block that
//! covers an address takes one hash lookup per prefix length in use; the
//! expiry index gives eviction, the sweep and paged listing in O(log n) a
//! step; counts by origin and of entries in the kernel are kept on insert
//! and remove. Each change is also handed to the state store's journal
//! ([`Blocks::attach_journal`]), in the order the table applied it.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    ops::Bound,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{SyncSender, TrySendError},
        Mutex, MutexGuard,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use limiter_common::Reason;

use super::{Block, Change};

/// Where a paged listing goes on: the expiry key and network of the last
/// block returned (blocks are listed by expiry, soonest first, then by
/// network; blocks without end last).
pub type Cursor = (u64, IpNet);

/// One page of a listing.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Matching blocks, each with whether the kernel holds it.
    pub rows: Vec<(Block, bool)>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<Cursor>,
}

/// Counts kept on insert and remove (no walk).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Blocks held (expired ones until the next sweep).
    pub total: u64,
    /// Of those, the ones the kernel accepted.
    pub in_kernel: u64,
    /// By origin name, origins with no block left out.
    pub by_origin: Vec<(&'static str, u64)>,
}

/// Active blocks by network, at most `capacity` (`state.max_blocks`).
pub struct Blocks {
    table: Mutex<Table>,
    capacity: usize,
    evicted: AtomicU64,
}

/// Most evicted networks remembered for [`Blocks::take_evicted`]; past it
/// the oldest are forgotten (their kernel entries then end at their expiry).
const MAX_PENDING_EVICTIONS: usize = 65_536;

/// Slots of the counts by origin, indexed by code (codes start at 1).
const ORIGINS: usize = Reason::ALL.len() + 1;

struct Entry {
    block: Block,
    in_kernel: bool,
}

/// The blocks and their indexes, under one lock.
struct Table {
    map: HashMap<IpNet, Entry>,
    /// Every block of `map` by expiry (`expiry_key`): a full table finds
    /// the block expiring first, a sweep the expired ones, a listing its
    /// next page, without a scan of every block.
    by_expiry: BTreeSet<(u64, IpNet)>,
    /// Prefix lengths ever inserted, per family (never cleared: a stale
    /// length costs one lookup).
    v4_lengths: [bool; 33],
    v6_lengths: [bool; 129],
    by_origin: [u64; ORIGINS],
    in_kernel: u64,
    /// Evicted networks the kernel may still hold.
    evicted: Vec<IpNet>,
    journal: Option<SyncSender<Change>>,
    /// Changes the journal could not take (its queue was full): the store
    /// must write a whole snapshot to catch up.
    journal_lost: u64,
}

impl Table {
    fn count(&mut self, entry: &Entry, add: bool) {
        let slot = &mut self.by_origin[entry.block.origin as usize];
        let kernel = u64::from(entry.in_kernel);
        if add {
            *slot += 1;
            self.in_kernel += kernel;
        } else {
            *slot = slot.saturating_sub(1);
            self.in_kernel = self.in_kernel.saturating_sub(kernel);
        }
    }

    /// Removes `net` from the map and every index.
    fn take(&mut self, net: &IpNet) -> Option<Entry> {
        let entry = self.map.remove(net)?;
        self.by_expiry
            .remove(&(expiry_key(entry.block.expires), entry.block.net));
        self.count(&entry, false);
        Some(entry)
    }

    fn journal(&mut self, change: Change) {
        let Some(tx) = &self.journal else { return };
        match tx.try_send(change) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.journal_lost += 1,
            Err(TrySendError::Disconnected(_)) => self.journal = None,
        }
    }
}

impl Default for Blocks {
    fn default() -> Self {
        Self::with_capacity(100_000)
    }
}

impl Blocks {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            table: Mutex::new(Table {
                map: HashMap::new(),
                by_expiry: BTreeSet::new(),
                v4_lengths: [false; 33],
                v6_lengths: [false; 129],
                by_origin: [0; ORIGINS],
                in_kernel: 0,
                evicted: Vec::new(),
                journal: None,
                journal_lost: 0,
            }),
            capacity: capacity.max(1),
            evicted: AtomicU64::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most blocks held (`state.max_blocks`).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Blocks dropped to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// From now on, hands every change to `journal` (in the order applied).
    /// A full queue does not wait: the change is counted as lost
    /// ([`Blocks::take_journal_lost`]) and the store catches up with a
    /// snapshot.
    pub fn attach_journal(&self, journal: SyncSender<Change>) {
        self.lock().journal = Some(journal);
    }

    /// Stops handing changes to the journal (the store closes).
    pub fn detach_journal(&self) {
        self.lock().journal = None;
    }

    /// Changes the journal missed since the last call.
    pub fn take_journal_lost(&self) -> u64 {
        std::mem::take(&mut self.lock().journal_lost)
    }

    /// Records a block (replacing one on the same network, whose kernel
    /// status it keeps until [`Blocks::mark_kernel`] says otherwise); when
    /// full, the block expiring first makes room and its network is
    /// returned (and kept for [`Blocks::take_evicted`]).
    pub fn insert(&self, block: Block) -> Option<IpNet> {
        self.insert_entry(block, None)
    }

    /// [`Blocks::insert`] with whether the kernel holds the block, in one
    /// step (a restore of a million blocks takes one lock each).
    pub fn insert_marked(&self, block: Block, in_kernel: bool) -> Option<IpNet> {
        self.insert_entry(block, Some(in_kernel))
    }

    fn insert_entry(&self, block: Block, in_kernel: Option<bool>) -> Option<IpNet> {
        let mut table = self.lock();
        match block.net {
            IpNet::V4(n) => table.v4_lengths[usize::from(n.prefix_len())] = true,
            IpNet::V6(n) => table.v6_lengths[usize::from(n.prefix_len())] = true,
        }
        let mut evicted = None;
        if table.map.len() >= self.capacity && !table.map.contains_key(&block.net) {
            if let Some(&(_, net)) = table.by_expiry.first() {
                table.take(&net);
                if table.evicted.len() >= MAX_PENDING_EVICTIONS {
                    table.evicted.remove(0);
                }
                table.evicted.push(net);
                self.evicted.fetch_add(1, Ordering::Relaxed);
                evicted = Some(net);
                tracing::warn!(%net, capacity = self.capacity, "block list full (state.max_blocks): dropped the block expiring first");
            }
        }
        let kept = table.take(&block.net).is_some_and(|old| old.in_kernel);
        let in_kernel = in_kernel.unwrap_or(kept);
        table.journal(Change::Put(block.clone()));
        let entry = Entry { block, in_kernel };
        table.count(&entry, true);
        table
            .by_expiry
            .insert((expiry_key(entry.block.expires), entry.block.net));
        table.map.insert(entry.block.net, entry);
        evicted
    }

    /// Records whether the kernel holds the block on exactly `net`.
    pub fn mark_kernel(&self, net: &IpNet, in_kernel: bool) {
        let mut table = self.lock();
        let Some(entry) = table.map.get_mut(net) else {
            return;
        };
        let was = std::mem::replace(&mut entry.in_kernel, in_kernel);
        match (was, in_kernel) {
            (false, true) => table.in_kernel += 1,
            (true, false) => table.in_kernel = table.in_kernel.saturating_sub(1),
            _ => {}
        }
    }

    /// Removes the block on exactly `net` (an operator's decision: it is
    /// journaled).
    pub fn remove(&self, net: &IpNet) -> bool {
        let mut table = self.lock();
        let removed = table.take(net).is_some();
        if removed {
            table.journal(Change::Remove(*net));
        }
        removed
    }

    /// The block on exactly `net`, if held.
    pub fn get(&self, net: &IpNet) -> Option<Block> {
        self.lock().map.get(net).map(|e| e.block.clone())
    }

    /// Whether a block on exactly `net` is held.
    pub fn contains(&self, net: &IpNet) -> bool {
        self.lock().map.contains_key(net)
    }

    /// Whether the kernel holds the block on exactly `net` (as last marked).
    pub fn in_kernel(&self, net: &IpNet) -> bool {
        self.lock().map.get(net).is_some_and(|e| e.in_kernel)
    }

    /// The active block covering `ip` at `now`, if any: the most specific.
    pub fn covering(&self, ip: IpAddr, now: SystemTime) -> Option<Block> {
        self.containing(ip, now, 1).into_iter().next()
    }

    /// Up to `max` active blocks containing `ip` at `now`, most specific
    /// first (an address's own block, then its networks).
    pub fn containing(&self, ip: IpAddr, now: SystemTime, max: usize) -> Vec<Block> {
        let ip = ip.to_canonical();
        let table = self.lock();
        let lengths: &[bool] = match ip {
            IpAddr::V4(_) => &table.v4_lengths,
            IpAddr::V6(_) => &table.v6_lengths,
        };
        (0..lengths.len())
            .rev()
            .filter(|len| lengths[*len])
            .filter_map(|len| IpNet::new(ip, len as u8).ok())
            .filter_map(|net| table.map.get(&net.trunc()))
            .map(|e| &e.block)
            .filter(|b| b.expires.is_none_or(|t| now < t))
            .take(max)
            .cloned()
            .collect()
    }

    /// Forgets expired blocks; returns their networks.
    pub fn sweep(&self, now: SystemTime) -> Vec<IpNet> {
        let mut table = self.lock();
        let now = expiry_key(Some(now));
        let mut swept = Vec::new();
        while let Some(&(at, net)) = table.by_expiry.first() {
            if at > now || at == NEVER {
                break;
            }
            table.take(&net);
            swept.push(net);
        }
        swept
    }

    /// The networks evicted since the last call (at most
    /// [`MAX_PENDING_EVICTIONS`]), for the agent to take out of the kernel.
    pub fn take_evicted(&self) -> Vec<IpNet> {
        std::mem::take(&mut self.lock().evicted)
    }

    /// Up to `rows` blocks after `after` that `keep` accepts, looking at no
    /// more than `scan` blocks (so that one page holds the lock briefly
    /// however rare the matches). Order: by expiry, soonest first, blocks
    /// without end last; then by network.
    pub fn page(
        &self,
        after: Option<Cursor>,
        rows: usize,
        scan: usize,
        keep: impl Fn(&Block) -> bool,
    ) -> Page {
        let table = self.lock();
        let start = match after {
            Some(cursor) => Bound::Excluded(cursor),
            None => Bound::Unbounded,
        };
        let mut page = Page::default();
        let mut last = None;
        for (looked, key) in table.by_expiry.range((start, Bound::Unbounded)).enumerate() {
            if looked >= scan.max(1) || page.rows.len() >= rows.max(1) {
                page.next = last;
                return page;
            }
            last = Some(*key);
            if let Some(entry) = table.map.get(&key.1) {
                if keep(&entry.block) {
                    page.rows.push((entry.block.clone(), entry.in_kernel));
                }
            }
        }
        page
    }

    /// Every block held (expired ones until swept), copied a page at a time
    /// so that accepts are not kept waiting for the whole copy.
    pub fn all(&self) -> Vec<Block> {
        let mut all = Vec::with_capacity(self.len());
        let mut after = None;
        loop {
            let page = self.page(after, 4096, 4096, |_| true);
            all.extend(page.rows.into_iter().map(|(b, _)| b));
            match page.next {
                Some(next) => after = Some(next),
                None => return all,
            }
        }
    }

    /// Counts by origin and in the kernel, kept up to date on every change.
    pub fn counts(&self) -> BlockCounts {
        let table = self.lock();
        BlockCounts {
            total: table.map.len() as u64,
            in_kernel: table.in_kernel,
            by_origin: Reason::ALL
                .into_iter()
                .map(|origin| (origin.name(), table.by_origin[origin as usize]))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The expiry key of a block that never expires.
pub const NEVER: u64 = u64::MAX;

/// An expiry as ns since the Unix epoch (exact, ordered); `None` last.
pub fn expiry_key(expires: Option<SystemTime>) -> u64 {
    expires.map_or(NEVER, |t| {
        t.duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(NEVER - 1))
            .min(NEVER - 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The indexes hold exactly the blocks of the map.
    fn assert_consistent(blocks: &Blocks) {
        let table = blocks.table.lock().unwrap();
        let from_map: BTreeSet<(u64, IpNet)> = table
            .map
            .values()
            .map(|e| (expiry_key(e.block.expires), e.block.net))
            .collect();
        assert_eq!(table.by_expiry, from_map);
        let mut origins = [0u64; ORIGINS];
        for e in table.map.values() {
            origins[e.block.origin as usize] += 1;
        }
        assert_eq!(table.by_origin, origins);
        let kernel = table.map.values().filter(|e| e.in_kernel).count() as u64;
        assert_eq!(table.in_kernel, kernel);
    }

    #[test]
    fn a_replaced_block_evicts_by_its_new_expiry() {
        let now = SystemTime::now();
        let blocks = Blocks::with_capacity(2);
        blocks.insert(block("192.0.2.1/32", Some(now + Duration::from_secs(60))));
        blocks.insert(block("192.0.2.2/32", Some(now + Duration::from_secs(600))));
        // The same again (unchanged), then extended: now it expires last.
        blocks.insert(block("192.0.2.1/32", Some(now + Duration::from_secs(60))));
        assert_consistent(&blocks);
        blocks.insert(block("192.0.2.1/32", Some(now + Duration::from_secs(6000))));
        assert_consistent(&blocks);
        let evicted = blocks.insert(block("192.0.2.3/32", Some(now + Duration::from_secs(1200))));
        assert_eq!(evicted, Some("192.0.2.2/32".parse().unwrap()));
        assert_eq!(blocks.evicted(), 1);
        assert_eq!(
            blocks.take_evicted(),
            vec!["192.0.2.2/32".parse::<IpNet>().unwrap()]
        );
        assert!(blocks.take_evicted().is_empty(), "taken once");
        assert!(blocks.covering("192.0.2.1".parse().unwrap(), now).is_some());
        assert!(
            blocks.covering("192.0.2.2".parse().unwrap(), now).is_none(),
            "expiring first after the extension: evicted"
        );
        assert_consistent(&blocks);
    }

    #[test]
    fn remove_and_sweep_keep_the_expiry_order() {
        let now = SystemTime::now();
        let blocks = Blocks::with_capacity(10);
        for (i, secs) in [(1, 10u64), (2, 20), (3, 30), (4, 40)] {
            blocks.insert(block(
                &format!("192.0.2.{i}/32"),
                Some(now + Duration::from_secs(secs)),
            ));
        }
        blocks.insert(block("198.51.100.0/24", None));
        assert!(blocks.remove(&"192.0.2.3/32".parse().unwrap()));
        assert!(!blocks.remove(&"192.0.2.3/32".parse().unwrap()));
        assert_consistent(&blocks);
        assert_eq!(
            blocks.sweep(now + Duration::from_secs(20)).len(),
            2,
            "10 s and 20 s"
        );
        assert_eq!(
            blocks.sweep(now + Duration::from_secs(10_000_000)),
            vec!["192.0.2.4/32".parse::<IpNet>().unwrap()],
            "40 s; never stays"
        );
        assert_eq!(blocks.len(), 1);
        assert_consistent(&blocks);
    }

    fn block(net: &str, expires: Option<SystemTime>) -> Block {
        Block {
            since: SystemTime::now(),
            repeat: 0,
            net: net.parse().unwrap(),
            origin: Reason::Manual,
            expires,
            comment: None,
        }
    }

    #[test]
    fn the_most_specific_active_block_covers() {
        let now = SystemTime::now();
        let blocks = Blocks::default();
        blocks.insert(block("10.0.0.0/8", None));
        blocks.insert(Block {
            origin: Reason::Harvest,
            ..block("10.1.2.3/32", Some(now + Duration::from_secs(60)))
        });
        assert_eq!(
            blocks
                .covering("10.1.2.3".parse().unwrap(), now)
                .unwrap()
                .origin,
            Reason::Harvest
        );
        let all = blocks.containing("10.1.2.3".parse().unwrap(), now, 10);
        assert_eq!(
            all.iter().map(|b| b.net.to_string()).collect::<Vec<_>>(),
            ["10.1.2.3/32", "10.0.0.0/8"],
            "most specific first"
        );
        assert_eq!(
            blocks
                .covering("10.9.9.9".parse().unwrap(), now)
                .unwrap()
                .origin,
            Reason::Manual
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            blocks
                .covering("10.1.2.3".parse().unwrap(), later)
                .unwrap()
                .origin,
            Reason::Manual,
            "expired /32: the /8 still holds"
        );
        assert!(blocks.covering("11.0.0.1".parse().unwrap(), now).is_none());
    }

    #[test]
    fn a_full_list_evicts_the_block_expiring_first() {
        let now = SystemTime::now();
        let blocks = Blocks::with_capacity(2);
        blocks.insert(block("192.0.2.1/32", Some(now + Duration::from_secs(60))));
        blocks.insert(block("192.0.2.2/32", None));
        blocks.insert(block("192.0.2.3/32", Some(now + Duration::from_secs(600))));
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks.evicted(), 1);
        assert!(
            blocks.covering("192.0.2.1".parse().unwrap(), now).is_none(),
            "expiring first: evicted"
        );
        assert!(
            blocks.covering("192.0.2.2".parse().unwrap(), now).is_some(),
            "permanent: kept"
        );
    }

    #[test]
    fn covers_hosts_and_networks_until_expiry() {
        let now = SystemTime::now();
        let blocks = Blocks::default();
        blocks.insert(block("192.0.2.7/32", Some(now + Duration::from_secs(60))));
        blocks.insert(block("2001:db8:1::/64", None));
        assert!(blocks.covering("192.0.2.7".parse().unwrap(), now).is_some());
        assert!(
            blocks
                .covering("::ffff:192.0.2.7".parse().unwrap(), now)
                .is_some(),
            "mapped form"
        );
        assert!(blocks.covering("192.0.2.8".parse().unwrap(), now).is_none());
        assert!(blocks
            .covering("2001:db8:1::99".parse().unwrap(), now)
            .is_some());
        let later = now + Duration::from_secs(61);
        assert!(blocks
            .covering("192.0.2.7".parse().unwrap(), later)
            .is_none());
        assert_eq!(blocks.sweep(later).len(), 1);
        assert_eq!(blocks.len(), 1);
        assert!(blocks.remove(&"2001:db8:1::/64".parse().unwrap()));
        assert!(blocks.is_empty());
    }

    #[test]
    fn counts_follow_inserts_marks_removals_and_sweeps() {
        let now = SystemTime::now();
        let blocks = Blocks::default();
        blocks.insert(block("192.0.2.1/32", Some(now + Duration::from_secs(60))));
        blocks.insert(Block {
            origin: Reason::Harvest,
            ..block("192.0.2.2/32", None)
        });
        blocks.mark_kernel(&"192.0.2.1/32".parse().unwrap(), true);
        blocks.mark_kernel(&"192.0.2.2/32".parse().unwrap(), true);
        blocks.mark_kernel(&"192.0.2.2/32".parse().unwrap(), true);
        assert_consistent(&blocks);
        assert_eq!(
            blocks.counts(),
            BlockCounts {
                total: 2,
                in_kernel: 2,
                by_origin: vec![("manual", 1), ("harvest", 1)],
            }
        );
        // A replacement keeps the kernel mark; a sweep and a removal drop it.
        blocks.insert(Block {
            origin: Reason::Auth,
            ..block("192.0.2.2/32", None)
        });
        assert_consistent(&blocks);
        assert_eq!(blocks.counts().by_origin, vec![("manual", 1), ("auth", 1)]);
        assert_eq!(blocks.counts().in_kernel, 2);
        blocks.sweep(now + Duration::from_secs(61));
        assert!(blocks.remove(&"192.0.2.2/32".parse().unwrap()));
        assert_consistent(&blocks);
        assert_eq!(blocks.counts(), BlockCounts::default());
    }

    #[test]
    fn pages_walk_every_block_once_in_expiry_order() {
        let now = SystemTime::now();
        let blocks = Blocks::default();
        for i in 0..250u32 {
            let expires = (i % 5 != 0).then(|| now + Duration::from_secs(u64::from(1000 - i)));
            blocks.insert(Block {
                origin: if i % 2 == 0 {
                    Reason::Manual
                } else {
                    Reason::Auth
                },
                ..block(&format!("10.0.{}.{}/32", i / 256, i % 256), expires)
            });
        }
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = blocks.page(after, 7, 1000, |_| true);
            pages += 1;
            seen.extend(
                page.rows
                    .into_iter()
                    .map(|(b, _)| (expiry_key(b.expires), b.net)),
            );
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(seen.len(), 250);
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "ordered, no repeat");
        assert_eq!(pages, 250usize.div_ceil(7));
        assert_eq!(blocks.all().len(), 250);

        // A filter with a small scan bound: pages may come back short but
        // the walk still finds every match.
        let mut auth = 0;
        let mut after = None;
        loop {
            let page = blocks.page(after, 100, 10, |b| b.origin == Reason::Auth);
            assert!(page.rows.len() <= 10);
            auth += page.rows.len();
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(auth, 125);
    }

    #[test]
    fn the_journal_gets_puts_and_removals_in_order_and_counts_overflow() {
        let now = SystemTime::now();
        let blocks = Blocks::default();
        blocks.insert(block("192.0.2.9/32", None));
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        blocks.attach_journal(tx);
        let b = block("192.0.2.1/32", Some(now + Duration::from_secs(60)));
        blocks.insert(b.clone());
        assert!(blocks.remove(&b.net));
        blocks.sweep(now + Duration::from_secs(3600));
        blocks.insert(block("192.0.2.2/32", None));
        assert_eq!(rx.try_recv().unwrap(), Change::Put(b.clone()));
        assert_eq!(rx.try_recv().unwrap(), Change::Remove(b.net));
        assert!(rx.try_recv().is_err(), "the queue was full for the third");
        assert_eq!(blocks.take_journal_lost(), 1);
        assert_eq!(blocks.take_journal_lost(), 0);
        drop(rx);
        blocks.insert(block("192.0.2.3/32", None));
        assert_eq!(blocks.take_journal_lost(), 0, "a closed journal is let go");
    }
}
