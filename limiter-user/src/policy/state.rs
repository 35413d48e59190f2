//! The counters that outlive a session, shared by every session, and the
//! RAII guards that hold a session's place in them.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::table::{Bucket, Lru, Window};
use super::verdict::{Action, BlockOrder, Reason, Rejection};
use super::Policy;

/// Keys each table of a [`PolicyState::new`] holds at most.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Keys each per-network window table holds, for tables of `capacity`.
#[must_use]
pub const fn network_capacity(capacity: usize) -> usize {
    let tenth = capacity / 10;
    if tenth == 0 {
        1
    } else {
        tenth
    }
}

/// Counters shared by all sessions.
///
/// # Sharing
///
/// Internally synchronised: one `std::sync::Mutex` over all the tables, held
/// only for the few hash operations of one decision (never across I/O or an
/// `.await`), so a decision's check-and-count is atomic. Share it as
/// `Arc<PolicyState>`: the RAII guards ([`ConnectionGuard`], [`HeloGuard`])
/// hold a clone and give their place back when dropped. A poisoned lock is
/// recovered (every update leaves the tables consistent), so dropping a guard
/// never panics.
///
/// # Bounds
///
/// Every table holds at most [`PolicyState::capacity`] keys
/// ([`DEFAULT_CAPACITY`] = 100 000 unless built
/// [`with_capacity`](PolicyState::with_capacity)):
///
/// * live counts (connections per source, sessions per limited HELO name)
///   hold only keys with at least one live session and are never evicted —
///   evicting one would make its count wrong. A new key arriving when the
///   table is full is refused instead ([`Reason::StateFull`], `421`; in
///   observe mode it goes on uncounted);
/// * sliding windows (failed AUTH, null-sender MAILs per source and per HELO
///   name) and the block history evict the key seen least recently. Each
///   window keeps at most `threshold + 1` times, so its memory is bounded
///   too. [`PolicyState::sweep`] drops entries that have aged out, for a
///   periodic tidy-up. The per-network windows hold a tenth as many keys
///   ([`network_capacity`]): their thresholds are larger (100 to 200 times
///   per key by default, 2 to 3 KiB), and a network's window stays recent while its
///   sources keep failing, so only an attacker with more networks than the
///   table holds could push one out.
pub struct PolicyState {
    tables: Mutex<Tables>,
    capacity: usize,
    /// Where the windows' events go besides these tables, once installed
    /// (the cluster, with `cluster.share_counters`).
    sink: OnceLock<Arc<dyn CountSink>>,
}

/// A per-source or per-network window several edge hosts can count
/// together (`cluster.share_counters`). The per-session count of failed
/// RCPTs and the per-HELO null-sender count are not among them: they stay
/// local.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CountKind {
    /// `max_failed_rcpt_per_source` in `failed_rcpt_window`.
    FailedRcpt,
    /// `max_failed_auth` in `failed_auth_window`.
    FailedAuth,
    /// `max_failed_rcpt_per_network` in `failed_rcpt_window`, keyed by
    /// the source's network ([`super::Policy::source_network`]).
    FailedRcptPerNetwork,
    /// `max_failed_auth_per_network` in `failed_auth_window`, likewise.
    FailedAuthPerNetwork,
    /// Null-sender MAILs per source: the block at twice `null_sender_rate`
    /// (the `450` past once the rate is decided here alone).
    NullSender,
    /// `filters.max_rejects` in `filters.reject_window`.
    FilterReject,
    /// `max_shed_sessions_per_source` in `shed_sessions_window`.
    ShedSession,
    /// `max_blocked_sources_per_network` in `blocked_sources_window`,
    /// keyed by the network.
    BlockedSources,
}

impl CountKind {
    /// Every kind.
    pub const ALL: [CountKind; 8] = [
        CountKind::FailedRcpt,
        CountKind::FailedAuth,
        CountKind::FailedRcptPerNetwork,
        CountKind::FailedAuthPerNetwork,
        CountKind::NullSender,
        CountKind::FilterReject,
        CountKind::ShedSession,
        CountKind::BlockedSources,
    ];

