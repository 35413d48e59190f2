//! One client session, relayed to the backend: an explicit state machine
//! over the client stream (plain or TLS) and a backend connection.
//!
//! Every command is read whole, judged by the policy where it has a say,
//! relayed to the backend, and the backend's reply relayed back (filtered for
//! EHLO). The proxy answers by itself when it refuses something or the
//! backend failed; it never answers 250 to the end of DATA unless the
//! backend did.
//!
//! Pipelining (RFC 2920) goes through end to end ([`pipeline`]): the MAIL,
//! RCPT, RSET and DATA the client sent together reach the backend in one
//! write, and the replies, the proxy's own among them, go back in order, in
//! one write. Replies are held while the client has more commands buffered
//! and written before the proxy waits for the client. QUIT is answered at
//! once; the backend gets its QUIT once the client is gone. DATA outside a
//! pipelined group is answered 354 by the proxy, then sent to the backend;
//! the message goes on only after the backend's own 354, and the end of DATA
//! gets the backend's answer (its refusal of DATA, if it refused).
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
//! `smtp.max_sessions` ([`super::shed`]). A transaction that holds a
//! backend slot has a bounded time with its client (`MessagePace`): past
//! it, an envelope kept open gets `421 4.4.2`, and a message goes on into
//! the spool ([`super::spool`]), its transaction replayed on a new
//! connection at its end.
//!
//! This module holds the session, its dialogue loop, the command dispatch
//! and the client I/O; each stage has its own file: `helo` (HELO/EHLO),
//! `envelope` (MAIL, RCPT), `data` (DATA, held and spooled messages),
//! `auth`, `starttls`, and `backend_link` (slot, connection, identity,
//! replay, failures).

mod auth;
mod backend_link;
mod data;
mod envelope;
mod helo;
mod pipeline;
mod starttls;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf, BytesMut};
use pipeline::{Pipeline, Step};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::{timeout, timeout_at},
};

use super::{
    backend::{Backend, BackendError},
    early::EarlyLink,
    latch::Latch,
    notices::Subscription,
    shed::Registration,
    slots::SHED_SLOT_WAIT,
    tls::ClientStream,
    ProxyContext,
};
use crate::{
    config::{Identity, TlsMode, Vrfy},
    filters::{
        message::{self, HeaderEdits},
        Envelope as FilterEnvelope, Filters, MessageScan, Outcome,
    },
    policy::{
        Action, ConnectionGuard, Decision, Familiarity, HeloGuard, HeloVerdict, MailVerdict,
        RateScope, RcptVerdict, Reason, Rejection, SessionCounters,
    },
    smtp::{
        command::{
            check_sasl_response, parse_command_line, parse_mail_from, parse_rcpt_to, path_line,
            MailFrom, RcptTo, Verb,
        },
        data::{DataProgress, DataScanner},
        ehlo::{default_capabilities, ehlo_hostname, filter_ehlo, parse_capabilities, EhloOptions},
        helo::canonical_helo,
        line::{LineError, LineReader},
        reply::Reply,
        sasl::SaslAccount,
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
    /// A bounce: the null sender or MAILER-DAEMON, as the null-sender
    /// rates count it ([`MailFrom::counts_as_null_sender`]).
    bounce: bool,
    /// The recipients the backend accepted (at most `smtp.max_recipients`).
    recipients: Vec<String>,
    /// `backend.connect = "on-rcpt"`: the MAIL line the proxy accepted on
    /// the backend's behalf and owes it, sent before the first RCPT
    /// relayed.
    owed_mail: Option<Vec<u8>>,
    /// The backend's refusal of that MAIL: the answer to every RCPT of the
    /// transaction.
    sender_refused: Option<Reply>,
    /// Whether it gave its backend slot back while it waited for its client
    /// ([`Session::park`]).
    park: Park,
}

/// A transaction's life without its backend connection: closed while the
/// transaction waited for its client on a slot others needed, and taken up
/// again on a new one when its client needs the backend
/// ([`Session::ensure_backend`]). Once per transaction: the second time its
/// time runs out, the session ends as it would have without it.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Park {
    #[default]
    Never,
    /// Without a backend connection: its lines are owed to the next one.
    Parked,
    /// Taken up again on a new connection.
    Resumed,
}

/// The transaction in progress, as the backend accepted it.
#[derive(Default)]
struct Transaction {
    /// How long it waited for its client in its envelope (MAIL to DATA),
    /// and in its message: what counts of it ([`Transaction::charged_wait`])
    /// against the transaction's time decides when it loses its backend
    /// slot ([`Session::slot_time_left`], [`MessagePace`]).
    envelope_wait: Duration,
    message_wait: Duration,
    /// Its MAIL line and the RCPT lines the backend accepted, as the
    /// backend got them: replayed on a new connection for a spooled
    /// message ([`super::spool`]). At most `smtp.max_recipients` + 1.
    lines: Vec<Vec<u8>>,
}

