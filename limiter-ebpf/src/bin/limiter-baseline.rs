//! Reference programs for benchmarks: the cheapest possible XDP programs, to
//! measure the limiter's per-packet cost against in the same run.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {

    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

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

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}
