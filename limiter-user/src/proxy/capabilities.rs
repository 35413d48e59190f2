//! What the backend offers, learned by a probe session, so that the proxy
//! can greet and answer EHLO itself (`backend.connect = "on-mail"`) the way
//! the backend would.
//!
//! The probe connects like a session (the identity header naming the
//! proxy's own connection; STARTTLS first when `backend.starttls`), reads
//! the greeting, says EHLO with the proxy's name and QUIT. It runs when the
//! proxy starts and every `backend.probe_interval`; a failed probe keeps
//! what was learned before. Until a probe succeeds, the proxy greets with
//! its own name and offers [`crate::smtp::ehlo::default_capabilities`].

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{backend::Backend, backend::BackendError, ProxyContext};
use crate::smtp::reply::Reply;

/// What a probe learned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The backend's greeting (220).
    pub greeting: Reply,
    /// The backend's EHLO reply (250, unfiltered).
    pub ehlo: Reply,
}

/// The capabilities known now, and whether the first probe is over.
pub struct Capabilities {
    learned: std::sync::RwLock<Option<Learned>>,
    probed: watch::Sender<bool>,
    /// Wakes the probe loop before its interval is over (a reload may name
    /// another backend).
    probe_now: tokio::sync::Notify,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            learned: std::sync::RwLock::new(None),
            probed: watch::channel(false).0,
            probe_now: tokio::sync::Notify::new(),
        }
    }
}

impl Capabilities {
    /// What the last successful probe learned.
    #[must_use]
    pub fn learned(&self) -> Option<Learned> {
        self.learned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a probe's outcome (a failure keeps what was learned before).
    pub fn record(&self, outcome: Option<Learned>) {
        if let Some(learned) = outcome {
            *self.learned.write().unwrap_or_else(|p| p.into_inner()) = Some(learned);
        }
        self.probed.send_replace(true);
    }

    /// Has the next probe run now instead of after `backend.probe_interval`.
    pub fn probe_soon(&self) {
        self.probe_now.notify_one();
    }

    /// Whether the first probe is over (successful or not).
    #[must_use]
    pub fn probed(&self) -> bool {
        *self.probed.borrow()
    }

    /// What was learned, once the first probe is over (at most `limit`).
    pub async fn after_first_probe(&self, limit: Duration) -> Option<Learned> {
        let mut probed = self.probed.subscribe();
        let _ = tokio::time::timeout(limit, probed.wait_for(|done| *done)).await;
        self.learned()
    }
}

/// One probe session.
///
/// # Errors
/// The backend cannot be reached, refuses, or does not answer in time.
pub async fn probe(ctx: &ProxyContext) -> Result<Learned, BackendError> {
    let settings = ctx.settings();
    let limit = settings.backend.connect_timeout.saturating_mul(2);
    tokio::time::timeout(limit, async {
        let (mut backend, greeting) = Backend::connect(&settings.backend, None).await?;
        let ehlo = backend
            .command(format!("EHLO {}", settings.hostname).as_bytes())
            .await?;
        backend.quit().await;
        if !ehlo.is_positive_completion() {
            return Err(BackendError::Malformed(format!(
                "EHLO refused: {} {}",
                ehlo.code,
                ehlo.text()
            )));
        }
        Ok(Learned { greeting, ehlo })
    })
    .await
    .map_err(|_| BackendError::Timeout(limit))?
}

/// Probes now and every `backend.probe_interval`, for as long as the task
/// lives. A probe takes a backend slot when one is free at once, and is
/// skipped (what was learned stays) when none is: a full backend is busy.
pub async fn run_probes(ctx: Arc<ProxyContext>) {
    let mut first = true;
    loop {
        let slot = if first {
            None
        } else {
            match ctx
                .backend_slots
                .try_acquire(std::net::Ipv4Addr::LOCALHOST.into())
            {
                Some(slot) => Some(slot),
                None => {
                    tokio::time::sleep(ctx.settings().probe_interval).await;
                    continue;
                }
            }
        };
        let outcome = match probe(&ctx).await {
            Ok(learned) => {
                if first || ctx.capabilities.learned().as_ref() != Some(&learned) {
                    tracing::info!(
                        capabilities = %learned.ehlo.lines.iter().skip(1).cloned().collect::<Vec<_>>().join(", "),
                        "backend capabilities learned"
                    );
                }
                Some(learned)
            }
            Err(e) => {
                tracing::warn!(error = %e, "backend probe failed; EHLO answered from what was learned before");
                None
            }
        };
        drop(slot);
        ctx.capabilities.record(outcome);
        first = false;
        tokio::select! {
            () = tokio::time::sleep(ctx.settings().probe_interval) => {}
            () = ctx.capabilities.probe_now.notified() => {}
        }
    }
}
