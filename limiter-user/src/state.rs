//! Blocks that outlive the agent and the host: a JSON file in
//! `state.directory`, replaced atomically (write a temporary file, fsync,
//! rename, fsync the directory), so a crash leaves either the old or the new
//! file, never half of one. A plain file suffices: a few hundred thousand
//! entries at most, written in one go when blocks change; no embedded
//! database to operate.
//!
//! The pinned kernel maps survive an agent restart but not a reboot; on
//! start the agent restores from this file what the maps lack (expired
//! entries are dropped), and it saves the maps' blocks back regularly and
//! after each block it orders.

use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::kernel::KernelBlock;

/// The file's name inside `state.directory`.
pub const BLOCKS_FILE: &str = "blocks.json";
/// Format version, bumped on incompatible changes.
const VERSION: u32 = 1;

/// A stored block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    pub net: IpNet,
    /// One of `limiter_common::reason`, by name.
    pub reason: String,
    /// Unix seconds; `None` = until removed.
    pub expires_unix: Option<u64>,
    /// Unix seconds when the block began, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix: Option<u64>,
    /// Earlier blocks of this source.
    #[serde(default)]
    pub repeat: u32,
}

#[derive(Serialize, Deserialize)]
struct BlocksFile {
    version: u32,
    blocks: Vec<StoredBlock>,
}

/// Errors reading or writing the state file, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid blocks file ({message}); move it away to start without it")]
    Format { path: PathBuf, message: String },
}

/// The state directory.
pub struct Store {
    dir: PathBuf,
    /// One writer at a time: saves may come from a background task and from
    /// the agent's shutdown at once, and share the temporary file.
    writing: std::sync::Mutex<()>,
}

impl Store {
    /// Opens (creating) the state directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            writing: std::sync::Mutex::new(()),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(BLOCKS_FILE)
    }

    /// The stored blocks still active at `now` (none if there is no file).
    ///
    /// # Errors
    /// Unreadable or invalid file.
    pub fn load(&self, now: SystemTime) -> Result<Vec<StoredBlock>, StateError> {
        let path = self.path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let file: BlocksFile = serde_json::from_str(&text).map_err(|e| StateError::Format {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if file.version != VERSION {
            return Err(StateError::Format {
                path,
                message: format!("version {} (this agent reads {VERSION})", file.version),
            });
        }
        let now = unix(now);
        Ok(file
            .blocks
            .into_iter()
            .filter(|b| b.expires_unix.is_none_or(|t| t > now))
            .collect())
    }

    /// Replaces the stored blocks atomically.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&self, blocks: &[StoredBlock]) -> Result<(), StateError> {
        let _writing = self
            .writing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let path = self.path();
        let tmp = self.dir.join(format!(".{BLOCKS_FILE}.tmp"));
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let text = serde_json::to_vec_pretty(&BlocksFile {
            version: VERSION,
            blocks: blocks.to_vec(),
        })
        .map_err(|e| io(std::io::Error::other(e)))?;
        let mut file = File::create(&tmp).map_err(io)?;
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

/// The stored form of a kernel block.
pub fn stored(block: &KernelBlock) -> StoredBlock {
    StoredBlock {
        net: block.net,
        reason: limiter_common::reason::name(block.reason).to_owned(),
        expires_unix: block.expires.map(unix),
        since_unix: None,
        repeat: 0,
    }
}

/// The stored form of a block the proxy holds.
pub fn stored_active(block: &crate::proxy::blocks::ActiveBlock) -> StoredBlock {
    StoredBlock {
        net: block.net,
        reason: limiter_common::reason::name(block.reason).to_owned(),
        expires_unix: block.expires.map(unix),
        since_unix: Some(unix(block.since)),
        repeat: block.repeat,
    }
}

/// When a stored block began (now, if it was not recorded).
pub fn since(block: &StoredBlock) -> SystemTime {
    block
        .since_unix
        .map_or_else(SystemTime::now, |t| UNIX_EPOCH + Duration::from_secs(t))
}

/// The reason code of a stored block's reason name.
pub fn reason_code(name: &str) -> u32 {
    limiter_common::reason::from_name(name).unwrap_or(limiter_common::reason::MANUAL)
}

/// The expiry of a stored block.
pub fn expires(block: &StoredBlock) -> Option<SystemTime> {
    block
        .expires_unix
        .map(|t| UNIX_EPOCH + Duration::from_secs(t))
}

fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("smtp-limiter-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saves_and_loads_dropping_expired_blocks() {
        let dir = temp_dir("roundtrip");
        let store = Store::open(&dir).unwrap();
        let now = SystemTime::now();
        assert!(store.load(now).unwrap().is_empty(), "no file yet");
        let blocks = vec![
            StoredBlock {
                net: "192.0.2.7/32".parse().unwrap(),
                reason: "harvest".into(),
                expires_unix: Some(unix(now) + 600),
                since_unix: Some(unix(now) - 60),
                repeat: 2,
            },
            StoredBlock {
                net: "2001:db8::/64".parse().unwrap(),
                reason: "manual".into(),
                expires_unix: None,
                since_unix: None,
                repeat: 0,
            },
            StoredBlock {
                net: "198.51.100.1/32".parse().unwrap(),
                reason: "auth".into(),
                expires_unix: Some(unix(now) - 1),
                since_unix: None,
                repeat: 0,
            },
        ];
        store.save(&blocks).unwrap();
        let loaded = store.load(now).unwrap();
        assert_eq!(loaded, blocks[..2].to_vec());
        assert_eq!(
            reason_code(&loaded[0].reason),
            limiter_common::reason::HARVEST
        );
        assert!(
            !dir.join(format!(".{BLOCKS_FILE}.tmp")).exists(),
            "no temporary file left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_path() {
        let dir = temp_dir("corrupt");
        let store = Store::open(&dir).unwrap();
        fs::write(dir.join(BLOCKS_FILE), "{not json").unwrap();
        let err = store.load(SystemTime::now()).unwrap_err().to_string();
        assert!(
            err.contains(BLOCKS_FILE) && err.contains("move it away"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
