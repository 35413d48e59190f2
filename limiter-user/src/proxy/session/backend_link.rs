//! The backend link: a fair backend slot, the connection with the client's
//! identity and HELO, commands relayed, a transaction replayed on a new
//! connection, and what the client is told when the backend fails or
//! refuses.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// XCLIENT needs an EHLO first (to learn that the backend offers it);
    /// afterwards the backend greets anew and the client's own EHLO follows.
    pub(super) async fn send_xclient(
        &mut self,
        helo: &str,
        esmtp: bool,
    ) -> Result<(), BackendError> {
        let (peer, proxy_name) = (self.peer, self.settings.hostname.clone());
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

    /// Opens the backend connection: a backend slot (waiting fairly for at
    /// most `wait`, a recent sender first), the connection, the identity
    /// header, the greeting. Returns the greeting.
    pub(super) async fn connect_backend(&mut self, wait: Duration) -> Result<Reply, BackendError> {
        let recent = self
            .ctx
            .recent_senders
            .contains(self.source(), tokio::time::Instant::now());
        let slot = self
            .ctx
            .backend_slots
            .acquire(self.source(), wait, recent)
            .await
            .map_err(|_| BackendError::NoSlot(wait))?;
        let (mut backend, greeting) =
            Backend::connect(&self.settings.backend, Some((self.peer, self.local))).await?;
        backend.hold_slot(slot);
        self.use_backend(backend);
        Ok(greeting)
    }

    /// A new backend connection, greeted, for this session.
    fn use_backend(&mut self, backend: Backend) {
        self.backend = Some(backend);
        self.xclient_sent = false;
        self.backend_pipelining = false;
    }

    /// Connects to the backend if the session has no connection (not
    /// earned yet, or dropped after an aborted message), or takes the one
    /// opened at accept ([`super::super::early`]); the client's HELO
    /// is replayed on the new connection, and a backend that refuses it
    /// gives the client its reply ([`BackendError::HeloRefused`]). Each step
    /// waits for its reply: nothing may come before the greeting, nor in
    /// the same group as EHLO.
    pub(super) async fn ensure_backend(&mut self) -> Result<(), BackendError> {
        self.ensure_backend_within(self.settings.slot_wait).await
    }

    /// [`Self::ensure_backend`] for a transaction to start (its first
    /// MAIL): [`Self::slot_wait_to_start`].
    pub(super) async fn ensure_backend_to_start(&mut self) -> Result<(), BackendError> {
        self.ensure_backend_within(self.slot_wait_to_start()).await
    }

    /// How long the session may wait for a backend slot to start a
    /// transaction (or, `"on-connect"`, the session itself):
    /// `backend.slot_wait`, and [`SHED_SLOT_WAIT`] at most for a network
    /// shed lately. A transaction under way (taken up after parking, a
    /// spooled message) waits `backend.slot_wait`.
    pub(super) fn slot_wait_to_start(&self) -> Duration {
        if self.ctx.backend_slots.shed_lately(self.source()) {
            self.settings.slot_wait.min(SHED_SLOT_WAIT)
        } else {
            self.settings.slot_wait
        }
    }

    /// Counts a session turned away for want of a backend slot after
    /// waiting `wait`. One that waited [`SHED_SLOT_WAIT`] (its network
    /// shed lately) counts toward its source's shed limit too: a keeper
    /// that reconnects each time it is turned away is blocked like one
    /// that comes back each time it is shed.
    pub(super) fn turned_away_for_a_slot(&self, wait: Duration) {
        self.ctx.count_shed(self.source(), "backend-slot-timeout");
        if wait < self.settings.slot_wait {
            self.count_toward_shed_limit();
        }
    }

    async fn ensure_backend_within(&mut self, wait: Duration) -> Result<(), BackendError> {
        if self.backend.is_some() {
            return Ok(());
        }
        let early = match self.early.take() {
            Some(early) => early.claim().await,
            None => None,
        };
        let mut sent_ahead = None;
        match early {
            Some(claimed) => {
                self.use_backend(claimed.backend);
                sent_ahead = claimed.helo;
            }
            None => {
                self.connect_backend(wait).await?;
            }
        }
        if let Some(helo) = self.helo.as_ref().map(|h| (h.name.clone(), h.esmtp)) {
            if self.settings.backend.identity == Identity::Xclient {
                self.send_xclient(&helo.0, helo.1).await?;
            }
            let reply = match sent_ahead {
                // The early connection sent this very HELO already.
                Some((name, esmtp, reply)) if name == helo.0 && esmtp == helo.1 => reply,
                _ => {
                    let verb = if helo.1 { "EHLO" } else { "HELO" };
                    let backend = self.backend.as_mut().ok_or(BackendError::Closed)?;
                    backend
                        .command(format!("{verb} {}", helo.0).as_bytes())
                        .await?
                }
            };
            if !reply.is_positive_completion() {
                return Err(BackendError::HeloRefused(reply));
            }
            self.backend_pipelining = helo.1 && offers_pipelining(&reply);
        }
        if self.envelope.park == Park::Parked {
            self.take_up_transaction().await?;
            self.envelope.park = Park::Resumed;
            // A sender again: no longer among the sessions shed.
            self.registration = None;
            self.ctx.stats.count_parked("resumed");
            tracing::debug!(source = %self.peer.ip(), "parked transaction taken up on a new backend connection");
        }
        Ok(())
    }

    /// Sends the transaction's MAIL and the RCPTs the backend accepted on
    /// this (new) connection, in one write if the backend pipelines. All
    /// must be accepted again: the client was told each of them was.
    async fn take_up_transaction(&mut self) -> Result<(), BackendError> {
        let lines = self.transaction.lines.clone();
        let replies = self.relay_all(&lines).await?;
        if let Some((line, reply)) = lines
            .iter()
            .zip(&replies)
            .find(|(_, reply)| !reply.is_positive_completion())
        {
            tracing::info!(
                source = %self.peer.ip(),
                command = %String::from_utf8_lossy(line),
                code = reply.code,
                "backend refused the transaction taken up on a new connection; the client is told to try later"
            );
            let reply = reply.clone();
            self.reset_backend_transaction().await;
            return Err(BackendError::TransactionRefused(reply));
        }
        Ok(())
    }

    /// Sends a command to the backend ([`Self::ensure_backend`] first) and
    /// reads its reply.
    pub(super) async fn backend_command(&mut self, line: &[u8]) -> Result<Reply, BackendError> {
        self.ensure_backend().await?;
        let backend = self.backend.as_mut().ok_or(BackendError::Closed)?;
        let started = Instant::now();
        let reply = backend.command(line).await;
        self.ctx.stats.backend_latency.record(started.elapsed());
        reply
    }

    pub(super) async fn backend_send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        match self.backend.as_mut() {
            Some(backend) => backend.send(bytes).await,
            None => Err(BackendError::Closed),
        }
    }

    /// Takes up the transaction on a new backend connection (a fair slot,
    /// the client's identity and HELO, as at its MAIL) for a spooled
    /// message ([`Self::take_up_transaction`]); the reply to give the
    /// client instead if that fails.
    pub(super) async fn replay_transaction(&mut self) -> Result<(), Reply> {
        if self.transaction.lines.is_empty() {
            return Err(Reply::backend_lost_in_transaction());
        }
        // Blocked while its message came: nothing of it goes on.
        if self.source_blocked() {
            return Err(Reply::blocked("your address is blocked"));
        }
        if let Err(e) = self.ensure_backend().await {
            if let BackendError::NoSlot(wait) = e {
                self.turned_away_for_a_slot(wait);
                return Err(Reply::no_backend_slot());
            }
            self.note_backend_error(&e);
            return Err(Reply::backend_lost_in_transaction());
        }
        match self.take_up_transaction().await {
            Ok(()) => Ok(()),
            Err(BackendError::TransactionRefused(_)) => Err(Reply::backend_lost_in_transaction()),
            Err(e) => {
                self.note_backend_error(&e);
                Err(Reply::backend_lost_in_transaction())
            }
        }
    }

    /// Sends `lines` to the backend and reads a reply to each: all in one
    /// write when it pipelines, else one by one up to the first refusal.
    async fn relay_all(&mut self, lines: &[Vec<u8>]) -> Result<Vec<Reply>, BackendError> {
        let pipelining = self.backend_pipelining;
        let backend = self.backend.as_mut().ok_or(BackendError::Closed)?;
        let mut replies = Vec::with_capacity(lines.len());
        if pipelining {
            let mut group = Vec::new();
            for line in lines {
                group.extend_from_slice(line);
                group.extend_from_slice(b"\r\n");
            }
            backend.send(&group).await?;
            for _ in lines {
                replies.push(backend.read_reply().await?);
            }
        } else {
            for line in lines {
                let reply = backend.command(line).await?;
                let refused = !reply.is_positive_completion();
                replies.push(reply);
                if refused {
                    break;
                }
            }
        }
        Ok(replies)
    }

    /// The backend failed or refused the session: the client gets the
    /// backend's own refusal when there is one (a greeting, XCLIENT or HELO
    /// refused with a 4xx/5xx), `421 4.3.2` when no backend slot came free,
    /// `421 4.3.0` otherwise. Never a 250.
    pub(super) async fn backend_failed(&mut self, error: BackendError) -> std::io::Result<Flow> {
        self.backend = None;
        let reply = match &error {
            BackendError::NoSlot(wait) => {
                self.turned_away_for_a_slot(*wait);
                Reply::no_backend_slot()
            }
            BackendError::Greeting(reply) | BackendError::HeloRefused(reply)
                if reply.is_transient() || reply.is_permanent() =>
            {
                tracing::info!(source = %self.peer.ip(), error = %error, "backend refused the session");
                reply.clone()
            }
            // The client was told its transaction was open: it is gone, and
            // the client may start it again.
            BackendError::TransactionRefused(_) => {
                self.envelope = Envelope::default();
                self.ctx.stats.count_parked("refused");
                Reply::backend_lost_in_transaction()
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
    pub(super) async fn reset_backend_transaction(&mut self) {
        if let Some(backend) = self.backend.as_mut() {
            if backend.command(b"RSET").await.is_err() {
                self.backend = None;
            }
        }
    }

    /// The backend failed during a message: counted, logged, connection
    /// dropped (a later command reconnects).
    pub(super) fn note_backend_error(&mut self, error: &BackendError) {
        tracing::warn!(source = %self.peer.ip(), error = %error, "backend failed during a message; not acknowledged");
        self.ctx.stats.count_backend_error();
        self.backend = None;
    }

    pub(super) async fn backend_failed_in_transaction(
        &mut self,
        error: BackendError,
    ) -> std::io::Result<Flow> {
        self.note_backend_error(&error);
        self.reply(&Reply::backend_lost_in_transaction()).await?;
        Ok(Flow::Close)
    }
}

/// Whether an EHLO reply offers PIPELINING.
pub(super) fn offers_pipelining(ehlo: &Reply) -> bool {
    parse_capabilities(ehlo).iter().any(|c| c == "PIPELINING")
}
