//! SMTP protocol parsing for the proxy: pure functions over bytes, no I/O.
//!
//! The proxy owns the sockets and the buffers; this module only turns bytes
//! into values and values into bytes, so every piece is tested directly:
//!
//! * [`line`](mod@line) — splits the client's command stream into lines, with a cap on
//!   line length and NUL detection ([`LineReader`]).
//! * [`command`] — checks a command line's bytes ([`check_command_line`]),
//!   recognises its verb ([`parse_command`]) and parses the `MAIL FROM` /
//!   `RCPT TO` envelope paths and parameters, with each address in canonical
//!   form and its hidden routing syntax ([`SecondRoute`]).
//! * [`helo`] — HELO/EHLO names in canonical form ([`canonical_helo`]), the
//!   only form rules, scanners and logs see.
//! * [`reply`] — replies as values ([`Reply`]), the proxy's own replies as
//!   named constructors, and [`ReplyParser`] for the backend's replies.
//! * [`ehlo`] — rewrites the backend's EHLO reply into the capabilities the
//!   proxy offers ([`filter_ehlo`]).
//! * [`sasl`] — the account a client's SASL exchange names
//!   ([`SaslAccount`]), for the per-account AUTH limit.
//! * [`data`] — scans a DATA body for its end marker and for the bare CR/LF
//!   that SMTP smuggling relies on ([`DataScanner`]).
//!
//! Every parser bounds its buffers and never panics, whatever the input; the
//! tests include a deterministic random-input run for each one.

pub mod command;
pub mod data;
pub mod ehlo;
pub mod helo;
pub mod line;
pub mod reply;
pub mod sasl;

pub use command::{
    canonical_address, check_command_line, check_sasl_response, parse_command, parse_command_line,
    parse_mail_from, parse_rcpt_to, Command, CommandLineError, MailFrom, PathError, RcptTo,
    SaslResponseError, SecondRoute, Verb,
};
pub use data::{DataProgress, DataScanner, Violation};
pub use ehlo::{filter_ehlo, parse_capabilities, EhloOptions};
pub use helo::{canonical_helo, HeloError, HeloName};
pub use line::{Ending, Line, LineError, LineReader};
pub use reply::{EnhancedCode, Reply, ReplyError, ReplyParser};
pub use sasl::SaslAccount;

/// A small deterministic pseudo-random generator (SplitMix64) for the
/// random-input tests, so that no test depends on an external crate or on
/// the clock, and a failure is reproducible from its seed.
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    /// A generator seeded with `seed`.
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`0` when `n` is `0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// `len` bytes, mostly drawn from `alphabet` (the bytes that matter to
    /// the parser under test) and sometimes fully random.
    pub(crate) fn bytes(&mut self, len: usize, alphabet: &[u8]) -> Vec<u8> {
        (0..len)
            .map(|_| {
                if alphabet.is_empty() || self.below(8) == 0 {
                    (self.next_u64() & 0xff) as u8
                } else {
                    alphabet[self.below(alphabet.len())]
                }
            })
            .collect()
    }

    /// Cuts `0..len` into consecutive random pieces, returned as end offsets.
    pub(crate) fn splits(&mut self, len: usize, max_piece: usize) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0;
        while at < len {
            at = (at + 1 + self.below(max_piece.max(1))).min(len);
            ends.push(at);
        }
        ends
    }
}
