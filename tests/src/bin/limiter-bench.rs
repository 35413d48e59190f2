//! `limiter-bench`: the kernel's per-packet cost of the limiter's XDP
//! program, measured with `BPF_PROG_TEST_RUN` against an empty XDP program
//! measured in the same rounds.
//!
//! Run it with `cargo xtask bench [-- ARGS]` (builds the eBPF objects first),
//! as root. No packet leaves the machine: every figure comes from test runs.
//!
//! Method: for each blocklist size ("scale") the real programs are loaded
//! with a private pin path (removed at the end) and the maps filled; the
//! baseline object (`baseline_pass`) is loaded next to them. All scales stay
//! loaded so that the rounds interleave them. In each round every scale runs
//! the empty program, every case (in an order rotated from round to round),
//! then the empty program again, each with the same `repeat`; the kernel
//! reports its mean time per run. Per case the median over rounds is
//! reported, with the range, the ratio of medians to the empty program's,
//! and the median of the per-round ratios (each round's case over that
//! round's mean of its two empty runs). Every run's verdict is checked, and
//! before measuring, one run of each case must move exactly the decision
//! counter it is meant to. `kernel.bpf_stats_enabled` must stay 0 (checked
//! before every round): it adds clock reads to every run.
//!
//! Every case runs once with an IPv4 source and once with an IPv6 one (ids
//! ending in `-v6`); both families' tables hold the same number of entries.

use limiter_tests::stats::{group, median, min_max};
use std::{
    collections::HashSet,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use limiter_common::{Reason, Stats};
use limiter_tests::{
    kernel::{baseline_object, ebpf_object, object_path, Baseline, TestKernel},
    packets::{Frame, ACK, SYN},
};
use limiter_user::kernel::{Datapath, KernelLimits, MapSizes};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const BASELINE_PROGRAM: &str = "baseline_pass";

/// Targets, as ratios to the empty program and as a relative change.
const DROP_TARGET: f64 = 2.5;
const PASS_TARGET: f64 = 3.5;
const FLAT_TARGET: f64 = 0.15;

/// Blocklist sizes at and above this get `LARGE_BLOCK_MAP` entries and
/// `LARGE_NETS` networks in `BLOCK_NET`.
const LARGE_SCALE: u32 = 100_000;
const LARGE_BLOCK_MAP: u32 = 1_100_000;
const LARGE_NETS: usize = 1_000;

/// The protected port the frames go to.
const SMTP: u16 = 25;
/// Test sources (documentation ranges, outside the filler ranges).
const BLOCKED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const BLOCKED_EXPIRING: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const BLOCKED_NET: &str = "198.51.100.0/24";
const IN_BLOCKED_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const AT_CAP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const BELOW_CAP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const NO_CONNECTIONS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
/// An unblocked source in the /16 of the blocked network (and, at the large
/// scales, of `neighbour_nets`).
const NEAR_BLOCKED_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 101, 77);
/// Connections the pass source holds (the cap is the default, 10).
const BELOW_CAP_CONNECTIONS: u32 = 3;
/// Filler addresses for `BLOCK_V4` start here (10.0.0.0/8 holds 16 M).
const FILLER_BASE: u32 = u32::from_be_bytes([10, 0, 0, 0]);
/// The IPv6 test sources: the blocked ones in 2001:db8::/32, the others in
/// 3fff::/20 (both documentation ranges), so that, as for IPv4, the sources
/// that pass are in another /16 than the blocked network.
const BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const BLOCKED_EXPIRING_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const BLOCKED_NET_V6: &str = "2001:db8:bad::/48";
const IN_BLOCKED_NET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 0x77);
const AT_CAP_V6: Ipv6Addr = Ipv6Addr::new(0x3fff, 0, 0, 0x10, 0, 0, 0, 1);
const BELOW_CAP_V6: Ipv6Addr = Ipv6Addr::new(0x3fff, 0, 0, 0x20, 0, 0, 0, 1);
const NO_CONNECTIONS_V6: Ipv6Addr = Ipv6Addr::new(0x3fff, 0, 0, 0x30, 0, 0, 0, 1);
const NEAR_BLOCKED_NET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbeef, 0, 0, 0, 0, 0x77);
/// Filler addresses for `BLOCK_V6` start here (fd00::/8, unique local).
const FILLER_BASE_V6: u128 = 0xfd00_0000_0000_0000_0000_0000_0000_0000;

// ---------------------------------------------------------------------------
// Options

struct Options {
    rounds: usize,
    repeat: u32,
    scales: Vec<u32>,
    cpu: Option<usize>,
    /// Only these case ids (all when empty).
    only: Vec<String>,
    /// Networks in BLOCK_NET at every scale (default: 1 below
    /// `LARGE_SCALE`, `LARGE_NETS` from it on).
    nets: Option<usize>,
}

