//! Content filters: the spam and virus scanners mail administrators already
//! run (rspamd, ClamAV), asked about every message before the backend
//! accepts it.
//!
//! While DATA arrives the session feeds a [`MessageScan`] with the message's
//! bytes; each configured scanner gets them at once on its own connection
//! (one task per scanner, a bounded channel in between). The session holds
//! the message back from the backend meanwhile: the scanners may ask for
//! headers, and headers come first. At the end, [`MessageScan::finish`]
//! waits for every verdict (bounded by `filters.timeout`) and [`combine`]s
//! them into one [`Outcome`]: deliver (with header edits), reject or defer.
//!
//! * [`rspamd`] — `POST /checkv2`, the body streamed as HTTP chunks.
//! * [`clamav`] — clamd's `INSTREAM`, over TCP or a Unix socket.
//! * [`message`] — header edits on the held message (pure).

pub mod clamav;
pub mod message;
pub mod rspamd;

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    config::{self, OnFailure},
    proxy::{LatencyHistogram, ReasonCounts},
    smtp::{data::Unstuffer, reply::Reply},
};
use clamav::ClamdClient;
use message::HeaderEdits;
use rspamd::RspamdClient;

/// The header the proxy adds to a message it passes on unscanned.
pub const SCAN_HEADER: &str = "X-Smtp-Limiter-Scan";
/// Chunks in flight to one scanner; past it the session waits for the
/// scanner (within `filters.timeout`).
const CHANNEL_CHUNKS: usize = 16;
/// Longest scanner text quoted in a reply to the client.
const MAX_REPLY_DETAIL: usize = 200;

/// What the scanners are told about the message besides its content.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The real client (not the proxy).
    pub client: IpAddr,
    pub helo: Option<String>,
    /// `None` for the null sender.
    pub sender: Option<String>,
    /// The accepted recipients.
    pub recipients: Vec<String>,
    /// An id for this message in the scanners' logs.
    pub queue_id: String,
}

/// One scanner's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver, with these header changes.
    Clean { edits: HeaderEdits },
    /// rspamd's `reject`.
    Spam { reason: String },
    /// clamd found a virus.
    Virus { name: String },
    /// rspamd's `soft reject` or `greylist`.
    SoftReject { reason: String },
}

/// Why a scanner gave no verdict.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Protocol(String),
    #[error("no verdict within {0:?} (filters.timeout)")]
    Timeout(Duration),
}

/// What the session does with the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send it on to the backend with these header changes.
    Deliver {
        edits: HeaderEdits,
        label: &'static str,
    },
    /// Answer the client with `reply`; the backend stores nothing.
    Refuse {
        reply: Reply,
        label: &'static str,
        /// For the log: what the scanner said.
        detail: String,
    },
}

impl Outcome {
    /// The verdict's name in logs and metrics: `clean`, `virus`, `spam`,
    /// `soft-reject`, `unscanned` (fail-open), `tempfail` (fail-closed).
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Deliver { label, .. } | Outcome::Refuse { label, .. } => label,
        }
    }

    /// Whether the message was refused for its content (virus or spam):
    /// what counts toward blocking the source.
    #[must_use]
    pub fn is_content_reject(&self) -> bool {
        matches!(self.label(), "virus" | "spam")
    }
}

