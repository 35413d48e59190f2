//! SMTP replies as values.
//!
//! A [`Reply`] is a code and its text lines; [`Reply::to_bytes`] is the one
//! place that writes the wire form. The proxy's own replies are named
//! constructors, each with its RFC 3463 enhanced status code and a text in
//! the style of Postfix, so clients and operators see familiar answers.
//! [`ReplyParser`] reads the backend's (possibly multi-line) replies from a
//! byte stream, with bounds on line length and line count.

use bytes::{Buf, BytesMut};

/// An RFC 3463 enhanced status code: `(class, subject, detail)`, e.g.
/// `(5, 7, 1)` for `5.7.1`.
pub type EnhancedCode = (u8, u16, u16);

/// An SMTP reply: a three-digit code and one or more lines of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The reply code, `200..=599`.
    pub code: u16,
    /// The text of each line, after `NNN ` / `NNN-`, without CRLF; an
    /// enhanced status code stays at the start of the text.
    pub lines: Vec<String>,
}

impl Reply {
    /// A reply with `code` and `text`; a `'\n'` in `text` starts a new line
    /// (a CR before it is dropped).
    #[must_use]
    pub fn new(code: u16, text: &str) -> Self {
        Self {
            code,
            lines: text
                .split('\n')
                .map(|line| line.strip_suffix('\r').unwrap_or(line).to_owned())
                .collect(),
        }
    }

