//! Recipient address keys (`recipients::address`): `Folding::key`,
//! `Folding::base_key` and `address_of_value`.
//!
//! Input: `[flags: u8] delimiters LF address-bytes` (flag bit 0: case-
//! sensitive local parts; the address is taken as UTF-8, lossily).
//!
//! Asserts: a key is `local@domain` (split at the first `@`, or the one
//! after a quoted local part) with neither part empty, no control
//! character and no blank at either end; the domain is in lower case, and
//! the local part too unless local parts are case-sensitive; a key is its
//! own key (the cache stores keys and folds them again when it loads, so
//! a key that is not a fixed point changes meaning across a restart); a
//! base key is shorter and also its own key; the key is bounded by the
//! address's length (lower-casing can grow a character, at most 3 times).
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_user::recipients::address::address_of_value;
use limiter_user::recipients::Folding;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (delimiters, address) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&[][..], rest),
    };
    let folding = Folding {
        case_sensitive_local_part: flags & 1 != 0,
        recipient_delimiter: String::from_utf8_lossy(delimiters).into_owned(),
    };
    let address = String::from_utf8_lossy(address);

    if let Some(value) = address_of_value(&address) {
        assert!(address.contains(value));
        let _ = folding.key(value);
    }
    let Some(key) = folding.key(&address) else {
        return;
    };
    check_key(&folding, &key);
    assert!(key.len() <= 3 * address.len(), "{address:?} -> {key:?}");
    assert_eq!(
        folding.key(&key).as_deref(),
        Some(key.as_str()),
        "the key of {address:?} is not its own key"
    );
    if let Some(base) = folding.base_key(&key) {
        assert!(base.len() < key.len());
        check_key(&folding, &base);
        assert_eq!(
            folding.key(&base).as_deref(),
            Some(base.as_str()),
            "the base key of {address:?} ({key:?}) is not its own key"
        );
    }
});

fn check_key(folding: &Folding, key: &str) {
    let at = domain_at(key).expect("an @ after the local part");
    let (local, domain) = (&key[..at], &key[at + 1..]);
    assert!(!local.is_empty() && !domain.is_empty(), "{key:?}");
    assert!(!key.chars().any(char::is_control), "{key:?}");
    assert_eq!(key.trim(), key, "{key:?}");
    assert_eq!(domain, domain.to_lowercase(), "{key:?}");
    if !folding.case_sensitive_local_part {
        assert_eq!(local, local.to_lowercase(), "{key:?}");
    }
}

/// The `@` before the domain: the first one, or the one right after a quoted
/// local part.
fn domain_at(key: &str) -> Option<usize> {
    if !key.starts_with('"') {
        return key.find('@');
    }
    let mut escaped = false;
    for (i, b) in key.bytes().enumerate().skip(1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return (key.as_bytes().get(i + 1) == Some(&b'@')).then_some(i + 1),
            _ => {}
        }
    }
    None
}
