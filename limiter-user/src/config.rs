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

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::smtp::command::Verb;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// The commented reference configuration, also what `check-config` and the
/// documentation show as the starting point.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/smtp-limiter.toml");

/// Most ports the kernel program can watch (it checks them in a fixed loop).
pub const MAX_KERNEL_PORTS: usize = 16;

/// Longest network interface name Linux accepts (`IFNAMSIZ - 1`).
const MAX_INTERFACE_NAME: usize = 15;

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

/// One `[[listen]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Address and port the proxy binds.
    pub address: SocketAddr,
    /// TLS offered on this listener.
    pub tls: TlsMode,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 25),
            tls: TlsMode::None,
        }
    }
}

/// TLS on a listener (`tls = "none" | "starttls" | "implicit"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP, no STARTTLS offered.
    #[default]
    None,
    /// Plain SMTP that offers STARTTLS (port 25/587).
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// `[tls]`: needed as soon as a listener uses TLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain presented to clients.
    pub certificate: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

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
    /// NOOP, RSET, HELP and QUIT itself) or `"on-connect"` (at accept).
    pub connect: BackendConnect,
    /// Backend connections open at once, all sessions together (size it to
    /// about 80 % of the MTA's process limit: Postfix's
    /// `default_process_limit` is 100). A session that needs one while all
    /// are in use waits its turn, fairly between sources.
    pub max_connections: u32,
    /// Longest wait for a backend slot; then the client gets `421 4.3.2`.
    #[serde(with = "duration_serde")]
    pub slot_wait: Duration,
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

/// `backend.connect = "on-mail" | "on-connect"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendConnect {
    /// The backend connection is earned: opened at the first accepted MAIL
    /// FROM (or AUTH, relayed VRFY, relayed extension verbs).
    #[default]
    OnMail,
    /// The backend connection opens when the client connects.
    OnConnect,
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
            max_connections: 80,
            slot_wait: Duration::from_secs(10),
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
    /// proxy is under stress: sessions that have not sent MAIL yet get
    /// `stress_command_timeout`. All backend slots in use is stress too.
    pub stress_threshold: f64,
    /// The command timeout, under stress, of a session that has not had a
    /// MAIL FROM accepted yet.
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

/// `[kernel]`: the eBPF layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kernel {
    /// Whether the kernel programs must, may or must not be loaded.
    pub mode: KernelMode,
    /// Interfaces the packet filter attaches to; empty attaches nowhere
    /// (connection accounting still works).
    pub interfaces: Vec<String>,
    /// Which hook the packet filter uses.
    pub attach: Attach,
    /// bpffs directory where the maps are pinned, so blocks survive restarts.
    pub pin_path: PathBuf,
    /// Destination TCP ports the kernel guards (SYN caps, block drops).
    pub ports: Vec<u16>,
    /// Most events per second the kernel reports to the agent (drops etc.).
    pub events_per_second: u32,
    /// Sizes of the kernel maps (`max_entries`).
    pub map_sizes: MapSizes,
}

impl Default for Kernel {
    fn default() -> Self {
        Self {
            mode: KernelMode::Auto,
            interfaces: Vec::new(),
            attach: Attach::Auto,
            pin_path: PathBuf::from("/sys/fs/bpf/smtp-limiter"),
            ports: vec![25, 465, 587],
            events_per_second: 100,
            map_sizes: MapSizes::default(),
        }
    }
}

/// `kernel.mode = "auto" | "required" | "off"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelMode {
    /// Load if possible; otherwise run the proxy alone and say so loudly.
    #[default]
    Auto,
    /// Refuse to start without the kernel programs.
    Required,
    /// Never load them (proxy-only enforcement).
    Off,
}

/// `kernel.attach = "auto" | "xdp" | "xdp-generic" | "tc"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attach {
    /// Native XDP, falling back to generic XDP, then TC.
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Xdp,
    /// Generic (SKB) XDP only.
    XdpGeneric,
    /// TC classifier only.
    Tc,
}

impl Attach {
    /// The configuration spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

/// `[kernel.map_sizes]`: `max_entries` of each map. A pinned map keeps the
/// size it was created with until its pin is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapSizes {
    /// Blocked single addresses (IPv4 /32, IPv6 prefixes).
    pub block: u32,
    /// Blocked networks (CIDR rejects and blocks).
    pub block_net: u32,
    /// Allow-listed networks.
    pub allow: u32,
    /// Per-network connection-cap overrides (`limits.source`).
    pub cap_net: u32,
    /// Per-source connection counters.
    pub conn_count: u32,
    /// Sockets being counted (to decrement on close).
    pub conn_socks: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            block: 262_144,
            block_net: 65_536,
            allow: 16_384,
            cap_net: 16_384,
            conn_count: 65_536,
            conn_socks: 262_144,
        }
    }
}

/// The longest timed block (100 years): wall-clock arithmetic on longer
/// ones could overflow, and nothing needs them (a block without end is
/// `lists.reject`, or `block add` without `--for`).
pub const MAX_BLOCK_DURATION: Duration = MAX_DURATION;

/// The longest duration any key takes (100 years): [`parse_duration`]
/// refuses longer ones.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

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

/// `[relay]`: open-relay protection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Relay {
    /// Accepted recipient patterns, separated by blanks
    /// (e.g. `"*@example.com postmaster@example.com"`); empty leaves every recipient
    /// to the backend.
    pub accept: String,
}

impl Relay {
    /// The patterns of `accept`, in order.
    #[must_use]
    pub fn patterns(&self) -> Vec<&str> {
        self.accept.split_whitespace().collect()
    }
}