    /// A short stable name (keys, logs, metrics).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            CountKind::FailedRcpt => "rcpt",
            CountKind::FailedAuth => "auth",
            CountKind::FailedRcptPerNetwork => "rcpt-network",
            CountKind::FailedAuthPerNetwork => "auth-network",
            CountKind::NullSender => "null-sender",
            CountKind::FilterReject => "filter",
            CountKind::ShedSession => "shed",
            CountKind::BlockedSources => "blocked-network",
        }
    }

    /// The origin of the block this window orders.
    #[must_use]
    pub const fn origin(self) -> limiter_common::Reason {
        match self {
            CountKind::FailedRcpt | CountKind::FailedRcptPerNetwork => {
                limiter_common::Reason::Harvest
            }
            CountKind::FailedAuth | CountKind::FailedAuthPerNetwork => limiter_common::Reason::Auth,
            CountKind::NullSender | CountKind::ShedSession => limiter_common::Reason::Flood,
            CountKind::FilterReject => limiter_common::Reason::Filter,
            CountKind::BlockedSources => limiter_common::Reason::Network,
        }
    }

    /// Whether the events go to the [`CountSink`] (`cluster.share_counters`
    /// counts them over every edge host): all but the blocked sources of a
    /// network, whose events are blocks that every host ordering one counts
    /// itself (and a block crossing a shared window is ordered on every
    /// host: shared, it would count once per host).
    #[must_use]
    pub const fn shared(self) -> bool {
        !matches!(self, CountKind::BlockedSources)
    }

    /// Whether the window is keyed by the source's network rather than by
    /// the source ([`super::Policy::source_key`]).
    #[must_use]
    pub const fn per_network(self) -> bool {
        matches!(
            self,
            CountKind::FailedRcptPerNetwork
                | CountKind::FailedAuthPerNetwork
                | CountKind::BlockedSources
        )
    }
}

/// Failures of one kind from all sources together, and since when they
/// have been past the host's limit (the host is under attack), as of the
/// last one.
#[derive(Debug, Default)]
pub(super) struct HostWindow {
    pub(super) window: Window,
    pub(super) since: Option<Instant>,
}

/// One event counted in a source's window here, as handed to the
/// [`CountSink`]: with the rule in force, so that whoever counts it
/// elsewhere applies the same threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    pub kind: CountKind,
    /// The source key ([`Policy::source_key`]), or the source's network
    /// for a [`CountKind::per_network`] window.
    pub net: IpNet,
    pub at: Instant,
    /// The source is blocked past this many events in `window`.
    pub limit: u32,
    pub window: Duration,
    /// This host blocked the source on this event (and started its window
    /// afresh): the event says "start afresh" rather than "count one".
    pub blocked: bool,
}

/// Where counted events go besides this host's windows (the cluster's
/// queue). Called outside the tables' lock, in the session's path: it must
/// not wait (queue, bounded, and return).
pub trait CountSink: Send + Sync {
    fn counted(&self, event: Counted);
}

/// The tables behind the lock. Decisions in the parent module run on them
/// under one lock through [`PolicyState::with`].
pub(super) struct Tables {
    /// Live connections per source key (IPv4 /32, IPv6 prefix).
    connections: HashMap<IpNet, u32>,
    /// Live sessions per lower-cased HELO name, for names with a limit.
    helo_sessions: HashMap<String, u32>,
    /// Failed AUTH times per source key.
    pub(super) auth_failures: Lru<IpNet, Window>,
    /// Failed RCPT times per source key, across sessions (harvesting).
    pub(super) failed_rcpt: Lru<IpNet, Window>,
    /// Failed RCPT times per network ([`Policy::source_network`]).
    failed_rcpt_by_network: Lru<IpNet, Window>,
    /// Failures from all sources together: failed RCPTs
    /// (`limits.max_failed_rcpt_per_host`) and refused credentials
    /// (`max_failed_auth_per_host`), by `HostCount`.
    pub(super) on_host: [HostWindow; 2],
    /// Failed AUTH times per network.
    auth_failures_by_network: Lru<IpNet, Window>,
    /// Messages rejected by the content filters, times per source key.
    pub(super) filter_rejects: Lru<IpNet, Window>,
    /// Null-sender MAIL times per source key.
    pub(super) null_by_source: Lru<IpNet, Window>,
    /// Times a session of the source key was closed under pressure.
    shed_sessions: Lru<IpNet, Window>,
    /// Each source key's connection-rate bucket
    /// ([`super::Policy::connection_rate`]).
    pub(super) connection_rate: Lru<IpNet, Bucket>,
    /// Each network's connection-rate bucket.
    pub(super) connection_rate_by_network: Lru<IpNet, Bucket>,
    /// Times a source of the network was blocked.
    blocked_by_network: Lru<IpNet, Window>,
    /// Null-sender MAIL times per lower-cased HELO name.
    pub(super) null_by_helo: Lru<String, Window>,
    /// Null-sender MAIL times per network ([`Policy::source_network`]).
    pub(super) null_by_network: Lru<IpNet, Window>,
    /// Each recipient key's null-sender bucket
    /// ([`super::Policy::bounce_rcpt`]).
    pub(super) null_by_recipient: Lru<String, Bucket>,
    /// Refused credentials per account (the name a SASL exchange logs in
    /// as, lower-cased), from every source.
    pub(super) auth_failures_by_account: Lru<String, Window>,
    /// The last successful login of each (account, source key): the
    /// account's familiar places, which its lockout does not refuse.
    pub(super) logins: Lru<(String, IpNet), Instant>,
    /// Past blocks per source key, for the backoff.
    history: Lru<IpNet, BlockRecord>,
    capacity: usize,
}

