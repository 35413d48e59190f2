//! Policy: what the proxy allows, refuses and blocks. Pure decisions.
//!
//! * [`Policy`] is the configuration resolved once (`Policy::new(&config)`),
//!   sorted by SMTP stage — connect, HELO, MAIL, RCPT, DATA (content filter
//!   verdicts), AUTH — and immutable: on reload the agent builds a new one and swaps it
//!   in. Sessions keep working across a swap: guards remember their own key.
//! * [`PolicyState`] holds the counters that outlive a session (live
//!   connections per source and per HELO name, failed-AUTH and null-sender
//!   windows, block history). It is internally synchronised (one
//!   `std::sync::Mutex`, held for a few hash operations per decision) and
//!   shared as `Arc<PolicyState>`; every table is bounded (100 000 keys by
//!   default, the least recently seen evicted; see [`PolicyState`]).
//! * [`SessionCounters`] are the per-session ones (failed RCPTs in a row).
//!
//! Decisions take values — the source address, the HELO name, the
//! recipient, and `now: Instant` where time matters — and return typed
//! verdicts. No I/O, no clock reads, no async: the proxy owns the sockets,
//! the reply texts, the logs and the kernel.
//!
//! | stage   | call                      | refusals (reason name)                                   |
//! |---------|---------------------------|----------------------------------------------------------|
//! | connect | [`Policy::connect`]       | `reject-list`, `too-many-connections`, `state-full`      |
//! | HELO    | [`Policy::helo`]          | `helo-reject`, `helo-limit`, `state-full`                |
//! | MAIL    | [`Policy::mail_from`]     | `null-sender-rate` (+ block when twice over)             |
//! | RCPT    | [`Policy::rcpt`]          | `relay-denied`                                           |
//! | RCPT    | [`Policy::rcpt_result`]   | `harvest` (+ block)                                      |
//! | AUTH    | [`Policy::auth_failed`]   | `auth` (+ block)                                         |
//! | DATA    | [`Policy::filter_rejected`] | `filter` (+ block)                                     |
//!
//! Rules that hold throughout:
//!
//! * **Sources are normalised and keyed** before anything else: an
//!   IPv4-mapped IPv6 address is its IPv4 address; IPv4 sources are counted
//!   and blocked per address (/32), IPv6 sources per `limits.ipv6_prefix`
//!   (/64 by default) — [`Policy::source_key`].
//! * **Allow-listed sources** (`lists.allow`) are exempt from everything:
//!   nothing is counted, nothing refused, nothing blocked, and the relay
//!   rules are left to the backend ([`RcptVerdict::Unchecked`]).
//! * **Observe mode** decides and counts exactly as enforce mode, but every
//!   [`Decision`] says `enforced: false`; verdicts that would end a session
//!   still hand over the guard the session keeps.
//! * **Thresholds are "more than"**: the harvest verdict comes at failed RCPT
//!   number `max_failed_rcpt + 1`, the AUTH block at failure
//!   `max_failed_auth + 1` within the window, the null-sender refusal at MAIL
//!   number `count + 1` within `per`.
//! * **Blocks back off**: `block_duration × block_backoff^repeat`, capped at
//!   `max_block_duration` ([`Policy::block_duration`], [`PolicyState::block`]).
//!
//! Null-sender escalation, defined simply: every `MAIL FROM:<>` from a source
//! is counted in its window (refused ones too, so a client that keeps trying
//! stays refused). Past `count` the MAIL gets `450 4.7.1`; past `2 × count`
//! in the same window the source is blocked (reason `flood`) and the
//! session closed with `421`. The per-HELO counter (the same rate, shared
//! by every source announcing the name) only ever refuses with `450`: a name
//! is not an address to block. So does the per-network counter
//! (`null_sender_rate_per_network`, every source of the network): its
//! legitimate servers send bounces too.
//!
//! Relay rules with an empty `relay.accept`: the proxy checks nothing and
//! lets the backend decide every recipient ([`RcptVerdict::Unchecked`]). The
//! proxy is still not an open relay, because the backend sees the real client
//! (PROXY/XCLIENT) and applies its own relay restrictions — but it no longer
//! refuses unknown domains itself. (`config.rs` documents an empty list as
//! "accepts no recipient"; this module deliberately does not refuse every
//! recipient, which would make an empty setting a mail outage.)

mod pattern;
mod state;
mod table;
mod verdict;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{Config, Mode, Rate};
use crate::recipients::Folding;
use table::Bucket;

pub use pattern::{Pattern, PatternList};
pub use state::{
    ConnectionGuard, CountKind, CountSink, Counted, HeloGuard, PolicyState, TableSizes,
    DEFAULT_CAPACITY,
};
pub use verdict::{
    Action, BlockOrder, ConnectVerdict, Decision, HeloVerdict, MailVerdict, RateScope, RcptVerdict,
    Reason, Rejection, SessionCounters,
};

/// The configuration resolved for decisions, by stage. Immutable; build a
/// new one on reload.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Whether decisions are enforced or only reported.
    mode: Mode,
    /// `lists.allow` and `lists.allow_files`, canonical: exempt at every stage.
    allow: crate::lists::NetSet,
    connect: ConnectRules,
    helo: HeloRules,
    mail: MailRules,
    rcpt: RcptRules,
    auth: AuthRules,
    filters: FilterRules,
    shed: ShedRules,
    blocks: BlockRules,
}

/// Connect stage.
#[derive(Clone, Debug)]
struct ConnectRules {
    /// `lists.reject` and `lists.reject_files`, canonical.
    reject: crate::lists::NetSet,
    /// `limits.source`, canonical, most specific (longest prefix) first.
    source_caps: Vec<(IpNet, u32)>,
    /// `max_connections_per_source`; 0 = unlimited.
    default_cap: u32,
    /// `connection_rate`; a count of 0 = off.
    connection_rate: Rate,
    /// `connection_rate_per_network`, per [`Policy::source_network`]; a
    /// count of 0 = off.
    connection_rate_per_network: Rate,
    /// `ipv6_prefix`: IPv6 sources are keyed by this prefix.
    ipv6_prefix: u8,
    /// `network_ipv4_prefix`: the network of an IPv4 source.
    network_ipv4_prefix: u8,
    /// `network_ipv6_prefix`, at most `ipv6_prefix`: the network of an
    /// IPv6 source.
    network_ipv6_prefix: u8,
}

/// HELO stage.
#[derive(Clone, Debug)]
struct HeloRules {
    /// `lists.reject_helo`.
    reject: PatternList,
    /// `lists.allow_helo`: exempt from HELO limits and null-sender rates.
    allow: PatternList,
    /// `limits.helo_default`: the cap of names no rule matches; 0 = none.
    default_cap: u32,
    /// `limits.helo`, in order (the first match wins); 0 = unlimited.
    limits: Vec<(Pattern, u32)>,
}

/// MAIL stage.
#[derive(Clone, Debug)]
struct MailRules {
    /// `null_sender_rate`, per source and per HELO name.
    null_sender_rate: Rate,
    /// `null_sender_rate_per_network`, per [`Policy::source_network`];
    /// a count of 0 = off.
    null_sender_rate_per_network: Rate,
    /// `null_sender_rate_per_recipient`, per [`Policy::recipient_key`];
    /// a count of 0 = off.
    null_sender_rate_per_recipient: Rate,
    /// How recipients become the keys of that rate: local parts folded to
    /// lower case, extensions cut at `+` and at the directory's
    /// `recipient_delimiter`.
    recipient_folding: Folding,
}

