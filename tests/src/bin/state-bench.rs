//! `state-bench`: the scale of state (issue 7, benchmark 3). What 1 000 000
//! blocked addresses and 100 000 blocked networks cost, against an empty
//! state measured in the same run:
//!
//! 1. **proxy** — the proxy's own block table (`blocks::Blocks`, the
//!    one the accept path asks): resident memory it takes with the whole
//!    state, ns per `covering()` lookup (hits on addresses and networks,
//!    misses; IPv4 and IPv6) against the same lookups on an empty table,
//!    the cost of an insert into a full table (eviction), and the state
//!    file (`state::Store`): time to write it (the agent rewrites it every
//!    10 s), its size, and time to read it back.
//! 2. **kernel** — the BPF maps sized for the state (`kernel.map_sizes`),
//!    loaded twice under private pins: once filled with the whole state,
//!    once with only the few entries the test packets need. The maps'
//!    kernel memory (`memlock` in `/proc/self/fdinfo`, which 6.x kernels
//!    compute from what each map really holds), and the per-packet cost of
//!    `limiter_xdp` through `BPF_PROG_TEST_RUN` on both, next to an empty
//!    XDP program, with rounds interleaved. Also the cost of what the agent
//!    does with the maps every 10 s (read every block, sweep expired ones).
//! 3. **start** — the real `smtp-limiter run` binary (kernel.mode =
//!    "required", XDP on a veth in a namespace this benchmark creates),
//!    started with a state file holding the whole state, with no pinned maps
//!    (a reboot: every block goes into the kernel) and with the maps still
//!    pinned (an agent restart), and with no state: time until its log says
//!    it listens and until its control socket answers, its resident set,
//!    the CPU it spends per 10 s when idle (sweep + save of the state), the
//!    time it takes to stop (it saves the state on the way). Afterwards the
//!    pinned maps are counted and probed, and a SYN from a blocked address
//!    in the state file must be dropped while another client gets the
//!    greeting.
//!
//! Run it with `cargo xtask bench -- --only state [ARGS]`, as root, after
//! `cargo xtask build --release` (the agent binary with its embedded eBPF
//! object, `target/release/smtp-limiter`). Traffic stays in the namespaces
//! the benchmark creates (`slb-state-<pid>-<n>`); pins live under
//! `/sys/fs/bpf/slb-state-<pid>-*`; everything is removed at the end, also
//! on error, and leftovers of a killed run are removed at the next start.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd as _, AsRawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context, Result};
use aya::maps::MapData;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use limiter_common::{map_names as names, Reason, Stats};
use limiter_tests::{
    kernel::{baseline_object, ebpf_object, object_path, Baseline},
    netns::{self, NetNs},
    packets::{Frame, ACK, SYN},
    stats::{group, load_average, median, min_max},
    tcp::connect_from,
};
use limiter_user::{
    blocks::{Block, Blocks, Change},
    kernel::{BpfDatapath, Datapath, KernelLimits, KernelOptions, MapSizes},
    state::{self, Store, StoredBlock},
};

/// Names of everything this benchmark creates: namespaces, pin and
/// temporary directories.
const PREFIX: &str = "slb-state";
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const BASELINE_PROGRAM: &str = "baseline_pass";
const SMTP: u16 = 25;

/// Test sources and the entries they need (documentation ranges, which
/// the generated state never touches).
const BLOCKED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const BLOCKED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const BLOCKED_NET: &str = "198.51.100.0/24";
const IN_BLOCKED_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 77);
const BLOCKED_NET6: &str = "2001:db8:77::/64";
const IN_BLOCKED_NET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 5);
/// A network next to the pass sources' /24: it sets their /16 bit in the
/// BLOCK_NET prefilter, so that passing packets walk the trie (as nearly
/// every /16 does with 100 000 networks spread over the space).
const NEIGHBOUR_NET: &str = "203.0.112.0/24";
const PASS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const PASS_NEW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 30);
const PASS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 1);

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Proxy,
    Kernel,
    Start,
}

struct Options {
    addresses: usize,
    nets: usize,
    rounds: usize,
    repeat: u32,
    starts: usize,
    idle: u64,
    parts: Vec<Part>,
    /// `state.max_blocks` for the agent (default: the state plus 10 %).
    max_blocks: Option<usize>,
    agent: Option<PathBuf>,
}

const USAGE: &str = "\
state-bench: memory, lookup cost and load time of a large block state

usage: cargo xtask bench -- --only state [OPTIONS]
       cargo run --release -p limiter-tests --bin state-bench -- [OPTIONS]

options:
  --addresses N    blocked single addresses (default 1000000; 1 % IPv6)
  --nets N         blocked networks (default 100000; 10 % IPv6, mixed lengths)
  --rounds N       rounds of the kernel and proxy lookups (default 7)
  --repeat N       BPF_PROG_TEST_RUN repeat per measurement (default 1000000)
  --starts N       agent starts per state (default 3)
  --idle SECS      agent CPU measured idle for SECS after the last starts
                   (default 21: two sweep/save periods; 0 = skip)
  --max-blocks N   state.max_blocks for the agent (default: state + 10 %)
  --parts LIST     proxy,kernel,start (default all)
  --agent PATH     the smtp-limiter binary (default: next to this one)
  --quick          smoke run: 100000 addresses, 10000 nets, 3 rounds,
                   repeat 100000, 2 starts, idle 11 (explicit options win)
  -h, --help       this text

Needs root, the eBPF objects (`cargo xtask build-ebpf`) and the agent
(`cargo xtask build --release`).";

fn parse_options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        addresses: if quick { 100_000 } else { 1_000_000 },
        nets: if quick { 10_000 } else { 100_000 },
        rounds: if quick { 3 } else { 7 },
        repeat: if quick { 100_000 } else { 1_000_000 },
        starts: if quick { 2 } else { 3 },
        idle: if quick { 11 } else { 21 },
        parts: vec![Part::Proxy, Part::Kernel, Part::Start],
        max_blocks: None,
        agent: None,
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || -> Result<String> {
            inline
                .clone()
                .or_else(|| it.next())
                .with_context(|| format!("{name} needs a value"))
        };
        let number = |v: String, what: &str| -> Result<u64> {
            v.replace('_', "")
                .parse()
                .with_context(|| format!("{what}: {v:?} is not a number"))
        };
        match name.as_str() {
            "--quick" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--addresses" => o.addresses = number(value()?, "--addresses")? as usize,
            "--nets" => o.nets = number(value()?, "--nets")? as usize,
            "--rounds" => o.rounds = number(value()?, "--rounds")? as usize,
            "--repeat" => o.repeat = number(value()?, "--repeat")? as u32,
            "--starts" => o.starts = number(value()?, "--starts")? as usize,
            "--idle" => o.idle = number(value()?, "--idle")?,
            "--max-blocks" => o.max_blocks = Some(number(value()?, "--max-blocks")? as usize),
            "--agent" => o.agent = Some(PathBuf::from(value()?)),
            "--parts" => {
                o.parts.clear();
                for p in value()?.split(',') {
                    o.parts.push(match p.trim() {
                        "proxy" => Part::Proxy,
                        "kernel" => Part::Kernel,
                        "start" => Part::Start,
                        other => bail!("--parts: unknown part {other:?} (proxy, kernel, start)"),
                    });
                }
            }
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    ensure!(
        (10..=10_000_000).contains(&o.addresses),
        "--addresses: 10 to 10000000"
    );
    ensure!((10..=1_000_000).contains(&o.nets), "--nets: 10 to 1000000");
    ensure!((1..=100).contains(&o.rounds), "--rounds: 1 to 100");
    ensure!(
        (1..=100_000_000).contains(&o.repeat),
        "--repeat: 1 to 100000000"
    );
    ensure!((1..=20).contains(&o.starts), "--starts: 1 to 20");
    ensure!(o.idle <= 600, "--idle: at most 600 s");
    Ok(o)
}

// ---------------------------------------------------------------------------
// The state

/// splitmix64: a fixed, reproducible sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A generated block state: addresses (full-length prefixes) and networks,
/// each with its expiry. The test entries come first.
struct StateSet {
    hosts: Vec<IpNet>,
    nets: Vec<IpNet>,
    /// IPv4 miss sources (inside 100.64.0.0/10, which nothing covers).
    misses4: Vec<IpAddr>,
    /// IPv6 miss sources (inside 2001:db8:99::/48).
    misses6: Vec<IpAddr>,
}

