//! What the policy answers: verdicts, rejections with their reasons, and
//! block orders. Plain values; the proxy turns them into replies, kernel
//! blocks, log events and metrics.

use std::fmt;
use std::time::Duration;

use ipnet::IpNet;

use super::state::{ConnectionGuard, HeloGuard};

/// A verdict together with whether it is to be applied.
///
/// In `mode = "observe"` the policy decides exactly as in `"enforce"` (and
/// keeps the same counters), but every decision comes back with `enforced:
/// false`: the proxy logs what it *would* have done (`action = "would-reject"`)
/// and carries on as if the verdict had been an accept.
#[derive(Debug)]
#[must_use]
pub struct Decision<T> {
    /// What the policy decided.
    pub verdict: T,
    /// `true` in `mode = "enforce"`; `false` in `mode = "observe"`, where the
    /// verdict is only reported.
    pub enforced: bool,
}

impl<T> Decision<T> {
    /// The same decision with its verdict transformed.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Decision<U> {
        Decision {
            verdict: f(self.verdict),
            enforced: self.enforced,
        }
    }
}

/// What the proxy does with a refused command or session. The reply texts
/// are the proxy's; the codes in the docs are the conventional ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Refuse this command (or transaction) temporarily, keep the session:
    /// `450 4.7.1`.
    DeferCommand,
    /// Refuse this command permanently, keep the session: `550 5.7.1`.
    RefuseCommand,
    /// Say `421 4.7.0` and close the session; the client may retry later.
    DeferAndClose,
    /// Refuse permanently and close the session: `554 5.7.1` (at connect, the
    /// RFC 5321 "no SMTP service here" greeting).
    RefuseAndClose,
}

impl Action {
    /// Whether the session ends after the reply.
    #[must_use]
    pub const fn closes(self) -> bool {
        matches!(self, Self::DeferAndClose | Self::RefuseAndClose)
    }

    /// Whether the reply is permanent (5xx) rather than temporary (4xx).
    #[must_use]
    pub const fn is_permanent(self) -> bool {
        matches!(self, Self::RefuseCommand | Self::RefuseAndClose)
    }
}

/// Which counter a null-sender rate limit was exceeded on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RateScope {
    /// The source (IPv4 address or IPv6 prefix).
    Source,
    /// The HELO/EHLO name the session announced (lower-cased).
    Helo(String),
    /// The source's network (`network_ipv4_prefix`, `network_ipv6_prefix`).
    Network(IpNet),
    /// One recipient, from every source (its key: lower case, extension
    /// cut).
    Recipient(String),
}

