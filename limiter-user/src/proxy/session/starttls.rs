//! STARTTLS: the proxy's own; plaintext pipelined after it is discarded, and
//! the session starts over. The client's TLS handshake, after STARTTLS or
//! at once on an implicit-TLS listener.

use tokio_rustls::TlsAcceptor;

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
        if self.tls_handshake(acceptor).await.is_err() {
            return Ok(Flow::Close);
        }
        // RFC 3207: the session starts over; the client must EHLO again, and
        // nothing said in plaintext may carry over at the backend either.
        self.helo = None;
        self.envelope = Envelope::default();
        self.reset_backend_transaction().await;
        Ok(Flow::Continue)
    }

    /// The client's TLS handshake, within the command timeout, or
    /// `smtp.stress_command_timeout` under stress before a MAIL (as Postfix's
    /// `smtpd_starttls_timeout` follows its stress-dependent timeout), and
    /// shed at the session cap like an idle session: a client that never
    /// goes on with its handshake holds a session no longer than one that
    /// never sends a command. `Err` ends the session (nothing can be said
    /// to the client: it awaits TLS records).
    pub(super) async fn tls_handshake(
        &mut self,
        acceptor: TlsAcceptor,
    ) -> Result<(), &'static str> {
        let Some(ClientStream::Plain(plain)) = self.client.take() else {
            return Err("client-lost");
        };
        let shed = self.registration.as_ref().map(|r| r.entry.clone());
        if let Some(entry) = &shed {
            entry.set_idle(true);
        }
        let shed_order = async {
            match &shed {
                Some(entry) => entry.shed().await,
                None => std::future::pending().await,
            }
        };
        let mut shed_order = std::pin::pin!(shed_order);
        let mut handshake = std::pin::pin!(acceptor.accept(plain));
        let started = tokio::time::Instant::now();
        let outcome = loop {
            let (stress, limit) = self.wait_limit();
            let look_again = self.stress_may_come(stress);
            tokio::select! {
                handshake = &mut handshake => break match handshake {
                    Ok(tls) => {
                        self.client = Some(ClientStream::Tls(Box::new(tls)));
                        Ok(())
                    }
                    Err(e) => {
                        tracing::info!(source = %self.peer.ip(), error = %e, "TLS handshake failed");
                        Err("tls-failed")
                    }
                },
                () = tokio::time::sleep_until(started + limit) => {
                    if stress {
                        self.shed("stress-timeout");
                    }
                    break Err("timeout");
                }
                () = look_again_after(look_again) => {}
                () = &mut shed_order => {
                    self.shed(self.shed_at_cap_reason());
                    break Err("shed");
                }
            }
        };
        if let Some(entry) = &shed {
            entry.set_idle(false);
        }
        outcome
    }
}
