//! Throw-away network namespaces and veth links for the privileged tests.
//!
//! Everything here shells out to iproute2 (`ip`) and must run as root.
//!
//! * [`NetNs`] is a named namespace (`ip netns add`), deleted again on drop.
//!   [`NetNs::run`] executes a closure on a dedicated thread that has
//!   `setns(CLONE_NEWNET)`'d into the namespace. Unlike `ip netns exec`, this
//!   does not remount `/sys`, so the closure still sees the host's
//!   `/sys/fs/bpf` (pinned maps, loaded programs). Note that `/sys/class/net`
//!   therefore still lists the *host's* interfaces; inside the closure use
//!   `if_nametoindex` (or [`NetNs::ifindex`]) instead.
//! * [`link`] connects a "server" and a "client" namespace with a veth pair
//!   and assigns IPv4 and IPv6 addresses (several on the client side so tests
//!   can use distinct sources). The result, [`Link`], tries to delete the pair
//!   on drop; deleting either namespace removes it as well.
//!
//! Sockets belong to the namespace they were *created* in, so a socket
//! created inside [`NetNs::run`] can be returned and used from any thread.
//!
//! Drop implementations never panic; cleanup problems are logged to stderr.

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Per-process counter making namespace names unique.
static NS_COUNTER: AtomicUsize = AtomicUsize::new(0);
/// Per-process counter making link subnets unique.
static LINK_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Number of client addresses per family on a [`Link`] (`.2` ..= `.6`).
pub const CLIENT_ADDRS: usize = 5;

/// Runs `ip <args>` in the current (host) namespace and returns its stdout;
/// a non-zero exit becomes an error carrying the command line and stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run_cmd("ip", args, None)
}

fn run_cmd(program: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to spawn `{program} {}`", args.join(" ")))?;
    if let Some(input) = stdin {
        use std::io::Write;
        // Take the pipe so it is closed (EOF) after writing.
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("failed to feed stdin of `{program}`"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("failed to wait for `{program} {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a list of `ip` commands (one per line, without the leading `ip`) in
/// one `ip -batch -` process, optionally inside namespace `ns`.
fn ip_batch(ns: Option<&str>, commands: &[String]) -> anyhow::Result<()> {
    let mut args = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut input = commands.join("\n");
    input.push('\n');
    run_cmd("ip", &args, Some(&input)).map(|_| ())
}

/// A named network namespace (`/run/netns/<name>`) with `lo` up.
/// Deleted (`ip netns del`) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<counter>` and brings `lo` up inside it.
    pub fn new(prefix: &str) -> anyhow::Result<NetNs> {
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        ip(&["netns", "add", &name])?;
        // From here on Drop deletes the namespace again if anything fails.
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name as used by `ip netns` / `ip -n`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace's bind mount, `/run/netns/<name>`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Moves the *calling thread* into this namespace (`setns(CLONE_NEWNET)`).
    ///
    /// Only use this on a thread you own and that ends afterwards (or that is
    /// meant to stay in the namespace); prefer [`NetNs::run`].
    pub fn enter_current_thread(&self) -> io::Result<()> {
        enter_netns(&self.name)
    }

    /// Runs `f` on a scoped thread that first enters this namespace, and
    /// returns its result. A panic inside `f` is propagated to the caller;
    /// failing to enter the namespace panics with a descriptive message.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let name = self.name.as_str();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(s, move || {
                    if let Err(e) = enter_netns(name) {
                        panic!("failed to setns into network namespace {name:?}: {e}");
                    }
                    f()
                })
                .expect("failed to spawn a thread for NetNs::run");
            match handle.join() {
                Ok(r) => r,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }

    /// Runs `ip netns exec <name> <args...>` and returns its stdout; a
    /// non-zero exit is an error containing stderr. (That command remounts
    /// `/sys` for the child, so it does not see the host's bpffs.)
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `ip -n <name> <args...>` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Interface index of `ifname` inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> anyhow::Result<u32> {
        let c = CString::new(ifname).context("interface name contains NUL")?;
        let idx = self.run(|| unsafe { libc::if_nametoindex(c.as_ptr()) });
        if idx == 0 {
            bail!("no interface {ifname:?} in namespace {}", self.name);
        }
        Ok(idx)
    }

    /// Deletes namespaces named `<prefix>-<pid>-<n>` whose `<pid>` no longer
    /// exists (leftovers of a test binary that was killed). Returns the names
    /// deleted.
    pub fn remove_stale(prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        for name in list_netns()? {
            let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
                continue;
            };
            let mut parts = rest.split('-');
            let (Some(pid), Some(n), None) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                ip(&["netns", "del", &name])?;
                removed.push(name);
            }
        }
        Ok(removed)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns cleanup: {e:#}");
        }
    }
}

