//! `flood-bench`: legitimate mail under a distributed flood (issue 14's
//! headline). Legitimate senders deliver to a real Postfix with its default
//! process limit while more than a thousand polite zombie addresses flood
//! it, each within every per-source limit; the same flood meets this
//! product (backend connection earned at MAIL, the default), this product
//! with `backend.connect = "on-connect"`, Postfix alone, and Postfix behind
//! its own postscreen (as its README recommends, with and without the deep
//! protocol tests).
//!
//! Run it with `cargo xtask bench -- --only flood [ARGS]` (builds the eBPF
//! object and the release agent first), as root. Everything happens in two
//! network namespaces of its own (`slb-fld-<pid>-<n>`) joined by a veth
//! pair:
//!
//! - server namespace: a fresh private Postfix for every run (Debian's,
//!   `default_process_limit` 100, discard delivery; tests/src/postfix.rs)
//!   with its smtpd on 127.0.0.1 reading PROXY v2 (the agent's backend),
//!   plus, for the setups without the agent, an smtpd or postscreen on the
//!   veth address; the agent (`smtp-limiter run`, XDP on the server end of
//!   the veth, its defaults for every limit) on the veth address, port 25.
//! - client namespace: every source address on the client end of the veth
//!   (the flood in 10.200.0.0/16, 250 /24 networks; the legitimate senders
//!   in 10.201.0.0/16, 50 networks), routed through one neighbour.
//!
//! The flood, all of it async on two threads, each kind reconnecting when
//! cut: idle holders (connect, EHLO, NOOP every 10 s), slow senders (a byte
//! every 3 s), null-sender bounce floods (messages from `<>` back to back),
//! a directory harvester spread over many addresses, and tricklers (MAIL,
//! RCPT and DATA accepted, then the message at 625 bytes/s, never ended:
//! above Postfix's `smtpd_min_data_rate`, so that each holds an smtpd
//! process for as long as it likes), and keepers (MAIL and RCPT accepted,
//! then a NOOP every 2 s: a transaction kept open, which Postfix allows for
//! 100 junk commands of 5 minutes each). It starts `--ramp`
//! seconds before the legitimate senders: closed-loop workers, one message
//! per session, each from the next address of their pool; a message
//! deferred with a 4xx is retried at once from the same address (counted:
//! postscreen's deep tests defer every new client's first message, and a
//! real sender would retry minutes later).
//!
//! Each round runs every setup once (order rotated per round). Checks:
//! every legitimate message the client saw accepted is delivered exactly
//! once (Postfix's log), no other legitimate message is, and nothing goes
//! to a recipient neither side sent to.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use limiter_tests::bench::agent::{agent_binary, Agent, AgentOptions};
use limiter_tests::bench::args::Common;
use limiter_tests::bench::postfix::{add_services, smtpd_processes, Deliveries};
use limiter_tests::bench::report::{
    fmt_ms, median_per_step, quantile, write_json, LinePlot, Series, Table,
};
use limiter_tests::bench::smtp_client::{
    send_message, Client, ConnectError, Failure, Message, Timeouts,
};
use limiter_tests::bench::system::{
    self, check_stop, limits_line, raise_nofile, remove_stale, set_sysctls, stopping,
};
use limiter_tests::netns::{self, Link, NetNs};
use limiter_tests::postfix::{Postfix, PostfixOptions};
use limiter_tests::stats::{machine, median};
use serde_json::json;

/// Namespace, pin and temp-dir prefix.
const PREFIX: &str = "slb-fld";
/// The agent's port, Postfix's smtpd and postscreen listeners, on the
/// server's veth address.
const PROXY_PORT: u16 = 25;
const DIRECT_PORT: u16 = 2525;
const SCREEN_PORT: u16 = 2526;
/// The agent's metrics, inside the server namespace.
const METRICS: &str = "127.0.0.1:9425";
/// The issue's target: legitimate throughput under the flood with this
/// product at least this fraction of the no-flood throughput.
const TARGET: f64 = 0.9;
/// Legitimate recipients (the fixture's defaults).
const LEGIT_RCPTS: [&str; 3] = ["alice@example.com", "bob@example.com", "carol@example.com"];
/// The bounce flood's recipient: its deliveries are counted apart.
const FLOOD_RCPT: &str = "postmaster@example.com";
/// How often an idle holder says NOOP.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// A trickler's line (CRLF included) and how often it sends one: 625
/// bytes/s.
const TRICKLE_LINE: usize = 100;
const TRICKLE_PACE: Duration = Duration::from_millis(160);
/// How often a slow sender sends a byte.
const SLOW_BYTE: Duration = Duration::from_secs(3);
/// How long a zombie waits before reconnecting once cut.
const RECONNECT: Duration = Duration::from_secs(1);

/// How often a keeper says NOOP in its open transaction.
const KEEPER_NOOP: Duration = Duration::from_secs(2);
/// Longest wait for Postfix to deliver what it accepted in one run.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the queue may take to empty once every accepted legitimate
/// message is delivered.
const QUEUE_WAIT: Duration = Duration::from_secs(20);
/// How long the legitimate senders may finish a message after the window.
const GRACE: Duration = Duration::from_secs(5);
/// Attempts per legitimate message (the first, and retries after a 4xx).
const ATTEMPTS: u32 = 3;
const LEGIT_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(10),
    reply: Duration::from_secs(20),
};
const FLOOD_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(5),
    reply: Duration::from_secs(30),
};

/// Legitimate mail under a distributed flood: this product against Postfix
/// alone and Postfix's postscreen (as root; see the source's header).
///
/// Setups (for --only): no-flood, on-mail, on-connect, postfix,
/// postscreen, postscreen-deep.
#[derive(Debug, Parser)]
#[command(name = "flood-bench")]
struct Options {
    #[command(flatten)]
    common: Common,
    /// Seconds measured per run [default: 30; 10 with --quick].
    #[arg(long)]
    secs: Option<u64>,
    /// Seconds the flood builds up before the senders start [default: 8; 6 with --quick].
    #[arg(long)]
    ramp: Option<u64>,
    /// Idle-holder addresses (3 sessions each: EHLO, NOOP every 10 s).
    #[arg(long, default_value_t = 1000)]
    holders: usize,
    /// Sessions per idle-holder address.
    #[arg(long, default_value_t = 3)]
    holder_sessions: usize,
    /// Slow-sender addresses (2 sessions each, a byte every 3 s).
    #[arg(long, default_value_t = 200)]
    slow: usize,
    /// Null-sender bounce-flood addresses (2 sessions each).
    #[arg(long, default_value_t = 50)]
    bounce: usize,
    /// Harvester addresses (1 session each, unknown recipients).
    #[arg(long, default_value_t = 100)]
    harvest: usize,
    /// Trickler addresses (2 sessions each: a message at 625 bytes/s,
    /// never ended).
    #[arg(long, default_value_t = 50)]
    tricklers: usize,
    /// Keeper addresses (2 sessions each: MAIL and RCPT accepted, then a
    /// NOOP every 2 s).
    #[arg(long, default_value_t = 100)]
    keepers: usize,
    /// Legitimate senders (closed loop, one message per session).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Addresses the legitimate senders take turns with (a new client
    /// every message until each has been seen).
    #[arg(long, default_value_t = 200)]
    legit_addresses: usize,
    /// Returning senders: before the flood starts, every legitimate address
    /// delivers one message (retried until accepted; not measured), so
    /// that postscreen knows them; by default each is a first-time client.
    #[arg(long)]
    known_senders: bool,
    /// Keep each agent's directory (config, log) under /tmp.
    #[arg(long)]
    keep: bool,
    /// A main.cf setting for Postfix in every setup, `NAME=VALUE`
    /// (repeatable; e.g. `in_flow_delay=0` to see what its flow control
    /// costs): it replaces the benchmark's own value of NAME.
    #[arg(long = "postfix-set", value_name = "NAME=VALUE", value_parser = parse_main_cf)]
    postfix_set: Vec<(String, String)>,
}

