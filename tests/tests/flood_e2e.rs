//! Mail flows during a flood (issue 14), end to end against a real Postfix.
//!
//! A private Postfix with its default process limit (`default_process_limit`
//! = 100 smtpd processes) behind the proxy, which tells it the client with
//! PROXY v2. Polite zombies — more of them than Postfix has processes, each
//! within the per-source limit — connect, say EHLO and NOOP, and stay. With
//! the backend connection earned (`backend.connect = "on-mail"`, the
//! default) none of them reaches Postfix, and a legitimate sender beside
//! them delivers at once. With `"on-connect"` (the old behaviour) the same
//! zombies take every backend slot and the sender is turned away. Zombies
//! that earn a slot and then hold it (NOOPs in an open transaction, a
//! message trickled) lose it to the sender within seconds; a trickled
//! message goes on into the proxy's spool and still reaches the maildir
//! whole; zombies that fill the spool with trickled messages first make
//! room for the next ones, whose slots go all the same.
//!
//! Pipelining end to end, against the same Postfix with
//! `smtpd_forbid_unauth_pipelining = yes` (Postfix 3.9's default: a client
//! that talks before the greeting, or pipelines where RFC 2920 forbids it,
//! is dropped): a recording relay between the proxy and Postfix shows the
//! client's pipelined group reaching Postfix in one write, without the
//! commands the proxy refused; a HELO session (no PIPELINING) reaches it one
//! command at a time; and Postfix answers a client straight the way the
//! proxy answers a pipelined group after a refused MAIL.
//!
//! Needs root and Postfix ([`postfix::missing_prerequisite`]); without them
//! the tests are skipped with a message, and under `CI=true` they fail.

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use limiter_tests::{
    fixture,
    maildir::Maildir,
    postfix::{self, Postfix, PostfixOptions},
    proxy::TestProxy,
    tcp::{wait_until, Relay},
};
use limiter_user::proxy::shed::SHED_GRACE;

/// Zombies: more than Postfix's 100 smtpd processes.
const ZOMBIES: usize = 150;
/// Zombies per source address (within `max_connections_per_source` = 10).
const PER_SOURCE: usize = 3;
/// The legitimate sender's address.
const SENDER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// How long a reply or a delivery may take.
const WAIT: Duration = Duration::from_secs(10);

fn ready(test: &str) -> bool {
    fixture::require(test, postfix::missing_prerequisite())
}

/// The proxy in front of `postfix`, with `backend` keys and `extra` tables
/// added.
fn proxy(postfix: &Postfix, backend: &str, extra: &str) -> TestProxy {
    TestProxy::start(&format!(
        r#"mode = "enforce"

[[listen]]
address = "127.0.0.1:0"

[backend]
address = "{}"
identity = "proxy-v2"
connect_timeout = "2s"
{backend}

[kernel]
mode = "off"

{extra}
"#,
        postfix.addr()
    ))
}

/// A raw SMTP client bound to a source address of its own.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(addr: SocketAddr, source: IpAddr) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source, 0))?;
            socket.connect(addr).await?.into_std()
        })?;
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(WAIT))?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// The next whole reply, lines joined with '\n'.
    fn reply(&mut self) -> std::io::Result<String> {
        loop {
            let mut start = 0;
            let mut lines = Vec::new();
            while let Some(lf) = self.buf[start..].iter().position(|&b| b == b'\n') {
                let raw = &self.buf[start..start + lf];
                let line =
                    String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw)).into_owned();
                start += lf + 1;
                let last = line.len() < 4 || line.as_bytes()[3] == b' ';
                lines.push(line);
                if last {
                    self.buf.drain(..start);
                    return Ok(lines.join("\n"));
                }
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.stream.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }
}

#[track_caller]
fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected a reply starting with {prefix:?}, got {reply:?}"
    );
}

/// The zombie source addresses: 127.1.N.M, `PER_SOURCE` sessions each.
fn zombie_source(i: usize) -> IpAddr {
    let host = i / PER_SOURCE;
    IpAddr::V4(Ipv4Addr::new(
        127,
        1,
        (host / 200) as u8,
        (host % 200 + 1) as u8,
    ))
}

/// Opens the zombies: greeting, EHLO, NOOP; they stay connected.
fn zombies(addr: SocketAddr) -> Vec<Client> {
    (0..ZOMBIES)
        .map(|i| {
            let mut z = Client::connect(addr, zombie_source(i)).expect("zombie connects");
            expect(&z.reply().expect("greeting"), "220 ");
            expect(&z.cmd("EHLO zombie.test").expect("EHLO"), "250");
            expect(&z.cmd("NOOP").expect("NOOP"), "250 ");
            z
        })
        .collect()
}

/// One message from [`SENDER`] to alice: the reply to its end of DATA, or
/// the first refusal.
fn send_one(addr: SocketAddr) -> String {
    let mut c = Client::connect(addr, SENDER).expect("sender connects");
    expect(&c.reply().expect("greeting"), "220 ");
    let end = send_on(&mut c);
    let _ = c.cmd("QUIT");
    end
}

#[test]
fn idle_zombies_never_reach_postfix_and_mail_still_flows() {
    if !ready("idle_zombies_never_reach_postfix_and_mail_still_flows") {
        return;
    }
    let postfix = Postfix::start(PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    })
    .expect("start Postfix");
    let proxy = proxy(&postfix, "", "");
    let mut zombies = zombies(proxy.addr);

    // The sender beside them is served at once.
    let started = Instant::now();
    expect(&send_one(proxy.addr), "250 ");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "delivery took {:?}",
        started.elapsed()
    );
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());

    // The zombies are all still there, answered by the proxy…
    for z in &mut zombies {
        expect(&z.cmd("NOOP").expect("NOOP"), "250 ");
    }
    assert!(proxy.ctx.backend_slots.in_use() <= 1);
    // … and Postfix never saw one of them: its only clients were the
    // fixture's readiness check and the proxy's probe (127.0.0.1) and the
    // sender.
    postfix.flush_log().expect("Postfix's log");
    let log = postfix.log();
    assert!(!log.contains("[127.1."), "a zombie reached Postfix:\n{log}");
    let connects: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("]: connect from "))
        .collect();
    assert_eq!(connects.len(), 3, "{log}");
    assert!(connects.iter().any(|l| l.contains("[127.0.0.2]")), "{log}");
    for mut z in zombies {
        let _ = z.cmd("QUIT");
    }
}

#[test]
fn with_the_backend_connected_at_accept_zombies_take_every_slot() {
    // The contrast: today's behaviour (`"on-connect"`). The zombies hold
    // every backend slot (here 20, so that the test stays light), and the
    // sender is turned away after the bounded wait: it retries later.
    if !ready("with_the_backend_connected_at_accept_zombies_take_every_slot") {
        return;
    }
    let postfix = Postfix::start(PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    })
    .expect("start Postfix");
    let proxy = proxy(
        &postfix,
        "connect = \"on-connect\"\nmax_connections = 20\nslot_wait = \"1s\"",
        "",
    );
    let mut zombies: Vec<Client> = (0..20)
        .map(|i| {
            let mut z = Client::connect(proxy.addr, zombie_source(i)).expect("zombie connects");
            expect(&z.reply().expect("greeting"), "220 ");
            expect(&z.cmd("EHLO zombie.test").expect("EHLO"), "250");
            z
        })
        .collect();
    assert_eq!(proxy.ctx.backend_slots.in_use(), 20);
    let mut c = Client::connect(proxy.addr, SENDER).expect("sender connects");
    expect(&c.reply().expect("greeting"), "421 4.3.2");
    assert!(postfix.log().contains("[127.1."));
    for z in &mut zombies {
        let _ = z.cmd("QUIT");
    }
}

