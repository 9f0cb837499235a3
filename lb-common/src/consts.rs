//! Every numeric constant of xdplb, named once (as Katran's
//! `balancer_consts.h`): the data plane and the agent both read them here.

/// Version of every layout in `layout`, as pinned maps hold them. Bump it
/// with any change to a pinned map's key, value or size, or to the meaning
/// of its slots (the size test is a reminder): an agent refuses to adopt
/// pinned maps of another version, so a bump costs users the connection
/// table on upgrade. A new map needs no bump (adoption creates it empty),
/// nor does a new global counter appended within `GLOBAL_COUNTER_SLOTS`.
pub const LAYOUT_VERSION: u32 = 7;

pub const NS_PER_SEC: u64 = 1_000_000_000;
pub const NS_PER_MS: u64 = 1_000_000;

// ---- Capacities ----

/// Upper bound on services (VIPs); sizes the VIP and per-VIP counter maps.
pub const MAX_VIPS: u32 = 1024;
/// Upper bound on backend slots. Id 0 is reserved as "no backend". Was
/// 4096: an upgraded agent copies the shorter pinned arrays into longer ones.
pub const MAX_BACKENDS: u32 = 16384;
/// `RING_SLOTS` holds backend ids as 16 bits, four to an array element
/// (the kernel rounds each element up to 8 bytes: a `u32` element took 8
/// bytes per slot, this takes 2).
pub const SLOTS_PER_ELEMENT: u32 = 4;
const _: () = assert!(MAX_BACKENDS <= u16::MAX as u32 + 1, "ring slots hold 16-bit backend ids");
/// Backends of one service (backend slots are shared by all services).
pub const MAX_BACKENDS_PER_SERVICE: usize = 10_000;
/// Interfaces XDP_REDIRECT may send to (`EGRESS_DEVICES`).
pub const MAX_EGRESS_DEVICES: u32 = 64;
/// Default Maglev lookup-table size per VIP (prime, as Maglev requires).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of the connection table (and of the affinity table).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 524_288;
/// The half-open table holds this fraction of the connection table's
/// entries (`conntrack_size / HALF_OPEN_SHARE`), at least
/// `MIN_HALF_OPEN_SIZE`: it only bridges a SYN and its ACK (one round trip),
/// so it churns fast and needs far fewer entries than established flows.
/// At the defaults, 65536 entries hold the handshakes of 0.3 s at 200,000
/// new connections per second (two CPUs just below the flood threshold,
/// above which hash-scheduled SYNs record nothing), for 7.5 MiB.
pub const HALF_OPEN_SHARE: u32 = 8;
pub const MIN_HALF_OPEN_SIZE: u32 = 1024;
/// Slots of the global counter array: room for counters added later
/// without resizing a pinned map (which would break hitless upgrades).
pub const GLOBAL_COUNTER_SLOTS: u32 = 64;
/// The last counter slot: only the upgrade-test variant of the program
/// (lb-ebpf-variant) counts there, every packet it sees, so a test can tell
/// which program runs.
pub const UPGRADE_VARIANT_COUNTER_SLOT: u32 = GLOBAL_COUNTER_SLOTS - 1;
/// Most candidates a least_conn VIP scans per new flow: program verification
/// takes about 0.34 s at 32, 0.53 s at 64.
pub const MAX_LEAST_CONN_CANDIDATES: u32 = 32;
/// Backend weights are 0..=MAX_WEIGHT; 0 takes no new flows.
pub const MAX_WEIGHT: u32 = 1000;

// ---- Flow timing ----

