//! `attack-bench`: legitimate mail delivered through the limiter to a real
//! Postfix while attackers flood, next to the same attack with the proxy
//! alone, the same attack straight to Postfix, and no attack at all.
//!
//! Run it with `cargo xtask bench -- --only attack [ARGS]` (builds the eBPF
//! object first and passes it on), as root. Everything happens in two
//! network namespaces of its own (`slb-atk-<pid>-<n>`) joined by a veth pair:
//!
//! - server namespace: the agent (`target/release/smtp-limiter run`, started
//!   with `nsenter --net`, so its maps are pinned under
//!   `/sys/fs/bpf/slb-atk-<pid>-<n>` in the host's bpffs) listening on the
//!   veth address port 25, XDP on the server end of the veth
//!   (`kernel.mode = "required"`, or `"off"` for the proxy-only setup); a
//!   private Postfix (tests/src/postfix.rs) with two smtpd listeners:
//!   127.0.0.1:PORT with the PROXY protocol (the agent's backend,
//!   `identity = "proxy-v2"`) and VETH:2525 without it (the attackers' and
//!   senders' target in the "straight to Postfix" setup).
//! - client namespace: the legitimate senders (closed loop, one message per
//!   session, each worker from its own address, timing each message), the
//!   null-sender flood (3 hosts × 50 parallel connections), a directory
//!   harvester, and a SYN flood from a reject-listed address (raw socket,
//!   bounded by rate × duration).
//!
//! Each round runs every setup once (order rotated per round) for the same
//! duration; a fresh agent (fresh state and pins) is started for each run.
//! After each run the benchmark waits until Postfix's queue is empty and
//! checks from Postfix's log that every legitimate message the client saw
//! accepted was delivered, and that no other legitimate message was.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use limiter_tests::bench::agent::{agent_binary, Agent, AgentOptions};
use limiter_tests::bench::args::Common;
use limiter_tests::bench::postfix::{add_services, Deliveries};
use limiter_tests::bench::report::{fmt_ms, median_per_step, quantile, LinePlot, Series};
use limiter_tests::bench::smtp_client::blocking::{connect_from, sockaddr_in, v4, Connect, Smtp};
use limiter_tests::bench::system::{
    check_stop, install_signal_handlers, machine_cpu, pause, process_cpu, remove_stale, stopping,
    thread_cpu,
};
use limiter_tests::netns::{self, Link, NetNs};
use limiter_tests::postfix::{Postfix, PostfixOptions};
use limiter_tests::stats::{machine, median, min_max};

/// Namespace, pin and temp-dir prefix.
const PREFIX: &str = "slb-atk";
/// The agent's SMTP port, and Postfix's direct listener, on the server's
/// veth address.
const PROXY_PORT: u16 = 25;
const DIRECT_PORT: u16 = 2525;
/// The agent's metrics, inside the server namespace.
const METRICS: &str = "127.0.0.1:9425";
/// The target: legitimate throughput under attack with the limiter at least
/// this fraction of the no-attack throughput.
const TARGET: f64 = 0.9;
/// Legitimate recipients (the fixture's defaults).
const LEGIT_RCPTS: [&str; 3] = ["alice@example.com", "bob@example.com", "carol@example.com"];
/// The flood's recipient: its deliveries are told apart by it.
const FLOOD_RCPT: &str = "postmaster@example.com";
/// Longest wait for Postfix to deliver what it accepted in one run.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Options {
    quick: bool,
    rounds: usize,
    secs: u64,
    legit_workers: usize,
    flood_hosts: usize,
    flood_connections: usize,
    harvest_connections: usize,
    syn_rate: u64,
    out: PathBuf,
    agent: Option<PathBuf>,
}

/// Legitimate mail delivered through the limiter to a real Postfix while
/// attackers flood, beside the same attack with the proxy alone, straight
/// to Postfix, and no attack (as root; see the source's header).
///
/// Defaults: 3 rounds of 20 s, 4 legit workers, 3 flood hosts × 50
/// connections, 2 harvest connections, SYN flood 20000/s, plot and samples
/// in docs/; --quick: 1 round of 5 s, 3 × 10 flood connections, 5000 SYN/s,
/// output in target/attack-bench/.
#[derive(Parser)]
#[command(name = "attack-bench")]
struct Cli {
    #[command(flatten)]
    common: Common,
    /// Seconds per run [default: 20; 5 with --quick].
    #[arg(long)]
    secs: Option<u64>,
    /// Legitimate senders (1 to 16).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=16))]
    legit_workers: u16,
    /// Flood hosts (1 to 8).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=8))]
    flood_hosts: u16,
    /// Connections per flood host [default: 50; 10 with --quick].
    #[arg(long)]
    flood_connections: Option<usize>,
    /// Harvester connections.
    #[arg(long, default_value_t = 2)]
    harvest_connections: usize,
    /// SYN flood packets per second [default: 20000; 5000 with --quick].
    #[arg(long)]
    syn_rate: Option<u64>,
}

fn parse_args() -> Result<Options> {
    let cli = Cli::parse();
    let quick = cli.common.quick;
    let o = Options {
        quick,
        rounds: cli.common.rounds(3, 1),
        secs: cli.secs.unwrap_or(if quick { 5 } else { 20 }),
        legit_workers: cli.legit_workers.into(),
        flood_hosts: cli.flood_hosts.into(),
        flood_connections: cli.flood_connections.unwrap_or(if quick { 10 } else { 50 }),
        harvest_connections: cli.harvest_connections,
        syn_rate: cli.syn_rate.unwrap_or(if quick { 5_000 } else { 20_000 }),
        out: cli.common.out_dir("docs", "attack-bench"),
        agent: cli.common.agent,
    };
    ensure!(o.secs >= 1, "--secs must be >= 1");
    Ok(o)
}

