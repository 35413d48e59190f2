//! The account a client's SASL exchange names (RFC 4954), read from the
//! client's own messages as they pass, before the one carrying the password
//! reaches the backend: what the per-account AUTH limit counts and checks
//! (`limits.max_failed_auth_per_account`).
//!
//! Known: `PLAIN` (RFC 4616: the authentication identity, whose password is
//! checked, not the authorization identity), `LOGIN` (the first answer),
//! `CRAM-MD5` (RFC 2195: the name before the digest), `DIGEST-MD5` (RFC
//! 2831: `username`), every `SCRAM-*` (RFC 5802: the client-first message's
//! `n=`) and `XOAUTH2` (`user=`). Any other mechanism (GSSAPI, NTLM,
//! OAUTHBEARER, EXTERNAL) names no account here; its failures count per
//! source and network only.

use base64::{
    alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    Engine as _,
};

/// Base64 as lenient as the backends' decoders: with or without padding,
/// stray low bits allowed. A stricter reading than the backend's would let
/// a client name an account that is never counted.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Longest account name kept (bytes); longer names are cut, so that a
/// client cannot make the per-account table hold long keys.
pub const MAX_ACCOUNT_LEN: usize = 256;

/// Where an exchange stands in naming its account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslAccount {
    /// `PLAIN`: the next message holds the account.
    Plain,
    /// `LOGIN`: the next message is the account.
    Login,
    /// `CRAM-MD5`: the next message holds the account.
    CramMd5,
    /// `DIGEST-MD5`: the next message holds the account.
    DigestMd5,
    /// `SCRAM-*`: the next message (client-first) holds the account.
    Scram,
    /// `XOAUTH2`: the next message holds the account.
    XOAuth2,
    /// Named already, or a mechanism whose messages are not read.
    Done,
}

impl SaslAccount {
    /// For the mechanism of an `AUTH` command (any case).
    #[must_use]
    pub fn new(mechanism: &str) -> Self {
        match mechanism.to_ascii_uppercase().as_str() {
            "PLAIN" => Self::Plain,
            "LOGIN" => Self::Login,
            "CRAM-MD5" => Self::CramMd5,
            "DIGEST-MD5" => Self::DigestMd5,
            "XOAUTH2" => Self::XOAuth2,
            scram if scram.starts_with("SCRAM-") => Self::Scram,
            _ => Self::Done,
        }
    }

    /// Reads the client's next message (as sent: base64, `=` for empty,
    /// `*` to cancel): the account, lower-cased, if this message names it.
    /// `CRAM-MD5`'s first message answers the server's challenge, so an
    /// initial response ([`Self::read_initial`]) never names it.
    pub fn read(&mut self, message: &[u8]) -> Option<String> {
        let mechanism = std::mem::replace(self, Self::Done);
        if mechanism == Self::Done || message == b"*" {
            return None;
        }
        let decoded = if message == b"=" {
            Vec::new()
        } else {
            LENIENT.decode(message).ok()?
        };
        match mechanism {
            // authzid NUL authcid NUL passwd
            Self::Plain => account_key(decoded.split(|&b| b == 0).nth(1)?),
            Self::Login => account_key(&decoded),
            // "name digest": the digest is the last word
            Self::CramMd5 => account_key(before_last_space(&decoded)?),
            Self::DigestMd5 => account_key(&digest_username(&decoded)?),
            Self::Scram => account_key(&scram_username(&decoded)?),
            // user=NAME ^A auth=Bearer TOKEN ^A ^A
            Self::XOAuth2 => account_key(
                decoded
                    .split(|&b| b == 1)
                    .find_map(|field| field.strip_prefix(b"user="))?,
            ),
            Self::Done => None,
        }
    }

    /// Reads an `AUTH` command's initial response, if it has one.
    pub fn read_initial(&mut self, initial: Option<&[u8]>) -> Option<String> {
        match (*self, initial) {
            (Self::CramMd5, _) | (_, None) => None,
            (_, Some(message)) => self.read(message),
        }
    }

    /// For an `AUTH mechanism [initial-response]` line: the exchange, and
    /// the account if the initial response names it.
    #[must_use]
    pub fn from_command(line: &[u8]) -> (Self, Option<String>) {
        let mut words = line
            .split(u8::is_ascii_whitespace)
            .filter(|word| !word.is_empty())
            .skip(1);
        let mechanism = String::from_utf8_lossy(words.next().unwrap_or_default());
        let mut sasl = Self::new(&mechanism);
        let account = sasl.read_initial(words.next());
        (sasl, account)
    }
}