/// Why something was refused. [`Reason::name`] is the stable label for logs
/// and metrics; the fields are what the proxy needs to explain it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The source is inside `lists.reject`. The agent loads that list into
    /// the kernel at start (permanent drop), so no block order comes with it.
    RejectList {
        /// The listed network that matched.
        net: IpNet,
    },
    /// The source already holds its cap of simultaneous connections.
    TooManyConnections {
        /// Connections the source holds already (without this one).
        count: u32,
        /// Its cap (`limits.source` override or `max_connections_per_source`).
        limit: u32,
    },
    /// New connections over `limits.connection_rate`.
    ConnectionRate {
        /// Connections in the source's bucket, this one included.
        count: u32,
        /// The configured count per period.
        limit: u32,
        /// The period.
        per: Duration,
    },
    /// New connections from all the sources of one network over
    /// `limits.connection_rate_per_network`.
    ConnectionRateFromNetwork {
        /// The network (`network_ipv4_prefix`, `network_ipv6_prefix`).
        network: IpNet,
        /// Connections in the network's bucket, this one included.
        count: u32,
        /// The configured count per period.
        limit: u32,
        /// The period.
        per: Duration,
    },
    /// A table of live sessions is full ([`PolicyState`](super::PolicyState)
    /// capacity): a new source or HELO name cannot be counted, and counting
    /// must stay exact, so it is refused for now.
    StateFull {
        /// Which table: `"connections"` or `"helo-sessions"`.
        table: &'static str,
        /// Its capacity.
        capacity: usize,
    },
    /// The HELO/EHLO name matches `lists.reject_helo`.
    HeloRejected {
        /// The pattern that matched, as written.
        pattern: String,
    },
    /// Sessions announcing this HELO/EHLO name are at their cap.
    TooManyForHelo {
        /// The name, lower-cased.
        helo: String,
        /// Sessions holding the name already (without this one).
        count: u32,
        /// The cap of the first `limits.helo` pattern it matched.
        limit: u32,
    },
    /// Null-sender (`MAIL FROM:<>`) messages over `limits.null_sender_rate`.
    NullSenderRate {
        /// Which counter went over.
        scope: RateScope,
        /// Null-sender MAILs counted in the window, this one included.
        count: u32,
        /// The configured count per window.
        limit: u32,
        /// The window.
        per: Duration,
    },
    /// The recipient matches no `relay.accept` pattern.
    RelayDenied,
    /// Failed RCPTs in the session went past `max_failed_rcpt`.
    Harvest {
        /// Failed RCPTs in a row (since the last successful one).
        failed: u32,
        /// `max_failed_rcpt`.
        limit: u32,
    },
    /// Failed RCPTs from the source, across sessions, went past
    /// `max_failed_rcpt_per_source` within `failed_rcpt_window`.
    HarvestAcrossSessions {
        /// Failures counted in the window, this one included.
        failed: u32,
        /// `max_failed_rcpt_per_source`.
        limit: u32,
        /// `failed_rcpt_window`.
        window: Duration,
    },
    /// Failed RCPTs from the source within `failed_rcpt_window` went past
    /// `max_failed_rcpt_under_harvest` while the host was past
    /// `max_failed_rcpt_per_host` (a harvest spread over many networks), and
    /// the source had not delivered mail within the hour.
    HostHarvested {
        /// The source's failures in the window, this one included.
        failed: u32,
        /// `max_failed_rcpt_under_harvest`.
        limit: u32,
        /// Failures from all sources in the window (kept up to one past
        /// `max_failed_rcpt_per_host`).
        host_failed: u32,
        /// `failed_rcpt_window`.
        window: Duration,
    },
    /// Refused credentials from the source within `failed_auth_window` went
    /// past `max_failed_auth_under_spray` while the host was past
    /// `max_failed_auth_per_host` (a password spray over many networks),
    /// and the source had not logged in as the account lately.
    HostSprayed {
        /// The source's failures in the window, this one included.
        failures: u32,
        /// `max_failed_auth_under_spray`.
        limit: u32,
        /// Refused credentials from all sources in the window (kept up to
        /// one past `max_failed_auth_per_host`).
        host_failures: u32,
        /// `failed_auth_window`.
        window: Duration,
    },
    /// Failed RCPTs from all the sources of one network went past
    /// `max_failed_rcpt_per_network` within `failed_rcpt_window`: the
    /// network is blocked.
    HarvestFromNetwork {
        /// The network ([`super::Policy::source_network`]).
        network: IpNet,
        /// Failures counted in the window, this one included.
        failed: u32,
        /// `max_failed_rcpt_per_network`.
        limit: u32,
        /// `failed_rcpt_window`.
        window: Duration,
    },
    /// Refused credentials from all the sources of one network went past
    /// `max_failed_auth_per_network` within `failed_auth_window`: the
    /// network is blocked.
    AuthFailuresFromNetwork {
        /// The network ([`super::Policy::source_network`]).
        network: IpNet,
        /// Failures counted in the window, this one included.
        failures: u32,
        /// `max_failed_auth_per_network`.
        limit: u32,
        /// `failed_auth_window`.
        window: Duration,
    },
    /// Failed AUTH (535) from the source went past `max_failed_auth` within
    /// `failed_auth_window`.
    AuthFailures {
        /// Failures counted in the window, this one included.
        failures: u32,
        /// `max_failed_auth`.
        limit: u32,
        /// `failed_auth_window`.
        window: Duration,
    },
    /// AUTH for an account past `max_failed_auth_per_account` refused
    /// credentials within `failed_auth_window` (from every source), from a
    /// source that has not logged in as it lately: refused unheard.
    AccountLocked {
        /// The account, lower-cased (as the client sent it: log it escaped).
        account: String,
        /// Refused credentials for it in the window.
        failures: u32,
        /// `max_failed_auth_per_account`.
        limit: u32,
        /// `failed_auth_window`.
        window: Duration,
    },
    /// Sessions of the source closed under pressure went past
    /// `max_shed_sessions_per_source` within `shed_sessions_window`.
    ShedSessions {
        /// Sessions shed in the window, this one included.
        sheds: u32,
        /// `max_shed_sessions_per_source`.
        limit: u32,
        /// `shed_sessions_window`.
        window: Duration,
    },
    /// Messages rejected by the content filters (virus, spam) from the
    /// source reached `filters.max_rejects` within `filters.reject_window`.
    FilterRejects {
        /// Rejects counted in the window, this one included.
        rejects: u32,
        /// `filters.max_rejects`.
        limit: u32,
        /// `filters.reject_window`.
        window: Duration,
    },
}

