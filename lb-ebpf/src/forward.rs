//! L2 direct server return: only the Ethernet addresses change, so no IP or
//! L4 checksum needs fixing. The backend owns the VIP on its loopback and
//! answers the client directly.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, GlobalCounter};
use network_types::eth::EthHdr;

use crate::{counters::count, maps::EGRESS_DEVICES};

#[inline(always)]
pub fn forward_dsr(ctx: &XdpContext, backend: &Backend) -> u32 {
    let start = ctx.data();
    if start + EthHdr::LEN > ctx.data_end() {
        // Unreachable after a successful parse; keeps the verifier informed.
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header was bounds-checked against data_end just above.
    let eth = unsafe { &mut *(start as *mut EthHdr) };
    eth.dst_addr = backend.dst_mac;
    eth.src_addr = backend.src_mac;

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
