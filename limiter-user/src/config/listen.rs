//! `[[listen]]`: where the proxy accepts SMTP clients.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::{enum_name, invalid, Config, ConfigError};

/// One `[[listen]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Listen {
    /// Address and port the proxy binds.
    pub address: SocketAddr,
    /// TLS offered on this listener.
    pub tls: TlsMode,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 25),
            tls: TlsMode::None,
        }
    }
}

/// TLS on a listener (`tls = "none" | "starttls" | "implicit"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP, no STARTTLS offered.
    #[default]
    None,
    /// Plain SMTP that offers STARTTLS (port 25/587).
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

impl Config {
    /// Checks `[[listen]]` against `[tls]` and `backend.address`.
    pub(super) fn validate_listen(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one [[listen]] entry is needed"));
        }
        let mut seen = HashSet::new();
        for (i, listen) in self.listen.iter().enumerate() {
            // Port 0 asks the kernel for a free port: several are distinct.
            if listen.address.port() != 0 && !seen.insert(listen.address) {
                return Err(invalid(
                    format!("listen[{i}].address"),
                    format!("{} is listed twice", listen.address),
                ));
            }
            if listen.tls != TlsMode::None && self.tls.is_none() {
                return Err(invalid(
                    format!("listen[{i}].tls"),
                    format!(
                        "\"{}\" needs a [tls] section with certificate and key",
                        enum_name(&listen.tls)
                    ),
                ));
            }
            if listen.address == self.backend.address {
                return Err(invalid(
                    format!("listen[{i}].address"),
                    format!(
                        "{} is also backend.address: the proxy would relay to itself",
                        listen.address
                    ),
                ));
            }
        }
        Ok(())
    }
}
