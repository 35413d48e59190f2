//! The connection to the backend MTA: connect with a timeout, hand over the
//! client's identity, read whole (multi-line) replies with a timeout.

use std::{net::SocketAddr, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

use super::{
    identity,
    tls::{BackendStream, MaybeTls},
};
use crate::{
    config::Identity,
    smtp::reply::{Reply, ReplyParser},
};

/// Why the backend failed us. Every variant ends the backend connection;
/// the session answers the client with a 4xx so that it retries.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to {addr}: no answer within {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("malformed reply: {0}")]
    Malformed(String),
    /// The backend greeted with something else than 220: the reply, for
    /// the client to get faithfully.
    #[error("greeting refused: {} {}", .0.code, .0.text())]
    Greeting(Reply),
    #[error("XCLIENT refused: {0}")]
    Xclient(String),
    /// The backend refused XCLIENT: its reply.
    #[error("XCLIENT refused: {} {} (is the proxy in the backend's smtpd_authorized_xclient_hosts?)", .0.code, .0.text())]
    XclientRefused(Reply),
    /// The backend refused the client's HELO/EHLO replayed on a new
    /// connection: its reply.
    #[error("HELO refused: {} {}", .0.code, .0.text())]
    HeloRefused(Reply),
    /// A new connection refused a line of the transaction it took up
    /// ([`crate::proxy::session`]'s parked transactions): its reply.
    #[error("the transaction taken up on a new connection was refused: {} {}", .0.code, .0.text())]
    TransactionRefused(Reply),
    /// No backend slot came free within `backend.slot_wait`.
    #[error("no backend slot free within {0:?}")]
    NoSlot(Duration),
    #[error("TLS to the backend: {0}")]
    Tls(String),
}

/// Where and how to reach the backend.
#[derive(Clone)]
pub struct BackendSettings {
    pub address: SocketAddr,
    pub identity: Identity,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
    /// Set for `backend.starttls`: the connector, and the proxy's EHLO name.
    pub tls: Option<(tokio_rustls::TlsConnector, String)>,
}

