//! `cargo xtask demo`: the product under attack, in one command.
//!
//! As root, the demo creates two network namespaces of its own (a server and
//! a client side, `sld-srv-<pid>` / `sld-cli-<pid>`) joined by a veth pair,
//! starts the agent in the server namespace (`nsenter --net=…`, which keeps
//! the host's mount namespace, so the maps are pinned in the host's bpffs)
//! with `config/demo.toml` and the built-in backend, attaches XDP to the
//! server end, and drives traffic from the client namespace: three
//! legitimate senders, a directory harvester, a null-sender flood, an AUTH
//! brute-forcer, an open-relay prober, a reject-listed host and a SYN flood
//! from a blocked address. It prints progress once a second, then a report,
//! and checks it: every legitimate message delivered, every attacker blocked
//! for its reason, the kernel dropping, and nothing left behind.
//!
//! Without root or without BPF it says why and runs the userspace part
//! (`kernel.mode = "off"`, the proxy on 127.0.0.1, the actors on 127.0.0.x).
//!
//! Everything the demo creates is removed again by [`Cleanup`] — after the
//! report, on an error, on a panic (its `Drop`), and on Ctrl-C or SIGTERM
//! (a handler sets [`STOP`], which every loop checks).

use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::build::{self, Workspace};
use crate::{cmd, setup, toolchain};

/// The agent's log filter: `info`, and the built-in backend's per-message
/// events ([`BACKEND_MESSAGE`]).
const BACKEND_LOG_FILTER: &str = "info,limiter_user::sink=debug";
/// The built-in backend's event for a message it received in full (with
/// the client the proxy named in its PROXY header).
const BACKEND_MESSAGE: &str = "built-in backend: message discarded";

/// Set by SIGINT/SIGTERM: every loop of the demo checks it and winds down.
static STOP: AtomicBool = AtomicBool::new(false);

/// What `cargo xtask demo` was asked for.
pub struct Options {
    /// The short run for CI (well under a minute).
    pub quick: bool,
    /// Leave the pinned maps in place at the end (for bpftool).
    pub keep: bool,
    /// Fail instead of falling back to the userspace part.
    pub require_kernel: bool,
    /// Run the userspace part only, even as root.
    pub userspace: bool,
    /// Also write the agent's log (JSON lines) to this file.
    pub agent_log: Option<PathBuf>,
}

/// How long and how hard each actor goes.
#[derive(Clone, Copy)]
struct Plan {
    quick: bool,
    /// Messages per legitimate sender.
    legit_messages: u32,
    /// Gap between two messages of one legitimate sender.
    legit_interval: Duration,
    /// Parallel connections of the null-sender flood.
    flood_connections: usize,
    /// Connection attempts per burst of the SYN flood, and bursts.
    syn_burst: usize,
    syn_bursts: usize,
    /// No actor runs past this (from the start of the traffic).
    deadline: Duration,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                legit_messages: 25,
                legit_interval: Duration::from_millis(200),
                flood_connections: 8,
                syn_burst: 200,
                syn_bursts: 1,
                deadline: Duration::from_secs(25),
            }
        } else {
            Self {
                quick,
                legit_messages: 150,
                legit_interval: Duration::from_millis(200),
                flood_connections: 16,
                syn_burst: 200,
                syn_bursts: 5,
                deadline: Duration::from_secs(90),
            }
        }
    }
}

/// `cargo xtask demo`.
pub fn demo(ws: &Workspace, options: &Options) -> Result<()> {
    install_signal_handlers();
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let root = euid == 0;

    // Build what is needed: as root everything (setup installs what is
    // missing); without root the setup may be incomplete, and the userspace
    // part only needs the agent itself.
    if root {
        setup::setup()?;
        build::build(ws, false)?;
    } else {
        let built = setup::setup().and_then(|()| build::build(ws, false));
        if let Err(e) = built {
            eprintln!("note: the full build needs the setup that only root can complete ({e:#}); building the userspace agent alone");
            cmd::run(toolchain::cargo().current_dir(&ws.root).args([
                "build",
                "-p",
                "limiter-user",
                "--bin",
                "smtp-limiter",
            ]))?;
        }
    }
    check_stop()?;
    let binary = ws.agent_binary(false);
    let template_path = ws.root.join("config").join("demo.toml");
    let template = std::fs::read_to_string(&template_path).with_context(|| {
        format!(
            "cannot read the demo configuration {}",
            template_path.display()
        )
    })?;
    let plan = Plan::new(options.quick);

    let no_kernel = if options.userspace {
        Some("--userspace was given".to_owned())
    } else if !root {
        Some(format!(
            "not running as root (effective uid {}): network namespaces, veth, XDP and the \
             bpffs pins need root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF)",
            euid
        ))
    } else {
        kernel_prerequisites().err()
    };
    remove_stale();

    let ctx = Demo {
        binary,
        template,
        template_path,
        plan,
        keep: options.keep,
        agent_log: options.agent_log.clone(),
    };
    let report = match no_kernel {
        Some(why) if options.require_kernel => {
            bail!("--require-kernel: the kernel part cannot run: {why}")
        }
        Some(why) => ctx.run_userspace(why)?,
        None => match ctx.run_kernel() {
            Err(e) if e.downcast_ref::<KernelUnavailable>().is_some() => {
                if options.require_kernel {
                    return Err(e.context("--require-kernel"));
                }
                ctx.run_userspace(format!("{e:#}"))?
            }
            other => other?,
        },
    };
    if report.failed() {
        bail!("the demo's checks failed: {}", report.failures().join("; "));
    }
    Ok(())
}

/// The agent could not bring up its kernel layer (kernel.mode = "required").
#[derive(Debug)]
struct KernelUnavailable(String);

impl std::fmt::Display for KernelUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelUnavailable {}

/// Ctrl-C (or SIGTERM) was received.
fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted: stopped and cleaned up");
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
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

/// What the kernel part needs besides root: bpffs mounted at /sys/fs/bpf,
/// and iproute2 and nsenter to make and enter the namespaces.
fn kernel_prerequisites() -> Result<(), String> {
    // `setup` (run before) mounts it as root; this stays for runs where that failed.
    if !setup::bpffs_mounted() {
        return Err(
            "no BPF filesystem is mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)".into(),
        );
    }
    for tool in ["ip", "nsenter"] {
        if toolchain::find_in_path(tool).is_none() {
            return Err(format!(
                "`{tool}` is not installed ({})",
                if tool == "ip" {
                    "iproute2"
                } else {
                    "util-linux"
                }
            ));
        }
    }
    Ok(())
}

