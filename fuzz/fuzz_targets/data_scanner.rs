//! The DATA body scanner (`smtp::data::DataScanner`), a differential check:
//! the body fed whole and fed in the pieces the fuzzer chose (layout:
//! `limiter_fuzz::Chunked`; the knob sets the line limit, 0 meaning the RFC
//! 5321 1000) must give the same outcome at the same position of the body,
//! the same bytes copied out and the same counters.
//!
//! Also asserts: what is copied out is exactly the body's prefix up to that
//! position (the scanner forwards, never rewrites); it holds only CRLF line
//! endings (a CR may be its last byte when more may follow, or when the
//! violation is found through the byte after it); at the end it finishes with `CRLF . CRLF`
//! (or is `. CRLF`); a violation names the byte that broke the rule;
//! `message_size` equals the length of the unstuffed message
//! (`Unstuffer`, itself checked whole against pieces).
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_fuzz::{only_crlf, Chunked};
use limiter_user::smtp::data::{Unstuffer, MAX_TEXT_LINE};
use limiter_user::smtp::{DataProgress, DataScanner, Violation};

/// The outcome, with the position made absolute in the body.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    NeedMore,
    End(usize),
    Violation(Violation, usize),
}

fuzz_target!(|data: &[u8]| {
    let input = Chunked::new(data);
    let max_line_len = match input.knob() {
        0 => MAX_TEXT_LINE,
        k => usize::from(k),
    };
    let body = input.body;

    let mut whole = DataScanner::new(max_line_len);
    let mut whole_out = Vec::new();
    let whole_outcome = match whole.feed(body, &mut whole_out) {
        DataProgress::NeedMore => Outcome::NeedMore,
        DataProgress::End { consumed } => Outcome::End(consumed),
        DataProgress::Violation { kind, consumed } => Outcome::Violation(kind, consumed),
    };

    let mut split = DataScanner::new(max_line_len);
    let mut split_out = Vec::new();
    let mut split_outcome = Outcome::NeedMore;
    for (start, piece) in input.pieces() {
        match split.feed(piece, &mut split_out) {
            DataProgress::NeedMore => {}
            DataProgress::End { consumed } => {
                assert!(consumed <= piece.len());
                split_outcome = Outcome::End(start + consumed);
                break;
            }
            DataProgress::Violation { kind, consumed } => {
                assert!(consumed <= piece.len());
                split_outcome = Outcome::Violation(kind, start + consumed);
                break;
            }
        }
    }

    assert_eq!(whole_outcome, split_outcome, "outcome depends on the cuts");
    assert_eq!(whole_out, split_out, "output depends on the cuts");
    assert_eq!(whole.bytes(), split.bytes());
    assert_eq!(whole.message_size(), split.message_size());
    assert_eq!(whole.is_done(), split.is_done());

    let out = whole_out;
    assert_eq!(whole.bytes(), out.len() as u64);
    assert!(
        body.starts_with(&out),
        "the scanner must not rewrite the body"
    );
    assert!(whole.message_size() <= whole.bytes());
    match whole_outcome {
        Outcome::NeedMore => {
            assert_eq!(out.len(), body.len());
            let trailing_cr = out.last() == Some(&b'\r');
            assert!(only_crlf(&out[..out.len() - usize::from(trailing_cr)]));
        }
        Outcome::End(at) => {
            assert!(whole.is_done());
            assert_eq!(out.len(), at);
            assert!(only_crlf(&out));
            assert!(out == b".\r\n" || out.ends_with(b"\r\n.\r\n"));
            // The marker is the first `CRLF . CRLF`: none ends earlier.
            let first = if out.starts_with(b".\r\n") {
                3
            } else {
                out.windows(5).position(|w| w == b"\r\n.\r\n").unwrap() + 5
            };
            assert_eq!(first, at);
            // Every line fits the limit (CRLF included).
            for line in out.split_inclusive(|&b| b == b'\n') {
                assert!(line.len() <= max_line_len);
            }
            let mut message = Vec::new();
            Unstuffer::default().feed(&out[..at - 3], &mut message);
            assert_eq!(whole.message_size(), message.len() as u64);
            // A scanner that has ended takes nothing more.
            let mut more = Vec::new();
            assert_eq!(
                whole.feed(b"MAIL FROM:<x@y>\r\n", &mut more),
                DataProgress::End { consumed: 0 }
            );
            assert!(more.is_empty());
        }
        Outcome::Violation(kind, at) => {
            assert_eq!(out.len(), at);
            // The offending byte is in the body.
            assert!(at < body.len());
            let trailing_cr = out.last() == Some(&b'\r');
            assert!(only_crlf(&out[..out.len() - usize::from(trailing_cr)]));
            match kind {
                Violation::BareLf => {
                    assert_eq!(body[at], b'\n');
                    assert!(at == 0 || body[at - 1] != b'\r');
                }
                Violation::BareCr => {
                    assert!(at > 0 && body[at - 1] == b'\r');
                    assert_ne!(body.get(at), Some(&b'\n'));
                }
                Violation::LineTooLong => {
                    let line_start = out
                        .windows(2)
                        .rposition(|w| w == b"\r\n")
                        .map_or(0, |p| p + 2);
                    assert!(at + 1 - line_start > max_line_len);
                }
            }
        }
    }

    // The unstuffer, too, must not care about the cuts.
    let mut unstuffed_whole = Vec::new();
    Unstuffer::default().feed(body, &mut unstuffed_whole);
    let mut unstuffer = Unstuffer::default();
    let mut unstuffed_split = Vec::new();
    for (_, piece) in input.pieces() {
        unstuffer.feed(piece, &mut unstuffed_split);
    }
    assert_eq!(unstuffed_whole, unstuffed_split);
});
