//! Map keys, values and constants shared by the smtp-limiter kernel programs
//! (`limiter-ebpf`) and the agent (`limiter-user`).
//!
//! Everything here is `#[repr(C)]`, `Copy`, made of fixed-width fields and free
//! of implicit padding: the kernel compares keys byte for byte, and `bpftool`
//! prints these types by field name from the object's BTF.
//!
//! Each address family has its own maps: IPv4 sources are keyed by their four
//! bytes (`[192,0,2,1]` in `bpftool map dump`), IPv6 sources by their sixteen,
//! and IPv4 networks are LPM prefixes of at most 32 bits. A 4-byte key hashes
//! and compares faster than a 16-byte one, and each family's packet path
//! touches only its own tables. An IPv4-mapped IPv6 source (`::ffff:a.b.c.d`)
//! is judged as the IPv4 address it carries.
//!
//! Reasons, drop reasons and the mode are enums in the kernel object, so that
//! `bpftool` prints them by name (`"reason": "Harvest"`); see [`ReasonCode`].
#![no_std]

/// Names of the maps in the kernel object. The kernel keeps 15 bytes of a map
/// name; these are the names the agent pins under `kernel.pin_path`.
pub mod map_names {
    /// [`crate::Config`], one entry: what the programs enforce.
    pub const CONFIG: &str = "CONFIG";
    /// [`crate::Stats`], per CPU, one entry: a counter per decision.
    pub const STATS: &str = "STATS";
    /// LPM trie of IPv4 networks to [`crate::Allow`]: sources that are never
    /// dropped or capped.
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// As [`ALLOW_V4`], IPv6.
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// Hash of IPv4 addresses to [`crate::Block`].
    pub const BLOCK_V4: &str = "BLOCK_V4";
    /// Hash of IPv6 addresses to [`crate::Block`].
    pub const BLOCK_V6: &str = "BLOCK_V6";
    /// LPM trie of IPv4 networks to [`crate::Block`].
    pub const BLOCK_NET_V4: &str = "BLOCK_NET_V4";
    /// As [`BLOCK_NET_V4`], IPv6.
    pub const BLOCK_NET_V6: &str = "BLOCK_NET_V6";
    /// LPM trie of IPv4 networks to [`crate::Cap`]: per-network caps.
    pub const CAP_NET_V4: &str = "CAP_NET_V4";
    /// As [`CAP_NET_V4`], IPv6.
    pub const CAP_NET_V6: &str = "CAP_NET_V6";
    /// Hash of IPv4 sources to [`crate::ConnCount`].
    pub const CONN_COUNT_V4: &str = "CONN_COUNT_V4";
    /// Hash of IPv6 sources (masked to `Config::ipv6_prefix_len`) to
    /// [`crate::ConnCount`].
    pub const CONN_COUNT_V6: &str = "CONN_COUNT_V6";
    /// Hash of socket cookies to [`crate::TrackedSocket`]: which connections
    /// were counted, so that each close undoes exactly its own increment.
    pub const CONN_SOCKS: &str = "CONN_SOCKS";
    /// Ring buffer of [`crate::DropEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// Per-CPU [`crate::EventBudget`]: the drop-event rate limiter's state.
    pub const EVENT_BUDGET: &str = "EVENT_BUDGET";
    /// Array of `u64` words: one bitmap per LPM trie (see [`crate::hint`]),
    /// so that most sources skip the tries entirely.
    pub const NET_HINTS: &str = "NET_HINTS";
    /// Array of `u64` words: the second-level bitmaps behind each of
    /// [`NET_HINTS`]' (see [`crate::hint`]).
    pub const NET_HINTS_FINE: &str = "NET_HINTS_FINE";
    /// Array of `u64` words, memory-mappable: the prefilter of `BLOCK_V4`
    /// and `BLOCK_V6` (see [`crate::host_hint`]), so that most sources skip
    /// the hash lookup.
    pub const BLOCK_HINTS: &str = "BLOCK_HINTS";

    /// Per-CPU [`crate::HotBlockV4`]: each CPU's copies of the `BLOCK_V4`
    /// entries it drops most (see [`crate::hot`]). The program's own, not
    /// pinned.
    pub const HOT_BLOCKS_V4: &str = "HOT_BLOCKS_V4";
    /// As [`HOT_BLOCKS_V4`], of `BLOCK_V6` ([`crate::HotBlockV6`]).
    pub const HOT_BLOCKS_V6: &str = "HOT_BLOCKS_V6";
    /// As [`HOT_BLOCKS_V4`], of `BLOCK_NET_V4`: a copy per source found in
    /// a blocked network, holding that network's entry.
    pub const HOT_NETS_V4: &str = "HOT_NETS_V4";
    /// As [`HOT_NETS_V4`], of `BLOCK_NET_V6`.
    pub const HOT_NETS_V6: &str = "HOT_NETS_V6";

