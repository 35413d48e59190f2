//! SMTP sessions through the proxy, against a scripted backend: what the
//! client is answered, and exactly what reaches the backend.
//!
//! No root or BPF needed: the proxy runs in-process with the kernel layer
//! off ([`TestProxy`]), the backend is [`ScriptedBackend`] on loopback, and
//! the client below speaks raw bytes so that every reply and every close can
//! be checked exactly. The STARTTLS tests drive `python3`'s `ssl` module and
//! need `openssl` for a throw-away certificate; without them they are
//! skipped with a message.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant, SystemTime},
};

use limiter_common::Reason;
use limiter_tests::{
    fixture,
    proxy::TestProxy,
    scripted::{base64_encode, Behaviour, FailMode, ScriptedBackend, BACKEND_421},
    tcp::{wait_until, DeadPort},
};
use limiter_user::config::BackendConnect;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long a client waits for a reply or for the proxy to close, and how
/// long the proxy's state may take to change (a slot freed, a MAIL queued):
/// generous, for a loaded CI machine; a passing test never waits it out.
const WAIT: Duration = Duration::from_secs(5);

// -- Helpers ---------------------------------------------------------------

/// An enforcing proxy relaying to `backend` without identity header, plus
/// `extra` TOML tables.
fn config(backend: SocketAddr, extra: &str) -> String {
    config_with("enforce", "none", backend, extra)
}

fn config_with(mode: &str, identity: &str, backend: SocketAddr, extra: &str) -> String {
    format!(
        r#"mode = "{mode}"

[[listen]]
address = "127.0.0.1:0"

[backend]
address = "{backend}"
identity = "{identity}"
connect_timeout = "2s"

[kernel]
mode = "off"

{extra}
"#
    )
}

/// `config` with the backend connected at accept (`backend.connect =
/// "on-connect"`), for what happens at that moment.
fn on_connect(config: &str) -> String {
    config.replace(
        "connect_timeout = \"2s\"\n",
        "connect_timeout = \"2s\"\nconnect = \"on-connect\"\n",
    )
}

fn start(backend: &ScriptedBackend, extra: &str) -> TestProxy {
    started(backend, &config(backend.addr(), extra))
}

/// The proxy for `config`, relaying to `backend`, once its first capability
/// probe is over (a proxy that connects at accept probes nothing); what the
/// probe did at the backend is forgotten, so that the test sees only its
/// own sessions there.
fn started(backend: &ScriptedBackend, config: &str) -> TestProxy {
    let proxy = TestProxy::start(config);
    if proxy.ctx.settings().connect == BackendConnect::OnMail {
        assert!(
            wait_until(WAIT, || proxy.ctx.capabilities.probed()),
            "the capability probe did not end"
        );
    }
    assert!(
        backend.wait_idle(WAIT),
        "the probe session did not end at the backend"
    );
    backend.forget();
    proxy
}

/// A raw SMTP client: whole replies (lines joined with '\n', without CRLF)
/// and an exact check that the server closed the connection.
struct Smtp {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Smtp {
    /// Connects without reading anything.
    fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect_timeout(&addr, WAIT).expect("connect to the proxy");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects from `source` (any 127/8 address works on loopback)
    /// without reading anything.
    fn open_from(addr: SocketAddr, source: IpAddr) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let stream = runtime
            .block_on(async {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                socket.connect(addr).await?.into_std()
            })
            .expect("connect to the proxy");
        stream.set_nonblocking(false).expect("blocking");
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects from `source`, expects a 220 greeting, says EHLO.
    fn session_from(addr: SocketAddr, source: IpAddr) -> Self {
        let mut client = Self::open_from(addr, source);
        expect(&client.reply(), "220 ");
        expect(&client.cmd("EHLO client.test"), "250");
        client
    }

    /// Connects and returns the greeting.
    fn connect(addr: SocketAddr) -> (Self, String) {
        let mut client = Self::open(addr);
        let greeting = client.reply();
        (client, greeting)
    }

    /// Connects, expects a 220 greeting, says `EHLO client.test`.
    fn session(addr: SocketAddr) -> Self {
        let (mut client, greeting) = Self::connect(addr);
        expect(&greeting, "220 ");
        expect(&client.cmd("EHLO client.test"), "250");
        client
    }

    fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the proxy");
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// The next whole reply.
    ///
    /// # Panics
    /// When the connection closes or nothing comes within [`WAIT`].
    #[track_caller]
    fn reply(&mut self) -> String {
        match self.try_reply() {
            Ok(reply) => reply,
            Err(e) => panic!("no reply: {e}"),
        }
    }

    fn try_reply(&mut self) -> Result<String, String> {
        loop {
            if let Some(reply) = self.take_reply() {
                return Ok(reply);
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(format!(
                        "connection closed (pending {:?})",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn take_reply(&mut self) -> Option<String> {
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(lf) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let raw = &self.buf[start..start + lf];
            let line = String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw)).into_owned();
            start += lf + 1;
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            lines.push(line);
            if last {
                self.buf.drain(..start);
                return Some(lines.join("\n"));
            }
        }
        None
    }

    /// The replies that came in the next single read of the socket (the
    /// buffer must be empty): what one write of the proxy held, if the
    /// proxy wrote before the read.
    fn replies_in_one_read(&mut self) -> Vec<String> {
        assert!(self.buf.is_empty(), "unread bytes: {:?}", self.buf);
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).expect("read from the proxy");
        self.buf.extend_from_slice(&chunk[..n]);
        let mut replies = Vec::new();
        while let Some(reply) = self.take_reply() {
            replies.push(reply);
        }
        assert!(self.buf.is_empty(), "a reply cut short: {:?}", self.buf);
        replies
    }

    /// Whether the server closes the connection within [`WAIT`] without
    /// sending anything more (unread bytes count as "not closed").
    fn closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => {
                self.buf.push(byte[0]);
                false
            }
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ),
        }
    }
}

/// The reply code.
fn code(reply: &str) -> u16 {
    reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[track_caller]
fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected a reply starting with {prefix:?}, got {reply:?}"
    );
}

/// Opens a transaction for alice@example.com and gets the 354.
fn start_data(c: &mut Smtp) {
    expect(&c.cmd("MAIL FROM:<sender@example.org>"), "250 ");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&c.cmd("DATA"), "354 ");
}

/// Whether any line the backend received starts with `prefix` (no case).
fn backend_saw(backend: &ScriptedBackend, prefix: &str) -> bool {
    backend.lines().iter().any(|l| {
        l.len() >= prefix.len()
            && l.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    })
}

/// [`start`] with one backend slot, waited for at most `slot_wait`.
fn one_slot(backend: &ScriptedBackend, slot_wait: &str, extra: &str) -> TestProxy {
    one_slot_with(backend, &format!("slot_wait = \"{slot_wait}\"\n"), extra)
}

/// [`one_slot`] with `backend_keys` in its `[backend]` table.
fn one_slot_with(backend: &ScriptedBackend, backend_keys: &str, extra: &str) -> TestProxy {
    let config = config(backend.addr(), extra).replace(
        "connect_timeout = \"2s\"\n",
        &format!("connect_timeout = \"2s\"\nmax_connections = 1\n{backend_keys}"),
    );
    started(backend, &config)
}

/// The proxy's copy of messages off (`backend.spool_size = 0`): a slow
/// client keeps or loses its slot by the rate of its message alone.
const NO_SPOOL: &str = "slot_wait = \"10s\"\nspool_size = 0\n";

fn blocked(proxy: &TestProxy) -> Option<limiter_user::blocks::Block> {
    proxy.ctx.blocks.covering(LOCALHOST, SystemTime::now())
}

// -- 1. A whole transaction ------------------------------------------------

#[test]
fn whole_transaction_is_relayed_byte_for_byte() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    assert_eq!(greeting, "220 backend.test ESMTP");
    expect(&c.cmd("EHLO client.test"), "250-");
    assert_eq!(c.cmd("MAIL FROM:<sender@example.org>"), "250 2.1.0 Ok");
    assert_eq!(c.cmd("RCPT TO:<alice@example.com>"), "250 2.1.5 Ok");
    expect(&c.cmd("DATA"), "354 ");
    let body = b"Subject: test\r\n\r\nfirst line\r\n..leading dot\r\nlast line\r\n";
    c.send(body);
    c.send(b".\r\n");
    assert_eq!(c.reply(), "250 2.0.0 Ok: queued as 1");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(c.closed());
    // The client's QUIT is answered at once; the backend's connection ends
    // once it has had its own.
    assert!(
        backend.wait_idle(WAIT),
        "the backend connection did not end"
    );

    assert_eq!(backend.messages(), vec![body.to_vec()]);
    assert_eq!(
        backend.lines(),
        [
            "EHLO client.test",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<alice@example.com>",
            "DATA",
            "Subject: test",
            "",
            "first line",
            "..leading dot",
            "last line",
            ".",
            "QUIT",
        ]
    );
    assert_eq!(proxy.ctx.stats.messages.load(Ordering::Relaxed), 1);
}

// -- 2. EHLO filtering -----------------------------------------------------

#[test]
fn ehlo_reply_offers_only_what_the_proxy_follows() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_message_size = \"1MB\"\n");
    let (mut c, _) = Smtp::connect(proxy.addr);
    let ehlo = c.cmd("EHLO client.test");
    let capabilities: Vec<&str> = ehlo.lines().skip(1).map(|l| &l[4..]).collect();
    // Dropped: what the proxy does not follow (CHUNKING), what only the
    // proxy may use (XCLIENT, XFORWARD), the backend's TLS, VRFY (answered
    // by the proxy itself) and ETRN (not in smtp.relay_verbs).
    for dropped in [
        "CHUNKING", "XCLIENT", "XFORWARD", "STARTTLS", "VRFY", "ETRN",
    ] {
        assert!(
            !capabilities.iter().any(|c| c.starts_with(dropped)),
            "{dropped} offered: {ehlo}"
        );
    }
    let mut offered = capabilities.clone();
    offered.sort_unstable();
    assert_eq!(
        offered,
        [
            "8BITMIME",
            "AUTH PLAIN LOGIN",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "PIPELINING",
            "SIZE 1000000",
            "SMTPUTF8",
        ],
        "the backend's own, with the proxy's SIZE"
    );
    // What is not offered cannot be used either.
    assert_eq!(code(&c.cmd("BDAT 10 LAST")), 502);
    assert_eq!(code(&c.cmd("STARTTLS")), 502);
    assert_eq!(code(&c.cmd("ETRN example.com")), 502);
    for verb in ["BDAT", "STARTTLS", "ETRN"] {
        assert!(!backend_saw(&backend, verb), "{verb} reached the backend");
    }
}

// -- 3. PIPELINING ---------------------------------------------------------

#[test]
fn pipelined_commands_get_their_replies_in_order() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<nobody@example.com>\r\nDATA\r\n");
    let replies: Vec<String> = (0..4).map(|_| c.reply()).collect();
    assert_eq!(
        replies.iter().map(|r| code(r)).collect::<Vec<_>>(),
        [250, 250, 550, 354],
        "{replies:?}"
    );
    expect(&replies[2], "550 5.1.1 <nobody@example.com>");
    // Commands pipelined right after the end of the message.
    c.send(b"hi\r\n.\r\nRSET\r\nQUIT\r\n");
    assert_eq!(c.reply(), "250 2.0.0 Ok: queued as 1");
    assert_eq!(c.reply(), "250 2.0.0 Ok");
    assert_eq!(c.reply(), "221 2.0.0 Bye");
    assert!(c.closed());
    assert_eq!(backend.messages(), vec![b"hi\r\n".to_vec()]);
}

/// The codes of `replies`.
fn codes(replies: &[String]) -> Vec<u16> {
    replies.iter().map(|r| code(r)).collect()
}

#[test]
fn refused_commands_in_a_pipelined_group_are_answered_in_place_and_never_relayed() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[relay]\naccept = \"*@example.com\"\n");
    let mut c = Smtp::session(proxy.addr);
    c.send(
        b"MAIL FROM:<a@x>\r\nRCPT TO:<other@elsewhere.test>\r\nRCPT TO:<alice@example.com>\r\n\
          RCPT TO:<nobody@example.com>\r\nRCPT TO:<bob@example.com\r\nDATA\r\n",
    );
    // Every reply, the proxy's own in their places, in one write.
    let replies = c.replies_in_one_read();
    assert_eq!(
        codes(&replies),
        [250, 550, 250, 550, 501, 354],
        "{replies:?}"
    );
    expect(&replies[1], "550 5.7.1");
    expect(&replies[3], "550 5.1.1 <nobody@example.com>");
    c.send(b"Subject: piped\r\n\r\nbody\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0 Ok: queued as 1");
    assert_eq!(
        backend.messages(),
        vec![b"Subject: piped\r\n\r\nbody\r\n".to_vec()]
    );
    // Neither refused recipient reached the backend.
    assert_eq!(
        &backend.lines()[..5],
        [
            "EHLO client.test",
            "MAIL FROM:<a@x>",
            "RCPT TO:<alice@example.com>",
            "RCPT TO:<nobody@example.com>",
            "DATA",
        ]
    );
    assert_eq!(rejections(&proxy, "relay-denied"), 1);
    assert_eq!(rejections(&proxy, "bad-recipient-syntax"), 1);
}