/// RCPT stage.
#[derive(Clone, Debug)]
struct RcptRules {
    /// `relay.accept`; empty = the backend decides alone.
    relay: PatternList,
    /// `max_failed_rcpt`: per session, reset by a success.
    max_failed_rcpt: u32,
    /// `max_failed_rcpt_per_source`: across sessions; 0 = off.
    max_failed_rcpt_per_source: u32,
    /// `failed_rcpt_window`.
    failed_rcpt_window: Duration,
    /// `max_failed_rcpt_per_network`: all sources of a network; 0 = off.
    max_failed_rcpt_per_network: u32,
    /// `max_failed_rcpt_per_host`: all sources together; 0 = off.
    max_failed_rcpt_per_host: u32,
    /// `max_failed_rcpt_under_harvest`: per new source past the host's.
    max_failed_rcpt_under_harvest: u32,
}

/// AUTH stage.
#[derive(Clone, Debug)]
struct AuthRules {
    /// `max_failed_auth`.
    max_failed_auth: u32,
    /// `failed_auth_window`.
    failed_auth_window: Duration,
    /// `max_failed_auth_per_network`: all sources of a network; 0 = off.
    max_failed_auth_per_network: u32,
    /// `max_failed_auth_per_account`: all sources, one account; 0 = off.
    max_failed_auth_per_account: u32,
    /// `max_failed_auth_per_host`: all sources together; 0 = off.
    max_failed_auth_per_host: u32,
    /// `max_failed_auth_under_spray`: per unfamiliar source past the host's.
    max_failed_auth_under_spray: u32,
}

/// How long a successful login keeps its source familiar to the account:
/// a lockout ([`Policy::account_locked`]) does not refuse it.
pub const LOGIN_MEMORY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// After DATA: content filter verdicts.
#[derive(Clone, Debug)]
struct FilterRules {
    /// `filters.max_rejects`; 0 = never block.
    max_rejects: u32,
    /// `filters.reject_window`.
    reject_window: Duration,
}

/// Sessions closed under pressure (`proxy::shed`, the stress timeout,
/// `smtp.max_commands_before_mail`).
#[derive(Clone, Debug)]
struct ShedRules {
    /// `max_shed_sessions_per_source`; 0 = off.
    max_per_source: u32,
    /// `shed_sessions_window`.
    window: Duration,
}

/// Blocks ordered by any stage.
#[derive(Clone, Debug)]
struct BlockRules {
    /// `block_duration`: a first block.
    block_duration: Duration,
    /// `block_backoff`: factor per repeat (≥ 1).
    block_backoff: f64,
    /// `max_block_duration`: the cap, and how long history is remembered
    /// after a block ends.
    max_block_duration: Duration,
    /// `max_blocked_sources_per_network`; 0 = off.
    max_sources_per_network: u32,
    /// `blocked_sources_window`.
    sources_window: Duration,
}

impl From<&Config> for Policy {
    fn from(config: &Config) -> Self {
        Self::new(config)
    }
}

impl Policy {
    /// Resolves `config` (validated by [`Config::validate`]; every value it
    /// accepts works here, so this cannot fail).
    #[must_use]
    pub fn new(config: &Config) -> Self {
        let limits = &config.limits;
        let mut source_caps: Vec<(IpNet, u32)> = limits
            .source
            .iter()
            .map(|s| (canonical_net(s.cidr), s.max_connections))
            .collect();
        // Stable: equal prefixes keep their configuration order.
        source_caps.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self {
            mode: config.mode,
            allow: config.lists.allow_nets().map(canonical_net).collect(),
            connect: ConnectRules {
                reject: config.lists.reject_nets().map(canonical_net).collect(),
                source_caps,
                default_cap: limits.max_connections_per_source,
                connection_rate: limits.connection_rate,
                connection_rate_per_network: limits.connection_rate_per_network,
                ipv6_prefix: limits.ipv6_prefix.min(128),
                network_ipv4_prefix: limits.network_ipv4_prefix.min(32),
                network_ipv6_prefix: limits.network_ipv6_prefix.min(limits.ipv6_prefix).min(128),
            },
            helo: HeloRules {
                reject: PatternList::from(config.lists.reject_helo.as_slice()),
                allow: PatternList::from(config.lists.allow_helo.as_slice()),
                default_cap: limits.helo_default,
                limits: limits
                    .helo
                    .iter()
                    .map(|h| (Pattern::new(h.pattern.trim()), h.max_connections))
                    .collect(),
            },
            mail: MailRules {
                null_sender_rate: limits.null_sender_rate,
                null_sender_rate_per_network: limits.null_sender_rate_per_network,
                null_sender_rate_per_recipient: limits.null_sender_rate_per_recipient,
                recipient_folding: Folding {
                    case_sensitive_local_part: false,
                    recipient_delimiter: std::iter::once('+')
                        .chain(
                            config
                                .recipients
                                .ldap
                                .iter()
                                .flat_map(|ldap| ldap.recipient_delimiter.chars()),
                        )
                        .collect(),
                },
            },
            rcpt: RcptRules {
                relay: config.relay.patterns().into_iter().collect(),
                max_failed_rcpt: limits.max_failed_rcpt,
                max_failed_rcpt_per_source: limits.max_failed_rcpt_per_source,
                failed_rcpt_window: limits.failed_rcpt_window,
                max_failed_rcpt_per_network: limits.max_failed_rcpt_per_network,
                max_failed_rcpt_per_host: limits.max_failed_rcpt_per_host,
                max_failed_rcpt_under_harvest: limits.max_failed_rcpt_under_harvest,
            },
            auth: AuthRules {
                max_failed_auth: limits.max_failed_auth,
                failed_auth_window: limits.failed_auth_window,
                max_failed_auth_per_network: limits.max_failed_auth_per_network,
                max_failed_auth_per_account: limits.max_failed_auth_per_account,
                max_failed_auth_per_host: limits.max_failed_auth_per_host,
                max_failed_auth_under_spray: limits.max_failed_auth_under_spray,
            },
            filters: FilterRules {
                max_rejects: config.filters.max_rejects,
                reject_window: config.filters.reject_window,
            },
            shed: ShedRules {
                max_per_source: limits.max_shed_sessions_per_source,
                window: limits.shed_sessions_window,
            },
            blocks: BlockRules {
                block_duration: limits.block_duration,
                block_backoff: limits.block_backoff,
                max_block_duration: limits.max_block_duration,
                max_sources_per_network: limits.max_blocked_sources_per_network,
                sources_window: limits.blocked_sources_window,
            },
        }
    }

    // -- Lookups ------------------------------------------------------------

    /// `mode`: whether decisions are enforced.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether decisions are enforced (`mode = "enforce"`).
    #[must_use]
    pub fn enforced(&self) -> bool {
        self.mode == Mode::Enforce
    }

