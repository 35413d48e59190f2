//! The control socket's messages (`control::Request`, `control::Response`):
//! one JSON object a line, decoded with serde_json as the agent and the CLI
//! do.
//!
//! Asserts: a request that decodes encodes to one line (no LF, so it cannot
//! split into two requests) and decodes back to the same request; a
//! response that decodes encodes to one line that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use limiter_user::control::{Request, Response};

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
    if let Ok(response) = serde_json::from_str::<Response>(line) {
        let text = serde_json::to_string(&response).expect("a response encodes");
        assert!(!text.contains('\n'), "{text}");
        let back: Response = serde_json::from_str(&text).expect("an encoded response decodes");
        assert_eq!(back.ok, response.ok);
        assert_eq!(back.error, response.error);
    }
});
