//! `syn-bench`: what refusing a SYN from a blocked or over-cap source costs
//! the receiving machine, end to end, for the product's XDP program and the
//! alternatives: a trivial `XDP_DROP` program (the floor), an nftables set
//! lookup (netdev ingress, inet prerouting, inet input), no filter at all
//! (the SYN reaches a listener and is answered), and a connection accepted
//! and closed by a userspace server.
//!
//! Run it with `cargo xtask bench -- --only syn [ARGS]` (builds the eBPF
//! objects first), as root. All traffic stays inside the network namespaces
//! it creates (`slb-syn-<pid>-<n>`), which are removed at the end.
//!
//! Method (see /work/shared/BENCHMARKING.md, "Cost of refusing a SYN"):
//!
//! - **Generator**: `bench_redirect` (limiter-ebpf's `limiter-baseline`) run
//!   by `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` and a fixed
//!   repeat count, in a client namespace: it redirects every frame out of a
//!   veth, whose peer (in the setup's server namespace) receives it like a
//!   frame from a NIC's ring. Bounded by the count (in chunks, with a
//!   deadline between chunks).
//! - **One veth pair per setup**, each with its own server namespace, so no
//!   setup is reconfigured between rounds: the product's `limiter_xdp`
//!   (source in BLOCK_V4; a second frame from a source at its connection
//!   cap; both again from IPv6 sources), `baseline_drop`, nftables `ip saddr
//!   @set counter drop` in a netdev ingress, an inet prerouting and an inet
//!   input chain, `ip6 saddr @set counter drop` in a netdev ingress of its
//!   own (IPv6 frames), and a listener on
//!   port 25 with `tcp_syncookies = 2`; plus a pair for real connections.
//!   Threaded NAPI on every veth end, GRO on and TSO off on both ends; the
//!   receiving NAPI threads are pinned to `--rx-cpu`, the generator (and the
//!   client ends' NAPI threads) to `--gen-cpu`. The client ends of the SYN
//!   pairs run `baseline_drop`, so the answers of the listener setup cost
//!   the client namespace nothing beyond an XDP drop, on the other CPU.
//! - **Where the generator runs** (`--gen-cpu`, `--rx-cpu`): apart by
//!   default (0 and 1). Then the receiver pays for more than its own work:
//!   the frames are pages of the generator's page pool, the receiver returns
//!   each dropped frame into that pool's ring (under the ring's producer
//!   lock), and the generator returns there, from the other CPU, every frame
//!   the full veth ring refused (most of them). The two CPUs contend for the
//!   lock and its cache line, the more the slower the receiver, so any work
//!   a setup does per frame comes back several times over (`perf`: the
//!   receiver's time in `page_pool_put_unrefed_netmem`'s spin lock). A NIC's
//!   driver recycles its pages into a pool of its own on the receiving CPU.
//!   With the same CPU for both (`--gen-cpu 1 --rx-cpu 1`) the returns stay
//!   on one CPU and uncontended, and the NAPI thread polls full batches of
//!   64 between the generator's batches: closer to a NIC's recycling, but
//!   the frames are warm in that CPU's cache (a NIC's arrive cold, or in
//!   the last-level cache).
//!   `--gen-rate` paces the generator instead (fewer refused frames, but
//!   the receiver then sleeps between short runs and its wake-ups dominate).
//! - **Receive CPU per SYN** = the receiving NAPI thread's CPU time
//!   (`/proc/PID/schedstat`) / the packets it processed (veth
//!   `rx_queue_0_xdp_packets`). Per connection: that NAPI thread's time plus
//!   the accept+close server thread's CPU time, over the connections.
//! - **Rounds**: every round measures every setup once, the order rotated
//!   from round to round; reported are medians over rounds, the range, and
//!   ratios as the median of same-round ratios.
//! - **Checks, every round**: frames sent = frames put into the receiving
//!   ring + ring drops (the client veth's `tx_queue_0_xdp_xmit` and
//!   `_errors`), frames in the ring = frames processed; the drop counter
//!   equals the frames processed (product: its STATS counter for the reason;
//!   floor: the veth's XDP drop counter; nftables: the rule's counter; no
//!   filter: `TcpExtSyncookiesSent`, and the client end dropped as many
//!   SYN-ACKs); every connection accepted once and closed (EOF seen).

use std::{
    collections::HashMap as StdHashMap,
    fmt::Write as _,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf,
};
use ipnet::IpNet;
use limiter_common::Reason;
use limiter_tests::{
    kernel::{baseline_object, ebpf_object, object_path, TestKernel},
    netns::{ip, NetNs},
    stats::{load_average, median, min_max},
};
use limiter_user::kernel::{AttachMode, Datapath, KernelLimits, MapSizes};

const USAGE: &str = "\
syn-bench: receive-side CPU per refused SYN (product XDP, trivial XDP_DROP,
nftables, no filter) and per connection accepted and closed in userspace

usage: cargo xtask bench -- --only syn [OPTIONS]
       cargo run --release -p limiter-tests --bin syn-bench -- [OPTIONS]

options:
  --rounds N        interleaved rounds (default 9)
  --frames N        frames the generator sends per setup and round
                    (default 2000000)
  --connections N   connections per round for the accept+close setup
                    (default 2000)
  --set-size N      addresses in each nftables set and in each of the
                    product's BLOCK_V4 and BLOCK_V6 maps besides the blocked
                    source (default 10000)
  --gen-cpu N       CPU of the generator (default 0)
  --rx-cpu N        CPU of the receiving NAPI threads and of the server
                    (default 1); the same as --gen-cpu: no contention with
                    the generator for its page pool (see the method in
                    the source)
  --gen-rate N      hold the generator to N frames per second (default 0:
                    as fast as it can)
  --setups LIST     only these setups, comma-separated ids (e.g. for
                    profiling one with `perf record`); the summary needs
                    product, floor, nft-ingress and no-filter
  --quick           smoke run: 3 rounds, 200000 frames, 300 connections,
                    set of 1000 (explicit options still win)
  -h, --help        this text

Needs root, nft (nftables), ethtool and the eBPF objects
(`cargo xtask build-ebpf`). Run measuring runs under
`flock /tmp/smtp-limiter-bench.lock`.";

/// Targets from the issue (ratios of medians of same-round ratios).
const FLOOR_TARGET: f64 = 1.6;
const NFT_TARGET: f64 = 4.0;
const NO_FILTER_TARGET: f64 = 15.0;

const NS_PREFIX: &str = "slb-syn";
const SMTP: u16 = 25;
/// The blocked source (in BLOCK and in the nftables sets).
const BLOCKED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// A source holding as many connections as the product's cap allows.
const AT_CAP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// Filler addresses for the sets and BLOCK start here.
const FILLER_BASE: u32 = u32::from_be_bytes([10, 0, 0, 0]);
/// The IPv6 sources (blocked; at its cap) and fillers (fd00::/8).
const BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const AT_CAP_V6: Ipv6Addr = Ipv6Addr::new(0x3fff, 0, 0, 0x10, 0, 0, 0, 1);
const FILLER_BASE_V6: u128 = 0xfd00_0000_0000_0000_0000_0000_0000_0000;
/// The server address of the IPv6 frames (the server ends have IPv6 off:
/// every setup that sees them drops them before the IP stack).
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
/// The server address in every SYN server namespace.
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The connection pair's addresses.
const CONN_SERVER: Ipv4Addr = Ipv4Addr::new(10, 200, 7, 1);
const CONN_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 7, 2);
const SOURCE_PORT: u16 = 40000;

