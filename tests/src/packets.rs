//! Hand-built frames for `BPF_PROG_TEST_RUN`: Ethernet with optional VLAN
//! tags, IPv4 (options, fragments) or IPv6 (extension headers), TCP.
//! Checksums are left zero: the programs under test never read them.

use std::net::IpAddr;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const SYN_ACK: u8 = SYN | ACK;

/// An IPv6 extension header to put between the fixed header and TCP.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// A fragment header with this fragment offset (in 8-byte units).
    Fragment {
        offset: u16,
    },
    Ah,
    /// A destination options header of `(units + 1) * 8` bytes, filled with
    /// options of an unknown type that a receiver skips (type 0x1e), as
    /// Linux accepts them (at most 8 options, no padding longer than 7
    /// bytes): up to 2 KiB.
    LongDestOpts {
        units: u8,
    },
}

/// A frame to build.
#[derive(Clone, Debug)]
pub struct Frame {
    pub source: IpAddr,
    pub dest_port: u16,
    pub tcp_flags: u8,
    /// VLAN tags (outer first), each a TPID: 0x8100 or 0x88a8.
    pub vlans: Vec<u16>,
    /// IPv4 options length in 32-bit words (IHL = 5 + this).
    pub ipv4_option_words: u8,
    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    pub ipv4_fragment: (u16, bool),
    pub ipv6_ext: Vec<Ext>,
    /// Replace the IP protocol / last next-header (e.g. 17 for UDP).
    pub l4_protocol: u8,
    /// How much of the 20-byte TCP header the packet carries (less for
    /// the first IP fragment of a header split across fragments).
    pub tcp_bytes: usize,
}

impl Frame {
    /// A TCP SYN from `source` to `dest_port`.
    pub fn syn(source: IpAddr, dest_port: u16) -> Self {
        Self {
            source,
            dest_port,
            tcp_flags: SYN,
            vlans: Vec::new(),
            ipv4_option_words: 0,
            ipv4_fragment: (0, false),
            ipv6_ext: Vec::new(),
            l4_protocol: 6,
            tcp_bytes: 20,
        }
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.tcp_flags = flags;
        self
    }

    pub fn vlan(mut self, tpid: u16) -> Self {
        self.vlans.push(tpid);
        self
    }

    pub fn ipv4_options(mut self, words: u8) -> Self {
        self.ipv4_option_words = words;
        self
    }

    pub fn ipv4_fragment(mut self, offset: u16, more: bool) -> Self {
        self.ipv4_fragment = (offset, more);
        self
    }

    pub fn ext(mut self, ext: Ext) -> Self {
        self.ipv6_ext.push(ext);
        self
    }

    /// Carries only the first `bytes` of the TCP header (the IP lengths
    /// say so too): with [`Self::ipv4_fragment`]`(0, true)`, the first
    /// fragment of a header split across fragments.
    pub fn tcp_bytes(mut self, bytes: usize) -> Self {
        self.tcp_bytes = bytes.min(20);
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.l4_protocol = protocol;
        self
    }

    /// How many bytes of [`Self::build`] a parser needs to read the source
    /// address: Ethernet, the VLAN tags and the fixed IP header (IPv4
    /// without options, IPv6 without extension headers).
    pub fn source_readable_len(&self) -> usize {
        let ip_header = if self.source.is_ipv4() { 20 } else { 40 };
        14 + 4 * self.vlans.len() + ip_header
    }

