//! The agent's one door to the kernel.
//!
//! [`Datapath`] is the narrow interface the rest of the agent uses: block and
//! unblock sources, allow-list them, set caps, read connection counts and
//! counters, sweep expired blocks. [`BpfDatapath`] implements it over the
//! aya-loaded programs and pinned maps; [`NoKernel`] is what the agent runs
//! on when `kernel.mode = "off"` (or `"auto"` and BPF could not be loaded):
//! every kernel-only feature then reports that it is off, loudly, instead of
//! pretending.

mod addr;
mod bpf;
mod clock;
mod hints;
mod mapped;

use std::{net::IpAddr, path::PathBuf, time::SystemTime};

use ipnet::IpNet;
pub use limiter_common::Stats as KernelCounters;
use limiter_common::{DropReason, Reason};

pub use addr::{host_ip, host_key, HostKey};
pub use bpf::{
    has_embedded_object, AttachMode, Attachment, BpfDatapath, DropEvents, KernelOptions, MapSizes,
};
pub use clock::{mono_now_ns, mono_ns_to_system, system_to_mono_ns};

/// Errors of the kernel layer, each naming what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel layer is off (kernel.mode = \"off\", or BPF could not be loaded): {0}")]
    Off(String),
    #[error("this binary has no embedded eBPF object; build it with `cargo xtask build` or pass --ebpf-object FILE")]
    NoObject,
    #[error("reading the eBPF object {path}: {source}")]
    ReadObject {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another smtp-limiter agent holds the pin path {path}; stop it first (or give this one another kernel.pin_path)")]
    AlreadyRunning { path: PathBuf },
    #[error("pin path {path}: {reason}")]
    PinPath { path: PathBuf, reason: String },
    #[error(
        "the pinned map {path} does not match this version ({reason}); remove the pins with `rm -r {dir}` (this forgets kernel blocks; the agent restores its stored ones) and start again",
        dir = path.parent().map(|p| p.display().to_string()).unwrap_or_default()
    )]
    StaleMap { path: PathBuf, reason: String },
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("program {program}: {message}")]
    Program {
        program: &'static str,
        message: String,
    },
    #[error("attaching to interface {interface} ({mode}): {message}")]
    Attach {
        interface: String,
        mode: &'static str,
        message: String,
    },
    #[error("no cgroup v2 mount found in /proc/mounts: connection accounting needs one (mount -t cgroup2 none /sys/fs/cgroup)")]
    NoCgroup2,
    #[error("map {map} is full ({max_entries} entries): raise kernel.map_sizes.{config_key}")]
    MapFull {
        map: &'static str,
        max_entries: u32,
        config_key: &'static str,
    },
    #[error("map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

/// A block as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelBlock {
    /// The blocked address (full-length prefix) or network.
    pub net: IpNet,
    /// Its origin; `None` for a code this version does not know (written
    /// by another tool or a newer agent).
    pub origin: Option<Reason>,
    /// When it ends; `None` = never.
    pub expires: Option<SystemTime>,
    /// Packets it dropped.
    pub drops: u64,
}

/// A block found for an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockHit {
    /// Its origin; `None` for a code this version does not know.
    pub origin: Option<Reason>,
    /// When it ends; `None` = never.
    pub expires: Option<SystemTime>,
}

/// What the kernel enforces that can change while running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLimits {
    /// Concurrent connections per source; 0 = unlimited.
    pub max_connections: u32,
    /// Prefix length by which IPv6 sources are counted.
    pub ipv6_prefix_len: u8,
    /// Protected TCP ports (at most `limiter_common::MAX_PORTS`).
    pub ports: Vec<u16>,
    /// Drop events per second and CPU sent to the agent.
    pub events_per_second: u32,
    /// `mode = "observe"`: the programs count what they would drop
    /// (`would_drop_*`) and pass every packet. Applied live like the rest.
    pub observe: bool,
}

impl Default for KernelLimits {
    fn default() -> Self {
        Self {
            max_connections: 10,
            ipv6_prefix_len: 64,
            ports: vec![25, 465, 587],
            events_per_second: 100,
            observe: false,
        }
    }
}

/// A dropped (or, in observe mode, would-be dropped) packet reported by the
/// kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropEvent {
    pub at: SystemTime,
    pub source: IpAddr,
    /// Why; `None` for a code this version does not know.
    pub reason: Option<DropReason>,
    pub port: u16,
    /// The packet opened a new connection (SYN).
    pub syn: bool,
    /// The packet was not dropped: the kernel observes (`mode = "observe"`)
    /// and only reports what it would have dropped.
    pub observed: bool,
}

