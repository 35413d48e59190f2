//! The real `smtp-limiter` binary in front of a real Postfix, for what only
//! the two together can show:
//!
//! * TLS towards the backend (`backend.starttls`, `backend.tls_ca`): mail
//!   goes over TLS to a Postfix whose certificate the configured CA signed
//!   (Postfix's own log and Received header say so); a certificate from
//!   another CA, or a Postfix that offers no STARTTLS, costs the client a
//!   4xx and nothing is delivered;
//! * IPv6 clients: the real address reaches Postfix through PROXY v2 and
//!   through XCLIENT, and the proxy's limits count sources per
//!   `limits.ipv6_prefix` (/64): two addresses of one /64 share them, an
//!   address of another /64 does not.
//!
//! The TLS tests run the agent on the host's loopback; the IPv6 tests run it
//! in a network namespace with clients in another one (IPv6 addresses of
//! their own on a veth), Postfix on the host reached through a relay
//! ([`NetRig`]). Needs root, Postfix, swaks, python3, openssl and the built
//! `smtp-limiter`; outside CI a missing piece skips the test with a
//! message, under `CI=true` it fails it.

use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use limiter_tests::{
    agent::{postfix_config, Agent, AgentDir, Launch, NetRig, RigParts},
    certs::Certs,
    clients::{self, expect, swaks_to_alice},
    fixture::{self, free_port},
    postfix::{log_lines, Postfix},
    proxy::{Client, Seen},
    rig::Identity,
    tcp::{connect_local, wait_until},
};

/// The client's source address on loopback.
const CLIENT: &str = "127.0.0.2";

fn ready(test: &str) -> bool {
    let missing = clients::missing_prerequisite().or_else(|| {
        let binary = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("smtp-limiter")));
        (!binary.is_some_and(|b| b.is_file())).then(|| {
            "no smtp-limiter binary next to the tests (`cargo build -p limiter-user`)".to_owned()
        })
    });
    fixture::require(test, missing)
}

// -- TLS towards the backend ---------------------------------------------------

/// Postfix expecting PROXY v2, offering STARTTLS with `certs` (if any),
/// logging each TLS session, and warning in its log about each Received
/// header of its own: `received-over-tls` when it says the message came
/// over TLS (`with ESMTPS`, RFC 3848), `received-in-clear` (`with ESMTP`)
/// or `received-other`.
fn tls_postfix(certs: Option<&Certs>) -> Postfix {
    let mut options = Identity::ProxyV2.postfix_options();
    if let Some(certs) = certs {
        options.extra_main_cf.extend(certs.postfix_main_cf());
    }
    options.extra_main_cf.push((
        "header_checks".to_owned(),
        // A folded header: `.` stops at its line ends, [[:space:]] does not.
        "regexp:{ {/^Received: from .*[[:space:]]+by mx\\.example\\.test \\(Postfix\\) with ESMTPS id / WARN received-over-tls}, \
         {/^Received: from .*[[:space:]]+by mx\\.example\\.test \\(Postfix\\) with ESMTP id / WARN received-in-clear}, \
         {/^Received:/ WARN received-other} }"
            .to_owned(),
    ));
    Postfix::start(options).expect("start Postfix")
}

/// The agent on the host's loopback (kernel layer off) in front of
/// `postfix`, speaking STARTTLS to it and verifying its certificate
/// against `ca`.
fn tls_agent(dir: &AgentDir, postfix: &Postfix, ca: &Certs) -> (Agent, SocketAddr) {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let agent = Agent::start(dir, &Launch::here(), || {
        listen.set_port(free_port().expect("a free port"));
        let backend = format!(
            "identity = \"proxy-v2\"\nstarttls = true\ntls_ca = \"{}\"",
            ca.ca().display()
        );
        dir.write_config(&postfix_config(
            listen,
            postfix.addr(),
            &backend,
            "[kernel]\nmode = \"off\"",
        ));
    });
    (agent, listen)
}

/// A session from [`CLIENT`] that asks for a backend (MAIL FROM) when the
/// backend cannot be had over TLS: a 4xx (421, so the client retries
/// later) and the end of the connection, never a 250.
#[track_caller]
fn mail_gets_a_4xx_and_the_end(proxy: SocketAddr) {
    let stream = connect_local(CLIENT.parse().unwrap(), proxy, Duration::from_secs(5))
        .expect("connect to the agent");
    let (mut c, greeting) = Client::from_stream(stream).expect("greeting");
    expect(&greeting, "220 ");
    expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
    let reply = c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL");
    expect(&reply, "421 4.");
    c.expect_closed();
}

