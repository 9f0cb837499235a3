//! L2 direct server return: only the Ethernet addresses change, so no IP or
//! L4 checksum needs fixing. The backend owns the VIP on its loopback and
//! answers the client directly.

use aya_ebpf::programs::XdpContext;
use lb_common::{Backend, GlobalCounter};
use network_types::eth::EthHdr;

use super::Prepared;
use crate::counters::count;

#[inline(always)]
pub fn rewrite(ctx: &XdpContext, backend: &Backend) -> Prepared {
    if !set_macs(ctx, backend) {
        return Prepared::Drop;
    }
    count(GlobalCounter::ForwardedDsr);
    Prepared::ToBackend
}

/// The frame's Ethernet addresses for the hop to the backend (DSR, and
/// NAT after its rewrite).
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, backend: &Backend) -> bool {
    let start = ctx.data();
    if start + EthHdr::LEN > ctx.data_end() {
        // Unreachable after a successful parse; keeps the verifier informed.
        return false;
    }
    // SAFETY: the Ethernet header was bounds-checked against data_end just
    // above; the addresses are in a map value.
    unsafe { lb_ebpf::eth::set_addresses(start, &backend.dst_mac, &backend.src_mac) };
    true
}
