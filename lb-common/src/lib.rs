//! Layouts shared by the XDP program (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is defined here once, `#[repr(C)]` with explicit
//! padding so both sides agree byte for byte. Addresses are stored in network
//! byte order exactly as they appear on the wire; an IPv4 address occupies the
//! first word of a `[u32; 4]` and the rest is zero.
#![no_std]

/// Version of every layout in this file, as pinned maps hold them. Bump it
/// with any change to a map's key or value type (the size test below is a
/// reminder): an agent refuses to adopt pinned maps of another version.
pub const LAYOUT_VERSION: u32 = 3;

/// Upper bound on services (VIPs); sizes the VIP and per-VIP counter maps.
pub const MAX_VIPS: u32 = 1024;
/// Upper bound on backend slots. Id 0 is reserved as "no backend".
pub const MAX_BACKENDS: u32 = 4096;
/// Default Maglev lookup-table size per VIP (prime, as Maglev requires).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of the connection table.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 524_288;
/// Default idle timeout of a UDP flow in the connection table.
pub const DEFAULT_UDP_IDLE_TIMEOUT_S: u64 = 30;
/// The data plane refreshes a flow's `last_seen_ns` at most this often, so an
/// established flow does not write its table entry on every packet.
pub const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

/// Backend id meaning "no backend"; an empty ring slot holds it.
pub const NO_BACKEND: u32 = 0;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps and globals in the eBPF object, used by the loader.
pub mod names {
    pub const PROGRAM: &str = "xdplb";
    pub const VIPS: &str = "VIPS";
    pub const VIP_ADDRESSES: &str = "VIP_ADDRESSES";
    pub const RINGS: &str = "RINGS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const EGRESS_DEVICES: &str = "EGRESS_DEVICES";
    pub const VIP_COUNTERS: &str = "VIP_COUNTERS";
    pub const BACKEND_COUNTERS: &str = "BACKEND_COUNTERS";
    pub const GLOBAL_COUNTERS: &str = "GLOBAL_COUNTERS";
    /// The maps that hold state, pinned under the agent's pin directory.
    pub const PINNED_MAPS: [&str; 14] = [
        VIPS,
        VIP_ADDRESSES,
        RINGS,
        BACKENDS,
        CONNTRACK,
        EGRESS_DEVICES,
        VIP_COUNTERS,
        BACKEND_COUNTERS,
        GLOBAL_COUNTERS,
        AFFINITY,
        CURSORS,
        ACTIVE_FLOWS,
        ACTIVE_FLOWS_CORRECTION,
        WILDCARD_VIPS,
    ];
    pub const WILDCARD_VIPS: &str = "WILDCARD_VIPS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const CURSORS: &str = "CURSORS";
    pub const ACTIVE_FLOWS: &str = "ACTIVE_FLOWS";
    pub const ACTIVE_FLOWS_CORRECTION: &str = "ACTIVE_CORRECTION";
    /// aya-log's level global: 0 (off) lets the verifier prune all logging.
    pub const GLOBAL_LOG_LEVEL: &str = "AYA_LOG_LEVEL";
    pub const GLOBAL_RING_SIZE: &str = "RING_SIZE";
    pub const GLOBAL_UDP_IDLE_TIMEOUT_NS: &str = "UDP_IDLE_TIMEOUT_NS";
}

/// Key of the `VIPS` map: (address, port, protocol). Port 0 is the wildcard
/// VIP that matches every port of that address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// How a VIP picks the backend of a new flow. What its region of `RINGS`
/// holds depends on it.
pub mod scheduler {
    /// Maglev table, five-tuple hash (maglev; least_response_time, whose
    /// weights the agent derives from latency).
    pub const MAGLEV: u32 = 0;
    /// A smooth weighted sequence of `seq_len` ids, walked by a per-CPU
    /// cursor (round_robin, weighted_round_robin).
    pub const SEQUENCE: u32 = 1;
    /// Maglev table, slot drawn at random: weighted random.
    pub const RANDOM: u32 = 2;
    /// Maglev table, hash of the client address only.
    pub const SOURCE_HASH: u32 = 3;
    /// `seq_len` candidate ids; the one with the fewest active flows per
    /// unit of weight wins.
    pub const LEAST_CONN: u32 = 4;
}

/// Most candidates a least_conn VIP scans per new flow.
pub const MAX_LEAST_CONN_CANDIDATES: u32 = 32;

/// Value of the `VIPS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index of this VIP's ring in `RINGS` and of its counters.
    pub id: u32,
    pub flags: u32,
    /// One of `scheduler::*`.
    pub scheduler: u32,
    /// Entries of the sequence or candidate list (SEQUENCE, LEAST_CONN).
    pub seq_len: u32,
    /// Client affinity: a new flow from a client seen within this time goes
    /// to the same backend. 0 = off.
    pub persistence_timeout_ns: u64,
}

/// Key of the `AFFINITY` map (persistence).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u32; 4],
    pub vip_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of the `AFFINITY` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityState {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_seen_ns: u64,
}

/// Key of the `VIP_ADDRESSES` map: an address that hosts at least one VIP.
/// Consulted only for packets that cannot be classified by port (fragments,
/// IPv6 extension headers), to drop those instead of passing them on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipAddressKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The backend slot is in use; a cleared slot is never selected.
pub const BACKEND_F_IN_USE: u8 = 1;
/// The backend failed its health checks: flows pinned to it are scheduled
/// afresh on their next packet (the agent sets this only when the service
/// reschedules on failure).
pub const BACKEND_F_DOWN: u8 = 2;
/// The backend takes new flows (it is in its VIP's ring, sequence or
/// candidate list). Client affinity only holds while this is set.
pub const BACKEND_F_ELIGIBLE: u8 = 4;

