//! Pipelining end to end (RFC 2920): the MAIL, RCPT, RSET and DATA a client
//! sent together reach the backend in one write, and the replies go back to
//! the client in order, in one write.
//!
//! Each of these commands is judged when it is read. A relayed one has its
//! line queued ([`Pipeline::relay`]); a reply of the proxy's own waits for
//! its turn behind the replies still pending ([`Step::Reply`]). The group
//! is sent when the client has no more commands buffered, at DATA (last in
//! a group), or before any other command; the backend's replies are then
//! read in order and each command is settled at its turn: the envelope, the
//! counts and the policy's verdicts that depend on the backend's reply are
//! applied exactly as when commands come one at a time.
//!
//! A judgement never reads what a pending reply will change:
//! * a RCPT (or DATA) read while a MAIL is pending is relayed as if that
//!   MAIL will be accepted; at its turn, if it was not, the client gets what
//!   Postfix says (`503 5.5.1 Error: need MAIL command`) and nothing is
//!   counted ([`super::envelope`]);
//! * a RCPT's counts, logs and harvest verdict wait for its turn;
//! * a MAIL does not join a group holding a MAIL or RCPT (its judgement
//!   counts null senders, and a pending RCPT may end the session);
//! * a RCPT that could pass `smtp.max_recipients` waits for the pending
//!   RCPTs' replies;
//! * a command read while a MAIL is pending counts toward
//!   `smtp.max_commands_before_mail` at its turn, if that MAIL failed
//!   ([`Step::Count`]).
//!
//! Only an ESMTP session whose backend offered PIPELINING sends groups:
//! otherwise every command is settled before the next is read. The backend's
//! greeting and its reply to the replayed EHLO are always waited for
//! (Postfix flags a client that talks first or pipelines after EHLO, and
//! from 3.9 drops it: `smtpd_forbid_unauth_pipelining`).

use super::{envelope::RcptStep, *};

/// The group in progress.
#[derive(Default)]
pub(super) struct Pipeline {
    /// The relayed command lines, CRLF included, for one write.
    out: Vec<u8>,
    /// Every command's step, in the client's order.
    steps: Vec<Step>,
}

/// One step of the group, settled at its turn.
pub(super) enum Step {
    /// A command read while a MAIL was pending: it counts toward
    /// `smtp.max_commands_before_mail` if that MAIL was not accepted.
    Count,
    /// A reply of the proxy's own.
    Reply(Reply),
    /// A relayed MAIL FROM, with the sender it names (`None`: null sender),
    /// whether it is a bounce ([`Envelope::bounce`]), and the line the
    /// backend got.
    Mail {
        sender: Option<String>,
        bounce: bool,
        line: Vec<u8>,
    },
    /// A RCPT TO, relayed or refused by the proxy.
    Rcpt(Box<RcptStep>),
    /// The MAIL the proxy accepted on the backend's behalf, relayed before
    /// the first RCPT (`backend.connect = "on-rcpt"`): its reply is not the
    /// client's (it had the proxy's), but a refusal answers the
    /// transaction's RCPTs.
    OwedMail,
    /// A relayed RSET.
    Rset,
    /// A relayed DATA.
    Data,
}

impl Step {
    /// Whether a reply from the backend belongs to this step.
    fn relayed(&self) -> bool {
        match self {
            Step::Mail { .. } | Step::OwedMail | Step::Rset | Step::Data => true,
            Step::Rcpt(rcpt) => rcpt.relayed(),
            Step::Count | Step::Reply(_) => false,
        }
    }
}

impl Pipeline {
    pub(super) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub(super) fn push(&mut self, step: Step) {
        self.steps.push(step);
    }

    /// Queues `line` (without CRLF) for the backend, with its step.
    pub(super) fn relay(&mut self, line: &[u8], step: Step) {
        self.out.extend_from_slice(line);
        self.out.extend_from_slice(b"\r\n");
        self.steps.push(step);
    }

    /// Whether anything in the group waits for the backend.
    pub(super) fn has_relayed(&self) -> bool {
        self.steps.iter().any(Step::relayed)
    }

    /// Whether a MAIL is pending.
    pub(super) fn mail_pending(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Mail { .. }))
    }

    /// Relayed RCPTs pending.
    pub(super) fn rcpts_pending(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Rcpt(r) if r.relayed()))
            .count()
    }

    /// Whether the transaction a RCPT read now belongs to is a bounce, given
    /// whether the open one (`envelope`) is: the last pending MAIL decides.
    pub(super) fn bounce(&self, envelope: &Envelope) -> bool {
        match self.steps.iter().rev().find_map(|s| match s {
            Step::Mail { bounce, .. } => Some(*bounce),
            _ => None,
        }) {
            Some(bounce) => bounce,
            None => envelope.active && envelope.bounce,
        }
    }

    /// What the transaction will be once the pending replies are in, given
    /// whether one is open now: the last pending MAIL or RSET decides.
    pub(super) fn outlook(&self, active: bool) -> Outlook {
        match self
            .steps
            .iter()
            .rev()
            .find(|s| matches!(s, Step::Mail { .. } | Step::Rset))
        {
            Some(Step::Mail { .. }) => Outlook::Pending,
            Some(_) => Outlook::Inactive,
            None if active => Outlook::Active,
            None => Outlook::Inactive,
        }
    }

    /// The recipients the pending replies may add to the transaction, and
    /// whether it is a new one (a MAIL is pending).
    pub(super) fn recipients_pending(&self) -> (usize, bool) {
        let since_mail = self
            .steps
            .iter()
            .rposition(|s| matches!(s, Step::Mail { .. }));
        let from = since_mail.map_or(0, |i| i + 1);
        let count = self.steps[from..]
            .iter()
            .filter(|s| matches!(s, Step::Rcpt(r) if r.relayed()))
            .count();
        (count, since_mail.is_some())
    }
}

