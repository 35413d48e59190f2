//! `[recipients]`: where valid recipients come from besides `relay.accept`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::{duration_serde, percent_serde};
use super::{invalid, ConfigError};

/// `[recipients]`: sources of valid recipients.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Recipients {
    /// Read valid recipients from an LDAP directory (Active Directory too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ldap: Option<Ldap>,
}

/// `[recipients.ldap]`: the directory the valid recipients are read from
/// (see `crate::recipients`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ldap {
    /// Server, `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before binding (so the
    /// password never crosses the network in clear).
    #[serde(default)]
    pub starttls: bool,
    /// PEM CA certificates that verify the directory's TLS certificate
    /// (`ldaps://`, StartTLS); without it, the system's CA store. An
    /// internal Active Directory CA usually needs this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// DN to bind as; anonymous bind without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_dn: Option<String>,
    /// File holding the bind password (preferred: keeps it out of this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The bind password itself, when a file is not practical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Subtree searched.
    pub base_dn: String,
    /// Search filter selecting the entries that carry addresses.
    #[serde(default = "default_ldap_filter")]
    pub filter: String,
    /// Attributes holding addresses (`proxyAddresses` values may carry `smtp:`).
    #[serde(default = "default_ldap_attributes")]
    pub attributes: Vec<String>,
    /// How often the list is read again (each time ±10 %, so that several
    /// agents do not ask the directory at the same moment).
    #[serde(default = "default_ldap_refresh", with = "duration_serde")]
    pub refresh: Duration,
    /// Longest wait for the connection and for each answer of the directory.
    #[serde(default = "default_ldap_timeout", with = "duration_serde")]
    pub timeout: Duration,
    /// Largest drop in the number of addresses a refresh may bring, in
    /// percent of the set in force (`"50%"`): a refresh returning fewer is
    /// refused and reported, and the set in force stays (a broken filter,
    /// an OU moved, a replica half-restored must not refuse the mail of
    /// half the company). `"100%"` accepts any drop.
    #[serde(default = "default_ldap_max_drop", with = "percent_serde")]
    pub max_drop: u8,
    /// Compare local parts with their case, as RFC 5321 allows. Off by
    /// default, as Exchange and Active Directory do: `John.Doe@` is
    /// `john.doe@`. Domains never depend on case.
    #[serde(default)]
    pub case_sensitive_local_part: bool,
    /// Characters that start an address extension (`user+tag@example.com`
    /// is `user@example.com` when the full address is unknown), like
    /// Postfix's `recipient_delimiter`, e.g. `"+"`. Empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recipient_delimiter: String,
}

fn default_ldap_filter() -> String {
    "(objectClass=*)".to_owned()
}

fn default_ldap_attributes() -> Vec<String> {
    // Both kinds of directory: OpenLDAP (`mail`, `mailAlternateAddress`)
    // and Active Directory (`mail`, `proxyAddresses`). A server ignores the
    // names its schema lacks.
    vec![
        "mail".to_owned(),
        "mailAlternateAddress".to_owned(),
        "proxyAddresses".to_owned(),
    ]
}

fn default_ldap_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_ldap_max_drop() -> u8 {
    50
}

fn default_ldap_refresh() -> Duration {
    Duration::from_secs(10 * 60)
}

impl Recipients {
    /// Checks the values that parse but make no sense.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let Some(ldap) = &self.ldap else {
            return Ok(());
        };
        let lower = ldap.url.to_ascii_lowercase();
        if !(lower.starts_with("ldap://") || lower.starts_with("ldaps://")) {
            return Err(invalid(
                "recipients.ldap.url",
                format!("{:?} must start with ldap:// or ldaps://", ldap.url),
            ));
        }
        if ldap.starttls && lower.starts_with("ldaps://") {
            return Err(invalid(
                "recipients.ldap.starttls",
                "an ldaps:// connection is TLS from the start: StartTLS needs ldap://",
            ));
        }
        if ldap.password.is_some() && ldap.password_file.is_some() {
            return Err(invalid(
                "recipients.ldap.password",
                "set password or password_file, not both",
            ));
        }
        let has_password = ldap.password.is_some() || ldap.password_file.is_some();
        if ldap.bind_dn.is_some() && !has_password {
            return Err(invalid(
                "recipients.ldap.bind_dn",
                "needs password_file (or password)",
            ));
        }
        if ldap.bind_dn.is_none() && has_password {
            return Err(invalid(
                "recipients.ldap.bind_dn",
                "a password is set but no bind_dn to use it with",
            ));
        }
        if ldap.base_dn.trim().is_empty() {
            return Err(invalid("recipients.ldap.base_dn", "must not be empty"));
        }
        if ldap3::parse_filter(&ldap.filter).is_err() {
            return Err(invalid(
                "recipients.ldap.filter",
                format!(
                    "{:?} is not an LDAP search filter (RFC 4515), e.g. \"(mail=*)\"",
                    ldap.filter
                ),
            ));
        }
        if ldap.attributes.is_empty() || ldap.attributes.iter().any(|a| a.trim().is_empty()) {
            return Err(invalid(
                "recipients.ldap.attributes",
                "needs at least one attribute name, none empty",
            ));
        }
        if ldap.refresh.is_zero() {
            return Err(invalid(
                "recipients.ldap.refresh",
                "must be greater than zero",
            ));
        }
        if ldap.timeout.is_zero() {
            return Err(invalid(
                "recipients.ldap.timeout",
                "must be greater than zero",
            ));
        }
        if ldap.max_drop > 100 {
            return Err(invalid(
                "recipients.ldap.max_drop",
                format!("must be between 0% and 100%, not {}%", ldap.max_drop),
            ));
        }
        if ldap.recipient_delimiter.contains(['@', ' ', '\t']) {
            return Err(invalid(
                "recipients.ldap.recipient_delimiter",
                format!(
                    "{:?}: characters that start an extension, without '@' or blanks",
                    ldap.recipient_delimiter
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{assert_accepted, assert_invalid, assert_unknown_field};

    #[test]
    fn bad_keys_and_values_are_refused_naming_the_key() {
        assert_unknown_field(&[
            ("[recipients]\nfile = \"/x\"", "file"),
            (
                "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\nscope = \"sub\"",
                "scope",
            ),
        ]);
        let ldap = "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\n";
        assert_invalid(&[
            (
                "[recipients.ldap]\nurl = \"http://x\"\nbase_dn = \"dc=x\"",
                "recipients.ldap.url",
            ),
            (
                &format!("{ldap}password = \"p\"\npassword_file = \"/p\"\nbind_dn = \"cn=x\""),
                "recipients.ldap.password",
            ),
            (
                &format!("{ldap}bind_dn = \"cn=x\""),
                "recipients.ldap.bind_dn",
            ),
            (
                &format!("{ldap}password = \"p\""),
                "recipients.ldap.bind_dn",
            ),
            (
                "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"\"",
                "recipients.ldap.base_dn",
            ),
            (
                &format!("{ldap}attributes = []"),
                "recipients.ldap.attributes",
            ),
            (
                &format!("{ldap}refresh = \"0s\""),
                "recipients.ldap.refresh",
            ),
        ]);
        assert_accepted(&[
            "[recipients.ldap]\nurl = \"LDAPS://dc.example:636\"\nbase_dn = \"dc=x\"",
        ]);
    }
}
