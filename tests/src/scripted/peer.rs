//! A scripted peer for raw protocols (a stand-in for rspamd or clamd that
//! is slow or answers nonsense): plain std threads on `127.0.0.1:0` (in
//! the network namespace of the thread that starts it), each connection
//! playing its own list of [`Step`]s, and a record of what each connection
//! sent.
//!
//! Connection `n` (in accept order, from 0) plays `scripts[n]`; a
//! connection beyond the scripts is closed at once without a word (and
//! counted). After its last step a connection that was not closed keeps
//! reading (and recording) until the client closes it or the peer is
//! dropped: a peer that never answers is a script without a `Write`.
//!
//! Bounded (recorded bytes per connection, connections, flood sizes) and
//! never panics on what it reads; its threads notice the drop within
//! [`POLL`].

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::POLL;

/// Bytes recorded per connection; the rest is read and counted only.
const MAX_RECORDED: usize = 1 << 20;
/// Connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// Largest [`Step::Flood`].
const MAX_FLOOD: usize = 256 << 20;

/// One step of a connection's script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Read until these bytes have arrived (after what earlier
    /// `ReadUntil`s matched). The client closing first ends the script.
    ReadUntil(Vec<u8>),
    /// Read on (and record) until the test calls
    /// [`ScriptedPeer::release`] for this connection; the client closing
    /// first ends the script.
    AwaitRelease,
    /// Read on (and record) for this long: a slow peer. The client closing
    /// first ends the script.
    Sleep(Duration),
    /// Neither read nor write until the peer is dropped: the client's
    /// writes block once the socket buffers are full.
    Stall,
    /// Write these bytes (a failed write ends the script).
    Write(Vec<u8>),
    /// Write `chunk` again and again, `total` bytes in all (at most
    /// 256 MiB), or until the client stops taking them (closes, or the
    /// peer is dropped).
    Flood { chunk: Vec<u8>, total: usize },
    /// Close the connection (FIN; RST if the client's bytes are unread).
    Close,
}

/// What one connection did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// What the client sent, up to 1 MiB.
    pub received: Vec<u8>,
    /// Everything the client sent, in bytes.
    pub bytes: u64,
    /// Bytes this peer wrote.
    pub written: u64,
    /// The client closed its side (the peer read end of stream).
    pub client_closed: bool,
    /// The connection's script is over (or it was cut short).
    pub done: bool,
}

#[derive(Default)]
struct Record {
    connections: Vec<Connection>,
    /// Connections accepted beyond the scripts (closed at once).
    unscripted: usize,
    released: Vec<bool>,
}

struct Shared {
    scripts: Vec<Vec<Step>>,
    stop: AtomicBool,
    record: Mutex<Record>,
}

impl Shared {
    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// A running scripted peer; stops (closing every connection) on drop.
pub struct ScriptedPeer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: Option<JoinHandle<()>>,
}

impl ScriptedPeer {
    /// Binds `127.0.0.1:0` in the calling thread's network namespace and
    /// serves `scripts[n]` to connection `n`.
    ///
    /// # Panics
    /// When no local port can be bound.
    #[must_use]
    pub fn start(scripts: Vec<Vec<Step>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the scripted peer");
        let addr = listener.local_addr().expect("scripted peer address");
        // Polled, so that a drop from another namespace (where connecting
        // to `addr` would not reach it) still ends the loop.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(Shared {
            scripts,
            stop: AtomicBool::new(false),
            record: Mutex::new(Record::default()),
        });
        let threads = Arc::new(Mutex::new(Vec::new()));
        let (accept_shared, accept_threads) = (shared.clone(), threads.clone());
        let accept = thread::Builder::new()
            .name("scripted-peer".into())
            .spawn(move || accept_loop(&listener, &accept_shared, &accept_threads))
            .expect("spawn the scripted peer");
        Self {
            addr,
            shared,
            threads,
            accept: Some(accept),
        }
    }

    /// Where the peer listens.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far, scripted or not.
    #[must_use]
    pub fn connections(&self) -> usize {
        let record = self.shared.record();
        record.connections.len() + record.unscripted
    }

    /// What connection `n` did so far (`None` if it has not come yet).
    #[must_use]
    pub fn connection(&self, n: usize) -> Option<Connection> {
        self.shared.record().connections.get(n).cloned()
    }

    /// Lets connection `n` go past its [`Step::AwaitRelease`] (now, or when
    /// it gets there).
    pub fn release(&self, n: usize) {
        let mut record = self.shared.record();
        if record.released.len() <= n {
            record.released.resize(n + 1, false);
        }
        record.released[n] = true;
    }

    /// Waits up to `limit` for `done(self)`; returns its last value.
    pub fn wait_until(&self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        crate::tcp::wait_until(limit, || done(self))
    }
}

