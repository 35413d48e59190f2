//! Addresses as keys: how a directory value becomes an address, and how an
//! address becomes the key it is stored and looked up under. Pure.

use serde::{Deserialize, Serialize};

/// How addresses compare: the rules keys are made with. A set is built and
/// looked up with the same `Folding`, so a set keeps the one it was built
/// with (see [`super::AddressSet`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folding {
    /// `recipients.ldap.case_sensitive_local_part`: keep the case of local
    /// parts (domains are always folded).
    pub case_sensitive_local_part: bool,
    /// `recipients.ldap.recipient_delimiter`: characters that start an
    /// address extension (`user+tag@`); empty for none.
    pub recipient_delimiter: String,
}

impl Folding {
    /// The key of `address`: `local@domain` with the domain in lower case
    /// (and without trailing dots), the local part in lower case unless
    /// local parts are case-sensitive, and a quoted local part unquoted when
    /// it needs no quotes (`"john"@x` is `john@x`). Surrounding blanks and
    /// one pair of angle brackets (with blanks inside them) are ignored.
    /// `None` for text that is not an address: no `@` after the local part,
    /// or an empty local part or domain.
    ///
    /// A key is its own key (`key(key(a)) == key(a)`): the cache stores keys
    /// and folds them again when it loads, and the proxy's canonical
    /// addresses are keys.
    #[must_use]
    pub fn key(&self, address: &str) -> Option<String> {
        let address = address.trim();
        let address = address
            .strip_prefix('<')
            .and_then(|a| a.strip_suffix('>'))
            .map_or(address, str::trim);
        let at = domain_at(address)?;
        let (local, domain) = (&address[..at], &address[at + 1..]);
        // All of them (and blanks between them): `x@example.com..` would
        // otherwise key to `x@example.com.`, whose own key is
        // `x@example.com`.
        let domain = domain.trim_end_matches(|c: char| c == '.' || c.is_whitespace());
        if local.is_empty() || domain.is_empty() {
            return None;
        }
        if local.starts_with('<') || domain.ends_with('>') {
            // An unbalanced or second pair of brackets (`<a@b>.`): no
            // address, and its key would lose the brackets when folded
            // again.
            return None;
        }
        if address.chars().any(char::is_control) {
            // No address has one (RFC 5321 qtext and quoted-pair exclude
            // them), and the set keeps keys one per line.
            return None;
        }
        let unquoted = unquote(local);
        let local = unquoted.as_deref().unwrap_or(local);
        if local.is_empty() {
            return None;
        }
        let mut key = String::with_capacity(local.len() + 1 + domain.len());
        if self.case_sensitive_local_part {
            key.push_str(local);
        } else {
            push_lowercase(&mut key, local);
        }
        key.push('@');
        push_lowercase(&mut key, domain);
        Some(key)
    }

    /// The key without its extension (`user+tag@x` → `user@x`), if the
    /// local part of `key` has one.
    #[must_use]
    pub fn base_key(&self, key: &str) -> Option<String> {
        if self.recipient_delimiter.is_empty() {
            return None;
        }
        let at = domain_at(key)?;
        let local = &key[..at];
        if local.starts_with('"') {
            // A quoted local part (one that needs its quotes) has no
            // extension to cut: a cut inside it would leave it unterminated.
            return None;
        }
        let cut = local.find(|c| self.recipient_delimiter.contains(c))?;
        if cut == 0 {
            return None;
        }
        Some(format!("{}{}", &local[..cut], &key[at..]))
    }
}

/// The offset of the `@` that separates the local part from the domain: the
/// first one, or the one right after a quoted local part (which may hold
/// `@`s itself), as SMTP reads a mailbox (`smtp::command` splits it the
/// same way). `None` when there is none, or when a quoted local part is
/// unterminated or followed by something else.
fn domain_at(address: &str) -> Option<usize> {
    if !address.starts_with('"') {
        return address.find('@');
    }
    let mut escaped = false;
    for (i, b) in address.bytes().enumerate().skip(1) {
        match b {
            _ if escaped => escaped = false,
            b'\\' => escaped = true,
            b'"' => return (address.as_bytes().get(i + 1) == Some(&b'@')).then_some(i + 1),
            _ => {}
        }
    }
    None
}

fn push_lowercase(out: &mut String, text: &str) {
    if text.is_ascii() {
        out.extend(text.chars().map(|c| c.to_ascii_lowercase()));
    } else {
        out.push_str(&text.to_lowercase());
    }
}

/// The content of a quoted local part when it is a plain dot-atom (so the
/// quotes change nothing), `None` otherwise.
fn unquote(local: &str) -> Option<String> {
    let inner = local.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' { chars.next()? } else { c });
    }
    is_dot_atom(&out).then_some(out)
}

/// RFC 5322 dot-atom (RFC 6531: non-ASCII characters too, but for
/// whitespace: a quoted `"\u{3000}x"` unquoted would start with a blank that
/// the next folding trims, so its key would not be its own key).
fn is_dot_atom(text: &str) -> bool {
    !text.is_empty()
        && text.split('.').all(|atom| {
            !atom.is_empty()
                && atom.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || "!#$%&'*+-/=?^_`{|}~".contains(c)
                        || (!c.is_ascii() && !c.is_whitespace())
                })
        })
}

