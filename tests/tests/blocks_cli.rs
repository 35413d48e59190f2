//! Block management with the real `smtp-limiter` binary, as an operator
//! uses it: `block add` with a free-text reason, `block list` with its
//! filters and `--json`, `block check` and its exit status, `block import`
//! and `block export` round trips, `lists.reject_files` and
//! `lists.allow_files` re-read on reload and SIGHUP (entries removed from a
//! file leave the kernel), the state store across a restart (and the
//! conversion of format 1), and `recipients check`'s exit status.
//!
//! Each test runs its own agent inside a server network namespace joined to
//! a client namespace by a veth pair; with the kernel layer on, XDP is
//! attached to the server's end, and what the CLI says is checked against
//! real SYNs: dropped (the connect times out and the kernel's drop counter
//! grows) or answered (the proxy's 220 greeting).

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use limiter_tests::{
    kernel::PinDir,
    netns::{link, Link, NetNs},
    prerequisites, smtp_limiter_binary,
    tcp::connect_from,
};
use serde_json::Value;

const SMTP: u16 = 25;
/// How long the agent may take to answer on its control socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// A dropped SYN is retransmitted after 1 s: a connect that has not
/// completed by then was not answered.
const SYN_TIMEOUT: Duration = Duration::from_millis(900);
/// How long a change the agent makes on its own (SIGHUP, a snapshot) may
/// take to show.
const WAIT: Duration = Duration::from_secs(20);

/// An agent in a network namespace of its own, its files, and a client
/// namespace on the other end of a veth pair.
struct Rig {
    // Drop order: the agent, then the link, then the namespaces.
    agent: Option<Child>,
    link: Link,
    client: NetNs,
    server: NetNs,
    dir: PathBuf,
    _pins: PinDir,
    config: PathBuf,
}

