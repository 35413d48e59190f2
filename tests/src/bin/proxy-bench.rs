//! `proxy-bench`: what the SMTP proxy costs a mail flow, measured against
//! the same backend reached directly, in one run with interleaved rounds.
//!
//! Run it with `cargo xtask bench -- --only proxy [ARGS]` or
//! `cargo run --release -p limiter-tests --bin proxy-bench [-- ARGS]`, as
//! root (the Postfix fixture needs it; smtp-sink runs as `nobody`). All
//! traffic stays on 127.0.0.1. Helper processes (smtp-sink, smtp-source,
//! the client holder) get SIGKILL if the benchmark dies.
//!
//! Three measurements:
//!
//! 1. **Throughput**: messages per second sent by Postfix's `smtp-source`
//!    (a new session per message) with 1 and 20 parallel sessions, to four
//!    setups: smtp-sink directly, the proxy in front of the same smtp-sink
//!    (`identity = "none"`: smtp-sink does not speak PROXY), a private
//!    Postfix (discard delivery) directly, and the proxy (`identity =
//!    "proxy-v2"`) in front of a second private Postfix that expects the
//!    PROXY header. Each setup's message count follows its measured rate
//!    (an unrecorded warm-up run sets the first one; it moves by at most 2×
//!    from run to run) so that one measurement takes about `--seconds`.
//!    Every round measures every setup,
//!    direct and proxied back to back (which goes first alternates from
//!    round to round); reported are medians over rounds, the range, the
//!    ratio of the medians and the median of the per-round ratios.
//! 2. **Added latency per command**: a blocking client does `--commands`
//!    NOOPs one at a time (each waits for its reply) to smtp-sink, directly
//!    and through the proxy, in every round; per-command round trip
//!    median and p99. Then `--step-sessions` whole mail sessions (the
//!    dialogue smtp-source has: greeting, HELO, MAIL, RCPT, DATA, body,
//!    QUIT) one after the other, each step timed, directly and through the
//!    proxy: where the per-message cost goes.
//! 3. **Memory per idle session**: with the proxy running inside this
//!    process, `--idle` client connections are opened through it to
//!    smtp-sink by a child process (this program with `--hold-clients`),
//!    which reads each greeting and keeps the sessions open; the growth of
//!    this process's resident set (`VmRSS`) divided by the number of
//!    sessions. The proxy holds two descriptors per session (client and
//!    backend), so RLIMIT_NOFILE is raised as far as allowed and caps the
//!    count if it must (said in the report).
//!
//! The proxy runs with its kernel layer off and without a tracing
//! subscriber (its log lines cost nothing here; the agent writes one per
//! session). Its runtime has 2 worker threads, as the agent's has on a
//! 2-CPU machine.
//!
//! Checks: every smtp-source run must exit 0 (it aborts on any unexpected
//! reply); the proxy's message counter must grow by exactly the count sent
//! through it; every message sent to a Postfix must be delivered (to
//! `discard`) by the end; Postfix's queue is drained before each of its
//! measurements.

use limiter_tests::stats::{machine, median, min_max};
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use limiter_tests::{
    bench::{
        agent::loopback_config,
        args::Common,
        report::quantile,
        system::{die_with_parent, nobody, raise_nofile, rss_kib},
    },
    fixture::free_port,
    postfix::{postfix_tool, Postfix, PostfixOptions},
    proxy::TestProxy,
};

/// Targets from the issue: proxied throughput as a fraction of direct, and
/// resident memory per idle session.
const POSTFIX_TARGET: f64 = 0.9;
const SINK_TARGET: f64 = 0.6;
const MEMORY_TARGET_KIB: f64 = 64.0;

/// Concurrencies (`smtp-source -s`).
const SESSIONS: [u32; 2] = [1, 20];
const SENDER: &str = "sender@bench.test";
const RECIPIENT: &str = "alice@example.com";
const CLIENT_NAME: &str = "client.bench.test";

/// Bounds: one smtp-source run, Postfix's queue draining, opening the idle
/// sessions, their teardown.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(120);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const OPEN_TIMEOUT: Duration = Duration::from_secs(180);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Message counts are kept within these bounds whatever the calibration says.
const MIN_MESSAGES: u64 = 100;
const MAX_MESSAGES: u64 = 200_000;
/// Idle connections are opened this many at a time (below every backlog).
const OPEN_BATCH: usize = 200;

#[derive(Clone, Debug)]
struct Options {
    rounds: usize,
    seconds: f64,
    commands: usize,
    step_sessions: usize,
    idle: usize,
    throughput: bool,
    latency: bool,
    memory: bool,
    quick: bool,
    /// Diagnostics: only start smtp-sink and a Postfix, each with a proxy
    /// in front, print their addresses and wait this long.
    serve: Option<u64>,
}