/// `proxy.backend_errors` of `stats --json`.
#[track_caller]
fn backend_errors(agent: &Agent) -> u64 {
    agent.json(&["stats"])["proxy"]["backend_errors"]
        .as_u64()
        .expect("proxy.backend_errors in stats --json")
}

#[test]
fn backend_tls_verified_against_tls_ca_delivers_over_tls() {
    if !ready("backend_tls_verified_against_tls_ca_delivers_over_tls") {
        return;
    }
    let ca = Certs::ca_signed("backend-ca").expect("a CA and a certificate");
    let postfix = tls_postfix(Some(&ca));
    let dir = AgentDir::new("backend-tls");
    let (agent, proxy) = tls_agent(&dir, &postfix, &ca);
    swaks_to_alice(proxy, CLIENT, &[]).expect_success();
    postfix.expect_delivered(1);
    let log = postfix.log();
    // The message's session at Postfix was TLS (from the client's address,
    // carried in the PROXY header before STARTTLS) …
    assert_eq!(
        log_lines(&log, "TLS connection established from unknown[127.0.0.2]").len(),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, "client=unknown[127.0.0.2]").len(),
        1,
        "{log}"
    );
    // … and Postfix's Received header says so.
    assert_eq!(log_lines(&log, "received-over-tls").len(), 1, "{log}");
    assert_eq!(log_lines(&log, "received-in-clear").len(), 0, "{log}");
    assert_eq!(log_lines(&log, "received-other").len(), 0, "{log}");
    assert_eq!(backend_errors(&agent), 0);
    // The agent's line for the message names Postfix's queue id, inside
    // the session's span (its id and the client's address and port).
    let queue_id = log_lines(&log, "client=unknown[127.0.0.2]")[0]
        .split(": client=")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .expect("a queue id before client=")
        .to_owned();
    let agent_log = agent.log();
    let ends = log_lines(&agent_log, "message end");
    assert_eq!(ends.len(), 1, "{agent_log}");
    let end = &ends[0];
    assert!(
        end.contains("session{id=") && end.contains("client=127.0.0.2:"),
        "{end}"
    );
    assert!(
        end.contains(&format!("queue_id=\"{queue_id}\"")),
        "queue id {queue_id}: {end}"
    );
    assert!(end.contains("delivered"), "{end}");
    agent.stop();
}

#[test]
fn backend_certificate_from_another_ca_is_refused() {
    if !ready("backend_certificate_from_another_ca_is_refused") {
        return;
    }
    let postfix_ca = Certs::ca_signed("postfix-ca").expect("a CA and a certificate");
    let other_ca = Certs::ca_signed("other-ca").expect("another CA");
    let postfix = tls_postfix(Some(&postfix_ca));
    let dir = AgentDir::new("backend-other-ca");
    let (agent, proxy) = tls_agent(&dir, &postfix, &other_ca);
    mail_gets_a_4xx_and_the_end(proxy);
    // Counted and logged by the agent, naming the certificate.
    assert_eq!(backend_errors(&agent), 1, "{}", agent.log());
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("backend failed") && l.to_lowercase().contains("certificate")),
        "no backend failure naming the certificate in the agent's log:\n{log}"
    );
    // Postfix: the fixture's check, the agent's capability probe and the
    // client's session, each ended in the TLS handshake: no MAIL, nothing
    // queued.
    let sessions = postfix.expect_disconnects(3);
    postfix.expect_delivered(0);
    let plog = postfix.log();
    assert!(
        sessions.iter().all(|l| !l.contains(" mail=")),
        "a MAIL reached Postfix:\n{plog}"
    );
    assert!(log_lines(&plog, "client=").is_empty(), "{plog}");
    agent.stop();
}

#[test]
fn backend_without_starttls_when_tls_is_required_is_refused() {
    if !ready("backend_without_starttls_when_tls_is_required_is_refused") {
        return;
    }
    let ca = Certs::ca_signed("no-starttls-ca").expect("a CA and a certificate");
    // No certificate: Postfix offers no STARTTLS.
    let postfix = tls_postfix(None);
    let dir = AgentDir::new("backend-no-starttls");
    let (agent, proxy) = tls_agent(&dir, &postfix, &ca);
    mail_gets_a_4xx_and_the_end(proxy);
    assert_eq!(backend_errors(&agent), 1, "{}", agent.log());
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("backend failed") && l.contains("STARTTLS")),
        "no backend failure naming STARTTLS in the agent's log:\n{log}"
    );
    // The agent asked (EHLO) and went no further: no STARTTLS, no MAIL.
    let sessions = postfix.expect_disconnects(3);
    postfix.expect_delivered(0);
    let plog = postfix.log();
    assert!(
        sessions
            .iter()
            .skip(1)
            .all(|l| l.contains(" ehlo=1 ") && !l.contains(" mail=") && !l.contains("starttls")),
        "{plog}"
    );
    agent.stop();
}

