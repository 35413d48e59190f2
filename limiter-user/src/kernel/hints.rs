//! The prefilter bitmaps of the LPM tries (`NET_HINTS` and
//! `NET_HINTS_FINE`, see `limiter_common::hint`): which bits a network
//! needs in each of its trie's three bitmaps, the bitmaps of a trie's
//! entries, and the count of networks behind each bit that lets a removal
//! clear exactly the bits no other network needs.

use std::{collections::HashSet, ops::RangeInclusive};

use ipnet::IpNet;
use limiter_common::hint;

use super::addr::canonical;

/// One of the three bitmaps behind each trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// `NET_HINTS`: some entry covers addresses of this /16.
    Any,
    /// `NET_HINTS_FINE`'s *short*: an entry shorter than the fine prefix
    /// covers addresses of this /16.
    Short,
    /// `NET_HINTS_FINE`'s *fine*: an entry of the fine prefix or longer lies
    /// in a fine-prefix network with this [`hint::fine_index`].
    Fine,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Any, Layer::Short, Layer::Fine];
}

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

/// The *fine* bit of `net`, if it is of its family's fine prefix or longer.
fn fine_bit(net: IpNet) -> Option<u32> {
    let network = match canonical(net) {
        IpNet::V4(n) if n.prefix_len() >= hint::FINE_PREFIX_V4 => {
            u64::from(u32::from(n.network()) >> (32 - hint::FINE_PREFIX_V4))
        }
        IpNet::V6(n) if n.prefix_len() >= hint::FINE_PREFIX_V6 => {
            (u128::from(n.network()) >> (128 - hint::FINE_PREFIX_V6)) as u64
        }
        _ => return None,
    };
    Some(u32::from(hint::fine_index(network)))
}

/// The bits `net` needs in bitmap `layer` (each in 0..=65535).
pub fn bits(net: IpNet, layer: Layer) -> Vec<u32> {
    match (layer, fine_bit(net)) {
        (Layer::Any, _) | (Layer::Short, None) => top16_range(net).collect(),
        (Layer::Short, Some(_)) | (Layer::Fine, None) => Vec::new(),
        (Layer::Fine, Some(bit)) => vec![bit],
    }
}

/// Bits as (word offset in a bitmap, mask), one entry per word, in order of
/// the bits given.
fn words(bits: impl IntoIterator<Item = u32>) -> Vec<(u32, u64)> {
    let mut words: Vec<(u32, u64)> = Vec::new();
    for bit in bits {
        let (word, mask) = (bit >> 6, 1u64 << (bit & 63));
        match words.last_mut() {
            Some((w, m)) if *w == word => *m |= mask,
            _ => words.push((word, mask)),
        }
    }
    words
}

/// The words `net` needs set in bitmap `layer`, as (word offset, mask).
pub fn words_of(net: IpNet, layer: Layer) -> Vec<(u32, u64)> {
    words(bits(net, layer))
}

/// Bitmap `layer` (`hint::WORDS` words) of a set of networks of one family.
pub fn bitmap<'a>(nets: impl IntoIterator<Item = &'a IpNet>, layer: Layer) -> Vec<u64> {
    let mut words = vec![0u64; hint::WORDS as usize];
    for net in nets {
        for bit in bits(*net, layer) {
            words[(bit >> 6) as usize] |= 1u64 << (bit & 63);
        }
    }
    words
}

