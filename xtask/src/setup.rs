//! `cargo xtask setup`: installs what a fresh Debian/Ubuntu machine lacks to
//! build and test. Idempotent: every step first checks, and prints either
//! `ok: … already present` or what it installs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;
use crate::toolchain::{self, NIGHTLY};

pub fn setup() -> Result<()> {
    let nightly = ensure_nightly()?;
    ensure_rust_src()?;
    ensure_cargo_fuzz()?;
    let llvm = nightly.llvm_major;

    let packages = apt_packages(llvm);
    match debian_like() {
        Ok(()) => {
            let new_postfix = !is_installed("postfix");
            let new_slapd = !is_installed("slapd");
            let new_scanners: Vec<&str> = SCANNER_SERVICES
                .iter()
                .map(|s| s.package)
                .filter(|p| !is_installed(p))
                .collect();
            preseed(
                "postfix",
                POSTFIX_PRESEED,
                "No configuration, mailname localhost",
                new_postfix,
            )?;
            preseed("slapd", SLAPD_PRESEED, "no configuration", new_slapd)?;
            preseed(
                "clamav-freshclam",
                FRESHCLAM_PRESEED,
                "no freshclam daemon",
                new_scanners.contains(&"clamav-freshclam"),
            )?;
            ensure_apt_packages(&packages)?;
            ensure_no_system_postfix(new_postfix)?;
            ensure_no_system_slapd(new_slapd)?;
            ensure_no_system_scanners(&new_scanners)?;
        }
        Err(why) => return not_debian(&why, llvm, &packages),
    }
    ensure_bpf_linker(llvm)?;
    ensure_bpffs()
}

/// bpffs at /sys/fs/bpf, where the agent pins its maps and the kernel tests
/// theirs. systemd mounts it at boot; hosts and guests without systemd's
/// mounts (a fresh VM booted by another init) lack it until someone does.
fn ensure_bpffs() -> Result<()> {
    if bpffs_mounted() {
        println!("ok: bpffs already mounted at {BPF_FS}");
        return Ok(());
    }
    if !is_root() {
        println!("missing: bpffs at {BPF_FS} (as root: mount -t bpf bpf {BPF_FS})");
        return Ok(());
    }
    println!("mounting bpffs at {BPF_FS}");
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPF_FS]))
        .with_context(|| format!("mounting bpffs at {BPF_FS}"))
}

const BPF_FS: &str = "/sys/fs/bpf";

/// Whether a bpf filesystem is mounted at [`BPF_FS`] (per /proc/mounts).
pub fn bpffs_mounted() -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next();
        fields.next() == Some(BPF_FS) && fields.next() == Some("bpf")
    })
}

/// The Debian/Ubuntu packages: LLVM (and Polly, which llvm-config's link line
/// names) for building bpf-linker, a C toolchain for linking host programs,
/// the tools the tests and operators use, and for the SMTP end-to-end tests
/// a real Postfix (the tests start private instances of their own; the
/// system instance stays unconfigured and stopped, see [`preseed`]),
/// swaks and python3; for the LDAP end-to-end tests OpenLDAP's slapd (again
/// private instances only, see [`preseed`]) and its command-line
/// tools; for the filter tests rspamd and ClamAV's clamd (private
/// instances only, see [`ensure_no_system_scanners`]); systemd for
/// `systemd-analyze verify` of the unit.
fn apt_packages(llvm: u32) -> Vec<String> {
    vec![
        format!("llvm-{llvm}-dev"),
        format!("libpolly-{llvm}-dev"),
        "build-essential".into(),
        "bpftool".into(),
        "iproute2".into(),
        "ethtool".into(),
        "nftables".into(),
        "postfix".into(),
        // For the Postfix fixture's SMTP AUTH (Cyrus SASL with a sasldb):
        // saslpasswd2, and the PLAIN and LOGIN mechanisms (only recommended
        // by libsasl2-2, so not installed by `--no-install-recommends`).
        "sasl2-bin".into(),
        "libsasl2-modules".into(),
        "swaks".into(),
        // THC Hydra, the brute-force tool the red-team test runs.
        "hydra".into(),
        // Patator and Medusa, the harvesting and brute-force tools the
        // red-team tests run too.
        "patator".into(),
        "medusa".into(),
        // swaks' STARTTLS and implicit TLS (only recommended by its package).
        "libnet-ssleay-perl".into(),
        "openssl".into(),
        "python3".into(),
        "slapd".into(),
        "ldap-utils".into(),
        "rspamd".into(),
        "clamav-daemon".into(),
        // For the cluster tests (private instances only, see
        // [`ensure_no_system_scanners`]).
        "redis-server".into(),
        // systemd-analyze, for the packaging test's `verify` of the unit
        // (a container may have no systemd; nothing is started by it).
        "systemd".into(),
    ]
}

