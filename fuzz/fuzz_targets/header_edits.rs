//! Header edits asked for by the content scanners (`filters::message::apply`).
//!
//! Input, text: edit lines, an empty line, then the message (wire form):
//!
//! ```text
//! -Name N          remove occurrence N of Name (0 every one, <0 from the end)
//! +Name: value     add a field (`\r`, `\n`, `\t`, `\\` escapes in the value)
//! =value           rewrite the Subject (same escapes)
//!
//! Received: …
//! ```
//!
//! Asserts: the header block ends where it ends without edits; with no
//! edits the head is the message's header block unchanged, and removals
//! only take fields away; what the edits add (applied to an empty message)
//! is CRLF lines only, each a `Name: value` field with a valid name or a
//! fold (SP/HTAB then something visible), none starting with `.` (the
//! message is dot-stuffed), at most 32 added fields and a Subject, each
//! value bounded (16 KiB plus folds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_fuzz::only_crlf;
use limiter_user::filters::message::{apply, HeaderEdits};

const MAX_VALUE: usize = 16 * 1024;

fuzz_target!(|data: &[u8]| {
    let (spec, message) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let mut edits = HeaderEdits::default();
    for line in String::from_utf8_lossy(spec).split('\n') {
        if let Some(rest) = line.strip_prefix('-') {
            let (name, which) = rest.rsplit_once(' ').unwrap_or((rest, "0"));
            let which = which.trim().parse::<i64>().unwrap_or(0);
            edits.remove.push((name.to_owned(), which));
        } else if let Some(rest) = line.strip_prefix('+') {
            let (name, value) = rest.split_once(':').unwrap_or((rest, ""));
            edits
                .add
                .push((name.to_owned(), unescape(value.trim_start_matches(' '))));
        } else if let Some(rest) = line.strip_prefix('=') {
            edits.subject = Some(unescape(rest));
        }
    }

    let (plain_head, end) = apply(message, &HeaderEdits::default());
    assert!(end <= message.len());
    assert_eq!(plain_head, &message[..end], "no edits, no change");

    let (_head, rest) = apply(message, &edits);
    assert_eq!(rest, end, "the header block ends where it ends");
    let removals_only = HeaderEdits {
        remove: edits.remove.clone(),
        ..HeaderEdits::default()
    };
    let (kept, _) = apply(message, &removals_only);
    assert!(kept.len() <= end);
    // What is kept is the original fields in order: a subsequence.
    assert!(is_subsequence(&kept, &message[..end]));

    // What the additions and the Subject write, alone.
    let additions = HeaderEdits {
        remove: Vec::new(),
        ..edits.clone()
    };
    let (added, _) = apply(b"", &additions);
    assert!(only_crlf(&added), "{:?}", String::from_utf8_lossy(&added));
    assert!(added.is_empty() || added.ends_with(b"\r\n"));
    let mut fields = 0;
    let mut value_len = 0;
    for line in added.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line.strip_suffix(b"\r").expect("CRLF lines");
        assert!(!line.starts_with(b"."), "a line starting with a dot");
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            assert!(fields > 0, "a fold before any field");
            assert!(
                line.iter().any(|&b| b != b' ' && b != b'\t'),
                "a blank fold line: {:?}",
                String::from_utf8_lossy(&added)
            );
            value_len += line.len();
        } else {
            let colon = line.iter().position(|&b| b == b':').expect("a field");
            let name = &line[..colon];
            assert!(!name.is_empty() && name.iter().all(|&b| (33..=126).contains(&b)));
            fields += 1;
            value_len = line.len() - colon;
        }
        assert!(value_len <= MAX_VALUE + 3 * added.len() / 2);
        assert!(!line.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f));
    }
    assert!(fields <= 32 + 1, "{fields} fields added");
    assert!(added.len() <= 33 * (MAX_VALUE + 80) + 3 * data.len());
});

/// `\r`, `\n`, `\t` and `\\` escapes, so that text seeds can carry them.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn is_subsequence(small: &[u8], big: &[u8]) -> bool {
    let mut it = big.iter();
    small.iter().all(|b| it.any(|c| c == b))
}