/// The key an account is counted under: lower-cased (ASCII; mail systems
/// look logins up without regard to case, so `Alice` is `alice`), bytes
/// that are not UTF-8 replaced, cut to at most [`MAX_ACCOUNT_LEN`] bytes
/// (at a character boundary). `None` for an empty name.
#[must_use]
pub fn account_key(name: &[u8]) -> Option<String> {
    // Each replaced byte can grow to three: read at most what can fit.
    let name = &name[..name.len().min(MAX_ACCOUNT_LEN)];
    let mut key = String::from_utf8_lossy(name).to_ascii_lowercase();
    let mut end = key.len().min(MAX_ACCOUNT_LEN);
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    key.truncate(end);
    (!key.is_empty()).then_some(key)
}

/// The `n=` name of a SCRAM client-first message (`gs2-header n=NAME,r=…`),
/// its `=2C` and `=3D` unescaped.
fn scram_username(message: &[u8]) -> Option<Vec<u8>> {
    // gs2-cbind-flag "," [authzid] "," then the attributes.
    let bare = message.splitn(3, |&b| b == b',').nth(2)?;
    let name = bare
        .split(|&b| b == b',')
        .find_map(|attribute| attribute.strip_prefix(b"n="))?;
    let mut out = Vec::with_capacity(name.len());
    let mut rest = name;
    while let Some((&first, tail)) = rest.split_first() {
        let (byte, more) = match (first, tail) {
            (b'=', [b'2', b'C' | b'c', more @ ..]) => (b',', more),
            (b'=', [b'3', b'D' | b'd', more @ ..]) => (b'=', more),
            _ => (first, tail),
        };
        out.push(byte);
        rest = more;
    }
    Some(out)
}

/// The `username` directive of a DIGEST-MD5 response (a quoted string with
/// `\` escapes, or a bare token), at the start or after a comma.
fn digest_username(message: &[u8]) -> Option<Vec<u8>> {
    let mut rest = message;
    loop {
        rest = trim_start(rest);
        let eq = rest.iter().position(|&b| b == b'=')?;
        let key = trim_end(&rest[..eq]);
        let mut value = Vec::new();
        let mut after = trim_start(&rest[eq + 1..]);
        if let Some(quoted) = after.strip_prefix(b"\"") {
            let mut bytes = quoted.iter();
            let mut consumed = 1;
            while let Some(&b) = bytes.next() {
                consumed += 1;
                match b {
                    b'"' => break,
                    b'\\' => {
                        if let Some(&escaped) = bytes.next() {
                            consumed += 1;
                            value.push(escaped);
                        }
                    }
                    _ => value.push(b),
                }
            }
            after = &after[consumed.min(after.len())..];
        } else {
            let end = after.iter().position(|&b| b == b',').unwrap_or(after.len());
            value.extend_from_slice(trim_end(&after[..end]));
            after = &after[end..];
        }
        if key.eq_ignore_ascii_case(b"username") {
            return Some(value);
        }
        let comma = after.iter().position(|&b| b == b',')?;
        rest = &after[comma + 1..];
    }
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

fn trim_end(bytes: &[u8]) -> &[u8] {
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |at| at + 1);
    &bytes[..end]
}

