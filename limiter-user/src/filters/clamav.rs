//! ClamAV's clamd over TCP or a Unix socket: `zINSTREAM`, the message as
//! length-prefixed chunks while DATA arrives, a zero-length chunk to end,
//! then one NUL-terminated reply (`stream: OK`, `stream: <name> FOUND`,
//! `... ERROR`).

use std::{path::PathBuf, time::Duration};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpStream, UnixStream},
    sync::mpsc,
};

use super::{message::HeaderEdits, ScanError, Verdict};

/// Longest reply read from clamd (a virus name and a few words).
const MAX_REPLY: usize = 4096;
/// Largest chunk written at once (clamd reads chunks of any size up to
/// StreamMaxLength; smaller chunks keep its buffers small).
const MAX_CHUNK: usize = 64 * 1024;

/// Where clamd listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClamdAddress {
    Tcp(String),
    Unix(PathBuf),
}

/// A clamd to ask.
#[derive(Clone, Debug)]
pub struct ClamdClient {
    address: ClamdAddress,
    /// clamd's `StreamMaxLength`: more would make clamd drop the stream, so
    /// only this many bytes are sent (the start of the message is scanned).
    stream_max_length: u64,
}

/// What was sent to clamd, for the log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub bytes: u64,
    /// The message was longer than `stream_max_length`.
    pub truncated: bool,
}

impl ClamdClient {
    /// `address` is `host:port` or an absolute socket path.
    #[must_use]
    pub fn new(address: &str, stream_max_length: u64) -> Self {
        let address = if address.starts_with('/') {
            ClamdAddress::Unix(PathBuf::from(address))
        } else {
            ClamdAddress::Tcp(address.to_owned())
        };
        Self {
            address,
            stream_max_length,
        }
    }

