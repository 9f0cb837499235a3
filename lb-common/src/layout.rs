//! Map keys and values, `#[repr(C)]` with explicit padding so that the
//! XDP program and the agent agree byte for byte. Addresses are stored in
//! network byte order exactly as they appear on the wire; an IPv4 address
//! occupies the first word of a `[u32; 4]` and the rest is zero.

/// Key of the `VIPS` map: (address, port, protocol). Port 0 is the wildcard
/// VIP that matches every port of that address and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// What `find` finds for the VIP a packet to `port` reaches, looked up as
/// the data plane does: the exact port first, then the port-0 wildcard.
/// `port` is in the byte order `find` expects (0 reads the same in both).
pub fn exact_port_or_wildcard<T>(port: u16, mut find: impl FnMut(u16) -> Option<T>) -> Option<T> {
    find(port).or_else(|| find(0))
}

/// Value of the `VIPS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index of this VIP's ring in `RING_SLOTS` and of its counters.
    pub id: u32,
    /// `VIP_F_*`.
    pub flags: u32,
    /// One of `consts::scheduler::*`.
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

/// An address as a map key (the decapsulation program's local addresses).
pub type AddressKey = VipAddressKey;

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
    /// Outer source address of tunnelled packets, and NAT's source address
    /// when the service names none: the kernel's route source towards `addr`.
    pub tunnel_src: [u32; 4],
    /// How packets reach this backend: one of `consts::forwarding::*`.
    pub forwarding: u8,
    pub _pad: u8,
    /// GUE: the backend's decapsulation port, network byte order.
    pub gue_port: u16,
    /// MTU of the path to the backend (egress interface or route): a
    /// tunnelled packet that would exceed it is answered with "too big".
    pub mtu: u16,
    /// NAT: the backend's port, network byte order (0: the VIP's port).
    pub port: u16,
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

/// A flow the data plane pinned to a backend (`FLOW_EVENTS`), for
/// connection-table sync.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub flow: FlowKey,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Value of `LEAST_CONN_CANDIDATES`: a least_conn VIP's candidates (the
/// first `VipInfo::seq_len`), their backend ids and weights side by side.
/// A new flow's scan reads them in four cache lines, where reading each
/// candidate's ring slot and `BACKENDS` entry took two lookups and a cache
/// line per candidate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeastConnCandidates {
    pub ids: [u16; crate::MAX_LEAST_CONN_CANDIDATES as usize],
    /// 0: takes no new flows.
    pub weights: [u16; crate::MAX_LEAST_CONN_CANDIDATES as usize],
}

impl Default for LeastConnCandidates {
    fn default() -> Self {
        LeastConnCandidates {
            ids: [0; crate::MAX_LEAST_CONN_CANDIDATES as usize],
            weights: [0; crate::MAX_LEAST_CONN_CANDIDATES as usize],
        }
    }
}

/// Value of `CLOCK`: one CPU's last reading of the coarse clock and the
/// jiffies it was taken at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockReading {
    pub jiffies: u64,
    pub coarse_ns: u64,
}

/// Value of `SYN_RATE`: one CPU's SYNs in its current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynRate {
    pub window_start_ns: u64,
    pub syns: u64,
}

/// Value of `NAT_POOLS`, indexed by VIP id: how a NAT service translates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatPool {
    /// Source addresses new flows take, chosen by flow hash. With none, each
    /// backend's route source (`Backend::tunnel_src`) is used.
    pub sources: [[u32; 4]; crate::MAX_NAT_SOURCES],
    pub source_count: u32,
    /// `NAT_F_*`.
    pub flags: u32,
    /// First source port of the pool, host order.
    pub port_low: u16,
    /// The kernel's ephemeral ports inside the pool, left out: from here
    /// (host order), this many (0: none).
    pub skip_from: u16,
    /// Ports in the pool (`nat_source_ports`, less the skipped ones).
    pub port_count: u32,
    pub skip_len: u16,
    pub _pad: u16,
}

/// Value of `NAT_FLOWS`, keyed by the client's five-tuple: the translation
/// its packets get.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatFlow {
    /// Source address the backend sees (the client's, preserving the client).
    pub nat_addr: [u32; 4],
    /// Source port the backend sees, network byte order.
    pub nat_port: u16,
    pub _pad: u16,
    pub backend_id: u32,
    /// `FLOW_F_FINISHED` once FIN or RST was seen in either direction.
    pub flags: u32,
    pub _pad2: u32,
    pub last_seen_ns: u64,
}

/// Value of `NAT_REPLIES`, keyed by the five-tuple of the backend's replies
/// as they arrive (backend → NAT source): what they are rewritten back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReply {
    pub client: [u32; 4],
    pub vip: [u32; 4],
    /// Network byte order.
    pub client_port: u16,
    /// Network byte order.
    pub vip_port: u16,
    pub backend_id: u32,
    pub vip_id: u32,
    /// `FLOW_F_FINISHED` once FIN or RST was seen in either direction.
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// Per-CPU scratch space of the NAT paths (`NAT_SCRATCH`): what would not
/// fit the 512-byte stack that the program and its subprograms share.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug)]
pub struct NatScratch {
    pub key: FlowKey,
    pub reply: NatReply,
    pub flow: NatFlow,
    /// `struct bpf_fib_lookup` (64 bytes) for the reply's next hop.
    pub fib: [u8; 64],
    /// An ICMP error's outer source address.
    pub outer_src: [u32; 4],
}

impl Default for NatScratch {
    fn default() -> Self {
        Self {
            key: FlowKey::default(),
            reply: NatReply::default(),
            flow: NatFlow::default(),
            fib: [0; 64],
            outer_src: [0; 4],
        }
    }
}

/// Per-VIP and per-backend traffic counters (per CPU; readers sum them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Value of a DEVMAP_HASH (`struct bpf_devmap_val`): the egress ifindex and
/// an optional program to run there (unused).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevmapValue {
    pub ifindex: u32,
    pub program: u32,
}
