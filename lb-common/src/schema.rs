//! The data plane's maps, declared once. `for_each_map!` holds the one
//! table (name, kind, key, value, capacity, flags, pinned); the XDP program
//! expands it into its `#[map]` statics (`lb-ebpf/src/maps.rs`) and this
//! crate into `MAP_SPECS`, which the agent's loader, pin checks and
//! adoption read. Adding a map is one line here (plus `LAYOUT_VERSION`).

/// How many entries a map has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// Fixed at build time.
    Fixed,
    /// `[agent] conntrack_size`.
    Conntrack,
    /// `[agent] ring_size` × `max_services` slots, `SLOTS_PER_ELEMENT` to
    /// an entry.
    Rings,
    /// `[agent] nat_table_size` while a NAT service exists, else
    /// `UNUSED_TABLE_ENTRIES`.
    Nat,
    /// `[agent] conntrack_size` while a service has persistence, else
    /// `UNUSED_TABLE_ENTRIES`.
    Affinity,
    /// `[agent] conntrack_size / HALF_OPEN_SHARE`, at least `MIN_HALF_OPEN_SIZE`.
    HalfOpen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    HashMap,
    LruHashMap,
    Array,
    PerCpuArray,
    DevMapHash,
    /// A BPF ring buffer: its capacity is in bytes.
    RingBuf,
}

/// One map of the data plane, as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: MapKind,
    pub key_size: usize,
    pub value_size: usize,
    pub capacity: Capacity,
    /// Entries as built; `Conntrack` and `Rings` maps are resized at load.
    pub default_entries: u32,
    pub flags: u32,
    /// Holds state that outlives the agent: pinned under its pin directory.
    pub pinned: bool,
}

/// Calls `$callback!` with the table of every map. Array keys are `u32`.
#[macro_export]
macro_rules! for_each_map {
    ($callback:ident) => {
        $callback! {
            VIPS: HashMap<$crate::VipKey, $crate::VipInfo>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, pinned;
            /// How many port-0 (wildcard) VIPs exist: while none do, traffic
            /// that misses the exact VIP lookup skips the wildcard lookup.
            WILDCARD_VIPS: Array<u32, u32>,
                Fixed(1), $crate::BPF_F_NO_FLAGS, pinned;
            /// Addresses that host at least one VIP (for packets without ports).
            VIP_ADDRESSES: HashMap<$crate::VipAddressKey, u32>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, pinned;
            /// All VIPs' slot tables back to back (Maglev table, sequence or
            /// candidates, by scheduler): slot `s` of VIP `v` is backend id
            /// number `v * RING_SIZE + s`, 16 bits each, `SLOTS_PER_ELEMENT`
            /// to an element. Mappable: the agent writes whole tables in place.
            RING_SLOTS: Array<u32, [u16; 4]>,
                Rings($crate::DEFAULT_RING_SIZE), $crate::BPF_F_MMAPABLE, pinned;
            BACKENDS: Array<u32, $crate::Backend>,
                Fixed($crate::MAX_BACKENDS), $crate::BPF_F_NO_FLAGS, pinned;
            /// Five-tuple → pinned backend. One table shared by all CPUs (a flow
            /// may be seen on several), common LRU (`FLOW_TABLE_FLAGS`).
            CONNTRACK: LruHashMap<$crate::FlowKey, $crate::FlowState>,
                Conntrack($crate::DEFAULT_CONNTRACK_SIZE), $crate::FLOW_TABLE_FLAGS, pinned;
            /// Five-tuple → backend of a TCP flow that has only sent its SYN. A SYN
            /// never writes `CONNTRACK`, so no flood of them can evict an
            /// established flow; the client's ACK moves its entry there.
            HALF_OPEN: LruHashMap<$crate::FlowKey, $crate::FlowState>,
                HalfOpen($crate::MIN_HALF_OPEN_SIZE), $crate::FLOW_TABLE_FLAGS, pinned;
            /// Per CPU: SYNs in the current one-second window (flood detection).
            SYN_RATE: PerCpuArray<u32, $crate::SynRate>,
                Fixed(1), $crate::BPF_F_NO_FLAGS, private;
            /// Interfaces that XDP_REDIRECT may send to, keyed by ifindex.
            EGRESS_DEVICES: DevMapHash<u32, $crate::DevmapValue>,
                Fixed($crate::MAX_EGRESS_DEVICES), $crate::BPF_F_NO_FLAGS, pinned;
            VIP_COUNTERS: PerCpuArray<u32, $crate::TrafficCounters>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, pinned;
            BACKEND_COUNTERS: PerCpuArray<u32, $crate::TrafficCounters>,
                Fixed($crate::MAX_BACKENDS), $crate::BPF_F_NO_FLAGS, pinned;
            GLOBAL_COUNTERS: PerCpuArray<u32, u64>,
                Fixed($crate::GLOBAL_COUNTER_SLOTS), $crate::BPF_F_NO_FLAGS, pinned;
            /// Client affinity (persistence): (VIP, client address) → backend.
            AFFINITY: LruHashMap<$crate::AffinityKey, $crate::AffinityState>,
                Affinity($crate::DEFAULT_CONNTRACK_SIZE), $crate::FLOW_TABLE_FLAGS, pinned;
            /// Per-CPU position in each SEQUENCE VIP's slot sequence: no shared
            /// cursor, no lock, no cache line bouncing between CPUs.
            CURSORS: PerCpuArray<u32, u32>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, pinned;
            /// Active flows per backend of least_conn VIPs, shared by all CPUs
            /// and changed with atomic adds (only on new and finished flows).
            ACTIVE_FLOWS: Array<u32, u64>,
                Fixed($crate::MAX_BACKENDS), $crate::BPF_F_NO_FLAGS, pinned;
            /// Per least_conn VIP (VIP id): its candidates and their weights, in
            /// one value (the ring's first `seq_len` slots name the same ids).
            /// Not pinned: every agent writes it before its program attaches.
            LEAST_CONN_CANDIDATES: Array<u32, $crate::LeastConnCandidates>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, private;
            /// Written by the agent only: its connection-table scan's count minus
            /// `ACTIVE_FLOWS` (which cannot see LRU evictions or idle expiry).
            ACTIVE_CORRECTION: Array<u32, i64>,
                Fixed($crate::MAX_BACKENDS), $crate::BPF_F_NO_FLAGS, pinned;
            /// How many NAT services exist: while none do, traffic that is not
            /// for a VIP skips the reply lookup.
            NAT_SERVICES: Array<u32, u32>,
                Fixed(1), $crate::BPF_F_NO_FLAGS, pinned;
            /// Per NAT service (VIP id): source addresses, port pool, flags.
            NAT_POOLS: Array<u32, $crate::NatPool>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, pinned;
            /// Client five-tuple → translation. Not LRU: a translation is never
            /// dropped while its flow lives; the agent removes ended flows.
            NAT_FLOWS: HashMap<$crate::FlowKey, $crate::NatFlow>,
                Nat($crate::DEFAULT_NAT_TABLE_SIZE), $crate::BPF_F_NO_FLAGS, pinned;
            /// Reply five-tuple (backend → NAT source) → client and VIP. Its keys
            /// are the allocated ports: an insert that fails because the key
            /// exists is what keeps two flows off one translation.
            NAT_REPLIES: HashMap<$crate::FlowKey, $crate::NatReply>,
                Nat($crate::DEFAULT_NAT_TABLE_SIZE), $crate::BPF_F_NO_FLAGS, pinned;
            /// Per-CPU scratch space of the NAT paths (nothing survives a packet).
            NAT_SCRATCH: PerCpuArray<u32, $crate::NatScratch>,
                Fixed(1), $crate::BPF_F_NO_FLAGS, private;
            /// Per-CPU cache of the coarse clock, refreshed when jiffies move
            /// (see lb-ebpf's `clock`).
            CLOCK: PerCpuArray<u32, $crate::ClockReading>,
                Fixed(1), $crate::BPF_F_NO_FLAGS, private;
            /// New flows refused per NAT service (VIP id): no free source port.
            NAT_EXHAUSTED: PerCpuArray<u32, u64>,
                Fixed($crate::MAX_VIPS), $crate::BPF_F_NO_FLAGS, pinned;
            /// `FlowEvent`s: flows pinned to a backend, for the agent to send to
            /// its peers (connection-table sync; written only while sync is on).
            /// Its capacity is in bytes. Pinned, so that every program the
            /// agent swaps in writes the ring it reads.
            FLOW_EVENTS: RingBuf<(), ()>,
                Fixed($crate::FLOW_EVENTS_BYTES), $crate::BPF_F_NO_FLAGS, pinned;
        }
    };
}