/// Ranges the generated networks stay out of: the address fillers (10/8),
/// the miss pools, loopback, the test ranges.
fn excluded() -> Vec<IpNet> {
    [
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "192.0.2.0/24",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "203.0.112.0/24",
        "2001:db8::/32",
    ]
    .iter()
    .map(|s| s.parse().expect("valid"))
    .collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn test_hosts() -> Vec<IpNet> {
    vec![
        IpNet::from(IpAddr::V4(BLOCKED)),
        IpNet::from(IpAddr::V6(BLOCKED6)),
    ]
}

fn test_nets() -> Vec<IpNet> {
    [BLOCKED_NET, BLOCKED_NET6, NEIGHBOUR_NET]
        .iter()
        .map(|s| s.parse().expect("valid"))
        .collect()
}

impl StateSet {
    /// `addresses` single addresses (1 % IPv6 /128, the rest IPv4 spread
    /// over 10.0.0.0/8 except 10.199.0.0/16, the veth's range) and `nets`
    /// networks (10 % IPv6: /64, /48, /32; IPv4 /16 … /30 placed over the
    /// unicast space), test entries included in both counts.
    fn generate(addresses: usize, nets: usize) -> Self {
        let mut rng = Rng(0x5eed_0007_57a7_e000);
        let mut hosts = test_hosts();
        let v6_hosts = addresses / 100;
        let v4_hosts = addresses - v6_hosts - hosts.len().min(addresses);
        // An odd multiplier permutes the 24-bit space: distinct addresses,
        // spread over the whole /8 like real sources.
        let mut i: u32 = 0;
        let mut added = 0;
        while added < v4_hosts {
            let x = i.wrapping_mul(2_654_435_761) & 0x00ff_ffff;
            i += 1;
            if x >> 16 == 199 {
                continue;
            }
            hosts.push(IpNet::from(IpAddr::V4(Ipv4Addr::from((10 << 24) | x))));
            added += 1;
        }
        let mut seen6 = HashSet::new();
        while seen6.len() < v6_hosts {
            let bits = (u128::from(rng.next()) << 64) | u128::from(rng.next());
            let addr = Ipv6Addr::from((0x2a00u128 << 112) | (bits >> 16));
            if seen6.insert(addr) {
                hosts.push(IpNet::from(IpAddr::V6(addr)));
            }
        }

        let excluded = excluded();
        let mut list = test_nets();
        let mut seen: HashSet<IpNet> = list.iter().copied().collect();
        let v6_nets = nets / 10;
        let v4_nets = nets - v6_nets;
        let lengths4 = [16u8, 20, 22, 24, 24, 24, 26, 28, 29, 30];
        let lengths6 = [64u8, 64, 64, 64, 64, 64, 64, 48, 48, 32];
        let mut n4 = 0;
        let mut n6 = 0;
        while list.len() < nets {
            let net = if n4 < v4_nets {
                let len = lengths4[n4 % lengths4.len()];
                // 1.0.0.0 … 223.255.255.255
                let base = (1u32 << 24) + rng.below(223 << 24) as u32;
                IpNet::V4(
                    Ipv4Net::new(Ipv4Addr::from(base), len)
                        .expect("≤ 32")
                        .trunc(),
                )
            } else {
                let len = lengths6[n6 % lengths6.len()];
                // 2000::/3
                let bits = (u128::from(rng.next()) << 64) | u128::from(rng.next());
                let base = (0x2u128 << 124) | (bits >> 3);
                IpNet::V6(
                    Ipv6Net::new(Ipv6Addr::from(base), len)
                        .expect("≤ 128")
                        .trunc(),
                )
            };
            if excluded.iter().any(|e| overlaps(e, &net)) || !seen.insert(net) {
                continue;
            }
            match net {
                IpNet::V4(_) => n4 += 1,
                IpNet::V6(_) => n6 += 1,
            }
            list.push(net);
        }
        let misses4 = (0..1000)
            .map(|_| {
                IpAddr::V4(Ipv4Addr::from(
                    (100u32 << 24 | 64 << 16) + rng.below(1 << 22) as u32,
                ))
            })
            .collect();
        let misses6 = (0..1000)
            .map(|_| {
                IpAddr::V6(Ipv6Addr::from(
                    (0x2001_0db8_0099u128 << 80) | u128::from(rng.next() >> 16),
                ))
            })
            .collect();
        Self {
            hosts,
            nets: list,
            misses4,
            misses6,
        }
    }

    /// The test entries only: the "empty" state the test packets need.
    fn empty() -> Self {
        Self {
            hosts: test_hosts(),
            nets: test_nets(),
            misses4: Vec::new(),
            misses6: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.hosts.len() + self.nets.len()
    }

    /// Every entry with its expiry: test entries permanent, one in ten of
    /// the others permanent, the rest expiring within 1 to 168 hours.
    fn entries(&self, now: SystemTime) -> impl Iterator<Item = (IpNet, Option<SystemTime>)> + '_ {
        let tests = test_hosts().len();
        let test_n = test_nets().len();
        let expiry = move |i: usize| {
            (!i.is_multiple_of(10))
                .then(|| now + Duration::from_secs(3600 * (1 + (i % 168) as u64)))
        };
        let hosts = self
            .hosts
            .iter()
            .enumerate()
            .map(move |(i, n)| (*n, if i < tests { None } else { expiry(i) }));
        let nets = self
            .nets
            .iter()
            .enumerate()
            .map(move |(i, n)| (*n, if i < test_n { None } else { expiry(i) }));
        hosts.chain(nets)
    }

    fn v6_counts(&self) -> (usize, usize) {
        (
            self.hosts
                .iter()
                .filter(|n| matches!(n, IpNet::V6(_)))
                .count(),
            self.nets
                .iter()
                .filter(|n| matches!(n, IpNet::V6(_)))
                .count(),
        )
    }
}

/// An address inside `net` other than its network address where possible.
fn inside(net: &IpNet) -> IpAddr {
    match net {
        IpNet::V4(n) if n.prefix_len() < 32 => {
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1))
        }
        IpNet::V6(n) if n.prefix_len() < 128 => {
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1))
        }
        other => other.addr(),
    }
}

// ---------------------------------------------------------------------------
// Small helpers

fn mib(bytes: f64) -> String {
    format!("{:.1}", bytes / 1_048_576.0)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: &str, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// User + system CPU time of a process.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "(comm)": state is field 3, utime 14, stime 15 (1-based).
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

fn check_bpf_stats() -> Result<()> {
    let v = read_trimmed("/proc/sys/kernel/bpf_stats_enabled");
    ensure!(
        v == "0" || v == "?",
        "kernel.bpf_stats_enabled = {v}: it adds clock reads to every run; set it to 0"
    );
    Ok(())
}

/// A directory removed with its contents on drop (pins or temporary files).
struct Dir(PathBuf);

impl Dir {
    fn new(base: &str, tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "{base}/{PREFIX}-{}-{tag}",
            std::process::id()
        )))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("removing {}: {e}", self.0.display());
            }
        }
    }
}