    /// Whether `source` is in `lists.allow` (IPv4-mapped addresses count as
    /// IPv4).
    #[must_use]
    pub fn is_allowlisted(&self, source: IpAddr) -> bool {
        let source = source.to_canonical();
        self.allow.find(source).is_some()
    }

    /// The `lists.reject` network containing `source`, if any.
    #[must_use]
    pub fn reject_listed(&self, source: IpAddr) -> Option<IpNet> {
        self.connect.reject.find(source)
    }

    /// The key `source` is counted and blocked under: its IPv4 /32, or its
    /// IPv6 address truncated to `limits.ipv6_prefix`. IPv4-mapped IPv6
    /// addresses are keyed as IPv4.
    #[must_use]
    pub fn source_key(&self, source: IpAddr) -> IpNet {
        match source.to_canonical() {
            IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
            IpAddr::V6(v6) => IpNet::V6(
                Ipv6Net::new(v6, self.connect.ipv6_prefix)
                    .map_or_else(|_| Ipv6Net::from(v6), |net| net.trunc()),
            ),
        }
    }

    /// The network `source` counts in for the `*_per_network` limits: its
    /// IPv4 address truncated to `limits.network_ipv4_prefix`, its IPv6
    /// one to `limits.network_ipv6_prefix` (never longer than its key).
    #[must_use]
    pub fn source_network(&self, source: IpAddr) -> IpNet {
        let rules = &self.connect;
        match source.to_canonical() {
            IpAddr::V4(v4) => IpNet::V4(
                Ipv4Net::new(v4, rules.network_ipv4_prefix)
                    .map_or_else(|_| Ipv4Net::from(v4), |net| net.trunc()),
            ),
            IpAddr::V6(v6) => IpNet::V6(
                Ipv6Net::new(v6, rules.network_ipv6_prefix)
                    .map_or_else(|_| Ipv6Net::from(v6), |net| net.trunc()),
            ),
        }
    }

    /// `source`'s simultaneous-connection cap: the most specific
    /// `limits.source` network containing it, else
    /// `max_connections_per_source`. `None` = unlimited (a cap of 0).
    #[must_use]
    pub fn connection_cap(&self, source: IpAddr) -> Option<u32> {
        let source = source.to_canonical();
        let cap = self
            .connect
            .source_caps
            .iter()
            .find(|(net, _)| net.contains(&source))
            .map_or(self.connect.default_cap, |&(_, cap)| cap);
        (cap != 0).then_some(cap)
    }

    /// A new connection from `source` at `now`, counted toward
    /// `limits.connection_rate` in its source key's bucket, which holds
    /// `count` connections and empties at `count` per `per` (the refused
    /// ones count too: a client that keeps coming stays refused). Past
    /// `count`: [`Reason::ConnectionRate`], `421 4.7.0`; past twice `count`,
    /// the same with the source's block (origin `flood`), the bucket
    /// emptied. The connection is counted in its network's bucket too
    /// (`limits.connection_rate_per_network`, [`Self::source_network`]),
    /// the same way: [`Reason::ConnectionRateFromNetwork`], and past twice
    /// its count the network's block: the loop spread over the addresses of
    /// a /24 (or the /64s of a /48), each under its own rate. Allow-listed
    /// sources are not counted; a count of 0 is off.
    /// Asked at accept, before [`Self::connect`]: a connect-and-hang-up
    /// loop, each connection within the source's cap, costs a session
    /// each time until it is blocked.
    pub fn connection_rate(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let (rate, network_rate) = (
            self.connect.connection_rate,
            self.connect.connection_rate_per_network,
        );
        let source = source.to_canonical();
        if rate.count == 0 && network_rate.count == 0 || self.is_allowlisted(source) {
            return None;
        }
        let (key, network) = (self.source_key(source), self.source_network(source));
        let rejection = state.with(|tables| {
            let by_source = (rate.count > 0).then(|| {
                tables
                    .connection_rate
                    .touch(&key, || Bucket::new(now))
                    .add(now, rate.count, rate.per)
            });
            let by_network = (network_rate.count > 0).then(|| {
                tables
                    .connection_rate_by_network
                    .touch(&network, || Bucket::new(now))
                    .add(now, network_rate.count, network_rate.per)
            });
            if let Some(count) = by_source.filter(|&count| count > rate.count) {
                let block = (count > rate.count.saturating_mul(2)).then(|| {
                    tables.connection_rate.remove(&key);
                    tables.block_net(self, key, limiter_common::Reason::Flood, now)
                });
                return Some(Rejection {
                    reason: Reason::ConnectionRate {
                        count,
                        limit: rate.count,
                        per: rate.per,
                    },
                    action: Action::DeferAndClose,
                    block,
                });
            }
            let count = by_network.filter(|&count| count > network_rate.count)?;
            let block = (count > network_rate.count.saturating_mul(2)).then(|| {
                tables.connection_rate_by_network.remove(&network);
                tables.block_net(self, network, limiter_common::Reason::Flood, now)
            });
            Some(Rejection {
                reason: Reason::ConnectionRateFromNetwork {
                    network,
                    count,
                    limit: network_rate.count,
                    per: network_rate.per,
                },
                action: Action::DeferAndClose,
                block,
            })
        })?;
        Some(self.decide(rejection))
    }

    /// The `lists.reject_helo` pattern `helo` matches, if any.
    #[must_use]
    pub fn helo_rejected(&self, helo: &str) -> Option<&Pattern> {
        self.helo.reject.find(helo.trim())
    }

    /// The simultaneous-session cap of a HELO name: the first `limits.helo`
    /// pattern it matches. `None` = unlimited (no match, or a cap of 0).
    #[must_use]
    pub fn helo_cap(&self, helo: &str) -> Option<u32> {
        let helo = helo.trim();
        let cap = self
            .helo
            .limits
            .iter()
            .find(|(pattern, _)| pattern.matches(helo))
            .map_or(self.helo.default_cap, |&(_, cap)| cap);
        (cap != 0).then_some(cap)
    }

    /// Whether a HELO/EHLO name is in `lists.allow_helo`.
    #[must_use]
    pub fn is_helo_allowlisted(&self, helo: &str) -> bool {
        self.helo.allow.matches(helo.trim())
    }

    /// The `relay.accept` patterns (empty: the backend decides alone).
    #[must_use]
    pub fn relay_patterns(&self) -> &PatternList {
        &self.rcpt.relay
    }

    /// How long block number `repeat` (0 = first) lasts:
    /// `block_duration × block_backoff^repeat`, at most `max_block_duration`.
    #[must_use]
    pub fn block_duration(&self, repeat: u32) -> Duration {
        let rules = &self.blocks;
        let exponent = i32::try_from(repeat).unwrap_or(i32::MAX);
        let secs = rules.block_duration.as_secs_f64() * rules.block_backoff.powi(exponent);
        if secs.is_finite() && secs < rules.max_block_duration.as_secs_f64() {
            // Whole milliseconds: keeps 30m × 1.5 exact and logs readable.
            Duration::from_millis((secs * 1000.0).round() as u64)
        } else {
            rules.max_block_duration
        }
    }

    // -- Decisions ----------------------------------------------------------

    fn decide<T>(&self, verdict: T) -> Decision<T> {
        Decision {
            verdict,
            enforced: self.enforced(),
        }
    }