/// Postfix's `disconnect from` lines for `source` so far.
fn disconnects(postfix: &Postfix, source: IpAddr) -> Vec<String> {
    postfix.flush_log().expect("Postfix's log");
    let client = format!("[{source}] ");
    postfix::log_lines(&postfix.log(), "]: disconnect from ")
        .into_iter()
        .filter(|line| line.contains(&client))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_recent_sender_gets_postfix_at_accept_and_holds_it_at_most_five_seconds_without_mail() {
    // With `backend.early_connect = "recent-senders"` (the default) a
    // source whose mail Postfix accepted has its backend connection opened
    // while the proxy greets it. The attacker's question: can it turn that
    // trust into zombies that hold Postfix's processes? No: an unclaimed
    // connection is given back after 5 s and the source is forgotten, and
    // sources that never delivered get none.
    if !ready(
        "a_recent_sender_gets_postfix_at_accept_and_holds_it_at_most_five_seconds_without_mail",
    ) {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(&postfix, "", "");
    let slots = &proxy.ctx.backend_slots;
    expect(&send_one(proxy.addr), "250 ");
    assert!(wait_until(WAIT, || slots.in_use() == 0));

    // The next session is connected at accept and its MAIL goes through
    // that connection: the client's EHLO name and the whole transaction
    // on it, one connection.
    send_on_early_connection(&proxy, &postfix, "no early connection");

    // The trusted source turns zombie: three sessions, EHLO, then silence.
    let before = disconnects(&postfix, SENDER).len();
    let mut held: Vec<Client> = (0..3)
        .map(|_| {
            let mut z = Client::connect(proxy.addr, SENDER).expect("connects");
            expect(&z.reply().expect("greeting"), "220 ");
            expect(&z.cmd("EHLO sender.test").expect("EHLO"), "250");
            z
        })
        .collect();
    assert!(wait_until(WAIT, || slots.in_use() >= 1));
    // Zombies that never delivered get no connection beside them.
    let mut strangers = zombies(proxy.addr);
    let opened = Instant::now();
    assert!(slots.in_use() <= 3, "{} slots", slots.in_use());
    assert!(
        wait_until(Duration::from_secs(10), || slots.in_use() == 0),
        "early connections still held after {:?}",
        opened.elapsed()
    );
    assert!(
        opened.elapsed() < Duration::from_secs(7),
        "{:?}",
        opened.elapsed()
    );
    let quits = disconnects(&postfix, SENDER);
    assert!(quits.len() > before, "{quits:?}");
    for line in &quits[before..] {
        assert!(
            line.contains("]: disconnect from unknown[127.0.0.2] ehlo=1 quit=1 commands=2"),
            "the EHLO sent ahead, then QUIT: {line}"
        );
    }
    assert!(
        !postfix.log().contains("[127.1."),
        "a stranger reached Postfix"
    );
    // Forgotten: its next session waits for its MAIL like anyone's.
    let mut next = Client::connect(proxy.addr, SENDER).expect("connects");
    expect(&next.reply().expect("greeting"), "220 ");
    expect(&next.cmd("EHLO sender.test").expect("EHLO"), "250");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(slots.in_use(), 0);
    // The sessions are still the proxy's: their MAIL earns a connection.
    expect(&send_on(&mut held[0]), "250 ");
    for z in held.iter_mut().chain(strangers.iter_mut()) {
        let _ = z.cmd("QUIT");
    }
    let early = proxy.ctx.stats.early_links();
    assert_eq!(early[1].0, "used");
    assert_eq!(early[1].1, 1, "{early:?}");
    assert_eq!(early[0].0, "unused");
    assert!(early[0].1 >= 1, "{early:?}");
}

#[test]
fn a_known_sender_keeps_its_head_start_while_zombies_fill_the_sessions() {
    // 150 idle zombies against `smtp.max_sessions = 180`: past the stress
    // threshold (0.8), the load a flood puts on the proxy. A source whose
    // mail Postfix accepted before still has Postfix connected while the
    // proxy greets it, and its message goes through that one session.
    if !ready("a_known_sender_keeps_its_head_start_while_zombies_fill_the_sessions") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(&postfix, "", "[smtp]\nmax_sessions = 180");
    let slots = &proxy.ctx.backend_slots;
    expect(&send_one(proxy.addr), "250 ");
    assert!(wait_until(WAIT, || slots.in_use() == 0));
    let mut zombies = zombies(proxy.addr);
    assert!(
        proxy.ctx.stressed(&proxy.ctx.settings().smtp),
        "150 sessions of 180: under stress"
    );

    send_on_early_connection(
        &proxy,
        &postfix,
        "no backend connection at accept under stress",
    );
    assert_eq!(proxy.ctx.stats.early_links(), vec![("used", 1)]);
    assert!(
        !postfix.log().contains("[127.1."),
        "a zombie reached Postfix"
    );
    for z in &mut zombies {
        let _ = z.cmd("QUIT");
    }
}

/// A session of [`SENDER`] that finds Postfix connected at accept (`none`:
/// the failure's words if not) and whose message goes through that one
/// Postfix session.
#[track_caller]
fn send_on_early_connection(proxy: &TestProxy, postfix: &Postfix, none: &str) {
    let slots = &proxy.ctx.backend_slots;
    let before = disconnects(postfix, SENDER).len();
    let mut c = Client::connect(proxy.addr, SENDER).expect("sender connects");
    expect(&c.reply().expect("greeting"), "220 ");
    assert!(wait_until(WAIT, || slots.in_use() == 1), "{none}");
    expect(&send_on(&mut c), "250 ");
    let _ = c.cmd("QUIT");
    drop(c);
    assert!(
        wait_until(WAIT, || disconnects(postfix, SENDER).len() == before + 1),
        "{}",
        postfix.log()
    );
    let last = disconnects(postfix, SENDER).pop().unwrap();
    assert!(
        last.contains("ehlo=1 mail=1 rcpt=1 data=1"),
        "one Postfix session carried it: {last}"
    );
}

/// A message to alice on a session past its greeting (EHLO first, again if
/// it had one): the reply to its end of DATA, or the first refusal.
fn send_on(c: &mut Client) -> String {
    expect(&c.cmd("EHLO sender.test").expect("EHLO"), "250");
    let mail = c.cmd("MAIL FROM:<someone@sender.test>").expect("MAIL");
    if !mail.starts_with("250") {
        return mail;
    }
    expect(&c.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
    expect(&c.cmd("DATA").expect("DATA"), "354 ");
    c.cmd("Subject: during the flood\r\n\r\nStill flowing.\r\n.")
        .expect("end of DATA")
}

/// Starts a Postfix that reads PROXY headers.
fn postfix() -> Postfix {
    Postfix::start(PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    })
    .expect("start Postfix")
}

/// `backend.connect = "on-rcpt"`: a bounce flood the proxy defers at RCPT
/// (past `null_sender_rate_per_recipient`) never opens a Postfix session,
/// where `"on-mail"` opens one per transaction; accepted mail goes through
/// with its MAIL and RCPT in one write, and a MAIL Postfix refuses (a SIZE
/// over its `message_size_limit`) is answered at the RCPT.
#[test]
fn transactions_the_proxy_refuses_whole_never_open_a_postfix_session_when_their_mail_is_held() {
    if !ready(
        "transactions_the_proxy_refuses_whole_never_open_a_postfix_session_when_their_mail_is_held",
    ) {
        return;
    }
    let postfix = postfix();
    let limits = "[limits]\nnull_sender_rate_per_recipient = \"1/1h\"\n\
                  [relay]\naccept = \"*@example.com\"\n";
    // The relay prober's sessions reach Postfix with "on-mail" only; the
    // deferred bouncer's with neither (a bounce's MAIL is held).
    for (connect, bouncer, prober, probes) in [
        (
            "on-rcpt",
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6)),
            0,
        ),
        (
            "on-mail",
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)),
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)),
            3,
        ),
    ] {
        let proxy = proxy(&postfix, &format!("connect = \"{connect}\""), limits);
        let addr = proxy.addr;
        // The first bounce to alice fills her bucket (1 an hour).
        let mut first = Client::connect(addr, SENDER).expect("connects");
        expect(&first.reply().expect("greeting"), "220 ");
        expect(&first.cmd("EHLO mx.example.net").unwrap(), "250");
        expect(&first.cmd("MAIL FROM:<>").unwrap(), "250 2.1.0");
        expect(&first.cmd("RCPT TO:<alice@example.com>").unwrap(), "250 ");
        expect(&first.cmd("DATA").unwrap(), "354");
        expect(
            &first.cmd("Subject: bounce\r\n\r\nbounced\r\n.").unwrap(),
            "250 ",
        );
        let _ = first.cmd("QUIT");
        // Postfix refuses this size at MAIL; "on-rcpt" says so at the RCPT
        // (the session's first MAIL is the one the proxy answers).
        let mut big = Client::connect(addr, SENDER).expect("connects");
        expect(&big.reply().expect("greeting"), "220 ");
        expect(&big.cmd("EHLO mx.example.net").unwrap(), "250");
        let mail = big
            .cmd("MAIL FROM:<big@example.net> SIZE=20000000")
            .unwrap();
        if connect == "on-rcpt" {
            expect(&mail, "250 2.1.0");
            let rcpt = big.cmd("RCPT TO:<alice@example.com>").unwrap();
            expect(&rcpt, "552 5.3.4");
            expect(&big.cmd("DATA").unwrap(), "554 5.5.1");
        } else {
            expect(&mail, "552 5.3.4");
        }
        let _ = big.cmd("QUIT");
        // Five more from another server, one session each: deferred.
        for _ in 0..5 {
            let mut c = Client::connect(addr, bouncer).expect("connects");
            expect(&c.reply().expect("greeting"), "220 ");
            expect(&c.cmd("EHLO mx.example.org").unwrap(), "250");
            expect(&c.cmd("MAIL FROM:<>").unwrap(), "250 2.1.0");
            expect(&c.cmd("RCPT TO:<alice@example.com>").unwrap(), "450 4.7.1");
            expect(&c.cmd("QUIT").unwrap(), "221");
        }
        // Three relay attempts, one session each: refused by the proxy.
        for _ in 0..3 {
            let mut c = Client::connect(addr, prober).expect("connects");
            expect(&c.reply().expect("greeting"), "220 ");
            expect(&c.cmd("EHLO prober.example.org").unwrap(), "250");
            expect(&c.cmd("MAIL FROM:<p@example.org>").unwrap(), "250 2.1.0");
            expect(
                &c.cmd("RCPT TO:<victim@elsewhere.example>").unwrap(),
                "550 5.7.1",
            );
            expect(&c.cmd("QUIT").unwrap(), "221");
        }
        assert!(
            wait_until(WAIT, || disconnects(&postfix, prober).len() == probes),
            "{connect}: Postfix sessions of the relay prober: {:?}",
            disconnects(&postfix, prober)
        );
        assert_eq!(
            disconnects(&postfix, bouncer).len(),
            0,
            "{connect}: Postfix sessions of the deferred bouncer"
        );
        proxy.stop();
    }
}

