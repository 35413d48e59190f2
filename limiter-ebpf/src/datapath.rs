//! The maps, and the XDP and TC programs with the decision they share.

use crate::packet::{self, Packet, Skip, Tcp};
use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_map_lookup_elem},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use limiter_common::{
    drop_reason, hint, Addr, Allow, Block, Cap, Config, ConnCount, DropEvent, EventBudget, Stats,
    TrackedSocket,
};

// Default sizes; the agent sets the real ones from its configuration when it
// creates the maps (`kernel.map_sizes`).
#[btf_map]
pub(crate) static CONFIG: Array<Config, 1> = Array::new();
#[btf_map]
pub(crate) static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();
#[btf_map]
static ALLOW: LpmTrie<Addr, Allow, 16384> = LpmTrie::new();
#[btf_map]
static BLOCK: HashMap<Addr, Block, 262144> = HashMap::new();
#[btf_map]
static BLOCK_NET: LpmTrie<Addr, Block, 65536> = LpmTrie::new();
#[btf_map]
static CAP_NET: LpmTrie<Addr, Cap, 16384> = LpmTrie::new();
#[btf_map]
pub(crate) static CONN_COUNT: HashMap<Addr, ConnCount, 65536> = HashMap::new();
#[btf_map]
pub(crate) static CONN_SOCKS: HashMap<u64, TrackedSocket, 262144> = HashMap::new();
#[btf_map]
static EVENTS: RingBuf<DropEvent, { 256 * 1024 }> = RingBuf::new();
#[btf_map]
static EVENT_BUDGET: PerCpuArray<EventBudget, 1> = PerCpuArray::new();
/// The packet path's per-CPU clock (see [`now_ns`]). Private to the
/// programs: not pinned, never read by the agent.
#[btf_map]
static CLOCK: PerCpuArray<ClockCache, 1> = PerCpuArray::new();
#[btf_map]
static NET_HINTS: Array<u64, { (hint::COUNT * hint::WORDS) as usize }> = Array::new();

/// Full-length LPM key for one address.
const HOST_PREFIX: u32 = 128;
const NS_PER_SEC: u64 = 1_000_000_000;
/// How much of an skb the TC program pulls into its linear area when the
/// headers are not all there (covers two VLAN tags and long IPv6 chains).
const TC_PULL_LEN: u32 = 256;

/// The coarse monotonic clock as last read on this CPU, and the jiffies
/// value at that read.
#[repr(C)]
#[derive(Clone, Copy)]
struct ClockCache {
    jiffies: u64,
    mono_ns: u64,
}

/// The LPM key of one address: the layout of `lpm_trie::Key<Addr>`, which is
/// packed, so rustc builds and copies it byte by byte and the program then
/// reads it back by words (a failed store-to-load forwarding per lookup).
/// This one is aligned, and its address doubles as the `BLOCK` key.
#[repr(C)]
struct HostKey {
    prefix_len: u32,
    addr: Addr,
}

enum Verdict {
    Pass,
    Drop,
}

#[xdp]
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
    judge(packet::parse(ctx.data(), ctx.data_end()))
}

#[classifier]
pub fn limiter_tc(ctx: TcContext) -> i32 {
    match try_limiter_tc(&ctx) {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Drop => TC_ACT_SHOT as i32,
    }
}

#[inline(always)]
fn try_limiter_tc(ctx: &TcContext) -> Verdict {
    let mut parsed = packet::parse(ctx.data(), ctx.data_end());
    // Headers of a non-linear skb may sit outside the directly readable part:
    // pull them in once and look again.
    let truncated = matches!(
        parsed,
        Err(Skip::Truncated)
            | Ok(Packet {
                unreadable: Some(Skip::Truncated),
                ..
            })
    );
    if truncated && (ctx.data_end() - ctx.data()) < ctx.len() as usize {
        let len = if ctx.len() < TC_PULL_LEN {
            ctx.len()
        } else {
            TC_PULL_LEN
        };
        if ctx.pull_data(len).is_ok() {
            parsed = packet::parse(ctx.data(), ctx.data_end());
        }
    }
    judge(parsed)
}