/// Leftovers of a killed run: namespaces, pins, temporary directories of a
/// process that is gone.
fn remove_stale() -> Result<()> {
    for name in NetNs::remove_stale(PREFIX)? {
        eprintln!("removed stale namespace {name}");
    }
    for base in ["/sys/fs/bpf", "/tmp"] {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                std::fs::remove_dir_all(entry.path())
                    .with_context(|| format!("removing stale {}", entry.path().display()))?;
                eprintln!("removed stale {}", entry.path().display());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Part 1: the proxy's block table and the state file

struct ProxyResult {
    entries: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    fill: Duration,
    /// (label, empty ns/lookup samples, full ns/lookup samples)
    lookups: Vec<(&'static str, Vec<f64>, Vec<f64>)>,
    /// (capacity, µs per insert into a full table)
    evictions: Vec<(usize, f64)>,
    all_clone: Duration,
    save: Vec<Duration>,
    load: Vec<Duration>,
    file_bytes: u64,
    /// Seconds per single-block journal append (write + fdatasync).
    append: Vec<f64>,
    load_with_journal: Duration,
    /// Format 1 (one pretty document): time to write it (serialise + write,
    /// no fsync), its size, and `Store::load` of it.
    legacy_save: Duration,
    legacy_bytes: u64,
    legacy_load: Vec<Duration>,
}

/// Single blocks journaled one at a time by the proxy part.
const APPENDS: usize = 200;

fn active(net: IpNet, expires: Option<SystemTime>, now: SystemTime) -> Block {
    Block {
        net,
        origin: Reason::Harvest,
        expires,
        since: now,
        repeat: 0,
        comment: None,
    }
}

fn stored_blocks(state: &StateSet, now: SystemTime) -> Vec<StoredBlock> {
    state
        .entries(now)
        .map(|(net, expires)| StoredBlock::from(&active(net, expires, now)))
        .collect()
}

fn proxy_part(options: &Options, state: &StateSet, dir: &Path) -> Result<ProxyResult> {
    let now = SystemTime::now();
    let entries = state.len();
    eprintln!(
        "proxy: filling a block table with {} entries",
        group(entries as u64)
    );
    let rss_before_kib = status_kib("self", "VmRSS")?;
    let started = Instant::now();
    let full = Blocks::with_capacity(entries + entries / 10);
    for (net, expires) in state.entries(now) {
        full.insert(active(net, expires, now));
    }
    let fill = started.elapsed();
    let rss_after_kib = status_kib("self", "VmRSS")?;
    ensure!(
        full.len() == entries,
        "the table holds {} of {entries}",
        full.len()
    );
    ensure!(full.evicted() == 0, "entries were evicted");
    let empty = Blocks::with_capacity(entries + entries / 10);
    for (net, expires) in StateSet::empty().entries(now) {
        empty.insert(active(net, expires, now));
    }

    // Lookups: (label, sources, whether the full table must find them,
    // whether the empty table must).
    let mut rng = Rng(0x100c_0b5e);
    let pick = |list: &[IpNet], v6: bool, rng: &mut Rng| -> Vec<IpAddr> {
        // Generated entries only: the empty table holds the test ones.
        let tests: Vec<IpNet> = test_hosts().into_iter().chain(test_nets()).collect();
        let pool: Vec<&IpNet> = list
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)) == v6 && !tests.contains(n))
            .collect();
        (0..1000)
            .map(|_| inside(pool[rng.below(pool.len() as u64) as usize]))
            .collect()
    };
    let probes: Vec<(&'static str, Vec<IpAddr>, bool)> = vec![
        (
            "hit: IPv4 address",
            pick(&state.hosts, false, &mut rng),
            true,
        ),
        (
            "hit: IPv4 network",
            pick(&state.nets, false, &mut rng),
            true,
        ),
        ("miss: IPv4", state.misses4.clone(), false),
        (
            "hit: IPv6 address",
            pick(&state.hosts, true, &mut rng),
            true,
        ),
        ("hit: IPv6 network", pick(&state.nets, true, &mut rng), true),
        ("miss: IPv6", state.misses6.clone(), false),
    ];
    let time_batch = |table: &Blocks, sources: &[IpAddr]| -> (f64, usize) {
        let t = Instant::now();
        let mut found = 0;
        for ip in sources {
            found += usize::from(std::hint::black_box(table.covering(*ip, now)).is_some());
        }
        (t.elapsed().as_nanos() as f64 / sources.len() as f64, found)
    };
    let mut lookups: Vec<(&'static str, Vec<f64>, Vec<f64>)> = probes
        .iter()
        .map(|(l, _, _)| (*l, Vec::new(), Vec::new()))
        .collect();
    // Warm-up, then rounds × 20 batches, empty and full interleaved.
    for (_, sources, _) in &probes {
        time_batch(&full, sources);
        time_batch(&empty, sources);
    }
    for round in 0..options.rounds {
        for (i, (label, sources, hit)) in probes.iter().enumerate() {
            for b in 0..20 {
                let order: [(&Blocks, bool); 2] = if (round + b) % 2 == 0 {
                    [(&empty, false), (&full, true)]
                } else {
                    [(&full, true), (&empty, false)]
                };
                for (table, is_full) in order {
                    let (ns, found) = time_batch(table, sources);
                    let want = if is_full && *hit { sources.len() } else { 0 };
                    ensure!(
                        found == want,
                        "{label}: {} table found {found} of {} (expected {want})",
                        if is_full { "full" } else { "empty" },
                        sources.len()
                    );
                    if is_full {
                        lookups[i].2.push(ns);
                    } else {
                        lookups[i].1.push(ns);
                    }
                }
            }
        }
    }

    // The agent's save starts with a copy of every block.
    let t = Instant::now();
    let all = full.all();
    let all_clone = t.elapsed();
    ensure!(all.len() == entries, "all() returned {}", all.len());
    drop(all);
    drop(full);

    // A full table evicts on every insert: how long one insert takes at the
    // default capacity (state.max_blocks = 100 000) and at the state's size.
    let mut evictions = Vec::new();
    let mut capacities = vec![100_000usize.min(entries)];
    if entries > 100_000 {
        capacities.push(entries);
    }
    let all_entries: Vec<(IpNet, Option<SystemTime>)> = state.entries(now).collect();
    for capacity in capacities {
        let table = Blocks::with_capacity(capacity);
        for (net, expires) in all_entries.iter().take(capacity) {
            table.insert(active(*net, *expires, now));
        }
        let extra: Vec<_> = all_entries.iter().skip(capacity).take(200).collect();
        let extra: Vec<(IpNet, Option<SystemTime>)> = if extra.is_empty() {
            state
                .misses4
                .iter()
                .take(200)
                .map(|ip| (IpNet::from(*ip), Some(now + Duration::from_secs(7200))))
                .collect()
        } else {
            extra.into_iter().copied().collect()
        };
        let t = Instant::now();
        for (net, expires) in &extra {
            table.insert(active(*net, *expires, now));
        }
        let per = t.elapsed().as_secs_f64() * 1e6 / extra.len() as f64;
        ensure!(
            table.len() == capacity && table.evicted() == extra.len() as u64,
            "eviction: {} held, {} evicted",
            table.len(),
            table.evicted()
        );
        evictions.push((capacity, per));
    }
    drop(all_entries);

    // The state store: a whole snapshot (what the agent writes when its
    // journal outgrew the table), read back as at start; then single
    // blocks journaled one at a time (what one new block costs), and the
    // start's read with those records to replay.
    let store_dir = dir.join("store");
    let store = Store::open(&store_dir)?;
    let stored = stored_blocks(state, now);
    let mut save = Vec::new();
    let mut load = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        store.save(&stored)?;
        save.push(t.elapsed());
        let t = Instant::now();
        let loaded = store.load(SystemTime::now())?;
        load.push(t.elapsed());
        ensure!(
            loaded.blocks.len() == stored.len(),
            "read back {} of {}",
            loaded.blocks.len(),
            stored.len()
        );
    }
    let file_bytes = store.size();
    // The same blocks as the format the agent wrote before the journal (one
    // pretty-printed document, rewritten whole on every change), read by
    // the same `Store::load` (it converts that format at start): the
    // restart cost of both formats, in this run.
    let legacy_dir = dir.join("legacy");
    std::fs::create_dir_all(&legacy_dir)?;
    let t = Instant::now();
    let text = serde_json::to_vec_pretty(&serde_json::json!({ "version": 1, "blocks": stored }))?;
    std::fs::write(legacy_dir.join(state::LEGACY_FILE), &text)?;
    let legacy_save = t.elapsed();
    let legacy_bytes = text.len() as u64;
    drop(text);
    let legacy_store = Store::open(&legacy_dir)?;
    let mut legacy_load = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let loaded = legacy_store.load(SystemTime::now())?;
        legacy_load.push(t.elapsed());
        ensure!(
            loaded.legacy && loaded.blocks.len() == stored.len(),
            "format 1 read back {}",
            loaded.blocks.len()
        );
    }
    std::fs::remove_dir_all(&legacy_dir)?;
    let mut append = Vec::new();
    for i in 0..APPENDS {
        let block = active(
            IpNet::from(state.misses4[i % state.misses4.len()]),
            Some(now + Duration::from_secs(3600)),
            now,
        );
        let t = Instant::now();
        store.append(&[Change::Put(block)])?;
        append.push(t.elapsed().as_secs_f64());
    }
    let t = Instant::now();
    let loaded = store.load(SystemTime::now())?;
    let load_with_journal = t.elapsed();
    ensure!(
        loaded.records == APPENDS as u64,
        "replayed {} journal records of {APPENDS}",
        loaded.records
    );
    std::fs::remove_dir_all(&store_dir)?;
    Ok(ProxyResult {
        entries,
        rss_before_kib,
        rss_after_kib,
        fill,
        lookups,
        evictions,
        all_clone,
        save,
        load,
        file_bytes,
        append,
        load_with_journal,
        legacy_save,
        legacy_bytes,
        legacy_load,
    })
}

