//! The built-in backend: a small SMTP server for trying the proxy out and for
//! tests, never for production. It reads the PROXY v1/v2 header or XCLIENT
//! the proxy sends (so the real client shows in its log), accepts a fixed
//! list of recipients (others get `550 5.1.1`), accepts `AUTH PLAIN` for one
//! demo account, and discards every message after counting it.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use crate::smtp::{
    command::{parse_command, parse_rcpt_to, Verb},
    data::{DataProgress, DataScanner},
    line::LineReader,
};

/// The demo account `AUTH PLAIN` accepts (base64 of "\0demo\0demo").
const DEMO_AUTH_PLAIN: &str = "AGRlbW8AZGVtbw==";
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What the built-in backend has seen.
#[derive(Default)]
pub struct SinkStats {
    pub sessions: AtomicU64,
    pub messages: AtomicU64,
    pub rejected_recipients: AtomicU64,
}

/// Serves the built-in backend on `listener` forever.
pub async fn serve(listener: TcpListener, recipients: Arc<Vec<String>>, stats: Arc<SinkStats>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (recipients, stats) = (recipients.clone(), stats.clone());
        tokio::spawn(async move {
            stats.sessions.fetch_add(1, Ordering::Relaxed);
            let _ = timeout(
                Duration::from_secs(3600),
                session(stream, peer, &recipients, &stats),
            )
            .await;
        });
    }
}

async fn session(
    mut stream: TcpStream,
    peer: SocketAddr,
    recipients: &[String],
    stats: &SinkStats,
) -> std::io::Result<()> {
    let mut input = BytesMut::with_capacity(4096);
    let mut client = peer;
    // The proxy may open with a PROXY header: read what is there first.
    if let Ok(Ok(n)) = timeout(Duration::from_millis(200), stream.read_buf(&mut input)).await {
        if n == 0 {
            return Ok(());
        }
        if let Some((source, used)) = parse_proxy_header(&input) {
            client = source;
            input.advance(used);
        }
    }
    tracing::debug!(%client, "built-in backend: session");
    stream
        .write_all(b"220 builtin.smtp-limiter ESMTP (built-in test backend)\r\n")
        .await?;
    let mut lines = LineReader::new(4096);
    let mut queued = 0u64;
    loop {
        let line = loop {
            if let Some(result) = lines.next_line(&mut input) {
                break result.map(|l| l.text).unwrap_or_default();
            }
            input.reserve(4096);
            match timeout(IDLE_TIMEOUT, stream.read_buf(&mut input)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
                Ok(Ok(_)) => {}
            }
        };
        let command = parse_command(&line);
        let reply: &[u8] = match command.verb {
            Verb::Ehlo => b"250-builtin.smtp-limiter\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR PORT NAME PROTO HELO\r\n",
            Verb::Helo => b"250 builtin.smtp-limiter\r\n",
            Verb::Xclient => {
                if let Some(addr) = command.args.split_whitespace().find_map(|a| a.strip_prefix("ADDR=")) {
                    tracing::debug!(client = addr, "built-in backend: XCLIENT");
                }
                b"220 builtin.smtp-limiter ESMTP (built-in test backend)\r\n"
            }
            Verb::Mail | Verb::Rset | Verb::Noop => b"250 2.0.0 Ok\r\n",
            Verb::Rcpt => match parse_rcpt_to(&command.args) {
                Ok(rcpt) if recipients.iter().any(|r| r.eq_ignore_ascii_case(&rcpt.recipient)) => b"250 2.1.5 Ok\r\n",
                Ok(_) => {
                    stats.rejected_recipients.fetch_add(1, Ordering::Relaxed);
                    b"550 5.1.1 Recipient address rejected: User unknown\r\n"
                }
                Err(_) => b"501 5.1.3 Bad recipient address syntax\r\n",
            },
            Verb::Auth => {
                let mut words = command.args.split_whitespace();
                match (words.next().map(str::to_ascii_uppercase).as_deref(), words.next()) {
                    (Some("PLAIN"), Some(DEMO_AUTH_PLAIN)) => b"235 2.7.0 Authentication successful\r\n",
                    _ => b"535 5.7.8 Error: authentication failed\r\n",
                }
            }
            Verb::Data => {
                stream.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n").await?;
                let mut scanner = DataScanner::new(64 * 1024);
                let mut discard = Vec::new();
                loop {
                    discard.clear();
                    match scanner.feed(&input, &mut discard) {
                        DataProgress::NeedMore => input.clear(),
                        DataProgress::End { consumed } => {
                            input.advance(consumed);
                            break;
                        }
                        DataProgress::Violation { .. } => return Ok(()),
                    }
                    input.reserve(16 * 1024);
                    match timeout(IDLE_TIMEOUT, stream.read_buf(&mut input)).await {
                        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Ok(()),
                        Ok(Ok(_)) => {}
                    }
                }
                queued += 1;
                stats.messages.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%client, bytes = scanner.bytes(), "built-in backend: message discarded");
                let reply = format!("250 2.0.0 Ok: queued as B{queued}\r\n");
                stream.write_all(reply.as_bytes()).await?;
                continue;
            }
            Verb::Quit => {
                stream.write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 Error: command not recognized\r\n",
        };
        stream.write_all(reply).await?;
    }
}

/// The client address of a PROXY v2 or v1 header at the start of `input`,
/// and the header's length.
fn parse_proxy_header(input: &[u8]) -> Option<(SocketAddr, usize)> {
    const V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    if input.starts_with(V2) && input.len() >= 16 {
        let len = u16::from_be_bytes([input[14], input[15]]) as usize;
        let body = input.get(16..16 + len)?;
        let source = match input[13] {
            0x11 if len >= 12 => SocketAddr::new(
                std::net::Ipv4Addr::new(body[0], body[1], body[2], body[3]).into(),
                u16::from_be_bytes([body[8], body[9]]),
            ),
            0x21 if len >= 36 => SocketAddr::new(
                std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&body[..16]).ok()?).into(),
                u16::from_be_bytes([body[32], body[33]]),
            ),
            _ => return None,
        };
        return Some((source, 16 + len));
    }
    if input.starts_with(b"PROXY ") {
        let end = input.iter().position(|&b| b == b'\n')?;
        let line = std::str::from_utf8(&input[..end]).ok()?.trim_end();
        let mut fields = line.split(' ').skip(2);
        let (ip, _, port) = (fields.next()?, fields.next()?, fields.next()?);
        return Some((
            SocketAddr::new(ip.parse().ok()?, port.parse().ok()?),
            end + 1,
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::identity::{proxy_v1_header, proxy_v2_header};

    #[test]
    fn reads_the_headers_the_proxy_writes() {
        let client: SocketAddr = "192.0.2.9:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
        for header in [
            proxy_v2_header(client, local),
            proxy_v1_header(client, local),
        ] {
            let mut bytes = header.clone();
            bytes.extend_from_slice(b"EHLO x\r\n");
            assert_eq!(parse_proxy_header(&bytes), Some((client, header.len())));
        }
        let v6: SocketAddr = "[2001:db8::1]:5".parse().unwrap();
        assert_eq!(
            parse_proxy_header(&proxy_v2_header(v6, "[::1]:25".parse().unwrap())).map(|p| p.0),
            Some(v6)
        );
        assert_eq!(parse_proxy_header(b"EHLO x\r\n"), None);
    }
}
