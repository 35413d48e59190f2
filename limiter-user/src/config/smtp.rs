//! `[smtp]`: limits and timeouts of the SMTP dialogue.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{duration_serde, size_serde};
use super::{invalid, Config, ConfigError};
use crate::smtp::command::Verb;

/// `[smtp]`: limits and timeouts of the dialogue (RFC 5321 values by default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Smtp {
    /// Longest wait for a client's next command (RFC 5321: 5 minutes).
    #[serde(with = "duration_serde")]
    pub command_timeout: Duration,
    /// Longest wait for the next block of message data (RFC 5321: 3 minutes).
    #[serde(with = "duration_serde")]
    pub data_timeout: Duration,
    /// Longest wait for a backend reply (RFC 5321: 5 minutes; 10 after DATA).
    #[serde(with = "duration_serde")]
    pub backend_timeout: Duration,
    /// Longest a whole session may last.
    #[serde(with = "duration_serde")]
    pub session_timeout: Duration,
    /// Longest command line, CRLF included (RFC 5321: 512).
    pub max_line_length: usize,
    /// Longest line of message data, CRLF included (RFC 5321: 1000).
    pub max_data_line_length: usize,
    /// Largest message accepted (bytes; `"25MB"` accepted); advertised in SIZE.
    #[serde(with = "size_serde")]
    pub max_message_size: u64,
    /// Most recipients in one transaction (RFC 5321 asks for at least 100).
    pub max_recipients: u32,
    /// VRFY and EXPN: `"refuse"` (no directory probing through the proxy) or
    /// `"relay"` to the backend.
    pub vrfy: Vrfy,
    /// How long open sessions may finish after SIGTERM before being cut.
    #[serde(with = "duration_serde")]
    pub shutdown_grace: Duration,
    /// Longest wait for a client to take a reply (a client that stops
    /// reading must not hold its session forever).
    #[serde(with = "duration_serde")]
    pub write_timeout: Duration,
    /// Most sessions open at once, all sources together; past it a new
    /// client gets `421 4.3.2` and is disconnected.
    pub max_sessions: u32,
    /// AUTH is neither advertised nor accepted before STARTTLS (`538
    /// 5.7.11`). Unset: true when a `[tls]` certificate is configured (with
    /// no certificate the proxy cannot offer TLS, and AUTH is relayed as the
    /// backend offers it). `true` without a certificate turns AUTH off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_requires_tls: Option<bool>,
    /// Lines refused in a session without being relayed (bad syntax,
    /// unknown verbs, bad addresses) before the proxy answers `421 4.7.0`
    /// and closes it, like Postfix's `smtpd_hard_error_limit`.
    pub max_errors: u32,
    /// Extension verbs relayed raw to the backend. Every verb the proxy does
    /// not understand and that is not listed here gets `502 5.5.1` from the
    /// proxy itself, so that nothing reaches the backend unjudged.
    pub relay_verbs: Vec<String>,
    /// Commands a session may send before its first accepted MAIL FROM;
    /// one more gets `421 4.7.0` and the end of the session (zombies that
    /// only EHLO and NOOP).
    pub max_commands_before_mail: u32,
    /// The load (open sessions / `max_sessions`, 0 to 1) from which the
    /// proxy is under stress: sessions outside a transaction get
    /// `stress_command_timeout`. All backend slots in use is stress too.
    pub stress_threshold: f64,
    /// The command timeout, under stress, of a session outside a
    /// transaction (before its first MAIL FROM or between transactions;
    /// and of its TLS handshake); while sessions
    /// wait for a backend slot, how far a message holding one may fall
    /// behind 500 bytes/s (`421 4.4.2` past it, the slot to the next in
    /// turn); a spooled message's likewise.
    #[serde(with = "duration_serde")]
    pub stress_command_timeout: Duration,
}

impl Default for Smtp {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(3 * 60),
            backend_timeout: Duration::from_secs(5 * 60),
            session_timeout: Duration::from_secs(30 * 60),
            max_line_length: 512,
            max_data_line_length: 1000,
            max_message_size: 25_000_000,
            max_recipients: 100,
            vrfy: Vrfy::Refuse,
            shutdown_grace: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
            max_sessions: 2000,
            auth_requires_tls: None,
            max_errors: 20,
            relay_verbs: Vec::new(),
            max_commands_before_mail: 20,
            stress_threshold: 0.8,
            stress_command_timeout: Duration::from_secs(10),
        }
    }
}

/// `smtp.vrfy = "refuse" | "relay"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vrfy {
    /// Answer VRFY with 252 and EXPN with 502 without asking the backend.
    #[default]
    Refuse,
    /// Pass VRFY and EXPN to the backend.
    Relay,
}