impl Drop for ScriptedPeer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    threads: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while !shared.stopping() {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        let mut live = threads.lock().unwrap_or_else(|p| p.into_inner());
        live.retain(|t| !t.is_finished());
        let index = {
            let mut record = shared.record();
            if record.connections.len() >= shared.scripts.len() || live.len() >= MAX_CONNECTIONS {
                record.unscripted += 1;
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            record.connections.push(Connection::default());
            record.connections.len() - 1
        };
        let conn_shared = shared.clone();
        let spawned = thread::Builder::new()
            .name("scripted-peer-conn".into())
            .spawn(move || {
                let mut conn = PeerConn {
                    stream,
                    index,
                    shared: conn_shared,
                    window: Vec::new(),
                };
                conn.play();
                let _ = conn.stream.shutdown(Shutdown::Both);
                conn.shared.record().connections[index].done = true;
            });
        if let Ok(handle) = spawned {
            live.push(handle);
        }
    }
}

/// Why a connection's script ends early.
enum End {
    ClientClosed,
    Stopped,
    Failed,
}

struct PeerConn {
    stream: TcpStream,
    index: usize,
    shared: Arc<Shared>,
    /// The bytes read but not yet matched by a `ReadUntil`, bounded by the
    /// needle searched for.
    window: Vec<u8>,
}

impl PeerConn {
    fn play(&mut self) {
        if self.stream.set_read_timeout(Some(POLL)).is_err()
            || self.stream.set_write_timeout(Some(POLL)).is_err()
        {
            return;
        }
        let script = self.shared.scripts[self.index].clone();
        for step in &script {
            let result = match step {
                Step::ReadUntil(needle) => self.read_until(needle),
                Step::AwaitRelease => self.await_release(),
                Step::Sleep(pause) => self.sleep(*pause),
                Step::Stall => {
                    while !self.shared.stopping() {
                        thread::sleep(POLL);
                    }
                    Err(End::Stopped)
                }
                Step::Write(bytes) => self.write(bytes),
                Step::Flood { chunk, total } => self.flood(chunk, (*total).min(MAX_FLOOD)),
                Step::Close => return,
            };
            if result.is_err() {
                return;
            }
        }
        // No answer, or no more: read on until the client closes.
        while self.read_some(&mut Vec::new()).is_ok() {}
    }

