//! Packet-level tests of the XDP and TC programs in the real kernel, through
//! `BPF_PROG_TEST_RUN`: hand-built frames in, verdicts and map contents out.

use std::{
    net::IpAddr,
    process::Command,
    time::{Duration, SystemTime},
};

use aya::maps::{HashMap, Map, MapData};
use ipnet::IpNet;
use limiter_common::{reason, Addr, ConnCount};
use limiter_tests::{
    kernel::{ebpf_object, PinDir, TestKernel},
    packets::{Ext, Frame, ACK, SYN_ACK},
    prerequisites,
};
use limiter_user::kernel::{
    addr_of, BpfDatapath, Datapath, KernelError, KernelLimits, KernelOptions, MapSizes,
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

/// Sets the kernel's connection count for `source` directly in the pinned
/// map, as the sock_ops program would after `count` handshakes.
fn set_connections(k: &TestKernel, source: IpAddr, ipv6_prefix: u32, count: u32) {
    let data = MapData::from_pin(k.pin_path().join("CONN_COUNT")).unwrap();
    let mut map: HashMap<MapData, Addr, ConnCount> = HashMap::try_from(Map::HashMap(data)).unwrap();
    map.insert(
        addr_of(source).source_key(ipv6_prefix),
        ConnCount { connections: count },
        0,
    )
    .unwrap();
}

#[test]
fn blocklist_drops_only_blocked_sources_on_protected_ports() {
    if !prerequisites("blocklist_drops_only_blocked_sources_on_protected_ports") {
        return;
    }
    let k = TestKernel::load(limits(10));
    let d = &k.datapath;
    d.block(net("192.0.2.1/32"), None, reason::MANUAL).unwrap();
    d.block(net("2001:db8::66/128"), None, reason::HARVEST)
        .unwrap();
    d.block(net("198.51.100.0/24"), None, reason::REJECT_LIST)
        .unwrap();
    d.block(net("2001:db8:bad::/48"), None, reason::REJECT_LIST)
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
            XDP_PASS,
            "UDP",
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
    assert_eq!(counters.dropped_block, 2 * 3, "{counters:?}");
    assert_eq!(counters.dropped_block_net, 2 * 2, "{counters:?}");
    assert_eq!(counters.ignored, 2 * 2, "{counters:?}");
    let blocks = d.blocks().unwrap();
    let host = blocks
        .iter()
        .find(|b| b.net == net("192.0.2.1/32"))
        .unwrap();
    assert_eq!(host.drops, 2 * 2, "per-entry drop counter");
    assert_eq!(host.reason, reason::MANUAL);
    assert_eq!(host.expires, None);
}

#[test]
fn an_ipv4_mapped_ipv6_source_is_its_ipv4_address() {
    // The kernel keys IPv4 sources as ::ffff:a.b.c.d; a real IPv6 packet from
    // that address is a different source on the wire only in theory (such
    // packets are invalid on the Internet), so the limiter treating them
    // alike is acceptable. This test pins down what happens.
    if !prerequisites("an_ipv4_mapped_ipv6_source_is_its_ipv4_address") {
        return;
    }
    let k = TestKernel::load(limits(10));
    k.datapath
        .block(net("192.0.2.1/32"), None, reason::MANUAL)
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
        .block(net("192.0.2.1/32"), None, reason::MANUAL)
        .unwrap();
    k.datapath
        .block(net("2001:db8::66/128"), None, reason::MANUAL)
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
            "three tags: beyond the parser, passed",
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
            XDP_PASS,
            "later IPv4 fragment: no ports",
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
            XDP_PASS,
            "later IPv6 fragment",
        ),
        (
            v6().ext(Ext::DestOpts).protocol(17),
            XDP_PASS,
            "UDP after an extension header",
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
fn truncated_and_malformed_packets_pass_without_error() {
    if !prerequisites("truncated_and_malformed_packets_pass_without_error") {
        return;
    }
    let k = TestKernel::load(limits(1));
    k.datapath
        .block(net("192.0.2.1/32"), None, reason::MANUAL)
        .unwrap();
    k.datapath
        .block(net("2001:db8::66/128"), None, reason::MANUAL)
        .unwrap();
    let frames = [
        Frame::syn(ip("192.0.2.1"), 25).vlan(0x8100).ipv4_options(3),
        Frame::syn(ip("2001:db8::66"), 25)
            .ext(Ext::HopByHop)
            .ext(Ext::Ah),
    ];
    // XDP test runs need at least an Ethernet header; TC ones too.
    for frame in &frames {
        let bytes = frame.build();
        for len in 14..bytes.len() {
            let (action, _) = k.datapath.test_run_xdp(&bytes[..len], 1).unwrap();
            assert_eq!(action, XDP_PASS, "XDP, {len} of {} bytes", bytes.len());
            // The kernel refuses skb test runs whose IP header is cut short
            // (EINVAL) before the program runs; where it runs, it must pass.
            if let Ok((action, _)) = k.datapath.test_run_tc(&bytes[..len], 1) {
                assert_eq!(action, TC_ACT_OK, "TC, {len} of {} bytes", bytes.len());
            }
        }
        assert_eq!(xdp(&k, frame), XDP_DROP, "the whole frame is dropped");
    }
    // IHL below 5 is invalid: passed and counted as malformed.
    let mut bad_ihl = Frame::syn(ip("192.0.2.1"), 25).build();
    bad_ihl[14] = 0x44;
    assert_eq!(k.datapath.test_run_xdp(&bad_ihl, 1).unwrap().0, XDP_PASS);
    // Nine extension headers: more than the parser follows.
    let mut long_chain = Frame::syn(ip("2001:db8::66"), 25);
    for _ in 0..9 {
        long_chain = long_chain.ext(Ext::DestOpts);
    }
    assert_eq!(xdp(&k, &long_chain), XDP_PASS);
    assert!(k.datapath.counters().unwrap().malformed > 0);
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
    d.block(net("192.0.2.1/32"), Some(past), reason::HARVEST)
        .unwrap();
    d.block(net("192.0.2.2/32"), Some(future), reason::HARVEST)
        .unwrap();
    d.block(net("198.51.100.0/24"), Some(past), reason::FLOOD)
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
    assert_eq!(hit.reason, reason::HARVEST);
    d.block(net("203.0.113.0/24"), None, reason::FLOOD).unwrap();
    assert_eq!(
        d.block_covering(ip("203.0.113.9"))
            .unwrap()
            .map(|h| h.reason),
        Some(reason::FLOOD)
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
    d.block(net("10.0.0.0/8"), None, reason::REJECT_LIST)
        .unwrap();
    d.block(net("10.1.0.0/16"), None, reason::MANUAL).unwrap();
    d.block(net("2001:db8::/32"), None, reason::MANUAL).unwrap();
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
    assert_eq!(
        xdp(&k, &Frame::syn(ip("2001:db8::5"), 25)),
        XDP_DROP,
        "IPv6 always looks up"
    );
    // An IPv6 network covering the IPv4-mapped space covers IPv4 sources.
    d.block(net("::/0"), None, reason::MANUAL).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_DROP);
    assert!(d.unblock(net("::/0")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_PASS);
    // Allow-list and caps use prefilters of their own.
    d.block(net("192.0.2.44/32"), None, reason::MANUAL).unwrap();
    d.allow(net("192.0.2.0/24")).unwrap();
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_PASS);
    assert!(d.disallow(net("192.0.2.0/24")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("192.0.2.44"), 25)), XDP_DROP);
}

#[test]
fn allowlist_wins_over_blocks_and_caps() {
    if !prerequisites("allowlist_wins_over_blocks_and_caps") {
        return;
    }
    let k = TestKernel::load(limits(1));
    let d = &k.datapath;
    d.block(net("10.1.0.0/16"), None, reason::REJECT_LIST)
        .unwrap();
    d.block(net("10.1.2.3/32"), None, reason::MANUAL).unwrap();
    d.allow(net("10.1.2.0/24")).unwrap();
    set_connections(&k, ip("10.1.2.3"), 64, 50);
    assert_eq!(xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)), XDP_PASS);
    assert_eq!(
        xdp(&k, &Frame::syn(ip("10.1.3.3"), 25)),
        XDP_DROP,
        "outside the allowed /24"
    );
    assert_eq!(d.allows().unwrap(), vec![net("10.1.2.0/24")]);
    assert!(d.disallow(net("10.1.2.0/24")).unwrap());
    assert_eq!(xdp(&k, &Frame::syn(ip("10.1.2.3"), 25)), XDP_DROP);
    assert_eq!(d.counters().unwrap().allowed, 1);
}

