//! The SMTP proxy: listeners, sessions relayed to the backend MTA, the
//! client identity handed to it, and the blocks it orders.

pub mod backend;
pub mod capabilities;
pub mod early;
pub mod identity;
mod latch;
pub mod notices;
pub mod session;
pub mod shed;
pub mod slots;
pub mod spool;
pub mod tls;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::SystemTime,
};

use anyhow::Context as _;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::{
    blocks::{Block, Blocks},
    config::{self, BackendConnect, Config, Smtp, TlsMode},
    kernel::Datapath,
    policy::{BlockOrder, ConnectVerdict, Policy, PolicyState},
    smtp::reply::Reply,
};
use backend::BackendSettings;
use session::Session;
use tls::ClientStream;

/// What the sessions need from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub smtp: Smtp,
    pub backend: BackendSettings,
    /// The proxy's own name (EHLO to the backend before XCLIENT).
    pub hostname: String,
    /// AUTH waits for TLS ([`Config::auth_requires_tls`]).
    pub auth_requires_tls: bool,
    /// When sessions get their backend connection (`backend.connect`).
    pub connect: BackendConnect,
    /// Whether recent senders get theirs at accept (`backend.early_connect`).
    pub early_connect: config::EarlyConnect,
    /// Longest wait for a backend slot (`backend.slot_wait`).
    pub slot_wait: std::time::Duration,
    /// How often the backend's capabilities are probed.
    pub probe_interval: std::time::Duration,
}