fn print_proxy(r: &ProxyResult) {
    println!();
    println!(
        "## Proxy: block table and state file ({} entries)",
        group(r.entries as u64)
    );
    println!();
    let grown = r.rss_after_kib.saturating_sub(r.rss_before_kib);
    println!(
        "Block table: filled in {:.2} s ({:.2} µs per insert); resident set {} → {} MiB, +{} MiB = {:.0} bytes per block.",
        r.fill.as_secs_f64(),
        r.fill.as_secs_f64() * 1e6 / r.entries as f64,
        mib(r.rss_before_kib as f64 * 1024.0),
        mib(r.rss_after_kib as f64 * 1024.0),
        mib(grown as f64 * 1024.0),
        grown as f64 * 1024.0 / r.entries as f64
    );
    println!();
    println!(
        "| lookup (`Blocks::covering`, 1 000 sources per batch) | empty table ns | full table ns | full table min–max | full ÷ empty (median of same-batch ratios) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (label, empty, full) in &r.lookups {
        let ratios: Vec<f64> = full.iter().zip(empty).map(|(f, e)| f / e).collect();
        let (lo, hi) = min_max(full);
        println!(
            "| {label} | {:.0} | {:.0} | {:.0}–{:.0} | {:.2} |",
            median(empty),
            median(full),
            lo,
            hi,
            median(&ratios)
        );
    }
    println!();
    for (capacity, per) in &r.evictions {
        println!(
            "Insert into a full table of {} blocks (evicts the block expiring first): {:.1} µs per insert.",
            group(*capacity as u64),
            per
        );
    }
    let save: Vec<f64> = r.save.iter().map(Duration::as_secs_f64).collect();
    let load: Vec<f64> = r.load.iter().map(Duration::as_secs_f64).collect();
    println!(
        "State store snapshot ({} blocks, {} MiB): `Store::save` {:.2} s (median of {}; {:.2}–{:.2}), `Store::load` {:.2} s; copying the table (`Blocks::all`) {:.3} s.",
        group(r.entries as u64),
        mib(r.file_bytes as f64),
        median(&save),
        save.len(),
        min_max(&save).0,
        min_max(&save).1,
        median(&load),
        r.all_clone.as_secs_f64()
    );
    let legacy_load: Vec<f64> = r.legacy_load.iter().map(Duration::as_secs_f64).collect();
    println!(
        "Same blocks in format 1 (one pretty-printed `blocks.json`, what earlier versions rewrote on every change; {} MiB): written in {:.2} s (no fsync), `Store::load` {:.2} s (median of {}; {:.2}–{:.2}).",
        mib(r.legacy_bytes as f64),
        r.legacy_save.as_secs_f64(),
        median(&legacy_load),
        legacy_load.len(),
        min_max(&legacy_load).0,
        min_max(&legacy_load).1,
    );
    let mut append = r.append.clone();
    append.sort_by(f64::total_cmp);
    println!(
        "One block written to the store (`Store::append`: one journal line, fdatasync), {} in a row: median {:.2} ms, p99 {:.2} ms, max {:.2} ms. `Store::load` of the snapshot plus those {} journal records: {:.2} s.",
        r.append.len(),
        median(&r.append) * 1e3,
        append[((append.len() as f64 - 1.0) * 0.99).round() as usize] * 1e3,
        append.last().copied().unwrap_or(0.0) * 1e3,
        r.append.len(),
        r.load_with_journal.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Part 2: the kernel maps and the per-packet cost

/// The kernel programs loaded with private pins, removed on drop (the
/// programs go first: field order).
struct Loaded {
    datapath: BpfDatapath,
    pins: Dir,
}

impl Loaded {
    fn load(tag: &str, sizes: MapSizes) -> Result<Self> {
        let pins = Dir::new("/sys/fs/bpf", tag);
        let datapath = BpfDatapath::load(&KernelOptions {
            object: ebpf_object(),
            pin_path: pins.0.clone(),
            map_sizes: sizes,
            limits: KernelLimits::default(),
        })
        .with_context(|| format!("loading the kernel programs ({tag})"))?;
        Ok(Self { datapath, pins })
    }

    /// Puts a state into the maps; returns the time it took.
    fn fill(&self, state: &StateSet) -> Result<Duration> {
        let now = SystemTime::now();
        let t = Instant::now();
        for (net, expires) in state.entries(now) {
            self.datapath
                .block(net, expires, Reason::Harvest)
                .with_context(|| format!("blocking {net}"))?;
        }
        Ok(t.elapsed())
    }
}

/// One map's entry in `/proc/self/fdinfo`.
struct MapMemory {
    name: &'static str,
    max_entries: u64,
    memlock: u64,
}

fn map_memory(pins: &Path) -> Result<Vec<MapMemory>> {
    let mut out = Vec::new();
    for name in names::ALL {
        let data = MapData::from_pin(pins.join(name))
            .with_context(|| format!("opening the pinned {name}"))?;
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let field = |key: &str| -> Result<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no {key} in the fdinfo of {name}: {info}"))
        };
        out.push(MapMemory {
            name,
            max_entries: field("max_entries")?,
            memlock: field("memlock")?,
        });
    }
    Ok(out)
}

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
    counter: fn(&Stats) -> u64,
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

fn cases() -> Vec<Case> {
    vec![
        Case {
            id: "drop-block",
            label: "SYN from an IPv4 address in BLOCK",
            kind: Kind::Drop,
            source: IpAddr::V4(BLOCKED),
            flags: SYN,
            counter: |s| s.dropped_block,
        },
        Case {
            id: "drop-block6",
            label: "SYN from an IPv6 address in BLOCK",
            kind: Kind::Drop,
            source: IpAddr::V6(BLOCKED6),
            flags: SYN,
            counter: |s| s.dropped_block,
        },
        Case {
            id: "drop-cidr",
            label: "SYN from inside an IPv4 /24 in BLOCK_NET",
            kind: Kind::Drop,
            source: IpAddr::V4(IN_BLOCKED_NET),
            flags: SYN,
            counter: |s| s.dropped_block_net,
        },
        Case {
            id: "drop-cidr6",
            label: "SYN from inside an IPv6 /64 in BLOCK_NET",
            kind: Kind::Drop,
            source: IpAddr::V6(IN_BLOCKED_NET6),
            flags: SYN,
            counter: |s| s.dropped_block_net,
        },
        Case {
            id: "pass-ack",
            label: "ACK from an unblocked IPv4 source (its /16 has BLOCK_NET entries)",
            kind: Kind::Pass,
            source: IpAddr::V4(PASS),
            flags: ACK,
            counter: |s| s.passed,
        },
        Case {
            id: "pass-syn",
            label: "SYN from an unblocked IPv4 source holding no connection",
            kind: Kind::Pass,
            source: IpAddr::V4(PASS_NEW),
            flags: SYN,
            counter: |s| s.passed,
        },
        Case {
            id: "pass-ack6",
            label: "ACK from an unblocked IPv6 source",
            kind: Kind::Pass,
            source: IpAddr::V6(PASS6),
            flags: ACK,
            counter: |s| s.passed,
        },
    ]
}

/// Kernel ns per run (as the kernel reports it), checked verdict.
fn measure(
    what: &str,
    expected: u32,
    run: impl FnOnce() -> Result<(u32, Duration)>,
) -> Result<f64> {
    let (action, duration) = run().with_context(|| format!("test run of {what}"))?;
    ensure!(
        action == expected,
        "WRONG VERDICT: {what} returned {action}, expected {expected}"
    );
    Ok(duration.as_nanos() as f64)
}

struct KernelResult {
    sizes: MapSizes,
    /// (label, memory per map)
    memory: Vec<(String, Vec<MapMemory>)>,
    fill: Duration,
    entries: usize,
    mem_available_drop_kib: i64,
    /// Per case: samples on the empty state, on the full state.
    samples: Vec<(Vec<f64>, Vec<f64>)>,
    baseline: Vec<f64>,
    /// What the agent does every 10 s: read every block, sweep.
    read_all: Duration,
    sweep: Duration,
    read_count: usize,
    /// Networks taken out one by one (`Datapath::unblock`, what a reload
    /// that shortens a reject list does) and the time it took.
    removed_nets: usize,
    remove_nets: Duration,
}

fn mem_available_kib() -> i64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Map sizes that hold `state` with 10 % room (at least the defaults).
fn sizes_for(state: &StateSet) -> MapSizes {
    let d = MapSizes::default();
    let room = |n: usize| (n + n / 10) as u32;
    MapSizes {
        block: room(state.hosts.len()).max(d.block),
        block_net: room(state.nets.len()).max(d.block_net),
        ..d
    }
}

/// Networks removed one by one at the end of the kernel part.
const NETS_REMOVED: usize = 10_000;

fn kernel_part(options: &Options, state: &StateSet, cases: &[Case]) -> Result<KernelResult> {
    let sizes = sizes_for(state);
    let mut memory = Vec::new();
    {
        let defaults = Loaded::load("default", MapSizes::default())?;
        memory.push((
            "default map sizes, empty".to_owned(),
            map_memory(&defaults.pins.0)?,
        ));
    }
    let empty = Loaded::load("empty", sizes)?;
    empty.fill(&StateSet::empty())?;
    memory.push((
        "sized for the state, empty".to_owned(),
        map_memory(&empty.pins.0)?,
    ));
    eprintln!(
        "kernel: filling BLOCK ({} max) with {} addresses and BLOCK_NET ({} max) with {} networks",
        group(sizes.block),
        group(state.hosts.len() as u64),
        group(sizes.block_net),
        group(state.nets.len() as u64)
    );
    let available_before = mem_available_kib();
    let full = Loaded::load("full", sizes)?;
    let fill = full.fill(state)?;
    let mem_available_drop_kib = available_before - mem_available_kib();
    eprintln!("  filled in {:.1} s", fill.as_secs_f64());
    memory.push((
        "sized for the state, full".to_owned(),
        map_memory(&full.pins.0)?,
    ));

    // What the agent does with the maps every 10 s.
    let t = Instant::now();
    let read = full.datapath.blocks()?;
    let read_all = t.elapsed();
    let read_count = read.len();
    ensure!(
        read_count == state.len(),
        "the kernel holds {read_count} blocks, expected {}",
        state.len()
    );
    // Exactly the state's entries, each once.
    let read: HashSet<IpNet> = read.into_iter().map(|b| b.net).collect();
    ensure!(
        read.len() == state.len()
            && state
                .hosts
                .iter()
                .chain(&state.nets)
                .all(|n| read.contains(n)),
        "the blocks read back from the kernel are not the state's entries"
    );
    drop(read);
    let t = Instant::now();
    let swept = full.datapath.sweep_expired(SystemTime::now())?;
    let sweep = t.elapsed();
    ensure!(
        swept == 0,
        "sweep removed {swept} blocks (none has expired)"
    );

    let baseline = Baseline::load(BASELINE_PROGRAM)?;
    let packets: Vec<Vec<u8>> = cases.iter().map(Case::frame).collect();
    let base_packet = Frame::syn(IpAddr::V4(PASS), SMTP).flags(ACK).build();
    // Each case takes its path on both states: one run moves exactly its
    // own decision counter.
    for loaded in [&empty, &full] {
        for (case, packet) in cases.iter().zip(&packets) {
            let before = loaded.datapath.counters()?;
            measure(case.id, case.expected(), || {
                Ok(loaded.datapath.test_run_xdp(packet, 1)?)
            })?;
            let after = loaded.datapath.counters()?;
            let decided = [
                after.passed - before.passed,
                after.allowed - before.allowed,
                after.dropped_block - before.dropped_block,
                after.dropped_block_net - before.dropped_block_net,
                after.dropped_cap - before.dropped_cap,
                after.ignored - before.ignored,
                after.expired_block - before.expired_block,
            ];
            ensure!(
                (case.counter)(&after) - (case.counter)(&before) == 1
                    && decided.iter().sum::<u64>() == 1,
                "WRONG PATH: {} did not move exactly its own counter once",
                case.id
            );
        }
    }
    let repeat = options.repeat;
    let warm = (repeat / 10).max(1);
    for loaded in [&empty, &full] {
        for (case, packet) in cases.iter().zip(&packets) {
            measure(case.id, case.expected(), || {
                Ok(loaded.datapath.test_run_xdp(packet, warm)?)
            })?;
        }
    }
    let mut samples = vec![(Vec::new(), Vec::new()); cases.len()];
    let mut base = Vec::new();
    let started = Instant::now();
    for round in 0..options.rounds {
        check_bpf_stats()?;
        base.push(measure("empty program", XDP_PASS, || {
            baseline.run(&base_packet, repeat)
        })?);
        for k in 0..cases.len() {
            let i = (k + round) % cases.len();
            let (case, packet) = (&cases[i], &packets[i]);
            let order: [(&Loaded, bool); 2] = if (round + k) % 2 == 0 {
                [(&empty, false), (&full, true)]
            } else {
                [(&full, true), (&empty, false)]
            };
            for (loaded, is_full) in order {
                let ns = measure(case.id, case.expected(), || {
                    Ok(loaded.datapath.test_run_xdp(packet, repeat)?)
                })?;
                if is_full {
                    samples[i].1.push(ns);
                } else {
                    samples[i].0.push(ns);
                }
            }
        }
        base.push(measure("empty program", XDP_PASS, || {
            baseline.run(&base_packet, repeat)
        })?);
        eprintln!(
            "  round {}/{} ({:.1} s so far)",
            round + 1,
            options.rounds,
            started.elapsed().as_secs_f64()
        );
    }
    // Last, as it changes the full state: networks removed one by one, each
    // keeping the prefilter bits the remaining networks need.
    let removing: Vec<IpNet> = state
        .nets
        .iter()
        .rev()
        .take(NETS_REMOVED)
        .copied()
        .collect();
    let t = Instant::now();
    for net in &removing {
        ensure!(full.datapath.unblock(*net)?, "{net} was not in the kernel");
    }
    let remove_nets = t.elapsed();
    Ok(KernelResult {
        sizes,
        memory,
        fill,
        entries: state.len(),
        mem_available_drop_kib,
        samples,
        baseline: base,
        read_all,
        sweep,
        read_count,
        removed_nets: removing.len(),
        remove_nets,
    })
}

fn print_kernel(options: &Options, cases: &[Case], r: &KernelResult) {
    println!();
    println!(
        "## Kernel maps (BLOCK max_entries {}, BLOCK_NET max_entries {})",
        group(r.sizes.block),
        group(r.sizes.block_net)
    );
    println!();
    let header: Vec<&str> = r.memory.iter().map(|(l, _)| l.as_str()).collect();
    println!("| map (memlock, MiB) | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(header.len()));
    let names: Vec<&str> = r.memory[0].1.iter().map(|m| m.name).collect();
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<String> = r
            .memory
            .iter()
            .map(|(_, maps)| {
                format!(
                    "{} ({} max)",
                    mib(maps[i].memlock as f64),
                    group(maps[i].max_entries)
                )
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let totals: Vec<String> = r
        .memory
        .iter()
        .map(|(_, maps)| {
            format!(
                "**{}**",
                mib(maps.iter().map(|m| m.memlock).sum::<u64>() as f64)
            )
        })
        .collect();
    println!("| total | {} |", totals.join(" | "));
    println!();
    println!(
        "Filling the maps through `Datapath::block`: {:.1} s for {} entries ({:.2} µs each); MemAvailable fell by {} MiB meanwhile (rough: shared machine).",
        r.fill.as_secs_f64(),
        group(r.entries as u64),
        r.fill.as_secs_f64() * 1e6 / r.entries as f64,
        mib(r.mem_available_drop_kib as f64 * 1024.0)
    );
    println!(
        "Every 10 s the agent reads every block (`Datapath::blocks`: {:.2} s for {}) and sweeps expired ones (`sweep_expired`, nothing expired: {:.2} s).",
        r.read_all.as_secs_f64(),
        group(r.read_count as u64),
        r.sweep.as_secs_f64()
    );
    println!(
        "Removing {} networks one by one (`Datapath::unblock`, as a reload that shortens a reject list does): {:.1} ms ({:.1} µs each).",
        group(r.removed_nets as u64),
        r.remove_nets.as_secs_f64() * 1e3,
        r.remove_nets.as_secs_f64() * 1e6 / r.removed_nets.max(1) as f64
    );
    println!();
    println!(
        "Per-packet cost, BPF_PROG_TEST_RUN, {} rounds × repeat {}; empty XDP program median {:.0} ns (min–max {:.0}–{:.0}).",
        options.rounds,
        group(options.repeat),
        median(&r.baseline),
        min_max(&r.baseline).0,
        min_max(&r.baseline).1
    );
    println!();
    println!(
        "| case | verdict | empty state ns | full state ns | full min–max | full ÷ empty state (same-round median) | full ÷ empty program |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    let base = median(&r.baseline);
    for (case, (empty, full)) in cases.iter().zip(&r.samples) {
        let ratios: Vec<f64> = full.iter().zip(empty).map(|(f, e)| f / e).collect();
        let (lo, hi) = min_max(full);
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} |",
            case.id,
            if case.kind == Kind::Drop {
                "DROP"
            } else {
                "PASS"
            },
            median(empty),
            median(full),
            lo,
            hi,
            median(&ratios),
            median(full) / base
        );
    }
    println!();
    for case in cases {
        println!("- `{}`: {}", case.id, case.label);
    }
}

// ---------------------------------------------------------------------------
// Part 3: the agent, started on the state

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Start {
    Empty,
    Cold,
    Warm,
}

impl Start {
    fn label(self) -> &'static str {
        match self {
            Start::Empty => "no state",
            Start::Cold => "full state, no pins (after a reboot)",
            Start::Warm => "full state, maps still pinned (agent restart)",
        }
    }
}

#[derive(Default, Clone)]
struct StartSample {
    /// From spawn to the log lines: kernel layer up, stored blocks loaded,
    /// listening; then the control socket accepting.
    kernel: f64,
    restored: f64,
    listening: f64,
    control: f64,
    rss_kib: u64,
    hwm_kib: u64,
    cpu: f64,
    stop: f64,
    stored: u64,
    restored_to_kernel: u64,
    /// CPU per second while idle (sweep + save), if measured.
    idle_cpu: Option<f64>,
    idle_saves: Option<u32>,
    /// Administrator operations on the running agent (first round only).
    ops: Option<Ops>,
}

/// What the administrator's operations cost on a running agent: `block
/// list`, a metrics scrape, one new block, and what a scrape does to the
/// accept latency of new SMTP clients.
#[derive(Default, Clone)]
struct Ops {
    /// `smtp-limiter block list --json`: seconds and bytes printed, or the
    /// seconds after which the CLI gave up (`Err`).
    list: Option<Result<(f64, u64), f64>>,
    /// `smtp-limiter block list --limit 100` (if the CLI knows `--limit`).
    list_limited: Option<f64>,
    /// `smtp-limiter block check ADDR` (if the CLI knows it).
    check: Option<f64>,
    /// `GET /metrics`, seconds each.
    scrapes: Vec<f64>,
    /// `smtp-limiter block add`: the CLI's round trip.
    write_cli: f64,
    /// From the start of `block add` until a file of the state directory
    /// changed (the block on disk), if it did within 30 s.
    write_disk: Option<f64>,
    /// Connect until the 220 greeting, seconds, with no scrape running.
    accept_idle: Vec<f64>,
    /// The same while scrapes run back to back.
    accept_scrape: Vec<f64>,
    /// Scrapes completed while `accept_scrape` was measured.
    scrapes_during: usize,
    /// The agent was killed: the main loop was still busy after `block list`.
    killed: bool,
}

/// The running agent; SIGKILL and reaped on drop if still running.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    tail: Vec<String>,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `needle`; returns when it was read.
    fn wait_for(&mut self, needle: &str, deadline: Instant) -> Result<(Instant, String)> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    if self.tail.len() >= 20 {
                        self.tail.remove(0);
                    }
                    self.tail.push(line.clone());
                    if line.contains(needle) {
                        return Ok((at, line));
                    }
                }
                Err(_) => bail!(
                    "the agent did not log {needle:?} in time (exit status {:?}); its last lines:\n{}",
                    self.child.try_wait().ok().flatten(),
                    self.tail.join("\n")
                ),
            }
        }
    }

    /// SIGTERM; returns how long it took to exit.
    fn stop(&mut self, timeout: Duration) -> Result<Duration> {
        let t = Instant::now();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "the agent exited with {status}");
                return Ok(t.elapsed());
            }
            if t.elapsed() > timeout {
                bail!("the agent did not stop within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Agent {
    /// SIGKILL and reap (an agent whose main loop cannot answer SIGTERM).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn json_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

struct Rig {
    // Field order: the link goes before its namespaces.
    link: netns::Link,
    client: NetNs,
    server: NetNs,
    dir: PathBuf,
    pins: Dir,
    config: PathBuf,
    binary: PathBuf,
}

impl Rig {
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Empties the state directory, then puts `snapshot` there if given.
    fn reset_state(&self, snapshot: Option<&Path>) -> Result<()> {
        let dir = self.state_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        if let Some(master) = snapshot {
            std::fs::copy(master, dir.join(state::SNAPSHOT_FILE))?;
        }
        Ok(())
    }

    fn spawn(&self) -> Result<Agent> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(["run", "--json-logs", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let ns = std::fs::File::open(self.server.path())
            .with_context(|| format!("opening {}", self.server.path()))?;
        // SAFETY: setns and prctl are async-signal-safe; the fd stays open
        // until the closure is dropped with `cmd`.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        let stderr = child.stderr.take().context("the agent's stderr")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Agent {
            child,
            lines,
            tail: Vec::new(),
        })
    }
}

fn agent_binary(options: &Options) -> Result<PathBuf> {
    let path = match &options.agent {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("smtp-limiter"),
    };
    ensure!(
        path.is_file(),
        "no agent binary at {}: run `cargo xtask build --release` (or pass --agent)",
        path.display()
    );
    Ok(path)
}

/// Start samples per kind of start.
type StartResults = Vec<(Start, Vec<StartSample>)>;

fn start_part(
    options: &Options,
    state: &StateSet,
    tmp: &Path,
) -> Result<(StartResults, Vec<String>)> {
    let binary = agent_binary(options)?;
    let server = NetNs::new(PREFIX)?;
    let client = NetNs::new(PREFIX)?;
    let link = netns::link(&server, &client, "st")?;
    let dir = tmp.join("agent");
    std::fs::create_dir_all(dir.join("state"))?;
    let pins = Dir::new("/sys/fs/bpf", "agent");
    let sizes = sizes_for(state);
    let blocked_client = link.client_v4s[1];
    let allowed_client = link.client_v4s[0];
    let max_blocks = options
        .max_blocks
        .unwrap_or(state.len() + 1 + (state.len() + 1) / 10);
    let config = dir.join("state-bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"mode = "enforce"
[[listen]]
address = "{server}:{SMTP}"
tls = "none"
[backend]
address = "127.0.0.1:10026"
identity = "none"
builtin = true
[kernel]
mode = "required"
interfaces = ["{interface}"]
attach = "xdp"
pin_path = "{pins}"
ports = [{SMTP}]
[kernel.map_sizes]
block = {block}
block_net = {block_net}
[control]
socket = "{dir}/control.sock"
[metrics]
address = "127.0.0.1:9425"
[state]
directory = "{dir}/state"
max_blocks = {max_blocks}
"#,
            server = link.server_v4,
            interface = link.server_if,
            pins = pins.0.display(),
            block = sizes.block,
            block_net = sizes.block_net,
            dir = dir.display(),
        ),
    )?;
    let rig = Rig {
        link,
        client,
        server,
        dir: dir.clone(),
        pins,
        config,
        binary,
    };

    // The state file, once; copied into place before each start.
    let now = SystemTime::now();
    let mut stored = stored_blocks(state, now);
    stored.push(StoredBlock::from(&active(
        IpNet::from(IpAddr::V4(blocked_client)),
        None,
        now,
    )));
    let master_dir = tmp.join("master");
    let t = Instant::now();
    Store::open(&master_dir)?.save(&stored)?;
    eprintln!(
        "start: state file of {} blocks written in {:.2} s",
        group(stored.len() as u64),
        t.elapsed().as_secs_f64()
    );
    let master = master_dir.join(state::SNAPSHOT_FILE);
    let expected = stored.len() as u64;
    drop(stored);

    let mut checks = Vec::new();
    let mut results: Vec<(Start, Vec<StartSample>)> = [Start::Empty, Start::Cold, Start::Warm]
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    for round in 0..options.starts {
        let order = if round % 2 == 0 {
            [Start::Empty, Start::Cold, Start::Warm]
        } else {
            [Start::Cold, Start::Warm, Start::Empty]
        };
        let last = round + 1 == options.starts;
        for kind in order {
            let sample = start_once(
                &rig,
                kind,
                &master,
                expected,
                round == 0,
                if last { options.idle } else { 0 },
                state,
                (allowed_client, blocked_client),
                &mut checks,
            )
            .with_context(|| format!("start {} of round {}", kind.label(), round + 1))?;
            eprintln!(
                "  round {}: {}: listening after {:.2} s, control after {:.2} s, RSS {} MiB, stopped in {:.2} s",
                round + 1,
                kind.label(),
                sample.listening,
                sample.control,
                mib(sample.rss_kib as f64 * 1024.0),
                sample.stop
            );
            results
                .iter_mut()
                .find(|(k, _)| *k == kind)
                .expect("listed")
                .1
                .push(sample);
        }
    }
    drop(rig);
    Ok((results, checks))
}