impl Transaction {
    /// Recipients the backend accepted (each earns the transaction
    /// [`TIME_PER_RECIPIENT`]).
    fn recipients(&self) -> u32 {
        u32::try_from(self.lines.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// Its waits for its client that count against its time: the
    /// envelope's, less what its recipients earned for their round trips
    /// (which only the envelope's waits may use), and the message's.
    fn charged_wait(&self) -> Duration {
        let earned = (TIME_PER_RECIPIENT * self.recipients()).min(MAX_RECIPIENT_TIME);
        self.envelope_wait.saturating_sub(earned) + self.message_wait
    }
}

/// The rate a message must arrive at, beyond its transaction's
/// `smtp.stress_command_timeout`, while the transaction holds a backend slot
/// others wait for: Postfix's `smtpd_min_data_rate` (bytes per second).
const MIN_DATA_RATE: u64 = 500;

/// How far a message may fall behind [`MIN_DATA_RATE`] where that rate is
/// asked of it ([`MessagePace::Relayed`], [`MessagePace::Spooled`]): a
/// bucket of time, full at `smtp.stress_command_timeout`, drained by every
/// wait for the client and filled a second for every [`MIN_DATA_RATE`]
/// bytes, never above full. Bytes sent ahead buy no more than a full bucket: a client
/// that sends 100 kB at once and then a byte now and then is cut as soon
/// as one that sent nothing, not 200 s later.
struct DataCredit {
    left: Duration,
    full: Duration,
}

impl DataCredit {
    /// Full, with `spent` of it gone already.
    fn new(full: Duration, spent: Duration) -> Self {
        Self {
            left: full.saturating_sub(spent),
            full,
        }
    }

    fn spend(&mut self, wait: Duration) {
        self.left = self.left.saturating_sub(wait);
    }

    fn earn(&mut self, bytes: usize) {
        let earned = Duration::from_millis((bytes as u64).saturating_mul(1000) / MIN_DATA_RATE);
        self.left = (self.left + earned).min(self.full);
    }
}

/// How long a transaction may wait for its client in all (besides the
/// round trips of its recipients, [`TIME_PER_RECIPIENT`]) before its slot
/// goes: in its envelope while sessions wait for a slot, with `421 4.4.2`
/// ([`Session::slot_time_left`]); in a message with a copy while slots are
/// scarce (half or more in use: [`super::slots::BackendSlots::scarce`]),
/// on into the copy ([`MessagePace::Spoolable`]). A sender sends its
/// transaction at once, and a slow message loses nothing but a second
/// backend session at its end.
const SCARCE_WAIT: Duration = Duration::from_secs(1);

/// Why a session in its first [`super::shed::SHED_GRACE`] was shed: at the
/// session cap, no older session was idle.
const SHED_NEW: &str = "shed-new";

/// What each recipient the backend accepts adds to its transaction's time
/// with its client in that case: a client far away that does not pipeline
/// waits a round trip per RCPT. Only the envelope's waits may use it, and
/// [`MAX_RECIPIENT_TIME`] of it at most: a hundred recipients sent at once
/// buy a slow message nothing, and a recipient every 0.9 s does not keep a
/// transaction open for 90 s.
const TIME_PER_RECIPIENT: Duration = Duration::from_secs(1);

/// The most [`TIME_PER_RECIPIENT`] earns a transaction.
const MAX_RECIPIENT_TIME: Duration = Duration::from_secs(10);

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
    /// The backend has DATA (the proxy answered 354 itself) and its 354 is
    /// awaited before the first byte of the message goes on.
    Opening,
    /// Nowhere: the backend refused DATA with this reply, which the client
    /// gets at the end (the backend's transaction is left as it is).
    Refused(Reply),
    /// Into the message's spool copy only: the client gave its backend slot
    /// back mid-message; the transaction is replayed at the end.
    Spooled,
}

/// How the pace of a message is judged while the proxy waits for more of
/// it: against its transaction's time with its client
/// ([`Session::transaction_time_left`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum MessagePace {
    /// The message has a copy (in the spool, or held for the content
    /// filters): past its time (`smtp.stress_command_timeout`, or only
    /// [`SCARCE_WAIT`] while slots are scarce), its
    /// backend slot is due ([`MessageRead::SlotDue`]) and the message goes
    /// on into the copy. Contended or not: a slot is too dear to leave to a
    /// slow client until someone waits for it, for by then a flood of them
    /// holds every slot (Postfix's `speed_adjust` spools every message).
    Spoolable,
    /// No copy: while the transaction holds a slot other sessions wait
    /// for ([`Session::slot_contended`]), once it is further behind
    /// [`MIN_DATA_RATE`] than its [`DataCredit`] allows, the session ends
    /// (`slow-transaction`, `421 4.4.2`): a message dribbled a byte at a
    /// time loses the slot, one sent over a slow link does not.
    Relayed,
    /// Spooled (or held) after its slot went: contended or not, the
    /// session ends as for
    /// `Relayed` (Postfix's `smtpd_min_data_rate` for every message), so
    /// that a zombie cannot hold its spool memory and its session a byte
    /// at a time.
    Spooled,
}

