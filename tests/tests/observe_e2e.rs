//! Observe mode in the kernel, end to end: the real agent in a network
//! namespace with its XDP program on the server end of a veth pair
//! ([`NetRig`]), clients in another namespace, Postfix storing into
//! maildirs.
//!
//! A reject-listed source, observed, gets its SYNs answered and its mail
//! delivered while the kernel counts what it would have dropped; the same
//! agent reloaded into enforce mode drops that source's SYNs. The contrast
//! is what makes the test: an answered SYN proves nothing unless the same
//! SYN, enforced, is dropped. (Observe mode with the content filters is in
//! filters_e2e.)
//!
//! Needs root, the eBPF object and Postfix; under `CI=true` a missing one
//! fails the test.

use std::{
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use limiter_tests::{
    agent::NetRig,
    fixture,
    maildir::{Maildir, Message},
    postfix::{self, PostfixOptions},
    prerequisites,
    tcp::wait_until,
};

/// How long a connect waits for the SYN-ACK. A connect that times out is
/// read as a dropped SYN only beside the kernel's own count of the drop
/// and a connect from another source that works.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
/// How long to wait for the agent to get somewhere.
const WAIT: Duration = Duration::from_secs(15);
const ALICE: &str = "alice@example.com";
/// `metrics.address`, inside the server namespace.
const METRICS: &str = "127.0.0.1:9425";

fn ready(test: &str) -> bool {
    prerequisites(test) && fixture::require(test, postfix::missing_prerequisite())
}

/// Asserts a reply's code (not its wording).
#[track_caller]
fn expect_code(reply: &str, code: u16) {
    assert_eq!(
        reply.get(..3).and_then(|c| c.parse::<u16>().ok()),
        Some(code),
        "reply {reply:?}"
    );
}

fn listen(rig: &NetRig) -> SocketAddr {
    SocketAddr::new(rig.link.server_v4.into(), 25)
}

fn source(rig: &NetRig, n: usize) -> IpAddr {
    rig.link.client_v4s[n].into()
}

/// One message from client address `n` (Message-ID from `id`); the reply
/// to its end.
#[track_caller]
fn deliver(rig: &NetRig, n: usize, id: &str) -> String {
    let (mut smtp, greeting) = rig.session(source(rig, n), listen(rig));
    expect_code(&greeting, 220);
    expect_code(&smtp.cmd("EHLO client.example.org").unwrap(), 250);
    expect_code(&smtp.cmd("MAIL FROM:<sender@example.org>").unwrap(), 250);
    expect_code(&smtp.cmd(&format!("RCPT TO:<{ALICE}>")).unwrap(), 250);
    expect_code(&smtp.cmd("DATA").unwrap(), 354);
    let reply = smtp
        .cmd(&format!(
            "From: sender@example.org\r\nTo: {ALICE}\r\nSubject: observed\r\n\
             Message-ID: <{id}@smtp-limiter.test>\r\n\r\nHello.\r\n."
        ))
        .unwrap();
    expect_code(&smtp.cmd("QUIT").unwrap(), 221);
    reply
}

/// What Postfix stored for alice once nothing more can come: the agent has
/// no session open, Postfix delivered exactly `n` and its queue is empty.
#[track_caller]
fn stored(rig: &NetRig, maildir: &Maildir, n: usize) -> Vec<Message> {
    assert!(
        wait_until(WAIT, || rig.agent.json(&["stats"])["proxy"]
            ["sessions_open"]
            == 0),
        "the agent still has sessions open"
    );
    rig.postfix.expect_delivered(n);
    let stored = maildir.messages(ALICE);
    assert_eq!(stored.len(), n, "stored:\n{stored:#?}");
    stored
}

/// Packets the kernel dropped, and would have dropped, for a block (exact
/// address or network: a reject-list entry may be either).
fn block_drops(rig: &NetRig) -> (u64, u64) {
    let counter = |name| rig.agent.kernel_counter(name);
    (
        counter("dropped_block") + counter("dropped_block_net"),
        counter("would_drop_block") + counter("would_drop_block_net"),
    )
}

/// The sum of the `/metrics` samples whose line starts with `prefix`.
fn metric_sum(rig: &NetRig, prefix: &str) -> f64 {
    rig.metrics(METRICS.parse().unwrap())
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The kernel in observe mode answers a reject-listed source's SYNs (its
/// message reaches Postfix, once) and counts `would_drop_*`, dropping
/// nothing; reloaded into enforce mode, the same agent drops that source's
/// SYNs while another source is still served.
#[test]
fn kernel_observe_mode_answers_a_blocked_sources_syns_that_enforce_mode_drops() {
    let test = "kernel_observe_mode_answers_a_blocked_sources_syns_that_enforce_mode_drops";
    if !ready(test) {
        return;
    }
    let maildir = Maildir::new(&postfix::DEFAULT_RECIPIENTS).expect("maildir");
    let postfix = maildir.postfix_options(PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    });
    // The configuration enforced, the same but for the mode.
    let mut enforce = String::new();
    let rig = NetRig::start("obs", "obs", postfix, |parts| {
        let tables = format!(
            "{}[lists]\nreject = [\"{}/32\"]\n[metrics]\naddress = \"{METRICS}\"\n",
            parts.kernel_table(&parts.link.server_if, "xdp"),
            parts.link.client_v4s[0]
        );
        let listen = SocketAddr::new(parts.link.server_v4.into(), 25);
        let body = parts.config(listen, "identity = \"proxy-v2\"", &tables);
        enforce = format!("mode = \"enforce\"\n{body}");
        format!("mode = \"observe\"\n{body}")
    });
    let blocked = source(&rig, 0);

    // Observed: the SYN is answered, the session served, the mail stored.
    let (dropped, would) = block_drops(&rig);
    assert_eq!(dropped, 0, "{}", rig.agent.json(&["stats"]));
    expect_code(&deliver(&rig, 0, "observed"), 250);
    let messages = stored(&rig, &maildir, 1);
    let received = messages[0].header("Received").join("\n");
    assert!(
        received.contains(&format!("[{blocked}]")),
        "the message came from {blocked}: {messages:#?}"
    );
    let (dropped_after, would_after) = block_drops(&rig);
    assert_eq!(
        dropped_after,
        0,
        "observed, nothing is dropped: {}",
        rig.agent.json(&["stats"])
    );
    assert!(
        would_after > would,
        "no would-drop counted for {blocked}: {}",
        rig.agent.json(&["stats"])
    );
    // /metrics says so too: between the count read before it and the one
    // read after (packets of the closed connection may still come).
    let in_metrics = metric_sum(
        &rig,
        "smtp_limiter_kernel_events_total{counter=\"would_drop_block",
    );
    let (_, would_later) = block_drops(&rig);
    assert!(
        (would_after as f64..=would_later as f64).contains(&in_metrics),
        "would-drops in /metrics: {in_metrics}, counted {would_after} then {would_later}"
    );

    // Enforced, with the same blocks: the same source's SYN gets no answer,
    // and the kernel says it dropped it ...
    rig.dir.write_config(&enforce);
    let out = rig.agent.cli(&["reload"]);
    assert!(out.success(), "reload: {}", out.text());
    let (dropped, would) = block_drops(&rig);
    let started = Instant::now();
    match rig.connect(blocked, listen(&rig), CONNECT_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::TimedOut => {}
        other => panic!(
            "expected the kernel to drop {blocked}'s SYN, got {other:?} after {:?}",
            started.elapsed()
        ),
    }
    let (dropped_after, would_after) = block_drops(&rig);
    assert!(
        dropped_after > dropped,
        "no drop counted for {blocked}: {}",
        rig.agent.json(&["stats"])
    );
    assert_eq!(would_after, would, "enforced, nothing is only observed");
    // ... while another source of the same link is served (the listener
    // is up: the timeout above was the drop).
    expect_code(&deliver(&rig, 1, "enforced-other"), 250);
    stored(&rig, &maildir, 2);
}
