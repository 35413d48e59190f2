//! A private, real `redis-server` for one test: its own directory under
//! /tmp, `127.0.0.1` and a free port, no persistence (`--save ''
//! --appendonly no`: nothing is written but its log). Stopped, and its
//! directory removed, when the [`Redis`] is dropped (optionally with a
//! password, or TLS only with a CA of its own: `openssl` needed); [`Redis::kill`] and
//! [`Redis::restart`] take it away and bring it back on the same port
//! (empty, as a Redis without persistence comes back).
//!
//! Needs Debian's `redis-server` and `redis-cli` (`cargo xtask setup`
//! installs them without a system instance). With `REDIS_FIXTURE_KEEP`
//! set the directory is kept. Instances whose test process died before its
//! `Drop` are stopped by the next test process that starts one.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::fixture::{self, free_port, ChildProcess, InstanceDir, Server};

const TOOL_DIRS: [&str; 4] = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"];
/// How long [`Redis::start`] waits for redis-server to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(20);
static SERVER: Server = Server::new("redis", "REDIS_FIXTURE_KEEP", stop_stale);

/// Why tests that need Redis cannot run here, if they cannot.
#[must_use]
pub fn missing_prerequisite() -> Option<String> {
    ["redis-server", "redis-cli"]
        .into_iter()
        .find_map(|tool| tool_path(tool).err().map(|e| format!("{e:#}")))
}

/// Whether tests that need Redis can run here. Under `CI=true` a missing
/// prerequisite is a failure (panic), elsewhere the test is skipped.
pub fn prerequisites(test: &str) -> bool {
    fixture::require(test, missing_prerequisite())
}

fn tool_path(name: &str) -> Result<PathBuf> {
    fixture::find_program(
        name,
        &TOOL_DIRS,
        "install redis-server: `cargo xtask setup`",
    )
}

/// A running private redis-server.
pub struct Redis {
    dir: InstanceDir,
    addr: SocketAddr,
    child: Option<ChildProcess>,
    /// `requirepass`: clients must AUTH.
    password: Option<String>,
    /// TLS only (`rediss://`), with a certificate for 127.0.0.1 signed by
    /// [`Redis::ca_file`].
    tls: bool,
}

impl Redis {
    /// Starts an instance on a free port (another one if it was taken).
    ///
    /// # Errors
    /// A missing prerequisite, or redis-server did not come up.
    pub fn start() -> Result<Redis> {
        Self::start_with(None, false)
    }

    /// [`Redis::start`], speaking TLS only, with a certificate for
    /// 127.0.0.1 signed by a CA of its own ([`Redis::ca_file`]).
    ///
    /// # Errors
    /// As [`Redis::start`].
    pub fn start_tls() -> Result<Redis> {
        Self::start_with(None, true)
    }

    /// [`Redis::start`], refusing clients that do not AUTH with
    /// `password`.
    ///
    /// # Errors
    /// As [`Redis::start`].
    pub fn start_with_password(password: &str) -> Result<Redis> {
        Self::start_with(Some(password), false)
    }

    fn start_with(password: Option<&str>, tls: bool) -> Result<Redis> {
        SERVER.start(missing_prerequisite(), || {
            let mut redis = Redis {
                dir: SERVER.new_dir()?,
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
                child: None,
                password: password.map(str::to_owned),
                tls,
            };
            if tls {
                crate::certs::write_ca_and_server(redis.dir.path())?;
            }
            redis.launch()?;
            Ok(redis)
        })
    }

    fn launch(&mut self) -> Result<()> {
        let d = self.dir.path();
        let mut command = Command::new(tool_path("redis-server")?);
        let port = self.addr.port().to_string();
        if self.tls {
            command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(d.join("cert.pem"))
                .arg("--tls-key-file")
                .arg(d.join("key.pem"))
                .arg("--tls-ca-cert-file")
                .arg(d.join("ca.pem"));
        } else {
            command.args(["--port", &port]);
        }
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(d)
            .arg("--pidfile")
            .arg(d.join("redis.pid"))
            .arg("--logfile")
            .arg(d.join("redis.log"))
            // Also on a Unix socket ([`Redis::unix_url`]).
            .arg("--unixsocket")
            .arg(d.join("redis.sock"))
            .args(["--unixsocketperm", "700"]);
        if let Some(password) = &self.password {
            command.arg("--requirepass").arg(password);
        }
        let mut child = ChildProcess::spawn("redis", &mut command, &d.join("redis.out"))?;
        let addr = self.addr;
        let dir = &self.dir;
        let tls = self.tls;
        child.wait_ready(
            START_TIMEOUT,
            "answer PING",
            // Without AUTH a protected server answers -NOAUTH: up all the
            // same. A TLS one is up once it accepts connections.
            || {
                if tls {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                } else {
                    ping(addr)
                }
            },
            || dir.log_and_output(),
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// `redis://127.0.0.1:PORT/0` (`rediss://` for TLS).
    #[must_use]
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://{}/0", self.addr)
    }

    /// `unix:///…/redis.sock`: the same server on its Unix socket.
    #[must_use]
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.dir.join("redis.sock").display())
    }

    /// The CA that signed a TLS instance's certificate.
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILLs the server (as a crash does); [`Redis::restart`] brings
    /// it back.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            fixture::signal(i32::try_from(child.id()).unwrap_or(0), libc::SIGKILL);
            drop(child);
        }
    }

    /// Starts the server again on the same port (empty).
    ///
    /// # Errors
    /// It did not come up.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// `redis-cli -p PORT ARGS`: its output, trimmed.
    ///
    /// # Errors
    /// redis-cli could not run or failed.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(tool_path("redis-cli")?)
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(if self.tls {
                vec![
                    "--tls".to_owned(),
                    "--cacert".to_owned(),
                    self.ca_file().display().to_string(),
                ]
            } else {
                Vec::new()
            })
            .args(
                self.password
                    .iter()
                    .flat_map(|p| ["--no-auth-warning", "-a", p.as_str()]),
            )
            .args(args)
            .output()
            .context("running redis-cli")?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || text.starts_with("ERR") {
            bail!(
                "redis-cli {args:?}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(text)
    }
}

/// Whether the server answers PING (with PONG, or NOAUTH when it wants a
/// password).
fn ping(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut reply = [0u8; 16];
    stream.write_all(b"PING\r\n").is_ok()
        && stream
            .read(&mut reply)
            .is_ok_and(|n| reply[..n].starts_with(b"+PONG") || reply[..n].starts_with(b"-NOAUTH"))
}

fn stop_stale(dir: &Path, owner: u32) {
    let redis = || fixture::pid_file_process(dir, "redis.pid");
    if let Some(pid) = redis() {
        eprintln!("redis fixture: stopping redis-server {pid} left by process {owner}");
        fixture::kill_all(Duration::from_secs(1), || redis().into_iter().collect());
    }
}
