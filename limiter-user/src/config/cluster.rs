//! `[cluster]`: several edge hosts sharing their blocks through Redis (see
//! `crate::cluster`). Absent `redis`, the agent is on its own.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Longest node name and key prefix: both travel in every event and key.
pub const MAX_CLUSTER_NAME: usize = 64;

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// The Redis server: `redis://host:port/db`, `rediss://` (TLS) or
    /// `unix:///path`. None: no cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    /// This host's name in the cluster; None: the hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// File holding the Redis password (AUTH); the user, for an ACL, goes
    /// in the URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Prefix of every key, so that several clusters can share one Redis.
    pub prefix: String,
    /// Count the per-source failure windows (failed RCPT, failed AUTH,
    /// null-sender MAILs, filter rejects) over every host as well as here
    /// (`crate::cluster::counters`); per-session counts stay local.
    pub share_counters: bool,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            redis: None,
            node: None,
            password_file: None,
            prefix: "smtp-limiter".to_owned(),
            share_counters: true,
        }
    }
}

/// A node name or prefix: short, and only characters that read the same
/// in a key, a log line and a listing.
fn plain_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_CLUSTER_NAME
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
}

impl Cluster {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.redis {
            let shown = redacted_url(url);
            let lower = url.to_ascii_lowercase();
            let rest = ["redis://", "rediss://", "unix://"]
                .iter()
                .find_map(|scheme| lower.strip_prefix(scheme));
            match rest {
                None => {
                    return Err(invalid(
                        "cluster.redis",
                        format!("{shown:?}: use redis://host:port/db, rediss://host:port/db (TLS) or unix:///path"),
                    ))
                }
                Some(rest) if rest.is_empty() || rest.starts_with(['/', '?']) && !lower.starts_with("unix://") => {
                    return Err(invalid(
                        "cluster.redis",
                        format!("{shown:?} names no host, e.g. redis://10.0.0.5:6379/0"),
                    ))
                }
                Some(_) => {}
            }
            if redis::parse_redis_url(url).is_none() && !lower.starts_with("unix://") {
                return Err(invalid(
                    "cluster.redis",
                    format!("{shown:?} is not a URL, e.g. redis://10.0.0.5:6379/0"),
                ));
            }
        }
        if let Some(node) = &self.node {
            if !plain_name(node) {
                return Err(invalid(
                    "cluster.node",
                    format!(
                        "{node:?}: 1 to {MAX_CLUSTER_NAME} letters, digits, '.', '-', '_' or ':'"
                    ),
                ));
            }
        }
        if !plain_name(&self.prefix) {
            return Err(invalid(
                "cluster.prefix",
                format!(
                    "{:?}: 1 to {MAX_CLUSTER_NAME} letters, digits, '.', '-', '_' or ':'",
                    self.prefix
                ),
            ));
        }
        if self
            .password_file
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(invalid(
                "cluster.password_file",
                "is empty: name the file holding the password, or leave the key out",
            ));
        }
        Ok(())
    }

    /// A copy of the URL without its password, for printing.
    pub(super) fn redact(&mut self) {
        if let Some(url) = self.redis.as_mut() {
            *url = redacted_url(url);
        }
    }
}

/// `url` with its password replaced by stars. The authority ends where a
/// URL parser ends it (the first '/', '?' or '#' after the scheme) and its
/// user info at the last '@' in it, so that a password holding '/', '@' or
/// ':' is hidden whole and the redacted URL still parses as the original.
fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    authority
        .rsplit_once('@')
        .and_then(|(userinfo, host)| {
            let (user, _) = userinfo.split_once(':')?;
            Some(format!("{scheme}://{user}:********@{host}{tail}"))
        })
        .unwrap_or_else(|| url.to_owned())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_accepted, assert_invalid, assert_unknown_field};
    use crate::config::{Config, DEFAULT_CONFIG};

    #[test]
    fn defaults_mean_no_cluster() {
        let cluster = Config::from_toml("").unwrap().cluster;
        assert_eq!(cluster.redis, None);
        assert_eq!(cluster.prefix, "smtp-limiter");
        assert!(cluster.share_counters);
        assert_eq!(Config::from_toml(DEFAULT_CONFIG).unwrap().cluster, cluster);
    }

    #[test]
    fn every_key_parses_and_is_documented() {
        let config = Config::from_toml(
            "[cluster]\nredis = \"rediss://u:pw@10.0.0.5:6380/2\"\nnode = \"mx1\"\npassword_file = \"/etc/smtp-limiter/redis.pw\"\nprefix = \"site-a\"\nshare_counters = false",
        )
        .unwrap();
        let text = config.to_toml().unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), config, "{text}");
        for key in [
            "[cluster]",
            "redis",
            "node",
            "password_file",
            "prefix",
            "share_counters",
        ] {
            assert!(
                DEFAULT_CONFIG.contains(&format!("# {key}")),
                "{key} undocumented"
            );
        }
        let shown = config.redacted().to_toml().unwrap();
        assert!(
            !shown.contains("pw@") && shown.contains("u:********@10.0.0.5"),
            "{shown}"
        );
    }

    #[test]
    fn the_redacted_url_hides_the_whole_password_and_parses_as_the_original() {
        for (url, shown) in [
            // The fuzzer's find: the authority ends at the '/', so the
            // '@' after it is in the path, not the user info.
            ("redis://10.0.0.5:/@", "redis://10.0.0.5:/@"),
            (
                "redis://u:p@ss@10.0.0.5:6379/0?x=@",
                "redis://u:********@10.0.0.5:6379/0?x=@",
            ),
            ("rediss://:pw@h#@", "rediss://:********@h#@"),
            ("redis://u@h/0", "redis://u@h/0"),
            ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ] {
            let text = format!("[cluster]\nredis = {url:?}");
            let redacted = Config::from_toml(&text)
                .unwrap_or_else(|e| panic!("{url}: {e}"))
                .redacted();
            assert_eq!(redacted.cluster.redis.as_deref(), Some(shown), "{url}");
            let again = Config::from_toml(&redacted.to_toml().unwrap());
            assert!(again.is_ok(), "{url}: {again:?}");
        }
        let message = Config::from_toml("[cluster]\nredis = \"http://u:secret@x\"")
            .unwrap_err()
            .to_string();
        assert!(
            !message.contains("secret") && message.contains("u:********@x"),
            "{message}"
        );
    }

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[("[cluster]\nurl = \"redis://x\"", "url")]);
        assert_invalid(&[
            ("[cluster]\nredis = \"http://x:6379\"", "cluster.redis"),
            ("[cluster]\nredis = \"redis://\"", "cluster.redis"),
            ("[cluster]\nredis = \"redis:///0\"", "cluster.redis"),
            ("[cluster]\nnode = \"\"", "cluster.node"),
            ("[cluster]\nnode = \"mx 1\"", "cluster.node"),
            ("[cluster]\nprefix = \"a{b}\"", "cluster.prefix"),
            ("[cluster]\npassword_file = \"\"", "cluster.password_file"),
        ]);
        let message = Config::from_toml("[cluster]\nredis = \"http://x\"")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("\"http://x\"") && message.contains("redis://"),
            "{message}"
        );
        assert_accepted(&[
            "[cluster]\nredis = \"redis://127.0.0.1:6379/0\"",
            "[cluster]\nredis = \"REDISS://redis.example:6380\"",
            "[cluster]\nredis = \"unix:///run/redis/redis.sock\"\nnode = \"mx1.example.com\"",
        ]);
    }
}
