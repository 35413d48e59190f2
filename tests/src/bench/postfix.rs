//! A private Postfix ([`crate::postfix`]) as a benchmark's backend: more
//! listeners added to a running instance (a plain smtpd or postscreen on a
//! veth address), its smtpd processes counted, and what its log says was
//! delivered, read as it grows, so that every message a client saw
//! accepted is checked delivered exactly once, and nothing else.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use super::system::{check_stop, process_name};
use crate::postfix::{postfix_tool, Postfix};

/// Adds services to a running instance's master.cf (`postconf -M` entries,
/// `NAME/TYPE=NAME TYPE …`) and service parameters (`postconf -P`
/// entries, `NAME/TYPE/PARAM=VALUE`), then `postfix reload`: the master
/// opens the new listeners.
///
/// # Errors
/// When postconf or the reload fails.
pub fn add_services(postfix: &Postfix, services: &[String], params: &[String]) -> Result<()> {
    let conf = postfix.config_dir();
    let postconf = postfix_tool("postconf")?;
    let run = |flag: &str, entry: &str| -> Result<()> {
        let out = Command::new(&postconf)
            .arg("-c")
            .arg(&conf)
            .args([flag, entry])
            .env_remove("MAIL_CONFIG")
            .output()
            .context("cannot run postconf")?;
        ensure!(
            out.status.success(),
            "postconf {flag} {entry:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    for entry in services {
        run("-M", entry)?;
    }
    for entry in params {
        run("-P", entry)?;
    }
    let out = Command::new(postfix_tool("postfix")?)
        .arg("-c")
        .arg(&conf)
        .arg("reload")
        .env_remove("MAIL_CONFIG")
        .stdin(Stdio::null())
        .output()
        .context("cannot run postfix reload")?;
    ensure!(
        out.status.success(),
        "postfix reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The instance's smtpd processes right now (each serves one client at a
/// time; an idle one waits up to `max_idle` for the next).
#[must_use]
pub fn smtpd_processes(postfix: &Postfix) -> usize {
    postfix
        .processes()
        .into_iter()
        .filter(|pid| process_name(*pid).as_deref() == Some("smtpd"))
        .count()
}

/// Deliveries seen so far in one log.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// Message-IDs starting with this are the measured ("legitimate") ones.
    id_prefix: String,
    /// Their recipients.
    legit_rcpts: Vec<String>,
    /// The flood's recipient: its deliveries are counted apart.
    flood_rcpt: String,
    offset: u64,
    /// Queue id → Message-ID, for messages whose ID is a measured one.
    queued: HashMap<String, String>,
    /// Measured Message-IDs delivered (`status=sent`), with their count.
    pub legit: HashMap<String, u32>,
    /// Deliveries to the flood's recipient.
    pub flood: u64,
    /// Other deliveries.
    pub other: u64,
}

impl Deliveries {
    /// Counts messages whose Message-ID starts with `id_prefix` sent to one
    /// of `legit_rcpts`, and deliveries to `flood_rcpt`.
    #[must_use]
    pub fn new(id_prefix: &str, legit_rcpts: &[&str], flood_rcpt: &str) -> Self {
        Self {
            id_prefix: id_prefix.to_owned(),
            legit_rcpts: legit_rcpts.iter().map(|r| (*r).to_owned()).collect(),
            flood_rcpt: flood_rcpt.to_owned(),
            ..Self::default()
        }
    }

    /// Reads what the log has gained since the last call (whole lines).
    ///
    /// # Errors
    /// When the log exists but cannot be read.
    pub fn update(&mut self, log: &Path) -> Result<()> {
        let Ok(mut f) = fs::File::open(log) else {
            return Ok(());
        };
        f.seek(SeekFrom::Start(self.offset))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        self.offset += end as u64 + 1;
        for line in String::from_utf8_lossy(&buf[..=end]).lines() {
            self.line(line);
        }
        Ok(())
    }

    /// Reads `postfix`'s log until every message in `accepted` has been
    /// delivered and the queue is empty; with `queue_wait`, once every
    /// accepted message is in, waits that long at most for the rest of the
    /// queue (the flood's, say) and returns how many messages are left.
    ///
    /// # Errors
    /// An accepted message not delivered within `timeout` (or, without
    /// `queue_wait`, a queue that does not empty), named after `what`; a
    /// signal.
    pub fn wait_for(
        &mut self,
        postfix: &Postfix,
        accepted: &HashSet<String>,
        what: &str,
        timeout: Duration,
        queue_wait: Option<Duration>,
    ) -> Result<usize> {
        let log = postfix.dir().join("maillog");
        let deadline = Instant::now() + timeout;
        let mut all_in: Option<Instant> = None;
        let left = loop {
            check_stop()?;
            self.update(&log)?;
            let missing = accepted
                .iter()
                .filter(|id| !self.legit.contains_key(*id))
                .count();
            let queued = postfix.queued();
            if missing == 0 && queued == 0 {
                break 0;
            }
            if let (0, Some(wait)) = (missing, queue_wait) {
                if all_in.get_or_insert_with(Instant::now).elapsed() > wait {
                    eprintln!(
                        "{what}: every accepted message delivered; {queued} other message(s) still in Postfix's queue after {wait:?}"
                    );
                    break queued;
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: {missing} accepted messages not delivered after {timeout:?} ({queued} in the queue)"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // The log may trail the queue by a moment.
        std::thread::sleep(Duration::from_millis(300));
        self.update(&log)?;
        Ok(left)
    }

    /// Checks the measured deliveries whose Message-ID is not in `before`:
    /// each delivered once, each one the client saw accepted or sent in
    /// full without an answer (`uncertain`); nothing delivered to another
    /// recipient. Returns how many of the `uncertain` ones were delivered.
    ///
    /// # Errors
    /// The first delivery that breaks one of these.
    pub fn check(
        &self,
        accepted: &HashSet<String>,
        uncertain: &HashSet<String>,
        before: &HashSet<String>,
    ) -> Result<usize> {
        let mut uncertain_delivered = 0;
        for (id, n) in &self.legit {
            if before.contains(id) {
                continue;
            }
            ensure!(*n == 1, "{id} was delivered {n} times");
            if !accepted.contains(id) {
                ensure!(
                    uncertain.contains(id),
                    "{id} was delivered but the client never sent it in full"
                );
                uncertain_delivered += 1;
            }
        }
        ensure!(
            self.other == 0,
            "{} deliveries to neither a measured nor the flood's recipient",
            self.other
        );
        Ok(uncertain_delivered)
    }

    fn line(&mut self, line: &str) {
        // "... NAME/cleanup[PID]: QID: message-id=<ID>"
        // "... NAME/discard[PID]: QID: to=<R>, relay=none, ..., status=sent (...)"
        let Some((_, rest)) = line.split_once("]: ") else {
            return;
        };
        let Some((qid, what)) = rest.split_once(": ") else {
            return;
        };
        if let Some(id) = what.strip_prefix("message-id=<") {
            let id = id.trim_end_matches('>');
            if id.starts_with(&self.id_prefix) {
                self.queued.insert(qid.to_owned(), id.to_owned());
            }
        } else if what.contains(" status=sent ") {
            let to = what
                .strip_prefix("to=<")
                .and_then(|t| t.split_once('>'))
                .map_or("", |(t, _)| t);
            match self.queued.get(qid) {
                Some(id) if self.legit_rcpts.iter().any(|r| r == to) => {
                    *self.legit.entry(id.clone()).or_default() += 1;
                }
                _ if to == self.flood_rcpt => self.flood += 1,
                _ => self.other += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_message_id_and_recipient() {
        let mut d = Deliveries::new("m-", &["alice@example.com"], "postmaster@example.com");
        for line in [
            "x postfix-1/cleanup[9]: AB12: message-id=<m-1@x>",
            "x postfix-1/discard[9]: AB12: to=<alice@example.com>, relay=none, delay=0, status=sent (discarded)",
            "x postfix-1/cleanup[9]: CD34: message-id=<bounce@x>",
            "x postfix-1/discard[9]: CD34: to=<postmaster@example.com>, relay=none, status=sent (x)",
            "x postfix-1/discard[9]: EF56: to=<bob@example.com>, relay=none, status=sent (x)",
        ] {
            d.line(line);
        }
        assert_eq!(d.legit.get("m-1@x"), Some(&1));
        assert_eq!((d.flood, d.other), (1, 1));
    }
}
