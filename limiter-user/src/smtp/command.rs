//! SMTP commands: the verb of a command line, and the envelope paths of
//! `MAIL FROM` and `RCPT TO` with their ESMTP parameters.
//!
//! [`parse_command`] never fails: a line it cannot make sense of is
//! [`Verb::Unknown`], and the proxy decides what to answer. The path parsers
//! return a typed [`PathError`] that the proxy maps to its reply (`501 5.1.7`
//! for a bad sender, `501 5.1.3` for a bad recipient, `501 5.5.4` for a bad
//! parameter — see [`PathError::is_parameter_error`]).
//!
//! The syntax follows RFC 5321 §4.1.2 with the leniency real clients need and
//! Postfix shows by default: verbs in any case, blanks around the arguments
//! and after the `FROM:`/`TO:` keyword, a mailbox without a domain. Angle
//! brackets are required.

use std::borrow::Cow;

/// The longest accepted path, in bytes, counted between the angle brackets
/// (RFC 5321 §4.5.3.1.3 gives 256 octets for a reverse- or forward-path).
pub const MAX_PATH_LEN: usize = 256;

/// The command a line starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `HELO` (RFC 5321).
    Helo,
    /// `EHLO` (RFC 5321).
    Ehlo,
    /// `MAIL FROM:` (RFC 5321).
    Mail,
    /// `RCPT TO:` (RFC 5321).
    Rcpt,
    /// `DATA` (RFC 5321).
    Data,
    /// `BDAT` (RFC 3030 CHUNKING; the proxy does not offer it).
    Bdat,
    /// `RSET` (RFC 5321).
    Rset,
    /// `NOOP` (RFC 5321).
    Noop,
    /// `QUIT` (RFC 5321).
    Quit,
    /// `VRFY` (RFC 5321).
    Vrfy,
    /// `EXPN` (RFC 5321).
    Expn,
    /// `HELP` (RFC 5321).
    Help,
    /// `AUTH` (RFC 4954).
    Auth,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `XCLIENT` (Postfix); only the proxy may send it to the backend.
    Xclient,
    /// `XFORWARD` (Postfix); only the proxy may send it to the backend.
    Xforward,
    /// `PROXY` (HAProxy protocol v1 header); a client must not inject it.
    Proxy,
    /// Anything else, including an empty line.
    Unknown,
}

