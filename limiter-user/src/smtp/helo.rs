//! HELO/EHLO names in canonical form.
//!
//! Every rule that reads the client's HELO name (`lists.reject_helo`,
//! `limits.helo`, the null-sender rate per name) and every consumer that is
//! shown it (scanners, logs) must read the same value whatever the client's
//! spelling, or a client escapes a rule by writing its name another way
//! (`BAD.Dynamic.Example.`, `[IPv6:2001:DB8:0::1]`). [`canonical_helo`] turns
//! the arguments of `HELO`/`EHLO` into that value, a [`HeloName`]:
//!
//! * the first word only (words are separated the way Postfix's smtpd
//!   tokeniser separates them: C `isspace()`, i.e. SP, HTAB, LF, VT, FF, CR);
//! * in lower case (ASCII, and Unicode for a UTF-8 name);
//! * without trailing dots (all of them: `a.example..` would otherwise
//!   escape the pattern `*.example`);
//! * an address literal rewritten from the parsed address: `[192.0.2.1]`,
//!   `[ipv6:2001:db8::1]` (std `Ipv6Addr` display form, RFC 5952), an
//!   IPv4-mapped IPv6 literal as the IPv4 literal it stands for, and an
//!   untagged IPv6 literal (`[2001:db8::1]`) as the tagged one. A literal
//!   that does not parse is kept, in lower case: it has no other spelling to
//!   converge to, and Postfix accepts it.
//!
//! What Postfix itself does with the name (smtpd.c `helo_cmd`/`ehlo_cmd`):
//! it tokenises the line with `smtpd_token()` — whitespace is C `isspace()`,
//! and `"…"`, `<…>` and `\x` group bytes into one token — then joins all the
//! arguments with single spaces (`collapse_args`), so `EHLO a b` is the name
//! `a b`; the name is stored after `printable()` (non-printable bytes become
//! `?`). The proxy judges the first word, which a client cannot vary by
//! appending words; a name holding bytes that Postfix's tokeniser groups
//! differently (`"`, `\`, `<`, `>`) is refused, so the word the proxy judges
//! is always the start of the name the backend records.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::reply::Reply;

/// The longest accepted name in bytes (a domain name is at most 255 octets,
/// RFC 1035 §2.3.4; an IPv6 literal is far shorter).
pub const MAX_HELO_LEN: usize = 255;

/// A HELO/EHLO name in canonical form (see the [module](self) docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeloName {
    /// The canonical name: what every rule reads and every log shows.
    name: String,
    /// The address of an address literal that parsed, so rules about
    /// literals need not parse the name again.
    literal: Option<IpAddr>,
    /// Whether the client sent more than one word (Postfix records them
    /// all, joined by spaces; the proxy judges the first).
    extra_words: bool,
}

impl HeloName {
    /// The canonical name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The canonical name, owned.
    #[must_use]
    pub fn into_string(self) -> String {
        self.name
    }

    /// The address of an address literal (`[192.0.2.1]`,
    /// `[IPv6:2001:db8::1]`), `None` for a domain name or a literal that
    /// does not parse.
    #[must_use]
    pub fn literal(&self) -> Option<IpAddr> {
        self.literal
    }

    /// Whether the name is written as an address literal (`[…]`), valid or
    /// not.
    #[must_use]
    pub fn is_address_literal(&self) -> bool {
        self.name.starts_with('[')
    }

    /// Whether the client sent words after the name (`EHLO a b`); they are
    /// ignored by the proxy.
    #[must_use]
    pub fn has_extra_words(&self) -> bool {
        self.extra_words
    }
}

impl std::fmt::Display for HeloName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl AsRef<str> for HeloName {
    fn as_ref(&self) -> &str {
        &self.name
    }
}