/// Names listed by `ip netns list` (without the `(id: N)` suffix).
pub fn list_netns() -> anyhow::Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn enter_netns(name: &str) -> io::Result<()> {
    let path = CString::new(format!("/run/netns/{name}"))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: plain syscalls on a path we own; the fd is wrapped immediately.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A veth pair between a server and a client namespace, see [`link`].
///
/// Address plan for subnet `n` (see [`Link::subnet`]):
/// server `10.199.n.1/24`, `fd00:199:n::1/64`; client `10.199.n.2..=6/24`,
/// `fd00:199:n::2..=6/64` (`client_v4s[0]` / `client_v6s[0]` are `.2`/`::2`).
#[derive(Debug)]
pub struct Link {
    /// Interface name of the server end (inside the server namespace).
    pub server_if: String,
    /// Interface name of the client end (inside the client namespace).
    pub client_if: String,
    pub server_v4: Ipv4Addr,
    pub client_v4s: Vec<Ipv4Addr>,
    pub server_v6: Ipv6Addr,
    pub client_v6s: Vec<Ipv6Addr>,
    /// The `n` in `10.199.n.0/24` / `fd00:199:n::/64`.
    pub subnet: u8,
    server_ns: String,
    client_ns: String,
}

/// Kept for naming symmetry with the brief; a [`Link`] *is* the veth pair.
pub type VethPair = Link;

/// Interface name `<base><tag><pid low digits>` of at most 15 characters.
fn if_name(base: &str, tag: &str) -> String {
    let room = 15 - base.len() - tag.len();
    let pid = std::process::id().to_string();
    let digits = &pid[pid.len().saturating_sub(room.min(5))..];
    format!("{base}{tag}{digits}")
}

/// Creates a veth pair `lsrv<tag>…` (in `server`) / `lcli<tag>…` (in
/// `client`), assigns the addresses described on [`Link`] (IPv6 with
/// `nodad`), brings both ends up and waits until they are usable.
///
/// `tag` must be 1..=11 ASCII alphanumerics; the pid's low digits are
/// appended as far as the 15-character limit allows. Both ends are created
/// directly inside their namespaces, so names never clash in the host
/// namespace anyway.
pub fn link(server: &NetNs, client: &NetNs, tag: &str) -> anyhow::Result<Link> {
    if tag.is_empty() || tag.len() > 11 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("link tag {tag:?} must be 1..=11 ASCII alphanumerics");
    }
    let server_if = if_name("lsrv", tag);
    let client_if = if_name("lcli", tag);
    let k = LINK_COUNTER.fetch_add(1, Ordering::Relaxed);
    // Unique within the process for 256 concurrent links; the pid mix only
    // spreads different processes apart (addresses live in private
    // namespaces, so a cross-process clash would be harmless anyway).
    let subnet = ((std::process::id() as usize)
        .wrapping_mul(37)
        .wrapping_add(k)
        % 256) as u8;
    let n = subnet;
    let server_v4 = Ipv4Addr::new(10, 199, n, 1);
    let client_v4s: Vec<Ipv4Addr> = (2..2 + CLIENT_ADDRS as u8)
        .map(|h| Ipv4Addr::new(10, 199, n, h))
        .collect();
    let server_v6 = Ipv6Addr::new(0xfd00, 0x199, n as u16, 0, 0, 0, 0, 1);
    let client_v6s: Vec<Ipv6Addr> = (2..2 + CLIENT_ADDRS as u16)
        .map(|h| Ipv6Addr::new(0xfd00, 0x199, n as u16, 0, 0, 0, 0, h))
        .collect();

    ip(&[
        "link",
        "add",
        &server_if,
        "netns",
        server.name(),
        "type",
        "veth",
        "peer",
        "name",
        &client_if,
        "netns",
        client.name(),
    ])?;
    // From here on Drop removes the pair if anything below fails.
    let link = Link {
        server_if,
        client_if,
        server_v4,
        client_v4s,
        server_v6,
        client_v6s,
        subnet,
        server_ns: server.name().to_owned(),
        client_ns: client.name().to_owned(),
    };

    let srv = vec![
        format!("addr add {}/24 dev {}", link.server_v4, link.server_if),
        format!(
            "addr add {}/64 dev {} nodad",
            link.server_v6, link.server_if
        ),
        format!("link set {} up", link.server_if),
    ];
    ip_batch(Some(server.name()), &srv)?;
    let mut cli: Vec<String> = Vec::new();
    for a in &link.client_v4s {
        cli.push(format!("addr add {a}/24 dev {}", link.client_if));
    }
    for a in &link.client_v6s {
        cli.push(format!("addr add {a}/64 dev {} nodad", link.client_if));
    }
    cli.push(format!("link set {} up", link.client_if));
    ip_batch(Some(client.name()), &cli)?;

    link.wait_ready(Duration::from_secs(10))?;
    Ok(link)
}

