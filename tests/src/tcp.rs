//! Plain-std TCP helpers for the privileged tests: an echo [`Listener`] that
//! counts connections, [`connect_from`] with an explicit source address and a
//! connect timeout (a SYN dropped by XDP shows up as `ErrorKind::TimedOut`),
//! [`spawn_client_process`], an external process holding connections open
//! until it is killed, and [`Relay`], which carries connections from a
//! namespace to a server in the host's, or records what clients send.
//!
//! Sockets are bound to the network namespace they are created in, so they
//! are created on a [`NetNs::run`] thread and then used from ordinary threads.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::NetNs;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `cond` every 10 ms until it is true or `timeout` passes; returns
/// whether it became true.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    open: AtomicUsize,
    next_id: AtomicUsize,
    /// Clones of the currently open server-side sockets, by connection id.
    conns: Mutex<HashMap<usize, TcpStream>>,
    handlers: Mutex<Vec<JoinHandle<()>>>,
}

/// A TCP echo server inside a namespace. Every accepted connection is held
/// open by its own thread that echoes what it reads and closes the socket on
/// EOF. Stops (and closes every connection) on drop.
pub struct Listener {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Listener {
    /// Binds `addr` inside `ns` (IPv6 addresses bind `IPV6_V6ONLY`, all with
    /// `SO_REUSEADDR`) and starts accepting. Port 0 picks a free port, see
    /// [`Listener::local_addr`].
    pub fn start(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<Listener> {
        let listener = ns
            .run(|| bind_listener(addr))
            .with_context(|| format!("failed to listen on {addr} in {}", ns.name()))?;
        let local_addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("listen-{local_addr}"))
            .spawn(move || accept_loop(listener, sh))
            .context("failed to spawn the accept thread")?;
        Ok(Listener {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The bound address (with the real port if 0 was requested).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections currently held open by the server.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Peer addresses of the currently open connections.
    pub fn open_peers(&self) -> Vec<SocketAddr> {
        lock(&self.shared.conns)
            .values()
            .filter_map(|s| s.peer_addr().ok())
            .collect()
    }

    /// Waits until `accepted() >= n`; returns whether that happened in time.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.accepted() >= n)
    }

    /// Waits until `open() == n`; returns whether that happened in time.
    pub fn wait_open(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.open() == n)
    }

    /// Server-initiated close of every currently open connection
    /// (`shutdown(Both)`: the peer sees a FIN). Returns how many were shut.
    /// [`Listener::open`] drops once the handler threads have noticed.
    pub fn close_all(&self) -> usize {
        let conns = lock(&self.shared.conns);
        for s in conns.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        conns.len()
    }

    /// Like [`Listener::close_all`] but aborts the connections with a RST
    /// (`SO_LINGER` 0, then close). Returns how many were aborted.
    pub fn abort_all(&self) -> usize {
        let conns: Vec<(usize, TcpStream)> = lock(&self.shared.conns).drain().collect();
        for (_, s) in &conns {
            let _ = set_linger_zero(s.as_raw_fd());
            // Wake the handler; its read returns 0 and it drops its socket.
            let _ = s.shutdown(Shutdown::Read);
        }
        // Dropping our clones: the last close sends the RST.
        conns.len()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.acceptor.take() {
            if h.join().is_err() {
                eprintln!("tcp::Listener {}: accept thread panicked", self.local_addr);
            }
        }
        // No new connections can appear now; shut down the open ones so the
        // handler threads end, then join them.
        self.close_all();
        let handlers = mem::take(&mut *lock(&self.shared.handlers));
        for h in handlers {
            if h.join().is_err() {
                eprintln!(
                    "tcp::Listener {}: a connection thread panicked",
                    self.local_addr
                );
            }
        }
        lock(&self.shared.conns).clear();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let fd = listener.as_raw_fd();
    while !shared.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 50) };
        if r <= 0 {
            continue; // timeout or EINTR: re-check the stop flag
        }
        match listener.accept() {
            Ok((stream, _peer)) => {
                if let Err(e) = handle_new(stream, &shared) {
                    eprintln!("tcp::Listener: failed to set up a connection: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                eprintln!("tcp::Listener: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn handle_new(stream: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let clone = stream.try_clone()?;
    shared.accepted.fetch_add(1, Ordering::SeqCst);
    shared.open.fetch_add(1, Ordering::SeqCst);
    lock(&shared.conns).insert(id, clone);
    let sh = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("conn-{id}"))
        .spawn(move || {
            echo(stream);
            lock(&sh.conns).remove(&id);
            sh.open.fetch_sub(1, Ordering::SeqCst);
        });
    match spawned {
        Ok(h) => {
            lock(&shared.handlers).push(h);
            Ok(())
        }
        Err(e) => {
            lock(&shared.conns).remove(&id);
            shared.open.fetch_sub(1, Ordering::SeqCst);
            Err(e)
        }
    }
}

/// Echoes until EOF or an error, then closes the socket by dropping it (a
/// plain close, so that an `abort_all` linger-0 setting still yields a RST).
fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn new_socket(family: libc::c_int, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
    if nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain syscall; the fd is wrapped immediately.
    let fd = cvt(unsafe { libc::socket(family, ty, 0) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: pointer to a live c_int with its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: pointer to a live linger with its exact size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

/// A `sockaddr_storage` holding `addr`, and its length.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&mut storage as *mut _ as *mut libc::sockaddr_in).write(sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&mut storage as *mut _ as *mut libc::sockaddr_in6).write(sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn family(addr: &SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

fn bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: sa is a valid sockaddr of length len.
    cvt(unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) }).map(|_| ())
}

/// Creates the listening socket in the calling thread's namespace.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let fd = new_socket(family(&addr), false)?;
    setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    bind(fd.as_raw_fd(), addr)?;
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(TcpListener::from(fd))
}

/// Connects from `source` (ephemeral port) to `dest` inside `ns`, giving up
/// after `timeout` with an error of kind [`io::ErrorKind::TimedOut`] (which
/// is how a dropped SYN shows). A RST answer is `ConnectionRefused`. The
/// returned stream is blocking and usable from any thread.
pub fn connect_from(
    ns: &NetNs,
    source: IpAddr,
    dest: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    if source.is_ipv4() != dest.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {source} and destination {dest} differ in address family"),
        ));
    }
    ns.run(|| connect_here(source, dest, timeout))
}

/// As [`connect_from`], in the calling thread's network namespace: e.g.
/// from `127.0.0.2` (Linux accepts any 127/8 source on loopback) to a
/// server on `127.0.0.1`, so that the server sees a client of its own.
pub fn connect_local(source: IpAddr, dest: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    if source.is_ipv4() != dest.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("source {source} and destination {dest} differ in address family"),
        ));
    }
    connect_here(source, dest, timeout)
}