    /// Array of `u64`, memory-mappable: the generations of what the
    /// programs' per-CPU caches copy ([`crate::generation`]). The program's
    /// own, not pinned.
    pub const GENERATIONS: &str = "GENERATIONS";
    /// Per-CPU: each CPU's IPv4 sources found at their connection cap
    /// (see [`crate::generation::CONNECTIONS`]). The program's own.
    pub const HOT_CAPS_V4: &str = "HOT_CAPS_V4";
    /// As [`HOT_CAPS_V4`], IPv6 prefixes.
    pub const HOT_CAPS_V6: &str = "HOT_CAPS_V6";

    /// Every map the agent pins, in a stable order.
    pub const ALL: [&str; 18] = [
        CONFIG,
        STATS,
        ALLOW_V4,
        ALLOW_V6,
        BLOCK_V4,
        BLOCK_V6,
        BLOCK_NET_V4,
        BLOCK_NET_V6,
        CAP_NET_V4,
        CAP_NET_V6,
        CONN_COUNT_V4,
        CONN_COUNT_V6,
        CONN_SOCKS,
        EVENTS,
        EVENT_BUDGET,
        NET_HINTS,
        NET_HINTS_FINE,
        BLOCK_HINTS,
    ];

    /// Maps of the older layout (one table for both families, IPv4 mapped
    /// into IPv6, keys as 32-bit words): a pin under one of these names was
    /// left by an older agent.
    pub const RETIRED: [&str; 5] = ["ALLOW", "BLOCK", "BLOCK_NET", "CAP_NET", "CONN_COUNT"];
}

/// Prefilters for the LPM tries. An LPM lookup costs several times a hash
/// lookup and grows with the trie; most sources match no entry. For each
/// trie, a bitmap of the 65 536 values of an address's first 16 bits (an
/// IPv4 /16, an IPv6 /16) has a bit set for every value that some entry of
/// the trie may cover; a source whose bit is clear cannot match and skips
/// the lookup.
///
/// A /16 holds many networks, and blocks of one network each (an IPv6
/// source's /64, a harvesting /24 or /48) would set the bit of their /16
/// for every neighbour. So behind each bitmap of [`map_names::NET_HINTS`]
/// (*any*: some entry may cover this /16) are two of
/// [`map_names::NET_HINTS_FINE`], read only when the first bit is set:
/// *short* (an entry shorter than the fine prefix, /24 for IPv4 and /48 for
/// IPv6, covers this /16) and *fine* (an entry of the fine prefix or longer
/// lies in the fine-prefix network whose [`hint::fine_index`] this is). A
/// source may match only if *any* and then *short* or *fine* is set.
///
/// Writers set bits before adding an entry; a removal clears the bits no
/// other entry needs (the agent counts the entries behind each bit), and the
/// agent recomputes the bitmaps from the tries at start and at each sweep.
/// A stale set bit costs one lookup; a bit must never be clear while an
/// entry needs it.
pub mod hint {
    /// `u64` words per bitmap.
    pub const WORDS: u32 = 65_536 / 64;
    /// Bitmap of `ALLOW_V4`.
    pub const ALLOW_V4: u32 = 0;
    /// Bitmap of `BLOCK_NET_V4`.
    pub const BLOCK_NET_V4: u32 = 1;
    /// Bitmap of `CAP_NET_V4`.
    pub const CAP_NET_V4: u32 = 2;
    /// Bitmap of `ALLOW_V6`.
    pub const ALLOW_V6: u32 = 3;
    /// Bitmap of `BLOCK_NET_V6`.
    pub const BLOCK_NET_V6: u32 = 4;
    /// Bitmap of `CAP_NET_V6`.
    pub const CAP_NET_V6: u32 = 5;
    /// Number of bitmaps (entries in `NET_HINTS` = `COUNT * WORDS`).
    pub const COUNT: u32 = 6;
    /// Number of bitmaps in `NET_HINTS_FINE`: a *short* and a *fine* one
    /// behind each of `NET_HINTS`'.
    pub const FINE_COUNT: u32 = 2 * COUNT;
    /// The fine prefix of IPv4 networks: a /24.
    pub const FINE_PREFIX_V4: u8 = 24;
    /// The fine prefix of IPv6 networks: a /48.
    pub const FINE_PREFIX_V6: u8 = 48;