impl std::fmt::Debug for BackendSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSettings")
            .field("address", &self.address)
            .field("identity", &self.identity)
            .field("starttls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// An open backend connection.
pub struct Backend {
    stream: Link,
    buffer: BytesMut,
    parser: ReplyParser,
    reply_timeout: Duration,
    /// The backend slot this connection holds (given back when it closes).
    slot: Option<super::slots::SlotGuard>,
}

/// Largest chunk read from the backend at once.
const READ_CHUNK: usize = 16 * 1024;
/// How long the backend's reply to QUIT is waited for.
const QUIT_WAIT: Duration = Duration::from_secs(2);

impl Backend {
    /// Connects, sends a PROXY header if configured, and reads the greeting.
    /// Returns the backend and its greeting (a 220 reply). `identity` is the
    /// client's address and the one it reached the proxy on; `None` (the
    /// probe session) names the proxy's own connection instead.
    ///
    /// # Errors
    /// Unreachable, slow, or a greeting other than 220.
    pub async fn connect(
        settings: &BackendSettings,
        identity: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<(Self, Reply), BackendError> {
        let addr = settings.address;
        #[cfg(any(test, feature = "memory-backend"))]
        if let Some(stream) = memory::connect(addr) {
            let stream = stream.map_err(|source| BackendError::Connect { addr, source })?;
            let identity = identity.unwrap_or((addr, addr));
            return Self::start(settings, memory::Link::Memory(stream), identity).await;
        }
        let stream = timeout(settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| BackendError::ConnectTimeout {
                addr,
                timeout: settings.connect_timeout,
            })?
            .map_err(|source| BackendError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let identity = match identity {
            Some(pair) => pair,
            None => (stream.local_addr()?, stream.peer_addr()?),
        };
        Self::start(settings, link(MaybeTls::Plain(stream)), identity).await
    }

    /// The connection's start: the identity header if configured (`client`
    /// and `local` are the addresses it names), the greeting, STARTTLS if
    /// configured.
    async fn start(
        settings: &BackendSettings,
        stream: Link,
        (client, local): (SocketAddr, SocketAddr),
    ) -> Result<(Self, Reply), BackendError> {
        let mut backend = Self {
            stream,
            buffer: BytesMut::with_capacity(4096),
            parser: ReplyParser::default(),
            reply_timeout: settings.reply_timeout,
            slot: None,
        };
        match settings.identity {
            Identity::ProxyV2 => {
                backend
                    .send(&identity::proxy_v2_header(client, local))
                    .await?
            }
            Identity::ProxyV1 => {
                backend
                    .send(&identity::proxy_v1_header(client, local))
                    .await?
            }
            Identity::Xclient | Identity::None => {}
        }
        let greeting = backend.read_reply().await?;
        if greeting.code != 220 {
            return Err(BackendError::Greeting(greeting));
        }
        if let Some((connector, hostname)) = &settings.tls {
            backend = backend.starttls(connector, hostname).await?;
        }
        Ok((backend, greeting))
    }

    /// EHLO, STARTTLS and the TLS handshake; the backend session then starts
    /// over (the client's EHLO follows).
    async fn starttls(
        mut self,
        connector: &tokio_rustls::TlsConnector,
        hostname: &str,
    ) -> Result<Self, BackendError> {
        let ehlo = self.command(format!("EHLO {hostname}").as_bytes()).await?;
        if !crate::smtp::ehlo::parse_capabilities(&ehlo)
            .iter()
            .any(|c| c == "STARTTLS")
        {
            return Err(BackendError::Tls(
                "the backend does not offer STARTTLS (backend.starttls = true)".into(),
            ));
        }
        let reply = self.command(b"STARTTLS").await?;
        if reply.code != 220 {
            return Err(BackendError::Tls(format!(
                "STARTTLS refused: {} {}",
                reply.code,
                reply.lines.join(" ")
            )));
        }
        let Some(MaybeTls::Plain(tcp)) = network(self.stream) else {
            return Err(BackendError::Tls("already TLS".into()));
        };
        let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr()?.ip().into());
        let tls = timeout(self.reply_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| BackendError::Timeout(self.reply_timeout))?
            .map_err(|e| BackendError::Tls(format!("handshake: {e}")))?;
        self.stream = link(MaybeTls::Tls(Box::new(tls)));
        self.buffer.clear();
        Ok(self)
    }

    /// Writes raw bytes.
    ///
    /// # Errors
    /// The connection broke.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        // A backend that stops reading must not hold the session forever.
        timeout(self.reply_timeout, self.stream.write_all(bytes))
            .await
            .map_err(|_| BackendError::Timeout(self.reply_timeout))??;
        Ok(())
    }

    /// Sends one command line (CRLF added) and reads the reply.
    ///
    /// # Errors
    /// As [`Self::read_reply`].
    pub async fn command(&mut self, line: &[u8]) -> Result<Reply, BackendError> {
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line);
        bytes.extend_from_slice(b"\r\n");
        self.send(&bytes).await?;
        self.read_reply().await
    }

    /// Reads one whole reply within the reply timeout.
    ///
    /// # Errors
    /// Timeout, closed connection, malformed reply.
    pub async fn read_reply(&mut self) -> Result<Reply, BackendError> {
        self.read_reply_within(self.reply_timeout).await
    }

    /// Reads one whole reply within `limit`.
    ///
    /// # Errors
    /// As [`Self::read_reply`].
    pub async fn read_reply_within(&mut self, limit: Duration) -> Result<Reply, BackendError> {
        timeout(limit, async {
            loop {
                if let Some(result) = self.parser.feed(&mut self.buffer) {
                    return result.map_err(|e| BackendError::Malformed(e.to_string()));
                }
                self.buffer.reserve(READ_CHUNK);
                if self.stream.read_buf(&mut self.buffer).await? == 0 {
                    return Err(BackendError::Closed);
                }
            }
        })
        .await
        .map_err(|_| BackendError::Timeout(limit))?
    }

    /// Tells the backend who the client is with XCLIENT (after an EHLO that
    /// advertised it); the backend answers with a new greeting.
    ///
    /// # Errors
    /// The backend refused XCLIENT (not authorized for the proxy's address?).
    pub async fn xclient(
        &mut self,
        client: SocketAddr,
        helo: Option<&str>,
        esmtp: bool,
    ) -> Result<(), BackendError> {
        let command = identity::xclient_command(client, helo, esmtp);
        self.send(command.as_bytes()).await?;
        let reply = self.read_reply().await?;
        if reply.code != 220 {
            return Err(BackendError::XclientRefused(reply));
        }
        Ok(())
    }

    /// Makes this connection hold `slot` until it closes.
    pub fn hold_slot(&mut self, slot: super::slots::SlotGuard) {
        self.slot = Some(slot);
    }

    /// Gives its slot back now, before the connection closes.
    pub fn give_back_slot(&mut self) {
        self.slot = None;
    }

    /// Ends the session politely, without waiting long for the answer.
    pub async fn quit(mut self) {
        if self.send(b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply_within(QUIT_WAIT).await;
        }
    }
}