/// What is remembered of a source's blocks.
#[derive(Clone, Copy, Debug)]
struct BlockRecord {
    /// Blocks ordered so far (the next one is repeat number `blocks`).
    blocks: u32,
    /// When the last one ends.
    until: Instant,
}

/// How many keys each table holds, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    /// Sources with live connections.
    pub connections: usize,
    /// Limited HELO names with live sessions.
    pub helo_sessions: usize,
    /// Sources with failed AUTH in their window.
    pub auth_failures: usize,
    /// Sources with failed RCPTs in their window.
    pub failed_rcpt_sources: usize,
    /// Sources with null-sender MAILs in their window.
    pub null_sender_sources: usize,
    /// HELO names with null-sender MAILs in their window.
    pub null_sender_helos: usize,
    /// Sources whose block history is remembered.
    pub block_history: usize,
}

impl Default for PolicyState {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PolicyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyState")
            .field("capacity", &self.capacity)
            .field("sizes", &self.sizes())
            .finish()
    }
}

impl PolicyState {
    /// Empty state, each table bounded by [`DEFAULT_CAPACITY`].
    #[must_use]
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// Empty state, each table bounded by `capacity` keys (at least 1).
    #[must_use]
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            tables: Mutex::new(Tables {
                connections: HashMap::new(),
                helo_sessions: HashMap::new(),
                auth_failures: Lru::new(capacity),
                failed_rcpt: Lru::new(capacity),
                failed_rcpt_by_network: Lru::new(network_capacity(capacity)),
                on_host: Default::default(),
                auth_failures_by_network: Lru::new(network_capacity(capacity)),
                filter_rejects: Lru::new(capacity),
                null_by_source: Lru::new(capacity),
                shed_sessions: Lru::new(capacity),
                connection_rate: Lru::new(capacity),
                connection_rate_by_network: Lru::new(network_capacity(capacity)),
                blocked_by_network: Lru::new(network_capacity(capacity)),
                null_by_helo: Lru::new(capacity),
                null_by_network: Lru::new(network_capacity(capacity)),
                null_by_recipient: Lru::new(capacity),
                auth_failures_by_account: Lru::new(capacity),
                logins: Lru::new(capacity),
                history: Lru::new(capacity),
                capacity,
            }),
            capacity,
            sink: OnceLock::new(),
        }
    }

    /// Hands every event counted in a source's window ([`CountKind`]) to
    /// `sink` from now on; false if one was installed already (it stays).
    pub fn set_sink(&self, sink: Arc<dyn CountSink>) -> bool {
        self.sink.set(sink).is_ok()
    }

    /// Gives `event` to the sink, if there is one.
    pub(super) fn report(&self, event: Counted) {
        if !event.kind.shared() {
            return;
        }
        if let Some(sink) = self.sink.get() {
            sink.counted(event);
        }
    }

    /// The bound of each table.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many keys each table holds now.
    #[must_use]
    pub fn sizes(&self) -> TableSizes {
        let tables = self.lock();
        TableSizes {
            connections: tables.connections.len(),
            helo_sessions: tables.helo_sessions.len(),
            auth_failures: tables.auth_failures.len(),
            failed_rcpt_sources: tables.failed_rcpt.len(),
            null_sender_sources: tables.null_by_source.len(),
            null_sender_helos: tables.null_by_helo.len(),
            block_history: tables.history.len(),
        }
    }

    /// Live connections counted under `key` (a source key, see
    /// [`Policy::source_key`]).
    #[must_use]
    pub fn connections(&self, key: IpNet) -> u32 {
        self.lock().connections.get(&key).copied().unwrap_or(0)
    }

    /// Live sessions counted under a HELO name (any case). Only names
    /// matching a `limits.helo` pattern with a non-zero cap are counted.
    #[must_use]
    pub fn helo_sessions(&self, helo: &str) -> u32 {
        self.lock()
            .helo_sessions
            .get(&helo_key(helo))
            .copied()
            .unwrap_or(0)
    }

    /// Orders a block of `source` for `reason` (one of
    /// [`limiter_common::reason`]) and records it in the source's history, so
    /// that its next offence gets a longer block (see [`Policy::block_duration`]).
    ///
    /// `None` for an allow-listed source: those are never blocked. An order
    /// made while the source's previous block still runs (parallel sessions
    /// of one offender, or observe mode) does not escalate: it repeats the
    /// current level. History is forgotten `max_block_duration` after the
    /// last block ends.
    #[must_use]
    pub fn block(
        &self,
        policy: &Policy,
        source: IpAddr,
        origin: limiter_common::Reason,
        now: Instant,
    ) -> Option<BlockOrder> {
        let source = source.to_canonical();
        if policy.is_allowlisted(source) {
            return None;
        }
        Some(self.lock().block(policy, source, origin, now))
    }

    /// Records in `key`'s history a block another edge host ordered at
    /// backoff level `repeat`, running until `until`: this host's next
    /// block of the source escalates from there, as the deciding host's
    /// would (the history counted over the cluster). A level below what is
    /// known here changes nothing.
    pub fn remember_block(&self, key: IpNet, repeat: u32, until: Instant) {
        let mut tables = self.lock();
        let record = tables
            .history
            .touch(&key, || BlockRecord { blocks: 0, until });
        record.blocks = record.blocks.max(repeat.saturating_add(1));
        record.until = record.until.max(until);
    }

    /// Forgets the block history of `key` (a source key, as in
    /// [`BlockOrder::net`]), e.g. when an operator removes its block; whether
    /// there was any.
    pub fn unblock(&self, key: IpNet) -> bool {
        self.lock().history.remove(&key)
    }

    /// Drops the window entries with no event left in their window and the
    /// block histories past their memory, as of `now`; returns how many
    /// entries went. Walks every table under the lock (O(entries)): call it
    /// now and then (e.g. with the block sweep), not per decision.
    pub fn sweep(&self, policy: &Policy, now: Instant) -> usize {
        let mut tables = self.lock();
        let windows: usize = CountKind::ALL
            .into_iter()
            .map(|kind| tables.windows(kind).retain(live(now, policy.window(kind))))
            .sum();
        let memory = policy.blocks.max_block_duration;
        windows
            + tables
                .null_by_helo
                .retain(live(now, policy.window(CountKind::NullSender)))
            + tables
                .null_by_network
                .retain(live(now, policy.mail.null_sender_rate_per_network.per))
            + tables
                .auth_failures_by_account
                .retain(live(now, policy.auth.failed_auth_window))
            + tables
                .connection_rate
                .retain(|_, bucket| !bucket.is_empty(now))
            + tables
                .connection_rate_by_network
                .retain(|_, bucket| !bucket.is_empty(now))
            + tables
                .null_by_recipient
                .retain(|_, bucket| !bucket.is_empty(now))
            + tables
                .logins
                .retain(|_, at| now.saturating_duration_since(*at) < super::LOGIN_MEMORY)
            + tables
                .history
                .retain(|_, record| !record.forgotten(now, memory))
    }

    /// Runs `f` on the tables under the lock (one decision, atomically).
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Tables) -> R) -> R {
        f(&mut self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A guard that counts nothing (allow-listed sources).
    pub(super) fn uncounted_connection(
        self: &Arc<Self>,
        source: IpAddr,
        key: IpNet,
    ) -> ConnectionGuard {
        ConnectionGuard {
            state: Arc::clone(self),
            source,
            key,
            counted: false,
        }
    }

    /// Takes a place in `key`'s connection count, atomically with `check`.
    ///
    /// `check` sees the connections `key` holds already and says whether to
    /// refuse. Refused and `enforce`: nothing is counted (the guard is
    /// inert). Otherwise (accepted, or refused in observe mode, where the
    /// session goes on) the connection is counted — unless the table is full
    /// and `key` is new, which is a refusal of its own.
    pub(super) fn admit_connection(
        self: &Arc<Self>,
        source: IpAddr,
        key: IpNet,
        enforce: bool,
        check: impl FnOnce(u32) -> Option<Rejection>,
    ) -> (ConnectionGuard, Option<Rejection>) {
        let (counted, refusal) = {
            let mut tables = self.lock();
            let capacity = tables.capacity;
            admit(
                &mut tables.connections,
                &key,
                capacity,
                "connections",
                enforce,
                check,
            )
        };
        let guard = ConnectionGuard {
            state: Arc::clone(self),
            source,
            key,
            counted,
        };
        (guard, refusal)
    }

    /// Like [`PolicyState::admit_connection`] for a HELO name (lower-cased
    /// already). `limited`: whether the name has a cap at all; names without
    /// one are not counted (their `check` sees 0).
    pub(super) fn admit_helo(
        self: &Arc<Self>,
        name: String,
        limited: bool,
        enforce: bool,
        check: impl FnOnce(u32) -> Option<Rejection>,
    ) -> (HeloGuard, Option<Rejection>) {
        let (counted, refusal) = if limited {
            let mut tables = self.lock();
            let capacity = tables.capacity;
            admit(
                &mut tables.helo_sessions,
                &name,
                capacity,
                "helo-sessions",
                enforce,
                check,
            )
        } else {
            (false, check(0))
        };
        let guard = HeloGuard {
            state: Arc::clone(self),
            name,
            counted,
        };
        (guard, refusal)
    }
}

/// The shared admission logic of the live-count tables; returns whether the
/// session was counted, and the refusal if any.
fn admit<K: Hash + Eq + Clone>(
    table: &mut HashMap<K, u32>,
    key: &K,
    capacity: usize,
    table_name: &'static str,
    enforce: bool,
    check: impl FnOnce(u32) -> Option<Rejection>,
) -> (bool, Option<Rejection>) {
    let count = table.get(key).copied().unwrap_or(0);
    let full = count == 0 && table.len() >= capacity;
    let refusal = check(count).or_else(|| {
        full.then_some(Rejection {
            reason: Reason::StateFull {
                table: table_name,
                capacity,
            },
            action: Action::DeferAndClose,
            block: None,
        })
    });
    if (refusal.is_some() && enforce) || full {
        return (false, refusal);
    }
    let slot = table.entry(key.clone()).or_insert(0);
    *slot = slot.saturating_add(1);
    (true, refusal)
}

/// Gives back one place in a live-count table.
fn release<K: Hash + Eq>(table: &mut HashMap<K, u32>, key: &K) {
    if let Some(count) = table.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            table.remove(key);
        }
    }
}

