//! DATA: the message streamed to the backend, or held for the content
//! filters, or taken in by the proxy alone once a slow client gave its
//! backend slot back (the spool, [`super::super::spool`]); the end of DATA
//! answered only as the backend answered it.

use super::{pipeline::Outlook, *};
use crate::proxy::spool::{Eviction, Push, SpoolCopy};

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn data(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        // Last of a pipelined group: sent with it, and settled after the
        // replies before it (data_answered), unless the content filters
        // must know the recipients before anything is said.
        if !self.pipeline.is_empty() {
            if self.ctx.filters.is_none()
                && self.pipeline.outlook(self.envelope.active) != Outlook::Inactive
            {
                self.pipeline.relay(line, Step::Data);
                let flow = self.flush_pipeline().await?;
                let open = std::mem::take(&mut self.data_open);
                if flow == Flow::Close || self.closing {
                    if open {
                        // It waits for a message that will not come.
                        self.backend = None;
                    }
                    return Ok(Flow::Close);
                }
                if open {
                    return self.receive_message(MessageSink::Backend).await;
                }
                return Ok(Flow::Continue);
            }
            if self.flush_pipeline().await? == Flow::Close || self.closing {
                return Ok(Flow::Close);
            }
        }
        // DATA goes to the backend only inside a transaction the proxy saw
        // and judged, in this TLS state: never under an envelope given
        // before STARTTLS, never without an accepted recipient.
        if !self.envelope.active {
            // Postfix's words, MAIL or not.
            self.reply(&Reply::bad_sequence_because("need RCPT command"))
                .await?;
            return Ok(Flow::Continue);
        }
        if self.envelope.recipients.is_empty() {
            self.reply(&Reply::no_valid_recipients()).await?;
            return Ok(Flow::Continue);
        }
        // A parked transaction is taken up first, while its envelope says
        // it is one.
        if self.envelope.park == Park::Parked {
            if let Err(e) = self.ensure_backend().await {
                return self.backend_failed(e).await;
            }
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
            // The proxy says 354 first (the client's round trip is the
            // longer one), then sends DATA: the message goes on only after
            // the backend's own 354 (Postfix drops a client that sends the
            // message before), and the end of DATA gets the backend's
            // refusal of DATA if it refused, 451 if it failed.
            None if self.backend.is_some() => {
                self.reply(&Reply::start_mail_input()).await?;
                if let Err(e) = self.backend_send(b"DATA\r\n").await {
                    self.note_backend_error(&e);
                    MessageSink::Discard(Reply::backend_lost_in_transaction())
                } else {
                    MessageSink::Opening
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

    /// The backend's reply to a pipelined DATA, at its turn: relayed if
    /// the transaction has an accepted recipient (354: the message
    /// follows); otherwise the proxy's refusal, or the backend's own.
    pub(super) async fn data_answered(&mut self, reply: Reply) -> std::io::Result<Flow> {
        if !self.envelope.active || self.envelope.recipients.is_empty() {
            let refusal = if reply.is_transient() || reply.is_permanent() {
                reply
            } else {
                if reply.code == 354 {
                    // It waits for a message the proxy will not send.
                    self.backend = None;
                }
                if self.envelope.active {
                    Reply::no_valid_recipients()
                } else {
                    Reply::bad_sequence_because("need RCPT command")
                }
            };
            self.reply(&refusal).await?;
            return Ok(Flow::Continue);
        }
        self.envelope = Envelope::default();
        self.data_open = reply.code == 354;
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// Reads the backend's reply to DATA (sent once the proxy answered 354
    /// itself): the sink for the message.
    async fn opened(&mut self) -> Result<MessageSink, BackendError> {
        let reply = match self.backend.as_mut() {
            Some(backend) => backend.read_reply().await?,
            None => return Err(BackendError::Closed),
        };
        if reply.code == 354 {
            return Ok(MessageSink::Backend);
        }
        tracing::info!(source = %self.peer.ip(), code = reply.code, "backend refused DATA after the proxy's 354");
        if reply.code == 421 {
            self.backend = None;
        }
        Ok(MessageSink::Refused(reply))
    }

    /// Reads the message after DATA's 354 to its end marker, sending it on
    /// as `sink` says, and answers the end of DATA.
    pub(super) async fn receive_message(&mut self, mut sink: MessageSink) -> std::io::Result<Flow> {
        let smtp = &self.settings.smtp;
        let (max_size, data_timeout) = (smtp.max_message_size, smtp.data_timeout);
        let mut scanner = DataScanner::new(smtp.max_data_line_length);
        let mut out = Vec::with_capacity(READ_CHUNK + 8);
        // A copy of what goes to the backend, for a slow client to give its
        // slot back mid-message (`backend.spool_size`); only where a new
        // connection may take up the transaction (see `yields_backend`).
        let mut copy = if matches!(sink, MessageSink::Backend | MessageSink::Opening)
            && self.yields_backend()
        {
            self.ctx
                .spool
                .copy(self.ctx.backend_slots.group(self.source()))
        } else {
            None
        };
        let full = smtp.stress_command_timeout;
        let mut credit = DataCredit::new(full, self.transaction.charged_wait());
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
            if scanner.message_size() > max_size
                && !matches!(sink, MessageSink::Discard(_) | MessageSink::Refused(_))
            {
                // Over the limit: the backend must not store a truncated
                // message, so its connection goes (it aborts the transaction).
                if matches!(sink, MessageSink::Backend | MessageSink::Opening) {
                    self.backend = None;
                }
                sink = MessageSink::Discard(Reply::message_too_big());
                copy = None;
            }
            let end = matches!(progress, DataProgress::End { .. });
            // The backend's 354 before the first byte of the message.
            if matches!(sink, MessageSink::Opening) && (!out.is_empty() || end) {
                sink = match self.opened().await {
                    Ok(sink) => sink,
                    Err(e) => return self.backend_failed_in_transaction(e).await,
                };
            }
            sink = match sink {
                MessageSink::Backend => match self.backend_send(&out).await {
                    Ok(()) => {
                        // Past the budget the message goes on without a
                        // copy (and cannot be spooled).
                        if copy.as_mut().is_some_and(|c| c.push(&out) != Push::Taken) {
                            copy = None;
                        }
                        MessageSink::Backend
                    }
                    Err(e) => return self.backend_failed_in_transaction(e).await,
                },
                MessageSink::Spooled => match copy.as_mut().map(|c| c.push(&out)) {
                    Some(Push::Taken) => MessageSink::Spooled,
                    Some(Push::Evicted) => return self.spool_evicted(copy.as_ref()).await,
                    _ => {
                        tracing::warn!(source = %self.peer.ip(), "backend.spool_size reached: the rest of a spooled message cannot be taken in");
                        copy = None;
                        MessageSink::Discard(Reply::spool_full())
                    }
                },
                MessageSink::Held { scan, held } => {
                    let pending = scanner.pending_marker_len();
                    self.hold(scan, held, &out, end, pending, scanner.message_size())
                        .await?
                }
                // Nothing to send yet (the 354 is read with the first byte).
                opening @ MessageSink::Opening => opening,
                discard @ (MessageSink::Discard(_) | MessageSink::Refused(_)) => discard,
            };
            match progress {
                DataProgress::NeedMore => {}
                DataProgress::End { .. } => {
                    return match sink {
                        MessageSink::Backend => self.end_of_data().await,
                        MessageSink::Spooled => self.deliver_spooled(copy.take()).await,
                        MessageSink::Held { scan, held } => self.judge_message(scan, held).await,
                        MessageSink::Discard(reply) => {
                            // The backend may still hold the envelope of a
                            // message it never got.
                            self.reset_backend_transaction().await;
                            self.reply(&reply).await?;
                            Ok(Flow::Continue)
                        }
                        // The backend refused DATA: its reply, as when it
                        // is relayed at once.
                        MessageSink::Refused(reply) => {
                            self.reply(&reply).await?;
                            Ok(Flow::Continue)
                        }
                        // An end is always read with its marker (`out`).
                        MessageSink::Opening => {
                            self.backend_failed_in_transaction(BackendError::Closed)
                                .await
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
            let read = loop {
                // A held message is its own copy; the backend has only its
                // envelope until the verdicts are in.
                let pace = match sink {
                    MessageSink::Spooled => MessagePace::Spooled,
                    MessageSink::Held { .. } if self.backend.is_none() => MessagePace::Spooled,
                    MessageSink::Held { .. } if self.yields_backend() => MessagePace::Spoolable,
                    MessageSink::Backend | MessageSink::Opening
                        if copy.is_some() && self.yields_backend() =>
                    {
                        MessagePace::Spoolable
                    }
                    _ => MessagePace::Relayed,
                };
                let eviction = copy.as_ref().map(SpoolCopy::eviction);
                match self
                    .read_message_data(data_timeout, pace, &mut credit, eviction.as_deref())
                    .await
                {
                    Ok(MessageRead::SlotDue) => {
                        self.give_slot_back_mid_message(scanner.message_size());
                        // Spooled, the message starts its time with its
                        // client afresh (MessagePace::Spooled).
                        credit = DataCredit::new(full, Duration::ZERO);
                        if let Some(copy) = &copy {
                            copy.mark_spooled();
                        }
                        if !matches!(sink, MessageSink::Held { .. }) {
                            sink = MessageSink::Spooled;
                        }
                    }
                    Ok(MessageRead::Evicted) => return self.spool_evicted(copy.as_ref()).await,
                    Ok(MessageRead::Bytes(n)) => {
                        credit.earn(n);
                        break Ok(n);
                    }
                    Err(e) => break Err(e),
                }
            };
            match read {
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

    /// A slow client's backend slot goes back in the middle of its message
    /// (to the next session waiting for one, if any): the backend
    /// connection closes (the backend drops the part it has), and the proxy
    /// takes in the rest alone ([`super::super::spool`]).
    fn give_slot_back_mid_message(&mut self, received: u64) {
        tracing::info!(
            source = %self.peer.ip(),
            received,
            "slow message: backend slot given back; the rest is spooled and the transaction replayed at its end"
        );
        self.ctx.spool.count_spooled();
        // As for a parked transaction: it held a slot others needed while
        // it waited for its client, so its network's next turns come after
        // those of networks that did not (tricklers from a thousand
        // networks would otherwise take a turn each before a new sender).
        // Not counted toward its source's block: a slow link is no abuse.
        self.ctx.backend_slots.mark_shed(self.source());
        self.backend = None;
    }

    /// The message's spool copy was evicted: for a faster message
    /// (`421 4.3.1`, shed as `spool-evicted`), or for a new client at
    /// `smtp.max_sessions` (`421 4.3.2`, `shed-slow-message`). The session
    /// ends.
    async fn spool_evicted(&mut self, copy: Option<&SpoolCopy>) -> std::io::Result<Flow> {
        let why = copy.and_then(SpoolCopy::evicted_for);
        let (reason, reply) = if why == Some(Eviction::SessionCap) {
            tracing::info!(source = %self.peer.ip(), "slow message dropped from the spool to make room for a new client at smtp.max_sessions");
            ("shed-slow-message", Reply::shed_slow_message())
        } else {
            tracing::info!(source = %self.peer.ip(), "slow message evicted from the full spool for a faster one");
            ("spool-evicted", Reply::spool_evicted())
        };
        self.shed(reason);
        self.reply(&reply).await?;
        Ok(Flow::Close)
    }

    /// The end of a spooled message: the transaction replayed on a new
    /// backend connection, then the message, then the backend's answer.
    async fn deliver_spooled(&mut self, copy: Option<SpoolCopy>) -> std::io::Result<Flow> {
        let Some(copy) = copy else {
            // Not reached: a spooled message always has its copy.
            return self
                .backend_failed_in_transaction(BackendError::Closed)
                .await;
        };
        // Whole, it waits for its replay and is not evicted any more.
        if !copy.seal() {
            return self.spool_evicted(Some(&copy)).await;
        }
        if let Err(reply) = self.open_backend_data().await {
            self.reply(&reply).await?;
            // After a 421 the session ends (`closing`).
            return Ok(Flow::Continue);
        }
        // The copy holds the end marker.
        if let Err(e) = self.backend_send(copy.wire()).await {
            return self.backend_failed_in_transaction(e).await;
        }
        drop(copy);
        self.end_of_data().await
    }

    /// Holds the next piece of a message being scanned (`wire`, ending with
    /// the end marker if `end`) and feeds it to the scanners. The end marker
    /// may arrive split over several reads: `held` keeps every byte as on
    /// the wire, and the scanners get only what is certainly content (not
    /// the last `pending` bytes, which may start the marker; the marker
    /// itself never). A message that grows past `filters.max_size` goes on
    /// unscanned from here: DATA to the backend, what was held, and the rest
    /// as it comes.
    pub(super) async fn hold(
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
    pub(super) async fn open_backend_data(&mut self) -> Result<(), Reply> {
        if self.backend.is_none() {
            self.replay_transaction().await?;
        }
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
    pub(super) async fn judge_message(
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
                // A content reject counts toward `filters.max_rejects` in
                // observe mode too, where the block is logged, not made.
                let decision = content_reject
                    .then(|| {
                        self.ctx.policy().filter_rejected(
                            &self.ctx.state,
                            self.source(),
                            Instant::now(),
                        )
                    })
                    .flatten();
                if let Some(decision) = &decision {
                    self.log_decision(&decision.verdict, decision.enforced);
                }
                if !enforced {
                    // Observe mode: the message goes on as it came.
                    return self.deliver_held(&held, &HeaderEdits::default()).await;
                }
                self.reset_backend_transaction().await;
                // The block before the reply: a client that reconnects on
                // reading it finds its SYNs dropped.
                let order = decision.and_then(|d| d.enforced.then_some(d.verdict.block).flatten());
                let closes = order.is_some();
                if let Some(order) = &order {
                    self.ctx.block(order);
                }
                self.reply(&reply).await?;
                return Ok(if closes { Flow::Close } else { Flow::Continue });
            }
        };
        self.deliver_held(&held, &edits).await
    }

    /// Sends a held message, with `edits`, to the backend and relays its
    /// answer to the end of DATA.
    pub(super) async fn deliver_held(
        &mut self,
        held: &[u8],
        edits: &HeaderEdits,
    ) -> std::io::Result<Flow> {
        if let Err(reply) = self.open_backend_data().await {
            self.reply(&reply).await?;
            // After a 421 the session ends (`closing`).
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
    pub(super) async fn end_of_data(&mut self) -> std::io::Result<Flow> {
        let reply = match self.backend.as_mut() {
            Some(backend) => backend.read_reply_within(DATA_END_TIMEOUT).await,
            None => Err(BackendError::Closed),
        };
        match reply {
            Ok(reply) => {
                if reply.is_positive_completion() {
                    self.summary.messages += 1;
                    self.ctx.stats.count_message();
                    self.ctx
                        .recent_senders
                        .record(self.source(), tokio::time::Instant::now());
                }
                tracing::info!(
                    source = %self.peer.ip(),
                    helo = self.helo.as_ref().map(|h| h.name.as_str()),
                    code = reply.code,
                    queue_id = reply.queue_id(),
                    action = if reply.is_positive_completion() { "delivered" } else { "backend-refused" },
                    "message end"
                );
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
    /// open after a message (or a client that idles after RSET) does not
    /// hold a backend process others need.
    pub(super) async fn yield_backend_slot(&mut self) {
        if self.yields_backend() && self.ctx.backend_slots.others_wait(self.source()) {
            if let Some(backend) = self.backend.take() {
                tracing::debug!(source = %self.peer.ip(), "backend slot given back between transactions");
                backend.quit().await;
            }
        }
    }

    /// Whether this session's backend connection could be given back
    /// between transactions: it holds one, earned (`"on-mail"`), and the
    /// backend holds no login of the client's (a new connection would
    /// not).
    pub(super) fn yields_backend(&self) -> bool {
        self.backend.is_some() && self.earns_backend() && !self.authenticated
    }

    /// What the scanners are told about the message in `envelope`.
    pub(super) fn filter_envelope(&self, envelope: Envelope, filters: &Filters) -> FilterEnvelope {
        FilterEnvelope {
            client: self.source(),
            helo: self.helo.as_ref().map(|h| h.name.clone()),
            sender: envelope.sender,
            recipients: envelope.recipients,
            queue_id: filters.queue_id(),
        }
    }
}