/// The mail address a directory value stands for, if any.
///
/// * A plain value (`mail`, `mailAlternateAddress`, `userPrincipalName`) is
///   the address itself.
/// * A typed value (`proxyAddresses`, and any attribute with the same
///   convention) is `TYPE:address`: `SMTP:` marks the primary address,
///   `smtp:` the others; both count, without their prefix. Other types
///   (`X500:`, `X400:`, `SIP:`, `EUM:`, …) are not mail addresses.
///
/// The value still has to be an address: [`Folding::key`] refuses it
/// otherwise.
#[must_use]
pub fn address_of_value(value: &str) -> Option<&str> {
    let value = value.trim();
    let colon = value.find(':');
    let at = value.find('@');
    match (colon, at) {
        // A type prefix comes before the '@' (an unquoted local part has no
        // ':'), and is a bare word.
        (Some(colon), Some(at)) if colon < at => typed(value, colon),
        (Some(colon), None) => typed(value, colon),
        _ => Some(value),
    }
}

fn typed(value: &str, colon: usize) -> Option<&str> {
    let kind = &value[..colon];
    if kind.eq_ignore_ascii_case("smtp") {
        Some(value[colon + 1..].trim())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insensitive() -> Folding {
        Folding::default()
    }

    #[test]
    fn keys_fold_the_domain_always_and_the_local_part_by_default() {
        let f = insensitive();
        for (address, key) in [
            ("alice@example.com", "alice@example.com"),
            ("Alice@Example.COM", "alice@example.com"),
            (" <Alice@Example.com> ", "alice@example.com"),
            ("alice@example.com.", "alice@example.com"),
            ("\"alice\"@example.com", "alice@example.com"),
            ("\"a\\lice\"@example.com", "alice@example.com"),
            ("\"john doe\"@example.com", "\"john doe\"@example.com"),
            ("\"a@b\"@example.com", "\"a@b\"@example.com"),
            ("Jöhn@Exämple.com", "jöhn@exämple.com"),
            ("first.last+tag@example.com", "first.last+tag@example.com"),
        ] {
            assert_eq!(f.key(address).as_deref(), Some(key), "{address}");
        }
        let sensitive = Folding {
            case_sensitive_local_part: true,
            ..Folding::default()
        };
        assert_eq!(
            sensitive.key("Alice@Example.COM").as_deref(),
            Some("Alice@example.com")
        );
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "<>",
            "a@.",
            "\"a\nb\"@example.com",
            "a@exa\u{7f}mple.com",
        ] {
            assert_eq!(f.key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_are_their_own_keys() {
        // Found by the address_key fuzz target: each of these keyed to
        // something whose own key differs (the cache folds stored keys
        // again when it loads, so the set changed across a restart).
        let f = insensitive();
        for (address, key) in [
            ("a@b..", Some("a@b")),
            ("a@b. .", Some("a@b")),
            ("< a@b >", Some("a@b")),
            (" <bob@example.com>.", None),
            ("<<a@b>>", None),
            ("a@b>", None),
            // The domain starts after the first `@` (or after a quoted
            // local part), as SMTP reads a mailbox: an `@` in an address
            // literal stays in the domain, which is folded whole.
            ("root@[A@B]", Some("root@[a@b]")),
            ("\"a@b\"@Example.com", Some("\"a@b\"@example.com")),
            ("\"unterminated@example.com", None),
            // Unicode blanks keep their quotes (found by the command and
            // address_key fuzz targets).
            ("\"\u{3000}x\"@e", Some("\"\u{3000}x\"@e")),
            ("\"\u{2028}x\"@e", Some("\"\u{2028}x\"@e")),
        ] {
            assert_eq!(f.key(address).as_deref(), key, "{address:?}");
            if let Some(key) = key {
                assert_eq!(f.key(key).as_deref(), Some(key), "{key:?}");
            }
        }
        // A quoted local part has no extension to cut.
        let delimited = Folding {
            recipient_delimiter: "e".into(),
            ..Folding::default()
        };
        let key = delimited.key("\"john doe\"@example.com").unwrap();
        assert_eq!(delimited.base_key(&key), None);
    }

    #[test]
    fn base_keys_cut_at_the_first_delimiter() {
        let none = insensitive();
        assert_eq!(none.base_key("user+tag@x"), None);
        let f = Folding {
            recipient_delimiter: "+-".into(),
            ..Folding::default()
        };
        assert_eq!(f.base_key("user+tag@x").as_deref(), Some("user@x"));
        assert_eq!(f.base_key("user-a+b@x").as_deref(), Some("user@x"));
        assert_eq!(f.base_key("user@x"), None);
        assert_eq!(f.base_key("+tag@x"), None);
    }

    #[test]
    fn typed_values_keep_only_smtp_addresses() {
        for (value, want) in [
            ("alice@example.com", Some("alice@example.com")),
            ("SMTP:Alice@example.com", Some("Alice@example.com")),
            ("smtp:alias@example.com", Some("alias@example.com")),
            ("Smtp: alias@example.com ", Some("alias@example.com")),
            ("X500:/o=Example/ou=Exchange/cn=Recipients/cn=alice", None),
            ("SIP:alice@example.com", None),
            ("sip:alice@example.com", None),
            ("X400:c=US;a= ;p=Example;o=Exchange;s=Alice;", None),
            ("EUM:1234;phone-context=dial.example.com", None),
            ("\"a:b\"@example.com", None),
            ("no-at-sign", Some("no-at-sign")),
        ] {
            assert_eq!(address_of_value(value), want, "{value}");
        }
        // Not an address once typed values are set aside.
        assert_eq!(
            insensitive().key(address_of_value("no-at-sign").unwrap()),
            None
        );
    }
}
