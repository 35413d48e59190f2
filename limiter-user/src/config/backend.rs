//! `[backend]`: the MTA behind the proxy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{duration_serde, size_serde};
use super::{check_prefix_len, invalid, ConfigError};

/// `[backend]`: the MTA behind the proxy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backend {
    /// Where the backend MTA listens.
    pub address: SocketAddr,
    /// How the proxy tells the backend who the real client is.
    pub identity: Identity,
    /// How long to wait for the backend's TCP connect.
    #[serde(with = "duration_serde")]
    pub connect_timeout: Duration,
    /// Speak TLS to the backend (STARTTLS right after its greeting).
    pub starttls: bool,
    /// CA certificate(s), PEM, to verify the backend's certificate with;
    /// without it any certificate is accepted (encryption only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// Start the built-in test backend on `address` (accepts
    /// `builtin_recipients`, discards every message): for trying the proxy
    /// out, never for production.
    pub builtin: bool,
    /// Recipients the built-in backend accepts.
    pub builtin_recipients: Vec<String>,
    /// When a session gets its backend connection: `"on-mail"` (earned by
    /// the first MAIL FROM the policy accepts, or by AUTH, VRFY in relay
    /// mode and `smtp.relay_verbs`; the proxy answers the greeting, EHLO,
    /// NOOP, RSET, HELP and QUIT itself), `"on-rcpt"` (as `"on-mail"`, but
    /// the proxy also answers that first MAIL itself and connects at the
    /// first RCPT it does not refuse, sending MAIL and RCPT together) or
    /// `"on-connect"` (at accept).
    pub connect: BackendConnect,
    /// With `"on-mail"`, whether a source that delivered a message recently
    /// gets its backend connection opened at accept anyway, ahead of its
    /// MAIL, while backend slots are plentiful (`"recent-senders"`, the
    /// default; see [`crate::proxy::early`]) or never (`"off"`).
    pub early_connect: EarlyConnect,
    /// Backend connections open at once, all sessions together (size it to
    /// about 80 % of the MTA's process limit: Postfix's
    /// `default_process_limit` is 100). A session that needs one while all
    /// are in use waits its turn, fairly between sources.
    pub max_connections: u32,
    /// Longest wait for a backend slot; then the client gets `421 4.3.2`.
    #[serde(with = "duration_serde")]
    pub slot_wait: Duration,
    /// Memory (bytes; `"256MB"` accepted) for copies of the messages on
    /// their way to the backend, all sessions together. A client slower
    /// than `smtp.stress_command_timeout` in its transaction (1 s while
    /// half the backend slots or more are in use) gives its slot back
    /// mid-message, the proxy takes in the rest alone and replays the
    /// transaction on a new backend connection at its end
    /// ([`crate::proxy::spool`]). 0: off (such a client gets `421 4.4.2`
    /// unless its message keeps 500 bytes/s).
    #[serde(with = "size_serde")]
    pub spool_size: u64,
    /// The IPv4 prefix that groups sources for the fair share of backend
    /// slots (/24: one network's hosts share).
    pub fair_share_prefix_v4: u8,
    /// The IPv6 prefix that groups sources for the fair share of backend
    /// slots. Unset: `limits.ipv6_prefix`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fair_share_prefix_v6: Option<u8>,
    /// How often the proxy asks the backend for its EHLO capabilities (a
    /// short probe session), which its own EHLO reply is made from.
    #[serde(with = "duration_serde")]
    pub probe_interval: Duration,
}

/// `backend.connect = "on-mail" | "on-rcpt" | "on-connect"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendConnect {
    /// The backend connection is earned: opened at the first accepted MAIL
    /// FROM (or AUTH, relayed VRFY, relayed extension verbs); a bounce's
    /// MAIL (null sender) is held as with `OnRcpt`: under a bounce flood
    /// most are refused at their RCPT (the recipient's bounce rate), and
    /// each would cost the backend a session that queues nothing.
    #[default]
    OnMail,
    /// Earned later: the first MAIL the policy accepts is answered by the
    /// proxy (`250 2.1.0 Ok`) and held; the connection opens at the first
    /// RCPT the proxy does not refuse itself, and the held MAIL goes with
    /// it. A transaction whose every RCPT the proxy refuses (a bounce past
    /// its recipient's rate, a relay attempt, an address the directory
    /// does not know) never costs the backend a session.
    OnRcpt,
    /// The backend connection opens when the client connects.
    OnConnect,
}

impl BackendConnect {
    /// Whether a MAIL the policy accepted, with no backend connection yet,
    /// is answered by the proxy and held for the first RCPT relayed
    /// (`bounce`: a null sender, as the null-sender rates count it).
    #[must_use]
    pub fn holds_mail(self, bounce: bool) -> bool {
        match self {
            Self::OnRcpt => true,
            Self::OnMail => bounce,
            Self::OnConnect => false,
        }
    }

    /// Whether the session earns its backend connection (the proxy
    /// greets and answers EHLO from what the probe learned).
    #[must_use]
    pub fn earned(self) -> bool {
        matches!(self, Self::OnMail | Self::OnRcpt)
    }
}

