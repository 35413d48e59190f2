//! End to end in the real kernel: two network namespaces joined by a veth
//! pair, the limiter attached to the server's end (native XDP or TC), real
//! TCP connections from several client addresses, IPv4 and IPv6.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use limiter_common::Reason;
use limiter_tests::{
    kernel::TestKernel,
    netns::{link, Link, NetNs},
    prerequisites,
    tcp::{connect_from, spawn_client_process, wait_for_line, wait_until, Listener},
};
use limiter_user::kernel::{AttachMode, Datapath, KernelLimits};

const PORT: u16 = 25;
/// Long enough for a handshake on a veth, short enough for a dropped SYN
/// (first retransmission after 1 s) to show as a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(800);
const SETTLE: Duration = Duration::from_secs(5);

/// Server and client namespaces, the link between them, a listener, and
/// the limiter attached to the server's interface.
struct Testbed {
    // Drop order: listener, kernel (detach), link, namespaces.
    listener: Listener,
    kernel: TestKernel,
    link: Link,
    client: NetNs,
    /// Kept for its lifetime: the namespace goes when the test ends.
    _server: NetNs,
}

impl Testbed {
    fn new(tag: &str, mode: AttachMode, ipv6: bool, max_connections: u32) -> Self {
        Self::with_limits(
            tag,
            mode,
            ipv6,
            KernelLimits {
                max_connections,
                ports: vec![PORT],
                ..KernelLimits::default()
            },
        )
    }

    fn with_limits(tag: &str, mode: AttachMode, ipv6: bool, limits: KernelLimits) -> Self {
        let server = NetNs::new("lim-srv").unwrap();
        let client = NetNs::new("lim-cli").unwrap();
        let link = link(&server, &client, tag).unwrap();
        let kernel = TestKernel::load(limits);
        // Attach from inside the server namespace: the interface is looked up
        // there, and that namespace's connections are the ones counted.
        let attachment = server
            .run(|| kernel.datapath.attach(&link.server_if, mode))
            .unwrap();
        let expected = if mode == AttachMode::Tc { "tc" } else { "xdp" };
        assert_eq!(attachment.mode, expected);
        let server_ip: IpAddr = if ipv6 {
            link.server_v6.into()
        } else {
            link.server_v4.into()
        };
        let listener = Listener::start(&server, SocketAddr::new(server_ip, PORT)).unwrap();
        Self {
            listener,
            kernel,
            link,
            client,
            _server: server,
        }
    }

    fn clients(&self, ipv6: bool) -> Vec<IpAddr> {
        if ipv6 {
            self.link
                .client_v6s
                .iter()
                .map(|a| IpAddr::V6(*a))
                .collect()
        } else {
            self.link
                .client_v4s
                .iter()
                .map(|a| IpAddr::V4(*a))
                .collect()
        }
    }

    fn connect(&self, source: IpAddr) -> std::io::Result<std::net::TcpStream> {
        connect_from(
            &self.client,
            source,
            self.listener.local_addr(),
            CONNECT_TIMEOUT,
        )
    }

    fn connections(&self, source: IpAddr) -> u32 {
        self.kernel.datapath.connections(source).unwrap()
    }

    fn wait_connections(&self, source: IpAddr, n: u32) {
        let reached = wait_until(SETTLE, || self.connections(source) == n);
        assert!(
            reached,
            "kernel count for {source}: {} (expected {n})",
            self.connections(source)
        );
    }

    fn assert_no_counts(&self) {
        let ok = wait_until(SETTLE, || {
            self.kernel.datapath.connection_counts().unwrap().is_empty()
        });
        assert!(
            ok,
            "counts left: {:?}",
            self.kernel.datapath.connection_counts().unwrap()
        );
    }
}

fn assert_dropped(result: std::io::Result<std::net::TcpStream>, what: &str) {
    match result {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        Err(e) => panic!("{what}: expected a dropped SYN (timeout), got {e}"),
        Ok(s) => panic!(
            "{what}: connected ({:?}), expected the SYN dropped",
            s.peer_addr()
        ),
    }
}