#[test]
fn recipients_after_a_mail_the_backend_refused_get_postfixs_503_and_count_for_nothing() {
    let backend = ScriptedBackend::start(Behaviour::default());
    // One failed recipient more than this would be a harvest.
    let proxy = start(&backend, "[limits]\nmax_failed_rcpt = 1\n");
    let mut c = Smtp::session(proxy.addr);
    // Within the proxy's SIZE, over the backend's: the backend refuses.
    c.send(
        b"MAIL FROM:<a@x> SIZE=20000000\r\nRCPT TO:<alice@example.com>\r\n\
          RCPT TO:<nobody@example.com>\r\nDATA\r\n",
    );
    let replies = c.replies_in_one_read();
    assert_eq!(codes(&replies), [552, 503, 503, 503], "{replies:?}");
    assert_eq!(replies[1], "503 5.5.1 Error: need MAIL command");
    assert_eq!(replies[2], "503 5.5.1 Error: need MAIL command");
    assert!(blocked(&proxy).is_none());
    // The session goes on, and its next group delivers.
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n");
    assert_eq!(codes(&c.replies_in_one_read()), [250, 250, 354]);
    c.send(b"hi\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0 Ok: queued as 1");
    assert_eq!(backend.messages(), vec![b"hi\r\n".to_vec()]);
    assert_eq!(proxy.ctx.stats.messages.load(Ordering::Relaxed), 1);
}

#[test]
fn harvesting_in_a_pipelined_group_ends_the_session_at_the_same_recipient() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nmax_failed_rcpt = 2\n");
    let mut c = Smtp::session(proxy.addr);
    c.send(
        b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody1@example.com>\r\nRCPT TO:<nobody2@example.com>\r\n\
          RCPT TO:<nobody3@example.com>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n",
    );
    // As one at a time: the third failure is over the limit.
    let replies = c.replies_in_one_read();
    assert_eq!(codes(&replies), [250, 550, 550, 421], "{replies:?}");
    expect(&replies[3], "421 4.7.0");
    assert!(c.closed());
    let block = blocked(&proxy).expect("127.0.0.1 blocked");
    assert_eq!(block.origin, Reason::Harvest);
    assert!(
        backend.wait_idle(WAIT),
        "the backend connection did not end"
    );
    assert!(backend.messages().is_empty());
}

#[test]
fn a_pipelined_group_counts_toward_max_commands_before_mail_when_its_mail_fails() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_commands_before_mail = 4\n");
    // EHLO, MAIL (refused by the backend), RCPT, RCPT: four; RSET is one
    // too many, as when each waits for its reply.
    let mut c = Smtp::session(proxy.addr);
    c.send(
        b"MAIL FROM:<a@x> SIZE=20000000\r\nRCPT TO:<alice@example.com>\r\n\
          RCPT TO:<bob@example.com>\r\nRSET\r\nNOOP\r\n",
    );
    let replies = c.replies_in_one_read();
    assert_eq!(codes(&replies), [552, 503, 503, 421], "{replies:?}");
    expect(&replies[3], "421 4.7.0");
    assert!(c.closed());
    assert_eq!(proxy.shed("too-many-commands"), 1);
    // A group whose MAIL is accepted is a sender's: nothing after it counts.
    let mut sender = Smtp::session(proxy.addr);
    sender.send(
        b"MAIL FROM:<a@x>\r\nRCPT TO:<alice@example.com>\r\nRCPT TO:<bob@example.com>\r\n\
          RCPT TO:<carol@example.com>\r\nRSET\r\n",
    );
    assert_eq!(
        codes(&sender.replies_in_one_read()),
        [250, 250, 250, 250, 250]
    );
    assert_eq!(sender.cmd("NOOP"), "250 2.0.0 Ok");
}

#[test]
fn a_backend_without_pipelining_still_serves_a_pipelining_client() {
    // The backend does not offer PIPELINING (so neither does the proxy);
    // a client that pipelines anyway is served, its commands passed on one
    // at a time (against a real Postfix that would drop the proxy
    // otherwise: flood_e2e's HELO session).
    let backend = ScriptedBackend::start(Behaviour::default().without_capability("PIPELINING"));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n");
    let replies: Vec<String> = (0..3).map(|_| c.reply()).collect();
    assert_eq!(codes(&replies), [250, 250, 354], "{replies:?}");
    c.send(b"hi\r\n.\r\n");
    expect(&c.reply(), "250 2.0.0 Ok: queued as 1");
    assert_eq!(backend.messages(), vec![b"hi\r\n".to_vec()]);
}

#[test]
fn a_backend_refusing_data_after_the_proxys_354_gets_the_client_its_refusal() {
    // The proxy says 354 while the backend's answer to DATA is on its way;
    // here it is a 421: the message goes nowhere and the client gets it.
    let backend = ScriptedBackend::start(Behaviour::failing("DATA", FailMode::Reply421));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n");
    assert_eq!(c.reply(), BACKEND_421);
    assert!(c.closed());
    assert!(backend.messages().is_empty());
    assert_eq!(proxy.ctx.stats.messages.load(Ordering::Relaxed), 0);
    assert!(
        !backend_saw(&backend, "Subject"),
        "the message reached a backend that refused DATA: {:?}",
        backend.lines()
    );
}

// -- 4. Relay rules --------------------------------------------------------

#[test]
fn foreign_recipients_are_refused_without_asking_the_backend() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[relay]\naccept = \"*@example.com\"\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&c.cmd("RCPT TO:<other@elsewhere.test>"), "550 5.7.1");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    assert!(backend_saw(&backend, "RCPT TO:<alice@example.com>"));
    assert!(
        !backend.stream().contains("elsewhere.test"),
        "{:?}",
        backend.lines()
    );
}

// -- 5. Harvesting ---------------------------------------------------------

#[test]
fn a_block_ends_the_sources_other_open_sessions() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nmax_failed_rcpt = 1\n");
    // An idle second session of the same source …
    let mut idle = Smtp::session(proxy.addr);
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&c.cmd("RCPT TO:<nobody1@example.com>"), "550 5.1.1");
    expect(&c.cmd("RCPT TO:<nobody2@example.com>"), "421 4.7.0");
    // … is told at once, not after the command timeout.
    expect(&idle.reply(), "421 4.7.0");
    assert!(idle.closed());
}

#[test]
fn harvesting_closes_the_session_and_blocks_the_source() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nmax_failed_rcpt = 3\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    for i in 1..=3 {
        expect(
            &c.cmd(&format!("RCPT TO:<nobody{i}@example.com>")),
            "550 5.1.1",
        );
    }
    expect(&c.cmd("RCPT TO:<nobody4@example.com>"), "421 4.7.0");
    assert!(c.closed());

    let block = blocked(&proxy).expect("127.0.0.1 blocked");
    assert_eq!(block.net, "127.0.0.1/32".parse().unwrap());
    assert_eq!(block.origin, Reason::Harvest);
    let (mut again, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.7.0");
    assert!(again.closed());
    assert_eq!(
        backend.connections(),
        1,
        "a blocked source never reaches the backend"
    );
}

#[test]
fn a_successful_recipient_resets_the_harvest_count() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nmax_failed_rcpt = 3\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    for (rcpt, want) in [
        ("nobody1", 550),
        ("nobody2", 550),
        ("alice", 250),
        ("nobody3", 550),
        ("nobody4", 550),
        ("nobody5", 550),
    ] {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}@example.com>"));
        assert_eq!(code(&reply), want, "{rcpt}: {reply}");
    }
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert!(blocked(&proxy).is_none());
}

// -- 6. SMTP smuggling -----------------------------------------------------

/// Sends `body` after DATA: the client must get 550 5.5.2 and be closed,
/// and the (lenient) backend must never see an end of message.
fn smuggling_is_refused(body: &[u8]) {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(body);
    expect(&c.reply(), "550 5.5.2");
    assert!(c.closed());
    assert!(backend.wait_idle(WAIT), "backend connection not closed");
    assert!(backend.messages().is_empty(), "{:?}", backend.messages());
    let stream = backend.stream();
    assert!(!stream.contains("\r\n.\r\n"), "{stream:?}");
    assert!(!stream.contains("smuggled@evil.test"), "{stream:?}");
}

const SMUGGLED: &str =
    "MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n";

#[test]
fn smuggling_with_bare_lf_dot_bare_lf_is_refused() {
    smuggling_is_refused(format!("Subject: hi\r\n\r\nhello\n.\n{SMUGGLED}").as_bytes());
}

#[test]
fn smuggling_with_crlf_dot_bare_lf_is_refused() {
    smuggling_is_refused(format!("Subject: hi\r\n\r\nhello\r\n.\n{SMUGGLED}").as_bytes());
}

#[test]
fn smuggling_with_bare_cr_is_refused() {
    smuggling_is_refused(format!("Subject: hi\r\n\r\nhello\r.\r{SMUGGLED}").as_bytes());
}

#[test]
fn overlong_message_line_is_refused_and_not_stored() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(&body_of(1, 1500));
    c.send(b".\r\n");
    let reply = c.reply();
    assert!(matches!(code(&reply), 500 | 550), "{reply}");
    expect(&reply[4..], "5.5.2");
    assert!(c.closed());
    assert!(backend.wait_idle(WAIT));
    assert!(backend.messages().is_empty());
}

#[test]
fn data_violations_are_named_in_the_reply() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"hello\r.\r\n");
    let bare_cr = c.reply();
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(&body_of(1, 1500));
    let too_long = c.reply();
    assert_eq!(
        [bare_cr.as_str(), too_long.as_str()],
        [
            "550 5.5.2 Error: bare <CR> received",
            "550 5.5.2 Error: message line too long"
        ]
    );
}

#[test]
fn bare_cr_in_a_command_never_reaches_the_backend() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    c.send(b"NOOP\rRSET\r\n");
    let reply = c.reply();
    assert!(matches!(code(&reply), 500 | 501), "{reply}");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    let lines = backend.lines();
    assert!(!lines.iter().any(|l| l.contains('\r')), "{lines:?}");
}

// -- 7. Backend failures ---------------------------------------------------

#[test]
fn backend_down_at_connect_gets_421() {
    let dead = DeadPort::new().expect("a dead port");
    let proxy = TestProxy::start(&on_connect(&config(dead.addr(), "")));
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.3.0");
    assert!(c.closed());
}

#[test]
fn backend_silent_at_greeting_gets_421() {
    let backend = ScriptedBackend::start(Behaviour {
        greeting_delay: Duration::from_secs(30),
        ..Behaviour::default()
    });
    let proxy = TestProxy::start(&on_connect(&config(
        backend.addr(),
        "[smtp]\nbackend_timeout = \"1s\"\n",
    )));
    let started = Instant::now();
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.3.0");
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(c.closed());
}

#[test]
fn backend_421_mid_session_closes_the_client() {
    let backend = ScriptedBackend::start(Behaviour::failing("RCPT", FailMode::Reply421));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    let reply = c.cmd("RCPT TO:<alice@example.com>");
    assert_eq!(code(&reply), 421, "{reply}");
    // RFC 5321 §3.8: after a 421 the channel closes; the backend's is gone.
    assert!(
        c.closed(),
        "the proxy kept the session open after relaying {reply:?}"
    );
}

#[test]
fn backend_closing_mid_message_is_never_acknowledged() {
    let backend = ScriptedBackend::start(Behaviour::failing("X-Die", FailMode::Close));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"Subject: x\r\nX-Die: now\r\n\r\nbody\r\n.\r\n");
    expect(&c.reply(), "451 4.3.0");
    assert!(c.closed());
    assert!(backend.messages().is_empty());
    assert_eq!(proxy.ctx.stats.messages.load(Ordering::Relaxed), 0);
}

#[test]
fn backend_closing_at_end_of_data_is_never_acknowledged() {
    let backend = ScriptedBackend::start(Behaviour::failing(".", FailMode::Close));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n");
    expect(&c.reply(), "451 4.3.0");
    assert!(c.closed());
    assert!(backend.messages().is_empty());
}

#[test]
fn backend_hanging_times_out_with_421() {
    let backend = ScriptedBackend::start(Behaviour::failing("MAIL", FailMode::Hang));
    let proxy = start(&backend, "[smtp]\nbackend_timeout = \"1s\"\n");
    let mut c = Smtp::session(proxy.addr);
    let started = Instant::now();
    expect(&c.cmd("MAIL FROM:<a@x>"), "421 4.3.0");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert!(c.closed());
}

#[test]
fn xclient_refused_by_the_backend_gets_421() {
    let backend = ScriptedBackend::start(Behaviour::default().without_capability("XCLIENT"));
    let proxy = started(
        &backend,
        &on_connect(&config_with("enforce", "xclient", backend.addr(), "")),
    );
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "220 ");
    expect(&c.cmd("EHLO client.test"), "421 4.3.0");
    assert!(c.closed());
    assert!(!backend_saw(&backend, "XCLIENT"));
}

// -- 8. Client-injected identity -------------------------------------------