/// `[lists]`: static allow and reject lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lists {
    /// Sources that are never blocked or limited.
    #[serde(with = "cidr_list_serde")]
    pub allow: Vec<IpNet>,
    /// Sources dropped in the kernel (refused by the proxy without it).
    #[serde(with = "cidr_list_serde")]
    pub reject: Vec<IpNet>,
    /// HELO/EHLO name patterns refused at the SMTP level.
    pub reject_helo: Vec<String>,
    /// HELO/EHLO name patterns exempt from the HELO limits and the
    /// null-sender rate. Clients claim these names, so they never lift the
    /// connection cap, blocks, harvest/AUTH limits or relay rules.
    pub allow_helo: Vec<String>,
    /// Files of networks dropped like `reject`, one address or CIDR a line
    /// with `#` comments (see `crate::lists`); re-read on reload and SIGHUP,
    /// so an entry removed from a file leaves the kernel.
    pub reject_files: Vec<PathBuf>,
    /// Files of networks exempt like `allow`, in the same format.
    pub allow_files: Vec<PathBuf>,
    /// The entries read from `reject_files` and `allow_files` by
    /// [`Config::load_with_lists`] (not part of the TOML).
    #[serde(skip)]
    pub from_files: crate::lists::FileLists,
}

impl Lists {
    /// Every allow-list network: `allow`, then the files' entries.
    pub fn allow_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.allow
            .iter()
            .copied()
            .chain(self.from_files.allow.iter().map(|e| e.net))
    }

    /// Every reject-list network: `reject`, then the files' entries.
    pub fn reject_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.reject
            .iter()
            .copied()
            .chain(self.from_files.reject.iter().map(|e| e.net))
    }

    /// Reads `allow_files` and `reject_files` into `from_files`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and, for each bad line, the
    /// file and the line.
    pub fn read_files(&mut self) -> Result<(), ConfigError> {
        self.from_files = crate::lists::FileLists::read(&self.allow_files, &self.reject_files)
            .map_err(|(key, reason)| invalid(key, reason))?;
        Ok(())
    }
}

/// `[recipients]`: sources of valid recipients.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipients {
    /// Read valid recipients from an LDAP directory (Active Directory too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ldap: Option<Ldap>,
}

/// `[recipients.ldap]`: the directory the valid recipients are read from
/// (see `crate::recipients`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ldap {
    /// Server, `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before binding (so the
    /// password never crosses the network in clear).
    #[serde(default)]
    pub starttls: bool,
    /// PEM CA certificates that verify the directory's TLS certificate
    /// (`ldaps://`, StartTLS); without it, the system's CA store. An
    /// internal Active Directory CA usually needs this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// DN to bind as; anonymous bind without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_dn: Option<String>,
    /// File holding the bind password (preferred: keeps it out of this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The bind password itself, when a file is not practical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Subtree searched.
    pub base_dn: String,
    /// Search filter selecting the entries that carry addresses.
    #[serde(default = "default_ldap_filter")]
    pub filter: String,
    /// Attributes holding addresses (`proxyAddresses` values may carry `smtp:`).
    #[serde(default = "default_ldap_attributes")]
    pub attributes: Vec<String>,
    /// How often the list is read again (each time ±10 %, so that several
    /// agents do not ask the directory at the same moment).
    #[serde(default = "default_ldap_refresh", with = "duration_serde")]
    pub refresh: Duration,
    /// Longest wait for the connection and for each answer of the directory.
    #[serde(default = "default_ldap_timeout", with = "duration_serde")]
    pub timeout: Duration,
    /// Largest drop in the number of addresses a refresh may bring, in
    /// percent of the set in force (`"50%"`): a refresh returning fewer is
    /// refused and reported, and the set in force stays (a broken filter,
    /// an OU moved, a replica half-restored must not refuse the mail of
    /// half the company). `"100%"` accepts any drop.
    #[serde(default = "default_ldap_max_drop", with = "percent_serde")]
    pub max_drop: u8,
    /// Compare local parts with their case, as RFC 5321 allows. Off by
    /// default, as Exchange and Active Directory do: `John.Doe@` is
    /// `john.doe@`. Domains never depend on case.
    #[serde(default)]
    pub case_sensitive_local_part: bool,
    /// Characters that start an address extension (`user+tag@example.com`
    /// is `user@example.com` when the full address is unknown), like
    /// Postfix's `recipient_delimiter`, e.g. `"+"`. Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipient_delimiter: String,
}

fn default_ldap_filter() -> String {
    "(objectClass=*)".to_owned()
}

fn default_ldap_attributes() -> Vec<String> {
    // Both kinds of directory: OpenLDAP (`mail`, `mailAlternateAddress`)
    // and Active Directory (`mail`, `proxyAddresses`). A server ignores the
    // names its schema lacks.
    vec![
        "mail".to_owned(),
        "mailAlternateAddress".to_owned(),
        "proxyAddresses".to_owned(),
    ]
}

fn default_ldap_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_ldap_max_drop() -> u8 {
    50
}

/// A percentage, written `"50%"` (or a bare integer, `50`).
mod percent_serde {
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &u8, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value}%"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
        struct PercentVisitor;
        impl Visitor<'_> for PercentVisitor {
            type Value = u8;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage such as \"50%\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u8, E> {
                let digits = v.trim().strip_suffix('%').unwrap_or(v.trim()).trim_end();
                digits
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a percentage from 0% to 100%")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u8, E> {
                u8::try_from(v)
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| E::custom(format!("{v} is not a percentage from 0 to 100")))
            }
        }
        deserializer.deserialize_any(PercentVisitor)
    }
}