/// Combines the scanners' verdicts: a virus beats spam, which beats a soft
/// reject, which beats a scanner failure (then `on_failure` decides); with
/// every scanner clean the message goes on with all their header edits.
#[must_use]
pub fn combine(
    results: Vec<(&'static str, Result<Verdict, ScanError>)>,
    on_failure: OnFailure,
) -> Outcome {
    let mut edits = HeaderEdits::default();
    let (mut virus, mut spam, mut soft, mut failed) = (None, None, None, Vec::new());
    for (scanner, result) in results {
        match result {
            Ok(Verdict::Clean { edits: more }) => edits.extend(more),
            Ok(Verdict::Virus { name }) => virus = virus.or(Some(name)),
            Ok(Verdict::Spam { reason }) => spam = spam.or(Some(reason)),
            Ok(Verdict::SoftReject { reason }) => soft = soft.or(Some(reason)),
            Err(error) => failed.push(format!("{scanner}: {error}")),
        }
    }
    if let Some(name) = virus {
        let text = format!(
            "5.7.1 Message rejected: virus found ({})",
            reply_detail(&name)
        );
        return Outcome::Refuse {
            reply: Reply::new(550, &text),
            label: "virus",
            detail: name,
        };
    }
    if let Some(reason) = spam {
        let text = format!("5.7.1 Message rejected as spam ({})", reply_detail(&reason));
        return Outcome::Refuse {
            reply: Reply::new(554, &text),
            label: "spam",
            detail: reason,
        };
    }
    if let Some(reason) = soft {
        let text = format!("4.7.1 Try again later ({})", reply_detail(&reason));
        return Outcome::Refuse {
            reply: Reply::new(451, &text),
            label: "soft-reject",
            detail: reason,
        };
    }
    if failed.is_empty() {
        return Outcome::Deliver {
            edits,
            label: "clean",
        };
    }
    let detail = failed.join("; ");
    match on_failure {
        OnFailure::FailOpen => {
            edits
                .add
                .push((SCAN_HEADER.into(), format!("not scanned ({detail})")));
            Outcome::Deliver {
                edits,
                label: "unscanned",
            }
        }
        OnFailure::FailClosed => Outcome::Refuse {
            reply: Reply::new(451, "4.7.1 Message could not be scanned, try again later"),
            label: "tempfail",
            detail,
        },
    }
}

/// Scanner text fit for one reply line: printable, bounded.
fn reply_detail(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REPLY_DETAIL)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Filter counters (read by `stats` and metrics).
#[derive(Default)]
pub struct FilterStats {
    /// Messages by [`Outcome::label`], and `skipped-size`.
    pub verdicts: ReasonCounts,
    /// Scanner failures by scanner name.
    pub scanner_errors: ReasonCounts,
    /// From the end of DATA to the last verdict.
    pub wait: LatencyHistogram,
}

/// The configured scanners and what to do with their verdicts.
pub struct Filters {
    timeout: Duration,
    on_failure: OnFailure,
    max_size: u64,
    /// `filters.max_held`: bytes all sessions together may hold.
    max_held: u64,
    /// Bytes held now, by every [`MessageScan`].
    held: AtomicU64,
    rspamd: Option<RspamdClient>,
    clamav: Option<ClamdClient>,
    pub stats: FilterStats,
    next_id: AtomicU64,
}

impl Filters {
    /// The filters of `[filters]`, or `None` when no scanner is configured.
    ///
    /// # Errors
    /// `filters.rspamd.url` is not usable (validation catches it first).
    pub fn from_config(config: &config::Filters) -> Result<Option<Arc<Self>>, String> {
        if config.rspamd.is_none() && config.clamav.is_none() {
            return Ok(None);
        }
        let rspamd = match &config.rspamd {
            Some(rspamd) => Some(RspamdClient::new(&rspamd.url)?),
            None => None,
        };
        Ok(Some(Arc::new(Self {
            timeout: config.timeout,
            on_failure: config.on_failure,
            max_size: config.max_size,
            max_held: config.max_held,
            held: AtomicU64::new(0),
            rspamd,
            clamav: config
                .clamav
                .as_ref()
                .map(|c| ClamdClient::new(&c.address, c.stream_max_length)),
            stats: FilterStats::default(),
            next_id: AtomicU64::new(0),
        })))
    }

    /// Messages larger than this (as stored) are passed on unscanned.
    #[must_use]
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// A new id for a message, unique within this agent's run.
    #[must_use]
    pub fn queue_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("SL{:X}{n:06X}", std::process::id())
    }

    /// Starts a scan of one message: connects to every scanner and sends it
    /// the envelope; [`MessageScan::feed`] sends the content.
    pub fn start(self: &Arc<Self>, envelope: Envelope) -> MessageScan {
        let envelope = Arc::new(envelope);
        let mut running = Vec::new();
        if let Some(rspamd) = &self.rspamd {
            let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
            let (client, envelope, timeout) = (rspamd.clone(), envelope.clone(), self.timeout);
            running.push(Running {
                scanner: "rspamd",
                chunks: Some(tx),
                task: tokio::spawn(async move { client.scan(&envelope, rx, timeout).await }),
                stalled: false,
            });
        }
        if let Some(clamav) = &self.clamav {
            let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
            let (client, timeout) = (clamav.clone(), self.timeout);
            running.push(Running {
                scanner: "clamav",
                chunks: Some(tx),
                task: tokio::spawn(async move { client.scan(rx, timeout).await }),
                stalled: false,
            });
        }
        MessageScan {
            filters: self.clone(),
            running,
            unstuffer: Unstuffer::default(),
            reserved: 0,
        }
    }
}

