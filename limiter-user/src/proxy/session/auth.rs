//! AUTH: relayed to the backend (which checks the credentials), SASL
//! challenges and answers included; failures counted toward the AUTH limit
//! ([`refuses_credentials`]).

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn auth(&mut self, line: &[u8]) -> std::io::Result<Flow> {
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
            reply = match self.backend_command(&answer).await {
                Ok(reply) => reply,
                Err(e) => return self.backend_failed(e).await,
            };
        }
        if refuses_credentials(&reply) {
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
        // Blocked while the backend checked (by another session of the
        // source, say): no answer, right or wrong.
        if self.source_blocked() {
            return self.end_blocked().await;
        }
        self.reply(&reply).await?;
        Ok(Flow::Continue)
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
