//! Decision tests: configurations inline, a fixed `now`, time advanced by
//! hand.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use limiter_common::Reason as Origin;

use super::*;
use crate::config::Config;

const MIN: Duration = Duration::from_secs(60);

fn policy(toml: &str) -> Policy {
    Policy::new(&Config::from_toml(toml).expect("test configuration is valid"))
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn net(text: &str) -> IpNet {
    text.parse().expect("test network")
}

fn state() -> Arc<PolicyState> {
    Arc::new(PolicyState::new())
}

/// The guard of an accepted connection; panics on anything else.
fn accepted(decision: Decision<ConnectVerdict>) -> ConnectionGuard {
    match decision.verdict {
        ConnectVerdict::Accept(guard) => guard,
        other => panic!("expected Accept, got {other:?}"),
    }
}

/// The rejection of a refused connection; panics on anything else.
fn refused(decision: Decision<ConnectVerdict>) -> (Rejection, Option<ConnectionGuard>, bool) {
    match decision.verdict {
        ConnectVerdict::Reject { rejection, guard } => (rejection, guard, decision.enforced),
        other => panic!("expected Reject, got {other:?}"),
    }
}

fn helo_accepted(decision: Decision<HeloVerdict>) -> HeloGuard {
    match decision.verdict {
        HeloVerdict::Accept(guard) => guard,
        other => panic!("expected Accept, got {other:?}"),
    }
}

fn helo_refused(decision: Decision<HeloVerdict>) -> (Rejection, Option<HeloGuard>) {
    match decision.verdict {
        HeloVerdict::Reject { rejection, guard } => (rejection, guard),
        other => panic!("expected Reject, got {other:?}"),
    }
}

fn mail_refusal(decision: Decision<MailVerdict>) -> Option<Rejection> {
    match decision.verdict {
        MailVerdict::Accept => None,
        MailVerdict::Reject(rejection) => Some(rejection),
    }
}

// -- Connect ---------------------------------------------------------------

#[test]
fn connection_cap_refuses_past_the_limit_and_guards_release_exactly() {
    let policy = policy("[limits]\nmax_connections_per_source = 2");
    let state = state();
    let source = ip("192.0.2.7");
    let a = accepted(policy.connect(&state, source));
    let b = accepted(policy.connect(&state, source));
    assert_eq!(a.key(), net("192.0.2.7/32"));
    assert!(a.is_counted());
    assert_eq!(state.connections(net("192.0.2.7/32")), 2);

    let (rejection, guard, enforced) = refused(policy.connect(&state, source));
    assert!(enforced && guard.is_none());
    assert_eq!(rejection.name(), "too-many-connections");
    assert_eq!(
        rejection.reason,
        Reason::TooManyConnections { count: 2, limit: 2 }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    assert!(rejection.action.closes() && !rejection.action.is_permanent());
    assert_eq!(rejection.block, None);
    // A refused connection is not counted.
    assert_eq!(state.connections(net("192.0.2.7/32")), 2);

    // Another source has its own count.
    let other = accepted(policy.connect(&state, ip("192.0.2.8")));

    drop(a);
    assert_eq!(state.connections(net("192.0.2.7/32")), 1);
    let c = accepted(policy.connect(&state, source));
    drop((b, c, other));
    assert_eq!(state.connections(net("192.0.2.7/32")), 0);
    assert_eq!(state.sizes().connections, 0, "zero counts leave the table");
}

#[test]
fn zero_means_unlimited() {
    let policy = policy("[limits]\nmax_connections_per_source = 0");
    let state = state();
    let guards: Vec<_> = (0..50)
        .map(|_| accepted(policy.connect(&state, ip("192.0.2.7"))))
        .collect();
    assert_eq!(state.connections(net("192.0.2.7/32")), 50);
    assert_eq!(policy.connection_cap(ip("192.0.2.7")), None);
    drop(guards);
    assert_eq!(state.connections(net("192.0.2.7/32")), 0);
}

#[test]
fn the_most_specific_cidr_override_wins() {
    let policy = policy(
        r#"
        [limits]
        max_connections_per_source = 3
        [[limits.source]]
        cidr = "192.0.2.0/24"
        max_connections = 1
        [[limits.source]]
        cidr = "192.0.0.0/16"
        max_connections = 5
        [[limits.source]]
        cidr = "192.0.2.128/25"
        max_connections = 0
        [[limits.source]]
        cidr = "::ffff:198.51.100.0/120"
        max_connections = 2
        [[limits.source]]
        cidr = "2001:db8::/32"
        max_connections = 4
        "#,
    );
    assert_eq!(policy.connection_cap(ip("192.0.2.7")), Some(1)); // /24 beats /16
    assert_eq!(policy.connection_cap(ip("192.0.9.9")), Some(5)); // only /16
    assert_eq!(policy.connection_cap(ip("192.0.2.200")), None); // /25 = unlimited
    assert_eq!(policy.connection_cap(ip("203.0.113.1")), Some(3)); // default
    assert_eq!(policy.connection_cap(ip("198.51.100.9")), Some(2)); // mapped CIDR
    assert_eq!(policy.connection_cap(ip("::ffff:192.0.2.7")), Some(1)); // mapped source
    assert_eq!(policy.connection_cap(ip("2001:db8::1")), Some(4));

    let state = state();
    let _one = accepted(policy.connect(&state, ip("192.0.2.7")));
    let (rejection, _, _) = refused(policy.connect(&state, ip("192.0.2.7")));
    assert_eq!(
        rejection.reason,
        Reason::TooManyConnections { count: 1, limit: 1 }
    );
    let unlimited: Vec<_> = (0..10)
        .map(|_| accepted(policy.connect(&state, ip("192.0.2.200"))))
        .collect();
    assert_eq!(unlimited.len(), 10);
}

#[test]
fn ipv6_sources_are_counted_per_prefix() {
    let policy = policy("[limits]\nmax_connections_per_source = 2");
    let state = state();
    let a = accepted(policy.connect(&state, ip("2001:db8:1:2::1")));
    let _b = accepted(policy.connect(&state, ip("2001:db8:1:2:ffff::99")));
    assert_eq!(a.key(), net("2001:db8:1:2::/64"));
    // A third address in the same /64 is the same source.
    let (rejection, _, _) = refused(policy.connect(&state, ip("2001:db8:1:2:abcd::7")));
    assert_eq!(rejection.name(), "too-many-connections");
    // The next /64 is another source.
    let _c = accepted(policy.connect(&state, ip("2001:db8:1:3::1")));
    assert_eq!(state.connections(net("2001:db8:1:2::/64")), 2);

    let wide = self::policy("[limits]\nipv6_prefix = 48");
    assert_eq!(
        wide.source_key(ip("2001:db8:1:2::1")),
        net("2001:db8:1::/48")
    );
    let exact = self::policy("[limits]\nipv6_prefix = 128");
    assert_eq!(
        exact.source_key(ip("2001:db8:1:2::1")),
        net("2001:db8:1:2::1/128")
    );
}

#[test]
fn ipv4_mapped_sources_count_as_ipv4() {
    let policy = policy("[limits]\nmax_connections_per_source = 1");
    let state = state();
    let guard = accepted(policy.connect(&state, ip("::ffff:192.0.2.7")));
    assert_eq!(guard.source(), ip("192.0.2.7"));
    assert_eq!(guard.key(), net("192.0.2.7/32"));
    let (rejection, _, _) = refused(policy.connect(&state, ip("192.0.2.7")));
    assert_eq!(rejection.name(), "too-many-connections");
    drop(guard);
    let _again = accepted(policy.connect(&state, ip("192.0.2.7")));
}

#[test]
fn reject_list_refuses_without_a_block_order() {
    let policy = policy(
        r#"
        [lists]
        reject = ["198.51.100.0/24", "2001:db8:bad::/48"]
        "#,
    );
    let state = state();
    let (rejection, guard, _) = refused(policy.connect(&state, ip("198.51.100.20")));
    assert!(guard.is_none());
    assert_eq!(rejection.name(), "reject-list");
    assert_eq!(
        rejection.reason,
        Reason::RejectList {
            net: net("198.51.100.0/24")
        }
    );
    assert_eq!(rejection.reason.block_origin(), Some(Origin::RejectList));
    assert_eq!(rejection.action, Action::RefuseAndClose);
    assert!(rejection.action.is_permanent());
    assert_eq!(rejection.block, None, "the agent loads lists.reject itself");
    let (rejection, _, _) = refused(policy.connect(&state, ip("::ffff:198.51.100.1")));
    assert_eq!(rejection.name(), "reject-list");
    let (rejection, _, _) = refused(policy.connect(&state, ip("2001:db8:bad:1::5")));
    assert_eq!(rejection.name(), "reject-list");
    let _ok = accepted(policy.connect(&state, ip("198.51.101.1")));
    assert_eq!(state.sizes().connections, 1);
}

#[test]
fn concurrent_connects_never_exceed_the_cap() {
    let policy = Arc::new(policy("[limits]\nmax_connections_per_source = 5"));
    let state = state();
    let held = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (policy, state, held) = (policy.clone(), state.clone(), held.clone());
            std::thread::spawn(move || {
                for _ in 0..200 {
                    if let ConnectVerdict::Accept(guard) =
                        policy.connect(&state, ip("192.0.2.7")).verdict
                    {
                        let mut held = held.lock().unwrap();
                        held.push(guard);
                        assert!(held.len() <= 5);
                        if held.len() == 5 {
                            held.clear();
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let live = held.lock().unwrap().len();
    assert_eq!(state.connections(net("192.0.2.7/32")) as usize, live);
    held.lock().unwrap().clear();
    assert_eq!(state.connections(net("192.0.2.7/32")), 0);
}

// -- Allow list --------------------------------------------------------------

#[test]
fn allowlisted_sources_are_exempt_from_everything() {
    let policy = policy(
        r#"
        [limits]
        max_connections_per_source = 1
        max_failed_rcpt = 0
        max_failed_auth = 0
        null_sender_rate = "1/1m"
        [[limits.helo]]
        pattern = "*"
        max_connections = 1
        [relay]
        accept = "*@example.com"
        [lists]
        allow = ["10.0.0.0/8", "::ffff:192.0.2.0/120"]
        reject = ["10.1.0.0/16"]
        reject_helo = ["bad.example"]
        "#,
    );
    let state = state();
    let now = Instant::now();
    for source in [ip("10.1.2.3"), ip("::ffff:10.1.2.3"), ip("192.0.2.9")] {
        let guards: Vec<_> = (0..3)
            .map(|_| match policy.connect(&state, source).verdict {
                ConnectVerdict::Allowlisted(guard) => {
                    assert!(!guard.is_counted());
                    guard
                }
                other => panic!("expected Allowlisted, got {other:?}"),
            })
            .collect();
        let helos: Vec<_> = (0..3)
            .map(|_| helo_accepted(policy.helo(&state, source, "bad.example", None)))
            .collect();
        assert!(helos.iter().all(|g| !g.is_counted()));
        for _ in 0..5 {
            let mail = policy.mail_from(&state, source, Some("bad.example"), true, now);
            assert_eq!(mail.verdict, MailVerdict::Accept);
        }
        assert_eq!(
            policy.rcpt(source, "someone@elsewhere.org").verdict,
            RcptVerdict::Unchecked
        );
        let mut counters = SessionCounters::default();
        for _ in 0..5 {
            assert!(policy
                .rcpt_result(
                    &state,
                    source,
                    &mut counters,
                    false,
                    Familiarity::Stranger,
                    now
                )
                .is_none());
            assert!(policy.auth_failed(&state, source, None, now).is_none());
        }
        assert_eq!(counters.failed_rcpt, 0);
        assert!(state.block(&policy, source, Origin::Manual, now).is_none());
        drop((guards, helos));
    }
    assert_eq!(state.sizes(), TableSizes::default(), "nothing was tracked");
}

// -- HELO ----------------------------------------------------------------------

#[test]
fn helo_reject_list_refuses_matching_names() {
    let policy = policy("[lists]\nreject_helo = [\"*.dynamic.example\", \"localhost\"]");
    let state = state();
    let source = ip("192.0.2.7");
    let (rejection, guard) =
        helo_refused(policy.helo(&state, source, "Host-1.DYNAMIC.example", None));
    assert!(guard.is_none());
    assert_eq!(rejection.name(), "helo-reject");
    assert_eq!(
        rejection.reason,
        Reason::HeloRejected {
            pattern: "*.dynamic.example".into()
        }
    );
    assert_eq!(rejection.action, Action::RefuseCommand);
    let (rejection, _) = helo_refused(policy.helo(&state, source, "LOCALHOST", None));
    assert_eq!(rejection.name(), "helo-reject");
    let guard = helo_accepted(policy.helo(&state, source, "mx.example.org", None));
    assert_eq!(guard.name(), "mx.example.org");
    assert!(!guard.is_counted(), "names without a limit are not counted");
}

#[test]
fn helo_limits_count_sessions_per_name() {
    let policy = policy(
        r#"
        [[limits.helo]]
        pattern = "*.bounces.example.net"
        max_connections = 2
        [[limits.helo]]
        pattern = "*.example.net"
        max_connections = 1
        [[limits.helo]]
        pattern = "free.*"
        max_connections = 0
        "#,
    );
    assert_eq!(policy.helo_cap("a.bounces.example.net"), Some(2)); // first match wins
    assert_eq!(policy.helo_cap("a.example.net"), Some(1));
    assert_eq!(policy.helo_cap("free.example"), None); // 0 = unlimited
    assert_eq!(policy.helo_cap("mx.example.org"), None); // no match = unlimited

    let state = state();
    let source = ip("192.0.2.7");
    let a = helo_accepted(policy.helo(&state, source, "MTA1.bounces.example.net", None));
    let b = helo_accepted(policy.helo(&state, source, "mta1.bounces.example.net ", None));
    assert!(a.is_counted() && b.is_counted());
    assert_eq!(state.helo_sessions("mta1.BOUNCES.example.net"), 2);
    let (rejection, guard) =
        helo_refused(policy.helo(&state, source, "mta1.bounces.example.net", None));
    assert!(guard.is_none());
    assert_eq!(rejection.name(), "helo-limit");
    assert_eq!(
        rejection.reason,
        Reason::TooManyForHelo {
            helo: "mta1.bounces.example.net".into(),
            count: 2,
            limit: 2
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    // Per name, not per pattern: another matching name has its own count.
    let _c = helo_accepted(policy.helo(&state, source, "mta2.bounces.example.net", None));
    drop(a);
    let _d = helo_accepted(policy.helo(&state, source, "mta1.bounces.example.net", None));
    let unlimited: Vec<_> = (0..5)
        .map(|_| helo_accepted(policy.helo(&state, source, "free.example", None)))
        .collect();
    assert!(unlimited.iter().all(|g| !g.is_counted()));
    assert_eq!(state.sizes().helo_sessions, 2);
}

#[test]
fn a_second_helo_replaces_the_first() {
    let policy = policy("[[limits.helo]]\npattern = \"*.example.net\"\nmax_connections = 1");
    let state = state();
    let source = ip("192.0.2.7");
    let first = helo_accepted(policy.helo(&state, source, "a.example.net", None));
    // The same session says EHLO again with the same name: not counted twice.
    let second = helo_accepted(policy.helo(&state, source, "a.example.net", Some(first)));
    assert_eq!(state.helo_sessions("a.example.net"), 1);
    // And with another name: the first name's place is given back.
    let third = helo_accepted(policy.helo(&state, source, "b.example.net", Some(second)));
    assert_eq!(state.helo_sessions("a.example.net"), 0);
    assert_eq!(state.helo_sessions("b.example.net"), 1);
    drop(third);
    assert_eq!(state.sizes().helo_sessions, 0);
}

// -- MAIL: null-sender rate ------------------------------------------------------

#[test]
fn null_sender_rate_per_source_defers_then_blocks() {
    let policy = policy("[limits]\nnull_sender_rate = \"3/1m\"");
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    // Non-null senders are never limited.
    for _ in 0..10 {
        assert_eq!(
            policy.mail_from(&state, source, None, false, t0).verdict,
            MailVerdict::Accept
        );
    }
    for _ in 0..3 {
        assert!(mail_refusal(policy.mail_from(&state, source, None, true, t0)).is_none());
    }
    // The 4th in the window: 450, this transaction only.
    let rejection = mail_refusal(policy.mail_from(&state, source, None, true, t0)).unwrap();
    assert_eq!(rejection.name(), "null-sender-rate");
    assert_eq!(
        rejection.reason,
        Reason::NullSenderRate {
            scope: RateScope::Source,
            count: 4,
            limit: 3,
            per: MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferCommand);
    assert_eq!(rejection.block, None);
    // The window slides: a minute after the first ones, room again.
    let later = t0 + MIN;
    assert!(mail_refusal(policy.mail_from(&state, source, None, true, later)).is_none());

    // Persisting: past twice the rate within the window, a block.
    let t1 = t0 + 10 * MIN;
    for i in 1..=6 {
        let refusal = mail_refusal(policy.mail_from(&state, source, None, true, t1));
        assert_eq!(refusal.is_some(), i > 3, "MAIL {i}");
        assert!(refusal.and_then(|r| r.block).is_none(), "MAIL {i}");
    }
    let rejection = mail_refusal(policy.mail_from(&state, source, None, true, t1)).unwrap();
    assert_eq!(rejection.action, Action::DeferAndClose);
    assert_eq!(
        rejection.block,
        Some(BlockOrder {
            net: net("192.0.2.7/32"),
            origin: Origin::Flood,
            duration: 30 * MIN,
            repeat: 0
        })
    );
    assert_eq!(rejection.reason.block_origin(), Some(Origin::Flood));
    // The count starts afresh after the block.
    assert!(mail_refusal(policy.mail_from(&state, source, None, true, t1)).is_none());
}

#[test]
fn null_sender_rate_per_network_spans_the_sources_of_a_network() {
    let policy = policy(
        "[limits]\nnull_sender_rate = \"3/1m\"\nnull_sender_rate_per_network = \"10/1m\"\n\n[lists]\nallow = [\"198.51.100.250\"]",
    );
    let state = state();
    let t0 = Instant::now();
    // Five addresses of one /24, two bounces each, every one under its own
    // rate (3), each with a HELO name of its own: ten in all, the limit.
    for i in 1..=5 {
        let source = ip(&format!("198.51.100.{i}"));
        let helo = format!("mx{i}.example.net");
        for _ in 0..2 {
            let decision = policy.mail_from(&state, source, Some(&helo), true, t0);
            assert!(mail_refusal(decision).is_none(), "{source}");
        }
    }
    // The eleventh from the network, a fresh address: deferred, not blocked.
    let rejection =
        mail_refusal(policy.mail_from(&state, ip("198.51.100.6"), None, true, t0)).unwrap();
    assert_eq!(
        rejection.reason,
        Reason::NullSenderRate {
            scope: RateScope::Network(net("198.51.100.0/24")),
            count: 11,
            limit: 10,
            per: MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferCommand);
    assert_eq!(rejection.block, None);
    for i in 7..40 {
        let source = ip(&format!("198.51.100.{i}"));
        let rejection = mail_refusal(policy.mail_from(&state, source, None, true, t0)).unwrap();
        assert_eq!(
            rejection.block, None,
            "a network is never blocked for bounces"
        );
    }
    // Mail with a sender, the next /24, and the allow list are not limited;
    // the window slides.
    assert!(mail_refusal(policy.mail_from(&state, ip("198.51.100.7"), None, false, t0)).is_none());
    assert!(mail_refusal(policy.mail_from(&state, ip("198.51.101.1"), None, true, t0)).is_none());
    assert!(mail_refusal(policy.mail_from(&state, ip("198.51.100.250"), None, true, t0)).is_none());
    assert!(
        mail_refusal(policy.mail_from(&state, ip("198.51.100.8"), None, true, t0 + MIN)).is_none()
    );
    // IPv6: the /64s of one /48 are one network.
    for i in 1..=10 {
        let source = ip(&format!("2001:db8:77:{i:x}::1"));
        assert!(mail_refusal(policy.mail_from(&state, source, None, true, t0)).is_none());
    }
    let rejection =
        mail_refusal(policy.mail_from(&state, ip("2001:db8:77:ff::1"), None, true, t0)).unwrap();
    assert_eq!(
        rejection.reason,
        Reason::NullSenderRate {
            scope: RateScope::Network(net("2001:db8:77::/48")),
            count: 11,
            limit: 10,
            per: MIN
        }
    );
    // A count of 0 turns it off.
    let off = self::policy(
        "[limits]\nnull_sender_rate = \"3/1m\"\nnull_sender_rate_per_network = \"0/1m\"",
    );
    let state = self::state();
    for i in 1..=50 {
        let source = ip(&format!("198.51.100.{i}"));
        assert!(mail_refusal(off.mail_from(&state, source, None, true, t0)).is_none());
    }
}

/// A bounce flood aimed at one mailbox from many networks, every source,
/// HELO name and network under its own rate: the recipient's bucket
/// defers it, whatever the spelling of the address.
#[test]
fn null_sender_rate_per_recipient_spans_networks_and_spellings() {
    let policy = policy(
        "[limits]\nnull_sender_rate_per_recipient = \"5/1h\"\n\n[lists]\nallow = [\"203.0.113.9\"]\nallow_helo = [\"mx.friend.example\"]",
    );
    let state = state();
    let t0 = Instant::now();
    let hour = Duration::from_secs(3600);
    let bounce = |source: &str, rcpt: &str, at: Instant| {
        policy.bounce_rcpt(&state, ip(source), Some("mx.example.net"), rcpt, at)
    };
    // Five bounces from five networks, each spelling the address its way.
    for (i, rcpt) in [
        "alice@example.com",
        "Alice@EXAMPLE.com",
        "alice+list@example.com",
        "\"alice\"@example.com.",
        "ALICE+x+y@Example.Com",
    ]
    .into_iter()
    .enumerate()
    {
        assert!(
            bounce(&format!("198.51.{i}.1"), rcpt, t0).is_none(),
            "{rcpt}"
        );
    }
    // The sixth, from a sixth network: deferred, never a block.
    let decision = bounce("192.0.2.1", "alice@example.com", t0).expect("over the rate");
    let RcptVerdict::Reject(rejection) = decision.verdict else {
        panic!("{:?}", decision.verdict);
    };
    assert_eq!(
        rejection.reason,
        Reason::NullSenderRate {
            scope: RateScope::Recipient("alice@example.com".into()),
            count: 6,
            limit: 5,
            per: hour
        }
    );
    assert_eq!(rejection.action, Action::DeferCommand);
    assert_eq!(rejection.block, None);
    // Refused ones are not counted: a flood that keeps pushing does not
    // keep the bucket full; it empties one bounce per 12 minutes.
    for _ in 0..50 {
        assert!(bounce("192.0.2.2", "alice+again@example.com", t0).is_some());
    }
    let twelve = hour / 5;
    assert!(bounce("192.0.2.3", "alice@example.com", t0 + twelve).is_none());
    assert!(bounce("192.0.2.3", "alice@example.com", t0 + twelve).is_some());
    // Another recipient has its own bucket; the allow lists and bare local
    // parts.
    assert!(bounce("192.0.2.1", "bob@example.com", t0).is_none());
    assert!(policy
        .bounce_rcpt(&state, ip("203.0.113.9"), None, "alice@example.com", t0)
        .is_none());
    assert!(policy
        .bounce_rcpt(
            &state,
            ip("192.0.2.1"),
            Some("MX.friend.example"),
            "alice@example.com",
            t0
        )
        .is_none());
    assert_eq!(policy.recipient_key("Postmaster+x"), "postmaster");
    assert_eq!(
        policy.recipient_key("\"a b\"@x.example"),
        "\"a b\"@x.example"
    );
    // The sweep forgets a bucket once it is empty.
    assert_eq!(state.sweep(&policy, t0 + 2 * hour), 2);
    // A count of 0 turns it off.
    let off = self::policy("[limits]\nnull_sender_rate_per_recipient = \"0/1h\"");
    let state = self::state();
    for i in 0..50 {
        let source = ip(&format!("198.51.{i}.1"));
        assert!(off
            .bounce_rcpt(&state, source, None, "alice@example.com", t0)
            .is_none());
    }
}

#[test]
fn null_sender_rate_per_helo_spans_sources() {
    let policy = policy("[limits]\nnull_sender_rate = \"2/1m\"");
    let state = state();
    let t0 = Instant::now();
    let helo = Some("Bounces.Example.net");
    assert!(mail_refusal(policy.mail_from(&state, ip("192.0.2.1"), helo, true, t0)).is_none());
    assert!(mail_refusal(policy.mail_from(&state, ip("192.0.2.2"), helo, true, t0)).is_none());
    // A third source, within its own rate, but the name is over.
    let rejection =
        mail_refusal(policy.mail_from(&state, ip("192.0.2.3"), helo, true, t0)).unwrap();
    assert_eq!(
        rejection.reason,
        Reason::NullSenderRate {
            scope: RateScope::Helo("bounces.example.net".into()),
            count: 3,
            limit: 2,
            per: MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferCommand);
    // The name is never blocked, however far over it goes.
    for i in 4..20 {
        let source = ip(&format!("192.0.2.{i}"));
        let rejection = mail_refusal(policy.mail_from(&state, source, helo, true, t0)).unwrap();
        assert_eq!(rejection.block, None);
    }
    // Another name is not affected; the window slides.
    assert!(
        mail_refusal(policy.mail_from(&state, ip("192.0.2.30"), Some("x"), true, t0)).is_none()
    );
    assert!(
        mail_refusal(policy.mail_from(&state, ip("192.0.2.31"), helo, true, t0 + MIN)).is_none()
    );
}

// -- RCPT: relay and harvest -----------------------------------------------------

#[test]
fn relay_patterns_decide_recipients() {
    let policy = policy("[relay]\naccept = \"*@example.com postmaster@*  ?@short.example\"");
    let source = ip("192.0.2.7");
    for (recipient, accepted) in [
        ("user@example.com", true),
        ("User@EXAMPLE.com", true),
        ("<user@example.com>", true),
        (" user@example.com ", true),
        ("postmaster@anywhere.org", true),
        ("a@short.example", true),
        ("ab@short.example", false),
        ("user@example.com.evil.org", false),
        ("user@sub.example.com", false),
        ("user@elsewhere.org", false),
        ("", false),
    ] {
        let decision = policy.rcpt(source, recipient);
        assert!(decision.enforced);
        match decision.verdict {
            RcptVerdict::Accept => assert!(accepted, "{recipient:?} accepted"),
            RcptVerdict::Reject(rejection) => {
                assert!(!accepted, "{recipient:?} refused");
                assert_eq!(rejection.name(), "relay-denied");
                assert_eq!(rejection.action, Action::RefuseCommand);
                assert!(!rejection.action.closes() && rejection.action.is_permanent());
                assert_eq!(rejection.block, None);
            }
            RcptVerdict::Unchecked => panic!("{recipient:?}: relay rules exist"),
        }
    }
}

#[test]
fn empty_relay_patterns_leave_recipients_to_the_backend() {
    let policy = policy("[relay]\naccept = \"\"");
    assert!(policy.relay_patterns().is_empty());
    assert_eq!(
        policy.rcpt(ip("192.0.2.7"), "anyone@anywhere.org").verdict,
        RcptVerdict::Unchecked
    );
}

#[test]
fn harvest_counter_resets_on_success_and_fires_past_the_limit() {
    let policy = policy("[limits]\nmax_failed_rcpt = 3");
    let state = state();
    let now = Instant::now();
    let source = ip("192.0.2.7");
    let mut counters = SessionCounters::default();
    for _ in 0..3 {
        assert!(policy
            .rcpt_result(
                &state,
                source,
                &mut counters,
                false,
                Familiarity::Stranger,
                now
            )
            .is_none());
    }
    assert_eq!(counters.failed_rcpt, 3);
    // A success resets the run.
    assert!(policy
        .rcpt_result(
            &state,
            source,
            &mut counters,
            true,
            Familiarity::Stranger,
            now
        )
        .is_none());
    assert_eq!(counters.failed_rcpt, 0);
    for _ in 0..3 {
        assert!(policy
            .rcpt_result(
                &state,
                source,
                &mut counters,
                false,
                Familiarity::Stranger,
                now
            )
            .is_none());
    }
    // The 4th failure in a row: > 3.
    let decision = policy
        .rcpt_result(
            &state,
            source,
            &mut counters,
            false,
            Familiarity::Stranger,
            now,
        )
        .expect("harvest");
    assert!(decision.enforced);
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "harvest");
    assert_eq!(
        rejection.reason,
        Reason::Harvest {
            failed: 4,
            limit: 3
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    let order = rejection.block.expect("a block");
    assert_eq!(order.net, net("192.0.2.7/32"));
    assert_eq!(order.origin, Origin::Harvest);
    assert_eq!(order.origin.name(), "harvest");
    assert_eq!(order.duration, 30 * MIN);
    assert_eq!(counters.failed_rcpt, 0, "the counter starts again");
}

#[test]
fn relay_denials_count_as_failed_recipients() {
    let policy = policy("[limits]\nmax_failed_rcpt = 1\n[relay]\naccept = \"*@example.com\"");
    let state = state();
    let now = Instant::now();
    let source = ip("2001:db8:1:2::3");
    let mut counters = SessionCounters::default();
    let mut verdict = None;
    for recipient in ["a@other.org", "b@other.org"] {
        let ok = !matches!(
            policy.rcpt(source, recipient).verdict,
            RcptVerdict::Reject(_)
        );
        verdict = policy.rcpt_result(
            &state,
            source,
            &mut counters,
            ok,
            Familiarity::Stranger,
            now,
        );
    }
    let order = verdict.expect("harvest").verdict.block.expect("a block");
    assert_eq!(
        order.net,
        net("2001:db8:1:2::/64"),
        "IPv6 blocks the prefix"
    );
}

// -- content filter rejects -----------------------------------------------------

#[test]
fn filter_rejects_block_the_source_when_they_reach_the_limit_in_the_window() {
    let policy = policy(
        "[filters]\nmax_rejects = 3\nreject_window = \"1h\"\n[lists]\nallow = [\"10.0.0.0/8\"]",
    );
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    // Two rejects, then the first leaves the window before the third.
    assert!(policy.filter_rejected(&state, source, t0).is_none());
    assert!(policy
        .filter_rejected(&state, source, t0 + 30 * MIN)
        .is_none());
    assert!(policy
        .filter_rejected(&state, source, t0 + 61 * MIN)
        .is_none());
    // The third within an hour blocks.
    let decision = policy
        .filter_rejected(&state, source, t0 + 62 * MIN)
        .expect("filter block");
    assert!(decision.enforced);
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "filter");
    assert_eq!(
        rejection.reason,
        Reason::FilterRejects {
            rejects: 3,
            limit: 3,
            window: 60 * MIN
        }
    );
    let order = rejection.block.expect("a block");
    assert_eq!(order.origin, Origin::Filter);
    // Counting starts over; allow-listed sources are never counted.
    assert!(policy
        .filter_rejected(&state, source, t0 + 63 * MIN)
        .is_none());
    for _ in 0..10 {
        assert!(policy.filter_rejected(&state, ip("10.1.2.3"), t0).is_none());
    }
}

#[test]
fn filter_rejects_never_block_with_max_rejects_zero() {
    let policy = policy("[filters]\nmax_rejects = 0");
    let state = state();
    let t0 = Instant::now();
    for _ in 0..100 {
        assert!(policy
            .filter_rejected(&state, ip("192.0.2.7"), t0)
            .is_none());
    }
}

// -- Sessions shed under pressure ------------------------------------------------

#[test]
fn a_source_whose_sessions_keep_being_shed_is_blocked_past_the_limit() {
    let policy = policy(
        "[limits]\nmax_shed_sessions_per_source = 3\nshed_sessions_window = \"10m\"\nipv6_prefix = 64\n[lists]\nallow = [\"10.0.0.0/8\"]",
    );
    let state = state();
    let t0 = Instant::now();
    let zombie = ip("192.0.2.7");
    // Three sheds, the first of them out of the window before the fourth.
    for at in [t0, t0 + 5 * MIN, t0 + 9 * MIN] {
        assert!(policy.session_shed(&state, zombie, at).is_none());
    }
    assert!(policy.session_shed(&state, zombie, t0 + 11 * MIN).is_none());
    let decision = policy
        .session_shed(&state, zombie, t0 + 12 * MIN)
        .expect("the fourth shed within 10 minutes blocks");
    assert!(decision.enforced);
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "shed-sessions");
    assert_eq!(
        rejection.reason,
        Reason::ShedSessions {
            sheds: 4,
            limit: 3,
            window: 10 * MIN
        }
    );
    let order = rejection.block.expect("a block");
    assert_eq!(order.origin, Origin::Flood);
    assert_eq!(order.net, net("192.0.2.7/32"));
    // Another address of the same /24 has its own count; an IPv6 zombie
    // that hops between the addresses of its /64 does not.
    assert!(policy
        .session_shed(&state, ip("192.0.2.8"), t0 + 12 * MIN)
        .is_none());
    let mut last = None;
    for hop in 1..=4 {
        last = policy.session_shed(&state, ip(&format!("2001:db8:1:2::{hop}")), t0);
    }
    let last = last.expect("the /64's fourth shed blocks it");
    assert_eq!(
        last.verdict.block.expect("a block").net,
        net("2001:db8:1:2::/64")
    );
    // Allow-listed sources are never counted.
    for _ in 0..10 {
        assert!(policy.session_shed(&state, ip("10.1.2.3"), t0).is_none());
    }
}

#[test]
fn shed_sessions_never_block_with_the_limit_zero_and_observe_mode_only_reports() {
    let off = policy("[limits]\nmax_shed_sessions_per_source = 0");
    let state = state();
    let t0 = Instant::now();
    for _ in 0..100 {
        assert!(off.session_shed(&state, ip("192.0.2.7"), t0).is_none());
    }
    let observe = policy("mode = \"observe\"\n[limits]\nmax_shed_sessions_per_source = 1");
    assert!(observe.session_shed(&state, ip("192.0.2.9"), t0).is_none());
    let decision = observe
        .session_shed(&state, ip("192.0.2.9"), t0)
        .expect("the second shed decides");
    assert!(!decision.enforced);
}

// -- Connection rate ----------------------------------------------------------------

#[test]
fn connections_past_the_rate_are_refused_and_twice_past_it_blocked() {
    let policy = policy("[limits]\nconnection_rate = \"10/1m\"\n[lists]\nallow = [\"10.0.0.0/8\"]");
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    // The bucket holds ten: ten at once pass.
    for i in 0..10 {
        assert!(
            policy.connection_rate(&state, source, t0).is_none(),
            "connection {i}"
        );
    }
    // The next ten are refused (and count: a client that keeps coming stays
    // refused), without a block.
    for i in 11..=20 {
        let decision = policy
            .connection_rate(&state, source, t0)
            .unwrap_or_else(|| panic!("connection {i} is over the rate"));
        assert!(decision.enforced);
        let rejection = decision.verdict;
        assert_eq!(rejection.name(), "connection-rate");
        assert_eq!(rejection.action, Action::DeferAndClose);
        assert_eq!(
            rejection.reason,
            Reason::ConnectionRate {
                count: i,
                limit: 10,
                per: MIN
            }
        );
        assert!(rejection.block.is_none(), "connection {i}");
    }
    // The 21st within the minute blocks the source.
    let order = policy
        .connection_rate(&state, source, t0)
        .and_then(|d| d.verdict.block)
        .expect("twice over the rate blocks");
    assert_eq!(order.net, net("192.0.2.7/32"));
    assert_eq!(order.origin, Origin::Flood);
    // Another source has its own bucket; allow-listed ones have none.
    assert!(policy
        .connection_rate(&state, ip("192.0.2.8"), t0)
        .is_none());
    for _ in 0..100 {
        assert!(policy.connection_rate(&state, ip("10.1.2.3"), t0).is_none());
    }
}

/// A connect-and-hang-up loop spread over the addresses of a network, each
/// address under its own rate: the network's bucket refuses it, then
/// blocks the network; the next network and the allow list are not
/// touched.
#[test]
fn connections_spread_over_a_network_are_refused_then_the_network_blocked() {
    let policy = policy(
        "[limits]\nconnection_rate = \"5/1m\"\nconnection_rate_per_network = \"12/1m\"\n[lists]\nallow = [\"198.51.100.250\"]",
    );
    let state = state();
    let t0 = Instant::now();
    // Four addresses of one /24, three connections each: twelve, the limit,
    // every address under its own five.
    for host in 1..=4 {
        for _ in 0..3 {
            let source = ip(&format!("198.51.100.{host}"));
            assert!(
                policy.connection_rate(&state, source, t0).is_none(),
                "{source}"
            );
        }
    }
    // The 13th to the 24th, from fresh addresses: refused, not blocked.
    for i in 13..=24 {
        let source = ip(&format!("198.51.100.{}", 100 + i));
        let rejection = policy
            .connection_rate(&state, source, t0)
            .expect("over the network's rate")
            .verdict;
        assert_eq!(rejection.name(), "connection-rate-network");
        assert_eq!(
            rejection.reason,
            Reason::ConnectionRateFromNetwork {
                network: net("198.51.100.0/24"),
                count: i,
                limit: 12,
                per: MIN
            }
        );
        assert_eq!(rejection.action, Action::DeferAndClose);
        assert!(rejection.block.is_none(), "connection {i}");
    }
    // The allow list is not counted; the next /24 has its own bucket.
    assert!(policy
        .connection_rate(&state, ip("198.51.100.250"), t0)
        .is_none());
    assert!(policy
        .connection_rate(&state, ip("198.51.101.1"), t0)
        .is_none());
    // The 25th blocks the /24.
    let order = policy
        .connection_rate(&state, ip("198.51.100.200"), t0)
        .and_then(|d| d.verdict.block)
        .expect("twice over the network's rate blocks it");
    assert_eq!(order.net, net("198.51.100.0/24"));
    assert_eq!(order.origin, Origin::Flood);
    // IPv6: the /64s of a /48 share the network's bucket; 0/1m is off.
    for i in 1..=12 {
        let source = ip(&format!("2001:db8:5:{i:x}::1"));
        assert!(policy.connection_rate(&state, source, t0).is_none());
    }
    assert!(policy
        .connection_rate(&state, ip("2001:db8:5:ff::1"), t0)
        .is_some());
    let off = self::policy("[limits]\nconnection_rate_per_network = \"0/1m\"");
    let state = self::state();
    for host in 1..=200 {
        let source = ip(&format!("198.51.100.{host}"));
        assert!(off.connection_rate(&state, source, t0).is_none());
    }
}

#[test]
fn the_connection_bucket_empties_at_the_rate() {
    let policy = policy("[limits]\nconnection_rate = \"10/1m\"\nipv6_prefix = 64");
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    for _ in 0..10 {
        assert!(policy.connection_rate(&state, source, t0).is_none());
    }
    // One connection every 6 s (10 a minute) after the burst: the bucket
    // stays full but never overflows.
    for i in 1..=30 {
        let at = t0 + Duration::from_secs(6) * i;
        assert!(
            policy.connection_rate(&state, source, at).is_none(),
            "at {i}"
        );
    }
    // One every 5 s (12 a minute) overflows it.
    let mut refused = 0;
    for i in 1..=12 {
        let at = t0 + Duration::from_secs(180) + Duration::from_secs(5) * i;
        refused += usize::from(policy.connection_rate(&state, source, at).is_some());
    }
    assert!(refused > 0, "12 a minute went past 10 a minute");
    // IPv6: the addresses of a /64 share one bucket.
    for host in 1..=10 {
        let source = ip(&format!("2001:db8:1:2::{host}"));
        assert!(policy.connection_rate(&state, source, t0).is_none());
    }
    assert!(policy
        .connection_rate(&state, ip("2001:db8:1:2::99"), t0)
        .is_some());
    // Off: never counted (1000 connections, under the network's 3000).
    let off = policy_with_rate("0/1m");
    let state = self::state();
    for _ in 0..1000 {
        assert!(off.connection_rate(&state, source, t0).is_none());
    }
}

fn policy_with_rate(rate: &str) -> Policy {
    policy(&format!("[limits]\nconnection_rate = \"{rate}\""))
}

// -- Networks whose sources keep being blocked -----------------------------------

/// The order `state` gives for blocking `source` (for flooding) at `at`.
fn blocked_source(policy: &Policy, state: &PolicyState, source: &str, at: Instant) -> BlockOrder {
    state
        .block(policy, ip(source), Origin::Flood, at)
        .expect("a source that is not allow-listed is blocked")
}

#[test]
fn a_network_whose_sources_keep_being_blocked_is_blocked_past_the_limit() {
    let policy = policy(
        "[limits]\nmax_blocked_sources_per_network = 3\nblocked_sources_window = \"1h\"\n\
         network_ipv4_prefix = 24\nnetwork_ipv6_prefix = 48\nipv6_prefix = 64",
    );
    let state = state();
    let t0 = Instant::now();
    // An attacker moving to the next address of its /24 each time one is
    // blocked, whatever for: the fourth within the hour blocks the /24.
    for (i, at) in [t0, t0 + 20 * MIN, t0 + 40 * MIN].into_iter().enumerate() {
        let order = blocked_source(&policy, &state, &format!("198.51.100.{}", i + 1), at);
        assert!(policy.source_blocked(&state, &order, at).is_none());
    }
    let fourth = blocked_source(&policy, &state, "198.51.100.77", t0 + 50 * MIN);
    let decision = policy
        .source_blocked(&state, &fourth, t0 + 50 * MIN)
        .expect("the fourth blocked source of the /24 within the hour blocks it");
    assert!(decision.enforced);
    let network = decision.verdict;
    assert_eq!(network.net, net("198.51.100.0/24"));
    assert_eq!(network.origin, Origin::Network);
    assert_eq!(network.repeat, 0);
    // The network's own block counts for nothing (no block of a /16 next).
    assert!(policy
        .source_blocked(&state, &network, t0 + 50 * MIN)
        .is_none());
    // Another /24 has its own count, and a slower attacker stays under it:
    // one block every 30 minutes never has four in an hour.
    for i in 0..8u32 {
        let at = t0 + 30 * MIN * i;
        let order = blocked_source(&policy, &state, &format!("203.0.113.{}", i + 1), at);
        assert!(
            policy.source_blocked(&state, &order, at).is_none(),
            "block {i}"
        );
    }
    // IPv6: the /64s of one /48 add up (the hops inside a /64 are one
    // source, blocked once).
    let mut last = None;
    for subnet in 1..=4 {
        let order = blocked_source(&policy, &state, &format!("2001:db8:7:{subnet}::1"), t0);
        last = policy.source_blocked(&state, &order, t0);
    }
    let last = last.expect("the fourth blocked /64 of the /48 blocks it");
    assert_eq!(last.verdict.net, net("2001:db8:7::/48"));
}

#[test]
fn blocked_sources_never_block_their_network_when_off_or_when_the_network_is_the_source() {
    let t0 = Instant::now();
    let off = policy("[limits]\nmax_blocked_sources_per_network = 0");
    let state = state();
    for i in 1..=50 {
        let order = blocked_source(&off, &state, &format!("198.51.100.{i}"), t0);
        assert!(off.source_blocked(&state, &order, t0).is_none());
    }
    // Networks as long as the source key: every source is its own network.
    let own = policy(
        "[limits]\nmax_blocked_sources_per_network = 1\nnetwork_ipv4_prefix = 32\n\
         network_ipv6_prefix = 64\nipv6_prefix = 64",
    );
    for source in ["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8:0:1::1"] {
        let order = blocked_source(&own, &state, source, t0);
        assert!(own.source_blocked(&state, &order, t0).is_none(), "{source}");
    }
    // Observe mode decides, and says it does not enforce.
    let observe = policy("mode = \"observe\"\n[limits]\nmax_blocked_sources_per_network = 1");
    let first = blocked_source(&observe, &state, "203.0.113.1", t0);
    assert!(observe.source_blocked(&state, &first, t0).is_none());
    let second = blocked_source(&observe, &state, "203.0.113.2", t0);
    let decision = observe
        .source_blocked(&state, &second, t0)
        .expect("the second decides");
    assert!(!decision.enforced);
}

// -- AUTH ------------------------------------------------------------------------

#[test]
fn auth_failures_are_counted_over_a_sliding_window() {
    let policy = policy("[limits]\nmax_failed_auth = 3\nfailed_auth_window = \"10m\"");
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    // Three failures, spread: at 0, 4 and 8 minutes.
    for minute in [0, 4, 8] {
        assert!(policy
            .auth_failed(&state, source, None, t0 + minute * MIN)
            .is_none());
    }
    // At 10 minutes the first has left the window: 3 in the window, no block.
    assert!(policy
        .auth_failed(&state, source, None, t0 + 10 * MIN)
        .is_none());
    // At 11 minutes: 4, 8, 10, 11 → 4 > 3.
    let decision = policy
        .auth_failed(&state, source, None, t0 + 11 * MIN)
        .expect("auth block");
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "auth");
    assert_eq!(
        rejection.reason,
        Reason::AuthFailures {
            failures: 4,
            limit: 3,
            window: 10 * MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    let order = rejection.block.expect("a block");
    assert_eq!((order.origin, order.repeat), (Origin::Auth, 0));
    // The count starts again after a block.
    assert!(policy
        .auth_failed(&state, source, None, t0 + 12 * MIN)
        .is_none());
    // Other sources have their own windows.
    assert!(policy
        .auth_failed(&state, ip("192.0.2.8"), None, t0 + 12 * MIN)
        .is_none());
}

/// One address in each of `n` networks (/24s), for sprays.
fn spray_sources(n: u8) -> Vec<IpAddr> {
    (1..=n).map(|i| ip(&format!("198.51.{i}.9"))).collect()
}

#[test]
fn a_spray_over_many_networks_locks_the_account_against_sources_it_never_used() {
    let policy = policy("[limits]\nmax_failed_auth_per_account = 4\nfailed_auth_window = \"10m\"");
    let state = state();
    let t0 = Instant::now();
    // Alice logs in from home; then one wrong password from each of four
    // networks: every source and network far under its own limit.
    let home = ip("192.0.2.50");
    policy.auth_succeeded(&state, home, "alice", t0);
    for source in spray_sources(4) {
        assert!(policy.account_locked(&state, source, "alice", t0).is_none());
        assert!(policy
            .auth_failed(&state, source, Some("alice"), t0)
            .is_none());
    }
    // The fifth guess, from a sixth network, is refused unheard.
    let stranger = ip("203.0.113.77");
    let decision = policy
        .account_locked(&state, stranger, "alice", t0 + MIN)
        .expect("locked");
    assert!(decision.enforced);
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "auth-account");
    assert_eq!(
        rejection.reason,
        Reason::AccountLocked {
            account: "alice".into(),
            failures: 4,
            limit: 4,
            window: 10 * MIN
        }
    );
    assert_eq!(
        (rejection.action, rejection.block),
        (Action::DeferCommand, None)
    );
    // Home is not refused; nor is another account; nor, once the
    // failures have left the window, the stranger.
    assert!(policy
        .account_locked(&state, home, "alice", t0 + MIN)
        .is_none());
    assert!(policy
        .account_locked(&state, stranger, "bob", t0 + MIN)
        .is_none());
    assert!(policy
        .account_locked(&state, stranger, "alice", t0 + 10 * MIN)
        .is_none());
}

/// Every name of the account counts as its bare name: a spray spelling it
/// `alice`, `alice@example.com`, `EXAMPLE\\alice` gets one limit, and the
/// lock names the bare name. Logging in under one name makes the place
/// familiar under the bare name too.
#[test]
fn a_spray_spelling_the_account_several_ways_is_counted_once() {
    let policy = policy("[limits]\nmax_failed_auth_per_account = 4\nfailed_auth_window = \"10m\"");
    let state = state();
    let t0 = Instant::now();
    let home = ip("192.0.2.50");
    policy.auth_succeeded(&state, home, "alice@example.com", t0);
    let names = [
        "alice",
        "alice@example.com",
        "example\\alice",
        "alice@mx.example.net",
    ];
    for (source, name) in spray_sources(4).into_iter().zip(names) {
        assert!(
            policy.account_locked(&state, source, name, t0).is_none(),
            "{name}"
        );
        assert!(policy.auth_failed(&state, source, Some(name), t0).is_none());
    }
    let stranger = ip("203.0.113.77");
    for name in names
        .into_iter()
        .chain(["Alice@Other.Example".to_lowercase().as_str()])
    {
        let rejection = policy
            .account_locked(&state, stranger, name, t0)
            .unwrap_or_else(|| panic!("{name} is locked"))
            .verdict;
        assert_eq!(
            rejection.reason,
            Reason::AccountLocked {
                account: "alice".into(),
                failures: 4,
                limit: 4,
                window: 10 * MIN
            },
            "{name}"
        );
    }
    // Home is familiar whichever name it uses; other accounts are not
    // locked, nor names with an empty bare part.
    for name in names {
        assert!(
            policy.account_locked(&state, home, name, t0).is_none(),
            "{name}"
        );
    }
    for name in ["bob@example.com", "@example.com", "example\\"] {
        assert!(
            policy.account_locked(&state, stranger, name, t0).is_none(),
            "{name}"
        );
    }
}

#[test]
fn a_guess_refused_for_a_locked_account_counts_for_its_source() {
    let policy = policy("[limits]\nmax_failed_auth = 2\nmax_failed_auth_per_account = 1");
    let state = state();
    let now = Instant::now();
    assert!(policy
        .auth_failed(&state, ip("198.51.100.1"), Some("alice"), now)
        .is_none());
    let guesser = ip("203.0.113.5");
    for _ in 0..2 {
        let refused = policy
            .account_locked(&state, guesser, "alice", now)
            .unwrap();
        assert_eq!(refused.verdict.name(), "auth-account");
    }
    // Its third guess is past max_failed_auth: the source's block.
    let block = policy
        .account_locked(&state, guesser, "alice", now)
        .unwrap();
    assert_eq!(block.verdict.name(), "auth");
    assert_eq!(block.verdict.block.map(|b| b.origin), Some(Origin::Auth));
}

#[test]
fn no_account_lock_when_off_or_for_an_allowlisted_source() {
    let state = state();
    let now = Instant::now();
    let off = policy("[limits]\nmax_failed_auth_per_account = 0");
    for source in spray_sources(20) {
        let _ = off.auth_failed(&state, source, Some("alice"), now);
    }
    assert!(off
        .account_locked(&state, ip("203.0.113.1"), "alice", now)
        .is_none());

    let on = policy(
        "[limits]\nmax_failed_auth_per_account = 1\n\n[lists]\nallow = [\"203.0.113.0/24\"]",
    );
    let _ = on.auth_failed(&state, ip("198.51.100.1"), Some("alice"), now);
    assert!(on
        .account_locked(&state, ip("203.0.113.1"), "alice", now)
        .is_none());
    assert!(on
        .account_locked(&state, ip("198.51.100.2"), "alice", now)
        .is_some());
    // An allow-listed source's own failures do not count for the account.
    let _ = on.auth_failed(&state, ip("203.0.113.1"), Some("carol"), now);
    assert!(on
        .account_locked(&state, ip("198.51.100.2"), "carol", now)
        .is_none());
}

#[test]
fn an_observed_account_lock_is_not_enforced() {
    let policy = policy("mode = \"observe\"\n\n[limits]\nmax_failed_auth_per_account = 1");
    let state = state();
    let now = Instant::now();
    let _ = policy.auth_failed(&state, ip("198.51.100.1"), Some("alice"), now);
    let decision = policy
        .account_locked(&state, ip("203.0.113.1"), "alice", now)
        .unwrap();
    assert!(!decision.enforced);
}

// -- Blocks ----------------------------------------------------------------------

#[test]
fn repeat_blocks_back_off_up_to_the_cap() {
    let policy = policy(
        r#"
        [limits]
        block_duration = "30m"
        block_backoff = 2.0
        max_block_duration = "3h"
        "#,
    );
    assert_eq!(policy.block_duration(0), 30 * MIN);
    assert_eq!(policy.block_duration(1), 60 * MIN);
    assert_eq!(policy.block_duration(2), 120 * MIN);
    assert_eq!(policy.block_duration(3), 180 * MIN);
    assert_eq!(policy.block_duration(u32::MAX), 180 * MIN);

    let state = state();
    let source = ip("192.0.2.7");
    let mut now = Instant::now();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let order = state.block(&policy, source, Origin::Harvest, now).unwrap();
        seen.push((order.repeat, order.duration));
        // The next offence comes after this block ended.
        now += order.duration + MIN;
    }
    assert_eq!(
        seen,
        [
            (0, 30 * MIN),
            (1, 60 * MIN),
            (2, 120 * MIN),
            (3, 180 * MIN),
            (4, 180 * MIN)
        ]
    );
    assert_eq!(state.sizes().block_history, 1);
}

#[test]
fn blocks_during_a_running_block_do_not_escalate() {
    let policy = policy("");
    let state = state();
    let now = Instant::now();
    let source = ip("192.0.2.7");
    let first = state.block(&policy, source, Origin::Harvest, now).unwrap();
    // A parallel session of the same offender, a minute later.
    let again = state
        .block(&policy, source, Origin::Harvest, now + MIN)
        .unwrap();
    assert_eq!((first.repeat, again.repeat), (0, 0));
    assert_eq!(again.duration, 30 * MIN);
    // After it ends, the next one escalates.
    let next = state
        .block(&policy, source, Origin::Auth, now + 40 * MIN)
        .unwrap();
    assert_eq!((next.repeat, next.duration), (1, 60 * MIN));
}

#[test]
fn block_history_is_forgotten_and_can_be_cleared() {
    let policy = policy("[limits]\nblock_duration = \"30m\"\nmax_block_duration = \"1d\"");
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    let day = 24 * 60 * MIN;
    state.block(&policy, source, Origin::Harvest, t0).unwrap();
    // Within a day after the block ended: remembered.
    let second = state
        .block(&policy, source, Origin::Harvest, t0 + day)
        .unwrap();
    assert_eq!(second.repeat, 1);
    // More than a day after the (60m) second block ended: forgotten.
    let third = state
        .block(
            &policy,
            source,
            Origin::Harvest,
            t0 + 2 * day + 2 * 60 * MIN,
        )
        .unwrap();
    assert_eq!(third.repeat, 0);
    // An operator's unblock forgets at once.
    assert!(state.unblock(net("192.0.2.7/32")));
    assert!(!state.unblock(net("192.0.2.7/32")));
    let fourth = state
        .block(&policy, source, Origin::Harvest, t0 + 3 * day)
        .unwrap();
    assert_eq!(fourth.repeat, 0);
}

#[test]
fn fractional_backoff_is_exact_to_the_millisecond() {
    let policy = policy(
        "[limits]\nblock_duration = \"1h\"\nblock_backoff = 1.5\nmax_block_duration = \"7d\"",
    );
    assert_eq!(policy.block_duration(1), 90 * MIN);
    assert_eq!(policy.block_duration(2), 135 * MIN);
}

// -- Observe mode ----------------------------------------------------------------

#[test]
fn observe_mode_decides_but_marks_decisions_unenforced() {
    let policy = policy(
        r#"
        mode = "observe"
        [limits]
        max_connections_per_source = 1
        max_failed_rcpt = 0
        max_failed_auth = 0
        null_sender_rate = "1/1m"
        [[limits.helo]]
        pattern = "*"
        max_connections = 1
        [relay]
        accept = "*@example.com"
        [lists]
        reject = ["198.51.100.0/24"]
        reject_helo = ["bad.example"]
        "#,
    );
    assert!(!policy.enforced());
    let state = state();
    let now = Instant::now();
    let source = ip("192.0.2.7");

    let first = policy.connect(&state, source);
    assert!(!first.enforced);
    let first = first.verdict.into_guard().unwrap();
    // Over the cap: reported, and the session goes on with a counted guard.
    let (rejection, guard, enforced) = refused(policy.connect(&state, source));
    assert!(!enforced);
    assert_eq!(rejection.name(), "too-many-connections");
    let second = guard.expect("observe mode keeps the session");
    assert!(second.is_counted());
    assert_eq!(state.connections(net("192.0.2.7/32")), 2, "counted as real");
    let (rejection, guard, _) = refused(policy.connect(&state, ip("198.51.100.1")));
    assert_eq!(rejection.name(), "reject-list");
    assert!(guard.is_some());

    let helo = policy.helo(&state, source, "a.example", None);
    assert!(!helo.enforced);
    let helo_a = helo.verdict.into_guard().unwrap();
    let (rejection, guard) = helo_refused(policy.helo(&state, source, "a.example", None));
    assert_eq!(rejection.name(), "helo-limit");
    assert!(guard.expect("kept").is_counted());
    let (rejection, guard) = helo_refused(policy.helo(&state, source, "bad.example", None));
    assert_eq!(rejection.name(), "helo-reject");
    assert!(guard.is_some());

    let _ = policy.mail_from(&state, source, None, true, now);
    let mail = policy.mail_from(&state, source, None, true, now);
    assert!(!mail.enforced);
    assert_eq!(mail_refusal(mail).unwrap().name(), "null-sender-rate");

    let rcpt = policy.rcpt(source, "x@other.org");
    assert!(!rcpt.enforced);
    assert!(matches!(rcpt.verdict, RcptVerdict::Reject(_)));

    let mut counters = SessionCounters::default();
    let harvest = policy
        .rcpt_result(
            &state,
            source,
            &mut counters,
            false,
            Familiarity::Stranger,
            now,
        )
        .unwrap();
    assert!(!harvest.enforced);
    assert!(
        harvest.verdict.block.is_some(),
        "what would have been blocked"
    );
    let auth = policy.auth_failed(&state, source, None, now).unwrap();
    assert!(!auth.enforced);
    assert_eq!(auth.verdict.name(), "auth");

    drop((first, second, helo_a));
    assert_eq!(state.connections(net("192.0.2.7/32")), 0);
}

// -- Bounds ----------------------------------------------------------------------

#[test]
fn windows_and_history_evict_the_least_recently_seen() {
    let policy = policy("[limits]\nmax_failed_auth = 100\nnull_sender_rate = \"100/1m\"");
    let state = Arc::new(PolicyState::with_capacity(3));
    let now = Instant::now();
    for i in 1..=10 {
        let source = ip(&format!("192.0.2.{i}"));
        let _ = policy.auth_failed(&state, source, None, now);
        let _ = policy.mail_from(&state, source, Some(&format!("h{i}")), true, now);
        let _ = state.block(&policy, source, Origin::Manual, now);
    }
    let sizes = state.sizes();
    assert_eq!(sizes.auth_failures, 3);
    assert_eq!(sizes.null_sender_sources, 3);
    assert_eq!(sizes.null_sender_helos, 3);
    assert_eq!(sizes.block_history, 3);
    // The most recent ones stayed: 192.0.2.10 has a history, .1 lost it.
    let recent = state.block(&policy, ip("192.0.2.10"), Origin::Manual, now + 60 * MIN);
    assert_eq!(recent.unwrap().repeat, 1);
    let evicted = state.block(&policy, ip("192.0.2.1"), Origin::Manual, now + 60 * MIN);
    assert_eq!(evicted.unwrap().repeat, 0);
}

#[test]
fn full_live_tables_refuse_new_keys_instead_of_evicting() {
    let policy = policy(
        "[limits]\nmax_connections_per_source = 5\n[[limits.helo]]\npattern = \"*\"\nmax_connections = 5",
    );
    let state = Arc::new(PolicyState::with_capacity(2));
    let a = accepted(policy.connect(&state, ip("192.0.2.1")));
    let _b = accepted(policy.connect(&state, ip("192.0.2.2")));
    let (rejection, guard, _) = refused(policy.connect(&state, ip("192.0.2.3")));
    assert!(guard.is_none());
    assert_eq!(rejection.name(), "state-full");
    assert_eq!(
        rejection.reason,
        Reason::StateFull {
            table: "connections",
            capacity: 2
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    // Known sources still get in; a freed slot admits the new one.
    let a2 = accepted(policy.connect(&state, ip("192.0.2.1")));
    drop(a);
    let (rejection, _, _) = refused(policy.connect(&state, ip("192.0.2.3")));
    assert_eq!(rejection.name(), "state-full", "192.0.2.1 still holds one");
    drop(a2);
    let _c = accepted(policy.connect(&state, ip("192.0.2.3")));
    assert_eq!(state.sizes().connections, 2);

    let _h1 = helo_accepted(policy.helo(&state, ip("192.0.2.1"), "one", None));
    let _h2 = helo_accepted(policy.helo(&state, ip("192.0.2.1"), "two", None));
    let (rejection, _) = helo_refused(policy.helo(&state, ip("192.0.2.1"), "three", None));
    assert_eq!(rejection.name(), "state-full");
}

#[test]
fn sweep_drops_what_has_aged_out() {
    let policy = policy("[limits]\nblock_duration = \"30m\"\nmax_block_duration = \"1h\"");
    let state = state();
    let t0 = Instant::now();
    let source = ip("192.0.2.7");
    let _ = policy.auth_failed(&state, source, None, t0);
    let _ = policy.mail_from(&state, source, Some("h"), true, t0);
    let _ = state.block(&policy, source, Origin::Manual, t0);
    assert_eq!(state.sweep(&policy, t0 + MIN / 2), 0);
    // Null-sender windows (1m: the source's, its HELO name's, its
    // network's) have expired, the AUTH ones (10m: the source's and its
    // network's) not yet.
    assert_eq!(state.sweep(&policy, t0 + MIN), 3);
    assert_eq!(state.sweep(&policy, t0 + 10 * MIN), 2);
    // History: 30m block + 1h memory.
    assert_eq!(state.sweep(&policy, t0 + 89 * MIN), 0);
    assert_eq!(state.sweep(&policy, t0 + 90 * MIN), 1);
    assert_eq!(state.sizes(), TableSizes::default());
}

#[test]
fn reason_names_are_stable() {
    let names: Vec<_> = [
        Reason::RejectList {
            net: net("192.0.2.0/24"),
        },
        Reason::TooManyConnections { count: 1, limit: 1 },
        Reason::StateFull {
            table: "connections",
            capacity: 1,
        },
        Reason::HeloRejected {
            pattern: "x".into(),
        },
        Reason::TooManyForHelo {
            helo: "x".into(),
            count: 1,
            limit: 1,
        },
        Reason::NullSenderRate {
            scope: RateScope::Source,
            count: 2,
            limit: 1,
            per: MIN,
        },
        Reason::RelayDenied,
        Reason::Harvest {
            failed: 2,
            limit: 1,
        },
        Reason::AuthFailures {
            failures: 2,
            limit: 1,
            window: MIN,
        },
        Reason::HarvestFromNetwork {
            network: net("192.0.2.0/24"),
            failed: 2,
            limit: 1,
            window: MIN,
        },
        Reason::AuthFailuresFromNetwork {
            network: net("192.0.2.0/24"),
            failures: 2,
            limit: 1,
            window: MIN,
        },
    ]
    .iter()
    .map(|reason| {
        assert!(!reason.to_string().is_empty());
        reason.name()
    })
    .collect();
    assert_eq!(
        names,
        [
            "reject-list",
            "too-many-connections",
            "state-full",
            "helo-reject",
            "helo-limit",
            "null-sender-rate",
            "relay-denied",
            "harvest",
            "auth",
            "harvest-network",
            "auth-network"
        ]
    );
}

#[test]
fn shared_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Policy>();
    send_sync::<PolicyState>();
    send_sync::<ConnectionGuard>();
    send_sync::<HeloGuard>();
    send_sync::<Decision<ConnectVerdict>>();
}

#[test]
fn helo_default_cap_and_helo_allow_list() {
    let policy = policy(
        "[limits]\nhelo_default = 1\nnull_sender_rate = \"1/1m\"\n[lists]\nallow_helo = [\"relay?.example.org\"]\n[[limits.helo]]\npattern = \"*.big.example\"\nmax_connections = 3",
    );
    assert_eq!(
        policy.helo_cap("mx.other.example"),
        Some(1),
        "no rule: the default"
    );
    assert_eq!(
        policy.helo_cap("a.big.example"),
        Some(3),
        "a rule wins over the default"
    );
    let state = state();
    let source = ip("192.0.2.7");
    let _first = helo_accepted(policy.helo(&state, source, "mx.other.example", None));
    let (rejection, _) = helo_refused(policy.helo(&state, source, "mx.other.example", None));
    assert_eq!(rejection.name(), "helo-limit");
    // Allow-listed names skip the HELO caps and the null-sender rate …
    let _a = helo_accepted(policy.helo(&state, source, "relay1.example.org", None));
    let _b = helo_accepted(policy.helo(&state, source, "relay1.example.org", None));
    let t0 = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            policy
                .mail_from(&state, source, Some("relay1.example.org"), true, t0)
                .verdict,
            MailVerdict::Accept
        );
    }
    // … but nothing else: another HELO from the same source is limited.
    assert!(
        mail_refusal(policy.mail_from(&state, source, Some("mx.other.example"), true, t0))
            .is_none()
    );
    assert!(
        mail_refusal(policy.mail_from(&state, source, Some("mx.other.example"), true, t0))
            .is_some()
    );
}

/// Reports `failures` failed recipients from `source`, each in a fresh
/// session (a harvester that reconnects after every probe); the last
/// decision.
fn fail_in_new_sessions(
    policy: &Policy,
    state: &PolicyState,
    source: IpAddr,
    failures: u32,
    now: Instant,
) -> Option<Decision<Rejection>> {
    let mut last = None;
    for _ in 0..failures {
        let mut counters = SessionCounters::default();
        last = policy.rcpt_result(
            state,
            source,
            &mut counters,
            false,
            Familiarity::Stranger,
            now,
        );
    }
    last
}

#[test]
fn failed_recipients_count_across_sessions_and_successes_do_not_reset_them() {
    let policy = policy("[limits]\nmax_failed_rcpt = 3\nmax_failed_rcpt_per_source = 4");
    let state = state();
    let now = Instant::now();
    let source = ip("192.0.2.7");
    // Two sessions, each with a success between its failures.
    for _ in 0..2 {
        let mut counters = SessionCounters::default();
        for ok in [false, true, false] {
            assert!(policy
                .rcpt_result(
                    &state,
                    source,
                    &mut counters,
                    ok,
                    Familiarity::Stranger,
                    now
                )
                .is_none());
        }
    }
    assert_eq!(state.sizes().failed_rcpt_sources, 1);
    // The fifth failure within the window, in a third session.
    let decision = fail_in_new_sessions(&policy, &state, source, 1, now).expect("harvest");
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "harvest-source");
    assert_eq!(
        rejection.reason,
        Reason::HarvestAcrossSessions {
            failed: 5,
            limit: 4,
            window: 60 * MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    let order = rejection.block.expect("a block");
    assert_eq!(order.net, net("192.0.2.7/32"));
    assert_eq!(order.origin, Origin::Harvest);
    assert_eq!(
        state.sizes().failed_rcpt_sources,
        0,
        "the window starts over"
    );
}

#[test]
fn past_the_hosts_failed_recipients_new_sources_are_held_to_the_harvest_limit() {
    let policy = policy(
        "[limits]\nmax_failed_rcpt_per_host = 6\nmax_failed_rcpt_under_harvest = 2\n\
         max_failed_rcpt_per_network = 0\n[lists]\nallow = [\"192.0.2.250\"]",
    );
    let state = state();
    let now = Instant::now();
    let fail = |source: &str, familiarity: Familiarity, at: Instant| {
        let mut counters = SessionCounters::default();
        policy.rcpt_result(&state, ip(source), &mut counters, false, familiarity, at)
    };
    let stranger = Familiarity::Stranger;
    // Six failures from three networks: the host's limit, not past it.
    for source in ["198.51.100.1", "203.0.113.1", "192.0.2.1"] {
        for _ in 0..2 {
            assert!(fail(source, stranger, now).is_none(), "{source}");
        }
    }
    // The seventh: the host is harvested, but this source has one failure.
    assert!(fail("192.0.2.2", stranger, now).is_none());
    // Its second is at the limit; its third is past it.
    assert!(fail("192.0.2.2", stranger, now).is_none());
    let rejection = fail("192.0.2.2", stranger, now).expect("a block").verdict;
    assert_eq!(rejection.name(), "harvest-host");
    assert_eq!(
        rejection.reason,
        Reason::HostHarvested {
            failed: 3,
            limit: 2,
            host_failed: 7,
            window: 60 * MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    assert_eq!(rejection.block.expect("a block").origin, Origin::Harvest);
    // A source of the first six is blocked at its next failure.
    assert!(fail("198.51.100.1", stranger, now).is_some());
    // A source that delivered before the harvest began, one logged in, and
    // an allow-listed one keep their usual limits.
    let before = Familiarity::DeliveredSince(now - MIN);
    for _ in 0..5 {
        assert!(fail("192.0.2.3", before, now).is_none());
        assert!(fail("192.0.2.5", Familiarity::LoggedIn, now).is_none());
        assert!(fail("192.0.2.250", stranger, now).is_none());
    }
    // One whose first delivery came once the harvest was on is a stranger
    // still: a harvester's addresses cannot buy acquaintance with a
    // message each.
    let since_then = Familiarity::DeliveredSince(now + Duration::from_secs(1));
    let at = now + Duration::from_secs(2);
    assert!(fail("192.0.2.6", since_then, at).is_none());
    assert!(fail("192.0.2.6", since_then, at).is_none());
    assert!(fail("192.0.2.6", since_then, at).is_some());
    // An hour later the host's window is empty: three failures pass again.
    let later = now + 61 * MIN;
    for _ in 0..3 {
        assert!(fail("192.0.2.4", stranger, later).is_none());
    }
}

#[test]
fn past_the_hosts_refused_credentials_unfamiliar_sources_are_held_to_the_spray_limit() {
    let policy = policy(
        "[limits]\nmax_failed_auth_per_host = 4\nmax_failed_auth_under_spray = 1\n\
         max_failed_auth_per_network = 0",
    );
    let state = state();
    let now = Instant::now();
    policy.auth_succeeded(&state, ip("192.0.2.9"), "alice@example.com", now);
    let fail =
        |source: &str, account: Option<&str>| policy.auth_failed(&state, ip(source), account, now);
    // Four refused, from two networks and four accounts: the host's limit.
    for (source, account) in [
        ("198.51.100.1", "u1"),
        ("198.51.100.1", "u2"),
        ("203.0.113.1", "u3"),
        ("203.0.113.1", "u4"),
    ] {
        assert!(fail(source, Some(account)).is_none(), "{source} {account}");
    }
    // Past it: a fresh source's first failure is answered, its second
    // blocks it; one that named no account is no one's familiar place.
    assert!(fail("192.0.2.2", Some("u5")).is_none());
    let rejection = fail("192.0.2.2", None).expect("a block").verdict;
    assert_eq!(rejection.name(), "auth-host");
    assert_eq!(
        rejection.reason,
        Reason::HostSprayed {
            failures: 2,
            limit: 1,
            // The host's window keeps one past its limit.
            host_failures: 5,
            window: 10 * MIN
        }
    );
    assert_eq!(rejection.block.expect("a block").origin, Origin::Auth);
    // Alice's familiar place, trying alice under either name, keeps
    // max_failed_auth (5).
    for account in ["alice", "alice@example.com", "alice", "alice"] {
        assert!(fail("192.0.2.9", Some(account)).is_none(), "{account}");
    }
    // The same place trying another account is a stranger to it.
    assert!(fail("192.0.2.9", Some("bob")).is_some());
}

#[test]
fn the_hosts_failed_recipients_limit_can_be_turned_off() {
    let policy = policy(
        "[limits]\nmax_failed_rcpt_per_host = 0\nmax_failed_rcpt_under_harvest = 0\n\
         max_failed_rcpt_per_network = 0",
    );
    let state = state();
    let now = Instant::now();
    for host in 1..=50 {
        let source = ip(&format!("192.0.2.{host}"));
        for _ in 0..3 {
            let mut counters = SessionCounters::default();
            assert!(policy
                .rcpt_result(
                    &state,
                    source,
                    &mut counters,
                    false,
                    Familiarity::Stranger,
                    now
                )
                .is_none());
        }
    }
}

#[test]
fn failed_recipients_per_source_age_out_of_their_window() {
    let policy = policy(
        "[limits]\nmax_failed_rcpt_per_source = 2\nfailed_rcpt_window = \"10m\"\n\
         max_failed_rcpt_per_network = 0",
    );
    let state = state();
    let start = Instant::now();
    let source = ip("192.0.2.8");
    assert!(fail_in_new_sessions(&policy, &state, source, 2, start).is_none());
    // Slower than the window: never more than two at once.
    let later = start + 11 * MIN;
    assert!(fail_in_new_sessions(&policy, &state, source, 2, later).is_none());
    assert!(
        fail_in_new_sessions(&policy, &state, source, 1, later).is_some(),
        "three within ten minutes"
    );
    assert_eq!(
        state.sweep(&policy, later + 11 * MIN),
        0,
        "nothing left to sweep"
    );
}

#[test]
fn failed_recipients_per_source_key_ipv6_by_prefix_and_spare_the_allow_list() {
    let policy = policy(
        "[limits]\nmax_failed_rcpt_per_source = 2\nipv6_prefix = 64\n[lists]\nallow = [\"192.0.2.0/24\"]",
    );
    let state = state();
    let now = Instant::now();
    // Three hosts of one /64 share the count.
    for host in ["2001:db8:5::1", "2001:db8:5::2"] {
        assert!(fail_in_new_sessions(&policy, &state, ip(host), 1, now).is_none());
    }
    let order = fail_in_new_sessions(&policy, &state, ip("2001:db8:5::3"), 1, now)
        .expect("harvest")
        .verdict
        .block
        .expect("a block");
    assert_eq!(order.net, net("2001:db8:5::/64"));
    // IPv4-mapped is the same source as IPv4.
    assert!(fail_in_new_sessions(&policy, &state, ip("::ffff:192.0.2.9"), 10, now).is_none());
    assert!(fail_in_new_sessions(&policy, &state, ip("192.0.2.9"), 10, now).is_none());
    assert_eq!(
        state.sizes().failed_rcpt_sources,
        0,
        "allow-listed: not counted"
    );
}

#[test]
fn failed_recipients_per_source_zero_turns_the_rule_off() {
    let policy =
        policy("[limits]\nmax_failed_rcpt_per_source = 0\nmax_failed_rcpt_per_network = 0");
    let state = state();
    assert!(
        fail_in_new_sessions(&policy, &state, ip("192.0.2.10"), 1000, Instant::now()).is_none()
    );
    assert_eq!(state.sizes().failed_rcpt_sources, 0);
}

// -- Per-network windows ---------------------------------------------------------

/// Spreads `failures` failed recipients over `hosts` sources (one fresh
/// session each, round robin), each source staying under its own limits;
/// the first decision, with the failure number it came at.
fn spread_failures(
    policy: &Policy,
    state: &PolicyState,
    hosts: &[IpAddr],
    failures: u32,
    now: Instant,
) -> Option<(u32, Decision<Rejection>)> {
    (1..=failures).find_map(|n| {
        let source = hosts[(n as usize - 1) % hosts.len()];
        fail_in_new_sessions(policy, state, source, 1, now).map(|decision| (n, decision))
    })
}

#[test]
fn a_harvester_spread_over_its_ipv4_network_blocks_the_network() {
    // 50 addresses of one /24, 3 failures each: every one under its own
    // limit of 4; together past the network's 100.
    let policy = policy(
        "[limits]\nmax_failed_rcpt = 3\nmax_failed_rcpt_per_source = 4\n\
         max_failed_rcpt_per_network = 100\nfailed_rcpt_window = \"1h\"",
    );
    let state = state();
    let now = Instant::now();
    let hosts: Vec<IpAddr> = (1..=50).map(|i| ip(&format!("198.51.100.{i}"))).collect();
    let (at, decision) = spread_failures(&policy, &state, &hosts, 150, now).expect("a block");
    assert_eq!(at, 101, "the failure past the network's limit");
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "harvest-network");
    assert_eq!(
        rejection.reason,
        Reason::HarvestFromNetwork {
            network: net("198.51.100.0/24"),
            failed: 101,
            limit: 100,
            window: 60 * MIN
        }
    );
    assert_eq!(rejection.action, Action::DeferAndClose);
    let order = rejection.block.expect("a block");
    assert_eq!(order.net, net("198.51.100.0/24"));
    assert_eq!((order.origin, order.repeat), (Origin::Harvest, 0));
    // The neighbouring /24 has its own window.
    let neighbours: Vec<IpAddr> = (1..=50).map(|i| ip(&format!("198.51.101.{i}"))).collect();
    assert!(spread_failures(&policy, &state, &neighbours, 100, now).is_none());
    // The network's window started over; its next block backs off.
    let (at, decision) =
        spread_failures(&policy, &state, &hosts, 150, now + MIN).expect("a second block");
    assert_eq!(at, 101);
    let order = decision.verdict.block.expect("a block");
    assert_eq!(order.net, net("198.51.100.0/24"));
    assert_eq!(order.repeat, 0, "the first block still runs: same level");
    // After it ends (30m), other addresses of the network (their own
    // windows still empty) bring a longer one.
    let others: Vec<IpAddr> = (101..=150)
        .map(|i| ip(&format!("198.51.100.{i}")))
        .collect();
    let (at, decision) =
        spread_failures(&policy, &state, &others, 150, now + 40 * MIN).expect("a third block");
    assert_eq!(at, 101);
    let order = decision.verdict.block.expect("a block");
    assert_eq!((order.net, order.repeat), (net("198.51.100.0/24"), 1));
}

#[test]
fn a_harvester_rotating_ipv6_prefixes_is_blocked_by_its_network() {
    // Every failure from another /64 of one /48: no /64 ever holds two.
    let policy = policy(
        "[limits]\nmax_failed_rcpt_per_source = 2\nmax_failed_rcpt_per_network = 10\n\
         ipv6_prefix = 64\nnetwork_ipv6_prefix = 48",
    );
    let state = state();
    let hosts: Vec<IpAddr> = (1..=40)
        .map(|i| ip(&format!("2001:db8:77:{i:x}::1")))
        .collect();
    let (at, decision) =
        spread_failures(&policy, &state, &hosts, 40, Instant::now()).expect("a block");
    assert_eq!(at, 11);
    let order = decision.verdict.block.expect("a block");
    assert_eq!(order.net, net("2001:db8:77::/48"));
    assert_eq!(order.origin, Origin::Harvest);
}

#[test]
fn the_network_is_never_narrower_than_a_source() {
    // A network prefix longer than ipv6_prefix counts as ipv6_prefix.
    let wide = policy("[limits]\nipv6_prefix = 40\nnetwork_ipv6_prefix = 48");
    assert_eq!(
        wide.source_network(ip("2001:db8:ff:1::1")),
        net("2001:db8::/40")
    );
    let v4 = policy("[limits]\nnetwork_ipv4_prefix = 16");
    assert_eq!(
        v4.source_network(ip("::ffff:192.0.2.1")),
        net("192.0.0.0/16")
    );
}

#[test]
fn auth_failures_spread_over_a_network_block_the_network() {
    let policy = policy(
        "[limits]\nmax_failed_auth = 3\nmax_failed_auth_per_network = 20\n\
         failed_auth_window = \"10m\"",
    );
    let state = state();
    let now = Instant::now();
    // 10 addresses, 2 refused passwords each per round: each under 3.
    let mut first = None;
    for n in 1..=30u32 {
        let source = ip(&format!("203.0.113.{}", n % 10 + 1));
        if let Some(decision) = policy.auth_failed(&state, source, None, now) {
            first = Some((n, decision));
            break;
        }
    }
    let (at, decision) = first.expect("a block");
    assert_eq!(at, 21);
    let rejection = decision.verdict;
    assert_eq!(rejection.name(), "auth-network");
    let order = rejection.block.expect("a block");
    assert_eq!(order.net, net("203.0.113.0/24"));
    assert_eq!(order.origin, Origin::Auth);
}

#[test]
fn per_network_limits_zero_are_off_and_spare_the_allow_list() {
    let hosts: Vec<IpAddr> = (1..=100).map(|i| ip(&format!("192.0.2.{i}"))).collect();
    let off = policy(
        "[limits]\nmax_failed_rcpt_per_source = 0\nmax_failed_rcpt_per_network = 0\n\
         max_failed_auth = 1000\nmax_failed_auth_per_network = 0",
    );
    let state = state();
    let now = Instant::now();
    assert!(spread_failures(&off, &state, &hosts, 1000, now).is_none());
    assert!(hosts
        .iter()
        .all(|&source| off.auth_failed(&state, source, None, now).is_none()));
    let allowed = policy(
        "[limits]\nmax_failed_rcpt_per_source = 0\nmax_failed_rcpt_per_network = 5\n\
         [lists]\nallow = [\"192.0.2.0/25\"]",
    );
    let state = self::state();
    // .100 to .127 are allow-listed and not counted: the block comes at
    // the sixth failure from .128 on, failure number 28 + 6.
    let hosts: Vec<IpAddr> = (100..=199).map(|i| ip(&format!("192.0.2.{i}"))).collect();
    let (at, decision) = spread_failures(&allowed, &state, &hosts, 100, now).expect("a block");
    assert_eq!(at, 34);
    assert_eq!(
        decision.verdict.block.expect("a block").net,
        net("192.0.2.0/24")
    );
}

#[test]
fn network_windows_hold_a_tenth_of_the_keys_and_evict_the_least_recent() {
    let policy =
        policy("[limits]\nmax_failed_rcpt_per_source = 0\nmax_failed_rcpt_per_network = 2");
    let now = Instant::now();
    let fail = |state: &PolicyState, source: &str| {
        fail_in_new_sessions(&policy, state, ip(source), 1, now)
    };
    // 20 keys per table, 2 per network table: a third network pushes out
    // the one seen least recently, whose count starts over.
    let small = PolicyState::with_capacity(20);
    assert!(fail(&small, "192.0.2.1").is_none());
    assert!(fail(&small, "192.0.2.2").is_none());
    assert!(fail(&small, "198.51.100.1").is_none());
    assert!(fail(&small, "203.0.113.1").is_none());
    assert!(
        fail(&small, "192.0.2.3").is_none(),
        "192.0.2.0/24 was pushed out"
    );
    // With room for it, the same third failure blocks the network.
    let roomy = PolicyState::with_capacity(30);
    for source in ["192.0.2.1", "192.0.2.2", "198.51.100.1", "203.0.113.1"] {
        assert!(fail(&roomy, source).is_none());
    }
    let order = fail(&roomy, "192.0.2.3")
        .expect("a block")
        .verdict
        .block
        .expect("a block");
    assert_eq!(order.net, net("192.0.2.0/24"));
}

#[test]
fn harvesters_blocked_one_after_the_other_add_up_in_their_network() {
    // The defaults: 20 per source, 100 per /24, within an hour (README).
    let policy = policy("");
    let state = state();
    let now = Instant::now();
    for host in 1..=4 {
        let source = ip(&format!("198.51.100.{host}"));
        assert!(fail_in_new_sessions(&policy, &state, source, 20, now).is_none());
        let decision = fail_in_new_sessions(&policy, &state, source, 1, now).expect("blocked");
        assert_eq!(decision.verdict.name(), "harvest-source");
    }
    let fifth = ip("198.51.100.5");
    assert!(fail_in_new_sessions(&policy, &state, fifth, 16, now).is_none());
    let decision = fail_in_new_sessions(&policy, &state, fifth, 1, now).expect("blocked");
    assert_eq!(decision.verdict.name(), "harvest-network");
    assert_eq!(
        decision.verdict.block.expect("a block").net,
        net("198.51.100.0/24")
    );
}
