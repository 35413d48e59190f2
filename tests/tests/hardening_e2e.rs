//! Issue 11 end to end: for each class of bypass an attacker found, the
//! attacker's probe against a real Postfix behind the proxy, with real
//! clients (swaks, Python's smtplib, raw sockets where the exact bytes
//! matter), now failing: refused at the client (reply class and enhanced
//! code, not wording) and never seen by Postfix (its log, its deliveries).
//!
//! The pure-SMTP classes run the proxy in-process ([`TestProxy`], kernel
//! layer off) in front of a private [`Postfix`] on loopback; clients bind
//! 127.0.0.2/127.0.0.3 so that Postfix's log (PROXY v2) names them. The
//! kernel classes (harvest across sessions ends in a kernel drop; observe
//! mode passes packets and counts them) run the real `smtp-limiter` binary
//! inside a server network namespace with its XDP program attached to the
//! veth, clients in a client namespace, and Postfix on the host's loopback
//! reached through a relay whose listening socket lives in the server
//! namespace.
//!
//! Needs root, Postfix, swaks, python3, openssl; the kernel tests also the
//! eBPF object and the built `smtp-limiter` binary. Outside CI a missing
//! piece skips the test with a message; under `CI=true` it fails it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use limiter_tests::{
    fixture,
    kernel::PinDir,
    netns::{link, Link, NetNs},
    postfix::{self, Postfix, PostfixOptions},
    proxy::{Client, TestProxy},
    tcp::{connect_from, wait_until},
};

/// The attacker's source address on loopback (the proxy is on 127.0.0.1).
const CLIENT: &str = "127.0.0.2";
/// Another client, unaffected by what the first one did.
const OTHER_CLIENT: &str = "127.0.0.3";
/// How long to wait for Postfix to deliver or log something.
const WAIT: Duration = Duration::from_secs(15);
/// A plain listener on a free port.
const PLAIN_LISTENER: &str = "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\n";
/// Long enough for a handshake on a veth, short enough for a dropped SYN
/// (first retransmission after 1 s) to show as a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

// -- Prerequisites ---------------------------------------------------------

/// Root, Postfix, swaks, python3, openssl.
fn missing_tools() -> Option<String> {
    postfix::missing_prerequisite().or_else(|| {
        ["swaks", "python3", "openssl"]
            .into_iter()
            .find(|tool| which(tool).is_none())
            .map(|tool| format!("{tool} is not installed (`cargo xtask setup`)"))
    })
}

fn ready(test: &str) -> bool {
    fixture::require(test, missing_tools())
}

/// As [`ready`], plus the eBPF object and the `smtp-limiter` binary.
fn ready_with_kernel(test: &str) -> bool {
    let missing = missing_tools().or_else(|| {
        if limiter_tests::kernel::ebpf_object().is_none() {
            return Some(format!(
                "no eBPF object at {} (`cargo xtask build-ebpf`)",
                limiter_tests::kernel::object_path().display()
            ));
        }
        let binary = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("smtp-limiter")));
        if !binary.is_some_and(|b| b.is_file()) {
            return Some("no smtp-limiter binary next to the tests (`cargo build -p limiter-user` or `cargo xtask test`)".into());
        }
        None
    });
    fixture::require(test, missing)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

// -- Postfix logs ----------------------------------------------------------

/// Log lines of `log` containing `needle`.
fn log_lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// Waits until Postfix has logged `n` `disconnect from` lines (the
/// fixture's readiness probe is the first); returns them all.
#[track_caller]
fn wait_disconnects(postfix: &Postfix, n: usize) -> Vec<String> {
    let end = Instant::now() + WAIT;
    loop {
        let log = postfix.log();
        let lines: Vec<String> = log_lines(&log, "]: disconnect from ")
            .into_iter()
            .map(str::to_owned)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < end,
            "Postfix logged {} of {n} disconnects; log:\n{log}",
            lines.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// What Postfix counted in a session, from its disconnect line: the part
/// after the client, e.g. `ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5`.
fn command_counts(disconnect: &str) -> &str {
    disconnect
        .split_once(" disconnect from ")
        .and_then(|(_, rest)| rest.split_once("] "))
        .map_or(disconnect, |(_, counts)| counts.trim())
}

/// Waits until Postfix has delivered `n` messages and its queue is empty,
/// then checks that exactly `n` were delivered. Every caller has first
/// waited for the disconnect of the last session that could queue mail:
/// smtpd hands a message to cleanup before it logs the disconnect, and
/// postlogd writes in order, so after that and an empty queue no delivery
/// is still to come.
#[track_caller]
fn expect_delivered(postfix: &Postfix, n: usize) {
    assert!(
        postfix.wait_delivered(n, WAIT),
        "Postfix delivered {} of {n} messages; log:\n{}",
        postfix.delivered(),
        postfix.log()
    );
    assert!(
        postfix.wait_queue_empty(WAIT),
        "Postfix's queue did not empty; log:\n{}",
        postfix.log()
    );
    assert_eq!(
        postfix.delivered(),
        n,
        "deliveries; log:\n{}",
        postfix.log()
    );
}

// -- The in-process rig ----------------------------------------------------

/// A Postfix expecting PROXY v2 and the proxy in front of it. The proxy
/// is stopped first.
struct Rig {
    proxy: TestProxy,
    postfix: Postfix,
}

impl Rig {
    fn start(extra: &str) -> Rig {
        Self::start_with(PostfixOptions::default(), PLAIN_LISTENER, extra)
    }

    fn start_with(mut options: PostfixOptions, listen: &str, extra: &str) -> Rig {
        options.proxy_protocol = true;
        let postfix = Postfix::start(options).expect("start Postfix");
        let proxy = TestProxy::start(&format!(
            r#"mode = "enforce"

{listen}

[backend]
address = "{backend}"
identity = "proxy-v2"
connect_timeout = "2s"
# Postfix sessions are counted one per client session below: the backend
# connection at accept (the earned connection is proxy_sessions' and
# flood_e2e's subject; the judging is the same in both modes).
connect = "on-connect"

[kernel]
mode = "off"

{extra}
"#,
            backend = postfix.addr()
        ));
        Rig { proxy, postfix }
    }

    fn addr(&self) -> SocketAddr {
        self.proxy.addr
    }

    fn log(&self) -> String {
        self.postfix.log()
    }

    /// A raw client connected from `source`, and its greeting.
    fn client(&self, source: &str) -> (Client, String) {
        Client::from_stream(connect_loopback(source, self.addr())).expect("greeting")
    }
}

/// Connects from `source` (an address of 127/8) to `to` on loopback.
fn connect_loopback(source: &str, to: SocketAddr) -> TcpStream {
    let source: Ipv4Addr = source.parse().expect("an IPv4 source");
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    // SAFETY: plain socket calls on a descriptor owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is ours from here on.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as u32;
    let local = sockaddr(source, 0);
    // SAFETY: a valid socket and address.
    let rc = unsafe { libc::bind(stream.as_raw_fd(), (&raw const local).cast(), len) };
    assert_eq!(rc, 0, "bind {source}: {}", std::io::Error::last_os_error());
    let dest = sockaddr(*to.ip(), to.port());
    // SAFETY: as above.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), (&raw const dest).cast(), len) };
    assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
    stream
}

#[track_caller]
fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected a reply starting with {prefix:?}, got {reply:?}"
    );
}