/// The backend connection's stream: the network one; in unit tests and
/// fuzzing, the network one or an in-memory one ([`memory`]).
#[cfg(not(any(test, feature = "memory-backend")))]
type Link = BackendStream;
#[cfg(any(test, feature = "memory-backend"))]
type Link = memory::Link;

#[cfg(not(any(test, feature = "memory-backend")))]
fn link(stream: BackendStream) -> Link {
    stream
}

#[cfg(any(test, feature = "memory-backend"))]
fn link(stream: BackendStream) -> Link {
    memory::Link::Network(stream)
}

/// The network stream of `link`, if it has one.
#[cfg(not(any(test, feature = "memory-backend")))]
fn network(link: Link) -> Option<BackendStream> {
    Some(link)
}

#[cfg(any(test, feature = "memory-backend"))]
fn network(link: Link) -> Option<BackendStream> {
    match link {
        memory::Link::Network(stream) => Some(stream),
        memory::Link::Memory(_) => None,
    }
}

/// In-memory backends for unit tests and the session fuzz target (feature
/// `memory-backend`): [`memory::listen`] names one with an
/// address that [`Backend::connect`] then reaches over a
/// [`tokio::io::DuplexStream`] instead of TCP, handing the other end to the
/// test's scripted backend.
#[cfg(any(test, feature = "memory-backend"))]
pub mod memory {
    use std::{
        collections::HashMap,
        io,
        net::{Ipv4Addr, SocketAddr},
        pin::Pin,
        sync::{
            atomic::{AtomicU16, Ordering},
            Mutex,
        },
        task::{Context, Poll},
    };

    use tokio::{
        io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
        sync::mpsc,
    };

    use super::BackendStream;

    /// Bytes in flight each way on an in-memory connection.
    const CAPACITY: usize = 64 * 1024;

    /// The in-memory backends listening, by the address that names them
    /// (tests run in parallel: each has its own address).
    static LISTENING: Mutex<Option<HashMap<SocketAddr, mpsc::UnboundedSender<DuplexStream>>>> =
        Mutex::new(None);

    /// A backend connection in a unit test.
    pub enum Link {
        Network(BackendStream),
        Memory(DuplexStream),
    }

    /// Where an in-memory backend's connections arrive; the address stops
    /// naming it when this is dropped.
    pub struct Listener {
        address: SocketAddr,
        connections: mpsc::UnboundedReceiver<DuplexStream>,
    }

    /// A new in-memory backend: the address to put in
    /// [`super::BackendSettings::address`], and where its connections
    /// arrive. The address is in TEST-NET-1, never reached over the network.
    pub fn listen() -> (SocketAddr, Listener) {
        static PORT: AtomicU16 = AtomicU16::new(1);
        let address = SocketAddr::new(
            Ipv4Addr::new(192, 0, 2, 1).into(),
            PORT.fetch_add(1, Ordering::Relaxed),
        );
        let (tx, connections) = mpsc::unbounded_channel();
        LISTENING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(address, tx);
        (
            address,
            Listener {
                address,
                connections,
            },
        )
    }

    impl Listener {
        /// The server end of the next connection; `None` once no connection
        /// can come any more.
        pub async fn accept(&mut self) -> Option<DuplexStream> {
            self.connections.recv().await
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            if let Some(map) = LISTENING.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                map.remove(&self.address);
            }
        }
    }

    /// A connection to the in-memory backend `address` names, if one does;
    /// refused if it stopped accepting.
    pub(super) fn connect(address: SocketAddr) -> Option<io::Result<DuplexStream>> {
        let listening = LISTENING.lock().unwrap_or_else(|p| p.into_inner());
        let tx = listening.as_ref()?.get(&address)?;
        let (client, server) = tokio::io::duplex(CAPACITY);
        Some(
            tx.send(server)
                .map(|()| client)
                .map_err(|_| io::ErrorKind::ConnectionRefused.into()),
        )
    }

    impl AsyncRead for Link {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Self::Network(s) => Pin::new(s).poll_read(cx, buf),
                Self::Memory(s) => Pin::new(s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Link {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            match self.get_mut() {
                Self::Network(s) => Pin::new(s).poll_write(cx, buf),
                Self::Memory(s) => Pin::new(s).poll_write(cx, buf),
            }
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Self::Network(s) => Pin::new(s).poll_flush(cx),
                Self::Memory(s) => Pin::new(s).poll_flush(cx),
            }
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            match self.get_mut() {
                Self::Network(s) => Pin::new(s).poll_shutdown(cx),
                Self::Memory(s) => Pin::new(s).poll_shutdown(cx),
            }
        }
    }
}
