//! Differential test: the proxy's reading of every command line against
//! the reading of the real Postfix behind it (DESIGN, "Adversarial input":
//! the proxy never relays a line that the backend could read differently
//! from the way the proxy judged it).
//!
//! A seeded generator makes tricky command lines (verbs in mixed case,
//! every control byte and some 8-bit bytes as separators and inside the
//! arguments, quoting and escapes, routing syntax, case and trailing dots
//! of domains, comments, blanks inside the brackets, null-sender
//! spellings, long and non-UTF-8 lines). Each goes through the proxy to a
//! private Postfix, and the two readings are compared.
//!
//! **The oracle.** Postfix tells the test what it read through TCP lookup
//! tables (`tcp:` maps, tcp_table(5)) served by this test process:
//!
//! * `smtpd_command_filter = tcp:…` — every command line Postfix receives,
//!   byte for byte, before it parses it (`smtputf8_enable = no`, so that
//!   lines that are not UTF-8 reach the filter too). A line the proxy
//!   relayed (as sent, or rebuilt) shows up here; a line it refused does
//!   not. The first word by Postfix's own tokeniser (`smtpd_token`,
//!   mirrored below: C `isspace` separators, `<…>` and `"…"` kept whole) is
//!   Postfix's verb.
//! * `check_sender_access tcp:…` (MAIL, `smtpd_delay_reject = no`) and
//!   `check_recipient_access tcp:…` (RCPT): the first key of each lookup
//!   is the address as Postfix resolved it (trivial-rewrite: source route,
//!   `%` and `!` routing, quotes, `@myorigin` appended…), `<>` for the null
//!   sender. `check_helo_access tcp:…`: the HELO name as Postfix keeps it.
//!
//! Every table answers "not found", so nothing changes Postfix's decisions.
//! Postfix is set up as the worst backend the proxy could guard: an open
//! relay for the proxy (`smtpd_relay_restrictions = …, permit_mynetworks`,
//! the proxy connecting from 127.0.0.1 without a client identity) with
//! `example.com` as a local domain (so its routing tricks — the percent hack, bang paths,
//! quoted `@` — are live) that accepts every local recipient. Only the
//! proxy's judgement stands between a client and a relayed recipient.
//!
//! **The proxy's reading** comes from its own parser in the library
//! (`limiter_user::smtp::command`: the verb, the canonical recipient and
//! sender, the routing syntax it noted) and from its verdict (a line it
//! does not relay was refused; a relayed RCPT was judged to be in
//! `relay.accept`). A RCPT the proxy refused is also sent to Postfix
//! directly, for its reading alone: recipients in `example.com` refused
//! for nothing are counted (collateral damage, not a failure).
//!
//! **Invariants**, for every case:
//! 1. no RCPT whose domain, as Postfix resolved it, is outside
//!    `relay.accept` (`*@example.com`) is accepted (2xx) by Postfix through
//!    the proxy (`open-relay`);
//! 2. no line the proxy refused with a verdict of its own (relay denied)
//!    reached Postfix (`refused-but-relayed`);
//! 3. for a relayed MAIL/RCPT, the address Postfix read, normalised (domain
//!    in lower case, one trailing dot dropped, local part unquoted, a
//!    missing domain taken as Postfix's `myorigin`), is the proxy's
//!    (`rcpt-address`, `sender-address`; a sender whose routing syntax the
//!    proxy noted is let through by design and only counted), and
//!    Postfix's verb is the proxy's (`verb`);
//! 4. a null sender at Postfix (`<>`) is a null sender for the proxy (it
//!    counted it against `limits.null_sender_rate`) and the other way round
//!    (`null-sender`);
//! 5. with `smtp.vrfy = "refuse"` (the default) no VRFY or EXPN reaches
//!    Postfix (`vrfy-relayed`);
//!
//! plus: no HELO name that Postfix read as matching `lists.reject_helo`
//! was relayed (`helo-reject-bypass`; `helo-words` when Postfix kept
//! several words, `HELO a x.evil.test`), and no relayed line put Postfix in
//! DATA mode (`data-at-backend`) or left the client without a reply
//! (`no-reply`).
//!
//! Knobs: `DIFF_SEED` (decimal or 0x-hex; printed), `DIFF_CASES` (default
//! 10000, about 5 s here), `DIFF_SECONDS` (time bound, default 150). On
//! mismatches the test prints each one (escaped bytes, both readings, the reply; the first 60
//! per class), keeps going, then fails. The counts are printed at the end
//! (`cargo test -p limiter-tests --test differential -- --nocapture`).
//!
//! Needs root and Postfix (see [`postfix::missing_prerequisite`]); skipped
//! with a message otherwise, failed under `CI=true`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use limiter_tests::{
    fixture,
    postfix::{self, log_lines, Postfix, PostfixOptions},
    proxy::TestProxy,
    tcp::wait_until,
};
use limiter_user::{
    config::Config,
    smtp::command::{parse_command, parse_mail_from, parse_rcpt_to, Verb},
};

/// The name the test's client gives in its own (well-formed) EHLO.
const CLIENT_HELO: &str = "client.example.net";
/// The sender of the transactions that RCPT cases run in.
const SETUP_SENDER: &str = "sender@example.net";
/// `relay.accept` of the proxy: the one domain whose recipients it relays.
const ACCEPT_DOMAIN: &str = "example.com";
/// `lists.reject_helo` of the proxy.
const REJECT_HELO: [&str; 2] = ["*.evil.test", "evil.test"];
/// Postfix's `myorigin` in the fixture (`$myhostname`): what it appends to
/// an address without a domain.
const MYORIGIN: &str = postfix::HOSTNAME;
/// Postfix's `line_length_limit` (default): longer lines are cut there.
const POSTFIX_LINE_LIMIT: usize = 2048;
/// Replies slower than this count as "no reply" (and end the session).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Mismatches printed per class (all are counted).
const PRINT_PER_CLASS: usize = 60;
/// Recipients accepted in one transaction before the test starts another
/// (the proxy's `smtp.max_recipients` is 100).
const RCPTS_PER_TRANSACTION: usize = 50;

/// The commands in Postfix's `smtpd_cmd_table` (3.7): a first token that is
/// none of these gets `500 5.5.2 Error: command not recognized`.
const POSTFIX_COMMANDS: [&str; 15] = [
    "HELO", "EHLO", "XCLIENT", "XFORWARD", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT",
    "RSET", "NOOP", "VRFY", "ETRN", "QUIT",
];

// -- The test --------------------------------------------------------------

#[test]
fn proxy_and_postfix_read_every_line_alike() {
    if !fixture::require(
        "proxy_and_postfix_read_every_line_alike",
        postfix::missing_prerequisite(),
    ) {
        return;
    }
    let seed = env_u64("DIFF_SEED").unwrap_or(0x5EED_D1FF_2024_0011);
    let cases = env_u64("DIFF_CASES").unwrap_or(10_000) as usize;
    let budget = Duration::from_secs(env_u64("DIFF_SECONDS").unwrap_or(150));
    println!(
        "differential: DIFF_SEED={seed:#x} DIFF_CASES={cases} DIFF_SECONDS={}",
        budget.as_secs()
    );

    let oracle = Oracle::start();
    let postfix = Postfix::start(postfix_options(&oracle)).expect("start Postfix");
    let proxy = TestProxy::start(&proxy_config(postfix.addr()));

    let mut gen = Generator::new(seed);
    let mut run = Run::new(proxy.addr, postfix.addr(), &oracle);
    let started = Instant::now();
    for _ in 0..cases {
        if started.elapsed() > budget {
            run.report.time_bound = true;
            break;
        }
        let case = gen.case();
        let t = Instant::now();
        run.case(&case);
        let took = t.elapsed();
        if took > Duration::from_millis(200) {
            run.report.slow.push((took, escape(&case.line)));
        }
    }
    run.finish(&postfix);
    let elapsed = started.elapsed();
    drop(proxy);
    let report = &run.report;
    println!("{}", report.render(seed, elapsed));
    if !report.mismatches.is_empty() {
        let log = postfix.log();
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("warning") || l.contains("fatal") || l.contains("panic"))
            .take(20)
            .collect();
        if !warnings.is_empty() {
            println!("Postfix warnings:\n{}", warnings.join("\n"));
        }
    }
    assert!(
        report.mismatches.is_empty(),
        "{} mismatch(es) between the proxy's and Postfix's readings (DIFF_SEED={seed:#x}); see the list above",
        report.mismatch_total()
    );
    // "No mismatch" means something only when the cases were judged: a
    // proxy whose sessions fail to open, or that answers nothing, would
    // pass the check above with few or no cases compared.
    let judged: usize =
        report.relayed.values().sum::<usize>() + report.answered_by_proxy.values().sum::<usize>();
    assert!(
        report.generated > 0 && judged * 10 >= report.generated * 9,
        "only {judged} of {} cases were judged (relayed to Postfix or answered by the proxy); see the report above",
        report.generated
    );
    assert!(
        report.setup_failures.len() * 100 <= report.sessions.max(1),
        "{} of {} sessions failed to set up (more than 1 %); see the report above",
        report.setup_failures.len(),
        report.sessions
    );
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => value.replace('_', "").parse().ok(),
    }
}

