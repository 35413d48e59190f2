//! `[limits]`: what counts as abuse and how long it is blocked.

use std::collections::HashSet;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::{cidr_serde, duration_serde, format_duration, Rate, MAX_DURATION};
use super::{invalid, ConfigError};

/// The longest timed block (100 years): wall-clock arithmetic on longer
/// ones could overflow, and nothing needs them (a block without end is
/// `lists.reject`, or `block add` without `--for`).
pub const MAX_BLOCK_DURATION: Duration = MAX_DURATION;

/// `[limits]`: what counts as abuse and how long it is blocked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Simultaneous connections per source (kernel SYN cap, proxy 421);
    /// 0 = unlimited.
    pub max_connections_per_source: u32,
    /// IPv6 sources are counted and blocked per prefix of this length.
    pub ipv6_prefix: u8,
    /// Failed RCPTs in a session before the source is blocked (harvesting).
    pub max_failed_rcpt: u32,
    /// Failed RCPTs per source (IPv6 per `ipv6_prefix`) within
    /// `failed_rcpt_window`, across sessions, before the source is blocked:
    /// a harvester that reconnects or mixes in valid addresses. Successes do
    /// not reset it; 0 = off.
    pub max_failed_rcpt_per_source: u32,
    /// Window over which `max_failed_rcpt_per_source` counts.
    #[serde(with = "duration_serde")]
    pub failed_rcpt_window: Duration,
    /// Failed AUTH (535) per source within `failed_auth_window` before a block.
    pub max_failed_auth: u32,
    /// Window over which failed AUTH attempts are counted.
    #[serde(with = "duration_serde")]
    pub failed_auth_window: Duration,
    /// Most null-sender (`MAIL FROM:<>`) messages per source (NDR floods).
    pub null_sender_rate: Rate,
    /// Length of a first block.
    #[serde(with = "duration_serde")]
    pub block_duration: Duration,
    /// Factor applied to each repeat block of the same source.
    pub block_backoff: f64,
    /// Cap on repeat blocks' length.
    #[serde(with = "duration_serde")]
    pub max_block_duration: Duration,
    /// Per-network overrides of `max_connections_per_source`.
    pub source: Vec<SourceLimit>,
    /// Simultaneous-connection caps per HELO/EHLO name pattern.
    pub helo: Vec<HeloLimit>,
    /// Simultaneous connections per HELO/EHLO name matching no
    /// `limits.helo` rule; 0 = unlimited.
    pub helo_default: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections_per_source: 10,
            ipv6_prefix: 64,
            max_failed_rcpt: 5,
            max_failed_rcpt_per_source: 20,
            failed_rcpt_window: Duration::from_secs(3600),
            max_failed_auth: 5,
            failed_auth_window: Duration::from_secs(10 * 60),
            null_sender_rate: Rate {
                count: 20,
                per: Duration::from_secs(60),
            },
            block_duration: Duration::from_secs(30 * 60),
            block_backoff: 2.0,
            max_block_duration: Duration::from_secs(7 * 24 * 3600),
            source: Vec::new(),
            helo: Vec::new(),
            helo_default: 0,
        }
    }
}

/// One `[[limits.source]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceLimit {
    /// The network this cap applies to (the most specific entry wins).
    #[serde(with = "cidr_serde")]
    pub cidr: IpNet,
    /// Simultaneous connections per source in it; 0 = unlimited.
    pub max_connections: u32,
}

/// One `[[limits.helo]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeloLimit {
    /// HELO/EHLO name pattern (`?` one character, `*` any run, no case).
    pub pattern: String,
    /// Simultaneous connections announcing a matching name; 0 = unlimited.
    pub max_connections: u32,
}