// -- IPv6 clients ----------------------------------------------------------------

/// The agent (kernel layer off) listening on port 25 of the server's IPv6
/// address, in front of a Postfix that takes the client's identity by
/// `identity`; `extra` TOML tables after the fixed ones. Postfix is told
/// to speak IPv6 too (`inet_protocols = all`: it still listens on
/// 127.0.0.1 only), as it refuses an IPv6 client address otherwise.
fn ipv6_rig(tag: &str, identity: Identity, extra: &str) -> NetRig {
    let mut postfix = identity.postfix_options();
    postfix
        .extra_main_cf
        .push(("inet_protocols".to_owned(), "all".to_owned()));
    NetRig::start("v6", tag, postfix, |parts: &RigParts| {
        parts.config(
            SocketAddr::new(parts.link.server_v6.into(), 25),
            &format!("identity = \"{}\"", identity.name()),
            &format!("[kernel]\nmode = \"off\"\n{extra}"),
        )
    })
}

fn v6_listen(rig: &NetRig) -> SocketAddr {
    SocketAddr::new(rig.link.server_v6.into(), 25)
}

/// One message to alice over `c` (after the greeting), ending with QUIT.
#[track_caller]
fn send_one_message(c: &mut Client) {
    expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
    for (line, want) in [
        ("MAIL FROM:<sender@example.org>", "250 "),
        ("RCPT TO:<alice@example.com>", "250 "),
        ("DATA", "354 "),
        ("Subject: from IPv6\r\n\r\nHello.\r\n.", "250 "),
        ("QUIT", "221 "),
    ] {
        expect(&c.cmd(line).expect(line), want);
    }
}

/// A message from the first client address (IPv6) through the agent with
/// `identity`: delivered once, and Postfix names the IPv6 client (the
/// session's connect with PROXY v2, the session after XCLIENT).
fn ipv6_address_reaches_postfix(tag: &str, identity: Identity) {
    let rig = ipv6_rig(tag, identity, "");
    let source = IpAddr::V6(rig.link.client_v6s[0]);
    let (mut c, greeting) = rig.session(source, v6_listen(&rig));
    expect(&greeting, "220 ");
    send_one_message(&mut c);
    // The readiness check, the agent's capability probe, the session.
    let sessions = rig.postfix.expect_disconnects(3);
    rig.postfix.expect_delivered(1);
    let log = rig.postfix.log();
    let named = format!("unknown[{source}]");
    assert_eq!(
        log_lines(&log, &format!("client={named}")).len(),
        1,
        "Postfix did not get the IPv6 client's address:\n{log}"
    );
    assert!(
        sessions[2].contains(&format!("disconnect from {named}"))
            && sessions[2].contains(" mail=1 ")
            && sessions[2].contains(" data=1 "),
        "{log}"
    );
    let connects = log_lines(&log, &format!("]: connect from {named}")).len();
    match identity {
        // The PROXY header names the client before Postfix says a word.
        Identity::ProxyV2 => assert_eq!(connects, 1, "{log}"),
        // XCLIENT changes the session after the relay's own connect.
        Identity::Xclient => {
            assert_eq!(connects, 0, "{log}");
            assert!(sessions[2].contains(" xclient="), "{log}");
        }
        other => unreachable!("{other:?}"),
    }
}

#[test]
fn ipv6_client_address_reaches_postfix_through_proxy_v2() {
    if ready("ipv6_client_address_reaches_postfix_through_proxy_v2") {
        ipv6_address_reaches_postfix("v6p", Identity::ProxyV2);
    }
}

#[test]
fn ipv6_client_address_reaches_postfix_through_xclient() {
    if ready("ipv6_client_address_reaches_postfix_through_xclient") {
        ipv6_address_reaches_postfix("v6x", Identity::Xclient);
    }
}