/// The decision shared by XDP and TC.
///
/// A TCP packet to a protected port: allow-listed → pass; blocked address or
/// network → drop; a new connection at its cap → drop; else pass. A packet
/// whose source is known but whose TCP header cannot be judged (a later
/// fragment, a truncated or invalid header, an IPv6 chain longer than the
/// parser walks, not TCP) → dropped if the source is blocked (and not
/// allow-listed), whatever its port: a blocked source gains nothing by
/// mangling its packets. ICMP errors and IPv6 neighbour discovery are the
/// network's plumbing and always pass. Everything else passes. In observe mode every drop
/// is counted in `would_drop_*` and the packet passes.
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
    if let Some(skip) = packet.unreadable {
        match skip {
            Skip::Control => {
                stats.ignored += 1;
                return Verdict::Pass;
            }
            Skip::NotTcp => stats.ignored += 1,
            Skip::Fragment => stats.fragments += 1,
            Skip::Truncated | Skip::Malformed => stats.malformed += 1,
        }
        return judge_source_only(config, stats, &packet.source, &packet.tcp);
    }
    let tcp = packet.tcp;
    if !config.protects(tcp.dst_port) {
        stats.ignored += 1;
        return Verdict::Pass;
    }
    stats.seen += 1;

    let host = HostKey {
        prefix_len: HOST_PREFIX,
        addr: packet.source,
    };
    let slash16 = packet.source.ipv4_slash16();
    if may_match(hint::ALLOW, slash16) && lookup_mut::<_, HostKey, Allow>(&ALLOW, &host).is_some() {
        stats.allowed += 1;
        return Verdict::Pass;
    }
    if let Some(block) = BLOCK.get_ptr_mut(&host.addr) {
        if block_holds(block, stats) {
            return refuse(
                config,
                stats,
                Some(block),
                &packet.source,
                &tcp,
                drop_reason::BLOCK,
            );
        }
    }
    let net_block = if may_match(hint::BLOCK_NET, slash16) {
        lookup_mut::<_, HostKey, Block>(&BLOCK_NET, &host)
    } else {
        None
    };
    if let Some(block) = net_block {
        if block_holds(block, stats) {
            return refuse(
                config,
                stats,
                Some(block),
                &packet.source,
                &tcp,
                drop_reason::BLOCK_NET,
            );
        }
    }
    if tcp.new_connection && at_cap(config, &host, slash16) {
        return refuse(config, stats, None, &packet.source, &tcp, drop_reason::CAP);
    }
    stats.passed += 1;
    Verdict::Pass
}

/// A packet known only by its source: dropped if the source is blocked and
/// not allow-listed. The allow list is looked up only for a blocked source,
/// so that the usual case (an unblocked source's UDP, ICMP or fragment)
/// costs one hash miss and, for IPv4, a prefilter bit.
#[inline(always)]
fn judge_source_only(config: &Config, stats: &mut Stats, source: &Addr, tcp: &Tcp) -> Verdict {
    // No protected port yet (the agent has not written CONFIG): pass all.
    if config.port_count == 0 {
        return Verdict::Pass;
    }
    let host = HostKey {
        prefix_len: HOST_PREFIX,
        addr: *source,
    };
    let slash16 = source.ipv4_slash16();
    let mut hit = None;
    if let Some(block) = BLOCK.get_ptr_mut(&host.addr) {
        if block_holds(block, stats) {
            hit = Some((block, drop_reason::BLOCK));
        }
    }
    if hit.is_none() && may_match(hint::BLOCK_NET, slash16) {
        if let Some(block) = lookup_mut::<_, HostKey, Block>(&BLOCK_NET, &host) {
            if block_holds(block, stats) {
                hit = Some((block, drop_reason::BLOCK_NET));
            }
        }
    }
    let Some((block, reason)) = hit else {
        return Verdict::Pass;
    };
    if may_match(hint::ALLOW, slash16) && lookup_mut::<_, HostKey, Allow>(&ALLOW, &host).is_some() {
        stats.allowed += 1;
        return Verdict::Pass;
    }
    // `tcp` is all zero: the event reports port 0.
    refuse(config, stats, Some(block), source, tcp, reason)
}

