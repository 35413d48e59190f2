//! `[state]`: where blocks are kept across restarts, and the log level.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// `[state]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct State {
    /// Directory of the state file (blocks, allows) that survives reboots.
    pub directory: PathBuf,
    /// Most blocks the proxy keeps and stores; past it the block expiring
    /// first is dropped (counted in metrics, logged).
    pub max_blocks: usize,
    /// Log level (`error`, `warn`, `info`, `debug`, `trace`); `RUST_LOG`
    /// overrides it.
    pub log_level: String,
}

impl Default for State {
    fn default() -> Self {
        Self {
            directory: PathBuf::from("/var/lib/smtp-limiter"),
            max_blocks: 100_000,
            log_level: "info".into(),
        }
    }
}

impl State {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_blocks == 0 {
            return Err(invalid("state.max_blocks", "must be at least 1"));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return Err(invalid(
                "state.log_level",
                format!(
                    "{:?}: use error, warn, info, debug or trace",
                    self.log_level
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::assert_unknown_field;

    #[test]
    fn unknown_keys_are_refused_naming_the_key() {
        assert_unknown_field(&[("[state]\ndir = \"/x\"", "dir")]);
    }
}
