//! The backend side of xdplb's tunnels (`xdplb decap`): strips IPIP
//! (4in4, 6in6, 4in6, 6in4) and GUE variant 1 from packets addressed to
//! this host and passes the inner packet to the kernel's stack, which finds
//! the VIP on `lo` and answers the client directly. No kernel tunnel
//! modules needed. Everything else passes untouched; a tunnel packet for
//! this host whose inner header is cut short or not IP is dropped, never
//! handed on half-parsed.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    AddressKey, DECAP_COUNTER_COUNT, DEFAULT_GUE_PORT, DecapCounter, FAMILY_IPV4, FAMILY_IPV6, MAX_DECAP_ADDRESSES,
    PROTO_UDP,
    wire::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_HLEN, IPV6_HLEN, UDP_HLEN},
};
use lb_ebpf as _; // panic handler

/// This host's addresses: only tunnels addressed to them are opened.
#[map]
static DECAP_ADDRESSES: HashMap<AddressKey, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRESSES, 0);

#[map]
static DECAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DECAP_COUNTER_COUNT, 0);

/// GUE's UDP port, network byte order (set at load).
#[unsafe(no_mangle)]
static GUE_PORT: u16 = DEFAULT_GUE_PORT.to_be();

/// IPv4 "more fragments" flag and fragment offset mask.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;

/// A tunnel packet found: where its inner packet starts and what it is.
struct Tunnel {
    inner_offset: usize,
    /// The family the outer header announces (IPIP); GUE: from the inner
    /// header's version.
    inner_family: Option<u8>,
    outer_dst: AddressKey,
    counter: DecapCounter,
}

#[xdp]
pub fn xdplb_decap(ctx: XdpContext) -> u32 {
    let Some(tunnel) = find_tunnel(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: a lookup with a key on the stack.
    if unsafe { DECAP_ADDRESSES.get(&tunnel.outer_dst) }.is_none() {
        count(DecapCounter::PassNotLocal);
        return xdp_action::XDP_PASS;
    }
    let Some(inner_family) = inner_family(&ctx, &tunnel) else {
        count(DecapCounter::DropMalformed);
        return xdp_action::XDP_DROP;
    };
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header was bounds-checked just above.
    let macs = unsafe { *(start as *const [u8; 12]) };
    // SAFETY: the helper checks the delta against the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, (tunnel.inner_offset - ETH_HLEN) as i32) } != 0 {
        count(DecapCounter::DropMalformed);
        return xdp_action::XDP_DROP;
    }
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let ether_type = if inner_family == FAMILY_IPV4 { ETH_P_IP } else { ETH_P_IPV6 }.to_be_bytes();
    // SAFETY: the new Ethernet header was bounds-checked just above.
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; 12], macs);
        core::ptr::write_unaligned((start + 12) as *mut [u8; 2], ether_type);
    }
    count(tunnel.counter);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn find_tunnel(ctx: &XdpContext) -> Option<Tunnel> {
    let ether_type = u16::from_be_bytes(read::<[u8; 2]>(ctx, 12)?);
    match ether_type {
        ETH_P_IP => {
            let ip = read::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN)?;
            // Options or fragments: not ours to open (the kernel decides).
            let frags = u16::from_be_bytes([ip[6], ip[7]]);
            if ip[0] != 0x45 || frags & IPV4_MF_OR_OFFSET != 0 {
                return None;
            }
            let mut outer_dst = AddressKey { family: FAMILY_IPV4, ..AddressKey::default() };
            outer_dst.addr[0] = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
            after_outer(ctx, ip[9], ETH_HLEN + IPV4_HLEN, outer_dst)
        }
        ETH_P_IPV6 => {
            let ip = read::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let mut outer_dst = AddressKey { family: FAMILY_IPV6, ..AddressKey::default() };
            for (i, word) in outer_dst.addr.iter_mut().enumerate() {
                let at = 24 + i * 4;
                *word = u32::from_ne_bytes([ip[at], ip[at + 1], ip[at + 2], ip[at + 3]]);
            }
            after_outer(ctx, ip[6], ETH_HLEN + IPV6_HLEN, outer_dst)
        }
        _ => None,
    }
}

#[inline(always)]
fn after_outer(ctx: &XdpContext, protocol: u8, offset: usize, outer_dst: AddressKey) -> Option<Tunnel> {
    match protocol {
        IPPROTO_IPIP | IPPROTO_IPV6 => Some(Tunnel {
            inner_offset: offset,
            inner_family: Some(if protocol == IPPROTO_IPIP { FAMILY_IPV4 } else { FAMILY_IPV6 }),
            outer_dst,
            counter: DecapCounter::Ipip,
        }),
        PROTO_UDP => {
            let udp = read::<[u8; UDP_HLEN]>(ctx, offset)?;
            // SAFETY: a plain read of a static, volatile so that the value
            // the loader writes is what counts.
            let gue_port = unsafe { core::ptr::read_volatile(&GUE_PORT) };
            if u16::from_ne_bytes([udp[2], udp[3]]) != gue_port {
                return None;
            }
            Some(Tunnel { inner_offset: offset + UDP_HLEN, inner_family: None, outer_dst, counter: DecapCounter::Gue })
        }
        _ => None,
    }
}

/// The inner packet's family, if a whole IP header of it is there and
/// agrees with what the outer header announced.
#[inline(always)]
fn inner_family(ctx: &XdpContext, tunnel: &Tunnel) -> Option<u8> {
    let first = read::<[u8; 1]>(ctx, tunnel.inner_offset)?[0];
    let family = match first >> 4 {
        4 => FAMILY_IPV4,
        6 => FAMILY_IPV6,
        _ => return None,
    };
    if tunnel.inner_family.is_some_and(|announced| announced != family) {
        return None;
    }
    let whole = if family == FAMILY_IPV4 {
        read::<[u8; IPV4_HLEN]>(ctx, tunnel.inner_offset).is_some_and(|h| h[0] & 0x0f >= 5)
    } else {
        read::<[u8; IPV6_HLEN]>(ctx, tunnel.inner_offset).is_some()
    };
    whole.then_some(family)
}

/// A copy of `T` from the frame at `offset`, if the frame holds it.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds-checked against data_end just above.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

#[inline(always)]
fn count(counter: DecapCounter) {
    if let Some(value) = DECAP_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *value += 1 };
    }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
