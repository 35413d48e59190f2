//! Sessions run in-process: the client over an in-memory stream, the backend
//! a scripted fake that answers like Postfix over the in-memory backend seam
//! ([`crate::proxy::backend::memory`]), the clock paused (timeouts are
//! reached by advancing virtual time, never by sleeping).

use std::sync::Mutex;

use bytes::BytesMut;
use limiter_common::Reason as Origin;
use tokio::{
    io::{duplex, DuplexStream},
    task::JoinHandle,
};

use super::*;
use crate::{
    config::{BackendConnect, Config},
    kernel::NoKernel,
    policy::ConnectVerdict,
    proxy::{backend::memory, capabilities::Learned, tls::ClientStream},
    smtp::reply::{EnhancedCode, ReplyParser},
};

/// Bytes in flight each way between the test's client and the session.
const CLIENT_CAPACITY: usize = 64 * 1024;
/// The client's address, and the one it reached the proxy on.
const PEER: &str = "198.51.100.7:40000";
const LOCAL: &str = "203.0.113.1:25";
/// Mailboxes the fake backend knows; any other gets `550 5.1.1`.
const KNOWN: [&str; 2] = ["alice@example.com", "bob@example.com"];
/// The start of a PROXY protocol v2 header.
const PROXY_V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

const GREETING: &str = "220 mx.example.com ESMTP Postfix\r\n";
const QUEUED: &str = "250 2.0.0 Ok: queued as ABC123\r\n";

/// The fake backend's reply to EHLO, with or without PIPELINING.
fn ehlo_reply(pipelining: bool) -> String {
    let mut lines = vec!["mx.example.com"];
    if pipelining {
        lines.push("PIPELINING");
    }
    lines.extend([
        "SIZE 10240000",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "SMTPUTF8",
    ]);
    let last = lines.len() - 1;
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| format!("250{}{line}\r\n", if i == last { ' ' } else { '-' }))
        .collect()
}

/// Parses one whole reply from `text`.
fn parse(text: &str) -> Reply {
    let mut buffer = BytesMut::from(text.as_bytes());
    let reply = ReplyParser::default()
        .feed(&mut buffer)
        .expect("a whole reply")
        .expect("a well-formed reply");
    assert!(buffer.is_empty(), "one reply in {text:?}");
    reply
}

/// What the fake backend received.
#[derive(Default)]
struct Seen {
    /// Connections accepted.
    connections: usize,
    /// The PROXY v2 header of each connection.
    headers: Vec<Vec<u8>>,
    /// Every line, commands and message lines alike, without CRLF, in the
    /// order received (all connections).
    lines: Vec<String>,
    /// Each read's bytes, as they came.
    reads: Vec<Vec<u8>>,
    /// Each message as received, dot-stuffed, without the end marker.
    messages: Vec<Vec<u8>>,
    /// Mailboxes deleted since the start: refused from now on.
    deleted: Vec<String>,
}

/// A scripted backend that answers like Postfix (behind a PROXY v2 header,
/// `smtpd_upstream_proxy_protocol = haproxy`).
struct FakeBackend {
    seen: Arc<Mutex<Seen>>,
    _task: JoinHandle<()>,
}

impl FakeBackend {
    /// Starts one; returns it and the address that names it.
    fn start(pipelining: bool) -> (SocketAddr, Self) {
        let (address, mut listener) = memory::listen();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(stream) = listener.accept().await {
                    seen.lock().unwrap().connections += 1;
                    tokio::spawn(converse(stream, pipelining, seen.clone()));
                }
            })
        };
        (address, Self { seen, _task: task })
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }

    fn lines(&self) -> Vec<String> {
        self.seen(|s| s.lines.clone())
    }

    fn connections(&self) -> usize {
        self.seen(|s| s.connections)
    }

    /// Deletes `mailbox`: refused from now on.
    fn delete(&self, mailbox: &str) {
        self.seen.lock().unwrap().deleted.push(mailbox.into());
    }
}

/// One backend connection: the PROXY header, the greeting, then each line
/// answered as Postfix would.
async fn converse(mut stream: DuplexStream, pipelining: bool, seen: Arc<Mutex<Seen>>) {
    let mut input = Vec::new();
    // The PROXY v2 header: 16 bytes, then as many as its length says.
    while input.len() < 16 || input.len() < 16 + header_len(&input) {
        if !read_some(&mut stream, &mut input, &seen).await {
            return;
        }
    }
    assert_eq!(&input[..12], PROXY_V2_SIGNATURE, "a PROXY v2 header first");
    let header: Vec<u8> = input.drain(..16 + header_len(&input)).collect();
    seen.lock().unwrap().headers.push(header);
    if stream.write_all(GREETING.as_bytes()).await.is_err() {
        return;
    }
    let mut message: Option<Vec<u8>> = None;
    loop {
        while let Some(end) = input.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = input.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&line[..end]).into_owned();
            seen.lock().unwrap().lines.push(text.clone());
            let reply = match message.as_mut() {
                Some(_) if text == "." => {
                    let body = message.take().unwrap_or_default();
                    seen.lock().unwrap().messages.push(body);
                    QUEUED.to_owned()
                }
                Some(body) => {
                    body.extend_from_slice(&line);
                    continue;
                }
                None if recipient_deleted(&text, &seen) => format!(
                    "550 5.1.1 {}: Recipient address rejected: User unknown in local recipient table\r\n",
                    &text[8..]
                ),
                None => answer(&text, pipelining, &mut message),
            };
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
            if reply.starts_with("221") {
                return;
            }
        }
        if !read_some(&mut stream, &mut input, &seen).await {
            return;
        }
    }
}

/// Whether `line` is a RCPT to a mailbox in `seen.deleted`.
fn recipient_deleted(line: &str, seen: &Mutex<Seen>) -> bool {
    let upper = line.to_ascii_uppercase();
    upper.starts_with("RCPT TO:")
        && seen
            .lock()
            .unwrap()
            .deleted
            .iter()
            .any(|mailbox| upper.contains(&format!("<{}>", mailbox.to_ascii_uppercase())))
}

/// The length a PROXY v2 header gives for what follows its 16 bytes.
fn header_len(input: &[u8]) -> usize {
    input
        .get(14..16)
        .map_or(0, |b| usize::from(u16::from_be_bytes([b[0], b[1]])))
}

/// Reads what is there into `input` (and `seen.reads`); false at the end.
async fn read_some(stream: &mut DuplexStream, input: &mut Vec<u8>, seen: &Mutex<Seen>) -> bool {
    let mut chunk = vec![0; 16 * 1024];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            seen.lock().unwrap().reads.push(chunk[..n].to_vec());
            input.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

/// Postfix's answer to a command line; DATA opens `message`.
fn answer(line: &str, pipelining: bool, message: &mut Option<Vec<u8>>) -> String {
    let upper = line.to_ascii_uppercase();
    let verb = upper.split(' ').next().unwrap_or_default();
    match verb {
        "EHLO" => ehlo_reply(pipelining),
        "HELO" => "250 mx.example.com\r\n".into(),
        "MAIL" if upper.contains("@REFUSED.") => {
            "553 5.7.1 <x@refused.example>: Sender address rejected: Access denied\r\n".into()
        }
        "MAIL" => "250 2.1.0 Ok\r\n".into(),
        "RCPT" => {
            let address = line
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(address, _)| address.to_ascii_lowercase())
                .unwrap_or_default();
            if KNOWN.contains(&address.as_str()) {
                "250 2.1.5 Ok\r\n".into()
            } else {
                format!("550 5.1.1 <{address}>: Recipient address rejected: User unknown in local recipient table\r\n")
            }
        }
        "DATA" => {
            *message = Some(Vec::new());
            "354 End data with <CR><LF>.<CR><LF>\r\n".into()
        }
        "VRFY" | "EXPN" => {
            let address = line[verb.len()..]
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_ascii_lowercase();
            if KNOWN.contains(&address.as_str()) {
                format!("252 2.0.0 {address}\r\n")
            } else {
                format!("550 5.1.1 <{address}>: Recipient address rejected: User unknown in local recipient table\r\n")
            }
        }
        "RSET" | "NOOP" => "250 2.0.0 Ok\r\n".into(),
        "QUIT" => "221 2.0.0 Bye\r\n".into(),
        _ => "502 5.5.2 Error: command not recognized\r\n".into(),
    }
}

/// The test's end of the client connection.
struct Client {
    stream: DuplexStream,
    input: BytesMut,
    parser: ReplyParser,
}

impl Client {
    async fn send(&mut self, bytes: &str) {
        self.stream.write_all(bytes.as_bytes()).await.unwrap();
    }

    /// The next whole reply (cancel-safe: what was read stays buffered).
    async fn reply(&mut self) -> Reply {
        loop {
            if let Some(reply) = self.parser.feed(&mut self.input) {
                return reply.expect("a well-formed reply");
            }
            let n = self.stream.read_buf(&mut self.input).await.unwrap();
            assert!(n > 0, "the session closed instead of replying");
        }
    }

