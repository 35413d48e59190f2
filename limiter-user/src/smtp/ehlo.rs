//! The EHLO reply the proxy gives its clients, made from the backend's.
//!
//! The proxy reads every command, so it may only advertise extensions whose
//! commands it follows. [`filter_ehlo`] therefore keeps the backend's
//! capabilities from an allow-list ([`KEPT_EXTENSIONS`]) and drops the rest:
//! `CHUNKING`/`BDAT` and `BINARYMIME` (a body the DATA scanner does not
//! read), `XCLIENT`/`XFORWARD` (only the proxy may assert a client's
//! identity), the backend's `STARTTLS` (TLS is the proxy's own), and vendor
//! extensions (`X-…`, `XEXCH50`, `XRDST`, …) or anything unknown, such as
//! `ATRN`/`TURN` that reverse the roles. Dropping an extension is always
//! safe: the client falls back to plain SMTP.

use super::reply::Reply;

/// The backend capabilities that the proxy passes on to clients.
pub const KEPT_EXTENSIONS: &[&str] = &[
    "PIPELINING",
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "AUTH",
    "VRFY",
    "HELP",
];

/// What the proxy says about itself in its EHLO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EhloOptions {
    /// The proxy's own host name: the reply's first line, in place of the
    /// backend's.
    pub hostname: String,
    /// Whether to advertise `STARTTLS` (TLS configured on this listener and
    /// the session not yet in TLS).
    pub offer_starttls: bool,
    /// Whether to pass the backend's `AUTH` on (false before STARTTLS when
    /// AUTH must wait for TLS).
    pub offer_auth: bool,
    /// Whether to pass the backend's `VRFY` on (false when the proxy
    /// answers VRFY itself, `smtp.vrfy = "refuse"`).
    pub offer_vrfy: bool,
    /// Extension keywords the proxy relays raw (`smtp.relay_verbs`, e.g.
    /// `ETRN`), passed on when the backend offers them.
    pub relay_verbs: Vec<String>,
    /// The proxy's message size limit, advertised in `SIZE` when the
    /// backend's is absent, unlimited (`0`) or larger.
    pub max_size: Option<u64>,
}

/// The EHLO reply for the client, made from the backend's `reply`.
///
/// The first line becomes `opts.hostname`; the capability lines are kept if
/// their keyword is in [`KEPT_EXTENSIONS`] (the legacy `AUTH=LOGIN` form
/// included), once per keyword, in the backend's order; `SIZE` carries the
/// smaller non-zero limit of the backend's and `opts.max_size`; `STARTTLS`
/// is added at the end when `opts.offer_starttls`. A reply that is not a
/// success (the backend refused EHLO) is returned unchanged.
#[must_use]
pub fn filter_ehlo(backend: &Reply, opts: &EhloOptions) -> Reply {
    if !backend.is_positive_completion() {
        return backend.clone();
    }
    let proxy_limit = opts.max_size.filter(|&m| m > 0);
    let mut lines = vec![opts.hostname.replace(['\r', '\n'], " ")];
    let mut seen: Vec<String> = Vec::new();
    let mut size_written = false;
    for line in backend.lines.iter().skip(1) {
        let line = line.trim();
        let keyword = keyword(line);
        let kept = KEPT_EXTENSIONS.contains(&keyword.as_str())
            || opts
                .relay_verbs
                .iter()
                .any(|verb| verb.eq_ignore_ascii_case(&keyword));
        if !kept
            || (keyword == "AUTH" && !opts.offer_auth)
            || (keyword == "VRFY" && !opts.offer_vrfy)
        {
            continue;
        }
        // `AUTH=LOGIN` (for old Outlook clients) is a separate line from
        // `AUTH LOGIN`, so both are kept; any other repeat is dropped.
        let legacy_auth = line
            .get(..5)
            .is_some_and(|head| head.eq_ignore_ascii_case("AUTH="));
        let key = if legacy_auth {
            "AUTH=".to_owned()
        } else {
            keyword.clone()
        };
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        if keyword == "SIZE" {
            size_written = true;
            let backend_limit = line
                .get(4..)
                .map(str::trim)
                .and_then(|v| v.parse::<u64>().ok());
            let limit = match (backend_limit, proxy_limit) {
                (Some(b), Some(p)) if b == 0 || p < b => Some(p),
                (None, Some(p)) => Some(p),
                (Some(b), _) => Some(b),
                (None, None) => None,
            };
            lines.push(match limit {
                Some(0) | None => "SIZE".to_owned(),
                Some(n) => format!("SIZE {n}"),
            });
            continue;
        }
        lines.push(line.to_owned());
    }
    if !size_written {
        if let Some(limit) = proxy_limit {
            lines.push(format!("SIZE {limit}"));
        }
    }
    if opts.offer_starttls {
        lines.push("STARTTLS".to_owned());
    }
    Reply {
        code: backend.code,
        lines,
    }
}