// ---------------------------------------------------------------------------
// Setups

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    NoAttack,
    Limiter,
    ProxyOnly,
    Direct,
}

const SETUPS: [Setup; 4] = [
    Setup::NoAttack,
    Setup::Limiter,
    Setup::ProxyOnly,
    Setup::Direct,
];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::NoAttack => "no attack (kernel + proxy)",
            Setup::Limiter => "attack, limiter (kernel + proxy)",
            Setup::ProxyOnly => "attack, proxy only (kernel off)",
            Setup::Direct => "attack, straight to Postfix",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Setup::NoAttack => "no-attack",
            Setup::Limiter => "limiter",
            Setup::ProxyOnly => "proxy-only",
            Setup::Direct => "direct",
        }
    }

    fn attack(self) -> bool {
        self != Setup::NoAttack
    }

    /// `kernel.mode` of the agent, or `None`: no agent.
    fn kernel_mode(self) -> Option<&'static str> {
        match self {
            Setup::NoAttack | Setup::Limiter => Some("required"),
            Setup::ProxyOnly => Some("off"),
            Setup::Direct => None,
        }
    }

    fn color(self) -> &'static str {
        match self {
            Setup::NoAttack => "#555555",
            Setup::Limiter => "#1a9850",
            Setup::ProxyOnly => "#2c7bb6",
            Setup::Direct => "#d7191c",
        }
    }
}

// ---------------------------------------------------------------------------
// Signals, stale leftovers, small helpers

// ---------------------------------------------------------------------------
// Topology

struct Topology {
    // Field order: the link before the namespaces.
    link: Link,
    client: NetNs,
    server: NetNs,
    server_v4: Ipv4Addr,
    legit: Vec<Ipv4Addr>,
    flood: Vec<Ipv4Addr>,
    harvester: Ipv4Addr,
    /// On `lists.reject`: the SYN flood's source.
    rejected: Ipv4Addr,
}

impl Topology {
    fn new(opts: &Options) -> Result<Self> {
        let server = NetNs::new(PREFIX)?;
        let client = NetNs::new(PREFIX)?;
        let link = netns::link(&server, &client, "atk")?;
        let n = link.subnet;
        let host = |h: u8| Ipv4Addr::new(10, 199, n, h);
        let legit: Vec<Ipv4Addr> = (0..opts.legit_workers as u8)
            .map(|i| host(10 + i))
            .collect();
        let flood: Vec<Ipv4Addr> = (0..opts.flood_hosts as u8).map(|i| host(30 + i)).collect();
        let harvester = host(40);
        let rejected = host(50);
        let mut all = legit.clone();
        all.extend(&flood);
        all.extend([harvester, rejected]);
        for a in &all {
            client.ip(&["addr", "add", &format!("{a}/24"), "dev", &link.client_if])?;
        }
        Ok(Self {
            server_v4: link.server_v4,
            link,
            client,
            server,
            legit,
            flood,
            harvester,
            rejected,
        })
    }

    fn target(&self, setup: Setup) -> SocketAddr {
        let port = if setup == Setup::Direct {
            DIRECT_PORT
        } else {
            PROXY_PORT
        };
        SocketAddr::from((self.server_v4, port))
    }
}

// ---------------------------------------------------------------------------
// Postfix