/// Default idle timeout of a UDP flow in the connection table.
pub const DEFAULT_UDP_IDLE_TIMEOUT_S: u64 = 30;
/// Default: a TCP flow silent this long no longer counts as active.
pub const DEFAULT_TCP_IDLE_TIMEOUT_S: u64 = 900;
/// The data plane refreshes a flow's `last_seen_ns` at most this often, so an
/// established flow does not write its table entry on every packet.
pub const LAST_SEEN_REFRESH_NS: u64 = NS_PER_SEC;
/// A SYN that finds its own half-open entry at most this long after the
/// first SYN is a retransmission and goes to the same backend. Linux
/// retransmits an unanswered SYN after 1, 3 and 7 s (initial RTO 1 s,
/// doubling), Windows after 3 and 9 s: 10 s covers the retransmissions that
/// matter for a connection still worth having, and is short enough that a
/// client reusing the five-tuple later is scheduled afresh.
pub const SYN_RETRANSMIT_WINDOW_NS: u64 = 10 * NS_PER_SEC;
/// Default SYN-flood threshold (`[agent] syn_flood_threshold`): new SYNs
/// per second on one CPU above which SYNs to hash-scheduled services stop
/// recording half-open entries (their backend follows from the hash alone,
/// so the client's ACK finds it again) and SYNs stop refreshing client
/// affinity. Established flows are never at stake: SYNs never write the
/// connection table.
pub const DEFAULT_SYN_FLOOD_THRESHOLD: u64 = 100_000;
/// Allowed `syn_flood_threshold` values; 0 turns flood detection off.
pub const SYN_FLOOD_THRESHOLD: core::ops::RangeInclusive<u64> = 0..=100_000_000;
/// A finished TCP flow may still see its last ACKs for this long: its
/// backend slot is not freed before.
pub const FINISHED_LINGER_NS: u64 = 10 * NS_PER_SEC;

// ---- Wire values ----

/// Backend id meaning "no backend"; an empty ring slot holds it.
pub const NO_BACKEND: u32 = 0;
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

// ---- Flags in map values ----

/// `Backend::flags`: the slot is in use; a cleared slot is never selected.
pub const BACKEND_F_IN_USE: u8 = 1;
/// `Backend::flags`: the backend failed its health checks: flows pinned to
/// it are scheduled afresh on their next packet (set only when the service
/// reschedules on failure).
pub const BACKEND_F_DOWN: u8 = 2;
/// `Backend::flags`: the backend takes new flows (it is in its VIP's ring,
/// sequence or candidate list). Client affinity only holds while this is set.
pub const BACKEND_F_ELIGIBLE: u8 = 4;

/// `FlowState::flags`: the client has sent FIN or RST: the flow is ending
/// and no longer counts as active (its entry stays for the last packets).
pub const FLOW_F_FINISHED: u32 = 1;
/// `FlowState::flags`: only the client's SYN has been seen (entries of the
/// half-open table carry it). A SYN retransmission within
/// `SYN_RETRANSMIT_WINDOW_NS` goes to the same backend; the client's ACK
/// moves the flow to the connection table.
pub const FLOW_F_HALF_OPEN: u32 = 2;
/// `NatFlow::flags`: a packet after the SYN (the client's ACK, or any
/// packet of a UDP flow) came: the translation pins the flow to its
/// backend, as a connection-table entry pins any other service's flow
/// (NAT flows have none), and its established packets take it alone
/// (`forward::nat::established`). Without it the translation is the SYN's
/// half-open record.
pub const NAT_FLOW_F_PINNED: u32 = 4;

/// `VipInfo::flags`: the service forwards by NAT, so its established
/// packets are looked up in `NAT_FLOWS` first.
pub const VIP_F_NAT: u32 = 1;
/// `VipInfo::flags`: every TCP flow the connection and half-open tables
/// pin for this service is on the backend its ring gives its five-tuple
/// (checked by the agent's table scan since the ring last changed; a hash
/// scheduler without client affinity). A SYN then goes to the ring's pick
/// without looking at the connection table, where any live flow of its
/// five-tuple would name the same backend (on a full table that lookup
/// costs about 200 ns, a third of the SYN's path). Set by the one writer,
/// cleared before the ring changes.
pub const VIP_F_PINS_FOLLOW_RING: u32 = 2;
/// `VipInfo::flags`: the service switched away from NAT and a retired NAT
/// slot of its VIP may still carry flows, which their translations pin: a
/// new-looking packet looks in `NAT_FLOWS` before it is scheduled. Without
/// it (every service that never was NAT, or whose NAT flows ended) that
/// miss is spared (about 180 ns a new flow in the throughput benchmark).
pub const VIP_F_NAT_FLOWS_LINGER: u32 = 4;

/// How a VIP picks the backend of a new flow (`VipInfo::scheduler`). What
/// its region of `RING_SLOTS` holds depends on it.
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

/// How a backend is reached (`Backend::forwarding`).
pub mod forwarding {
    /// L2 direct server return: only the MAC addresses change.
    pub const DSR: u8 = 0;
    /// IP-in-IP: IPv4 or IPv6 outer header (protocol 4 or 41 for the inner
    /// family), the backend's address as outer destination.
    pub const IPIP: u8 = 1;
    /// GUE variant 1: outer IP and UDP, the inner IP header right after.
    pub const GUE: u8 = 2;
    /// NAT: destination rewritten to the backend, source to one of the LB's
    /// addresses (full NAT) or kept (`NAT_F_PRESERVE_CLIENT`); replies come
    /// back through the LB and are rewritten to VIP → client.
    pub const NAT: u8 = 3;
}

