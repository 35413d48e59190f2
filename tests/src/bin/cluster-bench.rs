//! `cluster-bench`: how fast a block decided on one edge host is in force
//! on the others (`[cluster]`, blocks shared through Redis), and what it
//! costs Redis and the agents.
//!
//! Run it with `cargo xtask bench -- --only cluster [ARGS]` or
//! `cargo run --release -p limiter-tests --bin cluster-bench [-- ARGS]`, as
//! root (namespaces, XDP).
//!
//! One private redis-server (the test fixture, on the host's loopback) and
//! `--agents` agents (4), each an edge host of its own: its own network
//! namespace, the kernel layer required with XDP on its own veth, the
//! built-in backend, and a relay on its loopback to Redis. Each round, a
//! burst of `--blocks` (10 000) blocks is decided on the first agent, one
//! `block add` a request on its control socket, as fast as it answers; the
//! other agents' `stats` are polled every millisecond or two. A block's
//! propagation time is from the answer to its `block add` on the first
//! agent (the kernel map written there, the event queued for Redis) to
//! the poll that first shows it applied on another agent (its kernel map
//! is written before its count grows: `ProxyContext::enforce`). The stream
//! keeps the order, so the k-th block applied is the k-th decided.
//!
//! Reported per round and as medians: p50/p99/max of the propagation time
//! over every block and every other agent, the burst's rate, Redis
//! commands (`INFO commandstats`) and Redis CPU (`INFO cpu`) per block,
//! and the agents' CPU per block (deciding one, applying ones). Checks:
//! every agent applied every block, and its kernel holds them all
//! (`smtp_limiter_kernel_blocks`).
//!
//! Then, each round, the cost of a counted event (`share_counters`): a
//! client in the first host's client namespace sends `--counted` failed
//! RCPTs (unknown recipients of the built-in backend, 10 a session; the
//! limits are set high, so that nothing is blocked) and the first agent's
//! counted events are awaited in Redis (`cluster.counters.sent`): Redis
//! commands and CPU per counted event, and the agent's own count of the
//! commands it sent.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use limiter_tests::{
    bench::{
        agent::{agent_binary, Agent, AgentOptions},
        args::Common,
        report::{quantile, Table},
        system::{self, remove_stale},
    },
    netns::{self, Link, NetNs},
    redis::Redis,
    stats::{machine, median},
    tcp::{connect_local, Relay},
};
use serde_json::{json, Value};

/// Names the agents' directories, pins and namespaces.
const PREFIX: &str = "slcb";
/// The agents' SMTP port (on their veth) and metrics (on their loopback).
const SMTP: u16 = 25;
const METRICS: &str = "127.0.0.1:9425";
/// The built-in backend, on each agent's loopback.
const BACKEND: &str = "127.0.0.1:10026";
/// How long the other agents may take to apply a whole burst.
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agents may take to reach Redis at the start.
const UP_TIMEOUT: Duration = Duration::from_secs(30);

/// Propagation of blocks between edge hosts through Redis (as root).
#[derive(Parser)]
#[command(name = "cluster-bench")]
struct Options {
    #[command(flatten)]
    common: Common,
    /// Blocks decided on the first agent per round [default: 10000; 1000
    /// with --quick].
    #[arg(long)]
    blocks: Option<usize>,
    /// Failed RCPTs (counted events) per round [default: 2000; 200 with
    /// --quick].
    #[arg(long)]
    counted: Option<usize>,
    /// Agents (edge hosts), at least 2.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(2..=16))]
    agents: u32,
    /// Keep the agents' directories (configuration, log, state).
    #[arg(long)]
    keep: bool,
}

/// One edge host: its agent and its relay to Redis (the namespaces and
/// the veth are the [`Topology`]'s).
struct Host<'a> {
    agent: Agent<'a>,
    _relay: Relay,
}

/// The namespaces and veths of the hosts; they outlive the agents.
struct Topology {
    servers: Vec<NetNs>,
    clients: Vec<NetNs>,
    links: Vec<Link>,
}

