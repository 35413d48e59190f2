//! Header edits on a message held back while the scanners judge it. Pure.
//!
//! The message is kept as it came on the wire (CRLF lines, dot-stuffed,
//! without the end marker), so the edited result goes to the backend as is.
//! Only the header block is rebuilt; the body is sent on from the original
//! buffer. Everything a scanner asks for is sanitised first: a header name
//! must be a valid field name and a value cannot start a new header line,
//! so no scanner reply (or message content echoed in it) can inject headers.

/// Longest header value taken from a scanner, in bytes. `X-Spamd-Result`
/// lists every symbol that fired and can run to a few kilobytes.
const MAX_VALUE: usize = 16 * 1024;
/// Most headers a scanner may add to one message.
const MAX_ADDED: usize = 32;

/// The header changes asked for by the scanners, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Fields to remove first: the name and which occurrence (rspamd's
    /// convention: 0 = every one, n > 0 = the n-th, n < 0 = the n-th from the
    /// end).
    pub remove: Vec<(String, i64)>,
    /// The new Subject (rspamd's "rewrite subject" action).
    pub subject: Option<String>,
    /// Fields to add at the top of the header block, in this order.
    pub add: Vec<(String, String)>,
}

impl HeaderEdits {
    /// Whether applying these changes would leave the message as it is.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.subject.is_none() && self.add.is_empty()
    }

    /// Adds the edits of another scanner after these.
    pub fn extend(&mut self, other: HeaderEdits) {
        self.remove.extend(other.remove);
        if other.subject.is_some() {
            self.subject = other.subject;
        }
        self.add.extend(other.add);
    }
}

/// The message with `edits` applied: a new header block, and where the rest
/// of `message` (the blank line and the body) starts. Send
/// `head` then `&message[rest..]`.
#[must_use]
pub fn apply(message: &[u8], edits: &HeaderEdits) -> (Vec<u8>, usize) {
    let end = header_block_end(message);
    let mut fields = split_fields(&message[..end]);
    for (name, which) in &edits.remove {
        remove_fields(&mut fields, name, *which);
    }
    let mut head = Vec::with_capacity(end + 256);
    for (name, value) in edits.add.iter().take(MAX_ADDED) {
        push_field(&mut head, name, value);
    }
    let mut subject_done = edits.subject.is_none();
    for field in &fields {
        match &edits.subject {
            Some(subject) if !subject_done && field_name_is(field, "Subject") => {
                push_field(&mut head, "Subject", subject);
                subject_done = true;
            }
            _ => head.extend_from_slice(field),
        }
    }
    if let (false, Some(subject)) = (subject_done, &edits.subject) {
        push_field(&mut head, "Subject", subject);
    }
    (head, end)
}

/// Where the header block ends: the offset of the blank line that separates
/// it from the body, or of the first line that is not a header field, or
/// the end of the message.
fn header_block_end(message: &[u8]) -> usize {
    let mut at = 0;
    let mut seen_field = false;
    while at < message.len() {
        let line_end = message[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(message.len(), |p| at + p + 2);
        let line = &message[at..line_end];
        let continuation = seen_field && matches!(line.first(), Some(b' ' | b'\t'));
        if !(continuation || is_field_start(line)) {
            return at;
        }
        seen_field = true;
        at = line_end;
    }
    message.len()
}

/// Whether a line starts a header field: `name ":"` with a valid name.
fn is_field_start(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(colon) => is_field_name(&line[..colon]),
        None => false,
    }
}

/// RFC 5322 field names: printable ASCII but `:`, at least one character.
/// A leading `.` is refused too: the line would need dot-stuffing.
fn is_field_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 76
        && name[0] != b'.'
        && name.iter().all(|&b| (33..=126).contains(&b) && b != b':')
}