/// The debconf answers that make `apt-get install postfix` configure no
/// system mail server: no /etc/postfix/main.cf, nothing started, and no
/// question asked.
const POSTFIX_PRESEED: &str = "postfix postfix/main_mailer_type select No configuration\n\
                               postfix postfix/mailname string localhost\n";

/// The debconf answer that makes `apt-get install slapd` configure no
/// directory: no /etc/ldap/slapd.d, no database, nothing to start.
const SLAPD_PRESEED: &str = "slapd slapd/no_configuration boolean true\n";

/// The debconf answer that makes `apt-get install clamav-daemon` (which
/// pulls in clamav-freshclam) set up no freshclam daemon: the package then
/// only tries one database download, whose failure (no network) it ignores.
const FRESHCLAM_PRESEED: &str =
    "clamav-freshclam clamav-freshclam/autoupdate_freshclam select manual\n";

/// A system service that the rspamd and clamav-daemon packages set up and
/// may start (systemd units, or an init script under /etc/init.d).
struct SystemService {
    package: &'static str,
    units: &'static [&'static str],
    init_script: &'static str,
    /// Its processes' name (`/proc/PID/comm`).
    process: &'static str,
}

/// What the filter tests' scanners and the cluster tests' Redis bring: the
/// tests start private rspamd, clamd and redis-server instances of their
/// own (under /tmp/smtp-limiter-…), so none of these may run.
const SCANNER_SERVICES: [SystemService; 4] = [
    SystemService {
        package: "rspamd",
        units: &["rspamd.service"],
        init_script: "rspamd",
        process: "rspamd",
    },
    SystemService {
        package: "clamav-daemon",
        units: &["clamav-daemon.socket", "clamav-daemon.service"],
        init_script: "clamav-daemon",
        process: "clamd",
    },
    SystemService {
        package: "clamav-freshclam",
        units: &["clamav-freshclam.service", "clamav-freshclam-once.timer"],
        init_script: "clamav-freshclam",
        process: "freshclam",
    },
    SystemService {
        package: "redis-server",
        units: &["redis-server.service"],
        init_script: "redis-server",
        process: "redis-server",
    },
];

fn bpf_linker_install_args(llvm: u32) -> Vec<String> {
    vec![
        "install".into(),
        "bpf-linker".into(),
        "--no-default-features".into(),
        "--features".into(),
        format!("llvm-{llvm}"),
        "--force".into(),
    ]
}

fn llvm_bin(llvm: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{llvm}/bin"))
}

