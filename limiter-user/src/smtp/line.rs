//! Incremental line splitting for the command phase.
//!
//! The proxy reads from the client into a [`BytesMut`] and asks
//! [`LineReader::next_line`] for complete lines. A line is cut at LF; a CR
//! right before the LF is part of the terminator ([`Ending::CrLf`]), a CR
//! anywhere else stays in the text (see [`Line::has_bare_cr`]). Lines longer
//! than the limit (RFC 5321 §4.5.3.1.4: 512 octets for a command line,
//! CRLF included) are reported once and skipped up to their LF, and the
//! buffer never has to hold more than the limit: as soon as it holds that
//! many bytes without a LF the reader reports the line and drops the bytes.

use bytes::{Buf, BytesMut};

/// The RFC 5321 limit for a command line, CRLF included.
pub const MAX_COMMAND_LINE: usize = 512;

/// How a line was terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// `CR LF`, the only terminator SMTP allows.
    CrLf,
    /// A LF without a CR before it (the shape SMTP smuggling relies on).
    BareLf,
}

/// One complete line taken out of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line's bytes without its terminator.
    pub text: Vec<u8>,
    /// How the line was terminated, so the proxy can refuse a bare LF.
    pub ending: Ending,
}

impl Line {
    /// Whether the text holds a CR that is not part of a CRLF terminator.
    #[must_use]
    pub fn has_bare_cr(&self) -> bool {
        self.text.contains(&b'\r')
    }
}

/// Why a line was refused. After either error the reader is ready for the
/// next line; the refused line's bytes are gone from the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The line (terminator included) is longer than the reader's limit.
    #[error("line too long")]
    TooLong,
    /// The line contains a NUL byte.
    #[error("NUL byte in line")]
    Nul,
}

/// Splits a byte stream into lines, one call at a time.
#[derive(Debug, Clone)]
pub struct LineReader {
    /// Longest accepted line in bytes, terminator included.
    max_len: usize,
    /// Set after an overlong line was reported before its LF arrived: the
    /// bytes up to and including the next LF belong to that line and are
    /// dropped without a second report.
    discarding: bool,
}

impl Default for LineReader {
    /// A reader with the RFC 5321 command-line limit ([`MAX_COMMAND_LINE`]).
    fn default() -> Self {
        Self::new(MAX_COMMAND_LINE)
    }
}

impl LineReader {
    /// A reader that accepts lines of at most `max_len` bytes, terminator
    /// included.
    #[must_use]
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            discarding: false,
        }
    }

    /// The longest accepted line, terminator included.
    #[must_use]
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether the reader is skipping the rest of an overlong line.
    #[must_use]
    pub fn is_discarding(&self) -> bool {
        self.discarding
    }

    /// Forgets any overlong line in progress (for example when the proxy
    /// throws the buffered input away after STARTTLS).
    pub fn reset(&mut self) {
        self.discarding = false;
    }

    /// Takes the next complete line out of `buf`.
    ///
    /// Returns `None` when `buf` holds no complete line yet (read more and
    /// call again); the bytes of the incomplete line stay in `buf`, which
    /// then holds fewer than `max_len` bytes. A returned line or error has
    /// been removed from `buf`, terminator included.
    ///
    /// # Errors
    ///
    /// * [`LineError::TooLong`] once per overlong line, either when its LF
    ///   arrives or as soon as `buf` holds `max_len` bytes without a LF (the
    ///   rest of the line is then dropped as it arrives);
    /// * [`LineError::Nul`] for a line that contains a NUL byte.
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Option<Result<Line, LineError>> {
        if self.discarding {
            match find_lf(buf) {
                Some(lf) => {
                    buf.advance(lf + 1);
                    self.discarding = false;
                }
                None => {
                    buf.clear();
                    return None;
                }
            }
        }
        match find_lf(buf) {
            Some(lf) => {
                let line = buf.split_to(lf + 1);
                if line.len() > self.max_len {
                    return Some(Err(LineError::TooLong));
                }
                let mut text = &line[..lf];
                let ending = match text.split_last() {
                    Some((b'\r', rest)) => {
                        text = rest;
                        Ending::CrLf
                    }
                    _ => Ending::BareLf,
                };
                if text.contains(&0) {
                    return Some(Err(LineError::Nul));
                }
                Some(Ok(Line {
                    text: text.to_vec(),
                    ending,
                }))
            }
            None if !buf.is_empty() && buf.len() >= self.max_len => {
                // The line cannot fit any more: report it now and drop what
                // arrived so the buffer stays bounded.
                buf.clear();
                self.discarding = true;
                Some(Err(LineError::TooLong))
            }
            None => None,
        }
    }
}

