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
    stream: BackendStream,
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
        let stream = timeout(settings.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| BackendError::ConnectTimeout {
                addr,
                timeout: settings.connect_timeout,
            })?
            .map_err(|source| BackendError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let (client, local) = match identity {
            Some(pair) => pair,
            None => (stream.local_addr()?, stream.peer_addr()?),
        };
        let mut backend = Self {
            stream: MaybeTls::Plain(stream),
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
        let MaybeTls::Plain(tcp) = self.stream else {
            return Err(BackendError::Tls("already TLS".into()));
        };
        let name = rustls::pki_types::ServerName::IpAddress(tcp.peer_addr()?.ip().into());
        let tls = timeout(self.reply_timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| BackendError::Timeout(self.reply_timeout))?
            .map_err(|e| BackendError::Tls(format!("handshake: {e}")))?;
        self.stream = MaybeTls::Tls(Box::new(tls));
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

    /// Ends the session politely, without waiting long for the answer.
    pub async fn quit(mut self) {
        if self.send(b"QUIT\r\n").await.is_ok() {
            let _ = self.read_reply_within(QUIT_WAIT).await;
        }
    }
}
