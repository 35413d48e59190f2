//! The running agent: brings up the kernel layer as the configuration says,
//! applies the lists and limits, serves the SMTP proxy, reports kernel
//! drops, sweeps expired blocks, and on SIGINT/SIGTERM stops accepting, lets
//! sessions finish within the grace period and detaches. Under systemd
//! (`Type=notify`) it reports READY=1 once its stored blocks are back and its
//! listeners are up, and its stage in STATUS=.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use limiter_common::DropReason;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

use crate::{
    commands,
    config::{Config, KernelMode},
    control,
    kernel::{BpfDatapath, Datapath, KernelLimits, KernelOptions, NoKernel},
    lists::{self, ListSet},
    metrics,
    proxy::{self, ProxyContext},
    sink,
    state::{self, Journal, Store},
};

/// How often expired blocks are swept from the kernel maps.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Longest wait at start for the cluster's blocks (a failed connection to
/// Redis ends it sooner: its connect timeout is 5 s).
const CLUSTER_FIRST_PASS: Duration = Duration::from_secs(30);

/// The kernel limits a configuration asks for.
pub fn kernel_limits(config: &Config) -> KernelLimits {
    KernelLimits {
        max_connections: config.limits.max_connections_per_source,
        ipv6_prefix_len: config.limits.ipv6_prefix,
        ports: config.kernel.ports.clone(),
        events_per_second: config.kernel.events_per_second,
        observe: config.mode == crate::config::Mode::Observe,
    }
}

/// The kernel layer as `kernel.mode` says: loaded and attached, or off
/// (with the reason, loudly, in `auto`).
///
/// # Errors
/// `kernel.mode = "required"` and loading or attaching failed.
pub fn bring_up_kernel(config: &Config, object: Option<PathBuf>) -> anyhow::Result<Kernel> {
    if config.kernel.mode == KernelMode::Off {
        return Ok(Kernel::Off(Arc::new(NoKernel::new(
            "kernel.mode = \"off\"",
        ))));
    }
    let options = KernelOptions {
        object,
        pin_path: config.kernel.pin_path.clone(),
        map_sizes: config.kernel.map_sizes,
        limits: kernel_limits(config),
    };
    let loaded = BpfDatapath::load(&options).and_then(|datapath| {
        for interface in &config.kernel.interfaces {
            let attachment = datapath.attach(interface, config.kernel.attach)?;
            tracing::info!(interface, mode = attachment.mode, "packet program attached");
        }
        Ok(datapath)
    });
    match (loaded, config.kernel.mode) {
        (Ok(datapath), _) => Ok(Kernel::Loaded(Arc::new(datapath))),
        (Err(e), KernelMode::Required) => {
            Err(e).context("kernel.mode = \"required\": the kernel layer could not be brought up")
        }
        (Err(e), _) => {
            let why = format!("BPF could not be loaded: {e}");
            tracing::error!(
                reason = %why,
                "KERNEL LAYER OFF (kernel.mode = \"auto\"): nothing is dropped in the kernel; set kernel.mode = \"required\" to refuse to start instead"
            );
            Ok(Kernel::Off(Arc::new(NoKernel::new(why))))
        }
    }
}

/// The kernel layer of a running agent.
pub enum Kernel {
    Loaded(Arc<BpfDatapath>),
    Off(Arc<NoKernel>),
}

impl Kernel {
    pub fn datapath(&self) -> Arc<dyn Datapath> {
        match self {
            Self::Loaded(d) => d.clone(),
            Self::Off(d) => d.clone(),
        }
    }
}