#[test]
fn client_cannot_inject_identity_commands() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let (mut c, _) = Smtp::connect(proxy.addr);
    let attempts = [
        "XCLIENT ADDR=1.2.3.4",
        "xclient ADDR=1.2.3.4 NAME=spoofed.test",
        "XFORWARD ADDR=1.2.3.4",
        "PROXY TCP4 1.2.3.4 127.0.0.1 4000 25",
    ];
    for line in attempts {
        let reply = c.cmd(line);
        assert!(matches!(code(&reply), 500 | 502), "{line}: {reply}");
    }
    expect(&c.cmd("EHLO client.test"), "250");
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    for line in attempts {
        let reply = c.cmd(line);
        assert!(matches!(code(&reply), 500 | 502), "{line}: {reply}");
    }
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    for verb in ["XCLIENT", "XFORWARD", "PROXY"] {
        assert!(!backend_saw(&backend, verb), "{:?}", backend.lines());
    }
    assert!(!backend.stream().contains("1.2.3.4"));
}

// -- 9. The client's identity for the backend ------------------------------

#[test]
fn proxy_v2_header_names_the_client() {
    let backend = ScriptedBackend::start(Behaviour {
        expect_proxy_v2: true,
        ..Behaviour::default()
    });
    let proxy = started(
        &backend,
        &config_with("enforce", "proxy-v2", backend.addr(), ""),
    );
    let mut c = Smtp::session(proxy.addr);
    let client = c.local_addr();
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert_eq!(backend.proxy_sources(), vec![client]);
    assert_eq!(backend.proxy_sources()[0].ip(), LOCALHOST);
    assert_eq!(backend.received()[0], "EHLO client.test\r\n");
}

#[test]
fn proxy_v1_header_names_the_client() {
    let backend = ScriptedBackend::start(Behaviour {
        expect_proxy_v1: true,
        ..Behaviour::default()
    });
    let proxy = started(
        &backend,
        &config_with("enforce", "proxy-v1", backend.addr(), ""),
    );
    let mut c = Smtp::session(proxy.addr);
    let client = c.local_addr();
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert_eq!(backend.proxy_sources(), vec![client]);
    assert_eq!(backend.received()[0], "EHLO client.test\r\n");
}

#[test]
fn xclient_names_the_client_after_an_ehlo_of_the_proxy() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = started(
        &backend,
        &config_with("enforce", "xclient", backend.addr(), ""),
    );
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    assert_eq!(greeting, "220 backend.test ESMTP");
    let client = c.local_addr();
    let ehlo = c.cmd("EHLO client.test");
    expect(&ehlo, "250-");
    assert!(!ehlo.contains("XCLIENT"), "{ehlo}");
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    let lines = backend.lines();
    assert!(
        lines[0].starts_with("EHLO ") && lines[0] != "EHLO client.test",
        "{lines:?}"
    );
    assert_eq!(
        lines[1],
        format!(
            "XCLIENT ADDR=127.0.0.1 PORT={} NAME=[UNAVAILABLE] PROTO=ESMTP HELO=client.test",
            client.port()
        )
    );
    assert_eq!(lines[2], "EHLO client.test");
    assert_eq!(lines[3], "MAIL FROM:<a@x>");
    assert!(backend.proxy_sources().is_empty());
}

#[test]
fn identity_none_sends_nothing_before_the_client() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(
        backend.wait_idle(WAIT),
        "the backend connection did not end"
    );
    assert_eq!(
        backend.lines(),
        ["EHLO client.test", "MAIL FROM:<a@x>", "QUIT"]
    );
    assert!(backend.proxy_sources().is_empty());
}

// -- 10. AUTH --------------------------------------------------------------

#[test]
fn failed_auth_blocks_the_source() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nmax_failed_auth = 2\n");
    let mut c = Smtp::session(proxy.addr);
    let wrong = base64_encode(b"\0user\0wrong");
    for _ in 0..2 {
        expect(&c.cmd(&format!("AUTH PLAIN {wrong}")), "535 5.7.8");
    }
    expect(&c.cmd(&format!("AUTH PLAIN {wrong}")), "421 4.7.0");
    assert!(c.closed());
    let block = blocked(&proxy).expect("127.0.0.1 blocked");
    assert_eq!(block.origin, Reason::Auth);
    let (mut again, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.7.0");
    assert!(again.closed());
}

#[test]
fn auth_login_challenges_are_relayed() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    assert_eq!(c.cmd("AUTH LOGIN"), "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd(&base64_encode(b"user")), "334 UGFzc3dvcmQ6");
    assert_eq!(
        c.cmd(&base64_encode(b"secret")),
        "235 2.7.0 Authentication successful"
    );
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert!(backend_saw(&backend, &base64_encode(b"secret")));
}

#[test]
fn auth_plain_is_relayed() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    let good = base64_encode(b"\0user\0secret");
    expect(&c.cmd("AUTH PLAIN"), "334");
    assert_eq!(c.cmd(&good), "235 2.7.0 Authentication successful");
}

// -- 11. Limits ------------------------------------------------------------

#[test]
fn overlong_command_is_refused_and_the_session_goes_on() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    let long = format!("NOOP {}", "x".repeat(595));
    assert_eq!(long.len(), 600);
    expect(&c.cmd(&long), "500 5.5.2");
    // Longer than any buffer the proxy keeps (AUTH lines: 12288).
    expect(&c.cmd(&format!("NOOP {}", "y".repeat(20_000))), "500 5.5.2");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert!(
        backend.lines().iter().all(|l| l.len() <= 512),
        "{:?}",
        backend.lines()
    );
}

#[test]
fn nul_in_a_command_is_refused() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    c.send(b"MAIL FROM:<a\0b@x>\r\n");
    expect(&c.reply(), "500 ");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert!(!backend.stream().contains('\0'));
    assert!(!backend_saw(&backend, "MAIL"));
}

#[test]
fn recipients_over_the_limit_get_452() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_recipients = 2\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&c.cmd("RCPT TO:<bob@example.com>"), "250 ");
    expect(&c.cmd("RCPT TO:<carol@example.com>"), "452 4.5.3");
    assert!(!backend.stream().contains("carol"));
    // A new transaction starts counting afresh.
    assert_eq!(c.cmd("RSET"), "250 2.0.0 Ok");
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&c.cmd("RCPT TO:<carol@example.com>"), "250 ");
}

#[test]
fn declared_size_over_the_limit_gets_552() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_message_size = \"1MB\"\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x> SIZE=99999999"), "552 5.3.4");
    assert!(!backend_saw(&backend, "MAIL"));
    expect(&c.cmd("MAIL FROM:<a@x> SIZE=1000000"), "250 ");
}

/// `lines` lines of `width` bytes each, CRLF included.
fn body_of(lines: usize, width: usize) -> Vec<u8> {
    let mut body = Vec::new();
    for _ in 0..lines {
        body.extend(std::iter::repeat_n(b'a', width - 2));
        body.extend_from_slice(b"\r\n");
    }
    body
}

#[test]
fn message_over_the_limit_gets_552_and_is_not_stored() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_message_size = \"2000\"\n");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(&body_of(30, 100));
    c.send(b".\r\n");
    expect(&c.reply(), "552 5.3.4");
    assert!(backend.messages().is_empty());
    assert!(!backend.stream().contains("\r\n.\r\n"));
    // The session goes on, on a new backend connection.
    start_data(&mut c);
    c.send(b"small\r\n.\r\n");
    expect(&c.reply(), "250 ");
    assert_eq!(backend.messages(), vec![b"small\r\n".to_vec()]);
    assert_eq!(backend.connections(), 2);
}

#[test]
fn message_of_exactly_the_limit_is_accepted() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_message_size = \"1000\"\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x> SIZE=1000"), "250 ");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&c.cmd("DATA"), "354 ");
    let body = body_of(10, 100);
    assert_eq!(body.len(), 1000);
    c.send(&body);
    c.send(b".\r\n");
    expect(&c.reply(), "250 ");
    assert_eq!(backend.messages(), vec![body]);
}

#[test]
fn vrfy_and_expn_are_answered_by_the_proxy() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("VRFY alice"), "252 2.0.0");
    expect(&c.cmd("EXPN staff"), "502 ");
    assert!(!backend_saw(&backend, "VRFY") && !backend_saw(&backend, "EXPN"));
}

// -- 12. Connections per source --------------------------------------------

#[test]
fn connections_over_the_source_cap_get_421() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nmax_connections_per_source = 2\n");
    let (mut first, g1) = Smtp::connect(proxy.addr);
    let (_second, g2) = Smtp::connect(proxy.addr);
    expect(&g1, "220 ");
    expect(&g2, "220 ");
    let (mut third, g3) = Smtp::connect(proxy.addr);
    expect(&g3, "421 4.7.0");
    assert!(third.closed());

    assert_eq!(first.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(first.closed());
    // The session's place is released when it has ended: allow a moment.
    let end = Instant::now() + WAIT;
    loop {
        let (_c, greeting) = Smtp::connect(proxy.addr);
        if greeting.starts_with("220 ") {
            break;
        }
        assert!(Instant::now() < end, "still refused: {greeting}");
        thread::sleep(Duration::from_millis(50));
    }
}

// -- 13. HELO --------------------------------------------------------------

#[test]
fn rejected_helo_gets_550_and_the_session_goes_on() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[lists]\nreject_helo = [\"*.dynamic.example\"]\n");
    let (mut c, _) = Smtp::connect(proxy.addr);
    expect(&c.cmd("EHLO host.dynamic.example"), "550 5.7.1");
    expect(&c.cmd("MAIL FROM:<a@x>"), "503 ");
    assert!(!backend.stream().contains("dynamic.example"));
}

#[test]
fn rejected_helo_never_reaches_the_backend() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[lists]\nreject_helo = [\"*.dynamic.example\"]\n");
    let (mut c, _) = Smtp::connect(proxy.addr);
    let reply = c.cmd("EHLO host.dynamic.example");
    assert!(matches!(code(&reply), 550 | 554), "{reply}");
    expect(&reply[4..], "5.7.1");
    assert!(!backend.stream().contains("dynamic.example"));
    assert!(!backend_saw(&backend, "MAIL"));
}

#[test]
fn sessions_over_a_helo_cap_get_421() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[[limits.helo]]\npattern = \"*.bounces.test\"\nmax_connections = 1\n",
    );
    let (mut first, _) = Smtp::connect(proxy.addr);
    expect(&first.cmd("EHLO mx.bounces.test"), "250");
    // Repeating its own name does not count twice.
    expect(&first.cmd("EHLO mx.bounces.test"), "250");
    let (mut second, _) = Smtp::connect(proxy.addr);
    expect(&second.cmd("EHLO mx.bounces.test"), "421 4.7.0");
    assert!(second.closed());
    // Other names are not affected.
    let (mut other, _) = Smtp::connect(proxy.addr);
    expect(&other.cmd("EHLO mx.elsewhere.test"), "250");
    // The place is free once the first session ended.
    assert_eq!(first.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(first.closed());
    let end = Instant::now() + WAIT;
    loop {
        let (mut c, _) = Smtp::connect(proxy.addr);
        let reply = c.cmd("EHLO mx.bounces.test");
        if reply.starts_with("250") {
            break;
        }
        assert!(Instant::now() < end, "still refused: {reply}");
        thread::sleep(Duration::from_millis(50));
    }
}

// -- 14. Null-sender rate --------------------------------------------------

#[test]
fn null_sender_over_the_rate_gets_450() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nnull_sender_rate = \"2/1m\"\n");
    let mut c = Smtp::session(proxy.addr);
    for _ in 0..2 {
        expect(&c.cmd("MAIL FROM:<>"), "250 ");
        // A bounce's MAIL goes to the backend with its first RCPT.
        expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
        assert_eq!(c.cmd("RSET"), "250 2.0.0 Ok");
    }
    expect(&c.cmd("MAIL FROM:<>"), "450 4.7.1");
    // Only null senders are limited; the session goes on.
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    let null_mails = backend
        .lines()
        .iter()
        .filter(|l| *l == "MAIL FROM:<>")
        .count();
    assert_eq!(null_mails, 2);
}

#[test]
fn allowlisted_source_is_never_limited() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let extra = "[limits]\nmax_failed_rcpt = 1\nmax_connections_per_source = 1\n\n\
                 [relay]\naccept = \"*@example.com\"\n\n[lists]\nallow = [\"127.0.0.1\"]\n";
    let proxy = start(&backend, extra);
    let _other = Smtp::session(proxy.addr);
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    for i in 1..=3 {
        expect(
            &c.cmd(&format!("RCPT TO:<nobody{i}@example.com>")),
            "550 5.1.1",
        );
    }
    // Relay rules are left to the backend for allow-listed sources.
    expect(
        &c.cmd("RCPT TO:<other@elsewhere.test>"),
        "550 5.1.1 <other@elsewhere.test>",
    );
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert!(proxy.ctx.blocks.is_empty());
}

// -- 15. Observe mode ------------------------------------------------------

#[test]
fn observe_mode_refuses_nothing() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let extra = "[limits]\nmax_failed_rcpt = 2\n\n[relay]\naccept = \"*@example.com\"\n";
    let proxy = started(
        &backend,
        &config_with("observe", "none", backend.addr(), extra),
    );
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    for i in 1..=5 {
        let reply = c.cmd(&format!("RCPT TO:<nobody{i}@example.com>"));
        assert_eq!(
            reply,
            format!("550 5.1.1 <nobody{i}@example.com>: Recipient address rejected: User unknown"),
        );
    }
    // Relay rules are only reported too: the backend decides.
    expect(
        &c.cmd("RCPT TO:<other@elsewhere.test>"),
        "550 5.1.1 <other@elsewhere.test>",
    );
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(
        backend
            .lines()
            .iter()
            .filter(|l| l.starts_with("RCPT"))
            .count(),
        6
    );
    assert!(blocked(&proxy).is_none());
    assert!(proxy.ctx.blocks.is_empty());
    let (_again, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "220 ");
}