/// `limits.ipv6_prefix = 64`: two addresses of one /64 are one source for
/// the connection cap and for the failed recipients counted across
/// sessions (whose block then covers the /64); an address of another /64
/// is another source.
#[test]
fn ipv6_sources_share_the_limits_of_their_64() {
    if !ready("ipv6_sources_share_the_limits_of_their_64") {
        return;
    }
    let rig = ipv6_rig(
        "v64",
        Identity::ProxyV2,
        "[limits]\nipv6_prefix = 64\nmax_connections_per_source = 1\nmax_failed_rcpt = 10\n\
         max_failed_rcpt_per_source = 3\nfailed_rcpt_window = \"1h\"\n",
    );
    let listen = v6_listen(&rig);
    // Another /64 beside the link's: fd00:199:N:1::/64 (nodad, so usable
    // at once).
    let n = u16::from(rig.link.subnet);
    let far_server = Ipv6Addr::new(0xfd00, 0x199, n, 1, 0, 0, 0, 1);
    let far = Ipv6Addr::new(0xfd00, 0x199, n, 1, 0, 0, 0, 2);
    rig.server
        .ip(&[
            "addr",
            "add",
            &format!("{far_server}/64"),
            "dev",
            &rig.link.server_if,
            "nodad",
        ])
        .expect("another /64 on the server");
    rig.client
        .ip(&[
            "addr",
            "add",
            &format!("{far}/64"),
            "dev",
            &rig.link.client_if,
            "nodad",
        ])
        .expect("another /64 on the client");
    let [a, b, c] = [0, 1, 2].map(|i| IpAddr::V6(rig.link.client_v6s[i]));
    let far = IpAddr::V6(far);

    // The connection cap: while a holds its one connection, b (same /64)
    // is refused at once; far (another /64) is served.
    let (mut first, greeting) = rig.session(a, listen);
    expect(&greeting, "220 ");
    expect(&first.cmd("EHLO a.example.org").expect("EHLO"), "250");
    let (mut second, greeting) = rig.session(b, listen);
    expect(&greeting, "421 4.");
    second.expect_closed();
    let (mut other, greeting) = rig.session(far, listen);
    expect(&greeting, "220 ");
    expect(&other.cmd("QUIT").expect("QUIT"), "221 ");

    // Failed recipients across sessions: a fails twice and leaves …
    expect(
        &first.cmd("MAIL FROM:<h@harvester.test>").expect("MAIL"),
        "250 ",
    );
    for user in ["nobody1", "nobody2"] {
        let reply = first
            .cmd(&format!("RCPT TO:<{user}@example.com>"))
            .expect("RCPT");
        expect(&reply, "550 5.1.1 ");
    }
    expect(&first.cmd("QUIT").expect("QUIT"), "221 ");
    // … then b (once a's connection is gone from the count: it may take
    // the proxy a moment to see the end) fails once more, the third of
    // the /64, and the fourth cuts it off.
    let mut harvester = None;
    let served = wait_until(Duration::from_secs(15), || {
        let (c, greeting) = rig.session(b, listen);
        if greeting.starts_with("220 ") {
            harvester = Some(c);
        }
        harvester.is_some()
    });
    assert!(served, "b still refused after a left:\n{}", rig.agent.log());
    let mut harvester = harvester.unwrap();
    expect(&harvester.cmd("EHLO b.example.org").expect("EHLO"), "250");
    expect(
        &harvester.cmd("MAIL FROM:<h@harvester.test>").expect("MAIL"),
        "250 ",
    );
    expect(
        &harvester
            .cmd("RCPT TO:<nobody3@example.com>")
            .expect("RCPT"),
        "550 5.1.1 ",
    );
    expect(
        &harvester
            .cmd("RCPT TO:<nobody4@example.com>")
            .expect("RCPT"),
        "421 4.7.0 ",
    );
    harvester.expect_closed();

    // The block covers the /64: c, which never connected, is refused; far
    // is served and delivers.
    let net = ipnet::Ipv6Net::new(rig.link.client_v6s[0], 64)
        .expect("a /64")
        .trunc()
        .to_string();
    let block = rig
        .agent
        .block(&net)
        .unwrap_or_else(|| panic!("{net} not blocked: {}", rig.agent.json(&["block", "list"])));
    assert_eq!(block["reason"], "harvest", "{block}");
    let (mut refused, greeting) = rig.session(c, listen);
    expect(&greeting, "421 4.7.0 ");
    match refused.next_event() {
        Seen::Closed | Seen::Reset => {}
        other => panic!("a blocked /64's client after the 421: {other:?}"),
    }
    let (mut other, greeting) = rig.session(far, listen);
    expect(&greeting, "220 ");
    send_one_message(&mut other);
    // Postfix: the readiness check, the probe, a's and b's sessions (their
    // RCPTs answered by Postfix itself) and far's message.
    rig.postfix.expect_disconnects(5);
    rig.postfix.expect_delivered(1);
    let log = rig.postfix.log();
    assert_eq!(
        log_lines(&log, &format!("client=unknown[{far}]")).len(),
        1,
        "{log}"
    );
    // Each recipient was asked once: the fourth too (Postfix's 550 is the
    // failure that tips the /64 over; the client got the 421 instead).
    for user in ["nobody1", "nobody2", "nobody3", "nobody4"] {
        assert_eq!(
            log_lines(&log, &format!("<{user}@example.com>")).len(),
            1,
            "{user}: {log}"
        );
    }
}
