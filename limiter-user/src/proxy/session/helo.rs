//! The greeting stage's HELO/EHLO: the name made canonical and judged,
//! answered from the probe's capabilities before the backend connection is
//! earned, relayed after.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// HELO/EHLO. The name is canonical ([`canonical_helo`]: case,
    /// trailing dots, address literals) before any rule reads it, and the
    /// backend gets the same canonical name, so both judge one name.
    pub(super) async fn helo(&mut self, args: &str, esmtp: bool) -> std::io::Result<Flow> {
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
            let ehlo = learned.unwrap_or_else(|| default_capabilities(&self.settings.hostname));
            if esmtp {
                ehlo
            } else {
                Reply::helo_ok(ehlo_hostname(&ehlo).unwrap_or(&self.settings.hostname))
            }
        } else {
            let client_line =
                format!("{} {name}", if esmtp { "EHLO" } else { "HELO" }).into_bytes();
            if self.backend.is_none() {
                if let Err(e) = self.connect_backend(self.slot_wait_to_start()).await {
                    return self.backend_failed(e).await;
                }
            }
            if self.settings.backend.identity == Identity::Xclient && !self.xclient_sent {
                if let Err(e) = self.send_xclient(&name, esmtp).await {
                    return self.backend_failed(e).await;
                }
            }
            match self.backend_command(&client_line).await {
                Ok(reply) => {
                    self.backend_pipelining =
                        esmtp && reply.code == 250 && backend_link::offers_pipelining(&reply);
                    reply
                }
                Err(e) => return self.backend_failed(e).await,
            }
        };
        let reply = if esmtp && reply.code == 250 {
            filter_ehlo(
                &reply,
                &EhloOptions {
                    hostname: reply.lines.first().cloned().unwrap_or_default(),
                    offer_starttls: self.starttls && self.ctx.tls().is_some() && !self.is_tls(),
                    offer_auth: self.auth_allowed(),
                    offer_vrfy: self.settings.smtp.vrfy == Vrfy::Relay,
                    relay_verbs: self.settings.smtp.relay_verbs.clone(),
                    max_size: Some(self.settings.smtp.max_message_size),
                },
            )
        } else {
            reply
        };
        if reply.code == 250 {
            if let (None, Some(early)) = (&self.backend, self.early.as_mut()) {
                early.send_helo(&name, esmtp);
            }
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
}