    /// The enhanced status code (`class.subject.detail`, RFC 3463) at the
    /// start of the first line, if there is one.
    #[must_use]
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        let first = self.lines.first()?;
        let token = first.split(' ').next()?;
        let mut parts = token.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        // status-code = class "." subject "." detail; class 2, 4 or 5,
        // subject and detail 1 to 3 digits.
        let number = |s: &str| {
            if (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<u16>().ok()
            } else {
                None
            }
        };
        let class = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        Some((class, number(subject)?, number(detail)?))
    }

    /// The lines joined with `'\n'`, for logs.
    #[must_use]
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The queue id a backend names in its answer to the end of DATA:
    /// Postfix's `queued as 4Fq2X31bQz`, Exim's `id=1tYq9E-000Abc-3x`.
    /// Only letters, digits and `-`/`.`, at most 64 of them: the text comes
    /// from the backend and goes into the log.
    #[must_use]
    pub fn queue_id(&self) -> Option<&str> {
        const MAX: usize = 64;
        let text = self.lines.last()?;
        let after = ["queued as ", "id="]
            .iter()
            .find_map(|marker| text.find(marker).map(|at| &text[at + marker.len()..]))?;
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
            .unwrap_or(after.len());
        let id = after[..end].trim_end_matches('.');
        (!id.is_empty() && id.len() <= MAX).then_some(id)
    }

    /// `2xx`: the command succeeded.
    #[must_use]
    pub fn is_positive_completion(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// `3xx`: more input expected (after DATA, during AUTH).
    #[must_use]
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }

    /// `4xx`: a temporary failure; the client will retry.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// `5xx`: a permanent failure.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }

    /// The wire form: `NNN-text\r\n` for every line but the last, then
    /// `NNN text\r\n` (`NNN\r\n` when the last text is empty).
    ///
    /// A CR or LF inside a line is written as a space, so a reply can never
    /// end early or inject another line. A code outside `200..=599` is not a
    /// reply SMTP clients understand and is written as `451`: the client
    /// retries instead of misreading the answer.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.lines.iter().map(|l| l.len() + 6).sum::<usize>() + 6);
        self.write_to(&mut out);
        out
    }

    /// Appends the wire form ([`Self::to_bytes`]) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = if (200..=599).contains(&self.code) {
            self.code
        } else {
            451
        };
        let code = [
            b'0' + (code / 100) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ];
        let count = self.lines.len().max(1);
        for i in 0..count {
            let text = self.lines.get(i).map_or("", String::as_str);
            let last = i + 1 == count;
            out.extend_from_slice(&code);
            if !last {
                out.push(b'-');
            } else if !text.is_empty() || code == *b"334" {
                // A SASL challenge keeps its space even when empty (RFC
                // 4954: `"334" SP [base64]`); strict clients wait for it.
                out.push(b' ');
            }
            out.extend(
                text.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    /// A one-line reply whose text is `text` with every CR/LF replaced by a
    /// space (for texts that carry outside data).
    fn one_line(code: u16, text: &str) -> Self {
        Self {
            code,
            lines: vec![text.replace(['\r', '\n'], " ")],
        }
    }

    /// `220 <hostname> ESMTP`: the greeting.
    #[must_use]
    pub fn greeting(hostname: &str) -> Self {
        Self::one_line(220, &format!("{hostname} ESMTP"))
    }

    /// `421 4.7.0`: the source holds too many connections.
    #[must_use]
    pub fn too_many_connections() -> Self {
        Self::new(421, "4.7.0 Error: too many connections from your address")
    }

    /// `421 4.7.0`: the source is blocked; `reason` is shown to the client
    /// (CR/LF replaced by spaces).
    #[must_use]
    pub fn blocked(reason: &str) -> Self {
        Self::one_line(421, &format!("4.7.0 Service unavailable: {reason}"))
    }

    /// `421 4.7.0`: too many errors in this session (failed recipients,
    /// directory harvesting); the connection is closed.
    #[must_use]
    pub fn too_many_errors() -> Self {
        Self::new(421, "4.7.0 Error: too many errors")
    }

    /// `421 4.3.0`: the proxy is shutting down.
    #[must_use]
    pub fn shutting_down() -> Self {
        Self::new(
            421,
            "4.3.0 Service shutting down, closing transmission channel",
        )
    }

    /// `421 4.3.0`: the backend cannot be reached (outside a transaction).
    #[must_use]
    pub fn backend_unavailable() -> Self {
        Self::new(
            421,
            "4.3.0 Service temporarily unavailable, try again later",
        )
    }

    /// `451 4.3.0`: the backend failed during a mail transaction; nothing
    /// was accepted and the client should retry.
    #[must_use]
    pub fn backend_lost_in_transaction() -> Self {
        Self::new(
            451,
            "4.3.0 Error: temporary failure, message not accepted, try again later",
        )
    }

    /// `452 4.3.1`: the proxy has no memory left for the rest of a message
    /// it takes in alone (`backend.spool_size`), Postfix's words for a full
    /// queue file system.
    #[must_use]
    pub fn spool_full() -> Self {
        Self::new(452, "4.3.1 Insufficient system storage")
    }

    /// `421 4.3.1`: a slow message the proxy took in alone was dropped to
    /// make room for a faster one (`backend.spool_size`); the session ends.
    #[must_use]
    pub fn spool_evicted() -> Self {
        Self::new(
            421,
            "4.3.1 Insufficient system storage for a slow message, try again later",
        )
    }

    /// `421 4.3.2`: a slow message the proxy took in alone was dropped to
    /// make room for a new client at `smtp.max_sessions`; the session ends.
    #[must_use]
    pub fn shed_slow_message() -> Self {
        Self::new(
            421,
            "4.3.2 Error: server busy, slow message dropped, try again later",
        )
    }

    /// `421 4.4.2`: the client was idle for too long.
    #[must_use]
    pub fn timeout() -> Self {
        Self::new(421, "4.4.2 Error: timeout exceeded")
    }

    /// `554 5.5.1`: the client talked before the greeting.
    #[must_use]
    pub fn pregreet() -> Self {
        Self::new(554, "5.5.1 Error: SMTP protocol synchronization")
    }

    /// `550 5.7.1`: the recipient is not ours and relaying is refused.
    #[must_use]
    pub fn relay_denied() -> Self {
        Self::new(550, "5.7.1 Relay access denied")
    }

    /// `550 5.1.1`: the recipient does not exist.
    #[must_use]
    pub fn unknown_recipient() -> Self {
        Self::new(550, "5.1.1 Recipient address rejected: User unknown")
    }

    /// `550 5.1.1 <address>: …`: the recipient is not in the directory of
    /// valid recipients (CR/LF in `address` replaced by spaces).
    #[must_use]
    pub fn unknown_recipient_named(address: &str) -> Self {
        Self::one_line(
            550,
            &format!("5.1.1 <{address}>: Recipient address rejected: User unknown"),
        )
    }

    /// `554 5.5.1`: DATA without an accepted recipient.
    #[must_use]
    pub fn no_valid_recipients() -> Self {
        Self::new(554, "5.5.1 Error: no valid recipients")
    }

    /// `451 4.7.1`: a message that cannot be held for the content filters
    /// now (`filters.max_held` reached, failing closed).
    #[must_use]
    pub fn not_scanned() -> Self {
        Self::new(451, "4.7.1 Message could not be scanned, try again later")
    }

    /// `554 5.7.1 Service unavailable`: refused at connect.
    #[must_use]
    pub fn service_unavailable() -> Self {
        Self::new(554, "5.7.1 Service unavailable")
    }

    /// `450 4.7.1 <text>`: a policy defers this command.
    #[must_use]
    pub fn policy_deferred(text: &str) -> Self {
        Self::one_line(450, &format!("4.7.1 {text}"))
    }

    /// `550 5.7.1 <text>`: a policy refuses this command.
    #[must_use]
    pub fn policy_refused(text: &str) -> Self {
        Self::one_line(550, &format!("5.7.1 {text}"))
    }

    /// `421 4.7.0 <text>`: a policy defers and closes the session.
    #[must_use]
    pub fn policy_deferred_closing(text: &str) -> Self {
        Self::one_line(421, &format!("4.7.0 {text}"))
    }

    /// `554 5.7.1 <text>`: a policy refuses and closes the session.
    #[must_use]
    pub fn policy_refused_closing(text: &str) -> Self {
        Self::one_line(554, &format!("5.7.1 {text}"))
    }

    /// `450 4.7.1`: too many null-sender (`MAIL FROM:<>`) messages from this
    /// source lately.
    #[must_use]
    pub fn rate_limited_null_sender() -> Self {
        Self::new(
            450,
            "4.7.1 Error: too many messages with a null sender, try again later",
        )
    }

    /// `550 5.7.1`: the HELO/EHLO name is refused.
    #[must_use]
    pub fn helo_rejected() -> Self {
        Self::new(550, "5.7.1 Helo command rejected: Access denied")
    }

    /// `452 4.5.3`: the transaction has as many recipients as allowed.
    #[must_use]
    pub fn too_many_recipients() -> Self {
        Self::new(452, "4.5.3 Error: too many recipients")
    }

    /// `552 5.3.4`: the message (or its declared `SIZE`) is over the limit.
    #[must_use]
    pub fn message_too_big() -> Self {
        Self::new(552, "5.3.4 Message size exceeds fixed limit")
    }

    /// `500 5.5.2`: a command line longer than allowed.
    #[must_use]
    pub fn line_too_long() -> Self {
        Self::new(500, "5.5.2 Error: line too long")
    }

    /// `500 5.5.2`: an unrecognisable command (unknown verb, NUL byte,
    /// a client-sent `PROXY` line).
    #[must_use]
    pub fn syntax_error() -> Self {
        Self::new(500, "5.5.2 Error: command not recognized")
    }

    /// `501 5.1.7`: the `MAIL FROM` address is malformed.
    #[must_use]
    pub fn bad_sender_syntax() -> Self {
        Self::new(501, "5.1.7 Bad sender address syntax")
    }

    /// `501 5.1.3`: the `RCPT TO` address is malformed.
    #[must_use]
    pub fn bad_recipient_syntax() -> Self {
        Self::new(501, "5.1.3 Bad recipient address syntax")
    }

    /// `501 5.5.4`: the arguments are wrong; `usage` says what is expected,
    /// e.g. `"Syntax: MAIL FROM:<address>"` (CR/LF replaced by spaces).
    #[must_use]
    pub fn bad_arguments(usage: &str) -> Self {
        Self::one_line(501, &format!("5.5.4 {usage}"))
    }

    /// `503 5.5.1`: the command is out of sequence.
    #[must_use]
    pub fn bad_sequence() -> Self {
        Self::new(503, "5.5.1 Error: bad sequence of commands")
    }

    /// `503 5.5.1 Error: <detail>`: out of sequence, saying why
    /// (`"need MAIL command"`, `"send HELO/EHLO first"`, …).
    #[must_use]
    pub fn bad_sequence_because(detail: &str) -> Self {
        Self::one_line(503, &format!("5.5.1 Error: {detail}"))
    }

    /// `502 5.5.1`: a command the proxy does not offer (BDAT, EXPN, ETRN…).
    #[must_use]
    pub fn command_not_implemented() -> Self {
        Self::new(502, "5.5.1 Error: command not implemented")
    }

    /// `421 4.3.2`: every session slot of the proxy is taken
    /// (`smtp.max_sessions`); the connection is closed.
    #[must_use]
    pub fn too_many_sessions() -> Self {
        Self::new(421, "4.3.2 Error: too many sessions, try again later")
    }

    /// `538 5.7.11`: AUTH before STARTTLS, when it must wait for TLS (RFC
    /// 4954 §6: encryption required for the requested mechanism).
    #[must_use]
    pub fn auth_requires_tls() -> Self {
        Self::new(
            538,
            "5.7.11 Encryption required for requested authentication mechanism",
        )
    }

    /// `550 5.7.1`: the recipient names a second routing target (`%`, `!`,
    /// a source route, a quoted `@`), which the backend could route beyond
    /// the domain the proxy judged; refused like a relay attempt.
    #[must_use]
    pub fn routing_refused() -> Self {
        Self::new(
            550,
            "5.7.1 Relay access denied: routing syntax in the recipient address",
        )
    }

    /// `252 2.0.0`: VRFY is answered without looking anything up.
    #[must_use]
    pub fn vrfy_disabled() -> Self {
        Self::new(
            252,
            "2.0.0 Cannot VRFY user, but will accept message and attempt delivery",
        )
    }

    /// `550 5.5.2`: a bare LF (SMTP smuggling defence); the connection is
    /// closed after it.
    #[must_use]
    pub fn bare_newline() -> Self {
        Self::new(550, "5.5.2 Error: bare <LF> received")
    }

    /// `550 5.5.2`: a bare CR (SMTP smuggling defence); the connection is
    /// closed after it.
    #[must_use]
    pub fn bare_carriage_return() -> Self {
        Self::new(550, "5.5.2 Error: bare <CR> received")
    }

    /// `550 5.5.2`: a message line longer than allowed (RFC 5321: 1000
    /// bytes with CRLF); the connection is closed after it.
    #[must_use]
    pub fn data_line_too_long() -> Self {
        Self::new(550, "5.5.2 Error: message line too long")
    }

    /// `454 4.7.0`: STARTTLS cannot be offered now.
    #[must_use]
    pub fn tls_not_available() -> Self {
        Self::new(454, "4.7.0 TLS not available due to local problem")
    }

    /// `354`: the proxy takes the message itself (content filters).
    #[must_use]
    pub fn start_mail_input() -> Self {
        Self::new(354, "End data with <CR><LF>.<CR><LF>")
    }

    /// `220 2.0.0`: go ahead with the TLS handshake.
    #[must_use]
    pub fn ready_to_start_tls() -> Self {
        Self::new(220, "2.0.0 Ready to start TLS")
    }

    /// `221 2.0.0`: the answer to QUIT.
    #[must_use]
    pub fn closing() -> Self {
        Self::new(221, "2.0.0 Bye")
    }

    /// `250 2.0.0 Ok`: the proxy's own answer to NOOP and RSET before the
    /// session has a backend connection.
    #[must_use]
    pub fn ok() -> Self {
        Self::new(250, "2.0.0 Ok")
    }

    /// `250 2.1.0 Ok`: the proxy's own answer to a MAIL it accepts on the
    /// backend's behalf (`backend.connect = "on-rcpt"`), in Postfix's
    /// words.
    #[must_use]
    pub fn sender_ok() -> Self {
        Self::new(250, "2.1.0 Ok")
    }

    /// `250 <hostname>`: the answer to HELO.
    #[must_use]
    pub fn helo_ok(hostname: &str) -> Self {
        Self::one_line(250, hostname)
    }

    /// `214 2.0.0`: the proxy's own answer to HELP before the session has a
    /// backend connection.
    #[must_use]
    pub fn help() -> Self {
        Self::new(
            214,
            "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT (RFC 5321)",
        )
    }

    /// `454 4.7.0`: AUTH for an account locked against this source
    /// (`limits.max_failed_auth_per_account`); the credentials were not
    /// checked.
    #[must_use]
    pub fn account_locked() -> Self {
        Self::new(
            454,
            "4.7.0 Temporary authentication failure: too many failed logins for this account, try again later",
        )
    }

    /// `503 5.5.1`: AUTH when the backend offers none.
    #[must_use]
    pub fn auth_not_enabled() -> Self {
        Self::new(503, "5.5.1 Error: authentication not enabled")
    }

    /// `421 4.7.0`: more commands before MAIL FROM than
    /// `smtp.max_commands_before_mail`; the connection is closed.
    #[must_use]
    pub fn too_many_commands_before_mail() -> Self {
        Self::new(
            421,
            "4.7.0 Error: too many commands without a mail transaction",
        )
    }

    /// `421 4.3.2`: the session is closed to make room for others (the
    /// proxy is full and this session was idle without a transaction).
    #[must_use]
    pub fn shed_idle() -> Self {
        Self::new(421, "4.3.2 Error: server busy, closing idle session")
    }

    /// `421 4.3.2`: every backend slot stayed in use for
    /// `backend.slot_wait`; the client should retry.
    #[must_use]
    pub fn no_backend_slot() -> Self {
        Self::new(421, "4.3.2 Error: server busy, try again later")
    }
}

/// Why the backend's reply stream could not be read. After an error the
/// parser has dropped its buffered input: close the backend connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not an SMTP reply: no three-digit code, a code that changes between
    /// lines, too many lines, or a line too long.
    #[error("malformed reply: {0}")]
    Malformed(String),
}

