//! Backend selection: the connection table first, the VIP's Maglev ring for
//! new flows.
//!
//! A TCP SYN always consults the ring (a reused five-tuple is a new
//! connection); every other packet keeps the backend its flow is pinned to,
//! so established flows survive ring changes, unless their backend is marked
//! down, in which case they are scheduled afresh. A RST never creates an
//! entry; the client's FIN or RST marks the flow finished.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_IN_USE, Backend, FLOW_F_FINISHED, FlowState, GlobalCounter,
    LAST_SEEN_REFRESH_NS, PROTO_UDP, VipInfo, flow_hash,
};

use crate::{
    counters::count,
    maps::{BACKENDS, CONNTRACK, RINGS, ring_size, udp_idle_timeout_ns},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

pub struct Selection {
    pub backend_id: u32,
    pub backend: *const Backend,
    pub new_flow: bool,
}

#[inline(always)]
pub fn select_backend(packet: &Packet, vip: &VipInfo) -> Option<Selection> {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let is_syn = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !is_syn && let Some(selection) = pinned_backend(packet, now) {
        count(GlobalCounter::ConntrackHit);
        return Some(selection);
    }
    count(GlobalCounter::ConntrackMiss);

    let backend_id = ring_lookup(packet, vip)?;
    let backend = usable_backend(backend_id)?;
    let new_flow = packet.tcp_flags & TCP_RST == 0;
    if new_flow {
        let flags = if packet.tcp_flags & TCP_FIN != 0 {
            FLOW_F_FINISHED
        } else {
            0
        };
        let state = FlowState {
            backend_id,
            flags,
            last_seen_ns: now,
        };
        if CONNTRACK.insert(&packet.flow, &state, 0).is_err() {
            count(GlobalCounter::ConntrackInsertFailed);
        }
    }
    Some(Selection {
        backend_id,
        backend,
        new_flow,
    })
}

#[inline(always)]
fn pinned_backend(packet: &Packet, now: u64) -> Option<Selection> {
    let state = unsafe { &mut *CONNTRACK.get_ptr_mut(&packet.flow)? };
    let idle_ns = now.saturating_sub(state.last_seen_ns);
    if packet.flow.proto == PROTO_UDP && idle_ns > udp_idle_timeout_ns() {
        return None;
    }
    let backend = usable_backend(state.backend_id)?;
    if unsafe { (*backend).flags } & BACKEND_F_DOWN != 0 {
        return None;
    }
    if idle_ns > LAST_SEEN_REFRESH_NS {
        state.last_seen_ns = now;
    }
    if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 && state.flags & FLOW_F_FINISHED == 0 {
        state.flags |= FLOW_F_FINISHED;
    }
    Some(Selection {
        backend_id: state.backend_id,
        backend,
        new_flow: false,
    })
}

#[inline(always)]
fn ring_lookup(packet: &Packet, vip: &VipInfo) -> Option<u32> {
    let size = ring_size();
    if size == 0 {
        return None; // Never loaded so; also removes the divide-by-zero panic path.
    }
    let slot = vip
        .id
        .wrapping_mul(size)
        .wrapping_add(flow_hash(&packet.flow) % size);
    RINGS.get(slot).copied()
}

#[inline(always)]
fn usable_backend(backend_id: u32) -> Option<*const Backend> {
    let backend = BACKENDS.get_ptr(backend_id)?;
    if unsafe { (*backend).flags } & BACKEND_F_IN_USE == 0 {
        return None;
    }
    Some(backend)
}