    /// A new client connection from `source`, at accept.
    ///
    /// Allow-listed sources get [`ConnectVerdict::Allowlisted`] and are not
    /// counted. Otherwise, in order: `lists.reject` ([`Reason::RejectList`],
    /// [`Action::RefuseAndClose`]; no block order, the agent loads that list
    /// into the kernel itself), then the per-source cap
    /// ([`Reason::TooManyConnections`], [`Action::DeferAndClose`]). The
    /// check and the count are one atomic step: the returned
    /// [`ConnectionGuard`] holds the connection's place until dropped.
    pub fn connect(&self, state: &Arc<PolicyState>, source: IpAddr) -> Decision<ConnectVerdict> {
        let source = source.to_canonical();
        let key = self.source_key(source);
        if self.is_allowlisted(source) {
            let guard = state.uncounted_connection(source, key);
            return self.decide(ConnectVerdict::Allowlisted(guard));
        }
        let listed = self.reject_listed(source);
        let cap = self.connection_cap(source);
        let (guard, refusal) = state.admit_connection(source, key, self.enforced(), |count| {
            if let Some(net) = listed {
                return Some(Rejection {
                    reason: Reason::RejectList { net },
                    action: Action::RefuseAndClose,
                    block: None,
                });
            }
            let limit = cap?;
            (count >= limit).then_some(Rejection {
                reason: Reason::TooManyConnections { count, limit },
                action: Action::DeferAndClose,
                block: None,
            })
        });
        self.decide(match refusal {
            None => ConnectVerdict::Accept(guard),
            Some(rejection) => ConnectVerdict::Reject {
                rejection,
                guard: (!self.enforced()).then_some(guard),
            },
        })
    }

    /// A HELO or EHLO naming `helo`, from `source`.
    ///
    /// `previous` is the guard of an earlier HELO/EHLO in the same session,
    /// if any: it is released first, so a client repeating its own name does
    /// not count twice. Allow-listed sources are accepted uncounted.
    /// Otherwise: `lists.reject_helo` ([`Reason::HeloRejected`],
    /// [`Action::RefuseAndClose`]), then the first matching `limits.helo`
    /// cap ([`Reason::TooManyForHelo`], [`Action::DeferAndClose`]). Names
    /// are compared trimmed and without case.
    pub fn helo(
        &self,
        state: &Arc<PolicyState>,
        source: IpAddr,
        helo: &str,
        previous: Option<HeloGuard>,
    ) -> Decision<HeloVerdict> {
        drop(previous);
        let name = state::helo_key(helo);
        if self.is_allowlisted(source) || self.is_helo_allowlisted(&name) {
            let (guard, _) = state.admit_helo(name, false, true, |_| None);
            return self.decide(HeloVerdict::Accept(guard));
        }
        let rejected = self.helo_rejected(&name).map(|p| p.as_str().to_owned());
        let cap = self.helo_cap(&name);
        let helo_name = name.clone();
        let (guard, refusal) = state.admit_helo(name, cap.is_some(), self.enforced(), |count| {
            if let Some(pattern) = rejected {
                return Some(Rejection {
                    reason: Reason::HeloRejected { pattern },
                    // Like Postfix: refuse the name, keep the session; MAIL
                    // needs an accepted HELO, so nothing goes through.
                    action: Action::RefuseCommand,
                    block: None,
                });
            }
            let limit = cap?;
            (count >= limit).then_some(Rejection {
                reason: Reason::TooManyForHelo {
                    helo: helo_name,
                    count,
                    limit,
                },
                action: Action::DeferAndClose,
                block: None,
            })
        });
        self.decide(match refusal {
            None => HeloVerdict::Accept(guard),
            Some(rejection) => HeloVerdict::Reject {
                rejection,
                guard: (!self.enforced()).then_some(guard),
            },
        })
    }

    /// `MAIL FROM` from `source`, in a session that announced `helo` (if it
    /// did); `null_sender` for `MAIL FROM:<>`.
    ///
    /// Only null-sender MAILs are limited, per source and per HELO name, at
    /// `limits.null_sender_rate` (see the [module docs](self) for the
    /// escalation to a block), and per network at
    /// `limits.null_sender_rate_per_network` (deferred, never blocked).
    pub fn mail_from(
        &self,
        state: &PolicyState,
        source: IpAddr,
        helo: Option<&str>,
        null_sender: bool,
        now: Instant,
    ) -> Decision<MailVerdict> {
        let source = source.to_canonical();
        if !null_sender
            || self.is_allowlisted(source)
            || helo.is_some_and(|h| self.is_helo_allowlisted(h))
        {
            return self.decide(MailVerdict::Accept);
        }
        let rate = self.mail.null_sender_rate;
        let limit = rate.count;
        let block_at = u64::from(limit) * 2;
        let keep = usize::try_from(block_at + 1).unwrap_or(usize::MAX);
        let key = self.source_key(source);
        let helo = helo.map(state::helo_key).filter(|h| !h.is_empty());
        let network_rate = self.mail.null_sender_rate_per_network;
        let network = (network_rate.count > 0).then(|| self.source_network(source));
        let (verdict, blocked) = state.with(|tables| {
            let by_source = tables
                .null_by_source
                .touch(&key, Default::default)
                .record(now, rate.per, keep);
            let by_helo = helo.as_ref().map(|name| {
                tables
                    .null_by_helo
                    .touch(name, Default::default)
                    .record(now, rate.per, keep)
            });
            let network_keep = usize::try_from(network_rate.count).map_or(usize::MAX, |n| n + 1);
            let by_network = network.map(|net| {
                let count = tables.null_by_network.touch(&net, Default::default).record(
                    now,
                    network_rate.per,
                    network_keep,
                );
                (net, count)
            });
            // Over `over` (the source's and HELO name's rate, or the
            // network's).
            let rejection = |scope, count, over: Rate, action, block| {
                MailVerdict::Reject(Rejection {
                    reason: Reason::NullSenderRate {
                        scope,
                        count,
                        limit: over.count,
                        per: over.per,
                    },
                    action,
                    block,
                })
            };
            if u64::from(by_source) > block_at {
                // Twice over the rate: block, and start the count afresh
                // (the source is gone for a while; when it is back, it gets
                // a clean window).
                tables.null_by_source.remove(&key);
                let order = tables.block(self, source, limiter_common::Reason::Flood, now);
                let verdict = rejection(
                    RateScope::Source,
                    by_source,
                    rate,
                    Action::DeferAndClose,
                    Some(order),
                );
                (verdict, true)
            } else if by_source > limit {
                let verdict = rejection(
                    RateScope::Source,
                    by_source,
                    rate,
                    Action::DeferCommand,
                    None,
                );
                (verdict, false)
            } else if let Some((net, count)) = by_network.filter(|(_, n)| *n > network_rate.count) {
                let verdict = rejection(
                    RateScope::Network(net),
                    count,
                    network_rate,
                    Action::DeferCommand,
                    None,
                );
                (verdict, false)
            } else if let (Some(name), Some(count)) = (helo, by_helo) {
                if count > limit {
                    let verdict = rejection(
                        RateScope::Helo(name),
                        count,
                        rate,
                        Action::DeferCommand,
                        None,
                    );
                    (verdict, false)
                } else {
                    (MailVerdict::Accept, false)
                }
            } else {
                (MailVerdict::Accept, false)
            }
        });
        state.report(Counted {
            kind: CountKind::NullSender,
            net: key,
            at: now,
            limit: u32::try_from(block_at).unwrap_or(u32::MAX),
            window: rate.per,
            blocked,
        });
        self.decide(verdict)
    }