const USAGE: &str = "\
limiter-bench: per-packet cost of the limiter's XDP program (BPF_PROG_TEST_RUN)

usage: cargo xtask bench [-- OPTIONS]
       cargo run --release -p limiter-tests --bin limiter-bench -- [OPTIONS]

options:
  --rounds N       rounds per scale (default 7)
  --repeat N       runs per measurement, inside the kernel (default 1000000)
  --scales LIST    blocklist sizes, comma-separated (default 1,100000,1000000)
  --cpu N          pin the benchmark thread to CPU N (default: not pinned)
  --nets N         networks in BLOCK_NET_V4 and in BLOCK_NET_V6 at every scale (default: 1 below
                   100000 addresses, 1000 from there on)
  --cases LIST     only these cases, comma-separated ids (drop-block, …,
                   drop-block-v6, …; e.g. for profiling
                   one path with `perf record`); the empty program always runs
  --quick          smoke run: 3 rounds, repeat 100000, scales 1,100000
                   (explicit options still win)
  -h, --help       this text

Needs root and the eBPF objects (`cargo xtask build-ebpf`). Sends no traffic.";

fn parse_options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut options = if quick {
        Options {
            rounds: 3,
            repeat: 100_000,
            scales: vec![1, 100_000],
            cpu: None,
            only: Vec::new(),
            nets: None,
        }
    } else {
        Options {
            rounds: 7,
            repeat: 1_000_000,
            scales: vec![1, 100_000, 1_000_000],
            cpu: None,
            only: Vec::new(),
            nets: None,
        }
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String> {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--quick" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--rounds" => {
                let v: usize = value(&name)?.parse().context("--rounds: not a number")?;
                ensure!(
                    (1..=1000).contains(&v),
                    "--rounds must be between 1 and 1000"
                );
                options.rounds = v;
            }
            "--repeat" => {
                let v: u32 = value(&name)?
                    .parse()
                    .context("--repeat: not a number (at most 4294967295)")?;
                ensure!(
                    (1..=100_000_000).contains(&v),
                    "--repeat must be between 1 and 100000000"
                );
                options.repeat = v;
            }
            "--scales" => {
                let list = value(&name)?;
                let mut scales = Vec::new();
                for s in list.split(',') {
                    let s: u32 = s
                        .trim()
                        .replace('_', "")
                        .parse()
                        .with_context(|| format!("--scales: {s:?} is not a number"))?;
                    ensure!(
                        (1..=LARGE_BLOCK_MAP - 1).contains(&s),
                        "--scales: each between 1 and {}",
                        LARGE_BLOCK_MAP - 1
                    );
                    scales.push(s);
                }
                scales.sort_unstable();
                scales.dedup();
                options.scales = scales;
            }
            "--cases" => {
                let known: Vec<&str> = cases().iter().map(|c| c.id).collect();
                for id in value(&name)?.split(',') {
                    let id = id.trim();
                    ensure!(
                        known.contains(&id),
                        "--cases: unknown case {id:?}; known: {}",
                        known.join(", ")
                    );
                    options.only.push(id.to_owned());
                }
            }
            "--nets" => {
                let v: usize = value(&name)?.parse().context("--nets: not a number")?;
                ensure!(
                    (1..=60_000).contains(&v),
                    "--nets must be between 1 and 60000"
                );
                options.nets = Some(v);
            }
            "--cpu" => {
                let v: usize = value(&name)?.parse().context("--cpu: not a number")?;
                options.cpu = Some(v);
            }
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(options)
}

// ---------------------------------------------------------------------------
// Cases

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Drop,
    Pass,
}

struct Case {
    id: &'static str,
    label: &'static str,
    kind: Kind,
    source: IpAddr,
    flags: u8,
    /// Drop events on (the default `events_per_second`) or off (0).
    events: bool,
    /// The decision counter one run must move.
    counter: fn(&Stats) -> u64,
    /// Part of the targets (the others are extra, for explanation).
    target: bool,
}

impl Case {
    fn expected(&self) -> u32 {
        match self.kind {
            Kind::Drop => XDP_DROP,
            Kind::Pass => XDP_PASS,
        }
    }

    fn frame(&self) -> Vec<u8> {
        Frame::syn(self.source, SMTP).flags(self.flags).build()
    }
}