/// Drops the packet for `reason` (one of [`drop_reason`]), or in observe
/// mode only counts that it would have: the counter, the block entry's
/// `drops` (enforce only) and the event.
#[inline(always)]
fn refuse(
    config: &Config,
    stats: &mut Stats,
    block: Option<*mut Block>,
    source: &Addr,
    tcp: &Tcp,
    reason: u32,
) -> Verdict {
    let observe = config.observes();
    let counter = match (reason, observe) {
        (drop_reason::BLOCK, false) => &mut stats.dropped_block,
        (drop_reason::BLOCK, true) => &mut stats.would_drop_block,
        (drop_reason::BLOCK_NET, false) => &mut stats.dropped_block_net,
        (drop_reason::BLOCK_NET, true) => &mut stats.would_drop_block_net,
        (_, false) => &mut stats.dropped_cap,
        (_, true) => &mut stats.would_drop_cap,
    };
    *counter += 1;
    if !observe {
        if let Some(block) = block {
            // SAFETY: a pointer into a map value returned by a lookup just
            // before; the counter is shared by all CPUs, hence atomic.
            unsafe { atomic_add(&raw mut (*block).drops, 1u64) };
        }
    }
    report(config, stats, source, tcp, reason, observe);
    if observe {
        Verdict::Pass
    } else {
        Verdict::Drop
    }
}

/// Whether the trie behind hint bitmap `map` may hold an entry covering an
/// IPv4 source's /16 (always true for IPv6 sources). An array lookup, which
/// the verifier inlines: far cheaper than the trie.
#[inline(always)]
fn may_match(map: u32, slash16: Option<u16>) -> bool {
    let Some(slash16) = slash16 else {
        return true;
    };
    let (index, bit) = hint::position(map, slash16);
    // A missing word (cannot happen: the array is sized for every index)
    // fails safe: look the trie up.
    NET_HINTS.get(index).is_none_or(|word| word & bit != 0)
}

/// Whether the block entry still holds (counts it in `expired_block` if not).
#[inline(always)]
fn block_holds(block: *mut Block, stats: &mut Stats) -> bool {
    // SAFETY: a pointer into a map value returned by the lookup just before.
    let expires = unsafe { (*block).expires_mono_ns };
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
    // The verifier inlines `bpf_jiffies64` as a load of `jiffies_64`.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: per-CPU slot; packet programs on one CPU do not nest.
    let cache = unsafe { &mut *cache };
    // A zero clock is the slot's initial state, never a reading.
    if cache.jiffies != jiffies || cache.mono_ns == 0 {
        cache.mono_ns = unsafe { bpf_ktime_get_coarse_ns() };
        cache.jiffies = jiffies;
    }
    cache.mono_ns
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

/// A writable pointer to the value under `key` in `map` (the BTF map types
/// only hand out shared references for LPM tries, and want their packed key
/// type).
#[inline(always)]
fn lookup_mut<M, K, V>(map: &M, key: &K) -> Option<*mut V> {
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

/// Whether `source` already holds as many connections as its cap allows.
#[inline(always)]
fn at_cap(config: &Config, host: &HostKey, slash16: Option<u16>) -> bool {
    // Most sources hold no connection: one hash miss and done.
    let Some(count) = (unsafe { CONN_COUNT.get(host.addr.source_key(config.ipv6_prefix_len)) })
    else {
        return false;
    };
    let cap = match may_match(hint::CAP_NET, slash16)
        .then(|| lookup_mut::<_, HostKey, Cap>(&CAP_NET, host))
        .flatten()
    {
        // SAFETY: a pointer to a live map value.
        Some(cap) => unsafe { (*cap).max_connections },
        None => config.max_connections,
    };
    cap != 0 && count.connections >= cap
}

/// Sends a drop event (marked `observed` in observe mode), at most
/// `events_per_second` per CPU.
#[inline(always)]
fn report(
    config: &Config,
    stats: &mut Stats,
    source: &Addr,
    tcp: &Tcp,
    reason: u32,
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
    let now = now_ns();
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
        source: *source,
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
