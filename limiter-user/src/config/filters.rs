//! `[filters]`: content scanners (rspamd, ClamAV) asked before the backend
//! accepts a message.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{duration_serde, size_serde};
use super::{invalid, ConfigError};

/// `[filters]`: content scanners asked before the backend gets DATA's end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Filters {
    /// Longest wait for a scanner's verdict.
    #[serde(with = "duration_serde")]
    pub timeout: Duration,
    /// What to do when a scanner fails or times out.
    pub on_failure: OnFailure,
    /// Larger messages are not scanned (bytes; `"25MB"` accepted). Scanned
    /// messages are held in memory until the verdicts are in, so this also
    /// bounds the memory of each session.
    #[serde(with = "size_serde")]
    pub max_size: u64,
    /// Bytes all sessions together may hold for scanning; a message that
    /// would go over it is handled as `on_failure` says.
    #[serde(with = "size_serde")]
    pub max_held: u64,
    /// Messages rejected by the filters (virus, spam) from one source
    /// within `reject_window` that block it; 0 = never block.
    pub max_rejects: u32,
    /// The window `max_rejects` is counted over.
    #[serde(with = "duration_serde")]
    pub reject_window: Duration,
    /// rspamd, asked over HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rspamd: Option<Rspamd>,
    /// clamd, asked with INSTREAM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clamav: Option<Clamav>,
}

impl Default for Filters {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            on_failure: OnFailure::FailOpen,
            max_size: 25_000_000,
            max_held: 1 << 30,
            max_rejects: 3,
            reject_window: Duration::from_secs(60 * 60),
            rspamd: None,
            clamav: None,
        }
    }
}

/// `filters.on_failure = "fail-open" | "fail-closed"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Pass the message on unscanned.
    #[default]
    FailOpen,
    /// Answer 4xx so the client retries later.
    FailClosed,
}

/// `[filters.rspamd]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rspamd {
    /// Base URL of rspamd's normal worker, e.g. `http://127.0.0.1:11333`.
    pub url: String,
}

/// `[filters.clamav]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clamav {
    /// clamd's `host:port`, or the path of its Unix socket.
    pub address: String,
    /// clamd's own `StreamMaxLength`: no more than this is sent (clamd
    /// would drop the stream); a longer message is scanned up to it.
    #[serde(default = "default_stream_max_length", with = "size_serde")]
    pub stream_max_length: u64,
}

/// clamd's default `StreamMaxLength` (clamd.conf(5)).
fn default_stream_max_length() -> u64 {
    100 * 1024 * 1024
}

impl Filters {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let filters = self;
        if filters.timeout.is_zero() {
            return Err(invalid("filters.timeout", "must be greater than zero"));
        }
        if filters.max_size == 0 {
            return Err(invalid("filters.max_size", "must be greater than zero"));
        }
        if filters.max_held < filters.max_size {
            return Err(invalid(
                "filters.max_held",
                format!(
                    "{} is less than filters.max_size ({}): not even one message could be held",
                    filters.max_held, filters.max_size
                ),
            ));
        }
        if filters.reject_window.is_zero() {
            return Err(invalid(
                "filters.reject_window",
                "must be greater than zero",
            ));
        }
        if let Some(rspamd) = &filters.rspamd {
            crate::filters::rspamd::RspamdClient::new(&rspamd.url)
                .map_err(|reason| invalid("filters.rspamd.url", reason))?;
        }
        if let Some(clamav) = &filters.clamav {
            if clamav.address.trim().is_empty() {
                return Err(invalid("filters.clamav.address", "must not be empty"));
            }
            if clamav.stream_max_length == 0 {
                return Err(invalid(
                    "filters.clamav.stream_max_length",
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_invalid, assert_unknown_field, assert_unknown_variant};
    use crate::config::Config;

    #[test]
    fn every_on_failure_parses() {
        for (value, want) in [
            ("fail-open", OnFailure::FailOpen),
            ("fail-closed", OnFailure::FailClosed),
        ] {
            let text = format!("[filters]\non_failure = \"{value}\"");
            assert_eq!(Config::from_toml(&text).unwrap().filters.on_failure, want);
        }
        assert_unknown_variant(&[("[filters]\non_failure = \"open\"", "on_failure")]);
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[
            ("[filters]\nspamassassin = 1", "spamassassin"),
            (
                "[filters.rspamd]\nurl = \"http://x\"\npassword = \"p\"",
                "password",
            ),
            ("[filters.clamav]\naddress = \"/s\"\nport = 1", "port"),
        ]);
        assert_invalid(&[
            ("[filters]\ntimeout = \"0s\"", "filters.timeout"),
            ("[filters]\nmax_size = 0", "filters.max_size"),
            (
                "[filters.rspamd]\nurl = \"127.0.0.1:11333\"",
                "filters.rspamd.url",
            ),
            (
                "[filters.rspamd]\nurl = \"https://rspamd:11333\"",
                "filters.rspamd.url",
            ),
            ("[filters.clamav]\naddress = \"\"", "filters.clamav.address"),
            (
                "[filters.clamav]\naddress = \"/s\"\nstream_max_length = 0",
                "filters.clamav.stream_max_length",
            ),
            ("[filters]\nreject_window = \"0s\"", "filters.reject_window"),
            ("[filters]\nmax_held = \"1MB\"", "filters.max_held"),
        ]);
    }
}
