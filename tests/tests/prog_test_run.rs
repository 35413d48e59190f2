//! Packet-level tests of the XDP and TC programs in the real kernel, through
//! `BPF_PROG_TEST_RUN`: hand-built frames in, verdicts and map contents out.

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use limiter_common::Reason;
use limiter_tests::{
    kernel::{ebpf_object, PinDir, TestKernel},
    packets::{Ext, Frame, ACK, SYN_ACK},
    prerequisites,
};
use limiter_user::kernel::{
    BpfDatapath, Datapath, KernelError, KernelLimits, KernelOptions, MapSizes,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn limits(max_connections: u32) -> KernelLimits {
    KernelLimits {
        max_connections,
        ..KernelLimits::default()
    }
}

fn xdp(k: &TestKernel, frame: &Frame) -> u32 {
    k.datapath
        .test_run_xdp(&frame.build(), 1)
        .expect("test run")
        .0
}

fn tc(k: &TestKernel, frame: &Frame) -> u32 {
    k.datapath
        .test_run_tc(&frame.build(), 1)
        .expect("test run")
        .0
}

/// The real programs with their maps pinned under `pins`, the default
/// sizes and a cap of 10.
fn pinned_at(pins: &PinDir) -> KernelOptions {
    KernelOptions {
        object: ebpf_object(),
        pin_path: pins.path().to_owned(),
        map_sizes: MapSizes::default(),
        limits: limits(10),
    }
}

/// Sets the kernel's connection count for `source` (its configured prefix
/// for IPv6), as the sock_ops program would after `count` handshakes.
fn set_connections(k: &TestKernel, source: IpAddr, count: u32) {
    k.datapath.set_connection_count(source, count).unwrap();
}

#[test]
fn blocklist_drops_only_blocked_sources_on_protected_ports() {
    if !prerequisites("blocklist_drops_only_blocked_sources_on_protected_ports") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    d.block(net("192.0.2.1/32"), None, Reason::Manual).unwrap();
    d.block(net("2001:db8::66/128"), None, Reason::Harvest)
        .unwrap();
    d.block(net("198.51.100.0/24"), None, Reason::RejectList)
        .unwrap();
    d.block(net("2001:db8:bad::/48"), None, Reason::RejectList)
        .unwrap();

    // (frame, expected XDP action, why)
    let cases = [
        (
            Frame::syn(ip("192.0.2.1"), 25),
            XDP_DROP,
            "blocked address, SYN",
        ),
        (
            Frame::syn(ip("192.0.2.1"), 587).flags(ACK),
            XDP_DROP,
            "blocked address, established traffic",
        ),
        (
            Frame::syn(ip("192.0.2.2"), 25),
            XDP_PASS,
            "neighbour of a blocked address",
        ),
        (
            Frame::syn(ip("192.0.2.1"), 80),
            XDP_PASS,
            "unprotected port",
        ),
        (
            Frame::syn(ip("192.0.2.1"), 25).protocol(17),
            XDP_DROP,
            "UDP from a blocked source: not TCP, dropped whatever its port",
        ),
        (
            Frame::syn(ip("198.51.100.77"), 465),
            XDP_DROP,
            "inside a blocked IPv4 network",
        ),
        (Frame::syn(ip("198.51.101.77"), 465), XDP_PASS, "outside it"),
        (
            Frame::syn(ip("2001:db8::66"), 25),
            XDP_DROP,
            "blocked IPv6 address",
        ),
        (
            Frame::syn(ip("2001:db8::67"), 25),
            XDP_PASS,
            "neighbour of a blocked IPv6 address",
        ),
        (
            Frame::syn(ip("2001:db8:bad:1::9"), 25),
            XDP_DROP,
            "inside a blocked IPv6 network",
        ),
    ];
    for (frame, expected, why) in &cases {
        assert_eq!(xdp(&k, frame), *expected, "XDP: {why}: {frame:?}");
        let expected_tc = if *expected == XDP_DROP {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        };
        assert_eq!(tc(&k, frame), expected_tc, "TC: {why}: {frame:?}");
    }
    let counters = d.counters().unwrap();
    // Each case ran through XDP and TC.
    assert_eq!(counters.dropped_block, 2 * 4, "{counters:?}");
    assert_eq!(counters.dropped_block_net, 2 * 2, "{counters:?}");
    assert_eq!(counters.ignored, 2 * 2, "{counters:?}");
    let blocks = d.blocks().unwrap();
    let host = blocks
        .iter()
        .find(|b| b.net == net("192.0.2.1/32"))
        .unwrap();
    assert_eq!(host.drops, 2 * 3, "per-entry drop counter");
    assert_eq!(host.origin, Some(Reason::Manual));
    assert_eq!(host.expires, None);
}

#[test]
fn an_ipv4_mapped_ipv6_source_is_its_ipv4_address() {
    // The kernel judges an IPv6 packet from ::ffff:a.b.c.d as the IPv4
    // address it carries (as the proxy does): a different source on the
    // wire only in theory (such packets are invalid on the Internet), so
    // treating them alike is acceptable. This test pins down what happens.
    if !prerequisites("an_ipv4_mapped_ipv6_source_is_its_ipv4_address") {
        return;
    }
    let k = TestKernel::load(limits(10));
    k.datapath
        .block(net("192.0.2.1/32"), None, Reason::Manual)
        .unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("::ffff:192.0.2.1"), 25)), XDP_DROP);
}

#[test]
fn header_variants_are_parsed() {
    if !prerequisites("header_variants_are_parsed") {
        return;
    }
    let k = TestKernel::load(limits(10));
    k.datapath
        .block(net("192.0.2.1/32"), None, Reason::Manual)
        .unwrap();
    k.datapath
        .block(net("2001:db8::66/128"), None, Reason::Manual)
        .unwrap();
    let v4 = || Frame::syn(ip("192.0.2.1"), 25);
    let v6 = || Frame::syn(ip("2001:db8::66"), 25);
    let cases = [
        (v4().vlan(0x8100), XDP_DROP, "one 802.1Q tag"),
        (v4().vlan(0x88a8).vlan(0x8100), XDP_DROP, "QinQ"),
        (v6().vlan(0x8100), XDP_DROP, "IPv6 in VLAN"),
        (
            v4().vlan(0x8100).vlan(0x8100).vlan(0x8100),
            XDP_PASS,
            "three tags: beyond the parser, no source read, passed",
        ),
        (
            v4().ipv4_options(10),
            XDP_DROP,
            "IPv4 with options (IHL 15)",
        ),
        (
            v4().ipv4_fragment(0, true),
            XDP_DROP,
            "first IPv4 fragment carries TCP",
        ),
        (
            v4().ipv4_fragment(185, false),
            XDP_DROP,
            "later IPv4 fragment: no ports, but a blocked source",
        ),
        (v6().ext(Ext::HopByHop), XDP_DROP, "hop-by-hop"),
        (
            v6().ext(Ext::HopByHop)
                .ext(Ext::Routing)
                .ext(Ext::DestOpts)
                .ext(Ext::Ah),
            XDP_DROP,
            "four extension headers",
        ),
        (
            v6().ext(Ext::Fragment { offset: 0 }),
            XDP_DROP,
            "first IPv6 fragment",
        ),
        (
            v6().ext(Ext::Fragment { offset: 100 }),
            XDP_DROP,
            "later IPv6 fragment of a blocked source",
        ),
        (
            v6().ext(Ext::DestOpts).protocol(17),
            XDP_DROP,
            "UDP after an extension header, from a blocked source",
        ),
    ];
    for (frame, expected, why) in &cases {
        assert_eq!(xdp(&k, frame), *expected, "XDP: {why}");
        let expected_tc = if *expected == XDP_DROP {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK
        };
        assert_eq!(tc(&k, frame), expected_tc, "TC: {why}");
    }
    let counters = k.datapath.counters().unwrap();
    assert_eq!(counters.fragments, 2 * 2, "{counters:?}");
}

