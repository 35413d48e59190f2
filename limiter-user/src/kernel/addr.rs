//! Conversions between std/ipnet addresses and the kernel's map keys: each
//! family has its own maps, keyed by the address bytes (IPv4 4, IPv6 16);
//! IPv4-mapped IPv6 addresses and networks are IPv4.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use limiter_common::{Ipv4Octets, Ipv6Octets};

/// Bits of the IPv4-mapped prefix `::ffff:0:0/96`.
const IPV4_MAPPED_PREFIX: u8 = 96;

/// An address as the kernel keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKey {
    V4(Ipv4Octets),
    V6(Ipv6Octets),
}

/// A network as the kernel's LPM tries key it.
#[derive(Clone, Copy)]
pub enum NetKey {
    V4(Key<Ipv4Octets>),
    V6(Key<Ipv6Octets>),
}

/// The kernel key of an address. IPv4-mapped IPv6 addresses are IPv4, as
/// the kernel judges them.
pub fn host_key(ip: IpAddr) -> HostKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => HostKey::V4(v4.octets()),
        IpAddr::V6(v6) => HostKey::V6(v6.octets()),
    }
}

/// The address of a kernel key.
pub fn host_ip(key: HostKey) -> IpAddr {
    match key {
        HostKey::V4(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        HostKey::V6(v6) => IpAddr::V6(Ipv6Addr::from(v6)),
    }
}

/// The std form of an address kept IPv4-mapped (`DropEvent::source`,
/// `TrackedSocket::source_key`): IPv4-mapped ones as IPv4.
pub fn ip_of_mapped(octets: Ipv6Octets) -> IpAddr {
    Ipv6Addr::from(octets).to_canonical()
}

/// The LPM key of a network (its host bits cleared).
pub fn net_key(net: IpNet) -> NetKey {
    match canonical(net) {
        IpNet::V4(n) => NetKey::V4(Key::new(u32::from(n.prefix_len()), n.network().octets())),
        IpNet::V6(n) => NetKey::V6(Key::new(u32::from(n.prefix_len()), n.network().octets())),
    }
}

/// The network of an IPv4 LPM key.
pub fn net_of_v4(key: &Key<Ipv4Octets>) -> IpNet {
    let prefix_len = key.prefix_len().min(32) as u8;
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(key.data()), prefix_len).expect("prefix ≤ 32"))
}

/// The network of an IPv6 LPM key.
pub fn net_of_v6(key: &Key<Ipv6Octets>) -> IpNet {
    let prefix_len = key.prefix_len().min(128) as u8;
    IpNet::V6(Ipv6Net::new(Ipv6Addr::from(key.data()), prefix_len).expect("prefix ≤ 128"))
}

/// `net` with host bits cleared, IPv4-mapped IPv6 networks as IPv4.
pub fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= IPV4_MAPPED_PREFIX => {
            match n.network().to_ipv4_mapped() {
                Some(v4) => IpNet::V4(
                    Ipv4Net::new(v4, n.prefix_len() - IPV4_MAPPED_PREFIX).expect("prefix ≤ 32"),
                ),
                None => IpNet::V6(n.trunc()),
            }
        }
        other => other.trunc(),
    }
}

/// Whether `net` names one address (a full-length prefix).
pub fn is_host(net: IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_keys_are_the_address_bytes() {
        let NetKey::V4(key) = net_key(net("192.0.2.77/24")) else {
            panic!("IPv4 network keyed as IPv6");
        };
        assert_eq!((key.prefix_len(), key.data()), (24, [192, 0, 2, 0]));
        assert_eq!(net_of_v4(&key), net("192.0.2.0/24"));
        assert_eq!(
            host_key("192.0.2.1".parse().unwrap()),
            HostKey::V4([192, 0, 2, 1])
        );
    }

    #[test]
    fn ipv6_keys_round_trip() {
        for s in ["2001:db8:1:2::/64", "2001:db8::1/128", "::/0", "fe80::/10"] {
            let NetKey::V6(key) = net_key(net(s)) else {
                panic!("{s} keyed as IPv4");
            };
            assert_eq!(net_of_v6(&key), net(s).trunc(), "{s}");
        }
        let v6: IpAddr = "2001:db8::66".parse().unwrap();
        assert_eq!(host_ip(host_key(v6)), v6);
    }

    #[test]
    fn mapped_and_plain_ipv4_are_the_same_source() {
        let v4: IpAddr = "198.51.100.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        assert_eq!(host_key(v4), host_key(mapped));
        assert_eq!(host_ip(host_key(mapped)), v4);
        assert_eq!(
            ip_of_mapped(limiter_common::ipv4_mapped([198, 51, 100, 9])),
            v4
        );
        assert_eq!(
            canonical(net("::ffff:198.51.100.0/120")),
            net("198.51.100.0/24")
        );
        assert!(matches!(
            net_key(net("::ffff:198.51.100.0/120")),
            NetKey::V4(_)
        ));
    }

    #[test]
    fn hosts_are_full_length_prefixes() {
        assert!(is_host(net("192.0.2.1/32")));
        assert!(is_host(net("2001:db8::1/128")));
        assert!(!is_host(net("2001:db8::/64")));
    }
}
