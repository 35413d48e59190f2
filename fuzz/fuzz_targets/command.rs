//! Command lines: the strict check (`check_command_line`,
//! `parse_command_line`), the lenient `parse_command`, then
//! `parse_mail_from` / `parse_rcpt_to` on the arguments with their
//! canonical addresses (`canonical_address`). The input is one line
//! without its terminator, as the line reader hands it over.
//!
//! Asserts:
//! * a line the check accepts is UTF-8 without control bytes (HTAB
//!   excepted), starts (after blanks) with a verb of ASCII letters, digits
//!   and `-` ending at a blank, and `parse_command_line` gives what
//!   `parse_command` gives, with `utf8` set;
//! * the verb is the first word; the arguments have no blank at either end;
//! * an accepted path is within `MAX_PATH_LEN`, holds no control character;
//!   written back as `FROM:<path> KEY=value…` it parses to the same value
//!   (round trip; a dropped source route aside);
//! * the canonical address is `canonical_address` of the path, is its own
//!   canonical form (a fixed point: rules and the directory fold it again),
//!   has a lower-case domain without a trailing dot, and the domain the
//!   proxy judges is the canonical one;
//! * a recipient without a second route has no `@`, `%` or `!` in its
//!   local part once unquoted (what Postfix would route on);
//! * parameter keywords are upper case and values hold no blank.
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_user::smtp::command::{self, MAX_PATH_LEN, MAX_VERB_LEN};
use limiter_user::smtp::{
    canonical_address, check_command_line, check_sasl_response, parse_command, parse_command_line,
    parse_mail_from, parse_rcpt_to, SecondRoute, Verb,
};

fuzz_target!(|data: &[u8]| {
    let cmd = parse_command(data);
    let space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r');
    assert!(!cmd.args.starts_with(space) && !cmd.args.ends_with(space));
    if cmd.verb != Verb::Unknown {
        let word = data
            .iter()
            .copied()
            .skip_while(|&b| space(char::from(b)))
            .take_while(|&b| !space(char::from(b)))
            .collect::<Vec<u8>>();
        assert!(word.eq_ignore_ascii_case(cmd.verb.as_str().as_bytes()));
    }
    if cmd.utf8 {
        assert!(String::from_utf8_lossy(data).contains(cmd.args.as_str()));
    }

    match parse_command_line(data) {
        Ok(checked) => {
            assert!(check_command_line(data).is_ok());
            assert_eq!(checked, cmd);
            assert!(checked.utf8);
            let text = std::str::from_utf8(data).expect("a checked line is UTF-8");
            assert!(!text.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f));
            let verb = text.trim_start_matches([' ', '\t']);
            let end = verb.find([' ', '\t']).unwrap_or(verb.len());
            let verb = &verb[..end];
            assert!((1..=MAX_VERB_LEN).contains(&verb.len()), "{verb:?}");
            assert!(verb.as_bytes()[0].is_ascii_alphabetic());
            assert!(verb.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        }
        Err(e) => {
            let reply = e.reply();
            assert!(reply.is_permanent());
        }
    }
    if check_sasl_response(data).is_ok() {
        assert!(
            data == b"*"
                || data
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        );
    }

    // Whatever the verb, both path parsers must cope with the arguments.
    let args = cmd.args.as_str();
    if let Ok(mail) = parse_mail_from(args) {
        match (&mail.sender, &mail.canonical) {
            (Some(sender), Some(canonical)) => {
                check_mailbox(sender);
                check_canonical(sender, canonical);
            }
            (None, None) => assert!(mail.second_route.is_none()),
            other => panic!("sender and canonical sender disagree: {other:?}"),
        }
        check_params(&mail.params);
        let mut again = parse_mail_from(&command::path_line("FROM:", mail.sender.as_deref().unwrap_or_default(), &mail.params))
            .expect("a MAIL FROM written back from a parsed one parses");
        if mail.second_route == Some(SecondRoute::SourceRoute) {
            again.second_route = mail.second_route;
        }
        assert_eq!(again, mail);
        let _ = (mail.size(), mail.domain());
    }
    if let Ok(rcpt) = parse_rcpt_to(args) {
        check_mailbox(&rcpt.recipient);
        check_canonical(&rcpt.recipient, &rcpt.canonical);
        check_params(&rcpt.params);
        if let Some(domain) = rcpt.domain() {
            assert!(rcpt.canonical.ends_with(&format!("@{domain}")), "{rcpt:?}");
        }
        if rcpt.second_route.is_none() {
            let at = rcpt.canonical.len() - rcpt.domain().map_or(0, |d| d.len() + 1);
            let local = unquote(&rcpt.canonical[..at]);
            assert!(
                !local.contains(['@', '%', '!']),
                "a second route in {:?} went unnoticed",
                rcpt.recipient
            );
        }
        let mut again = parse_rcpt_to(&command::path_line("TO:", &rcpt.recipient, &rcpt.params))
            .expect("a RCPT TO written back from a parsed one parses");
        if rcpt.second_route == Some(SecondRoute::SourceRoute) {
            again.second_route = rcpt.second_route;
        }
        assert_eq!(again, rcpt);
    }
});

fn check_mailbox(mailbox: &str) {
    assert!(
        !mailbox.is_empty() && mailbox.len() <= MAX_PATH_LEN,
        "{mailbox:?}"
    );
    assert!(!mailbox.chars().any(char::is_control), "{mailbox:?}");
}

fn check_canonical(mailbox: &str, canonical: &str) {
    assert_eq!(canonical_address(mailbox).as_deref(), Some(canonical));
    assert!(!canonical.is_empty());
    assert!(!canonical.chars().any(char::is_control), "{canonical:?}");
    assert_eq!(
        canonical_address(canonical).as_deref(),
        Some(canonical),
        "the canonical form of {mailbox:?} is not its own canonical form"
    );
    // The domain (after the last `@` outside quotes) is folded.
    if let Some(at) = domain_at(canonical) {
        let domain = &canonical[at + 1..];
        assert!(!domain.ends_with('.'), "{canonical:?}");
        assert!(
            !domain.bytes().any(|b| b.is_ascii_uppercase()),
            "{canonical:?}"
        );
    }
}

/// The offset of the `@` before the domain: after a quoted local part, or
/// the first one.
fn domain_at(mailbox: &str) -> Option<usize> {
    if mailbox.starts_with('"') {
        let mut escaped = false;
        for (i, b) in mailbox.bytes().enumerate().skip(1) {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => return (mailbox.as_bytes().get(i + 1) == Some(&b'@')).then_some(i + 1),
                _ => {}
            }
        }
        None
    } else {
        mailbox.find('@')
    }
}

fn unquote(local: &str) -> String {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return local.to_owned();
    };
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.extend(if c == '\\' { chars.next() } else { Some(c) });
    }
    out
}

fn check_params(params: &[command::Param]) {
    for (key, value) in params {
        assert!(!key.is_empty() && !key.bytes().any(|b| b.is_ascii_lowercase()));
        assert!(!key.contains([' ', '\t']));
        if let Some(value) = value {
            assert!(!value.is_empty() && !value.contains([' ', '\t', '\r', '\n']));
        }
    }
}