#[test]
fn connection_cap_drops_only_new_connections() {
    if !prerequisites("connection_cap_drops_only_new_connections") {
        return;
    }
    let k = TestKernel::load(limits(3));
    let d = &k.datapath;
    let source = ip("203.0.113.5");
    set_connections(&k, source, 64, 2);
    assert_eq!(xdp(&k, &Frame::syn(source, 25)), XDP_PASS, "2 of 3");
    set_connections(&k, source, 64, 3);
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
    set_connections(&k, source, 64, 1000);
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
    set_connections(&k, ip("2001:db8:1:2::1"), 64, 2);
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
        .block(net("192.0.2.9/32"), None, reason::AUTH)
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
        assert_eq!(event.reason, limiter_common::drop_reason::BLOCK);
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
            .block(net(&format!("192.0.2.{i}/32")), None, reason::MANUAL)
            .unwrap();
    }
    let err = k
        .datapath
        .block(net("192.0.2.5/32"), None, reason::MANUAL)
        .unwrap_err();
    assert!(matches!(err, KernelError::MapFull { .. }), "{err:?}");
    assert!(err.to_string().contains("kernel.map_sizes.block"), "{err}");
    // Replacing an existing entry still works when full.
    k.datapath
        .block(net("192.0.2.4/32"), None, reason::HARVEST)
        .unwrap();
    k.datapath
        .block(net("10.0.0.0/8"), None, reason::MANUAL)
        .unwrap();
    k.datapath
        .block(net("11.0.0.0/8"), None, reason::MANUAL)
        .unwrap();
    let err = k
        .datapath
        .block(net("12.0.0.0/8"), None, reason::MANUAL)
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
    let options = KernelOptions {
        object: ebpf_object(),
        pin_path: pins.path().to_owned(),
        map_sizes: MapSizes::default(),
        limits: limits(10),
    };
    let first = BpfDatapath::load(&options).unwrap();
    first
        .block(net("192.0.2.200/32"), None, reason::HARVEST)
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

#[test]
fn bpftool_prints_the_pinned_maps_by_field_name() {
    if !prerequisites("bpftool_prints_the_pinned_maps_by_field_name") {
        return;
    }
    let k = TestKernel::load(limits(10));
    k.datapath
        .block(net("192.0.2.1/32"), None, reason::HARVEST)
        .unwrap();
    k.datapath
        .block(net("198.51.100.0/24"), None, reason::REJECT_LIST)
        .unwrap();
    let dump = |map: &str| {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(k.pin_path().join(map))
            .output()
            .expect("bpftool is installed (cargo xtask setup)");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let block = dump("BLOCK");
    assert!(
        block.contains("\"expires_mono_ns\"") && block.contains("\"reason\": 2"),
        "{block}"
    );
    let block_net = dump("BLOCK_NET");
    assert!(block_net.contains("\"prefix_len\": 120"), "{block_net}");
    let config = dump("CONFIG");
    assert!(
        config.contains("\"max_connections\": 10") && config.contains("\"ports\""),
        "{config}"
    );
    let stats = dump("STATS");
    assert!(stats.contains("\"dropped_cap\""), "{stats}");
}