// ---- NAT ----

/// Source addresses one NAT service may translate to (`nat_source`).
pub const MAX_NAT_SOURCES: usize = 8;
/// `NatPool::flags`: DNAT only; the backend sees the client's address and
/// must route its replies through the LB.
pub const NAT_F_PRESERVE_CLIENT: u32 = 1;
/// Entries of a table that no service uses (the affinity table without
/// persistence, the NAT tables without NAT services): it costs almost
/// nothing until the agent swaps in the full-size one at first use.
pub const UNUSED_TABLE_ENTRIES: u32 = 1;
/// Default capacity of each NAT table (`[agent] nat_table_size`): flows
/// translated at once, over all NAT services.
pub const DEFAULT_NAT_TABLE_SIZE: u32 = 262_144;
/// Default source-port pool of a NAT service (`nat_source_ports`).
pub const DEFAULT_NAT_PORT_LOW: u16 = 1024;
pub const DEFAULT_NAT_PORT_HIGH: u16 = 65535;
/// How long a NAT flow that saw FIN or RST keeps its translation once
/// silent (`[agent] nat_fin_linger_s`): long enough for the last ACKs.
pub const DEFAULT_NAT_FIN_LINGER_S: u64 = 10;

// ---- Tunnels ----

/// MTU assumed for an interface that does not report one.
pub const DEFAULT_LINK_MTU: u32 = 1500;
/// Addresses of one host the decapsulation program accepts tunnels for.
pub const MAX_DECAP_ADDRESSES: u32 = 256;
/// Default UDP port of GUE decapsulation on backends.
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// TTL / hop limit of outer headers.
pub const TUNNEL_TTL: u8 = 64;
/// GUE outer source ports are drawn from the flow hash within this range
/// (RFC 8086 §5.11: the ephemeral range, for RSS on the backends' NICs).
pub const GUE_SOURCE_PORT_MIN: u16 = 49152;
pub const GUE_SOURCE_PORT_SPAN: u32 = 16384;
/// Bytes of the offending packet an ICMP "too big" message quotes (its IP
/// header and the start of its TCP or UDP header: what the client's stack
/// needs to find the socket). A multiple of 4 for the checksum helper.
pub const TOO_BIG_QUOTE_LEN: usize = 64;
/// IPv6 links carry at least this (RFC 8200): a "too big" never reports less.
pub const IPV6_MIN_MTU: u16 = 1280;
/// IPv4's smallest MTU worth reporting (RFC 791's 68 is of no use to TCP).
pub const IPV4_MIN_REPORTED_MTU: u16 = 576;
/// Marks of the agent's tunnelled health probes: `PROBE_MARK | backend id`.
/// The tc egress program encapsulates packets carrying such a mark.
pub const PROBE_MARK: u32 = 0x786c_0000; // "xl"
pub const PROBE_MARK_MASK: u32 = 0xffff_0000;

/// Bytes of a frame the benchmarks' and tests' traffic generator restores
/// before sending it again: Ethernet, IPv4 and a TCP header.
pub const TRAFFICGEN_HEADER_LEN: usize = 14 + 20 + 20;

/// Map flags (uapi `BPF_F_*`), for the map schema.
pub const BPF_F_NO_FLAGS: u32 = 0;
/// The array can be mapped into the agent's memory (uapi `BPF_F_MMAPABLE`).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Per-CPU LRU lists (uapi `BPF_F_NO_COMMON_LRU`): xdplb's maps do not use
/// it (see `FLOW_TABLE_FLAGS`); the benchmark compares it.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// Flags of the LRU flow tables (connection, half-open, affinity): the
/// common LRU. Its inserts take a node from a per-CPU free list and only
/// touch the shared list in batches; with `BPF_F_NO_COMMON_LRU` every
/// insert locks and reorders its CPU's list: a new flow cost 137-325 ns
/// more. Compared at 1 and 2 CPUs in `cargo xtask bench` (README).
pub const FLOW_TABLE_FLAGS: u32 = BPF_F_NO_FLAGS;

// ---- Configuration defaults ----

/// Services the ring map is sized for by default.
pub const DEFAULT_MAX_SERVICES: u32 = 64;
/// How long a draining backend may keep flows before it counts as drained.
pub const DEFAULT_DRAIN_TIMEOUT_S: u64 = 300;

