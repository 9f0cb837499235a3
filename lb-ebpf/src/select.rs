//! Backend selection: the connection table first, the VIP's scheduler for
//! new flows.
//!
//! Every non-SYN packet keeps the backend its flow is pinned to, so
//! established flows survive ring changes, unless their backend is marked
//! down, in which case they are scheduled afresh.
//!
//! A SYN never writes the connection table (see `half_open`). It looks the
//! five-tuple up there: a live flow keeps its backend (a spoofed SYN cannot
//! move an established flow; a client that really restarted gets the
//! backend's challenge ACK, resets, and its next SYN finds the flow
//! finished); a finished flow or one on a failed backend is removed, so the
//! new connection's ACK does not find it. Otherwise the SYN takes the
//! scheduler's pick and is recorded half-open; a retransmitted SYN goes
//! where the first went, because that backend may already hold the
//! half-open connection. The client's ACK moves the flow to the connection
//! table with its SYN's backend. A RST never creates an entry; the client's
//! FIN or RST marks the flow finished.
//!
//! A hash-scheduled service whose pins the agent found all on its ring
//! (`VIP_F_PINS_FOLLOW_RING`) spares its SYNs that lookup: a live flow's
//! entry names the ring's pick anyway, and a finished flow's entry past its
//! linger counts as gone, so the new connection's ACK takes its SYN's record.
//!
//! A NAT service's flows are pinned by their translations instead
//! (`NAT_FLOWS`), never by the connection table: the SYN's translation is
//! its half-open record (see `half_open`), the client's ACK marks it
//! pinned, and every later packet finds its backend there: a NAT
//! connection writes its translation and no connection-table entry. A flow
//! that began before its service switched to or from NAT is still found in
//! the other table (the connection table for a NAT service; for any other,
//! the translations while its NAT flows linger: `VIP_F_NAT_FLOWS_LINGER`).
//!
//! For least_conn VIPs every way a flow starts or ends on a backend is
//! counted in `ACTIVE_FLOWS` here (a SYN counts: the agent's scan corrects
//! handshakes that never complete).

use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_IN_USE, Backend, FINISHED_LINGER_NS, FLOW_F_FINISHED, FlowEvent, FlowKey, FlowState,
    GlobalCounter, LAST_SEEN_REFRESH_NS, PROTO_TCP, PROTO_UDP, VIP_F_NAT, VIP_F_NAT_FLOWS_LINGER,
    VIP_F_PINS_FOLLOW_RING, VipInfo, nat::NatFlowPhase, scheduler,
};
use lb_ebpf::parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

use crate::{
    affinity, clock,
    counters::count,
    forward::nat::{self, NewTranslation, Translation},
    half_open::{self, Recorded},
    maps::{BACKENDS, CONNTRACK, FLOW_EVENTS, NAT_FLOWS, sync_flows, udp_idle_timeout_ns},
    schedule,
};

pub struct Selection {
    pub backend_id: u32,
    pub new_flow: bool,
    /// What select knows of a NAT flow's translation.
    pub translation: Translation,
}

impl Selection {
    /// A flow that keeps `backend_id`.
    #[inline(always)]
    fn kept(backend_id: u32) -> Self {
        Selection { backend_id, new_flow: false, translation: Translation::Unknown }
    }
}

/// `select_backend` packed into one scalar: the backend id in the low 32
/// bits, the new-flow flag in bit 32, the translation in bits 33-35;
/// `NOTHING_SELECTED` when there is no usable backend.
pub type Packed = u64;
pub const NOTHING_SELECTED: Packed = u64::MAX;
const NEW_FLOW_BIT: Packed = 1 << 32;
const TRANSLATION_SHIFT: u32 = 33;
const TRANSLATION_MASK: Packed = 7;