// -- 16. Timeouts and pregreet ---------------------------------------------

#[test]
fn idle_client_gets_421_and_is_closed() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\ncommand_timeout = \"1s\"\n");
    let mut c = Smtp::session(proxy.addr);
    let started = Instant::now();
    expect(&c.reply(), "421 4.4.2");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    assert!(c.closed());
}

#[test]
fn client_talking_before_the_greeting_gets_554() {
    // The backend greets late, so the client has surely spoken first.
    let backend = ScriptedBackend::start(Behaviour {
        greeting_delay: Duration::from_millis(300),
        ..Behaviour::default()
    });
    let proxy = started(&backend, &on_connect(&config(backend.addr(), "")));
    let mut c = Smtp::open(proxy.addr);
    c.send(b"EHLO x\r\n");
    expect(&c.reply(), "554 5.5.1");
    assert!(c.closed());
    assert!(!backend_saw(&backend, "EHLO"));
}

#[test]
fn client_idle_in_data_stores_nothing() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\ndata_timeout = \"1s\"\n");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"Subject: x\r\n\r\npartial");
    let started = Instant::now();
    // Whatever is said, the connection ends within a few seconds …
    let _ = c.try_reply();
    assert!(c.closed());
    assert!(started.elapsed() < Duration::from_secs(4));
    // … and the backend keeps nothing.
    assert!(backend.wait_idle(WAIT));
    assert!(backend.messages().is_empty());
}

#[test]
fn client_idle_in_data_gets_421() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\ndata_timeout = \"1s\"\n");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"Subject: x\r\n\r\npartial");
    expect(&c.reply(), "421 4.4.2");
    assert!(c.closed());
}

#[test]
fn session_over_its_time_gets_421() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nsession_timeout = \"1s\"\n");
    let mut c = Smtp::session(proxy.addr);
    let started = Instant::now();
    let reply = loop {
        let reply = c.cmd("NOOP");
        if reply != "250 2.0.0 Ok" {
            break reply;
        }
        assert!(started.elapsed() < Duration::from_secs(4), "still served");
        // The behaviour under test: a client that is never idle for long,
        // so that only the session's total time can end it.
        thread::sleep(Duration::from_millis(200));
    };
    expect(&reply, "421 4.4.2");
    assert!(c.closed());
}

// -- 17. STARTTLS ----------------------------------------------------------

/// A throw-away self-signed certificate; removed on drop.
struct TlsFiles {
    dir: PathBuf,
}

impl TlsFiles {
    /// `None` (with a message) when openssl or python3 is missing; under
    /// `CI=true` that fails the test instead.
    fn generate(test: &str) -> Option<Self> {
        for tool in ["openssl", "python3"] {
            let found = Command::new(tool).arg("--version").output().is_ok()
                || Command::new(tool).arg("version").output().is_ok();
            if !fixture::require(test, (!found).then(|| format!("{tool} not found"))) {
                return None;
            }
        }
        let dir =
            std::env::temp_dir().join(format!("proxy-sessions-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let files = Self { dir };
        files.issue();
        Some(files)
    }

    /// A new key and certificate in the same files (as a renewal does).
    fn issue(&self) {
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
            .arg(self.key())
            .arg("-out")
            .arg(self.cert())
            .args(["-days", "1", "-subj", "/CN=localhost"])
            .output()
            .expect("run openssl");
        assert!(
            status.status.success(),
            "openssl: {}",
            String::from_utf8_lossy(&status.stderr)
        );
    }

    /// The certificate's SHA-256 fingerprint, lowercase hex (as
    /// [`PY_CLIENT`]'s `cert` step prints it).
    fn fingerprint(&self) -> String {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(self.cert())
            .output()
            .expect("run openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (_, hex) = text
            .trim()
            .split_once('=')
            .unwrap_or_else(|| panic!("openssl fingerprint: {text}"));
        hex.replace(':', "").to_ascii_lowercase()
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn config(&self, backend: SocketAddr) -> String {
        format!(
            r#"[[listen]]
address = "127.0.0.1:0"
tls = "starttls"

[tls]
certificate = "{}"
key = "{}"

[backend]
address = "{backend}"
identity = "none"

[kernel]
mode = "off"
"#,
            self.cert().display(),
            self.key().display()
        )
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client in python3: prints every reply on one line (lines joined with
/// '|'), `TLS <version>` after the handshake, `EOF` when the server closed,
/// `TIMEOUT` when no reply came within 3 s.
/// argv: port, then the script as words: `>LINE` sends LINE and reads the
/// reply, `!BYTES` sends BYTES (`\r\n` escapes) without reading, `<` reads
/// one reply, `tls` does the handshake, `cert` prints `CERT <sha-256 of the
/// server's certificate>`; `implicit` as the first step does the handshake
/// before the greeting (an implicit-TLS listener).
const PY_CLIENT: &str = r#"
import hashlib, socket, ssl, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=3)
buf = b""
def reply():
    global buf
    lines = []
    while True:
        while b"\r\n" not in buf:
            try:
                chunk = sock.recv(4096)
            except (TimeoutError, socket.timeout):
                print("TIMEOUT", flush=True)
                sys.exit(0)
            if not chunk:
                print("EOF", flush=True)
                sys.exit(0)
            buf += chunk
        line, buf = buf.split(b"\r\n", 1)
        line = line.decode("utf-8", "replace")
        lines.append(line)
        if len(line) < 4 or line[3] == " ":
            print("|".join(lines), flush=True)
            return
def handshake():
    global sock
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = ctx.wrap_socket(sock, server_hostname="localhost")
    print("TLS " + sock.version(), flush=True)
steps = sys.argv[2:]
if steps[:1] == ["implicit"]:
    handshake()
    steps = steps[1:]
reply()
for step in steps:
    if step == "tls":
        handshake()
    elif step == "cert":
        print("CERT " + hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest(), flush=True)
    elif step == "<":
        reply()
    elif step.startswith("!"):
        sock.sendall(step[1:].replace("\\r\\n", "\r\n").encode())
    elif step.startswith(">"):
        sock.sendall(step[1:].encode() + b"\r\n")
        reply()
"#;

/// Runs [`PY_CLIENT`] against `port` with `steps`; returns its output lines.
fn python_client(port: u16, steps: &[&str]) -> Vec<String> {
    let output = Command::new("python3")
        .arg("-c")
        .arg(PY_CLIENT)
        .arg(port.to_string())
        .args(steps)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "python3 client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// For each listener TLS mode, the proxy with a certificate and `smtp`
/// keys, and `n` clients that started their TLS handshake (after STARTTLS,
/// or at once) and never go on with it, the oldest first.
fn with_stalled_handshakes(
    test: &str,
    smtp: &str,
    n: usize,
    check: impl Fn(&str, &TestProxy, Vec<Smtp>),
) {
    let Some(tls) = TlsFiles::generate(test) else {
        return;
    };
    let backend = ScriptedBackend::start(Behaviour::default());
    for mode in ["starttls", "implicit"] {
        let config = tls
            .config(backend.addr())
            .replace("tls = \"starttls\"", &format!("tls = \"{mode}\""))
            + &format!("\n[smtp]\n{smtp}\n");
        let proxy = started(&backend, &config);
        let stalled = (0..n)
            .map(|_| {
                // One after the other: the oldest is known.
                std::thread::sleep(Duration::from_millis(100));
                if mode == "starttls" {
                    let mut client = Smtp::session(proxy.addr);
                    expect(&client.cmd("STARTTLS"), "220 ");
                    client
                } else {
                    Smtp::open(proxy.addr)
                }
            })
            .collect();
        check(mode, &proxy, stalled);
    }
}

#[test]
fn tls_handshakes_that_never_come_are_shed_at_the_session_cap() {
    // Stress timeouts off (equal to command_timeout): only the cap acts.
    // Three clients hold every session in a handshake they never go on
    // with (a slowloris of TLS): they must not lock newcomers out.
    let smtp = "max_sessions = 3\nstress_command_timeout = \"20s\"\ncommand_timeout = \"20s\"";
    with_stalled_handshakes(
        "stalled-handshakes-shed",
        smtp,
        3,
        |mode, proxy, mut stalled| {
            std::thread::sleep(Duration::from_millis(300));
            let started = Instant::now();
            let out = python_client(
                proxy.addr.port(),
                &match mode {
                    "starttls" => vec![">EHLO client.test", ">STARTTLS", "tls", ">NOOP"],
                    _ => vec!["implicit", ">NOOP"],
                },
            );
            // The newcomer is served, in TLS.
            assert!(out.contains(&"TLS TLSv1.3".to_owned()), "{mode}: {out:?}");
            expect(&out[0], if mode == "starttls" { "220 " } else { "TLS" });
            expect(out.last().unwrap(), "250 ");
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{mode}: {out:?}"
            );
            // In its first seconds, as every session here.
            assert_eq!(proxy.shed("shed-new"), 1, "{mode}");
            assert!(stalled.remove(0).closed(), "{mode}: the oldest was closed");
        },
    );
}

#[test]
fn under_stress_a_tls_handshake_gets_the_short_timeout() {
    // One of two sessions open is stress already. A handshake gets 1 s, as
    // any session without MAIL does (Postfix's smtpd_starttls_timeout is
    // its stress-dependent smtpd_timeout too).
    let smtp = "max_sessions = 2\nstress_threshold = 0.5\nstress_command_timeout = \"1s\"\ncommand_timeout = \"20s\"";
    with_stalled_handshakes(
        "stalled-handshakes-stress",
        smtp,
        2,
        |mode, proxy, stalled| {
            let started = Instant::now();
            for mut client in stalled {
                assert!(client.closed(), "{mode}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{mode}: {:?}",
                started.elapsed()
            );
            assert_eq!(proxy.shed("stress-timeout"), 2, "{mode}");
        },
    );
}

#[test]
fn a_renewed_certificate_is_in_force_for_sessions_after_the_reload() {
    let Some(tls) = TlsFiles::generate("starttls-renewed") else {
        return;
    };
    let backend = ScriptedBackend::start(Behaviour::default());
    let config = tls.config(backend.addr());
    let proxy = started(&backend, &config);
    let cert_seen = || {
        let out = python_client(
            proxy.addr.port(),
            &[">EHLO client.test", ">STARTTLS", "tls", "cert", ">QUIT"],
        );
        assert_eq!(out.len(), 6, "{out:?}");
        expect(&out[2], "220 2.0.0");
        out[4].strip_prefix("CERT ").expect("CERT line").to_owned()
    };
    let first = tls.fingerprint();
    assert_eq!(cert_seen(), first);
    // Renewed on disk: the running certificate stays until the reload …
    tls.issue();
    let renewed = tls.fingerprint();
    assert_ne!(renewed, first, "openssl made the same certificate twice");
    assert_eq!(cert_seen(), first);
    // … which loads it for the sessions that begin after it.
    let reloaded = limiter_user::config::Config::from_toml(&config).expect("configuration");
    proxy.ctx.reconfigure(&reloaded).expect("reconfigure");
    assert_eq!(cert_seen(), renewed);
}

#[test]
fn starttls_discards_pipelined_plaintext() {
    let Some(tls) = TlsFiles::generate("starttls-pipelined") else {
        return;
    };
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = started(&backend, &tls.config(backend.addr()));
    let out = python_client(
        proxy.addr.port(),
        &[
            ">EHLO client.test",
            r"!STARTTLS\r\nMAIL FROM:<evil@x>\r\n",
            "<",
            "tls",
            ">EHLO client.test",
            ">MAIL FROM:<good@x>",
            ">RCPT TO:<alice@example.com>",
            ">QUIT",
        ],
    );
    assert_eq!(out.len(), 8, "{out:?}");
    assert_eq!(out[0], "220 backend.test ESMTP");
    assert!(out[1].split('|').any(|l| l == "250 STARTTLS"), "{out:?}");
    expect(&out[2], "220 2.0.0");
    expect(&out[3], "TLS TLSv1.");
    assert!(
        out[4].starts_with("250-") && !out[4].contains("STARTTLS"),
        "{out:?}"
    );
    expect(&out[5], "250 ");
    expect(&out[6], "250 ");
    expect(&out[7], "221 ");
    assert!(
        !backend.stream().contains("evil@x"),
        "{:?}",
        backend.lines()
    );
    assert!(backend_saw(&backend, "MAIL FROM:<good@x>"));
    assert!(!backend_saw(&backend, "STARTTLS"));
}

#[test]
fn starttls_forgets_the_plaintext_envelope() {
    let Some(tls) = TlsFiles::generate("starttls-envelope") else {
        return;
    };
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = started(&backend, &tls.config(backend.addr()));
    let out = python_client(
        proxy.addr.port(),
        &[
            ">EHLO client.test",
            ">MAIL FROM:<plaintext@x>",
            ">RCPT TO:<alice@example.com>",
            ">STARTTLS",
            "tls",
            ">DATA",
            ">.",
            ">QUIT",
        ],
    );
    assert!(out.len() >= 7, "{out:?}");
    expect(&out[4], "220 2.0.0");
    expect(&out[5], "TLS TLSv1.");
    // RFC 3207 §4.2: nothing learnt before TLS counts; there is no
    // transaction, so DATA is out of sequence.
    expect(&out[6], "503 ");
    assert!(
        backend.messages().is_empty(),
        "stored: {:?}",
        backend.messages()
    );
    assert!(!backend_saw(&backend, "DATA"), "{:?}", backend.lines());
}

#[test]
fn auth_waits_for_starttls_when_the_proxy_has_a_certificate() {
    let Some(tls) = TlsFiles::generate("auth-after-starttls") else {
        return;
    };
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = started(&backend, &tls.config(backend.addr()));
    let good = base64_encode(b"\0user\0secret");
    let auth = format!(">AUTH PLAIN {good}");
    let out = python_client(
        proxy.addr.port(),
        &[
            ">EHLO client.test",
            &auth,
            ">AUTH LOGIN",
            ">STARTTLS",
            "tls",
            ">EHLO client.test",
            &auth,
            ">QUIT",
        ],
    );
    assert_eq!(out.len(), 9, "{out:?}");
    let plain_ehlo: Vec<&str> = out[1].split('|').collect();
    assert!(
        !plain_ehlo
            .iter()
            .any(|l| l[4..].to_ascii_uppercase().starts_with("AUTH")),
        "AUTH offered before TLS: {out:?}"
    );
    expect(&out[2], "538 5.7.11");
    expect(&out[3], "538 5.7.11");
    expect(&out[4], "220 2.0.0");
    expect(&out[5], "TLS TLSv1.");
    assert!(
        out[6]
            .split('|')
            .any(|l| l.get(4..) == Some("AUTH PLAIN LOGIN")),
        "AUTH offered inside TLS: {out:?}"
    );
    expect(&out[7], "235 ");
    let auths = backend
        .lines()
        .iter()
        .filter(|l| l.to_ascii_uppercase().starts_with("AUTH"))
        .count();
    assert_eq!(
        auths,
        1,
        "only the AUTH inside TLS reached the backend: {:?}",
        backend.lines()
    );
}

#[test]
fn auth_requires_tls_false_offers_auth_in_plaintext() {
    let Some(tls) = TlsFiles::generate("auth-plaintext-allowed") else {
        return;
    };
    let backend = ScriptedBackend::start(Behaviour::default());
    let config = format!(
        "{}\n[smtp]\nauth_requires_tls = false\n",
        tls.config(backend.addr())
    );
    let proxy = started(&backend, &config);
    let mut c = Smtp::session(proxy.addr);
    let good = base64_encode(b"\0user\0secret");
    expect(&c.cmd(&format!("AUTH PLAIN {good}")), "235 ");
}

// -- 18. Shutdown ----------------------------------------------------------

#[test]
fn shutdown_tells_idle_clients_421() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    proxy.stop();
    expect(&c.reply(), "421 4.3.0");
    assert!(c.closed());
    // No new sessions once stopping. The stopped proxy's port is free, and
    // a parallel test may bind it: what counts is that this proxy opens no
    // session, whoever answers the connection.
    let opened = proxy.ctx.stats.sessions_total.load(Ordering::Relaxed);
    for _ in 0..3 {
        let refused = match TcpStream::connect_timeout(&proxy.addr, Duration::from_secs(1)) {
            Err(e) => e.kind() == ErrorKind::ConnectionRefused,
            Ok(stream) => {
                stream.set_read_timeout(Some(WAIT)).expect("timeout");
                let mut byte = [0u8; 1];
                match (&stream).read(&mut byte) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ),
                }
            }
        };
        assert_eq!(
            proxy.ctx.stats.sessions_total.load(Ordering::Relaxed),
            opened,
            "a session opened after stop"
        );
        if refused {
            break;
        }
    }
}

// -- 19. Input chosen by an attacker ---------------------------------------

/// Verbs the proxy does not follow, including the ones the backend offers
/// (`ETRN`), role reversal (`TURN`, `ATRN`), vendor extensions and RFC 821
/// leftovers.
const UNFOLLOWED_VERBS: [&str; 11] = [
    "ETRN example.com",
    "TURN",
    "ATRN example.com",
    "XYZZY",
    "X-EXPS GSSAPI",
    "SEND FROM:<a@x>",
    "SOML FROM:<a@x>",
    "SAML FROM:<a@x>",
    "VERB",
    "ONEX",
    "XEXCH50 1 2",
];

#[test]
fn unknown_verbs_get_502_from_the_proxy_and_never_reach_the_backend() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    for line in UNFOLLOWED_VERBS {
        assert_eq!(code(&c.cmd(line)), 502, "{line}");
    }
    expect(&c.cmd("NOOP"), "250 ");
    for line in UNFOLLOWED_VERBS {
        let verb = line.split(' ').next().unwrap_or(line);
        assert!(
            !backend_saw(&backend, verb),
            "{verb} reached the backend: {:?}",
            backend.lines()
        );
    }
}

#[test]
fn relay_verbs_listed_by_the_operator_are_relayed_raw() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nrelay_verbs = [\"etrn\"]\n");
    let mut c = Smtp::session(proxy.addr);
    // The scripted backend answers ETRN as an unknown command: what counts
    // is that the line reached it, unchanged.
    assert_eq!(code(&c.cmd("ETRN example.com")), 502);
    assert!(
        backend_saw(&backend, "ETRN example.com"),
        "{:?}",
        backend.lines()
    );
    assert_eq!(code(&c.cmd("TURN")), 502);
    assert!(!backend_saw(&backend, "TURN"));
}

#[test]
fn a_temporary_unknown_user_counts_toward_the_harvest_limit() {
    let backend = ScriptedBackend::start(Behaviour {
        deferred_recipients: (1..=3)
            .map(|i| format!("unverified{i}@example.com"))
            .collect(),
        ..Behaviour::default()
    });
    let proxy = start(&backend, "[limits]\nmax_failed_rcpt = 2\n");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&c.cmd("RCPT TO:<unverified1@example.com>"), "450 4.1.1");
    expect(&c.cmd("RCPT TO:<unverified2@example.com>"), "450 4.1.1");
    expect(&c.cmd("RCPT TO:<unverified3@example.com>"), "421 4.7.0");
    assert!(c.closed());
    assert_eq!(
        blocked(&proxy).map(|b| b.origin),
        Some(Reason::Harvest),
        "a harvester probing a verifying backend is blocked"
    );
}

#[test]
fn a_harvester_that_reconnects_or_mixes_in_valid_recipients_is_blocked() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[limits]\nmax_failed_rcpt = 3\nmax_failed_rcpt_per_source = 5\nfailed_rcpt_window = \"1h\"\n",
    );
    let mut probe = 0;
    let mut next = || {
        probe += 1;
        format!("RCPT TO:<nobody{probe}@example.com>")
    };
    // Two sessions, each ending below the per-session limit, one of them
    // with a valid recipient that resets the session's count.
    for valid in [false, true] {
        let mut c = Smtp::session(proxy.addr);
        expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
        expect(&c.cmd(&next()), "550 5.1.1");
        if valid {
            expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
        }
        expect(&c.cmd(&next()), "550 5.1.1");
        expect(&c.cmd("QUIT"), "221 ");
        assert!(c.closed());
        assert!(blocked(&proxy).is_none(), "below both limits so far");
    }
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&c.cmd(&next()), "550 5.1.1");
    // The sixth failure within the window, across three sessions.
    expect(&c.cmd(&next()), "421 4.7.0");
    assert!(c.closed());
    assert_eq!(blocked(&proxy).map(|b| b.origin), Some(Reason::Harvest));
    let (mut again, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.7.0");
    assert!(again.closed());
}

