//! `[limits]`: what counts as abuse and how long it is blocked.

use std::collections::HashSet;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::{
    cidr_serde, duration_serde, format_duration, parse_duration, Rate, MAX_DURATION,
};
use super::{check_prefix_len, invalid, ConfigError};

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
    /// New connections per source (IPv6: per `ipv6_prefix`), however short:
    /// past `count` within `per` a connection gets `421 4.7.0` at once;
    /// past twice as many (the refused ones count) the source is blocked
    /// (origin `flood`). A client that connects, reads the greeting and
    /// hangs up in a loop, each time within `max_connections_per_source`,
    /// then costs a kernel drop instead of a session. `"0/1m"` = off.
    pub connection_rate: Rate,
    /// Most new connections from all the sources of one network
    /// (`network_ipv4_prefix`, `network_ipv6_prefix`), counted like
    /// `connection_rate`: a connect-and-hang-up loop spread over the
    /// addresses of a /24 or the /64s of a /48, each under its own rate.
    /// Past the count `421 4.7.0` at accept; past twice the count (refused
    /// ones count) the network is blocked (origin `flood`). A count of 0 =
    /// off.
    pub connection_rate_per_network: Rate,
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
    /// Failed RCPTs from all the sources of one network
    /// (`network_ipv4_prefix`, `network_ipv6_prefix`) within
    /// `failed_rcpt_window` before the network is blocked: a harvester
    /// that spreads over the addresses of its /24 or the /64s of its /48,
    /// each under its own limit. 0 = off.
    pub max_failed_rcpt_per_network: u32,
    /// Failed RCPTs from all sources together within `failed_rcpt_window`
    /// past which the host is under a harvest from many networks (each
    /// address and network under its own limits). While it is, a source
    /// that neither logged in in its session nor had mail delivered within
    /// the hour since before the harvest began is blocked past
    /// `max_failed_rcpt_under_harvest` failures in the window instead of
    /// `max_failed_rcpt_per_source`. Counted on
    /// each edge host. 0 = off.
    pub max_failed_rcpt_per_host: u32,
    /// Failed RCPTs per source within `failed_rcpt_window` before a block
    /// while the host is past `max_failed_rcpt_per_host`, for sources that
    /// had not delivered mail within the hour before it (a limit above
    /// `max_failed_rcpt_per_source` changes nothing).
    pub max_failed_rcpt_under_harvest: u32,
    /// Refused credentials (535, or 435 / X.7.8) per source within
    /// `failed_auth_window` before a block.
    pub max_failed_auth: u32,
    /// Window over which failed AUTH attempts are counted.
    #[serde(with = "duration_serde")]
    pub failed_auth_window: Duration,
    /// Refused credentials from all the sources of one network within
    /// `failed_auth_window` before the network is blocked: a password
    /// guesser spread over its network. 0 = off.
    pub max_failed_auth_per_network: u32,
    /// Refused credentials for one account (the name a SASL exchange
    /// logs in as) from all sources within `failed_auth_window`; past it,
    /// AUTH for that account from a source that has not logged in as it
    /// lately gets `454 4.7.0` and never reaches the backend: a password
    /// spray over many networks, each source under every other limit.
    /// 0 = off.
    pub max_failed_auth_per_account: u32,
    /// Refused credentials from all sources together within
    /// `failed_auth_window` past which the host is under a password spray
    /// (many accounts from many networks, each source, network and account
    /// under its own limits). While it is, a source that has not logged in
    /// as the account it tries within 30 days is blocked past
    /// `max_failed_auth_under_spray` failures in the window instead of
    /// `max_failed_auth`. Counted on each edge host. 0 = off.
    pub max_failed_auth_per_host: u32,
    /// Refused credentials per source within `failed_auth_window` before a
    /// block while the host is past `max_failed_auth_per_host`, for sources
    /// that have not logged in as the account lately (a limit above
    /// `max_failed_auth` changes nothing).
    pub max_failed_auth_under_spray: u32,
    /// The network an IPv4 source counts in for the `*_per_network` limits.
    pub network_ipv4_prefix: u8,
    /// The network an IPv6 source counts in for the `*_per_network` limits
    /// (a longer one than `ipv6_prefix` counts as `ipv6_prefix`: a source
    /// is never split).
    pub network_ipv6_prefix: u8,
    /// Most null-sender (`MAIL FROM:<>`) messages per source (NDR floods).
    pub null_sender_rate: Rate,
    /// Most null-sender messages from all the sources of one network
    /// (`network_ipv4_prefix`, `network_ipv6_prefix`): a bounce flood spread
    /// over a /24, each address under `null_sender_rate`. Over it `450
    /// 4.7.1`, never a block (a network's legitimate servers send bounces
    /// too; they retry). A count of 0 = off.
    pub null_sender_rate_per_network: Rate,
    /// Most null-sender messages to one recipient (its address in lower
    /// case, without a `+extension`) from all sources: a bounce flood
    /// (backscatter) aimed at one mailbox from many networks, each source
    /// and network under its own rate. A bucket that holds the count and
    /// empties at the rate; a RCPT past it gets `450 4.7.1` (the sender's
    /// server retries later) and is not counted, never a block (backscatter
    /// comes from innocent servers). A count of 0 = off.
    pub null_sender_rate_per_recipient: Rate,
    /// Sessions of one source (IPv6: per `ipv6_prefix`) closed under
    /// pressure (shed at the session cap, cut at the short stress timeout
    /// or past `smtp.max_commands_before_mail`, a transaction idle on a
    /// backend slot others wait for) within
    /// `shed_sessions_window` before the source is blocked: a zombie that
    /// comes back to idle each time it is cut. 0 = off.
    pub max_shed_sessions_per_source: u32,
    /// Window over which `max_shed_sessions_per_source` counts.
    #[serde(with = "duration_serde")]
    pub shed_sessions_window: Duration,
    /// Sources of one network (`network_ipv4_prefix`,
    /// `network_ipv6_prefix`) blocked by the policy within
    /// `blocked_sources_window` before the whole network is blocked (origin
    /// `network`): whatever got each one blocked (shed zombies, bounce
    /// floods, relay attempts…), an attacker that moves on to the next
    /// address of its /24 or the next /64 of its /48 each time it is
    /// blocked. 0 = off.
    pub max_blocked_sources_per_network: u32,
    /// Window over which `max_blocked_sources_per_network` counts.
    #[serde(with = "duration_serde")]
    pub blocked_sources_window: Duration,
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
            connection_rate: Rate {
                count: 600,
                per: Duration::from_secs(60),
            },
            connection_rate_per_network: Rate {
                count: 3000,
                per: Duration::from_secs(60),
            },
            max_failed_rcpt: 5,
            max_failed_rcpt_per_source: 20,
            failed_rcpt_window: Duration::from_secs(3600),
            max_failed_rcpt_per_network: 100,
            max_failed_rcpt_per_host: 300,
            max_failed_rcpt_under_harvest: 2,
            max_failed_auth: 5,
            failed_auth_window: Duration::from_secs(10 * 60),
            max_failed_auth_per_network: 50,
            max_failed_auth_per_account: 10,
            max_failed_auth_per_host: 100,
            max_failed_auth_under_spray: 2,
            network_ipv4_prefix: 24,
            network_ipv6_prefix: 48,
            null_sender_rate: Rate {
                count: 20,
                per: Duration::from_secs(60),
            },
            null_sender_rate_per_network: Rate {
                count: 200,
                per: Duration::from_secs(60),
            },
            null_sender_rate_per_recipient: Rate {
                count: 100,
                per: Duration::from_secs(3600),
            },
            max_shed_sessions_per_source: 3,
            shed_sessions_window: Duration::from_secs(10 * 60),
            max_blocked_sources_per_network: 16,
            blocked_sources_window: Duration::from_secs(3600),
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
        check_prefix_len("limits.ipv6_prefix", limits.ipv6_prefix, 128)?;
        check_prefix_len("limits.network_ipv4_prefix", limits.network_ipv4_prefix, 32)?;
        check_prefix_len(
            "limits.network_ipv6_prefix",
            limits.network_ipv6_prefix,
            128,
        )?;
        for (key, window) in [
            ("limits.failed_auth_window", limits.failed_auth_window),
            ("limits.failed_rcpt_window", limits.failed_rcpt_window),
            ("limits.shed_sessions_window", limits.shed_sessions_window),
            (
                "limits.blocked_sources_window",
                limits.blocked_sources_window,
            ),
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
        for (key, rate) in [
            ("limits.connection_rate", limits.connection_rate),
            (
                "limits.connection_rate_per_network",
                limits.connection_rate_per_network,
            ),
            (
                "limits.null_sender_rate_per_network",
                limits.null_sender_rate_per_network,
            ),
            (
                "limits.null_sender_rate_per_recipient",
                limits.null_sender_rate_per_recipient,
            ),
        ] {
            if rate.count > 0 && rate.per.is_zero() {
                return Err(invalid(
                    key,
                    "the period must be greater than zero (a count of 0 turns the limit off)",
                ));
            }
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

// ---------------------------------------------------------------------------
// Limits changed live
// ---------------------------------------------------------------------------

/// A `[limits]` key that `smtp-limiter limits set` changes in the running
/// agent (kernel and proxy at once; the file is not written).
pub struct LiveLimit {
    /// The key in `[limits]`, also the name `limits set` takes.
    pub name: &'static str,
    /// How the value is written, for help.
    pub kind: &'static str,
    /// What the limit does, one line, for help and the README.
    pub description: &'static str,
    get: fn(&Limits) -> serde_json::Value,
    set: fn(&mut Limits, &str) -> Result<(), String>,
}

/// A field type a live limit can have: how it is read from `limits set`'s
/// text and shown by `limits show` (as in the configuration file).
trait LiveField: Sized {
    const KIND: &'static str;
    fn parse_live(text: &str) -> Result<Self, String>;
    fn show(&self) -> serde_json::Value;
}

impl LiveField for u32 {
    const KIND: &'static str = "integer";
    fn parse_live(text: &str) -> Result<Self, String> {
        text.parse().map_err(|e| format!("{e}"))
    }
    fn show(&self) -> serde_json::Value {
        (*self).into()
    }
}

impl LiveField for u8 {
    const KIND: &'static str = "integer";
    fn parse_live(text: &str) -> Result<Self, String> {
        text.parse().map_err(|e| format!("{e}"))
    }
    fn show(&self) -> serde_json::Value {
        (*self).into()
    }
}

impl LiveField for f64 {
    const KIND: &'static str = "number like 1.5";
    fn parse_live(text: &str) -> Result<Self, String> {
        text.parse().map_err(|e| format!("{e}"))
    }
    fn show(&self) -> serde_json::Value {
        (*self).into()
    }
}

impl LiveField for Duration {
    const KIND: &'static str = "duration like 30m";
    fn parse_live(text: &str) -> Result<Self, String> {
        parse_duration(text)
    }
    fn show(&self) -> serde_json::Value {
        format_duration(*self).into()
    }
}

impl LiveField for Rate {
    const KIND: &'static str = "rate like 20/1m";
    fn parse_live(text: &str) -> Result<Self, String> {
        text.parse()
    }
    fn show(&self) -> serde_json::Value {
        self.to_string().into()
    }
}

const fn kind_of<T: LiveField>(_field: fn(&Limits) -> &T) -> &'static str {
    T::KIND
}

fn set_field<T: LiveField>(field: &mut T, text: &str) -> Result<(), String> {
    *field = T::parse_live(text)?;
    Ok(())
}

/// One [`LIVE_LIMITS`] row from the field's name: its type gives the kind,
/// the parser and the display.
macro_rules! live_limit {
    ($field:ident, $description:literal) => {
        LiveLimit {
            name: stringify!($field),
            kind: kind_of(|limits: &Limits| &limits.$field),
            description: $description,
            get: |limits| LiveField::show(&limits.$field),
            set: |limits, text| set_field(&mut limits.$field, text),
        }
    };
}

/// The limits `limits set` changes, in `limits show` order: the one list
/// the agent's `limits set` and `limits show`, the CLI's help (and so its
/// man page and completions) and the README's table are made from.
pub const LIVE_LIMITS: &[LiveLimit] = &[
    live_limit!(
        max_connections_per_source,
        "concurrent connections per source: SYN drop in the kernel, 421 in the proxy (0 = unlimited)"
    ),
    live_limit!(
        ipv6_prefix,
        "IPv6 sources are counted and blocked per prefix of this length (1 to 128)"
    ),
    live_limit!(
        connection_rate,
        "new connections per source, however short; over it 421 4.7.0, twice over it a block (0/1m = off)"
    ),
    live_limit!(
        connection_rate_per_network,
        "new connections from all sources of one network; over it 421 4.7.0, twice over it the network's block (0/1m = off)"
    ),
    live_limit!(
        max_failed_rcpt,
        "failed recipients in a row in one session before 421 4.7.0 and a block (harvesting)"
    ),
    live_limit!(
        max_failed_rcpt_per_source,
        "failed recipients per source within failed_rcpt_window, across sessions, before a block (0 = off)"
    ),
    live_limit!(
        failed_rcpt_window,
        "the window max_failed_rcpt_per_source, max_failed_rcpt_per_network and max_failed_rcpt_per_host count over"
    ),
    live_limit!(
        max_failed_rcpt_per_network,
        "failed recipients from all sources of one network within failed_rcpt_window before the network is blocked (0 = off)"
    ),
    live_limit!(
        max_failed_rcpt_per_host,
        "failed recipients from all sources together within failed_rcpt_window past which the host is under a harvest from many networks; sources that had not delivered within the hour before it are then blocked past max_failed_rcpt_under_harvest (0 = off)"
    ),
    live_limit!(
        max_failed_rcpt_under_harvest,
        "failed recipients per source within failed_rcpt_window before a block while the host is past max_failed_rcpt_per_host, for sources that had not delivered within the hour before it"
    ),
    live_limit!(
        max_failed_auth,
        "AUTH answers refusing the credentials (535, or 435 / X.7.8) per source within failed_auth_window before a block"
    ),
    live_limit!(
        failed_auth_window,
        "the window max_failed_auth, max_failed_auth_per_network, max_failed_auth_per_account and max_failed_auth_per_host count over"
    ),
    live_limit!(
        max_failed_auth_per_network,
        "refused credentials from all sources of one network within failed_auth_window before the network is blocked (0 = off)"
    ),
    live_limit!(
        max_failed_auth_per_account,
        "refused credentials for one account from all sources within failed_auth_window; past it AUTH for that account from sources that have not logged in as it lately gets 454 4.7.0 without reaching the backend (0 = off)"
    ),
    live_limit!(
        max_failed_auth_per_host,
        "refused credentials from all sources together within failed_auth_window past which the host is under a password spray; sources that have not logged in as the account lately are then blocked past max_failed_auth_under_spray (0 = off)"
    ),
    live_limit!(
        max_failed_auth_under_spray,
        "refused credentials per source within failed_auth_window before a block while the host is past max_failed_auth_per_host, for sources that have not logged in as the account lately"
    ),
    live_limit!(
        network_ipv4_prefix,
        "the network an IPv4 source counts in for the per-network limits (1 to 32)"
    ),
    live_limit!(
        network_ipv6_prefix,
        "the network an IPv6 source counts in for the per-network limits (1 to 128; at most ipv6_prefix takes effect)"
    ),
    live_limit!(
        null_sender_rate,
        "MAIL FROM:<> per source and per HELO name; over it 450 4.7.1, twice over it a block"
    ),
    live_limit!(
        null_sender_rate_per_network,
        "MAIL FROM:<> from all sources of one network; over it 450 4.7.1, never a block (0/1m = off)"
    ),
    live_limit!(
        null_sender_rate_per_recipient,
        "null-sender messages to one recipient (lower case, +extension cut) from all sources; a RCPT over it gets 450 4.7.1, never a block (0/1m = off)"
    ),
    live_limit!(
        max_shed_sessions_per_source,
        "sessions of one source closed under pressure (shed at the session cap, stress timeout, too many commands before MAIL, a transaction idle on a backend slot others wait for, turned away after 1 s of waiting for a slot while its network was shed lately) within shed_sessions_window before a block (0 = off)"
    ),
    live_limit!(
        shed_sessions_window,
        "the window max_shed_sessions_per_source counts over"
    ),
    live_limit!(
        max_blocked_sources_per_network,
        "sources of one network blocked (for any reason the policy blocks for) within blocked_sources_window before the whole network is blocked, origin network (0 = off)"
    ),
    live_limit!(
        blocked_sources_window,
        "the window max_blocked_sources_per_network counts over"
    ),
    live_limit!(block_duration, "length of a first block"),
    live_limit!(
        block_backoff,
        "each repeat block of a source lasts this many times longer (at least 1.0)"
    ),
    live_limit!(
        max_block_duration,
        "longest a repeat block lasts (at least block_duration)"
    ),
];

impl LiveLimit {
    /// The row named `name`.
    #[must_use]
    pub fn find(name: &str) -> Option<&'static LiveLimit> {
        LIVE_LIMITS.iter().find(|limit| limit.name == name)
    }

    /// The value in force, as `limits show` gives it (numbers as numbers,
    /// durations and rates as the configuration file writes them).
    #[must_use]
    pub fn get(&self, limits: &Limits) -> serde_json::Value {
        (self.get)(limits)
    }

    /// One line of help: the description and how the value is written.
    #[must_use]
    pub fn help(&self) -> String {
        format!("{}. Value: {}", self.description, self.kind)
    }
}

