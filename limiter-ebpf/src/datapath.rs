//! The maps, and the XDP and TC programs with the decision they share.

use crate::packet::{self, Packet, Skip, Tcp};
use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_map_lookup_elem},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use limiter_common::{
    generation, hint, host_hint, hot, ipv4_mapped, ipv6_masked, is_ipv4_mapped, words_to_octets,
    Allow, Block, Cap, Config, ConnCount, DropEvent, DropReason, EventBudget, HotBlockV4,
    HotBlockV6, Ipv4Octets, Ipv6Octets, Stats, TrackedSocket,
};

/// Blocks are written only by the agent: allocated as they come, so that
/// the two families' tables do not both reserve `kernel.map_sizes.block`
/// entries' worth of memory up front. Lookups cost the same.
const ON_DEMAND: usize = BPF_F_NO_PREALLOC as usize;
/// The agent writes `BLOCK_HINTS` through a memory mapping: setting a bit
/// or rebuilding a bitmap costs no syscall per word.
const MAPPABLE: usize = BPF_F_MMAPABLE as usize;

// Default sizes; the agent sets the real ones from its configuration when it
// creates the maps (`kernel.map_sizes`).
#[btf_map]
pub(crate) static CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
pub(crate) static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();
#[btf_map]
static ALLOW_V4: LpmTrie<Ipv4Octets, Allow, 16384> = LpmTrie::new();
#[btf_map]
static ALLOW_V6: LpmTrie<Ipv6Octets, Allow, 16384> = LpmTrie::new();
#[btf_map]
static BLOCK_V4: HashMap<Ipv4Octets, Block, 262144, ON_DEMAND> = HashMap::new();
#[btf_map]
static BLOCK_V6: HashMap<Ipv6Octets, Block, 262144, ON_DEMAND> = HashMap::new();
#[btf_map]
static BLOCK_NET_V4: LpmTrie<Ipv4Octets, Block, 65536> = LpmTrie::new();
#[btf_map]
static BLOCK_NET_V6: LpmTrie<Ipv6Octets, Block, 65536> = LpmTrie::new();
#[btf_map]
static CAP_NET_V4: LpmTrie<Ipv4Octets, Cap, 16384> = LpmTrie::new();
#[btf_map]
static CAP_NET_V6: LpmTrie<Ipv6Octets, Cap, 16384> = LpmTrie::new();
#[btf_map]
pub(crate) static CONN_COUNT_V4: HashMap<Ipv4Octets, ConnCount, 65536> = HashMap::new();
#[btf_map]
pub(crate) static CONN_COUNT_V6: HashMap<Ipv6Octets, ConnCount, 65536> = HashMap::new();
#[btf_map]
pub(crate) static CONN_SOCKS: HashMap<u64, TrackedSocket, 262144> = HashMap::new();
#[btf_map]
static EVENTS: RingBuf<DropEvent, { 256 * 1024 }> = RingBuf::new();
#[btf_map]
static EVENT_BUDGET: PerCpuArray<EventBudget, 1> = PerCpuArray::new();
#[btf_map]
static NET_HINTS: Array<u64, { (hint::COUNT * hint::WORDS) as usize }> = Array::new();
#[btf_map]
static NET_HINTS_FINE: Array<u64, { (hint::FINE_COUNT * hint::WORDS) as usize }> = Array::new();
#[btf_map]
static BLOCK_HINTS: Array<u64, { host_hint::ENTRIES as usize }, MAPPABLE> = Array::new();
#[btf_map]
pub(crate) static GENERATIONS: Array<u64, { generation::COUNT as usize }, MAPPABLE> = Array::new();
#[btf_map]
static HOT_CAPS_V4: PerCpuArray<HotCap<u32>, { hot::SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static HOT_CAPS_V6: PerCpuArray<HotCap<[u32; 4]>, { hot::SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static HOT_BLOCKS_V4: PerCpuArray<HotBlockV4, { hot::SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static HOT_BLOCKS_V6: PerCpuArray<HotBlockV6, { hot::SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static HOT_NETS_V4: PerCpuArray<HotBlockV4, { hot::SLOTS as usize }> = PerCpuArray::new();
#[btf_map]
static HOT_NETS_V6: PerCpuArray<HotBlockV6, { hot::SLOTS as usize }> = PerCpuArray::new();

const NS_PER_SEC: u64 = 1_000_000_000;
/// How much of an skb the TC program pulls into its linear area when the
/// headers are not all there: as far as the parser reads (a TCP header
/// after the longest header chain it walks), so that TC judges every packet
/// XDP would.
const TC_PULL_LEN: u32 = (packet::MAX_L4_OFFSET + packet::TCP_MIN_HDR_LEN) as u32;

enum Verdict {
    Pass,
    Drop,
}

// Inlined into the entry point the macro wraps it in: the decision is
// inlined once per family and would otherwise be a BPF-to-BPF call.
#[xdp]
#[inline(always)]
pub fn limiter_xdp(ctx: XdpContext) -> u32 {
    // A limiter fails open: whatever it cannot judge, it passes; except
    // that a blocked source's packets are dropped once its address is read.
    match try_limiter_xdp(&ctx) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[inline(always)]
fn try_limiter_xdp(ctx: &XdpContext) -> Verdict {
    packet::parse(
        ctx.data(),
        ctx.data_end(),
        #[inline(always)]
        |parsed| judge(parsed),
    )
}

#[classifier]
#[inline(always)]
pub fn limiter_tc(ctx: TcContext) -> i32 {
    match try_limiter_tc(&ctx) {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn try_limiter_tc(ctx: &TcContext) -> Verdict {
    // Headers of a non-linear skb may sit outside the directly readable part:
    // pull them in once and look again.
    let pullable = (ctx.data_end() - ctx.data()) < ctx.len() as usize;
    let first = packet::parse(
        ctx.data(),
        ctx.data_end(),
        #[inline(always)]
        |parsed| {
            let truncated = matches!(
                parsed,
                Err(Skip::Truncated)
                    | Ok(Packet {
                        unreadable: Some(Skip::Truncated),
                        ..
                    })
            );
            (!(truncated && pullable)).then(|| judge(parsed))
        },
    );
    if let Some(verdict) = first {
        return verdict;
    }
    let len = if ctx.len() < TC_PULL_LEN {
        ctx.len()
    } else {
        TC_PULL_LEN
    };
    // A failed pull leaves the packet as it was: judge what can be read.
    let _ = ctx.pull_data(len);
    packet::parse(
        ctx.data(),
        ctx.data_end(),
        #[inline(always)]
        |parsed| judge(parsed),
    )
}

/// The decision shared by XDP and TC.
///
/// A TCP packet to a protected port: allow-listed → pass; blocked address or
/// network → drop; a new connection at its cap → drop; else pass. A packet
/// whose source is known but whose TCP header cannot be judged (a later
/// fragment, a truncated or invalid header, an IPv6 chain longer than the
/// parser walks, not TCP) → dropped if the source is blocked (and not
/// allow-listed), whatever its port: a blocked source gains nothing by
/// mangling its packets; and if it may be a SYN after all (a truncated or
/// invalid header, a chain too long), also if the source is at its cap. ICMP errors and IPv6 neighbour discovery are the
/// network's plumbing and always pass. Everything else passes. In observe
/// mode every drop is counted in `would_drop_*` and the packet passes.
///
/// Each family is judged against its own maps; an IPv4-mapped IPv6 source
/// as the IPv4 address it carries.
#[inline(always)]
fn judge(parsed: Result<Packet, Skip>) -> Verdict {
    let Some(stats) = STATS.get_ptr_mut(0) else {
        return Verdict::Pass;
    };
    // SAFETY: per-CPU slot; packet programs on one CPU do not nest, and the
    // socket path writes other fields.
    let stats = unsafe { &mut *stats };
    let packet = match parsed {
        Ok(packet) => packet,
        // Not IP, or the IP header is cut short: no source to judge.
        Err(Skip::NotTcp) => {
            stats.ignored += 1;
            return Verdict::Pass;
        }
        Err(_) => {
            stats.malformed += 1;
            return Verdict::Pass;
        }
    };
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Pass;
    };
    let words = packet.source;
    let v4 = is_ipv4_mapped(&words);
    if let Some(skip) = packet.unreadable {
        // Whether the packet may still be a SYN the stack accepts: a TCP
        // header the parser did not reach (IPv6 chains are bounded by
        // length only in the stack) or a first fragment cut inside it
        // (reassembly makes a SYN of it).
        let hidden_tcp = match skip {
            Skip::Control => {
                stats.ignored += 1;
                return Verdict::Pass;
            }
            Skip::NotTcp => {
                stats.ignored += 1;
                false
            }
            Skip::Fragment => {
                stats.fragments += 1;
                false
            }
            Skip::Truncated | Skip::Malformed => {
                stats.malformed += 1;
                true
            }
        };
        return if v4 {
            judge_source_only(config, stats, &V4::new(words[3]), &packet.tcp, hidden_tcp)
        } else {
            judge_source_only(config, stats, &V6::new(words), &packet.tcp, hidden_tcp)
        };
    }
    let tcp = packet.tcp;
    if !config.protects(tcp.dst_port) {
        stats.ignored += 1;
        return Verdict::Pass;
    }
    stats.seen += 1;
    if v4 {
        decide(config, stats, &V4::new(words[3]), &tcp)
    } else {
        decide(config, stats, &V6::new(words), &tcp)
    }
}

/// A TCP packet to a protected port from `source`: allow-listed → pass;
/// blocked → drop; a new connection at its cap → drop; else pass.
#[inline(always)]
fn decide<F: Family>(config: &Config, stats: &mut Stats, source: &F, tcp: &Tcp) -> Verdict {
    let top16 = source.top16();
    if may_hold(F::ALLOW_HINT, source, top16) && source.allowed() {
        stats.allowed += 1;
        return Verdict::Pass;
    }
    if let Some(block) = source.block() {
        if block_holds(block, stats) {
            return refuse(config, stats, Some(block), source, tcp, DropReason::Block);
        }
    }
    let net_block = if may_hold(F::BLOCK_NET_HINT, source, top16) {
        source.block_net()
    } else {
        None
    };
    if let Some(block) = net_block {
        if block_holds(block, stats) {
            return refuse(
                config,
                stats,
                Some(block),
                source,
                tcp,
                DropReason::BlockNet,
            );
        }
    }
    if tcp.new_connection && at_cap(config, source, top16) {
        return refuse(config, stats, None, source, tcp, DropReason::Cap);
    }
    stats.passed += 1;
    Verdict::Pass
}

/// A packet known only by its source: dropped if the source is blocked and
/// not allow-listed; if it may hide a TCP header (`hidden_tcp`), also if
/// the source is at its connection cap, to whatever port (no legitimate
/// sender splits a TCP header across fragments or sends a chain the parser
/// does not walk). The allow list is looked up only for a source about to
/// be dropped, so that the usual case (an unblocked source's UDP, ICMP or
/// fragment) costs one hash miss and a prefilter bit.
#[inline(always)]
fn judge_source_only<F: Family>(
    config: &Config,
    stats: &mut Stats,
    source: &F,
    tcp: &Tcp,
    hidden_tcp: bool,
) -> Verdict {
    // No protected port yet (the agent has not written CONFIG): pass all.
    if config.port_count == 0 {
        return Verdict::Pass;
    }
    let top16 = source.top16();
    let mut hit = None;
    if let Some(block) = source.block() {
        if block_holds(block, stats) {
            hit = Some((block, DropReason::Block));
        }
    }
    if hit.is_none() && may_hold(F::BLOCK_NET_HINT, source, top16) {
        if let Some(block) = source.block_net() {
            if block_holds(block, stats) {
                hit = Some((block, DropReason::BlockNet));
            }
        }
    }
    let (block, reason) = match hit {
        Some((block, reason)) => (Some(block), reason),
        None if hidden_tcp && at_cap(config, source, top16) => (None, DropReason::Cap),
        None => return Verdict::Pass,
    };
    if may_hold(F::ALLOW_HINT, source, top16) && source.allowed() {
        stats.allowed += 1;
        return Verdict::Pass;
    }
    // `tcp` is all zero: the event reports port 0.
    refuse(config, stats, block, source, tcp, reason)
}

/// A source address and the maps of its family.
trait Family {
    /// Its `NET_HINTS` bitmaps.
    const ALLOW_HINT: u32;
    const BLOCK_NET_HINT: u32;
    const CAP_NET_HINT: u32;
    /// The address's first two bytes (big-endian), for the prefilters.
    fn top16(&self) -> u16;
    /// The *fine* prefilter bit of the address's fine-prefix network.
    fn fine_index(&self) -> u16;
    /// Whether an `ALLOW_*` network holds it.
    fn allowed(&self) -> bool;
    /// Its `BLOCK_*` entry ([`host_block`]).
    fn block(&self) -> Option<Hit>;
    /// The most specific `BLOCK_NET_*` entry holding it (through this
    /// CPU's copies, [`cached_block`]; the caller checks the prefilter).
    fn block_net(&self) -> Option<Hit>;
    /// The most specific `CAP_NET_*` entry holding it.
    fn cap(&self) -> Option<*mut Cap>;
    /// Its connection count (IPv6: of its prefix), if it holds any.
    fn connections(&self, config: &Config) -> Option<u32>;
    /// Its address, as the caches key it, and the address's hash.
    type Addr: Copy + PartialEq + 'static;
    fn addr(&self) -> Self::Addr;
    fn addr_hash(&self) -> u64;
    /// This CPU's sources of this family found at their cap.
    fn cap_cache() -> &'static PerCpuArray<HotCap<Self::Addr>, { hot::SLOTS as usize }>;
    /// The address for a drop event (IPv4 as IPv4-mapped).
    fn event_source(&self) -> Ipv6Octets;
}

/// An IPv4 source, as the full-length LPM key of its address. The layout
/// is that of `lpm_trie::Key<Ipv4Octets>`, which is packed (rustc would
/// build and copy it byte by byte); this one is aligned, and its `addr`
/// doubles as the `BLOCK_V4` key.
#[repr(C)]
struct V4 {
    prefix_len: u32,
    /// The four address bytes, as one word in memory order.
    addr: u32,
}

impl V4 {
    #[inline(always)]
    fn new(word: u32) -> Self {
        Self {
            prefix_len: 32,
            addr: word,
        }
    }
}

impl Family for V4 {
    const ALLOW_HINT: u32 = hint::ALLOW_V4;
    const BLOCK_NET_HINT: u32 = hint::BLOCK_NET_V4;
    const CAP_NET_HINT: u32 = hint::CAP_NET_V4;

    #[inline(always)]
    fn top16(&self) -> u16 {
        let b = self.addr.to_ne_bytes();
        u16::from_be_bytes([b[0], b[1]])
    }

    #[inline(always)]
    fn fine_index(&self) -> u16 {
        let network = u32::from_be(self.addr) >> (32 - hint::FINE_PREFIX_V4);
        hint::fine_index(network as u64)
    }

    #[inline(always)]
    fn allowed(&self) -> bool {
        lookup_mut::<_, Self, Allow>(&ALLOW_V4, self).is_some()
    }

    #[inline(always)]
    fn block(&self) -> Option<Hit> {
        let hash = self.addr_hash();
        host_block(
            &BLOCK_V4,
            &HOT_BLOCKS_V4,
            host_hint::FAMILY_V4,
            hash,
            &self.addr,
        )
    }

    #[inline(always)]
    fn block_net(&self) -> Option<Hit> {
        cached_block(&HOT_NETS_V4, self.addr_hash(), &self.addr, |addr| {
            lookup_mut(&BLOCK_NET_V4, &V4::new(*addr))
        })
    }

    #[inline(always)]
    fn cap(&self) -> Option<*mut Cap> {
        lookup_mut(&CAP_NET_V4, self)
    }

    #[inline(always)]
    fn connections(&self, _config: &Config) -> Option<u32> {
        lookup_mut::<_, u32, ConnCount>(&CONN_COUNT_V4, &self.addr)
            // SAFETY: a pointer to a live map value.
            .map(|count| unsafe { (*count).connections })
    }

    #[inline(always)]
    fn event_source(&self) -> Ipv6Octets {
        ipv4_mapped(self.addr.to_ne_bytes())
    }

    type Addr = u32;
    #[inline(always)]
    fn addr(&self) -> u32 {
        self.addr
    }
    #[inline(always)]
    fn addr_hash(&self) -> u64 {
        host_hint::hash_v4(self.addr)
    }
    #[inline(always)]
    fn cap_cache() -> &'static PerCpuArray<HotCap<u32>, { hot::SLOTS as usize }> {
        &HOT_CAPS_V4
    }
}

/// An IPv6 source, as the full-length LPM key of its address (aligned, as
/// [`V4`]; its `addr` doubles as the `BLOCK_V6` key).
#[repr(C)]
struct V6 {
    prefix_len: u32,
    /// The sixteen address bytes, as words in memory order.
    addr: [u32; 4],
}

impl V6 {
    #[inline(always)]
    fn new(words: [u32; 4]) -> Self {
        Self {
            prefix_len: 128,
            addr: words,
        }
    }
}

impl Family for V6 {
    const ALLOW_HINT: u32 = hint::ALLOW_V6;
    const BLOCK_NET_HINT: u32 = hint::BLOCK_NET_V6;
    const CAP_NET_HINT: u32 = hint::CAP_NET_V6;

    #[inline(always)]
    fn top16(&self) -> u16 {
        let b = self.addr[0].to_ne_bytes();
        u16::from_be_bytes([b[0], b[1]])
    }

    #[inline(always)]
    fn fine_index(&self) -> u16 {
        let high = ((u32::from_be(self.addr[0]) as u64) << 32) | u32::from_be(self.addr[1]) as u64;
        hint::fine_index(high >> (64 - hint::FINE_PREFIX_V6))
    }

    #[inline(always)]
    fn allowed(&self) -> bool {
        lookup_mut::<_, Self, Allow>(&ALLOW_V6, self).is_some()
    }

    #[inline(always)]
    fn block(&self) -> Option<Hit> {
        let hash = self.addr_hash();
        host_block(
            &BLOCK_V6,
            &HOT_BLOCKS_V6,
            host_hint::FAMILY_V6,
            hash,
            &self.addr,
        )
    }

    #[inline(always)]
    fn block_net(&self) -> Option<Hit> {
        cached_block(&HOT_NETS_V6, self.addr_hash(), &self.addr, |addr| {
            lookup_mut(&BLOCK_NET_V6, &V6::new(*addr))
        })
    }

    #[inline(always)]
    fn cap(&self) -> Option<*mut Cap> {
        lookup_mut(&CAP_NET_V6, self)
    }

    #[inline(always)]
    fn connections(&self, config: &Config) -> Option<u32> {
        let key = ipv6_masked(self.addr, config.ipv6_prefix_len);
        lookup_mut::<_, [u32; 4], ConnCount>(&CONN_COUNT_V6, &key)
            // SAFETY: a pointer to a live map value.
            .map(|count| unsafe { (*count).connections })
    }

    #[inline(always)]
    fn event_source(&self) -> Ipv6Octets {
        words_to_octets(self.addr)
    }

    type Addr = [u32; 4];
    #[inline(always)]
    fn addr(&self) -> [u32; 4] {
        self.addr
    }
    #[inline(always)]
    fn addr_hash(&self) -> u64 {
        host_hint::hash_v6(self.addr)
    }
    #[inline(always)]
    fn cap_cache() -> &'static PerCpuArray<HotCap<[u32; 4]>, { hot::SLOTS as usize }> {
        &HOT_CAPS_V6
    }
}

/// Drops the packet for `reason`, or in observe mode only counts that it
/// would have: the counter, the block entry's `drops` (enforce only) and
/// the event.
#[inline(always)]
fn refuse<F: Family>(
    config: &Config,
    stats: &mut Stats,
    block: Option<Hit>,
    source: &F,
    tcp: &Tcp,
    reason: DropReason,
) -> Verdict {
    let observe = config.observes();
    let counter = match (reason, observe) {
        (DropReason::Block, false) => &mut stats.dropped_block,
        (DropReason::Block, true) => &mut stats.would_drop_block,
        (DropReason::BlockNet, false) => &mut stats.dropped_block_net,
        (DropReason::BlockNet, true) => &mut stats.would_drop_block_net,
        (DropReason::Cap, false) => &mut stats.dropped_cap,
        (DropReason::Cap, true) => &mut stats.would_drop_cap,
    };
    *counter += 1;
    if !observe {
        if let Some(block) = block {
            // SAFETY: a pointer into a map value returned by a lookup just
            // before; an entry's counter is shared by all CPUs, hence atomic.
            unsafe { atomic_add(block.drops, 1u64) };
        }
    }
    report(config, stats, source, tcp, reason, observe);
    if observe {
        Verdict::Pass
    } else {
        Verdict::Drop
    }
}

/// Whether the trie behind hint bitmap `map` may hold an entry covering
/// `source` (whose first two bytes are `top16`): its /16's bit, then, only
/// if that is set, the bits of the entries shorter than the fine prefix in
/// that /16 and of the entries in its fine-prefix network. Array lookups,
/// which the verifier inlines: far cheaper than the trie.
#[inline(always)]
fn may_hold<F: Family>(map: u32, source: &F, top16: u16) -> bool {
    bit_set(&NET_HINTS, map, top16)
        && (bit_set(&NET_HINTS_FINE, hint::short(map), top16)
            || bit_set(&NET_HINTS_FINE, hint::fine(map), source.fine_index()))
}

/// Whether bit `index` of bitmap `map` in `bitmaps` is set.
#[inline(always)]
fn bit_set<const N: usize>(bitmaps: &Array<u64, N>, map: u32, index: u16) -> bool {
    word_has(bitmaps, hint::position(map, index))
}

/// Whether word `word` of `bitmaps` has `bit` set. A missing word (cannot
/// happen: the arrays are sized for every index) fails safe: the caller
/// looks its table up.
#[inline(always)]
fn word_has<const N: usize, const F: usize>(
    bitmaps: &Array<u64, N, F>,
    (word, bit): (u32, u64),
) -> bool {
    bitmaps.get(word).is_none_or(|w| w & bit != 0)
}

/// A block entry that holds a source: its expiry, and the counter of its
/// drops (the entry's, or this CPU's cached copy's).
#[derive(Clone, Copy)]
struct Hit {
    expires_mono_ns: u64,
    drops: *mut u64,
}

impl Hit {
    #[inline(always)]
    fn of(block: *mut Block) -> Self {
        // SAFETY: a pointer to a live map value returned by a lookup.
        unsafe {
            Hit {
                expires_mono_ns: (*block).expires_mono_ns,
                drops: &raw mut (*block).drops,
            }
        }
    }
}

/// A slot of a CPU's cache of hot blocked sources ([`hot`]).
trait HotSlot {
    type Addr: Copy + PartialEq;
    fn addr(&self) -> Self::Addr;
    fn serial(&self) -> u32;
    fn generation(&self) -> u64;
    fn expires_mono_ns(&self) -> u64;
    fn drops(&mut self) -> *mut u64;
    /// Makes the slot a copy of `addr`'s entry `block`, with no drops of
    /// its own.
    fn fill(&mut self, addr: Self::Addr, block: &Block, generation: u64);
}

macro_rules! hot_slot {
    ($slot:ty, $addr:ty) => {
        impl HotSlot for $slot {
            type Addr = $addr;
            #[inline(always)]
            fn addr(&self) -> $addr {
                self.addr
            }
            #[inline(always)]
            fn serial(&self) -> u32 {
                self.serial
            }
            #[inline(always)]
            fn generation(&self) -> u64 {
                self.generation
            }
            #[inline(always)]
            fn expires_mono_ns(&self) -> u64 {
                self.expires_mono_ns
            }
            #[inline(always)]
            fn drops(&mut self) -> *mut u64 {
                &raw mut self.drops
            }
            #[inline(always)]
            fn fill(&mut self, addr: $addr, block: &Block, generation: u64) {
                self.addr = addr;
                self.serial = block.serial;
                self.generation = generation;
                self.expires_mono_ns = block.expires_mono_ns;
                self.drops = 0;
            }
        }
    };
}
hot_slot!(HotBlockV4, u32);
hot_slot!(HotBlockV6, [u32; 4]);

/// The host table entry of `addr` (prefilter `hash` in bitmap `family`):
/// none if its `BLOCK_HINTS` bit is clear, else [`cached_block`].
#[inline(always)]
fn host_block<M, S: HotSlot, const N: usize>(
    table: &M,
    cache: &PerCpuArray<S, N>,
    family: u32,
    hash: u64,
    addr: &S::Addr,
) -> Option<Hit> {
    if !host_bit_set(host_hint::bit(family, hash)) {
        return None;
    }
    cached_block(cache, hash, addr, |addr| lookup_mut(table, addr))
}

/// The block entry that `lookup` finds for source `addr` (whose hash is
/// `hash`): this CPU's copy in `cache` if it holds one made under the
/// current generation; else the table's, which this CPU then copies if the
/// entry has dropped [`hot::AFTER_DROPS`] packets (the slot's previous copy
/// gives its drops to its own entry first). A copy hands its drops to its
/// entry every [`hot::FLUSH_EVERY`].
#[inline(always)]
fn cached_block<S: HotSlot, const N: usize>(
    cache: &PerCpuArray<S, N>,
    hash: u64,
    addr: &S::Addr,
    lookup: impl Fn(&S::Addr) -> Option<*mut Block>,
) -> Option<Hit> {
    // Read before the table: a copy made from what the lookup finds then
    // carries a generation from before it, so that a change followed by
    // the agent's increment never leaves a copy that looks current.
    // Generation 0 (a map the agent has not set up yet) turns the cache off.
    let generation = current(generation::BLOCKS);
    let slot = cache.get_ptr_mut(hot::slot(hash));
    if let Some(slot) = slot {
        // SAFETY: per-CPU slot; packet programs on one CPU do not nest.
        let slot = unsafe { &mut *slot };
        if generation != 0 && slot.generation() == generation && slot.addr() == *addr {
            // SAFETY: the slot's own counter, on this CPU.
            if unsafe { *slot.drops() } >= hot::FLUSH_EVERY {
                give_drops(slot, &lookup);
            }
            return Some(Hit {
                expires_mono_ns: slot.expires_mono_ns(),
                drops: slot.drops(),
            });
        }
    }
    let block = lookup(addr)?;
    let hit = Hit::of(block);
    if let Some(slot) = slot {
        // SAFETY: as above; `block` is a live map value.
        let (slot, drops) = unsafe { (&mut *slot, (*block).drops) };
        if generation != 0 && drops >= hot::AFTER_DROPS {
            give_drops(slot, &lookup);
            // SAFETY: `block` is a live map value.
            slot.fill(*addr, unsafe { &*block }, generation);
        }
    }
    Some(hit)
}

/// Adds the drops counted in copy `slot` to its entry (what `lookup` finds
/// for its source), if that is still the entry it copied (the same
/// insertion), and zeroes them.
#[inline(always)]
fn give_drops<S: HotSlot>(slot: &mut S, lookup: &impl Fn(&S::Addr) -> Option<*mut Block>) {
    // SAFETY: the slot's own counter, on this CPU.
    let pending = unsafe { *slot.drops() };
    if pending == 0 {
        return;
    }
    if let Some(owner) = lookup(&slot.addr()) {
        // SAFETY: a live map value; its counter is shared by all CPUs.
        unsafe {
            if (*owner).serial == slot.serial() {
                atomic_add(&raw mut (*owner).drops, pending);
            }
        }
    }
    // SAFETY: as above.
    unsafe { *slot.drops() = 0 };
}

/// Whether a host's `BLOCK_HINTS` bit (`(word, bit)`) is set.
#[inline(always)]
fn host_bit_set(position: (u32, u64)) -> bool {
    word_has(&BLOCK_HINTS, position)
}

/// Whether the block entry still holds (counts it in `expired_block` if not).
#[inline(always)]
fn block_holds(block: Hit, stats: &mut Stats) -> bool {
    let expires = block.expires_mono_ns;
    // A block ending a tick or two late does not matter.
    if expires != 0 && now_ns() >= expires {
        stats.expired_block += 1;
        return false;
    }
    true
}

/// `CLOCK_MONOTONIC` now at tick resolution, at most about two ticks behind
/// `bpf_ktime_get_coarse_ns` and never ahead of it. Both clocks advance in
/// the timer tick, so while `jiffies` has not moved the coarse clock read
/// earlier in the same tick still holds: one inlined load instead of a helper
/// call (a call and a return cost tens of ns on hosts with retpolines and
/// Safe RET). The coarse clock is read once per tick and CPU.
#[inline(always)]
fn now_ns() -> u64 {
    match EVENT_BUDGET.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; packet programs on one CPU do not nest.
        Some(budget) => cached_now_ns(unsafe { &mut *budget }),
        None => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// [`now_ns`] with this CPU's clock cache at hand.
#[inline(always)]
fn cached_now_ns(cache: &mut EventBudget) -> u64 {
    // The verifier inlines `bpf_jiffies64` as a load of `jiffies_64`.
    let jiffies = unsafe { bpf_jiffies64() };
    // A zero clock is the slot's initial state, never a reading.
    if cache.clock_jiffies != jiffies || cache.clock_ns == 0 {
        cache.clock_ns = unsafe { bpf_ktime_get_coarse_ns() };
        cache.clock_jiffies = jiffies;
    }
    cache.clock_ns
}

/// Adds `value` to `*target` with the BPF atomic add (the old value is not
/// used, which the oldest BPF instruction set supports too).
///
/// # Safety
/// `target` must point into a map value.
#[inline(always)]
pub(crate) unsafe fn atomic_add<T: Copy>(target: *mut T, value: T) {
    unsafe {
        core::intrinsics::atomic_xadd::<T, T, { core::intrinsics::AtomicOrdering::Relaxed }>(
            target, value,
        )
    };
}

/// A writable pointer to the value under `key` in `map`: the BTF map types
/// hand out shared references only for LPM tries and want their packed key
/// type, and the keys here are aligned words that the types would copy.
#[inline(always)]
pub(crate) fn lookup_mut<M, K, V>(map: &M, key: &K) -> Option<*mut V> {
    // SAFETY: `map` is a map definition the loader relocated; the helper
    // returns null or a pointer to a value of the map's value type.
    let value = unsafe {
        bpf_map_lookup_elem(
            core::ptr::from_ref(map).cast_mut().cast(),
            core::ptr::from_ref(key).cast(),
        )
    };
    (!value.is_null()).then_some(value.cast())
}

/// Generation `which` of [`generation`] now; 0 (caches off) if unreadable.
#[inline(always)]
fn current(which: u32) -> u64 {
    GENERATIONS.get(which).copied().unwrap_or(0)
}

/// A source a CPU found at its connection cap, under the connections'
/// generation then ([`generation::CONNECTIONS`]): until a connection
/// closes anywhere or the agent changes a cap, a limit or a count, it still
/// is, and its SYNs are dropped without looking its count up.
#[repr(C)]
pub struct HotCap<A> {
    addr: A,
    generation: u64,
}

/// Whether `source` already holds as many connections as its cap allows.
#[inline(always)]
fn at_cap<F: Family>(config: &Config, source: &F, top16: u16) -> bool {
    // Read before the count: a copy made from it then carries a generation
    // from before it (see `generation`).
    let generation = current(generation::CONNECTIONS);
    let addr = source.addr();
    let slot = F::cap_cache().get_ptr_mut(hot::slot(source.addr_hash()));
    if let Some(slot) = slot {
        // SAFETY: per-CPU slot; packet programs on one CPU do not nest.
        let slot = unsafe { &*slot };
        if generation != 0 && slot.generation == generation && slot.addr == addr {
            return true;
        }
    }
    // Most sources hold no connection: one hash miss and done.
    let Some(connections) = source.connections(config) else {
        return false;
    };
    let cap = match may_hold(F::CAP_NET_HINT, source, top16)
        .then(|| source.cap())
        .flatten()
    {
        // SAFETY: a pointer to a live map value.
        Some(cap) => unsafe { (*cap).max_connections },
        None => config.max_connections,
    };
    let at = cap != 0 && connections >= cap;
    if let Some(slot) = slot.filter(|_| at && generation != 0) {
        // SAFETY: as above.
        unsafe { *slot = HotCap { addr, generation } };
    }
    at
}

/// Sends a drop event (marked `observed` in observe mode), at most
/// `events_per_second` per CPU.
#[inline(always)]
fn report<F: Family>(
    config: &Config,
    stats: &mut Stats,
    source: &F,
    tcp: &Tcp,
    reason: DropReason,
    observed: bool,
) {
    if config.events_per_second == 0 {
        stats.events_suppressed += 1;
        return;
    }
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot, packet programs on one CPU do not nest.
    let budget = unsafe { &mut *budget };
    let now = cached_now_ns(budget);
    if now.wrapping_sub(budget.window_start_ns) >= NS_PER_SEC {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= config.events_per_second as u64 {
        stats.events_suppressed += 1;
        return;
    }
    let event = DropEvent {
        mono_ns: now,
        source: source.event_source(),
        reason,
        port: tcp.dst_port,
        syn: tcp.new_connection as u8,
        observed: observed as u8,
    };
    match EVENTS.output(&event, 0) {
        Ok(()) => {
            budget.sent += 1;
            stats.events_sent += 1;
        }
        Err(_) => stats.events_lost += 1,
    }
}
