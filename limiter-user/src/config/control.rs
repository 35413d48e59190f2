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

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_unknown_field;

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        assert_unknown_field(&[("[control]\npath = \"/x\"", "path")]);
    }
}
