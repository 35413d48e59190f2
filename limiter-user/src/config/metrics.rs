//! `[metrics]`: the Prometheus endpoint.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// `[metrics]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Where Prometheus scrapes `/metrics`.
    pub address: SocketAddr,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            address: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9425),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_parse_error_names, assert_unknown_field};

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[("[metrics]\nlisten = \"127.0.0.1:1\"", "listen")]);
        assert_parse_error_names(&[("[metrics]\naddress = \"9425\"", "address")]);
    }
}
