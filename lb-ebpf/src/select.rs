//! Backend selection: the connection table first, the VIP's scheduler for
//! new flows.
//!
//! A TCP SYN always consults the scheduler (a reused five-tuple is a new
//! connection); every other packet keeps the backend its flow is pinned to,
//! so established flows survive ring changes, unless their backend is marked
//! down, in which case they are scheduled afresh. A RST never creates an
//! entry; the client's FIN or RST marks the flow finished.
//!
//! For least_conn VIPs every way a flow starts or ends on a backend is
//! counted in `ACTIVE_FLOWS` here.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_IN_USE, Backend, FLOW_F_FINISHED, FlowState, GlobalCounter, LAST_SEEN_REFRESH_NS,
    PROTO_UDP, VipInfo, scheduler,
};

use crate::{
    counters::count,
    maps::{BACKENDS, CONNTRACK, udp_idle_timeout_ns},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    schedule,
};

pub struct Selection {
    pub backend_id: u32,
    pub backend: *const Backend,
    pub new_flow: bool,
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
    } else if least_conn && let Some(old) = unsafe { CONNTRACK.get(&packet.flow) } {
        if old.flags & FLOW_F_FINISHED == 0 {
            leaves = Some(old.backend_id);
        }
    }
    count(GlobalCounter::ConntrackMiss);

    let backend_id = schedule::pick(packet, vip, now)?;
    let backend = usable_backend(backend_id)?;
    let new_flow = packet.tcp_flags & TCP_RST == 0;
    let finished = packet.tcp_flags & TCP_FIN != 0;
    if new_flow {
        let state = FlowState { backend_id, flags: if finished { FLOW_F_FINISHED } else { 0 }, last_seen_ns: now };
        if CONNTRACK.insert(&packet.flow, &state, 0).is_err() {
            count(GlobalCounter::ConntrackInsertFailed);
        }
    }
    if least_conn {
        if let Some(old) = leaves {
            schedule::account(old, -1);
        }
        if new_flow && !finished {
            schedule::account(backend_id, 1);
        }
    }
    Some(Selection { backend_id, backend, new_flow })
}

#[inline(always)]
fn pinned_backend(packet: &Packet, now: u64, least_conn: bool) -> Pinned {
    let Some(state) = CONNTRACK.get_ptr_mut(&packet.flow) else {
        return Pinned::Miss;
    };
    let state = unsafe { &mut *state };
    let finished = state.flags & FLOW_F_FINISHED != 0;
    let idle_ns = now.saturating_sub(state.last_seen_ns);
    if packet.flow.proto == PROTO_UDP && idle_ns > udp_idle_timeout_ns() {
        return Pinned::Stale { backend_id: state.backend_id, finished };
    }
    let Some(backend) = usable_backend(state.backend_id) else {
        return Pinned::Miss;
    };
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
    Pinned::Hit(Selection { backend_id: state.backend_id, backend, new_flow: false })
}

#[inline(always)]
fn usable_backend(backend_id: u32) -> Option<*const Backend> {
    let backend = BACKENDS.get_ptr(backend_id)?;
    if unsafe { (*backend).flags } & BACKEND_F_IN_USE == 0 {
        return None;
    }
    Some(backend)
}
