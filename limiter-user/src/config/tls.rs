//! `[tls]`: the certificate of STARTTLS and implicit-TLS listeners.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[tls]`: needed as soon as a listener uses TLS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain presented to clients.
    pub certificate: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
}

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_unknown_field;

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        assert_unknown_field(&[(
            "[tls]\ncertificate = \"/c\"\nkey = \"/k\"\nchain = \"/x\"",
            "chain",
        )]);
    }
}
