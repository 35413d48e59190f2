//! A private, real rspamd for one test: a minimal configuration of its own
//! in a temp dir under /tmp (none of /etc/rspamd: no DNS, RBL, SURBL,
//! Redis, fuzzy or Bayes), one `normal` worker on `127.0.0.1` and a free
//! port, a log file of its own. Stopped, with all its processes, and its
//! directory removed when the [`Rspamd`] is dropped.
//!
//! Verdicts (`/checkv2`), from test rules in [`RULES_LUA`] that look for a
//! marker in the Subject or anywhere in the message:
//!
//! | marker                  | symbol                     | score | action        |
//! |-------------------------|----------------------------|-------|---------------|
//! | [`SPAM_MARKER`]         | [`SPAM_SYMBOL`]            | 20    | `reject`      |
//! | [`SUBJECT_MARKER`]      | [`SUBJECT_SYMBOL`]         | 12    | `rewrite subject` (`subject` = [`SUBJECT_PREFIX`] + the Subject) |
//! | [`HEADER_MARKER`]       | [`HEADER_SYMBOL`]          | 8     | `add header`  |
//! | [`GREYLIST_MARKER`]     | [`GREYLIST_SYMBOL`]        | 5     | `greylist`    |
//! | [`SOFT_REJECT_MARKER`]  | [`SOFT_REJECT_SYMBOL`]     | 0     | `soft reject` (a pre-result, with `messages.smtp_message` = [`SOFT_REJECT_MESSAGE`]) |
//! | none                    | none                       | 0     | `no action`   |
//!
//! (thresholds: reject 15, rewrite subject 10, add header 6, greylist 4). The `milter_headers`
//! module is on for every message, local and authenticated clients
//! included (`skip_local = false`, `skip_authenticated = false`): the reply's
//! `milter.add_headers` always has `X-Spamd-Result` and `X-Spam-Status`
//! (`No, score=0.00` … `Yes, score=20.00`), plus `X-Spam: Yes` when the
//! action is neither `no action` nor `greylist`. Each header's value is an
//! object `{"order": -1, "value": "…"}`, and `X-Spamd-Result` is folded
//! (`\r\n\t` between symbols).
//!
//! rspamd 3.4 parses the full public-suffix list at start, which takes 20 s
//! and more of CPU here; the instance gets a tiny list of its own instead
//! ([`TLDS`]), so it is ready in about 2 s.
//!
//! Run as root, rspamd's workers run as Debian's `_rspamd` user (`-u`/`-g`;
//! the directory is given to it); otherwise as the caller. Needs Debian's
//! `rspamd` package (`cargo xtask setup` installs it and makes sure no
//! system instance runs); see [`missing_prerequisite`]. With
//! `RSPAMD_FIXTURE_KEEP` set the directory (config, `rspamd.log`) is kept.
//! Instances whose test process died before its `Drop` are stopped and
//! removed by the next test process that starts one.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{self, free_port, write, ChildProcess, InstanceDir, Server};

/// In the Subject or the message: action `reject`, symbol [`SPAM_SYMBOL`].
pub const SPAM_MARKER: &str = "SMTPLIMITER-TEST-SPAM";
pub const SPAM_SYMBOL: &str = "SMTPLIMITER_TEST_SPAM";
/// In the Subject or the message: action `rewrite subject`, symbol
/// [`SUBJECT_SYMBOL`]; the reply's `subject` is [`SUBJECT_PREFIX`] followed
/// by the message's Subject.
pub const SUBJECT_MARKER: &str = "SMTPLIMITER-TEST-SUBJECT";
pub const SUBJECT_SYMBOL: &str = "SMTPLIMITER_TEST_SUBJECT";
/// What rspamd puts before the Subject for `rewrite subject` (the
/// instance's `actions.subject` is this followed by `%s`).
pub const SUBJECT_PREFIX: &str = "[SPAM] ";
/// In the Subject or the message: action `greylist`, symbol
/// [`GREYLIST_SYMBOL`].
pub const GREYLIST_MARKER: &str = "SMTPLIMITER-TEST-GREYLIST";
pub const GREYLIST_SYMBOL: &str = "SMTPLIMITER_TEST_GREYLIST";
/// In the Subject or the message: action `add header`, symbol
/// [`HEADER_SYMBOL`].
pub const HEADER_MARKER: &str = "SMTPLIMITER-TEST-HEADER";
pub const HEADER_SYMBOL: &str = "SMTPLIMITER_TEST_HEADER";
/// In the Subject or the message: action `soft reject`, symbol
/// [`SOFT_REJECT_SYMBOL`], `messages.smtp_message` [`SOFT_REJECT_MESSAGE`].
pub const SOFT_REJECT_MARKER: &str = "SMTPLIMITER-TEST-SOFTREJECT";
pub const SOFT_REJECT_SYMBOL: &str = "SMTPLIMITER_TEST_SOFTREJECT";
pub const SOFT_REJECT_MESSAGE: &str = "smtp-limiter test soft reject";

