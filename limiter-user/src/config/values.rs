//! Value formats shared by the sections: durations, sizes, rates,
//! networks and percentages, each read and written back in the same form.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

/// The longest duration any key takes (100 years): [`parse_duration`]
/// refuses longer ones.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A count per period, written `"20/1m"` (also `"20/m"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events allowed per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((count, per)) = s.split_once('/') else {
            return Err(format!(
                "invalid rate {s:?}: expected a count per duration, like \"20/1m\""
            ));
        };
        let count = count
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("invalid rate {s:?}: {:?} is not a count", count.trim()))?;
        let per = per.trim();
        let per = if per.starts_with(|c: char| c.is_ascii_alphabetic()) {
            parse_duration(&format!("1{per}"))
        } else {
            parse_duration(per)
        }
        .map_err(|e| format!("invalid rate {s:?}: {e}"))?;
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, format_duration(self.per))
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(StrVisitor {
            expecting: "a rate like \"20/1m\"",
            parse: Rate::from_str,
        })
    }
}

/// Parses a humantime duration (`"10s"`, `"30m"`, `"7d"`, `"1h 30m"`).
///
/// # Errors
/// A message naming the bad text.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration =
        humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    // Longer ones cannot be written back (humantime refuses them) and no
    // timeout or window needs them.
    if duration > MAX_DURATION {
        return Err(format!(
            "invalid duration {s:?}: longer than {}",
            format_duration(MAX_DURATION)
        ));
    }
    Ok(duration)
}

/// Formats a duration compactly in the largest unit that divides it exactly
/// (`"30m"`, `"7d"`, `"90s"`, `"1500ms"`); [`parse_duration`] reads it back.
#[must_use]
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u128, &str); 7] = [
        (86_400_000_000_000, "d"),
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    for (size, unit) in UNITS {
        if nanos.is_multiple_of(size) {
            return format!("{}{unit}", nanos / size);
        }
    }
    format!("{nanos}ns")
}

/// Parses a size: `"25MB"`, `"64 KiB"`, `"1000"` (bytes). Units are
/// B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of
/// 1024), in any case.
///
/// # Errors
/// A message naming the bad text.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid size {s:?}: expected a number of bytes or a size like \"25MB\"")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {other:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(multiplier)
        // TOML integers are signed 64-bit: a larger size could not be
        // written back.
        .filter(|&size| i64::try_from(size).is_ok())
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

/// Parses a network (`"192.0.2.0/24"`) or a bare address (the single host).
/// A network with host bits set (`"192.0.2.7/24"`) is refused as ambiguous.
///
/// # Errors
/// A message naming the bad text.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let text = s.trim();
    if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("invalid network {s:?}: expected a CIDR like \"192.0.2.0/24\""))?;
        if net.trunc() != net {
            return Err(format!(
                "invalid network {s:?}: host bits are set (the network is {}, the single host is {})",
                net.trunc(),
                net.addr()
            ));
        }
        Ok(net)
    } else {
        let addr: IpAddr = text.parse().map_err(|_| {
            format!("invalid network {s:?}: expected a CIDR like \"192.0.2.0/24\" or an address")
        })?;
        Ok(IpNet::from(addr))
    }
}

/// Deserializes a string through a parse function, with a clear "expected".
struct StrVisitor<T> {
    expecting: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> Visitor<'_> for StrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        (self.parse)(v).map_err(E::custom)
    }
}

pub(super) mod duration_serde {
    use super::{format_duration, parse_duration, Deserializer, Duration, Serializer, StrVisitor};

    pub fn serialize<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_str(StrVisitor {
            expecting: "a duration like \"30s\", \"10m\" or \"7d\"",
            parse: parse_duration,
        })
    }
}

pub(super) mod size_serde {
    use super::{de, fmt, parse_size, Deserializer, Serializer, Visitor};

    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's `serialize_with` signature
    pub fn serialize<S: Serializer>(size: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(*size)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a number of bytes or a size like \"25MB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A network read with [`parse_cidr`], for lists.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(StrVisitor {
                expecting: "a network like \"192.0.2.0/24\" or an address",
                parse: parse_cidr,
            })
            .map(Cidr)
    }
}

pub(super) mod cidr_serde {
    use super::{Cidr, Deserialize, Deserializer, IpNet, Serializer};

    pub fn serialize<S: Serializer>(net: &IpNet, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(net)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpNet, D::Error> {
        Cidr::deserialize(deserializer).map(|c| c.0)
    }
}

pub(super) mod cidr_list_serde {
    use super::{Cidr, Deserialize, Deserializer, IpNet, Serializer};

    pub fn serialize<S: Serializer>(nets: &[IpNet], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(nets.iter().map(ToString::to_string))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
        Ok(Vec::<Cidr>::deserialize(deserializer)?
            .into_iter()
            .map(|c| c.0)
            .collect())
    }
}

/// A percentage, written `"50%"` (or a bare integer, `50`).
pub(super) mod percent_serde {
    use serde::de::{self, Deserializer, Visitor};
    use serde::ser::Serializer;
    use std::fmt;