/// The EHLO reply the proxy starts from while it has not learned the
/// backend's capabilities yet: only what every SMTP server it may front
/// follows (`PIPELINING`, `8BITMIME`, `ENHANCEDSTATUSCODES`), no `AUTH`.
/// [`filter_ehlo`] adds `SIZE` and `STARTTLS`.
#[must_use]
pub fn default_capabilities(hostname: &str) -> Reply {
    Reply {
        code: 250,
        lines: vec![
            hostname.replace(['\r', '\n'], " "),
            "PIPELINING".to_owned(),
            "8BITMIME".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
        ],
    }
}

/// The host name an EHLO reply starts with (its first word), for the
/// proxy's own `250` to HELO.
#[must_use]
pub fn ehlo_hostname(reply: &Reply) -> Option<&str> {
    reply
        .lines
        .first()
        .and_then(|line| line.split_whitespace().next())
        .filter(|name| !name.is_empty())
}

/// The capability keywords of an EHLO reply, upper-cased, without their
/// parameters (`"SIZE 1000"` gives `"SIZE"`, `"AUTH=LOGIN"` gives `"AUTH"`),
/// for the proxy to learn whether the backend offers `XCLIENT`, `STARTTLS`,
/// `PIPELINING`… Empty for a reply that is not a success.
#[must_use]
pub fn parse_capabilities(reply: &Reply) -> Vec<String> {
    if !reply.is_positive_completion() {
        return Vec::new();
    }
    reply
        .lines
        .iter()
        .skip(1)
        .map(|line| keyword(line))
        .filter(|k| !k.is_empty())
        .collect()
}