#[test]
fn sessions_over_max_sessions_get_421_and_a_freed_slot_serves_again() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_sessions = 2\n");
    // Both sessions are senders (a MAIL accepted): none may be shed.
    let mut first = Smtp::session(proxy.addr);
    let mut second = Smtp::session(proxy.addr);
    expect(&first.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&second.cmd("MAIL FROM:<b@x>"), "250 ");
    let (mut third, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.3.2");
    assert!(third.closed());
    drop(first);
    // The slot comes back when the first session has ended on the proxy.
    let end = Instant::now() + WAIT;
    loop {
        let (mut c, greeting) = Smtp::connect(proxy.addr);
        if greeting.starts_with("220 ") {
            break;
        }
        expect(&greeting, "421 4.3.2");
        assert!(c.closed());
        assert!(Instant::now() < end, "the freed slot never came back");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A proxy holding messages for a content scanner that is down, failing
/// open: every message is held to its end, then delivered with the
/// "not scanned" header.
fn holding_proxy(backend: &ScriptedBackend) -> (TestProxy, DeadPort) {
    let scanner = DeadPort::new().expect("a dead port");
    let proxy = start(backend, &holding_filters(&scanner));
    (proxy, scanner)
}

/// `[filters]` with `scanner` as ClamAV, failing open.
fn holding_filters(scanner: &DeadPort) -> String {
    format!(
        "[filters]\ntimeout = \"2s\"\non_failure = \"fail-open\"\n\n[filters.clamav]\naddress = \"{}\"\n",
        scanner.addr()
    )
}

#[test]
fn a_held_message_ends_wherever_the_end_marker_is_split() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let (proxy, _scanner) = holding_proxy(&backend);
    let body = b"Subject: split\r\n\r\nline\r\n..stuffed\r\n";
    // Every place the marker (and the CRLF before it) can be cut.
    let tail = b"\r\n.\r\n";
    for cut in 1..tail.len() {
        let mut c = Smtp::session(proxy.addr);
        start_data(&mut c);
        let (head, rest) = tail.split_at(cut);
        c.send(&body[..body.len() - 2]);
        c.send(head);
        // Let the proxy read the first part on its own. Nothing shows that
        // it has (a held message gets no reply before its end), so this is
        // a bounded pause: should the parts still arrive in one read, the
        // cut is not covered but the test does not fail.
        thread::sleep(Duration::from_millis(150));
        c.send(rest);
        expect(&c.reply(), "250 ");
        expect(&c.cmd("QUIT"), "221 ");
    }
    let messages = backend.messages();
    assert_eq!(messages.len(), tail.len() - 1, "one message per cut");
    for message in messages {
        assert!(
            message.ends_with(body),
            "the message reached the backend whole and unchanged: {:?}",
            String::from_utf8_lossy(&message)
        );
    }
}

#[test]
fn a_held_message_keeps_its_memory_until_the_backend_has_it() {
    // The backend takes the message and never answers its end.
    let backend = ScriptedBackend::start(Behaviour::failing(".", FailMode::Hang));
    let (proxy, _scanner) = holding_proxy(&backend);
    let filters = proxy.ctx.filters.clone().expect("filters configured");
    let mut c = Smtp::session(proxy.addr);
    start_data(&mut c);
    c.send(b"Subject: held\r\n\r\nbody\r\n.\r\n");
    assert!(
        backend.wait_until(WAIT, |b| b.lines().iter().any(|l| l == ".")),
        "the backend never got the end of the message: {:?}",
        backend.lines()
    );
    assert!(
        filters.held_bytes() > 0,
        "the message is still counted against filters.max_held while the backend has not answered"
    );
}

/// Every byte Postfix's tokeniser takes as a separator (C isspace) and
/// every other control byte, after each verb the proxy judges.
#[test]
fn control_bytes_after_a_verb_never_reach_the_backend() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[relay]\naccept = \"*@example.com\"\n[smtp]\nmax_errors = 100000\n",
    );
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x.example>"), "250 ");
    let mut refused = 0;
    for byte in (0u8..0x20).chain([0x7f]) {
        if matches!(byte, b'\t' | b'\r' | b'\n' | 0) {
            continue; // HTAB is a blank; CR, LF and NUL are the line reader's
        }
        for verb in ["RCPT", "rcpt", "VRFY", "AUTH", "MAIL", "EHLO", "DATA"] {
            let mut line = verb.as_bytes().to_vec();
            line.push(byte);
            line.extend_from_slice(b"TO:<probe@evil.example>\r\n");
            c.send(&line);
            let reply = c.reply();
            assert!(
                matches!(code(&reply), 500 | 501),
                "{verb} + {byte:#04x}: {reply}"
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 29 * 7, "29 control bytes after 7 verbs");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    assert!(
        !backend.stream().contains("evil"),
        "a refused line reached the backend: {:?}",
        backend.lines()
    );
    let counted: u64 = proxy
        .ctx
        .stats
        .rejections()
        .iter()
        .filter(|(r, _)| r.starts_with("bad-"))
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(
        counted,
        refused,
        "every refused line is counted: {:?}",
        proxy.ctx.stats.rejections()
    );
}

#[test]
fn recipients_with_routing_syntax_are_refused_and_count_as_harvest() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[relay]\naccept = \"*@example.com\"\n[limits]\nmax_failed_rcpt = 6\n",
    );
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x.example>"), "250 ");
    for recipient in [
        "user%evil.example@example.com",
        "evil.example!user@example.com",
        "@example.com:user@evil.example",
        "\"user@evil.example\"@example.com",
        "\"user%evil.example\"@example.com",
        "\"evil.example!user\"@example.com",
    ] {
        let reply = c.cmd(&format!("RCPT TO:<{recipient}>"));
        expect(&reply, "550 5.7.1");
    }
    // A trailing dot and capitals are the same domain, accepted.
    expect(&c.cmd("RCPT TO:<alice@EXAMPLE.COM.>"), "250 ");
    // The seventh failure in a row (the success above reset the run; these
    // six more make it past max_failed_rcpt = 6).
    for i in 0..6 {
        expect(
            &c.cmd(&format!("RCPT TO:<u{i}%evil.example@example.com>")),
            "550 5.7.1",
        );
    }
    expect(&c.cmd("RCPT TO:<u9%evil.example@example.com>"), "421 4.7.0");
    assert!(c.closed());
    assert_eq!(blocked(&proxy).map(|b| b.origin), Some(Reason::Harvest));
    assert!(
        !backend.stream().contains("evil"),
        "a routed recipient reached the backend: {:?}",
        backend.lines()
    );
}

