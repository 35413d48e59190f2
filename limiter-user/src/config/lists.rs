//! `[lists]`: static allow and reject lists, and the files that extend them.

use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::values::cidr_list_serde;
use super::{invalid, ConfigError};

/// `[lists]`: static allow and reject lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lists {
    /// Sources that are never blocked or limited.
    #[serde(with = "cidr_list_serde")]
    pub allow: Vec<IpNet>,
    /// Sources dropped in the kernel (refused by the proxy without it).
    #[serde(with = "cidr_list_serde")]
    pub reject: Vec<IpNet>,
    /// HELO/EHLO name patterns refused at the SMTP level.
    pub reject_helo: Vec<String>,
    /// HELO/EHLO name patterns exempt from the HELO limits and the
    /// null-sender rate. Clients claim these names, so they never lift the
    /// connection cap, blocks, harvest/AUTH limits or relay rules.
    pub allow_helo: Vec<String>,
    /// Files of networks dropped like `reject`, one address or CIDR a line
    /// with `#` comments (see `crate::lists`); re-read on reload and SIGHUP,
    /// so an entry removed from a file leaves the kernel.
    pub reject_files: Vec<PathBuf>,
    /// Files of networks exempt like `allow`, in the same format.
    pub allow_files: Vec<PathBuf>,
    /// The entries read from `reject_files` and `allow_files` by
    /// [`Config::load_with_lists`] (not part of the TOML).
    #[serde(skip)]
    pub from_files: crate::lists::FileLists,
}

impl Lists {
    /// Every allow-list network: `allow`, then the files' entries.
    pub fn allow_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.allow
            .iter()
            .copied()
            .chain(self.from_files.allow.iter().map(|e| e.net))
    }

    /// Every reject-list network: `reject`, then the files' entries.
    pub fn reject_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.reject
            .iter()
            .copied()
            .chain(self.from_files.reject.iter().map(|e| e.net))
    }

    /// Reads `allow_files` and `reject_files` into `from_files`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and, for each bad line, the
    /// file and the line.
    pub fn read_files(&mut self) -> Result<(), ConfigError> {
        self.from_files = crate::lists::FileLists::read(&self.allow_files, &self.reject_files)
            .map_err(|(key, reason)| invalid(key, reason))?;
        Ok(())
    }
}

impl Lists {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, pattern) in self.reject_helo.iter().enumerate() {
            if pattern.trim().is_empty() {
                return Err(invalid(
                    format!("lists.reject_helo[{i}]"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{assert_invalid, assert_unknown_field, parse_err};
    use crate::config::Config;

    #[test]
    fn cidr_lists_accept_networks_and_bare_addresses() {
        let config = Config::from_toml(
            "[lists]\nallow = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::1\", \"2001:db8:1::/48\"]\n\
             [[limits.source]]\ncidr = \"198.51.100.9\"\nmax_connections = 3",
        )
        .unwrap();
        let want: Vec<IpNet> = [
            "10.0.0.0/8",
            "192.0.2.7/32",
            "2001:db8::1/128",
            "2001:db8:1::/48",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(config.lists.allow, want);
        assert_eq!(
            config.limits.source[0].cidr,
            "198.51.100.9/32".parse::<IpNet>().unwrap()
        );
        for (text, key) in [
            ("[lists]\nallow = [\"10.0.0.0/33\"]", "allow"),
            ("[lists]\nreject = [\"example.com\"]", "reject"),
            ("[lists]\nreject = [\"192.0.2.7/24\"]", "reject"),
            ("[lists]\nreject = [42]", "reject"),
            (
                "[[limits.source]]\ncidr = \"300.0.0.0/8\"\nmax_connections = 1",
                "cidr",
            ),
        ] {
            let message = parse_err(text);
            assert!(message.contains(key), "{text}: {message}");
        }
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[("[lists]\ndeny = []", "deny")]);
        assert_invalid(&[("[lists]\nreject_helo = [\"\"]", "lists.reject_helo[0]")]);
    }
}