#[test]
fn truncated_packets_are_dropped_once_a_blocked_source_is_read() {
    if !prerequisites("truncated_packets_are_dropped_once_a_blocked_source_is_read") {
        return;
    }
    let k = TestKernel::load(limits(1));
    k.datapath
        .block(net("192.0.2.1/32"), None, Reason::Manual)
        .unwrap();
    k.datapath
        .block(net("2001:db8::66/128"), None, Reason::Manual)
        .unwrap();
    let frames = [
        Frame::syn(ip("192.0.2.1"), 25).vlan(0x8100).ipv4_options(3),
        Frame::syn(ip("2001:db8::66"), 25)
            .ext(Ext::HopByHop)
            .ext(Ext::Ah),
    ];
    // (frame, blocked): the same cuts from a source nobody blocked pass.
    let cases = frames.iter().flat_map(|f| {
        let mut neighbour = f.clone();
        neighbour.source = match f.source {
            IpAddr::V4(_) => ip("192.0.2.2"),
            IpAddr::V6(_) => ip("2001:db8::67"),
        };
        [(f.clone(), true), (neighbour, false)]
    });
    for (frame, blocked) in cases {
        let bytes = frame.build();
        let readable = frame.source_readable_len();
        let mut tc_runs = 0;
        // XDP test runs need at least an Ethernet header; TC ones too.
        for len in 14..bytes.len() {
            // Cut before the source address is whole: nothing to judge, passed.
            // After: a blocked source is dropped whatever is missing.
            let dropped = blocked && len >= readable;
            let (action, _) = k.datapath.test_run_xdp(&bytes[..len], 1).unwrap();
            let expected = if dropped { XDP_DROP } else { XDP_PASS };
            assert_eq!(
                action,
                expected,
                "XDP, {len} of {} bytes, {frame:?}",
                bytes.len()
            );
            // The kernel refuses skb test runs whose IP header is cut short
            // (EINVAL) before the program runs; once the fixed header is
            // there it must run (checked below), and judge like XDP.
            match k.datapath.test_run_tc(&bytes[..len], 1) {
                Ok((action, _)) => {
                    tc_runs += 1;
                    let expected = if dropped { TC_ACT_SHOT } else { TC_ACT_OK };
                    assert_eq!(
                        action,
                        expected,
                        "TC, {len} of {} bytes, {frame:?}",
                        bytes.len()
                    );
                }
                Err(e) => assert!(
                    len < readable,
                    "TC refused {len} of {} bytes: {e}",
                    bytes.len()
                ),
            }
        }
        assert!(
            tc_runs >= bytes.len() - readable,
            "TC ran {tc_runs} times for {frame:?}"
        );
        let whole = if blocked { XDP_DROP } else { XDP_PASS };
        assert_eq!(xdp(&k, &frame), whole, "the whole frame");
    }
    let counters = k.datapath.counters().unwrap();
    assert!(counters.malformed > 0, "{counters:?}");
    // Cut frames of the blocked sources are counted both as malformed and
    // as dropped; the neighbours' pass uncounted by any drop.
    assert!(counters.dropped_block > 2 * 2, "{counters:?}");
    assert_eq!(counters.dropped_block_net, 0, "{counters:?}");
}

/// Frames from `source` that the parser cannot judge down to a TCP port:
/// (frame bytes, what they are).
fn unjudgeable_frames(source: IpAddr) -> Vec<(Vec<u8>, String)> {
    let syn = || Frame::syn(source, 25);
    let mut frames = vec![
        (syn().protocol(17), "UDP to a protected port number"),
        (syn().protocol(1), "ICMP"),
        (syn().flags(ACK).protocol(132), "SCTP"),
    ];
    match source {
        IpAddr::V4(_) => frames.extend([
            (syn().ipv4_fragment(185, false), "later IPv4 fragment"),
            (
                syn().ipv4_fragment(1, true),
                "later IPv4 fragment, more follow",
            ),
        ]),
        IpAddr::V6(_) => {
            let mut long_chain = syn();
            for _ in 0..9 {
                long_chain = long_chain.ext(Ext::DestOpts);
            }
            let mut longer_chain = syn().ext(Ext::HopByHop);
            for _ in 0..12 {
                longer_chain = longer_chain.ext(Ext::Routing);
            }
            frames.extend([
                (
                    syn().ext(Ext::Fragment { offset: 100 }),
                    "later IPv6 fragment",
                ),
                (
                    long_chain,
                    "nine extension headers: more than the parser walks",
                ),
                (longer_chain, "thirteen extension headers"),
                (syn().ext(Ext::Routing).protocol(59), "no next header"),
            ]);
        }
    }
    let mut out: Vec<(Vec<u8>, String)> = frames
        .into_iter()
        .map(|(f, why)| (f.build(), format!("{why} from {source}")))
        .collect();
    // A TCP header cut short: 10 of its 20 bytes (the ports are there, the
    // flags are not), and a single byte.
    for keep in [10, 1] {
        let frame = syn();
        let mut bytes = frame.build();
        bytes.truncate(frame.tcp_offset() + keep);
        out.push((
            bytes,
            format!("TCP header cut to {keep} bytes, from {source}"),
        ));
    }
    // ICMP that is not an error nor neighbour discovery: echo requests.
    out.push((
        icmp(source, if source.is_ipv4() { 8 } else { 128 }),
        format!("ICMP echo request from {source}"),
    ));
    if source.is_ipv4() {
        // IHL below 5 is invalid: the source is readable, the rest is not.
        let mut bad_ihl = syn().build();
        bad_ihl[14] = 0x44;
        out.push((bad_ihl, format!("IPv4 IHL 4, from {source}")));
    }
    out
}

/// An ICMP (IPv4 source) or ICMPv6 message of type `icmp_type` from
/// `source` (the TCP header's bytes follow the type as the message body).
fn icmp(source: IpAddr, icmp_type: u8) -> Vec<u8> {
    let frame = Frame::syn(source, 25).protocol(if source.is_ipv4() { 1 } else { 58 });
    let mut bytes = frame.build();
    bytes[frame.tcp_offset()] = icmp_type;
    bytes[frame.tcp_offset() + 1] = 0;
    bytes
}

#[test]
fn icmp_errors_and_neighbour_discovery_pass_even_from_blocked_sources() {
    if !prerequisites("icmp_errors_and_neighbour_discovery_pass_even_from_blocked_sources") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    // Blocks as broad as they come: every IPv4 and every IPv6 source.
    d.block(net("::ffff:0.0.0.0/96"), None, Reason::Manual)
        .unwrap();
    d.block(net("::/0"), None, Reason::Manual).unwrap();
    let v4 = ip("192.0.2.1");
    let v6 = ip("fe80::1");
    let cases = [
        (
            icmp(v4, 3),
            true,
            "ICMP destination unreachable / fragmentation needed",
        ),
        (icmp(v4, 11), true, "ICMP time exceeded"),
        (icmp(v4, 12), true, "ICMP parameter problem"),
        (icmp(v4, 8), false, "ICMP echo request"),
        (icmp(v4, 0), false, "ICMP echo reply"),
        (icmp(v6, 1), true, "ICMPv6 destination unreachable"),
        (icmp(v6, 2), true, "ICMPv6 packet too big"),
        (icmp(v6, 133), true, "router solicitation"),
        (icmp(v6, 134), true, "router advertisement"),
        (icmp(v6, 135), true, "neighbour solicitation"),
        (icmp(v6, 136), true, "neighbour advertisement"),
        (icmp(v6, 137), true, "redirect"),
        (icmp(v6, 128), false, "ICMPv6 echo request"),
        (icmp(v6, 143), false, "MLDv2 report"),
    ];
    for (bytes, passes, why) in &cases {
        let (xdp_action, _) = d.test_run_xdp(bytes, 1).unwrap();
        let (tc_action, _) = d.test_run_tc(bytes, 1).unwrap();
        let expected = if *passes {
            (XDP_PASS, TC_ACT_OK)
        } else {
            (XDP_DROP, TC_ACT_SHOT)
        };
        assert_eq!((xdp_action, tc_action), expected, "{why}");
    }
    // The type cut off: not judged as plumbing, so dropped.
    let cut = icmp(v6, 135);
    let (action, _) = d.test_run_xdp(&cut[..cut.len() - 20], 1).unwrap();
    assert_eq!(action, XDP_DROP, "ICMPv6 without its type");
}

#[test]
fn a_blocked_source_is_dropped_whatever_its_packets_look_like() {
    if !prerequisites("a_blocked_source_is_dropped_whatever_its_packets_look_like") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    d.block(net("192.0.2.1/32"), None, Reason::Manual).unwrap();
    d.block(net("2001:db8::66/128"), None, Reason::Harvest)
        .unwrap();
    d.block(net("198.51.100.0/24"), None, Reason::RejectList)
        .unwrap();
    d.block(net("2001:db8:bad::/48"), None, Reason::RejectList)
        .unwrap();
    // Allow-listed inside a blocked network: the allow list still wins.
    d.allow(net("198.51.100.128/25")).unwrap();

    let blocked = ["192.0.2.1", "2001:db8::66"];
    let in_blocked_net = ["198.51.100.7", "2001:db8:bad:1::9"];
    let passing = ["192.0.2.2", "2001:db8::67", "203.0.113.9", "198.51.100.200"];
    let mut dropped = 0;
    for (sources, drop) in [
        (&blocked[..], true),
        (&in_blocked_net[..], true),
        (&passing[..], false),
    ] {
        for source in sources {
            for (bytes, why) in unjudgeable_frames(ip(source)) {
                let (xdp_action, _) = d
                    .test_run_xdp(&bytes, 1)
                    .unwrap_or_else(|e| panic!("XDP test run, {why}: {e}"));
                let (tc_action, _) = d
                    .test_run_tc(&bytes, 1)
                    .unwrap_or_else(|e| panic!("TC test run, {why}: {e}"));
                if drop {
                    assert_eq!(xdp_action, XDP_DROP, "XDP: {why}");
                    assert_eq!(tc_action, TC_ACT_SHOT, "TC: {why}");
                    dropped += 2;
                } else {
                    assert_eq!(xdp_action, XDP_PASS, "XDP: {why}");
                    assert_eq!(tc_action, TC_ACT_OK, "TC: {why}");
                }
            }
        }
    }
    // A blocked source's TCP to an unprotected port still passes: it is
    // judged like any TCP packet (the protected-ports rule).
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.1"), 80)), XDP_PASS);
    assert_eq!(tc(&k, &Frame::syn(ip("192.0.2.1"), 80)), TC_ACT_OK);

    let counters = d.counters().unwrap();
    assert_eq!(
        counters.dropped_block + counters.dropped_block_net,
        dropped,
        "{counters:?}"
    );
    assert!(counters.dropped_block > 0 && counters.dropped_block_net > 0);
    assert!(counters.fragments > 0 && counters.malformed > 0 && counters.ignored > 0);
    assert_eq!(counters.seen, 0, "no packet was judged by its port");
    assert!(counters.allowed > 0, "the allow-listed /25: {counters:?}");
    let host = d
        .blocks()
        .unwrap()
        .into_iter()
        .find(|b| b.net == net("192.0.2.1/32"))
        .unwrap();
    assert!(host.drops > 0, "per-entry drop counter: {host:?}");
}