/// What a wait for more of a message brought.
enum MessageRead {
    /// This many bytes (0: the client left).
    Bytes(usize),
    /// Nothing yet, and the client used up its time with the backend slot
    /// others wait for: the slot goes, the message goes on into the spool.
    SlotDue,
    /// The message's spool copy was evicted for a faster message
    /// ([`super::spool`]).
    Evicted,
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
    /// The backend connection opened at accept for a recent sender, until
    /// the session claims it ([`super::early`]).
    early: Option<EarlyLink>,
    /// XCLIENT was sent on the current backend connection.
    xclient_sent: bool,
    helo: Option<Helo>,
    envelope: Envelope,
    counters: SessionCounters,
    /// This listener offers STARTTLS.
    starttls: bool,
    /// This listener speaks TLS from the first byte: the handshake is due
    /// before the greeting.
    implicit_tls: bool,
    shutdown: watch::Receiver<bool>,
    /// Blocks of this session's client, put in force anywhere since it
    /// began (see [`Self::source_blocked`]).
    block_notice: Subscription,
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
    /// The backend accepted the client's AUTH: its connection carries the
    /// login and is never given back between transactions.
    authenticated: bool,
    /// The transaction in progress as the backend accepted it, from its
    /// MAIL to the end of its message (DATA resets the envelope, not this).
    transaction: Transaction,
    /// This session's place among those that may be shed; left at the
    /// first accepted MAIL FROM.
    registration: Option<Registration>,
    /// The pipelined group in progress: commands queued for one write to
    /// the backend, and every reply still to be given, in order.
    pipeline: Pipeline,
    /// Replies not written yet: held while the client has more commands
    /// buffered (one write per group), always written before a read.
    client_out: Vec<u8>,
    /// A pipelined group's replies are being settled: written at its end.
    settling: bool,
    /// The backend takes pipelined commands: the session is ESMTP and the
    /// backend's reply to its EHLO offered PIPELINING (Postfix >= 3.9 drops
    /// a client that pipelines otherwise, `smtpd_forbid_unauth_pipelining`).
    backend_pipelining: bool,
    /// The backend answered a pipelined DATA with 354: the message follows.
    data_open: bool,
    /// The backend connection of a client that said QUIT: told QUIT once
    /// the client's connection ended.
    quitting: Option<Backend>,
    /// When the session began.
    started: tokio::time::Instant,
    /// The settings in force when the session began: a reload applies to
    /// the sessions that begin after it.
    settings: Arc<super::Settings>,
    _connection: ConnectionGuard,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub fn new(
        ctx: Arc<ProxyContext>,
        client: ClientStream<S>,
        peer: SocketAddr,
        local: SocketAddr,
        tls: TlsMode,
        connection: ConnectionGuard,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let block_notice = ctx.block_notices.subscribe(peer.ip());
        let started = tokio::time::Instant::now();
        let registration = Some(ctx.sessions.register());
        let settings = ctx.settings();
        Self {
            lines: LineReader::new(MAX_AUTH_LINE),
            ctx,
            client: Some(client),
            peer: SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            local,
            input: BytesMut::with_capacity(4096),
            backend: None,
            early: None,
            xclient_sent: false,
            helo: None,
            envelope: Envelope::default(),
            counters: SessionCounters::default(),
            starttls: tls == TlsMode::Starttls,
            implicit_tls: tls == TlsMode::Implicit,
            shutdown,
            block_notice,
            summary: SessionSummary::default(),
            closing: false,
            errors: 0,
            commands_before_mail: 0,
            mail_accepted: false,
            transaction: Transaction::default(),
            authenticated: false,
            registration,
            pipeline: Pipeline::default(),
            client_out: Vec::with_capacity(512),
            settling: false,
            backend_pipelining: false,
            data_open: false,
            quitting: None,
            settings,
            started,
            _connection: connection,
        }
    }

    fn source(&self) -> IpAddr {
        self.peer.ip()
    }

