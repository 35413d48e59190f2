//! Content filters end to end: a real rspamd and a real clamd (private
//! instances started by the fixtures, test rules and signatures), a real
//! Postfix behind the proxy, raw SMTP clients in front.
//!
//! Postfix discards every message, but its `header_checks` and
//! `body_checks` log (WARN) the lines that matter, so its log shows what it
//! stored: the headers rspamd asked for, the proxy's "not scanned" header,
//! the body intact. "Nothing stored" is checked by Postfix's own count of
//! queued messages.
//!
//! Needs root, Postfix, rspamd and clamd (`cargo xtask setup`); the kernel
//! test also the eBPF object. Without them the tests are skipped with a
//! message; under `CI=true` they fail instead.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use limiter_common::Reason;
use limiter_tests::{
    agent::{Agent, AgentDir, Launch},
    clamd::{self, Clamd},
    fixture,
    maildir::{Maildir, Message},
    netns::{link, NetNs},
    postfix::{self, Postfix, PostfixOptions},
    prerequisites,
    proxy::{Client, TestProxy},
    rspamd::{self, Rspamd},
    scripted::peer::{ScriptedPeer, Step},
    tcp::{connect_from, wait_until},
};
use limiter_user::kernel::{AttachMode, Datapath, KernelLimits};

/// How long to wait for Postfix to deliver or log something.
const WAIT: Duration = Duration::from_secs(15);
/// A plain body line that body_checks reports when it arrives intact.
const BODY_LINE: &str = "smtp-limiter body line";

/// Whether this test can run: Postfix, rspamd, clamd. Outside CI a missing
/// piece skips the test with a message; under `CI=true` it fails it.
fn ready(test: &str) -> bool {
    let missing = postfix::missing_prerequisite()
        .or_else(rspamd::missing_prerequisite)
        .or_else(clamd::missing_prerequisite);
    fixture::require(test, missing)
}

/// The scanners a rig runs.
#[derive(Clone, Copy)]
struct Scanners {
    rspamd: bool,
    clamd: bool,
}

const BOTH: Scanners = Scanners {
    rspamd: true,
    clamd: true,
};

/// Postfix, the scanners, and the proxy in front. Dropped proxy first.
struct Rig {
    proxy: TestProxy,
    postfix: Postfix,
    rspamd: Option<Rspamd>,
    clamd: Option<Clamd>,
}

impl Rig {
    /// `filters` is the `[filters]` table's body (without the scanner
    /// tables, which the rig adds for the scanners it runs).
    fn start(scanners: Scanners, filters: &str) -> Rig {
        let rspamd = scanners
            .rspamd
            .then(|| Rspamd::start().expect("start rspamd"));
        let clamd = scanners.clamd.then(|| Clamd::start().expect("start clamd"));
        let postfix = Postfix::start(postfix_options()).expect("start Postfix");
        let config = proxy_config(
            postfix.addr(),
            &listen("127.0.0.1:0"),
            filters,
            rspamd.as_ref(),
            clamd.as_ref().map(|c| c.tcp_address().to_string()),
        );
        let proxy = TestProxy::start(&config);
        Rig {
            proxy,
            postfix,
            rspamd,
            clamd,
        }
    }

    fn log(&self) -> String {
        self.postfix.log()
    }