fn connect_here(source: IpAddr, dest: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let fd = new_socket(family(&dest), true)?;
    let raw = fd.as_raw_fd();
    bind(raw, SocketAddr::new(source, 0))?;
    let (sa, len) = sockaddr(dest);
    // SAFETY: sa is a valid sockaddr of length len.
    let r = unsafe { libc::connect(raw, &sa as *const _ as *const libc::sockaddr, len) };
    if r != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(err);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect {source} -> {dest} timed out after {timeout:?}"),
                ));
            }
            let mut pfd = libc::pollfd {
                fd: raw,
                events: libc::POLLOUT,
                revents: 0,
            };
            // Round up so a sub-millisecond remainder does not spin.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n > 0 {
                break;
            }
        }
        let mut so_error: libc::c_int = 0;
        let mut optlen = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: pointers to live locals of the declared size.
        cvt(unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut so_error as *mut libc::c_int as *mut libc::c_void,
                &mut optlen,
            )
        })?;
        if so_error != 0 {
            return Err(io::Error::from_raw_os_error(so_error));
        }
    }
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

const CLIENT_SCRIPT: &str = r#"
import socket, sys, time
src, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
socks = []
for _ in range(count):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(10)
    s.bind((src, 0))
    s.connect((host, port))
    socks.append(s)
print("connected %d" % len(socks), flush=True)
while True:
    time.sleep(3600)