    /// Runs the session to its end.
    pub async fn run(mut self) -> SessionSummary {
        let deadline = self.settings.smtp.session_timeout;
        let outcome = match timeout(deadline, self.dialogue()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let _ = self.reply(&Reply::timeout()).await;
                "session-timeout"
            }
        };
        // What the client was still owed, in order (each backend reply
        // within the reply timeout), then the end of its connection; the
        // backend's goodbye is waited for only after that.
        let _ = self.flush_pipeline().await;
        let _ = self.flush_client().await;
        if let Some(mut client) = self.client.take() {
            let _ = timeout(self.settings.smtp.write_timeout, client.shutdown()).await;
        }
        if let Some(backend) = self.quitting.take().or_else(|| self.backend.take()) {
            backend.quit().await;
        }
        self.summary.outcome = outcome;
        self.summary.helo = self.helo.as_ref().map(|h| h.name.clone());
        self.summary
    }

    fn earns_backend(&self) -> bool {
        self.settings.connect.earned()
    }

    /// The greeting: the backend's, relayed (`"on-connect"`), or the one the
    /// probe learned (`"on-mail"`; the proxy's own until a probe succeeds).
    async fn greeting(&mut self) -> Result<Reply, BackendError> {
        if self.earns_backend() {
            let learned = self
                .ctx
                .capabilities
                .after_first_probe(self.settings.backend.connect_timeout)
                .await;
            return Ok(
                learned.map_or_else(|| Reply::greeting(&self.settings.hostname), |l| l.greeting)
            );
        }
        self.connect_backend(self.slot_wait_to_start()).await
    }

    async fn dialogue(&mut self) -> &'static str {
        if self.implicit_tls {
            let Some(acceptor) = self.ctx.tls() else {
                return "tls-unavailable";
            };
            if let Err(outcome) = self.tls_handshake(acceptor).await {
                return outcome;
            }
        }
        self.early = EarlyLink::open(&self.ctx, &self.settings, self.peer, self.local);
        let greeting = match self.greeting().await {
            Ok(greeting) => greeting,
            Err(e) => {
                tracing::warn!(source = %self.peer.ip(), error = %e, "backend unavailable at connect");
                let reply = if let BackendError::NoSlot(wait) = e {
                    self.turned_away_for_a_slot(wait);
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
            let input = match self.buffered_input() {
                Some(input) => input,
                None => {
                    // The client sent nothing more: the group ends here.
                    match self.flush_pipeline().await {
                        Ok(Flow::Continue) if !self.closing => {}
                        Ok(_) => return "closed",
                        Err(_) => return "client-lost",
                    }
                    self.read_command().await
                }
            };
            let line = match input {
                Input::Line(line) => line,
                Input::TooLong | Input::Nul => {
                    match self.flush_pipeline().await {
                        Ok(Flow::Continue) if !self.closing => {}
                        Ok(_) => return "closed",
                        Err(_) => return "client-lost",
                    }
                    let (reason, reply) = if matches!(input, Input::TooLong) {
                        ("line-too-long", Reply::line_too_long())
                    } else {
                        ("bad-command-syntax", Reply::syntax_error())
                    };
                    match self.count_command_before_mail().await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Close) => return "too-many-commands",
                        Err(_) => return "client-lost",
                    }
                    // A refused line like any other: toward smtp.max_errors.
                    match self.protocol_error(reason, &reply).await {
                        Ok(Flow::Continue) => continue,
                        Ok(Flow::Close) => return "too-many-errors",
                        Err(_) => return "client-lost",
                    }
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
                    let _ = self.end_blocked().await;
                    return "blocked";
                }
                Input::Shed => {
                    self.shed(self.shed_at_cap_reason());
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

    /// Counts a line read before the first accepted MAIL FROM; past
    /// `smtp.max_commands_before_mail`, `421 4.7.0` and the end. A command
    /// read while a MAIL is pending is counted at its turn, once that MAIL
    /// was answered ([`Step::Count`]).
    async fn count_command_before_mail(&mut self) -> std::io::Result<Flow> {
        if !self.mail_accepted && self.pipeline.mail_pending() {
            self.pipeline.push(Step::Count);
            return Ok(Flow::Continue);
        }
        if !self.mail_accepted {
            self.commands_before_mail = self.commands_before_mail.saturating_add(1);
            if self.commands_before_mail > self.settings.smtp.max_commands_before_mail {
                self.shed("too-many-commands");
                self.reply(&Reply::too_many_commands_before_mail()).await?;
                return Ok(Flow::Close);
            }
        }
        Ok(Flow::Continue)
    }

    /// Handles one command line.
    async fn handle(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let flow = self.dispatch(line).await?;
        // Without pipelining to the backend (or with nothing relayed in it),
        // what was queued is settled at once.
        if !self.pipeline.is_empty() && (!self.pipelining() || !self.pipeline.has_relayed()) {
            return match (flow, self.flush_pipeline().await?) {
                (Flow::Continue, Flow::Continue) => Ok(Flow::Continue),
                _ => Ok(Flow::Close),
            };
        }
        Ok(flow)
    }

    /// Whether the line is one that joins the group in progress: MAIL,
    /// RCPT, RSET or DATA within the length limit (a MAIL only when no MAIL
    /// or RCPT is pending: its judgement counts null senders, and a pending
    /// RCPT may end the session). Any other line is handled once the group
    /// is settled.
    fn joins_pipeline(&self, verb: Verb, line: &[u8]) -> bool {
        line.len() + 2 <= self.settings.smtp.max_line_length
            && match verb {
                Verb::Rcpt | Verb::Rset | Verb::Data => true,
                Verb::Mail => !self.pipeline.mail_pending() && self.pipeline.rcpts_pending() == 0,
                _ => false,
            }
    }

    /// Dispatches one command line, after the group in progress unless it
    /// joins it.
    ///
    /// A line outside the accepted syntax ([`parse_command_line`]: control
    /// bytes, a verb followed by anything but a blank, bad UTF-8) is refused
    /// here and never relayed: the backend could read it as another command
    /// than the one the proxy would judge.
    async fn dispatch(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let parsed = parse_command_line(line);
        let joins = parsed
            .as_ref()
            .is_ok_and(|c| self.joins_pipeline(c.verb, line));
        if !joins && self.flush_pipeline().await? == Flow::Close {
            return Ok(Flow::Close);
        }
        if self.count_command_before_mail().await? == Flow::Close {
            return Ok(Flow::Close);
        }
        let command = match parsed {
            Ok(command) => command,
            Err(error) => {
                tracing::debug!(source = %self.peer.ip(), %error, action = "reject", "command line refused");
                return self
                    .protocol_error("bad-command-syntax", &error.reply())
                    .await;
            }
        };
        if command.verb != Verb::Auth && line.len() + 2 > self.settings.smtp.max_line_length {
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
            Verb::Noop | Verb::Help if self.backend.is_none() && self.earns_backend() => {
                let reply = match command.verb {
                    Verb::Help => Reply::help(),
                    _ => Reply::ok(),
                };
                self.reply(&reply).await?;
                Ok(Flow::Continue)
            }
            Verb::Rset => self.rset().await,
            // The client's goodbye needs nothing from the backend: answered
            // at once; the backend is told QUIT once the client's connection
            // ended (a write to it first could let the backend run before
            // the client is answered).
            Verb::Quit => {
                self.quitting = self.backend.take();
                self.reply(&Reply::closing()).await?;
                Ok(Flow::Close)
            }
            Verb::Vrfy | Verb::Expn if self.settings.smtp.vrfy == Vrfy::Refuse => {
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
            Verb::Vrfy | Verb::Expn => self.vrfy(line).await,
            Verb::Noop | Verb::Help => self.relay_and_answer(line).await,
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
        if self.errors > self.settings.smtp.max_errors {
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
        !self.settings.auth_requires_tls || self.is_tls()
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

    /// Why the session was shed to make room at `smtp.max_sessions`
    /// ([`super::shed::Sessions::shed_oldest_idle`]).
    fn shed_at_cap_reason(&self) -> &'static str {
        if self.envelope.park == Park::Parked {
            "shed-parked"
        } else if self
            .registration
            .as_ref()
            .is_some_and(|r| r.entry.shed_new())
        {
            SHED_NEW
        } else {
            "shed-idle"
        }
    }

    /// This session, without an accepted MAIL, is closed under pressure
    /// for `reason` (its `421` follows): counted, and toward the source's
    /// `max_shed_sessions_per_source`, whose block comes before the reply.
    fn shed(&self, reason: &'static str) {
        self.ctx.count_shed(self.source(), reason);
        // A session shed in its first seconds, for want of an older idle
        // one, showed nothing yet: a sender in its first round trips must
        // not send its network behind the flood's in the slot queue. It
        // still counts toward its source's limit: a zombie that reconnects
        // faster than the grace is blocked like one that idles.
        if reason != SHED_NEW {
            self.ctx.backend_slots.mark_shed(self.source());
        }
        self.count_toward_shed_limit();
    }

    /// The source lost a session or a backend slot under pressure (shed,
    /// or its transaction parked): past
    /// `limits.max_shed_sessions_per_source` within the window it is
    /// blocked.
    fn count_toward_shed_limit(&self) {
        let decision =
            self.ctx
                .policy()
                .session_shed(&self.ctx.state, self.source(), Instant::now());
        if let Some(decision) = decision {
            self.log_decision(&decision.verdict, decision.enforced);
            if let (true, Some(order)) = (decision.enforced, &decision.verdict.block) {
                self.ctx.block(order);
            }
        }
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

    fn is_tls(&self) -> bool {
        self.client.as_ref().is_some_and(ClientStream::is_tls)
    }

    /// Gives the client `reply`: after the replies still pending in the
    /// group, if any; written at once unless the client has more commands
    /// buffered (then with theirs, RFC 2920).
    async fn reply(&mut self, reply: &Reply) -> std::io::Result<()> {
        if !self.pipeline.is_empty() {
            self.pipeline.push(Step::Reply(reply.clone()));
            return Ok(());
        }
        // RFC 5321 3.8: after a 421 (ours or the backend's) the channel closes.
        if reply.code == 421 {
            self.closing = true;
        }
        reply.write_to(&mut self.client_out);
        if !self.settling && !self.client_has_line() {
            self.flush_client().await?;
        }
        Ok(())
    }

    /// Whether the client's input holds another line (it pipelined).
    fn client_has_line(&self) -> bool {
        self.input.contains(&b'\n')
    }

    /// Writes the replies held for the client.
    async fn flush_client(&mut self) -> std::io::Result<()> {
        if self.client_out.is_empty() {
            return Ok(());
        }
        let client = self
            .client
            .as_mut()
            .ok_or_else(|| std::io::Error::other("client stream gone"))?;
        let out = &self.client_out;
        let write = async {
            client.write_all(out).await?;
            client.flush().await
        };
        let result = match timeout(self.settings.smtp.write_timeout, write).await {
            Ok(result) => result,
            // A client that stops reading is gone as far as the session goes.
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "client does not read its replies",
            )),
        };
        self.client_out.clear();
        result
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

    /// Reads more of a message's bytes within `data_timeout`, and within
    /// the transaction's time with its client as `pace` says; ends early
    /// if `eviction` (of the message's spool copy) is set.
    async fn read_message_data(
        &mut self,
        data_timeout: Duration,
        pace: MessagePace,
        credit: &mut DataCredit,
        eviction: Option<&Latch>,
    ) -> std::io::Result<MessageRead> {
        self.flush_client().await?;
        let settings = self.settings.clone();
        let smtp = &settings.smtp;
        let waiting_since = tokio::time::Instant::now();
        let result = loop {
            let slots = self.ctx.backend_slots.clone();
            let contended = slots.contended();
            let others_wait = slots.others_wait(self.source());
            let time_left = match pace {
                MessagePace::Spoolable => {
                    let base = if slots.scarce() {
                        SCARCE_WAIT.min(smtp.stress_command_timeout)
                    } else {
                        smtp.stress_command_timeout
                    };
                    Some(self.transaction_time_left(base))
                }
                MessagePace::Relayed => self.slot_contended(smtp).then_some(credit.left),
                MessagePace::Spooled => Some(credit.left),
            };
            let cut = time_left.is_some_and(|left| left < data_timeout);
            let deadline =
                waiting_since + time_left.map_or(data_timeout, |left| left.min(data_timeout));
            let Some(client) = self.client.as_mut() else {
                break Err(std::io::Error::other("client stream gone"));
            };
            self.input.reserve(READ_CHUNK);
            tokio::select! {
                read = timeout_at(deadline, client.read_buf(&mut self.input)) => break match read {
                    Ok(result) => result.map(MessageRead::Bytes),
                    Err(_) if cut && pace == MessagePace::Spoolable => Ok(MessageRead::SlotDue),
                    Err(_) => {
                        if cut {
                            self.shed("slow-transaction");
                        }
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "client data timeout",
                        ))
                    }
                },
                // Someone now waits for a slot: look at the budget again.
                () = contended, if !others_wait => {}
                () = async {
                    match eviction {
                        Some(latch) => latch.wait().await,
                        None => std::future::pending().await,
                    }
                } => break Ok(MessageRead::Evicted),
            }
        };
        let waited = waiting_since.elapsed();
        self.transaction.message_wait += waited;
        credit.spend(waited);
        result
    }

    /// The next line if the client's input holds one, without waiting;
    /// [`Input::Blocked`] instead once the source is blocked.
    fn buffered_input(&mut self) -> Option<Input> {
        let result = self.lines.next_line(&mut self.input)?;
        if self.source_blocked() {
            return Some(Input::Blocked);
        }
        Some(match result {
            // A bare CR could end the line early at some backend.
            Ok(line) if line.has_bare_cr() => Input::Nul,
            Ok(line) => Input::Line(line.text),
            Err(LineError::TooLong) => Input::TooLong,
            Err(LineError::Nul) => Input::Nul,
        })
    }

    /// Whether the source was blocked (enforced) since the session began.
    /// A session waiting for its client hears of a block at once
    /// ([`Self::read_line`]); one working through commands the client sent
    /// together (a burst of AUTHs, a pipelined group) asks here before each
    /// of them, so that a client with several sessions open gets no answer
    /// once any of them, or anything else, had it blocked.
    fn source_blocked(&self) -> bool {
        self.block_notice.listener.is_set() && self.blocks_apply()
    }

    /// Whether a block of the source ends this session: not in observe
    /// mode, and never for an allow-listed source (as at accept, and as in
    /// the kernel, where the allow list wins over any block covering it).
    fn blocks_apply(&self) -> bool {
        let policy = self.ctx.policy();
        policy.enforced() && !policy.is_allowlisted(self.source())
    }

    /// Ends the session of a blocked source: `421 4.7.0`, and nothing more.
    async fn end_blocked(&mut self) -> std::io::Result<Flow> {
        self.reply(&Reply::blocked("your address is blocked"))
            .await?;
        Ok(Flow::Close)
    }

    /// The next line, waiting for the client if none is buffered (the
    /// replies held for it are written first); the wait counts toward the
    /// open transaction's time with its client ([`Self::slot_time_left`]).
    async fn read_line(&mut self) -> Input {
        self.read_input(false).await
    }

    /// [`Self::read_line`] for the client's next command, every reply
    /// given: the backend is idle too, and between transactions a slot
    /// others wait for goes back ([`Self::yield_backend_slot`]).
    async fn read_command(&mut self) -> Input {
        self.read_input(true).await
    }

    async fn read_input(&mut self, next_command: bool) -> Input {
        let started = tokio::time::Instant::now();
        let input = self.wait_for_line(next_command).await;
        // A parked transaction holds no slot: its waits are not charged.
        if self.envelope.active && self.envelope.park != Park::Parked {
            self.transaction.envelope_wait += started.elapsed();
        }
        input
    }

    /// What is left of the envelope's time with its client while other
    /// sessions wait for a backend slot: [`SCARCE_WAIT`] of waits for its
    /// client in all, besides [`TIME_PER_RECIPIENT`] for the round trip of
    /// each recipient accepted. So a client that keeps its transaction open
    /// (a NOOP now and then) holds a backend process only while nobody
    /// needs it: keepers that took every slot while nobody waited are cut
    /// as soon as a sender waits, not seconds later. A source whose network
    /// was shed lately gets the same while slots are scarce (half or more
    /// in use), whether or not anyone waits: a keeper cut once does not
    /// take the slots again the moment they are free. A sender sends its
    /// envelope at once and never comes near it.
    fn slot_time_left(&self, smtp: &crate::config::Smtp) -> Option<Duration> {
        let slots = &self.ctx.backend_slots;
        let dear = self.slot_contended(smtp)
            || (self.backend.is_some()
                && smtp.stress_command_timeout < smtp.command_timeout
                && slots.scarce()
                && slots.shed_lately(self.source()));
        dear.then(|| self.transaction_time_left(SCARCE_WAIT.min(smtp.stress_command_timeout)))
    }

    /// Whether the session holds a backend slot other sessions wait for
    /// (and stress timeouts are on).
    fn slot_contended(&self, smtp: &crate::config::Smtp) -> bool {
        self.backend.is_some()
            && smtp.stress_command_timeout < smtp.command_timeout
            && self.ctx.backend_slots.others_wait(self.source())
    }

    /// What is left of the transaction's time with its client (`base`),
    /// slot or not ([`Self::slot_time_left`]), after the waits so far.
    fn transaction_time_left(&self, base: Duration) -> Duration {
        base.saturating_sub(self.transaction.charged_wait())
    }

    /// How long the client may keep the session waiting now: a session
    /// outside a transaction (before its first MAIL, or between
    /// transactions: a MAIL accepted once is no pass to idle) gets
    /// `smtp.stress_command_timeout` under stress (`true`), else
    /// `smtp.command_timeout`.
    fn wait_limit(&self) -> (bool, Duration) {
        let smtp = &self.settings.smtp;
        if self.stress_applies() && self.ctx.stressed(smtp) {
            (true, smtp.stress_command_timeout)
        } else {
            (false, smtp.command_timeout)
        }
    }

    /// Whether the session waits like an idle one: outside a transaction,
    /// or with its transaction parked (it holds no backend slot).
    fn stress_applies(&self) -> bool {
        let smtp = &self.settings.smtp;
        (!self.envelope.active || self.envelope.park == Park::Parked)
            && smtp.stress_command_timeout < smtp.command_timeout
    }

    /// Parks the transaction ([`Park`]) when its time on a backend slot
    /// others need ran out while it waited for its client: the slot goes
    /// to the next in turn at once, the backend connection closes (QUIT, in
    /// the background), and the session stays. It answers NOOP, HELP, RSET
    /// and QUIT itself, waits like an idle session (the stress timeout
    /// under stress), and is shed at `smtp.max_sessions` after the idle
    /// sessions without a MAIL; its next RCPT or DATA takes the transaction
    /// up on a new connection. So a client that keeps its envelope open
    /// costs the backend one session, not one every time it is cut and
    /// comes back. Whether it did: once per transaction, with nothing
    /// pending, on a connection the session earned and holds no login on
    /// (a new connection would not have it).
    fn park(&mut self) -> bool {
        if self.envelope.park != Park::Never || !self.pipeline.is_empty() || !self.yields_backend()
        {
            return false;
        }
        let Some(mut backend) = self.backend.take() else {
            return false;
        };
        // Counted before the slot goes: its next holder may be done at once.
        self.ctx.stats.count_parked("parked");
        backend.give_back_slot();
        tokio::spawn(backend.quit());
        self.envelope.park = Park::Parked;
        // Taken up again, it has its time on the new slot afresh.
        self.transaction.envelope_wait = Duration::ZERO;
        self.registration = Some(self.ctx.sessions.register_parked(self.started));
        // As for a session shed: while slots are scarce its time on the
        // next one is short (its network waits behind the others), and a
        // client that starts transaction after transaction only to hold
        // each is blocked like one that comes back each time it is shed.
        self.ctx.backend_slots.mark_shed(self.source());
        self.count_toward_shed_limit();
        tracing::info!(
            source = %self.peer.ip(),
            recipients = self.envelope.recipients.len(),
            "transaction parked: its backend slot went to a session that needed one"
        );
        true
    }

    /// Whether a wait at `limit` ([`Self::wait_limit`]) should look at the
    /// load again after `smtp.stress_command_timeout`
    /// ([`look_again_after`]): while the stress timeout could apply but
    /// does not yet, so that a zombie idle from before a flood gets it soon
    /// after the flood comes (measured from the start of its wait).
    fn stress_may_come(&self, stress: bool) -> Option<Duration> {
        (!stress && self.stress_applies()).then_some(self.settings.smtp.stress_command_timeout)
    }

    async fn wait_for_line(&mut self, next_command: bool) -> Input {
        if let Some(input) = self.buffered_input() {
            return input;
        }
        if self.flush_client().await.is_err() {
            return Input::Closed;
        }
        let settings = self.settings.clone();
        let smtp = &settings.smtp;
        let mut shed = self.registration.as_ref().map(|r| r.entry.clone());
        let notice = self.block_notice.listener.clone();
        // The wait is measured from here: a wake-up that is not for this
        // session (another source's block) must not start it afresh, or a
        // zombie would live as long as anything gets blocked often enough.
        let mut waiting_since = tokio::time::Instant::now();
        loop {
            let (stress, limit) = self.wait_limit();
            let look_again = self.stress_may_come(stress);
            // Listening first: a session that starts waiting for a slot
            // after the budget was looked at still wakes this one.
            let slots = self.ctx.backend_slots.clone();
            let contended = slots.contended();
            // Between transactions, idle: a slot others wait for goes back.
            let between = next_command && !self.envelope.active && self.pipeline.is_empty();
            if between {
                self.yield_backend_slot().await;
            }
            let holds_idle_slot = between && self.yields_backend();
            let slot_left = self
                .envelope
                .active
                .then(|| self.slot_time_left(smtp))
                .flatten();
            let slot_cut = slot_left.is_some_and(|left| left < limit);
            let deadline = waiting_since + slot_left.map_or(limit, |left| left.min(limit));
            if let Some(input) = self.buffered_input() {
                return input;
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
                read = timeout_at(deadline, client.read_buf(&mut self.input)) => match read {
                    Ok(Ok(0)) | Ok(Err(_)) => Some(Input::Closed),
                    Ok(Ok(_)) => None,
                    Err(_) => {
                        if slot_cut && self.park() {
                            if self.source_blocked() {
                                // Parked once too often.
                                Some(Input::Blocked)
                            } else {
                                // It waits as an idle session from now on.
                                shed = self.registration.as_ref().map(|r| r.entry.clone());
                                waiting_since = tokio::time::Instant::now();
                                None
                            }
                        } else if slot_cut {
                            self.shed("slow-transaction");
                            Some(Input::Timeout)
                        } else {
                            if stress {
                                self.shed("stress-timeout");
                            }
                            Some(Input::Timeout)
                        }
                    }
                },
                // Someone now waits for a slot: look at the budget again.
                () = contended, if (self.envelope.active && self.backend.is_some() || holds_idle_slot) && slot_left.is_none() => None,
                () = look_again_after(look_again) => None,
                () = shed_order => Some(Input::Shed),
                _ = self.shutdown.changed() => Some(Input::Shutdown),
                // A block that does not end the session (observe mode, an
                // allow-listed client) is heard once, not on every turn.
                () = async {
                    if notice.is_set() {
                        std::future::pending().await
                    } else {
                        notice.wait().await
                    }
                } => self.blocks_apply().then_some(Input::Blocked),
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

/// Resolves after `interval`, or never if there is none.
async fn look_again_after(interval: Option<Duration>) {
    match interval {
        Some(interval) => tokio::time::sleep(interval).await,
        None => std::future::pending().await,
    }
}

/// The reply for a policy refusal: a fixed text per reason (the details,
/// such as counts and the pattern that matched, go to the log only).
pub(super) fn rejection_reply(rejection: &Rejection) -> Reply {
    let text = match &rejection.reason {
        Reason::RejectList { .. } => "Service unavailable; client host rejected",
        Reason::TooManyConnections { .. } => "Error: too many connections from your address",
        Reason::ConnectionRate { .. } => {
            "Error: too many connections from your address, try again later"
        }
        Reason::ConnectionRateFromNetwork { .. } => {
            "Error: too many connections from your network, try again later"
        }
        Reason::StateFull { .. } => "Error: server busy, try again later",
        Reason::HeloRejected { .. } => "Helo command rejected: Access denied",
        Reason::TooManyForHelo { .. } => "Error: too many connections for your HELO name",
        Reason::NullSenderRate {
            scope: RateScope::Recipient(_),
            ..
        } => "Error: too many bounces to this recipient, try again later",
        Reason::NullSenderRate { .. } => {
            "Error: too many messages with a null sender, try again later"
        }
        Reason::RelayDenied => "Relay access denied",
        Reason::Harvest { .. }
        | Reason::HarvestAcrossSessions { .. }
        | Reason::HostHarvested { .. } => "Error: too many invalid recipients, try again later",
        Reason::HarvestFromNetwork { .. } => {
            "Error: too many invalid recipients from your network, try again later"
        }
        Reason::AuthFailures { .. } | Reason::HostSprayed { .. } => {
            "Error: too many failed authentications, try again later"
        }
        Reason::AuthFailuresFromNetwork { .. } => {
            "Error: too many failed authentications from your network, try again later"
        }
        Reason::FilterRejects { .. } => "Error: too many rejected messages, try again later",
        Reason::ShedSessions { .. } => "Error: too many idle sessions, try again later",
        // RFC 4954's temporary failure: the credentials were not checked.
        Reason::AccountLocked { .. } => return Reply::account_locked(),
    };
    match rejection.action {
        Action::DeferCommand => Reply::policy_deferred(text),
        Action::RefuseCommand => Reply::policy_refused(text),
        Action::DeferAndClose => Reply::policy_deferred_closing(text),
        Action::RefuseAndClose => Reply::policy_refused_closing(text),
    }
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::DeferCommand => "defer",
        Action::RefuseCommand => "reject",
        Action::DeferAndClose => "defer-and-close",
        Action::RefuseAndClose => "reject-and-close",
    }
}