impl Smtp {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let smtp = self;
        for (key, value) in [
            ("smtp.command_timeout", smtp.command_timeout),
            ("smtp.data_timeout", smtp.data_timeout),
            ("smtp.backend_timeout", smtp.backend_timeout),
            ("smtp.session_timeout", smtp.session_timeout),
            ("smtp.write_timeout", smtp.write_timeout),
            ("smtp.stress_command_timeout", smtp.stress_command_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        if smtp.max_line_length < 512 {
            return Err(invalid(
                "smtp.max_line_length",
                format!("{} is below RFC 5321's 512", smtp.max_line_length),
            ));
        }
        if smtp.max_data_line_length < 1000 {
            return Err(invalid(
                "smtp.max_data_line_length",
                format!("{} is below RFC 5321's 1000", smtp.max_data_line_length),
            ));
        }
        if smtp.max_message_size == 0 {
            return Err(invalid(
                "smtp.max_message_size",
                "must be greater than zero",
            ));
        }
        if smtp.max_recipients == 0 {
            return Err(invalid(
                "smtp.max_recipients",
                "must be at least 1 (RFC 5321 asks for 100)",
            ));
        }
        if smtp.max_sessions == 0 {
            return Err(invalid(
                "smtp.max_sessions",
                "must be at least 1 (it caps the sessions open at once)",
            ));
        }
        if smtp.max_commands_before_mail == 0 {
            return Err(invalid(
                "smtp.max_commands_before_mail",
                "must be at least 1 (EHLO is a command)",
            ));
        }
        if !(smtp.stress_threshold > 0.0 && smtp.stress_threshold <= 1.0) {
            return Err(invalid(
                "smtp.stress_threshold",
                format!(
                    "must be above 0 and at most 1 (a share of smtp.max_sessions), not {}",
                    smtp.stress_threshold
                ),
            ));
        }
        let mut verbs = HashSet::new();
        for (i, verb) in smtp.relay_verbs.iter().enumerate() {
            let key = format!("smtp.relay_verbs[{i}]");
            let word = verb.as_bytes();
            // Letters first, then letters, digits and '-' (X-LINK2STATE).
            let word_ok = word.first().is_some_and(u8::is_ascii_alphabetic)
                && word.len() <= 32
                && word.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-');
            if !word_ok {
                return Err(invalid(
                    key,
                    format!(
                        "{verb:?} is not an SMTP verb (a letter, then up to 31 letters, digits or '-')"
                    ),
                ));
            }
            if Verb::from_word(word) != Verb::Unknown {
                return Err(invalid(
                    key,
                    format!(
                        "{verb:?} is a verb the proxy handles itself; list only extension verbs"
                    ),
                ));
            }
            if !verbs.insert(verb.to_ascii_uppercase()) {
                return Err(invalid(key, format!("{verb:?} is listed twice")));
            }
        }
        Ok(())
    }
}

impl Config {
    /// Whether AUTH must wait for TLS: `smtp.auth_requires_tls`, by default
    /// true when the proxy has a certificate.
    #[must_use]
    pub fn auth_requires_tls(&self) -> bool {
        self.smtp.auth_requires_tls.unwrap_or(self.tls.is_some())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_invalid;

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        assert_invalid(&[
            ("[smtp]\nwrite_timeout = \"0s\"", "smtp.write_timeout"),
            ("[smtp]\nmax_sessions = 0", "smtp.max_sessions"),
            (
                "[smtp]\nmax_commands_before_mail = 0",
                "smtp.max_commands_before_mail",
            ),
            ("[smtp]\nstress_threshold = 0.0", "smtp.stress_threshold"),
            ("[smtp]\nstress_threshold = 1.5", "smtp.stress_threshold"),
            ("[smtp]\nstress_threshold = nan", "smtp.stress_threshold"),
            (
                "[smtp]\nstress_command_timeout = \"0s\"",
                "smtp.stress_command_timeout",
            ),
            ("[smtp]\nrelay_verbs = [\"\"]", "smtp.relay_verbs[0]"),
            ("[smtp]\nrelay_verbs = [\"X EXPS\"]", "smtp.relay_verbs[0]"),
            ("[smtp]\nrelay_verbs = [\"-X\"]", "smtp.relay_verbs[0]"),
            (
                "[smtp]\nrelay_verbs = [\"ETRN\", \"RCPT\"]",
                "smtp.relay_verbs[1]",
            ),
            ("[smtp]\nrelay_verbs = [\"xclient\"]", "smtp.relay_verbs[0]"),
            (
                "[smtp]\nrelay_verbs = [\"ETRN\", \"etrn\"]",
                "smtp.relay_verbs[1]",
            ),
            (
                "[smtp]\nrelay_verbs = [\"ETRN\\r\\nRCPT\"]",
                "smtp.relay_verbs[0]",
            ),
        ]);
    }
}
