//! Helpers shared by the fuzz targets: how an input is cut into the pieces a
//! streaming parser is fed, and the reference checks several targets use.
//!
//! Input layout of the streaming targets (`line_reader`, `reply_parser`,
//! `data_scanner`):
//!
//! ```text
//! [param: u8] [n: u8] [n × cut: u16 LE] [body …]
//! ```
//!
//! `param` is a knob of the target (a line limit); its top bit asks for the
//! body to be fed one byte at a time. `n % 16` cut offsets follow (each taken
//! modulo `body.len() + 1`); the body is fed in the pieces between them. A
//! short input simply has fewer cuts: every input is valid.

/// A body and the fuzzer's choice of where to cut it.
pub struct Chunked<'a> {
    /// The target's knob (see each target).
    pub param: u8,
    /// The whole body.
    pub body: &'a [u8],
    /// End offsets of the pieces, increasing, the last one `body.len()`.
    ends: Vec<usize>,
}

impl<'a> Chunked<'a> {
    /// Decodes the layout described in the crate documentation.
    #[must_use]
    pub fn new(data: &'a [u8]) -> Self {
        let param = data.first().copied().unwrap_or(0);
        let n = usize::from(data.get(1).copied().unwrap_or(0) % 16);
        let rest = data.get(2..).unwrap_or_default();
        let n = n.min(rest.len() / 2);
        let (cuts, body) = rest.split_at(2 * n);
        let mut ends: Vec<usize> = if param & 0x80 != 0 {
            (1..=body.len()).collect()
        } else {
            cuts.chunks_exact(2)
                .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])) % (body.len() + 1))
                .collect()
        };
        ends.push(body.len());
        ends.sort_unstable();
        ends.dedup();
        Self { param, body, ends }
    }

    /// The pieces with their start offsets in the body (the empty pieces
    /// left out, except for an empty body, which is one empty piece).
    pub fn pieces(&self) -> impl Iterator<Item = (usize, &'a [u8])> + '_ {
        let body = self.body;
        let mut start = 0;
        self.ends.iter().filter_map(move |&end| {
            if end == start && !body.is_empty() {
                return None;
            }
            let piece = (start, &body[start..end]);
            start = end;
            Some(piece)
        })
    }

    /// The param without the one-byte-at-a-time bit.
    #[must_use]
    pub fn knob(&self) -> u8 {
        self.param & 0x7f
    }
}

/// Whether `bytes` hold a CR or a LF anywhere.
#[must_use]
pub fn has_cr_or_lf(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b == b'\r' || b == b'\n')
}

/// Whether every line ending in `bytes` is a CRLF: no LF without a CR before
/// it, no CR without a LF after it (a trailing CR counts as bare).
#[must_use]
pub fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_are_decoded_and_bounded() {
        let data = [0u8, 2, 3, 0, 200, 0, b'a', b'b', b'c', b'd', b'e'];
        let c = Chunked::new(&data);
        let pieces: Vec<_> = c.pieces().collect();
        // 200 % 6 = 2, and 3.
        assert_eq!(pieces, vec![(0, &b"ab"[..]), (2, b"c"), (3, b"de")]);
        let bytewise = Chunked::new(&[0x80, 0, b'x', b'y']);
        assert_eq!(bytewise.pieces().count(), 2);
        assert_eq!(Chunked::new(&[]).pieces().count(), 1);
    }

    #[test]
    fn crlf_checks() {
        assert!(only_crlf(b"a\r\nb\r\n"));
        assert!(!only_crlf(b"a\nb"));
        assert!(!only_crlf(b"a\rb"));
        assert!(!only_crlf(b"a\r"));
        assert!(has_cr_or_lf(b"x\ry"));
    }
}
