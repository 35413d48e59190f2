//! The DATA body scanner: finds the end of a message in the client's stream
//! and refuses the line endings that SMTP smuggling relies on.
//!
//! The proxy forwards the body to the backend as it arrives. An attacker who
//! hides `<LF>.<LF>` or `<CR>.<CR>` in a body hopes that one of the two
//! servers ends the message there and the other does not, so that the rest
//! is read as new commands ("SMTP smuggling", CVE-2023-51764/51765/51766).
//! The scanner therefore accepts only CRLF line endings: the first bare LF
//! or bare CR stops the scan with a [`Violation`], before the offending byte
//! is forwarded, like Postfix's `smtpd_forbid_bare_newline = reject`. The end
//! of the message is exactly `CRLF "." CRLF`, the first line counting as
//! following a CRLF, so the backend sees the message end where the proxy
//! does. Dot-stuffing is left as it is: the bytes are forwarded unchanged.

use super::reply::Reply;

/// The RFC 5321 §4.5.3.1.6 limit for a text line, CRLF included.
pub const MAX_TEXT_LINE: usize = 1000;

/// A line-ending or length rule the body broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A LF not preceded by CR.
    BareLf,
    /// A CR not followed by LF.
    BareCr,
    /// A line longer than the scanner's limit.
    LineTooLong,
}

impl Violation {
    /// The reply for the client (`550 5.5.2 …`); the proxy closes the
    /// connection after it.
    #[must_use]
    pub fn reply(self) -> Reply {
        match self {
            Violation::BareLf => Reply::bare_newline(),
            Violation::BareCr => Reply::bare_carriage_return(),
            Violation::LineTooLong => Reply::data_line_too_long(),
        }
    }

    /// A short stable name for logs and metrics (`bare-lf`, `bare-cr`,
    /// `line-too-long`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Violation::BareLf => "bare-lf",
            Violation::BareCr => "bare-cr",
            Violation::LineTooLong => "line-too-long",
        }
    }
}

/// What [`DataScanner::feed`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataProgress {
    /// Every input byte belongs to the message and was copied; feed more.
    NeedMore,
    /// The end marker was found: `out` now ends with its `.\r\n`, and
    /// `input[consumed..]` is what the client sent after the message
    /// (pipelined commands).
    End {
        /// How many bytes of the input belonged to the message.
        consumed: usize,
    },
    /// The body broke a rule. The bytes before the offending one were
    /// copied; the offending byte is `input[consumed]` (for a bare CR found
    /// through the byte after it, that byte). The message must not be
    /// completed: the proxy drops the backend connection instead of ending
    /// DATA, so the backend discards the partial message.
    Violation {
        /// Which rule.
        kind: Violation,
        /// How many bytes of the input were copied before it.
        consumed: usize,
    },
}

/// Where the scanner is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line (the message's first line included).
    LineStart,
    /// Inside a line.
    Text,
    /// After a CR, which must be followed by LF.
    Cr,
    /// After a `.` at the start of a line.
    Dot,
    /// After `.` CR at the start of a line: LF ends the message.
    DotCr,
    /// The message has ended; nothing more is read until [`DataScanner::reset`].
    Done,
    /// A rule was broken; nothing more is read until [`DataScanner::reset`].
    Failed(Violation),
}

/// Scans one DATA body, chunk by chunk.
#[derive(Debug, Clone)]
pub struct DataScanner {
    /// Longest accepted line in bytes, CRLF included.
    max_line_len: usize,
    /// The scan's position within the line grammar, kept across chunks.
    state: State,
    /// Bytes of the current line so far, CR and LF included.
    line_len: usize,
    /// Bytes copied to `out` so far, as on the wire.
    bytes: u64,
    /// The message's size once unstuffed, without the end marker.
    message_size: u64,
}

impl Default for DataScanner {
    /// A scanner with the RFC 5321 line limit ([`MAX_TEXT_LINE`]).
    fn default() -> Self {
        Self::new(MAX_TEXT_LINE)
    }
}

