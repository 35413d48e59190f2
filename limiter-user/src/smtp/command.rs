//! SMTP commands: the verb of a command line, and the envelope paths of
//! `MAIL FROM` and `RCPT TO` with their ESMTP parameters.
//!
//! Two layers, so that the proxy never relays a line the backend could read
//! differently from the way the proxy judged it:
//!
//! * [`check_command_line`] is the strict byte-level check every command line
//!   passes before anything else (see its docs for the accepted syntax and
//!   [`CommandLineError::reply`] for the answers); [`parse_command_line`]
//!   is the check followed by [`parse_command`]. [`check_sasl_response`] is
//!   the same idea for the lines a client sends during `AUTH`.
//! * [`parse_command`] never fails: a line it cannot make sense of is
//!   [`Verb::Unknown`]. It splits the verb off the way Postfix's smtpd does
//!   (`smtpd_token()`: whitespace is C `isspace()`), so even an unchecked
//!   line gives the verb Postfix reads.
//!
//! The path parsers return a typed [`PathError`] that the proxy maps to its
//! reply (`501 5.1.7` for a bad sender, `501 5.1.3` for a bad recipient,
//! `501 5.5.4` for a bad parameter — see [`PathError::is_parameter_error`]).
//! A parsed path carries its address in canonical form (the key for patterns
//! and directory lookups) and the [`SecondRoute`] it hides, if any: the
//! session refuses a recipient that has one (`550 5.7.1`, see
//! [`SecondRoute::reply`]), because the backend would route it to another
//! domain than the one the relay rules judged.
//!
//! The syntax follows RFC 5321 §4.1.2 with the leniency real clients need and
//! Postfix shows by default: verbs in any case, blanks around the arguments
//! and after the `FROM:`/`TO:` keyword, a mailbox without a domain, one
//! trailing dot after the domain. Angle brackets are required.
//!
//! # How Postfix reads the same line (postfix-3.12, `src/smtpd/smtpd.c`,
//! `smtpd_token.c`, `global/tok822_parse.c`, `trivial-rewrite/resolve.c`)
//!
//! * A line whose bytes are not valid UTF-8 is refused with `500 5.5.2 Error:
//!   bad UTF-8 syntax` when `smtputf8_enable = yes` (the default).
//! * `smtpd_token()` splits on `ISSPACE()` (SP, HTAB, LF, VT, FF, CR) except
//!   inside `"…"` and `<…>` (which nest) and after `\`; a token that reads
//!   `to:` or `from:` ends at the colon. A NUL ends the line (C string). The
//!   verb is the first token compared with `strcasecmp()`, so
//!   `RCPT\x0bTO:<x>` *is* `RCPT` for Postfix: the proxy refuses it.
//! * `extract_addr()` strips one pair of `<>`, drops a source route up to the
//!   first `:` when the text starts with `@`, parses the rest as an RFC 822
//!   address and keeps its *internal* (unquoted) form. An empty internal form
//!   is the null sender: `<>`, `<"">`, `< >`, `<@a:>`, `<@a:"">`,
//!   `<"" (comment)>`, and, without brackets (`smtpd_strict_rfc821_envelopes
//!   = no`), `FROM:""`. The proxy treats `<"">` and `<@route:"">` as null and
//!   refuses every other one of these spellings (`501`).
//! * trivial-rewrite strips a local domain (case-insensitively, after
//!   removing one trailing dot) and then routes on what is left of the local
//!   part: `a%b` (`allow_percent_hack = yes`), `b!a` (`swap_bangpath =
//!   yes`), and, inside a quoted local part (`resolve_dequoted_address =
//!   yes`), `@`, `%` and `!` too. Those are the [`SecondRoute`]s.

use std::borrow::Cow;

use super::helo::canonical_literal;
use super::reply::Reply;
use crate::recipients::address::Folding;

/// The longest accepted path, in bytes, counted between the angle brackets
/// (RFC 5321 §4.5.3.1.3 gives 256 octets for a reverse- or forward-path).
pub const MAX_PATH_LEN: usize = 256;

/// The longest accepted verb, in bytes (the same bound `smtp.relay_verbs`
/// has in the configuration).
pub const MAX_VERB_LEN: usize = 32;

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
    /// The text after the verb, without the whitespace around it (SP and
    /// HTAB; VT, FF, CR and LF too, which only an unchecked line can hold);
    /// empty when there is none. For `MAIL`/`RCPT` it starts with
    /// `FROM:`/`TO:`, ready for [`parse_mail_from`]/[`parse_rcpt_to`].
    pub args: String,
    /// Whether the arguments were valid UTF-8. When not, `args` holds a lossy
    /// conversion (U+FFFD in place of the bad bytes) and the proxy should
    /// not use it as an address. Always `true` for a line that passed
    /// [`check_command_line`].
    pub utf8: bool,
}

/// Parses a command line (without its terminator).
///
/// The verb is the first word, up to a C `isspace()` byte (SP, HTAB, LF, VT,
/// FF, CR — where Postfix's `smtpd_token()` ends it) or the end of the line,
/// in any case; leading whitespace is skipped. An empty line or a first word
/// that is no known verb gives [`Verb::Unknown`]. Call
/// [`check_command_line`] first (or use [`parse_command_line`]): this
/// function accepts anything.
#[must_use]
pub fn parse_command(line: &[u8]) -> Command {
    let line = trim_c_space(line);
    let verb_end = line
        .iter()
        .position(|&b| is_c_space(b))
        .unwrap_or(line.len());
    let (word, rest) = line.split_at(verb_end);
    let rest = trim_c_space(rest);
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

/// [`check_command_line`], then [`parse_command`]: the command of a line
/// the proxy may judge and relay. The returned [`Command::utf8`] is always
/// `true`.
///
/// # Errors
///
/// The [`CommandLineError`] of [`check_command_line`].
pub fn parse_command_line(line: &[u8]) -> Result<Command, CommandLineError> {
    check_command_line(line)?;
    Ok(parse_command(line))
}

/// Why a command line was refused before its verb was even looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandLineError {
    /// Nothing but blanks (Postfix: `500 5.5.2 Error: bad syntax`).
    #[error("empty command line")]
    Empty,
    /// A control byte other than HTAB (0x00–0x08, 0x0A–0x1F, 0x7F): bytes
    /// some servers take as separators (Postfix: VT, FF, CR) and others as
    /// text, or that end a C string (NUL).
    #[error("control byte {byte:#04x} at offset {at}")]
    ControlByte {
        /// The byte.
        byte: u8,
        /// Its offset in the line.
        at: usize,
        /// Whether it comes after the verb and the blank that ends it (an
        /// argument error, `501`) rather than in or right after the verb
        /// (`500`: the command itself is unreadable).
        in_arguments: bool,
    },
    /// The verb does not start with an ASCII letter, holds something other
    /// than ASCII letters, digits and `-`, or is followed by something
    /// other than a blank or the end of the line (`MAIL:`, `RCPT\u{a0}TO`).
    #[error("malformed command verb at offset {at}")]
    BadVerb {
        /// The offset of the first offending byte.
        at: usize,
    },
    /// The verb is longer than [`MAX_VERB_LEN`] bytes.
    #[error("command verb longer than {MAX_VERB_LEN} bytes")]
    VerbTooLong,
    /// The line is not valid UTF-8 (Postfix, with `smtputf8_enable = yes`,
    /// the default: `500 5.5.2 Error: bad UTF-8 syntax`).
    #[error("invalid UTF-8 at offset {at}")]
    InvalidUtf8 {
        /// The offset of the first byte that is not valid UTF-8.
        at: usize,
    },
}