impl Settings {
    /// # Errors
    /// `backend.tls_ca` cannot be loaded.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let hostname = hostname();
        let tls = if config.backend.starttls {
            Some((
                tls::backend_connector(config.backend.tls_ca.as_deref())?,
                hostname.clone(),
            ))
        } else {
            None
        };
        Ok(Self {
            smtp: config.smtp.clone(),
            backend: BackendSettings {
                address: config.backend.address,
                identity: config.backend.identity,
                connect_timeout: config.backend.connect_timeout,
                reply_timeout: config.smtp.backend_timeout,
                tls,
            },
            hostname,
            auth_requires_tls: config.auth_requires_tls(),
            connect: config.backend.connect,
            early_connect: config.backend.early_connect,
            slot_wait: config.backend.slot_wait,
            probe_interval: config.backend.probe_interval,
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "smtp-limiter".to_owned())
}

/// Upper bounds (seconds) of the backend reply latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 9] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5];

/// A Prometheus-style histogram of backend reply latencies.
#[derive(Default)]
pub struct LatencyHistogram {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS`], then +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.buckets[LATENCY_BUCKETS.len()].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// (cumulative count per bucket incl. +Inf, sum in seconds).
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let counts = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        (counts, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Counts by reason name (a handful of stable names, so a map is fine).
#[derive(Default)]
pub struct ReasonCounts(Mutex<HashMap<&'static str, u64>>);

impl ReasonCounts {
    pub fn add(&self, reason: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(reason)
            .or_default() += 1;
    }

    /// The counts, sorted by reason.
    pub fn list(&self) -> Vec<(&'static str, u64)> {
        let mut list: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        list.sort();
        list
    }
}

/// Proxy counters (read by `stats` and metrics).
#[derive(Default)]
pub struct ProxyStats {
    /// Latency of backend replies to relayed commands.
    pub backend_latency: LatencyHistogram,
    pub sessions_total: AtomicU64,
    pub sessions_open: AtomicU64,
    pub messages: AtomicU64,
    pub backend_errors: AtomicU64,
    pub blocks_issued: AtomicU64,
    blocks_by_reason: ReasonCounts,
    rejections: ReasonCounts,
    /// Sessions closed under pressure, by reason (also among `rejections`).
    shed: ReasonCounts,
    /// Early backend connections ([`early`]), by outcome: used, unused.
    early_links: ReasonCounts,
    /// Transactions parked off their backend slot, by outcome: parked,
    /// resumed, refused (the new connection refused a line of it).
    parked: ReasonCounts,
}

impl ProxyStats {
    pub fn count_message(&self) {
        self.messages.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_backend_error(&self) {
        self.backend_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_rejection(&self, reason: &'static str) {
        self.rejections.add(reason);
    }

    pub fn count_block(&self, reason: &'static str) {
        self.blocks_issued.fetch_add(1, Ordering::Relaxed);
        self.blocks_by_reason.add(reason);
    }

    /// Blocks issued by reason name.
    pub fn blocks_by_reason(&self) -> Vec<(&'static str, u64)> {
        self.blocks_by_reason.list()
    }

    /// Rejections by reason name.
    pub fn rejections(&self) -> Vec<(&'static str, u64)> {
        self.rejections.list()
    }

    /// Counts a session shed under pressure: by reason, and among the
    /// rejections.
    pub fn count_shed(&self, reason: &'static str) {
        self.rejections.add(reason);
        self.shed.add(reason);
    }

    /// Sessions shed under pressure by reason name.
    pub fn shed(&self) -> Vec<(&'static str, u64)> {
        self.shed.list()
    }

    pub fn count_early_link(&self, outcome: &'static str) {
        self.early_links.add(outcome);
    }

    /// Early backend connections by outcome.
    pub fn early_links(&self) -> Vec<(&'static str, u64)> {
        self.early_links.list()
    }

    pub fn count_parked(&self, outcome: &'static str) {
        self.parked.add(outcome);
    }

    /// Parked transactions by outcome.
    pub fn parked(&self) -> Vec<(&'static str, u64)> {
        self.parked.list()
    }
}

/// Everything the sessions share.
pub struct ProxyContext {
    /// What the sessions need from the configuration; replaced whole on
    /// reload (each session keeps the one it began with).
    settings: std::sync::RwLock<Arc<Settings>>,
    /// The policy in force; replaced whole on reload.
    policy: std::sync::RwLock<Arc<Policy>>,
    pub state: Arc<PolicyState>,
    pub kernel: Arc<dyn Datapath>,
    pub blocks: Blocks,
    /// The certificate clients get; reloaded on reload (a renewed
    /// certificate needs no restart).
    tls: std::sync::RwLock<Option<TlsAcceptor>>,
    pub stats: ProxyStats,
    /// The open sessions by client, so that a new block ends the blocked
    /// source's sessions at once instead of letting them linger (the kernel
    /// drops their packets).
    pub block_notices: Arc<notices::BlockNotices>,
    /// Valid recipients from `[recipients.ldap]`, if configured.
    pub recipients: Option<Arc<crate::recipients::Recipients>>,
    /// Content scanners from `[filters]`, if any is configured.
    pub filters: Option<Arc<crate::filters::Filters>>,
    /// One permit per open session (`smtp.max_sessions`), taken at accept
    /// before anything else (the TLS handshake of an implicit-TLS listener
    /// included) and held until the session ends.
    pub session_slots: Arc<tokio::sync::Semaphore>,
    /// Backend connections open at once (`backend.max_connections`),
    /// shared fairly between source networks.
    pub backend_slots: Arc<slots::BackendSlots>,
    /// Memory for copies of messages on their way to the backend
    /// (`backend.spool_size`).
    pub spool: Arc<spool::SpoolBudget>,
    /// Sessions that may be shed when `smtp.max_sessions` is reached.
    pub sessions: Arc<shed::Sessions>,
    /// The backend's greeting and EHLO capabilities, learned by probing.
    pub capabilities: capabilities::Capabilities,
    /// Sources whose mail the backend accepted lately: they may get their
    /// backend connection at accept ([`early`]).
    pub recent_senders: early::RecentSenders,
    /// Blocks shared with the other edge hosts (`[cluster]`).
    pub cluster: crate::cluster::Cluster,
}

impl ProxyContext {
    /// Builds the context from a validated configuration.
    ///
    /// # Errors
    /// The TLS certificate or key cannot be loaded.
    pub fn new(config: &Config, kernel: Arc<dyn Datapath>) -> anyhow::Result<Self> {
        let tls = match &config.tls {
            Some(tls) => Some(tls::acceptor(&tls.certificate, &tls.key)?),
            None => None,
        };
        Ok(Self {
            settings: std::sync::RwLock::new(Arc::new(Settings::from_config(config)?)),
            policy: std::sync::RwLock::new(Arc::new(Policy::new(config))),
            state: Arc::new(PolicyState::new()),
            kernel,
            blocks: Blocks::with_capacity(config.state.max_blocks),
            tls: std::sync::RwLock::new(tls),
            stats: ProxyStats::default(),
            block_notices: Arc::default(),
            recipients: crate::recipients::start(config),
            filters: crate::filters::Filters::from_config(&config.filters)
                .map_err(|e| anyhow::anyhow!("filters.rspamd.url: {e}"))?,
            session_slots: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.smtp.max_sessions).unwrap_or(usize::MAX),
            )),
            backend_slots: Arc::new(slots::BackendSlots::new(
                usize::try_from(config.backend.max_connections).unwrap_or(usize::MAX),
                config.backend.fair_share_prefix_v4,
                config
                    .backend
                    .fair_share_prefix_v6
                    .unwrap_or(config.limits.ipv6_prefix),
                config.limits.shed_sessions_window,
            )),
            spool: Arc::new(spool::SpoolBudget::new(config.backend.spool_size)),
            sessions: Arc::new(shed::Sessions::default()),
            capabilities: capabilities::Capabilities::default(),
            recent_senders: early::RecentSenders::default(),
            cluster: crate::cluster::Cluster::default(),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The TLS acceptor for clients, if `[tls]` is configured.
    pub fn tls(&self) -> Option<TlsAcceptor> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts a reloaded configuration's settings and certificate in force
    /// for the sessions that begin from now on. What only a restart can
    /// change (listeners, `smtp.max_sessions`, the backend slots) is left
    /// as it is: the caller reports it.
    ///
    /// # Errors
    /// The certificate, key or `backend.tls_ca` cannot be loaded: nothing
    /// is changed.
    pub fn reconfigure(&self, config: &Config) -> anyhow::Result<()> {
        let settings = Settings::from_config(config)?;
        let tls = match &config.tls {
            Some(tls) => Some(tls::acceptor(&tls.certificate, &tls.key)?),
            None => None,
        };
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(settings);
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        self.spool.set_limit(config.backend.spool_size);
        self.capabilities.probe_soon();
        Ok(())
    }

    /// Whether the proxy is under stress: open sessions at or over
    /// `smtp.stress_threshold` of `smtp.max_sessions`, or every backend
    /// slot in use. Sessions without a MAIL then get short timeouts.
    /// `smtp`: the session's settings (asked on every read: no lock).
    pub fn stressed(&self, smtp: &Smtp) -> bool {
        let open = self.stats.sessions_open.load(Ordering::Relaxed) as f64;
        open >= smtp.stress_threshold * f64::from(smtp.max_sessions) || self.backend_slots.full()
    }

    /// Counts and logs a session shed under pressure.
    pub fn count_shed(&self, source: std::net::IpAddr, reason: &'static str) {
        self.stats.count_shed(reason);
        tracing::info!(source = %source, reason, action = "shed", "session shed under pressure");
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts a new policy in force (reload); sessions take it from their
    /// next decision on. Connection and HELO counts carry over.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
    }

    /// Why `source` is blocked (the origin's name), if it is: by the
    /// proxy's own list, or by the kernel's maps (blocks added with the
    /// CLI, or while the packet program is attached nowhere, e.g. on
    /// loopback).
    pub fn blocked(&self, source: std::net::IpAddr) -> Option<&'static str> {
        if let Some(block) = self.blocks.covering(source, SystemTime::now()) {
            return Some(block.origin.name());
        }
        match self.kernel.block_covering(source) {
            Ok(hit) => hit.map(|h| crate::blocks::origin_name(h.origin)),
            Err(e) => {
                tracing::debug!(error = %e, "reading the kernel block maps");
                None
            }
        }
    }

    /// Puts `block` in force, whoever decided it (a session, the CLI,
    /// another edge host): the kernel's maps first, then the table (the
    /// proxy's refusals, the journal), then the source's open sessions are
    /// told. A client told by any session that it is blocked and
    /// reconnecting at once must find its SYN dropped.
    ///
    /// # Errors
    /// The kernel's maps refused the block; the table holds it anyway.
    pub fn enforce(&self, block: Block) -> Result<(), crate::kernel::KernelError> {
        let net = block.net;
        let pushed = self.kernel.block(net, block.expires, block.origin);
        self.blocks.insert_marked(block, pushed.is_ok());
        self.block_notices.notify(net);
        pushed
    }

    /// Takes the block on `net` away, whoever asked (the CLI, another edge
    /// host): from the table and the kernel's maps, where a reject list
    /// that holds `net` (`listed`) gets its permanent entry back; and the
    /// source's block history goes, so a next block starts from the first
    /// level.
    pub fn lift(&self, net: ipnet::IpNet, listed: bool) -> Lifted {
        let in_table = self.blocks.remove(&net);
        let in_kernel = if listed {
            let _ = self
                .kernel
                .block(net, None, limiter_common::Reason::RejectList);
            false
        } else {
            self.kernel.unblock(net).unwrap_or(false)
        };
        self.state.unblock(net);
        Lifted {
            in_table,
            in_kernel,
        }
    }

    /// Carries out a block: the proxy's own list and the kernel's maps.
    pub fn block(&self, order: &BlockOrder) {
        // `order.duration` is at most `limits.max_block_duration`, which
        // validation keeps far below the clock's range.
        let expires = SystemTime::now()
            .checked_add(order.duration)
            .unwrap_or(SystemTime::UNIX_EPOCH + config::MAX_BLOCK_DURATION);
        let block = Block {
            net: order.net,
            origin: order.origin,
            expires: Some(expires),
            since: SystemTime::now(),
            repeat: order.repeat,
            comment: None,
        };
        // Queued for the other edge hosts (Redis is not waited for).
        self.cluster.publish_block(&block);
        let pushed = self.enforce(block);
        self.stats.count_block(order.origin.name());
        let kernel = match pushed {
            Ok(()) => "blocked",
            Err(e) => {
                tracing::warn!(net = %order.net, error = %e, "block not pushed to the kernel; the proxy still refuses the source");
                "not-in-kernel"
            }
        };
        tracing::info!(
            net = %order.net,
            reason = order.origin.name(),
            duration = %humantime::format_duration(order.duration),
            repeat = order.repeat,
            kernel,
            action = "block",
            "source blocked"
        );
        // One source too many of its network blocked lately: the network
        // (whose own order counts for nothing here, so this ends).
        let policy = self.policy();
        if let Some(network) = policy.source_blocked(&self.state, order, std::time::Instant::now())
        {
            if network.enforced && !self.blocks.contains(&network.verdict.net) {
                self.block(&network.verdict);
            }
        }
    }
}

/// What [`ProxyContext::lift`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifted {
    /// The table held a block on the network.
    pub in_table: bool,
    /// The kernel held a block on it that is gone (a listed network's
    /// entry stays: `false`).
    pub in_kernel: bool,
}

/// A bound listener and how it speaks.
pub struct BoundListener {
    pub listener: TcpListener,
    pub tls: TlsMode,
}

/// Binds every `[[listen]]` address.
///
/// # Errors
/// An address cannot be bound (in use, no permission for a port < 1024).
pub async fn bind(config: &Config) -> anyhow::Result<Vec<BoundListener>> {
    let mut bound = Vec::new();
    for listen in &config.listen {
        let listener = TcpListener::bind(listen.address)
            .await
            .with_context(|| format!("listen.address {}: cannot bind", listen.address))?;
        bound.push(BoundListener {
            listener,
            tls: listen.tls,
        });
    }
    Ok(bound)
}

/// Serves the listeners until `shutdown` turns true, then lets open sessions
/// finish within `smtp.shutdown_grace` and cuts the rest (they get 421).
pub async fn serve(
    ctx: Arc<ProxyContext>,
    listeners: Vec<BoundListener>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (stop_sessions, session_stop) = watch::channel(false);
    let mut accepts = JoinSet::new();
    for bound in listeners {
        let ctx = ctx.clone();
        let session_stop = session_stop.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<(TcpStream, SocketAddr, TlsMode)>(64);
        accepts.spawn(accept_loop(bound, tx));
        accepts.spawn(dispatch(ctx, rx, session_stop));
    }
    if ctx.settings().connect.earned() {
        accepts.spawn(capabilities::run_probes(ctx.clone()));
    }
    let _ = shutdown.wait_for(|stop| *stop).await;
    accepts.abort_all();
    tracing::info!(grace = %humantime::format_duration(ctx.settings().smtp.shutdown_grace), "stopping: no new sessions");
    let _ = stop_sessions.send(true);
    let _ = tokio::time::timeout(ctx.settings().smtp.shutdown_grace, async {
        while ctx.stats.sessions_open.load(Ordering::Relaxed) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let left = ctx.stats.sessions_open.load(Ordering::Relaxed);
    if left > 0 {
        tracing::warn!(
            sessions = left,
            "grace period over: cutting the sessions still open"
        );
    }
}

async fn accept_loop(
    bound: BoundListener,
    tx: tokio::sync::mpsc::Sender<(TcpStream, SocketAddr, TlsMode)>,
) {
    loop {
        match bound.listener.accept().await {
            Ok((stream, peer)) => {
                if tx.send((stream, peer, bound.tls)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn dispatch(
    ctx: Arc<ProxyContext>,
    mut rx: tokio::sync::mpsc::Receiver<(TcpStream, SocketAddr, TlsMode)>,
    stop: watch::Receiver<bool>,
) {
    while let Some((stream, peer, tls)) = rx.recv().await {
        let ctx = ctx.clone();
        let stop = stop.clone();
        let Ok(slot) = ctx.session_slots.clone().try_acquire_owned() else {
            // At the cap: an idle session makes room, else the slowest
            // message in the spool, else a session in its first seconds
            // ([`shed`]).
            if ctx.sessions.shed_oldest_idle()
                || ctx.spool.evict_slowest()
                || ctx.sessions.shed_oldest_new()
            {
                tokio::spawn(async move {
                    let freed =
                        tokio::time::timeout(SHED_WAIT, ctx.session_slots.clone().acquire_owned())
                            .await;
                    match freed {
                        Ok(Ok(slot)) => {
                            handle_connection(ctx, stream, peer, tls, stop).await;
                            drop(slot);
                        }
                        _ => too_many_sessions(&ctx, stream, peer).await,
                    }
                });
                continue;
            }
            tokio::spawn(async move { too_many_sessions(&ctx, stream, peer).await });
            continue;
        };
        tokio::spawn(async move {
            handle_connection(ctx, stream, peer, tls, stop).await;
            drop(slot);
        });
    }
}

/// How long a new client waits for the session that was shed to make room
/// for it to end.
const SHED_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Refuses a client because `smtp.max_sessions` are open.
async fn too_many_sessions(ctx: &ProxyContext, stream: TcpStream, peer: SocketAddr) {
    tracing::info!(source = %peer.ip().to_canonical(), reason = "too-many-sessions", action = "defer", "session cap reached (smtp.max_sessions)");
    ctx.stats.count_rejection("too-many-sessions");
    refuse(ctx, stream, &Reply::too_many_sessions()).await;
}

/// A policy refusal at accept: counted and logged; when `enforced` the
/// block that comes with it is put in force (before the reply: a client
/// that reconnects on reading it finds its SYN dropped). Returns
/// `enforced`: whether the connection is to be refused.
fn connection_refused(
    ctx: &ProxyContext,
    source: std::net::IpAddr,
    rejection: &crate::policy::Rejection,
    enforced: bool,
) -> bool {
    ctx.stats.count_rejection(rejection.name());
    tracing::info!(
        source = %source,
        reason = rejection.name(),
        detail = %rejection.reason,
        action = if enforced { "reject" } else { "would-reject" },
        "connection refused"
    );
    if let (true, Some(order)) = (enforced, &rejection.block) {
        ctx.block(order);
    }
    enforced
}

/// Answers a connection that is refused at accept, within
/// `smtp.write_timeout` (a client that does not read must not hold a task),
/// and closes it.
async fn refuse(ctx: &ProxyContext, mut stream: TcpStream, reply: &Reply) {
    let write = async {
        stream.write_all(&reply.to_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(ctx.settings().smtp.write_timeout, write).await;
}

/// Accept-time decisions, then the session.
async fn handle_connection(
    ctx: Arc<ProxyContext>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: TlsMode,
    stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let source = peer.ip().to_canonical();
    if let Some(reason) = ctx.blocked(source) {
        if ctx.policy().enforced() && !ctx.policy().is_allowlisted(source) {
            tracing::info!(source = %source, reason, action = "reject", "blocked source connected");
            ctx.stats.count_rejection("blocked");
            let why = format!("{source} is blocked ({reason})");
            refuse(&ctx, stream, &Reply::blocked(&why)).await;
            return;
        }
    }
    let policy = ctx.policy();
    let rate = policy.connection_rate(&ctx.state, source, std::time::Instant::now());
    if let Some(decision) = rate {
        if connection_refused(&ctx, source, &decision.verdict, decision.enforced) {
            refuse(&ctx, stream, &session::rejection_reply(&decision.verdict)).await;
            return;
        }
    }
    let decision = policy.connect(&ctx.state, source);
    let guard = match decision.verdict {
        ConnectVerdict::Allowlisted(guard) | ConnectVerdict::Accept(guard) => guard,
        ConnectVerdict::Reject { rejection, guard } => {
            let enforced = connection_refused(&ctx, source, &rejection, decision.enforced);
            match guard {
                // Observe mode: the session goes on.
                Some(guard) if !enforced => guard,
                _ => {
                    let reply = match rejection.action {
                        crate::policy::Action::RefuseAndClose => Reply::service_unavailable(),
                        _ => Reply::too_many_connections(),
                    };
                    refuse(&ctx, stream, &reply).await;
                    return;
                }
            }
        }
    };
    let local = stream.local_addr().unwrap_or(peer);
    // An implicit-TLS client's handshake is the session's first step.
    let client = ClientStream::Plain(stream);
    // The session's id and the client's address and port go on every line
    // the session logs (a tracing span), so that its lines can be followed.
    let id = ctx.stats.sessions_total.fetch_add(1, Ordering::Relaxed) + 1;
    let span = tracing::info_span!("session", id, client = %peer);
    ctx.stats.sessions_open.fetch_add(1, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let session = Session::new(ctx.clone(), client, peer, local, tls, guard, stop);
    let summary = session.run().instrument(span.clone()).await;
    ctx.stats.sessions_open.fetch_sub(1, Ordering::Relaxed);
    let _in_session = span.enter();
    tracing::info!(
        source = %source,
        helo = summary.helo.as_deref(),
        messages = summary.messages,
        rcpt_accepted = summary.rcpt_accepted,
        rcpt_failed = summary.rcpt_failed,
        outcome = summary.outcome,
        duration_ms = started.elapsed().as_millis() as u64,
        "session end"
    );
}
