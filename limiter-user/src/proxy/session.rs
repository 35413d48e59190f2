//! One client session, relayed to the backend: an explicit state machine
//! over the client stream (plain or TLS) and a backend connection.
//!
//! Every command is read whole, judged by the policy where it has a say,
//! relayed to the backend, and the backend's reply relayed back (filtered for
//! EHLO). Commands are handled one at a time, so replies always come back in
//! order, pipelined or not. The proxy answers by itself when it refuses
//! something or the backend failed; it never answers 250 to the end of DATA
//! unless the backend did.
//!
//! The backend connection is earned (`backend.connect = "on-mail"`): until
//! the first MAIL FROM the policy accepts, the proxy greets with what the
//! probe learned ([`super::capabilities`]) and answers EHLO/HELO, NOOP,
//! RSET, HELP and QUIT itself. The connection opens (taking a fair backend
//! slot, [`super::slots`]) at that MAIL, at AUTH when the backend offers
//! AUTH, at a relayed VRFY/EXPN or extension verb; the client's identity and
//! canonical HELO reach the backend first, exactly as with
//! `"on-connect"`. A backend that refuses then gives the client its own
//! reply to the command, never a 250.
//!
//! Under pressure a session that has not had a MAIL accepted is shed: past
//! `smtp.max_commands_before_mail`, at `smtp.stress_command_timeout` when
//! the proxy is stressed, or when a new client needs its place at
//! `smtp.max_sessions` ([`super::shed`]).

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::timeout,
};

use super::{
    backend::{Backend, BackendError},
    shed::Registration,
    tls::ClientStream,
    ProxyContext,
};
use crate::{
    config::{BackendConnect, Identity, Vrfy},
    filters::{
        message::{self, HeaderEdits},
        Envelope as FilterEnvelope, Filters, MessageScan, Outcome,
    },
    policy::Reason,
    policy::{
        Action, ConnectionGuard, HeloGuard, HeloVerdict, MailVerdict, RcptVerdict, Rejection,
        SessionCounters,
    },
    smtp::{
        command::{
            check_sasl_response, parse_command_line, parse_mail_from, parse_rcpt_to, MailFrom,
            Param, RcptTo, Verb,
        },
        data::{DataProgress, DataScanner},
        ehlo::{default_capabilities, ehlo_hostname, filter_ehlo, parse_capabilities, EhloOptions},
        helo::canonical_helo,
        line::{LineError, LineReader},
        reply::Reply,
    },
};

/// AUTH continuation lines may carry long SASL tokens (RFC 4954: 12288).
const MAX_AUTH_LINE: usize = 12_288;
/// Reply timeout for the end of DATA (RFC 5321: 10 minutes).
const DATA_END_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Largest read from the client at once.
const READ_CHUNK: usize = 16 * 1024;

/// Whether the session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// How the session ended, for the one log line per session.
#[derive(Debug, Default)]
pub struct SessionSummary {
    pub helo: Option<String>,
    pub messages: u32,
    pub rcpt_accepted: u32,
    pub rcpt_failed: u32,
    pub outcome: &'static str,
}

/// What a read of the next client line produced.
enum Input {
    Line(Vec<u8>),
    TooLong,
    Nul,
    Closed,
    Timeout,
    Shutdown,
    /// The source was blocked while this session was open.
    Blocked,
    /// The session was shed to make room for a new client.
    Shed,
}

/// The HELO/EHLO the client gave.
struct Helo {
    name: String,
    esmtp: bool,
    _guard: Option<HeloGuard>,
}

/// The transaction in progress.
#[derive(Default)]
struct Envelope {
    active: bool,
    /// `None` for the null sender.
    sender: Option<String>,
    /// The recipients the backend accepted (at most `smtp.max_recipients`).
    recipients: Vec<String>,
}

/// Where the bytes of a message go while it arrives.
enum MessageSink {
    /// Straight on to the backend, which has answered DATA with 354.
    Backend,
    /// Held (wire form, without the end marker) while the content filters
    /// judge it; the backend has not seen DATA yet.
    Held {
        scan: MessageScan,
        held: HeldMessage,
    },
    /// Nowhere: the client gets this reply at the end.
    Discard(Reply),
}

/// A message held while the content filters judge it.
#[derive(Default)]
struct HeldMessage {
    /// The message as on the wire (dot-stuffed); once it has ended, without
    /// the end marker.
    wire: Vec<u8>,
    /// How much of `wire` the scanners have had.
    fed: usize,
}

/// The end of a message on the wire.
const END_MARKER: &[u8] = b".\r\n";

pub struct Session<S> {
    ctx: Arc<ProxyContext>,
    client: Option<ClientStream<S>>,
    peer: SocketAddr,
    local: SocketAddr,
    input: BytesMut,
    lines: LineReader,
    backend: Option<Backend>,
    /// XCLIENT was sent on the current backend connection.
    xclient_sent: bool,
    helo: Option<Helo>,
    envelope: Envelope,
    counters: SessionCounters,
    /// This listener offers STARTTLS.
    starttls: bool,
    shutdown: watch::Receiver<bool>,
    blocked_nets: tokio::sync::broadcast::Receiver<ipnet::IpNet>,
    summary: SessionSummary,
    /// A 421 went out: the session ends after this command.
    closing: bool,
    /// Lines refused without being relayed (bad syntax, unknown verbs);
    /// past `smtp.max_errors` the session ends.
    errors: u32,
    /// Commands read before the first accepted MAIL FROM.
    commands_before_mail: u32,
    /// A MAIL FROM was accepted in this session (by the backend).
    mail_accepted: bool,
    /// This session's place among those that may be shed; left at the
    /// first accepted MAIL FROM.
    registration: Option<Registration>,
    _connection: ConnectionGuard,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(
        ctx: Arc<ProxyContext>,
        client: ClientStream<S>,
        peer: SocketAddr,
        local: SocketAddr,
        starttls: bool,
        connection: ConnectionGuard,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let blocked_nets = ctx.blocked_nets.subscribe();
        let registration = Some(ctx.sessions.register());
        Self {
            lines: LineReader::new(MAX_AUTH_LINE),
            ctx,
            client: Some(client),
            peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            local,
            input: BytesMut::with_capacity(4096),
            backend: None,
            xclient_sent: false,
            helo: None,
            envelope: Envelope::default(),
            counters: SessionCounters::default(),
            starttls,
            shutdown,
            blocked_nets,
            summary: SessionSummary::default(),
            closing: false,
            errors: 0,
            commands_before_mail: 0,
            mail_accepted: false,
            registration,
            _connection: connection,
        }
    }

    fn source(&self) -> IpAddr {
        self.peer.ip()
    }