/// `NAME=VALUE` for `--postfix-set`.
fn parse_main_cf(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!(
            "{text:?}: expected NAME=VALUE, e.g. in_flow_delay=0"
        )),
    }
}

impl Options {
    fn secs(&self) -> u64 {
        self.secs.unwrap_or(if self.common.quick { 10 } else { 30 })
    }

    fn ramp(&self) -> u64 {
        self.ramp.unwrap_or(if self.common.quick { 6 } else { 8 })
    }

    fn flood_addresses(&self) -> usize {
        self.holders + self.slow + self.bounce + self.harvest + self.tricklers + self.keepers
    }
}

// ---------------------------------------------------------------------------
// Setups

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Setup {
    NoFlood,
    OnMail,
    OnConnect,
    Postfix,
    Postscreen,
    PostscreenDeep,
}

const SETUPS: [Setup; 6] = [
    Setup::NoFlood,
    Setup::OnMail,
    Setup::OnConnect,
    Setup::Postfix,
    Setup::Postscreen,
    Setup::PostscreenDeep,
];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::NoFlood => "no flood (this product)",
            Setup::OnMail => "flood, this product (on-mail)",
            Setup::OnConnect => "flood, this product, on-connect",
            Setup::Postfix => "flood, straight to Postfix",
            Setup::Postscreen => "flood, postscreen (greet tests)",
            Setup::PostscreenDeep => "flood, postscreen + deep tests",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Setup::NoFlood => "no-flood",
            Setup::OnMail => "on-mail",
            Setup::OnConnect => "on-connect",
            Setup::Postfix => "postfix",
            Setup::Postscreen => "postscreen",
            Setup::PostscreenDeep => "postscreen-deep",
        }
    }

    fn flood(self) -> bool {
        self != Setup::NoFlood
    }

    /// `backend.connect` of the agent, or `None`: no agent.
    fn connect(self) -> Option<&'static str> {
        match self {
            Setup::NoFlood | Setup::OnMail => Some("on-mail"),
            Setup::OnConnect => Some("on-connect"),
            _ => None,
        }
    }

    fn port(self) -> u16 {
        match self {
            Setup::NoFlood | Setup::OnMail | Setup::OnConnect => PROXY_PORT,
            Setup::Postfix => DIRECT_PORT,
            Setup::Postscreen | Setup::PostscreenDeep => SCREEN_PORT,
        }
    }

    fn color(self) -> &'static str {
        match self {
            Setup::NoFlood => "#555555",
            Setup::OnMail => "#1a9850",
            Setup::OnConnect => "#fdae61",
            Setup::Postfix => "#d7191c",
            Setup::Postscreen => "#abd9e9",
            Setup::PostscreenDeep => "#2c7bb6",
        }
    }
}

// ---------------------------------------------------------------------------
// Topology

struct Topology {
    // Field order: the link before the namespaces.
    link: Link,
    client: NetNs,
    server: NetNs,
    server_v4: Ipv4Addr,
    flood: Vec<Ipv4Addr>,
    legit: Vec<Ipv4Addr>,
}

/// The `i`th flood address: 10.200.0.0/16, spread over 250 /24 networks
/// (a botnet's addresses are scattered; fair sharing is by network).
fn flood_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i % 250) as u8, (i / 250 + 1) as u8)
}

/// The `i`th legitimate sender's address: 10.201.0.0/16, 50 networks.
fn legit_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, (i % 50) as u8, (i / 50 + 1) as u8)
}

impl Topology {
    fn new(opts: &Options) -> Result<Self> {
        ensure!(
            opts.flood_addresses() <= 250 * 254 && opts.legit_addresses <= 50 * 254,
            "too many addresses: at most {} flood and {} legitimate",
            250 * 254,
            50 * 254
        );
        let server = NetNs::new(PREFIX)?;
        let client = NetNs::new(PREFIX)?;
        let link = netns::link(&server, &client, "fld")?;
        let flood: Vec<Ipv4Addr> = (0..opts.flood_addresses()).map(flood_address).collect();
        let legit: Vec<Ipv4Addr> = (0..opts.legit_addresses).map(legit_address).collect();
        // One `ip -batch` for all of them (over a thousand).
        let batch: String = flood
            .iter()
            .chain(&legit)
            .map(|a| format!("addr add {a}/32 dev {}\n", link.client_if))
            .collect();
        batch_in(&client, &batch)?;
        // The server reaches them through the client's first address: one
        // neighbour entry, not one per address (the ARP table's default
        // gc_thresh3 is 1024).
        server.ip(&[
            "route",
            "add",
            "10.200.0.0/15",
            "via",
            &link.client_v4s[0].to_string(),
            "dev",
            &link.server_if,
        ])?;
        // Room for a flood's SYNs and accept queue (per namespace).
        set_sysctls(
            &server,
            &[
                ("net/core/somaxconn", "8192"),
                ("net/ipv4/tcp_max_syn_backlog", "8192"),
            ],
        )?;
        Ok(Self {
            server_v4: link.server_v4,
            link,
            client,
            server,
            flood,
            legit,
        })
    }

    fn target(&self, setup: Setup) -> SocketAddr {
        SocketAddr::from((self.server_v4, setup.port()))
    }
}