/// The offset of the first LF in `buf`.
fn find_lf(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::TestRng;

    type Item = Result<(Vec<u8>, Ending), LineError>;

    fn drain(reader: &mut LineReader, buf: &mut BytesMut) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(item) = reader.next_line(buf) {
            out.push(item.map(|l| (l.text, l.ending)));
        }
        out
    }

    fn lines_of(max: usize, input: &[u8]) -> (Vec<Item>, BytesMut) {
        let mut reader = LineReader::new(max);
        let mut buf = BytesMut::from(input);
        let items = drain(&mut reader, &mut buf);
        (items, buf)
    }

    fn ok(text: &str, ending: Ending) -> Item {
        Ok((text.as_bytes().to_vec(), ending))
    }

    #[test]
    fn table() {
        use Ending::{BareLf, CrLf};
        type Case<'a> = (&'a str, &'a [u8], Vec<Item>, &'a [u8]);
        let cases: &[Case] = &[
            ("crlf", b"EHLO a\r\n", vec![ok("EHLO a", CrLf)], b""),
            ("bare lf", b"EHLO a\n", vec![ok("EHLO a", BareLf)], b""),
            ("empty line", b"\r\n", vec![ok("", CrLf)], b""),
            ("empty bare", b"\n", vec![ok("", BareLf)], b""),
            ("incomplete", b"EHLO a\r", vec![], b"EHLO a\r"),
            (
                "bare cr inside",
                b"EH\rLO a\r\n",
                vec![ok("EH\rLO a", CrLf)],
                b"",
            ),
            ("cr cr lf", b"NOOP\r\r\n", vec![ok("NOOP\r", CrLf)], b""),
            (
                "many lines",
                b"EHLO a\r\nMAIL FROM:<>\r\nRCPT TO:<b@c>\nDATA\r\nQU",
                vec![
                    ok("EHLO a", CrLf),
                    ok("MAIL FROM:<>", CrLf),
                    ok("RCPT TO:<b@c>", BareLf),
                    ok("DATA", CrLf),
                ],
                b"QU",
            ),
            (
                "nul then recovery",
                b"NO\0OP\r\nQUIT\r\n",
                vec![Err(LineError::Nul), ok("QUIT", CrLf)],
                b"",
            ),
        ];
        for (name, input, want, rest) in cases {
            let (got, buf) = lines_of(512, input);
            assert_eq!(&got, want, "{name}");
            assert_eq!(&buf[..], *rest, "{name}: rest");
        }
    }

    #[test]
    fn limit_is_inclusive_of_crlf() {
        let mut line = vec![b'a'; 510];
        line.extend_from_slice(b"\r\n");
        let (got, _) = lines_of(512, &line);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_ok());

        let mut line = vec![b'a'; 511];
        line.extend_from_slice(b"\r\n");
        line.extend_from_slice(b"QUIT\r\n");
        let (got, _) = lines_of(512, &line);
        assert_eq!(got, vec![Err(LineError::TooLong), ok("QUIT", Ending::CrLf)]);
    }

    #[test]
    fn too_long_without_lf_then_recovery() {
        let mut reader = LineReader::new(16);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"0123456789");
        assert!(reader.next_line(&mut buf).is_none());
        buf.extend_from_slice(b"0123456789");
        assert_eq!(reader.next_line(&mut buf), Some(Err(LineError::TooLong)));
        assert!(buf.is_empty(), "the buffer is dropped, not kept growing");
        assert!(reader.is_discarding());
        // More of the same line: dropped silently, reported only once.
        for _ in 0..100 {
            buf.extend_from_slice(b"xxxxxxxxxxxxxxxxxxxxxxxx");
            assert_eq!(reader.next_line(&mut buf), None);
            assert!(buf.is_empty());
        }
        buf.extend_from_slice(b"tail\r\nQUIT\r\nNO");
        assert_eq!(drain(&mut reader, &mut buf), vec![ok("QUIT", Ending::CrLf)]);
        assert!(!reader.is_discarding());
        assert_eq!(&buf[..], b"NO");
    }

    #[test]
    fn split_across_feeds() {
        let input = b"EHLO client.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n";
        for split in 0..=input.len() {
            let mut reader = LineReader::new(512);
            let mut buf = BytesMut::from(&input[..split]);
            let mut got = drain(&mut reader, &mut buf);
            buf.extend_from_slice(&input[split..]);
            got.extend(drain(&mut reader, &mut buf));
            assert_eq!(
                got,
                vec![
                    ok("EHLO client.example", Ending::CrLf),
                    ok("MAIL FROM:<a@b>", Ending::CrLf),
                    ok("RCPT TO:<c@d>", Ending::CrLf),
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn zero_limit_refuses_everything_without_panic() {
        let (got, buf) = lines_of(0, b"a\r\n\r\n");
        assert_eq!(got, vec![Err(LineError::TooLong), Err(LineError::TooLong)]);
        assert!(buf.is_empty());
    }

    /// Random bytes fed in random pieces: no panic, the buffer stays under
    /// the limit, and the lines do not depend on how the input was split.
    #[test]
    fn random_input_never_panics_and_split_does_not_matter() {
        let mut rng = TestRng::new(0x11AE);
        for _ in 0..2000 {
            let max = 1 + rng.below(40);
            let len = rng.below(300);
            let input = rng.bytes(len, b"\r\n\0aB :<>@");
            let (whole, _) = lines_of(max, &input);

            let mut reader = LineReader::new(max);
            let mut buf = BytesMut::new();
            let mut pieces = Vec::new();
            let mut start = 0;
            for end in rng.splits(input.len(), 50) {
                buf.extend_from_slice(&input[start..end]);
                start = end;
                pieces.extend(drain(&mut reader, &mut buf));
                assert!(buf.len() < max, "buffer bounded by the limit");
            }
            assert_eq!(whole, pieces);
        }
    }
}
