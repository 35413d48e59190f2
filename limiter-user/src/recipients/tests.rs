//! The service without a directory server: cache at start, answers before
//! any set, failed refreshes, the drop rule, jitter, the new keys. Against a
//! real slapd: `tests/tests/ldap_e2e.rs`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::config::Config;

fn ldap(extra: &str) -> Ldap {
    // Port 1 on loopback: nothing listens, connections are refused at once.
    Config::from_toml(&format!(
        "[recipients.ldap]\nurl = \"ldap://127.0.0.1:1\"\nbase_dn = \"dc=example,dc=com\"\n{extra}"
    ))
    .unwrap()
    .recipients
    .ldap
    .unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "smtp-limiter-recipients-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn recipients_is_shared_between_threads() {
    fn is<T: Send + Sync>() {}
    is::<Recipients>();
    is::<Arc<Recipients>>();
}

#[test]
fn the_drop_rule_compares_with_the_set_in_force() {
    // Nothing in force: anything goes (a first load, an empty one too).
    assert!(!implausible(0, 0, 50));
    assert!(!implausible(1000, 500, 50));
    assert!(implausible(1000, 499, 50));
    assert!(!implausible(1000, 5000, 50));
    assert!(implausible(1000, 0, 99));
    assert!(!implausible(1000, 0, 100));
    assert!(implausible(1000, 999, 0));
    assert!(!implausible(1000, 1000, 0));
    assert_eq!(drop_percent(3000, 300), 90);
    assert_eq!(drop_percent(0, 10), 0);
}

#[test]
fn jitter_stays_within_ten_percent_and_varies() {
    let period = Duration::from_secs(600);
    let waits: Vec<Duration> = (0..200).map(|_| jittered(period)).collect();
    for wait in &waits {
        assert!(
            *wait >= Duration::from_secs(540) && *wait <= Duration::from_secs(660),
            "{wait:?}"
        );
    }
    let distinct: std::collections::HashSet<_> = waits.iter().collect();
    assert!(distinct.len() > 100, "{}", distinct.len());
}