impl DataScanner {
    /// A scanner for one message, accepting lines of at most `max_line_len`
    /// bytes with CRLF.
    #[must_use]
    pub fn new(max_line_len: usize) -> Self {
        Self {
            max_line_len,
            state: State::LineStart,
            line_len: 0,
            bytes: 0,
            message_size: 0,
        }
    }

    /// Makes the scanner ready for the next message (same limit).
    pub fn reset(&mut self) {
        *self = Self::new(self.max_line_len);
    }

    /// Bytes of the message copied to `out` so far, exactly as received
    /// (dot-stuffing and, once found, the final `.\r\n` included).
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The message's size as the backend will store it: dot-stuffing
    /// removed, the end marker not counted. Compare it with the size limit.
    #[must_use]
    pub fn message_size(&self) -> u64 {
        self.message_size
    }

    /// How many of the bytes copied so far may be the start of the end
    /// marker (`.` or `.` CR at the start of a line): 0, 1 or 2. They belong
    /// to the message only if the next byte says so, so whoever holds the
    /// message must not treat them as content yet.
    #[must_use]
    pub fn pending_marker_len(&self) -> usize {
        match self.state {
            State::Dot => 1,
            State::DotCr => 2,
            _ => 0,
        }
    }

    /// Whether the end marker has been found.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Scans `input`, appending the bytes that belong to the message to
    /// `out` unchanged, and says whether the message goes on, ended, or
    /// broke a rule. State is kept across calls, so the marker and the
    /// CRLF pairs may be split anywhere between chunks.
    ///
    /// Once the message has ended or failed, further calls consume nothing
    /// and repeat the result (with `consumed: 0`) until [`Self::reset`].
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> DataProgress {
        match self.state {
            State::Done => return DataProgress::End { consumed: 0 },
            State::Failed(kind) => return DataProgress::Violation { kind, consumed: 0 },
            _ => {}
        }
        let mut result = DataProgress::NeedMore;
        let mut copied = input.len();
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Text {
                // Fast path: ordinary bytes up to the next CR or LF, within
                // the line limit, need no state change.
                let rest = &input[i..];
                let run = rest
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(rest.len());
                let skip = run.min(self.max_line_len.saturating_sub(self.line_len));
                self.line_len += skip;
                self.message_size = self.message_size.saturating_add(skip as u64);
                i += skip;
                if i == input.len() {
                    break;
                }
            }
            match self.step(input[i]) {
                Step::Continue => i += 1,
                Step::End => {
                    copied = i + 1;
                    result = DataProgress::End { consumed: copied };
                    break;
                }
                Step::Violation(kind) => {
                    copied = i;
                    result = DataProgress::Violation {
                        kind,
                        consumed: copied,
                    };
                    break;
                }
            }
        }
        out.extend_from_slice(&input[..copied]);
        self.bytes = self.bytes.saturating_add(copied as u64);
        result
    }

    /// Advances over one byte of a message in progress.
    fn step(&mut self, b: u8) -> Step {
        self.line_len += 1;
        if self.line_len > self.max_line_len {
            return self.fail(Violation::LineTooLong);
        }
        // Whether the byte is part of the message's content (not a stuffing
        // dot, not the end marker).
        let (next, content) = match (self.state, b) {
            (State::LineStart, b'.') => (State::Dot, false),
            (State::Dot, b'\r') => (State::DotCr, false),
            (State::DotCr, b'\n') => {
                self.state = State::Done;
                return Step::End;
            }
            (State::Cr, b'\n') => {
                self.line_len = 0;
                (State::LineStart, true)
            }
            (State::Cr | State::DotCr, _) => return self.fail(Violation::BareCr),
            (_, b'\n') => return self.fail(Violation::BareLf),
            (_, b'\r') => (State::Cr, true),
            (_, _) => (State::Text, true),
        };
        if content {
            self.message_size = self.message_size.saturating_add(1);
        }
        self.state = next;
        Step::Continue
    }

    /// Records a violation; the scanner reads nothing more.
    fn fail(&mut self, kind: Violation) -> Step {
        self.state = State::Failed(kind);
        Step::Violation(kind)
    }
}

