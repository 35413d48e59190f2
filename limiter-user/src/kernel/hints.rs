//! The prefilter bitmaps of the LPM tries (`NET_HINTS`, see
//! `limiter_common::hint`): which bits a network needs, the whole bitmap of
//! a trie's entries, and the count of networks behind each bit that lets a
//! removal clear exactly the bits no other network needs.

use std::{collections::HashSet, ops::RangeInclusive};

use ipnet::IpNet;
use limiter_common::hint;

use super::addr::canonical;

/// The values of an address's first 16 bits (0..=65535) that addresses in
/// `net` may have; an IPv4 network's /16s, an IPv6 network's /16s.
pub fn top16_range(net: IpNet) -> RangeInclusive<u32> {
    let net = canonical(net);
    let (first_two, prefix_len) = match net {
        IpNet::V4(n) => {
            let o = n.network().octets();
            ([o[0], o[1]], n.prefix_len())
        }
        IpNet::V6(n) => {
            let o = n.network().octets();
            ([o[0], o[1]], n.prefix_len())
        }
    };
    let start = u32::from(u16::from_be_bytes(first_two));
    let count = if prefix_len >= 16 {
        1
    } else {
        1u32 << (16 - prefix_len)
    };
    start..=start + count - 1
}

/// The bitmap (`hint::WORDS` words) of a set of networks of one family.
pub fn bitmap<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<u64> {
    let mut words = vec![0u64; hint::WORDS as usize];
    for net in nets {
        for top16 in top16_range(*net) {
            words[(top16 >> 6) as usize] |= 1u64 << (top16 & 63);
        }
    }
    words
}

/// The networks of one trie as this process last saw them, with how many
/// need each bit. Removing a network then clears the bits it alone needed,
/// in time proportional to its /16s, not to the trie's size (a walk of the
/// trie per removal made removing many networks quadratic).
#[derive(Debug, Default)]
pub struct Coverage {
    nets: HashSet<IpNet>,
    /// Networks needing each top-16 value; empty until the first network.
    counts: Vec<u32>,
}

impl Coverage {
    /// The coverage of `nets` (a trie's keys).
    pub fn of(nets: impl IntoIterator<Item = IpNet>) -> Self {
        let mut coverage = Self::default();
        for net in nets {
            coverage.add(net);
        }
        coverage
    }

    /// Counts `net`; `false` if it was counted already.
    pub fn add(&mut self, net: IpNet) -> bool {
        let net = canonical(net);
        if !self.nets.insert(net) {
            return false;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; 65_536];
        }
        for top16 in top16_range(net) {
            let count = &mut self.counts[top16 as usize];
            *count = count.saturating_add(1);
        }
        true
    }

    /// Forgets `net`; returns the bits no network needs any more, as
    /// (word offset in the bitmap, mask of bits to clear), empty if `net`
    /// was not counted.
    pub fn remove(&mut self, net: IpNet) -> Vec<(u32, u64)> {
        let net = canonical(net);
        if !self.nets.remove(&net) {
            return Vec::new();
        }
        let mut cleared: Vec<(u32, u64)> = Vec::new();
        for top16 in top16_range(net) {
            let count = &mut self.counts[top16 as usize];
            *count = count.saturating_sub(1);
            if *count == 0 {
                let (word, bit) = (top16 >> 6, 1u64 << (top16 & 63));
                match cleared.last_mut() {
                    Some((w, mask)) if *w == word => *mask |= bit,
                    _ => cleared.push((word, bit)),
                }
            }
        }
        cleared
    }

    /// The bitmap of the counted networks.
    pub fn bitmap(&self) -> Vec<u64> {
        bitmap(&self.nets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_of_ipv4_and_ipv6_networks() {
        assert_eq!(top16_range(net("192.0.2.0/24")), 0xc000..=0xc000);
        assert_eq!(top16_range(net("10.0.0.0/8")), 0x0a00..=0x0aff);
        assert_eq!(top16_range(net("0.0.0.0/0")), 0..=65_535);
        assert_eq!(
            top16_range(net("::ffff:198.51.100.0/120")),
            0xc633..=0xc633,
            "an IPv4-mapped network is IPv4"
        );
        assert_eq!(top16_range(net("2001:db8::/32")), 0x2001..=0x2001);
        assert_eq!(top16_range(net("2a00::/12")), 0x2a00..=0x2a0f);
        assert_eq!(top16_range(net("::/0")), 0..=65_535);
    }

    #[test]
    fn bitmap_sets_exactly_the_covered_bits() {
        let words = bitmap(&[net("192.0.2.0/24"), net("10.0.0.0/8")]);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1 + 256);
        assert_ne!(words[0xc000 >> 6] & 1, 0);
        assert_eq!(words[0x0a00 >> 6], u64::MAX, "10.0/16 … 10.63/16");
    }

    #[test]
    fn removal_clears_only_the_bits_no_other_network_needs() {
        let mut coverage = Coverage::of([net("10.0.0.0/8"), net("10.1.0.0/16")]);
        assert!(!coverage.add(net("10.1.0.0/16")), "counted once");
        // 10.1/16 is still needed by the /8.
        assert_eq!(coverage.remove(net("10.1.0.0/16")), vec![]);
        assert_eq!(coverage.remove(net("10.1.0.0/16")), vec![], "gone already");
        assert!(coverage.add(net("10.1.0.0/16")));
        // The /8's other 255 /16s go; 10.1/16 stays for the /16.
        let cleared = coverage.remove(net("10.0.0.0/8"));
        let bits: u32 = cleared.iter().map(|(_, m)| m.count_ones()).sum();
        assert_eq!(bits, 255);
        assert_eq!(cleared.len(), 4, "four words of 64 bits");
        assert_eq!(cleared[0], (0x0a00 >> 6, !(1 << 1)));
        assert_eq!(coverage.bitmap(), bitmap(&[net("10.1.0.0/16")]));
        assert_eq!(
            coverage.remove(net("10.1.0.0/16")),
            vec![(0x0a01 >> 6, 1 << 1)]
        );
        assert!(coverage.bitmap().iter().all(|w| *w == 0));
    }

    #[test]
    fn every_bit_is_cleared_once_all_networks_are_gone() {
        let nets: Vec<IpNet> = (0..200u32)
            .map(|i| {
                format!("{}.{}.0.0/{}", i % 7 + 1, i, 12 + i % 12)
                    .parse()
                    .unwrap()
            })
            .collect();
        let mut coverage = Coverage::of(nets.iter().copied());
        for (i, n) in nets.iter().enumerate() {
            coverage.remove(*n);
            assert_eq!(coverage.bitmap(), bitmap(&nets[i + 1..]), "after {n}");
        }
    }
}
