//! The one place where xtask starts other programs.
//!
//! Actions (builds, installs) go through [`run`] or [`exec`]: the command line
//! is printed to stderr first, so a failure can be reproduced by hand, and a
//! failure names the command and its exit status. Read-only probes (“is the
//! nightly toolchain there?”) go through [`probe`] and print nothing.

use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

/// A child process ran and reported failure. `main` exits with the child's
/// exit code, so `cargo xtask test` fails the way `cargo test` did.
#[derive(Debug)]
pub struct ChildFailed {
    pub command: String,
    pub code: Option<i32>,
}

impl fmt::Display for ChildFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` failed with exit code {code}", self.command),
            None => write!(f, "`{}` was killed by a signal", self.command),
        }
    }
}

impl std::error::Error for ChildFailed {}

/// Prints the command line, runs it with inherited stdio, and fails with
/// [`ChildFailed`] unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{line}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(ChildFailed {
            command: line,
            code: status.code(),
        }
        .into())
    }
}

/// Prints the command line and replaces this process with it. Returns only
/// if the program could not be started.
pub fn exec(cmd: &mut Command) -> Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    let line = display(cmd);
    eprintln!("$ {line}");
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot start `{line}`"))
}

/// Runs a read-only query quietly and returns its stdout if it succeeded;
/// `None` if it could not be started or failed.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if out.status.success() {
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        None
    }
}

/// The command as a shell line: `env -u VAR KEY=value program args…`.
pub fn display(cmd: &Command) -> String {
    let mut env = Vec::new();
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => env.push(format!("{}={}", key.to_string_lossy(), quote(value))),
            None => env.push(format!("-u {}", quote(key))),
        }
    }
    let mut words = Vec::new();
    if !env.is_empty() {
        words.push("env".to_string());
        words.extend(env);
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Quotes one word for a POSIX shell (bash `$'…'` when it holds control
/// characters, such as the \x1f separator of `CARGO_ENCODED_RUSTFLAGS`).
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%^".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else if word.chars().any(char::is_control) {
        let mut out = String::from("$'");
        for c in word.chars() {
            match c {
                '\'' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                c if c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        out.push('\'');
        out
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
