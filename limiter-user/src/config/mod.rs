//! The agent's configuration: one TOML file, parsed into typed sections.
//!
//! The key names are a contract with administrators (see DESIGN.md,
//! "Configuration shape"). Every section and every key is optional and has a
//! default, unknown keys are refused (a typo must not silently fall back to a
//! default), and [`Config::validate`] refuses values that parse but make no
//! sense, naming the key and the reason.
//!
//! Human-friendly value formats:
//! * durations: humantime, e.g. `"10s"`, `"30m"`, `"7d"`;
//! * sizes: `"25MB"` (B, KB, MB, GB, TB with 1000 multiples; KiB, MiB, GiB,
//!   TiB with 1024) or a plain integer of bytes;
//! * rates: `"20/1m"` (a count per duration);
//! * CIDR lists: `"192.0.2.0/24"`, `"2001:db8::/32"` or a bare address, which
//!   means the single host (/32 or /128).
//!
//! Everything serializes back to TOML in the same formats, so `check-config`
//! can print the effective configuration and that output parses again.
//!
//! One file per TOML section, each with its struct, defaults and
//! validation; the value formats are in `values`. Everything is
//! re-exported here: callers name `crate::config::Limits`, not the file.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod backend;
mod cluster;
mod control;
mod filters;
mod kernel;
mod limits;
mod listen;
mod lists;
mod metrics;
mod recipients;
mod relay;
mod smtp;
mod state;
mod tls;
mod values;

pub use backend::{Backend, BackendConnect, EarlyConnect, Identity};
pub use cluster::{Cluster, MAX_CLUSTER_NAME};
pub use control::Control;
pub use filters::{Clamav, Filters, OnFailure, Rspamd};
pub use kernel::{Attach, Kernel, KernelMode, MapSizes, MAX_KERNEL_PORTS};
pub use limits::{HeloLimit, Limits, LiveLimit, SourceLimit, LIVE_LIMITS, MAX_BLOCK_DURATION};
pub use listen::{Listen, TlsMode};
pub use lists::Lists;
pub use metrics::Metrics;
pub use recipients::{Ldap, Recipients};
pub use relay::Relay;
pub use smtp::{Smtp, Vrfy};
pub use state::State;
pub use tls::Tls;
pub use values::{format_duration, parse_cidr, parse_duration, parse_size, Rate, MAX_DURATION};

/// The commented reference configuration, also what `check-config` and the
/// documentation show as the starting point.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/smtp-limiter.toml");

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// Not valid TOML, an unknown key, or a value of the wrong shape. The
    /// message (from the TOML parser) names the line and the key.
    #[error("{0}")]
    Parse(String),
    /// Parsed, but a value makes no sense.
    #[error("{key}: {reason}")]
    Invalid {
        /// The dotted key, e.g. `limits.ipv6_prefix` or `listen[1].tls`.
        key: String,
        /// What is wrong, with the offending value.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// A prefix length `key` of an address family whose addresses have `bits`
/// bits: 1 to `bits` (0 would lump every address together).
fn check_prefix_len(key: &str, value: u8, bits: u8) -> Result<(), ConfigError> {
    if (1..=bits).contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("must be between 1 and {bits}, not {value}"),
        ))
    }
}

// ---------------------------------------------------------------------------
// The configuration
// ---------------------------------------------------------------------------

/// The whole configuration file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Enforce decisions, or only decide and log them (to try a policy out).
    pub mode: Mode,
    /// Where the proxy accepts SMTP clients (`[[listen]]`, one or more).
    pub listen: Vec<Listen>,
    /// Certificate and key for STARTTLS / implicit TLS listeners.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    /// The real mail server the proxy relays sessions to.
    pub backend: Backend,
    /// SMTP dialogue limits and timeouts of the proxy.
    pub smtp: Smtp,
    /// The XDP/TC programs: whether, where and how to load them.
    pub kernel: Kernel,
    /// Connection caps, failure counters and block durations.
    pub limits: Limits,
    /// Which recipients the proxy accepts (open-relay protection).
    pub relay: Relay,
    /// Static allow and reject lists.
    pub lists: Lists,
    /// Where the valid-recipient list comes from, besides `relay.accept`.
    pub recipients: Recipients,
    /// Optional content filters asked before the backend accepts a message.
    pub filters: Filters,
    /// The CLI's control socket.
    pub control: Control,
    /// The Prometheus endpoint.
    pub metrics: Metrics,
    /// Where blocks are kept across restarts.
    pub state: State,
    /// Blocks shared with other edge hosts through Redis.
    pub cluster: Cluster,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            listen: vec![Listen::default()],
            tls: None,
            backend: Backend::default(),
            smtp: Smtp::default(),
            kernel: Kernel::default(),
            limits: Limits::default(),
            relay: Relay::default(),
            lists: Lists::default(),
            recipients: Recipients::default(),
            filters: Filters::default(),
            control: Control::default(),
            metrics: Metrics::default(),
            state: State::default(),
            cluster: Cluster::default(),
        }
    }
}