impl Tables {
    /// Whether `key` (a source key) logged in as `name` within
    /// [`super::LOGIN_MEMORY`]: one of the account's familiar places.
    pub(super) fn logged_in_lately(&mut self, name: &str, key: IpNet, now: Instant) -> bool {
        self.logins
            .peek_mut(&(name.to_owned(), key))
            .is_some_and(|at| now.saturating_duration_since(*at) < super::LOGIN_MEMORY)
    }

    /// `kind`'s windows, by source key (by network for the per-network
    /// kinds).
    pub(super) fn windows(&mut self, kind: CountKind) -> &mut Lru<IpNet, Window> {
        match kind {
            CountKind::FailedRcpt => &mut self.failed_rcpt,
            CountKind::FailedAuth => &mut self.auth_failures,
            CountKind::FailedRcptPerNetwork => &mut self.failed_rcpt_by_network,
            CountKind::FailedAuthPerNetwork => &mut self.auth_failures_by_network,
            CountKind::NullSender => &mut self.null_by_source,
            CountKind::FilterReject => &mut self.filter_rejects,
            CountKind::ShedSession => &mut self.shed_sessions,
            CountKind::BlockedSources => &mut self.blocked_by_network,
        }
    }

    /// See [`PolicyState::block`]; `source` is canonical and not allow-listed.
    pub(super) fn block(
        &mut self,
        policy: &Policy,
        source: IpAddr,
        origin: limiter_common::Reason,
        now: Instant,
    ) -> BlockOrder {
        self.block_net(policy, policy.source_key(source), origin, now)
    }