impl Link {
    /// Name of the server-side namespace.
    pub fn server_ns(&self) -> &str {
        &self.server_ns
    }

    /// Name of the client-side namespace.
    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }

    /// Waits until both ends are operationally up and no IPv6 address on
    /// either end is tentative. [`link`] already calls this.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for (ns, dev) in [
            (&self.server_ns, &self.server_if),
            (&self.client_ns, &self.client_if),
        ] {
            wait_link_up_in(ns, dev, deadline)?;
            wait_ipv6_ready_in(ns, dev, deadline)?;
        }
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both. Try the server
        // namespace first (it may already be gone), then the host namespace.
        let quiet = |e: &anyhow::Error| {
            let s = format!("{e:#}");
            s.contains("Cannot find device") || s.contains("Cannot open network namespace")
        };
        if let Err(e) = ip(&["-n", &self.server_ns, "link", "del", &self.server_if]) {
            if !quiet(&e) {
                eprintln!("link cleanup: {e:#}");
            }
        }
        if let Err(e) = ip(&["link", "del", &self.server_if]) {
            if !quiet(&e) {
                eprintln!("link cleanup: {e:#}");
            }
        }
    }
}

/// Waits until no IPv6 address on `ifname` inside `ns` is tentative (DAD
/// pending) and at least one global IPv6 address is present.
pub fn wait_ipv6_ready(ns: &NetNs, ifname: &str, timeout: Duration) -> anyhow::Result<()> {
    wait_ipv6_ready_in(ns.name(), ifname, Instant::now() + timeout)
}

fn wait_ipv6_ready_in(ns: &str, ifname: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let out = ip(&["-n", ns, "-6", "addr", "show", "dev", ifname])?;
        let has_global = out
            .lines()
            .any(|l| l.contains("inet6") && l.contains("scope global"));
        // "tentative" (DAD running) or "dadfailed" make an address unusable;
        // only care about global addresses (link-local DAD is irrelevant).
        let pending = out.lines().any(|l| {
            l.contains("scope global") && (l.contains("tentative") || l.contains("dadfailed"))
        });
        if has_global && !pending {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("IPv6 addresses on {ifname} in {ns} not ready:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_link_up_in(ns: &str, ifname: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let out = ip(&["-n", ns, "link", "show", "dev", ifname])?;
        if out.contains("state UP") && out.contains("LOWER_UP") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{ifname} in {ns} did not come up:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