/// Where a packet's backend comes from. An established packet of a
/// service whose flows the connection table pins finds it there, inline:
/// its way has no subprogram call (each costs 10-15 ns here). Any other
/// non-SYN packet has its flow's records read by `find_flow`, told whether
/// the connection table was just looked at in vain (a second miss costs
/// as much as a new flow's whole insert); the scheduler (`select`) runs
/// only for a flow that none of them pins.
#[inline(always)]
pub fn select_for(packet: &Packet, vip: &VipInfo) -> Packed {
    let now = clock::now_ns();
    let least_conn = vip.scheduler == scheduler::LEAST_CONN;
    if packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return select(packet, vip, now, NOTHING_FOUND);
    }
    let mut conntrack_missed = false;
    if vip.flags & VIP_F_NAT == 0 {
        match pinned_backend(packet, vip, now, least_conn) {
            Pinned::Hit(selection) => {
                count(GlobalCounter::ConntrackHit);
                return selection.backend_id as Packed;
            }
            Pinned::Miss => conntrack_missed = true,
            // A stale entry (backend down, idle UDP flow), rare: find_flow
            // looks again and reschedules it. (No handshake is kept here.)
            Pinned::Stale { .. } | Pinned::Handshake(_) => {}
        }
    }
    let found = find_flow(packet, vip, now, least_conn, conntrack_missed);
    if found & FOUND_PINNED != 0 {
        return found as u32 as Packed;
    }
    select(packet, vip, now, found)
}

/// `select_backend` as a BPF subprogram (not inlined): its many paths (one
/// per scheduler, hit, miss, retransmission...) end in one return, so what
/// follows is verified once instead of once per path (half the verifier's
/// work). Returns a scalar, which keeps the states after it alike.
#[inline(never)]
fn select(packet: &Packet, vip: &VipInfo, now: u64, found: Found) -> Packed {
    match select_backend(packet, vip, now, found) {
        Some(s) => {
            s.backend_id as Packed
                | if s.new_flow { NEW_FLOW_BIT } else { 0 }
                | (s.translation as Packed) << TRANSLATION_SHIFT
        }
        None => NOTHING_SELECTED,
    }
}

/// A packed selection (not `NOTHING_SELECTED`).
#[inline(always)]
pub fn unpack(packed: Packed) -> Selection {
    Selection {
        backend_id: packed as u32,
        new_flow: packed & NEW_FLOW_BIT != 0,
        translation: match (packed >> TRANSLATION_SHIFT) & TRANSLATION_MASK {
            1 => Translation::Made,
            2 => Translation::Refused,
            4 => Translation::Unclaimed,
            _ => Translation::Unknown,
        },
    }
}

enum Pinned {
    Hit(Selection),
    /// An entry whose backend is down, or an idle UDP flow: schedule afresh
    /// (`finished`: no live flow leaves its backend).
    Stale {
        backend_id: u32,
        finished: bool,
    },
    /// A NAT flow's SYN translation: the client's ACK completes the handshake.
    Handshake(u32),
    Miss,
}

/// The backend of a SYN, or of a non-SYN packet whose flow `find_flow`
/// did not find pinned (`found`: what it found instead).
#[inline(always)]
fn select_backend(packet: &Packet, vip: &VipInfo, now: u64, found: Found) -> Option<Selection> {
    let least_conn = vip.scheduler == scheduler::LEAST_CONN;
    if packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        return syn(packet, vip, now, least_conn);
    }
    let found_id = found as u32;
    // A NAT flow is pinned by its translation (`forward::nat::translate`).
    let pins = vip.flags & VIP_F_NAT == 0;
    if found & FOUND_HANDSHAKE != 0 {
        let backend_id = found_id;
        count(GlobalCounter::HalfOpenPromoted);
        // The client may end the handshake with a RST (or a FIN) too.
        let ending = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0;
        if pins {
            pin(packet, backend_id, now, ending);
        }
        if least_conn && ending {
            schedule::account(backend_id, -1);
        }
        if vip.persistence_timeout_ns != 0 {
            // A flooded SYN left the client's affinity alone (see `syn`).
            affinity::remember(packet, vip, backend_id, now);
        }
        return Some(Selection::kept(backend_id));
    }

    // The live flow this packet's five-tuple leaves, for least_conn accounting.
    let leaves = (found & FOUND_LEAVING != 0).then_some(found_id);
    let backend_id = schedule::pick(packet, vip, now, true)?;
    usable_backend(backend_id)?;
    let new_flow = packet.tcp_flags & TCP_RST == 0;
    let finished = packet.tcp_flags & TCP_FIN != 0;
    if new_flow && pins {
        pin(packet, backend_id, now, finished);
    }
    if least_conn {
        if let Some(old) = leaves {
            schedule::account(old, -1);
        }
        if new_flow && !finished {
            schedule::account(backend_id, 1);
        }
    }
    // The translation stays `Unknown`, though find_flow may have found
    // none: one more state through the schedulers would cost the verifier
    // as much as all of them.
    Some(Selection { backend_id, new_flow, translation: Translation::Unknown })
}

