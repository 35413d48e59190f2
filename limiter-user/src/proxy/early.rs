//! Early backend connections for recent senders
//! (`backend.early_connect = "recent-senders"`, the default).
//!
//! With `backend.connect = "on-mail"` the backend's own session start
//! (connect, identity header, greeting: a few hundred µs with Postfix, its
//! client lookups included) lands in the client's first MAIL. For a source
//! that delivered a message within the last hour, the connection is opened
//! at accept instead, while the proxy greets and answers EHLO itself, and
//! the client's HELO/EHLO goes to the backend as soon as the client sends
//! it, so that its MAIL waits for the MAIL only, as in a direct session. What keeps zombies
//! away from the backend still holds:
//! - only sources whose mail the backend accepted recently (a zombie that
//!   never delivers never gets one);
//! - only while fewer than half of `backend.max_connections` are in use:
//!   early connections never take the slots the other half keeps for
//!   sessions that earn theirs. Zombies holding the client sessions (the
//!   proxy under stress) do not stop them: that is when a known sender's
//!   mail needs its head start most, and the slots are what the rule
//!   guards;
//! - never for a source whose network had a session shed lately
//!   ([`super::slots::BackendSlots::shed_lately`]): a trusted source that
//!   turned zombie, or one beside zombies, earns its connection with MAIL;
//! - a connection that no MAIL (or AUTH, or relayed verb) claims within
//!   [`HOLD`] of accept is closed with QUIT and its slot given back, and
//!   the source is forgotten: it has to deliver again before its next one.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::oneshot,
    task::JoinHandle,
    time::{timeout_at, Instant},
};

use super::{backend::Backend, ProxyContext, Settings};
use crate::{
    config::{EarlyConnect, Identity},
    smtp::reply::Reply,
};

/// How long an early connection waits for its session to claim it, from
/// accept: long enough for a greeting, EHLO, STARTTLS and AUTH over a slow
/// link, short enough that a trusted source turned zombie holds little.
pub const HOLD: Duration = Duration::from_secs(5);
/// How long a delivery makes its source a recent sender.
pub const MEMORY: Duration = Duration::from_secs(60 * 60);
/// A recent sender's entry is renewed at most this often (each renewal
/// queues one more expiry entry).
const RENEW: Duration = Duration::from_secs(15 * 60);
/// Most sources remembered at once; past it the oldest are forgotten first.
pub const CAPACITY: usize = 32_768;

/// Sources whose mail the backend accepted within [`MEMORY`].
#[derive(Default)]
pub struct RecentSenders(Mutex<Recent>);

#[derive(Default)]
struct Recent {
    /// Each source's deliveries since it was last forgotten.
    senders: HashMap<IpAddr, Deliveries>,
    /// Recorded deliveries, oldest first; an entry whose time is no longer
    /// its source's latest is skipped when it leaves.
    order: VecDeque<(IpAddr, Instant)>,
}

/// A remembered source's first and latest recorded deliveries.
#[derive(Clone, Copy)]
struct Deliveries {
    first: Instant,
    last: Instant,
}

impl RecentSenders {
    /// The backend accepted a message from `source`.
    pub fn record(&self, source: IpAddr, now: Instant) {
        let mut recent = self.lock();
        let first = match recent.live(source, now) {
            Some(seen) if now.saturating_duration_since(seen.last) < RENEW => return,
            Some(seen) => seen.first,
            // A source remembered no more (or never) starts a new run.
            None => now,
        };
        recent
            .senders
            .insert(source, Deliveries { first, last: now });
        recent.order.push_back((source, now));
        recent.expire(now);
    }

    /// Whether `source` delivered within [`MEMORY`].
    pub fn contains(&self, source: IpAddr, now: Instant) -> bool {
        self.lock().live(source, now).is_some()
    }

    /// When `source` first delivered, if it delivered within [`MEMORY`]
    /// (and has been remembered since).
    pub fn first_delivery(&self, source: IpAddr, now: Instant) -> Option<Instant> {
        self.lock().live(source, now).map(|seen| seen.first)
    }

    /// Forgets `source` (its early connection went unused).
    pub fn forget(&self, source: IpAddr) {
        self.lock().senders.remove(&source);
    }