impl Verb {
    /// Every verb with its name, `Unknown` excepted.
    const NAMES: [(&'static str, Verb); 17] = [
        ("HELO", Verb::Helo),
        ("EHLO", Verb::Ehlo),
        ("MAIL", Verb::Mail),
        ("RCPT", Verb::Rcpt),
        ("DATA", Verb::Data),
        ("BDAT", Verb::Bdat),
        ("RSET", Verb::Rset),
        ("NOOP", Verb::Noop),
        ("QUIT", Verb::Quit),
        ("VRFY", Verb::Vrfy),
        ("EXPN", Verb::Expn),
        ("HELP", Verb::Help),
        ("AUTH", Verb::Auth),
        ("STARTTLS", Verb::StartTls),
        ("XCLIENT", Verb::Xclient),
        ("XFORWARD", Verb::Xforward),
        ("PROXY", Verb::Proxy),
    ];

    /// The verb a word names, compared without regard to ASCII case.
    #[must_use]
    pub fn from_word(word: &[u8]) -> Verb {
        Self::NAMES
            .iter()
            .find(|(name, _)| name.as_bytes().eq_ignore_ascii_case(word))
            .map_or(Verb::Unknown, |&(_, verb)| verb)
    }

    /// The verb's canonical upper-case name (`"UNKNOWN"` for
    /// [`Verb::Unknown`]), for logs and metrics labels.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|&&(_, verb)| verb == self)
            .map_or("UNKNOWN", |&(name, _)| name)
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The command.
    pub verb: Verb,
    /// The text after the verb, without the blanks (SP, HTAB) around it;
    /// empty when there is none. For `MAIL`/`RCPT` it starts with
    /// `FROM:`/`TO:`, ready for [`parse_mail_from`]/[`parse_rcpt_to`].
    pub args: String,
    /// Whether the arguments were valid UTF-8. When not, `args` holds a lossy
    /// conversion (U+FFFD in place of the bad bytes) and the proxy should
    /// not use it as an address.
    pub utf8: bool,
}

/// Parses a command line (without its terminator).
///
/// The verb is the first word, up to a blank or the end of the line, in any
/// case; leading blanks are skipped. An empty line or a first word that is
/// no known verb gives [`Verb::Unknown`].
#[must_use]
pub fn parse_command(line: &[u8]) -> Command {
    let line = trim_blanks(line);
    let verb_end = line.iter().position(|&b| is_blank(b)).unwrap_or(line.len());
    let (word, rest) = line.split_at(verb_end);
    let rest = trim_blanks(rest);
    let (args, utf8) = match String::from_utf8_lossy(rest) {
        Cow::Borrowed(s) => (s.to_owned(), true),
        Cow::Owned(s) => (s, false),
    };
    Command {
        verb: Verb::from_word(word),
        args,
        utf8,
    }
}

/// Why an envelope path or its parameters were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The arguments do not start with `FROM:` (MAIL) or `TO:` (RCPT).
    #[error("expected {0}")]
    MissingKeyword(&'static str),
    /// The path is not enclosed in angle brackets (`FROM:a@b`).
    #[error("address not enclosed in angle brackets")]
    MissingAngleBrackets,
    /// No closing `>` (or an unterminated quoted string).
    #[error("unterminated address")]
    Unterminated,
    /// `RCPT TO:<>`: a recipient cannot be empty.
    #[error("empty recipient address")]
    EmptyRecipient,
    /// The path is longer than [`MAX_PATH_LEN`].
    #[error("address longer than {MAX_PATH_LEN} bytes")]
    TooLong,
    /// The address does not follow the mailbox syntax.
    #[error("bad address syntax: {0}")]
    BadAddress(&'static str),
    /// A parameter after the path does not follow the `KEY[=value]` syntax,
    /// or its value is unusable (`SIZE=abc`).
    #[error("bad parameter syntax: {0}")]
    BadParameter(String),
}

impl PathError {
    /// Whether the error is about the parameters rather than the address
    /// (`501 5.5.4` rather than `501 5.1.7`/`501 5.1.3`).
    #[must_use]
    pub fn is_parameter_error(&self) -> bool {
        matches!(self, PathError::BadParameter(_))
    }
}

/// An ESMTP parameter: the keyword in upper case, and its value as sent.
pub type Param = (String, Option<String>);

/// The arguments of `MAIL FROM:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The sender, without angle brackets or source route; `None` for the
    /// null sender `<>` (bounces and other notifications).
    pub sender: Option<String>,
    /// The ESMTP parameters in order (`SIZE`, `BODY`, `SMTPUTF8`, …); the
    /// keywords are upper-cased, the values kept as sent.
    pub params: Vec<Param>,
}

impl MailFrom {
    /// The declared message size (`SIZE=`), if any. The value was checked
    /// to be a decimal number when the command was parsed.
    #[must_use]
    pub fn size(&self) -> Option<u64> {
        find_param(&self.params, "SIZE")
            .flatten()
            .and_then(|v| v.parse().ok())
    }

    /// The value of parameter `key` (case-insensitive): `None` when absent,
    /// `Some(None)` when present without a value.
    #[must_use]
    pub fn param(&self, key: &str) -> Option<Option<&str>> {
        find_param(&self.params, key)
    }

    /// Whether the sender is the null sender `<>`.
    #[must_use]
    pub fn is_null_sender(&self) -> bool {
        self.sender.is_none()
    }
}

/// The arguments of `RCPT TO:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    /// The recipient, without angle brackets or source route; may lack a
    /// domain (`postmaster`).
    pub recipient: String,
    /// The ESMTP parameters in order (`NOTIFY`, `ORCPT`, …); the keywords are
    /// upper-cased, the values kept as sent.
    pub params: Vec<Param>,
}

impl RcptTo {
    /// The value of parameter `key` (case-insensitive): `None` when absent,
    /// `Some(None)` when present without a value.
    #[must_use]
    pub fn param(&self, key: &str) -> Option<Option<&str>> {
        find_param(&self.params, key)
    }
}