impl CommandLineError {
    /// The reply the session sends (the line is neither judged nor relayed):
    ///
    /// * [`Empty`](Self::Empty): `500 5.5.2 Error: bad syntax`;
    /// * [`BadVerb`](Self::BadVerb), [`VerbTooLong`](Self::VerbTooLong), a
    ///   [`ControlByte`](Self::ControlByte) in or right after the verb:
    ///   `500 5.5.2 Error: command not recognized` ([`Reply::syntax_error`]);
    /// * a [`ControlByte`](Self::ControlByte) in the arguments:
    ///   `501 5.5.4 Syntax error: control character in arguments`;
    /// * [`InvalidUtf8`](Self::InvalidUtf8): `500 5.5.2 Error: bad UTF-8
    ///   syntax` (Postfix's text).
    ///
    /// All of them are protocol errors the session counts like an unknown
    /// command.
    #[must_use]
    pub fn reply(&self) -> Reply {
        match self {
            CommandLineError::Empty => Reply::new(500, "5.5.2 Error: bad syntax"),
            CommandLineError::ControlByte {
                in_arguments: true, ..
            } => Reply::new(501, "5.5.4 Syntax error: control character in arguments"),
            CommandLineError::ControlByte { .. }
            | CommandLineError::BadVerb { .. }
            | CommandLineError::VerbTooLong => Reply::syntax_error(),
            CommandLineError::InvalidUtf8 { .. } => {
                Reply::new(500, "5.5.2 Error: bad UTF-8 syntax")
            }
        }
    }
}

/// Checks the bytes of a command line (without its terminator) before the
/// proxy reads its verb, so that the proxy and the backend cannot disagree
/// about which command it is.
///
/// Accepted, with the leniency real MTAs show: `[blanks] verb [blanks args]
/// [blanks]` where a blank is SP or HTAB; the verb is an ASCII letter
/// followed by ASCII letters, digits or `-` (extension verbs such as
/// `XEXCH50`, `X-LINK2STATE`), at most [`MAX_VERB_LEN`] bytes, in any case;
/// the arguments are any valid UTF-8 text without control characters (HTAB
/// allowed), so SMTPUTF8 addresses pass and their syntax is left to the
/// path and HELO parsers.
///
/// When this returns `Ok`, the verb [`parse_command`] reads is the first
/// token Postfix's `smtpd_token()` reads (which the tests check on random
/// lines).
///
/// The whole line must be valid UTF-8, whatever the verb: Postfix (with
/// `smtputf8_enable = yes`, its default) refuses such a line outright, and
/// a backend that reads raw bytes would read arguments the proxy only saw
/// through a lossy conversion.
///
/// AUTH continuation lines are no command lines: check them with
/// [`check_sasl_response`].
///
/// # Errors
///
/// A [`CommandLineError`]; [`CommandLineError::reply`] gives the answer.
pub fn check_command_line(line: &[u8]) -> Result<(), CommandLineError> {
    let start = line
        .iter()
        .position(|&b| !is_blank(b))
        .ok_or(CommandLineError::Empty)?;
    let verb_len = line
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'-')
        .count();
    let verb_end = start + verb_len;
    let verb_ok = line.get(start).is_some_and(u8::is_ascii_alphabetic)
        && verb_len <= MAX_VERB_LEN
        && line.get(verb_end).is_none_or(|&b| is_blank(b));
    if let Some(at) = line.iter().position(|&b| is_control(b)) {
        return Err(CommandLineError::ControlByte {
            byte: line.get(at).copied().unwrap_or_default(),
            at,
            in_arguments: verb_ok && at > verb_end,
        });
    }
    if !line.get(start).is_some_and(u8::is_ascii_alphabetic) {
        return Err(CommandLineError::BadVerb { at: start });
    }
    if verb_len > MAX_VERB_LEN {
        return Err(CommandLineError::VerbTooLong);
    }
    if line.get(verb_end).is_some_and(|&b| !is_blank(b)) {
        return Err(CommandLineError::BadVerb { at: verb_end });
    }
    std::str::from_utf8(line).map_err(|e| CommandLineError::InvalidUtf8 {
        at: e.valid_up_to(),
    })?;
    Ok(())
}

/// Why a line sent during an `AUTH` exchange was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslResponseError {
    /// A byte outside the base64 alphabet (`A–Z a–z 0–9 + / =`) in a line
    /// that is not exactly `*`.
    #[error("byte {byte:#04x} at offset {at} is not base64")]
    NotBase64 {
        /// The byte.
        byte: u8,
        /// Its offset in the line.
        at: usize,
    },
}

impl SaslResponseError {
    /// `501 5.5.2 Error: invalid base64 data in SASL response`. The session
    /// should not relay the line: it cancels the exchange with the backend
    /// (sends `*`) and gives the client this reply.
    #[must_use]
    pub fn reply(&self) -> Reply {
        Reply::new(501, "5.5.2 Error: invalid base64 data in SASL response")
    }
}

