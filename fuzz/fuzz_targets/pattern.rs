//! Wildcard patterns (`policy::pattern`): `?` one character, `*` any run,
//! ASCII case ignored.
//!
//! Input: the pattern, LF, the text (both UTF-8, lossily).
//!
//! Asserts: `Pattern::matches` agrees with an independent reference matcher
//! (a dynamic programme over characters) on texts and patterns of up to
//! 512 characters; matching finishes quickly however hostile the pair is
//! (the time is bounded by a multiple of pattern × text, never exponential:
//! libFuzzer's `-timeout` catches a hang, the assertion a blow-up); a
//! pattern list matches when one of its patterns does, and written back
//! with `Display` parses to the same list.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use limiter_user::policy::{Pattern, PatternList};

fuzz_target!(|data: &[u8]| {
    let (pattern, text) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let pattern = String::from_utf8_lossy(pattern);
    let text = String::from_utf8_lossy(text);

    let compiled = Pattern::new(&pattern);
    assert_eq!(compiled.as_str(), pattern);
    let started = Instant::now();
    let matched = compiled.matches(&text);
    let took = started.elapsed();
    // A few nanoseconds per (pattern byte × text byte) step at worst, even
    // with sanitizers; an exponential matcher blows far past this.
    let steps = (pattern.len() + 1) as u64 * (text.len() + 1) as u64;
    assert!(
        took <= Duration::from_millis(500) + Duration::from_nanos(100 * steps),
        "matching took {took:?} for {} × {} bytes",
        pattern.len(),
        text.len()
    );

    if pattern.chars().count() <= 512 && text.chars().count() <= 512 {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        assert_eq!(
            matched,
            reference(&p, &t),
            "pattern {pattern:?} against {text:?}"
        );
    }

    // The text as a list of blank-separated patterns.
    let list = PatternList::parse(&pattern);
    assert_eq!(
        list.matches(&text),
        pattern
            .split_whitespace()
            .any(|p| Pattern::new(p).matches(&text))
    );
    if let Some(found) = list.find(&text) {
        assert!(found.matches(&text));
    }
    assert_eq!(PatternList::parse(&list.to_string()), list);
});

/// Whether `t` matches `p`: `m[i][j]` says whether `p[..i]` matches `t[..j]`.
fn reference(p: &[char], t: &[char]) -> bool {
    let mut prev = vec![false; t.len() + 1];
    prev[0] = true;
    for &pc in p {
        let mut cur = vec![false; t.len() + 1];
        if pc == '*' {
            // `*` matches t[..j] when p[..i-1] matches any t[..k], k <= j.
            let mut any = false;
            for j in 0..=t.len() {
                any |= prev[j];
                cur[j] = any;
            }
        } else {
            for j in 1..=t.len() {
                let tc = t[j - 1];
                cur[j] = prev[j - 1] && (pc == '?' || pc.eq_ignore_ascii_case(&tc));
            }
        }
        prev = cur;
    }
    prev[t.len()]
}
