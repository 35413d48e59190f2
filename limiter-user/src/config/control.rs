//! `[control]`: the CLI's control socket.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[control]`: the CLI's way in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Control {
    /// Unix socket the agent listens on for `smtp-limiter` commands.
    pub socket: PathBuf,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/smtp-limiter/control.sock"),
        }
    }
}
