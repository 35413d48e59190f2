//! What one agent reads from Redis that another (or anyone with write
//! access to Redis) wrote (`cluster::wire`): a stream entry's fields
//! (`Event::from_fields`), an active hash entry (`Event::from_active`),
//! and the check a block passes before it is applied (`wire::admit`).
//!
//! Input: `[mode: u8] rest`. Mode even: `rest` is a stream entry, names
//! and values alternating, separated by NULs (a last unpaired name is
//! dropped: Redis never sends one). Mode odd: `rest` is a hash entry,
//! `net NUL value`.
//!
//! Asserts: an accepted event has a network without host bits and a
//! well-formed node name, a comment within the limit without control
//! characters, a backoff level at most `MAX_REPEAT`; written back (`fields`, and for a block `active_value`) it
//! parses to the same event; `admit` with an empty allow list refuses
//! only a block of everything or an ended one, and ends every other block
//! after `now` and at most `max_duration` later.
#![no_main]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use limiter_user::cluster::wire::{admit, Event, Refusal, MAX_REPEAT};

/// A week, as `limits.max_block_duration` defaults to.
const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let parsed = if mode % 2 == 0 {
        let parts: Vec<&[u8]> = rest.split(|&b| b == 0).collect();
        Event::from_fields(parts.chunks_exact(2).map(|kv| (kv[0], kv[1])))
    } else {
        let (net, value) = match rest.iter().position(|&b| b == 0) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &[][..]),
        };
        Event::from_active(net, value)
    };
    let Ok(event) = parsed else {
        return;
    };
    check(&event);
});

fn check(event: &Event) {
    let net = event.net();
    assert_eq!(net, net.trunc(), "{event:?}");
    let node = event.node();
    assert!(
        !node.is_empty()
            && node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')),
        "{event:?}"
    );
    if let Event::Block {
        comment: Some(comment),
        ..
    } = event
    {
        assert!(!comment.is_empty(), "{event:?}");
        assert!(!comment.chars().any(char::is_control), "{event:?}");
    }

    let fields = event.fields();
    let again = Event::from_fields(fields.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
    assert_eq!(again.as_ref(), Ok(event), "{fields:?}");
    if let Some(value) = event.active_value() {
        let text = net.to_string();
        let again = Event::from_active(text.as_bytes(), value.as_bytes());
        assert_eq!(again.as_ref(), Ok(event), "{value}");
    }

    if let Event::Block { repeat, .. } = event {
        assert!(*repeat <= MAX_REPEAT, "{event:?}");
    }

    if let Event::Block { expires, .. } = event {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        match admit(net, *expires, &[], MAX_DURATION, now) {
            Ok(end) => assert!(end > now && end <= now + MAX_DURATION, "{event:?}: {end:?}"),
            Err(Refusal::Everything) => assert_eq!(net.prefix_len(), 0, "{event:?}"),
            Err(Refusal::Expired) => {
                assert!(expires.is_some_and(|at| at <= 1_800_000_000), "{event:?}")
            }
            Err(refusal) => panic!("{event:?}: {refusal} with nothing allowed"),
        }
        // The clock of a host set before 1970 or far ahead: no panic.
        let _ = admit(net, *expires, &[], MAX_DURATION, UNIX_EPOCH);
        let _ = admit(
            net,
            *expires,
            &[],
            MAX_DURATION,
            SystemTime::now() + Duration::from_secs(u64::from(u32::MAX)),
        );
    }
}