    /// `RCPT TO` naming `recipient` (the bare address; surrounding blanks
    /// and one pair of angle brackets are ignored), from `source`.
    ///
    /// [`RcptVerdict::Accept`] when a `relay.accept` pattern matches,
    /// [`RcptVerdict::Reject`] ([`Reason::RelayDenied`],
    /// [`Action::RefuseCommand`]) when none does — the proxy then reports
    /// the failure with [`Policy::rcpt_result`]. [`RcptVerdict::Unchecked`]
    /// when `relay.accept` is empty or the source allow-listed: the backend
    /// decides alone.
    pub fn rcpt(&self, source: IpAddr, recipient: &str) -> Decision<RcptVerdict> {
        if self.rcpt.relay.is_empty() || self.is_allowlisted(source) {
            return self.decide(RcptVerdict::Unchecked);
        }
        let recipient = recipient.trim();
        let recipient = recipient
            .strip_prefix('<')
            .and_then(|r| r.strip_suffix('>'))
            .unwrap_or(recipient);
        self.decide(if self.rcpt.relay.matches(recipient) {
            RcptVerdict::Accept
        } else {
            RcptVerdict::Reject(Rejection {
                reason: Reason::RelayDenied,
                action: Action::RefuseCommand,
                block: None,
            })
        })
    }

    /// A recipient refused as a relay attempt whatever the patterns say (it
    /// carries routing syntax that could take it beyond the domain they
    /// would be matched against): [`Reason::RelayDenied`],
    /// [`Action::RefuseCommand`]; report it with [`Policy::rcpt_result`].
    pub fn relay_denied(&self) -> Decision<RcptVerdict> {
        self.decide(RcptVerdict::Reject(Rejection {
            reason: Reason::RelayDenied,
            action: Action::RefuseCommand,
            block: None,
        }))
    }

    /// A RCPT naming `recipient` (canonical) in a null-sender transaction
    /// (a MAIL that [`Self::mail_from`] counted as one), from `source` in a
    /// session that announced `helo`: counted in the recipient's bucket
    /// ([`Self::recipient_key`]), shared by every source, at
    /// `limits.null_sender_rate_per_recipient`. Past it the RCPT is
    /// deferred ([`Action::DeferCommand`], never a block: backscatter comes
    /// from innocent servers) and not counted, so the bucket goes on
    /// emptying at the rate however hard the flood pushes. `None`: accepted
    /// (allow-listed sources and HELO names, and a count of 0, are not
    /// counted).
    pub fn bounce_rcpt(
        &self,
        state: &PolicyState,
        source: IpAddr,
        helo: Option<&str>,
        recipient: &str,
        now: Instant,
    ) -> Option<Decision<RcptVerdict>> {
        let rate = self.mail.null_sender_rate_per_recipient;
        let source = source.to_canonical();
        if rate.count == 0
            || self.is_allowlisted(source)
            || helo.is_some_and(|h| self.is_helo_allowlisted(h))
        {
            return None;
        }
        let key = self.recipient_key(recipient);
        let count = state.with(|tables| {
            let bucket = tables.null_by_recipient.touch(&key, || Bucket::new(now));
            let before = *bucket;
            let count = bucket.add(now, rate.count, rate.per);
            if count > rate.count {
                *bucket = before;
            }
            count
        });
        (count > rate.count).then(|| {
            self.decide(RcptVerdict::Reject(Rejection {
                reason: Reason::NullSenderRate {
                    scope: RateScope::Recipient(key),
                    count,
                    limit: rate.count,
                    per: rate.per,
                },
                action: Action::DeferCommand,
                block: None,
            }))
        })
    }

    /// The key `null_sender_rate_per_recipient` counts a recipient under:
    /// its local part in lower case and cut at its extension (`+`, or the
    /// directory's `recipient_delimiter`), as the backend delivers
    /// `Alice+x@EXAMPLE.com` to `alice@example.com`; a bare local part
    /// (`postmaster`) the same way, without a domain.
    #[must_use]
    pub fn recipient_key(&self, recipient: &str) -> String {
        let folding = &self.mail.recipient_folding;
        let fold = |address: &str| {
            let key = folding.key(address)?;
            Some(folding.base_key(&key).unwrap_or(key))
        };
        fold(recipient)
            .or_else(|| {
                // A bare local part: folded as one with a stand-in domain.
                let key = fold(&format!("{}@x", recipient.trim()))?;
                key.strip_suffix("@x").map(str::to_owned)
            })
            .unwrap_or_else(|| recipient.trim().to_lowercase())
    }