#[test]
fn observe_mode_passes_and_counts_what_it_would_drop() {
    if !prerequisites("observe_mode_passes_and_counts_what_it_would_drop") {
        return;
    }
    let observe = KernelLimits {
        observe: true,
        ..limits(3)
    };
    let k = TestKernel::load(observe.clone());
    let d = &k.datapath;
    d.block(net("192.0.2.1/32"), None, Reason::Manual).unwrap();
    d.block(net("198.51.100.0/24"), None, Reason::RejectList)
        .unwrap();
    let capped = ip("203.0.113.5");
    set_connections(&k, capped, 3);
    assert!(d.describe().contains("observe"), "{}", d.describe());

    let block = Frame::syn(ip("192.0.2.1"), 25);
    let block_net = Frame::syn(ip("198.51.100.77"), 587);
    let cap = Frame::syn(capped, 25);
    let fragment = Frame::syn(ip("192.0.2.1"), 25).ipv4_fragment(185, false);
    for frame in [&block, &block_net, &cap, &fragment] {
        assert_eq!(xdp(&k, frame), XDP_PASS, "XDP observes: {frame:?}");
        assert_eq!(tc(&k, frame), TC_ACT_OK, "TC observes: {frame:?}");
    }
    let c = d.counters().unwrap();
    assert_eq!(
        (c.would_drop_block, c.would_drop_block_net, c.would_drop_cap),
        (2 * 2, 2, 2),
        "{c:?}"
    );
    assert_eq!(
        (c.dropped_block, c.dropped_block_net, c.dropped_cap),
        (0, 0, 0),
        "{c:?}"
    );
    assert_eq!(c.passed, 0, "would-drops are not counted as passed: {c:?}");
    let drops: u64 = d.blocks().unwrap().iter().map(|b| b.drops).sum();
    assert_eq!(drops, 0, "nothing was dropped by any entry");

    // Switching to enforce and back takes effect at once (what a reload
    // does through set_limits).
    d.set_limits(&limits(3)).unwrap();
    assert!(!d.describe().contains("observe"), "{}", d.describe());
    for frame in [&block, &block_net, &cap, &fragment] {
        assert_eq!(xdp(&k, frame), XDP_DROP, "XDP enforces: {frame:?}");
        assert_eq!(tc(&k, frame), TC_ACT_SHOT, "TC enforces: {frame:?}");
    }
    d.set_limits(&observe).unwrap();
    for frame in [&block, &block_net, &cap, &fragment] {
        assert_eq!(xdp(&k, frame), XDP_PASS, "XDP observes again: {frame:?}");
    }
    let c = d.counters().unwrap();
    assert_eq!(
        (c.would_drop_block, c.would_drop_block_net, c.would_drop_cap),
        (2 * 2 + 2, 2 + 1, 2 + 1),
        "{c:?}"
    );
    assert_eq!(
        (c.dropped_block, c.dropped_block_net, c.dropped_cap),
        (2 * 2, 2, 2),
        "{c:?}"
    );

    // Events say which packets were only observed.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events = runtime.block_on(async {
        let mut stream = d.take_events().unwrap();
        let mut events = Vec::new();
        // 4 frames x 2 programs observed, enforced, then 4 observed.
        while events.len() < 20 {
            let batch = tokio::time::timeout(Duration::from_secs(5), stream.next_batch()).await;
            events.extend(batch.expect("events within 5 s").unwrap());
        }
        events
    });
    let observed: Vec<bool> = events.iter().map(|e| e.observed).collect();
    assert_eq!(observed[..8], [true; 8]);
    assert_eq!(observed[8..16], [false; 8]);
    assert_eq!(observed[16..], [true; 4]);
    assert!(
        events.iter().any(|e| e.port == 0),
        "the fragment has no port"
    );
}

#[test]
fn expired_blocks_pass_and_are_swept() {
    if !prerequisites("expired_blocks_pass_and_are_swept") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    let past = SystemTime::now() - Duration::from_secs(5);
    let future = SystemTime::now() + Duration::from_secs(3600);
    d.block(net("192.0.2.1/32"), Some(past), Reason::Harvest)
        .unwrap();
    d.block(net("192.0.2.2/32"), Some(future), Reason::Harvest)
        .unwrap();
    d.block(net("198.51.100.0/24"), Some(past), Reason::Flood)
        .unwrap();
    assert_eq!(
        xdp(&k, &Frame::syn(ip("192.0.2.1"), 25)),
        XDP_PASS,
        "expired address block"
    );
    assert_eq!(
        xdp(&k, &Frame::syn(ip("198.51.100.1"), 25)),
        XDP_PASS,
        "expired network block"
    );
    assert_eq!(
        xdp(&k, &Frame::syn(ip("192.0.2.2"), 25)),
        XDP_DROP,
        "live block"
    );
    assert_eq!(d.counters().unwrap().expired_block, 2);
    // What the proxy asks at accept: the same answers from userspace.
    assert!(
        d.block_covering(ip("192.0.2.1")).unwrap().is_none(),
        "expired"
    );
    assert!(
        d.block_covering(ip("198.51.100.1")).unwrap().is_none(),
        "expired network"
    );
    let hit = d
        .block_covering(ip("192.0.2.2"))
        .unwrap()
        .expect("live block");
    assert_eq!(hit.origin, Some(Reason::Harvest));
    d.block(net("203.0.113.0/24"), None, Reason::Flood).unwrap();
    assert_eq!(
        d.block_covering(ip("203.0.113.9"))
            .unwrap()
            .and_then(|h| h.origin),
        Some(Reason::Flood)
    );
    assert!(d.unblock(net("203.0.113.0/24")).unwrap());

    let live = d
        .blocks()
        .unwrap()
        .into_iter()
        .find(|b| b.net == net("192.0.2.2/32"))
        .unwrap();
    let expires = live.expires.expect("has an expiry");
    let error = expires
        .duration_since(future)
        .unwrap_or_else(|e| e.duration());
    assert!(
        error < Duration::from_millis(50),
        "expiry read back {error:?} off"
    );

    assert_eq!(d.sweep_expired(SystemTime::now()).unwrap(), 2);
    let left: Vec<IpNet> = d.blocks().unwrap().into_iter().map(|b| b.net).collect();
    assert_eq!(left, vec![net("192.0.2.2/32")]);
    assert!(d.unblock(net("192.0.2.2/32")).unwrap());
    assert!(
        !d.unblock(net("192.0.2.2/32")).unwrap(),
        "second removal finds nothing"
    );
    assert_eq!(
        xdp(&k, &Frame::syn(ip("192.0.2.2"), 25)),
        XDP_PASS,
        "unblocked"
    );
}

#[test]
fn network_prefilters_follow_adds_and_removals() {
    if !prerequisites("network_prefilters_follow_adds_and_removals") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    d.block(net("10.0.0.0/8"), None, Reason::RejectList)
        .unwrap();
    d.block(net("10.1.0.0/16"), None, Reason::Manual).unwrap();
    d.block(net("2001:db8::/32"), None, Reason::Manual).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)), XDP_DROP);
    // Removing the /16 must keep the /8's bits.
    assert!(d.unblock(net("10.1.0.0/16")).unwrap());
    assert_eq!(
        xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)),
        XDP_DROP,
        "still inside 10/8"
    );
    assert!(d.unblock(net("10.0.0.0/8")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)), XDP_PASS);
    // IPv6 has a prefilter of its own, on the first 16 bits.
    assert_eq!(xdp(&k, &Frame::syn(ip("2001:db8::5"), 25)), XDP_DROP);
    d.block(net("2001:db8:77::/48"), None, Reason::Manual)
        .unwrap();
    assert!(d.unblock(net("2001:db8::/32")).unwrap());
    assert_eq!(
        xdp(&k, &Frame::syn(ip("2001:db8:77::5"), 25)),
        XDP_DROP,
        "the /48 keeps the bit the /32 shared"
    );
    assert_eq!(xdp(&k, &Frame::syn(ip("2001:db8::5"), 25)), XDP_PASS);
    assert!(d.unblock(net("2001:db8:77::/48")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("2001:db8:77::5"), 25)), XDP_PASS);
    // An IPv6 network holds IPv6 sources only, as in the proxy (IPv4 is
    // blocked as IPv4, or as ::ffff:a.b.c.d/96+n, which is the same).
    d.block(net("::/0"), None, Reason::Manual).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("3fff::1"), 25)), XDP_DROP);
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_PASS);
    assert!(d.unblock(net("::/0")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("3fff::1"), 25)), XDP_PASS);
    d.block(net("::ffff:192.0.2.0/120"), None, Reason::Manual)
        .unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_DROP);
    assert!(d.unblock(net("192.0.2.0/24")).unwrap());
    // Allow-list and caps use prefilters of their own.
    d.block(net("192.0.2.44/32"), None, Reason::Manual).unwrap();
    d.allow(net("192.0.2.0/24")).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_PASS);
    assert!(d.disallow(net("192.0.2.0/24")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_DROP);
}

