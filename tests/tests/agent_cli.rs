//! The real `smtp-limiter` binary as an operator runs it: the agent with its
//! control socket, the CLI changing blocks and limits live, blocks stored
//! and restored after a restart that lost the kernel maps (as a reboot does).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{kernel::PinDir, prerequisites, proxy::Client, smtp_limiter_binary};
use limiter_user::kernel::{BpfDatapath, Datapath};

/// How long the agent may take to open its control socket; generous, as
/// CI runs Postfix and slapd instances beside it on two CPUs.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to stop after SIGTERM (its shutdown grace
/// is 10 s by default; the rest is room for a loaded machine).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// A port on 127.0.0.1 that was free a moment ago (the agent may lose it
/// to another process before it binds: [`Agent::start`] then tries again).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running agent, stopped with SIGTERM on drop.
struct Agent {
    child: Child,
}

impl Agent {
    /// Starts the agent on `files` and waits until its control socket
    /// answers. When it could not bind one of its ports (taken between
    /// [`free_port`] and its bind), tries again with new ports (3 times in
    /// all).
    fn start(files: &mut AgentFiles) -> Self {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(files) {
                Ok(agent) => return agent,
                Err(log) if attempt < 3 && log.contains("Address already in use") => {
                    eprintln!("agent: a port was taken, trying new ones:\n{log}");
                    files.new_ports();
                }
                Err(log) => panic!("the agent did not start:\n{log}"),
            }
        }
    }

    fn try_start(files: &AgentFiles) -> Result<Self, String> {
        let _ = std::fs::remove_file(&files.socket);
        let log = std::fs::File::create(files.log()).unwrap();
        let child = Command::new(smtp_limiter_binary())
            .args(["run", "--config"])
            .arg(&files.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        let mut agent = Self { child };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                return Err(format!("exited ({status}): {}", files.read_log()));
            }
            if std::os::unix::net::UnixStream::connect(&files.socket).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                agent.terminate();
                return Err(format!(
                    "no control socket within {START_TIMEOUT:?}: {}",
                    files.read_log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The metrics listener failing to bind is only logged: a taken
        // port there is a failed start too.
        let log = files.read_log();
        if log.contains("metrics.address") && log.contains("Address already in use") {
            agent.terminate();
            return Err(log);
        }
        Ok(agent)
    }

    /// SIGTERM; asserts that the agent exits, successfully, in time.
    #[track_caller]
    fn stop(mut self) {
        let status = self.terminate();
        assert!(
            status.is_some_and(|s| s.success()),
            "the agent's exit after SIGTERM: {status:?}"
        );
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]; the exit status if
    /// the agent exited by itself.
    fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

fn cli(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(smtp_limiter_binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run the CLI");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Connects from `source` (a loopback address of its own) to `to`.
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(socket >= 0);
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as u16;
    addr.sin_addr.s_addr =
        u32::from_ne_bytes(source.parse::<std::net::Ipv4Addr>().unwrap().octets());
    // SAFETY: a valid socket and address.
    let rc = unsafe {
        libc::bind(
            socket,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind {source}");
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let mut dest: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    dest.sin_family = libc::AF_INET as u16;
    dest.sin_port = to.port().to_be();
    dest.sin_addr.s_addr = u32::from_ne_bytes(to.ip().octets());
    // SAFETY: as above.
    let rc = unsafe {
        libc::connect(
            socket,
            (&raw const dest).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    assert_eq!(rc, 0, "connect {to}");
    // SAFETY: we own the descriptor.
    unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(socket) }
}

/// An agent's files in a directory of its own: a configuration with a
/// listener, the built-in backend, the control socket, state and metrics on
/// free ports, and `extra` TOML tables (`[kernel]`, `[filters]`, …).
struct AgentFiles {
    dir: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    extra: String,
    proxy: SocketAddr,
    backend: u16,
    metrics: u16,
}

impl AgentFiles {
    fn new(name: &str, extra: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("smtp-limiter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files = Self {
            socket: dir.join("control.sock"),
            config: dir.join("smtp-limiter.toml"),
            dir,
            extra: extra.to_owned(),
            proxy: "127.0.0.1:0".parse().unwrap(),
            backend: 0,
            metrics: 0,
        };
        files.new_ports();
        files
    }

    /// Picks free ports and writes the configuration with them.
    fn new_ports(&mut self) {
        let (listen, backend, metrics) = (free_port(), free_port(), free_port());
        self.proxy = format!("127.0.0.1:{listen}").parse().unwrap();
        self.backend = backend;
        self.metrics = metrics;
        self.write_config("");
    }

    /// Writes the configuration, with `more` TOML after the rest (a table
    /// the test changes, e.g. `[limits]`).
    fn write_config(&self, more: &str) {
        std::fs::write(
            &self.config,
            format!(
                r#"
                [[listen]]
                address = "{proxy}"
                [backend]
                address = "127.0.0.1:{backend}"
                builtin = true
                [control]
                socket = "{socket}"
                [state]
                directory = "{state}"
                [metrics]
                address = "127.0.0.1:{metrics}"
                {extra}
                {more}
                "#,
                proxy = self.proxy,
                backend = self.backend,
                socket = self.socket.display(),
                state = self.dir.join("state").display(),
                metrics = self.metrics,
                extra = self.extra,
            ),
        )
        .unwrap();
    }

    fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    fn read_log(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }
}

impl Drop for AgentFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of the first `key` anywhere in `value` (objects searched
/// depth first), as `limits show --json` nests its limits.
fn find_key<'a>(value: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        serde_json::Value::Array(list) => list.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

/// `max_failed_rcpt` as the running agent reports it.
#[track_caller]
fn max_failed_rcpt(config: &Path) -> u64 {
    let (ok, out) = cli(config, &["limits", "show", "--json"]);
    assert!(ok, "{out}");
    let limits: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    find_key(&limits, "max_failed_rcpt")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no max_failed_rcpt in {out}"))
}

/// Polls `max_failed_rcpt` until it is `want`; whether it got there.
fn wait_max_failed_rcpt(config: &Path, want: u64) -> bool {
    limiter_tests::tcp::wait_until(Duration::from_secs(10), || max_failed_rcpt(config) == want)
}

/// A session from `source` that tries unknown recipients until the proxy
/// cuts it off; how many failed (5xx) before the `421`.
#[track_caller]
fn failed_rcpts_before_the_cut(source: &str, proxy: SocketAddr) -> usize {
    let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(smtp.cmd("EHLO harvester.test").unwrap().starts_with("250"));
    let mail = smtp.cmd("MAIL FROM:<h@harvester.test>").unwrap();
    assert!(mail.starts_with("250 "), "{mail}");
    for n in 1..=20 {
        let reply = smtp
            .cmd(&format!("RCPT TO:<nobody{n}@example.com>"))
            .unwrap();
        if reply.starts_with("421 4.7.0") {
            smtp.expect_closed();
            return n - 1;
        }
        assert!(reply.starts_with('5'), "RCPT {n}: {reply}");
    }
    panic!("never cut off after 20 unknown recipients");
}

#[test]
fn cli_blocks_through_the_agent_and_blocks_survive_lost_kernel_maps() {
    if !prerequisites("cli_blocks_through_the_agent_and_blocks_survive_lost_kernel_maps") {
        return;
    }
    let pins = PinDir::new();
    let mut files = AgentFiles::new(
        "agent",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"",
            pins.path().display()
        ),
    );
    let agent = Agent::start(&mut files);
    let (config, proxy) = (files.config.clone(), files.proxy);
    let config = &config;
    let (ok, out) = cli(
        config,
        &[
            "block",
            "add",
            "127.0.0.2",
            "--for",
            "1h",
            "--reason",
            "flood",
        ],
    );
    assert!(ok, "{out}");
    // In the kernel's map, with its reason and an expiry …
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering("127.0.0.2".parse().unwrap())
        .unwrap()
        .expect("blocked in the kernel");
    assert_eq!(hit.reason, limiter_common::reason::FLOOD);
    assert!(hit.expires.is_some(), "--for 1h expires");
    // … and refused by the proxy, while another source is served.
    let (mut smtp, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(
        greeting.starts_with("421 4.7.0"),
        "blocked source: {greeting}"
    );
    smtp.expect_closed();
    let (_, greeting) = Client::from_stream(connect_from("127.0.0.3", proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "other source: {greeting}");

    // `limits set` changes what the proxy does, not only what it shows: a
    // harvester is cut off after 2 failed recipients instead of the file's
    // limit.
    let from_file = max_failed_rcpt(config);
    assert!(
        from_file > 3,
        "the default limit is too low for this test: {from_file}"
    );
    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpt", "2"]);
    assert!(ok, "{out}");
    assert_eq!(max_failed_rcpt(config), 2);
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.4", proxy), 2);
    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpt", "many"]);
    assert!(!ok && out.contains("max_failed_rcpt"), "{out}");
    assert_eq!(
        max_failed_rcpt(config),
        2,
        "a refused value changed the limit"
    );
    let (ok, out) = cli(config, &["stats", "--json"]);
    assert!(ok, "{out}");
    let stats: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // At least the two sessions served (127.0.0.3 and the harvester).
    let sessions = stats["proxy"]["sessions_total"].as_u64();
    assert!(sessions.is_some_and(|n| n >= 2), "{out}");

    // A bad file is refused by reload (naming the key) and the running
    // configuration stays, the live change included …
    let good = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, good.replace("[state]", "[state]\nbogus = 1")).unwrap();
    let (ok, out) = cli(config, &["reload"]);
    std::fs::write(config, &good).unwrap();
    assert!(!ok && out.contains("bogus"), "{out}");
    assert_eq!(
        max_failed_rcpt(config),
        2,
        "a refused reload changed the limits"
    );
    // … a good one brings back the file's limits …
    let (ok, out) = cli(config, &["reload"]);
    assert!(ok, "{out}");
    assert_eq!(max_failed_rcpt(config), from_file);
    // … and SIGHUP does what `reload` does: the file's value again, and
    // the next harvester is cut off at the file's limit.
    files.write_config("[limits]\nmax_failed_rcpt = 3");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    assert!(
        wait_max_failed_rcpt(config, 3),
        "SIGHUP did not reload the file: max_failed_rcpt is {}",
        max_failed_rcpt(config)
    );
    assert_eq!(failed_rcpts_before_the_cut("127.0.0.5", proxy), 3);

    // Stop, lose the kernel maps (as a reboot does), start again.
    agent.stop();
    drop(kernel);
    std::fs::remove_dir_all(pins.path()).unwrap();
    let agent = Agent::start(&mut files);
    let proxy = files.proxy;
    let (ok, out) = cli(config, &["block", "list", "--json"]);
    assert!(ok, "{out}");
    let listing: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let listed: Vec<_> = listing
        .as_array()
        .unwrap_or_else(|| panic!("a JSON list: {out}"))
        .iter()
        .filter(|b| b["net"] == "127.0.0.2/32")
        .collect();
    assert!(listed.len() == 1 && listed[0]["reason"] == "flood", "{out}");
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let hit = kernel
        .block_covering("127.0.0.2".parse().unwrap())
        .unwrap()
        .expect("restored into the kernel");
    assert_eq!(hit.reason, limiter_common::reason::FLOOD);
    let (_, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(
        greeting.starts_with("421 4.7.0"),
        "still blocked after the restart: {greeting}"
    );

    let (ok, out) = cli(config, &["block", "del", "127.0.0.2"]);
    assert!(ok, "{out}");
    assert!(
        kernel
            .block_covering("127.0.0.2".parse().unwrap())
            .unwrap()
            .is_none(),
        "`block del` left the block in the kernel"
    );
    let (_, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "unblocked: {greeting}");
    agent.stop();
    drop(kernel);
}

/// `smtp-limiter stats` and `/metrics` show the content filters' verdicts,
/// with the real binary, clamd, and the built-in backend.
#[test]
fn stats_and_metrics_show_filter_verdicts() {
    let test = "stats_and_metrics_show_filter_verdicts";
    if !limiter_tests::clamd::prerequisites(test) {
        return;
    }
    let clamd = limiter_tests::clamd::Clamd::start().expect("start clamd");
    let mut files = AgentFiles::new(
        "filters",
        &format!(
            "[kernel]\nmode = \"off\"\n[filters]\nmax_rejects = 0\n[filters.clamav]\naddress = \"{}\"",
            clamd.tcp_address()
        ),
    );
    let agent = Agent::start(&mut files);
    let (config, proxy, metrics) = (&files.config, files.proxy, files.metrics);
    let (mut smtp, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
    for (body, want) in [
        ("Subject: hello\r\n\r\nclean\r\n", "250"),
        (
            &format!(
                "Subject: hi\r\n\r\n{}\r\n",
                limiter_tests::clamd::VIRUS_MARKER
            )[..],
            "550 5.7.1",
        ),
    ] {
        assert!(smtp
            .cmd("MAIL FROM:<a@client.test>")
            .unwrap()
            .starts_with("250"));
        assert!(smtp
            .cmd("RCPT TO:<alice@example.com>")
            .unwrap()
            .starts_with("250"));
        assert!(smtp.cmd("DATA").unwrap().starts_with("354"));
        let reply = smtp.cmd(&format!("{body}.")).unwrap();
        assert!(reply.starts_with(want), "{body:?}: {reply}");
    }
    let (ok, out) = cli(config, &["stats", "--json"]);
    assert!(ok, "{out}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats --json is JSON");
    assert_eq!(stats["filters"]["verdicts"]["clean"], 1, "{out}");
    assert_eq!(stats["filters"]["verdicts"]["virus"], 1, "{out}");
    let mut stream = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stream, &mut text).unwrap();
    assert!(
        text.contains("smtp_limiter_filter_verdicts_total{verdict=\"virus\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("smtp_limiter_filter_wait_seconds_count 2"),
        "{text}"
    );
    agent.stop();
}

/// A block ends by itself: refused while it lasts, served once it expired
/// (the proxy checks the expiry itself), and the agent's sweep (every 10
/// s) then removes it from its list and from the kernel's map.
#[test]
fn a_block_expires_and_the_sweep_removes_it() {
    if !prerequisites("a_block_expires_and_the_sweep_removes_it") {
        return;
    }
    let pins = PinDir::new();
    let mut files = AgentFiles::new(
        "expiry",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"",
            pins.path().display()
        ),
    );
    let agent = Agent::start(&mut files);
    let (config, proxy) = (&files.config, files.proxy);
    let source = "127.0.0.6";
    let (ok, out) = cli(config, &["block", "add", source, "--for", "3s"]);
    assert!(ok, "{out}");
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let in_kernel = || {
        kernel
            .blocks()
            .unwrap()
            .iter()
            .any(|b| b.net.to_string() == format!("{source}/32"))
    };
    assert!(in_kernel(), "the block is not in the kernel's map");
    let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    assert!(
        greeting.starts_with("421 4.7.0"),
        "while blocked: {greeting}"
    );
    smtp.expect_closed();

    // Served again once it expired (3 s, with room for a loaded machine).
    let served = limiter_tests::tcp::wait_until(Duration::from_secs(10), || {
        Client::from_stream(connect_from(source, proxy))
            .is_ok_and(|(_, greeting)| greeting.starts_with("220 "))
    });
    assert!(served, "still refused 10 s after a 3 s block");

    // The sweep (every 10 s) removes it from the list and the kernel.
    let listed = || {
        let (ok, out) = cli(config, &["block", "list", "--json"]);
        assert!(ok, "{out}");
        out.contains(&format!("\"{source}/32\""))
    };
    let swept =
        limiter_tests::tcp::wait_until(Duration::from_secs(30), || !listed() && !in_kernel());
    assert!(
        swept,
        "30 s after its expiry the block is still listed ({}) or in the kernel ({})",
        listed(),
        in_kernel()
    );
    agent.stop();
    drop(kernel);
}

/// SIGTERM with sessions open (`smtp.shutdown_grace` = 3 s): an idle
/// session is told 421 4.3.0 at once, a message in DATA is still taken
/// (250, which the proxy only says when the backend did), a message that
/// does not end within the grace is cut when it is over (not before), and
/// the agent exits successfully.
#[test]
fn sigterm_lets_a_transaction_finish_within_the_grace_and_cuts_the_rest() {
    let test = "sigterm_lets_a_transaction_finish_within_the_grace_and_cuts_the_rest";
    if !limiter_tests::fixture::require(
        test,
        // SAFETY: geteuid has no preconditions.
        (unsafe { libc::geteuid() } != 0).then(|| "needs root (sources 127.0.0.x)".to_owned()),
    ) {
        return;
    }
    const GRACE: Duration = Duration::from_secs(3);
    let mut files = AgentFiles::new(
        "sigterm",
        "[kernel]\nmode = \"off\"\n[smtp]\nshutdown_grace = \"3s\"",
    );
    let mut agent = Agent::start(&mut files);
    let proxy = files.proxy;
    let in_data = |source: &str| {
        let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
        assert!(greeting.starts_with("220 "), "{greeting}");
        assert!(smtp.cmd("EHLO client.test").unwrap().starts_with("250"));
        for (line, want) in [
            ("MAIL FROM:<a@client.test>", "250 "),
            ("RCPT TO:<alice@example.com>", "250 "),
            ("DATA", "354 "),
        ] {
            let reply = smtp.cmd(line).unwrap();
            assert!(reply.starts_with(want), "{line}: {reply}");
        }
        smtp.send(b"Subject: in flight\r\n\r\nfirst line\r\n")
            .unwrap();
        smtp
    };
    let mut finishing = in_data("127.0.0.7");
    let mut stuck = in_data("127.0.0.8");
    let (mut idle, greeting) = Client::from_stream(connect_from("127.0.0.9", proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(idle.cmd("EHLO idle.test").unwrap().starts_with("250"));

    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    match idle.next_event() {
        limiter_tests::proxy::Seen::Reply(r) if r.starts_with("421 4.3.0") => {}
        other => panic!("idle session after SIGTERM: {other:?}"),
    }
    finishing.send(b"last line\r\n.\r\n").unwrap();
    let reply = finishing.reply().unwrap();
    assert!(
        reply.starts_with("250 "),
        "a message in flight at SIGTERM: {reply}"
    );
    let cut = stuck.next_event();
    let after = signalled.elapsed();
    assert!(
        matches!(&cut, limiter_tests::proxy::Seen::Reply(r) if r.starts_with("421 "))
            || cut.is_ended_by_peer(),
        "the unfinished message after the grace: {cut:?}"
    );
    // Not before the grace is over (a lower bound holds on any machine).
    assert!(
        after >= GRACE - Duration::from_millis(200),
        "cut {after:?} after SIGTERM, before the {GRACE:?} grace"
    );
    let status = agent.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent's exit after SIGTERM: {status:?}"
    );
}

/// `allow` and `top --once` against a running agent: an allow-listed
/// source is never limited or blocked (a harvester from it is not cut
/// off), in the kernel's allow map too; `top` shows the refusals and the
/// block that followed; `allow del` puts the source under the limits again.
#[test]
fn cli_allow_and_top_against_a_running_agent() {
    if !prerequisites("cli_allow_and_top_against_a_running_agent") {
        return;
    }
    let pins = PinDir::new();
    let mut files = AgentFiles::new(
        "allow",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"\n[limits]\nmax_failed_rcpt = 2",
            pins.path().display()
        ),
    );
    let agent = Agent::start(&mut files);
    let (config, proxy) = (&files.config, files.proxy);
    let (allowed, other) = ("127.0.0.10", "127.0.0.11");
    let kernel = BpfDatapath::open_pinned(pins.path()).unwrap();
    let allow_listed = || {
        let (ok, out) = cli(config, &["allow", "list", "--json"]);
        assert!(ok, "{out}");
        let list: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let net = format!("{allowed}/32");
        let listed = list
            .as_array()
            .unwrap_or_else(|| panic!("a JSON list: {out}"))
            .iter()
            .any(|n| *n == net.as_str());
        let in_kernel = kernel
            .allows()
            .unwrap()
            .iter()
            .any(|n| n.to_string() == net);
        (listed, in_kernel)
    };
    let (ok, out) = cli(config, &["allow", "add", allowed]);
    assert!(ok, "{out}");
    assert_eq!(allow_listed(), (true, true), "(listed, in the kernel)");

    // Allowed: ten unknown recipients, never cut off, never blocked.
    let (mut smtp, greeting) = Client::from_stream(connect_from(allowed, proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(smtp.cmd("EHLO allowed.test").unwrap().starts_with("250"));
    assert!(smtp
        .cmd("MAIL FROM:<a@allowed.test>")
        .unwrap()
        .starts_with("250 "));
    for n in 1..=10 {
        let reply = smtp
            .cmd(&format!("RCPT TO:<nobody{n}@example.com>"))
            .unwrap();
        assert!(reply.starts_with("550 "), "allow-listed, RCPT {n}: {reply}");
    }
    assert!(smtp.cmd("QUIT").unwrap().starts_with("221"));
    // Another source is cut off after 2 and blocked.
    assert_eq!(failed_rcpts_before_the_cut(other, proxy), 2);

    let (ok, out) = cli(config, &["top", "--once", "--json"]);
    assert!(ok, "{out}");
    let top: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let harvest = top["rejections"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .find(|r| r["reason"] == "harvest")
        .and_then(|r| r["count"].as_u64());
    assert_eq!(harvest, Some(1), "one harvest refusal: {out}");
    let blocks: Vec<_> = top["drops"]
        .as_array()
        .unwrap_or_else(|| panic!("{out}"))
        .iter()
        .map(|b| {
            (
                b["net"].as_str().unwrap_or("?"),
                b["reason"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    assert_eq!(
        blocks,
        vec![(format!("{other}/32").as_str(), "harvest")],
        "only the other source is blocked: {out}"
    );

    // No longer allowed: under the limits again.
    let (ok, out) = cli(config, &["allow", "del", allowed]);
    assert!(ok, "{out}");
    assert_eq!(allow_listed(), (false, false), "(listed, in the kernel)");
    assert_eq!(failed_rcpts_before_the_cut(allowed, proxy), 2);
    agent.stop();
    drop(kernel);
}
