//! Reading the addresses from the directory: connect (plain, `ldaps://` or
//! StartTLS, verified with rustls), bind (simple, or none for anonymous),
//! one paged subtree search (RFC 2696, pages of [`PAGE_SIZE`]), and the
//! addresses of the configured attributes.
//!
//! A result is complete or it is an error: a search the server cut short
//! (size limit, time limit, a broken connection) never yields a partial set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::{LdapConnAsync, LdapConnSettings, LdapError, LdapResult, Scope, SearchEntry};
use rustls::pki_types::{pem::PemObject, CertificateDer};

use super::address::address_of_value;
use super::cache::folding;
use super::directory::AddressSet;
use super::error::RefreshError;
use crate::config::Ldap;

/// Entries per page: below Active Directory's `MaxPageSize` (1000) and
/// OpenLDAP's usual limits, large enough to need few round trips.
pub const PAGE_SIZE: i32 = 500;

/// LDAP result codes the errors distinguish (RFC 4511 §4.1.9).
mod rc {
    pub const SUCCESS: u32 = 0;
    pub const TIME_LIMIT_EXCEEDED: u32 = 3;
    pub const SIZE_LIMIT_EXCEEDED: u32 = 4;
    pub const NO_SUCH_OBJECT: u32 = 32;
    pub const INVALID_CREDENTIALS: u32 = 49;
}

/// What one read of the directory gave.
#[derive(Debug)]
pub struct Fetched {
    pub set: AddressSet,
    /// Entries the search returned.
    pub entries: usize,
    /// Attribute values that were not SMTP addresses (`X500:`, `SIP:`, no
    /// `@`, …).
    pub skipped_values: usize,
    /// Entries with an attribute the server returned in ranges (Active
    /// Directory, more than 1500 values): only the first range is read.
    pub ranged_entries: usize,
    pub duration: Duration,
}

/// Reads the addresses from the directory `ldap` describes.
///
/// # Errors
/// Any failure, named for the operator (see [`RefreshError`]); nothing is
/// returned from a search that did not complete.
pub async fn fetch(ldap: &Ldap) -> Result<Fetched, RefreshError> {
    let started = Instant::now();
    let url = ldap.url.clone();
    let password = password(ldap)?;
    let tls = ldap.starttls || ldap.url.to_ascii_lowercase().starts_with("ldaps://");
    let mut settings = LdapConnSettings::new()
        .set_conn_timeout(ldap.timeout)
        .set_starttls(ldap.starttls);
    if tls {
        settings = settings.set_config(Arc::new(tls_config(ldap)?));
    }
    let (conn, mut handle) = LdapConnAsync::with_settings(settings, &ldap.url)
        .await
        .map_err(|e| connect_error(&url, tls, ldap.timeout, &e))?;
    // The connection's I/O runs in its own task; aborted with this guard
    // whatever happens below.
    let driver = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.drive().await;
    }));

    if let (Some(bind_dn), Some(password)) = (&ldap.bind_dn, &password) {
        let result = handle
            .with_timeout(ldap.timeout)
            .simple_bind(bind_dn, password)
            .await
            .map_err(|e| operation_error(&url, "the bind", ldap.timeout, e))?;
        check_bind(&url, bind_dn, &result)?;
    }

    let attributes: Vec<String> = ldap.attributes.clone();
    let adapters: Vec<Box<dyn Adapter<'_, String, Vec<String>>>> = vec![
        Box::new(EntriesOnly::new()),
        Box::new(PagedResults::new(PAGE_SIZE)),
    ];
    let search_error = |e| operation_error(&url, "the search", ldap.timeout, e);
    let mut stream = handle
        .with_timeout(ldap.timeout)
        .streaming_search_with(
            adapters,
            &ldap.base_dn,
            Scope::Subtree,
            &ldap.filter,
            attributes,
        )
        .await
        .map_err(search_error)?;
    let mut set = AddressSet::new(folding(ldap));
    let (mut entries, mut skipped_values, mut ranged_entries) = (0, 0, 0);
    while let Some(entry) = stream.next().await.map_err(search_error)? {
        entries += 1;
        let entry = SearchEntry::construct(entry);
        let mut ranged = false;
        for (name, values) in &entry.attrs {
            // `proxyAddresses;range=0-1499`: the name before the options.
            let (base, options) = name.split_once(';').unwrap_or((name, ""));
            if !ldap.attributes.iter().any(|a| a.eq_ignore_ascii_case(base)) {
                continue;
            }
            ranged |= options.to_ascii_lowercase().contains("range=");
            for value in values {
                let inserted = address_of_value(value).is_some_and(|a| set.insert(a));
                if !inserted {
                    skipped_values += 1;
                }
            }
        }
        skipped_values += entry.bin_attrs.values().map(Vec::len).sum::<usize>();
        if ranged {
            ranged_entries += 1;
        }
    }
    let result = stream.finish().await;
    check_search(ldap, &result, entries)?;
    let _ = handle.unbind().await;
    drop(driver);
    set.shrink_to_fit();
    Ok(Fetched {
        set,
        entries,
        skipped_values,
        ranged_entries,
        duration: started.elapsed(),
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The bind password: `password`, or `password_file` without its trailing
/// newline (read at every refresh, so a rotated password needs no restart).
fn password(ldap: &Ldap) -> Result<Option<String>, RefreshError> {
    let Some(bind_dn) = &ldap.bind_dn else {
        return Ok(None);
    };
    let password = match (&ldap.password, &ldap.password_file) {
        (Some(password), _) => password.clone(),
        (None, Some(path)) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| RefreshError::PasswordFile {
                    path: path.clone(),
                    source,
                })?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            text.strip_suffix('\r').unwrap_or(text).to_owned()
        }
        (None, None) => String::new(),
    };
    if password.is_empty() {
        return Err(RefreshError::EmptyPassword {
            bind_dn: bind_dn.clone(),
        });
    }
    Ok(Some(password))
}