impl Filters {
    /// Bytes held now by every message being scanned or delivered
    /// (`filters.max_held` bounds it).
    #[must_use]
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// One scanner at work on one message.
struct Running {
    scanner: &'static str,
    /// `None` once the content is complete or the scanner stopped reading.
    chunks: Option<mpsc::Sender<Bytes>>,
    task: JoinHandle<Result<Verdict, ScanError>>,
    /// The scanner did not take a chunk within the timeout.
    stalled: bool,
}

/// The scan of one message in progress. Dropping it abandons the scan (the
/// scanner connections close).
pub struct MessageScan {
    filters: Arc<Filters>,
    running: Vec<Running>,
    unstuffer: Unstuffer,
    /// This message's share of [`Filters::held`].
    reserved: u64,
}

impl MessageScan {
    /// Sends the next bytes of the message, as on the wire (dot-stuffed,
    /// without the end marker), to every scanner. Waits while a scanner is
    /// behind, at most `filters.timeout`; a scanner that does not catch up
    /// by then gets no more and counts as failed.
    pub async fn feed(&mut self, wire: &[u8]) {
        let mut content = Vec::with_capacity(wire.len());
        self.unstuffer.feed(wire, &mut content);
        if content.is_empty() {
            return;
        }
        let content = Bytes::from(content);
        let limit = self.filters.timeout;
        for running in &mut self.running {
            let Some(chunks) = &running.chunks else {
                continue;
            };
            match tokio::time::timeout(limit, chunks.send(content.clone())).await {
                Ok(Ok(())) => {}
                // The scanner stopped reading: its result says why.
                Ok(Err(_)) => running.chunks = None,
                Err(_) => {
                    running.chunks = None;
                    running.stalled = true;
                    running.task.abort();
                }
            }
        }
    }

    /// Ends the content and waits for every verdict (at most
    /// `filters.timeout`), then combines them. The message's memory stays
    /// reserved until the scan is dropped: keep it until the backend has the
    /// whole message.
    pub async fn finish(&mut self) -> Outcome {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.filters.timeout;
        let mut results = Vec::with_capacity(self.running.len());
        for running in &mut self.running {
            running.chunks = None;
            let result = if running.stalled {
                Err(ScanError::Timeout(self.filters.timeout))
            } else {
                match tokio::time::timeout_at(deadline, &mut running.task).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(e)) => Err(ScanError::Protocol(format!("scanner task failed: {e}"))),
                    Err(_) => Err(ScanError::Timeout(self.filters.timeout)),
                }
            };
            if let Err(error) = &result {
                tracing::warn!(scanner = running.scanner, %error, "content scanner failed");
                self.filters.stats.scanner_errors.add(running.scanner);
            }
            results.push((running.scanner, result));
        }
        self.filters.stats.wait.record(started.elapsed());
        let outcome = combine(results, self.filters.on_failure);
        self.filters.stats.verdicts.add(outcome.label());
        outcome
    }

    /// Takes `bytes` more of the memory budget all held messages share
    /// (`filters.max_held`); `false` if that would go over it.
    pub fn reserve(&mut self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        let held = &self.filters.held;
        let before = held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.filters.max_held {
            held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        self.reserved += bytes;
        true
    }

    /// The memory budget for held messages is spent: with `fail-open` the
    /// message goes on unscanned (the header to add), with `fail-closed`
    /// `None` (the client gets 451). Counted as `unscanned` or `tempfail`.
    #[must_use]
    pub fn skip_no_memory(self) -> Option<HeaderEdits> {
        let stats = &self.filters.stats;
        match self.filters.on_failure {
            OnFailure::FailOpen => {
                stats.verdicts.add("unscanned");
                Some(HeaderEdits {
                    add: vec![(
                        SCAN_HEADER.into(),
                        "not scanned (filters.max_held reached)".into(),
                    )],
                    ..HeaderEdits::default()
                })
            }
            OnFailure::FailClosed => {
                stats.verdicts.add("tempfail");
                None
            }
        }
    }

    /// The message went on unscanned because it is larger than
    /// `filters.max_size`: counts it and returns the header that says so.
    #[must_use]
    pub fn skip_too_large(self) -> HeaderEdits {
        self.filters.stats.verdicts.add("skipped-size");
        HeaderEdits {
            add: vec![(
                SCAN_HEADER.into(),
                format!("not scanned (larger than {} bytes)", self.filters.max_size),
            )],
            ..HeaderEdits::default()
        }
    }
}

