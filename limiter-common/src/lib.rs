//! Map keys, values and constants shared by the smtp-limiter kernel programs
//! (`limiter-ebpf`) and the agent (`limiter-user`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, made of fixed-width fields and free
//! of implicit padding: the kernel compares keys byte for byte, and `bpftool`
//! prints these types by field name from the object's BTF.
//!
//! Addresses are kept in one 16-byte form for both families: IPv6 as is, IPv4
//! as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`). One map then serves both
//! families, and an IPv4 CIDR `a.b.c.d/n` is the LPM prefix `96 + n`.
#![no_std]

/// Names of the maps in the kernel object. The kernel keeps 15 bytes of a map
/// name; these are the names the agent pins under `kernel.pin_path`.
pub mod map_names {
    /// [`crate::Config`], one entry: what the programs enforce.
    pub const CONFIG: &str = "CONFIG";
    /// [`crate::Stats`], per CPU, one entry: a counter per decision.
    pub const STATS: &str = "STATS";
    /// LPM trie of [`crate::Allow`]: sources that are never dropped or capped.
    pub const ALLOW: &str = "ALLOW";
    /// Hash of exact addresses to [`crate::Block`].
    pub const BLOCK: &str = "BLOCK";
    /// LPM trie of CIDRs to [`crate::Block`].
    pub const BLOCK_NET: &str = "BLOCK_NET";
    /// LPM trie of CIDRs to [`crate::Cap`]: per-network connection caps.
    pub const CAP_NET: &str = "CAP_NET";
    /// Hash of aggregated sources to [`crate::ConnCount`].
    pub const CONN_COUNT: &str = "CONN_COUNT";
    /// Hash of socket cookies to [`crate::TrackedSocket`]: which connections
    /// were counted, so that each close undoes exactly its own increment.
    pub const CONN_SOCKS: &str = "CONN_SOCKS";
    /// Ring buffer of [`crate::DropEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU [`crate::EventBudget`]: the drop-event rate limiter's state.
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    /// Array of `u64` words: one bitmap of IPv4 /16s per LPM trie (see
    /// [`crate::hint`]), so most IPv4 packets skip the tries entirely.
    pub const NET_HINTS: &str = "NET_HINTS";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 11] = [
        CONFIG,
        STATS,
        ALLOW,
        BLOCK,
        BLOCK_NET,
        CAP_NET,
        CONN_COUNT,
        CONN_SOCKS,
        EVENTS,
        EVENT_BUDGET,
        NET_HINTS,
    ];
}

/// Prefilters for the LPM tries. An LPM lookup costs several times a hash
/// lookup and grows with the trie; most sources match no entry. For each
/// trie, a bitmap of the 65 536 IPv4 /16s has a bit set for every /16 that
/// some entry of the trie may cover; an IPv4 source whose /16 bit is clear
/// cannot match and skips the lookup. IPv6 sources always look up.
///
/// Writers only ever set bits when adding entries; removals recompute the
/// whole bitmap from the trie. A stale set bit costs one lookup; a bit must
/// never be clear while an entry needs it.
pub mod hint {
    /// `u64` words per bitmap.
    pub const WORDS: u32 = 65_536 / 64;
    /// Bitmap of `ALLOW`.
    pub const ALLOW: u32 = 0;
    /// Bitmap of `BLOCK_NET`.
    pub const BLOCK_NET: u32 = 1;
    /// Bitmap of `CAP_NET`.
    pub const CAP_NET: u32 = 2;
    /// Number of bitmaps (entries in `NET_HINTS` = `COUNT * WORDS`).
    pub const COUNT: u32 = 3;

    /// The `NET_HINTS` index and the bit of `slash16` in bitmap `map`.
    #[inline(always)]
    pub const fn position(map: u32, slash16: u16) -> (u32, u64) {
        (map * WORDS + (slash16 as u32 >> 6), 1u64 << (slash16 & 63))
    }
}

/// Names of the programs in the kernel object.
pub mod program_names {
    /// XDP ingress enforcement.
    pub const XDP: &str = "limiter_xdp";
    /// TC ingress classifier: the same decisions where XDP cannot attach.
    pub const TC: &str = "limiter_tc";
    /// `sock_ops` on the cgroup v2 root: exact per-source connection counts.
    pub const SOCK_OPS: &str = "limiter_sock_ops";
}

/// How many protected TCP ports [`Config`] holds.
pub const MAX_PORTS: usize = 16;

