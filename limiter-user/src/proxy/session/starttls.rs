//! STARTTLS: the proxy's own; plaintext pipelined after it is discarded, and
//! the session starts over.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    pub(super) async fn starttls(&mut self, args: &str) -> std::io::Result<Flow> {
        let Some(acceptor) = self.ctx.tls().filter(|_| self.starttls && !self.is_tls()) else {
            self.reply(&Reply::command_not_implemented()).await?;
            return Ok(Flow::Continue);
        };
        if !args.trim().is_empty() {
            self.reply(&Reply::bad_arguments("Syntax: STARTTLS"))
                .await?;
            return Ok(Flow::Continue);
        }
        self.reply(&Reply::ready_to_start_tls()).await?;
        // Written now: what the client pipelined after it is thrown away.
        self.flush_client().await?;
        // Plaintext pipelined after STARTTLS must not be taken as coming
        // from inside TLS (CVE-2011-0411 and kin): throw it away.
        if !self.input.is_empty() {
            tracing::info!(source = %self.peer.ip(), bytes = self.input.len(), "discarded plaintext pipelined after STARTTLS");
            self.input.clear();
        }
        let Some(ClientStream::Plain(plain)) = self.client.take() else {
            return Ok(Flow::Close);
        };
        match timeout(self.settings.smtp.command_timeout, acceptor.accept(plain)).await {
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
}
