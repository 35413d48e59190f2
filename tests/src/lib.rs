//! Shared pieces of the integration tests and benchmarks: hand-built packets,
//! network namespaces with veth pairs, TCP peers, a fixture that loads
//! the real kernel programs under a private pin path, private Postfix,
//! OpenLDAP (`slapd`), rspamd and ClamAV (`clamd`) instances, the real
//! `smtp-limiter` binary ([`agent`]), the proxy in front of Postfix
//! ([`rig`]), real SMTP clients ([`clients`]) and certificates ([`certs`]).
//!
//! Tests that need root or BPF call [`prerequisites`]: outside CI a missing
//! prerequisite skips the test with a message; under `CI=true` it fails it.

pub mod agent;
pub mod bench;
pub mod certs;
pub mod clamd;
pub mod clients;
pub mod fixture;
pub mod kernel;
pub mod maildir;
pub mod netns;
pub mod packets;
pub mod postfix;
pub mod proxy;
pub mod redis;
pub mod rig;
pub mod rspamd;
pub mod scripted;
pub mod slapd;
pub mod stats;
pub mod tcp;

/// Whether privileged tests can run here. Under `CI=true` a missing
/// prerequisite is a failure (panic), elsewhere the test is skipped.
pub fn prerequisites(test: &str) -> bool {
    fixture::require(test, missing_prerequisite())
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (BPF, network namespaces)".into());
    }
    if kernel::ebpf_object().is_none() {
        return Some(format!(
            "no eBPF object at {} (run `cargo xtask build-ebpf` or `cargo xtask test`)",
            kernel::object_path().display()
        ));
    }
    None
}

/// The `smtp-limiter` binary, built next to the test binaries (`cargo xtask
/// test` builds it first; `cargo test` alone does not build another
/// package's binaries).
///
/// # Panics
/// When it has not been built.
pub fn smtp_limiter_binary() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("smtp-limiter")))
        .filter(|path| path.is_file())
        .expect("smtp-limiter binary next to the test binaries: run `cargo xtask test` or `cargo build -p limiter-user`")
}

/// The test process that made a fixture directory named `<prefix><pid>.…`,
/// if that process is gone (or a zombie): its leftovers may be removed.
pub fn dead_fixture_owner(dir_name: &str, prefix: &str) -> Option<u32> {
    let owner = dir_name
        .strip_prefix(prefix)?
        .split('.')
        .next()?
        .parse::<u32>()
        .ok()?;
    // Alive unless gone or a zombie (state Z after the `(comm)`).
    let alive = std::fs::read_to_string(format!("/proc/{owner}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    });
    (!alive).then_some(owner)
}
