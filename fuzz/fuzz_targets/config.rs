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

/// Set while the finding it names is open; make it `false` to check again.
const KNOWN_DURATION_ROUND_TRIP: bool = false;
/// Set while the finding it names is open; make it `false` to check again.
const KNOWN_SIZE_OVER_I64: bool = false;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text) {
        Ok(config) => {
            let written = match config.to_toml() {
                Ok(written) => written,
                Err(e) if KNOWN_SIZE_OVER_I64 && format!("{e:?}").contains("OutOfRange") => {
                    // Reported, not fixed here (config.rs is not this
                    // crate's): a size above i64::MAX (`max_message_size =
                    // "18446744073709551615"`) is accepted but TOML cannot
                    // write it back (`OutOfRange(u64)`), so `check-config`
                    // cannot print the configuration. Seed:
                    // corpus/config/known_size_over_i64.
                    return;
                }
                Err(e) => panic!("an accepted configuration does not serialise: {e:?}"),
            };
            let again = match Config::from_toml(&written) {
                Ok(again) => again,
                Err(e) if KNOWN_DURATION_ROUND_TRIP && e.to_string().contains("too large") => {
                    // Reported, not fixed here (config.rs is not this
                    // crate's): a long duration written in the largest unit
                    // that divides it (`"13977500h5500ms"` becomes
                    // `"50319000005500ms"`) overflows humantime's parser.
                    // Seed: corpus/config/known_duration_round_trip.
                    return;
                }
                Err(e) => panic!("the written configuration is refused: {e}\n---\n{written}"),
            };
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