/// Bits set in the pinned `BLOCK_HINTS` (the host tables' prefilter).
fn block_hint_bits(pins: &PinDir) -> u32 {
    let data = aya::maps::MapData::from_pin(pins.path().join("BLOCK_HINTS")).unwrap();
    let array = aya::maps::Array::<_, u64>::try_from(aya::maps::Map::Array(data)).unwrap();
    array.iter().map(|w| w.unwrap().count_ones()).sum()
}

/// The host tables' prefilter (`BLOCK_HINTS`) skips the hash lookup for a
/// source whose bit is clear: a bit cleared while its address is blocked
/// would let that source through. Addresses an attacker holds in bulk (one
/// IPv4 /16, one IPv6 /64), some expiring, go through a sweep, removals, a
/// restart and an upgrade from pins without the prefilter; after each step
/// every blocked address is dropped and every other one passes, and the
/// bitmap keeps no more bits than the tables need.
#[test]
fn host_prefilter_never_lets_a_blocked_address_through() {
    if !prerequisites("host_prefilter_never_lets_a_blocked_address_through") {
        return;
    }
    let pins = PinDir::new();
    let options = pinned_at(&pins);
    let past = SystemTime::now() - Duration::from_secs(5);
    let addresses: Vec<IpAddr> = (0..600u16)
        .map(|i| IpAddr::from([198, 51, (i >> 8) as u8, i as u8]))
        .chain((0..600u16).map(|i| IpAddr::from([0x2001, 0xdb8, 0, 7, 0, 0, 0, i])))
        .collect();
    // Every third expired, every third permanent, every third never blocked.
    let d = BpfDatapath::load(&options).unwrap();
    for (i, a) in addresses.iter().enumerate() {
        match i % 3 {
            0 => d
                .block(IpNet::from(*a), Some(past), Reason::Harvest)
                .unwrap(),
            1 => d.block(IpNet::from(*a), None, Reason::Manual).unwrap(),
            _ => {}
        }
    }
    let verdicts = |d: &BpfDatapath, blocked: &dyn Fn(usize) -> bool, step: &str| {
        for (i, a) in addresses.iter().enumerate() {
            let frame = Frame::syn(*a, 25).build();
            let want = if blocked(i) { XDP_DROP } else { XDP_PASS };
            assert_eq!(d.test_run_xdp(&frame, 1).unwrap().0, want, "{a} {step}");
        }
    };
    verdicts(&d, &|i| i % 3 == 1, "after the blocks");
    let all = block_hint_bits(&pins);
    assert!((790..=800).contains(&all), "{all} bits for 800 addresses");

    assert_eq!(d.sweep_expired(SystemTime::now()).unwrap(), 400);
    verdicts(&d, &|i| i % 3 == 1, "after the sweep");
    let live = block_hint_bits(&pins);
    assert!(live <= 400 && live < all, "{live} bits for 400 addresses");

    // Removals leave their bits (a stale bit costs a lookup) until a sweep.
    for a in addresses.iter().skip(1).step_by(6) {
        assert!(d.unblock(IpNet::from(*a)).unwrap(), "{a}");
    }
    verdicts(&d, &|i| i % 6 == 4, "after the removals");
    assert_eq!(block_hint_bits(&pins), live);
    d.sweep_expired(SystemTime::now()).unwrap();
    verdicts(&d, &|i| i % 6 == 4, "after the second sweep");
    let left = block_hint_bits(&pins);
    assert!(left <= 200 && left < live, "{left} bits for 200 addresses");

    // A restart keeps them; so does an upgrade from pins without the map.
    drop(d);
    let d = BpfDatapath::load(&options).unwrap();
    verdicts(&d, &|i| i % 6 == 4, "after a restart");
    drop(d);
    std::fs::remove_file(pins.path().join("BLOCK_HINTS")).unwrap();
    let d = BpfDatapath::load(&options).unwrap();
    verdicts(&d, &|i| i % 6 == 4, "after an upgrade");
    assert_eq!(block_hint_bits(&pins), left);
}

/// Drops of the host entries of `d`, by address.
fn host_drops(d: &BpfDatapath) -> std::collections::HashMap<IpAddr, u64> {
    d.blocks()
        .unwrap()
        .into_iter()
        .map(|b| (b.net.addr(), b.drops))
        .collect()
}

/// A flood from a blocked source is dropped from each CPU's cached copy of
/// its entry once it has dropped 64 packets. The copy must never outlive
/// what it copies (a removal, a shorter expiry), two sources sharing a slot
/// must keep their counts, and every drop must reach the entry's count,
/// also across an agent stop.
#[test]
fn hot_blocked_sources_are_dropped_from_a_cache_that_never_outlives_the_block() {
    if !prerequisites("hot_blocked_sources_are_dropped_from_a_cache_that_never_outlives_the_block")
    {
        return;
    }
    let pins = PinDir::new();
    let options = pinned_at(&pins);
    let d = BpfDatapath::load(&options).unwrap();
    let flood = |d: &BpfDatapath, source: IpAddr, packets: u32| {
        let frame = Frame::syn(source, 25).build();
        d.test_run_xdp(&frame, packets).unwrap().0
    };
    // Two IPv4 sources in one cache slot, and an IPv6 one.
    let slot = |a: IpAddr| match a {
        IpAddr::V4(v4) => limiter_common::hot::slot(limiter_common::host_hint::hash_v4(
            u32::from_ne_bytes(v4.octets()),
        )),
        IpAddr::V6(_) => unreachable!(),
    };
    let a = ip("192.0.2.1");
    let b = (2..=255u8)
        .map(|i| IpAddr::from([192, 0, 2, i]))
        .find(|b| slot(*b) == slot(a))
        .or_else(|| {
            (0..=255u8)
                .flat_map(|j| (1..=254u8).map(move |i| IpAddr::from([198, 51, j, i])))
                .find(|b| slot(*b) == slot(a))
        })
        .expect("an address in the same slot");
    let c = ip("2001:db8::c");
    for source in [a, b, c] {
        d.block(IpNet::from(source), None, Reason::Manual).unwrap();
    }
    assert_eq!(flood(&d, a, 1000), XDP_DROP);
    assert_eq!(flood(&d, c, 1000), XDP_DROP);
    assert_eq!(
        host_drops(&d)[&a],
        1000,
        "cached drops are read with the entry's"
    );
    assert_eq!(host_drops(&d)[&c], 1000);
    // b takes a's slot; a's copy gives its drops to a's entry.
    assert_eq!(flood(&d, b, 500), XDP_DROP);
    assert_eq!(flood(&d, a, 300), XDP_DROP);
    let drops = host_drops(&d);
    assert_eq!((drops[&a], drops[&b]), (1300, 500));

    // A removal ends the copy at once.
    assert!(d.unblock(IpNet::from(a)).unwrap());
    assert!(d.unblock(IpNet::from(c)).unwrap());
    assert_eq!(
        flood(&d, a, 1),
        XDP_PASS,
        "removed, still dropped from the cache"
    );
    assert_eq!(
        flood(&d, c, 1),
        XDP_PASS,
        "removed, still dropped from the cache"
    );
    // So does a new expiry in the past, on a copy made without one.
    d.block(IpNet::from(a), None, Reason::Manual).unwrap();
    assert_eq!(flood(&d, a, 1000), XDP_DROP);
    let past = SystemTime::now() - Duration::from_secs(1);
    d.block(IpNet::from(a), Some(past), Reason::Manual).unwrap();
    assert_eq!(
        flood(&d, a, 1),
        XDP_PASS,
        "expired, still dropped from the cache"
    );
    d.block(IpNet::from(a), None, Reason::Manual).unwrap();
    assert_eq!(flood(&d, a, 100), XDP_DROP);
    // b was not touched: its copy holds through the others' changes.
    assert_eq!(flood(&d, b, 100), XDP_DROP);

    // A blocked network: each source inside gets its own copy of the
    // network's entry.
    let inside = [ip("198.51.100.7"), ip("198.51.100.8")];
    d.block(net("198.51.100.0/24"), None, Reason::RejectList)
        .unwrap();
    for source in inside {
        assert_eq!(flood(&d, source, 500), XDP_DROP);
    }
    assert_eq!(host_drops(&d)[&ip("198.51.100.0")], 1000);
    // A more specific entry inside, already expired, wins as in the trie.
    d.block(net("198.51.100.0/28"), Some(past), Reason::Manual)
        .unwrap();
    assert_eq!(
        flood(&d, inside[0], 1),
        XDP_PASS,
        "the /28 is the entry that counts"
    );
    assert!(d.unblock(net("198.51.100.0/28")).unwrap());
    assert_eq!(flood(&d, inside[0], 100), XDP_DROP);
    assert!(d.unblock(net("198.51.100.0/24")).unwrap());
    assert_eq!(
        flood(&d, inside[0], 1),
        XDP_PASS,
        "removed, still dropped from the cache"
    );
    d.block(net("198.51.100.0/24"), None, Reason::RejectList)
        .unwrap();
    assert_eq!(flood(&d, inside[1], 1000), XDP_DROP);

    // Stopping the agent puts the cached drops into the pinned entries,
    // once (the agent detaches, then drops the datapath).
    let before = host_drops(&d);
    d.detach();
    drop(d);
    let view = BpfDatapath::open_pinned(pins.path()).unwrap();
    assert_eq!(host_drops(&view), before);
    assert_eq!(before[&b], 600);
    assert_eq!(before[&a], 1100, "1000 before the expiry, then 100");
    assert_eq!(
        before[&ip("198.51.100.0")],
        1000,
        "the network blocked again"
    );
}

