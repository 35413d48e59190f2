//! Blocks that outlive the agent and the host: a snapshot and a journal in
//! `state.directory`.
//!
//! * `blocks.snapshot`: every block at some moment, one JSON object a line
//!   after a header line; replaced atomically (temporary file, fsync,
//!   rename, fsync of the directory), so a crash leaves the old or the new
//!   one, never half of one.
//! * `blocks.<N>.log`: the changes since (`{"put":{…}}` or `{"del":"net"}`,
//!   one a line), appended and `fdatasync`ed as they happen, a few at a time
//!   (one new block costs one short write and one sync, not a rewrite of
//!   every block).
//!
//! A background thread ([`Journal`]) takes the changes from the agent's
//! block table ([`crate::blocks::Blocks::attach_journal`]) and
//! writes them; when the journal holds more records than there are blocks
//! (or missed some), it writes a new snapshot, page by page, while changes
//! keep going to a new journal generation. The snapshot's header says from
//! which generation on the journals are to be replayed; replaying a change
//! twice is harmless (a put replaces, a del removes), so a snapshot taken
//! while blocks change is made exact by the journal that follows it.
//!
//! Why not an embedded database: the agent holds every block in memory
//! anyway (the table the proxy asks at accept), so the store only has to
//! make changes durable cheaply and give them back at start. A log does both
//! with sequential I/O, no dependency, files an operator can read with `jq`,
//! and a start that reads each byte once.
//!
//! Format 1, a single pretty-printed `blocks.json` rewritten whole after
//! each change, is still read: at the first start it is converted (a
//! snapshot is written, then `blocks.json` is removed).
//!
//! The pinned kernel maps survive an agent restart but not a reboot; on
//! start the agent restores from the store what the maps lack (expired
//! entries are dropped) and adopts what only the maps hold.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    blocks::{Block, Change, Reason},
    kernel::{Datapath, KernelBlock},
    proxy::ProxyContext,
};

/// The snapshot's name inside `state.directory`.
pub const SNAPSHOT_FILE: &str = "blocks.snapshot";
/// Format 1's file, read and converted at start.
pub const LEGACY_FILE: &str = "blocks.json";
/// The format version in the snapshot's header.
const VERSION: u32 = 2;
/// Format 1's version.
const LEGACY_VERSION: u32 = 1;
/// Changes the journal thread's queue holds before it counts them as lost
/// (and writes a snapshot instead).
pub const JOURNAL_QUEUE: usize = 1 << 16;
/// The journal is compacted once it holds more records than this and more
/// than there are blocks.
const COMPACT_AFTER: u64 = 10_000;
/// Blocks copied from the table per page while a snapshot is written (the
/// table's lock is held for one page at a time).
const SNAPSHOT_PAGE: usize = 4096;

/// A stored block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    pub net: IpNet,
    /// A [`Reason`]'s name (format 1 called it `reason`).
    #[serde(alias = "reason")]
    pub origin: String,
    /// Unix seconds; `None` = until removed.
    pub expires_unix: Option<u64>,
    /// Unix seconds when the block began, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix: Option<u64>,
    /// Earlier blocks of this source.
    #[serde(default)]
    pub repeat: u32,
    /// Free text beside the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// Format 1: the whole state in one document.
#[derive(Deserialize)]
struct LegacyFile {
    version: u32,
    blocks: Vec<StoredBlock>,
}

/// The snapshot's first line.
#[derive(Serialize, Deserialize)]
struct Header {
    smtp_limiter_blocks: u32,
    /// Journal generations from this one on are replayed after the snapshot.
    replay_from: u64,
}

/// One journal line.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record {
    Put(StoredBlock),
    Del(IpNet),
}

/// Errors reading or writing the state files, naming the file.
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

/// What [`Store::load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The blocks still active, in no particular order.
    pub blocks: Vec<StoredBlock>,
    /// Format 1's `blocks.json` was read: a snapshot should be written.
    pub legacy: bool,
    /// Journal records replayed.
    pub records: u64,
    /// Lines that could not be read (`file:line: why`); a torn last line
    /// of a journal (a crash during a write) is not among them.
    pub skipped: Vec<String>,
}

