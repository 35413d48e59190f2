//! The prefilter bitmaps of the LPM tries (`NET_HINTS`, see
//! `limiter_common::hint`): which bits a network needs, and the whole
//! bitmap of a trie's entries.

use std::ops::RangeInclusive;

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
}
