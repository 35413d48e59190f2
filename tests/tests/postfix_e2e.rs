//! End to end with a real Postfix behind the proxy and real SMTP clients in
//! front of it: swaks, Python's smtplib, and raw lines where the exact bytes
//! matter.
//!
//! Each test starts its own private Postfix ([`Postfix`]: virtual domain
//! example.com with alice, bob, carol and postmaster, every message handed
//! to `discard`, clients logged as `unknown[ADDR]`) and its own proxy
//! ([`TestProxy`], kernel layer off) relaying to it. Clients connect to the
//! proxy on 127.0.0.1 but bind their own end to 127.0.0.2 or 127.0.0.3
//! (Linux accepts any 127/8 source on loopback), while the proxy reaches
//! Postfix from 127.0.0.1: so Postfix's log shows whether the real client's
//! address got through.
//!
//! Needs root and Postfix (see [`postfix::missing_prerequisite`]), plus
//! `swaks`, `python3` and `openssl` (`cargo xtask setup` installs them).
//! Without them every test is skipped with a message; under `CI=true` it
//! fails instead.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use limiter_tests::{
    certs::Certs,
    clients::{self, expect, line, python, swaks, swaks_to_alice},
    fixture,
    postfix::{log_lines, PostfixOptions},
    proxy::Client,
    rig::{Identity, Rig, RigOptions, PLAIN_LISTENER},
    tcp::Relay,
};

/// The source address of "the" client (the proxy is reached on 127.0.0.1).
const CLIENT: &str = "127.0.0.2";
/// Another client, unaffected by what the first one did.
const OTHER_CLIENT: &str = "127.0.0.3";

// -- Prerequisites ---------------------------------------------------------

/// Whether this test can run: root, Postfix, swaks, python3, openssl.
/// Outside CI a missing piece skips the test with a message; under
/// `CI=true` it fails it.
fn ready(test: &str) -> bool {
    fixture::require(test, clients::missing_prerequisite())
}

/// [`Rig::launch`] with a Postfix of `options`, the `listen` tables and the
/// `extra` ones.
fn rig_with(identity: Identity, options: PostfixOptions, listen: &str, extra: &str) -> Rig {
    Rig::launch(RigOptions {
        postfix: options,
        listen: listen.to_owned(),
        extra: extra.to_owned(),
        ..RigOptions::new(identity)
    })
}

/// The `disconnect from` line of the one session of the test.
#[track_caller]
fn the_session(rig: &Rig) -> String {
    rig.expect_sessions(1).remove(0)
}

// -- 1. Valid mail, and who Postfix sees -----------------------------------

/// Postfix logs, at RCPT time, the HELO name it holds for the session.
fn helo_logging() -> (String, String) {
    (
        "smtpd_helo_restrictions".to_owned(),
        "check_helo_access static:{INFO helo-seen}".to_owned(),
    )
}

/// One message to alice from 127.0.0.2 through the proxy with `identity`:
/// delivered once, and Postfix names the client as `expect_client`.
fn delivers_once_and_shows(identity: Identity, expect_client: &str) -> Rig {
    let mut options = identity.postfix_options();
    options.extra_main_cf.push(helo_logging());
    let rig = rig_with(identity, options, PLAIN_LISTENER, "");
    swaks_to_alice(rig.addr(), CLIENT, &["--helo", "client.helo.test"]).expect_success();
    rig.expect_delivered(1);
    let log = rig.log();
    let clients = log_lines(&log, " client=");
    assert_eq!(clients.len(), 1, "one message, one client= line:\n{log}");
    assert!(
        clients[0].contains(&format!(" client=unknown[{expect_client}]")),
        "Postfix saw the wrong client:\n{log}"
    );
    // The client's own HELO name reached Postfix, and nothing else did.
    let helos = log_lines(&log, ": helo-seen;");
    assert_eq!(helos.len(), 1, "{log}");
    assert!(
        helos[0].contains(&format!("RCPT from unknown[{expect_client}]"))
            && helos[0].contains(" helo=<client.helo.test>")
            && helos[0].contains(" proto=ESMTP"),
        "{log}"
    );
    rig
}