    /// The `NET_HINTS_FINE` bitmap of the entries of `map` shorter than the
    /// fine prefix, by the /16s they cover.
    #[inline(always)]
    pub const fn short(map: u32) -> u32 {
        map
    }

    /// The `NET_HINTS_FINE` bitmap of the entries of `map` of the fine
    /// prefix or longer, by [`fine_index`].
    #[inline(always)]
    pub const fn fine(map: u32) -> u32 {
        COUNT + map
    }

    /// The bit of a fine-prefix network (its first 24 or 48 bits as an
    /// integer) in a *fine* bitmap: a multiplicative hash, so that the
    /// networks of one /16 spread over the whole bitmap.
    #[inline(always)]
    pub const fn fine_index(network: u64) -> u16 {
        (network.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u16
    }

    /// The `NET_HINTS` index and the bit of `top16` (an address's first two
    /// bytes, big-endian) in bitmap `map`.
    #[inline(always)]
    pub const fn position(map: u32, top16: u16) -> (u32, u64) {
        (map * WORDS + (top16 as u32 >> 6), 1u64 << (top16 & 63))
    }
}

/// The prefilter of the host block tables. A hash lookup is a call into
/// the kernel (several, with their returns, which cost most on hosts with
/// return-stack mitigations), and most sources are not blocked. One bitmap
/// per family in [`map_names::BLOCK_HINTS`] has a bit set for every
/// blocked address's hash ([`host_hint::v4`], [`host_hint::v6`]); a source
/// whose bit is clear is in no table and skips the lookup. A set bit says
/// only "maybe": the table decides.
///
/// The agent sets an address's bit before the address goes into its table,
/// leaves it when the address leaves (a stale bit costs one lookup), and
/// recomputes the bitmaps from the tables at start and at each sweep. A bit
/// must never be clear while its table holds an address that needs it.
pub mod host_hint {
    /// log2 of the bits per family: 16 Mi bits (2 MiB). With the default
    /// `kernel.map_sizes.block` (262 144 addresses) full, 1.6 % of the
    /// sources that are not blocked still look their table up; with a
    /// million blocked addresses, 5.8 %.
    pub const BITS_LOG2: u32 = 24;
    /// `u64` words per family.
    pub const WORDS: u32 = 1 << (BITS_LOG2 - 6);

    /// Entries of `BLOCK_HINTS`: IPv4's bitmap, then IPv6's.
    pub const ENTRIES: u32 = 2 * WORDS;
    /// The bitmaps of the two families.
    pub const FAMILY_V4: u32 = 0;
    pub const FAMILY_V6: u32 = 1;

    /// Fibonacci hashing: the product's top bits depend on every input bit.
    const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
    const MIX_LOW: u64 = 0xc2b2_ae3d_27d4_eb4f;

    /// The hash (< 2^BITS_LOG2) of an IPv4 address, given as its four bytes
    /// read as one native-endian word (how the program holds it).
    #[inline(always)]
    pub const fn hash_v4(addr: u32) -> u64 {
        (addr as u64).wrapping_mul(MIX) >> (64 - BITS_LOG2)
    }

    /// The hash of an IPv6 address, given as its sixteen bytes read as four
    /// native-endian words.
    #[inline(always)]
    pub const fn hash_v6(addr: [u32; 4]) -> u64 {
        let high = (addr[0] as u64) | ((addr[1] as u64) << 32);
        let low = (addr[2] as u64) | ((addr[3] as u64) << 32);
        (high ^ low.wrapping_mul(MIX_LOW)).wrapping_mul(MIX) >> (64 - BITS_LOG2)
    }

    /// Word index and bit of `hash` in the bitmap of `family`.
    #[inline(always)]
    pub const fn bit(family: u32, hash: u64) -> (u32, u64) {
        (family * WORDS + (hash >> 6) as u32, 1u64 << (hash & 63))
    }

    /// The bit of an IPv4 address word.
    #[inline(always)]
    pub const fn v4(addr: u32) -> (u32, u64) {
        bit(FAMILY_V4, hash_v4(addr))
    }

    /// The bit of an IPv6 address's words.
    #[inline(always)]
    pub const fn v6(addr: [u32; 4]) -> (u32, u64) {
        bit(FAMILY_V6, hash_v6(addr))
    }

    /// The four words of an IPv6 address's bytes, as the program holds them.
    #[inline(always)]
    pub const fn words_v6(o: crate::Ipv6Octets) -> [u32; 4] {
        [
            u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
            u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
            u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
            u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
        ]
    }

