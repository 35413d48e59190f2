//! Valid recipients from an LDAP directory (Active Directory included).
//!
//! With `[recipients.ldap]` configured, a recipient must match `relay.accept`
//! (a domain we serve) **and** be in the directory. The proxy refuses an
//! unknown one itself — `550 5.1.1`, no round trip to the backend — and
//! counts it as a failed RCPT, so directory harvesting is stopped by the
//! proxy's own knowledge.
//!
//! * [`Directory`] holds the set in force, an immutable [`AddressSet`]
//!   swapped whole; a lookup is one key computation and one hash probe
//!   (two with `recipient_delimiter`) under a read lock.
//! * [`Lookup`] is the answer: `Known`, `Unknown` (refuse), `NotCovered`
//!   (a domain without any address in the directory, `postmaster`, not an
//!   address: the backend decides) or `NoDirectory` (no set yet: the backend
//!   decides, logged and counted).
//! * [`Recipients`] is what the agent runs: it loads the cached set at start
//!   ([`cache`], `state.directory/recipients.json`), refreshes from the
//!   directory at once and then every `refresh` (±10 %), and on request
//!   ([`Recipients::refresh_now`]). A refresh that fails keeps the set in
//!   force; one that returns more than `max_drop` fewer addresses is refused
//!   ([`RefreshError::Implausible`]) unless forced.
//! * [`ldap`] reads the directory: bind, paged search (RFC 2696, pages of
//!   500 entries: Active Directory's 1000-entry limit does not cut it),
//!   `proxyAddresses`-style typed values (`SMTP:`/`smtp:` kept, `X500:`,
//!   `SIP:`… ignored).
//!
//! Keys: the domain is always compared without case; the local part too
//! unless `case_sensitive_local_part` (Exchange and Active Directory ignore
//! case, as RFC 5321 allows). Keys are made once when a set is
//! loaded, and once per lookup.

pub mod address;
pub mod cache;
mod directory;
mod error;
pub mod ldap;

use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Config, Ldap};

pub use address::Folding;
pub use cache::CACHE_FILE;
pub use directory::{AddressSet, Directory, Lookup};
pub use error::RefreshError;

/// How soon a refresh that failed for a reason that may pass by itself
/// (network, server restart) is tried again, at most.
const RETRY_SOON: Duration = Duration::from_secs(60);
/// Jitter of every wait between refreshes: ±10 %.
const JITTER: f64 = 0.1;
/// At most one "no directory loaded" warning per this interval.
const NO_DIRECTORY_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Where the set in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Read from the directory by this agent.
    Ldap,
    /// Read back from `recipients.json` at start; the directory has not
    /// answered since.
    Cache,
    /// Nothing loaded: the backend decides every recipient.
    None,
}

/// What a successful refresh did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshReport {
    /// Addresses now in force.
    pub addresses: usize,
    /// Domains they are in.
    pub domains: usize,
    /// Entries the search returned.
    pub entries: usize,
    /// Addresses in force before (0 if none).
    pub previous: usize,
    pub added: usize,
    pub removed: usize,
    /// Values that were not SMTP addresses (`X500:`, `SIP:`, …).
    pub skipped_values: usize,
    /// Entries whose attributes came in ranges (only the first was read).
    pub ranged_entries: usize,
    pub duration_ms: u64,
    /// Applied with `force`, past the `max_drop` check.
    pub forced: bool,
    /// Why the cache could not be written, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_error: Option<String>,
}

/// Counts of lookups by answer, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupCounts {
    pub known: u64,
    pub unknown: u64,
    pub not_covered: u64,
    pub no_directory: u64,
}

/// `smtp-limiter recipients stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientStats {
    pub source: Source,
    /// Addresses in force.
    pub addresses: usize,
    /// Domains the directory decides for.
    pub domains: usize,
    /// About how much memory the set in force takes.
    pub memory_bytes: usize,
    pub url: String,
    pub base_dn: String,
    /// When the set in force was read from the directory (RFC 3339; for a
    /// cached set, when it was read before it was cached).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_at: Option<String>,
    /// The last successful refresh by this agent (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<String>,
    /// The last refresh attempt, successful or not (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<String>,
    /// Why the last attempt failed or was refused; `None` after a success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_report: Option<RefreshReport>,
    pub refreshes_ok: u64,
    pub refreshes_failed: u64,
    /// Refreshes refused as implausible (`max_drop`).
    pub refreshes_refused: u64,
    pub lookups: LookupCounts,
    /// `state.directory/recipients.json`; `None` when not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_file: Option<String>,
    /// Why the cache could not be read or written, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_error: Option<String>,
}