    /// Sends a command and returns the reply.
    async fn command(&mut self, line: &str) -> Reply {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Sends each command in turn; each reply must have its code.
    async fn expect_codes(&mut self, dialogue: &[(&str, u16)]) {
        for (command, code) in dialogue {
            assert_eq!(self.command(command).await.code, *code, "{command}");
        }
    }

    /// Whether the session closed the connection (after every reply was
    /// read).
    async fn closed(&mut self) -> bool {
        self.input.is_empty() && matches!(self.stream.read_buf(&mut self.input).await, Ok(0))
    }
}

/// A session over an in-memory client stream and a fake backend.
struct Harness {
    ctx: Arc<ProxyContext>,
    backend: FakeBackend,
    client: Client,
    session: JoinHandle<SessionSummary>,
    _shutdown: watch::Sender<bool>,
}

impl Harness {
    /// A session with the default configuration, the backend offering
    /// PIPELINING.
    fn start() -> Self {
        Self::start_with(Config::default(), true)
    }

    /// A session with `config`, its backend the fake one. The probe is
    /// taken as done: the proxy greets and answers EHLO with what the fake
    /// backend says (`backend.connect = "on-mail"`).
    fn start_with(config: Config, pipelining: bool) -> Self {
        Self::start_prepared(config, pipelining, |_| {})
    }

    /// [`Self::start_with`], `prepare` given the context before the
    /// session begins.
    fn start_prepared(
        mut config: Config,
        pipelining: bool,
        prepare: impl FnOnce(&ProxyContext),
    ) -> Self {
        let (address, backend) = FakeBackend::start(pipelining);
        config.backend.address = address;
        let ctx = ProxyContext::new(&config, Arc::new(NoKernel::new("unit test"))).unwrap();
        ctx.capabilities.record(Some(Learned {
            greeting: parse(GREETING),
            ehlo: parse(&ehlo_reply(pipelining)),
        }));
        prepare(&ctx);
        let ctx = Arc::new(ctx);
        let peer: SocketAddr = PEER.parse().unwrap();
        let guard = match ctx.policy().connect(&ctx.state, peer.ip()).verdict {
            ConnectVerdict::Accept(guard) | ConnectVerdict::Allowlisted(guard) => guard,
            ConnectVerdict::Reject { rejection, .. } => panic!("refused: {:?}", rejection.reason),
        };
        let (client, server) = duplex(CLIENT_CAPACITY);
        let (shutdown, stop) = watch::channel(false);
        let session = Session::new(
            ctx.clone(),
            ClientStream::Plain(server),
            peer,
            LOCAL.parse().unwrap(),
            TlsMode::None,
            guard,
            stop,
        );
        Self {
            ctx,
            backend,
            client: Client {
                stream: client,
                input: BytesMut::new(),
                parser: ReplyParser::default(),
            },
            session: tokio::spawn(session.run()),
            _shutdown: shutdown,
        }
    }

    /// The greeting, then EHLO.
    async fn ehlo(&mut self) {
        assert_eq!(self.client.reply().await.code, 220);
        assert_eq!(
            self.client.command("EHLO client.example.org").await.code,
            250
        );
    }

    /// The greeting and EHLO, then MAIL, a RCPT to alice and DATA, each
    /// accepted: the session is in DATA, holding a backend slot.
    async fn start_data(&mut self) {
        self.ehlo().await;
        for (command, code) in [
            ("MAIL FROM:<sender@example.org>", 250),
            ("RCPT TO:<alice@example.com>", 250),
            ("DATA", 354),
        ] {
            assert_eq!(self.client.command(command).await.code, code, "{command}");
        }
    }

    /// Another source's wait for a backend slot (at most a minute).
    fn wait_for_a_slot(
        &self,
    ) -> JoinHandle<Result<crate::proxy::slots::SlotGuard, crate::proxy::slots::SlotError>> {
        let slots = self.ctx.backend_slots.clone();
        tokio::spawn(async move {
            slots
                .acquire("192.0.2.9".parse().unwrap(), Duration::from_secs(60), false)
                .await
        })
    }

    /// Blocks `net` as the CLI or another session would
    /// ([`ProxyContext::enforce`]: table, then the sessions' notice; the
    /// kernel layer is off here).
    fn block_elsewhere(&self, net: ipnet::IpNet) {
        let _ = self.ctx.enforce(crate::blocks::Block {
            net,
            origin: Origin::Manual,
            expires: None,
            since: std::time::SystemTime::now(),
            repeat: 0,
            comment: None,
        });
    }

    /// Waits for the session to end; its summary.
    async fn ended(self) -> (SessionSummary, Client, FakeBackend, Arc<ProxyContext>) {
        let summary = self.session.await.unwrap();
        (summary, self.client, self.backend, self.ctx)
    }
}

/// The reply has `code` and the enhanced status code `enhanced`.
fn assert_code(reply: &Reply, code: u16, enhanced: EnhancedCode) {
    assert_eq!(reply.code, code, "{reply:?}");
    assert_eq!(reply.enhanced(), Some(enhanced), "{reply:?}");
}

const MESSAGE: &str = "From: <sender@example.org>\r\n\
                       To: <alice@example.com>\r\n\
                       Subject: in-process\r\n\
                       \r\n\
                       Hello.\r\n\
                       ..a line that starts with a dot\r\n";

#[tokio::test(start_paused = true)]
async fn a_transaction_is_delivered_once_and_the_backends_reply_relayed_unchanged() {
    let mut h = Harness::start();
    h.ehlo().await;
    let mail = h.client.command("MAIL FROM:<sender@example.org>").await;
    assert_code(&mail, 250, (2, 1, 0));
    let rcpt = h.client.command("RCPT TO:<alice@example.com>").await;
    assert_code(&rcpt, 250, (2, 1, 5));
    assert_eq!(h.client.command("DATA").await.code, 354);
    h.client.send(MESSAGE).await;
    let queued = h.client.command(".").await;
    assert_eq!(queued, parse(QUEUED), "the backend's reply, unchanged");
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (summary, mut client, backend, _) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(summary.messages, 1);
    assert_eq!(summary.rcpt_accepted, 1);

    let mut expected = vec![
        "EHLO client.example.org".to_owned(),
        "MAIL FROM:<sender@example.org>".into(),
        "RCPT TO:<alice@example.com>".into(),
        "DATA".into(),
    ];
    expected.extend(MESSAGE.split_terminator("\r\n").map(str::to_owned));
    expected.extend([".".into(), "QUIT".into()]);
    assert_eq!(backend.lines(), expected, "every line once, in order");
    assert_eq!(backend.connections(), 1);
    backend.seen(|seen| {
        assert_eq!(seen.messages, vec![MESSAGE.as_bytes().to_vec()]);
        // The header names the client and the address it reached.
        let header = &seen.headers[0];
        assert_eq!(&header[16..20], &[198, 51, 100, 7]);
        assert_eq!(&header[20..24], &[203, 0, 113, 1]);
        assert_eq!(&header[24..26], &40000u16.to_be_bytes());
        assert_eq!(&header[26..28], &25u16.to_be_bytes());
    });
}

#[tokio::test(start_paused = true)]
async fn a_session_without_mail_never_connects_to_the_backend() {
    let mut h = Harness::start();
    assert_eq!(h.ctx.settings().connect, BackendConnect::OnMail);
    let greeting = h.client.reply().await;
    assert_eq!(greeting, parse(GREETING), "the greeting the probe learned");
    let ehlo = h.client.command("EHLO client.example.org").await;
    assert_eq!(ehlo.code, 250);
    assert!(
        parse_capabilities(&ehlo).iter().any(|c| c == "PIPELINING"),
        "{ehlo:?}"
    );
    assert_eq!(h.client.command("NOOP").await.code, 250);
    assert_eq!(h.client.command("RSET").await.code, 250);
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (summary, mut client, backend, _) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(summary.outcome, "closed");
    assert_eq!(backend.connections(), 0);
    assert!(backend.lines().is_empty());
}

/// A session of a source whose mail the backend accepted a moment ago.
fn start_recent_sender(config: Config) -> Harness {
    start_recent_sender_with(config, |_| {})
}

/// As [`start_recent_sender`], with `also` done to the context first.
fn start_recent_sender_with(config: Config, also: impl FnOnce(&ProxyContext)) -> Harness {
    Harness::start_prepared(config, true, |ctx| {
        let peer: SocketAddr = PEER.parse().unwrap();
        ctx.recent_senders
            .record(peer.ip(), tokio::time::Instant::now());
        also(ctx);
    })
}

/// Lets the session's background tasks run (the clock is paused: this
/// moves virtual time by a millisecond).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_makes_its_source_a_recent_sender() {
    let mut h = Harness::start();
    let peer: SocketAddr = PEER.parse().unwrap();
    h.ehlo().await;
    h.client.command("MAIL FROM:<sender@example.org>").await;
    h.client.command("RCPT TO:<nobody@example.com>").await;
    assert!(!h
        .ctx
        .recent_senders
        .contains(peer.ip(), tokio::time::Instant::now()));
    h.client.command("RCPT TO:<alice@example.com>").await;
    assert_eq!(h.client.command("DATA").await.code, 354);
    h.client.send(MESSAGE).await;
    assert_eq!(h.client.command(".").await.code, 250);
    assert!(h
        .ctx
        .recent_senders
        .contains(peer.ip(), tokio::time::Instant::now()));
}