/// The header block as whole fields (first line plus continuation lines,
/// CRLFs included).
fn split_fields(block: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut at = 0;
    while at < block.len() {
        let line_end = block[at..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(block.len(), |p| at + p + 2);
        if at > start && !matches!(block[at], b' ' | b'\t') {
            fields.push(&block[start..at]);
            start = at;
        }
        at = line_end;
    }
    if start < block.len() {
        fields.push(&block[start..]);
    }
    fields
}

fn field_name_is(field: &[u8], name: &str) -> bool {
    field
        .iter()
        .position(|&b| b == b':')
        .is_some_and(|colon| field[..colon].eq_ignore_ascii_case(name.as_bytes()))
}

fn remove_fields(fields: &mut Vec<&[u8]>, name: &str, which: i64) {
    let matching: Vec<usize> = (0..fields.len())
        .filter(|&i| field_name_is(fields[i], name))
        .collect();
    let chosen: Vec<usize> = match which {
        0 => matching,
        n if n > 0 => usize::try_from(n - 1)
            .ok()
            .and_then(|i| matching.get(i).copied())
            .into_iter()
            .collect(),
        // `unsigned_abs`: `-n` overflows for `i64::MIN`.
        n => usize::try_from(n.unsigned_abs())
            .ok()
            .and_then(|back| matching.len().checked_sub(back))
            .and_then(|i| matching.get(i).copied())
            .into_iter()
            .collect(),
    };
    for i in chosen.into_iter().rev() {
        fields.remove(i);
    }
}

/// Appends `name: value` CRLF, or nothing if the name is not a valid field
/// name. Line breaks inside the value become folds (CRLF + tab); control
/// characters other than tab are dropped; the value is cut at [`MAX_VALUE`].
/// A fold is only written for a line that still holds something visible
/// once cleaned: a line of blanks only would end the header block for
/// some readers (RFC 5322 §3.2.2 forbids generating one).
fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    if !is_field_name(name.as_bytes()) {
        return;
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    let mut written = 0;
    let mut lines = 0;
    for segment in value.split(['\r', '\n']) {
        let clean: Vec<u8> = segment
            .bytes()
            .filter(|&b| b == b'\t' || b >= 0x20 && b != 0x7f)
            .take(MAX_VALUE - written)
            .collect();
        if clean.iter().all(|&b| b == b' ' || b == b'\t') {
            continue;
        }
        if lines > 0 {
            out.extend_from_slice(b"\r\n");
            if !clean.starts_with(b" ") && !clean.starts_with(b"\t") {
                out.push(b'\t');
            }
        }
        out.extend_from_slice(&clean);
        written += clean.len();
        lines += 1;
        if written >= MAX_VALUE {
            break;
        }
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"Received: from a\r\n\tby b\r\nSubject: hello\r\nX-Spam: forged\r\nFrom: x@example.com\r\n\r\nbody\r\n..stuffed\r\n";

    fn edited(message: &[u8], edits: &HeaderEdits) -> String {
        let (head, rest) = apply(message, edits);
        let mut all = head;
        all.extend_from_slice(&message[rest..]);
        String::from_utf8(all).unwrap()
    }

    #[test]
    fn no_edits_leave_the_message_unchanged() {
        assert_eq!(edited(MESSAGE, &HeaderEdits::default()).as_bytes(), MESSAGE);
    }

    #[test]
    fn added_headers_go_on_top_and_the_body_is_untouched() {
        let edits = HeaderEdits {
            add: vec![
                (
                    "X-Spamd-Result".into(),
                    "default: False [1.0 / 15.0]\n\tSYM(1.0)".into(),
                ),
                ("X-Spam-Status".into(), "No, score=1.0".into()),
            ],
            ..HeaderEdits::default()
        };
        let out = edited(MESSAGE, &edits);
        assert!(out.starts_with(
            "X-Spamd-Result: default: False [1.0 / 15.0]\r\n\tSYM(1.0)\r\nX-Spam-Status: No, score=1.0\r\nReceived: from a\r\n\tby b\r\n"
        ));
        assert!(out.ends_with("\r\n\r\nbody\r\n..stuffed\r\n"));
    }

    #[test]
    fn removal_follows_rspamd_occurrence_rules() {
        let message = b"X-Spam: 1\r\nA: a\r\nX-Spam: 2\r\nX-Spam: 3\r\n\r\nb\r\n";
        let remove = |which| HeaderEdits {
            remove: vec![("x-spam".into(), which)],
            ..HeaderEdits::default()
        };
        assert_eq!(edited(message, &remove(0)), "A: a\r\n\r\nb\r\n");
        assert_eq!(
            edited(message, &remove(2)),
            "X-Spam: 1\r\nA: a\r\nX-Spam: 3\r\n\r\nb\r\n"
        );
        assert_eq!(
            edited(message, &remove(-1)),
            "X-Spam: 1\r\nA: a\r\nX-Spam: 2\r\n\r\nb\r\n"
        );
        assert_eq!(edited(message, &remove(9)).as_bytes(), message);
        assert_eq!(edited(message, &remove(-9)).as_bytes(), message);
        // Found by the header_edits fuzz target: negating i64::MIN overflowed.
        assert_eq!(edited(message, &remove(i64::MIN)).as_bytes(), message);
        assert_eq!(edited(message, &remove(i64::MAX)).as_bytes(), message);
    }

    #[test]
    fn subject_is_rewritten_in_place_with_its_folds_or_added() {
        let message = b"From: a\r\nSubject: long\r\n continued\r\nTo: b\r\n\r\nx\r\n";
        let edits = HeaderEdits {
            subject: Some("*** SPAM *** long continued".into()),
            ..HeaderEdits::default()
        };
        assert_eq!(
            edited(message, &edits),
            "From: a\r\nSubject: *** SPAM *** long continued\r\nTo: b\r\n\r\nx\r\n"
        );
        assert_eq!(
            edited(b"From: a\r\n\r\nx\r\n", &edits),
            "From: a\r\nSubject: *** SPAM *** long continued\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn scanner_values_cannot_inject_header_lines() {
        let edits = HeaderEdits {
            add: vec![
                (
                    "X-A".into(),
                    "one\r\nBcc: victim@example.com\r\n\r\nbody".into(),
                ),
                ("Bad Name".into(), "x".into()),
                (".Dot".into(), "x".into()),
                ("X-B".into(), "nul\0and\x1bescape".into()),
            ],
            subject: Some("s\r\nX-Injected: 1".into()),
            ..HeaderEdits::default()
        };
        let out = edited(b"Subject: s\r\n\r\nx\r\n", &edits);
        assert_eq!(
            out,
            "X-A: one\r\n\tBcc: victim@example.com\r\n\tbody\r\nX-B: nulandescape\r\nSubject: s\r\n\tX-Injected: 1\r\n\r\nx\r\n"
        );
    }

    #[test]
    fn values_never_fold_into_blank_lines() {
        // Found by the header_edits fuzz target: a line of the value holding
        // only control characters was written as a fold of blanks only.
        let edits = HeaderEdits {
            add: vec![("X-C".into(), "a\n\x01\n\x7f\n \t\nb".into())],
            subject: Some("\x01\r\nreal".into()),
            ..HeaderEdits::default()
        };
        let (head, _) = apply(b"", &edits);
        assert_eq!(head, b"X-C: a\r\n\tb\r\nSubject: real\r\n");
        // Past the cap, no more folds either.
        let edits = HeaderEdits {
            add: vec![("X-L".into(), format!("{}\nmore", "v".repeat(MAX_VALUE)))],
            ..HeaderEdits::default()
        };
        let (head, _) = apply(b"", &edits);
        assert_eq!(head.len(), "X-L: ".len() + MAX_VALUE + 2);
    }

    #[test]
    fn messages_without_headers_or_without_a_body() {
        let edits = HeaderEdits {
            add: vec![("X-A".into(), "1".into())],
            ..HeaderEdits::default()
        };
        // No header block: the first line is not a field.
        assert_eq!(edited(b"just text\r\n", &edits), "X-A: 1\r\njust text\r\n");
        // Headers only, no blank line.
        assert_eq!(edited(b"From: a\r\n", &edits), "X-A: 1\r\nFrom: a\r\n");
        assert_eq!(edited(b"", &edits), "X-A: 1\r\n");
        // A continuation line cannot open the block.
        assert_eq!(edited(b" x: y\r\n", &edits), "X-A: 1\r\n x: y\r\n");
    }

    #[test]
    fn values_are_bounded() {
        let edits = HeaderEdits {
            add: vec![("X-Long".into(), "v".repeat(MAX_VALUE * 2))],
            ..HeaderEdits::default()
        };
        let (head, _) = apply(b"", &edits);
        assert_eq!(head.len(), "X-Long: ".len() + MAX_VALUE + 2);
    }
}