#[test]
fn every_null_sender_spelling_counts_toward_the_null_sender_rate() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[limits]\nnull_sender_rate = \"2/1h\"\n");
    let mut c = Smtp::session(proxy.addr);
    for spelling in ["<\"\">", "<@relay.example:\"\">"] {
        expect(&c.cmd(&format!("MAIL FROM:{spelling}")), "250 ");
        // A bounce's MAIL goes to the backend with its first RCPT.
        expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
        expect(&c.cmd("RSET"), "250 ");
    }
    expect(&c.cmd("MAIL FROM:<>"), "450 4.7.1");
    // What reached the backend is the null sender the proxy counted.
    let mails: Vec<String> = backend
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("MAIL"))
        .collect();
    assert_eq!(mails, ["MAIL FROM:<>", "MAIL FROM:<>"]);
    // Spellings Postfix might read as null, which the proxy cannot be sure
    // of, are refused rather than relayed.
    for spelling in ["< >", "<@relay.example:>", "<()>", "<\"\" >"] {
        let reply = c.cmd(&format!("MAIL FROM:{spelling}"));
        assert_eq!(code(&reply), 501, "{spelling}: {reply}");
    }
}

#[test]
fn helo_names_are_judged_and_relayed_in_one_canonical_spelling() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[lists]\nreject_helo = [\"*.dynamic.example\"]\n");
    let (mut c, _) = Smtp::connect(proxy.addr);
    for spelling in [
        "EHLO HOST.Dynamic.Example.",
        "EHLO host.dynamic.example..",
        "HELO host.DYNAMIC.example",
        "EHLO host.dynamic.example extra words",
    ] {
        expect(&c.cmd(spelling), "550 5.7.1");
    }
    assert!(!backend.stream().to_ascii_lowercase().contains("dynamic"));
    expect(&c.cmd("EHLO Mail.Client.Example."), "250");
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert!(
        backend_saw(&backend, "EHLO mail.client.example"),
        "the backend reads the name the proxy judged: {:?}",
        backend.lines()
    );
}

#[test]
fn the_backend_gets_envelope_lines_rebuilt_from_what_the_proxy_parsed() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    expect(
        &c.cmd("mail from:  <a@x.example>\tsize=10  BODY=8BITMIME "),
        "250 ",
    );
    expect(&c.cmd("Rcpt To: <alice@example.com>  NOTIFY=NEVER"), "250 ");
    let lines = backend.lines();
    assert!(
        lines
            .iter()
            .any(|l| l == "MAIL FROM:<a@x.example> SIZE=10 BODY=8BITMIME"),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l == "RCPT TO:<alice@example.com> NOTIFY=NEVER"),
        "{lines:?}"
    );
}

#[test]
fn too_many_refused_lines_end_the_session() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_errors = 3\n");
    let mut c = Smtp::session(proxy.addr);
    for line in ["XYZZY", "RCPT\x0bTO:<a@b>", "MAIL FROM:a@b"] {
        assert!(matches!(code(&c.cmd(line)), 500..=502), "{line}");
    }
    expect(&c.cmd("TURN"), "421 4.7.0");
    assert!(c.closed());
}

// -- 15. The backend connection is earned (backend.connect = "on-mail") ----

/// How many times `reason` was counted as a rejection or shed session.
fn rejections(proxy: &TestProxy, reason: &str) -> u64 {
    proxy
        .ctx
        .stats
        .rejections()
        .into_iter()
        .find(|(name, _)| *name == reason)
        .map_or(0, |(_, n)| n)
}

#[test]
fn sessions_that_only_talk_never_reach_the_backend() {
    // The zombie's whole repertoire: EHLO, HELO, NOOP, RSET, HELP, VRFY,
    // refused lines, QUIT. None of it is worth a backend process.
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut zombies: Vec<Smtp> = (0..5).map(|_| Smtp::session(proxy.addr)).collect();
    for z in &mut zombies {
        assert_eq!(z.cmd("NOOP"), "250 2.0.0 Ok");
        assert_eq!(z.cmd("RSET"), "250 2.0.0 Ok");
        expect(&z.cmd("HELP"), "214 ");
        expect(&z.cmd("HELO client.test"), "250 backend.test");
        expect(&z.cmd("VRFY alice"), "252 ");
        expect(&z.cmd("RCPT TO:<alice@example.com>"), "503 ");
        expect(&z.cmd("DATA"), "503 ");
        expect(&z.cmd("BDAT 10 LAST"), "502 ");
    }
    for mut z in zombies {
        assert_eq!(z.cmd("QUIT"), "221 2.0.0 Bye");
    }
    assert_eq!(backend.connections(), 0, "{:?}", backend.lines());
    assert!(backend.lines().is_empty());
}

#[test]
fn the_ehlo_reply_comes_from_the_probe_filtered_as_before() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_message_size = \"1MB\"\n");
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    assert_eq!(greeting, "220 backend.test ESMTP", "the backend's greeting");
    let ehlo = c.cmd("EHLO client.test");
    let lines: Vec<&str> = ehlo.lines().map(|l| &l[4..]).collect();
    assert_eq!(lines[0], "backend.test");
    for kept in [
        "PIPELINING",
        "SIZE 1000000",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(lines.contains(&kept), "{kept} missing: {ehlo}");
    }
    for dropped in [
        "XCLIENT", "XFORWARD", "CHUNKING", "STARTTLS", "ETRN", "VRFY",
    ] {
        assert!(!ehlo.contains(dropped), "{dropped} offered: {ehlo}");
    }
    assert_eq!(backend.connections(), 0);
}

#[test]
fn the_backend_is_connected_at_mail_with_the_identity_and_the_helo() {
    let backend = ScriptedBackend::start(Behaviour {
        expect_proxy_v2: true,
        ..Behaviour::default()
    });
    let proxy = started(
        &backend,
        &config_with("enforce", "proxy-v2", backend.addr(), ""),
    );
    let mut c = Smtp::session(proxy.addr);
    let client = c.local_addr();
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    expect(&c.cmd("EHLO Client.Test."), "250");
    assert_eq!(backend.connections(), 0);
    assert_eq!(proxy.ctx.backend_slots.in_use(), 0);
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert_eq!(backend.connections(), 1);
    assert_eq!(proxy.ctx.backend_slots.in_use(), 1);
    assert_eq!(backend.proxy_sources(), vec![client]);
    assert_eq!(backend.lines(), ["EHLO client.test", "MAIL FROM:<a@x>"]);
    // Once connected, the session's commands are relayed as before.
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");
    assert!(backend.wait_idle(WAIT));
    assert!(backend_saw(&backend, "NOOP"));
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.in_use() == 0),
        "the slot is not given back: {:?}",
        proxy.ctx.backend_slots.counts()
    );
}

#[test]
fn a_helo_client_is_replayed_with_helo() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let (mut c, _) = Smtp::connect(proxy.addr);
    expect(&c.cmd("HELO Old.Client."), "250 ");
    expect(&c.cmd("MAIL FROM:<a@x>"), "250 ");
    assert_eq!(backend.lines(), ["HELO old.client", "MAIL FROM:<a@x>"]);
}

#[test]
fn a_backend_refusing_at_mail_gives_its_own_reply_never_a_250() {
    // A backend that refuses every session (its greeting is a 554): the
    // probe fails, the proxy greets by itself, and the client's MAIL gets
    // the backend's refusal.
    let backend = ScriptedBackend::start(Behaviour {
        greeting: "554 5.3.2 backend.test Service unavailable".into(),
        ..Behaviour::default()
    });
    let proxy = start(&backend, "");
    let (mut c, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "220 ");
    let ehlo = c.cmd("EHLO client.test");
    expect(&ehlo, "250");
    assert!(
        !ehlo.contains("AUTH"),
        "no AUTH before the backend is known: {ehlo}"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<a@x>"),
        "554 5.3.2 backend.test Service unavailable"
    );
    // The envelope did not start.
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "503 ");
    assert_eq!(c.cmd("QUIT"), "221 2.0.0 Bye");

    // A 421 greeting: the client gets that 421 and is disconnected.
    let busy = ScriptedBackend::start(Behaviour {
        greeting: "421 4.3.2 backend.test Too busy".into(),
        ..Behaviour::default()
    });
    let proxy = start(&busy, "");
    let mut c = Smtp::session(proxy.addr);
    assert_eq!(c.cmd("MAIL FROM:<a@x>"), "421 4.3.2 backend.test Too busy");
    assert!(c.closed());

    // No backend at all: 421 4.3.0 at MAIL, never earlier.
    let dead = DeadPort::new().expect("a dead port");
    let proxy = TestProxy::start(&config(dead.addr(), ""));
    let mut c = Smtp::session(proxy.addr);
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok");
    expect(&c.cmd("MAIL FROM:<a@x>"), "421 4.3.0");
    assert!(c.closed());
}

#[test]
fn xclient_refused_at_mail_gets_a_4xx() {
    // Not offered to the proxy (a configuration error): 421 4.3.0, never
    // the backend's 5xx, which would bounce the client's mail for good.
    let backend = ScriptedBackend::start(Behaviour::default().without_capability("XCLIENT"));
    let proxy = started(
        &backend,
        &config_with("enforce", "xclient", backend.addr(), ""),
    );
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd("MAIL FROM:<a@x>"), "421 4.3.0");
    assert!(c.closed());
    assert!(!backend_saw(&backend, "XCLIENT"));
    // Refused for now (4xx): the backend's own reply.
    let backend = ScriptedBackend::start(Behaviour::failing("XCLIENT", FailMode::Reply421));
    let proxy = started(
        &backend,
        &config_with("enforce", "xclient", backend.addr(), ""),
    );
    let mut c = Smtp::session(proxy.addr);
    assert_eq!(
        c.cmd("MAIL FROM:<a@x>"),
        limiter_tests::scripted::BACKEND_421
    );
    assert!(c.closed());
    assert!(!backend_saw(&backend, "MAIL"));
}

#[test]
fn a_backend_refusing_the_helo_at_mail_gives_its_own_reply() {
    let backend = ScriptedBackend::start(Behaviour::failing("EHLO client", FailMode::Reply421));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    assert_eq!(
        c.cmd("MAIL FROM:<a@x>"),
        limiter_tests::scripted::BACKEND_421
    );
    assert!(c.closed());
}

#[test]
fn auth_earns_the_connection_only_when_the_backend_offers_auth() {
    let plain = base64_encode(b"\0user\0secret");
    let backend = ScriptedBackend::start(Behaviour::default().without_capability("AUTH"));
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd(&format!("AUTH PLAIN {plain}")), "503 5.5.1");
    assert_eq!(backend.connections(), 0);

    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "");
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd(&format!("AUTH PLAIN {plain}")), "235 ");
    assert_eq!(backend.connections(), 1);
    assert!(backend_saw(&backend, "AUTH PLAIN"));
}

#[test]
fn relayed_verbs_earn_the_connection() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[smtp]\nvrfy = \"relay\"\nrelay_verbs = [\"ETRN\"]\n",
    );
    let mut c = Smtp::session(proxy.addr);
    let reply = c.cmd("VRFY alice");
    assert_eq!(backend.connections(), 1, "{reply}");
    assert!(backend_saw(&backend, "VRFY alice"));
    c.cmd("ETRN example.com");
    assert!(backend_saw(&backend, "ETRN example.com"));
}

// -- 16. Backend slots shared fairly ---------------------------------------

const FLOODER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const SENDER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