    /// Orders a block of `net` (a source key, or a whole network past a
    /// per-network limit) with the backoff of `net`'s own history.
    pub(super) fn block_net(
        &mut self,
        policy: &Policy,
        net: IpNet,
        origin: limiter_common::Reason,
        now: Instant,
    ) -> BlockOrder {
        let memory = policy.blocks.max_block_duration;
        let record = self.history.touch(&net, || BlockRecord {
            blocks: 0,
            until: now,
        });
        if record.forgotten(now, memory) {
            record.blocks = 0;
        }
        let repeat = if record.blocks > 0 && now < record.until {
            // The previous block still runs: same offence, same level.
            record.blocks - 1
        } else {
            record.blocks
        };
        let duration = policy.block_duration(repeat);
        let until = now.checked_add(duration).unwrap_or(now);
        record.blocks = repeat.saturating_add(1);
        record.until = record.until.max(until);
        BlockOrder {
            net,
            origin,
            duration,
            repeat,
        }
    }
}

impl BlockRecord {
    /// Whether the history has aged out: `memory` after the last block ended.
    fn forgotten(&self, now: Instant, memory: std::time::Duration) -> bool {
        self.blocks == 0
            || self
                .until
                .checked_add(memory)
                .is_some_and(|forget_at| now >= forget_at)
    }
}

