//! Header parsing: Ethernet (up to two VLAN tags), IPv4 (any IHL), IPv6 (with
//! extension headers), TCP. Every read goes through [`load`], which checks the
//! bounds the verifier wants to see.

use core::mem::size_of;

use limiter_common::Addr;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HDR_LEN: usize = 4;
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPV6_HDR_LEN: usize = 40;
/// Extension headers followed before giving up; real traffic has one or two.
const MAX_IPV6_EXT_HEADERS: usize = 8;
/// No legitimate header chain reaches this far into a packet; the bound also
/// keeps every offset small for the verifier.
const MAX_L4_OFFSET: usize = 512;

const TCP_MIN_HDR_LEN: usize = 20;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// What the limiter needs from a TCP packet.
pub struct TcpHeaders {
    pub source: Addr,
    /// Destination port, host byte order.
    pub dst_port: u16,
    /// SYN without ACK: a new connection.
    pub new_connection: bool,
}

/// Why a packet has no [`TcpHeaders`].
pub enum Skip {
    /// Not IPv4/IPv6 TCP.
    NotTcp,
    /// A non-first IP fragment: no TCP header to read.
    Fragment,
    /// The headers end past the data available.
    Truncated,
    /// A header field is invalid (bad IHL, endless extension headers).
    Malformed,
}

/// Reads a `T` at `offset` from `start`, if it lies before `end`.
#[inline(always)]
fn load<T: Copy>(start: usize, end: usize, offset: usize) -> Result<T, Skip> {
    // The verifier learns the readable range of the pointer it sees compared
    // with `end`. Without the opaque copy LLVM may compare one pointer and
    // read through another computed differently (e.g. `(start + 12) + off`),
    // which the verifier then refuses.
    let at = core::hint::black_box(start + offset);
    if at + size_of::<T>() > end {
        return Err(Skip::Truncated);
    }
    // SAFETY: the range was checked against the packet's end just above.
    Ok(unsafe { core::ptr::read_unaligned(at as *const T) })
}

#[inline(always)]
fn load_be16(start: usize, end: usize, offset: usize) -> Result<u16, Skip> {
    load::<[u8; 2]>(start, end, offset).map(u16::from_be_bytes)
}

/// Parses the packet between `start` and `end` down to its TCP header.
#[inline(always)]
pub fn parse(start: usize, end: usize) -> Result<TcpHeaders, Skip> {
    let mut ether_type = load_be16(start, end, 12)?;
    let mut offset = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        ether_type = load_be16(start, end, offset + 2)?;
        offset += VLAN_HDR_LEN;
    }
    let (source, l4_offset) = match ether_type {
        ETH_P_IPV4 => parse_ipv4(start, end, offset)?,
        ETH_P_IPV6 => parse_ipv6(start, end, offset)?,
        _ => return Err(Skip::NotTcp),
    };
    if start + l4_offset + TCP_MIN_HDR_LEN > end {
        return Err(Skip::Truncated);
    }
    let dst_port = load_be16(start, end, l4_offset + 2)?;
    // Data offset and flags. Loads at variable offsets are at least two bytes
    // wide: for one byte LLVM may turn `p + 1 > end` into `p >= end`, from
    // which the verifier learns no readable range.
    let [_, flags] = load::<[u8; 2]>(start, end, l4_offset + 12)?;
    Ok(TcpHeaders {
        source,
        dst_port,
        new_connection: flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN,
    })
}

/// Returns the source and the offset of the TCP header.
#[inline(always)]
fn parse_ipv4(start: usize, end: usize, offset: usize) -> Result<(Addr, usize), Skip> {
    let version_ihl: u8 = load(start, end, offset)?;
    let ihl = (version_ihl & 0x0f) as usize;
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Skip::Malformed);
    }
    // A first fragment (offset 0, more-fragments set) carries the TCP header
    // and is judged like any packet; later ones cannot be, and reassembly
    // discards them anyway when the first one was dropped.
    if load_be16(start, end, offset + 6)? & 0x1fff != 0 {
        return Err(Skip::Fragment);
    }
    let protocol: u8 = load(start, end, offset + 9)?;
    if protocol != IPPROTO_TCP {
        return Err(Skip::NotTcp);
    }
    let saddr: u32 = load(start, end, offset + 12)?;
    Ok((Addr::from_ipv4_word(saddr), offset + ihl * 4))
}

/// Returns the source and the offset of the TCP header, following extension
/// headers.
#[inline(always)]
fn parse_ipv6(start: usize, end: usize, offset: usize) -> Result<(Addr, usize), Skip> {
    let mut next_header: u8 = load(start, end, offset + 6)?;
    let words: [u32; 4] = load(start, end, offset + 8)?;
    let mut offset = offset + IPV6_HDR_LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if next_header == IPPROTO_TCP {
            return Ok((Addr { words }, offset));
        }
        // Every extension header starts with its next header and its length.
        let [following, len] = load::<[u8; 2]>(start, end, offset)?;
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
        Ok((Addr { words }, offset))
    } else {
        Err(Skip::Malformed)
    }
}
