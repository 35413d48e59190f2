//! The account a SASL exchange names (`smtp::sasl::SaslAccount`), on an
//! arbitrary `AUTH` line and client messages, and on well-formed PLAIN and
//! LOGIN messages built from the input.
//!
//! Asserts: an account is non-empty, at most `MAX_ACCOUNT_LEN` bytes, with
//! no ASCII upper case, and is its own key; an exchange names at most one
//! account; a PLAIN message names its authentication identity (second
//! field) and a LOGIN one its name, padded or not, as `account_key` keys
//! them: what the backend checks is what the per-account limit counts.
#![no_main]

use base64::{
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD},
    Engine as _,
};
use libfuzzer_sys::fuzz_target;
use limiter_user::smtp::sasl::{account_key, SaslAccount, MAX_ACCOUNT_LEN};

fuzz_target!(|data: &[u8]| {
    // Arbitrary: the first line an AUTH command, the rest client messages.
    let mut lines = data.split(|&b| b == b'\n');
    let (mut sasl, first) = SaslAccount::from_command(lines.next().unwrap_or_default());
    let mut named = usize::from(first.is_some());
    check(first.as_deref());
    for message in lines {
        let account = sasl.read(message);
        named += usize::from(account.is_some());
        check(account.as_deref());
    }
    assert!(named <= 1, "one exchange named {named} accounts");

    // Built: `authzid NUL authcid NUL password` from the input's pieces.
    let mut parts = data.splitn(3, |&b| b == 0);
    let (authzid, authcid) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let mut plain = authzid.to_vec();
    plain.push(0);
    plain.extend_from_slice(authcid);
    plain.extend_from_slice(b"\0secret");
    for engine in [&STANDARD, &STANDARD_NO_PAD] {
        let mut line = b"AUTH PLAIN ".to_vec();
        line.extend_from_slice(engine.encode(&plain).as_bytes());
        let (_, account) = SaslAccount::from_command(&line);
        assert_eq!(account, account_key(authcid), "PLAIN {plain:?}");
        let mut login = SaslAccount::new("LOGIN");
        assert_eq!(
            login.read(engine.encode(authzid).as_bytes()),
            account_key(authzid),
            "LOGIN {authzid:?}"
        );
    }
});

fn check(account: Option<&str>) {
    let Some(account) = account else { return };
    assert!(
        !account.is_empty() && account.len() <= MAX_ACCOUNT_LEN,
        "{account:?}"
    );
    assert!(
        !account.bytes().any(|b| b.is_ascii_uppercase()),
        "{account:?}"
    );
    assert_eq!(account_key(account.as_bytes()).as_deref(), Some(account));
}