/// Why a HELO/EHLO name was refused. Every variant is answered
/// `501 5.5.4 Syntax: HELO hostname` (or `EHLO`): see [`HeloError::reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeloError {
    /// No name at all (`EHLO`, `EHLO   `, or only dots).
    #[error("no hostname")]
    Missing,
    /// A control character (anything but HTAB between words; U+0080–U+009F
    /// included): no name has one, and logs and scanners must not get one.
    #[error("control character in the hostname")]
    ControlCharacter,
    /// The name is longer than [`MAX_HELO_LEN`] bytes.
    #[error("hostname longer than {MAX_HELO_LEN} bytes")]
    TooLong,
    /// A character that Postfix's command tokeniser treats as quoting (`"`,
    /// `\`, `<`, `>`): the backend would not read the same name.
    #[error("quoting character {0:?} in the hostname")]
    Quoting(char),
    /// Square brackets around (or in) something that is no IPv4 or IPv6
    /// address literal (`[bad.example]`): no rule could judge it as the
    /// name it hides, and RFC 5321 allows brackets only around an address.
    #[error("brackets around something that is no address literal")]
    BadLiteral,
}

impl HeloError {
    /// The reply the session sends: `501 5.5.4 Syntax: EHLO hostname` when
    /// `esmtp`, `501 5.5.4 Syntax: HELO hostname` otherwise.
    #[must_use]
    pub fn reply(&self, esmtp: bool) -> Reply {
        Reply::bad_arguments(if esmtp {
            "Syntax: EHLO hostname"
        } else {
            "Syntax: HELO hostname"
        })
    }
}

/// The canonical HELO/EHLO name in `args` (what [`super::Command::args`]
/// holds for `HELO`/`EHLO`, from a line that passed
/// [`super::check_command_line`]).
///
/// # Errors
///
/// A [`HeloError`]: no name, a control character anywhere in `args` (HTAB
/// between words excepted), a name over [`MAX_HELO_LEN`] bytes, or one
/// holding `"`, `\`, `<` or `>`.
pub fn canonical_helo(args: &str) -> Result<HeloName, HeloError> {
    if args.chars().any(|c| c.is_control() && c != '\t') {
        return Err(HeloError::ControlCharacter);
    }
    let mut words = args.split(is_c_space).filter(|w| !w.is_empty());
    let word = words.next().ok_or(HeloError::Missing)?;
    let extra_words = words.next().is_some();
    if word.len() > MAX_HELO_LEN {
        return Err(HeloError::TooLong);
    }
    if let Some(c) = word.chars().find(|c| matches!(c, '"' | '\\' | '<' | '>')) {
        return Err(HeloError::Quoting(c));
    }
    let word = word.trim_end_matches('.');
    if word.is_empty() {
        return Err(HeloError::Missing);
    }
    let (name, literal) = match canonical_literal(word) {
        Some((name, addr)) => (name, Some(addr)),
        None if word.contains(['[', ']']) => return Err(HeloError::BadLiteral),
        None => (lowercase(word), None),
    };
    // Lower-casing can lengthen a name (U+023A is 2 bytes, U+2C65 3).
    if name.len() > MAX_HELO_LEN {
        return Err(HeloError::TooLong);
    }
    Ok(HeloName {
        name,
        literal,
        extra_words,
    })
}

/// The canonical form of an address literal `[…]` and its address, `None`
/// when `text` is no literal or its address does not parse.
///
/// `[192.0.2.1]` and `[IPv6:2001:DB8::1]` (tag in any case) give
/// `[192.0.2.1]` and `[ipv6:2001:db8::1]`; an IPv4-mapped IPv6 address gives
/// the IPv4 literal; an untagged IPv6 address (`[2001:db8::1]`, not RFC 5321
/// but sent by some clients) gives the tagged form. Shared with the domain
/// of envelope addresses ([`super::command`]).
#[must_use]
pub fn canonical_literal(text: &str) -> Option<(String, IpAddr)> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    let v6 = match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("ipv6:") => inner.get(5..)?.parse::<Ipv6Addr>().ok(),
        _ => None,
    };
    let addr = match v6 {
        Some(v6) => IpAddr::V6(v6),
        None => inner
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .or_else(|_| inner.parse::<Ipv6Addr>().map(IpAddr::V6))
            .ok()?,
    };
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 @ IpAddr::V4(_) => v4,
    };
    let name = match addr {
        IpAddr::V4(v4) => format!("[{v4}]"),
        IpAddr::V6(v6) => format!("[ipv6:{v6}]"),
    };
    Some((name, addr))
}

