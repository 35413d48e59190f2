//! The real `smtp-limiter` binary as an operator runs it: the agent with its
//! control socket, the CLI changing blocks and limits live, blocks stored
//! and restored after a restart that lost the kernel maps (as a reboot does).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use limiter_tests::{kernel::PinDir, prerequisites, proxy::Client, smtp_limiter_binary};
use limiter_user::kernel::{BpfDatapath, Datapath};

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
    fn start(config: &Path, socket: &Path) -> Self {
        let child = Command::new(smtp_limiter_binary())
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the agent");
        let agent = Self { child };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the agent did not open its control socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    dir: std::path::PathBuf,
    config: std::path::PathBuf,
    socket: std::path::PathBuf,
    proxy: SocketAddr,
    metrics: u16,
}

impl AgentFiles {
    fn new(name: &str, extra: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("smtp-limiter-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (listen, backend, metrics) = (free_port(), free_port(), free_port());
        let socket = dir.join("control.sock");
        let config = dir.join("smtp-limiter.toml");
        std::fs::write(
            &config,
            format!(
                r#"
                [[listen]]
                address = "127.0.0.1:{listen}"
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
                "#,
                socket = socket.display(),
                state = dir.join("state").display(),
            ),
        )
        .unwrap();
        Self {
            proxy: format!("127.0.0.1:{listen}").parse().unwrap(),
            dir,
            config,
            socket,
            metrics,
        }
    }
}

impl Drop for AgentFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn cli_blocks_through_the_agent_and_blocks_survive_lost_kernel_maps() {
    if !prerequisites("cli_blocks_through_the_agent_and_blocks_survive_lost_kernel_maps") {
        return;
    }
    let pins = PinDir::new();
    let files = AgentFiles::new(
        "agent",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"",
            pins.path().display()
        ),
    );
    let (config, socket, proxy) = (&files.config, &files.socket, files.proxy);
    let agent = Agent::start(config, socket);
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
    assert!(ok && out.contains("kernel: blocked"), "{out}");
    let (_, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(
        greeting.starts_with("421 4.7.0"),
        "blocked source: {greeting}"
    );
    let (_, greeting) = Client::from_stream(connect_from("127.0.0.3", proxy)).unwrap();
    assert!(greeting.starts_with("220"), "other source: {greeting}");

    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpt", "2"]);
    assert!(ok && out.contains("Not persisted"), "{out}");
    let (ok, out) = cli(config, &["limits", "show", "--json"]);
    assert!(ok && out.contains("\"max_failed_rcpt\": 2"), "{out}");
    let (ok, out) = cli(config, &["limits", "set", "max_failed_rcpt", "many"]);
    assert!(!ok && out.contains("max_failed_rcpt"), "{out}");
    let (ok, out) = cli(config, &["stats", "--json"]);
    assert!(ok && out.contains("\"sessions_total\""), "{out}");

    // A bad file is refused by reload and the running configuration stays.
    let good = std::fs::read_to_string(config).unwrap();
    std::fs::write(config, good.replace("[state]", "[state]\nbogus = 1")).unwrap();
    let (ok, out) = cli(config, &["reload"]);
    std::fs::write(config, &good).unwrap();
    assert!(!ok && out.contains("bogus"), "{out}");
    let (ok, out) = cli(config, &["reload"]);
    assert!(ok, "{out}");

    // Stop, lose the kernel maps (as a reboot does), start again.
    agent.stop();
    std::fs::remove_dir_all(pins.path()).unwrap();
    let agent = Agent::start(config, socket);
    let (ok, out) = cli(config, &["block", "list", "--json"]);
    assert!(
        ok && out.contains("\"127.0.0.2/32\"") && out.contains("\"flood\""),
        "{out}"
    );
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
    let (_, greeting) = Client::from_stream(connect_from("127.0.0.2", proxy)).unwrap();
    assert!(greeting.starts_with("220"), "unblocked: {greeting}");
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
    let files = AgentFiles::new(
        "filters",
        &format!(
            "[kernel]\nmode = \"off\"\n[filters]\nmax_rejects = 0\n[filters.clamav]\naddress = \"{}\"",
            clamd.tcp_address()
        ),
    );
    let (config, socket, proxy, metrics) =
        (&files.config, &files.socket, files.proxy, files.metrics);
    let agent = Agent::start(config, socket);
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
    let (ok, out) = cli(config, &["stats"]);
    assert!(ok && out.contains("virus: 1"), "{out}");
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
