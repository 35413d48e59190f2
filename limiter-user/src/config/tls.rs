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