#[test]
fn a_network_holding_every_slot_cannot_starve_another_networks_mail() {
    if !ready("a_network_holding_every_slot_cannot_starve_another_networks_mail") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(&postfix, "max_connections = 4\nslot_wait = \"8s\"", "");
    // One /24 (127.1.0.0/24) takes every slot with transactions in
    // progress at Postfix, and queues one more.
    let mut held: Vec<Client> = (1..=4)
        .map(|host| {
            let source = IpAddr::V4(Ipv4Addr::new(127, 1, 0, host));
            let mut c = Client::connect(proxy.addr, source).expect("connect");
            expect(&c.reply().expect("greeting"), "220 ");
            expect(&c.cmd("EHLO flood.test").expect("EHLO"), "250");
            expect(&c.cmd("MAIL FROM:<f@flood.test>").expect("MAIL"), "250 ");
            c
        })
        .collect();
    assert_eq!(proxy.ctx.backend_slots.in_use(), 4);
    let mut queued =
        Client::connect(proxy.addr, IpAddr::V4(Ipv4Addr::new(127, 1, 0, 5))).expect("connect");
    expect(&queued.reply().expect("greeting"), "220 ");
    expect(&queued.cmd("EHLO flood.test").expect("EHLO"), "250");
    queued
        .stream
        .write_all(b"MAIL FROM:<f@flood.test>\r\n")
        .expect("MAIL");
    assert!(wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1));
    // The sender, from another network, queues after it.
    let mut sender = Client::connect(proxy.addr, SENDER).expect("connect");
    expect(&sender.reply().expect("greeting"), "220 ");
    expect(&sender.cmd("EHLO sender.test").expect("EHLO"), "250");
    sender
        .stream
        .write_all(b"MAIL FROM:<someone@sender.test>\r\n")
        .expect("MAIL");
    assert!(wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 2));
    // A slot frees: it goes to the sender's network, which holds none.
    let mut first = held.remove(0);
    expect(&first.cmd("QUIT").expect("QUIT"), "221 ");
    let started = Instant::now();
    expect(&sender.reply().expect("MAIL"), "250 ");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        proxy.ctx.backend_slots.waiting(),
        1,
        "the flooder still waits"
    );
    expect(
        &sender.cmd("RCPT TO:<alice@example.com>").expect("RCPT"),
        "250 ",
    );
    expect(&sender.cmd("DATA").expect("DATA"), "354 ");
    expect(
        &sender
            .cmd("Subject: fair\r\n\r\nServed first.\r\n.")
            .expect("end of DATA"),
        "250 ",
    );
    expect(&sender.cmd("QUIT").expect("QUIT"), "221 ");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    // The sender's slot goes to the flooder's queued session: no slot
    // stays idle while someone waits.
    expect(&queued.reply().expect("MAIL"), "250 ");
    assert!(
        proxy
            .ctx
            .backend_slots
            .waits
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

#[test]
fn at_the_session_cap_a_sender_displaces_the_oldest_idle_zombie() {
    if !ready("at_the_session_cap_a_sender_displaces_the_oldest_idle_zombie") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(&postfix, "", "[smtp]\nmax_sessions = 30\n");
    let mut zombies: Vec<Client> = (0..30)
        .map(|i| {
            let mut z = Client::connect(proxy.addr, zombie_source(i)).expect("zombie connects");
            expect(&z.reply().expect("greeting"), "220 ");
            expect(&z.cmd("EHLO zombie.test").expect("EHLO"), "250");
            z
        })
        .collect();
    // The proxy is full of idle zombies; the sender is served anyway…
    expect(&send_one(proxy.addr), "250 ");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    // … because the oldest zombie made room.
    expect(&zombies[0].reply().expect("shed"), "421 4.3.2");
    for z in zombies.iter_mut().skip(1) {
        expect(&z.cmd("NOOP").expect("NOOP"), "250 ");
    }
    assert!(!postfix.log().contains("[127.1."), "{}", postfix.log());
}

/// A client from `source`, greeted and past EHLO: idle before its MAIL.
fn greeted(addr: SocketAddr, source: IpAddr) -> Client {
    let mut c = Client::connect(addr, source).expect("client connects");
    expect(&c.reply().expect("greeting"), "220 ");
    expect(&c.cmd("EHLO client.test").expect("EHLO"), "250");
    c
}

/// A newcomer from `source` at the session cap: it is greeted, and
/// `victim` is told `421 4.3.2` to make room. Returns the newcomer.
fn newcomer_displaces(addr: SocketAddr, source: IpAddr, victim: &mut Client) -> Client {
    let mut newcomer = Client::connect(addr, source).expect("newcomer connects");
    expect(&newcomer.reply().expect("newcomer's greeting"), "220 ");
    expect(
        &victim.reply().expect("the shed session's reply"),
        "421 4.3.2",
    );
    newcomer
}

/// Every zombie holds a MAIL, so the only sessions without one are
/// senders in their first round trips: at the session cap a newcomer must
/// push out a parked zombie, not the sender between its EHLO and its MAIL.
#[test]
fn at_the_session_cap_a_parked_zombie_goes_before_a_sender_in_its_first_seconds() {
    if !ready("at_the_session_cap_a_parked_zombie_goes_before_a_sender_in_its_first_seconds") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(
        &postfix,
        "max_connections = 1\nslot_wait = \"10s\"",
        "[smtp]\nmax_sessions = 3\n",
    );
    // A keeper takes the one slot with its transaction open; a second
    // zombie's MAIL waits for it, and the keeper is parked off it.
    let started = Instant::now();
    let mut keeper = zombie_with_mail_from(proxy.addr, zombie_source(0));
    expect(
        &keeper.cmd("RCPT TO:<alice@example.com>").expect("RCPT"),
        "250 ",
    );
    let holder = std::thread::spawn({
        let addr = proxy.addr;
        move || zombie_with_mail_from(addr, zombie_source(PER_SOURCE))
    });
    assert!(
        wait_until(WAIT, || proxy.parked("parked") == 1),
        "the keeper was not parked"
    );
    let mut holder = holder.join().expect("the second zombie's thread");
    // Past the keeper's first seconds, a sender comes and says EHLO.
    std::thread::sleep((SHED_GRACE + Duration::from_millis(300)).saturating_sub(started.elapsed()));
    let mut sender = greeted(proxy.addr, SENDER);
    // The cap is reached: the newcomer is let in, and the parked keeper
    // pays for it.
    let _newcomer = newcomer_displaces(proxy.addr, zombie_source(2 * PER_SOURCE), &mut keeper);
    assert_eq!(proxy.shed("shed-parked"), 1);
    // The sender goes on: its MAIL waits until the holder is parked in turn.
    expect(&send_on(&mut sender), "250 ");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    assert_eq!(proxy.shed("shed-idle") + proxy.shed("shed-new"), 0);
    expect(&holder.cmd("NOOP").expect("NOOP"), "250 ");
}

/// With nothing older idle, the newcomer pushes out the oldest session in
/// its first seconds, a sender maybe: that is no sign of a zombie, so its
/// network does not go behind the others for backend slots.
#[test]
fn a_session_shed_in_its_first_seconds_does_not_hold_its_network_back() {
    if !ready("a_session_shed_in_its_first_seconds_does_not_hold_its_network_back") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(&postfix, "", "[smtp]\nmax_sessions = 2\n");
    let mut first = greeted(proxy.addr, SENDER);
    let mut second = greeted(proxy.addr, zombie_source(0));
    // The oldest goes.
    let _newcomer = newcomer_displaces(proxy.addr, zombie_source(PER_SOURCE), &mut first);
    assert_eq!(proxy.shed("shed-new"), 1);
    assert_eq!(proxy.shed("shed-idle"), 0);
    assert!(!proxy.ctx.backend_slots.shed_lately(SENDER));
    expect(&second.cmd("NOOP").expect("NOOP"), "250 ");
}

/// Zombie `i` (a source of its own) with its MAIL accepted: a Postfix
/// process earned.
fn zombie_with_mail(addr: SocketAddr, i: usize) -> Client {
    zombie_with_mail_from(addr, zombie_source(i * PER_SOURCE))
}

/// A zombie from `source` whose MAIL was accepted (after waiting its turn
/// for a backend slot).
fn zombie_with_mail_from(addr: SocketAddr, source: IpAddr) -> Client {
    let mut z = Client::connect(addr, source).expect("zombie connects");
    expect(&z.reply().expect("greeting"), "220 ");
    expect(&z.cmd("EHLO zombie.test").expect("EHLO"), "250");
    expect(&z.cmd("MAIL FROM:<z@zombie.test>").expect("MAIL"), "250 ");
    z
}

/// [`send_one`] on a thread of its own: its reply and how long it took.
fn timed_sender(addr: SocketAddr) -> std::thread::JoinHandle<(String, Duration)> {
    std::thread::spawn(move || {
        let started = Instant::now();
        (send_one(addr), started.elapsed())
    })
}

#[test]
fn zombies_keeping_transactions_open_with_noops_are_parked_off_their_postfix_processes_for_a_sender(
) {
    if !ready(
        "zombies_keeping_transactions_open_with_noops_are_parked_off_their_postfix_processes_for_a_sender",
    ) {
        return;
    }
    let postfix = postfix();
    // Few backend slots, so that a handful of zombies can take them all.
    let proxy = proxy(
        &postfix,
        "max_connections = 3\nslot_wait = \"20s\"",
        "[smtp]\nstress_command_timeout = \"2s\"\n",
    );
    // Each zombie earns a Postfix process with a MAIL Postfix accepts, then
    // keeps its transaction open: a NOOP every 500 ms, each answered (by
    // Postfix, and once the transaction is parked by the proxy).
    let mut zombies: Vec<Client> = (0..3).map(|i| zombie_with_mail(proxy.addr, i)).collect();
    let sender = timed_sender(proxy.addr);
    for _ in 0..16 {
        std::thread::sleep(Duration::from_millis(500));
        for z in &mut zombies {
            expect(&z.cmd("NOOP").expect("NOOP"), "250 ");
        }
        if sender.is_finished() {
            break;
        }
    }
    let (end, took) = sender.join().expect("the sender's thread");
    expect(&end, "250 ");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    let parked = proxy.parked("parked");
    assert!(parked >= 1, "no zombie was parked");
    // Within a zombie's stress_command_timeout and a little, not slot_wait.
    assert!(took < Duration::from_secs(6), "the sender took {took:?}");
    // Postfix let each parked zombie's session go after its MAIL.
    let ended_after_mail = || {
        (0..3)
            .flat_map(|i| disconnects(&postfix, zombie_source(i * PER_SOURCE)))
            .filter(|line| {
                let counts = postfix::command_counts(line);
                counts.contains("mail=1") && !counts.contains("rcpt=")
            })
            .count()
    };
    assert!(
        wait_until(WAIT, || ended_after_mail() >= parked as usize),
        "{}",
        postfix.log()
    );
    assert_eq!(proxy.shed("slow-transaction"), 0);
    // Each zombie's transaction goes on when its client goes on: a parked
    // one on a new Postfix session, its MAIL sent again before the RCPT.
    for z in &mut zombies {
        expect(&z.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
        expect(&z.cmd("DATA").expect("DATA"), "354 ");
        expect(
            &z.cmd("Subject: parked\r\n\r\nTaken up again.\r\n.")
                .expect("end of DATA"),
            "250 ",
        );
    }
    assert!(postfix.wait_delivered(4, WAIT), "{}", postfix.log());
    assert_eq!(proxy.parked("resumed"), parked);
}

#[test]
fn zombies_trickling_their_messages_lose_their_postfix_processes_and_every_message_is_delivered_whole(
) {
    if !ready("zombies_trickling_their_messages_lose_their_postfix_processes_and_every_message_is_delivered_whole") {
        return;
    }
    let (maildir, postfix) = postfix_with_maildir();
    let proxy = proxy(
        &postfix,
        "max_connections = 3\nslot_wait = \"20s\"",
        "[smtp]\nstress_command_timeout = \"2s\"\n",
    );
    // Each zombie earns a Postfix process, has its MAIL and RCPT accepted,
    // and trickles its message at 1 000 bytes/s: twice Postfix's
    // smtpd_min_data_rate, so that Postfix alone (or the proxy without its
    // spool) would let it hold the process to the end.
    let mut zombies: Vec<(Client, String)> = (0..3)
        .map(|i| {
            let head = format!("Subject: zombie {i}\r\n\r\n");
            let (z, _) = zombie_in_data(proxy.addr, zombie_source(i * PER_SOURCE), head);
            (z, String::new())
        })
        .collect();
    let sender = timed_sender(proxy.addr);
    let mut line_no = 0;
    let mut trickle = |zombies: &mut Vec<(Client, String)>| {
        for (z, body) in zombies.iter_mut() {
            let line = format!("{line_no:04} {}\r\n", "z".repeat(93));
            z.stream.write_all(line.as_bytes()).expect("trickle");
            body.push_str(&line);
        }
        line_no += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    for _ in 0..80 {
        trickle(&mut zombies);
        if sender.is_finished() {
            break;
        }
    }
    let (end, took) = sender.join().expect("the sender's thread");
    expect(&end, "250 ");
    // A trickler's slot goes once its transaction has waited 1 s while
    // half the slots or more are in use: not slot_wait.
    assert!(took < Duration::from_secs(6), "the sender took {took:?}");
    assert!(proxy.ctx.spool.spooled() >= 1, "no message was spooled");
    for _ in 0..10 {
        trickle(&mut zombies);
    }
    // Every zombie's message, spooled or not, arrives whole.
    for (z, _) in &mut zombies {
        expect(&z.cmd(".").expect("end of DATA"), "250 ");
    }
    let sent: Vec<(String, String)> = zombies
        .iter()
        .enumerate()
        .map(|(i, (_, body))| (format!("zombie {i}"), body.clone()))
        .collect();
    assert_delivered_whole(&maildir, &postfix, &sent);
    // Postfix dropped the part it had of each spooled message.
    assert!(
        postfix.log().matches("lost connection after DATA").count()
            >= proxy.ctx.spool.spooled() as usize,
        "{}",
        postfix.log()
    );
}

/// A zombie in DATA from `source`, sending a 100-byte line every `pace`
/// until `stop` or until the proxy closes on it; then its client.
fn trickler(
    addr: SocketAddr,
    source: IpAddr,
    pace: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Client> {
    std::thread::spawn(move || {
        let (mut z, _) = zombie_in_data(addr, source, "Subject: trickle\r\n\r\n".into());
        let line = lines_of(b't', 100);
        while !stop.load(Ordering::Relaxed) && z.stream.write_all(line.as_bytes()).is_ok() {
            std::thread::sleep(pace);
        }
        z
    })
}

/// Tricklers hold every session, each past MAIL with its message in the
/// spool: no session is idle, yet a sender at the cap gets in, and the
/// slowest trickler makes room.
#[test]
fn at_the_session_cap_the_slowest_message_in_the_spool_makes_room_for_a_sender() {
    if !ready("at_the_session_cap_the_slowest_message_in_the_spool_makes_room_for_a_sender") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(
        &postfix,
        "max_connections = 2\nslot_wait = \"10s\"",
        "[smtp]\nmax_sessions = 3\nstress_command_timeout = \"2s\"\n",
    );
    let stop = Arc::new(AtomicBool::new(false));
    // 670 bytes/s for the first, 2 000 for the others: all above the
    // 500 bytes/s a spooled message must keep.
    let tricklers: Vec<_> = [150, 50, 50]
        .into_iter()
        .enumerate()
        .map(|(i, ms)| {
            let source = zombie_source(i * PER_SOURCE);
            let t = trickler(proxy.addr, source, Duration::from_millis(ms), stop.clone());
            // In turn: each takes a slot at its MAIL, and gives it back
            // once in the spool.
            assert!(
                wait_until(WAIT, || proxy.ctx.spool.spooled() > i as u64),
                "trickler {i} was not spooled"
            );
            t
        })
        .collect();
    // Every session is in DATA: the sender is let in all the same.
    let (end, _) = timed_sender(proxy.addr)
        .join()
        .expect("the sender's thread");
    expect(&end, "250 ");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    assert_eq!(proxy.shed("shed-slow-message"), 1);
    stop.store(true, Ordering::Relaxed);
    let mut zombies: Vec<Client> = tricklers
        .into_iter()
        .map(|t| t.join().expect("a trickler's thread"))
        .collect();
    // The slowest paid for it; the others' messages go through whole.
    expect(
        &zombies[0].reply().expect("the slowest's reply"),
        "421 4.3.2",
    );
    for z in &mut zombies[1..] {
        expect(&z.cmd(".").expect("end of DATA"), "250 ");
    }
    assert!(postfix.wait_delivered(3, WAIT), "{}", postfix.log());
}

/// A Postfix that reads PROXY headers and delivers to alice's (and the
/// other default recipients') maildir.
fn postfix_with_maildir() -> (Maildir, Postfix) {
    let maildir = Maildir::new(&postfix::DEFAULT_RECIPIENTS).expect("maildir");
    let postfix = Postfix::start(maildir.postfix_options(PostfixOptions {
        proxy_protocol: true,
        ..PostfixOptions::default()
    }))
    .expect("start Postfix");
    (maildir, postfix)
}

/// Each of `sent` (the words after "Subject: ", and the body as sent, CRLF
/// lines) is in alice's maildir byte for byte, beside the one sender's
/// message.
fn assert_delivered_whole(maildir: &Maildir, postfix: &Postfix, sent: &[(String, String)]) {
    assert!(maildir.wait_for(sent.len() + 1, WAIT), "{}", postfix.log());
    let stored: Vec<String> = maildir
        .messages("alice@example.com")
        .iter()
        .map(|m| m.text())
        .collect();
    for (subject, body) in sent {
        let message = stored
            .iter()
            .find(|m| m.contains(&format!("Subject: {subject}\n")))
            .unwrap_or_else(|| panic!("{subject}'s message is not in the maildir"));
        let (_, stored_body) = message.split_once("\n\n").expect("a body");
        assert_eq!(stored_body, body.replace("\r\n", "\n"), "{subject}");
    }
}

/// A zombie on its way into DATA from `source` (waiting its turn for a
/// backend slot at MAIL), having sent `head` of its message.
fn zombie_in_data(addr: SocketAddr, source: IpAddr, head: String) -> (Client, String) {
    let mut z = zombie_with_mail_from(addr, source);
    expect(&z.cmd("RCPT TO:<alice@example.com>").expect("RCPT"), "250 ");
    expect(&z.cmd("DATA").expect("DATA"), "354 ");
    z.stream.write_all(head.as_bytes()).expect("head");
    (z, head)
}

/// `size` bytes of 100-byte lines of `fill`.
fn lines_of(fill: u8, size: usize) -> String {
    let line = format!("{}\r\n", String::from(fill as char).repeat(98));
    line.repeat(size / line.len())
}

/// Zombies trickling their messages, a line every 100 ms each, for as long
/// as the proxy takes them.
#[derive(Default)]
struct Tricklers {
    /// Each zombie, what it sent, its line's length, and whether it holds
    /// slots (or fills the spool).
    zombies: Vec<(Client, String, usize, bool)>,
}

impl Tricklers {
    fn tick(&mut self, line_no: usize) {
        self.zombies.retain_mut(|(z, body, len, _)| {
            let line = format!("{line_no:04} {}\r\n", "z".repeat(*len - 7));
            body.push_str(&line);
            z.stream.write_all(line.as_bytes()).is_ok()
        });
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn zombies_that_fill_the_spool_cannot_keep_the_next_tricklers_on_postfix() {
    if !ready("zombies_that_fill_the_spool_cannot_keep_the_next_tricklers_on_postfix") {
        return;
    }
    let (maildir, postfix) = postfix_with_maildir();
    // A spool of 256 KiB: 32 KiB for each source network.
    let proxy = proxy(
        &postfix,
        "max_connections = 3\nslot_wait = \"20s\"\nspool_size = \"256KiB\"",
        "[smtp]\nstress_command_timeout = \"2s\"\n",
    );
    // The fill: ten zombies from ten networks each send 24 KiB at once and
    // then keep trickling at 550 bytes/s, above the 500 a spooled message
    // must keep. Each gives its slot back within seconds; together they
    // fill the spool (240 KiB, and growing), each within its network's
    // share. Once it is full they make room for each other's growth, the
    // slowest going first, and it stays full.
    let (tx, rx) = std::sync::mpsc::channel();
    for n in 0..10u8 {
        let tx = tx.clone();
        let addr = proxy.addr;
        std::thread::spawn(move || {
            let head = format!("Subject: filler {n}\r\n\r\n{}", lines_of(b'f', 24 * 1024));
            let _ = tx.send(zombie_in_data(
                addr,
                IpAddr::V4(Ipv4Addr::new(127, 2, n, 1)),
                head,
            ));
        });
    }
    let mut tricklers = Tricklers::default();
    let mut line_no = 0;
    let started = Instant::now();
    while proxy.ctx.spool.spooled() < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the fill never went into the spool: {} spooled, {} bytes, {} tricklers, shed {:?}",
            proxy.ctx.spool.spooled(),
            proxy.ctx.spool.used(),
            tricklers.zombies.len(),
            proxy.ctx.stats.shed()
        );
        tricklers
            .zombies
            .extend(rx.try_iter().map(|(z, head)| (z, head, 55, false)));
        tricklers.tick(line_no);
        line_no += 1;
    }
    assert!(
        proxy.ctx.spool.used() > 200 * 1024,
        "the spool holds {} bytes",
        proxy.ctx.spool.used()
    );
    // Three more zombies, from three more networks, take every backend
    // slot and trickle at 1 000 bytes/s, twice what Postfix asks. Each
    // sends 16 KiB first: together more than the spool has left, so their
    // copies are made by evicting fillers.
    for n in 0..3u8 {
        let head = format!("Subject: holder {n}\r\n\r\n{}", lines_of(b'h', 16 * 1024));
        let (z, head) = zombie_in_data(proxy.addr, IpAddr::V4(Ipv4Addr::new(127, 3, n, 1)), head);
        tricklers.zombies.push((z, head, 100, true));
    }
    let sender = timed_sender(proxy.addr);
    for _ in 0..100 {
        tricklers.tick(line_no);
        line_no += 1;
        if sender.is_finished() {
            break;
        }
    }
    let (end, took) = sender.join().expect("the sender's thread");
    expect(&end, "250 ");
    // A holder's slot goes once its transaction has waited 1 s: not
    // slot_wait. Without a copy it would keep the slot to its end.
    assert!(took < Duration::from_secs(8), "the sender took {took:?}");
    assert!(
        proxy.shed("spool-evicted") >= 1,
        "no filler was evicted: {:?}",
        proxy.ctx.stats.shed()
    );
    // Every holder's message, spooled, arrives whole.
    let holders: Vec<_> = tricklers.zombies.into_iter().filter(|z| z.3).collect();
    assert_eq!(holders.len(), 3, "a holder was cut");
    let mut sent = Vec::new();
    for (n, (mut z, message, _, _)) in holders.into_iter().enumerate() {
        expect(&z.cmd(".").expect("end of DATA"), "250 ");
        let (_, body) = message.split_once("\r\n\r\n").expect("a body");
        sent.push((format!("holder {n}"), body.to_owned()));
    }
    assert_delivered_whole(&maildir, &postfix, &sent);
}

/// A keeper from `source` until `stop`: MAIL and RCPT (waiting its turn
/// for a backend slot), then a NOOP every 500 ms with its transaction open;
/// every 3 s it starts its transaction again (RSET, MAIL, RCPT: parked off
/// its slot meanwhile, it waits its turn for one again), and it reconnects
/// when cut.
fn keeper(addr: SocketAddr, source: IpAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok(mut z) = Client::connect(addr, source) else {
                continue;
            };
            // Longer than backend.slot_wait: MAIL may wait that long.
            let _ = z.stream.set_read_timeout(Some(Duration::from_secs(15)));
            let transaction = |z: &mut Client| {
                z.cmd("MAIL FROM:<k@zombie.test>")
                    .is_ok_and(|r| r.starts_with("250 "))
                    && z.cmd("RCPT TO:<alice@example.com>")
                        .is_ok_and(|r| r.starts_with("250 "))
            };
            let mut open = z.reply().is_ok_and(|r| r.starts_with("220 "))
                && z.cmd("EHLO keeper.test")
                    .is_ok_and(|r| r.starts_with("250"))
                && transaction(&mut z);
            let mut noops = 0;
            while open && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                noops += 1;
                open = if noops % 6 == 0 {
                    z.cmd("RSET").is_ok_and(|r| r.starts_with("250 ")) && transaction(&mut z)
                } else {
                    z.cmd("NOOP").is_ok_and(|r| r.starts_with("250 "))
                };
            }
        }
    })
}