/// Removes what demos that were killed (SIGKILL: no cleanup) left: their
/// `sld-srv-<pid>` / `sld-cli-<pid>` namespaces, and for a run whose
/// temporary directory is still there its pins too. Pins without that
/// directory were kept on purpose (`--keep`): only say so.
fn remove_stale() {
    let dead =
        |pid: &str| pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(out) = quiet("ip", &["netns", "list"]) {
        for name in out.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name
                .strip_prefix("sld-srv-")
                .or_else(|| name.strip_prefix("sld-cli-"))
            else {
                continue;
            };
            if dead(pid) {
                eprintln!("removing namespace {name}, left by a demo that was killed");
                let _ = quiet("ip", &["netns", "del", name]);
            }
        }
    }
    let pins = std::fs::read_dir("/sys/fs/bpf");
    for entry in pins.into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("smtp-limiter-demo-") else {
            continue;
        };
        if !dead(pid) {
            continue;
        }
        let temp = std::env::temp_dir().join(&name);
        if temp.is_dir() {
            eprintln!(
                "removing /sys/fs/bpf/{name} and {}, left by a demo that was killed",
                temp.display()
            );
            let _ = std::fs::remove_dir_all(entry.path());
            let _ = std::fs::remove_dir_all(&temp);
        } else {
            eprintln!(
                "note: /sys/fs/bpf/{name} holds the pins an earlier demo kept (--keep); remove them with: rm -r /sys/fs/bpf/{name}"
            );
        }
    }
    // Temporary directories of killed userspace-only runs.
    if let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("smtp-limiter-demo-") {
                if dead(pid) && entry.path().is_dir() {
                    eprintln!(
                        "removing {}, left by a demo that was killed",
                        entry.path().display()
                    );
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

/// Runs a command quietly; its stdout, or an error naming it with stderr.
fn quiet(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{program} {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip [-n NS] -batch -` with one command per line.
fn ip_batch(ns: Option<&str>, commands: &[String]) -> Result<()> {
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start `ip -batch -`")?;
    let mut input = commands.join("\n");
    input.push('\n');
    child
        .stdin
        .take()
        .context("ip's stdin")?
        .write_all(input.as_bytes())
        .context("feeding `ip -batch -`")?;
    let out = child
        .wait_with_output()
        .context("waiting for `ip -batch -`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}) on:\n{input}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Cleanup

/// Everything the demo created; [`Cleanup::run`] removes it (also on drop).
#[derive(Default)]
struct Cleanup {
    agent: Option<Child>,
    namespaces: Vec<String>,
    pin_dir: Option<PathBuf>,
    keep_pins: bool,
    temp_dir: Option<PathBuf>,
    done: bool,
}

impl Cleanup {
    /// Stops the agent (SIGTERM, then SIGKILL after 10 s), deletes the
    /// namespaces (and with them the veth pair), the pins unless kept, and
    /// the temporary directory. Returns what could not be removed.
    fn run(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(mut agent) = self.agent.take() {
            if let Err(e) = stop_child(&mut agent, Duration::from_secs(10)) {
                problems.push(format!("agent (pid {}): {e}", agent.id()));
            }
        }
        for ns in self.namespaces.drain(..) {
            if let Err(e) = quiet("ip", &["netns", "del", &ns]) {
                problems.push(format!("namespace {ns}: {e:#}"));
            }
        }
        if let Some(pins) = self.pin_dir.take() {
            if !self.keep_pins && pins.exists() {
                if let Err(e) = std::fs::remove_dir_all(&pins) {
                    problems.push(format!("pins {}: {e}", pins.display()));
                }
            }
        }
        if let Some(dir) = self.temp_dir.take() {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    problems.push(format!("{}: {e}", dir.display()));
                }
            }
        }
        self.done = true;
        problems
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.done {
            for problem in self.run() {
                eprintln!("demo cleanup: {problem}");
            }
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL.
fn stop_child(child: &mut Child, grace: Duration) -> io::Result<()> {
    if child.try_wait()?.is_some() {
        return Ok(());
    }
    let pid = libc::pid_t::try_from(child.id()).map_err(io::Error::other)?;
    // SAFETY: signalling our own child, which has not been reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("the agent did not stop within {grace:?} of SIGTERM: killing it");
    child.kill()?;
    child.wait().map(drop)
}

// ---------------------------------------------------------------------------
// The run

/// Where the actors live and what they connect to.
#[derive(Clone)]
struct Addrs {
    /// The proxy's listeners.
    server_v4: SocketAddr,
    server_v6: Option<SocketAddr>,
    /// The client namespace to enter, when there is one.
    client_ns: Option<String>,
    legit: [IpAddr; 3],
    harvester: IpAddr,
    flood: IpAddr,
    auth: IpAddr,
    relay: IpAddr,
    rejected: IpAddr,
}

impl Addrs {
    fn kernel(client_ns: &str) -> Self {
        let v4 = |h| IpAddr::V4(Ipv4Addr::new(10, 250, 0, h));
        Self {
            server_v4: SocketAddr::new(v4(1), 25),
            server_v6: Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 1)),
                25,
            )),
            client_ns: Some(client_ns.to_owned()),
            legit: [
                v4(10),
                v4(11),
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x250, 0, 0, 0, 0, 0, 0x12)),
            ],
            harvester: v4(13),
            flood: v4(14),
            auth: v4(15),
            relay: v4(16),
            rejected: v4(17),
        }
    }

    fn loopback(port: u16) -> Self {
        let v4 = |h| IpAddr::V4(Ipv4Addr::new(127, 0, 0, h));
        Self {
            server_v4: SocketAddr::new(v4(1), port),
            server_v6: None,
            client_ns: None,
            legit: [v4(10), v4(11), v4(12)],
            harvester: v4(13),
            flood: v4(14),
            auth: v4(15),
            relay: v4(16),
            rejected: v4(17),
        }
    }

    /// The listener for a source of the same family.
    fn server_for(&self, source: IpAddr) -> SocketAddr {
        match (source, self.server_v6) {
            (IpAddr::V6(_), Some(v6)) => v6,
            _ => self.server_v4,
        }
    }
}

struct Demo {
    binary: PathBuf,
    template: String,
    template_path: PathBuf,
    plan: Plan,
    keep: bool,
    agent_log: Option<PathBuf>,
}

/// What the placeholders of config/demo.toml become.
struct Fill<'a> {
    listen_v4: String,
    listen_v6: Option<String>,
    backend: String,
    kernel_mode: &'a str,
    interface: &'a str,
    pin_path: &'a Path,
    rejected: IpAddr,
    dir: &'a Path,
    metrics: String,
}

impl Demo {
    fn config_text(&self, fill: &Fill<'_>) -> Result<String> {
        let mut text = String::new();
        let mut in_v6 = false;
        for line in self.template.lines() {
            match line.trim() {
                "# @IPV6-BEGIN@" => in_v6 = true,
                "# @IPV6-END@" => in_v6 = false,
                _ if in_v6 && fill.listen_v6.is_none() => {}
                _ => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
        let pairs = [
            ("@LISTEN_V4@", fill.listen_v4.clone()),
            ("@LISTEN_V6@", fill.listen_v6.clone().unwrap_or_default()),
            ("@BACKEND@", fill.backend.clone()),
            ("@KERNEL_MODE@", fill.kernel_mode.to_owned()),
            ("@INTERFACE@", fill.interface.to_owned()),
            ("@PIN_PATH@", fill.pin_path.display().to_string()),
            ("@REJECTED@", fill.rejected.to_string()),
            ("@DIR@", fill.dir.display().to_string()),
            ("@METRICS@", fill.metrics.clone()),
        ];
        for (key, value) in pairs {
            text = text.replace(key, &value);
        }
        // A placeholder the demo does not know is a template it cannot run.
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            if let Some(start) = line.find('@') {
                if line[start + 1..].contains('@') {
                    bail!(
                        "{}: unknown placeholder in {line:?}",
                        self.template_path.display()
                    );
                }
            }
        }
        Ok(text)
    }

    /// The kernel part: namespaces, veth, XDP, the agent in the server
    /// namespace.
    fn run_kernel(&self) -> Result<Report> {
        let pid = std::process::id();
        let srv = format!("sld-srv-{pid}");
        let cli = format!("sld-cli-{pid}");
        let srv_if = format!("sld-s{pid}");
        let cli_if = format!("sld-c{pid}");
        let pins = PathBuf::from(format!("/sys/fs/bpf/smtp-limiter-demo-{pid}"));
        let dir = std::env::temp_dir().join(format!("smtp-limiter-demo-{pid}"));
        let mut cleanup = Cleanup::default();
        cleanup.keep_pins = self.keep;

        println!(
            "== smtp-limiter demo (kernel + proxy{}) ==",
            if self.plan.quick { ", quick" } else { "" }
        );
        println!(
            "setting up: namespaces {srv} (server) and {cli} (clients), veth {srv_if} <-> {cli_if}"
        );
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        cleanup.temp_dir = Some(dir.clone());
        for ns in [&srv, &cli] {
            quiet("ip", &["netns", "add", ns]).map_err(|e| {
                anyhow!(KernelUnavailable(format!(
                    "cannot create network namespace {ns}: {e:#}"
                )))
            })?;
            cleanup.namespaces.push(ns.clone());
            quiet("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        quiet(
            "ip",
            &[
                "link", "add", &srv_if, "netns", &srv, "type", "veth", "peer", "name", &cli_if,
                "netns", &cli,
            ],
        )
        .map_err(|e| {
            anyhow!(KernelUnavailable(format!(
                "cannot create the veth pair: {e:#}"
            )))
        })?;
        ip_batch(
            Some(&srv),
            &[
                format!("addr add 10.250.0.1/24 dev {srv_if}"),
                format!("addr add fd00:250::1/64 dev {srv_if} nodad"),
                format!("link set {srv_if} up"),
            ],
        )?;
        let mut client_cmds: Vec<String> = (10..=20)
            .map(|h| format!("addr add 10.250.0.{h}/24 dev {cli_if}"))
            .collect();
        client_cmds.extend(
            (0x10..=0x20).map(|h| format!("addr add fd00:250::{h:x}/64 dev {cli_if} nodad")),
        );
        client_cmds.push(format!("link set {cli_if} up"));
        ip_batch(Some(&cli), &client_cmds)?;
        wait_link_up(&srv, &srv_if)?;
        wait_link_up(&cli, &cli_if)?;

        let addrs = Addrs::kernel(&cli);
        let config = dir.join("demo.toml");
        let text = self.config_text(&Fill {
            listen_v4: addrs.server_v4.to_string(),
            listen_v6: addrs.server_v6.map(|a| a.to_string()),
            backend: "127.0.0.1:2526".into(),
            kernel_mode: "required",
            interface: &srv_if,
            pin_path: &pins,
            rejected: addrs.rejected,
            dir: &dir,
            metrics: "127.0.0.1:9425".into(),
        })?;
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        cleanup.pin_dir = Some(pins.clone());

        let mut agent = Command::new("nsenter");
        agent
            .arg(format!("--net=/run/netns/{srv}"))
            .arg(&self.binary);
        let env = Env {
            binary: self.binary.clone(),
            config,
            dir,
            pins: Some(pins),
            namespaces: vec![srv, cli],
            interfaces: vec![srv_if],
            kernel: true,
            why_no_kernel: None,
        };
        self.run_with(agent, env, addrs, cleanup)
    }

    /// The userspace part: the agent on loopback with the kernel layer off.
    fn run_userspace(&self, why: String) -> Result<Report> {
        check_stop()?;
        println!();
        println!(
            "== smtp-limiter demo: userspace part only{} ==",
            if self.plan.quick { " (quick)" } else { "" }
        );
        println!("the kernel part cannot run: {why}");
        println!("running the proxy alone (kernel.mode = \"off\") on 127.0.0.1, with actors on 127.0.0.x; nothing is dropped in the kernel.");
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("smtp-limiter-demo-{pid}"));
        let mut cleanup = Cleanup::default();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        cleanup.temp_dir = Some(dir.clone());
        let [listen, backend, metrics] = free_ports()?;
        let addrs = Addrs::loopback(listen);
        let config = dir.join("demo.toml");
        let pins = dir.join("pins");
        let text = self.config_text(&Fill {
            listen_v4: addrs.server_v4.to_string(),
            listen_v6: None,
            backend: format!("127.0.0.1:{backend}"),
            kernel_mode: "off",
            interface: "lo",
            pin_path: &pins,
            rejected: addrs.rejected,
            dir: &dir,
            metrics: format!("127.0.0.1:{metrics}"),
        })?;
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let env = Env {
            binary: self.binary.clone(),
            config,
            dir,
            pins: None,
            namespaces: Vec::new(),
            interfaces: Vec::new(),
            kernel: false,
            why_no_kernel: Some(why),
        };
        self.run_with(Command::new(&self.binary), env, addrs, cleanup)
    }

    /// Starts the agent, drives the traffic, reports, cleans up, verifies.
    fn run_with(
        &self,
        mut agent: Command,
        env: Env,
        addrs: Addrs,
        mut cleanup: Cleanup,
    ) -> Result<Report> {
        check_stop()?;
        agent
            .args(["run", "--config"])
            .arg(&env.config)
            .arg("--json-logs")
            // The built-in backend logs each message it takes at debug
            // level: the demo counts deliveries there, at the backend, not
            // by the replies its clients saw.
            .env("RUST_LOG", BACKEND_LOG_FILTER)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C reaches the demo, which then
            // stops the agent in order.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe. If the demo itself is killed
        // (SIGKILL: no cleanup), the agent gets SIGTERM instead of living on.
        unsafe {
            agent.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let copy = match &self.agent_log {
            Some(path) => Some(
                std::fs::File::create(path)
                    .with_context(|| format!("--agent-log {}", path.display()))?,
            ),
            None => None,
        };
        eprintln!("$ {}", cmd::display(&agent));
        let mut child = agent
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::display(&agent)))?;
        let agent_pid = child.id();
        let log = AgentLog::follow(child.stderr.take().context("the agent's stderr")?, copy);
        cleanup.agent = Some(child);
        wait_for_agent(&mut cleanup, &env, &log)?;
        println!(
            "agent running (pid {agent_pid}), config {}: {}",
            env.config.display(),
            log.kernel_status()
                .unwrap_or_else(|| "kernel layer off".into())
        );
        let programs = if env.kernel {
            agent_programs(agent_pid)
        } else {
            None
        };

        // The traffic.
        let traffic = Traffic::new(&self.plan, addrs.clone());
        println!(
            "traffic from {}: 3 legitimate senders ({} messages each, one per {} ms), a harvester, a null-sender flood ({} connections), an AUTH brute-forcer, a relay prober, a reject-listed host, and a SYN flood ({} × {} connection attempts) once the harvester is blocked",
            if env.kernel { "the client namespace" } else { "127.0.0.x" },
            self.plan.legit_messages,
            self.plan.legit_interval.as_millis(),
            self.plan.flood_connections,
            self.plan.syn_bursts,
            self.plan.syn_burst,
        );
        log.set_epoch(traffic.start);
        let handles = traffic.spawn_all();
        let mut last = Instant::now();
        loop {
            let done = handles.iter().all(JoinHandle::is_finished);
            if done || STOP.load(Ordering::Relaxed) {
                break;
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                let stats = cli_json(&env, &["stats"]).ok();
                println!("{}", traffic.progress_line(&log, stats.as_ref()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let interrupted = STOP.load(Ordering::Relaxed);
        if interrupted {
            println!("interrupted: stopping the traffic and cleaning up…");
        }
        let mut panicked = Vec::new();
        for handle in handles {
            if let Err(payload) = handle.join() {
                let what = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                panicked.push(what);
            }
        }
        if interrupted {
            let mut left = cleanup.run();
            left.extend(leftovers(&env, agent_pid, programs.as_deref(), self.keep));
            if left.is_empty() {
                bail!("interrupted: everything the demo created was removed");
            }
            bail!("interrupted; left behind: {}", left.join("; "));
        }
        let elapsed = traffic.start.elapsed();
        // Let the last decisions reach the log and the maps.
        std::thread::sleep(Duration::from_millis(300));
        if let Some(status) = cleanup
            .agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let lines = log.lines();
            let tail: Vec<String> = lines[lines.len().saturating_sub(20)..]
                .iter()
                .map(|l| log_text(l))
                .collect();
            bail!(
                "the agent exited during the run ({status}); its last log lines:\n{}",
                indent(&tail.join("\n"))
            );
        }
        let stats = cli_json(&env, &["stats"]).context("`smtp-limiter stats --json`")?;
        let blocks =
            cli_json(&env, &["block", "list"]).context("`smtp-limiter block list --json`")?;

        // Stop and remove everything, then look for what remains.
        let mut problems = cleanup.run();
        // The agent is gone: read its log to the end, so that the backend's
        // last deliveries (and any duplicate) are counted.
        if !log.wait_ended(Duration::from_secs(10)) {
            problems.push("the agent's log did not reach its end within 10 s of its exit".into());
        }
        let leftovers = leftovers(&env, agent_pid, programs.as_deref(), self.keep);
        let report = Report::new(
            &env,
            &traffic,
            &log,
            &stats,
            &blocks,
            elapsed,
            problems,
            leftovers,
            panicked,
            self.keep,
            programs.is_some(),
        );
        report.print();
        Ok(report)
    }
}

/// Paths and facts of one run.
struct Env {
    binary: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    pins: Option<PathBuf>,
    namespaces: Vec<String>,
    interfaces: Vec<String>,
    kernel: bool,
    why_no_kernel: Option<String>,
}

fn free_ports() -> Result<[u16; 3]> {
    let listeners = [
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
        TcpListener::bind("127.0.0.1:0")?,
    ];
    let mut ports = [0; 3];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn wait_link_up(ns: &str, dev: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = quiet("ip", &["-n", ns, "link", "show", "dev", dev])?;
        if out.contains("LOWER_UP") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{dev} in {ns} did not come up:\n{out}");
        }
        check_stop()?;
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the agent's control socket. An agent that exits first with
/// the kernel layer refused is [`KernelUnavailable`]; any other exit is an
/// error with its log.
fn wait_for_agent(cleanup: &mut Cleanup, env: &Env, log: &AgentLog) -> Result<()> {
    let socket = env.dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        check_stop()?;
        let child = cleanup.agent.as_mut().context("the agent")?;
        if let Some(status) = child.try_wait()? {
            // Let the reader drain the last lines.
            std::thread::sleep(Duration::from_millis(200));
            let lines = log.lines();
            let errors: Vec<String> = lines
                .iter()
                .map(|l| log_text(l))
                .filter(|l| !l.is_empty())
                .collect();
            let text = errors.join("\n");
            if env.kernel && text.contains("the kernel layer could not be brought up") {
                let cause = errors
                    .iter()
                    .find(|l| l.contains("the kernel layer could not be brought up"))
                    .cloned()
                    .unwrap_or(text);
                bail!(KernelUnavailable(format!(
                    "the agent could not bring up its kernel layer ({})",
                    cause.trim_start_matches("smtp-limiter: ")
                )));
            }
            bail!(
                "the agent exited ({status}) before it was ready:\n{}",
                indent(&text)
            );
        }
        if socket.exists() && log.contains("control socket") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not open its control socket within 30 s:\n{}",
                indent(&log.lines().join("\n"))
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A log line for humans: its message and fields, or the line itself.
fn log_text(line: &str) -> String {
    match serde_json::from_str::<Value>(line) {
        Ok(v) => {
            let fields = &v["fields"];
            let mut out = format!(
                "{} {}",
                v["level"].as_str().unwrap_or(""),
                fields["message"].as_str().unwrap_or("")
            );
            if let Some(map) = fields.as_object() {
                for (k, val) in map.iter().filter(|(k, _)| *k != "message") {
                    let _ = write!(
                        out,
                        " {k}={}",
                        val.as_str().map_or_else(|| val.to_string(), str::to_owned)
                    );
                }
            }
            out
        }
        Err(_) => line.to_owned(),
    }
}

/// `smtp-limiter ARGS --json --config CONFIG`, parsed.
fn cli_json(env: &Env, args: &[&str]) -> Result<Value> {
    let out = Command::new(&env.binary)
        .args(args)
        .arg("--json")
        .arg("--config")
        .arg(&env.config)
        .stdin(Stdio::null())
        .output()
        .context("cannot run the smtp-limiter CLI")?;
    if !out.status.success() {
        bail!(
            "`smtp-limiter {} --json` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("the CLI printed invalid JSON")
}

/// IDs of the BPF programs the agent holds (the `prog_id` of its BPF
/// descriptors in /proc/PID/fdinfo: programs and links), to check after the
/// run that they are gone. `None` when there are none to see, or bpftool,
/// which does the checking, is missing.
fn agent_programs(pid: u32) -> Option<Vec<u64>> {
    toolchain::find_in_path("bpftool")?;
    let mut ids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .ok()?
        .flatten()
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .flat_map(|info| {
            info.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    (!ids.is_empty()).then_some(ids)
}

/// What is still there after the cleanup: processes, namespaces,
/// interfaces, pins, programs, files.
fn leftovers(env: &Env, agent_pid: u32, programs: Option<&[u64]>, keep: bool) -> Vec<String> {
    let mut left = Vec::new();
    if Path::new(&format!("/proc/{agent_pid}")).exists() {
        left.push(format!("process {agent_pid} (the agent)"));
    }
    // Any process still running with the demo's configuration.
    let needle = env.config.display().to_string();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_err() {
                continue;
            }
            if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                if cmdline.contains(&needle) {
                    left.push(format!("process {name}: {}", cmdline.trim()));
                }
            }
        }
    }
    if !env.namespaces.is_empty() {
        let list = quiet("ip", &["netns", "list"]).unwrap_or_default();
        for ns in &env.namespaces {
            if list
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns))
                || Path::new(&format!("/run/netns/{ns}")).exists()
            {
                left.push(format!("network namespace {ns}"));
            }
        }
    }
    for dev in &env.interfaces {
        if quiet("ip", &["link", "show", "dev", dev]).is_ok() {
            left.push(format!("interface {dev}"));
        }
    }
    if let Some(pins) = &env.pins {
        if pins.exists() && !keep {
            left.push(format!("pin directory {}", pins.display()));
        }
    }
    for id in programs.unwrap_or_default() {
        if quiet("bpftool", &["prog", "show", "id", &id.to_string()]).is_ok() {
            left.push(format!("BPF program id {id}"));
        }
    }
    if env.dir.exists() {
        left.push(format!("directory {}", env.dir.display()));
    }
    left
}

// ---------------------------------------------------------------------------
// The agent's log

/// The agent's JSON log lines, read as they come, with the decisions that
/// matter for the report picked out.
#[derive(Clone)]
struct AgentLog {
    inner: Arc<Mutex<LogState>>,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    epoch: Option<Instant>,
    /// `action = "block"` lines.
    blocks: Vec<BlockEvent>,
    /// Per source: policy decisions by reason (name → count, first detail).
    decisions: HashMap<String, BTreeMap<String, (u64, String)>>,
    /// Per source: when the kernel first reported dropping its packets.
    /// (by the drop reason: block, block-net, cap), and how many drop
    /// events it reported (rate-limited by kernel.events_per_second).
    kernel_drops: HashMap<String, BTreeMap<String, (f64, u64)>>,
    /// Per blocked network: the detail of the decision that blocked it.
    block_detail: HashMap<String, String>,
    /// Per client address: messages the built-in backend received in full.
    backend_messages: HashMap<IpAddr, u64>,
    /// Backend message events whose client could not be read.
    backend_unattributed: u64,
    /// The agent's stderr reached its end (the agent exited): every line
    /// has been read.
    ended: bool,
}

#[derive(Clone)]
struct BlockEvent {
    at: f64,
    net: String,
    reason: String,
    duration: String,
    kernel: String,
}

impl AgentLog {
    /// Reads the agent's stderr; with `copy`, also appends each line there.
    fn follow(stderr: std::process::ChildStderr, copy: Option<std::fs::File>) -> Self {
        let log = Self {
            inner: Arc::new(Mutex::new(LogState::default())),
        };
        let state = log.inner.clone();
        std::thread::spawn(move || {
            let mut copy = copy;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(file) = copy.as_mut() {
                    if writeln!(file, "{line}").is_err() {
                        copy = None;
                    }
                }
                let now = Instant::now();
                let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                let at = s
                    .epoch
                    .map_or(0.0, |e| now.saturating_duration_since(e).as_secs_f64());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let f = &v["fields"];
                    let text = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
                    if f["action"] == "block" {
                        let net = text("net");
                        s.blocks.push(BlockEvent {
                            at,
                            net,
                            reason: text("reason"),
                            duration: text("duration"),
                            kernel: text("kernel"),
                        });
                    }
                    let source = text("source");
                    if !source.is_empty()
                        && f["reason"].is_string()
                        && f["message"] != "kernel dropped a packet"
                    {
                        let key = if f["message"] == "blocked source connected" {
                            format!("refused while blocked ({})", text("reason"))
                        } else {
                            text("reason")
                        };
                        let entry = s
                            .decisions
                            .entry(source.clone())
                            .or_default()
                            .entry(key)
                            .or_insert((0, text("detail")));
                        entry.0 += 1;
                    }
                    if let Some(net) = f["block"].as_str() {
                        s.block_detail
                            .entry(net.to_owned())
                            .or_insert_with(|| text("detail"));
                    }
                    if f["message"] == BACKEND_MESSAGE {
                        match text("client").parse::<SocketAddr>() {
                            Ok(client) => {
                                *s.backend_messages.entry(client.ip()).or_default() += 1;
                            }
                            Err(_) => s.backend_unattributed += 1,
                        }
                    }
                    if f["message"] == "kernel dropped a packet" && !source.is_empty() {
                        let entry = s
                            .kernel_drops
                            .entry(source)
                            .or_default()
                            .entry(text("reason"))
                            .or_insert((at, 0));
                        entry.1 += 1;
                    }
                }
                s.lines.push(line);
            }
            state.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
        });
        log
    }

    /// Waits until the agent's stderr has been read to its end (call after
    /// the agent was stopped); whether that happened within `timeout`.
    fn wait_ended(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.state().ended {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Messages the built-in backend received in full from `client`.
    fn backend_messages(&self, client: IpAddr) -> u64 {
        self.state()
            .backend_messages
            .get(&client)
            .copied()
            .unwrap_or(0)
    }

    /// Every message the built-in backend received in full (attributed to
    /// a client or not).
    fn backend_total(&self) -> u64 {
        let s = self.state();
        s.backend_messages.values().sum::<u64>() + s.backend_unattributed
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_epoch(&self, epoch: Instant) {
        self.state().epoch = Some(epoch);
    }

    fn lines(&self) -> Vec<String> {
        self.state().lines.clone()
    }

    fn contains(&self, message: &str) -> bool {
        self.state().lines.iter().any(|l| l.contains(message))
    }

    fn kernel_status(&self) -> Option<String> {
        self.state().lines.iter().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            v["fields"]["status"].as_str().map(str::to_owned)
        })
    }

    fn blocks(&self) -> Vec<BlockEvent> {
        self.state().blocks.clone()
    }

    fn block_of(&self, source: IpAddr) -> Option<BlockEvent> {
        let net = host_net(source);
        self.state().blocks.iter().find(|b| b.net == net).cloned()
    }

    fn decisions_of(&self, source: IpAddr) -> BTreeMap<String, (u64, String)> {
        self.state()
            .decisions
            .get(&source.to_string())
            .cloned()
            .unwrap_or_default()
    }

    fn block_detail(&self, net: &str) -> Option<String> {
        self.state()
            .block_detail
            .get(net)
            .cloned()
            .filter(|d| !d.is_empty())
    }

    fn kernel_drops(&self, source: IpAddr) -> BTreeMap<String, (f64, u64)> {
        self.state()
            .kernel_drops
            .get(&source.to_string())
            .cloned()
            .unwrap_or_default()
    }
}

/// The block key of a source: /32 for IPv4, the /64 for IPv6.
fn host_net(source: IpAddr) -> String {
    match source {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => {
            let mut s = a.segments();
            s[4..].fill(0);
            format!("{}/64", Ipv6Addr::from(s))
        }
    }
}

// ---------------------------------------------------------------------------
// SMTP and sockets, from a chosen source address

/// How a connection attempt ended.
enum Connect {
    Up(TcpStream),
    /// No answer within the timeout: the SYN was dropped.
    NoAnswer,
    /// RST.
    Refused,
    Failed(io::Error),
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A nonblocking socket bound to `source`, its connect to `to` started.
fn start_connect(source: IpAddr, to: SocketAddr) -> io::Result<OwnedFd> {
    let domain = if source.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscalls; the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Pick the source port at connect, not bind: many sockets, one address.
    let one: libc::c_int = 1;
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let (src, src_len) = sockaddr(SocketAddr::new(source, 0));
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const src).cast(), src_len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (dst, dst_len) = sockaddr(to);
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const dst).cast(), dst_len) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
    }
    Ok(fd)
}

/// The pending error of a socket whose connect finished.
fn socket_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid descriptor and a buffer of the right size.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        )
    };
    err
}

/// Connects from `source` to `to`, waiting at most `timeout` for an answer.
fn connect_from(source: IpAddr, to: SocketAddr, timeout: Duration) -> Connect {
    let fd = match start_connect(source, to) {
        Ok(fd) => fd,
        Err(e) => return Connect::Failed(e),
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Connect::NoAnswer;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Connect::Failed(e);
        }
        if n == 0 {
            continue;
        }
        return match socket_error(fd.as_raw_fd()) {
            0 => {
                let stream = TcpStream::from(fd);
                if let Err(e) = stream.set_nonblocking(false) {
                    return Connect::Failed(e);
                }
                Connect::Up(stream)
            }
            libc::ECONNREFUSED => Connect::Refused,
            libc::ETIMEDOUT => Connect::NoAnswer,
            e => Connect::Failed(io::Error::from_raw_os_error(e)),
        };
    }
}

/// A reply: its code and its last line.
#[derive(Clone, Debug)]
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    /// "550 5.1.1": the code and the enhanced status, if any.
    fn short(&self) -> String {
        let status = self.text.split_whitespace().nth(1).filter(|w| {
            w.chars().filter(|c| *c == '.').count() == 2
                && w.chars().next().is_some_and(|c| c.is_ascii_digit())
        });
        match status {
            Some(s) => format!("{} {s}", self.code),
            None => self.code.to_string(),
        }
    }
}

struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    fn new(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    fn reply(&mut self) -> io::Result<Reply> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let line = line.trim_end().to_owned();
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("not a reply: {line:?}"))
                })?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, text: line });
            }
        }
    }

    fn command(&mut self, line: &str) -> io::Result<Reply> {
        self.writer.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    fn quit(mut self) {
        let _ = self.command("QUIT");
    }
}

/// Base64 (standard alphabet, padded).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Enters the network namespace at /run/netns/NAME (this thread only).
fn enter_netns(name: &str) -> io::Result<()> {
    let path = CString::new(format!("/run/netns/{name}")).map_err(io::Error::other)?;
    // SAFETY: plain syscalls; the descriptor is owned at once.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sleeps `d` unless the demo is stopped.
fn pause(d: Duration) {
    let end = Instant::now() + d;
    while !STOP.load(Ordering::Relaxed) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

// ---------------------------------------------------------------------------
// The actors

/// What one actor saw.
struct Actor {
    name: &'static str,
    source: IpAddr,
    /// Outcome → count ("RCPT → 550 5.1.1", "connect: no answer", …).
    seen: Mutex<BTreeMap<String, u64>>,
    /// When and how it was cut off (the closing refusal, or the first
    /// unanswered connection attempt).
    cut_off: Mutex<Option<(f64, String)>>,
    /// Set once it was cut off.
    blocked: AtomicBool,
}

impl Actor {
    fn new(name: &'static str, source: IpAddr) -> Arc<Self> {
        Arc::new(Self {
            name,
            source,
            seen: Mutex::new(BTreeMap::new()),
            cut_off: Mutex::new(None),
            blocked: AtomicBool::new(false),
        })
    }

    fn saw(&self, what: impl Into<String>) {
        *self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what.into())
            .or_default() += 1;
    }

    fn count(&self, what: &str) -> u64 {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(k, _)| k.contains(what))
            .map(|(_, v)| v)
            .sum()
    }

    fn cut(&self, at: f64, how: String) {
        let mut cut = self.cut_off.lock().unwrap_or_else(|p| p.into_inner());
        if cut.is_none() {
            *cut = Some((at, how));
        }
        self.blocked.store(true, Ordering::Relaxed);
    }

    fn cut_off(&self) -> Option<(f64, String)> {
        self.cut_off
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn seen(&self) -> Vec<(String, u64)> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// One legitimate sender.
struct Sender {
    source: IpAddr,
    to: &'static str,
    expected: u32,
    delivered: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
}

struct Traffic {
    start: Instant,
    plan: Plan,
    addrs: Addrs,
    senders: Vec<Arc<Sender>>,
    harvester: Arc<Actor>,
    flood: Arc<Actor>,
    auth: Arc<Actor>,
    relay: Arc<Actor>,
    rejected: Arc<Actor>,
    syn_flood: Arc<Actor>,
    /// SYN-flood attempts made, and how many got through to a connection.
    syn_attempts: AtomicU64,
    syn_connected: AtomicU64,
    /// Set when the legitimate senders are done: the attackers stop coming
    /// back.
    legit_done: AtomicBool,
    /// The flood's connections start together.
    flood_start: std::sync::Barrier,
}

/// Common first names: what a directory harvester tries at a domain.
const FIRST_NAMES: [&str; 16] = [
    "anna", "ben", "chris", "david", "emma", "frank", "george", "hannah", "ivan", "julia", "kevin",
    "laura", "michael", "nina", "oliver", "paul",
];

/// Recipients an open-relay prober tries: other domains, and the %-hack.
const RELAY_PROBES: [&str; 8] = [
    "victim@elsewhere.example",
    "relaytest@example.net",
    "spamtrap@example.org",
    "victim%elsewhere.example@example.net",
    "postmaster@elsewhere.example",
    "abuse@example.org",
    "check@relay-test.example",
    "someone@example.info",
];

/// Passwords an AUTH brute-forcer tries.
const PASSWORDS: [&str; 10] = [
    "123456", "password", "admin", "letmein", "qwerty", "welcome", "Passw0rd", "changeme",
    "secret", "mail2024",
];

impl Traffic {
    fn new(plan: &Plan, addrs: Addrs) -> Arc<Self> {
        let to = ["alice@example.com", "bob@example.com", "carol@example.com"];
        let senders = addrs
            .legit
            .iter()
            .zip(to)
            .map(|(source, to)| {
                Arc::new(Sender {
                    source: *source,
                    to,
                    expected: plan.legit_messages,
                    delivered: AtomicU64::new(0),
                    failures: Mutex::new(BTreeMap::new()),
                })
            })
            .collect();
        Arc::new(Self {
            start: Instant::now(),
            plan: *plan,
            harvester: Actor::new("directory harvester", addrs.harvester),
            flood: Actor::new("null-sender flood", addrs.flood),
            auth: Actor::new("AUTH brute-forcer", addrs.auth),
            relay: Actor::new("open-relay prober", addrs.relay),
            rejected: Actor::new("reject-listed host", addrs.rejected),
            syn_flood: Actor::new("SYN flood (harvester's address)", addrs.harvester),
            senders,
            addrs,
            syn_attempts: AtomicU64::new(0),
            syn_connected: AtomicU64::new(0),
            legit_done: AtomicBool::new(false),
            flood_start: std::sync::Barrier::new(plan.flood_connections),
        })
    }

    /// Why a SYN goes unanswered: XDP in the kernel part; on loopback
    /// without it, only a full listen queue.
    fn why_unanswered(&self) -> &'static str {
        if self.addrs.client_ns.is_some() {
            "SYN dropped in the kernel"
        } else {
            "no SYN-ACK within the timeout"
        }
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Past the deadline or stopped: every actor loop ends.
    fn over(&self) -> bool {
        STOP.load(Ordering::Relaxed) || self.start.elapsed() > self.plan.deadline
    }

    fn spawn_all(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut handles = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            let ns = self.addrs.client_ns.clone();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || {
                    if let Some(ns) = ns {
                        if let Err(e) = enter_netns(&ns) {
                            panic!("cannot enter network namespace {ns}: {e}");
                        }
                    }
                    f();
                })
                .expect("spawn an actor thread")
        };
        let legit: Vec<JoinHandle<()>> = self
            .senders
            .iter()
            .map(|s| {
                let (t, s) = (self.clone(), s.clone());
                spawn("legit", Box::new(move || t.legit(&s)))
            })
            .collect();
        // The attackers come back until the legitimate senders are done.
        let t = self.clone();
        handles.push(std::thread::spawn(move || {
            let results: Vec<_> = legit.into_iter().map(JoinHandle::join).collect();
            t.legit_done.store(true, Ordering::Relaxed);
            for result in results {
                if let Err(payload) = result {
                    std::panic::resume_unwind(payload);
                }
            }
        }));
        let t = self.clone();
        handles.push(spawn("rejected", Box::new(move || t.rejected_host())));
        let t = self.clone();
        handles.push(spawn("harvester", Box::new(move || t.harvester())));
        for _ in 0..self.plan.flood_connections {
            let t = self.clone();
            handles.push(spawn("flood", Box::new(move || t.flood())));
        }
        let t = self.clone();
        handles.push(spawn("auth", Box::new(move || t.auth_bruteforce())));
        let t = self.clone();
        handles.push(spawn("relay", Box::new(move || t.relay_prober())));
        let t = self.clone();
        handles.push(spawn("synflood", Box::new(move || t.syn_flood())));
        handles
    }

    /// One message per interval to its recipient, each in its own session.
    fn legit(&self, sender: &Sender) {
        let server = self.addrs.server_for(sender.source);
        let fail = |why: String| {
            *sender
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(why)
                .or_default() += 1;
        };
        for n in 0..sender.expected {
            if STOP.load(Ordering::Relaxed) {
                return;
            }
            let started = Instant::now();
            match self.deliver(sender, server, n) {
                Ok(()) => {
                    sender.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => fail(why),
            }
            pause(self.plan.legit_interval.saturating_sub(started.elapsed()));
        }
    }

    fn deliver(&self, sender: &Sender, server: SocketAddr, n: u32) -> Result<(), String> {
        let stream = match connect_from(sender.source, server, Duration::from_secs(3)) {
            Connect::Up(s) => s,
            Connect::NoAnswer => return Err("connect: no answer".into()),
            Connect::Refused => return Err("connect: refused".into()),
            Connect::Failed(e) => return Err(format!("connect: {e}")),
        };
        let mut smtp = Smtp::new(stream, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let expect = |step: &str, reply: io::Result<Reply>, code: u16| -> Result<(), String> {
            match reply {
                Ok(r) if r.code == code => Ok(()),
                Ok(r) => Err(format!("{step} → {}", r.text)),
                Err(e) => Err(format!("{step} → {e}")),
            }
        };
        expect("greeting", smtp.reply(), 220)?;
        expect("EHLO", smtp.command("EHLO mail.partner.example"), 250)?;
        expect(
            "MAIL",
            smtp.command("MAIL FROM:<orders@partner.example>"),
            250,
        )?;
        expect(
            "RCPT",
            smtp.command(&format!("RCPT TO:<{}>", sender.to)),
            250,
        )?;
        expect("DATA", smtp.command("DATA"), 354)?;
        let body = format!(
            "From: <orders@partner.example>\r\nTo: <{to}>\r\nSubject: order {n}\r\nMessage-ID: <demo-{n}-{src}@partner.example>\r\n\r\nOrder {n} confirmed.\r\n.",
            to = sender.to,
            src = sender.source,
        );
        expect("end of DATA", smtp.command(&body), 250)?;
        smtp.quit();
        Ok(())
    }

    /// Tries a connection after being cut off: in the kernel part the SYN
    /// goes unanswered; in the userspace part the proxy refuses it.
    fn come_back(&self, actor: &Actor, timeout: Duration) {
        let server = self.addrs.server_for(actor.source);
        match connect_from(actor.source, server, timeout) {
            Connect::NoAnswer => actor.saw(format!(
                "back after the block: connect unanswered ({})",
                self.why_unanswered()
            )),
            Connect::Refused => actor.saw("back after the block: connection refused (RST)"),
            Connect::Failed(e) => actor.saw(format!("back after the block: {e}")),
            Connect::Up(stream) => {
                match Smtp::new(stream, Duration::from_secs(3)).and_then(|mut s| s.reply()) {
                    Ok(r) => actor.saw(format!("back after the block: greeting {}", r.short())),
                    Err(e) => actor.saw(format!("back after the block: {e}")),
                }
            }
        }
    }

    /// After being cut off: once in the quick run, every 3 s until the
    /// legitimate senders are done otherwise.
    fn keep_coming_back(&self, actor: &Actor) {
        loop {
            pause(Duration::from_millis(500));
            if self.over() {
                return;
            }
            self.come_back(actor, Duration::from_secs(1));
            if self.plan.quick || self.legit_done.load(Ordering::Relaxed) {
                return;
            }
            pause(Duration::from_millis(2500));
        }
    }

    /// A session's first steps: connect, greeting, EHLO. `None` (and noted)
    /// when it went no further.
    fn open(&self, actor: &Actor, helo: &str, timeout: Duration) -> Option<Smtp> {
        let server = self.addrs.server_for(actor.source);
        let stream = match connect_from(actor.source, server, timeout) {
            Connect::Up(s) => s,
            Connect::NoAnswer => {
                actor.saw(format!("connect: unanswered ({})", self.why_unanswered()));
                return None;
            }
            Connect::Refused => {
                actor.saw("connect: refused (RST)");
                return None;
            }
            Connect::Failed(e) => {
                actor.saw(format!("connect: {e}"));
                return None;
            }
        };
        let mut smtp = match Smtp::new(stream, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) => {
                actor.saw(format!("socket: {e}"));
                return None;
            }
        };
        match smtp.reply() {
            Ok(r) if r.code == 220 => {}
            Ok(r) => {
                actor.saw(format!("greeting {}", r.short()));
                return None;
            }
            Err(e) => {
                actor.saw(format!("greeting: {e}"));
                return None;
            }
        }
        match smtp.command(&format!("EHLO {helo}")) {
            Ok(r) if r.code == 250 => Some(smtp),
            Ok(r) => {
                actor.saw(format!("EHLO → {}", r.short()));
                None
            }
            Err(e) => {
                actor.saw(format!("EHLO: {e}"));
                None
            }
        }
    }

    /// RCPT after RCPT to common first names, until cut off.
    fn harvester(&self) {
        let actor = &self.harvester;
        pause(Duration::from_millis(500));
        let Some(mut smtp) = self.open(actor, "mailer.bulk-list.example", Duration::from_secs(3))
        else {
            return;
        };
        if let Ok(r) = smtp.command("MAIL FROM:<news@bulk-list.example>") {
            actor.saw(format!("MAIL → {}", r.short()));
        }
        for name in FIRST_NAMES {
            if self.over() {
                return;
            }
            match smtp.command(&format!("RCPT TO:<{name}@example.com>")) {
                Ok(r) => {
                    actor.saw(format!("RCPT → {}", r.short()));
                    if r.code == 421 {
                        actor.cut(self.now(), r.text);
                        break;
                    }
                }
                Err(e) => {
                    actor.saw(format!("RCPT: {e}"));
                    break;
                }
            }
            pause(Duration::from_millis(50));
        }
        if actor.cut_off().is_none() {
            smtp.quit();
            return;
        }
        self.keep_coming_back(actor);
    }

    /// One of the flood's parallel connections: null-sender messages as
    /// fast as they are taken, a new connection whenever one ends.
    fn flood(&self) {
        let actor = &self.flood;
        // All connections at once, as a flooding host opens them.
        pause(Duration::from_millis(1000));
        self.flood_start.wait();
        let mut unanswered_after_block = 0;
        while !self.over() && unanswered_after_block < 2 {
            if actor.blocked.load(Ordering::Relaxed) {
                // Blocked: one more try (dropped in the kernel), then stop.
                unanswered_after_block += 1;
                self.come_back(actor, Duration::from_secs(1));
                continue;
            }
            let Some(mut smtp) = self.open(actor, "mx.bounces.example", Duration::from_secs(1))
            else {
                pause(Duration::from_millis(200));
                continue;
            };
            while !self.over() {
                let mail = match smtp.command("MAIL FROM:<>") {
                    Ok(r) => r,
                    Err(e) => {
                        actor.saw(if actor.blocked.load(Ordering::Relaxed) {
                            "session stalled after the block (its packets are dropped)".to_owned()
                        } else {
                            format!("MAIL: {e}")
                        });
                        break;
                    }
                };
                actor.saw(format!("MAIL FROM:<> → {}", mail.short()));
                match mail.code {
                    250 => {
                        let ok = smtp
                            .command("RCPT TO:<postmaster@example.com>")
                            .is_ok_and(|r| r.code == 250)
                            && smtp.command("DATA").is_ok_and(|r| r.code == 354);
                        let end = ok
                            .then(|| {
                                smtp.command(
                                    "From: <MAILER-DAEMON@bounces.example>\r\nSubject: Undelivered Mail Returned to Sender\r\n\r\nThis is the mail system at host mx.bounces.example.\r\n.",
                                )
                            })
                            .and_then(Result::ok);
                        match end {
                            Some(r) => actor.saw(format!("bounce → {}", r.short())),
                            None => {
                                actor.saw("bounce not taken");
                                break;
                            }
                        }
                    }
                    421 => {
                        actor.cut(self.now(), mail.text);
                        break;
                    }
                    _ => {
                        let _ = smtp.command("RSET");
                        pause(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    /// AUTH PLAIN with guessed passwords, two guesses per connection.
    fn auth_bruteforce(&self) {
        let actor = &self.auth;
        pause(Duration::from_millis(1500));
        let mut guesses = PASSWORDS.iter();
        'sessions: while !self.over() {
            let Some(mut smtp) = self.open(actor, "workstation", Duration::from_secs(2)) else {
                break;
            };
            for _ in 0..2 {
                let Some(password) = guesses.next() else {
                    smtp.quit();
                    break 'sessions;
                };
                let token = base64(format!("\0admin\0{password}").as_bytes());
                match smtp.command(&format!("AUTH PLAIN {token}")) {
                    Ok(r) => {
                        actor.saw(format!("AUTH PLAIN → {}", r.short()));
                        if r.code == 421 {
                            actor.cut(self.now(), r.text);
                            break 'sessions;
                        }
                    }
                    Err(e) => {
                        actor.saw(format!("AUTH: {e}"));
                        break 'sessions;
                    }
                }
                pause(Duration::from_millis(100));
            }
            smtp.quit();
        }
        if actor.cut_off().is_some() {
            self.keep_coming_back(actor);
        }
    }

    /// RCPT to outside domains: is this an open relay?
    fn relay_prober(&self) {
        let actor = &self.relay;
        pause(Duration::from_millis(2000));
        let Some(mut smtp) = self.open(actor, "scanner.example", Duration::from_secs(3)) else {
            return;
        };
        if let Ok(r) = smtp.command("MAIL FROM:<probe@relay-check.example>") {
            actor.saw(format!("MAIL → {}", r.short()));
        }
        for rcpt in RELAY_PROBES {
            if self.over() {
                return;
            }
            match smtp.command(&format!("RCPT TO:<{rcpt}>")) {
                Ok(r) => {
                    actor.saw(format!("RCPT → {}", r.short()));
                    if r.code == 421 {
                        actor.cut(self.now(), r.text);
                        break;
                    }
                }
                Err(e) => {
                    actor.saw(format!("RCPT: {e}"));
                    break;
                }
            }
            pause(Duration::from_millis(50));
        }
        if actor.cut_off().is_none() {
            smtp.quit();
            return;
        }
        self.keep_coming_back(actor);
    }

    /// A host on lists.reject: three tries, never answered (kernel part) or
    /// refused at once (userspace part).
    fn rejected_host(&self) {
        let actor = &self.rejected;
        pause(Duration::from_millis(200));
        for _ in 0..3 {
            if self.over() {
                return;
            }
            let server = self.addrs.server_for(actor.source);
            let tried = self.now();
            match connect_from(actor.source, server, Duration::from_secs(2)) {
                Connect::NoAnswer => {
                    actor.saw("connect: unanswered (SYN dropped in the kernel)");
                    actor.cut(tried, "its first SYN went unanswered (2 s timeout)".into());
                }
                Connect::Refused => actor.saw("connect: refused (RST)"),
                Connect::Failed(e) => actor.saw(format!("connect: {e}")),
                Connect::Up(stream) => {
                    match Smtp::new(stream, Duration::from_secs(3)).and_then(|mut s| s.reply()) {
                        Ok(r) => {
                            actor.saw(format!("greeting {}", r.short()));
                            if r.code != 220 {
                                actor.cut(self.now(), r.text);
                            }
                        }
                        Err(e) => actor.saw(format!("greeting: {e}")),
                    }
                }
            }
            pause(Duration::from_millis(500));
        }
    }

    /// Bursts of connection attempts from the harvester's address once it is
    /// blocked.
    fn syn_flood(&self) {
        let actor = &self.syn_flood;
        while !self.harvester.blocked.load(Ordering::Relaxed) {
            if self.over() {
                return;
            }
            pause(Duration::from_millis(50));
        }
        pause(Duration::from_millis(300));
        for burst in 0..self.plan.syn_bursts {
            if self.over() {
                return;
            }
            if burst > 0 {
                pause(Duration::from_secs(1));
            }
            self.syn_burst(actor);
        }
    }

    /// `syn_burst` nonblocking connects at once, each given 1 s.
    fn syn_burst(&self, actor: &Actor) {
        let server = self.addrs.server_for(actor.source);
        let mut pending: Vec<Option<OwnedFd>> = Vec::new();
        for _ in 0..self.plan.syn_burst {
            match start_connect(actor.source, server) {
                Ok(fd) => pending.push(Some(fd)),
                Err(e) => actor.saw(format!("socket: {e}")),
            }
        }
        self.syn_attempts
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut connected = Vec::new();
        while pending.iter().any(Option::is_some)
            && Instant::now() < deadline
            && !STOP.load(Ordering::Relaxed)
        {
            let mut pfds: Vec<libc::pollfd> = pending
                .iter()
                .flatten()
                .map(|fd| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                })
                .collect();
            let ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, 1000) as libc::c_int;
            // SAFETY: a valid array of pollfds.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
            if n <= 0 {
                continue;
            }
            for pfd in pfds.iter().filter(|p| p.revents != 0) {
                let slot = pending
                    .iter_mut()
                    .find(|s| s.as_ref().is_some_and(|fd| fd.as_raw_fd() == pfd.fd));
                let Some(slot) = slot else { continue };
                let fd = slot.take().expect("a pending socket");
                match socket_error(fd.as_raw_fd()) {
                    0 => connected.push(fd),
                    libc::ECONNREFUSED => actor.saw("connect: refused (RST)"),
                    e => actor.saw(format!("connect: {}", io::Error::from_raw_os_error(e))),
                }
            }
        }
        let unanswered = pending.iter().flatten().count();
        for _ in 0..unanswered {
            actor.saw(format!(
                "connect: unanswered within 1 s ({})",
                self.why_unanswered()
            ));
        }
        self.syn_connected
            .fetch_add(connected.len() as u64, Ordering::Relaxed);
        for fd in connected {
            let stream = TcpStream::from(fd);
            let _ = stream.set_nonblocking(false);
            match Smtp::new(stream, Duration::from_secs(1)).and_then(|mut s| s.reply()) {
                Ok(r) => actor.saw(format!("connected, greeting {}", r.short())),
                Err(e) => actor.saw(format!("connected, greeting: {e}")),
            }
        }
    }

    fn delivered(&self) -> (u64, u64) {
        let delivered = self
            .senders
            .iter()
            .map(|s| s.delivered.load(Ordering::Relaxed))
            .sum();
        let expected = self.senders.iter().map(|s| u64::from(s.expected)).sum();
        (delivered, expected)
    }

    fn progress_line(&self, log: &AgentLog, stats: Option<&Value>) -> String {
        let (delivered, expected) = self.delivered();
        let blocks = log.blocks();
        let mut line = format!(
            "[{:>4.1}s] legit mail {delivered}/{expected} delivered | blocks {}",
            self.now(),
            blocks.len()
        );
        if !blocks.is_empty() {
            let list: Vec<String> = blocks
                .iter()
                .map(|b| format!("{} {}", b.net.trim_end_matches("/32"), b.reason))
                .collect();
            let _ = write!(line, " ({})", list.join(", "));
        }
        if let Some(stats) = stats {
            let k = &stats["kernel"];
            if k.is_object() {
                let _ = write!(
                    line,
                    " | kernel drops {}",
                    ["dropped_block", "dropped_block_net", "dropped_cap"]
                        .iter()
                        .map(|f| k[f].as_u64().unwrap_or(0))
                        .sum::<u64>()
                );
            }
            let refusals: u64 = stats["proxy"]["rejections"]
                .as_object()
                .map(|m| m.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0);
            let _ = write!(line, " | proxy refusals {refusals}");
        }
        line
    }
}

// ---------------------------------------------------------------------------
// The report

struct Check {
    ok: bool,
    /// Informational: reported, never fails the run.
    soft: bool,
    text: String,
}

struct Report {
    text: String,
    checks: Vec<Check>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn new(
        env: &Env,
        traffic: &Traffic,
        log: &AgentLog,
        stats: &Value,
        blocks: &Value,
        elapsed: Duration,
        cleanup_problems: Vec<String>,
        leftovers: Vec<String>,
        panicked: Vec<String>,
        keep: bool,
        programs_checked: bool,
    ) -> Self {
        let mut out = String::new();
        let mut checks = Vec::new();
        let mut check = |ok: bool, text: String| {
            checks.push(Check {
                ok,
                soft: false,
                text,
            })
        };
        let w = &mut out;
        let _ = writeln!(w);
        let _ = writeln!(
            w,
            "== report: {} ({:.1} s of traffic) ==",
            if env.kernel {
                "kernel (XDP) + proxy"
            } else {
                "userspace part only (kernel layer off)"
            },
            elapsed.as_secs_f64()
        );
        if let Some(why) = &env.why_no_kernel {
            let _ = writeln!(
                w,
                "kernel part not run: {}",
                why.lines().next().unwrap_or(why)
            );
        }

        // Legitimate mail.
        let _ = writeln!(
            w,
            "\nLegitimate mail (one message per {} ms per sender)",
            traffic.plan.legit_interval.as_millis()
        );
        for s in &traffic.senders {
            let delivered = s.delivered.load(Ordering::Relaxed);
            let _ = write!(
                w,
                "  {:<15} -> {:<18} {delivered:>4}/{} delivered",
                s.source.to_string(),
                s.to,
                s.expected
            );
            let failures = s.failures.lock().unwrap_or_else(|p| p.into_inner());
            if !failures.is_empty() {
                let list: Vec<String> = failures.iter().map(|(k, v)| format!("{v}× {k}")).collect();
                let _ = write!(w, "  (failed: {})", list.join("; "));
            }
            let _ = writeln!(w);
        }
        let (delivered, expected) = traffic.delivered();
        let _ = writeln!(w, "  total{:>37}{delivered:>4}/{expected} delivered", "");
        check(
            delivered == expected,
            format!("all legitimate mail accepted ({delivered}/{expected} answered 250 at the end of DATA)"),
        );
        // What the backend received: every message a client saw accepted
        // exactly once, from that client (the PROXY header names it), and
        // nothing from anyone else.
        let mut at_backend = Vec::new();
        let mut backend_ok = true;
        let mut accounted = 0;
        for s in &traffic.senders {
            let accepted = s.delivered.load(Ordering::Relaxed);
            let received = log.backend_messages(s.source);
            backend_ok &= received == accepted;
            accounted += received;
            at_backend.push(format!("{} {received}/{accepted}", s.source));
        }
        let flood_accepted = traffic.flood.count("bounce → 250");
        let flood_received = log.backend_messages(traffic.flood.source);
        backend_ok &= flood_received == flood_accepted;
        accounted += flood_received;
        at_backend.push(format!(
            "null-sender flood {flood_received}/{flood_accepted}"
        ));
        let total = log.backend_total();
        backend_ok &= total == accounted;
        let _ = writeln!(
            w,
            "  received by the backend / accepted by the client: {}; {total} messages in all",
            at_backend.join(", ")
        );
        check(
            backend_ok && accounted > 0,
            format!(
                "the backend received each accepted message exactly once and no other ({}; {total} in all, {} from other sources)",
                at_backend.join(", "),
                total - accounted.min(total)
            ),
        );

        // Blocks as the agent lists them (taken before it stopped).
        let listed: Vec<&Value> = blocks
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let listed_block = |source: IpAddr| {
            let net = host_net(source);
            listed.iter().find(|b| b["net"] == net.as_str()).copied()
        };
        for s in &traffic.senders {
            if let Some(b) = listed_block(s.source) {
                check(
                    false,
                    format!(
                        "legitimate sender {} was blocked ({})",
                        s.source, b["reason"]
                    ),
                );
            }
        }

        // Attackers.
        let _ = writeln!(
            w,
            "\nAttackers: when (seconds since the traffic started) and why each was cut off"
        );
        let attackers: [(&Actor, &[&str], &str); 4] = [
            (&traffic.harvester, &["harvest"], "harvest"),
            (&traffic.flood, &["flood"], "flood"),
            (&traffic.auth, &["auth"], "auth"),
            (
                &traffic.relay,
                &["harvest", "relay"],
                "harvest (relay-denied recipients count as failed recipients)",
            ),
        ];
        for (actor, reasons, expected_text) in attackers {
            let _ = writeln!(w, "  {} from {}", actor.name, actor.source);
            describe_actor(w, actor, log, listed_block(actor.source), env.kernel);
            let listed_reason =
                listed_block(actor.source).and_then(|b| b["reason"].as_str().map(str::to_owned));
            let logged = log.block_of(actor.source);
            let reason = listed_reason
                .clone()
                .or_else(|| logged.as_ref().map(|b| b.reason.clone()));
            let ok = reason.as_deref().is_some_and(|r| reasons.contains(&r))
                && actor.cut_off().is_some();
            check(
                ok,
                format!(
                    "{} {} blocked for {expected_text}: {}",
                    actor.name,
                    actor.source,
                    match (&reason, actor.cut_off()) {
                        (Some(r), Some(_)) => format!("blocked as {r}"),
                        (Some(r), None) => format!("blocked as {r}, but it was never cut off"),
                        (None, _) => "not blocked".to_owned(),
                    }
                ),
            );
            // Its later connection attempts: with the kernel layer every
            // SYN is dropped (no answer at all, and the block's own drop
            // counter moved); without it the proxy refuses each one.
            let back = actor.count("back after the block");
            if env.kernel {
                let unanswered = actor.count("back after the block: connect unanswered");
                let drops = listed_block(actor.source)
                    .and_then(|b| b["drops"].as_u64())
                    .unwrap_or(0);
                check(
                    back > 0 && unanswered == back && drops > 0,
                    format!(
                        "{} {}: SYNs after the block dropped in the kernel ({unanswered}/{back} later connection attempts unanswered, {drops} packets dropped on its block)",
                        actor.name, actor.source
                    ),
                );
            } else {
                let refused = actor.count("back after the block: greeting 4");
                check(
                    back > 0 && refused == back,
                    format!(
                        "{} {}: refused by the proxy after the block ({refused}/{back} later connections greeted with 4xx)",
                        actor.name, actor.source
                    ),
                );
            }
        }

        // The reject-listed host.
        let rejected = &traffic.rejected;
        let _ = writeln!(w, "  {} {} (lists.reject)", rejected.name, rejected.source);
        describe_actor(w, rejected, log, listed_block(rejected.source), env.kernel);
        if env.kernel {
            let unanswered = rejected.count("unanswered");
            let attempts: u64 = rejected.seen().iter().map(|(_, v)| v).sum();
            let drops = listed_block(rejected.source)
                .and_then(|b| b["drops"].as_u64())
                .unwrap_or(0);
            check(
                attempts > 0 && unanswered == attempts && drops > 0,
                format!("reject-listed host dropped in the kernel: {unanswered}/{attempts} connection attempts unanswered, {drops} packets dropped"),
            );
        } else {
            let refused = rejected.count("greeting 5");
            let attempts: u64 = rejected.seen().iter().map(|(_, v)| v).sum();
            check(
                attempts > 0 && refused == attempts,
                format!(
                    "reject-listed host refused by the proxy: {refused}/{attempts} connections"
                ),
            );
        }

        // The SYN flood.
        let syn = &traffic.syn_flood;
        let attempts = traffic.syn_attempts.load(Ordering::Relaxed);
        let connected = traffic.syn_connected.load(Ordering::Relaxed);
        let _ = writeln!(
            w,
            "  {} {}: {attempts} connection attempts in {} burst(s) of {}",
            syn.name, syn.source, traffic.plan.syn_bursts, traffic.plan.syn_burst
        );
        for (what, n) in syn.seen() {
            let _ = writeln!(w, "      {n:>5}× {what}");
        }
        if env.kernel {
            let drops = listed_block(syn.source)
                .and_then(|b| b["drops"].as_u64())
                .unwrap_or(0);
            let _ = writeln!(
                w,
                "      kernel drops on the block of {}: {drops} packets",
                host_net(syn.source)
            );
            check(
                attempts > 0 && connected == 0 && drops >= attempts,
                format!("SYN flood from the blocked harvester dropped in the kernel: {connected}/{attempts} connected, {drops} packets dropped on its block"),
            );
        } else {
            let refused = syn.count("greeting 4") + syn.count("greeting 5");
            let served = syn.count("greeting 2");
            check(
                attempts > 0 && served == 0 && refused > 0,
                format!("SYN flood from the blocked harvester refused by the proxy: {refused}/{attempts} connections refused, {served} served (without the kernel layer each one costs the proxy an accept and a reply)"),
            );
        }

        // Kernel vs proxy.
        let _ = writeln!(w, "\nKernel drops vs proxy refusals");
        let kernel = &stats["kernel"];
        if kernel.is_object() {
            let n = |f: &str| kernel[f].as_u64().unwrap_or(0);
            let _ = writeln!(
                w,
                "  dropped in the kernel (XDP, packets; each dropped SYN is a connection the proxy never saw):"
            );
            let _ = writeln!(
                w,
                "      dropped_block {:>7}   blocked addresses (harvest, flood, auth, reject list)",
                n("dropped_block")
            );
            let _ = writeln!(
                w,
                "      dropped_block_net {:>3}   blocked networks",
                n("dropped_block_net")
            );
            let _ = writeln!(
                w,
                "      dropped_cap {:>9}   SYNs over max_connections_per_source",
                n("dropped_cap")
            );
            let _ = writeln!(
                w,
                "      passed {:>14}   of {} seen on the protected port",
                n("passed"),
                n("seen")
            );
            // Each reason's blocks dropped packets of their own (the SYN
            // flood alone, on the harvester's block, does not make the
            // others non-zero), and the global counters cover them all.
            let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
            for b in &listed {
                // `origin` is the reason code; `reason` may be free text.
                let origin = b["origin"].as_str().or(b["reason"].as_str());
                *by_reason
                    .entry(origin.unwrap_or("?").to_owned())
                    .or_default() += b["drops"].as_u64().unwrap_or(0);
            }
            let per_reason: Vec<String> =
                by_reason.iter().map(|(r, d)| format!("{r} {d}")).collect();
            let listed_drops: u64 = by_reason.values().sum();
            let every_reason = ["harvest", "flood", "auth", "reject-list"]
                .iter()
                .all(|r| by_reason.get(*r).is_some_and(|d| *d > 0));
            let counted = n("dropped_block") + n("dropped_block_net");
            check(
                every_reason && counted >= listed_drops,
                format!(
                    "kernel drops for every attacker's reason ({}); dropped_block {} + dropped_block_net {} >= {listed_drops} on the listed blocks; dropped_cap {}",
                    per_reason.join(", "),
                    n("dropped_block"),
                    n("dropped_block_net"),
                    n("dropped_cap")
                ),
            );
        } else {
            let _ = writeln!(
                w,
                "  kernel: {}",
                stats["kernel_status"].as_str().unwrap_or("off")
            );
        }
        let proxy = &stats["proxy"];
        let _ = writeln!(
            w,
            "  refused in the proxy (SMTP replies), {} sessions, {} messages taken:",
            proxy["sessions_total"], proxy["messages"]
        );
        if let Some(map) = proxy["rejections"].as_object() {
            for (reason, n) in map {
                let _ = writeln!(w, "      {:<22} {n}", reason);
            }
        }
        if env.kernel {
            let _ = writeln!(
                w,
                "      (no \"blocked\" refusals: blocked sources never reach the proxy, the kernel drops them)"
            );
        }
        // The flood opened more connections at once than
        // max_connections_per_source: the extra ones were held back, in
        // the kernel (SYN dropped) or by the proxy (421 at accept).
        let cap_kernel = stats["kernel"]["dropped_cap"].as_u64().unwrap_or(0);
        let cap_proxy = proxy["rejections"]["too-many-connections"]
            .as_u64()
            .unwrap_or(0);
        check(
            cap_kernel + cap_proxy > 0,
            format!(
                "connection cap held the flood's extra parallel connections back: {cap_kernel} SYNs dropped in the kernel (dropped_cap), {cap_proxy} refused by the proxy (too-many-connections)"
            ),
        );
        let _ = writeln!(w, "  blocks at the end (smtp-limiter block list):");
        for b in &listed {
            let _ = writeln!(
                w,
                "      {:<18} {:<12} expires {:<20}  kernel drops {}{}",
                b["net"].as_str().unwrap_or("?"),
                b["reason"].as_str().unwrap_or("?"),
                b["expires"].as_str().unwrap_or("never"),
                b["drops"]
                    .as_u64()
                    .map_or_else(|| "-".into(), |d| d.to_string()),
                b["repeat"]
                    .as_u64()
                    .filter(|r| *r > 0)
                    .map(|r| format!("  repeat {r}"))
                    .unwrap_or_default()
            );
        }
        if let Some(pins) = &env.pins {
            let _ = writeln!(w, "\nSee the blocks in the kernel map:");
            let (map, key) = match traffic.harvester.source {
                IpAddr::V4(v4) => ("BLOCK_V4", format!("{:?}", v4.octets())),
                IpAddr::V6(v6) => ("BLOCK_V6", format!("{:?}", v6.octets())),
            };
            let _ = writeln!(w, "  bpftool map dump pinned {}/{map}", pins.display());
            let _ = writeln!(
                w,
                "  (a key is the address's bytes: the harvester {} is {}, its \"reason\" is \"Harvest\")",
                traffic.harvester.source,
                key.replace(' ', "")
            );
            if keep {
                let _ = writeln!(
                    w,
                    "  (--keep: the pins stay; remove them with: rm -r {})",
                    pins.display()
                );
            } else {
                let _ = writeln!(w, "  (the demo removed its pins at the end; run it with --keep to look at them afterwards)");
            }
        }

        for p in &panicked {
            check(false, format!("an actor thread panicked: {p}"));
        }
        let mut gone = cleanup_problems;
        gone.extend(leftovers);
        check(
            gone.is_empty(),
            if gone.is_empty() {
                format!(
                    "nothing left behind (agent process, {}{}temporary directory)",
                    if env.namespaces.is_empty() {
                        String::new()
                    } else {
                        format!("namespaces {}, veth, ", env.namespaces.join(" and "))
                    },
                    match (env.pins.is_some() && !keep, programs_checked) {
                        (true, true) => "pins, BPF programs, ",
                        (true, false) => "pins, ",
                        (false, true) => "BPF programs, ",
                        (false, false) => "",
                    },
                )
            } else {
                format!("left behind: {}", gone.join("; "))
            },
        );
        if env.kernel && keep {
            if let Some(pins) = &env.pins {
                checks.push(Check {
                    ok: true,
                    soft: true,
                    text: format!("pins kept at {} (--keep)", pins.display()),
                });
            }
        }
        if let Some(why) = &env.why_no_kernel {
            checks.push(Check {
                ok: false,
                soft: true,
                text: format!(
                    "kernel part not run ({})",
                    why.lines().next().unwrap_or(why)
                ),
            });
        }
        Self { text: out, checks }
    }

    fn failed(&self) -> bool {
        self.checks.iter().any(|c| !c.ok && !c.soft)
    }

    fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.ok && !c.soft)
            .map(|c| c.text.clone())
            .collect()
    }

    fn print(&self) {
        print!("{}", self.text);
        println!("\nChecks");
        for c in &self.checks {
            let mark = match (c.ok, c.soft) {
                (true, _) => "ok  ",
                (false, true) => "note",
                (false, false) => "FAIL",
            };
            println!("  [{mark}] {}", c.text);
        }
        println!(
            "\n{}",
            if self.failed() {
                "RESULT: FAILED"
            } else {
                "RESULT: all checks passed"
            }
        );
        let _ = io::stdout().flush();
    }
}

/// An attacker's lines in the report: what it saw, when it was cut off,
/// and the agent's side (block, reason, detail, kernel drops).
fn describe_actor(
    w: &mut String,
    actor: &Actor,
    log: &AgentLog,
    listed: Option<&Value>,
    kernel: bool,
) {
    for (what, n) in actor.seen() {
        let _ = writeln!(w, "      {n:>5}× {what}");
    }
    match actor.cut_off() {
        Some((at, how)) => {
            let _ = writeln!(w, "      cut off at {at:5.2} s: {how}");
        }
        None => {
            let _ = writeln!(w, "      never cut off");
        }
    }
    if let Some(b) = log.block_of(actor.source) {
        let detail = log.block_detail(&b.net);
        let _ = writeln!(
            w,
            "      blocked at {:5.2} s: {} for {}{}{}",
            b.at,
            b.reason,
            b.duration,
            detail.map(|d| format!(" — {d}")).unwrap_or_default(),
            if kernel && b.kernel != "blocked" {
                format!(" (kernel: {})", b.kernel)
            } else {
                String::new()
            }
        );
        let again: Vec<String> = log
            .blocks()
            .iter()
            .filter(|x| x.net == b.net)
            .skip(1)
            .map(|x| format!("{:.2} s ({}, {})", x.at, x.reason, x.duration))
            .collect();
        if !again.is_empty() {
            let _ = writeln!(
                w,
                "      blocked again {}× while its sessions opened before the block went on: {}",
                again.len(),
                again.join(", ")
            );
        }
    } else if let Some(b) = listed {
        let _ = writeln!(
            w,
            "      blocked: {} (static, expires {})",
            b["reason"].as_str().unwrap_or("?"),
            b["expires"].as_str().unwrap_or("never")
        );
    }
    let decisions = log.decisions_of(actor.source);
    if !decisions.is_empty() {
        let list: Vec<String> = decisions
            .iter()
            .map(|(r, (n, _))| format!("{r} ×{n}"))
            .collect();
        let _ = writeln!(w, "      proxy decisions: {}", list.join(", "));
    }
    if kernel {
        let drops = listed.and_then(|b| b["drops"].as_u64());
        for (reason, (first, events)) in log.kernel_drops(actor.source) {
            let what = match reason.as_str() {
                "cap" => "SYNs over the connection cap",
                "block" | "block-net" => "packets of the blocked source",
                _ => "packets",
            };
            let _ = writeln!(
                w,
                "      kernel: {what} dropped from {first:5.2} s ({events} drop events reported)"
            );
        }
        if let Some(d) = drops {
            let _ = writeln!(
                w,
                "      kernel: {d} packets dropped on its block (block list)"
            );
        }
    }
}
