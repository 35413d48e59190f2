//! What the private-server fixtures ([`crate::postfix`], [`crate::slapd`],
//! [`crate::rspamd`], [`crate::clamd`]) share: the prerequisite rule of the
//! tests ([`require`]), the instance directory under /tmp ([`Server`],
//! [`InstanceDir`]), a server run as a child process ([`ChildProcess`]),
//! and small helpers (free ports, polling, signals, /proc scans).
//!
//! An instance directory is named `smtp-limiter-<name>.<pid>.<n>.<nanos>`
//! (the pid is the test process's). It is removed when its [`InstanceDir`]
//! is dropped, unless `<NAME>_FIXTURE_KEEP` is set; directories whose test
//! process is gone (killed before its `Drop`) are stopped and removed by
//! the next test process that starts an instance of that server.

use std::fs;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

pub use crate::tcp::wait_until;

/// How long [`ChildProcess::stop`] waits after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a test can run: `missing` says why not. Outside CI a missing
/// prerequisite skips the test with a message; under `CI=true` it fails
/// the test (panics).
pub fn require(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: {why} (CI=true: this test must run, not be skipped)")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why}");
            false
        }
    }
}

/// One kind of private server: its name, its keep variable, and how to
/// stop what a dead test process left in one of its directories.
pub struct Server {
    name: &'static str,
    keep_var: &'static str,
    stop_stale: fn(dir: &Path, owner: u32),
    reaped: Once,
}

impl Server {
    /// `name` (`"clamd"`): directories `smtp-limiter-clamd.…`, messages
    /// `clamd fixture: …`. `keep_var` (`"CLAMD_FIXTURE_KEEP"`): when set,
    /// directories are kept. `stop_stale`: stops the processes of a stale
    /// instance (its directory, the dead test process) before the
    /// directory is removed.
    #[must_use]
    pub const fn new(
        name: &'static str,
        keep_var: &'static str,
        stop_stale: fn(dir: &Path, owner: u32),
    ) -> Server {
        Server {
            name,
            keep_var,
            stop_stale,
            reaped: Once::new(),
        }
    }

    /// `cannot start NAME: WHY` for a missing prerequisite; else
    /// `try_start`, tried again (3 times in all) while its error says
    /// `Address already in use` (the free port, found by binding port 0 and
    /// closing the socket, was taken before the server bound it).
    ///
    /// # Errors
    /// The prerequisite, or `try_start`'s last error.
    pub fn start<T>(
        &self,
        missing: Option<String>,
        mut try_start: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        if let Some(why) = missing {
            bail!("cannot start {}: {why}", self.name);
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match try_start() {
                Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                    eprintln!("{} fixture: port taken, trying another ({e:#})", self.name);
                }
                other => return other,
            }
        }
    }

    /// A new empty instance directory in /tmp, after (once per process)
    /// stopping and removing the stale ones.
    ///
    /// # Errors
    /// It could not be created.
    pub fn new_dir(&'static self) -> Result<InstanceDir> {
        self.reap_stale();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!(
            "{}.{}.{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(format!("{}{id}", self.prefix()));
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(InstanceDir {
            path,
            id,
            server: self,
            keep: false,
        })
    }

    fn prefix(&self) -> String {
        format!("smtp-limiter-{}.", self.name)
    }

    fn reap_stale(&self) {
        self.reaped.call_once(|| {
            let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
                return;
            };
            let prefix = self.prefix();
            for entry in entries.filter_map(|e| e.ok()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(owner) = crate::dead_fixture_owner(&name, &prefix) else {
                    continue;
                };
                let dir = entry.path();
                (self.stop_stale)(&dir, owner);
                let _ = fs::remove_dir_all(&dir);
            }
        });
    }
}

/// An instance's directory: removed on drop unless the server's keep
/// variable is set (or [`InstanceDir::keep`] was called).
pub struct InstanceDir {
    path: PathBuf,
    id: String,
    server: &'static Server,
    keep: bool,
}

impl InstanceDir {
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name's part after the prefix: `PID.N.NANOS`.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `path/file`.
    #[must_use]
    pub fn join(&self, file: impl AsRef<Path>) -> PathBuf {
        self.path.join(file)
    }