/// Parses the arguments of `MAIL` (what [`Command::args`] holds):
/// `FROM:<path> [params]`.
///
/// Accepted: `FROM:<a@b>`, `FROM: <a@b>` (blanks after the colon), `FROM:<>`,
/// a source route `<@x,@y:a@b>` (dropped), a quoted local part (`"a b"@d`,
/// kept with its quotes), a mailbox without a domain, then parameters
/// separated by blanks (`SIZE=1234 BODY=8BITMIME SMTPUTF8`).
///
/// # Errors
///
/// A [`PathError`] naming what is wrong; `FROM:a@b` without brackets is
/// [`PathError::MissingAngleBrackets`]. A `SIZE` that is not a decimal
/// number is [`PathError::BadParameter`].
pub fn parse_mail_from(args: &str) -> Result<MailFrom, PathError> {
    let (path, params) = split_path(args, "FROM:")?;
    let sender = if path.is_empty() {
        None
    } else {
        Some(mailbox(path)?.to_owned())
    };
    let params = parse_params(params)?;
    if let Some(value) = find_param(&params, "SIZE") {
        let valid = value.is_some_and(|v| {
            !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit())
        });
        if !valid || value.and_then(|v| v.parse::<u64>().ok()).is_none() {
            return Err(PathError::BadParameter(
                "SIZE must be a decimal number".into(),
            ));
        }
    }
    Ok(MailFrom { sender, params })
}

/// Parses the arguments of `RCPT` (what [`Command::args`] holds):
/// `TO:<path> [params]`.
///
/// The same syntax as [`parse_mail_from`], except that the path cannot be
/// empty; `TO:<postmaster>` (no domain) is accepted.
///
/// # Errors
///
/// A [`PathError`] naming what is wrong; `TO:<>` is
/// [`PathError::EmptyRecipient`].
pub fn parse_rcpt_to(args: &str) -> Result<RcptTo, PathError> {
    let (path, params) = split_path(args, "TO:")?;
    if path.is_empty() {
        return Err(PathError::EmptyRecipient);
    }
    let recipient = mailbox(path)?.to_owned();
    let params = parse_params(params)?;
    Ok(RcptTo { recipient, params })
}

/// Splits `KEYWORD <path> params` into the text between the angle brackets
/// and the text after the closing bracket.
fn split_path<'a>(args: &'a str, keyword: &'static str) -> Result<(&'a str, &'a str), PathError> {
    let args = args.trim_matches(|c| c == ' ' || c == '\t');
    let rest = match args.get(..keyword.len()) {
        Some(head) if head.eq_ignore_ascii_case(keyword) => &args[keyword.len()..],
        _ => return Err(PathError::MissingKeyword(keyword)),
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    let Some(inner) = rest.strip_prefix('<') else {
        return Err(PathError::MissingAngleBrackets);
    };
    let close = closing_bracket(inner)?;
    let path = &inner[..close];
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong);
    }
    Ok((path, &inner[close + 1..]))
}

/// The offset of the `>` that closes a path, skipping quoted strings.
fn closing_bracket(s: &str) -> Result<usize, PathError> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted {
            match b {
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => quoted = true,
                b'>' => return Ok(i),
                _ => {}
            }
        }
    }
    Err(PathError::Unterminated)
}

/// Checks a non-empty path and returns its mailbox (the source route, if
/// any, removed).
fn mailbox(path: &str) -> Result<&str, PathError> {
    let mailbox = if path.starts_with('@') {
        // A-d-l ":" Mailbox; the route is obsolete and ignored (RFC 5321
        // §4.1.2, Appendix C), but it must still look like one.
        let Some(colon) = path.find(':') else {
            return Err(PathError::BadAddress("source route without ':'"));
        };
        let route = &path[..colon];
        let route_ok = route
            .split(',')
            .all(|hop| hop.strip_prefix('@').is_some_and(valid_domain));
        if !route_ok {
            return Err(PathError::BadAddress("bad source route"));
        }
        &path[colon + 1..]
    } else {
        path
    };
    if mailbox.is_empty() {
        return Err(PathError::BadAddress("empty mailbox"));
    }
    let (local, domain) = split_mailbox(mailbox)?;
    if !valid_local_part(local) {
        return Err(PathError::BadAddress("bad local part"));
    }
    if let Some(domain) = domain {
        if !valid_domain(domain) {
            return Err(PathError::BadAddress("bad domain"));
        }
    }
    Ok(mailbox)
}

