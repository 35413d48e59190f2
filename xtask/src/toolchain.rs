//! What the eBPF build needs, probed without changing anything: the nightly
//! toolchain and its LLVM version, rust-src, and a bpf-linker built against
//! that same LLVM.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd;

pub const NIGHTLY: &str = "nightly";

/// The stable cargo that runs xtask (as set by cargo for the programs it
/// runs), for the host builds.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// `cargo +nightly`: goes through the rustup proxy, which reads `+nightly`.
pub fn cargo_nightly() -> Command {
    let mut cmd = Command::new(rustup_proxy("cargo"));
    cmd.arg(format!("+{NIGHTLY}"));
    cmd
}

/// `rustup` itself.
pub fn rustup() -> Command {
    Command::new(rustup_proxy("rustup"))
}

/// A rustup-managed program: by name if it is on PATH, else from
/// `$CARGO_HOME/bin` (where rustup puts its proxies).
fn rustup_proxy(name: &str) -> PathBuf {
    if find_in_path(name).is_none() {
        let candidate = cargo_home().join("bin").join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    PathBuf::from(name)
}

/// `$CARGO_HOME`, or `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cargo")
}

/// The first executable file called `name` in the directories of PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// PATH with `dir` put first (for `/usr/lib/llvm-N/bin`, or
/// `$CARGO_HOME/bin` when bpf-linker lives there but is not on PATH).
pub fn path_with_first(dir: &Path) -> Result<OsString> {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&current));
    std::env::join_paths(dirs).context("cannot build PATH")
}

/// The nightly toolchain as rustc describes it.
pub struct Nightly {
    /// `rustc 1.97.0-nightly (e50aa6fba 2026-05-19)`
    pub version: String,
    /// LLVM major version, e.g. 22.
    pub llvm_major: u32,
}

/// `rustc +nightly -vV`, or `None` if the nightly toolchain is not installed.
/// Never lets rustup install a missing toolchain by itself.
pub fn nightly() -> Result<Option<Nightly>> {
    let mut cmd = Command::new(rustup_proxy("rustc"));
    cmd.arg(format!("+{NIGHTLY}"))
        .arg("-vV")
        .env("RUSTUP_AUTO_INSTALL", "0");
    let Some(out) = cmd::probe(&mut cmd) else {
        return Ok(None);
    };
    let version = out.lines().next().unwrap_or_default().trim().to_string();
    let llvm = out
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .map(str::trim)
        .ok_or_else(|| anyhow!("`rustc +{NIGHTLY} -vV` printed no `LLVM version:` line:\n{out}"))?;
    let llvm_major = llvm
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| anyhow!("cannot read the LLVM major version from `{llvm}`"))?;
    Ok(Some(Nightly {
        version,
        llvm_major,
    }))
}

/// Whether the nightly toolchain has the rust-src component (needed by
/// `-Z build-std=core`).
pub fn has_rust_src() -> bool {
    let mut cmd = rustup();
    cmd.args(["component", "list", "--toolchain", NIGHTLY, "--installed"]);
    cmd::probe(&mut cmd).is_some_and(|out| out.lines().any(|l| l.trim().starts_with("rust-src")))
}

/// The marker file `setup` writes after installing bpf-linker: the LLVM major
/// version it was built against.
pub fn bpf_linker_marker() -> PathBuf {
    cargo_home().join("bpf-linker.llvm")
}

/// An installed bpf-linker.
pub struct BpfLinker {
    pub path: PathBuf,
    /// What `bpf-linker --version` printed, e.g. `bpf-linker 0.13.0`.
    pub version: String,
    /// The LLVM major version it was built against, if known.
    pub llvm_major: Option<u32>,
}

/// Finds a working bpf-linker (on PATH, else in `$CARGO_HOME/bin`) and the
/// LLVM it was built for. `bpf-linker --version` does not say which LLVM, so
/// that comes from cargo's install record (`$CARGO_HOME/.crates2.json`, the
/// `llvm-N` feature) when cargo installed this very binary, else from the
/// marker file written by `setup`.
pub fn bpf_linker() -> Option<BpfLinker> {
    let cargo_bin = cargo_home().join("bin").join("bpf-linker");
    let path = find_in_path("bpf-linker")
        .or_else(|| is_executable(&cargo_bin).then(|| cargo_bin.clone()))?;
    // Also catches a binary whose libLLVM has gone away.
    let version = cmd::probe(Command::new(&path).arg("--version"))?
        .trim()
        .to_string();
    let same_file = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let from_cargo = if same_file(&path, &cargo_bin) {
        llvm_from_cargo_install_record()
    } else {
        None
    };
    let llvm_major = from_cargo.or_else(|| {
        std::fs::read_to_string(bpf_linker_marker())
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    Some(BpfLinker {
        path,
        version,
        llvm_major,
    })
}

/// The `llvm-N` feature cargo recorded when it installed bpf-linker.
fn llvm_from_cargo_install_record() -> Option<u32> {
    let text = std::fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let (_, install) = json
        .get("installs")?
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with("bpf-linker "))?;
    install
        .get("features")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
        .max()
}

/// Fails, pointing at `cargo xtask setup`, unless nightly, rust-src and a
/// bpf-linker matching nightly's LLVM are all present. Returns the
/// bpf-linker found.
pub fn require_ebpf_toolchain() -> Result<BpfLinker> {
    const FIX: &str = "run `cargo xtask setup`";
    let Some(nightly) = nightly()? else {
        bail!("the {NIGHTLY} toolchain is not installed: {FIX}");
    };
    if !has_rust_src() {
        bail!("the rust-src component of the {NIGHTLY} toolchain is not installed: {FIX}");
    }
    let Some(linker) = bpf_linker() else {
        bail!("bpf-linker is not installed (or does not run): {FIX}");
    };
    if let Some(llvm) = linker.llvm_major {
        if llvm != nightly.llvm_major {
            bail!(
                "{} is built for LLVM {llvm} but {} uses LLVM {}: {FIX}",
                linker.path.display(),
                nightly.version,
                nightly.llvm_major
            );
        }
    }
    Ok(linker)
}
