//! SMTP clients for the benchmarks, each bound to the source address it is
//! given (every simulated host has its own), telling a dropped SYN (no
//! answer) from a refused connection.
//!
//! The async [`Client`] (tokio) carries thousands of flood sessions on a
//! few threads; [`send_message`] is one whole message on a new session,
//! timed. [`blocking`] is the same for benchmarks that run a thread per
//! sender. Create them on a thread (or a runtime whose threads are) inside
//! the namespace the source addresses live in: a socket belongs to the
//! namespace it was created in.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

/// Why a connection did not come up.
#[derive(Debug)]
pub enum ConnectError {
    /// No answer within the timeout: the SYN was dropped (or queued).
    NoAnswer,
    /// RST.
    Refused,
    Failed(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::NoAnswer => f.write_str("connect: no answer"),
            ConnectError::Refused => f.write_str("connect: refused"),
            ConnectError::Failed(e) => write!(f, "connect: {e}"),
        }
    }
}

/// One reply: its code and last line.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    /// `2xx`.
    #[must_use]
    pub fn positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// Lets many sockets bind the same source address without each taking a
/// port at bind time (the port is chosen at connect, per destination).
fn bind_address_no_port(fd: i32) {
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor and an option of the right size; a
    // failure only means ports are taken at bind, as without it.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// An SMTP session from a chosen source address.
pub struct Client {
    stream: BufReader<TcpStream>,
    line: String,
}

impl Client {
    /// Connects from `source` to `to`, waiting at most `timeout`.
    ///
    /// # Errors
    /// [`ConnectError`].
    pub async fn connect_from(
        source: IpAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<Self, ConnectError> {
        let socket = match source {
            IpAddr::V4(_) => TcpSocket::new_v4(),
            IpAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(ConnectError::Failed)?;
        bind_address_no_port(socket.as_raw_fd());
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(ConnectError::Failed)?;
        let stream = match tokio::time::timeout(timeout, socket.connect(to)).await {
            Err(_) => return Err(ConnectError::NoAnswer),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(ConnectError::Refused)
            }
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ETIMEDOUT) => {
                return Err(ConnectError::NoAnswer)
            }
            Ok(Err(e)) => return Err(ConnectError::Failed(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(Self {
            stream: BufReader::new(stream),
            line: String::new(),
        })
    }

    /// The next whole reply, within `timeout`.
    ///
    /// # Errors
    /// End of stream, a line that is not a reply, or the timeout
    /// (`TimedOut`).
    pub async fn reply(&mut self, timeout: Duration) -> io::Result<Reply> {
        match tokio::time::timeout(timeout, self.read_reply()).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "no reply in time")),
        }
    }

    async fn read_reply(&mut self) -> io::Result<Reply> {
        loop {
            self.line.clear();
            // Bounded: a reply line longer than this is not SMTP.
            let n = (&mut self.stream)
                .take(4096)
                .read_line(&mut self.line)
                .await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let line = self.line.trim_end();
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("not a reply: {line:?}"))
                })?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply {
                    code,
                    text: line.to_owned(),
                });
            }
        }
    }

    /// Writes `bytes` as they are.
    ///
    /// # Errors
    /// The write's.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.get_mut().write_all(bytes).await
    }

    /// Writes `line` and CRLF, then reads the reply.
    ///
    /// # Errors
    /// As [`Client::send`] and [`Client::reply`].
    pub async fn command(&mut self, line: &str, timeout: Duration) -> io::Result<Reply> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await?;
        self.reply(timeout).await
    }

    /// QUIT, reading the reply for at most a second.
    pub async fn quit(mut self) {
        let _ = self.command("QUIT", Duration::from_secs(1)).await;
    }
}

/// A message to send.
pub struct Message<'a> {
    pub helo: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    /// Headers and body, CRLF line ends, without the final dot; lines that
    /// start with a dot already doubled.
    pub data: &'a str,
}

/// How long each step of a message may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub reply: Duration,
}

/// Why a message was not accepted.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The step: `connect`, `greeting`, `EHLO`, `MAIL`, `RCPT`, `DATA`,
    /// `end of DATA`.
    pub step: &'static str,
    /// The reply, when there was one (a 4xx: try again later).
    pub reply: Option<Reply>,
    /// What happened otherwise (no answer, closed, timeout).
    pub error: Option<String>,
    /// The final dot was sent: the server may have taken the message.
    pub after_dot: bool,
}

impl Failure {
    /// A temporary refusal (4xx): the sender keeps the message and retries.
    #[must_use]
    pub fn deferred(&self) -> bool {
        self.reply
            .as_ref()
            .is_some_and(|r| (400..500).contains(&r.code))
    }

    /// `STEP: CODE` or `STEP: error`, for counting failures by kind.
    #[must_use]
    pub fn kind(&self) -> String {
        match (&self.reply, &self.error) {
            (Some(r), _) => format!("{}: {}", self.step, r.code),
            (None, Some(e)) => format!("{}: {e}", self.step),
            (None, None) => self.step.to_owned(),
        }
    }
}