#[test]
fn proxy_v2_delivers_once_and_passes_the_client_address() {
    if !ready("proxy_v2_delivers_once_and_passes_the_client_address") {
        return;
    }
    let rig = delivers_once_and_shows(Identity::ProxyV2, CLIENT);
    let log = rig.log();
    // Postfix took the address from the PROXY header: the only
    // connections it logs from 127.0.0.1 are the fixture's readiness check
    // and the proxy's capability probe.
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.2]").len(),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.1]").len(),
        2,
        "{log}"
    );
}

#[test]
fn proxy_v1_delivers_once_and_passes_the_client_address() {
    if !ready("proxy_v1_delivers_once_and_passes_the_client_address") {
        return;
    }
    let rig = delivers_once_and_shows(Identity::ProxyV1, CLIENT);
    let log = rig.log();
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.2]").len(),
        1,
        "{log}"
    );
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.1]").len(),
        2,
        "{log}"
    );
}

#[test]
fn xclient_delivers_once_and_passes_the_client_address_and_helo() {
    if !ready("xclient_delivers_once_and_passes_the_client_address_and_helo") {
        return;
    }
    let rig = delivers_once_and_shows(Identity::Xclient, CLIENT);
    let log = rig.log();
    // The proxy itself connects from 127.0.0.1 (after the fixture's
    // readiness check and the proxy's capability probe), then XCLIENT makes
    // the session 127.0.0.2's, HELO and all.
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.1]").len(),
        3,
        "{log}"
    );
    let disconnect = the_session(&rig);
    assert!(
        disconnect.contains("disconnect from unknown[127.0.0.2]")
            && disconnect.contains(" xclient=")
            && disconnect.contains(" mail=1 ")
            && disconnect.contains(" data=1 "),
        "{log}"
    );
}

/// A second message from a recent sender goes through the backend
/// connection opened at accept (`backend.early_connect`), and Postfix sees
/// the same client, HELO name and transaction as for the first.
fn a_recent_senders_next_message_is_the_same_to_postfix(identity: Identity) {
    let mut options = identity.postfix_options();
    options.extra_main_cf.push(helo_logging());
    let rig = rig_with(identity, options, PLAIN_LISTENER, "");
    for _ in 0..2 {
        swaks_to_alice(rig.addr(), CLIENT, &["--helo", "client.helo.test"]).expect_success();
    }
    rig.expect_delivered(2);
    assert_eq!(rig.proxy.ctx.stats.early_links(), vec![("used", 1)]);
    let sessions = rig.expect_sessions(2);
    let log = rig.log();
    for session in &sessions {
        assert!(
            session.contains(&format!("disconnect from unknown[{CLIENT}]"))
                && session.contains(" mail=1 rcpt=1 data=1 "),
            "{log}"
        );
    }
    let helos = log_lines(&log, ": helo-seen;");
    assert_eq!(helos.len(), 2, "{log}");
    for helo in helos {
        assert!(
            helo.contains(&format!("RCPT from unknown[{CLIENT}]"))
                && helo.contains(" helo=<client.helo.test>"),
            "{log}"
        );
    }
}

#[test]
fn a_recent_senders_next_message_is_the_same_to_postfix_with_proxy_v2() {
    if !ready("a_recent_senders_next_message_is_the_same_to_postfix_with_proxy_v2") {
        return;
    }
    a_recent_senders_next_message_is_the_same_to_postfix(Identity::ProxyV2);
}

#[test]
fn a_recent_senders_next_message_is_the_same_to_postfix_with_xclient() {
    if !ready("a_recent_senders_next_message_is_the_same_to_postfix_with_xclient") {
        return;
    }
    a_recent_senders_next_message_is_the_same_to_postfix(Identity::Xclient);
}