    /// The outcome of one RCPT in a session: `ok` when the backend accepted
    /// it (2xx), `false` when it failed as a harvest attempt does (backend
    /// 5xx, a temporary "unknown user" `45x 4.1.1`, or
    /// [`Reason::RelayDenied`]). Other temporary failures are neither: do
    /// not report them.
    ///
    /// A success resets `counters.failed_rcpt`; a failure adds one, and past
    /// `max_failed_rcpt` returns the harvest verdict: [`Reason::Harvest`],
    /// [`Action::DeferAndClose`] (`421 4.7.0`), and a block (reason
    /// `harvest`). The counter then starts again from zero (in observe mode
    /// the session goes on).
    ///
    /// Failures are also counted per source across sessions over the last
    /// `failed_rcpt_window`, successes not resetting them, so that a
    /// harvester who reconnects before `max_failed_rcpt`, or mixes in valid
    /// addresses, is blocked past `max_failed_rcpt_per_source` too
    /// ([`Reason::HarvestAcrossSessions`], same action and block reason).
    /// Allow-listed sources are not counted.
    ///
    /// Failures from all sources together are counted too: past
    /// `max_failed_rcpt_per_host` within the window the host is under a
    /// harvest spread over many networks, and a source it does not know
    /// (`familiarity`: one that neither logged in in the session nor first
    /// delivered mail, within the hour, before the harvest began) is
    /// blocked past `max_failed_rcpt_under_harvest` of its failures in the
    /// window ([`Reason::HostHarvested`], same action and block reason). A
    /// harvester cannot buy its addresses' acquaintance by delivering a
    /// message from each once the harvest is on.
    pub fn rcpt_result(
        &self,
        state: &PolicyState,
        source: IpAddr,
        counters: &mut SessionCounters,
        ok: bool,
        familiarity: Familiarity,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let source = source.to_canonical();
        if self.is_allowlisted(source) {
            return None;
        }
        if ok {
            counters.failed_rcpt = 0;
            return None;
        }
        counters.failed_rcpt = counters.failed_rcpt.saturating_add(1);
        let rules = &self.rcpt;
        let network_rule = WindowRule {
            kind: CountKind::FailedRcptPerNetwork,
            limit: rules.max_failed_rcpt_per_network,
            window: rules.failed_rcpt_window,
        };
        if let Some(rejection) =
            self.window_rejection(state, source, now, network_rule, |network, failed| {
                Reason::HarvestFromNetwork {
                    network,
                    failed,
                    limit: network_rule.limit,
                    window: network_rule.window,
                }
            })
        {
            counters.failed_rcpt = 0;
            return Some(self.decide(rejection));
        }
        let host_failed = self.count_on_host(state, HostCount::FailedRcpt, now);
        let limit = self.rcpt.max_failed_rcpt;
        if counters.failed_rcpt > limit {
            let failed = std::mem::take(&mut counters.failed_rcpt);
            // The session's harvest also ends the source's window: the block
            // is what counts now, and its backoff remembers the offence.
            let key = self.source_key(source);
            let order = state.with(|tables| {
                tables.failed_rcpt.remove(&key);
                tables.block(self, source, limiter_common::Reason::Harvest, now)
            });
            if self.rcpt.max_failed_rcpt_per_source != 0 {
                // The other hosts' count of this source starts afresh too.
                state.report(Counted {
                    kind: CountKind::FailedRcpt,
                    net: key,
                    at: now,
                    limit: self.rcpt.max_failed_rcpt_per_source,
                    window: self.rcpt.failed_rcpt_window,
                    blocked: true,
                });
            }
            return Some(self.decide(Rejection {
                reason: Reason::Harvest { failed, limit },
                action: Action::DeferAndClose,
                block: Some(order),
            }));
        }
        let rules = &self.rcpt;
        if rules.max_failed_rcpt_per_source == 0 {
            return None;
        }
        let rule = WindowRule {
            kind: CountKind::FailedRcpt,
            limit: rules.max_failed_rcpt_per_source,
            window: rules.failed_rcpt_window,
        };
        if let Some((failed, order)) = self.count_toward_block(state, source, now, rule) {
            counters.failed_rcpt = 0;
            return Some(self.decide(Rejection {
                reason: Reason::HarvestAcrossSessions {
                    failed,
                    limit: rule.limit,
                    window: rule.window,
                },
                action: Action::DeferAndClose,
                block: Some(order),
            }));
        }
        let (host_failed, began) = host_failed?;
        let familiar = match familiarity {
            Familiarity::LoggedIn => true,
            Familiarity::DeliveredSince(first) => first < began,
            Familiarity::Stranger => false,
        };
        if familiar {
            return None;
        }
        let limit = rules.max_failed_rcpt_under_harvest;
        let (failed, order) = self.past_attack_limit(state, source, now, rule, limit)?;
        counters.failed_rcpt = 0;
        Some(self.decide(Rejection {
            reason: Reason::HostHarvested {
                failed,
                limit,
                host_failed,
                window: rule.window,
            },
            action: Action::DeferAndClose,
            block: Some(order),
        }))
    }

    /// Counts one failure from any source toward `which` limit for the
    /// host; the failures from all sources within its window when they are
    /// past it (the host is under attack), and since when it has been,
    /// else `None`. Logs when the host goes past it and when it is back
    /// under.
    fn count_on_host(
        &self,
        state: &PolicyState,
        which: HostCount,
        now: Instant,
    ) -> Option<(u32, Instant)> {
        let (limit, window, under) = match which {
            HostCount::FailedRcpt => (
                self.rcpt.max_failed_rcpt_per_host,
                self.rcpt.failed_rcpt_window,
                self.rcpt.max_failed_rcpt_under_harvest,
            ),
            HostCount::FailedAuth => (
                self.auth.max_failed_auth_per_host,
                self.auth.failed_auth_window,
                self.auth.max_failed_auth_under_spray,
            ),
        };
        if limit == 0 {
            return None;
        }
        let keep = usize::try_from(u64::from(limit) + 1).unwrap_or(usize::MAX);
        let (failures, was_past, since) = state.with(|tables| {
            let count = &mut tables.on_host[which as usize];
            let failures = count.window.record(now, window, keep);
            let was_past = count.since.is_some();
            if failures <= limit {
                count.since = None;
            } else if !was_past {
                count.since = Some(now);
            }
            (failures, was_past, count.since)
        });
        // Formatted only for the two lines that name it.
        let window = || crate::config::format_duration(window);
        match (was_past, failures > limit, which) {
            (false, true, HostCount::FailedRcpt) => tracing::warn!(
                failures, limit, window = %window(), under_harvest = under,
                "host under a harvest: more failed recipients from all sources than max_failed_rcpt_per_host; sources the host does not know are blocked past max_failed_rcpt_under_harvest failures"
            ),
            (false, true, HostCount::FailedAuth) => tracing::warn!(
                failures, limit, window = %window(), under_spray = under,
                "host under a password spray: more refused credentials from all sources than max_failed_auth_per_host; sources that have not logged in as the account lately are blocked past max_failed_auth_under_spray failures"
            ),
            (true, false, HostCount::FailedRcpt) => tracing::info!(
                limit,
                "harvest over: failed recipients from all sources back under max_failed_rcpt_per_host"
            ),
            (true, false, HostCount::FailedAuth) => tracing::info!(
                limit,
                "password spray over: refused credentials from all sources back under max_failed_auth_per_host"
            ),
            _ => {}
        }
        since.map(|since| (failures, since))
    }

    /// While the host is under attack: whether `source`'s count in `rule`'s
    /// window (already recorded) is past `limit`, the lower limit for
    /// sources the host does not know; then its block, ordered as past
    /// `rule` (the window starts afresh here and on the other hosts).
    fn past_attack_limit(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
        rule: WindowRule,
        limit: u32,
    ) -> Option<(u32, BlockOrder)> {
        let key = self.source_key(source.to_canonical());
        let outcome = state.with(|tables| {
            let windows = tables.windows(rule.kind);
            let window = windows.peek_mut(&key)?;
            window.expire(now, rule.window);
            let count = window.count();
            if count <= limit {
                return None;
            }
            windows.remove(&key);
            Some((count, tables.block_net(self, key, rule.kind.origin(), now)))
        })?;
        state.report(Counted {
            kind: rule.kind,
            net: key,
            at: now,
            limit: rule.limit,
            window: rule.window,
            blocked: true,
        });
        Some(outcome)
    }

    /// Whether AUTH for `account` (lower-cased, [`crate::smtp::SaslAccount`])
    /// from `source` is refused before the backend hears the credentials:
    /// one of the account's names ([`account_names`]) has
    /// `max_failed_auth_per_account` refused credentials within
    /// `failed_auth_window`, from every source together, and `source` has
    /// not logged in under that name within [`LOGIN_MEMORY`].
    /// [`Reason::AccountLocked`], [`Action::DeferCommand`] (`454 4.7.0` in
    /// the session). The refused attempt is a guess all the same: it counts
    /// as a failure of the source (and its network), and the source's block
    /// when that goes past its limit is the decision instead. Allow-listed
    /// sources are never refused.
    pub fn account_locked(
        &self,
        state: &PolicyState,
        source: IpAddr,
        account: &str,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let rules = &self.auth;
        let source = source.to_canonical();
        if rules.max_failed_auth_per_account == 0 || self.is_allowlisted(source) {
            return None;
        }
        let key = self.source_key(source);
        let (locked, failures) = state.with(|tables| {
            account_names(account).find_map(|name| {
                let window = tables.auth_failures_by_account.peek_mut(&name.to_owned())?;
                window.expire(now, rules.failed_auth_window);
                let failures = window.count();
                if failures < rules.max_failed_auth_per_account {
                    return None;
                }
                let familiar = tables.logged_in_lately(name, key, now);
                (!familiar).then(|| (name.to_owned(), failures))
            })
        })?;
        if let Some(block) = self.count_auth_failure(state, source, now) {
            return Some(block);
        }
        Some(self.decide(Rejection {
            reason: Reason::AccountLocked {
                account: locked,
                failures,
                limit: rules.max_failed_auth_per_account,
                window: rules.failed_auth_window,
            },
            action: Action::DeferCommand,
            block: None,
        }))
    }