/// One message on a new session from `source` (greeting, EHLO, MAIL, RCPT,
/// DATA, QUIT); `Ok(time)` from the start of the connection to the reply
/// to its end of DATA.
///
/// # Errors
/// The first step that failed ([`Failure`]).
pub async fn send_message(
    source: IpAddr,
    to: SocketAddr,
    message: &Message<'_>,
    timeouts: Timeouts,
) -> Result<Duration, Failure> {
    let started = Instant::now();
    let fail = |step, reply, error: Option<String>| Failure {
        step,
        reply,
        error,
        after_dot: false,
    };
    let mut client = Client::connect_from(source, to, timeouts.connect)
        .await
        .map_err(|e| fail("connect", None, Some(e.to_string())))?;
    let steps: [(&'static str, String, u16); 5] = [
        ("EHLO", format!("EHLO {}", message.helo), 250),
        ("MAIL", format!("MAIL FROM:<{}>", message.from), 250),
        ("RCPT", format!("RCPT TO:<{}>", message.to), 250),
        ("DATA", "DATA".to_owned(), 354),
        ("end of DATA", format!("{}.", message.data), 250),
    ];
    let expect = |step: &'static str, r: io::Result<Reply>, code: u16| match r {
        Ok(r) if r.code == code => Ok(()),
        Ok(r) => Err(fail(step, Some(r), None)),
        Err(e) => Err(fail(step, None, Some(format!("{:?}", e.kind())))),
    };
    expect("greeting", client.reply(timeouts.reply).await, 220)?;
    for (step, line, code) in steps {
        expect(step, client.command(&line, timeouts.reply).await, code).map_err(|mut f| {
            f.after_dot = step == "end of DATA";
            f
        })?;
    }
    let elapsed = started.elapsed();
    client.quit().await;
    Ok(elapsed)
}

/// The same, for a thread per sender.
pub mod blocking {
    use std::io::{self, BufRead, BufReader, Read as _, Write};
    use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::time::{Duration, Instant};

    pub use super::Reply;

    /// How a connection attempt ended.
    pub enum Connect {
        Up(TcpStream),
        /// No answer within the timeout: the SYN was dropped.
        NoAnswer,
        /// RST.
        Refused,
        Failed(io::Error),
    }

    /// `addr` as the C socket API takes it.
    #[must_use]
    pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(addr.ip().octets()),
            },
            sin_zero: [0; 8],
        }
    }

    /// Connects from `source` to `to` (IPv4; a nonblocking connect and
    /// poll), waiting at most `timeout`.
    pub fn connect_from(source: Ipv4Addr, to: SocketAddrV4, timeout: Duration) -> Connect {
        // SAFETY: plain syscalls; the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Connect::Failed(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        super::bind_address_no_port(fd.as_raw_fd());
        let src = sockaddr_in(SocketAddrV4::new(source, 0));
        let dst = sockaddr_in(to);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid descriptor and addresses of the right sizes.
        unsafe {
            if libc::bind(fd.as_raw_fd(), (&raw const src).cast(), len) != 0 {
                return Connect::Failed(io::Error::last_os_error());
            }
            if libc::connect(fd.as_raw_fd(), (&raw const dst).cast(), len) != 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EINPROGRESS) {
                    return Connect::Failed(err);
                }
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Connect::NoAnswer;
            }
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 60_000) as libc::c_int;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Connect::Failed(e);
            }
            if n == 0 {
                continue;
            }
            return match socket_error(fd.as_raw_fd()) {
                0 => {
                    let stream = TcpStream::from(fd);
                    match stream.set_nonblocking(false) {
                        Ok(()) => Connect::Up(stream),
                        Err(e) => Connect::Failed(e),
                    }
                }
                libc::ECONNREFUSED => Connect::Refused,
                libc::ETIMEDOUT => Connect::NoAnswer,
                e => Connect::Failed(io::Error::from_raw_os_error(e)),
            };
        }
    }

    fn socket_error(fd: RawFd) -> i32 {
        let mut err: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a valid descriptor and a buffer of the right size.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &raw mut len,
            )
        };
        err
    }

    /// The IPv4 address in `addr`, for [`connect_from`].
    ///
    /// # Panics
    /// On an IPv6 address (the benchmarks that use this are IPv4 only).
    #[must_use]
    pub fn v4(addr: SocketAddr) -> SocketAddrV4 {
        match addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("{a}: IPv4 only"),
        }
    }

    /// An SMTP session over a blocking stream.
    pub struct Smtp {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
    }

    impl Smtp {
        /// Wraps `stream`; every read and write waits at most `timeout`.
        ///
        /// # Errors
        /// When the stream cannot be configured or cloned.
        pub fn new(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            stream.set_nodelay(true)?;
            Ok(Self {
                writer: stream.try_clone()?,
                reader: BufReader::new(stream),
            })
        }

        /// The next whole reply.
        ///
        /// # Errors
        /// End of stream, a line that is not a reply, the timeout.
        pub fn reply(&mut self) -> io::Result<Reply> {
            loop {
                let mut line = String::new();
                if (&mut self.reader).take(4096).read_line(&mut line)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ));
                }
                let line = line.trim_end().to_owned();
                let code = line
                    .get(..3)
                    .and_then(|c| c.parse::<u16>().ok())
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("not a reply: {line:?}"))
                    })?;
                if line.as_bytes().get(3) != Some(&b'-') {
                    return Ok(Reply { code, text: line });
                }
            }
        }

        /// Writes `line` and CRLF, then reads the reply.
        ///
        /// # Errors
        /// As [`Smtp::reply`], and the write's.
        pub fn command(&mut self, line: &str) -> io::Result<Reply> {
            self.writer.write_all(format!("{line}\r\n").as_bytes())?;
            self.reply()
        }

        /// Writes `bytes` as they are.
        ///
        /// # Errors
        /// The write's.
        pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.writer.write_all(bytes)
        }

        /// QUIT, ignoring what comes back.
        pub fn quit(mut self) {
            let _ = self.command("QUIT");
        }
    }
}