/// Puts the configuration's lists and per-network caps into the kernel:
/// allow-list entries, the reject list as permanent blocks.
///
/// # Errors
/// A kernel map refused an entry (full, or the layer is off).
pub fn apply_lists(config: &Config, datapath: &dyn Datapath) -> anyhow::Result<()> {
    let applied = lists::apply(None, &ListSet::of(&config.lists), datapath, None);
    if let Some(error) = applied.errors.first() {
        anyhow::bail!(
            "{error} ({} list entries refused in all)",
            applied.errors.len()
        );
    }
    for source in &config.limits.source {
        datapath
            .set_cap(source.cidr, source.max_connections)
            .with_context(|| format!("limits.source {}: max_connections", source.cidr))?;
    }
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// The kernel layer is required and cannot be brought up, or the lists
/// cannot be applied.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    object: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = config;
    if config.lists.from_files == crate::lists::FileLists::default() {
        config
            .lists
            .read_files()
            .context("the list files (lists.reject_files, lists.allow_files)")?;
    }
    notify("STATUS=loading the kernel programs");
    let kernel = bring_up_kernel(&config, object)?;
    let datapath = kernel.datapath();
    tracing::info!(status = %datapath.describe(), "kernel layer");
    if let Kernel::Loaded(_) = kernel {
        apply_lists(&config, datapath.as_ref())?;
    } else if config.lists.reject_nets().next().is_some()
        || config.lists.allow_nets().next().is_some()
    {
        tracing::warn!(
            "lists.allow and lists.reject (and their files) are not enforced in the kernel: the kernel layer is off"
        );
    }
    if config.backend.builtin {
        let listener = tokio::net::TcpListener::bind(config.backend.address)
            .await
            .with_context(|| {
                format!(
                    "backend.address {}: cannot bind the built-in backend",
                    config.backend.address
                )
            })?;
        tracing::warn!(address = %config.backend.address, "built-in test backend on (backend.builtin = true): messages are discarded");
        let recipients = Arc::new(config.backend.builtin_recipients.clone());
        tokio::spawn(sink::serve(listener, recipients, Arc::default()));
    }
    let ctx = Arc::new(ProxyContext::new(&config, datapath.clone())?);
    let store = match Store::open(&config.state.directory) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            tracing::error!(error = %e, "BLOCKS ARE NOT PERSISTED: the state directory is unusable (state.directory)");
            None
        }
    };
    // Every change of the block table is journaled by a thread of its own
    // (an append and a sync per batch, a snapshot now and then); restoring
    // puts the stored blocks back first.
    let journal = store.clone().and_then(|store| {
        notify("STATUS=restoring stored blocks");
        let listed = ListSet::of(&config.lists).reject;
        let restored = state::restore(&store, &ctx, datapath.as_ref(), &|net| {
            listed.contains_key(net)
        });
        match Journal::start(store, ctx.clone(), restored.snapshot_wanted) {
            Ok(journal) => Some(journal),
            Err(e) => {
                tracing::error!(error = %e, "BLOCKS ARE NOT PERSISTED: the state journal thread cannot start");
                None
            }
        }
    });
    // After the stored blocks: the cluster's are applied over them.
    ctx.cluster.start(&config, &ctx)?;
    // An agent started without state would serve the cluster's blocked
    // sources until it has read their blocks: it listens after that (or
    // once Redis failed to answer: it goes on alone, applying them later).
    notify("STATUS=reading the cluster's blocks");
    if !ctx.cluster.first_pass(CLUSTER_FIRST_PASS).await {
        tracing::warn!(
            waited = %humantime::format_duration(CLUSTER_FIRST_PASS),
            "cluster: the cluster's blocks are not read yet; listening anyway, they are applied as they come"
        );
    }
    // Asked for by commands that change many blocks at once (import).
    let saves = tokio::sync::Notify::new();
    let listeners = proxy::bind(&config).await?;
    for (listen, bound) in config.listen.iter().zip(&listeners) {
        let address = bound.listener.local_addr().map_or(listen.address, |a| a);
        tracing::info!(%address, tls = ?listen.tls, backend = %config.backend.address, identity = ?config.backend.identity, mode = ?config.mode, "listening");
    }
    match tokio::net::TcpListener::bind(config.metrics.address).await {
        Ok(listener) => {
            tracing::info!(address = %config.metrics.address, "metrics at /metrics");
            tokio::spawn(metrics::serve(listener, ctx.clone(), datapath.clone()));
        }
        Err(e) => {
            tracing::error!(address = %config.metrics.address, error = %e, "metrics.address: cannot bind; no metrics")
        }
    }
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel::<control::Envelope>(16);
    match control::bind(&config.control.socket) {
        Ok(listener) => {
            tracing::info!(socket = %config.control.socket.display(), "control socket");
            tokio::spawn(control::serve(listener, requests_tx));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(e).context("control.socket");
        }
        Err(e) => tracing::error!(
            socket = %config.control.socket.display(),
            error = %e,
            "control.socket: cannot bind; the CLI cannot reach this agent"
        ),
    }
    let listening: Vec<String> = listeners
        .iter()
        .zip(&config.listen)
        .map(|(bound, listen)| {
            bound
                .listener
                .local_addr()
                .map_or(listen.address, |a| a)
                .to_string()
        })
        .collect();
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(proxy::serve(ctx.clone(), listeners, stopped));
    // Before READY=1: a stop or reload may follow it at once.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Every listener is bound and listening (the kernel queues connections
    // from here on) and the stored blocks are in force: ready.
    notify(&format!(
        "READY=1\nSTATUS=listening on {}; kernel: {}",
        listening.join(", "),
        datapath.describe()
    ));

    let mut events = match &kernel {
        Kernel::Loaded(d) => Some(d.take_events()?),
        Kernel::Off(_) => None,
    };
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => match &config_path {
                Some(path) => {
                    reload(path, &mut config, &ctx, datapath.as_ref());
                }
                None => tracing::warn!("SIGHUP: running on the embedded default configuration, nothing to reload"),
            },
            _ = sweep.tick() => {
                let now = std::time::SystemTime::now();
                // The table holds every block the agent put into the
                // kernel: expired and evicted ones leave the kernel one by
                // one, no walk of the kernel's maps (which holds the lock
                // accepts need).
                let expired = ctx.blocks.sweep(now);
                let mut gone = expired.clone();
                gone.extend(ctx.blocks.take_evicted());
                lists::release_blocks(&gone, &config.lists, datapath.as_ref());
                if !expired.is_empty() {
                    tracing::info!(expired = expired.len(), "expired blocks removed");
                }
            },
            () = saves.notified() => {
                if let Some(journal) = &journal {
                    journal.request_snapshot();
                }
            },
            Some((request, answer)) = requests.recv() => {
                if let control::Request::RecipientsRefresh { force } = request {
                    // A directory refresh can take seconds: answer from a task.
                    let recipients = ctx.recipients.clone();
                    tokio::spawn(async move {
                        let response = match recipients {
                            None => control::Response::error("no [recipients.ldap] configured"),
                            Some(r) => match r.refresh_now(force).await {
                                Ok(report) => control::Response::ok(control::Answer::RecipientsRefresh(report)),
                                Err(e) => control::Response::error(e.to_string()),
                            },
                        };
                        let _ = answer.send(response);
                    });
                } else {
                    let mut agent = AgentState { config: &mut config, config_path: config_path.as_deref(), ctx: &ctx, datapath: datapath.as_ref(), store: store.as_deref(), saves: &saves };
                    let _ = answer.send(commands::handle(&mut agent, request));
                }
            },
            batch = next_events(&mut events) => match batch {
                Ok(batch) => for event in batch {
                    let (action, message) = if event.observed {
                        ("would-drop", "kernel would drop a packet (observe mode: passed)")
                    } else {
                        ("drop", "kernel dropped a packet")
                    };
                    tracing::info!(
                        source = %event.source,
                        port = event.port,
                        reason = event.reason.map_or("unknown", DropReason::name),
                        syn = event.syn,
                        action,
                        "{message}"
                    );
                },
                Err(e) => {
                    tracing::warn!(error = %e, "reading kernel drop events; no more will be logged");
                    events = None;
                }
            },
        }
    }
    notify("STOPPING=1\nSTATUS=stopping: open sessions may finish");
    let _ = stop.send(true);
    let _ = server.await;
    if let Some(journal) = journal {
        // Blocks put into the kernel's maps behind the agent's back are
        // stored too (one walk of the maps, at shutdown only).
        if let Ok(kernel) = datapath.blocks() {
            let listed = ListSet::of(&config.lists).reject;
            let (adopted, _) = state::adopt_kernel_blocks(
                &ctx,
                datapath.as_ref(),
                kernel,
                &|net| listed.contains_key(net),
                false,
            );
            if adopted > 0 {
                tracing::info!(adopted, "kernel blocks the agent did not order, stored");
            }
        }
        journal.close();
    }
    let _ = std::fs::remove_file(&config.control.socket);
    tracing::info!("stopping: detaching the kernel programs (maps stay pinned)");
    if let Kernel::Loaded(d) = &kernel {
        d.detach();
    }
    Ok(())
}

