//! `recipients-bench`: what the valid-recipient directory costs.
//!
//! Run it with `cargo run --release -p limiter-tests --bin recipients-bench
//! [-- ARGS]` (needs Debian's slapd and ldap-utils; not root). All traffic
//! stays on 127.0.0.1.
//!
//! 1. **Refresh**: a private slapd ([`Slapd`]) with `--entries` generated
//!    users (100 000 by default: about 1.2 addresses each, some AD-style with
//!    `proxyAddresses`; size limit 1000, so the search is paged), read by
//!    [`Recipients::refresh_now`] with the cache written to a temp dir, as
//!    the agent does. Reported per refresh: wall time (bind, paged search,
//!    set built, diff, cache written and fsynced), the process's resident
//!    set before and after and its peak during the refresh (`VmHWM`, reset
//!    before each through `/proc/self/clear_refs`), and the cache file's
//!    size. The first refresh starts from nothing; the next ones replace a
//!    set of the same size (both sets alive during the swap). Then the
//!    restart path: loading the cache file alone.
//! 2. **Lookup**: `--addresses` addresses (1 000 000 by default) in one set
//!    (built directly, no LDAP), its build time and memory, then the cost of
//!    one RCPT lookup — [`Recipients::check`]: key folding, the read lock,
//!    one or two hash probes, the counter — over a mix of known addresses in
//!    varied case and unknown ones in a covered domain, timed in batches of
//!    1 000; reported are the median, p99 and best batch in ns per lookup,
//!    and the throughput of two threads looking up at once.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use limiter_tests::slapd::{self, Slapd, SlapdOptions};
use limiter_user::config::{Config, Ldap};
use limiter_user::recipients::{cache, AddressSet, Folding, Lookup, Recipients, CACHE_FILE};