// -- Postfix and the proxy ---------------------------------------------------

/// The fixture's Postfix turned into the oracle (see the module comment).
fn postfix_options(oracle: &Oracle) -> PostfixOptions {
    let map = |table: Table| format!("tcp:127.0.0.1:{}", oracle.port(table));
    let extra = [
        ("smtpd_command_filter", map(Table::Command)),
        ("smtpd_delay_reject", "no".to_owned()),
        (
            "smtpd_helo_restrictions",
            format!("check_helo_access {}", map(Table::Helo)),
        ),
        (
            "smtpd_sender_restrictions",
            format!("check_sender_access {}", map(Table::Sender)),
        ),
        (
            "smtpd_relay_restrictions",
            format!(
                "check_recipient_access {}, permit_mynetworks, reject_unauth_destination",
                map(Table::Recipient)
            ),
        ),
        ("smtpd_recipient_restrictions", "permit".to_owned()),
        // example.com local: percent hack, bang paths and quoted `@` apply.
        ("mydestination", ACCEPT_DOMAIN.to_owned()),
        ("virtual_mailbox_domains", String::new()),
        ("local_recipient_maps", String::new()),
        ("local_transport", "discard:".to_owned()),
        // A relayed recipient is accepted (an `error:` transport would make
        // smtpd refuse it and hide an open relay); nothing is ever sent, as
        // the test never gives DATA, and `discard:` would drop it anyway.
        ("default_transport", "discard:".to_owned()),
        ("relay_transport", "discard:".to_owned()),
        ("disable_vrfy_command", "no".to_owned()),
        // Postfix refuses a line that is not UTF-8 before its command filter
        // when SMTPUTF8 is on, with the very reply the proxy gives such a
        // line: off, every line reaches the filter (and is read as 8-bit
        // text), so a relayed one cannot pass for a refused one.
        ("smtputf8_enable", "no".to_owned()),
        ("smtpd_client_connection_count_limit", "0".to_owned()),
        ("smtpd_client_connection_rate_limit", "0".to_owned()),
        ("smtpd_client_recipient_rate_limit", "0".to_owned()),
        ("smtpd_recipient_limit", "100000".to_owned()),
        ("smtpd_junk_command_limit", "100000".to_owned()),
        // Every transaction opens a queue file and none is ever delivered:
        // without this each one waits a second for a flow-control token.
        ("in_flow_delay", "0".to_owned()),
    ];
    PostfixOptions {
        extra_main_cf: extra.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ..PostfixOptions::default()
    }
}

/// The proxy's configuration: judgement on, every per-session and
/// per-source limit raised so that thousands of bad lines from one source
/// do not end in a block (an allow-list would bypass the judgement).
/// Keys that this build of the proxy does not know yet are left out (the
/// configuration refuses unknown keys).
fn proxy_config(backend: SocketAddr) -> String {
    let reject_helo = REJECT_HELO
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let tables: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "backend",
            vec![
                ("address", format!("\"{backend}\"")),
                ("identity", "\"none\"".into()),
                ("connect_timeout", "\"2s\"".into()),
            ],
        ),
        ("kernel", vec![("mode", "\"off\"".into())]),
        (
            "smtp",
            vec![
                ("vrfy", "\"refuse\"".into()),
                ("max_commands_before_mail", "1000000".into()),
                ("max_errors", "1000000".into()),
                ("relay_verbs", "[\"ETRN\"]".into()),
                ("max_sessions", "100".into()),
            ],
        ),
        (
            "limits",
            vec![
                ("max_failed_rcpt", "1000000".into()),
                ("max_failed_rcpt_per_source", "0".into()),
                ("max_failed_rcpt_per_network", "0".into()),
                ("max_failed_auth", "1000000".into()),
                ("max_failed_auth_per_network", "0".into()),
                ("max_failed_auth_per_account", "0".into()),
                ("null_sender_rate", "\"1000000/1m\"".into()),
                ("null_sender_rate_per_network", "\"0/1m\"".into()),
                ("null_sender_rate_per_recipient", "\"0/1m\"".into()),
                ("max_connections_per_source", "1000".into()),
            ],
        ),
        ("relay", vec![("accept", format!("\"*@{ACCEPT_DOMAIN}\""))]),
        ("lists", vec![("reject_helo", format!("[{reject_helo}]"))]),
    ];
    let head = "mode = \"enforce\"\n\n[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\n";
    let render = |skip: &[(&str, &str)]| {
        let mut text = head.to_owned();
        for (table, keys) in &tables {
            let _ = writeln!(text, "\n[{table}]");
            for (key, value) in keys {
                if !skip.contains(&(*table, *key)) {
                    let _ = writeln!(text, "{key} = {value}");
                }
            }
        }
        text
    };
    let mut skipped: Vec<(&str, &str)> = Vec::new();
    loop {
        let text = render(&skipped);
        let error = match Config::from_toml(&text) {
            Ok(_) => {
                if !skipped.is_empty() {
                    println!("differential: this proxy does not know {skipped:?}; left out");
                }
                return text;
            }
            Err(e) => e.to_string(),
        };
        // Leave out the key serde calls unknown, if it is one of ours (the
        // message goes on to list the expected keys: match the first part).
        let culprit = tables
            .iter()
            .flat_map(|(t, keys)| keys.iter().map(move |(k, _)| (*t, *k)))
            .filter(|tk| !skipped.contains(tk))
            .find(|(_, key)| error.contains(&format!("unknown field `{key}`")));
        match culprit {
            Some(tk) => skipped.push(tk),
            _ => panic!("test configuration refused: {error}\n{text}"),
        }
    }
}

// -- The oracle: Postfix's lookups -------------------------------------------

/// Postfix's lookups in order: the table and the key.
type Lookups = Vec<(Table, Vec<u8>)>;

/// Which of Postfix's tables a lookup came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Command,
    Helo,
    Sender,
    Recipient,
}

const TABLES: [Table; 4] = [Table::Command, Table::Helo, Table::Sender, Table::Recipient];

/// tcp_table(5) servers, one port per table, recording every key in the
/// order Postfix asked. Each key is recorded before the answer goes back,
/// so once Postfix has replied to a command its lookups are here.
struct Oracle {
    ports: [u16; 4],
    lookups: Arc<Mutex<Lookups>>,
}