/// Prefix length of an IPv4-mapped address's IPv4 part within 128 bits.
pub const IPV4_MAPPED_PREFIX: u32 = 96;

/// A source address: 16 bytes in network order, IPv4 mapped into IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    /// The address as four 32-bit words, each in network byte order exactly
    /// as read from the packet (so the bytes in memory are the wire bytes).
    pub words: [u32; 4],
}

impl Addr {
    /// The IPv4-mapped form of an IPv4 address given as its network-order
    /// word (the four wire bytes as one native `u32`).
    #[inline(always)]
    pub const fn from_ipv4_word(word: u32) -> Self {
        Self {
            words: [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), word],
        }
    }

    /// The address from its 16 wire bytes.
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self {
            words: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    /// The 16 wire bytes.
    pub const fn octets(&self) -> [u8; 16] {
        let [a, b, c, d] = self.words;
        let (a, b, c, d) = (
            a.to_ne_bytes(),
            b.to_ne_bytes(),
            c.to_ne_bytes(),
            d.to_ne_bytes(),
        );
        [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1],
            d[2], d[3],
        ]
    }

    /// Whether this is an IPv4-mapped address.
    #[inline(always)]
    pub const fn is_ipv4_mapped(&self) -> bool {
        self.words[0] == 0
            && self.words[1] == 0
            && self.words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
    }

    /// The address with every bit past `prefix_len` (of 128) cleared.
    #[inline(always)]
    pub const fn masked(&self, prefix_len: u32) -> Self {
        Self {
            words: [
                self.words[0] & mask_word(prefix_len, 0),
                self.words[1] & mask_word(prefix_len, 1),
                self.words[2] & mask_word(prefix_len, 2),
                self.words[3] & mask_word(prefix_len, 3),
            ],
        }
    }

    /// The first two bytes of an IPv4-mapped address (its /16), for
    /// [`hint`]; `None` for IPv6.
    #[inline(always)]
    pub const fn ipv4_slash16(&self) -> Option<u16> {
        if self.is_ipv4_mapped() {
            let b = self.words[3].to_ne_bytes();
            Some(u16::from_be_bytes([b[0], b[1]]))
        } else {
            None
        }
    }

    /// The key under which this source's connections are counted: IPv4
    /// sources per address, IPv6 sources per `ipv6_prefix_len` prefix so that
    /// rotating addresses inside one allocation does not escape the cap.
    #[inline(always)]
    pub const fn source_key(&self, ipv6_prefix_len: u32) -> Self {
        if self.is_ipv4_mapped() {
            *self
        } else {
            self.masked(ipv6_prefix_len)
        }
    }
}

/// The network-order mask of word `index` (0..4) for a 128-bit prefix.
#[inline(always)]
const fn mask_word(prefix_len: u32, index: u32) -> u32 {
    let start = index * 32;
    let host_order = if prefix_len >= start + 32 {
        u32::MAX
    } else if prefix_len <= start {
        0
    } else {
        // 1..=31 bits of this word belong to the prefix.
        u32::MAX << (32 - (prefix_len - start))
    };
    host_order.to_be()
}

/// Why a source is blocked. Stored as `u32` in [`Block::reason`].
pub mod reason {
    /// Added by an operator.
    pub const MANUAL: u32 = 1;
    /// Too many failed recipients: directory harvesting.
    pub const HARVEST: u32 = 2;
    /// Too many failed AUTH attempts.
    pub const AUTH: u32 = 3;
    /// Flood: null-sender or connection floods.
    pub const FLOOD: u32 = 4;
    /// On the configured reject list.
    pub const REJECT_LIST: u32 = 5;
    /// Relay attempts.
    pub const RELAY: u32 = 6;
    /// Rejected by content filters (spam, virus).
    pub const FILTER: u32 = 7;

    /// Every reason, for lookups by name.
    pub const ALL: [u32; 7] = [MANUAL, HARVEST, AUTH, FLOOD, REJECT_LIST, RELAY, FILTER];

    /// The reason named `name` (the inverse of [`name`]).
    pub fn from_name(name: &str) -> Option<u32> {
        ALL.into_iter().find(|reason| self::name(*reason) == name)
    }

    /// A stable lower-case name for logs, metrics and the CLI.
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            MANUAL => "manual",
            HARVEST => "harvest",
            AUTH => "auth",
            FLOOD => "flood",
            REJECT_LIST => "reject-list",
            RELAY => "relay",
            FILTER => "filter",
            _ => "unknown",
        }
    }
}

