//! The valid-recipient directory against a real OpenLDAP `slapd`.
//!
//! Each test starts its own private slapd ([`Slapd`]: 3 000 generated users
//! under `dc=example,dc=com`, some with several addresses, some AD-style
//! with `proxyAddresses`; a search returns at most 1 000 entries unless it
//! is paged) and a [`Recipients`] reading it, and checks what the proxy
//! would be told for each recipient.
//!
//! Needs Debian's `slapd` and `ldap-utils` (`cargo xtask setup`), and
//! `openssl` for the TLS test; see [`slapd::missing_prerequisite`]. Without
//! them every test is skipped with a message; under `CI=true` it fails.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use limiter_tests::slapd::{self, Slapd, SlapdOptions, READER_DN};
use limiter_user::config::{Config, Ldap};
use limiter_user::recipients::{Lookup, Recipients, RefreshError, Source, CACHE_FILE};

/// The `[recipients.ldap]` of `toml`.
fn ldap(toml: &str) -> Ldap {
    Config::from_toml(toml)
        .unwrap_or_else(|e| panic!("{e}\n{toml}"))
        .recipients
        .ldap
        .expect("a [recipients.ldap] table")
}

/// A directory of state for one test, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-ldap-e2e-{name}.{}.{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create the state directory");
        Self(dir)
    }

    fn cache(&self) -> PathBuf {
        self.0.join(CACHE_FILE)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_slapd(options: SlapdOptions) -> Slapd {
    Slapd::start(options).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Recipients reading `slapd` with the reader's bind, plus `extra` keys.
fn recipients(slapd: &Slapd, extra: &str, cache: Option<PathBuf>) -> Arc<Recipients> {
    Recipients::new(ldap(&slapd.recipients_toml(extra)), cache)
}

#[track_caller]
fn assert_lookup(recipients: &Recipients, address: &str, want: Lookup) {
    assert_eq!(recipients.lookup(address), want, "{address}");
}

#[tokio::test]
async fn known_addresses_pass_unknown_ones_are_refused_and_pages_are_complete() {
    if !slapd::prerequisites("known_addresses_pass_unknown_ones_are_refused_and_pages_are_complete")
    {
        return;
    }
    let slapd = start_slapd(SlapdOptions::default());
    // The fixture is what it claims: a plain search stops at the size
    // limit (ldapsearch exits 4, sizeLimitExceeded), a paged one does not.
    let search = |paged: bool| {
        let mut command = Command::new("ldapsearch");
        command.args([
            "-x",
            "-H",
            &slapd.url(),
            "-D",
            READER_DN,
            "-w",
            slapd::READER_PASSWORD,
        ]);
        command.args(["-b", slapd::BASE_DN, "-LLL"]);
        if paged {
            command.args(["-E", "pr=500/noprompt"]);
        }
        let out = command
            .args([slapd::USER_FILTER, "dn"])
            .output()
            .expect("ldapsearch");
        let entries = String::from_utf8_lossy(&out.stdout).matches("dn: ").count();
        (out.status.code(), entries)
    };
    assert_eq!(search(false), (Some(4), 1000));
    assert_eq!(search(true), (Some(0), 3000));

    let recipients = recipients(&slapd, "", None);
    let report = recipients
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let expected = slapd.expected_addresses();
    assert_eq!(report.entries, 3000);
    assert_eq!(report.addresses, expected.len());
    assert!(report.addresses > 1000, "{report:?}");
    assert_eq!(
        (report.previous, report.added, report.removed),
        (0, expected.len(), 0)
    );
    // Two values per AD-style user are not mail addresses (X500:, SIP:).
    assert_eq!(
        report.skipped_values,
        2 * slapd.users().iter().filter(|u| u.ad_style).count()
    );
    assert_eq!(
        report.domains, 3,
        "example.com (Example.COM folded), .org, .net"
    );

    for user in slapd.users() {
        for address in &user.addresses {
            assert_lookup(&recipients, address, Lookup::Known);
            assert_lookup(&recipients, &address.to_uppercase(), Lookup::Known);
            assert_lookup(&recipients, &address.to_lowercase(), Lookup::Known);
        }
    }
    // proxyAddresses: SMTP: and smtp: count, without their prefix; SIP: and
    // X500: do not.
    let ad = slapd
        .users()
        .iter()
        .find(|u| u.ad_style)
        .expect("an AD-style user");
    assert_eq!(ad.uid, "user000003");
    assert_lookup(&recipients, "first.last3@example.com", Lookup::Known);
    assert_lookup(&recipients, "user3.alias@example.net", Lookup::Known);
    assert_lookup(&recipients, "SMTP:first.last3@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "sip3@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "user3@example.com", Lookup::Unknown);
    // A user without a mailbox, and made-up names: refused.
    assert_lookup(&recipients, "user49@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "nobody@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "alt0@EXAMPLE.NET", Lookup::Unknown);
    // Domains without any address in the directory, and postmaster: the
    // backend decides.
    assert_lookup(&recipients, "user1@elsewhere.test", Lookup::NotCovered);
    assert_lookup(&recipients, "postmaster@example.com", Lookup::NotCovered);

    // check() counts for the metrics; lookup() does not.
    assert_eq!(recipients.check("user1@example.com"), Lookup::Known);
    assert_eq!(recipients.check("nobody@example.com"), Lookup::Unknown);
    let stats = recipients.stats();
    assert_eq!(stats.source, Source::Ldap);
    assert_eq!(stats.addresses, expected.len());
    assert_eq!((stats.lookups.known, stats.lookups.unknown), (1, 1));
    assert!(stats.last_refresh.is_some() && stats.last_error.is_none());
    assert_eq!(stats.refreshes_ok, 1);
}

#[tokio::test]
async fn case_sensitive_local_parts_and_extensions_when_configured() {
    if !slapd::prerequisites("case_sensitive_local_parts_and_extensions_when_configured") {
        return;
    }
    let slapd = start_slapd(SlapdOptions {
        users: 100,
        ..SlapdOptions::default()
    });
    let recipients = recipients(
        &slapd,
        "case_sensitive_local_part = true\nrecipient_delimiter = \"+\"",
        None,
    );
    recipients
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_lookup(&recipients, "User0@example.com", Lookup::Known);
    assert_lookup(&recipients, "User0@EXAMPLE.COM", Lookup::Known);
    assert_lookup(&recipients, "user0@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "First.Last3@example.com", Lookup::Known);
    assert_lookup(&recipients, "first.last3@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "user1+lists@example.com", Lookup::Known);
    assert_lookup(&recipients, "user1-lists@example.com", Lookup::Unknown);
}

#[tokio::test]
async fn a_change_in_the_directory_is_picked_up_on_refresh() {
    if !slapd::prerequisites("a_change_in_the_directory_is_picked_up_on_refresh") {
        return;
    }
    let slapd = start_slapd(SlapdOptions::default());
    let recipients = recipients(&slapd, "", None);
    let first = recipients
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_lookup(&recipients, "new.hire@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "user1@example.com", Lookup::Known);

    slapd
        .add_user("newhire", &["New.Hire@example.com", "nh@example.com"])
        .unwrap_or_else(|e| panic!("{e:#}"));
    slapd
        .delete(&[slapd.users()[1].dn.clone()])
        .unwrap_or_else(|e| panic!("{e:#}"));
    // Nothing changes before the refresh.
    assert_lookup(&recipients, "new.hire@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "user1@example.com", Lookup::Known);

    let second = recipients
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((second.added, second.removed), (2, 1), "{second:?}");
    assert_eq!(second.previous, first.addresses);
    assert_eq!(second.addresses, first.addresses + 1);
    assert_lookup(&recipients, "new.hire@example.com", Lookup::Known);
    assert_lookup(&recipients, "NH@example.com", Lookup::Known);
    assert_lookup(&recipients, "user1@example.com", Lookup::Unknown);
    assert_eq!(recipients.stats().refreshes_ok, 2);
}

#[tokio::test]
async fn the_directory_down_keeps_the_last_good_set() {
    if !slapd::prerequisites("the_directory_down_keeps_the_last_good_set") {
        return;
    }
    let mut slapd = start_slapd(SlapdOptions::default());
    let url = slapd.url();
    let recipients = recipients(&slapd, "timeout = \"3s\"", None);
    let report = recipients
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    slapd.stop();

    let e = recipients
        .refresh_now(false)
        .await
        .expect_err("the directory is down");
    assert!(matches!(e, RefreshError::Connect { .. }), "{e}");
    assert!(e.retry_soon());
    let message = e.to_string();
    assert!(
        message.starts_with(&format!("cannot connect to the directory at {url}")),
        "{message}"
    );
    assert!(message.contains("check recipients.ldap.url"), "{message}");

    assert_lookup(&recipients, "user1@example.com", Lookup::Known);
    assert_lookup(&recipients, "nobody@example.com", Lookup::Unknown);
    let stats = recipients.stats();
    assert_eq!(stats.source, Source::Ldap);
    assert_eq!(stats.addresses, report.addresses);
    assert_eq!((stats.refreshes_ok, stats.refreshes_failed), (1, 1));
    assert_eq!(stats.last_error.as_deref(), Some(message.as_str()));
    assert!(stats.last_refresh.is_some() && stats.last_attempt >= stats.last_refresh);
}

#[tokio::test]
async fn the_cache_brings_the_set_back_when_the_directory_is_down_at_start() {
    if !slapd::prerequisites("the_cache_brings_the_set_back_when_the_directory_is_down_at_start") {
        return;
    }
    let state = StateDir::new("cache");
    let mut slapd = start_slapd(SlapdOptions::default());
    let config = ldap(&slapd.recipients_toml("timeout = \"3s\""));
    let first = Recipients::new(config.clone(), Some(state.cache()));
    assert_eq!(first.stats().source, Source::None);
    let report = first
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.cache_error.is_none(), "{report:?}");
    drop(first);
    slapd.stop();

    // A restart without the directory.
    let again = Recipients::new(config, Some(state.cache()));
    let stats = again.stats();
    assert_eq!(stats.source, Source::Cache);
    assert_eq!(stats.addresses, report.addresses);
    assert!(stats.loaded_at.is_some() && stats.last_refresh.is_none());
    assert_lookup(&again, "First.Last3@EXAMPLE.com", Lookup::Known);
    assert_lookup(&again, "nobody@example.com", Lookup::Unknown);
    again
        .refresh_now(false)
        .await
        .expect_err("the directory is down");
    assert_lookup(&again, "user1@example.com", Lookup::Known);
    let stats = again.stats();
    assert_eq!((stats.source, stats.refreshes_failed), (Source::Cache, 1));
    assert!(stats.last_error.is_some());
}

#[tokio::test]
async fn bad_credentials_and_a_missing_base_are_clear_errors() {
    if !slapd::prerequisites("bad_credentials_and_a_missing_base_are_clear_errors") {
        return;
    }
    let slapd = start_slapd(SlapdOptions {
        users: 100,
        ..SlapdOptions::default()
    });
    let url = slapd.url();
    let toml = format!(
        "[recipients.ldap]\nurl = \"{url}\"\nbind_dn = \"{READER_DN}\"\npassword = \"wrong\"\nbase_dn = \"{}\"\n",
        slapd::BASE_DN
    );
    let recipients = Recipients::new(ldap(&toml), None);
    let e = recipients
        .refresh_now(false)
        .await
        .expect_err("wrong password");
    assert!(matches!(e, RefreshError::InvalidCredentials { .. }), "{e}");
    assert!(
        !e.retry_soon(),
        "no quick retries that could lock the account"
    );
    let message = e.to_string();
    assert!(
        message.starts_with(&format!(
            "invalid credentials for bind_dn \"{READER_DN}\" at {url}"
        )),
        "{message}"
    );
    assert!(
        message.contains("check recipients.ldap.bind_dn and the password"),
        "{message}"
    );
    // Nothing loaded: the backend decides.
    assert_eq!(recipients.check("user1@example.com"), Lookup::NoDirectory);
    let stats = recipients.stats();
    assert_eq!(stats.source, Source::None);
    assert_eq!(stats.last_error.as_deref(), Some(message.as_str()));
    assert_eq!(stats.lookups.no_directory, 1);

    let recipients = recipients_for(&slapd, "ou=nowhere,dc=example,dc=com");
    let e = recipients
        .refresh_now(false)
        .await
        .expect_err("no such base");
    assert!(matches!(e, RefreshError::NoSuchBase { .. }), "{e}");
    assert!(
        e.to_string().starts_with(
            "recipients.ldap.base_dn \"ou=nowhere,dc=example,dc=com\" does not exist at"
        ),
        "{e}"
    );

    // Anonymous reads work too (this directory allows them).
    let toml = format!(
        "[recipients.ldap]\nurl = \"{url}\"\nbase_dn = \"{}\"\n",
        slapd::BASE_DN
    );
    let anonymous = Recipients::new(ldap(&toml), None);
    let report = anonymous
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.addresses, slapd.expected_addresses().len());
}

fn recipients_for(slapd: &Slapd, base_dn: &str) -> Arc<Recipients> {
    let mut config = ldap(&slapd.recipients_toml(""));
    config.base_dn = base_dn.to_owned();
    Recipients::new(config, None)
}

#[tokio::test]
async fn an_implausible_shrink_is_refused_and_the_old_set_stays() {
    if !slapd::prerequisites("an_implausible_shrink_is_refused_and_the_old_set_stays") {
        return;
    }
    let state = StateDir::new("shrink");
    let slapd = start_slapd(SlapdOptions::default());
    let recipients = recipients(&slapd, "max_drop = \"50%\"", Some(state.cache()));
    let full = recipients
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Two thirds of the users go (as with a broken replica or a moved OU).
    let gone: Vec<String> = slapd.users()[..2000].iter().map(|u| u.dn.clone()).collect();
    slapd.delete(&gone).unwrap_or_else(|e| panic!("{e:#}"));

    let e = recipients
        .refresh_now(false)
        .await
        .expect_err("an implausible drop");
    let RefreshError::Implausible {
        returned,
        in_force,
        drop_percent,
        max_drop,
    } = e
    else {
        panic!("{e}");
    };
    assert_eq!((in_force, max_drop), (full.addresses, 50));
    assert!(
        returned < full.addresses / 2 && drop_percent > 50,
        "{returned} {drop_percent}"
    );
    let message = recipients
        .stats()
        .last_error
        .expect("the refusal is reported");
    assert!(
        message.starts_with(&format!(
            "refused: the directory returned {returned} addresses"
        )),
        "{message}"
    );
    assert!(message.contains("recipients refresh --force"), "{message}");
    assert_lookup(&recipients, "user1@example.com", Lookup::Known);
    let stats = recipients.stats();
    assert_eq!(
        (stats.addresses, stats.refreshes_refused),
        (full.addresses, 1)
    );
    // The cache still holds the full set.
    let restarted = recipients_with_cache(&slapd, &state);
    assert_eq!(restarted.stats().addresses, full.addresses);

    // Forced: applied.
    let forced = recipients
        .refresh_now(true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(forced.forced);
    assert_eq!(forced.addresses, returned);
    assert_lookup(&recipients, "user1@example.com", Lookup::Unknown);
    assert_lookup(&recipients, "user2998@example.com", Lookup::Known);
}

fn recipients_with_cache(slapd: &Slapd, state: &StateDir) -> Arc<Recipients> {
    recipients(slapd, "max_drop = \"50%\"", Some(state.cache()))
}

#[tokio::test]
async fn starttls_and_ldaps_verify_the_server_with_the_configured_ca() {
    if !slapd::prerequisites("starttls_and_ldaps_verify_the_server_with_the_configured_ca") {
        return;
    }
    let slapd = start_slapd(SlapdOptions {
        users: 100,
        tls: true,
        ..SlapdOptions::default()
    });
    let expected = slapd.expected_addresses().len();
    let ca = slapd.ca_file().expect("a CA file");
    let ldaps = slapd.ldaps_url().expect("an ldaps URL");

    let starttls = recipients(
        &slapd,
        &format!("starttls = true\nca_file = \"{}\"", ca.display()),
        None,
    );
    let report = starttls
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.addresses, expected);

    let mut config = ldap(&slapd.recipients_toml(&format!("ca_file = \"{}\"", ca.display())));
    config.url = ldaps.clone();
    let report = Recipients::new(config.clone(), None)
        .refresh_now(false)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.addresses, expected);

    // The system's CAs do not know this one.
    config.ca_file = None;
    let e = Recipients::new(config, None)
        .refresh_now(false)
        .await
        .expect_err("an unknown CA");
    assert!(matches!(e, RefreshError::Connect { .. }), "{e}");
    let message = e.to_string();
    assert!(
        message.contains(&ldaps) && message.contains("recipients.ldap.ca_file"),
        "{message}"
    );
}

#[tokio::test]
async fn a_search_cut_by_the_size_limit_is_an_error_not_a_partial_set() {
    if !slapd::prerequisites("a_search_cut_by_the_size_limit_is_an_error_not_a_partial_set") {
        return;
    }
    // Paged searches limited to 1 200 entries in total (slapd's
    // size.prtotal), as a server that caps them or ignores the control.
    let slapd = start_slapd(SlapdOptions {
        users: 1500,
        paged_total_limit: Some(1200),
        ..SlapdOptions::default()
    });
    let recipients = recipients(&slapd, "", None);
    let e = recipients
        .refresh_now(false)
        .await
        .expect_err("cut by the size limit");
    assert!(matches!(e, RefreshError::SizeLimit { .. }), "{e}");
    let message = e.to_string();
    assert!(
        message.contains("a partial list is never applied"),
        "{message}"
    );
    assert_eq!(recipients.check("user1@example.com"), Lookup::NoDirectory);
}

/// The session integration: an unknown recipient gets `550 5.1.1` from the
/// proxy itself, the backend never sees it, and it counts toward the
/// harvest limit. Needs `recipients` wired into the proxy (the context
/// built from `[recipients.ldap]`, the session's RCPT). The set comes from
/// the cache written beforehand, so it is in force from the first session.
#[test]
fn unknown_recipients_are_refused_by_the_proxy_and_count_as_harvest() {
    use limiter_tests::proxy::{Client, TestProxy};
    use limiter_tests::scripted::{Behaviour, ScriptedBackend};

    if !slapd::prerequisites("unknown_recipients_are_refused_by_the_proxy_and_count_as_harvest") {
        return;
    }
    let slapd = start_slapd(SlapdOptions {
        users: 100,
        ..SlapdOptions::default()
    });
    let state = StateDir::new("session");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let loaded = recipients(&slapd, "", Some(state.cache()));
    runtime
        .block_on(loaded.refresh_now(false))
        .unwrap_or_else(|e| panic!("{e}"));
    drop(loaded);

    let backend = ScriptedBackend::start(Behaviour {
        // The backend would accept anyone in example.com: only the proxy
        // can refuse.
        valid_recipients: (0..200)
            .map(|i| format!("nobody{i}@example.com"))
            .chain(["user1@example.com".to_owned()])
            .collect(),
        ..Behaviour::default()
    });
    let proxy = TestProxy::start(&format!(
        "[[listen]]\naddress = \"127.0.0.1:0\"\n\n[backend]\naddress = \"{}\"\nidentity = \"none\"\n\n\
         [kernel]\nmode = \"off\"\n\n[limits]\nmax_failed_rcpt = 3\n\n[relay]\naccept = \"*@example.com\"\n\n\
         [state]\ndirectory = \"{}\"\n\n{}",
        backend.addr(),
        state.0.display(),
        slapd.recipients_toml("")
    ));
    let (mut client, greeting) = Client::connect(proxy.addr).expect("connect");
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(client.cmd("EHLO client.test").unwrap().starts_with("250"));
    assert!(client
        .cmd("MAIL FROM:<a@example.org>")
        .unwrap()
        .starts_with("250"));
    let reply = client.cmd("RCPT TO:<User1@Example.com>").unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    for i in 1..=3 {
        let reply = client
            .cmd(&format!("RCPT TO:<nobody{i}@example.com>"))
            .unwrap();
        // The proxy's own refusal (the backend would accept): reply class
        // and enhanced code, not its wording.
        assert!(reply.starts_with("550 5.1.1 "), "{reply}");
    }
    let reply = client.cmd("RCPT TO:<nobody4@example.com>").unwrap();
    assert!(reply.starts_with("421 4.7.0"), "harvest limit: {reply}");
    client.expect_closed();
    let lines = backend.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.eq_ignore_ascii_case("RCPT TO:<User1@Example.com>")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("nobody")),
        "the backend was asked: {lines:?}"
    );
}