impl Oracle {
    fn start() -> Oracle {
        let lookups = Arc::new(Mutex::new(Vec::new()));
        let mut ports = [0; 4];
        for (i, table) in TABLES.into_iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a lookup table port");
            ports[i] = listener.local_addr().expect("local address").port();
            let lookups = lookups.clone();
            // The threads end with the test process (Postfix, their only
            // client, is stopped first).
            thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let lookups = lookups.clone();
                    thread::spawn(move || serve_lookups(stream, table, &lookups));
                }
            });
        }
        Oracle { ports, lookups }
    }

    fn port(&self, table: Table) -> u16 {
        self.ports[TABLES.iter().position(|t| *t == table).unwrap_or(0)]
    }

    /// Takes the lookups recorded so far.
    fn drain(&self) -> Vec<(Table, Vec<u8>)> {
        std::mem::take(&mut *self.lookups.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn serve_lookups(stream: TcpStream, table: Table, lookups: &Mutex<Lookups>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request = line.strip_suffix(b"\n").unwrap_or(&line);
        if let Some(key) = request.strip_prefix(b"get ") {
            lookups
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((table, hex_unquote(key)));
        }
        if writer.write_all(b"500 not-found\n").is_err() {
            return;
        }
    }
}

/// tcp_table(5)'s `%XX` quoting undone.
fn hex_unquote(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' && i + 2 < text.len() {
            if let Ok(byte) = u8::from_str_radix(&String::from_utf8_lossy(&text[i + 1..i + 3]), 16)
            {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

// -- Postfix's reading -------------------------------------------------------

/// C `isspace` in the "C" locale, as Postfix's `ISSPACE`.
fn c_isspace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The first token of a command line as Postfix's `smtpd_token()` cuts
/// it (smtpd/smtpd_token.c): C-space separated, `<…>` and `"…"` whole
/// (with `\` escapes), `TO:`/`FROM:` ending a token.
fn postfix_first_token(line: &[u8]) -> Vec<u8> {
    let line = line.split(|&b| b == 0).next().unwrap_or_default();
    let mut token = Vec::new();
    let mut i = 0;
    while i < line.len() {
        let c = line[i];
        i += 1;
        if c_isspace(c) {
            while i < line.len() && c_isspace(line[i]) {
                i += 1;
            }
            if !token.is_empty() {
                break;
            }
        } else if c == b'<' {
            i = postfix_quoted(line, i, &mut token, c, b'>');
        } else if c == b'"' {
            i = postfix_quoted(line, i, &mut token, c, c);
        } else if c == b':' {
            token.push(c);
            if token.eq_ignore_ascii_case(b"to:") || token.eq_ignore_ascii_case(b"from:") {
                break;
            }
        } else {
            if c == b'\\' {
                token.push(c);
                if i >= line.len() {
                    break;
                }
                token.push(line[i]);
                i += 1;
                continue;
            }
            token.push(c);
        }
    }
    token
}

/// `smtp_quoted()` of smtpd_token.c: a quoted or bracketed run, nested.
fn postfix_quoted(line: &[u8], mut i: usize, token: &mut Vec<u8>, start: u8, last: u8) -> usize {
    let mut stack = vec![last];
    token.push(start);
    while i < line.len() {
        let c = line[i];
        i += 1;
        token.push(c);
        let wanted = *stack.last().unwrap_or(&last);
        if c == b'\\' {
            if i >= line.len() {
                break;
            }
            token.push(line[i]);
            i += 1;
        } else if c == wanted {
            if stack.len() == 1 {
                return i;
            }
            stack.pop();
        } else if c == b'"' {
            stack.push(b'"');
        } else if c == b'<' && wanted == b'>' {
            stack.push(b'>');
        }
    }
    i
}

/// Postfix's verb for a line it received: the first token in upper case.
fn postfix_word(line: &[u8]) -> String {
    String::from_utf8_lossy(&postfix_first_token(line)).to_ascii_uppercase()
}

fn is_postfix_command(word: &str) -> bool {
    POSTFIX_COMMANDS.contains(&word)
}

// -- The proxy's reading -----------------------------------------------------

/// The proxy's verb word: its [`Verb`] name, or for a verb it does not know
/// the first word as it splits the line (SP/HTAB), in upper case (what
/// `smtp.relay_verbs` is matched against).
fn proxy_word(line: &[u8]) -> (Verb, String) {
    let verb = parse_command(line).verb;
    if verb != Verb::Unknown {
        return (verb, verb.as_str().to_owned());
    }
    let trimmed: Vec<u8> = line
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == b'\t')
        .take_while(|&b| b != b' ' && b != b'\t')
        .collect();
    (verb, String::from_utf8_lossy(&trimmed).to_ascii_uppercase())
}

/// An address normalised for comparison: source route dropped, local part
/// unquoted (quotes and `\` escapes removed), domain in lower case without
/// one trailing dot, `@MYORIGIN` when there is no domain.
fn normalise(address: &str) -> String {
    let mut address = address.trim();
    if address.starts_with('@') {
        if let Some(colon) = address.find(':') {
            address = &address[colon + 1..];
        }
    }
    let (local, domain) = if address.starts_with('"') {
        match quoted_end(address) {
            Some(end) => (
                &address[..end],
                address[end..].strip_prefix('@').unwrap_or(&address[end..]),
            ),
            None => (address, ""),
        }
    } else {
        match address.rfind('@') {
            Some(at) => (&address[..at], &address[at + 1..]),
            None => (address, ""),
        }
    };
    // Postfix folds its lookup keys to lower case, local part included.
    let local = unquote(local).to_lowercase();
    // trivial-rewrite makes an empty local part MAILER-DAEMON
    // (`empty_address_recipient`).
    let local = if local.is_empty() {
        "mailer-daemon".to_owned()
    } else {
        local
    };
    let domain = domain.to_ascii_lowercase();
    let domain = domain.strip_suffix('.').unwrap_or(&domain);
    let domain = if domain.is_empty() { MYORIGIN } else { domain };
    format!("{local}@{domain}")
}

fn quoted_end(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn unquote(local: &str) -> String {
    let mut out = String::new();
    let mut chars = local.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {}
            '\\' => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The domain of a normalised address.
fn domain_of(normalised: &str) -> &str {
    normalised.rsplit_once('@').map_or("", |(_, d)| d)
}

fn helo_rejected(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    name == "evil.test" || name.ends_with(".evil.test")
}

// -- Running the cases -------------------------------------------------------

/// One reply: its code (0 when it has none) and its text.
#[derive(Debug, Clone)]
struct Reply {
    code: u16,
    text: String,
}

impl Reply {
    fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// `550 5.7.1` or the code alone: the bucket of a refusal.
    fn bucket(&self) -> String {
        let first = self.text.lines().next().unwrap_or("");
        let words: Vec<&str> = first.split_whitespace().take(4).collect();
        words.join(" ")
    }
}

/// A client session with the proxy, speaking raw bytes.
struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// A MAIL was accepted and no RSET/HELO since.
    transaction: bool,
    /// Recipients accepted in this transaction.
    recipients: usize,
}

impl Session {
    fn open(addr: SocketAddr) -> std::io::Result<Session> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut session = Session {
            reader: BufReader::new(stream),
            writer,
            transaction: false,
            recipients: 0,
        };
        let greeting = session.reply()?;
        if greeting.code != 220 {
            return Err(std::io::Error::other(format!("greeting {greeting:?}")));
        }
        session.hello()?;
        Ok(session)
    }

    fn hello(&mut self) -> std::io::Result<()> {
        let reply = self.command(format!("EHLO {CLIENT_HELO}").as_bytes())?;
        if reply.code != 250 {
            return Err(std::io::Error::other(format!("EHLO: {reply:?}")));
        }
        self.transaction = false;
        self.recipients = 0;
        Ok(())
    }

    fn command(&mut self, line: &[u8]) -> std::io::Result<Reply> {
        let mut bytes = line.to_vec();
        bytes.extend_from_slice(b"\r\n");
        self.writer.write_all(&bytes)?;
        self.reply()
    }

    fn reply(&mut self) -> std::io::Result<Reply> {
        let mut text = String::new();
        let mut code = 0;
        loop {
            let mut line = Vec::new();
            if self.reader.read_until(b'\n', &mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("closed after {text:?}"),
                ));
            }
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if code == 0 {
                code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
            let last = line.len() < 4 || line.as_bytes()[3] != b'-';
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&line);
            if last {
                return Ok(Reply { code, text });
            }
        }
    }

    /// Puts the session in the state a case needs.
    fn prepare(&mut self, needs: Needs) -> std::io::Result<()> {
        match needs {
            Needs::Anything => {}
            Needs::NoTransaction => {
                if self.transaction {
                    self.reset()?;
                }
            }
            Needs::Transaction => {
                if self.transaction && self.recipients >= RCPTS_PER_TRANSACTION {
                    self.reset()?;
                }
                if !self.transaction {
                    let reply = self.command(format!("MAIL FROM:<{SETUP_SENDER}>").as_bytes())?;
                    if reply.code != 250 {
                        return Err(std::io::Error::other(format!("setup MAIL: {reply:?}")));
                    }
                    self.transaction = true;
                    self.recipients = 0;
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        let reply = self.command(b"RSET")?;
        if reply.code != 250 {
            return Err(std::io::Error::other(format!("RSET: {reply:?}")));
        }
        self.transaction = false;
        self.recipients = 0;
        Ok(())
    }
}

/// The state a case runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    Anything,
    NoTransaction,
    Transaction,
}

/// One generated command line.
#[derive(Debug, Clone)]
struct Case {
    /// What the generator meant to make (`rcpt/route`, `mail/null`, …).
    kind: &'static str,
    line: Vec<u8>,
    needs: Needs,
}

/// One disagreement.
struct Mismatch {
    class: &'static str,
    kind: &'static str,
    line: Vec<u8>,
    postfix: String,
    proxy: String,
    reply: String,
}

#[derive(Default)]
struct Report {
    generated: usize,
    sessions: usize,
    time_bound: bool,
    /// Lines Postfix received, by Postfix's verb.
    relayed: BTreeMap<String, usize>,
    /// Lines the proxy answered itself, by its reply.
    answered_by_proxy: BTreeMap<String, usize>,
    /// Relayed MAIL/RCPT that Postfix refused before resolving an address,
    /// by Postfix's reply.
    postfix_refused_syntax: BTreeMap<String, (usize, Vec<String>)>,
    /// Generator kinds: cases, relayed.
    kinds: BTreeMap<&'static str, (usize, usize)>,
    null_senders_relayed: usize,
    /// Relayed senders whose routing syntax (`%`, `!`, quoted `@`, source
    /// route) the proxy noted, read by Postfix as routed elsewhere.
    routed_senders: usize,
    /// RCPTs the proxy refused although Postfix, asked directly, reads a
    /// recipient in `relay.accept` and accepts it: by generator kind, and
    /// the first few (collateral damage, not a failure).
    over_refused: BTreeMap<&'static str, usize>,
    over_refused_examples: Vec<String>,
    foreign_rcpt_refused: usize,
    mismatches: Vec<Mismatch>,
    mismatch_counts: BTreeMap<&'static str, usize>,
    /// Mismatches by class and generator kind.
    mismatch_kinds: BTreeMap<(&'static str, &'static str), usize>,
    setup_failures: Vec<String>,
    /// Cases that took long (the time bound is for the whole run).
    slow: Vec<(Duration, String)>,
}

impl Report {
    fn mismatch_total(&self) -> usize {
        self.mismatch_counts.values().sum()
    }

    fn render(&self, seed: u64, elapsed: Duration) -> String {
        let mut out = String::new();
        let relayed: usize = self.relayed.values().sum();
        let answered: usize = self.answered_by_proxy.values().sum();
        let _ = writeln!(
            out,
            "\n== differential (seed {seed:#x}): {} cases in {:.1} s over {} sessions{}",
            self.generated,
            elapsed.as_secs_f64(),
            self.sessions,
            if self.time_bound {
                " (stopped by DIFF_SECONDS)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "relayed to Postfix: {relayed}; answered by the proxy: {answered}"
        );
        let _ = writeln!(out, "relayed, by Postfix's verb:");
        for (verb, n) in &self.relayed {
            let _ = writeln!(out, "  {n:6}  {verb:?}");
        }
        let _ = writeln!(out, "answered by the proxy, by reply:");
        let mut answered: Vec<_> = self.answered_by_proxy.iter().collect();
        answered.sort_by(|a, b| b.1.cmp(a.1));
        for (reply, n) in answered {
            let _ = writeln!(out, "  {n:6}  {reply}");
        }
        if !self.postfix_refused_syntax.is_empty() {
            let _ = writeln!(out, "relayed MAIL/RCPT that Postfix refused unresolved:");
            for (reply, (n, examples)) in &self.postfix_refused_syntax {
                let _ = writeln!(out, "  {n:6}  {reply}");
                for example in examples {
                    let _ = writeln!(out, "          {example}");
                }
            }
        }
        let _ = writeln!(
            out,
            "null senders relayed: {}; routed senders relayed, routing noted by the proxy: {}; foreign recipients refused by the proxy (550 5.7.1): {}",
            self.null_senders_relayed, self.routed_senders, self.foreign_rcpt_refused
        );
        let _ = writeln!(out, "generator kinds (cases / relayed):");
        for (kind, (n, r)) in &self.kinds {
            let _ = writeln!(out, "  {n:6} / {r:<6} {kind}");
        }
        let over: usize = self.over_refused.values().sum();
        let _ = writeln!(
            out,
            "refused by the proxy although Postfix alone reads a recipient in {ACCEPT_DOMAIN} (not a failure): {over}"
        );
        for (kind, n) in &self.over_refused {
            let _ = writeln!(out, "  {n:6}  {kind}");
        }
        for example in &self.over_refused_examples {
            let _ = writeln!(out, "          {example}");
        }
        if !self.slow.is_empty() {
            let total: Duration = self.slow.iter().map(|(d, _)| *d).sum();
            let _ = writeln!(
                out,
                "slow cases (> 200 ms): {} taking {:.1} s",
                self.slow.len(),
                total.as_secs_f64()
            );
            for (took, line) in self.slow.iter().take(10) {
                let _ = writeln!(out, "  {:.2} s  {line}", took.as_secs_f64());
            }
        }
        for failure in &self.setup_failures {
            let _ = writeln!(out, "session setup failed: {failure}");
        }
        if self.mismatch_counts.is_empty() {
            let _ = writeln!(out, "mismatches: none");
            return out;
        }
        let _ = writeln!(out, "mismatches: {}", self.mismatch_total());
        for (class, n) in &self.mismatch_counts {
            let _ = writeln!(out, "  {n:6}  {class}");
            for ((c, kind), k) in &self.mismatch_kinds {
                if c == class {
                    let _ = writeln!(out, "          {k:6} from {kind}");
                }
            }
        }
        let _ = writeln!(out, "\nmismatch list (first {PRINT_PER_CLASS} per class):");
        for m in &self.mismatches {
            let _ = writeln!(
                out,
                "[{}] ({}) {}\n    postfix: {}\n    proxy:   {}\n    reply:   {}",
                m.class,
                m.kind,
                escape(&m.line),
                m.postfix,
                m.proxy,
                m.reply.replace('\n', " | ")
            );
        }
        out
    }
}

fn escape(bytes: &[u8]) -> String {
    let shown = if bytes.len() > 200 {
        &bytes[..200]
    } else {
        bytes
    };
    let mut out = String::from("b\"");
    for &b in shown {
        out.extend(std::ascii::escape_default(b).map(char::from));
    }
    out.push('"');
    if bytes.len() > 200 {
        let _ = write!(out, "…({} bytes)", bytes.len());
    }
    out
}

struct Run<'a> {
    addr: SocketAddr,
    /// Postfix itself, for its reading of lines the proxy refused.
    postfix: SocketAddr,
    direct: Option<Session>,
    oracle: &'a Oracle,
    session: Option<Session>,
    report: Report,
    /// The last line read as a HELO by either side (a HELO name may reach
    /// Postfix later, when the proxy replays it).
    last_helo: Option<Case>,
}

impl<'a> Run<'a> {
    fn new(addr: SocketAddr, postfix: SocketAddr, oracle: &'a Oracle) -> Self {
        Run {
            addr,
            postfix,
            direct: None,
            oracle,
            session: None,
            report: Report::default(),
            last_helo: None,
        }
    }

    fn session(&mut self) -> Option<&mut Session> {
        if self.session.is_none() {
            for attempt in 0..3 {
                match Session::open(self.addr) {
                    Ok(s) => {
                        self.report.sessions += 1;
                        self.session = Some(s);
                        break;
                    }
                    Err(e) => {
                        if attempt == 2 {
                            self.report.setup_failures.push(format!("{e}"));
                        }
                        // A short pause before the next of three tries;
                        // no event says a retry would now succeed.
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        self.session.as_mut()
    }

    fn case(&mut self, case: &Case) {
        self.report.generated += 1;
        self.report.kinds.entry(case.kind).or_default().0 += 1;
        if self.session().is_none() {
            return;
        }
        let oracle = self.oracle;
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if let Err(e) = session.prepare(case.needs) {
            self.report
                .setup_failures
                .push(format!("before {}: {e}", escape(&case.line)));
            self.session = None;
            // The setup's own lookups go with it.
            let _ = self.oracle.drain();
            return;
        }
        let result = {
            let setup = oracle.drain();
            let result = session.command(&case.line);
            self.check_helo_lookups(&setup, None);
            result
        };
        let lookups = self.oracle.drain();
        let reply = match result {
            Ok(reply) => reply,
            Err(e) => {
                self.session = None;
                let timed_out = matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
                if timed_out {
                    self.mismatch(
                        "no-reply",
                        case,
                        "-".into(),
                        "-".into(),
                        format!("no reply within {REPLY_TIMEOUT:?}"),
                    );
                }
                Reply {
                    code: 0,
                    text: format!("(connection: {e})"),
                }
            }
        };
        self.judge(case, &reply, &lookups);
        if reply.code >= 500 && seen_line(case, &lookups).is_none() {
            self.ask_postfix(case, &reply);
        }
        // The session's state after the case.
        let closing = reply.code == 421 || reply.code == 221 || reply.code == 0;
        if reply.code == 354 && pverb_of(case) != Verb::Data {
            self.mismatch(
                "data-at-backend",
                case,
                "354: Postfix is reading a message".into(),
                format!("{:?}", proxy_word(&case.line).1),
                reply.text.clone(),
            );
        }
        if closing || reply.code == 354 {
            self.session = None;
            let _ = self.oracle.drain();
            return;
        }
        let (pverb, _) = proxy_word(&case.line);
        let seen_word = seen_line(case, &lookups).map(|l| postfix_word(&l));
        let helo_like = matches!(pverb, Verb::Helo | Verb::Ehlo)
            || seen_word
                .as_deref()
                .is_some_and(|w| w == "HELO" || w == "EHLO" || w == "XCLIENT");
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if helo_like {
            if session.hello().is_err() {
                self.session = None;
            }
        } else if case.needs == Needs::Transaction && reply.is_positive() {
            session.recipients += 1;
        } else if case.needs != Needs::Transaction {
            // Anything else may have started or ended a transaction on
            // either side: start from a clean one.
            if session.reset().is_err() {
                self.session = None;
            }
        }
        let after = self.oracle.drain();
        self.check_helo_lookups(&after, None);
    }

    /// For a RCPT the proxy refused: Postfix's own reading of the line,
    /// asked directly. A recipient Postfix reads in `relay.accept` and
    /// accepts was refused for nothing (counted, not a failure).
    fn ask_postfix(&mut self, case: &Case, proxy_reply: &Reply) {
        let rcpt_like =
            proxy_word(&case.line).0 == Verb::Rcpt || postfix_word(&case.line) == "RCPT";
        if !rcpt_like || case.line.contains(&0) {
            return;
        }
        let _ = self.oracle.drain();
        if self.direct.is_none() {
            self.direct = Session::open(self.postfix).ok();
        }
        let Some(direct) = self.direct.as_mut() else {
            return;
        };
        let result = direct.prepare(Needs::Transaction).and_then(|()| {
            let _ = self.oracle.drain();
            direct.command(&case.line)
        });
        let lookups = self.oracle.drain();
        let reply = match result {
            Ok(reply) if ![0, 221, 354, 421].contains(&reply.code) => reply,
            _ => {
                self.direct = None;
                return;
            }
        };
        if reply.is_positive() {
            direct.recipients += 1;
        }
        let key = lookups
            .iter()
            .find(|(t, _)| *t == Table::Recipient)
            .map(|(_, k)| String::from_utf8_lossy(k).into_owned());
        if let Some(key) = key {
            if reply.is_positive() && domain_of(&normalise(&key)) == ACCEPT_DOMAIN {
                *self.report.over_refused.entry(case.kind).or_default() += 1;
                if self.report.over_refused_examples.len() < 12 {
                    self.report.over_refused_examples.push(format!(
                        "{}: Postfix reads {key:?}; the proxy said {}",
                        escape(&case.line),
                        proxy_reply.bucket()
                    ));
                }
            }
        }
    }

    /// HELO names Postfix got outside a HELO case (replays by the proxy).
    fn check_helo_lookups(&mut self, lookups: &[(Table, Vec<u8>)], case: Option<&Case>) {
        for (table, key) in lookups {
            if *table != Table::Helo {
                continue;
            }
            let name = String::from_utf8_lossy(key).into_owned();
            if name.eq_ignore_ascii_case(CLIENT_HELO) || !helo_rejected(&name) {
                continue;
            }
            // Postfix keeps every word of `HELO a b` (and looks up the
            // parent domains of the whole): apart, as the fix may differ.
            let class = if name.trim().contains(|c: char| c.is_ascii_whitespace()) {
                "helo-words"
            } else {
                "helo-reject-bypass"
            };
            let blamed = case.cloned().or_else(|| self.last_helo.clone());
            if let Some(blamed) = blamed {
                self.mismatch(
                    class,
                    &blamed,
                    format!("HELO name {name:?} (matches lists.reject_helo)"),
                    "relayed it: not a rejected name".into(),
                    "-".into(),
                );
            }
        }
    }

    fn judge(&mut self, case: &Case, reply: &Reply, lookups: &[(Table, Vec<u8>)]) {
        let (pverb, pword) = proxy_word(&case.line);
        let received = seen_line(case, lookups);
        if matches!(pverb, Verb::Helo | Verb::Ehlo)
            || received
                .as_deref()
                .is_some_and(|l| matches!(postfix_word(l).as_str(), "HELO" | "EHLO"))
        {
            self.last_helo = Some(case.clone());
        }
        let Some(received) = received else {
            *self
                .report
                .answered_by_proxy
                .entry(reply.bucket())
                .or_default() += 1;
            if reply.text.contains("5.7.1 Relay access denied") {
                self.report.foreign_rcpt_refused += 1;
            }
            return;
        };
        self.report.kinds.entry(case.kind).or_default().1 += 1;
        let word = postfix_word(&received);
        *self.report.relayed.entry(word.clone()).or_default() += 1;
        let first = |table: Table| {
            lookups
                .iter()
                .find(|(t, _)| *t == table)
                .map(|(_, k)| String::from_utf8_lossy(k).into_owned())
        };
        let proxy_reading = format!("verb {pword:?}");

        // 2: a verdict of the proxy's own, yet the line reached Postfix.
        if reply.text.contains("Relay access denied") {
            self.mismatch(
                "refused-but-relayed",
                case,
                format!("received {}", escape(&received)),
                "refused it (550 5.7.1 Relay access denied)".into(),
                reply.text.clone(),
            );
        }
        // 5: VRFY/EXPN.
        if matches!(word.as_str(), "VRFY" | "EXPN") || matches!(pverb, Verb::Vrfy | Verb::Expn) {
            self.mismatch(
                "vrfy-relayed",
                case,
                format!("verb {word:?}, answered {}", reply.code),
                proxy_reading.clone(),
                reply.text.clone(),
            );
        }
        // 3: the verb.
        if word != pword && (is_postfix_command(&word) || pverb != Verb::Unknown) {
            self.mismatch(
                "verb",
                case,
                format!("verb {word:?} (line received: {})", escape(&received)),
                proxy_reading.clone(),
                reply.text.clone(),
            );
        }
        let args = parse_command(&case.line).args;
        match word.as_str() {
            "RCPT" => {
                let Some(key) = first(Table::Recipient) else {
                    self.postfix_refused(&format!("RCPT: {}", reply.bucket()), case, &received);
                    if reply.is_positive() {
                        self.mismatch(
                            "open-relay",
                            case,
                            "accepted a recipient it did not look up".into(),
                            proxy_reading,
                            reply.text.clone(),
                        );
                    }
                    return;
                };
                let postfix_addr = normalise(&key);
                // 1: accepted for a domain outside relay.accept.
                if reply.is_positive() && domain_of(&postfix_addr) != ACCEPT_DOMAIN {
                    self.mismatch(
                        "open-relay",
                        case,
                        format!(
                            "recipient {key:?} (routes to {:?}), accepted",
                            domain_of(&postfix_addr)
                        ),
                        proxy_rcpt_reading(pverb, &args),
                        reply.text.clone(),
                    );
                }
                let proxy = match (pverb, parse_rcpt_to(&args)) {
                    (Verb::Rcpt, Ok(rcpt)) => Some(normalise(&rcpt.canonical)),
                    _ => None,
                };
                if proxy.as_deref() != Some(postfix_addr.as_str()) {
                    self.mismatch(
                        "rcpt-address",
                        case,
                        format!("recipient {key:?} = {postfix_addr:?}"),
                        proxy_rcpt_reading(pverb, &args),
                        reply.text.clone(),
                    );
                }
            }
            "MAIL" => {
                let Some(key) = first(Table::Sender) else {
                    self.postfix_refused(&format!("MAIL: {}", reply.bucket()), case, &received);
                    return;
                };
                let postfix_null = key == "<>";
                let mail = match (pverb, parse_mail_from(&args)) {
                    (Verb::Mail, Ok(mail)) => Some(mail),
                    _ => None,
                };
                // The proxy's sender: its canonical form, `Some(None)` for
                // the null sender.
                let proxy = mail
                    .as_ref()
                    .map(|m| m.sender.as_ref().and(m.canonical.clone()));
                let routed = mail.as_ref().and_then(|m| m.second_route);
                let proxy_text = match &proxy {
                    Some(None) => "null sender <>".to_owned(),
                    Some(Some(s)) => format!(
                        "sender canonical {s:?} = {:?}{}",
                        normalise(s),
                        routed.map_or(String::new(), |r| format!(
                            ", routing syntax {:?} noted",
                            r.as_str()
                        ))
                    ),
                    None => format!("{proxy_reading}, no sender"),
                };
                if postfix_null {
                    self.report.null_senders_relayed += 1;
                }
                let proxy_null = matches!(proxy, Some(None));
                if postfix_null != proxy_null {
                    // 4: the null-sender count.
                    self.mismatch(
                        "null-sender",
                        case,
                        format!("sender {key:?}"),
                        proxy_text,
                        reply.text.clone(),
                    );
                } else if !postfix_null {
                    let postfix_addr = normalise(&key);
                    let proxy_addr = proxy.flatten().map(|s| normalise(&s));
                    if proxy_addr.as_deref() == Some(postfix_addr.as_str()) {
                    } else if routed.is_some() {
                        // The proxy saw the routing syntax and lets senders
                        // through with it by design (it judges recipients,
                        // not where bounces go): noted, not a mismatch.
                        self.report.routed_senders += 1;
                    } else {
                        self.mismatch(
                            "sender-address",
                            case,
                            format!("sender {key:?} = {postfix_addr:?}"),
                            proxy_text,
                            reply.text.clone(),
                        );
                    }
                }
            }
            "HELO" | "EHLO" => self.check_helo_lookups(lookups, Some(case)),
            _ => {}
        }
    }

    /// A relayed MAIL/RCPT that Postfix refused before resolving an address
    /// (the proxy accepted a syntax Postfix does not): counted, a few kept.
    fn postfix_refused(&mut self, bucket: &str, case: &Case, received: &[u8]) {
        let entry = self
            .report
            .postfix_refused_syntax
            .entry(bucket.to_owned())
            .or_default();
        entry.0 += 1;
        if entry.1.len() < 3 {
            entry.1.push(format!(
                "{} relayed as {}",
                escape(&case.line),
                escape(received)
            ));
        }
    }

    fn mismatch(
        &mut self,
        class: &'static str,
        case: &Case,
        postfix: String,
        proxy: String,
        reply: String,
    ) {
        let n = self.report.mismatch_counts.entry(class).or_default();
        *n += 1;
        *self
            .report
            .mismatch_kinds
            .entry((class, case.kind))
            .or_default() += 1;
        if *n <= PRINT_PER_CLASS {
            self.report.mismatches.push(Mismatch {
                class,
                kind: case.kind,
                line: case.line.clone(),
                postfix,
                proxy,
                reply,
            });
        }
    }

    /// Ends the sessions, then checks the HELO names Postfix looked up
    /// after the last case, once every Postfix session has ended (as many
    /// `disconnect from` as `connect from` lines in its log): a session
    /// makes no lookup after its end.
    fn finish(&mut self, postfix: &Postfix) {
        if let Some(mut session) = self.session.take() {
            let _ = session.command(b"QUIT");
        }
        self.direct = None;
        let ended = wait_until(postfix::LOG_WAIT, || {
            let log = postfix.log();
            log_lines(&log, "]: connect from ").len()
                == log_lines(&log, "]: disconnect from ").len()
        });
        if !ended {
            self.report.setup_failures.push(format!(
                "Postfix's sessions had not all ended {:?} after the last case",
                postfix::LOG_WAIT
            ));
        }
        let rest = self.oracle.drain();
        self.check_helo_lookups(&rest, None);
    }
}

fn pverb_of(case: &Case) -> Verb {
    proxy_word(&case.line).0
}

fn proxy_rcpt_reading(verb: Verb, args: &str) -> String {
    match (verb, parse_rcpt_to(args)) {
        (Verb::Rcpt, Ok(rcpt)) => format!(
            "recipient {:?}, canonical {:?} = {:?}, relayed as in relay.accept",
            rcpt.recipient,
            rcpt.canonical,
            normalise(&rcpt.canonical)
        ),
        (Verb::Rcpt, Err(e)) => format!("RCPT it cannot parse ({e}), relayed"),
        (verb, _) => format!("verb {:?}, relayed unjudged", verb.as_str()),
    }
}

/// The line Postfix received for this case, if it received it: the
/// command-filter key equal to the line (leading SP/HTAB stripped, cut at
/// a NUL and at Postfix's line limit), else any other key that is not one
/// of the proxy's own commands (then the proxy changed the line).
fn seen_line(case: &Case, lookups: &[(Table, Vec<u8>)]) -> Option<Vec<u8>> {
    let stripped: Vec<u8> = case
        .line
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == b'\t')
        .take_while(|&b| b != 0)
        .collect();
    let commands = lookups.iter().filter(|(t, _)| *t == Table::Command);
    let own = |key: &[u8]| {
        key == b"RSET"
            || key == b"QUIT"
            || key.eq_ignore_ascii_case(format!("EHLO {CLIENT_HELO}").as_bytes())
            || key.eq_ignore_ascii_case(format!("HELO {CLIENT_HELO}").as_bytes())
            || key.starts_with(b"XCLIENT ")
            || key.starts_with(b"XFORWARD ")
    };
    let mut other = None;
    for (_, key) in commands {
        let same =
            key == &stripped || (key.len() >= POSTFIX_LINE_LIMIT - 2 && stripped.starts_with(key));
        if same {
            return Some(key.clone());
        }
        if other.is_none() && !own(key) {
            other = Some(key.clone());
        }
    }
    other
}

// -- The generator -----------------------------------------------------------

/// xorshift64*: small, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    /// True with probability `percent`/100.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.below(items.len())]
    }
}

/// Bytes that are not plain text: every control byte but LF (which ends a
/// line for everyone), DEL, and some 8-bit bytes (C1, NBSP, lone UTF-8
/// lead and continuation bytes, 0xFF).
fn odd_bytes() -> Vec<u8> {
    let mut bytes: Vec<u8> = (0u8..=0x20).filter(|&b| b != b'\n').collect();
    bytes.extend_from_slice(&[0x7f, 0x80, 0x85, 0xa0, 0xc0, 0xc3, 0xe2, 0xef, 0xfe, 0xff]);
    bytes
}

struct Generator {
    rng: Rng,
    odd: Vec<u8>,
}

impl Generator {
    fn new(seed: u64) -> Self {
        Generator {
            rng: Rng::new(seed),
            odd: odd_bytes(),
        }
    }

    fn case(&mut self) -> Case {
        let roll = self.rng.below(100);
        let mut case = match roll {
            0..=41 => self.rcpt(),
            42..=61 => self.mail(),
            62..=69 => self.vrfy(),
            70..=79 => self.helo(),
            80..=93 => self.other(),
            _ => self.mutant(),
        };
        // Now and then one odd byte anywhere.
        if self.rng.chance(8) && !case.line.is_empty() {
            let at = self.rng.below(case.line.len() + 1);
            let b = *self.rng.pick(&self.odd);
            case.line.insert(at, b);
        }
        case
    }

    /// A verb as a client might spell it: upper, lower or mixed case.
    fn verb(&mut self, verb: &str) -> Vec<u8> {
        match self.rng.below(10) {
            0..=5 => verb.as_bytes().to_vec(),
            6 => verb.to_ascii_lowercase().into_bytes(),
            _ => verb
                .bytes()
                .map(|b| {
                    if self.rng.chance(50) {
                        b.to_ascii_lowercase()
                    } else {
                        b
                    }
                })
                .collect(),
        }
    }

    /// What separates a verb from its arguments.
    fn sep(&mut self) -> Vec<u8> {
        match self.rng.below(20) {
            0..=11 => b" ".to_vec(),
            12 => b"\t".to_vec(),
            13 => b"  ".to_vec(),
            14 => b" \t ".to_vec(),
            15 => Vec::new(),
            _ => {
                let mut s = Vec::new();
                if self.rng.chance(30) {
                    s.push(b' ');
                }
                s.push(*self.rng.pick(&self.odd));
                if self.rng.chance(30) {
                    s.push(b' ');
                }
                s
            }
        }
    }

    /// `TO:`/`FROM:` as spelled, with odd spacing now and then.
    fn keyword(&mut self, kw: &str) -> Vec<u8> {
        let word = &kw[..kw.len() - 1];
        let mut out = self.verb(word);
        match self.rng.below(20) {
            0 => out.extend_from_slice(b" :"),
            1 => {
                let b = *self.rng.pick(&self.odd);
                out.push(b);
                out.push(b':');
            }
            2 => {} // no colon
            3 => out.extend_from_slice(b"::"),
            _ => out.push(b':'),
        }
        match self.rng.below(12) {
            0 => out.push(b' '),
            1 => out.push(b'\t'),
            2 => out.push(*self.rng.pick(&self.odd)),
            3 => out.extend_from_slice(b"  "),
            _ => {}
        }
        out
    }

    fn atext(&mut self, len: usize) -> String {
        const ATEXT: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_+=";
        (0..len.max(1))
            .map(|_| char::from(*self.rng.pick(ATEXT)))
            .collect()
    }

    fn local_part(&mut self) -> (&'static str, Vec<u8>) {
        let plain = ["alice", "bob", "Alice", "postmaster", "u"];
        let (kind, text): (&'static str, String) = match self.rng.below(30) {
            0..=7 => ("plain", (*self.rng.pick(&plain)).to_owned()),
            8..=9 => {
                let len = 1 + self.rng.below(12);
                ("plain", self.atext(len))
            }
            10 => ("percent", "u%evil.com".into()),
            11 => ("percent", "u%evil.com%example.com".into()),
            12 => ("bang", "evil.com!u".into()),
            13 => ("bang", "a!b!u".into()),
            14 => ("quoted-at", "\"u@evil.com\"".into()),
            15 => ("quoted-at", "\"u@evil.com\\\"\"".into()),
            16 => ("quoted", "\"alice\"".into()),
            17 => ("quoted", "\"a b\"".into()),
            18 => ("quoted", "\"\"".into()),
            19 => ("quoted", "\"al\\ice\"".into()),
            20 => ("escaped-at", "u\\@evil.com".into()),
            21 => ("comment", "alice(comment)".into()),
            22 => ("comment", "(c)alice".into()),
            23 => ("quoted-percent", "\"u%evil.com\"".into()),
            24 => ("dots", ".alice.".into()),
            25 => (
                "quoted-route",
                (*self
                    .rng
                    .pick(&["\"@evil.com:u\"", "\"@a.example:u@evil.com\"", "\"@x:u\""]))
                .to_owned(),
            ),
            26 => ("bang", "\"evil.com!u\"".into()),
            27 => ("at-in-local", "u@evil.com".into()),
            _ => {
                let len = 1 + self.rng.below(6);
                let mut text = self.atext(len).into_bytes();
                let at = self.rng.below(text.len() + 1);
                let b = *self.rng.pick(&self.odd);
                text.insert(at, b);
                return ("odd-byte", text);
            }
        };
        (kind, text.into_bytes())
    }

    fn domain(&mut self) -> (&'static str, Vec<u8>) {
        let (kind, text): (&'static str, &str) = match self.rng.below(28) {
            0..=7 => ("ours", "example.com"),
            8 => ("ours-case", "EXAMPLE.COM"),
            9 => ("ours-case", "Example.Com"),
            10 => ("ours-dot", "example.com."),
            11 => ("ours-dot", "EXAMPLE.com."),
            12 => ("ours-dots", "example.com.."),
            13..=15 => ("foreign", "evil.com"),
            16 => ("foreign-dot", "evil.com."),
            17 => ("foreign", "example.com.evil.com"),
            18 => ("foreign", "sub.example.com"),
            19 => ("literal", "[127.0.0.1]"),
            20 => ("literal", "[IPv6:::1]"),
            21 => ("myhostname", "mx.example.test"),
            22 => ("foreign", "localhost"),
            23 => ("comment", "example.com(c)"),
            24 => ("comment", "(c)example.com"),
            25 => ("blank", "example .com"),
            26 => ("percent", "evil.com%example.com"),
            _ => ("none", ""),
        };
        (kind, text.as_bytes().to_vec())
    }

    /// An address (no brackets) and the kind of trick in it.
    fn address(&mut self) -> (&'static str, Vec<u8>) {
        let (lkind, local) = self.local_part();
        let (dkind, domain) = self.domain();
        let mut out = Vec::new();
        let mut kind = if lkind == "plain" { dkind } else { lkind };
        if self.rng.chance(12) {
            let routes: [&[u8]; 4] = [
                b"@evil.com:",
                b"@example.com:",
                b"@a.example,@evil.com:",
                b"@EXAMPLE.COM.:",
            ];
            let route = *self.rng.pick(&routes);
            out.extend_from_slice(route);
            kind = "route";
        }
        out.extend_from_slice(&local);
        if !domain.is_empty() {
            out.push(b'@');
            out.extend_from_slice(&domain);
        }
        if self.rng.chance(3) {
            // Long: around the proxy's 512-byte line limit, or past
            // Postfix's 2048.
            let target = *self.rng.pick(&[480usize, 500, 505, 510, 600, 2100]);
            let pad = target.saturating_sub(out.len());
            let mut long = vec![b'a'; pad];
            long.extend_from_slice(&out);
            out = long;
            kind = "long";
        }
        (kind, out)
    }

    /// The path as written: brackets (or not), blanks, comments.
    fn bracket(&mut self, address: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        match self.rng.below(24) {
            0..=15 => {
                out.push(b'<');
                out.extend_from_slice(address);
                out.push(b'>');
            }
            16 => out.extend_from_slice(address),
            17 => {
                out.extend_from_slice(b"< ");
                out.extend_from_slice(address);
                out.extend_from_slice(b" >");
            }
            18 => {
                out.extend_from_slice(b"<<");
                out.extend_from_slice(address);
                out.extend_from_slice(b">>");
            }
            19 => {
                out.extend_from_slice(b"(c)<");
                out.extend_from_slice(address);
                out.push(b'>');
            }
            20 => {
                out.push(b'<');
                out.extend_from_slice(address);
                out.extend_from_slice(b"> (c)");
            }
            21 => {
                out.extend_from_slice(b"<\"");
                out.extend_from_slice(address);
                out.extend_from_slice(b"\">");
            }
            22 => {
                out.push(b'<');
                out.extend_from_slice(address);
                out.push(b'>');
                out.extend_from_slice(b"<x@evil.com>");
            }
            _ => {
                out.push(b'<');
                out.extend_from_slice(address);
                out.push(*self.rng.pick(&self.odd));
                out.push(b'>');
            }
        }
        out
    }

    fn params(&mut self, mail: bool) -> Vec<u8> {
        if self.rng.chance(80) {
            return Vec::new();
        }
        let choices: &[&[u8]] = if mail {
            &[
                b" SIZE=100",
                b" BODY=8BITMIME",
                b" SMTPUTF8",
                b" RET=HDRS ENVID=x",
                b" X=\"a b\"",
                b"SIZE=1",
                b" <x@evil.com>",
            ]
        } else {
            &[
                b" NOTIFY=NEVER",
                b" ORCPT=rfc822;u@evil.com",
                b" X=\"a b\"",
                b"NOTIFY=NEVER",
                b" <x@evil.com>",
                b" FOO",
            ]
        };
        let mut out = self.rng.pick(choices).to_vec();
        if self.rng.chance(20) {
            out[0] = *self.rng.pick(&self.odd);
        }
        out
    }

    fn rcpt(&mut self) -> Case {
        let (kind, address) = self.address();
        let mut line = self.verb("RCPT");
        line.extend(self.sep());
        line.extend(self.keyword("TO:"));
        line.extend(self.bracket(&address));
        line.extend(self.params(false));
        Case {
            kind: rcpt_kind(kind),
            line,
            needs: Needs::Transaction,
        }
    }

    fn mail(&mut self) -> Case {
        let (kind, path): (&'static str, Vec<u8>) = if self.rng.chance(45) {
            let nulls: [&[u8]; 16] = [
                b"<>",
                b"< >",
                b"<\"\">",
                b"<\"\" >",
                b"<(x)>",
                b"<@example.com:>",
                b"< \t>",
                b"<\\>",
                b"\"\"",
                b"",
                b"<<>>",
                b"<\"\"@example.com>",
                b"<\x0b>",
                b"<@:>",
                b"<\"\\\"\">",
                b"<@evil.com:\"\">",
            ];
            ("mail/null", self.rng.pick(&nulls).to_vec())
        } else {
            let (kind, address) = self.address();
            (mail_kind(kind), self.bracket(&address))
        };
        let mut line = self.verb("MAIL");
        line.extend(self.sep());
        line.extend(self.keyword("FROM:"));
        line.extend(path);
        line.extend(self.params(true));
        Case {
            kind,
            line,
            needs: Needs::NoTransaction,
        }
    }

    fn vrfy(&mut self) -> Case {
        let verb = if self.rng.chance(70) { "VRFY" } else { "EXPN" };
        let mut line = self.verb(verb);
        line.extend(self.sep());
        let (_, address) = self.address();
        if self.rng.chance(50) {
            line.extend(self.bracket(&address));
        } else {
            line.extend(address);
        }
        Case {
            kind: "vrfy",
            line,
            needs: Needs::Anything,
        }
    }

    fn helo(&mut self) -> Case {
        let verb = if self.rng.chance(50) { "EHLO" } else { "HELO" };
        let names: [&[u8]; 14] = [
            b"x.evil.test",
            b"X.EVIL.TEST",
            b"x.evil.test.",
            b"evil.test",
            b"Evil.Test.",
            b"ok.example x.evil.test",
            b"\"x.evil.test\"",
            b"<x.evil.test>",
            b"[x.evil.test]",
            b"x.evil.test\x0b",
            b"x.evil.test(c)",
            b"x\\.evil.test",
            b"ok.example",
            b"x.evil.test..",
        ];
        let mut line = self.verb(verb);
        line.extend(self.sep());
        let name = *self.rng.pick(&names);
        line.extend_from_slice(name);
        Case {
            kind: "helo",
            line,
            needs: Needs::Anything,
        }
    }

    fn other(&mut self) -> Case {
        let verbs = [
            "NOOP", "RSET", "HELP", "ETRN", "DATA", "QUIT", "BDAT", "AUTH", "STARTTLS", "XCLIENT",
            "XFORWARD", "FOO", "MAIL", "RCPT", "VRFY", "HELO", "EHLO",
        ];
        let verb = *self.rng.pick(&verbs);
        let mut line = Vec::new();
        if self.rng.chance(25) {
            // Something before the verb.
            line.push(*self.rng.pick(&self.odd));
        }
        line.extend(self.verb(verb));
        // A separator that is not SP/HTAB: the classic confusion.
        let sep = *self.rng.pick(&self.odd);
        let arg: &[u8] = match verb {
            "MAIL" => b"FROM:<x@evil.com>",
            "RCPT" => b"TO:<x@evil.com>",
            "VRFY" => b"alice",
            "HELO" | "EHLO" => b"x.evil.test",
            "ETRN" => b"example.com",
            "BDAT" => b"10 LAST",
            "AUTH" => b"PLAIN AGFsaWNlAHNlY3JldA==",
            "XCLIENT" => b"ADDR=192.0.2.1",
            "XFORWARD" => b"ADDR=192.0.2.1",
            _ => b"",
        };
        if !arg.is_empty() || self.rng.chance(50) {
            line.push(sep);
        }
        line.extend_from_slice(arg);
        Case {
            kind: "verb-separator",
            line,
            needs: if verb == "RCPT" || verb == "DATA" || verb == "BDAT" {
                Needs::Transaction
            } else {
                Needs::Anything
            },
        }
    }

    /// A well-formed line with random bytes changed.
    fn mutant(&mut self) -> Case {
        let mut base = if self.rng.chance(50) {
            self.rcpt()
        } else {
            self.mail()
        };
        for _ in 0..1 + self.rng.below(3) {
            if base.line.is_empty() {
                break;
            }
            let at = self.rng.below(base.line.len());
            base.line[at] = match self.rng.below(3) {
                0 => *self.rng.pick(&self.odd),
                1 => *self.rng.pick(b"<>\"\\@%!:,()[] ."),
                _ => (self.rng.next() & 0xff) as u8,
            };
            if base.line[at] == b'\n' {
                base.line[at] = b' ';
            }
        }
        base.kind = if base.needs == Needs::Transaction {
            "rcpt/mutant"
        } else {
            "mail/mutant"
        };
        base
    }
}

fn rcpt_kind(kind: &str) -> &'static str {
    match kind {
        "plain" => "rcpt/plain",
        "ours" => "rcpt/ours",
        "ours-case" => "rcpt/domain-case",
        "ours-dot" | "ours-dots" => "rcpt/trailing-dot",
        "foreign" | "foreign-dot" => "rcpt/foreign",
        "literal" => "rcpt/literal",
        "myhostname" => "rcpt/myhostname",
        "comment" => "rcpt/comment",
        "blank" => "rcpt/blank",
        "percent" => "rcpt/percent",
        "bang" => "rcpt/bang",
        "quoted-at" => "rcpt/quoted-at",
        "quoted" => "rcpt/quoted",
        "escaped-at" => "rcpt/escaped-at",
        "quoted-percent" => "rcpt/quoted-percent",
        "dots" => "rcpt/dots",
        "quoted-route" => "rcpt/quoted-route",
        "at-in-local" => "rcpt/at-in-local",
        "route" => "rcpt/route",
        "long" => "rcpt/long",
        "odd-byte" => "rcpt/odd-byte",
        "none" => "rcpt/no-domain",
        _ => "rcpt/other",
    }
}

fn mail_kind(kind: &str) -> &'static str {
    match kind {
        "route" => "mail/route",
        "long" => "mail/long",
        "odd-byte" => "mail/odd-byte",
        "quoted" | "quoted-at" | "quoted-percent" | "quoted-route" => "mail/quoted",
        "none" => "mail/no-domain",
        _ => "mail/address",
    }
}

#[test]
fn postfix_tokeniser_mirror() {
    let cases: &[(&[u8], &str)] = &[
        (b"RCPT TO:<a@b>", "RCPT"),
        (b"RCPT\x0bTO:<a@b>", "RCPT"),
        (b"\x0c rcpt\tTO:<a@b>", "RCPT"),
        (b"MAIL<x y> FROM", "MAIL<X Y>"),
        (b"FROM:<a>", "FROM:"),
        (b"\"MAIL\" x", "\"MAIL\""),
        (b"MA\\IL x", "MA\\IL"),
        (b"DATA\x0b", "DATA"),
        (b"DATA\x00RCPT", "DATA"),
    ];
    for (line, want) in cases {
        assert_eq!(postfix_word(line), *want, "{}", escape(line));
    }
    assert_eq!(normalise("\"u\"@Example.COM."), "u@example.com");
    assert_eq!(normalise("@a,@b:u@d"), "u@d");
    assert_eq!(normalise("postmaster"), format!("postmaster@{MYORIGIN}"));
    assert_eq!(hex_unquote(b"a%20b%0B%"), b"a b\x0b%");
}
