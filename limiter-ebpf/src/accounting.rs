//! Exact per-source connection counts from the kernel's TCP state changes.
//!
//! Attached to the cgroup v2 root, `sock_ops` sees every TCP socket. When a
//! passive connection to a protected port is established, its socket cookie
//! is remembered in `CONN_SOCKS` with the key it was counted under and that
//! key's count goes up; the state callback is switched on for the socket, and
//! when the socket reaches CLOSE (FIN, RST, timeout, killed owner: every end
//! passes through it) the remembered key goes down. Only counted sockets are
//! ever decremented.
//!
//! Counts never wrap: every change is a compare-and-swap that refuses to go
//! below 0 or above `u32::MAX` (a close that finds its count already at 0,
//! e.g. after the entry was removed and created again, leaves it at 0; an
//! open that finds `u32::MAX` is not counted, so its close takes nothing
//! away). A plain atomic add could not: a decrement racing with the removal
//! of an idle entry and its re-creation by another CPU would turn 0 into
//! 4 294 967 295 and cap the source for good.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use limiter_common::{
    generation, ipv4_mapped, ipv4_unmapped, ipv6_masked, is_ipv4_mapped, words_to_octets,
    ConnCount, Ipv4Octets, Ipv6Octets, Stats, TrackedSocket,
};

use crate::datapath::{
    atomic_add, CONFIG, CONN_COUNT_V4, CONN_COUNT_V6, CONN_SOCKS, GENERATIONS, STATS,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Compare-and-swap attempts per count change. Each failed attempt means
/// another CPU changed the same count in between; this many in a row does
/// not happen outside a benchmark, and the loop must be bounded.
const CAS_TRIES: u32 = 16;

#[sock_ops]
pub fn limiter_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => count_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => count_closed(&ctx),
        _ => {}
    }
    // sock_ops programs return 1 for "handled"; the value has no effect here.
    1
}

#[inline(always)]
fn count_established(ctx: &SockOpsContext) {
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if ctx.local_port() > u16::MAX as u32 || !config.protects(ctx.local_port() as u16) {
        return;
    }
    if config.netns_cookie != 0
        && unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != config.netns_cookie
    {
        return;
    }
    let Some(source) = remote_address(ctx) else {
        return;
    };
    let key = match source {
        Remote::V4(word) => CountKey::V4(word.to_ne_bytes()),
        Remote::V6(words) => {
            CountKey::V6(words_to_octets(ipv6_masked(words, config.ipv6_prefix_len)))
        }
    };
    let source_key = key.tracked();
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if CONN_SOCKS
        .insert(cookie, TrackedSocket { source_key }, BPF_NOEXIST as u64)
        .is_err()
    {
        count(|s| &raw mut s.conn_untracked);
        return;
    }
    if !increment(&key) {
        let _ = CONN_SOCKS.remove(cookie);
        count(|s| &raw mut s.conn_untracked);
        return;
    }
    // Ask for state callbacks on this socket so its close is seen.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    count(|s| &raw mut s.conn_opened);
}

#[inline(always)]
fn count_closed(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    let Some(tracked) = (unsafe { CONN_SOCKS.get(cookie) }) else {
        return;
    };
    let key = CountKey::of_tracked(&tracked.source_key);
    if CONN_SOCKS.remove(cookie).is_err() {
        // Another close of the same socket got there first.
        return;
    }
    if let Some(count) = key.get_ptr_mut() {
        // SAFETY: pointer to a live map value; other CPUs update it too.
        let connections = unsafe { &raw mut (*count).connections };
        // An idle source leaves the table: the close that brought the count
        // to 0 removes it, as does one that found it at 0 (reset under the
        // connection). An increment racing between that and the removal is
        // lost (the count then reads one low until that connection closes,
        // and that close stops at 0): the price of not locking. A close
        // whose every compare-and-swap lost leaves the count one high.
        let left = unsafe { change(connections, Step::Down) };
        if left == Some(0) || (left.is_none() && unsafe { connections.read_volatile() } == 0) {
            key.remove();
        }
    }
    // After the change: the CPUs' copies of "at its cap" are stale.
    if let Some(generation) = GENERATIONS.get_ptr_mut(generation::CONNECTIONS) {
        // SAFETY: a pointer into the array; other CPUs add to it too.
        unsafe { atomic_add(generation, 1u64) };
    }
    count(|s| &raw mut s.conn_closed);
}

/// A peer's address: IPv4 as one word, IPv6 as four, in memory order.
enum Remote {
    V4(u32),
    V6([u32; 4]),
}

/// The peer's address; an IPv4-mapped one (IPv4 on a dual-stack socket) as
/// IPv4. Every field is read, at its fixed offset, before looking at the
/// family: reads in separate branches get merged by LLVM into one read
/// through a selected offset, and the verifier refuses a context access
/// through a computed pointer.
#[inline(always)]
fn remote_address(ctx: &SockOpsContext) -> Option<Remote> {
    let ops = ctx.ops;
    // SAFETY: `ops` is the program's context; each read is one u32 field.
    let (family, ip4, ip6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).remote_ip4),
            [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
        )
    };
    match family {
        AF_INET => Some(Remote::V4(ip4)),
        AF_INET6 if is_ipv4_mapped(&ip6) => Some(Remote::V4(ip6[3])),
        AF_INET6 => Some(Remote::V6(ip6)),
        _ => None,
    }
}

