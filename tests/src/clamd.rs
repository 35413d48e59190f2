//! A private, real ClamAV `clamd` for one test: its own `clamd.conf` and
//! signature database in a temp dir under /tmp, listening on `127.0.0.1`
//! and a free port (TCP) and on a Unix socket in that directory
//! ([`Clamd::unix_socket`]). Stopped, and its directory removed, when the
//! [`Clamd`] is dropped.
//!
//! This machine has no ClamAV databases (and no network for `freshclam`),
//! and clamd 1.4 has no built-in signatures (not even EICAR's), so the
//! fixture writes its own `smtplimiter.ndb`, two body signatures:
//! [`VIRUS_MARKER`] anywhere in a stream is reported as
//! [`VIRUS_SIGNATURE`], and the EICAR test string ([`eicar`]) as
//! [`EICAR_SIGNATURE`] (clamd appends `.UNOFFICIAL` to names from
//! databases that are not ClamAV's own). clamd loads that in milliseconds.
//!
//! Replies to `INSTREAM` (`z…\0` commands get `\0`-terminated replies,
//! `n…\n` commands `\n`-terminated ones): `stream: OK`,
//! `stream: SMTPLimiter.Test.Virus-7f3a.UNOFFICIAL FOUND`, and, once the
//! chunks exceed [`ClamdOptions::stream_max_length`],
//! `INSTREAM size limit exceeded. ERROR` (after which clamd closes the
//! connection: the client's further writes may fail with EPIPE).
//!
//! Needs Debian's `clamav-daemon` (`cargo xtask setup` installs it and makes
//! sure no system clamd/freshclam runs); not root. See
//! [`missing_prerequisite`]. With `CLAMD_FIXTURE_KEEP` set the directory
//! (config, database, `clamd.log`) is kept. Instances whose test process
//! died before its `Drop` are stopped and removed by the next test process
//! that starts one.

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{self, free_port, write, ChildProcess, InstanceDir, Server};

/// Anywhere in a scanned stream: reported as [`VIRUS_SIGNATURE`].
pub const VIRUS_MARKER: &str = "SMTPLIMITER-TEST-VIRUS-7f3a";
/// The name clamd reports for [`VIRUS_MARKER`]:
/// `stream: SMTPLimiter.Test.Virus-7f3a.UNOFFICIAL FOUND`.
pub const VIRUS_SIGNATURE: &str = "SMTPLimiter.Test.Virus-7f3a.UNOFFICIAL";
/// The name clamd reports for the EICAR test string ([`eicar`]).
pub const EICAR_SIGNATURE: &str = "SMTPLimiter.Test.EICAR.UNOFFICIAL";
/// The EICAR test string, in hex (kept out of the source as text so that
/// scanners of this repository do not flag it).
const EICAR_HEX: &str = "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d\
                         5354414e444152442d414e544956495255532d544553542d46494c452124482b482a";

/// The EICAR anti-virus test string (68 bytes).
#[must_use]
pub fn eicar() -> Vec<u8> {
    (0..EICAR_HEX.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&EICAR_HEX[i..i + 2], 16).expect("EICAR_HEX is hex"))
        .collect()
}

/// The instance's signature database (`.ndb`: name, target type 0 = any
/// file, offset `*` = anywhere, hex body).
fn ndb() -> String {
    let hex: String = VIRUS_MARKER.bytes().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}:0:*:{hex}\n{}:0:*:{EICAR_HEX}\n",
        VIRUS_SIGNATURE.trim_end_matches(".UNOFFICIAL"),
        EICAR_SIGNATURE.trim_end_matches(".UNOFFICIAL"),
    )
}

const CLAMD_BINARY: &str = "/usr/sbin/clamd";
/// How long [`Clamd::start`] waits for `PING` to answer (tens of ms
/// normally).
const START_TIMEOUT: Duration = Duration::from_secs(30);
static SERVER: Server = Server::new("clamd", "CLAMD_FIXTURE_KEEP", stop_stale);

/// What an instance is started with.
#[derive(Clone, Debug)]
pub struct ClamdOptions {
    /// clamd's `StreamMaxLength`, in bytes: an `INSTREAM` whose chunks add
    /// up to more gets `INSTREAM size limit exceeded. ERROR`. Default 1 MiB.
    pub stream_max_length: u64,
}

impl Default for ClamdOptions {
    fn default() -> Self {
        Self {
            stream_max_length: 1024 * 1024,
        }
    }
}

/// Why [`Clamd::start`] cannot work here, or `None` if it can.
#[must_use]
pub fn missing_prerequisite() -> Option<String> {
    if !Path::new(CLAMD_BINARY).is_file() {
        return Some(format!(
            "{CLAMD_BINARY} is missing (install Debian's clamav-daemon: `cargo xtask setup`)"
        ));
    }
    None
}

/// Whether tests that need clamd can run here. Under `CI=true` a missing
/// prerequisite is a failure (panic), elsewhere the test is skipped.
pub fn prerequisites(test: &str) -> bool {
    fixture::require(test, missing_prerequisite())
}

/// A running private clamd. Dropping it stops clamd and removes its
/// directory.
pub struct Clamd {
    /// Before `dir`: dropped first, which stops clamd.
    child: Option<ChildProcess>,
    /// Removed when dropped (unless `CLAMD_FIXTURE_KEEP`).
    dir: InstanceDir,
    tcp: SocketAddr,
    options: ClamdOptions,
}