/// What comes before the last space of `bytes`.
fn before_last_space(bytes: &[u8]) -> Option<&[u8]> {
    let at = bytes.iter().rposition(|&b| b == b' ')?;
    Some(&bytes[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into_bytes()
    }

    #[test]
    fn the_command_names_the_mechanism_and_perhaps_the_account() {
        let (sasl, account) = SaslAccount::from_command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==");
        assert_eq!(
            (sasl, account.as_deref()),
            (SaslAccount::Done, Some("alice"))
        );
        let (sasl, account) = SaslAccount::from_command(b"auth  login");
        assert_eq!((sasl, account), (SaslAccount::Login, None));
        let (sasl, account) = SaslAccount::from_command(b"AUTH");
        assert_eq!((sasl, account), (SaslAccount::Done, None));
    }

    #[test]
    fn base64_is_read_with_or_without_padding() {
        // `\0alice\0secret` without its `==`: Cyrus and Dovecot take it.
        let (_, account) = SaslAccount::from_command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA");
        assert_eq!(account.as_deref(), Some("alice"));
    }

    #[test]
    fn plain_names_the_authentication_identity_not_the_authorization_one() {
        let mut sasl = SaslAccount::new("plain");
        let message = b64(b"admin\0Alice@Example.COM\0secret");
        assert_eq!(sasl.read(&message).as_deref(), Some("alice@example.com"));
        // Only once: the exchange named its account.
        assert_eq!(sasl.read(&message), None);
        let mut sasl = SaslAccount::new("PLAIN");
        assert_eq!(
            sasl.read_initial(Some(&b64(b"\0alice\0wrong"))).as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn login_names_its_account_in_the_first_message() {
        let mut sasl = SaslAccount::new("LOGIN");
        assert_eq!(sasl.read_initial(None), None);
        assert_eq!(sasl.read(&b64(b"ALICE")).as_deref(), Some("alice"));
        assert_eq!(sasl.read(&b64(b"password")), None);
        let mut sasl = SaslAccount::new("login");
        assert_eq!(
            sasl.read_initial(Some(&b64(b"bob"))).as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn cram_md5_names_the_account_before_the_digest() {
        let mut sasl = SaslAccount::new("CRAM-MD5");
        assert_eq!(sasl.read_initial(Some(&b64(b"ignored x"))), None);
        let message = b64(b"tim b913a602c7eda7a495b4e6e7334d3890");
        assert_eq!(sasl.read(&message).as_deref(), Some("tim"));
    }

    #[test]
    fn scram_names_the_client_first_messages_user_unescaped() {
        for mechanism in ["SCRAM-SHA-1", "scram-sha-256-plus"] {
            let mut sasl = SaslAccount::new(mechanism);
            let first = b64(b"n,,n=Al=2Cice=3D,r=fyko+d2lbbFgONRv9qkxdawL");
            assert_eq!(sasl.read(&first).as_deref(), Some("al,ice="), "{mechanism}");
        }
        // An authzid in the GS2 header is not the account.
        let (_, account) = SaslAccount::from_command(
            &[
                b"AUTH SCRAM-SHA-256 ".as_slice(),
                &b64(b"y,a=admin,n=bob,r=abc"),
            ]
            .concat(),
        );
        assert_eq!(account.as_deref(), Some("bob"));
    }

    #[test]
    fn digest_md5_names_its_username_directive() {
        let response = b64(
            br#"charset=utf-8,username="Chris\"s",realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",nc=00000001,cnonce="OA6MHXh6VqTrRk",digest-uri="smtp/elwood.innosoft.com",response=d388dad90d4bbd760a152321f2143af7,qop=auth"#,
        );
        let mut sasl = SaslAccount::new("DIGEST-MD5");
        assert_eq!(sasl.read_initial(None), None);
        assert_eq!(sasl.read(&response).as_deref(), Some("chris\"s"));
        let bare = b64(b"realm=x, username = tim ,nonce=\"a,b\"");
        assert_eq!(
            SaslAccount::new("DIGEST-MD5").read(&bare).as_deref(),
            Some("tim")
        );
        let none = b64(br#"realm="username=eve",nonce=1"#);
        assert_eq!(SaslAccount::new("DIGEST-MD5").read(&none), None);
    }

    #[test]
    fn xoauth2_names_its_user() {
        let message = b64(b"user=Someone@Example.com\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01");
        let (_, account) =
            SaslAccount::from_command(&[b"AUTH XOAUTH2 ".as_slice(), &message].concat());
        assert_eq!(account.as_deref(), Some("someone@example.com"));
    }

    #[test]
    fn nothing_is_named_by_a_cancel_bad_base64_an_empty_name_or_other_mechanisms() {
        for message in [&b"*"[..], b"not base64!", b"="] {
            assert_eq!(SaslAccount::new("PLAIN").read(message), None, "{message:?}");
            assert_eq!(SaslAccount::new("LOGIN").read(message), None, "{message:?}");
        }
        assert_eq!(SaslAccount::new("PLAIN").read(&b64(b"no separators")), None);
        assert_eq!(SaslAccount::new("PLAIN").read(&b64(b"\0\0pw")), None);
        for mechanism in ["GSSAPI", "NTLM", "OAUTHBEARER", "EXTERNAL", ""] {
            let mut sasl = SaslAccount::new(mechanism);
            assert_eq!(sasl.read(&b64(b"\0alice\0pw")), None, "{mechanism}");
        }
    }

    #[test]
    fn a_long_name_is_cut_and_any_bytes_are_taken() {
        let long = vec![b'a'; 10_000];
        let key = SaslAccount::new("LOGIN").read(&b64(&long)).unwrap();
        assert_eq!(key.len(), MAX_ACCOUNT_LEN);
        let odd = SaslAccount::new("LOGIN")
            .read(&b64(&[0xff, b'X', 0]))
            .unwrap();
        assert_eq!(odd, "\u{fffd}x\0");
    }
}