impl Topology {
    fn new(hosts: usize) -> Result<Topology> {
        let (mut servers, mut clients, mut links) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..hosts {
            let server = NetNs::new(PREFIX)?;
            let client = NetNs::new(PREFIX)?;
            links.push(netns::link(&server, &client, &format!("cb{i}"))?);
            servers.push(server);
            clients.push(client);
        }
        Ok(Topology {
            servers,
            clients,
            links,
        })
    }
}

fn agent_config(i: usize, link: &Link, redis_port: u16, dir: &Path, pins: &Path) -> String {
    format!(
        r#"# Written by cluster-bench.
mode = "enforce"

[[listen]]
address = "{listen}:{SMTP}"
tls = "none"

[backend]
address = "{BACKEND}"
identity = "none"
builtin = true

[relay]
accept = "*@example.com"

[limits]
# The counted events' part sends thousands of failed RCPTs: none may block.
max_failed_rcpt = 1000000
max_failed_rcpt_per_source = 1000000
max_failed_rcpt_per_network = 0
# Its sessions come back to back from a few addresses.
connection_rate = "0/1m"
connection_rate_per_network = "0/1m"

[kernel]
mode = "required"
interfaces = ["{interface}"]
attach = "xdp"
pin_path = "{pins}"
ports = [{SMTP}]

[control]
socket = "{dir}/control.sock"

[metrics]
address = "{METRICS}"

[state]
directory = "{dir}/state"

[cluster]
redis = "redis://127.0.0.1:{redis_port}/0"
node = "host{i}"
share_counters = true
"#,
        listen = link.server_v4,
        interface = link.server_if,
        pins = pins.display(),
        dir = dir.display(),
    )
}

/// One request on the agent's control socket (one connection each: the
/// socket takes a bounded amount of requests per connection).
fn control(dir: &Path, request: &Value) -> Result<Value> {
    let path = dir.join("control.sock");
    let mut stream =
        UnixStream::connect(&path).with_context(|| format!("connect {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let response: Value =
        serde_json::from_str(&line).with_context(|| format!("control answer {line:?}"))?;
    ensure!(
        response["ok"] == true,
        "{request} refused: {}",
        response["error"]
    );
    Ok(response["data"].clone())
}

fn cluster_stats(dir: &Path) -> Result<Value> {
    Ok(control(dir, &json!({ "command": "stats" }))?["cluster"].clone())
}

fn count(stats: &Value, key: &str) -> u64 {
    stats[key].as_u64().unwrap_or(0)
}

/// A Redis `INFO section` as `key → value`.
fn redis_info(addr: SocketAddr, section: &str) -> Result<BTreeMap<String, String>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream
        .write_all(format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len()).as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header)?;
    let len: usize = header
        .trim()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("INFO answered {header:?}"))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// Calls per command since Redis started (`cmdstat_xadd:calls=…`).
fn redis_calls(addr: SocketAddr) -> Result<BTreeMap<String, u64>> {
    Ok(redis_info(addr, "commandstats")?
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?.to_owned();
            let calls = v.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name, calls.parse().ok()?))
        })
        .collect())
}

/// Calls per command since `before` (`redis_calls`), the benchmark's own
/// INFO left out.
fn calls_since(addr: SocketAddr, before: &BTreeMap<String, u64>) -> Result<BTreeMap<String, u64>> {
    Ok(redis_calls(addr)?
        .into_iter()
        .map(|(k, v)| {
            let delta = v - before.get(&k).copied().unwrap_or(0);
            (k, delta)
        })
        .filter(|(k, v)| *v > 0 && k != "info")
        .collect())
}