/// The generator runs at most this many frames per syscall and stops when
/// a measurement takes longer than `GENERATOR_DEADLINE`.
const GENERATOR_CHUNK: u32 = 250_000;
const GENERATOR_DEADLINE: Duration = Duration::from_secs(20);
/// Frames per live-frames batch (the kernel's default, NAPI_POLL_WEIGHT).
const GENERATOR_BATCH: u32 = 64;
/// How long the receiving ring is given to drain after the generator.
const DRAIN: Duration = Duration::from_millis(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CONN_DEADLINE: Duration = Duration::from_secs(60);

const BASELINE_DROP: &str = "baseline_drop";
const BASELINE_READ: &str = "baseline_read";
const BASELINE_LOOKUP: &str = "baseline_lookup";
const GENERATOR: &str = "bench_redirect";
const GENERATOR_PACED: &str = "bench_redirect_paced";
const REDIRECT_MAP: &str = "REDIRECT_TO";
const PACE_MAP: &str = "PACE";

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
struct Options {
    rounds: usize,
    frames: u64,
    connections: usize,
    set_size: u32,
    gen_cpu: usize,
    rx_cpu: usize,
    /// Only these setup ids (all when empty).
    only: Vec<String>,
    quick: bool,
    /// Frames per second the generator is held to (0: as fast as it can).
    gen_rate: u64,
}

fn parse_options() -> Result<Options> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Options {
        rounds: if quick { 3 } else { 9 },
        frames: if quick { 200_000 } else { 2_000_000 },
        connections: if quick { 300 } else { 2_000 },
        set_size: if quick { 1_000 } else { 10_000 },
        gen_cpu: 0,
        rx_cpu: 1,
        only: Vec::new(),
        quick,
        gen_rate: 0,
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
        let mut number = |name: &str, range: std::ops::RangeInclusive<u64>| -> Result<u64> {
            let v: u64 = value(name)?
                .replace('_', "")
                .parse()
                .with_context(|| format!("{name}: not a number"))?;
            ensure!(
                range.contains(&v),
                "{name} must be between {} and {}",
                range.start(),
                range.end()
            );
            Ok(v)
        };
        match name.as_str() {
            "--quick" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--rounds" => o.rounds = number(&name, 1..=1000)? as usize,
            "--frames" => o.frames = number(&name, 1_000..=100_000_000)?,
            "--connections" => o.connections = number(&name, 10..=20_000)? as usize,
            "--set-size" => o.set_size = number(&name, 0..=1_000_000)? as u32,
            "--gen-cpu" => o.gen_cpu = number(&name, 0..=1023)? as usize,
            "--rx-cpu" => o.rx_cpu = number(&name, 0..=1023)? as usize,
            "--gen-rate" => o.gen_rate = number(&name, 0..=100_000_000)?,
            "--setups" => {
                let known: Vec<&str> = setups().iter().map(|s| s.id).collect();
                for id in value(&name)?.split(',') {
                    let id = id.trim();
                    ensure!(
                        known.contains(&id),
                        "--setups: unknown setup {id:?}; known: {}",
                        known.join(", ")
                    );
                    o.only.push(id.to_owned());
                }
            }
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Setups

/// The veth pairs, one per kind of receiver.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pair {
    Product,
    Floor,
    FloorRead,
    FloorLookup,
    NftIngress,
    /// nftables netdev ingress with an IPv6 set (its own table and pair).
    NftIngressV6,
    NftPrerouting,
    NftInput,
    NoFilter,
    Connect,
}

const PAIRS: [Pair; 10] = [
    Pair::Product,
    Pair::Floor,
    Pair::FloorRead,
    Pair::FloorLookup,
    Pair::NftIngress,
    Pair::NftIngressV6,
    Pair::NftPrerouting,
    Pair::NftInput,
    Pair::NoFilter,
    Pair::Connect,
];

/// What counts the refusals of a setup.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Counter {
    ProductBlock,
    ProductCap,
    XdpDrops,
    Nft,
    Syncookies,
    /// Connections accepted (the connection setup).
    Accepted,
}

struct Setup {
    id: &'static str,
    label: &'static str,
    pair: Pair,
    source: IpAddr,
    counter: Counter,
    /// The product's drop events on (`events_per_second` default) or off.
    events: bool,
}

fn setups() -> Vec<Setup> {
    vec![
        Setup {
            id: "product",
            label: "product XDP (limiter_xdp), source in BLOCK",
            pair: Pair::Product,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::ProductBlock,
            events: true,
        },
        Setup {
            id: "product-cap",
            label: "product XDP, source at its cap (drop-cap)",
            pair: Pair::Product,
            source: IpAddr::V4(AT_CAP),
            counter: Counter::ProductCap,
            events: true,
        },
        Setup {
            id: "product-v6",
            label: "product XDP, IPv6 source in BLOCK_V6",
            pair: Pair::Product,
            source: IpAddr::V6(BLOCKED_V6),
            counter: Counter::ProductBlock,
            events: true,
        },
        Setup {
            id: "product-cap-v6",
            label: "product XDP, IPv6 source (its /64) at its cap",
            pair: Pair::Product,
            source: IpAddr::V6(AT_CAP_V6),
            counter: Counter::ProductCap,
            events: true,
        },
        Setup {
            id: "product-ev0",
            label: "extra: product XDP, source in BLOCK, events_per_second = 0",
            pair: Pair::Product,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::ProductBlock,
            events: false,
        },
        Setup {
            id: "floor",
            label: "trivial XDP_DROP (baseline_drop)",
            pair: Pair::Floor,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::XdpDrops,
            events: true,
        },
        Setup {
            id: "floor-read",
            label: "extra: XDP that reads the IPv4 source, then drops (baseline_read)",
            pair: Pair::FloorRead,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::XdpDrops,
            events: true,
        },
        Setup {
            id: "floor-lookup",
            label: "extra: XDP that looks the IPv4 source up in a hash map, then drops (baseline_lookup)",
            pair: Pair::FloorLookup,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::XdpDrops,
            events: true,
        },
        Setup {
            id: "nft-ingress",
            label: "nftables netdev ingress, ip saddr @set drop",
            pair: Pair::NftIngress,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::Nft,
            events: true,
        },
        Setup {
            id: "nft-ingress-v6",
            label: "nftables netdev ingress, ip6 saddr @set drop (IPv6 frames)",
            pair: Pair::NftIngressV6,
            source: IpAddr::V6(BLOCKED_V6),
            counter: Counter::Nft,
            events: true,
        },
        Setup {
            id: "nft-prerouting",
            label: "nftables inet prerouting, same rule",
            pair: Pair::NftPrerouting,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::Nft,
            events: true,
        },
        Setup {
            id: "nft-input",
            label: "nftables inet input, same rule",
            pair: Pair::NftInput,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::Nft,
            events: true,
        },
        Setup {
            id: "no-filter",
            label: "no filter: listener on :25, syncookie SYN-ACK",
            pair: Pair::NoFilter,
            source: IpAddr::V4(BLOCKED),
            counter: Counter::Syncookies,
            events: true,
        },
        Setup {
            id: "accept-close",
            label: "connection accepted and closed in userspace (per connection)",
            pair: Pair::Connect,
            source: IpAddr::V4(CONN_CLIENT),
            counter: Counter::Accepted,
            events: true,
        },
    ]
}

// ---------------------------------------------------------------------------
// Small system helpers

/// Set by SIGINT/SIGTERM/SIGHUP: the run stops at the next check and
/// cleans up (namespaces, nftables tables, pins) on the way out.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

fn check_stop() -> Result<()> {
    ensure!(
        !STOP.load(Ordering::Relaxed),
        "interrupted by a signal: cleaning up"
    );
    Ok(())
}

fn pin_thread(cpu: usize) -> Result<()> {
    pin_task(0, cpu)
}

/// `sched_setaffinity` of task `pid` (0: the calling thread) to one CPU.
fn pin_task(pid: u32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &set)
    };
    if rc != 0 {
        bail!(
            "pinning task {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// CPU time of a task in ns and the number of times it ran
/// (`/proc/PID/schedstat`: first and third field).
fn task_sched(pid: u32) -> Result<(u64, u64)> {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let fields: Vec<u64> = text
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    match fields.as_slice() {
        [cpu, _, runs, ..] => Ok((*cpu, *runs)),
        _ => bail!("{path}: unexpected content {text:?}"),
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `ethtool -S DEV` inside `ns`, as name → value.
fn ethtool_stats(ns: &NetNs, dev: &str) -> Result<StdHashMap<String, u64>> {
    let out = ns.exec(&["ethtool", "-S", dev])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

fn stat(stats: &StdHashMap<String, u64>, name: &str) -> Result<u64> {
    stats
        .get(name)
        .copied()
        .with_context(|| format!("ethtool -S has no {name}"))
}

/// Threaded NAPI kthreads (`napi/<dev>-<id>`) by pid.
fn napi_threads() -> Result<StdHashMap<u32, String>> {
    let mut found = StdHashMap::new();
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            if comm.starts_with("napi/") {
                found.insert(pid, comm.trim().to_owned());
            }
        }
    }
    Ok(found)
}

/// A device's transmitted and transmit-dropped packets (`ip -s -j link`).
fn tx_counts(ns: &NetNs, dev: &str) -> Result<(u64, u64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    let tx = out
        .split("\"tx\":{")
        .nth(1)
        .with_context(|| format!("no tx statistics in {out}"))?;
    let field = |name: &str| -> Result<u64> {
        tx.split(&format!("\"{name}\":"))
            .nth(1)
            .and_then(|v| {
                v.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .with_context(|| format!("no tx {name} in {out}"))
    };
    Ok((field("packets")?, field("dropped")?))
}

/// TcpExt counters of the namespace.
fn tcp_ext(ns: &NetNs) -> Result<StdHashMap<String, u64>> {
    let text = ns.exec(&["cat", "/proc/net/netstat"])?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no TcpExt lines in /proc/net/netstat of {}", ns.name());
    };
    Ok(names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect())
}

// ---------------------------------------------------------------------------
// Frames

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 (or IPv6) + TCP SYN with the options Linux sends
/// (MSS, SACK permitted, timestamps, window scale) and correct checksums.
fn syn_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: IpAddr) -> Vec<u8> {
    let (src, dst) = match src {
        IpAddr::V4(src) => (src, SERVER),
        IpAddr::V6(src) => return syn_frame_v6(dst_mac, src_mac, src, SERVER_V6),
    };
    let mut tcp = Vec::with_capacity(40);
    tcp.extend_from_slice(&SOURCE_PORT.to_be_bytes());
    tcp.extend_from_slice(&SMTP.to_be_bytes());
    tcp.extend_from_slice(&0x1122_3344u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.push(10 << 4); // data offset: 40 bytes
    tcp.push(0x02); // SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(&[2, 4, 0x05, 0xb4]); // MSS 1460
    tcp.extend_from_slice(&[4, 2]); // SACK permitted
    tcp.extend_from_slice(&[8, 10, 0, 0, 0x10, 0, 0, 0, 0, 0]); // timestamps
    tcp.extend_from_slice(&[1, 3, 3, 7]); // NOP, window scale 7
    let tcp_len = tcp.len() as u16;
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &[0, 6],
        &tcp_len.to_be_bytes()[..],
    ]
    .concat();
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());

    let mut iph = Vec::with_capacity(20);
    iph.extend_from_slice(&[0x45, 0]);
    iph.extend_from_slice(&(20 + tcp_len).to_be_bytes());
    iph.extend_from_slice(&[0x12, 0x34, 0x40, 0]); // id, DF
    iph.extend_from_slice(&[64, 6, 0, 0]); // TTL, TCP, checksum
    iph.extend_from_slice(&src.octets());
    iph.extend_from_slice(&dst.octets());
    let sum = checksum(&[&iph]);
    iph[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + iph.len() + tcp.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&iph);
    frame.extend_from_slice(&tcp);
    frame
}

/// [`syn_frame`] over IPv6 (no extension headers): the same TCP segment,
/// its checksum over the IPv6 pseudo-header.
fn syn_frame_v6(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(40);
    tcp.extend_from_slice(&SOURCE_PORT.to_be_bytes());
    tcp.extend_from_slice(&SMTP.to_be_bytes());
    tcp.extend_from_slice(&0x1122_3344u32.to_be_bytes()); // seq
    tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
    tcp.push(10 << 4); // data offset: 40 bytes
    tcp.push(0x02); // SYN
    tcp.extend_from_slice(&64240u16.to_be_bytes()); // window
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    tcp.extend_from_slice(&[2, 4, 0x05, 0xa0]); // MSS 1440
    tcp.extend_from_slice(&[4, 2]); // SACK permitted
    tcp.extend_from_slice(&[8, 10, 0, 0, 0x10, 0, 0, 0, 0, 0]); // timestamps
    tcp.extend_from_slice(&[1, 3, 3, 7]); // NOP, window scale 7
    let length = (tcp.len() as u32).to_be_bytes();
    let sum = checksum(&[
        &src.octets()[..],
        &dst.octets()[..],
        &length[..],
        &[0, 0, 0, 6],
        &tcp,
    ]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + 40 + tcp.len());
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version, class, flow
    frame.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[6, 64]); // next header TCP, hop limit
    frame.extend_from_slice(&src.octets());
    frame.extend_from_slice(&dst.octets());
    frame.extend_from_slice(&tcp);
    frame
}

fn mac(side: u8, k: usize) -> [u8; 6] {
    [0x02, 0x53, 0x59, 0x4e, side, k as u8 + 1]
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------
// The testbed

/// An nftables table inside a namespace, deleted on drop.
struct NftTable {
    ns: String,
    family: &'static str,
    name: &'static str,
    chain: &'static str,
}

impl NftTable {
    fn counter(&self) -> Result<u64> {
        let out = ip(&[
            "netns",
            "exec",
            &self.ns,
            "nft",
            "list",
            "chain",
            self.family,
            self.name,
            self.chain,
        ])?;
        let after = out
            .split("counter packets ")
            .nth(1)
            .with_context(|| format!("no rule counter in:\n{out}"))?;
        after
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unreadable rule counter in:\n{out}"))
    }
}

impl Drop for NftTable {
    fn drop(&mut self) {
        if let Err(e) = ip(&[
            "netns",
            "exec",
            &self.ns,
            "nft",
            "delete",
            "table",
            self.family,
            self.name,
        ]) {
            eprintln!("nft cleanup: {e:#}");
        }
    }
}

/// One veth pair: the client end in the shared client namespace, the server
/// end in its own namespace.
struct Device {
    pair: Pair,
    /// Dropped before the namespace.
    nft: Option<NftTable>,
    /// The listener of the no-filter setup (never accepts).
    _listener: Option<TcpListener>,
    server: NetNs,
    client_if: String,
    server_if: String,
    client_ifindex: u32,
    client_mac: [u8; 6],
    server_mac: [u8; 6],
    /// The NAPI kthreads of the server and the client end.
    server_napi: u32,
    client_napi: u32,
}

struct Testbed {
    // Drop order: programs first, then the namespaces.
    kernel: TestKernel,
    baseline: Ebpf,
    devices: Vec<Device>,
    client: NetNs,
    conn: ConnServer,
    set_size: u32,
    /// What the product's limits hold now: drop events on or off.
    events: bool,
}

fn filler(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(FILLER_BASE + 1 + i)
}

fn filler_v6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(FILLER_BASE_V6 + 1 + u128::from(i))
}

/// A namespace for the testbed, with IPv6 off (its neighbour discovery and
/// MLD packets would cross the pairs and spoil the packet counts).
fn namespace() -> Result<NetNs> {
    let ns = NetNs::new(NS_PREFIX)?;
    ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ])?;
    Ok(ns)
}