fn blocked_source_cannot_connect(tag: &str, mode: AttachMode, ipv6: bool) {
    let bed = Testbed::new(tag, mode, ipv6, 10);
    let clients = bed.clients(ipv6);
    let (blocked, other) = (clients[0], clients[1]);
    bed.kernel
        .datapath
        .block(IpNet::from(blocked), None, Reason::Harvest)
        .unwrap();
    assert_dropped(bed.connect(blocked), "blocked source");
    let stream = bed.connect(other).expect("an unblocked source connects");
    drop(stream);
    assert!(bed.listener.wait_accepted(1, SETTLE));
    assert_eq!(
        bed.listener.accepted(),
        1,
        "only the unblocked source reached the listener"
    );
    let counters = bed.kernel.datapath.counters().unwrap();
    assert!(counters.dropped_block >= 1, "{counters:?}");
    let block = bed.kernel.datapath.blocks().unwrap().pop().unwrap();
    assert!(block.drops >= 1, "{block:?}");

    // A flood: past its first 64 drops the source is dropped from the
    // CPUs' cached copies of its entry, which count every drop too.
    const FLOOD: u64 = 150;
    for _ in 0..FLOOD {
        let attempt = connect_from(
            &bed.client,
            blocked,
            bed.listener.local_addr(),
            Duration::from_millis(5),
        );
        assert!(attempt.is_err(), "a blocked source connected");
    }
    let block = bed.kernel.datapath.blocks().unwrap().pop().unwrap();
    assert!(block.drops > FLOOD, "{block:?}");
    assert_eq!(bed.listener.accepted(), 1);

    // Unblocking lets it in again at once: no cached copy outlives it.
    assert!(bed.kernel.datapath.unblock(IpNet::from(blocked)).unwrap());
    bed.connect(blocked).expect("connects once unblocked");
}

