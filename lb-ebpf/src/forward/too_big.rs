//! "Too big" replies: the client's packet becomes an ICMP "fragmentation
//! needed" (IPv4, RFC 1191) or ICMPv6 "packet too big" (RFC 4443) from the
//! VIP, quoting the start of the packet, and goes back out the interface it
//! came in by. The client's stack lowers its path MTU for the VIP and
//! resends in smaller packets. IPv4 without DF cannot be answered so (XDP
//! cannot fragment) and is dropped; so is a VLAN-tagged frame, whose tag
//! the reply would lose.

use aya_ebpf::{
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_IPV4, GlobalCounter, TOO_BIG_QUOTE_LEN, TUNNEL_TTL,
    wire::{self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV4_HLEN, IPV6_HLEN},
};
use lb_ebpf::parse::Packet;

use super::Prepared;
use crate::counters::count;

#[inline(always)]
pub fn reply(ctx: &XdpContext, packet: &Packet, mtu: u16) -> Prepared {
    let v4 = packet.flow.family == FAMILY_IPV4;
    if packet.ip.offset != ETH_HLEN || !packet.ip.df {
        count(GlobalCounter::DropTooBig);
        return Prepared::Drop;
    }
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return Prepared::Drop;
    }
    // SAFETY: the Ethernet header was bounds-checked just above.
    let (client_mac, our_mac) = unsafe { (*((start + 6) as *const [u8; 6]), *(start as *const [u8; 6])) };
    let prepended = if v4 { IPV4_HLEN + ICMP_HLEN } else { IPV6_HLEN + ICMP_HLEN };
    let reply_len = ETH_HLEN + prepended + TOO_BIG_QUOTE_LEN;
    // New headers in front of the IP packet, which becomes the quote; then
    // the quote is cut to its length.
    // SAFETY: the helpers check the deltas against the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(prepended as i32)) } != 0 {
        count(GlobalCounter::DropEncapFailed);
        return Prepared::Drop;
    }
    // The length from the helper: arithmetic on data_end is not allowed.
    // SAFETY: a helper that only reads the context.
    let excess = unsafe { bpf_xdp_get_buff_len(ctx.ctx) } as i32 - reply_len as i32;
    // SAFETY: as above.
    if excess < 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, -excess) } != 0 {
        count(GlobalCounter::DropEncapFailed);
        return Prepared::Drop;
    }
    let start = ctx.data();
    let quote = start + ETH_HLEN + prepended;
    if quote + TOO_BIG_QUOTE_LEN > ctx.data_end() {
        return Prepared::Drop;
    }
    // SAFETY: the quote lies within the frame (checked just above); the
    // helper only reads it.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote as *mut u32, TOO_BIG_QUOTE_LEN as u32, 0) };
    // The helper sums 16-bit words in host order: swapped on little-endian
    // (a one's-complement sum swaps with its bytes, RFC 1071).
    let quote_sum = u16::from_be(wire::fold(sum as u32 as u64)) as u64;
    let mut eth = [0u8; ETH_HLEN];
    eth[..6].copy_from_slice(&client_mac);
    eth[6..12].copy_from_slice(&our_mac);
    let (vip, client) = (&packet.flow.dst, &packet.flow.src);
    let icmp_at = start + ETH_HLEN + prepended - ICMP_HLEN;
    // SAFETY (the writes): every header ends before `quote`, which is in
    // bounds (checked above).
    unsafe {
        if v4 {
            eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
            let total = (IPV4_HLEN + ICMP_HLEN + TOO_BIG_QUOTE_LEN) as u16;
            let ip = wire::ipv4_header(0, total, false, TUNNEL_TTL, IPPROTO_ICMP, vip[0], client[0]);
            core::ptr::write_unaligned((start + ETH_HLEN) as *mut [u8; IPV4_HLEN], ip);
            core::ptr::write_unaligned(icmp_at as *mut [u8; ICMP_HLEN], wire::icmp_frag_needed(mtu, quote_sum));
        } else {
            eth[12..].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
            let length = (ICMP_HLEN + TOO_BIG_QUOTE_LEN) as u16;
            let ip = wire::ipv6_header(0, 0, length, IPPROTO_ICMPV6, TUNNEL_TTL, vip, client);
            core::ptr::write_unaligned((start + ETH_HLEN) as *mut [u8; IPV6_HLEN], ip);
            let icmp = wire::icmpv6_packet_too_big(mtu, vip, client, length, quote_sum);
            core::ptr::write_unaligned(icmp_at as *mut [u8; ICMP_HLEN], icmp);
        }
        core::ptr::write_unaligned(start as *mut [u8; ETH_HLEN], eth);
    }
    count(if v4 { GlobalCounter::TooBigSentV4 } else { GlobalCounter::TooBigSentV6 });
    Prepared::Reply
}
