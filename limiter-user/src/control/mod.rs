//! The control socket: how the `smtp-limiter` CLI talks to the running
//! agent. A Unix socket (mode 0600: only root and the agent's user may
//! change anything), one JSON request per line, one JSON response per line.
//! The server only parses and forwards requests; the agent's main loop
//! carries them out one at a time, so they never race with reloads. What
//! it answers to each request is an [`Answer`] (`control/answers.rs`).

mod answers;

pub use answers::*;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// Longest request line accepted (its newline aside); a longer one is
/// refused and its connection closed.
const MAX_REQUEST: usize = 64 * 1024;

/// What the CLI asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Stats,
    Top,
    Reload,
    /// One page of the blocks and list entries, filtered.
    BlockList {
        /// Only this origin (`manual`, `harvest`…, `reject-list` for the
        /// reject lists' entries).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
        /// Only entries containing this address or network.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        covering: Option<String>,
        /// Where the previous page ended.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<ListCursor>,
        /// Most rows in this page (the agent caps it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows: Option<usize>,
    },
    BlockAdd {
        net: String,
        duration_secs: Option<u64>,
        /// The origin code (`manual` by default); `reason` in earlier
        /// versions.
        #[serde(alias = "reason")]
        origin: String,
        /// Free text beside the origin.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        comment: Option<String>,
    },
    BlockDel {
        net: String,
    },
    /// Whether and why an address is dropped.
    BlockCheck {
        address: String,
    },
    /// Blocks read from a file by the CLI (a batch of them).
    BlockImport {
        blocks: Vec<ImportBlock>,
    },
    AllowList,
    AllowAdd {
        net: String,
    },
    AllowDel {
        net: String,
    },
    LimitsShow,
    LimitsSet {
        name: String,
        value: String,
    },
    RecipientsCheck {
        address: String,
    },
    RecipientsStats,
    RecipientsRefresh {
        force: bool,
    },
}

/// Where a `block list` page ended: list entries come first (by network,
/// `expires_ns` absent), then blocks (by expiry, then network).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListCursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ns: Option<u64>,
    pub net: String,
}

/// One imported block, resolved by the CLI (defaults applied, expiry
/// absolute).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportBlock {
    pub net: String,
    pub origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Unix seconds; `None` = until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix: Option<u64>,
}

/// The agent's response: `data` on success, `error` otherwise. The agent
/// sends an [`Answer`]; the CLI reads `data` as the answer type of the
/// request it sent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// `data`'s default is `None`: no `T: Default`.
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Response<T = Answer> {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: Answer) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }
}

impl<T> Response<T> {
    pub fn error(message: impl Into<String>) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }
}

/// A request on its way to the agent's loop, with where to answer.
pub type Envelope = (Request, oneshot::Sender<Response>);

/// Binds the control socket: creates its directory (0750), replaces a stale
/// socket file, and restricts the socket to its owner (0600).
///
/// # Errors
/// The directory or socket cannot be created.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live agent answers; a dead one left its socket behind.
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use: another agent is running", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts CLI connections and forwards their requests to `agent`.
pub async fn serve(listener: UnixListener, agent: mpsc::Sender<Envelope>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(answer_connection(stream, agent));
    }
}

/// Answers one client's requests, one line each, until it hangs up or
/// sends a line longer than [`MAX_REQUEST`] (answered with an error, then
/// the connection is closed: nothing past the bound is buffered).
async fn answer_connection(stream: tokio::net::UnixStream, agent: mpsc::Sender<Envelope>) {
    let (read, mut write) = stream.into_split();
    let mut read = AsyncBufReader::new(read);
    loop {
        let mut line = Vec::new();
        // One byte past the bound tells an overlong line from one that
        // fills it exactly.
        let mut bounded = (&mut read).take(MAX_REQUEST as u64 + 1);
        match bounded.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let overlong = line.last() != Some(&b'\n') && line.len() > MAX_REQUEST;
        let response = if overlong {
            Response::error(format!(
                "bad request: longer than {} KiB",
                MAX_REQUEST / 1024
            ))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => {
                    let (tx, rx) = oneshot::channel();
                    if agent.send((request, tx)).await.is_err() {
                        Response::error("the agent is stopping")
                    } else {
                        rx.await
                            .unwrap_or_else(|_| Response::error("the agent dropped the request"))
                    }
                }
                Err(e) => Response::error(format!("bad request: {e}")),
            }
        };
        let mut text = serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() || overlong {
            return;
        }
    }
}

/// Why the CLI could not reach the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the agent is not running (no control socket at {path}: {source})")]
    NotRunning {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: bad response: {message}")]
    BadResponse { path: PathBuf, message: String },
}