#[expect(
    clippy::too_many_arguments,
    reason = "one start's inputs, named at the call"
)]
fn start_once(
    rig: &Rig,
    kind: Start,
    master: &Path,
    expected: u64,
    verify: bool,
    idle: u64,
    state: &StateSet,
    (allowed, blocked): (Ipv4Addr, Ipv4Addr),
    checks: &mut Vec<String>,
) -> Result<StartSample> {
    let state_dir = rig.state_dir();
    match kind {
        Start::Empty => {
            rig.reset_state(None)?;
            let _ = std::fs::remove_dir_all(&rig.pins.0);
        }
        Start::Cold => {
            rig.reset_state(Some(master))?;
            let _ = std::fs::remove_dir_all(&rig.pins.0);
        }
        Start::Warm => {
            rig.reset_state(Some(master))?;
            ensure!(rig.pins.0.is_dir(), "warm start without pins");
        }
    }
    let control = rig.dir.join("control.sock");
    let _ = std::fs::remove_file(&control);
    let started = Instant::now();
    let mut agent = rig.spawn()?;
    let deadline = started + Duration::from_secs(600);
    let (kernel_at, _) = agent.wait_for("\"kernel layer\"", deadline)?;
    let (restored_at, line) = agent.wait_for("stored blocks loaded", deadline)?;
    // A missing count is a failure, not 0 (which is what an empty start
    // expects): the log line is the agent's only word on what it loaded.
    let count = |key: &str| {
        json_u64(&line, key).with_context(|| format!("no {key:?} count in the agent's line {line}"))
    };
    let stored = count("stored")?;
    let restored_to_kernel = count("restored_to_kernel")?;
    let (listening_at, _) = agent.wait_for("\"listening\"", deadline)?;
    let control_at = loop {
        if std::os::unix::net::UnixStream::connect(&control).is_ok() {
            break Instant::now();
        }
        ensure!(
            Instant::now() < deadline,
            "the control socket never answered"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let pid = agent.pid().to_string();
    let mut sample = StartSample {
        kernel: (kernel_at - started).as_secs_f64(),
        restored: (restored_at - started).as_secs_f64(),
        listening: (listening_at - started).as_secs_f64(),
        control: (control_at - started).as_secs_f64(),
        rss_kib: status_kib(&pid, "VmRSS")?,
        hwm_kib: status_kib(&pid, "VmHWM")?,
        cpu: cpu_time(agent.pid())?.as_secs_f64(),
        stored,
        restored_to_kernel,
        ..StartSample::default()
    };
    let want_stored = if kind == Start::Empty { 0 } else { expected };
    ensure!(
        stored == want_stored,
        "{}: the agent loaded {stored} stored blocks, expected {want_stored}",
        kind.label()
    );
    let want_restored = if kind == Start::Cold { expected } else { 0 };
    ensure!(
        restored_to_kernel == want_restored,
        "{}: the agent put {restored_to_kernel} blocks into the kernel, expected {want_restored}",
        kind.label()
    );

    if verify && kind != Start::Empty {
        checks.push(verify_agent(rig, kind, expected, state, allowed, blocked)?);
    }
    if verify && kind != Start::Cold {
        let ops =
            operations(rig, allowed).with_context(|| format!("{}: operations", kind.label()))?;
        let killed = ops.killed;
        sample.ops = Some(ops);
        if killed {
            agent.kill();
            sample.stop = f64::NAN;
            return Ok(sample);
        }
    }
    if idle > 0 {
        // The agent sweeps every 10 s (its first tick is at start); a change
        // of the state directory is a write of the store.
        let cpu_before = cpu_time(agent.pid())?;
        let mut saves = 0;
        let mut seen = dir_listing(&state_dir);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(idle) {
            std::thread::sleep(Duration::from_millis(200));
            let m = dir_listing(&state_dir);
            if m != seen {
                saves += 1;
                seen = m;
            }
        }
        let cpu = cpu_time(agent.pid())? - cpu_before;
        sample.idle_cpu = Some(cpu.as_secs_f64() / t.elapsed().as_secs_f64());
        sample.idle_saves = Some(saves);
        sample.hwm_kib = status_kib(&pid, "VmHWM")?;
    }
    sample.stop = agent.stop(Duration::from_secs(300))?.as_secs_f64();
    Ok(sample)
}

/// Counts and probes the pinned maps the agent filled, and checks with real
/// SYNs that a blocked address of the state file is dropped while another
/// client gets the greeting.
fn verify_agent(
    rig: &Rig,
    kind: Start,
    expected: u64,
    state: &StateSet,
    allowed: Ipv4Addr,
    blocked: Ipv4Addr,
) -> Result<String> {
    let maps = BpfDatapath::open_pinned(&rig.pins.0)?;
    let t = Instant::now();
    let blocks = maps.blocks()?;
    let listed = t.elapsed();
    let hosts = blocks
        .iter()
        .filter(|b| b.net.prefix_len() == b.net.max_prefix_len())
        .count();
    let nets = blocks.len() - hosts;
    ensure!(
        blocks.len() as u64 == expected && nets == state.nets.len(),
        "{}: the kernel holds {} blocks ({hosts} addresses, {nets} networks), expected {expected} ({} networks)",
        kind.label(),
        blocks.len(),
        state.nets.len()
    );
    drop(blocks);
    let mut rng = Rng(0xc0ffee);
    let mut probed: u32 = 0;
    for _ in 0..1000 {
        for list in [&state.hosts, &state.nets] {
            let ip = inside(&list[rng.below(list.len() as u64) as usize]);
            ensure!(
                maps.block_covering(ip)?.is_some(),
                "{}: {ip} is not blocked in the kernel",
                kind.label()
            );
            probed += 1;
        }
    }
    for ip in state.misses4.iter().chain(&state.misses6) {
        ensure!(
            maps.block_covering(*ip)?.is_none(),
            "{ip} is blocked in the kernel"
        );
    }
    let before = maps.counters()?;
    let dest = SocketAddr::new(IpAddr::V4(rig.link.server_v4), SMTP);
    let mut stream = connect_from(
        &rig.client,
        IpAddr::V4(allowed),
        dest,
        Duration::from_secs(5),
    )
    .with_context(|| format!("{allowed} (not blocked) could not connect"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut greeting = [0u8; 64];
    let n = stream.read(&mut greeting)?;
    ensure!(
        greeting[..n].starts_with(b"220"),
        "no greeting: {:?}",
        String::from_utf8_lossy(&greeting[..n])
    );
    let _ = stream.write_all(b"QUIT\r\n");
    drop(stream);
    match connect_from(
        &rig.client,
        IpAddr::V4(blocked),
        dest,
        Duration::from_secs(1),
    ) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        Err(e) => bail!("{blocked} (blocked): expected a dropped SYN, got {e}"),
        Ok(_) => bail!("{blocked} (blocked) could connect"),
    }
    let after = maps.counters()?;
    let dropped = after.dropped_block - before.dropped_block;
    ensure!(
        dropped >= 1,
        "the kernel counted no block drop for {blocked}"
    );
    Ok(format!(
        "{}: the pinned maps hold {} blocks ({} addresses, {} networks; listed in {:.2} s); {} probes inside blocked entries all blocked, {} miss probes not; {allowed} got the greeting, {blocked} (in the state file) timed out with {dropped} SYN(s) dropped in the kernel (dropped_block).",
        kind.label(),
        group(expected),
        group(hosts as u64),
        group(nets as u64),
        listed.as_secs_f64(),
        group(probed),
        state.misses4.len() + state.misses6.len(),
    ))
}

/// The address `block add` blocks during the operations (a documentation
/// address the state never holds).
const WRITTEN: &str = "192.0.2.200";
/// How long `block list` may take before the benchmark gives up on it.
const LIST_LIMIT: Duration = Duration::from_secs(60);

/// Runs the CLI against the rig's agent; returns its exit status, the bytes
/// it printed and the seconds it took, or `Err(seconds)` when it was still
/// running after `limit` (then it is killed).
fn cli(rig: &Rig, args: &[&str], limit: Duration) -> Result<Result<(bool, u64, f64), f64>> {
    let started = Instant::now();
    let mut child = Command::new(&rig.binary)
        .args(args)
        .arg("--config")
        .arg(&rig.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} {args:?}", rig.binary.display()))?;
    let mut stdout = child.stdout.take().context("the CLI's stdout")?;
    let counter = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed().as_secs_f64();
            let bytes = counter.join().unwrap_or(0);
            return Ok(Ok((status.success(), bytes, elapsed)));
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = counter.join();
            return Ok(Err(started.elapsed().as_secs_f64()));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One `GET /metrics` from inside the server's namespace; returns seconds.
fn scrape(rig: &Rig) -> Result<f64> {
    let started = Instant::now();
    let mut stream = rig
        .server
        .run(|| std::net::TcpStream::connect(("127.0.0.1", 9425)))
        .context("connecting to the metrics endpoint")?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body)?;
    ensure!(
        body.starts_with(b"HTTP/1.1 200"),
        "metrics answered {:?}",
        String::from_utf8_lossy(&body[..body.len().min(80)])
    );
    Ok(started.elapsed().as_secs_f64())
}

/// Connect from `source` and read the greeting; returns seconds.
fn accept_once(rig: &Rig, source: Ipv4Addr) -> Result<f64> {
    let dest = SocketAddr::new(IpAddr::V4(rig.link.server_v4), SMTP);
    let started = Instant::now();
    let mut stream = connect_from(
        &rig.client,
        IpAddr::V4(source),
        dest,
        Duration::from_secs(30),
    )
    .with_context(|| format!("{source} could not connect"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut greeting = [0u8; 64];
    let n = stream.read(&mut greeting)?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(
        greeting[..n].starts_with(b"220"),
        "no greeting: {:?}",
        String::from_utf8_lossy(&greeting[..n])
    );
    let _ = stream.write_all(b"QUIT\r\n");
    Ok(elapsed)
}

/// Sizes and modification times of the files in a directory.
fn dir_listing(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((e.path(), meta.len(), meta.modified().ok()))
        })
        .collect();
    files.sort();
    files
}

/// The administrator's operations on a running agent, in the order that
/// keeps a stuck main loop from spoiling the others: scrapes and accept
/// latency (neither goes through the main loop), one block, then `block
/// list` last.
fn operations(rig: &Rig, source: Ipv4Addr) -> Result<Ops> {
    let mut ops = Ops::default();
    for _ in 0..5 {
        ops.scrapes.push(scrape(rig)?);
    }
    const CONNECTS: usize = 200;
    for _ in 0..CONNECTS {
        ops.accept_idle.push(accept_once(rig, source)?);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraped = std::thread::scope(|scope| -> Result<usize> {
        let stop_flag = stop.clone();
        let scraper = scope.spawn(move || -> Result<usize> {
            let mut n = 0;
            while !stop_flag.load(std::sync::atomic::Ordering::Relaxed) {
                scrape(rig)?;
                n += 1;
            }
            Ok(n)
        });
        let t = Instant::now();
        let mut result = Ok(());
        while ops.accept_scrape.len() < CONNECTS && t.elapsed() < Duration::from_secs(20) {
            match accept_once(rig, source) {
                Ok(s) => ops.accept_scrape.push(s),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = scraper
            .join()
            .map_err(|_| anyhow::anyhow!("the scraper panicked"))??;
        result.map(|()| n)
    })?;
    ops.scrapes_during = scraped;

    let state_dir = rig.dir.join("state");
    let before = dir_listing(&state_dir);
    let t = Instant::now();
    match cli(
        rig,
        &["block", "add", WRITTEN, "--for", "1h", "--reason", "manual"],
        Duration::from_secs(60),
    )? {
        Ok((true, _, secs)) => ops.write_cli = secs,
        Ok((false, _, _)) => bail!("block add {WRITTEN} failed"),
        Err(secs) => bail!("block add {WRITTEN} took over {secs:.0} s"),
    }
    while t.elapsed() < Duration::from_secs(30) {
        if dir_listing(&state_dir) != before {
            ops.write_disk = Some(t.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }

    if let Ok(Ok((true, _, secs))) = cli(rig, &["block", "check", WRITTEN], Duration::from_secs(60))
    {
        ops.check = Some(secs);
    }
    if let Ok(Ok((true, _, secs))) = cli(
        rig,
        &["block", "list", "--limit", "100"],
        Duration::from_secs(60),
    ) {
        ops.list_limited = Some(secs);
    }
    ops.list = Some(match cli(rig, &["block", "list", "--json"], LIST_LIMIT)? {
        Ok((true, bytes, secs)) => Ok((secs, bytes)),
        Ok((false, _, secs)) => Err(secs),
        Err(secs) => Err(secs),
    });
    if matches!(ops.list, Some(Err(_))) {
        // The CLI gave up; the agent's main loop may still be listing. It
        // answers a request only once that is done.
        ops.killed = !matches!(
            cli(rig, &["stats"], Duration::from_secs(5))?,
            Ok((true, _, _))
        );
    }
    Ok(ops)
}

fn print_ops(results: &[(Start, Vec<StartSample>)]) {
    let rows: Vec<(Start, &Ops)> = results
        .iter()
        .filter_map(|(k, s)| s.iter().find_map(|s| s.ops.as_ref()).map(|o| (*k, o)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("## Administrator operations on the running agent (first round)");
    println!();
    println!(
        "Accept latency: connect from the client namespace until the 220 greeting, {} connects one after the other; \"during scrapes\": while another thread scrapes `/metrics` back to back.",
        rows[0].1.accept_idle.len()
    );
    println!();
    println!(
        "| figure | {} |",
        rows.iter()
            .map(|(k, _)| k.label())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---:|".repeat(rows.len()));
    let line = |label: &str, f: &dyn Fn(&Ops) -> String| {
        println!(
            "| {label} | {} |",
            rows.iter()
                .map(|(_, o)| f(o))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    };
    let ms = |v: f64| format!("{:.1} ms", v * 1e3);
    line("`block list --json` (whole list)", &|o| match o.list {
        Some(Ok((secs, bytes))) => format!("{secs:.2} s ({} MiB)", mib(bytes as f64)),
        Some(Err(secs)) => format!(
            "gave up after {secs:.0} s{}",
            if o.killed {
                " (agent's main loop still busy: killed)"
            } else {
                ""
            }
        ),
        None => "-".into(),
    });
    line("`block list --limit 100`", &|o| {
        o.list_limited.map_or("(not in this CLI)".into(), ms)
    });
    line("`block check ADDR`", &|o| {
        o.check.map_or("(not in this CLI)".into(), ms)
    });
    line("scrape `GET /metrics` (median of 5)", &|o| {
        ms(median(&o.scrapes))
    });
    line("`block add` (CLI round trip)", &|o| ms(o.write_cli));
    line("`block add` until the state directory changed", &|o| {
        o.write_disk.map_or("not within 30 s".into(), ms)
    });
    let pct = |v: &[f64], p: f64| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    line("accept latency, idle: median / p99 / max", &|o| {
        format!(
            "{} / {} / {}",
            ms(median(&o.accept_idle)),
            ms(pct(&o.accept_idle, 0.99)),
            ms(pct(&o.accept_idle, 1.0))
        )
    });
    line("accept latency during scrapes: median / p99 / max", &|o| {
        format!(
            "{} / {} / {}",
            ms(median(&o.accept_scrape)),
            ms(pct(&o.accept_scrape, 0.99)),
            ms(pct(&o.accept_scrape, 1.0))
        )
    });
    line("connects / scrapes completed during scrapes", &|o| {
        format!("{} / {}", o.accept_scrape.len(), o.scrapes_during)
    });
}

fn print_start(results: &[(Start, Vec<StartSample>)], checks: &[String]) {
    println!();
    println!("## Agent start (`smtp-limiter run`, kernel.mode = \"required\", XDP on a veth)");
    println!();
    println!(
        "Seconds from spawn (median of the starts, min–max in brackets); RSS at ready; CPU = the agent's user+system time until ready."
    );
    println!();
    println!(
        "| state at start | starts | blocks loaded / put into the kernel | kernel layer up | stored blocks loaded | listening | control socket answers | VmRSS MiB | CPU s | stop (incl. final save) s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (kind, samples) in results {
        if samples.is_empty() {
            continue;
        }
        let cell = |f: fn(&StartSample) -> f64| {
            let v: Vec<f64> = samples.iter().map(f).collect();
            let (lo, hi) = min_max(&v);
            format!("{:.2} ({:.2}–{:.2})", median(&v), lo, hi)
        };
        println!(
            "| {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
            kind.label(),
            samples.len(),
            group(samples[0].stored),
            group(samples[0].restored_to_kernel),
            cell(|s| s.kernel),
            cell(|s| s.restored),
            cell(|s| s.listening),
            cell(|s| s.control),
            cell(|s| s.rss_kib as f64 / 1024.0),
            cell(|s| s.cpu),
            cell(|s| s.stop),
        );
    }
    println!();
    for (kind, samples) in results {
        if let Some(s) = samples.iter().find(|s| s.idle_cpu.is_some()) {
            println!(
                "- idle, {}: {:.1} % of a CPU ({} state-file saves seen), peak RSS (VmHWM) {} MiB",
                kind.label(),
                s.idle_cpu.unwrap_or(0.0) * 100.0,
                s.idle_saves.unwrap_or(0),
                mib(s.hwm_kib as f64 * 1024.0)
            );
        }
    }
    for check in checks {
        println!("- check: {check}");
    }
}

// ---------------------------------------------------------------------------

fn main() -> Result<()> {
    let options = parse_options()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "state-bench needs root (BPF, network namespaces)"
    );
    ensure!(
        ebpf_object().is_some() && baseline_object().is_file(),
        "no eBPF objects at {}: run `cargo xtask build-ebpf`",
        object_path().display()
    );
    check_bpf_stats()?;
    remove_stale()?;
    let tmp = Dir::new("/tmp", "files");
    std::fs::create_dir_all(&tmp.0)?;
    let started = Instant::now();
    let load_start = load_average();
    let state = StateSet::generate(options.addresses, options.nets);
    let (h6, n6) = state.v6_counts();
    println!("# state-bench: scale of state");
    println!();
    println!(
        "kernel {}, {} CPUs, load average at start {load_start}",
        read_trimmed("/proc/sys/kernel/osrelease"),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "state: {} blocked addresses ({} IPv6) + {} blocked networks ({} IPv6; IPv4 /16–/30, IPv6 /32, /48, /64); 9 in 10 with an expiry",
        group(state.hosts.len() as u64),
        group(h6 as u64),
        group(state.nets.len() as u64),
        group(n6 as u64)
    );
    let mut out = String::new();
    let cases = cases();
    if options.parts.contains(&Part::Proxy) {
        let r = proxy_part(&options, &state, &tmp.0)?;
        print_proxy(&r);
    }
    if options.parts.contains(&Part::Kernel) {
        let r = kernel_part(&options, &state, &cases)?;
        print_kernel(&options, &cases, &r);
    }
    if options.parts.contains(&Part::Start) {
        let (results, checks) = start_part(&options, &state, &tmp.0)?;
        print_start(&results, &checks);
        print_ops(&results);
    }
    let _ = writeln!(
        out,
        "\nload average at start {load_start}, at end {}; took {:.0} s.",
        load_average(),
        started.elapsed().as_secs_f64()
    );
    print!("{out}");
    Ok(())
}
