//! The configuration (`config::Config::from_toml`): arbitrary text is a
//! configuration or a typed error, never a panic.
//!
//! Asserts: an error is `Parse` or `Invalid` (never `Read`), with a
//! non-empty message, and `Invalid` names a key; an accepted configuration
//! written back with `to_toml` is accepted again and is the same value (the
//! round trip `smtp-limiter check-config` relies on), and so is its
//! redacted copy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_user::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            let written = config
                .to_toml()
                .expect("an accepted configuration serialises");
            let again = Config::from_toml(&written).unwrap_or_else(|e| {
                panic!("the written configuration is refused: {e}\n---\n{written}")
            });
            assert_eq!(again, config, "round trip through to_toml\n---\n{written}");
            let redacted = config.redacted().to_toml().expect("redacted serialises");
            Config::from_toml(&redacted).expect("the redacted configuration parses");
        }
        Err(ConfigError::Parse(message)) => assert!(!message.is_empty()),
        Err(ConfigError::Invalid { key, reason }) => {
            assert!(!key.is_empty() && !reason.is_empty(), "{key:?}: {reason:?}");
        }
        Err(e @ ConfigError::Read { .. }) => panic!("no file was read: {e}"),
    }
});
