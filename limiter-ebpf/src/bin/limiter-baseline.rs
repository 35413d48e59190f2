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
        btf_maps::{Array, HashMap},
        helpers::{bpf_ktime_get_ns, bpf_redirect},
        macros::{btf_map, xdp},
        programs::XdpContext,
    };

    /// The interface `bench_redirect` sends every frame to (an ifindex in
    /// the namespace of the thread that runs it); set by userspace.
    #[btf_map]
    static REDIRECT_TO: Array<u32, 1> = Array::new();

    /// The generator's pace: `[0]` the nanoseconds between two frames (0:
    /// as fast as it can), `[1]` when the next frame is due (`ktime`). Set
    /// by userspace; the generator runs on one CPU, so plain stores do.
    #[btf_map]
    static PACE: Array<u64, 2> = Array::new();

    /// How far the generator may fall behind its pace before it stops
    /// catching up (it then restarts the schedule from now).
    const PACE_SLACK_NS: u64 = 100_000;
    /// At most this many clock reads per frame while waiting (a bound the
    /// verifier needs; tens of microseconds, far above any pace used).
    const PACE_SPINS: u32 = 4096;

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

    /// Sources `baseline_lookup` looks up (left empty: every lookup misses).
    #[btf_map]
    static SOURCES: HashMap<u32, u32, 1024> = HashMap::new();

    /// Reads the IPv4 source, looks it up in a hash map and drops: the
    /// floor of a blocklist (one hash lookup, the product's first step).
    #[xdp]
    pub fn baseline_lookup(ctx: XdpContext) -> u32 {
        const SOURCE_END: usize = 14 + 16;
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + SOURCE_END > end {
            return xdp_action::XDP_PASS;
        }
        // SAFETY: bounds-checked just above.
        let source = unsafe { core::ptr::read_unaligned((start + 26) as *const u32) };
        // SAFETY: a value of a plain-integer map, only compared.
        match unsafe { SOURCES.get(&source) } {
            Some(&pass) if pass != 0 => xdp_action::XDP_PASS,
            _ => xdp_action::XDP_DROP,
        }
    }

    /// The generator of `syn-bench`: run by `BPF_PROG_TEST_RUN` with
    /// `BPF_F_TEST_XDP_LIVE_FRAMES` and a fixed repeat count, it sends each
    /// test frame out of the interface in `REDIRECT_TO` (a veth, whose peer
    /// receives it like a frame from a NIC ring). Aborts when none is set.
    #[xdp]
    pub fn bench_redirect(_ctx: XdpContext) -> u32 {
        redirect()
    }

    /// `bench_redirect` held to the pace in `PACE` (`syn-bench --gen-rate`).
    /// A program of its own so that the unpaced generator does not pay for
    /// the pacing's map lookups.
    #[xdp]
    pub fn bench_redirect_paced(_ctx: XdpContext) -> u32 {
        pace();
        redirect()
    }

    /// Sends the frame out of the interface in `REDIRECT_TO`.
    #[inline(always)]
    fn redirect() -> u32 {
        match REDIRECT_TO.get(0) {
            Some(&ifindex) if ifindex != 0 => {
                // SAFETY: a helper call with plain integer arguments.
                unsafe { bpf_redirect(ifindex, 0) as u32 }
            }
            _ => xdp_action::XDP_ABORTED,
        }
    }

    /// Waits until this frame is due when `PACE` sets an interval: frames
    /// leave evenly spaced instead of as fast as the CPU can redirect them.
    #[inline(always)]
    fn pace() {
        let (Some(&interval), Some(due)) = (PACE.get(0), PACE.get_ptr_mut(1)) else {
            return;
        };
        if interval == 0 {
            return;
        }
        // SAFETY: a pointer into a map value; one generator at a time.
        let due = unsafe { &mut *due };
        // SAFETY: helper calls without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        if now > *due + PACE_SLACK_NS {
            *due = now;
        }
        let mut spins = 0;
        while spins < PACE_SPINS && unsafe { bpf_ktime_get_ns() } < *due {
            spins += 1;
        }
        *due += interval;
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}
