//! The control socket: how the `smtp-limiter` CLI talks to the running
//! agent. A Unix socket (mode 0600: only root and the agent's user may
//! change anything), one JSON request per line, one JSON response per line.
//! The server only parses and forwards requests; the agent's main loop
//! carries them out one at a time, so they never race with reloads.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// Longest request line accepted.
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

/// The agent's answer: `data` on success, `error` otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

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
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            // One client's requests together stay under the bound.
            let mut lines = tokio::io::BufReader::new(read.take(MAX_REQUEST as u64)).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let response = match serde_json::from_str::<Request>(&line) {
                    Ok(request) => {
                        let (tx, rx) = oneshot::channel();
                        if agent.send((request, tx)).await.is_err() {
                            Response::error("the agent is stopping")
                        } else {
                            rx.await.unwrap_or_else(|_| {
                                Response::error("the agent dropped the request")
                            })
                        }
                    }
                    Err(e) => Response::error(format!("bad request: {e}")),
                };
                let mut text =
                    serde_json::to_string(&response).unwrap_or_else(|_| "{\"ok\":false}".into());
                text.push('\n');
                if write.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
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

/// Sends one request to the agent at `path` and waits for its response.
///
/// # Errors
/// The agent is not running, or the exchange failed.
pub fn request(path: &Path, request: &Request) -> Result<Response, ClientError> {
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

    #[tokio::test]
    async fn server_forwards_requests_and_answers() {
        let dir = std::env::temp_dir().join(format!("smtp-limiter-control-{}", std::process::id()));
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
                let _ = answer.send(Response::ok(
                    serde_json::json!({ "echo": format!("{request:?}") }),
                ));
            }
        });
        let client_path = path.clone();
        let response = tokio::task::spawn_blocking(move || request(&client_path, &Request::Reload))
            .await
            .unwrap()
            .unwrap();
        assert!(response.ok);
        assert_eq!(response.data.unwrap()["echo"], "Reload");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