/// A source found at its cap is dropped from each CPU's cached copy of that
/// finding. The copy must end as soon as the source may open a connection
/// again: one of its connections closes (the sock_ops program), or the
/// agent changes its count, its network's cap or the limits.
#[test]
fn a_source_at_its_cap_is_dropped_from_a_cache_that_ends_when_it_may_connect_again() {
    if !prerequisites(
        "a_source_at_its_cap_is_dropped_from_a_cache_that_ends_when_it_may_connect_again",
    ) {
        return;
    }
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let k = TestKernel::load(KernelLimits {
        ports: vec![port],
        ..limits(2)
    });
    let d = &k.datapath;
    let syn = |source: &str| {
        let frame = Frame::syn(ip(source), port).build();
        d.test_run_xdp(&frame, 1000).unwrap().0
    };
    // Two real connections put 127.0.0.1 at its cap of 2.
    let first = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (first_server, _) = listener.accept().unwrap();
    let _second = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (_second_server, _) = listener.accept().unwrap();
    eventually("two connections counted", || {
        d.connections(ip("127.0.0.1")).unwrap() == 2
    });
    assert_eq!(syn("127.0.0.1"), XDP_DROP);
    drop((first, first_server));
    eventually("the close counted", || {
        d.connections(ip("127.0.0.1")).unwrap() == 1
    });
    assert_eq!(
        syn("127.0.0.1"),
        XDP_PASS,
        "closed, still dropped from the cache"
    );

    // The agent's changes, on a source whose count it sets.
    set_connections(&k, ip("192.0.2.9"), 2);
    assert_eq!(syn("192.0.2.9"), XDP_DROP);
    set_connections(&k, ip("192.0.2.9"), 1);
    assert_eq!(
        syn("192.0.2.9"),
        XDP_PASS,
        "count lowered, still dropped from the cache"
    );
    set_connections(&k, ip("192.0.2.9"), 2);
    assert_eq!(syn("192.0.2.9"), XDP_DROP);
    d.set_cap(net("192.0.2.0/24"), 5).unwrap();
    assert_eq!(
        syn("192.0.2.9"),
        XDP_PASS,
        "cap raised, still dropped from the cache"
    );
    assert!(d.remove_cap(net("192.0.2.0/24")).unwrap());
    assert_eq!(syn("192.0.2.9"), XDP_DROP);
    d.set_limits(&KernelLimits {
        ports: vec![port],
        ..limits(3)
    })
    .unwrap();
    assert_eq!(
        syn("192.0.2.9"),
        XDP_PASS,
        "limit raised, still dropped from the cache"
    );
    // IPv6: the count is the /64's, the copy the address's.
    set_connections(&k, ip("2001:db8:1:2::9"), 3);
    assert_eq!(syn("2001:db8:1:2::9"), XDP_DROP);
    assert_eq!(syn("2001:db8:1:2::77"), XDP_DROP, "the same /64");
    set_connections(&k, ip("2001:db8:1:2::9"), 2);
    assert_eq!(
        syn("2001:db8:1:2::77"),
        XDP_PASS,
        "count lowered, still dropped from the cache"
    );
}

/// Networks of many lengths in one /16 (IPv4 198.51/16, IPv6 2001:db8::/32):
/// every fine-prefix network (/24, /48) or longer takes a bit of its own,
/// shorter ones the /16's. Toggled in a fixed pseudo-random order, each
/// step is checked against a model on addresses inside and beside every
/// network: a prefilter bit cleared too early would let a blocked source
/// through (or fail to apply an allow entry).
#[test]
fn fine_prefilters_keep_every_network_of_a_16_in_force() {
    if !prerequisites("fine_prefilters_keep_every_network_of_a_16_in_force") {
        return;
    }
    let nets: Vec<IpNet> = [
        "198.51.0.0/16",
        "198.51.0.0/20",
        "198.51.16.0/23",
        "198.51.100.0/24",
        "198.51.101.0/24",
        "198.51.100.64/26",
        "198.51.100.77/32",
        "198.51.200.0/25",
        "2001:db8::/32",
        "2001:db8:ba0::/44",
        "2001:db8:bad::/48",
        "2001:db8:bad:7::/64",
        "2001:db8:bad:7::1/128",
        "2001:db8:beef::/48",
        "2001:db8:beef:1::/64",
        "2001:db8:c0::/47",
        "::ffff:198.51.102.0/120",
    ]
    .iter()
    .map(|n| net(n).trunc())
    .collect();
    let probes: Vec<IpAddr> = [
        "198.51.100.77",
        "198.51.100.78",
        "198.51.100.1",
        "198.51.101.9",
        "198.51.102.9",
        "198.51.17.3",
        "198.51.15.3",
        "198.51.200.5",
        "198.51.200.200",
        "198.51.255.1",
        "198.52.0.1",
        "2001:db8:bad:7::1",
        "2001:db8:bad:7::2",
        "2001:db8:bad:8::1",
        "2001:db8:bac::1",
        "2001:db8:beef:1::5",
        "2001:db8:beef:2::5",
        "2001:db8:c1:ffff::1",
        "2001:db8:c2::1",
        "2001:db8:ffff::1",
        "2001:db9::1",
    ]
    .iter()
    .map(|a| ip(a))
    .collect();
    // A network as the kernel holds it: IPv4-mapped ones are IPv4.
    let contains = |n: &IpNet, a: &IpAddr| match (n, a) {
        (IpNet::V6(n6), IpAddr::V4(v4)) if n6.prefix_len() >= 96 => {
            n6.contains(&v4.to_ipv6_mapped())
        }
        _ => n.contains(a),
    };
    let mut state: u64 = 0x0ddb_a11c_afe5_1de5;
    let mut next = move |n: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((state >> 33) as usize) % n
    };
    for allow in [false, true] {
        let k = TestKernel::load(limits(10));
        let d = &k.datapath;
        if allow {
            // Everything blocked by networks the toggled ones are not in;
            // the allow entries carve sources out.
            d.block(net("198.0.0.0/8"), None, Reason::Manual).unwrap();
            d.block(net("2001::/16"), None, Reason::Manual).unwrap();
        }
        let mut on = vec![false; nets.len()];
        for step in 0..240 {
            let i = next(nets.len());
            let n = nets[i];
            match (allow, on[i]) {
                (false, false) => d.block(n, None, Reason::Manual).unwrap(),
                (false, true) => assert!(d.unblock(n).unwrap(), "{n}"),
                (true, false) => d.allow(n).unwrap(),
                (true, true) => assert!(d.disallow(n).unwrap(), "{n}"),
            }
            on[i] = !on[i];
            for probe in &probes {
                let listed = nets
                    .iter()
                    .zip(&on)
                    .any(|(n, on)| *on && contains(n, probe));
                let expected = match (allow, listed) {
                    // Every probe is inside the outer blocks.
                    (true, listed) => {
                        if listed {
                            XDP_PASS
                        } else {
                            XDP_DROP
                        }
                    }
                    (false, listed) => {
                        if listed {
                            XDP_DROP
                        } else {
                            XDP_PASS
                        }
                    }
                };
                assert_eq!(
                    xdp(&k, &Frame::syn(*probe, 25)),
                    expected,
                    "{} step {step} ({} {n}): {probe}; in force: {:?}",
                    if allow { "allow" } else { "block" },
                    if on[i] { "added" } else { "removed" },
                    nets.iter()
                        .zip(&on)
                        .filter(|(_, on)| **on)
                        .map(|(n, _)| n.to_string())
                        .collect::<Vec<_>>()
                );
            }
        }
    }
}

#[test]
fn allowlist_wins_over_blocks_and_caps() {
    if !prerequisites("allowlist_wins_over_blocks_and_caps") {
        return;
    }
    let k = TestKernel::load(limits(1));
    let d = &k.datapath;
    d.block(net("10.1.0.0/16"), None, Reason::RejectList)
        .unwrap();
    d.block(net("10.1.2.3/32"), None, Reason::Manual).unwrap();
    d.allow(net("10.1.2.0/24")).unwrap();
    set_connections(&k, ip("10.1.2.3"), 50);
    assert_eq!(xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)), XDP_PASS);
    assert_eq!(
        xdp(&k, &Frame::syn(ip("10.1.3.3"), 25)),
        XDP_DROP,
        "outside the allowed /24"
    );
    assert_eq!(d.allows().unwrap(), vec![net("10.1.2.0/24")]);
    assert!(d.disallow(net("10.1.2.0/24")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)), XDP_DROP);
    // IPv6: its own trie and prefilter.
    d.block(net("2001:db8:5::/48"), None, Reason::Manual)
        .unwrap();
    d.allow(net("2001:db8:5:1::/64")).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("2001:db8:5:1::9"), 25)), XDP_PASS);
    assert_eq!(xdp(&k, &Frame::syn(ip("2001:db8:5:2::9"), 25)), XDP_DROP);
    assert_eq!(
        d.allows().unwrap(),
        vec![net("2001:db8:5:1::/64")],
        "each family listed"
    );
    assert_eq!(d.counters().unwrap().allowed, 2);
}