    pub fn serialize<S: Serializer>(value: &u8, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{value}%"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u8, D::Error> {
        struct PercentVisitor;
        impl Visitor<'_> for PercentVisitor {
            type Value = u8;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a percentage such as \"50%\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u8, E> {
                let digits = v.trim().strip_suffix('%').unwrap_or(v.trim()).trim_end();
                digits
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a percentage from 0% to 100%")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u8, E> {
                u8::try_from(v)
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| E::custom(format!("{v} is not a percentage from 0 to 100")))
            }
        }
        deserializer.deserialize_any(PercentVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::parse_err;
    use crate::config::Config;

    /// effective configuration) are refused at parse time, naming the key.
    #[test]
    fn durations_and_sizes_out_of_range_are_refused() {
        for (text, key) in [
            (
                "[smtp]\ncommand_timeout = \"13977500h5500ms\"",
                "command_timeout",
            ),
            (
                "[limits]\nmax_block_duration = \"200years\"",
                "max_block_duration",
            ),
            (
                "[limits]\nblock_duration = \"500000000years\"",
                "block_duration",
            ),
            (
                "[smtp]\nmax_message_size = \"18446744073709551615\"",
                "max_message_size",
            ),
        ] {
            let error = Config::from_toml(text).expect_err(text).to_string();
            assert!(error.contains(key), "{text}: {error}");
        }
        let longest = format!(
            "[limits]\nmax_block_duration = \"{}\"",
            format_duration(MAX_DURATION)
        );
        let config = Config::from_toml(&longest).expect("the longest duration is taken");
        let again = Config::from_toml(&config.to_toml().expect("written back")).expect("read back");
        assert_eq!(again.limits.max_block_duration, MAX_DURATION);
    }

    #[test]
    fn durations_parse_and_bad_ones_name_the_key() {
        for (text, want) in [
            ("10s", 10),
            ("30m", 1800),
            ("7d", 7 * 86_400),
            ("1h 30m", 5400),
            ("2days", 2 * 86_400),
        ] {
            let config = Config::from_toml(&format!(
                "[limits]\nblock_duration = \"{text}\"\nmax_block_duration = \"30d\""
            ))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(config.limits.block_duration, Duration::from_secs(want));
        }
        for (text, key) in [
            ("[limits]\nblock_duration = \"soon\"", "block_duration"),
            ("[limits]\nblock_duration = 30", "block_duration"),
            (
                "[limits]\nfailed_auth_window = \"10\"",
                "failed_auth_window",
            ),
            ("[backend]\nconnect_timeout = \"-1s\"", "connect_timeout"),
            (
                "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"x\"\nrefresh = \"often\"",
                "refresh",
            ),
            ("[filters]\ntimeout = \"\"", "timeout"),
        ] {
            let message = parse_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn duration_formatting_round_trips() {
        for (secs, nanos, want) in [
            (0, 0, "0s"),
            (10, 0, "10s"),
            (90, 0, "90s"),
            (1800, 0, "30m"),
            (5400, 0, "90m"),
            (3600, 0, "1h"),
            (7 * 86_400, 0, "7d"),
            (1, 500_000_000, "1500ms"),
            (0, 1, "1ns"),
        ] {
            let d = Duration::new(secs, nanos);
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want).unwrap(), d);
        }
    }

    #[test]
    fn sizes_parse_and_bad_ones_name_the_key() {
        for (text, want) in [
            ("\"25MB\"", 25_000_000),
            ("\"25 MB\"", 25_000_000),
            ("\"10mb\"", 10_000_000),
            ("\"1B\"", 1),
            ("\"2KB\"", 2_000),
            ("\"3GB\"", 3_000_000_000),
            ("\"1TB\"", 1_000_000_000_000),
            ("\"2KiB\"", 2_048),
            ("\"10MiB\"", 10 * 1024 * 1024),
            ("\"1GiB\"", 1 << 30),
            ("\"1TiB\"", 1 << 40),
            ("\"4096\"", 4_096),
            ("4096", 4_096),
        ] {
            let config = Config::from_toml(&format!(
                "[filters]\nmax_size = {text}\nmax_held = \"1000TB\""
            ))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(config.filters.max_size, want, "{text}");
        }
        for text in [
            "\"25 M\"",
            "\"MB\"",
            "\"-1MB\"",
            "-1",
            "\"1.5MB\"",
            "\"99999999999999TB\"",
            "true",
            "\"\"",
        ] {
            let message = parse_err(&format!("[filters]\nmax_size = {text}"));
            assert!(message.contains("max_size"), "{text}: {message}");
        }
    }

    #[test]
    fn rates_parse_and_bad_ones_name_the_key() {
        for (text, count, per) in [
            ("20/1m", 20, 60),
            ("5/10s", 5, 10),
            ("100/h", 100, 3600),
            ("1 / 1d", 1, 86_400),
        ] {
            let config = Config::from_toml(&format!("[limits]\nnull_sender_rate = \"{text}\""))
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(
                config.limits.null_sender_rate,
                Rate {
                    count,
                    per: Duration::from_secs(per)
                }
            );
        }
        assert_eq!(
            Rate {
                count: 20,
                per: Duration::from_secs(60)
            }
            .to_string(),
            "20/1m"
        );
        for text in [
            "\"20\"",
            "\"x/1m\"",
            "\"20/soon\"",
            "\"-1/1m\"",
            "\"20/\"",
            "20",
        ] {
            let message = parse_err(&format!("[limits]\nnull_sender_rate = {text}"));
            assert!(message.contains("null_sender_rate"), "{text}: {message}");
        }
    }
}
