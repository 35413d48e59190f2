//! A private, real Postfix for one test: its own config, queue and data
//! directories in a temp dir under /tmp, an smtpd on `127.0.0.1` and a free
//! port, and a log file of its own (`maillog_file`, no syslog needed). Any
//! number of instances can run at once; each is stopped, with all its
//! processes, and its directory removed when the [`Postfix`] is dropped.
//!
//! The instance accepts mail for the virtual domain [`DOMAIN`] (only the
//! recipients in [`PostfixOptions::recipients`]; others get `550 5.1.1 …
//! User unknown in virtual mailbox table`), refuses relaying (`554 5.7.1 …
//! Relay access denied`) and hands accepted mail to the `discard` transport,
//! so each delivery is one `status=sent` line in the log ([`Postfix::delivered`]).
//! Reverse DNS is off (`smtpd_peername_lookup = no`): clients show up as
//! `unknown[ADDR]`, and the tests send no DNS queries. Postfix's own limits
//! stay at their defaults (at most 100 smtpd processes; anvil's 50
//! concurrent connections per client, which 127.0.0.0/8 is exempt from but
//! an address given by PROXY or XCLIENT is not): raise them with
//! [`PostfixOptions::extra_main_cf`] for load tests.
//!
//! Debugging: with `POSTFIX_FIXTURE_KEEP` set in the environment the
//! directory (config, queue, `maillog`) is kept after the instance stops.
//! Instances whose test process died before its `Drop` (SIGKILL, a timeout)
//! are stopped and removed by the next test process that starts one.
//!
//! Needs root (Postfix's master runs as root and its daemons as the `postfix`
//! user) and Debian's `postfix` package installed with no system instance
//! configured (`cargo xtask setup` does both); see [`missing_prerequisite`].
//! SMTP AUTH only with [`PostfixOptions::sasl_users`]: Cyrus SASL with a
//! sasldb of the instance's own (and then Cyrus' `saslpasswd2`, from
//! `sasl2-bin`; see [`sasl_missing_prerequisite`]).

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::fixture::{self, free_port, wait_until, InstanceDir, Server};

/// `myhostname` of every instance: the banner is `220 mx.example.test ESMTP`.
pub const HOSTNAME: &str = "mx.example.test";
/// The one domain the instances accept mail for (`virtual_mailbox_domains`).
pub const DOMAIN: &str = "example.com";
/// The valid recipients unless [`PostfixOptions::recipients`] says otherwise.
pub const DEFAULT_RECIPIENTS: [&str; 4] = [
    "alice@example.com",
    "bob@example.com",
    "carol@example.com",
    "postmaster@example.com",
];

/// How long the helpers wait for Postfix to deliver or log something:
/// generous, as CI runs many instances on two CPUs.
pub const LOG_WAIT: Duration = Duration::from_secs(15);
/// How long [`Postfix::start`] waits for the banner.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Drop`] waits for the processes to exit after SIGTERM before
/// it kills them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Where Debian's package keeps the programs.
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/usr/lib/postfix/sbin", "/usr/bin", "/sbin"];
/// The realm of [`PostfixOptions::sasl_users`] (`smtpd_sasl_local_domain`):
/// clients log in with the bare user name, Cyrus looks up `user@REALM`.
pub const SASL_REALM: &str = HOSTNAME;
/// Every instance's directory is /tmp/smtp-limiter-postfix.PID.N.NANOS (PID:
/// the test process's).
static SERVER: Server = Server::new("postfix", "POSTFIX_FIXTURE_KEEP", stop_stale);
/// The master.cf that the instances' master.cf is made from.
const MASTER_CF_SOURCES: [&str; 2] = [
    "/usr/share/postfix/master.cf.dist",
    "/etc/postfix/master.cf",
];