impl Limits {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let limits = self;
        if !(1..=128).contains(&limits.ipv6_prefix) {
            return Err(invalid(
                "limits.ipv6_prefix",
                format!("must be between 1 and 128, not {}", limits.ipv6_prefix),
            ));
        }
        for (key, window) in [
            ("limits.failed_auth_window", limits.failed_auth_window),
            ("limits.failed_rcpt_window", limits.failed_rcpt_window),
        ] {
            if window.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if limits.null_sender_rate.count == 0 {
            return Err(invalid(
                "limits.null_sender_rate",
                "the count must be greater than zero",
            ));
        }
        if limits.null_sender_rate.per.is_zero() {
            return Err(invalid(
                "limits.null_sender_rate",
                "the period must be greater than zero",
            ));
        }
        if limits.block_duration.is_zero() {
            return Err(invalid(
                "limits.block_duration",
                "must be greater than zero",
            ));
        }
        if !limits.block_backoff.is_finite() || limits.block_backoff < 1.0 {
            return Err(invalid(
                "limits.block_backoff",
                format!(
                    "must be a number of at least 1.0, not {}",
                    limits.block_backoff
                ),
            ));
        }
        for (key, value) in [
            ("limits.block_duration", limits.block_duration),
            ("limits.max_block_duration", limits.max_block_duration),
        ] {
            if value > MAX_BLOCK_DURATION {
                return Err(invalid(
                    key,
                    format!(
                        "{} is longer than {}: a block that should never end belongs in lists.reject",
                        format_duration(value),
                        format_duration(MAX_BLOCK_DURATION)
                    ),
                ));
            }
        }
        if limits.max_block_duration < limits.block_duration {
            return Err(invalid(
                "limits.max_block_duration",
                format!(
                    "{} is shorter than limits.block_duration ({})",
                    format_duration(limits.max_block_duration),
                    format_duration(limits.block_duration)
                ),
            ));
        }
        let mut cidrs = HashSet::new();
        for (i, source) in limits.source.iter().enumerate() {
            if !cidrs.insert(source.cidr.trunc()) {
                return Err(invalid(
                    format!("limits.source[{i}].cidr"),
                    format!("{} is listed twice", source.cidr),
                ));
            }
        }
        for (i, helo) in limits.helo.iter().enumerate() {
            if helo.pattern.trim().is_empty() {
                return Err(invalid(
                    format!("limits.helo[{i}].pattern"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_accepted, assert_invalid, assert_unknown_field};

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[
            ("[limits]\nblok_duration = \"1m\"", "blok_duration"),
            (
                "[[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 1\nmax = 2",
                "max",
            ),
            (
                "[[limits.helo]]\npattern = \"x\"\nmax_connections = 1\nlimit = 2",
                "limit",
            ),
        ]);
        let source2 = "[[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 1\n\
                       [[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 2";
        assert_invalid(&[
            ("[limits]\nipv6_prefix = 0", "limits.ipv6_prefix"),
            ("[limits]\nipv6_prefix = 129", "limits.ipv6_prefix"),
            ("[limits]\nblock_backoff = 0.5", "limits.block_backoff"),
            ("[limits]\nblock_backoff = nan", "limits.block_backoff"),
            ("[limits]\nblock_backoff = inf", "limits.block_backoff"),
            (
                "[limits]\nblock_duration = \"2h\"\nmax_block_duration = \"1h\"",
                "limits.max_block_duration",
            ),
            ("[limits]\nblock_duration = \"0s\"", "limits.block_duration"),
            (
                "[limits]\nfailed_auth_window = \"0s\"",
                "limits.failed_auth_window",
            ),
            (
                "[limits]\nfailed_rcpt_window = \"0s\"",
                "limits.failed_rcpt_window",
            ),
            (
                "[limits]\nnull_sender_rate = \"0/1m\"",
                "limits.null_sender_rate",
            ),
            (
                "[limits]\nnull_sender_rate = \"5/0s\"",
                "limits.null_sender_rate",
            ),
            (source2, "limits.source[1].cidr"),
            (
                "[[limits.helo]]\npattern = \" \"\nmax_connections = 1",
                "limits.helo[0].pattern",
            ),
        ]);
        assert_accepted(&[
            "[limits]\nipv6_prefix = 128",
            "[limits]\nipv6_prefix = 1",
            "[limits]\nblock_backoff = 1.0",
            "[limits]\nblock_duration = \"1h\"\nmax_block_duration = \"1h\"",
            "[limits]\nmax_connections_per_source = 0",
            "[[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 1\n\
             [[limits.source]]\ncidr = \"192.0.2.0/25\"\nmax_connections = 2",
        ]);
    }
}