    /// [`v4`] of an address's bytes.
    #[inline(always)]
    pub const fn of_v4(octets: crate::Ipv4Octets) -> (u32, u64) {
        v4(u32::from_ne_bytes(octets))
    }

    /// [`v6`] of an address's bytes.
    #[inline(always)]
    pub const fn of_v6(octets: crate::Ipv6Octets) -> (u32, u64) {
        v6(words_v6(octets))
    }
}

/// The generations of what the programs' per-CPU caches copy
/// ([`map_names::GENERATIONS`], memory-mapped by the agent). Whoever
/// changes the copied state in a way that can end what a copy says
/// increments its generation after the change; a copy holds only under the
/// generation it was made under (read before the state it copies). 0 (a
/// map the agent has not set up) turns the caches off.
///
/// "Before" relies on the CPU not moving a load ahead of an earlier one
/// (x86 does not; BPF has no acquire load on the kernels this supports).
/// On a weakly ordered CPU a copy made while its entry was being removed
/// could outlive the removal until the next change of its generation.
pub mod generation {
    /// The block tables: the agent increments it after a removal, a sweep
    /// that removed entries, a new expiry of a host entry, or any write to
    /// a network trie (a copy holds the most specific network it found)
    /// ([`crate::hot`]).
    pub const BLOCKS: u32 = 0;
    /// Whether a source is at its connection cap: the sock_ops program
    /// increments it after every close it counts, the agent after a change
    /// of the caps, of the limits or of a count.
    pub const CONNECTIONS: u32 = 1;
    /// Entries of `GENERATIONS`.
    pub const COUNT: u32 = 2;
}

/// Each CPU's cache of the blocked sources it drops most (`HOT_BLOCKS_V4`,
/// `HOT_BLOCKS_V6` for the host tables, `HOT_NETS_V4`, `HOT_NETS_V6` for
/// sources inside blocked networks; per-CPU arrays of the program, not
/// pinned). A flood from a blocked source is most of what the kernel
/// drops, and the lookup (a hash, or a trie that grows with its networks)
/// is most of what a drop costs; once an entry has dropped
/// [`hot::AFTER_DROPS`] packets, the CPU that looks it up for a source
/// keeps a copy in the slot of the source's hash, and drops that source's
/// next packets from the copy. A copy holds while the block tables'
/// generation ([`generation::BLOCKS`]) is the one it was made under. Its
/// drops are counted in the copy and added to the entry (if it is still
/// the same insertion, [`Block::serial`]) every [`hot::FLUSH_EVERY`] drops
/// and when the slot is taken by another source; the agent adds the
/// copies' counts when it reads the entries, and flushes them when it
/// stops.
pub mod hot {
    /// Slots per CPU and family (direct-mapped by the prefilter hash).
    pub const SLOTS: u32 = 1024;
    /// Drops an entry must have counted before a CPU caches it: a source
    /// that sends a few packets is looked up each time; a flood is cached.
    pub const AFTER_DROPS: u64 = 64;
    /// A copy gives its drops to its entry each time it has counted this
    /// many, so that the entry (what `bpftool` shows) lags by less than
    /// this per CPU; the agent's own reads add the copies' counts.
    pub const FLUSH_EVERY: u64 = 256;

    /// The slot of an address by its prefilter hash
    /// ([`super::host_hint::hash_v4`], [`super::host_hint::hash_v6`]).
    #[inline(always)]
    pub const fn slot(hash: u64) -> u32 {
        (hash & (SLOTS as u64 - 1)) as u32
    }
}

/// A CPU's cached copy of a `BLOCK_V4` entry ([`hot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotBlockV4 {
    /// The address's four bytes as one native-endian word; with
    /// `generation` 0 the slot is empty.
    pub addr: u32,
    /// The entry's [`Block::serial`].
    pub serial: u32,
    /// The host tables' generation the copy was made under.
    pub generation: u64,
    /// The entry's expiry when copied.
    pub expires_mono_ns: u64,
    /// Drops counted here and not yet added to the entry.
    pub drops: u64,
}

/// A CPU's cached copy of a `BLOCK_V6` entry ([`hot`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotBlockV6 {
    /// The address's sixteen bytes as four native-endian words.
    pub addr: [u32; 4],
    /// The entry's [`Block::serial`].
    pub serial: u32,
    /// Reserved, zero.
    pub reserved: u32,
    pub generation: u64,
    pub expires_mono_ns: u64,
    pub drops: u64,
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