async fn next_events(
    events: &mut Option<crate::kernel::DropEvents>,
) -> std::io::Result<Vec<crate::kernel::DropEvent>> {
    match events {
        Some(events) => events.next_batch().await,
        None => std::future::pending().await,
    }
}

/// What control commands act on.
pub struct AgentState<'a> {
    pub config: &'a mut Config,
    pub config_path: Option<&'a std::path::Path>,
    pub ctx: &'a ProxyContext,
    pub datapath: &'a dyn Datapath,
    pub store: Option<&'a Store>,
    /// Asks the state journal for a snapshot.
    pub saves: &'a tokio::sync::Notify,
}

impl AgentState<'_> {
    /// Asks the state journal for a snapshot soon, after many changes at
    /// once (single changes are journaled as they happen).
    pub fn save_blocks(&self) {
        self.saves.notify_one();
    }
}

/// Re-reads the configuration file (SIGHUP). A file that does not load or
/// validate is refused with the reason, and the running configuration stays.
/// Limits, lists, relay rules and the mode take effect at once; listeners,
/// backend, TLS, kernel attachment, map sizes, metrics and state need a
/// restart, and the log says which of those changed. Returns those
/// sections (`recipients` when `[recipients.ldap]` came or went), empty
/// when the file was refused.
pub fn reload(
    path: &std::path::Path,
    current: &mut Config,
    ctx: &ProxyContext,
    datapath: &dyn Datapath,
) -> Vec<&'static str> {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    let restart_needed = reload_file(path, current, ctx, datapath);
    notify("READY=1");
    restart_needed
}