macro_rules! map_specs {
    ($( $(#[$doc:meta])* $name:ident : $kind:ident < $key:ty , $value:ty > ,
        $capacity:ident ( $entries:expr ) , $flags:expr , $pin:ident ; )*) => {
        /// Every map of the data plane, in declaration order.
        pub const MAP_SPECS: &[MapSpec] = &[$(MapSpec {
            name: stringify!($name),
            kind: MapKind::$kind,
            key_size: core::mem::size_of::<$key>(),
            value_size: core::mem::size_of::<$value>(),
            capacity: Capacity::$capacity,
            default_entries: $entries,
            flags: $flags,
            pinned: map_specs!(@pinned $pin),
        }),*];

        /// The maps' names as the object file holds them.
        pub mod map_names {
            $(pub const $name: &str = stringify!($name);)*
        }
    };
    (@pinned pinned) => { true };
    (@pinned private) => { false };
}

for_each_map!(map_specs);

/// The spec of the map called `name`.
pub fn map_spec(name: &str) -> Option<&'static MapSpec> {
    MAP_SPECS.iter().find(|spec| spec.name == name)
}

/// Names of the program and its load-time globals in the object file.
pub mod names {
    pub const PROGRAM: &str = "xdplb";
    /// The tc egress program that tunnels health probes.
    pub const PROBE_PROGRAM: &str = "xdplb_probe";
    /// aya-log's level global: 0 (off) lets the verifier prune all logging.
    pub const GLOBAL_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
    pub const GLOBAL_RING_SIZE: &str = "RING_SIZE";
    pub const GLOBAL_UDP_IDLE_TIMEOUT_NS: &str = "UDP_IDLE_TIMEOUT_NS";
    pub const GLOBAL_SYN_FLOOD_THRESHOLD: &str = "SYN_FLOOD_THRESHOLD";
    pub const GLOBAL_SYNC_FLOWS: &str = "SYNC_FLOWS";
}
