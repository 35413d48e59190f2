//! Red team, end to end: bypasses an attacker who did not write the proxy
//! found against a real Postfix behind it, each now failing.
//!
//! * A Postfix with `soft_bounce = yes` (set while testing a new setup, or
//!   left on) answers a wrong password `435 4.7.8`, not `535 5.7.8`: the
//!   brute-forcer must be counted all the same.
//!
//! The proxy runs in-process ([`Rig`], kernel layer off) in front of a
//! private Postfix offering AUTH (Cyrus SASL, user `alice`); clients bind
//! 127.0.0.x so that Postfix's log (PROXY v2) names them. Needs root,
//! Postfix and Cyrus' `saslpasswd2`; outside CI a missing piece skips the
//! test with a message, under `CI=true` it fails it.

use limiter_tests::{
    fixture,
    postfix::{self, PostfixOptions},
    proxy::Client,
    rig::{Identity, Rig, RigOptions},
};

/// The SASL user Postfix knows, and its password.
const USER: (&str, &str) = ("alice", "secret");
/// `AUTH PLAIN` for alice with the right password (base64 of
/// `\0alice\0secret`).
const GOOD_AUTH: &str = "AUTH PLAIN AGFsaWNlAHNlY3JldA==";
/// `AUTH PLAIN` for alice with wrong passwords (`\0alice\0wrongN`, N = 1..8).
const WRONG_AUTHS: [&str; 8] = [
    "AUTH PLAIN AGFsaWNlAHdyb25nMQ==",
    "AUTH PLAIN AGFsaWNlAHdyb25nMg==",
    "AUTH PLAIN AGFsaWNlAHdyb25nMw==",
    "AUTH PLAIN AGFsaWNlAHdyb25nNA==",
    "AUTH PLAIN AGFsaWNlAHdyb25nNQ==",
    "AUTH PLAIN AGFsaWNlAHdyb25nNg==",
    "AUTH PLAIN AGFsaWNlAHdyb25nNw==",
    "AUTH PLAIN AGFsaWNlAHdyb25nOA==",
];

fn ready(test: &str) -> bool {
    fixture::require(
        test,
        postfix::missing_prerequisite().or_else(postfix::sasl_missing_prerequisite),
    )
}

/// A Postfix expecting PROXY v2, offering AUTH to alice, with `main_cf`
/// settings, and the proxy in front of it (AUTH allowed without TLS: the
/// rig has none) with the `[limits]` keys `limits`.
fn rig(main_cf: &[(&str, &str)], limits: &str) -> Rig {
    Rig::launch(RigOptions {
        postfix: PostfixOptions {
            proxy_protocol: true,
            sasl_users: vec![(USER.0.to_owned(), USER.1.to_owned())],
            extra_main_cf: main_cf
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..PostfixOptions::default()
        },
        connect: "on-connect",
        extra: format!("[smtp]\nauth_requires_tls = false\n\n[limits]\n{limits}"),
        ..RigOptions::new(Identity::ProxyV2)
    })
}

/// A client from `source` that said EHLO.
#[track_caller]
fn ehlo(rig: &Rig, source: &str) -> Client {
    let (mut client, greeting) = rig.client(source);
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = client.cmd("EHLO client.example.org").unwrap();
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    client
}

// -- 1. Soft-bounced AUTH failures --------------------------------------------

#[test]
fn soft_bounced_auth_failures_count_toward_the_auth_limit() {
    if !ready("soft_bounced_auth_failures_count_toward_the_auth_limit") {
        return;
    }
    let rig = rig(&[("soft_bounce", "yes")], "max_failed_auth = 3\n");
    // The brute-forcer, one password at a time: three failures answered
    // (as Postfix soft-bounces them), the fourth ends the session and
    // blocks the source.
    let mut attacker = ehlo(&rig, "127.0.0.2");
    for wrong in &WRONG_AUTHS[..3] {
        let reply = attacker.cmd(wrong).unwrap();
        assert!(reply.starts_with("435 4.7.8 "), "{reply}");
    }
    let reply = attacker.cmd(WRONG_AUTHS[3]).unwrap();
    assert!(reply.starts_with("421 4.7.0 "), "fourth failure: {reply}");
    attacker.expect_closed();
    let (_, again) = rig.client("127.0.0.2");
    assert!(again.starts_with("421 4.7.0 "), "reconnection: {again}");

    // The right password still works, from another source.
    let mut user = ehlo(&rig, "127.0.0.3");
    let reply = user.cmd(GOOD_AUTH).unwrap();
    assert!(reply.starts_with("235 "), "{reply}");
    assert!(user.cmd("QUIT").unwrap().starts_with("221 "));
}
