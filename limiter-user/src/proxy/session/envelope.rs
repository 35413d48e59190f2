//! The envelope: MAIL FROM and RCPT TO, judged by the policy and relayed
//! rebuilt from what the proxy parsed. The first accepted MAIL earns the
//! backend connection.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// MAIL FROM. The backend gets the line rebuilt from what the proxy
    /// parsed ([`mail_line`]), never the client's bytes.
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
    pub(super) async fn rcpt(&mut self, args: &str) -> std::io::Result<Flow> {
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

/// A temporary failure that says the mailbox is unknown (`4.1.1`, e.g.
/// Postfix's "unverified address" while its probe is pending).
pub(super) fn is_unknown_user_deferral(reply: &Reply) -> bool {
    reply.is_transient() && matches!(reply.enhanced(), Some((4, 1, 1)))
}
