//! Header parsing: Ethernet (up to two VLAN tags), IPv4 (any IHL), IPv6 (with
//! extension headers), TCP. Every read is inside a [`window`], which checks
//! the bounds the verifier wants to see.
//!
//! Parsing stops in two places: before the source address is known (not IP,
//! or the IP header is cut short: nothing can be judged) and after it (the
//! rest cannot be read: a later fragment, a bad header, a chain longer than
//! the parser walks, not TCP). The second kind still carries the source, so
//! that a blocked source is dropped whatever its packets look like.

use core::arch::asm;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HDR_LEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV4_MIN_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
/// Extension headers followed before giving up; real traffic has one or two.
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// No legitimate header chain reaches this far into a packet; the bound also
/// keeps every offset small for the verifier.
pub(crate) const MAX_L4_OFFSET: usize = 512;

pub(crate) const TCP_MIN_HDR_LEN: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// A packet's source address as four words in memory order (the wire
/// bytes, each one load); IPv4 as IPv4-mapped IPv6, which is also how an
/// IPv4-mapped IPv6 source is judged: as the IPv4 address it carries.
///
/// Not an enum of the two families: the unused part of the smaller
/// variant is undefined, and LLVM then stores a register the verifier
/// knows to be uninitialised, which it refuses.
pub type Source = [u32; 4];

/// An IP packet whose source address could be read.
pub struct Packet {
    pub source: Source,
    /// Its TCP header; all zero when `unreadable` says why there is none.
    pub tcp: Tcp,
    /// Why the TCP header could not be judged; `None` = it was read.
    ///
    /// Not a `Result<Tcp, Skip>`: the payload of its error variant is
    /// undefined, and LLVM then packs whatever register it likes (a packet
    /// pointer, once) into it with shifts, which the verifier refuses.
    pub unreadable: Option<Skip>,
}

/// What the limiter needs from a TCP header.
pub struct Tcp {
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// SYN without ACK: a new connection.
    pub new_connection: bool,
}

/// Why a packet has no source address ([`parse`]'s error) or no [`Tcp`]
/// header ([`Packet::tcp`]).
pub enum Skip {
    /// Not IPv4/IPv6 (no source), or not TCP (with a source).
    NotTcp,
    /// The network's own plumbing, never judged: ICMP errors (about
    /// traffic this host sent: unreachable, fragmentation needed / packet
    /// too big, time exceeded, parameter problem) and IPv6 neighbour
    /// discovery. Dropping these for a blocked source would break the
    /// host's own traffic through a blocked router, or the whole link when
    /// a block covers a neighbour (or is `::/0`).
    Control,
    /// A non-first IP fragment: no TCP header to read.
    Fragment,
    /// The headers end past the data available.
    Truncated,
    /// A header field is invalid (bad IHL, endless extension headers).
    Malformed,
}

/// `base` passed through an `asm!` move: LLVM can no longer recompute it in
/// another way, so the pointer compared with `end` is the very register that
/// is read through, which is what the verifier needs to see. (An empty `asm!`
/// would do, but its line info then shares an instruction with the next
/// one, which the kernel refuses.)
#[inline(always)]
fn opaque(base: usize) -> usize {
    let mut base = base;
    // SAFETY: a register move; it only hides the value.
    unsafe { asm!("{0} = {0}", inout(reg) base, options(pure, nomem, nostack, preserves_flags)) };
    base
}

/// The packet pointer `start + offset`, if `len` bytes from there lie
/// before `end`.
#[inline(always)]
fn window(start: usize, end: usize, offset: usize, len: usize) -> Result<usize, Skip> {
    let at = opaque(start + offset);
    if at + len > end {
        return Err(Skip::Truncated);
    }
    Ok(at)
}

// Single loads of 1, 2 and 4 bytes at a constant offset from a packet
// pointer. Through `read_unaligned` LLVM splits 2- and 4-byte reads into
// single bytes (it cannot know that BPF allows unaligned packet reads), and
// an address assembled from bytes and stored byte by byte then costs a failed
// store-to-load forwarding when it is read back as a map key. Each returns
// the bytes in memory order as a native integer (like `read_unaligned`).
//
// SAFETY (all three): `at` is a packet pointer for which `window` checked
// that `OFF + size` bytes are readable.

#[inline(always)]
unsafe fn read_u8<const OFF: i16>(at: usize) -> u8 {
    let value: u64;
    unsafe {
        asm!("{0} = *(u8 *)({1} + {off})", lateout(reg) value, in(reg) at, off = const OFF,
            options(pure, readonly, nostack, preserves_flags))
    };
    value as u8
}