/// The cases of one family: `v6` picks the IPv6 sources and suffixes the
/// ids with `-v6`.
fn family_cases(v6: bool) -> Vec<Case> {
    let pick = |v4: Ipv4Addr, v6_source: Ipv6Addr| {
        if v6 {
            IpAddr::V6(v6_source)
        } else {
            IpAddr::V4(v4)
        }
    };
    let mut cases = vec![
        Case {
            id: "drop-block",
            label: "drop: SYN from an address in BLOCK_V4 / BLOCK_V6",
            kind: Kind::Drop,
            source: pick(BLOCKED, BLOCKED_V6),
            flags: SYN,
            events: true,
            counter: |s| s.dropped_block,
            target: true,
        },
        Case {
            id: "drop-cidr",
            label: "drop: SYN from inside a BLOCK_NET_V4 /24 / BLOCK_NET_V6 /48",
            kind: Kind::Drop,
            source: pick(IN_BLOCKED_NET, IN_BLOCKED_NET_V6),
            flags: SYN,
            events: true,
            counter: |s| s.dropped_block_net,
            target: true,
        },
        Case {
            id: "drop-cap",
            label: "drop: SYN from a source at its cap",
            kind: Kind::Drop,
            source: pick(AT_CAP, AT_CAP_V6),
            flags: SYN,
            events: true,
            counter: |s| s.dropped_cap,
            target: true,
        },
        Case {
            id: "pass-syn",
            label: "pass: SYN, source holds 3 of 10 connections",
            kind: Kind::Pass,
            source: pick(BELOW_CAP, BELOW_CAP_V6),
            flags: SYN,
            events: true,
            counter: |s| s.passed,
            target: true,
        },
        Case {
            id: "pass-ack",
            label: "pass: ACK (established) from an unblocked source",
            kind: Kind::Pass,
            source: pick(BELOW_CAP, BELOW_CAP_V6),
            flags: ACK,
            events: true,
            counter: |s| s.passed,
            target: true,
        },
        Case {
            id: "drop-block-ev0",
            label: "extra: drop-block, events_per_second = 0",
            kind: Kind::Drop,
            source: pick(BLOCKED, BLOCKED_V6),
            flags: SYN,
            events: false,
            counter: |s| s.dropped_block,
            target: false,
        },
        Case {
            id: "drop-cidr-ev0",
            label: "extra: drop-cidr, events_per_second = 0",
            kind: Kind::Drop,
            source: pick(IN_BLOCKED_NET, IN_BLOCKED_NET_V6),
            flags: SYN,
            events: false,
            counter: |s| s.dropped_block_net,
            target: false,
        },
        Case {
            id: "drop-cap-ev0",
            label: "extra: drop-cap, events_per_second = 0",
            kind: Kind::Drop,
            source: pick(AT_CAP, AT_CAP_V6),
            flags: SYN,
            events: false,
            counter: |s| s.dropped_cap,
            target: false,
        },
        Case {
            id: "drop-block-exp",
            label: "extra: drop-block, entry with an expiry (2nd clock read)",
            kind: Kind::Drop,
            source: pick(BLOCKED_EXPIRING, BLOCKED_EXPIRING_V6),
            flags: SYN,
            events: true,
            counter: |s| s.dropped_block,
            target: false,
        },
        Case {
            id: "pass-ack-near",
            label: "extra: pass: ACK from an unblocked source in the /16 of blocked networks",
            kind: Kind::Pass,
            source: pick(NEAR_BLOCKED_NET, NEAR_BLOCKED_NET_V6),
            flags: ACK,
            events: true,
            counter: |s| s.passed,
            target: false,
        },
        Case {
            id: "pass-syn-new",
            label: "extra: pass: SYN, source holds no connection",
            kind: Kind::Pass,
            source: pick(NO_CONNECTIONS, NO_CONNECTIONS_V6),
            flags: SYN,
            events: true,
            counter: |s| s.passed,
            target: false,
        },
    ];
    if v6 {
        for case in &mut cases {
            case.id = leak(format!("{}-v6", case.id));
            case.label = leak(format!("{} (IPv6)", case.label));
        }
    }
    cases
}

fn cases() -> Vec<Case> {
    let mut cases = family_cases(false);
    cases.extend(family_cases(true));
    cases
}

/// A case id or label made at start, for the `&'static str` fields.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

// ---------------------------------------------------------------------------
// Measurement

/// One measurement: the kernel's mean ns per run, and this thread's CPU time
/// per run around the syscall (a cross-check with sub-ns resolution; the
/// kernel's figure is truncated to whole ns).
#[derive(Clone, Copy)]
struct Sample {
    kernel_ns: f64,
    cpu_ns: f64,
}

fn thread_cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

fn measure(
    what: &str,
    expected: u32,
    repeat: u32,
    run: impl FnOnce() -> Result<(u32, Duration)>,
) -> Result<Sample> {
    let before = thread_cpu_ns();
    let (action, duration) = run().with_context(|| format!("test run of {what}"))?;
    let cpu = thread_cpu_ns() - before;
    if action != expected {
        bail!(
            "WRONG VERDICT: {what} returned {} ({action}), expected {} ({expected}); the figures would measure the wrong path",
            action_name(action),
            action_name(expected)
        );
    }
    Ok(Sample {
        kernel_ns: duration.as_nanos() as f64,
        cpu_ns: cpu / f64::from(repeat),
    })
}

