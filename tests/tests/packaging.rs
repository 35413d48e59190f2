//! The agent as the operating system runs it, and the Debian package:
//! systemd's readiness protocol (READY=1 only once the stored blocks are
//! back and the SMTP port accepts; RELOADING=1, STOPPING=1), the unit's
//! capability set loading BPF, log lines under journald and at the
//! configured level, the default configuration path, and `cargo xtask
//! package` built, inspected, installed into a scratch root with dpkg,
//! run, verified with `systemd-analyze verify` and purged.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use limiter_tests::{
    fixture::{self, free_port},
    kernel::PinDir,
    prerequisites,
    proxy::Client,
    smtp_limiter_binary,
};

/// How long the agent may take to say READY=1 (CI runs Postfix and slapd
/// beside it on two CPUs).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to exit after SIGTERM (shutdown grace 10 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
const DEFAULT_CONFIG: &str = "/etc/smtp-limiter/smtp-limiter.toml";

/// A directory of its own under /tmp, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "smtp-limiter-packaging.{}.{}.{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    fn join(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent's configuration on free loopback ports, the built-in backend,
/// `state` keys in `[state]` and `extra` TOML at the end.
struct Files {
    dir: Scratch,
    proxy: SocketAddr,
}

impl Files {
    fn new(name: &str, state: &str, extra: &str) -> Self {
        let dir = Scratch::new(name);
        let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        std::fs::write(
            dir.join("smtp-limiter.toml"),
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
                directory = "{state_dir}"
                {state}
                [metrics]
                address = "127.0.0.1:{metrics}"
                {extra}
                "#,
                backend = free_port().unwrap(),
                socket = dir.join("control.sock").display(),
                state_dir = dir.join("state").display(),
                metrics = free_port().unwrap(),
            ),
        )
        .unwrap();
        Self { dir, proxy }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("smtp-limiter.toml")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The CLI on this configuration; panics with its output when it fails.
    #[track_caller]
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(smtp_limiter_binary())
            .args(args)
            .arg("--config")
            .arg(self.config())
            .output()
            .unwrap();
        let text = text(&out);
        assert!(out.status.success(), "smtp-limiter {args:?}: {text}");
        text
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The agent with `NOTIFY_SOCKET` pointing at a socket the test owns.
struct Notified {
    child: Child,
    socket: UnixDatagram,
    /// Every state the agent sent, in order.
    seen: Vec<String>,
}

impl Notified {
    /// Starts `wrapper… smtp-limiter run --config FILE` with `env`.
    fn start(files: &Files, wrapper: &[String], env: &[(&str, &str)]) -> Self {
        let path = files.dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        let log = std::fs::File::create(files.dir.join("agent.log")).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(smtp_limiter_binary());
                command
            }
            None => Command::new(smtp_limiter_binary()),
        };
        command
            .args(["run", "--config"])
            .arg(files.config())
            .env("NOTIFY_SOCKET", &path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Self {
            child: command.spawn().expect("start the agent"),
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits for a state holding `line` (e.g. `READY=1`); the states up to
    /// and including it. Panics with the agent's log when it exits or says
    /// nothing of the kind within [`READY_TIMEOUT`].
    #[track_caller]
    fn wait_for(&mut self, line: &str, files: &Files) -> Vec<String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut states = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            // An agent that exited may have sent its last states just
            // before: they are read (without waiting) before it is judged.
            let exited = self.child.try_wait().ok().flatten();
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {line} within {READY_TIMEOUT:?}; the agent sent {states:?}:\n{}",
                files.log()
            );
            // Short waits, so that an exit is noticed.
            let wait = match exited {
                Some(_) => Duration::from_millis(1),
                None => left.min(Duration::from_millis(200)),
            };
            self.socket.set_read_timeout(Some(wait)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let state = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(state.clone());
                    states.push(state.clone());
                    if state.lines().any(|l| l == line) {
                        return states;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(status) = exited {
                        panic!(
                            "the agent exited ({status}) before {line}; it sent {states:?}:\n{}",
                            files.log()
                        );
                    }
                }
                Err(e) => panic!("reading the notify socket: {e}"),
            }
        }
    }

    /// SIGTERM; the states sent until the exit, which must be a success.
    #[track_caller]
    fn stop(mut self, files: &Files) -> Vec<String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let stopping = self.wait_for("STOPPING=1", files);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait().unwrap() {
                Some(status) => {
                    assert!(status.success(), "exit {status}:\n{}", files.log());
                    return stopping;
                }
                None if Instant::now() > deadline => {
                    panic!("no exit {STOP_TIMEOUT:?} after SIGTERM:\n{}", files.log())
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A connection from `source` (a loopback address of its own) to `to`.
fn connect_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else {
        panic!("{to}: IPv4 only")
    };
    // SAFETY: a new socket, owned by the stream made from it (or closed).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: we own fd.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (from, dest) = (sockaddr(source, 0), sockaddr(*to.ip(), to.port()));
    // SAFETY: valid sockaddr_in values of length len.
    if unsafe { libc::bind(fd, (&raw const from).cast(), len) } != 0
        || unsafe { libc::connect(fd, (&raw const dest).cast(), len) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// The first reply to a connection from `source` to the proxy.
#[track_caller]
fn first_reply(source: Ipv4Addr, proxy: SocketAddr) -> String {
    let stream =
        connect_from(source, proxy).unwrap_or_else(|e| panic!("connect {source} -> {proxy}: {e}"));
    let (_, reply) = Client::from_stream(stream).unwrap_or_else(|e| panic!("{source}: {e}"));
    reply
}

#[test]
fn ready_only_once_blocks_are_restored_and_the_smtp_port_accepts() {
    let files = Files::new("ready", "", "[kernel]\nmode = \"off\"");
    // A first run stores a block.
    let mut first = Notified::start(&files, &[], &[]);
    first.wait_for("READY=1", &files);
    files.cli(&["block", "add", "127.0.0.9", "--for", "1h"]);
    first.stop(&files);

    let mut agent = Notified::start(&files, &[], &[]);
    let before = agent.wait_for("READY=1", &files);
    // Ready means serving, with the stored block in force: no retry, no wait.
    let greeting = first_reply(Ipv4Addr::LOCALHOST, files.proxy);
    assert!(greeting.starts_with("220 "), "{greeting}");
    let refused = first_reply(Ipv4Addr::new(127, 0, 0, 9), files.proxy);
    assert!(
        refused.starts_with("421 4.7.0"),
        "the restored block of 127.0.0.9 is not in force at READY=1: {refused}"
    );
    let ready = before.last().unwrap();
    assert!(
        ready.contains(&format!("STATUS=listening on {}", files.proxy)),
        "{ready}"
    );
    let restoring = before
        .iter()
        .position(|s| s == "STATUS=restoring stored blocks");
    assert!(
        restoring.is_some_and(|i| i + 1 < before.len()),
        "restoring must come before READY=1: {before:?}"
    );
    assert_eq!(
        before.iter().filter(|s| s.contains("READY=1")).count(),
        1,
        "{before:?}"
    );

    // A reload through the CLI (the unit's ExecReload) is bracketed.
    files.cli(&["reload"]);
    let reload = agent.wait_for("READY=1", &files);
    let reloading = reload
        .iter()
        .find(|s| s.lines().any(|l| l == "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {reload:?}"));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);
    agent.stop(&files);

    // Not under journald, stderr a file: timestamps, and no colour codes.
    let log = files.log();
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log}");
    assert!(
        log.lines().next().is_some_and(has_timestamp),
        "no timestamp:\n{log}"
    );
}

/// The unit's `CapabilityBoundingSet=` as `setpriv --bounding-set` wants it.
fn unit_capabilities() -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/smtp-limiter.service"),
    )
    .unwrap();
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet=");
    std::iter::once("-all".to_owned())
        .chain(caps.split_whitespace().map(|c| {
            format!(
                "+{}",
                c.strip_prefix("CAP_")
                    .unwrap_or_else(|| panic!("{c}: not CAP_*"))
                    .to_lowercase()
            )
        }))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn the_units_capabilities_load_the_kernel_programs() {
    let name = "the_units_capabilities_load_the_kernel_programs";
    if !prerequisites(name)
        || !fixture::require(
            name,
            fixture::find_program("setpriv", &["/usr/bin", "/bin"], "util-linux")
                .err()
                .map(|e| e.to_string()),
        )
    {
        return;
    }
    let pins = PinDir::new();
    let files = Files::new(
        "caps",
        "",
        &format!(
            "[kernel]\nmode = \"required\"\npin_path = \"{}\"",
            pins.path().display()
        ),
    );
    // As systemd runs it: root, only the unit's capabilities, no new
    // privileges.
    let wrapper = [
        "setpriv".to_owned(),
        "--bounding-set".to_owned(),
        unit_capabilities(),
        "--no-new-privs".to_owned(),
        "--".to_owned(),
    ];
    let mut agent = Notified::start(&files, &wrapper, &[]);
    let states = agent.wait_for("READY=1", &files);
    let ready = states.last().unwrap();
    assert!(
        !ready.contains("kernel layer off"),
        "kernel.mode = required and READY=1, yet {ready}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.id())).unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(str::trim)
        .unwrap();
    let bounding = u64::from_str_radix(bounding, 16).unwrap();
    assert_eq!(
        bounding & (1 << 21),
        0,
        "the agent runs with CAP_SYS_ADMIN: the wrapper did not apply"
    );
    assert!(
        pins.path().join("BLOCK_V4").exists(),
        "no pinned BLOCK_V4 map"
    );
    agent.stop(&files);
}

#[test]
fn log_lines_carry_no_colour_codes_and_follow_the_configured_level() {
    // journald gives the service a stream whose device:inode it names in
    // JOURNAL_STREAM: here the log file plays that stream.
    let files = Files::new("logs", "log_level = \"warn\"", "[kernel]\nmode = \"off\"");

    let start = |env: &[(&str, &str)]| {
        let log = files.dir.join("agent.log");
        // The agent truncates it: create it first to learn its inode.
        std::fs::write(&log, "").unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        let stream = format!("{}:{}", meta.dev(), meta.ino());
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.push(("JOURNAL_STREAM", &stream));
        let mut agent = Notified::start(&files, &[], &env);
        agent.wait_for("READY=1", &files);
        agent.stop(&files);
        files.log()
    };

    let log = start(&[]);
    assert!(!log.contains('\x1b'), "colour codes in the log:\n{log}");
    assert!(!log.is_empty());
    assert!(
        log.lines()
            .any(|l| l.starts_with("<4>") && l.contains("built-in test backend")),
        "no warning with its priority prefix:\n{log}"
    );
    for line in log.lines() {
        assert!(
            line.starts_with("<3>") || line.starts_with("<4>"),
            "state.log_level = warn, yet: {line}\n{log}"
        );
        assert!(!has_timestamp(line), "a timestamp under journald: {line}");
    }

    // RUST_LOG overrides state.log_level.
    let log = start(&[("RUST_LOG", "info")]);
    assert!(
        log.lines()
            .any(|l| l.starts_with("<6>") && l.contains("listening")),
        "RUST_LOG=info did not override state.log_level = warn:\n{log}"
    );
}

/// Whether `line` holds an RFC 3339 date and time (`2026-12-04T03:18:06`).
fn has_timestamp(line: &str) -> bool {
    let bytes = line.as_bytes();
    bytes.windows(11).any(|w| {
        w.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            10 => *b == b'T',
            _ => b.is_ascii_digit(),
        })
    })
}