impl Reason {
    /// A stable lower-case name for logs and metric labels.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::RejectList { .. } => "reject-list",
            Self::TooManyConnections { .. } => "too-many-connections",
            Self::ConnectionRate { .. } => "connection-rate",
            Self::ConnectionRateFromNetwork { .. } => "connection-rate-network",
            Self::StateFull { .. } => "state-full",
            Self::HeloRejected { .. } => "helo-reject",
            Self::TooManyForHelo { .. } => "helo-limit",
            Self::NullSenderRate { .. } => "null-sender-rate",
            Self::RelayDenied => "relay-denied",
            Self::Harvest { .. } => "harvest",
            Self::HarvestAcrossSessions { .. } => "harvest-source",
            Self::HostHarvested { .. } => "harvest-host",
            Self::HarvestFromNetwork { .. } => "harvest-network",
            Self::AuthFailures { .. } => "auth",
            Self::AuthFailuresFromNetwork { .. } => "auth-network",
            Self::HostSprayed { .. } => "auth-host",
            Self::AccountLocked { .. } => "auth-account",
            Self::FilterRejects { .. } => "filter",
            Self::ShedSessions { .. } => "shed-sessions",
        }
    }

    /// The origin a block for this reason carries, for the reasons that
    /// block.
    #[must_use]
    pub const fn block_origin(&self) -> Option<limiter_common::Reason> {
        use limiter_common::Reason as Origin;
        match self {
            Self::RejectList { .. } => Some(Origin::RejectList),
            Self::NullSenderRate { .. }
            | Self::ShedSessions { .. }
            | Self::ConnectionRate { .. }
            | Self::ConnectionRateFromNetwork { .. } => Some(Origin::Flood),
            Self::Harvest { .. }
            | Self::HarvestAcrossSessions { .. }
            | Self::HostHarvested { .. }
            | Self::HarvestFromNetwork { .. } => Some(Origin::Harvest),
            Self::AuthFailures { .. }
            | Self::AuthFailuresFromNetwork { .. }
            | Self::HostSprayed { .. } => Some(Origin::Auth),
            Self::FilterRejects { .. } => Some(Origin::Filter),
            Self::TooManyConnections { .. }
            | Self::StateFull { .. }
            | Self::HeloRejected { .. }
            | Self::TooManyForHelo { .. }
            | Self::RelayDenied
            | Self::AccountLocked { .. } => None,
        }
    }
}

