//! A scripted backend SMTP server for the proxy tests: plain std threads on
//! `127.0.0.1:0`, a Postfix-like dialogue whose knobs live in [`Behaviour`],
//! and a record of everything that reached it.
//!
//! What it records:
//! * [`ScriptedBackend::received`]: every line it read, in order, with its
//!   terminator (`"\r\n"`, a bare `"\n"`, or none for bytes cut off by the
//!   end of the connection), command lines and message lines alike, so that
//!   `received().concat()` is the byte stream the proxy sent (text that is
//!   not UTF-8 converted lossily). A PROXY header is not part of it.
//! * [`ScriptedBackend::lines`]: the same without the terminators.
//! * [`ScriptedBackend::messages`]: the DATA bodies it accepted, exactly as
//!   received (dot-stuffing kept), without the final `.` line.
//! * [`ScriptedBackend::proxy_sources`]: the client addresses read from
//!   PROXY headers, when [`Behaviour::expect_proxy_v2`] (or `_v1`) is set.
//!
//! The end of DATA is recognised leniently, like the servers SMTP smuggling
//! targets: a line holding just `.` ends the message whether it ends in
//! CRLF or a bare LF, and whatever CRLF/LF came before it. A smuggled end
//! marker that got past the proxy therefore shows up as a stored message.
//!
//! The server is bounded (line length, message size, recorded bytes,
//! simultaneous connections), never panics, and its threads end when it is
//! dropped: a flag is set, the accept loop is woken by a connection to
//! itself, and connection threads notice the flag within [`POLL`].

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

pub mod peer;

/// The backend's host name, in its greeting and EHLO reply.
pub const BACKEND_NAME: &str = "backend.test";
/// The default greeting.
pub const DEFAULT_GREETING: &str = "220 backend.test ESMTP";
/// The user name [`Behaviour::default`] accepts for AUTH.
pub const AUTH_USER: &str = "user";
/// The password [`Behaviour::default`] accepts for AUTH.
pub const AUTH_PASSWORD: &str = "secret";
/// What the backend answers for [`FailMode::Reply421`] (deliberately not the
/// proxy's own `421 4.3.0`, so tests can tell a relayed reply from the
/// proxy's).
pub const BACKEND_421: &str = "421 4.3.2 backend.test Error: service shutting down";
/// How often blocked reads and pauses look at the stop flag.
pub const POLL: Duration = Duration::from_millis(50);

/// Longest line kept whole; longer ones are cut into pieces of this size.
const MAX_LINE: usize = 64 * 1024;
/// Largest message body stored; the rest is read and dropped (and the
/// message refused with 552).
const MAX_MESSAGE: usize = 32 << 20;
/// Bytes recorded in `received` at most; later lines are not recorded.
const MAX_RECORDED: usize = 64 << 20;
/// Simultaneous connections; more are closed at once.
const MAX_CONNECTIONS: usize = 256;
/// The SIZE the backend advertises and enforces on `MAIL FROM … SIZE=`.
const BACKEND_SIZE: u64 = 10_240_000;
/// The PROXY protocol v2 signature.
const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// What the backend does when [`Behaviour::fail_after`] matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Answer [`BACKEND_421`] instead of the normal reply, then close.
    Reply421,
    /// Close the connection without a word.
    Close,
    /// Never answer again (keep reading and recording until the peer
    /// closes or the backend is dropped).
    Hang,
}