/// rustls with ring, verifying the server against `ca_file` or the system's
/// CA store.
fn tls_config(ldap: &Ldap) -> Result<rustls::ClientConfig, RefreshError> {
    let setup = |reason: String| RefreshError::TlsSetup {
        url: ldap.url.clone(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    match &ldap.ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<_, _>>())
                .map_err(|e| {
                    setup(format!(
                        "recipients.ldap.ca_file {}: not readable PEM certificates ({e})",
                        path.display()
                    ))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(setup(format!(
                    "recipients.ldap.ca_file {}: no usable CA certificate in it",
                    path.display()
                )));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(setup(
                    "no CA certificates in the system store: set recipients.ldap.ca_file".into(),
                ));
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(e.to_string()))
        .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
}

fn connect_error(url: &str, tls: bool, timeout: Duration, e: &LdapError) -> RefreshError {
    if let LdapError::Timeout { .. } = e {
        return RefreshError::Timeout {
            url: url.to_owned(),
            what: "the connection",
            after: timeout,
        };
    }
    RefreshError::Connect {
        url: url.to_owned(),
        reason: e.to_string(),
        tls_hint: if tls {
            ", recipients.ldap.ca_file (the server's certificate must be signed by it and name the host of the URL)"
        } else {
            ""
        },
    }
}

fn operation_error(url: &str, what: &'static str, timeout: Duration, e: LdapError) -> RefreshError {
    match e {
        LdapError::Timeout { .. } => RefreshError::Timeout {
            url: url.to_owned(),
            what,
            after: timeout,
        },
        other => RefreshError::Protocol {
            url: url.to_owned(),
            reason: format!("{what} failed: {other}"),
        },
    }
}

fn diagnostic(result: &LdapResult) -> String {
    let text = result
        .text
        .trim_matches(|c: char| c.is_whitespace() || c == '\0');
    if text.is_empty() {
        String::new()
    } else {
        format!(" (server: {text})")
    }
}

fn check_bind(url: &str, bind_dn: &str, result: &LdapResult) -> Result<(), RefreshError> {
    match result.rc {
        rc::SUCCESS => Ok(()),
        rc::INVALID_CREDENTIALS => Err(RefreshError::InvalidCredentials {
            url: url.to_owned(),
            bind_dn: bind_dn.to_owned(),
            detail: diagnostic(result),
        }),
        _ => Err(RefreshError::Bind {
            url: url.to_owned(),
            bind_dn: bind_dn.to_owned(),
            message: format!("result code {}{}", result.rc, diagnostic(result)),
        }),
    }
}

fn check_search(ldap: &Ldap, result: &LdapResult, entries: usize) -> Result<(), RefreshError> {
    let url = ldap.url.clone();
    let base_dn = ldap.base_dn.clone();
    match result.rc {
        rc::SUCCESS => Ok(()),
        rc::NO_SUCH_OBJECT => Err(RefreshError::NoSuchBase {
            url,
            base_dn,
            detail: diagnostic(result),
        }),
        rc::SIZE_LIMIT_EXCEEDED => Err(RefreshError::SizeLimit {
            url,
            base_dn,
            entries,
        }),
        rc::TIME_LIMIT_EXCEEDED => Err(RefreshError::Search {
            url,
            base_dn,
            filter: ldap.filter.clone(),
            message: format!(
                "the server's time limit ended it after {entries} entries{}",
                diagnostic(result)
            ),
        }),
        code => Err(RefreshError::Search {
            url,
            base_dn,
            filter: ldap.filter.clone(),
            message: format!(
                "result code {code}{}{}",
                diagnostic(result),
                if result.refs.is_empty() {
                    String::new()
                } else {
                    format!(" (referred to {})", result.refs.join(", "))
                }
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn ldap(extra: &str) -> Ldap {
        Config::from_toml(&format!(
            "[recipients.ldap]\nurl = \"ldap://127.0.0.1:1\"\nbase_dn = \"dc=example,dc=com\"\n{extra}"
        ))
        .unwrap()
        .recipients
        .ldap
        .unwrap()
    }

    #[test]
    fn passwords_come_from_the_file_without_the_newline() {
        let dir = std::env::temp_dir().join(format!("smtp-limiter-ldap-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret with space\r\n").unwrap();
        let config = ldap(&format!(
            "bind_dn = \"cn=r\"\npassword_file = \"{}\"",
            file.display()
        ));
        assert_eq!(
            password(&config).unwrap().as_deref(),
            Some("s3cret with space")
        );
        std::fs::write(&file, "\n").unwrap();
        let e = password(&config).unwrap_err();
        assert!(matches!(e, RefreshError::EmptyPassword { .. }), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = password(&config).unwrap_err().to_string();
        assert!(
            e.starts_with("recipients.ldap.password_file") && e.contains("secret"),
            "{e}"
        );
        assert_eq!(password(&ldap("")).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let e = tls_config(&ldap("ca_file = \"/nonexistent/ca.pem\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("recipients.ldap.ca_file /nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_directory_is_a_connect_error() {
        // Port 1 on loopback: nothing listens there.
        let e = fetch(&ldap("")).await.unwrap_err();
        assert!(matches!(e, RefreshError::Connect { .. }), "{e}");
        assert!(e.retry_soon());
        assert!(e.to_string().contains("ldap://127.0.0.1:1"), "{e}");
    }

    #[test]
    fn bind_results_are_named() {
        let result = |rc: u32, text: &str| LdapResult {
            rc,
            matched: String::new(),
            text: text.into(),
            refs: vec![],
            ctrls: vec![],
        };
        let e = check_bind(
            "ldap://dc",
            "cn=reader",
            &result(49, "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563\0"),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(
                "invalid credentials for bind_dn \"cn=reader\" at ldap://dc (server: 80090308"
            ) && text.contains("data 52e"),
            "{text}"
        );
        assert!(!e.retry_soon());
        assert!(check_bind("ldap://dc", "cn=reader", &result(0, "")).is_ok());
        assert!(matches!(
            check_bind("ldap://dc", "cn=reader", &result(53, "unwilling")),
            Err(RefreshError::Bind { .. })
        ));
    }
}
