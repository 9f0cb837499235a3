//! The data plane's clock: `CLOCK_MONOTONIC_COARSE` in nanoseconds, as the
//! agent reads it, at the cost of a jiffies read.
//!
//! `bpf_ktime_get_coarse_ns` costs 34-40 ns per call here, `bpf_jiffies64`
//! 2-8 ns (the x86 JIT inlines it as one load); the benchmark's "where the
//! time goes" table measures both. The coarse clock only moves on a timer
//! tick, when jiffies move too; so each CPU keeps its last reading with the
//! jiffies it was taken at and reads the clock again only when jiffies
//! have moved: once per tick at most. A reading is then at most a tick or
//! two (a few ms) older than the clock's own, which the expiry times
//! (seconds) do not notice.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::CLOCK;

/// Nanoseconds of the coarse monotonic clock.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments or preconditions (also below).
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(reading) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's slot: no other CPU writes it.
    let reading = unsafe { &mut *reading };
    if reading.jiffies != jiffies || reading.coarse_ns == 0 {
        reading.coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
        reading.jiffies = jiffies;
    }
    reading.coarse_ns
}
