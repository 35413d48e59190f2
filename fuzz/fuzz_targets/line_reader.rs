//! The command-line reader (`smtp::line::LineReader`), fed the body in the
//! pieces the fuzzer chose (layout: `limiter_fuzz::Chunked`; the knob sets
//! the line limit, 0 meaning the RFC 5321 512).
//!
//! Asserts: the lines and errors are the same, in the same order, however
//! the input is cut; a line holds no LF and no NUL and fits the limit with
//! its terminator; after `None` the buffer holds fewer than `max_len` bytes
//! (it stays bounded); every byte of the input is accounted for.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use limiter_fuzz::Chunked;
use limiter_user::smtp::line::MAX_COMMAND_LINE;
use limiter_user::smtp::{Ending, Line, LineError, LineReader};

fuzz_target!(|data: &[u8]| {
    let input = Chunked::new(data);
    let max_len = match input.knob() {
        0 => MAX_COMMAND_LINE,
        k => usize::from(k) * 4,
    };

    // Whole: everything in one buffer.
    let mut whole_reader = LineReader::new(max_len);
    let mut buf = BytesMut::from(input.body);
    let mut whole = Vec::new();
    drain(&mut whole_reader, &mut buf, &mut whole, max_len);
    let whole_left = buf.len();

    // In pieces.
    let mut reader = LineReader::new(max_len);
    let mut buf = BytesMut::new();
    let mut pieces = Vec::new();
    for (_, piece) in input.pieces() {
        buf.extend_from_slice(piece);
        drain(&mut reader, &mut buf, &mut pieces, max_len);
    }
    assert_eq!(whole, pieces, "the lines depend on how the input was cut");
    assert_eq!(whole_reader.is_discarding(), reader.is_discarding());
    // What is left is the same unterminated tail (or nothing, when it was
    // reported too long).
    assert_eq!(whole_left, buf.len());

    // Every accepted line's bytes (text + terminator) came from the input,
    // in order: the accepted lines are a subsequence of the body's lines.
    let mut at = 0;
    for line in whole.iter().flatten() {
        let mut wire = line.text.clone();
        if line.ending == Ending::CrLf {
            wire.push(b'\r');
        }
        wire.push(b'\n');
        let found = input.body[at..]
            .windows(wire.len())
            .position(|w| w == wire.as_slice())
            .expect("an accepted line is in the input");
        at += found + wire.len();
    }
});

fn drain(
    reader: &mut LineReader,
    buf: &mut BytesMut,
    out: &mut Vec<Result<Line, LineError>>,
    max_len: usize,
) {
    // Each call takes at least one byte, so this ends; the bound is a
    // safety net that turns a stuck reader into a crash, not a hang.
    for _ in 0..=buf.len() + 1 {
        match reader.next_line(buf) {
            Some(item) => {
                if let Ok(line) = &item {
                    assert!(!line.text.contains(&b'\n') && !line.text.contains(&0));
                    let terminator = if line.ending == Ending::CrLf { 2 } else { 1 };
                    assert!(line.text.len() + terminator <= max_len);
                }
                out.push(item);
            }
            None => {
                assert!(buf.len() < max_len.max(1), "the buffer must stay bounded");
                assert!(!buf.contains(&b'\n'));
                return;
            }
        }
    }
    panic!("next_line keeps returning items without consuming input");
}