/// Redis's CPU time since it started, seconds (user + system).
fn redis_cpu(addr: SocketAddr) -> Result<f64> {
    let info = redis_info(addr, "cpu")?;
    let get = |k: &str| {
        info.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(get("used_cpu_user") + get("used_cpu_sys"))
}

/// The times at which an agent's applied count first reached each value.
struct Arrivals {
    /// (when, applied − base), one entry per change.
    seen: Vec<(Instant, u64)>,
}

impl Arrivals {
    /// When the k-th block (0-based) of the burst was first seen applied.
    fn at(&self, k: usize) -> Option<Instant> {
        let i = self.seen.partition_point(|(_, n)| *n <= k as u64);
        self.seen.get(i).map(|(t, _)| *t)
    }
}

/// Polls `dir`'s applied count until it grew by `want` (or the stop).
fn poll_applied(dir: PathBuf, base: u64, want: u64, stop: Arc<AtomicBool>) -> Result<Arrivals> {
    let mut seen = Vec::new();
    let mut last = 0;
    let started = Instant::now();
    while last < want {
        ensure!(
            started.elapsed() < APPLY_TIMEOUT && !stop.load(Ordering::Relaxed),
            "{}: {last} of {want} blocks applied after {:?}",
            dir.display(),
            started.elapsed()
        );
        let applied = count(&cluster_stats(&dir)?, "applied").saturating_sub(base);
        let now = Instant::now();
        if applied > last {
            seen.push((now, applied));
            last = applied;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(Arrivals { seen })
}

/// What one burst measured.
struct Round {
    blocks: usize,
    /// Seconds to decide the whole burst on the first agent.
    decide_secs: f64,
    /// Propagation times in ms, every block × every other agent.
    latencies: Vec<f64>,
    /// Redis calls by command during the round.
    calls: BTreeMap<String, u64>,
    redis_cpu: f64,
    /// CPU seconds of the deciding agent, then of each other one.
    agent_cpu: Vec<f64>,
}

/// The address of the k-th block of round `round` (100.64.0.0/10, shared
/// address space: never a real client here).
fn block_address(round: usize, k: usize) -> Ipv4Addr {
    let n = (round * 1_000_000 + k) as u32;
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 1)) + n)
}

fn burst(hosts: &[Host], redis: SocketAddr, round: usize, blocks: usize) -> Result<Round> {
    let dirs: Vec<PathBuf> = hosts.iter().map(|h| h.agent.paths().dir.clone()).collect();
    let calls_before = redis_calls(redis)?;
    let redis_cpu_before = redis_cpu(redis)?;
    let cpu_before: Vec<f64> = hosts
        .iter()
        .map(|h| h.agent.cpu_secs().unwrap_or(0.0))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = dirs[1..]
        .iter()
        .map(|dir| {
            let base = count(&cluster_stats(dir)?, "applied");
            let (dir, stop) = (dir.clone(), Arc::clone(&stop));
            Ok(std::thread::spawn(move || {
                poll_applied(dir, base, blocks as u64, stop)
            }))
        })
        .collect::<Result<_>>()?;
    let mut decided = Vec::with_capacity(blocks);
    let start = Instant::now();
    for k in 0..blocks {
        let request = json!({
            "command": "block-add",
            "net": block_address(round, k).to_string(),
            "duration_secs": 3600,
            "origin": "manual",
            "comment": "cluster-bench",
        });
        if let Err(e) = control(&dirs[0], &request) {
            stop.store(true, Ordering::Relaxed);
            return Err(e.context(format!("block {k} of round {round}")));
        }
        decided.push(Instant::now());
    }
    let decide_secs = start.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(blocks * pollers.len());
    for poller in pollers {
        let arrivals = match poller.join() {
            Ok(result) => result?,
            Err(_) => bail!("a poller panicked"),
        };
        for (k, at) in decided.iter().enumerate() {
            let seen = arrivals
                .at(k)
                .with_context(|| format!("block {k} never seen applied"))?;
            latencies.push(seen.saturating_duration_since(*at).as_secs_f64() * 1e3);
        }
    }
    let calls = calls_since(redis, &calls_before)?;
    let agent_cpu = hosts
        .iter()
        .zip(&cpu_before)
        .map(|(h, before)| h.agent.cpu_secs().unwrap_or(0.0) - before)
        .collect();
    Ok(Round {
        blocks,
        decide_secs,
        latencies,
        calls,
        redis_cpu: redis_cpu(redis)? - redis_cpu_before,
        agent_cpu,
    })
}

