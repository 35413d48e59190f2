//! HELO/EHLO names in canonical form (`smtp::helo::canonical_helo`), on
//! the arguments of a command line that passed the strict check, and on
//! arbitrary text.
//!
//! Asserts: a canonical name is non-empty, at most `MAX_HELO_LEN` bytes,
//! holds no control character, no C whitespace, none of `" \ < >`, no
//! trailing dot and no upper case (ASCII or Unicode); it is its own
//! canonical form (rules and logs may canonicalise it again); an address
//! literal's address parses back from the name, is never an IPv4-mapped
//! IPv6 address, and the name is the `[v4]` / `[ipv6:v6]` spelling of it;
//! the name is the canonical form of the first word the client sent.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use limiter_user::smtp::helo::MAX_HELO_LEN;
use limiter_user::smtp::{canonical_helo, parse_command_line, HeloName, Verb};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(name) = canonical_helo(&text) {
        check(&name);
    }
    let mut line = b"EHLO ".to_vec();
    line.extend_from_slice(data);
    if let Ok(cmd) = parse_command_line(&line) {
        assert_eq!(cmd.verb, Verb::Ehlo);
        if let Ok(name) = canonical_helo(&cmd.args) {
            check(&name);
            let first = cmd.args.split([' ', '\t']).next().unwrap_or_default();
            let alone = canonical_helo(first).expect("the first word alone is a name");
            assert_eq!(alone.as_str(), name.as_str());
            assert_eq!(alone.literal(), name.literal());
        }
    }
});

/// Set while the finding it names is open; make it `false` to check again.
const KNOWN_LOWERCASE_GROWTH: bool = false;

fn check(name: &HeloName) {
    let s = name.as_str();
    if s.len() > MAX_HELO_LEN && KNOWN_LOWERCASE_GROWTH {
        // Reported, not fixed here (smtp/helo.rs is not this crate's): the
        // length is checked before Unicode lower-casing, which can lengthen
        // a name (`Ⱥ`, 2 bytes, becomes `ⱥ`, 3 bytes), so a 255-byte name
        // can come out longer than MAX_HELO_LEN and is then refused when
        // canonicalised again. Seed: corpus/helo/known_lowercase_growth.
        return;
    }
    assert!(
        !s.is_empty() && s.len() <= MAX_HELO_LEN,
        "{} bytes: {s:?}",
        s.len()
    );
    assert!(
        !s.chars()
            .any(|c| c.is_control() || c.is_whitespace() && c.is_ascii()),
        "{s:?}"
    );
    assert!(!s.contains(['"', '\\', '<', '>']), "{s:?}");
    assert!(!s.ends_with('.'), "{s:?}");
    assert_eq!(s, s.to_lowercase(), "not in lower case: {s:?}");
    let again = canonical_helo(s).unwrap_or_else(|e| panic!("{s:?} refused: {e}"));
    assert_eq!(again.as_str(), s, "not a fixed point");
    assert_eq!(again.literal(), name.literal());
    assert!(!again.has_extra_words());
    if let Some(addr) = name.literal() {
        assert!(name.is_address_literal());
        let want = match addr {
            IpAddr::V4(v4) => format!("[{v4}]"),
            IpAddr::V6(v6) => {
                assert!(v6.to_ipv4_mapped().is_none(), "{s:?}");
                format!("[ipv6:{v6}]")
            }
        };
        assert_eq!(s, want);
    }
}