/// What the kernel programs enforce; one entry in the `CONFIG` array, written
/// by the agent at start and whenever a limit or the mode changes. All zero
/// (the state before the agent writes it) protects no port: the programs pass
/// everything. Every integer is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Concurrent connections a source may hold before its new SYNs are
    /// dropped, unless a `CAP_NET` entry overrides it. 0 = unlimited.
    pub max_connections: u32,
    /// Prefix length (0..=128) by which IPv6 sources are counted.
    pub ipv6_prefix_len: u32,
    /// Drop events each CPU may send per second; the rest are only counted.
    pub events_per_second: u32,
    /// How many entries of `ports` are in use.
    pub port_count: u32,
    /// 1 = observe (`mode = "observe"`): every decision is taken and counted
    /// (`Stats::would_drop_*`, drop events marked observed) but every packet
    /// passes and no block's `drops` counts up; 0 = enforce. Any other value
    /// is read as observe.
    pub observe: u32,
    /// Reserved, zero: keeps `netns_cookie` 8-aligned without implicit padding.
    pub reserved: u32,
    /// Protected TCP destination ports, host byte order.
    pub ports: [u16; MAX_PORTS],
    /// Network namespace whose connections are counted (socket cookie of the
    /// namespace, `SO_NETNS_COOKIE`); 0 counts every namespace.
    pub netns_cookie: u64,
}

impl Config {
    /// Whether the programs only count what they would drop.
    #[inline(always)]
    pub const fn observes(&self) -> bool {
        self.observe != 0
    }

    /// Whether `port` (host byte order) is protected.
    #[inline(always)]
    pub fn protects(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_PORTS {
            if (i as u32) < self.port_count && self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// A block on an address (`BLOCK`) or a network (`BLOCK_NET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Block {
    /// When the block ends, in `CLOCK_MONOTONIC` nanoseconds (the clock of
    /// `bpf_ktime_get_coarse_ns`); 0 = never. Past it the entry no longer drops
    /// and the agent sweeps it.
    pub expires_mono_ns: u64,
    /// Packets dropped by this entry (updated atomically by the kernel).
    pub drops: u64,
    /// Why: one of [`reason`].
    pub reason: u32,
    /// Reserved, zero: keeps the size a multiple of 8 without implicit padding.
    pub reserved: u32,
}

impl Block {
    /// Whether the block still holds at `now_mono_ns`.
    #[inline(always)]
    pub const fn active_at(&self, now_mono_ns: u64) -> bool {
        self.expires_mono_ns == 0 || now_mono_ns < self.expires_mono_ns
    }
}

/// An allow-list entry (`ALLOW`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    /// Reserved for flags, zero today (LPM values cannot be empty).
    pub flags: u32,
}

/// A per-network connection cap (`CAP_NET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    /// Concurrent connections per source inside this network; 0 = unlimited.
    pub max_connections: u32,
}

/// Established connections of one source (`CONN_COUNT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCount {
    /// Connections to protected ports currently established (or closing)
    /// from this source, counted from the kernel's TCP state changes.
    pub connections: u32,
}

/// A connection the kernel counted (`CONN_SOCKS`, keyed by socket cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedSocket {
    /// The `CONN_COUNT` key the connection was counted under, kept so that
    /// the close decrements the same key even if the IPv6 prefix changed.
    pub source_key: Addr,
}

/// Why a packet was dropped (in [`DropEvent::reason`]).
pub mod drop_reason {
    /// The source address is in `BLOCK`.
    pub const BLOCK: u32 = 1;
    /// The source is inside a `BLOCK_NET` network.
    pub const BLOCK_NET: u32 = 2;
    /// A new connection from a source at its connection cap.
    pub const CAP: u32 = 3;

    /// A stable lower-case name.
    pub const fn name(reason: u32) -> &'static str {
        match reason {
            BLOCK => "block",
            BLOCK_NET => "block-net",
            CAP => "cap",
            _ => "unknown",
        }
    }
}

/// One dropped (or, in observe mode, would-be dropped) packet, sent to the agent through `EVENTS` (rate-limited).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// When, in `CLOCK_MONOTONIC` nanoseconds (tick resolution).
    pub mono_ns: u64,
    /// The packet's source address.
    pub source: Addr,
    /// One of [`drop_reason`].
    pub reason: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// 1 when the packet was a SYN without ACK (a new connection).
    pub syn: u8,
    /// 1 when the packet was not dropped, only counted: the programs run in
    /// observe mode ([`Config::observe`]). 0 = dropped.
    pub observed: u8,
}