/// What an instance is started with. `Default`: no PROXY protocol, no
/// XCLIENT, [`DEFAULT_RECIPIENTS`], nothing extra.
#[derive(Debug, Clone)]
pub struct PostfixOptions {
    /// `smtpd_upstream_proxy_protocol = haproxy`: every connection must open
    /// with a PROXY v1 (or v2) header; a client that sends none gets no
    /// banner and is dropped after `smtpd_upstream_proxy_timeout` (5 s).
    pub proxy_protocol: bool,
    /// `smtpd_authorized_xclient_hosts`, e.g. `127.0.0.0/8`; `None`: empty,
    /// XCLIENT is refused.
    pub xclient_hosts: Option<String>,
    /// The valid recipients, full addresses in [`DOMAIN`].
    pub recipients: Vec<String>,
    /// More main.cf settings; a key given here replaces the fixture's value.
    pub extra_main_cf: Vec<(String, String)>,
    /// SMTP AUTH users and their passwords. Empty (the default): no SASL,
    /// the EHLO reply offers no AUTH. Otherwise smtpd offers `AUTH PLAIN
    /// LOGIN` (in the clear: no TLS here), checked by Cyrus SASL against
    /// `conf/sasl/sasldb2` in the instance's directory: a right password gets
    /// `235 2.7.0 Authentication successful`, a wrong one `535 5.7.8 …
    /// authentication failed`.
    pub sasl_users: Vec<(String, String)>,
}

impl Default for PostfixOptions {
    fn default() -> Self {
        PostfixOptions {
            proxy_protocol: false,
            xclient_hosts: None,
            recipients: DEFAULT_RECIPIENTS.iter().map(|r| r.to_string()).collect(),
            extra_main_cf: Vec::new(),
            sasl_users: Vec::new(),
        }
    }
}

impl PostfixOptions {
    /// An instance for load (benchmarks): the fixture already turns error
    /// throttling off (`smtpd_soft_error_limit`, `smtpd_hard_error_limit`,
    /// `smtpd_error_sleep_time`); anvil's per-client limits go too, and up
    /// to 200 smtpd processes run at once.
    #[must_use]
    pub fn for_load(proxy_protocol: bool) -> Self {
        let extra = [
            ("smtpd_client_connection_count_limit", "0"),
            ("smtpd_client_connection_rate_limit", "0"),
            ("smtpd_client_message_rate_limit", "0"),
            ("smtpd_client_recipient_rate_limit", "0"),
            ("default_process_limit", "200"),
        ];
        PostfixOptions {
            proxy_protocol,
            extra_main_cf: extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..PostfixOptions::default()
        }
    }
}

/// A running private Postfix instance. Dropping it stops the instance (all
/// its processes are gone when `drop` returns) and removes its directory.
pub struct Postfix {
    dir: InstanceDir,
    addr: SocketAddr,
    name: String,
}

/// Why [`Postfix::start`] cannot work here, or `None` if it can.
pub fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("a private Postfix needs root".into());
    }
    for tool in ["postfix", "postconf"] {
        if let Err(e) = postfix_tool(tool) {
            return Some(format!("{e:#}"));
        }
    }
    if master_cf_source().is_none() {
        return Some(format!(
            "none of {} exists (is Debian's postfix package installed?)",
            MASTER_CF_SOURCES.join(", ")
        ));
    }
    None
}

/// Why [`PostfixOptions::sasl_users`] cannot work here (on top of
/// [`missing_prerequisite`]), or `None` if it can.
pub fn sasl_missing_prerequisite() -> Option<String> {
    saslpasswd2().err().map(|e| format!("{e:#}"))
}

fn saslpasswd2() -> Result<PathBuf> {
    fixture::find_program(
        "saslpasswd2",
        &TOOL_DIRS,
        "install Cyrus SASL's tools (sasl2-bin): `cargo xtask setup`",
    )
}

/// The path of a program from the postfix package: `postfix`, `postconf`,
/// `smtp-sink`, `smtp-source`, `posttls-finger`, `postqueue`, … (on Debian
/// all in /usr/sbin).
pub fn postfix_tool(name: &str) -> Result<PathBuf> {
    fixture::find_program(name, &TOOL_DIRS, "install Postfix: `cargo xtask setup`")
}