/// Splits a mailbox at the `@` after its local part (a quoted local part may
/// contain `@`).
fn split_mailbox(mailbox: &str) -> Result<(&str, Option<&str>), PathError> {
    let local_end = if mailbox.starts_with('"') {
        quoted_end(mailbox).ok_or(PathError::Unterminated)?
    } else {
        mailbox.find('@').unwrap_or(mailbox.len())
    };
    let (local, rest) = mailbox.split_at(local_end);
    match rest.strip_prefix('@') {
        Some(domain) => Ok((local, Some(domain))),
        None if rest.is_empty() => Ok((local, None)),
        None => Err(PathError::BadAddress("text after the quoted local part")),
    }
}

/// The offset just after the quoted string `s` starts with.
fn quoted_end(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, b) in s.bytes().enumerate().skip(1) {
        if escaped {
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            return Some(i + 1);
        }
    }
    None
}

/// RFC 5321 `Local-part = Dot-string / Quoted-string`, with UTF-8 allowed
/// (RFC 6531). A dot-string is checked for its characters only: the dots'
/// placement is left to the backend, as Postfix does.
fn valid_local_part(local: &str) -> bool {
    if local.is_empty() {
        return false;
    }
    if local.starts_with('"') {
        // The quotes were matched by `quoted_end`; inside, any printable
        // character or an escaped one, never a control character.
        return local.len() >= 2 && !local.bytes().any(|b| b.is_ascii_control());
    }
    local
        .bytes()
        .all(|b| !b.is_ascii() || b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b))
}

/// A domain name (letters, digits, `-`, `_`, dots between non-empty labels,
/// UTF-8 labels) or an address literal `[…]`.
fn valid_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        return literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"[]\\".contains(&b))
        });
    }
    !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| !b.is_ascii() || b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses the parameters after the path: nothing, or blanks followed by
/// `KEY[=value]` items separated by blanks.
fn parse_params(s: &str) -> Result<Vec<Param>, PathError> {
    if s.is_empty() {
        return Ok(Vec::new());
    }
    if !s.starts_with([' ', '\t']) {
        return Err(PathError::BadParameter(
            "text right after the address".into(),
        ));
    }
    s.split([' ', '\t'])
        .filter(|item| !item.is_empty())
        .map(|item| {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (item, None),
            };
            // esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
            let key_ok = key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            // esmtp-value = 1*(%d33-60 / %d62-126), plus UTF-8 (RFC 6531)
            let value_ok = value.is_none_or(|v| {
                !v.is_empty()
                    && v.bytes()
                        .all(|b| !b.is_ascii() || (b.is_ascii_graphic() && b != b'='))
            });
            if key_ok && value_ok {
                Ok((key.to_ascii_uppercase(), value.map(str::to_owned)))
            } else {
                Err(PathError::BadParameter(format!(
                    "bad parameter {:?}",
                    item.chars().take(32).collect::<String>()
                )))
            }
        })
        .collect()
}

/// The value of `key` in `params` (case-insensitive).
fn find_param<'a>(params: &'a [Param], key: &str) -> Option<Option<&'a str>> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_deref())
}

