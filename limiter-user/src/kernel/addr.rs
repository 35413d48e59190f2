//! Conversions between std/ipnet addresses and the kernel's 16-byte form
//! (IPv4 mapped into IPv6; IPv4 prefixes offset by 96 bits).

use std::net::{IpAddr, Ipv6Addr};

use aya::maps::lpm_trie::Key;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use limiter_common::{Addr, IPV4_MAPPED_PREFIX};

/// The kernel form of an address. IPv4-mapped IPv6 addresses and IPv4
/// addresses become the same key, as the kernel sees them alike.
pub fn addr_of(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Addr::from_octets(v6.octets())
}

/// The std form of a kernel address (IPv4-mapped ones as IPv4).
pub fn ip_of(addr: Addr) -> IpAddr {
    Ipv6Addr::from(addr.octets()).to_canonical()
}

/// The LPM key of a network (its host bits cleared).
pub fn lpm_key(net: IpNet) -> Key<Addr> {
    let net = canonical(net);
    let prefix_len = match net {
        IpNet::V4(n) => IPV4_MAPPED_PREFIX + u32::from(n.prefix_len()),
        IpNet::V6(n) => u32::from(n.prefix_len()),
    };
    Key::new(prefix_len, addr_of(net.network()))
}

/// The network of an LPM key.
pub fn net_of(key: &Key<Addr>) -> IpNet {
    let addr = key.data();
    let prefix_len = key.prefix_len().min(128);
    match ip_of(addr) {
        IpAddr::V4(v4) if prefix_len >= IPV4_MAPPED_PREFIX => IpNet::V4(
            Ipv4Net::new(v4, (prefix_len - IPV4_MAPPED_PREFIX) as u8).expect("prefix ≤ 32"),
        ),
        _ => IpNet::V6(
            Ipv6Net::new(Ipv6Addr::from(addr.octets()), prefix_len as u8).expect("prefix ≤ 128"),
        ),
    }
}

/// `net` with host bits cleared, IPv4-mapped IPv6 networks as IPv4.
pub fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= IPV4_MAPPED_PREFIX as u8 => {
            match n.network().to_ipv4_mapped() {
                Some(v4) => IpNet::V4(
                    Ipv4Net::new(v4, n.prefix_len() - IPV4_MAPPED_PREFIX as u8)
                        .expect("prefix ≤ 32"),
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

/// The network a source is counted under: IPv4 /32, IPv6 its prefix.
pub fn source_net(addr: Addr) -> IpNet {
    match ip_of(addr) {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::from(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_are_offset_by_96_bits() {
        let key = lpm_key("192.0.2.77/24".parse().unwrap());
        assert_eq!(key.prefix_len(), 120);
        assert_eq!(net_of(&key), "192.0.2.0/24".parse::<IpNet>().unwrap());
    }

    #[test]
    fn ipv6_keys_round_trip() {
        for net in ["2001:db8:1:2::/64", "2001:db8::1/128", "::/0", "fe80::/10"] {
            let net: IpNet = net.parse().unwrap();
            assert_eq!(net_of(&lpm_key(net)), net.trunc(), "{net}");
        }
    }

    #[test]
    fn mapped_and_plain_ipv4_are_the_same_source() {
        let v4: IpAddr = "198.51.100.9".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.51.100.9".parse().unwrap();
        assert_eq!(addr_of(v4), addr_of(mapped));
        assert_eq!(ip_of(addr_of(mapped)), v4);
        assert_eq!(
            canonical("::ffff:198.51.100.0/120".parse().unwrap()),
            "198.51.100.0/24".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn hosts_are_full_length_prefixes() {
        assert!(is_host("192.0.2.1/32".parse().unwrap()));
        assert!(is_host("2001:db8::1/128".parse().unwrap()));
        assert!(!is_host("2001:db8::/64".parse().unwrap()));
    }
}
