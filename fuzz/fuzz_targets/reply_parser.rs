//! The backend's replies (`smtp::reply::ReplyParser`), fed in the pieces the
//! fuzzer chose (layout: `limiter_fuzz::Chunked`; the knob sets the line
//! limit, 0 meaning the default 4096, and the most lines per reply).
//!
//! Asserts: the replies (up to and including the first error, after which
//! the parser drops its input) are the same however the input is cut; a
//! reply's code is in 200..=599 and it has 1..=max_lines lines; its wire
//! form (`Reply::to_bytes`) is CRLF-terminated lines only, each starting
//! with the code, and parses back to the same reply (CR/LF inside a text
//! become blanks); `enhanced()` only reports a class 2, 4 or 5.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use limiter_fuzz::{only_crlf, Chunked};
use limiter_user::smtp::{Reply, ReplyError, ReplyParser};

fuzz_target!(|data: &[u8]| {
    let input = Chunked::new(data);
    let (max_lines, max_line_len) = match input.knob() {
        0 => (
            ReplyParser::DEFAULT_MAX_LINES,
            ReplyParser::DEFAULT_MAX_LINE_LEN,
        ),
        k => (usize::from(k % 8) + 1, usize::from(k) * 8),
    };

    let mut parser = ReplyParser::new(max_lines, max_line_len);
    let mut buf = BytesMut::from(input.body);
    let mut whole = Vec::new();
    drain(&mut parser, &mut buf, &mut whole, max_lines);

    let mut parser = ReplyParser::new(max_lines, max_line_len);
    let mut buf = BytesMut::new();
    let mut pieces = Vec::new();
    for (_, piece) in input.pieces() {
        if pieces.last().is_some_and(Result::is_err) {
            break;
        }
        buf.extend_from_slice(piece);
        drain(&mut parser, &mut buf, &mut pieces, max_lines);
    }
    assert_eq!(whole, pieces, "the replies depend on how the input was cut");

    for reply in whole.iter().flatten() {
        let wire = reply.to_bytes();
        assert!(only_crlf(&wire) && wire.ends_with(b"\r\n"));
        let code = reply.code.to_string();
        for line in wire.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert!(line.starts_with(code.as_bytes()));
        }
        // Parse the wire form back, with room for what lossy UTF-8
        // conversion added (U+FFFD is 3 bytes for 1).
        let mut again = ReplyParser::new(max_lines, 3 * max_line_len + 8);
        let mut buf = BytesMut::from(&wire[..]);
        let back = again
            .feed(&mut buf)
            .expect("a written reply is complete")
            .expect("a written reply parses");
        let expected = Reply {
            code: reply.code,
            lines: reply
                .lines
                .iter()
                .map(|l| l.replace(['\r', '\n'], " "))
                .collect(),
        };
        assert_eq!(back, expected);
        assert!(buf.is_empty());
        if let Some((class, _, _)) = reply.enhanced() {
            assert!([2, 4, 5].contains(&class));
        }
    }
});

fn drain(
    parser: &mut ReplyParser,
    buf: &mut BytesMut,
    out: &mut Vec<Result<Reply, ReplyError>>,
    max_lines: usize,
) {
    for _ in 0..=buf.len() + 1 {
        match parser.feed(buf) {
            Some(item) => {
                let failed = item.is_err();
                if let Ok(reply) = &item {
                    assert!((200..=599).contains(&reply.code));
                    assert!((1..=max_lines).contains(&reply.lines.len()));
                }
                out.push(item);
                if failed {
                    assert!(buf.is_empty() && !parser.in_reply());
                    return;
                }
            }
            None => return,
        }
    }
    panic!("feed keeps returning replies without consuming input");
}