/// Per-CPU state of the drop-event rate limiter (`EVENT_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Start of the current one-second window, `CLOCK_MONOTONIC` ns.
    pub window_start_ns: u64,
    /// Events sent in that window.
    pub sent: u64,
}

/// Counters of every decision (`STATS`, per CPU; the agent sums the CPUs).
/// Each field has a single writer kind (packet path or socket path), so
/// per-CPU increments need no atomics on the packet path.
///
/// A TCP packet to a protected port is `seen` and then counted in exactly
/// one of `passed`, `allowed`, `dropped_*` or (observe mode) `would_drop_*`.
/// A packet the parser cannot judge (`fragments`, `malformed`, non-TCP in
/// `ignored`) whose source address is readable and blocked is also counted
/// in `dropped_block`/`dropped_block_net` (or `would_drop_*`): those are
/// dropped whatever their port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// TCP packets to a protected port that were inspected.
    pub seen: u64,
    /// Inspected packets that passed (not allow-listed, not dropped).
    pub passed: u64,
    /// Packets passed because the source is allow-listed.
    pub allowed: u64,
    /// Packets dropped because the source address is blocked.
    pub dropped_block: u64,
    /// Packets dropped because the source is in a blocked network.
    pub dropped_block_net: u64,
    /// New connections dropped because the source holds its cap.
    pub dropped_cap: u64,
    /// Observe mode: packets that `dropped_block` would have counted
    /// (passed).
    pub would_drop_block: u64,
    /// Observe mode: packets that `dropped_block_net` would have counted
    /// (passed).
    pub would_drop_block_net: u64,
    /// Observe mode: new connections that `dropped_cap` would have counted
    /// (passed).
    pub would_drop_cap: u64,
    /// Packets from a source whose block had expired (passed).
    pub expired_block: u64,
    /// Packets not for a protected TCP port, or not TCP at all (passed, not
    /// inspected; non-TCP ones from a blocked source are dropped, except
    /// ICMP errors and IPv6 neighbour discovery).
    pub ignored: u64,
    /// Non-first IP fragments: no ports to inspect (the first fragment,
    /// which carries the TCP header, is the one judged). Passed, unless the
    /// source is blocked.
    pub fragments: u64,
    /// Packets whose headers were truncated or invalid. Passed, unless the
    /// source address was readable and is blocked.
    pub malformed: u64,
    /// Drop events written to `EVENTS`.
    pub events_sent: u64,
    /// Drop events over the per-second budget (not sent).
    pub events_suppressed: u64,
    /// Drop events lost because `EVENTS` was full.
    pub events_lost: u64,
    /// Connections counted when established.
    pub conn_opened: u64,
    /// Counted connections that closed.
    pub conn_closed: u64,
    /// Connections not counted because `CONN_SOCKS` or `CONN_COUNT` was full.
    pub conn_untracked: u64,
}