fn ensure_nightly() -> Result<toolchain::Nightly> {
    if let Some(nightly) = toolchain::nightly()? {
        println!(
            "ok: {NIGHTLY} toolchain already present ({}, LLVM {})",
            nightly.version, nightly.llvm_major
        );
        return Ok(nightly);
    }
    println!("installing: {NIGHTLY} toolchain (minimal profile)");
    cmd::run(toolchain::rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    toolchain::nightly()?.with_context(|| {
        format!("`rustc +{NIGHTLY} -vV` still fails after installing the {NIGHTLY} toolchain")
    })
}

fn ensure_rust_src() -> Result<()> {
    if toolchain::has_rust_src() {
        println!("ok: rust-src for {NIGHTLY} already present");
        return Ok(());
    }
    println!("installing: rust-src for {NIGHTLY}");
    cmd::run(toolchain::rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// `Ok` on Debian, Ubuntu and their derivatives with apt-get and dpkg-query;
/// otherwise the reason it is not.
fn debian_like() -> Result<(), String> {
    let release = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .map_err(|_| "there is no /etc/os-release".to_string())?;
    let field = |name: &str| {
        release
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let (id, id_like) = (field("ID"), field("ID_LIKE"));
    let is_debian = std::iter::once(id.as_str())
        .chain(id_like.split_whitespace())
        .any(|i| i == "debian" || i == "ubuntu");
    if !is_debian {
        return Err(format!(
            "ID={id:?} ID_LIKE={id_like:?} is not Debian or Ubuntu"
        ));
    }
    for tool in ["apt-get", "dpkg-query"] {
        if toolchain::find_in_path(tool).is_none() {
            return Err(format!("{tool} is not on PATH"));
        }
    }
    Ok(())
}

fn is_installed(package: &str) -> bool {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Status}", package]);
    cmd::probe(&mut cmd).is_some_and(|status| status.split_whitespace().last() == Some("installed"))
}

fn ensure_apt_packages(packages: &[String]) -> Result<()> {
    let missing: Vec<&String> = packages.iter().filter(|p| !is_installed(p)).collect();
    if missing.is_empty() {
        println!("ok: apt packages already present: {}", packages.join(" "));
        return Ok(());
    }
    let missing_list = missing
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    if !is_root() {
        println!("apt needs root to install: {missing_list}");
        println!(
            "run as root: apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y \
             --no-install-recommends {missing_list}"
        );
        bail!("missing apt packages ({missing_list}) and not root; install them, then run `cargo xtask setup` again");
    }
    println!("installing: apt packages {missing_list}");
    cmd::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context(
        "apt could not install the packages; if an llvm-N package is unknown to this release, \
         add the LLVM repository from https://apt.llvm.org/ and run `cargo xtask setup` again",
    )
}

/// Before `package` is installed for the first time (`new`): preseed its
/// debconf `answers` so that the package sets up no system service of its
/// own (the tests run private instances under /tmp). `what` says what the
/// answers do, for the log.
fn preseed(package: &str, answers: &str, what: &str, new: bool) -> Result<()> {
    if !new {
        println!("ok: {package} already installed, no debconf preseed needed");
        return Ok(());
    }
    if !is_root() {
        // ensure_apt_packages then prints the apt-get line and fails.
        println!(
            "run as root first: printf '{}' | debconf-set-selections",
            answers.replace('\n', "\\n")
        );
        return Ok(());
    }
    println!("preseeding: debconf for {package} ({what})");
    let file = std::env::temp_dir().join(format!("xtask-{package}-preseed-{}", std::process::id()));
    std::fs::write(&file, answers).with_context(|| format!("cannot write {}", file.display()))?;
    let result = cmd::run(Command::new("debconf-set-selections").arg(&file));
    let _ = std::fs::remove_file(&file);
    result
}

/// After a fresh install: no system Postfix may run or start at boot, so the
/// tests' private instances are the only ones. With the preseed Debian's
/// package writes no main.cf and starts nothing (its postfix.service has
/// `ConditionPathExists=/etc/postfix/main.cf`); this catches the rest. A
/// Postfix that was there before setup is the operator's and is left alone.
fn ensure_no_system_postfix(new_postfix: bool) -> Result<()> {
    let postfix = ["/usr/sbin/postfix", "/sbin/postfix"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("postfix was installed but there is no /usr/sbin/postfix")?;
    // `postfix status` exits 0 only when the master of /etc/postfix runs
    // (without a main.cf it fails: not configured, so not running).
    let running = || cmd::probe(Command::new(&postfix).arg("status")).is_some();
    if !new_postfix {
        if running() {
            println!("ok: the system Postfix is running (not installed by setup: left alone; the tests start private instances)");
        } else {
            println!("ok: no system Postfix running");
        }
        return Ok(());
    }
    let systemd = std::path::Path::new("/run/systemd/system").is_dir();
    let enabled = systemd
        && cmd::probe(Command::new("systemctl").args(["is-enabled", "postfix"]))
            .is_some_and(|s| s.trim() == "enabled");
    if !running() && !enabled {
        println!("ok: no system Postfix running");
        return Ok(());
    }
    println!(
        "stopping: the system Postfix that the package started (the tests start private instances)"
    );
    if enabled {
        cmd::run(Command::new("systemctl").args(["disable", "--now", "postfix"]))?;
    }
    if running() {
        cmd::run(Command::new(&postfix).arg("stop"))?;
    }
    Ok(())
}

/// The pids of the system's `process` processes: not the tests' private
/// instances, whose command line or working directory is under
/// /tmp/smtp-limiter-… (rspamd rewrites its command line; the fixture
/// starts it in its directory).
fn system_service_pids(process: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
            comm.trim() == process
                && !String::from_utf8_lossy(&cmdline).contains("smtp-limiter-")
                && !cwd.to_string_lossy().contains("smtp-limiter-")
        })
        .collect()
}

/// After a fresh install of rspamd / clamav-daemon / clamav-freshclam (the
/// packages in `new`): none of their system services may run or start at
/// boot (Debian's packages enable and start them; clamd's unit only starts
/// once there are databases, freshclam would keep downloading them). A
/// service that was there before setup is the operator's and is left alone.
fn ensure_no_system_scanners(new: &[&str]) -> Result<()> {
    let systemd = std::path::Path::new("/run/systemd/system").is_dir();
    for service in &SCANNER_SERVICES {
        let running = || !system_service_pids(service.process).is_empty();
        if !new.contains(&service.package) {
            if running() {
                println!(
                    "ok: a system {} is running (not installed by setup: left alone; the tests \
                     start private instances)",
                    service.process
                );
            } else {
                println!("ok: no system {} running", service.process);
            }
            continue;
        }
        let enabled: Vec<&str> = if systemd {
            service
                .units
                .iter()
                .copied()
                .filter(|unit| {
                    let state = |what: &str| {
                        cmd::probe(Command::new("systemctl").args([what, unit]))
                            .is_some_and(|s| ["enabled", "active"].contains(&s.trim()))
                    };
                    state("is-enabled") || state("is-active")
                })
                .collect()
        } else {
            Vec::new()
        };
        if !running() && enabled.is_empty() {
            println!("ok: no system {} running", service.process);
            continue;
        }
        println!(
            "stopping: the system {} that the {} package set up (the tests start private \
             instances)",
            service.process, service.package
        );
        if !enabled.is_empty() {
            cmd::run(
                Command::new("systemctl")
                    .args(["disable", "--now"])
                    .args(&enabled),
            )?;
        }
        let init_script = std::path::Path::new("/etc/init.d").join(service.init_script);
        if running() && init_script.is_file() {
            cmd::run(Command::new(&init_script).arg("stop"))?;
        }
        if running() {
            bail!(
                "a system {} still runs (pids {:?}); stop it, then run `cargo xtask setup` again",
                service.process,
                system_service_pids(service.process)
            );
        }
    }
    Ok(())
}

/// The pids of system slapd processes: those whose command line does not
/// name a private instance's slapd.conf (`-f /tmp/…`), i.e. the package's
/// (`-F /etc/ldap/slapd.d`).
fn system_slapd_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            comm.trim() == "slapd" && !cmdline.contains("smtp-limiter-slapd.")
        })
        .collect()
}