/// `ip -n NS -batch -` with `commands`.
fn batch_in(ns: &NetNs, commands: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("ip")
        .args(["-n", ns.name(), "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run ip -batch")?;
    child
        .stdin
        .take()
        .context("ip stdin")?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "ip -n {} -batch: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Postfix, fresh for every run

/// A Postfix in the server namespace for `setup`: the smtpd on 127.0.0.1
/// with PROXY (the agent's backend), and for the setups without the agent
/// a listener on the veth address: a plain smtpd, or postscreen in front
/// of an smtpd `pass` service as POSTSCREEN_README sets it up; `settings`
/// (`--postfix-set`) last, over the benchmark's own.
fn start_postfix(topo: &Topology, setup: Setup, settings: &[(String, String)]) -> Result<Postfix> {
    let mut extra: Vec<(&str, &str)> = Vec::new();
    // The veth address is the benchmark's own probe: let it past
    // postscreen (permit_mynetworks) so that the probe is not delayed.
    let mynetworks = format!("127.0.0.0/8 {}/32", topo.server_v4);
    extra.push(("mynetworks", &mynetworks));
    if matches!(setup, Setup::Postscreen | Setup::PostscreenDeep) {
        extra.extend([
            ("postscreen_access_list", "permit_mynetworks"),
            ("postscreen_greet_action", "enforce"),
            ("postscreen_blacklist_action", "enforce"),
        ]);
    }
    if setup == Setup::PostscreenDeep {
        extra.extend([
            ("postscreen_pipelining_enable", "yes"),
            ("postscreen_non_smtp_command_enable", "yes"),
            ("postscreen_bare_newline_enable", "yes"),
        ]);
    }
    let options = PostfixOptions {
        proxy_protocol: true,
        extra_main_cf: extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .chain(settings.iter().cloned())
            .collect(),
        ..PostfixOptions::default()
    };
    let postfix = topo
        .server
        .run(|| Postfix::start(options))
        .context("Postfix")?;
    let service = topo.target(setup).to_string();
    let (services, params) = match setup {
        Setup::Postfix => (
            vec![format!("{service}/inet={service} inet n - n - - smtpd")],
            vec![format!("{service}/inet/smtpd_upstream_proxy_protocol=")],
        ),
        Setup::Postscreen | Setup::PostscreenDeep => (
            vec![
                format!("{service}/inet={service} inet n - n - 1 postscreen"),
                "smtpd/pass=smtpd pass - - n - - smtpd".to_owned(),
                "dnsblog/unix=dnsblog unix - - n - 0 dnsblog".to_owned(),
                "tlsproxy/unix=tlsproxy unix - - n - 0 tlsproxy".to_owned(),
            ],
            vec!["smtpd/pass/smtpd_upstream_proxy_protocol=".to_owned()],
        ),
        _ => return Ok(postfix),
    };
    add_services(&postfix, &services, &params)?;
    // The new listener answers (from the server's own address, which is in
    // mynetworks).
    let target = topo.target(setup);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let greeted = topo.server.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut c = Client::connect_from(
                    IpAddr::V4(topo.server_v4),
                    target,
                    Duration::from_secs(2),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                let r = c.reply(Duration::from_secs(10)).await?;
                c.quit().await;
                anyhow::Ok(r.code)
            })
        });
        match greeted {
            Ok(220) => return Ok(postfix),
            other if Instant::now() > deadline => {
                bail!(
                    "Postfix's listener {target} for {} does not greet: {other:?}",
                    setup.name()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------
// The agent

fn agent_config(
    topo: &Topology,
    postfix: &Postfix,
    connect: &str,
    paths: &limiter_tests::bench::agent::AgentPaths,
) -> String {
    format!(
        r#"# Written by flood-bench: the product's defaults for every limit.
mode = "enforce"

[[listen]]
address = "{listen}"
tls = "none"

[backend]
address = "{backend}"
identity = "proxy-v2"
connect = "{connect}"

[kernel]
mode = "required"
interfaces = ["{interface}"]
pin_path = "{pins}"
ports = [25]

[relay]
accept = "*@example.com"

[control]
socket = "{dir}/control.sock"

[metrics]
address = "{METRICS}"

[state]
directory = "{dir}/state"
"#,
        listen = topo.target(Setup::OnMail),
        backend = postfix.addr(),
        interface = topo.link.server_if,
        pins = paths.pins.display(),
        dir = paths.dir.display(),
    )
}

// ---------------------------------------------------------------------------
// The flood

#[derive(Default)]
struct FloodCounts {
    /// Connection attempts.
    attempts: AtomicU64,
    /// SYN unanswered within the timeout (dropped).
    no_answer: AtomicU64,
    /// RST, or another connect error.
    refused: AtomicU64,
    /// Sessions greeted with 220.
    greeted: AtomicU64,
    /// Connected, but refused at the greeting (421) or no greeting.
    not_greeted: AtomicU64,
    /// Sessions ended by the server after the greeting.
    cut: AtomicU64,
    /// NOOPs answered 250.
    noops: AtomicU64,
    /// Null-sender messages accepted.
    bounces: AtomicU64,
    /// Harvested recipients refused (5xx).
    harvest_refused: AtomicU64,
    /// Harvested recipients accepted.
    harvest_accepted: AtomicU64,
    /// Bytes of message the tricklers sent.
    trickled: AtomicU64,
}

impl FloodCounts {
    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        [
            ("attempts", &self.attempts),
            ("no_answer", &self.no_answer),
            ("refused", &self.refused),
            ("greeted", &self.greeted),
            ("not_greeted", &self.not_greeted),
            ("cut", &self.cut),
            ("noops", &self.noops),
            ("bounces", &self.bounces),
            ("harvest_refused", &self.harvest_refused),
            ("harvest_accepted", &self.harvest_accepted),
            ("trickled", &self.trickled),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect()
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Connects and reads the greeting, counting what happened; `None`: try
/// again after [`RECONNECT`].
async fn open(source: Ipv4Addr, to: SocketAddr, helo: &str, c: &FloodCounts) -> Option<Client> {
    bump(&c.attempts);
    let mut client =
        match Client::connect_from(IpAddr::V4(source), to, FLOOD_TIMEOUTS.connect).await {
            Ok(client) => client,
            Err(ConnectError::NoAnswer) => {
                bump(&c.no_answer);
                return None;
            }
            Err(_) => {
                bump(&c.refused);
                return None;
            }
        };
    match client.reply(FLOOD_TIMEOUTS.reply).await {
        Ok(r) if r.code == 220 => bump(&c.greeted),
        _ => {
            bump(&c.not_greeted);
            return None;
        }
    }
    if helo.is_empty() {
        return Some(client);
    }
    match client
        .command(&format!("EHLO {helo}"), FLOOD_TIMEOUTS.reply)
        .await
    {
        Ok(r) if r.code == 250 => Some(client),
        _ => {
            bump(&c.cut);
            None
        }
    }
}

/// Connect, EHLO, then NOOP every 10 s, for ever; again when cut.
async fn holder(source: Ipv4Addr, to: SocketAddr, c: Arc<FloodCounts>) {
    loop {
        let helo = format!("idle{}.zombie.example", u32::from(source));
        if let Some(mut client) = open(source, to, &helo, &c).await {
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                match client.command("NOOP", FLOOD_TIMEOUTS.reply).await {
                    Ok(r) if r.code == 250 => bump(&c.noops),
                    _ => {
                        bump(&c.cut);
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Connect, then EHLO and NOOPs a byte every 3 s; again when cut.
async fn slow_sender(source: Ipv4Addr, to: SocketAddr, c: Arc<FloodCounts>) {
    loop {
        if let Some(mut client) = open(source, to, "", &c).await {
            let ehlo = format!("EHLO slow{}.zombie.example\r\n", u32::from(source));
            'session: for line in [ehlo.as_str(), "NOOP\r\n"].iter().cycle() {
                for byte in line.bytes() {
                    tokio::time::sleep(SLOW_BYTE).await;
                    if client.send(&[byte]).await.is_err() {
                        bump(&c.cut);
                        break 'session;
                    }
                }
                match client.reply(FLOOD_TIMEOUTS.reply).await {
                    Ok(r) if r.code == 250 => {}
                    _ => {
                        bump(&c.cut);
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Null-sender messages back to back on one session; again when cut or
/// refused.
async fn bouncer(source: Ipv4Addr, to: SocketAddr, n: usize, c: Arc<FloodCounts>) {
    let data = format!(
        "From: MAILER-DAEMON@bounce{n}.zombie.example\r\nTo: <{FLOOD_RCPT}>\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nThis is the mail system at host bounce{n}.zombie.example.\r\n."
    );
    loop {
        if let Some(mut client) = open(source, to, &format!("bounce{n}.zombie.example"), &c).await {
            let steps = [
                ("MAIL FROM:<>", 250),
                (&*format!("RCPT TO:<{FLOOD_RCPT}>"), 250),
                ("DATA", 354),
                (&*data, 250),
            ];
            while answered(&mut client, &steps).await {
                bump(&c.bounces);
            }
            bump(&c.cut);
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// MAIL, then RCPT to made-up names; again when cut.
async fn harvester(source: Ipv4Addr, to: SocketAddr, n: usize, c: Arc<FloodCounts>) {
    let mut guess = 0u64;
    loop {
        if let Some(mut client) = open(source, to, &format!("harvest{n}.zombie.example"), &c).await
        {
            match client
                .command(
                    "MAIL FROM:<list@harvest.zombie.example>",
                    FLOOD_TIMEOUTS.reply,
                )
                .await
            {
                Ok(r) if r.code == 250 => loop {
                    guess += 1;
                    let rcpt = format!("RCPT TO:<h{n}x{guess}@example.com>");
                    match client.command(&rcpt, FLOOD_TIMEOUTS.reply).await {
                        Ok(r) if (500..600).contains(&r.code) => bump(&c.harvest_refused),
                        Ok(r) if r.code == 250 => bump(&c.harvest_accepted),
                        _ => {
                            bump(&c.cut);
                            break;
                        }
                    }
                },
                _ => bump(&c.cut),
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// MAIL, RCPT and DATA, then the message a line at a time at 625 bytes/s,
/// never ended; again when cut.
async fn trickler(source: Ipv4Addr, to: SocketAddr, n: usize, c: Arc<FloodCounts>) {
    let line = format!("{}\r\n", "t".repeat(TRICKLE_LINE - 2));
    loop {
        if let Some(mut client) = open(source, to, &format!("trickle{n}.zombie.example"), &c).await
        {
            let steps = [
                ("MAIL FROM:<news@trickle.zombie.example>", 250),
                (&*format!("RCPT TO:<{FLOOD_RCPT}>"), 250),
                ("DATA", 354),
            ];
            if answered(&mut client, &steps).await {
                loop {
                    tokio::time::sleep(TRICKLE_PACE).await;
                    if client.send(line.as_bytes()).await.is_err() {
                        break;
                    }
                    c.trickled.fetch_add(TRICKLE_LINE as u64, Ordering::Relaxed);
                }
            }
            bump(&c.cut);
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Whether each of `steps` (a command and the code it must get) was
/// answered as it must, in turn; stops at the first that was not.
async fn answered(client: &mut Client, steps: &[(&str, u16)]) -> bool {
    for &(command, code) in steps {
        match client.command(command, FLOOD_TIMEOUTS.reply).await {
            Ok(r) if r.code == code => {}
            _ => return false,
        }
    }
    true
}

/// MAIL and RCPT, then a NOOP every [`KEEPER_NOOP`] with the transaction
/// open; again when cut.
async fn keeper(source: Ipv4Addr, to: SocketAddr, n: usize, c: Arc<FloodCounts>) {
    loop {
        if let Some(mut client) = open(source, to, &format!("keep{n}.zombie.example"), &c).await {
            let steps = [
                ("MAIL FROM:<news@keep.zombie.example>", 250),
                (&*format!("RCPT TO:<{FLOOD_RCPT}>"), 250),
            ];
            if answered(&mut client, &steps).await {
                loop {
                    tokio::time::sleep(KEEPER_NOOP).await;
                    match client.command("NOOP", FLOOD_TIMEOUTS.reply).await {
                        Ok(r) if r.code == 250 => bump(&c.noops),
                        _ => break,
                    }
                }
            }
            bump(&c.cut);
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Spawns every flood session, their starts spread over `ramp`.
fn start_flood(
    rt: &tokio::runtime::Runtime,
    opts: &Options,
    topo: &Topology,
    to: SocketAddr,
    counts: &Arc<FloodCounts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut sessions: Vec<(usize, Ipv4Addr, u8)> = Vec::new();
    let mut addrs = topo.flood.iter().copied().enumerate();
    for (kind, addresses, per) in [
        (0u8, opts.holders, opts.holder_sessions),
        (1, opts.slow, 2),
        (2, opts.bounce, 2),
        (3, opts.harvest, 1),
        (4, opts.tricklers, 2),
        (5, opts.keepers, 2),
    ] {
        for (i, a) in addrs.by_ref().take(addresses) {
            for _ in 0..per {
                sessions.push((i, a, kind));
            }
        }
    }
    // Interleaved kinds, started evenly over the ramp (80 % of it).
    let total = sessions.len().max(1);
    let spread = Duration::from_secs(opts.ramp()).mul_f64(0.8);
    let mut order: Vec<usize> = (0..sessions.len()).collect();
    // A fixed shuffle (multiplicative stride), so every run starts alike.
    let stride = (1..)
        .map(|k| 7919 * k % total.max(2))
        .find(|s| *s > 0 && gcd(*s, total) == 1)
        .unwrap_or(1);
    for (k, o) in order.iter_mut().enumerate() {
        *o = k * stride % total;
    }
    order
        .into_iter()
        .enumerate()
        .map(|(k, idx)| {
            let (n, source, kind) = sessions[idx];
            let delay = spread.mul_f64(k as f64 / total as f64);
            let c = Arc::clone(counts);
            rt.spawn(async move {
                tokio::time::sleep(delay).await;
                match kind {
                    0 => holder(source, to, c).await,
                    1 => slow_sender(source, to, c).await,
                    2 => bouncer(source, to, n, c).await,
                    3 => harvester(source, to, n, c).await,
                    4 => trickler(source, to, n, c).await,
                    _ => keeper(source, to, n, c).await,
                }
            })
        })
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

// ---------------------------------------------------------------------------
// Legitimate senders

#[derive(Default)]
struct Legit {
    /// (seconds since the window opened, latency in ms) per accepted message.
    done: Vec<(f64, f64)>,
    /// Message-IDs accepted (250 to the end of DATA).
    accepted: HashSet<String>,
    /// Message-IDs whose final dot may have been sent without a reply.
    uncertain: HashSet<String>,
    /// Messages accepted after at least one 4xx.
    deferred: u64,
    /// 4xx replies in all (each followed by a retry).
    deferrals: u64,
    /// Messages given up, by the last attempt's failure.
    failures: BTreeMap<String, u64>,
    /// The first reply seen for each kind of failure or deferral.
    samples: BTreeMap<String, String>,
}

/// What the legitimate senders of one run share.
struct Senders {
    /// How many there are: sender `w` takes addresses `w`, `w + workers`, …
    workers: usize,
    pool: Vec<Ipv4Addr>,
    to: SocketAddr,
    /// Message-IDs start with it.
    tag: String,
    /// The window: from `t0` until `until`.
    t0: Instant,
    until: Instant,
    out: Mutex<Legit>,
}

/// One closed-loop sender: one message per session, each from the next
/// address of its share of the pool, until the window closes.
async fn sender(worker: usize, plan: Arc<Senders>) {
    let Senders {
        workers,
        ref pool,
        to,
        ref tag,
        t0,
        until,
        ref out,
    } = *plan;
    let mut n = 0usize;
    while Instant::now() < until {
        let source = IpAddr::V4(pool[(worker + n * workers) % pool.len()]);
        let id = format!("{tag}-{worker}-{n}@partner.example");
        let rcpt = LEGIT_RCPTS[(n + worker) % LEGIT_RCPTS.len()];
        n += 1;
        let data = format!(
            "From: <orders@partner.example>\r\nTo: <{rcpt}>\r\nSubject: order {id}\r\nMessage-ID: <{id}>\r\n\r\nOrder {id} confirmed.\r\n"
        );
        let message = Message {
            helo: "mail.partner.example",
            from: "orders@partner.example",
            to: rcpt,
            data: &data,
        };
        // Until a definite answer, the message may be in flight when the
        // window closes and the task is aborted: uncertain.
        lock(out).uncertain.insert(id.clone());
        let started = Instant::now();
        let mut deferrals = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = send_message(source, to, &message, LEGIT_TIMEOUTS).await;
            // The lock is taken and released without an await in between.
            let retry = {
                let mut o = lock(out);
                match result {
                    Ok(_) => {
                        o.uncertain.remove(&id);
                        o.accepted.insert(id.clone());
                        o.done.push((
                            t0.elapsed().as_secs_f64(),
                            started.elapsed().as_secs_f64() * 1e3,
                        ));
                        o.deferrals += deferrals;
                        o.deferred += u64::from(deferrals > 0);
                        None
                    }
                    Err(f) if f.deferred() && attempt < ATTEMPTS && Instant::now() < until => {
                        deferrals += 1;
                        sample(&mut o, &f);
                        Some(true)
                    }
                    Err(f) => {
                        if !f.after_dot {
                            o.uncertain.remove(&id);
                        }
                        o.deferrals += deferrals + u64::from(f.deferred());
                        *o.failures.entry(f.kind()).or_default() += 1;
                        sample(&mut o, &f);
                        Some(false)
                    }
                }
            };
            match retry {
                Some(true) => continue,
                Some(false) => tokio::time::sleep(Duration::from_millis(100)).await,
                None => {}
            }
            break;
        }
    }
}

/// Keeps the first reply of each kind of failure, for the report.
fn sample(o: &mut Legit, f: &Failure) {
    if let Some(reply) = &f.reply {
        o.samples
            .entry(f.kind())
            .or_insert_with(|| reply.text.clone());
    }
}

/// Senders warming up at once: fewer than postscreen's pre-queue limit
/// (`postscreen_pre_queue_limit`, 100 by default), past which it answers
/// 421 to new clients.
const WARM_AT_ONCE: usize = 50;

/// One message from `source` before the flood, retried two seconds after a
/// failure until accepted (at most 8 tries); not measured. Whether it was
/// accepted.
async fn warm_up(
    source: Ipv4Addr,
    to: SocketAddr,
    id: String,
    out: Arc<Mutex<Legit>>,
    room: Arc<tokio::sync::Semaphore>,
) -> bool {
    let Ok(_turn) = room.acquire().await else {
        return false;
    };
    let data = format!(
        "From: <orders@partner.example>\r\nTo: <{}>\r\nSubject: hello\r\nMessage-ID: <{id}>\r\n\r\nHello again.\r\n",
        LEGIT_RCPTS[0]
    );
    let message = Message {
        helo: "mail.partner.example",
        from: "orders@partner.example",
        to: LEGIT_RCPTS[0],
        data: &data,
    };
    lock(&out).uncertain.insert(id.clone());
    for _ in 0..8 {
        let result = send_message(IpAddr::V4(source), to, &message, LEGIT_TIMEOUTS).await;
        match result {
            Ok(_) => {
                let mut o = lock(&out);
                o.uncertain.remove(&id);
                o.accepted.insert(id);
                return true;
            }
            Err(f) if !f.after_dot => {}
            // Perhaps taken: not sent again (it would be delivered twice).
            Err(_) => return false,
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    lock(&out).uncertain.remove(&id);
    false
}

/// CPU seconds of a Postfix instance so far: its processes, and those
/// that have exited (reaped by the master: its children's time).
fn postfix_cpu(postfix: &Postfix) -> f64 {
    postfix
        .processes()
        .into_iter()
        .filter_map(|pid| system::process_cpu(pid, true))
        .sum()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------
// One run

struct RunResult {
    setup: Setup,
    round: usize,
    secs: f64,
    per_second: Vec<u32>,
    /// Latencies (ms) of the messages accepted in the window.
    latencies: Vec<f64>,
    accepted: usize,
    deferred: u64,
    deferrals: u64,
    failures: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
    /// smtpd processes of the instance, sampled every second.
    smtpd: Vec<usize>,
    /// The agent's resident memory, KiB, sampled every second.
    rss: Vec<u64>,
    /// CPU seconds over the window: the agent, Postfix (its processes and
    /// those reaped), this process (the flood and the senders); and the
    /// whole machine's busy fraction (other users included).
    agent_cpu: Option<f64>,
    postfix_cpu: f64,
    bench_cpu: f64,
    machine_busy: f64,
    flood: BTreeMap<&'static str, u64>,
    /// Bounces Postfix delivered.
    bounces_delivered: u64,
    /// With --known-senders: the addresses that delivered before the flood.
    warmed: Option<usize>,
    /// Messages left in Postfix's queue at the end (none of them an
    /// accepted legitimate one).
    queue_left: usize,
    /// The agent's metrics at the end.
    metrics: BTreeMap<String, f64>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.secs
    }

    /// The messages that took over [`SLOW_MS`], and their seconds in all:
    /// where a closed loop's rate goes when a few messages stall.
    fn slow(&self) -> (usize, f64) {
        let slow = self.latencies.iter().filter(|ms| **ms > SLOW_MS);
        // A fold from +0.0: an empty `sum` of f64 is -0.0.
        (
            slow.clone().count(),
            slow.fold(0.0, |all, ms| all + ms) / 1000.0,
        )
    }
}

/// A legitimate message slower than this (ms) is counted apart.
const SLOW_MS: f64 = 100.0;

struct Bench<'a> {
    opts: &'a Options,
    topo: &'a Topology,
    agent_binary: &'a std::path::Path,
    flood_rt: &'a tokio::runtime::Runtime,
    legit_rt: &'a tokio::runtime::Runtime,
    runs: usize,
}

impl Bench<'_> {
    fn run(&mut self, setup: Setup, round: usize) -> Result<RunResult> {
        check_stop()?;
        self.runs += 1;
        let topo = self.topo;
        let postfix = start_postfix(topo, setup, &self.opts.postfix_set)?;
        let agent = match setup.connect() {
            Some(connect) => Some(Agent::start(
                &AgentOptions {
                    binary: self.agent_binary,
                    netns: Some(&topo.server),
                    prefix: PREFIX,
                    n: self.runs,
                    listen: topo.target(setup),
                    metrics: METRICS.parse()?,
                    kernel_required: true,
                    keep: self.opts.keep,
                },
                |paths| agent_config(topo, &postfix, connect, paths),
            )?),
            None => None,
        };
        let to = topo.target(setup);
        let tag = Arc::new(format!("fld-{}-{}", std::process::id(), self.runs));
        let legit = Arc::new(Mutex::new(Legit::default()));
        let pool = Arc::new(topo.legit.clone());
        let mut warmed = None;
        if self.opts.known_senders {
            let room = Arc::new(tokio::sync::Semaphore::new(WARM_AT_ONCE));
            let tasks: Vec<_> = pool
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    self.legit_rt.spawn(warm_up(
                        *a,
                        to,
                        format!("{tag}-warm-{i}@partner.example"),
                        Arc::clone(&legit),
                        Arc::clone(&room),
                    ))
                })
                .collect();
            let ok = self.legit_rt.block_on(async {
                let mut ok = 0;
                for t in tasks {
                    ok += usize::from(t.await.unwrap_or(false));
                }
                ok
            });
            warmed = Some(ok);
        }
        let counts = Arc::new(FloodCounts::default());
        let flood = if setup.flood() {
            start_flood(self.flood_rt, self.opts, topo, to, &counts)
        } else {
            Vec::new()
        };
        let stop = AtomicBool::new(false);
        system::pause(Duration::from_secs(self.opts.ramp()), &stop);
        check_stop()?;

        let window = Duration::from_secs(self.opts.secs());
        let t0 = Instant::now();
        let until = t0 + window;
        let plan = Arc::new(Senders {
            workers: self.opts.senders,
            pool: pool.to_vec(),
            to,
            tag: tag.to_string(),
            t0,
            until,
            out: Mutex::new(std::mem::take(&mut *lock(&legit))),
        });
        let senders: Vec<_> = (0..self.opts.senders)
            .map(|w| self.legit_rt.spawn(sender(w, Arc::clone(&plan))))
            .collect();
        let cpu_before = agent.as_ref().and_then(Agent::cpu_secs);
        let postfix_before = postfix_cpu(&postfix);
        let bench_before = system::process_cpu(std::process::id() as i32, false).unwrap_or(0.0);
        let machine_before = system::machine_cpu();
        let mut smtpd = Vec::new();
        let mut rss = Vec::new();
        while Instant::now() < until && !stopping() {
            smtpd.push(smtpd_processes(&postfix));
            if let Some(kib) = agent.as_ref().and_then(Agent::rss_kib) {
                rss.push(kib);
            }
            std::thread::sleep(
                Duration::from_secs(1).min(until.saturating_duration_since(Instant::now())),
            );
        }
        let agent_cpu = agent
            .as_ref()
            .and_then(Agent::cpu_secs)
            .zip(cpu_before)
            .map(|(after, before)| after - before);
        let postfix_cpu = postfix_cpu(&postfix) - postfix_before;
        let bench_cpu =
            system::process_cpu(std::process::id() as i32, false).unwrap_or(0.0) - bench_before;
        let machine_after = system::machine_cpu();
        let machine_busy =
            (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1).max(1.0);
        // The senders finish the message in hand (bounded), then stop.
        let deadline = until + GRACE;
        while senders.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for h in senders.iter().chain(&flood) {
            h.abort();
        }
        self.legit_rt.block_on(async {
            for h in senders {
                let _ = h.await;
            }
        });
        self.flood_rt.block_on(async {
            for h in flood {
                let _ = h.await;
            }
        });
        let metrics = match &agent {
            Some(a) => a.metrics().context("the agent's metrics")?,
            None => BTreeMap::new(),
        };
        if let Some(a) = agent {
            a.stop()?;
        }
        let legit = Arc::try_unwrap(plan)
            .map_err(|_| anyhow::anyhow!("a sender task outlived its abort"))?
            .out
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);

        // Every accepted legitimate message delivered once, and no other.
        let mut deliveries = Deliveries::new(&tag, &LEGIT_RCPTS, FLOOD_RCPT);
        let queue_left = deliveries.wait_for(
            &postfix,
            &legit.accepted,
            setup.name(),
            DRAIN_TIMEOUT,
            Some(QUEUE_WAIT),
        )?;
        deliveries.check(&legit.accepted, &legit.uncertain, &HashSet::new())?;
        drop(postfix);

        let secs = window.as_secs_f64();
        let mut per_second = vec![0u32; self.opts.secs() as usize];
        let mut latencies = Vec::new();
        for (at, ms) in &legit.done {
            if *at < secs {
                per_second[*at as usize] += 1;
                latencies.push(*ms);
            }
        }
        Ok(RunResult {
            setup,
            round,
            secs,
            per_second,
            latencies,
            // The warm-up's messages are not the measured ones.
            accepted: legit.accepted.len() - warmed.unwrap_or(0),
            deferred: legit.deferred,
            deferrals: legit.deferrals,
            failures: legit.failures,
            samples: legit.samples,
            smtpd,
            rss,
            agent_cpu,
            postfix_cpu,
            bench_cpu,
            machine_busy,
            flood: counts.snapshot(),
            bounces_delivered: deliveries.flood,
            warmed,
            queue_left,
            metrics,
        })
    }
}

// ---------------------------------------------------------------------------
// Report

fn runs_of(results: &[RunResult], setup: Setup) -> Vec<&RunResult> {
    results.iter().filter(|r| r.setup == setup).collect()
}

/// The median over rounds of `setup`'s rate divided by `base`'s in the same
/// round.
fn ratio(results: &[RunResult], setup: Setup, base: Setup) -> Option<f64> {
    let ratios: Vec<f64> = runs_of(results, setup)
        .iter()
        .filter_map(|r| {
            let b = results
                .iter()
                .find(|b| b.setup == base && b.round == r.round)?;
            (b.rate() > 0.0).then(|| r.rate() / b.rate())
        })
        .collect();
    (!ratios.is_empty()).then(|| median(&ratios))
}

/// Medians over rounds of CPU use in the window, % of one core (the
/// machine's busy share as % of all its cores).
fn cpu_cell(runs: &[&RunResult]) -> String {
    let pct = |f: &dyn Fn(&RunResult) -> Option<f64>| {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| Some(f(r)? / r.secs * 100.0))
            .collect();
        if v.is_empty() {
            "–".to_owned()
        } else {
            format!("{:.0}", median(&v))
        }
    };
    format!(
        "{} / {} / {} / {:.0}",
        pct(&|r| r.agent_cpu),
        pct(&|r| Some(r.postfix_cpu)),
        pct(&|r| Some(r.bench_cpu)),
        median(
            &runs
                .iter()
                .map(|r| r.machine_busy * 100.0)
                .collect::<Vec<_>>()
        )
    )
}

/// The agent's metrics added up over runs.
fn summed_metrics(runs: &[&RunResult]) -> BTreeMap<String, f64> {
    let mut sum = BTreeMap::new();
    for r in runs {
        for (k, v) in &r.metrics {
            *sum.entry(k.clone()).or_default() += v;
        }
    }
    sum
}

fn shed_counts(metrics: &BTreeMap<String, f64>) -> String {
    let mut parts = Vec::new();
    for (key, value) in metrics {
        if let Some(reason) = key
            .strip_prefix("smtp_limiter_rejections_total{reason=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            if *value > 0.0 {
                parts.push(format!("{reason} {value:.0}"));
            }
        }
    }
    let blocks: f64 = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("smtp_limiter_blocks_issued_total"))
        .map(|(_, v)| v)
        .sum();
    if blocks > 0.0 {
        parts.push(format!("blocks {blocks:.0}"));
    }
    if let Some(spooled) = metrics
        .get("smtp_limiter_messages_spooled_total")
        .filter(|v| **v > 0.0)
    {
        parts.push(format!("spooled {spooled:.0}"));
    }
    for outcome in ["parked", "resumed"] {
        let key = format!("smtp_limiter_parked_transactions_total{{outcome=\"{outcome}\"}}");
        if let Some(n) = metrics.get(&key).filter(|v| **v > 0.0) {
            parts.push(format!("{outcome} {n:.0}"));
        }
    }
    parts.join(", ")
}

fn report(results: &[RunResult], setups: &[Setup], out: &mut String) -> Vec<String> {
    let mut table = Table::new(&[
        "setup",
        "legitimate msg/s",
        "× no flood",
        "latency p50 ms",
        "p99 ms",
        "deferred (4xx, retried)",
        "given up",
        "smtpd processes (median / max)",
        "proxy RSS MiB (max)",
        "CPU % agent / Postfix / load generator / machine",
    ]);
    for &setup in setups {
        let runs = runs_of(results, setup);
        if runs.is_empty() {
            continue;
        }
        let rates: Vec<f64> = runs.iter().map(|r| r.rate()).collect();
        let lat: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect();
        let smtpd: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.smtpd.iter().map(|&n| n as f64))
            .collect();
        let rss = runs.iter().flat_map(|r| r.rss.iter().copied()).max();
        let range = if rates.len() > 1 {
            let (lo, hi) = limiter_tests::stats::min_max(&rates);
            format!(" ({lo:.0}–{hi:.0})")
        } else {
            String::new()
        };
        let accepted: usize = runs.iter().map(|r| r.accepted).sum();
        let deferred: u64 = runs.iter().map(|r| r.deferred).sum();
        let failed: u64 = runs.iter().flat_map(|r| r.failures.values()).sum();
        table.row(vec![
            setup.name().to_owned(),
            format!("**{:.1}**{range}", median(&rates)),
            ratio(results, setup, Setup::NoFlood).map_or("–".into(), |r| format!("{r:.2}")),
            fmt_ms(quantile(&lat, 0.5)),
            fmt_ms(quantile(&lat, 0.99)),
            format!("{deferred} of {accepted}"),
            failed.to_string(),
            if smtpd.is_empty() {
                "–".into()
            } else {
                format!(
                    "{:.0} / {:.0}",
                    median(&smtpd),
                    smtpd.iter().copied().fold(0.0, f64::max)
                )
            },
            rss.map_or("–".into(), |k| format!("{:.0}", k as f64 / 1024.0)),
            cpu_cell(&runs),
        ]);
    }
    out.push_str(&table.markdown());

    let warmed: Vec<String> = results
        .iter()
        .filter_map(|r| Some(format!("{} {}", r.setup.short(), r.warmed?)))
        .collect();
    if !warmed.is_empty() {
        let _ = writeln!(
            out,
            "\nKnown senders: addresses that delivered one message before the flood, per run: {}",
            warmed.join(", ")
        );
    }
    let _ = writeln!(out, "\nThe flood, per setup (sums over rounds):\n");
    let mut flood = Table::new(&[
        "setup",
        "sessions greeted",
        "cut by the server",
        "refused at connect/greeting",
        "SYN unanswered",
        "bounces accepted",
        "harvested RCPTs refused / accepted",
        "bytes trickled",
        "agent: shed and refused (metrics)",
    ]);
    for &setup in setups.iter().filter(|s| s.flood()) {
        let runs = runs_of(results, setup);
        if runs.is_empty() {
            continue;
        }
        let sum = |k: &str| runs.iter().map(|r| r.flood[k]).sum::<u64>();
        flood.row(vec![
            setup.name().to_owned(),
            sum("greeted").to_string(),
            sum("cut").to_string(),
            (sum("refused") + sum("not_greeted")).to_string(),
            sum("no_answer").to_string(),
            sum("bounces").to_string(),
            format!("{} / {}", sum("harvest_refused"), sum("harvest_accepted")),
            sum("trickled").to_string(),
            shed_counts(&summed_metrics(&runs)),
        ]);
    }
    out.push_str(&flood.markdown());

    let mut failures: BTreeMap<(Setup, &str), u64> = BTreeMap::new();
    for r in results {
        for (k, v) in &r.failures {
            *failures.entry((r.setup, k)).or_default() += v;
        }
    }
    if !failures.is_empty() {
        let _ = writeln!(
            out,
            "\nLegitimate messages given up, by the last failure:\n"
        );
        for ((setup, why), n) in failures {
            let _ = writeln!(out, "- {}: {why} × {n}", setup.name());
        }
    }
    let left: Vec<String> = results
        .iter()
        .filter(|r| r.queue_left > 0)
        .map(|r| {
            format!(
                "{} round {}: {}",
                r.setup.short(),
                r.round + 1,
                r.queue_left
            )
        })
        .collect();
    if !left.is_empty() {
        let _ = writeln!(
            out,
            "\nMessages still in Postfix's queue 20 s after every accepted legitimate message was delivered (the flood's): {}",
            left.join(", ")
        );
    }
    let mut samples: BTreeMap<(Setup, &str), &str> = BTreeMap::new();
    for r in results {
        for (k, v) in &r.samples {
            samples.entry((r.setup, k)).or_insert(v);
        }
    }
    if !samples.is_empty() {
        let _ = writeln!(
            out,
            "\nReplies the legitimate senders got instead of a 250 (the first of each kind):\n"
        );
        for ((setup, kind), text) in samples {
            let _ = writeln!(out, "- {}: {kind}: `{text}`", setup.name());
        }
    }

    let mut verdicts = Vec::new();
    if let Some(r) = ratio(results, Setup::OnMail, Setup::NoFlood) {
        verdicts.push(format!(
            "legitimate mail under the flood with this product ≥ {TARGET}× no flood: {r:.2}× (median of same-round ratios): {}",
            if r >= TARGET { "met" } else { "MISSED" }
        ));
    }
    let rate = |setup| {
        median(
            &runs_of(results, setup)
                .iter()
                .map(|r| r.rate())
                .collect::<Vec<_>>(),
        )
    };
    let deferred = |setup| {
        runs_of(results, setup)
            .iter()
            .map(|r| r.deferred)
            .sum::<u64>()
    };
    if !runs_of(results, Setup::OnMail).is_empty()
        && !runs_of(results, Setup::PostscreenDeep).is_empty()
    {
        let (ours, theirs) = (rate(Setup::OnMail), rate(Setup::PostscreenDeep));
        let (ours_deferred, theirs_deferred) =
            (deferred(Setup::OnMail), deferred(Setup::PostscreenDeep));
        verdicts.push(format!(
            "ahead of postscreen with its deep tests (the anchor): {ours:.1} against {theirs:.1} legitimate msg/s (medians over rounds); messages deferred before they were taken: {ours_deferred} against {theirs_deferred}: {}",
            if ours > theirs && ours_deferred <= theirs_deferred { "met" } else { "MISSED" }
        ));
    }
    verdicts
}

/// Median per second over rounds, per setup.
fn plot(results: &[RunResult], setups: &[Setup], opts: &Options, machine: &str) -> String {
    let series = setups
        .iter()
        .filter_map(|&setup| {
            let runs = runs_of(results, setup);
            (!runs.is_empty()).then(|| Series {
                name: setup.name().to_owned(),
                color: setup.color().to_owned(),
                points: median_per_step(
                    &runs
                        .iter()
                        .map(|r| r.per_second.as_slice())
                        .collect::<Vec<_>>(),
                ),
                note: {
                    let rate = median(&runs.iter().map(|r| r.rate()).collect::<Vec<_>>());
                    let digits = usize::from(rate < 10.0);
                    format!("median {rate:.digits$} msg/s over the window")
                },
                dashed: setup == Setup::NoFlood,
            })
        })
        .collect();
    LinePlot {
        title: "Legitimate mail under a distributed flood: messages/s accepted".into(),
        subtitle: format!(
            "{} flood addresses, {} senders from {} addresses; median per second over {} round(s)\n{machine}",
            opts.flood_addresses(),
            opts.senders,
            opts.legit_addresses,
            opts.common.rounds(3, 1)
        ),
        x_label: format!(
            "seconds since the senders started (the flood started {} s before)",
            opts.ramp()
        ),
        y_label: "legitimate messages accepted per second".into(),
        series,
    }
    .svg()
}

fn json_report(results: &[RunResult], opts: &Options, verdicts: &[String]) -> serde_json::Value {
    json!({
        "options": format!("{opts:?}"),
        "machine": machine(),
        "verdicts": verdicts,
        "runs": results.iter().map(|r| json!({
            "setup": r.setup.short(),
            "round": r.round + 1,
            "secs": r.secs,
            "rate": r.rate(),
            "per_second": r.per_second,
            "latency_ms_p50": quantile(&r.latencies, 0.5),
            "latency_ms_p99": quantile(&r.latencies, 0.99),
            "latency_ms_p999": quantile(&r.latencies, 0.999),
            "latency_ms_max": r.latencies.iter().copied().reduce(f64::max),
            "over_100_ms": {
                "messages": r.slow().0,
                "secs": r.slow().1,
            },
            "accepted": r.accepted,
            "deferred": r.deferred,
            "deferrals": r.deferrals,
            "failures": r.failures,
            "failure_replies": r.samples,
            "smtpd_processes": r.smtpd,
            "agent_rss_kib": r.rss,
            "agent_cpu_secs": r.agent_cpu,
            "postfix_cpu_secs": r.postfix_cpu,
            "bench_cpu_secs": r.bench_cpu,
            "machine_busy": r.machine_busy,
            "flood": r.flood,
            "bounces_delivered": r.bounces_delivered,
            "known_senders_warmed": r.warmed,
            "queue_left": r.queue_left,
            "agent_metrics": r.metrics,
        })).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------------------
// Main

/// A runtime whose threads live in `ns` (sockets belong to the namespace
/// they are created in).
fn runtime_in(ns: &NetNs, threads: usize, name: &str) -> Result<tokio::runtime::Runtime> {
    let path = ns.path();
    let enter = move || {
        let fd = fs::File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a namespace file we opened.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("cannot enter {path}: {}", std::io::Error::last_os_error());
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .on_thread_start(enter)
        .enable_all()
        .build()?;
    Ok(rt)
}

fn main() -> Result<()> {
    let opts = Options::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "flood-bench needs root (namespaces, XDP, Postfix)"
    );
    let names: Vec<&str> = SETUPS.iter().map(|s| s.short()).collect();
    let selected = opts.common.select(&names)?;
    let setups: Vec<Setup> = SETUPS
        .into_iter()
        .filter(|s| selected.contains(&s.short()))
        .collect();
    system::install_signal_handlers();
    let binary = agent_binary(opts.common.agent.as_deref())?;
    remove_stale(PREFIX)?;
    // Client sockets of every zombie here; the agent (two per session) and
    // Postfix inherit it.
    let sessions = opts.holders * opts.holder_sessions
        + 2 * (opts.slow + opts.bounce + opts.tricklers + opts.keepers)
        + opts.harvest;
    raise_nofile(sessions as u64 * 2 + 4_096)?;
    let started = Instant::now();
    let machine_start = machine();
    let rounds = opts.common.rounds(3, 1);
    let topo = Topology::new(&opts)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## flood-bench results{}\n",
        if opts.common.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(out, "Machine at start: {machine_start}  ");
    let _ = writeln!(out, "Limits: {}  ", limits_line(&topo.server));
    let _ = writeln!(
        out,
        "Flood: {} addresses ({} idle holders × {}, {} slow senders × 2, {} bounce flooders × 2, {} harvesters, {} tricklers × 2, {} keepers × 2); legitimate: {} senders over {} addresses ({}); {} s windows after a {} s ramp, {rounds} round(s)\n",
        opts.flood_addresses(),
        opts.holders,
        opts.holder_sessions,
        opts.slow,
        opts.bounce,
        opts.harvest,
        opts.tricklers,
        opts.keepers,
        opts.senders,
        opts.legit_addresses,
        if opts.known_senders {
            "known: each delivered once before the flood"
        } else {
            "each a first-time client"
        },
        opts.secs(),
        opts.ramp()
    );
    if !opts.postfix_set.is_empty() {
        let settings: Vec<String> = opts
            .postfix_set
            .iter()
            .map(|(k, v)| format!("`{k} = {v}`"))
            .collect();
        let _ = writeln!(out, "Postfix, every setup: {}\n", settings.join(", "));
    }
    eprint!("{out}");
    let flood_rt = runtime_in(&topo.client, 2, "flood")?;
    let legit_rt = runtime_in(&topo.client, 1, "legit")?;
    let mut bench = Bench {
        opts: &opts,
        topo: &topo,
        agent_binary: &binary,
        flood_rt: &flood_rt,
        legit_rt: &legit_rt,
        runs: 0,
    };
    let mut results = Vec::new();
    for round in 0..rounds {
        for k in 0..setups.len() {
            let setup = setups[(k + round) % setups.len()];
            let r = bench.run(setup, round)?;
            eprintln!(
                "round {} {:<34} {:>6.1} msg/s, p50 {} ms, p99 {} ms, {} over {SLOW_MS} ms ({:.1} s), deferred {}, given up {:?}; smtpd max {}; RSS max {} KiB; flood {:?}; {}",
                round + 1,
                setup.name(),
                r.rate(),
                fmt_ms(quantile(&r.latencies, 0.5)),
                fmt_ms(quantile(&r.latencies, 0.99)),
                r.slow().0,
                r.slow().1,
                r.deferred,
                r.failures,
                r.smtpd.iter().max().unwrap_or(&0),
                r.rss.iter().max().unwrap_or(&0),
                r.flood,
                shed_counts(&r.metrics),
            );
            results.push(r);
        }
    }
    drop(flood_rt);
    drop(legit_rt);
    let verdicts = report(&results, &setups, &mut out);
    let dir: PathBuf = opts.common.out_dir("docs", "flood-bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let svg = dir.join("flood-bench.svg");
    fs::write(&svg, plot(&results, &setups, &opts, &machine_start))?;
    let json_path = if opts.common.out.is_none() && !opts.common.quick {
        // Raw figures stay out of docs/.
        let target = limiter_tests::bench::args::workspace_root().join("target/flood-bench");
        fs::create_dir_all(&target)?;
        target.join("flood-bench.json")
    } else {
        dir.join("flood-bench.json")
    };
    write_json(&json_path, &json_report(&results, &opts, &verdicts))?;
    let _ = writeln!(out, "\n### Targets\n");
    for v in &verdicts {
        let _ = writeln!(out, "- {v}");
    }
    let _ = writeln!(
        out,
        "\nPlot: {}; every figure: {}",
        svg.display(),
        json_path.display()
    );
    let _ = writeln!(out, "Machine at end: {}", machine());
    let _ = writeln!(out, "Total time: {:.0} s", started.elapsed().as_secs_f64());
    drop(topo);
    println!("{out}");
    Ok(())
}