/// The client has sent FIN or RST: the flow is ending and no longer counts as
/// active (its entry stays for the last packets).
pub const FLOW_F_FINISHED: u32 = 1;

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    pub family: u8,
    pub flags: u8,
    /// Weight, for least_conn (active flows per unit of weight).
    pub weight: u16,
    /// Interface the frame leaves by. Equal to the ingress interface means
    /// XDP_TX; otherwise XDP_REDIRECT through `EGRESS_DEVICES`.
    pub ifindex: u32,
    /// The backend's MAC (or its next hop's), from the neighbour table.
    pub dst_mac: [u8; 6],
    /// The egress interface's own MAC.
    pub src_mac: [u8; 6],
    /// The VIP (service) this slot belongs to, so that a restarted agent can
    /// tell which service's backend a pinned slot is.
    pub vip_id: u32,
}

/// Key of the connection table: the packet's five-tuple as seen on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of the connection table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    pub backend_id: u32,
    pub flags: u32,
    /// `bpf_ktime_get_ns` when the flow was last seen (refreshed at most once
    /// per `LAST_SEEN_REFRESH_NS`).
    pub last_seen_ns: u64,
}

/// Per-VIP and per-backend traffic counters (per CPU; readers sum them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Indexes of the `GLOBAL_COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GlobalCounter {
    /// Not addressed to a VIP: passed to the kernel untouched.
    PassNonVip = 0,
    /// Could not be parsed (truncated, unknown ethertype): passed to the kernel.
    PassUnparsed,
    /// IPv4 fragment addressed to a VIP address: dropped.
    DropFragment,
    /// IPv6 packet with extension headers addressed to a VIP address: dropped.
    DropIpv6ExtHeader,
    /// The VIP's ring is empty or points at an unused backend slot: dropped.
    DropNoBackend,
    /// The egress device is missing from `EGRESS_DEVICES`: dropped.
    DropNoEgressDevice,
    ConntrackHit,
    ConntrackMiss,
    ConntrackInsertFailed,
    ActionTx,
    ActionRedirect,
    /// A new flow followed its client's affinity (persistence).
    AffinityHit,
}

pub const GLOBAL_COUNTER_COUNT: u32 = GlobalCounter::AffinityHit as u32 + 1;

impl GlobalCounter {
    pub const ALL: [GlobalCounter; GLOBAL_COUNTER_COUNT as usize] = [
        GlobalCounter::PassNonVip,
        GlobalCounter::PassUnparsed,
        GlobalCounter::DropFragment,
        GlobalCounter::DropIpv6ExtHeader,
        GlobalCounter::DropNoBackend,
        GlobalCounter::DropNoEgressDevice,
        GlobalCounter::ConntrackHit,
        GlobalCounter::ConntrackMiss,
        GlobalCounter::ConntrackInsertFailed,
        GlobalCounter::ActionTx,
        GlobalCounter::ActionRedirect,
        GlobalCounter::AffinityHit,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            GlobalCounter::PassNonVip => "pass_non_vip",
            GlobalCounter::PassUnparsed => "pass_unparsed",
            GlobalCounter::DropFragment => "drop_fragment",
            GlobalCounter::DropIpv6ExtHeader => "drop_ipv6_ext_header",
            GlobalCounter::DropNoBackend => "drop_no_backend",
            GlobalCounter::DropNoEgressDevice => "drop_no_egress_device",
            GlobalCounter::ConntrackHit => "conntrack_hit",
            GlobalCounter::ConntrackMiss => "conntrack_miss",
            GlobalCounter::ConntrackInsertFailed => "conntrack_insert_failed",
            GlobalCounter::ActionTx => "action_tx",
            GlobalCounter::ActionRedirect => "action_redirect",
            GlobalCounter::AffinityHit => "affinity_hit",
        }
    }
}

/// Hash of a five-tuple, used to pick a Maglev slot. MurmurHash3's x86_32
/// mixing over the key's ten words: cheap in BPF (no loops over bytes) and
/// well spread modulo a prime ring size.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = (key.sport as u32) << 16 | key.dport as u32;
    let mut h: u32 = 0x7864_706c ^ key.proto as u32; // "xdpl"
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, ports);
    fmix32(h ^ 36)
}

/// Hash of a client address alone (source_hash scheduling, affinity).
#[inline(always)]
pub fn source_hash(addr: &[u32; 4]) -> u32 {
    let mut h: u32 = 0x7372_6368; // "srch"
    h = mix(h, addr[0]);
    h = mix(h, addr[1]);
    h = mix(h, addr[2]);
    h = mix(h, addr[3]);
    fmix32(h ^ 16)
}

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and byte
    // arrays, and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipAddressKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityState>(), 16);
        assert_eq!(size_of::<VipAddressKey>(), 20);
        // Changing any of these changes what pinned maps hold: bump LAYOUT_VERSION.
        assert_eq!(size_of::<Backend>(), 40);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowState>(), 16);
        assert_eq!(size_of::<TrafficCounters>(), 24);
    }

    #[test]
    fn flow_hash_spreads_neighbouring_ports() {
        // Ports that differ in one bit must land in different buckets of a
        // small prime table most of the time.
        let mut buckets = [0u32; 13];
        for port in 0..1300u16 {
            let key = FlowKey {
                src: [0x0100_12c6, 0, 0, 0],
                dst: [0x6400_12c6, 0, 0, 0],
                sport: port.to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_IPV4,
                _pad: [0; 2],
            };
            buckets[(flow_hash(&key) % 13) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((70..=130).contains(n), "bucket {i} holds {n} of 1300");
        }
    }

    #[test]
    fn global_counter_table_is_complete() {
        for (i, c) in GlobalCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
