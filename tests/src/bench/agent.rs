//! The real agent (`smtp-limiter run`) for a benchmark: a configuration
//! the benchmark writes, a directory and pin path of its own, started in a
//! network namespace (`nsenter --net`, so that its maps are pinned in the
//! host's bpffs) or on the host, waited for until it serves, and stopped
//! with SIGTERM (SIGKILL after 10 s). It gets SIGTERM if the benchmark dies.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::args::workspace_root;
use super::smtp_client::blocking::Smtp;
use super::system::{self, check_stop, tail};
use crate::netns::NetNs;

/// How long the agent may take to serve.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long it may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What to start and how to tell that it serves.
pub struct AgentOptions<'a> {
    pub binary: &'a Path,
    /// Where it runs; `None`: the host's namespace.
    pub netns: Option<&'a NetNs>,
    /// Names its directory (temp dir) and pin path (/sys/fs/bpf):
    /// `PREFIX-PID-N`, which [`system::remove_stale`] recognises.
    pub prefix: &'a str,
    /// Tells the agents of one process apart.
    pub n: usize,
    /// The SMTP listener: ready once it greets with 220.
    pub listen: SocketAddr,
    /// The metrics address (in `netns`): ready once it answers.
    pub metrics: SocketAddr,
    /// Ready only once `smtp_limiter_kernel_up` is 1.
    pub kernel_required: bool,
    /// Keep the directory (config, log, state) after stopping.
    pub keep: bool,
}

/// The agent's own paths, for its configuration.
pub struct AgentPaths {
    /// Config, log, control socket, state directory live here.
    pub dir: PathBuf,
    /// `kernel.pin_path`.
    pub pins: PathBuf,
}

/// A running agent; dropping it stops it and removes its pins and
/// directory.
pub struct Agent<'a> {
    child: Option<Child>,
    netns: Option<&'a NetNs>,
    metrics: SocketAddr,
    paths: AgentPaths,
    log: PathBuf,
    keep: bool,
}

impl<'a> Agent<'a> {
    /// Writes the configuration `config(paths)` returns and starts the
    /// agent with it (`run --json-logs`, and `--ebpf-object` from
    /// `LIMITER_EBPF_OBJECT` when set); returns once it serves.
    ///
    /// # Errors
    /// When it cannot start, exits, or does not serve within 30 s (with the
    /// tail of its log).
    pub fn start(
        opts: &AgentOptions<'a>,
        config: impl FnOnce(&AgentPaths) -> String,
    ) -> Result<Self> {
        let tag = format!("{}-{}-{}", opts.prefix, std::process::id(), opts.n);
        let dir = std::env::temp_dir().join(&tag);
        let pins = PathBuf::from("/sys/fs/bpf").join(&tag);
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(&pins);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut agent = Agent {
            child: None,
            netns: opts.netns,
            metrics: opts.metrics,
            log: dir.join("agent.log"),
            paths: AgentPaths { dir, pins },
            keep: opts.keep,
        };
        let file = agent.paths.dir.join("agent.toml");
        fs::write(&file, config(&agent.paths))
            .with_context(|| format!("cannot write {}", file.display()))?;
        let mut cmd = match opts.netns {
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.path())).arg(opts.binary);
                cmd
            }
            None => Command::new(opts.binary),
        };
        cmd.args(["run", "--json-logs", "--config"]).arg(&file);
        if let Some(object) = std::env::var_os("LIMITER_EBPF_OBJECT") {
            cmd.arg("--ebpf-object").arg(object);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&agent.log)?)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe: if the benchmark dies, the
        // agent gets SIGTERM.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        agent.child = Some(
            cmd.spawn()
                .with_context(|| format!("cannot start {}", opts.binary.display()))?,
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            check_stop()?;
            if let Some(status) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "the agent exited ({status}) while starting; its log:\n{}",
                    tail(&agent.log, 15)
                );
            }
            if let Ok(m) = agent.metrics() {
                let up = m.get("smtp_limiter_kernel_up").copied().unwrap_or(0.0);
                if (!opts.kernel_required || up == 1.0) && agent.greets(opts.listen) {
                    return Ok(agent);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent was not ready within {READY_TIMEOUT:?} (metrics on {}, 220 on {}{}); its log:\n{}",
                    opts.metrics,
                    opts.listen,
                    if opts.kernel_required { ", kernel up" } else { "" },
                    tail(&agent.log, 15)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `f` in the agent's namespace (on the host when it has none).
    fn in_netns<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.netns {
            Some(ns) => ns.run(f),
            None => f(),
        }
    }

    fn greets(&self, listen: SocketAddr) -> bool {
        self.in_netns(|| -> Result<bool> {
            let s = TcpStream::connect_timeout(&listen, Duration::from_secs(1))?;
            let mut smtp = Smtp::new(s, Duration::from_secs(3))?;
            let r = smtp.reply()?;
            smtp.quit();
            Ok(r.code == 220)
        })
        .unwrap_or(false)
    }

    /// The Prometheus metrics, `name{labels}` → value.
    ///
    /// # Errors
    /// When the metrics endpoint does not answer with 200.
    pub fn metrics(&self) -> Result<BTreeMap<String, f64>> {
        let addr = self.metrics;
        let text = self.in_netns(|| -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })?;
        ensure!(text.starts_with("HTTP/1.1 200"), "metrics: {text:.80}");
        Ok(parse_metrics(&text))
    }

    /// The agent's process id (`nsenter` execs it: the same process).
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// CPU time (user + system) the agent has used so far, in seconds.
    #[must_use]
    pub fn cpu_secs(&self) -> Option<f64> {
        system::process_cpu(self.pid()? as i32, false)
    }

    /// The agent's resident memory now, KiB.
    #[must_use]
    pub fn rss_kib(&self) -> Option<u64> {
        system::rss_kib(&self.pid()?.to_string()).ok()
    }

    /// Its directory, configuration and pins.
    #[must_use]
    pub fn paths(&self) -> &AgentPaths {
        &self.paths
    }

    /// Its log (JSON lines on stderr).
    #[must_use]
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// SIGTERM, then SIGKILL after 10 s; then (drop) removes the pins and
    /// the directory.
    ///
    /// # Errors
    /// When it had to be killed.
    pub fn stop(mut self) -> Result<()> {
        ensure!(
            self.stop_child(),
            "the agent did not stop within {STOP_TIMEOUT:?} of SIGTERM (killed); its log:\n{}",
            tail(&self.log, 15)
        );
        Ok(())
    }

    /// Whether it stopped on SIGTERM (or had already exited).
    fn stop_child(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("the agent did not stop within {STOP_TIMEOUT:?} of SIGTERM: killing it");
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        true
    }
}