    /// Sources remembered now.
    pub fn len(&self) -> usize {
        self.lock().senders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Recent {
    /// `source`'s deliveries, if its latest is within [`MEMORY`].
    fn live(&self, source: IpAddr, now: Instant) -> Option<Deliveries> {
        self.senders
            .get(&source)
            .filter(|seen| now.saturating_duration_since(seen.last) < MEMORY)
            .copied()
    }

    /// Drops entries older than [`MEMORY`], and the oldest past
    /// [`CAPACITY`].
    fn expire(&mut self, now: Instant) {
        while let Some(&(source, at)) = self.order.front() {
            let stale = now.saturating_duration_since(at) >= MEMORY;
            if !stale && self.order.len() <= CAPACITY {
                break;
            }
            self.order.pop_front();
            if self
                .senders
                .get(&source)
                .is_some_and(|seen| seen.last == at)
            {
                self.senders.remove(&source);
            }
        }
    }
}

/// A backend connection opened at accept, waiting for its session.
pub struct EarlyLink {
    claim: oneshot::Sender<()>,
    /// The client's HELO/EHLO, for the connection to send ahead (once).
    helo: Option<oneshot::Sender<(String, bool)>>,
    task: JoinHandle<Option<Claimed>>,
}

/// What a session gets when it claims its early connection.
pub struct Claimed {
    /// Greeted, the identity header sent.
    pub backend: Backend,
    /// The client's HELO/EHLO sent ahead, if it was: the name, whether
    /// EHLO, and the backend's reply.
    pub helo: Option<(String, bool, Reply)>,
}

impl EarlyLink {
    /// Opens one for a session of `peer` if every condition holds (see the
    /// module): recent sender, not shed lately, backend slots plentiful.
    pub fn open(
        ctx: &Arc<ProxyContext>,
        settings: &Settings,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Option<Self> {
        let source = peer.ip();
        if !settings.connect.earned()
            || settings.early_connect != EarlyConnect::RecentSenders
            || !ctx.recent_senders.contains(source, Instant::now())
        {
            return None;
        }
        let slots = &ctx.backend_slots;
        if slots.scarce() || slots.shed_lately(source) {
            return None;
        }
        let slot = slots.try_acquire(source)?;
        let (claim, claimed) = oneshot::channel();
        // XCLIENT must come before the client's HELO, and it names the
        // HELO: with it the session sends both itself.
        let (helo, helo_rx) = match settings.backend.identity {
            Identity::Xclient => (None, None),
            _ => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
        };
        let backend_settings = settings.backend.clone();
        let ctx = ctx.clone();
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + HOLD;
            // A backend that fails or refuses here is asked again by the
            // session itself, which then tells its client what it says.
            let connected = timeout_at(
                deadline,
                Backend::connect(&backend_settings, Some((peer, local))),
            )
            .await;
            let mut backend = match connected {
                Ok(Ok((backend, _greeting))) => backend,
                Ok(Err(error)) => {
                    tracing::debug!(%source, %error, "early backend connection failed");
                    return None;
                }
                Err(_) => return None,
            };
            backend.hold_slot(slot);
            match wait_for_claim(&mut backend, claimed, helo_rx, deadline).await {
                Ok(helo) => {
                    ctx.stats.count_early_link("used");
                    Some(Claimed { backend, helo })
                }
                Err(Unclaimed::Failed) => None,
                Err(Unclaimed::Given) => {
                    // Not claimed in time, or the session ended without a
                    // MAIL.
                    ctx.stats.count_early_link("unused");
                    ctx.recent_senders.forget(source);
                    backend.quit().await;
                    None
                }
            }
        });
        Some(Self { claim, helo, task })
    }

    /// Has the connection send the client's HELO/EHLO ahead of the claim,
    /// so that the claiming command waits for its own reply only. Once.
    pub fn send_helo(&mut self, name: &str, esmtp: bool) {
        if let Some(helo) = self.helo.take() {
            let _ = helo.send((name.to_owned(), esmtp));
        }
    }

    /// The connection, if it is still there: `None` when it failed or was
    /// given up, and the session connects as usual.
    pub async fn claim(self) -> Option<Claimed> {
        self.claim.send(()).ok()?;
        self.task.await.ok().flatten()
    }
}

/// Why an early connection ended unclaimed.
enum Unclaimed {
    /// The backend failed it (dropped as it is).
    Failed,
    /// Its session did not claim it in time, or ended.
    Given,
}

/// Waits for the session's claim until `deadline`, sending the client's
/// HELO/EHLO on the way if it comes first.
async fn wait_for_claim(
    backend: &mut Backend,
    mut claimed: oneshot::Receiver<()>,
    mut helo: Option<oneshot::Receiver<(String, bool)>>,
    deadline: Instant,
) -> Result<Option<(String, bool, Reply)>, Unclaimed> {
    let mut sent = None;
    loop {
        tokio::select! {
            biased;
            claim = &mut claimed => {
                return match claim {
                    Ok(()) => Ok(sent),
                    Err(_) => Err(Unclaimed::Given),
                };
            }
            given = async {
                match helo.as_mut() {
                    Some(rx) => rx.await,
                    None => std::future::pending().await,
                }
            }, if helo.is_some() => {
                helo = None;
                if let Ok((name, esmtp)) = given {
                    let verb = if esmtp { "EHLO" } else { "HELO" };
                    match timeout_at(deadline, backend.command(format!("{verb} {name}").as_bytes())).await {
                        Ok(Ok(reply)) => sent = Some((name, esmtp, reply)),
                        Ok(Err(_)) => return Err(Unclaimed::Failed),
                        Err(_) => return Err(Unclaimed::Given),
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => return Err(Unclaimed::Given),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_delivery_is_remembered_for_an_hour() {
        let recent = RecentSenders::default();
        let start = Instant::now();
        assert!(!recent.contains(ip(1), start));
        recent.record(ip(1), start);
        assert!(recent.contains(ip(1), start + MEMORY - Duration::from_secs(1)));
        assert!(!recent.contains(ip(1), start + MEMORY));
        assert!(!recent.contains(ip(2), start));
    }

    #[test]
    fn a_later_delivery_renews_the_memory() {
        let recent = RecentSenders::default();
        let start = Instant::now();
        recent.record(ip(1), start);
        recent.record(ip(1), start + RENEW);
        // The first entry leaves the queue; the source stays.
        recent.record(ip(2), start + MEMORY);
        assert!(recent.contains(ip(1), start + MEMORY));
        assert!(!recent.contains(ip(1), start + RENEW + MEMORY));
        assert_eq!(recent.len(), 2);
        // Within RENEW a delivery queues nothing more: ip(1)'s renewal,
        // ip(2), ip(3) once.
        for second in 0..100 {
            recent.record(ip(3), start + MEMORY + Duration::from_secs(second));
        }
        assert_eq!(recent.lock().order.len(), 3);
    }

    #[test]
    fn the_oldest_are_forgotten_past_the_capacity() {
        let recent = RecentSenders::default();
        let start = Instant::now();
        for n in 0..=CAPACITY {
            let source = IpAddr::from((n as u128 + 1).to_be_bytes());
            recent.record(source, start);
        }
        assert_eq!(recent.len(), CAPACITY);
        assert!(!recent.contains(IpAddr::from(1u128.to_be_bytes()), start));
        assert!(recent.contains(IpAddr::from(2u128.to_be_bytes()), start));
    }

    #[test]
    fn the_first_delivery_is_kept_until_the_source_is_forgotten() {
        let recent = RecentSenders::default();
        let start = Instant::now();
        recent.record(ip(1), start);
        recent.record(ip(1), start + RENEW);
        let later = start + RENEW + Duration::from_secs(1);
        assert_eq!(recent.first_delivery(ip(1), later), Some(start));
        assert_eq!(recent.first_delivery(ip(2), later), None);
        // An hour after its last delivery it starts again.
        let gone = start + RENEW + MEMORY;
        assert_eq!(recent.first_delivery(ip(1), gone), None);
        recent.record(ip(1), gone);
        assert_eq!(recent.first_delivery(ip(1), gone), Some(gone));
        recent.forget(ip(1));
        assert_eq!(recent.first_delivery(ip(1), gone), None);
    }

    #[test]
    fn a_forgotten_source_is_no_recent_sender() {
        let recent = RecentSenders::default();
        let start = Instant::now();
        recent.record(ip(1), start);
        recent.forget(ip(1));
        assert!(!recent.contains(ip(1), start));
        // Its queued entry leaves without harm.
        recent.record(ip(2), start + MEMORY);
        assert_eq!(recent.len(), 1);
    }
}
