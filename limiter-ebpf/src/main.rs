//! smtp-limiter kernel programs.
//!
//! * `limiter_xdp` (XDP) and `limiter_tc` (TC ingress) take the same decision
//!   for every TCP packet to a protected port: allow-listed source → pass;
//!   blocked address or network (not expired) → drop; a new connection from a
//!   source that already holds its cap of connections → drop; else pass.
//! * `limiter_sock_ops` (cgroup `sock_ops`) keeps `CONN_COUNT_V4` and
//!   `CONN_COUNT_V6` exact from the kernel's own TCP state changes: +1 when a
//!   passive connection to a protected port is established, −1 when that
//!   same socket reaches CLOSE.
//!
//! Map types live in `limiter-common`; the agent fills and reads the maps.
// The kernel programs build only for the BPF target (`cargo xtask
// build-ebpf`); on the host this crate is an empty binary so that workspace
// builds and lints still work.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// BPF has atomic add but no compare-and-swap, so core's atomic types offer
// no read-modify-write there; the intrinsic compiles to the BPF atomic add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
// Single packet loads of 2 and 4 bytes (see `packet.rs`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
// `#[inline(always)]` on the closures that judge a parsed packet: an
// outlined one would be a BPF-to-BPF call per packet.
#![cfg_attr(target_arch = "bpf", feature(stmt_expr_attributes))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core_intrinsics for atomic_xadd")
)]

#[cfg(target_arch = "bpf")]
mod accounting;
#[cfg(target_arch = "bpf")]
mod datapath;
#[cfg(target_arch = "bpf")]
mod packet;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("limiter-ebpf holds kernel programs: build them with `cargo xtask build-ebpf`");
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The licence the kernel reads from the object: GPL-compatible, so that the
// verifier lets the programs call GPL-only helpers should they need one (none
// today: prog_test_run loads them either way). The source is MIT OR
// Apache-2.0 like the workspace; MIT lets the object be offered under the GPL
// as well.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