/// Failed RCPTs a session sends.
const RCPTS_PER_SESSION: usize = 10;

/// One whole reply's last line.
fn smtp_reply(reader: &mut BufReader<TcpStream>) -> Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        ensure!(reader.read_line(&mut line)? > 0, "the proxy closed");
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            return Ok(line.trim_end().to_owned());
        }
    }
}

/// A session from `source` to `to` with `rcpts` unknown recipients.
fn failed_rcpts(source: IpAddr, to: SocketAddr, tag: &str, rcpts: usize) -> Result<()> {
    let stream = connect_local(source, to, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut expect = |command: Option<String>, code: char| -> Result<()> {
        if let Some(command) = &command {
            writer.write_all(command.as_bytes())?;
        }
        let reply = smtp_reply(&mut reader)?;
        ensure!(reply.starts_with(code), "{command:?} answered {reply:?}");
        Ok(())
    };
    expect(None, '2')?;
    expect(Some("EHLO bench.test\r\n".into()), '2')?;
    expect(Some("MAIL FROM:<bench@bench.test>\r\n".into()), '2')?;
    for k in 0..rcpts {
        expect(
            Some(format!("RCPT TO:<nobody-{tag}-{k}@example.com>\r\n")),
            '5',
        )?;
    }
    expect(Some("QUIT\r\n".into()), '2')
}

/// What a batch of counted events cost.
struct CountedCost {
    events: u64,
    /// Redis calls by command.
    calls: BTreeMap<String, u64>,
    redis_cpu: f64,
    /// The agent's own count of the commands it sent.
    agent_commands: u64,
}

/// `events` failed RCPTs through the first host, awaited in Redis.
fn counted_events(
    topo: &Topology,
    hosts: &[Host],
    redis: SocketAddr,
    round: usize,
    events: usize,
) -> Result<CountedCost> {
    let dir = &hosts[0].agent.paths().dir;
    let counters = |dir: &Path| -> Result<(u64, u64)> {
        let c = cluster_stats(dir)?["counters"].clone();
        Ok((count(&c, "sent"), count(&c, "commands")))
    };
    let (sent_before, commands_before) = counters(dir)?;
    let calls_before = redis_calls(redis)?;
    let cpu_before = redis_cpu(redis)?;
    let link = &topo.links[0];
    let to = SocketAddr::from((link.server_v4, SMTP));
    let source = IpAddr::from(link.client_v4s[0]);
    let sessions = events.div_ceil(RCPTS_PER_SESSION);
    topo.clients[0].run(|| -> Result<()> {
        for n in 0..sessions {
            let rcpts = RCPTS_PER_SESSION.min(events - n * RCPTS_PER_SESSION);
            failed_rcpts(source, to, &format!("{round}-{n}"), rcpts)?;
        }
        Ok(())
    })?;
    let started = Instant::now();
    let (sent, commands) = loop {
        let (sent, commands) = counters(dir)?;
        if sent - sent_before >= events as u64 {
            break (sent, commands);
        }
        ensure!(
            started.elapsed() < APPLY_TIMEOUT,
            "{} of {events} counted events reached Redis",
            sent - sent_before
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(CountedCost {
        events: sent - sent_before,
        calls: calls_since(redis, &calls_before)?,
        redis_cpu: redis_cpu(redis)? - cpu_before,
        agent_commands: commands - commands_before,
    })
}

/// Every agent's kernel holds at least `want` blocks.
fn check_kernels(hosts: &[Host], want: usize) -> Result<()> {
    for (i, host) in hosts.iter().enumerate() {
        let metrics = host.agent.metrics()?;
        let held = metrics
            .get("smtp_limiter_kernel_blocks")
            .copied()
            .unwrap_or(0.0);
        ensure!(
            held >= want as f64,
            "host{i}: the kernel holds {held} blocks, {want} were decided"
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let opts = Options::parse();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "cluster-bench needs root (namespaces, XDP)"
    );
    system::install_signal_handlers();
    let binary = agent_binary(opts.common.agent.as_deref())?;
    remove_stale(PREFIX)?;
    let blocks = opts
        .blocks
        .unwrap_or(if opts.common.quick { 1_000 } else { 10_000 });
    let counted = opts
        .counted
        .unwrap_or(if opts.common.quick { 200 } else { 2_000 });
    let rounds = opts.common.rounds(3, 1);
    let n = opts.agents as usize;
    let started = Instant::now();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## cluster-bench results{}\n",
        if opts.common.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(out, "Machine at start: {}", machine());
    let _ = writeln!(
        out,
        "{n} agents (XDP on a veth each, own namespace), one redis-server; {blocks} blocks per round, {rounds} rounds\n"
    );
    eprint!("{out}");

    let redis = Redis::start().context("redis-server")?;
    let topo = Topology::new(n)?;
    let mut hosts = Vec::new();
    for (i, (server, link)) in topo.servers.iter().zip(&topo.links).enumerate() {
        let relay = Relay::start(server, redis.addr()).context("relay to Redis")?;
        let agent = Agent::start(
            &AgentOptions {
                binary: &binary,
                netns: Some(server),
                prefix: PREFIX,
                n: i,
                listen: SocketAddr::from((link.server_v4, SMTP)),
                metrics: METRICS.parse()?,
                kernel_required: true,
                keep: opts.keep,
            },
            |paths| agent_config(i, link, relay.port(), &paths.dir, &paths.pins),
        )
        .with_context(|| format!("agent host{i}"))?;
        hosts.push(Host {
            agent,
            _relay: relay,
        });
    }
    let up = Instant::now();
    for (i, host) in hosts.iter().enumerate() {
        while cluster_stats(&host.agent.paths().dir)?["state"] != "up" {
            ensure!(
                up.elapsed() < UP_TIMEOUT,
                "host{i} did not reach Redis in {UP_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let mut results = Vec::new();
    let mut costs = Vec::new();
    for round in 0..rounds {
        system::check_stop()?;
        let r = burst(&hosts, redis.addr(), round, blocks)?;
        check_kernels(&hosts, blocks * (round + 1))?;
        eprintln!(
            "round {}: {} blocks decided in {:.2} s ({:.0}/s); propagation p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; Redis {:.1} commands and {:.1} µs CPU per block",
            round + 1,
            r.blocks,
            r.decide_secs,
            r.blocks as f64 / r.decide_secs,
            quantile(&r.latencies, 0.5),
            quantile(&r.latencies, 0.99),
            quantile(&r.latencies, 1.0),
            r.calls.values().sum::<u64>() as f64 / r.blocks as f64,
            r.redis_cpu * 1e6 / r.blocks as f64,
        );
        results.push(r);
        let c = counted_events(&topo, &hosts, redis.addr(), round, counted)?;
        eprintln!(
            "round {}: {} counted events: {:.2} Redis commands ({:.2} by the agent's count) and {:.1} µs Redis CPU per event",
            round + 1,
            c.events,
            c.calls.values().sum::<u64>() as f64 / c.events as f64,
            c.agent_commands as f64 / c.events as f64,
            c.redis_cpu * 1e6 / c.events as f64,
        );
        costs.push(c);
    }

    let per_round =
        |f: &dyn Fn(&Round) -> f64| -> f64 { median(&results.iter().map(f).collect::<Vec<_>>()) };
    let q = |r: &Round, p: f64| quantile(&r.latencies, p);
    let mut table = Table::new(&["measure", "median of rounds", "rounds"]);
    let mut row = |name: &str, f: &dyn Fn(&Round) -> f64, fmt: &dyn Fn(f64) -> String| {
        let values: Vec<String> = results.iter().map(|r| fmt(f(r))).collect();
        table.row(vec![name.to_owned(), fmt(per_round(f)), values.join(", ")]);
    };
    let ms = |v: f64| format!("{v:.1} ms");
    let one = |v: f64| format!("{v:.1}");
    let us = |v: f64| format!("{v:.1} µs");
    row(
        "burst rate on the deciding agent, blocks/s",
        &|r| r.blocks as f64 / r.decide_secs,
        &|v| format!("{v:.0}"),
    );
    row(
        "propagation p50 (decided on host0 → applied on another host)",
        &|r| q(r, 0.5),
        &ms,
    );
    row("propagation p99", &|r| q(r, 0.99), &ms);
    row("propagation max", &|r| q(r, 1.0), &ms);
    row(
        "Redis commands per block (all agents)",
        &|r| r.calls.values().sum::<u64>() as f64 / r.blocks as f64,
        &one,
    );
    row(
        "Redis CPU per block",
        &|r| r.redis_cpu * 1e6 / r.blocks as f64,
        &us,
    );
    row(
        "deciding agent CPU per block",
        &|r| r.agent_cpu[0] * 1e6 / r.blocks as f64,
        &us,
    );
    row(
        "applying agent CPU per block (mean of the others)",
        &|r| {
            r.agent_cpu[1..].iter().sum::<f64>() / (r.agent_cpu.len() - 1) as f64 * 1e6
                / r.blocks as f64
        },
        &us,
    );
    let _ = writeln!(
        out,
        "### Propagation of a burst of {blocks} blocks, {n} agents\n"
    );
    let _ = writeln!(out, "{}", table.markdown());
    let mut calls = Table::new(&["Redis command", "calls per block (median of rounds)"]);
    let names: std::collections::BTreeSet<&String> =
        results.iter().flat_map(|r| r.calls.keys()).collect();
    for name in names {
        let per_block =
            per_round(&|r| r.calls.get(name).copied().unwrap_or(0) as f64 / r.blocks as f64);
        calls.row(vec![name.clone(), format!("{per_block:.3}")]);
    }
    let _ = writeln!(out, "{}", calls.markdown());
    let _ = writeln!(
        out,
        "### A counted event (`share_counters`): {counted} failed RCPTs through host0 per round\n"
    );
    let per_event = |f: &dyn Fn(&CountedCost) -> f64| -> String {
        let values: Vec<f64> = costs.iter().map(f).collect();
        let list: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
        format!("{:.2} ({})", median(&values), list.join(", "))
    };
    let mut table = Table::new(&["per counted event", "median of rounds (rounds)"]);
    table.row(vec![
        "commands Redis ran (those inside the script included)".into(),
        per_event(&|c| c.calls.values().sum::<u64>() as f64 / c.events as f64),
    ]);
    table.row(vec![
        "commands the agent sent (EVALSHA; SCRIPT LOAD once a connection)".into(),
        per_event(&|c| c.agent_commands as f64 / c.events as f64),
    ]);
    table.row(vec![
        "Redis CPU, µs".into(),
        per_event(&|c| c.redis_cpu * 1e6 / c.events as f64),
    ]);
    let names: std::collections::BTreeSet<&String> =
        costs.iter().flat_map(|c| c.calls.keys()).collect();
    for name in names {
        table.row(vec![
            format!("{name} calls"),
            per_event(&|c| c.calls.get(name).copied().unwrap_or(0) as f64 / c.events as f64),
        ]);
    }
    let _ = writeln!(out, "{}", table.markdown());
    let _ = writeln!(out, "Machine at end: {}", machine());
    let _ = writeln!(out, "Total time: {:.0} s", started.elapsed().as_secs_f64());
    print!("{out}");
    for (i, host) in hosts.into_iter().enumerate() {
        host.agent
            .stop()
            .with_context(|| format!("stopping host{i}"))?;
    }
    Ok(())
}