/// The test rules: one symbol per marker (a plain substring search in the
/// Subject and the raw message) and a prefilter that forces `soft reject`.
pub const RULES_LUA: &str = r#"-- smtp-limiter test rules (tests/src/rspamd.rs)
local function has(task, needle)
  local subject = task:get_subject() or ''
  if subject:find(needle, 1, true) then return true end
  local content = tostring(task:get_content() or '')
  return content:find(needle, 1, true) ~= nil
end

local rules = {
  {'SMTPLIMITER_TEST_SPAM', 'SMTPLIMITER-TEST-SPAM', 20.0},
  {'SMTPLIMITER_TEST_SUBJECT', 'SMTPLIMITER-TEST-SUBJECT', 12.0},
  {'SMTPLIMITER_TEST_HEADER', 'SMTPLIMITER-TEST-HEADER', 8.0},
  {'SMTPLIMITER_TEST_GREYLIST', 'SMTPLIMITER-TEST-GREYLIST', 5.0},
}
for _, r in ipairs(rules) do
  local name, needle, score = r[1], r[2], r[3]
  rspamd_config:register_symbol({
    name = name,
    score = score,
    group = 'smtplimiter',
    description = 'test marker ' .. needle,
    callback = function(task) return has(task, needle) end,
  })
end

rspamd_config:register_symbol({
  name = 'SMTPLIMITER_TEST_SOFTREJECT',
  score = 0.0,
  group = 'smtplimiter',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    if has(task, 'SMTPLIMITER-TEST-SOFTREJECT') then
      task:set_pre_result('soft reject', 'smtp-limiter test soft reject', 'smtplimiter')
      return true
    end
    return false
  end,
})
"#;

/// The public suffixes the instance knows (its `url_tld` file).
pub const TLDS: &str = "com\norg\nnet\ntest\nexample\nlocalhost\ninvalid\n";

/// Debian's user for rspamd's workers when the fixture runs as root.
const RSPAMD_USER: &str = "_rspamd";
const RSPAMD_BINARY: &str = "/usr/bin/rspamd";
const PLUGINS_DIR: &str = "/usr/share/rspamd/plugins";
/// How long [`Rspamd::start`] waits for `/ping` to answer (about 2 s
/// normally; the machine may be busy).
const START_TIMEOUT: Duration = Duration::from_secs(60);
static SERVER: Server = Server::new("rspamd", "RSPAMD_FIXTURE_KEEP", stop_stale);

/// Why [`Rspamd::start`] cannot work here, or `None` if it can.
#[must_use]
pub fn missing_prerequisite() -> Option<String> {
    if !Path::new(RSPAMD_BINARY).is_file() {
        return Some(format!(
            "{RSPAMD_BINARY} is missing (install Debian's rspamd: `cargo xtask setup`)"
        ));
    }
    let plugin = Path::new(PLUGINS_DIR).join("milter_headers.lua");
    if !plugin.is_file() {
        return Some(format!(
            "{} is missing (is Debian's rspamd package installed?)",
            plugin.display()
        ));
    }
    if is_root() && user_ids(RSPAMD_USER).is_none() {
        return Some(format!(
            "there is no user {RSPAMD_USER} (is Debian's rspamd package installed?)"
        ));
    }
    None
}