    /// Runs the session to its end.
    pub async fn run(mut self) -> SessionSummary {
        let deadline = self.ctx.settings.smtp.session_timeout;
        let outcome = match timeout(deadline, self.dialogue()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let _ = self.reply(&Reply::timeout()).await;
                "session-timeout"
            }
        };
        if let Some(backend) = self.backend.take() {
            backend.quit().await;
        }
        if let Some(mut client) = self.client.take() {
            let _ = timeout(self.ctx.settings.smtp.write_timeout, client.shutdown()).await;
        }
        self.summary.outcome = outcome;
        self.summary.helo = self.helo.as_ref().map(|h| h.name.clone());
        self.summary
    }

    fn earns_backend(&self) -> bool {
        self.ctx.settings.connect == BackendConnect::OnMail
    }

    /// The greeting: the backend's, relayed (`"on-connect"`), or the one the
    /// probe learned (`"on-mail"`; the proxy's own until a probe succeeds).
    async fn greeting(&mut self) -> Result<Reply, BackendError> {
        if self.earns_backend() {
            let learned = self
                .ctx
                .capabilities
                .after_first_probe(self.ctx.settings.backend.connect_timeout)
                .await;
            return Ok(learned.map_or_else(
                || Reply::greeting(&self.ctx.settings.hostname),
                |l| l.greeting,
            ));
        }
        self.connect_backend().await
    }

    async fn dialogue(&mut self) -> &'static str {
        let greeting = match self.greeting().await {
            Ok(greeting) => greeting,
            Err(e) => {
                tracing::warn!(source = %self.peer.ip(), error = %e, "backend unavailable at connect");
                let reply = if matches!(e, BackendError::NoSlot(_)) {
                    self.ctx.count_shed(self.source(), "backend-slot-timeout");
                    Reply::no_backend_slot()
                } else {
                    Reply::backend_unavailable()
                };
                let _ = self.reply(&reply).await;
                return "backend-unavailable";
            }
        };
        // Talking before the greeting is what spambots do.
        if self.client_spoke_first().await {
            tracing::info!(source = %self.peer.ip(), reason = "pregreet", action = "reject", "client talked before the greeting");
            self.ctx.stats.count_rejection("pregreet");
            if self.ctx.policy().enforced() {
                let _ = self.reply(&Reply::pregreet()).await;
                return "pregreet";
            }
        }
        if self.reply(&greeting).await.is_err() {
            return "client-lost";
        }
        loop {
            let input = self.read_line().await;
            let line = match input {
                Input::Line(line) => line,
                Input::TooLong | Input::Nul => {
                    let reply = if matches!(input, Input::TooLong) {
                        Reply::line_too_long()
                    } else {
                        Reply::syntax_error()
                    };
                    match self.count_command_before_mail().await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close) => return "too-many-commands",
                        Err(_) => return "client-lost",
                    }
                    if self.reply(&reply).await.is_err() {
                        return "client-lost";
                    }
                    continue;
                }
                Input::Closed => return "client-closed",
                Input::Timeout => {
                    let _ = self.reply(&Reply::timeout()).await;
                    return "timeout";
                }
                Input::Shutdown => {
                    let _ = self.reply(&Reply::shutting_down()).await;
                    return "shutdown";
                }
                Input::Blocked => {
                    let _ = self.reply(&Reply::blocked("your address is blocked")).await;
                    return "blocked";
                }
                Input::Shed => {
                    self.ctx.count_shed(self.source(), "shed-idle");
                    let _ = self.reply(&Reply::shed_idle()).await;
                    return "shed";
                }
            };
            match self.handle(&line).await {
                Ok(Flow::Continue) if self.closing => return "closed",
                Ok(Flow::Continue) => {}
                Ok(Flow::Close) => return "closed",
                Err(e) => {
                    tracing::debug!(source = %self.peer.ip(), error = %e, "client connection failed");
                    return "client-lost";
                }
            }
        }
    }

    /// Dispatches one command line.
    ///
    /// A line outside the accepted syntax ([`parse_command_line`]: control
    /// bytes, a verb followed by anything but a blank, bad UTF-8) is refused
    /// here and never relayed: the backend could read it as another command
    /// than the one the proxy would judge.
    /// Counts a line read before the first accepted MAIL FROM; past
    /// `smtp.max_commands_before_mail`, `421 4.7.0` and the end.
    async fn count_command_before_mail(&mut self) -> std::io::Result<Flow> {
        if !self.mail_accepted {
            self.commands_before_mail = self.commands_before_mail.saturating_add(1);
            if self.commands_before_mail > self.ctx.settings.smtp.max_commands_before_mail {
                self.ctx.count_shed(self.source(), "too-many-commands");
                self.reply(&Reply::too_many_commands_before_mail()).await?;
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    async fn handle(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        if self.count_command_before_mail().await? == Flow::Close {
            return Ok(Flow::Close);
        }
        let command = match parse_command_line(line) {
            Ok(command) => command,
            Err(error) => {
                tracing::debug!(source = %self.peer.ip(), %error, action = "reject", "command line refused");
                return self
                    .protocol_error("bad-command-syntax", &error.reply())
                    .await;
            }
        };
        if command.verb != Verb::Auth && line.len() + 2 > self.ctx.settings.smtp.max_line_length {
            return self
                .protocol_error("line-too-long", &Reply::line_too_long())
                .await;
        }
        match command.verb {
            Verb::Helo | Verb::Ehlo => self.helo(&command.args, command.verb == Verb::Ehlo).await,
            Verb::Mail => self.mail(&command.args).await,
            Verb::Rcpt => self.rcpt(&command.args).await,
            Verb::Data => self.data(line).await,
            Verb::Auth if !self.auth_allowed() => {
                tracing::info!(source = %self.peer.ip(), reason = "auth-before-tls", action = "reject", "AUTH before STARTTLS refused");
                self.ctx.stats.count_rejection("auth-before-tls");
                self.reply(&Reply::auth_requires_tls()).await?;
                Ok(Flow::Continue)
            }
            // AUTH needs the backend (it checks the credentials): it earns
            // the connection, if the backend offers AUTH at all.
            Verb::Auth
                if self.backend.is_none()
                    && self.earns_backend()
                    && !self.backend_offers_auth() =>
            {
                self.reply(&Reply::auth_not_enabled()).await?;
                Ok(Flow::Continue)
            }
            Verb::Auth => self.auth(line).await,
            Verb::StartTls => self.starttls(&command.args).await,
            // Before the backend connection is earned, the proxy answers
            // these itself.
            Verb::Rset | Verb::Noop | Verb::Help
                if self.backend.is_none() && self.earns_backend() =>
            {
                let reply = match command.verb {
                    Verb::Help => Reply::help(),
                    _ => Reply::ok(),
                };
                if command.verb == Verb::Rset {
                    self.envelope = Envelope::default();
                }
                self.reply(&reply).await?;
                Ok(Flow::Continue)
            }
            Verb::Rset => {
                let flow = self.relay_and_answer(line).await?;
                self.envelope = Envelope::default();
                Ok(flow)
            }
            Verb::Quit => {
                let reply = match self.backend.as_mut() {
                    Some(backend) => backend
                        .command(line)
                        .await
                        .unwrap_or_else(|_| Reply::closing()),
                    None => Reply::closing(),
                };
                self.backend = None;
                self.reply(&reply).await?;
                Ok(Flow::Close)
            }
            Verb::Vrfy | Verb::Expn if self.ctx.settings.smtp.vrfy == Vrfy::Refuse => {
                let reply = if command.verb == Verb::Vrfy {
                    Reply::vrfy_disabled()
                } else {
                    Reply::command_not_implemented()
                };
                self.reply(&reply).await?;
                Ok(Flow::Continue)
            }
            // CHUNKING is not advertised; identity commands belong to the
            // proxy alone: a client may never inject them.
            Verb::Bdat | Verb::Xclient | Verb::Xforward | Verb::Proxy => {
                if matches!(command.verb, Verb::Xclient | Verb::Xforward | Verb::Proxy) {
                    tracing::info!(source = %self.peer.ip(), command = ?command.verb, action = "refuse", "client tried an identity command");
                }
                self.reply(&Reply::command_not_implemented()).await?;
                Ok(Flow::Continue)
            }
            Verb::Noop | Verb::Help | Verb::Vrfy | Verb::Expn => self.relay_and_answer(line).await,
            // Only what the proxy understands reaches the backend, and the
            // extension verbs the operator listed: anything else might be
            // read by the backend as a command the proxy never judged.
            Verb::Unknown if self.relays_verb(line) => self.relay_and_answer(line).await,
            Verb::Unknown => {
                self.protocol_error("unknown-command", &Reply::command_not_implemented())
                    .await
            }
        }
    }

    /// Refuses a line the proxy will not relay (bad syntax, unknown verb,
    /// overlong): the reply, a count by `reason`, and past
    /// `smtp.max_errors` in the session, `421 4.7.0` and the end of it.
    async fn protocol_error(
        &mut self,
        reason: &'static str,
        reply: &Reply,
    ) -> std::io::Result<Flow> {
        self.ctx.stats.count_rejection(reason);
        self.errors = self.errors.saturating_add(1);
        if self.errors > self.ctx.settings.smtp.max_errors {
            tracing::info!(source = %self.peer.ip(), reason = "too-many-errors", errors = self.errors, action = "disconnect", "too many refused commands");
            self.ctx.stats.count_rejection("too-many-errors");
            self.reply(&Reply::too_many_errors()).await?;
            return Ok(Flow::Close);
        }
        self.reply(reply).await?;
        Ok(Flow::Continue)
    }

    /// Whether `line` starts with a verb listed in `smtp.relay_verbs`.
    fn relays_verb(&self, line: &[u8]) -> bool {
        let word = line
            .split(|&b| b == b' ' || b == b'\t')
            .next()
            .unwrap_or_default();
        !word.is_empty()
            && self
                .ctx
                .settings
                .smtp
                .relay_verbs
                .iter()
                .any(|verb| verb.as_bytes().eq_ignore_ascii_case(word))
    }

    /// Whether the backend offered AUTH to the probe.
    fn backend_offers_auth(&self) -> bool {
        self.ctx
            .capabilities
            .learned()
            .is_some_and(|l| parse_capabilities(&l.ehlo).iter().any(|c| c == "AUTH"))
    }

    /// Whether AUTH may be offered and used now: not before STARTTLS when
    /// it must wait for TLS (`smtp.auth_requires_tls`).
    fn auth_allowed(&self) -> bool {
        !self.ctx.settings.auth_requires_tls || self.is_tls()
    }

    /// HELO/EHLO. The name is canonical ([`canonical_helo`]: case,
    /// trailing dots, address literals) before any rule reads it, and the
    /// backend gets the same canonical name, so both judge one name.
    async fn helo(&mut self, args: &str, esmtp: bool) -> std::io::Result<Flow> {
        let name = match canonical_helo(args) {
            Ok(name) => name.into_string(),
            Err(error) => {
                tracing::debug!(source = %self.peer.ip(), %error, action = "reject", "HELO name refused");
                return self
                    .protocol_error("bad-helo-syntax", &error.reply(esmtp))
                    .await;
            }
        };
        let previous = self.helo.take().and_then(|h| h._guard);
        let decision = self
            .ctx
            .policy()
            .helo(&self.ctx.state, self.source(), &name, previous);
        let guard = match decision.verdict {
            HeloVerdict::Accept(guard) => Some(guard),
            HeloVerdict::Reject { rejection, guard } => {
                if let Some(flow) = self.refuse(&rejection, decision.enforced).await? {
                    return Ok(flow);
                }
                guard
            }
        };
        let reply = if self.backend.is_none() && self.earns_backend() {
            // Answered from what the probe learned; the backend hears this
            // name when the session earns its connection.
            let learned = self.ctx.capabilities.learned().map(|l| l.ehlo);
            let ehlo = learned.unwrap_or_else(|| default_capabilities(&self.ctx.settings.hostname));
            if esmtp {
                ehlo
            } else {
                Reply::helo_ok(ehlo_hostname(&ehlo).unwrap_or(&self.ctx.settings.hostname))
            }
        } else {
            let client_line =
                format!("{} {name}", if esmtp { "EHLO" } else { "HELO" }).into_bytes();
            if self.backend.is_none() {
                if let Err(e) = self.connect_backend().await {
                    return self.backend_failed(e).await;
                }
            }
            if self.ctx.settings.backend.identity == Identity::Xclient && !self.xclient_sent {
                if let Err(e) = self.send_xclient(&name, esmtp).await {
                    return self.backend_failed(e).await;
                }
            }
            match self.backend_command(&client_line).await {
                Ok(reply) => reply,
                Err(e) => return self.backend_failed(e).await,
            }
        };
        let reply = if esmtp && reply.code == 250 {
            filter_ehlo(
                &reply,
                &EhloOptions {
                    hostname: reply.lines.first().cloned().unwrap_or_default(),
                    offer_starttls: self.starttls && self.ctx.tls.is_some() && !self.is_tls(),
                    offer_auth: self.auth_allowed(),
                    offer_vrfy: self.ctx.settings.smtp.vrfy == Vrfy::Relay,
                    relay_verbs: self.ctx.settings.smtp.relay_verbs.clone(),
                    max_size: Some(self.ctx.settings.smtp.max_message_size),
                },
            )
        } else {
            reply
        };
        if reply.code == 250 {
            self.helo = Some(Helo {
                name,
                esmtp,
                _guard: guard,
            });
            self.envelope = Envelope::default();
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// XCLIENT needs an EHLO first (to learn that the backend offers it);
    /// afterwards the backend greets anew and the client's own EHLO follows.
    async fn send_xclient(&mut self, helo: &str, esmtp: bool) -> Result<(), BackendError> {
        let (peer, proxy_name) = (self.peer, self.ctx.settings.hostname.clone());
        let backend = self.backend.as_mut().ok_or(BackendError::Closed)?;
        let ehlo = backend
            .command(format!("EHLO {proxy_name}").as_bytes())
            .await?;
        if !parse_capabilities(&ehlo).iter().any(|c| c == "XCLIENT") {
            return Err(BackendError::Xclient(
                "the backend does not offer XCLIENT to the proxy (smtpd_authorized_xclient_hosts)"
                    .into(),
            ));
        }
        backend.xclient(peer, Some(helo), esmtp).await?;
        self.xclient_sent = true;
        Ok(())
    }

    /// MAIL FROM. The backend gets the line rebuilt from what the proxy
    /// parsed ([`mail_line`]), never the client's bytes.
    async fn mail(&mut self, args: &str) -> std::io::Result<Flow> {
        if self.helo.is_none() {
            self.reply(&Reply::bad_sequence()).await?;
            return Ok(Flow::Continue);
        }
        let mail = match parse_mail_from(args) {
            Ok(mail) => mail,
            Err(error) => {
                let reply = if error.is_parameter_error() {
                    Reply::bad_arguments("Bad MAIL parameter syntax")
                } else {
                    Reply::bad_sender_syntax()
                };
                return self.protocol_error("bad-sender-syntax", &reply).await;
            }
        };
        if mail
            .size()
            .is_some_and(|size| size > self.ctx.settings.smtp.max_message_size)
        {
            self.reply(&Reply::message_too_big()).await?;
            return Ok(Flow::Continue);
        }
        let helo = self.helo.as_ref().map(|h| h.name.clone());
        let decision = self.ctx.policy().mail_from(
            &self.ctx.state,
            self.source(),
            helo.as_deref(),
            mail.counts_as_null_sender(),
            Instant::now(),
        );
        if let MailVerdict::Reject(rejection) = decision.verdict {
            if let Some(flow) = self.refuse(&rejection, decision.enforced).await? {
                return Ok(flow);
            }
        }
        let reply = match self.backend_command(&mail_line(&mail)).await {
            Ok(reply) => reply,
            Err(e) => return self.backend_failed(e).await,
        };
        if reply.is_positive_completion() {
            self.envelope = Envelope {
                active: true,
                sender: mail.sender,
                recipients: Vec::new(),
            };
            // A sender: no longer among the sessions shed under pressure.
            self.mail_accepted = true;
            self.registration = None;
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// RCPT TO. Rules read the canonical address (the domain the backend
    /// routes to); an address with a second routing target is refused like
    /// a relay attempt; the backend gets the line rebuilt from what the
    /// proxy parsed ([`rcpt_line`]).
    async fn rcpt(&mut self, args: &str) -> std::io::Result<Flow> {
        if !self.envelope.active {
            self.reply(&Reply::bad_sequence()).await?;
            return Ok(Flow::Continue);
        }
        let rcpt = match parse_rcpt_to(args) {
            Ok(rcpt) => rcpt,
            Err(error) => {
                let reply = if error.is_parameter_error() {
                    Reply::bad_arguments("Bad RCPT parameter syntax")
                } else {
                    Reply::bad_recipient_syntax()
                };
                return self.protocol_error("bad-recipient-syntax", &reply).await;
            }
        };
        if self.envelope.recipients.len() >= self.ctx.settings.smtp.max_recipients as usize {
            self.reply(&Reply::too_many_recipients()).await?;
            return Ok(Flow::Continue);
        }
        let decision = match rcpt.second_route {
            // Whatever the patterns say: the backend could route it beyond
            // the domain they were matched against.
            Some(route) => {
                tracing::info!(source = %self.peer.ip(), recipient = %rcpt.canonical, routing = route.as_str(), "recipient with routing syntax");
                self.ctx.policy().relay_denied()
            }
            None => self.ctx.policy().rcpt(self.source(), &rcpt.canonical),
        };
        let (reply, accepted) = match decision.verdict {
            RcptVerdict::Reject(rejection) if decision.enforced => {
                self.log_decision(&rejection, true);
                let reply = rcpt
                    .second_route
                    .map_or_else(Reply::relay_denied, |_| Reply::routing_refused());
                (reply, false)
            }
            verdict => {
                // A directory of valid recipients refuses unknown ones
                // without asking the backend (allow-listed sources aside).
                let directory_refuses = match &verdict {
                    RcptVerdict::Accept => true,
                    RcptVerdict::Unchecked => !self.ctx.policy().is_allowlisted(self.source()),
                    RcptVerdict::Reject(_) => false,
                } && self
                    .ctx
                    .recipients
                    .as_ref()
                    .is_some_and(|r| r.check(&rcpt.canonical).refuses());
                if let RcptVerdict::Reject(rejection) = verdict {
                    self.log_decision(&rejection, false);
                }
                let enforced = self.ctx.policy().enforced();
                if directory_refuses {
                    self.ctx.stats.count_rejection("unknown-recipient");
                    tracing::info!(
                        source = %self.peer.ip(),
                        recipient = %rcpt.canonical,
                        reason = "unknown-recipient",
                        action = if enforced { "reject" } else { "would-reject" },
                        "recipient not in the directory"
                    );
                }
                if directory_refuses && enforced {
                    (Reply::unknown_recipient_named(&rcpt.recipient), false)
                } else {
                    let reply = match self.backend_command(&rcpt_line(&rcpt)).await {
                        Ok(reply) => reply,
                        Err(e) => return self.backend_failed(e).await,
                    };
                    let accepted = reply.is_positive_completion();
                    (reply, accepted)
                }
            }
        };
        // A refusal for good is a harvest attempt, and so is a temporary
        // "unknown user" (a backend that verifies recipients and could not
        // finish); other temporary failures are neither.
        let failed = !accepted && (reply.is_permanent() || is_unknown_user_deferral(&reply));
        if accepted {
            self.envelope.recipients.push(rcpt.canonical.clone());
            self.summary.rcpt_accepted += 1;
        } else if failed {
            self.summary.rcpt_failed += 1;
        }
        if accepted || failed {
            let verdict = self.ctx.policy().rcpt_result(
                &self.ctx.state,
                self.source(),
                &mut self.counters,
                accepted,
                Instant::now(),
            );
            if let Some(decision) = verdict {
                if let Some(flow) = self.refuse(&decision.verdict, decision.enforced).await? {
                    return Ok(flow);
                }
            }
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    async fn data(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        // DATA goes to the backend only inside a transaction the proxy saw
        // and judged, in this TLS state: never under an envelope given
        // before STARTTLS, never without an accepted recipient.
        if !self.envelope.active {
            self.reply(&Reply::bad_sequence_because("need MAIL command"))
                .await?;
            return Ok(Flow::Continue);
        }
        if self.envelope.recipients.is_empty() {
            self.reply(&Reply::no_valid_recipients()).await?;
            return Ok(Flow::Continue);
        }
        let envelope = std::mem::take(&mut self.envelope);
        let sink = match self.ctx.filters.clone() {
            // With content filters the backend gets DATA only once the
            // verdicts are in: the proxy takes the message itself.
            Some(filters) => {
                let scan = filters.start(self.filter_envelope(envelope, &filters));
                self.reply(&Reply::start_mail_input()).await?;
                MessageSink::Held {
                    scan,
                    held: HeldMessage::default(),
                }
            }
            None => {
                let reply = match self.backend_command(line).await {
                    Ok(reply) => reply,
                    Err(e) => return self.backend_failed(e).await,
                };
                self.reply(&reply).await?;
                if reply.code != 354 {
                    return Ok(Flow::Continue);
                }
                MessageSink::Backend
            }
        };
        self.receive_message(sink).await
    }

    /// Reads the message after DATA's 354 to its end marker, sending it on
    /// as `sink` says, and answers the end of DATA.
    async fn receive_message(&mut self, mut sink: MessageSink) -> std::io::Result<Flow> {
        let smtp = &self.ctx.settings.smtp;
        let (max_size, data_timeout) = (smtp.max_message_size, smtp.data_timeout);
        let mut scanner = DataScanner::new(smtp.max_data_line_length);
        let mut out = Vec::with_capacity(READ_CHUNK + 8);
        loop {
            out.clear();
            let progress = scanner.feed(&self.input, &mut out);
            let consumed = match progress {
                DataProgress::NeedMore => self.input.len(),
                DataProgress::End { consumed } | DataProgress::Violation { consumed, .. } => {
                    consumed
                }
            };
            self.input.advance(consumed);
            if scanner.message_size() > max_size && !matches!(sink, MessageSink::Discard(_)) {
                // Over the limit: the backend must not store a truncated
                // message, so its connection goes (it aborts the transaction).
                if matches!(sink, MessageSink::Backend) {
                    self.backend = None;
                }
                sink = MessageSink::Discard(Reply::message_too_big());
            }
            let end = matches!(progress, DataProgress::End { .. });
            sink = match sink {
                MessageSink::Backend => match self.backend_send(&out).await {
                    Ok(()) => MessageSink::Backend,
                    Err(e) => return self.backend_failed_in_transaction(e).await,
                },
                MessageSink::Held { scan, held } => {
                    let pending = scanner.pending_marker_len();
                    self.hold(scan, held, &out, end, pending, scanner.message_size())
                        .await?
                }
                discard @ MessageSink::Discard(_) => discard,
            };
            match progress {
                DataProgress::NeedMore => {}
                DataProgress::End { .. } => {
                    return match sink {
                        MessageSink::Backend => self.end_of_data().await,
                        MessageSink::Held { scan, held } => self.judge_message(scan, held).await,
                        MessageSink::Discard(reply) => {
                            // The backend may still hold the envelope of a
                            // message it never got.
                            self.reset_backend_transaction().await;
                            self.reply(&reply).await?;
                            Ok(Flow::Continue)
                        }
                    };
                }
                DataProgress::Violation { kind, .. } => {
                    // Never let the backend see a message whose end the two
                    // sides could read differently (SMTP smuggling).
                    self.backend = None;
                    tracing::info!(source = %self.peer.ip(), violation = ?kind, action = "reject", "invalid line ending in DATA");
                    self.ctx.stats.count_rejection("bare-newline");
                    self.reply(&kind.reply()).await?;
                    return Ok(Flow::Close);
                }
            }
            match self.read_more(data_timeout).await {
                Ok(0) => {
                    // The client left mid-message: the backend must not keep it.
                    self.backend = None;
                    return Ok(Flow::Close);
                }
                Ok(_) => {}
                Err(e) => {
                    self.backend = None;
                    if e.kind() == std::io::ErrorKind::TimedOut {
                        self.reply(&Reply::timeout()).await?;
                    }
                    return Ok(Flow::Close);
                }
            }
        }
    }

    /// Holds the next piece of a message being scanned (`wire`, ending with
    /// the end marker if `end`) and feeds it to the scanners. The end marker
    /// may arrive split over several reads: `held` keeps every byte as on
    /// the wire, and the scanners get only what is certainly content (not
    /// the last `pending` bytes, which may start the marker; the marker
    /// itself never). A message that grows past `filters.max_size` goes on
    /// unscanned from here: DATA to the backend, what was held, and the rest
    /// as it comes.
    async fn hold(
        &mut self,
        mut scan: MessageScan,
        mut held: HeldMessage,
        wire: &[u8],
        end: bool,
        pending: usize,
        message_size: u64,
    ) -> std::io::Result<MessageSink> {
        let too_large = self
            .ctx
            .filters
            .as_ref()
            .is_some_and(|f| message_size > f.max_size());
        let edits = if too_large {
            tracing::info!(source = %self.peer.ip(), size = message_size, "message too large to scan: passed on unscanned");
            scan.skip_too_large()
        } else if scan.reserve(wire.len()) {
            held.wire.extend_from_slice(wire);
            let content_end = if end {
                held.wire.len().saturating_sub(END_MARKER.len())
            } else {
                held.wire.len().saturating_sub(pending)
            };
            if let Some(content) = held.wire.get(held.fed..content_end) {
                scan.feed(content).await;
                held.fed = content_end;
            }
            if end {
                held.wire.truncate(content_end);
            }
            return Ok(MessageSink::Held { scan, held });
        } else {
            tracing::warn!(source = %self.peer.ip(), "filters.max_held reached: this message cannot be held for scanning");
            match scan.skip_no_memory() {
                Some(edits) => edits,
                None => return Ok(MessageSink::Discard(Reply::not_scanned())),
            }
        };
        let (mut first, rest) = message::apply(&held.wire, &edits);
        first.extend_from_slice(held.wire.get(rest..).unwrap_or_default());
        first.extend_from_slice(wire);
        Ok(match self.open_backend_data().await {
            Ok(()) => match self.backend_send(&first).await {
                Ok(()) => MessageSink::Backend,
                Err(e) => {
                    self.note_backend_error(&e);
                    MessageSink::Discard(Reply::backend_lost_in_transaction())
                }
            },
            Err(reply) => MessageSink::Discard(reply),
        })
    }

    /// Sends DATA to the backend for a message the proxy holds. The reply
    /// to give the client instead, if the backend does not say 354.
    async fn open_backend_data(&mut self) -> Result<(), Reply> {
        match self.backend_command(b"DATA").await {
            Ok(reply) if reply.code == 354 => Ok(()),
            Ok(reply) => Err(reply),
            Err(e) => {
                self.note_backend_error(&e);
                Err(Reply::backend_lost_in_transaction())
            }
        }
    }

    /// Waits for the scanners' verdicts on a held message and acts on them.
    ///
    /// `scan` lives to the end: the message's memory stays counted against
    /// `filters.max_held` until the backend has it all.
    async fn judge_message(
        &mut self,
        mut scan: MessageScan,
        held: HeldMessage,
    ) -> std::io::Result<Flow> {
        let held = held.wire;
        let outcome = scan.finish().await;
        let content_reject = outcome.is_content_reject();
        let enforced = self.ctx.policy().enforced();
        let edits = match outcome {
            Outcome::Deliver { edits, label } => {
                tracing::info!(source = %self.peer.ip(), verdict = label, "content filters");
                edits
            }
            Outcome::Refuse {
                reply,
                label,
                detail,
            } => {
                tracing::info!(
                    source = %self.peer.ip(),
                    verdict = label,
                    detail = %detail,
                    action = if enforced { "reject" } else { "would-reject" },
                    "content filters"
                );
                self.ctx.stats.count_rejection(label);
                if !enforced {
                    // Observe mode: the message goes on as it came.
                    return self.deliver_held(&held, &HeaderEdits::default()).await;
                }
                self.reset_backend_transaction().await;
                self.reply(&reply).await?;
                if content_reject {
                    if let Some(decision) = self.ctx.policy().filter_rejected(
                        &self.ctx.state,
                        self.source(),
                        Instant::now(),
                    ) {
                        self.log_decision(&decision.verdict, decision.enforced);
                        if let Some(order) = &decision.verdict.block {
                            self.ctx.block(order);
                        }
                        return Ok(Flow::Close);
                    }
                }
                return Ok(Flow::Continue);
            }
        };
        self.deliver_held(&held, &edits).await
    }

    /// Sends a held message, with `edits`, to the backend and relays its
    /// answer to the end of DATA.
    async fn deliver_held(&mut self, held: &[u8], edits: &HeaderEdits) -> std::io::Result<Flow> {
        if let Err(reply) = self.open_backend_data().await {
            self.reply(&reply).await?;
            return Ok(Flow::Continue);
        }
        let (head, rest) = message::apply(held, edits);
        for part in [&head[..], &held[rest..], END_MARKER] {
            if let Err(e) = self.backend_send(part).await {
                return self.backend_failed_in_transaction(e).await;
            }
        }
        self.end_of_data().await
    }

    /// Reads the backend's answer to the end of DATA and relays it.
    async fn end_of_data(&mut self) -> std::io::Result<Flow> {
        let reply = match self.backend.as_mut() {
            Some(backend) => backend.read_reply_within(DATA_END_TIMEOUT).await,
            None => Err(BackendError::Closed),
        };
        match reply {
            Ok(reply) => {
                if reply.is_positive_completion() {
                    self.summary.messages += 1;
                    self.ctx.stats.count_message();
                }
                self.reply(&reply).await?;
                self.yield_backend_slot().await;
                Ok(Flow::Continue)
            }
            Err(e) => self.backend_failed_in_transaction(e).await,
        }
    }

    /// Between transactions, a session that earns its backend connection
    /// gives it (and its slot) back when other sessions wait for one: its
    /// next MAIL earns a connection again. A sender that keeps its session
    /// open after a message does not hold a backend process others need.
    async fn yield_backend_slot(&mut self) {
        if self.earns_backend() && self.ctx.backend_slots.waiting() > 0 {
            if let Some(backend) = self.backend.take() {
                tracing::debug!(source = %self.peer.ip(), "backend slot given back between transactions");
                backend.quit().await;
            }
        }
    }

    /// What the scanners are told about the message in `envelope`.
    fn filter_envelope(&self, envelope: Envelope, filters: &Filters) -> FilterEnvelope {
        FilterEnvelope {
            client: self.source(),
            helo: self.helo.as_ref().map(|h| h.name.clone()),
            sender: envelope.sender,
            recipients: envelope.recipients,
            queue_id: filters.queue_id(),
        }
    }

    async fn auth(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let mut reply = match self.backend_command(line).await {
            Ok(reply) => reply,
            Err(e) => return self.backend_failed(e).await,
        };
        // SASL exchanges: relay each 334 challenge and the client's answer.
        while reply.code == 334 {
            self.reply(&reply).await?;
            let answer = match self.read_line().await {
                // Only base64 or "*" reach the backend (as Postfix reads
                // them); anything else cancels the exchange.
                Input::Line(answer) if check_sasl_response(&answer).is_ok() => answer,
                Input::Line(_) | Input::TooLong | Input::Nul => b"*".to_vec(),
                Input::Closed | Input::Timeout | Input::Shutdown | Input::Blocked | Input::Shed => {
                    return Ok(Flow::Close)
                }
            };
            reply = match self.backend_command(&answer).await {
                Ok(reply) => reply,
                Err(e) => return self.backend_failed(e).await,
            };
        }
        if reply.code == 535 {
            if let Some(decision) =
                self.ctx
                    .policy()
                    .auth_failed(&self.ctx.state, self.source(), Instant::now())
            {
                if let Some(flow) = self.refuse(&decision.verdict, decision.enforced).await? {
                    return Ok(flow);
                }
            }
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    async fn starttls(&mut self, args: &str) -> std::io::Result<Flow> {
        let Some(acceptor) = self
            .ctx
            .tls
            .clone()
            .filter(|_| self.starttls && !self.is_tls())
        else {
            self.reply(&Reply::command_not_implemented()).await?;
            return Ok(Flow::Continue);
        };
        if !args.trim().is_empty() {
            self.reply(&Reply::bad_arguments("Syntax: STARTTLS"))
                .await?;
            return Ok(Flow::Continue);
        }
        self.reply(&Reply::ready_to_start_tls()).await?;
        // Plaintext pipelined after STARTTLS must not be taken as coming
        // from inside TLS (CVE-2011-0411 and kin): throw it away.
        if !self.input.is_empty() {
            tracing::info!(source = %self.peer.ip(), bytes = self.input.len(), "discarded plaintext pipelined after STARTTLS");
            self.input.clear();
        }
        let Some(ClientStream::Plain(plain)) = self.client.take() else {
            return Ok(Flow::Close);
        };
        match timeout(
            self.ctx.settings.smtp.command_timeout,
            acceptor.accept(plain),
        )
        .await
        {
            Ok(Ok(tls)) => self.client = Some(ClientStream::Tls(Box::new(tls))),
            Ok(Err(e)) => {
                tracing::info!(source = %self.peer.ip(), error = %e, "TLS handshake failed");
                return Ok(Flow::Close);
            }
            Err(_) => return Ok(Flow::Close),
        }
        // RFC 3207: the session starts over; the client must EHLO again, and
        // nothing said in plaintext may carry over at the backend either.
        self.helo = None;
        self.envelope = Envelope::default();
        self.reset_backend_transaction().await;
        Ok(Flow::Continue)
    }

    /// Relays a command and its reply unchanged.
    async fn relay_and_answer(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let reply = match self.backend_command(line).await {
            Ok(reply) => reply,
            Err(e) => return self.backend_failed(e).await,
        };
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// Applies a policy refusal: the reply, the block, the log line.
    /// Returns `None` when the command goes on (observe mode).
    async fn refuse(
        &mut self,
        rejection: &Rejection,
        enforced: bool,
    ) -> std::io::Result<Option<Flow>> {
        self.log_decision(rejection, enforced);
        if !enforced {
            return Ok(None);
        }
        if let Some(order) = &rejection.block {
            self.ctx.block(order);
        }
        self.reply(&rejection_reply(rejection)).await?;
        Ok(Some(if rejection.action.closes() {
            Flow::Close
        } else {
            Flow::Continue
        }))
    }

    fn log_decision(&self, rejection: &Rejection, enforced: bool) {
        self.ctx.stats.count_rejection(rejection.name());
        tracing::info!(
            source = %self.peer.ip(),
            helo = self.helo.as_ref().map(|h| h.name.as_str()),
            reason = rejection.name(),
            detail = %rejection.reason,
            action = if enforced { action_name(rejection.action) } else { "would-reject" },
            block = rejection.block.as_ref().map(|b| b.net.to_string()),
            "policy decision"
        );
    }

    /// Opens the backend connection: a backend slot (waiting fairly for at
    /// most `backend.slot_wait`), the connection, the identity header, the
    /// greeting. Returns the greeting.
    async fn connect_backend(&mut self) -> Result<Reply, BackendError> {
        let wait = self.ctx.settings.slot_wait;
        let slot = self
            .ctx
            .backend_slots
            .acquire(self.source(), wait)
            .await
            .map_err(|_| BackendError::NoSlot(wait))?;
        let (mut backend, greeting) =
            Backend::connect(&self.ctx.settings.backend, Some((self.peer, self.local))).await?;
        backend.hold_slot(slot);
        self.backend = Some(backend);
        self.xclient_sent = false;
        Ok(greeting)
    }

    /// Sends a command to the backend, connecting first if the session has
    /// no connection (not earned yet, or dropped after an aborted message);
    /// the client's HELO is replayed on the new connection, and a backend
    /// that refuses it gives the client its reply
    /// ([`BackendError::HeloRefused`]).
    async fn backend_command(&mut self, line: &[u8]) -> Result<Reply, BackendError> {
        if self.backend.is_none() {
            self.connect_backend().await?;
            if let Some(helo) = self.helo.as_ref().map(|h| (h.name.clone(), h.esmtp)) {
                if self.ctx.settings.backend.identity == Identity::Xclient {
                    self.send_xclient(&helo.0, helo.1).await?;
                }
                let verb = if helo.1 { "EHLO" } else { "HELO" };
                let backend = self.backend.as_mut().ok_or(BackendError::Closed)?;
                let reply = backend
                    .command(format!("{verb} {}", helo.0).as_bytes())
                    .await?;
                if !reply.is_positive_completion() {
                    return Err(BackendError::HeloRefused(reply));
                }
            }
        }
        let backend = self.backend.as_mut().ok_or(BackendError::Closed)?;
        let started = Instant::now();
        let reply = backend.command(line).await;
        self.ctx.stats.backend_latency.record(started.elapsed());
        reply
    }

    async fn backend_send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        match self.backend.as_mut() {
            Some(backend) => backend.send(bytes).await,
            None => Err(BackendError::Closed),
        }
    }

    /// The backend failed or refused the session: the client gets the
    /// backend's own refusal when there is one (a greeting, XCLIENT or HELO
    /// refused with a 4xx/5xx), `421 4.3.2` when no backend slot came free,
    /// `421 4.3.0` otherwise. Never a 250.
    async fn backend_failed(&mut self, error: BackendError) -> std::io::Result<Flow> {
        self.backend = None;
        let reply = match &error {
            BackendError::NoSlot(_) => {
                self.ctx.count_shed(self.source(), "backend-slot-timeout");
                Reply::no_backend_slot()
            }
            BackendError::Greeting(reply) | BackendError::HeloRefused(reply)
                if reply.is_transient() || reply.is_permanent() =>
            {
                tracing::info!(source = %self.peer.ip(), error = %error, "backend refused the session");
                reply.clone()
            }
            // A refused XCLIENT is the proxy's configuration: a 5xx would
            // bounce the client's mail for good.
            BackendError::XclientRefused(reply) if reply.is_transient() => {
                tracing::warn!(source = %self.peer.ip(), error = %error, "backend refused the session");
                reply.clone()
            }
            _ => {
                tracing::warn!(source = %self.peer.ip(), error = %error, "backend failed");
                self.ctx.stats.count_backend_error();
                Reply::backend_unavailable()
            }
        };
        let close = reply.code == 421;
        self.reply(&reply).await?;
        Ok(if close { Flow::Close } else { Flow::Continue })
    }

    /// Ends the backend's transaction (`RSET`) when it must not go on: a
    /// refused message, a new TLS state. A backend that fails it is dropped
    /// (a later command reconnects).
    async fn reset_backend_transaction(&mut self) {
        if let Some(backend) = self.backend.as_mut() {
            if backend.command(b"RSET").await.is_err() {
                self.backend = None;
            }
        }
    }

    /// The backend failed during a message: counted, logged, connection
    /// dropped (a later command reconnects).
    fn note_backend_error(&mut self, error: &BackendError) {
        tracing::warn!(source = %self.peer.ip(), error = %error, "backend failed during a message; not acknowledged");
        self.ctx.stats.count_backend_error();
        self.backend = None;
    }

    async fn backend_failed_in_transaction(
        &mut self,
        error: BackendError,
    ) -> std::io::Result<Flow> {
        self.note_backend_error(&error);
        self.reply(&Reply::backend_lost_in_transaction()).await?;
        Ok(Flow::Close)
    }

    fn is_tls(&self) -> bool {
        self.client.as_ref().is_some_and(ClientStream::is_tls)
    }

    async fn reply(&mut self, reply: &Reply) -> std::io::Result<()> {
        // RFC 5321 3.8: after a 421 (ours or the backend's) the channel closes.
        if reply.code == 421 {
            self.closing = true;
        }
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| std::io::Error::other("client stream gone"))?;
        let write = async {
            client.write_all(&reply.to_bytes()).await?;
            client.flush().await
        };
        match timeout(self.ctx.settings.smtp.write_timeout, write).await {
            Ok(result) => result,
            // A client that stops reading is gone as far as the session goes.
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client does not read its replies",
            )),
        }
    }

    /// Whether the client sent anything before being greeted: one poll of
    /// the read, no waiting (a zero timeout would wait for the timer's next
    /// millisecond tick on every session).
    async fn client_spoke_first(&mut self) -> bool {
        let Some(client) = self.client.as_mut() else {
            return false;
        };
        let mut read = std::pin::pin!(client.read_buf(&mut self.input));
        std::future::poll_fn(|cx| match read.as_mut().poll(cx) {
            std::task::Poll::Ready(Ok(n)) => std::task::Poll::Ready(n > 0),
            _ => std::task::Poll::Ready(false),
        })
        .await
    }

    /// Reads more client bytes within `limit`; 0 means the client closed.
    async fn read_more(&mut self, limit: Duration) -> std::io::Result<usize> {
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| std::io::Error::other("client stream gone"))?;
        self.input.reserve(READ_CHUNK);
        match timeout(limit, client.read_buf(&mut self.input)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client data timeout",
            )),
        }
    }

    async fn read_line(&mut self) -> Input {
        let smtp = &self.ctx.settings.smtp;
        let shed = self.registration.as_ref().map(|r| r.entry.clone());
        loop {
            // Under stress, a session without a MAIL gets a short timeout.
            let stress = !self.mail_accepted
                && smtp.stress_command_timeout < smtp.command_timeout
                && self.ctx.stressed();
            let limit = if stress {
                smtp.stress_command_timeout
            } else {
                smtp.command_timeout
            };
            if let Some(result) = self.lines.next_line(&mut self.input) {
                return match result {
                    // A bare CR could end the line early at some backend.
                    Ok(line) if line.has_bare_cr() => Input::Nul,
                    Ok(line) => Input::Line(line.text),
                    Err(LineError::TooLong) => Input::TooLong,
                    Err(LineError::Nul) => Input::Nul,
                };
            }
            let Some(client) = self.client.as_mut() else {
                return Input::Closed;
            };
            self.input.reserve(READ_CHUNK);
            let shed_order = async {
                match &shed {
                    Some(entry) => entry.shed().await,
                    None => std::future::pending().await,
                }
            };
            if let Some(entry) = &shed {
                entry.set_idle(true);
            }
            let read = tokio::select! {
                read = timeout(limit, client.read_buf(&mut self.input)) => match read {
                    Ok(Ok(0)) | Ok(Err(_)) => Some(Input::Closed),
                    Ok(Ok(_)) => None,
                    Err(_) => {
                        if stress {
                            self.ctx.count_shed(self.peer.ip(), "stress-timeout");
                        }
                        Some(Input::Timeout)
                    }
                },
                () = shed_order => Some(Input::Shed),
                _ = self.shutdown.changed() => Some(Input::Shutdown),
                blocked = self.blocked_nets.recv() => match blocked {
                    Ok(net) if net.contains(&self.peer.ip()) && self.ctx.policy().enforced() => Some(Input::Blocked),
                    // A missed block (lagging) is caught at this session's
                    // next connection; nothing else to do.
                    _ => None,
                },
            };
            if let Some(entry) = &shed {
                entry.set_idle(false);
            }
            if let Some(input) = read {
                return input;
            }
        }
    }
}

/// The reply for a policy refusal: a fixed text per reason (the details,
/// such as counts and the pattern that matched, go to the log only).
fn rejection_reply(rejection: &Rejection) -> Reply {
    let text = match &rejection.reason {
        Reason::RejectList { .. } => "Service unavailable; client host rejected",
        Reason::TooManyConnections { .. } => "Error: too many connections from your address",
        Reason::StateFull { .. } => "Error: server busy, try again later",
        Reason::HeloRejected { .. } => "Helo command rejected: Access denied",
        Reason::TooManyForHelo { .. } => "Error: too many connections for your HELO name",
        Reason::NullSenderRate { .. } => {
            "Error: too many messages with a null sender, try again later"
        }
        Reason::RelayDenied => "Relay access denied",
        Reason::Harvest { .. } | Reason::HarvestAcrossSessions { .. } => {
            "Error: too many invalid recipients, try again later"
        }
        Reason::AuthFailures { .. } => "Error: too many failed authentications, try again later",
        Reason::FilterRejects { .. } => "Error: too many rejected messages, try again later",
    };
    match rejection.action {
        Action::DeferCommand => Reply::policy_deferred(text),
        Action::RefuseCommand => Reply::policy_refused(text),
        Action::DeferAndClose => Reply::policy_deferred_closing(text),
        Action::RefuseAndClose => Reply::policy_refused_closing(text),
    }
}

/// `MAIL FROM:<sender> params` as the backend gets it: rebuilt from what
/// the proxy parsed, so that the backend reads the sender the proxy judged
/// (every null-sender spelling becomes `<>`; a source route goes, as RFC
/// 5321 says it may).
fn mail_line(mail: &MailFrom) -> Vec<u8> {
    let sender = mail.canonical.as_deref().or(mail.sender.as_deref());
    path_line("MAIL FROM:", sender.unwrap_or(""), &mail.params)
}

/// `RCPT TO:<recipient> params` as the backend gets it: the canonical
/// recipient the rules judged (domain without case or trailing dot; routing
/// syntax was refused before this).
fn rcpt_line(rcpt: &RcptTo) -> Vec<u8> {
    path_line("RCPT TO:", &rcpt.canonical, &rcpt.params)
}

fn path_line(keyword: &str, path: &str, params: &[Param]) -> Vec<u8> {
    let mut line = format!("{keyword}<{path}>");
    for (key, value) in params {
        line.push(' ');
        line.push_str(key);
        if let Some(value) = value {
            line.push('=');
            line.push_str(value);
        }
    }
    line.into_bytes()
}

/// A temporary failure that says the mailbox is unknown (`4.1.1`, e.g.
/// Postfix's "unverified address" while its probe is pending).
fn is_unknown_user_deferral(reply: &Reply) -> bool {
    reply.is_transient() && matches!(reply.enhanced(), Some((4, 1, 1)))
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::DeferCommand => "defer",
        Action::RefuseCommand => "reject",
        Action::DeferAndClose => "defer-and-close",
        Action::RefuseAndClose => "reject-and-close",
    }
}