/// Postfix in the server namespace, with a second smtpd on VETH:2525
/// without the PROXY protocol.
fn start_postfix(topo: &Topology) -> Result<Postfix> {
    let postfix = topo
        .server
        .run(|| {
            Postfix::start(PostfixOptions {
                proxy_protocol: true,
                ..PostfixOptions::default()
            })
        })
        .context("Postfix")?;
    let service = format!("{}:{DIRECT_PORT}", topo.server_v4);
    add_services(
        &postfix,
        &[format!("{service}/inet={service} inet n - n - - smtpd")],
        &[format!("{service}/inet/smtpd_upstream_proxy_protocol=")],
    )?;
    // The direct listener answers from the client namespace.
    let target = topo.target(Setup::Direct);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let probe = topo.client.run(|| -> Result<String> {
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(1))?;
            let mut smtp = Smtp::new(s, Duration::from_secs(3))?;
            let r = smtp.reply()?;
            smtp.quit();
            Ok(r.text)
        });
        match probe {
            Ok(t) if t.starts_with("220") => break,
            other if Instant::now() > deadline => {
                bail!("Postfix's direct listener {target} does not answer: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(postfix)
}

// ---------------------------------------------------------------------------
// The agent

/// Stops the agent, then checks that no XDP program is left on the
/// server's veth.
fn stop_agent(agent: Agent<'_>, topo: &Topology) -> Result<()> {
    agent.stop()?;
    let link = topo
        .server
        .ip(&["link", "show", "dev", &topo.link.server_if])?;
    ensure!(
        !link.contains("xdp"),
        "an XDP program is still attached after the agent stopped:\n{link}"
    );
    Ok(())
}

/// CPU time of the Postfix instance so far: its processes, and the ones
/// that have exited (reaped by the master: its children's time).
fn postfix_cpu(postfix: &Postfix) -> f64 {
    postfix
        .processes()
        .into_iter()
        .filter_map(|pid| process_cpu(pid, true))
        .sum()
}

/// Adds the calling thread's CPU time (µs) to `total`.
fn add_thread_cpu(total: &AtomicU64) {
    total.fetch_add((thread_cpu() * 1e6) as u64, Ordering::Relaxed);
}

/// The reference configuration's limits, the topology's addresses.
fn agent_config(
    topo: &Topology,
    backend: SocketAddr,
    kernel_mode: &str,
    dir: &Path,
    pins: &Path,
) -> String {
    format!(
        r#"# Written by attack-bench.
mode = "enforce"

[[listen]]
address = "{listen}"
tls = "none"

[backend]
address = "{backend}"
identity = "proxy-v2"
connect_timeout = "5s"
builtin = false

[smtp]
shutdown_grace = "1s"

[kernel]
mode = "{kernel_mode}"
interfaces = ["{interface}"]
attach = "auto"
pin_path = "{pins}"
ports = [25]
events_per_second = 100

# The reference configuration's values (config/smtp-limiter.toml).
[limits]
max_connections_per_source = 10
ipv6_prefix = 64
# Not the reference's: each legitimate worker opens a session per message,
# tens a second from its one address.
connection_rate = "0/1m"
connection_rate_per_network = "0/1m"
max_failed_rcpt = 5
max_failed_auth = 5
failed_auth_window = "10m"
null_sender_rate = "20/1m"
block_duration = "30m"
block_backoff = 2.0
max_block_duration = "7d"

[relay]
accept = "*@example.com"

[lists]
allow = []
reject = ["{rejected}/32"]

[control]
socket = "{dir}/control.sock"

[metrics]
address = "{METRICS}"

[state]
directory = "{dir}/state"
log_level = "info"
"#,
        listen = topo.target(Setup::Limiter),
        interface = topo.link.server_if,
        pins = pins.display(),
        rejected = topo.rejected,
        dir = dir.display(),
    )
}

// ---------------------------------------------------------------------------
// SMTP from a chosen source address

// ---------------------------------------------------------------------------
// Legitimate senders

#[derive(Default)]
struct Legit {
    /// (seconds since the start, latency in ms) per message accepted.
    done: Vec<(f64, f64)>,
    /// Message-IDs the server accepted (250 to the end of DATA).
    accepted: HashSet<String>,
    /// Message-IDs whose final dot was sent but whose reply never came.
    uncertain: HashSet<String>,
    /// Failures by step and reply.
    failures: BTreeMap<String, u64>,
}

/// Why a message failed, and whether its data had been sent in full.
struct Failed {
    why: String,
    after_dot: bool,
}

fn send_one(source: Ipv4Addr, to: SocketAddr, id: &str, rcpt: &str) -> Result<(), Failed> {
    let fail = |why: String| Failed {
        why,
        after_dot: false,
    };
    let stream = match connect_from(source, v4(to), Duration::from_secs(10)) {
        Connect::Up(s) => s,
        Connect::NoAnswer => return Err(fail("connect: no answer in 10 s".into())),
        Connect::Refused => return Err(fail("connect: refused".into())),
        Connect::Failed(e) => return Err(fail(format!("connect: {e}"))),
    };
    let mut smtp = Smtp::new(stream, Duration::from_secs(15)).map_err(|e| fail(e.to_string()))?;
    let step = |smtp: &mut Smtp, what: &str, line: Option<&str>, code: u16| {
        let r = match line {
            Some(l) => smtp.command(l),
            None => smtp.reply(),
        };
        match r {
            Ok(r) if r.code == code => Ok(()),
            Ok(r) => Err(format!("{what}: {}", r.text.get(..3).unwrap_or(&r.text))),
            Err(e) => Err(format!("{what}: {:?}", e.kind())),
        }
    };
    step(&mut smtp, "greeting", None, 220).map_err(fail)?;
    step(&mut smtp, "EHLO", Some("EHLO mail.partner.example"), 250).map_err(fail)?;
    step(
        &mut smtp,
        "MAIL",
        Some("MAIL FROM:<orders@partner.example>"),
        250,
    )
    .map_err(fail)?;
    step(&mut smtp, "RCPT", Some(&format!("RCPT TO:<{rcpt}>")), 250).map_err(fail)?;
    step(&mut smtp, "DATA", Some("DATA"), 354).map_err(fail)?;
    let body = format!(
        "From: <orders@partner.example>\r\nTo: <{rcpt}>\r\nSubject: order {id}\r\nMessage-ID: <{id}>\r\n\r\nOrder {id} confirmed.\r\n."
    );
    step(&mut smtp, "end of DATA", Some(&body), 250).map_err(|why| Failed {
        why,
        after_dot: true,
    })?;
    smtp.quit();
    Ok(())
}

/// One closed-loop worker: one message per session, back to back.
fn legit_worker(
    source: Ipv4Addr,
    to: SocketAddr,
    tag: &str,
    worker: usize,
    t0: Instant,
    window: Duration,
    out: &Mutex<Legit>,
) {
    let mut n = 0u64;
    while t0.elapsed() < window && !stopping() {
        let id = format!("{tag}-{worker}-{n}@partner.example");
        let rcpt = LEGIT_RCPTS[(n as usize + worker) % LEGIT_RCPTS.len()];
        n += 1;
        let started = Instant::now();
        let result = send_one(source, to, &id, rcpt);
        let latency = started.elapsed().as_secs_f64() * 1e3;
        let at = t0.elapsed().as_secs_f64();
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                o.accepted.insert(id);
                o.done.push((at, latency));
            }
            Err(f) => {
                if f.after_dot {
                    o.uncertain.insert(id);
                }
                *o.failures.entry(f.why).or_default() += 1;
                drop(o);
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Attackers

#[derive(Default)]
struct AttackCounts {
    /// Connection attempts by the flood and the harvester.
    attempts: AtomicU64,
    /// SYN unanswered within the timeout (dropped).
    unanswered: AtomicU64,
    /// RST, or another connect error.
    refused: AtomicU64,
    /// Connected, but the greeting was a refusal or never came.
    refused_greeting: AtomicU64,
    /// Sessions that got a 220 greeting.
    greeted: AtomicU64,
    /// Sessions ended by the server mid-way (421, or closed).
    cut: AtomicU64,
    /// Null-sender messages the server accepted.
    flood_accepted: AtomicU64,
    /// RCPTs of the harvester answered 550.
    harvest_refused: AtomicU64,
    /// SYN flood packets sent.
    syn_sent: AtomicU64,
    /// CPU time of the flood and harvester threads, µs.
    cpu_us: AtomicU64,
    /// CPU time of the SYN flood's thread, µs (on veth this includes the
    /// receiving side's work for its packets, done in its softirq).
    syn_cpu_us: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Connects and reads the greeting; `None` (counted) if it went no further.
fn attack_open(source: Ipv4Addr, to: SocketAddr, helo: &str, c: &AttackCounts) -> Option<Smtp> {
    bump(&c.attempts);
    let stream = match connect_from(source, v4(to), Duration::from_secs(1)) {
        Connect::Up(s) => s,
        Connect::NoAnswer => {
            bump(&c.unanswered);
            return None;
        }
        Connect::Refused | Connect::Failed(_) => {
            bump(&c.refused);
            return None;
        }
    };
    let Ok(mut smtp) = Smtp::new(stream, Duration::from_secs(3)) else {
        bump(&c.refused);
        return None;
    };
    match smtp.reply() {
        Ok(r) if r.code == 220 => bump(&c.greeted),
        _ => {
            bump(&c.refused_greeting);
            return None;
        }
    }
    match smtp.command(&format!("EHLO {helo}")) {
        Ok(r) if r.code == 250 => Some(smtp),
        _ => {
            bump(&c.cut);
            None
        }
    }
}

/// One of the flood's connections: null-sender bounces back to back, a new
/// connection 100 ms after one ends.
fn flood_connection(source: Ipv4Addr, to: SocketAddr, stop: &AtomicBool, c: &AttackCounts) {
    while !stop.load(Ordering::Relaxed) && !stopping() {
        if let Some(mut smtp) = attack_open(source, to, "mx.bounces.example", c) {
            loop {
                if stop.load(Ordering::Relaxed) {
                    smtp.quit();
                    return;
                }
                let ok = smtp.command("MAIL FROM:<>").is_ok_and(|r| r.code == 250)
                    && smtp
                        .command(&format!("RCPT TO:<{FLOOD_RCPT}>"))
                        .is_ok_and(|r| r.code == 250)
                    && smtp.command("DATA").is_ok_and(|r| r.code == 354)
                    && smtp
                        .command(
                            "From: <MAILER-DAEMON@bounces.example>\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nThis is the mail system at host mx.bounces.example.\r\n.",
                        )
                        .is_ok_and(|r| r.code == 250);
                if !ok {
                    bump(&c.cut);
                    break;
                }
                bump(&c.flood_accepted);
            }
        }
        pause(Duration::from_millis(100), stop);
    }
}

/// RCPT after RCPT to unknown users; a new connection 100 ms after one ends.
fn harvester(source: Ipv4Addr, to: SocketAddr, id: usize, stop: &AtomicBool, c: &AttackCounts) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && !stopping() {
        if let Some(mut smtp) = attack_open(source, to, "mailer.bulk-list.example", c) {
            'session: loop {
                if !smtp
                    .command("MAIL FROM:<news@bulk-list.example>")
                    .is_ok_and(|r| r.code == 250)
                {
                    bump(&c.cut);
                    break;
                }
                for _ in 0..200 {
                    if stop.load(Ordering::Relaxed) {
                        smtp.quit();
                        return;
                    }
                    n += 1;
                    match smtp.command(&format!("RCPT TO:<user{id}x{n}@example.com>")) {
                        Ok(r) if r.code == 550 => bump(&c.harvest_refused),
                        Ok(r) if r.code < 400 => {}
                        _ => {
                            bump(&c.cut);
                            break 'session;
                        }
                    }
                }
                if !smtp.command("RSET").is_ok_and(|r| r.code == 250) {
                    bump(&c.cut);
                    break;
                }
            }
        }
        pause(Duration::from_millis(100), stop);
    }
}

fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN header (20 bytes) with its checksum.
fn syn_segment(src: Ipv4Addr, dst: SocketAddrV4, sport: u16, seq: u32) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dst.port().to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x02;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&h);
    let sum = checksum(&pseudo, 0);
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    h
}

/// SYNs from `source` (a raw socket bound to it, so it only receives what
/// is sent to that address) at `rate` per second for `window`, at most
/// rate × window of them.
fn syn_flood(
    source: Ipv4Addr,
    to: SocketAddr,
    rate: u64,
    window: Duration,
    stop: &AtomicBool,
    c: &AttackCounts,
) -> io::Result<()> {
    // SAFETY: plain syscalls; the descriptor is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 6) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let dst = v4(to);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (src_sa, dst_sa) = (sockaddr_in(SocketAddrV4::new(source, 0)), sockaddr_in(dst));
    // SAFETY: addresses of the right size.
    unsafe {
        if libc::bind(fd.as_raw_fd(), (&raw const src_sa).cast(), len) != 0
            || libc::connect(fd.as_raw_fd(), (&raw const dst_sa).cast(), len) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    let total = rate * window.as_secs();
    const BATCH: usize = 64;
    let mut bufs = [[0u8; 20]; BATCH];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while sent < total && t0.elapsed() < window && !stop.load(Ordering::Relaxed) {
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        if due <= sent {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let n = ((due - sent) as usize).min(BATCH);
        for (i, b) in bufs.iter_mut().take(n).enumerate() {
            let k = sent + i as u64;
            let sport = 1024 + (k % 64_000) as u16;
            *b = syn_segment(source, dst, sport, (k as u32).wrapping_mul(2_654_435_761));
        }
        let mut iov: Vec<libc::iovec> = bufs[..n]
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: all-zero is a valid msghdr.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: n valid mmsghdrs pointing at live buffers.
        let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            return Err(e);
        }
        sent += r as u64;
        c.syn_sent.fetch_add(r as u64, Ordering::Relaxed);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// One run

/// CPU seconds over one run, from the start of the traffic until every
/// sender and attacker thread has ended.
struct Cpu {
    elapsed: f64,
    legit: f64,
    attack: f64,
    syn: f64,
    postfix: f64,
    /// Busy fraction of all CPUs (whole machine, other users included).
    machine_busy: f64,
}

struct RunResult {
    setup: Setup,
    round: usize,
    secs: f64,
    /// Messages accepted within the window.
    messages: usize,
    per_second: Vec<u32>,
    latencies: Vec<f64>,
    failures: BTreeMap<String, u64>,
    accepted: usize,
    uncertain: usize,
    uncertain_delivered: usize,
    flood_delivered: u64,
    attack: BTreeMap<&'static str, u64>,
    metrics: BTreeMap<String, f64>,
    /// The agent's CPU time over the run (start-up excluded).
    agent_cpu: Option<f64>,
    cpu: Cpu,
    load: String,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.secs
    }

    fn latency(&self, q: f64) -> f64 {
        quantile(&self.latencies, q)
    }

    fn metric_sum(&self, prefix: &str) -> f64 {
        self.metrics
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    fn kernel_drops(&self) -> f64 {
        self.metrics
            .iter()
            .filter(|(k, _)| {
                k.starts_with("smtp_limiter_kernel_events_total") && k.contains("dropped")
            })
            .map(|(_, v)| v)
            .sum()
    }
}

struct Bench<'a> {
    opts: &'a Options,
    topo: &'a Topology,
    postfix: &'a Postfix,
    agent_binary: &'a Path,
    deliveries: Deliveries,
    delivered_before: HashSet<String>,
    runs: usize,
}

impl Bench<'_> {
    fn run(&mut self, setup: Setup, round: usize) -> Result<RunResult> {
        check_stop()?;
        self.runs += 1;
        let window = Duration::from_secs(self.opts.secs);
        let agent = match setup.kernel_mode() {
            Some(mode) => {
                let topo = self.topo;
                let backend = self.postfix.addr();
                Some(Agent::start(
                    &AgentOptions {
                        binary: self.agent_binary,
                        netns: Some(&topo.server),
                        prefix: PREFIX,
                        n: self.runs,
                        listen: topo.target(Setup::Limiter),
                        metrics: METRICS.parse()?,
                        kernel_required: mode == "required",
                        keep: std::env::var_os("ATTACK_BENCH_KEEP").is_some(),
                    },
                    |paths| agent_config(topo, backend, mode, &paths.dir, &paths.pins),
                )?)
            }
            None => None,
        };
        let flood_before = self.deliveries.flood;
        let cpu_before = agent.as_ref().and_then(Agent::cpu_secs);
        let postfix_before = postfix_cpu(self.postfix);
        let machine_before = machine_cpu();
        let legit_cpu = AtomicU64::new(0);
        let to = self.topo.target(setup);
        let tag = format!("atk-{}-{}", std::process::id(), self.runs);
        let legit = Mutex::new(Legit::default());
        let counts = AttackCounts::default();
        let attack_stop = AtomicBool::new(false);
        let client = &self.topo.client;
        let opts = self.opts;
        let topo = self.topo;
        let t0 = Instant::now();
        let mut syn_error = None;
        std::thread::scope(|s| {
            let enter = || {
                if let Err(e) = client.enter_current_thread() {
                    panic!("cannot enter {}: {e}", client.name());
                }
            };
            let legit_handles: Vec<_> = topo
                .legit
                .iter()
                .enumerate()
                .map(|(w, src)| {
                    let (legit, tag, legit_cpu) = (&legit, &tag, &legit_cpu);
                    s.spawn(move || {
                        enter();
                        legit_worker(*src, to, tag, w, t0, window, legit);
                        add_thread_cpu(legit_cpu);
                    })
                })
                .collect();
            let mut syn = None;
            if setup.attack() {
                for src in &topo.flood {
                    for _ in 0..opts.flood_connections {
                        let (stop, counts) = (&attack_stop, &counts);
                        s.spawn(move || {
                            enter();
                            flood_connection(*src, to, stop, counts);
                            add_thread_cpu(&counts.cpu_us);
                        });
                    }
                }
                for id in 0..opts.harvest_connections {
                    let (stop, counts) = (&attack_stop, &counts);
                    s.spawn(move || {
                        enter();
                        harvester(topo.harvester, to, id, stop, counts);
                        add_thread_cpu(&counts.cpu_us);
                    });
                }
                let (stop, counts) = (&attack_stop, &counts);
                syn = Some(s.spawn(move || {
                    enter();
                    let r = syn_flood(topo.rejected, to, opts.syn_rate, window, stop, counts);
                    add_thread_cpu(&counts.syn_cpu_us);
                    r
                }));
            }
            for h in legit_handles {
                let _ = h.join();
            }
            attack_stop.store(true, Ordering::Relaxed);
            if let Some(h) = syn {
                if let Ok(Err(e)) = h.join() {
                    syn_error = Some(e);
                }
            }
        });
        if let Some(e) = syn_error {
            bail!("SYN flood: {e}");
        }
        let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let machine_after = machine_cpu();
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = Cpu {
            elapsed,
            legit: legit_cpu.load(Ordering::Relaxed) as f64 / 1e6,
            attack: counts.cpu_us.load(Ordering::Relaxed) as f64 / 1e6,
            syn: counts.syn_cpu_us.load(Ordering::Relaxed) as f64 / 1e6,
            postfix: postfix_cpu(self.postfix) - postfix_before,
            machine_busy: (machine_after.0 - machine_before.0)
                / (machine_after.1 - machine_before.1).max(1.0),
        };
        let agent_cpu = agent
            .as_ref()
            .and_then(Agent::cpu_secs)
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let metrics = match &agent {
            Some(a) => a.metrics().context("the agent's metrics")?,
            None => BTreeMap::new(),
        };
        if let Some(a) = agent {
            stop_agent(a, self.topo)?;
        }
        let legit = legit.into_inner().unwrap_or_else(|p| p.into_inner());

        // Every accepted legit message delivered, and no other.
        self.deliveries.wait_for(
            self.postfix,
            &legit.accepted,
            setup.name(),
            DRAIN_TIMEOUT,
            None,
        )?;
        let uncertain_delivered =
            self.deliveries
                .check(&legit.accepted, &legit.uncertain, &self.delivered_before)?;
        self.delivered_before
            .extend(self.deliveries.legit.keys().cloned());

        let secs = window.as_secs_f64();
        let mut per_second = vec![0u32; self.opts.secs as usize];
        let mut latencies = Vec::new();
        for (at, ms) in &legit.done {
            if *at < secs {
                per_second[*at as usize] += 1;
                latencies.push(*ms);
            }
        }
        let attack = [
            ("attempts", &counts.attempts),
            ("unanswered", &counts.unanswered),
            ("refused", &counts.refused),
            ("refused_greeting", &counts.refused_greeting),
            ("greeted", &counts.greeted),
            ("cut", &counts.cut),
            ("flood_accepted", &counts.flood_accepted),
            ("harvest_refused", &counts.harvest_refused),
            ("syn_sent", &counts.syn_sent),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect();
        let flood_delivered = self.deliveries.flood - flood_before;
        let result = RunResult {
            setup,
            round,
            secs,
            messages: latencies.len(),
            per_second,
            latencies,
            failures: legit.failures,
            accepted: legit.accepted.len(),
            uncertain: legit.uncertain.len(),
            uncertain_delivered,
            flood_delivered,
            attack,
            metrics,
            agent_cpu,
            cpu,
            load: load
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        };
        if setup == Setup::Limiter {
            let drops = result.kernel_drops();
            let syn = result.attack["syn_sent"] as f64;
            ensure!(
                drops >= syn,
                "the kernel dropped {drops} packets, fewer than the {syn} SYNs sent from the reject-listed {}",
                self.topo.rejected
            );
        }
        Ok(result)
    }
}

// ---------------------------------------------------------------------------
// Report

fn report(results: &[RunResult], opts: &Options, out: &mut String) -> String {
    let by =
        |setup: Setup| -> Vec<&RunResult> { results.iter().filter(|r| r.setup == setup).collect() };
    let base_of = |round: usize| {
        results
            .iter()
            .find(|r| r.round == round && r.setup == Setup::NoAttack)
            .map(RunResult::rate)
    };
    let _ = writeln!(
        out,
        "| setup | legit msgs/s (median) | min–max | × no attack (median of same-round ratios) | latency median ms | latency p99 ms | legit failures (per run, median) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let mut ratios_of = BTreeMap::new();
    for setup in SETUPS {
        let runs = by(setup);
        if runs.is_empty() {
            continue;
        }
        let rates: Vec<f64> = runs.iter().map(|r| r.rate()).collect();
        let (lo, hi) = min_max(&rates);
        let ratios: Vec<f64> = runs
            .iter()
            .filter_map(|r| Some(r.rate() / base_of(r.round)?))
            .collect();
        let p50: Vec<f64> = runs.iter().map(|r| r.latency(0.5)).collect();
        let p99: Vec<f64> = runs.iter().map(|r| r.latency(0.99)).collect();
        let fails: Vec<f64> = runs
            .iter()
            .map(|r| r.failures.values().sum::<u64>() as f64)
            .collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {lo:.0}–{hi:.0} | {:.2} | {} | {} | {:.0} |",
            setup.name(),
            median(&rates),
            median(&ratios),
            fmt_ms(median(&p50)),
            fmt_ms(median(&p99)),
            median(&fails),
        );
        ratios_of.insert(setup, median(&ratios));
    }
    let _ = writeln!(
        out,
        "\nPer run (round, setup: msgs/s, × no attack, p50/p99 ms, load average at its end):\n"
    );
    let _ = writeln!(out, "```");
    for r in results {
        let base = base_of(r.round).unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "round {} {:<34} {:>6.0} msgs/s  ×{:.2}  p50 {:>6} ms  p99 {:>6} ms  load {}",
            r.round + 1,
            r.setup.name(),
            r.rate(),
            r.rate() / base,
            fmt_ms(r.latency(0.5)),
            fmt_ms(r.latency(0.99)),
            r.load
        );
    }
    let _ = writeln!(out, "```");

    let _ = writeln!(
        out,
        "\nAttack traffic per run (medians over rounds; flood {} hosts × {} connections, harvester {} connections, SYN flood {}/s from the reject-listed address):\n",
        opts.flood_hosts, opts.flood_connections, opts.harvest_connections, opts.syn_rate
    );
    let _ = writeln!(
        out,
        "| setup | flood+harvest connect attempts | SYN unanswered (dropped) | refused (RST) | refused at greeting | greeted | cut mid-session | flood msgs accepted (delivered) | harvest RCPTs answered 550 | SYN flood packets | kernel drops | proxy refusals | blocks |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for setup in SETUPS.into_iter().filter(|s| s.attack()) {
        let runs = by(setup);
        if runs.is_empty() {
            continue;
        }
        let m = |k: &str| median(&runs.iter().map(|r| r.attack[k] as f64).collect::<Vec<_>>());
        let agent = setup.kernel_mode().is_some();
        let kernel = setup.kernel_mode() == Some("required");
        let metric = |f: &dyn Fn(&RunResult) -> f64, on: bool| {
            if on {
                format!(
                    "{:.0}",
                    median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>())
                )
            } else {
                "–".into()
            }
        };
        let delivered = median(
            &runs
                .iter()
                .map(|r| r.flood_delivered as f64)
                .collect::<Vec<_>>(),
        );
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} ({delivered:.0}) | {:.0} | {:.0} | {} | {} | {} |",
            setup.name(),
            m("attempts"),
            m("unanswered"),
            m("refused"),
            m("refused_greeting"),
            m("greeted"),
            m("cut"),
            m("flood_accepted"),
            m("harvest_refused"),
            m("syn_sent"),
            metric(&|r| r.kernel_drops(), kernel),
            metric(&|r| r.metric_sum("smtp_limiter_rejections_total"), agent),
            metric(&|r| r.metric_sum("smtp_limiter_blocks_issued_total"), agent),
        );
    }

    let _ = writeln!(
        out,
        "\nCPU over a run, % of one core (medians over rounds; from the start of the traffic until the last sender or attacker thread ended; the machine has 2 cores = 200 %):\n"
    );
    let _ = writeln!(
        out,
        "| setup | agent | Postfix (all its processes) | legit senders | flood + harvester threads | SYN flood thread (with veth receive work) | whole machine busy (other users included) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    for setup in SETUPS {
        let runs = by(setup);
        if runs.is_empty() {
            continue;
        }
        let pct = |f: &dyn Fn(&RunResult) -> Option<f64>| {
            let v: Vec<f64> = runs
                .iter()
                .filter_map(|r| Some(f(r)? / r.cpu.elapsed * 100.0))
                .collect();
            if v.is_empty() {
                "–".to_owned()
            } else {
                format!("{:.0}", median(&v))
            }
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            setup.name(),
            pct(&|r| r.agent_cpu),
            pct(&|r| Some(r.cpu.postfix)),
            pct(&|r| Some(r.cpu.legit)),
            pct(&|r| setup.attack().then_some(r.cpu.attack)),
            pct(&|r| setup.attack().then_some(r.cpu.syn)),
            pct(&|r| Some(r.cpu.machine_busy * cpus * r.cpu.elapsed)),
        );
    }

    let _ = writeln!(out, "\nChecks (every run):\n");
    let total_accepted: usize = results.iter().map(|r| r.accepted).sum();
    let uncertain: usize = results.iter().map(|r| r.uncertain).sum();
    let uncertain_delivered: usize = results.iter().map(|r| r.uncertain_delivered).sum();
    let _ = writeln!(
        out,
        "- legitimate messages accepted by the client (incl. those finishing after the window): {total_accepted}, all delivered by Postfix exactly once (Message-ID matched in its log; queue empty after each run)"
    );
    let _ = writeln!(
        out,
        "- messages whose final reply never came (outcome unknown to the client): {uncertain}, of which Postfix delivered {uncertain_delivered}; no other legitimate message was delivered, nothing went to any other recipient"
    );
    let mut failures: BTreeMap<(Setup, String), u64> = BTreeMap::new();
    for r in results {
        for (k, v) in &r.failures {
            *failures.entry((r.setup, k.clone())).or_default() += v;
        }
    }
    if failures.is_empty() {
        let _ = writeln!(out, "- no legitimate message failed");
    } else {
        let list: Vec<String> = failures
            .iter()
            .map(|((s, k), v)| format!("{} {k} ×{v}", s.short()))
            .collect();
        let _ = writeln!(
            out,
            "- legitimate failures (all rounds): {}",
            list.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "- limiter runs: the kernel's drop counters ≥ the SYN flood's packets (every SYN from the reject-listed address dropped); no XDP program left after each agent stopped"
    );

    let ratio = ratios_of.get(&Setup::Limiter).copied().unwrap_or(f64::NAN);
    let met = if ratio >= TARGET { "met" } else { "MISSED" };
    format!(
        "legitimate throughput under attack with the limiter ≥ {TARGET}× no attack: {ratio:.2}× (median of same-round ratios): {met}"
    )
}