/// The transaction as it will be when the pending replies are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outlook {
    /// Open now, and nothing pending can change that.
    Active,
    /// A MAIL is pending: open if the backend accepts it.
    Pending,
    /// Not open (none now, or a RSET is pending).
    Inactive,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Whether commands go to the backend without waiting for the replies
    /// before them.
    pub(super) fn pipelining(&self) -> bool {
        self.backend_pipelining && self.helo.as_ref().is_some_and(|h| h.esmtp)
    }

    /// Sends the group in one write, reads the backend's replies in order
    /// and settles every step at its turn; the client's replies are written
    /// together at the end (unless it has more commands buffered). A step
    /// that ends the session ends the settling: what came after it is never
    /// answered; so does a block of the source, with `421 4.7.0` in place
    /// of the reply due (a blocked group is not sent at all).
    pub(super) async fn flush_pipeline(&mut self) -> std::io::Result<Flow> {
        if self.pipeline.is_empty() {
            return Ok(Flow::Continue);
        }
        let Pipeline { out, steps } = std::mem::take(&mut self.pipeline);
        let started = Instant::now();
        // A blocked source's group is not sent: it ends below.
        let mut sent = if out.is_empty() || self.source_blocked() {
            Ok(())
        } else {
            self.backend_send(&out).await
        };
        self.settling = true;
        let mut flow = Ok(Flow::Continue);
        for step in steps {
            if !matches!(flow, Ok(Flow::Continue)) || self.closing {
                break;
            }
            // Blocked meanwhile (by another session of the source, say):
            // nothing more is answered.
            if self.source_blocked() {
                flow = self.end_blocked().await;
                break;
            }
            let reply = if step.relayed() {
                let reply = match std::mem::replace(&mut sent, Ok(())) {
                    Ok(()) => self.read_backend_reply().await,
                    Err(e) => Err(e),
                };
                match reply {
                    Ok(reply) => {
                        self.ctx.stats.backend_latency.record(started.elapsed());
                        Some(reply)
                    }
                    Err(e) => {
                        flow = self.backend_failed(e).await;
                        continue;
                    }
                }
            } else {
                None
            };
            // Not even a reply that was on its way when the block came.
            if self.source_blocked() {
                flow = self.end_blocked().await;
                break;
            }
            flow = self.settle(step, reply).await;
        }
        self.settling = false;
        let flow = flow?;
        if !self.client_has_line() {
            self.flush_client().await?;
        }
        Ok(flow)
    }

    /// Settles one step at its turn; `reply` is the backend's, for a
    /// relayed step.
    async fn settle(&mut self, step: Step, reply: Option<Reply>) -> std::io::Result<Flow> {
        match (step, reply) {
            (Step::Count, _) => {
                if self.mail_accepted {
                    Ok(Flow::Continue)
                } else {
                    self.count_command_before_mail().await
                }
            }
            (Step::Reply(reply), _) => {
                self.reply(&reply).await?;
                Ok(Flow::Continue)
            }
            (
                Step::Mail {
                    sender,
                    bounce,
                    line,
                },
                Some(reply),
            ) => self.mail_answered(sender, bounce, line, reply).await,
            (Step::OwedMail, Some(reply)) => {
                if !reply.is_positive_completion() {
                    self.envelope.sender_refused = Some(reply);
                }
                Ok(Flow::Continue)
            }
            (Step::Rcpt(rcpt), reply) => self.rcpt_answered(*rcpt, reply).await,
            (Step::Rset, Some(reply)) => {
                self.envelope = Envelope::default();
                self.reply(&reply).await?;
                Ok(Flow::Continue)
            }
            (Step::Data, Some(reply)) => self.data_answered(reply).await,
            // A relayed step always has its reply (see flush_pipeline).
            (Step::Mail { .. } | Step::OwedMail | Step::Rset | Step::Data, None) => {
                self.backend_failed(BackendError::Closed).await
            }
        }
    }

    /// The backend's next reply.
    async fn read_backend_reply(&mut self) -> Result<Reply, BackendError> {
        match self.backend.as_mut() {
            Some(backend) => backend.read_reply().await,
            None => Err(BackendError::Closed),
        }
    }
}
