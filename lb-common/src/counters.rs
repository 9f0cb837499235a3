//! What the data plane counts globally (`GLOBAL_COUNTERS`).

/// Indexes of the `GLOBAL_COUNTERS` per-CPU array. New counters go at the
/// end: a pinned counter keeps its slot across upgrades.
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
    /// A non-SYN packet found its live flow in the connection table.
    ConntrackHit,
    /// A non-SYN packet found no usable entry (none, idle UDP, backend down)
    /// and was scheduled.
    ConntrackMiss,
    ConntrackInsertFailed,
    /// A SYN that opened a new connection: it took the scheduler.
    SynScheduled,
    /// A SYN retransmission: it found its own half-open entry and went to
    /// the same backend.
    SynRetransmit,
    /// A SYN for a live established flow: sent to that flow's backend (which
    /// answers as TCP does), the flow left as it is.
    SynToEstablished,
    /// A SYN scheduled while its CPU saw more than `syn_flood_threshold`
    /// SYNs per second: not recorded as half-open (hash-scheduled services)
    /// nor as client affinity.
    SynFlood,
    /// A client's ACK found its SYN's half-open entry: the flow moved to the
    /// connection table with that backend.
    HalfOpenPromoted,
    ActionTx,
    ActionRedirect,
    /// A new flow followed its client's affinity (persistence).
    AffinityHit,
    /// Packets sent on by L2 DSR (MAC rewrite).
    ForwardedDsr,
    /// Packets sent on IP-in-IP encapsulated (4in4, 6in6, 4in6, 6in4).
    ForwardedIpip,
    /// Packets sent on GUE encapsulated.
    ForwardedGue,
    /// ICMP "fragmentation needed" sent back to an IPv4 client whose DF
    /// packet would exceed the path MTU once encapsulated.
    TooBigSentV4,
    /// ICMPv6 "packet too big" sent back to an IPv6 client.
    TooBigSentV6,
    /// Too big once encapsulated and not answerable (IPv4 without DF, which
    /// XDP cannot fragment): dropped.
    DropTooBig,
    /// The frame could not be grown or shrunk for encapsulation: dropped.
    DropEncapFailed,
    /// Packets sent on NAT-translated (client → backend).
    ForwardedNat,
    /// Backend replies translated back (backend → client).
    NatReplies,
    /// A new NAT flow found no free source port: dropped.
    DropNatPortExhausted,
    /// A new NAT flow did not fit the NAT tables (`nat_table_size`): dropped.
    DropNatTableFull,
    /// A translated reply with no route to the client in the kernel's FIB
    /// (or no neighbour entry yet): passed to the kernel to forward.
    NatReplyToKernel,
    /// ICMP errors about NAT flows (unreachable, too big, time exceeded)
    /// translated back to the client.
    NatIcmpErrors,
    /// A new flow pinned while connection-table sync is on, but the event
    /// ring to the agent was full: the peers do not learn this flow.
    SyncEventLost,
}

pub const GLOBAL_COUNTER_COUNT: u32 = GlobalCounter::SyncEventLost as u32 + 1;
const _: () = assert!(GLOBAL_COUNTER_COUNT <= crate::GLOBAL_COUNTER_SLOTS);

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
        GlobalCounter::SynScheduled,
        GlobalCounter::SynRetransmit,
        GlobalCounter::SynToEstablished,
        GlobalCounter::SynFlood,
        GlobalCounter::HalfOpenPromoted,
        GlobalCounter::ActionTx,
        GlobalCounter::ActionRedirect,
        GlobalCounter::AffinityHit,
        GlobalCounter::ForwardedDsr,
        GlobalCounter::ForwardedIpip,
        GlobalCounter::ForwardedGue,
        GlobalCounter::TooBigSentV4,
        GlobalCounter::TooBigSentV6,
        GlobalCounter::DropTooBig,
        GlobalCounter::DropEncapFailed,
        GlobalCounter::ForwardedNat,
        GlobalCounter::NatReplies,
        GlobalCounter::DropNatPortExhausted,
        GlobalCounter::DropNatTableFull,
        GlobalCounter::NatReplyToKernel,
        GlobalCounter::NatIcmpErrors,
        GlobalCounter::SyncEventLost,
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
            GlobalCounter::SynScheduled => "syn_scheduled",
            GlobalCounter::SynRetransmit => "syn_retransmit",
            GlobalCounter::SynToEstablished => "syn_to_established",
            GlobalCounter::SynFlood => "syn_flood",
            GlobalCounter::HalfOpenPromoted => "half_open_promoted",
            GlobalCounter::ActionTx => "action_tx",
            GlobalCounter::ActionRedirect => "action_redirect",
            GlobalCounter::AffinityHit => "affinity_hit",
            GlobalCounter::ForwardedDsr => "forwarded_dsr",
            GlobalCounter::ForwardedIpip => "forwarded_ipip",
            GlobalCounter::ForwardedGue => "forwarded_gue",
            GlobalCounter::TooBigSentV4 => "too_big_sent_v4",
            GlobalCounter::TooBigSentV6 => "too_big_sent_v6",
            GlobalCounter::DropTooBig => "drop_too_big",
            GlobalCounter::DropEncapFailed => "drop_encap_failed",
            GlobalCounter::ForwardedNat => "forwarded_nat",
            GlobalCounter::NatReplies => "nat_replies",
            GlobalCounter::DropNatPortExhausted => "drop_nat_port_exhausted",
            GlobalCounter::DropNatTableFull => "drop_nat_table_full",
            GlobalCounter::NatReplyToKernel => "nat_reply_to_kernel",
            GlobalCounter::NatIcmpErrors => "nat_icmp_errors",
            GlobalCounter::SyncEventLost => "sync_event_lost",
        }
    }
}

/// What the backend-side decapsulation program (`xdplb decap`) counts
/// (`DECAP_COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// IPIP (any family in any family) opened and passed to the stack.
    Ipip = 0,
    /// GUE opened and passed to the stack.
    Gue,
    /// A tunnel packet for another host: passed untouched.
    PassNotLocal,
    /// A tunnel packet for this host whose inner header is cut short, not
    /// IP, or not the family announced: dropped.
    DropMalformed,
}

pub const DECAP_COUNTER_COUNT: u32 = DecapCounter::DropMalformed as u32 + 1;

impl DecapCounter {
    pub const ALL: [DecapCounter; DECAP_COUNTER_COUNT as usize] =
        [DecapCounter::Ipip, DecapCounter::Gue, DecapCounter::PassNotLocal, DecapCounter::DropMalformed];

    pub const fn name(self) -> &'static str {
        match self {
            DecapCounter::Ipip => "decapsulated_ipip",
            DecapCounter::Gue => "decapsulated_gue",
            DecapCounter::PassNotLocal => "passed_not_local",
            DecapCounter::DropMalformed => "dropped_malformed",
        }
    }
}