#[test]
fn without_config_every_command_reads_the_default_path() {
    let out = Command::new(smtp_limiter_binary())
        .args(["check-config"])
        .output()
        .unwrap();
    let said = text(&out);
    if Path::new(DEFAULT_CONFIG).exists() {
        let named = Command::new(smtp_limiter_binary())
            .args(["check-config", "--config", DEFAULT_CONFIG])
            .output()
            .unwrap();
        assert_eq!(out.status.success(), named.status.success(), "{said}");
        assert_eq!(out.stdout, named.stdout, "{said}");
    } else {
        assert!(!out.status.success(), "{said}");
        assert!(
            said.contains(DEFAULT_CONFIG) && said.contains("--config"),
            "the error should name the path and the way out: {said}"
        );
        // Not the embedded demonstration configuration, for the CLI either.
        let out = Command::new(smtp_limiter_binary())
            .args(["block", "list"])
            .output()
            .unwrap();
        assert!(
            !out.status.success() && text(&out).contains(DEFAULT_CONFIG),
            "{}",
            text(&out)
        );
    }
}

/// `cargo xtask package`'s binary, next to smtp-limiter (`cargo xtask
/// test` runs it, so it is built and current).
fn xtask_binary() -> PathBuf {
    let xtask = smtp_limiter_binary().with_file_name("xtask");
    assert!(
        xtask.is_file(),
        "no {} (built by `cargo xtask …`, or `cargo build -p xtask`)",
        xtask.display()
    );
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../xtask/src/package.rs");
    let built = std::fs::metadata(&xtask).unwrap().modified().unwrap();
    let changed = std::fs::metadata(&source).unwrap().modified().unwrap();
    assert!(
        built >= changed,
        "{} is older than {}: `cargo build -p xtask`",
        xtask.display(),
        source.display()
    );
    xtask
}