/// What `find_flow` found, packed into one scalar: a backend id in the low
/// 32 bits and one of these bits (none: nothing, schedule afresh).
type Found = u64;
const NOTHING_FOUND: Found = 0;
/// The flow is pinned to the backend: keep it.
const FOUND_PINNED: Found = 1 << 32;
/// The client's ACK completing a handshake whose SYN went to the backend.
const FOUND_HANDSHAKE: Found = 1 << 33;
/// A live flow that leaves the backend (down, or an idle UDP flow).
const FOUND_LEAVING: Found = 1 << 34;

/// The record of a non-SYN packet's flow: its pin (a NAT service's
/// translation, any other's connection-table entry, each falling back to
/// the other: see the module's comment), else its handshake's record
/// (`conntrack_missed`: `select_for` has just missed in the connection
/// table). A subprogram returning a scalar, so that the lookups' many ways
/// end in a few states for what follows.
#[inline(never)]
fn find_flow(packet: &Packet, vip: &VipInfo, now: u64, least_conn: bool, conntrack_missed: bool) -> Found {
    let nat = vip.flags & VIP_F_NAT != 0;
    let mut pinned = if nat { translated(packet, vip, now, least_conn) } else { Pinned::Miss };
    if let Pinned::Miss = pinned
        && !conntrack_missed
    {
        pinned = pinned_backend(packet, vip, now, least_conn);
    }
    match pinned {
        Pinned::Hit(selection) => {
            count(GlobalCounter::ConntrackHit);
            return selection.backend_id as Found | FOUND_PINNED;
        }
        Pinned::Stale { backend_id, finished: false } => {
            count(GlobalCounter::ConntrackMiss);
            return backend_id as Found | FOUND_LEAVING;
        }
        Pinned::Handshake(backend_id) => {
            count(GlobalCounter::ConntrackMiss);
            return backend_id as Found | FOUND_HANDSHAKE;
        }
        Pinned::Stale { .. } | Pinned::Miss => {}
    }
    count(GlobalCounter::ConntrackMiss);
    if nat {
        return NOTHING_FOUND;
    }
    if packet.flow.proto == PROTO_TCP
        && let Some(backend_id) = half_open::take(packet)
        && serves(backend_id)
    {
        return backend_id as Found | FOUND_HANDSHAKE;
    }
    // A NAT flow of a service that switched away from NAT.
    if vip.flags & VIP_F_NAT_FLOWS_LINGER != 0
        && let Pinned::Hit(selection) = translated(packet, vip, now, least_conn)
    {
        return selection.backend_id as Found | FOUND_PINNED;
    }
    NOTHING_FOUND
}

/// A SYN: see the module's comment.
#[inline(always)]
fn syn(packet: &Packet, vip: &VipInfo, now: u64, least_conn: bool) -> Option<Selection> {
    // The scheduler first, while this path holds no other state: the
    // verifier then walks the schedulers once for every SYN path.
    let picked = schedule::pick_raw(packet, vip, now);
    let mut leaves: Option<u32> = None;
    // A NAT service's flows are not in the connection table (its
    // translation is looked at below). Where every pin follows the ring, a
    // live flow's entry names the ring's pick, and a finished one past its
    // linger is left to the new connection's ACK (`pinned_backend`).
    if vip.flags & (VIP_F_NAT | VIP_F_PINS_FOLLOW_RING) == 0
        && let Some(entry) = CONNTRACK.get_ptr(&packet.flow)
    {
        // SAFETY: the map returned a pointer to a live entry.
        let entry = unsafe { *entry };
        let live = entry.flags & FLOW_F_FINISHED == 0;
        if live && serves(entry.backend_id) {
            count(GlobalCounter::SynToEstablished);
            return Some(Selection::kept(entry.backend_id));
        }
        if live {
            leaves = Some(entry.backend_id);
        }
        let _ = CONNTRACK.remove(&packet.flow);
    }

    let flooded = half_open::flooded(now);
    let backend_id = schedule::picked(packet, vip, now, picked, !flooded)?;
    usable_backend(backend_id)?;
    if flooded {
        count(GlobalCounter::SynFlood);
    }
    if vip.flags & VIP_F_NAT != 0 {
        // Its record is its translation: see `claim_nat_syn`.
        return Some(Selection { backend_id, new_flow: true, translation: Translation::Unclaimed });
    }
    if !(flooded && half_open::stateless_scheduler(vip))
        && let Recorded::Retransmission(first) = half_open::record(packet, backend_id, now, serves)
    {
        count(GlobalCounter::SynRetransmit);
        return Some(Selection::kept(first));
    }
    count(GlobalCounter::SynScheduled);
    if least_conn {
        if let Some(old) = leaves {
            schedule::account(old, -1);
        }
        schedule::account(backend_id, 1);
    }
    Some(Selection { backend_id, new_flow: true, translation: Translation::Unknown })
}