impl Postfix {
    /// Starts an instance and returns once its smtpd has answered with the
    /// banner (at most 15 s). The readiness probe is one connection that
    /// reads the banner and says QUIT (with `proxy_protocol`, after a PROXY
    /// header from 127.0.0.1), so the log starts with one
    /// `connect from unknown[127.0.0.1]` … `disconnect from` pair.
    pub fn start(opts: PostfixOptions) -> Result<Postfix> {
        SERVER.start(missing_prerequisite(), || Self::try_start(&opts))
    }

    fn try_start(opts: &PostfixOptions) -> Result<Postfix> {
        let dir = SERVER.new_dir()?;
        // Mode 0755: the daemons run as the `postfix` user and must reach
        // the queue in it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod {}", dir.path().display()))?;
        let name = format!("postfix-{}", dir.id());
        let port = free_port()?;
        // From here on an error drops `postfix`, which stops what was
        // started and removes the directory.
        let postfix = Postfix {
            dir,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            name,
        };
        postfix.configure(opts)?;
        // `start` first runs what `postfix check` does (and creates the
        // queue's subdirectories).
        postfix.run_postfix("start")?;
        postfix.wait_ready(opts.proxy_protocol)?;
        Ok(postfix)
    }

    /// The smtpd's address: 127.0.0.1 and the instance's port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The instance's directory, with `conf/` (config_directory: main.cf,
    /// master.cf, recipients), `queue/`, `data/` and `maillog`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// config_directory, for `postfix -c` and `postconf -c`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("conf")
    }

    /// The instance's `syslog_name` and `multi_instance_name`,
    /// `postfix-PID.N.NANOS`: its log lines are tagged `NAME/smtpd[PID]:` etc.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log so far (`maillog_file`); empty if there is none yet. Written
    /// asynchronously by postlogd: poll with [`Postfix::wait_for_log`].
    pub fn log(&self) -> String {
        self.dir.read("maillog")
    }

    /// Polls the log until it contains `needle`; whether it did in `timeout`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// The number of deliveries so far: log lines with `status=sent` (each
    /// accepted recipient is delivered once, to `discard`).
    pub fn delivered(&self) -> usize {
        count_sent(&self.log())
    }

    /// Polls until [`Postfix::delivered`] is at least `n`; whether it got
    /// there in `timeout`. (To check that no more arrive:
    /// [`Postfix::expect_delivered`].)
    pub fn wait_delivered(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.delivered() >= n)
    }

    /// Asserts that Postfix delivered exactly `n` messages: waits (at most
    /// [`LOG_WAIT`] each) for `n` deliveries, then for an empty queue, then
    /// until the log holds everything logged before that
    /// ([`Postfix::flush_log`]), and counts. Each message a client was told
    /// was accepted (250 to the end of DATA, which the proxy relays only
    /// from Postfix) before the call is in the queue or delivered by then,
    /// and each delivery agent logs its `status=sent` before its message
    /// leaves the queue: so a duplicate or an extra delivery is counted,
    /// with no sleep. (Messages of sessions still running are not covered:
    /// wait for their disconnects first, [`Postfix::expect_disconnects`].)
    ///
    /// # Panics
    /// When the count is not `n`, with the log.
    #[track_caller]
    pub fn expect_delivered(&self, n: usize) {
        assert!(
            self.wait_delivered(n, LOG_WAIT),
            "Postfix delivered {} of {n} messages; log:\n{}",
            self.delivered(),
            self.log()
        );
        assert!(
            self.wait_queue_empty(LOG_WAIT),
            "Postfix's queue did not empty; log:\n{}",
            self.log()
        );
        if let Err(e) = self.flush_log() {
            panic!("{e:#}; log:\n{}", self.log());
        }
        assert_eq!(self.delivered(), n, "deliveries; log:\n{}", self.log());
    }

    /// Returns once every record logged before the call is in the log
    /// file: logs a marker of its own through postlogd (`postlog`), which
    /// writes records in the order they came, and waits (at most
    /// [`LOG_WAIT`]) until the marker is in the file.
    ///
    /// # Errors
    /// postlog failed, or the marker did not show up in time.
    pub fn flush_log(&self) -> Result<()> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let marker = format!(
            "smtp-limiter-test-log-marker-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = Command::new(postfix_tool("postlog")?)
            .arg("-c")
            .arg(self.config_dir())
            .args(["-t", &format!("{}/test-marker", self.name), &marker])
            .env_remove("MAIL_CONFIG")
            .stdin(Stdio::null())
            .output()
            .context("running postlog")?;
        if !out.status.success() {
            bail!(
                "postlog failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !wait_until(LOG_WAIT, || self.log().contains(&marker)) {
            bail!("postlog's marker {marker} not in the log within {LOG_WAIT:?}");
        }
        Ok(())
    }

    /// The `disconnect from` lines so far (one per smtpd session; the
    /// fixture's readiness probe is the first).
    pub fn disconnects(&self) -> Vec<String> {
        log_lines(&self.log(), "]: disconnect from ")
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Waits (at most [`LOG_WAIT`]) until Postfix has logged `n` session
    /// ends (`disconnect from`, the fixture's readiness probe included);
    /// returns them all.
    ///
    /// # Panics
    /// When fewer came, with the log.
    #[track_caller]
    pub fn expect_disconnects(&self, n: usize) -> Vec<String> {
        let mut lines = Vec::new();
        let reached = wait_until(LOG_WAIT, || {
            lines = self.disconnects();
            lines.len() >= n
        });
        assert!(
            reached,
            "Postfix logged {} of {n} disconnects; log:\n{}",
            lines.len(),
            self.log()
        );
        lines
    }

    /// Polls until no message is in the queue (incoming, active, deferred,
    /// hold, maildrop); whether that happened in `timeout`.
    pub fn wait_queue_empty(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.queued() == 0)
    }

    /// The number of messages in the queue directories right now.
    pub fn queued(&self) -> usize {
        ["maildrop", "incoming", "active", "deferred", "hold"]
            .iter()
            .map(|q| count_files(&self.dir.join("queue").join(q)))
            .sum()
    }

    /// The pids of the instance's processes (master and its children).
    pub fn processes(&self) -> Vec<i32> {
        instance_processes(&self.config_dir())
    }

    fn configure(&self, opts: &PostfixOptions) -> Result<()> {
        let dir = self.dir.path();
        let d = dir.display();
        let mut recipients = String::new();
        for r in &opts.recipients {
            let _ = writeln!(recipients, "{r} OK");
        }
        // Separate trees, as Postfix wants them: the configuration and the
        // queue owned by root (`postfix start` creates the queue's
        // subdirectories with their owners and modes, and data/).
        let conf = self.config_dir();
        for sub in [&conf, &dir.join("queue")] {
            fs::create_dir(sub).with_context(|| format!("cannot create {}", sub.display()))?;
            fs::set_permissions(sub, fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot chmod {}", sub.display()))?;
        }
        write_file(&conf.join("recipients"), &recipients)?;

        let source = master_cf_source().context("no master.cf to start from")?;
        let dist = fs::read_to_string(&source)
            .with_context(|| format!("cannot read {}", source.display()))?;
        write_file(&conf.join("master.cf"), &master_cf(&dist, self.addr))?;

        let mut main: Vec<(String, String)> = [
            ("compatibility_level", "3.6".to_string()),
            ("queue_directory", format!("{d}/queue")),
            ("data_directory", format!("{d}/data")),
            // postfix-files and dynamicmaps.cf stay with the package.
            ("meta_directory", "/etc/postfix".into()),
            ("multi_instance_name", self.name.clone()),
            ("syslog_name", self.name.clone()),
            ("maillog_file", format!("{d}/maillog")),
            ("maillog_file_prefixes", d.to_string()),
            ("inet_interfaces", "127.0.0.1".into()),
            ("inet_protocols", "ipv4".into()),
            ("myhostname", HOSTNAME.into()),
            ("mydomain", "example.test".into()),
            ("myorigin", "$myhostname".into()),
            ("mydestination", String::new()),
            ("relay_domains", String::new()),
            ("mynetworks", "127.0.0.0/8".into()),
            ("virtual_mailbox_domains", DOMAIN.into()),
            (
                "virtual_mailbox_maps",
                format!("texthash:{d}/conf/recipients"),
            ),
            ("virtual_transport", "discard:".into()),
            // Nothing leaves the machine, whatever a test sends.
            (
                "default_transport",
                "error:outbound mail disabled in tests".into(),
            ),
            (
                "relay_transport",
                "error:outbound mail disabled in tests".into(),
            ),
            ("smtp_dns_support_level", "disabled".into()),
            ("smtpd_peername_lookup", "no".into()),
            ("alias_maps", String::new()),
            ("alias_database", String::new()),
            ("biff", "no".into()),
            ("smtpd_banner", "$myhostname ESMTP".into()),
            (
                "smtpd_relay_restrictions",
                "reject_unauth_destination".into(),
            ),
            (
                "smtpd_recipient_restrictions",
                "reject_unauth_destination".into(),
            ),
            ("smtpd_soft_error_limit", "1000".into()),
            ("smtpd_hard_error_limit", "1000".into()),
            ("smtpd_error_sleep_time", "0".into()),
            (
                "smtpd_upstream_proxy_protocol",
                if opts.proxy_protocol { "haproxy" } else { "" }.into(),
            ),
            (
                "smtpd_authorized_xclient_hosts",
                opts.xclient_hosts.clone().unwrap_or_default(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if !opts.sasl_users.is_empty() {
            main.extend(self.configure_sasl(&opts.sasl_users)?);
        }
        for (key, value) in &opts.extra_main_cf {
            match main.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1 = value.clone(),
                None => main.push((key.clone(), value.clone())),
            }
        }
        let mut text = String::from("# Written by the smtp-limiter tests' Postfix fixture.\n");
        for (key, value) in &main {
            if value.contains('\n') {
                bail!("main.cf value of {key} has a newline: {value:?}");
            }
            let _ = writeln!(text, "{key} = {value}");
        }
        write_file(&conf.join("main.cf"), &text)
    }

    /// Writes `conf/sasl/smtpd.conf` and `conf/sasl/sasldb2` with `users`;
    /// returns the main.cf settings that make smtpd use them. In
    /// config_directory because Debian's Postfix looks for smtpd.conf in
    /// `$config_directory/sasl` whatever `cyrus_sasl_config_path` says (set
    /// all the same, for other builds). The sasldb is world-readable:
    /// smtpd reads it as the `postfix` user (test passwords only).
    fn configure_sasl(&self, users: &[(String, String)]) -> Result<Vec<(String, String)>> {
        let sasl = self.config_dir().join("sasl");
        fs::create_dir(&sasl).with_context(|| format!("cannot create {}", sasl.display()))?;
        fs::set_permissions(&sasl, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod {}", sasl.display()))?;
        let db = sasl.join("sasldb2");
        write_file(
            &sasl.join("smtpd.conf"),
            &format!(
                "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n\
                 sasldb_path: {}\n",
                db.display()
            ),
        )?;
        let saslpasswd2 = saslpasswd2()?;
        for (user, password) in users {
            if password.contains(['\n', '\r']) {
                bail!("SASL password of {user} has a line break");
            }
            let mut child = Command::new(&saslpasswd2)
                .arg("-p")
                .arg("-f")
                .arg(&db)
                .args(["-c", "-u", SASL_REALM, user])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot run saslpasswd2")?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(password.as_bytes())
                    .context("cannot give saslpasswd2 the password")?;
            }
            let out = child.wait_with_output().context("running saslpasswd2")?;
            if !out.status.success() {
                bail!(
                    "saslpasswd2 for {user} failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644))
            .with_context(|| format!("cannot chmod {}", db.display()))?;
        Ok([
            ("smtpd_sasl_auth_enable", "yes".to_owned()),
            ("smtpd_sasl_type", "cyrus".to_owned()),
            ("smtpd_sasl_path", "smtpd".to_owned()),
            ("cyrus_sasl_config_path", sasl.display().to_string()),
            ("smtpd_sasl_local_domain", SASL_REALM.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect())
    }

    /// `postfix -c DIR ACTION`; fails with its output and the log's tail.
    fn run_postfix(&self, action: &str) -> Result<()> {
        let out = self.postfix_cmd(action).output();
        let out = out.with_context(|| format!("cannot run postfix {action}"))?;
        if !out.status.success() {
            bail!(
                "`postfix -c {} {action}` failed ({}): {}{}\nlog:\n{}",
                self.config_dir().display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&self.log(), 20)
            );
        }
        Ok(())
    }

    fn postfix_cmd(&self, action: &str) -> Command {
        let mut cmd = Command::new(postfix_tool("postfix").unwrap_or_else(|_| "postfix".into()));
        cmd.arg("-c")
            .arg(self.config_dir())
            .arg(action)
            .env_remove("MAIL_CONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// Connects until the banner comes (or the master is gone, or 15 s).
    fn wait_ready(&self, proxy_protocol: bool) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last_error = String::from("not tried");
        while Instant::now() < deadline {
            match self.probe(proxy_protocol) {
                Ok(()) => return Ok(()),
                Err(e) => last_error = format!("{e:#}"),
            }
            if self.master_pid().is_none() {
                bail!(
                    "Postfix in {} stopped while starting ({last_error}); log:\n{}",
                    self.dir.path().display(),
                    tail(&self.log(), 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "no SMTP banner from Postfix on {} within {START_TIMEOUT:?} ({last_error}); log:\n{}",
            self.addr,
            tail(&self.log(), 20)
        )
    }

    fn probe(&self, proxy_protocol: bool) -> Result<()> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_write_timeout(Some(Duration::from_secs(3)))?;
        if proxy_protocol {
            let local = stream.local_addr()?;
            write!(
                stream,
                "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
                local.port(),
                self.addr.port()
            )?;
        }
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut banner = String::new();
        reader.read_line(&mut banner)?;
        if !banner.starts_with("220 ") {
            bail!("unexpected banner {banner:?}");
        }
        stream.write_all(b"QUIT\r\n")?;
        let mut bye = String::new();
        let _ = reader.read_line(&mut bye);
        Ok(())
    }

    /// The master's pid, if its pid file names a live process.
    fn master_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.dir.join("queue/pid/master.pid")).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        // SAFETY: signal 0 only checks that the process exists.
        (pid > 0 && unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
    }

    /// What `postfix stop` does, without its one-second polling: SIGTERM to
    /// the master (which terminates its process group), then wait until no
    /// process of the instance is left; SIGKILL whatever is after 5 s.
    fn stop(&self) -> Result<()> {
        if let Some(pid) = self.master_pid() {
            fixture::signal(pid, libc::SIGTERM);
        }
        if !wait_until(STOP_TIMEOUT, || self.processes().is_empty()) {
            eprintln!(
                "postfix fixture: {} still running {STOP_TIMEOUT:?} after SIGTERM: {:?}; killing",
                self.dir.path().display(),
                self.processes()
            );
            if !fixture::kill_all(Duration::from_secs(2), || self.processes()) {
                bail!(
                    "processes still running after SIGKILL: {:?}",
                    self.processes()
                );
            }
        }
        Ok(())
    }
}

impl Drop for Postfix {
    /// Stops the instance; then `dir` removes the directory (unless
    /// `POSTFIX_FIXTURE_KEEP`, or the instance did not stop: then the
    /// directory has the log of what went wrong).
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!(
                "postfix fixture: stopping {}: {e:#}",
                self.dir.path().display()
            );
            self.dir.keep();
        }
    }
}

/// The pids of the processes of the instance whose config_directory is
/// `config_dir`: those whose environment has `MAIL_CONFIG=CONFIG_DIR` (the
/// `postfix` command sets it, and the master passes it on to every daemon).
/// `pgrep -f` finds none of them by directory: their command lines do not
/// name it.
pub fn instance_processes(config_dir: &Path) -> Vec<i32> {
    let mut needle = b"MAIL_CONFIG=".to_vec();
    needle.extend_from_slice(config_dir.as_os_str().as_encoded_bytes());
    fixture::processes(|pid| {
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_slice()))
    })
}

/// The lines of a Postfix log that contain `needle`.
pub fn log_lines<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// What Postfix counted in a session, from its `disconnect from` line:
/// the part after the client, e.g. `ehlo=1 mail=1 rcpt=1 data=1 quit=1
/// commands=5` (the whole line if it has no such part).
pub fn command_counts(disconnect: &str) -> &str {
    disconnect
        .split_once(" disconnect from ")
        .and_then(|(_, rest)| rest.split_once("] "))
        .map_or(disconnect, |(_, counts)| counts.trim())
}

/// Counts `status=sent` lines in a Postfix log.
pub fn count_sent(log: &str) -> usize {
    log.lines().filter(|l| l.contains(" status=sent ")).count()
}

/// The instance's master.cf: Debian's, with the `smtp inet` service moved to
/// `addr`, no chroot for any service (no chroot tree to set up), the
/// `pipe` services (maildrop, uucp, …: users that do not exist) and
/// per-service `syslog_name`s left out.
fn master_cf(dist: &str, addr: SocketAddr) -> String {
    let mut out = String::from("# Written by the smtp-limiter tests' Postfix fixture.\n");
    let mut keep = true;
    for line in dist.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with(char::is_whitespace) {
            // `-o` or argument lines of the service above; a service's own
            // syslog_name would hide which instance logged.
            if keep && !line.contains("syslog_name=") {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        let mut fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            keep = false;
            continue;
        }
        keep = fields[7] != "pipe";
        if !keep {
            continue;
        }
        let service = addr.to_string();
        if fields[0] == "smtp" && fields[1] == "inet" {
            fields[0] = &service;
        }
        fields[4] = "n";
        let _ = writeln!(
            out,
            "{:<10} {:<5} {:<7} {:<7} {:<7} {:<7} {:<7} {}",
            fields[0],
            fields[1],
            fields[2],
            fields[3],
            fields[4],
            fields[5],
            fields[6],
            fields[7..].join(" ")
        );
    }
    out
}

/// Stops an instance that a test process which no longer runs left behind
/// (killed before its `Drop`, e.g. by a CI timeout or SIGKILL); its
/// directory is removed next.
fn stop_stale(dir: &Path, owner: u32) {
    let processes = || instance_processes(&dir.join("conf"));
    eprintln!(
        "postfix fixture: removing {} left by process {owner} (killing {:?})",
        dir.display(),
        processes()
    );
    fixture::kill_all(Duration::from_secs(1), processes);
}

fn master_cf_source() -> Option<PathBuf> {
    MASTER_CF_SOURCES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Writes a config file, mode 0644, dated a minute back: Postfix reads a
/// configuration file only once its mtime is in the past (load_file(3)
/// sleeps 300 ms and retries otherwise), which made every freshly written
/// main.cf cost each Postfix program up to a second or two at start.
fn write_file(path: &Path, text: &str) -> Result<()> {
    let context = || format!("cannot write {}", path.display());
    fs::write(path, text).with_context(context)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).with_context(context)?;
    let past = SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(past))
        .with_context(context)
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
