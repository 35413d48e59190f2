//! Building: the eBPF object with nightly, then the host crates with the
//! stable cargo that runs xtask, pointing them at the object through
//! `LIMITER_EBPF_OBJECT`.

use std::convert::Infallible;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

use crate::cmd;
use crate::toolchain;

const EBPF_PACKAGE: &str = "limiter-ebpf";
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// Debuginfo plus `--btf` for bpf-linker: BTF is what lets bpftool print the
/// maps' keys and values.
const EBPF_RUSTFLAGS: &[&str] = &["-Cdebuginfo=2", "-Clink-arg=--btf"];
const OBJECT_ENV: &str = "LIMITER_EBPF_OBJECT";
const AGENT_BIN: &str = "smtp-limiter";

/// Where the workspace is, from `cargo metadata`.
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let mut cmd = toolchain::cargo();
        cmd.args(["metadata", "--format-version", "1", "--no-deps"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let line = cmd::display(&cmd);
        let out = cmd
            .output()
            .with_context(|| format!("cannot start `{line}`"))?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("`{line}` printed invalid JSON"))?;
        let path = |key: &str| {
            json.get(key)
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
                .ok_or_else(|| anyhow!("`{line}` printed no `{key}`"))
        };
        Ok(Self {
            root: path("workspace_root")?,
            target_dir: path("target_directory")?,
        })
    }

    fn profile_dir(release: bool) -> &'static str {
        if release {
            "release"
        } else {
            "debug"
        }
    }

    pub fn ebpf_object(&self, release: bool) -> PathBuf {
        self.target_dir
            .join(EBPF_TARGET)
            .join(Self::profile_dir(release))
            .join(EBPF_PACKAGE)
    }

    pub fn agent_binary(&self, release: bool) -> PathBuf {
        self.target_dir
            .join(Self::profile_dir(release))
            .join(AGENT_BIN)
    }
}

/// `cargo +nightly build -Z build-std=core --target bpfel-unknown-none
/// [--release] -p limiter-ebpf`; returns the object's absolute path.
pub fn build_ebpf(ws: &Workspace, release: bool) -> Result<PathBuf> {
    let linker = toolchain::require_ebpf_toolchain()?;
    let mut cmd = toolchain::cargo_nightly();
    cmd.current_dir(&ws.root)
        .args(["build", "-Z", "build-std=core", "--target", EBPF_TARGET]);
    if release {
        cmd.arg("--release");
    }
    cmd.args(["-p", EBPF_PACKAGE])
        // RUSTFLAGS (or a stale encoded variant) from the environment would
        // replace the target rustflags: set exactly ours.
        .env_remove("RUSTFLAGS")
        .env("CARGO_ENCODED_RUSTFLAGS", EBPF_RUSTFLAGS.join("\x1f"))
        // Whatever rustc the caller pinned is not nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    // rustc finds bpf-linker on PATH; add its directory if it is not there.
    if toolchain::find_in_path("bpf-linker").is_none() {
        if let Some(dir) = linker.path.parent() {
            cmd.env("PATH", toolchain::path_with_first(dir)?);
        }
    }
    cmd::run(&mut cmd).context("cannot build the eBPF object")?;
    let object = ws.ebpf_object(release);
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} does not exist",
            object.display()
        );
    }
    Ok(object)
}

/// The host build: release eBPF object, then `cargo build -p limiter-user`.
pub fn build(ws: &Workspace, release: bool) -> Result<()> {
    let object = build_ebpf(ws, true)?;
    let mut cmd = toolchain::cargo();
    cmd.current_dir(&ws.root)
        .args(["build", "-p", "limiter-user"])
        .env(OBJECT_ENV, &object);
    if release {
        cmd.arg("--release");
    }
    cmd::run(&mut cmd)
}

/// Builds, then replaces xtask with `smtp-limiter ARGS` (when none: `run
/// --config config/smtp-limiter.toml`, the reference configuration the
/// binary also embeds, named explicitly because the agent otherwise reads
/// /etc/smtp-limiter/smtp-limiter.toml).
pub fn run(ws: &Workspace, release: bool, args: &[String]) -> Result<Infallible> {
    build(ws, release)?;
    let binary = ws.agent_binary(release);
    let mut cmd = std::process::Command::new(&binary);
    if args.is_empty() {
        cmd.arg("run")
            .arg("--config")
            .arg(ws.root.join("config/smtp-limiter.toml"));
    } else {
        cmd.args(args);
    }
    cmd::exec(&mut cmd)
}