/// A table whose chain drops the sources in a set: the blocked source and
/// `set_size` fillers, of IPv4 or (`v6`) IPv6.
fn nft_script(
    family: &str,
    table: &str,
    chain: &str,
    hook: &str,
    set_size: u32,
    v6: bool,
) -> String {
    let (set_type, selector, blocked) = if v6 {
        ("ipv6_addr", "ip6 saddr", IpAddr::V6(BLOCKED_V6))
    } else {
        ("ipv4_addr", "ip saddr", IpAddr::V4(BLOCKED))
    };
    let mut s = String::new();
    let _ = writeln!(s, "table {family} {table} {{");
    let _ = writeln!(
        s,
        "  set blocked {{ type {set_type}; size {};",
        set_size + 16
    );
    let _ = write!(s, "    elements = {{ {blocked}");
    for i in 0..set_size {
        if v6 {
            let _ = write!(s, ", {}", filler_v6(i));
        } else {
            let _ = write!(s, ", {}", filler(i));
        }
        if i % 16 == 15 {
            s.push('\n');
        }
    }
    let _ = writeln!(s, " }}\n  }}");
    let _ = writeln!(
        s,
        "  chain {chain} {{ type filter {hook} priority 0; policy accept;\n    {selector} @blocked counter drop\n  }}\n}}"
    );
    s
}

