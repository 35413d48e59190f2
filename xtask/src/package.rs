//! `cargo xtask package`: the Debian package, built from a staged tree with
//! `dpkg-deb --build` (dpkg is on every Debian/Ubuntu host; `cargo-deb`
//! would be one more tool to install and pin for what is a directory tree,
//! a control file and three short maintainer scripts).
//!
//! What goes in: the release binary (the kernel object is embedded in it,
//! so it is the only executable), the systemd unit, the configuration as a
//! conffile, the man pages and the bash, zsh and fish completions the
//! binary generates from its clap definitions (`smtp-limiter generate`),
//! the README, the licences of the project and of every crate compiled
//! in. State (`/var/lib/smtp-limiter`) and runtime (`/run/smtp-limiter`)
//! directories are the unit's `StateDirectory=`/`RuntimeDirectory=`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::build::{self, Workspace};
use crate::cmd;
use crate::toolchain;

const PACKAGE: &str = "smtp-limiter";
const CONFIG_PATH: &str = "etc/smtp-limiter/smtp-limiter.toml";
const UNIT_PATH: &str = "usr/lib/systemd/system/smtp-limiter.service";
const BINARY_PATH: &str = "usr/sbin/smtp-limiter";
const DOC_DIR: &str = "usr/share/doc/smtp-limiter";

pub struct Options {
    /// Package this binary instead of building the release one (it must
    /// embed the kernel object).
    pub binary: Option<PathBuf>,
    /// Where the .deb goes; default `target/debian`.
    pub out: Option<PathBuf>,
}

