//! The control socket's messages (`control::Request`, `control::Response`):
//! one JSON object a line, decoded with serde_json as the agent and the CLI
//! do.
//!
//! Asserts: a request that decodes encodes to one line (no LF, so it cannot
//! split into two requests) and decodes back to the same request; a
//! response that decodes as the CLI reads it (its data as one answer type,
//! `control::answers`) encodes to one line that decodes back the same.
//! The answers holding free JSON (`stats`, `limits show`) are left out:
//! serde_json's float parsing does not promise a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_user::control::{
    AllowChanged, BlockAdded, BlockCheck, BlockPage, BlockRemoved, Imported, LimitSet,
    RecipientCheck, Reloaded, Request, Response, Top,
};

/// A response with `$answer` data that decodes encodes to one line and
/// decodes back equal.
macro_rules! response_round_trips {
    ($line:expr, $($answer:ty),+) => {$(
        if let Ok(response) = serde_json::from_str::<Response<$answer>>($line) {
            let text = serde_json::to_string(&response).expect("a response encodes");
            assert!(!text.contains('\n'), "{text}");
            let back: Response<$answer> =
                serde_json::from_str(&text).expect("an encoded response decodes");
            assert_eq!(back, response, "{text}");
        }
    )+};
}

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(request) = serde_json::from_str::<Request>(line) {
        let text = serde_json::to_string(&request).expect("a request encodes");
        assert!(!text.contains('\n'), "{text}");
        let back: Request = serde_json::from_str(&text).expect("an encoded request decodes");
        assert_eq!(back, request);
    }
    response_round_trips!(
        line,
        Top,
        Reloaded,
        BlockPage,
        BlockAdded,
        BlockRemoved,
        BlockCheck,
        Imported,
        Vec<String>,
        AllowChanged,
        LimitSet,
        RecipientCheck
    );
});