/// Whether decisions are applied (`mode = "enforce" | "observe"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Block, refuse and disconnect as decided.
    #[default]
    Enforce,
    /// Decide and log, but enforce nothing.
    Observe,
}

// ---------------------------------------------------------------------------
// Loading and validation
// ---------------------------------------------------------------------------

impl Config {
    /// Parses and validates a configuration text.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] for bad TOML, unknown keys and malformed
    /// values; [`ConfigError::Invalid`] for values [`Config::validate`]
    /// refuses.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates the file at `path`. The list files it
    /// names are not read: [`Config::load_with_lists`] does that for the
    /// agent and `check-config` (the CLI's other commands only need the
    /// socket and pin paths, and must work while a list file is being
    /// fixed).
    ///
    /// # Errors
    /// [`ConfigError::Read`] if the file cannot be read; otherwise as
    /// [`Config::from_toml`] (parse errors are prefixed with the path).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse(message) => {
                ConfigError::Parse(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// [`Config::load`], then the list files (`lists.reject_files`,
    /// `lists.allow_files`).
    ///
    /// # Errors
    /// As [`Config::load`], and [`ConfigError::Invalid`] for a list file
    /// that cannot be read or has bad lines (each with `file:line`).
    pub fn load_with_lists(path: &Path) -> Result<Config, ConfigError> {
        let mut config = Config::load(path)?;
        config.lists.read_files()?;
        Ok(config)
    }

    /// The configuration as TOML, in the same formats it is read in.
    ///
    /// # Errors
    /// Only if the TOML serializer refuses a value (not expected).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// A copy with secrets (the LDAP password) replaced, for printing.
    #[must_use]
    pub fn redacted(&self) -> Config {
        let mut copy = self.clone();
        if let Some(ldap) = copy.recipients.ldap.as_mut() {
            if ldap.password.is_some() {
                ldap.password = Some("********".to_owned());
            }
        }
        copy.cluster.redact();
        copy
    }

    /// Checks the values that parse but make no sense.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_listen()?;
        self.backend.validate()?;
        self.smtp.validate()?;
        self.state.validate()?;
        self.kernel.validate()?;
        self.limits.validate()?;
        self.lists.validate()?;
        self.recipients.validate()?;
        self.filters.validate()?;
        self.cluster.validate()?;
        Ok(())
    }
}