    /// Lines Postfix's checks logged with `tag`.
    fn logged(&self, tag: &str) -> Vec<String> {
        let needle = format!(": {tag}");
        self.log()
            .lines()
            .filter(|l| l.contains("warning: header ") || l.contains("warning: body "))
            .filter(|l| l.ends_with(&needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until nothing more can be delivered (the proxy has no session
    /// open, so it sends nothing more), then checks that Postfix delivered
    /// exactly `n` messages ([`Postfix::expect_delivered`]).
    #[track_caller]
    fn expect_delivered(&self, n: usize) {
        let stats = &self.proxy.ctx.stats;
        assert!(
            wait_until(WAIT, || stats.sessions_open.load(Ordering::Relaxed) == 0),
            "the proxy still has sessions open"
        );
        self.postfix.expect_delivered(n);
    }

    /// Checks that Postfix queued nothing at all in the `sessions` the test
    /// made (no message reached it). Waits for the end of each session at
    /// Postfix (its `disconnect from` lines, after the fixture's probe's):
    /// had a message been queued in one, cleanup would have logged it
    /// before smtpd logged that session's end (both through postlogd, in
    /// that order).
    #[track_caller]
    fn expect_nothing_stored(&self, sessions: usize) {
        let ended = || {
            self.log()
                .lines()
                .filter(|l| l.contains("disconnect from "))
                .count()
        };
        assert!(
            wait_until(WAIT, || ended() > sessions),
            "Postfix logged the end of {} of {sessions} sessions (and the probe); log:\n{}",
            ended(),
            self.log()
        );
        let log = self.log();
        assert_eq!(postfix::count_sent(&log), 0, "log:\n{log}");
        assert!(
            !log.contains("message-id=") && !log.contains(": from=<"),
            "Postfix received a message; log:\n{log}"
        );
    }

    fn stats(&self) -> Vec<(&'static str, u64)> {
        self.proxy
            .ctx
            .filters
            .as_ref()
            .expect("filters configured")
            .stats
            .verdicts
            .list()
    }
}

fn postfix_options() -> PostfixOptions {
    let mut options = PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    };
    options.extra_main_cf.push((
        "header_checks".to_owned(),
        "regexp:{ {/^X-Spamd-Result:/ WARN rspamd-result}, \
         {/^X-Spam:/ WARN x-spam}, \
         {/^X-Smtp-Limiter-Scan:/ WARN not-scanned}, \
         {/^Subject:/ WARN subject} }"
            .to_owned(),
    ));
    options.extra_main_cf.push((
        "body_checks".to_owned(),
        format!("regexp:{{ {{/^{BODY_LINE}$$/ WARN body-intact}} }}"),
    ));
    // The error throttle would slow the repeated-reject test down.
    options
        .extra_main_cf
        .push(("smtpd_error_sleep_time".to_owned(), "0".to_owned()));
    options
}

fn listen(address: &str) -> String {
    format!("[[listen]]\naddress = \"{address}\"\ntls = \"none\"\n")
}

fn proxy_config(
    backend: SocketAddr,
    listen: &str,
    filters: &str,
    rspamd: Option<&Rspamd>,
    clamd_address: Option<String>,
) -> String {
    let mut config = format!(
        r#"mode = "enforce"

{listen}

[backend]
address = "{backend}"
identity = "proxy-v2"
connect_timeout = "2s"

[kernel]
mode = "off"

[relay]
accept = "*@example.com"

[filters]
timeout = "10s"
{filters}
"#
    );
    if let Some(rspamd) = rspamd {
        config.push_str(&format!("\n[filters.rspamd]\nurl = \"{}\"\n", rspamd.url()));
    }
    if let Some(address) = clamd_address {
        config.push_str(&format!("\n[filters.clamav]\naddress = \"{address}\"\n"));
    }
    config
}

/// A message with `marker` in its body.
fn message(subject: &str, marker: &str) -> String {
    format!(
        "From: sender@example.org\r\nTo: alice@example.com\r\nSubject: {subject}\r\n\r\n\
         Hello Alice,\r\n{BODY_LINE}\r\n{marker}\r\n..a stuffed line\r\nbye\r\n"
    )
}

/// One transaction on an open session; the reply to the end of DATA.
fn send_on(client: &mut Client, body: &str) -> String {
    let reply = client.cmd("MAIL FROM:<sender@example.org>").unwrap();
    assert!(reply.starts_with("250"), "MAIL: {reply}");
    let reply = client.cmd("RCPT TO:<alice@example.com>").unwrap();
    assert!(reply.starts_with("250"), "RCPT: {reply}");
    let reply = client.cmd("DATA").unwrap();
    assert!(reply.starts_with("354"), "DATA: {reply}");
    client.cmd(&format!("{body}.")).unwrap()
}

/// One message in a new session from 127.0.0.1; the reply to its end.
fn send(addr: SocketAddr, body: &str) -> String {
    let (mut client, greeting) = Client::connect(addr).unwrap();
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(client
        .cmd("EHLO client.example.org")
        .unwrap()
        .starts_with("250"));
    let reply = send_on(&mut client, body);
    let _ = client.cmd("QUIT");
    reply
}

#[test]
fn clean_mail_is_delivered_once_with_rspamds_headers() {
    if !ready("clean_mail_is_delivered_once_with_rspamds_headers") {
        return;
    }
    let rig = Rig::start(BOTH, "");
    let reply = send(rig.proxy.addr, &message("clean", "nothing to see"));
    assert!(reply.starts_with("250"), "{reply}");
    let reply = send(rig.proxy.addr, &message("tagged", rspamd::HEADER_MARKER));
    assert!(reply.starts_with("250"), "{reply}");
    rig.expect_delivered(2);
    // rspamd's result header on both, X-Spam on the tagged one only; the
    // body arrived intact (dot-stuffing undone once, by Postfix).
    assert_eq!(rig.logged("rspamd-result").len(), 2, "log:\n{}", rig.log());
    assert_eq!(rig.logged("x-spam").len(), 1, "log:\n{}", rig.log());
    assert_eq!(rig.logged("body-intact").len(), 2, "log:\n{}", rig.log());
    assert!(rig.logged("not-scanned").is_empty());
    // Both scanners saw both messages, with the real client and envelope.
    let rspamd = rig.rspamd.as_ref().unwrap();
    assert_eq!(rspamd.scanned().len(), 2, "rspamd log:\n{}", rspamd.log());
    assert!(
        rspamd.scanned()[0].contains("127.0.0.1"),
        "{:?}",
        rspamd.scanned()
    );
    assert_eq!(rig.clamd.as_ref().unwrap().scanned().len(), 2);
    assert_eq!(rig.stats(), vec![("clean", 2)]);
}

#[test]
fn a_virus_is_rejected_and_nothing_reaches_postfix() {
    if !ready("a_virus_is_rejected_and_nothing_reaches_postfix") {
        return;
    }
    let rig = Rig::start(BOTH, "max_rejects = 0");
    let reply = send(rig.proxy.addr, &message("virus", clamd::VIRUS_MARKER));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    assert!(reply.contains(clamd::VIRUS_SIGNATURE), "{reply}");
    // The EICAR test file, as an attachment-like body line, too.
    let eicar = String::from_utf8(clamd::eicar()).unwrap();
    let reply = send(rig.proxy.addr, &message("eicar", &eicar));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    rig.expect_nothing_stored(2);
    assert_eq!(rig.stats(), vec![("virus", 2)]);
    // The session goes on after a reject: the next message is delivered.
    let (mut client, _) = Client::connect(rig.proxy.addr).unwrap();
    assert!(client
        .cmd("EHLO client.example.org")
        .unwrap()
        .starts_with("250"));
    let reply = send_on(&mut client, &message("virus", clamd::VIRUS_MARKER));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    let reply = send_on(&mut client, &message("clean", "fine"));
    assert!(reply.starts_with("250"), "{reply}");
    assert!(client.cmd("QUIT").unwrap().starts_with("221"));
    drop(client);
    rig.expect_delivered(1);
}

#[test]
fn spam_is_rejected_and_greylisting_defers() {
    if !ready("spam_is_rejected_and_greylisting_defers") {
        return;
    }
    let rig = Rig::start(BOTH, "max_rejects = 0");
    let reply = send(rig.proxy.addr, &message("spam", rspamd::SPAM_MARKER));
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
    let reply = send(
        rig.proxy.addr,
        &message("greylist", rspamd::GREYLIST_MARKER),
    );
    assert!(reply.starts_with("451 4.7.1"), "{reply}");
    let reply = send(rig.proxy.addr, &message("soft", rspamd::SOFT_REJECT_MARKER));
    assert!(reply.starts_with("451 4.7.1"), "{reply}");
    rig.expect_nothing_stored(3);
    let mut stats = rig.stats();
    stats.sort();
    assert_eq!(stats, vec![("soft-reject", 2), ("spam", 1)]);
}

#[test]
fn scanner_down_fails_open_or_closed_as_configured() {
    if !ready("scanner_down_fails_open_or_closed_as_configured") {
        return;
    }
    // rspamd only, then stopped: nothing listens at its address any more.
    let only_rspamd = Scanners {
        rspamd: true,
        clamd: false,
    };
    let mut open = Rig::start(only_rspamd, "on_failure = \"fail-open\"");
    open.rspamd.as_mut().unwrap().stop();
    let reply = send(open.proxy.addr, &message("unscanned", "x"));
    assert!(reply.starts_with("250"), "{reply}");
    open.expect_delivered(1);
    let marked = open.logged("not-scanned");
    assert_eq!(marked.len(), 1, "log:\n{}", open.log());
    // The header names the scanner that failed (its wording is the
    // product's).
    assert!(
        marked[0].contains("not scanned") && marked[0].contains("rspamd"),
        "{marked:?}"
    );
    assert_eq!(open.stats(), vec![("unscanned", 1)]);

    let mut closed = Rig::start(only_rspamd, "on_failure = \"fail-closed\"");
    closed.rspamd.as_mut().unwrap().stop();
    let reply = send(closed.proxy.addr, &message("unscanned", "x"));
    assert!(reply.starts_with("451 4.7.1"), "{reply}");
    closed.expect_nothing_stored(1);
    assert_eq!(closed.stats(), vec![("tempfail", 1)]);
}

#[test]
fn clamd_over_its_unix_socket_and_large_messages_skip_scanning() {
    if !ready("clamd_over_its_unix_socket_and_large_messages_skip_scanning") {
        return;
    }
    let clamd = Clamd::start().expect("start clamd");
    let postfix = Postfix::start(postfix_options()).expect("start Postfix");
    let config = proxy_config(
        postfix.addr(),
        &listen("127.0.0.1:0"),
        "max_size = \"20KB\"\nmax_rejects = 0",
        None,
        Some(clamd.unix_socket().display().to_string()),
    );
    let proxy = TestProxy::start(&config);
    let rig = Rig {
        proxy,
        postfix,
        rspamd: None,
        clamd: Some(clamd),
    };
    let reply = send(rig.proxy.addr, &message("virus", clamd::VIRUS_MARKER));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    // 40 KB: over max_size, passed on unscanned with the header (even with
    // the virus marker in it: that is what skipping means).
    let filler = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n".repeat(600);
    let big = message("big", &format!("{filler}{}", clamd::VIRUS_MARKER));
    let reply = send(rig.proxy.addr, &big);
    assert!(reply.starts_with("250"), "{reply}");
    rig.expect_delivered(1);
    let marked = rig.logged("not-scanned");
    assert_eq!(marked.len(), 1, "log:\n{}", rig.log());
    assert!(marked[0].contains("larger than 20000 bytes"), "{marked:?}");
    assert_eq!(rig.logged("body-intact").len(), 1);
    let mut stats = rig.stats();
    stats.sort();
    assert_eq!(stats, vec![("skipped-size", 1), ("virus", 1)]);
}

/// The source keeps sending viruses: the third reject within the window
/// blocks it, in the proxy and in the kernel, whose XDP program then drops
/// its SYNs; other sources still deliver.
#[test]
fn a_source_that_keeps_sending_viruses_is_blocked_in_the_kernel() {
    let test = "a_source_that_keeps_sending_viruses_is_blocked_in_the_kernel";
    if !ready(test) || !prerequisites(test) {
        return;
    }
    let clamd = Clamd::start().expect("start clamd");
    let postfix = Postfix::start(postfix_options()).expect("start Postfix");
    let server = NetNs::new("lim-fsrv").unwrap();
    let client = NetNs::new("lim-fcli").unwrap();
    let link = link(&server, &client, "flt").unwrap();
    let kernel = limiter_tests::kernel::TestKernel::load(KernelLimits {
        ports: vec![25],
        ..KernelLimits::default()
    });
    server
        .run(|| kernel.datapath.attach(&link.server_if, AttachMode::Xdp))
        .unwrap();
    let listen_at = SocketAddr::new(IpAddr::V4(link.server_v4), 25);
    let config = proxy_config(
        postfix.addr(),
        &listen(&listen_at.to_string()),
        "max_rejects = 3\nreject_window = \"1h\"",
        None,
        Some(clamd.tcp_address().to_string()),
    );
    let proxy = TestProxy::start_in(Some(&server), &config, kernel.datapath.clone());
    let sender = IpAddr::V4(link.client_v4s[0]);
    let open = |source: IpAddr| {
        let stream =
            connect_from(&client, source, listen_at, Duration::from_millis(800)).expect("connect");
        let (mut smtp, greeting) = Client::from_stream(stream).unwrap();
        assert!(greeting.starts_with("220"), "{greeting}");
        assert!(smtp
            .cmd("EHLO infected.example")
            .unwrap()
            .starts_with("250"));
        smtp
    };
    // Two viruses on one session, the third on a new one.
    let mut smtp = open(sender);
    for _ in 0..2 {
        let reply = send_on(&mut smtp, &message("virus", clamd::VIRUS_MARKER));
        assert!(reply.starts_with("550 5.7.1"), "{reply}");
    }
    let mut smtp = open(sender);
    let reply = send_on(&mut smtp, &message("virus", clamd::VIRUS_MARKER));
    assert!(reply.starts_with("550 5.7.1"), "{reply}");
    // The session ends with the block.
    smtp.expect_closed();

    let hit = kernel
        .datapath
        .block_covering(sender)
        .unwrap()
        .expect("sender blocked in the kernel");
    assert_eq!(hit.origin, Some(Reason::Filter));
    let dropped = kernel.datapath.counters().unwrap().dropped_block;
    match connect_from(&client, sender, listen_at, Duration::from_millis(800)) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the kernel to drop the sender's SYN, got {other:?}"),
    }
    // The timeout was the kernel's drop of this SYN.
    assert!(kernel.datapath.counters().unwrap().dropped_block > dropped);
    // Another source still delivers.
    let mut smtp = open(IpAddr::V4(link.client_v4s[1]));
    let reply = send_on(&mut smtp, &message("clean", "fine"));
    assert!(reply.starts_with("250"), "{reply}");
    postfix.expect_delivered(1);
    drop(proxy);
}

// -- The real agent, Postfix storing into maildirs ------------------------------
//
// The tests below run the `smtp-limiter` binary in a network namespace of
// their own, with Postfix and the scanners (real, or scripted stand-ins)
// beside it in that namespace, and read what Postfix stored in its
// maildirs: the delivered message is the oracle, not the proxy's logs.

/// Where the agent listens, inside its namespace.
const AGENT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 25);
/// `filters.timeout` where scanners misbehave: short, so each case is quick,
/// and still far above what an answering scanner needs.
const FILTER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client waits for the reply to the end of DATA while a
/// scanner misbehaves. The proxy may wait `filters.timeout` for a scanner
/// that stops reading the message, then `filters.timeout` for the verdicts:
/// 2 × `filters.timeout`. The 30 s on top are room for a loaded 2-CPU
/// machine: only a wait that `filters.timeout` does not bound fails.
const REPLY_BOUND: Duration = Duration::from_secs(2 * FILTER_TIMEOUT.as_secs() + 30);
/// The recipient of every message below.
const ALICE: &str = "alice@example.com";

/// The agent in `ns`, Postfix (PROXY v2, storing into `maildir`) beside it
/// in `ns` (started from a thread in `ns`, its processes live there).
/// Dropped agent first.
struct AgentRig<'ns> {
    agent: Agent,
    /// Removed once the agent has stopped.
    dir: AgentDir,
    postfix: Postfix,
    maildir: Maildir,
    ns: &'ns NetNs,
}

