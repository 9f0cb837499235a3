//! XDP_PASS, nothing else. Test topologies attach it to the switch side of
//! veth pairs: veth only delivers frames that xdplb sends back with XDP_TX
//! when the peer runs an XDP program (a kernel requirement, not ours).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_ebpf as _; // panic handler

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