impl Testbed {
    fn build(options: &Options) -> Result<Self> {
        let client = namespace()?;
        let tag = format!("{:03}", std::process::id() % 1000);
        let mut devices = Vec::new();
        let napi_before = napi_threads()?;
        for (k, &pair) in PAIRS.iter().enumerate() {
            let server = namespace()?;
            let client_if = format!("sa{}{tag}", k + 1);
            let server_if = format!("sb{}{tag}", k + 1);
            let (client_mac, server_mac) = (mac(1, k), mac(2, k));
            ip(&[
                "link",
                "add",
                &client_if,
                "netns",
                client.name(),
                "address",
                &mac_str(client_mac),
                "type",
                "veth",
                "peer",
                "name",
                &server_if,
                "netns",
                server.name(),
                "address",
                &mac_str(server_mac),
            ])?;
            for (ns, dev) in [(&client, &client_if), (&server, &server_if)] {
                // veth turns on its NAPI (and the peer's XDP redirect
                // target feature) only when GRO changes while it is up.
                ns.ip(&["link", "set", dev, "up"])?;
                ns.exec(&["ethtool", "-K", dev, "gro", "off", "tso", "off"])?;
                ns.exec(&["ethtool", "-K", dev, "gro", "on"])?;
                ns.exec(&[
                    "sh",
                    "-c",
                    &format!("echo 1 > /sys/class/net/{dev}/threaded"),
                ])?;
            }
            if pair == Pair::Connect {
                server.ip(&[
                    "addr",
                    "add",
                    &format!("{CONN_SERVER}/24"),
                    "dev",
                    &server_if,
                ])?;
                client.ip(&[
                    "addr",
                    "add",
                    &format!("{CONN_CLIENT}/24"),
                    "dev",
                    &client_if,
                ])?;
            } else {
                // The SYN servers: one address, answers to the sources go
                // back through the pair without ARP (the client end drops
                // them with XDP and would never answer ARP).
                server.ip(&["addr", "add", &format!("{SERVER}/24"), "dev", &server_if])?;
                server.ip(&["route", "add", "default", "dev", &server_if])?;
                for source in [BLOCKED, AT_CAP] {
                    server.ip(&[
                        "neigh",
                        "replace",
                        &source.to_string(),
                        "lladdr",
                        &mac_str(client_mac),
                        "dev",
                        &server_if,
                        "nud",
                        "permanent",
                    ])?;
                }
            }
            let client_ifindex = client.ifindex(&client_if)?;
            devices.push(Device {
                pair,
                nft: None,
                _listener: None,
                server,
                client_if,
                server_if,
                client_ifindex,
                client_mac,
                server_mac,
                server_napi: 0,
                client_napi: 0,
            });
        }

        // The product, with the blocked source and as many fillers in BLOCK
        // as the nftables sets hold.
        let kernel = TestKernel::load_with(KernelLimits::default(), MapSizes::default());
        fill_product(&kernel, options.set_size)?;
        let find_pair = |pair: Pair| {
            devices
                .iter()
                .find(|d| d.pair == pair)
                .context("every pair exists")
        };
        let product = find_pair(Pair::Product)?;
        let datapath = &kernel.datapath;
        product
            .server
            .run(|| datapath.attach(&product.server_if, AttachMode::Xdp))
            .context("attaching the product's XDP program")?;

        // The floor on its server end, and the XDP drop of answers on the
        // client ends of the SYN pairs; the generator.
        let path = baseline_object();
        let mut baseline =
            Ebpf::load_file(&path).with_context(|| format!("loading {}", path.display()))?;
        {
            let drop: &mut Xdp = baseline
                .program_mut(BASELINE_DROP)
                .context("no baseline_drop")?
                .try_into()?;
            drop.load().context("loading baseline_drop")?;
            let floor = find_pair(Pair::Floor)?;
            floor
                .server
                .run(|| drop.attach(&floor.server_if, XdpMode::Driver))
                .context("attaching baseline_drop (floor)")?;
            for d in devices.iter().filter(|d| d.pair != Pair::Connect) {
                client
                    .run(|| drop.attach(&d.client_if, XdpMode::Driver))
                    .with_context(|| format!("attaching baseline_drop to {}", d.client_if))?;
            }
        }
        for (name, pair) in [
            (BASELINE_READ, Pair::FloorRead),
            (BASELINE_LOOKUP, Pair::FloorLookup),
        ] {
            let program: &mut Xdp = baseline
                .program_mut(name)
                .with_context(|| {
                    format!("no {name} in the baseline object (rebuild it: cargo xtask build-ebpf)")
                })?
                .try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
            let d = find_pair(pair)?;
            d.server
                .run(|| program.attach(&d.server_if, XdpMode::Driver))
                .with_context(|| format!("attaching {name}"))?;
        }
        for name in [GENERATOR, GENERATOR_PACED] {
            let generator: &mut Xdp = baseline
                .program_mut(name)
                .with_context(|| {
                    format!("no {name} in the baseline object (rebuild it: cargo xtask build-ebpf)")
                })?
                .try_into()?;
            generator
                .load()
                .with_context(|| format!("loading {name}"))?;
        }

        // nftables.
        for d in &mut devices {
            let (family, table, chain, hook) = match d.pair {
                Pair::NftIngress => (
                    "netdev",
                    "slb_syn_ingress",
                    "ingress",
                    format!("hook ingress device \"{}\"", d.server_if),
                ),
                Pair::NftIngressV6 => (
                    "netdev",
                    "slb_syn_ingress6",
                    "ingress",
                    format!("hook ingress device \"{}\"", d.server_if),
                ),
                Pair::NftPrerouting => (
                    "inet",
                    "slb_syn_prerouting",
                    "prerouting",
                    "hook prerouting".to_owned(),
                ),
                Pair::NftInput => ("inet", "slb_syn_input", "input", "hook input".to_owned()),
                _ => continue,
            };
            let v6 = d.pair == Pair::NftIngressV6;
            let script = nft_script(family, table, chain, &hook, options.set_size, v6);
            let file =
                std::env::temp_dir().join(format!("slb-syn-{}-{table}.nft", std::process::id()));
            std::fs::write(&file, script).with_context(|| format!("writing {}", file.display()))?;
            let loaded = d.server.exec(&["nft", "-f", &file.to_string_lossy()]);
            let _ = std::fs::remove_file(&file);
            d.nft = Some(NftTable {
                ns: d.server.name().to_owned(),
                family,
                name: table,
                chain,
            });
            loaded.with_context(|| format!("loading the nftables table {table}"))?;
        }

        // The listener (SYN cookies always: every SYN gets a cookie SYN-ACK,
        // no request socket, as under a flood).
        let nofilter = devices
            .iter_mut()
            .find(|d| d.pair == Pair::NoFilter)
            .context("no no-filter pair")?;
        nofilter
            .server
            .exec(&["sysctl", "-qw", "net.ipv4.tcp_syncookies=2"])?;
        let listener = nofilter
            .server
            .run(|| TcpListener::bind(SocketAddrV4::new(SERVER, SMTP)))
            .context("listening on port 25 (no-filter setup)")?;
        nofilter._listener = Some(listener);

        // The accept+close server.
        let conn_dev = devices
            .iter()
            .find(|d| d.pair == Pair::Connect)
            .context("no connection pair")?;
        let conn_listener = conn_dev
            .server
            .run(|| TcpListener::bind(SocketAddrV4::new(CONN_SERVER, SMTP)))
            .context("listening on port 25 (accept+close setup)")?;
        let conn = ConnServer::start(conn_listener, options.rx_cpu)?;

        // NAPI threads, found after every attachment, pinned.
        let napi_after = napi_threads()?;
        let new: Vec<(u32, String)> = napi_after
            .into_iter()
            .filter(|(pid, _)| !napi_before.contains_key(pid))
            .collect();
        let find = |dev: &str| -> Result<u32> {
            let prefix = format!("napi/{dev}-");
            let matches: Vec<u32> = new
                .iter()
                .filter(|(_, comm)| {
                    comm.starts_with(&prefix) || format!("{comm}-").starts_with(&prefix)
                })
                .map(|(pid, _)| *pid)
                .collect();
            match matches.as_slice() {
                [pid] => Ok(*pid),
                other => {
                    bail!("expected one NAPI thread for {dev}, found {other:?} (threaded NAPI on)")
                }
            }
        };
        for d in &mut devices {
            d.server_napi = find(&d.server_if)?;
            d.client_napi = find(&d.client_if)?;
            pin_task(d.server_napi, options.rx_cpu)?;
            pin_task(d.client_napi, options.gen_cpu)?;
        }

        // GRO on, TSO off on both ends of every pair, after the attachments
        // (attaching XDP changes the peer's features).
        for d in &devices {
            for (ns, dev) in [(&client, &d.client_if), (&d.server, &d.server_if)] {
                let features = ns.exec(&["ethtool", "-k", dev])?;
                let on = |name: &str| {
                    features
                        .lines()
                        .find(|l| l.trim_start().starts_with(name))
                        .is_some_and(|l| l.contains(": on"))
                };
                ensure!(
                    on("generic-receive-offload:") && !on("tcp-segmentation-offload:"),
                    "{dev}: GRO must be on and TSO off:\n{features}"
                );
            }
        }

        Ok(Self {
            kernel,
            baseline,
            devices,
            client,
            conn,
            set_size: options.set_size,
            events: true,
        })
    }

