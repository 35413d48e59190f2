//! `[kernel]`: the eBPF layer (XDP/TC programs and connection accounting).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Most ports the kernel program can watch (it checks them in a fixed loop).
pub const MAX_KERNEL_PORTS: usize = 16;

/// Longest network interface name Linux accepts (`IFNAMSIZ - 1`).
const MAX_INTERFACE_NAME: usize = 15;

/// `[kernel]`: the eBPF layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Kernel {
    /// Whether the kernel programs must, may or must not be loaded.
    pub mode: KernelMode,
    /// Interfaces the packet filter attaches to; empty attaches nowhere
    /// (connection accounting still works).
    pub interfaces: Vec<String>,
    /// Which hook the packet filter uses.
    pub attach: Attach,
    /// bpffs directory where the maps are pinned, so blocks survive restarts.
    pub pin_path: PathBuf,
    /// Destination TCP ports the kernel guards (SYN caps, block drops).
    pub ports: Vec<u16>,
    /// Most events per second the kernel reports to the agent (drops etc.).
    pub events_per_second: u32,
    /// Sizes of the kernel maps (`max_entries`).
    pub map_sizes: MapSizes,
}

impl Default for Kernel {
    fn default() -> Self {
        Self {
            mode: KernelMode::Auto,
            interfaces: Vec::new(),
            attach: Attach::Auto,
            pin_path: PathBuf::from("/sys/fs/bpf/smtp-limiter"),
            ports: vec![25, 465, 587],
            events_per_second: 100,
            map_sizes: MapSizes::default(),
        }
    }
}

/// `kernel.mode = "auto" | "required" | "off"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelMode {
    /// Load if possible; otherwise run the proxy alone and say so loudly.
    #[default]
    Auto,
    /// Refuse to start without the kernel programs.
    Required,
    /// Never load them (proxy-only enforcement).
    Off,
}

/// `kernel.attach = "auto" | "xdp" | "xdp-generic" | "tc"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attach {
    /// Native XDP, falling back to generic XDP, then TC.
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Xdp,
    /// Generic (SKB) XDP only.
    XdpGeneric,
    /// TC classifier only.
    Tc,
}

impl Attach {
    /// The configuration spelling.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

/// `[kernel.map_sizes]`: `max_entries` of each map. A pinned map keeps the
/// size it was created with until its pin is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapSizes {
    /// Blocked single addresses (IPv4 /32, IPv6 prefixes).
    pub block: u32,
    /// Blocked networks (CIDR rejects and blocks).
    pub block_net: u32,
    /// Allow-listed networks.
    pub allow: u32,
    /// Per-network connection-cap overrides (`limits.source`).
    pub cap_net: u32,
    /// Per-source connection counters.
    pub conn_count: u32,
    /// Sockets being counted (to decrement on close).
    pub conn_socks: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            block: 262_144,
            block_net: 65_536,
            allow: 16_384,
            cap_net: 16_384,
            conn_count: 65_536,
            conn_socks: 262_144,
        }
    }
}