/// Builds the release binary (unless one is given), stages the tree and
/// runs `dpkg-deb --build`; returns the package's path.
pub fn package(options: &Options) -> Result<PathBuf> {
    let root = source_root();
    for tool in ["dpkg-deb", "dpkg", "strip"] {
        if toolchain::find_in_path(tool).is_none() {
            bail!("{tool} is not on PATH: the package is built with dpkg-deb on Debian/Ubuntu (apt-get install dpkg-dev binutils)");
        }
    }
    let (binary, out) = match &options.binary {
        Some(binary) => (
            binary.clone(),
            options
                .out
                .clone()
                .unwrap_or_else(|| root.join("target/debian")),
        ),
        None => {
            let ws = Workspace::locate()?;
            build::build(&ws, true)?;
            (
                ws.agent_binary(true),
                options
                    .out
                    .clone()
                    .unwrap_or_else(|| ws.target_dir.join("debian")),
            )
        }
    };
    let version = version(&binary)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let stage = out.join(format!("{PACKAGE}_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;

    let installed = stage.join(BINARY_PATH);
    create_parent(&installed)?;
    cmd::run(
        Command::new("strip")
            .arg("--strip-unneeded")
            .arg("-o")
            .arg(&installed)
            .arg(&binary),
    )?;
    set_mode(&installed, 0o755)?;

    copy(
        &root.join("config/smtp-limiter.service"),
        &stage.join(UNIT_PATH),
    )?;
    write(
        &stage.join(CONFIG_PATH),
        &packaged_config(&read(&root.join("config/smtp-limiter.toml"))?)?,
        0o640,
    )?;
    man_pages(&installed, &stage.join("usr/share/man/man8"))?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/smtp-limiter"),
        ("zsh", "usr/share/zsh/vendor-completions/_smtp-limiter"),
        (
            "fish",
            "usr/share/fish/vendor_completions.d/smtp-limiter.fish",
        ),
    ] {
        let script = output(Command::new(&installed).args(["generate", "completions", shell]))?;
        write(&stage.join(path), &(script + "\n"), 0o644)?;
    }
    let doc = stage.join(DOC_DIR);
    copy(&root.join("README.md"), &doc.join("README.md"))?;
    write(&doc.join("copyright"), &copyright(&root)?, 0o644)?;

    let depends = depends(&installed)?;
    let debian = stage.join("DEBIAN");
    write(
        &debian.join("control"),
        &control(&version, &arch, &depends, installed_size(&stage)?),
        0o644,
    )?;
    write(
        &debian.join("conffiles"),
        &format!("/{CONFIG_PATH}\n"),
        0o644,
    )?;
    write(&debian.join("postinst"), POSTINST, 0o755)?;
    write(&debian.join("prerm"), PRERM, 0o755)?;
    write(&debian.join("postrm"), POSTRM, 0o755)?;
    write(&debian.join("md5sums"), &md5sums(&stage)?, 0o644)?;

    let deb = out.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The workspace root (xtask lives in `xtask/`): found without cargo, so
/// that packaging a given binary works while a `cargo test` holds the
/// target directory.
fn source_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// The binary's version, checking that it carries the kernel programs.
fn version(binary: &Path) -> Result<String> {
    let line = output(Command::new(binary).arg("--version"))?;
    if !line.contains("(kernel programs embedded)") {
        bail!(
            "{} says {line:?}: it has no kernel object built in (build it with `cargo xtask build --release`, which builds the object first)",
            binary.display()
        );
    }
    line.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("{} --version printed {line:?}", binary.display()))
}

/// The reference configuration as the package installs it: the built-in
/// test backend (which discards mail) off, and a header saying so.
fn packaged_config(reference: &str) -> Result<String> {
    const ON: &str = "\nbuiltin = true\n";
    if reference.matches(ON).count() != 1 {
        bail!("config/smtp-limiter.toml: expected one line `builtin = true` ([backend]) to turn off in the packaged configuration");
    }
    Ok(format!(
        "# Installed by the smtp-limiter package (a conffile: your changes are kept\n\
         # on upgrade). It is the commented reference with backend.builtin = false:\n\
         # set [[listen]], backend.address (your MTA), relay.accept and\n\
         # kernel.interfaces, check it with `smtp-limiter check-config`, then\n\
         # `systemctl enable --now smtp-limiter`.\n\
         #\n{}",
        reference.replacen(ON, "\nbuiltin = false\n", 1)
    ))
}

fn man_pages(binary: &Path, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    cmd::run(
        Command::new(binary)
            .args(["generate", "man", "--out"])
            .arg(dir),
    )?;
    let mut pages = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "8") {
            pages.push(path);
        }
    }
    if pages.is_empty() {
        bail!("`{} generate man` wrote no page", binary.display());
    }
    // -n: no name or time stamp in the archive, the package is reproducible.
    cmd::run(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    for page in pages {
        set_mode(&page.with_extension("8.gz"), 0o644)?;
    }
    Ok(())
}

