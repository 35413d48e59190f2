//! Reference programs for benchmarks: the cheapest possible XDP programs, to
//! measure the limiter's per-packet cost against in the same run, and the
//! traffic generator of `syn-bench` (`bench_redirect`).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {

    use aya_ebpf::{
        bindings::xdp_action,
        btf_maps::Array,
        helpers::bpf_redirect,
        macros::{btf_map, xdp},
        programs::XdpContext,
    };

    /// The interface `bench_redirect` sends every frame to (an ifindex in
    /// the namespace of the thread that runs it); set by userspace.
    #[btf_map]
    static REDIRECT_TO: Array<u32, 1> = Array::new();

    /// Does nothing: the floor of any XDP program that passes packets.
    #[xdp]
    pub fn baseline_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Drops everything: the floor of any XDP program that drops packets.
    #[xdp]
    pub fn baseline_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }

    /// Reads the IPv4 source address and drops: the floor of any program
    /// that judges a packet by its source (the frame's first cache line is
    /// touched, as every filter must).
    #[xdp]
    pub fn baseline_read(ctx: XdpContext) -> u32 {
        // Ethernet (14) + the IPv4 header up to the source address (16).
        const SOURCE_END: usize = 14 + 16;
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + SOURCE_END > end {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: bounds-checked just above.
        let source = unsafe { core::ptr::read_unaligned((start + 26) as *const u32) };
        if source == 0 {
            xdp_action::XDP_PASS
        } else {
            xdp_action::XDP_DROP
        }
    }

    /// The generator of `syn-bench`: run by `BPF_PROG_TEST_RUN` with
    /// `BPF_F_TEST_XDP_LIVE_FRAMES` and a fixed repeat count, it sends each
    /// test frame out of the interface in `REDIRECT_TO` (a veth, whose peer
    /// receives it like a frame from a NIC ring). Aborts when none is set.
    #[xdp]
    pub fn bench_redirect(_ctx: XdpContext) -> u32 {
        match REDIRECT_TO.get(0) {
            Some(&ifindex) if ifindex != 0 => {
                // SAFETY: a helper call with plain integer arguments.
                unsafe { bpf_redirect(ifindex, 0) as u32 }
            }
            _ => xdp_action::XDP_ABORTED,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}
