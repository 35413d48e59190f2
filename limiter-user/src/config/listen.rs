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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{
        assert_accepted, assert_invalid, assert_parse_error_names, assert_unknown_field,
        assert_unknown_variant,
    };

    #[test]
    fn every_tls_mode_parses() {
        let tls = "[tls]\ncertificate = \"/c\"\nkey = \"/k\"\n";
        for (value, want) in [
            ("none", TlsMode::None),
            ("starttls", TlsMode::Starttls),
            ("implicit", TlsMode::Implicit),
        ] {
            let text = format!("[[listen]]\naddress = \"127.0.0.1:25\"\ntls = \"{value}\"\n{tls}");
            assert_eq!(Config::from_toml(&text).unwrap().listen[0].tls, want);
            assert_eq!(enum_name(&want), value);
        }
        assert_unknown_variant(&[("[[listen]]\ntls = \"ssl\"", "tls")]);
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[("[[listen]]\naddres = \"127.0.0.1:25\"", "addres")]);
        assert_parse_error_names(&[("[[listen]]\naddress = \"127.0.0.1\"", "address")]);
        assert_invalid(&[
            ("listen = []", "listen"),
            ("[[listen]]\ntls = \"starttls\"", "listen[0].tls"),
            ("[[listen]]\naddress = \"127.0.0.1:25\"\n[[listen]]\naddress = \"127.0.0.1:465\"\ntls = \"implicit\"", "listen[1].tls"),
            ("[[listen]]\naddress = \"127.0.0.1:25\"\n[[listen]]\naddress = \"127.0.0.1:25\"", "listen[1].address"),
            ("[[listen]]\naddress = \"127.0.0.1:2525\"", "listen[0].address"),
        ]);
        assert_accepted(&["[[listen]]\naddress = \"127.0.0.1:0\""]);
    }
}
