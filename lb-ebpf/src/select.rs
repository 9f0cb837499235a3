//! Backend selection: the connection table first, the VIP's scheduler for
//! new flows.
//!
//! Every non-SYN packet keeps the backend its flow is pinned to, so
//! established flows survive ring changes, unless their backend is marked
//! down, in which case they are scheduled afresh. A SYN is a new connection
//! and takes the scheduler's pick, inserted "create only": a new five-tuple
//! pays no extra lookup. Only when the five-tuple has an entry is it looked
//! at: a retransmitted SYN (the entry is still half-open and younger than
//! `SYN_RETRANSMIT_WINDOW_NS`) goes where the first SYN went, because that
//! backend may already hold the half-open connection; an older entry (a
//! client reusing a port) is rewritten in place. A RST never creates an
//! entry; the client's FIN or RST marks the flow finished.
//!
//! For least_conn VIPs every way a flow starts or ends on a backend is
//! counted in `ACTIVE_FLOWS` here.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_IN_USE, Backend, FLOW_F_FINISHED, FLOW_F_HALF_OPEN, FlowState, GlobalCounter,
    LAST_SEEN_REFRESH_NS, PROTO_UDP, SYN_RETRANSMIT_WINDOW_NS, VipInfo, scheduler,
};
use lb_ebpf::parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::{
    counters::count,
    maps::{BACKENDS, CONNTRACK, udp_idle_timeout_ns},
    schedule,
};

pub struct Selection {
    pub backend_id: u32,
    pub new_flow: bool,
}

/// `select_backend` packed into one scalar: the backend id in the low 32
/// bits, the new-flow flag in bit 32; `NOTHING_SELECTED` when there is no
/// usable backend.
pub type Packed = u64;
pub const NOTHING_SELECTED: Packed = u64::MAX;
const NEW_FLOW_BIT: Packed = 1 << 32;

/// `select_backend` as a BPF subprogram (not inlined): its many paths (one
/// per scheduler, hit, miss, retransmission...) end in one return, so what
/// follows is verified once instead of once per path (half the verifier's
/// work). Returns a scalar, which keeps the states after it alike.
#[inline(never)]
pub fn select(packet: &Packet, vip: &VipInfo) -> Packed {
    match select_backend(packet, vip) {
        Some(s) => s.backend_id as Packed | if s.new_flow { NEW_FLOW_BIT } else { 0 },
        None => NOTHING_SELECTED,
    }
}

/// (backend id, new flow) of a packed selection.
#[inline(always)]
pub fn unpack(packed: Packed) -> (u32, bool) {
    (packed as u32, packed & NEW_FLOW_BIT != 0)
}

enum Pinned {
    Hit(Selection),
    /// An entry whose backend is down, or an idle UDP flow: schedule afresh.
    Stale {
        backend_id: u32,
        finished: bool,
    },
    Miss,
}

#[inline(always)]
pub fn select_backend(packet: &Packet, vip: &VipInfo) -> Option<Selection> {
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let least_conn = vip.scheduler == scheduler::LEAST_CONN;
    let is_syn = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // The live flow this packet's five-tuple leaves, for least_conn accounting.
    let mut leaves: Option<u32> = None;
    if !is_syn {
        match pinned_backend(packet, now, least_conn) {
            Pinned::Hit(selection) => {
                count(GlobalCounter::ConntrackHit);
                return Some(selection);
            }
            Pinned::Stale { backend_id, finished: false } => leaves = Some(backend_id),
            Pinned::Stale { .. } | Pinned::Miss => {}
        }
        count(GlobalCounter::ConntrackMiss);
    }

    let backend_id = schedule::pick(packet, vip, now)?;
    usable_backend(backend_id)?;
    let new_flow = packet.tcp_flags & TCP_RST == 0;
    let finished = packet.tcp_flags & TCP_FIN != 0;
    if new_flow {
        let flags = if finished {
            FLOW_F_FINISHED
        } else if is_syn {
            FLOW_F_HALF_OPEN
        } else {
            0
        };
        let state = FlowState { backend_id, flags, last_seen_ns: now };
        // A SYN's insert is "create only": a new five-tuple (nearly every
        // SYN) pays no lookup; only when one exists is it looked at.
        let insert_flags = if is_syn { BPF_NOEXIST as u64 } else { 0 };
        if CONNTRACK.insert(&packet.flow, &state, insert_flags).is_err() {
            match if is_syn { syn_entry(packet, now) } else { SynEntry::None } {
                SynEntry::Retransmission(selection) => {
                    count(GlobalCounter::SynRetransmit);
                    return Some(selection);
                }
                SynEntry::Earlier { state: entry, live_backend } => {
                    leaves = live_backend;
                    // SAFETY: a pointer to a live entry from the lookup; its
                    // fields are plain words and only this five-tuple uses it.
                    unsafe { *entry = state };
                }
                SynEntry::None => count(GlobalCounter::ConntrackInsertFailed),
            }
        }
    }
    if is_syn {
        count(GlobalCounter::SynScheduled);
    }
    if least_conn {
        if let Some(old) = leaves {
            schedule::account(old, -1);
        }
        if new_flow && !finished {
            schedule::account(backend_id, 1);
        }
    }
    Some(Selection { backend_id, new_flow })
}

