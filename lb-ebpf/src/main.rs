//! xdplb data plane. The main path reads top to bottom:
//! parse → classify → select → rewrite and forward, counting as it goes.
#![no_std]
#![no_main]
// atomic_xadd: the BPF target has no CAS, so core's atomics lack fetch_add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod affinity;
mod classify;
mod clock;
mod counters;
mod forward;
mod half_open;
mod maps;
mod probe;
mod schedule;
mod select;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use lb_common::{GlobalCounter, VIP_F_NAT};
use lb_ebpf::parse::{self, Parsed, Unclassifiable};

use crate::{
    counters::{count, count_traffic},
    maps::BACKENDS,
};

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    #[cfg(feature = "upgrade-variant")]
    counters::count_slot(lb_common::UPGRADE_VARIANT_COUNTER_SLOT);
    let packet = match parse::parse(&ctx) {
        Parsed::Packet(packet) => packet,
        Parsed::Unclassifiable { dst, family, reason } => {
            return drop_if_vip_address(dst, family, reason);
        }
        Parsed::OtherProtocol => {
            // ICMP perhaps: an error a backend (or a router on its way) sent about a NAT flow.
            if forward::nat::enabled()
                && let Some(action) = forward::nat::icmp_error(&ctx)
            {
                return action;
            }
            return pass(GlobalCounter::PassNonVip);
        }
        Parsed::Unparsed => return pass(GlobalCounter::PassUnparsed),
    };

    let Some(vip) = classify::lookup_vip(&packet.flow) else {
        // Not for a VIP: perhaps a backend's reply to a NAT flow.
        if forward::nat::enabled()
            && let Some(action) = forward::nat::reply(&ctx, &packet)
        {
            return action;
        }
        return pass(GlobalCounter::PassNonVip);
    };

    // A NAT flow's established packets and handshake's last ACK: its translation names the backend.
    if vip.flags & VIP_F_NAT != 0
        && let Some(action) = forward::nat::established(&ctx, &packet, &vip)
    {
        return action;
    }

    let mut selected = select::select_for(&packet, &vip);
    // A NAT service's new SYN: select picked its backend; its translation
    // is made here, out of select's stack.
    if select::unclaimed(selected) {
        selected = select::claim_nat_syn(&packet, &vip, selected);
    }
    let selection = select::unpack(selected);
    let (backend_id, new_flow) = (selection.backend_id, selection.new_flow);
    let backend = match BACKENDS.get(backend_id) {
        Some(backend) if selected != select::NOTHING_SELECTED => backend,
        _ => {
            count(GlobalCounter::DropNoBackend);
            debug!(&ctx, "VIP {}: no usable backend, dropped", vip.id);
            return xdp_action::XDP_DROP;
        }
    };

    let bytes = (ctx.data_end() - ctx.data()) as u64;
    count_traffic(vip.id, backend_id, bytes, new_flow);
    if new_flow {
        // Debug logging is a load-time setting: when off, the verifier
        // removes this code (xdplb swaps in a new program to switch it).
        debug!(
            &ctx,
            "VIP {}: new flow from port {} to backend {}",
            vip.id,
            u16::from_be(packet.flow.sport),
            backend_id
        );
    }
    forward::forward(&ctx, &packet, &selection, backend)
}

/// tc egress: tunnels the agent's health probes to the backend they check.
#[classifier]
pub fn xdplb_probe(ctx: TcContext) -> i32 {
    probe::encapsulate_probe(&ctx)
}

#[inline(always)]
fn pass(counter: GlobalCounter) -> u32 {
    count(counter);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop_if_vip_address(dst: [u32; 4], family: u8, reason: Unclassifiable) -> u32 {
    if !classify::is_vip_address(dst, family) {
        return pass(GlobalCounter::PassNonVip);
    }
    count(match reason {
        Unclassifiable::Ipv4Fragment => GlobalCounter::DropFragment,
        Unclassifiable::Ipv6ExtensionHeader => GlobalCounter::DropIpv6ExtHeader,
    });
    xdp_action::XDP_DROP
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