impl Rig {
    /// Writes the configuration (`kernel` on: XDP on the veth; off: the
    /// proxy alone) with `extra` TOML after it (`{dir}` there is the rig's
    /// directory); the agent is not started.
    fn new(tag: &str, kernel: bool, extra: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let server = NetNs::new("slb-blk-srv").unwrap();
        let client = NetNs::new("slb-blk-cli").unwrap();
        let link = link(&server, &client, tag).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-blocks-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let pins = PinDir::new();
        let kernel = if kernel {
            format!(
                "mode = \"required\"\ninterfaces = [\"{}\"]\nattach = \"xdp\"\npin_path = \"{}\"\nports = [{SMTP}]",
                link.server_if,
                pins.path().display()
            )
        } else {
            "mode = \"off\"".to_owned()
        };
        let config = dir.join("smtp-limiter.toml");
        std::fs::write(
            &config,
            format!(
                r#"mode = "enforce"
[[listen]]
address = "{server}:{SMTP}"
tls = "none"
[backend]
address = "127.0.0.1:10026"
identity = "none"
builtin = true
[kernel]
{kernel}
[control]
socket = "{dir}/control.sock"
[metrics]
address = "127.0.0.1:9425"
[state]
directory = "{dir}/state"
{extra}
"#,
                server = link.server_v4,
                dir = dir.display(),
                extra = extra.replace("{dir}", &dir.display().to_string()),
            ),
        )
        .unwrap();
        Self {
            agent: None,
            link,
            client,
            server,
            dir,
            _pins: pins,
            config,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn client(&self, i: usize) -> Ipv4Addr {
        self.link.client_v4s[i]
    }

    /// Starts the agent in the server namespace and waits for its control
    /// socket.
    fn start(&mut self) {
        let socket = self.path("control.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(self.path("agent.log")).unwrap();
        let ns = std::fs::File::open(self.server.path()).unwrap();
        let mut cmd = Command::new(smtp_limiter_binary());
        cmd.args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: setns and prctl are async-signal-safe; `ns` stays open
        // until `cmd` is dropped.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start the agent");
        let deadline = Instant::now() + START_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "no control socket within {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent = Some(child);
    }

    /// SIGTERM; asserts a successful exit in time.
    fn stop(&mut self) {
        let mut child = self.agent.take().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "the agent exited with {status}:\n{}",
                    self.log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the agent did not stop within {STOP_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: i32) {
        let child = self.agent.as_ref().expect("running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Runs the CLI with the rig's configuration.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(smtp_limiter_binary())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run the CLI")
    }

    /// Runs the CLI and asserts exit status `code`; returns stdout.
    #[track_caller]
    fn cli_code(&self, args: &[&str], code: i32) -> String {
        let out = self.cli(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "smtp-limiter {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs the CLI with `--json`, asserting success; returns the JSON.
    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.cli_code(&all, 0);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// `block list` with `args`, as (net, origin, comment, expires) rows.
    #[track_caller]
    fn listed(&self, args: &[&str]) -> Vec<(String, String, Option<String>, Option<String>)> {
        let mut all = vec!["block", "list"];
        all.extend_from_slice(args);
        let mut rows: Vec<_> = self
            .json(&all)
            .as_array()
            .expect("an array")
            .iter()
            .map(|r| {
                (
                    r["net"].as_str().unwrap().to_owned(),
                    r["origin"].as_str().unwrap().to_owned(),
                    r["comment"].as_str().map(str::to_owned),
                    r["expires"].as_str().map(str::to_owned),
                )
            })
            .collect();
        rows.sort();
        rows
    }

    /// `block check ADDR`'s exit status and verdict.
    fn check(&self, address: &str) -> (Option<i32>, String) {
        let out = self.cli(&["block", "check", address]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// A kernel counter from `stats --json`.
    #[track_caller]
    fn counter(&self, name: &str) -> u64 {
        let stats = self.json(&["stats"]);
        stats["kernel"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name}: {stats}"))
    }

    fn smtp(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.link.server_v4), SMTP)
    }

    /// A connection from `source` is answered: the proxy's 220 greeting.
    #[track_caller]
    fn assert_answered(&self, source: Ipv4Addr) {
        let mut stream = connect_from(&self.client, IpAddr::V4(source), self.smtp(), WAIT)
            .unwrap_or_else(|e| panic!("{source} could not connect: {e}\n{}", self.log()));
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut greeting = [0u8; 64];
        let n = stream.read(&mut greeting).unwrap();
        assert!(
            greeting[..n].starts_with(b"220"),
            "{source}: {:?}",
            String::from_utf8_lossy(&greeting[..n])
        );
        let _ = stream.write_all(b"QUIT\r\n");
    }

    /// A SYN from `source` is dropped in the kernel: no answer, and the
    /// kernel's drop counters (`dropped_block` + `dropped_block_net`) grow.
    #[track_caller]
    fn assert_dropped(&self, source: Ipv4Addr) {
        let drops = || self.counter("dropped_block") + self.counter("dropped_block_net");
        let before = drops();
        match connect_from(&self.client, IpAddr::V4(source), self.smtp(), SYN_TIMEOUT) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("{source}: expected a dropped SYN, got {other:?}"),
        }
        assert!(drops() > before, "{source}: no kernel drop counted");
    }

    /// `/metrics`, scraped inside the server namespace.
    fn metrics(&self) -> String {
        self.server.run(|| {
            limiter_tests::agent::scrape_metrics(std::net::SocketAddr::from(([127, 0, 0, 1], 9425)))
        })
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {WAIT:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn add_list_check_and_round_trips_through_import_and_export() {
    if !prerequisites("add_list_check_and_round_trips_through_import_and_export") {
        return;
    }
    let mut rig = Rig::new("bla", true, "");
    rig.start();
    let spammer = rig.client(1).to_string();

    // A free-text reason beside the origin; the old spelling still sets
    // the origin.
    let out = rig.cli_code(
        &[
            "block",
            "add",
            &spammer,
            "--for",
            "2h",
            "--reason",
            "ticket 4711: spam run",
        ],
        0,
    );
    assert!(out.contains("manual: ticket 4711: spam run"), "{out}");
    rig.cli_code(&["block", "add", "192.0.2.0/24", "--reason", "harvest"], 0);
    rig.cli_code(
        &[
            "block",
            "add",
            "192.0.2.77",
            "--for",
            "1h",
            "--origin",
            "auth",
            "--reason",
            "ssh, \"brute\" force",
        ],
        0,
    );
    rig.cli_code(&["block", "add", "2001:db8::/48", "--origin", "flood"], 0);
    let out = rig.cli(&["block", "add", "192.0.2.78", "--origin", "ticket"]);
    assert_eq!(out.status.code(), Some(1), "an unknown origin is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown origin \"ticket\": use one of manual, harvest, auth, flood, reject-list, relay, filter, network"));

    // The kernel drops the blocked source; another client is answered.
    rig.assert_dropped(rig.client(1));
    rig.assert_answered(rig.client(0));

    // block check: exit 0 with the block and its reason; 1 when nothing
    // covers the address; 2 on a bad address.
    let (code, verdict) = rig.check(&spammer);
    assert_eq!(code, Some(0), "{verdict}");
    assert!(
        verdict.contains("dropped: blocked by") && verdict.contains("ticket 4711: spam run"),
        "{verdict}"
    );
    let check = rig.json(&["block", "check", "192.0.2.77"]);
    assert_eq!(check["dropped"], true, "{check}");
    let nets: Vec<&str> = check["matches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["net"].as_str().unwrap())
        .collect();
    assert_eq!(
        nets,
        ["192.0.2.77/32", "192.0.2.0/24"],
        "most specific first: {check}"
    );
    let (code, verdict) = rig.check("203.0.113.9");
    assert_eq!(code, Some(1), "{verdict}");
    assert!(verdict.contains("not dropped"), "{verdict}");
    assert_eq!(rig.check("not-an-address").0, Some(2));

    // block list: every block with origin and reason; the filters.
    let all = rig.listed(&[]);
    let summary: Vec<(&str, &str, Option<&str>)> = all
        .iter()
        .map(|(n, o, c, _)| (n.as_str(), o.as_str(), c.as_deref()))
        .collect();
    let spammer_net = format!("{spammer}/32");
    let mut want = vec![
        ("192.0.2.0/24", "harvest", None),
        ("192.0.2.77/32", "auth", Some("ssh, \"brute\" force")),
        ("2001:db8::/48", "flood", None),
        (
            spammer_net.as_str(),
            "manual",
            Some("ticket 4711: spam run"),
        ),
    ];
    want.sort();
    assert_eq!(summary, want);
    let auth = rig.listed(&["--origin", "auth"]);
    assert_eq!(auth.len(), 1, "{auth:?}");
    assert_eq!(auth[0].0, "192.0.2.77/32");
    let covering: Vec<String> = rig
        .listed(&["--covering", "192.0.2.77"])
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(covering, ["192.0.2.0/24", "192.0.2.77/32"]);
    assert_eq!(rig.listed(&["--limit", "2"]).len(), 2);
    let text = rig.cli_code(&["block", "list"], 0);
    assert!(text.starts_with("ADDRESS/NETWORK"), "{text}");
    assert!(text.contains("ticket 4711: spam run"), "{text}");
    let rows = rig.json(&["block", "list"]);
    let spammer_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["net"] == spammer_net.as_str())
        .unwrap();
    assert_eq!(spammer_row["in_kernel"], true, "{spammer_row}");
    assert!(
        spammer_row["drops"].as_u64().is_some_and(|d| d >= 1),
        "the dropped SYN is counted on its block: {spammer_row}"
    );

    // Metrics from counts, by origin.
    let metrics = rig.metrics();
    for line in [
        "smtp_limiter_blocks{origin=\"manual\"} 1",
        "smtp_limiter_blocks{origin=\"harvest\"} 1",
        "smtp_limiter_kernel_blocks 4",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }

    // Export, remove everything, import: the same blocks come back, with
    // their origins, reasons and ends; in each format.
    let delete_all = |rig: &Rig| {
        for (net, ..) in rig.listed(&[]) {
            rig.cli_code(&["block", "del", &net], 0);
        }
        assert!(rig.listed(&[]).is_empty());
    };
    for format in ["csv", "json"] {
        let file = rig.path(&format!("export.{format}"));
        let file = file.to_str().unwrap();
        rig.cli_code(&["block", "export", "--format", format, "-o", file], 0);
        delete_all(&rig);
        let (code, _) = rig.check(&spammer);
        assert_eq!(code, Some(1), "removed");
        rig.assert_answered(rig.client(1));
        let out = rig.cli_code(&["block", "import", file], 0);
        assert!(out.contains("imported 4 blocks"), "{format}: {out}");
        assert_eq!(rig.listed(&[]), all, "{format} round trip");
        rig.assert_dropped(rig.client(1));
    }
    // Plain: addresses only; the command line gives origin, reason, end.
    let plain = rig.path("export.txt");
    let plain = plain.to_str().unwrap();
    rig.cli_code(&["block", "export", "--format", "plain", "-o", plain], 0);
    let text = std::fs::read_to_string(plain).unwrap();
    assert_eq!(text.lines().count(), 4, "{text}");
    delete_all(&rig);
    rig.cli_code(
        &[
            "block",
            "import",
            plain,
            "--origin",
            "harvest",
            "--reason",
            "from fail2ban",
            "--for",
            "1h",
        ],
        0,
    );
    let imported = rig.listed(&[]);
    assert_eq!(
        imported.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        all.iter().map(|r| r.0.clone()).collect::<Vec<_>>()
    );
    assert!(
        imported
            .iter()
            .all(|r| r.1 == "harvest" && r.2.as_deref() == Some("from fail2ban") && r.3.is_some()),
        "{imported:?}"
    );

    // A bad line: nothing imported, the line named.
    let bad = rig.path("bad.txt");
    std::fs::write(&bad, "198.51.100.1\nnot-an-address\n").unwrap();
    let out = rig.cli(&["block", "import", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.txt:2:"), "{stderr}");
    assert!(rig.check("198.51.100.1").0 == Some(1), "nothing imported");
    rig.stop();
}

#[test]
fn list_files_are_reread_on_reload_and_sighup_and_leave_the_kernel() {
    if !prerequisites("list_files_are_reread_on_reload_and_sighup_and_leave_the_kernel") {
        return;
    }
    let mut rig = Rig::new(
        "blb",
        true,
        "[lists]\nreject_files = [\"{dir}/reject.cidr\"]\nallow_files = [\"{dir}/allow.cidr\"]\n",
    );
    let (plain, listed, allowed) = (rig.client(0), rig.client(2), rig.client(3));
    let reject = rig.path("reject.cidr");
    let allow = rig.path("allow.cidr");
    std::fs::write(
        &reject,
        format!("# spam sources\n{listed}   # bad host\n198.51.100.0/24\n"),
    )
    .unwrap();
    std::fs::write(&allow, format!("{allowed}\n")).unwrap();
    rig.start();
    rig.cli_code(
        &[
            "block",
            "add",
            &allowed.to_string(),
            "--reason",
            "blocked, but allowed",
        ],
        0,
    );

    rig.assert_answered(plain);
    let (code, verdict) = rig.check(&listed.to_string());
    assert_eq!(code, Some(0), "{verdict}");
    assert!(verdict.contains("reject.cidr:2"), "{verdict}");
    rig.assert_dropped(listed);
    let (code, verdict) = rig.check(&allowed.to_string());
    assert_eq!(code, Some(1), "{verdict}");
    assert!(
        verdict.contains("allow-listed") && verdict.contains("allow.cidr:1"),
        "{verdict}"
    );
    rig.assert_answered(allowed);
    let entries = rig.json(&["block", "list", "--origin", "reject-list"]);
    let sources: Vec<&str> = entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["list"].as_str().unwrap())
        .collect();
    assert_eq!(sources.len(), 2, "{entries}");
    assert!(
        sources.iter().all(|s| s.contains("reject.cidr:")),
        "{entries}"
    );

    // A bad line is refused at check-config and at reload, with its file
    // and line; the running lists stay.
    std::fs::write(
        &reject,
        format!("{listed}\n198.51.100.0/24\n198.51.100.7/24\n"),
    )
    .unwrap();
    for args in [&["check-config"][..], &["reload"][..]] {
        let out = rig.cli(args);
        assert!(!out.status.success(), "{args:?} accepted a bad list");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("reject.cidr:3:") && stderr.contains("host bits"),
            "{stderr}"
        );
    }
    assert_eq!(rig.check(&listed.to_string()).0, Some(0), "still listed");

    // Removed from the files and reloaded: the listed source is answered,
    // the formerly allowed one is dropped by its own block.
    std::fs::write(&reject, "198.51.100.0/24\n").unwrap();
    std::fs::write(&allow, "# nobody\n").unwrap();
    rig.cli_code(&["reload"], 0);
    let (code, verdict) = rig.check(&listed.to_string());
    assert_eq!(code, Some(1), "{verdict}");
    rig.assert_answered(listed);
    let (code, verdict) = rig.check(&allowed.to_string());
    assert_eq!(code, Some(0), "{verdict}");
    assert!(verdict.contains("blocked, but allowed"), "{verdict}");
    rig.assert_dropped(allowed);

    // SIGHUP re-reads them too.
    std::fs::write(&reject, format!("198.51.100.0/24\n{listed}\n")).unwrap();
    rig.signal(libc::SIGHUP);
    wait_for("the SIGHUP re-read reject.cidr", || {
        rig.check(&listed.to_string()).0 == Some(0)
    });
    rig.assert_dropped(listed);
    rig.stop();
}

#[test]
fn blocks_survive_a_restart_and_format_1_is_converted() {
    if !prerequisites("blocks_survive_a_restart_and_format_1_is_converted") {
        return;
    }
    let mut rig = Rig::new("blc", false, "");
    // As earlier versions wrote it: one pretty JSON file, `reason` the origin.
    std::fs::write(
        rig.path("state/blocks.json"),
        r#"{
  "version": 1,
  "blocks": [
    { "net": "192.0.2.7/32", "reason": "auth", "expires_unix": null, "since_unix": 1700000000, "repeat": 1 },
    { "net": "192.0.2.9/32", "reason": "harvest", "expires_unix": 4102444800 }
  ]
}"#,
    )
    .unwrap();
    rig.start();
    let rows = rig.listed(&[]);
    assert_eq!(
        rows.iter()
            .map(|r| (r.0.as_str(), r.1.as_str()))
            .collect::<Vec<_>>(),
        [("192.0.2.7/32", "auth"), ("192.0.2.9/32", "harvest")]
    );
    wait_for("blocks.json converted to blocks.snapshot", || {
        rig.path("state/blocks.snapshot").exists() && !rig.path("state/blocks.json").exists()
    });
    rig.cli_code(
        &[
            "block",
            "add",
            "192.0.2.8",
            "--for",
            "1h",
            "--reason",
            "kept across restarts",
        ],
        0,
    );
    rig.cli_code(&["block", "del", "192.0.2.7"], 0);
    let before = rig.listed(&[]);
    rig.stop();
    rig.start();
    let after = rig.listed(&[]);
    assert_eq!(after, before);
    assert!(after
        .iter()
        .any(|r| r.0 == "192.0.2.8/32" && r.2.as_deref() == Some("kept across restarts")));
    // Refused by the proxy at accept (the kernel layer is off here).
    let (code, verdict) = rig.check("192.0.2.8");
    assert_eq!(code, Some(0), "{verdict}");
    rig.stop();
}

#[test]
fn recipients_check_exits_1_unless_the_directory_knows_the_address() {
    if !prerequisites("recipients_check_exits_1_unless_the_directory_knows_the_address") {
        return;
    }
    // No directory answers on this port: the agent serves the set it keeps
    // in its state directory, written here as a refresh would have.
    let ldap = r#"[recipients.ldap]
url = "ldap://127.0.0.1:9"
base_dn = "dc=example,dc=com"
filter = "(objectClass=user)"
attributes = ["mail"]
"#;
    let mut rig = Rig::new("bld", false, ldap);
    let config = limiter_user::config::Config::load(&rig.config).unwrap();
    let ldap = config.recipients.ldap.as_ref().unwrap();
    use limiter_user::recipients::{cache, AddressSet};
    cache::save(
        &rig.path("state").join(limiter_user::recipients::CACHE_FILE),
        &cache::Origin::of(ldap),
        &AddressSet::from_addresses(cache::folding(ldap), ["alice@example.com"]),
        std::time::SystemTime::now(),
    )
    .unwrap();
    rig.start();
    let out = rig.cli_code(&["recipients", "check", "alice@example.com"], 0);
    assert!(out.contains("known"), "{out}");
    let out = rig.cli_code(&["recipients", "check", "nobody@example.com"], 1);
    assert!(out.contains("unknown"), "{out}");
    rig.cli_code(&["recipients", "check", "bob@elsewhere.example"], 1);
    rig.stop();
}
