//! The EHLO reply filter (`smtp::ehlo::filter_ehlo`) on a backend reply
//! read by the reply parser.
//!
//! Input: `[flags: u8] [max_size: u64 LE] hostname LF relay-verbs LF
//! backend-reply-bytes`. Flags: bit 0 offer STARTTLS, bit 1 offer AUTH,
//! bit 2 offer VRFY, bit 3 a proxy size limit. Relay verbs are blank
//! separated; those `config` would refuse (not 1 to 32 ASCII letters and
//! digits, or a verb the proxy knows) are left out, as the agent never
//! sees them.
//!
//! Asserts: a reply that is not 2xx comes back unchanged; otherwise the
//! first line is the proxy's host name (no CR/LF), every other line's
//! keyword is kept by the allow-list or the relay verbs, AUTH and VRFY
//! only when offered, no keyword twice (but `AUTH` and `AUTH=`),
//! `STARTTLS` only when offered and then last, `SIZE` within the proxy's
//! limit, at most two lines more than the backend's, and the wire form
//! only CRLF lines.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use limiter_fuzz::only_crlf;
use limiter_user::smtp::ehlo::KEPT_EXTENSIONS;
use limiter_user::smtp::{filter_ehlo, parse_capabilities, EhloOptions, ReplyParser, Verb};

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let flags = data[0];
    let size = u64::from_le_bytes(data[1..9].try_into().unwrap());
    let mut parts = data[9..].splitn(3, |&b| b == b'\n');
    let hostname = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let verbs = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let reply_bytes = parts.next().unwrap_or_default();

    let relay_verbs: Vec<String> = verbs
        .split([' ', '\t'])
        .filter(|v| {
            let w = v.as_bytes();
            !w.is_empty()
                && w.len() <= 32
                && w[0].is_ascii_alphabetic()
                && w.iter().all(u8::is_ascii_alphanumeric)
                && Verb::from_word(w) == Verb::Unknown
        })
        .map(str::to_owned)
        .collect();
    let opts = EhloOptions {
        hostname,
        offer_starttls: flags & 1 != 0,
        offer_auth: flags & 2 != 0,
        offer_vrfy: flags & 4 != 0,
        relay_verbs,
        max_size: (flags & 8 != 0).then_some(size),
    };

    let mut buf = BytesMut::from(reply_bytes);
    let Some(Ok(backend)) = ReplyParser::default().feed(&mut buf) else {
        return;
    };
    let _ = parse_capabilities(&backend);
    let got = filter_ehlo(&backend, &opts);
    assert!(only_crlf(&got.to_bytes()));
    if !backend.is_positive_completion() {
        assert_eq!(got, backend);
        return;
    }
    assert_eq!(got.code, backend.code);
    assert!(got.lines.len() <= backend.lines.len() + 2);
    assert_eq!(got.lines[0], opts.hostname.replace(['\r', '\n'], " "));

    let mut seen: Vec<String> = Vec::new();
    let last = got.lines.len() - 1;
    for (i, line) in got.lines.iter().enumerate().skip(1) {
        let word = keyword(line);
        if word == "STARTTLS" {
            assert!(opts.offer_starttls && i == last, "{:?}", got.lines);
            continue;
        }
        let relayed = opts
            .relay_verbs
            .iter()
            .any(|v| v.eq_ignore_ascii_case(&word));
        assert!(
            KEPT_EXTENSIONS.contains(&word.as_str()) || relayed,
            "{word:?} passed on: {:?}",
            got.lines
        );
        assert!(word != "AUTH" || opts.offer_auth, "{:?}", got.lines);
        assert!(word != "VRFY" || opts.offer_vrfy, "{:?}", got.lines);
        let legacy_auth = line
            .get(..5)
            .is_some_and(|h| h.eq_ignore_ascii_case("AUTH="));
        let key = if legacy_auth {
            "AUTH=".to_owned()
        } else {
            word.clone()
        };
        assert!(!seen.contains(&key), "{key:?} twice: {:?}", got.lines);
        seen.push(key);
        if word == "SIZE" {
            if let Some(limit) = opts.max_size.filter(|&m| m > 0) {
                let value: u64 = line
                    .get(4..)
                    .unwrap_or_default()
                    .trim()
                    .parse()
                    .expect("SIZE with a number");
                assert!(value > 0 && value <= limit, "{line:?} over {limit}");
            }
        }
    }
    if opts.offer_starttls {
        assert_eq!(got.lines[last], "STARTTLS");
    }
    if let Some(limit) = opts.max_size.filter(|&m| m > 0) {
        assert!(
            seen.iter().any(|k| k == "SIZE"),
            "no SIZE with a limit of {limit}"
        );
    }
});

/// A capability line's keyword: up to the first blank or `=`, upper case.
fn keyword(line: &str) -> String {
    let line = line.trim_start();
    let end = line.find([' ', '\t', '=']).unwrap_or(line.len());
    line[..end].to_ascii_uppercase()
}