impl<'ns> AgentRig<'ns> {
    /// The agent with `mode` and `filters` (the `[filters]` table's body,
    /// scanner tables included). `name` names its directory: keep it short,
    /// the control socket's path must fit in a `sockaddr_un`.
    fn start(ns: &'ns NetNs, name: &str, mode: &str, filters: &str) -> AgentRig<'ns> {
        let maildir = Maildir::new(&postfix::DEFAULT_RECIPIENTS).expect("maildir");
        let options = maildir.postfix_options(PostfixOptions {
            proxy_protocol: true,
            ..PostfixOptions::default()
        });
        let postfix = ns.run(|| Postfix::start(options)).expect("start Postfix");
        let dir = AgentDir::new(name);
        let config = agent_config(mode, postfix.addr(), filters);
        // In a namespace of its own: the ports are free.
        let agent = Agent::start(&dir, &Launch::in_ns(ns), || dir.write_config(&config));
        AgentRig {
            agent,
            dir,
            postfix,
            maildir,
            ns,
        }
    }

    /// One message to alice in a new session; the reply to the end of
    /// DATA, which must come within [`REPLY_BOUND`]. The session then
    /// ends with QUIT.
    #[track_caller]
    fn send(&self, message: &str) -> String {
        let (mut client, reply) = self.send_open(message);
        expect_code(&client.cmd("QUIT").unwrap(), 221, None);
        reply
    }

    /// As [`AgentRig::send`], without the QUIT: the session as the reply
    /// left it.
    #[track_caller]
    fn send_open(&self, message: &str) -> (Client, String) {
        let stream = self
            .ns
            .run(|| TcpStream::connect_timeout(&AGENT_LISTEN, WAIT))
            .expect("connect to the agent");
        // The same socket: its read timeout is the client's.
        let socket = stream.try_clone().expect("clone the client socket");
        let (mut client, greeting) = Client::from_stream(stream).expect("greeting");
        expect_code(&greeting, 220, None);
        expect_code(&client.cmd("EHLO client.example.org").unwrap(), 250, None);
        expect_code(
            &client.cmd("MAIL FROM:<sender@example.org>").unwrap(),
            250,
            Some("2.1.0"),
        );
        expect_code(
            &client.cmd(&format!("RCPT TO:<{ALICE}>")).unwrap(),
            250,
            Some("2.1.5"),
        );
        expect_code(&client.cmd("DATA").unwrap(), 354, None);
        socket.set_read_timeout(Some(REPLY_BOUND)).unwrap();
        client.send(message.as_bytes()).unwrap();
        client.send(b".\r\n").unwrap();
        let reply = client.reply().unwrap_or_else(|e| {
            panic!(
                "no reply to the end of DATA within {REPLY_BOUND:?}: {e}\nagent:\n{}",
                self.agent.log()
            )
        });
        socket.set_read_timeout(Some(WAIT)).unwrap();
        (client, reply)
    }

    /// What Postfix stored for alice, once nothing more can come: the
    /// agent has no session open (so it sends nothing more), and Postfix
    /// has delivered exactly `n` messages with its queue empty
    /// ([`Postfix::expect_delivered`]). Those are the `n` files in the
    /// maildir.
    #[track_caller]
    fn stored(&self, n: usize) -> Vec<Message> {
        assert!(
            wait_until(WAIT, || self.stats()["proxy"]["sessions_open"] == 0),
            "the agent still has sessions open: {}",
            self.stats()
        );
        self.postfix.expect_delivered(n);
        let stored = self.maildir.messages(ALICE);
        assert_eq!(stored.len(), n, "stored:\n{stored:#?}");
        stored
    }

    /// The stored message with this Message-ID; exactly one must be.
    #[track_caller]
    fn the_one(&self, stored: &[Message], id: &str) -> Message {
        let want = message_id(id);
        let found: Vec<&Message> = stored
            .iter()
            .filter(|m| m.header("Message-ID") == [want.clone()])
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{want} stored {} times; stored:\n{stored:#?}",
            found.len()
        );
        found[0].clone()
    }

    /// Writes the configuration anew with `mode` and `filters` and has the
    /// agent reload it.
    #[track_caller]
    fn reload(&self, mode: &str, filters: &str) {
        self.dir
            .write_config(&agent_config(mode, self.postfix.addr(), filters));
        let out = self.agent.cli(&["reload"]);
        assert!(
            out.success(),
            "reload: {}\nagent:\n{}",
            out.text(),
            self.agent.log()
        );
    }

    /// The agent's `/metrics` (`metrics.address` 127.0.0.1:9425, in the
    /// namespace).
    fn metrics(&self) -> String {
        self.ns
            .run(|| limiter_tests::agent::scrape_metrics(SocketAddr::from(([127, 0, 0, 1], 9425))))
    }

    /// `smtp-limiter stats --json`.
    fn stats(&self) -> serde_json::Value {
        self.agent.json(&["stats"])
    }

    /// The filter verdicts counted.
    fn verdicts(&self) -> serde_json::Value {
        self.stats()["filters"]["verdicts"].clone()
    }
}

fn agent_config(mode: &str, backend: SocketAddr, filters: &str) -> String {
    format!(
        r#"mode = "{mode}"

[[listen]]
address = "{AGENT_LISTEN}"
tls = "none"

[backend]
address = "{backend}"
identity = "proxy-v2"
connect_timeout = "5s"

[kernel]
mode = "off"

[relay]
accept = "*@example.com"

[filters]
{filters}
"#
    )
}

/// Asserts a reply's code and, if given, its enhanced status code (not its
/// wording).
#[track_caller]
fn expect_code(reply: &str, code: u16, enhanced: Option<&str>) {
    let got = reply.get(..3).and_then(|c| c.parse::<u16>().ok());
    assert_eq!(got, Some(code), "reply {reply:?}");
    if let Some(enhanced) = enhanced {
        assert_eq!(
            reply.get(4..).and_then(|t| t.split(' ').next()),
            Some(enhanced),
            "reply {reply:?}"
        );
    }
}

fn message_id(id: &str) -> String {
    format!("<{id}@smtp-limiter.test>")
}

/// A message (CRLF, dot-stuffed) with `headers` (whole lines, without
/// their CRLF) after From/To/Message-ID, and a body with [`BODY_LINE`], a
/// stuffed line and `marker`.
fn raw_message(id: &str, headers: &[&str], marker: &str) -> String {
    let mut text = format!(
        "From: sender@example.org\r\nTo: {ALICE}\r\nMessage-ID: {}\r\n",
        message_id(id)
    );
    for header in headers {
        text.push_str(header);
        text.push_str("\r\n");
    }
    text.push_str(&format!(
        "\r\nHello Alice,\r\n{BODY_LINE}\r\n{marker}\r\n..a stuffed line\r\nbye\r\n"
    ));
    text
}

/// The body [`raw_message`] writes, as stored (LF, unstuffed).
fn stored_body(marker: &str) -> String {
    format!("Hello Alice,\n{BODY_LINE}\n{marker}\n.a stuffed line\nbye\n")
}

/// A header value with its RFC 2047 encoded words (`Q` or `B`, UTF-8)
/// decoded; blanks between two encoded words dropped.
fn decode_words(value: &str) -> String {
    let mut out: Vec<u8> = Vec::new();
    let mut rest = value;
    let mut after_word = false;
    loop {
        let Some(start) = rest.find("=?") else {
            out.extend_from_slice(rest.as_bytes());
            break;
        };
        let mut fields = rest[start + 2..].splitn(3, '?');
        let (Some(_charset), Some(encoding), Some(tail)) =
            (fields.next(), fields.next(), fields.next())
        else {
            out.extend_from_slice(rest.as_bytes());
            break;
        };
        let Some(end) = tail.find("?=") else {
            out.extend_from_slice(rest.as_bytes());
            break;
        };
        let plain = &rest[..start];
        if !(after_word && plain.trim().is_empty()) {
            out.extend_from_slice(plain.as_bytes());
        }
        let text = &tail[..end];
        if encoding.eq_ignore_ascii_case("b") {
            out.extend(limiter_tests::scripted::base64_decode(text).unwrap_or_default());
        } else {
            let bytes = text.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
                match (bytes[i], hex) {
                    (b'=', Some(byte)) => {
                        out.push(byte);
                        i += 3;
                        continue;
                    }
                    (b'_', _) => out.push(b' '),
                    (other, _) => out.push(other),
                }
                i += 1;
            }
        }
        after_word = true;
        rest = &tail[end + 2..];
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// rspamd's verdicts reach Postfix as the message it stores: the Subject
/// rewritten once (`rewrite subject`), `X-Spam: Yes` added once (`add
/// header`, `rewrite subject`), forged spam headers removed, everything
/// else as sent; a clean message with its Subject unchanged.
#[test]
fn rspamds_subject_rewrite_and_headers_reach_postfix_exactly_once() {
    let test = "rspamds_subject_rewrite_and_headers_reach_postfix_exactly_once";
    if !ready(test) {
        return;
    }
    let ns = NetNs::new("flt-subj").unwrap();
    let rspamd = ns.run(Rspamd::start).expect("start rspamd");
    let rig = AgentRig::start(
        &ns,
        "flt-subject",
        "enforce",
        &format!(
            "timeout = \"30s\"\n[filters.rspamd]\nurl = \"{}\"\n",
            rspamd.url()
        ),
    );
    let spam_subject = format!("Offer {}", rspamd::SUBJECT_MARKER);
    // (id, headers sent, body marker, the Subject stored, X-Spam stored)
    type Case<'a> = (&'a str, Vec<String>, &'a str, String, Vec<&'a str>);
    let cases: [Case; 5] = [
        (
            "clean",
            vec!["Subject: Lunch at noon".into()],
            "nothing to see",
            "Lunch at noon".into(),
            vec![],
        ),
        (
            "rewrite",
            vec![format!("Subject: {spam_subject}")],
            "cheap",
            format!("{}{spam_subject}", rspamd::SUBJECT_PREFIX),
            vec!["Yes"],
        ),
        (
            // A folded Subject is replaced whole (no continuation line
            // left behind), and the sender's own verdict headers go.
            "rewrite-folded-forged",
            vec![
                "X-Spam: No".into(),
                "X-Spamd-Result: default: False [0.00 / 15.00] (forged)".into(),
                format!("Subject: Offer\r\n {} folded", rspamd::SUBJECT_MARKER),
            ],
            "cheap",
            format!(
                "{}Offer {} folded",
                rspamd::SUBJECT_PREFIX,
                rspamd::SUBJECT_MARKER
            ),
            vec!["Yes"],
        ),
        (
            // An encoded Subject (RFC 2047): the stored one stays 7-bit
            // (no 8-bit header without SMTPUTF8).
            "rewrite-encoded",
            vec![format!(
                "Subject: =?UTF-8?B?w4lsw6lnYW50?= {}",
                rspamd::SUBJECT_MARKER
            )],
            "cheap",
            format!(
                "{}\u{c9}l\u{e9}gant {}",
                rspamd::SUBJECT_PREFIX,
                rspamd::SUBJECT_MARKER
            ),
            vec!["Yes"],
        ),
        (
            "add-header",
            vec!["Subject: Hello".into()],
            rspamd::HEADER_MARKER,
            "Hello".into(),
            vec!["Yes"],
        ),
    ];
    for (id, headers, marker, _, _) in &cases {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let reply = rig.send(&raw_message(id, &headers, marker));
        expect_code(&reply, 250, Some("2.0.0"));
    }
    let stored = rig.stored(cases.len());
    for (id, _, marker, subject, x_spam) in &cases {
        let message = rig.the_one(&stored, id);
        let stored_subject = message.header("Subject");
        assert_eq!(stored_subject.len(), 1, "{id}: {message:#?}");
        assert!(stored_subject[0].is_ascii(), "{id}: {message:#?}");
        assert_eq!(
            decode_words(&stored_subject[0]),
            *subject,
            "{id}: {message:#?}"
        );
        assert_eq!(message.header("X-Spam"), *x_spam, "{id}: {message:#?}");
        let result = message.header("X-Spamd-Result");
        assert_eq!(result.len(), 1, "{id}: {message:#?}");
        assert!(!result[0].contains("forged"), "{id}: {message:#?}");
        assert_eq!(message.body(), stored_body(marker), "{id}: {message:#?}");
        assert!(message.header("X-Smtp-Limiter-Scan").is_empty(), "{id}");
    }
    assert_eq!(rspamd.scanned().len(), cases.len(), "{}", rspamd.log());
    assert_eq!(rig.verdicts(), serde_json::json!({"clean": cases.len()}));
}

/// The scanner a scripted peer stands in for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scanner {
    Rspamd,
    Clamd,
}

