//! The envelope: MAIL FROM, RCPT TO and RSET, judged by the policy when
//! read and relayed rebuilt from what the proxy parsed, then settled when
//! the backend's reply comes ([`super::pipeline`]). The first accepted MAIL
//! earns the backend connection.

use super::{pipeline::Outlook, *};

/// A RCPT as judged when it was read, settled at its turn
/// ([`Session::rcpt_answered`]): nothing of it counts before then.
pub(super) enum RcptStep {
    /// Not parsed: this reply, counted as a protocol error.
    Syntax(Reply),
    /// Past `smtp.max_recipients`.
    TooMany,
    /// Parsed and judged by the rules and the directory.
    Judged {
        rcpt: RcptTo,
        decision: Decision<RcptVerdict>,
        /// The directory of valid recipients does not know it.
        directory_refuses: bool,
        /// Relayed to the backend (neither rule nor directory refused it,
        /// or the proxy only observes).
        relayed: bool,
    },
}

impl RcptStep {
    pub(super) fn relayed(&self) -> bool {
        matches!(self, RcptStep::Judged { relayed: true, .. })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// MAIL FROM. The backend gets the line rebuilt from what the proxy
    /// parsed ([`mail_line`]), never the client's bytes; its reply is
    /// settled by [`Self::mail_answered`].
    pub(super) async fn mail(&mut self, args: &str) -> std::io::Result<Flow> {
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
            .is_some_and(|size| size > self.settings.smtp.max_message_size)
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
        let line = mail_line(&mail);
        if self.backend.is_none()
            && self
                .settings
                .connect
                .holds_mail(mail.counts_as_null_sender())
        {
            // Held: the first RCPT relayed earns the connection and takes
            // this line with it. Nothing is relayed before it (there is no
            // backend), so the proxy's replies due before this one go first.
            if self.flush_pipeline().await? == Flow::Close || self.closing {
                return Ok(Flow::Close);
            }
            let bounce = mail.counts_as_null_sender();
            let flow = self
                .mail_answered(mail.sender, bounce, line.clone(), Reply::sender_ok())
                .await?;
            self.envelope.owed_mail = Some(line);
            return Ok(flow);
        }
        // The first accepted MAIL earns the backend connection.
        if let Err(e) = self.ensure_backend_to_start().await {
            return self.backend_failed(e).await;
        }
        self.pipeline.relay(
            &line,
            Step::Mail {
                bounce: mail.counts_as_null_sender(),
                sender: mail.sender,
                line: line.clone(),
            },
        );
        Ok(Flow::Continue)
    }

    /// The backend's reply to a MAIL: an accepted one opens the
    /// transaction, and the session is a sender from then on.
    pub(super) async fn mail_answered(
        &mut self,
        sender: Option<String>,
        bounce: bool,
        line: Vec<u8>,
        reply: Reply,
    ) -> std::io::Result<Flow> {
        if reply.is_positive_completion() {
            self.envelope = Envelope {
                active: true,
                sender,
                bounce,
                ..Envelope::default()
            };
            // A sender: no longer among the sessions shed under pressure.
            self.mail_accepted = true;
            self.registration = None;
            self.transaction = Transaction {
                lines: vec![line],
                ..Transaction::default()
            };
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// RSET: answered by the proxy while the session has no backend
    /// connection (and nothing pending), relayed otherwise; the transaction
    /// ends either way.
    pub(super) async fn rset(&mut self) -> std::io::Result<Flow> {
        if self.backend.is_none() && self.pipeline.is_empty() && self.earns_backend() {
            self.envelope = Envelope::default();
            self.reply(&Reply::ok()).await?;
            return Ok(Flow::Continue);
        }
        if let Err(e) = self.ensure_backend().await {
            return self.backend_failed(e).await;
        }
        self.pipeline.relay(b"RSET", Step::Rset);
        Ok(Flow::Continue)
    }

    /// RCPT TO. Rules read the canonical address (the domain the backend
    /// routes to); an address with a second routing target is refused like
    /// a relay attempt; the backend gets the line rebuilt from what the
    /// proxy parsed ([`rcpt_line`]). The judgement has no effect of its own:
    /// the counts and verdicts come at its turn ([`Self::rcpt_answered`]).
    pub(super) async fn rcpt(&mut self, args: &str) -> std::io::Result<Flow> {
        if self.pipeline.outlook(self.envelope.active) == Outlook::Inactive {
            self.reply(&Reply::bad_sequence_because("need MAIL command"))
                .await?;
            return Ok(Flow::Continue);
        }
        let max = self.settings.smtp.max_recipients as usize;
        let (pending, new_transaction) = self.pipeline.recipients_pending();
        let held = if new_transaction {
            0
        } else {
            self.envelope.recipients.len()
        };
        // Whether this one passes the limit depends on the pending replies.
        if pending > 0 && held + pending >= max && self.flush_pipeline().await? == Flow::Close {
            return Ok(Flow::Close);
        }
        let step = self.judge_rcpt(args);
        match &step {
            RcptStep::Judged {
                rcpt,
                relayed: true,
                ..
            } => {
                if let Err(e) = self.ensure_backend().await {
                    return self.backend_failed(e).await;
                }
                if let Some(mail) = self.envelope.owed_mail.take() {
                    self.pipeline.relay(&mail, Step::OwedMail);
                    // A backend without PIPELINING gets one command at a
                    // time.
                    if !self.pipelining()
                        && (self.flush_pipeline().await? == Flow::Close || self.closing)
                    {
                        return Ok(Flow::Close);
                    }
                }
                let line = rcpt_line(rcpt);
                self.pipeline.relay(&line, Step::Rcpt(Box::new(step)));
            }
            _ => self.pipeline.push(Step::Rcpt(Box::new(step))),
        }
        Ok(Flow::Continue)
    }

    /// What the proxy makes of a RCPT (no effect: see [`RcptStep`]).
    fn judge_rcpt(&self, args: &str) -> RcptStep {
        let rcpt = match parse_rcpt_to(args) {
            Ok(rcpt) => rcpt,
            Err(error) => {
                return RcptStep::Syntax(if error.is_parameter_error() {
                    Reply::bad_arguments("Bad RCPT parameter syntax")
                } else {
                    Reply::bad_recipient_syntax()
                })
            }
        };
        let (pending, new_transaction) = self.pipeline.recipients_pending();
        let held = if new_transaction {
            0
        } else {
            self.envelope.recipients.len()
        };
        if held + pending >= self.settings.smtp.max_recipients as usize {
            return RcptStep::TooMany;
        }
        let policy = self.ctx.policy();
        let decision = match rcpt.second_route {
            // Whatever the patterns say: the backend could route it beyond
            // the domain they were matched against.
            Some(_) => policy.relay_denied(),
            None => policy.rcpt(self.source(), &rcpt.canonical),
        };
        // A bounce the rules let through counts toward its recipient's
        // rate, whichever source sends it.
        let decision = match decision.verdict {
            RcptVerdict::Reject(_) => decision,
            _ if !self.pipeline.bounce(&self.envelope) => decision,
            _ => policy
                .bounce_rcpt(
                    &self.ctx.state,
                    self.source(),
                    self.helo.as_ref().map(|h| h.name.as_str()),
                    &rcpt.canonical,
                    Instant::now(),
                )
                .unwrap_or(decision),
        };
        // A directory of valid recipients refuses unknown ones without
        // asking the backend (allow-listed sources aside).
        let directory_refuses = match &decision.verdict {
            RcptVerdict::Reject(_) if decision.enforced => false,
            RcptVerdict::Accept => true,
            RcptVerdict::Unchecked => !policy.is_allowlisted(self.source()),
            RcptVerdict::Reject(_) => false,
        } && self
            .ctx
            .recipients
            .as_ref()
            .is_some_and(|r| r.check(&rcpt.canonical).refuses());
        let refused = matches!(decision.verdict, RcptVerdict::Reject(_)) && decision.enforced
            || directory_refuses && policy.enforced();
        RcptStep::Judged {
            rcpt,
            decision,
            directory_refuses,
            relayed: !refused,
        }
    }

    /// A RCPT at its turn: `reply` is the backend's if it was relayed.
    /// Outside a transaction (the MAIL before it failed) it gets Postfix's
    /// `503` and counts for nothing; otherwise the refusals are logged, and
    /// the outcome counted: a refusal for good is a harvest attempt, and so
    /// is a temporary "unknown user" (a backend that verifies recipients
    /// and could not finish); other temporary failures are neither.
    pub(super) async fn rcpt_answered(
        &mut self,
        step: RcptStep,
        backend_reply: Option<Reply>,
    ) -> std::io::Result<Flow> {
        if !self.envelope.active {
            self.reply(&Reply::bad_sequence_because("need MAIL command"))
                .await?;
            return Ok(Flow::Continue);
        }
        if let Some(refusal) = &self.envelope.sender_refused {
            // The backend refused the MAIL the proxy accepted for it: its
            // answer, for every recipient, counted as nothing.
            let refusal = refusal.clone();
            self.reply(&refusal).await?;
            return Ok(Flow::Continue);
        }
        let (rcpt, decision, directory_refuses) = match step {
            RcptStep::Syntax(reply) => {
                return self.protocol_error("bad-recipient-syntax", &reply).await
            }
            RcptStep::TooMany => {
                self.reply(&Reply::too_many_recipients()).await?;
                return Ok(Flow::Continue);
            }
            RcptStep::Judged {
                rcpt,
                decision,
                directory_refuses,
                ..
            } => (rcpt, decision, directory_refuses),
        };
        if let Some(route) = &rcpt.second_route {
            tracing::info!(source = %self.peer.ip(), recipient = %rcpt.canonical, routing = route.as_str(), "recipient with routing syntax");
        }
        let (reply, accepted) = match decision.verdict {
            RcptVerdict::Reject(rejection) if decision.enforced => {
                self.log_decision(&rejection, true);
                let reply = match (&rejection.reason, &rcpt.second_route) {
                    (Reason::RelayDenied, None) => Reply::relay_denied(),
                    (Reason::RelayDenied, Some(_)) => Reply::routing_refused(),
                    _ => rejection_reply(&rejection),
                };
                (reply, false)
            }
            verdict => {
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
                match backend_reply {
                    Some(reply) => {
                        let accepted = reply.is_positive_completion();
                        (reply, accepted)
                    }
                    None => (Reply::unknown_recipient_named(&rcpt.recipient), false),
                }
            }
        };
        let failed = !accepted && (reply.is_permanent() || is_unknown_user_deferral(&reply));
        if accepted {
            self.envelope.recipients.push(rcpt.canonical.clone());
            self.transaction.lines.push(rcpt_line(&rcpt));
            self.summary.rcpt_accepted += 1;
        } else if failed {
            self.summary.rcpt_failed += 1;
        }
        if accepted || failed {
            if let Some(flow) = self.count_recipient(accepted).await? {
                return Ok(flow);
            }
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// Counts a recipient the backend accepted or refused toward the
    /// harvest limits; the flow when that refuses the session.
    async fn count_recipient(&mut self, accepted: bool) -> std::io::Result<Option<Flow>> {
        let familiarity = if self.authenticated {
            Familiarity::LoggedIn
        } else {
            let recent = &self.ctx.recent_senders;
            match recent.first_delivery(self.source(), tokio::time::Instant::now()) {
                Some(first) => Familiarity::DeliveredSince(first.into_std()),
                None => Familiarity::Stranger,
            }
        };
        let verdict = self.ctx.policy().rcpt_result(
            &self.ctx.state,
            self.source(),
            &mut self.counters,
            accepted,
            familiarity,
            Instant::now(),
        );
        match verdict {
            Some(decision) => self.refuse(&decision.verdict, decision.enforced).await,
            None => Ok(None),
        }
    }

    /// VRFY or EXPN, relayed (`smtp.vrfy = "relay"`): they ask what RCPT
    /// asks, so an answer that the address does not exist counts as a
    /// failed recipient toward the harvest limits. A positive answer resets
    /// nothing: a harvester could otherwise clear its session's count with
    /// one known address between guesses.
    pub(super) async fn vrfy(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let reply = match self.backend_command(line).await {
            Ok(reply) => reply,
            Err(e) => return self.backend_failed(e).await,
        };
        if refuses_address(&reply) {
            if let Some(flow) = self.count_recipient(false).await? {
                return Ok(flow);
            }
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }
}

/// `MAIL FROM:<sender> params` as the backend gets it: rebuilt from what
/// the proxy parsed, so that the backend reads the sender the proxy judged
/// (every null-sender spelling becomes `<>`; a source route goes, as RFC
/// 5321 says it may).
pub(super) fn mail_line(mail: &MailFrom) -> Vec<u8> {
    let sender = mail.canonical.as_deref().or(mail.sender.as_deref());
    path_line("MAIL FROM:", sender.unwrap_or(""), &mail.params).into_bytes()
}

/// `RCPT TO:<recipient> params` as the backend gets it: the canonical
/// recipient the rules judged (domain without case or trailing dot; routing
/// syntax was refused before this).
pub(super) fn rcpt_line(rcpt: &RcptTo) -> Vec<u8> {
    path_line("RCPT TO:", &rcpt.canonical, &rcpt.params).into_bytes()
}

/// Whether a VRFY or EXPN answer says the address does not exist: a
/// failure with an address status (`X.1.x`, as Postfix's `550 5.1.1 …
/// User unknown`), or `550`/`551`/`553` without enhanced codes. A disabled
/// or refused command (`502 5.5.1`, `252`) says nothing about the address.
pub(super) fn refuses_address(reply: &Reply) -> bool {
    match reply.enhanced() {
        Some((_, 1, _)) => reply.is_permanent() || reply.is_transient(),
        Some(_) => false,
        None => matches!(reply.code, 550 | 551 | 553),
    }
}

/// A temporary failure that says the mailbox is unknown (`4.1.1`, e.g.
/// Postfix's "unverified address" while its probe is pending).
pub(super) fn is_unknown_user_deferral(reply: &Reply) -> bool {
    reply.is_transient() && matches!(reply.enhanced(), Some((4, 1, 1)))
}