/// The knobs of the scripted backend.
#[derive(Clone, Debug)]
pub struct Behaviour {
    /// The greeting line, without CRLF.
    pub greeting: String,
    /// How long to wait before greeting (after the PROXY header, if any).
    pub greeting_delay: Duration,
    /// The EHLO capabilities, one per line, after the host name.
    pub capabilities: Vec<String>,
    /// Recipients that exist (compared without case); the others get
    /// `550 5.1.1 <x>: Recipient address rejected: User unknown`.
    pub valid_recipients: Vec<String>,
    /// Recipients whose check cannot finish now (compared without case):
    /// `450 4.1.1 <x>: Recipient address rejected: unverified address`, as
    /// Postfix answers while its address-verification probe is pending.
    pub deferred_recipients: Vec<String>,
    /// The only AUTH credentials accepted (PLAIN and LOGIN).
    pub auth_user: String,
    pub auth_password: String,
    /// `(prefix, mode)`: on the first line (command, AUTH answer, or
    /// message line — the end of DATA is the line `"."`) starting with
    /// `prefix` (ASCII case-insensitive), fail as `mode` instead of
    /// answering. Applies on every connection.
    pub fail_after: Option<(String, FailMode)>,
    /// Read a PROXY protocol v2 header before greeting; its source address
    /// goes to [`ScriptedBackend::proxy_sources`]. A missing or malformed
    /// header closes the connection.
    pub expect_proxy_v2: bool,
    /// Read a PROXY protocol v1 line before greeting (same record).
    pub expect_proxy_v1: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            greeting: DEFAULT_GREETING.to_owned(),
            greeting_delay: Duration::ZERO,
            capabilities: [
                "PIPELINING",
                "SIZE 10240000",
                "VRFY",
                "ETRN",
                "STARTTLS",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING",
                "XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT",
                "XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT",
                "AUTH PLAIN LOGIN",
            ]
            .map(str::to_owned)
            .to_vec(),
            valid_recipients: [
                "alice@example.com",
                "bob@example.com",
                "carol@example.com",
                "postmaster@example.com",
            ]
            .map(str::to_owned)
            .to_vec(),
            deferred_recipients: Vec::new(),
            auth_user: AUTH_USER.to_owned(),
            auth_password: AUTH_PASSWORD.to_owned(),
            fail_after: None,
            expect_proxy_v2: false,
            expect_proxy_v1: false,
        }
    }
}

impl Behaviour {
    /// The default behaviour failing as `mode` on the first line starting
    /// with `prefix`.
    #[must_use]
    pub fn failing(prefix: &str, mode: FailMode) -> Self {
        Self {
            fail_after: Some((prefix.to_owned(), mode)),
            ..Self::default()
        }
    }

    /// Without the capability whose keyword is `keyword` (e.g. `"XCLIENT"`).
    #[must_use]
    pub fn without_capability(mut self, keyword: &str) -> Self {
        self.capabilities
            .retain(|c| !capability_keyword(c).eq_ignore_ascii_case(keyword));
        self
    }
}

/// What the backend saw, shared with its threads.
#[derive(Default)]
struct Record {
    received: Vec<String>,
    recorded_bytes: usize,
    messages: Vec<Vec<u8>>,
    proxy_sources: Vec<SocketAddr>,
    connections: usize,
    active: usize,
    queue_id: u64,
}

struct Shared {
    behaviour: Behaviour,
    stop: AtomicBool,
    record: Mutex<Record>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A running scripted backend; stops on drop.
pub struct ScriptedBackend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl ScriptedBackend {
    /// Binds `127.0.0.1:0` and serves `behaviour` until dropped.
    ///
    /// # Panics
    /// When no local port can be bound.
    #[must_use]
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the scripted backend");
        let addr = listener.local_addr().expect("scripted backend address");
        let shared = Arc::new(Shared {
            behaviour,
            stop: AtomicBool::new(false),
            record: Mutex::new(Record::default()),
            threads: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        let accept = thread::Builder::new()
            .name("scripted-accept".into())
            .spawn(move || accept_loop(&listener, &accept_shared))
            .expect("spawn the scripted backend");
        Self {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Where the backend listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every line received, in order, terminators included.
    #[must_use]
    pub fn received(&self) -> Vec<String> {
        self.shared.record().received.clone()
    }

    /// Every line received, in order, without its CR/LF terminator.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.received()
            .into_iter()
            .map(|l| {
                let l = l.strip_suffix('\n').unwrap_or(&l);
                l.strip_suffix('\r').unwrap_or(l).to_owned()
            })
            .collect()
    }

    /// The byte stream received (all connections, in order), lossily as text.
    #[must_use]
    pub fn stream(&self) -> String {
        self.received().concat()
    }

    /// The message bodies accepted with 250, as received (dot-stuffed),
    /// without the final `.` line.
    #[must_use]
    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.shared.record().messages.clone()
    }

    /// Client addresses read from PROXY headers.
    #[must_use]
    pub fn proxy_sources(&self) -> Vec<SocketAddr> {
        self.shared.record().proxy_sources.clone()
    }

    /// Connections accepted so far.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.shared.record().connections
    }

    /// Connections open now.
    #[must_use]
    pub fn active(&self) -> usize {
        self.shared.record().active
    }

