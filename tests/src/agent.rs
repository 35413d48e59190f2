//! The real `smtp-limiter` binary as an operator runs it: `smtp-limiter run`
//! on a configuration file in a directory of its own ([`AgentDir`]: the
//! configuration, the control socket, the state directory, the log), in the
//! test's network namespace or in one the test made ([`Launch`]), and the
//! CLI against it ([`Agent::cli`], [`Agent::json`]); and [`NetRig`], the
//! agent in a network namespace in front of a private Postfix, with
//! clients in another namespace.
//!
//! The agent dies with the thread that started it (`PR_SET_PDEATHSIG`,
//! so even a killed test leaves none behind), gets SIGTERM when its
//! [`Agent`] is dropped, and its directory goes when the [`AgentDir`] does
//! (kept when `AGENT_FIXTURE_KEEP` is set; directories of dead test
//! processes are removed by the next one).

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Once,
    },
    time::{Duration, Instant},
};

use crate::clients::{swaks_to_alice_in, Swaks};
use crate::kernel::PinDir;
use crate::netns::{link, Link, NetNs};
use crate::postfix::{Postfix, PostfixOptions};
use crate::proxy::Client;
use crate::tcp::{connect_from, wait_until, Relay};

/// How long the agent may take to open its control socket: generous, as
/// CI runs Postfix and slapd instances beside it on two CPUs.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to stop after SIGTERM (its shutdown grace
/// is 10 s by default; the rest is room for a loaded machine).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// Directory names: `smtp-limiter-agent.PID.N.NAME`.
const PREFIX: &str = "smtp-limiter-agent.";

/// An agent's directory: `smtp-limiter.toml`, `control.sock`, `state/`,
/// `agent.log`. Removed on drop.
pub struct AgentDir {
    path: PathBuf,
}

impl AgentDir {
    /// A new empty directory in /tmp named after `name` (after removing
    /// those of test processes that are gone).
    ///
    /// # Panics
    /// When it cannot be created.
    pub fn new(name: &str) -> AgentDir {
        static REAPED: Once = Once::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        REAPED.call_once(remove_stale);
        let path = std::env::temp_dir().join(format!(
            "{PREFIX}{}.{}.{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        AgentDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration file.
    pub fn config(&self) -> PathBuf {
        self.path.join("smtp-limiter.toml")
    }

    /// The control socket (`control.socket`): the test's own, never the
    /// host's default.
    pub fn socket(&self) -> PathBuf {
        self.path.join("control.sock")
    }

    /// `state.directory`.
    pub fn state_dir(&self) -> PathBuf {
        self.path.join("state")
    }

    /// The files of `state.directory` (the stored blocks, in whatever
    /// files the agent keeps them), with their last modification times.
    pub fn state_files(&self) -> Vec<(PathBuf, std::time::SystemTime)> {
        let Ok(entries) = fs::read_dir(self.state_dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.modified().ok()?)))
            .collect()
    }

    /// Where the agent's stderr (its log) goes.
    pub fn log_path(&self) -> PathBuf {
        self.path.join("agent.log")
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Writes the configuration: `body`, then `[control]` and `[state]`
    /// in this directory, and `[metrics]` on `127.0.0.1:0` (a port nobody
    /// else has) unless `body` has its own.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_config(&self, body: &str) {
        let metrics = if body.contains("[metrics]") {
            ""
        } else {
            "[metrics]\naddress = \"127.0.0.1:0\"\n"
        };
        let text = format!(
            "{body}\n[control]\nsocket = \"{}\"\n[state]\ndirectory = \"{}\"\n{metrics}",
            self.socket().display(),
            self.state_dir().display()
        );
        fs::write(self.config(), text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config().display()));
    }

    /// The CLI with this configuration (see [`cli`]).
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        cli(&self.config(), args)
    }
}