#[tokio::test]
async fn without_any_set_the_backend_decides_and_that_is_counted() {
    let recipients = Recipients::new(ldap(""), None);
    assert_eq!(recipients.check("alice@example.com"), Lookup::NoDirectory);
    assert_eq!(recipients.lookup("alice@example.com"), Lookup::NoDirectory);
    let stats = recipients.stats();
    assert_eq!(stats.source, Source::None);
    assert_eq!(stats.lookups.no_directory, 1, "lookup() does not count");
    assert_eq!(stats.addresses, 0);
    let mut text = String::new();
    recipients.render_metrics(&mut text);
    assert!(
        text.contains("smtp_limiter_recipients_source{source=\"none\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("smtp_limiter_recipients_lookups_total{result=\"no-directory\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn the_cache_is_in_force_at_start_and_survives_a_failed_refresh() {
    let dir = temp_dir("service-cache");
    let path = dir.join(CACHE_FILE);
    let config = ldap("");
    let set = AddressSet::from_addresses(
        cache::folding(&config),
        ["Alice@Example.com", "bob@example.com"],
    );
    let read = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    cache::save(&path, &cache::Origin::of(&config), &set, read).unwrap();

    let recipients = Recipients::new(config, Some(path.clone()));
    assert_eq!(recipients.check("ALICE@example.com"), Lookup::Known);
    assert_eq!(recipients.check("mallory@example.com"), Lookup::Unknown);
    assert_eq!(recipients.check("alice@example.net"), Lookup::NotCovered);
    let stats = recipients.stats();
    assert_eq!(
        (stats.source, stats.addresses, stats.domains),
        (Source::Cache, 2, 1)
    );
    assert_eq!(stats.loaded_at.as_deref(), Some("2023-11-14T22:13:20Z"));
    assert_eq!(
        stats.lookups.known + stats.lookups.unknown + stats.lookups.not_covered,
        3
    );

    let e = recipients.refresh_now(false).await.unwrap_err();
    assert!(matches!(e, RefreshError::Connect { .. }), "{e}");
    assert_eq!(recipients.check("alice@example.com"), Lookup::Known);
    let stats = recipients.stats();
    assert_eq!(stats.source, Source::Cache);
    assert_eq!(stats.refreshes_failed, 1);
    assert!(stats.last_attempt.is_some() && stats.last_refresh.is_none());
    let error = stats.last_error.unwrap();
    assert!(
        error.contains("cannot connect to the directory at ldap://127.0.0.1:1"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_cache_of_another_directory_is_not_used() {
    let dir = temp_dir("service-other-cache");
    let path = dir.join(CACHE_FILE);
    let config = ldap("");
    let set = AddressSet::from_addresses(cache::folding(&config), ["alice@example.com"]);
    cache::save(&path, &cache::Origin::of(&config), &set, SystemTime::now()).unwrap();
    let other = ldap("filter = \"(objectClass=inetOrgPerson)\"");
    let recipients = Recipients::new(other, Some(path));
    assert_eq!(recipients.check("alice@example.com"), Lookup::NoDirectory);
    let stats = recipients.stats();
    assert!(stats.cache_error.unwrap().contains("filter differs"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_refresh_task_ends_with_the_recipients() {
    let recipients = Recipients::new(ldap("refresh = \"1s\""), None);
    recipients.spawn_refresh();
    let weak = Arc::downgrade(&recipients);
    // Wait for the first (failing) refresh.
    for _ in 0..200 {
        if recipients.stats().refreshes_failed > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(recipients.stats().refreshes_failed, 1);
    drop(recipients);
    assert!(
        weak.upgrade().is_none(),
        "the task holds no strong reference while it waits"
    );
}

#[tokio::test]
async fn reconfigure_wakes_the_refresh_task() {
    let recipients = Recipients::new(ldap("refresh = \"1h\""), None);
    recipients.spawn_refresh();
    for _ in 0..200 {
        if recipients.stats().refreshes_failed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    recipients.reconfigure(&ldap("refresh = \"1h\"\nfilter = \"(mail=*)\""));
    for _ in 0..200 {
        if recipients.stats().refreshes_failed == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(recipients.stats().refreshes_failed, 2);
    assert_eq!(recipients.config().filter, "(mail=*)");
}

#[test]
fn start_needs_the_ldap_section_and_works_without_a_runtime() {
    assert!(start(&Config::default()).is_none());
    let dir = temp_dir("start");
    let text = format!(
        "[recipients.ldap]\nurl = \"ldap://127.0.0.1:1\"\nbase_dn = \"dc=example,dc=com\"\n\
         [state]\ndirectory = \"{}\"\n",
        dir.display()
    );
    let config = Config::from_toml(&text).unwrap();
    assert_eq!(
        lookup_in_cache(&config, "alice@example.com").unwrap_err(),
        format!(
            "no recipient cache at {}/recipients.json (the agent has not read the directory yet)",
            dir.display()
        )
    );
    let ldap = config.recipients.ldap.clone().unwrap();
    let set = AddressSet::from_addresses(cache::folding(&ldap), ["alice@example.com"]);
    cache::save(
        &dir.join(CACHE_FILE),
        &cache::Origin::of(&ldap),
        &set,
        SystemTime::now(),
    )
    .unwrap();
    // No runtime here: the cache is loaded, no task is spawned.
    let recipients = start(&config).expect("configured");
    assert_eq!(recipients.check("alice@example.com"), Lookup::Known);
    assert_eq!(
        lookup_in_cache(&config, "bob@example.com"),
        Ok(Lookup::Unknown)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn new_keys_have_defaults_and_are_validated() {
    let config = ldap("");
    assert!(!config.starttls && config.ca_file.is_none());
    assert_eq!(config.timeout, Duration::from_secs(30));
    assert_eq!(config.max_drop, 50);
    assert!(!config.case_sensitive_local_part);
    assert!(config.recipient_delimiter.is_empty());
    assert_eq!(
        config.attributes,
        ["mail", "mailAlternateAddress", "proxyAddresses"]
    );
    assert_eq!(ldap("max_drop = \"20%\"").max_drop, 20);
    assert_eq!(ldap("max_drop = 100").max_drop, 100);
    let text = Config::from_toml(
        "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\nmax_drop = \"20%\"",
    )
    .unwrap()
    .to_toml()
    .unwrap();
    assert!(text.contains("max_drop = \"20%\""), "{text}");
    let base = "[recipients.ldap]\nurl = \"ldap://x\"\nbase_dn = \"dc=x\"\n";
    for (extra, key) in [
        ("max_drop = \"101%\"", "max_drop"),
        ("max_drop = \"half\"", "max_drop"),
        ("max_drop = -1", "max_drop"),
        ("timeout = \"soon\"", "timeout"),
        ("starttls = \"yes\"", "starttls"),
    ] {
        let e = Config::from_toml(&format!("{base}{extra}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(key), "{extra}: {e}");
    }
    for (text, key) in [
        (
            "[recipients.ldap]\nurl = \"ldaps://x\"\nbase_dn = \"dc=x\"\nstarttls = true"
                .to_owned(),
            "recipients.ldap.starttls",
        ),
        (format!("{base}timeout = \"0s\""), "recipients.ldap.timeout"),
        (
            format!("{base}recipient_delimiter = \"@\""),
            "recipients.ldap.recipient_delimiter",
        ),
        (
            format!("{base}filter = \"(mail=*\""),
            "recipients.ldap.filter",
        ),
    ] {
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{key}: ")), "{text}: {e}");
    }
}