impl Clamd {
    /// [`Clamd::start_with`] the default options (`StreamMaxLength` 1 MiB).
    ///
    /// # Errors
    /// See [`Clamd::start_with`].
    pub fn start() -> Result<Clamd> {
        Self::start_with(ClamdOptions::default())
    }

    /// Writes the configuration and database and starts clamd; returns once
    /// it answers `PING` on both sockets (at most 30 s).
    ///
    /// # Errors
    /// A missing prerequisite, or clamd did not start (its log is in the
    /// message).
    pub fn start_with(options: ClamdOptions) -> Result<Clamd> {
        SERVER.start(missing_prerequisite(), || Self::try_start(&options))
    }

    fn try_start(options: &ClamdOptions) -> Result<Clamd> {
        let dir = SERVER.new_dir()?;
        let mut clamd = Clamd {
            tcp: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            dir,
            child: None,
            options: options.clone(),
        };
        // From here on an error drops `clamd`: it stops what was started
        // and removes the directory.
        clamd.configure()?;
        clamd.launch()?;
        Ok(clamd)
    }

    fn configure(&self) -> Result<()> {
        let d = self.dir.path();
        fs::create_dir(d.join("db")).context("creating the database directory")?;
        write(&d.join("db").join("smtplimiter.ndb"), &ndb())?;
        // No `User`: clamd stays whoever starts it. `SelfCheck 0`: no
        // database reloads. `Bytecode no`: there is no bytecode database.
        let conf = format!(
            "Foreground yes\n\
             TCPSocket {port}\n\
             TCPAddr 127.0.0.1\n\
             LocalSocket {d}/clamd.sock\n\
             LocalSocketMode 600\n\
             FixStaleSocket yes\n\
             PidFile {d}/clamd.pid\n\
             DatabaseDirectory {d}/db\n\
             TemporaryDirectory {d}\n\
             LogFile {d}/clamd.log\n\
             LogTime yes\n\
             LogClean yes\n\
             LogFileMaxSize 0\n\
             StreamMaxLength {max}\n\
             MaxThreads 4\n\
             SelfCheck 0\n\
             Bytecode no\n",
            port = self.tcp.port(),
            d = d.display(),
            max = self.options.stream_max_length,
        );
        write(&d.join("clamd.conf"), &conf)
    }

    fn launch(&mut self) -> Result<()> {
        let mut child = ChildProcess::spawn(
            "clamd",
            Command::new(CLAMD_BINARY)
                .arg("-c")
                .arg(self.dir.join("clamd.conf"))
                .current_dir(self.dir.path()),
            &self.dir.join("clamd.out"),
        )?;
        child.wait_ready(
            START_TIMEOUT,
            "answer PING",
            || self.ping_tcp() && self.ping_unix(),
            || self.log(),
        )?;
        self.child = Some(child);
        Ok(())
    }

    fn ping_tcp(&self) -> bool {
        TcpStream::connect_timeout(&self.tcp, Duration::from_millis(200))
            .is_ok_and(|s| ping(s, |s, t| s.set_read_timeout(t)))
    }

    fn ping_unix(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.unix_socket())
            .is_ok_and(|s| ping(s, |s, t| s.set_read_timeout(t)))
    }

    /// The TCP socket, `127.0.0.1:PORT`.
    #[must_use]
    pub fn tcp_address(&self) -> SocketAddr {
        self.tcp
    }

    /// The Unix socket (`LocalSocket`), mode 0600.
    #[must_use]
    pub fn unix_socket(&self) -> PathBuf {
        self.dir.join("clamd.sock")
    }

    /// The name reported for [`VIRUS_MARKER`] ([`VIRUS_SIGNATURE`]).
    #[must_use]
    pub fn signature_name(&self) -> &'static str {
        VIRUS_SIGNATURE
    }

    /// `StreamMaxLength`, in bytes.
    #[must_use]
    pub fn stream_max_length(&self) -> u64 {
        self.options.stream_max_length
    }

    /// The instance's directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// clamd's log so far (`clamd.log`: one `instream(…): …` line per
    /// scan), then what it printed on stdout/stderr.
    #[must_use]
    pub fn log(&self) -> String {
        self.dir.log_and_output()
    }

    /// The log's scan lines (`instream(127.0.0.1@PORT): OK`,
    /// `instream(local): … FOUND`).
    #[must_use]
    pub fn scanned(&self) -> Vec<String> {
        self.dir.lines_with("clamd.log", "instream(")
    }

    /// Stops clamd (SIGTERM, then SIGKILL after 5 s); the directory stays
    /// until the `Clamd` is dropped. Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = &mut self.child {
            child.stop();
        }
    }
}

/// `zPING\0` → `PONG\0` on a fresh connection.
fn ping<S: Read + Write>(
    mut stream: S,
    set_timeout: impl Fn(&S, Option<Duration>) -> std::io::Result<()>,
) -> bool {
    let _ = set_timeout(&stream, Some(Duration::from_secs(2)));
    if stream.write_all(b"zPING\0").is_err() {
        return false;
    }
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).is_ok() && &reply == b"PONG\0"
}

/// Stops the clamd of a stale instance, if still running: the pid file,
/// checked against the command line (which names the instance's
/// clamd.conf).
fn stop_stale(dir: &Path, owner: u32) {
    let clamd = || fixture::pid_file_process(dir, "clamd.pid");
    if let Some(pid) = clamd() {
        eprintln!("clamd fixture: stopping clamd {pid} left by process {owner}");
        fixture::kill_all(Duration::from_secs(1), || clamd().into_iter().collect());
    }
}