/// A NAT service's SYN, whose backend select picked (`Unclaimed`): its
/// translation, which is its record, made now unless the five-tuple has one
/// (a retransmitted SYN, a live flow's, one that ended: looked at only
/// then, see `new_translation`), and the SYN counted as select counts
/// others. Outside select, on the main path: `new_translation` is a
/// subprogram, and called from select the stack of three frames would pass
/// the verifier's 512 bytes.
#[inline(always)]
pub fn claim_nat_syn(packet: &Packet, vip: &VipInfo, picked: Packed) -> Packed {
    let backend_id = picked as u32;
    let Some(backend) = usable_backend(backend_id) else {
        return NOTHING_SELECTED;
    };
    let now = clock::now_ns();
    // SAFETY: `usable_backend` returns a pointer into the BACKENDS array.
    let translation = match nat::new_translation(packet, backend_id, unsafe { &*backend }, now) {
        NewTranslation::Made => Translation::Made,
        NewTranslation::Refused => Translation::Refused,
        NewTranslation::Exists => match half_open::nat_record(packet, now) {
            Some((first, NatFlowPhase::Handshake { young: true })) if serves_vip(first, vip) => {
                count(GlobalCounter::SynRetransmit);
                return first as Packed;
            }
            // A live flow keeps its backend (as in the connection table, see `syn`).
            Some((first, NatFlowPhase::Live)) if serves_vip(first, vip) => {
                count(GlobalCounter::SynToEstablished);
                return first as Packed;
            }
            // `translate` keeps the translation if it names this backend,
            // else replaces it (or makes one, if it is gone since).
            _ => Translation::Unknown,
        },
    };
    count(GlobalCounter::SynScheduled);
    if vip.scheduler == scheduler::LEAST_CONN {
        schedule::account(backend_id, 1);
    }
    backend_id as Packed | NEW_FLOW_BIT | (translation as Packed) << TRANSLATION_SHIFT
}

/// Whether a selection is a NAT SYN's that `claim_nat_syn` must complete.
/// Every selected packet asks, so one test: `NOTHING_SELECTED`'s field
/// reads 7, never `Unclaimed`.
#[inline(always)]
pub fn unclaimed(packed: Packed) -> bool {
    (packed >> TRANSLATION_SHIFT) & TRANSLATION_MASK == Translation::Unclaimed as Packed
}
const _: () = assert!((NOTHING_SELECTED >> TRANSLATION_SHIFT) & TRANSLATION_MASK != Translation::Unclaimed as Packed);

/// Pins a flow to `backend_id` in the connection table (`finished`: the
/// client is already ending it).
#[inline(always)]
fn pin(packet: &Packet, backend_id: u32, now: u64, finished: bool) {
    let flags = if finished { FLOW_F_FINISHED } else { 0 };
    let state = FlowState { backend_id, flags, last_seen_ns: now };
    if CONNTRACK.insert(&packet.flow, &state, 0).is_err() {
        count(GlobalCounter::ConntrackInsertFailed);
        return;
    }
    // A load-time constant: with sync off the verifier removes the call.
    if sync_flows() && !finished {
        report_pinned(&packet.flow, backend_id);
    }
}

/// Connection-table sync: a pinned flow goes to the agent, which tells its
/// peers, so that any node can carry the flow on. Only where flows are
/// pinned, never on the established path. A subprogram: its branches and
/// its record stay out of the callers' verification and stack.
#[inline(never)]
fn report_pinned(flow: &FlowKey, backend_id: u32) {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(GlobalCounter::SyncEventLost);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: the ring reserved room for one FlowEvent at `event`; every
    // field is written before the record is submitted.
    unsafe {
        (*event).flow = *flow;
        (*event).backend_id = backend_id;
        (*event)._pad = 0;
    }
    // No wakeup: the agent polls the ring every FLOW_EVENTS_POLL_MS, and a
    // wakeup (an irq_work per record while the reader keeps up) would cost
    // more than the record itself.
    entry.submit(BPF_RB_NO_WAKEUP);
}