/// C `isspace()` in the "C" locale, as Postfix's `ISSPACE()`: SP, HTAB, LF,
/// VT, FF, CR (never a non-ASCII character).
pub(crate) fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// `text` in lower case: ASCII folding for ASCII text, Unicode otherwise.
fn lowercase(text: &str) -> String {
    if text.is_ascii() {
        text.to_ascii_lowercase()
    } else {
        text.to_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::TestRng;

    #[test]
    fn spellings_converge() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("mx.example.com", "mx.example.com", None),
            ("MX.Example.COM", "mx.example.com", None),
            ("mx.example.com.", "mx.example.com", None),
            ("MX.EXAMPLE.COM.", "mx.example.com", None),
            ("mx.example.com..", "mx.example.com", None),
            ("  mx.example.com  ", "mx.example.com", None),
            ("\tmx.example.com\t", "mx.example.com", None),
            ("mx.example.com extra words", "mx.example.com", None),
            ("mx.example.com\textra", "mx.example.com", None),
            ("localhost", "localhost", None),
            ("Bücher.Example", "bücher.example", None),
            ("ÄÖÜ.example.", "äöü.example", None),
            ("under_score.example", "under_score.example", None),
            ("[192.0.2.1]", "[192.0.2.1]", Some("192.0.2.1")),
            ("[192.0.2.1].", "[192.0.2.1]", Some("192.0.2.1")),
            (
                "[IPv6:2001:DB8::1]",
                "[ipv6:2001:db8::1]",
                Some("2001:db8::1"),
            ),
            (
                "[ipv6:2001:db8::1]",
                "[ipv6:2001:db8::1]",
                Some("2001:db8::1"),
            ),
            (
                "[IPV6:2001:0db8:0000:0000:0000:0000:0000:0001]",
                "[ipv6:2001:db8::1]",
                Some("2001:db8::1"),
            ),
            (
                "[IPv6:2001:db8:0:0::1]",
                "[ipv6:2001:db8::1]",
                Some("2001:db8::1"),
            ),
            ("[2001:DB8::1]", "[ipv6:2001:db8::1]", Some("2001:db8::1")),
            ("[IPv6:::ffff:192.0.2.1]", "[192.0.2.1]", Some("192.0.2.1")),
            ("[IPv6:::FFFF:c000:0201]", "[192.0.2.1]", Some("192.0.2.1")),
            ("[::ffff:192.0.2.1]", "[192.0.2.1]", Some("192.0.2.1")),
            ("[IPv6:::1]", "[ipv6:::1]", Some("::1")),
            // A bare address is a name, not a literal.
            ("192.0.2.1", "192.0.2.1", None),
        ];
        for &(args, want, literal) in cases {
            let name = canonical_helo(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(name.as_str(), want, "{args:?}");
            assert_eq!(
                name.literal(),
                literal.map(|a| a.parse::<IpAddr>().unwrap()),
                "{args:?}"
            );
            assert_eq!(name.is_address_literal(), want.starts_with('['), "{args:?}");
            assert_eq!(name.to_string(), want);
        }
        assert!(canonical_helo("a b").unwrap().has_extra_words());
        assert!(!canonical_helo(" a ").unwrap().has_extra_words());
    }

    #[test]
    fn refused() {
        let long = "a".repeat(MAX_HELO_LEN + 1);
        let max = "a".repeat(MAX_HELO_LEN);
        // Fits as sent, not once lower-cased.
        let grows = "\u{23a}".repeat(MAX_HELO_LEN / 2);
        assert_eq!(canonical_helo(&max).unwrap().as_str(), max);
        let cases: &[(&str, HeloError)] = &[
            ("", HeloError::Missing),
            ("   ", HeloError::Missing),
            ("\t", HeloError::Missing),
            (".", HeloError::Missing),
            ("... x", HeloError::Missing),
            (&long, HeloError::TooLong),
            (&grows, HeloError::TooLong),
            ("a\u{0}b", HeloError::ControlCharacter),
            ("a\u{0b}b", HeloError::ControlCharacter),
            ("a\u{0c}b", HeloError::ControlCharacter),
            ("a\rb", HeloError::ControlCharacter),
            ("a\nb", HeloError::ControlCharacter),
            ("a\u{7f}", HeloError::ControlCharacter),
            ("a\u{85}b", HeloError::ControlCharacter),
            ("a b\u{1b}", HeloError::ControlCharacter),
            ("\"a b\"", HeloError::Quoting('"')),
            ("<a.example>", HeloError::Quoting('<')),
            ("a.example>", HeloError::Quoting('>')),
            ("a\\ b", HeloError::Quoting('\\')),
            // Brackets around no address: the name they hide escapes every
            // pattern (`*.dynamic.example` against `[x.dynamic.example]`).
            ("[Foo]", HeloError::BadLiteral),
            ("[x.dynamic.example]", HeloError::BadLiteral),
            ("[300.1.2.3]", HeloError::BadLiteral),
            ("[192.0.2.01]", HeloError::BadLiteral),
            ("[IPv6:fe80::1%ETH0]", HeloError::BadLiteral),
            ("[IPv6:192.0.2.1]", HeloError::BadLiteral),
            ("[]", HeloError::BadLiteral),
            ("[192.0.2.1", HeloError::BadLiteral),
            ("x.example]", HeloError::BadLiteral),
        ];
        for (args, want) in cases {
            assert_eq!(canonical_helo(args).as_ref(), Err(want), "{args:?}");
        }
        let reply = HeloError::Missing.reply(true);
        assert_eq!(reply.code, 501);
        assert_eq!(reply.enhanced(), Some((5, 5, 4)));
        assert!(reply.text().contains("EHLO"));
        assert!(HeloError::TooLong.reply(false).text().contains("HELO"));
    }

    /// Every C-isspace byte separates words; nothing else does.
    #[test]
    fn words_split_on_c_isspace() {
        for b in 0u8..=0x7f {
            let c = char::from(b);
            let args = format!("first{c}second");
            let got = canonical_helo(&args);
            match c {
                ' ' | '\t' => assert_eq!(got.unwrap().as_str(), "first", "{b:#04x}"),
                c if c.is_control() => {
                    assert_eq!(got, Err(HeloError::ControlCharacter), "{b:#04x}");
                }
                '"' | '\\' | '<' | '>' | '[' | ']' => assert!(got.is_err(), "{b:#04x}"),
                c => assert_eq!(
                    got.unwrap().as_str(),
                    format!("first{}second", c.to_ascii_lowercase()),
                    "{b:#04x}"
                ),
            }
        }
    }

    /// Random arguments: no panic, bounded output, and the canonical form is
    /// a fixed point (canonicalising it again gives it back).
    #[test]
    fn random_input_is_stable() {
        let mut rng = TestRng::new(0x4E10);
        for _ in 0..20_000 {
            let len = rng.below(40);
            let bytes = rng.bytes(len, b"aZ09.-[]:IPv6 \t\x0bfF\"<>\\\xc3\x84");
            let args = String::from_utf8_lossy(&bytes);
            if let Ok(name) = canonical_helo(&args) {
                assert!(!name.as_str().is_empty());
                assert!(name.as_str().len() <= 2 * MAX_HELO_LEN);
                assert!(!name.as_str().ends_with('.'));
                let again = canonical_helo(name.as_str()).expect("canonical form is accepted");
                assert_eq!(again.as_str(), name.as_str(), "{args:?}");
            }
        }
    }
}
