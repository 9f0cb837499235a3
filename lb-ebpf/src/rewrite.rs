//! NAT's rewrite in place: addresses and ports replaced, the IP and L4
//! checksums patched from what changed (`lb_common::nat`), never re-summed.
//! Shared by the load balancer and the benchmark's NAT floors.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    FAMILY_IPV4, PROTO_TCP, PROTO_UDP,
    nat::{address_words, replace, replace_udp},
};

use crate::parse::Packet;

/// Masks that keep header offsets provably small for the verifier (the
/// parser already bounded them: IP at 14 or 18, L4 at most 18 + 60).
const IP_OFFSET_MASK: usize = 0x1f;
const L4_OFFSET_MASK: usize = 0x7f;

/// Rewrites source and destination (address and port) in place and patches
/// the IP and L4 checksums. Ports are network byte order. `false` when the
/// headers are not all there (the parser saw them, so never in practice).
#[inline(always)]
pub fn rewrite(ctx: &XdpContext, packet: &Packet, src: &[u32; 4], sport: u16, dst: &[u32; 4], dport: u16) -> bool {
    let flow = &packet.flow;
    let v4 = flow.family == FAMILY_IPV4;
    let start = ctx.data();
    let end = ctx.data_end();
    let ip = start + (packet.ip.offset & IP_OFFSET_MASK);
    let l4 = start + (packet.l4_offset & L4_OFFSET_MASK);
    let removed_addresses = address_words(&flow.src) + address_words(&flow.dst);
    let added_addresses = address_words(src) + address_words(dst);
    let removed = removed_addresses + flow.sport as u64 + flow.dport as u64;
    let added = added_addresses + sport as u64 + dport as u64;
    if v4 {
        if ip + 20 > end {
            return false;
        }
        // SAFETY: the IPv4 header was bounds-checked just above; writes are
        // unaligned-safe byte copies.
        unsafe {
            write(ip + 12, &src[0].to_ne_bytes());
            write(ip + 16, &dst[0].to_ne_bytes());
            let check = replace(read16(ip + 10), removed_addresses, added_addresses);
            write(ip + 10, &check.to_ne_bytes());
        }
    } else {
        if ip + 40 > end {
            return false;
        }
        // SAFETY: the IPv6 header was bounds-checked just above.
        unsafe {
            for i in 0..4 {
                write(ip + 8 + 4 * i, &src[i].to_ne_bytes());
                write(ip + 24 + 4 * i, &dst[i].to_ne_bytes());
            }
        }
    }
    match flow.proto {
        PROTO_TCP => {
            if l4 + 20 > end {
                return false;
            }
            // SAFETY: the TCP header was bounds-checked just above.
            unsafe {
                write(l4, &sport.to_ne_bytes());
                write(l4 + 2, &dport.to_ne_bytes());
                let check = replace(read16(l4 + 16), removed, added);
                write(l4 + 16, &check.to_ne_bytes());
            }
        }
        PROTO_UDP => {
            if l4 + 8 > end {
                return false;
            }
            // SAFETY: the UDP header was bounds-checked just above.
            unsafe {
                write(l4, &sport.to_ne_bytes());
                write(l4 + 2, &dport.to_ne_bytes());
                let check = replace_udp(read16(l4 + 6), removed, added, v4);
                write(l4 + 6, &check.to_ne_bytes());
            }
        }
        _ => return false,
    }
    true
}

/// # Safety
/// `at..at + N` must be inside the packet.
#[inline(always)]
pub unsafe fn write<const N: usize>(at: usize, bytes: &[u8; N]) {
    // SAFETY: the caller checked the bounds; byte stores need no alignment.
    unsafe { core::ptr::write_unaligned(at as *mut [u8; N], *bytes) }
}

/// # Safety
/// `at..at + 4` must be inside the packet.
#[inline(always)]
pub unsafe fn read32(at: usize) -> u32 {
    // SAFETY: the caller checked the bounds.
    u32::from_ne_bytes(unsafe { core::ptr::read_unaligned(at as *const [u8; 4]) })
}

/// # Safety
/// `at..at + 16` must be inside the packet.
#[inline(always)]
pub unsafe fn read128(at: usize) -> [u32; 4] {
    // SAFETY: the caller checked the bounds.
    unsafe { [read32(at), read32(at + 4), read32(at + 8), read32(at + 12)] }
}

/// # Safety
/// `at..at + 2` must be inside the packet.
#[inline(always)]
pub unsafe fn read16(at: usize) -> u16 {
    // SAFETY: the caller checked the bounds.
    u16::from_ne_bytes(unsafe { core::ptr::read_unaligned(at as *const [u8; 2]) })
}
