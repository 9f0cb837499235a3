//! Writing a tunnel's Ethernet and outer headers in front of an inner IP
//! packet: shared by the XDP forwarding path and the tc program that
//! tunnels the agent's health probes.

use aya_ebpf::{helpers::generated::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    Backend, FAMILY_IPV4, FlowKey, forwarding, tunnel_entropy,
    wire::{self, ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, UDP_HLEN, tunnel_overhead},
};

use crate::parse::Packet;

/// Where the furthest header write ends (Ethernet, IPv6, UDP). Every
/// tunnelled frame is at least this long (the shortest, 4in4 IPIP of an
/// empty UDP datagram, is 14 + 20 + 28 bytes), so one bounds check covers
/// every write.
pub const MIN_TUNNELLED_FRAME: usize = ETH_HLEN + IPV6_HLEN + UDP_HLEN;

/// What the outer headers copy from the inner packet.
#[derive(Clone, Copy)]
pub struct Inner {
    pub family: u8,
    /// The inner IP packet's length.
    pub len: u16,
    pub tos: u8,
    /// Inner IPv4 DF (IPv6: always set); the outer IPv4 header copies it.
    pub df: bool,
}

impl Inner {
    /// What the outer headers take from a parsed packet.
    #[inline(always)]
    pub fn of(packet: &Packet) -> Self {
        Inner { family: packet.flow.family, len: packet.ip.len, tos: packet.ip.tos, df: packet.ip.df }
    }
}

/// Encapsulates the packet in XDP: room for Ethernet and the outer headers
/// right before the inner IP header (a VLAN tag, if any, goes with the old
/// Ethernet header), then the headers. False if the frame could not grow.
#[inline(always)]
pub fn encapsulate_xdp(ctx: &XdpContext, packet: &Packet, backend: &Backend) -> bool {
    let overhead = tunnel_overhead(backend.family, backend.forwarding);
    let delta = packet.ip.offset as i32 - (ETH_HLEN + overhead) as i32;
    // SAFETY: the helper checks `delta` against the frame's headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return false;
    }
    let start = ctx.data();
    if start + MIN_TUNNELLED_FRAME > ctx.data_end() {
        return false; // unreachable: see MIN_TUNNELLED_FRAME
    }
    // SAFETY: MIN_TUNNELLED_FRAME bytes from `start` were bounds-checked just above.
    unsafe { write_headers(start, backend, &Inner::of(packet), Entropy::OfFlow(&packet.flow)) };
    true
}

/// A value stable per flow for the outer headers (GUE source port, outer
/// IPv6 flow label).
pub enum Entropy<'a> {
    /// Hashed from the flow only if a header carries it: an IPv4 IPIP
    /// packet does not wait for a hash it never writes.
    OfFlow(&'a FlowKey),
    Known(u32),
}

impl Entropy<'_> {
    /// Inlined: compiled as a BPF subprogram (a closure was), its call cost
    /// GUE packets 6-10 ns of the 12-14 saved.
    #[inline(always)]
    fn value(&self) -> u32 {
        match self {
            Entropy::OfFlow(flow) => tunnel_entropy(flow),
            Entropy::Known(value) => *value,
        }
    }
}

/// Writes Ethernet and outer headers at `start`, where the caller made
/// `tunnel_overhead` bytes of room before the inner packet.
///
/// # Safety
/// `start..start + MIN_TUNNELLED_FRAME` must be writable packet memory.
#[inline(always)]
pub unsafe fn write_headers(start: usize, backend: &Backend, inner: &Inner, entropy: Entropy) {
    let gue = backend.forwarding == forwarding::GUE;
    let entropy = if gue || backend.family != FAMILY_IPV4 { entropy.value() } else { 0 };
    let ether_type = if backend.family == FAMILY_IPV4 { ETH_P_IP } else { ETH_P_IPV6 };
    let mut eth = [0u8; ETH_HLEN];
    eth[..6].copy_from_slice(&backend.dst_mac);
    eth[6..12].copy_from_slice(&backend.src_mac);
    eth[12..].copy_from_slice(&ether_type.to_be_bytes());
    let payload_len = if gue { inner.len + UDP_HLEN as u16 } else { inner.len };
    let protocol = wire::outer_protocol(backend.forwarding, inner.family);
    // SAFETY (all writes below): the caller guarantees MIN_TUNNELLED_FRAME
    // writable bytes from `start`; every write ends before that.
    unsafe {
        core::ptr::write_unaligned(start as *mut [u8; ETH_HLEN], eth);
        let udp_at = if backend.family == FAMILY_IPV4 {
            let df = inner.df || inner.family != FAMILY_IPV4;
            let ip = wire::outer_ipv4(inner.tos, payload_len, df, protocol, backend.tunnel_src[0], backend.addr[0]);
            core::ptr::write_unaligned((start + ETH_HLEN) as *mut [u8; IPV4_HLEN], ip);
            start + ETH_HLEN + IPV4_HLEN
        } else {
            let ip = wire::outer_ipv6(inner.tos, entropy, payload_len, protocol, &backend.tunnel_src, &backend.addr);
            core::ptr::write_unaligned((start + ETH_HLEN) as *mut [u8; IPV6_HLEN], ip);
            start + ETH_HLEN + IPV6_HLEN
        };
        if gue {
            let udp = wire::gue_udp_header(wire::gue_source_port(entropy), backend.gue_port, inner.len);
            core::ptr::write_unaligned(udp_at as *mut [u8; UDP_HLEN], udp);
        }
    }
}