/// SP or HTAB.
fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `s` without the blanks at both ends.
fn trim_blanks(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_blank(b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| !is_blank(b))
        .map_or(start, |i| i + 1);
    &s[start..end.max(start)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::TestRng;

    #[test]
    fn commands() {
        let cases: &[(&[u8], Verb, &str, bool)] = &[
            (b"EHLO client.example", Verb::Ehlo, "client.example", true),
            (b"ehlo client.example", Verb::Ehlo, "client.example", true),
            (b"HeLo x", Verb::Helo, "x", true),
            (b"MAIL FROM:<a@b>", Verb::Mail, "FROM:<a@b>", true),
            (
                b"mail from:<a@b> SIZE=10",
                Verb::Mail,
                "from:<a@b> SIZE=10",
                true,
            ),
            (b"RCPT TO:<c@d>", Verb::Rcpt, "TO:<c@d>", true),
            (b"MAIL   FROM:<a@b>   ", Verb::Mail, "FROM:<a@b>", true),
            (b"  NOOP  ", Verb::Noop, "", true),
            (b"NOOP\thello", Verb::Noop, "hello", true),
            (b"DATA", Verb::Data, "", true),
            (b"BDAT 100 LAST", Verb::Bdat, "100 LAST", true),
            (b"RSET", Verb::Rset, "", true),
            (b"QUIT", Verb::Quit, "", true),
            (b"VRFY root", Verb::Vrfy, "root", true),
            (b"EXPN list", Verb::Expn, "list", true),
            (b"HELP", Verb::Help, "", true),
            (
                b"AUTH PLAIN AGZvbwBiYXI=",
                Verb::Auth,
                "PLAIN AGZvbwBiYXI=",
                true,
            ),
            (b"StartTLS", Verb::StartTls, "", true),
            (b"XCLIENT ADDR=1.2.3.4", Verb::Xclient, "ADDR=1.2.3.4", true),
            (b"XFORWARD NAME=x", Verb::Xforward, "NAME=x", true),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 25",
                Verb::Proxy,
                "TCP4 1.2.3.4 5.6.7.8 1 25",
                true,
            ),
            (b"", Verb::Unknown, "", true),
            (b"   ", Verb::Unknown, "", true),
            (b"MAILFROM:<a@b>", Verb::Unknown, "", true),
            (b"GET / HTTP/1.1", Verb::Unknown, "/ HTTP/1.1", true),
            (b"EHLO\0x", Verb::Unknown, "", true),
            (b"HELO a\0b", Verb::Helo, "a\0b", true),
            (b"HELO caf\xe9", Verb::Helo, "caf\u{fffd}", false),
            (b"\xff\xfe", Verb::Unknown, "", true),
            (b"EHLO h\xc3\xa9llo", Verb::Ehlo, "h\u{e9}llo", true),
        ];
        for &(line, verb, args, utf8) in cases {
            let cmd = parse_command(line);
            assert_eq!(
                cmd,
                Command {
                    verb,
                    args: args.to_owned(),
                    utf8
                },
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn verb_names_round_trip() {
        for (name, verb) in Verb::NAMES {
            assert_eq!(Verb::from_word(name.as_bytes()), verb);
            assert_eq!(verb.as_str(), name);
        }
        assert_eq!(Verb::Unknown.as_str(), "UNKNOWN");
    }

    fn p(k: &str, v: Option<&str>) -> Param {
        (k.to_owned(), v.map(str::to_owned))
    }

    #[test]
    fn mail_from_accepted() {
        let cases: &[(&str, Option<&str>, Vec<Param>)] = &[
            ("FROM:<a@b>", Some("a@b"), vec![]),
            ("from:<a@b>", Some("a@b"), vec![]),
            ("FROM: <a@b>", Some("a@b"), vec![]),
            ("FROM:   <a@b>  ", Some("a@b"), vec![]),
            ("FROM:<>", None, vec![]),
            (
                "FROM:<> SIZE=1234 BODY=8BITMIME",
                None,
                vec![p("SIZE", Some("1234")), p("BODY", Some("8BITMIME"))],
            ),
            (
                "FROM:<a@b.example> size=1234 body=8BITMIME smtputf8",
                Some("a@b.example"),
                vec![
                    p("SIZE", Some("1234")),
                    p("BODY", Some("8BITMIME")),
                    p("SMTPUTF8", None),
                ],
            ),
            (
                "FROM:<a@b>  RET=HDRS   ENVID=x+2B",
                Some("a@b"),
                vec![p("RET", Some("HDRS")), p("ENVID", Some("x+2B"))],
            ),
            (
                "FROM:<@r1.example,@r2.example:u@d.example>",
                Some("u@d.example"),
                vec![],
            ),
            (
                "FROM:<\"a b\"@d.example>",
                Some("\"a b\"@d.example"),
                vec![],
            ),
            (
                "FROM:<\"a>b\"@d.example>",
                Some("\"a>b\"@d.example"),
                vec![],
            ),
            (
                "FROM:<\"a\\\"b\"@d.example>",
                Some("\"a\\\"b\"@d.example"),
                vec![],
            ),
            ("FROM:<user>", Some("user"), vec![]),
            ("FROM:<u@[192.0.2.1]>", Some("u@[192.0.2.1]"), vec![]),
            (
                "FROM:<u@[IPv6:2001:db8::1]>",
                Some("u@[IPv6:2001:db8::1]"),
                vec![],
            ),
            (
                "FROM:<first.last+tag@sub.example.com>",
                Some("first.last+tag@sub.example.com"),
                vec![],
            ),
            (
                "FROM:<jos\u{e9}@b\u{fc}cher.example> SMTPUTF8",
                Some("jos\u{e9}@b\u{fc}cher.example"),
                vec![p("SMTPUTF8", None)],
            ),
        ];
        for (args, sender, params) in cases {
            let got = parse_mail_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(got.sender.as_deref(), *sender, "{args:?}");
            assert_eq!(&got.params, params, "{args:?}");
        }
    }

    #[test]
    fn mail_from_refused() {
        let long = format!("FROM:<{}@example.com>", "a".repeat(245));
        assert_eq!(long.len() - "FROM:<>".len(), 257);
        let max = format!("FROM:<{}@example.com>", "a".repeat(244));
        assert!(parse_mail_from(&max).is_ok(), "256 bytes is the limit");
        let cases: &[(&str, PathError)] = &[
            ("", PathError::MissingKeyword("FROM:")),
            ("TO:<a@b>", PathError::MissingKeyword("FROM:")),
            ("FROM", PathError::MissingKeyword("FROM:")),
            ("FROM a@b", PathError::MissingKeyword("FROM:")),
            ("FROM:a@b", PathError::MissingAngleBrackets),
            ("FROM: a@b", PathError::MissingAngleBrackets),
            ("FROM:", PathError::MissingAngleBrackets),
            ("FROM:<a@b", PathError::Unterminated),
            ("FROM:<\"a>b@c>", PathError::Unterminated),
            (&long, PathError::TooLong),
            ("FROM:<a b@c>", PathError::BadAddress("bad local part")),
            ("FROM:<a@b@c>", PathError::BadAddress("bad domain")),
            ("FROM:<a@>", PathError::BadAddress("bad domain")),
            (
                "FROM:<@b>",
                PathError::BadAddress("source route without ':'"),
            ),
            ("FROM:<a@b..c>", PathError::BadAddress("bad domain")),
            ("FROM:<a\0@b>", PathError::BadAddress("bad local part")),
            ("FROM:<a@b\0>", PathError::BadAddress("bad domain")),
            ("FROM:<@x:>", PathError::BadAddress("empty mailbox")),
            ("FROM:<@:a@b>", PathError::BadAddress("bad source route")),
            (
                "FROM:<\"ab\"x@c>",
                PathError::BadAddress("text after the quoted local part"),
            ),
            ("FROM:<\"a\0b\"@c>", PathError::BadAddress("bad local part")),
            (
                "FROM:<a@b>SIZE=1",
                PathError::BadParameter("text right after the address".into()),
            ),
            (
                "FROM:<a@b> =1",
                PathError::BadParameter("bad parameter \"=1\"".into()),
            ),
            (
                "FROM:<a@b> SIZE=",
                PathError::BadParameter("bad parameter \"SIZE=\"".into()),
            ),
            (
                "FROM:<a@b> X=a=b",
                PathError::BadParameter("bad parameter \"X=a=b\"".into()),
            ),
            (
                "FROM:<a@b> SIZE=abc",
                PathError::BadParameter("SIZE must be a decimal number".into()),
            ),
            (
                "FROM:<a@b> SIZE",
                PathError::BadParameter("SIZE must be a decimal number".into()),
            ),
            (
                "FROM:<a@b> SIZE=99999999999999999999999",
                PathError::BadParameter("SIZE must be a decimal number".into()),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(parse_mail_from(args).as_ref(), Err(want), "{args:?}");
        }
    }

    #[test]
    fn size_and_params() {
        let m = parse_mail_from("FROM:<> SIZE=10240000 BODY=8BITMIME SMTPUTF8").unwrap();
        assert!(m.is_null_sender());
        assert_eq!(m.size(), Some(10_240_000));
        assert_eq!(m.param("body"), Some(Some("8BITMIME")));
        assert_eq!(m.param("SMTPUTF8"), Some(None));
        assert_eq!(m.param("RET"), None);
        assert_eq!(parse_mail_from("FROM:<a@b>").unwrap().size(), None);
        assert!(PathError::BadParameter(String::new()).is_parameter_error());
        assert!(!PathError::TooLong.is_parameter_error());
    }

    #[test]
    fn rcpt_to() {
        let ok: &[(&str, &str, Vec<Param>)] = &[
            ("TO:<c@d.example>", "c@d.example", vec![]),
            ("to: <C@D.example>", "C@D.example", vec![]),
            ("TO:<postmaster>", "postmaster", vec![]),
            (
                "TO:<Postmaster@example.com>",
                "Postmaster@example.com",
                vec![],
            ),
            (
                "TO:<\"quoted local\"@example.com>",
                "\"quoted local\"@example.com",
                vec![],
            ),
            ("TO:<@hop.example:u@d.example>", "u@d.example", vec![]),
            (
                "TO:<u@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@d",
                "u@d",
                vec![
                    p("NOTIFY", Some("SUCCESS,FAILURE")),
                    p("ORCPT", Some("rfc822;u@d")),
                ],
            ),
        ];
        for (args, rcpt, params) in ok {
            let got = parse_rcpt_to(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(got.recipient, *rcpt, "{args:?}");
            assert_eq!(&got.params, params, "{args:?}");
        }
        let long = format!("TO:<{}@example.com>", "b".repeat(245));
        let bad: &[(&str, PathError)] = &[
            ("TO:<>", PathError::EmptyRecipient),
            ("TO:<> NOTIFY=NEVER", PathError::EmptyRecipient),
            ("FROM:<a@b>", PathError::MissingKeyword("TO:")),
            ("TO:c@d", PathError::MissingAngleBrackets),
            ("TO:<c@d", PathError::Unterminated),
            (&long, PathError::TooLong),
            (
                "TO:<c@d> ,",
                PathError::BadParameter("bad parameter \",\"".into()),
            ),
        ];
        for (args, want) in bad {
            assert_eq!(parse_rcpt_to(args).as_ref(), Err(want), "{args:?}");
        }
    }

    #[test]
    fn command_then_path() {
        let cmd = parse_command(b"MAIL FROM:<> SIZE=12");
        assert_eq!(cmd.verb, Verb::Mail);
        assert_eq!(parse_mail_from(&cmd.args).unwrap().size(), Some(12));
        let cmd = parse_command(b"rcpt to: <\"quoted local\"@example.com>");
        assert_eq!(
            parse_rcpt_to(&cmd.args).unwrap().recipient,
            "\"quoted local\"@example.com"
        );
    }

    /// Random command lines: no panic in any parser.
    #[test]
    fn random_input_never_panics() {
        let mut rng = TestRng::new(0xC0DE);
        let heads: &[&[u8]] = &[
            b"",
            b"MAIL FROM:",
            b"RCPT TO:",
            b"mail from: <",
            b"RCPT TO:<@",
            b"EHLO ",
        ];
        for _ in 0..20_000 {
            let mut line = heads[rng.below(heads.len())].to_vec();
            let len = rng.below(80);
            line.extend(rng.bytes(len, b"<>@\"\\:,.= \taZ09[]\xc3\xa9"));
            let cmd = parse_command(&line);
            let _ = Verb::from_word(&line);
            for args in [cmd.args.as_str(), &String::from_utf8_lossy(&line)] {
                if let Ok(m) = parse_mail_from(args) {
                    let _ = m.size();
                    if let Some(s) = &m.sender {
                        assert!(s.len() <= MAX_PATH_LEN);
                    }
                }
                if let Ok(r) = parse_rcpt_to(args) {
                    assert!(!r.recipient.is_empty() && r.recipient.len() <= MAX_PATH_LEN);
                }
            }
        }
    }
}