    /// A successful AUTH of `source` as `account`: the source becomes one
    /// of the familiar places of each of the account's names for
    /// [`LOGIN_MEMORY`].
    pub fn auth_succeeded(&self, state: &PolicyState, source: IpAddr, account: &str, now: Instant) {
        if self.auth.max_failed_auth_per_account == 0 && self.auth.max_failed_auth_per_host == 0 {
            return;
        }
        let key = self.source_key(source.to_canonical());
        state.with(|tables| {
            for name in account_names(account) {
                *tables.logins.touch(&(name.to_owned(), key), || now) = now;
            }
        });
    }

    /// A failed AUTH (`535`) for `source`, logging in as `account` when the
    /// exchange named one.
    ///
    /// Failures are counted per source over the last `failed_auth_window`;
    /// past `max_failed_auth` the source is blocked: [`Reason::AuthFailures`],
    /// [`Action::DeferAndClose`], and a block (reason `auth`). Its count then
    /// starts again from zero. Successful AUTHs do not reset the count.
    /// Allow-listed sources are not counted. The account's own counts (for
    /// [`Self::account_locked`], one per name) take every failure.
    ///
    /// Refused credentials from all sources together are counted too: past
    /// `max_failed_auth_per_host` within the window the host is under a
    /// password spray (many accounts, many networks), and a source that has
    /// not logged in as `account` within [`LOGIN_MEMORY`] is blocked past
    /// `max_failed_auth_under_spray` failures ([`Reason::HostSprayed`],
    /// same action and block reason).
    pub fn auth_failed(
        &self,
        state: &PolicyState,
        source: IpAddr,
        account: Option<&str>,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let rules = &self.auth;
        let allowlisted = self.is_allowlisted(source.to_canonical());
        if let Some(account) = account {
            if rules.max_failed_auth_per_account > 0 && !allowlisted {
                let keep = usize::try_from(rules.max_failed_auth_per_account).unwrap_or(usize::MAX);
                state.with(|tables| {
                    for name in account_names(account) {
                        tables
                            .auth_failures_by_account
                            .touch(&name.to_owned(), Default::default)
                            .record(now, rules.failed_auth_window, keep);
                    }
                });
            }
        }
        if allowlisted {
            return None;
        }
        let host_failures = self
            .count_on_host(state, HostCount::FailedAuth, now)
            .map(|(failures, _)| failures);
        if let Some(decision) = self.count_auth_failure(state, source, now) {
            return Some(decision);
        }
        let host_failures =
            host_failures.filter(|_| !self.is_familiar(state, source, account, now))?;
        let rule = WindowRule {
            kind: CountKind::FailedAuth,
            limit: rules.max_failed_auth,
            window: rules.failed_auth_window,
        };
        let limit = rules.max_failed_auth_under_spray;
        let (failures, order) = self.past_attack_limit(state, source, now, rule, limit)?;
        Some(self.decide(Rejection {
            reason: Reason::HostSprayed {
                failures,
                limit,
                host_failures,
                window: rule.window,
            },
            action: Action::DeferAndClose,
            block: Some(order),
        }))
    }

    /// Whether `source` logged in as one of `account`'s names within
    /// [`LOGIN_MEMORY`]: one of the account's familiar places.
    fn is_familiar(
        &self,
        state: &PolicyState,
        source: IpAddr,
        account: Option<&str>,
        now: Instant,
    ) -> bool {
        let Some(account) = account else {
            return false;
        };
        let key = self.source_key(source.to_canonical());
        state.with(|tables| {
            account_names(account).any(|name| tables.logged_in_lately(name, key, now))
        })
    }

    /// One refused guess of `source`, in its network's window and its own.
    fn count_auth_failure(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let rules = &self.auth;
        let network_rule = WindowRule {
            kind: CountKind::FailedAuthPerNetwork,
            limit: rules.max_failed_auth_per_network,
            window: rules.failed_auth_window,
        };
        if let Some(rejection) =
            self.window_rejection(state, source, now, network_rule, |network, failures| {
                Reason::AuthFailuresFromNetwork {
                    network,
                    failures,
                    limit: network_rule.limit,
                    window: network_rule.window,
                }
            })
        {
            return Some(self.decide(rejection));
        }
        let (failures, order) = self.count_toward_block(
            state,
            source,
            now,
            WindowRule {
                kind: CountKind::FailedAuth,
                limit: rules.max_failed_auth,
                window: rules.failed_auth_window,
            },
        )?;
        Some(self.decide(Rejection {
            reason: Reason::AuthFailures {
                failures,
                limit: rules.max_failed_auth,
                window: rules.failed_auth_window,
            },
            action: Action::DeferAndClose,
            block: Some(order),
        }))
    }

    /// A message from `source` rejected by the content filters (virus or
    /// spam; the client already has its reply).
    ///
    /// Counted per source over the last `filters.reject_window`; past
    /// `filters.max_rejects` (0 = never) the source is blocked:
    /// [`Reason::FilterRejects`], [`Action::DeferAndClose`], and a block
    /// (reason `filter`). Allow-listed sources are not counted.
    pub fn filter_rejected(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let rules = &self.filters;
        if rules.max_rejects == 0 {
            return None;
        }
        let (rejects, order) = self.count_toward_block(
            state,
            source,
            now,
            WindowRule {
                kind: CountKind::FilterReject,
                limit: rules.max_rejects - 1,
                window: rules.reject_window,
            },
        )?;
        Some(self.decide(Rejection {
            reason: Reason::FilterRejects {
                rejects,
                limit: rules.max_rejects,
                window: rules.reject_window,
            },
            action: Action::DeferAndClose,
            block: Some(order),
        }))
    }

    /// A session of `source` closed under pressure: before it had a MAIL
    /// accepted (shed at the session cap, cut at the short stress timeout,
    /// or past `smtp.max_commands_before_mail`), or holding a backend slot
    /// others wait for in a transaction its client kept idle (the client
    /// already has its `421`).
    ///
    /// Counted per source over the last `shed_sessions_window`; past
    /// `max_shed_sessions_per_source` (0 = never) the source is blocked:
    /// [`Reason::ShedSessions`], and a block (reason `flood`), so that a
    /// zombie that reconnects to idle again each time it is cut finds its
    /// SYNs dropped in the kernel instead of costing a session each time.
    /// A sender with mail to deliver says MAIL at once and is never shed
    /// this way. Allow-listed sources are not counted.
    pub fn session_shed(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
    ) -> Option<Decision<Rejection>> {
        let rule = WindowRule {
            kind: CountKind::ShedSession,
            limit: self.shed.max_per_source,
            window: self.shed.window,
        };
        let rejection =
            self.window_rejection(state, source, now, rule, |_, sheds| Reason::ShedSessions {
                sheds,
                limit: rule.limit,
                window: rule.window,
            })?;
        Some(self.decide(rejection))
    }