/// Checks a client response during `AUTH` (RFC 4954 §4; not a command line,
/// the session reads it separately): exactly `*` (the client cancels), or
/// base64 text, possibly empty. The alphabet is the one Postfix's Dovecot
/// glue accepts (`xsasl_dovecot_server.c` `is_valid_base64`: letters,
/// digits, `+`, `/`, `=`); no blanks, no control bytes, nothing non-ASCII,
/// so the backend reads the same response (Postfix compares the line with
/// `"*"` byte for byte). The same rule suits the initial response of an
/// `AUTH mechanism initial-response` command line.
///
/// # Errors
///
/// [`SaslResponseError::NotBase64`] at the first byte outside the alphabet.
pub fn check_sasl_response(line: &[u8]) -> Result<(), SaslResponseError> {
    if line == b"*" {
        return Ok(());
    }
    match line
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')))
    {
        Some(at) => Err(SaslResponseError::NotBase64 {
            byte: line.get(at).copied().unwrap_or_default(),
            at,
        }),
        None => Ok(()),
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
    /// `RCPT TO:<>` (or `<"">`, which Postfix reads as empty): a recipient
    /// cannot be empty.
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

/// Writes a path and its parameters back as one line: `keyword<path>`,
/// then ` KEY[=value]` for each parameter (`path_line("RCPT TO:", "a@b",
/// &[])` is `RCPT TO:<a@b>`). What [`parse_mail_from`] / [`parse_rcpt_to`]
/// read back to the same value; how the proxy rebuilds envelope lines.
#[must_use]
pub fn path_line(keyword: &str, path: &str, params: &[Param]) -> String {
    let mut line = format!("{keyword}<{path}>");
    for (key, value) in params {
        line.push(' ');
        line.push_str(key);
        if let Some(value) = value {
            line.push('=');
            line.push_str(value);
        }
    }
    line
}

/// Routing syntax that makes the backend deliver an address to another
/// destination than its domain part names: `user%evil.example@example.com`
/// is delivered to `user@evil.example` by a Postfix that thinks
/// `example.com` local. Relay patterns judge the domain part, so a recipient
/// with a second route is refused outright ([`SecondRoute::reply`]); a
/// sender with one is only reported (senders are not judged by domain).
///
/// Postfix's rules (trivial-rewrite `resolve.c` `resolve_addr`, defaults):
/// after stripping a local domain it rewrites `a%b` to `a@b`
/// (`allow_percent_hack = yes`) and `b!a` to `a@b` (`swap_bangpath = yes`)
/// and resolves again; a quoted local part is opened and searched for `@`,
/// `%` and `!` (`resolve_dequoted_address = yes`). `smtpd` drops a source
/// route (`extract_addr`), but other MTAs may follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecondRoute {
    /// A source route before the mailbox: `<@hop.example:user@domain>`
    /// (RFC 5321 obsolete A-d-l).
    SourceRoute,
    /// An `@` inside a quoted local part: `"user@evil.example"@example.com`.
    QuotedAt,
    /// A `%` in the local part, quoted or not: `user%evil.example@example.com`.
    Percent,
    /// A `!` in the local part, quoted or not: `evil.example!user@example.com`.
    Bang,
}

impl SecondRoute {
    /// A stable name for logs and metric labels (`reason` field).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            SecondRoute::SourceRoute => "source-route",
            SecondRoute::QuotedAt => "quoted-at",
            SecondRoute::Percent => "percent-hack",
            SecondRoute::Bang => "bang-path",
        }
    }

    /// The reply to a recipient with a second route: `550 5.7.1 Relay
    /// access denied` ([`Reply::relay_denied`]), like a recipient outside
    /// the relay patterns; it counts as a failed recipient.
    #[must_use]
    pub fn reply(self) -> Reply {
        Reply::relay_denied()
    }
}

impl std::fmt::Display for SecondRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The arguments of `MAIL FROM:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom {
    /// The sender as sent, without angle brackets or source route; `None`
    /// for the null sender (bounces and other notifications): `<>`, and
    /// `<"">` or `<@route:"">`, which Postfix reads as `<>` too.
    pub sender: Option<String>,
    /// The sender in canonical form ([`canonical_address`]), `None` for the
    /// null sender: the key for patterns and per-sender counting.
    pub canonical: Option<String>,
    /// Routing syntax in the sender, for logs: a sender is not refused for
    /// it (bounces go back through the same rules as any mail).
    pub second_route: Option<SecondRoute>,
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

    /// Whether the sender is the null sender, in any spelling the backend
    /// reads as one and the proxy accepts (`<>`, `<"">`, `<@route:"">`;
    /// the other spellings Postfix reads as null, such as `< >` or
    /// `<@route:>`, are refused by [`parse_mail_from`]).
    #[must_use]
    pub fn is_null_sender(&self) -> bool {
        self.sender.is_none()
    }

    /// Whether the backend will treat this sender as the null sender: a
    /// null sender ([`Self::is_null_sender`]), or `MAILER-DAEMON` in any case
    /// and quoting, bare or at any domain (Postfix's cleanup stores
    /// `MAILER-DAEMON` and `MAILER-DAEMON@$myorigin` as `<>`; the proxy does
    /// not know `$myorigin`, and a bounce address elsewhere is a bounce all
    /// the same). What the null-sender rate counts.
    #[must_use]
    pub fn counts_as_null_sender(&self) -> bool {
        self.is_null_sender()
            || self.canonical.as_deref().is_some_and(|address| {
                let local = address.rsplit_once('@').map_or(address, |(local, _)| local);
                local.eq_ignore_ascii_case("mailer-daemon")
            })
    }

    /// The domain of the canonical sender, if it has one.
    #[must_use]
    pub fn domain(&self) -> Option<&str> {
        self.canonical.as_deref().and_then(domain_of)
    }
}

/// The arguments of `RCPT TO:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo {
    /// The recipient as sent, without angle brackets or source route; may
    /// lack a domain (`postmaster`). For replies and logs of what the client
    /// wrote; rules read [`canonical`](Self::canonical).
    pub recipient: String,
    /// The recipient in canonical form ([`canonical_address`]): what relay
    /// patterns and the recipient directory are asked about.
    pub canonical: String,
    /// Routing syntax that would make the backend deliver elsewhere than
    /// the canonical domain: the session refuses the recipient
    /// ([`SecondRoute::reply`]) and logs [`SecondRoute::as_str`].
    pub second_route: Option<SecondRoute>,
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

    /// The domain of the canonical recipient, `None` for a recipient
    /// without one (`postmaster`).
    #[must_use]
    pub fn domain(&self) -> Option<&str> {
        domain_of(&self.canonical)
    }
}