    /// Where the TCP header starts in [`Self::build`].
    pub fn tcp_offset(&self) -> usize {
        let ip_header = match self.source {
            IpAddr::V4(_) => 20 + 4 * usize::from(self.ipv4_option_words),
            IpAddr::V6(_) => {
                40 + self
                    .ipv6_ext
                    .iter()
                    .map(|e| ext_bytes(*e, 0).len())
                    .sum::<usize>()
            }
        };
        14 + 4 * self.vlans.len() + ip_header
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // destination MAC
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // source MAC
        let ether_type: u16 = if self.source.is_ipv4() {
            0x0800
        } else {
            0x86dd
        };
        // Each tag is its TPID then its TCI (VLAN id 100 + i); the ether type
        // of the payload follows the last tag.
        for (i, tpid) in self.vlans.iter().enumerate() {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&(100u16 + i as u16).to_be_bytes());
        }
        f.extend_from_slice(&ether_type.to_be_bytes());
        match self.source {
            IpAddr::V4(src) => {
                let ihl = 5 + self.ipv4_option_words;
                let total_len = u16::from(ihl) * 4 + self.tcp_bytes as u16;
                f.push(0x40 | ihl);
                f.push(0);
                f.extend_from_slice(&total_len.to_be_bytes());
                f.extend_from_slice(&[0x12, 0x34]); // id
                let (offset, more) = self.ipv4_fragment;
                let frag = (offset & 0x1fff) | if more { 0x2000 } else { 0 };
                f.extend_from_slice(&frag.to_be_bytes());
                f.push(64); // TTL
                f.push(self.l4_protocol);
                f.extend_from_slice(&[0, 0]); // checksum
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&[10, 199, 0, 1]);
                // NOP options.
                f.extend(std::iter::repeat_n(
                    1u8,
                    usize::from(self.ipv4_option_words) * 4,
                ));
            }
            IpAddr::V6(src) => {
                let ext_len: usize = self.ipv6_ext.iter().map(|e| ext_bytes(*e, 0).len()).sum();
                f.extend_from_slice(&[0x60, 0, 0, 0]);
                f.extend_from_slice(&((ext_len + self.tcp_bytes) as u16).to_be_bytes());
                let first = self
                    .ipv6_ext
                    .first()
                    .map_or(self.l4_protocol, |e| ext_number(*e));
                f.push(first);
                f.push(64);
                f.extend_from_slice(&src.octets());
                f.extend_from_slice(&[0xfd, 0, 1, 0x99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
                for (i, ext) in self.ipv6_ext.iter().enumerate() {
                    let next = self
                        .ipv6_ext
                        .get(i + 1)
                        .map_or(self.l4_protocol, |e| ext_number(*e));
                    f.extend_from_slice(&ext_bytes(*ext, next));
                }
            }
        }
        // TCP header, 20 bytes.
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&self.dest_port.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1]); // seq
        f.extend_from_slice(&[0, 0, 0, 0]); // ack
        f.push(5 << 4);
        f.push(self.tcp_flags);
        f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
        f.truncate(f.len() - (20 - self.tcp_bytes));
        f
    }
}

fn ext_number(ext: Ext) -> u8 {
    match ext {
        Ext::HopByHop => 0,
        Ext::Routing => 43,
        Ext::DestOpts => 60,
        Ext::Fragment { .. } => 44,
        Ext::Ah => 51,
        Ext::LongDestOpts { .. } => 60,
    }
}

fn ext_bytes(ext: Ext, next: u8) -> Vec<u8> {
    match ext {
        // 16 bytes: length field 1 (in 8-byte units, not counting the first 8).
        Ext::HopByHop | Ext::DestOpts => {
            let mut h = vec![next, 1];
            h.extend_from_slice(&[1, 12]); // PadN option covering the rest
            h.extend(std::iter::repeat_n(0u8, 12));
            h
        }
        Ext::Routing => {
            let mut h = vec![next, 0, 0, 0];
            h.extend_from_slice(&[0; 4]);
            h
        }
        Ext::Fragment { offset } => {
            let mut h = vec![next, 0];
            h.extend_from_slice(&(offset << 3).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 1]);
            h
        }
        // 12 bytes of ICV: length field (in 4-byte units, minus 2) = 4 → 24 bytes.
        Ext::Ah => {
            let mut h = vec![next, 4, 0, 0];
            h.extend(std::iter::repeat_n(0u8, 20));
            h
        }
        Ext::LongDestOpts { units } => {
            let mut h = vec![next, units];
            // The rest shared evenly by as few options as fit it (each at
            // most 257 bytes: type, length, 255 of data), so no padding:
            // 2 046 bytes at most, eight options.
            let mut left = (usize::from(units) + 1) * 8 - 2;
            let options = left.div_ceil(257);
            for i in (0..options).rev() {
                let take = left / (i + 1);
                h.extend_from_slice(&[0x1e, (take - 2) as u8]);
                h.extend(std::iter::repeat_n(0u8, take - 2));
                left -= take;
            }
            h
        }
    }
}