/// An IPv4 address as the maps key it: its four bytes in network order.
pub type Ipv4Octets = [u8; 4];

/// An IPv6 address as the maps key it: its sixteen bytes in network order.
pub type Ipv6Octets = [u8; 16];

/// The IPv4-mapped IPv6 form (`::ffff:a.b.c.d`) of an IPv4 address, where
/// one field holds either family ([`TrackedSocket`], [`DropEvent`]).
#[inline(always)]
pub const fn ipv4_mapped(v4: Ipv4Octets) -> Ipv6Octets {
    let [a, b, c, d] = v4;
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d]
}

/// The IPv4 address inside an IPv4-mapped IPv6 address, if it is one.
#[inline(always)]
pub const fn ipv4_unmapped(v6: &Ipv6Octets) -> Option<Ipv4Octets> {
    let words = octets_to_words(v6);
    if is_ipv4_mapped(&words) {
        Some(words[3].to_ne_bytes())
    } else {
        None
    }
}

/// An IPv6 address as four 32-bit words in memory order (how the kernel
/// programs read it from packets and sockets), as bytes.
#[inline(always)]
pub const fn words_to_octets(words: [u32; 4]) -> Ipv6Octets {
    let [a, b, c, d] = words;
    let (a, b, c, d) = (
        a.to_ne_bytes(),
        b.to_ne_bytes(),
        c.to_ne_bytes(),
        d.to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The inverse of [`words_to_octets`].
#[inline(always)]
pub const fn octets_to_words(o: &Ipv6Octets) -> [u32; 4] {
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// Whether an IPv6 address (as words in memory order) is IPv4-mapped.
#[inline(always)]
pub const fn is_ipv4_mapped(words: &[u32; 4]) -> bool {
    words[0] == 0 && words[1] == 0 && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// An IPv6 address (as words in memory order) with every bit past
/// `prefix_len` (of 128) cleared: the key under which an IPv6 source's
/// connections are counted, so that rotating addresses inside one
/// allocation does not escape the cap.
#[inline(always)]
pub const fn ipv6_masked(words: [u32; 4], prefix_len: u32) -> [u32; 4] {
    [
        words[0] & mask_word(prefix_len, 0),
        words[1] & mask_word(prefix_len, 1),
        words[2] & mask_word(prefix_len, 2),
        words[3] & mask_word(prefix_len, 3),
    ]
}

/// The memory-order mask of word `index` (0..4) for a 128-bit prefix.
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

/// Why a source is blocked (in [`Block::reason`]). The codes are stable: the
/// state file and pinned maps hold them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Added by an operator.
    Manual = 1,
    /// Too many failed recipients: directory harvesting.
    Harvest = 2,
    /// Too many failed AUTH attempts.
    Auth = 3,
    /// Flood: null-sender or connection floods.
    Flood = 4,
    /// On the configured reject list.
    RejectList = 5,
    /// Relay attempts.
    Relay = 6,
    /// Rejected by content filters (spam, virus).
    Filter = 7,
    /// Many sources of the network blocked within a window: an attacker
    /// moving across the addresses of its network.
    Network = 8,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 8] = [
        Reason::Manual,
        Reason::Harvest,
        Reason::Auth,
        Reason::Flood,
        Reason::RejectList,
        Reason::Relay,
        Reason::Filter,
        Reason::Network,
    ];

    /// The reason with this code, if any.
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Reason::Manual,
            2 => Reason::Harvest,
            3 => Reason::Auth,
            4 => Reason::Flood,
            5 => Reason::RejectList,
            6 => Reason::Relay,
            7 => Reason::Filter,
            8 => Reason::Network,
            _ => return None,
        })
    }

    /// The reason named `name` (the inverse of [`Reason::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.name() == name)
    }

    /// A stable lower-case name for logs, metrics and the CLI.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Manual => "manual",
            Reason::Harvest => "harvest",
            Reason::Auth => "auth",
            Reason::Flood => "flood",
            Reason::RejectList => "reject-list",
            Reason::Relay => "relay",
            Reason::Filter => "filter",
            Reason::Network => "network",
        }
    }
}

/// What the programs do with a packet they would drop (in [`Config::mode`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Drop it.
    #[default]
    Enforce = 0,
    /// Count it in `Stats::would_drop_*`, report it as observed, pass it.
    Observe = 1,
}

/// Why a packet was dropped (in [`DropEvent::reason`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The source address is in `BLOCK_V4`/`BLOCK_V6`.
    Block = 1,
    /// The source is inside a `BLOCK_NET_V4`/`BLOCK_NET_V6` network.
    BlockNet = 2,
    /// A new connection from a source at its connection cap.
    Cap = 3,
}

