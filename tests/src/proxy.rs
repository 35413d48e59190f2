//! The SMTP proxy running inside the test process on its own tokio runtime,
//! and a small SMTP client that speaks raw lines.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use limiter_user::{
    config::Config,
    kernel::{Datapath, NoKernel},
    proxy::{self, ProxyContext},
};
use tokio::sync::watch;

use crate::netns::NetNs;
use crate::tcp::connect_local;

/// A running proxy; stops on drop.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub ctx: Arc<ProxyContext>,
    stop: watch::Sender<bool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestProxy {
    /// Starts the proxy for `config` (TOML; its first `[[listen]]` should use
    /// port 0) without a kernel layer.
    ///
    /// # Panics
    /// On an invalid configuration or a failure to bind.
    pub fn start(config: &str) -> Self {
        Self::start_with_kernel(
            config,
            Arc::new(NoKernel::new("tests without the kernel layer")),
        )
    }

    /// As [`Self::start`], with the given kernel layer.
    ///
    /// # Panics
    /// As [`Self::start`].
    pub fn start_with_kernel(config: &str, kernel: Arc<dyn Datapath>) -> Self {
        Self::start_in(None, config, kernel)
    }

    /// As [`Self::start_with_kernel`], with the listeners bound inside the
    /// network namespace `ns` (sockets keep the namespace they were created
    /// in; the backend is still reached from the host's namespace).
    ///
    /// # Panics
    /// As [`Self::start`].
    pub fn start_in(ns: Option<&NetNs>, config: &str, kernel: Arc<dyn Datapath>) -> Self {
        let config =
            Config::from_toml(config).unwrap_or_else(|e| panic!("test configuration: {e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let ctx = Arc::new(ProxyContext::new(&config, kernel).expect("proxy context"));
        let bind = || runtime.block_on(proxy::bind(&config)).expect("bind");
        let listeners = match ns {
            Some(ns) => ns.run(bind),
            None => bind(),
        };
        let addr = listeners[0].listener.local_addr().expect("local address");
        let (stop, stopped) = watch::channel(false);
        runtime.spawn(proxy::serve(ctx.clone(), listeners, stopped));
        Self {
            addr,
            ctx,
            stop,
            runtime: Some(runtime),
        }
    }

    /// Stops accepting and lets sessions finish (as on SIGTERM).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// How many sessions were shed for `reason` (`stats`' "shed", the
    /// metric `sessions_shed_total`).
    #[must_use]
    pub fn shed(&self, reason: &str) -> u64 {
        count_of(self.ctx.stats.shed(), reason)
    }

    /// How many transactions were parked off their backend slot, resumed
    /// or refused on resuming, by `outcome` (the metric
    /// `parked_transactions_total`).
    #[must_use]
    pub fn parked(&self, outcome: &str) -> u64 {
        count_of(self.ctx.stats.parked(), outcome)
    }
}

/// The count under `name` in a list of counts by name (0 if absent).
fn count_of(counts: Vec<(&'static str, u64)>, name: &str) -> u64 {
    counts
        .into_iter()
        .find(|(n, _)| *n == name)
        .map_or(0, |(_, count)| count)
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A blocking SMTP client speaking raw lines, for exact dialogue checks.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    /// Connects and returns the client with the greeting.
    ///
    /// # Errors
    /// Connection failures.
    pub fn connect(addr: SocketAddr) -> std::io::Result<(Self, String)> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = client.reply()?;
        Ok((client, greeting))
    }

    /// Wraps an already connected stream (e.g. from a network namespace).
    ///
    /// # Errors
    /// Socket failures.
    pub fn from_stream(stream: TcpStream) -> std::io::Result<(Self, String)> {
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        let mut client = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = client.reply()?;
        Ok((client, greeting))
    }

    /// Sends raw bytes.
    ///
    /// # Errors
    /// Socket failures.
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Sends a line (CRLF added) and returns the whole reply.
    ///
    /// # Errors
    /// Socket failures or a closed connection.
    pub fn cmd(&mut self, line: &str) -> std::io::Result<String> {
        self.send(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Reads one whole reply (all its lines, joined with '\n').
    ///
    /// # Errors
    /// Socket failures or a closed connection.
    pub fn reply(&mut self) -> std::io::Result<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed after {lines:?}"),
                ));
            }
            let line = line.trim_end().to_owned();
            let last = line.len() < 4 || line.as_bytes()[3] == b' ';
            lines.push(line);
            if last {
                return Ok(lines.join("\n"));
            }
        }
    }

    /// What the server does next, waiting at most the read timeout (10 s):
    /// closes the connection, resets it, sends a reply (or other bytes), or
    /// nothing at all. Tests assert the one they mean: a silent server is
    /// [`Seen::Timeout`], never a close.
    pub fn next_event(&mut self) -> Seen {
        let mut first = [0u8; 1];
        match self.reader.read(&mut first) {
            Ok(0) => Seen::Closed,
            Ok(_) => {
                let mut rest = String::new();
                let _ = self.reader.read_line(&mut rest);
                let text = format!("{}{}", char::from(first[0]), rest.trim_end());
                match text.get(..3).and_then(|c| c.parse::<u16>().ok()) {
                    Some(code) if (200..600).contains(&code) => Seen::Reply(text),
                    _ => Seen::Data(text),
                }
            }
            Err(e) => match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => Seen::Timeout,
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => Seen::Reset,
                other => Seen::Error(other),
            },
        }
    }

    /// Asserts that the server closes the connection in an orderly way
    /// (FIN) next, without sending anything more.
    ///
    /// # Panics
    /// On anything else (a timeout included), naming what it saw.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        let seen = self.next_event();
        assert_eq!(
            seen,
            Seen::Closed,
            "expected the server to close the connection"
        );
    }
}