    /// The block `order` of one source was just put in force: counted for
    /// the source's network over the last `blocked_sources_window`; past
    /// `max_blocked_sources_per_network` (0 = never), the network's block
    /// (origin `network`, with the backoff of the network's own history).
    /// Whatever each block was for, an attacker that takes the next address
    /// of its /24 (or the next /64 of its /48) each time one is blocked
    /// adds up here. Orders on more than one source key (a network's own
    /// block) and sources whose network is their key count for nothing;
    /// allow-listed sources are never blocked, so never counted.
    pub fn source_blocked(
        &self,
        state: &PolicyState,
        order: &BlockOrder,
        now: Instant,
    ) -> Option<Decision<BlockOrder>> {
        let source = order.net.network();
        if order.net != self.source_key(source) || self.source_network(source) == order.net {
            return None;
        }
        let rule = WindowRule {
            kind: CountKind::BlockedSources,
            limit: self.blocks.max_sources_per_network,
            window: self.blocks.sources_window,
        };
        if rule.limit == 0 {
            return None;
        }
        let (_, order) = self.count_toward_block(state, source, now, rule)?;
        Some(self.decide(order))
    }

    /// Counts one event of `source` in `rule`'s window (its source key's,
    /// or for a [`CountKind::per_network`] rule its network's; a limit of 0
    /// is off); past the limit, the key's block, and the refusal that says
    /// so: `reason` made of the key and the events counted.
    fn window_rejection(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
        rule: WindowRule,
        reason: impl FnOnce(IpNet, u32) -> Reason,
    ) -> Option<Rejection> {
        if rule.limit == 0 {
            return None;
        }
        let (events, order) = self.count_toward_block(state, source, now, rule)?;
        Some(Rejection {
            reason: reason(order.net, events),
            action: Action::DeferAndClose,
            block: Some(order),
        })
    }

    /// Counts one event for `source` in `rule`'s window (its source key's,
    /// or for a [`CountKind::per_network`] rule its network's); past its
    /// limit the window starts over and the key is blocked, with the
    /// backoff of its own history: (events counted, the block).
    /// Allow-listed sources are not counted. The event goes to the state's
    /// [`CountSink`] too.
    fn count_toward_block(
        &self,
        state: &PolicyState,
        source: IpAddr,
        now: Instant,
        rule: WindowRule,
    ) -> Option<(u32, BlockOrder)> {
        let source = source.to_canonical();
        if self.is_allowlisted(source) {
            return None;
        }
        let key = if rule.kind.per_network() {
            self.source_network(source)
        } else {
            self.source_key(source)
        };
        let keep = usize::try_from(u64::from(rule.limit) + 1).unwrap_or(usize::MAX);
        let outcome = state.with(|tables| {
            let windows = tables.windows(rule.kind);
            let events = windows
                .touch(&key, Default::default)
                .record(now, rule.window, keep);
            if events <= rule.limit {
                return None;
            }
            windows.remove(&key);
            Some((events, tables.block_net(self, key, rule.kind.origin(), now)))
        });
        state.report(Counted {
            kind: rule.kind,
            net: key,
            at: now,
            limit: rule.limit,
            window: rule.window,
            blocked: outcome.is_some(),
        });
        outcome
    }

    /// The span `kind`'s windows count over (the per-HELO null-sender
    /// window is `NullSender`'s).
    pub(super) fn window(&self, kind: CountKind) -> Duration {
        match kind {
            CountKind::FailedRcpt | CountKind::FailedRcptPerNetwork => self.rcpt.failed_rcpt_window,
            CountKind::FailedAuth | CountKind::FailedAuthPerNetwork => self.auth.failed_auth_window,
            CountKind::NullSender => self.mail.null_sender_rate.per,
            CountKind::FilterReject => self.filters.reject_window,
            CountKind::ShedSession => self.shed.window,
            CountKind::BlockedSources => self.blocks.sources_window,
        }
    }

    /// `net`'s `kind` window went past its limit counted over every edge
    /// host (`cluster.share_counters`): the block this host would have
    /// ordered had it seen every event, its own window of the source
    /// started afresh as after a block here. None for an allow-listed
    /// source (never blocked). The caller enforces it unless in observe
    /// mode ([`Decision::enforced`]).
    pub fn over_cluster_wide(
        &self,
        state: &PolicyState,
        kind: CountKind,
        net: IpNet,
        now: Instant,
    ) -> Option<Decision<BlockOrder>> {
        // The key's own address is keyed as the key itself.
        let source = net.network();
        if self.is_allowlisted(source) {
            return None;
        }
        let key = if kind.per_network() {
            net
        } else {
            self.source_key(source)
        };
        let order = state.with(|tables| {
            tables.windows(kind).remove(&net);
            tables.block_net(self, key, kind.origin(), now)
        });
        Some(self.decide(order))
    }
}

/// What the host knows of a source whose recipient failed, for
/// `limits.max_failed_rcpt_under_harvest` ([`Policy::rcpt_result`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Familiarity {
    /// It logged in in this session.
    LoggedIn,
    /// It delivered mail within the hour, the first time then.
    DeliveredSince(Instant),
    /// Neither.
    Stranger,
}

/// A count of events in a sliding window, per source or per network
/// ([`CountKind::per_network`]), that blocks its key once it goes past
/// `limit`.
#[derive(Clone, Copy)]
struct WindowRule {
    kind: CountKind,
    limit: u32,
    window: Duration,
}

/// What the host counts from all sources together
/// (`limits.max_failed_rcpt_per_host`, `max_failed_auth_per_host`); the
/// index of its count in the tables.
#[derive(Clone, Copy, Debug)]
enum HostCount {
    FailedRcpt = 0,
    FailedAuth = 1,
}

/// The names an account (lower-cased) is counted under for
/// `max_failed_auth_per_account`: as given, and, when it is qualified, its
/// bare name too (`alice@example.com` and `example\alice` also count as
/// `alice`): backends read several names as one account (Cyrus `alice`
/// and `alice@REALM`, Dovecot with `auth_default_realm`, Exchange's
/// `DOMAIN\alice` and UPN), and a spray that spells the account each way
/// must not get a limit per spelling.
fn account_names(account: &str) -> impl Iterator<Item = &str> {
    let bare = account.rsplit('\\').next().unwrap_or(account);
    let bare = bare.split('@').next().unwrap_or(bare);
    std::iter::once(account).chain((!bare.is_empty() && bare != account).then_some(bare))
}

/// `net` with its host bits cleared, and IPv4-mapped IPv6 networks
/// (`::ffff:a.b.c.d/96+n`) as the IPv4 network they mean, so that they
/// contain canonical (IPv4) sources.
fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => {
                Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net.trunc(), |n| IpNet::V4(n.trunc()))
            }
            None => net.trunc(),
        },
        other => other.trunc(),
    }
}
