//! The whole session state machine: a client stream chosen by the fuzzer,
//! fed in fuzzer-chosen chunks over an in-memory stream, through a real
//! [`Session`] to a scripted backend, in memory too (the product's
//! `memory-backend` feature: no loopback TCP, many times the inputs a
//! second).
//!
//! Input: byte 0 picks the configuration (`% 4`: plain, content filters
//! holding every message, observe mode, `backend.connect = "on-rcpt"`) and
//! whether the client is a recent sender (`& 0x10`: its backend connection
//! opens at accept and its HELO/EHLO is sent ahead, `backend.early_connect`),
//! byte 1 seeds the chunk sizes, the rest is what the client sends once
//! greeted.
//!
//! Asserts, after every input:
//! * no 250 to the end of DATA that the backend did not give: every
//!   "queued as" reply the client sees is one the backend sent, once;
//! * no RCPT reaches the backend that the policy did not accept: each one
//!   parses, carries no second routing target and is in the served domain
//!   (`relay.accept = "*@example.com"`; observe mode excepted);
//! * no line reaches the backend that the proxy did not parse: outside
//!   message data, every line passes `check_command_line` and names a verb
//!   the proxy relays; SASL answers are base64 or `*`;
//! * the proxy pipelines only where Postfix allows it (RFC 2920): nothing
//!   before the greeting, nothing after HELO, EHLO, DATA, NOOP, VRFY or
//!   EXPN before their reply, nothing after any command in a session that
//!   said HELO (what `smtpd_forbid_unauth_pipelining` drops a client for);
//! * no panic, and the session ends (the client closing its side ends it).
//!
//! The backend refuses a MAIL whose sender starts with `refuse` (so that
//! recipients pipelined after a refused MAIL are exercised).
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::Duration,
};

use libfuzzer_sys::fuzz_target;
use limiter_user::{
    config::{Config, TlsMode},
    kernel::NoKernel,
    policy::PolicyState,
    proxy::{
        backend::memory,
        capabilities::{self, Learned},
        session::Session,
        tls::MaybeTls,
        ProxyContext,
    },
    smtp::{check_command_line, check_sasl_response, parse_command, parse_rcpt_to, Verb},
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, DuplexStream};

/// The client's address as the session sees it.
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40000);
/// Recipients the backend accepts; `later@example.com` gets `450 4.1.1`.
const VALID: [&str; 2] = ["alice@example.com", "bob@example.com"];
/// How long the backend's connection tasks may take to finish after the
/// session ended (they only have to read what is already sent). Generous:
/// a 15-minute run beside a CI build, the fuzzer at nice 10, once went
/// past 2 s on an input that takes 1 to 7 ms when run alone, and up to
/// 1.4 s beside four busy loops (a connection that never ends still fails
/// here, or at libFuzzer's 10 s timeout).
const BACKEND_DRAIN: Duration = Duration::from_secs(5);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// What the backend saw on all connections of one input.
#[derive(Default)]
struct Seen {
    /// Command lines and SASL answers (outside message data), with whether
    /// each was a SASL answer.
    commands: Vec<(Vec<u8>, bool)>,
    /// Queue ids of the messages the backend accepted.
    queued: Vec<u32>,
    next_id: u32,
    /// Lines after which more input was already there before the reply
    /// (or `"<greeting>"`): pipelining Postfix forbids.
    pipelined: Vec<Vec<u8>>,
}

/// `future`'s output if it is ready at the first poll (what a
/// non-blocking read sees).
async fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match future.as_mut().poll(cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        })
    })
    .await
}