#[test]
fn connection_cap_drops_only_new_connections() {
    if !prerequisites("connection_cap_drops_only_new_connections") {
        return;
    }
    let k = TestKernel::load(limits(3));
    let d = &k.datapath;
    let source = ip("203.0.113.5");
    set_connections(&k, source, 2);
    assert_eq!(xdp(&k, &Frame::syn(source, 25)), XDP_PASS, "2 of 3");
    set_connections(&k, source, 3);
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25)),
        XDP_DROP,
        "3 of 3: new connection dropped"
    );
    assert_eq!(tc(&k, &Frame::syn(source, 25)), TC_ACT_SHOT, "TC too");
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25).flags(ACK)),
        XDP_PASS,
        "established traffic flows"
    );
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25).flags(SYN_ACK)),
        XDP_PASS,
        "SYN-ACK is not a new connection"
    );
    assert_eq!(d.connections(source).unwrap(), 3);

    // A per-network override raises the cap; 0 lifts it.
    d.set_cap(net("203.0.113.0/24"), 5).unwrap();
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25)),
        XDP_PASS,
        "cap 5 for the /24"
    );
    d.set_cap(net("203.0.113.5/32"), 2).unwrap();
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25)),
        XDP_DROP,
        "the most specific override wins"
    );
    d.set_cap(net("203.0.113.5/32"), 0).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(source, 25)), XDP_PASS, "0 = unlimited");
    assert_eq!(d.caps().unwrap().len(), 2);

    // The global cap changes live.
    assert!(d.remove_cap(net("203.0.113.5/32")).unwrap());
    assert!(d.remove_cap(net("203.0.113.0/24")).unwrap());
    d.set_limits(&limits(4)).unwrap();
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25)),
        XDP_PASS,
        "global cap raised to 4"
    );
    d.set_limits(&limits(0)).unwrap();
    set_connections(&k, source, 1000);
    assert_eq!(
        xdp(&k, &Frame::syn(source, 25)),
        XDP_PASS,
        "global 0 = unlimited"
    );
    assert_eq!(d.counters().unwrap().dropped_cap, 3);
}

#[test]
fn ipv6_sources_are_capped_per_prefix() {
    if !prerequisites("ipv6_sources_are_capped_per_prefix") {
        return;
    }
    let k = TestKernel::load(KernelLimits {
        max_connections: 2,
        ipv6_prefix_len: 64,
        ..KernelLimits::default()
    });
    set_connections(&k, ip("2001:db8:1:2::1"), 2);
    assert_eq!(
        xdp(&k, &Frame::syn(ip("2001:db8:1:2:ffff::9"), 25)),
        XDP_DROP,
        "same /64, other address"
    );
    assert_eq!(
        xdp(&k, &Frame::syn(ip("2001:db8:1:3::1"), 25)),
        XDP_PASS,
        "next /64"
    );
    let counts = k.datapath.connection_counts().unwrap();
    assert_eq!(counts, vec![(net("2001:db8:1:2::/64"), 2)]);
    assert_eq!(k.datapath.connections(ip("2001:db8:1:2::77")).unwrap(), 2);
}

#[test]
fn drop_events_are_reported_within_budget() {
    if !prerequisites("drop_events_are_reported_within_budget") {
        return;
    }
    let k = TestKernel::load(KernelLimits {
        events_per_second: 3,
        ..limits(10)
    });
    k.datapath
        .block(net("192.0.2.9/32"), None, Reason::Auth)
        .unwrap();
    let frame = Frame::syn(ip("192.0.2.9"), 587).build();
    // Ten drops in one test run: microseconds, well inside one second.
    let (action, _) = k.datapath.test_run_xdp(&frame, 10).unwrap();
    assert_eq!(action, XDP_DROP);
    let counters = k.datapath.counters().unwrap();
    assert_eq!(
        (counters.events_sent, counters.events_suppressed),
        (3, 7),
        "{counters:?}"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events = runtime.block_on(async {
        let mut stream = k.datapath.take_events().unwrap();
        let mut events = Vec::new();
        while events.len() < 3 {
            let batch = tokio::time::timeout(Duration::from_secs(5), stream.next_batch()).await;
            events.extend(batch.expect("events within 5 s").unwrap());
        }
        events
    });
    assert_eq!(events.len(), 3);
    for event in &events {
        assert_eq!(event.source, ip("192.0.2.9"));
        assert_eq!(event.reason, Some(limiter_common::DropReason::Block));
        assert_eq!(event.port, 587);
        assert!(event.syn);
        let age = SystemTime::now()
            .duration_since(event.at)
            .unwrap_or_default();
        assert!(
            age < Duration::from_secs(60),
            "event time is wall time: {age:?} old"
        );
    }
}

#[test]
fn full_maps_are_refused_with_the_key_to_raise() {
    if !prerequisites("full_maps_are_refused_with_the_key_to_raise") {
        return;
    }
    let sizes = MapSizes {
        block: 4,
        block_net: 2,
        ..MapSizes::default()
    };
    let k = TestKernel::load_with(limits(10), sizes);
    for i in 1..=4 {
        k.datapath
            .block(net(&format!("192.0.2.{i}/32")), None, Reason::Manual)
            .unwrap();
    }
    let err = k
        .datapath
        .block(net("192.0.2.5/32"), None, Reason::Manual)
        .unwrap_err();
    assert!(matches!(err, KernelError::MapFull { .. }), "{err:?}");
    assert!(err.to_string().contains("kernel.map_sizes.block"), "{err}");
    // Replacing an existing entry still works when full.
    k.datapath
        .block(net("192.0.2.4/32"), None, Reason::Harvest)
        .unwrap();
    k.datapath
        .block(net("10.0.0.0/8"), None, Reason::Manual)
        .unwrap();
    k.datapath
        .block(net("11.0.0.0/8"), None, Reason::Manual)
        .unwrap();
    let err = k
        .datapath
        .block(net("12.0.0.0/8"), None, Reason::Manual)
        .unwrap_err();
    assert!(
        err.to_string().contains("kernel.map_sizes.block_net"),
        "{err}"
    );
}

#[test]
fn pinned_maps_survive_a_restart_and_one_agent_holds_a_pin_path() {
    if !prerequisites("pinned_maps_survive_a_restart_and_one_agent_holds_a_pin_path") {
        return;
    }
    let pins = PinDir::new();
    let options = pinned_at(&pins);
    let first = BpfDatapath::load(&options).unwrap();
    first
        .block(net("192.0.2.200/32"), None, Reason::Harvest)
        .unwrap();
    let second = BpfDatapath::load(&options)
        .err()
        .expect("a second agent on the same pins is refused");
    assert!(
        matches!(second, KernelError::AlreadyRunning { .. }),
        "{second:?}"
    );
    assert!(
        second
            .to_string()
            .contains(&pins.path().display().to_string()),
        "{second}"
    );

    // The CLI's view of the pins, without programs.
    let view = BpfDatapath::open_pinned(pins.path()).unwrap();
    assert_eq!(view.blocks().unwrap().len(), 1);
    drop(view);

    // Stop the agent (its programs detach, the pins stay) and start again.
    drop(first);
    let restarted = BpfDatapath::load(&options).expect("restart on existing pins");
    let blocks = restarted.blocks().unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].net, net("192.0.2.200/32"));
    let frame = Frame::syn(ip("192.0.2.200"), 25).build();
    assert_eq!(restarted.test_run_xdp(&frame, 1).unwrap().0, XDP_DROP);
}

/// Pins of the version before the fine prefilters (no `NET_HINTS_FINE`):
/// the agent creates the map and fills it from the tries it finds, so the
/// networks they hold stay dropped across the upgrade.
#[test]
fn pins_without_the_fine_prefilters_are_upgraded_in_place() {
    if !prerequisites("pins_without_the_fine_prefilters_are_upgraded_in_place") {
        return;
    }
    let pins = PinDir::new();
    let options = pinned_at(&pins);
    let first = BpfDatapath::load(&options).unwrap();
    for n in ["198.51.100.0/24", "198.51.0.0/20", "2001:db8:bad:7::/64"] {
        first.block(net(n), None, Reason::Harvest).unwrap();
    }
    drop(first);
    std::fs::remove_file(pins.path().join("NET_HINTS_FINE")).unwrap();
    let upgraded = BpfDatapath::load(&options).expect("upgrade on existing pins");
    for (source, verdict) in [
        ("198.51.100.9", XDP_DROP),
        ("198.51.3.9", XDP_DROP),
        ("198.51.101.9", XDP_PASS),
        ("2001:db8:bad:7::9", XDP_DROP),
        ("2001:db8:bad:8::9", XDP_PASS),
    ] {
        let frame = Frame::syn(ip(source), 25).build();
        assert_eq!(
            upgraded.test_run_xdp(&frame, 1).unwrap().0,
            verdict,
            "{source}"
        );
    }
}