/// `backend.early_connect = "recent-senders" | "off"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EarlyConnect {
    /// Sources that delivered a message within the last hour.
    #[default]
    RecentSenders,
    /// Never: every backend connection is earned by the session itself.
    Off,
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 2525),
            identity: Identity::ProxyV2,
            connect_timeout: Duration::from_secs(10),
            starttls: false,
            tls_ca: None,
            builtin: false,
            builtin_recipients: vec![
                "alice@example.com".into(),
                "bob@example.com".into(),
                "carol@example.com".into(),
                "postmaster@example.com".into(),
            ],
            connect: BackendConnect::OnMail,
            early_connect: EarlyConnect::RecentSenders,
            max_connections: 80,
            slot_wait: Duration::from_secs(10),
            spool_size: 256_000_000,
            fair_share_prefix_v4: 24,
            fair_share_prefix_v6: None,
            probe_interval: Duration::from_secs(5 * 60),
        }
    }
}

/// Client identity passed to the backend
/// (`identity = "proxy-v2" | "proxy-v1" | "xclient" | "none"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Identity {
    /// `HAProxy` PROXY protocol, binary version 2.
    #[default]
    ProxyV2,
    /// `HAProxy` PROXY protocol, text version 1.
    ProxyV1,
    /// Postfix `XCLIENT` command.
    Xclient,
    /// Nothing: the backend sees the proxy's address.
    None,
}

impl Backend {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.connect_timeout.is_zero() {
            return Err(invalid(
                "backend.connect_timeout",
                "must be greater than zero",
            ));
        }
        let backend = self;
        if backend.max_connections == 0 {
            return Err(invalid(
                "backend.max_connections",
                "must be at least 1 (size it to about 80 % of the backend's process limit)",
            ));
        }
        for (key, value) in [
            ("backend.slot_wait", backend.slot_wait),
            ("backend.probe_interval", backend.probe_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than zero"));
            }
        }
        check_prefix_len(
            "backend.fair_share_prefix_v4",
            backend.fair_share_prefix_v4,
            32,
        )?;
        if let Some(prefix) = backend.fair_share_prefix_v6 {
            check_prefix_len("backend.fair_share_prefix_v6", prefix, 128)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{
        assert_invalid, assert_parse_error_names, assert_unknown_field, assert_unknown_variant,
    };
    use crate::config::Config;

    #[test]
    fn every_identity_parses() {
        for (value, want) in [
            ("proxy-v2", Identity::ProxyV2),
            ("proxy-v1", Identity::ProxyV1),
            ("xclient", Identity::Xclient),
            ("none", Identity::None),
        ] {
            let text = format!("[backend]\nidentity = \"{value}\"");
            assert_eq!(Config::from_toml(&text).unwrap().backend.identity, want);
        }
        assert_unknown_variant(&[("[backend]\nidentity = \"proxy_v2\"", "identity")]);
    }

    #[test]
    fn every_connect_parses() {
        for (value, want, earned) in [
            ("on-mail", BackendConnect::OnMail, true),
            ("on-rcpt", BackendConnect::OnRcpt, true),
            ("on-connect", BackendConnect::OnConnect, false),
        ] {
            let text = format!("[backend]\nconnect = \"{value}\"");
            let connect = Config::from_toml(&text).unwrap().backend.connect;
            assert_eq!(connect, want);
            assert_eq!(connect.earned(), earned, "{value}");
        }
        assert_eq!(Config::default().backend.connect, BackendConnect::OnMail);
        assert_unknown_variant(&[("[backend]\nconnect = \"on-data\"", "connect")]);
    }

    #[test]
    fn every_early_connect_parses() {
        for (value, want) in [
            ("recent-senders", EarlyConnect::RecentSenders),
            ("off", EarlyConnect::Off),
        ] {
            let text = format!("[backend]\nearly_connect = \"{value}\"");
            assert_eq!(
                Config::from_toml(&text).unwrap().backend.early_connect,
                want
            );
        }
        assert_eq!(
            Config::default().backend.early_connect,
            EarlyConnect::RecentSenders
        );
        assert_unknown_variant(&[("[backend]\nearly_connect = \"always\"", "early_connect")]);
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[("[backend]\ntimeout = \"1s\"", "timeout")]);
        assert_parse_error_names(&[("[backend]\naddress = \"localhost:25\"", "address")]);
        assert_invalid(&[
            ("[backend]\nmax_connections = 0", "backend.max_connections"),
            ("[backend]\nslot_wait = \"0s\"", "backend.slot_wait"),
            (
                "[backend]\nprobe_interval = \"0s\"",
                "backend.probe_interval",
            ),
            (
                "[backend]\nfair_share_prefix_v4 = 0",
                "backend.fair_share_prefix_v4",
            ),
            (
                "[backend]\nfair_share_prefix_v4 = 33",
                "backend.fair_share_prefix_v4",
            ),
            (
                "[backend]\nfair_share_prefix_v6 = 129",
                "backend.fair_share_prefix_v6",
            ),
            (
                "[backend]\nconnect_timeout = \"0s\"",
                "backend.connect_timeout",
            ),
        ]);
    }
}