/// A `CONN_COUNT_V4` or `CONN_COUNT_V6` key.
#[derive(Clone, Copy)]
enum CountKey {
    V4(Ipv4Octets),
    V6(Ipv6Octets),
}

impl CountKey {
    /// The key's form in `TrackedSocket` (IPv4 as IPv4-mapped).
    #[inline(always)]
    fn tracked(&self) -> Ipv6Octets {
        match *self {
            CountKey::V4(v4) => ipv4_mapped(v4),
            CountKey::V6(v6) => v6,
        }
    }

    /// The inverse of [`Self::tracked`].
    #[inline(always)]
    fn of_tracked(tracked: &Ipv6Octets) -> Self {
        match ipv4_unmapped(tracked) {
            Some(v4) => CountKey::V4(v4),
            None => CountKey::V6(*tracked),
        }
    }

    #[inline(always)]
    fn get_ptr_mut(&self) -> Option<*mut ConnCount> {
        match self {
            CountKey::V4(key) => CONN_COUNT_V4.get_ptr_mut(key),
            CountKey::V6(key) => CONN_COUNT_V6.get_ptr_mut(key),
        }
    }

    /// Inserts `value` unless the key exists (`BPF_NOEXIST`).
    #[inline(always)]
    fn insert_new(&self, value: ConnCount) -> Result<(), i32> {
        match self {
            CountKey::V4(key) => CONN_COUNT_V4.insert(key, value, BPF_NOEXIST as u64),
            CountKey::V6(key) => CONN_COUNT_V6.insert(key, value, BPF_NOEXIST as u64),
        }
    }

    #[inline(always)]
    fn remove(&self) {
        let _ = match self {
            CountKey::V4(key) => CONN_COUNT_V4.remove(key),
            CountKey::V6(key) => CONN_COUNT_V6.remove(key),
        };
    }
}

/// A count change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    Up,
    Down,
}

/// Adds or takes one from `*target`, unless that would go past `u32::MAX`
/// or below 0; returns the new value, or `None` if nothing changed (at the
/// limit, or `CAS_TRIES` attempts all lost to other CPUs).
///
/// # Safety
/// `target` must point into a map value.
#[inline(always)]
unsafe fn change(target: *mut u32, step: Step) -> Option<u32> {
    // SAFETY: the caller's pointer; a plain read of a u32 cannot tear.
    let mut current = unsafe { target.read_volatile() };
    for _ in 0..CAS_TRIES {
        let next = match step {
            Step::Up => current.checked_add(1)?,
            Step::Down => current.checked_sub(1)?,
        };
        // SAFETY: as above.
        let seen = unsafe { cmpxchg32(target, current, next) };
        let swapped = seen == current;
        if swapped {
            return Some(next);
        }
        current = seen;
    }
    None
}

/// `BPF_CMPXCHG` on a 32-bit map value (Linux ≥ 5.12): if `*target` is
/// `expected`, stores `new`; returns what `*target` held. Written out
/// because LLVM selects the 32-bit compare-and-swap only for `alu32` CPUs
/// and this object is built for the generic one; the instruction itself
/// needs no more than the 64-bit registers that hold its operands (the
/// kernel zero-extends the result into r0).
///
/// # Safety
/// `target` must point into a map value.
#[inline(always)]
unsafe fn cmpxchg32(target: *mut u32, expected: u32, new: u32) -> u32 {
    let mut seen = u64::from(expected);
    // SAFETY: one atomic instruction on the caller's map value.
    unsafe {
        core::arch::asm!(
            "w0 = cmpxchg32_32({target} + 0, w0, w2)",
            target = in(reg) target,
            in("r2") u64::from(new),
            inout("r0") seen,
            options(nostack),
        )
    };
    seen as u32
}

/// Adds one connection to `key`; false if the table is full or the count
/// is at `u32::MAX` (the connection is then not counted at all).
#[inline(always)]
fn increment(key: &CountKey) -> bool {
    for _ in 0..2 {
        if let Some(count) = key.get_ptr_mut() {
            // SAFETY: pointer to a live map value; other CPUs update it too.
            return unsafe { change(&raw mut (*count).connections, Step::Up) }.is_some();
        }
        if key.insert_new(ConnCount { connections: 1 }).is_ok() {
            return true;
        }
        // Either another CPU inserted the key first (look again) or the
        // table is full (the second look fails too).
    }
    false
}

/// Adds one to a socket-path counter. Socket callbacks run both in process
/// and in softirq context, so even the per-CPU slot needs an atomic add.
#[inline(always)]
fn count(field: impl FnOnce(&mut Stats) -> *mut u64) {
    if let Some(stats) = STATS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of STATS; the field pointer stays inside it.
        let field = field(unsafe { &mut *stats });
        unsafe { atomic_add(field, 1u64) };
    }
}