/// The state directory.
pub struct Store {
    dir: PathBuf,
    log: Mutex<Log>,
}

/// The journal being appended to.
struct Log {
    generation: u64,
    file: Option<File>,
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
            log: Mutex::new(Log {
                generation: 0,
                file: None,
            }),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn log_path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("blocks.{generation}.log"))
    }

    /// Journal generations present, ascending.
    fn generations(&self) -> Result<Vec<u64>, StateError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let mut found: Vec<u64> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_prefix("blocks.")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        found.sort_unstable();
        Ok(found)
    }

    /// The stored blocks still active at `now`: the snapshot (or format 1's
    /// file) and the journals after it. New changes then go to a journal
    /// generation of their own.
    ///
    /// # Errors
    /// An unreadable file, a snapshot or format 1 file that is not one. Bad
    /// journal lines are skipped and reported in [`Loaded::skipped`].
    pub fn load(&self, now: SystemTime) -> Result<Loaded, StateError> {
        let mut loaded = Loaded::default();
        // The snapshot in file order (a block written twice by a snapshot
        // taken while it changed: the later line wins when the agent puts
        // them into its table), then the journals' last word per network,
        // which overrides it. No map of every block: at a million blocks
        // building one cost more than parsing.
        let mut blocks: Vec<StoredBlock> = Vec::new();
        let mut changes: HashMap<IpNet, Option<StoredBlock>> = HashMap::new();
        let snapshot = self.path(SNAPSHOT_FILE);
        let replay_from = match File::open(&snapshot) {
            Ok(file) => read_snapshot(&snapshot, file, &mut blocks)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let legacy = self.path(LEGACY_FILE);
                match fs::read(&legacy) {
                    Ok(text) => {
                        blocks = read_legacy(&legacy, &text)?;
                        loaded.legacy = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(StateError::Io {
                            path: legacy,
                            source,
                        })
                    }
                }
                0
            }
            Err(source) => {
                return Err(StateError::Io {
                    path: snapshot,
                    source,
                })
            }
        };
        let generations = self.generations()?;
        for generation in generations.iter().filter(|g| **g >= replay_from) {
            let path = self.log_path(*generation);
            loaded.records += replay(&path, &mut changes, &mut loaded.skipped)?;
        }
        let last = generations.last().copied().unwrap_or(0).max(replay_from);
        {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            // A fresh generation: a torn line at the end of the last one
            // stays a line of its own.
            log.generation = last + 1;
            log.file = None;
        }
        let now = unix(now);
        if !changes.is_empty() {
            blocks.retain(|b| !changes.contains_key(&b.net));
            blocks.extend(changes.into_values().flatten());
        }
        blocks.retain(|b| b.expires_unix.is_none_or(|t| t > now));
        loaded.blocks = blocks;
        Ok(loaded)
    }

    /// Appends changes to the journal and syncs them to disk.
    ///
    /// # Errors
    /// The journal cannot be opened, written or synced.
    pub fn append(&self, changes: &[Change]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut text = Vec::with_capacity(changes.len() * 160);
        for change in changes {
            let record = match change {
                Change::Put(block) => Record::Put(StoredBlock::from(block)),
                Change::Remove(net) => Record::Del(*net),
            };
            serde_json::to_writer(&mut text, &record).map_err(|e| StateError::Io {
                path: self.dir.clone(),
                source: std::io::Error::other(e),
            })?;
            text.push(b'\n');
        }
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.log_path(log.generation);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        if log.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            // A new file's name must be durable too.
            sync_dir(&self.dir).map_err(io)?;
            log.file = Some(file);
        }
        let file = log.file.as_mut().expect("opened above");
        file.write_all(&text).map_err(io)?;
        file.sync_data().map_err(io)
    }

    /// Starts a snapshot: from now on changes go to a new journal
    /// generation, which the snapshot's header names as the first to
    /// replay after it.
    ///
    /// # Errors
    /// The temporary snapshot file cannot be created.
    pub fn begin_snapshot(&self) -> Result<Snapshot, StateError> {
        let replay_from = {
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            log.generation += 1;
            log.file = None;
            log.generation
        };
        let tmp = self.path(&format!(".{SNAPSHOT_FILE}.tmp"));
        let file = File::create(&tmp).map_err(|source| StateError::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut snapshot = Snapshot {
            writer: BufWriter::with_capacity(1 << 20, file),
            tmp,
            replay_from,
            written: 0,
        };
        let header = Header {
            smtp_limiter_blocks: VERSION,
            replay_from,
        };
        snapshot.line(&header)?;
        Ok(snapshot)
    }

    /// Puts a finished snapshot in place and removes the journals and the
    /// format 1 file it replaces.
    ///
    /// # Errors
    /// The snapshot cannot be written, synced or renamed (the previous one
    /// and every journal then stay).
    pub fn finish_snapshot(&self, snapshot: Snapshot) -> Result<u64, StateError> {
        let Snapshot {
            writer,
            tmp,
            replay_from,
            written,
        } = snapshot;
        let path = self.path(SNAPSHOT_FILE);
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let file = writer.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io)?;
        sync_dir(&self.dir).map_err(io)?;
        for generation in self.generations()? {
            if generation < replay_from {
                let _ = fs::remove_file(self.log_path(generation));
            }
        }
        let _ = fs::remove_file(self.path(LEGACY_FILE));
        Ok(written)
    }

    /// Replaces the stored state with `blocks` (a snapshot and an empty
    /// journal).
    ///
    /// # Errors
    /// As [`Store::begin_snapshot`] and [`Store::finish_snapshot`].
    pub fn save(&self, blocks: &[StoredBlock]) -> Result<(), StateError> {
        let mut snapshot = self.begin_snapshot()?;
        for block in blocks {
            snapshot.write(block)?;
        }
        self.finish_snapshot(snapshot)?;
        Ok(())
    }

    /// Bytes the store's files take (snapshot, journals, format 1 file).
    pub fn size(&self) -> u64 {
        fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("blocks.") || name == LEGACY_FILE
            })
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