/// SMTP throughput, per-command latency and memory per idle session of the
/// proxy, against the same backends reached directly (as root).
///
/// --quick: 2 rounds, 0.5 s measurements, 500 NOOPs, 50 step sessions,
/// 1000 idle sessions (other options still apply). Parts (for --only):
/// throughput, latency, memory.
#[derive(Parser)]
#[command(name = "proxy-bench")]
struct Cli {
    #[command(flatten)]
    common: Common,
    /// Target length of one throughput measurement, seconds (0.1 to 60)
    /// [default: 3].
    #[arg(long)]
    seconds: Option<f64>,
    /// NOOPs per latency measurement [default: 2000].
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    commands: Option<u32>,
    /// Sessions timed step by step per round [default: 300].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    step_sessions: Option<u32>,
    /// Idle sessions for the memory measurement [default: 10000].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    idle: Option<u32>,
    /// The same as --only: a subset of throughput,latency,memory.
    #[arg(long, value_delimiter = ',')]
    parts: Vec<String>,
    /// No measurement: start smtp-sink and the proxy in front of it, print
    /// both addresses, wait SECS (for profiling with your own client, e.g.
    /// perf record -p PID).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    serve: Option<u64>,
}

fn parse_args() -> Result<Options> {
    let mut cli = Cli::parse();
    let quick = cli.common.quick;
    cli.common.only.append(&mut cli.parts);
    let parts = cli.common.select(&["throughput", "latency", "memory"])?;
    let seconds = cli.seconds.unwrap_or(if quick { 0.5 } else { 3.0 });
    ensure!((0.1..=60.0).contains(&seconds), "--seconds: 0.1 to 60");
    let pick = |given: Option<u32>, full: u32, short: u32| {
        given.unwrap_or(if quick { short } else { full }) as usize
    };
    Ok(Options {
        rounds: cli.common.rounds(5, 2),
        seconds,
        commands: pick(cli.commands, 2_000, 500),
        step_sessions: pick(cli.step_sessions, 300, 50),
        idle: pick(cli.idle, 10_000, 1_000),
        throughput: parts.contains(&"throughput"),
        latency: parts.contains(&"latency"),
        memory: parts.contains(&"memory"),
        quick,
        serve: cli.serve,
    })
}

// -- Processes ---------------------------------------------------------------

/// smtp-sink on 127.0.0.1 and a free port; killed (by its pid) on drop.
struct Sink {
    child: Child,
    addr: SocketAddr,
}