/// For [`Lru::retain`]: whether a window still holds an event once those
/// older than `span` before `now` are gone.
fn live<K>(now: Instant, span: Duration) -> impl FnMut(&K, &mut Window) -> bool {
    move |_, window| {
        window.expire(now, span);
        !window.is_empty()
    }
}

/// The key of a HELO name: trimmed and lower-cased (ASCII).
pub(super) fn helo_key(helo: &str) -> String {
    helo.trim().to_ascii_lowercase()
}

/// A connection's place in its source's count, given back on drop.
///
/// Returned by [`Policy::connect`]; the session keeps it for its whole life.
/// For allow-listed sources (and in observe mode when the table is full) it
/// counts nothing.
pub struct ConnectionGuard {
    state: Arc<PolicyState>,
    source: IpAddr,
    key: IpNet,
    counted: bool,
}

impl ConnectionGuard {
    /// The client's address (IPv4-mapped IPv6 normalised to IPv4).
    #[must_use]
    pub fn source(&self) -> IpAddr {
        self.source
    }

    /// The key the connection is counted under (IPv4 /32, IPv6 prefix).
    #[must_use]
    pub fn key(&self) -> IpNet {
        self.key
    }

    /// Whether this guard holds a place in the count.
    #[must_use]
    pub fn is_counted(&self) -> bool {
        self.counted
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.counted {
            release(&mut self.state.lock().connections, &self.key);
        }
    }
}

impl fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionGuard")
            .field("source", &self.source)
            .field("key", &self.key)
            .field("counted", &self.counted)
            .finish()
    }
}

/// A session's place in its HELO name's count, given back on drop. A second
/// HELO/EHLO in the session replaces it (pass the old one to
/// [`Policy::helo`], which releases it before counting the new name).
pub struct HeloGuard {
    state: Arc<PolicyState>,
    name: String,
    counted: bool,
}

impl HeloGuard {
    /// The HELO name, trimmed and lower-cased.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this guard holds a place in the count (only names with a
    /// `limits.helo` cap are counted).
    #[must_use]
    pub fn is_counted(&self) -> bool {
        self.counted
    }
}

impl Drop for HeloGuard {
    fn drop(&mut self) {
        if self.counted {
            release(&mut self.state.lock().helo_sessions, &self.name);
        }
    }
}

impl fmt::Debug for HeloGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeloGuard")
            .field("name", &self.name)
            .field("counted", &self.counted)
            .finish()
    }
}