async fn serve_backend(mut stream: DuplexStream, seen: Arc<Mutex<Seen>>) {
    // Nothing may come before the greeting (identity = "none": no header).
    let mut early = [0u8; 1];
    if matches!(ready_now(stream.read(&mut early)).await, Some(Ok(n)) if n > 0) {
        seen.lock().unwrap().pipelined.push(b"<greeting>".to_vec());
    }
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    if write
        .write_all(b"220 backend.fuzz ESMTP\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut line = Vec::new();
    let mut sasl = false;
    // EHLO said on this connection (a HELO session may not pipeline).
    let mut esmtp = false;
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = line.strip_suffix(b"\r\n").unwrap_or(&line).to_vec();
        seen.lock().unwrap().commands.push((text.clone(), sasl));
        if sasl {
            sasl = false;
            let reply: &[u8] = if text == b"*" {
                b"501 5.7.0 Authentication aborted\r\n"
            } else {
                b"535 5.7.8 Error: authentication failed\r\n"
            };
            if write.write_all(reply).await.is_err() {
                return;
            }
            continue;
        }
        let command = parse_command(&text);
        match command.verb {
            Verb::Ehlo => esmtp = true,
            Verb::Helo => esmtp = false,
            _ => {}
        }
        // Input already there before this command's reply: pipelined.
        let last_in_group = matches!(
            command.verb,
            Verb::Helo | Verb::Ehlo | Verb::Data | Verb::Noop | Verb::Vrfy | Verb::Expn
        ) || !esmtp;
        if last_in_group && !read.buffer().is_empty() {
            seen.lock().unwrap().pipelined.push(text.clone());
        }
        let reply: Vec<u8> = match command.verb {
            Verb::Ehlo => b"250-backend.fuzz\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n".to_vec(),
            Verb::Mail if command.args.to_ascii_lowercase().contains("from:<refuse") => {
                b"550 5.7.1 Sender refused\r\n".to_vec()
            }
            Verb::Helo | Verb::Mail | Verb::Rset | Verb::Noop => b"250 2.0.0 Ok\r\n".to_vec(),
            Verb::Rcpt => {
                let rcpt = parse_rcpt_to(&command.args).map(|r| r.canonical.to_ascii_lowercase());
                match rcpt.as_deref() {
                    Ok(r) if VALID.contains(&r) => b"250 2.1.5 Ok\r\n".to_vec(),
                    Ok("later@example.com") => b"450 4.1.1 <later@example.com>: unverified address\r\n".to_vec(),
                    _ => b"550 5.1.1 Recipient address rejected: User unknown\r\n".to_vec(),
                }
            }
            Verb::Data => {
                if write.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await.is_err() {
                    return;
                }
                loop {
                    line.clear();
                    match read.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                let id = {
                    let mut seen = seen.lock().unwrap();
                    seen.next_id += 1;
                    let id = seen.next_id;
                    seen.queued.push(id);
                    id
                };
                format!("250 2.0.0 Ok: queued as Q{id}\r\n").into_bytes()
            }
            Verb::Auth => {
                sasl = !text.contains(&b' ') || text.split(|&b| b == b' ').count() < 3;
                if sasl {
                    b"334 \r\n".to_vec()
                } else {
                    b"535 5.7.8 Error: authentication failed\r\n".to_vec()
                }
            }
            Verb::Quit => {
                let _ = write.write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            _ => b"502 5.5.2 Error: command not recognized\r\n".to_vec(),
        };
        if write.write_all(&reply).await.is_err() {
            return;
        }
    }
}

fn config(variant: u8, backend: SocketAddr) -> Config {
    let mut text = format!(
        "[[listen]]\naddress = \"127.0.0.1:0\"\n[backend]\naddress = \"{backend}\"\nidentity = \"none\"\n\
         [kernel]\nmode = \"off\"\n[relay]\naccept = \"*@example.com\"\n\
         [limits]\nmax_failed_rcpt = 3\nmax_failed_rcpt_per_source = 6\nnull_sender_rate = \"3/1h\"\n\
         [smtp]\nmax_errors = 8\nmax_recipients = 4\nmax_message_size = 4000\n"
    );
    match variant % 4 {
        // Content filters on, the scanner unreachable: every message is
        // held to its end, then delivered with the "not scanned" header.
        1 => text.push_str(
            "[filters]\ntimeout = \"1s\"\non_failure = \"fail-open\"\nmax_size = 2000\n\
             [filters.clamav]\naddress = \"127.0.0.1:1\"\n",
        ),
        2 => text.insert_str(0, "mode = \"observe\"\n"),
        // The first MAIL answered by the proxy, sent with the first RCPT.
        3 => text = text.replace("[backend]\n", "[backend]\nconnect = \"on-rcpt\"\n"),
        _ => {}
    }
    Config::from_toml(&text).expect("the fuzz configuration is valid")
}

/// The client bytes cut into chunks of 1..=64 bytes from `seed`.
fn chunks(mut seed: u32, data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let n = (seed % 64) as usize + 1;
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Whether the session may relay `verb` to the backend in this
/// configuration.
fn relayed(verb: Verb) -> bool {
    matches!(
        verb,
        Verb::Helo
            | Verb::Ehlo
            | Verb::Mail
            | Verb::Rcpt
            | Verb::Data
            | Verb::Rset
            | Verb::Noop
            | Verb::Help
            | Verb::Quit
            | Verb::Auth
    )
}

fuzz_target!(|data: &[u8]| {
    let [variant, seed, client @ ..] = data else {
        return;
    };
    let observe = variant % 4 == 2;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let backend_seen = seen.clone();
    let client_output = runtime().block_on(async move {
        let (backend_addr, mut listener) = memory::listen();
        // The backend side: every connection served by a task of its own,
        // counted so that the check below runs only once all have ended.
        let active = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio::spawn({
            let active = active.clone();
            async move {
                while let Some(stream) = listener.accept().await {
                    active.fetch_add(1, Ordering::SeqCst);
                    let (seen, active) = (backend_seen.clone(), active.clone());
                    tokio::spawn(async move {
                        serve_backend(stream, seen).await;
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
        let config = config(*variant, backend_addr);
        let mut ctx =
            ProxyContext::new(&config, Arc::new(NoKernel::new("fuzz"))).expect("proxy context");
        ctx.state = Arc::new(PolicyState::with_capacity(64));
        let ctx = Arc::new(ctx);
        // The backend's capabilities, as the agent's probe learns them: once
        // (what the scripted backend offers never changes).
        static LEARNED: OnceLock<Learned> = OnceLock::new();
        let learned = match LEARNED.get() {
            Some(learned) => learned.clone(),
            None => {
                let learned = capabilities::probe(&ctx).await.expect("probe the backend");
                LEARNED.get_or_init(|| learned).clone()
            }
        };
        ctx.capabilities.record(Some(learned));
        if variant & 0x10 != 0 {
            ctx.recent_senders
                .record(CLIENT.ip(), tokio::time::Instant::now());
        }
        let guard = ctx
            .policy()
            .connect(&ctx.state, CLIENT.ip())
            .verdict
            .into_guard()
            .expect("the first connection is accepted");
        let (proxy_side, mut client_side) = tokio::io::duplex(1 << 20);
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        let session = Session::new(
            ctx,
            MaybeTls::Plain(proxy_side),
            CLIENT,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 25),
            TlsMode::None,
            guard,
            shutdown,
        );
        let session = tokio::spawn(session.run());
        let client_chunks = chunks(u32::from(*seed) | 0x100, client);
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        // Wait for the greeting: talking first is refused as pregreet.
        while !output.windows(2).any(|w| w == b"\r\n") {
            match client_side.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => output.extend_from_slice(&buf[..n]),
            }
        }
        let (mut reader, mut writer) = tokio::io::split(client_side);
        let write = async {
            for chunk in client_chunks {
                if writer.write_all(chunk).await.is_err() {
                    break;
                }
                // Let the session read this chunk on its own.
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
            }
            let _ = writer.shutdown().await;
        };
        let read = async {
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                output.extend_from_slice(&buf[..n]);
            }
        };
        tokio::join!(write, read);
        session.await.expect("the session task did not panic");
        let drained = tokio::time::timeout(BACKEND_DRAIN, async {
            while active.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        acceptor.abort();
        assert!(drained.is_ok(), "a backend connection outlived its session");
        output
    });

    let seen = seen.lock().unwrap();
    assert!(
        seen.pipelined.is_empty(),
        "the proxy pipelined where Postfix forbids it, after: {:?}",
        seen.pipelined
    );
    // Every "queued" reply the client saw was the backend's, once each.
    let mut queued_seen = Vec::new();
    for line in client_output.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(id) = line.strip_prefix(b"250 2.0.0 Ok: queued as Q") {
            let id: u32 = std::str::from_utf8(id)
                .ok()
                .and_then(|s| s.parse().ok())
                .expect("queue id");
            assert!(
                seen.queued.contains(&id),
                "the client got a 250 for a message the backend never accepted"
            );
            assert!(
                !queued_seen.contains(&id),
                "the backend's acceptance was given twice"
            );
            queued_seen.push(id);
        }
    }
    for (line, sasl) in &seen.commands {
        if *sasl {
            assert!(
                check_sasl_response(line).is_ok(),
                "a SASL answer the proxy did not check: {line:?}"
            );
            continue;
        }
        assert!(
            check_command_line(line).is_ok(),
            "an unparsed line reached the backend: {line:?}"
        );
        let command = parse_command(line);
        assert!(
            relayed(command.verb),
            "a verb the proxy does not relay reached the backend: {line:?}"
        );
        if command.verb == Verb::Rcpt && !observe {
            let rcpt = parse_rcpt_to(&command.args).expect("a relayed RCPT parses");
            assert!(
                rcpt.second_route.is_none(),
                "a routed recipient reached the backend: {line:?}"
            );
            assert_eq!(
                rcpt.domain(),
                Some("example.com"),
                "a foreign recipient reached the backend: {line:?}"
            );
        }
    }
});
