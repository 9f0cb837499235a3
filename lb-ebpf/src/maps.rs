//! Every map and load-time global of the data plane. The maps come from the
//! one schema in `lb_common::for_each_map!`; layouts live in `lb-common`.
//! Capacities marked `Conntrack` or `Rings` there are set by the agent at
//! load from its config.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{DEFAULT_RING_SIZE, DEFAULT_SYN_FLOOD_THRESHOLD, DEFAULT_UDP_IDLE_TIMEOUT_S, NS_PER_SEC};

/// Maglev lookup-table size of every VIP (set at load).
#[unsafe(no_mangle)]
static RING_SIZE: u32 = DEFAULT_RING_SIZE;

/// Idle time after which a UDP flow is scheduled afresh (set at load).
#[unsafe(no_mangle)]
static UDP_IDLE_TIMEOUT_NS: u64 = DEFAULT_UDP_IDLE_TIMEOUT_S * NS_PER_SEC;

/// New SYNs per second on one CPU above which it counts as flooded; 0:
/// never (set at load).
#[unsafe(no_mangle)]
static SYN_FLOOD_THRESHOLD: u64 = DEFAULT_SYN_FLOOD_THRESHOLD;

#[inline(always)]
pub fn ring_size() -> u32 {
    // SAFETY: a plain read of a static. Volatile so the compiler does not
    // fold the default in: the loader rewrites .rodata before verification.
    unsafe { core::ptr::read_volatile(&RING_SIZE) }
}

#[inline(always)]
pub fn udp_idle_timeout_ns() -> u64 {
    // SAFETY: as in `ring_size`.
    unsafe { core::ptr::read_volatile(&UDP_IDLE_TIMEOUT_NS) }
}

#[inline(always)]
pub fn syn_flood_threshold() -> u64 {
    // SAFETY: as in `ring_size`.
    unsafe { core::ptr::read_volatile(&SYN_FLOOD_THRESHOLD) }
}

/// Pinned flows are reported to the agent for connection-table sync (set
/// at load when `[sync]` is configured).
#[unsafe(no_mangle)]
static SYNC_FLOWS: u32 = 0;

#[inline(always)]
pub fn sync_flows() -> bool {
    // SAFETY: as in `ring_size`.
    unsafe { core::ptr::read_volatile(&SYNC_FLOWS) != 0 }
}

/// The aya-ebpf type of a schema entry (arrays are keyed by `u32`).
macro_rules! map_type {
    (HashMap, $key:ty, $value:ty) => { HashMap<$key, $value> };
    (LruHashMap, $key:ty, $value:ty) => { LruHashMap<$key, $value> };
    (Array, $key:ty, $value:ty) => { Array<$value> };
    (PerCpuArray, $key:ty, $value:ty) => { PerCpuArray<$value> };
    (DevMapHash, $key:ty, $value:ty) => { DevMapHash };
    (RingBuf, $key:ty, $value:ty) => { RingBuf };
}

/// A schema entry's constructor (a ring buffer's capacity is in bytes).
macro_rules! new_map {
    (RingBuf, $key:ty, $value:ty, $entries:expr, $flags:expr) => {
        RingBuf::with_byte_size($entries, $flags)
    };
    ($kind:ident, $key:ty, $value:ty, $entries:expr, $flags:expr) => {
        <map_type!($kind, $key, $value)>::with_max_entries($entries, $flags)
    };
}

macro_rules! declare_maps {
    ($( $(#[$doc:meta])* $name:ident : $kind:ident < $key:ty , $value:ty > ,
        $capacity:ident ( $entries:expr ) , $flags:expr , $pin:ident ; )*) => {
        $(
            $(#[$doc])*
            #[map]
            pub static $name: map_type!($kind, $key, $value) = new_map!($kind, $key, $value, $entries, $flags);
        )*
    };
}

lb_common::for_each_map!(declare_maps);