/// `bpf_ringbuf_submit` flag (uapi bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;

#[inline(always)]
fn pinned_backend(packet: &Packet, vip: &VipInfo, now: u64, least_conn: bool) -> Pinned {
    let Some(state) = CONNTRACK.get_ptr_mut(&packet.flow) else {
        return Pinned::Miss;
    };
    // SAFETY: the map returned a pointer to a live value; other CPUs may
    // write the same entry, and every field is a plain word (torn reads are
    // impossible, lost updates are harmless here).
    let state = unsafe { &mut *state };
    let finished = state.flags & FLOW_F_FINISHED != 0;
    let idle_ns = now.saturating_sub(state.last_seen_ns);
    // A SYN of a service whose pins follow its ring leaves a finished
    // flow's entry alone (`syn`): past the linger, a packet finding it
    // belongs to a new connection on the same five-tuple, whose own
    // record (or the ring) names its backend.
    if finished && vip.flags & VIP_F_PINS_FOLLOW_RING != 0 && idle_ns > FINISHED_LINGER_NS {
        return Pinned::Miss;
    }
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
    if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && !finished {
        state.flags |= FLOW_F_FINISHED;
        if least_conn {
            schedule::account(state.backend_id, -1);
        }
    }
    Pinned::Hit(Selection::kept(state.backend_id))
}

/// `pinned_backend` for a NAT flow, whose translation pins it. The
/// translation may outlive its slot's service (the slot may serve another
/// since); its flags and last packet are written by `forward::nat`.
#[inline(always)]
fn translated(packet: &Packet, vip: &VipInfo, now: u64, least_conn: bool) -> Pinned {
    // SAFETY: a hash lookup whose value outlives this run; only read.
    let Some(entry) = (unsafe { NAT_FLOWS.get(&packet.flow) }) else {
        return Pinned::Miss;
    };
    let backend_id = entry.backend_id;
    let Some(backend) = usable_backend(backend_id) else {
        return Pinned::Stale { backend_id, finished: true };
    };
    // SAFETY: `usable_backend` returns a pointer into the BACKENDS array.
    let backend = unsafe { &*backend };
    if backend.vip_id != vip.id {
        return Pinned::Stale { backend_id, finished: true };
    }
    let down = backend.flags & BACKEND_F_DOWN != 0;
    let finished = match entry.phase(now, packet.flow.proto, udp_idle_timeout_ns()) {
        // A handshake that ended (or whose backend failed) before the
        // client's ACK: scheduled afresh, as a new flow.
        NatFlowPhase::Aborted => return Pinned::Stale { backend_id, finished: true },
        NatFlowPhase::Handshake { .. } if down => return Pinned::Stale { backend_id, finished: true },
        NatFlowPhase::Handshake { .. } => return Pinned::Handshake(backend_id),
        NatFlowPhase::Idle => return Pinned::Stale { backend_id, finished: false },
        NatFlowPhase::Live => false,
        NatFlowPhase::Finished => true,
    };
    if down {
        return Pinned::Stale { backend_id, finished };
    }
    if least_conn && !finished && packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        schedule::account(backend_id, -1);
    }
    Pinned::Hit(Selection::kept(backend_id))
}

/// Whether the backend in slot `backend_id` may keep a flow: in use and
/// not marked down.
#[inline(always)]
fn serves(backend_id: u32) -> bool {
    serving(backend_id).is_some()
}

/// `serves`, and of `vip`: a translation may outlive its slot's service
/// (a SYN's may be older than the agent's scan keeps a slot for it), and
/// the slot may serve another service since.
#[inline(always)]
fn serves_vip(backend_id: u32, vip: &VipInfo) -> bool {
    // SAFETY: `serving` returns a pointer into the BACKENDS array.
    serving(backend_id).is_some_and(|backend| unsafe { (*backend).vip_id } == vip.id)
}

/// The backend in slot `backend_id` if it may keep a flow (`serves`).
#[inline(always)]
fn serving(backend_id: u32) -> Option<*const Backend> {
    let backend = usable_backend(backend_id)?;
    // SAFETY: `usable_backend` returns a pointer into the BACKENDS array.
    (unsafe { (*backend).flags } & BACKEND_F_DOWN == 0).then_some(backend)
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