/// A snapshot being written ([`Store::begin_snapshot`]).
pub struct Snapshot {
    writer: BufWriter<File>,
    tmp: PathBuf,
    replay_from: u64,
    written: u64,
}

impl Snapshot {
    fn line(&mut self, value: &impl Serialize) -> Result<(), StateError> {
        let io = |source| StateError::Io {
            path: self.tmp.clone(),
            source,
        };
        serde_json::to_writer(&mut self.writer, value).map_err(|e| io(std::io::Error::other(e)))?;
        self.writer.write_all(b"\n").map_err(io)
    }

    /// Adds a block.
    ///
    /// # Errors
    /// The temporary file cannot be written.
    pub fn write(&mut self, block: &StoredBlock) -> Result<(), StateError> {
        self.line(block)?;
        self.written += 1;
        Ok(())
    }
}

fn read_snapshot(
    path: &Path,
    mut file: File,
    blocks: &mut Vec<StoredBlock>,
) -> Result<u64, StateError> {
    // Read whole and parsed in place: a line per block, no allocation per
    // line (a million blocks is about 100 MiB, read once at start).
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut text).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })?;
    let format = |message: String| StateError::Format {
        path: path.to_owned(),
        message,
    };
    let mut lines = text.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let header = lines.next().ok_or_else(|| format("empty file".into()))?;
    let header: Header =
        serde_json::from_slice(header).map_err(|e| format(format!("line 1: {e}")))?;
    if header.smtp_limiter_blocks != VERSION {
        return Err(format(format!(
            "format {} (this agent reads {VERSION})",
            header.smtp_limiter_blocks
        )));
    }
    blocks.reserve(text.iter().filter(|b| **b == b'\n').count());
    for (i, line) in lines.enumerate() {
        let block: StoredBlock =
            serde_json::from_slice(line).map_err(|e| format(format!("line {}: {e}", i + 2)))?;
        blocks.push(block);
    }
    Ok(header.replay_from)
}