impl Drop for MessageScan {
    fn drop(&mut self) {
        for running in &self.running {
            running.task.abort();
        }
        self.filters
            .held
            .fetch_sub(self.reserved, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(header: &str) -> Result<Verdict, ScanError> {
        Ok(Verdict::Clean {
            edits: HeaderEdits {
                add: vec![(header.into(), "v".into())],
                ..HeaderEdits::default()
            },
        })
    }

    #[test]
    fn clean_from_all_delivers_with_every_scanners_headers() {
        let outcome = combine(
            vec![
                ("rspamd", clean("X-Spamd-Result")),
                ("clamav", clean("X-Virus")),
            ],
            OnFailure::FailClosed,
        );
        let Outcome::Deliver { edits, label } = outcome else {
            panic!("deliver expected");
        };
        assert_eq!(label, "clean");
        let names: Vec<_> = edits.add.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["X-Spamd-Result", "X-Virus"]);
    }

    #[test]
    fn virus_beats_spam_beats_soft_reject_beats_failure() {
        let virus = || {
            Ok(Verdict::Virus {
                name: "Test.Sig\r\nX: y".into(),
            })
        };
        let spam = || {
            Ok(Verdict::Spam {
                reason: "Gtube pattern".into(),
            })
        };
        let soft = || {
            Ok(Verdict::SoftReject {
                reason: "greylisted".into(),
            })
        };
        let down = || Err(ScanError::Unavailable("connection refused".into()));
        let reply = |results| match combine(results, OnFailure::FailOpen) {
            Outcome::Refuse { reply, label, .. } => (reply.code, reply.text(), label),
            other => panic!("refuse expected, got {other:?}"),
        };
        let (code, text, label) = reply(vec![("rspamd", spam()), ("clamav", virus())]);
        assert_eq!((code, label), (550, "virus"));
        assert_eq!(text, "5.7.1 Message rejected: virus found (Test.Sig  X: y)");
        assert_eq!(
            reply(vec![("rspamd", spam()), ("clamav", down())]),
            (
                554,
                "5.7.1 Message rejected as spam (Gtube pattern)".into(),
                "spam"
            )
        );
        assert_eq!(
            reply(vec![("rspamd", soft()), ("clamav", down())]),
            (
                451,
                "4.7.1 Try again later (greylisted)".into(),
                "soft-reject"
            )
        );
    }

    #[test]
    fn failures_follow_on_failure() {
        let results = || {
            vec![
                ("rspamd", clean("X-Spamd-Result")),
                ("clamav", Err(ScanError::Timeout(Duration::from_secs(30)))),
            ]
        };
        let Outcome::Deliver { edits, label } = combine(results(), OnFailure::FailOpen) else {
            panic!("fail-open delivers");
        };
        assert_eq!(label, "unscanned");
        assert_eq!(edits.add[0].0, "X-Spamd-Result");
        assert_eq!(edits.add[1].0, SCAN_HEADER);
        assert!(
            edits.add[1].1.contains("clamav: no verdict within 30s"),
            "{:?}",
            edits.add[1]
        );
        let Outcome::Refuse {
            reply,
            label,
            detail,
        } = combine(results(), OnFailure::FailClosed)
        else {
            panic!("fail-closed refuses");
        };
        assert_eq!((reply.code, label), (451, "tempfail"));
        assert!(detail.contains("clamav"));
    }

    #[tokio::test]
    async fn held_messages_share_one_memory_budget() {
        let config = config::Config::from_toml(
            "[filters]\nmax_size = 10\nmax_held = 15\n[filters.clamav]\naddress = \"127.0.0.1:1\"",
        )
        .unwrap();
        let filters = Filters::from_config(&config.filters).unwrap().unwrap();
        let envelope = || Envelope {
            client: "192.0.2.1".parse().unwrap(),
            helo: None,
            sender: None,
            recipients: vec!["a@example.com".into()],
            queue_id: filters.queue_id(),
        };
        let mut first = filters.start(envelope());
        let mut second = filters.start(envelope());
        assert!(first.reserve(10));
        assert!(!second.reserve(10), "15 bytes in all");
        assert!(second.reserve(5));
        drop(first);
        assert!(second.reserve(10));
        drop(second);
        assert_eq!(filters.held.load(Ordering::Relaxed), 0);
        assert_ne!(filters.queue_id(), filters.queue_id());
    }
}