#[test]
fn a_source_holding_every_slot_cannot_starve_another_sources_mail() {
    let backend = ScriptedBackend::start(Behaviour::default());
    // /32 groups: 127.0.0.2 and 127.0.0.3 are two networks here.
    let proxy = started(
        &backend,
        &config(backend.addr(), "").replace(
            "connect_timeout = \"2s\"\n",
            "connect_timeout = \"2s\"\nmax_connections = 2\nslot_wait = \"4s\"\nfair_share_prefix_v4 = 32\n",
        ),
    );
    // The flooder earns both slots, then queues for a third.
    let mut held: Vec<Smtp> = (0..2)
        .map(|_| {
            let mut s = Smtp::session_from(proxy.addr, FLOODER);
            expect(&s.cmd("MAIL FROM:<f@x>"), "250 ");
            s
        })
        .collect();
    assert_eq!(proxy.ctx.backend_slots.in_use(), 2);
    let mut queued = Smtp::session_from(proxy.addr, FLOODER);
    queued.send(b"MAIL FROM:<f@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the flooder's MAIL does not wait for a slot"
    );
    // The sender comes after it.
    let mut sender = Smtp::session_from(proxy.addr, SENDER);
    sender.send(b"MAIL FROM:<s@y>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 2),
        "the sender's MAIL does not wait for a slot"
    );
    // One of the flooder's connections ends: the slot goes to the sender,
    // although the flooder queued first (it holds its share already).
    let mut first = held.remove(0);
    assert_eq!(first.cmd("QUIT"), "221 2.0.0 Bye");
    let started = Instant::now();
    expect(&sender.reply(), "250 ");
    assert!(started.elapsed() < Duration::from_secs(2));
    expect(&sender.cmd("RCPT TO:<alice@example.com>"), "250 ");
    // The flooder's other session, idle in its transaction while others
    // wait, is parked after its second (and one for its recipient round
    // trip it never had); its slot goes to the flooder's queued session,
    // not later than backend.slot_wait.
    expect(&queued.reply(), "250 ");
    assert_eq!(proxy.parked("parked"), 1);
    expect(&held.remove(0).cmd("NOOP"), "250 ");
    assert_eq!(proxy.shed("slow-transaction"), 0);
    let slots = proxy.ctx.backend_slots.counts();
    assert_eq!(slots.timeouts, 0, "{slots:?}");
    assert!(slots.waits >= 2, "{slots:?}");
    assert_eq!((slots.capacity, slots.waiting), (2, 0), "{slots:?}");
}

#[test]
fn the_wait_for_a_backend_slot_is_bounded() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "500ms", "");
    let mut holder = Smtp::session(proxy.addr);
    expect(&holder.cmd("MAIL FROM:<a@x>"), "250 ");
    let mut late = Smtp::session(proxy.addr);
    let started = Instant::now();
    late.send(b"MAIL FROM:<b@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the second MAIL does not wait for a slot"
    );
    let slots = proxy.ctx.backend_slots.counts();
    assert_eq!(
        (slots.in_use, slots.waiting, slots.waits),
        (1, 1, 1),
        "{slots:?}"
    );
    expect(&late.reply(), "421 4.3.2");
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(late.closed());
    assert_eq!(backend.connections(), 1);
    let slots = proxy.ctx.backend_slots.counts();
    assert_eq!((slots.waiting, slots.timeouts), (0, 1), "{slots:?}");
    assert_eq!(proxy.shed("backend-slot-timeout"), 1);
    // The holder is unaffected.
    expect(&holder.cmd("RCPT TO:<alice@example.com>"), "250 ");
}

#[test]
fn a_transaction_kept_alive_with_noops_is_parked_off_its_slot_when_others_wait() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "10s", "[smtp]\nstress_command_timeout = \"1s\"\n");
    // A zombie earns the only backend connection with a MAIL, then keeps
    // its transaction alive: NOOP every 300 ms, each answered at once.
    let mut zombie = Smtp::session(proxy.addr);
    expect(&zombie.cmd("MAIL FROM:<z@x>"), "250 ");
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300));
        expect(&zombie.cmd("NOOP"), "250 ");
    }
    // Nobody waits: the zombie is left alone past stress_command_timeout.
    expect(&zombie.cmd("RCPT TO:<alice@example.com>"), "250 ");
    // A sender needs the slot: the zombie's transaction has had more than
    // stress_command_timeout of its client's time, so its next wait parks
    // it, NOOPs or not, and the sender gets the slot long before slot_wait.
    let mut sender = Smtp::session(proxy.addr);
    let started = Instant::now();
    sender.send(b"MAIL FROM:<s@x>\r\n");
    while proxy.parked("parked") == 0 && started.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(300));
        expect(&zombie.cmd("NOOP"), "250 ");
    }
    expect(&sender.reply(), "250 ");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(proxy.parked("parked"), 1);
    // The zombie goes on being answered, by the proxy alone.
    for _ in 0..3 {
        expect(&zombie.cmd("NOOP"), "250 ");
    }
    expect(&sender.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&sender.cmd("DATA"), "354 ");
    expect(&sender.cmd("Subject: s\r\n\r\nsent\r\n."), "250 ");
    expect(&sender.cmd("QUIT"), "221 ");
    // Once the slot is free, the zombie's DATA takes its transaction up
    // on a new connection: MAIL and RCPT again, then DATA.
    expect(&zombie.cmd("DATA"), "354 ");
    expect(&zombie.cmd("Subject: z\r\n\r\nlate\r\n."), "250 ");
    assert_eq!(proxy.parked("resumed"), 1);
    assert!(backend.wait_idle(WAIT));
    let lines = backend.lines();
    assert_eq!(
        lines.iter().filter(|l| *l == "MAIL FROM:<z@x>").count(),
        2,
        "{lines:?}"
    );
    assert_eq!(backend.messages().len(), 2);
    assert_eq!(proxy.shed("slow-transaction"), 0);
}

#[test]
fn a_silent_transaction_past_its_time_is_parked_as_soon_as_someone_waits() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "10s", "[smtp]\nstress_command_timeout = \"1s\"\n");
    let mut zombie = Smtp::session(proxy.addr);
    expect(&zombie.cmd("MAIL FROM:<z@x>"), "250 ");
    std::thread::sleep(Duration::from_millis(1500));
    // Silent since its MAIL: the sender's wait wakes it, and it is parked.
    let mut sender = Smtp::session(proxy.addr);
    let started = Instant::now();
    expect(&sender.cmd("MAIL FROM:<s@x>"), "250 ");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(proxy.parked("parked"), 1);
    expect(&zombie.cmd("NOOP"), "250 ");
    assert_eq!(proxy.shed("slow-transaction"), 0);
}

#[test]
fn without_the_spool_a_message_dribbled_a_byte_at_a_time_loses_its_slot_when_others_wait() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot_with(
        &backend,
        NO_SPOOL,
        "[smtp]\nstress_command_timeout = \"1s\"\n",
    );
    let mut zombie = Smtp::session(proxy.addr);
    expect(&zombie.cmd("MAIL FROM:<z@x>"), "250 ");
    expect(&zombie.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&zombie.cmd("DATA"), "354 ");
    let mut sender = Smtp::session(proxy.addr);
    let started = Instant::now();
    sender.send(b"MAIL FROM:<s@x>\r\n");
    // Well under data_timeout between bytes, far under 500 bytes/s; until
    // the proxy answers (a write after its close could reset the 421 away).
    let answered = |z: &Smtp| {
        z.stream.set_nonblocking(true).unwrap();
        let ready = z.stream.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
        z.stream.set_nonblocking(false).unwrap();
        ready
    };
    for _ in 0..20 {
        if answered(&zombie) {
            break;
        }
        zombie.send(b"x");
        std::thread::sleep(Duration::from_millis(200));
    }
    expect(&sender.reply(), "250 ");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    expect(&zombie.reply(), "421 4.4.2");
    assert_eq!(proxy.shed("slow-transaction"), 1);
    // Nothing of the dribbled message was delivered.
    expect(&sender.cmd("RCPT TO:<alice@example.com>"), "250 ");
    assert_eq!(backend.messages().len(), 0);
}

#[test]
fn a_far_sender_naming_recipients_one_at_a_time_keeps_its_slot_when_others_wait() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "10s", "[smtp]\nstress_command_timeout = \"1s\"\n");
    let mut far = Smtp::session(proxy.addr);
    expect(&far.cmd("MAIL FROM:<a@x>"), "250 ");
    let mut waiting = Smtp::session(proxy.addr);
    waiting.send(b"MAIL FROM:<b@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the second MAIL does not wait for a slot"
    );
    // A round trip of 300 ms before each command, no pipelining: 1.8 s of
    // waiting in all, past stress_command_timeout, but each accepted
    // recipient earns the transaction a second more.
    for user in ["alice", "bob", "carol", "postmaster", "alice"] {
        std::thread::sleep(Duration::from_millis(300));
        expect(&far.cmd(&format!("RCPT TO:<{user}@example.com>")), "250 ");
    }
    std::thread::sleep(Duration::from_millis(300));
    expect(&far.cmd("DATA"), "354 ");
    expect(&far.cmd("Subject: far\r\n\r\nbody\r\n."), "250 ");
    expect(&waiting.reply(), "250 ");
    assert_eq!(proxy.shed("slow-transaction"), 0);
}

#[test]
fn without_the_spool_a_message_over_a_slow_link_keeps_its_slot_when_others_wait() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot_with(
        &backend,
        NO_SPOOL,
        "[smtp]\nstress_command_timeout = \"1s\"\n",
    );
    let mut slow = Smtp::session(proxy.addr);
    expect(&slow.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&slow.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&slow.cmd("DATA"), "354 ");
    let mut waiting = Smtp::session(proxy.addr);
    waiting.send(b"MAIL FROM:<b@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the second MAIL does not wait for a slot"
    );
    // 2.5 s of waiting for its client, well past stress_command_timeout,
    // but at 5 000 bytes/s: ten times the 500 bytes/s a message must keep.
    let line = format!("{}\r\n", "a".repeat(998));
    for _ in 0..25 {
        slow.send(line.as_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
    slow.send(b".\r\n");
    expect(&slow.reply(), "250 ");
    expect(&waiting.reply(), "250 ");
    assert_eq!(proxy.shed("slow-transaction"), 0);
    assert_eq!(backend.messages().len(), 1);
}

/// A client in DATA on `proxy`'s only backend slot: its MAIL (from
/// `sender`) and a RCPT to alice accepted.
fn in_data(proxy: &TestProxy, sender: &str) -> Smtp {
    let mut c = Smtp::session(proxy.addr);
    expect(&c.cmd(&format!("MAIL FROM:<{sender}>")), "250 ");
    expect(&c.cmd("RCPT TO:<alice@example.com>"), "250 ");
    expect(&c.cmd("DATA"), "354 ");
    c
}

/// A client whose MAIL waits for `proxy`'s only backend slot.
fn waiting_for_the_slot(proxy: &TestProxy) -> Smtp {
    let mut c = Smtp::session(proxy.addr);
    c.send(b"MAIL FROM:<sender@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the second MAIL does not wait for a slot"
    );
    c
}

/// Sends `lines` lines of `len` bytes (CRLF included) to `client`, one
/// every `pace`.
fn trickle(client: &mut Smtp, lines: usize, len: usize, pace: Duration) -> Vec<u8> {
    let mut sent = Vec::new();
    for i in 0..lines {
        let line = format!("{i:04}{}\r\n", "x".repeat(len - 6));
        client.send(line.as_bytes());
        sent.extend_from_slice(line.as_bytes());
        std::thread::sleep(pace);
    }
    sent
}

#[test]
fn a_slow_message_gives_its_slot_back_mid_message_and_is_delivered_whole_from_the_spool() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "10s", "[smtp]\nstress_command_timeout = \"1s\"\n");
    let mut slow = in_data(&proxy, "slow@x");
    let mut sender = waiting_for_the_slot(&proxy);
    // 1 000 bytes/s: twice the 500 a message must keep, so that without
    // the spool it would keep the slot to the end (a zombie that trickles
    // its message holds a backend process for as long as it likes).
    let mut body = b"Subject: slow\r\n\r\n".to_vec();
    slow.send(&body);
    // The sender goes on as soon as it has the slot: its network (the
    // slow client's too, on loopback) was spooled lately, so a second of
    // waiting for its client would park its own transaction.
    let sender = std::thread::spawn(move || {
        expect(&sender.reply(), "250 ");
        expect(&sender.cmd("RCPT TO:<bob@example.com>"), "250 ");
        expect(&sender.cmd("DATA"), "354 ");
        expect(&sender.cmd("Subject: quick\r\n\r\nbody\r\n."), "250 ");
        sender.cmd("QUIT")
    });
    body.extend(trickle(&mut slow, 20, 100, Duration::from_millis(100)));
    // Its slot went to the sender a second in (1 s while others wait),
    // the message still on its way (slot_wait is 10 s).
    assert_eq!(sender.join().expect("the sender's thread"), "221 2.0.0 Bye");
    assert_eq!(proxy.ctx.spool.spooled(), 1);
    body.extend(trickle(&mut slow, 10, 100, Duration::from_millis(100)));
    // The end: the transaction replayed on a new connection, the message
    // whole, the backend's answer relayed.
    assert_eq!(slow.cmd("."), "250 2.0.0 Ok: queued as 2");
    assert_eq!(proxy.shed("slow-transaction"), 0);
    assert_eq!(proxy.ctx.spool.spooled(), 1);
    assert_eq!(proxy.ctx.spool.used(), 0, "the copy's memory is given back");
    let messages = backend.messages();
    assert_eq!(
        messages.len(),
        2,
        "the first backend connection's part of the slow message is dropped"
    );
    assert_eq!(messages[1], body);
    let mails = backend
        .lines()
        .iter()
        .filter(|l| l.starts_with("MAIL FROM:<slow@x>") || l.starts_with("RCPT TO:<alice@"))
        .count();
    assert_eq!(mails, 4, "MAIL and RCPT again on the new connection");
    assert_eq!(backend.connections(), 3);
}