fn read_legacy(path: &Path, text: &[u8]) -> Result<Vec<StoredBlock>, StateError> {
    let file: LegacyFile = serde_json::from_slice(text).map_err(|e| StateError::Format {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if file.version != LEGACY_VERSION {
        return Err(StateError::Format {
            path: path.to_owned(),
            message: format!(
                "version {} (this agent reads {LEGACY_VERSION} in {LEGACY_FILE}, and {SNAPSHOT_FILE})",
                file.version
            ),
        });
    }
    Ok(file.blocks)
}

/// Applies one journal to `changes` (the last word per network: a block,
/// or `None` for a removal); returns the records applied.
fn replay(
    path: &Path,
    changes: &mut HashMap<IpNet, Option<StoredBlock>>,
    skipped: &mut Vec<String>,
) -> Result<u64, StateError> {
    let text = fs::read(path).map_err(|source| StateError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut applied = 0;
    let mut rest = &text[..];
    let mut number = 0;
    while !rest.is_empty() {
        number += 1;
        let (line, complete) = match rest.iter().position(|b| *b == b'\n') {
            Some(end) => {
                let line = &rest[..end];
                rest = &rest[end + 1..];
                (line, true)
            }
            None => {
                let line = rest;
                rest = &[];
                (line, false)
            }
        };
        match serde_json::from_slice::<Record>(line) {
            Ok(Record::Put(block)) => {
                changes.insert(block.net, Some(block));
                applied += 1;
            }
            Ok(Record::Del(net)) => {
                changes.insert(net, None);
                applied += 1;
            }
            // A crash during the last write: that change was not
            // acknowledged as stored.
            Err(_) if !complete => {}
            Err(e) => skipped.push(format!("{}:{number}: {e}", path.display())),
        }
    }
    Ok(applied)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

impl From<&Block> for StoredBlock {
    fn from(block: &Block) -> Self {
        Self {
            net: block.net,
            origin: block.origin.name().to_owned(),
            expires_unix: block.expires.map(unix),
            since_unix: Some(unix(block.since)),
            repeat: block.repeat,
            comment: block.comment.as_deref().map(str::to_owned),
        }
    }
}

impl From<&StoredBlock> for Block {
    /// An origin this version does not know (a newer agent's) counts as
    /// `manual`; a block without a recorded start began now.
    fn from(block: &StoredBlock) -> Self {
        let at = |secs| UNIX_EPOCH + Duration::from_secs(secs);
        Self {
            net: block.net,
            origin: Reason::from_name(&block.origin).unwrap_or(Reason::Manual),
            expires: block.expires_unix.map(at),
            since: block.since_unix.map_or_else(SystemTime::now, at),
            repeat: block.repeat,
            comment: block.comment.as_deref().map(Arc::from),
        }
    }
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// Restore at start

/// What [`restore`] did.
#[derive(Debug, Default)]
pub struct Restored {
    /// Stored blocks put into the agent's table.
    pub stored: usize,
    /// Of those, put into the kernel (it lacked them).
    pub restored_to_kernel: usize,
    /// Kernel blocks the store lacked, taken into the table.
    pub adopted: usize,
    /// Kernel entries of a list that no longer holds them, removed.
    pub stale_list_entries: usize,
    /// The store should write a snapshot (format 1 read, blocks adopted, or
    /// journals longer than the table).
    pub snapshot_wanted: bool,
}

/// Puts the stored blocks into the agent's table and the kernel (what it
/// lacks), and takes into the table what only the kernel holds: blocks of
/// an earlier run that never reached the store, so that the table is the
/// whole picture. A `reject-list` kernel entry that `listed` does not hold
/// any more (the list changed while the agent was stopped) is removed.
pub fn restore(
    store: &Store,
    ctx: &ProxyContext,
    datapath: &dyn Datapath,
    listed: &dyn Fn(&IpNet) -> bool,
) -> Restored {
    let mut restored = Restored::default();
    let loaded = match store.load(SystemTime::now()) {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(error = %e, "stored blocks not restored");
            return restored;
        }
    };
    for problem in &loaded.skipped {
        tracing::warn!(problem, "state: a journal line could not be read; skipped");
    }
    if loaded.legacy {
        tracing::info!(
            file = %store.path(LEGACY_FILE).display(),
            "state: reading format 1 (blocks.json); it is converted to blocks.snapshot and blocks.<N>.log, then removed"
        );
    }
    let kernel: HashMap<IpNet, KernelBlock> = datapath
        .blocks()
        .map(|b| b.into_iter().map(|b| (b.net, b)).collect())
        .unwrap_or_default();
    for block in &loaded.blocks {
        let active = Block::from(block);
        let mut in_kernel = kernel.contains_key(&block.net);
        if !in_kernel {
            match datapath.block(block.net, active.expires, active.origin) {
                Ok(()) => {
                    restored.restored_to_kernel += 1;
                    in_kernel = true;
                }
                Err(e) => {
                    tracing::debug!(net = %block.net, error = %e, "stored block not put into the kernel")
                }
            }
        }
        ctx.blocks.insert_marked(active, in_kernel);
    }
    restored.stored = loaded.blocks.len();
    (restored.adopted, restored.stale_list_entries) =
        adopt_kernel_blocks(ctx, datapath, kernel.into_values(), listed, true);
    // Journals that outgrew the table in earlier runs are folded at once,
    // not replayed at every start until this run's changes outgrow it too.
    let outgrown = loaded.records > COMPACT_AFTER && loaded.records > ctx.blocks.len() as u64;
    restored.snapshot_wanted = loaded.legacy || restored.adopted > 0 || outgrown;
    tracing::info!(
        stored = restored.stored,
        restored_to_kernel = restored.restored_to_kernel,
        adopted_from_kernel = restored.adopted,
        stale_list_entries = restored.stale_list_entries,
        journal_records = loaded.records,
        "stored blocks loaded"
    );
    restored
}

/// Takes into the agent's table (and so into the store) the kernel's
/// blocks it lacks: entries put there behind the agent's back (`bpftool`,
/// the library) or by an earlier run, so that they survive a reboot too.
/// A `reject-list` entry is a list's, not a block: one that `listed` does
/// not hold any more is removed when `remove_stale` (at start). Returns
/// (adopted, removed).
pub fn adopt_kernel_blocks(
    ctx: &ProxyContext,
    datapath: &dyn Datapath,
    kernel: impl IntoIterator<Item = KernelBlock>,
    listed: &dyn Fn(&IpNet) -> bool,
    remove_stale: bool,
) -> (usize, usize) {
    let now = SystemTime::now();
    let (mut adopted, mut removed) = (0, 0);
    for block in kernel {
        let net = block.net;
        if block.expires.is_some_and(|t| t <= now) || ctx.blocks.contains(&net) {
            continue;
        }
        if block.origin == Some(Reason::RejectList) {
            if remove_stale && !listed(&net) && datapath.unblock(net).unwrap_or(false) {
                removed += 1;
            }
            continue;
        }
        ctx.blocks.insert_marked(
            Block {
                net,
                // Put there by another tool, with a code this version
                // does not know: an operator's.
                origin: block.origin.unwrap_or(Reason::Manual),
                expires: block.expires,
                since: now,
                repeat: 0,
                comment: None,
            },
            true,
        );
        adopted += 1;
    }
    (adopted, removed)
}

// ---------------------------------------------------------------------------
// The journal thread

/// The thread that writes the block table's changes to the store.
pub struct Journal {
    thread: Option<std::thread::JoinHandle<()>>,
    ctx: Arc<ProxyContext>,
    snapshot_wanted: Arc<AtomicBool>,
}

impl Journal {
    /// Attaches a journal to `ctx.blocks` and starts writing its changes to
    /// `store`. With `snapshot_wanted` (format 1 read, blocks adopted), the
    /// first thing it writes is a snapshot.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start(
        store: Arc<Store>,
        ctx: Arc<ProxyContext>,
        snapshot_wanted: bool,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(JOURNAL_QUEUE);
        ctx.blocks.attach_journal(tx);
        let wanted = Arc::new(AtomicBool::new(snapshot_wanted));
        let thread = {
            let (ctx, wanted) = (ctx.clone(), wanted.clone());
            std::thread::Builder::new()
                .name("state-journal".into())
                .spawn(move || write_changes(&store, &ctx, &rx, &wanted))?
        };
        Ok(Self {
            thread: Some(thread),
            ctx,
            snapshot_wanted: wanted,
        })
    }

    /// Asks for a snapshot soon (e.g. after an import of many blocks).
    pub fn request_snapshot(&self) {
        self.snapshot_wanted.store(true, Ordering::Release);
    }

    /// Writes what is queued and stops.
    pub fn close(mut self) {
        self.ctx.blocks.detach_journal();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.ctx.blocks.detach_journal();
    }
}

/// The journal thread's loop: batches of changes appended and synced; a
/// snapshot when the journal outgrew the table or missed changes.
fn write_changes(
    store: &Store,
    ctx: &ProxyContext,
    rx: &Receiver<Change>,
    snapshot_wanted: &AtomicBool,
) {
    let mut since_snapshot: u64 = 0;
    let mut batch = Vec::new();
    let mut failing = false;
    loop {
        let open = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(change) => {
                batch.push(change);
                true
            }
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => false,
        };
        drain(rx, &mut batch);
        since_snapshot += batch.len() as u64;
        append(store, &mut batch, &mut failing);
        if !open {
            return;
        }
        let lost = ctx.blocks.take_journal_lost();
        if lost > 0 {
            tracing::warn!(
                lost,
                "state: the journal queue was full; writing a snapshot"
            );
        }
        let outgrown = since_snapshot > COMPACT_AFTER && since_snapshot > ctx.blocks.len() as u64;
        if lost > 0 || outgrown || snapshot_wanted.swap(false, Ordering::AcqRel) {
            let started = std::time::Instant::now();
            match snapshot(store, ctx, rx, &mut failing) {
                Ok(written) => {
                    tracing::info!(
                        blocks = written,
                        records = since_snapshot,
                        seconds = started.elapsed().as_secs_f64(),
                        "state: snapshot written, journal compacted"
                    );
                    since_snapshot = 0;
                }
                Err(e) => {
                    tracing::error!(error = %e, "state: writing a snapshot failed; the journal stays")
                }
            }
        }
    }
}

fn drain(rx: &Receiver<Change>, batch: &mut Vec<Change>) {
    while batch.len() < SNAPSHOT_PAGE {
        match rx.try_recv() {
            Ok(change) => batch.push(change),
            Err(_) => return,
        }
    }
}

fn append(store: &Store, batch: &mut Vec<Change>, failing: &mut bool) {
    if batch.is_empty() {
        return;
    }
    match store.append(batch) {
        Ok(()) if *failing => {
            *failing = false;
            tracing::info!("state: blocks are stored again");
        }
        Ok(()) => {}
        // Once per failure, not once per block.
        Err(e) if !*failing => {
            *failing = true;
            tracing::error!(error = %e, "BLOCKS ARE NOT STORED: writing the state journal failed");
        }
        Err(_) => {}
    }
    batch.clear();
}

/// Writes the table as a new snapshot, a page at a time, appending the
/// changes that come meanwhile to the new journal generation.
fn snapshot(
    store: &Store,
    ctx: &ProxyContext,
    rx: &Receiver<Change>,
    failing: &mut bool,
) -> Result<u64, StateError> {
    let mut snapshot = store.begin_snapshot()?;
    let mut after = None;
    let mut batch = Vec::new();
    loop {
        let now = SystemTime::now();
        let page = ctx.blocks.page(after, SNAPSHOT_PAGE, SNAPSHOT_PAGE, |b| {
            b.expires.is_none_or(|t| t > now)
        });
        for (block, _) in &page.rows {
            snapshot.write(&StoredBlock::from(block))?;
        }
        drain(rx, &mut batch);
        append(store, &mut batch, failing);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    store.finish_snapshot(snapshot)
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

    fn stored_block(net: &str, expires_unix: Option<u64>) -> StoredBlock {
        StoredBlock {
            net: net.parse().unwrap(),
            origin: "harvest".into(),
            expires_unix,
            since_unix: Some(1_700_000_000),
            repeat: 0,
            comment: None,
        }
    }

    fn sorted(mut blocks: Vec<StoredBlock>) -> Vec<StoredBlock> {
        blocks.sort_by_key(|b| b.net);
        blocks
    }

    #[test]
    fn saves_and_loads_dropping_expired_blocks() {
        let dir = temp_dir("roundtrip");
        let store = Store::open(&dir).unwrap();
        let now = SystemTime::now();
        assert!(store.load(now).unwrap().blocks.is_empty(), "no file yet");
        let blocks = vec![
            StoredBlock {
                repeat: 2,
                comment: Some("ticket 4711: spam run".into()),
                ..stored_block("192.0.2.7/32", Some(unix(now) + 600))
            },
            StoredBlock {
                origin: "manual".into(),
                since_unix: None,
                ..stored_block("2001:db8::/64", None)
            },
            stored_block("198.51.100.1/32", Some(unix(now) - 1)),
        ];
        store.save(&blocks).unwrap();
        let loaded = store.load(now).unwrap();
        assert_eq!(sorted(loaded.blocks.clone()), sorted(blocks[..2].to_vec()));
        assert!(!loaded.legacy);
        assert!(
            !dir.join(format!(".{SNAPSHOT_FILE}.tmp")).exists(),
            "no temporary file left"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_journal_replays_on_top_of_the_snapshot_and_survives_a_torn_line() {
        let dir = temp_dir("journal");
        let store = Store::open(&dir).unwrap();
        let now = SystemTime::now();
        store.load(now).unwrap();
        store
            .save(&[
                stored_block("192.0.2.1/32", None),
                stored_block("192.0.2.2/32", None),
            ])
            .unwrap();
        let put = |net: &str, comment: &str| {
            Change::Put(Block {
                comment: Some(Arc::from(comment)),
                ..Block::from(&stored_block(net, None))
            })
        };
        store
            .append(&[
                put("192.0.2.3/32", "new"),
                Change::Remove("192.0.2.1/32".parse().unwrap()),
            ])
            .unwrap();
        store.append(&[put("192.0.2.2/32", "replaced")]).unwrap();
        // A crash in the middle of a write leaves half a line.
        let log = store.log_path(store.log.lock().unwrap().generation);
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(br#"{"put":{"net":"192.0.2.9/32","ori"#)
            .unwrap();
        drop(file);

        let again = Store::open(&dir).unwrap();
        let loaded = again.load(now).unwrap();
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        assert_eq!(loaded.records, 3);
        let nets: Vec<(String, Option<String>)> = sorted(loaded.blocks)
            .into_iter()
            .map(|b| (b.net.to_string(), b.comment))
            .collect();
        assert_eq!(
            nets,
            [
                ("192.0.2.2/32".to_owned(), Some("replaced".to_owned())),
                ("192.0.2.3/32".to_owned(), Some("new".to_owned())),
            ]
        );
        // New changes go to a new generation, after the torn one; a bad
        // line in the middle is reported and skipped.
        again.append(&[put("192.0.2.4/32", "after")]).unwrap();
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(b"garbage\n").unwrap();
        drop(file);
        let loaded = Store::open(&dir).unwrap().load(now).unwrap();
        assert_eq!(loaded.blocks.len(), 3);
        assert_eq!(loaded.skipped.len(), 1, "{:?}", loaded.skipped);
        assert!(loaded.skipped[0].contains(".log:"), "{:?}", loaded.skipped);

        // A snapshot replaces the journals.
        let store = Store::open(&dir).unwrap();
        let blocks = store.load(now).unwrap().blocks;
        store.save(&blocks).unwrap();
        let logs = store.generations().unwrap();
        assert!(logs.is_empty(), "journals left: {logs:?}");
        assert_eq!(
            Store::open(&dir).unwrap().load(now).unwrap().blocks.len(),
            3
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn format_1_is_read_and_replaced_by_the_first_snapshot() {
        let dir = temp_dir("legacy");
        fs::create_dir_all(&dir).unwrap();
        // As the previous version wrote it (pretty, `reason` = the origin).
        fs::write(
            dir.join(LEGACY_FILE),
            r#"{
  "version": 1,
  "blocks": [
    { "net": "192.0.2.7/32", "reason": "auth", "expires_unix": null, "since_unix": 1700000000, "repeat": 1 },
    { "net": "198.51.100.0/24", "reason": "manual", "expires_unix": null }
  ]
}"#,
        )
        .unwrap();
        let store = Store::open(&dir).unwrap();
        let loaded = store.load(SystemTime::now()).unwrap();
        assert!(loaded.legacy);
        let blocks = sorted(loaded.blocks);
        assert_eq!(blocks[0].origin, "auth");
        assert_eq!(blocks[0].repeat, 1);
        assert_eq!(blocks[1].origin, "manual");
        store.save(&blocks).unwrap();
        assert!(!dir.join(LEGACY_FILE).exists(), "converted, then removed");
        let again = Store::open(&dir).unwrap().load(SystemTime::now()).unwrap();
        assert!(!again.legacy);
        assert_eq!(sorted(again.blocks), blocks);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_path() {
        let dir = temp_dir("corrupt");
        let store = Store::open(&dir).unwrap();
        fs::write(dir.join(LEGACY_FILE), "{not json").unwrap();
        let err = store.load(SystemTime::now()).unwrap_err().to_string();
        assert!(
            err.contains(LEGACY_FILE) && err.contains("move it away"),
            "{err}"
        );
        fs::write(
            dir.join(SNAPSHOT_FILE),
            "{\"smtp_limiter_blocks\":9,\"replay_from\":0}\n",
        )
        .unwrap();
        let err = store.load(SystemTime::now()).unwrap_err().to_string();
        assert!(
            err.contains(SNAPSHOT_FILE) && err.contains("format 9"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_journal_thread_stores_changes_and_compacts() {
        use crate::{config::Config, kernel::NoKernel};
        let dir = temp_dir("thread");
        let store = Arc::new(Store::open(&dir).unwrap());
        store.load(SystemTime::now()).unwrap();
        let kernel: Arc<dyn Datapath> = Arc::new(NoKernel::new("test"));
        let ctx = Arc::new(ProxyContext::new(&Config::default(), kernel).unwrap());
        let journal = Journal::start(store.clone(), ctx.clone(), false).unwrap();
        let block = |i: u32| Block {
            comment: Some(Arc::from(format!("block {i}"))),
            ..Block::from(&stored_block(
                &format!("10.1.{}.{}/32", i / 256, i % 256),
                None,
            ))
        };
        for i in 0..300 {
            ctx.blocks.insert(block(i));
        }
        assert!(ctx.blocks.remove(&block(7).net));
        journal.request_snapshot();
        for i in 300..310 {
            ctx.blocks.insert(block(i));
        }
        journal.close();
        let loaded = Store::open(&dir).unwrap().load(SystemTime::now()).unwrap();
        assert_eq!(loaded.blocks.len(), 309);
        assert!(loaded.blocks.iter().all(|b| b.net != block(7).net));
        assert!(loaded
            .blocks
            .iter()
            .any(|b| b.comment.as_deref() == Some("block 309")));
        fs::remove_dir_all(&dir).unwrap();
    }
}