impl DropReason {
    /// The reason with this code, if any.
    pub const fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => DropReason::Block,
            2 => DropReason::BlockNet,
            3 => DropReason::Cap,
            _ => return None,
        })
    }

    /// A stable lower-case name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Block => "block",
            DropReason::BlockNet => "block-net",
            DropReason::Cap => "cap",
        }
    }
}

// An enum field's type differs by side. In the kernel object it is the enum,
// so that the object's BTF (which bpftool reads) names its values. Elsewhere
// it is the enum's `u32` code: a map can hold any value (written by another
// tool or a newer agent), and a Rust enum must never hold an unknown one. The
// layouts are the same (`repr(u32)`; checked below). The kernel only writes
// these fields, except `Config::mode`, which it reads as a `u32`.

/// A [`Reason`] in a map value.
#[cfg(target_arch = "bpf")]
pub type ReasonCode = Reason;
/// A [`Reason`] in a map value (its code; see the kernel side's type).
#[cfg(not(target_arch = "bpf"))]
pub type ReasonCode = u32;

/// A [`Mode`] in a map value.
#[cfg(target_arch = "bpf")]
pub type ModeCode = Mode;
/// A [`Mode`] in a map value (its code).
#[cfg(not(target_arch = "bpf"))]
pub type ModeCode = u32;

/// A [`DropReason`] in an event.
#[cfg(target_arch = "bpf")]
pub type DropReasonCode = DropReason;
/// A [`DropReason`] in an event (its code).
#[cfg(not(target_arch = "bpf"))]
pub type DropReasonCode = u32;

const _: () = {
    assert!(size_of::<Reason>() == 4 && size_of::<ReasonCode>() == 4);
    assert!(size_of::<Mode>() == 4 && size_of::<ModeCode>() == 4);
    assert!(size_of::<DropReason>() == 4 && size_of::<DropReasonCode>() == 4);
};

/// What the kernel programs enforce; one entry in the `CONFIG` array, written
/// by the agent at start and whenever a limit or the mode changes. All zero
/// (the state before the agent writes it) protects no port: the programs pass
/// everything. Every integer is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Concurrent connections a source may hold before its new SYNs are
    /// dropped, unless a `CAP_NET_*` entry overrides it. 0 = unlimited.
    pub max_connections: u32,
    /// Prefix length (0..=128) by which IPv6 sources are counted.
    pub ipv6_prefix_len: u32,
    /// Drop events each CPU may send per second; the rest are only counted.
    pub events_per_second: u32,
    /// How many entries of `ports` are in use.
    pub port_count: u32,
    /// [`Mode::Observe`] (`mode = "observe"`): every decision is taken and
    /// counted (`Stats::would_drop_*`, drop events marked observed) but every
    /// packet passes and no block's `drops` counts up; [`Mode::Enforce`]
    /// drops. Any value but 0 is read as observe.
    pub mode: ModeCode,
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
    pub fn observes(&self) -> bool {
        // Read as the code: the kernel's view of the field is the enum, and
        // another writer may have put any value there.
        // SAFETY: the field is 4 bytes of plain memory (`repr(u32)`).
        unsafe { (&raw const self.mode).cast::<u32>().read() != 0 }
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

/// A block on an address (`BLOCK_V4`, `BLOCK_V6`) or a network
/// (`BLOCK_NET_V4`, `BLOCK_NET_V6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "bpf"), derive(Default))]
pub struct Block {
    /// When the block ends, in `CLOCK_MONOTONIC` nanoseconds (the clock of
    /// `bpf_ktime_get_coarse_ns`); 0 = never. Past it the entry no longer drops
    /// and the agent sweeps it.
    pub expires_mono_ns: u64,
    /// Packets dropped by this entry (updated atomically by the kernel).
    pub drops: u64,
    /// Why: a [`Reason`].
    pub reason: ReasonCode,
    /// Which insertion this entry is (the agent counts them from 1 across
    /// all four block tables; an extension keeps it), so that the drops the
    /// CPUs counted in cached copies of an earlier entry never count as
    /// this one's ([`hot`]). 0: an entry written by an older version.
    pub serial: u32,
}

impl Block {
    /// Whether the block still holds at `now_mono_ns`.
    #[inline(always)]
    pub const fn active_at(&self, now_mono_ns: u64) -> bool {
        self.expires_mono_ns == 0 || now_mono_ns < self.expires_mono_ns
    }
}

/// An allow-list entry (`ALLOW_V4`, `ALLOW_V6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allow {
    /// Reserved for flags, zero today (LPM values cannot be empty).
    pub flags: u32,
}