#[tokio::test(start_paused = true)]
async fn a_recent_sender_gets_its_backend_connection_at_accept_and_its_mail_goes_through_it() {
    let mut h = start_recent_sender(Config::default());
    assert_eq!(h.client.reply().await, parse(GREETING));
    settle().await;
    assert_eq!(h.backend.connections(), 1, "connected before any command");
    assert!(h.backend.lines().is_empty(), "greeted only: no HELO yet");
    assert_eq!(h.ctx.backend_slots.in_use(), 1);
    assert_eq!(h.client.command("EHLO client.example.org").await.code, 250);
    settle().await;
    assert_eq!(
        h.backend.lines(),
        ["EHLO client.example.org"],
        "the client's EHLO sent ahead of its MAIL"
    );
    assert_code(
        &h.client.command("MAIL FROM:<sender@example.org>").await,
        250,
        (2, 1, 0),
    );
    assert_eq!(
        h.client.command("RCPT TO:<alice@example.com>").await.code,
        250
    );
    assert_eq!(h.client.command("DATA").await.code, 354);
    h.client.send(MESSAGE).await;
    assert_eq!(h.client.command(".").await, parse(QUEUED));
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (summary, _, backend, ctx) = h.ended().await;
    assert_eq!(summary.messages, 1);
    assert_eq!(backend.connections(), 1, "the early connection carried it");
    let lines = backend.lines();
    assert_eq!(
        lines[..2],
        ["EHLO client.example.org", "MAIL FROM:<sender@example.org>"]
    );
    backend.seen(|seen| assert_eq!(&seen.headers[0][16..20], &[198, 51, 100, 7]));
    assert_eq!(ctx.stats.early_links(), vec![("used", 1)]);
    assert_eq!(ctx.backend_slots.in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_early_connection_nobody_claims_is_closed_at_its_hold_and_the_source_forgotten() {
    let mut h = start_recent_sender(Config::default());
    let peer: SocketAddr = PEER.parse().unwrap();
    h.ehlo().await;
    settle().await;
    assert_eq!(h.ctx.backend_slots.in_use(), 1);
    // A client that holds its session without MAIL, as a zombie does.
    tokio::time::sleep(crate::proxy::early::HOLD).await;
    settle().await;
    assert_eq!(
        h.backend.lines(),
        ["EHLO client.example.org", "QUIT"],
        "told goodbye, nothing else"
    );
    assert_eq!(h.ctx.backend_slots.in_use(), 0, "its slot given back");
    assert_eq!(h.ctx.stats.early_links(), vec![("unused", 1)]);
    assert!(
        !h.ctx
            .recent_senders
            .contains(peer.ip(), tokio::time::Instant::now()),
        "no early connection next time until it delivers again"
    );
    // Its MAIL later earns a connection as any session's does.
    assert_eq!(
        h.client.command("MAIL FROM:<late@example.org>").await.code,
        250
    );
    assert_eq!(h.backend.connections(), 2);
    assert_eq!(
        h.backend.lines()[2..],
        ["EHLO client.example.org", "MAIL FROM:<late@example.org>"]
    );
}

#[tokio::test(start_paused = true)]
async fn the_backend_judges_the_name_of_the_clients_last_helo_not_the_one_sent_ahead() {
    let mut h = start_recent_sender(Config::default());
    assert_eq!(h.client.reply().await.code, 220);
    assert_eq!(h.client.command("EHLO first.example.org").await.code, 250);
    settle().await;
    assert_eq!(h.client.command("HELO second.example.org").await.code, 250);
    assert_eq!(
        h.client.command("MAIL FROM:<a@example.org>").await.code,
        250
    );
    assert_eq!(
        h.backend.lines(),
        [
            "EHLO first.example.org",
            "HELO second.example.org",
            "MAIL FROM:<a@example.org>"
        ]
    );
    assert_eq!(h.backend.connections(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_recent_sender_that_leaves_without_mail_closes_its_early_connection() {
    let mut h = start_recent_sender(Config::default());
    h.ehlo().await;
    settle().await;
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (_, _, backend, ctx) = h.ended().await;
    settle().await;
    assert_eq!(backend.lines(), ["EHLO client.example.org", "QUIT"]);
    assert_eq!(ctx.backend_slots.in_use(), 0);
    assert_eq!(ctx.stats.early_links(), vec![("unused", 1)]);
}

#[tokio::test(start_paused = true)]
async fn no_early_connection_when_half_the_slots_are_taken_or_it_is_off() {
    let mut config = Config::default();
    config.backend.max_connections = 4;
    let mut h = start_recent_sender(config.clone());
    // Two of four slots held by other sessions' backend connections.
    let _held: Vec<_> = (1..=2)
        .map(|n| {
            h.ctx
                .backend_slots
                .try_acquire(IpAddr::from([192, 0, 2, n]))
                .unwrap()
        })
        .collect();
    h.ehlo().await;
    settle().await;
    assert_eq!(h.backend.connections(), 0);
    assert!(h.ctx.stats.early_links().is_empty());

    config.backend.early_connect = crate::config::EarlyConnect::Off;
    let mut h = start_recent_sender(config);
    h.ehlo().await;
    settle().await;
    assert_eq!(h.backend.connections(), 0);
}

/// During a flood zombies hold the client sessions and the proxy is under
/// stress; a known sender's mail keeps its head start as long as backend
/// slots are plentiful (with them scarce, the test above).
#[tokio::test(start_paused = true)]
async fn a_recent_sender_keeps_its_early_connection_while_zombies_hold_the_sessions() {
    let mut config = Config::default();
    config.smtp.max_sessions = 10;
    let mut h = start_recent_sender_with(config, |ctx| {
        // Nine zombies' sessions besides this one: at the session cap.
        ctx.stats
            .sessions_open
            .store(9, std::sync::atomic::Ordering::Relaxed);
    });
    assert!(h.ctx.stressed(&h.ctx.settings().smtp), "under stress");
    assert_eq!(h.client.reply().await, parse(GREETING));
    settle().await;
    assert_eq!(h.backend.connections(), 1, "connected at accept");
    assert_eq!(h.client.command("EHLO client.example.org").await.code, 250);
    settle().await;
    assert_eq!(h.backend.lines(), ["EHLO client.example.org"]);
    h.client
        .expect_codes(&[("MAIL FROM:<sender@example.org>", 250)])
        .await;
    assert_eq!(
        h.backend.connections(),
        1,
        "the early connection carried it"
    );
    assert_eq!(h.ctx.stats.early_links(), vec![("used", 1)]);
}

/// A trusted source turned zombie (or one beside zombies): once a session
/// of its network was shed, it earns its connection with MAIL like anyone.
#[tokio::test(start_paused = true)]
async fn no_early_connection_for_a_recent_sender_whose_network_was_shed_lately() {
    let mut h = start_recent_sender_with(Config::default(), |ctx| {
        // Another address of its /24.
        ctx.backend_slots
            .mark_shed(IpAddr::from([198, 51, 100, 200]));
    });
    h.ehlo().await;
    settle().await;
    assert_eq!(h.backend.connections(), 0);
    h.client
        .expect_codes(&[("MAIL FROM:<sender@example.org>", 250)])
        .await;
    assert_eq!(h.backend.connections(), 1, "earned at MAIL");
    assert!(h.ctx.stats.early_links().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_before_mail_is_cut_at_the_command_timeout() {
    let mut h = Harness::start();
    h.ehlo().await;
    let limit = h.ctx.settings().smtp.command_timeout;
    let started = tokio::time::Instant::now();
    // Just short of the limit, the session still waits.
    let early = limit - Duration::from_millis(10);
    tokio::time::advance(early).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1), h.client.reply())
            .await
            .is_err(),
        "no reply before the timeout"
    );
    // At the limit it says goodbye and ends.
    tokio::time::advance(Duration::from_millis(20)).await;
    let reply = h.client.reply().await;
    assert_code(&reply, 421, (4, 4, 2));
    let waited = started.elapsed();
    assert!(
        waited >= limit && waited < limit + Duration::from_secs(1),
        "{waited:?}"
    );
    let (summary, mut client, backend, _) = h.ended().await;
    assert_eq!(summary.outcome, "timeout");
    assert!(client.closed().await);
    assert_eq!(backend.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_harvester_gets_421_and_its_source_is_blocked() {
    let mut h = Harness::start();
    h.ehlo().await;
    let limit = Config::default().limits.max_failed_rcpt;
    assert!(h.ctx.policy().enforced());
    assert_code(
        &h.client.command("MAIL FROM:<harvest@example.net>").await,
        250,
        (2, 1, 0),
    );
    for i in 0..limit {
        let reply = h
            .client
            .command(&format!("RCPT TO:<nobody{i}@example.com>"))
            .await;
        assert_code(&reply, 550, (5, 1, 1));
    }
    let last = h.client.command("RCPT TO:<nobody-last@example.com>").await;
    assert_code(&last, 421, (4, 7, 0));
    let (summary, mut client, backend, ctx) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(summary.rcpt_failed, limit + 1);
    let block = ctx
        .blocks
        .covering(
            PEER.parse::<SocketAddr>().unwrap().ip(),
            std::time::SystemTime::now(),
        )
        .expect("the source is blocked");
    assert_eq!(block.origin, Origin::Harvest);
    assert!(ctx
        .blocked(PEER.parse::<SocketAddr>().unwrap().ip())
        .is_some());
    // Every RCPT reached the backend once; nothing after the last.
    let rcpts = backend
        .lines()
        .iter()
        .filter(|l| l.starts_with("RCPT TO:"))
        .count();
    assert_eq!(rcpts, limit as usize + 1);
    assert_eq!(backend.lines().last().map(String::as_str), Some("QUIT"));
}

/// `reply` is the command timeout's `421 4.4.2`, which came `limit` after
/// `started` (within a second).
fn assert_cut_at_the_command_timeout(
    reply: Option<Reply>,
    started: tokio::time::Instant,
    limit: Duration,
) {
    let reply = reply.expect("the session outlived its command timeout");
    assert_code(&reply, 421, (4, 4, 2));
    let waited = started.elapsed();
    assert!(
        waited >= limit && waited < limit + Duration::from_secs(1),
        "{waited:?}"
    );
}

/// Blocks of other sources neither end a waiting session nor restart its
/// wait. (They were broadcast to every session, and each wake-up started
/// the wait afresh: a zombie stayed forever, as long as anything was
/// blocked more often than `command_timeout`, which an attacker can see to
/// with a throwaway harvester.)
#[tokio::test(start_paused = true)]
async fn blocks_of_other_sources_do_not_restart_a_waiting_sessions_timeout() {
    let mut h = Harness::start();
    h.ehlo().await;
    let limit = h.ctx.settings().smtp.command_timeout;
    let started = tokio::time::Instant::now();
    let step = limit / 4;
    let mut reply = None;
    for i in 0..16u32 {
        let other = std::net::Ipv4Addr::from(0xcb00_7100 + i); // 203.0.113.0 + i
        h.block_elsewhere(IpAddr::V4(other).into());
        if let Ok(r) = tokio::time::timeout(step, h.client.reply()).await {
            reply = Some(r);
            break;
        }
    }
    assert_cut_at_the_command_timeout(reply, started, limit);
}

/// A command line trickled a byte at a time is one command: it must be
/// complete within `command_timeout` of the wait's start (RFC 5321's
/// server timeout is per command), not within that of the last byte.
#[tokio::test(start_paused = true)]
async fn a_command_trickled_a_byte_at_a_time_is_cut_at_the_command_timeout() {
    let mut h = Harness::start();
    h.ehlo().await;
    let limit = h.ctx.settings().smtp.command_timeout;
    let started = tokio::time::Instant::now();
    let mut reply = None;
    for byte in "NOOP this is a long line, sent slowly"
        .chars()
        .cycle()
        .take(64)
    {
        h.client.send(&byte.to_string()).await;
        if let Ok(r) = tokio::time::timeout(limit / 4, h.client.reply()).await {
            reply = Some(r);
            break;
        }
    }
    assert_cut_at_the_command_timeout(reply, started, limit);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_session_ends_when_its_source_is_blocked_in_a_burst_of_blocks() {
    let mut h = Harness::start();
    h.ehlo().await;
    // The source is blocked elsewhere (another session, the CLI, another
    // host) among many others.
    let source = PEER.parse::<SocketAddr>().unwrap().ip();
    for i in 0..300u32 {
        let other = std::net::Ipv4Addr::from(0xc633_6400 + i); // 198.51.100.0 + i
        if IpAddr::V4(other) != source {
            h.block_elsewhere(IpAddr::V4(other).into());
        }
        if i == 150 {
            h.block_elsewhere(source.into());
        }
    }
    let reply = h.client.reply().await;
    assert_code(&reply, 421, (4, 7, 0));
    let (_, mut client, backend, _) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(backend.connections(), 0);
}

#[tokio::test(start_paused = true)]
async fn relayed_vrfy_answers_count_toward_the_harvest_limit_and_a_known_address_resets_nothing() {
    let config = Config::from_toml("[smtp]\nvrfy = \"relay\"").unwrap();
    let limit = config.limits.max_failed_rcpt;
    let mut h = Harness::start_with(config, true);
    h.ehlo().await;
    for i in 0..limit {
        let reply = h
            .client
            .command(&format!("VRFY nobody{i}@example.com"))
            .await;
        assert_code(&reply, 550, (5, 1, 1));
        // A known address between guesses clears nothing.
        assert_eq!(h.client.command("EXPN alice@example.com").await.code, 252);
    }
    let last = h.client.command("VRFY nobody-last@example.com").await;
    assert_code(&last, 421, (4, 7, 0));
    let (_, mut client, _, ctx) = h.ended().await;
    assert!(client.closed().await);
    let source = PEER.parse::<SocketAddr>().unwrap().ip();
    let block = ctx
        .blocks
        .covering(source, std::time::SystemTime::now())
        .expect("the source is blocked");
    assert_eq!(block.origin, Origin::Harvest);
}

#[test]
fn only_answers_about_the_address_count_as_a_refused_vrfy() {
    use envelope::refuses_address;
    for (text, counts) in [
        (
            "550 5.1.1 <x@example.com>: Recipient address rejected: User unknown\r\n",
            true,
        ),
        (
            "450 4.1.1 <x@example.com>: Recipient address rejected: unverified address\r\n",
            true,
        ),
        ("553 5.1.3 bad address syntax\r\n", true),
        ("550 no such user\r\n", true),
        ("502 5.5.1 VRFY command is disabled\r\n", false),
        ("252 2.0.0 x@example.com\r\n", false),
        ("250 2.1.5 x@example.com\r\n", false),
        ("554 5.7.1 Access denied\r\n", false),
        ("502 command not implemented\r\n", false),
    ] {
        assert_eq!(refuses_address(&parse(text)), counts, "{text}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_block_covering_an_allow_listed_source_leaves_its_sessions_alone() {
    let config = Config::from_toml("[lists]\nallow = [\"198.51.100.0/24\"]").unwrap();
    let mut h = Harness::start_with(config, true);
    h.ehlo().await;
    // An operator blocks a wider network that holds the allow-listed one.
    let wide: ipnet::IpNet = "198.51.0.0/16".parse().unwrap();
    h.block_elsewhere(wide);
    // Waiting, and then with commands sent together, it is still served.
    assert_eq!(h.client.command("NOOP").await.code, 250);
    h.client.send("NOOP\r\nRSET\r\nNOOP\r\n").await;
    for _ in 0..3 {
        assert_eq!(h.client.reply().await.code, 250);
    }
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (summary, _, _, _) = h.ended().await;
    assert_eq!(summary.outcome, "closed");
}

#[tokio::test(start_paused = true)]
async fn a_pipelined_group_reaches_the_backend_in_one_write_and_replies_come_in_order() {
    let mut h = Harness::start();
    h.ehlo().await;
    let group = "MAIL FROM:<sender@example.org>\r\n\
                 RCPT TO:<alice@example.com>\r\n\
                 RCPT TO:<nobody@example.com>\r\n\
                 RCPT TO:<bob@example.com>\r\n\
                 DATA\r\n";
    h.client.send(group).await;
    assert_code(&h.client.reply().await, 250, (2, 1, 0));
    assert_code(&h.client.reply().await, 250, (2, 1, 5));
    assert_code(&h.client.reply().await, 550, (5, 1, 1));
    assert_code(&h.client.reply().await, 250, (2, 1, 5));
    assert_eq!(h.client.reply().await.code, 354);
    h.client.send(MESSAGE).await;
    assert_eq!(h.client.command(".").await, parse(QUEUED));
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (summary, _, backend, _) = h.ended().await;
    assert_eq!(summary.messages, 1);
    backend.seen(|seen| {
        assert!(
            seen.reads.iter().any(|read| read == group.as_bytes()),
            "the group in one read: {:?}",
            seen.reads
                .iter()
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .collect::<Vec<_>>()
        );
        assert_eq!(seen.messages.len(), 1);
    });
}

/// A bounce to a recipient past `null_sender_rate_per_recipient` is
/// deferred without reaching the backend, whatever the spelling, also in a
/// pipelined group whose MAIL is still pending; a MAIL with a sender is not
/// counted, one from MAILER-DAEMON is.
#[tokio::test(start_paused = true)]
async fn bounces_past_their_recipients_rate_are_deferred_before_the_backend() {
    let config = Config::from_toml("[limits]\nnull_sender_rate_per_recipient = \"1/1h\"").unwrap();
    let mut h = Harness::start_with(config, true);
    h.ehlo().await;
    h.client
        .send(
            "MAIL FROM:<>\r\n\
             RCPT TO:<alice@example.com>\r\n\
             RCPT TO:<Alice+news@EXAMPLE.com>\r\n\
             RCPT TO:<bob@example.com>\r\n\
             DATA\r\n",
        )
        .await;
    assert_code(&h.client.reply().await, 250, (2, 1, 0));
    assert_code(&h.client.reply().await, 250, (2, 1, 5));
    let deferred = h.client.reply().await;
    assert_code(&deferred, 450, (4, 7, 1));
    assert!(
        deferred
            .text()
            .contains("too many bounces to this recipient"),
        "{deferred:?}"
    );
    assert_code(&h.client.reply().await, 250, (2, 1, 5));
    assert_eq!(h.client.reply().await.code, 354);
    h.client.send("Subject: bounce\r\n").await;
    assert_eq!(h.client.command(".").await, parse(QUEUED));
    for (sender, code) in [
        ("<sender@example.org>", 250),
        ("<MAILER-DAEMON@mx.example.net>", 450),
    ] {
        assert_eq!(
            h.client.command(&format!("MAIL FROM:{sender}")).await.code,
            250
        );
        let reply = h.client.command("RCPT TO:<alice@example.com>").await;
        assert_eq!(reply.code, code, "{sender}: {reply:?}");
        assert_eq!(h.client.command("RSET").await.code, 250);
    }
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (_, _, backend, ctx) = h.ended().await;
    let rcpts: Vec<String> = backend
        .lines()
        .into_iter()
        .filter(|line| line.starts_with("RCPT"))
        .collect();
    assert_eq!(
        rcpts,
        [
            "RCPT TO:<alice@example.com>",
            "RCPT TO:<bob@example.com>",
            "RCPT TO:<alice@example.com>"
        ]
    );
    assert_eq!(ctx.stats.rejections(), [("null-sender-rate", 2)]);
}

/// `backend.connect = "on-rcpt"`: the proxy answers the first MAIL
/// itself; the first RCPT it relays opens the backend connection and takes
/// the MAIL with it, in one write.
#[tokio::test(start_paused = true)]
async fn on_rcpt_the_first_relayed_rcpt_earns_the_backend_and_takes_the_mail_along() {
    let config = Config::from_toml("[backend]\nconnect = \"on-rcpt\"").unwrap();
    let mut h = Harness::start_with(config, true);
    h.ehlo().await;
    let mail = h.client.command("MAIL FROM:<sender@example.org>").await;
    assert_code(&mail, 250, (2, 1, 0));
    assert_eq!(h.backend.connections(), 0, "no backend for a MAIL");
    assert_code(
        &h.client.command("RCPT TO:<alice@example.com>").await,
        250,
        (2, 1, 5),
    );
    assert_code(
        &h.client.command("RCPT TO:<nobody@example.com>").await,
        550,
        (5, 1, 1),
    );
    assert_eq!(h.client.command("DATA").await.code, 354);
    h.client.send(MESSAGE).await;
    assert_eq!(h.client.command(".").await, parse(QUEUED));
    // The next transaction has its backend: relayed as usual.
    assert_code(
        &h.client.command("MAIL FROM:<other@example.org>").await,
        250,
        (2, 1, 0),
    );
    assert_code(&h.client.command("RSET").await, 250, (2, 0, 0));
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (summary, _, backend, _) = h.ended().await;
    assert_eq!(summary.messages, 1);
    assert_eq!(backend.connections(), 1);
    backend.seen(|seen| {
        assert!(
            seen.reads.iter().any(|read| read.as_slice()
                == b"MAIL FROM:<sender@example.org>\r\nRCPT TO:<alice@example.com>\r\n"),
            "MAIL and RCPT in one read: {:?}",
            seen.reads
                .iter()
                .map(|r| String::from_utf8_lossy(r).into_owned())
                .collect::<Vec<_>>()
        );
        let mails = seen.lines.iter().filter(|l| l.starts_with("MAIL")).count();
        assert_eq!(mails, 2, "each MAIL once: {:?}", seen.lines);
    });
}

/// A transaction whose every RCPT the proxy refuses (a bounce past
/// `null_sender_rate_per_recipient`, a relay attempt) never costs the
/// backend a session when its MAIL is held: always with `"on-rcpt"`, a
/// bounce's with `"on-mail"`; `"on-mail"` opens one for another sender.
#[tokio::test(start_paused = true)]
async fn transactions_the_proxy_refuses_whole_never_reach_the_backend_when_their_mail_is_held() {
    // A bounce's MAIL is held with "on-mail" too; another sender's only
    // with "on-rcpt".
    for (connect, sender, sessions) in [
        ("on-rcpt", "<>", 0),
        ("on-mail", "<>", 0),
        ("on-rcpt", "<sender@example.org>", 0),
        ("on-mail", "<sender@example.org>", 1),
    ] {
        let config = Config::from_toml(&format!(
            "[backend]\nconnect = \"{connect}\"\n\
             [limits]\nnull_sender_rate_per_recipient = \"1/1h\"\n\
             [relay]\naccept = \"*@example.com\"\n"
        ))
        .unwrap();
        // Alice's bucket is full: one bounce to her from elsewhere.
        let mut h = Harness::start_prepared(config, true, |ctx| {
            let other = "192.0.2.1".parse().unwrap();
            let policy = ctx.policy();
            let first =
                policy.bounce_rcpt(&ctx.state, other, None, "alice@example.com", Instant::now());
            assert!(first.is_none());
        });
        h.ehlo().await;
        let case = format!("{connect}, MAIL FROM:{sender}");
        let mail = h.client.command(&format!("MAIL FROM:{sender}")).await;
        assert_eq!(mail.code, 250, "{case}");
        if sender == "<>" {
            let deferred = h.client.command("RCPT TO:<alice@example.com>").await;
            assert_eq!(deferred.code, 450, "{case}: {deferred:?}");
        }
        let relay = h.client.command("RCPT TO:<victim@elsewhere.example>").await;
        assert_code(&relay, 550, (5, 7, 1));
        assert_eq!(h.client.command("DATA").await.code, 554, "{case}");
        assert_eq!(h.client.command("QUIT").await.code, 221);
        let (_, _, backend, _) = h.ended().await;
        assert_eq!(backend.connections(), sessions, "{case}");
    }
}

/// `backend.connect = "on-rcpt"`: a MAIL the proxy accepted and the
/// backend refuses: every RCPT of the transaction gets the backend's
/// refusal (not counted as a failed recipient), DATA has no recipient,
/// and after RSET the next transaction goes through.
#[tokio::test(start_paused = true)]
async fn on_rcpt_a_sender_the_backend_refuses_answers_the_recipients() {
    for pipelining in [true, false] {
        let config =
            Config::from_toml("[backend]\nconnect = \"on-rcpt\"\n[limits]\nmax_failed_rcpt = 1")
                .unwrap();
        let mut h = Harness::start_with(config, pipelining);
        h.ehlo().await;
        assert_code(
            &h.client.command("MAIL FROM:<spam@refused.example>").await,
            250,
            (2, 1, 0),
        );
        for rcpt in ["alice@example.com", "nobody@example.com", "bob@example.com"] {
            let reply = h.client.command(&format!("RCPT TO:<{rcpt}>")).await;
            assert_code(&reply, 553, (5, 7, 1));
            assert!(
                reply.text().contains("Sender address rejected"),
                "{reply:?}"
            );
        }
        assert_eq!(h.client.command("DATA").await.code, 554);
        assert_eq!(h.client.command("RSET").await.code, 250);
        assert_eq!(
            h.client
                .command("MAIL FROM:<sender@example.org>")
                .await
                .code,
            250
        );
        assert_eq!(
            h.client.command("RCPT TO:<alice@example.com>").await.code,
            250
        );
        assert_eq!(h.client.command("DATA").await.code, 354);
        h.client.send(MESSAGE).await;
        assert_eq!(h.client.command(".").await, parse(QUEUED));
        assert_eq!(h.client.command("QUIT").await.code, 221);
        let (summary, _, _, ctx) = h.ended().await;
        assert_eq!(summary.messages, 1, "pipelining {pipelining}");
        assert_eq!(ctx.stats.rejections(), [], "pipelining {pipelining}");
    }
}

#[tokio::test(start_paused = true)]
async fn without_pipelining_at_the_backend_a_pipelining_client_is_still_served_in_order() {
    let mut h = Harness::start_with(Config::default(), false);
    h.ehlo().await;
    let group = "MAIL FROM:<sender@example.org>\r\n\
                 RCPT TO:<nobody@example.com>\r\n\
                 RCPT TO:<bob@example.com>\r\n\
                 DATA\r\n";
    h.client.send(group).await;
    assert_code(&h.client.reply().await, 250, (2, 1, 0));
    assert_code(&h.client.reply().await, 550, (5, 1, 1));
    assert_code(&h.client.reply().await, 250, (2, 1, 5));
    assert_eq!(h.client.reply().await.code, 354);
    h.client.send(MESSAGE).await;
    assert_eq!(h.client.command(".").await, parse(QUEUED));
    assert_eq!(h.client.command("QUIT").await.code, 221);
    let (_, _, backend, _) = h.ended().await;
    backend.seen(|seen| {
        // Each command waited for the reply before it.
        for command in group.split_terminator("\r\n") {
            let alone = format!("{command}\r\n");
            assert!(
                seen.reads.iter().any(|read| read == alone.as_bytes()),
                "{command} in a read of its own"
            );
        }
    });
}

#[test]
fn credentials_refused_for_good_or_soft_bounced_count_and_nothing_else() {
    for (code, text) in [
        (
            535,
            "5.7.8 Error: authentication failed: authentication failure",
        ),
        // Postfix with soft_bounce = yes.
        (
            435,
            "4.7.8 Error: authentication failed: authentication failure",
        ),
        // smtpd_enhanced_status_codes = no.
        (535, "Error: authentication failed"),
        (435, "Error: authentication failed"),
        (554, "5.7.8 Authentication credentials invalid"),
    ] {
        assert!(
            auth::refuses_credentials(&Reply::new(code, text)),
            "{code} {text}"
        );
    }
    for (code, text) in [
        (235, "2.7.0 Authentication successful"),
        (334, ""),
        (454, "4.7.0 Temporary authentication failure"),
        (501, "5.7.0 Authentication aborted"),
        (501, "5.5.2 Cannot decode response"),
        (503, "5.5.1 Error: already authenticated"),
        (250, "2.7.8 odd but fine"),
    ] {
        assert!(
            !auth::refuses_credentials(&Reply::new(code, text)),
            "{code} {text}"
        );
    }
}

/// The default configuration with `max_connections` backend slots.
fn slots_config(max_connections: u32) -> Config {
    let mut config = Config::default();
    config.backend.max_connections = max_connections;
    config
}

/// A session in DATA holding the only backend slot while another source
/// waits for it: past `smtp.stress_command_timeout` the slot goes to the
/// waiter and the message on into the spool. Returns the waiter's slot.
async fn spooled_mid_message(h: &mut Harness) -> crate::proxy::slots::SlotGuard {
    h.start_data().await;
    h.client.send("Subject: slow\r\n\r\n").await;
    let waiter = h.wait_for_a_slot();
    // The clock is paused: it jumps to the session's deadline.
    let slot = waiter
        .await
        .unwrap()
        .expect("the slot comes free mid-message");
    assert_eq!(h.ctx.spool.spooled(), 1);
    assert_eq!(h.backend.connections(), 1);
    slot
}

#[tokio::test(start_paused = true)]
async fn a_spooled_message_is_replayed_on_a_new_connection_once_a_slot_is_free() {
    let mut h = Harness::start_with(slots_config(1), true);
    let slot = spooled_mid_message(&mut h).await;
    h.client.send("more of it\r\n.\r\n").await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // It waits its turn for the slot.
    assert_eq!(h.backend.connections(), 1);
    drop(slot);
    assert_eq!(h.client.reply().await, parse(QUEUED));
    assert_eq!(h.backend.connections(), 2);
    let lines = h.backend.lines();
    let replayed: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("MAIL") || l.starts_with("RCPT") || l.starts_with("DATA"))
        .collect();
    assert_eq!(
        replayed,
        [
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<alice@example.com>",
            "DATA",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<alice@example.com>",
            "DATA"
        ]
    );
    assert_eq!(
        h.backend.seen(|s| s.messages.clone()),
        [b"Subject: slow\r\n\r\nmore of it\r\n".to_vec()]
    );
    assert_eq!(h.ctx.spool.used(), 0);
}

/// A message spooled for want of its client held a slot others needed:
/// its network's next turns for a slot come after those of networks that
/// did not, as after a parked transaction. It is not shed, and not counted
/// toward a block: a slow link is no abuse.
#[tokio::test(start_paused = true)]
async fn a_spooled_message_sends_its_network_behind_the_others_for_slots() {
    let mut h = Harness::start_with(slots_config(1), true);
    let peer: SocketAddr = PEER.parse().unwrap();
    assert!(!h.ctx.backend_slots.shed_lately(peer.ip()));
    let _slot = spooled_mid_message(&mut h).await;
    assert!(h.ctx.backend_slots.shed_lately(peer.ip()));
    assert!(h.ctx.stats.shed().is_empty());
}

/// The session's MAIL while another source holds the only slot, with
/// `max_shed_sessions_per_source = 1` and one shed of its source counted
/// already: its reply, how long it took, and whether its source is blocked
/// after it.
async fn mail_on_a_held_slot(shed_lately: bool) -> (Reply, Duration, bool) {
    let mut config = slots_config(1);
    config.limits.max_shed_sessions_per_source = 1;
    let mut h = Harness::start_with(config, true);
    let _held = h
        .ctx
        .backend_slots
        .try_acquire("192.0.2.9".parse().unwrap())
        .unwrap();
    h.ehlo().await;
    let source = PEER.parse::<SocketAddr>().unwrap().ip();
    let earlier = h
        .ctx
        .policy()
        .session_shed(&h.ctx.state, source, Instant::now());
    assert!(earlier.is_none(), "one shed is within the limit");
    if shed_lately {
        h.ctx.backend_slots.mark_shed(source);
    }
    let started = tokio::time::Instant::now();
    let reply = h.client.command("MAIL FROM:<sender@example.org>").await;
    (reply, started.elapsed(), h.ctx.blocked(source).is_some())
}

#[tokio::test(start_paused = true)]
async fn a_network_shed_lately_waits_a_second_at_most_for_a_slot_to_start_a_transaction() {
    let (reply, took, blocked) = mail_on_a_held_slot(true).await;
    assert_code(&reply, 421, (4, 3, 2));
    assert_eq!(took, crate::proxy::slots::SHED_SLOT_WAIT);
    // Turned away, it counts toward its source's sheds: a keeper that
    // reconnects each time is blocked.
    assert!(blocked, "max_shed_sessions_per_source = 1");
    // Any other waits backend.slot_wait, and is not counted (a sender
    // turned away for want of a slot did nothing wrong).
    let (reply, took, blocked) = mail_on_a_held_slot(false).await;
    assert_code(&reply, 421, (4, 3, 2));
    assert_eq!(took, Config::default().backend.slot_wait);
    assert!(!blocked);
}

#[tokio::test(start_paused = true)]
async fn with_on_connect_a_network_shed_lately_waits_a_second_at_most_for_its_greeting() {
    let mut config = slots_config(1);
    config.backend.connect = BackendConnect::OnConnect;
    let mut h = Harness::start_prepared(config, true, |ctx| {
        let held = ctx.backend_slots.try_acquire("192.0.2.9".parse().unwrap());
        std::mem::forget(held.expect("the only slot"));
        ctx.backend_slots
            .mark_shed(PEER.parse::<SocketAddr>().unwrap().ip());
    });
    let started = tokio::time::Instant::now();
    assert_code(&h.client.reply().await, 421, (4, 3, 2));
    assert_eq!(started.elapsed(), crate::proxy::slots::SHED_SLOT_WAIT);
}

#[tokio::test(start_paused = true)]
async fn a_spooled_message_whose_recipient_is_gone_at_the_replay_gets_451_and_is_not_delivered() {
    let mut h = Harness::start_with(slots_config(1), true);
    let slot = spooled_mid_message(&mut h).await;
    h.backend.delete("alice@example.com");
    drop(slot);
    h.client.send("body\r\n.\r\n").await;
    // It was told alice was accepted: the message cannot go to her now,
    // and must not be delivered to fewer than it was told.
    assert_code(&h.client.reply().await, 451, (4, 3, 0));
    assert!(h.backend.seen(|s| s.messages.is_empty()));
    assert!(
        h.backend
            .lines()
            .iter()
            .filter(|l| l.as_str() == "DATA")
            .nth(1)
            .is_none(),
        "no DATA on the replay"
    );
    // The session goes on.
    assert_eq!(h.client.command("NOOP").await.code, 250);
}

/// 100 kB of a message at once: lines of 998 bytes.
fn burst() -> String {
    format!("{}\r\n", "x".repeat(998)).repeat(100)
}

/// A byte every 3 s from the client until the session answers; how long
/// that took.
async fn dribble_until_answered(client: &mut Client) -> (Reply, Duration) {
    let started = tokio::time::Instant::now();
    let reply = loop {
        tokio::select! {
            reply = client.reply() => break reply,
            () = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
        client.stream.write_all(b"z").await.unwrap();
    };
    (reply, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn a_spooled_message_must_keep_500_bytes_a_second_or_its_session_ends() {
    let mut h = Harness::start_with(slots_config(1), true);
    let _slot = spooled_mid_message(&mut h).await;
    // Out of contention now (the waiter has the slot), but a spooled
    // message holds proxy memory and a session: from its release it may
    // fall behind 500 bytes/s by stress_command_timeout (10 s). 100 kB sent
    // at once buy nothing more: the byte every 3 s after them is cut at
    // 10 s, not 211 s.
    h.client.send(&burst()).await;
    let (reply, took) = dribble_until_answered(&mut h.client).await;
    assert_code(&reply, 421, (4, 4, 2));
    assert_eq!(took.as_secs(), 10);
    let (summary, mut client, backend, ctx) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(summary.messages, 0);
    assert!(backend.seen(|s| s.messages.is_empty()));
    assert_eq!(ctx.spool.used(), 0);
    assert!(
        ctx.stats.shed().contains(&("slow-transaction", 1)),
        "{:?}",
        ctx.stats.shed()
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_spool_bytes_sent_early_do_not_buy_a_dribbling_client_its_slot() {
    let mut config = slots_config(1);
    config.backend.spool_size = 0;
    let mut h = Harness::start_with(config, true);
    h.start_data().await;
    // 100 kB at once earn nothing beyond the transaction's 10 s
    // (stress_command_timeout) however the client spreads its waits: a
    // byte every 3 s after them is cut at 10 s (with a second per 500
    // bytes counted from the start, and one for the recipient, 211 s).
    h.client.send(&burst()).await;
    let waiter = h.wait_for_a_slot();
    let (reply, took) = dribble_until_answered(&mut h.client).await;
    assert_code(&reply, 421, (4, 4, 2));
    assert_eq!(took.as_secs(), 10);
    assert!(waiter.await.unwrap().is_ok());
    assert!(h.ctx.stats.shed().contains(&("slow-transaction", 1)));
}

#[tokio::test(start_paused = true)]
async fn a_message_sent_steadily_over_a_slow_link_keeps_its_slot_while_others_wait() {
    let mut config = slots_config(1);
    config.backend.spool_size = 0;
    let mut h = Harness::start_with(config, true);
    h.start_data().await;
    let waiter = h.wait_for_a_slot();
    // 600 bytes a second for a minute, each second's worth at its end:
    // never more than a second behind, far past the transaction's 11 s.
    let line = format!("{}\r\n", "y".repeat(598));
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        h.client.send(&line).await;
    }
    assert!(!waiter.is_finished(), "the slot stayed with the sender");
    h.client.send(".\r\n").await;
    assert_eq!(h.client.reply().await, parse(QUEUED));
    assert_eq!(h.backend.seen(|s| s.messages[0].len()), 60 * line.len());
    assert!(h.ctx.stats.shed().is_empty(), "{:?}", h.ctx.stats.shed());
}

#[tokio::test(start_paused = true)]
async fn a_full_spool_evicts_a_trickling_message_for_a_new_one_and_its_session_ends() {
    // A spool of 800 bytes: 100 for each source network.
    let mut config = slots_config(1);
    config.backend.spool_size = 800;
    let mut h = Harness::start_with(config, true);
    let _slot = spooled_mid_message(&mut h).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        h.client.send("x").await;
    }
    // Messages of other networks on their slots fill the spool; the last
    // one needs the trickler's 20 bytes.
    let fillers: Vec<_> = (1..=8)
        .map(|i| {
            let mut copy = h
                .ctx
                .spool
                .copy(format!("203.0.{i}.0/24").parse().unwrap())
                .unwrap();
            assert_eq!(copy.push(&[b'f'; 100]), crate::proxy::spool::Push::Taken);
            copy
        })
        .collect();
    assert_eq!(h.ctx.spool.evicted(), 1);
    assert_eq!(h.ctx.spool.used(), 800);
    assert_code(&h.client.reply().await, 421, (4, 3, 1));
    let (summary, mut client, backend, ctx) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(summary.messages, 0);
    assert!(backend.seen(|s| s.messages.is_empty()));
    assert!(
        ctx.stats.shed().contains(&("spool-evicted", 1)),
        "{:?}",
        ctx.stats.shed()
    );
    drop(fillers);
    assert_eq!(ctx.spool.used(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_spooled_message_of_a_source_blocked_meanwhile_is_not_replayed() {
    let mut h = Harness::start_with(slots_config(1), true);
    let slot = spooled_mid_message(&mut h).await;
    drop(slot);
    h.block_elsewhere("198.51.100.7/32".parse().unwrap());
    h.client.send("body\r\n.\r\n").await;
    assert_code(&h.client.reply().await, 421, (4, 7, 0));
    let (summary, mut client, backend, _) = h.ended().await;
    assert!(client.closed().await);
    assert_eq!(summary.messages, 0);
    assert_eq!(backend.connections(), 1, "no new backend connection");
}

/// How long a lone slow message keeps its backend slot with
/// `max_connections` slots: the client sends its message's first line and
/// then nothing.
async fn slot_kept_by_a_lone_slow_message(max_connections: u32) -> Duration {
    let mut h = Harness::start_with(slots_config(max_connections), true);
    h.start_data().await;
    h.client.send("Subject: slow\r\n").await;
    let started = tokio::time::Instant::now();
    while h.ctx.spool.spooled() == 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "never spooled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test(start_paused = true)]
async fn a_slow_message_gives_its_slot_back_sooner_while_slots_are_scarce() {
    // 1 slot of 4 in use: 10 s (its recipient's second was for the
    // envelope's round trip, which it did not wait for).
    let plenty = slot_kept_by_a_lone_slow_message(4).await;
    assert!((10..11).contains(&plenty.as_secs()), "{plenty:?}");
    // 1 of 2, half in use: 1 s.
    let scarce = slot_kept_by_a_lone_slow_message(2).await;
    assert!((1..2).contains(&scarce.as_secs()), "{scarce:?}");
}

#[tokio::test(start_paused = true)]
async fn recipients_buy_a_message_no_time_on_its_slot() {
    // 1 slot of 2 in use: a slow message's slot goes after 1 s of waits.
    let mut h = Harness::start_with(slots_config(2), true);
    h.ehlo().await;
    // A hundred recipients (the same one: the backend accepts each), in one
    // pipelined group: no round trip to pay for.
    let mut group = String::from("MAIL FROM:<sender@example.org>\r\n");
    group.push_str(&"RCPT TO:<alice@example.com>\r\n".repeat(100));
    h.client.send(&group).await;
    for _ in 0..101 {
        assert_eq!(h.client.reply().await.code, 250);
    }
    assert_eq!(h.client.command("DATA").await.code, 354);
    h.client.send("Subject: slow\r\n").await;
    let started = tokio::time::Instant::now();
    while h.ctx.spool.spooled() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(200),
            "never spooled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not 101 s: a second for each recipient is for the round trips of
    // the envelope, which this one did not wait for.
    assert_eq!(started.elapsed().as_secs(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_recipient_every_second_keeps_a_slot_others_wait_for_ten_seconds_more_at_most() {
    let mut h = Harness::start_with(slots_config(1), true);
    h.ehlo().await;
    assert_eq!(
        h.client
            .command("MAIL FROM:<sender@example.org>")
            .await
            .code,
        250
    );
    let waiter = h.wait_for_a_slot();
    let started = tokio::time::Instant::now();
    let mut recipients = 0;
    // Each recipient would earn the second its client waits before the
    // next: without a bound, 100 of them hold the slot 90 s.
    loop {
        tokio::select! {
            reply = h.client.reply() => panic!("a reply nobody asked for: {reply:?}"),
            () = tokio::time::sleep(Duration::from_millis(900)) => {}
        }
        if waiter.is_finished() {
            break;
        }
        let reply = h.client.command("RCPT TO:<alice@example.com>").await;
        assert_eq!(reply.code, 250, "{reply:?}");
        recipients += 1;
    }
    // 1 s (the one slot in use: scarce), and 10 s for the recipients'
    // round trips; then the transaction is parked and the slot is the
    // waiter's.
    assert_eq!(started.elapsed().as_secs(), 11);
    let slot = waiter.await.unwrap().expect("the waiter gets the slot");
    assert_eq!(h.ctx.stats.parked(), vec![("parked", 1)]);
    assert_eq!(h.backend.connections(), 1);
    // Its next recipient takes the transaction up on a new connection once
    // a slot is free: MAIL and every recipient accepted, then this one.
    drop(slot);
    assert_eq!(
        h.client.command("RCPT TO:<bob@example.com>").await.code,
        250
    );
    assert_eq!(h.backend.connections(), 2);
    // The first connection's QUIT goes in the background: it may come
    // among the second's lines.
    let lines: Vec<String> = h
        .backend
        .lines()
        .into_iter()
        .filter(|l| l != "QUIT")
        .collect();
    let second = lines
        .iter()
        .rposition(|l| l == "MAIL FROM:<sender@example.org>")
        .unwrap();
    let mut want = vec!["MAIL FROM:<sender@example.org>".to_owned()];
    want.extend(std::iter::repeat_n(
        "RCPT TO:<alice@example.com>".to_owned(),
        recipients,
    ));
    want.push("RCPT TO:<bob@example.com>".into());
    assert_eq!(lines[second..], want[..]);
    assert_eq!(h.ctx.stats.parked(), vec![("parked", 1), ("resumed", 1)]);
    assert_eq!(h.client.command("DATA").await.code, 354);
    h.client.send(&format!("{MESSAGE}.\r\n")).await;
    assert_eq!(h.client.reply().await.code, 250);
    assert_eq!(h.backend.seen(|s| s.messages.len()), 1);
}

/// A client that has MAIL and a RCPT accepted on a backend slot, then
/// says NOOP every 500 ms; after `waiter_after` another session waits for
/// a slot: how long until the transaction is parked and its slot given
/// back (`None`: still held after a minute). Every NOOP is answered 250,
/// and goes on being after the slot went, with no new backend connection.
/// One slot; with `shed_before`, two (one in use: scarce), and a session of
/// the client's was shed before.
async fn transaction_kept_open_with_noops(
    waiter_after: Duration,
    shed_before: bool,
) -> Option<Duration> {
    let config = slots_config(if shed_before { 2 } else { 1 });
    let mut h = Harness::start_prepared(config, true, |ctx| {
        if shed_before {
            ctx.backend_slots
                .mark_shed(PEER.parse::<SocketAddr>().unwrap().ip());
        }
    });
    h.ehlo().await;
    h.client.expect_codes(TRANSACTION).await;
    let started = tokio::time::Instant::now();
    let waiter = tokio::spawn({
        let slots = h.ctx.backend_slots.clone();
        async move {
            tokio::time::sleep(waiter_after).await;
            slots
                .acquire("192.0.2.9".parse().unwrap(), Duration::from_secs(60), false)
                .await
        }
    });
    let mut parked_at = None;
    let mut noops_after = 0;
    while started.elapsed() < Duration::from_secs(60) && noops_after < 10 {
        tokio::select! {
            reply = h.client.reply() => panic!("a reply nobody asked for: {reply:?}"),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let reply = h.client.command("NOOP").await;
        assert_eq!(reply.code, 250, "{reply:?}");
        let given_back = waiter.is_finished() || h.ctx.backend_slots.counts().in_use == 0;
        if parked_at.is_none() && given_back {
            parked_at = Some(started.elapsed());
        }
        noops_after += usize::from(parked_at.is_some());
    }
    if parked_at.is_some() {
        assert_eq!(h.ctx.stats.parked(), vec![("parked", 1)]);
        assert_eq!(h.backend.connections(), 1);
        assert!(h.ctx.stats.shed().is_empty(), "{:?}", h.ctx.stats.shed());
    }
    parked_at
}

#[tokio::test(start_paused = true)]
async fn a_transaction_kept_open_loses_its_slot_as_soon_as_a_session_waits_for_it() {
    // Kept open 30 s while nobody needed the slot: parked the moment
    // someone does (its 1 s, and 1 s for its recipient's round trip, long
    // used up).
    let waited_late = transaction_kept_open_with_noops(Duration::from_secs(30), false).await;
    assert_eq!(
        waited_late.map(|d| d.as_secs()),
        Some(30),
        "{waited_late:?}"
    );
    // Waited for from the start: 2 s.
    let waited_at_once = transaction_kept_open_with_noops(Duration::ZERO, false).await;
    assert_eq!(
        waited_at_once.map(|d| d.as_secs()),
        Some(2),
        "{waited_at_once:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_keeper_cut_before_loses_a_scarce_slot_without_anyone_waiting() {
    // 1 of 2 slots in use, nobody waiting: a source shed before gets its
    // 1 s (and 1 s for its recipient) all the same.
    let parked = transaction_kept_open_with_noops(Duration::from_secs(3600), true).await;
    assert_eq!(parked.map(|d| d.as_secs()), Some(2), "{parked:?}");
}

/// MAIL and a RCPT to alice, each accepted.
const TRANSACTION: &[(&str, u16)] = &[
    ("MAIL FROM:<sender@example.org>", 250),
    ("RCPT TO:<alice@example.com>", 250),
];

/// A transaction parked off the one slot, its slot held by another
/// session: returns that session's slot.
async fn parked_transaction(h: &mut Harness) -> crate::proxy::slots::SlotGuard {
    h.ehlo().await;
    h.client.expect_codes(TRANSACTION).await;
    let slot = h
        .wait_for_a_slot()
        .await
        .unwrap()
        .expect("the slot goes to the waiter");
    assert_eq!(h.ctx.stats.parked(), vec![("parked", 1)]);
    slot
}

#[tokio::test(start_paused = true)]
async fn a_parked_transaction_is_taken_up_again_at_its_data_and_parked_once_only() {
    let mut h = Harness::start_with(slots_config(1), true);
    let slot = parked_transaction(&mut h).await;
    // The backend heard QUIT on the connection it had.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.backend.lines().last().map(String::as_str), Some("QUIT"));
    assert_eq!(h.client.command("NOOP").await.code, 250);
    drop(slot);
    assert_eq!(h.client.command("DATA").await.code, 354);
    let lines = h.backend.lines();
    let quit = lines.iter().position(|l| l == "QUIT").unwrap();
    assert_eq!(
        lines[quit + 1..],
        [
            "EHLO client.example.org",
            "MAIL FROM:<sender@example.org>",
            "RCPT TO:<alice@example.com>",
            "DATA"
        ]
    );
    h.client.send(&format!("{MESSAGE}.\r\n")).await;
    assert_eq!(h.client.reply().await.code, 250);
    assert_eq!(h.backend.seen(|s| s.messages.len()), 1);
    assert_eq!(h.ctx.stats.parked(), vec![("parked", 1), ("resumed", 1)]);
    // The next transaction may be parked again; a resumed one is not: the
    // second time its slot is due, the session ends as before.
    h.client.expect_codes(TRANSACTION).await;
    let slot = h.wait_for_a_slot().await.unwrap().expect("parked again");
    assert_eq!(h.ctx.stats.parked(), vec![("parked", 2), ("resumed", 1)]);
    drop(slot);
    assert_eq!(
        h.client.command("RCPT TO:<bob@example.com>").await.code,
        250
    );
    let _slot = h.wait_for_a_slot().await.unwrap().expect("the slot again");
    assert_code(&h.client.reply().await, 421, (4, 4, 2));
    assert!(h.ctx.stats.shed().contains(&("slow-transaction", 1)));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_starts_transaction_after_transaction_to_hold_each_is_blocked() {
    let mut config = slots_config(1);
    config.limits.max_shed_sessions_per_source = 2;
    let mut h = Harness::start_with(config, true);
    let source = PEER.parse::<SocketAddr>().unwrap().ip();
    h.ehlo().await;
    for parks in 1..=2 {
        h.client.expect_codes(TRANSACTION).await;
        let slot = h.wait_for_a_slot().await.unwrap().expect("parked");
        assert_eq!(h.ctx.stats.parked(), vec![("parked", parks)]);
        assert!(h.ctx.blocked(source).is_none(), "blocked after {parks}");
        drop(slot);
        h.client.expect_codes(&[("RSET", 250)]).await;
    }
    // The third within the window blocks it, as a third shed session would.
    h.client.expect_codes(TRANSACTION).await;
    let _slot = h.wait_for_a_slot().await.unwrap().expect("parked");
    assert_code(&h.client.reply().await, 421, (4, 7, 0));
    let (_, mut client, backend, ctx) = h.ended().await;
    assert!(client.closed().await);
    let block = ctx
        .blocks
        .covering(source, std::time::SystemTime::now())
        .expect("the source is blocked");
    assert_eq!(block.origin, Origin::Flood);
    assert_eq!(backend.connections(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_parked_transaction_whose_recipient_is_gone_gets_451_and_starts_afresh() {
    let mut h = Harness::start_with(slots_config(1), true);
    let slot = parked_transaction(&mut h).await;
    h.backend.delete("alice@example.com");
    drop(slot);
    // It was told alice was accepted: the transaction cannot go on without
    // her.
    assert_code(&h.client.command("DATA").await, 451, (4, 3, 0));
    assert_eq!(h.ctx.stats.parked(), vec![("parked", 1), ("refused", 1)]);
    h.client
        .expect_codes(&[
            ("RCPT TO:<bob@example.com>", 503),
            ("MAIL FROM:<sender@example.org>", 250),
            ("RCPT TO:<bob@example.com>", 250),
            ("DATA", 354),
        ])
        .await;
    h.client.send(&format!("{MESSAGE}.\r\n")).await;
    assert_eq!(h.client.reply().await.code, 250);
    assert!(h.backend.seen(|s| s.messages.len()) == 1);
}
