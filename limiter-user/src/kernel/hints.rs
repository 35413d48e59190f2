//! The IPv4 /16 prefilter bitmaps of the LPM tries (`NET_HINTS`, see
//! `limiter_common::hint`): which bits a network needs, and the whole
//! bitmap of a trie's entries.

use std::ops::RangeInclusive;

use ipnet::IpNet;
use limiter_common::hint;

use super::addr::canonical;

/// The /16 indexes (0..=65535) a network may cover, if it covers IPv4 space.
pub fn slash16_range(net: IpNet) -> Option<RangeInclusive<u32>> {
    match canonical(net) {
        IpNet::V4(n) => {
            let start = u32::from(n.network()) >> 16;
            let count = if n.prefix_len() >= 16 {
                1
            } else {
                1u32 << (16 - n.prefix_len())
            };
            Some(start..=start + count - 1)
        }
        // An IPv6 network covers IPv4-mapped space only if it contains all
        // of ::ffff:0:0/96 (a smaller one would have been made IPv4 above).
        IpNet::V6(n) => {
            let mapped = std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped();
            (n.prefix_len() <= 96 && n.contains(&mapped)).then_some(0..=65_535)
        }
    }
}

/// The bitmap (`hint::WORDS` words) of a set of networks.
pub fn bitmap<'a>(nets: impl IntoIterator<Item = &'a IpNet>) -> Vec<u64> {
    let mut words = vec![0u64; hint::WORDS as usize];
    for net in nets {
        if let Some(range) = slash16_range(*net) {
            for slash16 in range {
                words[(slash16 >> 6) as usize] |= 1u64 << (slash16 & 63);
            }
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_of_ipv4_and_ipv6_networks() {
        assert_eq!(slash16_range(net("192.0.2.0/24")), Some(0xc000..=0xc000));
        assert_eq!(slash16_range(net("10.0.0.0/8")), Some(0x0a00..=0x0aff));
        assert_eq!(slash16_range(net("0.0.0.0/0")), Some(0..=65_535));
        assert_eq!(
            slash16_range(net("::ffff:198.51.100.0/120")),
            Some(0xc633..=0xc633)
        );
        assert_eq!(
            slash16_range(net("::/0")),
            Some(0..=65_535),
            "covers every IPv4-mapped source"
        );
        assert_eq!(slash16_range(net("2001:db8::/32")), None);
    }

    #[test]
    fn bitmap_sets_exactly_the_covered_bits() {
        let words = bitmap(&[net("192.0.2.0/24"), net("10.0.0.0/8")]);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1 + 256);
        assert_ne!(words[0xc000 >> 6] & 1, 0);
        assert_eq!(words[0x0a00 >> 6], u64::MAX, "10.0/16 … 10.63/16");
    }
}