/// A per-network connection cap (`CAP_NET_V4`, `CAP_NET_V6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cap {
    /// Concurrent connections per source inside this network; 0 = unlimited.
    pub max_connections: u32,
}

/// Established connections of one source (`CONN_COUNT_V4`, `CONN_COUNT_V6`).
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
    /// The key the connection was counted under, kept so that the close
    /// decrements the same key even if the IPv6 prefix changed: an IPv4
    /// source IPv4-mapped (its `CONN_COUNT_V4` key is the last four bytes),
    /// an IPv6 source masked to its prefix (its `CONN_COUNT_V6` key).
    pub source_key: Ipv6Octets,
}

/// One dropped (or, in observe mode, would-be dropped) packet, sent to the
/// agent through `EVENTS` (rate-limited).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "bpf"), derive(Default))]
pub struct DropEvent {
    /// When, in `CLOCK_MONOTONIC` nanoseconds (tick resolution).
    pub mono_ns: u64,
    /// The packet's source address; IPv4 as IPv4-mapped.
    pub source: Ipv6Octets,
    /// A [`DropReason`].
    pub reason: DropReasonCode,
    /// Destination port, host byte order.
    pub port: u16,
    /// 1 when the packet was a SYN without ACK (a new connection).
    pub syn: u8,
    /// 1 when the packet was not dropped, only counted: the programs run in
    /// observe mode ([`Config::mode`]). 0 = dropped.
    pub observed: u8,
}

