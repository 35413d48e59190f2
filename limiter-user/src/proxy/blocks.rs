//! The proxy's own view of the active blocks: sources refused at accept even
//! when the kernel layer is off, or when a SYN slipped through before the
//! block reached the kernel. Bounded; the kernel maps hold the same entries.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;

/// An active block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveBlock {
    pub net: IpNet,
    pub reason: u32,
    /// `None` = until removed.
    pub expires: Option<SystemTime>,
    /// When the block began.
    pub since: SystemTime,
    /// Earlier blocks of this source (0 for a first block).
    pub repeat: u32,
}

/// Active blocks by network, at most `capacity` (`state.max_blocks`).
pub struct Blocks {
    by_net: Mutex<Table>,
    capacity: usize,
    evicted: std::sync::atomic::AtomicU64,
}

/// The blocks and the prefix lengths in use, so that finding the block
/// covering an address takes one hash lookup per length in use (a few),
/// not a scan of every block.
struct Table {
    map: HashMap<IpNet, ActiveBlock>,
    /// Every block of `map` by expiry (`expiry_key`), so that a full table
    /// finds the block expiring first, and a sweep the expired ones, without
    /// a scan of every block.
    by_expiry: BTreeSet<(u64, IpNet)>,
    /// Prefix lengths ever inserted, per family (never cleared: a stale
    /// length costs one lookup).
    v4_lengths: [bool; 33],
    v6_lengths: [bool; 129],
}

impl Default for Blocks {
    fn default() -> Self {
        Self::with_capacity(100_000)
    }
}

impl Blocks {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            by_net: Mutex::new(Table {
                map: HashMap::new(),
                by_expiry: BTreeSet::new(),
                v4_lengths: [false; 33],
                v6_lengths: [false; 129],
            }),
            capacity: capacity.max(1),
            evicted: Default::default(),
        }
    }

    /// Blocks dropped to make room.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a block (replacing one on the same network); when full, the
    /// block expiring first makes room.
    pub fn insert(&self, block: ActiveBlock) {
        let mut table = self.by_net.lock().unwrap_or_else(|p| p.into_inner());
        match block.net {
            IpNet::V4(n) => table.v4_lengths[usize::from(n.prefix_len())] = true,
            IpNet::V6(n) => table.v6_lengths[usize::from(n.prefix_len())] = true,
        }
        if table.map.len() >= self.capacity && !table.map.contains_key(&block.net) {
            if let Some((_, net)) = table.by_expiry.pop_first() {
                table.map.remove(&net);
                self.evicted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%net, capacity = self.capacity, "block list full (state.max_blocks): dropped the block expiring first");
            }
        }
        let key = (expiry_key(block.expires), block.net);
        if let Some(old) = table.map.insert(block.net, block) {
            table.by_expiry.remove(&(expiry_key(old.expires), old.net));
        }
        table.by_expiry.insert(key);
    }

    /// Removes the block on exactly `net`.
    pub fn remove(&self, net: &IpNet) -> bool {
        let mut table = self.by_net.lock().unwrap_or_else(|p| p.into_inner());
        match table.map.remove(net) {
            Some(old) => {
                table.by_expiry.remove(&(expiry_key(old.expires), old.net));
                true
            }
            None => false,
        }
    }

    /// The active block covering `ip` at `now`, if any.
    pub fn covering(&self, ip: IpAddr, now: SystemTime) -> Option<ActiveBlock> {
        let ip = ip.to_canonical();
        let table = self.by_net.lock().unwrap_or_else(|p| p.into_inner());
        let lengths: &[bool] = match ip {
            IpAddr::V4(_) => &table.v4_lengths,
            IpAddr::V6(_) => &table.v6_lengths,
        };
        // The most specific active block wins.
        (0..lengths.len())
            .rev()
            .filter(|len| lengths[*len])
            .filter_map(|len| IpNet::new(ip, len as u8).ok())
            .filter_map(|net| table.map.get(&net.trunc()))
            .find(|b| b.expires.is_none_or(|t| now < t))
            .cloned()
    }

    /// Forgets expired blocks; returns their networks.
    pub fn sweep(&self, now: SystemTime) -> Vec<IpNet> {
        let mut table = self.by_net.lock().unwrap_or_else(|p| p.into_inner());
        let now = expiry_key(Some(now));
        let mut swept = Vec::new();
        while let Some(&(at, net)) = table.by_expiry.first() {
            if at > now || at == NEVER {
                break;
            }
            table.by_expiry.pop_first();
            table.map.remove(&net);
            swept.push(net);
        }
        swept
    }

    /// Every block held (expired ones until swept).
    pub fn all(&self) -> Vec<ActiveBlock> {
        self.by_net
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .values()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.by_net
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The expiry key of a block that never expires.
const NEVER: u64 = u64::MAX;

/// An expiry as ns since the Unix epoch (exact, ordered); `None` last.
fn expiry_key(expires: Option<SystemTime>) -> u64 {
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

    /// The expiry index holds exactly the blocks of the map.
    fn assert_consistent(blocks: &Blocks) {
        let table = blocks.by_net.lock().unwrap();
        let from_map: BTreeSet<(u64, IpNet)> = table
            .map
            .values()
            .map(|b| (expiry_key(b.expires), b.net))
            .collect();
        assert_eq!(table.by_expiry, from_map);
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
        blocks.insert(block("192.0.2.3/32", Some(now + Duration::from_secs(1200))));
        assert_eq!(blocks.evicted(), 1);
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

    fn block(net: &str, expires: Option<SystemTime>) -> ActiveBlock {
        ActiveBlock {
            since: SystemTime::now(),
            repeat: 0,
            net: net.parse().unwrap(),
            reason: 1,
            expires,
        }
    }

    #[test]
    fn the_most_specific_active_block_covers() {
        let now = SystemTime::now();
        let blocks = Blocks::default();
        blocks.insert(block("10.0.0.0/8", None));
        blocks.insert(ActiveBlock {
            reason: 2,
            ..block("10.1.2.3/32", Some(now + Duration::from_secs(60)))
        });
        assert_eq!(
            blocks
                .covering("10.1.2.3".parse().unwrap(), now)
                .unwrap()
                .reason,
            2
        );
        assert_eq!(
            blocks
                .covering("10.9.9.9".parse().unwrap(), now)
                .unwrap()
                .reason,
            1
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            blocks
                .covering("10.1.2.3".parse().unwrap(), later)
                .unwrap()
                .reason,
            1,
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
}
