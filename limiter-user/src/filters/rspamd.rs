//! rspamd over its HTTP protocol: `POST /checkv2`, the envelope in request
//! headers, the message as a chunked body streamed while DATA arrives, the
//! verdict as JSON (`action`, `milter.add_headers`, `subject`, `messages`).

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{net::TcpStream, sync::mpsc};

use super::{message::HeaderEdits, Envelope, ScanError, Verdict};

/// Largest reply read from rspamd. Replies list symbols and headers: a few
/// kilobytes.
const MAX_REPLY: usize = 1024 * 1024;

/// Where rspamd's normal worker listens.
#[derive(Clone, Debug)]
pub struct RspamdClient {
    /// `host:port` to connect to.
    authority: String,
    /// The URL's path, without a trailing `/` (rspamd behind a prefix).
    path: String,
}

impl RspamdClient {
    /// Parses `http://host[:port][/prefix]` (port 11333 when absent).
    ///
    /// # Errors
    /// Not an `http://` URL, or no host.
    pub fn new(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("HTTP://"))
            .ok_or_else(|| {
                format!("{url:?}: only http:// is supported (run rspamd on this host or a trusted network)")
            })?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], rest[slash..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let has_port = match authority.rfind(']') {
            Some(bracket) => authority[bracket..].contains(':'),
            None => authority.contains(':'),
        };
        let authority = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:11333")
        };
        Ok(Self {
            authority,
            path: path.to_owned(),
        })
    }

    /// Asks rspamd about the message whose bytes arrive on `chunks`.
    pub async fn scan(
        &self,
        envelope: &Envelope,
        chunks: mpsc::Receiver<Bytes>,
        connect_timeout: Duration,
    ) -> Result<Verdict, ScanError> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| ScanError::Unavailable("connect timed out".into()))?
            .map_err(|e| ScanError::Unavailable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ScanError::Unavailable(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let result = async {
            let request = self.request(envelope, ChunkBody(chunks))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ScanError::Protocol(format!("request failed: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_REPLY)
                .collect()
                .await
                .map_err(|e| ScanError::Protocol(format!("reading the reply: {e}")))?
                .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                return Err(ScanError::Protocol(format!("HTTP {status}: {text}")));
            }
            parse_reply(&body)
        }
        .await;
        driver.abort();
        result
    }

    fn request(
        &self,
        envelope: &Envelope,
        body: ChunkBody,
    ) -> Result<hyper::Request<ChunkBody>, ScanError> {
        let mut request = hyper::Request::post(format!("{}/checkv2", self.path))
            .header(hyper::header::HOST, &self.authority)
            .header("IP", envelope.client.to_string())
            .header("Queue-Id", &envelope.queue_id)
            .header("From", envelope.sender.as_deref().unwrap_or(""));
        if let Some(helo) = &envelope.helo {
            request = request.header("Helo", helo);
        }
        for rcpt in &envelope.recipients {
            request = request.header("Rcpt", rcpt);
        }
        request
            .body(body)
            .map_err(|e| ScanError::Protocol(format!("building the request: {e}")))
    }
}

/// The message body as it streams in: each chunk one HTTP chunk; the end
/// of the channel ends the body.
struct ChunkBody(mpsc::Receiver<Bytes>);

impl Body for ChunkBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// The parts of a `/checkv2` reply the proxy acts on.
#[derive(Debug, Deserialize)]
struct Reply {
    action: String,
    #[serde(default)]
    score: f64,
    #[serde(default)]
    required_score: f64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    messages: Messages,
    #[serde(default)]
    milter: Milter,
}

#[derive(Debug, Default, Deserialize)]
struct Messages {
    #[serde(default)]
    smtp_message: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Milter {
    /// name → value, `{value, order}`, or a list of those.
    #[serde(default)]
    add_headers: serde_json::Map<String, serde_json::Value>,
    /// name → occurrence (0 = all).
    #[serde(default)]
    remove_headers: serde_json::Map<String, serde_json::Value>,
}

/// The verdict in a `/checkv2` reply body.
///
/// # Errors
/// Not JSON, or an action the proxy does not know.
pub fn parse_reply(body: &[u8]) -> Result<Verdict, ScanError> {
    let reply: Reply = serde_json::from_slice(body)
        .map_err(|e| ScanError::Protocol(format!("not a /checkv2 reply: {e}")))?;
    let reason = || match &reply.messages.smtp_message {
        Some(message) if !message.trim().is_empty() => message.trim().to_owned(),
        _ => format!("score {:.2} / {:.2}", reply.score, reply.required_score),
    };
    match reply.action.as_str() {
        "reject" => Ok(Verdict::Spam { reason: reason() }),
        "soft reject" | "greylist" => Ok(Verdict::SoftReject { reason: reason() }),
        "no action" | "add header" | "rewrite subject" => {
            let mut edits = milter_edits(&reply.milter);
            if reply.action == "rewrite subject" {
                edits.subject = reply.subject.clone();
            }
            // An "add header" verdict without the milter_headers module
            // configured would otherwise leave no trace in the message.
            if reply.action != "no action" && edits.add.is_empty() && edits.subject.is_none() {
                edits.add.push(("X-Spam".into(), "Yes".into()));
            }
            Ok(Verdict::Clean { edits })
        }
        other => Err(ScanError::Protocol(format!(
            "unknown rspamd action {other:?}"
        ))),
    }
}

fn milter_edits(milter: &Milter) -> HeaderEdits {
    let mut edits = HeaderEdits::default();
    for (name, which) in &milter.remove_headers {
        edits
            .remove
            .push((name.clone(), which.as_i64().unwrap_or(0)));
    }
    // rspamd gives each header an `order`; headers without one go last.
    let mut added: Vec<(i64, String, String)> = Vec::new();
    for (name, value) in &milter.add_headers {
        let values = match value {
            serde_json::Value::Array(list) => list.iter().collect(),
            single => vec![single],
        };
        for value in values {
            match value {
                serde_json::Value::String(text) => {
                    added.push((i64::MAX, name.clone(), text.clone()))
                }
                serde_json::Value::Object(object) => {
                    if let Some(text) = object.get("value").and_then(|v| v.as_str()) {
                        let order = object
                            .get("order")
                            .and_then(serde_json::Value::as_i64)
                            .unwrap_or(i64::MAX);
                        added.push((order, name.clone(), text.to_owned()));
                    }
                }
                _ => {}
            }
        }
    }
    added.sort_by_key(|(order, _, _)| *order);
    edits.add = added
        .into_iter()
        .map(|(_, name, value)| (name, value))
        .collect();
    edits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = RspamdClient::new("http://127.0.0.1:11333").unwrap();
        assert_eq!(
            (c.authority.as_str(), c.path.as_str()),
            ("127.0.0.1:11333", "")
        );
        let c = RspamdClient::new("http://rspamd.local/prefix/").unwrap();
        assert_eq!(
            (c.authority.as_str(), c.path.as_str()),
            ("rspamd.local:11333", "/prefix")
        );
        let c = RspamdClient::new("http://[::1]").unwrap();
        assert_eq!(c.authority, "[::1]:11333");
        let c = RspamdClient::new("http://[::1]:1").unwrap();
        assert_eq!(c.authority, "[::1]:1");
        assert!(RspamdClient::new("https://x")
            .unwrap_err()
            .contains("only http://"));
        assert!(RspamdClient::new("http:///x")
            .unwrap_err()
            .contains("no host"));
    }

    #[test]
    fn actions_map_to_verdicts() {
        let verdict = |json: &str| parse_reply(json.as_bytes()).unwrap();
        assert_eq!(
            verdict(r#"{"action":"reject","score":20,"required_score":15}"#),
            Verdict::Spam {
                reason: "score 20.00 / 15.00".into()
            }
        );
        assert_eq!(
            verdict(r#"{"action":"reject","messages":{"smtp_message":"Spam detected"}}"#),
            Verdict::Spam {
                reason: "Spam detected".into()
            }
        );
        assert!(matches!(
            verdict(r#"{"action":"soft reject"}"#),
            Verdict::SoftReject { .. }
        ));
        assert!(matches!(
            verdict(r#"{"action":"greylist"}"#),
            Verdict::SoftReject { .. }
        ));
        assert_eq!(
            verdict(r#"{"action":"no action"}"#),
            Verdict::Clean {
                edits: HeaderEdits::default()
            }
        );
        // "add header" without milter headers still marks the message.
        assert_eq!(
            verdict(r#"{"action":"add header"}"#),
            Verdict::Clean {
                edits: HeaderEdits {
                    add: vec![("X-Spam".into(), "Yes".into())],
                    ..HeaderEdits::default()
                }
            }
        );
        assert!(parse_reply(br#"{"action":"discard-everything"}"#).is_err());
        assert!(parse_reply(b"<html>").is_err());
    }

    #[test]
    fn milter_headers_in_both_shapes_in_order() {
        let json = r#"{"action":"rewrite subject","subject":"[SPAM] hi",
            "milter":{"add_headers":{
                "X-Spamd-Result":{"value":"default: True","order":0},
                "X-Spam":"Yes",
                "X-Multi":[{"value":"b","order":2},{"value":"a","order":1}]},
              "remove_headers":{"X-Spam":1,"X-Spamd-Result":0}}}"#;
        let Verdict::Clean { edits } = parse_reply(json.as_bytes()).unwrap() else {
            panic!("clean expected");
        };
        assert_eq!(edits.subject.as_deref(), Some("[SPAM] hi"));
        assert_eq!(
            edits.add,
            vec![
                ("X-Spamd-Result".to_owned(), "default: True".to_owned()),
                ("X-Multi".to_owned(), "a".to_owned()),
                ("X-Multi".to_owned(), "b".to_owned()),
                ("X-Spam".to_owned(), "Yes".to_owned()),
            ]
        );
        assert_eq!(
            edits.remove,
            vec![("X-Spam".to_owned(), 1), ("X-Spamd-Result".to_owned(), 0)]
        );
    }
}
