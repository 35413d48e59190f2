//! Why a refresh failed, in words an operator can act on: each message names
//! the server, the DN or the key concerned, and what to check.

use std::path::PathBuf;
use std::time::Duration;

/// A failed or refused refresh. The set in force stays in every case.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// `password_file` cannot be read.
    #[error("recipients.ldap.password_file {}: cannot read it: {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A bind DN with an empty password: servers treat that as an anonymous
    /// ("unauthenticated") bind, which would silently read less.
    #[error("recipients.ldap: the password for bind_dn {bind_dn:?} is empty (an empty password is an anonymous bind); put it in password_file")]
    EmptyPassword { bind_dn: String },
    /// `ca_file` cannot be used, or TLS cannot be set up.
    #[error("recipients.ldap: TLS for {url}: {reason}")]
    TlsSetup { url: String, reason: String },
    /// No connection (refused, unreachable, DNS, TLS handshake, timeout).
    #[error("cannot connect to the directory at {url}: {reason}; check recipients.ldap.url{tls_hint} and that the server is up")]
    Connect {
        url: String,
        reason: String,
        /// A hint about certificates when TLS is involved.
        tls_hint: &'static str,
    },
    /// The directory did not answer in time.
    #[error("the directory at {url} did not answer {what} within {} (recipients.ldap.timeout)", humantime::format_duration(*after))]
    Timeout {
        url: String,
        what: &'static str,
        after: Duration,
    },
    /// The bind DN or its password is wrong (resultCode 49).
    #[error("invalid credentials for bind_dn {bind_dn:?} at {url}{detail}: check recipients.ldap.bind_dn and the password (file); the agent retries only at the next refresh, as repeated failures can lock the account")]
    InvalidCredentials {
        url: String,
        bind_dn: String,
        /// The server's diagnostic (Active Directory: `data 52e` wrong
        /// password, `data 775` locked, …), if it gave one.
        detail: String,
    },
    /// The bind failed otherwise.
    #[error("bind as {bind_dn:?} at {url} failed: {message}")]
    Bind {
        url: String,
        bind_dn: String,
        message: String,
    },
    /// `base_dn` does not exist (resultCode 32).
    #[error("recipients.ldap.base_dn {base_dn:?} does not exist at {url}{detail}")]
    NoSuchBase {
        url: String,
        base_dn: String,
        detail: String,
    },
    /// The server stopped the search at its size limit although the
    /// results were asked for in pages.
    #[error("the directory at {url} stopped the search under {base_dn:?} at its size limit after {entries} entries although paged results were asked for: a partial list is never applied; allow paged searches past the limit for the bind DN (OpenLDAP: limits … size.prtotal=unlimited; Active Directory: MaxPageSize), or narrow recipients.ldap.filter")]
    SizeLimit {
        url: String,
        base_dn: String,
        entries: usize,
    },
    /// The search failed otherwise (access rights, a filter the server
    /// refuses, a referral elsewhere, …).
    #[error("search under {base_dn:?} with filter {filter:?} at {url} failed: {message}")]
    Search {
        url: String,
        base_dn: String,
        filter: String,
        message: String,
    },
    /// The connection broke or the server sent something unexpected.
    #[error("the directory at {url}: {reason}")]
    Protocol { url: String, reason: String },
    /// The result is implausibly small next to the set in force.
    #[error("refused: the directory returned {returned} addresses, {drop_percent}% fewer than the {in_force} in force (recipients.ldap.max_drop = {max_drop}%); the set in force stays. If the drop is real, apply it with `smtp-limiter recipients refresh --force`")]
    Implausible {
        returned: usize,
        in_force: usize,
        drop_percent: u64,
        max_drop: u8,
    },
    /// The agent is stopping, or the refresh task died.
    #[error("the refresh did not complete: {0}")]
    Aborted(String),
}

impl RefreshError {
    /// Whether to try again soon rather than at the next periodic refresh:
    /// yes for what may pass by itself (network, server restart), no for
    /// what needs the operator (credentials — retrying can lock an Active
    /// Directory account —, configuration, a refused drop).
    #[must_use]
    pub const fn retry_soon(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Protocol { .. } | Self::Aborted(_)
        )
    }

    /// A short stable name for logs and metrics.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::PasswordFile { .. } | Self::EmptyPassword { .. } | Self::TlsSetup { .. } => {
                "config"
            }
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::InvalidCredentials { .. } => "credentials",
            Self::Bind { .. } => "bind",
            Self::NoSuchBase { .. } | Self::SizeLimit { .. } | Self::Search { .. } => "search",
            Self::Protocol { .. } | Self::Aborted(_) => "protocol",
            Self::Implausible { .. } => "implausible",
        }
    }
}
