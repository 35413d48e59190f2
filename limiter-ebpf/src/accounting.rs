//! Exact per-source connection counts from the kernel's TCP state changes.
//!
//! Attached to the cgroup v2 root, `sock_ops` sees every TCP socket. When a
//! passive connection to a protected port is established, its socket cookie
//! is remembered in `CONN_SOCKS` with the key it was counted under and that
//! key's count goes up; the state callback is switched on for the socket, and
//! when the socket reaches CLOSE (FIN, RST, timeout, killed owner: every end
//! passes through it) the remembered key goes down. Only counted sockets are
//! ever decremented, so a count can neither drift nor go negative.

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
use limiter_common::{Addr, ConnCount, Stats, TrackedSocket};

use crate::datapath::{atomic_add, CONFIG, CONN_COUNT, CONN_SOCKS, STATS};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

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
    let source_key = source.source_key(config.ipv6_prefix_len);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if CONN_SOCKS
        .insert(cookie, TrackedSocket { source_key }, BPF_NOEXIST as u64)
        .is_err()
    {
        count(|s| &raw mut s.conn_untracked);
        return;
    }
    if !increment(&source_key) {
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
    let source_key = tracked.source_key;
    if CONN_SOCKS.remove(cookie).is_err() {
        // Another close of the same socket got there first.
        return;
    }
    if let Some(count) = CONN_COUNT.get_ptr_mut(source_key) {
        // SAFETY: pointer to a live map value; other CPUs update it too.
        let connections = unsafe { &raw mut (*count).connections };
        unsafe { atomic_add(connections, u32::MAX) }; // −1, wrapping
                                                      // An idle source leaves the table. An increment racing between the
                                                      // read and the delete is lost (the count then reads one low until
                                                      // that connection closes): the price of not locking the hot path.
        if unsafe { connections.read_volatile() } == 0 {
            let _ = CONN_COUNT.remove(source_key);
        }
    }
    count(|s| &raw mut s.conn_closed);
}

/// The peer's address. Every field is read, at its fixed offset, before
/// looking at the family: reads in separate branches get merged by LLVM into
/// one read through a selected offset, and the verifier refuses a context
/// access through a computed pointer.
#[inline(always)]
fn remote_address(ctx: &SockOpsContext) -> Option<Addr> {
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
        AF_INET => Some(Addr::from_ipv4_word(ip4)),
        AF_INET6 => Some(Addr { words: ip6 }),
        _ => None,
    }
}

/// Adds one connection to `source_key`; false if the table is full.
#[inline(always)]
fn increment(source_key: &Addr) -> bool {
    for _ in 0..2 {
        if let Some(count) = CONN_COUNT.get_ptr_mut(source_key) {
            // SAFETY: pointer to a live map value; other CPUs update it too.
            unsafe { atomic_add(&raw mut (*count).connections, 1u32) };
            return true;
        }
        let first = ConnCount { connections: 1 };
        if CONN_COUNT
            .insert(source_key, first, BPF_NOEXIST as u64)
            .is_ok()
        {
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