impl Drop for Agent<'_> {
    fn drop(&mut self) {
        self.stop_child();
        if self.paths.pins.exists() {
            if let Err(e) = fs::remove_dir_all(&self.paths.pins) {
                eprintln!("removing {}: {e}", self.paths.pins.display());
            }
        }
        if !self.keep {
            let _ = fs::remove_dir_all(&self.paths.dir);
        }
    }
}

/// A configuration for the proxy inside the benchmark's process
/// ([`crate::proxy::TestProxy`]): listening on 127.0.0.1 and a free port,
/// relaying to `backend` with `identity`, the kernel layer off, no
/// per-source connection limit or rate (every client is 127.0.0.1), mail for
/// example.com accepted; `smtp` and `limits` are lines added to those
/// tables, `extra` more tables.
#[must_use]
pub fn loopback_config(
    backend: SocketAddr,
    identity: &str,
    smtp: &str,
    limits: &str,
    extra: &str,
) -> String {
    format!(
        r#"mode = "enforce"

[[listen]]
address = "127.0.0.1:0"

[backend]
address = "{backend}"
identity = "{identity}"
connect_timeout = "5s"

[kernel]
mode = "off"

[smtp]
{smtp}

[limits]
max_connections_per_source = 0
connection_rate = "0/1m"
connection_rate_per_network = "0/1m"
{limits}

[relay]
accept = "*@example.com"

{extra}
"#
    )
}

/// Prometheus text → `name{labels}` → value (only `smtp_limiter_` lines).
#[must_use]
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with("smtp_limiter_"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// The newest modification time of the files under `paths`.
fn newest(paths: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::metadata(&p) else { continue };
        if meta.is_dir() {
            stack.extend(
                fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(Some(m));
        }
    }
    newest
}

/// The agent binary: `explicit` (`--agent`), or the one built next to this
/// benchmark (target/release/smtp-limiter under `cargo xtask bench`),
/// which must be newer than the agent's sources. The kernel object comes
/// from LIMITER_EBPF_OBJECT when set (`cargo xtask bench` builds it and
/// sets it).
///
/// The benchmark does not build the agent itself: a `cargo build` started
/// from a process that `cargo run` started inherits its CARGO_PKG_* and
/// CARGO_MANIFEST_DIR, which ring's build script depends on, and ring and
/// everything above it would be rebuilt on every switch.
///
/// # Errors
/// When there is none, or it is older than the sources.
pub fn agent_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(a) = explicit {
        return Ok(a.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .context("current_exe has no directory")?
        .join("smtp-limiter");
    let hint = "build it with `cargo xtask build --release`, or pass --agent PATH";
    let built = fs::metadata(&binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("no agent at {}: {hint}", binary.display()))?;
    let root = workspace_root();
    let sources = newest(&[
        root.join("limiter-user/src"),
        root.join("limiter-user/build.rs"),
        root.join("limiter-user/Cargo.toml"),
        root.join("limiter-common/src"),
    ]);
    ensure!(
        sources.is_none_or(|s| s <= built),
        "{} is older than the agent's sources: {hint}",
        binary.display()
    );
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines() {
        let m = parse_metrics(
            "HTTP/1.1 200 OK\r\n\r\n# HELP x\nsmtp_limiter_kernel_up 1\nsmtp_limiter_rejections_total{reason=\"shed-idle\"} 12\nother 3\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m["smtp_limiter_kernel_up"], 1.0);
        assert_eq!(
            m["smtp_limiter_rejections_total{reason=\"shed-idle\"}"],
            12.0
        );
    }

    #[test]
    fn loopback_configs_parse() {
        let backend: SocketAddr = "127.0.0.1:2525".parse().unwrap();
        for (smtp, limits, extra) in [
            ("", "", ""),
            (
                "command_timeout = \"10m\"",
                "max_failed_rcpt = 1000",
                "[filters.rspamd]\nurl = \"http://127.0.0.1:1\"",
            ),
        ] {
            let text = loopback_config(backend, "proxy-v2", smtp, limits, extra);
            limiter_user::config::Config::from_toml(&text)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
        }
    }
}
