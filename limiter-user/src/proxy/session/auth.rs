//! AUTH: relayed to the backend (which checks the credentials), SASL
//! challenges and answers included; failures counted toward the AUTH limits
//! ([`refuses_credentials`]), per source, network and account; AUTH for an
//! account locked against the source is refused before the backend hears
//! its credentials.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn auth(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        // The account the exchange logs in as, read as the client's
        // messages pass: a locked account's credentials never reach the
        // backend ([`Self::refuse_locked_account`]).
        let (mut sasl, mut account) = SaslAccount::from_command(line);
        if let Some(name) = &account {
            if let Some(flow) = self.refuse_locked_account(name, false).await? {
                return Ok(flow);
            }
        }
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
                    // The backend waits for the answer to its challenge:
                    // the QUIT the session's end sends would be read as the
                    // client's credentials (Postfix logs an authentication
                    // failure for the client). Drop the connection, as the
                    // client dropped its own.
                    self.backend = None;
                    return Ok(Flow::Close);
                }
            };
            if account.is_none() {
                account = sasl.read(&answer);
                if let Some(name) = &account {
                    if let Some(flow) = self.refuse_locked_account(name, true).await? {
                        return Ok(flow);
                    }
                }
            }
            reply = match self.backend_command(&answer).await {
                Ok(reply) => reply,
                Err(e) => return self.backend_failed(e).await,
            };
        }
        let (policy, now) = (self.ctx.policy(), std::time::Instant::now());
        if refuses_credentials(&reply) {
            if let Some(decision) =
                policy.auth_failed(&self.ctx.state, self.source(), account.as_deref(), now)
            {
                if let Some(flow) = self.refuse(&decision.verdict, decision.enforced).await? {
                    return Ok(flow);
                }
            }
        } else if reply.is_positive_completion() {
            self.authenticated = true;
            if let Some(name) = &account {
                policy.auth_succeeded(&self.ctx.state, self.source(), name, now);
            }
        }
        // Blocked while the backend checked (by another session of the
        // source, say): no answer, right or wrong.
        if self.source_blocked() {
            return self.end_blocked().await;
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
    }

    /// AUTH for `account` while it is locked against this source
    /// ([`crate::policy::Policy::account_locked`]): `454 4.7.0` (or the
    /// source's block, when this guess takes it past its own limit), the
    /// credentials unheard. `in_exchange`: the backend is inside the SASL
    /// exchange and is told `*` (cancelled) first. `None`: not locked, or
    /// observe mode.
    async fn refuse_locked_account(
        &mut self,
        account: &str,
        in_exchange: bool,
    ) -> std::io::Result<Option<Flow>> {
        let Some(decision) = self.ctx.policy().account_locked(
            &self.ctx.state,
            self.source(),
            account,
            std::time::Instant::now(),
        ) else {
            return Ok(None);
        };
        if decision.enforced && in_exchange {
            // Its `501` is nobody's business; a backend that fails it is
            // dropped (the next command reconnects).
            if self.backend_command(b"*").await.is_err() {
                self.backend = None;
            }
        }
        self.refuse(&decision.verdict, decision.enforced).await
    }
}

/// Whether the backend refused the client's credentials: `535` (RFC 4954),
/// or the same refusal made temporary (Postfix with `soft_bounce = yes`
/// answers a wrong password `435 4.7.8`), i.e. any failure whose enhanced
/// code is `X.7.8`, "authentication credentials invalid". Other failures
/// (`454 4.7.0` temporary failure, `501` cancelled or bad base64) tested no
/// password.
pub(super) fn refuses_credentials(reply: &Reply) -> bool {
    matches!(reply.code, 435 | 535)
        || (reply.is_transient() || reply.is_permanent())
            && matches!(reply.enhanced(), Some((_, 7, 8)))
}
