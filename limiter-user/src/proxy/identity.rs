//! How the backend learns who the client really is: a PROXY protocol header
//! (v2 binary or v1 text) before anything else, or Postfix's XCLIENT command
//! inside the SMTP dialogue. Pure formatting, no I/O.

use std::net::{IpAddr, SocketAddr};

/// The PROXY v2 signature (12 bytes).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_VERSION_PROXY: u8 = 0x21;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// Both ends in one family: an IPv4 end next to an IPv6 one is mapped.
fn same_family(client: SocketAddr, local: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (client, local) = (canon(client), canon(local));
    match (client.ip(), local.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => (client, local),
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(client), v6(local))
        }
    }
}

/// A PROXY protocol v2 header for a TCP connection from `client` to `local`
/// (the address the client connected to).
pub fn proxy_v2_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&V2_SIGNATURE);
    header.push(V2_VERSION_PROXY);
    match (client.ip(), local.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            header.push(V2_TCP4);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            header.push(V2_TCP6);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&src.octets());
            header.extend_from_slice(&dst.octets());
        }
        _ => unreachable!("same_family returns one family"),
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&local.port().to_be_bytes());
    header
}

/// A PROXY protocol v1 (text) line.
pub fn proxy_v1_header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = same_family(client, local);
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    )
    .into_bytes()
}

/// Postfix's XCLIENT command carrying the client's address, port, protocol
/// and HELO name (<http://www.postfix.org/XCLIENT_README.html>).
pub fn xclient_command(client: SocketAddr, helo: Option<&str>, esmtp: bool) -> String {
    let addr = match client.ip().to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPV6:{v6}"),
    };
    let mut command = format!(
        "XCLIENT ADDR={addr} PORT={} NAME=[UNAVAILABLE] PROTO={}",
        client.port(),
        if esmtp { "ESMTP" } else { "SMTP" }
    );
    if let Some(helo) = helo {
        command.push_str(" HELO=");
        command.push_str(&xtext(helo));
    }
    command.push_str("\r\n");
    command
}

/// RFC 1891 xtext: printable ASCII except `+` and `=` as is, the rest `+HH`.
fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if (b'!'..=b'~').contains(&byte) && byte != b'+' && byte != b'=' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("+{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v2_ipv4_header_is_byte_exact() {
        let h = proxy_v2_header(sa("192.0.2.9:40000"), sa("127.0.0.1:25"));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 9, 127, 0, 0, 1, 0x9c, 0x40, 0, 25,
        ]);
        assert_eq!(h, expected);
    }

    #[test]
    fn v2_ipv6_header_has_36_address_bytes() {
        let h = proxy_v2_header(sa("[2001:db8::1]:1234"), sa("[::1]:587"));
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(&h[h.len() - 4..], &[0x04, 0xd2, 0x02, 0x4b]);
    }

    #[test]
    fn mixed_families_are_mapped_and_mapped_clients_are_ipv4() {
        let h = proxy_v2_header(sa("192.0.2.9:1"), sa("[2001:db8::25]:25"));
        assert_eq!(h[13], V2_TCP6);
        let h = proxy_v2_header(sa("[::ffff:192.0.2.9]:1"), sa("127.0.0.1:25"));
        assert_eq!(h[13], V2_TCP4);
    }

    #[test]
    fn v1_lines() {
        assert_eq!(
            proxy_v1_header(sa("192.0.2.9:40000"), sa("127.0.0.1:25")),
            b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 25\r\n"
        );
        assert_eq!(
            proxy_v1_header(sa("[2001:db8::1]:5"), sa("[::1]:25")),
            b"PROXY TCP6 2001:db8::1 ::1 5 25\r\n"
        );
    }

    #[test]
    fn xclient_encodes_addresses_and_helo() {
        assert_eq!(
            xclient_command(sa("192.0.2.9:40000"), Some("mail.example"), true),
            "XCLIENT ADDR=192.0.2.9 PORT=40000 NAME=[UNAVAILABLE] PROTO=ESMTP HELO=mail.example\r\n"
        );
        assert_eq!(
            xclient_command(sa("[2001:db8::1]:25"), Some("a b+c=d"), false),
            "XCLIENT ADDR=IPV6:2001:db8::1 PORT=25 NAME=[UNAVAILABLE] PROTO=SMTP HELO=a+20b+2Bc+3Dd\r\n"
        );
    }
}