struct Args {
    entries: usize,
    addresses: usize,
    refreshes: usize,
    batches: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        entries: 100_000,
        addresses: 1_000_000,
        refreshes: 3,
        batches: 2_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .replace('_', "")
                .parse()
                .with_context(|| format!("{name}: not a number"))
        };
        match arg.as_str() {
            "--entries" => args.entries = value("--entries")?,
            "--addresses" => args.addresses = value("--addresses")?,
            // `--rounds`: what `cargo xtask bench` passes to every benchmark.
            "--refreshes" | "--rounds" => args.refreshes = value("--refreshes")?.max(1),
            "--batches" => args.batches = value("--batches")?.max(10),
            "--quick" => {
                args.entries = 10_000;
                args.addresses = 100_000;
                args.refreshes = 2;
                args.batches = 200;
            }
            "--help" | "-h" => {
                println!(
                    "recipients-bench [--entries N (100000)] [--addresses N (1000000)] \
                     [--refreshes|--rounds N (3)] [--batches N (2000)] [--quick]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(args)
}

/// `VmRSS` or `VmHWM` of this process, in KiB.
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn rss() -> u64 {
    status_kib("VmRSS")
}

/// Resets `VmHWM` to the current RSS (Linux ≥ 4.0).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn signed_mib(after: u64, before: u64) -> String {
    let delta = after as f64 - before as f64;
    format!("{:+.1} MiB", delta / 1024.0)
}

fn ldap(toml: &str) -> Result<Ldap> {
    Config::from_toml(toml)?
        .recipients
        .ldap
        .context("no [recipients.ldap]")
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if let Some(why) = slapd::missing_prerequisite() {
        bail!("recipients-bench needs slapd: {why}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("# recipients-bench");
    refresh(&runtime, &args)?;
    lookup(&runtime, &args)?;
    Ok(())
}

fn refresh(runtime: &tokio::runtime::Runtime, args: &Args) -> Result<()> {
    println!(
        "\n## Refresh of {} directory entries (slapd on loopback, pages of 500)",
        args.entries
    );
    let started = Instant::now();
    let slapd = Slapd::start(SlapdOptions {
        users: args.entries,
        ..SlapdOptions::default()
    })?;
    println!(
        "slapd with {} users ready in {:.1} s",
        args.entries,
        started.elapsed().as_secs_f64()
    );
    let expected = slapd.expected_addresses().len();
    let state = std::env::temp_dir().join(format!("recipients-bench.{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let cache_path = state.join(CACHE_FILE);
    let config = ldap(&slapd.recipients_toml(""))?;
    let recipients = Recipients::new(config.clone(), Some(cache_path.clone()));
    println!("| refresh | time | addresses | RSS before | RSS after | peak during | cache file |");
    println!("|---|---|---|---|---|---|---|");
    for n in 1..=args.refreshes {
        let before = rss();
        reset_peak();
        let t = Instant::now();
        let report = runtime.block_on(recipients.refresh_now(false))?;
        let took = t.elapsed();
        let (after, peak) = (rss(), status_kib("VmHWM"));
        if report.addresses != expected {
            bail!(
                "refresh {n}: {} addresses, expected {expected}",
                report.addresses
            );
        }
        let size = std::fs::metadata(&cache_path).map(|m| m.len()).unwrap_or(0);
        println!(
            "| {n} | {:.2} s | {} | {} | {} ({}) | {} | {:.1} MiB |",
            took.as_secs_f64(),
            report.addresses,
            mib(before),
            mib(after),
            signed_mib(after, before),
            mib(peak),
            size as f64 / (1024.0 * 1024.0)
        );
    }
    drop(recipients);
    drop(slapd);
    // The restart path: the cache alone.
    let before = rss();
    let t = Instant::now();
    let restarted = Recipients::new(config, Some(cache_path));
    let took = t.elapsed();
    let loaded = restarted.stats().addresses;
    if loaded != expected {
        bail!("the cache gave {loaded} addresses, expected {expected}");
    }
    println!(
        "cache load at start ({loaded} addresses): {:.0} ms, RSS {}",
        took.as_secs_f64() * 1000.0,
        signed_mib(rss(), before)
    );
    drop(restarted);
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

/// xorshift64*: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Address `i` of the lookup benchmark: realistic lengths, 8 domains.
fn address(i: usize) -> String {
    format!("first{i}.lastname{}@division{}.example.com", i % 997, i % 8)
}

fn lookup(runtime: &tokio::runtime::Runtime, args: &Args) -> Result<()> {
    let n = args.addresses;
    println!("\n## Lookup with {n} addresses loaded");
    let before = rss();
    let t = Instant::now();
    // Each generated string is freed as soon as it is inserted, so the
    // growth of the resident set is the set's.
    let mut set = AddressSet::new(Folding::default());
    for i in 0..n {
        set.insert(&address(i));
    }
    set.shrink_to_fit();
    let built = t.elapsed();
    let after = rss();
    println!(
        "set built in {:.2} s: {} addresses; resident set {} ({:.0} bytes per address); \
         the set's own estimate {:.1} MiB",
        built.as_secs_f64(),
        set.len(),
        signed_mib(after, before),
        (after.saturating_sub(before) as f64 * 1024.0) / n as f64,
        set.memory_bytes() as f64 / (1024.0 * 1024.0)
    );

    // Into a Recipients through its cache, as at an agent start.
    let state =
        std::env::temp_dir().join(format!("recipients-bench-lookup.{}", std::process::id()));
    std::fs::create_dir_all(&state)?;
    let path = state.join(CACHE_FILE);
    let config =
        ldap("[recipients.ldap]\nurl = \"ldap://127.0.0.1:1\"\nbase_dn = \"dc=example,dc=com\"\n")?;
    cache::save(
        &path,
        &cache::Origin::of(&config),
        &set,
        std::time::SystemTime::now(),
    )?;
    drop(set);
    let t = Instant::now();
    let recipients = {
        let _enter = runtime.enter();
        Recipients::new(config, Some(path))
    };
    println!(
        "cache of {n} addresses loaded in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&state);

    // The probes: 3 known (one upper-cased) for 1 unknown in a covered domain.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let probes: Vec<(String, Lookup)> = (0..100_000)
        .map(|k| {
            let i = rng.below(n);
            match k % 4 {
                0 => (address(i).to_uppercase(), Lookup::Known),
                1 | 2 => (address(i), Lookup::Known),
                _ => (
                    format!("nobody{i}@division{}.example.com", i % 8),
                    Lookup::Unknown,
                ),
            }
        })
        .collect();
    for (probe, want) in probes.iter().take(1000) {
        let got = recipients.check(probe);
        if got != *want {
            bail!("{probe}: {got:?}, expected {want:?}");
        }
    }
    const BATCH: usize = 1000;
    let mut per_lookup: Vec<f64> = Vec::with_capacity(args.batches);
    let mut found = 0usize;
    for b in 0..args.batches {
        let start = (b * BATCH) % (probes.len() - BATCH);
        let t = Instant::now();
        for (probe, _) in &probes[start..start + BATCH] {
            found += usize::from(std::hint::black_box(recipients.check(probe)) == Lookup::Known);
        }
        per_lookup.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
    }
    std::hint::black_box(found);
    per_lookup.sort_by(f64::total_cmp);
    let pct = |p: f64| per_lookup[((per_lookup.len() - 1) as f64 * p) as usize];
    println!(
        "one thread, {} batches of {BATCH}: median {:.0} ns/lookup, p99 {:.0} ns, best {:.0} ns",
        args.batches,
        pct(0.5),
        pct(0.99),
        per_lookup[0]
    );

    // Two threads at once (the agent's runtime has 2 workers here).
    let recipients = Arc::new(recipients);
    let probes = Arc::new(probes);
    let per_thread = args.batches * BATCH / 2;
    let t = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|k| {
            let (recipients, probes) = (recipients.clone(), probes.clone());
            std::thread::spawn(move || {
                let mut found = 0usize;
                for j in 0..per_thread {
                    let (probe, _) = &probes[(j * 7 + k * 50_000) % probes.len()];
                    found += usize::from(recipients.check(probe) == Lookup::Known);
                }
                found
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    std::hint::black_box(total);
    let elapsed = t.elapsed();
    println!(
        "two threads: {:.1} M lookups/s together ({:.0} ns per lookup per thread)",
        (2 * per_thread) as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_nanos() as f64 / per_thread as f64
    );
    let stats = recipients.stats();
    if stats.lookups.known == 0 || stats.lookups.unknown == 0 {
        bail!("lookups were not counted: {:?}", stats.lookups);
    }
    Ok(())
}