/// The networks of one trie as this process last saw them, with how many
/// need each bit of each layer. Removing a network then clears the bits it
/// alone needed, in time proportional to its /16s, not to the trie's size
/// (a walk of the trie per removal made removing many networks quadratic).
#[derive(Debug, Default)]
pub struct Coverage {
    nets: HashSet<IpNet>,
    /// Networks needing each bit, per layer; empty until the first network.
    counts: [Vec<u32>; 3],
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
        for (layer, counts) in Layer::ALL.into_iter().zip(&mut self.counts) {
            if counts.is_empty() {
                *counts = vec![0; 65_536];
            }
            for bit in bits(net, layer) {
                let count = &mut counts[bit as usize];
                *count = count.saturating_add(1);
            }
        }
        true
    }

    /// Forgets `net`; returns the bits no network needs any more, as
    /// (layer, word offset in its bitmap, mask of bits to clear), empty if
    /// `net` was not counted.
    pub fn remove(&mut self, net: IpNet) -> Vec<(Layer, u32, u64)> {
        let net = canonical(net);
        if !self.nets.remove(&net) {
            return Vec::new();
        }
        let mut cleared = Vec::new();
        for (layer, counts) in Layer::ALL.into_iter().zip(&mut self.counts) {
            let freed = bits(net, layer).into_iter().filter(|bit| {
                let count = &mut counts[*bit as usize];
                *count = count.saturating_sub(1);
                *count == 0
            });
            let freed: Vec<u32> = freed.collect();
            cleared.extend(words(freed).into_iter().map(|(w, m)| (layer, w, m)));
        }
        cleared
    }

    /// Bitmap `layer` of the counted networks.
    pub fn bitmap(&self, layer: Layer) -> Vec<u64> {
        bitmap(&self.nets, layer)
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
        let nets = [net("192.0.2.0/24"), net("10.0.0.0/8")];
        let words = bitmap(&nets, Layer::Any);
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 1 + 256);
        assert_ne!(words[0xc000 >> 6] & 1, 0);
        assert_eq!(words[0x0a00 >> 6], u64::MAX, "10.0/16 … 10.63/16");
        // The /8 is short: its /16s; the /24 is fine: one bit of its own.
        let short = bitmap(&nets, Layer::Short);
        assert_eq!(short.iter().map(|w| w.count_ones()).sum::<u32>(), 256);
        assert_eq!(short[0xc000 >> 6] & 1, 0, "192.0/16 holds no short entry");
        let fine = bitmap(&nets, Layer::Fine);
        assert_eq!(fine.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
        let bit = u32::from(hint::fine_index(0x00c0_0002));
        assert_ne!(fine[(bit >> 6) as usize] & (1 << (bit & 63)), 0);
    }

    #[test]
    fn entries_of_the_fine_prefix_or_longer_take_the_bit_of_their_fine_network() {
        // IPv4: a /24 and the /28 and /32 inside it share a bit; a /23 is
        // short. IPv6: a /48, the /64 of a source inside it, an
        // IPv4-mapped /120 counts as the IPv4 /24.
        let v4 = hint::fine_index(0x00c6_3364);
        for n in ["198.51.100.0/24", "198.51.100.16/28", "198.51.100.77/32"] {
            assert_eq!(bits(net(n), Layer::Fine), vec![u32::from(v4)], "{n}");
            assert_eq!(bits(net(n), Layer::Short), Vec::<u32>::new(), "{n}");
        }
        assert_eq!(
            bits(net("::ffff:198.51.100.0/120"), Layer::Fine),
            vec![u32::from(v4)]
        );
        assert_eq!(bits(net("198.51.100.0/23"), Layer::Fine), Vec::<u32>::new());
        assert_eq!(bits(net("198.51.100.0/23"), Layer::Short), vec![0xc633]);
        let v6 = hint::fine_index(0x2001_0db8_0bad);
        for n in [
            "2001:db8:bad::/48",
            "2001:db8:bad:7::/64",
            "2001:db8:bad::1/128",
        ] {
            assert_eq!(bits(net(n), Layer::Fine), vec![u32::from(v6)], "{n}");
        }
        assert_eq!(bits(net("2001:db8:ba0::/44"), Layer::Short), vec![0x2001]);
        // Every entry keeps its /16's bit in the first layer.
        assert_eq!(bits(net("2001:db8:bad:7::/64"), Layer::Any), vec![0x2001]);
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
        let any: Vec<(u32, u64)> = cleared
            .iter()
            .filter(|(layer, _, _)| *layer == Layer::Any)
            .map(|(_, w, m)| (*w, *m))
            .collect();
        let bits: u32 = any.iter().map(|(_, m)| m.count_ones()).sum();
        assert_eq!(bits, 255);
        assert_eq!(any.len(), 4, "four words of 64 bits");
        assert_eq!(any[0], (0x0a00 >> 6, !(1 << 1)));
        for layer in Layer::ALL {
            assert_eq!(
                coverage.bitmap(layer),
                bitmap(&[net("10.1.0.0/16")], layer),
                "{layer:?}"
            );
        }
        assert_eq!(
            coverage.remove(net("10.1.0.0/16")),
            vec![
                (Layer::Any, 0x0a01 >> 6, 1 << 1),
                (Layer::Short, 0x0a01 >> 6, 1 << 1)
            ]
        );
        for layer in Layer::ALL {
            assert!(coverage.bitmap(layer).iter().all(|w| *w == 0));
        }
    }

    #[test]
    fn a_fine_bit_stays_while_another_network_of_its_fine_network_needs_it() {
        let mut coverage = Coverage::of([net("192.0.2.0/24"), net("192.0.2.8/29")]);
        let bit = u32::from(hint::fine_index(0x00c0_0002));
        let cleared = coverage.remove(net("192.0.2.0/24"));
        assert_eq!(cleared, vec![], "the /29 needs both bits");
        let cleared = coverage.remove(net("192.0.2.8/29"));
        assert_eq!(
            cleared,
            vec![
                (Layer::Any, 0xc000 >> 6, 1),
                (Layer::Fine, bit >> 6, 1 << (bit & 63))
            ]
        );
    }

    #[test]
    fn every_bit_is_cleared_once_all_networks_are_gone() {
        let nets: Vec<IpNet> = (0..200u32)
            .map(|i| {
                format!("{}.{}.{}.0/{}", i % 7 + 1, i, i % 3, 12 + i % 17)
                    .parse::<IpNet>()
                    .unwrap()
                    .trunc()
            })
            .collect();
        let mut coverage = Coverage::of(nets.iter().copied());
        for (i, n) in nets.iter().enumerate() {
            coverage.remove(*n);
            for layer in Layer::ALL {
                assert_eq!(
                    coverage.bitmap(layer),
                    bitmap(&nets[i + 1..], layer),
                    "after {n}, {layer:?}"
                );
            }
        }
    }
}