#[test]
fn zombies_parked_before_wait_behind_a_sender_who_came_after_them() {
    if !ready("zombies_parked_before_wait_behind_a_sender_who_came_after_them") {
        return;
    }
    let postfix = postfix();
    // Shed zombies are not blocked here (max_shed_sessions_per_source = 0):
    // they keep coming back, as a botnet with many addresses does.
    let proxy = proxy(
        &postfix,
        "max_connections = 3\nslot_wait = \"10s\"",
        "[smtp]\nstress_command_timeout = \"2s\"\n[limits]\nmax_shed_sessions_per_source = 0\n",
    );
    // Keepers from 24 networks take the 3 slots in turn, each parked 2 s
    // into its open transaction while others wait, and queue again with
    // their next transaction.
    let stop = Arc::new(AtomicBool::new(false));
    let keepers: Vec<_> = (0..24u8)
        .map(|n| {
            keeper(
                proxy.addr,
                IpAddr::V4(Ipv4Addr::new(127, 4, n, 1)),
                stop.clone(),
            )
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(40), || proxy.parked("parked") >= 24),
        "the keepers were not all parked: {:?}",
        proxy.ctx.stats.parked()
    );
    // Every queued network was parked (or shed) lately; the sender's was not: it is
    // served at the next slot, not after 21 networks' turns (21 × 2 s / 3
    // slots = 14 s, past slot_wait).
    let (end, took) = timed_sender(proxy.addr)
        .join()
        .expect("the sender's thread");
    stop.store(true, Ordering::Relaxed);
    expect(&end, "250 ");
    assert!(took < Duration::from_secs(6), "the sender took {took:?}");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    for k in keepers {
        k.join().expect("a keeper's thread");
    }
}