/// Reads replies from the backend's byte stream.
#[derive(Debug, Clone)]
pub struct ReplyParser {
    /// Most lines in one reply (a long EHLO list is ~20).
    max_lines: usize,
    /// Longest line in bytes, CRLF included.
    max_line_len: usize,
    /// The lines of a multi-line reply read so far.
    partial: Option<Reply>,
}

impl Default for ReplyParser {
    /// A parser allowing [`ReplyParser::DEFAULT_MAX_LINES`] lines of at most
    /// [`ReplyParser::DEFAULT_MAX_LINE_LEN`] bytes.
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX_LINES, Self::DEFAULT_MAX_LINE_LEN)
    }
}

impl ReplyParser {
    /// The default bound on lines per reply.
    pub const DEFAULT_MAX_LINES: usize = 100;
    /// The default bound on a line's length, CRLF included.
    pub const DEFAULT_MAX_LINE_LEN: usize = 4096;

    /// A parser with the given bounds (lines per reply, bytes per line with
    /// CRLF).
    #[must_use]
    pub fn new(max_lines: usize, max_line_len: usize) -> Self {
        Self {
            max_lines,
            max_line_len,
            partial: None,
        }
    }

    /// Whether part of a multi-line reply has been read.
    #[must_use]
    pub fn in_reply(&self) -> bool {
        self.partial.is_some()
    }