/// Median per second over rounds, per setup.
fn series(results: &[RunResult]) -> Vec<(Setup, Vec<f64>)> {
    SETUPS
        .into_iter()
        .filter_map(|setup| {
            let runs: Vec<&[u32]> = results
                .iter()
                .filter(|r| r.setup == setup)
                .map(|r| r.per_second.as_slice())
                .collect();
            (!runs.is_empty()).then(|| (setup, median_per_step(&runs)))
        })
        .collect()
}

fn svg(results: &[RunResult], opts: &Options, machine: &str) -> String {
    let series = series(results)
        .into_iter()
        .map(|(setup, points)| {
            let runs: Vec<f64> = results
                .iter()
                .filter(|r| r.setup == setup)
                .map(RunResult::rate)
                .collect();
            Series {
                name: setup.name().to_owned(),
                color: setup.color().to_owned(),
                points,
                note: format!("median {:.0} msgs/s over the run", median(&runs)),
                dashed: false,
            }
        })
        .collect();
    LinePlot {
        title: "Legitimate mail under attack: messages/s delivered through each setup".into(),
        subtitle: format!(
            "median per second over {} round(s); {} closed-loop senders; {machine}",
            opts.rounds, opts.legit_workers
        ),
        x_label: "seconds since the run started (senders and attackers start together)".into(),
        y_label: "legitimate messages accepted per second".into(),
        series,
    }
    .svg()
}