/// Parses the arguments of `MAIL` (what [`Command::args`] holds):
/// `FROM:<path> [params]`.
///
/// Accepted: `FROM:<a@b>`, `FROM: <a@b>` (blanks after the colon), `FROM:<>`,
/// a source route `<@x,@y:a@b>` (dropped, reported as
/// [`SecondRoute::SourceRoute`]), a quoted local part (`"a b"@d`, kept with
/// its quotes in [`MailFrom::sender`]), a mailbox without a domain, a domain
/// with one trailing dot, then parameters separated by blanks
/// (`SIZE=1234 BODY=8BITMIME SMTPUTF8`). `<"">` and `<@x:"">` are the null
/// sender.
///
/// # Errors
///
/// A [`PathError`] naming what is wrong; `FROM:a@b` without brackets is
/// [`PathError::MissingAngleBrackets`]. A `SIZE` that is not a decimal
/// number is [`PathError::BadParameter`]. The null-sender spellings the
/// proxy does not take (`< >`, `<@x:>`, `<"" >`, `<()>`) are
/// [`PathError::BadAddress`].
pub fn parse_mail_from(args: &str) -> Result<MailFrom, PathError> {
    let (path, params) = split_path(args, "FROM:")?;
    let mailbox = if path.is_empty() {
        None
    } else {
        Some(mailbox(path)?)
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
    let (sender, canonical, second_route) = match mailbox {
        Some(m) if !m.is_empty_quoted() => (
            Some(m.mailbox.to_owned()),
            Some(m.canonical()?),
            m.second_route(),
        ),
        _ => (None, None, None),
    };
    Ok(MailFrom {
        sender,
        canonical,
        second_route,
        params,
    })
}

/// Parses the arguments of `RCPT` (what [`Command::args`] holds):
/// `TO:<path> [params]`.
///
/// The same syntax as [`parse_mail_from`], except that the path cannot be
/// empty (nor `""`, which Postfix reads as empty); `TO:<postmaster>` (no
/// domain) is accepted. Check [`RcptTo::second_route`] before judging
/// [`RcptTo::canonical`].
///
/// # Errors
///
/// A [`PathError`] naming what is wrong; `TO:<>` and `TO:<"">` are
/// [`PathError::EmptyRecipient`].
pub fn parse_rcpt_to(args: &str) -> Result<RcptTo, PathError> {
    let (path, params) = split_path(args, "TO:")?;
    if path.is_empty() {
        return Err(PathError::EmptyRecipient);
    }
    let mailbox = mailbox(path)?;
    if mailbox.is_empty_quoted() {
        return Err(PathError::EmptyRecipient);
    }
    let canonical = mailbox.canonical()?;
    let params = parse_params(params)?;
    Ok(RcptTo {
        recipient: mailbox.mailbox.to_owned(),
        canonical,
        second_route: mailbox.second_route(),
        params,
    })
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

/// The canonical form of a mailbox (`local@domain` or a bare local part,
/// as [`MailFrom::sender`] and [`RcptTo::recipient`] hold it): the key relay
/// patterns, reject lists and the recipient directory are asked about.
///
/// * the domain in lower case, without its trailing dot
///   (`user@EXAMPLE.COM.` → `user@example.com`), an address literal in the
///   form [`canonical_literal`] gives (`[IPv6:2001:DB8::1]` →
///   `[ipv6:2001:db8::1]`);
/// * the local part as sent (its case kept: the directory folds it or not,
///   `recipients.ldap.case_sensitive_local_part`), unquoted when the quotes
///   change nothing (`"user"@x` → `user@x`; `"a b"@x` stays).
///
/// The folding is [`Folding::key`]'s (the recipient directory's), so both
/// agree. `None` for text that is not a mailbox (control characters, an
/// empty local part or domain).
#[must_use]
pub fn canonical_address(mailbox: &str) -> Option<String> {
    let folding = Folding {
        case_sensitive_local_part: true,
        ..Folding::default()
    };
    let (local, domain) = split_mailbox(mailbox).ok()?;
    let Some(domain) = domain else {
        // A bare local part: fold it as the local part of a stand-in
        // address, and take the stand-in domain off again.
        let key = folding.key(&format!("{local}@x"))?;
        return key.strip_suffix("@x").map(str::to_owned);
    };
    let key = folding.key(mailbox)?;
    match canonical_literal(domain.strip_suffix('.').unwrap_or(domain)) {
        Some((literal, _)) => {
            let at = key.rfind('@')?;
            Some(format!("{}@{literal}", key.get(..at)?))
        }
        None => Some(key),
    }
}

/// The domain of a canonical address, if any.
fn domain_of(canonical: &str) -> Option<&str> {
    split_mailbox(canonical).ok()?.1
}

/// A checked mailbox, with what came before it.
#[derive(Debug, Clone, Copy)]
struct Mailbox<'a> {
    /// The mailbox without its source route.
    mailbox: &'a str,
    /// Its local part, quotes included.
    local: &'a str,
    /// Whether a source route came before it.
    routed: bool,
}

impl Mailbox<'_> {
    /// Whether the mailbox is `""`: empty once Postfix internalises it
    /// (`tok822_internalize` writes a quoted string without its quotes), so
    /// Postfix reads `<"">` as `<>`.
    fn is_empty_quoted(&self) -> bool {
        self.mailbox == "\"\""
    }

    /// The canonical form ([`canonical_address`]).
    fn canonical(&self) -> Result<String, PathError> {
        if self.mailbox.chars().any(char::is_control) {
            // Non-ASCII controls (U+0080–U+009F) pass the byte checks.
            return Err(PathError::BadAddress("control character"));
        }
        canonical_address(self.mailbox).ok_or(PathError::BadAddress("not an address"))
    }

    /// The second route the mailbox carries, if any (the first found in the
    /// order of [`SecondRoute`]'s variants).
    fn second_route(&self) -> Option<SecondRoute> {
        if self.routed {
            return Some(SecondRoute::SourceRoute);
        }
        let quoted = self.local.starts_with('"');
        let content: Cow<'_, str> = if quoted {
            Cow::Owned(unquote(self.local))
        } else {
            Cow::Borrowed(self.local)
        };
        if quoted && content.contains('@') {
            Some(SecondRoute::QuotedAt)
        } else if content.contains('%') {
            Some(SecondRoute::Percent)
        } else if content.contains('!') {
            Some(SecondRoute::Bang)
        } else {
            None
        }
    }
}