"#;

/// An external client process (see [`spawn_client_process`]). Derefs to the
/// [`Child`]; killed with SIGKILL and reaped on drop if still running.
pub struct ClientProcess {
    pub child: Child,
}

impl ClientProcess {
    /// SIGKILL and reap; returns the exit status.
    pub fn kill_and_wait(&mut self) -> io::Result<std::process::ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        self.child.kill()?;
        self.child.wait()
    }
}

impl Deref for ClientProcess {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for ClientProcess {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_wait() {
            eprintln!("client process {} cleanup: {e}", self.child.id());
        }
    }
}

/// Starts `ip netns exec <ns> python3 -c …` which opens `count` connections
/// from `source` to `dest`, prints `connected <count>` once all are
/// established, then sleeps forever (use [`wait_for_line`], then kill it).
/// The pid is python's own (`ip netns exec` execs it directly), so SIGKILL
/// closes the sockets at once. It also gets SIGKILL if the thread that
/// spawned it ends (`PR_SET_PDEATHSIG`), so spawn it from the test thread.
/// A connect failure makes python exit non-zero with a traceback on stderr
/// (inherited).
pub fn spawn_client_process(
    ns: &NetNs,
    source: IpAddr,
    dest: SocketAddr,
    count: usize,
) -> anyhow::Result<ClientProcess> {
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns.name(),
        "python3",
        "-u",
        "-c",
        CLIENT_SCRIPT,
    ])
    .arg(source.to_string())
    .arg(dest.ip().to_string())
    .arg(dest.port().to_string())
    .arg(count.to_string())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1); // parent already gone
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("failed to start the client process in {}", ns.name()))?;
    Ok(ClientProcess { child })
}

/// Reads `child`'s stdout line by line (skipping others) until a line
/// starting with `prefix` arrives, and returns it without the newline.
/// Fails on timeout or if stdout closes (the process exited) first.
pub fn wait_for_line(child: &mut Child, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let pid = child.id();
    let Some(stdout) = child.stdout.as_mut() else {
        bail!("stdout of process {pid} is not piped");
    };
    let fd = stdout.as_raw_fd();
    let mut line = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "process {pid}: no line starting with {prefix:?} within {timeout:?} (partial: {:?})",
                String::from_utf8_lossy(&line)
            );
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll on child stdout");
        }
        if n == 0 {
            continue;
        }
        // Readable (or hung up): one byte at a time so nothing beyond the
        // line is consumed.
        let mut b = [0u8; 1];
        match stdout.read(&mut b) {
            Ok(0) => {
                let status = child.try_wait().ok().flatten();
                bail!(
                    "process {pid} closed stdout before printing {prefix:?} (status: {status:?}, partial: {:?})",
                    String::from_utf8_lossy(&line)
                );
            }
            Ok(_) if b[0] == b'\n' => {
                let s = String::from_utf8_lossy(&line).into_owned();
                if s.starts_with(prefix) {
                    return Ok(s);
                }
                line.clear();
            }
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read child stdout"),
        }
    }
}

/// A TCP relay: every connection it accepts is carried to `upstream`,
/// bytes unchanged (a PROXY header included). Stops accepting on drop;
/// relayed connections end with their peers.
///
/// Two uses: [`Relay::start`] listens inside a network namespace and
/// connects from the host's, so that an agent inside the namespace reaches
/// a server on the host's loopback (a private Postfix); [`Relay::recording`]
/// listens on the host's loopback and records each chunk its clients
/// deliver in one read. A client that waits for each reply can never have
/// two commands in one chunk: the reply to the first only comes back after
/// the relay read (and passed on) that first command. So a chunk holding
/// MAIL, RCPT and DATA proves that they were written together.
pub struct Relay {
    addr: SocketAddr,
    /// With [`Relay::recording`], the chunks of each connection, in accept
    /// order.
    connections: Option<Arc<Mutex<Vec<Chunks>>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

/// What a client sent on one relayed connection, one entry a read.
type Chunks = Arc<Mutex<Vec<Vec<u8>>>>;

impl Relay {
    /// Listens on `127.0.0.1` and a free port inside `ns`; each connection
    /// is carried to `upstream`.
    ///
    /// # Errors
    /// The listening socket could not be made.
    pub fn start(ns: &NetNs, upstream: SocketAddr) -> anyhow::Result<Relay> {
        let listener = ns
            .run(|| TcpListener::bind("127.0.0.1:0"))
            .with_context(|| format!("binding the relay in {}", ns.name()))?;
        Self::serve(listener, upstream, None)
    }