    fn device(&self, pair: Pair) -> &Device {
        self.devices
            .iter()
            .find(|d| d.pair == pair)
            .expect("every pair exists")
    }

    fn frame(&self, setup: &Setup) -> Vec<u8> {
        let d = self.device(setup.pair);
        syn_frame(d.server_mac, d.client_mac, setup.source)
    }
}

/// Each family's block table holds the blocked source and as many fillers
/// as the nftables sets; a source of each family holds its cap.
fn fill_product(kernel: &TestKernel, set_size: u32) -> Result<()> {
    let d = &kernel.datapath;
    let host = |a: IpAddr| IpNet::from(a);
    d.block(host(IpAddr::V4(BLOCKED)), None, Reason::Manual)?;
    d.block(host(IpAddr::V6(BLOCKED_V6)), None, Reason::Manual)?;
    for i in 0..set_size {
        d.block(host(IpAddr::V4(filler(i))), None, Reason::Manual)?;
        d.block(host(IpAddr::V6(filler_v6(i))), None, Reason::Manual)?;
    }
    let cap = KernelLimits::default().max_connections;
    d.set_connection_count(IpAddr::V4(AT_CAP), cap)?;
    d.set_connection_count(IpAddr::V6(AT_CAP_V6), cap)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The accept+close server

/// A thread in the connection pair's server namespace that accepts and
/// closes connections on request and reports its own CPU time.
struct ConnServer {
    requests: Option<mpsc::Sender<usize>>,
    replies: mpsc::Receiver<Result<(usize, u64)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnServer {
    fn start(listener: TcpListener, cpu: usize) -> Result<Self> {
        // accept() gives up after this long without a connection.
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        // SAFETY: a valid socket and option buffer.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        let (request_tx, request_rx) = mpsc::channel::<usize>();
        let (reply_tx, reply_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("syn-bench-server".into())
            .spawn(move || {
                if let Err(e) = pin_thread(cpu) {
                    let _ = reply_tx.send(Err(e));
                    return;
                }
                while let Ok(n) = request_rx.recv() {
                    let before = thread_cpu_ns();
                    let mut accepted = 0;
                    let result = loop {
                        if accepted == n {
                            break Ok((accepted, thread_cpu_ns() - before));
                        }
                        match listener.accept() {
                            Ok((stream, _)) => {
                                drop(stream);
                                accepted += 1;
                            }
                            Err(e) => {
                                break Err(anyhow::anyhow!(
                                    "accept after {accepted} of {n} connections: {e}"
                                ));
                            }
                        }
                    };
                    if reply_tx.send(result).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            requests: Some(request_tx),
            replies: reply_rx,
            thread: Some(thread),
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Measurements

/// One setup in one round.
#[derive(Clone, Debug)]
struct Sample {
    /// Receive-side CPU per SYN (per connection for accept-close).
    ns: f64,
    /// Frames sent / connections attempted.
    sent: u64,
    /// Frames put into the receiving ring.
    in_ring: u64,
    ring_drops: u64,
    processed: u64,
    /// The refusal counter's delta.
    counted: u64,
    /// Extra check figure: packets the server end sent back (SYN-ACKs for
    /// no-filter, none for the others); packets per connection
    /// (accept-close).
    extra: f64,
    /// Generator rate, frames per second (0 for connections).
    rate: f64,
    /// Where the time went (accept-close: NAPI thread and server thread).
    note: String,
    ok: bool,
    problems: Vec<String>,
}

impl Testbed {
    fn counter(&self, setup: &Setup) -> Result<u64> {
        let d = self.device(setup.pair);
        Ok(match setup.counter {
            Counter::ProductBlock => self.kernel.datapath.counters()?.dropped_block,
            Counter::ProductCap => self.kernel.datapath.counters()?.dropped_cap,
            Counter::XdpDrops => stat(
                &ethtool_stats(&d.server, &d.server_if)?,
                "rx_queue_0_xdp_drops",
            )?,
            Counter::Nft => d.nft.as_ref().context("no nft table")?.counter()?,
            Counter::Syncookies => *tcp_ext(&d.server)?
                .get("SyncookiesSent")
                .context("no TcpExt SyncookiesSent")?,
            Counter::Accepted => 0,
        })
    }

    fn set_target(&mut self, ifindex: u32) -> Result<()> {
        let mut map: Array<&mut MapData, u32> = Array::try_from(
            self.baseline
                .map_mut(REDIRECT_MAP)
                .context("no REDIRECT_TO map")?,
        )?;
        map.set(0, ifindex, 0)?;
        Ok(())
    }

    /// Holds the generator to `rate` frames per second (0: unpaced).
    fn set_pace(&mut self, rate: u64) -> Result<()> {
        let mut map: Array<&mut MapData, u64> = Array::try_from(
            self.baseline
                .map_mut(PACE_MAP)
                .context("no PACE map (rebuild the objects: cargo xtask build-ebpf)")?,
        )?;
        // 0 leaves the paced generator unpaced.
        let interval = 1_000_000_000u64.checked_div(rate).unwrap_or(0);
        map.set(0, interval, 0)?;
        map.set(1, 0, 0)?;
        Ok(())
    }

    /// Sends `frames` copies of `frame` out of the client end `ifindex`
    /// from a thread in the client namespace pinned to `cpu`; returns the
    /// frames sent and the time taken.
    fn generate(
        &self,
        frame: &[u8],
        frames: u64,
        cpu: usize,
        paced: bool,
    ) -> Result<(u64, Duration)> {
        let program: &Xdp = self
            .baseline
            .program(if paced { GENERATOR_PACED } else { GENERATOR })
            .context("generator gone")?
            .try_into()?;
        self.client.run(|| {
            pin_thread(cpu)?;
            let started = Instant::now();
            let mut sent = 0u64;
            while sent < frames {
                check_stop()?;
                ensure!(
                    started.elapsed() < GENERATOR_DEADLINE,
                    "the generator took longer than {GENERATOR_DEADLINE:?} for {sent} of {frames} frames"
                );
                let chunk = (frames - sent).min(u64::from(GENERATOR_CHUNK)) as u32;
                program
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat: chunk,
                        attrs: TestRunAttrs::new().xdp_live_frames(GENERATOR_BATCH),
                        ..TestRunOptions::new()
                    })
                    .context("BPF_PROG_TEST_RUN (live frames) of bench_redirect")?;
                sent += u64::from(chunk);
            }
            Ok((sent, started.elapsed()))
        })
    }

    fn measure_syn(&mut self, setup: &Setup, frames: u64, options: &Options) -> Result<Sample> {
        let frame = self.frame(setup);
        let d = self.device(setup.pair);
        let (server_napi, client_ifindex) = (d.server_napi, d.client_ifindex);
        self.set_target(client_ifindex)?;
        self.set_pace(options.gen_rate)?;
        let d = self.device(setup.pair);
        let client_before = ethtool_stats(&self.client, &d.client_if)?;
        let server_before = ethtool_stats(&d.server, &d.server_if)?;
        let counted_before = self.counter(setup)?;
        let tx_before = tx_counts(&d.server, &d.server_if)?;
        let (cpu_before, runs_before) = task_sched(server_napi)?;
        let (sent, took) = self.generate(&frame, frames, options.gen_cpu, options.gen_rate != 0)?;
        std::thread::sleep(DRAIN);
        let (cpu_after, runs_after) = task_sched(server_napi)?;
        let counted_after = self.counter(setup)?;
        let tx_after = tx_counts(&d.server, &d.server_if)?;
        let server_after = ethtool_stats(&d.server, &d.server_if)?;
        let client_after = ethtool_stats(&self.client, &d.client_if)?;
        let delta = |before: &StdHashMap<String, u64>,
                     after: &StdHashMap<String, u64>,
                     name: &str|
         -> Result<u64> {
            Ok(stat(after, name)?.wrapping_sub(stat(before, name)?))
        };
        let in_ring = delta(&client_before, &client_after, "tx_queue_0_xdp_xmit")?;
        let ring_drops = delta(&client_before, &client_after, "tx_queue_0_xdp_xmit_errors")?;
        let processed = delta(&server_before, &server_after, "rx_queue_0_xdp_packets")?;
        // Answers (SYN-ACKs) out of the server end, whether the client
        // end's ring took them or not.
        let answers = (tx_after.0 + tx_after.1).wrapping_sub(tx_before.0 + tx_before.1);
        let counted = counted_after.wrapping_sub(counted_before);
        let mut problems = Vec::new();
        if sent != in_ring + ring_drops {
            problems.push(format!(
                "sent {sent} != into the ring {in_ring} + ring drops {ring_drops}"
            ));
        }
        if in_ring != processed {
            problems.push(format!("into the ring {in_ring} != processed {processed}"));
        }
        if counted != processed {
            problems.push(format!("drop counter {counted} != processed {processed}"));
        }
        let expected_answers = if setup.counter == Counter::Syncookies {
            processed
        } else {
            0
        };
        if answers != expected_answers {
            problems.push(format!(
                "packets sent back by the server end {answers} != {expected_answers}"
            ));
        }
        ensure!(
            processed > 0,
            "{}: no frame was processed (sent {sent}, into the ring {in_ring}, ring drops {ring_drops}; client end {client_after:?}, server end {server_after:?})",
            setup.id
        );
        Ok(Sample {
            ns: (cpu_after - cpu_before) as f64 / processed as f64,
            sent,
            in_ring,
            ring_drops,
            processed,
            counted,
            extra: answers as f64,
            rate: sent as f64 / took.as_secs_f64(),
            note: format!(
                "{:.1} frames per NAPI thread run",
                processed as f64 / (runs_after - runs_before).max(1) as f64
            ),
            ok: problems.is_empty(),
            problems,
        })
    }

    fn measure_connections(&self, n: usize, options: &Options) -> Result<Sample> {
        let d = self.device(Pair::Connect);
        let server_before = ethtool_stats(&d.server, &d.server_if)?;
        let (napi_before, runs_before) = task_sched(d.server_napi)?;
        self.conn
            .requests
            .as_ref()
            .context("server stopped")?
            .send(n)
            .context("server thread gone")?;
        let target = SocketAddr::V4(SocketAddrV4::new(CONN_SERVER, SMTP));
        let completed = self.client.run(|| -> Result<usize> {
            pin_thread(options.gen_cpu)?;
            let started = Instant::now();
            let mut completed = 0;
            for i in 0..n {
                check_stop()?;
                ensure!(
                    started.elapsed() < CONN_DEADLINE,
                    "connections took longer than {CONN_DEADLINE:?} ({i} of {n})"
                );
                let mut stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
                    .with_context(|| format!("connection {} of {n}", i + 1))?;
                stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
                let mut buf = [0u8; 16];
                // The server closes without writing: EOF.
                if stream.read(&mut buf)? == 0 {
                    completed += 1;
                }
            }
            Ok(completed)
        })?;
        let (accepted, server_cpu) = self
            .conn
            .replies
            .recv_timeout(CONN_DEADLINE)
            .context("no answer from the server thread")??;
        std::thread::sleep(DRAIN);
        let (napi_after, runs_after) = task_sched(d.server_napi)?;
        let server_after = ethtool_stats(&d.server, &d.server_if)?;
        let packets = stat(&server_after, "rx_queue_0_xdp_packets")?
            - stat(&server_before, "rx_queue_0_xdp_packets")?;
        let mut problems = Vec::new();
        if accepted != n || completed != n {
            problems.push(format!(
                "{n} connections: {accepted} accepted, {completed} saw the server's close"
            ));
        }
        Ok(Sample {
            ns: (napi_after - napi_before + server_cpu) as f64 / n as f64,
            sent: n as u64,
            in_ring: packets,
            ring_drops: 0,
            processed: completed as u64,
            counted: accepted as u64,
            extra: packets as f64 / n as f64,
            rate: 0.0,
            note: format!(
                "NAPI {:.0} ns + server {:.0} ns; {:.1} NAPI thread runs",
                (napi_after - napi_before) as f64 / n as f64,
                server_cpu as f64 / n as f64,
                (runs_after - runs_before) as f64 / n as f64
            ),
            ok: problems.is_empty(),
            problems,
        })
    }

    fn measure(
        &mut self,
        setup: &Setup,
        options: &Options,
        frames: u64,
        conns: usize,
    ) -> Result<Sample> {
        if setup.pair == Pair::Product && setup.events != self.events {
            let default = KernelLimits::default();
            self.kernel.datapath.set_limits(&KernelLimits {
                events_per_second: if setup.events {
                    default.events_per_second
                } else {
                    0
                },
                ..default
            })?;
            self.events = setup.events;
        }
        if setup.counter == Counter::Accepted {
            self.measure_connections(conns, options)
        } else {
            self.measure_syn(setup, frames, options)
        }
    }
}

// ---------------------------------------------------------------------------
// Cleanup of leftovers

/// Namespaces and pin directories of killed earlier runs.
fn remove_stale() -> Result<()> {
    for name in NetNs::remove_stale(NS_PREFIX)? {
        eprintln!("removed stale namespace {name}");
    }
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("smtp-limiter-test-") else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => eprintln!("removed stale pins {}", entry.path().display()),
                Err(e) => eprintln!("stale pins {}: {e}", entry.path().display()),
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Main

fn main() -> Result<()> {
    let options = parse_options()?;
    // SAFETY: geteuid has no preconditions.
    ensure!(unsafe { libc::geteuid() } == 0, "syn-bench needs root");
    ensure!(
        ebpf_object().is_some(),
        "no eBPF object at {} (run `cargo xtask build-ebpf`)",
        object_path().display()
    );
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    ensure!(
        options.gen_cpu < cpus && options.rx_cpu < cpus,
        "--gen-cpu/--rx-cpu: this machine has CPUs 0..{}",
        cpus - 1
    );
    install_signal_handlers();
    remove_stale()?;
    let load_start = load_average();
    eprintln!(
        "syn-bench: {} rounds, {} frames per SYN setup, {} connections, sets of {} + 1 addresses; load average {load_start}",
        options.rounds, options.frames, options.connections, options.set_size
    );
    let setups: Vec<Setup> = setups()
        .into_iter()
        .filter(|s| options.only.is_empty() || options.only.iter().any(|o| o == s.id))
        .collect();
    let mut bed = Testbed::build(&options)?;

    // Warm-up (not recorded); it must pass the checks already.
    let warm_frames = (options.frames / 10).max(10_000);
    let warm_conns = (options.connections / 10).max(20);
    for setup in &setups {
        let s = bed.measure(setup, &options, warm_frames, warm_conns)?;
        if !s.ok {
            bail!("warm-up of {}: {}", setup.id, s.problems.join("; "));
        }
    }

    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
    let started = Instant::now();
    for round in 0..options.rounds {
        let mut line = Vec::new();
        for i in 0..setups.len() {
            check_stop()?;
            let n = (i + round) % setups.len();
            let s = bed.measure(&setups[n], &options, options.frames, options.connections)?;
            line.push(format!(
                "{} {:.0}{}{}",
                setups[n].id,
                s.ns,
                if s.note.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", s.note)
                },
                if s.ok { "" } else { " CHECK FAILED" }
            ));
            if !s.ok {
                eprintln!(
                    "  {} round {}: {}",
                    setups[n].id,
                    round + 1,
                    s.problems.join("; ")
                );
            }
            samples[n].push(s);
        }
        eprintln!(
            "  round {}/{} ({:.1} s): {}",
            round + 1,
            options.rounds,
            started.elapsed().as_secs_f64(),
            line.join(", ")
        );
    }
    let load_end = load_average();
    let report = report(&options, &setups, &samples, &bed, &load_start, &load_end);
    print!("{report}");
    let failed = samples.iter().flatten().filter(|s| !s.ok).count();
    drop(bed);
    ensure!(
        failed == 0,
        "{failed} measurement(s) failed their checks (see above)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Report

fn per_round_ratio(a: &[Sample], b: &[Sample]) -> f64 {
    median(
        &a.iter()
            .zip(b)
            .map(|(x, y)| x.ns / y.ns)
            .collect::<Vec<_>>(),
    )
}

fn mark(value: f64, met: bool) -> &'static str {
    if value.is_nan() {
        "NOT MEASURED"
    } else if met {
        "MET"
    } else {
        "MISSED"
    }
}

fn report(
    options: &Options,
    setups: &[Setup],
    samples: &[Vec<Sample>],
    bed: &Testbed,
    load_start: &str,
    load_end: &str,
) -> String {
    // A setup left out (--setups) has no samples: its ratios are NaN.
    let none: Vec<Sample> = Vec::new();
    let of = |id: &str| {
        setups
            .iter()
            .position(|s| s.id == id)
            .map_or(&none, |i| &samples[i])
    };
    let product = of("product");
    let floor = of("floor");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n## Receive-side CPU per refused SYN — {} rounds × {} frames per setup ({} connections for accept-close), sets of {} + 1 addresses{}\n",
        options.rounds,
        options.frames,
        options.connections,
        bed.set_size,
        if options.quick { " (--quick)" } else { "" }
    );
    let _ = writeln!(
        out,
        "| setup | ns per SYN (median) | min–max | × product (median of rounds) | × floor (median of rounds) | processed / sent | generator Mpps | checks |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---|");
    for (setup, s) in setups.iter().zip(samples) {
        let ns: Vec<f64> = s.iter().map(|x| x.ns).collect();
        let (lo, hi) = min_max(&ns);
        let fraction = median(
            &s.iter()
                .map(|x| x.processed as f64 / x.sent as f64)
                .collect::<Vec<_>>(),
        );
        let rate = median(&s.iter().map(|x| x.rate / 1e6).collect::<Vec<_>>());
        let ok = s.iter().filter(|x| x.ok).count();
        let unit = if setup.counter == Counter::Accepted {
            " (per connection)"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "| {}{unit} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {:.3} | {} | {ok}/{} ok |",
            setup.id,
            median(&ns),
            lo,
            hi,
            per_round_ratio(s, product),
            per_round_ratio(s, floor),
            fraction,
            if rate > 0.0 {
                format!("{rate:.2}")
            } else {
                "—".into()
            },
            s.len()
        );
    }
    let _ = writeln!(out, "\nSetups:");
    for setup in setups {
        let _ = writeln!(out, "  {:<15} {}", setup.id, setup.label);
    }

    let _ = writeln!(out, "\n### Per-round checks\n");
    let _ = writeln!(
        out,
        "| round | setup | ns | sent | into ring | ring drops | processed | drop counter | extra | note | ok |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for round in 0..options.rounds {
        for (setup, s) in setups.iter().zip(samples) {
            let x = &s[round];
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {:.1} | {} | {} |",
                round + 1,
                setup.id,
                x.ns,
                x.sent,
                x.in_ring,
                x.ring_drops,
                x.processed,
                x.counted,
                x.extra,
                x.note,
                if x.ok {
                    "ok".to_owned()
                } else {
                    x.problems.join("; ")
                }
            );
        }
    }
    let _ = writeln!(
        out,
        "\n(extra: packets the server end sent back, which must be one SYN-ACK per SYN for no-filter and none for the others; for accept-close, packets received per connection)"
    );

    let ratio = |id: &str, base: &[Sample]| per_round_ratio(of(id), base);
    let floor_ratio = per_round_ratio(product, floor);
    let nft = ratio("nft-ingress", product);
    let none = ratio("no-filter", product);
    let _ = writeln!(out, "\n### Targets (median of same-round ratios)\n");
    let _ = writeln!(
        out,
        "- product XDP drop ≤ {FLOOR_TARGET}× the floor: {} ({floor_ratio:.2}×)",
        mark(floor_ratio, floor_ratio <= FLOOR_TARGET)
    );
    let _ = writeln!(
        out,
        "- ≥ {NFT_TARGET}× cheaper than nftables at netdev ingress: {} ({nft:.2}×; prerouting {:.2}×, input {:.2}×)",
        mark(nft, nft >= NFT_TARGET),
        ratio("nft-prerouting", product),
        ratio("nft-input", product)
    );
    let nft6 = per_round_ratio(of("nft-ingress-v6"), of("product-v6"));
    let _ = writeln!(
        out,
        "- IPv6: ≥ {NFT_TARGET}× cheaper than nftables at netdev ingress (ip6 saddr @set): {} ({nft6:.2}×; product-v6 {:.2}× the floor)",
        mark(nft6, nft6 >= NFT_TARGET),
        ratio("product-v6", floor)
    );
    let _ = writeln!(
        out,
        "- ≥ {NO_FILTER_TARGET}× cheaper than no filter: {} ({none:.1}×)",
        mark(none, none >= NO_FILTER_TARGET)
    );
    let _ = writeln!(
        out,
        "- extra: over-cap drop {:.2}× the block drop (IPv6 {:.2}×), {:.2}× the floor; with drop events off {:.2}× the floor; the floor that reads the source {:.2}× the floor, product {:.2}× that; the floor with one hash lookup {:.2}× the floor; accept+close {:.0}× the product drop",
        ratio("product-cap", product),
        per_round_ratio(of("product-cap-v6"), of("product-v6")),
        ratio("product-cap", floor),
        ratio("product-ev0", floor),
        ratio("floor-read", floor),
        per_round_ratio(product, of("floor-read")),
        ratio("floor-lookup", floor),
        ratio("accept-close", product)
    );
    let failed = samples.iter().flatten().filter(|s| !s.ok).count();
    let _ = writeln!(
        out,
        "\nChecks: {} of {} measurements consistent. Load average {load_start} at the start, {load_end} at the end. Generator on CPU {} ({}), receiving NAPI threads and server on CPU {}{}.",
        samples.iter().flatten().count() - failed,
        samples.iter().flatten().count(),
        options.gen_cpu,
        if options.gen_rate == 0 {
            "unpaced".to_owned()
        } else {
            format!("paced at {} frames/s", options.gen_rate)
        },
        options.rx_cpu,
        if options.gen_cpu == options.rx_cpu {
            " (the same CPU: no contention for the page pool)"
        } else {
            ""
        }
    );
    out
}
