//! Client affinity (IPVS-style persistence): a new flow from a client seen
//! recently on the same VIP goes to that client's backend, whatever the
//! scheduler would pick, as long as the backend still takes new flows.

use lb_common::{AffinityKey, AffinityState, BACKEND_F_DOWN, BACKEND_F_ELIGIBLE, BACKEND_F_IN_USE, VipInfo};

use lb_ebpf::parse::Packet;

use crate::maps::{AFFINITY, BACKENDS};

#[inline(always)]
fn key(packet: &Packet, vip: &VipInfo) -> AffinityKey {
    AffinityKey { client: packet.flow.src, vip_id: vip.id, family: packet.flow.family, _pad: [0; 3] }
}

/// The client's backend, if it has one that is still fresh and eligible.
#[inline(always)]
pub fn lookup(packet: &Packet, vip: &VipInfo, now: u64) -> Option<u32> {
    // SAFETY: the map returned a pointer to a live entry; only this flow's client writes it.
    let state = unsafe { &mut *AFFINITY.get_ptr_mut(&key(packet, vip))? };
    if now.saturating_sub(state.last_seen_ns) > vip.persistence_timeout_ns {
        return None;
    }
    // SAFETY: a pointer into the BACKENDS array, valid for the whole run.
    let flags = unsafe { (*BACKENDS.get_ptr(state.backend_id)?).flags };
    let wanted = BACKEND_F_IN_USE | BACKEND_F_ELIGIBLE;
    if flags & (wanted | BACKEND_F_DOWN) != wanted {
        return None;
    }
    state.last_seen_ns = now;
    Some(state.backend_id)
}

#[inline(always)]
pub fn remember(packet: &Packet, vip: &VipInfo, backend_id: u32, now: u64) {
    let state = AffinityState { backend_id, _pad: 0, last_seen_ns: now };
    let _ = AFFINITY.insert(&key(packet, vip), &state, 0);
}