impl Scanner {
    /// The `[filters.*]` table that points the agent at `peer`.
    fn table(self, peer: SocketAddr) -> String {
        match self {
            Scanner::Rspamd => format!("[filters.rspamd]\nurl = \"http://{peer}\"\n"),
            Scanner::Clamd => format!("[filters.clamav]\naddress = \"{peer}\"\n"),
        }
    }

    /// Its name in the counters and the "not scanned" header.
    fn name(self) -> &'static str {
        match self {
            Scanner::Rspamd => "rspamd",
            Scanner::Clamd => "clamav",
        }
    }

    /// What ends the proxy's request: the last HTTP chunk (after the CRLF
    /// of the message's last line), or INSTREAM's zero-length chunk.
    fn request_end(self) -> Vec<u8> {
        match self {
            Scanner::Rspamd => b"\r\n0\r\n\r\n".to_vec(),
            Scanner::Clamd => vec![0; 4],
        }
    }

    /// A verdict that is good and in time: the scanner works.
    fn clean_verdict(self) -> Vec<u8> {
        match self {
            Scanner::Rspamd => http_json(r#"{"action":"no action","score":0.0}"#),
            Scanner::Clamd => b"stream: OK\0".to_vec(),
        }
    }

    /// A verdict that would refuse the message, were it taken.
    fn refusing_verdict(self) -> Vec<u8> {
        match self {
            Scanner::Rspamd => http_json(r#"{"action":"reject","score":30.0}"#),
            Scanner::Clamd => b"stream: Late.Verdict.Virus FOUND\0".to_vec(),
        }
    }
}

/// An HTTP/1.1 200 reply with a JSON body.
fn http_json(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One way a scanner misbehaves, for one message.
struct Misbehaviour {
    name: &'static str,
    script: Vec<Step>,
    /// The message is large (8 MB), so that a scanner that stops reading
    /// blocks the proxy's writes.
    large: bool,
}

fn misbehave(name: &'static str, script: Vec<Step>) -> Misbehaviour {
    Misbehaviour {
        name,
        script,
        large: false,
    }
}

/// The misbehaviours every scanner is tried with: slow (never answers,
/// answers a refusing verdict after 3 × `filters.timeout`, stops reading,
/// closes at once), and the ones of its protocol.
fn misbehaviours(scanner: Scanner) -> Vec<Misbehaviour> {
    let end = scanner.request_end();
    let read = || Step::ReadUntil(end.clone());
    let huge = 64 << 20;
    let mut cases = vec![
        misbehave("never-answers", vec![read()]),
        misbehave(
            "answers-too-late",
            vec![
                read(),
                Step::Sleep(3 * FILTER_TIMEOUT),
                Step::Write(scanner.refusing_verdict()),
                Step::Close,
            ],
        ),
        Misbehaviour {
            name: "stops-reading",
            script: vec![Step::Stall],
            large: true,
        },
        misbehave("closes-at-once", vec![Step::Close]),
    ];
    let write = |bytes: &[u8]| Step::Write(bytes.to_vec());
    match scanner {
        Scanner::Rspamd => cases.extend([
            misbehave("not-http", vec![read(), write(b"SSH-2.0-OpenSSH_9.6\r\n")]),
            misbehave("not-json", vec![read(), write(&http_json("<html></html>"))]),
            misbehave(
                "unknown-action",
                vec![read(), write(&http_json(r#"{"action":"discard"}"#))],
            ),
            misbehave(
                "http-500",
                vec![
                    read(),
                    write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!"),
                ],
            ),
            misbehave(
                "truncated-then-closed",
                vec![
                    read(),
                    write(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n{\"action\":\"no act"),
                    Step::Close,
                ],
            ),
            misbehave(
                "truncated-kept-open",
                vec![
                    read(),
                    write(b"HTTP/1.1 200 OK\r\nContent-Length: 400\r\n\r\n{\"action\":\"no act"),
                ],
            ),
            misbehave(
                "huge-body",
                vec![
                    read(),
                    write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n1a\r\n{\"action\":\"no action\",\"x\":\"\r\n"),
                    Step::Flood {
                        chunk: format!("1000\r\n{}\r\n", "a".repeat(0x1000)).into_bytes(),
                        total: huge,
                    },
                ],
            ),
            misbehave(
                "huge-header",
                vec![
                    read(),
                    write(b"HTTP/1.1 200 OK\r\nX-Pad: "),
                    Step::Flood {
                        chunk: b"a".repeat(4096),
                        total: huge,
                    },
                ],
            ),
        ]),
        Scanner::Clamd => cases.extend([
            misbehave("not-clamd", vec![read(), write(b"HTTP/1.1 200 OK\r\n\r\n{}\0")]),
            misbehave(
                "clamd-error",
                vec![read(), write(b"INSTREAM size limit exceeded. ERROR\0")],
            ),
            misbehave(
                "truncated-then-closed",
                vec![read(), write(b"stream: SMTPLimiter.Te"), Step::Close],
            ),
            misbehave("truncated-kept-open", vec![read(), write(b"stream: OK")]),
            // "stream: OK" is no verdict until its NUL: it may have been
            // cut from "stream: OK.Some.Virus FOUND".
            misbehave(
                "unterminated-ok-then-closed",
                vec![read(), write(b"stream: OK"), Step::Close],
            ),
            misbehave(
                "huge",
                vec![
                    read(),
                    Step::Flood {
                        chunk: b"A".repeat(4096),
                        total: huge,
                    },
                ],
            ),
            misbehave(
                "huge-after-ok",
                vec![
                    read(),
                    write(b"stream: OK"),
                    Step::Flood {
                        chunk: b" ".repeat(4096),
                        total: huge,
                    },
                    write(b"\0"),
                ],
            ),
        ]),
    }
    cases
}

/// The message of one case: small, or 8 MB of plain lines (under Postfix's
/// 10 MB `message_size_limit`).
fn case_message(scanner: Scanner, case: &Misbehaviour) -> String {
    let id = format!("{}-{}", scanner.name(), case.name);
    let subject = format!("Subject: scanner case {}", case.name);
    if !case.large {
        return raw_message(&id, &[&subject], case.name);
    }
    let line = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\r\n";
    let filler = line.repeat(8_000_000 / line.len());
    raw_message(&id, &[&subject], &format!("{filler}end of {}", case.name))
}

/// A scanner, replaced by a scripted peer, misbehaves in every way of
/// [`misbehaviours`], one message each, then answers one message well.
/// With `on_failure`, each misbehaving case must end as documented at
/// Postfix: delivered once with the "not scanned" header (`fail-open`) or
/// refused `451 4.7.1` with nothing stored (`fail-closed`); never lost,
/// never a 250 without a stored message, the reply within [`REPLY_BOUND`],
/// and the scanner connection let go of once the reply is given.
fn misbehaving_scanner_never_loses_mail(test: &str, scanner: Scanner, on_failure: &str) {
    if !ready(test) {
        return;
    }
    let cases = misbehaviours(scanner);
    let mut scripts: Vec<Vec<Step>> = cases.iter().map(|c| c.script.clone()).collect();
    let end = scanner.request_end();
    scripts.push(vec![
        Step::ReadUntil(end),
        Step::Write(scanner.clean_verdict()),
        Step::Close,
    ]);
    let ns = NetNs::new("flt-slow").unwrap();
    let peer = ns.run(|| ScriptedPeer::start(scripts));
    let filters = format!(
        "timeout = \"{}s\"\non_failure = \"{on_failure}\"\nmax_rejects = 0\n{}",
        FILTER_TIMEOUT.as_secs(),
        scanner.table(peer.addr())
    );
    let name = format!("flt-{}-{on_failure}", scanner.name());
    let rig = AgentRig::start(&ns, &name, "enforce", &filters);
    let fail_open = on_failure == "fail-open";
    for (n, case) in cases.iter().enumerate() {
        let started = Instant::now();
        let reply = rig.send(&case_message(scanner, case));
        let waited = started.elapsed();
        if fail_open {
            expect_code(&reply, 250, Some("2.0.0"));
        } else {
            expect_code(&reply, 451, Some("4.7.1"));
        }
        // The proxy asked this peer (one connection per message) ...
        assert_eq!(peer.connections(), n + 1, "{}: {reply}", case.name);
        // ... and let go of the connection once it replied (a peer that
        // stops reading cannot tell).
        if !case.script.contains(&Step::Stall) {
            assert!(
                peer.wait_until(WAIT, |p| p.connection(n).is_some_and(|c| c.done)),
                "{}: the proxy keeps its connection to the scanner open: {:?}",
                case.name,
                peer.connection(n)
            );
        }
        eprintln!("{}: {reply} (session of {waited:.1?})", case.name);
    }
    // The scanner answering well: delivered, scanned.
    let good = Misbehaviour {
        name: "answers-well",
        script: Vec::new(),
        large: false,
    };
    expect_code(&rig.send(&case_message(scanner, &good)), 250, Some("2.0.0"));

    let stored = rig.stored(if fail_open { cases.len() + 1 } else { 1 });
    let control = rig.the_one(&stored, &format!("{}-answers-well", scanner.name()));
    assert!(
        control.header("X-Smtp-Limiter-Scan").is_empty(),
        "{control:#?}"
    );
    let failed = cases.len() as u64;
    if fail_open {
        assert_eq!(stored.len(), cases.len() + 1, "stored:\n{stored:#?}");
        for case in &cases {
            let id = format!("{}-{}", scanner.name(), case.name);
            let message = rig.the_one(&stored, &id);
            let marked = message.header("X-Smtp-Limiter-Scan");
            assert_eq!(marked.len(), 1, "{id}: {message:#?}");
            assert!(
                marked[0].starts_with("not scanned") && marked[0].contains(scanner.name()),
                "{id}: {marked:?}"
            );
            let last = if case.large {
                format!("end of {}", case.name)
            } else {
                case.name.to_owned()
            };
            assert!(
                message
                    .body()
                    .ends_with(&format!("{last}\n.a stuffed line\nbye\n")),
                "{id}: the body's end is not as sent"
            );
        }
        assert_eq!(
            rig.verdicts(),
            serde_json::json!({"unscanned": failed, "clean": 1})
        );
    } else {
        assert_eq!(
            rig.verdicts(),
            serde_json::json!({"tempfail": failed, "clean": 1})
        );
    }
    assert_eq!(
        rig.stats()["filters"]["scanner_errors"],
        serde_json::json!({ scanner.name(): failed })
    );
}

#[test]
fn a_slow_or_garbled_rspamd_fails_open_and_delivers_once() {
    misbehaving_scanner_never_loses_mail(
        "a_slow_or_garbled_rspamd_fails_open_and_delivers_once",
        Scanner::Rspamd,
        "fail-open",
    );
}

#[test]
fn a_slow_or_garbled_rspamd_fails_closed_with_451_and_stores_nothing() {
    misbehaving_scanner_never_loses_mail(
        "a_slow_or_garbled_rspamd_fails_closed_with_451_and_stores_nothing",
        Scanner::Rspamd,
        "fail-closed",
    );
}

#[test]
fn a_slow_or_garbled_clamd_fails_open_and_delivers_once() {
    misbehaving_scanner_never_loses_mail(
        "a_slow_or_garbled_clamd_fails_open_and_delivers_once",
        Scanner::Clamd,
        "fail-open",
    );
}

#[test]
fn a_slow_or_garbled_clamd_fails_closed_with_451_and_stores_nothing() {
    misbehaving_scanner_never_loses_mail(
        "a_slow_or_garbled_clamd_fails_closed_with_451_and_stores_nothing",
        Scanner::Clamd,
        "fail-closed",
    );
}

/// Observe mode with the filters: what they would refuse (spam, a virus, a
/// greylisting) is delivered at Postfix, once and as sent, and counted as a
/// refusal (`stats`, `/metrics`), and the source is not blocked although
/// it sent `filters.max_rejects` refusable messages. The same agent,
/// reloaded into enforce mode, refuses the same messages and stores
/// nothing more: the mode is what made the difference.
#[test]
fn observe_mode_delivers_what_the_filters_would_refuse_and_counts_it() {
    let test = "observe_mode_delivers_what_the_filters_would_refuse_and_counts_it";
    if !ready(test) {
        return;
    }
    let ns = NetNs::new("flt-obs").unwrap();
    let rspamd = ns.run(Rspamd::start).expect("start rspamd");
    let clamd = ns.run(Clamd::start).expect("start clamd");
    let filters = format!(
        "timeout = \"30s\"\nmax_rejects = 2\nreject_window = \"1h\"\n\
         [filters.rspamd]\nurl = \"{}\"\n[filters.clamav]\naddress = \"{}\"\n\
         [metrics]\naddress = \"127.0.0.1:9425\"\n",
        rspamd.url(),
        clamd.tcp_address()
    );
    let rig = AgentRig::start(&ns, "flt-observe", "observe", &filters);
    // (id, subject, body marker, the verdict's label)
    let refusable = [
        ("spam", "Offer", rspamd::SPAM_MARKER, "spam"),
        ("virus", "Invoice", clamd::VIRUS_MARKER, "virus"),
        ("greylist", "Hi", rspamd::GREYLIST_MARKER, "soft-reject"),
    ];
    for (id, subject, marker, _) in refusable {
        let reply = rig.send(&raw_message(id, &[&format!("Subject: {subject}")], marker));
        expect_code(&reply, 250, Some("2.0.0"));
    }
    let reply = rig.send(&raw_message("clean", &["Subject: Lunch"], "fine"));
    expect_code(&reply, 250, Some("2.0.0"));

    let stored = rig.stored(refusable.len() + 1);
    for (id, subject, marker, _) in refusable {
        let message = rig.the_one(&stored, id);
        assert_eq!(message.header("Subject"), [subject], "{message:#?}");
        assert_eq!(message.body(), stored_body(marker), "{message:#?}");
    }
    rig.the_one(&stored, "clean");
    // Counted as what they would have been.
    let stats = rig.stats();
    assert_eq!(
        stats["filters"]["verdicts"],
        serde_json::json!({"spam": 1, "virus": 1, "soft-reject": 1, "clean": 1}),
        "{stats}"
    );
    for (_, _, _, label) in refusable {
        assert_eq!(stats["proxy"]["rejections"][label], 1, "{label}: {stats}");
    }
    assert_eq!(stats["proxy"]["messages"], 4, "{stats}");
    let metrics = rig.metrics();
    for (_, _, _, label) in refusable {
        let line = format!("smtp_limiter_rejections_total{{reason=\"{label}\"}} 1");
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in /metrics:\n{metrics}"
        );
    }
    // Two refusable messages (spam, virus) from one source, max_rejects 2:
    // observed, no block.
    assert_eq!(
        rig.agent.json(&["block", "list"]),
        serde_json::json!([]),
        "{}",
        rig.agent.log()
    );

    // Enforced, the same agent refuses them and stores nothing more.
    rig.reload("enforce", &filters);
    let (_client, reply) = rig.send_open(&raw_message(
        "spam-enforced",
        &["Subject: Offer"],
        rspamd::SPAM_MARKER,
    ));
    expect_code(&reply, 554, Some("5.7.1"));
    let (_client, reply) = rig.send_open(&raw_message(
        "virus-enforced",
        &["Subject: Invoice"],
        clamd::VIRUS_MARKER,
    ));
    expect_code(&reply, 550, Some("5.7.1"));
    drop(_client);
    rig.stored(refusable.len() + 1);
    assert_eq!(rig.stats()["filters"]["verdicts"]["spam"], 2);
}

/// Observe mode decides and logs everything enforce mode would do, the
/// block the filters would order included (as it does for a harvester's):
/// two spam messages from one source with `max_rejects = 2` are counted
/// as the `filter` refusal, and nothing is blocked.
#[test]
fn observe_mode_counts_the_block_the_filters_would_order() {
    let test = "observe_mode_counts_the_block_the_filters_would_order";
    if !ready(test) {
        return;
    }
    let ns = NetNs::new("flt-obsb").unwrap();
    let rspamd = ns.run(Rspamd::start).expect("start rspamd");
    let filters = format!(
        "timeout = \"30s\"\nmax_rejects = 2\nreject_window = \"1h\"\n\
         [filters.rspamd]\nurl = \"{}\"\n",
        rspamd.url()
    );
    let rig = AgentRig::start(&ns, "flt-obs-block", "observe", &filters);
    for n in 0..2 {
        let id = format!("spam-{n}");
        let reply = rig.send(&raw_message(&id, &["Subject: Offer"], rspamd::SPAM_MARKER));
        expect_code(&reply, 250, Some("2.0.0"));
    }
    let stats = rig.stats();
    assert_eq!(stats["proxy"]["rejections"]["spam"], 2, "{stats}");
    assert_eq!(
        stats["proxy"]["rejections"]["filter"],
        1,
        "the block the filters would order is not counted: {stats}\nagent:\n{}",
        rig.agent.log()
    );
    assert_eq!(rig.agent.json(&["block", "list"]), serde_json::json!([]));
}