/// Lists the `Stats` fields once for the methods that walk them.
macro_rules! stats_methods {
    ($($field:ident),* $(,)?) => {
        impl Stats {
            /// How many counters there are.
            pub const COUNT: usize = [$(stringify!($field)),*].len();

            /// Each counter with its field name, in declaration order.
            pub const fn fields(&self) -> [(&'static str, u64); Self::COUNT] {
                [$((stringify!($field), self.$field)),*]
            }

            /// Adds `other` field by field (summing per-CPU slots).
            pub fn add(&mut self, other: &Stats) {
                $(self.$field = self.$field.wrapping_add(other.$field);)*
            }
        }
    };
}

stats_methods!(
    seen,
    passed,
    allowed,
    dropped_block,
    dropped_block_net,
    dropped_cap,
    would_drop_block,
    would_drop_block_net,
    would_drop_cap,
    expired_block,
    ignored,
    fragments,
    malformed,
    events_sent,
    events_suppressed,
    events_lost,
    conn_opened,
    conn_closed,
    conn_untracked,
);

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and
    // arrays of integers, with no implicit padding (checked in the tests).
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Block {}
    unsafe impl aya::Pod for Allow {}
    unsafe impl aya::Pod for Cap {}
    unsafe impl aya::Pod for ConnCount {}
    unsafe impl aya::Pod for TrackedSocket {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for Stats {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<Addr>(), 16);
        assert_eq!(size_of::<Config>(), 6 * 4 + 2 * MAX_PORTS + 8);
        assert_eq!(core::mem::offset_of!(Config, netns_cookie) % 8, 0);
        assert_eq!(size_of::<Block>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<Cap>(), 4);
        assert_eq!(size_of::<ConnCount>(), 4);
        assert_eq!(size_of::<TrackedSocket>(), 16);
        assert_eq!(size_of::<DropEvent>(), 8 + 16 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<EventBudget>(), 16);
        // Every counter is listed for `fields` and `add`.
        assert_eq!(size_of::<Stats>(), Stats::COUNT * 8);
    }

    #[test]
    fn stats_add_and_list_every_field() {
        let mut a = Stats {
            seen: 1,
            conn_untracked: 3,
            ..Default::default()
        };
        a.add(&Stats {
            seen: 10,
            dropped_cap: 20,
            conn_untracked: 30,
            ..Default::default()
        });
        let fields = a.fields();
        assert_eq!(fields[0], ("seen", 11));
        assert_eq!(fields[Stats::COUNT - 1], ("conn_untracked", 33));
        assert_eq!(fields.iter().map(|(_, v)| v).sum::<u64>(), 64);
    }

    #[test]
    fn reason_names_round_trip() {
        for code in reason::ALL {
            assert_eq!(reason::from_name(reason::name(code)), Some(code));
        }
        assert_eq!(reason::from_name("unknown"), None);
    }

    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn ipv4_is_mapped_and_kept_whole() {
        let a = Addr::from_ipv4_word(u32::from_ne_bytes([192, 0, 2, 7]));
        assert!(a.is_ipv4_mapped());
        assert_eq!(a.octets()[10..], [0xff, 0xff, 192, 0, 2, 7]);
        assert_eq!(a.source_key(64), a);
        assert_eq!(Addr::from_octets(a.octets()), a);
    }

    #[test]
    fn hint_positions_cover_every_slash16_once() {
        let a = Addr::from_ipv4_word(u32::from_ne_bytes([192, 0, 2, 7]));
        assert_eq!(a.ipv4_slash16(), Some(0xc000));
        assert_eq!(
            hint::position(hint::BLOCK_NET, 0xc000),
            (hint::WORDS + 0xc000 / 64, 1)
        );
        assert_eq!(hint::position(hint::ALLOW, 65), (1, 2));
        assert_eq!(
            hint::position(hint::CAP_NET, u16::MAX),
            (3 * hint::WORDS - 1, 1 << 63)
        );
        assert_eq!(
            Addr::from_octets([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
                .ipv4_slash16(),
            None
        );
    }

    #[test]
    fn ipv6_sources_aggregate_by_prefix() {
        let mut o = [0u8; 16];
        o[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0xff, 2]);
        o[8..].copy_from_slice(&[0xaa; 8]);
        let a = Addr::from_octets(o);
        assert!(!a.is_ipv4_mapped());
        let k = a.source_key(64).octets();
        assert_eq!(k[..8], o[..8]);
        assert_eq!(k[8..], [0; 8]);
        // A prefix that ends inside a word.
        let k = a.masked(52).octets();
        assert_eq!(k[..7], [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0xf0]);
        assert_eq!(k[7..], [0; 9]);
        assert_eq!(a.masked(128), a);
        assert_eq!(a.masked(0), Addr::default());
    }

    #[test]
    fn config_zero_enforces_and_any_nonzero_observes() {
        let mut c = Config::default();
        assert!(!c.observes());
        c.observe = 1;
        assert!(c.observes());
        c.observe = 7;
        assert!(c.observes(), "a value from a newer agent still observes");
    }

    #[test]
    fn would_drop_counters_follow_the_drop_counters() {
        let names: [&str; Stats::COUNT] = Stats::default().fields().map(|(name, _)| name);
        let at = |name| names.iter().position(|n| *n == name).unwrap();
        assert_eq!(at("would_drop_block"), at("dropped_cap") + 1);
        assert_eq!(at("would_drop_block_net"), at("dropped_cap") + 2);
        assert_eq!(at("would_drop_cap"), at("dropped_cap") + 3);
    }

    #[test]
    fn config_protects_only_listed_ports() {
        let mut c = Config {
            port_count: 2,
            ..Default::default()
        };
        c.ports[0] = 25;
        c.ports[1] = 587;
        c.ports[2] = 465; // beyond port_count: not in use
        assert!(c.protects(25) && c.protects(587));
        assert!(!c.protects(465) && !c.protects(0) && !c.protects(80));
    }
}