// -- Real clients ------------------------------------------------------------

/// One swaks run: its exit code and its whole transcript.
struct Swaks {
    code: Option<i32>,
    out: String,
}

impl Swaks {
    #[track_caller]
    fn expect_reply(&self, needle: &str) {
        assert!(
            self.out.contains(needle),
            "swaks transcript lacks {needle:?}:\n{}",
            self.out
        );
    }
}

/// Runs swaks (in network namespace `ns` if given) against `server` from
/// `source`, with a 10-second timeout and `args`.
fn swaks_in(ns: Option<&NetNs>, server: SocketAddr, source: &str, args: &[&str]) -> Swaks {
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name(), "swaks"]);
            cmd
        }
        None => Command::new("swaks"),
    };
    let out = cmd
        .arg("--server")
        .arg(server.to_string())
        .args(["--local-interface", source, "--timeout", "10"])
        .args(args)
        .output()
        .expect("run swaks");
    Swaks {
        code: out.status.code(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn swaks(server: SocketAddr, source: &str, args: &[&str]) -> Swaks {
    swaks_in(None, server, source, args)
}

/// Helpers every Python script starts with; `PORT` is the proxy's port
/// (the script's first argument).
const PY_PRELUDE: &str = r#"
import smtplib, socket, ssl, sys, time
HOST = "127.0.0.1"
PORT = int(sys.argv[1])
def out(*args):
    print(*args, flush=True)
def session(source, helo):
    return smtplib.SMTP(HOST, PORT, local_hostname=helo, source_address=(source, 0), timeout=10)
def ending(read):
    try:
        data = read()
    except TimeoutError:
        return "timeout"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return "error %s" % e
    return "eof" if data == b"" else "data %r" % data
def closed(s):
    return ending(s.file.readline)
def greeting(source):
    sock = socket.create_connection((HOST, PORT), 10, (source, 0))
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    after = ending(lambda: sock.recv(1))
    sock.close()
    return data.decode().strip(), after
MESSAGE = "From: sender@example.org\r\nTo: alice@example.com\r\nSubject: test\r\n\r\nHello.\r\n"
"#;

/// Runs `script` (after [`PY_PRELUDE`]) with the proxy's port as argument;
/// its output lines. Panics with its output when it fails.
fn python(proxy: SocketAddr, script: &str) -> Vec<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{PY_PRELUDE}\n{script}"))
        .arg(proxy.port().to_string())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python3 failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// The output line starting with `key `, without the key.
#[track_caller]
fn line<'a>(lines: &'a [String], key: &str) -> &'a str {
    let prefix = format!("{key} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key:?} line in {lines:#?}"))
}

// -- 1. Separator bytes after a verb -------------------------------------------

/// Lines whose verb is followed by a byte Postfix's `smtpd_token()` takes
/// as a separator (C `isspace`: VT, FF, CR) or by another control byte,
/// the verbs the proxy judges (RCPT, MAIL, AUTH, VRFY) and the ones it
/// relays (NOOP, HELP) or refuses (EXPN, ETRN): none may reach Postfix.
const SEPARATOR_PROBES: [&[u8]; 14] = [
    b"RCPT\x0bTO:<x@evil.example>",
    b"RCPT\x0cTO:<x@evil.example>",
    b"RCPT\rTO:<x@evil.example>",
    b"rcpt\x0bto:<nobody@example.com>",
    b"RCPT TO:\x0b<x@evil.example>",
    b"MAIL\x0bFROM:<x@evil.example>",
    b"VRFY\x0croot",
    b"VRFY\x0broot",
    b"EXPN\x0bstaff",
    b"AUTH\x0bPLAIN AGFsaWNlAHNlY3JldA==",
    b"AUTH\x0cLOGIN",
    b"NOOP\x0bevil",
    b"HELP\x1bevil",
    b"ETRN\x0bevil.example",
];