fn default_ldap_refresh() -> Duration {
    Duration::from_secs(10 * 60)
}

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

/// `[control]`: the CLI's way in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Unix socket the agent listens on for `smtp-limiter` commands.
    pub socket: PathBuf,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/smtp-limiter/control.sock"),
        }
    }
}

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Where Prometheus scrapes `/metrics`.
    pub address: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9425),
        }
    }
}

/// `[state]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct State {
    /// Directory of the state file (blocks, allows) that survives reboots.
    pub directory: PathBuf,
    /// Most blocks the proxy keeps and stores; past it the block expiring
    /// first is dropped (counted in metrics, logged).
    pub max_blocks: usize,
    /// Log level (`error`, `warn`, `info`, `debug`, `trace`); `RUST_LOG`
    /// overrides it.
    pub log_level: String,
}

impl Default for State {
    fn default() -> Self {
        Self {
            directory: PathBuf::from("/var/lib/smtp-limiter"),
            max_blocks: 100_000,
            log_level: "info".into(),
        }
    }
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
        copy
    }

    /// Checks the values that parse but make no sense.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_listen()?;
        self.validate_backend()?;
        self.validate_smtp()?;
        self.validate_state()?;
        self.validate_kernel()?;
        self.validate_limits()?;
        self.validate_lists()?;
        self.validate_recipients()?;
        self.validate_filters()?;
        Ok(())
    }

    fn validate_state(&self) -> Result<(), ConfigError> {
        if self.state.max_blocks == 0 {
            return Err(invalid("state.max_blocks", "must be at least 1"));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.state.log_level.as_str()) {
            return Err(invalid(
                "state.log_level",
                format!(
                    "{:?}: use error, warn, info, debug or trace",
                    self.state.log_level
                ),
            ));
        }
        Ok(())
    }

    fn validate_smtp(&self) -> Result<(), ConfigError> {
        let smtp = &self.smtp;
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

    /// Whether AUTH must wait for TLS: `smtp.auth_requires_tls`, by default
    /// true when the proxy has a certificate.
    #[must_use]
    pub fn auth_requires_tls(&self) -> bool {
        self.smtp.auth_requires_tls.unwrap_or(self.tls.is_some())
    }

    fn validate_listen(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one [[listen]] entry is needed"));
        }
        let mut seen = HashSet::new();
        for (i, listen) in self.listen.iter().enumerate() {
            // Port 0 asks the kernel for a free port: several are distinct.
            if listen.address.port() != 0 && !seen.insert(listen.address) {
                return Err(invalid(
                    format!("listen[{i}].address"),
                    format!("{} is listed twice", listen.address),
                ));
            }
            if listen.tls != TlsMode::None && self.tls.is_none() {
                return Err(invalid(
                    format!("listen[{i}].tls"),
                    format!(
                        "\"{}\" needs a [tls] section with certificate and key",
                        enum_name(&listen.tls)
                    ),
                ));
            }
            if listen.address == self.backend.address {
                return Err(invalid(
                    format!("listen[{i}].address"),
                    format!(
                        "{} is also backend.address: the proxy would relay to itself",
                        listen.address
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_backend(&self) -> Result<(), ConfigError> {
        if self.backend.connect_timeout.is_zero() {
            return Err(invalid(
                "backend.connect_timeout",
                "must be greater than zero",
            ));
        }
        let backend = &self.backend;
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
        if !(1..=32).contains(&backend.fair_share_prefix_v4) {
            return Err(invalid(
                "backend.fair_share_prefix_v4",
                format!(
                    "must be between 1 and 32, not {}",
                    backend.fair_share_prefix_v4
                ),
            ));
        }
        if let Some(prefix) = backend.fair_share_prefix_v6 {
            if !(1..=128).contains(&prefix) {
                return Err(invalid(
                    "backend.fair_share_prefix_v6",
                    format!("must be between 1 and 128, not {prefix}"),
                ));
            }
        }
        Ok(())
    }

    fn validate_kernel(&self) -> Result<(), ConfigError> {
        let kernel = &self.kernel;
        let mut names = HashSet::new();
        for (i, name) in kernel.interfaces.iter().enumerate() {
            let key = format!("kernel.interfaces[{i}]");
            if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
                return Err(invalid(
                    key,
                    format!("{name:?} is not an interface name (1 to {MAX_INTERFACE_NAME} bytes)"),
                ));
            }
            if name.contains(['/', ' ', '\t', '\n', '\0']) {
                return Err(invalid(key, format!("{name:?} is not an interface name")));
            }
            if !names.insert(name.as_str()) {
                return Err(invalid(key, format!("{name:?} is listed twice")));
            }
        }
        if kernel.ports.is_empty() {
            return Err(invalid("kernel.ports", "at least one port is needed"));
        }
        if kernel.ports.len() > MAX_KERNEL_PORTS {
            return Err(invalid(
                "kernel.ports",
                format!(
                    "{} ports listed, at most {MAX_KERNEL_PORTS} are supported",
                    kernel.ports.len()
                ),
            ));
        }
        let mut ports = HashSet::new();
        for &port in &kernel.ports {
            if port == 0 {
                return Err(invalid("kernel.ports", "0 is not a port"));
            }
            if !ports.insert(port) {
                return Err(invalid("kernel.ports", format!("{port} is listed twice")));
            }
        }
        let sizes = &kernel.map_sizes;
        for (name, size) in [
            ("block", sizes.block),
            ("block_net", sizes.block_net),
            ("allow", sizes.allow),
            ("cap_net", sizes.cap_net),
            ("conn_count", sizes.conn_count),
            ("conn_socks", sizes.conn_socks),
        ] {
            if size == 0 {
                return Err(invalid(
                    format!("kernel.map_sizes.{name}"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
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

    fn validate_lists(&self) -> Result<(), ConfigError> {
        for (i, pattern) in self.lists.reject_helo.iter().enumerate() {
            if pattern.trim().is_empty() {
                return Err(invalid(
                    format!("lists.reject_helo[{i}]"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }

    fn validate_recipients(&self) -> Result<(), ConfigError> {
        let Some(ldap) = &self.recipients.ldap else {
            return Ok(());
        };
        let lower = ldap.url.to_ascii_lowercase();
        if !(lower.starts_with("ldap://") || lower.starts_with("ldaps://")) {
            return Err(invalid(
                "recipients.ldap.url",
                format!("{:?} must start with ldap:// or ldaps://", ldap.url),
            ));
        }
        if ldap.starttls && lower.starts_with("ldaps://") {
            return Err(invalid(
                "recipients.ldap.starttls",
                "an ldaps:// connection is TLS from the start: StartTLS needs ldap://",
            ));
        }
        if ldap.password.is_some() && ldap.password_file.is_some() {
            return Err(invalid(
                "recipients.ldap.password",
                "set password or password_file, not both",
            ));
        }
        let has_password = ldap.password.is_some() || ldap.password_file.is_some();
        if ldap.bind_dn.is_some() && !has_password {
            return Err(invalid(
                "recipients.ldap.bind_dn",
                "needs password_file (or password)",
            ));
        }
        if ldap.bind_dn.is_none() && has_password {
            return Err(invalid(
                "recipients.ldap.bind_dn",
                "a password is set but no bind_dn to use it with",
            ));
        }
        if ldap.base_dn.trim().is_empty() {
            return Err(invalid("recipients.ldap.base_dn", "must not be empty"));
        }
        if ldap3::parse_filter(&ldap.filter).is_err() {
            return Err(invalid(
                "recipients.ldap.filter",
                format!(
                    "{:?} is not an LDAP search filter (RFC 4515), e.g. \"(mail=*)\"",
                    ldap.filter
                ),
            ));
        }
        if ldap.attributes.is_empty() || ldap.attributes.iter().any(|a| a.trim().is_empty()) {
            return Err(invalid(
                "recipients.ldap.attributes",
                "needs at least one attribute name, none empty",
            ));
        }
        if ldap.refresh.is_zero() {
            return Err(invalid(
                "recipients.ldap.refresh",
                "must be greater than zero",
            ));
        }
        if ldap.timeout.is_zero() {
            return Err(invalid(
                "recipients.ldap.timeout",
                "must be greater than zero",
            ));
        }
        if ldap.max_drop > 100 {
            return Err(invalid(
                "recipients.ldap.max_drop",
                format!("must be between 0% and 100%, not {}%", ldap.max_drop),
            ));
        }
        if ldap.recipient_delimiter.contains(['@', ' ', '\t']) {
            return Err(invalid(
                "recipients.ldap.recipient_delimiter",
                format!(
                    "{:?}: characters that start an extension, without '@' or blanks",
                    ldap.recipient_delimiter
                ),
            ));
        }
        Ok(())
    }

    fn validate_filters(&self) -> Result<(), ConfigError> {
        let filters = &self.filters;
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

/// The TOML spelling of a unit enum value (for messages).
fn enum_name<T: Serialize>(value: &T) -> String {
    match toml::Value::try_from(value) {
        Ok(toml::Value::String(s)) => s,
        _ => String::from("?"),
    }
}

// ---------------------------------------------------------------------------
// Value formats
// ---------------------------------------------------------------------------

/// A count per period, written `"20/1m"` (also `"20/m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events allowed per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((count, per)) = s.split_once('/') else {
            return Err(format!(
                "invalid rate {s:?}: expected a count per duration, like \"20/1m\""
            ));
        };
        let count = count
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("invalid rate {s:?}: {:?} is not a count", count.trim()))?;
        let per = per.trim();
        let per = if per.starts_with(|c: char| c.is_ascii_alphabetic()) {
            parse_duration(&format!("1{per}"))
        } else {
            parse_duration(per)
        }
        .map_err(|e| format!("invalid rate {s:?}: {e}"))?;
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, format_duration(self.per))
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(StrVisitor {
            expecting: "a rate like \"20/1m\"",
            parse: Rate::from_str,
        })
    }
}

/// Parses a humantime duration (`"10s"`, `"30m"`, `"7d"`, `"1h 30m"`).
///
/// # Errors
/// A message naming the bad text.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    // Longer ones cannot be written back (humantime refuses them) and no
    // timeout or window needs them.
    if duration > MAX_DURATION {
        return Err(format!(
            "invalid duration {s:?}: longer than {}",
            format_duration(MAX_DURATION)
        ));
    }
    Ok(duration)
}

/// Formats a duration compactly in the largest unit that divides it exactly
/// (`"30m"`, `"7d"`, `"90s"`, `"1500ms"`); [`parse_duration`] reads it back.
#[must_use]
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 7] = [
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (size, unit) in UNITS {
        if nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

/// Parses a size: `"25MB"`, `"64 KiB"`, `"1000"` (bytes). Units are
/// B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of
/// 1024), in any case.
///
/// # Errors
/// A message naming the bad text.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number of bytes or a size like \"25MB\"")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(multiplier)
        // TOML integers are signed 64-bit: a larger size could not be
        // written back.
        .filter(|&size| i64::try_from(size).is_ok())
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses a network (`"192.0.2.0/24"`) or a bare address (the single host).
/// A network with host bits set (`"192.0.2.7/24"`) is refused as ambiguous.
///
/// # Errors
/// A message naming the bad text.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let text = s.trim();
    if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("invalid network {s:?}: expected a CIDR like \"192.0.2.0/24\""))?;
        if net.trunc() != net {
            return Err(format!(
                "invalid network {s:?}: host bits are set (the network is {}, the single host is {})",
                net.trunc(),
                net.addr()
            ));
        }
        Ok(net)
    } else {
        let addr: IpAddr = text.parse().map_err(|_| {
            format!("invalid network {s:?}: expected a CIDR like \"192.0.2.0/24\" or an address")
        })?;
        Ok(IpNet::from(addr))
    }
}

/// Deserializes a string through a parse function, with a clear "expected".
struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

mod duration_serde {
    use super::{format_duration, parse_duration, Deserializer, Duration, Serializer, StrVisitor};

    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(StrVisitor {
            expecting: "a duration like \"30s\", \"10m\" or \"7d\"",
            parse: parse_duration,
        })
    }
}

mod size_serde {
    use super::{de, fmt, parse_size, Deserializer, Serializer, Visitor};

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `serialize_with` signature
    pub fn serialize<S: Serializer>(size: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(*size)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes or a size like \"25MB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A network read with [`parse_cidr`], for lists.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(StrVisitor {
                expecting: "a network like \"192.0.2.0/24\" or an address",
                parse: parse_cidr,
            })
            .map(Cidr)
    }
}

mod cidr_serde {
    use super::{Cidr, Deserialize, Deserializer, IpNet, Serializer};

    pub fn serialize<S: Serializer>(net: &IpNet, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(net)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpNet, D::Error> {
        Cidr::deserialize(deserializer).map(|c| c.0)
    }
}

mod cidr_list_serde {
    use super::{Cidr, Deserialize, Deserializer, IpNet, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(nets.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
        Ok(Vec::<Cidr>::deserialize(deserializer)?
            .into_iter()
            .map(|c| c.0)
            .collect())
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        match Config::from_toml(text) {
            Ok(config) => panic!("accepted:\n{text}\n=> {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn invalid_key(text: &str) -> (String, String) {
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

    #[test]
    fn every_enum_value_parses() {
        let tls = "[tls]\ncertificate = \"/c\"\nkey = \"/k\"\n";
        for (value, want) in [("enforce", Mode::Enforce), ("observe", Mode::Observe)] {
            assert_eq!(
                Config::from_toml(&format!("mode = \"{value}\""))
                    .unwrap()
                    .mode,
                want
            );
        }
        for (value, want) in [
            ("none", TlsMode::None),
            ("starttls", TlsMode::Starttls),
            ("implicit", TlsMode::Implicit),
        ] {
            let text = format!("[[listen]]\naddress = \"127.0.0.1:25\"\ntls = \"{value}\"\n{tls}");
            assert_eq!(Config::from_toml(&text).unwrap().listen[0].tls, want);
            assert_eq!(enum_name(&want), value);
        }
        for (value, want) in [
            ("proxy-v2", Identity::ProxyV2),
            ("proxy-v1", Identity::ProxyV1),
            ("xclient", Identity::Xclient),
            ("none", Identity::None),
        ] {
            let text = format!("[backend]\nidentity = \"{value}\"");
            assert_eq!(Config::from_toml(&text).unwrap().backend.identity, want);
        }
        for (value, want) in [
            ("auto", KernelMode::Auto),
            ("required", KernelMode::Required),
            ("off", KernelMode::Off),
        ] {
            assert_eq!(
                Config::from_toml(&format!("[kernel]\nmode = \"{value}\""))
                    .unwrap()
                    .kernel
                    .mode,
                want
            );
        }
        for (value, want) in [
            ("auto", Attach::Auto),
            ("xdp", Attach::Xdp),
            ("xdp-generic", Attach::XdpGeneric),
            ("tc", Attach::Tc),
        ] {
            assert_eq!(
                Config::from_toml(&format!("[kernel]\nattach = \"{value}\""))
                    .unwrap()
                    .kernel
                    .attach,
                want
            );
        }
        for (value, want) in [
            ("fail-open", OnFailure::FailOpen),
            ("fail-closed", OnFailure::FailClosed),
        ] {
            let text = format!("[filters]\non_failure = \"{value}\"");
            assert_eq!(Config::from_toml(&text).unwrap().filters.on_failure, want);
        }
    }

    /// Values that could not be written back (`check-config` prints the
    /// effective configuration) are refused at parse time, naming the key.
    #[test]
    fn durations_and_sizes_out_of_range_are_refused() {
        for (text, key) in [
            (
                "[smtp]\ncommand_timeout = \"13977500h5500ms\"",
                "command_timeout",
            ),
            (
                "[limits]\nmax_block_duration = \"200years\"",
                "max_block_duration",
            ),
            (
                "[limits]\nblock_duration = \"500000000years\"",
                "block_duration",
            ),
            (
                "[smtp]\nmax_message_size = \"18446744073709551615\"",
                "max_message_size",
            ),
        ] {
            let error = Config::from_toml(text).expect_err(text).to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
        let longest = format!(
            "[limits]\nmax_block_duration = \"{}\"",
            format_duration(MAX_DURATION)
        );
        let config = Config::from_toml(&longest).expect("the longest duration is taken");
        let again = Config::from_toml(&config.to_toml().expect("written back")).expect("read back");
        assert_eq!(again.limits.max_block_duration, MAX_DURATION);
    }

    #[test]
    fn bad_enum_values_are_refused() {
        for (text, key) in [
            ("mode = \"Enforce\"", "mode"),
            ("[[listen]]\ntls = \"ssl\"", "tls"),
            ("[backend]\nidentity = \"proxy_v2\"", "identity"),
            ("[kernel]\nmode = \"on\"", "mode"),
            ("[kernel]\nattach = \"xdpgeneric\"", "attach"),
            ("[filters]\non_failure = \"open\"", "on_failure"),
        ] {
            let message = parse_err(text);
            assert!(
                message.contains(key) && message.contains("unknown variant"),
                "{text}: {message}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        for (text, key) in [
            ("modes = \"enforce\"", "modes"),
            ("[[listen]]\naddres = \"127.0.0.1:25\"", "addres"),
            (
                "[tls]\ncertificate = \"/c\"\nkey = \"/k\"\nchain = \"/x\"",
                "chain",
            ),
            ("[backend]\ntimeout = \"1s\"", "timeout"),
            ("[kernel]\ninterface = [\"eth0\"]", "interface"),
            ("[kernel.map_sizes]\nblocks = 5", "blocks"),
            ("[limits]\nblok_duration = \"1m\"", "blok_duration"),
            (
                "[[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 1\nmax = 2",
                "max",
            ),
            (
                "[[limits.helo]]\npattern = \"x\"\nmax_connections = 1\nlimit = 2",
                "limit",
            ),
            ("[relay]\nrecipients = \"*\"", "recipients"),
            ("[lists]\ndeny = []", "deny"),
            ("[recipients]\nfile = \"/x\"", "file"),
            (
                "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\nscope = \"sub\"",
                "scope",
            ),
            ("[filters]\nspamassassin = 1", "spamassassin"),
            (
                "[filters.rspamd]\nurl = \"http://x\"\npassword = \"p\"",
                "password",
            ),
            ("[filters.clamav]\naddress = \"/s\"\nport = 1", "port"),
            ("[control]\npath = \"/x\"", "path"),
            ("[metrics]\nlisten = \"127.0.0.1:1\"", "listen"),
            ("[state]\ndir = \"/x\"", "dir"),
            ("[nope]", "nope"),
        ] {
            let message = parse_err(text);
            assert!(
                message.contains(&format!("unknown field `{key}`")),
                "{text}: {message}"
            );
        }
    }

    #[test]
    fn validation_rules_name_the_key() {
        let source2 = "[[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 1\n\
                       [[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 2";
        let ldap = "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\n";
        let ports17 = format!(
            "[kernel]\nports = [{}]",
            (1..=17)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        for (text, key) in [
            ("[limits]\nipv6_prefix = 0", "limits.ipv6_prefix"),
            ("[limits]\nipv6_prefix = 129", "limits.ipv6_prefix"),
            ("[kernel]\nports = []", "kernel.ports"),
            (ports17.as_str(), "kernel.ports"),
            ("[kernel]\nports = [25, 0]", "kernel.ports"),
            ("[kernel]\nports = [25, 587, 25]", "kernel.ports"),
            ("[kernel]\ninterfaces = [\"\"]", "kernel.interfaces[0]"),
            ("[kernel]\ninterfaces = [\"eth0\", \"averyveryverylongname\"]", "kernel.interfaces[1]"),
            ("[kernel]\ninterfaces = [\"eth0\", \"eth0\"]", "kernel.interfaces[1]"),
            ("[kernel.map_sizes]\nblock = 0", "kernel.map_sizes.block"),
            ("[kernel.map_sizes]\nblock_net = 0", "kernel.map_sizes.block_net"),
            ("[kernel.map_sizes]\nallow = 0", "kernel.map_sizes.allow"),
            ("[kernel.map_sizes]\ncap_net = 0", "kernel.map_sizes.cap_net"),
            ("[kernel.map_sizes]\nconn_count = 0", "kernel.map_sizes.conn_count"),
            ("[kernel.map_sizes]\nconn_socks = 0", "kernel.map_sizes.conn_socks"),
            ("[limits]\nblock_backoff = 0.5", "limits.block_backoff"),
            ("[limits]\nblock_backoff = nan", "limits.block_backoff"),
            ("[limits]\nblock_backoff = inf", "limits.block_backoff"),
            ("[limits]\nblock_duration = \"2h\"\nmax_block_duration = \"1h\"", "limits.max_block_duration"),
            ("[limits]\nblock_duration = \"0s\"", "limits.block_duration"),
            ("[limits]\nfailed_auth_window = \"0s\"", "limits.failed_auth_window"),
            ("[limits]\nfailed_rcpt_window = \"0s\"", "limits.failed_rcpt_window"),
            ("[smtp]\nwrite_timeout = \"0s\"", "smtp.write_timeout"),
            ("[smtp]\nmax_sessions = 0", "smtp.max_sessions"),
            ("[smtp]\nmax_commands_before_mail = 0", "smtp.max_commands_before_mail"),
            ("[smtp]\nstress_threshold = 0.0", "smtp.stress_threshold"),
            ("[smtp]\nstress_threshold = 1.5", "smtp.stress_threshold"),
            ("[smtp]\nstress_threshold = nan", "smtp.stress_threshold"),
            ("[smtp]\nstress_command_timeout = \"0s\"", "smtp.stress_command_timeout"),
            ("[backend]\nmax_connections = 0", "backend.max_connections"),
            ("[backend]\nslot_wait = \"0s\"", "backend.slot_wait"),
            ("[backend]\nprobe_interval = \"0s\"", "backend.probe_interval"),
            ("[backend]\nfair_share_prefix_v4 = 0", "backend.fair_share_prefix_v4"),
            ("[backend]\nfair_share_prefix_v4 = 33", "backend.fair_share_prefix_v4"),
            ("[backend]\nfair_share_prefix_v6 = 129", "backend.fair_share_prefix_v6"),
            ("[smtp]\nrelay_verbs = [\"\"]", "smtp.relay_verbs[0]"),
            ("[smtp]\nrelay_verbs = [\"X EXPS\"]", "smtp.relay_verbs[0]"),
            ("[smtp]\nrelay_verbs = [\"-X\"]", "smtp.relay_verbs[0]"),
            ("[smtp]\nrelay_verbs = [\"ETRN\", \"RCPT\"]", "smtp.relay_verbs[1]"),
            ("[smtp]\nrelay_verbs = [\"xclient\"]", "smtp.relay_verbs[0]"),
            ("[smtp]\nrelay_verbs = [\"ETRN\", \"etrn\"]", "smtp.relay_verbs[1]"),
            ("[smtp]\nrelay_verbs = [\"ETRN\\r\\nRCPT\"]", "smtp.relay_verbs[0]"),
            ("[limits]\nnull_sender_rate = \"0/1m\"", "limits.null_sender_rate"),
            ("[limits]\nnull_sender_rate = \"5/0s\"", "limits.null_sender_rate"),
            (source2, "limits.source[1].cidr"),
            ("[[limits.helo]]\npattern = \" \"\nmax_connections = 1", "limits.helo[0].pattern"),
            ("[lists]\nreject_helo = [\"\"]", "lists.reject_helo[0]"),
            ("listen = []", "listen"),
            ("[[listen]]\ntls = \"starttls\"", "listen[0].tls"),
            ("[[listen]]\naddress = \"127.0.0.1:25\"\n[[listen]]\naddress = \"127.0.0.1:465\"\ntls = \"implicit\"", "listen[1].tls"),
            ("[[listen]]\naddress = \"127.0.0.1:25\"\n[[listen]]\naddress = \"127.0.0.1:25\"", "listen[1].address"),
            ("[[listen]]\naddress = \"127.0.0.1:2525\"", "listen[0].address"),
            ("[backend]\nconnect_timeout = \"0s\"", "backend.connect_timeout"),
            ("[recipients.ldap]\nurl = \"http://x\"\nbase_dn = \"dc=x\"", "recipients.ldap.url"),
            (&format!("{ldap}password = \"p\"\npassword_file = \"/p\"\nbind_dn = \"cn=x\""), "recipients.ldap.password"),
            (&format!("{ldap}bind_dn = \"cn=x\""), "recipients.ldap.bind_dn"),
            (&format!("{ldap}password = \"p\""), "recipients.ldap.bind_dn"),
            ("[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"\"", "recipients.ldap.base_dn"),
            (&format!("{ldap}attributes = []"), "recipients.ldap.attributes"),
            (&format!("{ldap}refresh = \"0s\""), "recipients.ldap.refresh"),
            ("[filters]\ntimeout = \"0s\"", "filters.timeout"),
            ("[filters]\nmax_size = 0", "filters.max_size"),
            ("[filters.rspamd]\nurl = \"127.0.0.1:11333\"", "filters.rspamd.url"),
            ("[filters.rspamd]\nurl = \"https://rspamd:11333\"", "filters.rspamd.url"),
            ("[filters.clamav]\naddress = \"\"", "filters.clamav.address"),
            ("[filters.clamav]\naddress = \"/s\"\nstream_max_length = 0", "filters.clamav.stream_max_length"),
            ("[filters]\nreject_window = \"0s\"", "filters.reject_window"),
            ("[filters]\nmax_held = \"1MB\"", "filters.max_held"),
        ] {
            let (got, reason) = invalid_key(text);
            assert_eq!(got, key, "{text}: {reason}");
            let message = Config::from_toml(text).unwrap_err().to_string();
            assert!(message.starts_with(&format!("{key}: ")), "{message}");
        }
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
    fn what_is_allowed_stays_allowed() {
        for text in [
            "[kernel]\nmode = \"required\"\ninterfaces = []",
            "[limits]\nipv6_prefix = 128",
            "[limits]\nipv6_prefix = 1",
            "[limits]\nblock_backoff = 1.0",
            "[limits]\nblock_duration = \"1h\"\nmax_block_duration = \"1h\"",
            "[limits]\nmax_connections_per_source = 0",
            "[kernel]\nports = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]",
            "[[listen]]\naddress = \"127.0.0.1:0\"",
            "[recipients.ldap]\nurl = \"LDAPS://dc.example:636\"\nbase_dn = \"dc=x\"",
            "[[limits.source]]\ncidr = \"192.0.2.0/24\"\nmax_connections = 1\n\
             [[limits.source]]\ncidr = \"192.0.2.0/25\"\nmax_connections = 2",
        ] {
            if let Err(e) = Config::from_toml(text) {
                panic!("{text}: {e}");
            }
        }
    }

    #[test]
    fn durations_parse_and_bad_ones_name_the_key() {
        for (text, want) in [
            ("10s", 10),
            ("30m", 1800),
            ("7d", 7 * 86_400),
            ("1h 30m", 5400),
            ("2days", 2 * 86_400),
        ] {
            let config = Config::from_toml(&format!(
                "[limits]\nblock_duration = \"{text}\"\nmax_block_duration = \"30d\""
            ))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(config.limits.block_duration, Duration::from_secs(want));
        }
        for (text, key) in [
            ("[limits]\nblock_duration = \"soon\"", "block_duration"),
            ("[limits]\nblock_duration = 30", "block_duration"),
            (
                "[limits]\nfailed_auth_window = \"10\"",
                "failed_auth_window",
            ),
            ("[backend]\nconnect_timeout = \"-1s\"", "connect_timeout"),
            (
                "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"x\"\nrefresh = \"often\"",
                "refresh",
            ),
            ("[filters]\ntimeout = \"\"", "timeout"),
        ] {
            let message = parse_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn duration_formatting_round_trips() {
        for (secs, nanos, want) in [
            (0, 0, "0s"),
            (10, 0, "10s"),
            (90, 0, "90s"),
            (1800, 0, "30m"),
            (5400, 0, "90m"),
            (3600, 0, "1h"),
            (7 * 86_400, 0, "7d"),
            (1, 500_000_000, "1500ms"),
            (0, 1, "1ns"),
        ] {
            let d = Duration::new(secs, nanos);
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want).unwrap(), d);
        }
    }

    #[test]
    fn sizes_parse_and_bad_ones_name_the_key() {
        for (text, want) in [
            ("\"25MB\"", 25_000_000),
            ("\"25 MB\"", 25_000_000),
            ("\"10mb\"", 10_000_000),
            ("\"1B\"", 1),
            ("\"2KB\"", 2_000),
            ("\"3GB\"", 3_000_000_000),
            ("\"1TB\"", 1_000_000_000_000),
            ("\"2KiB\"", 2_048),
            ("\"10MiB\"", 10 * 1024 * 1024),
            ("\"1GiB\"", 1 << 30),
            ("\"1TiB\"", 1 << 40),
            ("\"4096\"", 4_096),
            ("4096", 4_096),
        ] {
            let config = Config::from_toml(&format!(
                "[filters]\nmax_size = {text}\nmax_held = \"1000TB\""
            ))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(config.filters.max_size, want, "{text}");
        }
        for text in [
            "\"25 M\"",
            "\"MB\"",
            "\"-1MB\"",
            "-1",
            "\"1.5MB\"",
            "\"99999999999999TB\"",
            "true",
            "\"\"",
        ] {
            let message = parse_err(&format!("[filters]\nmax_size = {text}"));
            assert!(message.contains("max_size"), "{text}: {message}");
        }
    }

    #[test]
    fn rates_parse_and_bad_ones_name_the_key() {
        for (text, count, per) in [
            ("20/1m", 20, 60),
            ("5/10s", 5, 10),
            ("100/h", 100, 3600),
            ("1 / 1d", 1, 86_400),
        ] {
            let config = Config::from_toml(&format!("[limits]\nnull_sender_rate = \"{text}\""))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                config.limits.null_sender_rate,
                Rate {
                    count,
                    per: Duration::from_secs(per)
                }
            );
        }
        assert_eq!(
            Rate {
                count: 20,
                per: Duration::from_secs(60)
            }
            .to_string(),
            "20/1m"
        );
        for text in [
            "\"20\"",
            "\"x/1m\"",
            "\"20/soon\"",
            "\"-1/1m\"",
            "\"20/\"",
            "20",
        ] {
            let message = parse_err(&format!("[limits]\nnull_sender_rate = {text}"));
            assert!(message.contains("null_sender_rate"), "{text}: {message}");
        }
    }

    #[test]
    fn cidr_lists_accept_networks_and_bare_addresses() {
        let config = Config::from_toml(
            "[lists]\nallow = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::1\", \"2001:db8:1::/48\"]\n\
             [[limits.source]]\ncidr = \"198.51.100.9\"\nmax_connections = 3",
        )
        .unwrap();
        let want: Vec<IpNet> = [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "2001:db8::1/128",
            "2001:db8:1::/48",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(config.lists.allow, want);
        assert_eq!(
            config.limits.source[0].cidr,
            "198.51.100.9/32".parse::<IpNet>().unwrap()
        );
        for (text, key) in [
            ("[lists]\nallow = [\"10.0.0.0/33\"]", "allow"),
            ("[lists]\nreject = [\"example.com\"]", "reject"),
            ("[lists]\nreject = [\"192.0.2.7/24\"]", "reject"),
            ("[lists]\nreject = [42]", "reject"),
            (
                "[[limits.source]]\ncidr = \"300.0.0.0/8\"\nmax_connections = 1",
                "cidr",
            ),
        ] {
            let message = parse_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn addresses_must_be_socket_addresses() {
        for (text, key) in [
            ("[[listen]]\naddress = \"127.0.0.1\"", "address"),
            ("[backend]\naddress = \"localhost:25\"", "address"),
            ("[metrics]\naddress = \"9425\"", "address"),
        ] {
            let message = parse_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn relay_patterns_split_on_blanks() {
        let relay = Relay {
            accept: " *@example.com\tpostmaster@*  a?b@x ".to_owned(),
        };
        assert_eq!(relay.patterns(), ["*@example.com", "postmaster@*", "a?b@x"]);
        assert!(Relay::default().patterns().is_empty());
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