/// Everything about refreshes that is not the set itself.
#[derive(Debug)]
struct Status {
    source: Source,
    loaded_at: Option<SystemTime>,
    last_refresh: Option<SystemTime>,
    last_attempt: Option<SystemTime>,
    last_error: Option<String>,
    last_report: Option<RefreshReport>,
    refreshes_ok: u64,
    refreshes_failed: u64,
    refreshes_refused: u64,
    cache_error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    known: AtomicU64,
    unknown: AtomicU64,
    not_covered: AtomicU64,
    no_directory: AtomicU64,
}

/// The valid-recipient directory as the agent runs it. Shared as
/// `Arc<Recipients>` by the sessions (lookups), the control socket
/// (stats, refresh) and its own refresh task.
#[derive(Debug)]
pub struct Recipients {
    directory: Directory,
    config: Mutex<Ldap>,
    cache_path: Option<PathBuf>,
    /// One refresh at a time (periodic and requested ones queue here).
    refreshing: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
    counters: Counters,
    /// Wakes the refresh task: the configuration changed.
    wake: Arc<tokio::sync::Notify>,
    task: Mutex<Option<tokio::task::AbortHandle>>,
    /// Unix seconds of the last "no directory" warning.
    warned_no_directory: AtomicU64,
}

/// Starts the valid-recipient directory if `[recipients.ldap]` is
/// configured: loads the cached set from `config.state.directory` (so it is
/// in force at once) and spawns the refresh task on the current tokio
/// runtime (first refresh at once). `None` without `[recipients.ldap]`.
/// Outside a tokio runtime the cached set is loaded but never refreshed
/// (logged): tests that build a proxy context without one still work.
#[must_use]
pub fn start(config: &Config) -> Option<Arc<Recipients>> {
    let ldap = config.recipients.ldap.clone()?;
    let recipients = Recipients::new(ldap, Some(config.state.directory.join(CACHE_FILE)));
    if tokio::runtime::Handle::try_current().is_ok() {
        recipients.spawn_refresh();
    } else {
        tracing::warn!("no tokio runtime: the recipient directory is not refreshed");
    }
    Some(recipients)
}

/// What the cached set (`state.directory/recipients.json`) says about
/// `address`, without a running agent (`smtp-limiter recipients check`
/// when the agent is down).
///
/// # Errors
/// No `[recipients.ldap]`, or no usable cache.
pub fn lookup_in_cache(config: &Config, address: &str) -> Result<Lookup, String> {
    let ldap = config
        .recipients
        .ldap
        .as_ref()
        .ok_or("no [recipients.ldap] in the configuration")?;
    let path = config.state.directory.join(CACHE_FILE);
    match cache::load(&path, &cache::Origin::of(ldap)) {
        Ok(Some(cached)) => Ok(cached.set.lookup(address)),
        Ok(None) => Err(format!(
            "no recipient cache at {} (the agent has not read the directory yet)",
            path.display()
        )),
        Err(e) => Err(e.to_string()),
    }
}