/// The keyword of a capability line: up to the first blank or `=`,
/// upper-cased.
fn keyword(line: &str) -> String {
    let line = line.trim_start();
    let end = line.find([' ', '\t', '=']).unwrap_or(line.len());
    line[..end].to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::TestRng;
    use bytes::BytesMut;

    const POSTFIX: &[u8] = b"250-mail.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n";

    const WITH_XCLIENT: &[u8] = b"250-backend.internal\r\n250-PIPELINING\r\n250-SIZE\r\n250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT\r\n250-AUTH PLAIN LOGIN\r\n250-AUTH=PLAIN LOGIN\r\n250-X-EXPS GSSAPI NTLM\r\n250-XEXCH50\r\n250-XRDST\r\n250-BINARYMIME\r\n250-ATRN\r\n250-pipelining\r\n250 HELP\r\n";

    fn parse(bytes: &[u8]) -> Reply {
        let mut buf = BytesMut::from(bytes);
        crate::smtp::ReplyParser::default()
            .feed(&mut buf)
            .expect("complete")
            .expect("valid")
    }

    fn opts(starttls: bool, max_size: Option<u64>) -> EhloOptions {
        EhloOptions {
            hostname: "mx.example.net".into(),
            offer_starttls: starttls,
            offer_auth: true,
            offer_vrfy: true,
            relay_verbs: Vec::new(),
            max_size,
        }
    }

    #[test]
    fn postfix_reply() {
        let backend = parse(POSTFIX);
        let got = filter_ehlo(&backend, &opts(true, Some(25_000_000)));
        assert_eq!(
            got.to_bytes(),
            b"250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 STARTTLS\r\n"
        );
        let got = filter_ehlo(&backend, &opts(false, Some(1_000_000)));
        assert_eq!(got.lines[2], "SIZE 1000000");
        assert!(!got.lines.iter().any(|l| l == "STARTTLS" || l == "CHUNKING"));
        assert_eq!(got.lines.last().map(String::as_str), Some("SMTPUTF8"));
        let got = filter_ehlo(&backend, &opts(false, None));
        assert_eq!(got.lines[2], "SIZE 10240000");
        let got = filter_ehlo(&backend, &opts(false, Some(0)));
        assert_eq!(got.lines[2], "SIZE 10240000", "0 means no proxy limit");
    }

    #[test]
    fn vendor_and_identity_extensions_dropped() {
        let backend = parse(WITH_XCLIENT);
        let got = filter_ehlo(&backend, &opts(false, Some(5_000)));
        assert_eq!(
            got.lines,
            vec![
                "mx.example.net",
                "PIPELINING",
                "SIZE 5000",
                "AUTH PLAIN LOGIN",
                "AUTH=PLAIN LOGIN",
                "HELP"
            ]
        );
        let got = filter_ehlo(&backend, &opts(false, None));
        assert_eq!(got.lines[2], "SIZE", "unlimited stays unlimited");
    }

    #[test]
    fn auth_vrfy_and_extension_verbs_follow_the_options() {
        let backend = parse(WITH_XCLIENT);
        let no_auth = EhloOptions {
            offer_auth: false,
            ..opts(true, None)
        };
        let got = filter_ehlo(&backend, &no_auth);
        assert!(
            !got.lines
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("AUTH")),
            "AUTH and the legacy AUTH= form both go: {:?}",
            got.lines
        );
        let backend = parse(POSTFIX);
        let got = filter_ehlo(&backend, &opts(false, None));
        assert!(
            !got.lines.iter().any(|l| l == "ETRN"),
            "ETRN is not relayed by default"
        );
        let relayed = EhloOptions {
            offer_vrfy: false,
            relay_verbs: vec!["etrn".into()],
            ..opts(false, None)
        };
        let got = filter_ehlo(&backend, &relayed);
        assert!(got.lines.iter().any(|l| l == "ETRN"), "{:?}", got.lines);
        assert!(!got.lines.iter().any(|l| l == "VRFY"), "{:?}", got.lines);
    }

    #[test]
    fn size_added_when_backend_has_none() {
        let backend = Reply::new(250, "b\nPIPELINING");
        let got = filter_ehlo(&backend, &opts(true, Some(42)));
        assert_eq!(
            got.lines,
            vec!["mx.example.net", "PIPELINING", "SIZE 42", "STARTTLS"]
        );
        let got = filter_ehlo(&Reply::new(250, "b"), &opts(false, None));
        assert_eq!(got.lines, vec!["mx.example.net"]);
        let garbage = Reply::new(250, "b\nSIZE abc");
        assert_eq!(
            filter_ehlo(&garbage, &opts(false, Some(7))).lines[1],
            "SIZE 7"
        );
        assert_eq!(filter_ehlo(&garbage, &opts(false, None)).lines[1], "SIZE");
    }

    #[test]
    fn refusal_passes_through() {
        let refused = Reply::new(550, "5.7.1 go away");
        assert_eq!(filter_ehlo(&refused, &opts(true, Some(1))), refused);
        assert!(parse_capabilities(&refused).is_empty());
    }

    #[test]
    fn capabilities() {
        assert_eq!(
            parse_capabilities(&parse(POSTFIX)),
            vec![
                "PIPELINING",
                "SIZE",
                "VRFY",
                "ETRN",
                "STARTTLS",
                "ENHANCEDSTATUSCODES",
                "8BITMIME",
                "DSN",
                "SMTPUTF8",
                "CHUNKING"
            ]
        );
        let caps = parse_capabilities(&parse(WITH_XCLIENT));
        assert!(caps.iter().any(|c| c == "XCLIENT"));
        assert!(caps.iter().any(|c| c == "XFORWARD"));
        assert_eq!(caps.iter().filter(|c| *c == "AUTH").count(), 2);
        assert_eq!(caps.iter().filter(|c| *c == "PIPELINING").count(), 2);
    }

    #[test]
    fn random_replies_never_panic() {
        let mut rng = TestRng::new(0xE410);
        for _ in 0..5000 {
            let count = 1 + rng.below(8);
            let lines = (0..count)
                .map(|_| {
                    let len = rng.below(20);
                    String::from_utf8_lossy(&rng.bytes(len, b"SIZE AUTH= X-0123\t")).into_owned()
                })
                .collect();
            let code = [250, 220, 550, 0, 999][rng.below(5)];
            let reply = Reply { code, lines };
            let size = [None, Some(0), Some(1), Some(u64::MAX)][rng.below(4)];
            let out = filter_ehlo(&reply, &opts(rng.below(2) == 0, size));
            let _ = (parse_capabilities(&out), out.to_bytes());
        }
        let empty = Reply {
            code: 250,
            lines: vec![],
        };
        assert_eq!(
            filter_ehlo(&empty, &opts(false, None)).lines,
            vec!["mx.example.net"]
        );
    }
}