#[track_caller]
fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let text = text(&out);
    assert!(out.status.success(), "{command:?} failed: {text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path, base: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, base, out);
        } else {
            out.push(path.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

#[test]
fn the_package_installs_runs_and_purges_in_a_scratch_root() {
    let name = "the_package_installs_runs_and_purges_in_a_scratch_root";
    let missing = ["dpkg", "dpkg-deb", "systemd-analyze"]
        .iter()
        .find_map(|tool| {
            fixture::find_program(
                tool,
                &["/usr/bin", "/bin"],
                "dpkg, systemd (cargo xtask setup)",
            )
            .err()
            .map(|e| e.to_string())
        });
    if !fixture::require(name, missing) {
        return;
    }
    let scratch = Scratch::new("deb");
    let out = run(Command::new(xtask_binary())
        .args(["package", "--binary"])
        .arg(smtp_limiter_binary())
        .arg("--out")
        .arg(scratch.join("out")));
    let deb = PathBuf::from(out.lines().last().unwrap_or_default());
    assert!(deb.is_file(), "xtask printed {out:?}");

    let control = run(Command::new("dpkg-deb").arg("-f").arg(&deb));
    let field = |name: &str| {
        control
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {control}"))
            .to_owned()
    };
    assert_eq!(field("Package"), "smtp-limiter");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    let arch = run(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture"), arch.trim());
    assert!(field("Depends").contains("libc6 (>= 2."), "{control}");
    let conffiles = run(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), DEFAULT_CONFIG);

    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in [
        "./usr/sbin/smtp-limiter",
        "./usr/lib/systemd/system/smtp-limiter.service",
        "./etc/smtp-limiter/smtp-limiter.toml",
        "./usr/share/man/man8/smtp-limiter.8.gz",
        "./usr/share/man/man8/smtp-limiter-run.8.gz",
        "./usr/share/man/man8/smtp-limiter-block-add.8.gz",
        "./usr/share/bash-completion/completions/smtp-limiter",
        "./usr/share/zsh/vendor-completions/_smtp-limiter",
        "./usr/share/fish/vendor_completions.d/smtp-limiter.fish",
        "./usr/share/doc/smtp-limiter/copyright",
        "./usr/share/doc/smtp-limiter/README.md",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(&format!(" {path}"))),
            "{path} is not in the package:\n{listing}"
        );
    }
    assert!(
        !listing.contains("smtp-limiter-generate"),
        "the hidden generate command got a man page:\n{listing}"
    );

    // Installed into a root of its own: the maintainer scripts run outside
    // a chroot with DPKG_ROOT set, and touch nothing of this host.
    let root = scratch.join("root");
    for dir in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(file), "").unwrap();
    }
    let dpkg = || {
        let mut dpkg = Command::new("dpkg");
        dpkg.arg(format!("--root={}", root.display())).args([
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
        ]);
        dpkg
    };
    run(dpkg().arg("--install").arg(&deb));

    let binary = root.join("usr/sbin/smtp-limiter");
    let version = run(Command::new(&binary).arg("--version"));
    assert!(
        version.contains(&format!("smtp-limiter {}", env!("CARGO_PKG_VERSION")))
            && version.contains("kernel programs embedded"),
        "{version}"
    );
    let help = run(Command::new(&binary).arg("--help"));
    for command in ["run", "check-config", "block", "reload"] {
        assert!(help.contains(command), "--help lacks {command}: {help}");
    }
    assert!(!help.contains("generate"), "{help}");
    let config = root.join("etc/smtp-limiter/smtp-limiter.toml");
    let effective = run(Command::new(&binary)
        .arg("check-config")
        .arg("--config")
        .arg(&config));
    // The package's configuration relays to a real MTA; the built-in
    // backend discards mail.
    assert!(effective.contains("builtin = false"), "{effective}");
    let mode = std::fs::metadata(&config).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o640, "{}", config.display());
    let page = run(Command::new("gzip")
        .arg("-dc")
        .arg(root.join("usr/share/man/man8/smtp-limiter.8.gz")));
    assert!(
        page.starts_with(".ie") || page.contains(".TH smtp-limiter 8"),
        "{page}"
    );
    assert!(
        page.contains("/etc/smtp-limiter/smtp-limiter.toml"),
        "{page}"
    );
    run(Command::new("bash")
        .arg("-n")
        .arg(root.join("usr/share/bash-completion/completions/smtp-limiter")));
    // Every shell completes `limits set` with the live limits' names (fish
    // through lines of its own: clap_complete's fish script has none).
    for path in [
        "usr/share/bash-completion/completions/smtp-limiter",
        "usr/share/zsh/vendor-completions/_smtp-limiter",
        "usr/share/fish/vendor_completions.d/smtp-limiter.fish",
    ] {
        let script = std::fs::read_to_string(root.join(path)).unwrap();
        for limit in limiter_user::config::LIVE_LIMITS {
            assert!(script.contains(limit.name), "{path} lacks {}", limit.name);
        }
    }
    let copyright =
        std::fs::read_to_string(root.join("usr/share/doc/smtp-limiter/copyright")).unwrap();
    for needle in [
        "MIT OR Apache-2.0",
        "Apache License",
        "Permission is hereby granted",
        "tokio ",
    ] {
        assert!(copyright.contains(needle), "copyright lacks {needle:?}");
    }

    // The installed unit, with its paths under the scratch root.
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/smtp-limiter.service"))
        .unwrap()
        .replace("/usr/sbin/smtp-limiter", &binary.display().to_string());
    let unit_copy = scratch.join("smtp-limiter.service");
    std::fs::write(&unit_copy, unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_copy)
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .unwrap();
    let said = text(&verify);
    assert!(
        verify.status.success() && !said.contains("smtp-limiter.service:"),
        "systemd-analyze verify: {said}"
    );

    // State the agent would have made, and the control socket's directory
    // an agent run by hand leaves (the unit's RuntimeDirectory= would go
    // with the service), then a purge: nothing of the package is left.
    std::fs::create_dir_all(root.join("var/lib/smtp-limiter")).unwrap();
    std::fs::write(root.join("var/lib/smtp-limiter/blocks"), "x").unwrap();
    std::fs::create_dir_all(root.join("run/smtp-limiter")).unwrap();
    std::fs::write(root.join("run/smtp-limiter/control.sock"), "").unwrap();
    run(dpkg().args(["--purge", "smtp-limiter"]));
    let mut left = Vec::new();
    files_under(&root, &root, &mut left);
    left.retain(|f| !f.starts_with("var/lib/dpkg/"));
    assert!(left.is_empty(), "left after purge: {left:?}");
    assert!(!root.join("var/lib/smtp-limiter").exists());
    assert!(!root.join("run/smtp-limiter").exists());
    assert!(!root.join("etc/smtp-limiter").exists());
}