    /// Listens on `127.0.0.1` and a free port in the caller's namespace;
    /// each connection is carried to `upstream`, and what its client sends
    /// is recorded (see [`Relay::chunks`]).
    ///
    /// # Errors
    /// The listening socket could not be made.
    pub fn recording(upstream: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the relay")?;
        Self::serve(listener, upstream, Some(Arc::default()))
    }

    fn serve(
        listener: TcpListener,
        upstream: SocketAddr,
        connections: Option<Arc<Mutex<Vec<Chunks>>>>,
    ) -> anyhow::Result<Relay> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, record) = (stop.clone(), connections.clone());
        // Spawned from the caller's thread (in the host's namespace for
        // [`Relay::start`]): its threads connect from that namespace.
        let acceptor = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let chunks = record.as_ref().map(|r| {
                            let chunks = Chunks::default();
                            lock(r).push(chunks.clone());
                            chunks
                        });
                        std::thread::spawn(move || relay_one(client, upstream, chunks.as_deref()));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Relay {
            addr,
            connections,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// The address it listens on (in its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port it listens on (on `127.0.0.1` in its namespace).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every connection's chunks so far, as text, in accept order (none
    /// unless [`Relay::recording`]).
    pub fn chunks(&self) -> Vec<Vec<String>> {
        let Some(connections) = &self.connections else {
            return Vec::new();
        };
        lock(connections)
            .iter()
            .map(|c| {
                lock(c)
                    .iter()
                    .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
                    .collect()
            })
            .collect()
    }

    /// The chunks of the one connection that carried `needle`.
    ///
    /// # Panics
    /// When no connection or more than one carried it.
    #[track_caller]
    pub fn session_with(&self, needle: &str) -> Vec<String> {
        let mut sessions: Vec<Vec<String>> = self
            .chunks()
            .into_iter()
            .filter(|c| c.iter().any(|chunk| chunk.contains(needle)))
            .collect();
        assert_eq!(
            sessions.len(),
            1,
            "connections carrying {needle:?}: {sessions:#?}"
        );
        sessions.remove(0)
    }
}

/// Carries one connection to `upstream`, recording what `client` sends
/// into `chunks` if given.
fn relay_one(client: TcpStream, upstream: SocketAddr, chunks: Option<&Mutex<Vec<Vec<u8>>>>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    // Each read goes on in its own segment, as the client wrote it: Nagle
    // could join two of them, and a server that checks for improper
    // pipelining (Postfix) would see commands the client never sent
    // together.
    let _ = server.set_nodelay(true);
    let (Ok(mut server_r), Ok(mut client_w)) = (server.try_clone(), client.try_clone()) else {
        return;
    };
    let replies = std::thread::spawn(move || {
        let _ = io::copy(&mut server_r, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Write);
    });
    let (mut client, mut server) = (client, server);
    let mut buf = [0u8; 65536];
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(chunks) = chunks {
                    lock(chunks).push(buf[..n].to_vec());
                }
                if server.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = server.shutdown(Shutdown::Write);
    let _ = replies.join();
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// An address on `127.0.0.1` that nothing listens on for as long as the
/// value lives: its port is bound and never listened on, so a connection
/// there is refused (RST) and no other process can take the port (a port
/// found free and released could be).
pub struct DeadPort {
    _socket: tokio::net::TcpSocket,
    addr: SocketAddr,
}

impl DeadPort {
    /// Binds a free port.
    ///
    /// # Errors
    /// The socket could not be made or bound.
    pub fn new() -> io::Result<DeadPort> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = socket.local_addr()?;
        Ok(DeadPort {
            _socket: socket,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