/// `Depends:` from the shared libraries the binary links (`readelf -d`)
/// and the newest glibc symbol version it needs (`objdump -T`).
fn depends(binary: &Path) -> Result<String> {
    let dynamic = output(Command::new("readelf").arg("-d").arg(binary))?;
    let mut packages = Vec::new();
    for line in dynamic.lines().filter(|l| l.contains("(NEEDED)")) {
        let library = line
            .rsplit('[')
            .next()
            .and_then(|l| l.strip_suffix(']'))
            .unwrap_or(line);
        let package = match library {
            "libc.so.6"
            | "libm.so.6"
            | "libdl.so.2"
            | "libpthread.so.0"
            | "librt.so.1"
            | "ld-linux-x86-64.so.2"
            | "ld-linux-aarch64.so.1" => "libc6",
            "libgcc_s.so.1" => "libgcc-s1",
            other => bail!(
                "{} links {other}: add the Debian package that provides it to xtask/src/package.rs",
                binary.display()
            ),
        };
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    let symbols = output(Command::new("objdump").arg("-T").arg(binary))?;
    let glibc = symbols
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max();
    Ok(packages
        .iter()
        .map(|p| match (*p, glibc) {
            ("libc6", Some((major, minor))) => format!("libc6 (>= {major}.{minor})"),
            (p, _) => p.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", "))
}

fn control(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: smtp-limiter developers <root@localhost>\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Recommends: bpftool\n\
         Section: net\n\
         Priority: optional\n\
         Description: SMTP edge guard: kernel drops and SMTP limits\n \
         An XDP program (TC as fallback) drops packets from blocked sources and\n \
         new connections from sources that already hold too many; an SMTP proxy\n \
         in front of the real mail server (Postfix, Exim, Exchange, ...) watches\n \
         every session for directory harvesting, AUTH brute force, relay\n \
         attempts, HELO abuse and null-sender floods, and pushes the blocks it\n \
         decides into the kernel.\n \
         .\n \
         The configuration is /etc/smtp-limiter/smtp-limiter.toml; the service\n \
         is not started on installation: configure it, then\n \
         `systemctl enable --now smtp-limiter`.\n"
    )
}

/// After installation: systemd learns the unit; an upgrade restarts a
/// running agent on the new binary (blocks are stored, open sessions get
/// their grace). A first installation starts nothing: the configuration
/// must name the MTA first. `DPKG_ROOT` (an installation into another
/// root) touches no running system.
const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n "$2" ]; then
        systemctl try-restart smtp-limiter.service || true
    fi
fi
exit 0
"#;

/// Before removal: stop the agent (its maps stay pinned until purge).
const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] && [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ]; then
    systemctl stop smtp-limiter.service || true
fi
exit 0
"#;

/// After removal: forget the unit. Purge also removes what the agent made:
/// stored blocks, the boot-time link of `systemctl enable`, the pinned maps
/// under the default pin path.
const POSTRM: &str = r#"#!/bin/sh
set -e
root="${DPKG_ROOT:-}"
if [ "$1" = "purge" ]; then
    rm -rf "$root/var/lib/smtp-limiter"
    # The unit's RuntimeDirectory= goes when the service stops; an agent
    # started by hand (smtp-limiter run) leaves its control socket there.
    rm -rf "$root/run/smtp-limiter"
    rm -f "$root/etc/systemd/system/multi-user.target.wants/smtp-limiter.service"
    if [ -z "$root" ] && [ -d /sys/fs/bpf/smtp-limiter ]; then
        rm -rf /sys/fs/bpf/smtp-limiter
    fi
fi
if [ "$1" = "remove" ] || [ "$1" = "purge" ]; then
    if [ -z "$root" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
"#;

/// The project's licences, and the licence files of every crate compiled
/// into the binary (the crates of `cargo tree -e normal` for this host), as
/// their MIT/BSD/ISC terms ask.
fn copyright(root: &Path) -> Result<String> {
    let mut text = String::from(
        "smtp-limiter\n\
         \n\
         Copyright (c) The smtp-limiter developers.\n\
         Licensed under either of the MIT licence or the Apache Licence, Version 2.0,\n\
         at your option (SPDX: MIT OR Apache-2.0). Both texts follow.\n\
         On Debian the Apache licence is also in /usr/share/common-licenses/Apache-2.0.\n\n",
    );
    for file in ["LICENSE-MIT", "LICENSE-APACHE"] {
        let _ = writeln!(text, "==> {file} <==\n{}\n", read(&root.join(file))?);
    }
    text.push_str(
        "Crates compiled into /usr/sbin/smtp-limiter, with their licences and the\n\
         licence files they ship.\n\n",
    );
    // Identical licence texts (the Apache-2.0 text, mostly) are printed once.
    let mut texts: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut missing = Vec::new();
    for (name, version, license, dir) in linked_crates(root)? {
        let _ = writeln!(text, "{name} {version}: {license}");
        let mut found = false;
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let file = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_uppercase())
                    .unwrap_or_default();
                p.is_file()
                    && ["LICENSE", "LICENCE", "COPYING", "NOTICE"]
                        .iter()
                        .any(|prefix| file.starts_with(prefix))
            })
            .collect();
        files.sort();
        for file in files {
            found = true;
            texts
                .entry(read(&file)?.trim().to_owned())
                .or_default()
                .push(format!(
                    "{name} {version} ({})",
                    file.file_name().unwrap_or_default().to_string_lossy()
                ));
        }
        if !found && !dir.starts_with(root) {
            missing.push(format!("{name} {version}"));
        }
    }
    if !missing.is_empty() {
        let _ = writeln!(
            text,
            "\nThese crates ship no licence file; their licence is the SPDX expression above:\n{}",
            missing.join(", ")
        );
    }
    for (licence, crates) in texts {
        let _ = writeln!(text, "\n==> {} <==\n{licence}", crates.join(", "));
    }
    Ok(text)
}