    /// Asks clamd about the message whose bytes arrive on `chunks`.
    pub async fn scan(
        &self,
        chunks: mpsc::Receiver<Bytes>,
        connect_timeout: Duration,
    ) -> Result<Verdict, ScanError> {
        let connect = async {
            match &self.address {
                ClamdAddress::Tcp(address) => TcpStream::connect(address)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Stream>),
                ClamdAddress::Unix(path) => UnixStream::connect(path)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Stream>),
            }
        };
        let stream = tokio::time::timeout(connect_timeout, connect)
            .await
            .map_err(|_| ScanError::Unavailable("connect timed out".into()))?
            .map_err(|e| ScanError::Unavailable(e.to_string()))?;
        let (verdict, sent) = self.instream(stream, chunks).await?;
        if sent.truncated {
            tracing::info!(
                bytes = sent.bytes,
                "message longer than filters.clamav.stream_max_length: clamd scanned its start only"
            );
        }
        Ok(verdict)
    }

    async fn instream(
        &self,
        mut stream: Box<dyn Stream>,
        mut chunks: mpsc::Receiver<Bytes>,
    ) -> Result<(Verdict, Sent), ScanError> {
        let mut sent = Sent::default();
        // clamd answers and closes as soon as it refuses a stream (over its
        // StreamMaxLength): a failed write still leaves its reply to read.
        let written = self.send_stream(&mut stream, &mut chunks, &mut sent).await;
        let mut reply = Vec::with_capacity(64);
        let mut buf = [0u8; 256];
        while !reply.contains(&0) && reply.len() <= MAX_REPLY {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
        let end = reply.iter().position(|&b| b == 0);
        let text = String::from_utf8_lossy(&reply[..end.unwrap_or(reply.len()).min(MAX_REPLY)]);
        // A reply counts only whole, up to its NUL: `stream: OK` may have
        // been cut from `stream: OK.Some.Name FOUND`, and the start of an
        // endless reply is no reply either.
        if end.is_none_or(|end| end > MAX_REPLY) {
            let excerpt: String = text.chars().take(64).collect();
            return Err(ScanError::Protocol(match written {
                Err(e) if text.trim().is_empty() => format!("sending to clamd: {e}"),
                _ if reply.len() > MAX_REPLY => {
                    format!(
                        "clamd's reply runs past {MAX_REPLY} bytes without its NUL: {excerpt:?}"
                    )
                }
                _ if text.trim().is_empty() => "clamd closed without a reply".to_owned(),
                _ => format!("clamd's reply ended before its NUL: {excerpt:?}"),
            }));
        }
        match (parse_reply(&text), written) {
            (Err(_), Err(e)) if text.trim().is_empty() => {
                Err(ScanError::Protocol(format!("sending to clamd: {e}")))
            }
            (Err(ScanError::Protocol(m)), _) if m.contains("size limit") => {
                Err(ScanError::Protocol(format!(
                    "{m} (set filters.clamav.stream_max_length to clamd's StreamMaxLength)"
                )))
            }
            (result, _) => result.map(|verdict| (verdict, sent)),
        }
    }

    /// `zINSTREAM`, the chunks (at most `stream_max_length` bytes in all),
    /// the zero-length end chunk.
    async fn send_stream(
        &self,
        stream: &mut Box<dyn Stream>,
        chunks: &mut mpsc::Receiver<Bytes>,
        sent: &mut Sent,
    ) -> std::io::Result<()> {
        stream.write_all(b"zINSTREAM\0").await?;
        while let Some(chunk) = chunks.recv().await {
            let room = usize::try_from(self.stream_max_length - sent.bytes).unwrap_or(usize::MAX);
            if chunk.len() > room {
                sent.truncated = true;
            }
            for piece in chunk[..chunk.len().min(room)].chunks(MAX_CHUNK) {
                // piece.len() <= MAX_CHUNK fits in u32.
                stream
                    .write_all(&(piece.len() as u32).to_be_bytes())
                    .await?;
                stream.write_all(piece).await?;
                sent.bytes += piece.len() as u64;
            }
        }
        stream.write_all(&0u32.to_be_bytes()).await?;
        stream.flush().await
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The verdict in a clamd INSTREAM reply (without its NUL).
///
/// # Errors
/// clamd reported an error (size limit, …) or said something unexpected.
pub fn parse_reply(reply: &str) -> Result<Verdict, ScanError> {
    let reply = reply.trim_end_matches(['\0', '\n', '\r']).trim();
    // The reply names the stream (`stream: ...`); strip that.
    let result = reply.strip_prefix("stream:").map_or(reply, str::trim);
    if result == "OK" {
        return Ok(Verdict::Clean {
            edits: HeaderEdits::default(),
        });
    }
    if let Some(name) = result.strip_suffix(" FOUND") {
        return Ok(Verdict::Virus {
            name: name.trim().to_owned(),
        });
    }
    if reply.is_empty() {
        return Err(ScanError::Protocol("clamd closed without a reply".into()));
    }
    Err(ScanError::Protocol(format!("clamd: {reply}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply("stream: OK\0").unwrap(),
            Verdict::Clean {
                edits: HeaderEdits::default()
            }
        );
        assert_eq!(
            parse_reply("stream: Win.Test.EICAR_HDB-1 FOUND").unwrap(),
            Verdict::Virus {
                name: "Win.Test.EICAR_HDB-1".into()
            }
        );
        let err = parse_reply("INSTREAM size limit exceeded. ERROR").unwrap_err();
        assert!(err.to_string().contains("size limit"), "{err}");
        assert!(parse_reply("").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            ClamdClient::new("/run/clamav/clamd.ctl", 1).address,
            ClamdAddress::Unix("/run/clamav/clamd.ctl".into())
        );
        assert_eq!(
            ClamdClient::new("127.0.0.1:3310", 1).address,
            ClamdAddress::Tcp("127.0.0.1:3310".into())
        );
    }

    /// A reply without its NUL is no verdict, even one that reads `OK`:
    /// cut short by a close, or running past [`MAX_REPLY`].
    #[tokio::test]
    async fn a_reply_without_its_nul_is_no_verdict() {
        let huge_ok = {
            let mut reply = b"stream: OK".to_vec();
            reply.resize(MAX_REPLY * 2, b' ');
            reply.push(0);
            reply
        };
        for (reply, want) in [
            (b"stream: OK".to_vec(), "ended before its NUL"),
            (b"stream: Eicar-Te".to_vec(), "ended before its NUL"),
            (huge_ok, "runs past"),
            (Vec::new(), "closed without a reply"),
        ] {
            let (ours, mut theirs) = tokio::io::duplex(1 << 20);
            let client = ClamdClient::new("127.0.0.1:1", 1 << 20);
            let (tx, rx) = mpsc::channel(1);
            drop(tx);
            let server = tokio::spawn(async move {
                let mut request = [0u8; 14];
                theirs.read_exact(&mut request).await.unwrap();
                theirs.write_all(&reply).await.unwrap();
            });
            let error = client.instream(Box::new(ours), rx).await.unwrap_err();
            assert!(error.to_string().contains(want), "{error}");
            server.await.unwrap();
        }
    }

    /// A fake clamd on a socket pair: checks the framing and the
    /// StreamMaxLength cut.
    #[tokio::test]
    async fn instream_framing_and_length_cut() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let client = ClamdClient::new("127.0.0.1:1", 10);
        let (tx, rx) = mpsc::channel(4);
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = theirs.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                if got.ends_with(&[0, 0, 0, 0]) {
                    break;
                }
            }
            theirs.write_all(b"stream: OK\0").await.unwrap();
            got
        });
        tx.send(Bytes::from_static(b"hello ")).await.unwrap();
        tx.send(Bytes::from_static(b"world, and more"))
            .await
            .unwrap();
        drop(tx);
        let (verdict, sent) = client.instream(Box::new(ours), rx).await.unwrap();
        assert!(matches!(verdict, Verdict::Clean { .. }));
        assert_eq!(
            sent,
            Sent {
                bytes: 10,
                truncated: true
            }
        );
        let got = server.await.unwrap();
        let mut expected = b"zINSTREAM\0".to_vec();
        expected.extend_from_slice(&6u32.to_be_bytes());
        expected.extend_from_slice(b"hello ");
        expected.extend_from_slice(&4u32.to_be_bytes());
        expected.extend_from_slice(b"worl");
        expected.extend_from_slice(&0u32.to_be_bytes());
        assert_eq!(got, expected);
    }
}