fn cap_holds_and_counts_return_to_zero(tag: &str, mode: AttachMode, ipv6: bool) {
    const CAP: u32 = 3;
    // The link's client addresses share one /64: count IPv6 sources per
    // address here so that a second source exists (aggregation has its own
    // test below).
    let limits = KernelLimits {
        max_connections: CAP,
        ipv6_prefix_len: 128,
        ports: vec![PORT],
        ..KernelLimits::default()
    };
    let bed = Testbed::with_limits(tag, mode, ipv6, limits);
    let clients = bed.clients(ipv6);
    let source = clients[0];
    let mut streams: Vec<_> = (0..CAP)
        .map(|i| {
            bed.connect(source)
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    bed.wait_connections(source, CAP);
    assert_dropped(bed.connect(source), "connection over the cap");
    // Others are not affected by this source's cap.
    let other = bed.connect(clients[1]).expect("another source connects");
    bed.wait_connections(clients[1], 1);

    // A client-side close frees a slot.
    drop(streams.pop());
    bed.wait_connections(source, CAP - 1);
    streams.push(bed.connect(source).expect("a slot was freed"));
    bed.wait_connections(source, CAP);

    // A server-side close frees them all; so does the client going away.
    bed.listener.close_all();
    drop(other);
    drop(streams);
    bed.assert_no_counts();
    let counters = bed.kernel.datapath.counters().unwrap();
    assert!(counters.dropped_cap >= 1, "{counters:?}");
    assert_eq!(counters.conn_opened, counters.conn_closed, "{counters:?}");
    assert_eq!(counters.conn_untracked, 0, "{counters:?}");
}

#[test]
fn xdp_ipv4_blocked_source_cannot_connect() {
    if prerequisites("xdp_ipv4_blocked_source_cannot_connect") {
        blocked_source_cannot_connect("xb4", AttachMode::Xdp, false);
    }
}

#[test]
fn xdp_ipv6_blocked_source_cannot_connect() {
    if prerequisites("xdp_ipv6_blocked_source_cannot_connect") {
        blocked_source_cannot_connect("xb6", AttachMode::Xdp, true);
    }
}

#[test]
fn tc_ipv4_blocked_source_cannot_connect() {
    if prerequisites("tc_ipv4_blocked_source_cannot_connect") {
        blocked_source_cannot_connect("tb4", AttachMode::Tc, false);
    }
}

#[test]
fn tc_ipv6_blocked_source_cannot_connect() {
    if prerequisites("tc_ipv6_blocked_source_cannot_connect") {
        blocked_source_cannot_connect("tb6", AttachMode::Tc, true);
    }
}

#[test]
fn xdp_ipv4_cap_holds_and_counts_return_to_zero() {
    if prerequisites("xdp_ipv4_cap_holds_and_counts_return_to_zero") {
        cap_holds_and_counts_return_to_zero("xc4", AttachMode::Xdp, false);
    }
}

#[test]
fn xdp_ipv6_cap_holds_and_counts_return_to_zero() {
    if prerequisites("xdp_ipv6_cap_holds_and_counts_return_to_zero") {
        cap_holds_and_counts_return_to_zero("xc6", AttachMode::Xdp, true);
    }
}

#[test]
fn tc_ipv4_cap_holds_and_counts_return_to_zero() {
    if prerequisites("tc_ipv4_cap_holds_and_counts_return_to_zero") {
        cap_holds_and_counts_return_to_zero("tc4", AttachMode::Tc, false);
    }
}

#[test]
fn tc_ipv6_cap_holds_and_counts_return_to_zero() {
    if prerequisites("tc_ipv6_cap_holds_and_counts_return_to_zero") {
        cap_holds_and_counts_return_to_zero("tc6", AttachMode::Tc, true);
    }
}

#[test]
fn ipv6_sources_share_the_cap_of_their_prefix() {
    if !prerequisites("ipv6_sources_share_the_cap_of_their_prefix") {
        return;
    }
    let bed = Testbed::new("p64", AttachMode::Xdp, true, 3);
    let clients = bed.clients(true);
    // Three addresses of one /64 (the link's client addresses all are).
    let _a = bed.connect(clients[0]).unwrap();
    let _b = bed.connect(clients[0]).unwrap();
    let _c = bed.connect(clients[1]).unwrap();
    bed.wait_connections(clients[2], 3);
    assert_dropped(bed.connect(clients[2]), "a fresh address in the same /64");
    let counts = bed.kernel.datapath.connection_counts().unwrap();
    assert_eq!(counts.len(), 1, "one entry for the whole /64: {counts:?}");
    assert_eq!(counts[0].0.prefix_len(), 64);
}

#[test]
fn counts_return_to_zero_when_the_client_process_is_killed() {
    if !prerequisites("counts_return_to_zero_when_the_client_process_is_killed") {
        return;
    }
    let bed = Testbed::new("kil", AttachMode::Xdp, false, 10);
    let source = bed.clients(false)[2];
    let mut process =
        spawn_client_process(&bed.client, source, bed.listener.local_addr(), 4).unwrap();
    wait_for_line(&mut process, "connected", SETTLE).unwrap();
    bed.wait_connections(source, 4);
    process.kill_and_wait().unwrap();
    bed.assert_no_counts();
}

#[test]
fn counts_return_to_zero_after_resets() {
    if !prerequisites("counts_return_to_zero_after_resets") {
        return;
    }
    let bed = Testbed::new("rst", AttachMode::Tc, true, 10);
    let source = bed.clients(true)[3];
    let streams: Vec<_> = (0..3).map(|_| bed.connect(source).unwrap()).collect();
    bed.wait_connections(source, 3);
    assert!(bed.listener.wait_open(3, SETTLE));
    // The server aborts every connection (RST).
    assert_eq!(bed.listener.abort_all(), 3);
    bed.assert_no_counts();
    drop(streams);
}

#[test]
fn connections_in_other_namespaces_are_not_counted() {
    if !prerequisites("connections_in_other_namespaces_are_not_counted") {
        return;
    }
    let bed = Testbed::new("ons", AttachMode::Xdp, false, 10);
    // A second, unrelated pair of namespaces with traffic to the same port.
    let server = NetNs::new("lim-oth").unwrap();
    let client = NetNs::new("lim-otc").unwrap();
    let other = link(&server, &client, "onx").unwrap();
    let listener = Listener::start(&server, SocketAddr::new(other.server_v4.into(), PORT)).unwrap();
    let source: IpAddr = other.client_v4s[0].into();
    let _s = connect_from(&client, source, listener.local_addr(), CONNECT_TIMEOUT).unwrap();
    assert!(listener.wait_accepted(1, SETTLE));
    // The counting runs in the TCP state change itself: once a later
    // connection in the bed's namespace is counted, the earlier one in the
    // other namespace would have been too.
    let ours = bed.clients(false)[0];
    let _ours = bed
        .connect(ours)
        .expect("a connection in the bed's namespace");
    bed.wait_connections(ours, 1);
    let counts = bed.kernel.datapath.connection_counts().unwrap();
    assert_eq!(
        counts.len(),
        1,
        "only the bed's own connection is counted, not another namespace's: {counts:?}"
    );
}