/// What a server did next (see [`Client::next_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// End of stream: the peer closed the connection (FIN).
    Closed,
    /// The peer reset the connection (RST), e.g. after closing with input
    /// it had not read.
    Reset,
    /// A line starting with a reply code (its first line only).
    Reply(String),
    /// A line that is not a reply.
    Data(String),
    /// Nothing within the read timeout: the connection is still open.
    Timeout,
    /// Another socket error.
    Error(ErrorKind),
}

impl Seen {
    /// Whether the peer ended the connection (FIN or RST), for the cases
    /// where either is correct (a server closing with unread client input
    /// sends RST).
    #[must_use]
    pub fn is_ended_by_peer(&self) -> bool {
        matches!(self, Seen::Closed | Seen::Reset)
    }
}

/// A connection from the loopback address `source` (e.g. `127.0.0.9`, so
/// that per-source rules see a source of the test's own) to `to`.
///
/// # Panics
/// When `source` is not an IPv4 address or the connection fails.
#[track_caller]
pub fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let ip = source.parse().expect("an IPv4 source");
    connect_local(ip, to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect from {source} to {to}: {e}"))
}

/// A harvester: a session from `source` that tries unknown recipients
/// until the proxy cuts it off with `421 4.7.0` and closes; how many failed
/// (5xx) before the cut.
///
/// # Panics
/// When a reply is not the expected one, or no cut comes in 20 recipients.
#[track_caller]
pub fn failed_rcpts_before_the_cut(source: &str, proxy: SocketAddr) -> usize {
    let (mut smtp, greeting) = Client::from_stream(connect_from(source, proxy)).unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    assert!(smtp.cmd("EHLO harvester.test").unwrap().starts_with("250"));
    let mail = smtp.cmd("MAIL FROM:<h@harvester.test>").unwrap();
    assert!(mail.starts_with("250 "), "{mail}");
    for n in 1..=20 {
        let reply = smtp
            .cmd(&format!("RCPT TO:<nobody{n}@example.com>"))
            .unwrap();
        if reply.starts_with("421 4.7.0") {
            smtp.expect_closed();
            return n - 1;
        }
        assert!(reply.starts_with('5'), "RCPT {n}: {reply}");
    }
    panic!("never cut off after 20 unknown recipients");
}