#[cfg(test)]
mod sink_tests {
    use super::*;
    use crate::config::Config;
    use crate::policy::SessionCounters;

    /// A sink that keeps what it is given.
    #[derive(Default)]
    struct Kept(Mutex<Vec<Counted>>);

    impl CountSink for Kept {
        fn counted(&self, event: Counted) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn setup(toml: &str) -> (Policy, PolicyState, Arc<Kept>) {
        let policy = Policy::new(&Config::from_toml(toml).unwrap());
        let state = PolicyState::new();
        let kept = Arc::new(Kept::default());
        assert!(state.set_sink(kept.clone()));
        assert!(!state.set_sink(Arc::new(Kept::default())));
        (policy, state, kept)
    }

    fn taken(kept: &Kept) -> Vec<(CountKind, bool, u32, Duration)> {
        std::mem::take(&mut *kept.0.lock().unwrap())
            .into_iter()
            .map(|e| (e.kind, e.blocked, e.limit, e.window))
            .collect()
    }

    #[test]
    fn network_window_events_reach_the_sink_keyed_by_the_network() {
        let (policy, state, kept) = setup(
            "[limits]\nmax_failed_auth = 100\nmax_failed_auth_per_network = 1\n\
             max_failed_rcpt_per_source = 0\nmax_failed_rcpt_per_network = 7",
        );
        let now = Instant::now();
        assert!(policy
            .auth_failed(&state, "192.0.2.1".parse().unwrap(), None, now)
            .is_none());
        let order = policy
            .auth_failed(&state, "192.0.2.2".parse().unwrap(), None, now)
            .expect("the network's block")
            .verdict
            .block
            .expect("a block");
        let network: IpNet = "192.0.2.0/24".parse().unwrap();
        assert_eq!(order.net, network);
        let events = std::mem::take(&mut *kept.0.lock().unwrap());
        let network_events: Vec<_> = events
            .iter()
            .filter(|e| e.kind == CountKind::FailedAuthPerNetwork)
            .map(|e| (e.net, e.blocked, e.limit))
            .collect();
        assert_eq!(network_events, [(network, false, 1), (network, true, 1)]);
        // A failed recipient: its network's event, the limit with it.
        let mut counters = SessionCounters::default();
        let _ = policy.rcpt_result(
            &state,
            "2001:db8:1:2::3".parse().unwrap(),
            &mut counters,
            false,
            crate::policy::Familiarity::Stranger,
            now,
        );
        let events = std::mem::take(&mut *kept.0.lock().unwrap());
        assert_eq!(
            events
                .iter()
                .map(|e| (e.kind, e.net, e.limit))
                .collect::<Vec<_>>(),
            [(
                CountKind::FailedRcptPerNetwork,
                "2001:db8:1::/48".parse().unwrap(),
                7
            )]
        );
    }

    #[test]
    fn every_window_event_reaches_the_sink_with_its_rule() {
        let (policy, state, kept) = setup(
            "[limits]\nmax_failed_auth = 2\nfailed_auth_window = \"5m\"\n\
             max_failed_rcpt = 1\nmax_failed_rcpt_per_source = 4\nfailed_rcpt_window = \"1h\"\n\
             null_sender_rate = \"1/1m\"\nmax_failed_auth_per_network = 0\n\
             max_failed_rcpt_per_network = 0\n[lists]\nallow = [\"192.0.2.99\"]",
        );
        let now = Instant::now();
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let auth = (CountKind::FailedAuth, false, 2, Duration::from_secs(300));
        for _ in 0..2 {
            assert!(policy.auth_failed(&state, source, None, now).is_none());
        }
        assert!(policy.auth_failed(&state, source, None, now).is_some());
        assert_eq!(taken(&kept), [auth, auth, (auth.0, true, 2, auth.3)]);

        // Failed RCPTs: the per-source window's events; the session's own
        // harvest block starts the window afresh everywhere.
        let mut counters = SessionCounters::default();
        let rcpt = (CountKind::FailedRcpt, false, 4, Duration::from_secs(3600));
        assert!(policy
            .rcpt_result(
                &state,
                source,
                &mut counters,
                false,
                crate::policy::Familiarity::Stranger,
                now
            )
            .is_none());
        assert!(policy
            .rcpt_result(
                &state,
                source,
                &mut counters,
                false,
                crate::policy::Familiarity::Stranger,
                now
            )
            .is_some());
        assert_eq!(taken(&kept), [rcpt, (rcpt.0, true, 4, rcpt.3)]);

        // Null senders: the block's threshold (twice the rate).
        for _ in 0..3 {
            let _ = policy.mail_from(&state, source, Some("h.test"), true, now);
        }
        let null = (CountKind::NullSender, false, 2, Duration::from_secs(60));
        assert_eq!(taken(&kept), [null, null, (null.0, true, 2, null.3)]);

        // Nothing of an allow-listed source, nor of a MAIL with a sender.
        let allowed: IpAddr = "192.0.2.99".parse().unwrap();
        let _ = policy.auth_failed(&state, allowed, None, now);
        let _ = policy.mail_from(&state, allowed, None, true, now);
        let _ = policy.mail_from(&state, source, None, false, now);
        assert_eq!(taken(&kept), []);
    }