    /// Consumes complete reply lines from `buf` and returns the reply they
    /// finish, or `None` when more input is needed (the lines read so far
    /// are kept; an incomplete line stays in `buf`). Lines may end in CRLF
    /// or a bare LF; text that is not UTF-8 is converted lossily.
    ///
    /// # Errors
    ///
    /// [`ReplyError::Malformed`] for a line without a code in `200..=599`
    /// followed by SP, `-` or the end of the line; a code that differs from
    /// the reply's first line; more than `max_lines` lines; a line (or
    /// unterminated input) longer than `max_line_len`. The parser then
    /// clears `buf` and its partial reply.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Option<Result<Reply, ReplyError>> {
        loop {
            let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
                if !buf.is_empty() && buf.len() >= self.max_line_len {
                    return Some(Err(self.fail(buf, "line too long")));
                }
                return None;
            };
            if lf + 1 > self.max_line_len {
                return Some(Err(self.fail(buf, "line too long")));
            }
            let mut line = &buf[..lf];
            if let Some((b'\r', rest)) = line.split_last() {
                line = rest;
            }
            let parsed = parse_line(line);
            let line_len = lf + 1;
            let (code, last, text) = match parsed {
                Ok(parsed) => parsed,
                Err(why) => return Some(Err(self.fail(buf, why))),
            };
            buf.advance(line_len);
            let reply = self.partial.get_or_insert_with(|| Reply {
                code,
                lines: Vec::new(),
            });
            if reply.code != code {
                return Some(Err(self.fail(buf, "reply code changed between lines")));
            }
            if reply.lines.len() >= self.max_lines {
                return Some(Err(self.fail(buf, "too many lines")));
            }
            reply.lines.push(text);
            if last {
                return self.partial.take().map(Ok);
            }
        }
    }

    /// Resets after an error: the rest of the input cannot be trusted.
    fn fail(&mut self, buf: &mut BytesMut, why: &str) -> ReplyError {
        buf.clear();
        self.partial = None;
        ReplyError::Malformed(why.to_owned())
    }
}