/// The content of a quoted string: without its quotes, each `\x` as `x`.
fn unquote(quoted: &str) -> String {
    let inner = quoted.strip_prefix('"').unwrap_or(quoted);
    let inner = inner.strip_suffix('"').unwrap_or(inner);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// Checks a non-empty path and returns its mailbox (the source route, if
/// any, removed, but remembered).
fn mailbox(path: &str) -> Result<Mailbox<'_>, PathError> {
    let (mailbox, routed) = if path.starts_with('@') {
        // A-d-l ":" Mailbox; the route is obsolete (RFC 5321 §4.1.2,
        // Appendix C), but it must still look like one. Postfix cuts at the
        // first ':' too (smtpd.c extract_addr).
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
        (&path[colon + 1..], true)
    } else {
        (path, false)
    };
    if mailbox.is_empty() {
        return Err(PathError::BadAddress("empty mailbox"));
    }
    let (local, domain) = split_mailbox(mailbox)?;
    if !valid_local_part(local) {
        return Err(PathError::BadAddress("bad local part"));
    }
    if let Some(domain) = domain {
        // One trailing dot is the root (`example.com.`); Postfix strips it
        // before it compares domains (resolve.c, resolve_local.c).
        if !valid_domain(domain.strip_suffix('.').unwrap_or(domain)) {
            return Err(PathError::BadAddress("bad domain"));
        }
    }
    Ok(Mailbox {
        mailbox,
        local,
        routed,
    })
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
                    // RFC 5321 dcontent, without what Postfix's tokeniser
                    // reads as quoting or nesting, or as another address.
                    .all(|b| b.is_ascii_graphic() && !b"[]\\<>\"()@".contains(&b))
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

/// C `isspace()` in the "C" locale, as Postfix's `ISSPACE()` (SP, HTAB, LF,
/// VT, FF, CR): where Postfix's command tokeniser ends a word.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// A control byte that may not appear in a command line: every ASCII
/// control but HTAB, and DEL.
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// `s` without the C `isspace()` bytes at both ends.
fn trim_c_space(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_c_space(b)).unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| !is_c_space(b))
        .map_or(start, |i| i + 1);
    s.get(start..end.max(start)).unwrap_or_default()
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

    // ---- Strict command-line syntax (issue 11) ----

    #[test]
    fn command_lines_accepted() {
        let cases: &[(&[u8], Verb)] = &[
            (b"MAIL FROM:<a@b>", Verb::Mail),
            (b"mail from:<a@b>", Verb::Mail),
            (b"MaIl FROM:<a@b>", Verb::Mail),
            (b"RCPT TO:<a@b>", Verb::Rcpt),
            (b"rCpT\tTO:<a@b>", Verb::Rcpt),
            (b"  RCPT TO:<a@b>  ", Verb::Rcpt),
            (b"\tNOOP\t", Verb::Noop),
            (b"DATA", Verb::Data),
            (b"QUIT ", Verb::Quit),
            (b"EHLO client.example", Verb::Ehlo),
            (b"EHLO h\xc3\xa9llo.example", Verb::Ehlo),
            (
                b"RCPT TO:<j\xc3\xb6s\xc3\xa9@b\xc3\xbccher.example>",
                Verb::Rcpt,
            ),
            (b"AUTH PLAIN AGZvbwBiYXI=", Verb::Auth),
            (b"XEXCH50 1 2", Verb::Unknown),
            (b"X-LINK2STATE LAST CHUNK=1", Verb::Unknown),
            (b"ETRN example.com", Verb::Unknown),
            (b"GET / HTTP/1.1", Verb::Unknown),
        ];
        for &(line, verb) in cases {
            let cmd = parse_command_line(line)
                .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(line)));
            assert_eq!(cmd.verb, verb, "{:?}", String::from_utf8_lossy(line));
            assert!(cmd.utf8);
        }
        let max = "X".repeat(MAX_VERB_LEN);
        assert!(check_command_line(max.as_bytes()).is_ok());
    }

    #[test]
    fn command_lines_refused() {
        use CommandLineError as E;
        let long = "X".repeat(MAX_VERB_LEN + 1);
        let cases: &[(&[u8], CommandLineError)] = &[
            (b"", E::Empty),
            (b"   ", E::Empty),
            (b" \t ", E::Empty),
            (
                b"RCPT\x0bTO:<x@evil.example>",
                E::ControlByte {
                    byte: 0x0b,
                    at: 4,
                    in_arguments: false,
                },
            ),
            (
                b"VRFY\x0croot",
                E::ControlByte {
                    byte: 0x0c,
                    at: 4,
                    in_arguments: false,
                },
            ),
            (
                b"AUTH\rPLAIN",
                E::ControlByte {
                    byte: b'\r',
                    at: 4,
                    in_arguments: false,
                },
            ),
            (
                b"RCPT\nTO:<x@y>",
                E::ControlByte {
                    byte: b'\n',
                    at: 4,
                    in_arguments: false,
                },
            ),
            (
                b"MAIL\0FROM:<>",
                E::ControlByte {
                    byte: 0,
                    at: 4,
                    in_arguments: false,
                },
            ),
            (
                b"\x0bRCPT TO:<x@y>",
                E::ControlByte {
                    byte: 0x0b,
                    at: 0,
                    in_arguments: false,
                },
            ),
            (
                b"RC\x08PT TO:<x@y>",
                E::ControlByte {
                    byte: 0x08,
                    at: 2,
                    in_arguments: false,
                },
            ),
            (
                b"RCPT TO:<x@y>\x7f",
                E::ControlByte {
                    byte: 0x7f,
                    at: 13,
                    in_arguments: true,
                },
            ),
            (
                b"RCPT TO:\x0b<x@y>",
                E::ControlByte {
                    byte: 0x0b,
                    at: 8,
                    in_arguments: true,
                },
            ),
            (
                b"MAIL FROM:<a@b> \x1b[0m",
                E::ControlByte {
                    byte: 0x1b,
                    at: 16,
                    in_arguments: true,
                },
            ),
            (
                b"HELO a\rb",
                E::ControlByte {
                    byte: b'\r',
                    at: 6,
                    in_arguments: true,
                },
            ),
            (
                b"MAIL:\x01",
                E::ControlByte {
                    byte: 1,
                    at: 5,
                    in_arguments: false,
                },
            ),
            (b"MAIL:FROM:<a@b>", E::BadVerb { at: 4 }),
            (b"RCPT\xc2\xa0TO:<x@y>", E::BadVerb { at: 4 }),
            (b"RCPT\xa0TO:<x@y>", E::BadVerb { at: 4 }),
            (b"R\xc3\xa9CPT TO:<x@y>", E::BadVerb { at: 1 }),
            (b"\xc3\xa9HLO x", E::BadVerb { at: 0 }),
            (b"1RCPT TO:<x@y>", E::BadVerb { at: 0 }),
            (b"-X", E::BadVerb { at: 0 }),
            (b"\"RCPT\" TO:<x@y>", E::BadVerb { at: 0 }),
            (b"<RCPT> TO:<x@y>", E::BadVerb { at: 0 }),
            (b"\\RCPT TO:<x@y>", E::BadVerb { at: 0 }),
            (b"RCPT\"\" TO:<x@y>", E::BadVerb { at: 4 }),
            (b"Host: example.com", E::BadVerb { at: 4 }),
            (long.as_bytes(), E::VerbTooLong),
            (b"HELO caf\xe9", E::InvalidUtf8 { at: 8 }),
            (b"MAIL FROM:<\xff@b>", E::InvalidUtf8 { at: 11 }),
            (b"RCPT TO:<a@b\xc0\xaf>", E::InvalidUtf8 { at: 12 }),
            (b"EHLO \xed\xa0\x80", E::InvalidUtf8 { at: 5 }),
        ];
        for (line, want) in cases {
            assert_eq!(
                check_command_line(line).as_ref(),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert_eq!(parse_command_line(line).err().as_ref(), Some(want));
        }
    }

    #[test]
    fn command_line_error_replies() {
        use CommandLineError as E;
        let cases: &[(CommandLineError, u16, (u8, u16, u16))] = &[
            (E::Empty, 500, (5, 5, 2)),
            (
                E::ControlByte {
                    byte: 0x0b,
                    at: 4,
                    in_arguments: false,
                },
                500,
                (5, 5, 2),
            ),
            (
                E::ControlByte {
                    byte: 0x0b,
                    at: 9,
                    in_arguments: true,
                },
                501,
                (5, 5, 4),
            ),
            (E::BadVerb { at: 4 }, 500, (5, 5, 2)),
            (E::VerbTooLong, 500, (5, 5, 2)),
            (E::InvalidUtf8 { at: 3 }, 500, (5, 5, 2)),
        ];
        for (error, code, enhanced) in cases {
            let reply = error.reply();
            assert_eq!(reply.code, *code, "{error}");
            assert_eq!(reply.enhanced(), Some(*enhanced), "{error}");
        }
        assert!(E::InvalidUtf8 { at: 0 }.reply().text().contains("UTF-8"));
    }

    /// Every byte a client could put between a verb and its arguments:
    /// only SP and HTAB pass, and then the verb read is the verb sent.
    #[test]
    fn every_separator_after_every_verb() {
        let spellings = |name: &str| {
            let lower = name.to_ascii_lowercase();
            let mixed: String = name
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    }
                })
                .collect();
            [name.to_owned(), lower, mixed]
        };
        let mut separators: Vec<Vec<u8>> = (0u8..=0x20).chain([0x7f]).map(|b| vec![b]).collect();
        separators.extend((0x80u8..=0xff).map(|b| vec![b]));
        separators.extend([
            b"\xc2\xa0".to_vec(),     // U+00A0 NO-BREAK SPACE
            b"\xc2\x85".to_vec(),     // U+0085 NEXT LINE
            b"\xe2\x80\xa8".to_vec(), // U+2028 LINE SEPARATOR
            b"\xe3\x80\x80".to_vec(), // U+3000 IDEOGRAPHIC SPACE
            b"\xef\xbb\xbf".to_vec(), // U+FEFF BOM
            b":".to_vec(),
            b"\"".to_vec(),
            b"<".to_vec(),
            b"\\".to_vec(),
        ]);
        for (name, verb) in Verb::NAMES {
            for spelling in spellings(name) {
                for sep in &separators {
                    let mut line = spelling.as_bytes().to_vec();
                    line.extend_from_slice(sep);
                    line.extend_from_slice(b"TO:<x@evil.example>");
                    let got = parse_command_line(&line);
                    if sep == b" " || sep == b"\t" {
                        let cmd = got.unwrap_or_else(|e| panic!("{line:?}: {e}"));
                        assert_eq!(cmd.verb, verb, "{line:?}");
                        assert_eq!(cmd.args, "TO:<x@evil.example>");
                    } else {
                        let e = got.expect_err(&format!("{line:?}"));
                        // Refused as an unreadable command, never as an
                        // argument error of the verb.
                        assert!(
                            !matches!(
                                e,
                                CommandLineError::ControlByte {
                                    in_arguments: true,
                                    ..
                                }
                            ),
                            "{line:?}: {e:?}"
                        );
                        assert!(!e.reply().is_positive_completion());
                    }
                    // Without the check, the verb read is still Postfix's.
                    if sep.len() == 1 && is_c_space(sep[0]) {
                        assert_eq!(parse_command(&line).verb, verb, "{line:?}");
                    }
                }
            }
        }
    }

    /// The first token of a command line as Postfix's `smtpd_token()` reads
    /// it (postfix src/smtpd/smtpd_token.c: `ISSPACE()` separates, `"…"` and
    /// `<…>` group and nest, `\` escapes, a token reading `to:`/`from:`
    /// ends at its colon, NUL ends the line), `None` when there is none.
    fn postfix_first_token(line: &[u8]) -> Option<Vec<u8>> {
        let line = line.split(|&b| b == 0).next().unwrap_or_default();
        let mut token = Vec::new();
        let mut i = 0;
        while let Some(&c) = line.get(i) {
            i += 1;
            if is_c_space(c) {
                if !token.is_empty() {
                    break;
                }
            } else if c == b'<' || c == b'"' {
                token.push(c);
                let mut stack = vec![if c == b'<' { b'>' } else { b'"' }];
                while let Some(&c) = line.get(i) {
                    i += 1;
                    token.push(c);
                    let wanted = *stack.last().unwrap_or(&0);
                    if c == b'\\' {
                        if let Some(&n) = line.get(i) {
                            i += 1;
                            token.push(n);
                        }
                    } else if c == wanted {
                        stack.pop();
                        if stack.is_empty() {
                            break;
                        }
                    } else if c == b'"' {
                        stack.push(b'"');
                    } else if c == b'<' && wanted == b'>' {
                        stack.push(b'>');
                    }
                }
            } else if c == b':' {
                token.push(c);
                if token.eq_ignore_ascii_case(b"to:") || token.eq_ignore_ascii_case(b"from:") {
                    break;
                }
            } else {
                if c == b'\\' {
                    token.push(c);
                    match line.get(i) {
                        Some(&n) => {
                            i += 1;
                            token.push(n);
                        }
                        None => break,
                    }
                    continue;
                }
                token.push(c);
            }
        }
        (!token.is_empty()).then_some(token)
    }

    #[test]
    fn postfix_tokeniser_model() {
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"RCPT TO:<a@b>", Some(b"RCPT")),
            (b"RCPT\x0bTO:<a@b>", Some(b"RCPT")),
            (b"  \x0cVRFY root", Some(b"VRFY")),
            (b"MA\"IL FR\"OM:<>", Some(b"MA\"IL FR\"OM:<>")),
            (b"<MAIL FROM>", Some(b"<MAIL FROM>")),
            (b"MAIL\0 FROM", Some(b"MAIL")),
            (b"to:<x>", Some(b"to:")),
            (b"", None),
            (b" \r\n", None),
        ];
        for &(line, want) in cases {
            assert_eq!(postfix_first_token(line).as_deref(), want, "{line:?}");
        }
    }

    /// Property: whenever the proxy accepts a line, the verb it reads is the
    /// verb Postfix reads (the first `smtpd_token()` token, upper-cased).
    #[test]
    fn accepted_lines_agree_with_postfix_on_the_verb() {
        let mut rng = TestRng::new(0x11_5EED);
        let heads: &[&[u8]] = &[
            b"RCPT",
            b"rcpt",
            b"MAIL",
            b"VRFY",
            b"AUTH",
            b"EHLO",
            b"HeLo",
            b"DATA",
            b"QUIT",
            b"XCLIENT",
            b"STARTTLS",
            b"PROXY",
            b"BDAT",
            b"X",
            b"",
        ];
        let mut accepted = 0;
        for _ in 0..100_000 {
            let mut line = Vec::new();
            for _ in 0..rng.below(3) {
                line.push([b' ', b'\t', 0x0b, 0x0c, b'\r'][rng.below(5)]);
            }
            line.extend_from_slice(heads[rng.below(heads.len())]);
            let len = rng.below(24);
            line.extend(rng.bytes(
                len,
                b" \t\x0b\x0c\r\n\0\x7f\"<>\\:TOFROMto:a@b.\xc2\xa0\xe9-1",
            ));
            let Ok(cmd) = parse_command_line(&line) else {
                continue;
            };
            accepted += 1;
            let token = postfix_first_token(&line).expect("an accepted line has a verb");
            let postfix_verb = Verb::from_word(&token);
            assert_eq!(cmd.verb, postfix_verb, "{line:?}");
            if cmd.verb != Verb::Unknown {
                assert_eq!(token.to_ascii_uppercase(), cmd.verb.as_str().as_bytes());
            }
            // And the arguments are the rest of the line, unchanged.
            let text = std::str::from_utf8(&line).expect("accepted lines are UTF-8");
            assert!(text.contains(cmd.args.as_str()), "{line:?}");
        }
        assert!(accepted > 2_000, "too few accepted lines: {accepted}");
    }

    #[test]
    fn parse_command_splits_like_postfix() {
        let cases: &[(&[u8], Verb, &str)] = &[
            (b"RCPT\x0bTO:<x@evil>", Verb::Rcpt, "TO:<x@evil>"),
            (b"VRFY\x0croot", Verb::Vrfy, "root"),
            (b"AUTH\rPLAIN", Verb::Auth, "PLAIN"),
            (b"\x0b\x0cNOOP\r", Verb::Noop, ""),
            (b"RCPT\xc2\xa0TO:<x@evil>", Verb::Unknown, ""),
        ];
        for &(line, verb, args) in cases {
            let cmd = parse_command(line);
            assert_eq!((cmd.verb, cmd.args.as_str()), (verb, args), "{line:?}");
        }
    }

    #[test]
    fn sasl_responses() {
        for ok in [
            &b""[..],
            b"*",
            b"=",
            b"AGZvbwBiYXI=",
            b"dGVzdA==",
            b"abc+/09XYZ",
        ] {
            assert_eq!(check_sasl_response(ok), Ok(()), "{ok:?}");
        }
        let bad: &[(&[u8], u8, usize)] = &[
            (b"* ", b'*', 0),
            (b" *", b' ', 0),
            (b"**", b'*', 0),
            (b"*\x0b", b'*', 0),
            (b"AGZv bwBi", b' ', 4),
            (b"AGZv\tbwBi", b'\t', 4),
            (b"AGZv\rbwBi", b'\r', 4),
            (b"AGZv\0", 0, 4),
            (b"dGVzdA==\xc2\xa0", 0xc2, 8),
            (b"-_", b'-', 0),
        ];
        for &(line, byte, at) in bad {
            assert_eq!(
                check_sasl_response(line),
                Err(SaslResponseError::NotBase64 { byte, at }),
                "{line:?}"
            );
        }
        // A command word is base64 text too: the backend decodes it and
        // fails the exchange itself (535), which the proxy counts.
        assert_eq!(check_sasl_response(b"QUIT"), Ok(()));
        let reply = SaslResponseError::NotBase64 { byte: b' ', at: 0 }.reply();
        assert_eq!((reply.code, reply.enhanced()), (501, Some((5, 5, 2))));
    }

    // ---- Addresses judged by the domain the backend routes to ----

    #[test]
    fn canonical_recipients() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "TO:<user@example.com>",
                "user@example.com",
                Some("example.com"),
            ),
            (
                "TO:<user@EXAMPLE.COM>",
                "user@example.com",
                Some("example.com"),
            ),
            (
                "TO:<user@EXAMPLE.COM.>",
                "user@example.com",
                Some("example.com"),
            ),
            (
                "TO:<User@Example.Com.>",
                "User@example.com",
                Some("example.com"),
            ),
            (
                "TO:<\"user\"@example.com>",
                "user@example.com",
                Some("example.com"),
            ),
            (
                "TO:<\"us\\er\"@Example.com>",
                "user@example.com",
                Some("example.com"),
            ),
            (
                "TO:<\"first.last\"@example.com>",
                "first.last@example.com",
                Some("example.com"),
            ),
            (
                "TO:<\"a b\"@Example.com>",
                "\"a b\"@example.com",
                Some("example.com"),
            ),
            (
                "TO:<\"\"@example.com>",
                "\"\"@example.com",
                Some("example.com"),
            ),
            ("TO:<postmaster>", "postmaster", None),
            ("TO:<\"postmaster\">", "postmaster", None),
            ("TO:<Postmaster>", "Postmaster", None),
            ("TO:<u@[192.0.2.1]>", "u@[192.0.2.1]", Some("[192.0.2.1]")),
            (
                "TO:<u@[IPv6:2001:DB8:0::1]>",
                "u@[ipv6:2001:db8::1]",
                Some("[ipv6:2001:db8::1]"),
            ),
            (
                "TO:<u@[IPv6:::ffff:192.0.2.1]>",
                "u@[192.0.2.1]",
                Some("[192.0.2.1]"),
            ),
            (
                "TO:<j\u{f6}s@B\u{dc}CHER.example>",
                "j\u{f6}s@b\u{fc}cher.example",
                Some("b\u{fc}cher.example"),
            ),
        ];
        for &(args, canonical, domain) in cases {
            let r = parse_rcpt_to(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(r.canonical, canonical, "{args:?}");
            assert_eq!(r.domain(), domain, "{args:?}");
            assert_eq!(r.second_route, None, "{args:?}");
        }
        // The raw form stays as sent (route removed), for replies.
        let r = parse_rcpt_to("TO:<User@EXAMPLE.COM.>").unwrap();
        assert_eq!(r.recipient, "User@EXAMPLE.COM.");
        // Refused spellings of a domain.
        for bad in [
            "TO:<u@example.com..>",
            "TO:<u@.>",
            "TO:<u@.example.com>",
            "TO:<u@exa\u{85}mple.com>",
        ] {
            assert!(parse_rcpt_to(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn second_routes() {
        use SecondRoute as S;
        let cases: &[(&str, S)] = &[
            // allow_percent_hack
            ("TO:<user%evil.example@example.com>", S::Percent),
            ("TO:<USER%EVIL.EXAMPLE@EXAMPLE.COM.>", S::Percent),
            ("TO:<user%evil.example>", S::Percent),
            ("TO:<a%b%c@example.com>", S::Percent),
            ("TO:<\"user%evil.example\"@example.com>", S::Percent),
            ("TO:<\"user\\%evil.example\"@example.com>", S::Percent),
            ("TO:<%@example.com>", S::Percent),
            // swap_bangpath
            ("TO:<evil.example!user@example.com>", S::Bang),
            ("TO:<EVIL.EXAMPLE!User@Example.com>", S::Bang),
            ("TO:<evil.example!user>", S::Bang),
            ("TO:<\"evil.example!user\"@example.com>", S::Bang),
            ("TO:<\"evil.example\\!user\"@example.com>", S::Bang),
            ("TO:<a!b%c@example.com>", S::Percent),
            // resolve_dequoted_address
            ("TO:<\"user@evil.example\"@example.com>", S::QuotedAt),
            ("TO:<\"user\\@evil.example\"@example.com>", S::QuotedAt),
            ("TO:<\"user@evil.example\">", S::QuotedAt),
            ("TO:<\"@evil.example:user\"@example.com>", S::QuotedAt),
            ("TO:<\"a b@evil.example\"@example.com>", S::QuotedAt),
            ("TO:<\"user%x@evil.example\"@example.com>", S::QuotedAt),
            // source routes
            ("TO:<@example.com:user@evil.example>", S::SourceRoute),
            (
                "TO:<@a.example,@b.example:user@example.com>",
                S::SourceRoute,
            ),
            ("TO:<@EXAMPLE.COM:user@example.com>", S::SourceRoute),
            ("TO:<@[192.0.2.1]:user@example.com>", S::SourceRoute),
            ("TO:<@a.example:user%evil@example.com>", S::SourceRoute),
        ];
        for &(args, want) in cases {
            let r = parse_rcpt_to(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(r.second_route, Some(want), "{args:?}");
            assert_eq!(want.reply().code, 550);
            assert_eq!(want.reply().enhanced(), Some((5, 7, 1)));
        }
        // Senders carry the same report but are not refused for it.
        let m = parse_mail_from("FROM:<user%evil.example@example.com>").unwrap();
        assert_eq!(m.second_route, Some(S::Percent));
        assert!(!m.is_null_sender());
        let m = parse_mail_from("FROM:<@hop.example:u@d.example>").unwrap();
        assert_eq!(m.second_route, Some(S::SourceRoute));
        assert_eq!(m.canonical.as_deref(), Some("u@d.example"));
        // No second route in ordinary addresses, quoted or not.
        for args in [
            "TO:<first.last+tag@example.com>",
            "TO:<\"a b\"@example.com>",
            "TO:<\"a:b,c;d\"@example.com>",
            "TO:<o'brien@example.com>",
            "TO:<a#b$c&d@example.com>",
        ] {
            assert_eq!(parse_rcpt_to(args).unwrap().second_route, None, "{args:?}");
        }
        // Unquoted '@' in the local part is not an address at all.
        for bad in [
            "TO:<user@evil.example@example.com>",
            "TO:<user\\@evil.example@example.com>",
            "TO:<\"user\"@evil.example@example.com>",
        ] {
            assert!(parse_rcpt_to(bad).is_err(), "{bad:?}");
        }
        let names: Vec<&str> = [S::SourceRoute, S::QuotedAt, S::Percent, S::Bang]
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(
            names,
            ["source-route", "quoted-at", "percent-hack", "bang-path"]
        );
    }

    /// Every spelling Postfix reads as the null sender (smtpd.c
    /// `extract_addr`: an empty internal form) is either null for the proxy
    /// too or refused; nothing else is null.
    #[test]
    fn null_sender_spellings() {
        // (args, proxy: Some(true) = null, Some(false) = a sender, None =
        // refused, Postfix reads it as null)
        let cases: &[(&str, Option<bool>, bool)] = &[
            ("FROM:<>", Some(true), true),
            ("FROM: <>", Some(true), true),
            ("from:<> SIZE=10", Some(true), true),
            ("FROM:<\"\">", Some(true), true),
            ("FROM:<@hop.example:\"\">", Some(true), true),
            ("FROM:<@a.example,@b.example:\"\">", Some(true), true),
            ("FROM:< >", None, true),
            ("FROM:<\t>", None, true),
            ("FROM:<@hop.example:>", None, true),
            ("FROM:<@a.example,@b.example:>", None, true),
            ("FROM:<@:>", None, true),
            ("FROM:<\"\" >", None, true),
            ("FROM:< \"\">", None, true),
            ("FROM:<()>", None, true),
            ("FROM:<\"\" (comment)>", None, true),
            ("FROM:<<>>", None, true),
            ("FROM:\"\"", None, true),
            ("FROM:", None, false),
            ("FROM:<> (comment)", None, false),
            ("FROM:<>x", None, false),
            ("FROM:<\" \">", Some(false), false),
            ("FROM:<\"\"@example.com>", Some(false), false),
            ("FROM:<@>", None, false),
            ("FROM:<MAILER-DAEMON@example.com>", Some(false), false),
        ];
        for &(args, proxy, postfix_null) in cases {
            let got = parse_mail_from(args);
            match proxy {
                Some(null) => {
                    let m = got.as_ref().unwrap_or_else(|e| panic!("{args:?}: {e}"));
                    assert_eq!(m.is_null_sender(), null, "{args:?}");
                    assert_eq!(m.canonical.is_none(), null, "{args:?}");
                }
                None => assert!(got.is_err(), "{args:?} accepted: {got:?}"),
            }
            // The invariant: whatever Postfix reads as null, the proxy
            // reads as null or refuses.
            if postfix_null {
                assert!(
                    got.as_ref().map_or(true, MailFrom::is_null_sender),
                    "{args:?}"
                );
            }
        }
        // Postfix's cleanup also stores MAILER-DAEMON (bare or at
        // $myorigin) as `<>`: not null on the wire, but counted as null.
        for args in [
            "FROM:<MAILER-DAEMON>",
            "FROM:<mailer-daemon>",
            "FROM:<\"MAILER-DAEMON\">",
            "FROM:<@a.example:MAILER-DAEMON>",
            "FROM:<Mailer-Daemon@mx.example.test>",
        ] {
            let m = parse_mail_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(!m.is_null_sender() && m.counts_as_null_sender(), "{args:?}");
        }
        for args in [
            "FROM:<daemon@example.com>",
            "FROM:<mailer-daemon.x@example.com>",
        ] {
            let m = parse_mail_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(!m.counts_as_null_sender(), "{args:?}");
        }
        // The recipient side: Postfix refuses an empty recipient; so does
        // the proxy, in every spelling.
        for args in [
            "TO:<>",
            "TO:<\"\">",
            "TO:<@hop.example:\"\">",
            "TO:< >",
            "TO:<@hop.example:>",
        ] {
            assert!(parse_rcpt_to(args).is_err(), "{args:?}");
        }
        assert_eq!(parse_rcpt_to("TO:<\"\">"), Err(PathError::EmptyRecipient));
    }

    #[test]
    fn canonical_address_function() {
        let cases: &[(&str, Option<&str>)] = &[
            ("User@Example.COM.", Some("User@example.com")),
            ("\"x\"@[IPV6:2001:DB8::1]", Some("x@[ipv6:2001:db8::1]")),
            ("u@[Foo]", Some("u@[foo]")),
            ("\"a\"", Some("a")),
            ("a", Some("a")),
            ("", None),
            ("@example.com", None),
            ("a@", None),
            ("a\u{1}b@example.com", None),
        ];
        for &(mailbox, want) in cases {
            assert_eq!(canonical_address(mailbox).as_deref(), want, "{mailbox:?}");
        }
    }

    /// Random paths: canonical forms are stable (a canonical recipient
    /// parses back to itself) and nothing panics.
    #[test]
    fn random_paths_canonical_is_stable() {
        let mut rng = TestRng::new(0xADD2);
        for _ in 0..30_000 {
            let len = rng.below(40);
            let body = rng.bytes(len, b"aZ09@%!.\"\\:,[]IPv6 -\xc3\xa9");
            let args = format!("TO:<{}>", String::from_utf8_lossy(&body));
            if let Ok(r) = parse_rcpt_to(&args) {
                assert!(!r.canonical.is_empty(), "{args:?}");
                assert!(!r.canonical.chars().any(char::is_control), "{args:?}");
                let again = parse_rcpt_to(&format!("TO:<{}>", r.canonical))
                    .unwrap_or_else(|e| panic!("{args:?} -> {:?}: {e}", r.canonical));
                assert_eq!(again.canonical, r.canonical, "{args:?}");
                if r.second_route != Some(SecondRoute::SourceRoute) {
                    assert_eq!(again.second_route, r.second_route, "{args:?}");
                }
            }
        }
    }
}