#[test]
fn a_slow_message_gives_its_slot_back_before_anyone_waits_for_it() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "10s", "[smtp]\nstress_command_timeout = \"1s\"\n");
    let mut slow = in_data(&proxy, "slow@x");
    let mut body = b"Subject: alone\r\n\r\n".to_vec();
    slow.send(&body);
    // Nobody else around: past its time (1 s) the slot goes all the same, so that a flood of slow clients cannot
    // hold every slot until someone comes.
    body.extend(trickle(&mut slow, 30, 100, Duration::from_millis(100)));
    assert_eq!(proxy.ctx.spool.spooled(), 1);
    assert_eq!(proxy.ctx.backend_slots.counts().in_use, 0);
    assert_eq!(slow.cmd("."), "250 2.0.0 Ok: queued as 1");
    assert_eq!(backend.messages(), vec![body]);
}

#[test]
fn a_spooled_message_past_its_networks_share_of_the_spool_gets_452_and_is_not_delivered() {
    let backend = ScriptedBackend::start(Behaviour::default());
    // One network may hold an eighth: 3 000 bytes.
    let proxy = one_slot_with(
        &backend,
        "slot_wait = \"10s\"\nspool_size = \"24KB\"\n",
        "[smtp]\nstress_command_timeout = \"1s\"\n",
    );
    let mut slow = in_data(&proxy, "slow@x");
    let mut sender = waiting_for_the_slot(&proxy);
    // Spooled two seconds in (some 2 000 bytes), then on past 3 000.
    trickle(&mut slow, 15, 100, Duration::from_millis(100));
    expect(&sender.reply(), "250 ");
    assert_eq!(proxy.ctx.spool.spooled(), 1);
    trickle(&mut slow, 25, 100, Duration::from_millis(10));
    assert_eq!(slow.cmd("."), "452 4.3.1 Insufficient system storage");
    assert_eq!(proxy.ctx.spool.used(), 0);
    // The session goes on; nothing of the message reached the backend.
    assert_eq!(slow.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(backend.messages().len(), 0);
}

#[test]
fn a_slow_message_held_for_the_content_filters_gives_its_slot_back_too() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let scanner = DeadPort::new().expect("a dead port");
    let proxy = one_slot(
        &backend,
        "10s",
        &format!(
            "[smtp]\nstress_command_timeout = \"1s\"\n\n{}",
            holding_filters(&scanner)
        ),
    );
    let mut slow = in_data(&proxy, "slow@x");
    let mut sender = waiting_for_the_slot(&proxy);
    let mut body = b"Subject: held\r\n\r\n".to_vec();
    slow.send(&body);
    body.extend(trickle(&mut slow, 20, 100, Duration::from_millis(100)));
    expect(&sender.reply(), "250 ");
    assert_eq!(proxy.ctx.spool.spooled(), 1);
    assert_eq!(sender.cmd("QUIT"), "221 2.0.0 Bye");
    assert_eq!(slow.cmd("."), "250 2.0.0 Ok: queued as 1");
    let messages = backend.messages();
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].ends_with(&body),
        "{}",
        String::from_utf8_lossy(&messages[0])
    );
    assert_eq!(backend.connections(), 3);
}

#[test]
fn a_sender_gives_its_slot_back_between_messages_when_others_wait() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "5s", "");
    let mut first = Smtp::session(proxy.addr);
    expect(&first.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&first.cmd("RCPT TO:<alice@example.com>"), "250 ");
    let mut second = Smtp::session(proxy.addr);
    second.send(b"MAIL FROM:<b@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the second MAIL does not wait for a slot"
    );
    expect(&first.cmd("DATA"), "354 ");
    expect(&first.cmd("Subject: one\r\n\r\nbody\r\n."), "250 ");
    // The first session stays, but its slot went to the second.
    expect(&second.reply(), "250 ");
    expect(&second.cmd("RCPT TO:<bob@example.com>"), "250 ");
    assert_eq!(first.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(second.cmd("QUIT"), "221 2.0.0 Bye");
    // The first one's next message earns a connection again.
    expect(&first.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&first.cmd("RCPT TO:<carol@example.com>"), "250 ");
    assert_eq!(backend.connections(), 3);
}

#[test]
fn a_session_idle_after_rset_gives_its_slot_to_a_waiting_sender() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "5s", "");
    // A MAIL earns the connection, RSET ends the transaction, and the
    // client idles on: no transaction, nothing pending at the backend.
    let mut idler = Smtp::session(proxy.addr);
    expect(&idler.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&idler.cmd("RSET"), "250 ");
    let mut sender = Smtp::session(proxy.addr);
    let started = Instant::now();
    // The sender's wait wakes the idler's, which gives the slot back.
    expect(&sender.cmd("MAIL FROM:<b@x>"), "250 ");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    expect(&sender.cmd("RCPT TO:<bob@example.com>"), "250 ");
    // The idler is not cut: answered by the proxy, and its next MAIL
    // waits its turn for a connection again.
    assert_eq!(idler.cmd("NOOP"), "250 2.0.0 Ok");
    assert_eq!(sender.cmd("QUIT"), "221 2.0.0 Bye");
    expect(&idler.cmd("MAIL FROM:<a@x>"), "250 ");
    assert_eq!(backend.connections(), 3);
    assert_eq!(proxy.shed("slow-transaction"), 0);
}

#[test]
fn an_authenticated_session_keeps_its_backend_connection_between_messages() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = one_slot(&backend, "5s", "[smtp]\nauth_requires_tls = false\n");
    let mut user = Smtp::session(proxy.addr);
    let login = base64_encode(b"\0user\0secret");
    expect(&user.cmd(&format!("AUTH PLAIN {login}")), "235 ");
    expect(&user.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&user.cmd("RCPT TO:<alice@example.com>"), "250 ");
    let mut other = Smtp::session(proxy.addr);
    other.send(b"MAIL FROM:<b@x>\r\n");
    assert!(
        wait_until(WAIT, || proxy.ctx.backend_slots.waiting() == 1),
        "the second MAIL does not wait for a slot"
    );
    expect(&user.cmd("DATA"), "354 ");
    expect(&user.cmd("Subject: one\r\n\r\nbody\r\n."), "250 ");
    // Others wait, but the connection carries the login: a new one would
    // not, and the user's next message would be refused as a relay.
    expect(&user.cmd("MAIL FROM:<a@x>"), "250 ");
    expect(&user.cmd("RCPT TO:<bob@example.com>"), "250 ");
    assert_eq!(backend.connections(), 1);
    assert_eq!(user.cmd("QUIT"), "221 2.0.0 Bye");
    expect(&other.reply(), "250 ");
}

// -- 17. Shedding under pressure -------------------------------------------

#[test]
fn too_many_commands_before_mail_end_the_session() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_commands_before_mail = 4\n");
    let mut zombie = Smtp::session(proxy.addr);
    for _ in 0..3 {
        assert_eq!(zombie.cmd("NOOP"), "250 2.0.0 Ok");
    }
    expect(&zombie.cmd("NOOP"), "421 4.7.0");
    assert!(zombie.closed());
    assert_eq!(rejections(&proxy, "too-many-commands"), 1);
    assert_eq!(proxy.shed("too-many-commands"), 1);
    // Lines refused before they are commands (a NUL byte) count too.
    let mut garbage = Smtp::session(proxy.addr);
    for _ in 0..3 {
        expect(&garbage.cmd("NO\0OP"), "500 ");
    }
    expect(&garbage.cmd("NO\0OP"), "421 4.7.0");
    assert!(garbage.closed());
    // A sender is not limited once its MAIL was accepted.
    let mut sender = Smtp::session(proxy.addr);
    expect(&sender.cmd("MAIL FROM:<a@x>"), "250 ");
    for _ in 0..10 {
        assert_eq!(sender.cmd("NOOP"), "250 2.0.0 Ok");
    }
    assert_eq!(backend.connections(), 1);
}

#[test]
fn at_the_session_cap_the_oldest_idle_session_makes_room() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(&backend, "[smtp]\nmax_sessions = 3\n");
    let mut oldest = Smtp::session(proxy.addr);
    let mut sender = Smtp::session(proxy.addr);
    expect(&sender.cmd("MAIL FROM:<a@x>"), "250 ");
    let mut younger = Smtp::session(proxy.addr);
    // Full: the newcomer is served, the oldest idle one without a MAIL goes
    // (the sender, although older than `younger`, is never shed). All are
    // in their first seconds, so it is shed as new.
    let mut newcomer = Smtp::session(proxy.addr);
    expect(&oldest.reply(), "421 4.3.2");
    assert!(oldest.closed());
    assert_eq!(rejections(&proxy, "shed-new"), 1);
    assert_eq!(younger.cmd("NOOP"), "250 2.0.0 Ok");
    expect(&sender.cmd("RCPT TO:<alice@example.com>"), "250 ");
    assert_eq!(newcomer.cmd("NOOP"), "250 2.0.0 Ok");
    // The next newcomer sheds `younger`.
    let _next = Smtp::session(proxy.addr);
    expect(&younger.reply(), "421 4.3.2");
    assert_eq!(rejections(&proxy, "shed-new"), 2);
    assert_eq!(proxy.shed("shed-new"), 2);
    assert_eq!(proxy.shed("too-many-commands"), 0);
}

#[test]
fn a_source_whose_idle_sessions_keep_being_shed_is_blocked() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[smtp]\nmax_sessions = 2\n[limits]\nmax_shed_sessions_per_source = 2\n",
    );
    // A zombie holds both places and comes back each time it is cut: each
    // of its newcomers sheds its oldest session (in its first seconds,
    // which counts toward the limit all the same).
    let mut held = vec![Smtp::session(proxy.addr), Smtp::session(proxy.addr)];
    for sheds in 1..=2 {
        let newcomer = Smtp::session(proxy.addr);
        let mut oldest = held.remove(0);
        expect(&oldest.reply(), "421 4.3.2");
        assert_eq!(proxy.shed("shed-new"), sheds);
        assert!(blocked(&proxy).is_none(), "blocked after {sheds} sheds");
        held.push(newcomer);
    }
    // The third shed within the window blocks the source, before its 421
    // (the newcomer itself may already meet the block at its greeting).
    let _newcomer = Smtp::connect(proxy.addr);
    expect(&held.remove(0).reply(), "421 4.3.2");
    let block = blocked(&proxy).expect("127.0.0.1 blocked");
    assert_eq!(block.net, "127.0.0.1/32".parse().unwrap());
    assert_eq!(block.origin, Reason::Flood);
    assert_eq!(rejections(&proxy, "shed-sessions"), 1);
    let (mut again, greeting) = Smtp::connect(proxy.addr);
    expect(&greeting, "421 4.7.0");
    assert!(again.closed());
    assert_eq!(
        backend.connections(),
        0,
        "the zombie never reached the backend"
    );
}

#[test]
fn an_idle_session_from_before_the_stress_gets_the_short_timeout_once_it_comes() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[smtp]\nmax_sessions = 4\nstress_threshold = 0.5\nstress_command_timeout = \"1s\"\ncommand_timeout = \"20s\"\n",
    );
    // One of four sessions open: no stress, 20 s. A zombie that came
    // before the flood must not keep that once the flood is there.
    let mut early = Smtp::session(proxy.addr);
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut sender = Smtp::session(proxy.addr);
    expect(&sender.cmd("MAIL FROM:<a@x>"), "250 ");
    // Two of four: under stress.
    expect(&early.reply(), "421 4.4.2");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.shed("stress-timeout") >= 1);
}

#[test]
fn under_stress_a_session_idle_between_transactions_gets_the_short_timeout() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[smtp]\nmax_sessions = 4\nstress_threshold = 0.5\nstress_command_timeout = \"1s\"\ncommand_timeout = \"20s\"\n",
    );
    // A zombie that had a MAIL accepted once, to be taken for a sender,
    // then idles between transactions: no longer than one that never said
    // MAIL.
    let mut zombie = Smtp::session(proxy.addr);
    expect(&zombie.cmd("MAIL FROM:<z@x>"), "250 ");
    expect(&zombie.cmd("RSET"), "250 ");
    // A sender in its transaction (which the stress timeout leaves alone,
    // so the stress stays): two of four sessions open, under stress.
    let mut sender = Smtp::session(proxy.addr);
    expect(&sender.cmd("MAIL FROM:<a@x>"), "250 ");
    let started = Instant::now();
    expect(&zombie.reply(), "421 4.4.2");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(proxy.shed("stress-timeout") >= 1);
    expect(&sender.cmd("RCPT TO:<alice@example.com>"), "250 ");
}

#[test]
fn under_stress_idle_sessions_without_mail_get_a_short_timeout() {
    let backend = ScriptedBackend::start(Behaviour::default());
    let proxy = start(
        &backend,
        "[smtp]\nmax_sessions = 4\nstress_threshold = 0.5\nstress_command_timeout = \"1s\"\ncommand_timeout = \"20s\"\n",
    );
    let mut sender = Smtp::session(proxy.addr);
    expect(&sender.cmd("MAIL FROM:<a@x>"), "250 ");
    let mut idle = Smtp::session(proxy.addr);
    // Two of four sessions open: under stress.
    let started = Instant::now();
    expect(&idle.reply(), "421 4.4.2");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(rejections(&proxy, "stress-timeout") >= 1);
    assert_eq!(
        proxy.shed("stress-timeout"),
        rejections(&proxy, "stress-timeout")
    );
    // The sender keeps its RFC timeout.
    expect(&sender.cmd("RCPT TO:<alice@example.com>"), "250 ");
}
