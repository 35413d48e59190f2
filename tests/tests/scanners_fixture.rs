//! The rspamd and clamd fixtures work, without the product: verdicts of a
//! private rspamd over `/checkv2` (Content-Length and chunked bodies), and
//! of a private clamd over `INSTREAM` on TCP and its Unix socket.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use limiter_tests::clamd::{self, Clamd, ClamdOptions};
use limiter_tests::rspamd::{self, Rspamd};

const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@example.org>\r\n\
         To: Alice <alice@example.com>\r\n\
         Subject: {subject}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <fixture-test@example.org>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         {body}\r\n"
    )
    .into_bytes()
}

/// POSTs `message` to `/checkv2` with the envelope headers the proxy sends;
/// `chunked`: as `Transfer-Encoding: chunked` in a few chunks, without a
/// Content-Length. Returns the status line and the body of the reply.
fn checkv2(rspamd: &Rspamd, message: &[u8], chunked: bool) -> (String, String) {
    let mut stream = TcpStream::connect_timeout(&rspamd.address(), IO_TIMEOUT).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut head = format!(
        "POST /checkv2 HTTP/1.1\r\n\
         Host: {}\r\n\
         IP: 127.0.0.1\r\n\
         Helo: client.example.org\r\n\
         From: sender@example.org\r\n\
         Rcpt: alice@example.com\r\n\
         Queue-Id: FIXTURE1\r\n\
         Connection: close\r\n",
        rspamd.address()
    );
    if chunked {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
    } else {
        head.push_str(&format!("Content-Length: {}\r\n\r\n", message.len()));
    }
    stream.write_all(head.as_bytes()).unwrap();
    if chunked {
        for chunk in message.chunks(message.len().div_ceil(3).max(1)) {
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .unwrap();
            stream.write_all(chunk).unwrap();
            stream.write_all(b"\r\n").unwrap();
            stream.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        stream.write_all(b"0\r\n\r\n").unwrap();
    } else {
        stream.write_all(message).unwrap();
    }
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).expect("read the reply");
    let reply = String::from_utf8(reply).expect("a UTF-8 reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head.lines().next().unwrap_or("").to_owned();
    (status, body.to_owned())
}

/// The JSON object that is the value of `"key"` in `json` (the first one),
/// found by matching braces outside strings: rspamd's key order varies.
fn object<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":{{"))? + key.len() + 3;
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in json[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => depth += 1,
            '}' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return Some(&json[start..=start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

fn assert_verdict(body: &str, action: &str, symbol: Option<&str>, spam_header: bool) {
    assert!(
        body.contains(&format!("\"action\":\"{action}\"")),
        "want action {action}: {body}"
    );
    if let Some(symbol) = symbol {
        let symbols = object(body, "symbols").expect("symbols");
        assert!(object(symbols, symbol).is_some(), "want {symbol}: {body}");
    }
    // The headers to add, each `{"order":-1,"value":"…"}`.
    let add = object(body, "milter")
        .and_then(|milter| object(milter, "add_headers"))
        .unwrap_or_else(|| panic!("no milter.add_headers: {body}"));
    for header in ["X-Spamd-Result", "X-Spam-Status"] {
        let value = object(add, header).unwrap_or_else(|| panic!("no {header}: {body}"));
        assert!(
            value.contains("\"value\":\"") && value.contains("\"order\":-1"),
            "{header}: {value}"
        );
    }
    assert_eq!(
        object(add, "X-Spam").is_some_and(|v| v.contains("\"value\":\"Yes\"")),
        spam_header,
        "X-Spam: Yes only for actions other than no action / greylist: {body}"
    );
}

#[test]
fn rspamd_gives_each_marker_its_action_and_headers_to_add() {
    if !rspamd::prerequisites("rspamd_gives_each_marker_its_action_and_headers_to_add") {
        return;
    }
    let started = Instant::now();
    let rspamd = Rspamd::start().expect("start rspamd");
    eprintln!("rspamd ready in {:?}", started.elapsed());

    // (name, message, action, symbol, whether `X-Spam: Yes` is added)
    type Case<'a> = (&'a str, &'a [u8], &'a str, Option<&'a str>, bool);
    let cases: [Case; 7] = [
        (
            "clean",
            &message("Lunch", "see you at noon"),
            "no action",
            None,
            false,
        ),
        (
            "spam in the body",
            &message("Offer", &format!("buy now {}", rspamd::SPAM_MARKER)),
            "reject",
            Some(rspamd::SPAM_SYMBOL),
            true,
        ),
        (
            "spam in the subject",
            &message(&format!("Offer {}", rspamd::SPAM_MARKER), "hello"),
            "reject",
            Some(rspamd::SPAM_SYMBOL),
            true,
        ),
        (
            "greylist",
            &message("Hi", rspamd::GREYLIST_MARKER),
            "greylist",
            Some(rspamd::GREYLIST_SYMBOL),
            false,
        ),
        (
            "rewrite subject",
            &message("Hi", rspamd::SUBJECT_MARKER),
            "rewrite subject",
            Some(rspamd::SUBJECT_SYMBOL),
            true,
        ),
        (
            "add header",
            &message("Hi", rspamd::HEADER_MARKER),
            "add header",
            Some(rspamd::HEADER_SYMBOL),
            true,
        ),
        (
            "soft reject",
            &message("Hi", rspamd::SOFT_REJECT_MARKER),
            "soft reject",
            Some(rspamd::SOFT_REJECT_SYMBOL),
            true,
        ),
    ];
    for chunked in [false, true] {
        for (name, msg, action, symbol, spam_header) in &cases {
            let (status, body) = checkv2(&rspamd, msg, chunked);
            eprintln!("{name} (chunked: {chunked}): {body}");
            assert_eq!(status, "HTTP/1.1 200 OK", "{name}: {body}");
            assert_verdict(&body, action, *symbol, *spam_header);
            // The new Subject is in the reply (the prefix, then the old
            // one); no other action has one.
            assert_eq!(
                body.contains(&format!("\"subject\":\"{}Hi\"", rspamd::SUBJECT_PREFIX)),
                *action == "rewrite subject",
                "{name}: {body}"
            );
            if *action == "soft reject" {
                assert!(
                    body.contains(&format!(
                        "\"smtp_message\":\"{}\"",
                        rspamd::SOFT_REJECT_MESSAGE
                    )),
                    "{body}"
                );
            }
        }
    }
    // Every scan is logged, with the client IP from the `IP` header, the
    // whole message (chunked ones too), and no DNS request.
    let scanned = rspamd.scanned();
    assert_eq!(scanned.len(), 2 * cases.len(), "{}", rspamd.log());
    for line in &scanned {
        assert!(line.contains("ip: 127.0.0.1,"), "{line}");
        assert!(line.contains("dns req: 0,"), "{line}");
    }
    let lens = |chunked: bool| -> Vec<&str> {
        scanned[if chunked {
            cases.len()..2 * cases.len()
        } else {
            0..cases.len()
        }]
        .iter()
        .map(|l| l.split("len: ").nth(1).unwrap().split(',').next().unwrap())
        .collect()
    };
    assert_eq!(lens(false), lens(true), "chunked bodies are read whole");

    let dir = rspamd.dir().to_owned();
    assert!(!rspamd.processes().is_empty());
    drop(rspamd);
    if std::env::var_os("RSPAMD_FIXTURE_KEEP").is_none() {
        assert!(!dir.exists(), "the fixture removes its directory");
    }
}

/// Sends `data` with `INSTREAM` (`z` or `n` form) in 64 KiB chunks and
/// returns clamd's reply; a write failing once clamd has answered (it
/// closes the connection on a size limit) is not an error.
fn instream<S: Read + Write>(mut stream: S, data: &[u8], z: bool) -> String {
    stream
        .write_all(if z { b"zINSTREAM\0" } else { b"nINSTREAM\n" })
        .unwrap();
    let sent = data
        .chunks(64 * 1024)
        .try_for_each(|chunk| {
            stream.write_all(&u32::try_from(chunk.len()).unwrap().to_be_bytes())?;
            stream.write_all(chunk)
        })
        .and_then(|()| stream.write_all(&0u32.to_be_bytes()));
    let mut reply = Vec::new();
    let read = stream.read_to_end(&mut reply);
    let reply = String::from_utf8(reply).expect("a UTF-8 reply");
    assert!(
        !reply.is_empty(),
        "no reply (write: {sent:?}, read: {read:?})"
    );
    let end = if z { '\0' } else { '\n' };
    assert!(reply.ends_with(end), "reply framing: {reply:?}");
    reply
}

fn tcp(clamd: &Clamd) -> TcpStream {
    let s = TcpStream::connect_timeout(&clamd.tcp_address(), IO_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

fn unix(clamd: &Clamd) -> UnixStream {
    let s = UnixStream::connect(clamd.unix_socket()).expect("connect");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

#[test]
fn clamd_finds_the_test_signature_over_tcp_and_the_unix_socket() {
    if !clamd::prerequisites("clamd_finds_the_test_signature_over_tcp_and_the_unix_socket") {
        return;
    }
    let started = Instant::now();
    let clamd = Clamd::start_with(ClamdOptions {
        stream_max_length: 256 * 1024,
    })
    .expect("start clamd");
    eprintln!("clamd ready in {:?}", started.elapsed());
    assert_eq!(clamd.stream_max_length(), 256 * 1024);

    let clean = message("Lunch", "see you at noon");
    let virus = message("Invoice", &format!("open me {}", clamd::VIRUS_MARKER));
    let found = format!("stream: {} FOUND", clamd.signature_name());
    let eicar_found = format!("stream: {} FOUND", clamd::EICAR_SIGNATURE);
    for z in [true, false] {
        let end = if z { "\0" } else { "\n" };
        assert_eq!(instream(tcp(&clamd), &clean, z), format!("stream: OK{end}"));
        assert_eq!(
            instream(unix(&clamd), &clean, z),
            format!("stream: OK{end}")
        );
        assert_eq!(instream(tcp(&clamd), &virus, z), format!("{found}{end}"));
        assert_eq!(instream(unix(&clamd), &virus, z), format!("{found}{end}"));
        assert_eq!(
            instream(tcp(&clamd), &clamd::eicar(), z),
            format!("{eicar_found}{end}")
        );
    }

    // The marker past the first chunk, and a stream of exactly the limit.
    let mut big = vec![b'a'; 200 * 1024];
    big.extend_from_slice(clamd::VIRUS_MARKER.as_bytes());
    assert_eq!(instream(tcp(&clamd), &big, true), format!("{found}\0"));
    let limit = usize::try_from(clamd.stream_max_length()).unwrap();
    assert_eq!(
        instream(tcp(&clamd), &vec![b'a'; limit], true),
        "stream: OK\0"
    );
    // One byte over, and far over (clamd closes while chunks still come).
    for size in [limit + 1, 8 * limit] {
        assert_eq!(
            instream(tcp(&clamd), &vec![b'a'; size], true),
            "INSTREAM size limit exceeded. ERROR\0",
            "{size} bytes"
        );
        assert_eq!(
            instream(unix(&clamd), &vec![b'a'; size], false),
            "INSTREAM size limit exceeded. ERROR\n",
            "{size} bytes"
        );
    }

    let scanned = clamd.scanned();
    assert!(
        scanned.iter().any(|l| l.contains("instream(local)")),
        "{}",
        clamd.log()
    );
    let dir = clamd.dir().to_owned();
    drop(clamd);
    if std::env::var_os("CLAMD_FIXTURE_KEEP").is_none() {
        assert!(!dir.exists(), "the fixture removes its directory");
    }
}

#[test]
fn clamd_default_stream_limit_is_one_mebibyte() {
    if !clamd::prerequisites("clamd_default_stream_limit_is_one_mebibyte") {
        return;
    }
    let clamd = Clamd::start().expect("start clamd");
    assert_eq!(clamd.stream_max_length(), 1024 * 1024);
    assert_eq!(
        instream(tcp(&clamd), &vec![b'a'; 1024 * 1024], true),
        "stream: OK\0"
    );
    assert_eq!(
        instream(tcp(&clamd), &vec![b'a'; 1024 * 1024 + 1], true),
        "INSTREAM size limit exceeded. ERROR\0"
    );
}