    /// Forgets what was recorded so far (lines, messages, PROXY sources,
    /// the count of connections): e.g. the proxy's capability probe, so
    /// that a test sees only its own sessions.
    pub fn forget(&self) {
        let mut record = self.shared.record();
        record.received.clear();
        record.recorded_bytes = 0;
        record.messages.clear();
        record.proxy_sources.clear();
        record.connections = 0;
    }

    /// Waits up to `limit` for `done(self)`; returns its last value.
    pub fn wait_until(&self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let end = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `limit` for every connection to be closed.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        self.wait_until(limit, |b| b.active() == 0)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) if shared.stopping() => return,
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        if shared.stopping() {
            return;
        }
        {
            let mut record = shared.record();
            if record.active >= MAX_CONNECTIONS {
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            record.connections += 1;
            record.active += 1;
        }
        let conn_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name("scripted-conn".into())
            .spawn(move || {
                let shared = conn_shared.clone();
                if let Some(mut conn) = Conn::new(stream, conn_shared) {
                    conn.serve();
                    let _ = conn.stream.shutdown(Shutdown::Both);
                }
                shared.record().active -= 1;
            });
        match spawned {
            Ok(handle) => {
                let mut threads = shared.threads.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(handle);
            }
            Err(_) => shared.record().active -= 1,
        }
    }
}

/// What a read of the next line produced.
enum Input {
    Line(Vec<u8>),
    /// The peer closed (or the backend is stopping, or the socket failed).
    Gone,
}

/// The SMTP state of one connection.
#[derive(Default)]
struct Dialogue {
    helo: bool,
    mail: bool,
    rcpts: usize,
    authenticated: bool,
}

/// Whether the dialogue goes on.
enum Flow {
    Continue,
    Close,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: Arc<Shared>,
}

impl Conn {
    fn new(stream: TcpStream, shared: Arc<Shared>) -> Option<Self> {
        stream.set_read_timeout(Some(POLL)).ok()?;
        stream
            .set_write_timeout(Some(Duration::from_secs(5)))
            .ok()?;
        let _ = stream.set_nodelay(true);
        Some(Self {
            stream,
            buf: Vec::with_capacity(4096),
            shared,
        })
    }

    fn behaviour(&self) -> &Behaviour {
        &self.shared.behaviour
    }