/// The kernel half of the limiter, as the agent sees it.
pub trait Datapath: Send + Sync {
    /// A one-line description for logs and `stats`.
    fn describe(&self) -> String;
    /// Blocks an address (full-length prefix) or a network until `expires`
    /// (`None` = until removed). Replaces an existing block of the same net.
    fn block(
        &self,
        net: IpNet,
        expires: Option<SystemTime>,
        origin: Reason,
    ) -> Result<(), KernelError>;
    /// Removes a block; `Ok(false)` if there was none.
    fn unblock(&self, net: IpNet) -> Result<bool, KernelError>;
    /// Every block, expired ones included until swept.
    fn blocks(&self) -> Result<Vec<KernelBlock>, KernelError>;
    /// The active block covering `addr` (exact address first, then the
    /// most specific network), if any.
    fn block_covering(&self, addr: IpAddr) -> Result<Option<BlockHit>, KernelError>;
    /// Removes blocks that expired before `now`; returns how many.
    fn sweep_expired(&self, now: SystemTime) -> Result<usize, KernelError>;
    /// Allow-lists a network: never dropped, never capped.
    fn allow(&self, net: IpNet) -> Result<(), KernelError>;
    /// Removes an allow-list entry; `Ok(false)` if there was none.
    fn disallow(&self, net: IpNet) -> Result<bool, KernelError>;
    /// Every allow-list entry.
    fn allows(&self) -> Result<Vec<IpNet>, KernelError>;
    /// Sets the connection cap for sources inside `net` (0 = unlimited).
    fn set_cap(&self, net: IpNet, max_connections: u32) -> Result<(), KernelError>;
    /// Removes a per-network cap; `Ok(false)` if there was none.
    fn remove_cap(&self, net: IpNet) -> Result<bool, KernelError>;
    /// Every per-network cap.
    fn caps(&self) -> Result<Vec<(IpNet, u32)>, KernelError>;
    /// Applies the global limits.
    fn set_limits(&self, limits: &KernelLimits) -> Result<(), KernelError>;
    /// Connections the kernel counts for the source of `addr` (its /64 or
    /// configured prefix for IPv6).
    fn connections(&self, addr: IpAddr) -> Result<u32, KernelError>;
    /// Every source holding connections, with its count.
    fn connection_counts(&self) -> Result<Vec<(IpNet, u32)>, KernelError>;
    /// Decision counters summed over CPUs.
    fn counters(&self) -> Result<KernelCounters, KernelError>;
}

/// The kernel layer switched off: nothing is enforced in the kernel.
pub struct NoKernel {
    why: String,
}

impl NoKernel {
    pub fn new(why: impl Into<String>) -> Self {
        Self { why: why.into() }
    }

    fn off<T>(&self) -> Result<T, KernelError> {
        Err(KernelError::Off(self.why.clone()))
    }
}

impl Datapath for NoKernel {
    fn describe(&self) -> String {
        format!("kernel layer off: {}", self.why)
    }
    fn block(&self, _: IpNet, _: Option<SystemTime>, _: Reason) -> Result<(), KernelError> {
        self.off()
    }
    fn unblock(&self, _: IpNet) -> Result<bool, KernelError> {
        self.off()
    }
    fn blocks(&self) -> Result<Vec<KernelBlock>, KernelError> {
        self.off()
    }
    fn block_covering(&self, _: IpAddr) -> Result<Option<BlockHit>, KernelError> {
        Ok(None)
    }
    fn sweep_expired(&self, _: SystemTime) -> Result<usize, KernelError> {
        Ok(0)
    }
    fn allow(&self, _: IpNet) -> Result<(), KernelError> {
        self.off()
    }
    fn disallow(&self, _: IpNet) -> Result<bool, KernelError> {
        self.off()
    }
    fn allows(&self) -> Result<Vec<IpNet>, KernelError> {
        self.off()
    }
    fn set_cap(&self, _: IpNet, _: u32) -> Result<(), KernelError> {
        self.off()
    }
    fn remove_cap(&self, _: IpNet) -> Result<bool, KernelError> {
        self.off()
    }
    fn caps(&self) -> Result<Vec<(IpNet, u32)>, KernelError> {
        self.off()
    }
    fn set_limits(&self, _: &KernelLimits) -> Result<(), KernelError> {
        self.off()
    }
    fn connections(&self, _: IpAddr) -> Result<u32, KernelError> {
        self.off()
    }
    fn connection_counts(&self) -> Result<Vec<(IpNet, u32)>, KernelError> {
        self.off()
    }
    fn counters(&self) -> Result<KernelCounters, KernelError> {
        self.off()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_kernel_says_why() {
        let k = NoKernel::new("kernel.mode = \"off\"");
        let err = k
            .block(
                "192.0.2.1/32".parse().unwrap(),
                None,
                limiter_common::Reason::Manual,
            )
            .unwrap_err();
        assert!(err.to_string().contains("kernel.mode = \"off\""), "{err}");
        assert_eq!(k.sweep_expired(SystemTime::now()).unwrap(), 0);
    }
}