// ---- Health checks ----

pub const DEFAULT_HEALTH_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_HEALTH_TIMEOUT_MS: u64 = 500;
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Allowed probe intervals.
pub const HEALTH_INTERVAL_MS: core::ops::RangeInclusive<u64> = 50..=3_600_000;
/// The port probed when the service's VIP takes every port (port 0).
pub const DEFAULT_HEALTH_PORT: u16 = 80;
/// The status an HTTP probe expects unless told otherwise.
pub const DEFAULT_HTTP_EXPECT_STATUS: u16 = 200;
/// What counts as an HTTP status code in `expect_status`.
pub const HTTP_STATUS: core::ops::RangeInclusive<u16> = 100..=599;
/// Allowed `rise` and `fall`.
pub const HEALTH_STREAK: core::ops::RangeInclusive<u32> = 1..=100;

// ---- Agent ----

/// How long one neighbour resolution may wait for an answer.
pub const NEIGHBOUR_RESOLVE_TIMEOUT_MS: u64 = 2000;
/// Inside the agent's event loop, a backend's first resolution is awaited
/// at most this long (so a CLI add or a registration returns with the
/// backend in the ring); one that stays unresolved is never waited for
/// again: the kernel's neighbour event brings its resolution.
pub const NEIGHBOUR_FIRST_WAIT_MS: u64 = 300;
/// How often a pending neighbour resolution looks at the neighbour table.
pub const NEIGHBOUR_POLL_MS: u64 = 50;
/// How often neighbours are re-resolved and the connection table scanned.
pub const MAINTENANCE_PERIOD_MS: u64 = 5000;
/// The same while something is pending (a neighbour, a drain, a refused write).
pub const BUSY_MAINTENANCE_PERIOD_MS: u64 = 1000;
/// After a route, neighbour or link change, paths are re-resolved this
/// much later (a burst of changes costs one re-resolution).
pub const NETLINK_SETTLE_MS: u64 = 100;
/// Size of the ring buffer of new flows for connection-table sync (bytes,
/// a power of two): 256 KiB holds about 4,000 flows (each record carries an
/// 8-byte header), what a busy node pins in well under the agent's read
/// interval.
pub const FLOW_EVENTS_BYTES: u32 = 256 * 1024;
/// The agent drains the ring this often (the program does not wake it).
pub const FLOW_EVENTS_POLL_MS: u64 = 20;

/// How often the agent checks its announce table against the VIPs it
/// announces (changes are written at once; this repairs outside edits).
pub const ANNOUNCE_RESYNC_S: u64 = 5;
/// How often least_response_time re-derives weights from response times.
pub const REBALANCE_PERIOD_MS: u64 = 2000;
/// Longest control-socket request line; anything longer is refused as it is read.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Control connections served at once; more are answered "busy" and closed,
/// so idle or hostile clients cannot take the agent's file descriptors.
pub const MAX_CONTROL_CONNECTIONS: usize = 64;
/// A control connection without a complete request for this long is closed.
pub const CONTROL_IDLE_TIMEOUT_MS: u64 = 10_000;
/// After a failed accept (EMFILE, ...) the control socket waits this long
/// first, doubling up to a second, instead of spinning.
pub const CONTROL_ACCEPT_BACKOFF_MS: u64 = 10;
/// The CLI gives up on an agent that has not answered within this long.
pub const CLI_TIMEOUT_MS: u64 = 15_000;
/// Probe latency histogram: first bucket (s), factor, buckets (100 µs … ~1.6 s).
pub const PROBE_LATENCY_BUCKETS: (f64, f64, u16) = (0.0001, 2.0, 15);

// ---- least_response_time ----

/// Weight of the newest latency sample in the mean.
pub const EWMA_ALPHA: f64 = 0.3;
/// Latencies below this count as this: sub-millisecond differences are
/// noise, not a reason to move traffic.
pub const LATENCY_FLOOR_MS: f64 = 1.0;
/// A derived weight moves at most this fraction of the way to its target
/// per rebalance...
pub const LATENCY_DAMPING: f64 = 0.5;
/// ...and not at all when within this fraction of it: no oscillation.
pub const LATENCY_DEAD_BAND: f64 = 0.1;
/// The fastest backend's derived weight is at most this many times its
/// configured weight (room for fine ratios below MAX_WEIGHT).
pub const LATENCY_WEIGHT_SCALE: f64 = 100.0;