    /// Reads more bytes into `buf`; false when the peer is gone or the
    /// backend is stopping.
    fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if self.shared.stopping() {
                return false;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return false,
            }
        }
    }

    /// The next line with its terminator (cut at [`MAX_LINE`] bytes). Bytes
    /// left unterminated when the peer closes are recorded, then `Gone`.
    fn read_line(&mut self) -> Input {
        loop {
            if let Some(lf) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=lf).collect();
                self.log(&line);
                return Input::Line(line);
            }
            if self.buf.len() >= MAX_LINE {
                let line: Vec<u8> = self.buf.drain(..MAX_LINE).collect();
                self.log(&line);
                return Input::Line(line);
            }
            if !self.fill() {
                if !self.buf.is_empty() {
                    let rest = std::mem::take(&mut self.buf);
                    self.log(&rest);
                }
                return Input::Gone;
            }
        }
    }

    /// Exactly `n` bytes (not recorded), for the PROXY v2 header.
    fn read_exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill() {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    fn log(&self, bytes: &[u8]) {
        let mut record = self.shared.record();
        if record.recorded_bytes.saturating_add(bytes.len()) <= MAX_RECORDED {
            record.recorded_bytes += bytes.len();
            record
                .received
                .push(String::from_utf8_lossy(bytes).into_owned());
        }
    }

    /// Writes one reply (CRLF added to every line); false on failure.
    fn send(&mut self, reply: &str) -> bool {
        let mut bytes = Vec::with_capacity(reply.len() + 2);
        for line in reply.split('\n') {
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&bytes).is_ok()
    }

    /// Sleeps `d` in steps; false when the backend is stopping.
    fn pause(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if self.shared.stopping() {
                return false;
            }
            thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
        }
        !self.shared.stopping()
    }

    /// The failure configured for `line`, if it matches.
    fn failure_for(&self, line: &[u8]) -> Option<FailMode> {
        let (prefix, mode) = self.behaviour().fail_after.as_ref()?;
        let text = trim_eol(line);
        let prefix = prefix.as_bytes();
        (text.len() >= prefix.len() && text[..prefix.len()].eq_ignore_ascii_case(prefix))
            .then_some(*mode)
    }

    /// Fails as `mode`; the connection ends afterwards.
    fn fail(&mut self, mode: FailMode) {
        match mode {
            FailMode::Reply421 => {
                let _ = self.send(BACKEND_421);
            }
            FailMode::Close => {}
            FailMode::Hang => while let Input::Line(_) = self.read_line() {},
        }
    }

    /// Reads the next line and applies `fail_after`; `None` when the
    /// connection is to end.
    fn next(&mut self) -> Option<Vec<u8>> {
        match self.read_line() {
            Input::Gone => None,
            Input::Line(line) => match self.failure_for(&line) {
                Some(mode) => {
                    self.fail(mode);
                    None
                }
                None => Some(line),
            },
        }
    }

    fn serve(&mut self) {
        if self.behaviour().expect_proxy_v2 && !self.read_proxy_v2() {
            return;
        }
        if self.behaviour().expect_proxy_v1 && !self.read_proxy_v1() {
            return;
        }
        if !self.pause(self.behaviour().greeting_delay) {
            return;
        }
        let greeting = self.behaviour().greeting.clone();
        if !self.send(&greeting) {
            return;
        }
        let mut dialogue = Dialogue::default();
        while let Some(line) = self.next() {
            let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
            let (verb, args) = match text.split_once([' ', '\t']) {
                Some((verb, args)) => (verb.to_ascii_uppercase(), args.trim().to_owned()),
                None => (text.trim().to_ascii_uppercase(), String::new()),
            };
            if let Flow::Close = self.command(&mut dialogue, &verb, &args) {
                return;
            }
        }
    }

    fn command(&mut self, d: &mut Dialogue, verb: &str, args: &str) -> Flow {
        let reply = match verb {
            "EHLO" | "HELO" if args.is_empty() => format!("501 5.5.4 Syntax: {verb} hostname"),
            "EHLO" => {
                *d = Dialogue {
                    helo: true,
                    authenticated: d.authenticated,
                    ..Dialogue::default()
                };
                let mut lines = vec![BACKEND_NAME.to_owned()];
                lines.extend(self.behaviour().capabilities.iter().cloned());
                let last = lines.len() - 1;
                lines
                    .iter()
                    .enumerate()
                    .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            "HELO" => {
                *d = Dialogue {
                    helo: true,
                    authenticated: d.authenticated,
                    ..Dialogue::default()
                };
                format!("250 {BACKEND_NAME}")
            }
            "XCLIENT" if self.offers("XCLIENT") => {
                // Postfix: the session starts over as the named client.
                *d = Dialogue::default();
                self.behaviour().greeting.clone()
            }
            "XCLIENT" => "550 5.7.0 Error: insufficient authorization".to_owned(),
            "XFORWARD" if self.offers("XFORWARD") => "250 2.0.0 Ok".to_owned(),
            "MAIL" => mail(d, args),
            "RCPT" => self.rcpt(d, args),
            "DATA" if !d.mail => "503 5.5.1 Error: need RCPT command".to_owned(),
            "DATA" if d.rcpts == 0 => "554 5.5.1 Error: no valid recipients".to_owned(),
            "DATA" => return self.data(d),
            "AUTH" => match self.auth(d, args) {
                Some(reply) => reply,
                None => return Flow::Close,
            },
            "RSET" => {
                d.mail = false;
                d.rcpts = 0;
                "250 2.0.0 Ok".to_owned()
            }
            "NOOP" => "250 2.0.0 Ok".to_owned(),
            "VRFY" => format!("252 2.0.0 {args}"),
            "STARTTLS" => "454 4.7.0 TLS not available due to local problem".to_owned(),
            "QUIT" => {
                let _ = self.send("221 2.0.0 Bye");
                return Flow::Close;
            }
            _ => "502 5.5.2 Error: command not recognized".to_owned(),
        };
        if self.send(&reply) {
            Flow::Continue
        } else {
            Flow::Close
        }
    }

    fn offers(&self, keyword: &str) -> bool {
        self.behaviour()
            .capabilities
            .iter()
            .any(|c| capability_keyword(c).eq_ignore_ascii_case(keyword))
    }

    fn rcpt(&self, d: &mut Dialogue, args: &str) -> String {
        if !d.mail {
            return "503 5.5.1 Error: need MAIL command".to_owned();
        }
        let Some(path) = strip_keyword(args, "TO:") else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".to_owned();
        };
        let address = angle_address(path);
        if self
            .behaviour()
            .valid_recipients
            .iter()
            .any(|r| r.eq_ignore_ascii_case(&address))
        {
            d.rcpts += 1;
            "250 2.1.5 Ok".to_owned()
        } else if self
            .behaviour()
            .deferred_recipients
            .iter()
            .any(|r| r.eq_ignore_ascii_case(&address))
        {
            format!("450 4.1.1 <{address}>: Recipient address rejected: unverified address")
        } else {
            format!("550 5.1.1 <{address}>: Recipient address rejected: User unknown")
        }
    }

    fn data(&mut self, d: &mut Dialogue) -> Flow {
        if !self.send("354 End data with <CR><LF>.<CR><LF>") {
            return Flow::Close;
        }
        let mut body = Vec::new();
        let mut too_big = false;
        loop {
            // The end of the connection mid-message stores nothing.
            let Some(line) = self.next() else {
                return Flow::Close;
            };
            if line == b".\r\n" || line == b".\n" {
                break;
            }
            if body.len() + line.len() > MAX_MESSAGE {
                too_big = true;
            } else {
                body.extend_from_slice(&line);
            }
        }
        d.mail = false;
        d.rcpts = 0;
        let reply = if too_big {
            "552 5.3.4 Error: message file too big".to_owned()
        } else {
            let mut record = self.shared.record();
            record.messages.push(body);
            record.queue_id += 1;
            format!("250 2.0.0 Ok: queued as {}", record.queue_id)
        };
        if self.send(&reply) {
            Flow::Continue
        } else {
            Flow::Close
        }
    }

    /// AUTH PLAIN / LOGIN; `None` when the connection is to end.
    fn auth(&mut self, d: &mut Dialogue, args: &str) -> Option<String> {
        if !d.helo {
            return Some("503 5.5.1 Error: send HELO/EHLO first".to_owned());
        }
        if d.authenticated {
            return Some("503 5.5.1 Error: already authenticated".to_owned());
        }
        if d.mail {
            return Some("503 5.5.1 Error: MAIL transaction in progress".to_owned());
        }
        let mut words = args.split_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_owned);
        let (user, password) = match mechanism.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) if r != "=" => r,
                    _ => self.challenge("")?,
                };
                if response == "*" {
                    return Some("501 5.7.0 Error: authentication aborted".to_owned());
                }
                let decoded = base64_decode(&response).unwrap_or_default();
                let mut parts = decoded.split(|&b| b == 0);
                let (authzid, user, password) = (parts.next(), parts.next(), parts.next());
                if parts.next().is_some()
                    || !authzid.is_some_and(|a| a.is_empty() || Some(a) == user)
                {
                    (Vec::new(), Vec::new())
                } else {
                    (
                        user.unwrap_or_default().to_vec(),
                        password.unwrap_or_default().to_vec(),
                    )
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(u) => u,
                    None => self.challenge("VXNlcm5hbWU6")?,
                };
                if user == "*" {
                    return Some("501 5.7.0 Error: authentication aborted".to_owned());
                }
                let password = self.challenge("UGFzc3dvcmQ6")?;
                if password == "*" {
                    return Some("501 5.7.0 Error: authentication aborted".to_owned());
                }
                (
                    base64_decode(&user).unwrap_or_default(),
                    base64_decode(&password).unwrap_or_default(),
                )
            }
            "" => return Some("501 5.5.4 Syntax: AUTH mechanism".to_owned()),
            _ => return Some("504 5.5.4 Error: Unsupported authentication mechanism".to_owned()),
        };
        let behaviour = self.behaviour();
        if user == behaviour.auth_user.as_bytes() && password == behaviour.auth_password.as_bytes()
        {
            d.authenticated = true;
            Some("235 2.7.0 Authentication successful".to_owned())
        } else {
            Some("535 5.7.8 Error: authentication failed: authentication failure".to_owned())
        }
    }

    /// Sends a 334 challenge and reads the answer line (trimmed).
    fn challenge(&mut self, text: &str) -> Option<String> {
        if !self.send(&format!("334 {text}")) {
            return None;
        }
        let line = self.next()?;
        Some(String::from_utf8_lossy(trim_eol(&line)).trim().to_owned())
    }

    fn read_proxy_v2(&mut self) -> bool {
        let Some(head) = self.read_exact(16) else {
            return false;
        };
        if head[..12] != PROXY_V2_SIGNATURE || head[12] != 0x21 {
            return false;
        }
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if len > 1024 {
            return false;
        }
        let Some(body) = self.read_exact(len) else {
            return false;
        };
        let source = match head[13] {
            0x11 if len >= 12 => SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(body[0], body[1], body[2], body[3])),
                u16::from_be_bytes([body[8], body[9]]),
            ),
            0x21 if len >= 36 => {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&body[..16]);
                SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(octets)),
                    u16::from_be_bytes([body[32], body[33]]),
                )
            }
            _ => return false,
        };
        self.shared.record().proxy_sources.push(source);
        true
    }

    fn read_proxy_v1(&mut self) -> bool {
        // At most 107 bytes (the v1 specification); a LF within them.
        while !self.buf.contains(&b'\n') {
            if self.buf.len() > 107 || !self.fill() {
                return false;
            }
        }
        let Some(lf) = self.buf.iter().position(|&b| b == b'\n') else {
            return false;
        };
        let line: Vec<u8> = self.buf.drain(..=lf).collect();
        let text = String::from_utf8_lossy(trim_eol(&line)).into_owned();
        let words: Vec<&str> = text.split(' ').collect();
        let source = match words.as_slice() {
            ["PROXY", "TCP4" | "TCP6", src, _dst, sport, _dport] => {
                match (src.parse::<IpAddr>(), sport.parse::<u16>()) {
                    (Ok(ip), Ok(port)) => SocketAddr::new(ip, port),
                    _ => return false,
                }
            }
            _ => return false,
        };
        self.shared.record().proxy_sources.push(source);
        true
    }
}