/// The TOML spelling of a unit enum value (for messages).
fn enum_name<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(s)) => s,
        _ => String::from("?"),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    pub(super) fn parse_err(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(config) => panic!("accepted:\n{text}\n=> {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    pub(super) fn invalid_key(text: &str) -> (String, String) {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid { key, reason }) => (key, reason),
            other => panic!("expected Invalid for:\n{text}\ngot {other:?}"),
        }
    }

    /// A configuration with every optional part set, for round trips.
    fn full() -> Config {
        Config::from_toml(
            r#"
            mode = "observe"
            [[listen]]
            address = "0.0.0.0:25"
            tls = "starttls"
            [[listen]]
            address = "[::]:465"
            tls = "implicit"
            [tls]
            certificate = "/etc/smtp-limiter/cert.pem"
            key = "/etc/smtp-limiter/key.pem"
            [backend]
            address = "127.0.0.1:2525"
            identity = "xclient"
            connect_timeout = "1500ms"
            connect = "on-connect"
            max_connections = 40
            slot_wait = "3s"
            fair_share_prefix_v4 = 16
            fair_share_prefix_v6 = 56
            probe_interval = "1m"
            [kernel]
            mode = "required"
            interfaces = ["eth0", "eth1"]
            attach = "xdp-generic"
            pin_path = "/sys/fs/bpf/x"
            ports = [25, 2525]
            events_per_second = 7
            [kernel.map_sizes]
            block = 1
            block_net = 2
            allow = 3
            cap_net = 4
            conn_count = 5
            conn_socks = 6
            [limits]
            max_connections_per_source = 0
            ipv6_prefix = 48
            max_failed_rcpt = 3
            max_failed_auth = 4
            failed_auth_window = "1h 30m"
            null_sender_rate = "5/10s"
            block_duration = "1h"
            block_backoff = 1.5
            max_block_duration = "30d"
            [[limits.source]]
            cidr = "192.0.2.0/24"
            max_connections = 50
            [[limits.source]]
            cidr = "2001:db8::1"
            max_connections = 0
            [[limits.helo]]
            pattern = "*.bounces.example.net"
            max_connections = 2
            [relay]
            accept = "*@example.com  postmaster@example.com"
            [lists]
            allow = ["10.0.0.0/8", "192.0.2.7"]
            reject = ["198.51.100.0/24", "2001:db8:bad::/48"]
            reject_helo = ["*.dynamic.example"]
            [recipients.ldap]
            url = "ldap://127.0.0.1:389"
            bind_dn = "cn=reader,dc=example,dc=com"
            password_file = "/etc/smtp-limiter/ldap.secret"
            base_dn = "dc=example,dc=com"
            filter = "(objectClass=user)"
            attributes = ["mail", "proxyAddresses"]
            refresh = "5m"
            [filters]
            timeout = "20s"
            on_failure = "fail-closed"
            max_size = "10MiB"
            [filters.rspamd]
            url = "http://127.0.0.1:11333"
            [filters.clamav]
            address = "/run/clamav/clamd.ctl"
            [control]
            socket = "/tmp/c.sock"
            [metrics]
            address = "[::1]:9000"
            [state]
            directory = "/tmp/state"
            "#,
        )
        .unwrap_or_else(|e| panic!("full config refused: {e}"))
    }

    #[test]
    fn default_config_parses_and_validates() {
        let config = Config::from_toml(DEFAULT_CONFIG).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.mode, Mode::Enforce);
        assert_eq!(config.listen.len(), 1);
        assert_eq!(config.listen[0].address, "127.0.0.1:10025".parse().unwrap());
        assert_eq!(config.backend.address, "127.0.0.1:10026".parse().unwrap());
        assert_eq!(config.kernel.mode, KernelMode::Auto);
        assert!(config.kernel.interfaces.is_empty());
        assert_eq!(
            config.relay.patterns(),
            ["*@example.com", "postmaster@example.com", "postmaster"]
        );
        assert!(config.lists.allow.is_empty() && config.lists.reject.is_empty());
        assert!(config.tls.is_none() && config.recipients.ldap.is_none());
        assert!(config.filters.rspamd.is_none() && config.filters.clamav.is_none());
    }

    #[test]
    fn default_config_mentions_every_key() {
        let full = full().to_toml().unwrap();
        for line in full.lines() {
            let line = line.trim();
            let name = if let Some(table) = line.strip_prefix('[') {
                table.trim_matches(|c| c == '[' || c == ']')
            } else if let Some((key, _)) = line.split_once(" = ") {
                key
            } else {
                continue;
            };
            assert!(
                DEFAULT_CONFIG.contains(name),
                "DEFAULT_CONFIG does not document {name:?}"
            );
        }
    }

    #[test]
    fn empty_text_gives_defaults() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(
            config.listen,
            vec![Listen {
                address: "0.0.0.0:25".parse().unwrap(),
                tls: TlsMode::None
            }]
        );
        assert_eq!(config.backend.address, "127.0.0.1:2525".parse().unwrap());
        assert_eq!(config.backend.identity, Identity::ProxyV2);
        assert_eq!(config.backend.connect_timeout, Duration::from_secs(10));
        assert_eq!(config.kernel.ports, [25, 465, 587]);
        assert_eq!(
            config.kernel.pin_path,
            Path::new("/sys/fs/bpf/smtp-limiter")
        );
        assert_eq!(config.kernel.events_per_second, 100);
        assert_eq!(config.kernel.map_sizes.block, 262_144);
        assert_eq!(config.kernel.map_sizes.conn_socks, 262_144);
        assert_eq!(config.limits.max_connections_per_source, 10);
        assert_eq!(config.limits.ipv6_prefix, 64);
        assert_eq!(
            config.limits.null_sender_rate,
            Rate {
                count: 20,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            config.limits.max_block_duration,
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(config.limits.block_backoff, 2.0);
        assert!(config.relay.patterns().is_empty());
        assert_eq!(config.filters.max_size, 25_000_000);
        assert_eq!(config.filters.max_rejects, 3);
        assert_eq!(config.filters.reject_window, Duration::from_secs(3600));
        assert_eq!(config.filters.on_failure, OnFailure::FailOpen);
        assert_eq!(
            config.control.socket,
            Path::new("/run/smtp-limiter/control.sock")
        );
        assert_eq!(config.metrics.address, "127.0.0.1:9425".parse().unwrap());
        assert_eq!(config.state.directory, Path::new("/var/lib/smtp-limiter"));
    }

    /// Each text is refused by validation, naming its key first.
    pub(super) fn assert_invalid(cases: &[(&str, &str)]) {
        for &(text, key) in cases {
            let (got, reason) = invalid_key(text);
            assert_eq!(got, key, "{text}: {reason}");
            let message = Config::from_toml(text).unwrap_err().to_string();
            assert!(message.starts_with(&format!("{key}: ")), "{message}");
        }
    }

    /// Each text is refused by the parser for the unknown key it names.
    pub(super) fn assert_unknown_field(cases: &[(&str, &str)]) {
        for &(text, key) in cases {
            let message = parse_err(text);
            assert!(
                message.contains(&format!("unknown field `{key}`")),
                "{text}: {message}"
            );
        }
    }

    /// Each text is refused by the parser for an unknown enum value of `key`.
    pub(super) fn assert_unknown_variant(cases: &[(&str, &str)]) {
        for &(text, key) in cases {
            let message = parse_err(text);
            assert!(
                message.contains(key) && message.contains("unknown variant"),
                "{text}: {message}"
            );
        }
    }

    /// Each text is refused at parse time with a message naming `key`.
    pub(super) fn assert_parse_error_names(cases: &[(&str, &str)]) {
        for &(text, key) in cases {
            let message = parse_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    /// Each text is accepted.
    pub(super) fn assert_accepted(texts: &[&str]) {
        for text in texts {
            if let Err(e) = Config::from_toml(text) {
                panic!("{text}: {e}");
            }
        }
    }

    #[test]
    fn every_mode_parses() {
        for (value, want) in [("enforce", Mode::Enforce), ("observe", Mode::Observe)] {
            assert_eq!(
                Config::from_toml(&format!("mode = \"{value}\""))
                    .unwrap()
                    .mode,
                want
            );
        }
        assert_unknown_variant(&[("mode = \"Enforce\"", "mode")]);
    }

    #[test]
    fn unknown_top_level_keys_are_refused_naming_the_key() {
        assert_unknown_field(&[("modes = \"enforce\"", "modes"), ("[nope]", "nope")]);
    }

    #[test]
    fn invalid_display_names_key_value_and_reason() {
        let message = Config::from_toml("[limits]\nipv6_prefix = 0")
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "limits.ipv6_prefix: must be between 1 and 128, not 0"
        );
    }

    #[test]
    fn serialize_then_parse_gives_the_same_config() {
        for config in [
            Config::default(),
            Config::from_toml(DEFAULT_CONFIG).unwrap(),
            full(),
        ] {
            let text = config.to_toml().unwrap_or_else(|e| panic!("{e}"));
            let again = Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(again, config, "{text}");
        }
        let text = full().to_toml().unwrap();
        assert!(text.contains("block_duration = \"1h\""), "{text}");
        assert!(text.contains("failed_auth_window = \"90m\""), "{text}");
        assert!(text.contains("null_sender_rate = \"5/10s\""), "{text}");
        assert!(text.contains("max_size = 10485760"), "{text}");
        assert!(text.contains("\"192.0.2.7/32\""), "{text}");
    }

    #[test]
    fn redacted_hides_the_ldap_password() {
        let config = Config::from_toml(
            "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\nbind_dn = \"cn=r\"\npassword = \"hunter2\"",
        )
        .unwrap();
        let text = config.redacted().to_toml().unwrap();
        assert!(
            !text.contains("hunter2") && text.contains("password = \"********\""),
            "{text}"
        );
    }

    #[test]
    fn load_reports_the_path() {
        let dir =
            std::env::temp_dir().join(format!("smtp-limiter-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.toml");
        match Config::load(&missing) {
            Err(e @ ConfigError::Read { .. }) => {
                assert!(e.to_string().contains("missing.toml"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[limits]\nblok = 1\n").unwrap();
        let message = Config::load(&bad).unwrap_err().to_string();
        assert!(
            message.contains("bad.toml") && message.contains("blok"),
            "{message}"
        );
        let good = dir.join("good.toml");
        std::fs::write(&good, DEFAULT_CONFIG).unwrap();
        assert_eq!(
            Config::load(&good).unwrap(),
            Config::from_toml(DEFAULT_CONFIG).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