/// What a SYN finds under its five-tuple.
enum SynEntry {
    /// Its own earlier SYN, half-open and young, on a backend that serves:
    /// the same backend.
    Retransmission(Selection),
    /// An older or finished flow: rewritten in place for the new
    /// connection; `live_backend` is where the flow it ends was pinned.
    Earlier {
        state: *mut FlowState,
        live_backend: Option<u32>,
    },
    None,
}

#[inline(always)]
fn syn_entry(packet: &Packet, now: u64) -> SynEntry {
    let Some(state) = CONNTRACK.get_ptr_mut(&packet.flow) else {
        return SynEntry::None;
    };
    // SAFETY: the map returned a pointer to a live entry.
    let entry = unsafe { &*state };
    let live = entry.flags & FLOW_F_FINISHED == 0;
    let young = now.saturating_sub(entry.last_seen_ns) <= SYN_RETRANSMIT_WINDOW_NS;
    if live && young && entry.flags & FLOW_F_HALF_OPEN != 0 {
        if let Some(backend) = usable_backend(entry.backend_id) {
            // SAFETY: `usable_backend` returns a pointer into the BACKENDS array.
            if unsafe { (*backend).flags } & BACKEND_F_DOWN == 0 {
                return SynEntry::Retransmission(Selection { backend_id: entry.backend_id, new_flow: false });
            }
        }
    }
    SynEntry::Earlier { state, live_backend: if live { Some(entry.backend_id) } else { None } }
}

#[inline(always)]
fn pinned_backend(packet: &Packet, now: u64, least_conn: bool) -> Pinned {
    let Some(state) = CONNTRACK.get_ptr_mut(&packet.flow) else {
        return Pinned::Miss;
    };
    // SAFETY: the map returned a pointer to a live value; other CPUs may
    // write the same entry, and every field is a plain word (torn reads are
    // impossible, lost updates are harmless here).
    let state = unsafe { &mut *state };
    let finished = state.flags & FLOW_F_FINISHED != 0;
    let idle_ns = now.saturating_sub(state.last_seen_ns);
    if packet.flow.proto == PROTO_UDP && idle_ns > udp_idle_timeout_ns() {
        return Pinned::Stale { backend_id: state.backend_id, finished };
    }
    let Some(backend) = usable_backend(state.backend_id) else {
        return Pinned::Miss;
    };
    // SAFETY: `usable_backend` returns a pointer into the BACKENDS array.
    if unsafe { (*backend).flags } & BACKEND_F_DOWN != 0 {
        return Pinned::Stale { backend_id: state.backend_id, finished };
    }
    if idle_ns > LAST_SEEN_REFRESH_NS {
        state.last_seen_ns = now;
    }
    let ending = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && !finished;
    if ending || state.flags & FLOW_F_HALF_OPEN != 0 {
        // The client's first packet after its SYN ends the half-open phase.
        let mut flags = state.flags & !FLOW_F_HALF_OPEN;
        if ending {
            flags |= FLOW_F_FINISHED;
            if least_conn {
                schedule::account(state.backend_id, -1);
            }
        }
        state.flags = flags;
    }
    Pinned::Hit(Selection { backend_id: state.backend_id, new_flow: false })
}

#[inline(always)]
fn usable_backend(backend_id: u32) -> Option<*const Backend> {
    let backend = BACKENDS.get_ptr(backend_id)?;
    // SAFETY: the array returned a pointer to a live value.
    if unsafe { (*backend).flags } & BACKEND_F_IN_USE == 0 {
        return None;
    }
    Some(backend)
}
