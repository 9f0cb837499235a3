//! What the data plane counts globally (`GLOBAL_COUNTERS`).

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
        GlobalCounter::SynScheduled,
        GlobalCounter::SynRetransmit,
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
            GlobalCounter::SynScheduled => "syn_scheduled",
            GlobalCounter::SynRetransmit => "syn_retransmit",
            GlobalCounter::ActionTx => "action_tx",
            GlobalCounter::ActionRedirect => "action_redirect",
            GlobalCounter::AffinityHit => "affinity_hit",
        }
    }
}