/// What an administrator reads: every map bpftool dumps by field name, with
/// addresses as their bytes and reasons and the mode by name.
#[test]
fn bpftool_prints_addresses_as_bytes_and_reasons_by_name() {
    if !prerequisites("bpftool_prints_addresses_as_bytes_and_reasons_by_name") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    d.block(net("192.0.2.1/32"), None, Reason::Harvest).unwrap();
    d.block(net("2001:db8::66/128"), None, Reason::Auth)
        .unwrap();
    d.block(net("198.51.100.0/24"), None, Reason::RejectList)
        .unwrap();
    d.block(net("2001:db8:bad::/48"), None, Reason::Flood)
        .unwrap();
    d.allow(net("10.0.0.0/8")).unwrap();
    d.set_cap(net("2001:db8:cafe::/48"), 50).unwrap();
    set_connections(&k, ip("203.0.113.7"), 4);
    set_connections(&k, ip("2001:db8:1:2::9"), 2);
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.1"), 25)), XDP_DROP);

    // The JSON form carries the same "formatted" tree the plain form prints.
    let dump = |map: &str| -> Vec<serde_json::Value> {
        let path = k.pin_path().join(map);
        let out = Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&path)
            .output()
            .expect("bpftool is installed (cargo xtask setup)");
        assert!(
            out.status.success(),
            "bpftool map dump pinned {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        entries
            .into_iter()
            .map(|e| {
                e.get("formatted")
                    .cloned()
                    .unwrap_or_else(|| panic!("{map}: no BTF-formatted entry in {e}"))
            })
            .collect()
    };
    let one = |map: &str| {
        let entries = dump(map);
        assert_eq!(entries.len(), 1, "{map}: {entries:?}");
        entries[0].clone()
    };
    let json = |s: &str| -> serde_json::Value { serde_json::from_str(s).unwrap() };

    let block = one("BLOCK_V4");
    assert_eq!(block["key"], json("[192, 0, 2, 1]"), "{block}");
    assert_eq!(block["value"]["reason"], "Harvest", "{block}");
    assert_eq!(block["value"]["drops"], 1, "{block}");
    assert_eq!(block["value"]["expires_mono_ns"], 0, "{block}");
    // Entries count their insertions from 1, in the order blocked.
    assert_eq!(block["value"]["serial"], 1, "{block}");
    let block = one("BLOCK_V6");
    assert_eq!(block["value"]["serial"], 2, "{block}");
    assert_eq!(
        block["key"],
        json("[32, 1, 13, 184, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 102]"),
        "{block}"
    );
    assert_eq!(block["value"]["reason"], "Auth", "{block}");
    let net4 = one("BLOCK_NET_V4");
    assert_eq!(net4["key"]["prefix_len"], 24, "{net4}");
    assert_eq!(net4["key"]["data"], json("[198, 51, 100, 0]"), "{net4}");
    assert_eq!(net4["value"]["reason"], "RejectList", "{net4}");
    assert_eq!(net4["value"]["serial"], 3, "{net4}");
    let net6 = one("BLOCK_NET_V6");
    assert_eq!(net6["key"]["prefix_len"], 48, "{net6}");
    assert_eq!(net6["value"]["reason"], "Flood", "{net6}");
    let allow = one("ALLOW_V4");
    assert_eq!(allow["key"]["data"], json("[10, 0, 0, 0]"), "{allow}");
    let cap = one("CAP_NET_V6");
    assert_eq!(cap["value"]["max_connections"], 50, "{cap}");
    let count = one("CONN_COUNT_V4");
    assert_eq!(count["key"], json("[203, 0, 113, 7]"), "{count}");
    assert_eq!(count["value"]["connections"], 4, "{count}");
    let count = one("CONN_COUNT_V6");
    assert_eq!(
        count["key"],
        json("[32, 1, 13, 184, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]"),
        "the /64: {count}"
    );
    let config = one("CONFIG");
    assert_eq!(config["value"]["mode"], "Enforce", "{config}");
    assert_eq!(config["value"]["max_connections"], 10, "{config}");
    let stats = one("STATS");
    // Per CPU: one value per possible CPU, each a Stats by field name.
    let per_cpu = stats["values"].as_array().expect("per-CPU values");
    let dropped: u64 = per_cpu
        .iter()
        .map(|v| v["value"]["dropped_block"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped, 1, "{stats}");

    // The plain form (what the README shows) has the same names.
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(k.pin_path().join("BLOCK_V4"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("\"key\": [192,0,2,1") && text.contains("\"reason\": \"Harvest\""),
        "{text}"
    );
}

/// Pins of the older layout (one table for both families, IPv4 mapped into
/// IPv6) or of a map whose shape changed are refused, saying what to do.
#[test]
fn pins_of_an_older_layout_are_refused_with_what_to_do() {
    if !prerequisites("pins_of_an_older_layout_are_refused_with_what_to_do") {
        return;
    }
    let create = |pins: &PinDir, name: &str, key: &str, value: &str| {
        std::fs::create_dir_all(pins.path()).unwrap();
        let out = Command::new("bpftool")
            .args(["map", "create"])
            .arg(pins.path().join(name))
            .args([
                "type", "hash", "key", key, "value", value, "entries", "16", "name", name,
            ])
            .output()
            .expect("bpftool is installed (cargo xtask setup)");
        assert!(
            out.status.success(),
            "bpftool map create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let load = |pins: &PinDir| {
        BpfDatapath::load(&pinned_at(pins))
            .err()
            .expect("stale pins are refused")
    };
    // What an agent of the older layout left: BLOCK keyed by 16 bytes.
    let old = PinDir::new();
    create(&old, "BLOCK", "16", "24");
    let err = load(&old);
    assert!(matches!(err, KernelError::StaleMap { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("rm -r {}", old.path().display()))
            && message.contains("BLOCK")
            && message.contains("older layout"),
        "{message}"
    );
    // A map of this layout's name with another shape.
    let changed = PinDir::new();
    create(&changed, "BLOCK_V4", "16", "24");
    let err = load(&changed);
    assert!(matches!(err, KernelError::StaleMap { .. }), "{err:?}");
    assert!(
        err.to_string().contains("16-byte keys") && err.to_string().contains("rm -r"),
        "{err}"
    );
    // The CLI's view refuses them too.
    let err = BpfDatapath::open_pinned(old.path()).err().unwrap();
    assert!(matches!(err, KernelError::StaleMap { .. }), "{err:?}");
}

/// Polls `probe` every 10 ms for up to 5 s until it holds.
fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !probe() {
        assert!(std::time::Instant::now() < deadline, "5 s without {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The sock_ops accounting on real loopback connections, with the count
/// forced to its limits in between: a close that finds 0 (the entry was
/// removed and created again meanwhile) stays at 0, an open that finds
/// `u32::MAX` is not counted, and a close of a socket that was never counted
/// takes nothing away. A plain atomic add wrapped in the first two cases.
#[test]
fn connection_counts_never_wrap() {
    if !prerequisites("connection_counts_never_wrap") {
        return;
    }
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let k = TestKernel::load(KernelLimits {
        ports: vec![port],
        ..limits(10)
    });
    let d = &k.datapath;
    let source = ip("127.0.0.1");
    let connect = |listener: &TcpListener| {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    };

    // Counted on establishment (before accept returns).
    let pair = connect(&listener);
    assert_eq!(d.connections(source).unwrap(), 1);
    // The count is reset under the connection; its close must not wrap it.
    set_connections(&k, source, 0);
    drop(pair);
    eventually("the close counted", || {
        d.counters().unwrap().conn_closed == 1
    });
    assert_eq!(d.connections(source).unwrap(), 0, "a close at 0 stays at 0");

    // At u32::MAX an open is not counted (so its close takes nothing).
    set_connections(&k, source, u32::MAX);
    let pair = connect(&listener);
    let c = d.counters().unwrap();
    assert_eq!((c.conn_opened, c.conn_untracked), (1, 1), "{c:?}");
    assert_eq!(d.connections(source).unwrap(), u32::MAX, "no wrap to 0");
    drop(pair);
    // An unprotected port: never counted, so its close takes nothing either.
    set_connections(&k, source, 5);
    drop(connect(&other));
    // Both closes are done once a counted connection's close is seen after
    // them (closes on loopback finish in order of the FIN exchange; wait
    // for a third, counted one to be sure).
    let pair = connect(&listener);
    assert_eq!(d.connections(source).unwrap(), 6);
    drop(pair);
    eventually("the last close counted", || {
        d.counters().unwrap().conn_closed == 2
    });
    assert_eq!(
        d.connections(source).unwrap(),
        5,
        "uncounted sockets' closes took nothing"
    );
}

/// The sock_ops accounting keys each family in its own map: an IPv6 client
/// under its prefix, and an IPv4 client of a dual-stack (`[::]`) listener,
/// which the socket sees as `::ffff:a.b.c.d`, under its IPv4 address.
#[test]
fn connections_are_counted_per_family_also_on_dual_stack_sockets() {
    if !prerequisites("connections_are_counted_per_family_also_on_dual_stack_sockets") {
        return;
    }
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("[::]:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let k = TestKernel::load(KernelLimits {
        ports: vec![port],
        ..limits(10)
    });
    let d = &k.datapath;
    let v4 = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (v4_server, from) = listener.accept().unwrap();
    assert_eq!(from.ip(), ip("::ffff:127.0.0.1"), "dual-stack listener");
    let v6 = TcpStream::connect(("::1", port)).unwrap();
    let (v6_server, _) = listener.accept().unwrap();
    assert_eq!(d.connections(ip("127.0.0.1")).unwrap(), 1);
    assert_eq!(d.connections(ip("::1")).unwrap(), 1);
    let mut counts = d.connection_counts().unwrap();
    counts.sort();
    assert_eq!(
        counts,
        vec![(net("127.0.0.1/32"), 1), (net("::/64"), 1)],
        "IPv4 by address, IPv6 by its /64"
    );
    drop((v4, v4_server, v6, v6_server));
    eventually("both closes counted", || {
        d.counters().unwrap().conn_closed == 2
    });
    assert_eq!(d.connection_counts().unwrap(), vec![], "idle sources leave");
}

/// The agent's side of observe mode: `mode` in the file reaches the kernel
/// at start (`kernel_limits`) and on every reload, and the would-drop
/// counters reach `stats` (JSON; the text form prints the same tree) and
/// `/metrics`.
#[test]
fn reload_switches_the_kernel_between_observe_and_enforce() {
    if !prerequisites("reload_switches_the_kernel_between_observe_and_enforce") {
        return;
    }
    use limiter_user::{
        agent, commands,
        config::Config,
        control::{Answer, Request},
        proxy::ProxyContext,
    };
    let dir = std::env::temp_dir().join(format!("smtp-limiter-observe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smtp-limiter.toml");
    let write = |mode: &str| {
        std::fs::write(
            &path,
            format!("mode = \"{mode}\"\n[kernel]\nports = [25]\n"),
        )
        .unwrap();
    };
    write("observe");
    let mut config = Config::load(&path).unwrap();
    assert!(agent::kernel_limits(&config).observe);
    let k = TestKernel::load(agent::kernel_limits(&config));
    let datapath: std::sync::Arc<dyn Datapath> = k.datapath.clone();
    let ctx = ProxyContext::new(&config, datapath.clone()).unwrap();
    k.datapath
        .block(net("192.0.2.1/32"), None, Reason::Manual)
        .unwrap();
    let frame = Frame::syn(ip("192.0.2.1"), 25);
    assert_eq!(xdp(&k, &frame), XDP_PASS, "observe at start");

    write("enforce");
    agent::reload(&path, &mut config, &ctx, datapath.as_ref());
    assert_eq!(xdp(&k, &frame), XDP_DROP, "enforce after a reload");
    write("observe");
    agent::reload(&path, &mut config, &ctx, datapath.as_ref());
    assert_eq!(xdp(&k, &frame), XDP_PASS, "observe after another");
    let _ = std::fs::remove_dir_all(&dir);

    let counters = k.datapath.counters().unwrap();
    assert_eq!(
        (counters.would_drop_block, counters.dropped_block),
        (2, 1),
        "{counters:?}"
    );
    let saves = tokio::sync::Notify::new();
    let mut state = agent::AgentState {
        config: &mut config,
        config_path: None,
        ctx: &ctx,
        datapath: datapath.as_ref(),
        store: None,
        saves: &saves,
    };
    let stats = commands::handle(&mut state, Request::Stats);
    let Some(Answer::Stats(data)) = stats.data else {
        panic!("stats answered: {stats:?}");
    };
    let kernel = data.kernel.as_ref().expect("kernel counters");
    for (name, value) in [
        ("would_drop_block", 2),
        ("would_drop_block_net", 0),
        ("would_drop_cap", 0),
        ("dropped_block", 1),
    ] {
        assert_eq!(
            kernel.get(name),
            Some(&value),
            "stats kernel.{name}: {data:?}"
        );
    }
    assert!(data.kernel_status.contains("observe"), "{data:?}");
    let metrics = limiter_user::metrics::render(&ctx, datapath.as_ref());
    for line in [
        "smtp_limiter_kernel_events_total{counter=\"would_drop_block\"} 2\n",
        "smtp_limiter_kernel_events_total{counter=\"would_drop_cap\"} 0\n",
        "smtp_limiter_kernel_events_total{counter=\"dropped_block\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

/// SYNs the Linux stack accepts although the parser cannot read their TCP
/// flags, each measured against a listener in a namespace of this kernel:
/// an IPv4 SYN whose TCP header is split across fragments (8 or 16 bytes in
/// the first, RFC 1858's tiny fragments: reassembly makes a SYN of them),
/// and IPv6 SYNs behind more extension headers than the parser walks, or
/// behind one destination options header longer than it reads into (Linux
/// bounds the options in a header, not the chain nor its length). A source
/// at its cap must not open connections with them; one below its cap
/// still may (the limiter fails open).
#[test]
fn an_over_cap_source_cannot_hide_its_syn_from_the_cap() {
    if !prerequisites("an_over_cap_source_cannot_hide_its_syn_from_the_cap") {
        return;
    }
    let k = TestKernel::load(limits(2));
    let capped = [ip("203.0.113.5"), ip("2001:db8:5::1")];
    let below = [ip("203.0.113.6"), ip("2001:db8:6::1")];
    for source in capped {
        set_connections(&k, source, 2);
    }
    for source in below {
        set_connections(&k, source, 1);
    }
    let hidden = |source: IpAddr| -> Vec<(Frame, &str)> {
        let syn = || Frame::syn(source, 25);
        match source {
            IpAddr::V4(_) => vec![
                (
                    syn().ipv4_fragment(0, true).tcp_bytes(8),
                    "first fragment with 8 bytes of the TCP header",
                ),
                (
                    syn().ipv4_fragment(0, true).tcp_bytes(16),
                    "first fragment with 16 bytes of the TCP header",
                ),
            ],
            IpAddr::V6(_) => {
                let mut nine_dest_opts = syn();
                let mut nine_routing = syn();
                for _ in 0..9 {
                    nine_dest_opts = nine_dest_opts.ext(Ext::LongDestOpts { units: 0 });
                    nine_routing = nine_routing.ext(Ext::Routing);
                }
                vec![
                    (nine_dest_opts, "nine destination options headers"),
                    (nine_routing, "nine routing headers"),
                    (
                        syn().ext(Ext::LongDestOpts { units: 80 }),
                        "a 648-byte destination options header",
                    ),
                ]
            }
        }
    };
    for (sources, at_cap) in [(capped, true), (below, false)] {
        for source in sources {
            for (frame, why) in hidden(source) {
                let (xdp_expected, tc_expected) = if at_cap {
                    (XDP_DROP, TC_ACT_SHOT)
                } else {
                    (XDP_PASS, TC_ACT_OK)
                };
                assert_eq!(xdp(&k, &frame), xdp_expected, "XDP: {why} from {source}");
                assert_eq!(tc(&k, &frame), tc_expected, "TC: {why} from {source}");
            }
        }
    }
    // What cannot open a connection still passes from a capped source: a
    // later fragment (nothing to reassemble once the first was dropped),
    // other protocols, and its established traffic.
    let v4 = capped[0];
    for (frame, why) in [
        (Frame::syn(v4, 25).ipv4_fragment(1, false), "later fragment"),
        (Frame::syn(v4, 25).protocol(17), "UDP"),
        (Frame::syn(v4, 25).flags(ACK), "ACK"),
        (Frame::syn(capped[1], 25).flags(ACK), "IPv6 ACK"),
    ] {
        assert_eq!(xdp(&k, &frame), XDP_PASS, "XDP: {why}");
        assert_eq!(tc(&k, &frame), TC_ACT_OK, "TC: {why}");
    }
    assert_eq!(k.datapath.counters().unwrap().dropped_cap, 2 * (2 + 3));
}

/// The IPv4 header says where the packet ends; what follows in the frame is
/// link-layer padding, which the stack trims before reassembly. A first
/// fragment holding 8 bytes of a SYN's TCP header, padded with the rest of
/// an ACK's, was judged as that ACK, and reassembly with a second fragment
/// (the SYN's remaining 12 bytes) made a SYN of it: measured to reach
/// SYN_RECV on a listener in a namespace of this kernel. The same padding
/// behind a whole packet must not hide its flags either.
#[test]
fn padding_after_the_ip_packet_is_not_read_as_its_tcp_header() {
    if !prerequisites("padding_after_the_ip_packet_is_not_read_as_its_tcp_header") {
        return;
    }
    let k = TestKernel::load(limits(2));
    let capped = ip("203.0.113.5");
    set_connections(&k, capped, 2);
    let first = Frame::syn(capped, 25).ipv4_fragment(0, true).tcp_bytes(8);
    let ack = Frame::syn(capped, 25).flags(ACK);
    let mut padded = first.build();
    padded.extend_from_slice(&ack.build()[ack.tcp_offset() + 8..]);
    let (xdp_action, _) = k.datapath.test_run_xdp(&padded, 1).unwrap();
    let (tc_action, _) = k.datapath.test_run_tc(&padded, 1).unwrap();
    assert_eq!(
        xdp_action, XDP_DROP,
        "XDP: first fragment padded with an ACK"
    );
    assert_eq!(
        tc_action, TC_ACT_SHOT,
        "TC: first fragment padded with an ACK"
    );
    // A whole SYN followed by padding is judged by its own header.
    let mut syn = Frame::syn(capped, 25).build();
    syn.extend_from_slice(&[0x10; 12]);
    assert_eq!(k.datapath.test_run_xdp(&syn, 1).unwrap().0, XDP_DROP);
    // And a whole ACK with padding passes, from the capped source too.
    let mut ack_bytes = ack.build();
    ack_bytes.extend_from_slice(&[0x02; 12]);
    assert_eq!(k.datapath.test_run_xdp(&ack_bytes, 1).unwrap().0, XDP_PASS);
    assert_eq!(k.datapath.test_run_tc(&ack_bytes, 1).unwrap().0, TC_ACT_OK);
}