impl Recipients {
    /// The directory for `ldap`, with the set cached at `cache_path` if
    /// there is a usable one (`None`: no cache, nothing is written). No
    /// refresh task: see [`Recipients::spawn_refresh`].
    #[must_use]
    pub fn new(ldap: Ldap, cache_path: Option<PathBuf>) -> Arc<Self> {
        let recipients = Arc::new(Self {
            directory: Directory::default(),
            config: Mutex::new(ldap),
            cache_path,
            refreshing: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status {
                source: Source::None,
                loaded_at: None,
                last_refresh: None,
                last_attempt: None,
                last_error: None,
                last_report: None,
                refreshes_ok: 0,
                refreshes_failed: 0,
                refreshes_refused: 0,
                cache_error: None,
            }),
            counters: Counters::default(),
            wake: Arc::new(tokio::sync::Notify::new()),
            task: Mutex::new(None),
            warned_no_directory: AtomicU64::new(0),
        });
        recipients.load_cache();
        recipients
    }

    fn load_cache(&self) {
        let Some(path) = &self.cache_path else {
            return;
        };
        let origin = cache::Origin::of(&self.config());
        match cache::load(path, &origin) {
            Ok(None) => {
                tracing::info!(path = %path.display(), "no recipient cache yet: until the directory answers, the backend decides every recipient");
            }
            Ok(Some(cached)) => {
                let addresses = cached.set.len();
                self.directory.replace(Arc::new(cached.set));
                let mut status = self.status();
                status.source = Source::Cache;
                status.loaded_at = Some(cached.refreshed);
                tracing::info!(
                    path = %path.display(),
                    addresses,
                    read_at = %humantime::format_rfc3339_seconds(cached.refreshed),
                    source = "cache",
                    "recipient directory loaded from the cache"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "recipient cache not used");
                self.status().cache_error = Some(e.to_string());
            }
        }
    }

    /// Spawns the refresh task on the current tokio runtime: a refresh at
    /// once, then every `refresh` ±10 % (after a failure that may pass by
    /// itself, within a minute). The task ends when the `Recipients` is
    /// dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn_refresh(self: &Arc<Self>) {
        let task = tokio::spawn(refresh_loop(Arc::downgrade(self), self.wake.clone()));
        if let Some(old) = self
            .task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task.abort_handle())
        {
            old.abort();
        }
    }

    /// What the directory says about `address` (a session's RCPT): counted
    /// by answer for the metrics; [`Lookup::NoDirectory`] is also logged,
    /// at most once a minute.
    #[must_use]
    pub fn check(&self, address: &str) -> Lookup {
        let lookup = self.directory.lookup(address);
        let counter = match lookup {
            Lookup::Known => &self.counters.known,
            Lookup::Unknown => &self.counters.unknown,
            Lookup::NotCovered => &self.counters.not_covered,
            Lookup::NoDirectory => &self.counters.no_directory,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if lookup == Lookup::NoDirectory {
            self.warn_no_directory();
        }
        lookup
    }

    /// What the directory says about `address`, without counting it
    /// (`smtp-limiter recipients check`).
    #[must_use]
    pub fn lookup(&self, address: &str) -> Lookup {
        self.directory.lookup(address)
    }

    fn warn_no_directory(&self) {
        let now = unix_now();
        let last = self.warned_no_directory.load(Ordering::Relaxed);
        if now.saturating_sub(last) < NO_DIRECTORY_WARNING_EVERY.as_secs() {
            return;
        }
        if self
            .warned_no_directory
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            let error = self.status().last_error.clone().unwrap_or_default();
            tracing::warn!(
                action = "backend-decides",
                last_error = %error,
                "no recipient directory loaded yet: the backend decides every recipient"
            );
        }
    }

    /// Reads the directory now and puts the result in force (waits for a
    /// refresh already running, then runs its own). With `force` the
    /// `max_drop` check is skipped: for a real drop the operator confirmed.
    ///
    /// # Errors
    /// The directory could not be read, or the result was refused as
    /// implausible; the set in force stays.
    pub async fn refresh_now(&self, force: bool) -> Result<RefreshReport, RefreshError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let ldap = self.config();
        self.status().last_attempt = Some(SystemTime::now());
        // In a task of its own: a panic in the LDAP client (it panics on
        // malformed BER) becomes an error here, not a dead agent.
        let fetch_config = ldap.clone();
        let fetched = tokio::spawn(async move { ldap::fetch(&fetch_config).await })
            .await
            .unwrap_or_else(|e| Err(RefreshError::Aborted(e.to_string())));
        let fetched = match fetched {
            Ok(fetched) => fetched,
            Err(e) => return Err(self.failed(e, &ldap)),
        };
        let previous = self.directory.current();
        let in_force = previous.as_ref().map_or(0, |s| s.len());
        let returned = fetched.set.len();
        if !force && implausible(in_force, returned, ldap.max_drop) {
            let e = RefreshError::Implausible {
                returned,
                in_force,
                drop_percent: drop_percent(in_force, returned),
                max_drop: ldap.max_drop,
            };
            return Err(self.failed(e, &ldap));
        }
        let set = Arc::new(fetched.set);
        let now = SystemTime::now();
        let origin = cache::Origin::of(&ldap);
        let cache_path = self.cache_path.clone();
        let (for_task, old) = (set.clone(), previous.clone());
        // Off the runtime's threads: the diff and the file are O(n).
        let blocking = tokio::task::spawn_blocking(move || {
            let diff = old.map_or((0, for_task.len()), |old| old.difference_counts(&for_task));
            let saved = cache_path.map(|path| cache::save(&path, &origin, &for_task, now));
            (diff, saved)
        })
        .await;
        self.directory.replace(set.clone());
        let ((removed, added), cache_error) = match blocking {
            Ok((diff, saved)) => (diff, saved.and_then(Result::err).map(|e| e.to_string())),
            Err(e) => ((0, 0), Some(format!("recipient cache not written: {e}"))),
        };
        if let Some(e) = &cache_error {
            tracing::error!(error = %e, "recipient cache not written: a restart without the directory would start without recipients");
        }
        let report = RefreshReport {
            addresses: set.len(),
            domains: set.domain_count(),
            entries: fetched.entries,
            previous: in_force,
            added,
            removed,
            skipped_values: fetched.skipped_values,
            ranged_entries: fetched.ranged_entries,
            duration_ms: u64::try_from(fetched.duration.as_millis()).unwrap_or(u64::MAX),
            forced: force,
            cache_error: cache_error.clone(),
        };
        if fetched.ranged_entries > 0 {
            tracing::warn!(entries = fetched.ranged_entries, "some entries have so many values that the directory returned them in ranges: only the first range is read");
        }
        tracing::info!(
            source = "ldap",
            url = %ldap.url,
            addresses = report.addresses,
            domains = report.domains,
            entries = report.entries,
            added,
            removed,
            duration_ms = report.duration_ms,
            forced = force,
            "recipient directory refreshed"
        );
        let mut status = self.status();
        status.source = Source::Ldap;
        status.loaded_at = Some(now);
        status.last_refresh = Some(now);
        status.last_error = None;
        status.last_report = Some(report.clone());
        status.refreshes_ok += 1;
        status.cache_error = cache_error;
        Ok(report)
    }

    /// Records a failed refresh and logs it; returns the error.
    fn failed(&self, e: RefreshError, ldap: &Ldap) -> RefreshError {
        let in_force = self.directory.current().map_or(0, |s| s.len());
        let mut status = self.status();
        if matches!(e, RefreshError::Implausible { .. }) {
            status.refreshes_refused += 1;
            tracing::error!(url = %ldap.url, error = %e, kind = e.kind(), addresses_in_force = in_force, "recipient directory refresh refused");
        } else {
            status.refreshes_failed += 1;
            tracing::warn!(url = %ldap.url, error = %e, kind = e.kind(), addresses_in_force = in_force, source = ?status.source, "recipient directory refresh failed; the set in force stays");
        }
        status.last_error = Some(e.to_string());
        e
    }

    /// The figures of `smtp-limiter recipients stats`.
    #[must_use]
    pub fn stats(&self) -> RecipientStats {
        let set = self.directory.current();
        let ldap = self.config();
        let status = self.status();
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RecipientStats {
            source: status.source,
            addresses: set.as_ref().map_or(0, |s| s.len()),
            domains: set.as_ref().map_or(0, |s| s.domain_count()),
            memory_bytes: set.as_ref().map_or(0, |s| s.memory_bytes()),
            url: ldap.url.clone(),
            base_dn: ldap.base_dn.clone(),
            loaded_at: time(status.loaded_at),
            last_refresh: time(status.last_refresh),
            last_attempt: time(status.last_attempt),
            last_error: status.last_error.clone(),
            last_report: status.last_report.clone(),
            refreshes_ok: status.refreshes_ok,
            refreshes_failed: status.refreshes_failed,
            refreshes_refused: status.refreshes_refused,
            lookups: LookupCounts {
                known: load(&self.counters.known),
                unknown: load(&self.counters.unknown),
                not_covered: load(&self.counters.not_covered),
                no_directory: load(&self.counters.no_directory),
            },
            cache_file: self.cache_path.as_ref().map(|p| p.display().to_string()),
            cache_error: status.cache_error.clone(),
        }
    }

    /// Appends the Prometheus exposition of the directory to `out`
    /// (`smtp_limiter_recipients_*`), in the format of [`crate::metrics`].
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let stats = self.stats();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP smtp_limiter_{name} {help}");
            let _ = writeln!(out, "# TYPE smtp_limiter_{name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "smtp_limiter_{name}{labels} {value}");
            }
        };
        metric(
            "recipients_addresses",
            "gauge",
            "Valid recipient addresses in force (from the directory or its cache).",
            &[(String::new(), stats.addresses as u64)],
        );
        let sources = [Source::Ldap, Source::Cache, Source::None].map(|s| {
            let name = match s {
                Source::Ldap => "ldap",
                Source::Cache => "cache",
                Source::None => "none",
            };
            (
                format!("{{source=\"{name}\"}}"),
                u64::from(stats.source == s),
            )
        });
        metric(
            "recipients_source",
            "gauge",
            "Where the recipient set in force comes from (none: the backend decides every recipient).",
            &sources,
        );
        let l = stats.lookups;
        metric(
            "recipients_lookups_total",
            "counter",
            "RCPT lookups in the recipient directory, by answer.",
            &[
                ("{result=\"known\"}".into(), l.known),
                ("{result=\"unknown\"}".into(), l.unknown),
                ("{result=\"not-covered\"}".into(), l.not_covered),
                ("{result=\"no-directory\"}".into(), l.no_directory),
            ],
        );
        metric(
            "recipients_refreshes_total",
            "counter",
            "Refreshes of the recipient directory, by outcome.",
            &[
                ("{outcome=\"ok\"}".into(), stats.refreshes_ok),
                ("{outcome=\"failed\"}".into(), stats.refreshes_failed),
                ("{outcome=\"refused\"}".into(), stats.refreshes_refused),
            ],
        );
        let last = self.status().last_refresh.map_or(0, unix);
        metric(
            "recipients_last_refresh_timestamp_seconds",
            "gauge",
            "Unix time of the last successful refresh (0: none since start).",
            &[(String::new(), last)],
        );
    }

    /// Takes a new `[recipients.ldap]` (reload): used from the next
    /// refresh, which starts at once. The set in force stays until then
    /// (keyed as it was loaded).
    pub fn reconfigure(&self, ldap: &Ldap) {
        let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
        if *config != *ldap {
            *config = ldap.clone();
            drop(config);
            self.wake.notify_one();
        }
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> Ldap {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The directory itself (the set in force).
    #[must_use]
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The cache file, if one is kept.
    #[must_use]
    pub fn cache_path(&self) -> Option<&Path> {
        self.cache_path.as_deref()
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Recipients {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// The refresh task. It holds only a weak reference while it waits, so
/// dropping the last `Arc<Recipients>` ends it.
async fn refresh_loop(recipients: Weak<Recipients>, wake: Arc<tokio::sync::Notify>) {
    let mut wait = Duration::ZERO;
    loop {
        let woken = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            () = wake.notified() => true,
        };
        let Some(this) = recipients.upgrade() else {
            return;
        };
        if woken {
            tracing::info!("recipient directory configuration changed: refreshing now");
        }
        let period = this.config().refresh;
        wait = match this.refresh_now(false).await {
            Ok(_) => jittered(period),
            Err(e) if e.retry_soon() => jittered(period.min(RETRY_SOON)),
            Err(_) => jittered(period),
        };
    }
}

/// Whether going from `in_force` to `returned` addresses drops more than
/// `max_drop` percent.
#[must_use]
pub fn implausible(in_force: usize, returned: usize, max_drop: u8) -> bool {
    // returned < in_force × (100 − max_drop) / 100, in integers.
    (returned as u128) * 100 < (in_force as u128) * u128::from(100 - max_drop.min(100))
}

fn drop_percent(in_force: usize, returned: usize) -> u64 {
    if in_force == 0 {
        return 0;
    }
    let dropped = in_force.saturating_sub(returned) as u128;
    u64::try_from(dropped * 100 / in_force as u128).unwrap_or(100)
}

/// `period` ±10 %, at random.
fn jittered(period: Duration) -> Duration {
    // RandomState is randomly keyed per process and per instance.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let unit = (random % 20_001) as f64 / 10_000.0 - 1.0; // −1 ..= 1
    period.mul_f64(1.0 + JITTER * unit)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_now() -> u64 {
    unix(SystemTime::now())
}

#[cfg(test)]
mod tests;