#[inline(always)]
unsafe fn read_u16<const OFF: i16>(at: usize) -> u16 {
    let value: u64;
    unsafe {
        asm!("{0} = *(u16 *)({1} + {off})", lateout(reg) value, in(reg) at, off = const OFF,
            options(pure, readonly, nostack, preserves_flags))
    };
    value as u16
}

#[inline(always)]
unsafe fn read_u32<const OFF: i16>(at: usize) -> u32 {
    let value: u64;
    unsafe {
        asm!("{0} = *(u32 *)({1} + {off})", lateout(reg) value, in(reg) at, off = const OFF,
            options(pure, readonly, nostack, preserves_flags))
    };
    value as u32
}

/// A big-endian `u16` at `offset` (variable) from `start`.
#[inline(always)]
fn load_be16(start: usize, end: usize, offset: usize) -> Result<u16, Skip> {
    let at = window(start, end, offset, 2)?;
    Ok(u16::from_be(unsafe { read_u16::<0>(at) }))
}

/// Parses the packet between `start` and `end` down to its TCP header and
/// hands the result to `judge` (an error means the source address could
/// not be read).
///
/// Each family's branch calls `judge` on its own: inlined there, the
/// decision sees the IPv4 source as the one word it is, instead of a merged
/// four-word address that LLVM keeps on the stack for both families.
#[inline(always)]
pub fn parse<R>(start: usize, end: usize, judge: impl Fn(Result<Packet, Skip>) -> R) -> R {
    let (ether_type, offset) = match ethernet(start, end) {
        Ok(found) => found,
        Err(skip) => return judge(Err(skip)),
    };
    match ether_type {
        ETH_P_IPV4 => match parse_ipv4(start, end, offset) {
            Ok((source, l4_offset)) => judge(Ok(packet(start, end, source, l4_offset))),
            Err(skip) => judge(Err(skip)),
        },
        ETH_P_IPV6 => match parse_ipv6(start, end, offset) {
            Ok((source, l4_offset)) => judge(Ok(packet(start, end, source, l4_offset))),
            Err(skip) => judge(Err(skip)),
        },
        _ => judge(Err(Skip::NotTcp)),
    }
}

/// The ether type after the VLAN tags, and the offset of the IP header.
#[inline(always)]
fn ethernet(start: usize, end: usize) -> Result<(u16, usize), Skip> {
    let mut ether_type = load_be16(start, end, 12)?;
    let mut offset = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = load_be16(start, end, offset + 2)?;
        offset += VLAN_HDR_LEN;
    }
    Ok((ether_type, offset))
}

/// The packet of `source`, with its TCP header at `l4_offset` (or why
/// there is none).
#[inline(always)]
fn packet(start: usize, end: usize, source: Source, l4_offset: Result<usize, Skip>) -> Packet {
    let (tcp, unreadable) = match l4_offset.and_then(|l4_offset| parse_tcp(start, end, l4_offset)) {
        Ok(tcp) => (tcp, None),
        Err(skip) => (
            Tcp {
                dst_port: 0,
                new_connection: false,
            },
            Some(skip),
        ),
    };
    Packet {
        source,
        tcp,
        unreadable,
    }
}

/// The TCP header at `offset`.
#[inline(always)]
fn parse_tcp(start: usize, end: usize, offset: usize) -> Result<Tcp, Skip> {
    let tcp = window(start, end, offset, TCP_MIN_HDR_LEN)?;
    // SAFETY: inside the checked window.
    let dst_port = u16::from_be(unsafe { read_u16::<2>(tcp) });
    // Data offset and flags; the flags are the second byte.
    let flags = unsafe { read_u16::<12>(tcp) }.to_ne_bytes()[1];
    Ok(Tcp {
        dst_port,
        new_connection: flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN,
    })
}