    /// The file `file` of the directory, empty if it cannot be read.
    #[must_use]
    pub fn read(&self, file: &str) -> String {
        fs::read(self.path.join(file))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The lines of `file` that contain `needle`.
    #[must_use]
    pub fn lines_with(&self, file: &str, needle: &str) -> Vec<String> {
        self.read(file)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// The server's log `NAME.log`, then what it printed on stdout/stderr
    /// (`NAME.out`, see [`ChildProcess::spawn`]) if anything.
    #[must_use]
    pub fn log_and_output(&self) -> String {
        let name = self.server.name;
        let mut log = self.read(&format!("{name}.log"));
        let out = self.read(&format!("{name}.out"));
        if !out.trim().is_empty() {
            log.push_str(&format!("--- {name} stdout/stderr:\n"));
            log.push_str(&out);
        }
        log
    }

    /// Keeps the directory when dropped (it has the log of what went
    /// wrong).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for InstanceDir {
    fn drop(&mut self) {
        let name = self.server.name;
        if self.keep {
            eprintln!("{name} fixture: kept {}", self.path.display());
            return;
        }
        if std::env::var_os(self.server.keep_var).is_some() {
            eprintln!(
                "{name} fixture: kept {} ({})",
                self.path.display(),
                self.server.keep_var
            );
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("{name} fixture: removing {}: {e}", self.path.display());
        }
    }
}

/// A server run in the foreground as a child of the test process; stopped
/// (SIGTERM, SIGKILL after 5 s) when dropped.
pub struct ChildProcess {
    name: &'static str,
    child: Option<Child>,
}

impl ChildProcess {
    /// Starts `command` (`name` is the server's), stdin from /dev/null,
    /// stdout and stderr into the file `output`.
    ///
    /// # Errors
    /// The file could not be created or the program not started.
    pub fn spawn(name: &'static str, command: &mut Command, output: &Path) -> Result<Self> {
        let out =
            fs::File::create(output).with_context(|| format!("creating {}", output.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(ChildProcess {
            name,
            child: Some(child),
        })
    }

    /// The pid (0 once stopped).
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Polls `ready` until it holds. Fails when the process exits first
    /// (`NAME exited at start (STATUS): LOG`) or after `timeout`
    /// (`NAME did not WHAT within TIMEOUT: LOG`), `log` being what it
    /// wrote so far.
    ///
    /// # Errors
    /// See above.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
        log: impl Fn() -> String,
    ) -> Result<()> {
        let mut exited = None;
        let ok = wait_until(timeout, || {
            exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            exited.is_some() || ready()
        });
        if let Some(status) = exited {
            self.child = None;
            bail!("{} exited at start ({status}): {}", self.name, log());
        }
        if !ok {
            bail!("{} did not {what} within {timeout:?}: {}", self.name, log());
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s; returns once the process is gone.
    /// Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            signal(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGKILLs `processes()` until none is left; whether that happened within
/// `timeout`.
pub fn kill_all(timeout: Duration, processes: impl Fn() -> Vec<i32>) -> bool {
    wait_until(timeout, || {
        let pids = processes();
        for &pid in &pids {
            signal(pid, libc::SIGKILL);
        }
        pids.is_empty()
    })
}

/// kill(2). Callers pass their own child or a process of one of their
/// instances (found by its directory).
pub fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The pids in /proc that `is_ours` accepts.
#[must_use]
pub fn processes(is_ours: impl Fn(i32) -> bool) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| is_ours(pid))
        .collect()
}

/// The process whose pid is in `dir/pid_file`, if it is still running
/// and its command line names `dir` (a server started with a configuration
/// file in its instance directory).
#[must_use]
pub fn pid_file_process(dir: &Path, pid_file: &str) -> Option<i32> {
    let pid = fs::read_to_string(dir.join(pid_file))
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(&dir.display().to_string()))
        .then_some(pid)
}

/// The first of `dirs` that has the program `name`.
///
/// # Errors
/// None has it: `NAME not found in DIRS (HINT)`.
pub fn find_program(name: &str, dirs: &[&str], hint: &str) -> Result<PathBuf> {
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found in {} ({hint})", dirs.join(", ")))
}

/// A port on 127.0.0.1 that was free a moment ago.
///
/// # Errors
/// Binding port 0 failed.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Writes `text` to `path`, naming the path in the error.
///
/// # Errors
/// The write failed.
pub fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
