//! Health probes through the tunnel (tc egress, the agent's interfaces).
//! The agent's probe sockets for tunnel services connect to the VIP and
//! carry the mark `PROBE_MARK | backend id`; this program encapsulates such
//! packets exactly as the XDP path would for that backend and sends them to
//! it. So a probe succeeds only if the backend decapsulates and serves the
//! VIP, as Katran's healthcheck forwarding does. Other packets pass.

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, TC_ACT_OK,
        TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{bpf_get_hash_recalc, bpf_redirect},
    programs::TcContext,
};
use lb_common::{
    BACKEND_F_IN_USE, FAMILY_IPV4, FAMILY_IPV6, PROBE_MARK, PROBE_MARK_MASK, forwarding,
    wire::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_DF, tunnel_overhead},
};
use lb_ebpf::encap::{self, Entropy, Inner, MIN_TUNNELLED_FRAME};

use crate::maps::BACKENDS;

#[inline(always)]
pub fn encapsulate_probe(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: the context pointer is valid for the whole run.
    let (mark, protocol, ifindex) = unsafe { ((*skb).mark, u16::from_be((*skb).protocol as u16), (*skb).ifindex) };
    if mark & PROBE_MARK_MASK != PROBE_MARK {
        return TC_ACT_OK as i32;
    }
    let Some(backend) = BACKENDS.get(mark & !PROBE_MARK_MASK) else {
        return TC_ACT_SHOT as i32;
    };
    if backend.flags & BACKEND_F_IN_USE == 0 || backend.forwarding == forwarding::DSR {
        return TC_ACT_SHOT as i32;
    }
    let (family, tos, df) = match protocol {
        ETH_P_IP => {
            let tos: u8 = ctx.load(ETH_HLEN + 1).unwrap_or(0);
            let frags: u16 = ctx.load(ETH_HLEN + 6).map(u16::from_be).unwrap_or(0);
            (FAMILY_IPV4, tos, frags & IPV4_DF != 0)
        }
        ETH_P_IPV6 => {
            let first: u16 = ctx.load(ETH_HLEN).map(u16::from_be).unwrap_or(0);
            (FAMILY_IPV6, (first >> 4) as u8, true)
        }
        _ => return TC_ACT_SHOT as i32,
    };
    let inner_len = ctx.len().saturating_sub(ETH_HLEN as u32) as u16;
    let overhead = tunnel_overhead(backend.family, backend.forwarding);
    let mut flags =
        if backend.family == FAMILY_IPV4 { BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 } else { BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 } as u64;
    if backend.forwarding == forwarding::GUE {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64;
    }
    if ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags).is_err()
        || ctx.pull_data(MIN_TUNNELLED_FRAME as u32).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    let start = ctx.data();
    if start + MIN_TUNNELLED_FRAME > ctx.data_end() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: a helper that reads (and may compute) the skb's flow hash.
    let flow_hash = unsafe { bpf_get_hash_recalc(skb) };
    let inner = Inner { family, len: inner_len, tos, df };
    // SAFETY: MIN_TUNNELLED_FRAME bytes from `start` were bounds-checked just above.
    unsafe { encap::write_headers(start, backend, &inner, Entropy::Known(flow_hash)) };
    // Unmarked, the packet passes this program when it leaves by the
    // backend's interface.
    ctx.set_mark(0);
    if backend.ifindex == ifindex {
        return TC_ACT_OK as i32;
    }
    // SAFETY: a helper with plain arguments.
    unsafe { bpf_redirect(backend.ifindex, 0) as i32 }
}
