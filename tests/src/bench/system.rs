//! The host's side of a benchmark: stopping on a signal, the limits a load
//! run needs (descriptors, backlog, ports, conntrack), CPU and memory of
//! processes, helper processes that die with the benchmark, leftovers of
//! killed runs.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::netns::NetNs;

/// Set by SIGINT/SIGTERM once [`install_signal_handlers`] ran: loops wind
/// down and guards clean up.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM set [`STOP`] instead of killing the process, so that
/// namespaces, pins and helper processes are removed on the way out.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a handler that only stores to an atomic is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a signal asked the benchmark to stop.
#[must_use]
pub fn stopping() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// An error once a signal asked the benchmark to stop.
///
/// # Errors
/// After SIGINT or SIGTERM.
pub fn check_stop() -> Result<()> {
    ensure!(!stopping(), "interrupted");
    Ok(())
}

/// Sleeps `d`, or less once `stop` (or [`STOP`]) is set.
pub fn pause(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::Relaxed) && !stopping() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Whether process `pid` exists.
#[must_use]
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what earlier runs of a benchmark that were killed left behind:
/// namespaces `PREFIX-PID-N`, and directories `PREFIX-PID-…` in the host's
/// bpffs (pins) and the temp directory, whose PID is gone.
///
/// # Errors
/// When `ip netns` cannot be listed or a namespace cannot be deleted.
pub fn remove_stale(prefix: &str) -> Result<()> {
    for name in NetNs::remove_stale(prefix)? {
        eprintln!("removed stale namespace {name}");
    }
    let dead = |name: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
    };
    for dir in [PathBuf::from("/sys/fs/bpf"), std::env::temp_dir()] {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) && entry.path().is_dir() {
                eprintln!("removing stale {}", entry.path().display());
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE (soft, and hard when allowed) to `want`; returns
/// the soft limit in force afterwards. Children (the agent, Postfix)
/// inherit it.
///
/// # Errors
/// When the limit cannot be read.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass.
    unsafe {
        ensure!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0,
            "getrlimit(RLIMIT_NOFILE): {}",
            io::Error::last_os_error()
        );
        if lim.rlim_cur >= want {
            return Ok(lim.rlim_cur);
        }
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
            let err = io::Error::last_os_error();
            // Not allowed to raise the hard limit: take what there is.
            let fallback = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &fallback);
            eprintln!(
                "cannot raise RLIMIT_NOFILE to {want} ({err}; the hard limit is {} and raising it needs CAP_SYS_RESOURCE); using {}",
                lim.rlim_max, lim.rlim_max
            );
            return Ok(lim.rlim_max);
        }
    }
    Ok(want)
}

/// Reads a sysctl (`net/core/somaxconn`) of the calling thread's network
/// namespace.
#[must_use]
pub fn sysctl(key: &str) -> Option<String> {
    fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Sets the sysctls `(key, value)` inside namespace `ns` (they are per
/// namespace: the host's stay as they are).
///
/// # Errors
/// When one cannot be written.
pub fn set_sysctls(ns: &NetNs, values: &[(&str, &str)]) -> Result<()> {
    ns.run(|| {
        for (key, value) in values {
            let path = Path::new("/proc/sys").join(key);
            fs::write(&path, value)
                .map_err(|e| anyhow::anyhow!("cannot set {key} = {value} in {}: {e}", ns.name()))?;
        }
        Ok(())
    })
}

/// One line on the host limits a load benchmark depends on, as seen in
/// namespace `ns` (descriptors of this process, listen backlog, SYN
/// backlog, local ports, conntrack), for the report.
#[must_use]
pub fn limits_line(ns: &NetNs) -> String {
    let nofile = {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we pass.
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
        lim.rlim_cur
    };
    let read = |k: &str| ns.run(|| sysctl(k)).unwrap_or_else(|| "-".into());
    format!(
        "RLIMIT_NOFILE {nofile}; in {}: somaxconn {}, tcp_max_syn_backlog {}, ip_local_port_range {}, nf_conntrack_max {} (conntrack tracks a namespace only when a rule there asks for it)",
        ns.name(),
        read("net/core/somaxconn"),
        read("net/ipv4/tcp_max_syn_backlog"),
        read("net/ipv4/ip_local_port_range"),
        read("net/netfilter/nf_conntrack_max"),
    )
}

/// Makes the child get SIGKILL when this process dies (after switching to
/// `user` first, if given: a change of user would clear the signal), so
/// that no helper outlives a killed benchmark.
pub fn die_with_parent(cmd: &mut Command, user: Option<(libc::uid_t, libc::gid_t)>) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// The uid and gid of `nobody` (and its group), if there is one.
#[must_use]
pub fn nobody() -> Option<(libc::uid_t, libc::gid_t)> {
    let name = std::ffi::CString::new("nobody").ok()?;
    // SAFETY: getpwnam gets a NUL-terminated name; the record is read at
    // once (no other thread of a benchmark calls getpwnam).
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: pw is a valid record from getpwnam.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

/// `VmRSS` of a process in KiB (`"self"` or a pid).
///
/// # Errors
/// When the process is gone or its status has no `VmRSS`.
pub fn rss_kib(pid: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status has no VmRSS"))
}

/// CPU time (user + system) of a process so far, in seconds; with
/// `children`, plus that of the children it has reaped.
#[must_use]
pub fn process_cpu(pid: i32, children: bool) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime, cstime are fields 14 to 17 of proc_pid_stat(5),
    // 12 to 15 after the command name; in clock ticks.
    let n = if children { 4 } else { 2 };
    let mut ticks = 0.0;
    for i in 11..11 + n {
        ticks += fields.get(i)?.parse::<f64>().ok()?;
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// The command name (`/proc/PID/comm`) of a process.
#[must_use]
pub fn process_name(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Busy and total CPU time of the whole machine so far (/proc/stat), in
/// clock ticks.
#[must_use]
pub fn machine_cpu() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

/// CPU time of the calling thread so far, in seconds.
#[must_use]
pub fn thread_cpu() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// The last `n` lines of a file (empty if unreadable).
#[must_use]
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
