//! Forwarding modes, side by side: each prepares the frame for its backend
//! (`dsr`: new MAC addresses; `tunnel`: IPIP or GUE encapsulation, or a
//! "too big" reply to the client; `nat`: addresses and ports rewritten),
//! then the frame leaves by the backend's interface (`transmit`) or back
//! where it came from (a reply). `nat` also turns backends' replies back.

mod dsr;
pub mod nat;
mod too_big;
mod tunnel;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, GlobalCounter, forwarding};
use lb_ebpf::parse::Packet;

use crate::{counters::count, maps::EGRESS_DEVICES, select::Selection};

/// What a forwarding mode made of the frame.
pub enum Prepared {
    /// Rewritten for the backend: send it to the backend's interface.
    ToBackend,
    /// Turned into a reply to the client: back out the ingress interface.
    Reply,
    Drop,
}

#[inline(always)]
pub fn forward(ctx: &XdpContext, packet: &Packet, selection: &Selection, backend: &Backend) -> u32 {
    // DSR, the default, tested first. The agent writes only the four
    // `forwarding` values, so what is neither DSR nor NAT is a tunnel.
    let prepared = if backend.forwarding == forwarding::DSR {
        dsr::rewrite(ctx, backend)
    } else if backend.forwarding == forwarding::NAT {
        nat::translate(ctx, packet, selection.backend_id, selection.translation, backend)
    } else {
        tunnel::encapsulate(ctx, packet, backend)
    };
    match prepared {
        Prepared::ToBackend => transmit(ctx, backend),
        Prepared::Reply => xdp_action::XDP_TX,
        Prepared::Drop => xdp_action::XDP_DROP,
    }
}

/// Sends a frame prepared for `backend` out of the backend's interface.
#[inline(always)]
fn transmit(ctx: &XdpContext, backend: &Backend) -> u32 {
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        count(GlobalCounter::ActionTx);
        return xdp_action::XDP_TX;
    }
    match EGRESS_DEVICES.redirect(backend.ifindex, xdp_action::XDP_DROP as u64) {
        Ok(action) => {
            count(GlobalCounter::ActionRedirect);
            action
        }
        Err(action) => {
            count(GlobalCounter::DropNoEgressDevice);
            action
        }
    }
}