#[test]
fn networks_shed_lately_hold_at_most_half_the_slots_and_a_sender_finds_one_free() {
    if !ready("networks_shed_lately_hold_at_most_half_the_slots_and_a_sender_finds_one_free") {
        return;
    }
    let postfix = postfix();
    let proxy = proxy(
        &postfix,
        "max_connections = 4\nslot_wait = \"10s\"",
        "[smtp]\nstress_command_timeout = \"2s\"\n[limits]\nmax_shed_sessions_per_source = 0\n",
    );
    // Keepers from 12 networks, each shed lately (as a flood's are after
    // their first cut), keep transactions open with NOOPs and start new
    // ones.
    let slots = &proxy.ctx.backend_slots;
    let stop = Arc::new(AtomicBool::new(false));
    let keepers: Vec<_> = (0..12u8)
        .map(|n| {
            let source = IpAddr::V4(Ipv4Addr::new(127, 5, n, 1));
            slots.mark_shed(source);
            keeper(proxy.addr, source, stop.clone())
        })
        .collect();
    // They hold two of the four slots at most, however many of them wait:
    // the other two stay free.
    let mut most = 0;
    let mut free_while_waiting = false;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(6) {
        let counts = slots.counts();
        most = most.max(counts.shed_in_use);
        free_while_waiting |= counts.waiting > 0 && counts.in_use <= 2;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(most <= 2, "the keepers held {most} of 4 slots");
    assert!(
        free_while_waiting,
        "never two slots free with keepers waiting"
    );
    assert_eq!(slots.shed_cap(), 2);
    // A sender is delivered beside them.
    let (end, _) = timed_sender(proxy.addr)
        .join()
        .expect("the sender's thread");
    stop.store(true, Ordering::Relaxed);
    expect(&end, "250 ");
    assert!(postfix.wait_delivered(1, WAIT), "{}", postfix.log());
    for k in keepers {
        k.join().expect("a keeper's thread");
    }
    assert!(
        proxy
            .ctx
            .stats
            .parked()
            .iter()
            .any(|(outcome, n)| *outcome == "parked" && *n > 0),
        "no keeper was parked: {:?}",
        proxy.ctx.stats.parked()
    );
}

// -- Pipelining end to end ---------------------------------------------------

/// A Postfix that reads PROXY headers and drops clients that pipeline
/// where RFC 2920 forbids it (Postfix 3.9's default).
fn strict_postfix() -> Postfix {
    Postfix::start(PostfixOptions {
        proxy_protocol: true,
        extra_main_cf: vec![("smtpd_forbid_unauth_pipelining".into(), "yes".into())],
        ..PostfixOptions::default()
    })
    .expect("start Postfix")
}

/// The proxy in front of `upstream` (a recorder before Postfix), with
/// `relay.accept = "*@example.com"` and `smtp` keys `smtp`.
fn proxy_to(upstream: SocketAddr, smtp: &str) -> TestProxy {
    TestProxy::start(&format!(
        r#"mode = "enforce"

[[listen]]
address = "127.0.0.1:0"

[backend]
address = "{upstream}"
identity = "proxy-v2"
connect_timeout = "2s"

[kernel]
mode = "off"

[relay]
accept = "*@example.com"

[smtp]
{smtp}
"#
    ))
}

/// The replies that came in the next single read: what one write of the
/// server held.
fn replies_in_one_read(c: &mut Client) -> Vec<String> {
    assert!(c.buf.is_empty(), "unread bytes: {:?}", c.buf);
    let mut chunk = [0u8; 65536];
    let n = c.stream.read(&mut chunk).expect("read the replies");
    c.buf.extend_from_slice(&chunk[..n]);
    let mut replies = Vec::new();
    while c.buf.contains(&b'\n') {
        replies.push(c.reply().expect("a whole reply"));
    }
    assert!(c.buf.is_empty(), "a reply cut short: {:?}", c.buf);
    replies
}

/// Postfix logs every client that talks before its greeting or pipelines
/// where it may not (and with `smtpd_forbid_unauth_pipelining` drops it).
#[track_caller]
fn assert_no_improper_pipelining(postfix: &Postfix) {
    postfix.flush_log().expect("Postfix's log");
    let log = postfix.log();
    assert!(
        !log.contains("improper command pipelining"),
        "the proxy pipelined where Postfix forbids it:\n{log}"
    );
}

#[test]
fn a_pipelined_group_reaches_postfix_in_one_write_without_what_the_proxy_refused() {
    if !ready("a_pipelined_group_reaches_postfix_in_one_write_without_what_the_proxy_refused") {
        return;
    }
    let postfix = strict_postfix();
    let recorder = Relay::recording(postfix.addr()).expect("the recording relay");
    let proxy = proxy_to(recorder.addr(), "");
    let mut c = Client::connect(proxy.addr, SENDER).expect("sender connects");
    expect(&c.reply().expect("greeting"), "220 ");
    let ehlo = c.cmd("EHLO sender.test").expect("EHLO");
    assert!(ehlo.contains("PIPELINING"), "{ehlo}");
    // One group: a relay attempt, a valid recipient, an unknown one, a
    // line that does not parse, and DATA last.
    c.stream
        .write_all(
            b"MAIL FROM:<someone@sender.test>\r\nRCPT TO:<other@elsewhere.test>\r\n\
              RCPT TO:<alice@example.com>\r\nRCPT TO:<nobody@example.com>\r\n\
              RCPT TO:<bob@example.com\r\nDATA\r\n",
        )
        .expect("the group");
    let replies = replies_in_one_read(&mut c);
    let codes: Vec<&str> = replies.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        codes,
        ["250", "550", "250", "550", "501", "354"],
        "{replies:#?}"
    );
    expect(&replies[1], "550 5.7.1");
    expect(&replies[3], "550 5.1.1 <nobody@example.com>");
    expect(
        &c.cmd("Subject: piped\r\n\r\nOne write.\r\n.")
            .expect("end of DATA"),
        "250 ",
    );
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");
    postfix.expect_delivered(1);
    // Postfix got the relayed commands of the group in one write, in the
    // client's order, and nothing the proxy refused.
    let session = recorder.session_with("MAIL FROM:<someone@sender.test>");
    assert!(
        session.iter().any(|chunk| chunk
            == "MAIL FROM:<someone@sender.test>\r\nRCPT TO:<alice@example.com>\r\n\
                RCPT TO:<nobody@example.com>\r\nDATA\r\n"),
        "{session:#?}"
    );
    let all = session.concat();
    assert!(!all.contains("elsewhere.test"), "{session:#?}");
    assert!(!all.contains("<bob@example.com\r\n"), "{session:#?}");
    // The PROXY header, EHLO and the group each waited for their reply.
    assert_eq!(session[1], "EHLO sender.test\r\n", "{session:#?}");
    assert_no_improper_pipelining(&postfix);
}