/// The outcome of one byte.
enum Step {
    /// The message goes on.
    Continue,
    /// The byte was the LF of the end marker.
    End,
    /// The byte broke a rule and is not part of the message.
    Violation(Violation),
}

/// Turns the wire form of a message body (as [`DataScanner`] copied it:
/// CRLF lines, dot-stuffed, without the end marker) back into the message
/// itself, chunk by chunk, for the content scanners.
#[derive(Debug, Clone)]
pub struct Unstuffer {
    at_line_start: bool,
}

impl Default for Unstuffer {
    fn default() -> Self {
        Self {
            at_line_start: true,
        }
    }
}

impl Unstuffer {
    /// Appends `wire` to `out` without the stuffing dots (RFC 5321
    /// §4.5.2: a line's leading `.` is removed).
    pub fn feed(&mut self, wire: &[u8], out: &mut Vec<u8>) {
        let mut start = 0;
        for (i, &b) in wire.iter().enumerate() {
            if self.at_line_start && b == b'.' {
                out.extend_from_slice(&wire[start..i]);
                start = i + 1;
            }
            self.at_line_start = b == b'\n';
        }
        out.extend_from_slice(&wire[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::TestRng;

    /// Feeds `input` in one call.
    fn scan(input: &[u8]) -> (DataProgress, Vec<u8>, DataScanner) {
        let mut scanner = DataScanner::default();
        let mut out = Vec::new();
        let progress = scanner.feed(input, &mut out);
        (progress, out, scanner)
    }

    /// Feeds `input` in pieces ending at `ends`; returns the first result
    /// that is not `NeedMore` with `consumed` made relative to the whole
    /// input.
    fn scan_split(
        scanner: &mut DataScanner,
        input: &[u8],
        ends: &[usize],
    ) -> (DataProgress, Vec<u8>) {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in ends {
            match scanner.feed(&input[start..end], &mut out) {
                DataProgress::NeedMore => start = end,
                DataProgress::End { consumed } => {
                    return (
                        DataProgress::End {
                            consumed: start + consumed,
                        },
                        out,
                    )
                }
                DataProgress::Violation { kind, consumed } => {
                    return (
                        DataProgress::Violation {
                            kind,
                            consumed: start + consumed,
                        },
                        out,
                    )
                }
            }
        }
        (DataProgress::NeedMore, out)
    }

    fn end(consumed: usize) -> DataProgress {
        DataProgress::End { consumed }
    }

    fn violation(kind: Violation, consumed: usize) -> DataProgress {
        DataProgress::Violation { kind, consumed }
    }

    #[test]
    fn table() {
        use Violation::{BareCr, BareLf, LineTooLong};
        let long_ok = [vec![b'a'; 998], b"\r\n.\r\n".to_vec()].concat();
        let long_bad = [vec![b'a'; 999], b"\r\n.\r\n".to_vec()].concat();
        let cases: &[(&str, &[u8], DataProgress)] = &[
            ("simple", b"Subject: x\r\n\r\nbody\r\n.\r\n", end(23)),
            ("empty message", b".\r\n", end(3)),
            ("pipelined after", b"a\r\n.\r\nQUIT\r\n", end(6)),
            ("dot-stuffed", b"..foo\r\n.\r\n", end(10)),
            ("dot-stuffed lone dot", b"..\r\n.\r\n", end(7)),
            ("dot inside a line", b"a.\r\nb .\r\n.\r\n", end(12)),
            ("not yet", b"a\r\n.\r", DataProgress::NeedMore),
            ("not yet 2", b"a\r\n", DataProgress::NeedMore),
            ("bare lf", b"a\nb\r\n.\r\n", violation(BareLf, 1)),
            (
                "lf dot lf smuggling",
                b"a\r\n\n.\n\r\n.\r\n",
                violation(BareLf, 3),
            ),
            (
                "lf dot lf at start",
                b"\n.\nMAIL FROM:<x@y>\r\n",
                violation(BareLf, 0),
            ),
            (
                "crlf dot lf",
                b"a\r\n.\nRCPT TO:<x@y>\r\n",
                violation(BareLf, 4),
            ),
            ("lf dot crlf", b"a\n.\r\n", violation(BareLf, 1)),
            ("cr dot cr", b"a\r.\r", violation(BareCr, 2)),
            ("bare cr mid-line", b"a\rb\r\n.\r\n", violation(BareCr, 2)),
            ("cr cr lf", b"a\r\r\n", violation(BareCr, 2)),
            ("dot cr then text", b".\rx\r\n", violation(BareCr, 2)),
            ("dot cr cr", b"a\r\n.\r\r\n", violation(BareCr, 5)),
            ("line of 1000 with CRLF", &long_ok, end(1003)),
            (
                "line of 1001 with CRLF",
                &long_bad,
                violation(LineTooLong, 1000),
            ),
        ];
        for (name, input, want) in cases {
            let (got, out, _) = scan(input);
            assert_eq!(got, *want, "{name}");
            let copied = match got {
                DataProgress::NeedMore => input.len(),
                DataProgress::End { consumed } | DataProgress::Violation { consumed, .. } => {
                    consumed
                }
            };
            assert_eq!(out, &input[..copied], "{name}: copied unchanged");
            // Byte by byte gives the same answer.
            let ends: Vec<usize> = (1..=input.len()).collect();
            let (got_split, out_split) = scan_split(&mut DataScanner::default(), input, &ends);
            assert_eq!(got_split, *want, "{name}: byte by byte");
            assert_eq!(out_split, out, "{name}: byte by byte output");
        }
    }

    #[test]
    fn marker_at_every_split_point() {
        let input = b"From: a@b\r\n\r\nline\r\n..stuffed\r\n.\r\nQUIT\r\n";
        let end_at = input.len() - b"QUIT\r\n".len();
        for a in 0..=input.len() {
            for b in a..=input.len() {
                let ends: Vec<usize> = [a, b, input.len()].into_iter().filter(|&e| e > 0).collect();
                let mut scanner = DataScanner::default();
                let (got, out) = scan_split(&mut scanner, input, &ends);
                assert_eq!(got, end(end_at), "split at {a}, {b}");
                assert_eq!(out, &input[..end_at]);
                assert!(out.ends_with(b"\r\n.\r\n"));
                assert_eq!(scanner.bytes(), end_at as u64);
            }
        }
    }

    #[test]
    fn crlf_then_dot_in_next_chunk() {
        let mut scanner = DataScanner::default();
        let mut out = Vec::new();
        assert_eq!(scanner.feed(b"hello\r\n", &mut out), DataProgress::NeedMore);
        assert_eq!(scanner.feed(b".\r\nQUIT\r\n", &mut out), end(3));
        assert_eq!(out, b"hello\r\n.\r\n");
        assert!(scanner.is_done());
        // Finished: nothing more is consumed until reset.
        assert_eq!(scanner.feed(b"more", &mut out), end(0));
        assert_eq!(scanner.feed(b"", &mut out), end(0));
        assert_eq!(out.len(), 10);
        scanner.reset();
        assert_eq!(scanner.bytes(), 0);
        assert_eq!(scanner.feed(b".\r\n", &mut out), end(3));
    }

    #[test]
    fn failed_scanner_stays_failed() {
        let mut scanner = DataScanner::default();
        let mut out = Vec::new();
        assert_eq!(
            scanner.feed(b"ab\n", &mut out),
            violation(Violation::BareLf, 2)
        );
        assert_eq!(
            scanner.feed(b".\r\n", &mut out),
            violation(Violation::BareLf, 0)
        );
        assert_eq!(out, b"ab");
        assert!(!scanner.is_done());
    }

    #[test]
    fn sizes() {
        let (_, _, scanner) = scan(b"ab\r\n..c\r\n.\r\n");
        assert_eq!(scanner.bytes(), 12);
        // "ab\r\n" + ".c\r\n": one stuffing dot and the marker removed.
        assert_eq!(scanner.message_size(), 8);
        let (_, _, scanner) = scan(b".\r\n");
        assert_eq!((scanner.bytes(), scanner.message_size()), (3, 0));
        let mut scanner = DataScanner::default();
        let mut out = Vec::new();
        for _ in 0..10 {
            scanner.feed(b"0123456789\r\n", &mut out);
        }
        assert_eq!((scanner.bytes(), scanner.message_size()), (120, 120));
    }

    #[test]
    fn configurable_line_limit() {
        let mut scanner = DataScanner::new(5);
        let mut out = Vec::new();
        assert_eq!(scanner.feed(b"abc\r\n", &mut out), DataProgress::NeedMore);
        assert_eq!(
            scanner.feed(b"abcd\r\n", &mut out),
            violation(Violation::LineTooLong, 5)
        );
        let (got, _) = scan_split(&mut DataScanner::new(0), b".\r\n", &[3]);
        assert_eq!(got, violation(Violation::LineTooLong, 0));
    }

    #[test]
    fn violation_replies() {
        assert_eq!(
            Violation::BareLf.reply().to_bytes(),
            b"550 5.5.2 Error: bare <LF> received\r\n"
        );
        assert_eq!(Violation::BareCr.reply().code, 550);
        assert_eq!(Violation::LineTooLong.reply().enhanced(), Some((5, 5, 2)));
        assert_eq!(Violation::BareCr.as_str(), "bare-cr");
    }

    /// Random bodies in random pieces: no panic, and the result, output and
    /// counters do not depend on how the input was split. A body that ends
    /// has no bare CR/LF and ends with CRLF.CRLF (or is just ".CRLF").
    #[test]
    fn random_input_never_panics_and_split_does_not_matter() {
        let mut rng = TestRng::new(0xDA7A);
        for _ in 0..5000 {
            let len = rng.below(200);
            let mut input = rng.bytes(len, b"\r\n\r\n..ab");
            if rng.below(2) == 0 {
                input.extend_from_slice(b"\r\n.\r\n");
            }
            let max = 1 + rng.below(30);
            let mut whole = DataScanner::new(max);
            let mut whole_out = Vec::new();
            let whole_result = whole.feed(&input, &mut whole_out);

            let ends = rng.splits(input.len(), 20);
            let mut pieces = DataScanner::new(max);
            let (pieces_result, pieces_out) = scan_split(&mut pieces, &input, &ends);
            if !input.is_empty() {
                assert_eq!(whole_result, pieces_result);
            }
            assert_eq!(whole_out, pieces_out);
            assert_eq!(whole.bytes(), pieces.bytes());
            assert_eq!(whole.message_size(), pieces.message_size());
            assert!(whole.message_size() <= whole.bytes());
            assert_eq!(whole.bytes(), whole_out.len() as u64);
            if let DataProgress::End { consumed } = whole_result {
                let body = &input[..consumed];
                assert!(body == b".\r\n" || body.ends_with(b"\r\n.\r\n"));
                for (i, &b) in body.iter().enumerate() {
                    if b == b'\n' {
                        assert!(i > 0 && body[i - 1] == b'\r', "bare LF in an accepted body");
                    }
                    if b == b'\r' {
                        assert_eq!(body.get(i + 1), Some(&b'\n'), "bare CR in an accepted body");
                    }
                }
            }
        }
    }

    #[test]
    fn unstuffer_removes_leading_dots_across_chunk_boundaries() {
        let wire = b"a\r\n..b\r\n.\r\n...c\r\nd.e\r\n";
        for split in 0..=wire.len() {
            let mut unstuffer = Unstuffer::default();
            let mut out = Vec::new();
            unstuffer.feed(&wire[..split], &mut out);
            unstuffer.feed(&wire[split..], &mut out);
            assert_eq!(out, b"a\r\n.b\r\n\r\n..c\r\nd.e\r\n", "split at {split}");
        }
    }
}
