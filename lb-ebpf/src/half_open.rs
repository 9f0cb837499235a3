//! The half-open table: where a TCP flow lives between its SYN and the
//! client's ACK. SYNs never write the connection table, so a SYN flood,
//! however large, cannot evict an established flow; it only churns this
//! smaller LRU table. The client's ACK moves its entry to `CONNTRACK`.
//!
//! Flood detection (as Katran's): a CPU that sees more than
//! `syn_flood_threshold` new SYNs in a second is flooded. While it is, SYNs
//! to hash-scheduled services write nothing at all: their backend follows
//! from the five-tuple and the ring, so the ACK finds the same one by
//! hashing again (unless the ring changes within that round trip).
//!
//! A NAT service's flows are not recorded here: the translation its SYN
//! gets (`NAT_FLOWS`, made by `select::claim_nat_syn`) already names the
//! backend, so it is the half-open record (`nat_record`), and a second
//! insert per SYN would only cost time.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::{
    FLOW_F_HALF_OPEN, FlowState, NS_PER_SEC, SYN_RETRANSMIT_WINDOW_NS, VipInfo, nat::NatFlowPhase, scheduler,
};
use lb_ebpf::parse::Packet;

use crate::maps::{HALF_OPEN, NAT_FLOWS, SYN_RATE, syn_flood_threshold, udp_idle_timeout_ns};

/// What recording a SYN found.
pub enum Recorded {
    /// A new half-open flow (or one that replaced an old entry).
    New,
    /// The flow's own earlier SYN, still young: a retransmission, to go
    /// where that SYN went.
    Retransmission(u32),
}

/// Counts a new SYN on this CPU; whether the CPU is flooded.
#[inline(always)]
pub fn flooded(now: u64) -> bool {
    let threshold = syn_flood_threshold();
    if threshold == 0 {
        return false;
    }
    let Some(rate) = SYN_RATE.get_ptr_mut(0) else { return false };
    // SAFETY: this CPU's slot; nothing else writes it.
    let rate = unsafe { &mut *rate };
    if now.wrapping_sub(rate.window_start_ns) >= NS_PER_SEC {
        rate.window_start_ns = now;
        rate.syns = 0;
    }
    rate.syns += 1;
    rate.syns > threshold
}

/// Whether a SYN to `vip` may go unrecorded under a flood: its backend must
/// follow from the packet and the ring alone.
#[inline(always)]
pub fn stateless_scheduler(vip: &VipInfo) -> bool {
    vip.persistence_timeout_ns == 0 && matches!(vip.scheduler, scheduler::MAGLEV | scheduler::SOURCE_HASH)
}

/// Records a SYN's backend. The five-tuple is looked up first: a
/// retransmission then costs one lookup, where an insert that finds its key
/// taken costs as much as a successful one (the kernel takes a free LRU
/// node, locks the bucket, looks, and gives the node back). A new five-tuple
/// pays a lookup that finds nothing (its SYN: 20-60 ns more, still below
/// its floor; other new-flow SYNs ran faster, cause not pinned down).
/// `usable`: whether an earlier SYN's backend may still take the flow.
#[inline(always)]
pub fn record(packet: &Packet, backend_id: u32, now: u64, usable: impl Fn(u32) -> bool) -> Recorded {
    let state = FlowState { backend_id, flags: FLOW_F_HALF_OPEN, last_seen_ns: now };
    if let Some(entry) = HALF_OPEN.get_ptr_mut(&packet.flow) {
        // SAFETY: a pointer to a live entry; its fields are plain words and
        // only this five-tuple uses it.
        let entry = unsafe { &mut *entry };
        let young = now.saturating_sub(entry.last_seen_ns) <= SYN_RETRANSMIT_WINDOW_NS;
        if young && usable(entry.backend_id) {
            return Recorded::Retransmission(entry.backend_id);
        }
        *entry = state;
        return Recorded::New;
    }
    // "Create only": should another CPU have recorded the five-tuple in
    // between, its record stays (RSS keeps a five-tuple's packets on one
    // CPU, so that is a SYN and its retransmission on different queues).
    let _ = HALF_OPEN.insert(&packet.flow, &state, BPF_NOEXIST as u64);
    Recorded::New
}

/// The backend of the flow's SYN, if it is in the half-open table: the
/// entry is removed (the caller moves the flow to the connection table).
#[inline(always)]
pub fn take(packet: &Packet) -> Option<u32> {
    // SAFETY: the map returned a pointer to a live entry.
    let backend_id = unsafe { (*HALF_OPEN.get_ptr(&packet.flow)?).backend_id };
    let _ = HALF_OPEN.remove(&packet.flow);
    Some(backend_id)
}

/// The translation of the packet's five-tuple, if it has one: its backend
/// and what it says of the flow.
#[inline(always)]
pub fn nat_record(packet: &Packet, now: u64) -> Option<(u32, NatFlowPhase)> {
    // SAFETY: a hash lookup whose value outlives this run; only read.
    let entry = unsafe { NAT_FLOWS.get(&packet.flow) }?;
    Some((entry.backend_id, entry.phase(now, packet.flow.proto, udp_idle_timeout_ns())))
}