fn action_name(action: u32) -> &'static str {
    match action {
        0 => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

fn limits(events: bool) -> KernelLimits {
    let default = KernelLimits::default();
    KernelLimits {
        events_per_second: if events { default.events_per_second } else { 0 },
        ..default
    }
}

/// The loaded programs of one scale, with the event setting they hold now.
struct Bench {
    kernel: TestKernel,
    baseline: Baseline,
    events: bool,
}

impl Bench {
    fn run_baseline(&self, packet: &[u8], repeat: u32) -> Result<Sample> {
        measure(
            "the empty program (baseline_pass)",
            XDP_PASS,
            repeat,
            || self.baseline.run(packet, repeat),
        )
    }

    fn run_case(&mut self, case: &Case, packet: &[u8], repeat: u32) -> Result<Sample> {
        if self.events != case.events {
            self.kernel.datapath.set_limits(&limits(case.events))?;
            self.events = case.events;
        }
        let datapath = &self.kernel.datapath;
        measure(case.id, case.expected(), repeat, || {
            Ok(datapath.test_run_xdp(packet, repeat)?)
        })
    }
}

// ---------------------------------------------------------------------------
// Filling the maps

/// Sets the kernel's connection count for `source`, as the sock_ops
/// program would after `count` handshakes.
fn set_connections(kernel: &TestKernel, source: IpAddr, count: u32) -> Result<()> {
    Ok(kernel.datapath.set_connection_count(source, count)?)
}

/// Networks spread over the IPv4 space (prefixes /16, /20, /24, /28 in turn,
/// fixed pseudo-random placement), none covering a test source.
fn filler_nets(count: usize) -> Vec<IpNet> {
    let protected: [Ipv4Addr; 7] = [
        BLOCKED,
        BLOCKED_EXPIRING,
        IN_BLOCKED_NET,
        AT_CAP,
        BELOW_CAP,
        NO_CONNECTIONS,
        NEAR_BLOCKED_NET,
    ];
    let mut state: u64 = 0x5eed_1234_abcd_9876;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut seen = HashSet::new();
    let mut nets = Vec::with_capacity(count);
    let prefixes = [16u8, 20, 24, 28];
    while nets.len() < count {
        let prefix = prefixes[nets.len() % prefixes.len()];
        let addr = Ipv4Addr::from((next() >> 32) as u32);
        let Ok(net) = Ipv4Net::new(addr, prefix) else {
            continue;
        };
        let net = net.trunc();
        let first = net.network().octets()[0];
        // Unicast space outside 0/8, 10/8 (the BLOCK_V4 fillers), 127/8 and multicast.
        if first == 0 || first == 10 || first == 127 || first >= 224 {
            continue;
        }
        if protected.iter().any(|a| net.contains(a)) || !seen.insert(net) {
            continue;
        }
        nets.push(IpNet::V4(net));
    }
    nets
}

/// What one scale holds.
#[derive(Clone, Copy)]
struct Fill {
    addresses: u32,
    block_max: u32,
    nets: usize,
}

/// Fills both families alike: `scale` addresses in each block table (the
/// test entries included), `nets` networks in each network table.
fn fill(kernel: &TestKernel, scale: u32, nets: usize) -> Result<Duration> {
    let d = &kernel.datapath;
    let started = Instant::now();
    let host = |a: IpAddr| IpNet::from(a);
    let expiry = SystemTime::now() + Duration::from_secs(24 * 3600);
    d.block(host(IpAddr::V4(BLOCKED)), None, Reason::Manual)?;
    d.block(host(IpAddr::V6(BLOCKED_V6)), None, Reason::Manual)?;
    d.block(
        host(IpAddr::V4(BLOCKED_EXPIRING)),
        Some(expiry),
        Reason::Harvest,
    )?;
    d.block(
        host(IpAddr::V6(BLOCKED_EXPIRING_V6)),
        Some(expiry),
        Reason::Harvest,
    )?;
    d.block(BLOCKED_NET.parse()?, None, Reason::RejectList)?;
    d.block(BLOCKED_NET_V6.parse()?, None, Reason::RejectList)?;
    // The scale counts the two test entries (the blocked address and the one
    // with an expiry the extra case needs): scale 1 holds those two.
    let fillers = scale.saturating_sub(2);
    let step = (fillers / 10).max(1);
    for i in 0..fillers {
        let v4 = IpAddr::V4(Ipv4Addr::from(FILLER_BASE + 1 + i));
        let v6 = IpAddr::V6(Ipv6Addr::from(FILLER_BASE_V6 + 1 + u128::from(i)));
        for filler in [v4, v6] {
            d.block(host(filler), None, Reason::Manual)
                .with_context(|| format!("blocking filler address {filler} of {fillers}"))?;
        }
        if fillers >= 50_000 && (i + 1) % step == 0 {
            eprintln!(
                "  BLOCK_V4, BLOCK_V6: {} of {fillers} filler addresses each ({:.1} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let neighbours = (nets.saturating_sub(1) / 4).min(MAX_NEIGHBOURS);
    let fillers = nets.saturating_sub(1 + neighbours);
    for net in filler_nets(fillers)
        .into_iter()
        .chain(filler_nets_v6(fillers))
        .chain(neighbour_nets(neighbours))
    {
        d.block(net, None, Reason::RejectList)?;
    }
    let cap = KernelLimits::default().max_connections;
    set_connections(kernel, IpAddr::V4(AT_CAP), cap)?;
    set_connections(kernel, IpAddr::V6(AT_CAP_V6), cap)?;
    set_connections(kernel, IpAddr::V4(BELOW_CAP), BELOW_CAP_CONNECTIONS)?;
    set_connections(kernel, IpAddr::V6(BELOW_CAP_V6), BELOW_CAP_CONNECTIONS)?;
    Ok(started.elapsed())
}

/// Most networks `neighbour_nets` places in one /16.
const MAX_NEIGHBOURS: usize = 254;

/// `count` networks of each family in the /16 of the blocked network and of
/// `NEAR_BLOCKED_NET`, as the network rules block them: IPv4 /24s of
/// 198.51.0.0/16 and IPv6 sources' /64s of 2001:db8::/32 (neither covering
/// a test source), so that the near source's /16 holds many entries.
fn neighbour_nets(count: usize) -> Vec<IpNet> {
    let near = Ipv4Net::new(NEAR_BLOCKED_NET, 24).unwrap().trunc();
    let blocked: Ipv4Net = BLOCKED_NET.parse().unwrap();
    let v4 = (0..=255u8)
        .map(|third| Ipv4Net::new(Ipv4Addr::new(198, 51, third, 0), 24).unwrap())
        .filter(|net| *net != near && *net != blocked)
        .take(count)
        .map(IpNet::V4);
    let v6 = (1..=count as u16).map(|n| {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::new(0x2001, 0xdb8, n, 0, 0, 0, 0, 0), 64).unwrap())
    });
    v4.chain(v6).collect()
}

/// IPv6 networks spread over 2000::/3 (prefixes /32, /40, /48, /56 in
/// turn, fixed pseudo-random placement), none covering a test source and
/// none in the /16s of the test sources (so that, as for IPv4, only the
/// blocked network's /16 needs a trie lookup).
fn filler_nets_v6(count: usize) -> Vec<IpNet> {
    let mut state: u64 = 0x6e75_7473_6f75_7263;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let test_top16 = [0x2001u16, 0x3fff];
    let mut seen = HashSet::new();
    let mut nets = Vec::with_capacity(count);
    let prefixes = [32u8, 40, 48, 56];
    while nets.len() < count {
        let prefix = prefixes[nets.len() % prefixes.len()];
        // 2000::/3: the top three bits 001.
        let high = (next() >> 3) | (1u64 << 61);
        let addr = Ipv6Addr::from(u128::from(high) << 64);
        let Ok(net) = Ipv6Net::new(addr, prefix) else {
            continue;
        };
        let net = net.trunc();
        if test_top16.contains(&net.network().segments()[0]) || !seen.insert(net) {
            continue;
        }
        nets.push(IpNet::V6(net));
    }
    nets
}

// ---------------------------------------------------------------------------
// Statistics

struct Summary {
    median: f64,
    min: f64,
    max: f64,
    /// Median over the median of the empty program.
    ratio: f64,
    /// Median of per-round ratios.
    round_ratio: f64,
    cpu_median: f64,
    cpu_ratio: f64,
}

fn summarize(samples: &[Sample], round_baselines: &[Sample], baseline_all: &[Sample]) -> Summary {
    let kernel: Vec<f64> = samples.iter().map(|s| s.kernel_ns).collect();
    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_ns).collect();
    let base_median = median(&baseline_all.iter().map(|s| s.kernel_ns).collect::<Vec<_>>());
    let base_cpu_median = median(&baseline_all.iter().map(|s| s.cpu_ns).collect::<Vec<_>>());
    let per_round: Vec<f64> = samples
        .iter()
        .zip(round_baselines)
        .map(|(s, b)| s.kernel_ns / b.kernel_ns)
        .collect();
    let (min, max) = min_max(&kernel);
    let m = median(&kernel);
    let cm = median(&cpu);
    Summary {
        median: m,
        min,
        max,
        ratio: m / base_median,
        round_ratio: median(&per_round),
        cpu_median: cm,
        cpu_ratio: cm / base_cpu_median,
    }
}

struct ScaleResult {
    scale: u32,
    fill: Fill,
    baseline: Summary,
    cases: Vec<Summary>,
    /// Per case, per round.
    samples: Vec<Vec<Sample>>,
}

// ---------------------------------------------------------------------------
// Running one scale

fn check_bpf_stats() -> Result<()> {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let value = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    if value.trim() != "0" {
        bail!(
            "kernel.bpf_stats_enabled is {} (someone turned it on): it adds two clock reads to every run and \
             inflates every figure. Set it back with `sysctl -w kernel.bpf_stats_enabled=0` and run again.",
            value.trim()
        );
    }
    Ok(())
}

/// One scale, loaded, filled and checked.
struct Prepared {
    scale: u32,
    fill: Fill,
    bench: Bench,
}

fn prepare_scale(
    options: &Options,
    cases: &[Case],
    packets: &[Vec<u8>],
    scale: u32,
) -> Result<Prepared> {
    check_bpf_stats()?;
    let large = scale >= LARGE_SCALE;
    let sizes = if large {
        MapSizes {
            block: LARGE_BLOCK_MAP,
            ..MapSizes::default()
        }
    } else {
        MapSizes::default()
    };
    let nets = options.nets.unwrap_or(if large { LARGE_NETS } else { 1 });
    ensure!(
        scale <= sizes.block,
        "scale {scale} does not fit BLOCK_V4/_V6 ({} entries)",
        sizes.block
    );
    eprintln!(
        "scale {}: loading the programs (BLOCK_V4/_V6 max {} entries), filling BLOCK_V4 and BLOCK_V6 with {} addresses and BLOCK_NET_V4 and BLOCK_NET_V6 with {} nets each",
        group(scale),
        group(sizes.block),
        group(scale.max(2)),
        nets
    );
    let kernel = TestKernel::load_with(limits(true), sizes);
    let took = fill(&kernel, scale, nets)?;
    eprintln!("  filled in {:.1} s", took.as_secs_f64());
    let baseline = Baseline::load(BASELINE_PROGRAM)?;
    let mut bench = Bench {
        kernel,
        baseline,
        events: true,
    };

    // Each case must take the path it is named after: one run moves exactly
    // its decision counter.
    for (case, packet) in cases.iter().zip(packets) {
        let before = bench.kernel.datapath.counters()?;
        bench.run_case(case, packet, 1)?;
        let after = bench.kernel.datapath.counters()?;
        let moved = (case.counter)(&after).wrapping_sub((case.counter)(&before));
        let decided = [
            after.passed - before.passed,
            after.allowed - before.allowed,
            after.dropped_block - before.dropped_block,
            after.dropped_block_net - before.dropped_block_net,
            after.dropped_cap - before.dropped_cap,
            after.ignored - before.ignored,
            after.expired_block - before.expired_block,
        ];
        if moved != 1 || decided.iter().sum::<u64>() != 1 {
            bail!("WRONG PATH: {} ({}) did not move exactly its own counter once: before {before:?}, after {after:?}", case.id, case.label);
        }
    }
    Ok(Prepared {
        scale,
        fill: Fill {
            addresses: scale.max(2),
            block_max: sizes.block,
            nets,
        },
        bench,
    })
}

/// Runs the rounds over every scale: within a round each scale runs the
/// empty program, its cases (order rotated per round) and the empty program
/// again; the order of the scales rotates too, so that scales are compared
/// within rounds like cases are.
fn run_rounds(
    options: &Options,
    cases: &[Case],
    packets: &[Vec<u8>],
    prepared: &mut [Prepared],
) -> Result<Vec<ScaleResult>> {
    let baseline_packet = Frame::syn(IpAddr::V4(BELOW_CAP), SMTP).build();
    let repeat = options.repeat;
    // Warm-up, not recorded.
    let warm = (repeat / 10).max(1);
    for p in prepared.iter_mut() {
        p.bench.run_baseline(&baseline_packet, warm)?;
        for (case, packet) in cases.iter().zip(packets) {
            p.bench.run_case(case, packet, warm)?;
        }
    }
    struct Collected {
        base_all: Vec<Sample>,
        round_base: Vec<Sample>,
        samples: Vec<Vec<Sample>>,
    }
    let mut collected: Vec<Collected> = prepared
        .iter()
        .map(|_| Collected {
            base_all: Vec::new(),
            round_base: Vec::new(),
            samples: vec![Vec::new(); cases.len()],
        })
        .collect();
    let started = Instant::now();
    for round in 0..options.rounds {
        check_bpf_stats()?;
        let mut empties = Vec::new();
        for k in 0..prepared.len() {
            let s = (k + round) % prepared.len();
            let bench = &mut prepared[s].bench;
            let c = &mut collected[s];
            let first = bench.run_baseline(&baseline_packet, repeat)?;
            for i in 0..cases.len() {
                let n = (i + round) % cases.len();
                c.samples[n].push(bench.run_case(&cases[n], &packets[n], repeat)?);
            }
            let last = bench.run_baseline(&baseline_packet, repeat)?;
            c.base_all.extend([first, last]);
            c.round_base.push(Sample {
                kernel_ns: (first.kernel_ns + last.kernel_ns) / 2.0,
                cpu_ns: (first.cpu_ns + last.cpu_ns) / 2.0,
            });
            empties.push(format!(
                "{}: {:.0}/{:.0}",
                group(prepared[s].scale),
                first.kernel_ns,
                last.kernel_ns
            ));
        }
        eprintln!(
            "  round {}/{}: empty program ns per scale {} ({:.1} s so far)",
            round + 1,
            options.rounds,
            empties.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(prepared
        .iter()
        .zip(collected)
        .map(|(p, c)| {
            // The per-round ratio of the empty program is against its own
            // round mean.
            let doubled: Vec<Sample> = c.round_base.iter().flat_map(|b| [*b, *b]).collect();
            ScaleResult {
                scale: p.scale,
                fill: p.fill,
                baseline: summarize(&c.base_all, &doubled, &c.base_all),
                cases: c
                    .samples
                    .iter()
                    .map(|s| summarize(s, &c.round_base, &c.base_all))
                    .collect(),
                samples: c.samples,
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------
// Output

fn verdict_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Drop => "DROP",
        Kind::Pass => "PASS",
    }
}

fn print_scale(options: &Options, cases: &[Case], r: &ScaleResult) {
    println!();
    println!(
        "### BLOCK_V4, BLOCK_V6: {} addresses each (max_entries {}), BLOCK_NET_V4, BLOCK_NET_V6: {} nets each — {} rounds × repeat {}",
        group(r.fill.addresses),
        group(r.fill.block_max),
        group(r.fill.nets as u32),
        options.rounds,
        group(options.repeat)
    );
    println!();
    println!("| case | verdict | median ns | min–max ns | × empty (medians) | × empty (median of rounds) | CPU ns/run | × empty (CPU) |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let row = |name: &str, verdict: &str, s: &Summary| {
        println!(
            "| {name} | {verdict} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.1} | {:.2} |",
            s.median, s.min, s.max, s.ratio, s.round_ratio, s.cpu_median, s.cpu_ratio
        );
    };
    row("empty XDP (baseline_pass)", "PASS", &r.baseline);
    for (case, s) in cases.iter().zip(&r.cases) {
        row(case.id, verdict_name(case.kind), s);
    }
}

fn mark(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "MISSED"
    }
}

fn print_summary(options: &Options, cases: &[Case], results: &[ScaleResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Summary (kernel-reported medians; ratio = case median / empty median, same scale)\n"
    );
    let mut all_met = true;
    for (kind, target, name) in [
        (Kind::Drop, DROP_TARGET, "drop"),
        (Kind::Pass, PASS_TARGET, "pass"),
    ] {
        let mut met = true;
        let mut worst = (0.0f64, String::new());
        let mut extra_notes = Vec::new();
        for r in results {
            for (case, s) in cases.iter().zip(&r.cases) {
                if case.kind != kind {
                    continue;
                }
                if case.target {
                    met &= s.ratio <= target;
                    if s.ratio > worst.0 {
                        worst = (s.ratio, format!("{} at {}", case.id, group(r.scale)));
                    }
                } else {
                    extra_notes.push(format!(
                        "{} at {}: {:.2}×",
                        case.id,
                        group(r.scale),
                        s.ratio
                    ));
                }
            }
        }
        if worst.1.is_empty() {
            let _ = writeln!(out, "- {name} ≤ {target}× empty: no such case measured");
            continue;
        }
        all_met &= met;
        let _ = writeln!(
            out,
            "- {name} ≤ {target}× empty: {} (worst {:.2}×, {})",
            mark(met),
            worst.0,
            worst.1
        );
        for r in results {
            let list: Vec<String> = cases
                .iter()
                .zip(&r.cases)
                .filter(|(c, _)| c.kind == kind && c.target)
                .map(|(c, s)| format!("{} {:.2}× (rounds {:.2}×)", c.id, s.ratio, s.round_ratio))
                .collect();
            let _ = writeln!(out, "    {:>9}: {}", group(r.scale), list.join(", "));
        }
        if !extra_notes.is_empty() {
            let _ = writeln!(
                out,
                "    extra (not in the target): {}",
                extra_notes.join(", ")
            );
        }
    }
    match (results.first(), results.last()) {
        (Some(first), Some(last)) if first.scale != last.scale => {
            // "Flat" = the cost does not grow by more than the target; a
            // larger drop is flagged (it can only be noise) but is no miss.
            let mut met = true;
            let mut lines = Vec::new();
            for (c, case) in cases.iter().enumerate() {
                let (a, b) = (&first.cases[c], &last.cases[c]);
                let change = b.median / a.median - 1.0;
                // Scales run in the same rounds: the ratio within each round.
                let same_round: Vec<f64> = first.samples[c]
                    .iter()
                    .zip(&last.samples[c])
                    .map(|(x, y)| y.kernel_ns / x.kernel_ns)
                    .collect();
                let round_change = median(&same_round) - 1.0;
                if case.target {
                    met &= change <= FLAT_TARGET;
                }
                let note = if change > FLAT_TARGET {
                    "  GROWS"
                } else if change < -FLAT_TARGET {
                    "  (cheaper: noise)"
                } else {
                    ""
                };
                lines.push(format!(
                    "    {:<15} {:>4.0} → {:>4.0} ns: {:+6.1} % (median of same-round ratios {:+6.1} %; × empty {:.2} → {:.2}){}{}",
                    case.id,
                    a.median,
                    b.median,
                    change * 100.0,
                    round_change * 100.0,
                    a.ratio,
                    b.ratio,
                    if case.target { "" } else { "  [extra]" },
                    note
                ));
            }
            let base_change = last.baseline.median / first.baseline.median - 1.0;
            all_met &= met;
            let _ = writeln!(
                out,
                "- cost flat (growth ≤ {:.0} %) from {} to {} entries: {} (BLOCK_NET {} → {} nets; empty program {:+.1} %)",
                FLAT_TARGET * 100.0,
                group(first.scale),
                group(last.scale),
                mark(met),
                group(first.fill.nets as u32),
                group(last.fill.nets as u32),
                base_change * 100.0
            );
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
            if last.scale < 1_000_000 {
                let _ = writeln!(
                    out,
                    "    (largest scale measured is {}, not 1 000 000)",
                    group(last.scale)
                );
            }
        }
        _ => {
            let _ = writeln!(
                out,
                "- flat within {:.0} %: not measured (one scale only)",
                FLAT_TARGET * 100.0
            );
        }
    }
    let _ = writeln!(
        out,
        "\nAll targets: {}. Rounds {}, repeat {}; kernel times are whole ns (the kernel truncates the mean).",
        if all_met { "MET" } else { "NOT ALL MET" },
        options.rounds,
        group(options.repeat)
    );
    out
}

// ---------------------------------------------------------------------------

fn pin_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    ensure!(
        cpu < libc::CPU_SETSIZE as usize,
        "--cpu {cpu}: out of range"
    );
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 = this thread; the set is valid for its size.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

fn main() -> Result<()> {
    let options = parse_options()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "limiter-bench needs root (BPF_PROG_TEST_RUN, pinned maps)"
    );
    ensure!(
        ebpf_object().is_some(),
        "no eBPF object at {}: run `cargo xtask build-ebpf` (or `cargo xtask bench`)",
        object_path().display()
    );
    ensure!(
        baseline_object().is_file(),
        "no baseline object at {}: run `cargo xtask build-ebpf` (or `cargo xtask bench`)",
        baseline_object().display()
    );
    check_bpf_stats()?;
    if let Some(cpu) = options.cpu {
        pin_cpu(cpu)?;
    }
    let mut cases = cases();
    if !options.only.is_empty() {
        cases.retain(|c| options.only.iter().any(|id| id == c.id));
    }
    println!("# limiter-bench: XDP per-packet cost through BPF_PROG_TEST_RUN");
    println!();
    println!(
        "kernel {}, {} CPUs, rounds {}, repeat {}, scales {}{}",
        kernel_release(),
        std::thread::available_parallelism().map_or(0, usize::from),
        options.rounds,
        group(options.repeat),
        options
            .scales
            .iter()
            .map(|s| group(*s))
            .collect::<Vec<_>>()
            .join(", "),
        options
            .cpu
            .map_or_else(String::new, |c| format!(", pinned to CPU {c}"))
    );
    println!("object {}", object_path().display());
    println!("cases:");
    for case in &cases {
        println!("  {:<15} {}", case.id, case.label);
    }
    let started = Instant::now();
    let packets: Vec<Vec<u8>> = cases.iter().map(Case::frame).collect();
    // Every scale is loaded at once (each with its own pins, removed when
    // `prepared` drops) so that the rounds can interleave them.
    let mut prepared = Vec::new();
    for &scale in &options.scales {
        prepared.push(prepare_scale(&options, &cases, &packets, scale)?);
    }
    let results = run_rounds(&options, &cases, &packets, &mut prepared)?;
    drop(prepared);
    for result in &results {
        print_scale(&options, &cases, result);
    }
    check_bpf_stats()?;
    print!("{}", print_summary(&options, &cases, &results));
    println!("Took {:.0} s.", started.elapsed().as_secs_f64());
    Ok(())
}
