//! Every map and load-time global of the data plane, in one place.
//! Layouts live in `lb-common`; sizes marked "set at load" are overridden by
//! the agent from its config.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityState, Backend, DEFAULT_CONNTRACK_SIZE, DEFAULT_RING_SIZE, DEFAULT_UDP_IDLE_TIMEOUT_S,
    FlowKey, FlowState, GLOBAL_COUNTER_COUNT, MAX_BACKENDS, MAX_VIPS, TrafficCounters, VipAddressKey, VipInfo, VipKey,
};

/// Maglev lookup-table size of every VIP (set at load).
#[unsafe(no_mangle)]
static RING_SIZE: u32 = DEFAULT_RING_SIZE;

/// Idle time after which a UDP flow is scheduled afresh (set at load).
#[unsafe(no_mangle)]
static UDP_IDLE_TIMEOUT_NS: u64 = DEFAULT_UDP_IDLE_TIMEOUT_S * 1_000_000_000;

#[inline(always)]
pub fn ring_size() -> u32 {
    // Volatile so the compiler does not fold the default in: the loader
    // rewrites the value in .rodata before the program is verified.
    unsafe { core::ptr::read_volatile(&RING_SIZE) }
}

#[inline(always)]
pub fn udp_idle_timeout_ns() -> u64 {
    unsafe { core::ptr::read_volatile(&UDP_IDLE_TIMEOUT_NS) }
}

#[map]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// How many port-0 (wildcard) VIPs exist: while none do, traffic that
/// misses the exact VIP lookup skips the wildcard lookup (one inlined array
/// read instead of a hash lookup on the non-VIP path).
#[map]
pub static WILDCARD_VIPS: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static VIP_ADDRESSES: HashMap<VipAddressKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// All VIPs' Maglev tables back to back: slot `s` of VIP `v` is at
/// `v * RING_SIZE + s` and holds a backend id (size set at load).
#[map]
pub static RINGS: Array<u32> = Array::with_max_entries(DEFAULT_RING_SIZE, 0);

#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Five-tuple → pinned backend. One table shared by all CPUs (a flow may be
/// seen on several), with per-CPU LRU lists so inserts take no global lock.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);

/// Interfaces that XDP_REDIRECT may send to, keyed by ifindex.
#[map]
pub static EGRESS_DEVICES: DevMapHash = DevMapHash::with_max_entries(64, 0);

#[map]
pub static VIP_COUNTERS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map]
pub static BACKEND_COUNTERS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static GLOBAL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_COUNTER_COUNT, 0);

/// Client affinity (persistence): (VIP, client address) → backend. Same
/// capacity as the connection table (set at load).
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);

/// Per-CPU position in each SEQUENCE VIP's slot sequence: no shared cursor,
/// no lock, no cache line bouncing between CPUs.
#[map]
pub static CURSORS: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Active flows per backend of least_conn VIPs, shared by all CPUs and
/// changed with atomic adds (only on new and finished flows).
#[map]
pub static ACTIVE_FLOWS: Array<u64> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Written by the agent only: the difference between what its
/// connection-table scan counts and `ACTIVE_FLOWS` (which cannot see LRU
/// evictions or idle expiry).
#[map]
pub static ACTIVE_CORRECTION: Array<i64> = Array::with_max_entries(MAX_BACKENDS, 0);