/// Whether `[backend]` changed in what only a restart applies: the
/// backend slots (their number and how sources share them), when sessions
/// connect (the capability probes run or not), the built-in backend.
fn backend_needs_restart(current: &Config, new: &Config) -> bool {
    let keys = |c: &Config| {
        let b = &c.backend;
        (
            b.max_connections,
            b.fair_share_prefix_v4,
            b.fair_share_prefix_v6.unwrap_or(c.limits.ipv6_prefix),
            b.connect,
            b.builtin,
            // The built-in backend listens on the address.
            b.builtin.then(|| (b.address, b.builtin_recipients.clone())),
        )
    };
    keys(current) != keys(new)
}

fn reload_file(
    path: &std::path::Path,
    current: &mut Config,
    ctx: &ProxyContext,
    datapath: &dyn Datapath,
) -> Vec<&'static str> {
    let new = match Config::load_with_lists(path) {
        Ok(new) => new,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the running configuration stays");
            return Vec::new();
        }
    };
    let restart_only = [
        ("listen", current.listen != new.listen),
        // A new certificate is loaded; adding or removing TLS is not.
        ("tls", current.tls.is_some() != new.tls.is_some()),
        ("backend", backend_needs_restart(current, &new)),
        ("smtp", current.smtp.max_sessions != new.smtp.max_sessions),
        ("kernel", current.kernel != new.kernel),
        ("metrics", current.metrics != new.metrics),
        ("state", current.state != new.state),
        ("cluster", current.cluster != new.cluster),
    ];
    let mut restart_needed: Vec<&'static str> = restart_only
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(section, _)| *section)
        .collect();
    for section in &restart_needed {
        tracing::warn!(
            section,
            "reload: this section changed but takes effect only after a restart"
        );
    }
    // The rest of [smtp], [backend] and [tls] holds for the sessions that
    // begin from now on.
    if let Err(e) = ctx.reconfigure(&new) {
        tracing::error!(error = %format!("{e:#}"), "reload: [smtp], [backend] and [tls] not applied, the running ones stay");
    }
    ctx.set_policy(crate::policy::Policy::new(&new));
    ctx.cluster.reload(&new);
    match (&ctx.recipients, &new.recipients.ldap) {
        (Some(recipients), Some(ldap)) => recipients.reconfigure(ldap),
        (None, None) => {}
        _ => {
            tracing::warn!(
                section = "recipients",
                "reload: [recipients.ldap] added or removed: restart needed"
            );
            restart_needed.push("recipients");
        }
    }
    if let Err(e) = datapath.set_limits(&kernel_limits(&new)) {
        tracing::debug!(error = %e, "reload: kernel limits not applied");
    }
    // Lists (the files re-read) and per-network caps: remove what left,
    // add what came.
    let applied = lists::apply(
        Some(&ListSet::of(&current.lists)),
        &ListSet::of(&new.lists),
        datapath,
        Some(&ctx.blocks),
    );
    if applied != lists::Applied::default() {
        tracing::info!(
            allowed = applied.allowed,
            disallowed = applied.disallowed,
            rejected = applied.rejected,
            unrejected = applied.unrejected,
            refused = applied.errors.len(),
            "reload: lists applied to the kernel"
        );
    }
    for error in applied.errors.iter().take(10) {
        tracing::warn!(error, "reload: a list entry was not put into the kernel");
    }
    for source in current
        .limits
        .source
        .iter()
        .filter(|s| !new.limits.source.iter().any(|n| n.cidr == s.cidr))
    {
        let _ = datapath.remove_cap(source.cidr);
    }
    for source in &new.limits.source {
        if let Err(e) = datapath.set_cap(source.cidr, source.max_connections) {
            tracing::warn!(cidr = %source.cidr, error = %e, "reload: limits.source cap not applied to the kernel");
        }
    }
    // What only a restart changes stays as it runs, so that the next
    // reload compares with what is in force.
    let mut new = new;
    new.listen = std::mem::take(&mut current.listen);
    new.tls = current.tls.clone();
    new.backend = current.backend.clone();
    new.smtp = current.smtp.clone();
    new.kernel = current.kernel.clone();
    new.metrics = current.metrics.clone();
    new.state = current.state.clone();
    if current.recipients.ldap.is_some() != new.recipients.ldap.is_some() {
        new.recipients.ldap = current.recipients.ldap.clone();
    }
    *current = new;
    tracing::info!(path = %path.display(), "configuration reloaded");
    restart_needed
}

/// Tells systemd about the agent's state (sd_notify(3)): `state` is
/// `KEY=VALUE` lines sent as one datagram to the socket named by
/// `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace); nothing
/// without it. Written here instead of taken from a crate: the protocol is
/// this one `sendto`. Non-blocking: a full queue loses a STATUS, never
/// stalls the agent.
fn notify(state: &str) {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        socket.set_nonblocking(true)?;
        match target.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                socket.send_to_addr(state.as_bytes(), &SocketAddr::from_abstract_name(name)?)
            }
            None => socket.send_to(state.as_bytes(), &target),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(socket = ?target, error = %e, state, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// CLOCK_MONOTONIC in microseconds, as systemd wants it with RELOADING=1.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000
}