/// Per-CPU state of the drop-event rate limiter (`EVENT_BUDGET`), and the
/// packet path's clock cache (one per-CPU slot for both: one lookup).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Start of the current one-second window, `CLOCK_MONOTONIC` ns.
    pub window_start_ns: u64,
    /// Events sent in that window.
    pub sent: u64,
    /// The coarse monotonic clock as last read on this CPU (ns)…
    pub clock_ns: u64,
    /// … and the `jiffies` value at that read.
    pub clock_jiffies: u64,
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
    /// Connections not counted because `CONN_SOCKS` or `CONN_COUNT_*` was
    /// full.
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
    // arrays of integers (on this side the enum fields are their `u32`
    // codes), with no implicit padding (checked in the tests).
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Block {}
    unsafe impl aya::Pod for Allow {}
    unsafe impl aya::Pod for Cap {}
    unsafe impl aya::Pod for ConnCount {}
    unsafe impl aya::Pod for TrackedSocket {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for Stats {}
    unsafe impl aya::Pod for HotBlockV4 {}
    unsafe impl aya::Pod for HotBlockV6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn sizes_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 6 * 4 + 2 * MAX_PORTS + 8);
        assert_eq!(core::mem::offset_of!(Config, netns_cookie) % 8, 0);
        assert_eq!(size_of::<Block>(), 8 + 8 + 4 + 4);
        assert_eq!(size_of::<Cap>(), 4);
        assert_eq!(size_of::<ConnCount>(), 4);
        assert_eq!(size_of::<TrackedSocket>(), 16);
        assert_eq!(size_of::<DropEvent>(), 8 + 16 + 4 + 2 + 1 + 1);
        assert_eq!(size_of::<EventBudget>(), 32);
        assert_eq!(size_of::<HotBlockV4>(), 4 + 4 + 3 * 8);
        assert_eq!(size_of::<HotBlockV6>(), 16 + 4 + 4 + 3 * 8);
        // Every counter is listed for `fields` and `add`.
        assert_eq!(size_of::<Stats>(), Stats::COUNT * 8);
    }

    /// The two families' bitmaps do not overlap, and the addresses an
    /// attacker holds in bulk (one IPv4 /16, one IPv6 /64) spread over the
    /// bitmap rather than sharing a few bits with one blocked neighbour.
    #[test]
    fn host_hints_stay_in_their_family_and_spread_neighbours() {
        fn distinct(bits: &mut [(u32, u64)]) -> usize {
            bits.sort_unstable();
            1 + bits.windows(2).filter(|w| w[0] != w[1]).count()
        }
        let mut v4_bits = [(0u32, 0u64); 4096];
        for (i, slot) in v4_bits.iter_mut().enumerate() {
            let octets = [198, 51, (i >> 8) as u8, i as u8];
            let (word, bit) = host_hint::of_v4(octets);
            assert!(word < host_hint::WORDS, "{octets:?}");
            assert_eq!(bit.count_ones(), 1);
            assert_eq!((word, bit), host_hint::v4(u32::from_ne_bytes(octets)));
            *slot = (word, bit);
        }
        let mut v6_bits = [(0u32, 0u64); 4096];
        for (i, slot) in v6_bits.iter_mut().enumerate() {
            let mut octets = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0];
            octets[14..].copy_from_slice(&(i as u16).to_be_bytes());
            let (word, bit) = host_hint::of_v6(octets);
            assert!((host_hint::WORDS..host_hint::ENTRIES).contains(&word));
            *slot = (word, bit);
        }
        // 4 096 addresses into 16 Mi bits: a handful of collisions at most.
        let (v4, v6) = (distinct(&mut v4_bits), distinct(&mut v6_bits));
        assert!(v4 > 4080, "{v4}");
        assert!(v6 > 4080, "{v6}");
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
    fn reason_names_and_codes_round_trip() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_name(reason.name()), Some(reason));
            assert_eq!(Reason::from_code(reason as u32), Some(reason));
        }
        assert_eq!(Reason::from_name("unknown"), None);
        assert_eq!(Reason::from_code(0), None);
        assert_eq!(Reason::from_code(99), None);
    }

    #[test]
    fn map_names_fit_the_kernel_limit_and_are_new() {
        for name in map_names::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
            assert!(
                !map_names::RETIRED.contains(&name),
                "{name} is also a retired name"
            );
        }
    }

    #[test]
    fn ipv4_mapping_round_trips() {
        let v4 = [192, 0, 2, 7];
        let mapped = ipv4_mapped(v4);
        assert_eq!(mapped[10..], [0xff, 0xff, 192, 0, 2, 7]);
        assert!(is_ipv4_mapped(&octets_to_words(&mapped)));
        assert_eq!(ipv4_unmapped(&mapped), Some(v4));
        assert_eq!(words_to_octets(octets_to_words(&mapped)), mapped);
        let v6 = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(ipv4_unmapped(&v6), None);
    }

    #[test]
    fn hint_positions_cover_every_top16_once() {
        assert_eq!(
            hint::position(hint::BLOCK_NET_V4, 0xc000),
            (hint::WORDS + 0xc000 / 64, 1)
        );
        assert_eq!(hint::position(hint::ALLOW_V4, 65), (1, 2));
        assert_eq!(
            hint::position(hint::CAP_NET_V6, u16::MAX),
            (hint::COUNT * hint::WORDS - 1, 1 << 63)
        );
    }

    #[test]
    fn fine_indexes_spread_the_networks_of_one_16() {
        // The 256 /24s of one /16 and 256 /48s of one /16: neighbours land
        // on (nearly) distinct bits.
        fn distinct(index: impl Fn(u64) -> u16) -> usize {
            let mut bits = [0u16; 256];
            for (n, bit) in bits.iter_mut().enumerate() {
                *bit = index(n as u64);
            }
            bits.sort_unstable();
            1 + bits.windows(2).filter(|w| w[0] != w[1]).count()
        }
        let v4 = distinct(|third| hint::fine_index((0xc633 << 8) | third));
        let v6 = distinct(|n| hint::fine_index((0x2001_0db8 << 16) | n));
        assert!(v4 >= 250 && v6 >= 250, "{v4} {v6}");
        assert_eq!(hint::fine(hint::CAP_NET_V6), hint::FINE_COUNT - 1);
        assert_eq!(hint::short(hint::ALLOW_V4), 0);
    }

    #[test]
    fn ipv6_sources_aggregate_by_prefix() {
        let mut o = [0u8; 16];
        o[..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 1, 0xff, 2]);
        o[8..].copy_from_slice(&[0xaa; 8]);
        let words = octets_to_words(&o);
        let k = words_to_octets(ipv6_masked(words, 64));
        assert_eq!(k[..8], o[..8]);
        assert_eq!(k[8..], [0; 8]);
        // A prefix that ends inside a word.
        let k = words_to_octets(ipv6_masked(words, 52));
        assert_eq!(k[..7], [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0xf0]);
        assert_eq!(k[7..], [0; 9]);
        assert_eq!(ipv6_masked(words, 128), words);
        assert_eq!(ipv6_masked(words, 0), [0; 4]);
    }

    #[test]
    fn config_zero_enforces_and_any_nonzero_observes() {
        let mut c = Config::default();
        assert!(!c.observes());
        c.mode = Mode::Observe as u32;
        assert!(c.observes());
        c.mode = 7;
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
