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
    net::{IpAddr, SocketAddr},
    sync::atomic::Ordering,
    thread,
    time::Duration,
};

use limiter_tests::{
    agent::NetRig,
    certs::Certs,
    clients::{self, expect, line, python, swaks},
    fixture,
    netns::Link,
    postfix::{self, command_counts, log_lines, PostfixOptions},
    proxy::Client,
    rig::{Identity, Rig, RigOptions, PLAIN_LISTENER},
    tcp::{connect_from, connect_local, DeadPort},
};

/// The attacker's source address on loopback (the proxy is on 127.0.0.1).
const CLIENT: &str = "127.0.0.2";
/// Another client, unaffected by what the first one did.
const OTHER_CLIENT: &str = "127.0.0.3";
/// Long enough for a handshake on a veth, short enough for a dropped SYN
/// (first retransmission after 1 s) to show as a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);

// -- Prerequisites ---------------------------------------------------------

fn ready(test: &str) -> bool {
    fixture::require(test, clients::missing_prerequisite())
}

/// As [`ready`], plus the eBPF object and the `smtp-limiter` binary.
fn ready_with_kernel(test: &str) -> bool {
    let missing = clients::missing_prerequisite().or_else(|| {
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

// -- The in-process rig ----------------------------------------------------

/// A Postfix expecting PROXY v2 (with `options`) and the proxy in front of
/// it, with one Postfix session per client session (`backend.connect =
/// "on-connect"`: the checks below count Postfix sessions; the earned
/// connection is proxy_sessions' and flood_e2e's subject, and the judging
/// is the same in both modes).
fn rig_with(options: PostfixOptions, listen: &str, extra: &str) -> Rig {
    Rig::launch(RigOptions {
        postfix: PostfixOptions {
            proxy_protocol: true,
            ..options
        },
        listen: listen.to_owned(),
        connect: "on-connect",
        extra: extra.to_owned(),
        ..RigOptions::new(Identity::ProxyV2)
    })
}

fn rig(extra: &str) -> Rig {
    rig_with(PostfixOptions::default(), PLAIN_LISTENER, extra)
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
    let rig = rig("[relay]\naccept = \"*@example.com\"\n");
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
    let disconnects = rig.postfix.expect_disconnects(3);
    rig.postfix.expect_delivered(1);
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
    let rig = rig(
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
    let disconnects = rig.postfix.expect_disconnects(3);
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
    let rig = rig("[limits]\nnull_sender_rate = \"2/1m\"\n");
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
    let disconnects = rig.postfix.expect_disconnects(2);
    rig.postfix.expect_delivered(2);
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
    let rig = rig("[limits]\nnull_sender_rate = \"1/1m\"\n");
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
    rig.postfix.expect_disconnects(1 + spellings.len());
    let stored_null = log_lines(&rig.log(), "from=<>,").len();
    let replies: Vec<String> = (0..spellings.len())
        .map(|i| format!("{}: {}", spellings[i], line(&lines, &format!("SENDER{i}"))))
        .collect();
    assert!(
        replies.iter().all(|r| r.contains(": 450 4.7.1 ")),
        "spellings Postfix stores as <> were not counted as null senders: {replies:#?}\nPostfix stored {stored_null} messages with from=<>:\n{}",
        rig.log()
    );
    rig.postfix.expect_delivered(spellings.len());
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
    let rig = rig(
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
    let disconnects = rig.postfix.expect_disconnects(5);
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

#[test]
fn auth_before_starttls_is_neither_offered_nor_relayed() {
    if !ready("auth_before_starttls_is_neither_offered_nor_relayed") {
        return;
    }
    let tls = Certs::self_signed("hardening").expect("a certificate");
    let rig = rig_with(
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
    let disconnects = rig.postfix.expect_disconnects(4);
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
    let dead_clamd = DeadPort::new().expect("a dead port");
    let mut options = PostfixOptions::default();
    options.extra_main_cf.push((
        "header_checks".to_owned(),
        "regexp:{ {/^X-Smtp-Limiter-Scan:/ WARN held-by-the-proxy} }".to_owned(),
    ));
    let rig = rig_with(
        options,
        PLAIN_LISTENER,
        &format!(
            "[filters]\ntimeout = \"5s\"\non_failure = \"fail-open\"\n\n[filters.clamav]\naddress = \"{}\"\n",
            dead_clamd.addr()
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
    let stream = connect_local(
        CLIENT.parse().expect("an address"),
        rig.addr(),
        Duration::from_secs(5),
    )
    .expect("connect to the proxy");
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

    let disconnects = rig.postfix.expect_disconnects(2);
    rig.postfix.expect_delivered(splits.len());
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

/// The agent's `/metrics` inside the server namespace (its own: a fixed
/// port is nobody else's there).
const METRICS: &str = "127.0.0.1:9425";

/// The real agent in a server namespace with XDP on its end of a veth
/// ([`NetRig`]), PROXY v2 to Postfix, one Postfix session per client
/// session. `top` goes first in the configuration (e.g. `mode =
/// "observe"`), `extra` after the fixed tables (`[limits]`, `[lists]`, …).
fn net_rig(tag: &str, top: &str, extra: impl Fn(&Link) -> String) -> NetRig {
    let postfix = PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    };
    NetRig::start("hard", tag, postfix, |parts| {
        let more = format!(
            "{}[metrics]\naddress = \"{METRICS}\"\n{}",
            parts.kernel_table(&parts.link.server_if, "xdp"),
            extra(parts.link)
        );
        let backend = "identity = \"proxy-v2\"\nconnect = \"on-connect\"";
        format!(
            "{top}\n{}",
            parts.config(listen(parts.link), backend, &more)
        )
    })
}

/// Where the agent listens: port 25 on the server end of the link.
fn listen(link: &Link) -> SocketAddr {
    SocketAddr::new(link.server_v4.into(), 25)
}

/// Client address `n` of the link.
fn source(rig: &NetRig, n: usize) -> IpAddr {
    rig.link.client_v4s[n].into()
}

/// Asserts that the agent blocked `source` (its /32) for `reason`, in the
/// kernel's map, and that the kernel drops its next SYN (the connect times
/// out); the blocked network.
#[track_caller]
fn assert_dropped_by_the_kernel(rig: &NetRig, source: IpAddr, reason: &str) -> String {
    let net = format!("{source}/32");
    let block = rig
        .agent
        .block(&net)
        .unwrap_or_else(|| panic!("{net} not blocked:\n{}", rig.agent.log()));
    assert_eq!(block["reason"], reason, "{block}");
    assert_eq!(block["in_kernel"], true, "{block}");
    match connect_from(&rig.client, source, listen(&rig.link), CONNECT_TIMEOUT) {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("expected the kernel to drop {source}'s SYN, got {other:?}"),
    }
    net
}

// -- 3. Harvesting across sessions ends in a kernel drop ------------------------

#[test]
fn harvester_across_sessions_is_blocked_and_dropped_by_the_kernel() {
    if !ready_with_kernel("harvester_across_sessions_is_blocked_and_dropped_by_the_kernel") {
        return;
    }
    let rig = net_rig("hh3", "mode = \"enforce\"", |_| {
        "[limits]\nmax_failed_rcpt = 3\nmax_failed_rcpt_per_source = 5\nfailed_rcpt_window = \"1h\"\n"
                .to_owned()
    });
    let harvester = source(&rig, 0);
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
        let (mut c, greeting) = rig.session(source(&rig, 0), listen(&rig.link));
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

    // Blocked as a harvester, in the kernel's map, whose SYNs the kernel
    // now drops: no SYN-ACK, the connect times out.
    let dropped_before = rig.agent.kernel_counter("dropped_block");
    let net = assert_dropped_by_the_kernel(&rig, harvester, "harvest");
    let block = rig.agent.block(&net).expect("still blocked");
    assert!(
        block["drops"].as_u64().is_some_and(|d| d >= 1),
        "no drop counted on the harvester's block: {block}"
    );
    assert!(rig.agent.kernel_counter("dropped_block") > dropped_before);

    // Another client of the same namespace still delivers.
    let run = rig.swaks_to_alice(source(&rig, 1), listen(&rig.link));
    assert_eq!(run.code, Some(0), "swaks failed:\n{}", run.out);

    // Postfix: the harvester's three sessions and the other client's one
    // (after the probe), the dropped connection never; one delivery, from
    // the other client.
    let disconnects = rig.postfix.expect_disconnects(5);
    rig.postfix.expect_delivered(1);
    let log = rig.postfix.log();
    assert_eq!(disconnects.len(), 5, "{log}");
    assert_eq!(
        log_lines(&log, &format!("]: connect from unknown[{harvester}]")).len(),
        3,
        "{log}"
    );
    assert!(
        log.contains(&format!("client=unknown[{}]", source(&rig, 1))),
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

// -- A zombie that comes back to idle ends in a kernel drop -------------------------

#[test]
fn a_zombie_that_keeps_coming_back_to_idle_is_dropped_by_the_kernel() {
    if !ready_with_kernel("a_zombie_that_keeps_coming_back_to_idle_is_dropped_by_the_kernel") {
        return;
    }
    let rig = net_rig("hz", "mode = \"enforce\"", |_| {
        "[smtp]\nmax_sessions = 2\n[limits]\nmax_shed_sessions_per_source = 2\n".to_owned()
    });
    let zombie = source(&rig, 0);
    let idle = |rig: &NetRig| rig.session(zombie, listen(&rig.link));
    // The zombie fills the proxy with idle sessions and comes back each time
    // one is cut: every newcomer sheds its oldest session.
    let mut held: Vec<Client> = (0..2)
        .map(|_| {
            let (mut c, greeting) = idle(&rig);
            expect(&greeting, "220 ");
            expect(&c.cmd("EHLO zombie.test").expect("EHLO"), "250");
            c
        })
        .collect();
    for shed in 1..=3 {
        let (newcomer, _greeting) = idle(&rig);
        let mut oldest = held.remove(0);
        expect(&oldest.reply().expect("421"), "421 4.3.2");
        oldest.expect_closed();
        held.push(newcomer);
        if shed < 3 {
            assert!(
                rig.agent.block(&format!("{zombie}/32")).is_none(),
                "blocked after {shed} sheds:\n{}",
                rig.agent.log()
            );
        }
    }
    // The third shed within shed_sessions_window blocked it, in the kernel's
    // map, as a flood, whose SYNs the kernel now drops: coming back costs it
    // a timeout and the proxy nothing.
    assert_dropped_by_the_kernel(&rig, zombie, "flood");
    // Its sessions still open were ended with the block; a sender beside it
    // delivers.
    let run = rig.swaks_to_alice(source(&rig, 1), listen(&rig.link));
    assert_eq!(run.code, Some(0), "swaks failed:\n{}", run.out);
    rig.postfix.expect_delivered(1);
}

// -- A client that reconnects in a loop ends in a kernel drop ----------------------

#[test]
fn a_client_reconnecting_in_a_loop_ends_in_a_kernel_drop() {
    if !ready_with_kernel("a_client_reconnecting_in_a_loop_ends_in_a_kernel_drop") {
        return;
    }
    let rig = net_rig("hcr", "mode = \"enforce\"", |_| {
        "[limits]\nconnection_rate = \"5/1m\"\n".to_owned()
    });
    let churner = source(&rig, 0);
    // Connect, read the greeting, hang up: one connection at a time, far
    // under max_connections_per_source.
    for i in 1..=10 {
        let (mut client, greeting) = rig.session(churner, listen(&rig.link));
        let want = if i <= 5 { "220 " } else { "421 4.7.0" };
        assert!(greeting.starts_with(want), "connection {i}: {greeting}");
        if i > 5 {
            client.expect_closed();
        }
    }
    assert!(
        rig.agent.block(&format!("{churner}/32")).is_none(),
        "blocked before twice the rate:\n{}",
        rig.agent.log()
    );
    // The 11th within the minute is twice over the rate: blocked, in the
    // kernel's map, as a flood, and its next SYN is dropped there: the loop
    // now costs the proxy nothing. A sender beside it delivers.
    let (_, greeting) = rig.session(churner, listen(&rig.link));
    expect(&greeting, "421 4.7.0");
    assert_dropped_by_the_kernel(&rig, churner, "flood");
    let run = rig.swaks_to_alice(source(&rig, 1), listen(&rig.link));
    assert_eq!(run.code, Some(0), "swaks failed:\n{}", run.out);
    rig.postfix.expect_delivered(1);
}

// -- 8. Observe mode in the kernel -----------------------------------------------

#[test]
fn observe_mode_passes_a_rejected_source_and_counts_would_drops() {
    if !ready_with_kernel("observe_mode_passes_a_rejected_source_and_counts_would_drops") {
        return;
    }
    // The reject list names the client's address: enforced, the kernel
    // would drop its packets; observed, it only counts them.
    let rig = net_rig("ho8", "mode = \"observe\"", |link| {
        format!("[lists]\nreject = [\"{}/32\"]\n", link.client_v4s[0])
    });
    let source = source(&rig, 0);
    let run = rig.swaks_to_alice(source, listen(&rig.link));
    assert_eq!(
        run.code,
        Some(0),
        "a reject-listed source in observe mode must get through:\n{}\nagent:\n{}",
        run.out,
        rig.agent.log()
    );
    let disconnects = rig.postfix.expect_disconnects(2);
    rig.postfix.expect_delivered(1);
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
    let metrics = rig.metrics(METRICS.parse().expect("an address"));
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