fn mail(d: &mut Dialogue, args: &str) -> String {
    if !d.helo {
        return "503 5.5.1 Error: send HELO/EHLO first".to_owned();
    }
    if d.mail {
        return "503 5.5.1 Error: nested MAIL command".to_owned();
    }
    let Some(rest) = strip_keyword(args, "FROM:") else {
        return "501 5.5.4 Syntax: MAIL FROM:<address>".to_owned();
    };
    let size = rest.split_whitespace().skip(1).find_map(|p| {
        p.get(..5)
            .filter(|k| k.eq_ignore_ascii_case("SIZE="))
            .and_then(|_| p[5..].parse::<u64>().ok())
    });
    if size.is_some_and(|s| s > BACKEND_SIZE) {
        return "552 5.3.4 Message size exceeds fixed limit".to_owned();
    }
    d.mail = true;
    d.rcpts = 0;
    "250 2.1.0 Ok".to_owned()
}

/// `args` after `keyword` (`"FROM:"`, `"TO:"`), compared without case.
fn strip_keyword<'a>(args: &'a str, keyword: &str) -> Option<&'a str> {
    let head = args.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| args[keyword.len()..].trim_start())
}

/// The address of `<address> PARAMS` (or a bare address).
fn angle_address(path: &str) -> String {
    let first = path.split_whitespace().next().unwrap_or("");
    first
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix('>'))
        .unwrap_or(first)
        .to_owned()
}