impl Sink {
    fn start(max_connections: usize) -> Result<Self> {
        let tool = postfix_tool("smtp-sink")?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(&tool);
        // -m: simultaneous connections it serves (the rest wait in the
        // backlog); -t: command timeout (idle sessions must outlive the
        // memory measurement). As root smtp-sink wants `-u nobody`; the
        // switch is made here instead, before the parent-death signal is
        // set (a change of user would clear it), so that a benchmark killed
        // before its cleanup does not leave smtp-sink behind.
        cmd.args(["-m", &max_connections.to_string(), "-t", "600"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("4096")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        die_with_parent(&mut cmd, nobody());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", tool.display()))?;
        let mut sink = Self { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = sink.child.try_wait()? {
                bail!("smtp-sink exited at start: {status}");
            }
            if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                reader.read_line(&mut line)?;
                ensure!(line.starts_with("220"), "smtp-sink greeted with {line:?}");
                reader.get_mut().write_all(b"QUIT\r\n")?;
                return Ok(sink);
            }
            ensure!(
                Instant::now() < deadline,
                "smtp-sink did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `smtp-source` for `messages` messages in `sessions` parallel
/// sessions against `addr`; returns the wall time of the whole run.
fn smtp_source(tool: &PathBuf, addr: SocketAddr, messages: u64, sessions: u32) -> Result<Duration> {
    let mut cmd = Command::new(tool);
    cmd.args(["-m", &messages.to_string(), "-s", &sessions.to_string()])
        .args(["-f", SENDER, "-t", RECIPIENT, "-M", CLIENT_NAME])
        .arg(format!("127.0.0.1:{}", addr.port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd, None);
    let started = Instant::now();
    let child = cmd.spawn().context("cannot start smtp-source")?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(SOURCE_TIMEOUT) {
        Ok(output) => output.context("waiting for smtp-source")?,
        Err(_) => {
            // SAFETY: kill has no memory preconditions; pid is our child,
            // not yet reaped (the waiter thread is still waiting for it).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = waiter.join();
            bail!(
                "smtp-source -m {messages} -s {sessions} to {addr}: no end within {SOURCE_TIMEOUT:?}, killed"
            );
        }
    };
    let elapsed = started.elapsed();
    let _ = waiter.join();
    ensure!(
        output.status.success(),
        "smtp-source -m {messages} -s {sessions} to {addr} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(elapsed)
}

// -- Setups ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Backend {
    Sink,
    Postfix,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sink => "smtp-sink",
            Backend::Postfix => "Postfix",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    Direct,
    Proxy,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Proxy => "proxy",
        }
    }
}

fn proxy_config(backend: SocketAddr, identity: &str) -> String {
    loopback_config(
        backend,
        identity,
        // The latency part sends thousands of NOOPs before any MAIL.
        "command_timeout = \"10m\"\nsession_timeout = \"30m\"\nmax_commands_before_mail = 1000000",
        "max_failed_rcpt = 1000",
        "",
    )
}

struct Rig {
    source: PathBuf,
    sink: Sink,
    sink_proxy: TestProxy,
    postfix: Option<Postfix>,
    postfix_pp: Option<Postfix>,
    postfix_proxy: Option<TestProxy>,
    /// Messages sent to each Postfix (direct, proxied), checked at the end.
    postfix_sent: [u64; 2],
}

impl Rig {
    fn addr(&self, backend: Backend, path: Path) -> SocketAddr {
        match (backend, path) {
            (Backend::Sink, Path::Direct) => self.sink.addr,
            (Backend::Sink, Path::Proxy) => self.sink_proxy.addr,
            (Backend::Postfix, Path::Direct) => self.postfix.as_ref().expect("postfix").addr(),
            (Backend::Postfix, Path::Proxy) => self.postfix_proxy.as_ref().expect("proxy").addr,
        }
    }

    fn proxy(&self, backend: Backend) -> &TestProxy {
        match backend {
            Backend::Sink => &self.sink_proxy,
            Backend::Postfix => self.postfix_proxy.as_ref().expect("proxy"),
        }
    }

    fn postfix(&self, path: Path) -> &Postfix {
        match path {
            Path::Direct => self.postfix.as_ref().expect("postfix"),
            Path::Proxy => self.postfix_pp.as_ref().expect("postfix"),
        }
    }

    /// One throughput measurement; returns messages per second.
    fn send(&mut self, backend: Backend, path: Path, messages: u64, sessions: u32) -> Result<f64> {
        if backend == Backend::Postfix {
            let postfix = self.postfix(path);
            ensure!(
                postfix.wait_queue_empty(DRAIN_TIMEOUT),
                "{} ({}): queue not empty after {DRAIN_TIMEOUT:?} ({} queued)",
                backend.name(),
                path.name(),
                postfix.queued()
            );
        }
        let before = (path == Path::Proxy).then(|| {
            self.proxy(backend)
                .ctx
                .stats
                .messages
                .load(Ordering::Relaxed)
        });
        let elapsed = smtp_source(&self.source, self.addr(backend, path), messages, sessions)
            .with_context(|| format!("{} {}", backend.name(), path.name()))?;
        if let Some(before) = before {
            let after = self
                .proxy(backend)
                .ctx
                .stats
                .messages
                .load(Ordering::Relaxed);
            ensure!(
                after - before == messages,
                "the proxy to {} relayed {} messages, not {messages}",
                backend.name(),
                after - before
            );
        }
        if backend == Backend::Postfix {
            self.postfix_sent[path as usize] += messages;
        }
        Ok(messages as f64 / elapsed.as_secs_f64())
    }
}

/// Direct first in even rounds, the proxy first in odd ones.
fn order(round: usize) -> [Path; 2] {
    if round.is_multiple_of(2) {
        [Path::Direct, Path::Proxy]
    } else {
        [Path::Proxy, Path::Direct]
    }
}

// -- Statistics --------------------------------------------------------------

// -- Throughput --------------------------------------------------------------

type Key = (Backend, u32, Path);

struct Throughput {
    /// Messages for the next measurement of each setup.
    counts: BTreeMap<Key, u64>,
    rates: BTreeMap<Key, Vec<f64>>,
    /// How long each measurement took.
    seconds: BTreeMap<Key, Vec<f64>>,
}

/// The message count that takes `seconds` at `rate`, moving at most by a
/// factor of 2 from `previous` (one noisy run must not make the next one
/// tiny or huge).
fn next_count(rate: f64, seconds: f64, previous: Option<u64>) -> u64 {
    let mut n = (rate * seconds).round().max(1.0) as u64;
    if let Some(previous) = previous {
        n = n.clamp(previous / 2, previous * 2);
    }
    n.clamp(MIN_MESSAGES, MAX_MESSAGES)
}

/// One run of every setup, unrecorded: warms up the paths and sets the
/// first message counts (each path gets its own, so that every
/// measurement lasts about `--seconds`; they follow the measured rates
/// from then on).
fn calibrate(rig: &mut Rig, opts: &Options, backends: &[Backend]) -> Result<BTreeMap<Key, u64>> {
    let mut counts = BTreeMap::new();
    for &backend in backends {
        for sessions in SESSIONS {
            let probe = match (backend, sessions) {
                (Backend::Sink, 1) => 1_000,
                (Backend::Sink, _) => 3_000,
                (Backend::Postfix, 1) => 300,
                (Backend::Postfix, _) => 500,
            };
            let probe = if opts.quick { probe / 2 } else { probe };
            let mut line = format!("calibration: {} -s {sessions}:", backend.name());
            for path in [Path::Direct, Path::Proxy] {
                let rate = rig.send(backend, path, probe, sessions)?;
                let n = next_count(rate, opts.seconds, None);
                let _ = write!(line, " {} {rate:.0} msg/s -> {n} messages;", path.name());
                counts.insert((backend, sessions, path), n);
            }
            eprintln!("{line}");
        }
    }
    Ok(counts)
}

fn throughput_round(
    rig: &mut Rig,
    tp: &mut Throughput,
    opts: &Options,
    round: usize,
    backends: &[Backend],
) -> Result<()> {
    let paths = order(round);
    for sessions in SESSIONS {
        for &backend in backends {
            let mut line = format!("round {}: {} -s {sessions}:", round + 1, backend.name());
            for path in paths {
                let key = (backend, sessions, path);
                let n = tp.counts[&key];
                let rate = rig.send(backend, path, n, sessions)?;
                let secs = n as f64 / rate;
                let _ = write!(line, " {} {rate:.0}/s ({n} in {secs:.1} s)", path.name());
                tp.rates.entry(key).or_default().push(rate);
                tp.seconds.entry(key).or_default().push(secs);
                tp.counts
                    .insert(key, next_count(rate, opts.seconds, Some(n)));
            }
            eprintln!("{line}");
        }
    }
    Ok(())
}

fn throughput_report(tp: &Throughput, backends: &[Backend], out: &mut String) -> Vec<String> {
    let mut verdicts = Vec::new();
    let _ = writeln!(
        out,
        "| backend | sessions | s per run, direct / proxy (median) | direct msg/s (median) | direct min–max | proxy msg/s (median) | proxy min–max | proxy/direct (medians) | proxy/direct (median of rounds) | per-round ratios min–max | target |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    for &backend in backends {
        for sessions in SESSIONS {
            let direct = &tp.rates[&(backend, sessions, Path::Direct)];
            let proxy = &tp.rates[&(backend, sessions, Path::Proxy)];
            let secs_direct = median(&tp.seconds[&(backend, sessions, Path::Direct)]);
            let secs_proxy = median(&tp.seconds[&(backend, sessions, Path::Proxy)]);
            let ratios: Vec<f64> = direct.iter().zip(proxy).map(|(d, p)| p / d).collect();
            let (dlo, dhi) = min_max(direct);
            let (plo, phi) = min_max(proxy);
            let (rlo, rhi) = min_max(&ratios);
            let of_medians = median(proxy) / median(direct);
            let of_rounds = median(&ratios);
            let target = match backend {
                Backend::Sink => SINK_TARGET,
                Backend::Postfix => POSTFIX_TARGET,
            };
            let met = if of_rounds >= target { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "| {} | {sessions} | {secs_direct:.1} / {secs_proxy:.1} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.2}–{:.2} | ≥ {target} : {met} |",
                backend.name(),
                median(direct),
                dlo,
                dhi,
                median(proxy),
                plo,
                phi,
                of_medians,
                of_rounds,
                rlo,
                rhi,
            );
            verdicts.push(format!(
                "throughput {} -s {sessions}: proxy/direct {of_rounds:.2} (median of rounds; {of_medians:.2} of medians), target ≥ {target}: {met}",
                backend.name()
            ));
        }
    }
    verdicts
}

// -- Latency -----------------------------------------------------------------

/// `count` NOOPs one at a time on a fresh session to `addr`; the round trip
/// of each, in microseconds, sorted.
fn noop_latency(addr: SocketAddr, count: usize) -> Result<Vec<f64>> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    read_reply(&mut reader, &mut line)?;
    ensure!(line.starts_with("220"), "greeting {line:?}");
    writer.write_all(format!("HELO {CLIENT_NAME}\r\n").as_bytes())?;
    read_reply(&mut reader, &mut line)?;
    ensure!(line.starts_with("250"), "HELO answered {line:?}");
    let warmup = (count / 10).clamp(10, 200);
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let start = Instant::now();
        writer.write_all(b"NOOP\r\n")?;
        read_reply(&mut reader, &mut line)?;
        let rtt = start.elapsed();
        ensure!(line.starts_with("250"), "NOOP answered {line:?}");
        if i >= warmup {
            samples.push(rtt.as_secs_f64() * 1e6);
        }
    }
    writer.write_all(b"QUIT\r\n")?;
    let _ = read_reply(&mut reader, &mut line);
    samples.sort_by(f64::total_cmp);
    Ok(samples)
}

/// The steps of one mail session, timed by [`session_steps`].
const STEPS: [&str; 8] = [
    "connect + greeting",
    "HELO",
    "MAIL FROM",
    "RCPT TO",
    "DATA (354)",
    "body + . (250)",
    "QUIT (221)",
    "close seen (EOF)",
];

/// `sessions` whole mail sessions one after the other to `addr`, each step
/// timed (µs): the same dialogue smtp-source has, seen from the client.
fn session_steps(addr: SocketAddr, sessions: usize) -> Result<Vec<Vec<f64>>> {
    let mut times = vec![Vec::with_capacity(sessions); STEPS.len()];
    let body =
        format!("From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\n\r\nhello\r\n.\r\n");
    let commands = [
        format!("HELO {CLIENT_NAME}\r\n"),
        format!("MAIL FROM:<{SENDER}>\r\n"),
        format!("RCPT TO:<{RECIPIENT}>\r\n"),
        "DATA\r\n".to_owned(),
        body,
        "QUIT\r\n".to_owned(),
    ];
    let expect = ["250", "250", "250", "354", "250", "221"];
    for _ in 0..sessions {
        let start = Instant::now();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        read_reply(&mut reader, &mut line)?;
        ensure!(line.starts_with("220"), "greeting {line:?}");
        times[0].push(start.elapsed().as_secs_f64() * 1e6);
        for (i, (command, code)) in commands.iter().zip(expect).enumerate() {
            let start = Instant::now();
            writer.write_all(command.as_bytes())?;
            read_reply(&mut reader, &mut line)?;
            ensure!(line.starts_with(code), "{command:?} answered {line:?}");
            times[i + 1].push(start.elapsed().as_secs_f64() * 1e6);
        }
        let start = Instant::now();
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
        times[STEPS.len() - 1].push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(times)
}

/// One whole reply into `line` (its last line).
fn read_reply(reader: &mut BufReader<TcpStream>, line: &mut String) -> Result<()> {
    loop {
        line.clear();
        ensure!(reader.read_line(line)? > 0, "connection closed");
        if line.len() < 4 || line.as_bytes()[3] == b' ' {
            return Ok(());
        }
    }
}

#[derive(Default)]
struct Latency {
    /// Per round: (p50, p99) in µs, per path.
    rounds: BTreeMap<Path, Vec<(f64, f64)>>,
    /// Every sample, per path.
    all: BTreeMap<Path, Vec<f64>>,
    /// Per path and step: the median of each round.
    steps: BTreeMap<(Path, usize), Vec<f64>>,
}

fn latency_round(
    rig: &Rig,
    lat: &mut Latency,
    round: usize,
    count: usize,
    sessions: usize,
) -> Result<()> {
    let paths = order(round);
    let mut line = format!("round {}: NOOP round trip ({count}):", round + 1);
    for path in paths {
        let samples = noop_latency(rig.addr(Backend::Sink, path), count)
            .with_context(|| format!("NOOP latency, {}", path.name()))?;
        let (p50, p99) = (quantile(&samples, 0.5), quantile(&samples, 0.99));
        let _ = write!(line, " {} p50 {p50:.1} µs p99 {p99:.1} µs;", path.name());
        lat.rounds.entry(path).or_default().push((p50, p99));
        lat.all.entry(path).or_default().extend(samples);
        let steps = session_steps(rig.addr(Backend::Sink, path), sessions)
            .with_context(|| format!("session steps, {}", path.name()))?;
        let total: f64 = steps.iter().map(|t| median(t)).sum();
        let _ = write!(line, " session {total:.0} µs;");
        for (i, times) in steps.iter().enumerate() {
            lat.steps.entry((path, i)).or_default().push(median(times));
        }
    }
    eprintln!("{line}");
    Ok(())
}

/// The session steps against Postfix, direct and through the proxy: where
/// a message's time goes with a real MTA behind.
fn postfix_steps(rig: &mut Rig, lat: &mut Latency, round: usize, sessions: usize) -> Result<()> {
    let mut line = format!("round {}: session steps with Postfix:", round + 1);
    for path in order(round) {
        let steps = session_steps(rig.addr(Backend::Postfix, path), sessions)
            .with_context(|| format!("session steps, Postfix {}", path.name()))?;
        rig.postfix_sent[path as usize] += sessions as u64;
        let total: f64 = steps.iter().map(|t| median(t)).sum();
        let _ = write!(line, " {} {total:.0} µs;", path.name());
        for (i, times) in steps.iter().enumerate() {
            lat.steps.entry((path, i)).or_default().push(median(times));
        }
    }
    eprintln!("{line}");
    Ok(())
}

fn latency_report(lat: &Latency, out: &mut String) {
    let _ = writeln!(
        out,
        "| path | p50 µs (median of rounds) | p50 min–max | p99 µs (median of rounds) | p99 min–max | p50 / p99 of all samples |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    let mut med = BTreeMap::new();
    for path in [Path::Direct, Path::Proxy] {
        let rounds = &lat.rounds[&path];
        let p50: Vec<f64> = rounds.iter().map(|r| r.0).collect();
        let p99: Vec<f64> = rounds.iter().map(|r| r.1).collect();
        let mut all = lat.all[&path].clone();
        all.sort_by(f64::total_cmp);
        let (a, b) = min_max(&p50);
        let (c, d) = min_max(&p99);
        let _ = writeln!(
            out,
            "| {} | {:.1} | {a:.1}–{b:.1} | {:.1} | {c:.1}–{d:.1} | {:.1} / {:.1} |",
            match path {
                Path::Direct => "direct to smtp-sink",
                Path::Proxy => "through the proxy",
            },
            median(&p50),
            median(&p99),
            quantile(&all, 0.5),
            quantile(&all, 0.99),
        );
        med.insert(path, (median(&p50), median(&p99)));
    }
    let d = med[&Path::Direct];
    let p = med[&Path::Proxy];
    // Same-round differences, too.
    let diffs50: Vec<f64> = lat.rounds[&Path::Direct]
        .iter()
        .zip(&lat.rounds[&Path::Proxy])
        .map(|(d, p)| p.0 - d.0)
        .collect();
    let diffs99: Vec<f64> = lat.rounds[&Path::Direct]
        .iter()
        .zip(&lat.rounds[&Path::Proxy])
        .map(|(d, p)| p.1 - d.1)
        .collect();
    let _ = writeln!(
        out,
        "| **added by the proxy** | **{:.1}** (same-round median {:.1}) | | **{:.1}** (same-round median {:.1}) | | |",
        p.0 - d.0,
        median(&diffs50),
        p.1 - d.1,
        median(&diffs99),
    );
}

fn steps_report(lat: &Latency, out: &mut String) {
    let _ = writeln!(out, "| step | direct µs | proxy µs | added µs |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    let (mut sum_d, mut sum_p) = (0.0, 0.0);
    for (i, step) in STEPS.iter().enumerate() {
        let d = median(&lat.steps[&(Path::Direct, i)]);
        let p = median(&lat.steps[&(Path::Proxy, i)]);
        sum_d += d;
        sum_p += p;
        let _ = writeln!(out, "| {step} | {d:.0} | {p:.0} | {:+.0} |", p - d);
    }
    let _ = writeln!(
        out,
        "| **whole session** | **{sum_d:.0}** | **{sum_p:.0}** | **{:+.0}** |",
        sum_p - sum_d
    );
}

// -- Memory ------------------------------------------------------------------

/// The kernel's TCP memory (`/proc/net/sockstat`, `TCP: … mem N`, pages),
/// in KiB.
fn tcp_mem_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            let pages: u64 = words.next()?.parse().ok()?;
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            return Some(pages * page.max(1) as u64 / 1024);
        }
    }
    None
}

/// Opens up to `count` sessions to `addr` and reads each greeting, in
/// batches. Stops early at the first failure and says why.
fn open_idle(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, Option<String>) {
    let deadline = Instant::now() + OPEN_TIMEOUT;
    let mut open = Vec::with_capacity(count);
    let mut buf = [0u8; 512];
    while open.len() < count {
        if Instant::now() > deadline {
            return (open, Some(format!("not all open within {OPEN_TIMEOUT:?}")));
        }
        let batch = OPEN_BATCH.min(count - open.len());
        let mut fresh = Vec::with_capacity(batch);
        for _ in 0..batch {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(s) => fresh.push(s),
                Err(e) => {
                    open.extend(fresh);
                    return (open, Some(format!("connect: {e}")));
                }
            }
        }
        for mut s in fresh {
            let greeted = s
                .set_read_timeout(Some(Duration::from_secs(20)))
                .and_then(|()| s.read(&mut buf));
            let why = match greeted {
                Ok(n) if n >= 4 && buf.starts_with(b"220") => {
                    open.push(s);
                    continue;
                }
                Ok(n) => format!(
                    "session {} greeted with {:?}",
                    open.len() + 1,
                    String::from_utf8_lossy(&buf[..n]).trim()
                ),
                Err(e) => format!("session {}: reading the greeting: {e}", open.len() + 1),
            };
            return (open, Some(why));
        }
    }
    (open, None)
}

struct MemoryResult {
    asked: usize,
    sessions: usize,
    shortfall: Option<String>,
    rss_before: u64,
    rss_open: u64,
    rss_closed: u64,
    client_rss_open: u64,
    sink_rss_open: u64,
    tcp_before: Option<u64>,
    tcp_open: Option<u64>,
    open_secs: f64,
    nofile: u64,
    fd_limited: bool,
}

fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

/// Descriptors this process has open right now.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The client ends of the idle sessions live in a child process (this
/// program again, with `--hold-clients`): this process then holds only
/// what the proxy holds (two descriptors per session) and its resident set
/// is the proxy's alone, plus the benchmark's fixed overhead.
struct Holder {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Holder {
    fn start(addr: SocketAddr, count: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("current_exe")?;
        let mut cmd = Command::new(exe);
        cmd.args(["--hold-clients", &addr.to_string(), &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        die_with_parent(&mut cmd, None);
        let mut child = cmd.spawn().context("cannot start the client holder")?;
        let stdout = child.stdout.take().context("holder stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Self { child, lines })
    }

    /// Waits for the holder's report: how many sessions it holds, and why
    /// not all if it could not.
    fn opened(&self) -> Result<(usize, Option<String>)> {
        let line = self
            .lines
            .recv_timeout(OPEN_TIMEOUT + Duration::from_secs(30))
            .context("the client holder did not report")?;
        let (count, why) = line.split_once('\t').unwrap_or((&line, ""));
        let count = count
            .strip_prefix("open ")
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("the client holder said {line:?}"))?;
        Ok((count, (!why.is_empty()).then(|| why.to_owned())))
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Closes its stdin: it closes every session and exits.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `--hold-clients ADDR N`: opens N sessions to ADDR, says `open K` (and a
/// tab and the reason if K < N), then keeps them until stdin closes.
fn hold_clients(addr: &str, count: &str) -> Result<()> {
    let addr: SocketAddr = addr.parse().context("--hold-clients: address")?;
    let count: usize = count.parse().context("--hold-clients: count")?;
    let (open, why) = open_idle(addr, count);
    let mut stdout = std::io::stdout().lock();
    match why {
        Some(why) => writeln!(stdout, "open {}\t{why}", open.len())?,
        None => writeln!(stdout, "open {}", open.len())?,
    }
    stdout.flush()?;
    drop(stdout);
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(open);
    Ok(())
}

fn memory(sink: &Sink, asked: usize, nofile: u64) -> Result<MemoryResult> {
    // A fresh proxy, warmed up with a few sessions (runtime, timers).
    let proxy = TestProxy::start(&proxy_config(sink.addr, "none"));
    let (warm, _) = open_idle(proxy.addr, 20);
    drop(warm);
    wait_sessions(&proxy, 0, CLOSE_TIMEOUT);
    // Two descriptors per session here (accepted socket, backend socket),
    // with some room for what the runtime opens.
    let fit = (nofile as usize).saturating_sub(open_fds() + 16) / 2;
    let idle = asked.min(fit);
    if idle < asked {
        eprintln!(
            "memory: RLIMIT_NOFILE {nofile} leaves room for {fit} sessions (2 descriptors each in this process), not {asked}"
        );
    }
    settle();
    let rss_before = rss_kib("self")?;
    let tcp_before = tcp_mem_kib();
    let started = Instant::now();
    let holder = Holder::start(proxy.addr, idle)?;
    let (sessions, shortfall) = holder.opened()?;
    let open_secs = started.elapsed().as_secs_f64();
    ensure!(
        sessions > 0,
        "no idle session could be opened: {shortfall:?}"
    );
    let live = wait_sessions(&proxy, sessions as u64, Duration::from_secs(10));
    ensure!(
        live == sessions as u64,
        "the proxy counts {live} open sessions, {sessions} were opened"
    );
    settle();
    let rss_open = rss_kib("self")?;
    let tcp_open = tcp_mem_kib();
    let sink_rss_open = rss_kib(&sink.pid().to_string()).unwrap_or(0);
    let client_rss_open = rss_kib(&holder.pid().to_string()).unwrap_or(0);
    eprintln!(
        "memory: {sessions} sessions through the proxy in {open_secs:.1} s: RSS {rss_before} -> {rss_open} KiB"
    );
    holder.finish();
    let left = wait_sessions(&proxy, 0, CLOSE_TIMEOUT);
    settle();
    let rss_closed = rss_kib("self")?;
    eprintln!("memory: closed ({left} sessions left): RSS {rss_closed} KiB");
    drop(proxy);
    Ok(MemoryResult {
        asked,
        sessions,
        shortfall,
        rss_before,
        rss_open,
        rss_closed,
        client_rss_open,
        sink_rss_open,
        tcp_before,
        tcp_open,
        open_secs,
        nofile,
        fd_limited: idle < asked,
    })
}

/// Waits (bounded) until the proxy counts `n` open sessions; the count last
/// seen.
fn wait_sessions(proxy: &TestProxy, n: u64, limit: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    loop {
        let open = proxy.ctx.stats.sessions_open.load(Ordering::Relaxed);
        if open == n || Instant::now() > deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn memory_report(m: &MemoryResult, out: &mut String) -> String {
    let n = m.sessions as f64;
    let per = (m.rss_open as f64 - m.rss_before as f64) / n;
    let _ = writeln!(out, "| quantity | value |");
    let _ = writeln!(out, "|---|---:|");
    let _ = writeln!(
        out,
        "| idle sessions open through the proxy (asked for) | {} ({}) |",
        m.sessions, m.asked
    );
    if m.fd_limited {
        let _ = writeln!(
            out,
            "| why fewer | RLIMIT_NOFILE {} (hard limit, no CAP_SYS_RESOURCE to raise it); the proxy holds 2 descriptors per session |",
            m.nofile
        );
    }
    if let Some(why) = &m.shortfall {
        let _ = writeln!(out, "| shortfall while opening | {why} |");
    }
    let _ = writeln!(
        out,
        "| time to open them (greeting read) | {:.1} s |",
        m.open_secs
    );
    let _ = writeln!(
        out,
        "| proxy process VmRSS before / open / after close | {} / {} / {} KiB |",
        m.rss_before, m.rss_open, m.rss_closed
    );
    let _ = writeln!(out, "| **proxy RSS per idle session** | **{per:.1} KiB** |");
    if let (Some(a), Some(b)) = (m.tcp_before, m.tcp_open) {
        let _ = writeln!(
            out,
            "| kernel TCP buffer memory, whole machine (sockstat `mem`; not in RSS) | {a} -> {b} KiB |"
        );
    }
    let _ = writeln!(
        out,
        "| client holder process / smtp-sink VmRSS with them open | {} / {} KiB |",
        m.client_rss_open, m.sink_rss_open
    );
    let met = if per <= MEMORY_TARGET_KIB {
        "met"
    } else {
        "MISSED"
    };
    let mut verdict = format!(
        "memory: {per:.1} KiB RSS per idle session with {} sessions, target ≤ {MEMORY_TARGET_KIB} KiB: {met}",
        m.sessions
    );
    if m.sessions < m.asked {
        let _ = write!(verdict, " ({} asked for", m.asked);
        if m.fd_limited {
            let _ = write!(verdict, "; RLIMIT_NOFILE {} caps this process", m.nofile);
        }
        if let Some(why) = &m.shortfall {
            let _ = write!(verdict, "; {why}");
        }
        verdict.push(')');
    }
    verdict
}

// -- Main --------------------------------------------------------------------

fn postfix_version() -> String {
    postfix_tool("postconf")
        .ok()
        .and_then(|p| {
            Command::new(p)
                .args(["-d", "-h", "mail_version"])
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "?".into())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--hold-clients" {
        return hold_clients(&args[2], &args[3]);
    }
    let opts = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "proxy-bench needs root (Postfix fixture)"
    );
    // The proxy holds two descriptors per idle session (the clients live in
    // a child process): ask for room for them all.
    let nofile = raise_nofile((opts.idle as u64) * 2 + 1_000)?;
    let idle = if opts.memory { opts.idle } else { 0 };
    if let Some(secs) = opts.serve {
        let sink = Sink::start(idle.max(256) + 200)?;
        let proxy = TestProxy::start(&proxy_config(sink.addr, "none"));
        let postfix = Postfix::start(PostfixOptions::for_load(true)).context("Postfix")?;
        let postfix_proxy = TestProxy::start(&proxy_config(postfix.addr(), "proxy-v2"));
        println!(
            "pid {}: smtp-sink {} (pid {}), proxy {}; Postfix (PROXY protocol) {}, proxy {}; serving for {secs} s",
            std::process::id(),
            sink.addr,
            sink.pid(),
            proxy.addr,
            postfix.addr(),
            postfix_proxy.addr
        );
        std::thread::sleep(Duration::from_secs(secs));
        return Ok(());
    }
    let started = Instant::now();
    let mut out = String::new();
    let _ = writeln!(out, "## proxy-bench results\n");
    let _ = writeln!(out, "Machine at start: {}", machine());
    let _ = writeln!(out, "Postfix {}; options: {opts:?}\n", postfix_version());
    eprintln!("{}", out.trim_end());

    let sink = Sink::start(idle.max(256) + 200)?;
    let sink_proxy = TestProxy::start(&proxy_config(sink.addr, "none"));
    let (postfix, postfix_pp, postfix_proxy) = if opts.throughput {
        let direct = Postfix::start(PostfixOptions::for_load(false)).context("Postfix (direct)")?;
        let pp =
            Postfix::start(PostfixOptions::for_load(true)).context("Postfix (PROXY protocol)")?;
        let proxy = TestProxy::start(&proxy_config(pp.addr(), "proxy-v2"));
        (Some(direct), Some(pp), Some(proxy))
    } else {
        (None, None, None)
    };
    let mut rig = Rig {
        source: postfix_tool("smtp-source")?,
        sink,
        sink_proxy,
        postfix,
        postfix_pp,
        postfix_proxy,
        postfix_sent: [0, 0],
    };
    let backends = [Backend::Sink, Backend::Postfix];
    let mut tp = Throughput {
        counts: BTreeMap::new(),
        rates: BTreeMap::new(),
        seconds: BTreeMap::new(),
    };
    if opts.throughput {
        tp.counts = calibrate(&mut rig, &opts, &backends)?;
    }
    let mut lat = Latency::default();
    let mut postfix_lat = Latency::default();
    for round in 0..opts.rounds {
        if opts.throughput {
            throughput_round(&mut rig, &mut tp, &opts, round, &backends)?;
            postfix_steps(&mut rig, &mut postfix_lat, round, opts.step_sessions)?;
        }
        if opts.latency {
            latency_round(&rig, &mut lat, round, opts.commands, opts.step_sessions)?;
        }
    }
    let mut verdicts = Vec::new();
    if opts.throughput {
        for (i, path) in [Path::Direct, Path::Proxy].into_iter().enumerate() {
            let postfix = rig.postfix(path);
            let sent = rig.postfix_sent[i];
            ensure!(
                postfix.wait_delivered(sent as usize, DRAIN_TIMEOUT),
                "Postfix ({}) delivered {} of {sent}",
                path.name(),
                postfix.delivered()
            );
            // Exactly: once the queue is empty every delivery is logged,
            // and none may be there twice.
            ensure!(
                postfix.wait_queue_empty(DRAIN_TIMEOUT),
                "Postfix ({}): the queue did not empty ({} left)",
                path.name(),
                postfix.queued()
            );
            ensure!(
                postfix.delivered() == sent as usize,
                "Postfix ({}) delivered {} messages, {sent} were sent",
                path.name(),
                postfix.delivered()
            );
            eprintln!(
                "Postfix ({}): {sent} messages sent, {} delivered",
                path.name(),
                postfix.delivered()
            );
        }
        let _ = writeln!(
            out,
            "### Throughput (smtp-source, new session per message)\n"
        );
        verdicts.extend(throughput_report(&tp, &backends, &mut out));
        let _ = writeln!(
            out,
            "\n### Session steps with Postfix, {} sessions per round (median of rounds)\n",
            opts.step_sessions
        );
        steps_report(&postfix_lat, &mut out);
        let _ = writeln!(out);
        // The Postfix instances are not needed any more.
        rig.postfix_proxy = None;
        rig.postfix = None;
        rig.postfix_pp = None;
    }
    if opts.latency {
        let _ = writeln!(
            out,
            "### NOOP round trip to smtp-sink, {} commands per round, {} rounds\n",
            opts.commands, opts.rounds
        );
        latency_report(&lat, &mut out);
        let _ = writeln!(
            out,
            "\n### One mail session to smtp-sink step by step, {} sessions per round (medians of per-round medians, µs)\n",
            opts.step_sessions
        );
        steps_report(&lat, &mut out);
        let _ = writeln!(out);
    }
    if opts.memory {
        let m = memory(&rig.sink, idle, nofile)?;
        let _ = writeln!(
            out,
            "### Resident memory with idle sessions through the proxy\n"
        );
        verdicts.push(memory_report(&m, &mut out));
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "### Targets\n");
    for v in &verdicts {
        let _ = writeln!(out, "- {v}");
    }
    let _ = writeln!(out, "\nMachine at end: {}", machine());
    let _ = writeln!(out, "Total time: {:.0} s", started.elapsed().as_secs_f64());
    println!("{out}");
    Ok(())
}
