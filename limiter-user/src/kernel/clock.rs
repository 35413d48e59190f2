//! Block expiries live in the kernel as `CLOCK_MONOTONIC` nanoseconds (what
//! `bpf_ktime_get_coarse_ns` reads, at tick resolution: the cheapest clock a
//! BPF program has); operators and the state file think in wall time. The
//! conversions go through "now" on both clocks.

use std::time::{Duration, SystemTime};

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn mono_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The monotonic-clock time of a wall-clock instant (saturating at the ends; an
/// instant already past maps to 1 ns, i.e. expired, never to 0 = "never").
pub fn system_to_mono_ns(at: SystemTime) -> u64 {
    let (now_sys, now_mono) = (SystemTime::now(), mono_now_ns());
    let ns = match at.duration_since(now_sys) {
        Ok(ahead) => now_mono.saturating_add(ahead.as_nanos().min(u64::MAX as u128) as u64),
        Err(behind) => {
            now_mono.saturating_sub(behind.duration().as_nanos().min(u64::MAX as u128) as u64)
        }
    };
    ns.max(1)
}

/// The wall-clock time of a monotonic-clock instant.
pub fn mono_ns_to_system(mono_ns: u64) -> SystemTime {
    let (now_sys, now_mono) = (SystemTime::now(), mono_now_ns());
    if mono_ns >= now_mono {
        now_sys + Duration::from_nanos(mono_ns - now_mono)
    } else {
        now_sys - Duration::from_nanos(now_mono - mono_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_within_a_millisecond() {
        let at = SystemTime::now() + Duration::from_secs(3600);
        let back = mono_ns_to_system(system_to_mono_ns(at));
        let diff = back.duration_since(at).unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_millis(1), "{diff:?}");
    }

    #[test]
    fn the_past_is_expired_not_never() {
        assert_eq!(system_to_mono_ns(SystemTime::UNIX_EPOCH), 1);
    }
}