fn capability_keyword(capability: &str) -> &str {
    capability.split([' ', '=']).next().unwrap_or(capability)
}

/// `line` without its LF and the CR before it.
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (for SASL).
#[must_use]
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 (padding optional); `None` for anything else.
#[must_use]
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let value = BASE64.iter().position(|&b| b == c)?;
        acc = (acc << 6) | value as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip() {
        for input in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"\0user\0secret",
            b"Username:",
        ] {
            let encoded = base64_encode(input);
            assert_eq!(base64_decode(&encoded).as_deref(), Some(input), "{encoded}");
        }
        assert_eq!(base64_encode(b"Username:"), "VXNlcm5hbWU6");
        assert_eq!(base64_decode("not base64!"), None);
    }

    fn client(backend: &ScriptedBackend) -> (TcpStream, String) {
        let mut stream = TcpStream::connect(backend.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let greeting = read_reply(&mut stream);
        (stream, greeting)
    }

    fn read_reply(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if stream.read(&mut byte).unwrap() == 0 {
                return String::from_utf8_lossy(&out).into_owned();
            }
            out.push(byte[0]);
            if out.ends_with(b"\r\n") {
                let last = out[..out.len() - 2]
                    .rsplit(|&b| b == b'\n')
                    .next()
                    .unwrap_or(&[]);
                if last.len() < 4 || last[3] == b' ' {
                    return String::from_utf8_lossy(&out).into_owned();
                }
            }
        }
    }

    fn cmd(stream: &mut TcpStream, line: &str) -> String {
        stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        read_reply(stream)
    }

    #[test]
    fn dialogue_and_record() {
        let backend = ScriptedBackend::start(Behaviour::default());
        let (mut c, greeting) = client(&backend);
        assert_eq!(greeting, "220 backend.test ESMTP\r\n");
        assert!(cmd(&mut c, "EHLO x").ends_with("250 AUTH PLAIN LOGIN\r\n"));
        assert!(cmd(&mut c, "MAIL FROM:<a@x>").starts_with("250 "));
        assert!(cmd(&mut c, "RCPT TO:<nobody@example.com>")
            .starts_with("550 5.1.1 <nobody@example.com>"));
        assert!(cmd(&mut c, "RCPT TO:<Alice@Example.com>").starts_with("250 "));
        assert!(cmd(&mut c, "DATA").starts_with("354 "));
        c.write_all(b"a\r\n..b\r\n.\r\n").unwrap();
        assert!(read_reply(&mut c).starts_with("250 2.0.0 Ok: queued as 1"));
        let plain = base64_encode(b"\0user\0secret");
        assert!(cmd(&mut c, &format!("AUTH PLAIN {plain}")).starts_with("235 "));
        assert!(cmd(&mut c, "QUIT").starts_with("221 "));
        assert_eq!(backend.messages(), vec![b"a\r\n..b\r\n".to_vec()]);
        assert_eq!(backend.lines()[0], "EHLO x");
        assert!(backend.stream().contains("a\r\n..b\r\n.\r\nAUTH PLAIN"));
        assert!(backend.wait_idle(Duration::from_secs(2)));
        assert_eq!(backend.connections(), 1);
    }

    #[test]
    fn lenient_end_of_data_and_failures() {
        let backend = ScriptedBackend::start(Behaviour::failing("RCPT", FailMode::Reply421));
        let (mut c, _) = client(&backend);
        cmd(&mut c, "EHLO x");
        cmd(&mut c, "MAIL FROM:<a@x>");
        assert_eq!(
            cmd(&mut c, "RCPT TO:<alice@example.com>"),
            format!("{BACKEND_421}\r\n")
        );
        assert_eq!(read_reply(&mut c), "", "closed after 421");

        let backend = ScriptedBackend::start(Behaviour::default());
        let (mut c, _) = client(&backend);
        cmd(&mut c, "EHLO x");
        cmd(&mut c, "MAIL FROM:<a@x>");
        cmd(&mut c, "RCPT TO:<alice@example.com>");
        cmd(&mut c, "DATA");
        c.write_all(b"x\n.\nNOOP\r\n").unwrap();
        assert!(read_reply(&mut c).starts_with("250 2.0.0 Ok: queued"));
        assert!(read_reply(&mut c).starts_with("250 2.0.0 Ok"));
        assert_eq!(backend.messages(), vec![b"x\n".to_vec()]);
    }

    #[test]
    fn proxy_v2_header_and_hang_end_on_drop() {
        let backend = ScriptedBackend::start(Behaviour {
            expect_proxy_v2: true,
            ..Behaviour::failing("NOOP", FailMode::Hang)
        });
        let mut c = TcpStream::connect(backend.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut header = PROXY_V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 9, 127, 0, 0, 1, 0x9c, 0x40, 0, 25,
        ]);
        c.write_all(&header).unwrap();
        assert_eq!(read_reply(&mut c), "220 backend.test ESMTP\r\n");
        assert_eq!(
            backend.proxy_sources(),
            vec!["192.0.2.9:40000".parse().unwrap()]
        );
        c.write_all(b"NOOP\r\n").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(c.read(&mut byte).is_err(), "no answer while hanging");
        let started = Instant::now();
        drop(backend);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