/// Returns the source and the offset of the TCP header (or why there is
/// none); an error if the source cannot be read.
#[inline(always)]
fn parse_ipv4(
    start: usize,
    end: usize,
    offset: usize,
) -> Result<(Source, Result<usize, Skip>), Skip> {
    let ip = window(start, end, offset, IPV4_MIN_HDR_LEN)?;
    // SAFETY (every read below): inside the checked window.
    let version_ihl = unsafe { read_u8::<0>(ip) };
    let total_len = u16::from_be(unsafe { read_u16::<2>(ip) }) as usize;
    let fragment = u16::from_be(unsafe { read_u16::<6>(ip) });
    let protocol = unsafe { read_u8::<9>(ip) };
    let source = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), unsafe {
        read_u32::<12>(ip)
    }];
    let ihl = (version_ihl & 0x0f) as usize;
    let l4 = if version_ihl >> 4 != 4 || ihl < 5 {
        Err(Skip::Malformed)
    } else if fragment & 0x1fff != 0 {
        // A first fragment (offset 0, more-fragments set) carries the TCP
        // header and is judged like any packet; later ones cannot be, and
        // reassembly discards them anyway when the first one was dropped.
        Err(Skip::Fragment)
    } else if protocol == IPPROTO_TCP && ihl * 4 + TCP_MIN_HDR_LEN > total_len {
        // The stack reads no further than the total length (the rest of
        // the frame is link-layer padding, trimmed): a first fragment
        // holding part of a TCP header gets the rest, flags included, from
        // the next fragment, whatever bytes follow it in its frame. (IPv6
        // needs no such check: Linux drops a first fragment that does not
        // hold the whole TCP header.)
        Err(Skip::Truncated)
    } else if protocol == IPPROTO_TCP {
        Ok(offset + ihl * 4)
    } else if protocol == IPPROTO_ICMP {
        // Destination unreachable, time exceeded, parameter problem.
        Err(icmp_kind(start, end, offset + ihl * 4, |t| {
            t == 3 || t == 11 || t == 12
        }))
    } else {
        Err(Skip::NotTcp)
    };
    Ok((source, l4))
}

/// Returns the source and the offset of the TCP header (or why there is
/// none), following extension headers; an error if the source cannot be
/// read.
#[inline(always)]
fn parse_ipv6(
    start: usize,
    end: usize,
    offset: usize,
) -> Result<(Source, Result<usize, Skip>), Skip> {
    let ip = window(start, end, offset, IPV6_HDR_LEN)?;
    // SAFETY: inside the checked window.
    let (next_header, words) = unsafe {
        (
            read_u8::<6>(ip),
            [
                read_u32::<8>(ip),
                read_u32::<12>(ip),
                read_u32::<16>(ip),
                read_u32::<20>(ip),
            ],
        )
    };
    Ok((
        words,
        ipv6_l4_offset(start, end, offset + IPV6_HDR_LEN, next_header),
    ))
}

/// What an ICMP (or ICMPv6) message at `offset` is: [`Skip::Control`] if
/// `control` says so of its type, else [`Skip::NotTcp`].
#[inline(always)]
fn icmp_kind(start: usize, end: usize, offset: usize, control: impl Fn(u8) -> bool) -> Skip {
    // Type and code read at once (see the extension headers below).
    match load_be16(start, end, offset) {
        Ok(type_code) if control(type_code.to_be_bytes()[0]) => Skip::Control,
        Ok(_) => Skip::NotTcp,
        Err(skip) => skip,
    }
}

/// Follows the extension headers from `offset` (where a header of type
/// `next_header` starts) to the TCP header; returns its offset.
#[inline(always)]
fn ipv6_l4_offset(start: usize, end: usize, offset: usize, next_header: u8) -> Result<usize, Skip> {
    let (mut offset, mut next_header) = (offset, next_header);
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next_header == IPPROTO_TCP {
            return Ok(offset);
        }
        if next_header == IPPROTO_ICMPV6 {
            // Errors are types 1..=127; router and neighbour solicitation
            // and advertisement, and redirect, 133..=137.
            return Err(icmp_kind(start, end, offset, |t| {
                t < 128 || (133..=137).contains(&t)
            }));
        }
        // Every extension header starts with its next header and its length.
        // Two bytes read at once: for a one-byte read at a variable offset
        // LLVM may turn `p + 1 > end` into `p >= end`, from which the
        // verifier learns no readable range.
        let [following, len] = load_be16(start, end, offset)?.to_be_bytes();
        let header_len = match next_header {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => (len as usize + 1) * 8,
            IPPROTO_AH => (len as usize + 2) * 4,
            IPPROTO_FRAGMENT => {
                if load_be16(start, end, offset + 2)? >> 3 != 0 {
                    return Err(Skip::Fragment);
                }
                8
            }
            _ => return Err(Skip::NotTcp),
        };
        next_header = following;
        offset += header_len;
        if offset > MAX_L4_OFFSET {
            return Err(Skip::Malformed);
        }
    }
    if next_header == IPPROTO_TCP {
        Ok(offset)
    } else {
        Err(Skip::Malformed)
    }
}