/// Whether tests that need rspamd can run here. Under `CI=true` a missing
/// prerequisite is a failure (panic), elsewhere the test is skipped.
pub fn prerequisites(test: &str) -> bool {
    fixture::require(test, missing_prerequisite())
}

/// A running private rspamd. Dropping it stops rspamd and removes its
/// directory.
pub struct Rspamd {
    dir: InstanceDir,
    addr: SocketAddr,
    child: Option<ChildProcess>,
}

impl Rspamd {
    /// Writes the configuration and starts rspamd; returns once `/ping`
    /// answers (at most 60 s).
    ///
    /// # Errors
    /// A missing prerequisite, or rspamd did not start (its log is in the
    /// message).
    pub fn start() -> Result<Rspamd> {
        SERVER.start(missing_prerequisite(), Self::try_start)
    }

    fn try_start() -> Result<Rspamd> {
        let dir = SERVER.new_dir()?;
        let mut rspamd = Rspamd {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            dir,
            child: None,
        };
        // From here on an error drops `rspamd`: it stops what was started
        // and removes the directory.
        rspamd.configure()?;
        rspamd.launch()?;
        Ok(rspamd)
    }

    fn configure(&self) -> Result<()> {
        let d = self.dir.path().display();
        write(&self.dir.join("rules.lua"), RULES_LUA)?;
        write(&self.dir.join("tld.dat"), TLDS)?;
        // No `$CONFDIR/common.conf`, no `$RULESDIR/rspamd.lua`: only the
        // test rules and milter_headers. `filters = ""`: none of the C
        // modules (chartable, dkim, regexp, fuzzy_check). DNS, should
        // anything try it, goes to a closed loopback port.
        let conf = format!(
            "options {{\n\
             \x20 filters = \"\";\n\
             \x20 pidfile = \"{d}/rspamd.pid\";\n\
             \x20 cache_file = \"{d}/symbols.cache\";\n\
             \x20 dynamic_conf = \"{d}/rspamd_dynamic\";\n\
             \x20 history_file = \"{d}/rspamd.history\";\n\
             \x20 control_socket = \"{d}/rspamd.sock mode=0600\";\n\
             \x20 hs_cache_dir = \"{d}/\";\n\
             \x20 tempdir = \"{d}\";\n\
             \x20 url_tld = \"{d}/tld.dat\";\n\
             \x20 local_addrs = [];\n\
             \x20 allow_raw_input = true;\n\
             \x20 disable_hyperscan = true;\n\
             \x20 task_timeout = 8s;\n\
             \x20 dns {{ nameserver = [\"127.0.0.1:1\"]; timeout = 1s; retransmits = 1; }}\n\
             }}\n\
             logging {{\n\
             \x20 type = \"file\";\n\
             \x20 filename = \"{d}/rspamd.log\";\n\
             \x20 level = \"info\";\n\
             \x20 color = false;\n\
             }}\n\
             worker \"normal\" {{\n\
             \x20 bind_socket = \"{addr}\";\n\
             \x20 count = 1;\n\
             \x20 mime = true;\n\
             }}\n\
             actions {{\n\
             \x20 reject = 15;\n\
             \x20 rewrite_subject = 10;\n\
             \x20 subject = \"{SUBJECT_PREFIX}%s\";\n\
             \x20 add_header = 6;\n\
             \x20 greylist = 4;\n\
             }}\n\
             lua = \"{d}/rules.lua\";\n\
             modules {{\n\
             \x20 path = \"{PLUGINS_DIR}/milter_headers.lua\";\n\
             }}\n\
             milter_headers {{\n\
             \x20 use = [\"x-spamd-result\", \"x-spam-status\", \"spam-header\"];\n\
             \x20 skip_local = false;\n\
             \x20 skip_authenticated = false;\n\
             \x20 routines {{\n\
             \x20   spam-header {{ header = \"X-Spam\"; value = \"Yes\"; }}\n\
             \x20 }}\n\
             }}\n",
            addr = self.addr,
        );
        write(&self.dir.join("rspamd.conf"), &conf)
    }

    fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(RSPAMD_BINARY);
        // `-f`: in the foreground, a child this fixture owns (rspamd then
        // writes no pid file: the fixture writes one for the stale reaper).
        cmd.arg("-f").arg("-c").arg(self.dir.join("rspamd.conf"));
        if is_root() {
            // rspamd refuses to run its workers as root unless `-u`/`-g`
            // (or `--insecure`) say otherwise.
            let (uid, gid) =
                user_ids(RSPAMD_USER).with_context(|| format!("there is no user {RSPAMD_USER}"))?;
            chown_tree(self.dir.path(), uid, gid)?;
            cmd.args(["-u", RSPAMD_USER, "-g", RSPAMD_USER]);
        }
        // The working directory marks the instance's processes (rspamd
        // rewrites their command lines): see `instance_processes`.
        cmd.current_dir(self.dir.path());
        let mut child = ChildProcess::spawn("rspamd", &mut cmd, &self.dir.join("rspamd.out"))?;
        write(&self.dir.join("fixture.pid"), &format!("{}\n", child.id()))?;
        child.wait_ready(START_TIMEOUT, "answer /ping", || self.ping(), || self.log())?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether `GET /ping` answers `pong`.
    fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /ping HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut reply = Vec::new();
        let _ = stream.take(4096).read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        reply.starts_with("HTTP/1.") && reply.contains(" 200 ") && reply.contains("pong")
    }

    /// The normal worker's address, `127.0.0.1:PORT`.
    #[must_use]
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (append `/checkv2`).
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The instance's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// rspamd's log so far (`rspamd.log`, one `rspamd_task_write_log` line
    /// per scanned message), then what it printed on stdout/stderr.
    #[must_use]
    pub fn log(&self) -> String {
        self.dir.log_and_output()
    }

    /// The log lines of scanned messages (`rspamd_task_write_log`), e.g.
    /// `… (default: T (reject): [20.00/15.00] [SMTPLIMITER_TEST_SPAM(20.00){}]), len: 115, … dns req: 0, …`.
    #[must_use]
    pub fn scanned(&self) -> Vec<String> {
        self.dir.lines_with("rspamd.log", "rspamd_task_write_log")
    }

    /// Waits until the log contains `needle`.
    #[must_use]
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        fixture::wait_until(timeout, || self.log().contains(needle))
    }

    /// The pids of this instance's processes (main, workers).
    #[must_use]
    pub fn processes(&self) -> Vec<i32> {
        instance_processes(self.dir.path())
    }

    /// Stops rspamd (SIGTERM to the main process, SIGKILL after 5 s, then
    /// SIGKILL to any worker left); the directory stays until the `Rspamd`
    /// is dropped. Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            child.stop();
        }
        kill_leftovers(self.dir.path());
    }
}

impl Drop for Rspamd {
    /// Stops rspamd; then `dir` removes the directory (unless
    /// `RSPAMD_FIXTURE_KEEP`).
    fn drop(&mut self) {
        self.stop();
    }
}

/// The rspamd processes whose working directory is `dir` (the fixture
/// starts rspamd there; rspamd rewrites its command lines, so they cannot
/// tell).
fn instance_processes(dir: &Path) -> Vec<i32> {
    fixture::processes(|pid| {
        fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "rspamd")
            && fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
    })
}

/// SIGKILLs what is left of the instance in `dir` and waits (1 s at most)
/// until it is gone.
fn kill_leftovers(dir: &Path) {
    fixture::kill_all(Duration::from_secs(1), || instance_processes(dir));
}

/// Stops what is left of a stale instance (its processes run in `dir`).
fn stop_stale(dir: &Path, owner: u32) {
    let pids = instance_processes(dir);
    if !pids.is_empty() {
        eprintln!("rspamd fixture: stopping rspamd {pids:?} left by process {owner}");
        kill_leftovers(dir);
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid and gid of the user `name`, from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut fields = l.split(':');
            if fields.next()? != name {
                return None;
            }
            let uid = fields.nth(1)?.parse().ok()?;
            let gid = fields.next()?.parse().ok()?;
            Some((uid, gid))
        })
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .with_context(|| format!("cannot chown {}", dir.display()))?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        std::os::unix::fs::chown(&path, Some(uid), Some(gid))
            .with_context(|| format!("cannot chown {}", path.display()))?;
    }
    Ok(())
}