#[test]
fn identity_none_delivers_once_and_postfix_sees_the_proxy() {
    if !ready("identity_none_delivers_once_and_postfix_sees_the_proxy") {
        return;
    }
    let rig = delivers_once_and_shows(Identity::None, "127.0.0.1");
    let log = rig.log();
    assert!(!log.contains("127.0.0.2"), "{log}");
}

// -- 2. Unknown recipients and harvesting ----------------------------------

#[test]
fn unknown_recipient_gets_postfix_reply_unchanged() {
    if !ready("unknown_recipient_gets_postfix_reply_unchanged") {
        return;
    }
    // Without identity, so that Postfix can be asked directly too.
    let rig = Rig::start(Identity::None, "[relay]\naccept = \"*@example.com\"\n");
    let ask = |addr: SocketAddr| {
        let (mut c, greeting) = Client::connect(addr).expect("connect");
        expect(&greeting, "220 ");
        expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
        expect(
            &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
            "250 ",
        );
        let reply = c.cmd("RCPT TO:<nobody@example.com>").expect("RCPT");
        let _ = c.cmd("QUIT");
        reply
    };
    let direct = ask(rig.postfix.addr());
    let proxied = ask(rig.addr());
    expect(
        &direct,
        "550 5.1.1 <nobody@example.com>: Recipient address rejected:",
    );
    assert_eq!(proxied, direct);

    // And with a real client.
    let run = swaks(
        rig.addr(),
        CLIENT,
        &[
            "--to",
            "nobody@example.com",
            "--from",
            "sender@example.org",
            "--quit-after",
            "RCPT",
        ],
    );
    assert_ne!(run.code, Some(0), "{}", run.out);
    run.expect_reply(&format!("<** {direct}"));
    rig.expect_delivered(0);
}

#[test]
fn harvesting_is_cut_off_and_the_source_blocked() {
    if !ready("harvesting_is_cut_off_and_the_source_blocked") {
        return;
    }
    let rig = Rig::start(
        Identity::ProxyV2,
        "[limits]\nmax_failed_rcpt = 3\n\n[relay]\naccept = \"*@example.com\"\n",
    );
    let lines = python(
        rig.addr(),
        r#"
s = session("127.0.0.2", "harvester.test")
out("EHLO", s.ehlo()[0])
out("MAIL", *s.mail("sender@example.org"))
for i in range(1, 6):
    try:
        code, msg = s.rcpt("user%d@example.com" % i)
    except smtplib.SMTPServerDisconnected as e:
        out("RCPT%d disconnected" % i)
        break
    out("RCPT%d %d %s" % (i, code, msg.decode()))
    if code == 421:
        out("CLOSED", closed(s))
        break
reply, after = greeting("127.0.0.2")
out("AGAIN", reply)
out("AGAIN-AFTER", after)
"#,
    );
    for i in 1..=3 {
        expect(
            line(&lines, &format!("RCPT{i}")),
            &format!("550 5.1.1 <user{i}@example.com>: Recipient address rejected"),
        );
    }
    expect(line(&lines, "RCPT4"), "421 4.7.0 ");
    assert_eq!(line(&lines, "CLOSED"), "eof", "{lines:#?}");
    assert!(!lines.iter().any(|l| l.starts_with("RCPT5")), "{lines:#?}");
    // The source is blocked: greeted with 421 and let go.
    expect(line(&lines, "AGAIN"), "421 4.7.0 ");
    assert!(line(&lines, "AGAIN").contains("127.0.0.2"), "{lines:#?}");
    assert_eq!(line(&lines, "AGAIN-AFTER"), "eof", "{lines:#?}");
    // Postfix never saw the blocked connection (probe + one session).
    rig.expect_sessions(1);
    let log = rig.log();
    assert_eq!(
        log_lines(&log, "]: connect from unknown[127.0.0.2]").len(),
        1,
        "{log}"
    );
    assert!(!log.contains("user5@"), "{log}");

    // Another address is not affected.
    swaks_to_alice(rig.addr(), OTHER_CLIENT, &[]).expect_success();
    rig.expect_delivered(1);
    assert!(rig.log().contains("client=unknown[127.0.0.3]"));
}