    #[test]
    fn a_block_ordered_elsewhere_counts_in_the_backoff_here() {
        let (policy, state, _) = setup("[limits]\nmax_failed_auth = 2");
        let now = Instant::now();
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let net = policy.source_key(source);
        // Another host blocked the source at level 2, ending in an hour.
        state.remember_block(net, 2, now + Duration::from_secs(3600));
        // While it runs, a block here repeats its level …
        let during = state
            .block(&policy, source, limiter_common::Reason::Auth, now)
            .unwrap();
        assert_eq!(during.repeat, 2);
        // … and after it, escalates from it.
        let later = now + Duration::from_secs(2 * 3600);
        let after = state
            .block(&policy, source, limiter_common::Reason::Auth, later)
            .unwrap();
        assert_eq!(after.repeat, 3);
        assert_eq!(after.duration, policy.block_duration(3));
        // A lower level from elsewhere does not lower what is known.
        state.remember_block(net, 0, later + Duration::from_secs(60));
        let past = later + after.duration + Duration::from_secs(1);
        let next = state
            .block(&policy, source, limiter_common::Reason::Auth, past)
            .unwrap();
        assert_eq!(next.repeat, 4);
    }

    #[test]
    fn a_window_over_its_limit_elsewhere_blocks_as_here_and_starts_afresh() {
        let (policy, state, _) = setup(
            "[limits]\nmax_failed_auth = 2\nipv6_prefix = 64\n[lists]\nallow = [\"192.0.2.99\"]",
        );
        let now = Instant::now();
        let source: IpAddr = "192.0.2.1".parse().unwrap();
        let net = policy.source_key(source);
        policy.auth_failed(&state, source, None, now);
        policy.auth_failed(&state, source, None, now);
        let decision = policy
            .over_cluster_wide(&state, CountKind::FailedAuth, net, now)
            .expect("a block");
        assert!(decision.enforced);
        assert_eq!(
            (
                decision.verdict.net,
                decision.verdict.origin,
                decision.verdict.repeat
            ),
            (net, limiter_common::Reason::Auth, 0)
        );
        assert_eq!(decision.verdict.duration, policy.block_duration(0));
        // The local window started afresh: two more failures pass.
        assert!(policy.auth_failed(&state, source, None, now).is_none());
        assert!(policy.auth_failed(&state, source, None, now).is_none());
        // The backoff remembers it: the next block, later, is a repeat.
        let later = now + Duration::from_secs(3 * 3600);
        let again = policy
            .over_cluster_wide(&state, CountKind::FailedAuth, net, later)
            .unwrap();
        assert_eq!(again.verdict.repeat, 1);
        // An IPv6 source key is blocked as itself.
        let v6 = policy.source_key("2001:db8::5".parse().unwrap());
        let order = policy
            .over_cluster_wide(&state, CountKind::FailedRcpt, v6, now)
            .unwrap()
            .verdict;
        assert_eq!(
            (order.net, order.origin),
            (v6, limiter_common::Reason::Harvest)
        );
        // Never an allow-listed source.
        let allowed = policy.source_key("192.0.2.99".parse().unwrap());
        assert!(policy
            .over_cluster_wide(&state, CountKind::FailedAuth, allowed, now)
            .is_none());
    }
}