impl Limits {
    /// `limits set NAME VALUE`: parses `value` for the live limit `name`
    /// and checks the section with it; the limits change only if both pass.
    ///
    /// # Errors
    /// An unknown name (with the known ones), a value that does not parse,
    /// or one [`Limits::validate`] refuses, each naming the key.
    pub fn set_live(&mut self, name: &str, value: &str) -> Result<(), String> {
        let limit = LiveLimit::find(name).ok_or_else(|| {
            let names: Vec<_> = LIVE_LIMITS.iter().map(|l| l.name).collect();
            format!("unknown limit {name:?}: use one of {}", names.join(", "))
        })?;
        let mut candidate = self.clone();
        (limit.set)(&mut candidate, value).map_err(|e| format!("{name} = {value:?}: {e}"))?;
        candidate.validate().map_err(|e| e.to_string())?;
        *self = candidate;
        Ok(())
    }

    /// The live limits in force, by name, as `limits show` gives them.
    #[must_use]
    pub fn live_values(&self) -> serde_json::Map<String, serde_json::Value> {
        LIVE_LIMITS
            .iter()
            .map(|limit| (limit.name.to_owned(), limit.get(self)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_accepted, assert_invalid, assert_unknown_field};
    use crate::config::Config;

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
            (
                "[limits]\nnetwork_ipv4_prefix = 0",
                "limits.network_ipv4_prefix",
            ),
            (
                "[limits]\nnetwork_ipv4_prefix = 33",
                "limits.network_ipv4_prefix",
            ),
            (
                "[limits]\nnetwork_ipv6_prefix = 0",
                "limits.network_ipv6_prefix",
            ),
            (
                "[limits]\nnetwork_ipv6_prefix = 129",
                "limits.network_ipv6_prefix",
            ),
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

    /// A valid value other than the default, as `limits set` takes it and as
    /// TOML writes it.
    fn other_value(shown: &serde_json::Value) -> (String, String) {
        match shown {
            serde_json::Value::Number(n) if n.is_u64() => {
                let text = (n.as_u64().unwrap() + 1).to_string();
                (text.clone(), text)
            }
            serde_json::Value::Number(n) => {
                let text = format!("{:.1}", n.as_f64().unwrap() + 1.0);
                (text.clone(), text)
            }
            serde_json::Value::String(s) if s.contains('/') => {
                ("7/10s".to_owned(), "\"7/10s\"".to_owned())
            }
            serde_json::Value::String(_) => ("45m".to_owned(), "\"45m\"".to_owned()),
            other => panic!("no sample for {other}"),
        }
    }

    /// The text `limits set` takes for a shown value.
    fn text(shown: &serde_json::Value) -> String {
        match shown {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }

    #[test]
    fn every_live_limit_round_trips_and_is_the_toml_key() {
        let defaults = Limits::default();
        let mut names = HashSet::new();
        for limit in LIVE_LIMITS {
            assert!(names.insert(limit.name), "{} listed twice", limit.name);
            // What `limits show` gives, set again, changes nothing.
            let shown = limit.get(&defaults);
            let mut same = defaults.clone();
            same.set_live(limit.name, &text(&shown))
                .unwrap_or_else(|e| panic!("{}: {e}", limit.name));
            assert_eq!(same, defaults, "{} = {shown}", limit.name);
            // Another value lands in the field the TOML key of that name
            // sets, and is shown back as written.
            let (value, literal) = other_value(&shown);
            let mut live = defaults.clone();
            live.set_live(limit.name, &value)
                .unwrap_or_else(|e| panic!("{} = {value}: {e}", limit.name));
            let from_file = Config::from_toml(&format!("[limits]\n{} = {literal}", limit.name))
                .unwrap_or_else(|e| panic!("{} = {literal}: {e}", limit.name))
                .limits;
            assert_ne!(live, defaults, "{} = {value} changed nothing", limit.name);
            assert_eq!(live, from_file, "{} = {value}", limit.name);
            assert_eq!(text(&limit.get(&live)), value, "{}", limit.name);
            assert_eq!(live.live_values()[limit.name], limit.get(&live));
        }
        assert_eq!(defaults.live_values().len(), LIVE_LIMITS.len());
    }

    #[test]
    fn refused_live_changes_name_the_key_and_change_nothing() {
        let defaults = Limits::default();
        for (name, value, wants) in [
            ("max_failed_rcpt", "many", "max_failed_rcpt = \"many\""),
            ("max_failed_rcpt", "-1", "max_failed_rcpt = \"-1\""),
            ("ipv6_prefix", "300", "ipv6_prefix = \"300\""),
            ("ipv6_prefix", "0", "limits.ipv6_prefix: "),
            ("block_backoff", "0.5", "limits.block_backoff: "),
            ("block_backoff", "nan", "limits.block_backoff: "),
            ("block_duration", "soon", "block_duration = \"soon\""),
            ("block_duration", "30d", "limits.max_block_duration: "),
            ("failed_auth_window", "0s", "limits.failed_auth_window: "),
            ("null_sender_rate", "20", "null_sender_rate = \"20\""),
            ("null_sender_rate", "0/1m", "limits.null_sender_rate: "),
            (
                "null_sender_rate_per_network",
                "5/0s",
                "limits.null_sender_rate_per_network: ",
            ),
            ("max_connection", "1", "unknown limit \"max_connection\": use one of max_connections_per_source, ipv6_prefix, "),
            ("source", "1", "unknown limit \"source\""),
        ] {
            let mut limits = defaults.clone();
            let error = limits.set_live(name, value).expect_err(value);
            assert!(error.starts_with(wants), "{name} {value}: {error}");
            assert_eq!(limits, defaults, "{name} {value}");
        }
    }

    /// The README's table of live limits, as [`LIVE_LIMITS`] makes it.
    fn readme_table() -> Vec<String> {
        let mut rows = vec![
            "| limit | value | what it changes |".to_owned(),
            "|---|---|---|".to_owned(),
        ];
        rows.extend(
            LIVE_LIMITS
                .iter()
                .map(|l| format!("| `{}` | {} | {} |", l.name, l.kind, l.description)),
        );
        rows
    }

    #[test]
    fn the_readme_lists_exactly_the_live_limits() {
        let readme = include_str!("../../../README.md");
        let want = readme_table();
        let lines: Vec<&str> = readme.lines().collect();
        let start = lines
            .iter()
            .position(|line| *line == want[0])
            .unwrap_or_else(|| {
                panic!(
                    "README.md has no table headed {:?}; put this in it:\n{}",
                    want[0],
                    want.join("\n")
                )
            });
        let got: Vec<&str> = lines[start..]
            .iter()
            .take_while(|line| line.starts_with('|'))
            .copied()
            .collect();
        let names: Vec<&str> = got
            .iter()
            .skip(2)
            .filter_map(|row| row.split('`').nth(1))
            .collect();
        let want_names: Vec<&str> = LIVE_LIMITS.iter().map(|l| l.name).collect();
        assert_eq!(names, want_names, "README.md's live limits");
        assert_eq!(
            got,
            want,
            "README.md's table of live limits is not the one LIVE_LIMITS makes:\n{}",
            want.join("\n")
        );
    }
}