// -- 3. Relaying ------------------------------------------------------------

#[test]
fn relaying_is_refused_by_the_proxy() {
    if !ready("relaying_is_refused_by_the_proxy") {
        return;
    }
    let rig = Rig::start(Identity::ProxyV2, "[relay]\naccept = \"*@example.com\"\n");
    let run = swaks(
        rig.addr(),
        CLIENT,
        &[
            "--to",
            "x@elsewhere.test",
            "--from",
            "sender@example.org",
            "--quit-after",
            "RCPT",
        ],
    );
    assert_ne!(run.code, Some(0), "{}", run.out);
    run.expect_reply("<** 550 5.7.1 ");
    // The session has reached Postfix (EHLO, MAIL, QUIT) and ended there,
    // without the recipient.
    let disconnect = the_session(&rig);
    let log = rig.log();
    assert!(
        disconnect.contains(" mail=1 ") && !disconnect.contains("rcpt="),
        "{log}"
    );
    assert!(!log.contains("elsewhere.test"), "{log}");
    rig.expect_delivered(0);
}

// -- 4. HELO ----------------------------------------------------------------

#[test]
fn rejected_helo_gets_550_and_never_reaches_postfix() {
    if !ready("rejected_helo_gets_550_and_never_reaches_postfix") {
        return;
    }
    let rig = Rig::start(
        Identity::ProxyV2,
        "[lists]\nreject_helo = [\"*.dynamic.example\"]\n",
    );
    let run = swaks_to_alice(rig.addr(), CLIENT, &["--helo", "host-1.dynamic.example"]);
    assert_ne!(run.code, Some(0), "{}", run.out);
    run.expect_reply("<** 550 5.7.1 ");
    assert!(!run.out.contains("MAIL FROM"), "{}", run.out);

    // The session goes on: nothing without an accepted HELO, then a
    // good name gets through.
    let (mut c, greeting) = Client::connect(rig.addr()).expect("connect");
    expect(&greeting, "220 ");
    expect(
        &c.cmd("EHLO host-2.dynamic.example").expect("EHLO"),
        "550 5.7.1 ",
    );
    expect(
        &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
        "503 ",
    );
    expect(&c.cmd("EHLO mail.static.example").expect("EHLO"), "250");
    expect(
        &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
        "250 ",
    );
    expect(&c.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
    expect(&c.cmd("DATA").expect("DATA"), "354 ");
    expect(
        &c.cmd("Subject: after a refused HELO\r\n\r\nHello.\r\n.")
            .expect("end of data"),
        "250 ",
    );
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");
    rig.expect_delivered(1);
    // Postfix saw only the accepted EHLO of that session, and never the
    // swaks session, which earned no backend connection: had it opened
    // one, Postfix would have taken it before the later session's and
    // logged it before that session's end (no waiting for nothing).
    let disconnect = the_session(&rig);
    let log = rig.log();
    assert!(
        disconnect.contains(" ehlo=1 ") && disconnect.contains(" data=1 "),
        "{log}"
    );
    assert!(!log.contains("dynamic.example"), "{log}");
    assert!(!log.contains("[127.0.0.2]"), "{log}");
}

#[test]
fn helo_connection_limit() {
    if !ready("helo_connection_limit") {
        return;
    }
    let rig = Rig::start(
        Identity::ProxyV2,
        "[[limits.helo]]\npattern = \"*.bounce.test\"\nmax_connections = 1\n",
    );
    let lines = python(
        rig.addr(),
        r#"
first = session("127.0.0.2", "mx1.bounce.test")
out("FIRST", first.ehlo()[0])
second = session("127.0.0.3", "mx1.bounce.test")
code, msg = second.ehlo()
out("SECOND", code, msg.decode())
out("SECOND-CLOSED", closed(second))
other = session("127.0.0.3", "mx.other.test")
out("OTHER", other.ehlo()[0])
other.quit()
# The first session is not disturbed: it sends a message.
first.sendmail("sender@example.org", ["alice@example.com"], MESSAGE)
out("FIRST-SENT", "ok")
first.quit()
# Once it has ended, its place is free again (the proxy frees it when it
# sees the end: generous, for a loaded CI machine).
deadline = time.time() + 15
while True:
    again = session("127.0.0.3", "mx1.bounce.test")
    code = again.ehlo()[0]
    if code == 250 or time.time() > deadline:
        break
    again.close()
    time.sleep(0.05)
out("AGAIN", code)
again.sendmail("sender@example.org", ["alice@example.com"], MESSAGE)
out("AGAIN-SENT", "ok")
again.quit()
"#,
    );
    assert_eq!(line(&lines, "FIRST"), "250", "{lines:#?}");
    expect(line(&lines, "SECOND"), "421 4.7.0 ");
    assert_eq!(line(&lines, "SECOND-CLOSED"), "eof", "{lines:#?}");
    assert_eq!(line(&lines, "OTHER"), "250", "{lines:#?}");
    assert_eq!(line(&lines, "FIRST-SENT"), "ok");
    assert_eq!(line(&lines, "AGAIN"), "250", "{lines:#?}");
    assert_eq!(line(&lines, "AGAIN-SENT"), "ok");
    rig.expect_delivered(2);
}

// -- 5. Null sender ---------------------------------------------------------

#[test]
fn null_sender_rate() {
    if !ready("null_sender_rate") {
        return;
    }
    let rig = Rig::start(Identity::ProxyV2, "[limits]\nnull_sender_rate = \"2/1m\"\n");
    for n in 1..=2 {
        let run = swaks_to_alice(rig.addr(), CLIENT, &["--from", "<>"]);
        run.expect_success();
        run.expect_reply("-> MAIL FROM:<>");
        rig.expect_delivered(n);
    }
    let run = swaks_to_alice(rig.addr(), CLIENT, &["--from", "<>"]);
    assert_ne!(run.code, Some(0), "{}", run.out);
    run.expect_reply("<** 450 4.7.1 ");
    rig.expect_delivered(2);
    // Mail with a sender is not affected.
    swaks_to_alice(rig.addr(), CLIENT, &[]).expect_success();
    rig.expect_delivered(3);
    let log = rig.log();
    assert_eq!(log_lines(&log, "from=<>,").len(), 2, "{log}");
}

// -- 6. TLS -----------------------------------------------------------------

#[test]
fn starttls_delivers() {
    if !ready("starttls_delivers") {
        return;
    }
    let tls = Certs::self_signed("postfix-e2e").expect("a certificate");
    let rig = rig_with(
        Identity::ProxyV2,
        Identity::ProxyV2.postfix_options(),
        "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n",
        &tls.toml(),
    );
    let run = swaks_to_alice(rig.addr(), CLIENT, &["-tls"]);
    run.expect_success();
    run.expect_reply("<-  220 2.0.0 ");
    // The envelope went inside TLS.
    run.expect_reply(" ~> MAIL FROM:<sender@example.org>");
    run.expect_reply(" ~> RCPT TO:<alice@example.com>");
    rig.expect_delivered(1);
    assert!(rig.log().contains("client=unknown[127.0.0.2]"));
}

#[test]
fn implicit_tls_delivers() {
    if !ready("implicit_tls_delivers") {
        return;
    }
    let tls = Certs::self_signed("postfix-e2e").expect("a certificate");
    // TestProxy exposes only the first listener: here the implicit one.
    let rig = rig_with(
        Identity::ProxyV2,
        Identity::ProxyV2.postfix_options(),
        "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n",
        &tls.toml(),
    );
    let run = swaks_to_alice(rig.addr(), CLIENT, &["--tls-on-connect"]);
    run.expect_success();
    run.expect_reply("<~  220 ");
    run.expect_reply(" ~> MAIL FROM:<sender@example.org>");
    assert!(!run.out.contains("STARTTLS"), "{}", run.out);
    rig.expect_delivered(1);
    // A plain client on the implicit port is not spoken SMTP to: its
    // EHLO is not a TLS handshake, and the proxy ends the connection
    // (perhaps after a TLS alert) without an SMTP reply. A silent server
    // (a read timeout) fails the check.
    let mut plain = TcpStream::connect(rig.addr()).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::io::Write::write_all(&mut plain, b"EHLO plain.client.test\r\n").expect("send");
    let mut got = Vec::new();
    let end = std::io::Read::read_to_end(&mut plain, &mut got);
    assert!(
        end.is_ok() || matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the proxy did not end the plain connection: {end:?} after {got:?}"
    );
    assert!(
        !got.first().is_some_and(u8::is_ascii_digit),
        "an SMTP reply on the implicit-TLS port: {:?}",
        String::from_utf8_lossy(&got)
    );
}

// -- 7. PIPELINING ----------------------------------------------------------

#[test]
fn pipelining_delivers_exactly_once() {
    if !ready("pipelining_delivers_exactly_once") {
        return;
    }
    let rig = Rig::start(Identity::ProxyV2, "");
    // Between swaks and the proxy: records what swaks sends, a chunk a read.
    let recorder = Relay::recording(rig.addr()).expect("the recording relay");
    let run = swaks_to_alice(recorder.addr(), CLIENT, &["--pipeline"]);
    run.expect_success();
    run.expect_reply("PIPELINING");
    // swaks did pipeline: the proxy got the envelope and DATA in one read
    // (recorded before it went on, so before swaks had the replies).
    let chunks = recorder.session_with("MAIL FROM:<sender@example.org>");
    assert!(
        chunks
            .iter()
            .any(|c| c.contains("MAIL FROM:<sender@example.org>")
                && c.contains("RCPT TO:<alice@example.com>")
                && c.contains("\r\nDATA\r\n")),
        "no chunk with MAIL, RCPT and DATA together: the client did not pipeline: {chunks:#?}"
    );
    rig.expect_delivered(1);
    let disconnect = the_session(&rig);
    assert!(
        disconnect.contains(" mail=1 ")
            && disconnect.contains(" rcpt=1 ")
            && disconnect.contains(" data=1 "),
        "{}",
        rig.log()
    );
}

// -- 8. Backend down --------------------------------------------------------

#[test]
fn backend_down_gets_421() {
    if !ready("backend_down_gets_421") {
        return;
    }
    let Rig { proxy, postfix, .. } = Rig::start(Identity::ProxyV2, "");
    drop(postfix);
    let run = swaks_to_alice(proxy.addr, CLIENT, &[]);
    assert_ne!(run.code, Some(0), "{}", run.out);
    // The proxy greets and answers EHLO itself; the MAIL that needs the
    // backend gets 421 4.3.0, and nothing further is tried.
    run.expect_reply("421 4.3.0 ");
    assert!(run.out.contains("MAIL FROM"), "{}", run.out);
    assert!(!run.out.contains("RCPT TO"), "{}", run.out);
}

#[test]
fn backend_lost_mid_session_gets_421() {
    if !ready("backend_lost_mid_session_gets_421") {
        return;
    }
    let Rig { proxy, postfix, .. } = Rig::start(Identity::ProxyV2, "");
    let (mut c, greeting) = Client::connect(proxy.addr).expect("connect");
    expect(&greeting, "220 ");
    expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
    drop(postfix);
    let reply = c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL");
    expect(&reply, "421 4.3.0 ");
    c.expect_closed();
}

// -- 9. Dot-stuffing --------------------------------------------------------

#[test]
fn dot_stuffed_lines_arrive_intact() {
    if !ready("dot_stuffed_lines_arrive_intact") {
        return;
    }
    // Postfix discards the messages, but its body_checks see each body
    // line as stored (un-stuffed once): WARN logs what matched.
    let mut options = Identity::ProxyV2.postfix_options();
    options.extra_main_cf.push((
        "body_checks".to_owned(),
        "regexp:{ {/^\\.leading dot$$/ WARN body-one-dot}, \
         {/^\\.\\.two dots$$/ WARN body-two-dots}, \
         {/^\\.\\.leading dot$$/ WARN body-still-stuffed}, \
         {/^\\.\\.\\.two dots$$/ WARN body-still-stuffed}, \
         {/^leading dot$$/ WARN body-dot-lost}, \
         {/^\\.two dots$$/ WARN body-dot-lost}, \
         {/^last line$$/ WARN body-last-line} }"
            .to_owned(),
    ));
    let rig = rig_with(Identity::ProxyV2, options, PLAIN_LISTENER, "");
    let lines = python(
        rig.addr(),
        r#"
s = session("127.0.0.2", "client.example.org")
s.ehlo()
body = ("From: sender@example.org\r\nTo: alice@example.com\r\nSubject: dots\r\n\r\n"
        "first line\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n")
# smtplib dot-stuffs: the wire carries "..leading dot", "...two dots", "..".
out("MAIL", s.mail("sender@example.org")[0])
out("RCPT", s.rcpt("alice@example.com")[0])
code, msg = s.data(body)
out("DATA", code, msg.decode())
s.quit()
"#,
    );
    assert_eq!(line(&lines, "MAIL"), "250");
    assert_eq!(line(&lines, "RCPT"), "250");
    expect(line(&lines, "DATA"), "250 2.0.0 Ok: queued as ");
    rig.expect_delivered(1);
    let log = rig.log();
    for (tag, count) in [
        ("body-one-dot", 1),
        ("body-two-dots", 1),
        ("body-last-line", 1),
        ("body-still-stuffed", 0),
        ("body-dot-lost", 0),
    ] {
        assert_eq!(log_lines(&log, tag).len(), count, "{tag}:\n{log}");
    }
}

// -- 10. SMTP smuggling ------------------------------------------------------

#[test]
fn bare_lf_smuggling_is_refused() {
    if !ready("bare_lf_smuggling_is_refused") {
        return;
    }
    let rig = Rig::start(Identity::ProxyV2, "");
    let (mut c, greeting) = Client::connect(rig.addr()).expect("connect");
    expect(&greeting, "220 ");
    expect(&c.cmd("EHLO client.example.org").expect("EHLO"), "250");
    expect(
        &c.cmd("MAIL FROM:<sender@example.org>").expect("MAIL"),
        "250 ",
    );
    expect(&c.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
    expect(&c.cmd("DATA").expect("DATA"), "354 ");
    c.send(b"hello\n.\nMAIL FROM:<x@y>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n")
        .expect("send");
    expect(&c.reply().expect("reply to the bare LF"), "550 5.5.2 ");
    // The proxy hangs up; it may not have read all that was sent after the
    // bare LF, and closing with unread input is a reset: either is an end.
    let seen = c.next_event();
    assert!(
        seen.is_ended_by_peer(),
        "expected the proxy to hang up, saw {seen:?}"
    );

    // Postfix lost the connection in DATA, with one MAIL and one RCPT.
    // (Had anything been queued, cleanup would have logged it before
    // smtpd logged the disconnect: both go to postlogd in that order.)
    let disconnect = the_session(&rig);
    rig.expect_delivered(0);
    let log = rig.log();
    assert!(
        disconnect.contains(" mail=1 ") && disconnect.contains(" rcpt=1 "),
        "{log}"
    );
    assert!(!disconnect.contains("data=1"), "{log}");
    assert!(!log.contains("x@y") && !log.contains("bob@"), "{log}");
    // Nothing was queued: no message got as far as cleanup.
    assert!(
        !log.contains("message-id=") && !log.contains("status="),
        "{log}"
    );
}

// -- Extra: the backend connection replaced after an oversized message -------

/// A message over `smtp.max_message_size` costs the proxy its backend
/// connection (Postfix must not keep a truncated message); the next
/// message of the same session goes over a new one, which must carry the
/// client's identity and HELO again.
fn oversized_then_normal(identity: Identity) {
    let mut options = identity.postfix_options();
    options.extra_main_cf.push(helo_logging());
    let rig = rig_with(
        identity,
        options,
        PLAIN_LISTENER,
        "[smtp]\nmax_message_size = \"4KB\"\n",
    );
    let lines = python(
        rig.addr(),
        r#"
s = session("127.0.0.2", "client.helo.test")
s.ehlo()
# mail() without SIZE=, so that the limit is hit in DATA.
out("MAIL1", s.mail("sender@example.org")[0])
out("RCPT1", s.rcpt("alice@example.com")[0])
code, msg = s.data(MESSAGE + ("x" * 70 + "\r\n") * 100)
out("DATA1", code, msg.decode())
out("MAIL2", s.mail("sender@example.org")[0])
out("RCPT2", s.rcpt("bob@example.com")[0])
code, msg = s.data(MESSAGE)
out("DATA2", code, msg.decode())
s.quit()
"#,
    );
    assert_eq!(line(&lines, "MAIL1"), "250", "{lines:#?}");
    expect(line(&lines, "DATA1"), "552 5.3.4 ");
    assert_eq!(line(&lines, "MAIL2"), "250", "{lines:#?}");
    assert_eq!(line(&lines, "RCPT2"), "250", "{lines:#?}");
    expect(line(&lines, "DATA2"), "250 ");
    rig.expect_delivered(1);
    let log = rig.log();
    assert!(
        log.contains("to=<bob@example.com>") && !log.contains("to=<alice@example.com>, relay"),
        "{log}"
    );
    let clients = log_lines(&log, " client=");
    assert!(
        clients
            .iter()
            .all(|l| l.contains(" client=unknown[127.0.0.2]")),
        "{log}"
    );
    let helos = log_lines(&log, ": helo-seen;");
    assert!(
        helos.len() == 2
            && helos
                .iter()
                .all(|l| l.contains("RCPT from unknown[127.0.0.2]")
                    && l.contains(" helo=<client.helo.test>")),
        "{log}"
    );
}

#[test]
fn oversized_message_then_next_message_keeps_xclient_identity() {
    if !ready("oversized_message_then_next_message_keeps_xclient_identity") {
        return;
    }
    oversized_then_normal(Identity::Xclient);
}

#[test]
fn oversized_message_then_next_message_keeps_proxy_v2_identity() {
    if !ready("oversized_message_then_next_message_keeps_proxy_v2_identity") {
        return;
    }
    oversized_then_normal(Identity::ProxyV2);
}

/// `backend.starttls`: the proxy speaks TLS to Postfix (after the PROXY
/// header), and the client's address still reaches Postfix.
#[test]
fn starttls_to_the_backend_delivers() {
    if !ready("starttls_to_the_backend_delivers") {
        return;
    }
    let tls = Certs::self_signed("postfix-e2e").expect("a certificate");
    let mut options = RigOptions::new(Identity::ProxyV2);
    options.postfix.extra_main_cf.extend(tls.postfix_main_cf());
    options.backend = "starttls = true".to_owned();
    let rig = Rig::launch(options);
    swaks_to_alice(rig.addr(), CLIENT, &[]).expect_success();
    rig.expect_delivered(1);
    let log = rig.log();
    assert!(
        log.contains("TLS connection established from unknown[127.0.0.2]"),
        "log:\n{log}"
    );
    assert!(log.contains("client=unknown[127.0.0.2]"), "log:\n{log}");
}