#[test]
fn separator_bytes_after_a_verb_never_reach_postfix() {
    if !ready("separator_bytes_after_a_verb_never_reach_postfix") {
        return;
    }
    let rig = Rig::start("[relay]\naccept = \"*@example.com\"\n");
    let (mut c, greeting) = rig.client(CLIENT);
    expect(&greeting, "220 ");
    expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
    expect(
        &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
        "250 ",
    );
    for probe in SEPARATOR_PROBES {
        c.send(probe).and_then(|()| c.send(b"\r\n")).expect("send");
        let reply = c.reply().expect("a reply to the probe");
        assert!(
            reply.starts_with("500 5.5.") || reply.starts_with("501 5.5."),
            "{:?}: expected 500/501 5.5.x, got {reply:?}",
            String::from_utf8_lossy(probe)
        );
    }
    // The session is intact: a good recipient and the message go through.
    expect(&c.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
    expect(&c.cmd("DATA").expect("DATA"), "354 ");
    expect(
        &c.cmd("Subject: after the probes\r\n\r\nHello.\r\n.")
            .expect("end of data"),
        "250 ",
    );
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");

    // A real client's probes too: smtplib sends what it is given.
    let lines = python(
        rig.addr(),
        r#"
s = session("127.0.0.3", "client.example.org")
s.ehlo()
s.mail("sender@example.org")
for key, line in [("RCPT", "RCPT\x0bTO:<y@evil.example>"), ("VRFY", "VRFY\x0cpostmaster"),
                  ("AUTH", "AUTH\x0bPLAIN AGJvYgBzZWNyZXQ=")]:
    code, msg = s.docmd(line)
    out(key, code, msg.decode())
s.quit()
"#,
    );
    for key in ["RCPT", "VRFY", "AUTH"] {
        let reply = line(&lines, key);
        assert!(
            reply.starts_with("500 5.5.") || reply.starts_with("501 5.5."),
            "{key}: {reply}"
        );
    }

    // Postfix counted exactly the commands the proxy relayed: nothing
    // unknown, no VRFY, EXPN, AUTH, ETRN, HELP or NOOP, one MAIL and one
    // RCPT for the first session, one MAIL for the second.
    let disconnects = wait_disconnects(&rig.postfix, 3);
    expect_delivered(&rig.postfix, 1);
    let log = rig.log();
    assert_eq!(disconnects.len(), 3, "{log}");
    let first = disconnects
        .iter()
        .find(|l| l.contains("disconnect from unknown[127.0.0.2]"))
        .unwrap_or_else(|| panic!("no session from 127.0.0.2:\n{log}"));
    assert_eq!(
        command_counts(first),
        "ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5",
        "{log}"
    );
    let second = disconnects
        .iter()
        .find(|l| l.contains("disconnect from unknown[127.0.0.3]"))
        .unwrap_or_else(|| panic!("no session from 127.0.0.3:\n{log}"));
    assert_eq!(
        command_counts(second),
        "ehlo=1 mail=1 quit=1 commands=3",
        "{log}"
    );
    for word in [
        "evil.example",
        "nobody@",
        "warning: non-SMTP command",
        "postmaster",
    ] {
        assert!(!log.contains(word), "Postfix saw {word:?}:\n{log}");
    }
    assert_eq!(log_lines(&log, "to=<alice@example.com>").len(), 1, "{log}");
}

// -- 2. Routing syntax in recipients -----------------------------------------

/// Recipients that pass `*@example.com` on their face but that Postfix
/// could route to evil.example.
const ROUTED_RECIPIENTS: [&str; 6] = [
    "user%evil.example@example.com",
    "\"u@evil.example\"@example.com",
    "@example.com:u@evil.example",
    "evil.example!u@example.com",
    "\"u%evil.example\"@example.com",
    "u%evil.example@EXAMPLE.COM.",
];

#[test]
fn routing_syntax_recipients_never_reach_postfix_and_count_as_harvest() {
    if !ready("routing_syntax_recipients_never_reach_postfix_and_count_as_harvest") {
        return;
    }
    let rig = Rig::start(
        "[limits]\nmax_failed_rcpt = 5\nmax_failed_rcpt_per_source = 0\n\n[relay]\naccept = \"*@example.com\"\n",
    );
    // A real client, one probe: refused as relaying.
    let run = swaks(
        rig.addr(),
        OTHER_CLIENT,
        &[
            "--to",
            ROUTED_RECIPIENTS[0],
            "--from",
            "sender@example.org",
            "--quit-after",
            "RCPT",
        ],
    );
    assert_ne!(run.code, Some(0), "{}", run.out);
    run.expect_reply("<** 550 5.7.1 ");

    // A harvester trying each form after one good recipient: each is a
    // failed recipient, and the sixth failure ends the session and blocks
    // the source.
    let list = ROUTED_RECIPIENTS
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let lines = python(
        rig.addr(),
        &format!(
            r#"
s = session("127.0.0.2", "client.example.org")
s.ehlo()
out("MAIL", s.mail("sender@example.org")[0])
out("GOOD", s.rcpt("alice@example.com")[0])
for i, rcpt in enumerate([{list}]):
    code, msg = s.docmd("RCPT", "TO:<%s>" % rcpt)
    out("RCPT%d" % (i + 1), code, msg.decode())
    if code == 421:
        out("CLOSED", closed(s))
        break
reply, after = greeting("127.0.0.2")
out("AGAIN", reply)
"#
        ),
    );
    assert_eq!(line(&lines, "GOOD"), "250", "{lines:#?}");
    for i in 1..=5 {
        expect(line(&lines, &format!("RCPT{i}")), "550 5.7.1 ");
    }
    expect(line(&lines, "RCPT6"), "421 4.7.0 ");
    assert_eq!(line(&lines, "CLOSED"), "eof", "{lines:#?}");
    expect(line(&lines, "AGAIN"), "421 4.7.0 ");

    // Postfix: the swaks session and the harvester's (one RCPT: alice);
    // the blocked reconnection never reached it; no routed address at all.
    let disconnects = wait_disconnects(&rig.postfix, 3);
    let log = rig.log();
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.2]").len(),
        1,
        "{log}"
    );
    let harvester = disconnects
        .iter()
        .find(|l| l.contains("from unknown[127.0.0.2]"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        harvester.contains(" mail=1 ") && harvester.contains(" rcpt=1 "),
        "{log}"
    );
    let other = disconnects
        .iter()
        .find(|l| l.contains("from unknown[127.0.0.3]"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!other.contains("rcpt="), "{log}");
    assert!(!log.to_ascii_lowercase().contains("evil.example"), "{log}");
    assert_eq!(rig.postfix.delivered(), 0, "{log}");
    assert_eq!(rig.proxy.ctx.stats.blocks_issued.load(Ordering::Relaxed), 1);
}

// -- 4. Null-sender spellings -------------------------------------------------

#[test]
fn null_sender_spellings_share_the_null_sender_rate() {
    if !ready("null_sender_spellings_share_the_null_sender_rate") {
        return;
    }
    let rig = Rig::start("[limits]\nnull_sender_rate = \"2/1m\"\n");
    let lines = python(
        rig.addr(),
        r#"
s = session("127.0.0.2", "bounces.example.org")
s.ehlo()
for key, sender in [("SPACE", "< >"), ("EMPTY-ROUTE", "<@a.example:>"),
                    ("QUOTED", '<"">'), ("ROUTED", '<@a.example:"">'),
                    ("QUOTED-AGAIN", '<"">'), ("PLAIN", "<>"), ("ROUTED-AGAIN", '<@b.example,@a.example:"">')]:
    code, msg = s.docmd("MAIL", "FROM:" + sender)
    out(key, code, msg.decode())
    if code == 250:
        out(key + "-RCPT", s.rcpt("alice@example.com")[0])
        code, msg = s.data(MESSAGE)
        out(key + "-DATA", code)
    if code == 421:
        out("CLOSED", closed(s))
        break
reply, after = greeting("127.0.0.2")
out("AGAIN", reply)
"#,
    );
    // Spellings Postfix reads as <> but the proxy will not take: refused,
    // never relayed.
    for key in ["SPACE", "EMPTY-ROUTE"] {
        let reply = line(&lines, key);
        assert!(reply.starts_with("501 5."), "{key}: {reply}");
    }
    // The two accepted spellings use up the rate …
    for key in ["QUOTED", "ROUTED"] {
        expect(line(&lines, key), "250");
        assert_eq!(line(&lines, &format!("{key}-RCPT")), "250", "{lines:#?}");
        assert_eq!(line(&lines, &format!("{key}-DATA")), "250", "{lines:#?}");
    }
    // … every spelling is then held back …
    for key in ["QUOTED-AGAIN", "PLAIN"] {
        expect(line(&lines, key), "450 4.7.1 ");
    }
    // … and at twice the rate (the fifth null sender, in a third
    // spelling) the source is cut off and blocked as a flood.
    expect(line(&lines, "ROUTED-AGAIN"), "421 4.7.0 ");
    assert_eq!(line(&lines, "CLOSED"), "eof", "{lines:#?}");
    expect(line(&lines, "AGAIN"), "421 4.7.0 ");
    let disconnects = wait_disconnects(&rig.postfix, 2);
    expect_delivered(&rig.postfix, 2);
    let log = rig.log();
    // Postfix got two MAIL commands, both with the null sender.
    assert_eq!(log_lines(&log, "from=<>,").len(), 2, "{log}");
    assert!(
        disconnects[1].contains(" mail=2 ") && disconnects[1].contains(" data=2 "),
        "{log}"
    );
    assert!(!log.contains("a.example"), "{log}");
}

/// Postfix's cleanup stores a sender whose address is `MAILER-DAEMON`
/// (any case, quoted or not, behind a source route, or qualified with
/// `$myorigin`) as the null sender: `from=<>`, exactly like `<>`. Each such
/// MAIL must count toward `limits.null_sender_rate` too.
#[test]
fn mailer_daemon_senders_share_the_null_sender_rate() {
    if !ready("mailer_daemon_senders_share_the_null_sender_rate") {
        return;
    }
    let rig = Rig::start("[limits]\nnull_sender_rate = \"1/1m\"\n");
    let spellings = [
        "MAILER-DAEMON",
        "mailer-daemon",
        "\"MAILER-DAEMON\"",
        "@a.example:MAILER-DAEMON",
        &format!("MAILER-DAEMON@{}", postfix::HOSTNAME),
    ];
    let list = spellings
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    // One source and HELO name per spelling: a null sender uses up the
    // rate (1 a minute), then the spelling must be held back.
    let lines = python(
        rig.addr(),
        &format!(
            r#"
for i, sender in enumerate([{list}]):
    s = session("127.0.0.%d" % (10 + i), "bounces%d.example.org" % i)
    s.ehlo()
    s.sendmail("", ["alice@example.com"], MESSAGE)
    code, msg = s.docmd("MAIL", "FROM:<%s>" % sender)
    out("SENDER%d" % i, code, msg.decode())
    if code == 250:
        s.rcpt("alice@example.com")
        s.data(MESSAGE)
    s.quit()
"#
        ),
    );
    wait_disconnects(&rig.postfix, 1 + spellings.len());
    let stored_null = log_lines(&rig.log(), "from=<>,").len();
    let replies: Vec<String> = (0..spellings.len())
        .map(|i| format!("{}: {}", spellings[i], line(&lines, &format!("SENDER{i}"))))
        .collect();
    assert!(
        replies.iter().all(|r| r.contains(": 450 4.7.1 ")),
        "spellings Postfix stores as <> were not counted as null senders: {replies:#?}\nPostfix stored {stored_null} messages with from=<>:\n{}",
        rig.log()
    );
    expect_delivered(&rig.postfix, spellings.len());
    assert_eq!(
        log_lines(&rig.log(), "from=<>,").len(),
        spellings.len(),
        "{}",
        rig.log()
    );
}

// -- 5. HELO spellings ----------------------------------------------------------

#[test]
fn helo_spellings_are_judged_as_one_name() {
    if !ready("helo_spellings_are_judged_as_one_name") {
        return;
    }
    let rig = Rig::start(
        "[lists]\nreject_helo = [\"*.dynamic.example\"]\n\n[[limits.helo]]\npattern = \"*.bounce.test\"\nmax_connections = 1\n",
    );
    // swaks, the name in capitals with a trailing dot.
    let run = swaks(
        rig.addr(),
        CLIENT,
        &[
            "--to",
            "alice@example.com",
            "--from",
            "sender@example.org",
            "--helo",
            "HOST.Dynamic.Example.",
        ],
    );
    assert_ne!(run.code, Some(0), "{}", run.out);
    run.expect_reply("<** 550 5.7.1 ");
    assert!(!run.out.contains("MAIL FROM"), "{}", run.out);

    // Raw siblings: more dots, HELO instead of EHLO.
    let (mut c, greeting) = rig.client(CLIENT);
    expect(&greeting, "220 ");
    for helo in [
        "EHLO host.DYNAMIC.example..",
        "HELO Host.Dynamic.Example.",
        "EHLO\thost.dynamic.EXAMPLE",
    ] {
        expect(&c.cmd(helo).expect("HELO"), "550 5.7.1 ");
        expect(
            &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
            "503 ",
        );
    }
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");

    // The HELO limit counts both spellings of one name.
    let (mut first, _) = rig.client(CLIENT);
    expect(&first.cmd("EHLO mx1.bounce.test").expect("EHLO"), "250");
    let (mut second, _) = rig.client(OTHER_CLIENT);
    expect(
        &second.cmd("EHLO MX1.Bounce.TEST.").expect("EHLO"),
        "421 4.7.0 ",
    );
    second.expect_closed();
    expect(&first.cmd("QUIT").expect("QUIT"), "221 ");

    // Postfix never saw a dynamic name, nor the second bounce.test one.
    let disconnects = wait_disconnects(&rig.postfix, 5);
    let log = rig.log();
    assert!(!log.to_ascii_lowercase().contains("dynamic"), "{log}");
    let ehlos: usize = disconnects
        .iter()
        .filter(|l| l.contains(" ehlo=1 ") || l.contains(" helo=1 "))
        .count();
    assert_eq!(
        ehlos, 1,
        "only the first bounce.test session's EHLO:\n{log}"
    );
    assert!(!log.contains("MX1.Bounce"), "{log}");
}

// -- 6. AUTH before STARTTLS ----------------------------------------------------

/// A temporary directory with a self-signed certificate for localhost.
struct TlsFiles {
    dir: PathBuf,
}

impl TlsFiles {
    fn new() -> TlsFiles {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-hardening-tls.{}.{nanos}",
            std::process::id()
        ));
        fs::create_dir(&dir).expect("create the certificate directory");
        let tls = TlsFiles { dir };
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(tls.dir.join("key.pem"))
            .arg("-out")
            .arg(tls.dir.join("cert.pem"))
            .args(["-days", "1", "-subj", "/CN=localhost"])
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tls
    }

    fn toml(&self) -> String {
        format!(
            "[tls]\ncertificate = \"{}\"\nkey = \"{}\"\n",
            self.dir.join("cert.pem").display(),
            self.dir.join("key.pem").display()
        )
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn auth_before_starttls_is_neither_offered_nor_relayed() {
    if !ready("auth_before_starttls_is_neither_offered_nor_relayed") {
        return;
    }
    let tls = TlsFiles::new();
    let rig = Rig::start_with(
        PostfixOptions::default(),
        "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n",
        &tls.toml(),
    );
    // swaks asked to authenticate in clear: AUTH is not on offer, so it
    // never sends it.
    let run = swaks(
        rig.addr(),
        CLIENT,
        &[
            "--to",
            "alice@example.com",
            "--from",
            "sender@example.org",
            "--auth",
            "PLAIN",
            "--auth-user",
            "alice",
            "--auth-password",
            "secret",
        ],
    );
    assert_ne!(run.code, Some(0), "{}", run.out);
    assert!(!run.out.contains("-> AUTH"), "{}", run.out);

    let lines = python(
        rig.addr(),
        r#"
s = session("127.0.0.2", "client.example.org")
s.ehlo()
out("OFFERED", "auth" if s.has_extn("auth") else "no-auth", "starttls" if s.has_extn("starttls") else "no-starttls")
for key, args in [("PLAIN", "PLAIN AGFsaWNlAHNlY3JldA=="), ("LOGIN", "LOGIN"), ("LOWER", "plain"),
                  ("CRAM", "CRAM-MD5")]:
    code, msg = s.docmd("AUTH", args)
    out(key, code, msg.decode())
s.quit()
# Under TLS the proxy relays AUTH: Postfix (no SASL here) answers it.
t = session("127.0.0.2", "client.example.org")
t.ehlo()
t.starttls(context=ssl._create_unverified_context())
t.ehlo()
code, msg = t.docmd("AUTH", "PLAIN AGFsaWNlAHNlY3JldA==")
out("TLS-AUTH", code, msg.decode())
t.quit()
"#,
    );
    assert_eq!(line(&lines, "OFFERED"), "no-auth starttls", "{lines:#?}");
    for key in ["PLAIN", "LOGIN", "LOWER", "CRAM"] {
        expect(line(&lines, key), "538 5.7.11 ");
    }
    let under_tls = line(&lines, "TLS-AUTH");
    assert!(
        !under_tls.starts_with("538") && under_tls.starts_with('5'),
        "{under_tls}"
    );

    // Postfix: no AUTH in the plaintext sessions (swaks', the probes');
    // the one AUTH it saw came inside TLS.
    let disconnects = wait_disconnects(&rig.postfix, 4);
    let log = rig.log();
    let auths: Vec<&String> = disconnects
        .iter()
        .filter(|l| l.contains(" auth="))
        .collect();
    assert_eq!(auths.len(), 1, "{log}");
    assert!(auths[0].contains(" auth=0/1 "), "{log}");
    assert_eq!(disconnects.len(), 4, "{log}");
    assert_eq!(rig.postfix.delivered(), 0, "{log}");
}

// -- 7. Held messages with a split end marker ---------------------------------------

#[test]
fn held_message_ends_wherever_the_marker_is_split() {
    if !ready("held_message_ends_wherever_the_marker_is_split") {
        return;
    }
    // A clamd that is not there: every message is held, the scan fails and
    // fail-open passes it on with the scan header, which Postfix logs.
    let dead_clamd = fixture::free_port().expect("a free port");
    let mut options = PostfixOptions::default();
    options.extra_main_cf.push((
        "header_checks".to_owned(),
        "regexp:{ {/^X-Smtp-Limiter-Scan:/ WARN held-by-the-proxy} }".to_owned(),
    ));
    let rig = Rig::start_with(
        options,
        PLAIN_LISTENER,
        &format!(
            "[filters]\ntimeout = \"5s\"\non_failure = \"fail-open\"\n\n[filters.clamav]\naddress = \"127.0.0.1:{dead_clamd}\"\n"
        ),
    );
    // Where the client's writes split "\r\n.\r\n" (TCP_NODELAY, a pause
    // between writes so that each arrives on its own).
    let splits: [(&str, &[u8], &[u8]); 5] = [
        ("before-dot", b"body\r\n", b".\r\n"),
        ("after-dot", b"body\r\n.", b"\r\n"),
        ("after-cr", b"body\r\n.\r", b"\n"),
        ("inside-crlf", b"body\r", b"\n.\r\n"),
        ("byte-by-byte", b"body", b"\r\n.\r\n"),
    ];
    let stream = connect_loopback(CLIENT, rig.addr());
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (mut c, greeting) = Client::from_stream(stream).expect("greeting");
    expect(&greeting, "220 ");
    expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
    for (n, (name, head, tail)) in splits.iter().enumerate() {
        expect(
            &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
            "250 ",
        );
        expect(&c.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
        expect(&c.cmd("DATA").expect("DATA"), "354");
        c.send(format!("Subject: split {name}\r\n\r\n").as_bytes())
            .expect("send");
        c.send(head).expect("send");
        if *name == "byte-by-byte" {
            for byte in tail.iter() {
                thread::sleep(Duration::from_millis(100));
                c.send(&[*byte]).expect("send");
            }
        } else {
            thread::sleep(Duration::from_millis(200));
            c.send(tail).expect("send");
        }
        let reply = c.reply().unwrap_or_else(|e| panic!("split {name}: {e}"));
        assert!(
            reply.starts_with("250 "),
            "split {name} (message {}): {reply}",
            n + 1
        );
    }
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");

    let disconnects = wait_disconnects(&rig.postfix, 2);
    expect_delivered(&rig.postfix, splits.len());
    let log = rig.log();
    assert!(
        disconnects[1].contains(&format!(" data={} ", splits.len())),
        "{log}"
    );
    assert_eq!(
        log_lines(&log, "held-by-the-proxy").len(),
        splits.len(),
        "every message went through the held path:\n{log}"
    );
}

// -- The kernel rig: the real agent in a network namespace -------------------

/// A TCP relay whose listening socket lives in a network namespace and
/// whose upstream connections are made from the host's: the agent inside
/// the namespace reaches the host's Postfix through it (bytes unchanged,
/// the PROXY header included).
struct BackendRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl BackendRelay {
    fn start(ns: &NetNs, upstream: SocketAddr) -> BackendRelay {
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .expect("bind the relay in the namespace");
        let port = listener.local_addr().expect("relay address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Spawned from this (host namespace) thread: its threads connect
        // from the host's namespace.
        let acceptor = thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        thread::spawn(move || relay_one(client, upstream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        BackendRelay {
            port,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

fn relay_one(client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let (Ok(mut client_r), Ok(mut server_w)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        let _ = std::io::copy(&mut client_r, &mut server_w);
        let _ = server_w.shutdown(std::net::Shutdown::Write);
    });
    let (mut server_r, mut client_w) = (server, client);
    let _ = std::io::copy(&mut server_r, &mut client_w);
    let _ = client_w.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

impl Drop for BackendRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// How long the agent may take to open its control socket (loaded CI).
const AGENT_START: Duration = Duration::from_secs(30);
/// How long the agent may take to stop after SIGTERM.
const AGENT_STOP: Duration = Duration::from_secs(40);

/// The real `smtp-limiter run`, inside a network namespace (setns before
/// exec: the mount namespace stays the host's, so the pins are on the
/// host's bpffs), with its own directory; SIGTERM on drop, directory
/// removed.
struct Agent {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
}

impl Agent {
    fn start(ns: &NetNs, name: &str, config: &str) -> Agent {
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-hardening-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("agent directory");
        let config_path = dir.join("smtp-limiter.toml");
        let socket = dir.join("control.sock");
        fs::write(
            &config_path,
            format!(
                "{config}\n[control]\nsocket = \"{}\"\n[state]\ndirectory = \"{}\"\n[metrics]\naddress = \"127.0.0.1:9425\"\n",
                socket.display(),
                dir.join("state").display()
            ),
        )
        .expect("write the agent's configuration");
        let log = fs::File::create(dir.join("agent.log")).expect("agent log");
        let netns = fs::File::open(ns.path()).expect("open the namespace");
        let netns_fd = netns.as_raw_fd();
        let mut command = Command::new(limiter_tests::smtp_limiter_binary());
        command
            .args(["run", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl and setns are plain syscalls, async-signal-safe; the
        // descriptor stays open until spawn returns.
        unsafe {
            command.pre_exec(move || {
                // The agent goes when the test process does, even killed
                // before its `Drop`.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0
                    || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("start the agent");
        drop(netns);
        let mut agent = Agent {
            child,
            dir,
            config: config_path,
        };
        let deadline = Instant::now() + AGENT_START;
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("the agent exited ({status}):\n{}", agent.log());
            }
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no control socket within {AGENT_START:?}:\n{}",
                agent.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The CLI against this agent: (success, stdout and stderr).
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(limiter_tests::smtp_limiter_binary())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run the CLI");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// `smtp-limiter ARGS --json`, parsed.
    #[track_caller]
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let (ok, out) = self.cli(&all);
        assert!(ok, "smtp-limiter {args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// The kernel counter `name` from `stats --json`.
    #[track_caller]
    fn kernel_counter(&self, name: &str) -> u64 {
        let stats = self.json(&["stats"]);
        stats["kernel"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name:?} in `stats --json`: {stats}"))
    }

    /// The block of `net` in `block list --json`, if listed.
    fn block(&self, net: &str) -> Option<serde_json::Value> {
        self.json(&["block", "list"])
            .as_array()
            .and_then(|blocks| blocks.iter().find(|b| b["net"] == net).cloned())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            if !wait_until(AGENT_STOP, || !matches!(self.child.try_wait(), Ok(None))) {
                eprintln!("agent: still running {AGENT_STOP:?} after SIGTERM; killing");
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        if std::env::var_os("HARDENING_E2E_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("agent directory kept: {}", self.dir.display());
        }
    }
}

/// Postfix on the host, the agent in a server namespace with XDP on its
/// end of a veth, clients in a client namespace. Dropped in field order:
/// the agent (which detaches and unpins), the relay, Postfix, the link
/// and the namespaces.
struct NetRig {
    agent: Agent,
    _relay: BackendRelay,
    postfix: Postfix,
    _pins: PinDir,
    link: Link,
    client: NetNs,
    server: NetNs,
}

impl NetRig {
    /// `top` goes first in the configuration (e.g. `mode = "observe"`),
    /// `extra` after the fixed tables (`[limits]`, `[lists]`, …).
    fn start(name: &str, tag: &str, top: &str, extra: impl Fn(&Link) -> String) -> NetRig {
        // Namespaces a killed run of these tests left behind.
        for prefix in ["hard-srv", "hard-cli"] {
            if let Err(e) = NetNs::remove_stale(prefix) {
                eprintln!("removing stale namespaces {prefix}-*: {e:#}");
            }
        }
        let server = NetNs::new("hard-srv").expect("server namespace");
        let client = NetNs::new("hard-cli").expect("client namespace");
        let link = link(&server, &client, tag).expect("veth pair");
        let postfix = Postfix::start(PostfixOptions {
            proxy_protocol: true,
            ..PostfixOptions::default()
        })
        .expect("start Postfix");
        let relay = BackendRelay::start(&server, postfix.addr());
        let pins = PinDir::new();
        let config = format!(
            r#"{top}
[[listen]]
address = "{listen}"
[backend]
address = "127.0.0.1:{relay}"
identity = "proxy-v2"
connect_timeout = "5s"
connect = "on-connect"
[kernel]
mode = "required"
interfaces = ["{interface}"]
attach = "xdp"
pin_path = "{pins}"
ports = [25]
[relay]
accept = "*@example.com"
{extra}
"#,
            listen = SocketAddr::new(link.server_v4.into(), 25),
            relay = relay.port,
            interface = link.server_if,
            pins = pins.path().display(),
            extra = extra(&link),
        );
        let agent = Agent::start(&server, name, &config);
        NetRig {
            agent,
            _relay: relay,
            postfix,
            _pins: pins,
            link,
            client,
            server,
        }
    }

    /// The agent's `/metrics` (served inside the server namespace).
    fn metrics(&self) -> String {
        self.server.run(|| {
            let mut stream = TcpStream::connect("127.0.0.1:9425").expect("connect to /metrics");
            std::io::Write::write_all(&mut stream, b"GET /metrics HTTP/1.0\r\n\r\n")
                .expect("request /metrics");
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stream, &mut text).expect("read /metrics");
            text
        })
    }

    fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.link.server_v4.into(), 25)
    }

    fn source(&self, n: usize) -> IpAddr {
        self.link.client_v4s[n].into()
    }

    /// A raw SMTP session from client address `n`, and its greeting.
    #[track_caller]
    fn session(&self, n: usize) -> (Client, String) {
        let stream = connect_from(
            &self.client,
            self.source(n),
            self.listen(),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| {
            panic!(
                "connect from {}: {e}\nagent:\n{}",
                self.source(n),
                self.agent.log()
            )
        });
        Client::from_stream(stream).expect("greeting")
    }

    /// swaks from client address `n`, one message to alice.
    fn swaks_to_alice(&self, n: usize) -> Swaks {
        swaks_in(
            Some(&self.client),
            self.listen(),
            &self.source(n).to_string(),
            &[
                "--to",
                "alice@example.com",
                "--from",
                "sender@example.org",
                "--helo",
                "client.example.org",
            ],
        )
    }
}

// -- 3. Harvesting across sessions ends in a kernel drop ------------------------

#[test]
fn harvester_across_sessions_is_blocked_and_dropped_by_the_kernel() {
    if !ready_with_kernel("harvester_across_sessions_is_blocked_and_dropped_by_the_kernel") {
        return;
    }
    let rig = NetRig::start("harvest", "hh3", "mode = \"enforce\"", |_| {
        "[limits]\nmax_failed_rcpt = 3\nmax_failed_rcpt_per_source = 5\nfailed_rcpt_window = \"1h\"\n"
                .to_owned()
    });
    let harvester = rig.source(0);
    // Each session stays under max_failed_rcpt (3): it leaves after two
    // unknown recipients, or mixes in a valid one.
    let sessions: [&[(&str, &str)]; 3] = [
        &[("nobody1", "550 5.1.1 "), ("nobody2", "550 5.1.1 ")],
        &[
            ("nobody3", "550 5.1.1 "),
            ("alice", "250 "),
            ("nobody4", "550 5.1.1 "),
        ],
        &[("nobody5", "550 5.1.1 "), ("nobody6", "421 4.7.0 ")],
    ];
    for (n, rcpts) in sessions.iter().enumerate() {
        let (mut c, greeting) = rig.session(0);
        expect(&greeting, "220 ");
        expect(&c.cmd("EHLO harvester.test").expect("EHLO"), "250");
        expect(
            &c.cmd("MAIL FROM:<h@harvester.test>").expect("MAIL"),
            "250 ",
        );
        for (user, want) in rcpts.iter() {
            let reply = c
                .cmd(&format!("RCPT TO:<{user}@example.com>"))
                .expect("RCPT");
            assert!(
                reply.starts_with(want),
                "session {}, {user}: expected {want:?}, got {reply:?}",
                n + 1
            );
        }
        if n + 1 < sessions.len() {
            expect(&c.cmd("QUIT").expect("QUIT"), "221 ");
        } else {
            c.expect_closed();
        }
    }

    // Blocked as a harvester, in the kernel's map …
    let net = format!("{harvester}/32");
    let block = rig
        .agent
        .block(&net)
        .unwrap_or_else(|| panic!("{net} not blocked:\n{}", rig.agent.log()));
    assert_eq!(block["reason"], "harvest", "{block}");
    assert_eq!(block["in_kernel"], true, "{block}");
    let dropped_before = rig.agent.kernel_counter("dropped_block");
    // … whose SYNs the kernel now drops: no SYN-ACK, the connect times out.
    match connect_from(&rig.client, harvester, rig.listen(), CONNECT_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the kernel to drop the harvester's SYN, got {other:?}"),
    }
    let block = rig.agent.block(&net).expect("still blocked");
    assert!(
        block["drops"].as_u64().is_some_and(|d| d >= 1),
        "no drop counted on the harvester's block: {block}"
    );
    assert!(rig.agent.kernel_counter("dropped_block") > dropped_before);

    // Another client of the same namespace still delivers.
    let run = rig.swaks_to_alice(1);
    assert_eq!(run.code, Some(0), "swaks failed:\n{}", run.out);

    // Postfix: the harvester's three sessions and the other client's one
    // (after the probe), the dropped connection never; one delivery, from
    // the other client.
    let disconnects = wait_disconnects(&rig.postfix, 5);
    expect_delivered(&rig.postfix, 1);
    let log = rig.postfix.log();
    assert_eq!(disconnects.len(), 5, "{log}");
    assert_eq!(
        log_lines(&log, &format!("]: connect from unknown[{harvester}]")).len(),
        3,
        "{log}"
    );
    assert!(
        log.contains(&format!("client=unknown[{}]", rig.source(1))),
        "{log}"
    );
    for n in 1..=6 {
        assert_eq!(
            log_lines(&log, &format!("<nobody{n}@example.com>")).len(),
            1,
            "nobody{n}:\n{log}"
        );
    }
}

// -- 8. Observe mode in the kernel -----------------------------------------------

#[test]
fn observe_mode_passes_a_rejected_source_and_counts_would_drops() {
    if !ready_with_kernel("observe_mode_passes_a_rejected_source_and_counts_would_drops") {
        return;
    }
    // The reject list names the client's address: enforced, the kernel
    // would drop its packets; observed, it only counts them.
    let rig = NetRig::start("observe", "ho8", "mode = \"observe\"", |link| {
        format!("[lists]\nreject = [\"{}/32\"]\n", link.client_v4s[0])
    });
    let source = rig.source(0);
    let run = rig.swaks_to_alice(0);
    assert_eq!(
        run.code,
        Some(0),
        "a reject-listed source in observe mode must get through:\n{}\nagent:\n{}",
        run.out,
        rig.agent.log()
    );
    let disconnects = wait_disconnects(&rig.postfix, 2);
    expect_delivered(&rig.postfix, 1);
    let log = rig.postfix.log();
    assert!(
        disconnects[1].contains(&format!("from unknown[{source}]")),
        "{log}"
    );
    assert!(log.contains(&format!("client=unknown[{source}]")), "{log}");

    // The kernel counted what it would have dropped, and dropped nothing.
    let would = rig.agent.kernel_counter("would_drop_block_net")
        + rig.agent.kernel_counter("would_drop_block");
    assert!(
        would >= 1,
        "no would-drop counted: {}",
        rig.agent.json(&["stats"])
    );
    assert_eq!(rig.agent.kernel_counter("dropped_block_net"), 0);
    assert_eq!(rig.agent.kernel_counter("dropped_block"), 0);
    // And /metrics says so too.
    let metrics = rig.metrics();
    let would_in_metrics: f64 = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("would_drop_block"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        would_in_metrics >= 1.0,
        "no would-drop in /metrics:\n{metrics}"
    );
}