/// After a fresh install: no system slapd may run or start at boot, so the
/// tests' private instances are the only ones. With the preseed Debian's
/// package configures nothing and its init script has nothing to start;
/// this catches the rest. A slapd that was there before setup is the
/// operator's and is left alone.
fn ensure_no_system_slapd(new_slapd: bool) -> Result<()> {
    let running = || !system_slapd_pids().is_empty();
    if !new_slapd {
        if running() {
            println!("ok: a system slapd is running (not installed by setup: left alone; the tests start private instances)");
        } else {
            println!("ok: no system slapd running");
        }
        return Ok(());
    }
    let systemd = std::path::Path::new("/run/systemd/system").is_dir();
    let enabled = systemd
        && cmd::probe(Command::new("systemctl").args(["is-enabled", "slapd"]))
            .is_some_and(|s| s.trim() == "enabled");
    if !running() && !enabled {
        println!("ok: no system slapd running");
        return Ok(());
    }
    println!(
        "stopping: the system slapd that the package set up (the tests start private instances)"
    );
    if enabled {
        cmd::run(Command::new("systemctl").args(["disable", "--now", "slapd"]))?;
    }
    if running() && std::path::Path::new("/etc/init.d/slapd").is_file() {
        cmd::run(Command::new("/etc/init.d/slapd").arg("stop"))?;
    }
    if running() {
        bail!(
            "a system slapd still runs (pids {:?}); stop it, then run `cargo xtask setup` again",
            system_slapd_pids()
        );
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz` (the libFuzzer targets in `fuzz/`,
/// built with nightly). Installed with the stable cargo, `--locked`.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let version =
        || cmd::probe(toolchain::cargo().args(["fuzz", "--version"])).map(|v| v.trim().to_owned());
    if let Some(version) = version() {
        println!("ok: {version} already present");
        return Ok(());
    }
    println!("installing: cargo-fuzz (for `cargo xtask fuzz`)");
    cmd::run(
        toolchain::cargo()
            .args(["install", "cargo-fuzz", "--locked"])
            // Outside the workspace, so its .cargo/config.toml plays no part.
            .current_dir(std::env::temp_dir()),
    )?;
    match version() {
        Some(version) => {
            println!("installed: {version}");
            Ok(())
        }
        None => bail!(
            "cargo-fuzz was installed but `cargo fuzz --version` fails; is {} on PATH?",
            toolchain::cargo_home().join("bin").display()
        ),
    }
}

fn ensure_bpf_linker(llvm: u32) -> Result<()> {
    let marker = toolchain::bpf_linker_marker();
    let why = match toolchain::bpf_linker() {
        Some(linker) if linker.llvm_major == Some(llvm) => {
            // Keep the marker in step with what is installed (cheap, silent).
            if std::fs::read_to_string(&marker)
                .ok()
                .map(|s| s.trim().to_string())
                != Some(llvm.to_string())
            {
                let _ = std::fs::write(&marker, format!("{llvm}\n"));
            }
            println!(
                "ok: bpf-linker already present ({}, LLVM {llvm}, {})",
                linker.version,
                linker.path.display()
            );
            return Ok(());
        }
        Some(linker) => match linker.llvm_major {
            Some(other) => format!("{} is built for LLVM {other}", linker.path.display()),
            None => format!(
                "cannot tell which LLVM {} is built for",
                linker.path.display()
            ),
        },
        None => "not installed".to_string(),
    };
    println!("installing: bpf-linker for LLVM {llvm} ({why})");
    cmd::run(
        toolchain::cargo()
            .args(bpf_linker_install_args(llvm))
            // Outside the workspace, so its .cargo/config.toml plays no part.
            .current_dir(std::env::temp_dir())
            .env("PATH", toolchain::path_with_first(&llvm_bin(llvm))?),
    )?;
    std::fs::write(&marker, format!("{llvm}\n"))
        .with_context(|| format!("cannot write {}", marker.display()))?;
    match toolchain::bpf_linker() {
        Some(linker) => {
            println!("installed: {} ({})", linker.version, linker.path.display());
            Ok(())
        }
        None => bail!(
            "bpf-linker was installed but does not run; is {} on PATH?",
            toolchain::cargo_home().join("bin").display()
        ),
    }
}

/// Not Debian/Ubuntu: check what can be checked without a package manager,
/// and if anything is missing print the whole list and fail.
fn not_debian(why: &str, llvm: u32, packages: &[String]) -> Result<()> {
    let tools = [
        "cc",
        "bpftool",
        "ip",
        "ethtool",
        "postfix",
        "swaks",
        "hydra",
        "patator",
        "medusa",
        "python3",
        "slapd",
        "slapadd",
        "ldapadd",
        "rspamd",
        "clamd",
        "redis-server",
    ];
    let missing_tools: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            toolchain::find_in_path(t).is_none()
                && !["/usr/sbin", "/sbin"]
                    .iter()
                    .any(|d| std::path::Path::new(d).join(t).is_file())
        })
        .collect();
    let linker_ok = toolchain::bpf_linker().is_some_and(|l| l.llvm_major == Some(llvm));
    if missing_tools.is_empty() && linker_ok {
        println!("ok: {} already present", tools.join(", "));
        println!("ok: bpf-linker for LLVM {llvm} already present");
        return Ok(());
    }
    println!("cannot install packages here: {why}.");
    println!("Install these with your system's package manager (Debian/Ubuntu names):");
    println!("  {}", packages.join(" "));
    println!(
        "  (LLVM {llvm} development files with Polly, a C toolchain, bpftool, iproute2, ethtool, \
         Postfix with no system instance running, swaks, python3, slapd with no system \
         instance running, ldap-utils, rspamd, clamav-daemon and redis-server with no \
         system instance or freshclam running)"
    );
    println!(
        "then build bpf-linker against LLVM {llvm} (llvm-config of LLVM {llvm} first on PATH):"
    );
    println!(
        "  PATH={}:$PATH cargo {}",
        llvm_bin(llvm).display(),
        bpf_linker_install_args(llvm).join(" ")
    );
    println!("and run `cargo xtask setup` again.");
    if !missing_tools.is_empty() {
        println!("missing commands: {}", missing_tools.join(" "));
    }
    if !linker_ok {
        println!("missing: bpf-linker built for LLVM {llvm}");
    }
    bail!("unsupported system for automatic setup ({why})")
}

/// Effective uid 0, read from /proc/self/status (no libc dependency).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}