impl Drop for AgentDir {
    fn drop(&mut self) {
        if std::env::var_os("AGENT_FIXTURE_KEEP").is_some() {
            eprintln!("agent fixture: kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn remove_stale() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if crate::dead_fixture_owner(&name, PREFIX).is_some() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// How the agent is started: where, and under which wrapper.
#[derive(Default)]
pub struct Launch<'a> {
    /// The network namespace to run it in (entered before exec; the mount
    /// namespace stays the host's, so its pins are on the host's bpffs).
    pub netns: Option<&'a NetNs>,
    /// A program and its arguments to run the agent under, e.g. `setpriv`
    /// with fewer capabilities; the agent's command line follows them.
    pub wrapper: Vec<String>,
}

impl<'a> Launch<'a> {
    /// In the test's own network namespace.
    #[must_use]
    pub fn here() -> Self {
        Launch::default()
    }

    /// In `ns`.
    #[must_use]
    pub fn in_ns(ns: &'a NetNs) -> Self {
        Launch {
            netns: Some(ns),
            ..Launch::default()
        }
    }
}

/// An agent that did not come up: its exit status if it exited, and its
/// log.
#[derive(Debug)]
pub struct Failed {
    pub status: Option<ExitStatus>,
    pub log: String,
}

/// A running agent; SIGTERM when dropped (SIGKILL after [`STOP_TIMEOUT`]).
pub struct Agent {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts the agent on `dir`'s configuration (with the kernel object
    /// the tests found, [`crate::kernel::ebpf_object`]) and waits until its
    /// control socket answers ([`START_TIMEOUT`]).
    ///
    /// # Errors
    /// It exited first (with its status and log) or did not open its
    /// socket in time (it is then stopped).
    pub fn spawn(dir: &AgentDir, launch: &Launch) -> Result<Agent, Failed> {
        let _ = fs::remove_file(dir.socket());
        let log = fs::File::create(dir.log_path()).expect("create the agent's log");
        let mut command = match launch.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(crate::smtp_limiter_binary());
                command
            }
            None => Command::new(crate::smtp_limiter_binary()),
        };
        command.args(["run", "--config"]).arg(dir.config());
        // The object the tests' prerequisites found, whether or not this
        // build of the binary embeds one.
        if let Some(object) = crate::kernel::ebpf_object() {
            command.arg("--ebpf-object").arg(object);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let netns = launch.netns.map(|ns| {
            fs::File::open(ns.path())
                .unwrap_or_else(|e| panic!("opening the namespace {}: {e}", ns.path()))
        });
        let netns_fd = netns.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: prctl and setns are plain syscalls, async-signal-safe; the
        // descriptor stays open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                // The agent goes when the test does, even killed before
                // its `Drop`.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start the agent");
        drop(netns);
        let mut agent = Agent {
            child,
            config: dir.config(),
            log: dir.log_path(),
        };
        let socket = dir.socket();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(Failed {
                    status: Some(status),
                    log: agent.log(),
                });
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(agent);
            }
            if Instant::now() > deadline {
                agent.terminate();
                return Err(Failed {
                    status: None,
                    log: format!(
                        "no control socket within {START_TIMEOUT:?}:\n{}",
                        agent.log()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Agent::spawn`], trying again (3 times in all) when one of its ports
    /// was taken (by another process between the choice of a free port and
    /// the agent's bind): `configure` then writes the configuration anew,
    /// with new ports; it is called before the first try too.
    ///
    /// # Panics
    /// When the agent does not start.
    #[track_caller]
    pub fn start(dir: &AgentDir, launch: &Launch, mut configure: impl FnMut()) -> Agent {
        let taken = |log: &str| log.contains("Address already in use");
        for attempt in 1..=3 {
            configure();
            match Self::spawn(dir, launch) {
                // The metrics listener failing to bind is only logged: a
                // taken port there is a failed start too.
                Ok(mut agent) if attempt < 3 && taken(&agent.log()) => {
                    eprintln!("agent: a port was taken, trying new ones:\n{}", agent.log());
                    agent.terminate();
                }
                Ok(agent) => return agent,
                Err(failed) if attempt < 3 && taken(&failed.log) => {
                    eprintln!("agent: a port was taken, trying new ones:\n{}", failed.log);
                }
                Err(failed) => panic!(
                    "the agent did not start ({:?}):\n{}",
                    failed.status, failed.log
                ),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The agent's pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid")
    }

    /// Sends `sig` to the agent.
    pub fn signal(&self, sig: libc::c_int) {
        crate::fixture::signal(self.pid(), sig);
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        cli(&self.config, args)
    }

    /// `smtp-limiter ARGS --json`, parsed.
    ///
    /// # Panics
    /// When the command fails or does not print JSON.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(out.success(), "smtp-limiter {args:?}: {}", out.text());
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.text()))
    }

    /// The kernel counter `name` from `stats --json`.
    ///
    /// # Panics
    /// When there is none.
    #[track_caller]
    pub fn kernel_counter(&self, name: &str) -> u64 {
        let stats = self.json(&["stats"]);
        stats["kernel"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name:?} in `stats --json`: {stats}"))
    }

    /// The block of `net` (e.g. `10.0.0.1/32`) in `block list --json`, if
    /// listed.
    #[track_caller]
    pub fn block(&self, net: &str) -> Option<serde_json::Value> {
        self.json(&["block", "list"])
            .as_array()
            .and_then(|blocks| blocks.iter().find(|b| b["net"] == net).cloned())
    }

    /// SIGTERM; asserts that the agent exits, successfully, within
    /// [`STOP_TIMEOUT`].
    #[track_caller]
    pub fn stop(mut self) {
        let status = self.terminate();
        assert!(
            status.is_some_and(|s| s.success()),
            "the agent's exit after SIGTERM: {status:?}; log:\n{}",
            self.log()
        );
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; the exit status if
    /// the agent exited by itself.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(STOP_TIMEOUT);
        if status.is_none() {
            eprintln!("agent: still running {STOP_TIMEOUT:?} after SIGTERM; killing");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        status
    }

    /// Waits at most `timeout` for the agent to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// What a CLI command did.
#[derive(Debug)]
pub struct CliOutput {
    /// The exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Exit code 0.
    #[must_use]
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout, then stderr.
    #[must_use]
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `smtp-limiter ARGS --config CONFIG`.
///
/// # Panics
/// When the binary cannot be run.
pub fn cli(config: &Path, args: &[&str]) -> CliOutput {
    let out = Command::new(crate::smtp_limiter_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI");
    CliOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// An agent's configuration in front of a Postfix (or a relay to one) at
/// `backend`: listening on `listen`, the `[backend]` table with
/// `backend_keys` (`identity = …`, `starttls = true`, …), relaying for
/// example.com only; then `more` TOML tables (`[kernel]`, `[limits]`, …).
/// Without `[control]` and `[state]`: see [`AgentDir::write_config`].
#[must_use]
pub fn postfix_config(
    listen: SocketAddr,
    backend: SocketAddr,
    backend_keys: &str,
    more: &str,
) -> String {
    format!(
        r#"
[[listen]]
address = "{listen}"
[backend]
address = "{backend}"
connect_timeout = "5s"
{backend_keys}
[relay]
accept = "*@example.com"
{more}
"#
    )
}

/// What a [`NetRig`]'s configuration is made from.
pub struct RigParts<'a> {
    /// The namespace the agent will run in (for devices a test adds).
    pub server: &'a NetNs,
    /// The veth pair: the agent listens on the server end.
    pub link: &'a Link,
    /// The relay's port on `127.0.0.1` in the server namespace: the
    /// agent's `backend.address`, carried to Postfix.
    pub relay_port: u16,
    /// A pin directory of the rig's own (`kernel.pin_path`).
    pub pins: &'a Path,
}

impl RigParts<'_> {
    /// [`postfix_config`] with the relay as the backend.
    #[must_use]
    pub fn config(&self, listen: SocketAddr, backend_keys: &str, more: &str) -> String {
        let relay = SocketAddr::from(([127, 0, 0, 1], self.relay_port));
        postfix_config(listen, relay, backend_keys, more)
    }

    /// A `[kernel]` table: the kernel layer required, the packet program
    /// attached to `interface` with `attach` (`"xdp"`, `"auto"`, …), the
    /// rig's own pins, port 25 protected.
    #[must_use]
    pub fn kernel_table(&self, interface: &str, attach: &str) -> String {
        format!(
            "[kernel]\nmode = \"required\"\ninterfaces = [\"{interface}\"]\nattach = \"{attach}\"\n\
             pin_path = \"{}\"\nports = [25]\n",
            self.pins.display()
        )
    }
}

/// The real agent in a server network namespace, clients in a client
/// namespace joined to it by a veth pair ([`Link`]), and a private Postfix
/// on the host's loopback, reached from the server namespace through a
/// [`Relay`]. Dropped in field order: the agent (which detaches its
/// programs), its directory, the relay, Postfix, the pins, the link, the
/// namespaces.
pub struct NetRig {
    pub agent: Agent,
    pub dir: AgentDir,
    _relay: Relay,
    pub postfix: Postfix,
    pins: PinDir,
    pub link: Link,
    pub client: NetNs,
    pub server: NetNs,
}

impl NetRig {
    /// Namespaces `PREFIX-srv-…` and `PREFIX-cli-…` (those a killed run
    /// left behind are removed first), a link tagged `tag` (see
    /// [`crate::netns::link`]), Postfix with `postfix`, and the agent on
    /// the configuration `setup` returns (without `[control]` and
    /// `[state]`, see [`AgentDir::write_config`]); `setup` may add devices
    /// or programs to the server namespace first.
    ///
    /// # Panics
    /// When any part does not start.
    pub fn start(
        prefix: &str,
        tag: &str,
        postfix: PostfixOptions,
        setup: impl FnOnce(&RigParts) -> String,
    ) -> NetRig {
        let (srv, cli) = (format!("{prefix}-srv"), format!("{prefix}-cli"));
        for stale in [&srv, &cli] {
            if let Err(e) = NetNs::remove_stale(stale) {
                eprintln!("removing stale namespaces {stale}-*: {e:#}");
            }
        }
        let server = NetNs::new(&srv).expect("server namespace");
        let client = NetNs::new(&cli).expect("client namespace");
        let link = link(&server, &client, tag).expect("veth pair");
        let postfix = Postfix::start(postfix).expect("start Postfix");
        let relay = Relay::start(&server, postfix.addr()).expect("the relay to Postfix");
        let pins = PinDir::new();
        let dir = AgentDir::new(prefix);
        dir.write_config(&setup(&RigParts {
            server: &server,
            link: &link,
            relay_port: relay.port(),
            pins: pins.path(),
        }));
        let agent = Agent::spawn(&dir, &Launch::in_ns(&server)).unwrap_or_else(|failed| {
            panic!(
                "the agent did not start ({:?}):\n{}",
                failed.status, failed.log
            )
        });
        NetRig {
            agent,
            dir,
            _relay: relay,
            postfix,
            pins,
            link,
            client,
            server,
        }
    }

    /// Stops the agent with SIGTERM, asserting that it exits successfully;
    /// runs `between`; starts the agent again on the same directory (its
    /// configuration and state).
    ///
    /// # Panics
    /// When the agent does not stop or start again.
    #[track_caller]
    pub fn restart(&mut self, between: impl FnOnce(&NetRig)) {
        let status = self.agent.terminate();
        assert!(
            status.is_some_and(|s| s.success()),
            "the agent's exit after SIGTERM: {status:?}; log:\n{}",
            self.agent.log()
        );
        between(self);
        self.agent =
            Agent::spawn(&self.dir, &Launch::in_ns(&self.server)).unwrap_or_else(|failed| {
                panic!(
                    "the agent did not start again ({:?}):\n{}",
                    failed.status, failed.log
                )
            });
    }

    /// The rig's pin directory (`kernel.pin_path` if the configuration
    /// used [`RigParts::pins`]).
    pub fn pins(&self) -> &Path {
        self.pins.path()
    }

    /// Connects from `source` (an address of the client namespace) to
    /// `to` (in the server namespace) within `timeout`: a SYN the kernel
    /// drops is an error of kind `TimedOut`.
    ///
    /// # Errors
    /// The connection failed.
    pub fn connect(
        &self,
        source: IpAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<TcpStream> {
        connect_from(&self.client, source, to, timeout)
    }

    /// A raw SMTP session from `source` to `to`, and its greeting.
    ///
    /// # Panics
    /// When the connection or the greeting fails (with the agent's log).
    #[track_caller]
    pub fn session(&self, source: IpAddr, to: SocketAddr) -> (Client, String) {
        let stream = self
            .connect(source, to, Duration::from_secs(5))
            .unwrap_or_else(|e| {
                panic!(
                    "connect from {source} to {to}: {e}\nagent:\n{}",
                    self.agent.log()
                )
            });
        Client::from_stream(stream).expect("greeting")
    }

    /// swaks from `source` (in the client namespace) to `to`, one message
    /// to alice.
    pub fn swaks_to_alice(&self, source: IpAddr, to: SocketAddr) -> Swaks {
        swaks_to_alice_in(Some(&self.client), to, &source.to_string(), &[])
    }

    /// `GET /metrics` from the agent's metrics listener `addr`, inside the
    /// server namespace.
    ///
    /// # Panics
    /// When the request fails.
    pub fn metrics(&self, addr: SocketAddr) -> String {
        self.server.run(|| scrape_metrics(addr))
    }
}

/// `GET /metrics` from an agent's metrics listener `addr` (in the caller's
/// namespace): the whole answer, headers included.
///
/// # Panics
/// When the request fails or takes more than 10 s.
#[must_use]
pub fn scrape_metrics(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(addr).expect("connect to /metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request /metrics");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read /metrics");
    text
}
