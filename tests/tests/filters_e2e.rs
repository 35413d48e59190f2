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
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use limiter_common::reason;
use limiter_tests::{
    clamd::{self, Clamd},
    fixture,
    netns::{link, NetNs},
    postfix::{self, Postfix, PostfixOptions},
    prerequisites,
    proxy::{Client, TestProxy},
    rspamd::{self, Rspamd},
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

    /// Waits for `n` deliveries, then checks there are exactly `n`.
    #[track_caller]
    fn expect_delivered(&self, n: usize) {
        assert!(
            self.postfix.wait_delivered(n, WAIT),
            "Postfix delivered {} of {n}; log:\n{}",
            self.postfix.delivered(),
            self.log()
        );
        assert!(self.postfix.wait_queue_empty(WAIT));
        thread::sleep(Duration::from_millis(300));
        assert_eq!(self.postfix.delivered(), n, "log:\n{}", self.log());
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
    assert!(marked[0].contains("rspamd: unavailable"), "{marked:?}");
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
    assert_eq!(hit.reason, reason::FILTER);
    match connect_from(&client, sender, listen_at, Duration::from_millis(800)) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the kernel to drop the sender's SYN, got {other:?}"),
    }
    assert!(kernel.datapath.counters().unwrap().dropped_block >= 1);
    // Another source still delivers.
    let mut smtp = open(IpAddr::V4(link.client_v4s[1]));
    let reply = send_on(&mut smtp, &message("clean", "fine"));
    assert!(reply.starts_with("250"), "{reply}");
    assert!(postfix.wait_delivered(1, WAIT), "log:\n{}", postfix.log());
    assert!(postfix.wait_queue_empty(WAIT), "log:\n{}", postfix.log());
    assert_eq!(postfix.delivered(), 1, "log:\n{}", postfix.log());
    drop(proxy);
}