/// `(name, version, licence, source directory)` of every crate the binary
/// is built from, the workspace's own included.
fn linked_crates(root: &Path) -> Result<Vec<(String, String, String, PathBuf)>> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let host = output(Command::new(rustc).arg("-vV"))?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host")?;
    let tree = output(toolchain::cargo().current_dir(root).args([
        "tree",
        "-p",
        "limiter-user",
        "-e",
        "normal",
        "--prefix",
        "none",
        "--no-dedupe",
        "--target",
        &host,
        "-f",
        "{p}",
    ]))?;
    let metadata = output(toolchain::cargo().current_dir(root).args([
        "metadata",
        "--format-version",
        "1",
        "--filter-platform",
        &host,
    ]))?;
    let metadata: serde_json::Value =
        serde_json::from_str(&metadata).context("cargo metadata printed invalid JSON")?;
    let mut crates = BTreeMap::new();
    for line in tree.lines() {
        let mut words = line.split_whitespace();
        let (Some(name), Some(version)) = (words.next(), words.next()) else {
            continue;
        };
        let version = version.trim_start_matches('v');
        let package = metadata["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name && p["version"] == version)
            .with_context(|| format!("cargo metadata does not list {name} {version}"))?;
        let dir = package["manifest_path"]
            .as_str()
            .and_then(|m| Path::new(m).parent())
            .map(Path::to_owned)
            .with_context(|| format!("{name} {version}: no manifest_path"))?;
        let license = package["license"]
            .as_str()
            .unwrap_or("(no licence field: see its files below)")
            .to_owned();
        crates.insert((name.to_owned(), version.to_owned()), (license, dir));
    }
    Ok(crates
        .into_iter()
        .map(|((name, version), (license, dir))| (name, version, license, dir))
        .collect())
}

fn md5sums(stage: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(stage, &mut files)?;
    let relative: Vec<PathBuf> = files
        .iter()
        .filter_map(|f| f.strip_prefix(stage).ok().map(Path::to_owned))
        .filter(|f| !f.starts_with("DEBIAN") && f != Path::new(CONFIG_PATH))
        .collect();
    output(Command::new("md5sum").current_dir(stage).args(&relative)).map(|sums| sums + "\n")
}

fn installed_size(stage: &Path) -> Result<u64> {
    let mut files = Vec::new();
    collect_files(stage, &mut files)?;
    let mut bytes = 0;
    for file in files {
        bytes += fs::metadata(&file)?.len().div_ceil(1024) * 1024;
    }
    Ok(bytes / 1024)
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, files)?;
        } else {
            files.push(path);
        }
    }
    files.sort();
    Ok(())
}

/// A command's stdout, trimmed; its stderr in the error when it fails.
fn output(command: &mut Command) -> Result<String> {
    let line = cmd::display(command);
    let out = command
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)
        .map(|s| s.trim_end().to_owned())
        .with_context(|| format!("`{line}` printed invalid UTF-8"))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    create_parent(path)?;
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    set_mode(path, mode)
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    create_parent(to)?;
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, 0o644)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}