impl fmt::Display for Reason {
    /// A short English explanation for logs (not a reply text).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RejectList { net } => write!(f, "source is on the reject list ({net})"),
            Self::TooManyConnections { count, limit } => {
                write!(f, "source holds {count} connections, its limit is {limit}")
            }
            Self::ConnectionRate { count, limit, per } => write!(
                f,
                "{count} connections within {per:?}, the limit is {limit}"
            ),
            Self::ConnectionRateFromNetwork {
                network,
                count,
                limit,
                per,
            } => write!(
                f,
                "{count} connections from network {network} within {per:?}, the limit is {limit}"
            ),
            Self::StateFull { table, capacity } => {
                write!(f, "the {table} table is full ({capacity} entries)")
            }
            Self::HeloRejected { pattern } => {
                write!(f, "HELO name matches reject pattern {pattern:?}")
            }
            Self::TooManyForHelo { helo, count, limit } => write!(
                f,
                "{count} sessions announce HELO {helo:?}, its limit is {limit}"
            ),
            Self::NullSenderRate {
                scope,
                count,
                limit,
                per,
            } => {
                let scope = match scope {
                    RateScope::Source => "from the source".to_owned(),
                    RateScope::Helo(helo) => format!("from HELO {helo:?}"),
                    RateScope::Network(net) => format!("from network {net}"),
                    RateScope::Recipient(rcpt) => format!("to {rcpt:?}"),
                };
                write!(
                    f,
                    "{count} null-sender messages {scope} within {per:?}, the limit is {limit}"
                )
            }
            Self::RelayDenied => f.write_str("recipient matches no relay.accept pattern"),
            Self::Harvest { failed, limit } => {
                write!(
                    f,
                    "{failed} failed recipients in a row, the limit is {limit}"
                )
            }
            Self::HarvestAcrossSessions {
                failed,
                limit,
                window,
            } => write!(
                f,
                "{failed} failed recipients within {window:?} across sessions, the limit is {limit}"
            ),
            Self::HostHarvested {
                failed,
                limit,
                host_failed,
                window,
            } => write!(
                f,
                "{failed} failed recipients within {window:?} from a source that has not delivered lately, while the host is harvested ({host_failed} from all sources), the limit is {limit}"
            ),
            Self::HostSprayed {
                failures,
                limit,
                host_failures,
                window,
            } => write!(
                f,
                "{failures} failed AUTH within {window:?} from a source that has not logged in as the account lately, while the host is under a password spray ({host_failures} from all sources), the limit is {limit}"
            ),
            Self::AuthFailures {
                failures,
                limit,
                window,
            } => write!(
                f,
                "{failures} failed AUTH within {window:?}, the limit is {limit}"
            ),
            Self::HarvestFromNetwork {
                network,
                failed,
                limit,
                window,
            } => write!(
                f,
                "{failed} failed recipients from network {network} within {window:?}, the limit is {limit}"
            ),
            Self::AuthFailuresFromNetwork {
                network,
                failures,
                limit,
                window,
            } => write!(
                f,
                "{failures} failed AUTH from network {network} within {window:?}, the limit is {limit}"
            ),
            Self::AccountLocked {
                account,
                failures,
                limit,
                window,
            } => write!(
                f,
                "{failures} failed AUTH for account {account:?} within {window:?}, the limit is {limit}; refused from a source it has not logged in from"
            ),
            Self::ShedSessions {
                sheds,
                limit,
                window,
            } => write!(
                f,
                "{sheds} sessions closed under pressure before MAIL within {window:?}, the limit is {limit}"
            ),
            Self::FilterRejects {
                rejects,
                limit,
                window,
            } => write!(
                f,
                "{rejects} messages rejected by the content filters within {window:?}, the limit is {limit}"
            ),
        }
    }
}