fn csv(results: &[RunResult]) -> String {
    let mut s = String::from("setup,round,second,legit_messages\n");
    for r in results {
        for (t, n) in r.per_second.iter().enumerate() {
            let _ = writeln!(s, "{},{},{t},{n}", r.setup.short(), r.round + 1);
        }
    }
    s
}

// ---------------------------------------------------------------------------
// Main

fn main() -> Result<()> {
    let opts = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "attack-bench needs root (namespaces, XDP, Postfix)"
    );
    install_signal_handlers();
    let binary = agent_binary(opts.agent.as_deref())?;
    remove_stale(PREFIX)?;
    let started = Instant::now();
    let machine_start = machine();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## attack-bench results{}\n",
        if opts.quick {
            " (--quick: a smoke run)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "Machine at start: {machine_start}");
    let _ = writeln!(out, "Options: {opts:?}\n");
    eprint!("{out}");

    let topo = Topology::new(&opts)?;
    let postfix = start_postfix(&topo)?;
    eprintln!(
        "server namespace {} ({}), client namespace {}, Postfix {} (PROXY) and {} (direct)",
        topo.server.name(),
        topo.server_v4,
        topo.client.name(),
        postfix.addr(),
        topo.target(Setup::Direct)
    );
    let mut bench = Bench {
        opts: &opts,
        topo: &topo,
        postfix: &postfix,
        agent_binary: &binary,
        deliveries: Deliveries::new("atk-", &LEGIT_RCPTS, FLOOD_RCPT),
        delivered_before: HashSet::new(),
        runs: 0,
    };
    let mut results = Vec::new();
    for round in 0..opts.rounds {
        for k in 0..SETUPS.len() {
            let setup = SETUPS[(k + round) % SETUPS.len()];
            let r = bench.run(setup, round)?;
            eprintln!(
                "round {} {:<34} {:>6.0} msgs/s, p50 {} ms, p99 {} ms, {} failures; attack {:?}; kernel drops {:.0}, load {}",
                round + 1,
                setup.name(),
                r.rate(),
                fmt_ms(r.latency(0.5)),
                fmt_ms(r.latency(0.99)),
                r.failures.values().sum::<u64>(),
                r.attack,
                r.kernel_drops().abs(),
                r.load
            );
            results.push(r);
        }
    }
    let verdict = report(&results, &opts, &mut out);
    fs::create_dir_all(&opts.out)?;
    let svg_path = opts.out.join("legit-under-attack.svg");
    let csv_path = opts.out.join("legit-under-attack.csv");
    fs::write(&svg_path, svg(&results, &opts, &machine_start))?;
    fs::write(&csv_path, csv(&results))?;
    let _ = writeln!(out, "\n### Target\n\n- {verdict}");
    let _ = writeln!(
        out,
        "\nPlot: {} (samples: {})",
        svg_path.display(),
        csv_path.display()
    );
    let _ = writeln!(out, "Machine at end: {}", machine());
    let _ = writeln!(out, "Total time: {:.0} s", started.elapsed().as_secs_f64());
    drop(bench);
    drop(postfix);
    drop(topo);
    println!("{out}");
    Ok(())
}