/// Sends one request to the agent at `path` and waits for its response,
/// whose data is read as `T`: the answer type of `request`.
///
/// # Errors
/// The agent is not running, or the exchange failed.
pub fn request<T: DeserializeOwned>(
    path: &Path,
    request: &Request,
) -> Result<Response<T>, ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(|source| ClientError::NotRunning {
        path: path.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let mut writer = stream.try_clone().map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|e| io(std::io::Error::other(e)))?;
    line.push('\n');
    writer.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::BadResponse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let request = Request::BlockAdd {
            net: "192.0.2.7".into(),
            duration_secs: Some(60),
            origin: "manual".into(),
            comment: Some("ticket 4711".into()),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"command":"block-add","net":"192.0.2.7","duration_secs":60,"origin":"manual","comment":"ticket 4711"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"stats"}"#).unwrap(),
            Request::Stats
        );
        // What earlier versions sent still reads.
        assert_eq!(
            serde_json::from_str::<Request>(
                r#"{"command":"block-add","net":"192.0.2.7","duration_secs":null,"reason":"auth"}"#
            )
            .unwrap(),
            Request::BlockAdd {
                net: "192.0.2.7".into(),
                duration_secs: None,
                origin: "auth".into(),
                comment: None,
            }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"block-list"}"#).unwrap(),
            Request::BlockList {
                origin: None,
                covering: None,
                after: None,
                rows: None,
            }
        );
    }

    /// A control socket in a directory of its own, served by an agent
    /// that answers every request with the allow list `["<request>"]`;
    /// runs `client` on it (blocking) and removes the directory.
    async fn with_server<T: Send + 'static>(
        name: &str,
        client: impl FnOnce(PathBuf) -> T + Send + 'static,
    ) -> T {
        let dir = std::env::temp_dir().join(format!(
            "smtp-limiter-control-{name}-{}",
            std::process::id()
        ));
        let path = dir.join("control.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(
            bind(&path).is_err(),
            "a second agent is refused while the first listens"
        );
        let (tx, mut rx) = mpsc::channel::<Envelope>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some((request, answer)) = rx.recv().await {
                let _ = answer.send(Response::ok(Answer::AllowList(vec![format!(
                    "{request:?}"
                )])));
            }
        });
        let result = tokio::task::spawn_blocking(move || client(path))
            .await
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[tokio::test]
    async fn server_forwards_requests_and_answers() {
        let response = with_server("forwards", |path| {
            request::<Vec<String>>(&path, &Request::Reload).unwrap()
        })
        .await;
        assert!(response.ok);
        assert_eq!(response.data.unwrap(), ["Reload"]);
    }

    /// Sends `line` and reads one response line.
    fn exchange(stream: &mut BufReader<UnixStream>, line: &[u8]) -> Response<Vec<String>> {
        stream.get_mut().write_all(line).unwrap();
        let mut answer = String::new();
        stream.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    #[tokio::test]
    async fn one_connection_carries_requests_past_the_line_bound_in_total() {
        let answered = with_server("many", |path| {
            let mut stream = BufReader::new(UnixStream::connect(path).unwrap());
            // 2000 requests of 100 bytes: three times the line bound.
            let line = format!(
                "{}\n",
                serde_json::to_string(&Request::BlockCheck {
                    address: "x".repeat(61)
                })
                .unwrap()
            );
            assert_eq!(line.len(), 100);
            (0..2000)
                .filter(|_| exchange(&mut stream, line.as_bytes()).ok)
                .count()
        })
        .await;
        assert_eq!(answered, 2000);
    }

    #[tokio::test]
    async fn an_overlong_line_is_refused_and_the_connection_closed() {
        let (fits, refused, after) = with_server("overlong", |path| {
            let mut stream = BufReader::new(UnixStream::connect(path).unwrap());
            stream
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            // Exactly the bound fits: the request is padded with spaces.
            let request = serde_json::to_string(&Request::Stats).unwrap();
            let mut fits = request.clone().into_bytes();
            fits.resize(MAX_REQUEST, b' ');
            fits.push(b'\n');
            let fits = exchange(&mut stream, &fits);
            let mut overlong = request.into_bytes();
            overlong.resize(MAX_REQUEST + 1, b' ');
            overlong.push(b'\n');
            let refused = exchange(&mut stream, &overlong);
            // Closed: an end of file, or a reset (Linux resets a Unix
            // socket closed with unread bytes: the overlong line's newline).
            let mut after = String::new();
            let closed = match stream.read_line(&mut after) {
                Ok(n) => n == 0,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            };
            (fits, refused, closed)
        })
        .await;
        assert!(fits.ok, "{fits:?}");
        assert!(!refused.ok);
        assert!(
            refused
                .error
                .as_deref()
                .unwrap()
                .contains("longer than 64 KiB"),
            "{refused:?}"
        );
        assert!(after, "closed after the refusal");
    }
}