#[test]
fn a_helo_session_reaches_postfix_one_command_at_a_time() {
    if !ready("a_helo_session_reaches_postfix_one_command_at_a_time") {
        return;
    }
    let postfix = strict_postfix();
    let recorder = Relay::recording(postfix.addr()).expect("the recording relay");
    let proxy = proxy_to(recorder.addr(), "");
    let mut c = Client::connect(proxy.addr, SENDER).expect("sender connects");
    expect(&c.reply().expect("greeting"), "220 ");
    expect(&c.cmd("HELO sender.test").expect("HELO"), "250 ");
    // The client pipelines without PIPELINING (a HELO session): Postfix
    // would drop the proxy if it passed the group on as it came.
    c.stream
        .write_all(b"MAIL FROM:<someone@sender.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
        .expect("the group");
    for code in ["250 ", "250 ", "354 "] {
        expect(&c.reply().expect("reply"), code);
    }
    expect(
        &c.cmd("Subject: helo\r\n\r\nOne at a time.\r\n.")
            .expect("end of DATA"),
        "250 ",
    );
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");
    postfix.expect_delivered(1);
    let session = recorder.session_with("MAIL FROM:<someone@sender.test>");
    for command in [
        "HELO sender.test\r\n",
        "MAIL FROM:<someone@sender.test>\r\n",
        "RCPT TO:<alice@example.com>\r\n",
        "DATA\r\n",
    ] {
        assert!(
            session.iter().any(|chunk| chunk == command),
            "{command:?} not in a chunk of its own: {session:#?}"
        );
    }
    assert_no_improper_pipelining(&postfix);
}

/// The replies to `group` after EHLO on `client`.
fn group_replies(client: &mut Client, group: &[u8]) -> Vec<String> {
    expect(&client.reply().expect("greeting"), "220 ");
    expect(&client.cmd("EHLO sender.test").expect("EHLO"), "250");
    client.stream.write_all(group).expect("the group");
    let count = group.windows(2).filter(|w| w == b"\r\n").count();
    (0..count)
        .map(|_| client.reply().expect("a reply"))
        .collect()
}

#[test]
fn a_refused_mail_fails_its_pipelined_recipients_as_postfix_does() {
    if !ready("a_refused_mail_fails_its_pipelined_recipients_as_postfix_does") {
        return;
    }
    let postfix = strict_postfix();
    // The proxy takes messages as large as Postfix does (10240000 bytes).
    let proxy = proxy_to(postfix.addr(), "max_message_size = 10240000");
    // A MAIL over the size limit, then recipients and DATA in its group.
    let group = b"MAIL FROM:<someone@sender.test> SIZE=20000000\r\nRCPT TO:<alice@example.com>\r\n\
                  RCPT TO:<bob@example.com>\r\nDATA\r\n";
    // Postfix itself, told the client's address as the proxy would.
    let mut direct = Client::connect(postfix.addr(), SENDER).expect("connect to Postfix");
    direct
        .stream
        .write_all(b"PROXY TCP4 127.0.0.2 127.0.0.1 40000 25\r\n")
        .expect("PROXY header");
    let oracle = group_replies(&mut direct, group);
    assert_eq!(
        oracle,
        [
            "552 5.3.4 Message size exceeds fixed limit",
            "503 5.5.1 Error: need MAIL command",
            "503 5.5.1 Error: need MAIL command",
            "503 5.5.1 Error: need RCPT command",
        ]
    );
    // The proxy refuses that MAIL itself: the same replies.
    let mut c = Client::connect(proxy.addr, SENDER).expect("connect to the proxy");
    assert_eq!(group_replies(&mut c, group), oracle);
    // Within the proxy's limit, Postfix refuses it: the same replies again
    // (the recipients and DATA went to Postfix in the group, and its
    // refusal of DATA is relayed).
    let proxy = proxy_to(postfix.addr(), "max_message_size = 30000000");
    let mut c = Client::connect(proxy.addr, SENDER).expect("connect to the proxy");
    assert_eq!(group_replies(&mut c, group), oracle);
    expect(&c.cmd("QUIT").expect("QUIT"), "221 ");
    expect(&direct.cmd("QUIT").expect("QUIT"), "221 ");
    assert_no_improper_pipelining(&postfix);
}
