//! The client identity the backend is told (`proxy::identity`): PROXY v2
//! and v1 headers and Postfix's XCLIENT command, for arbitrary addresses
//! and HELO names.
//!
//! Input: `[flags: u8] [client: 16 bytes] [client port: u16 BE]
//! [local: 16 bytes] [local port: u16 BE] HELO-bytes`. Flag bit 0 makes the
//! client IPv4 (the first 4 address bytes), bit 1 the local end; bit 2
//! says whether there is a HELO; bit 3 ESMTP. The HELO is taken as UTF-8
//! (lossily); flow info and scope id of IPv6 ends come from the flags too.
//!
//! Asserts, decoding each output with an independent parser:
//! * v2: the signature, version/command, family and length bytes agree;
//!   the addresses and ports decode to the inputs (IPv4-mapped IPv6
//!   normalised, mixed families written as IPv6);
//! * v1: one line, CRLF-terminated, at most 107 bytes (the spec's bound),
//!   `PROXY TCP4|TCP6 src dst sport dport` whose fields parse back;
//! * XCLIENT: one CRLF-terminated line of printable ASCII, no CR/LF/NUL
//!   inside, `ADDR` and `PORT` decode to the client, `HELO` xtext-decodes
//!   to the HELO name exactly, and the line is bounded by 3 bytes per HELO
//!   byte plus a constant.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use libfuzzer_sys::fuzz_target;
use limiter_user::proxy::identity::{proxy_v1_header, proxy_v2_header, xclient_command};

fuzz_target!(|data: &[u8]| {
    if data.len() < 37 {
        return;
    }
    let flags = data[0];
    let end = |bytes: &[u8], v4: bool| -> SocketAddr {
        let port = u16::from_be_bytes([bytes[16], bytes[17]]);
        if v4 {
            let ip = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
            SocketAddr::new(IpAddr::V4(ip), port)
        } else {
            let octets: [u8; 16] = bytes[..16].try_into().unwrap();
            let scope = u32::from(flags >> 4);
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(octets),
                port,
                scope,
                scope,
            ))
        }
    };
    let client = end(&data[1..19], flags & 1 != 0);
    let local = end(&data[19..37], flags & 2 != 0);
    let helo_text = String::from_utf8_lossy(&data[37..]).into_owned();
    let helo = (flags & 4 != 0).then_some(helo_text.as_str());
    let esmtp = flags & 8 != 0;

    // What the backend should learn: canonical addresses, one family.
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (c, l) = (canon(client), canon(local));
    let (want_client, want_local) = if c.is_ipv4() == l.is_ipv4() {
        (c, l)
    } else {
        let v6 = |a: SocketAddr| match a.ip() {
            IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
            IpAddr::V6(_) => a,
        };
        (v6(c), v6(l))
    };

    check_v2(&proxy_v2_header(client, local), want_client, want_local);
    check_v1(&proxy_v1_header(client, local), want_client, want_local);
    check_xclient(&xclient_command(client, helo, esmtp), client, helo, esmtp);
});

fn check_v2(h: &[u8], client: SocketAddr, local: SocketAddr) {
    assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(h[12], 0x21, "version 2, PROXY");
    let len = usize::from(u16::from_be_bytes([h[14], h[15]]));
    assert_eq!(h.len(), 16 + len, "length field");
    let (src, dst, ports) = match h[13] {
        0x11 => {
            assert_eq!(len, 12);
            let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&h[o..o + 4]).unwrap());
            (a(16), a(20), 24)
        }
        0x21 => {
            assert_eq!(len, 36);
            let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&h[o..o + 16]).unwrap());
            (a(16), a(32), 48)
        }
        other => panic!("family/protocol byte {other:#x}"),
    };
    let sport = u16::from_be_bytes([h[ports], h[ports + 1]]);
    let dport = u16::from_be_bytes([h[ports + 2], h[ports + 3]]);
    assert_eq!(SocketAddr::new(src, sport), client);
    assert_eq!(SocketAddr::new(dst, dport), local);
}

fn check_v1(h: &[u8], client: SocketAddr, local: SocketAddr) {
    assert!(
        h.len() <= 107,
        "a v1 line is at most 107 bytes: {}",
        h.len()
    );
    let text = std::str::from_utf8(h).expect("ASCII");
    let line = text.strip_suffix("\r\n").expect("CRLF-terminated");
    assert!(!line.contains(['\r', '\n', '\0']));
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 6, "{line:?}");
    assert_eq!(fields[0], "PROXY");
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    assert_eq!(fields[1], family);
    let src: IpAddr = fields[2].parse().expect("source address");
    let dst: IpAddr = fields[3].parse().expect("destination address");
    assert_eq!(src.is_ipv4(), family == "TCP4");
    assert_eq!(dst.is_ipv4(), family == "TCP4");
    let sport: u16 = fields[4].parse().expect("source port");
    let dport: u16 = fields[5].parse().expect("destination port");
    // Ports are decimal without leading zeros (HAProxy refuses them).
    assert_eq!(fields[4], sport.to_string());
    assert_eq!(fields[5], dport.to_string());
    assert_eq!(SocketAddr::new(src, sport), client);
    assert_eq!(SocketAddr::new(dst, dport), local);
}

fn check_xclient(cmd: &str, client: SocketAddr, helo: Option<&str>, esmtp: bool) {
    let line = cmd.strip_suffix("\r\n").expect("CRLF-terminated");
    assert!(
        line.bytes().all(|b| (b' '..=b'~').contains(&b)),
        "printable ASCII only: {line:?}"
    );
    assert!(
        line.len() <= 128 + 3 * helo.map_or(0, str::len),
        "{} bytes",
        line.len()
    );
    let mut words = line.split(' ');
    assert_eq!(words.next(), Some("XCLIENT"));
    let mut attrs = std::collections::HashMap::new();
    for word in words {
        let (name, value) = word.split_once('=').expect("NAME=value");
        assert!(attrs.insert(name, value).is_none(), "{name} twice");
    }
    let addr = attrs["ADDR"];
    let ip: IpAddr = match addr.strip_prefix("IPV6:") {
        Some(v6) => IpAddr::V6(v6.parse().expect("IPv6 address")),
        None => IpAddr::V4(addr.parse().expect("IPv4 address")),
    };
    assert_eq!(ip, client.ip().to_canonical());
    assert_eq!(attrs["PORT"], client.port().to_string());
    assert_eq!(attrs["PROTO"], if esmtp { "ESMTP" } else { "SMTP" });
    match helo {
        Some(helo) => assert_eq!(xtext_decode(attrs["HELO"]), helo.as_bytes()),
        None => assert!(!attrs.contains_key("HELO")),
    }
}

/// RFC 3461 xtext: `+HH` (upper-case hex) for a byte, anything else as is.
fn xtext_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            let hex = s.get(i + 1..i + 3).expect("two hex digits after +");
            assert!(hex
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c)));
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            assert!(b[i] != b'=' && (b'!'..=b'~').contains(&b[i]));
            out.push(b[i]);
            i += 1;
        }
    }
    out
}