impl Kernel {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let kernel = self;
        let mut names = HashSet::new();
        for (i, name) in kernel.interfaces.iter().enumerate() {
            let key = format!("kernel.interfaces[{i}]");
            if name.is_empty() || name.len() > MAX_INTERFACE_NAME {
                return Err(invalid(
                    key,
                    format!("{name:?} is not an interface name (1 to {MAX_INTERFACE_NAME} bytes)"),
                ));
            }
            if name.contains(['/', ' ', '\t', '\n', '\0']) {
                return Err(invalid(key, format!("{name:?} is not an interface name")));
            }
            if !names.insert(name.as_str()) {
                return Err(invalid(key, format!("{name:?} is listed twice")));
            }
        }
        if kernel.ports.is_empty() {
            return Err(invalid("kernel.ports", "at least one port is needed"));
        }
        if kernel.ports.len() > MAX_KERNEL_PORTS {
            return Err(invalid(
                "kernel.ports",
                format!(
                    "{} ports listed, at most {MAX_KERNEL_PORTS} are supported",
                    kernel.ports.len()
                ),
            ));
        }
        let mut ports = HashSet::new();
        for &port in &kernel.ports {
            if port == 0 {
                return Err(invalid("kernel.ports", "0 is not a port"));
            }
            if !ports.insert(port) {
                return Err(invalid("kernel.ports", format!("{port} is listed twice")));
            }
        }
        let sizes = &kernel.map_sizes;
        for (name, size) in [
            ("block", sizes.block),
            ("block_net", sizes.block_net),
            ("allow", sizes.allow),
            ("cap_net", sizes.cap_net),
            ("conn_count", sizes.conn_count),
            ("conn_socks", sizes.conn_socks),
        ] {
            if size == 0 {
                return Err(invalid(
                    format!("kernel.map_sizes.{name}"),
                    "must be greater than zero",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{
        assert_accepted, assert_invalid, assert_unknown_field, assert_unknown_variant,
    };
    use crate::config::Config;

    #[test]
    fn every_mode_and_attach_parses() {
        for (value, want) in [
            ("auto", KernelMode::Auto),
            ("required", KernelMode::Required),
            ("off", KernelMode::Off),
        ] {
            assert_eq!(
                Config::from_toml(&format!("[kernel]\nmode = \"{value}\""))
                    .unwrap()
                    .kernel
                    .mode,
                want
            );
        }
        for (value, want) in [
            ("auto", Attach::Auto),
            ("xdp", Attach::Xdp),
            ("xdp-generic", Attach::XdpGeneric),
            ("tc", Attach::Tc),
        ] {
            assert_eq!(
                Config::from_toml(&format!("[kernel]\nattach = \"{value}\""))
                    .unwrap()
                    .kernel
                    .attach,
                want
            );
        }
        assert_unknown_variant(&[
            ("[kernel]\nmode = \"on\"", "mode"),
            ("[kernel]\nattach = \"xdpgeneric\"", "attach"),
        ]);
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[
            ("[kernel]\ninterface = [\"eth0\"]", "interface"),
            ("[kernel.map_sizes]\nblocks = 5", "blocks"),
        ]);
        let ports17 = format!(
            "[kernel]\nports = [{}]",
            (1..=17)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_invalid(&[
            ("[kernel]\nports = []", "kernel.ports"),
            (ports17.as_str(), "kernel.ports"),
            ("[kernel]\nports = [25, 0]", "kernel.ports"),
            ("[kernel]\nports = [25, 587, 25]", "kernel.ports"),
            ("[kernel]\ninterfaces = [\"\"]", "kernel.interfaces[0]"),
            (
                "[kernel]\ninterfaces = [\"eth0\", \"averyveryverylongname\"]",
                "kernel.interfaces[1]",
            ),
            (
                "[kernel]\ninterfaces = [\"eth0\", \"eth0\"]",
                "kernel.interfaces[1]",
            ),
            ("[kernel.map_sizes]\nblock = 0", "kernel.map_sizes.block"),
            (
                "[kernel.map_sizes]\nblock_net = 0",
                "kernel.map_sizes.block_net",
            ),
            ("[kernel.map_sizes]\nallow = 0", "kernel.map_sizes.allow"),
            (
                "[kernel.map_sizes]\ncap_net = 0",
                "kernel.map_sizes.cap_net",
            ),
            (
                "[kernel.map_sizes]\nconn_count = 0",
                "kernel.map_sizes.conn_count",
            ),
            (
                "[kernel.map_sizes]\nconn_socks = 0",
                "kernel.map_sizes.conn_socks",
            ),
        ]);
        assert_accepted(&[
            "[kernel]\nmode = \"required\"\ninterfaces = []",
            "[kernel]\nports = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]",
        ]);
    }
}