/// `cargo test --workspace --exclude limiter-ebpf ARGS` with the object.
pub fn test(ws: &Workspace, args: &[String]) -> Result<()> {
    let object = build_ebpf(ws, true)?;
    // The end-to-end tests run the `smtp-limiter` binary itself, which
    // `cargo test` does not build for another package's tests.
    cmd::run(
        toolchain::cargo()
            .current_dir(&ws.root)
            .args(["build", "-p", "limiter-user", "--bin", "smtp-limiter"])
            .env(OBJECT_ENV, &object),
    )?;
    cmd::run(
        toolchain::cargo()
            .current_dir(&ws.root)
            .args(["test", "--workspace", "--exclude", EBPF_PACKAGE])
            .args(args)
            .env(OBJECT_ENV, &object),
    )
}

/// The benchmark binaries of limiter-tests, in the order `bench` runs them,
/// with the name `--only` picks each by, whether they need the eBPF object,
/// and whether they run the release agent binary.
const BENCHES: &[Bench] = &[
    Bench::new("limiter", "limiter-bench", true, false),
    Bench::new("proxy", "proxy-bench", false, false),
    Bench::new("recipients", "recipients-bench", false, false),
    Bench::new("attack", "attack-bench", true, true),
    Bench::new("state", "state-bench", true, true),
    Bench::new("syn", "syn-bench", true, false),
    Bench::new("filters", "filters-bench", false, false),
    Bench::new("flood", "flood-bench", true, true),
    Bench::new("cluster", "cluster-bench", true, true),
];

struct Bench {
    short: &'static str,
    bin: &'static str,
    ebpf: bool,
    agent: bool,
}

impl Bench {
    const fn new(short: &'static str, bin: &'static str, ebpf: bool, agent: bool) -> Self {
        Self {
            short,
            bin,
            ebpf,
            agent,
        }
    }
}

/// `cargo run --release -p limiter-tests --bin B -- ARGS` for each
/// benchmark in [`BENCHES`], each given the same ARGS. The first `--only
/// NAME` in ARGS (taken out before they are passed on) runs just that one;
/// a later `--only` reaches the benchmark (its setups). The eBPF object is
/// built first when one of them needs it, and the release agent when one
/// runs it.
pub fn bench(ws: &Workspace, args: &[String]) -> Result<()> {
    let mut only = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let value = match arg.strip_prefix("--only") {
            Some(_) if only.is_some() => None,
            Some("") => Some(it.next().cloned().unwrap_or_default()),
            Some(v) => v.strip_prefix('=').map(str::to_owned),
            None => None,
        };
        match value {
            Some(v) => only = Some(v),
            None => rest.push(arg.clone()),
        }
    }
    let selected: Vec<&Bench> = match only.as_deref() {
        None => BENCHES.iter().collect(),
        Some(name) => match BENCHES.iter().find(|b| name == b.short || name == b.bin) {
            Some(b) => vec![b],
            None => {
                let known: Vec<&str> = BENCHES.iter().map(|b| b.short).collect();
                bail!("--only {name:?}: expected one of {}", known.join(", "))
            }
        },
    };
    // A benchmark that runs the agent gets the release build embedding the
    // object (`build` builds both).
    let object = if selected.iter().any(|b| b.agent) {
        build(ws, true)?;
        Some(ws.ebpf_object(true))
    } else if selected.iter().any(|b| b.ebpf) {
        Some(build_ebpf(ws, true)?)
    } else {
        None
    };
    for bench in selected {
        let mut cargo = toolchain::cargo();
        cargo
            .current_dir(&ws.root)
            .args([
                "run",
                "--release",
                "-p",
                "limiter-tests",
                "--bin",
                bench.bin,
                "--",
            ])
            .args(&rest);
        if let Some(object) = &object {
            cargo.env(OBJECT_ENV, object);
        }
        cmd::run(&mut cargo)?;
    }
    Ok(())
}
