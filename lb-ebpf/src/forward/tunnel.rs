//! IPIP and GUE: the client's IP packet, unchanged, inside an outer IP
//! header (and a UDP header for GUE) addressed to the backend, which
//! decapsulates it and answers the client directly. Any family inside any
//! family: 4in4, 6in6, 4in6, 6in4.
//!
//! A packet that would exceed the path MTU once encapsulated is not sent:
//! the client gets a "too big" telling it the MTU that fits (`too_big`).

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    Backend, GlobalCounter, flow_hash, forwarding,
    wire::{ETH_HLEN, tunnel_overhead, usable_mtu},
};
use lb_ebpf::{
    encap::{self, Inner, MIN_TUNNELLED_FRAME},
    parse::Packet,
};

use super::{Prepared, too_big};
use crate::counters::count;

#[inline(always)]
pub fn encapsulate(ctx: &XdpContext, packet: &Packet, backend: &Backend) -> Prepared {
    let overhead = tunnel_overhead(backend.family, backend.forwarding);
    if packet.ip.len as usize + overhead > backend.mtu as usize {
        return too_big::reply(ctx, packet, usable_mtu(backend.mtu, overhead, packet.flow.family));
    }
    // Room for Ethernet and the outer headers right before the inner IP
    // header (a VLAN tag, if any, is dropped with the old Ethernet header).
    let delta = packet.ip.offset as i32 - (ETH_HLEN + overhead) as i32;
    // SAFETY: the helper checks `delta` against the frame's headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        count(GlobalCounter::DropEncapFailed);
        return Prepared::Drop;
    }
    let start = ctx.data();
    if start + MIN_TUNNELLED_FRAME > ctx.data_end() {
        // Unreachable: see MIN_TUNNELLED_FRAME.
        count(GlobalCounter::DropEncapFailed);
        return Prepared::Drop;
    }
    let inner = Inner {
        family: packet.flow.family,
        len: packet.ip.len,
        tos: packet.ip.tos,
        df: packet.ip.df,
        flow_hash: flow_hash(&packet.flow),
    };
    // SAFETY: MIN_TUNNELLED_FRAME bytes from `start` were bounds-checked just above.
    unsafe { encap::write_headers(start, backend, &inner) };
    count(if backend.forwarding == forwarding::GUE {
        GlobalCounter::ForwardedGue
    } else {
        GlobalCounter::ForwardedIpip
    });
    Prepared::ToBackend
}
