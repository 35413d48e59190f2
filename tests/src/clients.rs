//! Real SMTP clients for the end-to-end tests: swaks ([`swaks`]) and
//! Python's smtplib ([`python`], a script after [`PY_PRELUDE`]), with the
//! small checks the tests make on what they print ([`line`], [`expect`]).
//!
//! Both bind their own end to a source address of the test's choosing, so
//! the server (and Postfix behind the proxy) sees a client of its own.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output},
};

use crate::netns::NetNs;

/// Why the clients cannot run here (root and Postfix for the servers they
/// talk to, swaks, python3, openssl for certificates), or `None`.
#[must_use]
pub fn missing_prerequisite() -> Option<String> {
    crate::postfix::missing_prerequisite().or_else(|| {
        ["swaks", "python3", "openssl"]
            .into_iter()
            .find(|tool| which(tool).is_none())
            .map(|tool| format!("{tool} is not installed (`cargo xtask setup`)"))
    })
}

/// The program `tool` on `PATH`.
#[must_use]
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// One swaks run: its exit code and its whole transcript.
pub struct Swaks {
    pub code: Option<i32>,
    pub out: String,
}

impl Swaks {
    /// Asserts that swaks exited 0 (every reply was what it wanted).
    #[track_caller]
    pub fn expect_success(&self) {
        assert_eq!(self.code, Some(0), "swaks failed:\n{}", self.out);
    }

    /// Asserts that the transcript contains `needle`.
    #[track_caller]
    pub fn expect_reply(&self, needle: &str) {
        assert!(
            self.out.contains(needle),
            "swaks transcript lacks {needle:?}:\n{}",
            self.out
        );
    }
}

/// Runs swaks (inside network namespace `ns` if given) against `server`
/// from `source`, with a 10-second timeout and then `args`.
///
/// # Panics
/// When swaks cannot be started.
pub fn swaks_in(ns: Option<&NetNs>, server: SocketAddr, source: &str, args: &[&str]) -> Swaks {
    let mut cmd = match ns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name(), "swaks"]);
            cmd
        }
        None => Command::new("swaks"),
    };
    let out = cmd
        .arg("--server")
        .arg(server.to_string())
        .args(["--local-interface", source, "--timeout", "10"])
        .args(args)
        .output()
        .expect("run swaks");
    Swaks {
        code: out.status.code(),
        out: text(&out),
    }
}

/// [`swaks_in`] in the test's own namespace.
pub fn swaks(server: SocketAddr, source: &str, args: &[&str]) -> Swaks {
    swaks_in(None, server, source, args)
}

/// swaks sending one message from sender@example.org to alice@example.com
/// (HELO client.example.org), then `extra` (later options win).
pub fn swaks_to_alice(server: SocketAddr, source: &str, extra: &[&str]) -> Swaks {
    swaks_to_alice_in(None, server, source, extra)
}

/// [`swaks_to_alice`] inside network namespace `ns` if given.
pub fn swaks_to_alice_in(
    ns: Option<&NetNs>,
    server: SocketAddr,
    source: &str,
    extra: &[&str],
) -> Swaks {
    let mut args = vec![
        "--to",
        "alice@example.com",
        "--from",
        "sender@example.org",
        "--helo",
        "client.example.org",
    ];
    args.extend_from_slice(extra);
    swaks_in(ns, server, source, &args)
}

/// Helpers every Python script starts with; `PORT` is the server's port
/// (the script's first argument), on `HOST`, 127.0.0.1.
pub const PY_PRELUDE: &str = r#"
import smtplib, socket, ssl, sys, time
HOST = "127.0.0.1"
PORT = int(sys.argv[1])
def out(*args):
    print(*args, flush=True)
def session(source, helo):
    return smtplib.SMTP(HOST, PORT, local_hostname=helo, source_address=(source, 0), timeout=10)
def ending(read):
    # What the server did next: "eof" (it closed the connection), "reset",
    # "timeout" (nothing within the socket's timeout: still open), "data ..."
    # (it sent more) or "error ...".
    try:
        data = read()
    except TimeoutError:
        return "timeout"
    except ConnectionResetError:
        return "reset"
    except OSError as e:
        return "error %s" % e
    return "eof" if data == b"" else "data %r" % data
def closed(s):
    # How an smtplib session's connection went on (see ending()).
    return ending(s.file.readline)
def greeting(source):
    # The raw first reply of a new connection, and what came after it
    # (see ending()).
    sock = socket.create_connection((HOST, PORT), 10, (source, 0))
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    after = ending(lambda: sock.recv(1))
    sock.close()
    return data.decode().strip(), after
MESSAGE = "From: sender@example.org\r\nTo: alice@example.com\r\nSubject: test\r\n\r\nHello.\r\n"
"#;

/// Runs `script` (after [`PY_PRELUDE`]) with the server's port as its
/// argument; its output lines.
///
/// # Panics
/// When python3 cannot be started or the script fails (with its output).
pub fn python(server: SocketAddr, script: &str) -> Vec<String> {
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("{PY_PRELUDE}\n{script}"))
        .arg(server.port().to_string())
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python3 failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

/// The output line starting with `key `, without the key.
///
/// # Panics
/// When there is none.
#[track_caller]
pub fn line<'a>(lines: &'a [String], key: &str) -> &'a str {
    let prefix = format!("{key} ");
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key:?} line in {lines:#?}"))
}

/// Asserts that `reply` starts with `prefix` (a code, or a code and an
/// enhanced status code).
#[track_caller]
pub fn expect(reply: &str, prefix: &str) {
    assert!(
        reply.starts_with(prefix),
        "expected a reply starting with {prefix:?}, got {reply:?}"
    );
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