/// A block to push into the kernel (and the proxy's own block list).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockOrder {
    /// What to block: the source's IPv4 /32, or its IPv6 address aggregated
    /// to `limits.ipv6_prefix`.
    pub net: IpNet,
    /// Why (harvest, auth, flood, filter).
    pub origin: limiter_common::Reason,
    /// How long: `block_duration × block_backoff^repeat`, at most
    /// `max_block_duration`.
    pub duration: Duration,
    /// Earlier blocks of this source still remembered (0 for a first block).
    pub repeat: u32,
}

/// A refusal: why, what to answer, and whether to block the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Why; [`Reason::name`] labels logs and metrics.
    pub reason: Reason,
    /// The reply to give and whether to close the session.
    pub action: Action,
    /// A block to push into the kernel, if this refusal blocks the source.
    pub block: Option<BlockOrder>,
}

impl Rejection {
    /// The stable name of the reason.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        self.reason.name()
    }
}

/// The verdict on a new connection ([`Policy::connect`](super::Policy::connect)).
#[derive(Debug)]
pub enum ConnectVerdict {
    /// `lists.allow`: exempt from every limit; the guard counts nothing.
    Allowlisted(ConnectionGuard),
    /// Within every limit; the guard holds the connection's place in the
    /// per-source count until it is dropped.
    Accept(ConnectionGuard),
    /// Refused.
    Reject {
        /// Why and how.
        rejection: Rejection,
        /// `None` when enforced: the session ends and is not counted.
        /// `Some` in observe mode, where the session goes on: the guard
        /// counts it like any other connection.
        guard: Option<ConnectionGuard>,
    },
}

impl ConnectVerdict {
    /// The guard the session keeps, if it goes on.
    #[must_use]
    pub fn into_guard(self) -> Option<ConnectionGuard> {
        match self {
            Self::Allowlisted(guard) | Self::Accept(guard) => Some(guard),
            Self::Reject { guard, .. } => guard,
        }
    }
}

/// The verdict on a HELO/EHLO ([`Policy::helo`](super::Policy::helo)).
#[derive(Debug)]
pub enum HeloVerdict {
    /// Accepted; the guard holds the session's place in the per-HELO count
    /// (it counts nothing for allow-listed sources and unlimited names).
    Accept(HeloGuard),
    /// Refused.
    Reject {
        /// Why and how.
        rejection: Rejection,
        /// `None` when enforced; `Some` in observe mode, where the session
        /// goes on under this name and is counted.
        guard: Option<HeloGuard>,
    },
}

impl HeloVerdict {
    /// The guard the session keeps, if it goes on.
    #[must_use]
    pub fn into_guard(self) -> Option<HeloGuard> {
        match self {
            Self::Accept(guard) => Some(guard),
            Self::Reject { guard, .. } => guard,
        }
    }
}

/// The verdict on `MAIL FROM` ([`Policy::mail_from`](super::Policy::mail_from)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailVerdict {
    /// Pass the command to the backend.
    Accept,
    /// Refused: a null-sender rate was exceeded. `action` is
    /// [`Action::DeferCommand`] (`450 4.7.1`, the session goes on), or
    /// [`Action::DeferAndClose`] with a block when the source went past twice
    /// its rate.
    Reject(Rejection),
}

/// The verdict on `RCPT TO` ([`Policy::rcpt`](super::Policy::rcpt)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptVerdict {
    /// A `relay.accept` pattern matched: ask the backend (which still decides
    /// whether the mailbox exists).
    Accept,
    /// No relay rule applies: `relay.accept` is empty, or the source is
    /// allow-listed. Ask the backend, which decides alone (it sees the real
    /// client through PROXY/XCLIENT and applies its own relay rules).
    Unchecked,
    /// Refused without asking the backend: [`Reason::RelayDenied`],
    /// `550 5.7.1`. Counts as a failed RCPT
    /// ([`Policy::rcpt_result`](super::Policy::rcpt_result) with `ok = false`).
    Reject(Rejection),
}

/// Counters that live as long as one SMTP session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Failed RCPTs since the last successful one (harvest detection).
    pub failed_rcpt: u32,
}