/// Parses one reply line (without terminator) into its code, whether it is
/// the last line, and its text.
fn parse_line(line: &[u8]) -> Result<(u16, bool, String), &'static str> {
    let code = match line {
        [a @ b'2'..=b'5', b @ b'0'..=b'9', c @ b'0'..=b'9', ..] => {
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0')
        }
        _ => return Err("no reply code"),
    };
    let (last, text) = match &line[3..] {
        [] => (true, &[][..]),
        [b' ', text @ ..] => (true, text),
        [b'-', text @ ..] => (false, text),
        _ => return Err("no separator after the reply code"),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::TestRng;

    #[test]
    fn queue_id_from_postfix_and_exim_answers_only() {
        let reply = |text: &str| Reply::new(250, text);
        assert_eq!(
            reply("2.0.0 Ok: queued as 4Fq2X31bQz").queue_id(),
            Some("4Fq2X31bQz")
        );
        assert_eq!(
            reply("OK id=1tYq9E-000Abc-3x").queue_id(),
            Some("1tYq9E-000Abc-3x")
        );
        assert_eq!(
            reply("2.0.0 Ok: queued as ABC123.").queue_id(),
            Some("ABC123")
        );
        assert_eq!(reply("2.0.0 Ok: queued as \u{1b}[31m").queue_id(), None);
        assert_eq!(reply("2.0.0 Ok").queue_id(), None);
        assert_eq!(
            reply(&format!("queued as {}", "A".repeat(65))).queue_id(),
            None
        );
    }

    fn parse_all(parser: &mut ReplyParser, buf: &mut BytesMut) -> Vec<Result<Reply, ReplyError>> {
        let mut out = Vec::new();
        while let Some(item) = parser.feed(buf) {
            let failed = item.is_err();
            out.push(item);
            if failed {
                break;
            }
        }
        out
    }

    fn malformed(why: &str) -> Result<Reply, ReplyError> {
        Err(ReplyError::Malformed(why.to_owned()))
    }

    fn reply(code: u16, lines: &[&str]) -> Result<Reply, ReplyError> {
        Ok(Reply {
            code,
            lines: lines.iter().map(|&l| l.to_owned()).collect(),
        })
    }

    #[test]
    fn parser_table() {
        type Case<'a> = (&'a str, &'a [u8], Vec<Result<Reply, ReplyError>>);
        let cases: &[Case] = &[
            (
                "single",
                b"250 2.0.0 Ok\r\n",
                vec![reply(250, &["2.0.0 Ok"])],
            ),
            ("bare code", b"250\r\n", vec![reply(250, &[""])]),
            (
                "bare lf",
                b"220 mx ESMTP\n",
                vec![reply(220, &["mx ESMTP"])],
            ),
            (
                "multi-line",
                b"250-mx.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                vec![reply(250, &["mx.example", "PIPELINING", "8BITMIME"])],
            ),
            (
                "two replies pipelined",
                b"250 2.1.0 Ok\r\n550 5.1.1 <x@y>: unknown\r\n",
                vec![
                    reply(250, &["2.1.0 Ok"]),
                    reply(550, &["5.1.1 <x@y>: unknown"]),
                ],
            ),
            ("incomplete", b"250-a\r\n250 b", vec![]),
            ("no code", b"hello\r\n", vec![malformed("no reply code")]),
            ("short", b"25\r\n", vec![malformed("no reply code")]),
            ("code 199", b"199 x\r\n", vec![malformed("no reply code")]),
            ("code 600", b"600 x\r\n", vec![malformed("no reply code")]),
            (
                "bad separator",
                b"250x\r\n",
                vec![malformed("no separator after the reply code")],
            ),
            (
                "code mismatch",
                b"250-a\r\n251 b\r\n",
                vec![malformed("reply code changed between lines")],
            ),
            (
                "not utf-8",
                b"250 caf\xe9\r\n",
                vec![reply(250, &["caf\u{fffd}"])],
            ),
        ];
        for (name, input, want) in cases {
            let mut parser = ReplyParser::default();
            let mut buf = BytesMut::from(*input);
            assert_eq!(&parse_all(&mut parser, &mut buf), want, "{name}");
        }
    }

    #[test]
    fn split_lines() {
        let input = b"250-mx.example\r\n250-SIZE 10240000\r\n250 DSN\r\n";
        for split in 0..=input.len() {
            let mut parser = ReplyParser::default();
            let mut buf = BytesMut::from(&input[..split]);
            let mut got = parse_all(&mut parser, &mut buf);
            buf.extend_from_slice(&input[split..]);
            got.extend(parse_all(&mut parser, &mut buf));
            assert_eq!(
                got,
                vec![reply(250, &["mx.example", "SIZE 10240000", "DSN"])],
                "{split}"
            );
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn bounds() {
        let mut parser = ReplyParser::new(3, 4096);
        let mut buf = BytesMut::from(&b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n220 next\r\n"[..]);
        assert_eq!(
            parse_all(&mut parser, &mut buf),
            vec![malformed("too many lines")]
        );
        assert!(buf.is_empty() && !parser.in_reply());

        // 10 bytes per line, CRLF included.
        let mut parser = ReplyParser::new(100, 10);
        let mut buf = BytesMut::from(&b"250 1234\r\n"[..]);
        assert_eq!(
            parse_all(&mut parser, &mut buf),
            vec![reply(250, &["1234"])]
        );
        let mut buf = BytesMut::from(&b"250 12345\r\n"[..]);
        assert_eq!(
            parse_all(&mut parser, &mut buf),
            vec![malformed("line too long")]
        );
        // Unterminated: 9 bytes may still end in a bare LF, 10 cannot fit.
        let mut buf = BytesMut::from(&b"250 12345"[..]);
        assert_eq!(parse_all(&mut parser, &mut buf), vec![]);
        buf.extend_from_slice(b"6");
        assert_eq!(
            parse_all(&mut parser, &mut buf),
            vec![malformed("line too long")]
        );
        assert!(buf.is_empty());
        // A zero limit refuses every line but never an empty buffer.
        let mut zero = ReplyParser::new(0, 0);
        assert_eq!(zero.feed(&mut BytesMut::new()), None);
        assert_eq!(
            zero.feed(&mut BytesMut::from(&b"250 x\r\n"[..])),
            Some(malformed("line too long"))
        );
        let mut no_lines = ReplyParser::new(0, 100);
        assert_eq!(
            no_lines.feed(&mut BytesMut::from(&b"250 x\r\n"[..])),
            Some(malformed("too many lines"))
        );
        // After an error the parser starts afresh.
        let mut buf = BytesMut::from(&b"221 bye\r\n"[..]);
        assert_eq!(parse_all(&mut parser, &mut buf), vec![reply(221, &["bye"])]);
    }

    #[test]
    fn to_bytes() {
        assert_eq!(Reply::new(250, "2.0.0 Ok").to_bytes(), b"250 2.0.0 Ok\r\n");
        // Replies written one after the other (a pipelined group's).
        let mut out = b"250 2.1.0 Ok\r\n".to_vec();
        Reply::new(550, "5.1.1 no").write_to(&mut out);
        Reply::new(1000, "odd").write_to(&mut out);
        assert_eq!(out, b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n451 odd\r\n");
        assert_eq!(
            Reply::new(250, "mx\nPIPELINING\r\nSIZE 10").to_bytes(),
            b"250-mx\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
        );
        assert_eq!(Reply::new(354, "").to_bytes(), b"354\r\n");
        // An empty SASL challenge keeps its space (RFC 4954).
        assert_eq!(Reply::new(334, "").to_bytes(), b"334 \r\n");
        assert_eq!(
            Reply::new(334, "VXNlcm5hbWU6").to_bytes(),
            b"334 VXNlcm5hbWU6\r\n"
        );
        let empty = Reply {
            code: 250,
            lines: vec![],
        };
        assert_eq!(empty.to_bytes(), b"250\r\n");
        let injected = Reply {
            code: 250,
            lines: vec!["a\r\n250 b".into(), "c\rd".into()],
        };
        assert_eq!(injected.to_bytes(), b"250-a  250 b\r\n250 c d\r\n");
        assert_eq!(Reply::new(1000, "x").to_bytes(), b"451 x\r\n");
        assert_eq!(Reply::new(99, "x").to_bytes(), b"451 x\r\n");
        let blocked = Reply::blocked("listed\r\n250 ok");
        assert_eq!(blocked.lines.len(), 1);
        assert_eq!(
            blocked.to_bytes(),
            b"421 4.7.0 Service unavailable: listed  250 ok\r\n"
        );
    }

    #[test]
    fn round_trip() {
        let replies = [
            Reply::new(250, "mx.example\nPIPELINING\nSIZE 10240000"),
            Reply::new(550, "5.1.1 unknown"),
            Reply::new(354, "End data with <CR><LF>.<CR><LF>"),
        ];
        let mut buf = BytesMut::new();
        for r in &replies {
            buf.extend_from_slice(&r.to_bytes());
        }
        let mut parser = ReplyParser::default();
        let got: Vec<_> = parse_all(&mut parser, &mut buf)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, replies);
    }

    #[test]
    fn enhanced_and_classes() {
        let cases: &[(&str, Option<EnhancedCode>)] = &[
            ("2.0.0 Ok", Some((2, 0, 0))),
            ("5.7.1 Relay access denied", Some((5, 7, 1))),
            ("4.5.3", Some((4, 5, 3))),
            ("5.123.999 x", Some((5, 123, 999))),
            ("5.1234.1 x", None),
            ("3.0.0 x", None),
            ("5.1 x", None),
            ("5.1.1.1 x", None),
            ("5.a.1 x", None),
            ("Ok", None),
            ("", None),
            ("5.1.+1 x", None),
        ];
        for (text, want) in cases {
            assert_eq!(Reply::new(250, text).enhanced(), *want, "{text:?}");
        }
        let r = Reply::new(250, "2.0.0 Ok");
        assert!(
            r.is_positive_completion()
                && !r.is_transient()
                && !r.is_permanent()
                && !r.is_intermediate()
        );
        assert!(Reply::new(354, "go").is_intermediate());
        assert!(Reply::new(451, "x").is_transient());
        assert!(Reply::new(554, "x").is_permanent());
        assert_eq!(Reply::new(250, "a\nb").text(), "a\nb");
    }

    #[test]
    fn named_replies() {
        let cases: Vec<(Reply, u16, EnhancedCode)> = vec![
            (Reply::too_many_connections(), 421, (4, 7, 0)),
            (Reply::blocked("listed"), 421, (4, 7, 0)),
            (Reply::too_many_errors(), 421, (4, 7, 0)),
            (Reply::shutting_down(), 421, (4, 3, 0)),
            (Reply::backend_unavailable(), 421, (4, 3, 0)),
            (Reply::backend_lost_in_transaction(), 451, (4, 3, 0)),
            (Reply::timeout(), 421, (4, 4, 2)),
            (Reply::pregreet(), 554, (5, 5, 1)),
            (Reply::relay_denied(), 550, (5, 7, 1)),
            (Reply::unknown_recipient(), 550, (5, 1, 1)),
            (Reply::rate_limited_null_sender(), 450, (4, 7, 1)),
            (Reply::helo_rejected(), 550, (5, 7, 1)),
            (Reply::too_many_recipients(), 452, (4, 5, 3)),
            (Reply::message_too_big(), 552, (5, 3, 4)),
            (Reply::line_too_long(), 500, (5, 5, 2)),
            (Reply::syntax_error(), 500, (5, 5, 2)),
            (Reply::bad_sender_syntax(), 501, (5, 1, 7)),
            (Reply::bad_recipient_syntax(), 501, (5, 1, 3)),
            (
                Reply::bad_arguments("Syntax: MAIL FROM:<address>"),
                501,
                (5, 5, 4),
            ),
            (Reply::bad_sequence(), 503, (5, 5, 1)),
            (
                Reply::bad_sequence_because("need MAIL command"),
                503,
                (5, 5, 1),
            ),
            (Reply::command_not_implemented(), 502, (5, 5, 1)),
            (Reply::vrfy_disabled(), 252, (2, 0, 0)),
            (Reply::bare_newline(), 550, (5, 5, 2)),
            (Reply::bare_carriage_return(), 550, (5, 5, 2)),
            (Reply::data_line_too_long(), 550, (5, 5, 2)),
            (Reply::tls_not_available(), 454, (4, 7, 0)),
            (Reply::ready_to_start_tls(), 220, (2, 0, 0)),
            (Reply::closing(), 221, (2, 0, 0)),
        ];
        for (reply, code, enhanced) in cases {
            assert_eq!(reply.code, code, "{reply:?}");
            assert_eq!(reply.enhanced(), Some(enhanced), "{reply:?}");
            assert_eq!(reply.lines.len(), 1, "{reply:?}");
            assert_eq!(
                u16::from(enhanced.0),
                code / 100,
                "enhanced class matches the code: {reply:?}"
            );
        }
        assert_eq!(
            Reply::bare_newline().to_bytes(),
            b"550 5.5.2 Error: bare <LF> received\r\n"
        );
        assert_eq!(
            Reply::greeting("mx.example").to_bytes(),
            b"220 mx.example ESMTP\r\n"
        );
    }

    /// Random bytes in random pieces: no panic, the buffer stays bounded,
    /// and until the first error the replies do not depend on the split.
    #[test]
    fn random_input_never_panics() {
        let mut rng = TestRng::new(0x5EED);
        for _ in 0..3000 {
            let max_len = 1 + rng.below(60);
            let max_lines = 1 + rng.below(6);
            let mut input = Vec::new();
            for _ in 0..rng.below(12) {
                let code = [b"250", b"220", b"550", b"354", b"421", b"199"][rng.below(6)];
                input.extend_from_slice(code);
                let sep = [&b"-"[..], b" ", b"", b"x"][rng.below(4)];
                input.extend_from_slice(sep);
                let len = rng.below(30);
                input.extend(rng.bytes(len, b"abc 0123456789.-"));
                input.extend_from_slice([&b"\r\n"[..], b"\n", b""][rng.below(3)]);
            }
            let mut whole_parser = ReplyParser::new(max_lines, max_len);
            let mut whole_buf = BytesMut::from(&input[..]);
            let whole = parse_all(&mut whole_parser, &mut whole_buf);

            let mut parser = ReplyParser::new(max_lines, max_len);
            let mut buf = BytesMut::new();
            let mut pieces = Vec::new();
            let mut start = 0;
            for end in rng.splits(input.len(), 40) {
                buf.extend_from_slice(&input[start..end]);
                start = end;
                pieces.extend(parse_all(&mut parser, &mut buf));
                assert!(buf.len() < max_len);
                if pieces.last().is_some_and(Result::is_err) {
                    break;
                }
            }
            assert_eq!(whole, pieces);
            for r in whole.into_iter().flatten() {
                let _ = (r.enhanced(), r.to_bytes());
            }
        }
    }
}