    /// Reads once (waiting at most [`POLL`]), records what came and appends
    /// it to `into`; `Ok(0)` when nothing came within `POLL`.
    fn read_some(&mut self, into: &mut Vec<u8>) -> Result<usize, End> {
        if self.shared.stopping() {
            return Err(End::Stopped);
        }
        let mut buf = [0u8; 16 * 1024];
        match self.stream.read(&mut buf) {
            Ok(0) => {
                self.shared.record().connections[self.index].client_closed = true;
                Err(End::ClientClosed)
            }
            Ok(n) => {
                let mut record = self.shared.record();
                let conn = &mut record.connections[self.index];
                let room = MAX_RECORDED.saturating_sub(conn.received.len());
                conn.received.extend_from_slice(&buf[..n.min(room)]);
                conn.bytes += n as u64;
                drop(record);
                into.extend_from_slice(&buf[..n]);
                Ok(n)
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(0),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
            Err(_) => Err(End::Failed),
        }
    }

    fn read_until(&mut self, needle: &[u8]) -> Result<(), End> {
        loop {
            if let Some(at) = find(&self.window, needle) {
                self.window.drain(..at + needle.len());
                return Ok(());
            }
            // Keep only what may still start the needle: bounded.
            let keep = needle.len().saturating_sub(1);
            if self.window.len() > keep {
                let cut = self.window.len() - keep;
                self.window.drain(..cut);
            }
            let mut window = std::mem::take(&mut self.window);
            let read = self.read_some(&mut window);
            self.window = window;
            read?;
        }
    }

    fn await_release(&mut self) -> Result<(), End> {
        loop {
            let released = self
                .shared
                .record()
                .released
                .get(self.index)
                .copied()
                .unwrap_or(false);
            if released {
                return Ok(());
            }
            self.read_some(&mut Vec::new())?;
        }
    }

    fn sleep(&mut self, pause: Duration) -> Result<(), End> {
        let end = Instant::now() + pause;
        while Instant::now() < end {
            self.read_some(&mut Vec::new())?;
        }
        Ok(())
    }

    fn write(&mut self, mut bytes: &[u8]) -> Result<(), End> {
        while !bytes.is_empty() {
            if self.shared.stopping() {
                return Err(End::Stopped);
            }
            match self.stream.write(bytes) {
                Ok(0) => return Err(End::Failed),
                Ok(n) => {
                    self.shared.record().connections[self.index].written += n as u64;
                    bytes = &bytes[n..];
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Err(End::Failed),
            }
        }
        let _ = self.stream.flush();
        Ok(())
    }

    fn flood(&mut self, chunk: &[u8], total: usize) -> Result<(), End> {
        if chunk.is_empty() {
            return Ok(());
        }
        let mut left = total;
        while left > 0 {
            let piece = &chunk[..chunk.len().min(left)];
            self.write(piece)?;
            left -= piece.len();
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(c: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got);
        got
    }

    #[test]
    fn scripts_per_connection_release_and_record() {
        let peer = ScriptedPeer::start(vec![
            vec![
                Step::ReadUntil(b"END".to_vec()),
                Step::Write(b"first".to_vec()),
                Step::Close,
            ],
            vec![
                Step::AwaitRelease,
                Step::Write(b"late".to_vec()),
                Step::Close,
            ],
            vec![
                Step::Sleep(Duration::from_millis(50)),
                Step::Write(b"slow".to_vec()),
                Step::Close,
            ],
        ]);
        let mut c = TcpStream::connect(peer.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(b"abcE").unwrap();
        c.write_all(b"ND tail").unwrap();
        assert_eq!(read_all(&mut c), b"first");
        assert!(peer.wait_until(Duration::from_secs(5), |p| p
            .connection(0)
            .is_some_and(|c| c.done)));
        assert_eq!(peer.connection(0).unwrap().received, b"abcEND tail");

        let mut c = TcpStream::connect(peer.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.write_all(b"hello").unwrap();
        let mut byte = [0u8; 1];
        assert!(
            matches!(c.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock),
            "nothing before the release"
        );
        peer.release(1);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(read_all(&mut c), b"late");
        assert_eq!(peer.connection(1).unwrap().received, b"hello");

        let mut c = TcpStream::connect(peer.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(read_all(&mut c), b"slow");

        // Beyond the scripts: closed at once.
        let mut c = TcpStream::connect(peer.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(read_all(&mut c).is_empty());
        assert!(peer.wait_until(Duration::from_secs(5), |p| p.connections() == 4));
    }

    #[test]
    fn flood_stops_when_the_client_goes_and_drop_ends_a_stall() {
        let peer = ScriptedPeer::start(vec![
            vec![Step::Flood {
                chunk: b"x".repeat(4096),
                total: 64 << 20,
            }],
            vec![Step::Stall],
        ]);
        let mut c = TcpStream::connect(peer.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 4096];
        c.read_exact(&mut buf).unwrap();
        drop(c);
        assert!(peer.wait_until(Duration::from_secs(10), |p| p
            .connection(0)
            .is_some_and(|c| c.done)));
        assert!(peer.connection(0).unwrap().written < 64 << 20);

        let _stalled = TcpStream::connect(peer.addr()).unwrap();
        assert!(peer.wait_until(Duration::from_secs(5), |p| p.connections() == 2));
        // The drop returns although a connection stalls (30 s: only a drop
        // that never returns fails, not a slow one).
        let (done, dropped) = std::sync::mpsc::channel();
        thread::spawn(move || {
            drop(peer);
            let _ = done.send(());
        });
        assert!(dropped.recv_timeout(Duration::from_secs(30)).is_ok());
    }
}
